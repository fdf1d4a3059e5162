// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`KvmDirtyLogMode`]: how KVM tracks dirty pages on a VM, and the flags that enable it.

use std::fmt;

use clearlog_bitmap::format_size;
use kvm_bindings::{KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` as a `u64` flag (bit 0).
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_kvm::MANUAL_PROTECT_ENABLE, 1);
/// ```
pub const MANUAL_PROTECT_ENABLE: u64 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64;
/// `KVM_DIRTY_LOG_INITIALLY_SET` as a `u64` flag (bit 1).
///
/// # Example
///
/// ```
/// use clearlog_kvm::{INITIALLY_SET, MANUAL_PROTECT_ENABLE};
/// assert_eq!(MANUAL_PROTECT_ENABLE | INITIALLY_SET, 3);
/// ```
pub const INITIALLY_SET: u64 = KVM_DIRTY_LOG_INITIALLY_SET as u64;

/// KVM's dirty-log mode of a VM: how `KVM_GET_DIRTY_LOG` behaves, or the dirty ring instead.
///
/// What a [`Vm`](crate::Vm) is in ([`Vm::dirty_log_mode`](crate::Vm::dirty_log_mode)), what
/// [`enable_manual_protect`](crate::enable_manual_protect) and
/// [`enable_dirty_ring`](crate::enable_dirty_ring) return, and what
/// [`VmConfig::dirty_log`](crate::VmConfig::dirty_log) asks for (`None` there: the best the
/// kernel offers). The migration engine has its own mode (`clearlog_migration`'s
/// `MigrationDirtyLogMode`: clear, legacy or ring), which the VMM picks to match this one.
///
/// # Example
///
/// ```
/// use clearlog_kvm::KvmDirtyLogMode;
///
/// let m = KvmDirtyLogMode::Manual { initially_set: false };
/// assert!(m.is_manual());
/// assert_eq!(m.enable_flags(), 1);
/// assert_eq!(KvmDirtyLogMode::Legacy.enable_flags(), 0);
/// assert_eq!(KvmDirtyLogMode::Ring { bytes: 65536 }.to_string(), "ring:64K");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmDirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` copies, clears and write-protects at every call.
    Legacy,
    /// `KVM_GET_DIRTY_LOG` only copies; `KVM_CLEAR_DIRTY_LOG` re-arms tracking.
    Manual {
        /// A slot whose logging starts reads all ones, and pages are write-protected
        /// lazily as they are cleared.
        initially_set: bool,
    },
    /// The per-vCPU dirty ring ([`enable_dirty_ring`](crate::enable_dirty_ring)): no dirty bitmap,
    /// `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` are refused; harvesting the rings and
    /// `KVM_RESET_DIRTY_RINGS` re-protect the pages (see docs/design.md, "The dirty ring").
    /// Which capability gave it (acquire/release or not) is [`RingRange::acq_rel`](crate::RingRange).
    Ring {
        /// Ring size per vCPU in bytes (16-byte entries).
        bytes: u32,
    },
}

impl KvmDirtyLogMode {
    /// True for [`KvmDirtyLogMode::Ring`].
    ///
    /// # Example
    ///
    /// ```
    /// use clearlog_kvm::KvmDirtyLogMode;
    /// assert!(KvmDirtyLogMode::Ring { bytes: 65536 }.is_ring());
    /// assert!(!KvmDirtyLogMode::Legacy.is_ring());
    /// ```
    pub fn is_ring(&self) -> bool {
        matches!(self, KvmDirtyLogMode::Ring { .. })
    }

    /// True for [`KvmDirtyLogMode::Manual`].
    ///
    /// # Example
    ///
    /// ```
    /// assert!(!clearlog_kvm::KvmDirtyLogMode::Legacy.is_manual());
    /// ```
    pub fn is_manual(&self) -> bool {
        matches!(self, KvmDirtyLogMode::Manual { .. })
    }

    /// The `args[0]` of `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` for this
    /// mode; 0 for legacy and ring (do not enable).
    ///
    /// # Example
    ///
    /// ```
    /// use clearlog_kvm::KvmDirtyLogMode;
    /// assert_eq!(KvmDirtyLogMode::Manual { initially_set: true }.enable_flags(), 3);
    /// ```
    pub fn enable_flags(&self) -> u64 {
        match self {
            KvmDirtyLogMode::Legacy | KvmDirtyLogMode::Ring { .. } => 0,
            KvmDirtyLogMode::Manual { initially_set } => {
                MANUAL_PROTECT_ENABLE | if *initially_set { INITIALLY_SET } else { 0 }
            }
        }
    }
}

impl fmt::Display for KvmDirtyLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmDirtyLogMode::Legacy => f.write_str("legacy"),
            KvmDirtyLogMode::Manual {
                initially_set: true,
            } => f.write_str("manual+initially-set"),
            KvmDirtyLogMode::Manual {
                initially_set: false,
            } => f.write_str("manual"),
            KvmDirtyLogMode::Ring { bytes } => write!(f, "ring:{}", format_size(u64::from(*bytes))),
        }
    }
}

/// Chooses the default dirty-log mode from the flags the kernel offers for
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
///
/// Manual with `INITIALLY_SET` when bit 1 (value 2) and bit 0 are offered, manual
/// without it when only bit 0 is, legacy otherwise (with a warning: every
/// `KVM_GET_DIRTY_LOG` then write-protects the whole slot). Never the ring.
///
/// # Example
///
/// ```
/// use clearlog_kvm::{default_dirty_log_mode, KvmDirtyLogMode};
///
/// assert_eq!(default_dirty_log_mode(3), KvmDirtyLogMode::Manual { initially_set: true });
/// assert_eq!(default_dirty_log_mode(1), KvmDirtyLogMode::Manual { initially_set: false });
/// assert_eq!(default_dirty_log_mode(0), KvmDirtyLogMode::Legacy);
/// ```
pub fn default_dirty_log_mode(offered_flags: u64) -> KvmDirtyLogMode {
    if offered_flags & MANUAL_PROTECT_ENABLE == 0 {
        tracing::warn!(
            offered_flags,
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered: using legacy dirty logging"
        );
        KvmDirtyLogMode::Legacy
    } else {
        KvmDirtyLogMode::Manual {
            initially_set: offered_flags & INITIALLY_SET != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mode_table() {
        assert_eq!(default_dirty_log_mode(0), KvmDirtyLogMode::Legacy);
        // Bit 1 alone is meaningless without manual protect.
        assert_eq!(default_dirty_log_mode(2), KvmDirtyLogMode::Legacy);
        assert_eq!(
            default_dirty_log_mode(1),
            KvmDirtyLogMode::Manual {
                initially_set: false
            }
        );
        assert_eq!(
            default_dirty_log_mode(3),
            KvmDirtyLogMode::Manual {
                initially_set: true
            }
        );
        // Unknown future bits are ignored.
        assert_eq!(
            default_dirty_log_mode(0xff),
            KvmDirtyLogMode::Manual {
                initially_set: true
            }
        );
    }

    #[test]
    fn names() {
        assert_eq!(
            KvmDirtyLogMode::Ring { bytes: 16 << 10 }.to_string(),
            "ring:16K"
        );
        assert_eq!(
            KvmDirtyLogMode::Ring { bytes: 1 << 20 }.to_string(),
            "ring:1M"
        );
        assert_eq!(
            KvmDirtyLogMode::Manual {
                initially_set: true
            }
            .to_string(),
            "manual+initially-set"
        );
    }
}
