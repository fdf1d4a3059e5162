// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm bench`: the reference experiment (docs/design.md section 5), scaled to this machine. Each
//! run is two processes (`vmm incoming` and `vmm run --migrate-to`, [`crate::bench_run`]) on
//! loopback TCP; runs of different modes are interleaved so slow drifts of the machine spread
//! over all modes alike.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::args::{BenchArgs, DEFAULT_DIRTY_RATE};
use crate::bench_run::{one_run, RunResult, RunSpec};
use crate::bench_scenario::{runs_and_modes, BenchScenario};
use crate::{CliError, CliResult};

/// `vmm bench`.
pub fn bench(a: BenchArgs) -> CliResult {
    crate::setup::validate_guest(&a.guest, crate::args::WorkloadKind::Random)?;
    crate::setup::validate_migration(&a.migration)?;
    // Read the comparison first: a malformed file fails before any run.
    let compare = a.compare.as_deref().map(crate::compare::load).transpose()?;
    if a.runs == 0 {
        if let Some(rows) = &compare {
            crate::compare::print_table(rows);
            return Ok(());
        }
    }
    let modes = runs_and_modes(a.runs, &a.modes, "legacy,clear:128M")?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "vmm bench: guest {} MiB, working set {} MiB, dirty rate {:.0} MiB/s, bandwidth {:.0} MiB/s, downtime {} ms; {} run(s) of {} mode(s)",
        a.guest.mem >> 20,
        a.guest.wss >> 20,
        mib(a.guest.dirty_rate.unwrap_or(DEFAULT_DIRTY_RATE)),
        mib(a.migration.bandwidth),
        a.migration.downtime.as_millis(),
        a.runs,
        modes.len()
    );
    let timeout = Duration::from_secs(300);
    let spec = RunSpec::from_bench(&a);
    let mut results = Vec::new();
    for run in 1..=a.runs {
        for (i, mode) in modes.iter().enumerate() {
            let t = Instant::now();
            let r = one_run(&spec, mode, i, run, timeout)?;
            eprintln!(
                "  run {run}/{} {:<14} total {:>7.2} s ({:+.1}% vs floor {:.2} s)  downtime {:>6.1} ms  iterations {:>3}  ns/page src {:.0} dst {:.0}  {}  ({:.0} s wall)",
                a.runs,
                mode.label(),
                r.f64("total_time_ms") / 1e3,
                r.f64("vs_floor_pct"),
                r.f64("floor_s"),
                r.f64("downtime_ms"),
                r.source["iterations"],
                r.f64("source_ns_per_page"),
                r.f64("dest_ns_per_page"),
                if r.verified { "verified".to_string() } else { format!("NOT VERIFIED: {}", r.problem.clone().unwrap_or_default()) },
                t.elapsed().as_secs_f64()
            );
            results.push(r);
        }
    }
    print_table(&modes, &results, a.runs);
    if let Some(mut rows) = compare {
        let ours = results
            .iter()
            .map(|r| (modes[r.mode].label(), &r.source, r.verified));
        let mut all = crate::compare::vmm_rows(ours);
        all.append(&mut rows);
        crate::compare::print_table(&all);
    }
    if let Some(path) = &a.json {
        write_json(path, &modes, &results)?;
    }
    if let Some(path) = &a.plot {
        crate::plot::plot(path, &modes, &results_for_plot(&modes, &results))
            .map_err(|e| CliError::Failed(format!("drawing {}: {e}", path.display())))?;
        eprintln!("vmm bench: plot written to {}", path.display());
    }
    let failed = results.iter().filter(|r| !r.verified).count();
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {} runs did not complete and verify",
            results.len()
        )));
    }
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn print_table(modes: &[BenchScenario], results: &[RunResult], runs: u32) {
    let legacy_avg = modes
        .iter()
        .position(|m| *m == BenchScenario::Legacy)
        .map(|i| {
            mean(
                &results
                    .iter()
                    .filter(|r| r.mode == i && r.verified)
                    .map(|r| r.f64("total_time_ms") / 1e3)
                    .collect::<Vec<_>>(),
            )
        });
    print!("{:<14}", "scenario");
    for run in 1..=runs {
        print!(" {:>7}", format!("run{run}"));
    }
    println!(
        " {:>8} {:>13} {:>11} {:>11} {:>6} {:>12} {:>9} {:>10} {:>11}",
        "avg (s)",
        "downtime (ms)",
        "pages sent",
        "resent",
        "iters",
        "guest MiB/s",
        "vs legacy",
        "stall (ms)",
        "write MiB/s"
    );
    for (i, mode) in modes.iter().enumerate() {
        let rs: Vec<&RunResult> = results.iter().filter(|r| r.mode == i).collect();
        print!("{:<14}", mode.label());
        for r in &rs {
            if r.verified {
                print!(" {:>7.2}", r.f64("total_time_ms") / 1e3);
            } else {
                print!(" {:>7}", "FAIL");
            }
        }
        let ok: Vec<&&RunResult> = rs.iter().filter(|r| r.verified).collect();
        let avg = |k: &str| mean(&ok.iter().map(|r| r.f64(k)).collect::<Vec<_>>());
        let total = avg("total_time_ms") / 1e3;
        let ratio = match legacy_avg {
            Some(l) if l > 0.0 && !ok.is_empty() => format!("{:.2}x", total / l),
            _ => "-".into(),
        };
        // The guest's own view of the live phase: worst stall of any run, mean achieved rate.
        let stall = ok
            .iter()
            .map(|r| r.f64("guest_max_stall_ms"))
            .fold(f64::NAN, f64::max);
        println!(
            " {:>8.2} {:>13.1} {:>11.0} {:>11.0} {:>6.1} {:>12.0} {:>9} {:>10.1} {:>11.0}",
            total,
            avg("downtime_ms"),
            avg("pages_sent"),
            avg("resent_pages"),
            avg("iterations"),
            // What the guest really dirtied while being migrated.
            avg("guest_dirty_rate_during_migration_bytes_per_s") / (1u64 << 20) as f64,
            ratio,
            stall,
            avg("guest_write_rate_bytes_per_s") / (1u64 << 20) as f64
        );
    }
    let failed = results.iter().filter(|r| !r.verified).count();
    println!(
        "{} runs, {} verified (both sides verified: destination memory == source final memory at switchover; RAM fingerprints equal){}",
        results.len(),
        results.len() - failed,
        if failed > 0 { "; FAILED runs are excluded from the averages" } else { "" }
    );
}

fn write_json(path: &Path, modes: &[BenchScenario], results: &[RunResult]) -> CliResult {
    let mut out = String::new();
    for r in results {
        let mut v = r.source.clone();
        if !v.is_object() {
            v = serde_json::json!({});
        }
        let map = v.as_object_mut().expect("object");
        map.insert("run".into(), r.run.into());
        map.insert("verified".into(), r.verified.into());
        map.insert("scenario".into(), modes[r.mode].label().into());
        if let Some(p) = &r.problem {
            map.insert("problem".into(), p.clone().into());
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    std::fs::write(path, out)
        .map_err(|e| CliError::Failed(format!("writing {}: {e}", path.display())))
}

/// What the plot needs of each run: (mode index, total seconds, remaining bytes per iteration).
fn results_for_plot(
    _modes: &[BenchScenario],
    results: &[RunResult],
) -> Vec<(usize, f64, Vec<f64>)> {
    results
        .iter()
        .filter(|r| r.verified)
        .map(|r| {
            let remaining = r.source["iteration_history"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i["remaining_bytes"].as_f64())
                        .collect()
                })
                .unwrap_or_default();
            (r.mode, r.f64("total_time_ms") / 1e3, remaining)
        })
        .collect()
}
