// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Project automation for the clearlog workspace.
//!
//! ```text
//! cargo xtask test            fmt, layering, structure, packaging, clippy -D warnings, aarch64 and MSRV
//!                             checks, all tests (real KVM), the engine's tests without the memory API
//! cargo xtask bench [CRATE]   criterion benchmarks (all, or one crate by directory or package name)
//!                   [--quick] short runs, for CI
//! cargo xtask deps            fail if a crate depends on a crate above it in the layering
//! cargo xtask structure       fail on an import circle between files or a function over 100 lines
//! cargo xtask msrv            cargo check of the library crates with the workspace's rust-version
//! cargo xtask faults [--count N] [--seed S] [--only I] [--no-retry]   cut one connection of N
//!                             migrations at every step (handshake, header, pages, end, ack,
//!                             confirm, verification, verdict) or fail a step of the source; the
//!                             source must survive and a retry from the same process must verify
//!                             (--no-retry: a self-check, the cases needing the retry must fail)
//! cargo xtask soak [--runs N] [--seed S]      N random migrations, each verified (increment rule,
//!                             RAM fingerprint, digest table); reports mismatched pages
//! cargo xtask snapshot-soak [--rounds N] [--seed S]   N random chains of live snapshots, each
//!                             restored eagerly and lazily and verified; losses made on purpose
//!                             must be refused
//! cargo xtask netns           two network namespaces, a shaped veth link; migrate, then cut the link
//! cargo xtask qemu-bench [--modes legacy,clear:1M,clear:16M,postcopy] [--runs N] [--out FILE] [--smoke]
//!                   [--qemu-root DIR | --install-qemu10 [DIR]] [--multifd N] [--bandwidth 0]
//!                             the same workload migrated by QEMU (the host's 7.2, or a Debian
//!                             tree's 10.0 under chroot), one JSON line per run for
//!                             `vmm bench --compare FILE`
//! cargo xtask fuzz [--seconds N]  each stream-decoder fuzz target for N s (default 30); SKIPPED without
//!                             nightly + cargo-fuzz
//! cargo xtask miri            the memory-model tests under Miri; SKIPPED without nightly + miri
//! ```
//!
//! `cargo xtask test` prints what ran, what was skipped and why, and exits non-zero on any failure.
//! With `CI=true` and `/dev/kvm` present it sets `CLEARLOG_REQUIRE_KVM=1`, which turns every real-KVM
//! test that cannot run into a failure instead of a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod faults;
mod fuzz;
mod gates;
mod harness;
mod judge;
mod layering;
mod loss;
mod miri;
mod netns;
mod proxy;
mod qemu;
mod snapshot_soak;
mod soak;
mod source_text;
mod structure;
/// The CLI's size, rate and duration parsing, this same file: one source for both.
#[allow(dead_code)]
#[path = "../../vmm-cli/src/units.rs"]
mod units;
mod unsafe_index;

/// Environment variable the real-KVM tests read: when set to 1, a test that cannot use `/dev/kvm`
/// fails instead of printing SKIPPED.
const REQUIRE_KVM_ENV: &str = "CLEARLOG_REQUIRE_KVM";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("deps") => deps(),
        Some("structure") => structure::structure(&workspace_root()),
        Some("msrv") => gates::msrv_check().into_result(),
        Some("unsafe-sites") => print_unsafe_sites(),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("miri") => miri::miri(&args[1..]),
        Some("faults") => faults::faults(&args[1..]),
        Some("soak") => soak::soak(&args[1..]),
        Some("snapshot-soak") => snapshot_soak::snapshot_soak(&args[1..]),
        Some("netns") => netns::netns(&args[1..]),
        Some("qemu-bench") => qemu::qemu_bench(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print_usage();
            return if args.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Some(other) => {
            eprintln!("xtask: unknown command `{other}`");
            print_usage();
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask: FAILED: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn print_usage() {
    eprintln!(
        "usage: cargo xtask <command>\n\n\
         commands:\n  \
         test             fmt check, layering and structure checks, clippy -D warnings, aarch64 and MSRV checks, cargo test --workspace (real KVM tests included), the engine's tests without the memory API\n  \
         bench [CRATE]    criterion benchmarks of all crates or one (bitmap, memory-api, kvm-accel/test-guest, migration); --quick for short runs\n  \
         deps             check that no crate depends on a crate above it in the layering (and the engine without default features on no memory API)\n  \
         structure        check that no files of a crate import each other in a circle and no function is over 100 lines\n  \
         msrv             cargo check of the library crates with the workspace's rust-version (installed with rustup; SKIPPED when it cannot be)\n  \
         faults           cut one connection of a migration at every step (--count N, default 50; --seed S; --only I; --no-retry): the source survives and a retry verifies\n  \
         soak             N random migrations (--runs N, default 200; --seed S), each verified; reports mismatched pages\n  \
         snapshot-soak    N random chains of live snapshots (--rounds N, default 50; --seed S), each restored eagerly and lazily and verified; some lose dirty bits on purpose and must be refused\n  \
         netns            migrate between two network namespaces over a shaped veth link, then take the link down mid-migration\n  \
         qemu-bench       migrate the same workload with QEMU (--modes legacy,clear:1M,clear:16M,postcopy --runs N --out FILE; --smoke: a short end-to-end check; --interleave-with-vmm MODES; --qemu-root DIR: a debootstrap tree's QEMU under chroot, --install-qemu10 [DIR] creates one; --multifd N; --bandwidth 0: no limit; --help for all)\n  \
         fuzz             run each migration stream-decoder fuzz target (--seconds N, default 30); SKIPPED without nightly + cargo-fuzz\n  \
         miri             the memory-model tests (bitmap release sequences, dirty-client store buffering) under Miri; SKIPPED without nightly + miri"
    );
}

/// `cargo xtask unsafe-sites`: every `unsafe` of the repository, `path item` per line.
fn print_unsafe_sites() -> Result<(), String> {
    for s in unsafe_index::sites(&workspace_root())? {
        println!("{} {}", s.path, s.item);
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// One step of a check run: its name, how long it took and whether it passed.
struct StepResult {
    name: String,
    ok: bool,
    secs: f64,
    note: String,
}

impl StepResult {
    /// A step that could not run here: printed loudly, and it passes.
    fn skipped(name: String, why: String) -> StepResult {
        let note = format!("SKIPPED: {why}");
        println!("\n==> xtask: {name}: {note}");
        StepResult {
            name,
            ok: true,
            secs: 0.0,
            note,
        }
    }

    fn into_result(self) -> Result<(), String> {
        if self.ok {
            Ok(())
        } else {
            Err(format!("{}: {}", self.name, self.note))
        }
    }
}

fn run_step(name: &str, mut cmd: Command) -> StepResult {
    println!("\n==> xtask: {name}: {cmd:?}");
    let start = Instant::now();
    let status = cmd.status();
    let secs = start.elapsed().as_secs_f64();
    let (ok, note) = match status {
        Ok(s) if s.success() => (true, String::new()),
        Ok(s) => (false, format!("exit status {s}")),
        Err(e) => (false, format!("could not start: {e}")),
    };
    StepResult {
        name: name.to_string(),
        ok,
        secs,
        note,
    }
}

/// What the real-KVM tests will do on this machine, and why.
fn kvm_status() -> (bool, String) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => (
            ci,
            if ci {
                "RUN: /dev/kvm is usable; CI=true so any KVM test that cannot run FAILS".to_string()
            } else {
                "RUN: /dev/kvm is usable".to_string()
            },
        ),
        Err(e) => {
            let present = Path::new("/dev/kvm").exists();
            (
                ci && present,
                format!(
                    "SKIPPED: /dev/kvm cannot be opened ({e}); real-KVM tests print SKIPPED and pass{}",
                    if ci && present { " -- but CI=true and the device exists, so they FAIL" } else { "" }
                ),
            )
        }
    }
}

fn test() -> Result<(), String> {
    let (require_kvm, kvm_note) = kvm_status();
    println!("xtask test: real-KVM tests: {kvm_note}");
    let mut results = Vec::new();

    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    results.push(run_step("fmt --check", fmt));

    println!("\n==> xtask: deps (layering check)");
    let start = Instant::now();
    let deps_result = deps();
    results.push(StepResult {
        name: "deps".into(),
        ok: deps_result.is_ok(),
        secs: start.elapsed().as_secs_f64(),
        note: deps_result.err().unwrap_or_default(),
    });

    println!("\n==> xtask: structure (import circles, long functions)");
    let start = Instant::now();
    let structure_result = structure::structure(&workspace_root());
    results.push(StepResult {
        name: "structure".into(),
        ok: structure_result.is_ok(),
        secs: start.elapsed().as_secs_f64(),
        note: structure_result.err().unwrap_or_default(),
    });

    // Each library crate must be publishable. Packaged together, cargo resolves their path
    // dependencies from each other (alone, a crate's dependency on an unpublished sibling cannot
    // be resolved against crates.io yet).
    let mut package = cargo();
    package.args(["package", "--no-verify", "--allow-dirty", "--quiet"]);
    for k in layering::LIBRARY_CRATES {
        package.args(["-p", k.package]);
    }
    results.push(run_step("package (library crates, publishable)", package));

    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]);
    results.push(run_step("clippy -D warnings", clippy));

    results.push(aarch64_check());
    results.push(gates::msrv_check());

    let mut tests = cargo();
    // All features: `clearlog-memory`'s `testing` kit and its conformance tests are tests too.
    tests.args(["test", "--workspace", "--all-features"]);
    if require_kvm {
        tests.env(REQUIRE_KVM_ENV, "1");
    }
    results.push(run_step(
        "cargo test --workspace --all-features (unit, integration, doc, real KVM)",
        tests,
    ));
    results.push(gates::bare_engine_tests());

    println!("\n==> xtask test summary");
    println!("  real-KVM tests: {kvm_note}");
    let mut failed = 0;
    for r in &results {
        println!(
            "  {:<4} {:<60} {:>7.1}s {}",
            if r.ok { "ok" } else { "FAIL" },
            r.name,
            r.secs,
            r.note
        );
        failed += usize::from(!r.ok);
    }
    let passed = results.len() - failed;
    println!("xtask: {passed} passed, {failed} failed");
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} step(s) failed"))
    }
}

/// The target of the cross-architecture check.
const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// `cargo check --target aarch64` of the arch-neutral library crates (the test guest is x86-64
/// code and is left out). Adds the target with rustup when missing; if that fails the step is
/// SKIPPED, loudly, and passes.
fn aarch64_check() -> StepResult {
    let name = format!("check --target {AARCH64} (bitmap, memory, kvm, migration)");
    let installed = || {
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.trim() == AARCH64)
            })
    };
    if !installed() {
        println!("\n==> xtask: rustup target add {AARCH64}");
        let added = Command::new("rustup")
            .args(["target", "add", AARCH64])
            .status()
            .is_ok_and(|s| s.success());
        if !added || !installed() {
            return StepResult::skipped(
                name,
                format!(
                    "the {AARCH64} target is not installed and `rustup target add {AARCH64}` failed: the aarch64 build of the library crates is NOT checked"
                ),
            );
        }
    }
    // `ring` (rustls, in clearlog-migration) compiles C and assembly for the target in its build
    // script: without a C cross compiler the check cannot run.
    let cross_cc = std::env::var_os("CC_aarch64_unknown_linux_gnu").is_some()
        || Command::new("aarch64-linux-gnu-gcc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !cross_cc {
        return StepResult::skipped(
            name,
            "no aarch64 C cross compiler (`apt-get install gcc-aarch64-linux-gnu`, or set CC_aarch64_unknown_linux_gnu), which ring's build script needs: the aarch64 build of the library crates is NOT checked".to_string(),
        );
    }
    let mut cmd = cargo();
    cmd.args(["check", "--target", AARCH64]);
    for p in [
        "clearlog-bitmap",
        "clearlog-memory",
        "clearlog-kvm",
        "clearlog-migration",
    ] {
        cmd.args(["-p", p]);
    }
    run_step(&name, cmd)
}

fn bench(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let crates: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let packages = if crates.is_empty() {
        layering::LIBRARY_CRATES
            .iter()
            .map(|c| c.package)
            .collect::<Vec<_>>()
    } else {
        let mut out = Vec::new();
        for c in crates {
            match layering::LIBRARY_CRATES
                .iter()
                .find(|k| k.dir == c || k.package == c)
            {
                Some(k) => out.push(k.package),
                None => {
                    return Err(format!(
                        "unknown crate `{c}`: use one of {}",
                        layering::LIBRARY_CRATES
                            .iter()
                            .map(|k| k.dir)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
        }
        out
    };
    let mut failed = Vec::new();
    for package in packages {
        let mut cmd = cargo();
        cmd.args(["bench", "-p", package]);
        if quick {
            cmd.args(["--", "--quick"]);
        }
        let r = run_step(&format!("bench {package}"), cmd);
        if !r.ok {
            failed.push(package);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("benchmarks failed: {}", failed.join(", ")))
    }
}

/// The standard output of `cargo ARGS` (`what` names it in errors), or why it failed.
fn cargo_stdout(what: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let output = cargo()
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn deps() -> Result<(), String> {
    let stdout = cargo_stdout(
        "cargo metadata",
        &["metadata", "--format-version", "1", "--no-deps"],
    )?;
    let metadata: serde_json::Value = serde_json::from_slice(&stdout)
        .map_err(|e| format!("cargo metadata output is not JSON: {e}"))?;
    let mut violations = layering::check(&metadata)?;
    violations.extend(gates::bare_engine_deps().err());
    if violations.is_empty() {
        println!("deps: layering holds (bitmap <- memory-api <- kvm-accel (<- test-guest), migration <- vmm-cli); the engine without default features has no memory API");
        Ok(())
    } else {
        for v in &violations {
            eprintln!("deps: {v}");
        }
        Err(format!("{} layering violation(s)", violations.len()))
    }
}
