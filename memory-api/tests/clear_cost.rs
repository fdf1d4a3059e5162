// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! re-arming a chunk before its read (`ClearBitmap::clear_run_before_read` over
//! `MemorySystem::clear_dirty_bitmap_block`) is cheap per call: no heap allocation, whatever the number of blocks
//! and sections (it finds the block's sections through a per-block index). So is
//! `RamBlock::populated_pages`, which the migration engine calls right after it for each chunk.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use clearlog_bitmap::Bitmap;
use clearlog_memory::{
    ClearBitmap, ListenerError, MemoryListener, MemorySystem, RamBacking, Section, PAGE_SIZE,
};

/// Counts this thread's allocations.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a
// thread-local `Cell` (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A listener that does nothing but count clears.
#[derive(Default)]
struct Nop(std::sync::atomic::AtomicU64);
impl MemoryListener for Nop {
    fn log_clear(&self, _: &Section, _: u64, npages: u64) -> Result<(), ListenerError> {
        self.0
            .fetch_add(npages, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[test]
fn rearming_a_chunk_before_its_read_does_not_allocate() {
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    let nop = Arc::new(Nop::default());
    mem.register_listener(nop.clone()).unwrap();
    for i in 0..200u64 {
        mem.add_ram(&format!("ram{i}"), i << 20, 1 << 20).unwrap();
    }
    mem.log_global_start().unwrap();
    let block = mem.ram_blocks()[150].clone();
    let pages = block.pages();
    let mut dest = Bitmap::new(pages as usize);
    let mut clear = ClearBitmap::new(pages, 6).unwrap();
    block.write(0, &[1]).unwrap();
    block.write(200 << 12, &[1]).unwrap();
    mem.sync_migration_bitmap(&block, &mut dest, Some(&mut clear));

    let before = ALLOCS.with(Cell::get);
    for page in 0..pages {
        clear
            .clear_run_before_read(page, 1, |first, n| {
                mem.clear_dirty_bitmap_block(&block, first * PAGE_SIZE, n * PAGE_SIZE)
            })
            .unwrap();
    }
    let allocs = ALLOCS.with(Cell::get) - before;
    assert_eq!(allocs, 0, "re-arming a chunk before its read allocated");
    assert_eq!(nop.0.load(std::sync::atomic::Ordering::Relaxed), 128);
}

#[test]
fn populated_pages_does_not_allocate() {
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    mem.add_ram("anon", 0, 64 << 20).unwrap();
    mem.add_ram_backed(
        "shm",
        64 << 20,
        64 << 20,
        RamBacking::Memfd { hugetlb: false },
    )
    .unwrap();
    for block in mem.ram_blocks() {
        for p in (0..block.pages()).step_by(7) {
            block.write(p * PAGE_SIZE, &[1]).unwrap();
        }
        // The first query opens what it needs (the pagemap or a reopen of the file) once.
        let mut out = Vec::with_capacity(block.pages() as usize);
        block.populated_pages(0, 4096, &mut out).unwrap();
        let before = ALLOCS.with(Cell::get);
        for chunk in (0..block.pages()).step_by(4096) {
            out.clear();
            block.populated_pages(chunk, 4096, &mut out).unwrap();
            assert!(!out.is_empty());
        }
        let allocs = ALLOCS.with(Cell::get) - before;
        assert_eq!(allocs, 0, "populated_pages allocated ({})", block.name());
    }
}
