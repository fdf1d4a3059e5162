// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A missing-mode userfaultfd over guest memory: faults on missing pages are read as events, and
//! pages are placed atomically (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), which also wakes the threads
//! waiting on them. The kernel's own accesses (KVM's vCPUs, a `read(2)` into guest memory) wait
//! too: the registration is not `UFFD_USER_MODE_ONLY`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
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
            features: 0,
            ioctls: 0,
        };
        uffd.ioctl(NR_API, &mut api)?;
        Ok(uffd)
    }

    /// The userfaultfd ioctl `nr` with `arg`.
    fn ioctl<T>(&self, nr: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the `#[repr(C)]` struct the ioctl `nr` reads and writes (its
        // size is part of the request number), alive and exclusively borrowed for the call. The
        // ioctls that place pages only write into ranges registered on this fd.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                iowr::<T>(nr) as _,
                std::ptr::from_mut(arg),
            )
        };
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
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, alive for the call.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = [0u8; 32]; // struct uffd_msg: event at byte 0, a fault's address at byte 16
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
        let addr = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
        Ok(Some(addr & !(PAGE_SIZE - 1)))
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
