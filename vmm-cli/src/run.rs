// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm run`: the source side.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clearlog_migration::{
    ram_fingerprint, CancelToken, MigrationConfig, MigrationStats, Progress, Source,
};
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Guest, GuestConfig};

use crate::args::{RunArgs, WorkloadKind};
use crate::chain::ErrorChain;
use crate::fault::{faulty_transport, Fault, FaultPlan, FaultyControl, FaultyMemory, Injector};
use crate::guest_view::{GuestView, LiveProbe};
use crate::outgoing::{connect_source, Outgoing};
use crate::output::{print_run_summary, print_stats, ring_json, stats_json};
use crate::setup::{
    builtin_workload, migration_config, validate_guest, validate_migration, validate_uri,
    vm_dirty_log,
};
use crate::{CliError, CliResult};

fn workload_spec(a: &RunArgs) -> CliResult<WorkloadSpec> {
    Ok(match a.workload {
        WorkloadKind::Random | WorkloadKind::Increment | WorkloadKind::Idle => {
            builtin_workload(a.workload, &a.guest)?
        }
        WorkloadKind::Image => {
            let path = a.image.as_ref().ok_or_else(|| {
                CliError::Usage("--workload image needs --image FILE and --load-addr ADDR".into())
            })?;
            let load = a.load_addr.ok_or_else(|| {
                CliError::Usage("--workload image needs --load-addr ADDR (e.g. 0x200000)".into())
            })?;
            let image = std::fs::read(path).map_err(|e| {
                CliError::Usage(format!("cannot read --image {}: {e}", path.display()))
            })?;
            WorkloadSpec::Image {
                image,
                load_gpa: load,
                entry_gpa: load,
            }
        }
    })
}

/// `vmm run`: check the flags, connect, boot the guest, let it warm up, (optionally) measure its
/// dirty rate, migrate (retrying with `--retry-to`), report.
pub fn run(a: RunArgs) -> CliResult {
    let plan = plan(&a)?;
    let booted = boot(&a, plan.spec)?;
    let (Some(config), Some(outgoing)) = (plan.config, plan.outgoing) else {
        print_run_summary(&booted.guest, booted.boot_ms, booted.warmup_rate, a.json);
        return Ok(());
    };
    let guest = &booted.guest;
    let written_before_migration = guest.pages_written().unwrap_or(0);
    let mut retries = Retries::default();
    let (stats, view) = match retries.migrate(&a, guest, config, outgoing) {
        Ok(done) => done,
        Err(e) => {
            if a.json && !a.retry_to.is_empty() {
                retries.errors.push(e.to_string());
                println!("{}", retries.failed_json());
            }
            return Err(e);
        }
    };
    // What the guest really wrote while it was being migrated (it is paused now): a migration is
    // only as good as the load it kept up with.
    let during = (a.retry_to.is_empty() && stats.total_time_ms > 0.0).then(|| {
        let written = guest.pages_written().unwrap_or(0);
        written.saturating_sub(written_before_migration) as f64 * 4096.0
            / (stats.total_time_ms / 1e3)
    });
    // The source stays paused after a successful migration: its RAM is the switchover state.
    let fingerprint = match a.ram_fingerprint {
        true => Some(format!(
            "{:016x}",
            ram_fingerprint(guest.memory(), 2)
                .map_err(|e| CliError::Failed(format!("fingerprinting RAM: {}", e.chain())))?
        )),
        false => None,
    };
    let done = Migrated {
        stats,
        view,
        rates: (booted.warmup_rate, during),
        fingerprint,
    };
    report(&a, guest, &done, &retries);
    Ok(())
}

/// What `vmm run` will do, checked before the guest boots.
struct Plan {
    config: Option<MigrationConfig>,
    spec: WorkloadSpec,
    outgoing: Option<Outgoing>,
}

/// Checks every flag (usage errors, exit 2) and connects to the destination: a wrong address
/// should fail before minutes of guest boot.
fn plan(a: &RunArgs) -> CliResult<Plan> {
    validate_guest(&a.guest, a.workload)?;
    // A malformed address is a usage error (exit 2), not an unreachable destination.
    let uris = a.migrate_to.iter().map(|u| ("--migrate-to", u));
    for (flag, uri) in uris.chain(a.retry_to.iter().map(|u| ("--retry-to", u))) {
        validate_uri(flag, uri)?;
    }
    let config = match &a.migrate_to {
        Some(_) => {
            validate_migration(&a.migration)?;
            let (m, d, c) = (&a.migration, a.dirty_log, a.clear_chunk);
            Some(migration_config(m, d, c, a.max_time)?)
        }
        None => None,
    };
    if let Some(d) = a.dirtyrate {
        crate::dirtyrate::validate(d, a.sample_pages, &a.migration)?;
    }
    let spec = workload_spec(a)?;
    let outgoing = match &a.migrate_to {
        Some(uri) => Some(connect_source(
            uri,
            a.io_timeout,
            a.migration.channels,
            &a.tls,
        )?),
        None => None,
    };
    Ok(Plan {
        config,
        spec,
        outgoing,
    })
}

/// A guest that booted and warmed up.
struct Booted {
    guest: Guest,
    boot_ms: f64,
    /// The write rate over the warm-up, bytes/s.
    warmup_rate: f64,
}

/// Boots the guest, lets it warm up, and (`--dirtyrate`) measures and prints its dirty rate.
fn boot(a: &RunArgs, spec: WorkloadSpec) -> CliResult<Booted> {
    let boot_start = Instant::now();
    let guest = Guest::boot(GuestConfig {
        mem_bytes: a.guest.mem,
        vcpus: a.guest.vcpus,
        dirty_log: vm_dirty_log(a.dirty_log, a.ring_size)?,
        workload: spec,
        ..GuestConfig::default()
    })
    .map_err(|e| CliError::Failed(format!("cannot start the guest: {}", e.chain())))?;
    let boot_ms = boot_start.elapsed().as_secs_f64() * 1e3;
    tracing::info!(mode = %guest.dirty_log_mode(), boot_ms, "guest running");
    let before = guest.pages_written().unwrap_or(0);
    let warm_start = Instant::now();
    std::thread::sleep(a.warmup);
    let written = guest.pages_written().unwrap_or(0) - before;
    let warmup_rate = written as f64 * 4096.0 / warm_start.elapsed().as_secs_f64();
    if let Some(d) = a.dirtyrate {
        let measured = crate::dirtyrate::measure(&guest, d, a.sample_pages)?;
        let initial = crate::dirtyrate::initial_bytes(&guest, a.guest.wss, a.workload);
        let model = crate::dirtyrate::saturating_over(a.workload, a.guest.wss);
        let v = crate::dirtyrate::verdict(&measured, initial, model, &a.migration)?;
        crate::dirtyrate::print(&measured, &v, initial, model, &a.migration, a.json);
    }
    Ok(Booted {
        guest,
        boot_ms,
        warmup_rate,
    })
}

/// Whether a failure came after a postcopy's commit (the source holds pages the destination's
/// running guest waits on).
fn stats_committed(e: &clearlog_migration::Error) -> bool {
    matches!(e, clearlog_migration::Error::Postcopy { .. })
}

/// The attempts of `--retry-to`: why each failed, and what the guest did after the first failure.
#[derive(Debug, Default)]
struct Retries {
    errors: Vec<String>,
    /// Pages the guest wrote in [`PROGRESS_PROBE`] after the first failure.
    progress_after_failure: Option<u64>,
    /// Whether dirty logging was still on right after the first failure (it must not be).
    logging_after_failure: Option<bool>,
}

impl Retries {
    /// Migrates to `--migrate-to`, then, while an attempt fails before its commit, proves the
    /// guest still runs and migrates again to the next `--retry-to` (the library resumed the
    /// guest and stopped logging).
    fn migrate(
        &mut self,
        a: &RunArgs,
        guest: &Guest,
        config: MigrationConfig,
        outgoing: Outgoing,
    ) -> CliResult<(MigrationStats, GuestView)> {
        let uri = a.migrate_to.clone().unwrap_or_default();
        let recover = a.postcopy_recover_timeout.map(|t| (t, a));
        let mut attempt = migrate(
            guest,
            config.clone(),
            outgoing,
            (&uri, recover),
            a.fail_at,
            a.fault,
        );
        for retry in &a.retry_to {
            match &attempt {
                // After the commit the guest belongs to the destination: no retry.
                Ok(_)
                | Err(
                    CliError::Usage(_)
                    | CliError::Mismatch(_)
                    | CliError::Committed(_)
                    | CliError::Postcopy(_),
                ) => break,
                Err(e) => self.errors.push(e.to_string()),
            }
            self.note_failure(guest, retry, a.workload);
            attempt = connect_source(retry, a.io_timeout, a.migration.channels, &a.tls)
                .and_then(|o| migrate(guest, config.clone(), o, (retry, None), None, None));
        }
        attempt
    }

    /// After a failed attempt: says so, and watches the guest for [`PROGRESS_PROBE`].
    fn note_failure(&mut self, guest: &Guest, retry: &str, workload: WorkloadKind) {
        self.logging_after_failure
            .get_or_insert(guest.memory().global_logging());
        eprintln!(
            "vmm: {}; retrying to {retry}",
            self.errors[self.errors.len() - 1]
        );
        let before = guest.pages_written().unwrap_or(0);
        std::thread::sleep(PROGRESS_PROBE);
        let progressed = guest.pages_written().unwrap_or(0).saturating_sub(before);
        self.progress_after_failure.get_or_insert(progressed);
        if progressed == 0 && workload != WorkloadKind::Idle {
            eprintln!(
                "vmm: warning: the guest wrote no page in {} ms after the failed migration",
                PROGRESS_PROBE.as_millis()
            );
        }
    }

    /// The JSON line of `--retry-to` when every attempt failed.
    fn failed_json(&self) -> serde_json::Value {
        serde_json::json!({
            "migrated": false,
            "first_error": self.errors.first(),
            "errors": self.errors,
            "progress_after_failure_pages": self.progress_after_failure,
            "logging_after_failure": self.logging_after_failure,
        })
    }

    /// The `--retry-to` fields of a successful migration's JSON.
    fn add_to(&self, v: &mut serde_json::Value, migrated_to: &str) {
        if let Some(map) = v.as_object_mut() {
            map.insert("migrated".into(), true.into());
            map.insert("migrated_to".into(), migrated_to.into());
            map.insert("attempts".into(), (self.errors.len() + 1).into());
            map.insert("first_error".into(), self.errors.first().cloned().into());
            map.insert("errors".into(), self.errors.clone().into());
            map.insert(
                "progress_after_failure_pages".into(),
                self.progress_after_failure.into(),
            );
            map.insert(
                "logging_after_failure".into(),
                self.logging_after_failure.into(),
            );
        }
    }

    /// The `--retry-to` lines of a successful migration's text report.
    fn print(&self, migrated_to: &str) {
        for (i, e) in self.errors.iter().enumerate() {
            println!("attempt {} failed: {e}", i + 1);
        }
        if let Some(p) = self.progress_after_failure {
            println!(
                "  the guest kept running: {p} page writes in {} ms after the failure",
                PROGRESS_PROBE.as_millis()
            );
        }
        println!(
            "attempt {} migrated to {migrated_to}",
            self.errors.len() + 1
        );
    }
}

/// A successful migration, with what the run measured around it.
struct Migrated {
    stats: MigrationStats,
    view: GuestView,
    /// The guest's write rate over the warm-up, and while it was migrated (bytes/s).
    rates: (f64, Option<f64>),
    fingerprint: Option<String>,
}

/// Prints a successful migration: one JSON object (`--json`) or the text report.
fn report(a: &RunArgs, guest: &Guest, done: &Migrated, retries: &Retries) {
    let retried = !a.retry_to.is_empty();
    // With `--retry-to`, say which attempt migrated and why the others failed.
    let migrated_to = match retries.errors.len() {
        0 => a.migrate_to.as_deref().unwrap_or_default(),
        n => a.retry_to[n - 1].as_str(),
    };
    let mode = guest.dirty_log_mode().to_string();
    let ring = ring_json(guest);
    if a.json {
        let fingerprint = done.fingerprint.as_deref();
        let mut v = stats_json(&done.stats, &mode, done.rates, fingerprint, ring.as_ref());
        if retried {
            retries.add_to(&mut v, migrated_to);
        }
        done.view.add_to(&mut v);
        println!("{v}");
        return;
    }
    if retried {
        retries.print(migrated_to);
    }
    let fingerprint = done.fingerprint.clone();
    print_stats(
        &done.stats,
        mode,
        done.rates,
        fingerprint,
        ring.as_ref(),
        false,
    );
    done.view.print();
}

/// How long `--retry-to` watches the guest after a failed migration, to prove it still runs.
const PROGRESS_PROBE: Duration = Duration::from_millis(300);

/// `--postcopy-recover-timeout`: a cut postcopy reconnects to `uri` with the run's settings.
fn with_recovery<'a, M: clearlog_migration::DirtyTracking + ?Sized>(
    s: Source<'a, M>,
    uri: &'a str,
    recover: Option<(Duration, &'a RunArgs)>,
) -> Source<'a, M> {
    let Some((timeout, a)) = recover else {
        return s;
    };
    s.with_postcopy_recovery(timeout, move || {
        match connect_source(uri, a.io_timeout, a.migration.channels, &a.tls) {
            Ok(Outgoing::Session(session)) => Ok(session),
            Ok(Outgoing::Stream(_)) => Err(clearlog_migration::Error::PostcopyNeedsSession),
            Err(e) => Err(clearlog_migration::Error::Handshake(e.to_string())),
        }
    })
}

/// Run one migration of `guest`, with a progress bar on a terminal.
pub fn migrate(
    guest: &Guest,
    config: MigrationConfig,
    outgoing: Outgoing,
    (uri, recover): (&str, Option<(Duration, &RunArgs)>),
    fail_at: Option<FaultPlan>,
    fault: Option<Fault>,
) -> CliResult<(MigrationStats, GuestView)> {
    config
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let cancel = CancelToken::new();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(guest.mem_bytes());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} iter {msg} [{elapsed_precise}] {wide_bar} {bytes} left",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut on_progress = |p: &Progress| {
        if let Some(bar) = &bar {
            bar.set_length(bar.length().unwrap_or(0).max(p.remaining_bytes));
            bar.set_position(bar.length().unwrap_or(0) - p.remaining_bytes);
            bar.set_message(format!(
                "{} | {:.0} MiB/s | expected downtime {:.0} ms{}",
                p.iteration,
                p.bandwidth_bytes_per_s as f64 / f64::from(1 << 20),
                p.expected_downtime_ms,
                if p.paused { " | paused" } else { "" }
            ));
        }
    };
    let control = LiveProbe::start(guest);
    let result = match (fail_at, fault) {
        (None, None) => Source::new(guest.memory(), config)
            .map(|s| with_recovery(s, uri, recover))
            .and_then(|s| outgoing.send(&s, &control, &mut on_progress, &cancel)),
        (plan, fault) => {
            let faults = Injector::new(plan, fault);
            let mut memory = FaultyMemory::new(guest.memory(), faults.clone());
            if let Some(Fault::HidePopulated(n)) = fault {
                memory.hide_populated_pages(n).map_err(|e| {
                    CliError::Failed(format!(
                        "--fault hide-populated: choosing the pages: {}",
                        e.chain()
                    ))
                })?;
            }
            let control = FaultyControl {
                inner: &control,
                faults: faults.clone(),
            };
            let outgoing = outgoing.map(|t| faulty_transport(t, &faults));
            Source::new(&memory, config)
                .map(|s| with_recovery(s, uri, recover))
                .and_then(|s| outgoing.send(&s, &control, &mut on_progress, &cancel))
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let view = control.view();
    result.map(|stats| (stats, view)).map_err(|e| match e {
        clearlog_migration::Error::VerificationFailed { .. } => {
            CliError::Mismatch(format!("migration to {uri}: {}", e.chain()))
        }
        clearlog_migration::Error::VerificationIncomplete(_) => CliError::Committed(format!(
            "migration to {uri} committed but {}; the source guest stays paused here",
            e.chain()
        )),
        clearlog_migration::Error::PostcopyNeedsSession => {
            CliError::Usage(format!("--postcopy with {uri}: {e}"))
        }
        e if stats_committed(&e) => CliError::Postcopy(format!(
            "postcopy to {uri} failed after the commit: {}; the source guest stays paused here \
             with its memory, the destination's guest waits on the pages it lacks",
            e.chain()
        )),
        e => CliError::Failed(format!(
            "migration to {uri} failed: {}; the guest keeps running here",
            e.chain()
        )),
    })
}
