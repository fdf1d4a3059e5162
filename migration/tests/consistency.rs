// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Migration under a concurrent writer, without KVM: destination == source at switchover.
//!
//! The "accelerator" is either a fake KVM-like listener with a per-slot cache and a guest writer that
//! sets its kernel dirty bits (exercises the chunked-clear path), or memory-api's own host-write
//! tracking (`RamBlock::write`).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clearlog_migration::*;
use common::*;
use rand::{Rng, SeedableRng};

struct Outcome {
    src: Result<MigrationStats>,
    dst: Result<IncomingStats>,
    diff: Vec<(String, u64)>,
    vm_src: Arc<TestVm>,
    vm_dst: Arc<TestVm>,
    src_logging: bool,
    progress: Vec<Progress>,
}

/// The mid-pass sync interval a seed runs with.
fn mid_pass_sync(seed: u64) -> Option<Duration> {
    (seed % 8 < 4).then_some(Duration::from_millis(20))
}

fn run(
    seed: u64,
    mode: MigrationDirtyLogMode,
    verify: VerifyMode,
    accel: bool,
    read_before_clear: bool,
    rate: u64,
) -> Outcome {
    let src = memory(LAYOUT);
    let fake = Arc::new(FakeAccel::default());
    let tracking = if accel {
        src.register_listener(fake.clone()).unwrap();
        Tracking::Accel(fake.clone())
    } else {
        Tracking::Host
    };
    prefill(&src, seed);
    let dst = memory(LAYOUT);
    let vm_src = Arc::new(TestVm {
        state: state_blobs(),
        ..TestVm::default()
    });
    let vm_dst = Arc::new(TestVm::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let active = Duration::from_millis(rng.random_range(150..400));
    let writer = spawn_writer(&src, tracking, vm_src.gate.clone(), seed, rate, active);
    let config = MigrationConfig::default()
        .with_mode(mode)
        .with_bandwidth_limit_bytes_per_s(32 << 20)
        .with_downtime_limit(Duration::from_millis(10))
        .with_max_time(Some(Duration::from_secs(30)))
        .with_verify(verify)
        // Legacy mode: half the seeds also sync within passes (every 20 ms), half do not.
        .with_mid_pass_sync(mid_pass_sync(seed));
    let (src_t, dst_t) = mem_channel();
    let mut progress = Vec::new();
    let (src_res, dst_res) = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&dst).receive(dst_t, &*vm_dst));
        let mut cb = |p: &Progress| progress.push(p.clone());
        let cancel = CancelToken::new();
        let r = if read_before_clear {
            let wrong_order = ReadBeforeClear::new(&src);
            Source::new(&wrong_order, config).unwrap().migrate(
                src_t,
                &*vm_src,
                Some(&mut cb),
                &cancel,
            )
        } else {
            Source::new(&src, config)
                .unwrap()
                .migrate(src_t, &*vm_src, Some(&mut cb), &cancel)
        };
        (r, d.join().unwrap())
    });
    // The source guest is still paused on success: its RAM is the switchover state.
    let diff = diff_ram(&src, &dst);
    vm_src.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    if accel && !read_before_clear {
        assert_eq!(
            fake.clears_before_sync.load(Ordering::Relaxed),
            0,
            "a clear came before any sync"
        );
    }
    Outcome {
        src: src_res,
        dst: dst_res,
        diff,
        vm_src,
        vm_dst,
        src_logging: src.global_logging(),
        progress,
    }
}

fn assert_clean(o: &Outcome, what: &str) {
    let stats = o
        .src
        .as_ref()
        .unwrap_or_else(|e| panic!("{what}: source failed: {e}"));
    let inc = o
        .dst
        .as_ref()
        .unwrap_or_else(|e| panic!("{what}: destination failed: {e}"));
    assert!(
        o.diff.is_empty(),
        "{what}: {} pages differ, first {:?}",
        o.diff.len(),
        &o.diff[..o.diff.len().min(5)]
    );
    assert!(stats.converged && inc.resumed && inc.acked, "{what}");
    assert_eq!(o.vm_dst.resumes.load(Ordering::SeqCst), 1, "{what}");
    assert_eq!(
        o.vm_src.resumes.load(Ordering::SeqCst),
        0,
        "{what}: source guest resumed after success"
    );
    assert_eq!(*o.vm_dst.restored.lock().unwrap(), state_blobs(), "{what}");
    assert!(!o.src_logging, "{what}: logging still on");
    assert_eq!(inc.pages_received, stats.pages_sent, "{what}");
    assert!(
        stats.iterations >= 1 && stats.dirty_syncs == stats.iterations + 2 + stats.mid_pass_syncs,
        "{what}"
    );
    assert!(
        stats.zero_pages > 0,
        "{what}: the prefill leaves zero pages"
    );
    assert!(
        !o.progress.is_empty() && o.progress.last().unwrap().paused,
        "{what}"
    );
    assert_eq!(
        o.progress.iter().filter(|p| !p.paused).count() as u32,
        stats.iterations,
        "{what}"
    );
}

#[test]
fn fake_accel_clear_and_legacy_many_seeds() {
    let modes = [
        MigrationDirtyLogMode::Clear { shift: 6 },
        MigrationDirtyLogMode::Legacy,
        MigrationDirtyLogMode::Clear { shift: 7 },
        MigrationDirtyLogMode::Clear { shift: 31 },
    ];
    for seed in 0..12u64 {
        let mode = modes[seed as usize % modes.len()];
        let digest = if seed % 3 == 0 {
            VerifyMode::Strict
        } else {
            VerifyMode::AfterResume
        };
        let o = run(seed, mode, digest, true, false, 30_000);
        let what = format!("seed {seed} {mode:?} {digest:?}");
        assert_clean(&o, &what);
        let stats = o.src.as_ref().unwrap();
        assert!(
            o.vm_src.gate.writes.load(Ordering::Relaxed) > 1000,
            "{what}: the writer barely ran"
        );
        assert!(
            stats.resent_pages > 0,
            "{what}: the writer dirtied nothing that was resent"
        );
        assert!(stats.iterations >= 2, "{what}: expected several iterations");
        match mode {
            MigrationDirtyLogMode::Clear { shift } => {
                assert_eq!(stats.mode, "clear");
                assert_eq!(stats.clear_chunk_bytes, 4096 << shift);
                // Shift 6 on 8 MiB: adjacent 64-page chunks are re-armed together up to 4 MiB
                // (1024 pages) a call, so the first pass alone takes at least 2048 / 1024 calls,
                // and fewer calls than chunks shows the merging.
                if shift == 6 {
                    let first = &stats.iteration_history[0];
                    assert!(first.log_clear_calls >= 2048 / 1024, "{what}");
                    assert!(
                        first.log_clear_calls < 2048 / 64,
                        "{what}: clears not merged"
                    );
                }
            }
            MigrationDirtyLogMode::Legacy => {
                assert_eq!(stats.mode, "legacy");
                // A first pass of 8 MiB at 32 MiB/s takes ~250 ms: several 20 ms intervals.
                if mid_pass_sync(seed).is_some() {
                    assert!(stats.mid_pass_syncs > 0, "{what}: no sync within a pass");
                } else {
                    assert_eq!(stats.mid_pass_syncs, 0, "{what}");
                }
                assert_eq!(
                    stats.log_clear_calls,
                    2 * u64::from(stats.dirty_syncs),
                    "{what}: 2 blocks per sync"
                );
            }
            MigrationDirtyLogMode::Ring => unreachable!("not one of this test's modes"),
        }
    }
}

#[test]
fn host_write_tracking_many_seeds() {
    for seed in 100..106u64 {
        let mode = if seed % 2 == 0 {
            MigrationDirtyLogMode::Clear { shift: 6 }
        } else {
            MigrationDirtyLogMode::Legacy
        };
        let o = run(seed, mode, VerifyMode::Strict, false, false, 30_000);
        assert_clean(&o, &format!("host seed {seed}"));
        assert!(o.src.as_ref().unwrap().resent_pages > 0);
    }
}

/// The ordering rule matters: reading a chunk before re-arming it loses writes, and the digest check
/// catches it: the destination refuses (never resumes) and the source guest is resumed.
#[test]
fn read_before_clear_is_detected() {
    let mut detected = 0;
    for seed in 200..206u64 {
        let o = run(
            seed,
            MigrationDirtyLogMode::Clear { shift: 6 },
            VerifyMode::Strict,
            true,
            true,
            60_000,
        );
        match (&o.src, &o.dst) {
            (Ok(_), Ok(_)) => assert!(o.diff.is_empty(), "seed {seed}: silent corruption"),
            (src, dst) => {
                assert!(
                    matches!(dst, Err(Error::DigestMismatch { .. })),
                    "seed {seed}: {dst:?}"
                );
                assert!(
                    matches!(src, Err(Error::DestinationRefused(_))),
                    "seed {seed}: {src:?}"
                );
                assert_eq!(
                    o.vm_dst.resumes.load(Ordering::SeqCst),
                    0,
                    "destination resumed a bad guest"
                );
                assert_eq!(o.vm_dst.restores.load(Ordering::SeqCst), 0);
                assert_eq!(
                    o.vm_src.resumes.load(Ordering::SeqCst),
                    1,
                    "source guest not resumed"
                );
                assert!(!o.diff.is_empty());
                assert!(!o.src_logging);
                detected += 1;
            }
        }
    }
    eprintln!("read-before-clear: {detected}/6 runs lost writes, all detected");
    assert!(
        detected >= 4,
        "only {detected}/6 runs lost writes: the test no longer shows the race"
    );
}

/// The default verification sees what dirty tracking lost, outside the downtime: with the wrong
/// order the migration commits, the destination resumes, and then both sides report exactly the
/// pages that differ; the source, committed, stays paused (its guest intact for a fallback).
#[test]
fn verification_after_resume_detects_tracking_losses() {
    let mut detected = 0;
    for seed in 300..306u64 {
        let o = run(
            seed,
            MigrationDirtyLogMode::Clear { shift: 6 },
            VerifyMode::AfterResume,
            true,
            true,
            60_000,
        );
        if o.diff.is_empty() {
            assert!(o.src.is_ok() && o.dst.is_ok(), "seed {seed}: false alarm");
            continue;
        }
        let lost = o.diff.len() as u64;
        match &o.dst {
            Err(Error::VerificationFailed {
                mismatched_pages,
                first,
                ..
            }) => {
                assert_eq!(*mismatched_pages, lost, "seed {seed}: destination count");
                assert!(first.contains("page"), "seed {seed}: {first}");
            }
            other => panic!("seed {seed}: {lost} pages lost, destination said {other:?}"),
        }
        match &o.src {
            Err(Error::VerificationFailed {
                mismatched_pages, ..
            }) => assert_eq!(*mismatched_pages, lost, "seed {seed}: source count"),
            other => panic!("seed {seed}: {lost} pages lost, source said {other:?}"),
        }
        assert_eq!(o.vm_dst.resumes.load(Ordering::SeqCst), 1, "seed {seed}");
        assert_eq!(
            o.vm_src.resumes.load(Ordering::SeqCst),
            0,
            "seed {seed}: a committed source must stay paused"
        );
        assert!(!o.src_logging);
        detected += 1;
    }
    eprintln!("verification after resume: {detected}/6 runs lost writes, all detected");
    assert!(
        detected >= 4,
        "only {detected}/6 runs lost writes: the test no longer shows the race"
    );
}
