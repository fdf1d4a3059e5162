// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask soak --runs N [--seed S]`: N migrations with random workloads, sizes, modes and
//! shifts, one at a time over loopback TCP, each verified three ways:
//! - the default verification (the source's final memory against the destination's at switchover:
//!   a mismatch makes both sides exit 3 and name the count; `verified` in both JSONs),
//! - the increment rule on the destination (increment workload),
//! - the source's RAM fingerprint at switchover equals the destination's.
//!
//! Sources use the default session mostly, one version-1 stream (`--channels 0`) or 1 or 4 page
//! channels now and then; every other session (the first included) runs over mutual TLS with the
//! test certificates (`migration/tests/data/tls`; the destination's certificate names 127.0.0.1).
//!
//! About one run in eight makes a loss on purpose instead (`crate::loss`, each kind in turn):
//! it must be caught on both sides, or repaired by the destination; a loss not caught while a
//! side says `verified` fails the soak.

use std::time::{Duration, Instant};

use crate::harness::{
    build_vmm, check_opts, dest_outcome, digest_mismatches, incoming_cmd, incoming_tls_args, is_ci,
    jbool, jstr, ju64, kvm_usable, leftover_children, opt_value, source_tls_args, Proc, Rng, Shape,
    Workload,
};
use crate::loss::{run_loss, Loss};

const MIB: u64 = 1 << 20;

#[derive(Debug, Default)]
struct Totals {
    runs: u32,
    ok: u32,
    failed: u32,
    increment_runs: u32,
    increment_bad_pages: u64,
    increment_inconsistent: u32,
    digest_mismatched_pages: u64,
    fingerprint_mismatches: u32,
    legacy: u32,
    ring: u32,
    clear: u32,
    /// Runs over one version-1 stream, over a session, and sessions over mutual TLS.
    v1: u32,
    sessions: u32,
    tls: u32,
    /// Sessions without TLS (loss runs left out).
    plain_sessions: u32,
    total_ms: f64,
    downtime_ms: Vec<f64>,
    over_downtime: u32,
    /// Runs with a loss made on purpose (`--fault`), how many were handled as they must be, and
    /// how many were not caught while a side said `verified` (must be 0).
    loss_runs: u32,
    losses_handled: u32,
    losses_undetected: u32,
}

/// `cargo xtask soak`.
pub fn soak(args: &[String]) -> Result<(), String> {
    check_opts(args, &["--runs", "--seed", "--max-mem"])?;
    let runs: u32 = opt_value(args, "--runs")?.unwrap_or(200);
    let seed: u64 = opt_value(args, "--seed")?.unwrap_or_else(Rng::clock_seed);
    let max_mem_mib: u64 = opt_value(args, "--max-mem")?.unwrap_or(1024);
    if let Err(e) = kvm_usable() {
        if is_ci() && std::path::Path::new("/dev/kvm").exists() {
            return Err(format!("soak: {e} (CI=true)"));
        }
        println!("soak: SKIPPED: {e}");
        return Ok(());
    }
    let vmm = build_vmm()?;
    // Ring runs only where the kernel has the dirty ring (`vmm caps --json` says).
    let ring = std::process::Command::new(&vmm)
        .args(["caps", "--json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .is_some_and(|v| v["dirty_ring"] == true);
    if !ring {
        println!("soak: no dirty ring on this host: ring runs left out");
    }
    println!(
        "\n==> xtask soak: {runs} random migrations (128M-{max_mem_mib}M guests), seed {seed} (rerun with --seed {seed})"
    );
    let mut rng = Rng::new(seed);
    let mut t = Totals::default();
    let start = Instant::now();
    for i in 0..runs {
        let shape = Shape::random(&mut rng, 128 * MIB, max_mem_mib.max(128) * MIB, 80)
            .maybe_ring(&mut rng, if ring { 25 } else { 0 });
        let shape = shape.with_channels(pick_channels(&mut rng));
        // A longer warm-up lets the workload touch more pages: longer streams.
        let warmup_ms = rng.range(300, 2500);
        let t0 = Instant::now();
        // One run in eight makes a loss on purpose (each kind in turn).
        let loss = rng
            .chance(12)
            .then(|| Loss::ALL[(t.loss_runs as usize) % Loss::ALL.len()]);
        // Every other session (not a loss run) over TLS, the first one included: short soaks too.
        let tls = loss.is_none() && shape.channels != Some(0) && t.plain_sessions >= t.tls;
        let (ok, note) = match loss {
            None => match run_one(&vmm, &shape, warmup_ms, tls, &mut t) {
                Ok(()) => (true, String::new()),
                Err(e) => (false, e),
            },
            Some(loss) => run_loss_one(&vmm, loss, &shape, warmup_ms, &mut t),
        };
        t.count(ok, &shape, tls, loss.is_some());
        if !ok || (i + 1) % 10 == 0 || runs <= 20 || loss.is_some() {
            println!(
                "  {:>4}/{runs} {:<44} warm-up {:>4} ms {:>5.1}s {} {note}",
                i + 1,
                match (loss, tls) {
                    (Some(l), _) => format!("{} {}", shape.describe(), l.name()),
                    (None, true) => format!("{} tls", shape.describe()),
                    (None, false) => shape.describe(),
                },
                warmup_ms,
                t0.elapsed().as_secs_f64(),
                if ok { "ok" } else { "FAIL" },
            );
        }
    }
    let left = leftover_children();
    println!(
        "\n==> xtask soak summary (seed {seed}, {:.0} s)",
        start.elapsed().as_secs_f64()
    );
    t.print(left.len());
    t.verdict(left.len())
}

impl Totals {
    /// Counts one run: `ok`, its shape's mode, its transport (a version-1 stream, or a session
    /// over `tls` or not; a `loss` run's session counts in neither TLS nor plain sessions).
    fn count(&mut self, ok: bool, shape: &Shape, tls: bool, loss: bool) {
        self.runs += 1;
        if ok {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
        match (shape.ring_bytes, shape.clear_shift) {
            (Some(_), _) => self.ring += 1,
            (None, None) => self.legacy += 1,
            (None, Some(_)) => self.clear += 1,
        }
        if shape.channels == Some(0) {
            self.v1 += 1;
        } else {
            self.sessions += 1;
            self.tls += u32::from(tls);
            self.plain_sessions += u32::from(!tls && !loss);
        }
    }

    /// Pages the checks found different (must be 0).
    fn mismatched(&self) -> u64 {
        self.increment_bad_pages + self.digest_mismatched_pages
    }

    /// The downtime at percentile `p` (0..=1) of the verified runs.
    fn downtime_pct(&self, p: f64) -> f64 {
        let mut dt = self.downtime_ms.clone();
        dt.sort_by(f64::total_cmp);
        dt.get(((dt.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    }

    /// The summary table (`stray` child processes left).
    fn print(&self, stray: usize) {
        let t = self;
        println!(
            "  runs                        {:>8}   (legacy {}, clear {}, ring {})",
            t.runs, t.legacy, t.clear, t.ring
        );
        println!(
            "  version-1 streams           {:>8}   (sessions {}, of which over TLS {})",
            t.v1, t.sessions, t.tls
        );
        println!("  verified                    {:>8}", t.ok);
        println!("  failed                      {:>8}", t.failed);
        println!(
            "  increment runs              {:>8}   (inconsistent {})",
            t.increment_runs, t.increment_inconsistent
        );
        println!("  increment-rule bad pages    {:>8}", t.increment_bad_pages);
        println!(
            "  digest-table mismatches     {:>8}   pages",
            t.digest_mismatched_pages
        );
        println!(
            "  fingerprint mismatches      {:>8}   runs",
            t.fingerprint_mismatches
        );
        println!(
            "  MISMATCHED PAGES            {:>8}   (must be 0)",
            t.mismatched()
        );
        println!(
            "  migration time              {:>8.0}   ms mean; downtime p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            if t.ok > 0 { t.total_ms / f64::from(t.ok) } else { 0.0 },
            t.downtime_pct(0.5),
            t.downtime_pct(0.99),
            t.downtime_pct(1.0)
        );
        println!(
            "  downtime over 2x its limit  {:>8}   runs (not a correctness failure)",
            t.over_downtime
        );
        println!(
            "  losses made on purpose      {:>8}   runs ({} handled: caught on both sides, or repaired by the destination)",
            t.loss_runs, t.losses_handled
        );
        println!(
            "  LOSSES NOT CAUGHT           {:>8}   (must be 0: memory differed while a side said verified)",
            t.losses_undetected
        );
        println!("  stray child processes       {stray:>8}");
    }

    /// Every run verified, nothing mismatched or undetected, no stray process.
    fn verdict(&self, stray: usize) -> Result<(), String> {
        let mismatched = self.mismatched();
        if self.failed == 0
            && mismatched == 0
            && self.fingerprint_mismatches == 0
            && self.losses_undetected == 0
            && stray == 0
        {
            println!("soak: all {} runs verified, 0 mismatched pages", self.runs);
            return Ok(());
        }
        Err(format!(
            "soak: {} of {} runs failed, {mismatched} mismatched pages, {} fingerprint mismatches, {} losses not caught, {stray} stray processes",
            self.failed, self.runs, self.fingerprint_mismatches, self.losses_undetected
        ))
    }
}

/// A run with a loss made on purpose: see [`crate::loss`].
fn run_loss_one(
    vmm: &std::path::Path,
    loss: Loss,
    shape: &Shape,
    warmup_ms: u64,
    t: &mut Totals,
) -> (bool, String) {
    t.loss_runs += 1;
    match run_loss(vmm, loss, shape, warmup_ms) {
        Ok(o) => {
            t.losses_handled += u32::from(o.ok);
            t.losses_undetected += u32::from(o.undetected);
            (o.ok && !o.undetected, o.note)
        }
        Err(e) => (false, format!("harness error: {e}")),
    }
}

/// The source's `--channels`: the default session mostly, now and then one version-1 stream,
/// one page channel or four.
fn pick_channels(rng: &mut Rng) -> Option<u32> {
    match rng.range(0, 9) {
        0 | 1 => Some(0),
        2 => Some(1),
        3 | 4 => Some(4),
        _ => None,
    }
}

/// Starts a destination, then a source migrating to it (over mutual TLS if `tls`): (destination,
/// source).
fn spawn_pair(
    vmm: &std::path::Path,
    shape: &Shape,
    warmup_ms: u64,
    tls: bool,
) -> Result<(Proc, Proc), String> {
    let mut incoming = incoming_cmd(vmm, &[], "127.0.0.1");
    if tls {
        incoming.args(incoming_tls_args());
    }
    let mut dst = Proc::spawn("incoming", incoming)?;
    let uri = dst.listen_uri()?;
    let mut cmd = std::process::Command::new(vmm);
    cmd.args(shape.run_args());
    if tls {
        cmd.args(source_tls_args("src-a", None));
    }
    cmd.args([
        format!("--migrate-to={uri}"),
        format!("--warmup={warmup_ms}ms"),
        "--max-time=60s".into(),
        "--ram-fingerprint".into(),
        "--json".into(),
    ]);
    let src = Proc::spawn("source", cmd)?;
    Ok((dst, src))
}

fn run_one(
    vmm: &std::path::Path,
    shape: &Shape,
    warmup_ms: u64,
    tls: bool,
    t: &mut Totals,
) -> Result<(), String> {
    let (mut dst, mut src) = spawn_pair(vmm, shape, warmup_ms, tls)?;
    let src_status = src.wait_timeout(Duration::from_secs(120));
    let dst_status = dst.wait_timeout(Duration::from_secs(60));
    let d = dest_outcome(&dst);
    let sj = src.json();

    let digest_bad = digest_mismatches(&dst.stderr());
    t.digest_mismatched_pages += digest_bad;
    let mut errors = Vec::new();
    if shape.workload == Workload::Increment {
        t.increment_runs += 1;
        let bad = ju64(&d.json, "increment_bad_pages").unwrap_or(0);
        t.increment_bad_pages += bad;
        if jbool(&d.json, "increment_consistent") == Some(false) {
            t.increment_inconsistent += 1;
            errors.push(format!("increment rule broken ({bad} bad pages)"));
        } else if d.json.is_some() && jbool(&d.json, "increment_consistent").is_none() {
            errors.push("destination did not check the increment rule".into());
        }
    }
    if digest_bad > 0 {
        errors.push(format!(
            "{digest_bad} pages differ from the source's final memory"
        ));
    }
    // Every check passed, on both sides (the default verification after resuming included).
    if jbool(&sj, "verified") != Some(true) || jbool(&d.json, "verified") != Some(true) {
        errors.push(format!(
            "not verified: source {:?}, destination {:?}",
            jbool(&sj, "verified"),
            jbool(&d.json, "verified")
        ));
    }
    let fp_src = jstr(&sj, "ram_fingerprint");
    let fp_dst = jstr(&d.json, "ram_fingerprint");
    if fp_src.is_some() && fp_dst.is_some() && fp_src != fp_dst {
        t.fingerprint_mismatches += 1;
        errors.push(format!("fingerprints differ: {fp_src:?} vs {fp_dst:?}"));
    }
    match &src_status {
        Ok(s) if s.success() => {}
        other => errors.push(format!(
            "source {:?}: {}",
            other.as_ref().map(|s| s.code()),
            src.error_line().unwrap_or_default()
        )),
    }
    match &dst_status {
        Ok(s) if s.success() && d.resumed => {}
        other => errors.push(format!(
            "destination {:?}: {}",
            other.as_ref().map(|s| s.code()),
            dst.error_line().unwrap_or_default()
        )),
    }
    if fp_src.is_none() || fp_dst.is_none() {
        errors.push("missing a RAM fingerprint".into());
    }
    if errors.is_empty() {
        if let Some(v) = sj
            .as_ref()
            .and_then(|j| j.get("total_time_ms"))
            .and_then(|v| v.as_f64())
        {
            t.total_ms += v;
        }
        if let Some(v) = sj
            .as_ref()
            .and_then(|j| j.get("downtime_ms"))
            .and_then(|v| v.as_f64())
        {
            t.downtime_ms.push(v);
            if v > 2.0 * shape.downtime_ms as f64 {
                t.over_downtime += 1;
            }
        }
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_modes_and_fail_on_anything_mismatched() {
        let mut t = Totals::default();
        let mut rng = Rng::new(7);
        let shape = Shape::random(&mut rng, 128 * MIB, 256 * MIB, 80);
        t.count(true, &shape.clone().with_channels(Some(0)), false, false);
        t.count(false, &shape.clone().with_channels(None), true, false);
        t.count(true, &shape.clone().with_channels(Some(4)), false, false);
        t.count(true, &shape.with_channels(Some(1)), false, true);
        assert_eq!((t.runs, t.ok, t.failed), (4, 3, 1));
        assert_eq!(t.legacy + t.clear + t.ring, 4);
        assert_eq!((t.v1, t.sessions, t.tls, t.plain_sessions), (1, 3, 1, 1));
        assert!(t.verdict(0).is_err());
        let mut t = Totals {
            runs: 1,
            ok: 1,
            downtime_ms: vec![30.0, 10.0, 20.0],
            ..Totals::default()
        };
        assert_eq!((t.downtime_pct(0.5), t.downtime_pct(1.0)), (20.0, 30.0));
        t.verdict(0).unwrap();
        t.digest_mismatched_pages = 1;
        assert!(t.verdict(0).is_err());
    }
}
