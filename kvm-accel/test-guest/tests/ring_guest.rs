// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A `Guest` in dirty-ring mode on 2 vCPUs: every ring is registered, a sync kicks each vCPU,
//! the reaper thread and the syncs harvest both rings, and the pages the vCPUs wrote reach
//! Migration's bitmap.

mod common;

use std::time::Duration;

use clearlog_bitmap::Bitmap;
use clearlog_kvm::KvmDirtyLogMode;
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
        dirty_log: Some(KvmDirtyLogMode::Ring { bytes: 16 << 10 }),
        workload: WorkloadSpec::Random {
            wss_bytes: 32 << 20,
            dirty_rate_bytes_per_s: 64 << 20,
            seed: 7,
        },
        ..GuestConfig::default()
    })
    .expect("boot a ring guest");
    assert!(g.dirty_log_mode().is_ring());
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

/// Finding 5, ring mode: unmapping a logging region (`region_del`) and switching its logging off
/// (`log_stop`) reaped the rings without the kick that `log_sync` does first, so entries the CPU
/// still buffered (PML) were not in the rings; and writes after the reap were lost with the
/// slot. The test's kick stands in for that flush: the vCPU writes a page when kicked.
#[test]
fn ring_region_removal_and_logging_stop_kick_before_their_reap() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use clearlog_memory::DirtyClient;
    use clearlog_test_guest::guest_ram::RawGuestRam;
    use clearlog_test_guest::layout::INFRA_END;

    const PAGE: u64 = 4096;
    const T_GPA: u64 = 0x20_0000;
    if !kvm_available() || !ring_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(Some(KvmDirtyLogMode::Ring { bytes: 16 << 10 }), INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    let r = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };
    // The kick: when armed with (page address, dirtier round), the vCPU writes that page (what
    // a kicked vCPU's exit flushes to its ring).
    let kicks = Arc::new(AtomicU64::new(0));
    let armed: Arc<Mutex<Option<(u64, u64)>>> = Arc::new(Mutex::new(None));
    {
        let (kicks, armed, block) = (kicks.clone(), armed.clone(), mv.low_block.clone());
        mv.listener.set_ring_kick(Arc::new(move || {
            kicks.fetch_add(1, Ordering::Relaxed);
            if let Some((gpa, round)) = armed.lock().unwrap().take() {
                // SAFETY: `block` (an Arc kept by this closure) owns the page-aligned RW mapping
                // of `block.size()` bytes for as long as `ram` exists.
                let ram = unsafe { RawGuestRam::new(block.host_addr() as *mut u8, block.size()) };
                Dirtier { mem: &ram, round }.dirty(gpa, 1);
            }
        }));
    }
    mv.memory.log_sync_all().unwrap();
    mv.take_migration(t);
    d.dirty(T_GPA + 3 * PAGE, 1);
    *armed.lock().unwrap() = Some((T_GPA + 9 * PAGE, d.round));
    let before = kicks.load(Ordering::Relaxed);
    mv.memory.unmap_region(t).unwrap();
    assert!(
        kicks.load(Ordering::Relaxed) > before,
        "region_del must kick the vCPUs before its reap"
    );
    d.round += 1; // the kick's write
    let got = mv.client_pages(t, DirtyClient::Migration);
    assert!(
        got.contains(&3) && got.contains(&9),
        "the pages written after the last sync: {got:?}"
    );
    assert_eq!(got, (0..64).collect::<Vec<_>>(), "the whole range is dirty");
    mv.memory.map_region(t, T_GPA, 0).unwrap();
    mv.memory.log_global_stop().unwrap();

    // log_stop of a display client.
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, true)
        .unwrap();
    mv.memory.log_sync_all().unwrap();
    mv.memory.dirty().client(DirtyClient::Vga).clear_all();
    *armed.lock().unwrap() = Some((T_GPA + 20 * PAGE, d.round));
    let before = kicks.load(Ordering::Relaxed);
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, false)
        .unwrap();
    assert!(
        kicks.load(Ordering::Relaxed) > before,
        "log_stop must kick the vCPUs before its reap"
    );
    let got = mv.client_pages(t, DirtyClient::Vga);
    assert!(got.contains(&20), "the page the kick flushed: {got:?}");
    assert_eq!(got, (0..64).collect::<Vec<_>>(), "the whole range is dirty");
    r.stop().unwrap();
}
