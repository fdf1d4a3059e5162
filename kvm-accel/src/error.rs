// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate-level [`Error`] type.

use std::path::PathBuf;

use crate::clear_log::ClearDirtyLogError;

/// Errors returned by this crate.
///
/// Every fallible operation of the crate returns this type; kernel errors keep their
/// `errno` so callers can tell them apart.
///
/// # Example
///
/// ```
/// use clearlog_kvm::Error;
///
/// let e = Error::SlotOutOfRange { slot: 40_000, max: 32_764 };
/// assert!(e.to_string().contains("40000"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The KVM device node does not exist.
    #[error("cannot open {path}: no such device node; is the kvm module loaded (modprobe kvm_intel, kvm_amd or kvm_pvm)?")]
    KvmMissing {
        /// Path of the device node.
        path: PathBuf,
    },
    /// The KVM device node exists but cannot be opened by this user.
    #[error(
        "cannot open {path}: permission denied; add your user to the kvm group or run as root"
    )]
    KvmPermission {
        /// Path of the device node.
        path: PathBuf,
    },
    /// The KVM device node could not be opened for another reason.
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        /// Path of the device node.
        path: PathBuf,
        /// The underlying error.
        source: vmm_sys_util::errno::Error,
    },
    /// The KVM API version is not the stable version 12.
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// Name of the operation (ioctl) that failed.
        op: &'static str,
        /// The kernel's error.
        source: vmm_sys_util::errno::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` was refused (see [`ClearDirtyLogError`]).
    #[error(transparent)]
    ClearDirtyLog(#[from] ClearDirtyLogError),
    /// Manual dirty-log protection was requested but the kernel does not offer it.
    #[error("manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) requested with flags {requested:#x}, kernel offers {offered:#x}")]
    ManualProtectUnsupported {
        /// Flags requested.
        requested: u64,
        /// Flags offered by `KVM_CHECK_EXTENSION`.
        offered: u64,
    },
    /// `clear_dirty_log` was called on a VM in legacy dirty-log mode.
    #[error(
        "KVM_CLEAR_DIRTY_LOG needs manual dirty-log protection; this VM uses legacy dirty logging"
    )]
    NotManualMode,
    /// A memslot id is beyond the kernel's limit.
    #[error("memslot {slot} out of range: the kernel supports {max} memslots per address space")]
    SlotOutOfRange {
        /// The slot id (without address-space bits).
        slot: u32,
        /// `KVM_CAP_NR_MEMSLOTS`.
        max: u32,
    },
    /// Every memslot id the kernel offers is in use.
    #[error("all {max} KVM memslots are in use: remove a memory region or merge regions")]
    SlotLimit {
        /// `KVM_CAP_NR_MEMSLOTS`.
        max: u32,
    },
    /// A dirty-log clear that the per-slot cache refuses (before any sync, or out of range).
    #[error(transparent)]
    DirtyCache(#[from] crate::dirty_cache::CacheError),
    /// The memslot is not registered with this VM.
    #[error("memslot {0:#x} is not registered")]
    UnknownSlot(u32),
    /// The memslot exists but dirty logging is off.
    #[error("memslot {0:#x} does not have dirty logging enabled")]
    SlotNotLogging(u32),
    /// A memslot parameter is not page aligned or is zero.
    #[error("invalid memslot {slot:#x}: {reason}")]
    InvalidMemslot {
        /// The slot id.
        slot: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A caller buffer is too small.
    #[error("buffer too small: need {needed} u64 words, got {got}")]
    BufferTooSmall {
        /// Words needed.
        needed: usize,
        /// Words provided.
        got: usize,
    },
    /// A dirty-log range is invalid for the slot.
    #[error("invalid dirty-log range for slot {slot:#x}: pages [{first_page}, {end}) of a {slot_pages}-page slot: {reason}")]
    InvalidRange {
        /// The slot id.
        slot: u32,
        /// First page of the range.
        first_page: u64,
        /// One past the last page of the range.
        end: u64,
        /// Pages in the slot.
        slot_pages: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Guest memory access outside the guest RAM.
    #[error("guest memory access at {gpa:#x} (+{len:#x}) out of bounds")]
    GuestMemory {
        /// Guest physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },
    /// The guest RAM is too big or too small for the workload layout.
    #[error("invalid guest layout: {0}")]
    Layout(String),
    /// Generating a guest program failed.
    #[error("assembling guest code: {0}")]
    Assemble(String),
    /// A workload parameter is invalid.
    #[error("invalid workload: {0}")]
    InvalidWorkload(String),
    /// A saved vCPU state blob cannot be parsed.
    #[error("invalid vCPU state: {0}")]
    InvalidState(String),
    /// The vCPU left `KVM_RUN` for a reason the runner cannot handle.
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: u32,
        /// Exit reason or error, as text.
        reason: String,
    },
    /// The vCPU thread did not reach the requested state in time.
    #[error("vCPU {vcpu}: timed out waiting for it to {what}")]
    VcpuTimeout {
        /// vCPU index.
        vcpu: u32,
        /// What we waited for.
        what: &'static str,
    },
    /// The operation needs the vCPU thread to be paused.
    #[error("vCPU {0} is not paused")]
    VcpuNotPaused(u32),
    /// Spawning the vCPU thread or registering the kick signal failed.
    #[error("vCPU thread: {0}")]
    Thread(String),
    /// The workload did not become ready in time.
    #[error("workload not ready after {0:?}")]
    WorkloadTimeout(std::time::Duration),
}

/// Convenience alias for `Result<T, clearlog_kvm::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}
