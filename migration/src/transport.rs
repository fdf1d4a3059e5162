// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Transports: a byte stream to the peer (plus the back channel for the acknowledgement), over TCP,
//! Unix sockets, files, or an in-memory pipe for tests.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::Duration;

use crate::{Error, Result};

/// The read half of a transport: a `Read` whose blocking reads can be given a timeout (used while the
/// source waits for the acknowledgement, so it can notice cancellation and time out).
///
/// # Examples
///
/// ```
/// use std::io::Read;
/// use clearlog_migration::TransportRead;
///
/// struct Bytes(std::io::Cursor<Vec<u8>>);
/// impl Read for Bytes {
///     fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> { self.0.read(buf) }
/// }
/// impl TransportRead for Bytes {} // reads never block: no timeout needed
/// ```
pub trait TransportRead: Read + Send {
    /// Make reads fail with `WouldBlock` after `timeout`, as sockets do on Linux (`None`: block). The default
    /// ignores the request (reads then block).
    fn set_read_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl TransportRead for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl TransportRead for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl TransportRead for File {}
impl TransportRead for &'static [u8] {}
impl TransportRead for io::Cursor<Vec<u8>> {}

/// A connection to the peer. The source writes the stream to `writer` and reads the acknowledgement from
/// `reader` (no reader: no acknowledgement is requested, as for a file). The destination reads the stream
/// from `reader` and acknowledges on `writer` when the source asked for it.
///
/// A writer of your own must not keep bytes it could deliver later: the source writes the
/// confirmation that commits the migration straight to `writer` and flushes it, and if that
/// fails it resumes its guest. A writer that buffers and, after a failed `flush`, still sends its
/// buffer later (when dropped, or from a thread of its own) can deliver the confirmation to a
/// destination that then resumes too: the guest would run on both sides. Write through at once
/// (as sockets and files do), or discard what is buffered once a `write` or `flush` failed.
///
/// # Examples
///
/// ```
/// use clearlog_migration::Transport;
///
/// // A snapshot to memory: the stream goes to a Vec, no acknowledgement.
/// let t = Transport::new(None, Some(Box::new(Vec::<u8>::new())));
/// assert!(t.reader.is_none());
/// ```
pub struct Transport {
    /// Bytes from the peer.
    pub reader: Option<Box<dyn TransportRead>>,
    /// Bytes to the peer.
    pub writer: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("reader", &self.reader.is_some())
            .field("writer", &self.writer.is_some())
            .finish()
    }
}

impl Transport {
    /// A transport from its halves.
    ///
    /// # Examples
    ///
    /// See [`Transport`].
    pub fn new(
        reader: Option<Box<dyn TransportRead>>,
        writer: Option<Box<dyn Write + Send>>,
    ) -> Self {
        Transport { reader, writer }
    }

    /// Both directions of a connected TCP stream (sets `TCP_NODELAY`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let s = std::net::TcpStream::connect("127.0.0.1:4444").unwrap();
    /// let t = clearlog_migration::Transport::tcp(s).unwrap();
    /// ```
    pub fn tcp(stream: TcpStream) -> Result<Self> {
        stream
            .set_nodelay(true)
            .map_err(Error::io("setting TCP_NODELAY"))?;
        let reader = stream
            .try_clone()
            .map_err(Error::io("cloning the TCP socket"))?;
        Ok(Transport::new(
            Some(Box::new(reader)),
            Some(Box::new(stream)),
        ))
    }

    /// Both directions of a connected TCP stream, guarded against a dead link: sends time out after
    /// `io_timeout` and `TCP_USER_TIMEOUT` aborts the connection when sent data stays unacknowledged
    /// that long (zero: no guard, the kernel's ~15 minutes of retransmissions).
    ///
    /// A source whose destination vanishes (cable pulled, host gone) then fails its migration in
    /// seconds with an I/O error and keeps its guest running, instead of blocking in `write`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let s = std::net::TcpStream::connect("127.0.0.1:4444").unwrap();
    /// let t = clearlog_migration::Transport::tcp_with_timeout(s, Duration::from_secs(5)).unwrap();
    /// ```
    pub fn tcp_with_timeout(stream: TcpStream, io_timeout: Duration) -> Result<Self> {
        Self::tcp(guard_tcp(stream, io_timeout)?)
    }

    /// Both directions of a connected Unix stream socket.
    ///
    /// # Examples
    ///
    /// ```
    /// let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    /// let t = clearlog_migration::Transport::unix(a).unwrap();
    /// assert!(t.reader.is_some() && t.writer.is_some());
    /// ```
    pub fn unix(stream: UnixStream) -> Result<Self> {
        let reader = stream
            .try_clone()
            .map_err(Error::io("cloning the Unix socket"))?;
        Ok(Transport::new(
            Some(Box::new(reader)),
            Some(Box::new(stream)),
        ))
    }

    /// Source side of a snapshot: write the stream to a file (no acknowledgement).
    ///
    /// # Examples
    ///
    /// ```
    /// let f = tempfile_path();
    /// # fn tempfile_path() -> std::fs::File { std::fs::File::create(std::env::temp_dir().join("clearlog-doc-save")).unwrap() }
    /// let t = clearlog_migration::Transport::file_writer(f);
    /// assert!(t.reader.is_none());
    /// ```
    pub fn file_writer(file: File) -> Self {
        Transport::new(None, Some(Box::new(file)))
    }

    /// Destination side of a restore: read the stream from a file (no acknowledgement).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let t = clearlog_migration::Transport::file_reader(std::fs::File::open("vm.snap").unwrap());
    /// assert!(t.writer.is_none());
    /// ```
    pub fn file_reader(file: File) -> Self {
        Transport::new(Some(Box::new(file)), None)
    }
}

/// Guard a TCP stream against a dead link as [`Transport::tcp_with_timeout`] says (zero: no
/// guard); TLS runs its handshake on the guarded stream.
pub(crate) fn guard_tcp(stream: TcpStream, io_timeout: Duration) -> Result<TcpStream> {
    if !io_timeout.is_zero() {
        stream
            .set_write_timeout(Some(io_timeout))
            .map_err(Error::io("setting the TCP send timeout"))?;
        set_tcp_user_timeout(&stream, io_timeout).map_err(Error::io("setting TCP_USER_TIMEOUT"))?;
    }
    Ok(stream)
}

/// A parsed migration address: `tcp:HOST:PORT`, `unix:PATH` or `file:PATH`.
///
/// # Examples
///
/// ```
/// use clearlog_migration::MigrationUri;
///
/// let uri: MigrationUri = "tcp:127.0.0.1:4444".parse().unwrap();
/// assert_eq!(uri, MigrationUri::Tcp("127.0.0.1:4444".into()));
/// assert!("tcp:127.0.0.1".parse::<MigrationUri>().is_err());
/// assert!("ftp:x".parse::<MigrationUri>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `HOST:PORT` (host may be a name, an IPv4 address or a bracketed IPv6 address).
    Tcp(String),
    /// Path of a Unix stream socket.
    Unix(PathBuf),
    /// Path of a snapshot file.
    File(PathBuf),
}

impl FromStr for MigrationUri {
    type Err = Error;

    fn from_str(uri: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| bad("missing scheme (tcp:, unix: or file:)"))?;
        match scheme {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("missing port (tcp:HOST:PORT)"))?;
                if host.is_empty() {
                    return Err(bad("missing host (tcp:HOST:PORT)"));
                }
                if port.is_empty() {
                    return Err(bad("missing port (tcp:HOST:PORT)"));
                }
                port.parse::<u16>()
                    .map_err(|_| bad("port is not a number in 0..=65535"))?;
                Ok(MigrationUri::Tcp(rest.to_string()))
            }
            "unix" | "file" if rest.is_empty() => Err(bad("missing path")),
            "unix" => Ok(MigrationUri::Unix(rest.into())),
            "file" => Ok(MigrationUri::File(rest.into())),
            _ => Err(bad("unknown scheme (expected tcp:, unix: or file:)")),
        }
    }
}

/// Default of [`ConnectOptions::io_timeout`]: how long a TCP send may stall before the migration
/// fails (10 s).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How [`connect_with`] sets up a connection.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use clearlog_migration::{ConnectOptions, DEFAULT_IO_TIMEOUT};
///
/// assert_eq!(ConnectOptions::default().io_timeout, DEFAULT_IO_TIMEOUT);
/// let patient = ConnectOptions { io_timeout: Duration::from_secs(60) };
/// # let _ = patient;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// TCP only: send timeout and `TCP_USER_TIMEOUT` (see [`Transport::tcp_with_timeout`]); zero
    /// turns the guard off. Default [`DEFAULT_IO_TIMEOUT`].
    pub io_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            io_timeout: DEFAULT_IO_TIMEOUT,
        }
    }
}

/// Source side: connect to a listening destination (`tcp:`, `unix:`) or create a snapshot file
/// (`file:`, truncated if it exists), with the default [`ConnectOptions`] (a TCP connection is
/// guarded against a dead link, see [`Transport::tcp_with_timeout`]).
///
/// # Examples
///
/// ```
/// let path = std::env::temp_dir().join("clearlog-doc-connect.snap");
/// let t = clearlog_migration::connect(&format!("file:{}", path.display())).unwrap();
/// assert!(t.reader.is_none());
/// ```
pub fn connect(uri: &str) -> Result<Transport> {
    connect_with(uri, &ConnectOptions::default())
}

/// [`connect`] with explicit options.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use clearlog_migration::{connect_with, ConnectOptions, Listener};
///
/// let l = Listener::bind("tcp:127.0.0.1:0").unwrap();
/// let opts = ConnectOptions { io_timeout: Duration::from_secs(2) };
/// let t = connect_with(&l.local_uri().unwrap(), &opts).unwrap();
/// assert!(t.reader.is_some());
/// ```
pub fn connect_with(uri: &str, options: &ConnectOptions) -> Result<Transport> {
    match uri.parse()? {
        MigrationUri::Tcp(addr) => Transport::tcp_with_timeout(
            TcpStream::connect(addr).map_err(Error::io("TCP connect"))?,
            options.io_timeout,
        ),
        MigrationUri::Unix(path) => {
            Transport::unix(UnixStream::connect(path).map_err(Error::io("Unix connect"))?)
        }
        MigrationUri::File(path) => Ok(Transport::file_writer(
            File::create(path).map_err(Error::io("creating the snapshot file"))?,
        )),
    }
}

/// `TCP_USER_TIMEOUT`: abort the connection when sent data stays unacknowledged this long.
fn set_tcp_user_timeout(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: setsockopt on a socket `stream` owns, with a pointer to a live c_uint and its exact
    // size; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&raw const ms).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Destination side: a bound listener (`tcp:`, `unix:`) or an opened snapshot file (`file:`).
///
/// # Examples
///
/// ```
/// let l = clearlog_migration::Listener::bind("tcp:127.0.0.1:0").unwrap();
/// let uri = l.local_uri().unwrap(); // tcp:127.0.0.1:<port>
/// let src = std::thread::spawn(move || clearlog_migration::connect(&uri).unwrap());
/// let _dst = l.accept().unwrap();
/// src.join().unwrap();
/// ```
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix listener (its socket file is removed on drop).
    Unix(UnixListener, PathBuf),
    /// A snapshot file to read.
    File(File),
}

impl Listener {
    /// Bind (or open) `uri`.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::{Error, Listener};
    ///
    /// assert!(matches!(Listener::bind("tcp:127.0.0.1"), Err(Error::InvalidUri { .. })));
    /// ```
    pub fn bind(uri: &str) -> Result<Self> {
        match uri.parse()? {
            MigrationUri::Tcp(addr) => Ok(Listener::Tcp(
                TcpListener::bind(addr).map_err(Error::io("TCP bind"))?,
            )),
            MigrationUri::Unix(path) => Ok(Listener::Unix(
                UnixListener::bind(&path).map_err(Error::io("Unix bind"))?,
                path,
            )),
            MigrationUri::File(path) => Ok(Listener::File(
                File::open(path).map_err(Error::io("opening the snapshot file"))?,
            )),
        }
    }

    /// The address a source should connect to (useful with port 0).
    ///
    /// # Examples
    ///
    /// ```
    /// let l = clearlog_migration::Listener::bind("tcp:127.0.0.1:0").unwrap();
    /// assert!(l.local_uri().unwrap().starts_with("tcp:127.0.0.1:"));
    /// ```
    pub fn local_uri(&self) -> Result<String> {
        match self {
            Listener::Tcp(l) => Ok(format!(
                "tcp:{}",
                l.local_addr().map_err(Error::io("TCP local address"))?
            )),
            Listener::Unix(_, p) => Ok(format!("unix:{}", p.display())),
            Listener::File(_) => Err(Error::InvalidUri {
                uri: "file:".into(),
                reason: "a file has no address to connect to",
            }),
        }
    }

    /// Wait for the source (a file is returned at once).
    ///
    /// # Examples
    ///
    /// See [`Listener`].
    pub fn accept(&self) -> Result<Transport> {
        match self {
            Listener::Tcp(l) => Transport::tcp(l.accept().map_err(Error::io("TCP accept"))?.0),
            Listener::Unix(l, _) => {
                Transport::unix(l.accept().map_err(Error::io("Unix accept"))?.0)
            }
            Listener::File(f) => Ok(Transport::file_reader(
                f.try_clone()
                    .map_err(Error::io("opening the snapshot file"))?,
            )),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Write end of an in-memory pipe (see [`pipe`]).
///
/// # Examples
///
/// ```
/// let (_w, _r): (clearlog_migration::PipeWriter, clearlog_migration::PipeReader) = clearlog_migration::pipe();
/// ```
#[derive(Debug)]
pub struct PipeWriter {
    tx: SyncSender<Vec<u8>>,
    /// Buffers the reader is done with, reused so a steady stream allocates nothing.
    recycled: Receiver<Vec<u8>>,
}

/// Read end of an in-memory pipe (see [`pipe`]); reads return end-of-file once the writer is dropped.
///
/// # Examples
///
/// ```
/// use std::io::Read;
/// let (w, mut r) = clearlog_migration::pipe();
/// drop(w);
/// assert_eq!(r.read(&mut [0; 4]).unwrap(), 0);
/// ```
#[derive(Debug)]
pub struct PipeReader {
    rx: Receiver<Vec<u8>>,
    recycle: Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    timeout: Option<Duration>,
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut chunk = self.recycled.try_recv().unwrap_or_default();
        chunk.clear();
        chunk.extend_from_slice(buf);
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "pipe reader closed"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos == self.cur.len() {
            let chunk = match self.timeout {
                None => match self.rx.recv() {
                    Ok(c) => c,
                    Err(_) => return Ok(0),
                },
                Some(t) => match self.rx.recv_timeout(t) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => return Err(io::ErrorKind::WouldBlock.into()),
                    Err(RecvTimeoutError::Disconnected) => return Ok(0),
                },
            };
            let done = std::mem::replace(&mut self.cur, chunk);
            self.pos = 0;
            if done.capacity() > 0 {
                // The writer may be gone: then the buffer is simply freed.
                let _ = self.recycle.send(done);
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl TransportRead for PipeReader {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.timeout = timeout;
        Ok(())
    }
}

/// A one-way in-memory pipe; at most 16 writes are in flight before the writer blocks.
///
/// # Examples
///
/// ```
/// use std::io::{Read, Write};
///
/// let (mut w, mut r) = clearlog_migration::pipe();
/// w.write_all(b"hi").unwrap();
/// drop(w);
/// let mut s = String::new();
/// r.read_to_string(&mut s).unwrap();
/// assert_eq!(s, "hi");
/// ```
pub fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let (recycle, recycled) = std::sync::mpsc::channel();
    (
        PipeWriter { tx, recycled },
        PipeReader {
            rx,
            recycle,
            cur: Vec::new(),
            pos: 0,
            timeout: None,
        },
    )
}

/// Two connected in-memory transports `(source_side, destination_side)`, for tests.
///
/// # Examples
///
/// ```
/// use std::io::{Read, Write};
///
/// let (mut a, mut b) = clearlog_migration::mem_channel();
/// a.writer.as_mut().unwrap().write_all(b"x").unwrap();
/// let mut byte = [0];
/// b.reader.as_mut().unwrap().read_exact(&mut byte).unwrap();
/// assert_eq!(&byte, b"x");
/// ```
pub fn mem_channel() -> (Transport, Transport) {
    let (w1, r1) = pipe();
    let (w2, r2) = pipe();
    (
        Transport::new(Some(Box::new(r2)), Some(Box::new(w1))),
        Transport::new(Some(Box::new(r1)), Some(Box::new(w2))),
    )
}

/// Read the stream header at the start of `transport` without consuming it: the header is checked
/// (magic, version, page size, bounded block layout) and returned, and the transport is rewound so a
/// [`crate::Destination`] then reads the whole stream as usual.
///
/// A destination that learns the guest's RAM layout from the stream (instead of being configured
/// with it) calls this first, creates RAM blocks matching [`Header::blocks`](crate::stream::Header),
/// then receives.
///
/// # Errors
/// The header errors of [`StreamReader::read_header`](crate::stream::StreamReader::read_header), or
/// [`Error::Io`] if the transport has no read half.
///
/// # Examples
///
/// ```
/// use clearlog_migration::stream::{BlockInfo, Header};
/// use clearlog_migration::{peek_header, Transport};
///
/// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram0".into(), size: 1 << 20 }] };
/// let mut bytes = Vec::new();
/// h.write_to(&mut bytes).unwrap();
/// let mut t = Transport::new(Some(Box::new(std::io::Cursor::new(bytes.clone()))), None);
/// assert_eq!(peek_header(&mut t).unwrap(), h);
/// // The transport still starts with the header.
/// let mut again = Vec::new();
/// std::io::Read::read_to_end(t.reader.as_mut().unwrap(), &mut again).unwrap();
/// assert_eq!(again, bytes);
/// ```
pub fn peek_header(transport: &mut Transport) -> Result<crate::stream::Header> {
    let mut inner = transport
        .reader
        .take()
        .ok_or_else(|| Error::no_half("reading the stream header", "read"))?;
    let mut recorder = Recorder {
        inner: &mut inner,
        seen: Vec::new(),
    };
    let header =
        crate::stream::StreamReader::new(&mut recorder).read_header(crate::PAGE_SIZE as u32);
    let seen = recorder.seen;
    transport.reader = Some(Box::new(Replay::new(seen, inner)));
    header
}

/// Keeps a copy of every byte read through it.
struct Recorder<'a> {
    inner: &'a mut Box<dyn TransportRead>,
    seen: Vec<u8>,
}

impl Read for Recorder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Bytes already read (the header), then the rest of the transport.
pub(crate) struct Replay {
    prefix: io::Cursor<Vec<u8>>,
    inner: Box<dyn TransportRead>,
}

impl Replay {
    /// `prefix` (bytes already read from `inner`), then `inner`.
    pub(crate) fn new(prefix: Vec<u8>, inner: Box<dyn TransportRead>) -> Self {
        Replay {
            prefix: io::Cursor::new(prefix),
            inner,
        }
    }
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.prefix.position() as usize) < self.prefix.get_ref().len() {
            return self.prefix.read(buf);
        }
        self.inner.read(buf)
    }
}

impl TransportRead for Replay {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_errors_are_specific() {
        let reason = |u: &str| match u.parse::<MigrationUri>() {
            Err(Error::InvalidUri { reason, .. }) => reason,
            other => panic!("{u}: {other:?}"),
        };
        assert!(reason("nothing").contains("missing scheme"));
        assert!(reason("http:x").contains("unknown scheme"));
        assert!(reason("tcp:host").contains("missing port"));
        assert!(reason("tcp:host:").contains("missing port"));
        assert!(reason("tcp::80").contains("missing host"));
        assert!(reason("tcp:host:99999").contains("port"));
        assert!(reason("unix:").contains("missing path"));
        assert!(reason("file:").contains("missing path"));
        assert_eq!(
            "tcp:[::1]:80".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp("[::1]:80".into())
        );
        assert_eq!(
            "unix:/tmp/s".parse::<MigrationUri>().unwrap(),
            MigrationUri::Unix("/tmp/s".into())
        );
    }

    #[test]
    fn pipe_timeout_and_eof() {
        let (w, mut r) = pipe();
        r.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let mut b = [0; 1];
        assert_eq!(
            r.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(w);
        assert_eq!(r.read(&mut b).unwrap(), 0);
    }
}
