// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Dirty epochs (`DirtyEpochs`) over the model accelerator (the per-slot cache of docs/design.md
//! section 2, `KVM_DIRTY_LOG_INITIALLY_SET`) next to a migration, and over a VMM's vm-memory.
//! The random interleavings with migration and a display are in `no_lost_write.rs`.

mod common;

use std::sync::{Arc, Mutex};

use clearlog_bitmap::Bitmap;
use clearlog_memory::{
    DirtyBitmap, DirtyClient, DirtyEpochs, MemorySystem, RamBlock, RegionId, PAGE_SIZE,
};
use common::{FakeKvm, ModelKernel};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGES: u64 = 256;

struct Rig {
    mem: MemorySystem,
    kernel: Arc<Mutex<ModelKernel>>,
    ram: RegionId,
    block: Arc<RamBlock>,
}

impl Rig {
    fn new() -> Rig {
        let mem = MemorySystem::with_ram_capacity(1024 * PAGE_SIZE);
        let kernel = Arc::new(Mutex::new(ModelKernel::default()));
        mem.register_listener(FakeKvm::new(&kernel, true)).unwrap();
        let ram = mem.add_ram("ram", 0, PAGES * PAGE_SIZE).unwrap();
        let block = mem.region_block(ram).unwrap().0;
        Rig {
            mem,
            kernel,
            ram,
            block,
        }
    }

    /// A guest store: only the (model) kernel's dirty log sees it.
    fn guest_write(&self, page: u64) {
        self.kernel.lock().unwrap().guest_write(0, page);
    }

    /// Migration's sync: every listener's `log_sync`, then its bits into `to_send`.
    fn migration_sync(&self, to_send: &mut Bitmap) {
        self.mem.log_sync_all().unwrap();
        self.mem.sync_migration_bitmap(&self.block, to_send, None);
    }

    /// Migration re-arms a 64-page chunk before reading it.
    fn migration_clear_chunk(&self, page: u64) {
        let first = page & !63;
        self.mem
            .clear_dirty_bitmap_block(&self.block, first * PAGE_SIZE, 64 * PAGE_SIZE)
            .unwrap();
    }
}

/// With INITIALLY_SET the first sync reports every page: the baseline of `open` takes it, so the
/// first delta holds only what was written after `open`.
#[test]
fn the_first_delta_holds_only_writes_after_open() {
    let rig = Rig::new();
    rig.guest_write(1);
    let mut epochs = DirtyEpochs::open(&rig.mem).unwrap();
    rig.guest_write(5);
    rig.guest_write(PAGES - 1);
    let e0 = epochs.advance().unwrap();
    let id = rig.block.id();
    assert_eq!(e0.iter().collect::<Vec<_>>(), [(id, 5), (id, PAGES - 1)]);
    rig.guest_write(5);
    assert_eq!(
        epochs.advance().unwrap().iter().collect::<Vec<_>>(),
        [(id, 5)]
    );
    assert_eq!(epochs.advance().unwrap().dirty_pages(), 0);
}

/// A migration synced page 9 before the tracker opened (the bit sits in the accelerator's cache,
/// folded into Migration only, the page still writable). The guest writes page 9 again after
/// `open` (no new dirty bit: the page is writable), then the migration re-arms the chunk. Were
/// the cache not emptied by `open`'s baseline, that re-arm would hide the write from Snapshot.
#[test]
fn a_bit_cached_before_open_cannot_hide_a_later_write() {
    let rig = Rig::new();
    rig.mem.log_global_start().unwrap();
    let mut to_send = Bitmap::new(PAGES as usize);
    rig.migration_sync(&mut to_send); // INITIALLY_SET: everything
    rig.mem
        .clear_dirty_bitmap_block(&rig.block, 0, rig.block.size())
        .unwrap();
    to_send.fill(false);
    rig.guest_write(9);
    rig.migration_sync(&mut to_send); // page 9 in the cache, folded into Migration only
    assert!(to_send.test(9));

    let mut epochs = DirtyEpochs::open(&rig.mem).unwrap();
    rig.guest_write(9); // after open
    rig.migration_clear_chunk(9); // migration re-arms, then sends page 9
    let e0 = epochs.advance().unwrap();
    assert!(
        e0.is_dirty(rig.block.id(), 9),
        "page 9, written after open, is missing from epoch 0"
    );
}

/// A migration that starts and stops while the tracker is open: both clients see every write
/// made while they log, whichever clears first.
#[test]
fn a_migration_during_the_epochs_and_neither_hides_writes_from_the_other() {
    let rig = Rig::new();
    let mut epochs = DirtyEpochs::open(&rig.mem).unwrap();
    let id = rig.block.id();
    rig.mem.log_global_start().unwrap();
    let mut to_send = Bitmap::new(PAGES as usize);
    rig.migration_sync(&mut to_send);
    rig.mem
        .clear_dirty_bitmap_block(&rig.block, 0, rig.block.size())
        .unwrap();
    to_send.fill(false);
    epochs.advance().unwrap();

    // Migration clears first, then the epoch ends.
    rig.guest_write(3);
    rig.migration_sync(&mut to_send);
    rig.migration_clear_chunk(3);
    rig.guest_write(3); // after Migration's re-arm
    let e = epochs.advance().unwrap();
    assert!(e.is_dirty(id, 3));
    to_send.fill(false);
    rig.migration_sync(&mut to_send);
    assert!(
        to_send.test(3),
        "the advance's re-arm hid page 3 from Migration"
    );

    // The epoch ends first, then Migration clears.
    rig.guest_write(70);
    rig.mem.log_sync(rig.ram).unwrap();
    let e = epochs.advance().unwrap(); // takes 70, re-arms it
    assert!(e.is_dirty(id, 70));
    rig.guest_write(70); // after the advance's re-arm
    rig.migration_clear_chunk(70);
    assert!(
        epochs.advance().unwrap().is_dirty(id, 70),
        "Migration's re-arm hid page 70 from the next epoch"
    );

    // The migration ends; the epochs go on.
    rig.mem.log_global_stop().unwrap();
    assert!(rig.mem.sections()[0].log.contains(DirtyClient::Snapshot));
    rig.guest_write(100);
    assert_eq!(
        epochs.advance().unwrap().iter().collect::<Vec<_>>(),
        [(id, 100)]
    );
}

/// Writes a VMM makes through its own vm-memory `GuestMemoryMmap<DirtyBitmap>` (device emulation,
/// DMA) are in the epoch they land in.
#[test]
fn vmm_writes_through_vm_memory_are_in_their_epoch() {
    let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    mem.add_guest_memory(&gm).unwrap();
    let id = mem.ram_blocks()[0].id();
    gm.write_obj(1u64, GuestAddress(0x1000)).unwrap(); // before open
    let mut epochs = DirtyEpochs::open(&mem).unwrap();
    gm.write_obj(0xdead_beef_u32, GuestAddress(0x3ffe)).unwrap(); // pages 3 and 4
    let e0 = epochs.advance().unwrap();
    assert_eq!(e0.iter().collect::<Vec<_>>(), [(id, 3), (id, 4)]);
    gm.write_slice(&[7; 10], GuestAddress(0x3f000)).unwrap();
    let e1 = epochs.advance().unwrap();
    assert_eq!(e1.iter().collect::<Vec<_>>(), [(id, 63)]);
    drop(epochs);
    assert!(!mem.dirty().active_clients().contains(DirtyClient::Snapshot));
}

/// Aliases and remaps while the tracker is open (allowed, as during a migration): an alias logs
/// for Snapshot at once and a guest write through it is in the block's delta; a write just before
/// an unmap reaches the delta through the section's last sync; a region mapped again is tracked.
#[test]
fn aliases_and_remaps_during_the_epochs() {
    const HI: u64 = 0x1_0000_0000;
    let rig = Rig::new();
    let id = rig.block.id();
    let mut epochs = DirtyEpochs::open(&rig.mem).unwrap();
    let alias = rig
        .mem
        .add_alias("hi", rig.ram, 64 * PAGE_SIZE, 64 * PAGE_SIZE, HI, 0)
        .unwrap();
    assert!(rig.mem.sections()[1].log.contains(DirtyClient::Snapshot));
    epochs.advance().unwrap(); // the alias's new slot: INITIALLY_SET reports all of it once
    rig.kernel.lock().unwrap().guest_write(HI, 2); // block page 66, through the alias
    let e = epochs.advance().unwrap();
    assert_eq!(e.iter().collect::<Vec<_>>(), [(id, 66)]);

    rig.mem.remove_region(alias).unwrap();
    rig.guest_write(5);
    rig.mem.unmap_region(rig.ram).unwrap(); // its last sync folds page 5
    assert_eq!(
        epochs.advance().unwrap().iter().collect::<Vec<_>>(),
        [(id, 5)]
    );
    rig.mem.map_region(rig.ram, 0, 0).unwrap();
    epochs.advance().unwrap(); // the new slot: INITIALLY_SET reports all of it once
    rig.guest_write(7);
    assert_eq!(
        epochs.advance().unwrap().iter().collect::<Vec<_>>(),
        [(id, 7)]
    );
}
