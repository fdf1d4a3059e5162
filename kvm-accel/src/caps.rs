// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Kernel capability probing and the choice of dirty-log mode.

use std::fmt;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_GET_TSC_KHZ,
    KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MAX_VCPUS,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_NR_MEMSLOTS, KVM_CAP_NR_VCPUS, KVM_CAP_XCRS,
    KVM_CAP_XSAVE, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::Kvm;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` as a `u64` flag.
pub const MANUAL_PROTECT_ENABLE: u64 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64;
/// `KVM_DIRTY_LOG_INITIALLY_SET` as a `u64` flag.
pub const INITIALLY_SET: u64 = KVM_DIRTY_LOG_INITIALLY_SET as u64;

/// What the running kernel offers, as far as this crate cares.
///
/// Probed once with [`KvmCaps::probe`] from `KVM_GET_API_VERSION` and
/// `KVM_CHECK_EXTENSION` on the system fd. The obsolete capability 166
/// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT`) is never consulted.
///
/// # Example
///
/// ```no_run
/// use clearlog_kvm::caps::KvmCaps;
///
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let caps = KvmCaps::probe(&kvm);
/// println!("{caps}");
/// for (name, value) in caps.fields() {
///     println!("{name} = {value}");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvmCaps {
    /// `KVM_GET_API_VERSION` (12 on every supported kernel).
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
    /// `KVM_GET_XSAVE`/`KVM_SET_XSAVE` are available.
    pub xsave: bool,
    /// `KVM_GET_XCRS`/`KVM_SET_XCRS` are available.
    pub xcrs: bool,
    /// `kvm_run.immediate_exit` is honoured.
    pub immediate_exit: bool,
}

fn check(kvm: &Kvm, cap: u32) -> i32 {
    kvm.check_extension_raw(libc::c_ulong::from(cap))
}

fn nonneg(v: i32) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl KvmCaps {
    /// Probes the capabilities of the kernel behind `kvm`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// let kvm = kvm_ioctls::Kvm::new().unwrap();
    /// let caps = clearlog_kvm::caps::KvmCaps::probe(&kvm);
    /// assert_eq!(caps.api_version, 12);
    /// ```
    pub fn probe(kvm: &Kvm) -> Self {
        let spaces = check(kvm, KVM_CAP_MULTI_ADDRESS_SPACE);
        KvmCaps {
            api_version: kvm.get_api_version(),
            manual_protect_flags: nonneg(check(kvm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)),
            dirty_ring_max_bytes: nonneg(check(kvm, KVM_CAP_DIRTY_LOG_RING)),
            dirty_ring_acq_rel_max_bytes: nonneg(check(kvm, KVM_CAP_DIRTY_LOG_RING_ACQ_REL)),
            max_memslots: u32::try_from(check(kvm, KVM_CAP_NR_MEMSLOTS).max(0)).unwrap_or(0),
            address_spaces: u32::try_from(spaces.max(1)).unwrap_or(1),
            nr_vcpus: u32::try_from(check(kvm, KVM_CAP_NR_VCPUS).max(0)).unwrap_or(0),
            max_vcpus: u32::try_from(check(kvm, KVM_CAP_MAX_VCPUS).max(0)).unwrap_or(0),
            get_tsc_khz: check(kvm, KVM_CAP_GET_TSC_KHZ) > 0,
            xsave: check(kvm, KVM_CAP_XSAVE) > 0,
            xcrs: check(kvm, KVM_CAP_XCRS) > 0,
            immediate_exit: check(kvm, KVM_CAP_IMMEDIATE_EXIT) > 0,
        }
    }

    /// All fields as `(name, value)` pairs, for reports and logs.
    ///
    /// # Example
    ///
    /// ```
    /// let caps = clearlog_kvm::caps::KvmCaps::default();
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
    /// use clearlog_kvm::caps::{DirtyLogMode, KvmCaps};
    ///
    /// let caps = KvmCaps { manual_protect_flags: 3, ..Default::default() };
    /// assert_eq!(
    ///     caps.default_dirty_log_mode(),
    ///     DirtyLogMode::Manual { initially_set: true }
    /// );
    /// ```
    pub fn default_dirty_log_mode(&self) -> DirtyLogMode {
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

/// How `KVM_GET_DIRTY_LOG` behaves on a VM.
///
/// # Example
///
/// ```
/// use clearlog_kvm::caps::DirtyLogMode;
///
/// let m = DirtyLogMode::Manual { initially_set: false };
/// assert!(m.is_manual());
/// assert_eq!(m.enable_flags(), 1);
/// assert_eq!(DirtyLogMode::Legacy.enable_flags(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` copies, clears and write-protects at every call.
    Legacy,
    /// `KVM_GET_DIRTY_LOG` only copies; `KVM_CLEAR_DIRTY_LOG` re-arms tracking.
    Manual {
        /// A slot whose logging starts reads all ones, and pages are write-protected
        /// lazily as they are cleared.
        initially_set: bool,
    },
}

impl DirtyLogMode {
    /// True for [`DirtyLogMode::Manual`].
    ///
    /// # Example
    ///
    /// ```
    /// assert!(!clearlog_kvm::caps::DirtyLogMode::Legacy.is_manual());
    /// ```
    pub fn is_manual(&self) -> bool {
        matches!(self, DirtyLogMode::Manual { .. })
    }

    /// The `args[0]` of `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` for this
    /// mode; 0 for legacy (do not enable).
    ///
    /// # Example
    ///
    /// ```
    /// use clearlog_kvm::caps::DirtyLogMode;
    /// assert_eq!(DirtyLogMode::Manual { initially_set: true }.enable_flags(), 3);
    /// ```
    pub fn enable_flags(&self) -> u64 {
        match self {
            DirtyLogMode::Legacy => 0,
            DirtyLogMode::Manual { initially_set } => {
                MANUAL_PROTECT_ENABLE | if *initially_set { INITIALLY_SET } else { 0 }
            }
        }
    }
}

impl fmt::Display for DirtyLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogMode::Legacy => f.write_str("legacy"),
            DirtyLogMode::Manual {
                initially_set: true,
            } => f.write_str("manual+initially-set"),
            DirtyLogMode::Manual {
                initially_set: false,
            } => f.write_str("manual"),
        }
    }
}

/// Chooses the default dirty-log mode from the flags the kernel offers for
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
///
/// Manual with `INITIALLY_SET` when bit 1 (value 2) and bit 0 are offered, manual
/// without it when only bit 0 is, legacy otherwise (with a warning: every
/// `KVM_GET_DIRTY_LOG` then write-protects the whole slot).
///
/// # Example
///
/// ```
/// use clearlog_kvm::caps::{default_dirty_log_mode, DirtyLogMode};
///
/// assert_eq!(default_dirty_log_mode(3), DirtyLogMode::Manual { initially_set: true });
/// assert_eq!(default_dirty_log_mode(1), DirtyLogMode::Manual { initially_set: false });
/// assert_eq!(default_dirty_log_mode(0), DirtyLogMode::Legacy);
/// ```
pub fn default_dirty_log_mode(offered_flags: u64) -> DirtyLogMode {
    if offered_flags & MANUAL_PROTECT_ENABLE == 0 {
        tracing::warn!(
            offered_flags,
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered: using legacy dirty logging"
        );
        DirtyLogMode::Legacy
    } else {
        DirtyLogMode::Manual {
            initially_set: offered_flags & INITIALLY_SET != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mode_table() {
        assert_eq!(default_dirty_log_mode(0), DirtyLogMode::Legacy);
        // Bit 1 alone is meaningless without manual protect.
        assert_eq!(default_dirty_log_mode(2), DirtyLogMode::Legacy);
        assert_eq!(
            default_dirty_log_mode(1),
            DirtyLogMode::Manual {
                initially_set: false
            }
        );
        assert_eq!(
            default_dirty_log_mode(3),
            DirtyLogMode::Manual {
                initially_set: true
            }
        );
        // Unknown future bits are ignored.
        assert_eq!(
            default_dirty_log_mode(0xff),
            DirtyLogMode::Manual {
                initially_set: true
            }
        );
    }

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
