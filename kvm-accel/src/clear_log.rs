// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A safe wrapper of the `KVM_CLEAR_DIRTY_LOG` vm ioctl.
//!
//! `KVM_CLEAR_DIRTY_LOG` (`_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`) is only
//! meaningful once `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is enabled on the VM. For each bit
//! set in the user bitmap (bit 0 of word 0 = `first_page`) the kernel clears the page's
//! dirty bit in the slot's bitmap and re-arms dirty tracking for that page (write
//! protection or PML), but only where the kernel bit really was set. Zero bits are left
//! alone.
//!
//! The kernel's rules, checked by [`clear_dirty_log`] before the call where userspace can
//! know them:
//! - `first_page` must be a multiple of 64 (checked here);
//! - `num_pages` must be a multiple of 64, unless `first_page + num_pages` is exactly the
//!   number of pages of the slot (the tail of a slot whose size is not a multiple of
//!   64 pages); nothing may extend past the slot end (`EINVAL`, the slot size is not known
//!   here, see `Vm::clear_dirty_log` for a fully checked variant);
//! - the kernel reads `ceil(num_pages / 64)` whole `u64` words from the bitmap, so the
//!   bitmap must hold at least that many (checked here: the wrapper is therefore safe);
//! - `ENOENT`: the slot has no dirty bitmap (logging is off or the slot does not exist);
//! - `EFAULT`: the bitmap could not be read;
//! - `ENXIO` (or `EINVAL`): the dirty ring is enabled on the VM.
//!
//! The kernel (6.18) accepts the ioctl even when manual protection is not enabled on the VM
//! (it then clears and write-protects like a partial legacy GET); mixing it with legacy
//! `KVM_GET_DIRTY_LOG` makes little sense, and `Vm::clear_dirty_log` refuses it.
//!
//! This module depends only on `kvm-ioctls`, `kvm-bindings` and `vmm-sys-util`, so it can be
//! proposed to `kvm-ioctls` as `VmFd::clear_dirty_log`.

use std::os::raw::c_void;

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, KVMIO};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

mod nr {
    use super::*;
    // `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use nr::KVM_CLEAR_DIRTY_LOG;

/// Why a `KVM_CLEAR_DIRTY_LOG` was refused, by userspace validation or by the kernel.
///
/// # Example
///
/// ```
/// use clearlog_kvm::clear_log::ClearDirtyLogError;
///
/// let e = ClearDirtyLogError::Unaligned { first_page: 3 };
/// assert!(e.to_string().contains("multiple of 64"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClearDirtyLogError {
    /// `num_pages` is zero.
    #[error("KVM_CLEAR_DIRTY_LOG: num_pages is 0")]
    Empty,
    /// `first_page` is not a multiple of 64.
    #[error("KVM_CLEAR_DIRTY_LOG: first_page {first_page} is not a multiple of 64")]
    Unaligned {
        /// The offending first page.
        first_page: u64,
    },
    /// The bitmap holds fewer than `ceil(num_pages / 64)` words.
    #[error("KVM_CLEAR_DIRTY_LOG: bitmap of {got} words, {needed} needed for {num_pages} pages")]
    BitmapTooShort {
        /// Pages requested.
        num_pages: u32,
        /// Words needed.
        needed: usize,
        /// Words provided.
        got: usize,
    },
    /// `first_page + num_pages` overflows.
    #[error("KVM_CLEAR_DIRTY_LOG: first_page {first_page} + num_pages {num_pages} overflows")]
    Overflow {
        /// First page.
        first_page: u64,
        /// Number of pages.
        num_pages: u32,
    },
    /// `EINVAL`: bad range for the slot (past the end, or a length that is not a multiple
    /// of 64 and does not end at the slot end), bad slot id, or dirty ring on.
    #[error("KVM_CLEAR_DIRTY_LOG: invalid argument (range not 64-page aligned, not ending at the slot end, or past it)")]
    InvalidArgument,
    /// `ENOENT`: the slot has no dirty bitmap (logging off, or no such slot).
    #[error("KVM_CLEAR_DIRTY_LOG: slot has no dirty bitmap (logging off or slot missing)")]
    NotLogging,
    /// `EFAULT`: the kernel could not read the bitmap.
    #[error("KVM_CLEAR_DIRTY_LOG: bitmap not readable (EFAULT)")]
    Fault,
    /// `ENXIO`: the dirty ring is enabled on this VM.
    #[error("KVM_CLEAR_DIRTY_LOG: not available while the dirty ring is enabled (ENXIO)")]
    DirtyRingEnabled,
    /// Another errno.
    #[error("KVM_CLEAR_DIRTY_LOG: {0}")]
    Other(errno::Error),
}

impl ClearDirtyLogError {
    /// Maps an `errno` returned by the ioctl to its variant.
    ///
    /// # Example
    ///
    /// ```
    /// use clearlog_kvm::clear_log::ClearDirtyLogError;
    /// use vmm_sys_util::errno::Error;
    ///
    /// assert_eq!(
    ///     ClearDirtyLogError::from_errno(Error::new(libc::ENOENT)),
    ///     ClearDirtyLogError::NotLogging
    /// );
    /// ```
    pub fn from_errno(e: errno::Error) -> Self {
        match e.errno() {
            libc::EINVAL => ClearDirtyLogError::InvalidArgument,
            libc::ENOENT => ClearDirtyLogError::NotLogging,
            libc::EFAULT => ClearDirtyLogError::Fault,
            libc::ENXIO => ClearDirtyLogError::DirtyRingEnabled,
            _ => ClearDirtyLogError::Other(e),
        }
    }
}

/// Clears dirty bits and re-arms dirty tracking with `KVM_CLEAR_DIRTY_LOG`.
///
/// - `slot`: memslot id in bits 0-15, address-space id in bits 16-31;
/// - `first_page`: first page of the range, relative to the slot start, a multiple of 64;
/// - `num_pages`: length of the range in pages, a multiple of 64 unless the range ends
///   exactly at the slot end;
/// - `bitmap`: bit `i` (bit `i % 64` of word `i / 64`) set = clear page `first_page + i`;
///   must hold at least `ceil(num_pages / 64)` words. Bits beyond `num_pages` are ignored.
///
/// Validates what it can in userspace (zero length, alignment of `first_page`, bitmap
/// length, overflow) and maps the kernel's errors to distinct variants of
/// [`ClearDirtyLogError`]. See the [module documentation](self) for the kernel's rules.
///
/// # Example
///
/// ```no_run
/// use clearlog_kvm::clear_log::clear_dirty_log;
///
/// # fn f(vm: &kvm_ioctls::VmFd) -> Result<(), clearlog_kvm::clear_log::ClearDirtyLogError> {
/// // Clear pages 0..31 of slot 0 only; pages 32..63 keep their dirty bit.
/// clear_dirty_log(vm, 0, 0, 64, &[0xffff_ffff])?;
/// # Ok(())
/// # }
/// ```
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), ClearDirtyLogError> {
    if num_pages == 0 {
        return Err(ClearDirtyLogError::Empty);
    }
    if first_page % 64 != 0 {
        return Err(ClearDirtyLogError::Unaligned { first_page });
    }
    if first_page.checked_add(u64::from(num_pages)).is_none() {
        return Err(ClearDirtyLogError::Overflow {
            first_page,
            num_pages,
        });
    }
    let needed = (num_pages as usize).div_ceil(64);
    if bitmap.len() < needed {
        return Err(ClearDirtyLogError::BitmapTooShort {
            num_pages,
            needed,
            got: bitmap.len(),
        });
    }
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            // The kernel only reads through this pointer.
            dirty_bitmap: bitmap.as_ptr() as *mut c_void,
        },
    };
    // SAFETY: `vm` is a VM fd and KVM_CLEAR_DIRTY_LOG matches `kvm_clear_dirty_log`. The
    // kernel reads `ceil(num_pages / 64)` u64 words from `dirty_bitmap`, which we checked
    // `bitmap` holds; it writes nothing to user memory. `arg` and `bitmap` outlive the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(ClearDirtyLogError::from_errno(errno::Error::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number() {
        // _IOWR(0xAE, 0xc0, 24 bytes): dir 3 << 30 | size 24 << 16 | 0xAE << 8 | 0xc0.
        assert_eq!(std::mem::size_of::<kvm_clear_dirty_log>(), 24);
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
    }

    #[test]
    fn errno_mapping() {
        let m = |n| ClearDirtyLogError::from_errno(errno::Error::new(n));
        assert_eq!(m(libc::EINVAL), ClearDirtyLogError::InvalidArgument);
        assert_eq!(m(libc::ENOENT), ClearDirtyLogError::NotLogging);
        assert_eq!(m(libc::EFAULT), ClearDirtyLogError::Fault);
        assert_eq!(m(libc::ENXIO), ClearDirtyLogError::DirtyRingEnabled);
        assert_eq!(
            m(libc::EPERM),
            ClearDirtyLogError::Other(errno::Error::new(libc::EPERM))
        );
    }
}
