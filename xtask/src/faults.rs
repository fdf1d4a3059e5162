// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask faults`: cut migrations at random points and check that nothing is lost.
//!
//! Each case starts two destinations (`vmm incoming`): A behind a fault-injecting TCP proxy, B
//! reached directly; then one source (`vmm run --migrate-to PROXY --retry-to B`). The proxy cuts
//! the first migration at a random point; the same source process must report the failure, keep
//! its guest running, and migrate to B, which must verify (RAM fingerprint equal to the source's,
//! increment rule). A must never resume a guest. A cut that lands after the commit (A had the
//! guest and was killed during the verification) is handled when the source says so and keeps its
//! guest paused: there is nothing to retry, the guest belonged to A.
//!
//! The `fail@STEP` cases need no proxy: `vmm run --fail-at STEP@N` breaks the N-th call of one
//! step of the source's first migration (sync, clear, read, send, pause, save-state, ack,
//! confirm); the same checks apply.
//!
//! The `loss:` cases make a loss on purpose (`--fault`, see `crate::loss`): the source's
//! populated-pages answer hides pages, or the source drops dirty bits, and both sides must fail
//! the verification; or the destination's RAM holds stale data it hides from its own answer, and
//! it must still end with the source's memory. A loss not caught while a side says `verified` is
//! counted and fails the run.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::{
    build_vmm, check_opts, dest_outcome, incoming_cmd, jbool, jstr, ju64, kvm_usable,
    leftover_children, opt_value, Proc, Rng, Shape, Workload,
};
use crate::loss::{run_loss, Loss};

const MIB: u64 = 1 << 20;

/// How the proxy breaks the first migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutKind {
    /// Forward N bytes, then reset both connections (SO_LINGER 0).
    ProxyReset,
    /// Forward N bytes, then close both connections (FIN).
    ProxyClose,
    /// Forward N bytes, then reset only the source-facing connection; the destination's stays
    /// open (silent) until the case ends.
    SourceClose,
    /// Forward N bytes, then `kill -9` the destination process.
    KillAtBytes,
    /// `kill -9` the destination a random delay after the stream started.
    KillAfterDelay,
    /// Forward N bytes, then stop forwarding with both connections open (the link goes silent):
    /// the source's `--io-timeout` must notice.
    Blackhole,
}

const KINDS: [CutKind; 6] = [
    CutKind::ProxyReset,
    CutKind::ProxyClose,
    CutKind::SourceClose,
    CutKind::KillAtBytes,
    CutKind::KillAfterDelay,
    CutKind::Blackhole,
];

/// The steps `vmm run --fail-at` can break, in migration order (see `vmm run --help`, Testing).
const INJECT_STEPS: [&str; 8] = [
    "sync",
    "clear",
    "read",
    "send",
    "pause",
    "save-state",
    "ack",
    "confirm",
];

/// One kind of fault case: a link cut by the proxy, or a failure injected into a step of the
/// source (`vmm run --fail-at STEP@N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Cut(CutKind),
    Inject(&'static str),
    /// A loss made on purpose (`--fault`): it must be caught, or repaired by the destination.
    Loss(Loss),
}

impl Fault {
    /// Every case kind: the cuts, the injection points, then the losses.
    fn all() -> Vec<Fault> {
        KINDS
            .iter()
            .map(|k| Fault::Cut(*k))
            .chain(INJECT_STEPS.iter().map(|s| Fault::Inject(s)))
            .chain(Loss::ALL.iter().map(|l| Fault::Loss(*l)))
            .collect()
    }

    fn name(self) -> String {
        match self {
            Fault::Cut(k) => k.name().to_string(),
            Fault::Inject(step) => format!("fail@{step}"),
            Fault::Loss(l) => l.name().to_string(),
        }
    }

    /// The highest call number worth injecting at (a later call may not happen: then the first
    /// migration succeeds and the case is retried with a lower number).
    fn max_call(self) -> u64 {
        match self {
            Fault::Cut(_) | Fault::Loss(_) => 1,
            Fault::Inject("sync") => 4,
            Fault::Inject("clear") => 64,
            Fault::Inject("read") => 20_000,
            Fault::Inject("send") => 400,
            Fault::Inject(_) => 1,
        }
    }
}

impl CutKind {
    fn name(self) -> &'static str {
        match self {
            CutKind::ProxyReset => "proxy-reset",
            CutKind::ProxyClose => "proxy-close",
            CutKind::SourceClose => "source-close",
            CutKind::KillAtBytes => "kill-dst@bytes",
            CutKind::KillAfterDelay => "kill-dst@delay",
            CutKind::Blackhole => "blackhole",
        }
    }
}

/// The proxy's plan: cut after `bytes` source-to-destination bytes, or `delay` after the first.
#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: CutKind,
    bytes: u64,
    delay: Duration,
    dest_pid: u32,
}

/// What the proxy did.
#[derive(Debug, Clone, Default)]
pub struct ProxyReport {
    /// Source-to-destination bytes forwarded.
    pub forwarded: u64,
    /// Whether the cut happened (false: the stream ended first).
    pub cut: bool,
    /// Problems of the proxy itself.
    pub error: Option<String>,
}

/// A one-connection TCP proxy that cuts the link according to a [`Plan`].
#[derive(Debug)]
pub struct Proxy {
    /// Where the source connects.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ProxyReport>>,
}

const POLL: Duration = Duration::from_millis(50);

fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live `linger` and its exact size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn kill9(pid: u32) {
    // SAFETY: plain kill(2) of a child process we started and have not reaped yet.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Copy `from` to `to` until EOF, an error, or `stop`.
fn pump_back(mut from: TcpStream, mut to: TcpStream, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                break;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                // Reset (a killed destination with unread data): the source must see it too.
                let _ = to.shutdown(Shutdown::Both);
                break;
            }
        }
    }
}

impl Proxy {
    /// Listen on 127.0.0.1 (any port) and forward one connection to `upstream`.
    fn start(upstream: SocketAddr, plan: Plan) -> Result<Proxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("proxy: bind: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("proxy: local address: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut report = ProxyReport::default();
            if let Err(e) = proxy_main(listener, upstream, plan, &stop2, &mut report) {
                report.error = Some(e);
            }
            report
        });
        Ok(Proxy {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Close everything and return what happened.
    fn finish(mut self) -> ProxyReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn proxy_main(
    listener: TcpListener,
    upstream: SocketAddr,
    plan: Plan,
    stop: &AtomicBool,
    report: &mut ProxyReport,
) -> Result<(), String> {
    let src = accept_source(&listener, stop)?;
    let io = |e: std::io::Error| format!("proxy: {e}");
    let dst = TcpStream::connect_timeout(&upstream, Duration::from_secs(10)).map_err(io)?;
    for s in [&src, &dst] {
        s.set_nodelay(true).map_err(io)?;
        s.set_read_timeout(Some(POLL)).map_err(io)?;
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
    }
    let back = Pump::back(&dst, &src).map_err(io)?;
    let hold = || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL);
        }
    };
    let (mut src, mut dst) = (src, dst);
    let mut buf = vec![0u8; 64 << 10];
    let mut first_byte: Option<Instant> = None;
    let mut src_eof = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let due = match plan.kind {
            CutKind::KillAfterDelay => first_byte.is_some_and(|t| t.elapsed() >= plan.delay),
            _ => report.forwarded >= plan.bytes,
        };
        if due && !report.cut {
            report.cut = true;
            match plan.kind {
                CutKind::ProxyReset => {
                    set_linger_zero(&src);
                    set_linger_zero(&dst);
                    return Ok(()); // dropping both sockets with linger 0 sends RSTs
                }
                CutKind::ProxyClose => {
                    let _ = src.shutdown(Shutdown::Both);
                    let _ = dst.shutdown(Shutdown::Both);
                    return Ok(());
                }
                CutKind::SourceClose => {
                    set_linger_zero(&src);
                    drop(back);
                    drop(src);
                    // The destination's connection stays open and silent until the case ends.
                    hold();
                    return Ok(());
                }
                CutKind::Blackhole => {
                    hold();
                    return Ok(());
                }
                // Keep proxying: the dead destination's socket ends the stream, as on a real
                // host crash seen through a live network.
                CutKind::KillAtBytes | CutKind::KillAfterDelay => kill9(plan.dest_pid),
            }
        }
        if src_eof {
            std::thread::sleep(POLL);
            continue;
        }
        let want = match plan.kind {
            CutKind::KillAfterDelay => buf.len(),
            _ if report.cut => buf.len(),
            _ => buf
                .len()
                .min((plan.bytes - report.forwarded).max(1) as usize),
        };
        src_eof = forward(
            &mut src,
            &mut dst,
            &mut buf[..want],
            report,
            &mut first_byte,
        );
    }
}

/// Waits (at most 120 s) for the source to connect to the proxy.
fn accept_source(listener: &TcpListener, stop: &AtomicBool) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("proxy: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| format!("proxy: {e}"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    return Err("proxy: the source never connected".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("proxy: accept: {e}")),
        }
    }
}

/// The thread pumping the destination's replies back to the source; stopped (and joined) on
/// drop.
struct Pump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pump {
    fn back(dst: &TcpStream, src: &TcpStream) -> std::io::Result<Pump> {
        let stop = Arc::new(AtomicBool::new(false));
        let (from, to, st) = (dst.try_clone()?, src.try_clone()?, stop.clone());
        let thread = Some(std::thread::spawn(move || pump_back(from, to, st)));
        Ok(Pump { stop, thread })
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards what the source sent (at most `buf.len()` bytes); whether the source side is done
/// (it closed, or the destination is gone).
fn forward(
    src: &mut TcpStream,
    dst: &mut TcpStream,
    buf: &mut [u8],
    report: &mut ProxyReport,
    first_byte: &mut Option<Instant>,
) -> bool {
    match src.read(buf) {
        Ok(0) => {
            let _ = dst.shutdown(Shutdown::Write);
            true
        }
        Ok(n) => {
            first_byte.get_or_insert_with(Instant::now);
            report.forwarded += n as u64;
            if dst.write_all(&buf[..n]).is_err() {
                // The destination is gone: close the source side too.
                let _ = src.shutdown(Shutdown::Both);
                return true;
            }
            false
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(_) => {
            let _ = dst.shutdown(Shutdown::Both);
            true
        }
    }
}

/// A rough length of the first stream: every page has a record (~16 bytes for a zero page), and
/// pages the guest wrote before the migration (about `rate x (boot + warm-up)`) are sent whole.
fn expected_stream_bytes(shape: &Shape) -> u64 {
    let pages = shape.mem / 4096;
    let written = shape.wss.min(shape.dirty_rate * 4 / 10);
    pages * 16 + written / 4096 * 4112
}

/// One case's result.
#[derive(Debug, Default)]
struct CaseResult {
    cut: bool,
    source_reported: bool,
    source_survived: bool,
    /// Dirty logging was off right after the failure.
    logging_stopped: bool,
    /// The cut came after the commit: the source reported it and kept its guest paused.
    after_commit: bool,
    /// The case was handled as it must be.
    ok: bool,
    retry_verified: bool,
    wrongly_resumed: bool,
    note: String,
}

/// `cargo xtask faults [--count N] [--seed S]`.
pub fn faults(args: &[String]) -> Result<(), String> {
    check_opts(args, &["--count", "--seed", "--only"])?;
    let only: Option<u32> = opt_value(args, "--only")?;
    let count: u32 = opt_value(args, "--count")?.unwrap_or(50);
    let seed: u64 = opt_value(args, "--seed")?.unwrap_or_else(Rng::clock_seed);
    if let Err(e) = kvm_usable() {
        if crate::harness::is_ci() && std::path::Path::new("/dev/kvm").exists() {
            return Err(format!("faults: {e} (CI=true)"));
        }
        println!("faults: SKIPPED: {e}");
        return Ok(());
    }
    let vmm = build_vmm()?;
    println!("\n==> xtask faults: {count} cut migrations, seed {seed} (rerun with --seed {seed})");
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let start = Instant::now();
    let cases = Fault::all();
    for i in 0..count {
        let kind = cases[(i as usize) % cases.len()];
        let shape = Shape::random(&mut rng, 256 * MIB, 1024 * MIB, 75);
        let case_seed = rng.next_u64();
        if only.is_some_and(|o| o != i + 1) {
            continue;
        }
        let t = Instant::now();
        let r = run_fault_case(&vmm, kind, &shape, case_seed, &mut tally);
        println!(
            "  {:>3} {:<15} {:<44} {:>5.1}s {} {}",
            i + 1,
            kind.name(),
            shape.describe(),
            t.elapsed().as_secs_f64(),
            if r.ok { "ok  " } else { "FAIL" },
            r.note
        );
        tally.rows.push((kind, r));
    }
    let left = leftover_children();
    println!(
        "\n==> xtask faults summary (seed {seed}, {:.0} s)",
        start.elapsed().as_secs_f64()
    );
    tally.print(&cases);
    println!(
        "  (cut points past the end of a stream, retried with an earlier point: {})\n  losses not caught while a side said verified: {} (must be 0)\n  stray child processes after the run: {}",
        tally.missed,
        tally.undetected,
        left.len()
    );
    tally.verdict(left.len())
}

/// One fault case: a cut point past the end of the stream lets the first migration finish, so it
/// is tried again with the range halved (the stream's length depends on how much the guest
/// wrote), up to 4 times; whether the case was handled as it must be is in `ok`.
fn run_fault_case(
    vmm: &std::path::Path,
    kind: Fault,
    shape: &Shape,
    case_seed: u64,
    tally: &mut Tally,
) -> CaseResult {
    let mut case_rng = Rng::new(case_seed);
    let mut r = CaseResult::default();
    for attempt in 0..4 {
        let result = match kind {
            Fault::Cut(cut) => run_case(vmm, cut, shape, &mut case_rng, 1u64 << attempt),
            Fault::Inject(step) => {
                // The last try fails the first call: it happens in every migration.
                let nth = if attempt == 3 {
                    1
                } else {
                    case_rng.range(1, (kind.max_call() >> (2 * attempt)).max(1))
                };
                run_inject_case(vmm, step, nth, shape)
            }
            Fault::Loss(loss) => run_loss_case(vmm, loss, shape, &mut tally.undetected),
        };
        r = result.unwrap_or_else(|e| CaseResult {
            note: format!("harness error: {e}"),
            ..CaseResult::default()
        });
        if r.cut || r.note.starts_with("harness error") {
            break;
        }
        tally.missed += 1;
    }
    r.ok = match kind {
        Fault::Loss(_) => r.ok,
        _ => {
            r.cut
                && (r.after_commit
                    || (r.source_reported
                        && r.source_survived
                        && r.logging_stopped
                        && r.retry_verified))
                && !r.wrongly_resumed
        }
    };
    r
}

/// The bookkeeping of a faults run: every case's result, the cut points that missed, the losses
/// no side caught.
#[derive(Debug, Default)]
struct Tally {
    rows: Vec<(Fault, CaseResult)>,
    /// Cut points past the end of a stream (retried with an earlier point).
    missed: u32,
    /// Loss cases whose destination differed from the source while a side said `verified`.
    undetected: u32,
}

/// The columns of the summary, in the order of [`Tally::counts`].
const TALLY_COLUMNS: [&str; 9] = [
    "tried",
    "fault made",
    "src error",
    "survived",
    "logging off",
    "retry ok",
    "after commit",
    "wrongly resumed",
    "handled",
];

impl Tally {
    /// The counts of the cases of `kind` (all cases: `None`), by [`TALLY_COLUMNS`].
    fn counts(&self, kind: Option<Fault>) -> [u32; 9] {
        let sel: Vec<&CaseResult> = self
            .rows
            .iter()
            .filter(|(k, _)| kind.is_none_or(|x| x == *k))
            .map(|(_, r)| r)
            .collect();
        let c = |f: fn(&CaseResult) -> bool| sel.iter().filter(|r| f(r)).count() as u32;
        [
            sel.len() as u32,
            c(|r| r.cut),
            c(|r| r.source_reported),
            c(|r| r.source_survived),
            c(|r| r.logging_stopped),
            c(|r| r.retry_verified),
            c(|r| r.after_commit),
            c(|r| r.wrongly_resumed),
            c(|r| r.ok),
        ]
    }

    /// One row per fault kind tried, and the total.
    fn print(&self, kinds: &[Fault]) {
        let widths = [6, 10, 10, 10, 11, 10, 13, 16, 8];
        let mut header = format!("  {:<15}", "fault");
        for (c, w) in TALLY_COLUMNS.iter().zip(widths) {
            header += &format!(" {c:>w$}");
        }
        println!("{header}");
        for kind in kinds.iter().copied().map(Some).chain([None]) {
            let row = self.counts(kind);
            if row[0] == 0 {
                continue;
            }
            let mut line = format!("  {:<15}", kind.map_or("TOTAL".to_string(), Fault::name));
            for (n, w) in row.iter().zip(widths) {
                line += &format!(" {n:>w$}");
            }
            println!("{line}");
        }
    }

    /// Every fault made and handled, no destination wrongly resumed, no loss missed, no stray
    /// process (`stray` of them left).
    fn verdict(&self, stray: usize) -> Result<(), String> {
        let [tried, cut, reported, survived, logging_off, verified, after_commit, wrong, handled] =
            self.counts(None);
        // A cut after the commit is handled when the source keeps its guest paused and says so
        // (there is nothing to retry: the guest belonged to the destination).
        if tried == cut && tried == handled && wrong == 0 && self.undetected == 0 && stray == 0 {
            println!("faults: all {tried} faults handled");
            return Ok(());
        }
        Err(format!(
            "faults: {tried} cases: {cut} faults made, {handled} handled ({reported} reported, {survived} survived, {logging_off} stopped logging, {verified} retries verified, {after_commit} after the commit), {wrong} destinations wrongly resumed, {} undetected losses, {stray} stray processes",
            self.undetected
        ))
    }
}

fn run_case(
    vmm: &std::path::Path,
    kind: CutKind,
    shape: &Shape,
    rng: &mut Rng,
    divide: u64,
) -> Result<CaseResult, String> {
    let mut dst_a = Proc::spawn("incoming A", incoming_cmd(vmm, &[], "127.0.0.1"))?;
    let mut dst_b = Proc::spawn("incoming B", incoming_cmd(vmm, &[], "127.0.0.1"))?;
    let uri_a = dst_a.listen_uri()?;
    let uri_b = dst_b.listen_uri()?;
    let addr_a: SocketAddr = uri_a
        .trim_start_matches("tcp:")
        .parse()
        .map_err(|e| format!("{uri_a}: {e}"))?;
    // Cut uniformly in the expected stream (divided by `divide` after a miss).
    let expected_bytes = expected_stream_bytes(shape);
    let bytes = rng.range(64 << 10, (expected_bytes / divide).max(128 << 10));
    let expected = Duration::from_secs_f64(expected_bytes as f64 / shape.bandwidth as f64);
    let delay = expected.mul_f64(rng.range(0, 100) as f64 / 100.0 / divide as f64);
    let proxy = Proxy::start(
        addr_a,
        Plan {
            kind,
            bytes,
            delay,
            dest_pid: dst_a.pid(),
        },
    )?;
    let (mut src, src_status) =
        run_source(vmm, shape, &format!("tcp:{}", proxy.addr), &uri_b, None)?;
    let report = proxy.finish();
    // The first migration finished before the proxy struck (a kill after the destination had the
    // guest and its verdict was in): nothing was cut. Try again with an earlier point.
    let first_migration_ok =
        matches!(&src_status, Ok(s) if s.success()) && jstr(&src.json(), "first_error").is_none();
    if !report.cut || first_migration_ok {
        // The first migration completed: nothing to judge (A resumed legitimately, B waits).
        return Ok(CaseResult {
            note: format!("no cut (stream ended after {} MiB)", report.forwarded >> 20),
            ..CaseResult::default()
        });
    }
    judge(
        Judged {
            src: &mut src,
            src_status,
            dst_a: &mut dst_a,
            dst_b: &mut dst_b,
            uri_b: &uri_b,
            shape,
        },
        report.error,
        format!("cut@{}M", report.forwarded >> 20),
    )
}

/// Run the case's source to its end: migrate to `to`, retry to `retry`, with an optional extra
/// argument (`--fail-at`).
fn run_source(
    vmm: &std::path::Path,
    shape: &Shape,
    to: &str,
    retry: &str,
    extra: Option<&str>,
) -> Result<(Proc, Result<std::process::ExitStatus, String>), String> {
    let mut cmd = std::process::Command::new(vmm);
    cmd.args(shape.run_args()).args([
        format!("--migrate-to={to}"),
        format!("--retry-to={retry}"),
        "--warmup=300ms".into(),
        "--max-time=60s".into(),
        "--io-timeout=5s".into(),
        "--ram-fingerprint".into(),
        "--json".into(),
    ]);
    cmd.args(extra);
    let mut src = Proc::spawn("source", cmd)?;
    let status = src.wait_timeout(Duration::from_secs(150));
    Ok((src, status))
}

/// A failure injected into one step of the source's first migration (`vmm run --fail-at`): the
/// source must name the step, stop logging, keep its guest running and migrate to B.
fn run_inject_case(
    vmm: &std::path::Path,
    step: &str,
    nth: u64,
    shape: &Shape,
) -> Result<CaseResult, String> {
    let mut dst_a = Proc::spawn("incoming A", incoming_cmd(vmm, &[], "127.0.0.1"))?;
    let mut dst_b = Proc::spawn("incoming B", incoming_cmd(vmm, &[], "127.0.0.1"))?;
    let uri_a = dst_a.listen_uri()?;
    let uri_b = dst_b.listen_uri()?;
    let fail_at = format!("--fail-at={step}@{nth}");
    let (mut src, src_status) = run_source(vmm, shape, &uri_a, &uri_b, Some(&fail_at))?;
    let injected = jstr(&src.json(), "first_error").is_some_and(|e| e.contains("injected fault"));
    if !injected {
        // Call `nth` of the step never came: the first migration completed (A resumed
        // legitimately). Nothing to judge.
        return Ok(CaseResult {
            note: format!("no fault ({step} call {nth} never happened)"),
            ..CaseResult::default()
        });
    }
    judge(
        Judged {
            src: &mut src,
            src_status,
            dst_a: &mut dst_a,
            dst_b: &mut dst_b,
            uri_b: &uri_b,
            shape,
        },
        None,
        format!("{step}@{nth}"),
    )
}

/// A loss made on purpose: "fault made" when it happened, "handled" when it was caught on both
/// sides (or, on a destination, repaired and verified).
fn run_loss_case(
    vmm: &std::path::Path,
    loss: Loss,
    shape: &Shape,
    undetected: &mut u32,
) -> Result<CaseResult, String> {
    let o = run_loss(vmm, loss, shape, 300)?;
    *undetected += u32::from(o.undetected);
    Ok(CaseResult {
        // A lose-dirty-bits case whose pages were all resent made no loss: tried again.
        cut: o.made || (o.ok && loss == Loss::DestinationHidesStale),
        ok: o.ok && !o.undetected,
        note: o.note,
        ..CaseResult::default()
    })
}

/// The processes of a case whose first migration failed.
struct Judged<'a> {
    src: &'a mut Proc,
    src_status: Result<std::process::ExitStatus, String>,
    dst_a: &'a mut Proc,
    dst_b: &'a mut Proc,
    uri_b: &'a str,
    shape: &'a Shape,
}

/// Judge a case whose first migration failed (the fault happened): see the module docs.
fn judge(j: Judged<'_>, harness_error: Option<String>, head: String) -> Result<CaseResult, String> {
    let Judged {
        src,
        src_status,
        dst_a,
        dst_b,
        uri_b,
        shape,
    } = j;
    let a_status = dst_a.wait_timeout(Duration::from_secs(20));
    let b_status = dst_b.wait_timeout(Duration::from_secs(60));

    let mut r = CaseResult {
        cut: true,
        ..CaseResult::default()
    };
    let mut notes = Vec::new();
    let sj = src.json();
    let first_error = jstr(&sj, "first_error");
    r.source_reported = first_error
        .as_deref()
        .is_some_and(|e| e.contains("failed") && e.contains("keeps running"));
    // Cut after the commit (the destination had the guest, then died during the verification):
    // the source must say so and keep its guest paused and intact, never retry nor resume it.
    r.after_commit = first_error
        .as_deref()
        .is_some_and(|e| e.contains("committed but") && e.contains("stays paused"));
    let progress = ju64(&sj, "progress_after_failure_pages").unwrap_or(0);
    r.source_survived = r.source_reported && progress > 0;
    r.logging_stopped = jbool(&sj, "logging_after_failure") == Some(false);
    // A's verdict: it must not have resumed, whatever happened to it.
    let a = dest_outcome(dst_a);
    r.wrongly_resumed = a.resumed;
    if a_status.is_err() {
        notes.push("A had to be killed".to_string());
    }
    // B: verified and resumed, same RAM as the source, increment rule holds.
    let b = dest_outcome(dst_b);
    let fp_src = jstr(&sj, "ram_fingerprint");
    let fp_b = jstr(&b.json, "ram_fingerprint");
    let increment_ok = shape.workload != Workload::Increment
        || jbool(&b.json, "increment_consistent") == Some(true);
    r.retry_verified = matches!(&src_status, Ok(s) if s.success())
        && matches!(&b_status, Ok(s) if s.success())
        && b.resumed
        && fp_src.is_some()
        && fp_src == fp_b
        && increment_ok
        && jstr(&sj, "migrated_to").as_deref() == Some(uri_b);
    if let Some(e) = harness_error {
        notes.push(e);
    }
    if !r.source_reported {
        notes.push(format!(
            "source: {:?} {}",
            src_status,
            src.error_line().unwrap_or_default()
        ));
    } else if !r.source_survived {
        notes.push(format!("source guest made no progress ({progress} pages)"));
    }
    if !r.retry_verified {
        notes.push(format!(
            "retry: src {:?} {} B {:?} fp {:?}/{:?} incr_ok {increment_ok} B err {}",
            src_status.as_ref().map(|s| s.code()),
            src.error_line().unwrap_or_default(),
            b_status.as_ref().map(|s| s.code()),
            fp_src,
            fp_b,
            dst_b.error_line().unwrap_or_default()
        ));
    }
    if r.wrongly_resumed {
        notes.push(format!("A RESUMED: {}", dst_a.stdout().trim()));
    }
    let short_err = first_error
        .as_deref()
        .and_then(|e| e.split(" failed: ").nth(1))
        .map_or("", |e| e.trim_end_matches("; the guest keeps running here"));
    if let Some(e) = dst_a.error_line() {
        notes.push(format!(
            "A: {}",
            e.trim_start_matches("vmm: error: ")
                .trim_end_matches("; no guest was resumed")
        ));
    }
    if !r.logging_stopped {
        notes.push(format!(
            "logging after the failure: {:?}",
            jbool(&sj, "logging_after_failure")
        ));
    }
    r.note = format!(
        "{head} +{progress}p err: {short_err}{}{}",
        if notes.is_empty() { "" } else { " | " },
        notes.join("; ")
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_counts_by_kind_and_every_case_must_be_handled() {
        let handled = CaseResult {
            cut: true,
            source_reported: true,
            source_survived: true,
            logging_stopped: true,
            retry_verified: true,
            ok: true,
            ..CaseResult::default()
        };
        let mut t = Tally::default();
        t.rows.push((Fault::Cut(CutKind::ProxyReset), handled));
        t.rows.push((
            Fault::Cut(CutKind::Blackhole),
            CaseResult {
                cut: true,
                after_commit: true,
                ok: true,
                ..CaseResult::default()
            },
        ));
        assert_eq!(t.counts(None), [2, 2, 1, 1, 1, 1, 1, 0, 2]);
        assert_eq!(t.counts(Some(Fault::Cut(CutKind::ProxyReset)))[0], 1);
        t.verdict(0).unwrap();
        assert!(t.verdict(1).is_err(), "a stray process fails the run");
        t.undetected = 1;
        assert!(t.verdict(0).is_err(), "a loss no side caught fails the run");
    }
}
