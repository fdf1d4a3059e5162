// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `KvmMemoryListener::log_clear` and its slot bookkeeping against the real kernel, through
//! `MemorySystem` (docs/design.md section 2): partial clears leave the rest of the 64-page word dirty
//! in KVM, slots whose size is not a multiple of 64 pages, clear-before-sync clears nothing (and
//! is no error), a remap between a sync and a chunk clear loses nothing, slot removal and logging
//! stop sync one last time, and the legacy-mode listener.
//!
//! "Dirty in KVM" is observed with a sync while the vCPU is paused: in manual mode a sync is a
//! pure `KVM_GET_DIRTY_LOG` that replaces the slot's cache, so the cache afterwards is exactly
//! the kernel's bitmap (and the Migration client gets the same bits).

mod common;

use clearlog_kvm::KvmDirtyLogMode;
use clearlog_memory::DirtyClient;
use clearlog_test_guest::layout::INFRA_END;
use common::*;

const PAGE: u64 = 4096;
/// Guest-physical address of the region under test (inside the guest's identity map).
const T_GPA: u64 = 0x20_0000;

const MANUAL: Option<KvmDirtyLogMode> = Some(KvmDirtyLogMode::Manual {
    initially_set: false,
});

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
        Some(KvmDirtyLogMode::Manual {
            initially_set: true,
        }),
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

/// A clear before the slot's first sync since logging started: Ok, and no ioctl.
fn assert_clear_before_sync_is_a_no_op(
    mv: &MemVm,
    clear: impl FnOnce() -> Result<(), clearlog_memory::Error>,
) {
    let before = mv.listener.stats();
    if let Err(e) = clear() {
        panic!("a clear before any sync must be a no-op, got {e}");
    }
    let after = mv.listener.stats();
    assert_eq!(after.clears, before.clears, "no KVM_CLEAR_DIRTY_LOG");
    assert_eq!(after.clears_before_sync, before.clears_before_sync + 1);
}

/// (Was `clear_before_sync_is_rejected`: since the remap finding, a clear of a never-synced slot
/// is a no-op of the listener, not an error; nothing may be cleared in KVM either way.)
#[test]
fn clear_before_sync_clears_nothing() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(
        Some(KvmDirtyLogMode::Manual {
            initially_set: true,
        }),
        INFRA_END,
    );
    let t = mv.memory.add_ram("t", T_GPA, 64 * PAGE).unwrap();
    mv.memory.log_global_start().unwrap();
    // log_global_start does not sync: nothing is known dirty, the clear does nothing.
    assert_clear_before_sync_is_a_no_op(&mv, || mv.memory.clear_dirty_bitmap(t, 0, 64 * PAGE));
    // And nothing was cleared in KVM: INITIALLY_SET bits are all still there.
    assert_eq!(paused_sync(&mv, t), (pages(0..64), pages(0..64)));
    mv.memory.clear_dirty_bitmap(t, 0, 64 * PAGE).unwrap();

    // Restarting logging gives the slot a fresh, never-synced cache.
    mv.memory.log_global_stop().unwrap();
    mv.memory.log_global_start().unwrap();
    assert_clear_before_sync_is_a_no_op(&mv, || mv.memory.clear_dirty_bitmap(t, 0, PAGE));
    // Migration's chunk clear goes through the same path.
    let block = mv.memory.region_block(t).unwrap().0;
    assert_clear_before_sync_is_a_no_op(&mv, || {
        mv.memory.clear_dirty_bitmap_block(&block, 0, 64 * PAGE)
    });
    // INITIALLY_SET on the restart: all 64 still dirty, none cleared by the no-op clears.
    assert_eq!(paused_sync(&mv, t), (pages(0..64), pages(0..64)));
}

/// Finding 1: remapping a RAM region during a migration killed it. The sequence of a migration
/// pass (sync, take Migration's bits, then clear each chunk before reading it) with an unmap +
/// map of the region between the sync and the chunk clear: the new slot's cache was never
/// synced and the clear was refused (`ClearBeforeSync`). Now the clear is a no-op, and no write
/// is lost: those made before the unmap reach Migration through region_del's sync, those made on
/// the new slot through its own syncs.
fn remap_between_sync_and_clear(choice: Option<KvmDirtyLogMode>) {
    let mv = MemVm::new(choice, INFRA_END);
    let t = mv.memory.add_ram("t", T_GPA, 128 * PAGE).unwrap();
    let block = mv.memory.region_block(t).unwrap().0;
    mv.memory.log_global_start().unwrap();
    let r = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };
    let mut to_send = clearlog_bitmap::Bitmap::new(128);
    let mut clear = clearlog_memory::ClearBitmap::new(128, 6).unwrap();
    let pass = |to_send: &mut clearlog_bitmap::Bitmap,
                clear: &mut clearlog_memory::ClearBitmap,
                remap: bool| {
        mv.memory.log_sync_all().unwrap();
        mv.memory
            .try_sync_migration_bitmap(&block, to_send, Some(&mut *clear))
            .unwrap();
        let dirty: Vec<u64> = to_send.iter_ones().map(|p| p as u64).collect();
        if remap {
            mv.memory.unmap_region(t).unwrap();
            mv.memory.map_region(t, T_GPA, 0).unwrap();
        }
        for &p in &dirty {
            clear
                .clear_run_before_read(p, 1, |first, n| {
                    mv.memory
                        .clear_dirty_bitmap_block(&block, first * PAGE, n * PAGE)
                })
                .unwrap_or_else(|e| panic!("{choice:?}: chunk clear of page {p} failed: {e}"));
            to_send.clear(p as usize);
        }
        dirty
    };
    // Drain what logging start reports (INITIALLY_SET: everything).
    pass(&mut to_send, &mut clear, false);
    pass(&mut to_send, &mut clear, false);

    d.dirty(T_GPA, 10); // pages 0..10, reported by the next sync
    let before = mv.listener.stats();
    // The written pages of chunk 0 are known; before their chunk is cleared, the region is
    // remapped, and the guest writes more: 64..69 on the old slot, right before the unmap...
    mv.memory.log_sync_all().unwrap();
    mv.memory
        .try_sync_migration_bitmap(&block, &mut to_send, Some(&mut clear))
        .unwrap();
    let reported: Vec<u64> = to_send.iter_ones().map(|p| p as u64).collect();
    assert!(
        (0..10).all(|p| reported.contains(&p)),
        "{choice:?}: {reported:?}"
    );
    d.dirty(T_GPA + 64 * PAGE, 5);
    mv.memory.unmap_region(t).unwrap();
    mv.memory.map_region(t, T_GPA, 0).unwrap();
    for p in reported {
        clear
            .clear_run_before_read(p, 1, |first, n| {
                mv.memory
                    .clear_dirty_bitmap_block(&block, first * PAGE, n * PAGE)
            })
            .unwrap_or_else(|e| panic!("{choice:?}: chunk clear after the remap failed: {e}"));
        to_send.clear(p as usize);
    }
    if choice != Some(KvmDirtyLogMode::Legacy) {
        assert!(
            mv.listener.stats().clears_before_sync > before.clears_before_sync,
            "{choice:?}: the clear of the new slot should have been a counted no-op"
        );
    }
    // ...and 0..3 and 100..102 on the new slot, after the "send".
    d.dirty(T_GPA, 3);
    d.dirty(T_GPA + 100 * PAGE, 2);
    r.pause().unwrap();
    let got = pass(&mut to_send, &mut clear, false);
    for p in (64..69).chain(0..3).chain(100..102) {
        assert!(
            got.contains(&p),
            "{choice:?}: LOST WRITE: page {p} written around the remap is not reported: {got:?}"
        );
    }
    // Once more with the remap inside a pass, the vCPU running again.
    r.resume().unwrap();
    d.dirty(T_GPA + 70 * PAGE, 4);
    pass(&mut to_send, &mut clear, true);
    d.dirty(T_GPA + 71 * PAGE, 1);
    r.pause().unwrap();
    let got = pass(&mut to_send, &mut clear, false);
    assert!(
        got.contains(&71),
        "{choice:?}: LOST WRITE: page 71: {got:?}"
    );
    r.stop().unwrap();
}

#[test]
fn remapping_a_region_during_migration_does_not_kill_it() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    remap_between_sync_and_clear(Some(KvmDirtyLogMode::Legacy));
    if !manual_available() {
        return;
    }
    remap_between_sync_and_clear(MANUAL);
    remap_between_sync_and_clear(Some(KvmDirtyLogMode::Manual {
        initially_set: true,
    }));
}

#[test]
fn legacy_clear_before_sync_is_a_no_op() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(Some(KvmDirtyLogMode::Legacy), INFRA_END);
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
    // reach the Migration client first (no explicit sync here): the final sync reports them, and
    // then the whole range is marked (a vCPU could have written after that sync).
    mv.memory.log_sync_all().unwrap();
    mv.take_migration(t);
    d.dirty(T_GPA + 5 * PAGE, 10);
    r.pause().unwrap();
    let before = mv.listener.stats();
    mv.memory.unmap_region(t).unwrap();
    let after = mv.listener.stats();
    assert_eq!(mv.listener.slot_id_at(T_GPA), None);
    assert_eq!(after.syncs - before.syncs, 1, "one final sync");
    assert_eq!(after.pages_synced - before.pages_synced, 10, "pages 5..15");
    assert_eq!(mv.client_pages(t, DirtyClient::Migration), pages(0..64));
    mv.memory.map_region(t, T_GPA, 0).unwrap();

    // Removing an alias during logging: the backing block keeps the bits (its final sync's, and
    // then the whole aliased range).
    r.resume().unwrap();
    d.dirty(A_GPA + 3 * PAGE, 4);
    r.pause().unwrap();
    mv.take_migration(backing);
    let before = mv.listener.stats();
    mv.memory.remove_region(alias).unwrap();
    let after = mv.listener.stats();
    assert_eq!(after.pages_synced - before.pages_synced, 4, "pages 3..7");
    assert_eq!(
        mv.client_pages(backing, DirtyClient::Migration),
        pages(0..32)
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

fn global_stop_syncs(choice: Option<KvmDirtyLogMode>) {
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
    let before = mv.listener.stats();
    mv.memory.log_global_stop().unwrap();
    let after = mv.listener.stats();
    // One final sync per logging section (low and t); t's reports pages 20..40 (low's, the
    // dirtier's counters), then every page of t is marked (logging is off: later writes are
    // in no bitmap).
    assert_eq!(
        after.syncs - before.syncs,
        2,
        "{choice:?}: one final sync per section"
    );
    assert!(
        after.pages_synced - before.pages_synced >= 20,
        "{choice:?}: log_global_stop must sync one last time"
    );
    assert_eq!(mv.client_pages(t, DirtyClient::Migration), pages(0..64));
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
    let before = mv.listener.stats();
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, false)
        .unwrap();
    let after = mv.listener.stats();
    assert_eq!(after.syncs - before.syncs, 1);
    assert_eq!(after.pages_synced - before.pages_synced, 3, "pages 50..53");
    assert_eq!(mv.client_pages(t, DirtyClient::Vga), pages(0..64));
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
    global_stop_syncs(Some(KvmDirtyLogMode::Legacy));
}

#[test]
fn legacy_sync_clears_and_log_clear_is_a_no_op() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let mv = MemVm::new(Some(KvmDirtyLogMode::Legacy), INFRA_END);
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

/// Finding 5: a running vCPU may write a page between the last GET of a slot and its deletion (or
/// its logging switched off); that write is in no bitmap any more. So after the slot goes (or
/// stops logging) its whole range must be dirty for the clients that were logging it, not only
/// the pages the final sync saw.
#[test]
fn unmapping_or_stopping_logging_marks_the_whole_range_dirty() {
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
    mv.take_migration(t);
    // Written after the last sync, with the vCPU still running while the region goes.
    d.dirty(T_GPA + 5 * PAGE, 1);
    mv.memory.unmap_region(t).unwrap();
    assert_eq!(
        mv.client_pages(t, DirtyClient::Migration),
        pages(0..64),
        "after its slot is deleted, every page of a logging region must be dirty for Migration"
    );
    mv.memory.map_region(t, T_GPA, 0).unwrap();
    mv.memory.log_global_stop().unwrap();

    // A display (Vga) turning its logging off while the vCPU runs.
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, true)
        .unwrap();
    mv.memory.log_sync_all().unwrap();
    mv.memory.dirty().client(DirtyClient::Vga).clear_all();
    d.dirty(T_GPA + 50 * PAGE, 1);
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, false)
        .unwrap();
    assert_eq!(
        mv.client_pages(t, DirtyClient::Vga),
        pages(0..64),
        "after its logging is off, every page of the region must be dirty for Vga"
    );
    r.stop().unwrap();
}
