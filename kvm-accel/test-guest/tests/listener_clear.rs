// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `KvmMemoryListener::log_clear` and its slot bookkeeping against the real kernel, through
//! `MemorySystem` (DESIGN.md section 2): partial clears leave the rest of the 64-page word dirty
//! in KVM, slots whose size is not a multiple of 64 pages, clear-before-sync is refused, slot
//! removal and logging stop sync one last time, and the legacy-mode listener.
//!
//! "Dirty in KVM" is observed with a sync while the vCPU is paused: in manual mode a sync is a
//! pure `KVM_GET_DIRTY_LOG` that replaces the slot's cache, so the cache afterwards is exactly
//! the kernel's bitmap (and the Migration client gets the same bits).

mod common;

use clearlog_kvm::CacheError;
use clearlog_kvm::DirtyLogChoice;
use clearlog_kvm::Error;
use clearlog_memory::DirtyClient;
use clearlog_test_guest::layout::INFRA_END;
use common::*;

const PAGE: u64 = 4096;
/// Guest-physical address of the region under test (inside the guest's identity map).
const T_GPA: u64 = 0x20_0000;

const MANUAL: DirtyLogChoice = DirtyLogChoice::Manual {
    initially_set: false,
};

fn pages(r: std::ops::Range<u64>) -> Vec<u64> {
    r.collect()
}

fn cache_pages(mv: &MemVm, gpa: u64) -> Vec<u64> {
    let c = mv
        .listener
        .cache_at(gpa)
        .expect("manual mode, logging on: a cache");
    c.bits().iter_ones().map(|p| p as u64).collect()
}

/// Pauses the vCPU, syncs everything, returns (cache of T, Migration bits of `region` taken).
fn paused_sync(mv: &MemVm, region: clearlog_memory::RegionId) -> (Vec<u64>, Vec<u64>) {
    mv.memory.log_sync_all().unwrap();
    (cache_pages(mv, T_GPA), mv.take_migration(region))
}

#[test]
fn half_clear_leaves_upper_half_dirty_in_kvm() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(MANUAL, INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    let r = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };
    mv.memory.log_sync_all().unwrap();
    assert_eq!(
        mv.take_migration(t),
        Vec::<u64>::new(),
        "no INITIALLY_SET, no writes"
    );

    d.dirty(T_GPA, 64);
    r.pause().unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(0..64), pages(0..64)));

    // Clear pages 0..31: the ioctl covers 0..63 (64-page granularity) with zeros for 32..63.
    let before = mv.listener.stats();
    mv.memory.clear_dirty_bitmap(t, 0, 32 * PAGE).unwrap();
    let after = mv.listener.stats();
    assert_eq!(after.clears - before.clears, 1);
    assert_eq!(after.pages_cleared - before.pages_cleared, 32);
    assert_eq!(
        cache_pages(&mv, T_GPA),
        pages(32..64),
        "cache minus exactly the range"
    );

    // The next GET (no writes: vCPU paused) is the kernel's state: 32..63 still dirty.
    assert_eq!(
        paused_sync(&mv, t),
        (pages(32..64), pages(32..64)),
        "pages 32..63 must stay dirty in KVM, 0..31 must be clean"
    );
    // A second clear of 0..31 before a new sync sends nothing.
    mv.memory.clear_dirty_bitmap(t, 0, 32 * PAGE).unwrap();
    assert_eq!(mv.listener.stats().clears, after.clears);

    // The clear re-armed tracking of 0..31: new writes there show up again.
    r.resume().unwrap();
    d.dirty(T_GPA, 8);
    r.pause().unwrap();
    let expect: Vec<u64> = (0..8).chain(32..64).collect();
    assert_eq!(paused_sync(&mv, t), (expect.clone(), expect));
    r.stop().unwrap();
}

#[test]
fn initially_set_half_clear() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    // No guest at all: INITIALLY_SET makes every page read dirty when logging starts.
    let mv = MemVm::new(
        DirtyLogChoice::Manual {
            initially_set: true,
        },
        INFRA_END,
    );
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(0..64), pages(0..64)));
    mv.memory.clear_dirty_bitmap(t, 0, 32 * PAGE).unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(32..64), pages(32..64)));
    mv.memory
        .clear_dirty_bitmap(t, 40 * PAGE, 24 * PAGE)
        .unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(32..40), pages(32..40)));
}

#[test]
fn region_of_100_pages() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(MANUAL, INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 100 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    let r = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };
    d.dirty(T_GPA, 100);
    r.pause().unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(0..100), pages(0..100)));

    // [70, 80): widened to the word 64..128 clamped at the slot end (64..100), zeros around.
    mv.memory
        .clear_dirty_bitmap(t, 70 * PAGE, 10 * PAGE)
        .unwrap();
    let expect: Vec<u64> = (0..70).chain(80..100).collect();
    assert_eq!(paused_sync(&mv, t), (expect.clone(), expect));

    // [64, 100): the tail of a slot that is not a multiple of 64 pages (num_pages 36).
    mv.memory
        .clear_dirty_bitmap(t, 64 * PAGE, 36 * PAGE)
        .unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(0..64), pages(0..64)));

    // The tail was re-armed: writing it again makes it dirty again.
    r.resume().unwrap();
    d.dirty(T_GPA + 64 * PAGE, 36);
    r.pause().unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(0..100), pages(0..100)));

    // A sub-page-unaligned byte range is widened to whole pages by memory-api: 99 only.
    mv.memory.clear_dirty_bitmap(t, 99 * PAGE + 5, 10).unwrap();
    assert_eq!(paused_sync(&mv, t), (pages(0..99), pages(0..99)));

    // Everything.
    mv.memory.clear_dirty_bitmap(t, 0, 100 * PAGE).unwrap();
    assert_eq!(paused_sync(&mv, t), (vec![], vec![]));
    r.stop().unwrap();
}

fn assert_clear_before_sync(e: &clearlog_memory::Error) {
    assert!(
        matches!(
            kvm_error(e),
            Some(Error::DirtyCache(CacheError::ClearBeforeSync { .. }))
        ),
        "expected ClearBeforeSync, got {e}"
    );
}

#[test]
fn clear_before_sync_is_rejected() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(
        DirtyLogChoice::Manual {
            initially_set: true,
        },
        INFRA_END,
    );
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    // log_global_start does not sync: nothing is known dirty, the clear must be an error.
    let e = mv.memory.clear_dirty_bitmap(t, 0, 64 * PAGE).unwrap_err();
    assert_clear_before_sync(&e);
    // And nothing was cleared in KVM: INITIALLY_SET bits are all still there.
    assert_eq!(paused_sync(&mv, t), (pages(0..64), pages(0..64)));
    mv.memory.clear_dirty_bitmap(t, 0, 64 * PAGE).unwrap();

    // Restarting logging gives the slot a fresh, never-synced cache.
    mv.memory.log_global_stop().unwrap();
    mv.memory.log_global_start().unwrap();
    let e = mv.memory.clear_dirty_bitmap(t, 0, PAGE).unwrap_err();
    assert_clear_before_sync(&e);
    // Migration's chunk clear goes through the same path.
    let block = mv.memory.region_block(t).unwrap().0;
    let e = mv
        .memory
        .clear_dirty_bitmap_block(&block, 0, 64 * PAGE)
        .unwrap_err();
    assert_clear_before_sync(&e);
}

#[test]
fn legacy_clear_before_sync_is_a_no_op() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(DirtyLogChoice::Legacy, INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    // Legacy: nothing to re-arm (the GET does it), so any clear is accepted and does nothing.
    mv.memory.clear_dirty_bitmap(t, 0, 64 * PAGE).unwrap();
    assert_eq!(mv.listener.stats().clears, 0);
    assert!(mv.listener.cache_at(T_GPA).is_none());
}

#[test]
fn removal_and_unmap_sync_first() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(MANUAL, INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    let backing = mv.memory.create_ram("backing", 32 * PAGE).unwrap();
    const A_GPA: u64 = 0x40_0000;
    let alias = mv
        .memory
        .add_alias("alias", backing, 0, 32 * PAGE, A_GPA, 0)
        .unwrap();
    mv.memory.log_global_start().unwrap();
    let r = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };

    // Unmapping a logging region: its slot goes away; the writes since the last sync must
    // reach the Migration client first (no explicit sync here).
    mv.memory.log_sync_all().unwrap();
    mv.take_migration(t);
    d.dirty(T_GPA + 5 * PAGE, 10);
    r.pause().unwrap();
    mv.memory.unmap_region(t).unwrap();
    assert_eq!(mv.listener.slot_id_at(T_GPA), None);
    assert_eq!(mv.client_pages(t, DirtyClient::Migration), pages(5..15));
    mv.memory.map_region(t, T_GPA, 0).unwrap();

    // Removing an alias during logging: the backing block keeps the bits.
    r.resume().unwrap();
    d.dirty(A_GPA + 3 * PAGE, 4);
    r.pause().unwrap();
    mv.memory.remove_region(alias).unwrap();
    assert_eq!(
        mv.client_pages(backing, DirtyClient::Migration),
        pages(3..7)
    );

    // Removing a RAM region while a migration runs is refused (the stream's layout is fixed):
    // the region and its slot stay.
    let err = mv.memory.remove_region(t).unwrap_err();
    assert!(
        matches!(err, clearlog_memory::Error::MigrationInProgress { .. }),
        "{err}"
    );
    assert!(mv.listener.slot_id_at(T_GPA).is_some());

    // Unmapping it again: the listener syncs the slot once (stats) before it goes.
    mv.memory.log_sync_all().unwrap();
    r.resume().unwrap();
    d.dirty(T_GPA, 6);
    r.pause().unwrap();
    let before = mv.listener.stats();
    mv.memory.unmap_region(t).unwrap();
    let after = mv.listener.stats();
    assert_eq!(
        after.syncs - before.syncs,
        1,
        "region_del syncs the slot once"
    );
    // The re-mapped slot got INITIALLY_SET-free logging at region_add: only the 6 writes.
    assert_eq!(after.pages_synced - before.pages_synced, 6);
    r.stop().unwrap();
}

fn global_stop_syncs(choice: DirtyLogChoice) {
    let mv = MemVm::new(choice, INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    let r = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };
    mv.memory.log_sync_all().unwrap();
    mv.take_migration(t);
    d.dirty(T_GPA + 20 * PAGE, 20);
    r.pause().unwrap();
    mv.memory.log_global_stop().unwrap();
    assert_eq!(
        mv.client_pages(t, DirtyClient::Migration),
        pages(20..40),
        "{choice:?}: log_global_stop must sync one last time"
    );
    assert!(mv.listener.cache_at(T_GPA).is_none(), "cache freed");

    // Same for a per-region client (Vga) turning its logging off.
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, true)
        .unwrap();
    mv.memory.log_sync_all().unwrap();
    mv.memory.dirty().client(DirtyClient::Vga).clear_all();
    r.resume().unwrap();
    d.dirty(T_GPA + 50 * PAGE, 3);
    r.pause().unwrap();
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, false)
        .unwrap();
    assert_eq!(mv.client_pages(t, DirtyClient::Vga), pages(50..53));
    r.stop().unwrap();
}

#[test]
fn log_global_stop_syncs_manual() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    global_stop_syncs(MANUAL);
}

#[test]
fn log_global_stop_syncs_legacy() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    global_stop_syncs(DirtyLogChoice::Legacy);
}

#[test]
fn legacy_sync_clears_and_log_clear_is_a_no_op() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(DirtyLogChoice::Legacy, INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    let r = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };
    d.dirty(T_GPA, 64);
    r.pause().unwrap();
    mv.memory.log_sync_all().unwrap();
    assert_eq!(mv.take_migration(t), pages(0..64));
    // The GET cleared the kernel bitmap: a second sync with no writes is empty.
    mv.memory.log_sync_all().unwrap();
    assert_eq!(mv.take_migration(t), Vec::<u64>::new());
    // log_clear does nothing (and no ioctl).
    mv.memory.clear_dirty_bitmap(t, 0, 64 * PAGE).unwrap();
    assert_eq!(mv.listener.stats().clears, 0);
    assert!(mv.listener.cache_at(T_GPA).is_none());
    // The GET re-armed tracking: new writes are seen.
    r.resume().unwrap();
    d.dirty(T_GPA + 10 * PAGE, 4);
    r.pause().unwrap();
    mv.memory.log_sync_all().unwrap();
    assert_eq!(mv.take_migration(t), pages(10..14));
    r.stop().unwrap();
}
