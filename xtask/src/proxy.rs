// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fault-injecting TCP proxy of `cargo xtask faults`.
//!
//! It forwards every connection a source opens to the destination (a version-1 stream is one
//! connection; a session is its control channel, then its page channels, in the order the source
//! opens them: connection 0 is the control channel, connection k page channel k-1), and cuts one
//! of them at one step of the migration ([`Plan`]). A step is found by counting bytes on each
//! direction of a connection: the fixed-size messages of `migration/src/wire.rs` (the 48-byte
//! hello, its 16-byte reply, the 8-byte drain answers, acknowledgement and confirmation) and the
//! header's length tell where each step starts, so a cut lands exactly before the message it
//! names. A session drains before it switches over: the destination's 8-byte `Drained` answers
//! (`b"DRND"`) come down the control channel before the acknowledgement, so the proxy counts them
//! to place the acknowledgement, and the state and end marker are the first bytes up after the
//! last of them. Plaintext only: under TLS the byte counts are the records', not the messages'.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `wire::Hello::LEN`: the first bytes of every session connection.
const HELLO: u64 = 48;
/// `wire::HelloReply`: the destination's answer to a hello.
const HELLO_REPLY: u64 = 16;
/// `wire::Ack` and `wire::Drained` (destination to source) and `wire::Confirm` (source to
/// destination).
const ACK: u64 = 8;
/// The first bytes of `wire::Drained`.
const DRAINED_MAGIC: &[u8; 4] = b"DRND";
/// How long a pump's read waits before it looks at the stop flags again.
const POLL: Duration = Duration::from_millis(50);
/// The most header bytes the proxy keeps to find the header's length.
const HEAD_KEEP: usize = 64 << 10;

/// Where in the migration the proxy cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Before the destination's answer to the connection's hello reaches the source (a session
    /// only: the source has not booted its guest yet).
    Hello,
    /// At the connection's first byte after the handshake: the control channel's header, a page
    /// channel's first record (a version-1 stream: its header).
    First,
    /// After this many bytes of the connection past the handshake.
    Bytes(u64),
    /// This long after the migration's first byte (the header).
    Delay(Duration),
    /// Control channel: at the state and end marker, the first bytes up after the destination's
    /// last drain answer (a session only: a version-1 stream's end is not found without decoding
    /// every record).
    End,
    /// Control channel: before the destination's acknowledgement reaches the source.
    Ack,
    /// Control channel: before the source's confirmation reaches the destination (the source has
    /// committed; the destination must not resume).
    Confirm,
    /// Control channel: before the first byte of the source's final digests (the destination has
    /// the confirmation and resumed).
    Verify,
    /// Control channel: before the destination's verdict reaches the source.
    Verdict,
}

/// How the proxy breaks the connection it cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Reset both sides of the connection (SO_LINGER 0).
    Reset,
    /// Close both sides (FIN).
    Close,
    /// Reset the source's side only; the destination's stays open and silent until the case ends.
    SourceReset,
    /// Stop forwarding with both sides open: the link goes silent.
    Blackhole,
    /// `kill -9` the destination process and keep forwarding (a host crash seen through a live
    /// network).
    KillDestination,
}

impl How {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            How::Reset => "reset",
            How::Close => "close",
            How::SourceReset => "src-reset",
            How::Blackhole => "blackhole",
            How::KillDestination => "kill-dst",
        }
    }
}

/// What the proxy does.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// When.
    pub step: Step,
    /// How.
    pub how: How,
    /// Which connection (0: the control channel or the version-1 stream; k: page channel k-1).
    pub conn: usize,
    /// The source opens a session (hellos) rather than one version-1 stream.
    pub session: bool,
    /// The destination's process, for [`How::KillDestination`].
    pub dest_pid: u32,
}

/// Direction of a byte on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Source to destination.
    Up,
    /// Destination to source.
    Down,
}

/// What the proxy saw of the control channel, to place the steps that depend on it.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// Length of the control channel's header, once it arrived whole.
    header_len: Option<u64>,
    /// Control channel: drain answers that came down (each before the acknowledgement).
    drains: u64,
    /// Control channel bytes sent up when the latest drain answer had gone down whole.
    up_at_drained: Option<u64>,
    /// Drain answers `up_at_drained` accounts for.
    drains_noted: u64,
    /// Control channel bytes sent up when the acknowledgement had gone down whole.
    up_at_ack: Option<u64>,
}

impl Plan {
    fn handshake(&self, dir: Dir) -> u64 {
        match (self.session, dir) {
            (false, _) => 0,
            (true, Dir::Up) => HELLO,
            (true, Dir::Down) => HELLO_REPLY,
        }
    }

    /// Where the cut falls: the offset, in `dir`'s bytes of connection `conn`, before which the
    /// proxy stops (once a byte at that offset arrived). `None`: not on this direction, or not
    /// known yet.
    fn cut_offset(&self, conn: usize, dir: Dir, seen: Seen) -> Option<u64> {
        let on = |c: usize, d: Dir, at: Option<u64>| at.filter(|_| c == conn && d == dir);
        let up = self.handshake(Dir::Up);
        let down = self.handshake(Dir::Down);
        match self.step {
            Step::Hello => on(self.conn, Dir::Down, self.session.then_some(0)),
            Step::First => on(self.conn, Dir::Up, Some(up)),
            Step::Bytes(n) => on(self.conn, Dir::Up, Some(up + n)),
            Step::Delay(_) => None,
            Step::End => on(
                0,
                Dir::Up,
                seen.header_len
                    .filter(|_| self.session)
                    .and(seen.up_at_drained)
                    .map(|u| u.max(up)),
            ),
            Step::Ack => on(0, Dir::Down, Some(down + ACK * seen.drains)),
            Step::Confirm => on(0, Dir::Up, seen.up_at_ack),
            Step::Verify => on(0, Dir::Up, seen.up_at_ack.map(|u| u + ACK)),
            Step::Verdict => on(0, Dir::Down, Some(down + ACK * (seen.drains + 1))),
        }
    }
}

/// The length of a session header's fields (`Header::write_fields_to`: page size, flags, block
/// count, then each block's name length, name and size), once `fields` holds them all.
fn header_len(fields: &[u8]) -> Option<u64> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(fields.get(at..at + 4)?.try_into().ok()?))
    };
    let count = u32_at(8)?;
    let mut at = 12usize;
    for _ in 0..count {
        let name = u16::from_le_bytes(fields.get(at..at + 2)?.try_into().ok()?);
        at += 2 + usize::from(name) + 8;
        if at > fields.len() {
            return None;
        }
    }
    Some(at as u64)
}

/// What the proxy did.
#[derive(Debug, Clone, Default)]
pub struct ProxyReport {
    /// Connections the source opened through the proxy.
    pub connections: usize,
    /// Whether the cut happened (false: the step never came).
    pub cut: bool,
    /// Source-to-destination bytes of the cut connection forwarded before the cut.
    pub forwarded: u64,
    /// Problems of the proxy itself.
    pub error: Option<String>,
}

/// One forwarded connection.
#[derive(Debug)]
struct Link {
    /// Bytes forwarded up and down.
    up: AtomicU64,
    down: AtomicU64,
    /// Its pumps stop (cut, blackholed, or one side failed).
    stopped: AtomicBool,
    /// The sockets (source side, destination side) until the link is cut: the pumps hold their
    /// own references, so a cut socket closes once they have let go.
    sockets: Mutex<Option<(Arc<TcpStream>, Arc<TcpStream>)>>,
}

impl Link {
    fn counter(&self, dir: Dir) -> &AtomicU64 {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }
}

/// State shared by the proxy's threads.
#[derive(Debug)]
struct Shared {
    plan: Plan,
    links: Mutex<Vec<Arc<Link>>>,
    seen: Mutex<Seen>,
    /// When the migration's first byte (the header) went up.
    started: OnceLock<Instant>,
    fired: AtomicBool,
    /// Up bytes of the cut connection at the cut.
    forwarded: AtomicU64,
    /// Sockets a cut leaves open (silent) until the case ends.
    kept: Mutex<Vec<Arc<TcpStream>>>,
    stop: AtomicBool,
}

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

impl Shared {
    fn seen(&self) -> Seen {
        self.seen.lock().map(|s| *s).unwrap_or_default()
    }

    /// Carry out the plan on its connection (once).
    fn fire(&self) {
        if self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        let link = self
            .links
            .lock()
            .ok()
            .and_then(|l| l.get(self.plan.conn).cloned());
        let Some(link) = link else {
            return;
        };
        self.forwarded
            .store(link.up.load(Ordering::SeqCst), Ordering::SeqCst);
        if self.plan.how == How::KillDestination {
            kill9(self.plan.dest_pid);
            return;
        }
        link.stopped.store(true, Ordering::SeqCst);
        let Some((src, dst)) = link.sockets.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        match self.plan.how {
            How::Reset => {
                set_linger_zero(&src);
                set_linger_zero(&dst);
            }
            How::Close => {
                let _ = src.shutdown(Shutdown::Both);
                let _ = dst.shutdown(Shutdown::Both);
            }
            How::SourceReset => {
                set_linger_zero(&src);
                kept.push(dst);
            }
            How::Blackhole => kept.extend([src, dst]),
            How::KillDestination => {}
        }
    }

    /// Note the control channel's header length from its first bytes `head`.
    fn note_head(&self, head: &[u8]) {
        let hs = self.plan.handshake(Dir::Up) as usize;
        if let (true, Ok(mut seen)) = (self.plan.session, self.seen.lock()) {
            seen.header_len = seen
                .header_len
                .or_else(|| head.get(hs..).and_then(header_len));
        }
    }

    /// Count the drain answers among the control channel's down bytes `down` (all of them so
    /// far): the 8-byte messages after the handshake that start with `b"DRND"`, up to the first
    /// that does not (the acknowledgement). Called before the bytes are forwarded, so a cut at
    /// the acknowledgement finds it past every drain answer.
    fn note_down(&self, down: &[u8]) {
        if !self.plan.session {
            return;
        }
        let after = down
            .get(self.plan.handshake(Dir::Down) as usize..)
            .unwrap_or(&[]);
        let drains = after
            .chunks_exact(ACK as usize)
            .take_while(|m| m.starts_with(DRAINED_MAGIC))
            .count() as u64;
        if let Ok(mut seen) = self.seen.lock() {
            seen.drains = seen.drains.max(drains);
        }
    }

    /// Note, before the control channel's `dir` bytes reach `total`, when the migration started
    /// and where the source stood when a drain answer and the acknowledgement went down whole
    /// (before they are forwarded: the source answers them at once).
    fn note_progress(&self, dir: Dir, link: &Link, total: u64) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let answers = self.plan.handshake(Dir::Down) + ACK * seen.drains;
        match dir {
            Dir::Up if total > self.plan.handshake(Dir::Up) => {
                self.started.get_or_init(Instant::now);
            }
            Dir::Down if seen.drains > seen.drains_noted && total >= answers => {
                seen.up_at_drained = Some(link.up.load(Ordering::SeqCst));
                seen.drains_noted = seen.drains;
            }
            Dir::Down if total >= answers + ACK => {
                seen.up_at_ack
                    .get_or_insert_with(|| link.up.load(Ordering::SeqCst));
            }
            _ => {}
        }
    }
}

/// A TCP proxy that forwards every connection to one upstream and cuts one by a [`Plan`].
#[derive(Debug)]
pub struct Proxy {
    /// Where the source connects.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<ProxyReport>>,
}

impl Proxy {
    /// Listen on 127.0.0.1 (any port) and forward each connection to `upstream`.
    pub fn start(upstream: SocketAddr, plan: Plan) -> Result<Proxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("proxy: bind: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("proxy: local address: {e}"))?;
        let shared = Arc::new(Shared {
            plan,
            links: Mutex::new(Vec::new()),
            seen: Mutex::new(Seen::default()),
            started: OnceLock::new(),
            fired: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            kept: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || accept_loop(listener, upstream, &s));
        Ok(Proxy {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    /// Close everything and return what happened.
    pub fn finish(mut self) -> ProxyReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accept connections until the proxy stops, start a [`Step::Delay`] cut when it is due; then
/// stop every pump and report.
fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) -> ProxyReport {
    let mut report = ProxyReport::default();
    let mut pumps = Vec::new();
    if let Err(e) = listener.set_nonblocking(true) {
        report.error = Some(format!("proxy: {e}"));
        return report;
    }
    let first_deadline = Instant::now() + Duration::from_secs(120);
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((src, _)) => match open_link(src, upstream, shared) {
                Ok(mut p) => pumps.append(&mut p),
                Err(e) => report.error = Some(e),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                report.error = Some(format!("proxy: accept: {e}"));
                break;
            }
        }
        let delay_over = match (shared.plan.step, shared.started.get()) {
            (Step::Delay(d), Some(t)) => t.elapsed() >= d,
            _ => false,
        };
        if delay_over {
            shared.fire();
        }
        report.connections = shared.links.lock().map_or(0, |l| l.len());
        if report.connections == 0 && Instant::now() > first_deadline {
            report.error = Some("proxy: the source never connected".into());
            break;
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    for p in pumps {
        let _ = p.join();
    }
    if let Ok(mut kept) = shared.kept.lock() {
        kept.clear();
    }
    report.cut = shared.fired.load(Ordering::SeqCst);
    report.forwarded = shared.forwarded.load(Ordering::SeqCst);
    report
}

/// Connect `src` to the upstream and start its two pumps.
fn open_link(
    src: TcpStream,
    upstream: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let io = |e: std::io::Error| format!("proxy: {e}");
    src.set_nonblocking(false).map_err(io)?;
    let dst = TcpStream::connect_timeout(&upstream, Duration::from_secs(10)).map_err(io)?;
    for s in [&src, &dst] {
        s.set_nodelay(true).map_err(io)?;
        s.set_read_timeout(Some(POLL)).map_err(io)?;
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
    }
    let (src, dst) = (Arc::new(src), Arc::new(dst));
    let link = Arc::new(Link {
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        sockets: Mutex::new(Some((src.clone(), dst.clone()))),
    });
    let conn = {
        let mut links = shared.links.lock().map_err(|_| "proxy: poisoned")?;
        links.push(link.clone());
        links.len() - 1
    };
    let pump = |dir: Dir, from: Arc<TcpStream>, to: Arc<TcpStream>| {
        let (shared, link) = (shared.clone(), link.clone());
        std::thread::spawn(move || pump(conn, dir, &from, &to, &link, &shared))
    };
    Ok(vec![
        pump(Dir::Up, src.clone(), dst.clone()),
        pump(Dir::Down, dst, src),
    ])
}

/// Copy one direction of one connection until EOF, an error, a cut or the proxy's stop; stop at
/// the plan's cut offset and carry the cut out.
fn pump(conn: usize, dir: Dir, from: &TcpStream, to: &TcpStream, link: &Link, shared: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    let mut head = Vec::new();
    // The control channel's down bytes: a few fixed-size answers.
    let mut down = Vec::new();
    let mut from = from;
    loop {
        if shared.stop.load(Ordering::SeqCst) || link.stopped.load(Ordering::SeqCst) {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => {
                // Reset (a killed destination with unread data): the other side must see it too.
                let _ = to.shutdown(Shutdown::Both);
                link.stopped.store(true, Ordering::SeqCst);
                return;
            }
        };
        if conn == 0 && dir == Dir::Up && head.len() < HEAD_KEEP {
            head.extend_from_slice(&buf[..n.min(HEAD_KEEP - head.len())]);
            shared.note_head(&head);
        }
        if conn == 0 && dir == Dir::Down && down.len() < HEAD_KEEP {
            down.extend_from_slice(&buf[..n.min(HEAD_KEEP - down.len())]);
            shared.note_down(&down);
        }
        let pos = link.counter(dir).load(Ordering::SeqCst);
        let cut = (!shared.fired.load(Ordering::SeqCst))
            .then(|| shared.plan.cut_offset(conn, dir, shared.seen()))
            .flatten()
            .filter(|&at| at >= pos && at < pos + n as u64);
        let before = cut.map_or(n, |at| (at - pos) as usize);
        if conn == 0 {
            shared.note_progress(dir, link, pos + before as u64);
        }
        if !forward(to, &buf[..before], link, dir) {
            let _ = from.shutdown(Shutdown::Both);
            link.stopped.store(true, Ordering::SeqCst);
            return;
        }
        if cut.is_some() {
            shared.fire();
            if link.stopped.load(Ordering::SeqCst) {
                return;
            }
            // The cut was elsewhere (another connection, or a killed destination): go on.
            if conn == 0 {
                shared.note_progress(dir, link, pos + n as u64);
            }
            if !forward(to, &buf[before..n], link, dir) {
                let _ = from.shutdown(Shutdown::Both);
                link.stopped.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// Write `bytes` on and count them; false if the other side is gone or the link was stopped.
fn forward(mut to: &TcpStream, bytes: &[u8], link: &Link, dir: Dir) -> bool {
    if bytes.is_empty() {
        return true;
    }
    if link.stopped.load(Ordering::SeqCst) || to.write_all(bytes).is_err() {
        return false;
    }
    link.counter(dir)
        .fetch_add(bytes.len() as u64, Ordering::SeqCst);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(step: Step, conn: usize, session: bool) -> Plan {
        Plan {
            step,
            how: How::Reset,
            conn,
            session,
            dest_pid: 0,
        }
    }

    #[test]
    fn steps_fall_where_the_wire_format_puts_their_messages() {
        let none = Seen::default();
        let after_ack = Seen {
            header_len: Some(40),
            drains: 1,
            up_at_drained: Some(200),
            drains_noted: 1,
            up_at_ack: Some(1000),
        };
        let s = |step, conn| plan(step, conn, true);
        assert_eq!(s(Step::Hello, 2).cut_offset(2, Dir::Down, none), Some(0));
        assert_eq!(s(Step::Hello, 2).cut_offset(1, Dir::Down, none), None);
        assert_eq!(s(Step::First, 1).cut_offset(1, Dir::Up, none), Some(48));
        assert_eq!(
            s(Step::Bytes(100), 3).cut_offset(3, Dir::Up, none),
            Some(148)
        );
        assert_eq!(s(Step::End, 0).cut_offset(0, Dir::Up, none), None);
        // The state and end marker come up after the last drain answer went down.
        assert_eq!(s(Step::End, 0).cut_offset(0, Dir::Up, after_ack), Some(200));
        assert_eq!(s(Step::Ack, 0).cut_offset(0, Dir::Down, none), Some(16));
        assert_eq!(
            s(Step::Ack, 0).cut_offset(0, Dir::Down, after_ack),
            Some(24)
        );
        assert_eq!(
            s(Step::Verdict, 0).cut_offset(0, Dir::Down, after_ack),
            Some(32)
        );
        assert_eq!(s(Step::Confirm, 0).cut_offset(0, Dir::Up, none), None);
        assert_eq!(
            s(Step::Confirm, 0).cut_offset(0, Dir::Up, after_ack),
            Some(1000)
        );
        assert_eq!(
            s(Step::Verify, 0).cut_offset(0, Dir::Up, after_ack),
            Some(1008)
        );
        assert_eq!(s(Step::Verdict, 0).cut_offset(0, Dir::Down, none), Some(24));
        // A version-1 stream: no hello, no reply; its end is not found.
        let v1 = |step| plan(step, 0, false);
        assert_eq!(v1(Step::Hello).cut_offset(0, Dir::Down, none), None);
        assert_eq!(v1(Step::First).cut_offset(0, Dir::Up, none), Some(0));
        assert_eq!(v1(Step::Ack).cut_offset(0, Dir::Down, none), Some(0));
        assert_eq!(v1(Step::Verdict).cut_offset(0, Dir::Down, none), Some(8));
        assert_eq!(v1(Step::End).cut_offset(0, Dir::Up, after_ack), None);
    }

    #[test]
    fn header_length_needs_every_block() {
        let mut h = Vec::new();
        h.extend_from_slice(&4096u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&2u32.to_le_bytes());
        for name in ["ram", "rom0"] {
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(name.as_bytes());
            h.extend_from_slice(&(1u64 << 20).to_le_bytes());
        }
        let len = h.len();
        assert_eq!(header_len(&h), Some(len as u64));
        assert_eq!(header_len(&h[..len - 1]), None);
        h.extend_from_slice(b"state...");
        assert_eq!(header_len(&h), Some(len as u64));
    }

    /// An upstream that echoes each connection's bytes back, for the proxy tests.
    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Send `n` bytes on `s` and read back what the echo returns until EOF or an error.
    fn echo_through(s: &mut TcpStream, n: usize) -> (usize, Option<std::io::ErrorKind>) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&vec![7u8; n]);
        let mut got = 0;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (got, None),
                Ok(k) => {
                    got += k;
                    if got >= n {
                        return (got, None);
                    }
                }
                Err(e) => return (got, Some(e.kind())),
            }
        }
    }

    #[test]
    fn cuts_only_the_planned_connection_at_its_byte() {
        let upstream = echo_server();
        let proxy = Proxy::start(upstream, plan(Step::Bytes(1000), 1, false)).unwrap();
        let mut control = TcpStream::connect(proxy.addr).unwrap();
        let mut page = TcpStream::connect(proxy.addr).unwrap();
        // Connection order is the proxy's numbering: wait until both are linked.
        while proxy.shared.links.lock().unwrap().len() < 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (got, err) = echo_through(&mut page, 5000);
        assert_eq!(err, Some(std::io::ErrorKind::ConnectionReset), "{got}");
        assert!(got <= 1000, "{got} bytes came back through a cut at 1000");
        assert_eq!(echo_through(&mut control, 5000), (5000, None));
        let report = proxy.finish();
        assert!(report.cut);
        assert_eq!((report.connections, report.forwarded), (2, 1000));
    }

    #[test]
    fn a_step_that_never_comes_is_no_cut() {
        let upstream = echo_server();
        let proxy = Proxy::start(upstream, plan(Step::Verdict, 0, true)).unwrap();
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        // 20 bytes back: past the hello reply (16) but short of the verdict (24).
        assert_eq!(echo_through(&mut s, 20), (20, None));
        drop(s);
        let report = proxy.finish();
        assert!(!report.cut);
        assert_eq!(report.connections, 1);
    }
}
