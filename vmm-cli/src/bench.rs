// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm bench`: the reference experiment (docs/design.md section 5), scaled to this machine. Each
//! run is two processes (`vmm incoming` and `vmm run --migrate-to`, [`crate::bench_run`]) on
//! loopback TCP; runs of different modes are interleaved so slow drifts of the machine spread
//! over all modes alike.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::args::{BenchArgs, MidPassSync, DEFAULT_DIRTY_RATE};
use crate::bench_run::{one_run, RunResult, RunSpec};
use crate::bench_scenario::{runs_and_modes, BenchScenario, BenchTransport};
use crate::bench_tls::BenchTls;
use crate::{CliError, CliResult};

/// The scenarios of a bench: every mode with every transport, and their table labels (one
/// transport keeps each mode's own label).
struct Scenarios {
    list: Vec<(BenchScenario, BenchTransport)>,
    labels: Vec<String>,
    /// The table's references, each a ratio column: `legacy-qemu` (the seed's baseline, QEMU-style
    /// legacy) and `legacy` (ours, syncing within passes) over the first transport, those present.
    baselines: Vec<usize>,
}

impl Scenarios {
    fn new(a: &BenchArgs) -> CliResult<Self> {
        let modes = runs_and_modes(a.runs, &a.modes, "legacy,clear:128M")?;
        let transports = if a.transports.is_empty() {
            vec![BenchTransport::plain(a.migration.channels)]
        } else {
            a.transports
                .iter()
                .map(|t| BenchTransport::parse(t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(CliError::Usage)?
        };
        let list: Vec<(BenchScenario, BenchTransport)> = modes
            .iter()
            .flat_map(|m| transports.iter().map(move |t| (m.clone(), *t)))
            .collect();
        let labels = list
            .iter()
            .map(|(m, t)| match transports.len() {
                1 => m.label(),
                _ => format!("{} {}", m.label(), t.label()),
            })
            .collect();
        let baselines = [BenchScenario::LegacyQemu, BenchScenario::Legacy]
            .iter()
            .filter_map(|b| list.iter().position(|(m, t)| m == b && *t == transports[0]))
            .collect();
        Ok(Scenarios {
            list,
            labels,
            baselines,
        })
    }

    /// The legend under the table: what each mode is (with the bench's `--mid-pass-sync`) and
    /// what the ratio columns divide by.
    fn legend(&self, mid_pass_sync: MidPassSync) -> Vec<String> {
        let mut lines = Vec::new();
        let mut seen = Vec::new();
        for (m, _) in &self.list {
            if !seen.contains(&m) {
                seen.push(m);
                lines.push(format!("  {:<14} {}", m.label(), m.describe(mid_pass_sync)));
            }
        }
        for &b in &self.baselines {
            lines.push(format!(
                "  {:<14} avg (s) over that of {}, {}",
                format!("vs {}", self.labels[b]),
                self.labels[b],
                self.list[b].0.describe(mid_pass_sync)
            ));
        }
        lines
    }

    /// Whether any scenario runs over TLS.
    fn tls(&self) -> bool {
        self.list.iter().any(|(_, t)| t.tls)
    }
}

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
    let scenarios = Scenarios::new(&a)?;
    eprintln!(
        "vmm bench: guest {}, {}; {} run(s) of {} mode(s)",
        crate::units::fmt_size(a.guest.mem),
        crate::output::settings_label(
            a.guest.wss,
            a.guest.dirty_rate.unwrap_or(DEFAULT_DIRTY_RATE),
            a.migration.bandwidth,
            a.migration.downtime
        ),
        a.runs,
        scenarios.list.len()
    );
    let results = run_all(&a, &scenarios)?;
    let labels = &scenarios.labels;
    print_table(labels, &scenarios.baselines, &results, a.runs);
    println!("modes:");
    for line in scenarios.legend(a.migration.mid_pass_sync) {
        println!("{line}");
    }
    if let Some(mut rows) = compare {
        let ours = results
            .iter()
            .map(|r| (labels[r.mode].clone(), &r.source, r.verified));
        let mut all = crate::compare::vmm_rows(ours);
        all.append(&mut rows);
        crate::compare::print_table(&all);
    }
    if let Some(path) = &a.json {
        write_json(path, &scenarios, &results)?;
    }
    if let Some(path) = &a.plot {
        crate::plot::plot(path, labels, &results_for_plot(&results))
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

/// Every scenario `--runs` times, interleaved, each run's line printed as it ends.
fn run_all(a: &BenchArgs, scenarios: &Scenarios) -> CliResult<Vec<RunResult>> {
    let tls = if scenarios.tls() {
        Some(BenchTls::make()?)
    } else {
        None
    };
    let timeout = Duration::from_secs(300);
    let mut results = Vec::new();
    for run in 1..=a.runs {
        for (i, (mode, transport)) in scenarios.list.iter().enumerate() {
            let spec = RunSpec {
                transport: *transport,
                tls_dir: tls.as_ref().map(|t| t.dir().to_path_buf()),
                ..RunSpec::from_bench(a)
            };
            let t = Instant::now();
            let r = one_run(&spec, mode, i, run, timeout)?;
            eprintln!(
                "  run {run}/{} {:<14} total {:>7.2} s ({})  downtime {:>6.1} ms  iterations {:>3}  ns/page src {:.0} dst {:.0}  {}  ({:.0} s wall)",
                a.runs,
                scenarios.labels[i],
                r.f64("total_time_ms") / 1e3,
                match r.f64("floor_s") {
                    f if f.is_nan() => "no floor model for this run".to_string(),
                    f => format!("{:+.1}% vs floor {f:.2} s", r.f64("vs_floor_pct")),
                },
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
    Ok(results)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean total seconds of the verified runs of scenario `i`.
fn mean_total_s(results: &[RunResult], i: usize) -> f64 {
    mean(
        &results
            .iter()
            .filter(|r| r.mode == i && r.verified)
            .map(|r| r.f64("total_time_ms") / 1e3)
            .collect::<Vec<_>>(),
    )
}

/// The ratio columns of the table: for each baseline scenario, its header (`vs legacy-qemu`)
/// and the mean total seconds the ratios divide by.
fn ratio_columns(
    labels: &[String],
    baselines: &[usize],
    results: &[RunResult],
) -> Vec<(String, f64)> {
    baselines
        .iter()
        .map(|&b| (format!("vs {}", labels[b]), mean_total_s(results, b)))
        .collect()
}

/// The table of runs by scenario (`labels`); a ratio column to each of the `baselines`.
fn print_table(labels: &[String], baselines: &[usize], results: &[RunResult], runs: u32) {
    let refs = ratio_columns(labels, baselines, results);
    let width = labels.iter().map(String::len).max().unwrap_or(0).max(14);
    print!("{:<width$}", "scenario");
    for run in 1..=runs {
        print!(" {:>7}", format!("run{run}"));
    }
    print!(
        " {:>8} {:>13} {:>11} {:>11} {:>6} {:>12}",
        "avg (s)", "downtime (ms)", "pages sent", "resent", "iters", "guest MiB/s"
    );
    for (head, _) in &refs {
        print!(" {head:>9}");
    }
    println!(" {:>10} {:>11}", "stall (ms)", "write MiB/s");
    for (i, label) in labels.iter().enumerate() {
        let rs: Vec<&RunResult> = results.iter().filter(|r| r.mode == i).collect();
        print!("{label:<width$}");
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
        // The guest's own view of the live phase: worst stall of any run, mean achieved rate.
        let stall = ok
            .iter()
            .map(|r| r.f64("guest_max_stall_ms"))
            .fold(f64::NAN, f64::max);
        print!(
            " {:>8.2} {:>13.1} {:>11.0} {:>11.0} {:>6.1} {:>12.0}",
            total,
            avg("downtime_ms"),
            avg("pages_sent"),
            avg("resent_pages"),
            avg("iterations"),
            // What the guest really dirtied while being migrated.
            avg("guest_dirty_rate_during_migration_bytes_per_s") / (1u64 << 20) as f64,
        );
        for (head, base) in &refs {
            let ratio = match base {
                l if *l > 0.0 && !ok.is_empty() => format!("{:.2}x", total / l),
                _ => "-".into(),
            };
            print!(" {ratio:>w$}", w = head.len().max(9));
        }
        println!(
            " {:>10.1} {:>11.0}",
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

fn write_json(path: &Path, scenarios: &Scenarios, results: &[RunResult]) -> CliResult {
    let mut out = String::new();
    for r in results {
        let mut v = r.source.clone();
        if !v.is_object() {
            v = serde_json::json!({});
        }
        let map = v.as_object_mut().expect("object");
        map.insert("run".into(), r.run.into());
        map.insert("verified".into(), r.verified.into());
        map.insert("scenario".into(), scenarios.labels[r.mode].clone().into());
        let transport = scenarios.list[r.mode].1;
        map.insert("tls".into(), transport.tls.into());
        map.insert("channels".into(), transport.channels.into());
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
fn results_for_plot(results: &[RunResult]) -> Vec<(usize, f64, Vec<f64>)> {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn bench_args(extra: &[&str]) -> BenchArgs {
        let argv = ["vmm", "bench"].iter().chain(extra);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Bench(a)) => a,
            other => panic!("not a bench: {other:?}"),
        }
    }

    #[test]
    fn the_default_modes_have_both_legacy_rows_each_a_ratio_column() {
        let s = Scenarios::new(&bench_args(&[])).unwrap();
        assert_eq!(s.labels[..3], ["legacy-qemu", "legacy", "clear 1 GiB"]);
        assert_eq!(s.baselines, [0, 1]);
        let legend = s.legend(MidPassSync(Some(Duration::from_millis(250))));
        for line in [
            "  legacy-qemu    legacy (QEMU-style: one sync per pass)",
            "  legacy         legacy (syncs within passes: --mid-pass-sync 250ms)",
            "  vs legacy-qemu avg (s) over that of legacy-qemu, legacy (QEMU-style: one sync per pass)",
            "  vs legacy      avg (s) over that of legacy, legacy (syncs within passes: --mid-pass-sync 250ms)",
        ] {
            assert!(legend.iter().any(|l| l == line), "`{line}` not in {legend:#?}");
        }
        // One legend line per mode, whatever the transports.
        let s = Scenarios::new(&bench_args(&["--transports", "plain:1,tls:1"])).unwrap();
        assert_eq!(s.legend(MidPassSync(None)).len(), 6 + 2);
        assert_eq!(s.labels[s.baselines[0]], "legacy-qemu plain x1");
        let s = Scenarios::new(&bench_args(&["--modes", "clear:16M"])).unwrap();
        assert!(s.baselines.is_empty());
    }

    #[test]
    fn ratio_columns_name_their_baseline() {
        let run = |mode, total_ms: f64, verified| RunResult {
            mode,
            run: 1,
            verified,
            problem: None,
            source: serde_json::json!({ "total_time_ms": total_ms }),
        };
        let results = [
            run(0, 18_000.0, true),
            run(0, 19_000.0, true),
            run(0, 1_000.0, false),
            run(1, 14_000.0, true),
            run(2, 13_000.0, true),
        ];
        let labels = ["legacy-qemu", "legacy", "clear 1 MiB"].map(String::from);
        assert_eq!(
            ratio_columns(&labels, &[0, 1], &results),
            [
                ("vs legacy-qemu".to_string(), 18.5),
                ("vs legacy".to_string(), 14.0)
            ]
        );
    }
}
