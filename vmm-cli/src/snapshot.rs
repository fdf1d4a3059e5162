// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm snapshot`: live snapshots of a running guest, a full one then diffs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clearlog_memory::{DirtyEpochs, MemorySystem};
use clearlog_migration::snapshot::{SnapshotEpochs, SnapshotOptions, SnapshotStats, Snapshotter};
use clearlog_migration::{Bitmap, BoxError, StateBlob, VmControl};
use clearlog_test_guest::{Guest, GuestConfig};

use crate::args::{SnapshotArgs, WorkloadKind};
use crate::chain::ErrorChain;
use crate::fault::Fault;
use crate::setup::{builtin_workload, validate_guest, vm_dirty_log};
use crate::units::{fmt_duration, fmt_rate, fmt_size};
use crate::{CliError, CliResult};
use vmm_cli::vm_control::GuestControl;

/// The file of snapshot `n` in `dir`.
pub fn snapshot_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("snap-{n}.clsnap"))
}

/// The guest's dirty epochs; with `--fault lose-dirty-bits=N`, the first delta of the last
/// snapshot loses N pages, and its later deltas lose them too: those pages keep an older
/// snapshot's data in the chain (the first delta of a diff is exact: its epoch began in the
/// previous pause).
struct Epochs<'a> {
    inner: DirtyEpochs<&'a MemorySystem>,
    /// Set before the last snapshot: bits still to drop.
    lose: AtomicU64,
    /// Per block, the pages dropped so far.
    dropped: Vec<Bitmap>,
}

impl Epochs<'_> {
    fn lost(&self) -> u64 {
        self.dropped.iter().map(|b| b.count_ones() as u64).sum()
    }
}

impl SnapshotEpochs for Epochs<'_> {
    fn advance(&mut self) -> Result<Vec<Bitmap>, BoxError> {
        let mut delta = SnapshotEpochs::advance(&mut self.inner)?;
        if self.dropped.is_empty() {
            self.dropped = delta.iter().map(|b| Bitmap::new(b.len())).collect();
        }
        for (bits, dropped) in delta.iter_mut().zip(&mut self.dropped) {
            let left = self.lose.swap(0, Ordering::SeqCst) as usize;
            let ones: Vec<usize> = bits.iter_ones().take(left).collect();
            self.lose
                .store((left - ones.len()) as u64, Ordering::SeqCst);
            ones.into_iter().for_each(|p| dropped.set(p));
            bits.and_not_assign(dropped);
        }
        Ok(delta)
    }
}

/// `vmm snapshot`: boot, warm up, take `--count` snapshots `--every` apart, report.
pub fn snapshot(a: SnapshotArgs) -> CliResult {
    let lose = check(&a)?;
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| CliError::Usage(format!("--dir {}: {e}", a.dir.display())))?;
    let guest = Guest::boot(GuestConfig {
        mem_bytes: a.guest.mem,
        vcpus: a.guest.vcpus,
        dirty_log: vm_dirty_log(a.dirty_log, a.ring_size)?,
        workload: builtin_workload(a.workload, &a.guest)?,
        ..GuestConfig::default()
    })
    .map_err(|e| CliError::Failed(format!("cannot start the guest: {}", e.chain())))?;
    std::thread::sleep(a.warmup);
    let written_before = guest.pages_written().unwrap_or(0);
    let start = Instant::now();
    let (taken, lost) = take_chain(&a, &guest, lose)?;
    let rate = guest
        .pages_written()
        .unwrap_or(0)
        .saturating_sub(written_before) as f64
        * 4096.0
        / start.elapsed().as_secs_f64();
    let full = match a.paused_full_dump {
        true => Some(paused_full_dump(&a, &guest)?),
        false => None,
    };
    report(&a, &taken, full.as_ref(), rate, lost);
    let failures = guest.vcpu_failures();
    if !failures.is_empty() {
        return Err(CliError::Failed(format!("the guest failed: {failures:?}")));
    }
    Ok(())
}

/// The usage checks; the dirty bits `--fault` drops.
fn check(a: &SnapshotArgs) -> CliResult<u64> {
    validate_guest(&a.guest, a.workload)?;
    if a.workload == WorkloadKind::Image {
        return Err(CliError::Usage(
            "vmm snapshot runs the built-in workloads (random, increment, idle)".into(),
        ));
    }
    if a.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    match a.fault {
        None => Ok(0),
        Some(Fault::LoseDirtyBits(n)) if a.count >= 2 => Ok(n),
        Some(Fault::LoseDirtyBits(_)) => Err(CliError::Usage(
            "--fault lose-dirty-bits needs a diff snapshot: --count 2 or more".into(),
        )),
        Some(f) => Err(CliError::Usage(format!(
            "--fault {f}: vmm snapshot takes lose-dirty-bits=N"
        ))),
    }
}

fn options(a: &SnapshotArgs) -> SnapshotOptions {
    SnapshotOptions {
        sync: !a.no_sync,
        compress: a.compress,
        background_digests: !a.digests_in_pause,
        ..SnapshotOptions::default()
    }
}

/// The chain: `--count` snapshots, one starting every `--every`.
fn take_chain(a: &SnapshotArgs, guest: &Guest, lose: u64) -> CliResult<(Vec<SnapshotStats>, u64)> {
    let mem = guest.memory().as_ref();
    let control = GuestControl(guest);
    let failed =
        |what: &str, e: &dyn std::error::Error| CliError::Failed(format!("{what}: {}", e.chain()));
    let epochs = Epochs {
        inner: DirtyEpochs::open(mem).map_err(|e| failed("opening the dirty epochs", &e))?,
        lose: AtomicU64::new(0),
        dropped: Vec::new(),
    };
    let mut snap = Snapshotter::new(mem, epochs, &control, options(a));
    let mut taken = Vec::new();
    for n in 0..a.count {
        let due = Instant::now() + a.every;
        if n + 1 == a.count {
            snap.epochs().lose.store(lose, Ordering::SeqCst);
        }
        let path = snapshot_path(&a.dir, n);
        let stats = snap
            .snapshot(&path)
            .map_err(|e| failed(&format!("snapshot {}", path.display()), &e))?;
        if !a.json {
            print_one(&path, &stats);
        }
        taken.push(stats);
        if n + 1 < a.count {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
    let epochs = snap.into_epochs();
    let lost = epochs.lost();
    epochs
        .inner
        .close()
        .map_err(|e| failed("closing the dirty epochs", &e))?;
    Ok((taken, lost))
}

/// The usual way, for comparison: the guest paused while all of its memory is written.
fn paused_full_dump(a: &SnapshotArgs, guest: &Guest) -> CliResult<SnapshotStats> {
    let failed = |e: &dyn std::error::Error| {
        CliError::Failed(format!("the paused full dump: {}", e.chain()))
    };
    let mem = guest.memory().as_ref();
    let epochs = DirtyEpochs::open(mem).map_err(|e| failed(&e))?;
    let paused = Instant::now();
    guest.pause().map_err(|e| failed(&e))?;
    // Paused already: the snapshot's own pause and resume must not touch the guest.
    let options = SnapshotOptions {
        max_live_passes: 1,
        background_digests: false,
        ..options(a)
    };
    let still = StillPaused(guest);
    let mut snap = Snapshotter::new(mem, epochs, &still, options);
    let stats = snap.snapshot(&a.dir.join("full-paused.clsnap"));
    let pause_ms = paused.elapsed().as_secs_f64() * 1e3;
    let resumed = guest.resume();
    let mut stats = stats.map_err(|e| failed(&e))?;
    resumed.map_err(|e| failed(&e))?;
    snap.into_epochs().close().map_err(|e| failed(&e))?;
    stats.pause_ms = pause_ms;
    Ok(stats)
}

/// A guest its owner paused already.
struct StillPaused<'a>(&'a Guest);

impl VmControl for StillPaused<'_> {
    fn pause(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        GuestControl(self.0).save_state()
    }
}

fn print_one(path: &Path, s: &SnapshotStats) {
    let kind = if s.sequence == 0 { "full" } else { "diff" };
    println!(
        "{kind} {}: {} pages ({} zero) on {} of disk; paused {:.1} ms (last delta {} pages), done in {}",
        path.display(),
        s.pages,
        s.zero_pages,
        fmt_size(s.disk_bytes),
        s.pause_ms,
        s.pause_pages,
        fmt_duration(Duration::from_secs_f64(s.total_ms / 1e3)),
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn report(
    a: &SnapshotArgs,
    taken: &[SnapshotStats],
    full: Option<&SnapshotStats>,
    rate: f64,
    lost: u64,
) {
    let diffs: Vec<f64> = taken.iter().skip(1).map(|s| s.pause_ms).collect();
    let max = diffs.iter().copied().fold(0.0, f64::max);
    if a.json {
        let v = serde_json::json!({
            "snapshots": taken,
            "diff_pause_ms_median": median(diffs.clone()),
            "diff_pause_ms_max": max,
            "paused_full_dump": full,
            "guest_write_rate_bytes_per_s": rate.round() as u64,
            "lost_dirty_bits": lost,
            "newest": snapshot_path(&a.dir, a.count - 1),
        });
        println!("{v}");
        return;
    }
    if !diffs.is_empty() {
        println!(
            "diff pauses: median {:.1} ms, max {max:.1} ms; the guest wrote {} meanwhile",
            median(diffs),
            fmt_rate(rate as u64)
        );
    }
    if let Some(f) = full {
        println!(
            "full dump with the guest paused: {:.0} ms paused, {} pages, {} of disk",
            f.pause_ms,
            f.pages,
            fmt_size(f.disk_bytes)
        );
    }
    if lost > 0 {
        println!("--fault: {lost} dirty bits dropped from the last delta");
    }
    println!(
        "restore: vmm incoming --from file:{} [--lazy]",
        snapshot_path(&a.dir, a.count - 1).display()
    );
}
