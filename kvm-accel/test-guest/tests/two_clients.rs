// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Two dirty-log clients clearing the same pages concurrently while the guest writes (manual
//! mode): migration (`sync_migration_bitmap`, re-arm the chunk (`ClearBitmap::clear_run_before_read`), then read) on one
//! thread, a display (`snapshot_and_clear_dirty` for Vga, then read) on another. This is the
//! 8-step race of docs/design.md section 2: with the listener's per-slot cache no write is lost; with
//! a naive listener that clears whole ranges in KVM (bypassing the cache, through the raw
//! `clearlog_kvm::raw::clear_dirty_log`) writes are lost. The safe `Vm::clear_dirty_log` refuses
//! to do that on a listener's slot.
//!
//! Loss detection: the `random` workload stores a unique counter at offset 8 of every page it
//! writes. Each client keeps, per page, the content it last read (always read after clearing).
//! At the end of each round the guest is paused and both clients sync one last time; then for
//! every page either the client's last read equals the current content, or the client has the
//! page marked dirty (so it would read it again). Anything else is a lost write.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use clearlog_kvm::Error;
use clearlog_kvm::KvmDirtyLogMode;
use clearlog_memory::{
    ClearBitmap, DirtyClient, MemoryListener, MemorySystem, RamBlock, RegionId, PAGE_SIZE,
};
use clearlog_test_guest::layout::INFRA_END;
use clearlog_test_guest::workload::{set_iteration, Workload, WorkloadSpec};
use common::*;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const WSS: u64 = 32 * MIB;

type Content = [u64; 2];

fn read_page(block: &RamBlock, page: u64) -> Content {
    let mut b = [0u8; 16];
    block.read(page * PAGE, &mut b).unwrap();
    [
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..].try_into().unwrap()),
    ]
}

struct Migration {
    dest: Bitmap,
    clear: ClearBitmap,
    last: Vec<Content>,
    pages_sent: u64,
}

impl Migration {
    fn iterate(&mut self, memory: &MemorySystem, block: &RamBlock) {
        memory.log_sync_all().unwrap();
        memory.sync_migration_bitmap(block, &mut self.dest, Some(&mut self.clear));
        let dirty: Vec<usize> = self.dest.iter_ones().collect();
        for p in dirty {
            self.dest.clear(p);
            // Clear (re-arm) the chunk, then read: the migration ordering rule.
            self.clear
                .clear_run_before_read(p as u64, 1, |first, n| {
                    memory.clear_dirty_bitmap_block(block, first * PAGE_SIZE, n * PAGE_SIZE)
                })
                .unwrap();
            self.last[p] = read_page(block, p as u64);
            self.pages_sent += 1;
        }
    }
}

struct Display {
    last: Vec<Content>,
    pages_read: u64,
}

impl Display {
    fn iterate(&mut self, memory: &MemorySystem, region: RegionId, block: &RamBlock) {
        memory.log_sync(region).unwrap();
        let snap = memory
            .snapshot_and_clear_dirty(region, 0, block.size(), DirtyClient::Vga)
            .unwrap();
        for off in snap.dirty_offsets() {
            let p = off / PAGE;
            self.last[p as usize] = read_page(block, p);
            self.pages_read += 1;
        }
    }
}

#[derive(Debug, Default)]
struct Outcome {
    rounds: u64,
    checks: u64,
    migration_lost: u64,
    display_lost: u64,
    migration_sent: u64,
    display_read: u64,
    guest_writes: u64,
    ring_full_exits: u64,
    rings: Vec<clearlog_kvm::VcpuRingStats>,
}

/// Guest page writes a run must see (`run_in` adds rounds until it has them).
const MIN_GUEST_WRITES: u64 = 10_000;

fn run(naive: bool, rounds: u64, round_len: Duration) -> Outcome {
    run_in(
        Some(KvmDirtyLogMode::Manual {
            initially_set: true,
        }),
        1,
        naive,
        rounds,
        round_len,
    )
}

fn run_in(
    choice: Option<KvmDirtyLogMode>,
    vcpus: u32,
    naive: bool,
    rounds: u64,
    round_len: Duration,
) -> Outcome {
    let mv = MemVm::new(choice, INFRA_END + WSS);
    let listener: Arc<dyn MemoryListener> = if naive {
        mv.use_naive_clear()
    } else {
        mv.listener.clone()
    };
    let region = mv.low;
    let block = mv.low_block.clone();
    let pages = block.pages();
    mv.memory
        .set_region_logging(region, DirtyClient::Vga, true)
        .unwrap();
    mv.memory.log_global_start().unwrap();
    let w = Workload::new(WorkloadSpec::Random {
        wss_bytes: WSS,
        dirty_rate_bytes_per_s: 64 * MIB,
        seed: 0xc0ff_ee00,
    })
    .with_vcpus(vcpus);
    let runners = mv.start_vcpus(&w, |ram| set_iteration(ram, 1).unwrap());
    let pause = || runners.iter().for_each(|r| r.pause().unwrap());
    let resume = || runners.iter().for_each(|r| r.resume().unwrap());

    let zero = vec![[0u64; 2]; pages as usize];
    let mut mig = Migration {
        dest: Bitmap::new(pages as usize),
        clear: ClearBitmap::new(pages, 6).unwrap(),
        last: zero.clone(),
        pages_sent: 0,
    };
    let mut vga = Display {
        last: zero,
        pages_read: 0,
    };
    let first_wss = INFRA_END / PAGE;
    let mut out = Outcome::default();
    // At least `rounds` rounds, and more (up to 10x) until the guest made `MIN_GUEST_WRITES`
    // writes: how much the guest writes in a round depends on the load of the host, and the race
    // needs a guest that really writes while the clients work.
    let monitor = clearlog_test_guest::workload::monitor::WorkloadMonitor::new(&mv.ram, vcpus);
    for round in 0..rounds * 10 {
        if round >= rounds && monitor.pages_written().unwrap() >= MIN_GUEST_WRITES {
            break;
        }
        set_iteration(&mv.ram, round + 2).unwrap();
        let deadline = Instant::now() + round_len;
        std::thread::scope(|s| {
            let memory = &mv.memory;
            let block = &block;
            let mig = &mut mig;
            let vga = &mut vga;
            s.spawn(move || {
                while Instant::now() < deadline {
                    mig.iterate(memory, block);
                }
            });
            s.spawn(move || {
                while Instant::now() < deadline {
                    vga.iterate(memory, region, block);
                }
            });
        });
        // Pause, one last sync for both, check every working-set page.
        pause();
        mv.memory.log_sync_all().unwrap();
        mv.memory
            .sync_migration_bitmap(&block, &mut mig.dest, Some(&mut mig.clear));
        let vga_map = mv.memory.dirty().client(DirtyClient::Vga);
        let ram0 = block.ram_page_offset() as usize;
        for p in first_wss..pages {
            let cur = read_page(&block, p);
            if mig.last[p as usize] != cur && !mig.dest.test(p as usize) {
                out.migration_lost += 1;
            }
            if vga.last[p as usize] != cur && !vga_map.test(ram0 + p as usize) {
                out.display_lost += 1;
            }
            out.checks += 1;
        }
        out.rounds += 1;
        resume();
    }
    pause();
    out.guest_writes = monitor.pages_written().unwrap();
    out.ring_full_exits = runners.iter().map(|r| r.stats().ring_full_exits).sum();
    out.rings = mv.listener.ring_stats();
    for r in runners {
        r.stop().unwrap();
    }
    out.migration_sent = mig.pages_sent;
    out.display_read = vga.pages_read;
    let s = mv.listener.stats();
    eprintln!(
        "two clients ({}): {out:?}; listener: {} syncs, {} clears ({} skipped), {} pages cleared",
        if naive { "NAIVE clear" } else { "cached clear" },
        s.syncs,
        s.clears,
        s.clears_skipped,
        s.pages_cleared
    );
    drop(listener);
    out
}

#[test]
fn two_clients_lose_nothing() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    let out = run(false, 20, Duration::from_millis(200));
    assert_eq!(out.migration_lost, 0, "{out:?}");
    assert_eq!(out.display_lost, 0, "{out:?}");
    // Both clients did real work, concurrently with the guest.
    assert!(
        out.migration_sent > 10_000 && out.display_read > 10_000,
        "{out:?}"
    );
    assert!(out.guest_writes >= MIN_GUEST_WRITES, "{out:?}");
}

/// The same race in ring mode, on 2 vCPUs writing the same working set (at random: two writers of
/// one page are fine here, the check compares each page's content with what each client last
/// saw): both clients fold the harvested bits of both rings and neither loses a write, with rings
/// small enough (16 KiB, 1024 entries) that the vCPUs hit ring-full exits.
#[test]
fn two_clients_lose_nothing_ring() {
    if !kvm_available() || !ring_available() {
        return;
    }
    let _s = serial();
    let out = run_in(
        Some(KvmDirtyLogMode::Ring { bytes: 16 << 10 }),
        2,
        false,
        10,
        Duration::from_millis(200),
    );
    assert_eq!(out.migration_lost, 0, "{out:?}");
    assert_eq!(out.display_lost, 0, "{out:?}");
    assert!(
        out.migration_sent > 10_000 && out.display_read > 10_000,
        "{out:?}"
    );
    assert!(out.ring_full_exits > 0, "the ring never filled: {out:?}");
    assert_eq!(out.rings.len(), 2, "{out:?}");
    assert!(
        out.rings.iter().all(|r| r.harvested > 0),
        "both vCPU rings were harvested: {out:?}"
    );
}

#[test]
fn naive_clear_loses_writes() {
    if !kvm_available() || !manual_available() {
        return;
    }
    let _s = serial();
    // The same run with a listener that clears without its cache: the harness must see losses.
    let out = run(true, 5, Duration::from_millis(200));
    assert!(
        out.migration_lost + out.display_lost > 0,
        "the naive clear should lose writes: {out:?}"
    );
}

#[test]
fn safe_clear_refuses_listener_slots() {
    if !kvm_available() || !manual_available() {
        return;
    }
    // What `naive_clear_loses_writes` does through the raw ioctl, the safe path refuses.
    let mv = MemVm::new(
        Some(KvmDirtyLogMode::Manual {
            initially_set: true,
        }),
        INFRA_END + WSS,
    );
    mv.memory.log_global_start().unwrap();
    mv.memory.log_sync_all().unwrap();
    let slot = mv
        .listener
        .slot_id_at(0)
        .expect("the listener's slot at GPA 0");
    let vm = mv.listener.vm();
    assert!(vm.is_cache_slot(slot));
    let owned = |r: Result<(), Error>| {
        assert!(
            matches!(r, Err(Error::SlotOwnedByCache { slot: s }) if s == slot),
            "{r:?}"
        );
    };
    owned(vm.clear_dirty_log(slot, 0, 64, &[u64::MAX]));
    let mut bitmap = vec![0u64; vm.memslot(slot).unwrap().bitmap_words()];
    owned(vm.get_dirty_log(slot, &mut bitmap));
    owned(vm.remove_memslot(slot));
    let s = vm.memslot(slot).unwrap();
    // SAFETY: refused before any ioctl (asserted), and the range is the listener's live block.
    owned(unsafe { vm.set_memslot(slot, s.guest_phys, s.size, s.host_addr, false) });
    let msg = vm
        .clear_dirty_log(slot, 0, 64, &[u64::MAX])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("memslot {slot}")) && msg.contains("cache"),
        "{msg}"
    );
    // The listener's own path still works.
    let region = mv.low;
    mv.memory.clear_dirty_bitmap(region, 0, 64 * PAGE).unwrap();
}
