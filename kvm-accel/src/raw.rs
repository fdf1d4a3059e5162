// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The raw dirty-log ioctls, on any VM fd ([`BorrowedFd`]), whatever kvm-ioctls version (if any)
//! made it.
//!
//! These functions know nothing of memslots or of [`KvmMemoryListener`](crate::KvmMemoryListener)s:
//! they are for slots the caller manages itself. The ioctl numbers of type `0xAE` are KVM's by
//! convention only: another driver may give them another meaning and write through the pointers
//! passed. So [`clear_dirty_log`] (safe) checks that its fd is a KVM VM fd (the target of
//! `/proc/self/fd/N` is `anon_inode:kvm-vm`) before the ioctl, and [`get_dirty_log`] makes it
//! part of its safety contract; the crate's other entry points that take a caller's fd
//! ([`Vm::from_fd`](crate::Vm::from_fd), [`enable_manual_protect`](crate::enable_manual_protect),
//! [`enable_dirty_ring`](crate::enable_dirty_ring), [`KvmCaps::probe`](crate::KvmCaps::probe),
//! [`Vm::register_vcpu_ring`](crate::Vm::register_vcpu_ring)) check it the same way. **Never use them on a slot a listener owns**:
//! its dirty bits belong to the listener's [`SlotDirtyCache`](crate::SlotDirtyCache), and a GET or
//! CLEAR behind the cache's back loses writes (see [`clear_dirty_log`]). The safe
//! [`Vm::get_dirty_log`](crate::Vm::get_dirty_log) and
//! [`Vm::clear_dirty_log`](crate::Vm::clear_dirty_log) check the slot against the `Vm`'s table
//! and refuse listener slots.
//!
//! # `KVM_GET_DIRTY_LOG`
//!
//! `kvm_ioctls::VmFd::get_dirty_log` allocates a new vector at every call; a VMM that syncs
//! thousands of slots many times per second wants to reuse its buffers: [`get_dirty_log`] fills a
//! caller buffer. The kernel copies `ceil(slot_pages / 64)` `u64` words (one bit per 4 KiB page,
//! bit 0 of word 0 = first page of the slot). In legacy mode it also clears its bitmap and
//! write-protects the slot; with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled it only copies.
//!
//! # `KVM_CLEAR_DIRTY_LOG`
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
//! This module depends only on `kvm-bindings` and `vmm-sys-util`, so its two functions can be
//! proposed to `kvm-ioctls` as `VmFd::clear_dirty_log` and a buffer-filling `get_dirty_log`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::raw::c_void;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

mod nr {
    use super::*;
    // `_IO(KVMIO, 0x00)`.
    ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
    // `_IO(KVMIO, 0x03)`: on the system fd and (since Linux 4.15) on VM fds.
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    // `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    // `_IOW(KVMIO, 0xa3, struct kvm_enable_cap)`.
    ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
    // `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    // `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    // `_IO(KVMIO, 0xc7)`.
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::*;

/// What a file descriptor is, as far as KVM is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdKind {
    /// The KVM device (`/dev/kvm`, character device 10:232): the system fd.
    System,
    /// A VM (`KVM_CREATE_VM`): an anonymous inode KVM names `kvm-vm`.
    Vm,
    /// A vCPU (`KVM_CREATE_VCPU`): an anonymous inode KVM names `kvm-vcpu:N`.
    Vcpu,
    /// Anything else.
    Other,
}

/// `/dev/kvm`'s device number (the misc major, `KVM_MINOR`).
const KVM_DEVICE_MAJOR_MINOR: (u32, u32) = (10, 232);

impl FdKind {
    /// What `fd` is: the KVM device (its device number, by `fstat`), a KVM VM or vCPU (the name of
    /// its anonymous inode, the target of `/proc/self/fd/N`: only KVM makes inodes named `kvm-vm`
    /// and `kvm-vcpu:N`), or something else. An error when the answer cannot be had (e.g. no
    /// `/proc`): then nothing may be assumed about the fd.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
        let meta = std::fs::File::from(fd.try_clone_to_owned()?).metadata()?;
        if meta.file_type().is_char_device() {
            let rdev = meta.rdev();
            let is_kvm = (libc::major(rdev), libc::minor(rdev)) == KVM_DEVICE_MAJOR_MINOR;
            return Ok(if is_kvm {
                FdKind::System
            } else {
                FdKind::Other
            });
        }
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let link = link.to_string_lossy();
        Ok(match link.strip_prefix("anon_inode:") {
            Some("kvm-vm") => FdKind::Vm,
            Some(name) if name.starts_with("kvm-vcpu:") => FdKind::Vcpu,
            _ => FdKind::Other,
        })
    }
}

/// A borrowed fd known to be a KVM fd of a given kind: the only fds this module's ioctls are
/// issued on. The ioctl numbers of type `0xAE` are KVM's by convention only (any driver may give
/// the same numbers another meaning, and could then write through the pointers we pass), so what
/// the kernel does with our memory is only known once the fd is known to be KVM's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvmFd<'a> {
    fd: BorrowedFd<'a>,
    kind: FdKind,
}

impl<'a> KvmFd<'a> {
    /// `fd` if it is a KVM fd ([`FdKind::of`]), `None` if it is something else.
    pub(crate) fn check(fd: BorrowedFd<'a>) -> io::Result<Option<Self>> {
        Ok(match FdKind::of(fd)? {
            FdKind::Other => None,
            kind => Some(KvmFd { fd, kind }),
        })
    }

    /// A KVM fd of `kind`, not checked.
    ///
    /// # Safety
    ///
    /// `fd` must be a KVM fd of `kind` for as long as the borrow lives (e.g. the fd
    /// `KVM_CREATE_VM` returned, or a duplicate of a fd [`KvmFd::check`] accepted: a duplicate
    /// refers to the same open file).
    pub(crate) unsafe fn new_unchecked(fd: BorrowedFd<'a>, kind: FdKind) -> Self {
        debug_assert_ne!(kind, FdKind::Other);
        KvmFd { fd, kind }
    }

    /// What kind of KVM fd it is.
    pub(crate) fn kind(self) -> FdKind {
        self.kind
    }

    /// The fd.
    pub(crate) fn fd(self) -> BorrowedFd<'a> {
        self.fd
    }
}

/// `KVM_GET_API_VERSION`; `None` when the fd does not answer it (a VM fd).
pub(crate) fn get_api_version(fd: KvmFd<'_>) -> Option<i32> {
    // SAFETY: `fd` is a KVM fd. KVM_GET_API_VERSION takes no argument (we pass 0) and writes no
    // user memory on the system fd; on a VM or vCPU fd KVM does not know it and fails the call,
    // which we report as `None`.
    let ret = unsafe { ioctl(&fd.fd, KVM_GET_API_VERSION()) };
    (ret >= 0).then_some(ret)
}

/// `KVM_CHECK_EXTENSION(cap)` on a system or VM fd: the kernel's answer, or -1 on error.
pub(crate) fn check_extension(fd: KvmFd<'_>, cap: u32) -> i32 {
    // SAFETY: `fd` is a KVM fd; KVM_CHECK_EXTENSION takes its argument by value (a capability
    // number, not an address) and writes no user memory (a vCPU fd just fails it).
    unsafe { ioctl_with_val(&fd.fd, KVM_CHECK_EXTENSION(), libc::c_ulong::from(cap)) }
}

/// `KVM_ENABLE_CAP(cap, args[0] = arg0)` on a VM fd.
pub(crate) fn enable_cap(vm: KvmFd<'_>, cap: u32, arg0: u64) -> errno::Result<()> {
    debug_assert_eq!(vm.kind(), FdKind::Vm);
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    // SAFETY: `vm` is a KVM fd. KVM_ENABLE_CAP reads one `kvm_enable_cap`, which `c` is and which
    // outlives the call; the capabilities this crate enables (manual dirty-log protection, the
    // dirty ring) make the kernel write no user memory.
    let ret = unsafe { ioctl_with_ref(&vm.fd, KVM_ENABLE_CAP(), &c) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS` on a VM fd: re-protects the pages of every ring entry marked reset and
/// recycles those entries; returns how many entries the kernel reset.
pub(crate) fn reset_dirty_rings(vm: KvmFd<'_>) -> errno::Result<u64> {
    debug_assert_eq!(vm.kind(), FdKind::Vm);
    // SAFETY: `vm` is a KVM VM fd. KVM_RESET_DIRTY_RINGS takes no argument; the kernel works on
    // the ring pages it allocated (their `flags` words, which we only access atomically, are the
    // only part of them it writes) and touches no other memory of ours.
    let ret = unsafe { ioctl(&vm.fd, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(ret as u64)
}

/// `KVM_SET_USER_MEMORY_REGION` on a VM fd.
///
/// # Safety
///
/// With a non-zero `memory_size`, `userspace_addr..+memory_size` must be a mapping of this
/// process that stays valid until the slot is deleted or the VM is closed: the guest reads and
/// writes it.
pub(crate) unsafe fn set_user_memory_region(
    vm: KvmFd<'_>,
    region: &kvm_userspace_memory_region,
) -> errno::Result<()> {
    debug_assert_eq!(vm.kind(), FdKind::Vm);
    // SAFETY: `vm` is a KVM VM fd; the request matches `kvm_userspace_memory_region`, which the
    // kernel only reads; the caller guarantees the host range it names stays mapped while the
    // slot exists.
    let ret = unsafe { ioctl_with_ref(&vm.fd, KVM_SET_USER_MEMORY_REGION(), region) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// Copies the dirty bitmap of `slot` (address-space id in bits 16-31) into `bitmap`
/// (`KVM_GET_DIRTY_LOG`).
///
/// Errors are the kernel's: `ENOENT` when the slot has no dirty bitmap, `EINVAL` for a bad
/// slot id, `EFAULT` when the buffer cannot be written.
///
/// In legacy mode this GET also clears the kernel's bitmap: on a slot a
/// [`KvmMemoryListener`](crate::KvmMemoryListener) owns it silently eats bits the listener
/// would never see. Never call it on such a slot.
///
/// # Safety
///
/// `vm` must be a KVM VM fd (any other driver may give this ioctl number another meaning). The
/// kernel writes `ceil(slot_pages / 64)` words, where `slot_pages` is the size of the memslot
/// *as the kernel knows it*, which another holder of the VM fd can change at any time: `bitmap`
/// must hold at least that many words. [`Vm::get_dirty_log`](crate::Vm::get_dirty_log) is a safe
/// variant: it GETs into a buffer that ends right before a guard page, so a larger slot fails
/// the call instead.
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("raw::get_dirty_log") { return Ok(()); }
/// use clearlog_kvm::AsKvmFd;
/// # use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
/// # // `mem` is declared first, so dropped after the VM and its memslot.
/// # let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 100 * 4096)]).unwrap();
/// # let kvm = kvm_ioctls::Kvm::new().unwrap();
/// # let vm = kvm.create_vm().unwrap();
/// # let region = kvm_bindings::kvm_userspace_memory_region {
/// #     slot: 0,
/// #     flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
/// #     guest_phys_addr: 0,
/// #     memory_size: 100 * 4096,
/// #     userspace_addr: mem.get_host_address(GuestAddress(0)).unwrap() as u64,
/// # };
/// # // SAFETY: `mem` (declared first) outlives `vm` and is used by nothing else.
/// # unsafe { vm.set_user_memory_region(region).unwrap() };
///
/// // `vm`: a kvm-ioctls `VmFd`, whose slot 0 (the caller's own, logging) holds 100 pages: 2 words.
/// let mut bitmap = [0u64; 2];
/// // SAFETY: `vm` is a KVM VM fd; its slot 0 has 100 pages (nobody else changes it), the
/// // buffer holds 128 bits.
/// unsafe { clearlog_kvm::raw::get_dirty_log(vm.as_kvm_fd(), 0, &mut bitmap)? };
/// # Ok::<(), vmm_sys_util::errno::Error>(())
/// ```
pub unsafe fn get_dirty_log(
    vm: BorrowedFd<'_>,
    slot: u32,
    bitmap: &mut [u64],
) -> errno::Result<()> {
    let arg = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast::<c_void>(),
        },
    };
    // SAFETY: the caller guarantees `vm` is a KVM VM fd and `bitmap` large enough for the
    // kernel's copy; the request matches `kvm_dirty_log`, which the kernel only reads; `arg` and
    // `bitmap` outlive the call.
    let ret = unsafe { ioctl_with_ref(&vm, KVM_GET_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// Why a `KVM_CLEAR_DIRTY_LOG` was refused, by userspace validation or by the kernel.
///
/// # Example
///
/// ```
/// use clearlog_kvm::ClearDirtyLogError;
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
    #[error("KVM_CLEAR_DIRTY_LOG failed")]
    Other(#[source] errno::Error),
    /// The fd is not a KVM VM fd: no ioctl was issued.
    #[error("KVM_CLEAR_DIRTY_LOG: not a KVM VM fd")]
    NotAVmFd,
    /// What the fd is could not be told (e.g. without `/proc`): no ioctl was issued.
    #[error("KVM_CLEAR_DIRTY_LOG: cannot tell whether the fd is a KVM VM fd (is /proc mounted?)")]
    FdKindUnknown(#[source] errno::Error),
}

impl ClearDirtyLogError {
    /// Maps an `errno` returned by the ioctl to its variant.
    ///
    /// # Example
    ///
    /// ```
    /// use clearlog_kvm::ClearDirtyLogError;
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
/// `vm` is checked to be a KVM VM fd first (its `/proc/self/fd` link is `anon_inode:kvm-vm`;
/// [`ClearDirtyLogError::NotAVmFd`] otherwise, no ioctl): another driver could give this ioctl
/// number a meaning that writes through the pointers passed. That costs a `readlink` per call;
/// [`Vm::clear_dirty_log`](crate::Vm::clear_dirty_log) checked its fd once, when it was made.
///
/// # Never on a slot a `KvmMemoryListener` owns
///
/// A listener's slot has a [`SlotDirtyCache`](crate::SlotDirtyCache): every clear of it must go
/// through the cache ([`clearlog_memory::MemorySystem::clear_dirty_bitmap`], which calls the
/// listener's `log_clear`), which sends KVM only bits the last sync reported and drops them from
/// the cache under the slots lock. A direct clear from a stale copy of the bitmap wipes the
/// dirty bit of a write made after that copy: the page is never reported again, a lost write
/// (the `two_clients` test of `clearlog-test-guest` shows it happen). This function cannot
/// check it (it knows only a fd); [`Vm::clear_dirty_log`](crate::Vm::clear_dirty_log), the safe
/// path, refuses listener slots with [`Error::SlotOwnedByCache`](crate::Error::SlotOwnedByCache).
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("raw::clear_dirty_log") { return Ok(()); }
/// use clearlog_kvm::{AsKvmFd, MANUAL_PROTECT_ENABLE, enable_manual_protect};
/// use clearlog_kvm::raw::clear_dirty_log;
///
/// # use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
/// # // `mem` is declared first, so dropped after the VM and its memslot.
/// # let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 100 * 4096)]).unwrap();
/// # let kvm = kvm_ioctls::Kvm::new().unwrap();
/// # let vm = kvm.create_vm().unwrap();
/// # if enable_manual_protect(&vm, MANUAL_PROTECT_ENABLE).is_err() { return Ok(()); }
/// # let region = kvm_bindings::kvm_userspace_memory_region {
/// #     slot: 0,
/// #     flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
/// #     guest_phys_addr: 0,
/// #     memory_size: 100 * 4096,
/// #     userspace_addr: mem.get_host_address(GuestAddress(0)).unwrap() as u64,
/// # };
/// # // SAFETY: `mem` (declared first) outlives `vm` and is used by nothing else.
/// # unsafe { vm.set_user_memory_region(region).unwrap() };
/// // `vm`: a VM fd of any kvm-ioctls version (a `VmFd`, a `File`, an `OwnedFd`) in manual
/// // protect mode; slot 0 is the caller's own, not a `KvmMemoryListener`'s. Clear pages 0..31
/// // only; 32..63 stay dirty.
/// clear_dirty_log(vm.as_kvm_fd(), 0, 0, 64, &[0xffff_ffff])?;
/// # Ok::<(), clearlog_kvm::ClearDirtyLogError>(())
/// ```
pub fn clear_dirty_log(
    vm: BorrowedFd<'_>,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), ClearDirtyLogError> {
    match KvmFd::check(vm) {
        Ok(Some(fd)) if fd.kind() == FdKind::Vm => {
            clear_dirty_log_on(fd, slot, first_page, num_pages, bitmap)
        }
        Ok(_) => Err(ClearDirtyLogError::NotAVmFd),
        Err(e) => Err(ClearDirtyLogError::FdKindUnknown(errno::Error::new(
            e.raw_os_error().unwrap_or(libc::EIO),
        ))),
    }
}

/// [`clear_dirty_log`] on a fd known to be a KVM VM fd (no check of the fd per call).
pub(crate) fn clear_dirty_log_on(
    vm: KvmFd<'_>,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), ClearDirtyLogError> {
    debug_assert_eq!(vm.kind(), FdKind::Vm);
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
    // SAFETY: `vm` is a KVM VM fd (`KvmFd`) and KVM_CLEAR_DIRTY_LOG matches
    // `kvm_clear_dirty_log`. The kernel reads `ceil(num_pages / 64)` u64 words from
    // `dirty_bitmap`, which we checked `bitmap` holds, and writes no user memory (it copies the
    // struct in and never back). `arg` and `bitmap` outlive the call.
    let ret = unsafe { ioctl_with_ref(&vm.fd, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(ClearDirtyLogError::from_errno(errno::Error::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_ENABLE_CAP(), 0x4068_aea3);
        assert_eq!(KVM_CHECK_EXTENSION(), 0xae03);
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
