// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Printing results as text or JSON.

use clearlog_migration::{IncomingStats, MigrationStats};
use clearlog_test_guest::Guest;

use std::time::Duration;

use crate::units::{fmt_duration, fmt_rate, fmt_size};

const MIB: f64 = (1u64 << 20) as f64;

/// The source's JSON object: the migration stats plus what the CLI measured around them.
pub fn stats_json(
    stats: &MigrationStats,
    vm_dirty_log: &str,
    (guest_dirty_rate, during_migration): (f64, Option<f64>),
    fingerprint: Option<&str>,
    ring: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut v = serde_json::to_value(stats).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        if let Some(r) = ring {
            map.insert("dirty_ring".into(), r.clone());
        }
        if let Some(fp) = fingerprint {
            map.insert("ram_fingerprint".into(), fp.into());
        }
        map.insert("vm_dirty_log_mode".into(), vm_dirty_log.into());
        map.insert("peak_rss_bytes".into(), peak_rss_bytes().into());
        map.insert(
            "guest_dirty_rate_bytes_per_s".into(),
            (guest_dirty_rate.round() as u64).into(),
        );
        if let Some(r) = during_migration {
            map.insert(
                "guest_dirty_rate_during_migration_bytes_per_s".into(),
                (r.round() as u64).into(),
            );
        }
    }
    v
}

/// This process's peak resident set size (`VmHWM` of `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:` line of a `/proc/<pid>/status` text, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut words = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// Print a finished migration's stats.
pub fn print_stats(
    stats: &MigrationStats,
    vm_dirty_log: String,
    (guest_dirty_rate, during_migration): (f64, Option<f64>),
    fingerprint: Option<String>,
    ring: Option<&serde_json::Value>,
    json: bool,
) {
    if json {
        println!(
            "{}",
            stats_json(
                stats,
                &vm_dirty_log,
                (guest_dirty_rate, during_migration),
                fingerprint.as_deref(),
                ring,
            )
        );
        return;
    }
    if let Some(r) = ring {
        println!(
            "  dirty ring        {} entries harvested, {} ring-full exits, {} reaps ({:.1} ms), {} rings found full",
            r["entries_harvested"], r["ring_full_exits"], r["reaps"], r["reap_ms"].as_f64().unwrap_or(0.0), r["rings_found_full"]
        );
    }
    println!(
        "migration complete ({}; KVM dirty log: {vm_dirty_log})",
        describe_mode(stats)
    );
    println!(
        "  total time        {:>10.0} ms   (setup {:.0} ms)",
        stats.total_time_ms, stats.setup_time_ms
    );
    println!("  downtime          {:>10.1} ms", stats.downtime_ms);
    print_postcopy(stats);
    println!(
        "  iterations        {:>10}      dirty syncs {} ({} within passes)",
        stats.iterations, stats.dirty_syncs, stats.mid_pass_syncs
    );
    println!(
        "  pages sent        {:>10}      zero pages {}, resent {}",
        stats.pages_sent, stats.zero_pages, stats.resent_pages
    );
    println!(
        "  bytes sent        {:>10.1} MiB",
        stats.bytes_sent as f64 / MIB
    );
    println!(
        "  bandwidth         {:>10.1} MiB/s (limit {})",
        stats.measured_bandwidth_bytes_per_s as f64 / MIB,
        rate_label(stats.bandwidth_limit_bytes_per_s)
    );
    if stats.verify_mode == "after-resume" {
        println!(
            "  verification      {:>10.0} ms   after the commit: {} digests, {} pages read to check they are zero{}",
            stats.verify_after_ms,
            stats.verify_pages,
            stats.verify_zero_checked_pages,
            if stats.verify_unreported_pages > 0 {
                format!(
                    ", {} holding data that the populated-pages answer left out",
                    stats.verify_unreported_pages
                )
            } else {
                String::new()
            }
        );
    }
    println!("  log_sync          {:>10.1} ms", stats.log_sync_ms);
    println!(
        "  log_clear         {:>10.1} ms   ({} calls)",
        stats.log_clear_ms, stats.log_clear_calls
    );
    println!(
        "  guest dirty rate  {:>10.1} MiB/s (measured during warm-up)",
        guest_dirty_rate / MIB
    );
    if let Some(r) = during_migration {
        println!(
            "  guest dirty rate  {:>10.1} MiB/s (while migrating)",
            r / MIB
        );
    }
    if let Some(fp) = fingerprint {
        println!("  RAM fingerprint   {fp:>16}");
    }
}

/// The guest-visible downtime and a postcopy's phase, when there are.
fn print_postcopy(stats: &MigrationStats) {
    if stats.guest_visible_downtime_ms > 0.0 {
        println!(
            "  guest-visible     {:>10.1} ms   (source pause to destination resume, host clock)",
            stats.guest_visible_downtime_ms
        );
    }
    if stats.postcopy {
        println!(
            "  postcopy          {:>10.0} ms   after {} passes: {} pages sent after the resume, {} asked for by faults ({} before the push had them)",
            stats.postcopy_ms,
            stats.iterations,
            stats.postcopy_pages,
            stats.postcopy_requests,
            stats.postcopy_requests_first
        );
    }
}

/// "legacy" or "clear, 128M chunks".
pub fn describe_mode(stats: &MigrationStats) -> String {
    if stats.mode == "clear" {
        format!("clear, {} chunks", fmt_size(stats.clear_chunk_bytes))
    } else {
        stats.mode.clone()
    }
}

/// Ring mode: what the dirty ring did (`dirty_ring` in the JSON): entries harvested, ring-full
/// exits, reaps and their time, rings found full, per vCPU too. `None` for the bitmap modes.
pub fn ring_json(guest: &Guest) -> Option<serde_json::Value> {
    if !guest.dirty_log_mode().is_ring() {
        return None;
    }
    let s = guest.listener().stats();
    let per_vcpu: Vec<serde_json::Value> = guest
        .listener()
        .ring_stats()
        .iter()
        .map(|v| {
            serde_json::json!({
                "vcpu": v.vcpu,
                "entries_harvested": v.harvested,
                "ring_full_exits": v.full_exits,
                "rings_found_full": v.found_full,
            })
        })
        .collect();
    Some(serde_json::json!({
        "mode": guest.dirty_log_mode().to_string(),
        "entries_harvested": s.ring_entries,
        "ring_full_exits": per_vcpu.iter().map(|v| v["ring_full_exits"].as_u64().unwrap_or(0)).sum::<u64>(),
        "reaps": s.ring_reaps,
        "reap_ms": s.ring_reap_ns as f64 / 1e6,
        "rings_found_full": s.ring_found_full,
        "foreign_entries": s.ring_foreign,
        "per_vcpu": per_vcpu,
    }))
}

/// Print what a guest did without migrating.
pub fn print_run_summary(guest: &Guest, boot_ms: f64, rate: f64, json: bool) {
    let written = guest.pages_written().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "guest_mem_bytes": guest.mem_bytes(),
                "vm_dirty_log_mode": guest.dirty_log_mode().to_string(),
                "boot_ms": boot_ms,
                "pages_written": written,
                "guest_dirty_rate_bytes_per_s": rate.round() as u64,
                "peak_rss_bytes": peak_rss_bytes(),
                "dirty_ring": ring_json(guest),
            })
        );
    } else {
        println!(
            "guest ran ({}, KVM dirty log: {})",
            fmt_size(guest.mem_bytes()),
            guest.dirty_log_mode()
        );
        println!("  boot + pre-fault  {boot_ms:>10.0} ms");
        println!("  pages written     {written:>10}");
        println!("  guest dirty rate  {:>10.1} MiB/s", rate / MIB);
    }
}

/// Print the destination's result.
pub fn print_incoming(stats: &IncomingStats, extra: &serde_json::Value, json: bool) {
    if json {
        let mut v = serde_json::to_value(stats).unwrap_or_default();
        if let (Some(map), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in extra {
                map.insert(k.clone(), x.clone());
            }
        }
        println!("{v}");
        return;
    }
    println!("incoming migration verified and resumed");
    println!(
        "  pages received    {:>10}   (zero pages {})",
        stats.pages_received, stats.zero_pages
    );
    println!(
        "  bytes received    {:>10.1} MiB",
        stats.bytes_received as f64 / MIB
    );
    println!(
        "  load time         {:>10.0} ms   (verify {:.0} ms)",
        stats.load_time_ms, stats.verify_ms
    );
    println!(
        "  checked zero      {:>10}   pages received as zero, read here (stale data zeroed: {})",
        stats.zero_checked_pages, stats.stale_pages_zeroed
    );
    if stats.postcopy {
        println!(
            "  postcopy          {:>10.0} ms   resumed with {} pages missing; {} asked for, fault latency median {:.2} ms, max {:.2} ms",
            stats.postcopy_ms,
            stats.postcopy_missing_pages,
            stats.postcopy_requested_pages,
            stats.fault_latency_median_ms,
            stats.fault_latency_max_ms
        );
    }
    if let Some(map) = extra.as_object() {
        for (k, v) in map {
            println!("  {k:<17} {v}");
        }
    }
}

/// A bandwidth limit as it is typed: `400M/s`, or `unlimited` for 0.
pub fn rate_label(bytes_per_s: u64) -> String {
    match bytes_per_s {
        0 => "unlimited".into(),
        b => fmt_rate(b),
    }
}

/// The workload and migration settings of `vmm bench` and `vmm ladder`, as given:
/// `working set 1G, dirty rate 288M/s, bandwidth 400M/s, downtime 100ms`.
pub fn settings_label(wss: u64, dirty_rate: u64, bandwidth: u64, downtime: Duration) -> String {
    format!(
        "working set {}, dirty rate {}, bandwidth {}, downtime {}",
        fmt_size(wss),
        fmt_rate(dirty_rate),
        rate_label(bandwidth),
        fmt_duration(downtime)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm() {
        assert_eq!(
            parse_vm_hwm("Name:\tvmm\nVmPeak:\t  10 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn settings_are_printed_as_typed() {
        assert_eq!(
            settings_label(3 << 30, 288 << 20, 0, Duration::from_millis(100)),
            "working set 3G, dirty rate 288M/s, bandwidth unlimited, downtime 100ms"
        );
        assert_eq!(rate_label(400 << 20), "400M/s");
    }

    /// The library crates' errors spell sizes with their own copy of the formatter (units.rs,
    /// which xtask compiles too, cannot use the library's): both must print a size alike.
    #[test]
    fn the_cli_and_the_library_print_sizes_alike() {
        for b in [
            0,
            1000,
            4095,
            4096,
            5000,
            255 << 20,
            (1 << 30) + 1,
            3 << 40,
            u64::MAX,
        ] {
            assert_eq!(fmt_size(b), clearlog_bitmap::format_size(b), "{b}");
        }
    }
}
