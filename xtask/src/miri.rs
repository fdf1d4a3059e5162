// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask miri`: the memory-model tests under Miri, whose data-race detector follows C++20's
//! release sequences and whose weak-memory emulation produces outcomes that x86 hardware never
//! shows (a store buffered past a later load). Natively the same tests run as plain concurrency
//! tests in `cargo xtask test`.
//!
//! Needs a nightly toolchain with the `miri` component; without it: a loud SKIPPED, success.

use std::process::Stdio;
use std::time::Instant;

use crate::fuzz::nightly;
use crate::{run_step, workspace_root};

/// `(what, cargo miri test arguments)`.
const TESTS: &[(&str, &[&str])] = &[
    (
        "clearlog-bitmap memory_model (release sequences)",
        &["-p", "clearlog-bitmap", "--test", "memory_model"],
    ),
    (
        "clearlog-memory dirty client on vs host write (store buffering)",
        &[
            "-p",
            "clearlog-memory",
            "--lib",
            "--",
            "dirty::tests::turning_a_client_on_and_a_host_write_never_both_miss",
        ],
    ),
];

pub fn miri(args: &[String]) -> Result<(), String> {
    if let Some(a) = args.first() {
        return Err(format!("miri: unknown argument `{a}`"));
    }
    let has_miri = nightly(&["cargo", "miri", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_miri {
        println!("\n**********************************************************************");
        println!(
            "xtask miri: SKIPPED: no nightly toolchain with Miri (`rustup +nightly component add miri`)"
        );
        println!("  the memory-model tests did NOT run under Miri");
        println!("**********************************************************************");
        return Ok(());
    }
    let start = Instant::now();
    let mut failed = Vec::new();
    for (what, test_args) in TESTS {
        let mut cmd = nightly(&["cargo", "miri", "test"]);
        cmd.current_dir(workspace_root()).args(*test_args);
        let r = run_step(&format!("miri: {what}"), cmd);
        if !r.ok {
            failed.push(what.to_string());
        }
    }
    println!(
        "\nxtask miri: {} test set(s) in {:.0} s: {}",
        TESTS.len(),
        start.elapsed().as_secs_f64(),
        if failed.is_empty() { "ok" } else { "FAILED" }
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("under Miri: {}", failed.join(", ")))
    }
}
