// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The property the whole design exists for: no lost write.
//!
//! A model kernel (dirty bit and write protection per page, CLEAR re-arms only bits that are set)
//! sits under a fake KVM accelerator; two clients run on top in random interleavings with guest and
//! host writes:
//! - Migration: sync (log_sync_all + `sync_migration_bitmap` into its own bitmap with a
//!   `ClearBitmap`), and send (clear the page's chunk first, then read the page's version);
//! - Vga: its own `log_sync` of the region, and `snapshot_and_clear_dirty` then reading every page
//!   the snapshot reports;
//! - Snapshot: a `DirtyEpochs` tracker opened at the start (a full read of RAM), whose advances
//!   end an epoch, then read every page of its delta (a chain of diff snapshots).
//!
//! Property, after a final sync: for every page, each client's last-read version equals the page's
//! latest version, or the client still has the page marked dirty. For the epochs, at every
//! advance: every page written in the epoch that ends (by the guest or the VMM) is in its delta;
//! and after a final advance the chain's last read of every page is its latest version.
//!
//! With the per-slot cache (docs/design.md section 2) the property holds. With the naive clear (all ones
//! for the range) proptest finds the race of the `KVM_CLEAR_DIRTY_LOG` series' 8-step example (docs/design.md
//! section 2); a deterministic replay of those 8 steps shows the same thing.

mod common;

use std::sync::{Arc, Mutex};

use clearlog_bitmap::Bitmap;
use clearlog_memory::{
    ClearBitmap, DirtyClient, DirtyEpochs, MemorySystem, RamBlock, RegionId, PAGE_SIZE,
};
use common::{FakeKvm, ModelKernel};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

const P: u64 = PAGE_SIZE;
/// Guest pages of "ram" (not a multiple of 64, so slots end off a 64-page boundary).
const RAM_PAGES: u64 = 200;
/// A higher-priority 8-page region at guest page 40 splits "ram" into two sections.
const HOLE_AT: u64 = 40;
const HOLE_PAGES: u64 = 8;

#[derive(Debug, Clone)]
enum Op {
    /// The guest stores to a guest page (only the kernel sees it).
    GuestWrite(u64),
    /// The VMM writes a page of block 0 or 1 through `RamBlock::write`.
    HostWrite(usize, u64),
    /// Migration: log_sync_all, then `sync_migration_bitmap` for every block.
    MigrationSync,
    /// Migration sends up to n dirty pages (clear chunk, then read).
    MigrationSend(u64),
    /// Display: `log_sync` of "ram".
    VgaSync,
    /// Display: `snapshot_and_clear_dirty` of pages [first, first + len) of "ram", then reads them.
    VgaSnapshot(u64, u64),
    /// Snapshot: end the epoch (`DirtyEpochs::advance`), check its delta, read its pages.
    EpochAdvance,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..RAM_PAGES).prop_map(Op::GuestWrite),
        1 => (0..2usize, 0..RAM_PAGES).prop_map(|(b, p)| Op::HostWrite(b, if b == 1 { p % HOLE_PAGES } else { p })),
        2 => Just(Op::MigrationSync),
        2 => (1..80u64).prop_map(Op::MigrationSend),
        1 => Just(Op::VgaSync),
        2 => (0..RAM_PAGES, 1..RAM_PAGES).prop_map(|(f, l)| Op::VgaSnapshot(f, l.min(RAM_PAGES - f))),
        2 => Just(Op::EpochAdvance),
    ]
}

struct MigrationBlock {
    to_send: Bitmap,
    clear: ClearBitmap,
    read: Vec<u64>,
}

struct Harness {
    mem: Arc<MemorySystem>,
    kernel: Arc<Mutex<ModelKernel>>,
    ram: RegionId,
    blocks: Vec<Arc<RamBlock>>,
    versions: Vec<Vec<u64>>,
    migration: Vec<MigrationBlock>,
    vga_read: Vec<u64>,
    cursor: (usize, u64),
    epochs: DirtyEpochs<Arc<MemorySystem>>,
    /// Pages (block, page) written in the running epoch.
    written_in_epoch: Vec<(usize, u64)>,
    /// The chain of diff snapshots: the last version read of every page.
    epoch_read: Vec<Vec<u64>>,
    /// The first epoch whose delta lacked a page written in it.
    epoch_loss: Option<String>,
}

impl Harness {
    fn new(with_cache: bool) -> Harness {
        let mem = Arc::new(MemorySystem::with_ram_capacity(1024 * P));
        let kernel = Arc::new(Mutex::new(ModelKernel::default()));
        mem.register_listener(FakeKvm::new(&kernel, with_cache))
            .unwrap();
        let ram = mem.add_ram("ram", 0, RAM_PAGES * P).unwrap();
        let hole = mem.create_ram("hole", HOLE_PAGES * P).unwrap();
        mem.map_region(hole, HOLE_AT * P, 1).unwrap();
        mem.set_region_logging(ram, DirtyClient::Vga, true).unwrap();
        mem.log_global_start().unwrap();
        let blocks = mem.ram_blocks();
        let migration = blocks
            .iter()
            .map(|b| MigrationBlock {
                // The first pass sends everything.
                to_send: Bitmap::new_filled(b.pages() as usize),
                clear: ClearBitmap::new(b.pages(), ClearBitmap::MIN_SHIFT).unwrap(),
                read: vec![0; b.pages() as usize],
            })
            .collect();
        let versions: Vec<Vec<u64>> = blocks.iter().map(|b| vec![0; b.pages() as usize]).collect();
        // The full snapshot: every page is read (version 0) right after the tracker opens.
        let epochs = DirtyEpochs::open(mem.clone()).unwrap();
        let mut h = Harness {
            epochs,
            written_in_epoch: Vec::new(),
            epoch_read: versions.clone(),
            epoch_loss: None,
            mem,
            kernel,
            ram,
            blocks,
            versions,
            migration,
            vga_read: vec![0; RAM_PAGES as usize],
            cursor: (0, 0),
        };
        // Migration start: the first bitmap sync right after logging starts (every slot is synced
        // before anything is cleared).
        h.migration_sync();
        h
    }

    fn bump(&mut self, block: usize, page: u64) -> [u8; 8] {
        self.written_in_epoch.push((block, page));
        let v = &mut self.versions[block][page as usize];
        *v += 1;
        v.to_le_bytes()
    }

    fn read_version(&self, block: usize, page: u64) -> u64 {
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.blocks[block].read_page(page, &mut buf).unwrap();
        u64::from_le_bytes(buf[..8].try_into().unwrap())
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::GuestWrite(gpage) => {
                let gpa = gpage * P;
                let section = self
                    .mem
                    .sections()
                    .into_iter()
                    .find(|s| s.guest_addr <= gpa && gpa < s.guest_addr + s.size)
                    .unwrap();
                let block = self
                    .blocks
                    .iter()
                    .position(|b| b.id() == section.block.id())
                    .unwrap();
                let page = (section.offset_in_block + gpa - section.guest_addr) / P;
                let bytes = self.bump(block, page);
                // The guest's store bypasses the VMM: memory changes, the kernel marks the page.
                self.blocks[block]
                    .write_untracked(page * P, &bytes)
                    .unwrap();
                self.kernel
                    .lock()
                    .unwrap()
                    .guest_write(section.guest_addr, (gpa - section.guest_addr) / P);
            }
            Op::HostWrite(block, page) => {
                let bytes = self.bump(block, page);
                self.blocks[block].write(page * P, &bytes).unwrap();
            }
            Op::MigrationSync => self.migration_sync(),
            Op::MigrationSend(n) => self.migration_send(n),
            Op::VgaSync => self.mem.log_sync(self.ram).unwrap(),
            Op::VgaSnapshot(first, len) => {
                let snap = self
                    .mem
                    .snapshot_and_clear_dirty(self.ram, first * P, len * P, DirtyClient::Vga)
                    .unwrap();
                for offset in snap.dirty_offsets().collect::<Vec<_>>() {
                    let page = offset / P;
                    self.vga_read[page as usize] = self.read_version(0, page);
                }
            }
            Op::EpochAdvance => self.epoch_advance(),
        }
    }

    /// End the epoch: every page written in it must be in its delta; then read the delta's pages.
    fn epoch_advance(&mut self) {
        let delta = self.epochs.advance().unwrap();
        for &(b, p) in &self.written_in_epoch {
            if !delta.is_dirty(self.blocks[b].id(), p) && self.epoch_loss.is_none() {
                self.epoch_loss = Some(format!(
                    "epoch {} lost block {b} page {p}: written in the epoch, not in its delta",
                    delta.epochs().start
                ));
            }
        }
        self.written_in_epoch.clear();
        for (block, page) in delta.iter() {
            let b = self.blocks.iter().position(|x| x.id() == block).unwrap();
            self.epoch_read[b][page as usize] = self.read_version(b, page);
        }
    }

    fn migration_sync(&mut self) {
        self.mem.log_sync_all().unwrap();
        for (block, m) in self.blocks.iter().zip(&mut self.migration) {
            self.mem
                .sync_migration_bitmap(block, &mut m.to_send, Some(&mut m.clear));
        }
    }

    fn migration_send(&mut self, mut budget: u64) {
        let total: u64 = self.blocks.iter().map(|b| b.pages()).sum();
        let mut scanned = 0;
        while budget > 0 && scanned < total {
            let (b, p) = self.cursor;
            if self.migration[b].to_send.test(p as usize) {
                // Re-arm the chunk in the accelerator, THEN take the bit and read the page.
                let m = &mut self.migration[b];
                let (mem, block) = (&self.mem, &self.blocks[b]);
                m.clear
                    .clear_run_before_read(p, 1, |first, n| {
                        mem.clear_dirty_bitmap_block(block, first * PAGE_SIZE, n * PAGE_SIZE)
                    })
                    .unwrap();
                m.to_send.clear(p as usize);
                self.migration[b].read[p as usize] = self.read_version(b, p);
                budget -= 1;
            }
            scanned += 1;
            self.cursor = if p + 1 == self.blocks[b].pages() {
                ((b + 1) % self.blocks.len(), 0)
            } else {
                (b, p + 1)
            };
        }
    }

    /// Final sync, then the property. Returns the first lost write found.
    fn lost_write(&mut self) -> Option<String> {
        self.migration_sync();
        self.mem.log_sync(self.ram).unwrap();
        let migration_client = self.mem.dirty().client(DirtyClient::Migration);
        for (b, block) in self.blocks.iter().enumerate() {
            for p in 0..block.pages() {
                let latest = self.versions[b][p as usize];
                let m = &self.migration[b];
                let marked = m.to_send.test(p as usize)
                    || migration_client.test((block.ram_page_offset() + p) as usize);
                if m.read[p as usize] != latest && !marked {
                    return Some(format!(
                        "migration lost block {b} page {p}: sent v{}, latest v{latest}",
                        m.read[p as usize]
                    ));
                }
            }
        }
        let vga = self.mem.dirty().client(DirtyClient::Vga);
        for p in 0..RAM_PAGES {
            let latest = self.versions[0][p as usize];
            if self.vga_read[p as usize] != latest
                && !vga.test((self.blocks[0].ram_page_offset() + p) as usize)
            {
                return Some(format!(
                    "vga lost page {p}: read v{}, latest v{latest}",
                    self.vga_read[p as usize]
                ));
            }
        }
        self.epoch_lost_write()
    }

    /// A last advance, then: no epoch lacked a page written in it, and the chain holds every
    /// page's latest version.
    fn epoch_lost_write(&mut self) -> Option<String> {
        self.epoch_advance();
        if let Some(why) = self.epoch_loss.take() {
            return Some(why);
        }
        for (b, versions) in self.versions.iter().enumerate() {
            for (p, &latest) in versions.iter().enumerate() {
                let read = self.epoch_read[b][p];
                if read != latest {
                    return Some(format!(
                        "the snapshot chain lost block {b} page {p}: read v{read}, latest v{latest}"
                    ));
                }
            }
        }
        None
    }
}

fn run(with_cache: bool, cases: u32) -> Result<(), TestError<Vec<Op>>> {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let mut h = Harness::new(with_cache);
        for op in &ops {
            h.apply(op);
        }
        match h.lost_write() {
            None => Ok(()),
            Some(why) => Err(TestCaseError::fail(why)),
        }
    })
}

#[test]
fn no_write_is_lost_with_the_per_slot_cache() {
    if let Err(e) = run(true, 256) {
        panic!("{e}");
    }
}

#[test]
fn the_naive_clear_loses_writes_and_proptest_finds_it() {
    match run(false, 1000) {
        Err(TestError::Fail(why, ops)) => {
            eprintln!("naive clear: {why}; minimal interleaving: {ops:?}");
            assert!(why.message().contains("lost"));
        }
        other => panic!("the naive clear was expected to lose a write, got {other:?}"),
    }
}

/// The 8-step race of the `KVM_CLEAR_DIRTY_LOG` series' example, replayed: write P1, sync, both clients see D, migration clears D and sends
/// P1, the guest writes P2, the display clears D from its stale copy, and no later sync shows D.
fn eight_step_race(with_cache: bool) -> Option<String> {
    let mut h = Harness::new(with_cache);
    for op in [
        Op::GuestWrite(5),      // 1. P1
        Op::MigrationSync,      // 2-3. sync: Migration and Vga both have D
        Op::MigrationSend(200), // 4-5. migration clears D's chunk in KVM and sends P1 (and the rest)
        Op::GuestWrite(5),      // 6. P2: D set again in KVM
        Op::VgaSnapshot(0, 64), // 7. the display takes its stale D and clears D in KVM
    ] {
        h.apply(&op);
    }
    h.lost_write() // 8. a final sync
}

#[test]
fn the_eight_step_race_loses_p2_without_the_cache_only() {
    let naive = eight_step_race(false).expect("the naive clear must lose P2");
    assert!(naive.contains("migration lost block 0 page 5"), "{naive}");
    assert_eq!(eight_step_race(true), None);
}
