// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guests larger than the identity map (127 GiB) on real KVM: the RAM is one memslot of the full
//! size (untouched memory costs nothing), the guest touches only its working set low in RAM and
//! rings the doorbell at a guest-physical address above RAM.

mod common;

use std::time::{Duration, Instant};

use clearlog_test_guest::layout::{doorbell_gpa, is_doorbell, IDENTITY_MAP_LIMIT};
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Error, Guest, GuestConfig};
use common::*;

const GIB: u64 = 1 << 30;

#[test]
fn a_256_gib_guest_boots_and_writes() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let mem = 256 * GIB;
    let start = Instant::now();
    let g = Guest::boot(GuestConfig {
        mem_bytes: mem,
        workload: WorkloadSpec::Random {
            wss_bytes: 64 << 20,
            dirty_rate_bytes_per_s: 64 << 20,
            seed: 3,
        },
        ready_timeout: Duration::from_secs(30),
        ..GuestConfig::default()
    })
    .expect("boot a 256 GiB guest with a 64 MiB working set");
    assert_eq!(g.mem_bytes(), mem);
    assert_eq!(g.block().size(), mem);
    let before = g.pages_written().unwrap();
    let t = Instant::now();
    while g.pages_written().unwrap() < before + 1000 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no progress: {} pages, {:?} {:?}",
            g.pages_written().unwrap(),
            g.vcpu_states(),
            g.vcpu_failures()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let written = g.pages_written().unwrap();
    assert!(g.vcpu_failures().is_empty(), "{:?}", g.vcpu_failures());
    // The doorbell lies above RAM (the boot waited for its ready ring).
    assert!(doorbell_gpa(mem) >= mem && is_doorbell(doorbell_gpa(mem)));
    g.pause().unwrap();
    g.shutdown().unwrap();
    eprintln!(
        "256 GiB guest: {written} pages written, {:.2} s in all",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn a_working_set_beyond_the_identity_map_fails_at_boot() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let e = Guest::boot(GuestConfig {
        mem_bytes: 256 * GIB,
        workload: WorkloadSpec::Random {
            wss_bytes: IDENTITY_MAP_LIMIT,
            dirty_rate_bytes_per_s: 64 << 20,
            seed: 3,
        },
        ..GuestConfig::default()
    })
    .expect_err("a working set above 127 GiB must not boot");
    assert!(
        matches!(&e, Error::InvalidWorkload(m) if m.contains("identity map")),
        "{e}"
    );
}

#[test]
fn more_than_max_ram_is_an_error() {
    let e = Guest::create(GuestConfig {
        mem_bytes: clearlog_test_guest::layout::MAX_RAM + (2 << 20),
        ..GuestConfig::default()
    })
    .expect_err("beyond MAX_RAM");
    assert!(matches!(e, Error::Layout(_)), "{e}");
}
