// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Save a running vCPU's state and the RAM, restore both into a fresh VM, resume there.

mod common;

use std::time::Duration;

use clearlog_test_guest::guest_ram::GuestRam;
use clearlog_test_guest::layout::INFRA_END;
use clearlog_test_guest::vcpu::runner::VcpuRunner;
use clearlog_test_guest::vcpu::{Vcpu, VcpuState, MSR_IA32_TSC};
use clearlog_test_guest::workload::monitor::WorkloadMonitor;
use clearlog_test_guest::workload::{Workload, WorkloadSpec};
use common::*;

const MIB: u64 = 1 << 20;

fn increment_ok(mem: &impl GuestRam, pages: u64) -> Result<(), String> {
    let mut prev = None;
    let mut drops = 0;
    for p in 0..pages {
        let mut b = [0u8];
        mem.read_at(INFRA_END + p * 4096, &mut b).unwrap();
        if let Some(q) = prev {
            if b[0] == u8::wrapping_sub(q, 1) {
                drops += 1;
            } else if b[0] != q {
                return Err(format!("page {p}: {} after {q}", b[0]));
            }
        }
        prev = Some(b[0]);
    }
    if drops > 1 {
        return Err(format!("{drops} drops"));
    }
    Ok(())
}

/// Runs `w` on a source VM for a while, pauses, saves state + RAM, restores into a fresh
/// VM and resumes it there. Returns (source pages_written at the pause, destination
/// guest, destination runner, saved state). `check` runs on the destination RAM before the
/// destination vCPU starts.
fn migrate(
    w: &Workload,
    size: u64,
    check: impl FnOnce(&Guest),
) -> (u64, Guest, VcpuRunner, VcpuState) {
    let src = Guest::new(None, size, true);
    let r = src.start(w).pop().unwrap();
    let mon = WorkloadMonitor::new(&src.mem, 1);
    mon.wait_ready(Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    r.pause().unwrap();
    let before = mon.pages_written().unwrap();
    let blob = r.with_vcpu(|v| v.save_state()).unwrap().unwrap().to_bytes();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        mon.pages_written().unwrap(),
        before,
        "source ran while paused"
    );
    let mut ram = vec![0u8; size as usize];
    src.mem.read_at(0, &mut ram).unwrap();
    r.stop().unwrap();
    drop(src);

    let dst = Guest::new(None, size, true);
    dst.mem.write_at(0, &ram).unwrap();
    let state = VcpuState::from_bytes(&blob).unwrap();
    let vcpu = Vcpu::new(&dst.vm, 0).unwrap();
    assert!(vcpu.migrated_msrs().contains(&MSR_IA32_TSC));
    vcpu.restore_state(&state).unwrap();
    let back = vcpu.save_state().unwrap();
    assert_eq!(back.regs.rip, state.regs.rip);
    assert_eq!(back.sregs.cr3, state.sregs.cr3);
    let tsc = |s: &VcpuState| s.msrs.iter().find(|m| m.0 == MSR_IA32_TSC).unwrap().1;
    let (t0, t1) = (tsc(&state), tsc(&back));
    assert!(t1 >= t0 && t1 - t0 < 10_000_000_000, "TSC {t0} -> {t1}");
    check(&dst);
    let r = VcpuRunner::spawn(vcpu).unwrap();
    (before, dst, r, state)
}

#[test]
fn random_continues_in_new_vm() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 32 * MIB;
    let rate = 32 * MIB;
    let w = Workload::new(WorkloadSpec::Random {
        wss_bytes: wss,
        dirty_rate_bytes_per_s: rate,
        seed: 7,
    });
    let (before, dst, r, _) = migrate(&w, INFRA_END + wss, |_| {});
    let mon = WorkloadMonitor::new(&dst.mem, 1);
    assert!(mon.is_ready().unwrap());
    std::thread::sleep(Duration::from_millis(50));
    let s = mon.measure_rate(Duration::from_millis(500)).unwrap();
    let after = mon.pages_written().unwrap();
    eprintln!(
        "source stopped at {before} pages; destination at {after}, {:.2} MiB/s",
        s.bytes_per_s() / MIB as f64
    );
    assert!(after > before, "destination made no progress");
    // Continues from the source's count at the target pace (no restart from 0, no burst).
    assert!((s.bytes_per_s() - rate as f64).abs() < rate as f64 * 0.1);
    r.pause().unwrap();
    r.stop().unwrap();
}

#[test]
fn increment_consistent_after_migration() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 16 * MIB;
    let w = Workload::new(WorkloadSpec::Increment {
        wss_bytes: wss,
        dirty_rate_bytes_per_s: 0,
    });
    let (before, dst, r, _) = migrate(&w, INFRA_END + wss, |g| {
        increment_ok(&g.mem, wss / 4096).expect("snapshot taken at the pause");
    });
    std::thread::sleep(Duration::from_millis(300));
    r.pause().unwrap();
    let mon = WorkloadMonitor::new(&dst.mem, 1);
    let after = mon.pages_written().unwrap();
    eprintln!("increment: {before} pages on the source, {after} after the destination ran");
    assert!(
        after > before + wss / 4096,
        "less than one sweep on the destination"
    );
    increment_ok(&dst.mem, wss / 4096).expect("after running on the destination");
    r.stop().unwrap();
}

#[test]
fn lost_page_is_detected() {
    // The checker itself must be able to fail: a stale page breaks the rule.
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 4 * MIB;
    let w = Workload::new(WorkloadSpec::Increment {
        wss_bytes: wss,
        dirty_rate_bytes_per_s: 0,
    });
    let (_, dst, r, _) = migrate(&w, INFRA_END + wss, |_| {});
    std::thread::sleep(Duration::from_millis(100));
    r.pause().unwrap();
    increment_ok(&dst.mem, wss / 4096).unwrap();
    let mut b = [0u8];
    dst.mem.read_at(INFRA_END + 10 * 4096, &mut b).unwrap();
    dst.mem
        .write_at(INFRA_END + 10 * 4096, &[b[0].wrapping_sub(2)])
        .unwrap();
    assert!(increment_ok(&dst.mem, wss / 4096).is_err());
    r.stop().unwrap();
}
