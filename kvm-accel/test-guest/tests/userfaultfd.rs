// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What postcopy and lazy restore rely on, checked on real KVM: guest RAM under a missing-mode
//! userfaultfd. A vCPU that touches a missing page waits until a handler places it
//! (`UFFDIO_COPY`) and then runs on; a VMM thread reading a missing page through the RAM block
//! waits the same way. docs/design.md, "Facts for postcopy and lazy restore", has the numbers.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clearlog_test_guest::layout::DEFAULT_WSS_START;
use clearlog_test_guest::lazy_pages::LazyPages;
use clearlog_test_guest::workload::check::check_increment;
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Guest, GuestConfig};
use common::*;

const PAGE: u64 = 4096;

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
    let pages = Arc::clone(&saved);
    let fill = move |page: u64, out: &mut [u8]| {
        let at = (page * PAGE) as usize;
        out.copy_from_slice(&pages[at..at + out.len()]);
    };
    let lazy = LazyPages::register(base, wss, Box::new(fill)).expect("userfaultfd");

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
    let resumed = Instant::now();
    g.resume().expect("resume");
    let deadline = Instant::now() + Duration::from_secs(20);
    while lazy.served() < wss / PAGE && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    g.pause().expect("pause after the faults");
    let after = g.pages_written().expect("pages written");
    let served = lazy.served();
    let all_ms = lazy.last_served().map_or(0.0, |t| {
        t.saturating_duration_since(resumed).as_secs_f64() * 1e3
    });
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
