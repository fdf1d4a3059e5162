// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm bench`: the seed's experiment, scaled to this machine. Each run is two processes (`vmm
//! incoming` and `vmm run --migrate-to`) on loopback TCP; runs of different modes are interleaved so
//! slow drifts of the machine spread over all modes alike.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::args::{BenchArgs, DEFAULT_DIRTY_RATE};
use crate::output::human_bytes;
use crate::units::parse_size;
use crate::{CliError, CliResult};

/// One scenario of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchMode {
    /// KVM legacy dirty log, clear everything at every sync.
    Legacy,
    /// Manual protect + KVM_CLEAR_DIRTY_LOG in chunks of this many bytes.
    Clear(u64),
    /// KVM's dirty ring of this many bytes per vCPU (`ring` = the `vmm run` default, 64K).
    Ring(u64),
}

impl BenchMode {
    /// Parse `legacy`, `clear:SIZE`, `ring` or `ring:SIZE`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "legacy" {
            return Ok(BenchMode::Legacy);
        }
        if s == "ring" {
            return Ok(BenchMode::Ring(64 << 10));
        }
        if let Some(size) = s.strip_prefix("ring:") {
            let bytes = parse_size(size).map_err(|e| format!("mode `{s}`: {e}"))?;
            if !bytes.is_power_of_two() || bytes < u64::from(clearlog_kvm::RING_MIN_BYTES) {
                return Err(format!(
                    "mode `{s}`: the ring size must be a power of two of at least 4K (`vmm caps` shows this kernel's maximum)"
                ));
            }
            return Ok(BenchMode::Ring(bytes));
        }
        let Some(size) = s.strip_prefix("clear:") else {
            return Err(format!(
                "mode `{s}`: use `legacy`, `clear:SIZE` like clear:128M, `ring` or `ring:SIZE` like ring:64K"
            ));
        };
        let bytes = parse_size(size).map_err(|e| format!("mode `{s}`: {e}"))?;
        clearlog_migration::MigrationDirtyLogMode::from_clear_chunk_bytes(bytes)
            .map_err(|e| format!("mode `{s}`: {e} (a power of two from 256K to 8T)"))?;
        Ok(BenchMode::Clear(bytes))
    }

    /// Table label.
    pub fn label(&self) -> String {
        match self {
            BenchMode::Legacy => "legacy".into(),
            BenchMode::Clear(b) => format!("clear {}", human_bytes(*b)),
            BenchMode::Ring(b) => format!("ring {}", human_bytes(*b)),
        }
    }

    fn run_args(&self) -> Vec<String> {
        match self {
            BenchMode::Legacy => vec!["--dirty-log".into(), "legacy".into()],
            BenchMode::Ring(b) => vec![
                "--dirty-log".into(),
                "ring".into(),
                "--ring-size".into(),
                b.to_string(),
            ],
            BenchMode::Clear(b) => {
                vec![
                    "--dirty-log".into(),
                    "clear".into(),
                    "--clear-chunk".into(),
                    b.to_string(),
                ]
            }
        }
    }
}

/// What one run migrates: the guest, its workload and the migration settings.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// Working set of the `random` workload.
    pub wss: u64,
    /// Guest dirty rate in bytes/s.
    pub dirty_rate: u64,
    /// Bandwidth limit in bytes/s.
    pub bandwidth: u64,
    /// Downtime limit.
    pub downtime: Duration,
    /// Warm-up before migrating.
    pub warmup: Duration,
    /// Compare RAM fingerprints of source and destination (a pass over all RAM on each side).
    pub ram_fingerprint: bool,
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// `--switchover-bandwidth` for the source (None: off).
    pub switchover_bandwidth: Option<u64>,
    /// `--mid-pass-sync` for the source.
    pub mid_pass_sync: crate::args::MidPassSync,
}

impl RunSpec {
    fn from_bench(a: &BenchArgs) -> Self {
        Self {
            mem: a.guest.mem,
            wss: a.guest.wss,
            dirty_rate: a.guest.dirty_rate.unwrap_or(DEFAULT_DIRTY_RATE),
            bandwidth: a.migration.bandwidth,
            downtime: a.migration.downtime,
            warmup: a.warmup,
            ram_fingerprint: true,
            vcpus: a.guest.vcpus,
            switchover_bandwidth: a.migration.switchover_bandwidth,
            mid_pass_sync: a.migration.mid_pass_sync,
        }
    }
}

/// Result of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Index of the mode.
    pub mode: usize,
    /// Run number, from 1.
    pub run: u32,
    /// Both processes succeeded and verified (and the fingerprints matched, when asked).
    pub verified: bool,
    /// Why not.
    pub problem: Option<String>,
    /// The source's JSON, with the destination's under `destination`.
    pub source: serde_json::Value,
}

impl RunResult {
    /// A number of the source's JSON (NaN when missing).
    pub fn f64(&self, key: &str) -> f64 {
        self.source
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    }
}

/// Kill a child on drop (no stray guests if the bench fails half-way).
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn last_json_line(s: &str) -> Option<serde_json::Value> {
    s.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
}

/// One migration between two `vmm` processes on loopback TCP.
pub fn one_run(
    a: &RunSpec,
    mode: &BenchMode,
    mode_index: usize,
    run: u32,
    timeout: Duration,
) -> CliResult<RunResult> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Failed(format!("cannot find the vmm binary: {e}")))?;
    let spawn_err =
        |what: &str, e: std::io::Error| CliError::Failed(format!("cannot start {what}: {e}"));

    let mut dest_args = vec![
        "incoming",
        "--listen",
        "tcp:127.0.0.1:0",
        "--json",
        "--run-after",
        "300ms",
    ];
    if a.ram_fingerprint {
        dest_args.push("--ram-fingerprint");
    }
    let mut dest = KillOnDrop(Some(
        Command::new(&exe)
            .args(&dest_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_err("the destination", e))?,
    ));
    let d = dest.0.as_mut().expect("just spawned");
    let dest_out = read_all(d.stdout.take().expect("piped"));
    // The first stderr line says where the destination listens; keep draining the rest.
    let mut dest_err = BufReader::new(d.stderr.take().expect("piped"));
    let mut line = String::new();
    let uri = loop {
        line.clear();
        if dest_err.read_line(&mut line).unwrap_or(0) == 0 {
            return Err(CliError::Failed(
                "the destination exited before listening".into(),
            ));
        }
        if let Some(uri) = line.trim().strip_prefix("vmm: listening on ") {
            break uri.to_string();
        }
    };
    let dest_err = read_all(dest_err);

    let mut src_args: Vec<String> = vec![
        "run".into(),
        "--mem".into(),
        a.mem.to_string(),
        "--wss".into(),
        a.wss.to_string(),
        "--dirty-rate".into(),
        a.dirty_rate.to_string(),
        "--workload".into(),
        "random".into(),
        "--bandwidth".into(),
        a.bandwidth.to_string(),
        "--downtime".into(),
        format!("{}us", a.downtime.as_micros()),
        "--warmup".into(),
        format!("{}ms", a.warmup.as_millis()),
        "--max-time".into(),
        format!("{}s", timeout.as_secs()),
        "--migrate-to".into(),
        uri,
        "--json".into(),
        "--vcpus".into(),
        a.vcpus.to_string(),
    ];
    if a.ram_fingerprint {
        src_args.push("--ram-fingerprint".into());
    }
    if let Some(bw) = a.switchover_bandwidth {
        src_args.extend(["--switchover-bandwidth".into(), bw.to_string()]);
    }
    src_args.extend(["--mid-pass-sync".into(), a.mid_pass_sync.to_string()]);
    src_args.extend(mode.run_args());
    let mut src = KillOnDrop(Some(
        Command::new(&exe)
            .args(&src_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_err("the source", e))?,
    ));
    let s = src.0.as_mut().expect("just spawned");
    let src_out = read_all(s.stdout.take().expect("piped"));
    let src_err = read_all(s.stderr.take().expect("piped"));
    let src_status = wait_with_timeout(s, timeout + Duration::from_secs(120));
    let dest_status = wait_with_timeout(dest.0.as_mut().expect("spawned"), Duration::from_secs(60));
    src.0 = None;
    dest.0 = None;

    let collect =
        |rx: mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let (src_out, src_err, dest_out, dest_err) = (
        collect(src_out),
        collect(src_err),
        collect(dest_out),
        collect(dest_err),
    );
    let source = last_json_line(&src_out).unwrap_or(serde_json::Value::Null);
    let incoming = last_json_line(&dest_out).unwrap_or(serde_json::Value::Null);

    let mut problem = None;
    if src_status.map(|s| s.success()) != Some(true) {
        problem = Some(format!(
            "source failed ({src_status:?}): {}",
            src_err.trim()
        ));
    } else if dest_status.map(|s| s.success()) != Some(true) {
        problem = Some(format!(
            "destination failed ({dest_status:?}): {}",
            dest_err.trim()
        ));
    } else if a.ram_fingerprint
        && (source["ram_fingerprint"].is_null()
            || source["ram_fingerprint"] != incoming["ram_fingerprint"])
    {
        problem = Some(format!(
            "RAM fingerprints differ: source {} destination {}",
            source["ram_fingerprint"], incoming["ram_fingerprint"]
        ));
    } else if source["verified"] != serde_json::Value::Bool(true) {
        problem = Some("the source did not report a verified migration".into());
    } else if incoming["verified"] != serde_json::Value::Bool(true) {
        problem = Some("the destination did not verify".into());
    }
    let mut source = source;
    if let Some(map) = source.as_object_mut() {
        // The destination's per-page cost and CPU beside the source's, for the table and JSON.
        for (to, from) in [
            ("dest_ns_per_page", "dest_ns_per_page"),
            ("dest_cpu_s", "cpu_s"),
        ] {
            map.insert(to.into(), incoming[from].clone());
        }
        map.insert("destination".into(), incoming);
        // Distance to the floor model of this run's own parameters (README, "The floor").
        let floor = vmm_cli::floor::floor_model(a.wss, a.dirty_rate, a.bandwidth, a.downtime)
            .map(|f| f.total_s());
        let total = map.get("total_time_ms").and_then(serde_json::Value::as_f64);
        if let (Some(floor), Some(total)) = (floor, total) {
            map.insert("floor_s".into(), floor.into());
            map.insert(
                "vs_floor_pct".into(),
                ((total / 1e3 / floor - 1.0) * 100.0).into(),
            );
        }
    }
    Ok(RunResult {
        mode: mode_index,
        run,
        verified: problem.is_none(),
        problem,
        source,
    })
}

/// `--runs` and `--modes` of `vmm bench` and `vmm ladder`, checked (`example` shows a valid
/// `--modes` in the error).
pub(crate) fn runs_and_modes(
    runs: u32,
    modes: &[String],
    example: &str,
) -> CliResult<Vec<BenchMode>> {
    if runs == 0 {
        return Err(CliError::Usage("--runs must be at least 1".into()));
    }
    let modes = modes
        .iter()
        .map(|m| BenchMode::parse(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::Usage)?;
    if modes.is_empty() {
        return Err(CliError::Usage(format!(
            "--modes is empty: give e.g. {example}"
        )));
    }
    Ok(modes)
}

/// `vmm bench`.
pub fn bench(a: BenchArgs) -> CliResult {
    crate::run::validate_guest(&a.guest, crate::args::WorkloadKind::Random)?;
    crate::run::validate_migration(&a.migration)?;
    // Read the comparison first: a malformed file fails before any run.
    let compare = a.compare.as_deref().map(crate::compare::load).transpose()?;
    if a.runs == 0 {
        if let Some(rows) = &compare {
            crate::compare::print_table(rows);
            return Ok(());
        }
    }
    let modes = runs_and_modes(a.runs, &a.modes, "legacy,clear:128M")?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
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

fn print_table(modes: &[BenchMode], results: &[RunResult], runs: u32) {
    let legacy_avg = modes.iter().position(|m| *m == BenchMode::Legacy).map(|i| {
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

fn write_json(path: &Path, modes: &[BenchMode], results: &[RunResult]) -> CliResult {
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
fn results_for_plot(_modes: &[BenchMode], results: &[RunResult]) -> Vec<(usize, f64, Vec<f64>)> {
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
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(BenchMode::parse("legacy").unwrap(), BenchMode::Legacy);
        assert_eq!(
            BenchMode::parse("clear:128M").unwrap(),
            BenchMode::Clear(128 << 20)
        );
        assert_eq!(BenchMode::parse("clear:1G").unwrap().label(), "clear 1 GiB");
        assert!(BenchMode::parse("clear:3M").is_err());
        assert!(BenchMode::parse("clear:4K").is_err());
        assert_eq!(BenchMode::parse("ring").unwrap(), BenchMode::Ring(64 << 10));
        assert_eq!(BenchMode::parse("ring:16K").unwrap().label(), "ring 16 KiB");
        assert!(BenchMode::parse("ring:3K").is_err());
        assert!(BenchMode::parse("ring:48K").is_err());
        assert!(BenchMode::parse("fast").is_err());
    }

    #[test]
    fn json_line_is_found_after_other_output() {
        let v = last_json_line("hello\n{\"a\":1}\n").unwrap();
        assert_eq!(v["a"], 1);
        assert!(last_json_line("no json").is_none());
    }
}
