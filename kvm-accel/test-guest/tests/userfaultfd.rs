// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What postcopy and lazy restore rely on, checked on real KVM: guest RAM under a missing-mode
//! userfaultfd. A vCPU that touches a missing page waits until a handler places it
//! (`UFFDIO_COPY`) and then runs on; a VMM thread reading a missing page through the RAM block
//! waits the same way. docs/design.md, "Facts for postcopy and lazy restore", has the numbers.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clearlog_test_guest::layout::DEFAULT_WSS_START;
use clearlog_test_guest::workload::check::check_increment;
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Guest, GuestConfig};
use common::*;

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

/// The ioctl `nr` on `fd` with `arg`, an error with the OS's reason.
fn uffd_ioctl<T>(fd: &File, nr: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: every caller passes the `#[repr(C)]` struct the ioctl `nr` reads and writes (its
    // size is part of the request number), alive and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), iowr::<T>(nr) as _, std::ptr::from_mut(arg)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A missing-mode userfaultfd over `[base, base + len)` of this process, whose handler thread
/// places each faulting page from `pages` (the range's contents).
struct Lazy {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    /// Nanoseconds after `start` of the last page placed.
    last_ns: Arc<AtomicU64>,
    start: Instant,
    handler: Option<std::thread::JoinHandle<()>>,
}

impl Lazy {
    fn register(base: u64, pages: Arc<Vec<u8>>) -> Self {
        // SAFETY: userfaultfd(2) takes flags only; a non-negative result is a new fd we own.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let uffd = unsafe { File::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        uffd_ioctl(&uffd, 0x3f, &mut api).expect("UFFDIO_API");
        let mut reg = UffdioRegister {
            start: base,
            len: pages.len() as u64,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        uffd_ioctl(&uffd, 0x00, &mut reg).expect("UFFDIO_REGISTER");
        let (stop, served, last_ns) = Default::default();
        let start = Instant::now();
        let (s, n, l) = (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&last_ns));
        let handler = std::thread::spawn(move || serve(&uffd, base, &pages, start, &s, &n, &l));
        Lazy {
            stop,
            served,
            last_ns,
            start,
            handler: Some(handler),
        }
    }
}

/// The handler: each page fault in the range is answered with the page's contents.
fn serve(
    uffd: &File,
    base: u64,
    pages: &[u8],
    start: Instant,
    stop: &AtomicBool,
    served: &AtomicU64,
    last_ns: &AtomicU64,
) {
    let mut msg = [0u8; 32]; // struct uffd_msg: a fault's address is at byte 16
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
        let off = (addr - base) as usize;
        let page = &pages[off..off + PAGE as usize];
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
        served.fetch_add(1, Ordering::Relaxed);
        last_ns.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

/// The increment guest's working set is dropped while it is paused and registered with a
/// userfaultfd whose handler places the saved pages: the VMM's own read of a missing page and
/// the vCPU's accesses all wait for the handler, every page is placed once, and the guest runs on
/// with its increment rule intact.
#[test]
fn a_vcpu_and_the_vmm_wait_on_missing_pages_and_run_on() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 16u64 << 20;
    let g = Guest::boot(GuestConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        workload: WorkloadSpec::Increment {
            wss_bytes: wss,
            dirty_rate_bytes_per_s: 0,
        },
        ..GuestConfig::default()
    })
    .expect("boot the increment guest");
    std::thread::sleep(Duration::from_millis(300));
    g.pause().expect("pause");
    let mut saved = vec![0u8; wss as usize];
    g.block()
        .read(DEFAULT_WSS_START, &mut saved)
        .expect("read the working set");
    let base = g.block().host_addr() + DEFAULT_WSS_START;
    // SAFETY: the working set lies inside the guest's private anonymous RAM mapping, which `g`
    // keeps alive; the guest is paused, and its contents are saved above to be placed back.
    let rc = unsafe { libc::madvise(base as *mut libc::c_void, wss as usize, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0, "MADV_DONTNEED: {}", std::io::Error::last_os_error());
    let saved = Arc::new(saved);
    let lazy = Lazy::register(base, Arc::clone(&saved));

    // The VMM's read of a missing page, on a thread of its own: it waits for the handler.
    let block = Arc::clone(g.block());
    let at = DEFAULT_WSS_START + 5 * PAGE;
    let read = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        block.read(at, &mut b).map(|()| b)
    });
    let read = read.join().expect("reader").expect("read a missing page");
    assert_eq!(
        read[..],
        saved[5 * PAGE as usize..][..64],
        "the VMM read what the handler placed"
    );

    let before = g.pages_written().expect("pages written");
    let resumed_ns = lazy.start.elapsed().as_nanos() as u64;
    g.resume().expect("resume");
    let deadline = Instant::now() + Duration::from_secs(20);
    while lazy.served.load(Ordering::Relaxed) < wss / PAGE && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    g.pause().expect("pause after the faults");
    let after = g.pages_written().expect("pages written");
    let served = lazy.served.load(Ordering::Relaxed);
    let all_ms = lazy
        .last_ns
        .load(Ordering::Relaxed)
        .saturating_sub(resumed_ns) as f64
        / 1e6;
    drop(lazy);
    eprintln!(
        "userfaultfd: {served} faults served, the last {all_ms:.1} ms after the resume; the guest \
         wrote {} pages",
        after - before
    );
    // Every page of the working set faulted exactly once (the VMM's read placed one of them).
    assert_eq!(served, wss / PAGE, "faults served");
    assert!(after > before, "the guest made no progress");
    assert!(g.vcpu_failures().is_empty(), "{:?}", g.vcpu_failures());
    let check = check_increment(g.ram()).expect("increment check");
    assert!(check.is_consistent(), "{} bad pages", check.bad_count);
}
