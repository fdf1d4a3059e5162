// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask faults`: cut migrations at every step and check that nothing is lost.
//!
//! Each cut case starts two destinations (`vmm incoming`): A behind a fault-injecting TCP proxy
//! (`crate::proxy`), B reached directly; then one source (`vmm run --migrate-to PROXY --retry-to
//! B`). The proxy forwards every connection of the source (a session's control channel and page
//! channels, or one version-1 stream) and cuts one of them at one step: during the session
//! handshake, at the header or a page channel's first record, after a random byte count or
//! delay, at the state and end marker, the acknowledgement, the confirmation, the final digests or
//! the verdict; by reset, close, a reset of the source's side only, a silent link, or killing A.
//! `crate::judge` says what must come of it: before the commit the same source process reports
//! the failure, keeps its guest running and migrates to B, which must verify (RAM fingerprint
//! equal to the source's, increment rule), and A never resumes; after the commit the source says
//! so and keeps its guest paused, and A has the guest exactly when it had the confirmation; during
//! the handshake (before the source boots) the source exits with a clear error and A keeps waiting,
//! then verifies a migration from a new source.
//!
//! Sources use the default session, one version-1 stream (`--channels 0`) or four page channels
//! in turn, so every path stays exercised.
//!
//! The `fail@STEP` cases need no proxy: `vmm run --fail-at STEP@N` breaks the N-th call of one
//! step of the source's first migration (sync, clear, read, send, drain, pause, save-state, ack,
//! confirm); the same checks apply.
//!
//! The `loss:` cases make a loss on purpose (`--fault`, see `crate::loss`): the source's
//! populated-pages answer hides pages, or the source drops dirty bits, and both sides must fail
//! the verification; or the destination's RAM holds stale data it hides from its own answer, and
//! it must still end with the source's memory. A loss not caught while a side says `verified` is
//! counted and fails the run.
//!
//! `--no-retry` checks the judge itself: sources get no `--retry-to`, so every cut and injection
//! case that needs the retry (all but the handshake cuts, whose retry is a new source) must be
//! reported FAIL, and the run fails.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::{
    build_vmm, check_opts, incoming_cmd, jbool, jstr, ju64, kvm_usable, leftover_children,
    opt_value, Proc, Rng, Shape,
};
use crate::judge::{judge, judge_before_boot, CaseResult, Expect, Judged};
use crate::loss::{run_loss, Loss};
use crate::proxy::{How, Plan, Proxy, Step};

const MIB: u64 = 1 << 20;

/// The page channels of a session without `--channels` (`clearlog_migration::DEFAULT_CHANNELS`).
const DEFAULT_CHANNELS: u32 = 4;

/// The steps of a migration a cut case can hit (the proxy's [`Step`] without its numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Hello,
    First,
    Bytes,
    Delay,
    End,
    Ack,
    Confirm,
    Verify,
    Verdict,
}

impl At {
    fn name(self) -> &'static str {
        match self {
            At::Hello => "hello",
            At::First => "first",
            At::Bytes => "bytes",
            At::Delay => "delay",
            At::End => "end",
            At::Ack => "ack",
            At::Confirm => "confirm",
            At::Verify => "verify",
            At::Verdict => "verdict",
        }
    }

    /// The step exists only in a session (a version-1 stream has no hello, and its end marker is
    /// not found without decoding it).
    fn session_only(self) -> bool {
        matches!(self, At::Hello | At::End)
    }

    /// What must come of a cut at this step.
    fn expect(self) -> Expect {
        match self {
            At::Hello => Expect::BeforeBoot,
            At::First | At::Bytes | At::End | At::Ack => Expect::BeforeCommit,
            // The confirmation never reaches A; the source sent it: it committed.
            At::Confirm => Expect::AfterCommit { a_resumes: false },
            At::Verify | At::Verdict => Expect::AfterCommit { a_resumes: true },
            At::Delay => Expect::Either,
        }
    }
}

/// Which connection a cut case cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The control channel (a version-1 stream: the stream).
    Control,
    /// A page channel picked at random (a version-1 stream: the stream).
    Page,
    /// Any connection, picked at random.
    Any,
}

/// A cut case: one connection cut one way at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    at: At,
    how: How,
    target: Target,
}

/// Every cut case: each step once, with each way of cutting, on the channels that carry the step
/// (page channels have ended before the end marker: a cut there is no fault).
const CUTS: [Cut; 15] = [
    Cut::new(At::Hello, How::Reset, Target::Page),
    Cut::new(At::Hello, How::Close, Target::Control),
    Cut::new(At::First, How::Reset, Target::Control),
    Cut::new(At::First, How::Close, Target::Page),
    Cut::new(At::Bytes, How::Reset, Target::Page),
    Cut::new(At::Bytes, How::SourceReset, Target::Page),
    Cut::new(At::Bytes, How::Blackhole, Target::Page),
    Cut::new(At::Bytes, How::KillDestination, Target::Page),
    Cut::new(At::Delay, How::KillDestination, Target::Control),
    Cut::new(At::Delay, How::Reset, Target::Any),
    Cut::new(At::End, How::Reset, Target::Control),
    Cut::new(At::Ack, How::Close, Target::Control),
    Cut::new(At::Confirm, How::Reset, Target::Control),
    Cut::new(At::Verify, How::Close, Target::Control),
    Cut::new(At::Verdict, How::Reset, Target::Control),
];

impl Cut {
    const fn new(at: At, how: How, target: Target) -> Cut {
        Cut { at, how, target }
    }

    fn name(self) -> String {
        let target = match self.target {
            Target::Control => "ctl",
            Target::Page => "page",
            Target::Any => "any",
        };
        match self.how {
            How::KillDestination => format!("kill-dst@{}", self.at.name()),
            how => format!("{}:{target}@{}", how.name(), self.at.name()),
        }
    }
}

/// The steps `vmm run --fail-at` can break, in migration order (see `vmm run --help`, Testing).
const INJECT_STEPS: [&str; 9] = [
    "sync",
    "clear",
    "read",
    "send",
    "drain",
    "pause",
    "save-state",
    "ack",
    "confirm",
];

/// One kind of fault case: a link cut by the proxy, or a failure injected into a step of the
/// source (`vmm run --fail-at STEP@N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Cut(Cut),
    Inject(&'static str),
    /// A loss made on purpose (`--fault`): it must be caught, or repaired by the destination.
    Loss(Loss),
    /// A postcopy cut after its commit (`vmm run --postcopy --fail-at STEP@N`, a `postcopy-*`
    /// step), both sides allowed to recover: the postcopy must resume on a new session and verify.
    Postcopy(&'static str),
}

/// The postcopy steps `vmm run --fail-at` can break: a write after the commit (a page pushed or
/// asked for) and a read of the destination's requests.
const POSTCOPY_STEPS: [&str; 2] = ["postcopy-send", "postcopy-request"];

impl Fault {
    /// Every case kind: the cuts, the injection points, then the losses.
    fn all() -> Vec<Fault> {
        CUTS.iter()
            .map(|c| Fault::Cut(*c))
            .chain(INJECT_STEPS.iter().map(|s| Fault::Inject(s)))
            .chain(Loss::ALL.iter().map(|l| Fault::Loss(*l)))
            .chain(POSTCOPY_STEPS.iter().map(|s| Fault::Postcopy(s)))
            .collect()
    }

    fn name(self) -> String {
        match self {
            Fault::Cut(c) => c.name(),
            Fault::Inject(step) => format!("fail@{step}"),
            Fault::Loss(l) => l.name().to_string(),
            Fault::Postcopy(step) => format!("fail@{step}"),
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
            Fault::Postcopy("postcopy-send") => 200,
            Fault::Postcopy(_) => 8,
        }
    }

    /// Which call of the step try `attempt` (0..4) fails: at random below [`Self::max_call`],
    /// a quarter of it at each retry; the last try fails the first call, which happens in every
    /// migration.
    fn call_number(self, attempt: u32, rng: &mut Rng) -> u64 {
        if attempt == 3 {
            1
        } else {
            rng.range(1, (self.max_call() >> (2 * attempt)).max(1))
        }
    }

    /// The page channels of the case's source: the default session mostly, a version-1 stream
    /// and four channels in turn (by case number and seed), a session where the step needs one.
    fn channels(self, case: u32, seed: u64) -> Option<u32> {
        const MIX: [Option<u32>; 5] = [None, Some(0), None, Some(4), None];
        let pick = MIX[((u64::from(case) + seed) % MIX.len() as u64) as usize];
        match self {
            Fault::Cut(c) if c.at.session_only() && pick == Some(0) => None,
            // Only a session drains, and only a session has a postcopy.
            Fault::Inject("drain") | Fault::Postcopy(_) if pick == Some(0) => None,
            _ => pick,
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

/// `cargo xtask faults [--count N] [--seed S] [--only I] [--no-retry]`.
pub fn faults(args: &[String]) -> Result<(), String> {
    let no_retry = args.iter().any(|a| a == "--no-retry");
    let args: Vec<String> = args
        .iter()
        .filter(|a| *a != "--no-retry")
        .cloned()
        .collect();
    check_opts(&args, &["--count", "--seed", "--only"])?;
    let only: Option<u32> = opt_value(&args, "--only")?;
    let count: u32 = opt_value(&args, "--count")?.unwrap_or(50);
    let seed: u64 = opt_value(&args, "--seed")?.unwrap_or_else(Rng::clock_seed);
    if let Err(e) = kvm_usable() {
        if crate::harness::is_ci() && std::path::Path::new("/dev/kvm").exists() {
            return Err(format!("faults: {e} (CI=true)"));
        }
        println!("faults: SKIPPED: {e}");
        return Ok(());
    }
    let vmm = build_vmm()?;
    let cases = Fault::all();
    println!(
        "\n==> xtask faults: {count} cases of {} kinds, seed {seed} (rerun with --seed {seed}){}",
        cases.len(),
        if no_retry {
            "; --no-retry: every cut and injection must be reported FAIL"
        } else {
            ""
        }
    );
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let start = Instant::now();
    for i in 0..count {
        let kind = cases[(i as usize) % cases.len()];
        let shape = Shape::random(&mut rng, 256 * MIB, 1024 * MIB, 75)
            .with_channels(kind.channels(i, seed));
        let case_seed = rng.next_u64();
        if only.is_some_and(|o| o != i + 1) {
            continue;
        }
        let t = Instant::now();
        let r = run_kind(&vmm, kind, &shape, case_seed, no_retry, &mut tally);
        println!(
            "  {:>3} {:<20} {:<52} {:>5.1}s {} {}",
            i + 1,
            kind.name(),
            shape.describe(),
            t.elapsed().as_secs_f64(),
            if r.ok { "ok  " } else { "FAIL" },
            r.note
        );
        tally.rows.push((kind, r));
    }
    summary(&cases, &tally, seed, start.elapsed())
}

/// Run one case, trying an earlier fault point when the first migration ended before the fault.
fn run_kind(
    vmm: &std::path::Path,
    kind: Fault,
    shape: &Shape,
    case_seed: u64,
    no_retry: bool,
    tally: &mut Tally,
) -> CaseResult {
    let mut case_rng = Rng::new(case_seed);
    let mut r = CaseResult::default();
    for attempt in 0..4 {
        let result = match kind {
            Fault::Cut(cut) => run_cut(vmm, cut, shape, &mut case_rng, 1u64 << attempt, no_retry),
            Fault::Inject(step) => {
                let nth = kind.call_number(attempt, &mut case_rng);
                run_inject_case(vmm, step, nth, shape, no_retry)
            }
            Fault::Loss(loss) => run_loss_case(vmm, loss, shape, &mut tally.undetected),
            Fault::Postcopy(step) => {
                let nth = kind.call_number(attempt, &mut case_rng);
                run_postcopy_case(vmm, step, nth, shape, no_retry)
            }
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
    r
}

/// Print the summary table and decide the run.
fn summary(cases: &[Fault], tally: &Tally, seed: u64, took: Duration) -> Result<(), String> {
    let left = leftover_children();
    println!(
        "\n==> xtask faults summary (seed {seed}, {:.0} s)",
        took.as_secs_f64()
    );
    tally.print(cases);
    println!(
        "  (fault points past the end of a stream or channel, retried with an earlier point: {})\n  losses not caught while a side said verified: {} (must be 0)\n  stray child processes after the run: {}",
        tally.missed,
        tally.undetected,
        left.len()
    );
    tally.verdict(left.len())
}

/// The bookkeeping of a faults run: every case's result, the fault points that missed, the losses
/// no side caught.
#[derive(Debug, Default)]
struct Tally {
    rows: Vec<(Fault, CaseResult)>,
    /// Cut points past the end of a stream (or of a channel), retried with an earlier point.
    missed: u32,
    /// Loss cases whose destination differed from the source while a side said `verified`.
    undetected: u32,
}

/// The columns of the summary, in the order of [`Tally::counts`]; each as wide as its name.
const TALLY_COLUMNS: [&str; 10] = [
    "tried",
    "fault made",
    "src error",
    "survived",
    "logging off",
    "retry ok",
    "before boot",
    "after commit",
    "wrongly resumed",
    "handled",
];

impl Tally {
    /// The counts of the cases of `kind` (all cases: `None`), by [`TALLY_COLUMNS`].
    fn counts(&self, kind: Option<Fault>) -> [u32; 10] {
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
            c(|r| r.before_boot),
            c(|r| r.after_commit),
            c(|r| r.wrongly_resumed),
            c(|r| r.ok),
        ]
    }

    /// One row per fault kind tried, and the total.
    fn print(&self, kinds: &[Fault]) {
        println!("  {:<20} {}", "fault", TALLY_COLUMNS.join(" "));
        for kind in kinds.iter().copied().map(Some).chain([None]) {
            let row = self.counts(kind);
            if row[0] == 0 {
                continue;
            }
            let cells: Vec<String> = row
                .iter()
                .zip(TALLY_COLUMNS)
                .map(|(n, h)| format!("{n:>w$}", w = h.len()))
                .collect();
            println!(
                "  {:<20} {}",
                kind.map_or("TOTAL".to_string(), Fault::name),
                cells.join(" ")
            );
        }
    }

    /// Every fault made and handled, no destination wrongly resumed, no loss missed, no stray
    /// process (`stray` of them left).
    fn verdict(&self, stray: usize) -> Result<(), String> {
        let [tried, cut, reported, survived, logging_off, verified, before_boot, after_commit, wrong, ok] =
            self.counts(None);
        if tried == cut && tried == ok && wrong == 0 && self.undetected == 0 && stray == 0 {
            println!("faults: all {tried} faults handled");
            return Ok(());
        }
        Err(format!(
            "faults: {tried} cases: {cut} faults made, {ok} handled ({reported} reported, {survived} survived, {logging_off} stopped logging, {verified} retries verified, {before_boot} before boot, {after_commit} after the commit), {wrong} destinations wrongly resumed, {} undetected losses, {stray} stray processes",
            self.undetected
        ))
    }
}

/// The connection a cut case cuts, among the source's.
fn pick_conn(target: Target, channels: u32, rng: &mut Rng) -> usize {
    match (target, channels) {
        (_, 0) | (Target::Control, _) => 0,
        (Target::Page, n) => rng.range(1, u64::from(n)) as usize,
        (Target::Any, n) => rng.range(0, u64::from(n)) as usize,
    }
}

/// The proxy's step for a cut at `at`, with its random point: bytes uniform in the expected
/// length of the connection's stream, a delay uniform in the expected migration time (each
/// divided by `divide` after a miss).
fn plan_step(at: At, shape: &Shape, channels: u32, rng: &mut Rng, divide: u64) -> Step {
    let expected_bytes = expected_stream_bytes(shape);
    match at {
        At::Hello => Step::Hello,
        At::First => Step::First,
        At::Bytes => {
            let share = expected_bytes / u64::from(channels.max(1));
            Step::Bytes(rng.range(64 << 10, (share / divide).max(128 << 10)))
        }
        At::Delay => {
            let expected = Duration::from_secs_f64(expected_bytes as f64 / shape.bandwidth as f64);
            Step::Delay(expected.mul_f64(rng.range(0, 100) as f64 / 100.0 / divide as f64))
        }
        At::End => Step::End,
        At::Ack => Step::Ack,
        At::Confirm => Step::Confirm,
        At::Verify => Step::Verify,
        At::Verdict => Step::Verdict,
    }
}

/// Which connection was cut, for the report: `ctl` (the control channel), `stream` (a version-1
/// stream), `pageK/N` (connection K, the library's page channel K-1 of N).
fn conn_label(conn: usize, channels: u32) -> String {
    match (conn, channels) {
        (0, 0) => "stream".into(),
        (0, _) => "ctl".into(),
        (k, n) => format!("page{k}/{n}"),
    }
}

/// A case's two destinations: A (`--io-timeout 10s`, so a silent link fails it soon), where the
/// first migration goes, and B, where the retry goes.
struct Destinations {
    a: Proc,
    b: Proc,
    uri_a: String,
    uri_b: String,
}

impl Destinations {
    fn start(vmm: &std::path::Path) -> Result<Destinations, String> {
        Destinations::start_with(vmm, &[])
    }

    /// [`Destinations::start`] with `a_extra` arguments for A.
    fn start_with(vmm: &std::path::Path, a_extra: &[&str]) -> Result<Destinations, String> {
        let mut a = incoming_cmd(vmm, &[], "127.0.0.1");
        a.arg("--io-timeout=10s").args(a_extra);
        let mut a = Proc::spawn("incoming A", a)?;
        let mut b = Proc::spawn("incoming B", incoming_cmd(vmm, &[], "127.0.0.1"))?;
        let (uri_a, uri_b) = (a.listen_uri()?, b.listen_uri()?);
        Ok(Destinations { a, b, uri_a, uri_b })
    }

    /// `--retry-to B` unless `no_retry`.
    fn retry(&self, no_retry: bool) -> Option<&str> {
        (!no_retry).then_some(self.uri_b.as_str())
    }

    /// What the judge looks at, with the case's source.
    fn judged<'a>(
        &'a mut self,
        src: &'a mut Proc,
        src_status: Result<std::process::ExitStatus, String>,
        shape: &'a Shape,
    ) -> Judged<'a> {
        Judged {
            src,
            src_status,
            dst_a: &mut self.a,
            dst_b: &mut self.b,
            uri_b: &self.uri_b,
            shape,
        }
    }
}

fn run_cut(
    vmm: &std::path::Path,
    cut: Cut,
    shape: &Shape,
    rng: &mut Rng,
    divide: u64,
    no_retry: bool,
) -> Result<CaseResult, String> {
    let mut dst = Destinations::start(vmm)?;
    let addr_a: SocketAddr = dst
        .uri_a
        .trim_start_matches("tcp:")
        .parse()
        .map_err(|e| format!("{}: {e}", dst.uri_a))?;
    let channels = shape.channels.unwrap_or(DEFAULT_CHANNELS);
    // Page channel 0 carries the first window of RAM, where the guest writes; another may carry
    // only zero ranges: after a miss, cut channel 0.
    let conn = match cut.target {
        Target::Page if divide > 1 && channels > 0 => 1,
        t => pick_conn(t, channels, rng),
    };
    let step = plan_step(cut.at, shape, channels, rng, divide);
    let plan = Plan {
        step,
        how: cut.how,
        conn,
        session: channels > 0,
        dest_pid: dst.a.pid(),
    };
    let proxy = Proxy::start(addr_a, plan)?;
    let to = format!("tcp:{}", proxy.addr);
    let (mut src, src_status) = run_source(vmm, shape, &to, dst.retry(no_retry), &[])?;
    let report = proxy.finish();
    let head = format!(
        "{} {}@{} of {} conns",
        conn_label(conn, channels),
        cut.how.name(),
        match step {
            Step::Bytes(_) => format!("{}K", report.forwarded >> 10),
            Step::Delay(d) => format!("{}ms", d.as_millis()),
            _ => cut.at.name().to_string(),
        },
        report.connections
    );
    // The first migration finished before the proxy struck, or the cut went unnoticed (a page
    // channel cut after its end): no fault. Try again with an earlier point.
    let first_migration_ok =
        matches!(&src_status, Ok(s) if s.success()) && jstr(&src.json(), "first_error").is_none();
    if !report.cut || first_migration_ok {
        return Ok(CaseResult {
            note: format!(
                "no fault ({head}: {})",
                if report.cut {
                    "unnoticed"
                } else {
                    "never reached"
                }
            ),
            ..CaseResult::default()
        });
    }
    let to_a = dst.uri_a.clone();
    let judged = dst.judged(&mut src, src_status, shape);
    if cut.at.expect() == Expect::BeforeBoot {
        return judge_before_boot(judged, || run_source(vmm, shape, &to_a, None, &[]), head);
    }
    Ok(judge(judged, cut.at.expect(), report.error, head))
}

/// Run the case's source to its end: migrate to `to`, retry to `retry`, with an optional extra
/// argument (`--fail-at`).
fn run_source(
    vmm: &std::path::Path,
    shape: &Shape,
    to: &str,
    retry: Option<&str>,
    extra: &[&str],
) -> Result<(Proc, Result<std::process::ExitStatus, String>), String> {
    let mut cmd = std::process::Command::new(vmm);
    cmd.args(shape.run_args()).args([
        format!("--migrate-to={to}"),
        "--warmup=300ms".into(),
        "--max-time=60s".into(),
        "--io-timeout=5s".into(),
        "--ram-fingerprint".into(),
        "--json".into(),
    ]);
    cmd.args(retry.map(|r| format!("--retry-to={r}")));
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
    no_retry: bool,
) -> Result<CaseResult, String> {
    let mut dst = Destinations::start(vmm)?;
    let fail_at = format!("--fail-at={step}@{nth}");
    let (mut src, src_status) =
        run_source(vmm, shape, &dst.uri_a, dst.retry(no_retry), &[&fail_at])?;
    let injected = src
        .stderr()
        .contains(&format!("injected fault ({step}@{nth})"))
        || jstr(&src.json(), "first_error").is_some_and(|e| e.contains("injected fault"));
    if !injected {
        // Call `nth` of the step never came: the first migration completed (A resumed
        // legitimately). Nothing to judge.
        return Ok(CaseResult {
            note: format!("no fault ({step} call {nth} never happened)"),
            ..CaseResult::default()
        });
    }
    // A page read can be the verification's, after the commit.
    let expect = if step == "read" {
        Expect::Either
    } else {
        Expect::BeforeCommit
    };
    Ok(judge(
        dst.judged(&mut src, src_status, shape),
        expect,
        None,
        format!("{step}@{nth}"),
    ))
}

/// A postcopy cut after its commit (`--postcopy --fail-at STEP@N`), both sides with
/// `--postcopy-recover-timeout`: the source must keep its guest paused and resume the postcopy on
/// a new session to A, and both must verify (the "retry ok" column counts these recoveries). A cut
/// that comes after the last page arrived (in the verification) is not a postcopy's to recover:
/// then the source must keep its guest paused (exit 1) and A either verified or said it could not.
/// B must never get a migration (the source does not retry elsewhere after the commit).
fn run_postcopy_case(
    vmm: &std::path::Path,
    step: &str,
    nth: u64,
    shape: &Shape,
    no_retry: bool,
) -> Result<CaseResult, String> {
    let recover = "--postcopy-recover-timeout=30s";
    let mut dst = Destinations::start_with(vmm, &[recover])?;
    let fail_at = format!("--fail-at={step}@{nth}");
    // A 1 µs downtime limit: precopy fits only when nothing is left, so the switch comes.
    let shape = Shape {
        downtime_ms: 0,
        ..shape.clone()
    };
    let (src, src_status) = run_source(
        vmm,
        &shape,
        &dst.uri_a,
        dst.retry(no_retry),
        // The switch is logged: a precopy that ended first makes no postcopy fault.
        &[
            "--postcopy",
            &fail_at,
            recover,
            "--log=warn,clearlog_migration::source::postcopy=info",
        ],
    )?;
    let switched = src.stderr().contains("postcopy committed");
    if !switched
        || !src
            .stderr()
            .contains(&format!("injected fault ({step}@{nth})"))
    {
        return Ok(CaseResult {
            note: format!("no fault ({step} call {nth} never happened, or no postcopy)"),
            ..CaseResult::default()
        });
    }
    let a_status = dst.a.wait_timeout(Duration::from_secs(90));
    let code =
        |s: &Result<std::process::ExitStatus, String>| s.as_ref().ok().and_then(|s| s.code());
    let (src_code, a_code) = (code(&src_status), code(&a_status));
    let verified = |p: &Proc| jbool(&p.json(), "verified") == Some(true);
    let recovered = src_code == Some(0)
        && a_code == Some(0)
        && verified(&src)
        && verified(&dst.a)
        && ju64(&src.json(), "postcopy_recoveries") == Some(1);
    // Cut in the verification, after the postcopy ended: the source keeps its guest paused.
    let late = src_code == Some(1)
        && src.stderr().contains("stays paused")
        && matches!(a_code, Some(0 | 1));
    // After the commit the source must never migrate its guest anywhere else.
    let b_used = dst.b.stderr().contains("accepted a session")
        || !dst.b.running()
        || src.stderr().contains("retrying to")
        || ju64(&src.json(), "attempts").is_some_and(|n| n > 1);
    dst.b.kill();
    let ok = (recovered || late) && !b_used;
    // For a failure's post-mortem: both sides' output.
    if let Some(dir) = std::env::var("XTASK_FAULTS_DUMP").ok().filter(|_| !ok) {
        let _ = std::fs::write(format!("{dir}/src.txt"), src.stderr() + &src.stdout());
        let _ = std::fs::write(format!("{dir}/a.txt"), dst.a.stderr() + &dst.a.stdout());
    }
    Ok(CaseResult {
        cut: true,
        source_reported: true,
        after_commit: true,
        a_resumed: true,
        retry_verified: recovered,
        ok,
        note: match (ok, recovered) {
            (true, true) => "postcopy resumed on a new session, verified on both sides".into(),
            (true, false) => {
                "cut after the last page: verification incomplete, source paused".into()
            }
            (false, _) => format!(
                "source {src_code:?} A {a_code:?} B used {b_used}: {} / {}",
                src.error_line().unwrap_or_default(),
                dst.a.error_line().unwrap_or_default()
            ),
        },
        ..CaseResult::default()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_is_cut_and_every_way_of_cutting_is_used() {
        for at in [
            At::Hello,
            At::First,
            At::Bytes,
            At::Delay,
            At::End,
            At::Ack,
            At::Confirm,
            At::Verify,
            At::Verdict,
        ] {
            assert!(CUTS.iter().any(|c| c.at == at), "{at:?}");
        }
        for how in [
            How::Reset,
            How::Close,
            How::SourceReset,
            How::Blackhole,
            How::KillDestination,
        ] {
            assert!(CUTS.iter().any(|c| c.how == how), "{how:?}");
        }
        assert!(CUTS.iter().any(|c| c.target == Target::Page));
    }

    #[test]
    fn channel_counts_vary_and_session_steps_get_a_session() {
        let all = Fault::all();
        let picked: Vec<Option<u32>> = (0..all.len() as u32)
            .map(|i| all[i as usize].channels(i, 19))
            .collect();
        for want in [None, Some(0), Some(4)] {
            assert!(picked.contains(&want), "{want:?} in {picked:?}");
        }
        let hello = Fault::Cut(CUTS[0]);
        assert!((0..10).all(|i| hello.channels(i, 0) != Some(0)));
    }

    #[test]
    fn ci_runs_every_case_kind() {
        let ci = std::fs::read_to_string(crate::workspace_root().join(".ci/run")).unwrap();
        let count: usize = ci
            .split("cargo xtask faults --count ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .expect(".ci/run runs `cargo xtask faults --count N`");
        assert!(
            count >= Fault::all().len(),
            "{count} < {}",
            Fault::all().len()
        );
    }

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
        let (reset, close) = (Fault::Cut(CUTS[2]), Fault::Cut(CUTS[3]));
        let mut t = Tally::default();
        t.rows.push((reset, handled));
        t.rows.push((
            close,
            CaseResult {
                cut: true,
                after_commit: true,
                ok: true,
                ..CaseResult::default()
            },
        ));
        assert_eq!(t.counts(None), [2, 2, 1, 1, 1, 1, 0, 1, 0, 2]);
        assert_eq!(t.counts(Some(reset))[0], 1);
        assert_eq!(t.counts(Some(Fault::Cut(CUTS[0])))[0], 0);
        t.verdict(0).unwrap();
        t.verdict(1).expect_err("a stray process fails the run");
        t.undetected = 1;
        t.verdict(0)
            .expect_err("a loss no side caught fails the run");
        t.undetected = 0;
        t.rows.push((Fault::Inject("sync"), CaseResult::default()));
        t.verdict(0).expect_err("a fault not made fails the run");
    }

    #[test]
    fn a_version_1_stream_is_always_connection_0() {
        let mut rng = Rng::new(1);
        for target in [Target::Control, Target::Page, Target::Any] {
            assert_eq!(pick_conn(target, 0, &mut rng), 0);
        }
        for _ in 0..50 {
            let k = pick_conn(Target::Page, 4, &mut rng);
            assert!((1..=4).contains(&k));
        }
    }
}
