// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `KVM_GET_DIRTY_LOG` into a caller-provided buffer.
//!
//! `kvm_ioctls::VmFd::get_dirty_log` allocates a new vector at every call; a VMM that syncs
//! thousands of slots many times per second wants to reuse its buffers. The kernel copies
//! `ceil(slot_pages / 64)` `u64` words (one bit per 4 KiB page, bit 0 of word 0 = first page
//! of the slot). In legacy mode it also clears its bitmap and write-protects the slot; with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled it only copies.

use std::os::raw::c_void;

use kvm_bindings::{kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, KVMIO};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

mod nr {
    use super::*;
    // `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
}
use nr::KVM_GET_DIRTY_LOG;

/// Copies the dirty bitmap of `slot` (address-space id in bits 16-31) into `bitmap`.
///
/// Errors are the kernel's: `ENOENT` when the slot has no dirty bitmap, `EINVAL` for a bad
/// slot id, `EFAULT` when the buffer cannot be written.
///
/// # Safety
///
/// The kernel writes `ceil(slot_pages / 64)` words, where `slot_pages` is the size of the
/// memslot *as the kernel knows it*: `bitmap` must hold at least that many words. Use
/// `Vm::get_dirty_log`, which checks this against its slot table, for a safe variant.
///
/// # Example
///
/// ```no_run
/// # fn f(vm: &kvm_ioctls::VmFd) -> Result<(), vmm_sys_util::errno::Error> {
/// // Slot 0 is known to hold 100 pages: 2 words.
/// let mut bitmap = [0u64; 2];
/// // SAFETY: slot 0 has 100 pages, the buffer holds 128 bits.
/// unsafe { clearlog_kvm::get_log::get_dirty_log(vm, 0, &mut bitmap)? };
/// # Ok(())
/// # }
/// ```
pub unsafe fn get_dirty_log(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> errno::Result<()> {
    let arg = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr() as *mut c_void,
        },
    };
    // SAFETY: `vm` is a VM fd and the request matches `kvm_dirty_log`. The caller guarantees
    // `bitmap` is large enough for the kernel's copy; `arg` and `bitmap` outlive the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number() {
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
    }
}
