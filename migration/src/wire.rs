// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fixed-size messages of the protocol, each read and written here and nowhere else: the
//! session hellos of version 2, and the acknowledgement, confirmation and verdict that both
//! versions exchange after the stream. Each is a `#[repr(C)]` struct of little-endian fields
//! (`zerocopy`), so its layout is the wire format.
//!
//! | message        | bytes | direction                 | fields |
//! |----------------|-------|---------------------------|--------|
//! | [`Hello`]      | 48    | source to destination, first bytes of every v2 connection | `b"CLEARLOG"`, version 2, kind (1 control, 2 page channel), session id (16 bytes), channel index, page channel count, lowest version the source speaks, reserved 0 |
//! | [`HelloReply`] | 16    | destination to source, answer to a hello | `b"HELO"`, version chosen, status (0 accepted, 1 version not spoken, 2 busy with another session, 3 no such session, 4 bad channel), highest version the destination speaks |
//! | [`Drained`]    | 8     | destination to source, answer to a drain record | `b"DRND"`, 0 |
//! | [`Ack`]        | 8     | destination to source     | `b"ACK1"`, status (0 loaded and restored, 1 failed) |
//! | [`Confirm`]    | 8     | source to destination     | `b"GO!!"`, 0 |
//! | [`Verdict`]    | 24    | destination to source     | `b"VRFY"`, status (0 verified, 1 mismatch), mismatched pages, resume time (Unix ns) |
//! | [`PostcopyMessage`] | 16 | destination to source, postcopy phase | `b"WANT"` and a block with a page the guest touched, or `b"DONE"`, 0, 0 once every missing page arrived |

use std::io::{self, Write};
use std::time::{Duration, Instant};

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::stream::{self, MAGIC};
use crate::transport::TransportRead;
use crate::{CancelToken, Error, Result};

/// The session protocol's version (version 1 is the single stream, [`stream::VERSION`]).
pub const SESSION_VERSION: u32 = 2;

/// The hello's kind of connection: the control channel (header, state, handshake, verification).
pub const KIND_CONTROL: u32 = 1;
/// The hello's kind of connection: a page channel.
pub const KIND_PAGES: u32 = 2;

/// [`HelloReply::status`]: the connection joined the session.
pub const HELLO_ACCEPTED: u32 = 0;
/// [`HelloReply::status`]: the destination does not speak the version asked for.
pub const HELLO_VERSION: u32 = 1;
/// [`HelloReply::status`]: the destination is busy with another session.
pub const HELLO_BUSY: u32 = 2;
/// [`HelloReply::status`]: no session with this id is waiting for page channels.
pub const HELLO_NO_SESSION: u32 = 3;
/// [`HelloReply::status`]: the channel index is out of range or taken.
pub const HELLO_BAD_CHANNEL: u32 = 4;

const HELLO_REPLY_MAGIC: u32 = u32::from_le_bytes(*b"HELO");

/// The first bytes of every connection of a version-2 session.
///
/// # Examples
///
/// ```
/// use clearlog_migration::wire::{Hello, KIND_CONTROL};
///
/// let h = Hello::new(KIND_CONTROL, [7; 16], 0, 4);
/// let mut bytes = Vec::new();
/// h.write_to(&mut bytes).unwrap();
/// assert_eq!(&bytes[..8], b"CLEARLOG");
/// assert_eq!(Hello::parse(&bytes).unwrap(), h);
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Hello {
    magic: U64,
    version: U32,
    kind: U32,
    session: [u8; 16],
    channel: U32,
    channels: U32,
    min_version: U32,
    reserved: U32,
}

const _: () = assert!(std::mem::size_of::<Hello>() == 48);

impl Hello {
    /// Size on the wire.
    pub const LEN: usize = 48;

    /// A hello of `kind` for page channel `channel` (0 for the control channel) of a session of
    /// `channels` page channels.
    pub fn new(kind: u32, session: [u8; 16], channel: u32, channels: u32) -> Self {
        Hello {
            magic: MAGIC.into(),
            version: SESSION_VERSION.into(),
            kind: kind.into(),
            session,
            channel: channel.into(),
            channels: channels.into(),
            min_version: SESSION_VERSION.into(),
            reserved: 0.into(),
        }
    }

    /// The kind ([`KIND_CONTROL`] or [`KIND_PAGES`]).
    pub fn kind(&self) -> u32 {
        self.kind.get()
    }

    /// The session id.
    pub fn session(&self) -> [u8; 16] {
        self.session
    }

    /// The page channel index.
    pub fn channel(&self) -> u32 {
        self.channel.get()
    }

    /// The session's page channel count.
    pub fn channels(&self) -> u32 {
        self.channels.get()
    }

    /// The highest protocol version the source speaks.
    pub fn version(&self) -> u32 {
        self.version.get()
    }

    /// Check and decode a hello (at least [`Hello::LEN`] bytes). Every later version keeps this
    /// layout for its hello, so a newer source that still speaks version 2 (its lowest version at
    /// most 2) is understood, and runs version 2.
    ///
    /// # Errors
    ///
    /// [`Error::BadMagic`]; [`Error::SessionVersion`] when the source speaks no version this
    /// side speaks (its lowest is above 2, or its highest below); [`Error::Malformed`] (kind,
    /// reserved bits, channel index, no page channel), [`Error::TooLarge`] (channel count over
    /// [`MAX_CHANNELS`]).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let (h, _) = Hello::read_from_prefix(bytes).map_err(|_| Error::Truncated("hello"))?;
        if h.magic.get() != MAGIC {
            return Err(Error::BadMagic(h.magic.get()));
        }
        if h.version.get() < SESSION_VERSION || h.min_version.get() > SESSION_VERSION {
            return Err(Error::SessionVersion {
                ours: SESSION_VERSION,
                theirs: h.version.get(),
            });
        }
        if h.reserved.get() != 0 {
            return Err(Error::Malformed("hello (reserved field not zero)"));
        }
        match h.kind() {
            // A session has at least one page channel (pages never travel on the control channel).
            KIND_CONTROL if h.channel() == 0 && h.channels() > 0 => {}
            KIND_PAGES if h.channel() < h.channels() => {}
            _ => return Err(Error::Malformed("hello (kind, channel index or count)")),
        }
        if h.channels() > MAX_CHANNELS {
            return Err(Error::TooLarge {
                what: "page channel count",
                value: h.channels().into(),
                limit: MAX_CHANNELS.into(),
            });
        }
        Ok(h)
    }

    /// Write it.
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(self.as_bytes())?;
        w.flush()
    }
}

pub use crate::stream::MAX_CHANNELS;

/// The destination's answer to a [`Hello`].
///
/// # Examples
///
/// ```
/// use clearlog_migration::wire::{HelloReply, HELLO_ACCEPTED};
///
/// let mut bytes = Vec::new();
/// HelloReply::new(HELLO_ACCEPTED).write_to(&mut bytes).unwrap();
/// assert_eq!(bytes.len(), 16);
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HelloReply {
    magic: U32,
    version: U32,
    status: U32,
    max_version: U32,
}

impl HelloReply {
    /// A reply with `status` from a destination that speaks up to [`SESSION_VERSION`].
    pub fn new(status: u32) -> Self {
        HelloReply {
            magic: HELLO_REPLY_MAGIC.into(),
            version: SESSION_VERSION.into(),
            status: status.into(),
            max_version: SESSION_VERSION.into(),
        }
    }

    /// Write it.
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(self.as_bytes())?;
        w.flush()
    }

    /// Read the reply within `timeout` and turn a refusal into an error.
    ///
    /// # Errors
    ///
    /// [`Error::SessionRefused`] with the destination's reason, [`Error::SessionVersion`] when it
    /// does not speak ours, [`Error::Handshake`] when the bytes are not a reply or do not come.
    pub fn read_expecting_accept(r: &mut dyn TransportRead, timeout: Duration) -> Result<()> {
        let mut b = [0u8; 16];
        read_within(r, &mut b, timeout, None).map_err(|e| match e {
            // Closed, or reset (closed with our hello unread).
            ReadFailure::Eof => closed_after_hello(),
            ReadFailure::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                closed_after_hello()
            }
            other => Error::Handshake(format!("waiting for the hello reply: {other}")),
        })?;
        let reply =
            HelloReply::read_from_bytes(&b[..]).map_err(|_| Error::Truncated("hello reply"))?;
        if reply.magic.get() != HELLO_REPLY_MAGIC {
            return Err(Error::Handshake(format!("not a hello reply: {b:02x?}")));
        }
        match reply.status.get() {
            HELLO_ACCEPTED if reply.version.get() == SESSION_VERSION => Ok(()),
            HELLO_VERSION | HELLO_ACCEPTED => Err(Error::SessionVersion {
                ours: SESSION_VERSION,
                theirs: reply.max_version.get(),
            }),
            HELLO_BUSY => Err(Error::SessionRefused("the destination is busy with another migration")),
            HELLO_NO_SESSION => Err(Error::SessionRefused(
                "the destination has no session with this id (it gave up waiting, or took another source)",
            )),
            HELLO_BAD_CHANNEL => Err(Error::SessionRefused("the destination refused the channel index")),
            _ => Err(Error::SessionRefused("the destination refused the connection")),
        }
    }
}

fn closed_after_hello() -> Error {
    Error::Handshake(format!(
        "the destination closed the connection after our hello (a destination that requires TLS \
         does that, and one that speaks only stream version {}; this source speaks plaintext \
         version {SESSION_VERSION})",
        stream::VERSION
    ))
}

const ACK_MAGIC: u32 = stream::ACK_MAGIC;

/// The destination's acknowledgement after the stream's end: loaded, checked and restored (or not).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Ack {
    magic: U32,
    status: U32,
}

impl Ack {
    /// Send an acknowledgement with `status` ([`stream::ACK_OK`] or [`stream::ACK_FAILED`]).
    pub fn send(w: &mut dyn Write, status: u32) -> io::Result<()> {
        let ack = Ack {
            magic: ACK_MAGIC.into(),
            status: status.into(),
        };
        w.write_all(ack.as_bytes())?;
        w.flush()
    }

    /// Wait up to `timeout` for a positive acknowledgement, polling so a cancel is noticed.
    ///
    /// # Errors
    ///
    /// [`Error::AckTimeout`], [`Error::Cancelled`], [`Error::BadAck`],
    /// [`Error::DestinationRefused`], [`Error::Io`] (the connection failed or closed).
    pub fn wait_ok(
        r: &mut dyn TransportRead,
        timeout: Duration,
        cancel: &CancelToken,
    ) -> Result<()> {
        let mut b = [0u8; 8];
        read_within(r, &mut b, timeout, Some(cancel)).map_err(|e| match e {
            ReadFailure::Timeout => Error::AckTimeout(timeout),
            ReadFailure::Cancelled => Error::Cancelled,
            ReadFailure::Eof => Error::Io {
                context: "waiting for the acknowledgement",
                source: io::ErrorKind::UnexpectedEof.into(),
            },
            ReadFailure::Io(source) => Error::Io {
                context: "waiting for the acknowledgement",
                source,
            },
        })?;
        let ack = Ack::read_from_bytes(&b[..]).map_err(|_| Error::BadAck)?;
        if ack.magic.get() != ACK_MAGIC {
            return Err(Error::BadAck);
        }
        if ack.status.get() != stream::ACK_OK {
            return Err(Error::DestinationRefused(ack.status.get()));
        }
        Ok(())
    }
}

const DRAINED_MAGIC: u32 = u32::from_le_bytes(*b"DRND");

/// The destination's answer to a drain request ([`stream::TAG_DRAIN`]): every page record the
/// request counted is in guest memory. The source switches over only after it, so the paused
/// phase never waits for a backlog the destination had not loaded yet.
///
/// # Examples
///
/// ```
/// use clearlog_migration::{wire::Drained, CancelToken};
/// use std::time::Duration;
///
/// let mut bytes = Vec::new();
/// Drained::send(&mut bytes).unwrap();
/// let mut r = std::io::Cursor::new(bytes);
/// Drained::wait(&mut r, Duration::from_secs(1), &CancelToken::new()).unwrap();
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Drained {
    magic: U32,
    zero: U32,
}

impl Drained {
    /// Send it and flush.
    pub fn send(w: &mut dyn Write) -> io::Result<()> {
        let d = Drained {
            magic: DRAINED_MAGIC.into(),
            zero: 0.into(),
        };
        w.write_all(d.as_bytes())?;
        w.flush()
    }

    /// Wait up to `timeout` for it, polling so a cancel is noticed.
    ///
    /// # Errors
    ///
    /// [`Error::DrainTimeout`], [`Error::Cancelled`], [`Error::Malformed`] (not this message),
    /// [`Error::Io`] (the connection failed or closed).
    pub fn wait(r: &mut dyn TransportRead, timeout: Duration, cancel: &CancelToken) -> Result<()> {
        let mut b = [0u8; 8];
        read_within(r, &mut b, timeout, Some(cancel)).map_err(|e| match e {
            ReadFailure::Timeout => Error::DrainTimeout(timeout),
            ReadFailure::Cancelled => Error::Cancelled,
            ReadFailure::Eof => Error::Io {
                context: "waiting for the destination to drain",
                source: io::ErrorKind::UnexpectedEof.into(),
            },
            ReadFailure::Io(source) => Error::Io {
                context: "waiting for the destination to drain",
                source,
            },
        })?;
        let d = Drained::read_from_bytes(&b[..]).map_err(|_| Error::Malformed("drained"))?;
        if d.magic.get() != DRAINED_MAGIC || d.zero.get() != 0 {
            return Err(Error::Malformed(
                "drained (not the destination's drain answer)",
            ));
        }
        Ok(())
    }
}

/// The source's confirmation of a positive acknowledgement: the commit point.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Confirm {
    magic: U32,
    zero: U32,
}

impl Confirm {
    /// Send it straight to `w` and flush (never through a buffer that could deliver it later).
    pub fn send(w: &mut dyn Write) -> io::Result<()> {
        let c = Confirm {
            magic: stream::CONFIRM_MAGIC.into(),
            zero: 0.into(),
        };
        w.write_all(c.as_bytes())?;
        w.flush()
    }

    /// Wait up to `timeout` for the confirmation.
    ///
    /// # Errors
    ///
    /// [`Error::NotConfirmed`] saying why (timeout, closed, malformed, I/O).
    pub fn wait(r: &mut dyn TransportRead, timeout: Duration) -> Result<()> {
        let mut b = [0u8; 8];
        read_within(r, &mut b, timeout, None).map_err(|e| {
            Error::NotConfirmed(match e {
                ReadFailure::Timeout => format!("no confirmation within {timeout:?}"),
                ReadFailure::Eof => "the source closed the connection".into(),
                other => other.to_string(),
            })
        })?;
        let c =
            Confirm::read_from_bytes(&b[..]).map_err(|_| Error::NotConfirmed("short".into()))?;
        if c.magic.get() != stream::CONFIRM_MAGIC || c.zero.get() != 0 {
            return Err(Error::NotConfirmed(format!("bad confirmation {b:02x?}")));
        }
        Ok(())
    }
}

/// The destination's verdict on the verification after the commit.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Verdict {
    magic: U32,
    status: U32,
    mismatched_pages: U64,
    resumed_at_unix_ns: U64,
}

impl Verdict {
    /// Send the verdict: `mismatched` pages differ (0: verified); the guest resumed at
    /// `resumed_at_unix_ns` (0: not resumed).
    pub fn send(w: &mut dyn Write, mismatched: u64, resumed_at_unix_ns: u64) -> io::Result<()> {
        let v = Verdict {
            magic: stream::VERDICT_MAGIC.into(),
            status: if mismatched == 0 {
                stream::VERDICT_OK
            } else {
                stream::VERDICT_MISMATCH
            }
            .into(),
            mismatched_pages: mismatched.into(),
            resumed_at_unix_ns: resumed_at_unix_ns.into(),
        };
        w.write_all(v.as_bytes())?;
        w.flush()
    }

    /// Read the verdict within `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::VerificationIncomplete`] saying why.
    pub fn read(r: &mut dyn TransportRead, timeout: Duration) -> Result<Self> {
        let mut b = [0u8; 24];
        read_within(r, &mut b, timeout, None).map_err(|e| {
            Error::VerificationIncomplete(match e {
                ReadFailure::Timeout => format!("no verdict within {timeout:?}"),
                ReadFailure::Eof => "the destination closed the connection".into(),
                other => other.to_string(),
            })
        })?;
        let v = Verdict::read_from_bytes(&b[..])
            .map_err(|_| Error::VerificationIncomplete("short verdict".into()))?;
        if v.magic.get() != stream::VERDICT_MAGIC {
            return Err(Error::VerificationIncomplete(format!(
                "bad verdict {b:02x?}"
            )));
        }
        let consistent = match v.status.get() {
            stream::VERDICT_OK => v.mismatched_pages.get() == 0,
            stream::VERDICT_MISMATCH => v.mismatched_pages.get() > 0,
            _ => false, // a status the table does not define
        };
        if !consistent {
            return Err(Error::VerificationIncomplete(format!(
                "inconsistent verdict {b:02x?}"
            )));
        }
        Ok(v)
    }

    /// Pages that differ (0: verified).
    pub fn mismatched_pages(&self) -> u64 {
        self.mismatched_pages.get()
    }

    /// When the destination resumed the guest, Unix ns (0: it did not).
    pub fn resumed_at_unix_ns(&self) -> u64 {
        self.resumed_at_unix_ns.get()
    }
}

const WANT_MAGIC: u32 = u32::from_le_bytes(*b"WANT");
const DONE_MAGIC: u32 = u32::from_le_bytes(*b"DONE");

/// The destination's messages of the postcopy phase, on the control channel's return path: a
/// request for a page the guest touched while it was missing, and, once, "every missing page
/// arrived".
///
/// # Examples
///
/// ```
/// use clearlog_migration::wire::{PostcopyMessage, PostcopyWant};
///
/// let mut bytes = Vec::new();
/// PostcopyMessage::want(1, 77).write_to(&mut bytes).unwrap();
/// PostcopyMessage::done().write_to(&mut bytes).unwrap();
/// let first = PostcopyMessage::parse(&bytes[..16]).unwrap();
/// assert_eq!(first.wanted(), Some(PostcopyWant { block: 1, page: 77 }));
/// assert_eq!(PostcopyMessage::parse(&bytes[16..]).unwrap().wanted(), None);
/// assert!(PostcopyMessage::parse(&[0; 16]).is_err());
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PostcopyMessage {
    magic: U32,
    block: U32,
    page: U64,
}

/// A page the destination asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyWant {
    /// Block index.
    pub block: u32,
    /// Page index in the block.
    pub page: u64,
}

impl PostcopyMessage {
    /// Size on the wire.
    pub const LEN: usize = 16;

    /// Ask for `page` of `block`.
    pub fn want(block: u32, page: u64) -> Self {
        PostcopyMessage {
            magic: WANT_MAGIC.into(),
            block: block.into(),
            page: page.into(),
        }
    }

    /// Every missing page arrived.
    pub fn done() -> Self {
        PostcopyMessage {
            magic: DONE_MAGIC.into(),
            block: 0.into(),
            page: 0.into(),
        }
    }

    /// The page asked for; `None` for "done".
    pub fn wanted(&self) -> Option<PostcopyWant> {
        (self.magic.get() == WANT_MAGIC).then(|| PostcopyWant {
            block: self.block.get(),
            page: self.page.get(),
        })
    }

    /// Write it (the caller flushes: a request is worth a flush of its own).
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(self.as_bytes())
    }

    /// Parse one message.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`]: not 16 bytes, or neither message.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let m = PostcopyMessage::read_from_bytes(bytes)
            .map_err(|_| Error::Malformed("postcopy message (not 16 bytes)"))?;
        match m.magic.get() {
            WANT_MAGIC => Ok(m),
            DONE_MAGIC if m.block.get() == 0 && m.page.get() == 0 => Ok(m),
            _ => Err(Error::Malformed(
                "postcopy message (neither a request nor done)",
            )),
        }
    }
}

/// Why [`read_within`] did not fill its buffer.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    Timeout,
    Cancelled,
    Eof,
    Io(io::Error),
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFailure::Timeout => write!(f, "timed out"),
            ReadFailure::Cancelled => write!(f, "cancelled"),
            ReadFailure::Eof => write!(f, "the peer closed the connection"),
            ReadFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

/// How often a wait for a small message wakes to check its deadline and a cancel.
const POLL: Duration = Duration::from_millis(100);

/// Fill `buf` from `r` within `timeout`, waking every [`POLL`] for `cancel`. `WouldBlock` and
/// `Interrupted` are the poll; `TimedOut` is a real error (a dead link, `TCP_USER_TIMEOUT`). The
/// read timeout is left off afterwards (reads block again): the caller sets its own for what
/// follows.
pub(crate) fn read_within(
    r: &mut dyn TransportRead,
    buf: &mut [u8],
    timeout: Duration,
    cancel: Option<&CancelToken>,
) -> std::result::Result<(), ReadFailure> {
    let result = poll_read(r, buf, timeout, cancel);
    let cleared = r.set_read_timeout(None);
    result?;
    cleared.map_err(ReadFailure::Io)
}

fn poll_read(
    r: &mut dyn TransportRead,
    buf: &mut [u8],
    timeout: Duration,
    cancel: Option<&CancelToken>,
) -> std::result::Result<(), ReadFailure> {
    let deadline = Instant::now() + timeout;
    let mut got = 0;
    while got < buf.len() {
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(ReadFailure::Cancelled);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadFailure::Timeout);
        }
        r.set_read_timeout(Some(left.min(POLL)))
            .map_err(ReadFailure::Io)?;
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(ReadFailure::Eof),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ReadFailure::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_checks_every_field() {
        let good = Hello::new(KIND_PAGES, [1; 16], 3, 4);
        let bytes = good.as_bytes().to_vec();
        assert_eq!(Hello::parse(&bytes).unwrap().channel(), 3);
        let with = |f: &dyn Fn(&mut Hello)| {
            let mut h = good;
            f(&mut h);
            Hello::parse(h.as_bytes())
        };
        assert!(matches!(
            with(&|h| h.magic = 1.into()),
            Err(Error::BadMagic(1))
        ));
        // A newer source that still speaks version 2 is understood; one that does not is not.
        assert_eq!(with(&|h| h.version = 3.into()).unwrap().version(), 3);
        assert!(matches!(
            with(&|h| {
                h.version = 4.into();
                h.min_version = 3.into();
            }),
            Err(Error::SessionVersion { ours: 2, theirs: 4 })
        ));
        assert!(matches!(
            with(&|h| h.channel = 4.into()),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            with(&|h| h.kind = 9.into()),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            with(&|h| h.reserved = 1.into()),
            Err(Error::Malformed(_))
        ));
        // Found by the `session_wire` fuzz target: a control hello of no page channel made a
        // destination accept a session that could carry no page.
        assert!(matches!(
            with(&|h| {
                h.kind = KIND_CONTROL.into();
                h.channel = 0.into();
                h.channels = 0.into();
            }),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            with(&|h| {
                h.channels = 1000.into();
                h.channel = 0.into();
            }),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            Hello::parse(&bytes[..47]),
            Err(Error::Truncated(_))
        ));
    }

    #[test]
    fn ack_confirm_and_verdict_round_trip() {
        let mut b = Vec::new();
        Ack::send(&mut b, stream::ACK_OK).unwrap();
        Confirm::send(&mut b).unwrap();
        Verdict::send(&mut b, 3, 42).unwrap();
        let mut r = std::io::Cursor::new(b);
        Ack::wait_ok(&mut r, Duration::from_secs(1), &CancelToken::new()).unwrap();
        Confirm::wait(&mut r, Duration::from_secs(1)).unwrap();
        let v = Verdict::read(&mut r, Duration::from_secs(1)).unwrap();
        assert_eq!((v.mismatched_pages(), v.resumed_at_unix_ns()), (3, 42));
        // End of stream: each says so.
        assert!(matches!(
            Confirm::wait(&mut r, Duration::from_secs(1)),
            Err(Error::NotConfirmed(why)) if why.contains("closed")
        ));
    }

    #[test]
    fn a_verdict_of_an_unknown_status_is_refused() {
        // Found by the `session_wire` fuzz target: status 0xa6 with pages was taken as a mismatch.
        let mut b = Vec::new();
        Verdict::send(&mut b, 5, 0).unwrap();
        b[4] = 0xa6;
        assert!(matches!(
            Verdict::read(&mut std::io::Cursor::new(b), Duration::from_secs(1)),
            Err(Error::VerificationIncomplete(why)) if why.contains("inconsistent")
        ));
    }

    #[test]
    fn a_refused_ack_and_garbage_are_errors() {
        let mut b = Vec::new();
        Ack::send(&mut b, stream::ACK_FAILED).unwrap();
        b.extend_from_slice(b"garbage!");
        let mut r = std::io::Cursor::new(b);
        let c = CancelToken::new();
        assert!(matches!(
            Ack::wait_ok(&mut r, Duration::from_secs(1), &c),
            Err(Error::DestinationRefused(1))
        ));
        assert!(matches!(
            Ack::wait_ok(&mut r, Duration::from_secs(1), &c),
            Err(Error::BadAck)
        ));
    }
}
