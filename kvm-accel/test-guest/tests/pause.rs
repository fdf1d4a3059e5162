// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `Guest::pause` failure paths on real KVM, with an injected failure of one vCPU's pause.

mod common;

use std::time::{Duration, Instant};

use clearlog_test_guest::vcpu::runner::RunState;
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Error, Guest, GuestConfig};
use common::*;

fn two_vcpu_guest() -> Guest {
    Guest::boot(GuestConfig {
        mem_bytes: 32 << 20,
        vcpus: 2,
        workload: WorkloadSpec::Random {
            wss_bytes: 8 << 20,
            dirty_rate_bytes_per_s: 4 << 20,
            seed: 7,
        },
        ..GuestConfig::default()
    })
    .expect("boot a 2-vCPU guest")
}

fn assert_progress(g: &Guest, what: &str) {
    let before = g.pages_written().unwrap();
    let start = Instant::now();
    while g.pages_written().unwrap() == before {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: the guest makes no progress: {:?}",
            g.vcpu_states()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Finding: a failed pause left vCPUs paused. `Guest::pause` stopped at the first vCPU that
/// failed, and the vCPUs it had already paused were never resumed.
#[test]
fn a_failed_pause_leaves_no_vcpu_paused() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let g = two_vcpu_guest();
    // vCPU 0 pauses fine, vCPU 1's pause fails.
    g.inject_pause_failure(1).unwrap();
    let e = g
        .pause()
        .expect_err("the injected failure must be reported");
    assert!(
        matches!(e, Error::Injected { vcpu: 1, .. }),
        "unexpected error {e}"
    );
    assert_eq!(
        g.vcpu_states(),
        vec![RunState::Running, RunState::Running],
        "after a failed pause every vCPU must run again"
    );
    assert_progress(&g, "after the failed pause");
    // The engine calls resume after a failed pause: nothing is paused, so it is a no-op.
    g.resume().expect("resume after a failed pause");
    assert_eq!(g.vcpu_states(), vec![RunState::Running, RunState::Running]);

    // A pause that works, and resume resumes whatever is paused.
    g.pause().unwrap();
    assert_eq!(g.vcpu_states(), vec![RunState::Paused, RunState::Paused]);
    g.resume().unwrap();
    assert_progress(&g, "after a pause and resume");
    assert!(g.vcpu_failures().is_empty(), "{:?}", g.vcpu_failures());
}
