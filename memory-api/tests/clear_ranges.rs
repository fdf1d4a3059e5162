// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `clear_dirty_bitmap`, `clear_dirty_bitmap_block` and `snapshot_and_clear_dirty` call `log_clear`
//! with exactly the right clipped ranges: regions split into several sections, aliases, ranges that
//! start and end off 64-page boundaries.

mod common;

use std::sync::{Arc, Mutex};

use clearlog_memory::{DirtyClient, Error, MemorySystem, RegionId, PAGE_SIZE};
use common::{Call, Recorder};

const P: u64 = PAGE_SIZE;

type Journal = Arc<Mutex<Vec<(String, Call)>>>;

/// "ram": 300 pages at 0, with a 20-page higher-priority "hole" at page 100: sections of "ram" are
/// pages [0, 100) at 0 and [120, 300) at 120 * P.
fn split_ram() -> (MemorySystem, RegionId, RegionId, Journal) {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    mem.register_listener(Recorder::new("low", 0, &journal))
        .unwrap();
    mem.register_listener(Recorder::new("high", 5, &journal))
        .unwrap();
    let ram = mem.add_ram("ram", 0, 300 * P).unwrap();
    let hole = mem.create_ram("hole", 20 * P).unwrap();
    mem.map_region(hole, 100 * P, 1).unwrap();
    mem.log_global_start().unwrap();
    journal.lock().unwrap().clear();
    (mem, ram, hole, journal)
}

fn clears(journal: &Journal) -> Vec<(String, u64, u64, u64)> {
    journal
        .lock()
        .unwrap()
        .drain(..)
        .filter_map(|(who, c)| match c {
            Call::Clear(gpa, first, n) => Some((who, gpa / P, first, n)),
            _ => None,
        })
        .collect()
}

fn c(who: &str, gpa_page: u64, first: u64, n: u64) -> (String, u64, u64, u64) {
    (who.to_owned(), gpa_page, first, n)
}

#[test]
fn clear_is_clipped_per_section_and_listener_order_is_ascending() {
    let (mem, ram, _, journal) = split_ram();
    // Pages [70, 170): 30 pages of the first section, the hole is not "ram", 50 pages of the second.
    mem.clear_dirty_bitmap(ram, 70 * P, 100 * P).unwrap();
    assert_eq!(
        clears(&journal),
        [
            c("low", 0, 70, 30),
            c("low", 120, 0, 50),
            c("high", 0, 70, 30),
            c("high", 120, 0, 50)
        ]
    );
}

#[test]
fn clear_of_unaligned_bytes_covers_the_touched_pages() {
    let (mem, ram, _, journal) = split_ram();
    mem.clear_dirty_bitmap(ram, 63 * P + 5, P).unwrap(); // bytes in pages 63 and 64
    assert_eq!(clears(&journal), [c("low", 0, 63, 2), c("high", 0, 63, 2)]);
    mem.clear_dirty_bitmap(ram, 299 * P, P).unwrap(); // the last page, off a 64 boundary
    assert_eq!(
        clears(&journal),
        [c("low", 120, 179, 1), c("high", 120, 179, 1)]
    );
}

#[test]
fn clear_inside_the_hole_reaches_no_section_of_ram() {
    let (mem, ram, hole, journal) = split_ram();
    mem.clear_dirty_bitmap(ram, 100 * P, 20 * P).unwrap();
    assert!(clears(&journal).is_empty());
    mem.clear_dirty_bitmap(hole, 0, 20 * P).unwrap();
    assert_eq!(
        clears(&journal),
        [c("low", 100, 0, 20), c("high", 100, 0, 20)]
    );
}

#[test]
fn clear_by_block_matches_clear_by_region() {
    let (mem, ram, _, journal) = split_ram();
    let block = mem.region_block(ram).unwrap().0;
    mem.clear_dirty_bitmap_block(&block, 64 * P, 128 * P)
        .unwrap();
    assert_eq!(
        clears(&journal),
        [
            c("low", 0, 64, 36),
            c("low", 120, 0, 72),
            c("high", 0, 64, 36),
            c("high", 120, 0, 72)
        ]
    );
}

#[test]
fn snapshot_widens_to_64_pages_and_clears_the_widened_range() {
    let (mem, ram, _, journal) = split_ram();
    let migration = mem.dirty().client(DirtyClient::Migration);
    let ram0 = mem.region_block(ram).unwrap().0.ram_page_offset() as usize;
    for p in [63, 64, 70, 150, 191, 192] {
        migration.set(ram0 + p);
    }
    let snap = mem
        .snapshot_and_clear_dirty(ram, 70 * P, 100 * P, DirtyClient::Migration)
        .unwrap();
    assert_eq!((snap.start(), snap.len()), (64 * P, 128 * P));
    assert_eq!(
        snap.dirty_offsets().map(|o| o / P).collect::<Vec<_>>(),
        [64, 70, 150, 191]
    );
    assert!(snap.is_dirty(64 * P) && !snap.is_dirty(63 * P) && !snap.is_dirty(192 * P));
    // Bits outside the widened range stay with the client.
    assert_eq!(
        migration.iter_ones().map(|b| b - ram0).collect::<Vec<_>>(),
        [63, 192]
    );
    assert_eq!(
        clears(&journal),
        [
            c("low", 0, 64, 36),
            c("low", 120, 0, 72),
            c("high", 0, 64, 36),
            c("high", 120, 0, 72)
        ]
    );
}

#[test]
fn snapshot_widening_is_clamped_at_the_block_end() {
    let (mem, ram, _, journal) = split_ram();
    let snap = mem
        .snapshot_and_clear_dirty(ram, 290 * P, 5 * P, DirtyClient::Migration)
        .unwrap();
    assert_eq!((snap.start(), snap.len()), (256 * P, 44 * P));
    assert_eq!(
        clears(&journal),
        [c("low", 120, 136, 44), c("high", 120, 136, 44)]
    );
}

#[test]
fn aliases_are_cleared_through_their_target_and_widening_stays_inside_the_alias() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    mem.register_listener(Recorder::new("kvm", 0, &journal))
        .unwrap();
    let ram = mem.create_ram("pc.ram", 256 * P).unwrap();
    let a1 = mem.add_alias("low", ram, 10 * P, 100 * P, 0, 0).unwrap();
    mem.add_alias("high", ram, 110 * P, 50 * P, 0x1_0000_0000, 0)
        .unwrap();
    mem.set_region_logging(ram, DirtyClient::Vga, true).unwrap();
    journal.lock().unwrap().clear();

    mem.clear_dirty_bitmap(ram, 0, 256 * P).unwrap();
    assert_eq!(
        clears(&journal),
        [c("kvm", 0, 0, 100), c("kvm", 0x1_0000_0000 / P, 0, 50)]
    );

    // Alias pages 5..15 = block pages 15..25: widened to block pages [0, 64), clipped to the alias
    // window [10, 110) of the block.
    let snap = mem
        .snapshot_and_clear_dirty(a1, 5 * P, 10 * P, DirtyClient::Vga)
        .unwrap();
    assert_eq!((snap.start(), snap.len()), (0, 54 * P));
    assert_eq!(clears(&journal), [c("kvm", 0, 0, 54)]);
}

/// The id of a region `mem` no longer has: an alias of `target`, added and removed.
fn removed_region(mem: &MemorySystem, target: RegionId, journal: &Journal) -> RegionId {
    let gone = mem.add_alias("gone", target, 0, P, 1000 * P, 0).unwrap();
    mem.remove_region(gone).unwrap();
    journal.lock().unwrap().clear();
    gone
}

#[test]
fn mistakes_are_errors() {
    let (mem, ram, _, journal) = split_ram();
    let gone = removed_region(&mem, ram, &journal);
    assert!(matches!(
        mem.clear_dirty_bitmap(ram, 299 * P, 2 * P),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        mem.clear_dirty_bitmap(ram, u64::MAX, 2),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        mem.clear_dirty_bitmap(gone, 0, P),
        Err(Error::UnknownRegion(_))
    ));
    assert!(matches!(
        mem.snapshot_and_clear_dirty(ram, 0, P, DirtyClient::Vga),
        Err(Error::LoggingOff {
            client: Some(DirtyClient::Vga),
            ..
        })
    ));
    mem.log_global_stop().unwrap();
    assert!(matches!(
        mem.clear_dirty_bitmap(ram, 0, P),
        Err(Error::LoggingOff { client: None, .. })
    ));
    let block = mem.region_block(ram).unwrap().0;
    assert!(matches!(
        mem.clear_dirty_bitmap_block(&block, 0, P),
        Err(Error::LoggingOff { .. })
    ));
    let unmapped = mem.create_ram("unmapped", 64 * P).unwrap();
    assert!(matches!(
        mem.clear_dirty_bitmap(unmapped, 0, P),
        Err(Error::NotMapped(_))
    ));
    let other = MemorySystem::with_ram_capacity(1024 * P);
    other.add_ram("ram", 0, P).unwrap();
    let foreign = other.ram_blocks()[0].clone();
    assert!(matches!(
        mem.clear_dirty_bitmap_block(&foreign, 0, P),
        Err(Error::UnknownBlock(_))
    ));
}
