// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm run`: the source side.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clearlog_kvm::KvmDirtyLogMode;
use clearlog_migration::{
    ram_fingerprint, CancelToken, ConnectOptions, MigrationConfig, MigrationDirtyLogMode,
    MigrationStats, MigrationUri, Progress, Source, Transport,
};
use clearlog_test_guest::layout::{
    mapped_end, DEFAULT_WSS_START, IDENTITY_MAP_LIMIT, MAX_RAM, MAX_VCPUS,
};
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Guest, GuestConfig};

use crate::args::{
    DirtyLogArg, GuestArgs, MigrationArgs, RunArgs, WorkloadKind, DEFAULT_DIRTY_RATE,
};
use crate::fault::{faulty_transport, Fault, FaultPlan, FaultyControl, FaultyMemory, Injector};
use crate::output::{print_run_summary, print_stats, ring_json, stats_json};
use crate::{CliError, CliResult};
use std::sync::Mutex;

use clearlog_migration::{BoxError, StateBlob, VmControl};
use clearlog_test_guest::workload::check::loaded_workload;
use clearlog_test_guest::workload::monitor::{achieved_rate, ticks_to_ms, WriteMark};
use clearlog_test_guest::workload::{reset_stall, WorkloadKind as GuestWorkload};
use vmm_cli::vm_control::GuestControl;

/// Check a guest shape; every message says what is wrong and what to do.
pub fn validate_guest(g: &GuestArgs, workload: WorkloadKind) -> CliResult {
    let usage = |m: String| Err(CliError::Usage(m));
    if g.mem == 0 || g.mem % (2 << 20) != 0 {
        return usage(format!(
            "--mem {} is not a multiple of 2M: use e.g. --mem 256M or --mem 4G",
            g.mem
        ));
    }
    if g.mem > MAX_RAM {
        return usage(format!(
            "--mem {} is larger than the {} GiB this guest layout supports",
            g.mem,
            MAX_RAM >> 30
        ));
    }
    if matches!(workload, WorkloadKind::Random | WorkloadKind::Increment) {
        if g.wss == 0 || g.wss % 4096 != 0 {
            return usage(format!(
                "--wss {} is not a positive multiple of the 4K page size",
                g.wss
            ));
        }
        // The guest reaches only the RAM its identity map covers (the first 127 GiB).
        let room = mapped_end(g.mem).saturating_sub(DEFAULT_WSS_START);
        if g.wss > room {
            return usage(format!(
                "--wss {} does not fit: the working set starts at 1M{}, so with --mem {} it can be at most {} bytes",
                g.wss,
                if g.mem > IDENTITY_MAP_LIMIT {
                    format!(" and must lie in the first {} GiB the guest maps", IDENTITY_MAP_LIMIT >> 30)
                } else {
                    String::new()
                },
                g.mem,
                room
            ));
        }
        if g.dirty_rate == Some(0) {
            return usage("--dirty-rate must be positive (e.g. 288M)".into());
        }
        if g.wss / 4096 < u64::from(g.vcpus) {
            return usage(format!(
                "--wss {} has fewer pages than --vcpus {}: each vCPU needs a part of its own",
                g.wss, g.vcpus
            ));
        }
    }
    if g.vcpus == 0 || g.vcpus > MAX_VCPUS {
        return usage(format!(
            "--vcpus {} is out of range: give 1 to {MAX_VCPUS}",
            g.vcpus
        ));
    }
    Ok(())
}

/// Check migration settings.
pub fn validate_migration(m: &MigrationArgs) -> CliResult {
    if m.switchover_bandwidth == Some(0) {
        return Err(CliError::Usage(
            "--switchover-bandwidth must be positive (leave it out to use the measured bandwidth)"
                .into(),
        ));
    }
    if m.bandwidth == 0 {
        return Err(CliError::Usage(
            "--bandwidth must be positive (e.g. 400M for 400 MiB/s)".into(),
        ));
    }
    if m.downtime.is_zero() {
        return Err(CliError::Usage(
            "--downtime must be positive (e.g. 100ms)".into(),
        ));
    }
    Ok(())
}

/// The migration config for a dirty-log mode and clear chunk.
pub fn migration_config(
    m: &MigrationArgs,
    dirty_log: DirtyLogArg,
    clear_chunk: u64,
    max_time: Duration,
) -> CliResult<MigrationConfig> {
    let mode = match dirty_log {
        DirtyLogArg::Legacy => MigrationDirtyLogMode::Legacy,
        // The ring hands its bits over at each sync, like a legacy GET: nothing to clear.
        DirtyLogArg::Ring => MigrationDirtyLogMode::Ring,
        DirtyLogArg::Clear => MigrationDirtyLogMode::from_clear_chunk_bytes(clear_chunk).map_err(|e| {
            CliError::Usage(format!(
                "--clear-chunk {clear_chunk}: {e} (a power of two from 256K = 64 pages, shift 6, to 8T = shift 31)"
            ))
        })?,
    };
    let config = MigrationConfig::default()
        .with_mode(mode)
        .with_bandwidth_limit_bytes_per_s(m.bandwidth)
        .with_downtime_limit(m.downtime)
        .with_switchover_bandwidth_bytes_per_s(m.switchover_bandwidth.unwrap_or(0))
        .with_mid_pass_sync(m.mid_pass_sync.0)
        .with_max_time(Some(max_time));
    config
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(config)
}

/// The VM's dirty-log mode for a migration mode: `legacy` really uses KVM's legacy get-and-clear
/// (the seed's baseline), `clear` uses manual protection with INITIALLY_SET.
pub fn vm_dirty_log(dirty_log: DirtyLogArg, ring_size: u64) -> CliResult<Option<KvmDirtyLogMode>> {
    Ok(match dirty_log {
        DirtyLogArg::Legacy => Some(KvmDirtyLogMode::Legacy),
        DirtyLogArg::Clear => None,
        DirtyLogArg::Ring => Some(KvmDirtyLogMode::Ring {
            bytes: check_ring_size(ring_size)?,
        }),
    })
}

/// `--ring-size` against this host's range (usage errors list it), and a host without the ring.
pub fn check_ring_size(bytes: u64) -> CliResult<u32> {
    let caps = clearlog_kvm::KvmCaps::probe_device(clearlog_kvm::KVM_DEVICE.as_ref())
        .map_err(|e| CliError::Failed(format!("--dirty-log ring: {e}")))?;
    let range = clearlog_kvm::RingRange::of(&caps).ok_or_else(|| {
        CliError::Usage(format!(
            "--dirty-log ring: {}",
            clearlog_kvm::Error::DirtyRingUnsupported
        ))
    })?;
    let bad = || {
        CliError::Usage(format!(
            "--ring-size {bytes}: {}",
            clearlog_kvm::Error::DirtyRingSize {
                bytes,
                min: range.min,
                max: range.max
            }
        ))
    };
    let b = u32::try_from(bytes).map_err(|_| bad())?;
    range.check(b).map_err(|_| bad())?;
    Ok(b)
}

/// The spec of a built-in workload (not `image`) for a guest shape.
pub fn builtin_workload(kind: WorkloadKind, g: &GuestArgs) -> CliResult<WorkloadSpec> {
    Ok(match kind {
        WorkloadKind::Random => WorkloadSpec::Random {
            wss_bytes: g.wss,
            dirty_rate_bytes_per_s: g.dirty_rate.unwrap_or(DEFAULT_DIRTY_RATE),
            seed: std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15,
        },
        WorkloadKind::Increment => WorkloadSpec::Increment {
            wss_bytes: g.wss,
            // `increment` sweeps as fast as it can unless a rate is given.
            dirty_rate_bytes_per_s: g.dirty_rate.unwrap_or(0),
        },
        WorkloadKind::Idle => WorkloadSpec::Idle,
        WorkloadKind::Image => {
            return Err(CliError::Usage(
                "--workload image needs --image FILE and --load-addr ADDR".into(),
            ))
        }
    })
}

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

/// `vmm run`.
pub fn run(a: RunArgs) -> CliResult {
    validate_guest(&a.guest, a.workload)?;
    // A malformed address is a usage error (exit 2), not an unreachable destination.
    for (flag, uri) in a
        .migrate_to
        .iter()
        .map(|u| ("--migrate-to", u))
        .chain(a.retry_to.iter().map(|u| ("--retry-to", u)))
    {
        validate_uri(flag, uri)?;
    }
    let config = match &a.migrate_to {
        Some(_) => {
            validate_migration(&a.migration)?;
            Some(migration_config(
                &a.migration,
                a.dirty_log,
                a.clear_chunk,
                a.max_time,
            )?)
        }
        None => None,
    };
    if let Some(d) = a.dirtyrate {
        crate::dirtyrate::validate(d, a.sample_pages, &a.migration)?;
    }
    let spec = workload_spec(&a)?;
    // Connect first: a wrong address should fail before minutes of guest boot.
    let transport = match &a.migrate_to {
        Some(uri) => Some(connect_source(uri, a.io_timeout)?),
        None => None,
    };

    let boot_start = Instant::now();
    let guest = Guest::boot(GuestConfig {
        mem_bytes: a.guest.mem,
        vcpus: a.guest.vcpus,
        dirty_log: vm_dirty_log(a.dirty_log, a.ring_size)?,
        workload: spec,
        ..GuestConfig::default()
    })
    .map_err(|e| CliError::Failed(format!("cannot start the guest: {e}")))?;
    let boot_ms = boot_start.elapsed().as_secs_f64() * 1e3;
    tracing::info!(mode = %guest.dirty_log_mode(), boot_ms, "guest running");

    let before = guest.pages_written().unwrap_or(0);
    let warm_start = Instant::now();
    std::thread::sleep(a.warmup);
    let written = guest.pages_written().unwrap_or(0) - before;
    let rate = written as f64 * 4096.0 / warm_start.elapsed().as_secs_f64();
    if let Some(d) = a.dirtyrate {
        let measured = crate::dirtyrate::measure(&guest, d, a.sample_pages)?;
        let initial = crate::dirtyrate::initial_bytes(&guest, a.guest.wss, a.workload);
        let model = crate::dirtyrate::saturating_over(a.workload, a.guest.wss);
        let v = crate::dirtyrate::verdict(&measured, initial, model, &a.migration)?;
        crate::dirtyrate::print(&measured, &v, initial, model, &a.migration, a.json);
    }

    let (Some(config), Some(transport)) = (config, transport) else {
        print_run_summary(&guest, boot_ms, rate, a.json);
        return Ok(());
    };
    let uri = a.migrate_to.clone().unwrap_or_default();
    let written_before_migration = guest.pages_written().unwrap_or(0);
    let mut attempt = migrate(&guest, config.clone(), transport, &uri, a.fail_at, a.fault);
    // `--retry-to`: the library resumed the guest and stopped logging; prove the guest still runs,
    // then migrate again from this same process.
    let mut errors: Vec<String> = Vec::new();
    let mut progress_after_failure: Option<u64> = None;
    // Whether dirty logging was still on right after the first failure (it must not be).
    let mut logging_after_failure: Option<bool> = None;
    for retry in &a.retry_to {
        match &attempt {
            // After the commit the guest belongs to the destination: no retry.
            Ok(_) | Err(CliError::Usage(_) | CliError::Mismatch(_) | CliError::Committed(_)) => {
                break
            }
            Err(e) => errors.push(e.to_string()),
        }
        logging_after_failure.get_or_insert(guest.memory().global_logging());
        eprintln!("vmm: {}; retrying to {retry}", errors[errors.len() - 1]);
        let before = guest.pages_written().unwrap_or(0);
        std::thread::sleep(PROGRESS_PROBE);
        let progressed = guest.pages_written().unwrap_or(0).saturating_sub(before);
        progress_after_failure.get_or_insert(progressed);
        if progressed == 0 && a.workload != WorkloadKind::Idle {
            eprintln!(
                "vmm: warning: the guest wrote no page in {} ms after the failed migration",
                PROGRESS_PROBE.as_millis()
            );
        }
        attempt = connect_source(retry, a.io_timeout)
            .and_then(|t| migrate(&guest, config.clone(), t, retry, None, None));
    }
    let (stats, view) = match attempt {
        Ok(done) => done,
        Err(e) => {
            if a.json && !a.retry_to.is_empty() {
                errors.push(e.to_string());
                println!(
                    "{}",
                    serde_json::json!({
                        "migrated": false,
                        "first_error": errors.first(),
                        "errors": errors,
                        "progress_after_failure_pages": progress_after_failure,
                        "logging_after_failure": logging_after_failure,
                    })
                );
            }
            return Err(e);
        }
    };
    // What the guest really wrote while it was being migrated (it is paused now): a migration is
    // only as good as the load it kept up with.
    let during = if a.retry_to.is_empty() && stats.total_time_ms > 0.0 {
        let written = guest
            .pages_written()
            .unwrap_or(0)
            .saturating_sub(written_before_migration);
        Some(written as f64 * 4096.0 / (stats.total_time_ms / 1e3))
    } else {
        None
    };
    // The source stays paused after a successful migration: its RAM is the switchover state.
    let fingerprint = if a.ram_fingerprint {
        let fp = ram_fingerprint(guest.memory(), 2)
            .map_err(|e| CliError::Failed(format!("fingerprinting RAM: {e}")))?;
        Some(format!("{fp:016x}"))
    } else {
        None
    };
    let retried = !a.retry_to.is_empty();
    // With `--retry-to`, say which attempt migrated and why the others failed.
    let migrated_to = match errors.len() {
        0 => uri.as_str(),
        n => a.retry_to[n - 1].as_str(),
    };
    if a.json {
        let mut v = stats_json(
            &stats,
            &guest.dirty_log_mode().to_string(),
            (rate, during),
            fingerprint.as_deref(),
            ring_json(&guest).as_ref(),
        );
        if let (true, Some(map)) = (retried, v.as_object_mut()) {
            map.insert("migrated".into(), true.into());
            map.insert("migrated_to".into(), migrated_to.into());
            map.insert("attempts".into(), (errors.len() + 1).into());
            map.insert("first_error".into(), errors.first().cloned().into());
            map.insert("errors".into(), errors.clone().into());
            map.insert(
                "progress_after_failure_pages".into(),
                progress_after_failure.into(),
            );
            map.insert("logging_after_failure".into(), logging_after_failure.into());
        }
        view.add_to(&mut v);
        println!("{v}");
        return Ok(());
    }
    if retried {
        for (i, e) in errors.iter().enumerate() {
            println!("attempt {} failed: {e}", i + 1);
        }
        if let Some(p) = progress_after_failure {
            println!(
                "  the guest kept running: {p} page writes in {} ms after the failure",
                PROGRESS_PROBE.as_millis()
            );
        }
        println!("attempt {} migrated to {migrated_to}", errors.len() + 1);
    }
    print_stats(
        &stats,
        guest.dirty_log_mode().to_string(),
        (rate, during),
        fingerprint,
        ring_json(&guest).as_ref(),
        false,
    );
    view.print();
    Ok(())
}

/// The guest's own view of a migration's live phase, from the `random` workload's counter block:
/// the largest gap between two consecutive page writes (any vCPU) and the write rate it achieved,
/// both in guest TSC time, from the migration's start to the moment the engine paused the guest
/// (so the downtime is not in them). `None` for other workloads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuestView {
    /// `guest_max_stall_ms`.
    pub max_stall_ms: Option<f64>,
    /// `guest_write_rate_bytes_per_s`.
    pub write_rate_bytes_per_s: Option<f64>,
}

impl GuestView {
    fn add_to(&self, v: &mut serde_json::Value) {
        if let Some(map) = v.as_object_mut() {
            map.insert("guest_max_stall_ms".into(), self.max_stall_ms.into());
            map.insert(
                "guest_write_rate_bytes_per_s".into(),
                self.write_rate_bytes_per_s.map(|r| r.round() as u64).into(),
            );
        }
    }

    fn print(&self) {
        if let Some(ms) = self.max_stall_ms {
            println!("  guest max stall   {ms:>10.2} ms   (largest gap between two page writes, live phase)");
        }
        if let Some(r) = self.write_rate_bytes_per_s {
            println!(
                "  guest write rate  {:>10.1} MiB/s (achieved, guest clock, live phase)",
                r / (1u64 << 20) as f64
            );
        }
    }
}

/// A [`VmControl`] that reads the guest's view ([`GuestView`]) just before it pauses the guest.
struct LiveProbe<'a> {
    inner: GuestControl<'a>,
    start: Option<Vec<WriteMark>>,
    at_pause: Mutex<Option<(u64, Vec<WriteMark>)>>,
}

impl<'a> LiveProbe<'a> {
    /// Restart the guest's stall measurement now (the migration's start).
    fn start(guest: &'a Guest) -> Self {
        let random = loaded_workload(guest.ram()).ok().flatten() == Some(GuestWorkload::Random);
        let start = random
            .then(|| {
                reset_stall(guest.ram()).ok()?;
                guest.monitor().write_marks().ok()
            })
            .flatten();
        LiveProbe {
            inner: GuestControl(guest),
            start,
            at_pause: Mutex::new(None),
        }
    }

    fn view(&self) -> GuestView {
        let guest = self.inner.0;
        let at = self.at_pause.lock().unwrap_or_else(|p| p.into_inner());
        match (&self.start, &*at) {
            (Some(m0), Some((gap, m1))) => GuestView {
                max_stall_ms: Some(ticks_to_ms(*gap, guest.tsc_khz())),
                write_rate_bytes_per_s: achieved_rate(m0, m1, guest.tsc_khz()),
            },
            _ => GuestView::default(),
        }
    }
}

impl VmControl for LiveProbe<'_> {
    fn pause(&self) -> Result<(), BoxError> {
        if self.start.is_some() {
            let mon = self.inner.0.monitor();
            let mut at = self.at_pause.lock().unwrap_or_else(|p| p.into_inner());
            // The first pause ends the live phase (a failed one resumes and fails the migration).
            if at.is_none() {
                *at = Some((mon.max_gap_ticks()?, mon.write_marks()?));
            }
        }
        self.inner.pause()
    }
    fn resume(&self) -> Result<(), BoxError> {
        self.inner.resume()
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        self.inner.save_state()
    }
}

/// Check that `uri` (given with `flag`) is a migration address a source can use.
pub fn validate_uri(flag: &str, uri: &str) -> CliResult {
    uri.parse::<MigrationUri>().map(drop).map_err(|e| {
        CliError::Usage(format!(
            "{flag} {uri}: {e}; use tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444), unix:PATH or file:PATH"
        ))
    })
}

/// How long `--retry-to` watches the guest after a failed migration, to prove it still runs.
const PROGRESS_PROBE: Duration = Duration::from_millis(300);

/// Connect to a destination. A TCP connection is guarded against a dead link for `io_timeout`
/// (the transport's send timeout and `TCP_USER_TIMEOUT`), so a link that goes silent (cable
/// pulled, peer host gone) fails the migration in seconds and the guest keeps running here.
pub fn connect_source(uri: &str, io_timeout: Duration) -> CliResult<Transport> {
    clearlog_migration::connect_with(uri, &ConnectOptions { io_timeout }).map_err(|e| {
        CliError::Failed(format!(
            "cannot reach the destination {uri}: {e} (is `vmm incoming` listening there?)"
        ))
    })
}

/// Run one migration of `guest`, with a progress bar on a terminal.
pub fn migrate(
    guest: &Guest,
    config: MigrationConfig,
    transport: clearlog_migration::Transport,
    uri: &str,
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
                p.bandwidth_bytes_per_s as f64 / (1 << 20) as f64,
                p.expected_downtime_ms,
                if p.paused { " | paused" } else { "" }
            ));
        }
    };
    let control = LiveProbe::start(guest);
    let result = match (fail_at, fault) {
        (None, None) => Source::new(guest.memory(), config)
            .and_then(|s| s.migrate(transport, &control, Some(&mut on_progress), &cancel)),
        (plan, fault) => {
            let faults = Injector::new(plan, fault);
            let mut memory = FaultyMemory::new(guest.memory(), faults.clone());
            if let Some(Fault::HidePopulated(n)) = fault {
                memory.hide_populated_pages(n).map_err(|e| {
                    CliError::Failed(format!("--fault hide-populated: choosing the pages: {e}"))
                })?;
            }
            let control = FaultyControl {
                inner: &control,
                faults: faults.clone(),
            };
            let transport = faulty_transport(transport, &faults);
            Source::new(&memory, config)
                .and_then(|s| s.migrate(transport, &control, Some(&mut on_progress), &cancel))
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let view = control.view();
    result.map(|stats| (stats, view)).map_err(|e| match e {
        clearlog_migration::Error::VerificationFailed { .. } => {
            CliError::Mismatch(format!("migration to {uri}: {e}"))
        }
        clearlog_migration::Error::VerificationIncomplete(_) => CliError::Committed(format!(
            "migration to {uri} committed but {e}; the source guest stays paused here"
        )),
        e => CliError::Failed(format!(
            "migration to {uri} failed: {e}; the guest keeps running here"
        )),
    })
}
