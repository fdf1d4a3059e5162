// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fds a VMM hands to this crate ([`AsKvmFd`]: kvm-ioctls' `VmFd`, `VcpuFd` and `Kvm` as they
//! are, or any owned or borrowed fd), and the checks that make them [`KvmFd`]s before any ioctl.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::raw::{FdKind, KvmFd};

/// A file descriptor this crate may be given: the VM fd of [`Vm::from_fd`](crate::Vm::from_fd),
/// [`enable_manual_protect`](crate::enable_manual_protect),
/// [`enable_dirty_ring`](crate::enable_dirty_ring) and [`KvmCaps::probe`](crate::KvmCaps::probe),
/// the vCPU fd of [`Vm::register_vcpu_ring`](crate::Vm::register_vcpu_ring).
///
/// kvm-ioctls' `VmFd`, `VcpuFd` and `Kvm` implement `AsRawFd` but not `AsFd`; this trait takes
/// them as they are (the borrow is done once, here, knowing they own their fd), together with
/// `BorrowedFd`, `OwnedFd`, `File`, this crate's [`Vm`](crate::Vm) and references or smart
/// pointers of any of them. A VMM on another major version of kvm-ioctls borrows its fd itself
/// (`BorrowedFd::borrow_raw`, while the fd's owner lives) and passes the `BorrowedFd`.
///
/// Whatever the fd, every entry point checks that it is KVM's (and of the right kind) before
/// any ioctl or mapping.
///
/// # Example
///
/// ```
/// use clearlog_kvm::AsKvmFd;
///
/// fn kind_of(fd: impl AsKvmFd) -> i32 {
///     use std::os::fd::AsRawFd;
///     fd.as_kvm_fd().as_raw_fd()
/// }
/// let file = std::fs::File::open("/dev/null").unwrap();
/// assert!(kind_of(&file) >= 0);
/// ```
pub trait AsKvmFd {
    /// Borrows the fd.
    fn as_kvm_fd(&self) -> BorrowedFd<'_>;
}

/// kvm-ioctls' handles own their fd (a `File` that only their drop closes): borrowing it for
/// as long as the handle is borrowed is sound.
macro_rules! kvm_ioctls_handle {
    ($($handle:ty),*) => {$(
        impl AsKvmFd for $handle {
            fn as_kvm_fd(&self) -> BorrowedFd<'_> {
                // SAFETY: kvm-ioctls 0.25 keeps this handle's fd in a `File` field that stays
                // open until the handle is dropped, and the returned borrow cannot outlive
                // `&self`, so the fd is open for the whole borrow.
                unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
            }
        }
    )*};
}

kvm_ioctls_handle!(kvm_ioctls::VmFd, kvm_ioctls::VcpuFd, kvm_ioctls::Kvm);

impl AsKvmFd for BorrowedFd<'_> {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        *self
    }
}

impl AsKvmFd for OwnedFd {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl AsKvmFd for File {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl<T: AsKvmFd + ?Sized> AsKvmFd for &T {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        (**self).as_kvm_fd()
    }
}

impl<T: AsKvmFd + ?Sized> AsKvmFd for &mut T {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        (**self).as_kvm_fd()
    }
}

impl<T: AsKvmFd + ?Sized> AsKvmFd for Arc<T> {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        (**self).as_kvm_fd()
    }
}

impl<T: AsKvmFd + ?Sized> AsKvmFd for Rc<T> {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        (**self).as_kvm_fd()
    }
}

impl<T: AsKvmFd + ?Sized> AsKvmFd for Box<T> {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        (**self).as_kvm_fd()
    }
}

/// `fd` if it is a KVM VM fd; otherwise the error the public entry points taking a VM fd give.
pub(crate) fn checked_vm_fd(fd: BorrowedFd<'_>) -> Result<KvmFd<'_>> {
    let checked = KvmFd::check(fd).map_err(|source| Error::FdKindUnknown { source })?;
    let reason = match checked {
        Some(k) if k.kind() == FdKind::Vm => return Ok(k),
        Some(k) if k.kind() == FdKind::System => {
            "it is the /dev/kvm system fd, not a VM fd (KVM_CREATE_VM makes one)"
        }
        Some(k) if k.kind() == FdKind::Vcpu => "it is a KVM vCPU fd, not a VM fd",
        _ => "its /proc/self/fd link is not anon_inode:kvm-vm",
    };
    Err(Error::NotAVmFd { reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_kvms_is_refused() {
        let f = File::open("/dev/null").unwrap();
        assert!(matches!(
            checked_vm_fd(f.as_kvm_fd()),
            Err(Error::NotAVmFd { .. })
        ));
        // References and smart pointers borrow the same fd.
        let arc = Arc::new(f);
        let by_ref: &Arc<File> = &arc;
        assert_eq!(
            AsKvmFd::as_kvm_fd(&by_ref).as_raw_fd(),
            arc.as_kvm_fd().as_raw_fd()
        );
    }
}
