// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Ring-3 boot, port I/O exits, pause/resume/kick, increment consistency.

mod common;

use std::time::Duration;

use clearlog_test_guest::layout::DOORBELL_ADDR;
use clearlog_test_guest::layout::INFRA_END;
use clearlog_test_guest::vcpu::runner::RunState;
use clearlog_test_guest::workload::monitor::WorkloadMonitor;
use clearlog_test_guest::workload::params::DOORBELL_READY;
use clearlog_test_guest::workload::{Workload, WorkloadSpec};
use clearlog_test_guest::Error;
use common::*;

const MIB: u64 = 1 << 20;

/// Checks QEMU's rule over the first byte of `pages` pages: equal to the predecessor
/// except at most one place where it is one less (mod 256). Returns the violations.
pub fn increment_violations(g: &Guest, pages: u64) -> Vec<String> {
    use clearlog_test_guest::guest_ram::GuestRam;
    let mut bytes = Vec::with_capacity(pages as usize);
    for p in 0..pages {
        let mut b = [0u8];
        g.mem.read_at(INFRA_END + p * 4096, &mut b).unwrap();
        bytes.push(b[0]);
    }
    let mut drops = 0;
    let mut bad = Vec::new();
    for i in 1..bytes.len() {
        if bytes[i] == bytes[i - 1] {
            continue;
        }
        if bytes[i] == bytes[i - 1].wrapping_sub(1) {
            drops += 1;
            if drops > 1 {
                bad.push(format!("second drop at page {i}"));
            }
        } else {
            bad.push(format!("page {i}: {} after {}", bytes[i], bytes[i - 1]));
        }
    }
    bad
}

#[test]
fn ring3_boot_and_doorbell_exit() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let g = Guest::new(None, 2 * MIB, false);
    let r = g.start(&Workload::new(WorkloadSpec::Idle)).pop().unwrap();
    WorkloadMonitor::new(&g.mem, 1)
        .wait_ready(Duration::from_secs(5))
        .unwrap();
    // The doorbell write follows the counter store.
    std::thread::sleep(Duration::from_millis(20));
    let st = r.stats();
    assert_eq!(st.mmio_exits, 1, "{st:?}");
    assert_eq!(st.last_mmio_addr, DOORBELL_ADDR);
    assert_eq!(st.last_mmio_value, u64::from(DOORBELL_READY));
    r.pause().unwrap();
    let regs = r.with_vcpu(|v| v.fd().get_regs().unwrap()).unwrap();
    let sregs = r.with_vcpu(|v| v.fd().get_sregs().unwrap()).unwrap();
    assert_eq!(sregs.cs.dpl, 3, "running in ring 3");
    assert_eq!(sregs.ss.dpl, 3);
    // PVM reports the real flags of guest ring 3 (IOPL 0), not the IOPL=3 we loaded.
    eprintln!("rflags while running: {:#x}", regs.rflags);
    assert!((0x8000..0x10000).contains(&regs.rip), "rip {:#x}", regs.rip);
    r.stop().unwrap();
}

#[test]
fn faulting_guest_reports_failure() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let g = Guest::new(None, 2 * MIB, false);
    // `hlt` in ring 3 raises #GP; there is no IDT, so the vCPU shuts down.
    let w = Workload::new(WorkloadSpec::Image {
        image: vec![0xf4],
        load_gpa: 0x8000,
        entry_gpa: 0x8000,
    });
    let r = g.start(&w).pop().unwrap();
    let mut failed = false;
    for _ in 0..500 {
        if let RunState::Failed(reason) = r.state() {
            eprintln!("ring-3 hlt: {reason}");
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(failed, "state {:?}", r.state());
    assert!(matches!(r.pause(), Err(Error::VcpuFailed { .. })));
    r.stop().unwrap();
}

#[test]
fn ring3_port_io_faults_on_pvm() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let g = Guest::new(None, 2 * MIB, false);
    // mov dx, 0xcf0; out dx, al; jmp $
    let w = Workload::new(WorkloadSpec::Image {
        image: vec![0x66, 0xba, 0xf0, 0x0c, 0xee, 0xeb, 0xfe],
        load_gpa: 0x8000,
        entry_gpa: 0x8000,
    });
    let r = g.start(&w).pop().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Hardware virtualization honours IOPL=3 (an I/O exit); PVM raises #GP (shutdown).
    let st = r.stats();
    let state = r.state();
    eprintln!("ring-3 out: io_exits {} state {state:?}", st.io_exits);
    assert!(
        (st.io_exits == 1 && st.last_out == 0xcf0 << 32) || matches!(state, RunState::Failed(_)),
        "{st:?} {state:?}"
    );
    r.stop().unwrap();
}

#[test]
fn pause_resume_kick() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 16 * MIB;
    let g = Guest::new(None, INFRA_END + wss, false);
    let w = Workload::new(WorkloadSpec::Increment {
        wss_bytes: wss,
        dirty_rate_bytes_per_s: 0,
    });
    let r = g.start(&w).pop().unwrap();
    let mon = WorkloadMonitor::new(&g.mem, 1);
    mon.wait_ready(Duration::from_secs(5)).unwrap();
    assert!(mon.measure_rate(Duration::from_millis(100)).unwrap().pages > 0);

    for round in 0..5 {
        r.pause().unwrap();
        assert_eq!(r.state(), RunState::Paused);
        let a = mon.pages_written().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let b = mon.pages_written().unwrap();
        assert_eq!(a, b, "round {round}: guest ran while paused");
        let bad = increment_violations(&g, wss / 4096);
        assert!(bad.is_empty(), "round {round}: {bad:?}");
        // Double pause is fine; resume when running is an error.
        r.pause().unwrap();
        r.resume().unwrap();
        assert!(matches!(r.resume(), Err(Error::VcpuNotPaused(0))));
        assert!(matches!(r.with_vcpu(|_| ()), Err(Error::VcpuNotPaused(0))));
        let s = mon.measure_rate(Duration::from_millis(50)).unwrap();
        assert!(s.pages > 0, "round {round}: no progress after resume");
    }
    let kicks = r.stats().kicks;
    for _ in 0..20 {
        r.kick().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(r.stats().kicks >= kicks + 10, "kicks {:?}", r.stats());
    assert_eq!(r.state(), RunState::Running);
    let s = mon.measure_rate(Duration::from_millis(50)).unwrap();
    assert!(s.pages > 0);
    let sweeps = mon.sweeps_of(0).unwrap();
    eprintln!(
        "increment unpaced: {:.0} pages/s, {sweeps} sweeps",
        s.pages_per_s()
    );
    let v = r.stop().unwrap();
    assert_eq!(v.index(), 0);
    let bad = increment_violations(&g, wss / 4096);
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn random_writes_iteration_value() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let wss = 8 * MIB;
    let g = Guest::new(None, INFRA_END + wss, false);
    let w = Workload::new(WorkloadSpec::Random {
        wss_bytes: wss,
        dirty_rate_bytes_per_s: 0,
        seed: 42,
    });
    let r = g.start(&w).pop().unwrap();
    let mon = WorkloadMonitor::new(&g.mem, 1);
    mon.wait_ready(Duration::from_secs(5)).unwrap();
    clearlog_test_guest::workload::set_iteration(&g.mem, 7).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    r.pause().unwrap();
    use clearlog_test_guest::guest_ram::GuestRam;
    let mut sevens = 0;
    let written = mon.pages_written().unwrap();
    for p in 0..wss / 4096 {
        let v = g.mem.load_u64(INFRA_END + p * 4096).unwrap();
        assert!(v == 0 || v == 7, "page {p}: {v}");
        let n = g.mem.load_u64(INFRA_END + p * 4096 + 8).unwrap();
        assert!(n <= written, "page {p}: count {n} > {written}");
        sevens += u64::from(v == 7);
    }
    eprintln!("random unpaced: {written} writes, {sevens} pages hold iteration 7");
    assert!(sevens > 1000, "{sevens}");
    r.stop().unwrap();
}

/// Two vCPUs, each sweeping its own part of the working set: the increment rule holds per part
/// at every pause, and each part's first page has been written as often as its own vCPU's
/// counter says (so vCPU `i` writes part `i`, not the whole working set).
#[test]
fn increment_on_two_vcpus_sweeps_own_parts() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    use clearlog_test_guest::guest_ram::GuestRam;
    use clearlog_test_guest::workload::check::check_increment;
    use clearlog_test_guest::workload::params::split_parts;
    let wss = 4 * MIB;
    let g = clearlog_test_guest::Guest::boot(clearlog_test_guest::GuestConfig {
        mem_bytes: 8 * MIB,
        vcpus: 2,
        workload: WorkloadSpec::Increment {
            wss_bytes: wss,
            // Paced, so the two vCPUs sweep at the same known speed on a loaded host.
            dirty_rate_bytes_per_s: 64 * MIB,
        },
        ..Default::default()
    })
    .expect("boot");
    let parts = split_parts(INFRA_END, wss / 4096, 2);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        g.pause().unwrap();
        let c = check_increment(g.ram()).unwrap();
        assert!(c.is_consistent(), "round {round}: {c:?}");
        assert_eq!((c.parts, c.pages), (2, wss / 4096));
        for (i, (start, pages)) in parts.iter().enumerate() {
            let written = g.monitor().pages_written_of(i as u32).unwrap();
            assert!(written > 0, "round {round}: vCPU {i} wrote nothing");
            // Page 0 of the part is written first in each sweep: ceil(written / pages) times,
            // one more if the vCPU stopped between the write and its counter update.
            let expect = written.div_ceil(*pages) as u8;
            let mut b = [0u8];
            g.ram().read_at(*start, &mut b).unwrap();
            assert!(
                b[0] == expect || b[0] == expect.wrapping_add(1),
                "round {round}: part {i} first byte {} but vCPU {i} wrote {written} pages ({expect} sweeps begun)",
                b[0]
            );
        }
        g.resume().unwrap();
    }
    assert!(g.vcpu_failures().is_empty(), "{:?}", g.vcpu_failures());
}
