// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm`: the thin CLI of the clearlog workspace. It assembles the library crates (a KVM guest from
//! `clearlog-kvm`, migration from `clearlog-migration`) and prints what they measure.
//!
//! Exit codes: 0 success; 1 a migration (or the guest) failed, or committed without finishing
//! its verification; 2 a usage error; 3 the verification found pages of the destination that
//! differ from the source's final memory (on both sides); 4 a postcopy failed after its commit:
//! the destination's guest waits on pages only the source holds, and the source keeps the guest
//! paused with its memory (on both sides).

#![forbid(unsafe_code)]

mod args;
mod bench;
mod bench_run;
mod bench_scenario;
mod bench_tls;
mod caps;
mod chain;
mod compare;
mod dirtyrate;
mod fault;
mod guest_view;
mod incoming;
mod ladder;
mod outgoing;
mod output;
mod plot;
mod qemu_image;
mod restore;
mod run;
mod setup;
mod snapshot;
mod units;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

/// A failure and the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// The user asked for something impossible (exit 2).
    Usage(String),
    /// A migration failed or did not verify, or the guest failed (exit 1).
    Failed(String),
    /// The verification found pages of the destination that differ from the source's final
    /// memory (exit 3, on both sides).
    Mismatch(String),
    /// The migration committed (the guest belongs to the destination) but did not finish its
    /// verification (exit 1; never retried).
    Committed(String),
    /// A postcopy failed after its commit: the destination's guest waits on missing pages, the
    /// source holds them with its guest paused (exit 4, on both sides).
    Postcopy(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_code_number() as u8)
    }

    /// The exit code, as `std::process::exit` takes it.
    fn exit_code_number(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) | CliError::Committed(_) => 1,
            CliError::Mismatch(_) => 3,
            CliError::Postcopy(_) => 4,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m)
            | CliError::Failed(m)
            | CliError::Mismatch(m)
            | CliError::Committed(m)
            | CliError::Postcopy(m) => f.write_str(m),
        }
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

fn init_tracing(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log.as_deref());
    let result = match cli.command {
        Command::Caps { json } => caps::caps(json),
        Command::Incoming(a) => incoming::incoming(a),
        Command::Run(a) => run::run(a),
        Command::Snapshot(a) => snapshot::snapshot(a),
        Command::Bench(a) => bench::bench(a),
        Command::Dirtyrate(a) => dirtyrate::dirtyrate(a),
        Command::Ladder(a) => ladder::ladder(a),
        Command::QemuImage(a) => qemu_image::qemu_image(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            e.exit_code()
        }
    }
}
