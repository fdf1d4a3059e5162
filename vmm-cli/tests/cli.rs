// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `vmm` binary, driven as a user would: `caps`, migrations between two processes over TCP,
//! Unix sockets and a file, and the error paths (exit code 2 for usage errors, 1 for failures,
//! each with a message that says what was wrong).
//!
//! The migrations are scaled to the debug binary on a shared 2-core machine: the debug engine
//! moves only about 10-20 MiB/s, so the random workload dirties 4 MiB/s (not 64 MiB/s, which a debug
//! build can never converge on) with a 400 MiB/s limit.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clearlog_bitmap::format_size;
use common::*;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Every field of the source's `--json` stats.
const STATS_FIELDS: &[&str] = &[
    "mode",
    "clear_chunk_bytes",
    "guest_mem_bytes",
    "total_time_ms",
    "setup_time_ms",
    "downtime_ms",
    "iterations",
    "dirty_syncs",
    "pages_sent",
    "bytes_sent",
    "zero_pages",
    "resent_pages",
    "log_sync_ms",
    "log_clear_calls",
    "log_clear_ms",
    "bandwidth_limit_bytes_per_s",
    "measured_bandwidth_bytes_per_s",
    "converged",
];

fn vmm(args: &[&str]) -> Output {
    Command::new(VMM).args(args).output().expect("run vmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `vmm ARGS`, expects exit code `code` and a stderr containing every one of `needles`;
/// returns the stderr.
fn expect_error(args: &[&str], code: i32, needles: &[&str]) -> String {
    let start = Instant::now();
    let out = vmm(args);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "vmm {args:?}: expected exit {code}\nstderr: {stderr}\nstdout: {}",
        text(&out.stdout)
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "vmm {args:?}: stderr does not mention `{n}`:\n{stderr}"
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "vmm {args:?} took {:?} to fail",
        start.elapsed()
    );
    stderr
}

#[test]
fn caps_text_and_json() {
    if !kvm_available("caps_text_and_json") {
        return;
    }
    let out = vmm(&["caps"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    for needle in [
        "api_version",
        "manual_protect_flags",
        "max_memslots",
        "dirty-log mode vmm uses",
        "dirty ring:",
    ] {
        assert!(t.contains(needle), "`vmm caps` lacks {needle}:\n{t}");
    }

    let out = vmm(&["caps", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("caps --json is not JSON ({e}): {}", text(&out.stdout)));
    assert_eq!(v["api_version"], 12, "{v}");
    assert!(
        v["manual_protect_flags"].is_u64(),
        "flags must be a number: {v}"
    );
    assert!(v["max_memslots"].as_u64().is_some_and(|n| n > 0), "{v}");
    let mode = v["dirty_log_mode"].as_str().expect("dirty_log_mode");
    assert!(!mode.is_empty());
    // The mode must agree with the flags: manual protection needs bit 0.
    let flags = v["manual_protect_flags"].as_u64().unwrap();
    assert_eq!(v["clear_dirty_log"], flags & 1 == 1, "{v}");
    // The ring: offered exactly when the kernel reports a size, never the default.
    let ring_max = v["dirty_ring_acq_rel_max_bytes"]
        .as_u64()
        .unwrap()
        .max(v["dirty_ring_max_bytes"].as_u64().unwrap());
    assert_eq!(v["dirty_ring"], ring_max >= 4096, "{v}");
    assert_eq!(v["dirty_ring_default"], false, "{v}");
    assert!(!mode.starts_with("ring"), "{v}");
    assert_eq!(
        v["pvm_host"],
        std::path::Path::new("/sys/module/kvm_pvm").exists(),
        "{v}"
    );
    if v["pvm_host"] == true {
        assert!(t.contains("PVM host: off by default"), "{t}");
    }
}

/// A running `vmm incoming`, its stderr drained by a thread.
struct Incoming {
    child: std::process::Child,
    uri: String,
    stderr: std::thread::JoinHandle<String>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

/// Starts `vmm incoming --listen ADDR ...` and waits for `vmm: listening on URI`.
fn start_incoming(listen: &str) -> Incoming {
    start_incoming_with(listen, &[])
}

/// [`start_incoming`] with `extra` arguments.
fn start_incoming_with(listen: &str, extra: &[&str]) -> Incoming {
    let mut child = Command::new(VMM)
        .args([
            "incoming",
            "--listen",
            listen,
            "--json",
            "--ram-fingerprint",
        ])
        .args(["--run-after", "500ms"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm incoming");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(uri) = line.strip_prefix("vmm: listening on ") {
                let _ = tx.send(uri.to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let Ok(uri) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "vmm incoming --listen {listen} never said where it listens:\n{}",
            stderr.join().unwrap_or_default()
        );
    };
    Incoming { child, uri, stderr }
}

/// The source's arguments of the scaled migration.
fn run_args<'a>(to: &'a str, dirty_log: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--mem",
        "256M",
        "--workload",
        "random",
        "--wss",
        "128M",
        "--dirty-rate",
        "4M",
        "--bandwidth",
        "400M",
        "--warmup",
        "500ms",
        "--max-time",
        "60s",
        "--dirty-log",
        dirty_log,
        "--migrate-to",
        to,
        "--json",
        "--ram-fingerprint",
    ]
}

fn check_source_stats(v: &serde_json::Value, dirty_log: &str) {
    for f in STATS_FIELDS {
        assert!(v.get(f).is_some(), "source stats lack `{f}`: {v}");
    }
    if dirty_log == "ring" {
        // The engine runs over the ring as in legacy mode, and says ring; so do the VM's mode
        // and the ring counters.
        assert_eq!(v["mode"], "ring", "{v}");
        assert_eq!(v["vm_dirty_log_mode"], "ring:64K", "{v}");
        let r = &v["dirty_ring"];
        assert_eq!(r["mode"], "ring:64K", "{v}");
        assert!(r["entries_harvested"].as_u64().unwrap() > 0, "{v}");
        assert!(r["reaps"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(r["per_vcpu"].as_array().unwrap().len(), 1, "{v}");
    } else {
        assert_eq!(v["mode"], dirty_log, "{v}");
        assert!(v.get("dirty_ring").is_none(), "{v}");
    }
    assert_eq!(v["converged"], true, "{v}");
    assert_eq!(v["guest_mem_bytes"], 256u64 << 20, "{v}");
    assert_eq!(v["bandwidth_limit_bytes_per_s"], 400u64 << 20, "{v}");
    assert!(v["iterations"].as_u64().unwrap() >= 1, "{v}");
    // The guest's own view of the live phase (random workload at 4 MiB/s).
    let stall = v["guest_max_stall_ms"]
        .as_f64()
        .expect("guest_max_stall_ms");
    assert!(stall > 0.0 && stall < 60_000.0, "{v}");
    let rate = v["guest_write_rate_bytes_per_s"]
        .as_f64()
        .expect("guest_write_rate_bytes_per_s");
    assert!(
        (rate - (4u64 << 20) as f64).abs() < 0.25 * (4u64 << 20) as f64,
        "the guest's achieved rate while migrating: {v}"
    );
    assert!(
        v["pages_sent"].as_u64().unwrap() + v["zero_range_pages"].as_u64().unwrap() >= 65536,
        "every page goes once, read or in a zero range: {v}"
    );
    // The default verification ran after the commit and passed (a file is verified at restore).
    assert_eq!(v["verify_mode"], "after-resume", "{v}");
    let b = &v["downtime_breakdown"];
    assert!(b["final_pages_ms"].as_f64().is_some(), "{v}");
    if dirty_log == "clear" {
        // The CLI's default --clear-chunk.
        assert_eq!(v["clear_chunk_bytes"], 16u64 << 20, "{v}");
    } else {
        assert_eq!(v["clear_chunk_bytes"], 0, "{v}");
    }
}

/// Migrates between two `vmm` processes through `listen` and compares the RAM fingerprints.
fn socket_migration(listen: &str, dirty_log: &str) {
    socket_migration_after(listen, dirty_log, |_| {});
}

/// [`socket_migration`], with `probe` poking the destination's address first.
fn socket_migration_after(listen: &str, dirty_log: &str, probe: impl FnOnce(&str)) {
    socket_migration_with(listen, dirty_log, &[], probe);
}

/// [`socket_migration_after`] with `extra` arguments for the source; returns the destination's
/// JSON.
fn socket_migration_with(
    listen: &str,
    dirty_log: &str,
    extra: &[&str],
    probe: impl FnOnce(&str),
) -> serde_json::Value {
    let incoming = start_incoming(listen);
    probe(&incoming.uri);
    let mut args = run_args(&incoming.uri, dirty_log);
    args.extend_from_slice(extra);
    let out = vmm(&args);
    let src_err = text(&out.stderr);
    let Incoming {
        mut child,
        uri,
        stderr,
    } = incoming;
    if !out.status.success() {
        let _ = child.kill();
    }
    let dst_out = child.wait_with_output().expect("wait for vmm incoming");
    let dst_err = stderr.join().unwrap_or_default();
    assert!(
        out.status.success(),
        "vmm run to {uri}: {:?}\n{src_err}",
        out.status
    );
    assert!(
        dst_out.status.success(),
        "vmm incoming on {uri}: {:?}\n{dst_err}",
        dst_out.status
    );
    let src: serde_json::Value = serde_json::from_slice(&out.stdout).expect("run --json");
    let dst: serde_json::Value = serde_json::from_slice(&dst_out.stdout).expect("incoming --json");
    check_source_stats(&src, dirty_log);
    assert_eq!(src["verified"], true, "{src}");
    assert_eq!(dst["verified"], true, "{dst}");
    assert_eq!(dst["acked"], true, "{dst}");
    assert_eq!(dst["resumed"], true, "{dst}");
    assert_eq!(dst["bytes_received"], src["bytes_sent"], "{src}\n{dst}");
    assert_eq!(dst["pages_received"], src["pages_sent"], "{src}\n{dst}");
    assert!(src["ram_fingerprint"].is_string(), "{src}");
    assert_eq!(
        src["ram_fingerprint"], dst["ram_fingerprint"],
        "destination RAM at switchover differs from the source's"
    );
    assert!(
        dst["pages_written_after_resume"].as_u64().unwrap() > 0,
        "{dst}"
    );
    dst
}

#[test]
fn migration_with_two_vcpus() {
    if !kvm_available("migration_with_two_vcpus") {
        return;
    }
    let _serial = serial();
    let dst = socket_migration_with("tcp:127.0.0.1:0", "clear", &["--vcpus", "2"], |_| {});
    // The destination made one vCPU per state blob, and both ran after the resume.
    assert_eq!(dst["state_blobs"], 2, "{dst}");
}

#[test]
fn migration_over_tcp_clear() {
    if !kvm_available("migration_over_tcp_clear") {
        return;
    }
    let _serial = serial();
    socket_migration("tcp:127.0.0.1:0", "clear");
}

#[test]
fn migration_over_tcp_legacy() {
    if !kvm_available("migration_over_tcp_legacy") {
        return;
    }
    let _serial = serial();
    socket_migration("tcp:127.0.0.1:0", "legacy");
}

#[test]
fn migration_over_tcp_ring() {
    if !kvm_available("migration_over_tcp_ring") || !ring_available() {
        return;
    }
    let _serial = serial();
    socket_migration("tcp:127.0.0.1:0", "ring");
}

/// The host's dirty-ring range from `vmm caps --json`, or None (a loud skip).
fn ring_range() -> Option<(u64, u64)> {
    let caps: serde_json::Value = serde_json::from_slice(&vmm(&["caps", "--json"]).stdout).ok()?;
    let r = caps["dirty_ring_min_bytes"]
        .as_u64()
        .zip(caps["dirty_ring_max_bytes_usable"].as_u64());
    if r.is_none() {
        eprintln!("SKIPPED: no dirty ring on this host ({caps})");
    }
    r
}

fn ring_available() -> bool {
    ring_range().is_some()
}

#[test]
fn bad_ring_sizes_are_usage_errors_listing_the_range() {
    if !kvm_available("bad_ring_sizes_are_usage_errors_listing_the_range") {
        return;
    }
    let Some((min, max)) = ring_range() else {
        return;
    };
    // The range as it is typed (`4K..=64K`), not in bytes.
    let range = format!("{}..={}", format_size(min), format_size(max));
    let too_big = (max * 2).to_string();
    for bad in ["48K", "1000", too_big.as_str()] {
        let e = expect_error(
            &[
                "run",
                "--dirty-log",
                "ring",
                "--ring-size",
                bad,
                "--mem",
                "64M",
                "--wss",
                "8M",
            ],
            2,
            &["--ring-size", "power of two", &range],
        );
        assert!(!e.contains(&max.to_string()), "{e}");
        if bad == "48K" {
            assert!(
                e.contains("--ring-size 48K: dirty ring size 48K is invalid"),
                "{e}"
            );
            assert!(!e.contains("49152"), "{e}");
        }
    }
    expect_error(
        &["bench", "--modes", "legacy,ring:3K"],
        2,
        &["ring:3K", "power of two"],
    );
}

/// `vmm bench` compares both legacy rows by default (QEMU-style, one sync per pass, and ours,
/// syncing within passes) and says so in --help; a mode it does not know lists them.
#[test]
fn bench_modes_have_both_legacy_rows() {
    let out = vmm(&["bench", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    assert!(
        help.contains("[default: legacy-qemu,legacy,clear:1G,"),
        "{help}"
    );
    assert!(help.contains("`legacy-qemu` (KVM's legacy dirty log with one sync per pass"));
    expect_error(
        &["bench", "--modes", "legacy,qemu"],
        2,
        &["mode `qemu`", "`legacy-qemu`, `legacy`"],
    );
}

#[test]
fn migration_over_unix_socket() {
    if !kvm_available("migration_over_unix_socket") {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("unix");
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    socket_migration(&listen, "clear");
}

/// `--fault lose-dirty-bits=N` makes the source lose pages on purpose; the default verification
/// must catch it in every run: exit code 3 on both sides, the page count in both errors.
fn lost_dirty_bits_are_detected(dirty_log: &str) {
    a_loss_is_detected(dirty_log, "lose-dirty-bits=64");
}

/// The source loses pages through `--fault FAULT`: exit code 3 on both sides, the pages named.
/// Returns the source's stderr.
fn a_loss_is_detected(dirty_log: &str, fault: &str) -> String {
    let incoming = start_incoming("tcp:127.0.0.1:0");
    let mut args = run_args(&incoming.uri, dirty_log);
    args.extend(["--fault", fault]);
    let out = vmm(&args);
    let Incoming {
        child, stderr, uri, ..
    } = incoming;
    let dst_out = child.wait_with_output().expect("wait for vmm incoming");
    let dst_err = stderr.join().unwrap_or_default();
    let src_err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "vmm run to {uri}:\n{src_err}");
    assert_eq!(dst_out.status.code(), Some(3), "vmm incoming:\n{dst_err}");
    for (side, err) in [("source", &src_err), ("destination", &dst_err)] {
        assert!(
            err.contains("verification FAILED")
                && err.contains("page(s) of the destination differ"),
            "{side}: {err}"
        );
    }
    assert!(
        dst_err.contains("ram0 page "),
        "the destination names the pages: {dst_err}"
    );
    src_err
}

/// `--fault hide-populated=N`: the source's populated-pages answer leaves out N pages that hold
/// data (a misclassified mapping), so the transfer sends them as zero. The default verification
/// does not ask that answer: it fails on both sides, and the source names the pages itself.
fn hidden_populated_pages_are_detected(dirty_log: &str) {
    let src_err = a_loss_is_detected(dirty_log, "hide-populated=5");
    assert!(
        src_err.contains("5 page(s) of the destination differ")
            && src_err.contains("had left out pages that hold data: ram0 page "),
        "the source names the pages its answer hid: {src_err}"
    );
}

#[test]
fn hidden_populated_pages_are_detected_clear() {
    if !kvm_available("hidden_populated_pages_are_detected_clear") {
        return;
    }
    let _serial = serial();
    hidden_populated_pages_are_detected("clear");
}

#[test]
fn hidden_populated_pages_are_detected_legacy() {
    if !kvm_available("hidden_populated_pages_are_detected_legacy") {
        return;
    }
    let _serial = serial();
    hidden_populated_pages_are_detected("legacy");
}

#[test]
fn hidden_populated_pages_are_detected_ring() {
    if !kvm_available("hidden_populated_pages_are_detected_ring") || !ring_available() {
        return;
    }
    let _serial = serial();
    hidden_populated_pages_are_detected("ring");
}

/// `vmm incoming --fault hide-populated=N`: the destination's RAM holds data before the stream in
/// N pages the source sends as zero, and its own populated-pages answer hides them. The
/// destination does not ask that answer: it reads what it receives as zero, zeroes the stale
/// pages, and ends with exactly the source's memory.
#[test]
fn a_destination_hiding_stale_pages_ends_with_the_sources_memory() {
    if !kvm_available("a_destination_hiding_stale_pages_ends_with_the_sources_memory") {
        return;
    }
    let _serial = serial();
    let incoming = start_incoming_with("tcp:127.0.0.1:0", &["--fault", "hide-populated=8"]);
    let out = vmm(&run_args(&incoming.uri, "clear"));
    let Incoming {
        child, stderr, uri, ..
    } = incoming;
    let dst_out = child.wait_with_output().expect("wait for vmm incoming");
    let dst_err = stderr.join().unwrap_or_default();
    assert!(
        out.status.success(),
        "vmm run to {uri}:\n{}",
        text(&out.stderr)
    );
    assert!(dst_out.status.success(), "vmm incoming:\n{dst_err}");
    let src: serde_json::Value = serde_json::from_slice(&out.stdout).expect("run --json");
    let dst: serde_json::Value = serde_json::from_slice(&dst_out.stdout).expect("incoming --json");
    assert_eq!(src["verified"], true, "{src}");
    assert_eq!(dst["verified"], true, "{dst}");
    assert_eq!(
        src["ram_fingerprint"], dst["ram_fingerprint"],
        "the destination kept stale pages:\n{src}\n{dst}"
    );
    assert_eq!(dst["stale_pages_zeroed"], 8, "{dst}");
}

#[test]
fn lost_dirty_bits_are_detected_clear() {
    if !kvm_available("lost_dirty_bits_are_detected_clear") {
        return;
    }
    let _serial = serial();
    lost_dirty_bits_are_detected("clear");
}

#[test]
fn lost_dirty_bits_are_detected_legacy() {
    if !kvm_available("lost_dirty_bits_are_detected_legacy") {
        return;
    }
    let _serial = serial();
    lost_dirty_bits_are_detected("legacy");
}

/// A port probe (health check, load balancer, `bash`'s `/dev/tcp`) connects and closes without a
/// byte: the destination logs it and keeps listening for the real source.
#[test]
fn stray_connection_does_not_end_the_destination() {
    if !kvm_available("stray_connection_does_not_end_the_destination") {
        return;
    }
    let _serial = serial();
    socket_migration_after("tcp:127.0.0.1:0", "clear", |uri| {
        let addr = uri.strip_prefix("tcp:").unwrap();
        drop(std::net::TcpStream::connect(addr).expect("probe connect"));
        // A second probe that stays connected and silent while the source migrates.
        std::mem::forget(std::net::TcpStream::connect(addr).expect("idle connect"));
    });
}

/// `vmm incoming --from URI --json --ram-fingerprint --run-after RUN_AFTER`, which must succeed:
/// its JSON report.
fn restore(uri: &str, run_after: &str) -> serde_json::Value {
    let out = vmm(&[
        "incoming",
        "--from",
        uri,
        "--json",
        "--ram-fingerprint",
        "--run-after",
        run_after,
    ]);
    assert!(
        out.status.success(),
        "vmm incoming: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("incoming --json")
}

/// A version-1 `file:` snapshot written by the release before sessions (tests/data/README.md)
/// still restores, verifies and holds what that source had.
#[test]
fn a_snapshot_written_by_the_release_before_sessions_still_loads() {
    if !kvm_available("a_snapshot_written_by_the_release_before_sessions_still_loads") {
        return;
    }
    let _serial = serial();
    let snap = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/v1-snapshot-41b6899.snap"
    );
    let dst = restore(&format!("file:{snap}"), "200ms");
    assert_eq!(dst["verified"], true, "{dst}");
    assert_eq!(dst["increment_consistent"], true, "{dst}");
    assert_eq!(dst["page_channels"], 0, "{dst}");
    // What the 41b6899 source reported as its RAM fingerprint at the switchover.
    assert_eq!(dst["ram_fingerprint"], "7fb5694594fe6b4f", "{dst}");
}

#[test]
fn migration_to_a_file_and_restore() {
    if !kvm_available("migration_to_a_file_and_restore") {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("file");
    let uri = format!("file:{}", dir.path().join("vm.snap").display());
    let out = vmm(&run_args(&uri, "clear"));
    assert!(
        out.status.success(),
        "vmm run: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    let src: serde_json::Value = serde_json::from_slice(&out.stdout).expect("run --json");
    check_source_stats(&src, "clear");
    let file_len = std::fs::metadata(dir.path().join("vm.snap")).unwrap().len();
    assert_eq!(src["bytes_sent"], file_len, "{src}");

    let dst = restore(&uri, "500ms");
    assert_eq!(dst["acked"], false, "{dst}");
    assert_eq!(dst["resumed"], true, "{dst}");
    assert_eq!(
        src["ram_fingerprint"], dst["ram_fingerprint"],
        "{src}\n{dst}"
    );
    assert!(
        dst["pages_written_after_resume"].as_u64().unwrap() > 0,
        "{dst}"
    );
}

// ----- error paths: none of these boots a guest -----

/// A port nothing listens on.
fn closed_port() -> u16 {
    // Port 1 (tcpmux) is never handed out as an ephemeral port, so no other test's listener can
    // take it between here and the connect (a port freed by a dropped listener could be reused).
    1
}

#[test]
fn bad_uris_are_usage_errors() {
    expect_error(
        &["run", "--migrate-to", "bogus:xyz"],
        2,
        &["--migrate-to bogus:xyz", "unknown scheme"],
    );
    expect_error(
        &["run", "--migrate-to", "tcp:127.0.0.1"],
        2,
        &["--migrate-to", "missing port"],
    );
    expect_error(
        &["incoming", "--listen", "tcp:nohost"],
        2,
        &["--listen tcp:nohost", "missing port"],
    );
    expect_error(
        &["incoming", "--listen", "file:/tmp/x.snap"],
        2,
        &["--from file:/tmp/x.snap"],
    );
    expect_error(
        &["incoming", "--from", "tcp:127.0.0.1:4444"],
        2,
        &["only file:PATH"],
    );
}

#[test]
fn listen_on_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", taken.local_addr().unwrap());
    expect_error(
        &["incoming", "--listen", &addr],
        2,
        &[&format!("cannot listen on {addr}"), "already in use"],
    );
}

#[test]
fn no_listener_fails_fast_naming_the_destination() {
    let to = format!("tcp:127.0.0.1:{}", closed_port());
    // Connecting comes before the guest boots: no 4 GiB guest is started for nothing.
    expect_error(
        &["run", "--migrate-to", &to],
        1,
        &[&format!("cannot reach the destination {to}"), "refused"],
    );
}

#[test]
fn clear_chunk_out_of_range() {
    let to = format!("tcp:127.0.0.1:{}", closed_port());
    for chunk in ["4K", "3M", "16T", "128K"] {
        expect_error(
            &["run", "--migrate-to", &to, "--clear-chunk", chunk],
            2,
            &["--clear-chunk", "power of two"],
        );
    }
}

#[test]
fn zero_and_negative_limits() {
    let to = format!("tcp:127.0.0.1:{}", closed_port());
    expect_error(
        &["run", "--migrate-to", &to, "--bandwidth", "0"],
        2,
        &["--bandwidth must be positive"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--downtime", "0"],
        2,
        &["--downtime must be positive"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--switchover-bandwidth", "0"],
        2,
        &["--switchover-bandwidth must be positive"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--mid-pass-sync", "0"],
        2,
        &["--mid-pass-sync", "positive interval, or off"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--mid-pass-sync", "sometimes"],
        2,
        &["sometimes", "not a duration"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--downtime", "-5ms"],
        2,
        &["-5ms", "negative"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--downtime=-5ms"],
        2,
        &["-5ms", "negative"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--bandwidth", "-1M"],
        2,
        &["-1M", "negative"],
    );
    expect_error(&["run", "--mem", "-256M"], 2, &["-256M", "negative"]);
    expect_error(
        &["run", "--migrate-to", &to, "--downtime", "fast"],
        2,
        &["fast", "not a duration"],
    );
}

#[test]
fn vcpu_and_dirtyrate_usage_errors() {
    expect_error(&["run", "--vcpus", "0"], 2, &["--vcpus 0", "1 to 64"]);
    expect_error(&["run", "--vcpus", "65"], 2, &["--vcpus 65", "1 to 64"]);
    expect_error(
        &["run", "--mem", "64M", "--wss", "8K", "--vcpus", "3"],
        2,
        &["fewer pages than --vcpus 3"],
    );
    expect_error(
        &["run", "--dirtyrate", "bits"],
        2,
        &["sample, bitmap or ring"],
    );
    expect_error(
        &["run", "--dirtyrate", "bitmap,0s"],
        2,
        &["longer than zero"],
    );
    expect_error(
        &["dirtyrate", "--mode", "fast"],
        2,
        &["sample, bitmap or ring"],
    );
    expect_error(&["dirtyrate", "--duration", "0s"], 2, &["--duration"]);
    expect_error(
        &["dirtyrate", "--sample-pages", "0"],
        2,
        &["--sample-pages"],
    );
    expect_error(&["dirtyrate", "--bandwidth", "0"], 2, &["--bandwidth"]);
    expect_error(
        &["dirtyrate", "--workload", "image"],
        2,
        &["built-in workloads"],
    );
}

/// `vmm dirtyrate` on a small guest: bitmap counts the distinct pages of a known writer, the
/// verdict follows, and ring mode gives per-vCPU rates (or says what is missing).
#[test]
fn dirtyrate_measures_a_guest() {
    if !kvm_available("dirtyrate_measures_a_guest") {
        return;
    }
    let _serial = serial();
    let out = vmm(&[
        "dirtyrate",
        "--mem",
        "64M",
        "--wss",
        "32M",
        "--dirty-rate",
        "8M",
        "--vcpus",
        "2",
        "--mode",
        "bitmap",
        "--duration",
        "500ms",
        "--warmup",
        "300ms",
        "--bandwidth",
        "100M",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dirtyrate --json");
    // 8 MiB/s for 0.5 s = 1024 writes over 8192 pages: ~963 distinct expected.
    let mib = v["dirty_rate_mib_per_s"].as_f64().unwrap();
    assert!(mib > 5.0 && mib < 9.0, "{v}");
    assert_eq!(v["mode"], "bitmap", "{v}");
    assert_eq!(v["convergence"]["converges"], true, "{v}");
    assert!(
        v["convergence"]["expected_passes"].as_u64().unwrap() >= 1,
        "{v}"
    );
    let text_out = vmm(&[
        "dirtyrate",
        "--mem",
        "64M",
        "--wss",
        "32M",
        "--dirty-rate",
        "400M",
        "--mode",
        "sample",
        "--bandwidth",
        "100M",
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
    ]);
    let t = text(&text_out.stdout);
    assert!(text_out.status.success(), "{}", text(&text_out.stderr));
    assert!(t.contains("dirty rate (sample"), "{t}");
    assert!(t.contains("standard error"), "{t}");
    assert!(
        t.contains("converges at bandwidth 100M/s with downtime 100ms: "),
        "{t}"
    );
    // Ring mode: the VM gets the ring; per-vCPU rates, two vCPUs writing half each.
    let ring = vmm(&[
        "dirtyrate",
        "--mem",
        "64M",
        "--wss",
        "32M",
        "--dirty-rate",
        "8M",
        "--vcpus",
        "2",
        "--mode",
        "ring",
        "--ring-size",
        "16K",
        "--duration",
        "500ms",
        "--warmup",
        "300ms",
        "--json",
    ]);
    assert!(ring.status.success(), "{}", text(&ring.stderr));
    let v: serde_json::Value = serde_json::from_slice(&ring.stdout).expect("dirtyrate ring --json");
    assert_eq!(v["mode"], "ring", "{v}");
    // Ring entries follow the write rate (8 MiB/s), 4 MiB/s per vCPU.
    let mib = v["dirty_rate_mib_per_s"].as_f64().unwrap();
    assert!(mib > 6.5 && mib < 9.5, "{v}");
    let per_vcpu = v["per_vcpu_mib_per_s"].as_array().expect("per-vCPU rates");
    assert_eq!(per_vcpu.len(), 2, "{v}");
    for r in per_vcpu {
        let r = r.as_f64().unwrap();
        assert!(r > 3.0 && r < 5.0, "{v}");
    }
    // `vmm run --dirtyrate ring` on a VM without the ring says what is missing.
    expect_error(
        &["run", "--mem", "64M", "--wss", "32M", "--dirtyrate", "ring"],
        2,
        &["dirty ring", "--dirty-log ring"],
    );
}

#[test]
fn guest_shape_errors() {
    expect_error(
        &["run", "--mem", "256M", "--wss", "512M"],
        2,
        &["--wss", "does not fit"],
    );
    expect_error(
        &["run", "--mem", "256M", "--wss", "256M"],
        2,
        &["--wss", "does not fit"],
    );
    expect_error(
        &["run", "--mem", "256M", "--wss", "1000"],
        2,
        &["--wss 1000 bytes", "4K page"],
    );
    expect_error(
        &["run", "--mem", "3M", "--wss", "1M"],
        2,
        &["--mem", "multiple of 2M"],
    );
    expect_error(
        &["run", "--workload", "image"],
        2,
        &["--workload image needs --image"],
    );
    expect_error(
        &[
            "run",
            "--workload",
            "image",
            "--image",
            "/nonexistent/guest.bin",
            "--load-addr",
            "0x200000",
        ],
        2,
        &["cannot read --image /nonexistent/guest.bin"],
    );
}

/// Size errors echo what the user typed in units (`1G`, `256M`), never a raw byte count.
#[test]
fn size_errors_are_in_the_units_typed() {
    let e = expect_error(
        &["run", "--mem", "256M", "--wss", "1G"],
        2,
        &["--wss 1G does not fit: the working set starts at 1M, so with --mem 256M it can be at most 255M"],
    );
    for raw in ["1073741824", "268435456", "267386880", "bytes"] {
        assert!(!e.contains(raw), "`{raw}` in: {e}");
    }
    let e = expect_error(
        &["run", "--mem", "3M", "--wss", "1M"],
        2,
        &["--mem 3M is not a multiple of 2M"],
    );
    assert!(!e.contains("3145728"), "{e}");
    let to = format!("tcp:127.0.0.1:{}", closed_port());
    let e = expect_error(
        &["run", "--migrate-to", &to, "--clear-chunk", "3M"],
        2,
        &[
            "--clear-chunk 3M: clear chunk size 3M invalid",
            "between 256K and 8T",
        ],
    );
    assert!(!e.contains("3145728"), "{e}");
    let e = expect_error(
        &["run", "--mem", "64M", "--wss", "8K", "--vcpus", "3"],
        2,
        &["--wss 8K has fewer pages than --vcpus 3"],
    );
    assert!(!e.contains("8192"), "{e}");
}

#[test]
fn huge_guest_shape_errors() {
    // Guest RAM may reach 1 TiB, but the working set must lie in the first 127 GiB.
    expect_error(
        &["run", "--mem", "256G", "--wss", "128G"],
        2,
        &["--wss 128G", "does not fit", "first 127G"],
    );
    expect_error(
        &["run", "--mem", "1026G", "--wss", "1G"],
        2,
        &["--mem 1026G", "larger than the 1T"],
    );
    expect_error(
        &["ladder", "--ladder-sizes", "4G,3M", "--wss", "1M"],
        2,
        &["--ladder-sizes 3M: --mem 3M", "multiple of 2M"],
    );
    expect_error(
        &["ladder", "--runs", "0"],
        2,
        &["--runs must be at least 1"],
    );
}

/// A 256 GiB guest with a 1 GiB working set boots, writes and reports in seconds (untouched RAM
/// costs nothing).
#[test]
fn run_a_256_gib_guest() {
    if !kvm_available("run_a_256_gib_guest") {
        return;
    }
    let _serial = serial();
    let start = Instant::now();
    let out = vmm(&[
        "run",
        "--mem",
        "256G",
        "--wss",
        "1G",
        "--dirty-rate",
        "64M",
        "--warmup",
        "300ms",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["guest_mem_bytes"], 256u64 << 30);
    assert!(v["pages_written"].as_u64().unwrap() > 0, "{v}");
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(start.elapsed() < Duration::from_secs(60));
}

/// `vmm ladder` with tiny sizes: every run verifies, the table is printed and the JSONL has the
/// per-GiB fields.
#[test]
fn ladder_with_tiny_sizes() {
    if !kvm_available("ladder_with_tiny_sizes") {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("ladder");
    let json = dir.path().join("ladder.jsonl");
    let out = vmm(&[
        "ladder",
        "--ladder-sizes",
        "256M,512M",
        "--wss",
        "16M",
        "--dirty-rate",
        "4M",
        "--runs",
        "1",
        "--warmup",
        "300ms",
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for needle in [
        "scenario",
        "1st pass ms",
        "ms/GiB",
        "src RSS MiB",
        "256 MiB legacy",
        "512 MiB clear 16 MiB",
        "4 runs, 4 verified",
    ] {
        assert!(stdout.contains(needle), "`{needle}` missing:\n{stdout}");
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .expect("the JSONL file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 4);
    let mut seen = std::collections::BTreeSet::new();
    for v in &lines {
        seen.insert((
            v["guest_mem_bytes"].as_u64().unwrap(),
            v["scenario"].as_str().unwrap().to_string(),
        ));
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["source_verified"], true, "{v}");
        assert_eq!(v["destination_verified"], true, "{v}");
        for key in [
            "total_time_ms",
            "first_pass_ms",
            "downtime_ms",
            "guest_visible_downtime_ms",
            "sync_ms",
            "log_clear_calls",
            "log_clear_ms",
            "setup_time_ms",
            "zero_range_pages",
            "verify_after_ms",
            "src_peak_rss_bytes",
            "dst_peak_rss_bytes",
        ] {
            let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"));
            let per_gib = v[format!("{key}_per_gib")]
                .as_f64()
                .unwrap_or_else(|| panic!("{key}_per_gib in {v}"));
            let gib = v["guest_mem_bytes"].as_f64().unwrap() / (1u64 << 30) as f64;
            assert!(
                (per_gib - x / gib).abs() <= 1e-6 * x.abs().max(1.0),
                "{key}: {v}"
            );
        }
        assert!(v["src_peak_rss_bytes"].as_f64().unwrap() > 0.0);
        assert!(v["downtime_breakdown"]["final_sync_ms"].is_number(), "{v}");
        // Untouched memory travels as zero ranges.
        assert!(v["zero_range_pages"].as_f64().unwrap() > 0.0, "{v}");
    }
    assert_eq!(seen.len(), 4, "every size x mode once: {seen:?}");
}

// ----- mutual TLS -----

/// The openssl-made test certificates of the migration crate (`dst`: localhost and 127.0.0.1;
/// `src-a`, `src-b`: two sources of the same CA).
fn tls_dir(who: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migration/tests/data/tls")
        .join(who);
    dir.to_str().unwrap().to_string()
}

/// A destination that accepts only `source-a.example` over TLS refuses a plaintext source, a
/// source it does not authorize, a source that does not accept its certificate, an HTTP request
/// and a peer that stalls in the handshake: each source fails before booting its guest, saying
/// why, and the destination logs each refusal and keeps waiting. The authorized source then
/// migrates the increment guest over 4 TLS channels: verified, every channel used, the increment
/// rule holds at the destination.
#[test]
fn increment_guest_over_four_tls_channels_after_every_refusal() {
    if !kvm_available("increment_guest_over_four_tls_channels_after_every_refusal") {
        return;
    }
    let _serial = serial();
    let (dst_dir, src_a, src_b) = (tls_dir("dst"), tls_dir("src-a"), tls_dir("src-b"));
    let incoming = start_incoming_with(
        "tcp:127.0.0.1:0",
        &[
            "--tls-dir",
            &dst_dir,
            "--tls-authz",
            "source-a.example",
            "--handshake-timeout",
            "1s",
        ],
    );
    let uri = incoming.uri.clone();
    let addr = uri.strip_prefix("tcp:").unwrap();
    let refused = |extra: &[&str], needle: &str| {
        let mut args = vec!["run", "--mem", "64M", "--wss", "8M", "--migrate-to", &uri];
        args.extend_from_slice(extra);
        expect_error(
            &args,
            1,
            &[&format!("cannot reach the destination {uri}"), needle],
        );
    };
    refused(&[], "requires TLS");
    refused(&["--tls-dir", &src_b], "not in its authorization list");
    refused(
        &["--tls-dir", &src_a, "--tls-hostname", "dst.example"],
        "dst.example",
    );
    let mut http = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut http, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // Connected and silent for the whole migration: its handshake times out on its own thread
    // (the source below boots for longer than the 1 s allowed).
    let _stalled = std::net::TcpStream::connect(addr).unwrap();

    let out = vmm(&[
        "run",
        "--mem",
        "256M",
        "--workload",
        "increment",
        "--wss",
        "128M",
        "--dirty-rate",
        "8M",
        "--warmup",
        "1s",
        "--max-time",
        "60s",
        // Windows of 256 KiB: the 8 MiB the guest wrote span every channel many times.
        "--clear-chunk",
        "256K",
        "--channels",
        "4",
        "--tls-dir",
        &src_a,
        "--migrate-to",
        &uri,
        "--json",
        "--ram-fingerprint",
    ]);
    let src_err = text(&out.stderr);
    let Incoming {
        mut child, stderr, ..
    } = incoming;
    if !out.status.success() {
        let _ = child.kill();
    }
    let dst_out = child.wait_with_output().expect("wait for vmm incoming");
    let dst_err = stderr.join().unwrap_or_default();
    assert!(out.status.success(), "vmm run: {:?}\n{src_err}", out.status);
    assert!(
        dst_out.status.success(),
        "vmm incoming: {:?}\n{dst_err}",
        dst_out.status
    );
    let src: serde_json::Value = serde_json::from_slice(&out.stdout).expect("run --json");
    let dst: serde_json::Value = serde_json::from_slice(&dst_out.stdout).expect("incoming --json");
    assert_eq!(src["verified"], true, "{src}");
    assert_eq!(dst["verified"], true, "{dst}");
    assert_eq!(dst["increment_consistent"], true, "{dst}");
    assert_eq!(
        src["ram_fingerprint"], dst["ram_fingerprint"],
        "{src}\n{dst}"
    );
    assert_eq!(
        (&src["page_channels"], &dst["page_channels"]),
        (&4.into(), &4.into())
    );
    let per_channel = src["channel_stats"].as_array().expect("channel_stats");
    assert_eq!(per_channel.len(), 4, "{src}");
    assert!(
        per_channel.iter().all(|c| c["pages"].as_u64().unwrap() > 0),
        "every channel carried pages: {src}"
    );
    assert_eq!(dst["pages_received"], src["pages_sent"], "{src}\n{dst}");
    // Every refusal was logged by the destination, which kept waiting.
    for needle in [
        "is not speaking TLS",
        "not authorized",
        "refused a connection",
        "timed out",
    ] {
        assert!(
            dst_err.contains(needle),
            "destination log lacks `{needle}`:\n{dst_err}"
        );
    }
}

/// A TLS source to a plaintext destination fails saying so; the destination refuses it, keeps
/// waiting, and a plaintext source then migrates.
#[test]
fn a_tls_source_to_a_plaintext_destination_is_refused() {
    if !kvm_available("a_tls_source_to_a_plaintext_destination_is_refused") {
        return;
    }
    let _serial = serial();
    socket_migration_after("tcp:127.0.0.1:0", "clear", |uri| {
        expect_error(
            &["run", "--migrate-to", uri, "--tls-dir", &tls_dir("src-a")],
            1,
            &[&format!("cannot reach the destination {uri}"), "TLS"],
        );
    });
}

#[test]
fn tls_usage_errors() {
    let to = format!("tcp:127.0.0.1:{}", closed_port());
    let src_a = tls_dir("src-a");
    expect_error(
        &[
            "run",
            "--migrate-to",
            &to,
            "--tls-dir",
            &src_a,
            "--channels",
            "0",
        ],
        2,
        &["--tls-dir needs a session", "--channels"],
    );
    expect_error(
        &[
            "run",
            "--migrate-to",
            "unix:/tmp/x.sock",
            "--tls-dir",
            &src_a,
        ],
        2,
        &["TLS runs over tcp: only"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--tls-dir", "/nonexistent"],
        2,
        &["--tls-dir /nonexistent", "ca.pem does not exist"],
    );
    expect_error(
        &["run", "--migrate-to", &to, "--tls-hostname", "x"],
        2,
        &["--tls-dir"],
    );
    expect_error(
        &[
            "incoming",
            "--listen",
            "tcp:127.0.0.1:0",
            "--tls-authz",
            "a.example",
        ],
        2,
        &["--tls-dir"],
    );
    expect_error(
        &[
            "incoming",
            "--listen",
            "tcp:127.0.0.1:0",
            "--tls-dir",
            &tls_dir("dst"),
            "--tls-authz",
            "not a name",
        ],
        2,
        &["--tls-authz", "not a DNS name"],
    );
    expect_error(
        &["incoming", "--listen", "tcp:0.0.0.0:0"],
        2,
        &["without TLS", "--tls-dir", "--insecure-plaintext"],
    );
    let dir = TempDir::new("tls-unix");
    let sock = format!("unix:{}", dir.path().join("s").display());
    expect_error(
        &["incoming", "--listen", &sock, "--tls-dir", &tls_dir("dst")],
        2,
        &["TLS runs over TCP only"],
    );
}

/// One side of a run: its exit code, its JSON (or null) and its stderr.
type Side = (Option<i32>, serde_json::Value, String);

/// A postcopy of an increment guest between two `vmm` processes over TCP loopback: `vmm run
/// ... --postcopy` with `extra` arguments, and `vmm incoming` (which checks the increment rule
/// once every page arrived, its guest paused for it). Returns both exit codes and JSON (or
/// stderr when a side printed none).
fn postcopy_migration(dirty_log: &str, extra: &[&str]) -> (Side, Side) {
    postcopy_migration_with(dirty_log, extra, &[])
}

/// [`postcopy_migration`] with `dst_extra` arguments for `vmm incoming`.
fn postcopy_migration_with(dirty_log: &str, extra: &[&str], dst_extra: &[&str]) -> (Side, Side) {
    let incoming = start_incoming_with("tcp:127.0.0.1:0", dst_extra);
    let mut args = vec![
        "run",
        "--mem",
        "128M",
        "--workload",
        "increment",
        "--wss",
        "32M",
        // Unpaced: the increment sweeps its working set faster than 16 MiB/s, so precopy
        // never fits the downtime limit and the switch to postcopy always comes.
        "--bandwidth",
        "16M",
        "--warmup",
        "300ms",
        "--max-time",
        "60s",
        "--dirty-log",
        dirty_log,
        "--migrate-to",
        &incoming.uri,
        "--json",
        "--postcopy",
    ];
    args.extend_from_slice(extra);
    let out = vmm(&args);
    let Incoming { child, stderr, .. } = incoming;
    let dst_out = child.wait_with_output().expect("wait for vmm incoming");
    let json = |b: &[u8]| serde_json::from_slice(b).unwrap_or(serde_json::Value::Null);
    (
        (out.status.code(), json(&out.stdout), text(&out.stderr)),
        (
            dst_out.status.code(),
            json(&dst_out.stdout),
            stderr.join().unwrap_or_default(),
        ),
    )
}

/// Increment guests through postcopy after a first pass in each dirty-log mode: the destination
/// resumes with pages missing, gets them asked for and pushed, both sides verify, and the
/// guest's memory keeps the increment rule once every page arrived; the source never resumes.
#[test]
fn postcopy_moves_an_increment_guest_after_a_legacy_clear_or_ring_pass() {
    if !kvm_available("postcopy_moves_an_increment_guest_after_a_legacy_clear_or_ring_pass") {
        return;
    }
    let _serial = serial();
    let modes: &[&str] = if ring_available() {
        &["legacy", "clear", "ring"]
    } else {
        &["legacy", "clear"]
    };
    for &mode in modes {
        let ((code, src, src_err), (dst_code, dst, dst_err)) = postcopy_migration(mode, &[]);
        assert_eq!(code, Some(0), "{mode}: vmm run: {src_err}");
        assert_eq!(dst_code, Some(0), "{mode}: vmm incoming: {dst_err}");
        assert_eq!(src["postcopy"], true, "{mode}: {src}");
        assert_eq!(
            src["iterations"], 1,
            "{mode}: postcopy after the first pass: {src}"
        );
        assert_eq!(src["verified"], true, "{mode}: {src}");
        assert_eq!(dst["postcopy"], true, "{mode}: {dst}");
        assert_eq!(dst["verified"], true, "{mode}: {dst}");
        assert_eq!(dst["increment_consistent"], true, "{mode}: {dst}");
        let missing = dst["postcopy_missing_pages"].as_u64().unwrap();
        assert!(missing > 0, "{mode}: {dst}");
        assert_eq!(
            dst["postcopy_missing_pages"], src["postcopy_pages"],
            "{mode}"
        );
        assert_eq!(
            dst["pages_received"], src["pages_sent"],
            "{mode}: {src}\n{dst}"
        );
        assert!(
            dst["pages_written_after_resume"].as_u64().unwrap() > 0,
            "{mode}: the guest runs after postcopy: {dst}"
        );
        assert!(
            dst["ram_fingerprint_skipped"].is_string(),
            "{mode}: no fingerprint of memory with pages missing: {dst}"
        );
    }
}

/// Dirty bits lost at the sync after the first pass: those pages are neither missing nor sent
/// again, the destination keeps their stale precopy copies, and the verification fails on both
/// sides (exit 3).
#[test]
fn postcopy_with_lost_dirty_bits_fails_the_verification_on_both_sides() {
    if !kvm_available("postcopy_with_lost_dirty_bits_fails_the_verification_on_both_sides") {
        return;
    }
    let _serial = serial();
    // Paced, so a page whose bit is lost is not written again before the switch (a guest that
    // rewrote it would make it dirty again, and nothing would be lost); a 1 ms downtime limit so
    // precopy does not fit and the switch comes.
    let extra = [
        "--fault",
        "lose-dirty-bits=16",
        "--dirty-rate",
        "8M",
        "--downtime",
        "1ms",
    ];
    let ((code, _, src_err), (dst_code, _, dst_err)) = postcopy_migration("clear", &extra);
    assert_eq!(code, Some(3), "vmm run: {src_err}");
    assert_eq!(dst_code, Some(3), "vmm incoming: {dst_err}");
    assert!(src_err.contains("verification FAILED"), "{src_err}");
    assert!(dst_err.contains("verification FAILED"), "{dst_err}");
}

/// The link cut after a postcopy's commit, without recovery: the source exits 4 and says its
/// guest stays paused (it never resumes it: the guest never runs twice). The destination exits
/// 4 saying its guest waits on pages only the source holds, or, when every page had arrived
/// before the cut, 1 saying its guest runs unverified. No side says verified.
#[test]
fn a_link_cut_during_postcopy_stops_both_sides_with_exit_code_4() {
    if !kvm_available("a_link_cut_during_postcopy_stops_both_sides_with_exit_code_4") {
        return;
    }
    let _serial = serial();
    for step in ["postcopy-send@3", "postcopy-request@2"] {
        let ((code, src, src_err), (dst_code, dst, dst_err)) =
            postcopy_migration("clear", &["--fail-at", step]);
        assert_eq!(code, Some(4), "{step}: vmm run: {src_err}");
        assert!(src_err.contains("stays paused"), "{step}: {src_err}");
        assert!(src_err.contains("injected fault"), "{step}: {src_err}");
        match dst_code {
            Some(4) => assert!(dst_err.contains("waits on pages"), "{step}: {dst_err}"),
            Some(1) => assert!(
                dst_err.contains("every page arrived") && dst_err.contains("could not be verified"),
                "{step}: {dst_err}"
            ),
            other => panic!("{step}: vmm incoming exited {other:?}: {dst_err}"),
        }
        assert_ne!(src["verified"], true, "{step}: {src}");
        assert_ne!(dst["verified"], true, "{step}: {dst}");
    }
}

/// The link cut after a postcopy's commit, with `--postcopy-recover-timeout` on both sides: the
/// source keeps its guest paused and opens a new session, the destination (its guest waiting on
/// missing pages) says which pages it still misses, and the migration ends on the new session,
/// verified on both sides, the increment rule holding.
#[test]
fn a_postcopy_cut_after_its_commit_is_resumed_on_a_new_session() {
    if !kvm_available("a_postcopy_cut_after_its_commit_is_resumed_on_a_new_session") {
        return;
    }
    let _serial = serial();
    let recover = ["--postcopy-recover-timeout", "20s"];
    for step in ["postcopy-send@3", "postcopy-request@2"] {
        let extra = ["--fail-at", step, recover[0], recover[1]];
        let ((code, src, src_err), (dst_code, dst, dst_err)) =
            postcopy_migration_with("clear", &extra, &recover);
        assert_eq!(code, Some(0), "{step}: vmm run: {src_err}");
        assert_eq!(dst_code, Some(0), "{step}: vmm incoming: {dst_err}");
        assert!(src_err.contains("injected fault"), "{step}: {src_err}");
        assert_eq!(src["postcopy_recoveries"], 1, "{step}: {src}");
        assert_eq!(dst["postcopy_recoveries"], 1, "{step}: {dst}");
        assert_eq!(src["verified"], true, "{step}: {src}");
        assert_eq!(dst["verified"], true, "{step}: {dst}");
        assert_eq!(dst["increment_consistent"], true, "{step}: {dst}");
    }
}
