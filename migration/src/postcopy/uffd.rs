// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A missing-mode userfaultfd over guest memory: faults on missing pages are read as events, and
//! pages are placed atomically (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), which also wakes the threads
//! waiting on them. The kernel's own accesses (KVM's vCPUs, a `read(2)` into guest memory) wait
//! too: the registration is not `UFFD_USER_MODE_ONLY`.
//!
//! The same fd in write-protect mode (`Userfaultfd::with_features`, `register_wp`,
//! `writeprotect`) serves `snapshot::wp_digests`: writes to protected pages wait until the page is
//! un-protected.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::time::Duration;

use crate::PAGE_SIZE;

const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `_UFFDIO_API`, `_UFFDIO_REGISTER`, `_UFFDIO_COPY`, `_UFFDIO_ZEROPAGE`.
const NR_API: u64 = 0x3f;
const NR_REGISTER: u64 = 0x00;
const NR_COPY: u64 = 0x03;
const NR_ZEROPAGE: u64 = 0x04;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`: the range, then the mode, then the result.
#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// `_IOWR(0xAA, nr, size_of::<T>())`.
const fn iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xaa << 8) | nr
}

/// A userfaultfd with ranges registered in missing mode. Closing it (drop) unregisters them:
/// pages still missing then fill with zeros on their next touch, as for any anonymous memory.
#[derive(Debug)]
pub(crate) struct Userfaultfd {
    fd: File,
}

/// A page fault read from the fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault {
    /// The faulting address, rounded down to its page.
    pub(crate) addr: u64,
    /// `UFFD_PAGEFAULT_FLAG_*` ([`wp::PAGEFAULT_FLAG_WP`] for a write-protect fault).
    pub(crate) flags: u64,
}

/// What placing a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// The page was missing and now holds the data.
    Now,
    /// The page was there already (placed before, or never missing): nothing changed.
    Already,
}

impl Userfaultfd {
    /// A new userfaultfd (non-blocking reads).
    pub(crate) fn new() -> io::Result<Self> {
        Self::with_features(0).map(|(uffd, _)| uffd)
    }

    /// A new userfaultfd (non-blocking reads) with the `UFFD_FEATURE_*` bits `features` enabled,
    /// and the features this kernel offers. A feature the kernel lacks fails with `EINVAL`.
    pub(crate) fn with_features(features: u64) -> io::Result<(Self, u64)> {
        // SAFETY: userfaultfd(2) takes flags only; a non-negative result is a new fd we own.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let fd = unsafe { File::from_raw_fd(fd as i32) };
        let uffd = Userfaultfd { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        uffd.ioctl(NR_API, &mut api)?;
        Ok((uffd, api.features))
    }

    /// The userfaultfd ioctl `nr`, declared `_IOWR`, with `arg`.
    fn ioctl<T>(&self, nr: u64, arg: &mut T) -> io::Result<()> {
        self.ioctl_request(iowr::<T>(nr), arg)
    }

    /// The userfaultfd ioctl `request` (built by `iowr` or `wp::ior` from `T`) with `arg`.
    fn ioctl_request<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the `#[repr(C)]` struct the ioctl reads and writes (its
        // size is part of the request number), alive and exclusively borrowed for the call. The
        // ioctls that place pages only write into ranges registered on this fd; the others only
        // change how its registered ranges fault.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Register `[start, start + len)` (page aligned, mapped memory of this process) in missing
    /// mode: from now on a touch of a missing page there waits for this fd's owner.
    pub(crate) fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            start,
            len,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(NR_REGISTER, &mut reg)
    }

    /// Place the page at `dst` (page aligned, in a registered range) with the 4 KiB at `src`, and
    /// wake whoever waits on it.
    pub(crate) fn copy(&self, dst: u64, src: &[u8; PAGE_SIZE as usize]) -> io::Result<Placed> {
        let mut copy = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: PAGE_SIZE,
            mode: 0,
            copy: 0,
        };
        Self::placed(self.ioctl(NR_COPY, &mut copy))
    }

    /// Place a zero page at `dst` (page aligned, in a registered range), and wake its waiters.
    pub(crate) fn zero(&self, dst: u64) -> io::Result<Placed> {
        let mut zero = UffdioZeropage {
            start: dst,
            len: PAGE_SIZE,
            mode: 0,
            zeropage: 0,
        };
        Self::placed(self.ioctl(NR_ZEROPAGE, &mut zero))
    }

    /// `EEXIST`: the page is there already, which is not an error for a page that may arrive twice.
    fn placed(r: io::Result<()>) -> io::Result<Placed> {
        match r {
            Ok(()) => Ok(Placed::Now),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Placed::Already),
            Err(e) => Err(e),
        }
    }

    /// The address (page aligned) of the next page fault, waiting at most `timeout`; `None` if
    /// none came. Other events (none are asked for) are skipped.
    pub(crate) fn next_fault(&self, timeout: Duration) -> io::Result<Option<u64>> {
        if !self.wait_readable(timeout)? {
            return Ok(None);
        }
        Ok(self.read_fault()?.map(|f| f.addr))
    }

    /// Whether a message can be read, waiting at most `timeout` for one.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        self.wait_readable_or(None, timeout)
    }

    /// Whether a message can be read, waiting at most `timeout` for one, or for `wake` (another
    /// fd, left unread) to become readable: how another thread cuts the wait short.
    pub(crate) fn wait_readable_or(
        &self,
        wake: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> io::Result<bool> {
        let pfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut pfds = [pfd(self.fd.as_raw_fd()), pfd(-1)];
        if let Some(w) = wake {
            pfds[1].fd = w.as_raw_fd();
        }
        let count = if wake.is_some() { 2 } else { 1 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `count` (1 or 2) valid pollfds, in an array alive for the call; the kernel
        // writes only their `revents`.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), count, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(pfds[0].revents != 0)
    }

    /// The next page fault if one is queued (no waiting); `None` if none is, or if the message
    /// read is another event (none are asked for).
    pub(crate) fn read_fault(&self) -> io::Result<Option<Fault>> {
        // struct uffd_msg: event at byte 0; a fault's flags at byte 8, its address at byte 16.
        let mut msg = [0u8; 32];
        // SAFETY: reads at most `msg.len()` bytes into `msg`, which lives for the call.
        let got = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if got != msg.len() as isize || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let word = |at: usize| u64::from_le_bytes(msg[at..at + 8].try_into().expect("8 bytes"));
        Ok(Some(Fault {
            addr: word(16) & !(PAGE_SIZE - 1),
            flags: word(8),
        }))
    }
}

/// Write-protect mode, for `snapshot::wp_digests`.
pub(crate) mod wp {
    use std::io;

    use super::{UffdioRegister, Userfaultfd, NR_REGISTER};

    const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
    const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
    /// `_UFFDIO_UNREGISTER`, `_UFFDIO_WRITEPROTECT`.
    const NR_UNREGISTER: u64 = 0x01;
    const NR_WRITEPROTECT: u64 = 0x06;

    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported as such.
    pub(crate) const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect mode on shmem (memfd) and hugetlbfs.
    pub(crate) const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// `UFFD_FEATURE_WP_UNPOPULATED`: protecting an anonymous page that is not there yet leaves a
    /// marker, so its first write waits too instead of filling it unseen.
    pub(crate) const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    /// `UFFD_PAGEFAULT_FLAG_WP` in a fault's flags: a write to a write-protected page.
    pub(crate) const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

    /// `struct uffdio_range`.
    #[repr(C)]
    struct UffdioRange {
        start: u64,
        len: u64,
    }

    /// `struct uffdio_writeprotect`: the range, then the mode.
    #[repr(C)]
    struct UffdioWriteprotect {
        start: u64,
        len: u64,
        mode: u64,
    }

    /// `_IOR(0xAA, nr, size_of::<T>())` (only `UFFDIO_UNREGISTER` is declared so).
    const fn ior<T>(nr: u64) -> u64 {
        (2 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xaa << 8) | nr
    }

    impl Userfaultfd {
        /// The `UFFD_FEATURE_*` bits this kernel offers (asked on a throwaway fd: the handshake can
        /// be made once per fd).
        pub(crate) fn available_features() -> io::Result<u64> {
            Self::with_features(0).map(|(_, available)| available)
        }

        /// Register `[start, start + len)` (page aligned, mapped memory of this process) in
        /// write-protect mode: from now on a write to a page protected with [`Self::writeprotect`]
        /// waits for this fd's owner. `Unsupported` if the kernel offers no `UFFDIO_WRITEPROTECT`
        /// for the range.
        pub(crate) fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
            let mut reg = UffdioRegister {
                start,
                len,
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            self.ioctl(NR_REGISTER, &mut reg)?;
            if reg.ioctls & (1 << NR_WRITEPROTECT) == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "userfaultfd: no UFFDIO_WRITEPROTECT for this memory",
                ));
            }
            Ok(())
        }

        /// Unregister `[start, start + len)`: its faults no longer come to this fd (and its waiters
        /// are woken).
        pub(crate) fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
            let mut range = UffdioRange { start, len };
            self.ioctl_request(ior::<UffdioRange>(NR_UNREGISTER), &mut range)
        }

        /// Write-protect (`protect`) or un-protect `[start, start + len)` (page aligned, in a range
        /// registered with [`Self::register_wp`]). Un-protecting wakes the writers waiting there.
        pub(crate) fn writeprotect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
            let mode = if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            };
            let mut wp = UffdioWriteprotect { start, len, mode };
            loop {
                match self.ioctl(NR_WRITEPROTECT, &mut wp) {
                    // The address space is changing (fork, mremap...): the kernel asks to retry.
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                    r => return r,
                }
            }
        }
    }
}

/// Make `[start, start + len)` (page aligned, this process's memory) missing again: private
/// memory drops its pages (`MADV_DONTNEED`), shared memory its backing store (`MADV_REMOVE`).
///
/// # Safety
///
/// The range must be guest memory whose old contents nobody needs any more (it reads as missing
/// afterwards: zeros, or a userfaultfd's answer).
pub(crate) unsafe fn discard(start: u64, len: u64, shared: bool) -> io::Result<()> {
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: the caller vouches that the range is memory whose contents may go.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len as usize, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Private anonymous memory of `pages` pages, unmapped on drop.
    struct Anon(u64, usize);

    impl Anon {
        fn new(pages: usize) -> Anon {
            let len = pages * PAGE_SIZE as usize;
            // SAFETY: a new private anonymous mapping; no existing memory is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Anon(p as u64, len)
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: the mapping `new` made, unmapped once.
            unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
        }
    }

    #[test]
    fn a_discarded_page_faults_and_a_page_is_placed_once() {
        let Ok(uffd) = Userfaultfd::new() else {
            eprintln!("SKIPPED: userfaultfd is not available here");
            return;
        };
        let mem = Anon::new(4);
        // SAFETY: `mem` is this test's own mapping, alive for the test.
        let page = |i: u64| unsafe { &mut *((mem.0 + i * PAGE_SIZE) as *mut [u8; 4096]) };
        page(1)[0] = 9;
        uffd.register(mem.0, 4 * PAGE_SIZE).unwrap();
        // SAFETY: page 1 of this test's own mapping.
        unsafe { discard(mem.0 + PAGE_SIZE, PAGE_SIZE, false) }.unwrap();
        let toucher = std::thread::spawn({
            let addr = mem.0 + PAGE_SIZE;
            // SAFETY: page 1 of the mapping, which outlives the thread (joined below); the read
            // waits until the page is placed.
            move || unsafe { std::ptr::read_volatile((addr + 8) as *const u8) }
        });
        let fault = loop {
            if let Some(a) = uffd.next_fault(Duration::from_secs(5)).unwrap() {
                break a;
            }
        };
        assert_eq!(fault, mem.0 + PAGE_SIZE);
        let data = [7u8; 4096];
        assert_eq!(uffd.copy(fault, &data).unwrap(), Placed::Now);
        assert_eq!(toucher.join().unwrap(), 7);
        assert_eq!(uffd.copy(fault, &[1u8; 4096]).unwrap(), Placed::Already);
        assert_eq!(page(1)[100], 7, "a second placement changed nothing");
        assert_eq!(uffd.zero(mem.0 + 3 * PAGE_SIZE).unwrap(), Placed::Now);
        assert_eq!(page(3)[0], 0);
        assert_eq!(uffd.zero(mem.0 + 3 * PAGE_SIZE).unwrap(), Placed::Already);
    }
}
