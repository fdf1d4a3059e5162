// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `random` workload holds its target dirty rate (its own test binary so no other
//! vCPU competes for the 2 host cores of the test machine).

mod common;

use std::time::Duration;

use clearlog_test_guest::layout::INFRA_END;
use clearlog_test_guest::workload::monitor::{achieved_rate, ticks_to_ms, WorkloadMonitor};
use clearlog_test_guest::workload::{reset_stall, set_dirty_rate, Workload, WorkloadSpec};
use common::*;

const MIB: u64 = 1 << 20;

fn within(measured: f64, target: f64, tol: f64) -> bool {
    (measured - target).abs() <= target * tol
}

#[test]
fn random_holds_target_rate() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 256 * MIB;
    let target = 64 * MIB;
    let g = Guest::new(None, INFRA_END + wss, false);
    let w = Workload::new(WorkloadSpec::Random {
        wss_bytes: wss,
        dirty_rate_bytes_per_s: target,
        seed: 0x1234_5678,
    });
    let r = g.start(&w).pop().unwrap();
    let mon = WorkloadMonitor::new(&g.mem, 1);
    mon.wait_ready(Duration::from_secs(20)).unwrap();
    let s = mon.measure_rate(Duration::from_secs(1)).unwrap();
    let mib_s = s.bytes_per_s() / MIB as f64;
    eprintln!(
        "random 64 MiB/s target: measured {mib_s:.2} MiB/s ({} pages in {:?})",
        s.pages, s.elapsed
    );
    assert!(
        within(s.bytes_per_s(), target as f64, 0.10),
        "{mib_s:.2} MiB/s"
    );

    // The host changes the rate at runtime.
    let tsc = r.with_vcpu(|v| v.tsc_khz()).err();
    assert!(tsc.is_some(), "with_vcpu must refuse a running vCPU");
    r.pause().unwrap();
    let tsc = r.with_vcpu(|v| v.tsc_khz()).unwrap().unwrap();
    r.resume().unwrap();
    set_dirty_rate(&g.mem, tsc, 16 * MIB, 1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let s = mon.measure_rate(Duration::from_secs(1)).unwrap();
    let mib_s = s.bytes_per_s() / MIB as f64;
    eprintln!("random 16 MiB/s target: measured {mib_s:.2} MiB/s");
    assert!(
        within(s.bytes_per_s(), (16 * MIB) as f64, 0.10),
        "{mib_s:.2} MiB/s"
    );

    // A pause does not cause a burst afterwards (backlog capped at 50 ms).
    r.pause().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    r.resume().unwrap();
    let s = mon.measure_rate(Duration::from_millis(500)).unwrap();
    let mib_s = s.bytes_per_s() / MIB as f64;
    eprintln!("after a 500 ms pause: {mib_s:.2} MiB/s over 500 ms");
    assert!(mib_s < 16.0 * 1.25, "{mib_s:.2} MiB/s");
    r.stop().unwrap();
}

/// The guest's own view: the achieved write rate from its counter block (guest TSC) matches the
/// target, a 300 ms pause of the vCPU shows as a >= 300 ms gap between two writes, and a reset
/// of the stall epoch forgets it.
#[test]
fn random_records_write_gaps_and_rate() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 64 * MIB;
    let target = 32 * MIB;
    let g = Guest::new(None, INFRA_END + wss, false);
    let w = Workload::new(WorkloadSpec::Random {
        wss_bytes: wss,
        dirty_rate_bytes_per_s: target,
        seed: 0x5eed,
    });
    let r = g.start(&w).pop().unwrap();
    let mon = WorkloadMonitor::new(&g.mem, 1);
    mon.wait_ready(Duration::from_secs(20)).unwrap();
    r.pause().unwrap();
    let tsc = r.with_vcpu(|v| v.tsc_khz()).unwrap().unwrap();
    r.resume().unwrap();
    // Measure from a write made after the resume: a vCPU thread the host has not scheduled yet
    // would otherwise put its idle time into the window (seen once in a full `cargo xtask test`).
    let resumed = mon.write_marks().unwrap()[0].pages_written;
    let start = std::time::Instant::now();
    while mon.write_marks().unwrap()[0].pages_written < resumed + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the guest never wrote after resume"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    let m0 = mon.write_marks().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let m1 = mon.write_marks().unwrap();
    let rate = achieved_rate(&m0, &m1, tsc).expect("the guest wrote");
    eprintln!("achieved (guest TSC) {:.2} MiB/s", rate / MIB as f64);
    assert!(within(rate, target as f64, 0.10), "{rate}");

    let wait_applied = |epoch: u64| {
        let start = std::time::Instant::now();
        while !mon.stall_epoch_applied(epoch).unwrap() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "epoch {epoch} never applied"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let e = reset_stall(&g.mem).unwrap();
    wait_applied(e);
    r.pause().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    r.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let gap = ticks_to_ms(mon.max_gap_ticks().unwrap(), tsc);
    eprintln!("gap over a 300 ms pause: {gap:.1} ms");
    assert!(gap >= 295.0, "{gap} ms");
    // Generous upper bound: the pause plus scheduling on a loaded 2-core host.
    assert!(gap < 5000.0, "{gap} ms");

    let e = reset_stall(&g.mem).unwrap();
    wait_applied(e);
    std::thread::sleep(Duration::from_millis(100));
    let gap = ticks_to_ms(mon.max_gap_ticks().unwrap(), tsc);
    eprintln!("gap after a reset: {gap:.2} ms");
    assert!(gap < 295.0, "the reset did not forget the pause: {gap} ms");
    r.stop().unwrap();
}
