// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask qemu-bench`: the QEMU side of `vmm bench --compare` (docs/design.md, "The QEMU side
//! of the comparison").
//!
//! Per run and mode: `vmm qemu-image` writes our `random` workload as a Multiboot kernel; a
//! destination QEMU waits with `-incoming tcp:127.0.0.1:PORT`; a source QEMU boots the image; both
//! are driven over QMP (unix sockets). After the guest is ready (pre-fault done) and a warm-up, the
//! source gets `max-bandwidth` and `downtime-limit` and migrates; `query-migrate` is polled until it
//! completes. One JSON line per run: the raw `query-migrate` result plus our fields (`system`,
//! `version`, `mode`, `chunk_bytes`, `stop_to_resume_ms`, CPU seconds of each QEMU, the guest's
//! write rate, the KVM dirty-log ioctls each QEMU made).
//!
//! Modes: `clear:CHUNK` sets `-global migration.x-clear-bitmap-shift` (chunk = 2^shift pages).
//! `legacy`: QEMU 7.2 has no switch to stop using KVM_CLEAR_DIRTY_LOG, so an LD_PRELOAD shim (C,
//! built here with gcc) makes `KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` answer 0,
//! QEMU's own fallback when the kernel lacks the capability. The same shim counts
//! `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` calls in every mode, and a run fails unless the
//! counts match the mode (legacy: no clears; clear: clears).
//!
//! `--smoke`: a short end-to-end check (512M guest, 256M working set, legacy and clear:1M once):
//! the migration completes, the guest was writing before and after it, and dirty pages were re-sent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::harness::{build_vmm, is_ci, kvm_usable};
use crate::units::{human_bytes, parse_duration, parse_size};
use crate::workspace_root;

/// A duration flag in milliseconds (`100ms`, `2s`; a bare number is milliseconds).
fn parse_ms(s: &str) -> Result<u64, String> {
    Ok(parse_duration(s)?.as_millis() as u64)
}

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const QEMU: &str = "qemu-system-x86_64";

/// The LD_PRELOAD shim (see the module documentation). Counts are written as JSON to
/// `$CLEARLOG_SHIM_STATS` when QEMU exits.
const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* KVM ioctl numbers (include/uapi/linux/kvm.h): _IO(0xAE, 0x03), _IOW(0xAE, 0x42, 16 bytes),
   _IOWR(0xAE, 0xc0, 24 bytes); capability 168. */
#define CHECK_EXTENSION 0xAE03UL
#define GET_DIRTY_LOG 0x4010AE42UL
#define CLEAR_DIRTY_LOG 0xC018AEC0UL
#define CAP_MANUAL_DIRTY_LOG_PROTECT2 168UL

static unsigned long gets, clears, hidden;

int ioctl(int fd, unsigned long req, ...) {
    static int (*real)(int, unsigned long, ...);
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    /* QEMU passes the request as an int: 0xC018AEC0 arrives sign-extended. The kernel looks at
       the low 32 bits only; so do we. */
    unsigned int nr = (unsigned int)req;
    if (!real)
        real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    if (nr == CHECK_EXTENSION && (unsigned long)arg == CAP_MANUAL_DIRTY_LOG_PROTECT2) {
        const char *h = getenv("CLEARLOG_SHIM_HIDE_MANUAL_PROTECT");
        if (h && strcmp(h, "1") == 0) {
            __atomic_add_fetch(&hidden, 1, __ATOMIC_RELAXED);
            return 0;
        }
    }
    if (nr == GET_DIRTY_LOG)
        __atomic_add_fetch(&gets, 1, __ATOMIC_RELAXED);
    if (nr == CLEAR_DIRTY_LOG)
        __atomic_add_fetch(&clears, 1, __ATOMIC_RELAXED);
    return real(fd, req, arg);
}

__attribute__((destructor)) static void clearlog_shim_report(void) {
    const char *path = getenv("CLEARLOG_SHIM_STATS");
    if (!path)
        return;
    FILE *f = fopen(path, "w");
    if (!f)
        return;
    fprintf(f, "{\"kvm_get_dirty_log_calls\":%lu,\"kvm_clear_dirty_log_calls\":%lu,\"manual_protect_hidden\":%lu}\n",
            gets, clears, hidden);
    fclose(f);
}
"#;

/// A QEMU migration mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Legacy,
    /// Clear chunk in bytes (a power of two, 256K..).
    Clear(u64),
}

impl Mode {
    fn parse(s: &str) -> Result<Mode, String> {
        let s = s.trim();
        if s == "legacy" {
            return Ok(Mode::Legacy);
        }
        let size = s
            .strip_prefix("clear:")
            .ok_or_else(|| format!("mode `{s}`: use legacy or clear:SIZE (e.g. clear:1M)"))?;
        let b = parse_size(size)?;
        // x-clear-bitmap-shift is 6..=31 (chunks of 2^shift pages).
        if !b.is_power_of_two() || !(PAGE << 6..=PAGE << 31).contains(&b) {
            return Err(format!(
                "mode `{s}`: the chunk must be a power of two from 256K to 8T"
            ));
        }
        Ok(Mode::Clear(b))
    }

    fn shift(self) -> Option<u32> {
        match self {
            Mode::Legacy => None,
            Mode::Clear(b) => Some((b / PAGE).trailing_zeros()),
        }
    }

    /// The same label `vmm bench` prints ("legacy", "clear 1 MiB").
    fn label(self) -> String {
        match self {
            Mode::Legacy => "legacy".into(),
            Mode::Clear(b) => format!("clear {}", human_bytes(b)),
        }
    }
}

/// Options of `cargo xtask qemu-bench`.
#[derive(Debug, Clone)]
struct Opts {
    modes: Vec<Mode>,
    runs: u32,
    out: PathBuf,
    append: bool,
    mem: u64,
    wss: u64,
    dirty_rate: u64,
    bandwidth: u64,
    downtime_ms: u64,
    warmup_ms: u64,
    smoke: bool,
    install: bool,
    interleave_with_vmm: Option<Vec<String>>,
    qemu: String,
}

const USAGE: &str = "usage: cargo xtask qemu-bench [--modes legacy,clear:1M,clear:16M] [--runs N] [--out FILE] [--append]
       [--mem 4G] [--wss 3G] [--dirty-rate 288M] [--bandwidth 400M] [--downtime 100ms] [--warmup 2s]
       [--interleave-with-vmm MODES] [--install] [--qemu PATH] [--smoke]";

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        modes: vec![Mode::Legacy, Mode::Clear(MIB), Mode::Clear(16 * MIB)],
        runs: 1,
        out: workspace_root().join("target/qemu-bench/results.jsonl"),
        append: false,
        mem: 4 << 30,
        wss: 3 << 30,
        dirty_rate: 288 * MIB,
        bandwidth: 400 * MIB,
        downtime_ms: 100,
        warmup_ms: 2000,
        smoke: false,
        install: false,
        interleave_with_vmm: None,
        qemu: QEMU.into(),
    };
    let mut explicit_shape = false;
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        match flag {
            "--smoke" => o.smoke = true,
            "--append" => o.append = true,
            "--install" => o.install = true,
            "-h" | "--help" => return Err(USAGE.into()),
            _ => {
                let v = args
                    .get(i + 1)
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
                i += 1;
                match flag {
                    "--modes" => {
                        o.modes = v.split(',').map(Mode::parse).collect::<Result<_, _>>()?;
                    }
                    "--runs" => {
                        o.runs = v.parse().map_err(|_| format!("--runs {v}: not a number"))?;
                    }
                    "--out" => o.out = PathBuf::from(v),
                    "--mem" => (o.mem, explicit_shape) = (parse_size(v)?, true),
                    "--wss" => (o.wss, explicit_shape) = (parse_size(v)?, true),
                    "--dirty-rate" => (o.dirty_rate, explicit_shape) = (parse_size(v)?, true),
                    "--bandwidth" => o.bandwidth = parse_size(v)?,
                    "--downtime" => o.downtime_ms = parse_ms(v)?,
                    "--warmup" => o.warmup_ms = parse_ms(v)?,
                    "--qemu" => o.qemu = v.clone(),
                    "--interleave-with-vmm" => {
                        o.interleave_with_vmm = Some(v.split(',').map(str::to_string).collect());
                    }
                    _ => return Err(format!("unknown option `{flag}`\n{USAGE}")),
                }
            }
        }
        i += 1;
    }
    if o.smoke {
        if !explicit_shape {
            (o.mem, o.wss, o.dirty_rate) = (512 * MIB, 256 * MIB, 96 * MIB);
        }
        if !args.iter().any(|a| a == "--modes") {
            o.modes = vec![Mode::Legacy, Mode::Clear(MIB)];
        }
        if !args.iter().any(|a| a == "--warmup") {
            o.warmup_ms = 1000;
        }
        if !args.iter().any(|a| a == "--out") {
            o.out = workspace_root().join("target/qemu-bench/smoke.jsonl");
        }
    }
    if o.runs == 0 || o.modes.is_empty() {
        return Err("--runs must be at least 1 and --modes not empty".into());
    }
    if !o.mem.is_multiple_of(2 * MIB)
        || o.wss == 0
        || !o.wss.is_multiple_of(PAGE)
        || o.wss + MIB > o.mem
    {
        return Err(format!(
            "--mem {} must be a multiple of 2M and hold --wss {} from 1 MiB",
            o.mem, o.wss
        ));
    }
    Ok(o)
}

/// `cargo xtask qemu-bench`.
pub fn qemu_bench(args: &[String]) -> Result<(), String> {
    let o = parse_opts(args)?;
    if let Err(e) = kvm_usable() {
        if is_ci() && Path::new("/dev/kvm").exists() {
            return Err(format!("qemu-bench: {e} (CI=true)"));
        }
        println!("qemu-bench: SKIPPED: {e}");
        return Ok(());
    }
    if !ensure_qemu(&o)? {
        return Ok(());
    }
    let vmm = build_vmm()?;
    let work = workspace_root().join("target/qemu-bench");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let shim = build_shim(&work)?;
    let image = Image::write(&vmm, &o, &work)?;
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(o.append)
        .truncate(!o.append)
        .open(&o.out)
        .map_err(|e| format!("{}: {e}", o.out.display()))?;
    println!(
        "\n==> xtask qemu-bench: {}: guest {} MiB, working set {} MiB at {} MiB/s (TSC {} kHz), bandwidth {} MiB/s, downtime {} ms, {} run(s) of {}",
        o.qemu,
        o.mem >> 20,
        o.wss >> 20,
        o.dirty_rate >> 20,
        image.tsc_khz,
        o.bandwidth >> 20,
        o.downtime_ms,
        o.runs,
        o.modes.iter().map(|m| m.label()).collect::<Vec<_>>().join(", ")
    );
    let mut failures = Vec::new();
    let mut write =
        |line: &Value| writeln!(out, "{line}").map_err(|e| format!("{}: {e}", o.out.display()));
    for run in 1..=o.runs {
        for &mode in &o.modes {
            let t = Instant::now();
            match one_run(&o, mode, run, &image, &shim, &work) {
                Ok(line) => {
                    let problems = check_run(&o, mode, &line);
                    println!("{}", run_summary(&o, mode, run, &line, &problems, t));
                    if !problems.is_empty() {
                        failures.push(format!(
                            "run {run} {}: {}",
                            mode.label(),
                            problems.join("; ")
                        ));
                    }
                    write(&line)?;
                }
                Err(e) => {
                    println!(
                        "  run {run}/{} qemu {:<12} FAILED: {e}",
                        o.runs,
                        mode.label()
                    );
                    failures.push(format!("run {run} {}: {e}", mode.label()));
                }
            }
        }
        if let Some(vmm_modes) = &o.interleave_with_vmm {
            for line in vmm_round(&o, &vmm, vmm_modes, &work)? {
                write(&line)?;
            }
        }
    }
    drop(out);
    println!("qemu-bench: results in {}", o.out.display());
    if o.interleave_with_vmm.is_some() {
        // One table for both systems from the file just written.
        let status = Command::new(&vmm)
            .args(["bench", "--runs", "0", "--compare"])
            .arg(&o.out)
            .status()
            .map_err(|e| format!("running vmm bench --compare: {e}"))?;
        if !status.success() {
            failures.push(format!("vmm bench --compare exited with {status}"));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Installs QEMU if asked (`--install`); `false` when it is missing and that is a loud skip
/// (`--smoke` outside CI) rather than a failure.
fn ensure_qemu(o: &Opts) -> Result<bool, String> {
    if !have_qemu(&o.qemu) && o.install {
        println!("==> xtask qemu-bench: apt-get install -y qemu-system-x86");
        let ok = Command::new("apt-get")
            .args(["install", "-y", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("apt-get install -y qemu-system-x86 failed".into());
        }
    }
    if have_qemu(&o.qemu) {
        return Ok(true);
    }
    let msg = format!(
        "{} is not installed (apt-get install -y qemu-system-x86, or pass --install)",
        o.qemu
    );
    if o.smoke && !is_ci() {
        println!("qemu-bench: SKIPPED: {msg}: the QEMU end-to-end check did NOT run");
        return Ok(false);
    }
    Err(msg)
}

/// The line a run prints.
fn run_summary(
    o: &Opts,
    mode: Mode,
    run: u32,
    line: &Value,
    problems: &[String],
    t: Instant,
) -> String {
    let mib = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / MIB as f64;
    format!(
        "  run {run}/{} qemu {:<12} total {:>6.2} s  downtime {:>4} ms  stop->resume {:>6.1} ms  sent {:>6.0} MiB  syncs {:>3}  guest {:>4.0} MiB/s ({:>4.0} while migrating)  clears {:>6}  {} ({:.0} s wall)",
        o.runs,
        mode.label(),
        line["total-time"].as_f64().unwrap_or(f64::NAN) / 1e3,
        line["downtime"],
        line["stop_to_resume_ms"].as_f64().unwrap_or(f64::NAN),
        mib(&line["ram"]["transferred"]),
        line["ram"]["dirty-sync-count"],
        mib(&line["guest_write_rate_bytes_per_s"]),
        mib(&line["guest_write_rate_during_migration_bytes_per_s"]),
        line["shim"]["source"]["kvm_clear_dirty_log_calls"],
        if problems.is_empty() { "ok".to_string() } else { format!("FAILED: {}", problems.join("; ")) },
        t.elapsed().as_secs_f64()
    )
}

/// The guest image `vmm qemu-image` wrote, and what it says of its layout: where the boot stub
/// reports, vCPU 0's counter slot (pages written at +0, ready at +16), the RAM split QEMU must use.
#[derive(Debug, Clone)]
struct Image {
    path: PathBuf,
    tsc_khz: Value,
    boot_status_addr: u64,
    boot_status_ring3: u64,
    counter_slot: u64,
    max_ram_below_4g: u64,
}

impl Image {
    /// `vmm qemu-image` of the run's guest shape, into `work`.
    fn write(vmm: &Path, o: &Opts, work: &Path) -> Result<Image, String> {
        let path = work.join(format!(
            "random-{}M-{}M-{}M.img",
            o.mem >> 20,
            o.wss >> 20,
            o.dirty_rate >> 20
        ));
        let out = Command::new(vmm)
            .args([
                "qemu-image",
                "--mem",
                &o.mem.to_string(),
                "--wss",
                &o.wss.to_string(),
            ])
            .args(["--dirty-rate", &o.dirty_rate.to_string(), "--out"])
            .arg(&path)
            .output()
            .map_err(|e| format!("running vmm qemu-image: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!("vmm qemu-image failed: {}", err.trim()));
        }
        let info: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("vmm qemu-image printed no JSON: {e}"))?;
        Image::from_json(path, &info)
    }

    fn from_json(path: PathBuf, info: &Value) -> Result<Image, String> {
        let num = |k: &str| {
            info[k]
                .as_u64()
                .ok_or_else(|| format!("vmm qemu-image printed no `{k}`: {info}"))
        };
        Ok(Image {
            path,
            tsc_khz: info["tsc_khz"].clone(),
            boot_status_addr: num("boot_status_addr")?,
            boot_status_ring3: num("boot_status_ring3")?,
            counter_slot: num("counter_slot_addr")?,
            max_ram_below_4g: num("max_ram_below_4g")?,
        })
    }
}

fn have_qemu(qemu: &str) -> bool {
    Command::new(qemu)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn build_shim(work: &Path) -> Result<PathBuf, String> {
    let src = work.join("kvm_shim.c");
    let so = work.join("kvm_shim.so");
    std::fs::write(&src, SHIM_C).map_err(|e| format!("{}: {e}", src.display()))?;
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .map_err(|e| format!("gcc (needed to build the LD_PRELOAD shim) cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the shim failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(so)
}

/// A QMP connection.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, child: &mut Child) -> Result<Qmp, String> {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        return Err(format!("QEMU exited ({st}) before its QMP socket opened"));
                    }
                    if start.elapsed() > Duration::from_secs(30) {
                        return Err(format!("QMP socket {}: {e}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut q = Qmp {
            w: s,
            r,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP sent non-JSON `{}`: {e}", line.trim()))
    }

    /// Runs a command; events that arrive meanwhile are kept in `events`.
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(e) = v.get("error") {
                return Err(format!("QMP {name}: {e}"));
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    /// Reads `count` little-endian u64s of guest-physical memory (monitor `xp`).
    fn read_u64s(&mut self, gpa: u64, count: usize) -> Result<Vec<u64>, String> {
        let r = self.cmd(
            "human-monitor-command",
            json!({"command-line": format!("xp /{count}gx {gpa:#x}")}),
        )?;
        let text = r.as_str().unwrap_or_default();
        let v: Vec<u64> = parse_xp(text);
        if v.len() != count {
            return Err(format!("unexpected xp output `{}`", text.trim()));
        }
        Ok(v)
    }

    /// Timestamp (µs since the epoch) of the first `name` event seen.
    fn event_us(&self, name: &str) -> Option<u64> {
        self.events
            .iter()
            .find(|e| e["event"] == name)
            .and_then(|e| {
                Some(
                    e["timestamp"]["seconds"].as_u64()? * 1_000_000
                        + e["timestamp"]["microseconds"].as_u64()?,
                )
            })
    }
}

/// The values of a monitor `xp /Ngx` dump ("0000000000005000: 0x0000000000000001 0x..." lines).
fn parse_xp(text: &str) -> Vec<u64> {
    text.split_whitespace()
        .filter_map(|t| t.strip_prefix("0x"))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect()
}

/// A QEMU process killed on drop.
struct QemuProc {
    child: Child,
}

impl Drop for QemuProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl QemuProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for exit after `quit`; the stderr it wrote.
    fn finish(mut self, log: &Path) -> String {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

/// CPU seconds of a process: (all threads, all threads but the vCPUs), from /proc. The process
/// total comes from /proc/PID/stat, which keeps the time of threads that have exited (QEMU's
/// migration thread ends with the migration); the vCPU threads are alive and read one by one.
fn cpu_seconds(pid: u32) -> (f64, f64) {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |p: &Path| {
        std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|s| stat_cpu_ticks(&s))
    };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Some(all) = ticks(&proc_dir) else {
        return (f64::NAN, f64::NAN);
    };
    let mut vcpu = 0;
    if let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            // With `-name ...,debug-threads=on` QEMU names its vCPU threads "CPU <n>/KVM".
            if comm.starts_with("CPU ") {
                vcpu += ticks(&t.path()).unwrap_or(0);
            }
        }
    }
    (all as f64 / hz, all.saturating_sub(vcpu) as f64 / hz)
}

/// utime + stime (fields 14 and 15) of a /proc stat line; the command name may hold spaces.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // After the name, field 3 (state) is f[0]: utime is field 14, f[11].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn spawn_qemu(
    o: &Opts,
    mode: Mode,
    name: &'static str,
    image: &Image,
    shim: &Path,
    work: &Path,
    incoming: Option<u16>,
) -> Result<(QemuProc, PathBuf, PathBuf, PathBuf), String> {
    let sock = work.join(format!("{name}.qmp"));
    let log = work.join(format!("{name}.log"));
    let stats = work.join(format!("{name}.shim.json"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&stats);
    let mut cmd = Command::new(&o.qemu);
    cmd.args(["-accel", "kvm", "-cpu", "max", "-smp", "1"])
        .args(["-m", &format!("{}M", o.mem >> 20)])
        .args([
            "-machine",
            &format!("pc,max-ram-below-4g={}M", image.max_ram_below_4g >> 20),
        ])
        .args([
            "-nodefaults",
            "-nographic",
            "-serial",
            "none",
            "-monitor",
            "none",
        ])
        // debug-threads: named threads ("CPU 0/KVM", "live_migration"), so the vCPU's CPU time can
        // be told apart.
        .args(["-name", &format!("clearlog-{name},debug-threads=on")])
        .args(["-no-reboot", "-kernel"])
        .arg(&image.path)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    if let Some(shift) = mode.shift() {
        cmd.args([
            "-global",
            &format!("migration.x-clear-bitmap-shift={shift}"),
        ]);
    }
    if let Some(port) = incoming {
        cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
    }
    cmd.env("LD_PRELOAD", shim)
        .env("CLEARLOG_SHIM_STATS", &stats)
        .env(
            "CLEARLOG_SHIM_HIDE_MANUAL_PROTECT",
            if mode == Mode::Legacy { "1" } else { "0" },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", o.qemu))?;
    Ok((QemuProc { child }, sock, log, stats))
}

/// One migration between two QEMUs; the JSON line.
fn one_run(
    o: &Opts,
    mode: Mode,
    run: u32,
    image: &Image,
    shim: &Path,
    work: &Path,
) -> Result<Value, String> {
    let port = free_port()?;
    let (mut dst, dst_sock, dst_log, dst_stats) =
        spawn_qemu(o, mode, "destination", image, shim, work, Some(port))?;
    let (mut src, src_sock, src_log, src_stats) =
        spawn_qemu(o, mode, "source", image, shim, work, None)?;
    let mut dq = Qmp::connect(&dst_sock, &mut dst.child)?;
    let mut sq = Qmp::connect(&src_sock, &mut src.child)?;
    let version = sq.cmd("query-version", json!({}))?;
    let ready_s = wait_ready(&mut sq, &mut src, &src_log, image)?;
    // Warm-up; the guest's write rate over it.
    let guest_rate = write_rate(&mut sq, image, Duration::from_millis(o.warmup_ms))?;
    sq.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": o.bandwidth, "downtime-limit": o.downtime_ms}),
    )?;
    let params = sq.cmd("query-migrate-parameters", json!({}))?;
    let pages_before = sq.read_u64s(image.counter_slot, 1)?[0];
    let (src_cpu0, dst_cpu0) = (cpu_seconds(src.pid()), cpu_seconds(dst.pid()));
    let started_us = now_us();
    let t0 = Instant::now();
    let result = migrate(&mut sq, port)?;
    let wall_s = t0.elapsed().as_secs_f64();
    let src_cpu1 = cpu_seconds(src.pid());
    // The source guest is stopped now: its counter holds every page it wrote while migrated.
    let pages_after = sq.read_u64s(image.counter_slot, 1)?[0];
    wait_resume(&mut dq)?;
    let dst_cpu1 = cpu_seconds(dst.pid());
    // The guest goes on writing on the destination.
    let dst_rate = write_rate(&mut dq, image, Duration::from_millis(500))?;
    let _ = sq.cmd("query-status", json!({}));
    let (stop, resume) = (sq.event_us("STOP"), dq.event_us("RESUME"));
    let _ = sq.cmd("quit", json!({}));
    let _ = dq.cmd("quit", json!({}));
    let (src_err, dst_err) = (src.finish(&src_log), dst.finish(&dst_log));
    // Written while migrating, over migrate command to STOP.
    let live_s = stop.map_or(wall_s, |s| s.saturating_sub(started_us) as f64 / 1e6);
    let live_rate = (pages_after.saturating_sub(pages_before) * PAGE) as f64 / live_s.max(1e-3);
    let stop_to_resume = match (stop, resume) {
        (Some(s), Some(r)) => json!((r as f64 - s as f64) / 1e3),
        _ => Value::Null,
    };
    let mut line = result;
    let m = line
        .as_object_mut()
        .ok_or("query-migrate returned no object")?;
    let extra = json!({
        "system": "qemu",
        "version": format!(
            "{}.{}.{}",
            version["qemu"]["major"], version["qemu"]["minor"], version["qemu"]["micro"]
        ),
        "package": version["package"],
        "mode": mode.label(),
        "chunk_bytes": match mode { Mode::Legacy => 0, Mode::Clear(b) => b },
        "clear_bitmap_shift": mode.shift(),
        "run": run,
        "mem_bytes": o.mem,
        "wss_bytes": o.wss,
        "dirty_rate_bytes_per_s": o.dirty_rate,
        "bandwidth_limit_bytes_per_s": o.bandwidth,
        "downtime_limit_ms": o.downtime_ms,
        "warmup_ms": o.warmup_ms,
        "migration_parameters": params,
        "guest_ready_s": ready_s,
        "guest_write_rate_bytes_per_s": guest_rate.round(),
        "guest_pages_written_before_migration": pages_before,
        "guest_write_rate_during_migration_bytes_per_s": live_rate.round(),
        "destination_guest_write_rate_bytes_per_s": dst_rate.round(),
        "migrate_started_unix_us": started_us,
        "source_stop_unix_us": stop,
        "destination_resume_unix_us": resume,
        "stop_to_resume_ms": stop_to_resume,
        "harness_wall_s": wall_s,
        "source_cpu_s": src_cpu1.0 - src_cpu0.0,
        "source_cpu_s_without_vcpu": src_cpu1.1 - src_cpu0.1,
        "destination_cpu_s": dst_cpu1.0 - dst_cpu0.0,
        "destination_cpu_s_without_vcpu": dst_cpu1.1 - dst_cpu0.1,
        "shim": {"source": shim_stats(&src_stats), "destination": shim_stats(&dst_stats)},
        "source_stderr": src_err.trim(),
        "destination_stderr": dst_err.trim(),
    });
    for (k, v) in extra.as_object().expect("object") {
        m.insert(k.clone(), v.clone());
    }
    Ok(line)
}

/// What the shim counted, from its statistics file (`null` if it wrote none).
fn shim_stats(p: &Path) -> Value {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

/// Waits until the source guest is in ring 3 with its working set pre-faulted (SeaBIOS and the
/// ring-0 stub are emulated on PVM: seconds); the seconds it took.
fn wait_ready(sq: &mut Qmp, src: &mut QemuProc, log: &Path, image: &Image) -> Result<f64, String> {
    let start = Instant::now();
    let mut in_ring3 = false;
    loop {
        if let Ok(Some(st)) = src.child.try_wait() {
            return Err(format!(
                "the source QEMU exited ({st}) while booting: {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            ));
        }
        let boot = sq.read_u64s(image.boot_status_addr, 1)?[0] & 0xffff_ffff;
        if boot == image.boot_status_ring3 {
            in_ring3 = true;
            if sq.read_u64s(image.counter_slot, 3)?[2] == 1 {
                return Ok(start.elapsed().as_secs_f64());
            }
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "the guest did not become ready in 300 s (boot status {boot:#x}, {})",
                if in_ring3 {
                    "in ring 3, pre-fault not done"
                } else {
                    "ring 3 not reached"
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's write rate over `window` (bytes/s), from vCPU 0's counter.
fn write_rate(q: &mut Qmp, image: &Image, window: Duration) -> Result<f64, String> {
    let w0 = (Instant::now(), q.read_u64s(image.counter_slot, 1)?[0]);
    std::thread::sleep(window);
    let w1 = (Instant::now(), q.read_u64s(image.counter_slot, 1)?[0]);
    Ok((w1.1.saturating_sub(w0.1) * PAGE) as f64 / w1.0.duration_since(w0.0).as_secs_f64())
}

/// Starts the migration to `port` and polls `query-migrate` until it completes; its result.
fn migrate(sq: &mut Qmp, port: u16) -> Result<Value, String> {
    let t0 = Instant::now();
    sq.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let r = sq.cmd("query-migrate", json!({}))?;
        match r["status"].as_str() {
            Some("completed") => return Ok(r),
            Some("failed" | "cancelled") => return Err(format!("migration {}: {r}", r["status"])),
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(600) {
            let _ = sq.cmd("migrate_cancel", json!({}));
            return Err("migration did not complete in 600 s".into());
        }
    }
}

/// Waits for the destination's RESUME event (it resumes the guest when the stream ends).
fn wait_resume(dq: &mut Qmp) -> Result<(), String> {
    let start = Instant::now();
    while dq.event_us("RESUME").is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            return Err("the destination did not resume in 30 s".into());
        }
        let st = dq.cmd("query-status", json!({}))?;
        if st["status"] == "running" && dq.event_us("RESUME").is_none() {
            // The event may come right after the status turns; read once more.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// What makes a run's numbers meaningless: incomplete migration, a guest that was not writing, a
/// mode that was not in effect.
fn check_run(o: &Opts, mode: Mode, line: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    if line["status"] != "completed" {
        p.push(format!("status {}", line["status"]));
    }
    if f(&line["guest_write_rate_bytes_per_s"]) <= 0.0 {
        p.push("the guest wrote nothing during the warm-up".into());
    } else if f(&line["guest_write_rate_bytes_per_s"]) < 0.5 * o.dirty_rate as f64 {
        // Only a gross miss: the target is 100%, but this host is shared and noisy.
        p.push(format!(
            "the guest wrote at {:.0} MiB/s, under half the {} MiB/s asked for",
            f(&line["guest_write_rate_bytes_per_s"]) / MIB as f64,
            o.dirty_rate >> 20
        ));
    }
    if f(&line["destination_guest_write_rate_bytes_per_s"]) <= 0.0 {
        p.push("the guest did not run on the destination".into());
    }
    // Every working-set page is data (pre-faulted), so it goes at least once as a normal page;
    // more means dirty pages were re-sent.
    let normal = f(&line["ram"]["normal"]);
    if normal <= (o.wss / PAGE) as f64 {
        p.push(format!(
            "{normal} normal pages sent for {} working-set pages: nothing re-sent",
            o.wss / PAGE
        ));
    }
    if f(&line["ram"]["dirty-sync-count"]) < 2.0 {
        p.push("fewer than 2 dirty syncs".into());
    }
    let clears = &line["shim"]["source"]["kvm_clear_dirty_log_calls"];
    match (mode, clears.as_u64()) {
        (_, None) => p.push("the shim wrote no statistics".into()),
        (Mode::Legacy, Some(c)) if c > 0 => {
            p.push(format!("legacy mode, yet {c} KVM_CLEAR_DIRTY_LOG calls"));
        }
        (Mode::Clear(_), Some(0)) => p.push("clear mode, yet no KVM_CLEAR_DIRTY_LOG call".into()),
        _ => {}
    }
    if line["stop_to_resume_ms"].is_null() {
        p.push("no STOP or RESUME event".into());
    }
    p
}

/// One `vmm bench --runs 1` round over `modes`; its JSON lines tagged `system: vmm`.
fn vmm_round(o: &Opts, vmm: &Path, modes: &[String], work: &Path) -> Result<Vec<Value>, String> {
    let json = work.join("vmm-round.jsonl");
    let _ = std::fs::remove_file(&json);
    let status = Command::new(vmm)
        .args(["bench", "--runs", "1", "--modes", &modes.join(",")])
        .args(["--mem", &o.mem.to_string(), "--wss", &o.wss.to_string()])
        .args(["--dirty-rate", &o.dirty_rate.to_string()])
        .args(["--bandwidth", &o.bandwidth.to_string()])
        .args(["--downtime", &format!("{}ms", o.downtime_ms)])
        .args(["--warmup", &format!("{}ms", o.warmup_ms), "--json"])
        .arg(&json)
        .status()
        .map_err(|e| format!("running vmm bench: {e}"))?;
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    if !status.success() && text.is_empty() {
        return Err(format!("vmm bench failed ({status}) and wrote no JSON"));
    }
    let mut out = Vec::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut v: Value = serde_json::from_str(l).map_err(|e| format!("vmm bench JSON: {e}"))?;
        if let Some(m) = v.as_object_mut() {
            m.insert("system".into(), "vmm".into());
        }
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_shifts() {
        assert_eq!(Mode::parse("legacy").unwrap(), Mode::Legacy);
        assert_eq!(Mode::parse("clear:1M").unwrap().shift(), Some(8));
        assert_eq!(Mode::parse("clear:16M").unwrap().shift(), Some(12));
        assert_eq!(Mode::parse("clear:1G").unwrap().shift(), Some(18));
        assert_eq!(Mode::parse("clear:256K").unwrap().shift(), Some(6));
        Mode::parse("clear:128K").unwrap_err();
        Mode::parse("clear:3M").unwrap_err();
        Mode::parse("fast").unwrap_err();
        assert_eq!(Mode::Clear(MIB).label(), "clear 1 MiB");
    }

    #[test]
    fn sizes_durations_and_options() {
        assert_eq!(parse_size("400M").unwrap(), 400 * MIB);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        parse_size("4X").unwrap_err();
        assert_eq!(parse_ms("100ms").unwrap(), 100);
        assert_eq!(parse_ms("2s").unwrap(), 2000);
        assert_eq!(parse_ms("2").unwrap(), 2);
        parse_ms("2x").unwrap_err();
        let a = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let o = parse_opts(&a("--modes legacy,clear:1M --runs 3 --mem 1G --wss 512M")).unwrap();
        assert_eq!(o.modes, vec![Mode::Legacy, Mode::Clear(MIB)]);
        assert_eq!((o.runs, o.mem, o.wss), (3, 1 << 30, 512 * MIB));
        let s = parse_opts(&a("--smoke")).unwrap();
        assert_eq!((s.mem, s.wss), (512 * MIB, 256 * MIB));
        parse_opts(&a("--wss 4G")).unwrap_err();
        parse_opts(&a("--bogus 1")).unwrap_err();
        parse_opts(&a("--runs")).unwrap_err();
    }

    #[test]
    fn monitor_dump_and_proc_stat() {
        let xp = "0000000000005000: 0x0000000000000a25 0x0000000000000000\r\n0000000000005010: 0x0000000000000001\r\n";
        assert_eq!(parse_xp(xp), vec![0xa25, 0, 1]);
        let stat = "4242 (CPU 0/KVM) R 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0 100";
        assert_eq!(stat_cpu_ticks(stat), Some(175));
        assert!(stat_cpu_ticks("garbage").is_none());
    }

    #[test]
    fn the_image_layout_comes_from_vmm_qemu_image() {
        let info = json!({"tsc_khz": 2_000_000, "boot_status_addr": 18432, "boot_status_ring3": 2953248770u64,
                          "counter_slot_addr": 20480, "max_ram_below_4g": 2147483648u64});
        let img = Image::from_json(PathBuf::from("x.img"), &info).unwrap();
        assert_eq!(
            (
                img.boot_status_addr,
                img.counter_slot,
                img.max_ram_below_4g >> 20
            ),
            (0x4800, 0x5000, 2048)
        );
        Image::from_json(PathBuf::from("x.img"), &json!({})).unwrap_err();
    }

    #[test]
    fn checks_flag_meaningless_runs() {
        let o = parse_opts(&["--smoke".to_string()]).unwrap();
        let good = json!({
            "status": "completed",
            "guest_write_rate_bytes_per_s": 96.0 * MIB as f64,
            "destination_guest_write_rate_bytes_per_s": 90.0 * MIB as f64,
            "ram": {"normal": 80000, "dirty-sync-count": 5},
            "shim": {"source": {"kvm_clear_dirty_log_calls": 300}},
            "stop_to_resume_ms": 40.0,
        });
        assert!(check_run(&o, Mode::Clear(MIB), &good).is_empty());
        // The same numbers claimed as legacy: clears happened, so legacy was not in effect.
        assert_eq!(check_run(&o, Mode::Legacy, &good).len(), 1);
        let mut idle = good;
        idle["guest_write_rate_bytes_per_s"] = json!(0);
        idle["ram"]["normal"] = json!(65536);
        assert_eq!(check_run(&o, Mode::Clear(MIB), &idle).len(), 2);
    }
}
