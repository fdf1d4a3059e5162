// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate's error type.

use std::time::Duration;

use clearlog_bitmap::format_size;

/// An error from a VMM hook ([`crate::VmControl`], [`crate::VmRestore`]); boxed so a VMM keeps its own
/// error types.
///
/// # Examples
///
/// ```
/// let e: clearlog_migration::BoxError = "vCPU thread gone".into();
/// assert_eq!(e.to_string(), "vCPU thread gone");
/// ```
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the migration engine, the stream codec and the transports.
///
/// Every failure of the incoming stream has its own variant, so a caller (or a test) can tell a
/// truncated stream from a corrupted one or from a layout mismatch.
///
/// # Examples
///
/// ```
/// use clearlog_migration::Error;
///
/// let err = Error::UnsupportedVersion { found: 9, supported: 1 };
/// assert_eq!(err.to_string(), "unsupported stream version 9 (this build reads version 1)");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- configuration ----
    /// The clear-bitmap shift is outside `6..=31`.
    #[error("clear-bitmap shift {0} out of range (6..=31)")]
    ClearShiftOutOfRange(u8),
    /// A clear chunk size in bytes is not a power-of-two multiple of the page size of at least 256 KiB
    /// and at most 2^31 pages.
    #[error(
        "clear chunk size {} invalid: must be a power of two between 256K and 8T",
        format_size(*.0)
    )]
    InvalidClearChunkBytes(u64),
    /// The downtime limit is zero.
    #[error("downtime limit must be greater than zero")]
    ZeroDowntimeLimit,
    /// `max_iterations`, `max_time` or `mid_pass_sync` is `Some(0)`, or postcopy is asked for
    /// after 0 passes.
    #[error(
        "iteration limit, time limit, mid-pass sync interval and passes before postcopy must be \
         greater than zero when set"
    )]
    ZeroMigrationLimit,
    /// A dirty-rate measurement or convergence prediction was asked with impossible settings (a
    /// zero window, no sampled pages, a zero bandwidth...).
    #[error("dirty rate: {0}")]
    InvalidDirtyRate(String),

    // ---- source side ----
    /// Guest memory or its dirty tracking (an accelerator's listener, an out-of-range access...)
    /// failed.
    #[error("guest memory, {op}: {source}")]
    Memory {
        /// What the engine was doing (`syncing the dirty log`, `reading a page`...).
        op: &'static str,
        /// The memory implementation's error (a `clearlog_memory::Error` for a `MemorySystem`).
        #[source]
        source: BoxError,
    },
    /// A [`crate::VmControl`] or [`crate::VmRestore`] hook failed.
    #[error("VMM hook `{hook}` failed: {source}")]
    Vm {
        /// The hook's name (`pause`, `resume`, `save_state`, `restore_state`, `set_throttle`).
        hook: &'static str,
        /// The VMM's error.
        #[source]
        source: BoxError,
    },
    /// The migration was cancelled through its [`crate::CancelToken`].
    #[error("migration cancelled")]
    Cancelled,
    /// The migration did not converge within the configured iteration or time limit.
    #[error(
        "migration did not converge: {iterations} iterations in {elapsed:?}, {} still dirty \
         (estimated {expected_downtime:?} to send, limit {downtime_limit:?})",
        format_size(*remaining_bytes)
    )]
    NotConverged {
        /// Iterations done.
        iterations: u32,
        /// Time spent.
        elapsed: Duration,
        /// Dirty bytes left after the last sync.
        remaining_bytes: u64,
        /// Estimated time to send them at the measured bandwidth.
        expected_downtime: Duration,
        /// The configured downtime limit.
        downtime_limit: Duration,
    },
    /// The destination did not acknowledge within the acknowledgement timeout.
    #[error("no acknowledgement from the destination within {0:?}")]
    AckTimeout(Duration),
    /// The destination did not load what the source had sent within the time (a session's drain
    /// before the switchover).
    #[error("the destination did not catch up within {0:?}")]
    DrainTimeout(Duration),
    /// The destination answered with a refusal (it failed to load or verify the stream).
    #[error("destination refused the migration (status {0})")]
    DestinationRefused(u32),
    /// The destination's answer is not an acknowledgement.
    #[error("malformed acknowledgement from the destination")]
    BadAck,

    // ---- transport ----
    /// An I/O error of the transport.
    #[error("transport I/O during {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A session connection's handshake failed (the hello exchange, the header, the peer's
    /// answer did not come or was not one).
    #[error("session handshake: {0}")]
    Handshake(String),
    /// The destination refused a session connection.
    #[error("the destination refused the session: {0}")]
    SessionRefused(&'static str),
    /// The two sides speak no common protocol version.
    #[error(
        "protocol version mismatch: this side speaks version {ours}, the peer version {theirs}"
    )]
    SessionVersion {
        /// The version this side speaks.
        ours: u32,
        /// The highest version the peer speaks.
        theirs: u32,
    },
    /// A TCP listener on an address other than loopback was asked for without TLS.
    #[error(
        "refusing to listen on {addr} without TLS: anyone who reaches it could write the guest's \
         memory; give TLS files, or allow plaintext explicitly"
    )]
    PlaintextRefused {
        /// The address.
        addr: String,
    },
    /// A TLS handshake failed: either side refused the other's certificate, or the peer does
    /// not speak TLS, or it stalled.
    #[error("TLS handshake failed")]
    Tls(#[source] crate::tls::TlsError),
    /// TLS was asked for where it cannot run: it runs over TCP connections that clearlog opens or
    /// accepts itself.
    #[error("TLS runs over TCP only: {0}")]
    TlsNeedsTcp(&'static str),
    /// A page channel of a session failed.
    #[error("page channel {index}: {source}")]
    Channel {
        /// The channel's index.
        index: u32,
        /// What went wrong on it.
        #[source]
        source: Box<Error>,
    },
    /// A migration URI could not be parsed.
    #[error("invalid migration URI `{uri}`: {reason}")]
    InvalidUri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    // ---- incoming stream ----
    /// The stream does not start with the magic number.
    #[error("not a clearlog migration stream (magic {0:#018x})")]
    BadMagic(u64),
    /// The stream's version is not one this build reads.
    #[error("unsupported stream version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the stream.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The stream's page size differs from ours.
    #[error("page size mismatch: stream has {stream}, destination uses {local}")]
    PageSizeMismatch {
        /// Page size in the stream.
        stream: u32,
        /// Our page size.
        local: u32,
    },
    /// The stream ended before its end marker (cut at `context`).
    #[error("stream truncated while reading {0}")]
    Truncated(&'static str),
    /// A size field exceeds its bound (see the crate docs for each bound).
    #[error("{what} of {value} exceeds the limit of {limit}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// The value read.
        value: u64,
        /// The bound.
        limit: u64,
    },
    /// A size field is malformed (zero where it must not be, not a page multiple, not UTF-8...).
    #[error("malformed {0} in stream")]
    Malformed(&'static str),
    /// The declared RAM layout differs from the destination's.
    #[error("RAM layout mismatch: {0}")]
    LayoutMismatch(String),
    /// A record tag that this version does not define.
    #[error("unknown record tag {0:#04x}")]
    UnknownRecord(u8),
    /// A record refers to a RAM block index not in the header.
    #[error("record refers to RAM block {index}, but the stream declares {count} blocks")]
    BlockOutOfRange {
        /// The index read.
        index: u32,
        /// Declared block count.
        count: u32,
    },
    /// A page record lies outside its RAM block.
    #[error("page {page} outside RAM block `{block}` of {pages} pages")]
    PageOutOfRange {
        /// Block name.
        block: String,
        /// Page index read.
        page: u64,
        /// Block size in pages.
        pages: u64,
    },
    /// Records appear in an order the format forbids (pages after the digest table, a digest table
    /// sent twice...).
    #[error("unexpected record: {0}")]
    UnexpectedRecord(&'static str),
    /// The digest table does not cover every block exactly once before the end marker.
    #[error("digest table missing for RAM block `{0}`")]
    MissingDigests(String),
    /// The destination acknowledged but the source's confirmation did not come: the source may be
    /// running the guest, so the destination does not resume it.
    #[error(
        "the source did not confirm the migration ({0}): not resuming, the source keeps the guest"
    )]
    NotConfirmed(String),
    /// The destination's memory at switchover differs from the source's final memory
    /// ([`crate::VerifyMode::AfterResume`]): a page lost by dirty tracking, a lost or corrupted
    /// record. Reported on both sides. The source stays paused (its guest intact, never resumed by
    /// the engine): its owner can stop the destination and resume the source.
    #[error(
        "verification FAILED: {mismatched_pages} page(s) of the destination differ from the source's \
         final memory ({first}); {after}"
    )]
    VerificationFailed {
        /// How many pages differ.
        mismatched_pages: u64,
        /// The first ones, as `block page N` (the destination knows them exactly; a source gets them
        /// from the verdict only as a count).
        first: String,
        /// What state each side is in.
        after: &'static str,
    },
    /// The verification did not complete after the commit (the peer went away, a timeout): the
    /// destination may be running an unverified guest.
    #[error("verification incomplete after the commit: {0}")]
    VerificationIncomplete(String),
    /// No migration arrived before the listener's deadline (`ListenOptions::accept_deadline`).
    #[error("no migration arrived before the deadline")]
    AcceptTimeout,
    // ---- postcopy ----
    /// Postcopy was asked for on a stream without a return path (a version-1 stream, a file).
    #[error("postcopy needs a session with a return path (tcp: or unix:), not a version-1 stream or a file")]
    PostcopyNeedsSession,
    /// The destination cannot run its guest with pages missing (no userfaultfd, a block without
    /// a mapping it may register): it refused before anything was committed.
    #[error("postcopy is not possible on this destination: {0}")]
    PostcopyUnavailable(String),
    /// A step of the postcopy phase failed after the commit: the guest belongs to the
    /// destination, whose missing pages only the paused source holds.
    #[error("postcopy failed while {context}")]
    Postcopy {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A page of the loaded RAM does not match the source's digest.
    #[error("digest mismatch in RAM block `{block}`, page {page} ({mismatched} mismatched pages in total)")]
    DigestMismatch {
        /// Block name of the first mismatching page.
        block: String,
        /// First mismatching page.
        page: u64,
        /// Number of mismatching pages.
        mismatched: u64,
    },
}

/// Result alias of this crate.
///
/// # Examples
///
/// ```
/// fn check() -> clearlog_migration::Result<()> { Ok(()) }
/// check().unwrap();
/// ```
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap a memory implementation's error, naming what the engine was doing.
    pub(crate) fn memory(op: &'static str) -> impl FnOnce(BoxError) -> Error {
        move |source| Error::Memory { op, source }
    }

    /// Wrap an I/O error, turning `UnexpectedEof` into [`Error::Truncated`].
    /// The error of a transport without the `half` (`"read"` or `"write"`) a step needs.
    pub(crate) fn no_half(context: &'static str, half: &str) -> Error {
        let what = format!("transport has no {half} half");
        Error::Io {
            context,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Truncated(context)
            } else {
                Error::Io { context, source }
            }
        }
    }
}

/// `e` and its sources, joined with ": " (for logs: every message is short and never repeats its
/// source).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_are_printed_in_units() {
        let e = Error::NotConverged {
            iterations: 30,
            elapsed: Duration::from_millis(1500),
            remaining_bytes: 48 << 20,
            expected_downtime: Duration::from_millis(120),
            downtime_limit: Duration::from_millis(100),
        };
        assert_eq!(
            e.to_string(),
            "migration did not converge: 30 iterations in 1.5s, 48M still dirty (estimated 120ms \
             to send, limit 100ms)"
        );
    }
}
