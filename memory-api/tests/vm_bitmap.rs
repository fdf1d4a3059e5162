// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `DirtyBitmap` through vm-memory's own write paths: every path marks exactly the pages it wrote,
//! for every active client, with slices at an offset and page-straddling writes; reads mark nothing;
//! writers on several threads racing a migration thread that takes the bits lose no page.

mod common;

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clearlog_bitmap::Bitmap;
use clearlog_memory::{DirtyBitmap, DirtyClient, MemorySystem, RamBlock, PAGE_SIZE};
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileMemory,
};

const BASE: u64 = 0x1_0000_0000;
const PAGES: u64 = 64;

/// A VMM's memory (one 64-page region at 4 GiB), adopted, with global logging on.
fn adopted() -> (MemorySystem, GuestMemoryMmap<DirtyBitmap>, Arc<RamBlock>) {
    let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(
        GuestAddress(BASE),
        (PAGES * PAGE_SIZE) as usize,
    )])
    .unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    mem.add_guest_memory(&gm).unwrap();
    mem.log_global_start().unwrap();
    let block = mem.ram_blocks()[0].clone();
    (mem, gm, block)
}

/// Take the Migration pages of the block (relative page numbers).
fn take(mem: &MemorySystem, block: &RamBlock) -> BTreeSet<u64> {
    let mut dest = Bitmap::new(block.pages() as usize);
    mem.sync_migration_bitmap(block, &mut dest, None);
    dest.iter_ones().map(|p| p as u64).collect()
}

fn addr(page: u64, offset: u64) -> GuestAddress {
    GuestAddress(BASE + page * PAGE_SIZE + offset)
}

#[test]
fn every_vm_memory_write_path_marks_exactly_its_pages() {
    let (mem, gm, block) = adopted();
    let set = |pages: &[u64]| pages.iter().copied().collect::<BTreeSet<u64>>();

    gm.write_slice(&[1; 8], addr(1, 0)).unwrap();
    assert_eq!(take(&mem, &block), set(&[1]), "write_slice");

    assert_eq!(gm.write(&[2; 2], addr(2, PAGE_SIZE - 1)).unwrap(), 2);
    assert_eq!(take(&mem, &block), set(&[2, 3]), "Bytes::write straddling");

    gm.write_obj(0x1122_3344_5566_7788u64, addr(4, PAGE_SIZE - 4))
        .unwrap();
    assert_eq!(take(&mem, &block), set(&[4, 5]), "write_obj straddling");

    gm.store(7u32, addr(6, 8), Ordering::Release).unwrap();
    assert_eq!(take(&mem, &block), set(&[6]), "Bytes::store");

    let data = vec![3u8; 2 * PAGE_SIZE as usize + 2];
    let n = gm
        .read_volatile_from(addr(7, PAGE_SIZE - 1), &mut data.as_slice(), data.len())
        .unwrap();
    assert_eq!(n, data.len());
    assert_eq!(
        take(&mem, &block),
        set(&[7, 8, 9, 10]),
        "read_volatile_from a reader"
    );

    let mut file = tempfile();
    file.write_all(&[9u8; 100]).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    gm.read_volatile_from(addr(12, 0), &mut file, 100).unwrap();
    assert_eq!(take(&mem, &block), set(&[12]), "read_volatile_from a File");

    // Reads mark nothing.
    let mut out = Vec::new();
    gm.write_volatile_to(addr(12, 0), &mut out, 100).unwrap();
    let _: u64 = gm.read_obj(addr(4, 0)).unwrap();
    assert!(take(&mem, &block).is_empty(), "reads must not mark");

    // Slices taken at an offset carry their base.
    let slice = gm
        .get_slice(addr(20, 0x800), 2 * PAGE_SIZE as usize)
        .unwrap();
    assert_eq!(slice.bitmap().base(), (20 * PAGE_SIZE + 0x800) as usize);
    slice.copy_from(&[5u8; 0x900]);
    assert_eq!(
        take(&mem, &block),
        set(&[20, 21]),
        "VolatileSlice::copy_from"
    );
    slice.write_obj(1u16, (PAGE_SIZE + 0x7ff) as usize).unwrap(); // bytes 0x17ff..0x1801 of the slice: pages 21 and 22
    assert_eq!(
        take(&mem, &block),
        set(&[21, 22]),
        "write_obj into a slice at an offset"
    );
    let sub = slice.offset(PAGE_SIZE as usize).unwrap();
    sub.get_ref::<u32>(0x900).unwrap().store(1);
    assert_eq!(
        take(&mem, &block),
        set(&[22]),
        "VolatileRef::store in a sub-slice"
    );
    let src = gm.get_slice(addr(30, 0), 16).unwrap();
    src.copy_to_volatile_slice(gm.get_slice(addr(31, PAGE_SIZE - 8), 16).unwrap());
    assert_eq!(
        take(&mem, &block),
        set(&[31, 32]),
        "copy between slices marks the destination only"
    );

    // Region-level access.
    let region = gm.find_region(addr(0, 0)).unwrap();
    region
        .write_slice(&[1; 3], MemoryRegionAddress(40 * PAGE_SIZE))
        .unwrap();
    region
        .get_slice(MemoryRegionAddress(41 * PAGE_SIZE), 8)
        .unwrap()
        .write_obj(1u64, 0)
        .unwrap();
    assert_eq!(take(&mem, &block), set(&[40, 41]), "region writes");

    // The bytes landed where RamBlock::read finds them.
    let mut buf = [0u8; 8];
    block.read(4 * PAGE_SIZE + PAGE_SIZE - 4, &mut buf).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), 0x1122_3344_5566_7788);
}

#[test]
fn only_active_clients_are_marked_and_dirty_at_sees_any_client() {
    let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    let regions = mem.add_guest_memory(&gm).unwrap();
    let region = gm.iter().next().unwrap();
    gm.write_obj(1u8, GuestAddress(0x1000)).unwrap();
    assert!(!region.bitmap().dirty_at(0x1000), "no client logs yet");

    mem.set_region_logging(regions[0], DirtyClient::Vga, true)
        .unwrap();
    gm.write_obj(1u8, GuestAddress(0x2000)).unwrap();
    let dirty = mem.dirty();
    assert_eq!(
        dirty
            .client(DirtyClient::Vga)
            .iter_ones()
            .collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(dirty.client(DirtyClient::Migration).count_ones(), 0);
    assert!(region.bitmap().dirty_at(0x2fff));
    assert!(region.bitmap().slice_at(0x2000).dirty_at(0));
    assert!(!region.bitmap().dirty_at(0x3000));
    assert!(!region.bitmap().dirty_at(usize::MAX));
}

#[test]
fn writes_before_adoption_are_not_tracked() {
    let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    gm.write_obj(0xabu8, GuestAddress(0x5000)).unwrap(); // detached: records nothing
    let region = gm.iter().next().unwrap();
    assert!(!region.bitmap().is_attached());
    assert!(!region.bitmap().dirty_at(0x5000));
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    mem.add_guest_memory(&gm).unwrap();
    assert!(region.bitmap().is_attached());
    mem.log_global_start().unwrap();
    assert_eq!(mem.dirty().client(DirtyClient::Migration).count_ones(), 0);
    // ...but the bytes are there.
    let mut b = [0u8];
    mem.ram_blocks()[0].read(0x5000, &mut b).unwrap();
    assert_eq!(b, [0xab]);
}

#[test]
fn concurrent_writers_and_a_migration_thread_lose_no_page() {
    let (mem, gm, block) = adopted();
    let rounds = 200u64;
    let mut sent = Bitmap::new(block.pages() as usize);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let gm = &gm;
            s.spawn(move || {
                for r in 0..rounds {
                    let page = (t + 3 * r) % PAGES;
                    match r % 3 {
                        0 => gm.write_obj(r, addr(page, 8 * t)).unwrap(),
                        1 => gm.write_slice(&[t as u8; 16], addr(page, 64)).unwrap(),
                        _ => gm
                            .get_slice(addr(page, 128), 8)
                            .unwrap()
                            .write_obj(r, 0)
                            .unwrap(),
                    }
                }
            });
        }
        // Migration syncs while the writers run.
        for _ in 0..50 {
            mem.sync_migration_bitmap(&block, &mut sent, None);
            std::thread::yield_now();
        }
    });
    mem.sync_migration_bitmap(&block, &mut sent, None);
    let expected: BTreeSet<u64> = (0..3u64)
        .flat_map(|t| (0..rounds).map(move |r| (t + 3 * r) % PAGES))
        .collect();
    let got: BTreeSet<u64> = sent.iter_ones().map(|p| p as u64).collect();
    assert_eq!(got, expected);
}

#[test]
fn removing_the_block_detaches_its_bitmap() {
    let (mem, gm, block) = adopted();
    let region = mem.ram_blocks()[0].clone();
    let id = mem
        .sections()
        .iter()
        .find(|s| Arc::ptr_eq(&s.block, &region))
        .unwrap()
        .region;
    // RAM is removed only outside a migration; another region keeps Vga active, so a write
    // through a still-attached bitmap would show.
    mem.log_global_stop().unwrap();
    let vram = mem.add_ram("vram", 0, PAGES * PAGE_SIZE).unwrap();
    mem.set_region_logging(vram, DirtyClient::Vga, true)
        .unwrap();
    mem.remove_region(id).unwrap();
    drop(block);
    gm.write_obj(1u8, addr(0, 0)).unwrap();
    assert_eq!(mem.dirty().client(DirtyClient::Migration).count_ones(), 0);
    assert_eq!(mem.dirty().client(DirtyClient::Vga).count_ones(), 0);
    assert!(!gm.iter().next().unwrap().bitmap().is_attached());
    // The VMM's memory can join a memory system again.
    let other = MemorySystem::with_ram_capacity(1 << 24);
    other.add_guest_memory(&gm).unwrap();
    drop(other); // dropping the memory system detaches too
    mem.add_guest_memory(&gm).unwrap();
}

fn tempfile() -> std::fs::File {
    common::unlinked_tempfile("vm-bitmap", 0)
}
