// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask netns`: two "hosts" on this machine, two network namespaces joined by veth pairs.
//!
//! Link 1 is shaped with `tc` (tbf bandwidth limit; netem delay and loss where the kernel has
//! netem); link 2 is plain. Phase 1 migrates over link 1 and verifies. Phase 2 migrates over
//! link 1 and takes the link down in the middle of the stream: the source must report the failure
//! and keep its guest running, the destination on link 1 must never resume, and the same source
//! process then migrates over link 2 (`--retry-to`), which must verify.
//!
//! The destinations listen on the veth addresses, which `vmm incoming` refuses without TLS: every
//! migration runs over mutual TLS with the test certificates (`migration/tests/data/tls`; the
//! destination's names `localhost`, so sources pass `--tls-hostname localhost`), and phase 0
//! checks the refusal itself. Phase 1 also sends a source whose certificate the destination's
//! `--tls-authz` does not list: it is refused and the destination keeps waiting. Phase 1 uses
//! the default session, phase 2 four page channels.
//!
//! Where namespaces cannot be created the test says SKIPPED (and fails with `CI=true`). Only
//! addresses in 10.213.77.0/29, inside namespaces this test creates, are used; the namespaces
//! (and their links) are deleted at the end, also on failure.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{
    build_vmm, dest_outcome, incoming_cmd, incoming_tls_args, is_ci, jbool, jstr, ju64, kvm_usable,
    leftover_children, opt_value, source_tls_args, Proc, Rng,
};

const SRC_IP1: &str = "10.213.77.1";
const DST_IP1: &str = "10.213.77.2";
const SRC_IP2: &str = "10.213.77.5";
const DST_IP2: &str = "10.213.77.6";
/// Link 1's tbf rate.
/// Link 1's tbf rate: well below what loopback-speed migration reaches here (100+ MiB/s), so
/// phase 1 shows the shaping in its measured bandwidth.
const TBF_RATE: &str = "400mbit";
const TBF_RATE_BYTES: f64 = 400.0 * 1e6 / 8.0;
const NS_PREFIX: &str = "clrlog-";

/// The namespaces of one run, deleted on drop.
#[derive(Debug)]
struct Net {
    src: String,
    dst: String,
    link1: (String, String),
    link2: (String, String),
    created: Vec<String>,
}

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    fn names() -> Net {
        let id = std::process::id() % 100_000;
        Net {
            src: format!("{NS_PREFIX}src-{}", std::process::id()),
            dst: format!("{NS_PREFIX}dst-{}", std::process::id()),
            link1: (format!("cl{id}s1"), format!("cl{id}d1")),
            link2: (format!("cl{id}s2"), format!("cl{id}d2")),
            created: Vec::new(),
        }
    }

    /// Create the namespaces; an error here means "namespaces cannot be created".
    fn create_namespaces(&mut self) -> Result<(), String> {
        for ns in [self.src.clone(), self.dst.clone()] {
            sh(&["ip", "netns", "add", &ns])?;
            self.created.push(ns);
        }
        Ok(())
    }

    fn links(&self) -> Result<(), String> {
        for ((a, b), (ip_a, ip_b)) in [
            (&self.link1, (SRC_IP1, DST_IP1)),
            (&self.link2, (SRC_IP2, DST_IP2)),
        ] {
            sh(&[
                "ip", "link", "add", a, "netns", &self.src, "type", "veth", "peer", "name", b,
                "netns", &self.dst,
            ])?;
            sh(&[
                "ip",
                "-n",
                &self.src,
                "addr",
                "add",
                &format!("{ip_a}/30"),
                "dev",
                a,
            ])?;
            sh(&[
                "ip",
                "-n",
                &self.dst,
                "addr",
                "add",
                &format!("{ip_b}/30"),
                "dev",
                b,
            ])?;
            sh(&["ip", "-n", &self.src, "link", "set", a, "up"])?;
            sh(&["ip", "-n", &self.dst, "link", "set", b, "up"])?;
        }
        for ns in [&self.src, &self.dst] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// tbf on both ends of link 1, netem (delay, loss) under it where available. Returns a note.
    fn shape(&self) -> Result<String, String> {
        let mut netem_ok = true;
        let mut netem_err = String::new();
        for (ns, dev, netem) in [
            (&self.src, &self.link1.0, "delay 2ms 500us loss 0.2%"),
            (&self.dst, &self.link1.1, "delay 2ms 500us"),
        ] {
            sh(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle",
                "1:", "tbf", "rate", TBF_RATE, "burst", "256kb", "latency", "50ms",
            ])?;
            let mut cmd = vec![
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1",
                "handle", "10:", "netem",
            ];
            cmd.extend(netem.split(' '));
            if let Err(e) = sh(&cmd) {
                netem_ok = false;
                netem_err = e;
            }
        }
        Ok(if netem_ok {
            format!("tbf {TBF_RATE} + netem delay 2ms loss 0.2%")
        } else {
            println!(
                "netns: netem SKIPPED: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so link 1 gets \
                 the tbf bandwidth limit only, no delay/loss ({netem_err})"
            );
            format!("tbf {TBF_RATE} (netem unavailable)")
        })
    }

    fn tx_bytes(&self, ns: &str, dev: &str) -> Result<u64, String> {
        let out = sh(&["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("ip -j output: {e}"))?;
        v.get(0)
            .and_then(|l| l.get("stats64"))
            .and_then(|s| s.get("tx"))
            .and_then(|t| t.get("bytes"))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("no tx bytes in `{out}`"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            if let Err(e) = sh(&["ip", "netns", "del", &ns]) {
                eprintln!("netns: cleanup: {e}");
            }
        }
    }
}

/// Delete namespaces left by an earlier run that was killed (its pid is gone).
fn remove_stale() {
    let Ok(list) = sh(&["ip", "netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.rsplit('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

/// `cargo xtask netns [--seed S]`.
pub fn netns(args: &[String]) -> Result<(), String> {
    crate::harness::check_opts(args, &["--seed"])?;
    let seed: u64 = opt_value(args, "--seed")?.unwrap_or_else(Rng::clock_seed);
    let ci = is_ci();
    let skip = |why: String| -> Result<(), String> {
        if ci {
            Err(format!("netns: {why} (CI=true: this test must run)"))
        } else {
            println!("\n##########\nnetns: SKIPPED: {why}\n##########");
            Ok(())
        }
    };
    if let Err(e) = kvm_usable() {
        return if ci && std::path::Path::new("/dev/kvm").exists() {
            Err(format!("netns: {e}"))
        } else {
            println!("netns: SKIPPED: {e}");
            Ok(())
        };
    }
    if sh(&["ip", "-V"]).is_err() || sh(&["tc", "-V"]).is_err() {
        return skip("`ip`/`tc` (iproute2) are not installed".into());
    }
    let vmm = build_vmm()?;
    remove_stale();
    let mut net = Net::names();
    if let Err(e) = net.create_namespaces() {
        drop(net);
        return skip(format!("cannot create network namespaces: {e}"));
    }
    net.links()?;
    let shaping = net.shape()?;
    println!(
        "\n==> xtask netns: {} ({SRC_IP1}) <-> {} ({DST_IP1}) link 1 [{shaping}], link 2 {SRC_IP2} <-> {DST_IP2}; seed {seed}",
        net.src, net.dst
    );
    let mut rng = Rng::new(seed);
    let r0 = phase_plaintext_refused(&vmm, &net);
    match &r0 {
        Ok(msg) => println!("  phase 0 (plaintext on a veth address): ok: {msg}"),
        Err(e) => println!("  phase 0 (plaintext on a veth address): FAIL: {e}"),
    }
    let r1 = phase_migrate(&vmm, &net);
    let stream_bytes = match &r1 {
        Ok((msg, bytes)) => {
            println!("  phase 1 (migrate over the shaped link): ok: {msg}");
            *bytes
        }
        Err(e) => {
            println!("  phase 1 (migrate over the shaped link): FAIL: {e}");
            32 << 20
        }
    };
    let r2 = phase_link_down(&vmm, &net, &mut rng, stream_bytes);
    match &r2 {
        Ok(msg) => println!("  phase 2 (link down mid-migration, retry on link 2): ok: {msg}"),
        Err(e) => println!("  phase 2 (link down mid-migration, retry on link 2): FAIL: {e}"),
    }
    drop(net);
    let left = leftover_children();
    let stale = sh(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("-{}", std::process::id())))
        .count();
    println!(
        "  stray child processes: {}, namespaces left: {stale}",
        left.len()
    );
    match (r0, r1, r2) {
        (Ok(_), Ok(_), Ok(_)) if left.is_empty() && stale == 0 => {
            println!("netns: passed");
            Ok(())
        }
        (z, a, b) => Err(format!(
            "netns: phase 0 {}, phase 1 {}, phase 2 {}, {} stray processes, {stale} namespaces left",
            if z.is_ok() { "ok" } else { "FAILED" },
            if a.is_ok() { "ok" } else { "FAILED" },
            if b.is_ok() { "ok" } else { "FAILED" },
            left.len()
        )),
    }
}

/// A destination in the destination namespace, listening on `ip` over mutual TLS.
fn dest_cmd(vmm: &std::path::Path, net: &Net, ip: &str) -> Command {
    let mut cmd = incoming_cmd(vmm, &["ip", "netns", "exec", &net.dst], ip);
    cmd.args(incoming_tls_args());
    cmd
}

/// `vmm incoming` on a veth address without TLS must refuse to start (a usage error, exit 2).
fn phase_plaintext_refused(vmm: &std::path::Path, net: &Net) -> Result<String, String> {
    let mut dst = Proc::spawn(
        "plaintext incoming",
        incoming_cmd(vmm, &["ip", "netns", "exec", &net.dst], DST_IP1),
    )?;
    let status = dst.wait_timeout(Duration::from_secs(20));
    let error = dst.error_line().unwrap_or_default();
    if matches!(&status, Ok(s) if s.code() == Some(2)) && error.contains("--insecure-plaintext") {
        Ok(format!("refused to start: `{error}`"))
    } else {
        Err(format!(
            "a plaintext destination on {DST_IP1} was not refused: {status:?} `{error}` {}",
            dst.stderr().trim()
        ))
    }
}

/// A source in the source namespace, over mutual TLS with the certificate in `tls` (the
/// destination's names `localhost`, not its veth address).
fn source_cmd(vmm: &std::path::Path, ns: &str, tls: &str, extra: &[String]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(vmm).args([
        "run",
        "--mem=512M",
        "--wss=384M",
        "--workload=increment",
        "--dirty-rate=8M",
        "--bandwidth=1G",
        "--warmup=4s",
        "--max-time=60s",
        "--io-timeout=2s",
        "--ram-fingerprint",
        "--json",
    ]);
    cmd.args(source_tls_args(tls, Some("localhost")));
    cmd.args(extra);
    cmd
}

/// A source whose certificate (`source-b.example`) the destination's `--tls-authz` does not
/// list: it must fail before booting its guest, and the destination must keep waiting.
fn refused_source(
    vmm: &std::path::Path,
    net: &Net,
    uri: &str,
    dst: &mut Proc,
) -> Result<(), String> {
    let mut src = Proc::spawn(
        "unauthorized source",
        source_cmd(vmm, &net.src, "src-b", &[format!("--migrate-to={uri}")]),
    )?;
    let status = src.wait_timeout(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    if matches!(&status, Ok(s) if s.code() == Some(1)) && dst.running() {
        Ok(())
    } else {
        Err(format!(
            "a source the destination does not authorize: {status:?} {} | destination still waiting: {}",
            src.error_line().unwrap_or_default(),
            dst.running()
        ))
    }
}

/// Migrate over link 1; returns a summary and the stream's length.
fn phase_migrate(vmm: &std::path::Path, net: &Net) -> Result<(String, u64), String> {
    let mut dst = Proc::spawn("incoming", dest_cmd(vmm, net, DST_IP1))?;
    let uri = dst.listen_uri()?;
    refused_source(vmm, net, &uri, &mut dst)?;
    let mut src = Proc::spawn(
        "source",
        source_cmd(vmm, &net.src, "src-a", &[format!("--migrate-to={uri}")]),
    )?;
    let s = src.wait_timeout(Duration::from_secs(120));
    let d = dst.wait_timeout(Duration::from_secs(60));
    let (sj, out) = (src.json(), dest_outcome(&dst));
    let fp = jstr(&sj, "ram_fingerprint");
    let ok = matches!(&s, Ok(x) if x.success())
        && matches!(&d, Ok(x) if x.success())
        && out.resumed
        && fp.is_some()
        && fp == jstr(&out.json, "ram_fingerprint")
        && jbool(&out.json, "increment_consistent") == Some(true)
        && ju64(&out.json, "page_channels").is_some_and(|n| n > 0);
    if !ok {
        return Err(format!(
            "source {s:?} {} | destination {d:?} {} | fingerprints {fp:?} / {:?} | page channels {:?}",
            src.error_line().unwrap_or_default(),
            dst.error_line().unwrap_or_default(),
            jstr(&out.json, "ram_fingerprint"),
            ju64(&out.json, "page_channels")
        ));
    }
    let bw = sj
        .as_ref()
        .and_then(|j| j.get("measured_bandwidth_bytes_per_s"))
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    if bw > TBF_RATE_BYTES * 1.15 {
        return Err(format!(
            "measured {:.0} MiB/s over a link shaped to {:.0} MiB/s: the shaping is not in effect",
            bw / f64::from(1 << 20),
            TBF_RATE_BYTES / f64::from(1 << 20)
        ));
    }
    let bytes = ju64(&sj, "bytes_sent").unwrap_or(0);
    Ok((format!(
        "source-b.example refused, the destination kept waiting; source-a.example over mutual TLS, {} page channels: \
         verified (fingerprint {}, increment rule holds), {} MiB in {:.0} ms, {:.1} ms downtime, {:.0} MiB/s on a {:.0} MiB/s link",
        ju64(&out.json, "page_channels").unwrap_or(0),
        fp.unwrap_or_default(),
        bytes >> 20,
        sj.as_ref().and_then(|j| j.get("total_time_ms")).and_then(|v| v.as_f64()).unwrap_or(0.0),
        sj.as_ref().and_then(|j| j.get("downtime_ms")).and_then(|v| v.as_f64()).unwrap_or(0.0),
        bw / f64::from(1 << 20),
        TBF_RATE_BYTES / f64::from(1 << 20)
    ), bytes))
}

/// Migrate over link 1, take it down after a random part of `stream_bytes` (phase 1's length),
/// then the source must retry over link 2.
fn phase_link_down(
    vmm: &std::path::Path,
    net: &Net,
    rng: &mut Rng,
    stream_bytes: u64,
) -> Result<String, String> {
    let mut dst_a = Proc::spawn("incoming A (link 1)", dest_cmd(vmm, net, DST_IP1))?;
    let mut dst_b = Proc::spawn("incoming B (link 2)", dest_cmd(vmm, net, DST_IP2))?;
    let (uri_a, uri_b) = (dst_a.listen_uri()?, dst_b.listen_uri()?);
    let base = net.tx_bytes(&net.src, &net.link1.0)?;
    // Cut somewhere in 5%..70% of the stream (as long as phase 1's).
    let cut_at = rng.range(stream_bytes / 20, stream_bytes * 7 / 10);
    let mut src = Proc::spawn(
        "source",
        source_cmd(
            vmm,
            &net.src,
            "src-a",
            &[
                format!("--migrate-to={uri_a}"),
                format!("--retry-to={uri_b}"),
                "--channels=4".into(),
            ],
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    while sent < cut_at {
        if !src.running() || Instant::now() > deadline {
            return Err(format!(
                "the source ended (or 60 s passed) before {} MiB crossed link 1 ({} MiB did): {}",
                cut_at >> 20,
                sent >> 20,
                src.error_line().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
        sent = net.tx_bytes(&net.src, &net.link1.0)?.saturating_sub(base);
    }
    // The destination's end of link 1 goes down: no FIN, no RST, the packets just vanish.
    sh(&["ip", "-n", &net.dst, "link", "set", &net.link1.1, "down"])?;
    let down_at = Instant::now();
    let s = src.wait_timeout(Duration::from_secs(120));
    let noticed_ms = down_at.elapsed().as_secs_f64() * 1e3;
    let b = dst_b.wait_timeout(Duration::from_secs(60));
    // A never hears from the source again; it must still be waiting (or have failed), never resumed.
    std::thread::sleep(Duration::from_millis(500));
    let a_still_waiting = dst_a.running();
    dst_a.kill();
    let a = dest_outcome(&dst_a);
    let out_b = dest_outcome(&dst_b);
    let sj = src.json();
    let first_error = jstr(&sj, "first_error").unwrap_or_default();
    let progress = ju64(&sj, "progress_after_failure_pages").unwrap_or(0);
    let fp = jstr(&sj, "ram_fingerprint");
    let mut problems = Vec::new();
    if !first_error.contains("failed") {
        problems.push(format!(
            "the source reported no failure (first_error `{first_error}`)"
        ));
    }
    if progress == 0 {
        problems.push("the source guest made no progress after the failure".into());
    }
    if a.resumed {
        problems.push(format!("destination A RESUMED: {}", dst_a.stdout().trim()));
    }
    let retry_ok = matches!(&s, Ok(x) if x.success())
        && matches!(&b, Ok(x) if x.success())
        && out_b.resumed
        && fp.is_some()
        && fp == jstr(&out_b.json, "ram_fingerprint")
        && jbool(&out_b.json, "increment_consistent") == Some(true)
        && ju64(&out_b.json, "page_channels") == Some(4);
    if !retry_ok {
        problems.push(format!(
            "retry over link 2 did not verify: source {s:?} {} | B {b:?} {}",
            src.error_line().unwrap_or_default(),
            dst_b.error_line().unwrap_or_default()
        ));
    }
    if problems.is_empty() {
        Ok(format!(
            "link down after {} MiB; source error: `{first_error}`; guest wrote {progress} pages in 300 ms after; \
             A {} and never resumed; retry on link 2 verified over mutual TLS, 4 page channels (fingerprint {}); \
             source done {:.0} ms after the cut",
            sent >> 20,
            if a_still_waiting { "was still waiting" } else { "exited" },
            fp.unwrap_or_default(),
            noticed_ms
        ))
    } else {
        Err(problems.join("; "))
    }
}
