// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate-level [`Error`] type.

use std::path::PathBuf;

use clearlog_bitmap::format_size;

use crate::dirty_cache::CacheError;
use crate::mode::KvmDirtyLogMode;
use crate::raw::ClearDirtyLogError;

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
    #[error("cannot open {path}")]
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
    #[error("{op} failed")]
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
    /// Every memslot id the listener may use is in use.
    #[error("all memslot ids {start}..{end} of the listener are in use: remove a memory region, merge regions or give the listener more ids (KvmMemoryListener::with_slot_ids)")]
    SlotLimit {
        /// First id the listener may use.
        start: u32,
        /// One past the last id the listener may use.
        end: u32,
    },
    /// A slot-id range for [`KvmMemoryListener::with_slot_ids`](crate::KvmMemoryListener::with_slot_ids)
    /// that is empty or goes past the kernel's limit.
    #[error("invalid memslot id range {start}..{end}: it must be non-empty and end at most at {max} (KVM_CAP_NR_MEMSLOTS)")]
    InvalidSlotIds {
        /// Start of the range.
        start: u32,
        /// End of the range (exclusive).
        end: u32,
        /// `KVM_CAP_NR_MEMSLOTS`.
        max: u32,
    },
    /// A bitmap of `clearlog-bitmap` refused the call (a buffer smaller than the slot).
    #[error("dirty bitmap")]
    Bitmap(#[from] clearlog_bitmap::Error),
    /// A dirty-log clear that the per-slot cache refuses (before any sync, or out of range).
    #[error(transparent)]
    DirtyCache(#[from] CacheError),
    /// The memslot is not registered with this VM.
    #[error("memslot {0:#x} is not registered")]
    UnknownSlot(u32),
    /// The memslot exists but dirty logging is off.
    #[error("memslot {0:#x} does not have dirty logging enabled")]
    SlotNotLogging(u32),
    /// A sync of a section that clients log, whose memslot has no dirty log (logging never
    /// started on it): its writes cannot be reported, so the sync fails instead of reporting none.
    #[error("sync of memslot {slot} (guest {guest_addr:#x}, size {size:#x}): the section is logged by dirty-memory clients but the memslot has no dirty logging (did log_start or region_add fail?); its writes cannot be reported")]
    SyncOfSlotNotLogging {
        /// The slot id.
        slot: u32,
        /// Guest physical address of the section.
        guest_addr: u64,
        /// Size of the section in bytes.
        size: u64,
    },
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
    /// A slot a dirty-log cache (a [`KvmMemoryListener`](crate::KvmMemoryListener) or a
    /// [`VmmSlotCache`](crate::VmmSlotCache)) owns was asked for through a path that bypasses
    /// the cache's [`SlotDirtyCache`](crate::SlotDirtyCache).
    #[error("memslot {slot} belongs to a dirty-log cache (a KvmMemoryListener or a VmmSlotCache): its dirty log is read and cleared through that cache only; a direct GET or CLEAR would lose writes")]
    SlotOwnedByCache {
        /// The slot id.
        slot: u32,
    },
    /// The memslot id is already registered with this `Vm` by someone else.
    #[error("memslot {slot} is already in use in this Vm (by the caller or a dirty-log cache): give each user its own slot ids (KvmMemoryListener::with_slot_ids)")]
    SlotInUse {
        /// The slot id.
        slot: u32,
    },
    /// KVM refused to create a new memslot (`EEXIST` or `EINVAL`).
    #[error("KVM_SET_USER_MEMORY_REGION refused new memslot {slot} (guest {guest_phys:#x}, size {size:#x}): the slot id (or the guest range) may be in use by a memslot the VMM made outside this Vm (give KvmMemoryListener the slot ids it may use with KvmMemoryListener::with_slot_ids)")]
    MemslotRefused {
        /// The slot id.
        slot: u32,
        /// Guest physical address of the slot.
        guest_phys: u64,
        /// Size of the slot in bytes.
        size: u64,
        /// The kernel's error.
        source: vmm_sys_util::errno::Error,
    },
    /// A listener was to create memslot `slot`, but the kernel already has a memslot with that id
    /// that was not made through this `Vm` (one of the VMM's own, made through its own fd). KVM
    /// would accept an identical request as a no-op, so without this check the listener would
    /// take the VMM's slot over; the id is refused whatever range the listener was allowed.
    #[error("memslot {slot} (for guest {guest_phys:#x}, size {size:#x}) already exists in KVM but was not made through this Vm (a memslot of the VMM's own?): it is not taken over; give the listener an id range without the VMM's own memslots (KvmMemoryListener::with_slot_ids)")]
    SlotIdTaken {
        /// The slot id.
        slot: u32,
        /// Guest physical address of the slot the listener wanted.
        guest_phys: u64,
        /// Size in bytes of the slot the listener wanted.
        size: u64,
    },
    /// `KVM_GET_DIRTY_LOG` wrote more than the memslot has in the `Vm`'s table and hit the guard
    /// page after the buffer (`EFAULT`): the memslot was changed behind the `Vm`'s back (deleted
    /// and made again larger through the VM fd). Nothing past the buffer was written.
    #[error("KVM_GET_DIRTY_LOG of memslot {slot} overran the bitmap of the memslot this Vm registered: the memslot was changed behind this Vm's back (deleted and made again larger through another fd?)")]
    SlotChangedBehindVm {
        /// The slot id.
        slot: u32,
        /// The kernel's error (`EFAULT`).
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// A guarded dirty-bitmap buffer (words followed by an inaccessible guard page) could not be
    /// mapped.
    #[error("cannot map a guarded dirty-bitmap buffer")]
    GuardedBuffer {
        /// The `mmap`/`mprotect` error.
        #[source]
        source: std::io::Error,
    },
    /// The inaccessible page the memslot-id probe points at could not be reserved.
    #[error("cannot reserve a page for the memslot id probe")]
    SlotProbePage {
        /// The `mmap` error.
        #[source]
        source: std::io::Error,
    },
    /// The fd given to [`Vm::from_fd`](crate::Vm::from_fd) is not a KVM VM fd.
    #[error("not a KVM VM fd: {reason}")]
    NotAVmFd {
        /// Why.
        reason: &'static str,
    },
    /// Whether a fd given to this crate is a KVM fd could not be told (its `/proc/self/fd` link
    /// could not be read, e.g. without `/proc`): no ioctl is issued on a fd of unknown kind.
    #[error("cannot tell whether the fd is a KVM fd (is /proc mounted?)")]
    FdKindUnknown {
        /// The `fstat`/`readlink` error.
        #[source]
        source: std::io::Error,
    },
    /// Flags for [`enable_manual_protect`](crate::enable_manual_protect) without
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` or with unknown bits.
    #[error("invalid manual-protect flags {flags:#x}: use MANUAL_PROTECT_ENABLE (1), optionally | INITIALLY_SET (2)")]
    InvalidProtectFlags {
        /// The flags given.
        flags: u64,
    },
    /// The dirty ring was asked for but the kernel offers neither `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`
    /// nor `KVM_CAP_DIRTY_LOG_RING`.
    #[error("the dirty ring is not available: this kernel offers neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL nor KVM_CAP_DIRTY_LOG_RING (use the bitmap modes: clear or legacy)")]
    DirtyRingUnsupported,
    /// A ring size that is not a power of two within the kernel's range.
    #[error(
        "dirty ring size {} is invalid: it must be a power of two in {}..={} (this kernel's range)",
        format_size(*bytes), format_size(u64::from(*min)), format_size(u64::from(*max))
    )]
    DirtyRingSize {
        /// The size asked for.
        bytes: u64,
        /// Smallest valid size.
        min: u32,
        /// Largest valid size (`KVM_CHECK_EXTENSION`).
        max: u32,
    },
    /// `KVM_ENABLE_CAP` of the dirty ring was refused.
    #[error(
        "enabling a dirty ring of {} failed (it must be enabled before any vCPU exists, and the kernel may need a larger ring than {min} for its reserved entries: valid sizes are powers of two in {min}..={max})",
        format_size(u64::from(*bytes)), min = format_size(u64::from(*min)), max = format_size(u64::from(*max))
    )]
    DirtyRingEnable {
        /// The size asked for.
        bytes: u32,
        /// Smallest size we allow.
        min: u32,
        /// Largest size the kernel allows.
        max: u32,
        /// The kernel's error.
        source: vmm_sys_util::errno::Error,
    },
    /// A dirty-ring call on a VM that is not in ring mode.
    #[error("the dirty ring is not enabled on this VM (its mode is {mode})")]
    DirtyRingNotEnabled {
        /// The VM's mode.
        mode: KvmDirtyLogMode,
    },
    /// A vCPU's ring is registered twice, or its fd is not a KVM vCPU fd.
    #[error("dirty ring of vCPU {vcpu}: {reason}")]
    DirtyRingVcpu {
        /// The vCPU index.
        vcpu: u32,
        /// What went wrong.
        reason: &'static str,
    },
    /// Whether a vCPU's fd is a KVM vCPU fd could not be told (its `/proc/self/fd` link could
    /// not be read): its ring is not mapped.
    #[error("dirty ring of vCPU {vcpu}: cannot tell whether its fd is a KVM vCPU fd (is /proc mounted?)")]
    DirtyRingVcpuFd {
        /// The vCPU index.
        vcpu: u32,
        /// The `fstat`/`readlink` error.
        #[source]
        source: std::io::Error,
    },
    /// The `mmap` of a vCPU's ring from its fd failed.
    #[error("dirty ring of vCPU {vcpu}: cannot map the ring from the vCPU fd")]
    DirtyRingMap {
        /// The vCPU index.
        vcpu: u32,
        /// The `mmap` error.
        #[source]
        source: std::io::Error,
    },
    /// The VM fd given to [`Vm::from_fd`](crate::Vm::from_fd) could not be duplicated.
    #[error("cannot duplicate the VM fd (F_DUPFD_CLOEXEC)")]
    DupVmFd {
        /// The `fcntl` error.
        #[source]
        source: std::io::Error,
    },
    /// The ring reaper thread could not be started.
    #[error("cannot start the dirty ring reaper thread")]
    ReaperThread {
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` reset fewer entries than were harvested: their pages may still be
    /// write-enabled, so their bits are held back (no sync folds them) and every later harvest
    /// calls the reset again until it confirms them.
    #[error("KVM_RESET_DIRTY_RINGS reset {reset} entries but {harvested} were harvested and marked reset: {owed} stay owed a reset, their bits are held back until one confirms them")]
    DirtyRingReset {
        /// Entries harvested and marked reset, not confirmed before this call.
        harvested: u64,
        /// Entries the kernel says it reset.
        reset: u64,
        /// Entries still owed a reset.
        owed: u64,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed: the harvested pages may still be write-enabled, so their
    /// bits are held back (no sync folds them) and every later harvest calls the reset again.
    #[error("KVM_RESET_DIRTY_RINGS failed with {owed} harvested entries owed a reset: their bits are held back until one confirms them")]
    DirtyRingResetFailed {
        /// Entries harvested and not confirmed by a reset.
        owed: u64,
        /// The kernel's error.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// A sync in ring mode while harvested entries are owed a `KVM_RESET_DIRTY_RINGS`: their
    /// pages may still be write-enabled, so their bits are not folded into any client yet (they
    /// are kept, and fold once a reset confirms them).
    #[error("dirty ring sync refused: {owed} harvested entries are owed a KVM_RESET_DIRTY_RINGS (it failed or reset fewer); their pages may be writable, so their bits are held back until a reset confirms them (the next sync or reap retries it)")]
    DirtyRingResetOwed {
        /// Entries still owed a reset.
        owed: u64,
    },
}

/// Convenience alias for `Result<T, clearlog_kvm::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_are_printed_in_units() {
        let e = Error::DirtyRingSize {
            bytes: 48 << 10,
            min: 4096,
            max: 1 << 20,
        };
        assert_eq!(
            e.to_string(),
            "dirty ring size 48K is invalid: it must be a power of two in 4K..=1M (this kernel's range)"
        );
    }
}
