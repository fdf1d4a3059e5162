// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared pieces of the migration harnesses (`faults`, `soak`, `netns`): building and running the
//! release `vmm`, child processes that are always killed, a seeded PRNG, random guest shapes.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{cargo, run_step, workspace_root};

/// Build the release `vmm` binary and return its path.
pub fn build_vmm() -> Result<PathBuf, String> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "vmm-cli"]);
    let r = run_step("build release vmm", cmd);
    if !r.ok {
        return Err(format!("building vmm failed: {}", r.note));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let path = target.join("release").join("vmm");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} is missing after the build", path.display()))
    }
}

/// Whether we run under CI (`CI=true` or `CI=1`).
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether `/dev/kvm` can be opened read-write.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))
}

/// A small seeded PRNG (splitmix64): runs are reproducible from the printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A seed from the clock and the process id.
    pub fn clock_seed() -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 32)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.range(0, 99) < pct
    }
}

/// Parse `--seed S` / `--count N` style options: the value after `name`, if any.
pub fn opt_value<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .ok_or_else(|| format!("{name} needs a value"))?;
            v.parse()
                .map(Some)
                .map_err(|_| format!("{name} {v}: not a valid value"))
        }
    }
}

/// Reject options this command does not know.
pub fn check_opts(args: &[String], known_with_value: &[&str]) -> Result<(), String> {
    let mut i = 0;
    while i < args.len() {
        if known_with_value.contains(&args[i].as_str()) {
            i += 2;
        } else {
            return Err(format!(
                "unknown option `{}` (known: {})",
                args[i],
                known_with_value.join(", ")
            ));
        }
    }
    Ok(())
}

const MIB: u64 = 1 << 20;

/// The guest workload of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// QEMU's increment test: the destination checks the increment rule.
    Increment,
    /// Paced random page writes.
    Random,
}

/// A random guest and migration setting.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Guest RAM bytes.
    pub mem: u64,
    /// Working set bytes.
    pub wss: u64,
    /// Workload.
    pub workload: Workload,
    /// Guest dirty rate, bytes/s.
    pub dirty_rate: u64,
    /// `None` = legacy, `Some(shift)` = clear with chunks of 2^shift pages.
    pub clear_shift: Option<u32>,
    /// `Some(bytes)` = KVM's dirty ring of this size per vCPU (overrides `clear_shift`).
    pub ring_bytes: Option<u64>,
    /// Bandwidth limit, bytes/s.
    pub bandwidth: u64,
    /// Downtime limit, ms (0: 1 µs, for cases that must not end in precopy).
    pub downtime_ms: u64,
    /// `vmm run --channels`: `None` the default session, `Some(0)` one version-1 stream.
    pub channels: Option<u32>,
}

impl Shape {
    /// A random shape: RAM in `mem_lo..=mem_hi` (multiples of 64 MiB), bandwidth 256M-1G/s, a dirty
    /// rate at most 1/8 of the bandwidth (so it converges), `increment_pct` percent increment.
    pub fn random(rng: &mut Rng, mem_lo: u64, mem_hi: u64, increment_pct: u64) -> Shape {
        let unit = 64 * MIB;
        let mem = rng.range(mem_lo / unit, mem_hi / unit) * unit;
        let wss = rng.range(mem / 4 / MIB, (mem - MIB) / MIB) * MIB;
        let bandwidth = rng.range(256, 1024) * MIB;
        let dirty_rate = rng.range(4, (bandwidth / 8 / MIB).max(4)) * MIB;
        let workload = if rng.chance(increment_pct) {
            Workload::Increment
        } else {
            Workload::Random
        };
        let clear_shift = if rng.chance(30) {
            None
        } else {
            Some(rng.range(6, 31) as u32)
        };
        Shape {
            mem,
            wss,
            workload,
            dirty_rate,
            clear_shift,
            ring_bytes: None,
            bandwidth,
            downtime_ms: rng.range(50, 300),
            channels: None,
        }
    }

    /// With `--channels n` (`None`: the default session).
    pub fn with_channels(mut self, channels: Option<u32>) -> Shape {
        self.channels = channels;
        self
    }

    /// `v1` (one version-1 stream), `ch4` (a session of 4 page channels), `ch-dflt` (the default).
    pub fn channels_label(&self) -> String {
        match self.channels {
            None => "ch-dflt".into(),
            Some(0) => "v1".into(),
            Some(n) => format!("ch{n}"),
        }
    }

    /// With `pct` percent chance, switch the shape to the dirty ring (16K, 64K or 256K per vCPU:
    /// the smaller ones fill between syncs, so ring-full exits happen). Only for hosts with the
    /// ring (the soak checks `vmm caps --json` first).
    pub fn maybe_ring(mut self, rng: &mut Rng, pct: u64) -> Shape {
        if rng.chance(pct) {
            self.ring_bytes = Some(16384u64 << (2 * rng.range(0, 2)));
        }
        self
    }

    /// `vmm run` arguments for this shape (no destination).
    pub fn run_args(&self) -> Vec<String> {
        let mut v = vec![
            "run".to_string(),
            format!("--mem={}M", self.mem / MIB),
            format!("--wss={}M", self.wss / MIB),
            format!(
                "--workload={}",
                match self.workload {
                    Workload::Increment => "increment",
                    Workload::Random => "random",
                }
            ),
            format!("--dirty-rate={}M", self.dirty_rate / MIB),
            format!("--bandwidth={}M", self.bandwidth / MIB),
            // 0: one microsecond, so precopy fits only when nothing at all is left.
            if self.downtime_ms == 0 {
                "--downtime=1us".to_string()
            } else {
                format!("--downtime={}ms", self.downtime_ms)
            },
        ];
        v.extend(self.channels.map(|n| format!("--channels={n}")));
        match (self.ring_bytes, self.clear_shift) {
            (Some(bytes), _) => {
                v.push("--dirty-log=ring".into());
                v.push(format!("--ring-size={bytes}"));
            }
            (None, None) => v.push("--dirty-log=legacy".into()),
            (None, Some(shift)) => {
                v.push("--dirty-log=clear".into());
                v.push(format!("--clear-chunk={}", 4096u64 << shift));
            }
        }
        v
    }

    /// `legacy`, `clear/s12` or `ring/16K`.
    pub fn mode(&self) -> String {
        match (self.ring_bytes, self.clear_shift) {
            (Some(b), _) => format!("ring/{}K", b >> 10),
            (None, None) => "legacy".into(),
            (None, Some(s)) => format!("clear/s{s}"),
        }
    }

    /// One-line description.
    pub fn describe(&self) -> String {
        format!(
            "{}M wss {}M {} @{}M/s bw {}M/s {} {}",
            self.mem / MIB,
            self.wss / MIB,
            match self.workload {
                Workload::Increment => "incr",
                Workload::Random => "rand",
            },
            self.dirty_rate / MIB,
            self.bandwidth / MIB,
            self.mode(),
            self.channels_label()
        )
    }
}

/// A child process with captured output, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    /// Short name for messages.
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    stderr_lines: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
}

fn pump<R: Read + Send + 'static>(
    r: R,
    buf: Arc<Mutex<String>>,
    lines: Option<std::sync::mpsc::Sender<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Ok(mut b) = buf.lock() {
                        b.push_str(&line);
                    }
                    if let Some(tx) = &lines {
                        let _ = tx.send(line.trim_end().to_string());
                    }
                }
            }
        }
    })
}

impl Proc {
    /// Start `cmd` with stdout and stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{name}: cannot start {cmd:?}: {e}"))?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = channel();
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(pump(o, stdout.clone(), None));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(pump(e, stderr.clone(), Some(tx)));
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            status: None,
            stdout,
            stderr,
            stderr_lines: rx,
            readers,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for a stderr line containing `needle`; returns the line.
    pub fn wait_stderr_line(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "{}: no `{needle}` on stderr within {timeout:?}; stderr: {}",
                    self.name,
                    self.stderr()
                ));
            }
            match self
                .stderr_lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(s)) = self.child.try_wait() {
                        self.status = Some(s);
                        // Drain what is left before giving up.
                        while let Ok(line) = self.stderr_lines.try_recv() {
                            if line.contains(needle) {
                                return Ok(line);
                            }
                        }
                        return Err(format!(
                            "{}: exited ({s}) before printing `{needle}`; stderr: {}",
                            self.name,
                            self.stderr()
                        ));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "{}: stderr closed before `{needle}`; stderr: {}",
                        self.name,
                        self.stderr()
                    ))
                }
            }
        }
    }

    /// `vmm incoming` prints `vmm: listening on tcp:HOST:PORT`: return `tcp:HOST:PORT`.
    pub fn listen_uri(&mut self) -> Result<String, String> {
        let line = self.wait_stderr_line("listening on", Duration::from_secs(20))?;
        line.split("listening on")
            .nth(1)
            .map(|s| s.trim().to_string())
            .filter(|s| s.starts_with("tcp:") || s.starts_with("unix:"))
            .ok_or_else(|| format!("{}: cannot parse `{line}`", self.name))
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.status = Some(s);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Wait up to `timeout`; on timeout kill it. `Ok(status)` if it exited by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "{}: still running after {timeout:?}: killed",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.finish_output();
        self.status
            .ok_or_else(|| format!("{}: lost its exit status", self.name))
    }

    /// SIGKILL and reap (no-op when it already exited).
    pub fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            if let Ok(s) = self.child.wait() {
                self.status = Some(s);
            }
        }
        self.finish_output();
    }

    fn finish_output(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Exit status, if it exited (or was killed).
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Everything captured on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Everything captured on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The last stdout line that parses as a JSON object.
    pub fn json(&self) -> Option<serde_json::Value> {
        self.stdout()
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(serde_json::Value::is_object)
    }

    /// The last `vmm: error:` line of stderr.
    pub fn error_line(&self) -> Option<String> {
        self.stderr()
            .lines()
            .rev()
            .find(|l| l.contains("vmm: error:"))
            .map(str::to_string)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a destination ended, seen from outside.
#[derive(Debug, Clone)]
pub struct DestOutcome {
    /// It printed `"resumed": true`, exited 0, or said it resumed a guest it could not verify.
    pub resumed: bool,
    /// Its JSON output, if any.
    pub json: Option<serde_json::Value>,
}

/// Judge an `vmm incoming --json` that has ended.
pub fn dest_outcome(p: &Proc) -> DestOutcome {
    let json = p.json();
    let code = p.status().and_then(|s| s.code());
    let resumed = code == Some(0)
        || json
            .as_ref()
            .and_then(|j| j.get("resumed"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
        || p.stdout().contains("verified and resumed")
        // A failure after resuming (the verification cut short) prints no JSON.
        || p.stderr().contains("the guest was resumed but");
    DestOutcome { resumed, json }
}

/// `vmm incoming --listen tcp:HOST:0` with JSON and a RAM fingerprint, optionally under a prefix
/// (`ip netns exec NS`).
pub fn incoming_cmd(vmm: &std::path::Path, prefix: &[&str], host: &str) -> Command {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest);
            c.arg(vmm);
            c
        }
        None => Command::new(vmm),
    };
    cmd.args([
        "incoming",
        &format!("--listen=tcp:{host}:0"),
        "--json",
        "--ram-fingerprint",
        "--run-after=300ms",
    ]);
    cmd
}

/// A directory of the test TLS files (`migration/tests/data/tls/NAME`: `dst` is valid for
/// `localhost` and `127.0.0.1`, `src-a` is `source-a.example`).
pub fn tls_dir(name: &str) -> std::path::PathBuf {
    workspace_root().join("migration/tests/data/tls").join(name)
}

/// `vmm incoming` flags: mutual TLS with the test destination certificate, accepting only the
/// test source `source-a.example`.
pub fn incoming_tls_args() -> [String; 2] {
    [
        format!("--tls-dir={}", tls_dir("dst").display()),
        "--tls-authz=source-a.example".into(),
    ]
}

/// `vmm run` flags: mutual TLS with the test source certificate in `dir` (`src-a`, `src-b`);
/// `hostname` is the name the destination's certificate must be valid for (`None`: the host of
/// the URI).
pub fn source_tls_args(dir: &str, hostname: Option<&str>) -> Vec<String> {
    let mut v = vec![format!("--tls-dir={}", tls_dir(dir).display())];
    v.extend(hostname.map(|h| format!("--tls-hostname={h}")));
    v
}

/// The mismatched-page count in an `incoming` error: the default verification's
/// (`verification FAILED: N page(s)`) or a strict digest table's (`(N mismatched pages in total)`).
pub fn digest_mismatches(stderr: &str) -> u64 {
    // The default verification: "verification FAILED: N page(s) of the destination differ ...".
    if let Some(n) = stderr
        .split("verification FAILED: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
    {
        return n;
    }
    // A strict digest table: "... (N mismatched pages in total)".
    stderr
        .split("mismatched pages in total")
        .next()
        .filter(|s| s.len() < stderr.len())
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Field of a JSON object as a string.
pub fn jstr(v: &Option<serde_json::Value>, key: &str) -> Option<String> {
    v.as_ref()?.get(key)?.as_str().map(str::to_string)
}

/// Field of a JSON object as u64.
pub fn ju64(v: &Option<serde_json::Value>, key: &str) -> Option<u64> {
    v.as_ref()?.get(key)?.as_u64()
}

/// Field of a JSON object as bool.
pub fn jbool(v: &Option<serde_json::Value>, key: &str) -> Option<bool> {
    v.as_ref()?.get(key)?.as_bool()
}

/// No `vmm` we started may outlive a harness: check /proc for children of ours that are left.
pub fn leftover_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // ppid is the 2nd field after the `(comm)`.
            let Some(rest) = stat.rsplit(')').next() else {
                continue;
            };
            let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            if ppid == Some(me) && !stat.contains(") Z") {
                out.push(pid);
            }
        }
    }
    out
}
