// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One run of `vmm bench` or `vmm ladder`: a `vmm incoming` and a `vmm run --migrate-to`
//! process on loopback TCP ([`one_run`]), and what the run's two JSON lines say ([`RunCheck`]).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::args::{BenchArgs, DEFAULT_DIRTY_RATE};
use crate::bench_scenario::{BenchScenario, BenchTransport};
use crate::{CliError, CliResult};

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
    /// `--mid-pass-sync` for the source (a `legacy-qemu` scenario turns it off for its runs).
    pub mid_pass_sync: crate::args::MidPassSync,
    /// How the migration travels.
    pub transport: BenchTransport,
    /// With TLS: the directory of the `src/` and `dst/` TLS files.
    pub tls_dir: Option<std::path::PathBuf>,
}

impl RunSpec {
    pub(crate) fn from_bench(a: &BenchArgs) -> Self {
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
            transport: BenchTransport::plain(a.migration.channels),
            tls_dir: None,
        }
    }

    /// With TLS, `--tls-dir` of one side of the run (`src` or `dst`).
    fn tls_args(&self, side: &str) -> Vec<String> {
        match &self.tls_dir {
            Some(dir) if self.transport.tls => {
                vec!["--tls-dir".into(), dir.join(side).display().to_string()]
            }
            _ => Vec::new(),
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
    mode: &BenchScenario,
    mode_index: usize,
    run: u32,
    timeout: Duration,
) -> CliResult<RunResult> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Failed(format!("cannot find the vmm binary: {e}")))?;
    let (mut dest, uri) = RunChild::destination(&exe, a)?;
    let mut src = RunChild::spawn(&exe, &source_args(a, mode, uri, timeout), "the source")?;
    let src_status = src.wait(timeout + Duration::from_secs(120));
    let dest_status = dest.wait(Duration::from_secs(60));
    let (src_out, src_err) = src.output();
    let (dest_out, dest_err) = dest.output();
    let check = RunCheck {
        source_ok: src_status.map(|s| s.success()) == Some(true),
        destination_ok: dest_status.map(|s| s.success()) == Some(true),
        source: last_json_line(&src_out).unwrap_or(serde_json::Value::Null),
        destination: last_json_line(&dest_out).unwrap_or(serde_json::Value::Null),
        fingerprints: a.ram_fingerprint,
    };
    let problem = check.problem().map(|p| match p {
        Problem::Source => format!("source failed ({src_status:?}): {}", src_err.trim()),
        Problem::Destination => {
            format!("destination failed ({dest_status:?}): {}", dest_err.trim())
        }
        Problem::Other(p) => p,
    });
    Ok(RunResult {
        mode: mode_index,
        run,
        verified: problem.is_none(),
        problem,
        source: check.merged(a),
    })
}

/// The `vmm run` arguments of the source of a run.
fn source_args(a: &RunSpec, mode: &BenchScenario, uri: String, timeout: Duration) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--workload",
        "random",
        "--json",
        "--migrate-to",
        &uri,
        "--mem",
        &a.mem.to_string(),
        "--wss",
        &a.wss.to_string(),
        "--dirty-rate",
        &a.dirty_rate.to_string(),
        "--bandwidth",
        &crate::args::bandwidth_arg(a.bandwidth),
        "--downtime",
        &format!("{}us", a.downtime.as_micros()),
        "--warmup",
        &format!("{}ms", a.warmup.as_millis()),
        "--max-time",
        &format!("{}s", timeout.as_secs()),
        "--vcpus",
        &a.vcpus.to_string(),
        "--mid-pass-sync",
        &mode.mid_pass_sync(a.mid_pass_sync).to_string(),
        "--channels",
        &a.transport.channels.to_string(),
    ]
    .map(String::from)
    .to_vec();
    if a.ram_fingerprint {
        args.push("--ram-fingerprint".into());
    }
    if let Some(bw) = a.switchover_bandwidth {
        args.extend(["--switchover-bandwidth".into(), bw.to_string()]);
    }
    args.extend(a.tls_args("src"));
    args.extend(mode.run_args());
    args
}

/// A `vmm` child process of a run: killed on drop (no stray guests if the bench fails half-way),
/// its stdout and stderr read to the end by threads.
struct RunChild {
    child: KillOnDrop,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

impl RunChild {
    fn spawn(exe: &std::path::Path, args: &[String], what: &str) -> CliResult<Self> {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CliError::Failed(format!("cannot start {what}: {e}")))?;
        let out = read_all(child.stdout.take().expect("piped"));
        let err = read_all(child.stderr.take().expect("piped"));
        Ok(RunChild {
            child: KillOnDrop(Some(child)),
            out,
            err,
        })
    }

    /// `vmm incoming` on a free loopback port, and the address it listens on (the first line of
    /// its stderr says where; the rest is drained).
    fn destination(exe: &std::path::Path, a: &RunSpec) -> CliResult<(Self, String)> {
        let mut args = [
            "incoming",
            "--listen",
            "tcp:127.0.0.1:0",
            "--json",
            "--run-after",
            "300ms",
        ]
        .map(String::from)
        .to_vec();
        if a.ram_fingerprint {
            args.push("--ram-fingerprint".into());
        }
        args.extend(a.tls_args("dst"));
        let mut child = Command::new(exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CliError::Failed(format!("cannot start the destination: {e}")))?;
        let out = read_all(child.stdout.take().expect("piped"));
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        let child = KillOnDrop(Some(child));
        let mut line = String::new();
        let uri = loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                return Err(CliError::Failed(
                    "the destination exited before listening".into(),
                ));
            }
            if let Some(uri) = line.trim().strip_prefix("vmm: listening on ") {
                break uri.to_string();
            }
        };
        let err = read_all(stderr);
        Ok((RunChild { child, out, err }, uri))
    }

    /// Waits for the process to exit, at most `timeout` (then kills it: `None`).
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = wait_with_timeout(self.child.0.as_mut().expect("running"), timeout);
        self.child.0 = None;
        status
    }

    /// Everything the process wrote: stdout, stderr.
    fn output(self) -> (String, String) {
        let collect = |rx: &mpsc::Receiver<String>| {
            rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
        };
        (collect(&self.out), collect(&self.err))
    }
}

/// Which side of a run failed, or what else is wrong.
#[derive(Debug, Clone, PartialEq)]
enum Problem {
    Source,
    Destination,
    Other(String),
}

/// What a run's two processes reported, and the verdict on it: the bench's bookkeeping of one
/// run, in one unit-tested place.
#[derive(Debug, Clone)]
struct RunCheck {
    source_ok: bool,
    destination_ok: bool,
    /// The source's JSON line.
    source: serde_json::Value,
    /// The destination's JSON line.
    destination: serde_json::Value,
    /// The RAM fingerprints of both sides must be there and equal.
    fingerprints: bool,
}

impl RunCheck {
    /// Why the run does not count (`None`: both sides succeeded and verified, and the
    /// fingerprints matched when asked).
    fn problem(&self) -> Option<Problem> {
        let (src, dst) = (&self.source, &self.destination);
        let verified = |v: &serde_json::Value| v["verified"] == serde_json::Value::Bool(true);
        if !self.source_ok {
            Some(Problem::Source)
        } else if !self.destination_ok {
            Some(Problem::Destination)
        } else if self.fingerprints
            // After a postcopy the destination's memory was never whole while its guest was
            // paused: the engine's verification is the proof there.
            && dst["postcopy"] != serde_json::Value::Bool(true)
            && (src["ram_fingerprint"].is_null()
                || src["ram_fingerprint"] != dst["ram_fingerprint"])
        {
            Some(Problem::Other(format!(
                "RAM fingerprints differ: source {} destination {}",
                src["ram_fingerprint"], dst["ram_fingerprint"]
            )))
        } else if !verified(src) {
            Some(Problem::Other(
                "the source did not report a verified migration".into(),
            ))
        } else if !verified(dst) {
            Some(Problem::Other("the destination did not verify".into()))
        } else {
            None
        }
    }

    /// The source's JSON with the destination's beside it: its per-page cost and CPU as
    /// `dest_ns_per_page`/`dest_cpu_s`, all of it under `destination`, and the distance to the
    /// floor model of the run's own parameters (docs/bench/README.md, "The floor") as
    /// `floor_s`/`vs_floor_pct`.
    fn merged(self, a: &RunSpec) -> serde_json::Value {
        let mut source = self.source;
        let incoming = self.destination;
        let Some(map) = source.as_object_mut() else {
            return source;
        };
        map.insert(
            "dest_ns_per_page".into(),
            incoming["dest_ns_per_page"].clone(),
        );
        map.insert("dest_cpu_s".into(), incoming["cpu_s"].clone());
        map.insert("destination".into(), incoming);
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
        source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            mem: 4 << 30,
            wss: 3 << 30,
            dirty_rate: 288 << 20,
            bandwidth: 400 << 20,
            downtime: Duration::from_millis(100),
            warmup: Duration::from_secs(2),
            ram_fingerprint: true,
            vcpus: 1,
            switchover_bandwidth: None,
            mid_pass_sync: crate::args::MidPassSync(None),
            transport: BenchTransport {
                channels: 4,
                tls: true,
            },
            tls_dir: Some("/certs".into()),
        }
    }

    #[test]
    fn a_run_counts_only_when_both_sides_verify_with_equal_fingerprints() {
        let good = RunCheck {
            source_ok: true,
            destination_ok: true,
            source: serde_json::json!({"verified": true, "ram_fingerprint": "ab", "total_time_ms": 13_280.0, "cpu_s": 1.0}),
            destination: serde_json::json!({"verified": true, "ram_fingerprint": "ab", "cpu_s": 2.0, "dest_ns_per_page": 3.0}),
            fingerprints: true,
        };
        assert_eq!(good.problem(), None);
        let failed = RunCheck {
            destination_ok: false,
            ..good.clone()
        };
        assert_eq!(failed.problem(), Some(Problem::Destination));
        let mut differ = good.clone();
        differ.destination["ram_fingerprint"] = "cd".into();
        assert!(matches!(differ.problem(), Some(Problem::Other(p)) if p.contains("differ")));
        let mut unverified = good.clone();
        unverified.source["verified"] = false.into();
        assert!(unverified.problem().is_some());
        let merged = good.merged(&spec());
        assert_eq!(
            (
                merged["dest_cpu_s"].as_f64(),
                merged["dest_ns_per_page"].as_f64()
            ),
            (Some(2.0), Some(3.0))
        );
        assert_eq!(merged["destination"]["cpu_s"], 2.0);
        let pct = merged["vs_floor_pct"].as_f64().unwrap();
        assert!(
            pct.abs() < 1.0,
            "13.28 s is the floor of the reference workload: {pct}"
        );
    }

    #[test]
    fn the_source_runs_the_random_workload_in_the_mode_asked() {
        let args = source_args(
            &spec(),
            &BenchScenario::Ring(16 << 10),
            "tcp:x:1".into(),
            Duration::from_secs(5),
        );
        let has = |pair: [&str; 2]| args.windows(2).any(|w| w == pair);
        assert!(has(["--migrate-to", "tcp:x:1"]) && has(["--workload", "random"]));
        assert!(has(["--dirty-log", "ring"]) && has(["--ring-size", "16384"]));
        assert!(has(["--max-time", "5s"]) && args.contains(&"--ram-fingerprint".to_string()));
        assert!(has(["--channels", "4"]) && has(["--tls-dir", "/certs/src"]));
    }

    #[test]
    fn each_row_has_its_own_mid_pass_sync() {
        let every = crate::args::MidPassSync(Some(Duration::from_millis(250)));
        let spec = RunSpec {
            mid_pass_sync: every,
            ..spec()
        };
        let args = |mode| source_args(&spec, &mode, "tcp:x:1".into(), Duration::from_secs(5));
        let has = |args: &[String], pair: [&str; 2]| args.windows(2).any(|w| w == pair);
        let qemu = args(BenchScenario::LegacyQemu);
        assert!(has(&qemu, ["--mid-pass-sync", "off"]) && has(&qemu, ["--dirty-log", "legacy"]));
        let ours = args(BenchScenario::Legacy);
        assert!(has(&ours, ["--mid-pass-sync", "250ms"]) && has(&ours, ["--dirty-log", "legacy"]));
        let n = qemu.iter().filter(|a| *a == "--mid-pass-sync").count();
        assert_eq!(n, 1, "{qemu:?}");
    }

    #[test]
    fn json_line_is_found_after_other_output() {
        let v = last_json_line("hello\n{\"a\":1}\n").unwrap();
        assert_eq!(v["a"], 1);
        assert!(last_json_line("no json").is_none());
    }
}
