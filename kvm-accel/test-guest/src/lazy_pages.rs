// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`LazyPages`]: a range of this process's memory under a missing-mode userfaultfd whose handler
//! thread places each page on its first touch, as a lazy snapshot restore or a postcopy
//! destination does. For tests: the engine's own postcopy will use the `userfaultfd` crate.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The page size the handler places.
const PAGE: u64 = 4096;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`: the range, then the mode, then the ioctls the kernel allows.
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

/// `_IOWR(0xAA, nr, size_of::<T>())`.
const fn iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xaa << 8) | nr
}

/// The userfaultfd ioctl `nr` on `fd` with `arg`, an error with the OS's reason.
fn uffd_ioctl<T>(fd: &File, nr: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the `#[repr(C)]` struct the ioctl `nr` reads and writes (its
    // size is part of the request number), alive and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), iowr::<T>(nr) as _, std::ptr::from_mut(arg)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What the handler fills a page with: `(page index in the range, the page's 4 KiB)`.
pub type Fill = Box<dyn Fn(u64, &mut [u8]) + Send>;

/// A missing-mode userfaultfd over `[base, base + len)` and its handler thread, which fills each
/// faulting 4 KiB page with `fill` and places it with `UFFDIO_COPY`. Dropping it stops the
/// handler (pages still missing then stay missing: touch none of them afterwards).
///
/// The registration is not `UFFD_USER_MODE_ONLY`, so faults the kernel takes on the range's
/// behalf (KVM touching guest memory, a `read(2)` into it) wait for the handler too.
#[derive(Debug)]
pub struct LazyPages {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    /// Nanoseconds after `start` at which the last page was placed.
    last_ns: Arc<AtomicU64>,
    start: Instant,
    handler: Option<JoinHandle<()>>,
}

impl LazyPages {
    /// Register `[base, base + len)` (page aligned, mapped private anonymous memory of this
    /// process that stays mapped while the returned value lives) and start the handler.
    ///
    /// # Errors
    ///
    /// The OS's error if userfaultfd is unavailable here (callers say SKIPPED) or the range
    /// cannot be registered.
    pub fn register(base: u64, len: u64, fill: Fill) -> io::Result<Self> {
        // SAFETY: userfaultfd(2) takes flags only; a non-negative result is a new fd we own.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let uffd = unsafe { File::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        uffd_ioctl(&uffd, 0x3f, &mut api)?;
        let mut reg = UffdioRegister {
            start: base,
            len,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        uffd_ioctl(&uffd, 0x00, &mut reg)?;
        let (stop, served, last_ns) =
            <(Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>)>::default();
        let start = Instant::now();
        let handler = {
            let (stop, served, last_ns) = (stop.clone(), served.clone(), last_ns.clone());
            std::thread::spawn(move || {
                let placed = || {
                    served.fetch_add(1, Ordering::Relaxed);
                    last_ns.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                };
                serve(&uffd, base, &*fill, &stop, placed);
            })
        };
        Ok(LazyPages {
            stop,
            served,
            last_ns,
            start,
            handler: Some(handler),
        })
    }

    /// Page faults served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// When the last page was placed (`None` before the first).
    pub fn last_served(&self) -> Option<Instant> {
        (self.served() > 0)
            .then(|| self.start + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed)))
    }
}

/// The handler: each page fault in the range is answered with its page, filled by `fill`.
fn serve(
    uffd: &File,
    base: u64,
    fill: &dyn Fn(u64, &mut [u8]),
    stop: &AtomicBool,
    placed: impl Fn(),
) {
    let mut msg = [0u8; 32]; // struct uffd_msg: a fault's address is at byte 16
    let mut page = vec![0u8; PAGE as usize];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, alive for the call.
        if unsafe { libc::poll(&raw mut pfd, 1, 20) } <= 0 {
            continue;
        }
        // SAFETY: reads at most `msg.len()` bytes into `msg`.
        let got = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if got != msg.len() as isize || msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let addr = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes")) & !(PAGE - 1);
        fill((addr - base) / PAGE, &mut page);
        let mut copy = UffdioCopy {
            dst: addr,
            src: page.as_ptr() as u64,
            len: PAGE,
            mode: 0,
            copy: 0,
        };
        // UFFDIO_COPY reads `len` bytes at `src` (`page`, borrowed for the call) and places them
        // at `dst`, a missing page of the registered range. A page another fault already placed
        // gives EEXIST, which is fine.
        let _ = uffd_ioctl(uffd, 0x03, &mut copy);
        placed();
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}
