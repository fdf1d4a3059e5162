// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm dirtyrate` and `vmm run --dirtyrate`: measure a guest's dirty rate with
//! `clearlog_migration::dirtyrate` and say whether a migration would converge.

use std::time::{Duration, Instant};

use clearlog_migration::dirtyrate::{
    measure_bitmap, measure_ring, measure_sample, predict_convergence,
    predict_convergence_saturating, Convergence, DirtyRate, DirtyRateMode, VcpuDirtyCounts,
    DEFAULT_MAX_PASSES,
};
use clearlog_migration::DirtyTracking;
use clearlog_test_guest::{Guest, GuestConfig};

use crate::args::{CliDirtyLogMode, DirtyrateArgs, DirtyrateSpec, MigrationArgs, WorkloadKind};
use crate::chain::ErrorChain;
use crate::{CliError, CliResult};

const MIB: f64 = (1u64 << 20) as f64;

/// The `ring` mode's counts: each vCPU's cumulative harvested dirty-ring entries, after reaping
/// every ring (so entries still in a ring at the window's edges are counted). `None` when the VM
/// has no dirty ring.
fn ring_counts(guest: &Guest) -> Option<impl VcpuDirtyCounts + '_> {
    let listener = guest.listener();
    listener.vm().dirty_log_mode().is_ring().then_some(
        move || -> Result<Vec<u64>, clearlog_migration::BoxError> {
            listener.reap_rings()?;
            Ok(listener.ring_stats().iter().map(|s| s.harvested).collect())
        },
    )
}

/// Measure `guest`'s dirty rate as `spec` says.
pub fn measure(guest: &Guest, spec: DirtyrateSpec, sample_pages: u32) -> CliResult<DirtyRate> {
    let failed = |e: clearlog_migration::Error| {
        CliError::Failed(format!(
            "measuring the dirty rate ({}): {}",
            spec.mode,
            e.chain()
        ))
    };
    match spec.mode {
        DirtyRateMode::Sample => {
            let seed = u64::from(std::process::id()) ^ 0x5a4d_504c_4553_0000;
            measure_sample(&**guest.memory(), spec.duration, sample_pages, seed).map_err(failed)
        }
        DirtyRateMode::Bitmap => measure_bitmap(&**guest.memory(), spec.duration).map_err(failed),
        DirtyRateMode::Ring => {
            let counts = ring_counts(guest).ok_or_else(|| {
                CliError::Usage(
                    "--mode ring needs a VM with the dirty ring (--dirty-log ring)".into(),
                )
            })?;
            // KVM pushes ring entries only for memslots with dirty logging on.
            let mem = &**guest.memory();
            let logging = |op: &str, e: clearlog_migration::BoxError| {
                CliError::Failed(format!(
                    "measuring the dirty rate (ring): {op}: {}",
                    e.chain()
                ))
            };
            DirtyTracking::start_logging(mem).map_err(|e| logging("starting dirty logging", e))?;
            let rate = measure_ring(&counts, spec.duration, guest.mem_bytes() / 4096);
            let stopped =
                DirtyTracking::stop_logging(mem).map_err(|e| logging("stopping dirty logging", e));
            let rate = rate.map_err(failed)?;
            stopped?;
            Ok(rate)
        }
    }
}

/// The convergence model a workload calls for: the `random` workload writes uniformly over its
/// working set, so what a pass leaves dirty saturates (`Some(working set bytes)`); for the others
/// the linear model, capped at the initial data (`None`; `increment` sweeps, which is linear
/// until the whole working set is dirty).
pub fn saturating_over(workload: WorkloadKind, wss: u64) -> Option<u64> {
    (workload == WorkloadKind::Random).then_some(wss)
}

/// The verdict for a migration of `initial_bytes` at `m`'s bandwidth and downtime
/// (docs/design.md section 7).
pub fn verdict(
    rate: &DirtyRate,
    initial_bytes: u64,
    saturating: Option<u64>,
    m: &MigrationArgs,
) -> CliResult<Convergence> {
    match saturating {
        Some(ws) => predict_convergence_saturating(
            rate.dirty_rate_bytes_per_s,
            rate.window_s,
            ws,
            initial_bytes,
            m.bandwidth,
            m.downtime,
            DEFAULT_MAX_PASSES,
        ),
        None => predict_convergence(
            rate.dirty_rate_bytes_per_s,
            initial_bytes,
            m.bandwidth,
            m.downtime,
            DEFAULT_MAX_PASSES,
        ),
    }
    .map_err(|e| CliError::Usage(e.to_string()))
}

/// The JSON object of a measurement and its verdict.
pub fn to_json(
    rate: &DirtyRate,
    verdict: &Convergence,
    initial_bytes: u64,
    saturating: Option<u64>,
    m: &MigrationArgs,
) -> serde_json::Value {
    let mut v = serde_json::to_value(rate).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        map.insert("dirty_rate_mib_per_s".into(), rate.mib_per_s().into());
        map.insert(
            "per_vcpu_mib_per_s".into(),
            rate.per_vcpu_bytes_per_s
                .iter()
                .map(|r| r / MIB)
                .collect::<Vec<_>>()
                .into(),
        );
        let mut c = serde_json::to_value(verdict).unwrap_or_default();
        if let Some(cm) = c.as_object_mut() {
            cm.insert("bandwidth_bytes_per_s".into(), m.bandwidth.into());
            cm.insert(
                "downtime_limit_ms".into(),
                (m.downtime.as_secs_f64() * 1e3).into(),
            );
            cm.insert("initial_bytes".into(), initial_bytes.into());
            cm.insert("model".into(), model_name(saturating).into());
            cm.insert("working_set_bytes".into(), saturating.into());
            // JSON has no infinity.
            if !verdict.expected_total_s.is_finite() {
                cm.insert("expected_total_s".into(), serde_json::Value::Null);
            }
        }
        map.insert("convergence".into(), c);
    }
    v
}

fn model_name(saturating: Option<u64>) -> &'static str {
    match saturating {
        Some(_) => "saturating",
        None => "linear",
    }
}

/// Print a measurement and its verdict (text, or one line of JSON).
pub fn print(
    rate: &DirtyRate,
    verdict: &Convergence,
    initial_bytes: u64,
    saturating: Option<u64>,
    m: &MigrationArgs,
    json: bool,
) {
    if json {
        println!("{}", to_json(rate, verdict, initial_bytes, saturating, m));
        return;
    }
    println!(
        "dirty rate ({}, {:.3} s window): {:.1} MiB/s ({} of {} pages)",
        rate.mode,
        rate.window_s,
        rate.mib_per_s(),
        rate.dirty_pages,
        rate.total_pages
    );
    if let Some(s) = &rate.sample {
        println!(
            "  sampled {} pages, {} changed: +- {:.1} MiB/s (standard error), 95% interval [{:.1}, {:.1}] MiB/s",
            s.sampled_pages,
            s.changed_pages,
            s.std_error_bytes_per_s / MIB,
            s.ci95_low_bytes_per_s / MIB,
            s.ci95_high_bytes_per_s / MIB
        );
    }
    for (i, r) in rate.per_vcpu_bytes_per_s.iter().enumerate() {
        println!("  vCPU {i}: {:.1} MiB/s", r / MIB);
    }
    let bw = crate::units::fmt_rate(m.bandwidth);
    let dt = crate::units::fmt_duration(m.downtime);
    if verdict.converges {
        println!(
            "converges at bandwidth {bw} with downtime {dt}: yes, expected passes {} (downtime {:.0} ms, total {:.1} s for {} to send first; {} model)",
            verdict.expected_passes,
            verdict.expected_downtime_s * 1e3,
            verdict.expected_total_s,
            crate::units::fmt_size(initial_bytes),
            model_name(saturating)
        );
    } else {
        println!(
            "converges at bandwidth {bw} with downtime {dt}: no (write rate / bandwidth = {:.2}, {} model; after {} passes {:.0} ms would still be left)",
            verdict.ratio,
            model_name(saturating),
            verdict.expected_passes,
            verdict.expected_downtime_s * 1e3
        );
    }
}

/// What the first pass of a migration of this guest sends: the working set (pages never written
/// go as zero ranges, nearly free), or all RAM for workloads without one.
pub fn initial_bytes(guest: &Guest, wss: u64, workload: WorkloadKind) -> u64 {
    match workload {
        WorkloadKind::Random | WorkloadKind::Increment => wss.min(guest.mem_bytes()),
        _ => guest.mem_bytes(),
    }
}

/// Check the settings a measurement needs before booting anything.
pub fn validate(spec: DirtyrateSpec, sample_pages: u32, m: &MigrationArgs) -> CliResult {
    crate::setup::validate_migration(m)?;
    if m.bandwidth == 0 {
        return Err(CliError::Usage(
            "the convergence verdict needs a bandwidth: give --bandwidth RATE, not unlimited"
                .into(),
        ));
    }
    if spec.duration.is_zero() {
        return Err(CliError::Usage(
            "--duration must be longer than zero (e.g. 1s)".into(),
        ));
    }
    if spec.duration > Duration::from_secs(3600) {
        return Err(CliError::Usage(
            "--duration longer than an hour: give e.g. 1s or 10s".into(),
        ));
    }
    if spec.mode == DirtyRateMode::Sample && sample_pages == 0 {
        return Err(CliError::Usage(
            "--sample-pages must be at least 1 (default 512 per GiB)".into(),
        ));
    }
    Ok(())
}

/// `vmm dirtyrate`.
pub fn dirtyrate(a: DirtyrateArgs) -> CliResult {
    if a.workload == WorkloadKind::Image {
        return Err(CliError::Usage(
            "vmm dirtyrate runs the built-in workloads (random, increment, idle); for an image use vmm run --workload image --dirtyrate MODE".into(),
        ));
    }
    crate::setup::validate_guest(&a.guest, a.workload)?;
    let spec = DirtyrateSpec {
        mode: a.mode,
        duration: a.duration,
    };
    validate(spec, a.sample_pages, &a.migration)?;
    let workload = crate::setup::builtin_workload(a.workload, &a.guest)?;
    // Ring mode measures the VM's dirty ring, so the VM gets one whatever `--dirty-log` says.
    let dirty_log = match a.mode {
        DirtyRateMode::Ring => CliDirtyLogMode::Ring,
        _ => a.dirty_log,
    };
    let guest = Guest::boot(GuestConfig {
        mem_bytes: a.guest.mem,
        vcpus: a.guest.vcpus,
        dirty_log: crate::setup::vm_dirty_log(dirty_log, a.ring_size)?,
        workload,
        ..GuestConfig::default()
    })
    .map_err(|e| CliError::Failed(format!("cannot start the guest: {}", e.chain())))?;
    let t = Instant::now();
    std::thread::sleep(a.warmup);
    tracing::debug!(warmup_ms = t.elapsed().as_millis() as u64, "measuring");
    let rate = measure(&guest, spec, a.sample_pages)?;
    let initial = initial_bytes(&guest, a.guest.wss, a.workload);
    let model = saturating_over(a.workload, a.guest.wss);
    let v = verdict(&rate, initial, model, &a.migration)?;
    print(&rate, &v, initial, model, &a.migration, a.json);
    Ok(())
}
