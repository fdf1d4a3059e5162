// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm incoming --from file:PATH` of a snapshot chain: eager, or `--lazy`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clearlog_migration::snapshot::{
    restore as restore_eager, LazyRestore, RestoreStats, SnapshotChain, SnapshotError,
    SNAPSHOT_MAGIC,
};
use clearlog_migration::{BoxError, MigrationUri, StateBlob, VmRestore};
use clearlog_test_guest::workload::check::{check_increment, loaded_workload};
use clearlog_test_guest::workload::WorkloadKind;
use clearlog_test_guest::{Guest, GuestConfig, RAM_BLOCK_NAME};
use vmm_cli::vm_control::GuestControl;

use crate::args::IncomingArgs;
use crate::chain::ErrorChain;
use crate::{CliError, CliResult};

/// The snapshot `--from` names, if it is one (a file starting with the snapshot magic).
pub fn snapshot_from(a: &IncomingArgs) -> Option<PathBuf> {
    let Ok(MigrationUri::File(path)) = a.from.as_deref()?.parse::<MigrationUri>() else {
        return None;
    };
    let mut magic = [0u8; 8];
    let mut f = std::fs::File::open(&path).ok()?;
    f.read_exact(&mut magic).ok()?;
    (magic == SNAPSHOT_MAGIC).then_some(path)
}

/// The restored guest seen by the restore: an eagerly restored increment guest is checked
/// before it resumes.
struct Control<'a> {
    guest: &'a Guest,
    check_before_resume: bool,
    extra: Mutex<serde_json::Map<String, serde_json::Value>>,
}

impl Control<'_> {
    fn note(&self, key: &str, value: serde_json::Value) {
        self.extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.into(), value);
    }
}

impl VmRestore for Control<'_> {
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        GuestControl(self.guest).restore_state(blobs)
    }

    fn resume(&self) -> Result<(), BoxError> {
        if self.check_before_resume {
            check_rule(self.guest, |k, v| self.note(k, v))?;
        }
        GuestControl(self.guest).resume()
    }
}

/// The increment rule on the guest's memory, if it runs the increment workload.
fn check_rule(
    guest: &Guest,
    mut note: impl FnMut(&str, serde_json::Value),
) -> Result<(), BoxError> {
    let workload = loaded_workload(guest.ram()).ok().flatten();
    if workload != Some(WorkloadKind::Increment) {
        return Ok(());
    }
    let check = check_increment(guest.ram())?;
    note("increment_consistent", check.is_consistent().into());
    note("increment_bad_pages", check.bad_count.into());
    if !check.is_consistent() {
        return Err(format!(
            "the restored memory breaks the increment rule ({} bad pages: lost writes)",
            check.bad_count
        )
        .into());
    }
    Ok(())
}

/// Restore the chain ending at `path` and run the guest for `--run-after`.
pub fn restore(a: &IncomingArgs, path: &Path) -> CliResult {
    let start = Instant::now();
    let chain = SnapshotChain::open(path).map_err(|e| refused(path, &e))?;
    let open_ms = ms(start);
    let layout: Vec<(String, u64)> = chain
        .blocks()
        .iter()
        .map(|b| (b.name.clone(), b.size))
        .collect();
    let guest = guest_for_layout(&layout)?;
    let files = chain.len();
    let control = Control {
        guest: &guest,
        check_before_resume: !a.lazy,
        extra: Mutex::new(serde_json::Map::new()),
    };
    let restored = if a.lazy {
        lazy(chain, &guest, &control, start)
    } else {
        restore_eager(&chain, guest.memory().as_ref(), &control).map_err(|e| refused(path, &e))
    };
    let stats = restored?;
    let mut extra = control
        .extra
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    if a.lazy {
        // Every page is in place now: the rule holds on the memory as the guest runs it.
        guest
            .pause()
            .map_err(|e| CliError::Failed(format!("pausing to check: {}", e.chain())))?;
        let rule = check_rule(&guest, |k, v| {
            extra.insert(k.into(), v);
        });
        guest
            .resume()
            .map_err(|e| CliError::Failed(format!("resuming: {}", e.chain())))?;
        rule.map_err(|e| CliError::Mismatch(format!("restoring {}: {e}", path.display())))?;
    }
    extra.insert("restored".into(), path.display().to_string().into());
    extra.insert("files".into(), files.into());
    extra.insert("lazy".into(), a.lazy.into());
    extra.insert("chain_open_ms".into(), open_ms.into());
    extra.insert(
        "restore".into(),
        serde_json::to_value(&stats).unwrap_or_default(),
    );
    run_after(a, &guest, &stats, extra)
}

/// Start the lazy restore; wait until every page is in place.
fn lazy(
    chain: SnapshotChain,
    guest: &Guest,
    control: &Control<'_>,
    start: Instant,
) -> CliResult<RestoreStats> {
    let path = chain
        .paths()
        .last()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let lazy = LazyRestore::start(chain, guest.memory().as_ref(), control)
        .map_err(|e| refused(&path, &e))?;
    control.note("running_ms", ms(start).into());
    tracing::info!(
        running_ms = lazy.running_ms(),
        "lazily restored guest running"
    );
    lazy.wait().map_err(|e| {
        let text = format!(
            "restoring {} lazily: {}; the guest waited on the pages not placed and was stopped",
            path.display(),
            e.chain()
        );
        let e = match e.is_mismatch() {
            true => CliError::Mismatch(text),
            false => CliError::Failed(text),
        };
        // Its vCPUs wait for good on pages that will never come: the guest cannot be shut
        // down in order, so the process ends here, taking the guest with it.
        eprintln!("vmm: error: {e}");
        std::process::exit(e.exit_code_number())
    })
}

/// The destination guest for a RAM layout of `(name, size)` blocks (this VMM's one block), to
/// receive a migration or restore a snapshot; its vCPUs come from the saved state.
pub fn guest_for_layout(blocks: &[(String, u64)]) -> CliResult<Guest> {
    let [(name, size)] = blocks else {
        let n = blocks.len();
        let why = format!("{n} blocks, this VMM has one (`{RAM_BLOCK_NAME}`)");
        return Err(CliError::Failed(format!(
            "unexpected RAM layout: {why}; no guest was resumed"
        )));
    };
    if name != RAM_BLOCK_NAME {
        let why = format!("block `{name}`, expected `{RAM_BLOCK_NAME}`");
        return Err(CliError::Failed(format!(
            "unexpected RAM layout: {why}; no guest was resumed"
        )));
    }
    Guest::create(GuestConfig {
        mem_bytes: *size,
        vcpus: 0,
        ..GuestConfig::default()
    })
    .map_err(|e| {
        CliError::Failed(format!(
            "cannot create the destination guest: {}; no guest was resumed",
            e.chain()
        ))
    })
}

/// A restore that stopped before the guest resumed.
fn refused(path: &Path, e: &SnapshotError) -> CliError {
    // An error about one file of the chain names it already.
    let text = match e {
        SnapshotError::File { .. } => format!("restoring: {}; no guest was resumed", e.chain()),
        _ => format!(
            "restoring {}: {}; no guest was resumed",
            path.display(),
            e.chain()
        ),
    };
    match e.is_mismatch() {
        true => CliError::Mismatch(text),
        false => CliError::Failed(text),
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Let the guest run for `--run-after`, report, and fail if it failed or made no progress.
fn run_after(
    a: &IncomingArgs,
    guest: &Guest,
    stats: &RestoreStats,
    mut extra: serde_json::Map<String, serde_json::Value>,
) -> CliResult {
    let before = guest.pages_written().unwrap_or(0);
    std::thread::sleep(a.run_after);
    let written = guest.pages_written().unwrap_or(0).saturating_sub(before);
    let failures = guest.vcpu_failures();
    extra.insert("pages_written_after_resume".into(), written.into());
    extra.insert("guest_ran_after_resume".into(), failures.is_empty().into());
    if a.json {
        println!("{}", serde_json::Value::Object(extra));
    } else {
        let running = extra
            .get("running_ms")
            .and_then(|v| v.as_f64())
            .unwrap_or(stats.running_ms);
        println!(
            "snapshot restored ({}, {} files), verified: {} pages checked against the pause's digests",
            if a.lazy { "lazy" } else { "eager" },
            stats.files,
            stats.verified_pages
        );
        println!("  guest running after {running:.1} ms");
        if a.lazy {
            println!(
                "  every page in place after {:.0} ms; {} faults served (max wait {:.2} ms)",
                stats.complete_ms, stats.faults, stats.fault_max_ms
            );
        } else {
            println!(
                "  load {:.0} ms, verify {:.0} ms",
                stats.load_ms, stats.verify_ms
            );
        }
        println!(
            "  {written} pages written by the guest in the {} after",
            crate::units::fmt_duration(a.run_after)
        );
    }
    check_ran(guest, &failures, written > 0, a.run_after, "restored")
}

/// After `run_after` of running (`progressed`: its count of pages written moved): fail if a
/// vCPU failed, or if a workload that writes made no progress. `which`: "resumed", "restored".
pub(crate) fn check_ran(
    guest: &Guest,
    failures: &[(u32, String)],
    progressed: bool,
    run_after: Duration,
    which: &str,
) -> CliResult {
    if !failures.is_empty() {
        return Err(CliError::Failed(format!(
            "the {which} guest failed: {failures:?}"
        )));
    }
    let workload = loaded_workload(guest.ram()).ok().flatten();
    if workload.is_some_and(|w| w != WorkloadKind::Idle)
        && run_after >= Duration::from_millis(100)
        && !progressed
    {
        return Err(CliError::Failed(format!(
            "the {which} guest makes no progress"
        )));
    }
    Ok(())
}
