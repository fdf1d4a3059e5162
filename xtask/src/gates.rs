// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Steps of `cargo xtask test` beyond fmt, clippy and the tests: the library crates build with the
//! minimum supported Rust version, and the migration engine stands without our memory API.

use std::process::Command;

use crate::{cargo, cargo_stdout, run_step, workspace_root, StepResult};

/// The library crates the MSRV promise covers.
const LIBRARY_PACKAGES: [&str; 5] = [
    "clearlog-bitmap",
    "clearlog-memory",
    "clearlog-kvm",
    "clearlog-test-guest",
    "clearlog-migration",
];

/// Crates the engine must not pull in without its default features.
const NOT_IN_BARE_ENGINE: [&str; 2] = ["clearlog-memory", "vm-memory"];

/// The workspace's `rust-version` (`[workspace.package]` of the root `Cargo.toml`).
fn rust_version() -> Result<String, String> {
    let path = workspace_root().join("Cargo.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_rust_version(&text).ok_or_else(|| format!("no rust-version in {}", path.display()))
}

fn parse_rust_version(manifest: &str) -> Option<String> {
    manifest.lines().find_map(|l| {
        let value = l.trim().strip_prefix("rust-version")?.trim_start();
        let value = value.strip_prefix('=')?.trim();
        Some(value.trim_matches('"').to_string())
    })
}

fn toolchain_installed(version: &str) -> bool {
    Command::new("rustup")
        .args(["run", version, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cargo check` of the library crates (all features) with the toolchain of the workspace's
/// `rust-version`, installed with rustup (minimal profile) when missing. Without rustup or when
/// the install fails the step is SKIPPED, loudly, and passes. Its own target directory keeps the
/// old toolchain's artifacts apart from the main build's.
pub(crate) fn msrv_check() -> StepResult {
    let version = match rust_version() {
        Ok(v) => v,
        Err(note) => {
            return StepResult {
                name: "msrv".into(),
                ok: false,
                secs: 0.0,
                note,
            };
        }
    };
    let name = format!("check with Rust {version} (MSRV, library crates)");
    if !toolchain_installed(&version) {
        println!("\n==> xtask: rustup toolchain install {version} --profile minimal");
        let installed = Command::new("rustup")
            .args(["toolchain", "install", &version, "--profile", "minimal"])
            .status()
            .is_ok_and(|s| s.success());
        if !installed || !toolchain_installed(&version) {
            return StepResult::skipped(
                name,
                format!(
                    "Rust {version} is not installed and `rustup toolchain install {version}` failed: the MSRV is NOT checked"
                ),
            );
        }
    }
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace_root())
        .args(["run", &version, "cargo", "check", "--all-features"])
        .args(["--target-dir", "target/msrv"]);
    // The outer cargo's choices must not leak into the old toolchain's build.
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(var);
    }
    for p in LIBRARY_PACKAGES {
        cmd.args(["-p", p]);
    }
    run_step(&name, cmd)
}

/// The engine's own tests (unit and integration) without its default features: no
/// `clearlog-memory`, no vm-memory; `testing`'s plain memory stands in.
pub(crate) fn bare_engine_tests() -> StepResult {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "clearlog-migration", "--no-default-features"])
        .args(["--features", "testing", "--lib", "--tests"]);
    run_step(
        "cargo test -p clearlog-migration --no-default-features (no memory API)",
        cmd,
    )
}

/// `cargo tree -p clearlog-migration --no-default-features -e normal` names neither
/// clearlog-memory nor vm-memory: a VMM can drive the engine without our memory API.
pub(crate) fn bare_engine_deps() -> Result<(), String> {
    let stdout = cargo_stdout(
        "cargo tree",
        &[
            "tree",
            "-p",
            "clearlog-migration",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
        ],
    )?;
    let found = forbidden_in_tree(&String::from_utf8_lossy(&stdout));
    if found.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "clearlog-migration without default features depends on {}",
            found.join(", ")
        ))
    }
}

fn forbidden_in_tree(tree: &str) -> Vec<&'static str> {
    NOT_IN_BARE_ENGINE
        .into_iter()
        .filter(|name| {
            tree.lines()
                .any(|l| l.split_whitespace().next() == Some(*name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_workspace_rust_version() {
        let manifest = "[workspace.package]\nedition = \"2024\"\nrust-version = \"1.85\"\n";
        assert_eq!(parse_rust_version(manifest).as_deref(), Some("1.85"));
        assert_eq!(parse_rust_version("[package]\n"), None);
        assert_eq!(
            rust_version().unwrap(),
            parse_rust_version(include_str!("../../Cargo.toml")).unwrap()
        );
    }

    #[test]
    fn finds_the_memory_api_in_a_tree() {
        let bare = "clearlog-migration v0.1.0 (/w/migration)\nclearlog-bitmap v0.1.0\nlibc v0.2\n";
        assert!(forbidden_in_tree(bare).is_empty());
        let full = format!("{bare}clearlog-memory v0.1.0 (/w/memory-api)\nvm-memory v0.18.0\n");
        assert_eq!(forbidden_in_tree(&full), ["clearlog-memory", "vm-memory"]);
    }
}
