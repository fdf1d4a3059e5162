// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Real-KVM live migration, source and destination in one process over TCP loopback, with the
//! `increment` workload: the destination's RAM (before it resumes) must pass the increment rule
//! and equal the paused source's RAM (byte for byte, and by `ram_fingerprint` in some runs: it
//! costs seconds in debug builds), in legacy mode and in clear
//! mode for shifts 6, 12, 15, 18 and 31, also with a display-like (Vga) dirty client syncing and
//! clearing concurrently; then the destination guest must keep running. Plus a `file:` snapshot
//! through the `vmm` binary, restored by a second process.
//!
//! Sizes and rates are scaled to debug builds on a shared 2-core machine: the debug migration engine
//! moves only about 10-20 MiB/s (it hashes every page with an unoptimized xxh3), so the guest
//! writes 4 MiB/s under an 8 MiB/s bandwidth limit; that still takes several iterations.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clearlog_kvm::KvmDirtyLogMode;
use clearlog_memory::DirtyClient;
use clearlog_migration::{
    connect, ram_fingerprint, CancelToken, Destination, Listener, MigrationConfig,
    MigrationDirtyLogMode, MigrationStats, Source,
};
use clearlog_test_guest::layout::DEFAULT_WSS_START;
use clearlog_test_guest::workload::check::check_increment;
use clearlog_test_guest::workload::{set_dirty_rate, WorkloadSpec};
use clearlog_test_guest::{Guest, GuestConfig};
use common::*;

const MIB: u64 = 1 << 20;
const MEM: u64 = 128 * MIB;
const WSS: u64 = 8 * MIB;
const DIRTY_RATE: u64 = 4 * MIB;
const BANDWIDTH: u64 = 8 * MIB;

/// Run a Vga-like client (log_sync + snapshot_and_clear_dirty in a loop) during the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Display {
    Off,
    On,
}

fn boot_source(dirty_log: Option<KvmDirtyLogMode>, vcpus: u32) -> Guest {
    let guest = Guest::boot(GuestConfig {
        mem_bytes: MEM,
        vcpus,
        dirty_log,
        workload: WorkloadSpec::Increment {
            wss_bytes: WSS,
            dirty_rate_bytes_per_s: DIRTY_RATE,
        },
        ..GuestConfig::default()
    })
    .expect("boot the source guest");
    // Let the guest sweep its whole working set once: untouched pages go as cheap zero ranges, and
    // the first pass must carry real data for the later passes to have something to resend.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while guest.pages_written().unwrap_or(0) < WSS / 4096 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not sweep its working set"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    guest
}

/// Migrates a running increment guest over TCP loopback, checks the destination before and after
/// it resumes, and returns the source's stats.
///
/// The destination's RAM is always compared byte for byte with the source's; with `fingerprint`
/// the two `ram_fingerprint`s are compared too (about 2.5 s per side for 128 MiB in a debug build,
/// so only some runs do it).
fn migrate_and_check(
    dirty_log: Option<KvmDirtyLogMode>,
    mode: MigrationDirtyLogMode,
    display: Display,
    fingerprint: bool,
) -> MigrationStats {
    migrate_and_check_on(1, dirty_log, mode, display, fingerprint)
}

/// [`migrate_and_check`] of a guest with `vcpus` vCPUs, each sweeping its own part.
fn migrate_and_check_on(
    vcpus: u32,
    dirty_log: Option<KvmDirtyLogMode>,
    mode: MigrationDirtyLogMode,
    display: Display,
    fingerprint: bool,
) -> MigrationStats {
    let label = format!("{mode:?} (VM {dirty_log:?}, display {display:?}, {vcpus} vCPUs)");
    let src = boot_source(dirty_log, vcpus);
    if matches!(mode, MigrationDirtyLogMode::Clear { .. }) {
        assert!(
            src.dirty_log_mode().is_manual(),
            "{label}: the VM fell back to {} although this host offers manual protection",
            src.dirty_log_mode()
        );
    } else {
        assert!(
            !src.dirty_log_mode().is_manual(),
            "{label}: legacy VM reports manual mode"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let dst = Guest::create(GuestConfig {
        mem_bytes: MEM,
        vcpus: 0,
        ..GuestConfig::default()
    })
    .expect("create the destination guest");

    let listener = Listener::bind("tcp:127.0.0.1:0").expect("bind");
    let uri = listener.local_uri().expect("local uri");
    let config = MigrationConfig::default()
        .with_mode(mode)
        .with_bandwidth_limit_bytes_per_s(BANDWIDTH)
        .with_downtime_limit(Duration::from_millis(100))
        .with_max_time(Some(Duration::from_secs(60)));
    let region = src.memory().sections()[0].region;
    let stop = AtomicBool::new(false);
    let snapshots = AtomicU64::new(0);
    let vga_dirty = AtomicU64::new(0);

    let (stats, incoming) = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let t = listener.accept().expect("accept");
            Destination::new(dst.memory()).receive_paused(t, &GuestControl(&dst))
        });
        let vga = (display == Display::On).then(|| {
            s.spawn(|| {
                let mem = src.memory();
                mem.set_region_logging(region, DirtyClient::Vga, true)
                    .expect("Vga logging on");
                while !stop.load(Ordering::Relaxed) {
                    mem.log_sync(region).expect("Vga log_sync");
                    let snap = mem
                        .snapshot_and_clear_dirty(region, 0, MEM, DirtyClient::Vga)
                        .expect("snapshot_and_clear_dirty");
                    let dirty = (0..WSS / 4096)
                        .filter(|p| snap.is_dirty(DEFAULT_WSS_START + p * 4096))
                        .count() as u64;
                    vga_dirty.fetch_add(dirty, Ordering::Relaxed);
                    snapshots.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(500));
                }
                mem.set_region_logging(region, DirtyClient::Vga, false)
                    .expect("Vga logging off");
            })
        });
        let source = Source::new(src.memory(), config).expect("config");
        let stats = source.migrate(
            connect(&uri).expect("connect"),
            &GuestControl(&src),
            None,
            &CancelToken::new(),
        );
        stop.store(true, Ordering::Relaxed);
        if let Some(v) = vga {
            v.join().expect("Vga thread");
        }
        (stats, receiver.join().expect("receiver thread"))
    });
    let stats = stats.unwrap_or_else(|e| panic!("{label}: migration failed: {e}"));
    let incoming = incoming.unwrap_or_else(|e| panic!("{label}: incoming failed: {e}"));
    eprintln!(
        "{label}: {} iterations, {} pages sent ({} resent), downtime {:.1} ms, total {:.0} ms, {} clears; Vga {} snapshots saw {} dirty pages",
        stats.iterations,
        stats.pages_sent,
        stats.resent_pages,
        stats.downtime_ms,
        stats.total_time_ms,
        stats.log_clear_calls,
        snapshots.load(Ordering::Relaxed),
        vga_dirty.load(Ordering::Relaxed),
    );
    assert!(stats.converged, "{label}: not converged: {stats:?}");
    if src.dirty_log_mode().is_ring() {
        let rings = src.listener().ring_stats();
        let l = src.listener().stats();
        eprintln!(
            "{label}: rings {rings:?}, {} entries in {} reaps",
            l.ring_entries, l.ring_reaps
        );
        assert!(
            rings.iter().all(|r| r.harvested > 0),
            "{label}: a vCPU ring was never harvested: {rings:?}"
        );
        assert_eq!(l.ring_foreign, 0, "{label}: {l:?}");
    }
    assert!(incoming.acked && !incoming.resumed, "{label}: {incoming:?}");
    assert_eq!(stats.mode, mode.name());
    // The dirty tracking must really have been exercised: pages dirtied during a pass were resent.
    assert!(
        stats.iterations >= 2,
        "{label}: only {} iteration(s)",
        stats.iterations
    );
    assert!(stats.resent_pages > 0, "{label}: no page was resent");
    assert!(
        stats.iteration_history.iter().any(|i| i.dirty_pages > 0),
        "{label}: no sync found a dirty page"
    );
    if display == Display::On {
        assert!(
            snapshots.load(Ordering::Relaxed) > 0,
            "{label}: the Vga client never ran"
        );
        assert!(
            vga_dirty.load(Ordering::Relaxed) > 0,
            "{label}: the Vga client saw no dirty page"
        );
    }

    // The source stays paused after success: its RAM is the switchover state.
    let written = src.pages_written().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        src.pages_written().unwrap(),
        written,
        "{label}: the source still runs"
    );

    // The destination, before it resumes.
    let check = check_increment(dst.ram()).expect("check_increment");
    assert!(
        check.is_consistent(),
        "{label}: destination breaks the increment rule (lost writes): {check:?}"
    );
    assert_eq!(check.pages, WSS / 4096);
    assert_eq!(
        first_ram_difference(&src, &dst),
        None,
        "{label}: destination RAM differs from the source's (first differing page shown)"
    );
    if fingerprint {
        let (fs, fd) = (
            ram_fingerprint(src.memory(), 2).unwrap(),
            ram_fingerprint(dst.memory(), 2).unwrap(),
        );
        assert_eq!(fs, fd, "{label}: RAM fingerprints differ");
    }
    assert_eq!(
        dst.pages_written().unwrap(),
        written,
        "{label}: counters not migrated"
    );
    drop(src);

    // The destination keeps running: unpace it, then its counters must advance.
    let sweeps = dst.monitor().sweeps_of(0).unwrap();
    let per_vcpu: Vec<u64> = (0..vcpus)
        .map(|i| dst.monitor().pages_written_of(i).unwrap())
        .collect();
    assert_eq!(dst.vcpu_count(), vcpus, "{label}: one vCPU per state blob");
    set_dirty_rate(dst.ram(), dst.tsc_khz(), 0, 1).unwrap();
    dst.resume().expect("resume the destination");
    let start = Instant::now();
    loop {
        let (w, sw) = (
            dst.pages_written().unwrap(),
            dst.monitor().sweeps_of(0).unwrap(),
        );
        if w > written && sw > sweeps {
            break;
        }
        assert!(
            dst.vcpu_failures().is_empty(),
            "{label}: {:?}",
            dst.vcpu_failures()
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{label}: destination makes no progress (pages {written} -> {w}, sweeps {sweeps} -> {sw})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every vCPU resumed on the destination, each in its own part (checked while it runs: a
    // vCPU the host has not scheduled yet writes nothing before a pause).
    for (i, before) in per_vcpu.iter().enumerate() {
        let start = Instant::now();
        while dst.monitor().pages_written_of(i as u32).unwrap() <= *before {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{label}: vCPU {i} makes no progress on the destination"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    dst.pause().unwrap();
    let after = check_increment(dst.ram()).unwrap();
    assert!(
        after.is_consistent(),
        "{label}: resumed destination broke the rule: {after:?}"
    );
    // Legacy (and ring) migrations sync within passes by default: the first pass alone (8 MiB at
    // 8 MiB/s) spans several 250 ms intervals, so the loss checks above covered those syncs.
    if mode == MigrationDirtyLogMode::Legacy {
        assert!(stats.mid_pass_syncs > 0, "{label}: no sync within a pass");
    }
    stats
}

#[test]
fn legacy_mode_migrates_increment_guest_without_loss() {
    if !kvm_available("legacy_mode_migrates_increment_guest_without_loss") {
        return;
    }
    let _serial = serial();
    let stats = migrate_and_check(
        Some(KvmDirtyLogMode::Legacy),
        MigrationDirtyLogMode::Legacy,
        Display::Off,
        true,
    );
    assert_eq!(stats.clear_chunk_bytes, 0);
}

/// The increment rule in ring mode: the migration engine runs as for legacy (a ring sync hands its
/// bits over), the rings (16 KiB, 1024 entries) are reaped by syncs, the reaper thread and
/// ring-full exits.
#[test]
fn ring_mode_migrates_increment_guest_without_loss() {
    if !kvm_available("ring_mode_migrates_increment_guest_without_loss") {
        return;
    }
    let caps = clearlog_kvm::KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
    if clearlog_kvm::RingRange::of(&caps).is_none() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "no dirty ring on a KVM host in CI"
        );
        eprintln!("SKIPPED: ring_mode_migrates_increment_guest_without_loss: no dirty ring");
        return;
    }
    let _serial = serial();
    // Two vCPUs, each incrementing its own part, each with its own (small, so it fills) ring.
    let stats = migrate_and_check_on(
        2,
        Some(KvmDirtyLogMode::Ring { bytes: 16 << 10 }),
        MigrationDirtyLogMode::Legacy,
        Display::On,
        true,
    );
    assert_eq!(stats.clear_chunk_bytes, 0);
}

#[test]
fn clear_mode_migrates_increment_guest_without_loss_for_every_shift() {
    if !kvm_available("clear_mode_migrates_increment_guest_without_loss_for_every_shift") {
        return;
    }
    let _serial = serial();
    for shift in [6u8, 12, 15, 18, 31] {
        let stats = migrate_and_check(
            None,
            MigrationDirtyLogMode::Clear { shift },
            Display::Off,
            matches!(shift, 6 | 31),
        );
        assert_eq!(stats.clear_chunk_bytes, 4096u64 << shift);
        // Small chunks mean several clears per pass over 8 MiB of working set.
        if shift == 6 {
            assert!(
                stats.log_clear_calls > u64::from(stats.iterations),
                "{stats:?}"
            );
        }
    }
}

/// Two vCPUs, each sweeping its own part of the working set: the increment rule holds per part at
/// the destination, in both modes, and the destination runs both vCPUs.
#[test]
fn two_vcpu_increment_guest_migrates_without_loss() {
    if !kvm_available("two_vcpu_increment_guest_migrates_without_loss") {
        return;
    }
    let _serial = serial();
    for (choice, mode) in [
        (None, MigrationDirtyLogMode::Clear { shift: 12 }),
        (Some(KvmDirtyLogMode::Legacy), MigrationDirtyLogMode::Legacy),
    ] {
        let stats = migrate_and_check_on(2, choice, mode, Display::Off, false);
        assert!(stats.iterations >= 1, "{stats:?}");
    }
}

/// The 8-step race of docs/design.md section 2 on real KVM: a display client syncs and clears the
/// same pages as the migration, concurrently. With the per-slot cache no write may be lost.
#[test]
fn vga_client_clearing_during_migration_loses_nothing() {
    if !kvm_available("vga_client_clearing_during_migration_loses_nothing") {
        return;
    }
    let _serial = serial();
    for (i, (choice, mode)) in [
        (None, MigrationDirtyLogMode::Clear { shift: 6 }),
        (None, MigrationDirtyLogMode::Clear { shift: 15 }),
        (
            Some(KvmDirtyLogMode::Manual {
                initially_set: false,
            }),
            MigrationDirtyLogMode::Clear { shift: 6 },
        ),
        (Some(KvmDirtyLogMode::Legacy), MigrationDirtyLogMode::Legacy),
    ]
    .into_iter()
    .enumerate()
    {
        migrate_and_check(choice, mode, Display::On, i == 0);
    }
}

/// `vmm run --migrate-to file:` then `vmm incoming --from file:` in a fresh process.
#[test]
fn file_snapshot_through_the_binary_restores_and_runs() {
    if !kvm_available("file_snapshot_through_the_binary_restores_and_runs") {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("file-snap");
    let uri = format!("file:{}", dir.path().join("vm.snap").display());
    let vmm = env!("CARGO_BIN_EXE_vmm");
    // A paced increment: an unpaced one dirties its whole working set all the time and cannot
    // converge at a 100 ms downtime limit.
    let out = Command::new(vmm)
        .args([
            "run",
            "--mem",
            "128M",
            "--workload",
            "increment",
            "--wss",
            "64M",
        ])
        .args([
            "--dirty-rate",
            "4M",
            "--warmup",
            "300ms",
            "--max-time",
            "60s",
        ])
        .args(["--migrate-to", &uri, "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vmm run failed: {:?}\n{stderr}",
        out.status
    );
    let src: serde_json::Value = serde_json::from_slice(&out.stdout).expect("run --json");
    assert_eq!(src["converged"], true, "{src}");

    let out = Command::new(vmm)
        .args(["incoming", "--from", &uri, "--run-after", "500ms", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vmm incoming failed: {:?}\n{stderr}",
        out.status
    );
    let dst: serde_json::Value = serde_json::from_slice(&out.stdout).expect("incoming --json");
    assert_eq!(dst["workload"], "increment", "{dst}");
    assert_eq!(dst["increment_consistent"], true, "{dst}");
    assert_eq!(dst["increment_bad_pages"], 0, "{dst}");
    assert_eq!(dst["resumed"], true, "{dst}");
    assert_eq!(dst["acked"], false, "a file has no acknowledgement: {dst}");
    assert_eq!(dst["bytes_received"], src["bytes_sent"], "{dst}\n{src}");
    assert!(
        dst["pages_written_after_resume"].as_u64().unwrap() > 0,
        "the restored guest does not run: {dst}"
    );
}

/// Finding: remapping a RAM region during a migration killed the migration (the re-made memslot's
/// cache was never synced and the next chunk clear was refused). Here another thread unmaps and
/// maps an alias of the guest's working set (the guest's own RAM region cannot disappear under a
/// running vCPU: its code and page tables live there) over and over while a real migration in
/// clear mode runs; the migration must succeed and the destination must equal the source (RAM
/// fingerprint) and pass the increment rule.
#[test]
fn remapping_a_ram_region_during_migration_does_not_kill_it() {
    if !kvm_available("remapping_a_ram_region_during_migration_does_not_kill_it") {
        return;
    }
    let _serial = serial();
    let mut clears_of_new_slots = 0;
    for (choice, mode) in [
        (None, MigrationDirtyLogMode::Clear { shift: 6 }),
        (
            Some(KvmDirtyLogMode::Manual {
                initially_set: false,
            }),
            MigrationDirtyLogMode::Clear { shift: 12 },
        ),
    ] {
        let label = format!("{mode:?} (VM {choice:?}) with remaps");
        let src = boot_source(choice, 1);
        assert!(src.dirty_log_mode().is_manual(), "{label}");
        let region = src.memory().sections()[0].region;
        // An alias of the working set at 4 GiB: the same RAM block, its own memslot.
        const ALIAS_GPA: u64 = 1 << 32;
        const REMAPS: u64 = 12;
        let alias = src
            .memory()
            .add_alias("ram0-alias", region, DEFAULT_WSS_START, WSS, ALIAS_GPA, 0)
            .expect("alias of the guest RAM");
        std::thread::sleep(Duration::from_millis(200));
        let dst = Guest::create(GuestConfig {
            mem_bytes: MEM,
            vcpus: 0,
            ..GuestConfig::default()
        })
        .expect("create the destination guest");
        let listener = Listener::bind("tcp:127.0.0.1:0").expect("bind");
        let uri = listener.local_uri().expect("local uri");
        let config = MigrationConfig::default()
            .with_mode(mode)
            .with_bandwidth_limit_bytes_per_s(BANDWIDTH)
            .with_downtime_limit(Duration::from_millis(100))
            .with_max_time(Some(Duration::from_secs(60)));
        let stop = AtomicBool::new(false);
        let remaps = AtomicU64::new(0);
        let (stats, incoming) = std::thread::scope(|s| {
            let receiver = s.spawn(|| {
                let t = listener.accept().expect("accept");
                Destination::new(dst.memory()).receive_paused(t, &GuestControl(&dst))
            });
            let remapper = s.spawn(|| {
                let mem = src.memory();
                // A bounded number of remaps during the first passes: with INITIALLY_SET each one
                // makes the whole alias dirty again (sent in full), so remapping without end
                // would keep the migration from converging.
                while !stop.load(Ordering::Relaxed) && remaps.load(Ordering::Relaxed) < REMAPS {
                    std::thread::sleep(Duration::from_millis(40));
                    mem.unmap_region(alias).expect("unmap the alias");
                    mem.map_region(alias, ALIAS_GPA, 0).expect("map the alias");
                    remaps.fetch_add(1, Ordering::Relaxed);
                }
            });
            let source = Source::new(src.memory(), config).expect("config");
            let stats = source.migrate(
                connect(&uri).expect("connect"),
                &GuestControl(&src),
                None,
                &CancelToken::new(),
            );
            stop.store(true, Ordering::Relaxed);
            remapper.join().expect("remap thread");
            (stats, receiver.join().expect("receiver thread"))
        });
        let stats = stats.unwrap_or_else(|e| panic!("{label}: migration failed: {e}"));
        let incoming = incoming.unwrap_or_else(|e| panic!("{label}: incoming failed: {e}"));
        let clears_before_sync = src.listener().stats().clears_before_sync;
        clears_of_new_slots += clears_before_sync;
        eprintln!(
            "{label}: {} remaps, {} iterations, {} pages sent ({} resent), {} clears, {} clears before a slot's first sync",
            remaps.load(Ordering::Relaxed),
            stats.iterations,
            stats.pages_sent,
            stats.resent_pages,
            stats.log_clear_calls,
            clears_before_sync,
        );
        assert!(stats.converged, "{label}: not converged: {stats:?}");
        assert!(incoming.acked && !incoming.resumed, "{label}: {incoming:?}");
        assert!(remaps.load(Ordering::Relaxed) > 0, "{label}: no remap ran");
        assert!(stats.iterations >= 2, "{label}: {stats:?}");
        let check = check_increment(dst.ram()).expect("check_increment");
        assert!(
            check.is_consistent(),
            "{label}: destination breaks the increment rule (lost writes): {check:?}"
        );
        assert_eq!(check.pages, WSS / 4096);
        assert_eq!(
            ram_fingerprint(src.memory(), 2).unwrap(),
            ram_fingerprint(dst.memory(), 2).unwrap(),
            "{label}: RAM fingerprints differ"
        );
        assert_eq!(
            first_ram_difference(&src, &dst),
            None,
            "{label}: destination RAM differs"
        );
    }
    // The remaps did land between a sync and a chunk clear (the case that used to fail).
    assert!(
        clears_of_new_slots > 0,
        "no chunk clear hit a re-made memslot before its first sync"
    );
}
