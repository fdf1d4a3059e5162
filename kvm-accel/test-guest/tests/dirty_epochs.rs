// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Dirty epochs (`clearlog_memory::DirtyEpochs`) on real KVM, in clear (manual protect with
//! `INITIALLY_SET`), legacy and ring mode, next to a migration and a display on the same pages.
//!
//! `three_clients_in_random_order`: the guest (the on-demand dirtier: a vCPU stores to the pages
//! it is told) and the VMM (writes through the memory system's vm-memory view) write pages of a
//! test region; in a random order the three clients take their bits and re-arm: Migration
//! (syncs, and sends later: each page's chunk is re-armed before its read, from the bits of an
//! older sync), Vga (`snapshot_and_clear_dirty`) and Snapshot (`DirtyEpochs::advance`). Each
//! client must report every page written since it last took (Migration: since it last read the
//! page): a client whose clear hid another's write fails it. The migration stops and starts
//! again in the middle while the epochs go on. Over a listener that clears without its per-slot
//! cache (`NaiveClear`) the same schedule loses writes, Snapshot's among them.
//!
//! `a_live_snapshot_chain_is_exact`: the random workload runs while a migration thread iterates
//! and the main thread makes a chain of diff snapshots (advance, then read the delta's pages);
//! after a last advance with the guest paused, the chain holds every page's current content.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use clearlog_kvm::KvmDirtyLogMode;
use clearlog_memory::{
    ClearBitmap, DirtyClient, DirtyEpochs, MemorySystem, RamBlock, RegionId, PAGE_SIZE,
};
use clearlog_test_guest::layout::INFRA_END;
use clearlog_test_guest::workload::{set_iteration, Workload, WorkloadSpec};
use common::*;
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = PAGE_SIZE;
const T_GPA: u64 = 0x20_0000;
const T_PAGES: u64 = 256;
const MIGRATION: usize = 0;
const VGA: usize = 1;
const SNAPSHOT: usize = 2;
const NAMES: [&str; 3] = ["Migration", "Vga", "Snapshot"];

fn clear_mode() -> Option<KvmDirtyLogMode> {
    Some(KvmDirtyLogMode::Manual {
        initially_set: true,
    })
}

/// Migration's state over one block: pages to send and chunks to re-arm before a read.
struct Migration {
    dest: Bitmap,
    clear: ClearBitmap,
}

impl Migration {
    fn new(pages: u64) -> Migration {
        Migration {
            dest: Bitmap::new(pages as usize),
            clear: ClearBitmap::new(pages, ClearBitmap::MIN_SHIFT).unwrap(),
        }
    }

    /// Sync: every listener's `log_sync`, then take the Migration bits into `dest`.
    fn sync(&mut self, memory: &MemorySystem, block: &RamBlock) {
        memory.log_sync_all().unwrap();
        memory.sync_migration_bitmap(block, &mut self.dest, Some(&mut self.clear));
    }

    /// Send up to `n` pages of `dest`: re-arm each page's chunk (if a sync marked it since its
    /// last re-arm), then "read" the page. The pages sent.
    fn send(&mut self, memory: &MemorySystem, block: &RamBlock, n: usize) -> Vec<u64> {
        let sent: Vec<u64> = self.dest.iter_ones().take(n).map(|p| p as u64).collect();
        for &p in &sent {
            self.clear
                .clear_run_before_read(p, 1, |first, n| {
                    memory.clear_dirty_bitmap_block(block, first * PAGE, n * PAGE)
                })
                .unwrap();
            self.dest.clear(p as usize);
        }
        sent
    }

    /// Sync, then send every page.
    fn iterate(&mut self, memory: &MemorySystem, block: &RamBlock) {
        self.sync(memory, block);
        self.send(memory, block, usize::MAX);
    }
}

/// The three clients of the test region and the pages each must still report: for Vga and
/// Snapshot the pages written since their last take; for Migration the pages written since it
/// last read them (it syncs, and sends later: its re-arms use the bits of an older sync).
struct Clients<'a> {
    mv: &'a MemVm,
    t: RegionId,
    block: Arc<RamBlock>,
    epochs: DirtyEpochs<&'a MemorySystem>,
    migration: Option<Migration>,
    pending: [BTreeSet<u64>; 3],
    takes: [u64; 3],
    /// Every loss seen: (step, client, pages).
    lost: Vec<(u32, &'static str, Vec<u64>)>,
}

impl Clients<'_> {
    fn wrote(&mut self, pages: impl IntoIterator<Item = u64> + Clone) {
        for (i, pending) in self.pending.iter_mut().enumerate() {
            if i != MIGRATION || self.migration.is_some() {
                pending.extend(pages.clone());
            }
        }
    }

    /// Client `who` takes its bits (Migration: syncs); every page it must still report must be
    /// among them.
    fn take(&mut self, who: usize, step: u32) {
        let (memory, block) = (&self.mv.memory, &self.block);
        let got: BTreeSet<u64> = match who {
            MIGRATION => match self.migration.as_mut() {
                Some(m) => {
                    m.sync(memory, block);
                    m.dest.iter_ones().map(|p| p as u64).collect()
                }
                None => return,
            },
            VGA => {
                memory.log_sync(self.t).unwrap();
                let snap = memory
                    .snapshot_and_clear_dirty(self.t, 0, T_PAGES * PAGE, DirtyClient::Vga)
                    .unwrap();
                snap.dirty_offsets().map(|o| o / PAGE).collect()
            }
            _ => {
                let delta = self.epochs.advance().unwrap();
                let bits = delta.pages(block.id()).unwrap();
                bits.iter_ones().map(|p| p as u64).collect()
            }
        };
        let lost: Vec<u64> = self.pending[who].difference(&got).copied().collect();
        if !lost.is_empty() {
            self.lost.push((step, NAMES[who], lost));
        }
        if who != MIGRATION {
            self.pending[who].clear();
        }
        self.takes[who] += 1;
    }

    /// Migration sends up to `n` pages; what it read is no longer pending.
    fn send(&mut self, n: usize) {
        if let Some(m) = self.migration.as_mut() {
            for p in m.send(&self.mv.memory, &self.block, n) {
                self.pending[MIGRATION].remove(&p);
            }
        }
    }
}

/// The random schedule; returns the losses seen. With `naive`, the listener clears KVM without
/// its cache ([`NaiveClear`]).
fn three_clients(
    mode: Option<KvmDirtyLogMode>,
    seed: u64,
    naive: bool,
) -> Vec<(u32, &'static str, Vec<u64>)> {
    let mv = MemVm::new(mode, INFRA_END);
    if naive {
        mv.use_naive_clear();
    }
    let t = mv.memory.add_ram("t", T_GPA, T_PAGES * PAGE).unwrap();
    let block = mv.memory.region_block(t).unwrap().0;
    let gm = mv.memory.guest_memory().unwrap();
    mv.memory
        .set_region_logging(t, DirtyClient::Vga, true)
        .unwrap();
    mv.memory.log_global_start().unwrap();
    let runner = mv.start_dirtier();
    let mut d = Dirtier {
        mem: &mv.ram,
        round: 0,
    };
    let mut c = Clients {
        mv: &mv,
        t,
        block: block.clone(),
        epochs: DirtyEpochs::open(&mv.memory).unwrap(),
        migration: Some(Migration::new(block.pages())),
        pending: Default::default(),
        takes: [0; 3],
        lost: Vec::new(),
    };
    let mut rng = Rng(seed);
    let (mut guest_pages, mut vmm_writes) = (0, 0);
    for step in 0..400 {
        if step == 150 {
            mv.memory.log_global_stop().unwrap();
            c.migration = None;
            c.pending[MIGRATION].clear();
        }
        if step == 250 {
            mv.memory.log_global_start().unwrap();
            c.migration = Some(Migration::new(block.pages()));
        }
        match rng.range(0, 6) {
            0 | 1 => {
                let first = rng.range(0, T_PAGES - 1);
                let n = rng.range(1, 8).min(T_PAGES - first);
                d.dirty(T_GPA + first * PAGE, n);
                c.wrote(first..first + n);
                guest_pages += n;
            }
            2 => {
                let page = rng.range(0, T_PAGES - 1);
                let at = T_GPA + page * PAGE + rng.range(0, PAGE / 8 - 1) * 8;
                gm.write_obj(rng.next(), GuestAddress(at)).unwrap();
                c.wrote([page]);
                vmm_writes += 1;
            }
            6 => c.send(rng.range(1, 16) as usize),
            who => c.take(who as usize - 3, step),
        }
    }
    for who in [MIGRATION, VGA, SNAPSHOT] {
        c.take(who, 400);
    }
    eprintln!(
        "three clients ({mode:?}): {guest_pages} guest page writes, {vmm_writes} VMM writes, \
         takes {:?}, listener {:?}",
        c.takes,
        mv.listener.stats()
    );
    assert!(c.takes.iter().all(|&n| n > 30), "{:?}", c.takes);
    assert!(guest_pages > 100 && vmm_writes > 30);
    let lost = std::mem::take(&mut c.lost);
    drop(c);
    runner.stop().unwrap();
    lost
}

/// Each client must report every page written since its last take (Migration: since it read it).
fn three_clients_lose_nothing(mode: Option<KvmDirtyLogMode>, seed: u64) {
    let lost = three_clients(mode, seed, false);
    assert!(
        lost.is_empty(),
        "{mode:?}: lost (step, client, pages): {lost:?}"
    );
}

#[test]
fn three_clients_in_random_order_clear() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    three_clients_lose_nothing(clear_mode(), 0x5eed_0001);
}

#[test]
fn three_clients_in_random_order_legacy() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    three_clients_lose_nothing(Some(KvmDirtyLogMode::Legacy), 0x5eed_0002);
}

#[test]
fn three_clients_in_random_order_ring() {
    if !kvm_available() || !ring_available() {
        return;
    }
    let _s = serial();
    three_clients_lose_nothing(Some(KvmDirtyLogMode::Ring { bytes: 16 << 10 }), 0x5eed_0003);
}

/// The same schedule over a listener that clears KVM without its per-slot cache: a client's
/// re-arm from older bits hides writes from the others. The harness must see it.
#[test]
fn three_clients_with_a_naive_clear_lose_writes() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    let lost = three_clients(clear_mode(), 0x5eed_0001, true);
    eprintln!("naive clear: lost (step, client, pages): {lost:?}");
    assert!(
        lost.iter().any(|(_, who, _)| *who == "Snapshot"),
        "the naive clear should hide writes from Snapshot: {lost:?}"
    );
}

type Content = [u8; 16];

fn read_page(block: &RamBlock, page: u64) -> Content {
    let mut b = [0u8; 16];
    block.read(page * PAGE, &mut b).unwrap();
    b
}

/// Guest page writes a live chain must see.
const MIN_GUEST_WRITES: u64 = 5_000;

/// The random workload writes while a migration thread iterates and the main thread makes diff
/// snapshots; after a last advance (guest paused) the chain equals memory. Returns the number of
/// pages the chain read after its full snapshot.
fn live_chain(mode: Option<KvmDirtyLogMode>) -> u64 {
    const WSS: u64 = 16 << 20;
    let mv = MemVm::new(mode, INFRA_END + WSS);
    let block = mv.low_block.clone();
    let pages = block.pages();
    mv.memory.log_global_start().unwrap();
    let w = Workload::new(WorkloadSpec::Random {
        wss_bytes: WSS,
        dirty_rate_bytes_per_s: 64 << 20,
        seed: 0xe90c_0001,
    });
    let runner = mv.start(&w, |ram| set_iteration(ram, 1).unwrap());
    let monitor = clearlog_test_guest::workload::monitor::WorkloadMonitor::new(&mv.ram, 1);
    let written_before = monitor.pages_written().unwrap();
    let mut epochs = DirtyEpochs::open(&mv.memory).unwrap();
    // The full snapshot, read after `open` returned.
    let mut chain: Vec<Content> = (0..pages).map(|p| read_page(&block, p)).collect();
    let mut read = 0;
    // At least 1.5 s and `MIN_GUEST_WRITES` guest writes (at most 15 s): on a loaded 2-core host
    // the guest's vCPU may get little time.
    let start = Instant::now();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (memory, block, done) = (&mv.memory, &block, &done);
        s.spawn(move || {
            let mut m = Migration::new(block.pages());
            while !done.load(Ordering::Relaxed) {
                m.iterate(memory, block);
                // A sync kicks the vCPU out of KVM_RUN: leave the guest time to write.
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        while start.elapsed() < Duration::from_millis(1500)
            || (monitor.pages_written().unwrap() - written_before < MIN_GUEST_WRITES
                && start.elapsed() < Duration::from_secs(15))
        {
            std::thread::sleep(Duration::from_millis(50));
            let delta = epochs.advance().unwrap();
            for (_, p) in delta.iter() {
                chain[p as usize] = read_page(block, p);
                read += 1;
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    runner.pause().unwrap();
    let delta = epochs.advance().unwrap();
    for (_, p) in delta.iter() {
        chain[p as usize] = read_page(&block, p);
        read += 1;
    }
    let lost: Vec<u64> = (0..pages)
        .filter(|&p| chain[p as usize] != read_page(&block, p))
        .collect();
    assert!(
        lost.is_empty(),
        "{mode:?}: the snapshot chain lost {} pages, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let written = monitor.pages_written().unwrap() - written_before;
    eprintln!(
        "live chain ({mode:?}): the guest wrote {written} pages, the chain read {read} pages in \
         {} epochs, listener {:?}",
        epochs.epoch(),
        mv.listener.stats()
    );
    assert!(
        written >= MIN_GUEST_WRITES,
        "the guest wrote only {written} pages"
    );
    drop(epochs);
    runner.stop().unwrap();
    read
}

#[test]
fn a_live_snapshot_chain_is_exact_clear() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    assert!(live_chain(clear_mode()) > 1000);
}

#[test]
fn a_live_snapshot_chain_is_exact_legacy() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    assert!(live_chain(Some(KvmDirtyLogMode::Legacy)) > 1000);
}

#[test]
fn a_live_snapshot_chain_is_exact_ring() {
    if !kvm_available() || !ring_available() {
        return;
    }
    let _s = serial();
    assert!(live_chain(Some(KvmDirtyLogMode::Ring { bytes: 16 << 10 })) > 1000);
}
