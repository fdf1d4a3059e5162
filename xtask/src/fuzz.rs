// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask fuzz [--seconds N]`: a short libFuzzer run of each fuzz target of `migration/fuzz`
//! (cargo-fuzz), for CI: the stream decoder (`destination`, `stream_reader`), the session's
//! fixed-size messages (`session_wire`) and a destination accepting arbitrary connections
//! (`session_accept`).
//!
//! Needs a nightly toolchain (rustup) and `cargo-fuzz`; without either it prints a loud SKIPPED with the
//! reason and succeeds. With both present, a build failure or any crash, leak, timeout (10 s per input)
//! or out-of-memory is a failure. Each target runs in one process, for N seconds (default 30), from a
//! scratch copy of its seed corpus (`migration/fuzz/corpus/<target>`, left untouched), with the same
//! limits as a manual run:
//!
//! ```text
//! cargo +nightly fuzz run <target> <scratch> corpus/<target> -- -max_total_time=N -timeout=10 \
//!     -rss_limit_mb=1024 -malloc_limit_mb=65 -print_final_stats=1
//! ```
//!
//! `-malloc_limit_mb=65` backs up the targets' own allocator check: no single allocation may exceed
//! `MAX_STATE_BLOB_BYTES` (64 MiB), the bound the migration crate documents for a stream field.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{run_step, workspace_root};

/// The cargo-fuzz targets of `migration/fuzz`.
const TARGETS: &[&str] = &[
    "destination",
    "stream_reader",
    "session_wire",
    "session_accept",
];

/// Default run time per target, seconds.
const DEFAULT_SECONDS: u64 = 30;

/// libFuzzer flags shared by every run (the time limit is added per run).
const LIBFUZZER_FLAGS: &[&str] = &[
    "-timeout=10",
    "-rss_limit_mb=1024",
    "-malloc_limit_mb=65",
    "-print_final_stats=1",
];

/// `rustup run nightly <args>`, with the variables cargo set for xtask itself removed (they point at
/// the stable toolchain).
pub(crate) fn nightly(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly"]).args(args);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Why fuzzing cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let quiet = |mut cmd: Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !quiet(nightly(&["rustc", "--version"])) {
        return Some(
            "no nightly toolchain (`rustup run nightly rustc --version` failed; install with \
             `rustup toolchain install nightly`)"
                .into(),
        );
    }
    if !quiet(nightly(&["cargo", "fuzz", "--version"])) {
        return Some("cargo-fuzz is not installed (`cargo install --locked cargo-fuzz`)".into());
    }
    None
}

fn parse_seconds(args: &[String]) -> Result<u64, String> {
    let mut seconds = DEFAULT_SECONDS;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = match a.as_str() {
            "--seconds" => it.next().ok_or("--seconds needs a value")?.as_str(),
            other => match other.strip_prefix("--seconds=") {
                Some(v) => v,
                None => return Err(format!("fuzz: unknown argument `{other}`")),
            },
        };
        seconds = value
            .parse()
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| format!("--seconds: `{value}` is not a positive integer"))?;
    }
    Ok(seconds)
}

/// Copy the seed files of `seeds` into an empty `scratch` directory.
fn fresh_corpus(seeds: &Path, scratch: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let entries = std::fs::read_dir(seeds).map_err(|e| format!("{}: {e}", seeds.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", seeds.display()))?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), scratch.join(entry.file_name()))
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

pub fn fuzz(args: &[String]) -> Result<(), String> {
    let seconds = parse_seconds(args)?;
    let dir = workspace_root().join("migration/fuzz");
    if let Some(reason) = missing_prerequisite() {
        println!("\n**********************************************************************");
        println!("xtask fuzz: SKIPPED: {reason}");
        println!("  the fuzz targets in migration/fuzz did NOT run");
        println!("**********************************************************************");
        return Ok(());
    }
    let start = Instant::now();
    let mut build = nightly(&["cargo", "fuzz", "build"]);
    build.current_dir(&dir);
    let r = run_step("fuzz build (cargo +nightly fuzz build)", build);
    if !r.ok {
        return Err(format!("cargo fuzz build failed: {}", r.note));
    }
    let mut failed = Vec::new();
    for target in TARGETS {
        let scratch = dir.join("target/xtask-corpus").join(target);
        fresh_corpus(&dir.join("corpus").join(target), &scratch)?;
        let max_time = format!("-max_total_time={seconds}");
        let mut cmd = nightly(&["cargo", "fuzz", "run", target]);
        cmd.current_dir(&dir)
            .arg(&scratch)
            .arg(Path::new("corpus").join(target))
            .arg("--")
            .arg(&max_time)
            .args(LIBFUZZER_FLAGS);
        let r = run_step(&format!("fuzz {target} ({seconds} s)"), cmd);
        if !r.ok {
            failed.push(format!(
                "{target} ({}; reproducer in migration/fuzz/artifacts/{target}/)",
                r.note
            ));
        }
    }
    println!(
        "\nxtask fuzz: {} target(s), {seconds} s each, {:.0} s in total: {}",
        TARGETS.len(),
        start.elapsed().as_secs_f64(),
        if failed.is_empty() {
            "no crash"
        } else {
            "FAILED"
        }
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz target(s) failed: {}", failed.join(", ")))
    }
}
