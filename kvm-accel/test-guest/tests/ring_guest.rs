// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A `Guest` in dirty-ring mode on 2 vCPUs: every ring is registered, a sync kicks each vCPU,
//! the reaper thread and the syncs harvest both rings, and the pages the vCPUs wrote reach
//! Migration's bitmap.

mod common;

use std::time::Duration;

use clearlog_bitmap::Bitmap;
use clearlog_kvm::DirtyLogChoice;
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Guest, GuestConfig};
use common::*;

#[test]
fn a_ring_guest_on_two_vcpus_kicks_reaps_and_reports() {
    if !kvm_available() || !ring_available() {
        return;
    }
    let _s = serial();
    let g = Guest::boot(GuestConfig {
        mem_bytes: 64 << 20,
        vcpus: 2,
        dirty_log: DirtyLogChoice::Ring { bytes: 16 << 10 },
        workload: WorkloadSpec::Random {
            wss_bytes: 32 << 20,
            dirty_rate_bytes_per_s: 64 << 20,
            seed: 7,
        },
        ..GuestConfig::default()
    })
    .expect("boot a ring guest");
    assert!(g.protect_mode().is_ring());
    let memory = g.memory();
    memory.log_global_start().unwrap();
    let block = g.block().clone();
    let mut dest = Bitmap::new(block.pages() as usize);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        memory.log_sync_all().unwrap();
        memory.sync_migration_bitmap(&block, &mut dest, None);
    }
    g.pause().unwrap();
    memory.log_sync_all().unwrap();
    memory.sync_migration_bitmap(&block, &mut dest, None);
    let stats = g.vcpu_stats();
    let rings = g.listener().ring_stats();
    let l = g.listener().stats();
    eprintln!(
        "ring guest: {stats:?}\n{rings:?}\n{l:?}; {} pages dirty",
        dest.count_ones()
    );
    // Each sync kicks every vCPU out of KVM_RUN (two kicks landing in one KVM_RUN count once, so
    // a loaded machine may show fewer than 20; none would mean the syncs do not kick).
    assert!(
        stats.iter().all(|s| s.kicks >= 10),
        "the syncs kick every vCPU: {stats:?}"
    );
    assert_eq!(rings.len(), 2, "{rings:?}");
    assert!(rings.iter().all(|r| r.harvested > 0), "{rings:?}");
    assert!(
        l.ring_reaps > 21,
        "the reaper reaped between syncs too: {l:?}"
    );
    assert_eq!(l.ring_foreign, 0, "{l:?}");
    // The guest wrote pages and Migration was told: every harvested page is a working-set page.
    assert!(dest.count_ones() > 100, "{}", dest.count_ones());
    assert_eq!(g.vcpu_failures(), Vec::new());
}
