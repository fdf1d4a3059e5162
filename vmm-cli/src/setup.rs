// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the commands that boot a guest or migrate share: checking the guest and migration
//! flags (every message says what is wrong and what to do), the workload and the dirty-log
//! modes they ask for.

use std::time::Duration;

use clearlog_kvm::KvmDirtyLogMode;
use clearlog_migration::{MigrationConfig, MigrationDirtyLogMode, MigrationUri};
use clearlog_test_guest::layout::{
    mapped_end, DEFAULT_WSS_START, IDENTITY_MAP_LIMIT, MAX_RAM, MAX_VCPUS,
};
use clearlog_test_guest::workload::WorkloadSpec;

use crate::args::{CliDirtyLogMode, GuestArgs, MigrationArgs, WorkloadKind, DEFAULT_DIRTY_RATE};
use crate::chain::ErrorChain;
use crate::units::fmt_size;
use crate::{CliError, CliResult};

/// Check a guest shape; every message says what is wrong and what to do.
pub fn validate_guest(g: &GuestArgs, workload: WorkloadKind) -> CliResult {
    let usage = |m: String| Err(CliError::Usage(m));
    if g.mem == 0 || g.mem % (2 << 20) != 0 {
        return usage(format!(
            "--mem {} is not a multiple of 2M: use e.g. --mem 256M or --mem 4G",
            fmt_size(g.mem)
        ));
    }
    if g.mem > MAX_RAM {
        return usage(format!(
            "--mem {} is larger than the {} this guest layout supports",
            fmt_size(g.mem),
            fmt_size(MAX_RAM)
        ));
    }
    if matches!(workload, WorkloadKind::Random | WorkloadKind::Increment) {
        if g.wss == 0 || g.wss % 4096 != 0 {
            return usage(format!(
                "--wss {} is not a positive multiple of the 4K page size",
                fmt_size(g.wss)
            ));
        }
        // The guest reaches only the RAM its identity map covers (the first 127 GiB).
        let room = mapped_end(g.mem).saturating_sub(DEFAULT_WSS_START);
        if g.wss > room {
            return usage(format!(
                "--wss {} does not fit: the working set starts at 1M{}, so with --mem {} it can be at most {}",
                fmt_size(g.wss),
                if g.mem > IDENTITY_MAP_LIMIT {
                    format!(" and must lie in the first {} the guest maps", fmt_size(IDENTITY_MAP_LIMIT))
                } else {
                    String::new()
                },
                fmt_size(g.mem),
                fmt_size(room)
            ));
        }
        if g.dirty_rate == Some(0) {
            return usage("--dirty-rate must be positive (e.g. 288M)".into());
        }
        if g.wss / 4096 < u64::from(g.vcpus) {
            return usage(format!(
                "--wss {} has fewer pages than --vcpus {}: each vCPU needs a part of its own",
                fmt_size(g.wss),
                g.vcpus
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
    if m.downtime.is_zero() {
        return Err(CliError::Usage(
            "--downtime must be positive (e.g. 100ms)".into(),
        ));
    }
    if m.channels > clearlog_migration::wire::MAX_CHANNELS {
        return Err(CliError::Usage(format!(
            "--channels {}: at most {} page channels (0 for one version-1 stream)",
            m.channels,
            clearlog_migration::wire::MAX_CHANNELS
        )));
    }
    if m.channels == 0 && m.postcopy_policy() != clearlog_migration::PostcopyPolicy::Off {
        return Err(CliError::Usage(
            "--postcopy needs a session with a return path: --channels 1 or more (not 0)".into(),
        ));
    }
    Ok(())
}

/// The migration config for a dirty-log mode and clear chunk.
pub fn migration_config(
    m: &MigrationArgs,
    dirty_log: CliDirtyLogMode,
    clear_chunk: u64,
    max_time: Duration,
) -> CliResult<MigrationConfig> {
    let mode = match dirty_log {
        CliDirtyLogMode::Legacy => MigrationDirtyLogMode::Legacy,
        // The ring hands its bits over at each sync, like a legacy GET: nothing to clear.
        CliDirtyLogMode::Ring => MigrationDirtyLogMode::Ring,
        CliDirtyLogMode::Clear => MigrationDirtyLogMode::from_clear_chunk_bytes(clear_chunk).map_err(|e| {
            CliError::Usage(format!(
                "--clear-chunk {}: {e} (a power of two from 256K = 64 pages, shift 6, to 8T = shift 31)",
                fmt_size(clear_chunk)
            ))
        })?,
    };
    let config = MigrationConfig::default()
        .with_mode(mode)
        .with_bandwidth_limit_bytes_per_s(m.bandwidth)
        .with_downtime_limit(m.downtime)
        .with_switchover_bandwidth_bytes_per_s(m.switchover_bandwidth.unwrap_or(0))
        .with_mid_pass_sync(m.mid_pass_sync.0)
        .with_postcopy(m.postcopy_policy())
        .with_max_time(Some(max_time));
    config
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(config)
}

/// The VM's dirty-log mode for a migration mode: `legacy` really uses KVM's legacy get-and-clear
/// (the reference experiment's baseline), `clear` uses manual protection with INITIALLY_SET.
pub fn vm_dirty_log(
    dirty_log: CliDirtyLogMode,
    ring_size: u64,
) -> CliResult<Option<KvmDirtyLogMode>> {
    Ok(match dirty_log {
        CliDirtyLogMode::Legacy => Some(KvmDirtyLogMode::Legacy),
        CliDirtyLogMode::Clear => None,
        CliDirtyLogMode::Ring => Some(KvmDirtyLogMode::Ring {
            bytes: check_ring_size(ring_size)?,
        }),
    })
}

/// `--ring-size` against this host's range (usage errors list it), and a host without the ring.
pub fn check_ring_size(bytes: u64) -> CliResult<u32> {
    let caps = clearlog_kvm::KvmCaps::probe_device(clearlog_kvm::KVM_DEVICE.as_ref())
        .map_err(|e| CliError::Failed(format!("--dirty-log ring: {}", e.chain())))?;
    let range = clearlog_kvm::RingRange::of(&caps).ok_or_else(|| {
        CliError::Usage(format!(
            "--dirty-log ring: {}",
            clearlog_kvm::Error::DirtyRingUnsupported
        ))
    })?;
    let bad = || {
        CliError::Usage(format!(
            "--ring-size {}: {}",
            fmt_size(bytes),
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
            seed: u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15,
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

/// Check that `uri` (given with `flag`) is a migration address a source can use.
pub fn validate_uri(flag: &str, uri: &str) -> CliResult {
    uri.parse::<MigrationUri>().map(drop).map_err(|e| {
        CliError::Usage(format!(
            "{flag} {uri}: {e}; use tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444), unix:PATH or file:PATH"
        ))
    })
}
