// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The approach of Linux's `dirty_log_test` (selftests/kvm), rewritten for our stack: a guest
//! writes the current `iteration` into random pages as fast as it can while the host harvests the
//! dirty log the way migration does (`log_sync_all`, `sync_migration_bitmap` with a
//! `ClearBitmap`, then re-arm every chunk (`ClearBitmap::clear_run_before_read`), then read the pages), and
//! every page of the working set is checked at every round against what it holds.
//!
//! Per page the host keeps `sent`: the value it read the last time the page was reported dirty
//! (read after the clear, as migration does). At round `k` (the guest has been writing `k`; the
//! host bumps the iteration to `k + 1` before harvesting):
//!
//! - paused rounds: the vCPU is stopped at a sync point of its program
//!   ([`VcpuRunner::pause_at_doorbell`]: the guest rings the MMIO doorbell after both stores of a
//!   page write, so every write is either done or not started; no kick can land between a
//!   store that faulted, setting the dirty bit, and its retirement). The check is strict: a dirty
//!   page holds exactly `k`, a clean page exactly `sent`. No register decoding, no tolerance for a
//!   write in flight. Only the first paused round after running rounds may see a page holding
//!   `k - 1` (a write that loaded the iteration before the last running round's bump, retired
//!   after its harvest; at most one per bump).
//! - running rounds (the vCPU keeps writing during the harvest): dirty, the value is `k - 1`, `k`
//!   or `k + 1` (anything older means a bit survived a clear: a clear did not reach KVM), or the
//!   value read last time when the store that set the bit had not retired yet (at most one, and
//!   then the page must be dirty next round); clean and the value differs from `sent`: allowed
//!   only for writes made after the harvest (value `k + 1`, or `k` for the one stale write), and
//!   then the page MUST be dirty at round `k + 1`.
//!
//! The RAM is 1 GiB + 3 pages (not a multiple of 64 pages), the working set all of it above the
//! guest's 1 MiB infrastructure, so the slot's 3-page tail is written and cleared too.

mod common;

use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use clearlog_kvm::KvmDirtyLogMode;
use clearlog_memory::ClearBitmap;
use clearlog_test_guest::guest_ram::GuestRam;
use clearlog_test_guest::layout::INFRA_END;
use clearlog_test_guest::vcpu::runner::VcpuRunner;
use clearlog_test_guest::workload::monitor::WorkloadMonitor;
use clearlog_test_guest::workload::{set_doorbell_sync, set_iteration, Workload, WorkloadSpec};
use common::*;

const PAGE: u64 = 4096;
const RAM: u64 = (1 << 30) + 3 * PAGE;
const ROUNDS: u64 = 40;

#[derive(Debug, Default)]
struct Counts {
    rounds: u64,
    page_checks: u64,
    dirty_seen: u64,
    stale_dirty: u64,
    in_flight: u64,
    written_after_harvest: u64,
}

/// How the vCPU was stopped for a round's harvest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// At a doorbell sync point, and so during the previous harvest: strict check.
    Strict,
    /// At a doorbell sync point, the previous round ran during its harvest.
    AfterRunning,
    /// Not stopped.
    Running,
}

/// Stops the guest between two page writes: sync points on, pause at the next doorbell exit,
/// sync points off again (the guest then runs at full speed after the resume).
fn pause_between_writes(r: &VcpuRunner, ram: &dyn clearlog_test_guest::guest_ram::GuestRam) {
    set_doorbell_sync(ram, true).unwrap();
    r.pause_at_doorbell()
        .expect("the guest rings the doorbell after each write");
    set_doorbell_sync(ram, false).unwrap();
}

struct Harness<'a> {
    mv: &'a MemVm,
    block: std::sync::Arc<clearlog_memory::RamBlock>,
    first_wss_page: u64,
    wss_pages: u64,
    sent: Vec<u64>,
    must_be_dirty: Bitmap,
    dest: Bitmap,
    clear: ClearBitmap,
    counts: Counts,
}

impl Harness<'_> {
    /// Sync, take Migration's bits, clear every chunk that got bits (before reading), and return
    /// the pages reported dirty this round (block page numbers).
    fn harvest(&mut self) -> Bitmap {
        self.mv.memory.log_sync_all().unwrap();
        self.mv
            .memory
            .sync_migration_bitmap(&self.block, &mut self.dest, Some(&mut self.clear));
        for chunk in 0..self.clear.chunk_count() {
            if self.clear.test(chunk) {
                let (first, _) = self.clear.chunk_pages(chunk);
                let (memory, block) = (&self.mv.memory, &self.block);
                let rearmed = self
                    .clear
                    .clear_run_before_read(first, 1, |first, n| {
                        memory.clear_dirty_bitmap_block(
                            block,
                            first * clearlog_memory::PAGE_SIZE,
                            n * clearlog_memory::PAGE_SIZE,
                        )
                    })
                    .unwrap();
                assert_eq!(rearmed, 1);
            }
        }
        assert_eq!(self.clear.pending(), 0);
        std::mem::replace(&mut self.dest, Bitmap::new(self.block.pages() as usize))
    }

    /// Check every working-set page after round `k` (see the module docs). `round` is how the
    /// vCPU was stopped for the harvest.
    fn check(&mut self, k: u64, dirty: &Bitmap, round: Round) {
        let exact = round != Round::Running;
        let mut next = Bitmap::new(self.wss_pages as usize);
        let mut stale_dirty = 0;
        let mut late = 0;
        let mut in_flight = 0;
        let mut errors = Vec::new();
        for i in 0..self.wss_pages {
            let p = self.first_wss_page + i;
            let v = self.mv.ram.load_u64(p * PAGE).unwrap();
            let sent = self.sent[i as usize];
            if dirty.test(p as usize) {
                self.counts.dirty_seen += 1;
                let fresh = match round {
                    Round::Strict => v == k,
                    Round::AfterRunning => v == k || v + 1 == k,
                    Round::Running => v + 1 >= k && v <= k + 1,
                };
                if fresh {
                    if v + 1 == k {
                        stale_dirty += 1;
                    }
                } else if v == sent && !exact {
                    // Reported but not written yet: the store that faulted (and so set the
                    // bit) had not retired when the harvest came. It retires later, faults
                    // again on the re-armed page, and must be reported next round.
                    in_flight += 1;
                    next.set(i as usize);
                } else if v == sent {
                    errors.push(format!(
                        "page {p}: dirty but never written since its last read ({v}) at round {k} \
                         with the vCPU stopped between two writes: a cleared bit came back"
                    ));
                } else {
                    errors.push(format!(
                        "page {p}: dirty but holds {v} (last read {sent}) at round {k}"
                    ));
                }
                self.sent[i as usize] = v;
            } else {
                if self.must_be_dirty.test(i as usize) {
                    errors.push(format!(
                        "page {p}: written after harvest {} (holds {v}) but not dirty at round {k}",
                        k - 1
                    ));
                }
                if v != sent {
                    if exact || !(v == k || v == k + 1) {
                        errors.push(format!(
                            "page {p}: LOST WRITE: holds {v}, last read {sent}, not dirty at round {k}"
                        ));
                    } else {
                        // Written after this round's clear; must be dirty next round.
                        if v == k {
                            late += 1; // the stale-iteration write of the bump
                        }
                        next.set(i as usize);
                        self.counts.written_after_harvest += 1;
                    }
                }
            }
            self.counts.page_checks += 1;
        }
        // One write per bump can carry the old iteration (loaded before the bump), and the
        // in-flight page may have held the previous iteration already.
        if round == Round::Strict && stale_dirty > 0 {
            errors.push(format!(
                "{stale_dirty} dirty pages hold the previous iteration at round {k} with the vCPU \
                 stopped between writes since the last harvest: cleared bits came back"
            ));
        }
        if stale_dirty > 2 {
            errors.push(format!(
                "{stale_dirty} dirty pages hold the previous iteration at round {k}: cleared bits came back"
            ));
        }
        if in_flight > 1 {
            errors.push(format!(
                "{in_flight} dirty pages were never written since their last read at round {k}: \
                 cleared bits came back"
            ));
        }
        if late > 1 {
            errors.push(format!(
                "{late} clean pages hold iteration {k} written before the bump: lost writes"
            ));
        }
        self.counts.stale_dirty += stale_dirty;
        self.counts.in_flight += in_flight;
        self.counts.rounds += 1;
        assert!(
            errors.is_empty(),
            "{} errors at round {k} ({:?}): {:?}",
            errors.len(),
            round,
            &errors[..errors.len().min(10)]
        );
        self.must_be_dirty = next;
    }
}

fn selftest(choice: Option<KvmDirtyLogMode>, shift_paused: u8, shift_running: u8) {
    let started = Instant::now();
    let mv = MemVm::new(choice, RAM);
    let mode = mv.vm.dirty_log_mode();
    mv.memory.log_global_start().unwrap();
    let wss_pages = (RAM - INFRA_END) / PAGE;
    let w = Workload::new(WorkloadSpec::Random {
        wss_bytes: wss_pages * PAGE,
        dirty_rate_bytes_per_s: 0,
        seed: 0x5eed_0001,
    });
    // The pre-fault writes iteration 1 everywhere, with logging already on.
    let r = mv.start(&w, |ram| set_iteration(ram, 1).unwrap());
    let block = mv.low_block.clone();
    let pages = block.pages();
    let mut h = Harness {
        mv: &mv,
        block,
        first_wss_page: INFRA_END / PAGE,
        wss_pages,
        sent: vec![0; wss_pages as usize],
        must_be_dirty: Bitmap::new(wss_pages as usize),
        dest: Bitmap::new(pages as usize),
        clear: ClearBitmap::new(pages, shift_paused).unwrap(),
        counts: Counts::default(),
    };
    let mon = WorkloadMonitor::new(&mv.ram, 1);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let setup = started.elapsed();

    // Variant 1: the vCPU is paused during the harvest: the check is exact.
    let mut k = 1;
    let mut dirty_per_round = Vec::new();
    for _ in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(rng.range(1, 8)));
        pause_between_writes(&r, &mv.ram);
        set_iteration(&mv.ram, k + 1).unwrap();
        let dirty = h.harvest();
        dirty_per_round.push(dirty.count_ones());
        h.check(k, &dirty, Round::Strict);
        r.resume().unwrap();
        k += 1;
    }
    let paused_checks = h.counts.page_checks;

    // Variant 2: the vCPU keeps writing during sync, clear and check.
    h.clear = ClearBitmap::new(pages, shift_running).unwrap();
    for _ in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(rng.range(1, 8)));
        set_iteration(&mv.ram, k + 1).unwrap();
        let dirty = h.harvest();
        dirty_per_round.push(dirty.count_ones());
        h.check(k, &dirty, Round::Running);
        k += 1;
    }
    // Exact round: stop between writes, harvest, every late write must show up now.
    pause_between_writes(&r, &mv.ram);
    set_iteration(&mv.ram, k + 1).unwrap();
    let dirty = h.harvest();
    h.check(k, &dirty, Round::AfterRunning);
    // And a last strict round.
    k += 1;
    r.resume().unwrap();
    std::thread::sleep(Duration::from_millis(rng.range(1, 8)));
    pause_between_writes(&r, &mv.ram);
    set_iteration(&mv.ram, k + 1).unwrap();
    let dirty = h.harvest();
    h.check(k, &dirty, Round::Strict);
    let doorbell_pauses = r.stats().doorbell_pauses;
    assert_eq!(
        doorbell_pauses,
        ROUNDS + 2,
        "every exact round stopped at a doorbell"
    );
    let written = mon.pages_written().unwrap();
    let r_full_exits = r.stats().ring_full_exits;
    r.stop().unwrap();

    let s = mv.listener.stats();
    eprintln!(
        "selftest {mode}: {} rounds, {} page checks ({} paused-exact), {} dirty reports, \
         {} written-after-harvest (all confirmed next round), {} stale-iteration dirty, {} reported-before-written (confirmed next round); \
         guest wrote {written} pages; dirty pages/round min {} max {}; \
         {} syncs, {} clears ({} pages); setup {setup:?}, total {:?}",
        h.counts.rounds,
        h.counts.page_checks,
        paused_checks,
        h.counts.dirty_seen,
        h.counts.written_after_harvest,
        h.counts.stale_dirty,
        h.counts.in_flight,
        dirty_per_round.iter().min().unwrap(),
        dirty_per_round.iter().max().unwrap(),
        s.syncs,
        s.clears,
        s.pages_cleared,
        started.elapsed()
    );
    // The test must have exercised something: pages dirtied in every round.
    assert!(
        dirty_per_round.iter().all(|&n| n > 0),
        "{dirty_per_round:?}"
    );
    if mode.is_manual() {
        assert!(s.clears > 0);
    }
    if mode.is_ring() {
        let rs = mv.listener.ring_stats();
        eprintln!(
            "selftest {mode}: ring-full exits {}, ring entries {}, reaps {}, reaper+sync reap time {} us, rings found full {}",
            r_full_exits, s.ring_entries, s.ring_reaps, s.ring_reap_ns / 1000, s.ring_found_full
        );
        assert!(r_full_exits > 0, "the ring is small enough to fill: {rs:?}");
        assert_eq!(rs[0].full_exits, r_full_exits, "{rs:?}");
        assert!(
            s.ring_entries > 0 && rs[0].harvested == s.ring_entries,
            "{rs:?} {s:?}"
        );
        assert_eq!(s.ring_foreign, 0, "{s:?}");
    }
}

#[test]
fn selftest_ring() {
    if !kvm_available() || !ring_available() {
        return;
    }
    let _s = serial();
    // 16 KiB = 1024 entries per vCPU, far below the working set: rings fill every round.
    selftest(Some(KvmDirtyLogMode::Ring { bytes: 16 << 10 }), 6, 18);
}

#[test]
fn selftest_legacy() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    selftest(Some(KvmDirtyLogMode::Legacy), 6, 18);
}

#[test]
fn selftest_manual_initially_set() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    selftest(
        Some(KvmDirtyLogMode::Manual {
            initially_set: true,
        }),
        6,
        12,
    );
}

#[test]
fn selftest_manual() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    selftest(
        Some(KvmDirtyLogMode::Manual {
            initially_set: false,
        }),
        9,
        18,
    );
}
