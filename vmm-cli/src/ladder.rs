// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm ladder`: the scale ladder. The same working set in ever larger guests (4 GiB to 256 GiB by
//! default), legacy and clear interleaved, each run two processes on loopback TCP exactly as `vmm
//! bench` runs them ([`crate::bench_run::one_run`]); every cost is also reported per GiB of guest RAM,
//! to show which ones grow with the guest rather than with its working set.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::args::{GuestArgs, LadderArgs, WorkloadKind};
use crate::bench_run::{one_run, RunResult, RunSpec};
use crate::bench_scenario::{BenchScenario, BenchTransport};
use crate::units::fmt_size;
use crate::{CliError, CliResult};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// The measured numbers of a run, by name (NaN when the run did not report one).
pub const METRICS: &[&str] = &[
    "total_time_ms",
    "first_pass_ms",
    "downtime_ms",
    "guest_visible_downtime_ms",
    "sync_ms",
    "dirty_syncs",
    "log_sync_ms",
    "log_clear_calls",
    "log_clear_ms",
    "setup_time_ms",
    "zero_range_pages",
    "verify_after_ms",
    "dst_verify_after_ms",
    "src_peak_rss_bytes",
    "dst_peak_rss_bytes",
];

/// One run at one size.
struct Rung {
    size: u64,
    size_index: usize,
    result: RunResult,
    metrics: Map<String, Value>,
}

impl Rung {
    fn get(&self, key: &str) -> f64 {
        self.metrics
            .get(key)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The ladder's numbers of one run, from the source's JSON (with the destination's under
/// `destination`).
pub fn metrics(source: &Value) -> Map<String, Value> {
    let dest = &source["destination"];
    let syncs = num(&source["dirty_syncs"]);
    let sync_ms = if syncs > 0.0 {
        num(&source["log_sync_ms"]) / syncs
    } else {
        f64::NAN
    };
    let values = [
        num(&source["total_time_ms"]),
        num(&source["iteration_history"][0]["pass_ms"]),
        num(&source["downtime_ms"]),
        num(&source["guest_visible_downtime_ms"]),
        sync_ms,
        syncs,
        num(&source["log_sync_ms"]),
        num(&source["log_clear_calls"]),
        num(&source["log_clear_ms"]),
        num(&source["setup_time_ms"]),
        num(&source["zero_range_pages"]),
        num(&source["verify_after_ms"]),
        num(&dest["verify_after_ms"]),
        num(&source["peak_rss_bytes"]),
        num(&dest["peak_rss_bytes"]),
    ];
    let mut m = Map::new();
    for (k, v) in METRICS.iter().zip(values) {
        m.insert((*k).into(), finite(v));
    }
    m
}

/// A JSON number, or null for NaN/inf.
fn finite(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// The ladder's flags, checked before any run; its modes.
fn validate(a: &LadderArgs) -> CliResult<Vec<BenchScenario>> {
    if a.sizes.is_empty() {
        return Err(CliError::Usage(
            "--ladder-sizes is empty: give e.g. 4G,16G,64G,256G".into(),
        ));
    }
    for &mem in &a.sizes {
        let g = GuestArgs {
            mem,
            wss: a.wss,
            dirty_rate: Some(a.dirty_rate),
            vcpus: 1,
        };
        crate::setup::validate_guest(&g, WorkloadKind::Random)
            .map_err(|e| CliError::Usage(format!("--ladder-sizes {}: {e}", fmt_size(mem))))?;
    }
    crate::setup::validate_migration(&a.migration)?;
    crate::bench_scenario::runs_and_modes(a.runs, &a.modes, "legacy,clear:16M")
}

/// `vmm ladder`.
pub fn ladder(a: LadderArgs) -> CliResult {
    let modes = validate(&a)?;
    eprintln!(
        "vmm ladder: guests {}, {}; {} run(s) of {} mode(s){}",
        a.sizes
            .iter()
            .map(|&s| fmt_size(s))
            .collect::<Vec<_>>()
            .join(", "),
        crate::output::settings_label(
            a.wss,
            a.dirty_rate,
            a.migration.bandwidth,
            a.migration.downtime
        ),
        a.runs,
        modes.len(),
        if a.ram_fingerprint {
            ", RAM fingerprints compared"
        } else {
            ""
        }
    );
    let timeout = Duration::from_secs(300);
    let mut rungs = Vec::new();
    for run in 1..=a.runs {
        for (si, &size) in a.sizes.iter().enumerate() {
            let spec = RunSpec {
                mem: size,
                wss: a.wss,
                dirty_rate: a.dirty_rate,
                bandwidth: a.migration.bandwidth,
                downtime: a.migration.downtime,
                warmup: a.warmup,
                ram_fingerprint: a.ram_fingerprint,
                vcpus: 1,
                switchover_bandwidth: a.migration.switchover_bandwidth,
                mid_pass_sync: a.migration.mid_pass_sync,
                transport: BenchTransport::plain(a.migration.channels),
                tls_dir: None,
            };
            for (mi, mode) in modes.iter().enumerate() {
                let t = Instant::now();
                let result = one_run(&spec, mode, mi, run, timeout)?;
                let rung = Rung {
                    size,
                    size_index: si,
                    metrics: metrics(&result.source),
                    result,
                };
                eprintln!(
                    "  run {run}/{} {:>7} {:<14} total {:>7.2} s  first pass {:>8.1} ms  downtime {:>6.1} ms  {}  ({:.0} s wall)",
                    a.runs,
                    size_label(size),
                    mode.label(),
                    rung.get("total_time_ms") / 1e3,
                    rung.get("first_pass_ms"),
                    rung.get("downtime_ms"),
                    if rung.result.verified {
                        "verified".to_string()
                    } else {
                        format!(
                            "NOT VERIFIED: {}",
                            rung.result.problem.clone().unwrap_or_default()
                        )
                    },
                    t.elapsed().as_secs_f64()
                );
                rungs.push(rung);
            }
        }
    }
    print_table(&a.sizes, &modes, &rungs);
    if let Some(path) = &a.json {
        write_json(path, &modes, &rungs)?;
        eprintln!(
            "vmm ladder: {} run(s) written to {}",
            rungs.len(),
            path.display()
        );
    }
    let failed = rungs.iter().filter(|r| !r.result.verified).count();
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {} ladder runs did not complete and verify",
            rungs.len()
        )));
    }
    Ok(())
}

/// `256 GiB`, `512 MiB`.
fn size_label(b: u64) -> String {
    crate::units::human_bytes(b)
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn cell(v: f64, decimals: usize, width: usize) -> String {
    if v.is_finite() {
        format!("{v:>width$.decimals$}")
    } else {
        format!("{:>width$}", "-")
    }
}

/// One row per size x mode: means over the verified runs; `/GiB` columns divide by the guest size.
fn print_table(sizes: &[u64], modes: &[BenchScenario], rungs: &[Rung]) {
    // (header, width, decimals, metric, scale, per GiB)
    let cols: &[(&str, usize, usize, &str, f64, bool)] = &[
        ("total s", 8, 2, "total_time_ms", 1e-3, false),
        ("ms/GiB", 8, 1, "total_time_ms", 1.0, true),
        ("1st pass ms", 11, 1, "first_pass_ms", 1.0, false),
        ("ms/GiB", 8, 1, "first_pass_ms", 1.0, true),
        ("downtime ms", 11, 1, "downtime_ms", 1.0, false),
        (
            "guest-vis ms",
            12,
            1,
            "guest_visible_downtime_ms",
            1.0,
            false,
        ),
        ("sync ms", 8, 2, "sync_ms", 1.0, false),
        ("ms/GiB", 8, 3, "sync_ms", 1.0, true),
        ("syncs", 5, 0, "dirty_syncs", 1.0, false),
        ("clears", 7, 0, "log_clear_calls", 1.0, false),
        ("/GiB", 7, 1, "log_clear_calls", 1.0, true),
        ("clear ms", 8, 1, "log_clear_ms", 1.0, false),
        ("log start ms", 12, 1, "setup_time_ms", 1.0, false),
        ("ms/GiB", 8, 2, "setup_time_ms", 1.0, true),
        ("zero-range pg", 13, 0, "zero_range_pages", 1.0, false),
        ("verify ms", 9, 1, "verify_after_ms", 1.0, false),
        ("src RSS MiB", 11, 0, "src_peak_rss_bytes", 1.0 / MIB, false),
        ("dst RSS MiB", 11, 0, "dst_peak_rss_bytes", 1.0 / MIB, false),
        ("MiB/GiB", 8, 2, "src_peak_rss_bytes", 1.0 / MIB, true),
    ];
    print!("{:>8} {:<14} {:>5}", "guest", "scenario", "ok");
    for (h, w, ..) in cols {
        print!(" {h:>w$}", w = *w);
    }
    println!();
    for (si, &size) in sizes.iter().enumerate() {
        let gib = size as f64 / GIB;
        for (mi, mode) in modes.iter().enumerate() {
            let rs: Vec<&Rung> = rungs
                .iter()
                .filter(|r| r.size_index == si && r.result.mode == mi)
                .collect();
            let ok: Vec<&&Rung> = rs.iter().filter(|r| r.result.verified).collect();
            print!(
                "{:>8} {:<14} {:>5}",
                size_label(size),
                mode.label(),
                format!("{}/{}", ok.len(), rs.len())
            );
            for (_, w, d, key, scale, per_gib) in cols {
                let v = mean(ok.iter().map(|r| r.get(key))) * scale;
                print!(" {}", cell(if *per_gib { v / gib } else { v }, *d, *w));
            }
            println!();
        }
    }
    println!();
    print_downtime_table(modes, rungs);
}

/// Where each run's downtime went (`downtime_breakdown`), and how many runs verified.
fn print_downtime_table(modes: &[BenchScenario], rungs: &[Rung]) {
    let parts = [
        "pause_ms",
        "final_sync_ms",
        "final_pages_ms",
        "state_ms",
        "verify_ms",
        "ack_ms",
        "confirm_ms",
    ];
    print!("{:>8} {:<14} {:>5}", "guest", "downtime (ms)", "run");
    for p in parts {
        print!(" {:>14}", p.trim_end_matches("_ms"));
    }
    println!();
    for r in rungs {
        print!(
            "{:>8} {:<14} {:>5}",
            size_label(r.size),
            modes[r.result.mode].label(),
            r.result.run
        );
        for p in parts {
            print!(
                " {}",
                cell(num(&r.result.source["downtime_breakdown"][p]), 2, 14)
            );
        }
        println!();
    }
    let failed = rungs.iter().filter(|r| !r.result.verified).count();
    println!(
        "{} runs, {} verified (source and destination verified: true{}){}",
        rungs.len(),
        rungs.len() - failed,
        if rungs
            .first()
            .is_some_and(|r| !r.result.source["ram_fingerprint"].is_null())
        {
            ", RAM fingerprints equal"
        } else {
            ""
        },
        if failed > 0 {
            "; FAILED runs are excluded from the means"
        } else {
            ""
        }
    );
}

/// One JSON object per run: the ladder's numbers, each also `_per_gib`, the downtime breakdown, and
/// the full source JSON (destination under `source.destination`).
fn json_line(modes: &[BenchScenario], r: &Rung) -> Value {
    let gib = r.size as f64 / GIB;
    let mut m = Map::new();
    m.insert("guest_mem_bytes".into(), r.size.into());
    m.insert("guest_mem_gib".into(), finite(gib));
    m.insert("scenario".into(), modes[r.result.mode].label().into());
    m.insert("run".into(), r.result.run.into());
    m.insert("verified".into(), r.result.verified.into());
    m.insert(
        "source_verified".into(),
        r.result.source["verified"].clone(),
    );
    m.insert(
        "destination_verified".into(),
        r.result.source["destination"]["verified"].clone(),
    );
    if let Some(p) = &r.result.problem {
        m.insert("problem".into(), p.clone().into());
    }
    for key in METRICS {
        let v = r.get(key);
        m.insert((*key).into(), finite(v));
        m.insert(format!("{key}_per_gib"), finite(v / gib));
    }
    m.insert(
        "downtime_breakdown".into(),
        r.result.source["downtime_breakdown"].clone(),
    );
    m.insert("source".into(), r.result.source.clone());
    Value::Object(m)
}

fn write_json(path: &Path, modes: &[BenchScenario], rungs: &[Rung]) -> CliResult {
    let mut out = String::new();
    for r in rungs {
        out.push_str(&json_line(modes, r).to_string());
        out.push('\n');
    }
    std::fs::write(path, out)
        .map_err(|e| CliError::Failed(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_from_the_source_json() {
        let src = serde_json::json!({
            "total_time_ms": 2000.0,
            "iteration_history": [{"pass_ms": 1500.0}, {"pass_ms": 10.0}],
            "downtime_ms": 20.0,
            "guest_visible_downtime_ms": 25.0,
            "log_sync_ms": 30.0,
            "dirty_syncs": 3,
            "log_clear_calls": 64,
            "log_clear_ms": 4.0,
            "setup_time_ms": 8.0,
            "zero_range_pages": 1000,
            "verify_after_ms": 5.0,
            "peak_rss_bytes": 1 << 30,
            "destination": {"peak_rss_bytes": 2u64 << 30, "verify_after_ms": 6.0},
        });
        let m = metrics(&src);
        assert_eq!(m["first_pass_ms"], 1500.0);
        assert_eq!(m["sync_ms"], 10.0);
        assert_eq!(m["dst_peak_rss_bytes"], (2u64 << 30) as f64);
        assert_eq!(m["dst_verify_after_ms"], 6.0);
        assert_eq!(m.len(), METRICS.len());
        // Missing numbers are null, not NaN (which JSON cannot carry).
        let m = metrics(&serde_json::json!({"dirty_syncs": 0}));
        assert_eq!(m["sync_ms"], Value::Null);
        assert_eq!(m["first_pass_ms"], Value::Null);
    }

    #[test]
    fn json_line_has_per_gib_fields() {
        let source = serde_json::json!({"total_time_ms": 4000.0, "verified": true,
            "destination": {"verified": true}});
        let r = Rung {
            size: 4 << 30,
            size_index: 0,
            metrics: metrics(&source),
            result: RunResult {
                mode: 0,
                run: 1,
                verified: true,
                problem: None,
                source,
            },
        };
        let v = json_line(&[BenchScenario::Legacy], &r);
        assert_eq!(v["total_time_ms_per_gib"], 1000.0);
        assert_eq!(v["guest_mem_gib"], 4.0);
        assert_eq!(v["scenario"], "legacy");
        assert_eq!(v["destination_verified"], true);
    }
}
