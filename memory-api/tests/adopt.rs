// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VMM-style flow: the VMM builds its own `GuestMemoryMmap<DirtyBitmap>`, the memory system
//! adopts it, migration logs, the VMM's devices keep writing through their own `GuestMemoryMmap`
//! (`write_slice`, `write_obj`, a virtio used ring written through a `get_slice`), and migration's
//! sync finds exactly those pages, with the bytes readable through `RamBlock::read`. And the
//! reverse: a vm-memory view of a memory system's RAM.

use std::collections::BTreeSet;

use clearlog_bitmap::Bitmap;
use clearlog_memory::{ClearBitmap, DirtyBitmap, Error, MemorySystem, RamBacking, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const LOW: u64 = 0;
const LOW_SIZE: u64 = 0x40_0000; // 4 MiB
const HIGH: u64 = 0x1_0000_0000;
const HIGH_SIZE: u64 = 0x20_0000; // 2 MiB

#[test]
fn vmm_memory_adopted_as_it_is() {
    let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[
        (GuestAddress(LOW), LOW_SIZE as usize),
        (GuestAddress(HIGH), HIGH_SIZE as usize),
    ])
    .unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 26);
    let regions = mem.add_guest_memory(&gm).unwrap();
    assert_eq!(regions.len(), 2);
    let blocks = mem.ram_blocks();
    let names: Vec<&str> = blocks.iter().map(|b| b.name()).collect();
    assert_eq!(names, ["ram@0x0", "ram@0x100000000"]);
    // The blocks share the VMM's mappings.
    for (region, block) in gm.iter().zip(&blocks) {
        assert_eq!(block.host_addr(), region.as_ptr() as u64);
        assert_eq!(block.size(), region.len());
    }
    let sections = mem.sections();
    assert_eq!(
        sections
            .iter()
            .map(|s| (s.guest_addr, s.size))
            .collect::<Vec<_>>(),
        [(LOW, LOW_SIZE), (HIGH, HIGH_SIZE)]
    );

    mem.log_global_start().unwrap();
    // Migration's first pass: take whatever is there, then start from clean bitmaps.
    let mut to_send: Vec<Bitmap> = blocks
        .iter()
        .map(|b| Bitmap::new(b.pages() as usize))
        .collect();
    let mut clear: Vec<ClearBitmap> = blocks
        .iter()
        .map(|b| ClearBitmap::new(b.pages(), 6).unwrap())
        .collect();
    for (i, b) in blocks.iter().enumerate() {
        mem.sync_migration_bitmap(b, &mut to_send[i], Some(&mut clear[i]));
        assert_eq!(to_send[i].count_ones(), 0, "nothing written yet");
    }

    // The VMM's devices write through their own GuestMemoryMmap.
    gm.write_slice(b"disk sector", GuestAddress(LOW + 0x1_2345))
        .unwrap(); // page 0x12
    gm.write_obj(0xfeed_face_u32, GuestAddress(HIGH + 0x3ffe))
        .unwrap(); // pages 3 and 4 of the high block
                   // A virtio used ring at HIGH + 0x10_0000: flags(u16) idx(u16) then elements.
    let ring_addr = GuestAddress(HIGH + 0x10_0000 + PAGE_SIZE - 4);
    let ring = gm.get_slice(ring_addr, 4 + 8 * 4).unwrap();
    ring.write_obj([7u32, 512u32], 4).unwrap(); // element 0 (id, len): next page
    ring.write_obj(3u16, 2).unwrap(); // used.idx: first page

    let mut dirty: Vec<BTreeSet<u64>> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        mem.log_sync_all().unwrap();
        mem.sync_migration_bitmap(b, &mut to_send[i], Some(&mut clear[i]));
        dirty.push(to_send[i].iter_ones().map(|p| p as u64).collect());
    }
    assert_eq!(dirty[0], BTreeSet::from([0x12]));
    assert_eq!(dirty[1], BTreeSet::from([3, 4, 0x100, 0x101]));

    // Clear each chunk, then read the pages: the bytes the devices wrote.
    for p in &dirty[1] {
        clear[1]
            .clear_run_before_read(*p, 1, |first, n| {
                mem.clear_dirty_bitmap_block(&blocks[1], first * PAGE_SIZE, n * PAGE_SIZE)
            })
            .unwrap();
    }
    let mut buf = [0u8; 11];
    blocks[0].read(0x1_2345, &mut buf).unwrap();
    assert_eq!(&buf, b"disk sector");
    let mut word = [0u8; 4];
    blocks[1].read(0x3ffe, &mut word).unwrap();
    assert_eq!(u32::from_ne_bytes(word), 0xfeed_face);
    let mut elem = [0u8; 8];
    blocks[1].read(0x10_1000, &mut elem).unwrap();
    assert_eq!(elem[..4], 7u32.to_ne_bytes());
    assert_eq!(elem[4..], 512u32.to_ne_bytes());

    // A migration destination loads a page untracked: the VMM sees it, nothing is dirty.
    blocks[0].write_untracked(0x20_0000, b"incoming").unwrap();
    let mut buf = [0u8; 8];
    gm.read_slice(&mut buf, GuestAddress(LOW + 0x20_0000))
        .unwrap();
    assert_eq!(&buf, b"incoming");
    let mut again = Bitmap::new(blocks[0].pages() as usize);
    assert_eq!(mem.sync_migration_bitmap(&blocks[0], &mut again, None), 0);
}

#[test]
fn adoption_errors_leave_nothing_behind() {
    let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x20_0000), 0x10_0000),
    ])
    .unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 24);
    // The second region overlaps RAM the memory system already has: the first is rolled back.
    mem.add_ram("existing", 0x20_0000, 0x1000).unwrap();
    assert!(matches!(
        mem.add_guest_memory(&gm),
        Err(Error::Overlap { .. })
    ));
    assert_eq!(mem.ram_blocks().len(), 1);
    assert!(gm.iter().all(|r| !r.bitmap().is_attached()));

    // Adopted once; a second time (here or elsewhere) is an error.
    let other = MemorySystem::with_ram_capacity(1 << 24);
    other.add_guest_memory(&gm).unwrap();
    let e = other.add_guest_memory(&gm).unwrap_err();
    assert!(
        matches!(
            e,
            Error::AlreadyAttached {
                guest_addr: Some(0)
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("already attached"), "{e}");
    assert!(matches!(
        mem.add_guest_memory(&gm),
        Err(Error::AlreadyAttached { .. })
    ));
    assert_eq!(other.ram_blocks().len(), 2);

    // Out of RAM address space.
    let small = MemorySystem::with_ram_capacity(0x10_0000);
    let gm2 = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    assert!(matches!(
        small.add_guest_memory(&gm2),
        Err(Error::RamSpaceExhausted { .. })
    ));
    assert!(!gm2.iter().next().unwrap().bitmap().is_attached());
}

#[test]
fn guest_memory_view_shares_the_blocks() {
    let mem = MemorySystem::with_ram_capacity(1 << 26);
    assert_eq!(mem.guest_memory().unwrap().num_regions(), 0);
    mem.add_ram("low", 0, 0x20_0000).unwrap();
    mem.add_ram_backed(
        "high",
        HIGH,
        0x10_0000,
        RamBacking::Memfd { hugetlb: false },
    )
    .unwrap();
    let hidden = mem.create_ram("unmapped", 0x1000).unwrap();
    mem.add_alias("alias", hidden, 0, 0x1000, 0x80_0000, 0)
        .unwrap();
    let gm = mem.guest_memory().unwrap();
    assert_eq!(
        gm.num_regions(),
        2,
        "unmapped RAM and aliases are not in the view"
    );
    let blocks = mem.ram_blocks();
    let high = blocks.iter().find(|b| b.name() == "high").unwrap();
    let region = gm.find_region(GuestAddress(HIGH)).unwrap();
    assert_eq!(region.as_ptr() as u64, high.host_addr());
    assert!(
        region.file_offset().is_some(),
        "the memfd is visible to vhost-user"
    );

    mem.log_global_start().unwrap();
    gm.write_obj(42u64, GuestAddress(HIGH + 0x5000)).unwrap();
    let mut dest = Bitmap::new(high.pages() as usize);
    assert_eq!(mem.sync_migration_bitmap(high, &mut dest, None), 1);
    assert!(dest.test(5));
    let mut buf = [0u8; 8];
    high.read(0x5000, &mut buf).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), 42);

    // A RAM region mapped over another (higher priority) cannot be shown by vm-memory. (Adding
    // RAM waits for the migration to end.)
    mem.log_global_stop().unwrap();
    let rom = mem.create_ram("rom", 0x1000).unwrap();
    mem.map_region(rom, 0x1000, 1).unwrap();
    assert!(matches!(mem.guest_memory(), Err(Error::GuestMemoryView(_))));
}
