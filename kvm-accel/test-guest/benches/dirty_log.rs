// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Dirty-log cost on the real KVM, through `MemorySystem` + `KvmMemoryListener`, 1 GiB of guest
//! RAM with every page written by the guest:
//!
//! - criterion: `log_sync` (manual mode: a pure GET + fold) and `log_clear` of the whole GiB
//!   (manual mode: write-protects every page);
//! - a printed table: sync and clear per GiB in legacy and manual mode right after the guest
//!   wrote every page (legacy needs the guest to re-dirty everything before each GET, which does
//!   not fit criterion's iteration model);
//! - a printed table: re-arming the GiB chunk by chunk (256 KiB to 64 MiB chunks), per call;
//! - a printed table: the guest's write rate (unpaced `random` over 1 GiB) in the 50 ms after a
//!   sync vs. in 50 ms without one. Legacy GET write-protects every dirty page, so the guest then
//!   takes a fault on every first write; a manual-mode sync does not touch the protection.
//!
//! Without a usable /dev/kvm it prints SKIPPED and measures nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clearlog_kvm::KvmMemoryListener;
use clearlog_kvm::{KvmDirtyLogMode, Vm, VmConfig};
use clearlog_memory::{MemorySystem, RamBlock, RegionId};
use clearlog_test_guest::guest_ram::{GuestRam, RawGuestRam};
use clearlog_test_guest::layout::{counter_slot_addr, INFRA_END};
use clearlog_test_guest::vcpu::runner::VcpuRunner;
use clearlog_test_guest::vcpu::Vcpu;
use clearlog_test_guest::workload::monitor::WorkloadMonitor;
use clearlog_test_guest::workload::params::C_SWEEPS;
use clearlog_test_guest::workload::{Workload, WorkloadSpec};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

struct Rig {
    memory: MemorySystem,
    listener: Arc<KvmMemoryListener>,
    region: RegionId,
    _block: Arc<RamBlock>,
    ram: RawGuestRam,
    runner: Option<VcpuRunner>,
    _vm: Arc<Vm>,
}

impl Rig {
    /// 1 MiB of infrastructure + 1 GiB working set, logging on, `spec` running and ready.
    fn new(choice: Option<KvmDirtyLogMode>, spec: WorkloadSpec) -> Rig {
        let vm = Arc::new(
            Vm::new(VmConfig {
                dirty_log: choice,
                ..Default::default()
            })
            .expect("Vm::new"),
        );
        let memory = MemorySystem::new();
        let region = memory.add_ram("ram", 0, INFRA_END + GIB).unwrap();
        let listener = Arc::new(KvmMemoryListener::new(vm.clone()));
        memory.register_listener(listener.clone()).unwrap();
        let block = memory.region_block(region).unwrap().0;
        // SAFETY: `_block`, kept in the Rig next to `ram`, owns this mapping for as long as
        // `ram` exists; it is page aligned, readable and writable, and accessed only through raw
        // pointers (no Rust reference into it).
        let ram = unsafe { RawGuestRam::new(block.host_addr() as *mut u8, block.size()) };
        memory.log_global_start().unwrap();
        let w = Workload::new(spec);
        let vcpu = Vcpu::new(&vm, 0).unwrap();
        w.load(&ram, vcpu.tsc_khz().unwrap()).unwrap();
        vcpu.setup_ring3(&w.entry(0).unwrap()).unwrap();
        let runner = VcpuRunner::spawn(vcpu).unwrap();
        WorkloadMonitor::new(&ram, 1)
            .wait_ready(Duration::from_secs(60))
            .unwrap();
        Rig {
            memory,
            listener,
            region,
            _block: block,
            ram,
            runner: Some(runner),
            _vm: vm,
        }
    }

    /// A manual-mode rig, guest paused, synced and fully re-armed.
    fn paused_manual() -> Rig {
        let rig = Rig::new(
            Some(KvmDirtyLogMode::Manual {
                initially_set: true,
            }),
            sweep_spec(),
        );
        rig.runner().pause().unwrap();
        rig.memory.log_sync_all().unwrap();
        rig.clear_all();
        rig
    }

    fn runner(&self) -> &VcpuRunner {
        self.runner.as_ref().unwrap()
    }

    fn sweeps(&self) -> u64 {
        self.ram.load_u64(counter_slot_addr(0) + C_SWEEPS).unwrap()
    }

    /// Lets the `increment` guest finish a full sweep (every page written), then pauses it.
    fn dirty_everything(&self) {
        self.runner().resume().unwrap();
        let s = self.sweeps();
        while self.sweeps() < s + 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.runner().pause().unwrap();
    }

    fn clear_all(&self) {
        self.memory
            .clear_dirty_bitmap(self.region, 0, INFRA_END + GIB)
            .unwrap();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(r) = self.runner.take() {
            r.stop().ok();
        }
    }
}

fn kvm_ok() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm not usable ({e}): no dirty-log benchmarks");
            false
        }
    }
}

fn sweep_spec() -> WorkloadSpec {
    WorkloadSpec::Increment {
        wss_bytes: GIB,
        dirty_rate_bytes_per_s: 0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sync and clear of a GiB whose every page the guest wrote, both modes, `reps` times.
fn table_sync_clear(reps: usize) {
    println!(
        "\n1 GiB, every page written by the guest before each measurement ({reps} reps, median):"
    );
    println!("{:<8} {:>14} {:>14}", "mode", "log_sync ms", "log_clear ms");
    for (name, choice) in [
        ("legacy", Some(KvmDirtyLogMode::Legacy)),
        (
            "manual",
            Some(KvmDirtyLogMode::Manual {
                initially_set: true,
            }),
        ),
    ] {
        let rig = Rig::new(choice, sweep_spec());
        rig.runner().pause().unwrap();
        // Start from a synced, cleared state.
        rig.memory.log_sync_all().unwrap();
        rig.clear_all();
        let (mut syncs, mut clears) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            rig.dirty_everything();
            let t = Instant::now();
            rig.memory.log_sync_all().unwrap();
            syncs.push(t.elapsed());
            let t = Instant::now();
            rig.clear_all();
            clears.push(t.elapsed());
        }
        syncs.sort();
        clears.sort();
        println!(
            "{name:<8} {:>14.3} {:>14.3}",
            ms(syncs[reps / 2]),
            ms(clears[reps / 2])
        );
        let s = rig.listener.stats();
        assert!(s.pages_synced >= reps as u64 * (GIB / 4096), "{s:?}");
    }
}

/// Re-arming a GiB the guest wrote completely, chunk by chunk as migration does (one
/// `clear_dirty_bitmap_block` per chunk), for several chunk sizes, `reps` times: the per-call cost
/// of the clear path (cache, locks, ioctl) against the per-page cost of write-protecting.
fn table_chunk_clear(reps: usize) {
    println!("\n1 GiB re-armed in chunks after the guest wrote every page ({reps} reps, median):");
    println!(
        "{:<8} {:>8} {:>12} {:>12}",
        "chunk", "calls", "total ms", "us/call"
    );
    let rig = Rig::paused_manual();
    let block = rig.memory.region_block(rig.region).unwrap().0;
    for chunk in [256 << 10, MIB, 4 * MIB, 16 * MIB, 64 * MIB] {
        let calls = GIB / chunk;
        let mut times = Vec::new();
        for _ in 0..reps {
            rig.dirty_everything();
            rig.memory.log_sync_all().unwrap();
            let t = Instant::now();
            for i in 0..calls {
                rig.memory
                    .clear_dirty_bitmap_block(&block, INFRA_END + i * chunk, chunk)
                    .unwrap();
            }
            times.push(t.elapsed());
        }
        times.sort();
        let med = times[reps / 2];
        println!(
            "{:<8} {:>8} {:>12.3} {:>12.2}",
            format!("{}K", chunk >> 10),
            calls,
            ms(med),
            med.as_secs_f64() * 1e6 / calls as f64
        );
    }
    let s = rig.listener.stats();
    assert!(s.pages_cleared >= GIB / 4096, "{s:?}");
}

/// Guest write rate (pages/s) over `window`.
fn rate(rig: &Rig, window: Duration) -> f64 {
    let mon = WorkloadMonitor::new(&rig.ram, 1);
    let p0 = mon.pages_written().unwrap();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let p1 = mon.pages_written().unwrap();
    (p1 - p0) as f64 / t0.elapsed().as_secs_f64()
}

/// The guest's write throughput right after a sync vs. steady state.
fn table_throughput_dip(reps: usize) {
    let window = Duration::from_millis(50);
    println!(
        "\nGuest write rate, unpaced random over 1 GiB, {reps} x 50 ms windows (mean, M pages/s):"
    );
    println!(
        "{:<24} {:>10} {:>14} {:>8}",
        "mode / operation", "steady", "after op", "ratio"
    );
    for (name, choice, clear) in [
        ("legacy: sync (GET)", Some(KvmDirtyLogMode::Legacy), false),
        (
            "manual: sync (GET)",
            Some(KvmDirtyLogMode::Manual {
                initially_set: true,
            }),
            false,
        ),
        (
            "manual: sync + clear all",
            Some(KvmDirtyLogMode::Manual {
                initially_set: true,
            }),
            true,
        ),
    ] {
        let rig = Rig::new(
            choice,
            WorkloadSpec::Random {
                wss_bytes: GIB,
                dirty_rate_bytes_per_s: 0,
                seed: 42,
            },
        );
        // Settle: one full sync/clear, then let the guest fault everything back in.
        rig.memory.log_sync_all().unwrap();
        if choice != Some(KvmDirtyLogMode::Legacy) {
            rig.clear_all();
        }
        let (mut steady, mut after) = (0.0, 0.0);
        for _ in 0..reps {
            std::thread::sleep(Duration::from_millis(700));
            steady += rate(&rig, window);
            rig.memory.log_sync_all().unwrap();
            if clear {
                rig.clear_all();
            }
            after += rate(&rig, window);
        }
        let (steady, after) = (steady / reps as f64, after / reps as f64);
        println!(
            "{name:<24} {:>10.2} {:>14.2} {:>8.2}",
            steady / 1e6,
            after / 1e6,
            after / steady
        );
    }
    println!(
        "(1 page/s = 4 KiB/s; {} MiB = {} pages)\n",
        GIB / MIB,
        GIB / 4096
    );
}

fn bench(c: &mut Criterion) {
    if !kvm_ok() {
        return;
    }
    // `CLEARLOG_BENCH_ONLY=chunk_clear` prints just that table (a quick before/after check).
    if std::env::var("CLEARLOG_BENCH_ONLY").as_deref() == Ok("chunk_clear") {
        table_chunk_clear(5);
        return;
    }
    let rig = Rig::paused_manual();
    rig.dirty_everything();
    let mut g = c.benchmark_group("dirty_log_1GiB_manual");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
    // Manual GET does not clear: every sync sees all 262144 pages dirty.
    g.bench_function("log_sync", |b| {
        b.iter(|| rig.memory.log_sync_all().unwrap());
    });
    // Each clear needs a fresh sync with everything dirty: toggling logging with INITIALLY_SET
    // sets every bit again without re-protecting anything (the pages stay mapped writable).
    g.bench_function("log_clear", |b| {
        b.iter_batched(
            || {
                rig.memory.log_global_stop().unwrap();
                rig.memory.log_global_start().unwrap();
                rig.memory.log_sync_all().unwrap();
            },
            |()| rig.clear_all(),
            BatchSize::PerIteration,
        );
    });
    g.finish();
    drop(rig);

    table_sync_clear(5);
    table_chunk_clear(5);
    table_throughput_dip(8);
}

criterion_group!(benches, bench);
criterion_main!(benches);
