// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Region tree changes and logging changes notify listeners in order; bad input is an error.

mod common;

use std::sync::{Arc, Mutex};

use clearlog_bitmap::Bitmap;
use clearlog_memory::{ClearBitmap, DirtyClient, Error, MemoryListener, MemorySystem, PAGE_SIZE};
use common::{Call, Recorder};

const P: u64 = PAGE_SIZE;
type Journal = Arc<Mutex<Vec<(String, Call)>>>;

fn take(journal: &Journal) -> Vec<(String, Call)> {
    journal.lock().unwrap().drain(..).collect()
}

fn who(calls: &[(String, Call)]) -> Vec<&str> {
    calls.iter().map(|(w, _)| w.as_str()).collect()
}

#[test]
fn listeners_run_ascending_for_adds_and_descending_for_removals() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    mem.register_listener(Recorder::new("b", 10, &journal))
        .unwrap();
    mem.register_listener(Recorder::new("a", 0, &journal))
        .unwrap();
    mem.register_listener(Recorder::new("c", 0, &journal))
        .unwrap(); // ties keep registration order

    let ram = mem.add_ram("ram", 0, 64 * P).unwrap();
    let calls = take(&journal);
    assert_eq!(who(&calls), ["a", "c", "b"]);
    assert!(calls.iter().all(|(_, c)| *c == Call::Add(0, 64 * P, 0)));

    mem.log_global_start().unwrap();
    let calls = take(&journal);
    assert_eq!(who(&calls), ["a", "c", "b", "a", "c", "b"]);
    assert_eq!(calls[0].1, Call::GlobalStart);
    assert_eq!(calls[3].1, Call::Start(0, 0, 1));

    mem.set_region_logging(ram, DirtyClient::Vga, true).unwrap();
    assert_eq!(take(&journal)[0].1, Call::Start(0, 1, 3));

    mem.log_global_stop().unwrap();
    let calls = take(&journal);
    assert_eq!(who(&calls), ["b", "c", "a", "b", "c", "a"]);
    assert_eq!(calls[0].1, Call::Stop(0, 3, 2));
    assert_eq!(calls[3].1, Call::GlobalStop);

    mem.remove_region(ram).unwrap();
    let calls = take(&journal);
    assert_eq!(who(&calls), ["b", "c", "a"]);
    assert!(calls.iter().all(|(_, c)| *c == Call::Del(0)));
}

#[test]
fn a_new_listener_is_replayed_the_current_state() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    mem.add_ram("ram", 0, 64 * P).unwrap();
    mem.log_global_start().unwrap();
    let journal: Journal = Arc::default();
    mem.register_listener(Recorder::new("late", 0, &journal))
        .unwrap();
    let calls: Vec<Call> = take(&journal).into_iter().map(|(_, c)| c).collect();
    assert_eq!(calls, [Call::GlobalStart, Call::Add(0, 64 * P, 1)]);
}

#[test]
fn overlaying_a_region_replaces_its_section_by_the_visible_pieces() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    mem.register_listener(Recorder::new("kvm", 0, &journal))
        .unwrap();
    mem.add_ram("ram", 0, 64 * P).unwrap();
    let rom = mem.create_ram("rom", 4 * P).unwrap();
    take(&journal);
    mem.map_region(rom, 8 * P, 1).unwrap();
    let calls: Vec<Call> = take(&journal).into_iter().map(|(_, c)| c).collect();
    assert_eq!(
        calls,
        [
            Call::Del(0),
            Call::Add(0, 8 * P, 0),
            Call::Add(8 * P, 4 * P, 0),
            Call::Add(12 * P, 52 * P, 0)
        ]
    );
    let layout: Vec<(u64, u64, u64)> = mem
        .sections()
        .iter()
        .map(|s| (s.guest_addr / P, s.pages(), s.offset_in_block / P))
        .collect();
    assert_eq!(layout, [(0, 8, 0), (8, 4, 0), (12, 52, 12)]);
    mem.unmap_region(rom).unwrap();
    assert_eq!(mem.sections().len(), 1);
}

#[test]
fn a_listener_refusing_a_region_rolls_the_region_back() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let kvm = Recorder::new("kvm", 0, &journal);
    *kvm.fail.lock().unwrap() = Some("region_add");
    mem.register_listener(kvm).unwrap();
    let err = mem.add_ram("ram", 0, 64 * P).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Listener {
                hook: "region_add",
                ..
            }
        ),
        "{err}"
    );
    assert!(mem.sections().is_empty());
    assert!(mem.ram_blocks().is_empty());
    mem.add_ram("ram", 0, 64 * P).unwrap(); // the name and the range are free again
}

#[test]
fn bad_regions_are_errors() {
    let mem = MemorySystem::with_ram_capacity(256 * P);
    assert!(matches!(
        mem.add_ram("r", 1, P),
        Err(Error::NotPageAligned {
            what: "guest address",
            ..
        })
    ));
    assert!(matches!(
        mem.add_ram("r", 0, P + 1),
        Err(Error::NotPageAligned { .. })
    ));
    assert!(matches!(
        mem.add_ram("r", 0, 0),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        mem.add_ram("r", u64::MAX - P + 1, 2 * P),
        Err(Error::AddressOverflow { .. })
    ));
    let ram = mem.add_ram("r", 0, 64 * P).unwrap();
    assert!(matches!(
        mem.add_ram("r", 64 * P, P),
        Err(Error::DuplicateName(_))
    ));
    assert!(
        matches!(mem.add_ram("s", 63 * P, 2 * P), Err(Error::Overlap { existing, .. }) if existing == ram)
    );
    assert!(matches!(
        mem.add_ram("big", 1 << 40, 1024 * P),
        Err(Error::RamSpaceExhausted { .. })
    ));
    assert!(matches!(
        mem.add_alias("a", ram, 60 * P, 8 * P, 1 << 30, 0),
        Err(Error::OutOfRange { .. })
    ));
    let alias = mem.add_alias("a", ram, 0, 8 * P, 1 << 30, 0).unwrap();
    assert!(matches!(
        mem.add_alias("b", alias, 0, P, 2 << 30, 0),
        Err(Error::NotRam(_))
    ));
    assert!(matches!(
        mem.remove_region(ram),
        Err(Error::RegionInUse { .. })
    ));
    assert!(matches!(
        mem.map_region(ram, 1 << 32, 0),
        Err(Error::AlreadyMapped(_))
    ));
    assert!(matches!(
        mem.set_region_logging(ram, DirtyClient::Migration, true),
        Err(Error::NotPerRegionClient(_))
    ));
    mem.remove_region(alias).unwrap();
    mem.remove_region(ram).unwrap();
}

#[test]
fn blocks_are_placed_on_64_page_boundaries_and_freed_space_is_reused() {
    let mem = MemorySystem::with_ram_capacity(1024 * P);
    let a = mem.add_ram("a", 0, 65 * P).unwrap();
    mem.add_ram("b", 1 << 30, 3 * P).unwrap();
    let offsets = |m: &MemorySystem| {
        m.ram_blocks()
            .iter()
            .map(|b| b.ram_page_offset())
            .collect::<Vec<_>>()
    };
    assert_eq!(offsets(&mem), [0, 128]);
    mem.remove_region(a).unwrap();
    mem.add_ram("c", 0, 64 * P).unwrap();
    assert_eq!(offsets(&mem), [0, 128]);
}

#[test]
fn host_writes_reach_every_active_client_and_untracked_writes_none() {
    let mem = MemorySystem::with_ram_capacity(1024 * P);
    let ram = mem.add_ram("ram", 0, 128 * P).unwrap();
    let block = mem.ram_blocks()[0].clone();
    mem.set_region_logging(ram, DirtyClient::Vga, true).unwrap();
    mem.log_global_start().unwrap();
    block.write(70 * P, &[1; 10]).unwrap();
    block.write_untracked(80 * P, &[1; 10]).unwrap();
    for client in [DirtyClient::Migration, DirtyClient::Vga] {
        assert_eq!(
            mem.dirty().client(client).iter_ones().collect::<Vec<_>>(),
            [70],
            "{client:?}"
        );
    }
    assert_eq!(mem.dirty().client(DirtyClient::Code).count_ones(), 0);
    mem.log_global_stop().unwrap();
    mem.set_region_logging(ram, DirtyClient::Vga, false)
        .unwrap();
    assert!(mem.dirty().active_clients().is_empty());
}

#[test]
fn migration_sync_counts_only_new_pages_and_marks_chunks() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    mem.add_ram("pad", 0, P).unwrap();
    mem.add_ram("ram", 1 << 30, 1000 * P).unwrap(); // RAM pages 64..1064; 1000 is not a multiple of 64
    mem.log_global_start().unwrap();
    let block = mem.ram_blocks()[1].clone();
    for p in [0, 1, 63, 64, 500, 999] {
        block.write(p * P, &[1]).unwrap();
    }
    let mut dest = Bitmap::new(1000);
    dest.set(1);
    dest.set(998);
    let mut clear = ClearBitmap::new(1000, 8).unwrap();
    assert_eq!(
        mem.sync_migration_bitmap(&block, &mut dest, Some(&mut clear)),
        5
    );
    assert_eq!(
        dest.iter_ones().collect::<Vec<_>>(),
        [0, 1, 63, 64, 500, 998, 999]
    );
    assert_eq!(
        (0..4).map(|c| clear.test(c)).collect::<Vec<_>>(),
        [true, true, false, true]
    );
    assert_eq!(mem.dirty().client(DirtyClient::Migration).count_ones(), 0);
    assert_eq!(mem.sync_migration_bitmap(&block, &mut dest, None), 0);
    assert!(matches!(
        mem.try_sync_migration_bitmap(&block, &mut Bitmap::new(999), None),
        Err(Error::BitmapTooSmall { .. })
    ));
    let mut small = ClearBitmap::new(100, 6).unwrap();
    mem.try_sync_migration_bitmap(&block, &mut dest, Some(&mut small))
        .unwrap_err();
}

#[test]
fn sync_and_clear_run_concurrently_without_deadlock() {
    let mem = Arc::new(MemorySystem::with_ram_capacity(4096 * P));
    let kernel = Arc::new(Mutex::new(common::ModelKernel::default()));
    let kvm: Arc<dyn MemoryListener> = common::FakeKvm::new(&kernel, true);
    mem.register_listener(kvm).unwrap();
    let ram = mem.add_ram("ram", 0, 512 * P).unwrap();
    mem.set_region_logging(ram, DirtyClient::Vga, true).unwrap();
    mem.log_global_start().unwrap();
    mem.log_sync_all().unwrap();
    let display = {
        let mem = mem.clone();
        std::thread::spawn(move || {
            for _ in 0..200 {
                mem.log_sync(ram).unwrap();
                mem.snapshot_and_clear_dirty(ram, 0, 512 * P, DirtyClient::Vga)
                    .unwrap();
            }
        })
    };
    let block = mem.ram_blocks()[0].clone();
    let mut dest = Bitmap::new(512);
    let mut clear = ClearBitmap::new(512, 6).unwrap();
    for _ in 0..200 {
        mem.log_sync_all().unwrap();
        mem.sync_migration_bitmap(&block, &mut dest, Some(&mut clear));
        for page in (0..512).step_by(64) {
            clear
                .clear_run_before_read(page, 1, |first, n| {
                    mem.clear_dirty_bitmap_block(&block, first * PAGE_SIZE, n * PAGE_SIZE)
                })
                .unwrap();
        }
    }
    display.join().unwrap();
}
