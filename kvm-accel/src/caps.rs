// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Kernel capability probing, the choice of dirty-log mode and enabling manual protection on any
//! VM fd.

use std::fmt;
use std::path::Path;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_GET_TSC_KHZ,
    KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MAX_VCPUS,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_NR_MEMSLOTS, KVM_CAP_NR_VCPUS,
};

use crate::device::{open_kvm, KVM_API_VERSION};
use crate::error::{Error, Result};
use crate::fd::{checked_vm_fd, AsKvmFd};
use crate::mode::{default_dirty_log_mode, KvmDirtyLogMode, INITIALLY_SET, MANUAL_PROTECT_ENABLE};
use crate::raw::{self, FdKind, KvmFd};

/// What the running kernel offers, as far as this crate cares.
///
/// Probed once with [`KvmCaps::probe`] (on a VM fd or the system fd) or
/// [`KvmCaps::probe_device`] (opens `/dev/kvm`) from `KVM_CHECK_EXTENSION` and, on a system fd,
/// `KVM_GET_API_VERSION`. The obsolete capability 166 (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT`) is
/// never consulted.
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("KvmCaps") { return; }
/// use clearlog_kvm::KvmCaps;
///
/// let caps = KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
/// println!("{caps}");
/// for (name, value) in caps.fields() {
///     println!("{name} = {value}");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvmCaps {
    /// `KVM_GET_API_VERSION` (12 on every supported kernel; a VM fd does not answer it, and
    /// exists only on API 12, so a probe on a VM fd reports 12).
    pub api_version: i32,
    /// Flags returned by `KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`:
    /// bit 0 = manual protect, bit 1 = initially set; 0 = unsupported.
    pub manual_protect_flags: u64,
    /// Largest dirty ring in bytes (`KVM_CAP_DIRTY_LOG_RING`), 0 = unsupported.
    pub dirty_ring_max_bytes: u64,
    /// Largest dirty ring in bytes with acquire/release ordering
    /// (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`), 0 = unsupported.
    pub dirty_ring_acq_rel_max_bytes: u64,
    /// Memslots per address space (`KVM_CAP_NR_MEMSLOTS`).
    pub max_memslots: u32,
    /// Number of address spaces (`KVM_CAP_MULTI_ADDRESS_SPACE`, 1 if absent).
    pub address_spaces: u32,
    /// Recommended number of vCPUs (`KVM_CAP_NR_VCPUS`).
    pub nr_vcpus: u32,
    /// Maximum number of vCPUs (`KVM_CAP_MAX_VCPUS`).
    pub max_vcpus: u32,
    /// `KVM_GET_TSC_KHZ` is available on vCPU fds.
    pub get_tsc_khz: bool,
    /// `KVM_GET_XSAVE`/`KVM_SET_XSAVE` are available (x86-64 only; false elsewhere).
    pub xsave: bool,
    /// `KVM_GET_XCRS`/`KVM_SET_XCRS` are available (x86-64 only; false elsewhere).
    pub xcrs: bool,
    /// `kvm_run.immediate_exit` is honoured.
    pub immediate_exit: bool,
}

fn check(fd: KvmFd<'_>, cap: u32) -> i32 {
    raw::check_extension(fd, cap)
}

/// The x86-only capabilities of the report.
enum X86Cap {
    Xsave,
    Xcrs,
}

#[cfg(target_arch = "x86_64")]
fn x86_cap(fd: KvmFd<'_>, cap: X86Cap) -> bool {
    let cap = match cap {
        X86Cap::Xsave => kvm_bindings::KVM_CAP_XSAVE,
        X86Cap::Xcrs => kvm_bindings::KVM_CAP_XCRS,
    };
    check(fd, cap) > 0
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_cap(_fd: KvmFd<'_>, cap: X86Cap) -> bool {
    match cap {
        X86Cap::Xsave | X86Cap::Xcrs => false,
    }
}

fn nonneg(v: i32) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl KvmCaps {
    /// Probes the capabilities behind `fd`: a VM fd (the answers are then those of that VM, as
    /// the kernel documents for `KVM_CHECK_EXTENSION` on VM fds) or a `/dev/kvm` system fd. No
    /// device is opened.
    ///
    /// Takes kvm-ioctls' `VmFd` or `Kvm` as they are, or any fd ([`AsKvmFd`]). The fd is checked
    /// to be the KVM device or a KVM VM first (`fstat`, its `/proc/self/fd` link): for any other
    /// fd, or one whose kind cannot be told, no ioctl is issued and nothing is offered
    /// (`KvmCaps::default()`).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("KvmCaps::probe") { return; }
    /// let kvm = kvm_ioctls::Kvm::new().unwrap();
    /// let vm = kvm.create_vm().unwrap();
    /// let caps = clearlog_kvm::KvmCaps::probe(&vm);
    /// assert_eq!(caps.api_version, 12);
    /// assert!(caps.max_memslots > 0);
    /// let not_kvm = std::fs::File::open("/dev/null").unwrap();
    /// assert_eq!(clearlog_kvm::KvmCaps::probe(&not_kvm), Default::default());
    /// ```
    pub fn probe(fd: impl AsKvmFd) -> Self {
        match KvmFd::check(fd.as_kvm_fd()) {
            Ok(Some(fd)) if fd.kind() != FdKind::Vcpu => Self::probe_kvm(fd),
            _ => KvmCaps::default(),
        }
    }

    /// [`KvmCaps::probe`] on a fd known to be the KVM device or a KVM VM.
    pub(crate) fn probe_kvm(fd: KvmFd<'_>) -> Self {
        let spaces = check(fd, KVM_CAP_MULTI_ADDRESS_SPACE);
        KvmCaps {
            api_version: raw::get_api_version(fd).unwrap_or(KVM_API_VERSION),
            manual_protect_flags: nonneg(check(fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)),
            dirty_ring_max_bytes: nonneg(check(fd, KVM_CAP_DIRTY_LOG_RING)),
            dirty_ring_acq_rel_max_bytes: nonneg(check(fd, KVM_CAP_DIRTY_LOG_RING_ACQ_REL)),
            max_memslots: u32::try_from(check(fd, KVM_CAP_NR_MEMSLOTS).max(0)).unwrap_or(0),
            address_spaces: u32::try_from(spaces.max(1)).unwrap_or(1),
            nr_vcpus: u32::try_from(check(fd, KVM_CAP_NR_VCPUS).max(0)).unwrap_or(0),
            max_vcpus: u32::try_from(check(fd, KVM_CAP_MAX_VCPUS).max(0)).unwrap_or(0),
            get_tsc_khz: check(fd, KVM_CAP_GET_TSC_KHZ) > 0,
            xsave: x86_cap(fd, X86Cap::Xsave),
            xcrs: x86_cap(fd, X86Cap::Xcrs),
            immediate_exit: check(fd, KVM_CAP_IMMEDIATE_EXIT) > 0,
        }
    }

    /// Opens the KVM device node `path` (normally `/dev/kvm`) and probes it.
    ///
    /// # Errors
    ///
    /// [`Error::KvmMissing`], [`Error::KvmPermission`] or [`Error::KvmOpen`], each naming the
    /// device and the fix; [`Error::ApiVersion`] for an API other than 12.
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("probe_device") { return; }
    /// let caps = clearlog_kvm::KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
    /// println!("manual protect flags: {:#x}", caps.manual_protect_flags);
    /// ```
    pub fn probe_device(path: &Path) -> Result<Self> {
        let kvm = open_kvm(path)?;
        // SAFETY: `open_kvm` checked that the fd it opened is the KVM device, and `kvm` keeps
        // it open for as long as the borrow lives (the probe below).
        Ok(Self::probe_kvm(unsafe {
            KvmFd::new_unchecked(kvm.as_kvm_fd(), FdKind::System)
        }))
    }

    /// All fields as `(name, value)` pairs, for reports and logs.
    ///
    /// # Example
    ///
    /// ```
    /// let caps = clearlog_kvm::KvmCaps::default();
    /// assert!(caps.fields().iter().any(|(n, _)| *n == "manual_protect_flags"));
    /// ```
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("api_version", self.api_version.to_string()),
            (
                "manual_protect_flags",
                format!("{:#x}", self.manual_protect_flags),
            ),
            (
                "dirty_ring_max_bytes",
                self.dirty_ring_max_bytes.to_string(),
            ),
            (
                "dirty_ring_acq_rel_max_bytes",
                self.dirty_ring_acq_rel_max_bytes.to_string(),
            ),
            ("max_memslots", self.max_memslots.to_string()),
            ("address_spaces", self.address_spaces.to_string()),
            ("nr_vcpus", self.nr_vcpus.to_string()),
            ("max_vcpus", self.max_vcpus.to_string()),
            ("get_tsc_khz", self.get_tsc_khz.to_string()),
            ("xsave", self.xsave.to_string()),
            ("xcrs", self.xcrs.to_string()),
            ("immediate_exit", self.immediate_exit.to_string()),
            (
                // The report key predates the type's rename; `vmm caps --json` keeps it.
                "default_dirty_log_mode",
                self.default_dirty_log_mode().to_string(),
            ),
        ]
    }

    /// The dirty-log mode this crate uses by default on this kernel.
    ///
    /// Same as [`default_dirty_log_mode`] applied to
    /// [`manual_protect_flags`](Self::manual_protect_flags).
    ///
    /// # Example
    ///
    /// ```
    /// use clearlog_kvm::{KvmDirtyLogMode, KvmCaps};
    ///
    /// let caps = KvmCaps { manual_protect_flags: 3, ..Default::default() };
    /// assert_eq!(
    ///     caps.default_dirty_log_mode(),
    ///     KvmDirtyLogMode::Manual { initially_set: true }
    /// );
    /// ```
    pub fn default_dirty_log_mode(&self) -> KvmDirtyLogMode {
        default_dirty_log_mode(self.manual_protect_flags)
    }
}

impl fmt::Display for KvmCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, value) in self.fields() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

/// Enables manual dirty-log protection (`KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`) on
/// any VM fd, with the kernel's flags: [`MANUAL_PROTECT_ENABLE`], optionally
/// `| `[`INITIALLY_SET`]. Returns the [`KvmDirtyLogMode`] now in effect, to hand to
/// [`Vm::from_fd`](crate::Vm::from_fd).
///
/// **Call it before any memslot of the VM has dirty logging** (`KVM_MEM_LOG_DIRTY_PAGES`): the
/// kernel applies the mode to slots whose logging starts afterwards, and a slot already logging
/// keeps get-and-clear semantics. The usual place is right after `KVM_CREATE_VM`.
///
/// It first asks the kernel what it offers (`KVM_CHECK_EXTENSION` on the VM fd), so a kernel
/// without the capability, or without `INITIALLY_SET`, gives
/// [`Error::ManualProtectUnsupported`] with both masks instead of a bare `EINVAL`. Flags
/// without [`MANUAL_PROTECT_ENABLE`] or with unknown bits give [`Error::InvalidProtectFlags`].
/// Before any ioctl the fd is checked to be a KVM VM fd (its `/proc/self/fd` link is
/// `anon_inode:kvm-vm`): [`Error::NotAVmFd`] otherwise ([`Error::FdKindUnknown`] when that
/// cannot be told).
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("enable_manual_protect") { return; }
/// use clearlog_kvm::{enable_manual_protect, KvmCaps, KvmDirtyLogMode, MANUAL_PROTECT_ENABLE};
///
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let vm = kvm.create_vm().unwrap(); // the VMM's kvm-ioctls `VmFd`, passed as it is
/// let flags = KvmCaps::probe(&vm).manual_protect_flags; // what this kernel offers
/// let mode = enable_manual_protect(&vm, flags).unwrap();
/// assert!(mode.is_manual());
/// assert_eq!(mode.enable_flags(), flags);
/// ```
pub fn enable_manual_protect(vm: impl AsKvmFd, flags: u64) -> Result<KvmDirtyLogMode> {
    enable_manual_protect_on(checked_vm_fd(vm.as_kvm_fd())?, flags)
}

/// [`enable_manual_protect`] on a fd known to be a KVM VM fd.
pub(crate) fn enable_manual_protect_on(vm: KvmFd<'_>, flags: u64) -> Result<KvmDirtyLogMode> {
    let known = MANUAL_PROTECT_ENABLE | INITIALLY_SET;
    if flags & MANUAL_PROTECT_ENABLE == 0 || flags & !known != 0 {
        return Err(Error::InvalidProtectFlags { flags });
    }
    let answer = raw::check_extension(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    let offered = nonneg(answer);
    if offered & flags != flags {
        return Err(Error::ManualProtectUnsupported {
            requested: flags,
            offered,
        });
    }
    raw::enable_cap(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags).map_err(Error::kvm(
        "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
    ))?;
    let mode = KvmDirtyLogMode::Manual {
        initially_set: flags & INITIALLY_SET != 0,
    };
    tracing::debug!(flags, %mode, "manual dirty-log protection enabled");
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_lists_every_field() {
        let caps = KvmCaps {
            api_version: 12,
            manual_protect_flags: 3,
            max_memslots: 32764,
            ..Default::default()
        };
        let s = caps.to_string();
        assert!(s.contains("api_version=12"), "{s}");
        assert!(s.contains("manual_protect_flags=0x3"), "{s}");
        assert!(s.contains("max_memslots=32764"), "{s}");
        assert!(
            s.contains("default_dirty_log_mode=manual+initially-set"),
            "{s}"
        );
        assert_eq!(s.split(' ').count(), caps.fields().len());
    }
}
