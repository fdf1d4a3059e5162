// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A migration session (protocol version 2): one control channel and N page channels, each a
//! connection of its own.
//!
//! The control channel carries everything that is not pages, in both directions (the header, the
//! state, the end marker, the acknowledgement, the confirmation, the verification and its verdict:
//! the return path). Page channels carry page records and zero ranges, then a channel end. A page
//! always travels on the same channel (it is chosen by the page's window), so the destination,
//! applying each channel in order, never lets an older copy of a page overwrite a newer one.
//!
//! Setting up, the source sends a [`Hello`] on the control channel and waits for the
//! destination's [`HelloReply`], then opens the page channels the same way, then the engine sends
//! the header on the control channel. A destination waits for the first source that gets that far
//! (or for a version-1 stream, which it still reads): a connection that is not a clearlog source
//! (a port probe, a peer that says nothing, a TLS client on a plaintext listener, a second source
//! while one is joining) is refused, logged, and never ends the wait or touches guest memory.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::stream::{Header, StreamReader, MAGIC};
use crate::tls::{tls_client, tls_server, PeerIdentity, TlsClient, TlsServer};
use crate::transport::{guard_tcp, Listener, MigrationUri, TransportRead, DEFAULT_IO_TIMEOUT};
use crate::wire::{
    read_within, Hello, HelloReply, ReadFailure, HELLO_ACCEPTED, HELLO_BAD_CHANNEL, HELLO_BUSY,
    HELLO_NO_SESSION, HELLO_VERSION, KIND_CONTROL, KIND_PAGES,
};
use crate::{Error, Result, Transport, PAGE_SIZE};

/// Page channels a session opens by default (chosen by measurement: see docs/design.md, "A
/// session of channels" and "Channels and TLS, measured").
pub const DEFAULT_CHANNELS: u32 = 4;

/// How long each step of a session's setup may take: a hello's answer, a TLS handshake, the page
/// channels to join after the control channel (default of the `handshake_timeout` options).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a source sets up a session.
///
/// # Examples
///
/// ```
/// use clearlog_migration::SessionOptions;
///
/// let opts = SessionOptions::default().with_channels(4);
/// assert_eq!(opts.channels, 4);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Page channels (1 to [`crate::wire::MAX_CHANNELS`]; default [`DEFAULT_CHANNELS`]).
    pub channels: u32,
    /// TCP only: send timeout and `TCP_USER_TIMEOUT` of every connection (see
    /// [`Transport::tcp_with_timeout`]); zero turns the guard off.
    pub io_timeout: Duration,
    /// How long the destination may take to answer each hello, and each TLS handshake.
    pub handshake_timeout: Duration,
    /// TCP only: run every connection over mutual TLS with this configuration (see
    /// [`crate::tls`]). `None`: plaintext.
    pub tls: Option<TlsClient>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            channels: DEFAULT_CHANNELS,
            io_timeout: DEFAULT_IO_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            tls: None,
        }
    }
}

impl SessionOptions {
    /// With `channels` page channels.
    pub fn with_channels(mut self, channels: u32) -> Self {
        self.channels = channels;
        self
    }

    /// With this `io_timeout`.
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// With this `handshake_timeout`.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Over mutual TLS with `tls`.
    pub fn with_tls(mut self, tls: TlsClient) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// The connections of a session, on the source side: what [`crate::Source::migrate_session`]
/// migrates over.
///
/// # Examples
///
/// See [`open_session`].
pub struct Session {
    pub(crate) control: Transport,
    pub(crate) pages: Vec<Transport>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("page_channels", &self.pages.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Its page channels.
    ///
    /// # Examples
    ///
    /// See [`open_session`].
    pub fn page_channels(&self) -> usize {
        self.pages.len()
    }

    /// Wrap every connection of the session (the control channel first, then the page channels
    /// in order) with `f`: to count bytes, or to inject faults in tests. The handshake is done;
    /// what `f` returns carries the rest of the migration.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let session: clearlog_migration::Session = unimplemented!();
    /// let session = session.map(|t| t); // e.g. a wrapper that counts what is written
    /// ```
    pub fn map(self, mut f: impl FnMut(Transport) -> Transport) -> Session {
        Session {
            control: f(self.control),
            pages: self.pages.into_iter().map(f).collect(),
        }
    }
}

/// How a source opens the connections of a session: TCP and Unix sockets are built in
/// ([`connect_session`]); implement it for another kind (vsock, pre-connected descriptors).
///
/// # Examples
///
/// See [`open_session`].
pub trait ChannelConnector {
    /// Open one more connection to the destination (the first is the control channel).
    fn connect(&mut self) -> Result<Transport>;
}

/// Source side: open a session of `options.channels` page channels to `uri` (`tcp:` or `unix:`;
/// a `file:` snapshot is one version-1 stream: use [`crate::connect`]). With `options.tls`, each
/// TCP connection runs the TLS handshake before its hello.
///
/// # Errors
///
/// [`Error::InvalidUri`] (a `file:` URI too), [`Error::TlsNeedsTcp`] for TLS over a Unix socket,
/// [`Error::Io`]
/// if a connection fails, [`Error::Tls`] if a TLS handshake fails (either side refusing the
/// other's certificate, a peer not speaking TLS), and the handshake errors of [`open_session`].
///
/// # Examples
///
/// ```
/// use clearlog_migration::{connect_session, Listener, ListenOptions, SessionOptions};
///
/// let listener = Listener::bind("tcp:127.0.0.1:0").unwrap();
/// let uri = listener.local_uri().unwrap();
/// let source = std::thread::spawn(move || connect_session(&uri, &SessionOptions::default()));
/// // The destination waits until the header comes: the source's engine sends it. Here a test
/// // thread plays the destination's accept only until the channels joined.
/// # drop(listener);
/// # let _ = source;
/// ```
pub fn connect_session(uri: &str, options: &SessionOptions) -> Result<Session> {
    let uri = match uri.parse()? {
        MigrationUri::File(_) => {
            return Err(Error::InvalidUri {
                uri: uri.to_string(),
                reason: "a file is one version-1 stream, not a session (use connect)",
            })
        }
        MigrationUri::Unix(_) if options.tls.is_some() => {
            return Err(Error::TlsNeedsTcp(
                "a Unix socket is guarded by its file's permissions",
            ))
        }
        u => u,
    };
    let mut connector = UriConnector { uri, options };
    open_session(&mut connector, options)
}

/// Connects to a `tcp:` or `unix:` URI.
struct UriConnector<'a> {
    uri: MigrationUri,
    options: &'a SessionOptions,
}

impl ChannelConnector for UriConnector<'_> {
    fn connect(&mut self) -> Result<Transport> {
        match &self.uri {
            MigrationUri::Tcp(addr) => {
                let stream = TcpStream::connect(addr).map_err(Error::io("TCP connect"))?;
                let stream = guard_tcp(stream, self.options.io_timeout)?;
                match &self.options.tls {
                    Some(tls) => {
                        tls_client(stream, tls, self.options.handshake_timeout).map_err(Error::Tls)
                    }
                    None => Transport::tcp(stream),
                }
            }
            MigrationUri::Unix(path) => {
                Transport::unix(UnixStream::connect(path).map_err(Error::io("Unix connect"))?)
            }
            MigrationUri::File(_) => Err(Error::InvalidUri {
                uri: "file:".into(),
                reason: "a file is not a session",
            }),
        }
    }
}

/// Source side: open a session over connections from `connector`: the control channel (its hello
/// answered), then `options.channels` page channels (each answered).
///
/// # Errors
///
/// [`Error::Handshake`] (no answer within `options.handshake_timeout`, or not an answer: a
/// destination that speaks only version 1 closes the connection), [`Error::SessionVersion`],
/// [`Error::SessionRefused`], [`Error::TooLarge`] for more than [`crate::wire::MAX_CHANNELS`]
/// channels, [`Error::Malformed`] for none; the connector's errors.
///
/// # Examples
///
/// A connector of in-memory channels, and the destination side accepting from them:
///
/// ```
/// use clearlog_migration::*;
///
/// struct Pairs(std::sync::mpsc::Sender<Transport>);
/// impl ChannelConnector for Pairs {
///     fn connect(&mut self) -> Result<Transport> {
///         let (ours, theirs) = mem_channel();
///         self.0.send(theirs).unwrap();
///         Ok(ours)
///     }
/// }
/// let (tx, rx) = std::sync::mpsc::channel();
/// let source = std::thread::spawn(move || {
///     let opts = SessionOptions::default().with_channels(2);
///     let session = open_session(&mut Pairs(tx), &opts).unwrap();
///     assert_eq!(session.page_channels(), 2);
///     session
/// });
/// // Play the destination's side of the hellos by hand.
/// let mut accepted = Vec::new();
/// while accepted.len() < 3 {
///     let mut t = rx.recv().unwrap();
///     let mut hello = [0u8; wire::Hello::LEN];
///     std::io::Read::read_exact(t.reader.as_mut().unwrap(), &mut hello).unwrap();
///     wire::Hello::parse(&hello).unwrap();
///     wire::HelloReply::new(wire::HELLO_ACCEPTED).write_to(t.writer.as_mut().unwrap()).unwrap();
///     accepted.push(t);
/// }
/// source.join().unwrap();
/// ```
pub fn open_session(
    connector: &mut dyn ChannelConnector,
    options: &SessionOptions,
) -> Result<Session> {
    if options.channels == 0 {
        return Err(Error::Malformed(
            "page channel count (a session has at least one)",
        ));
    }
    if options.channels > crate::wire::MAX_CHANNELS {
        return Err(Error::TooLarge {
            what: "page channel count",
            value: options.channels.into(),
            limit: crate::wire::MAX_CHANNELS.into(),
        });
    }
    let id = random_id();
    let mut hello = |kind, channel| -> Result<Transport> {
        let mut t = connector.connect()?;
        let (Some(w), Some(r)) = (t.writer.as_mut(), t.reader.as_mut()) else {
            return Err(Error::Handshake(
                "a session connection needs both directions".into(),
            ));
        };
        Hello::new(kind, id, channel, options.channels)
            .write_to(w.as_mut())
            .map_err(Error::io("sending the hello"))?;
        HelloReply::read_expecting_accept(r.as_mut(), options.handshake_timeout)?;
        Ok(t)
    };
    let control = hello(KIND_CONTROL, 0)?;
    let mut pages = Vec::with_capacity(options.channels as usize);
    for channel in 0..options.channels {
        pages.push(hello(KIND_PAGES, channel)?);
    }
    Ok(Session { control, pages })
}

impl Listener {
    /// Bind (or open) `uri` as a destination that will accept with `options`: a TCP address other
    /// than loopback is refused without TLS (`options.tls`) unless `options.insecure_plaintext`
    /// says so (anyone who reaches the port could write the guest's memory). Unix sockets are
    /// local (their file's permissions say who may connect); files are read.
    ///
    /// # Errors
    ///
    /// [`Error::PlaintextRefused`]; [`Error::TlsNeedsTcp`] for TLS on a Unix socket or a file; those
    /// of [`bind`](Self::bind).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::{Error, Listener, ListenOptions};
    ///
    /// let opts = ListenOptions::default();
    /// assert!(Listener::bind_with("tcp:127.0.0.1:0", &opts).is_ok());
    /// assert!(matches!(
    ///     Listener::bind_with("tcp:0.0.0.0:0", &opts),
    ///     Err(Error::PlaintextRefused { .. })
    /// ));
    /// ```
    pub fn bind_with(uri: &str, options: &ListenOptions) -> Result<Self> {
        if options.tls.is_some() && !matches!(uri.parse()?, MigrationUri::Tcp(_)) {
            return Err(Error::TlsNeedsTcp("listen on a tcp: address"));
        }
        let listener = Self::bind(uri)?;
        if let Listener::Tcp(l) = &listener {
            let addr = l.local_addr().map_err(Error::io("TCP local address"))?;
            if !addr.ip().is_loopback() && options.tls.is_none() && !options.insecure_plaintext {
                return Err(Error::PlaintextRefused {
                    addr: addr.to_string(),
                });
            }
        }
        Ok(listener)
    }
}

/// 16 random bytes (the kernel's `getrandom`), or, if that fails, bytes from the clock and the
/// process id: a session or snapshot id only has to differ from the others it meets.
pub(crate) fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `id.len()` bytes into `id`, a live local buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id[..8].copy_from_slice(&(t as u64).to_le_bytes());
        id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}

/// How a destination accepts sessions.
///
/// # Examples
///
/// ```
/// let opts = clearlog_migration::ListenOptions::default();
/// assert!(!opts.insecure_plaintext && opts.tls.is_none());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ListenOptions {
    /// How long a connection may take to say what it is (its TLS handshake, then its hello or
    /// its version-1 header's first bytes), and a session's page channels to join after its
    /// control channel.
    pub handshake_timeout: Duration,
    /// Listen on a TCP address other than loopback without TLS. Off by default: anyone who
    /// reaches the port could write the guest's memory ([`Error::PlaintextRefused`]).
    pub insecure_plaintext: bool,
    /// TCP only: accept only connections that complete mutual TLS with this configuration (see
    /// [`crate::tls`]); every connection of a session must present the same identity. `None`:
    /// plaintext.
    pub tls: Option<TlsServer>,
    /// Give up waiting at this moment ([`Error::AcceptTimeout`]); `None` (the default): wait
    /// until a migration comes. A postcopy destination waiting for its source to come back uses
    /// it.
    pub accept_deadline: Option<Instant>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            insecure_plaintext: false,
            tls: None,
            accept_deadline: None,
        }
    }
}

impl ListenOptions {
    /// With this `handshake_timeout`.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Allow (or not) plaintext on an address other than loopback.
    pub fn with_insecure_plaintext(mut self, allow: bool) -> Self {
        self.insecure_plaintext = allow;
        self
    }

    /// Accept only mutual TLS with `tls`.
    pub fn with_tls(mut self, tls: TlsServer) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Give up waiting at `deadline`.
    pub fn with_accept_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.accept_deadline = deadline;
        self
    }
}

/// What a destination accepted: a version-1 stream (one connection, or a `file:` snapshot) or a
/// session. Either way its header is read (the source's RAM layout), so a destination can make
/// its RAM before receiving.
pub enum Incoming {
    /// A version-1 stream, the header not consumed (as [`crate::peek_header`] leaves it).
    Stream {
        /// The connection or the file.
        transport: Transport,
        /// Its header.
        header: Header,
    },
    /// A version-2 session whose control channel's header was read.
    Session(IncomingSession),
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Stream { header, .. } => f
                .debug_struct("Stream")
                .field("header", header)
                .finish_non_exhaustive(),
            Incoming::Session(s) => s.fmt(f),
        }
    }
}

impl Incoming {
    /// The source's header: RAM layout, page size, flags.
    pub fn header(&self) -> &Header {
        match self {
            Incoming::Stream { header, .. } => header,
            Incoming::Session(s) => &s.header,
        }
    }

    /// Set the read timeout of the connections that carry the stream (a stalled source then
    /// fails it): a version-1 stream's one connection, a session's page channels. A session's
    /// control channel is quiet while pages flow; a failed page channel shuts it down.
    ///
    /// # Errors
    ///
    /// The connections' own.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let all: Vec<&mut Transport> = match self {
            Incoming::Stream { transport, .. } => vec![transport],
            Incoming::Session(s) => s.pages.iter_mut().collect(),
        };
        for t in all {
            if let Some(r) = t.reader.as_mut() {
                r.set_read_timeout(timeout)?;
            }
        }
        Ok(())
    }

    /// Page channels (0 for a version-1 stream).
    pub fn page_channels(&self) -> usize {
        match self {
            Incoming::Stream { .. } => 0,
            Incoming::Session(s) => s.pages.len(),
        }
    }

    /// Who the source of a session is, as its TLS certificate says: `None` without TLS (and for
    /// a version-1 stream, whose identity is only logged).
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        match self {
            Incoming::Stream { .. } => None,
            Incoming::Session(s) => s.peer.as_ref(),
        }
    }
}

/// A session on the destination side, ready to receive ([`crate::Destination::receive_incoming`]).
pub struct IncomingSession {
    pub(crate) control: Transport,
    pub(crate) pages: Vec<Transport>,
    pub(crate) header: Header,
    /// Who the source is, as its TLS certificate says (`None` without TLS).
    pub(crate) peer: Option<PeerIdentity>,
    /// Shuts the control connection down: a failed page channel wakes the control channel's
    /// reader with it.
    pub(crate) control_cut: Option<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for IncomingSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingSession")
            .field("page_channels", &self.pages.len())
            .field("header", &self.header)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// One accepted connection, with its peer's name (for logs) and a way to cut it off (a reader
/// blocked on it returns) once the destination has no use for it.
#[allow(missing_debug_implementations)] // a closure inside
pub struct Accepted {
    /// The connection.
    pub transport: Transport,
    /// Who it is (an address, a path), for logs.
    pub peer: String,
    /// Shuts the connection down.
    pub shutdown: Box<dyn Fn() + Send + Sync>,
}

/// How a destination accepts connections: TCP and Unix listeners are built in
/// ([`Listener::accept_incoming`]); implement it for another kind.
pub trait ChannelAcceptor {
    /// A new connection if one is waiting, `None` if not (it must not block).
    fn poll_accept(&mut self) -> Result<Option<Accepted>>;
}

/// How many connections an accept keeps answering at once; further ones are closed at once (a
/// flood of idle connections must not exhaust threads or descriptors).
const MAX_PENDING_CONNECTIONS: usize = 16 + crate::wire::MAX_CHANNELS as usize;

/// How often an accept polls for new connections.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Connections being answered, by id: their peer's name and how to cut them off.
type Pending = HashMap<usize, (String, Box<dyn Fn() + Send + Sync>)>;

/// A connection as it arrives: ready to speak, or a socket still to set up (on the connection's
/// own thread: a stalled TLS handshake never holds up the accept loop, and a socket that fails
/// its setup is only refused).
enum Opening {
    Ready(Transport),
    Tcp(TcpStream, Option<TlsServer>),
    Unix(UnixStream),
}

impl Opening {
    /// The connection's transport, and its TLS identity if it runs TLS; a refusal says why not.
    fn open(
        self,
        timeout: Duration,
    ) -> std::result::Result<(Transport, Option<PeerIdentity>), String> {
        let err = |e: Error| crate::error::chain(&e);
        match self {
            Opening::Ready(t) => Ok((t, None)),
            Opening::Tcp(sock, None) => Ok((Transport::tcp(sock).map_err(err)?, None)),
            Opening::Tcp(sock, Some(tls)) => tls_server(sock, &tls, timeout)
                .map(|(t, who)| (t, Some(who)))
                .map_err(|e| format!("TLS: {}", crate::error::chain(&e))),
            Opening::Unix(sock) => Ok((Transport::unix(sock).map_err(err)?, None)),
        }
    }
}

/// A connection that arrived, with its peer's name and how to cut it off.
struct Arrival {
    opening: Opening,
    peer: String,
    shutdown: Box<dyn Fn() + Send + Sync>,
}

/// Where an accept gets its connections: a [`ChannelAcceptor`], or a listener of ours (which can
/// hand over raw TCP sockets for TLS).
trait Arrivals {
    /// A new connection if one is waiting, `None` if not (it must not block).
    fn poll(&mut self) -> Result<Option<Arrival>>;
}

impl Arrivals for &mut dyn ChannelAcceptor {
    fn poll(&mut self) -> Result<Option<Arrival>> {
        Ok(self.poll_accept()?.map(|a| Arrival {
            opening: Opening::Ready(a.transport),
            peer: a.peer,
            shutdown: a.shutdown,
        }))
    }
}

/// What a connection's thread found out about it.
enum Said {
    /// A whole version-1 header: this connection is the migration.
    Stream(Transport, Header),
    /// A hello, from this TLS identity: the accept loop decides through `answer`.
    Hello(Hello, Option<PeerIdentity>, mpsc::Sender<Answer>),
    /// An accepted control channel, and its session's header (or why it never came).
    Control(Transport, Result<Header>),
    /// An accepted page channel.
    Page(u32, Transport),
    /// Not a source, or it went away: logged, the wait goes on.
    Refused(String),
}

/// The accept loop's answer to a hello.
enum Answer {
    /// Accept it (the connection's thread answers, then reports).
    Accept,
    /// Refuse it with this [`HelloReply`] status.
    Refuse(u32),
}

/// The one session being set up.
struct Forming {
    id: [u8; 16],
    /// The TLS identity of its control channel: its page channels must present the same.
    peer: Option<PeerIdentity>,
    /// The connection id of its control channel.
    control_conn: usize,
    control: Option<(Transport, Header)>,
    pages: Vec<Option<Transport>>,
    /// Connection ids of its page channels (cut off if the session is dropped).
    page_conns: Vec<usize>,
    /// Its page channels must have joined by then.
    deadline: Instant,
}

impl Forming {
    fn complete(&self) -> bool {
        self.control.is_some() && self.pages.iter().all(Option::is_some)
    }
}

/// Accept the migration: poll `acceptor` and find out what each connection is on a thread of its
/// own; the first version-1 stream whose header arrived, or the first session whose control
/// channel and page channels all joined and whose header arrived, wins. Every other connection is
/// refused (with a [`HelloReply`] where it sent a hello) and logged, and the wait goes on: a port
/// probe, a peer that stays silent, a peer that sends something other than a clearlog stream, a
/// second session while one is joining, a page channel of an unknown session.
///
/// An acceptor's connections are already open: TLS ([`ListenOptions::tls`]) needs a listener
/// that hands over TCP sockets, [`Listener::accept_incoming`].
///
/// # Errors
///
/// Only the acceptor's own errors, and [`Error::TlsNeedsTcp`] if `options` asks for TLS: what
/// peers send never ends the wait.
pub fn accept_incoming(
    mut acceptor: &mut dyn ChannelAcceptor,
    options: &ListenOptions,
) -> Result<Incoming> {
    if options.tls.is_some() {
        return Err(Error::TlsNeedsTcp(
            "accept with Listener::accept_incoming (a ChannelAcceptor's connections are already open)",
        ));
    }
    accept_arrivals(&mut acceptor, options)
}

/// The forming session once its control channel and every page channel joined (their
/// connections are no longer pending).
fn take_complete(forming: &mut Option<Forming>, pending: &mut Pending) -> Option<IncomingSession> {
    let f = forming.take_if(|f| f.complete())?;
    let control_cut = pending.remove(&f.control_conn).map(|p| p.1);
    for c in &f.page_conns {
        pending.remove(c);
    }
    let (control, header) = f.control?;
    tracing::info!(
        page_channels = f.pages.len(),
        tls_names = ?f.peer.as_ref().map(|p| &p.dns_names),
        authorized_as = ?f.peer.as_ref().and_then(|p| p.authorized_as.as_ref()),
        "accepted a session"
    );
    Some(IncomingSession {
        control,
        pages: f.pages.into_iter().flatten().collect(),
        header,
        peer: f.peer,
        control_cut,
    })
}

/// [`accept_incoming`] from any source of connections.
fn accept_arrivals(arrivals: &mut dyn Arrivals, options: &ListenOptions) -> Result<Incoming> {
    let (tx, rx) = mpsc::channel::<(usize, Said)>();
    let mut pending: Pending = HashMap::new();
    let mut next = 0usize;
    let mut forming: Option<Forming> = None;
    let result = loop {
        match arrivals.poll() {
            Ok(Some(a)) => {
                if pending.len() >= MAX_PENDING_CONNECTIONS {
                    tracing::warn!(peer = %a.peer, "too many connections being answered: closing this one");
                    (a.shutdown)();
                    continue;
                }
                let id = next;
                next += 1;
                pending.insert(id, (a.peer, a.shutdown));
                let tx = tx.clone();
                let timeout = options.handshake_timeout;
                std::thread::spawn(move || identify(id, a.opening, timeout, tx));
                continue;
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        if options.accept_deadline.is_some_and(|d| Instant::now() >= d) {
            break Err(Error::AcceptTimeout);
        }
        if forming
            .as_ref()
            .is_some_and(|f| f.pages.iter().any(Option::is_none) && Instant::now() >= f.deadline)
        {
            tracing::warn!(
                "a session's page channels did not all join within {:?}: dropping it, still \
                 waiting for the migration",
                options.handshake_timeout
            );
            drop_forming(&mut forming, &mut pending);
        }
        let Ok((id, said)) = rx.recv_timeout(ACCEPT_POLL) else {
            continue;
        };
        let peer = pending.get(&id).map(|p| p.0.clone()).unwrap_or_default();
        match said {
            Said::Stream(transport, header) => {
                pending.remove(&id);
                break Ok(Incoming::Stream { transport, header });
            }
            Said::Refused(why) => {
                pending.remove(&id);
                tracing::warn!(%peer, "refused a connection: {why}; still waiting for the migration");
            }
            Said::Hello(hello, who, answer) => match decide(&hello, who, &mut forming, id, options)
            {
                Ok(()) => {
                    let _ = answer.send(Answer::Accept);
                }
                Err((status, why)) => {
                    let _ = answer.send(Answer::Refuse(status));
                    tracing::warn!(%peer, "refused a session connection: {why}; still waiting for the migration");
                }
            },
            Said::Control(transport, header) => match (header, forming.as_mut()) {
                (Ok(h), Some(f)) if f.control_conn == id => f.control = Some((transport, h)),
                (Err(e), Some(f)) if f.control_conn == id => {
                    tracing::warn!(%peer, error = %e, "a session's control channel failed before its header: dropping the session, still waiting for the migration");
                    drop_forming(&mut forming, &mut pending);
                }
                _ => {}
            },
            Said::Page(channel, transport) => {
                if let Some(f) = forming.as_mut().filter(|f| f.page_conns.contains(&id)) {
                    f.pages[channel as usize] = Some(transport);
                }
            }
        }
        if let Some(session) = take_complete(&mut forming, &mut pending) {
            break Ok(Incoming::Session(session));
        }
    };
    // Every connection still being answered lost: cut it off.
    for (_, (_, cut)) in pending {
        cut();
    }
    result
}

/// Drop the session being set up, cutting off its connections.
fn drop_forming(forming: &mut Option<Forming>, pending: &mut Pending) {
    if let Some(f) = forming.take() {
        for c in std::iter::once(f.control_conn).chain(f.page_conns) {
            if let Some((_, cut)) = pending.remove(&c) {
                cut();
            }
        }
    }
}

/// Whether a hello may join: a control channel starts the one session being set up; a page
/// channel joins it.
fn decide(
    hello: &Hello,
    peer: Option<PeerIdentity>,
    forming: &mut Option<Forming>,
    conn: usize,
    options: &ListenOptions,
) -> std::result::Result<(), (u32, &'static str)> {
    match (hello.kind(), forming.as_mut()) {
        (KIND_CONTROL, Some(_)) => Err((HELLO_BUSY, "another session is joining")),
        (KIND_CONTROL, None) => {
            *forming = Some(Forming {
                id: hello.session(),
                peer,
                control_conn: conn,
                control: None,
                pages: (0..hello.channels()).map(|_| None).collect(),
                page_conns: Vec::new(),
                deadline: Instant::now() + options.handshake_timeout,
            });
            Ok(())
        }
        (KIND_PAGES, Some(f)) if f.id == hello.session() => {
            if peer != f.peer {
                return Err((
                    HELLO_NO_SESSION,
                    "a page channel whose TLS identity differs from its control channel's",
                ));
            }
            let c = hello.channel() as usize;
            if hello.channels() as usize != f.pages.len()
                || c >= f.pages.len()
                || f.page_conns.len() >= f.pages.len()
            {
                return Err((
                    HELLO_BAD_CHANNEL,
                    "page channel index out of range or taken",
                ));
            }
            if f.pages[c].is_some() {
                return Err((HELLO_BAD_CHANNEL, "page channel index taken"));
            }
            f.page_conns.push(conn);
            Ok(())
        }
        _ => Err((
            HELLO_NO_SESSION,
            "a page channel of no session being set up",
        )),
    }
}

/// A connection's thread: run its TLS handshake if it has one, find out what it is (within
/// `timeout` for each), answer a hello as the accept loop decides, read a session's header,
/// report.
fn identify(id: usize, opening: Opening, timeout: Duration, tx: mpsc::Sender<(usize, Said)>) {
    let (mut t, who) = match opening.open(timeout) {
        Ok(opened) => opened,
        Err(why) => {
            let _ = tx.send((id, Said::Refused(why)));
            return;
        }
    };
    let said = match first_bytes(&mut t, timeout) {
        Err(why) => Said::Refused(why),
        Ok(First::NoCommonVersion(theirs)) => {
            if let Some(w) = t.writer.as_mut() {
                let _ = HelloReply::new(HELLO_VERSION).write_to(w.as_mut());
            }
            Said::Refused(format!(
                "a source of protocol version {theirs} that does not speak version {} any more",
                crate::wire::SESSION_VERSION
            ))
        }
        Ok(First::Stream(header)) => {
            if let Some(who) = &who {
                tracing::info!(dns_names = ?who.dns_names, "a version-1 stream over TLS");
            }
            Said::Stream(t, header)
        }
        Ok(First::Hello(hello)) => {
            let (answer_tx, answer_rx) = mpsc::channel();
            if tx.send((id, Said::Hello(hello, who, answer_tx))).is_err() {
                return;
            }
            let Ok(answer) = answer_rx.recv() else {
                return;
            };
            let status = match answer {
                Answer::Accept => HELLO_ACCEPTED,
                Answer::Refuse(s) => s,
            };
            let sent = t
                .writer
                .as_mut()
                .map(|w| HelloReply::new(status).write_to(w.as_mut()));
            match (status, sent, hello.kind()) {
                (HELLO_ACCEPTED, Some(Ok(())), KIND_CONTROL) => {
                    // No deadline: a source may boot and warm up its guest before the engine
                    // sends the header; the accept loop drops the session if its page channels
                    // do not come.
                    let header = read_session_header(&mut t);
                    Said::Control(t, header)
                }
                (HELLO_ACCEPTED, Some(Ok(())), _) => Said::Page(hello.channel(), t),
                (HELLO_ACCEPTED, _, _) => {
                    Said::Refused("the answer to its hello could not be sent".into())
                }
                _ => return,
            }
        }
    };
    let _ = tx.send((id, said));
}

/// What a connection's first bytes say it is.
enum First {
    /// A version-1 stream (its header read, the transport rewound).
    Stream(Header),
    /// A session connection.
    Hello(Hello),
    /// A source of a later version that speaks none of ours: answered [`HELLO_VERSION`], then
    /// refused.
    NoCommonVersion(u32),
}

/// Read a connection's first bytes within `timeout`: a version-1 header (peeked, as
/// [`crate::peek_header`]) or a [`Hello`]; anything else is a refusal saying what it was.
fn first_bytes(t: &mut Transport, timeout: Duration) -> std::result::Result<First, String> {
    let Some(r) = t.reader.as_mut() else {
        return Err("a connection without a read half".into());
    };
    let mut head = [0u8; 12];
    read_within(r.as_mut(), &mut head, timeout, None).map_err(|e| match e {
        ReadFailure::Timeout => {
            format!("it sent nothing within {timeout:?} (a port probe or a stalled peer?)")
        }
        ReadFailure::Eof => "it closed before saying what it is (a port probe?)".into(),
        other => format!("reading its first bytes: {other}"),
    })?;
    let magic = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    let version = u32::from_le_bytes(head[8..].try_into().unwrap_or_default());
    if magic != MAGIC {
        return Err(if head[0] == 0x16 && head[1] == 0x03 {
            "a TLS client on a listener without TLS".into()
        } else {
            format!("not a clearlog source (first bytes {:02x?})", &head[..])
        });
    }
    match version {
        crate::stream::VERSION => {
            // Replay what was read, then let the header decoder read on.
            let inner = t.reader.take().ok_or("a connection without a read half")?;
            t.reader = Some(Box::new(crate::transport::Replay::new(
                head.to_vec(),
                inner,
            )));
            let header =
                crate::peek_header(t).map_err(|e| format!("a bad version-1 header: {e}"))?;
            Ok(First::Stream(header))
        }
        v if v >= crate::wire::SESSION_VERSION => {
            let mut rest = [0u8; Hello::LEN];
            rest[..12].copy_from_slice(&head);
            read_within(r.as_mut(), &mut rest[12..], timeout, None)
                .map_err(|e| format!("reading its hello: {e}"))?;
            match Hello::parse(&rest) {
                Ok(hello) => Ok(First::Hello(hello)),
                Err(Error::SessionVersion { theirs, .. }) => Ok(First::NoCommonVersion(theirs)),
                Err(e) => Err(format!("a bad hello: {e}")),
            }
        }
        v => Err(format!(
            "a clearlog stream of version {v}, which this destination does not read (it reads \
             {} and {})",
            crate::stream::VERSION,
            crate::wire::SESSION_VERSION
        )),
    }
}

/// The header fields a session's control channel sends after its hello.
fn read_session_header(t: &mut Transport) -> Result<Header> {
    let r = t
        .reader
        .as_mut()
        .ok_or(Error::Handshake("no read half".into()))?;
    // Any read timeout set while identifying the connection is lifted: wait for the source.
    r.set_read_timeout(None)
        .map_err(Error::io("clearing the read timeout"))?;
    let mut sr = StreamReader::new(HeaderOnly(r.as_mut()));
    sr.read_header_fields(PAGE_SIZE as u32)
}

/// Reads through to a transport (the decoder reads the header fields from it byte-exactly).
struct HeaderOnly<'a>(&'a mut dyn TransportRead);

impl Read for HeaderOnly<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Listener {
    /// Accept the migration on this listener: see [`accept_incoming`]. A `file:` listener reads
    /// its file's version-1 header.
    ///
    /// # Errors
    ///
    /// A file's header errors; accepting failing.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// use clearlog_migration::stream::{BlockInfo, Header};
    /// use clearlog_migration::{Incoming, Listener, ListenOptions};
    ///
    /// let listener = Listener::bind("tcp:127.0.0.1:0").unwrap();
    /// let addr = listener.local_uri().unwrap().trim_start_matches("tcp:").to_string();
    /// // A health check connects and closes without a byte; then a version-1 source connects.
    /// drop(std::net::TcpStream::connect(&addr).unwrap());
    /// let source = std::thread::spawn(move || {
    ///     let mut s = std::net::TcpStream::connect(&addr).unwrap();
    ///     let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram0".into(), size: 1 << 20 }] };
    ///     h.write_to(&mut s).unwrap();
    ///     s.flush().unwrap();
    ///     s // keep the connection open until the destination has the header
    /// });
    /// let incoming = listener.accept_incoming(&ListenOptions::default()).unwrap();
    /// assert_eq!(incoming.header().blocks[0].name, "ram0");
    /// assert!(matches!(incoming, Incoming::Stream { .. }));
    /// drop(source.join().unwrap());
    /// ```
    pub fn accept_incoming(&self, options: &ListenOptions) -> Result<Incoming> {
        match self {
            Listener::File(_) => {
                let mut transport = self.accept()?;
                let header = crate::peek_header(&mut transport)?;
                Ok(Incoming::Stream { transport, header })
            }
            Listener::Tcp(l) => {
                l.set_nonblocking(true)
                    .map_err(Error::io("polling the TCP listener"))?;
                let mut acceptor = TcpAcceptor {
                    listener: l,
                    tls: options.tls.clone(),
                };
                let r = accept_arrivals(&mut acceptor, options);
                l.set_nonblocking(false)
                    .map_err(Error::io("polling the TCP listener"))?;
                r
            }
            Listener::Unix(..) if options.tls.is_some() => Err(Error::TlsNeedsTcp(
                "listen on a tcp: address (a Unix socket is guarded by its file's permissions)",
            )),
            Listener::Unix(l, path) => {
                l.set_nonblocking(true)
                    .map_err(Error::io("polling the Unix listener"))?;
                let r = accept_arrivals(&mut UnixAcceptor(l, path.display().to_string()), options);
                l.set_nonblocking(false)
                    .map_err(Error::io("polling the Unix listener"))?;
                r
            }
        }
    }
}

struct TcpAcceptor<'a> {
    listener: &'a std::net::TcpListener,
    tls: Option<TlsServer>,
}

impl Arrivals for TcpAcceptor<'_> {
    fn poll(&mut self) -> Result<Option<Arrival>> {
        match self.listener.accept() {
            Ok((stream, peer)) => {
                // An accepted socket does not inherit the listener's non-blocking mode.
                let Some(cut) = clone_or_drop(stream.try_clone(), &peer) else {
                    return Ok(None);
                };
                Ok(Some(Arrival {
                    opening: Opening::Tcp(stream, self.tls.clone()),
                    peer: peer.to_string(),
                    shutdown: Box::new(move || {
                        let _ = cut.shutdown(std::net::Shutdown::Both);
                    }),
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(Error::Io {
                context: "TCP accept",
                source: e,
            }),
        }
    }
}

struct UnixAcceptor<'a>(&'a std::os::unix::net::UnixListener, String);

impl Arrivals for UnixAcceptor<'_> {
    fn poll(&mut self) -> Result<Option<Arrival>> {
        match self.0.accept() {
            Ok((stream, _)) => {
                let Some(cut) = clone_or_drop(stream.try_clone(), &self.1) else {
                    return Ok(None);
                };
                Ok(Some(Arrival {
                    opening: Opening::Unix(stream),
                    peer: self.1.clone(),
                    shutdown: Box::new(move || {
                        let _ = cut.shutdown(std::net::Shutdown::Both);
                    }),
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(Error::Io {
                context: "Unix accept",
                source: e,
            }),
        }
    }
}

/// The second handle on an accepted socket (to cut it off), or `None` with a warning: without it
/// (out of descriptors?) the connection is dropped and the wait goes on.
fn clone_or_drop<S>(clone: io::Result<S>, peer: &dyn std::fmt::Display) -> Option<S> {
    clone
        .inspect_err(|e| {
            tracing::warn!(%peer, "dropped a connection: cloning its socket: {e}; still waiting for the migration");
        })
        .ok()
}
