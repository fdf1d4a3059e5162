// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask qemu-bench`: the QEMU side of `vmm bench --compare` (docs/design.md, "The QEMU side
//! of the comparison").
//!
//! Per run and mode: `vmm qemu-image` writes our `random` workload as a Multiboot kernel; a
//! destination QEMU starts with `-incoming defer`; a source QEMU boots the image; both are driven
//! over QMP (unix sockets). The destination gets its capabilities and parameters, then
//! `migrate-incoming tcp:127.0.0.1:PORT` (QEMU reads the multifd settings when it starts listening,
//! so they must come first). After the guest is ready (its pre-fault wrote the whole working set)
//! and a warm-up, the source gets the same capabilities, `max-bandwidth` and `downtime-limit` and
//! migrates; `query-migrate` is polled until it completes. One JSON line per run: the raw
//! `query-migrate` result plus our fields (`system`, `version`, `mode`, `chunk_bytes`,
//! `multifd_channels`, `stop_to_resume_ms`, CPU seconds of each QEMU, the guest's write rate, the
//! KVM dirty-log ioctls each QEMU made).
//!
//! Which QEMU: the host's (`qemu-system-x86_64` on PATH, or `--qemu PATH`; Debian 12: 7.2), or
//! `--qemu-root DIR`: the QEMU of a Debian tree (debootstrap), run as `chroot DIR /usr/bin/env
//! ... /usr/bin/qemu-system-x86_64` (Debian 13 "trixie": 10.0). The tree gets /dev, /dev/shm,
//! /proc, /sys and /tmp bind-mounted from the host (idempotent, as root), and every file QEMU
//! opens (image, shim, QMP sockets, shim statistics) lives under /tmp, so one path names it on
//! both sides. `--install` with `--qemu-root`, or `--install-qemu10 [DIR]`, debootstraps the tree
//! when it has no QEMU.
//!
//! `--multifd N` turns on the `multifd` capability with `multifd-channels` N on both sides (0: off).
//! `--bandwidth 0` is no limit: `max-bandwidth` 0, which QEMU 7.2 and 10.0 both take as "no rate
//! limit" (their rate-limit check only applies a non-zero maximum). Each run checks what QEMU
//! reports back: the bandwidth it holds, multifd on both sides and pages through its channels.
//!
//! Modes: `clear:CHUNK` sets `-global migration.x-clear-bitmap-shift` (chunk = 2^shift pages).
//! `legacy`: QEMU 7.2 has no switch to stop using KVM_CLEAR_DIRTY_LOG, so an LD_PRELOAD shim (C,
//! built here with gcc) makes `KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` answer 0,
//! QEMU's own fallback when the kernel lacks the capability. The same shim counts
//! `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` calls in every mode, and a run fails unless the
//! counts match the mode (legacy: no clears; clear and postcopy: clears).
//!
//! `postcopy` and `postcopy:CHUNK` ([`postcopy`]): clear mode (QEMU's default chunk, or CHUNK as
//! in `clear:CHUNK`) with `postcopy-ram` on both sides and `migrate-start-postcopy` once the first
//! pass is done (`ram.dirty-sync-count` 2); the JSON line adds `postcopy_started_after_ms` (from
//! `migrate` to `migrate-start-postcopy`), the statuses seen and `query-migrate` at the switch.
//! `stop_to_resume_ms` is measured as in precopy: the source's STOP event (the switch) to the
//! destination's RESUME event (its guest runs with pages still missing).
//!
//! `--smoke`: a short end-to-end check (512M guest, 256M working set, legacy and clear:1M once,
//! or each of `--modes` once): the migration completes, the guest was writing before and after it,
//! and dirty pages were re-sent; a postcopy mode also went through `postcopy-active`. With
//! `--qemu-root` and `--multifd` it checks those paths the same way.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::harness::{build_vmm, is_ci, kvm_usable};
use crate::units::{human_bytes, parse_duration, parse_size};
use crate::workspace_root;

mod postcopy;

/// A duration flag in milliseconds (`100ms`, `2s`; a bare number is milliseconds).
fn parse_ms(s: &str) -> Result<u64, String> {
    Ok(parse_duration(s)?.as_millis() as u64)
}

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const QEMU: &str = "qemu-system-x86_64";
/// QEMU's path inside a `--qemu-root` tree (Debian's package puts it there).
const TREE_QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Where `--install-qemu10` puts the tree unless told otherwise.
const DEFAULT_QEMU10_ROOT: &str = "/opt/trixie";
/// The host directories a `--qemu-root` tree needs, in mount order (/dev before /dev/shm): KVM and
/// shared memory, /proc for QEMU's own reads, /sys, and /tmp for every file we share with QEMU.
const TREE_MOUNTS: [&str; 5] = ["/dev", "/dev/shm", "/proc", "/sys", "/tmp"];
/// The work directory of a `--qemu-root` run: under /tmp, which the tree shares, so a path means
/// the same file inside and outside it.
const TREE_WORK: &str = "/tmp/clearlog-qemu-bench";

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
    /// `postcopy-ram` on both sides, `migrate-start-postcopy` after the first pass (see
    /// [`postcopy`]); dirty logging as in clear mode, with this chunk (`postcopy:CHUNK`) or
    /// QEMU's default one (`postcopy`: no `-global`, QEMU's shift 18, 1 GiB chunks).
    Postcopy(Option<u64>),
}

impl Mode {
    fn parse(s: &str) -> Result<Mode, String> {
        let s = s.trim();
        match s {
            "legacy" => return Ok(Mode::Legacy),
            "postcopy" => return Ok(Mode::Postcopy(None)),
            _ => {}
        }
        if let Some(size) = s.strip_prefix("postcopy:") {
            return Ok(Mode::Postcopy(Some(parse_chunk(s, size)?)));
        }
        let size = s.strip_prefix("clear:").ok_or_else(|| {
            format!("mode `{s}`: use legacy, clear:SIZE (e.g. clear:1M), postcopy or postcopy:SIZE")
        })?;
        Ok(Mode::Clear(parse_chunk(s, size)?))
    }

    /// The clear chunk the mode sets (None: legacy, or QEMU's default chunk).
    fn chunk(self) -> Option<u64> {
        match self {
            Mode::Legacy | Mode::Postcopy(None) => None,
            Mode::Clear(b) | Mode::Postcopy(Some(b)) => Some(b),
        }
    }

    fn shift(self) -> Option<u32> {
        self.chunk().map(|b| (b / PAGE).trailing_zeros())
    }

    fn is_postcopy(self) -> bool {
        matches!(self, Mode::Postcopy(_))
    }

    /// The label the tables print: `vmm bench`'s for legacy and clear ("legacy", "clear 1 MiB"),
    /// "postcopy" with QEMU's default chunk, "postcopy 1 MiB" with a chunk of 1 MiB (the label of
    /// `vmm bench`'s own `postcopy`, whose first pass clears 1 MiB chunks).
    fn label(self) -> String {
        match self {
            Mode::Legacy => "legacy".into(),
            Mode::Clear(b) => format!("clear {}", human_bytes(b)),
            Mode::Postcopy(None) => "postcopy".into(),
            Mode::Postcopy(Some(b)) => format!("postcopy {}", human_bytes(b)),
        }
    }
}

/// The chunk of mode `mode` (`clear:SIZE`, `postcopy:SIZE`): a power of two QEMU's
/// `x-clear-bitmap-shift` can name (6..=31: chunks of 2^shift pages).
fn parse_chunk(mode: &str, size: &str) -> Result<u64, String> {
    let b = parse_size(size)?;
    if !b.is_power_of_two() || !(PAGE << 6..=PAGE << 31).contains(&b) {
        return Err(format!(
            "mode `{mode}`: the chunk must be a power of two from 256K to 8T"
        ));
    }
    Ok(b)
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
    /// Bytes per second; 0 = no limit.
    bandwidth: u64,
    downtime_ms: u64,
    warmup_ms: u64,
    smoke: bool,
    install: bool,
    interleave_with_vmm: Option<Vec<String>>,
    /// `vmm bench --transports` of the interleaved rounds (None: vmm's default).
    vmm_transports: Option<String>,
    /// The QEMU binary: on the host, or inside `qemu_root`.
    qemu: String,
    /// A Debian tree whose QEMU runs under chroot(8); None: the host's QEMU.
    qemu_root: Option<PathBuf>,
    /// multifd channels on both sides; 0 = multifd off.
    multifd: u8,
}

const USAGE: &str = "usage: cargo xtask qemu-bench [--modes legacy,clear:1M,clear:16M,postcopy] [--runs N] [--out FILE] [--append]
       [--mem 4G] [--wss 3G] [--dirty-rate 288M] [--bandwidth 400M|0] [--downtime 100ms] [--warmup 2s]
       [--multifd N] [--interleave-with-vmm MODES [--vmm-transports plain:N,tls:N]] [--install] [--qemu PATH]
       [--qemu-root DIR | --install-qemu10 [DIR]] [--smoke]
  --modes M,...      legacy, clear:CHUNK (x-clear-bitmap-shift), postcopy (postcopy-ram, switched
                     after the first pass; QEMU's default chunk) or postcopy:CHUNK
  --bandwidth 0      no bandwidth limit (QEMU max-bandwidth 0; also max-postcopy-bandwidth)
  --multifd N        the multifd capability with N channels on both sides (0, the default: off)
  --qemu-root DIR    run DIR's QEMU under chroot (a debootstrap tree; /dev, /dev/shm, /proc, /sys
                     and /tmp are bind-mounted into it if they are not yet); --qemu is then a path
                     inside DIR (default /usr/bin/qemu-system-x86_64)
  --install          install what is missing: the host's qemu-system-x86 with apt-get, or with
                     --qemu-root a Debian trixie tree (debootstrap, QEMU 10.0)
  --install-qemu10 [DIR]  --qemu-root DIR --install (DIR: /opt/trixie)";

/// What the flags said beyond [`Opts`]: whether the guest's shape or the QEMU binary was given, and
/// the trees `--qemu-root` and `--install-qemu10` named.
#[derive(Debug, Default)]
struct Given {
    shape: bool,
    qemu: bool,
    roots: Vec<PathBuf>,
}

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
        vmm_transports: None,
        qemu: QEMU.into(),
        qemu_root: None,
        multifd: 0,
    };
    let mut given = Given::default();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        match flag {
            "--smoke" => o.smoke = true,
            "--append" => o.append = true,
            "--install" => o.install = true,
            "--install-qemu10" => {
                // The directory is optional: the next word is it unless it is another option.
                let dir = match args.get(i + 1) {
                    Some(d) if !d.starts_with('-') => {
                        i += 1;
                        d.clone()
                    }
                    _ => DEFAULT_QEMU10_ROOT.into(),
                };
                given.roots.push(PathBuf::from(dir));
                o.install = true;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ => {
                let v = args
                    .get(i + 1)
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
                i += 1;
                set_opt(&mut o, &mut given, flag, v)?;
            }
        }
        i += 1;
    }
    let explicit_shape = given.shape;
    set_qemu_root(&mut o, given)?;
    if o.smoke {
        smoke_defaults(&mut o, args, explicit_shape);
    }
    validate_opts(&o)?;
    Ok(o)
}

/// Sets the option `flag` takes to its value `v`.
fn set_opt(o: &mut Opts, given: &mut Given, flag: &str, v: &str) -> Result<(), String> {
    match flag {
        "--modes" => {
            o.modes = v.split(',').map(Mode::parse).collect::<Result<_, _>>()?;
        }
        "--runs" => {
            o.runs = v.parse().map_err(|_| format!("--runs {v}: not a number"))?;
        }
        "--out" => o.out = PathBuf::from(v),
        "--mem" => (o.mem, given.shape) = (parse_size(v)?, true),
        "--wss" => (o.wss, given.shape) = (parse_size(v)?, true),
        "--dirty-rate" => (o.dirty_rate, given.shape) = (parse_size(v)?, true),
        "--bandwidth" => o.bandwidth = parse_size(v)?,
        "--downtime" => o.downtime_ms = parse_ms(v)?,
        "--warmup" => o.warmup_ms = parse_ms(v)?,
        "--qemu" => (o.qemu, given.qemu) = (v.to_string(), true),
        "--qemu-root" => given.roots.push(PathBuf::from(v)),
        "--multifd" => {
            // QEMU's multifd-channels is a uint8 of at least 1.
            o.multifd = v
                .parse()
                .map_err(|_| format!("--multifd {v}: give 0 (off) or a channel count up to 255"))?;
        }
        "--vmm-transports" => o.vmm_transports = Some(v.to_string()),
        "--interleave-with-vmm" => {
            o.interleave_with_vmm = Some(v.split(',').map(str::to_string).collect());
        }
        _ => return Err(format!("unknown option `{flag}`\n{USAGE}")),
    }
    Ok(())
}

/// The tree of `--qemu-root` / `--install-qemu10` (one, named the same way by both if both are
/// given), whose QEMU is at [`TREE_QEMU`] unless `--qemu` says otherwise.
fn set_qemu_root(o: &mut Opts, mut given: Given) -> Result<(), String> {
    given.roots.dedup();
    match given.roots.as_slice() {
        [] => Ok(()),
        [root] => {
            if root.as_os_str().is_empty() || root == Path::new("/") {
                return Err(format!(
                    "--qemu-root {}: name the tree's directory",
                    root.display()
                ));
            }
            o.qemu_root = Some(root.clone());
            if !given.qemu {
                o.qemu = TREE_QEMU.into();
            }
            Ok(())
        }
        roots => Err(format!(
            "--qemu-root / --install-qemu10 name different trees: {}",
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `--smoke`'s small guest (unless `explicit_shape`), modes, warm-up and output file, where `args`
/// do not set them.
fn smoke_defaults(o: &mut Opts, args: &[String], explicit_shape: bool) {
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

/// At least one run and one mode; a guest that holds its working set.
fn validate_opts(o: &Opts) -> Result<(), String> {
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
    Ok(())
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
    let work = match o.qemu_root {
        Some(_) => PathBuf::from(TREE_WORK),
        None => workspace_root().join("target/qemu-bench"),
    };
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let shim = build_shim(&work)?;
    let qemu_version = probe_qemu(&o, &shim, &work)?;
    postcopy::check_multifd(&o.modes, o.multifd, &qemu_version)?;
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
    println!("{}", header(&o, &qemu_version, &image));
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

/// Makes the QEMU to run ready: the host's, installed with apt-get if asked (`--install`), or a
/// `--qemu-root` tree's, debootstrapped if asked and missing, with the host's directories mounted
/// into it. `false` when the host's QEMU is missing and that is a loud skip (`--smoke` outside CI)
/// rather than a failure.
fn ensure_qemu(o: &Opts) -> Result<bool, String> {
    if let Some(root) = &o.qemu_root {
        ensure_tree(o, root)?;
        return Ok(true);
    }
    if !have_qemu(&o.qemu) && o.install {
        apt_install("qemu-system-x86")?;
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

/// A `--qemu-root` tree with QEMU in it (debootstrapped if `--install` and missing) and the host's
/// directories mounted.
fn ensure_tree(o: &Opts, root: &Path) -> Result<(), String> {
    if !root.join(o.qemu.trim_start_matches('/')).exists() {
        if !o.install {
            return Err(format!(
                "{} has no {} (pass --install, or --install-qemu10 {0}, to debootstrap Debian trixie with QEMU 10.0 there)",
                root.display(),
                o.qemu
            ));
        }
        install_tree(root)?;
    }
    mount_tree(root)
}

/// The line printed before the runs: which QEMU (`qemu_version`: its `--version` line), the guest
/// and the migration settings.
fn header(o: &Opts, qemu_version: &str, image: &Image) -> String {
    format!(
        "\n==> xtask qemu-bench: {} ({qemu_version}): guest {} MiB, working set {} MiB ({} MiB pre-faulted before the warm-up) at {} MiB/s (TSC {} kHz), bandwidth {}, multifd {}, downtime {} ms, {} run(s) of {}",
        qemu_label(o),
        o.mem >> 20,
        o.wss >> 20,
        o.wss >> 20,
        o.dirty_rate >> 20,
        image.tsc_khz,
        bandwidth_label(o.bandwidth),
        match o.multifd {
            0 => "off".to_string(),
            n => format!("{n} channels"),
        },
        o.downtime_ms,
        o.runs,
        o.modes.iter().map(|m| m.label()).collect::<Vec<_>>().join(", ")
    )
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
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mib = |v: &Value| num(v) / MIB as f64;
    let postcopy = if mode.is_postcopy() {
        format!(
            "  postcopy after {:.0} ms, {} requests, {:.0} MiB in postcopy",
            num(&line["postcopy_started_after_ms"]),
            line["ram"]["postcopy-requests"],
            mib(&line["ram"]["postcopy-bytes"])
        )
    } else {
        String::new()
    };
    format!(
        "  run {run}/{} qemu {} {:<12} total {:>6.2} s  downtime {:>4} ms  stop->resume {:>6.1} ms  sent {:>6.0} MiB ({:>5.0} MiB/s)  syncs {:>3}  guest {:>4.0} MiB/s ({:>4.0} while migrating)  clears {:>6}{postcopy}  {} ({:.0} s wall, guest ready in {:.1} s)",
        o.runs,
        line["version"].as_str().unwrap_or("?"),
        mode.label(),
        num(&line["total-time"]) / 1e3,
        line["downtime"],
        num(&line["stop_to_resume_ms"]),
        mib(&line["ram"]["transferred"]),
        mib(&line["ram"]["transferred"]) / (num(&line["total-time"]) / 1e3),
        line["ram"]["dirty-sync-count"],
        mib(&line["guest_write_rate_bytes_per_s"]),
        mib(&line["guest_write_rate_during_migration_bytes_per_s"]),
        line["shim"]["source"]["kvm_clear_dirty_log_calls"],
        if problems.is_empty() { "ok".to_string() } else { format!("FAILED: {}", problems.join("; ")) },
        t.elapsed().as_secs_f64(),
        num(&line["guest_ready_s"])
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

/// `apt-get install -y PKG`.
fn apt_install(pkg: &str) -> Result<(), String> {
    println!("==> xtask qemu-bench: apt-get install -y {pkg}");
    let ok = Command::new("apt-get")
        .args(["install", "-y", pkg])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!("apt-get install -y {pkg} failed"))
    }
}

/// Debian trixie (QEMU 10.0) in `root`: the smallest tree that runs QEMU.
fn install_tree(root: &Path) -> Result<(), String> {
    if !Command::new("debootstrap")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        apt_install("debootstrap")?;
    }
    println!(
        "==> xtask qemu-bench: debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils trixie {}",
        root.display()
    );
    let ok = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=qemu-system-x86,qemu-utils",
            "trixie",
        ])
        .arg(root)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err(format!(
            "debootstrap of Debian trixie into {} failed (its log: {}/debootstrap/debootstrap.log)",
            root.display(),
            root.display()
        ));
    }
    Ok(())
}

/// The mount points of /proc/self/mountinfo (field 5; spaces and the like come octal-escaped).
fn parse_mount_points(mountinfo: &str) -> HashSet<PathBuf> {
    let unescape = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let oct = b.get(i + 1..i + 4).and_then(|d| {
                std::str::from_utf8(d)
                    .ok()
                    .and_then(|d| u8::from_str_radix(d, 8).ok())
            });
            match (b[i], oct) {
                (b'\\', Some(c)) => {
                    out.push(c);
                    i += 4;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        PathBuf::from(OsString::from_vec(out))
    };
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// Bind-mounts into `root` whichever of [`TREE_MOUNTS`] is not mounted there yet, so a second run
/// (or a tree prepared by hand) mounts nothing twice. Then checks that QEMU will find /dev/kvm.
fn mount_tree(root: &Path) -> Result<(), String> {
    let root = root
        .canonicalize()
        .map_err(|e| format!("--qemu-root {}: {e}", root.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let mounted = parse_mount_points(&info);
    for dir in TREE_MOUNTS {
        let target = root.join(dir.trim_start_matches('/'));
        if mounted.contains(&target) {
            continue;
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(format!(
                "{} is not mounted and only root can bind-mount {dir} there: run as root",
                target.display()
            ));
        }
        std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        println!(
            "==> xtask qemu-bench: mount --bind {dir} {}",
            target.display()
        );
        let ok = Command::new("mount")
            .args(["--bind", dir])
            .arg(&target)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("mount --bind {dir} {} failed", target.display()));
        }
    }
    let kvm = Command::new("chroot")
        .arg(&root)
        .args(["/usr/bin/test", "-c", "/dev/kvm"])
        .status()
        .map_err(|e| format!("chroot {}: {e}", root.display()))?;
    if !kvm.success() {
        return Err(format!(
            "/dev/kvm is not a device inside {} although its /dev is mounted",
            root.display()
        ));
    }
    Ok(())
}

/// A command that runs QEMU with `env` added to its environment: the host's binary, or
/// `chroot ROOT /usr/bin/env K=V... QEMU`, so the variables (LD_PRELOAD among them) reach QEMU
/// and not the host's chroot(8). chroot and env exec in place: the child's PID is QEMU's.
fn qemu_command(o: &Opts, env: &[(&str, &OsStr)]) -> Command {
    match &o.qemu_root {
        None => {
            let mut cmd = Command::new(&o.qemu);
            cmd.envs(env.iter().copied());
            cmd
        }
        Some(root) => {
            let mut cmd = Command::new("chroot");
            cmd.arg(root).arg("/usr/bin/env");
            for (k, v) in env {
                let mut kv = OsString::from(k);
                kv.push("=");
                kv.push(v);
                cmd.arg(kv);
            }
            cmd.arg(&o.qemu);
            cmd
        }
    }
}

/// How the header names the QEMU that runs.
fn qemu_label(o: &Opts) -> String {
    match &o.qemu_root {
        None => o.qemu.clone(),
        Some(root) => format!("chroot {} {}", root.display(), o.qemu),
    }
}

fn bandwidth_label(bandwidth: u64) -> String {
    match bandwidth {
        0 => "unlimited".into(),
        b => format!("{} MiB/s", b >> 20),
    }
}

/// Runs `QEMU --version` with the shim preloaded: the shim must load (its statistics file appears,
/// written by its destructor inside QEMU's process), which also proves that QEMU reads and writes
/// our work directory under the same path. Returns the version line.
fn probe_qemu(o: &Opts, shim: &Path, work: &Path) -> Result<String, String> {
    let stats = work.join("probe.shim.json");
    let _ = std::fs::remove_file(&stats);
    let out = qemu_command(
        o,
        &[
            ("LD_PRELOAD", shim.as_os_str()),
            ("CLEARLOG_SHIM_STATS", stats.as_os_str()),
        ],
    )
    .arg("--version")
    .output()
    .map_err(|e| format!("cannot run {}: {e}", qemu_label(o)))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            qemu_label(o),
            out.status,
            stderr.trim()
        ));
    }
    if !stats.exists() {
        return Err(format!(
            "the LD_PRELOAD shim {} did not load into {} (no {}): {}",
            shim.display(),
            qemu_label(o),
            stats.display(),
            stderr.trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout.lines().next().unwrap_or_default().trim().to_string())
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
    incoming: bool,
) -> Result<(QemuProc, PathBuf, PathBuf, PathBuf), String> {
    let sock = work.join(format!("{name}.qmp"));
    let log = work.join(format!("{name}.log"));
    let stats = work.join(format!("{name}.shim.json"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&stats);
    let hide = OsStr::new(if mode == Mode::Legacy { "1" } else { "0" });
    let mut cmd = qemu_command(
        o,
        &[
            ("LD_PRELOAD", shim.as_os_str()),
            ("CLEARLOG_SHIM_STATS", stats.as_os_str()),
            ("CLEARLOG_SHIM_HIDE_MANUAL_PROTECT", hide),
        ],
    );
    // No IA32_ARCH_CAPABILITIES: QEMU 10.0 sets it to a value this host's KVM refuses ("failed to
    // set MSR 0x10a", then an assertion), and the ring-3 workload does not read it. The same CPU
    // for every QEMU version keeps their runs comparable.
    cmd.args([
        "-accel",
        "kvm",
        "-cpu",
        "max,-arch-capabilities",
        "-smp",
        "1",
    ])
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
    if incoming {
        // Listens only at `migrate-incoming`, after the capabilities are set (multifd needs that).
        cmd.args(["-incoming", "defer"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu_label(o)))?;
    Ok((QemuProc { child }, sock, log, stats))
}

/// Turns capability `name` on at the `side` QEMU; a refusal names both.
fn set_capability(q: &mut Qmp, side: &str, name: &str) -> Result<(), String> {
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": name, "state": true}]}),
    )
    .map(drop)
    .map_err(|e| format!("the {side} QEMU refuses the {name} capability: {e}"))
}

/// The capabilities of the run at the `side` QEMU: multifd with `o.multifd` channels (0 leaves it
/// off, QEMU's default) and, in a postcopy mode, `postcopy-ram`. The destination gets them before
/// it listens (QEMU reads the multifd settings then), the source before `migrate`.
fn set_capabilities(o: &Opts, mode: Mode, q: &mut Qmp, side: &str) -> Result<(), String> {
    if o.multifd > 0 {
        set_capability(q, side, "multifd")?;
        q.cmd(
            "migrate-set-parameters",
            json!({ "multifd-channels": o.multifd }),
        )?;
    }
    if mode.is_postcopy() {
        set_capability(q, side, "postcopy-ram")?;
    }
    Ok(())
}

/// Whether QEMU reports capability `name` on.
fn capability(q: &mut Qmp, name: &str) -> Result<bool, String> {
    let caps = q.cmd("query-migrate-capabilities", json!({}))?;
    caps.as_array()
        .and_then(|c| c.iter().find(|c| c["capability"] == name))
        .and_then(|c| c["state"].as_bool())
        .ok_or_else(|| format!("query-migrate-capabilities has no {name}: {caps}"))
}

/// What both sides hold once the source is set up: their migration parameters and whether each
/// has the multifd and postcopy-ram capabilities on.
struct Settings {
    source: Value,
    destination: Value,
    /// `{"source": bool, "destination": bool}`.
    multifd_on: Value,
    /// `{"source": bool, "destination": bool}`.
    postcopy_on: Value,
}

impl Settings {
    /// Gives the source the run's capabilities (the destination got them before it listened),
    /// `max-bandwidth` and `downtime-limit` (and in a postcopy mode `max-postcopy-bandwidth`, the
    /// same link for the postcopy phase); then reads back what both sides hold.
    fn apply(o: &Opts, mode: Mode, sq: &mut Qmp, dq: &mut Qmp) -> Result<Settings, String> {
        set_capabilities(o, mode, sq, "source")?;
        // max-bandwidth 0 is QEMU's "no limit" (see the module documentation), as is
        // max-postcopy-bandwidth 0 (QEMU's default, whatever max-bandwidth says).
        let mut params = json!({"max-bandwidth": o.bandwidth, "downtime-limit": o.downtime_ms});
        if mode.is_postcopy() {
            params["max-postcopy-bandwidth"] = json!(o.bandwidth);
        }
        sq.cmd("migrate-set-parameters", params)?;
        let on = |name: &str, sq: &mut Qmp, dq: &mut Qmp| -> Result<Value, String> {
            Ok(json!({"source": capability(sq, name)?, "destination": capability(dq, name)?}))
        };
        Ok(Settings {
            source: sq.cmd("query-migrate-parameters", json!({}))?,
            destination: dq.cmd("query-migrate-parameters", json!({}))?,
            multifd_on: on("multifd", sq, dq)?,
            postcopy_on: on("postcopy-ram", sq, dq)?,
        })
    }
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
    let uri = format!("tcp:127.0.0.1:{port}");
    let (mut dst, dst_sock, dst_log, dst_stats) =
        spawn_qemu(o, mode, "destination", image, shim, work, true)?;
    let (mut src, src_sock, src_log, src_stats) =
        spawn_qemu(o, mode, "source", image, shim, work, false)?;
    let mut dq = Qmp::connect(&dst_sock, &mut dst.child)?;
    let mut sq = Qmp::connect(&src_sock, &mut src.child)?;
    let version = sq.cmd("query-version", json!({}))?;
    // The destination listens only now, with its multifd settings (and postcopy-ram) in place.
    set_capabilities(o, mode, &mut dq, "destination")?;
    dq.cmd("migrate-incoming", json!({ "uri": uri }))?;
    let ready_s = wait_ready(&mut sq, &mut src, &src_log, image)?;
    // Warm-up; the guest's write rate over it.
    let guest_rate = write_rate(&mut sq, image, Duration::from_millis(o.warmup_ms))?;
    let settings = Settings::apply(o, mode, &mut sq, &mut dq)?;
    let pages_before = sq.read_u64s(image.counter_slot, 1)?[0];
    let (src_cpu0, dst_cpu0) = (cpu_seconds(src.pid()), cpu_seconds(dst.pid()));
    let started_us = now_us();
    let t0 = Instant::now();
    let (result, trace) = migrate(&mut sq, &uri, mode)?;
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
        "multifd_capability": settings.multifd_on,
        "postcopy_ram_capability": settings.postcopy_on,
        "migration_parameters": settings.source,
        "destination_migration_parameters": settings.destination,
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
    for (k, v) in [run_fields(o, mode, run, &version), extra, trace.json()]
        .iter()
        .flat_map(|f| f.as_object().expect("object"))
    {
        m.insert(k.clone(), v.clone());
    }
    Ok(line)
}

/// What a run's JSON line says of the run itself: the QEMU (`version`: `query-version`), the mode
/// and the options it ran with.
fn run_fields(o: &Opts, mode: Mode, run: u32, version: &Value) -> Value {
    json!({
        "system": "qemu",
        "version": format!(
            "{}.{}.{}",
            version["qemu"]["major"], version["qemu"]["minor"], version["qemu"]["micro"]
        ),
        "package": version["package"],
        "qemu_root": o.qemu_root.as_ref().map(|r| r.display().to_string()),
        "mode": mode.label(),
        // null: QEMU's default chunk (postcopy without a chunk).
        "chunk_bytes": if mode == Mode::Legacy { Some(0) } else { mode.chunk() },
        "multifd_channels": o.multifd,
        "clear_bitmap_shift": mode.shift(),
        "run": run,
        "mem_bytes": o.mem,
        "wss_bytes": o.wss,
        "dirty_rate_bytes_per_s": o.dirty_rate,
        "bandwidth_limit_bytes_per_s": o.bandwidth,
        "bandwidth_unlimited": o.bandwidth == 0,
        "downtime_limit_ms": o.downtime_ms,
        "warmup_ms": o.warmup_ms,
        "prefaulted_bytes": o.wss,
    })
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

/// Starts the migration to `uri` and polls `query-migrate` until it completes (in a postcopy
/// mode, switching to postcopy after the first pass); its result, and what the polls saw.
fn migrate(sq: &mut Qmp, uri: &str, mode: Mode) -> Result<(Value, postcopy::Trace), String> {
    let t0 = Instant::now();
    let mut trace = postcopy::Trace::default();
    sq.cmd("migrate", json!({ "uri": uri }))?;
    loop {
        std::thread::sleep(trace.interval(mode));
        let r = sq.cmd("query-migrate", json!({}))?;
        trace.record(&r);
        match r["status"].as_str() {
            Some("completed") => return Ok((r, trace)),
            Some("failed" | "cancelled") => return Err(format!("migration {}: {r}", r["status"])),
            _ => trace.switch_if_due(mode, sq, &r, t0),
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
        (Mode::Clear(_) | Mode::Postcopy(_), Some(0)) => p.push(format!(
            "{} mode (clear), yet no KVM_CLEAR_DIRTY_LOG call",
            mode.label()
        )),
        _ => {}
    }
    if mode.is_postcopy() {
        p.extend(postcopy::check(o.bandwidth, line));
    }
    if line["stop_to_resume_ms"].is_null() {
        p.push("no STOP or RESUME event".into());
    }
    // The limit QEMU holds must be the one asked for (0: none), or the run measured something else.
    if line["migration_parameters"]["max-bandwidth"].as_u64() != Some(o.bandwidth) {
        p.push(format!(
            "QEMU holds max-bandwidth {}, not the {} asked for",
            line["migration_parameters"]["max-bandwidth"], o.bandwidth
        ));
    }
    let multifd_bytes = f(&line["ram"]["multifd-bytes"]);
    if o.multifd == 0 {
        if multifd_bytes > 0.0 {
            p.push(format!(
                "multifd off, yet {multifd_bytes} bytes went through multifd"
            ));
        }
    } else {
        let n = u64::from(o.multifd);
        for side in ["source", "destination"] {
            if line["multifd_capability"][side] != true {
                p.push(format!("multifd is not on at the {side}"));
            }
        }
        for key in ["migration_parameters", "destination_migration_parameters"] {
            if line[key]["multifd-channels"].as_u64() != Some(n) {
                p.push(format!(
                    "{key}: multifd-channels {}, not {n}",
                    line[key]["multifd-channels"]
                ));
            }
        }
        if multifd_bytes <= 0.0 {
            p.push("multifd on, yet no page went through its channels".into());
        }
    }
    p
}

/// `vmm --bandwidth` for `bytes_per_s` (0: no limit, which vmm spells `unlimited`).
fn vmm_bandwidth(bytes_per_s: u64) -> String {
    match bytes_per_s {
        0 => "unlimited".into(),
        b => b.to_string(),
    }
}

/// One `vmm bench --runs 1` round over `modes`; its JSON lines tagged `system: vmm`.
fn vmm_round(o: &Opts, vmm: &Path, modes: &[String], work: &Path) -> Result<Vec<Value>, String> {
    let json = work.join("vmm-round.jsonl");
    let _ = std::fs::remove_file(&json);
    let status = Command::new(vmm)
        .args(["bench", "--runs", "1", "--modes", &modes.join(",")])
        .args(["--mem", &o.mem.to_string(), "--wss", &o.wss.to_string()])
        .args(["--dirty-rate", &o.dirty_rate.to_string()])
        .args(["--bandwidth", &vmm_bandwidth(o.bandwidth)])
        .args(["--downtime", &format!("{}ms", o.downtime_ms)])
        .args(["--warmup", &format!("{}ms", o.warmup_ms), "--json"])
        .arg(&json)
        .args(
            o.vmm_transports
                .iter()
                .flat_map(|t| ["--transports", t.as_str()]),
        )
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
    fn postcopy_modes() {
        // Plain postcopy: QEMU's default chunk, no -global; labelled `postcopy`.
        let p = Mode::parse("postcopy").unwrap();
        assert_eq!(p, Mode::Postcopy(None));
        assert_eq!(
            (p.shift(), p.chunk(), p.label().as_str()),
            (None, None, "postcopy")
        );
        assert!(p.is_postcopy() && !Mode::Clear(MIB).is_postcopy() && !Mode::Legacy.is_postcopy());
        // postcopy:CHUNK sets the shift as clear:CHUNK does; its label is vmm bench's postcopy's.
        let p = Mode::parse(" postcopy:1M").unwrap();
        assert_eq!(p, Mode::Postcopy(Some(MIB)));
        assert_eq!(p.shift(), Mode::parse("clear:1M").unwrap().shift());
        assert_eq!(p.label(), "postcopy 1 MiB");
        assert_eq!(Mode::parse("postcopy:16M").unwrap().shift(), Some(12));
        Mode::parse("postcopy:3M").unwrap_err();
        Mode::parse("postcopy:").unwrap_err();
        Mode::parse("postcopy:128K").unwrap_err();
        Mode::parse("postcopy-ram").unwrap_err();
        let a = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let o = parse_opts(&a("--smoke --modes postcopy,clear:1M,postcopy:1M")).unwrap();
        assert_eq!(
            o.modes,
            vec![
                Mode::Postcopy(None),
                Mode::Clear(MIB),
                Mode::Postcopy(Some(MIB))
            ]
        );
        assert_eq!(o.mem, 512 * MIB);
        // The JSON's chunk: 0 for legacy, null for QEMU's default.
        let v = json!({"qemu": {"major": 10, "minor": 0, "micro": 13}});
        let f = |m: Mode| run_fields(&o, m, 1, &v);
        assert_eq!(f(Mode::Legacy)["chunk_bytes"], 0);
        assert_eq!(f(Mode::Postcopy(None))["chunk_bytes"], Value::Null);
        assert_eq!(f(Mode::Postcopy(None))["mode"], "postcopy");
        assert_eq!(f(Mode::Postcopy(Some(MIB)))["chunk_bytes"], MIB);
        assert_eq!(f(Mode::Postcopy(Some(MIB)))["clear_bitmap_shift"], 8);
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
    fn qemu_root_multifd_and_unlimited_bandwidth() {
        let a = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let o = parse_opts(&a("--smoke")).unwrap();
        assert_eq!((o.qemu_root, o.qemu.as_str(), o.multifd), (None, QEMU, 0));
        assert!(!o.install);

        let o = parse_opts(&a("--qemu-root /opt/trixie --multifd 2 --bandwidth 0")).unwrap();
        assert_eq!(o.qemu_root, Some(PathBuf::from("/opt/trixie")));
        assert_eq!((o.qemu.as_str(), o.multifd, o.bandwidth), (TREE_QEMU, 2, 0));
        assert_eq!(bandwidth_label(o.bandwidth), "unlimited");
        assert_eq!(bandwidth_label(400 * MIB), "400 MiB/s");
        // --qemu names a binary inside the tree.
        let o = parse_opts(&a("--qemu /usr/local/bin/qemu --qemu-root /t")).unwrap();
        assert_eq!(o.qemu, "/usr/local/bin/qemu");
        assert_eq!(qemu_label(&o), "chroot /t /usr/local/bin/qemu");

        // --install-qemu10 takes its directory only when one follows.
        let o = parse_opts(&a("--install-qemu10 --multifd 4")).unwrap();
        assert_eq!(o.qemu_root, Some(PathBuf::from(DEFAULT_QEMU10_ROOT)));
        assert!(o.install);
        assert_eq!(o.multifd, 4);
        let o = parse_opts(&a("--install-qemu10 /srv/t")).unwrap();
        assert_eq!(o.qemu_root, Some(PathBuf::from("/srv/t")));
        let o = parse_opts(&a("--install-qemu10 /srv/t --qemu-root /srv/t")).unwrap();
        assert_eq!(o.qemu_root, Some(PathBuf::from("/srv/t")));
        parse_opts(&a("--install-qemu10 /a --qemu-root /b")).unwrap_err();
        parse_opts(&a("--qemu-root /")).unwrap_err();

        parse_opts(&a("--multifd 256")).unwrap_err();
        parse_opts(&a("--multifd -1")).unwrap_err();
        parse_opts(&a("--multifd two")).unwrap_err();
        parse_opts(&a("--multifd")).unwrap_err();

        // The dense shape fits: 6000 MiB from 1 MiB in a 6 GiB guest.
        let o = parse_opts(&a("--mem 6G --wss 6000M --dirty-rate 8M --bandwidth 0")).unwrap();
        assert_eq!((o.mem, o.wss, o.dirty_rate), (6 << 30, 6000 * MIB, 8 * MIB));
    }

    #[test]
    fn mountinfo_mount_points() {
        let info = "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    30 22 0:5 / /opt/trixie/dev rw - devtmpfs devtmpfs rw\n\
                    31 30 0:25 / /opt/trixie/dev/shm rw - tmpfs tmpfs rw\n\
                    40 22 254:0 /tmp /srv/my\\040tree/tmp rw - ext4 /dev/vda rw\n";
        let m = parse_mount_points(info);
        assert_eq!(m.len(), 4);
        assert!(m.contains(Path::new("/opt/trixie/dev")));
        assert!(m.contains(Path::new("/opt/trixie/dev/shm")));
        assert!(m.contains(Path::new("/srv/my tree/tmp")));
        assert!(!m.contains(Path::new("/opt/trixie/proc")));
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
            "migration_parameters": {"max-bandwidth": 400 * MIB},
        });
        assert!(check_run(&o, Mode::Clear(MIB), &good).is_empty());
        // The same numbers claimed as legacy: clears happened, so legacy was not in effect.
        assert_eq!(check_run(&o, Mode::Legacy, &good).len(), 1);
        let mut idle = good.clone();
        idle["guest_write_rate_bytes_per_s"] = json!(0);
        idle["ram"]["normal"] = json!(65536);
        assert_eq!(check_run(&o, Mode::Clear(MIB), &idle).len(), 2);
        // A limit QEMU did not take, or pages through multifd that was meant to be off.
        let mut other_limit = good.clone();
        other_limit["migration_parameters"]["max-bandwidth"] = json!(134217728);
        other_limit["ram"]["multifd-bytes"] = json!(4096);
        assert_eq!(check_run(&o, Mode::Clear(MIB), &other_limit).len(), 2);

        // multifd asked for: on at both sides, the channel count held, pages through it.
        let m = parse_opts(&["--smoke", "--multifd", "2", "--bandwidth", "0"].map(String::from))
            .unwrap();
        let mut on = good.clone();
        on["migration_parameters"] = json!({"max-bandwidth": 0, "multifd-channels": 2});
        on["destination_migration_parameters"] = json!({"multifd-channels": 2});
        on["multifd_capability"] = json!({"source": true, "destination": true});
        on["ram"]["multifd-bytes"] = json!(300_000_000u64);
        assert!(
            check_run(&m, Mode::Clear(MIB), &on).is_empty(),
            "{:?}",
            check_run(&m, Mode::Clear(MIB), &on)
        );
        let mut half = on.clone();
        half["multifd_capability"]["destination"] = json!(false);
        half["destination_migration_parameters"]["multifd-channels"] = json!(4);
        half["ram"]["multifd-bytes"] = json!(0);
        assert_eq!(check_run(&m, Mode::Clear(MIB), &half).len(), 3);

        // A postcopy run: the clear-mode checks (clears made), and it went through postcopy.
        let mut pc = good.clone();
        pc["postcopy_ram_capability"] = json!({"source": true, "destination": true});
        pc["migration_parameters"]["max-postcopy-bandwidth"] = json!(400 * MIB);
        pc["postcopy_started_after_ms"] = json!(700.0);
        pc["query_migrate_statuses"] = json!(["active", "postcopy-active", "completed"]);
        pc["ram"]["postcopy-requests"] = json!(3);
        let p = Mode::Postcopy(None);
        assert!(
            check_run(&o, p, &pc).is_empty(),
            "{:?}",
            check_run(&o, p, &pc)
        );
        let mut no_clears = pc.clone();
        no_clears["shim"]["source"]["kvm_clear_dirty_log_calls"] = json!(0);
        no_clears["query_migrate_statuses"] = json!(["active", "completed"]);
        let problems = check_run(&o, p, &no_clears);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("postcopy mode (clear), yet no KVM_CLEAR_DIRTY_LOG"));
        assert!(problems[1].contains("never reported postcopy-active"));
    }
}
