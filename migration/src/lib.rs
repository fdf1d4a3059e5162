// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Precopy live migration of a guest's RAM and CPU/device state, with loss-free dirty-page tracking
//! built on `KVM_CLEAR_DIRTY_LOG` (chunked re-arming), for any VMM.
//!
//! The engine sees guest memory and dirty logging only through two traits: [`MigrationMemory`]
//! (the RAM blocks, what is populated, reading and writing pages) and [`DirtyTracking`] (start,
//! sync and stop logging; re-arm chunks before they are read; hand over the dirty bits). It
//! depends on no accelerator and, without its default features, on no memory API either (only
//! `clearlog-bitmap`). Two implementations come with it:
//!
//! - feature `clearlog-memory` (default): `clearlog-memory`'s `MemorySystem`, so any accelerator
//!   that implements a `MemoryListener` (such as `clearlog-kvm`'s) works;
//! - feature `vm-memory` (default): a vm-memory `GuestMemoryMmap` as the [`MigrationMemory`], for
//!   a VMM that keeps its own memory and memslots and implements [`DirtyTracking`] itself (with
//!   `clearlog-kvm`'s `VmmSlotCache`: `examples/ch_shaped.rs`).
//!
//! The VMM implements two small traits more, [`VmControl`] (source: pause, resume, save state)
//! and [`VmRestore`] (destination: restore state, resume). docs/adopting.md says which path to
//! take.
//!
//! # Source algorithm
//!
//! 1. Setup: send the header, start global dirty logging, one "to send" bitmap per RAM block with every
//!    page set, and (clear mode) a per-chunk "needs clear" bitmap (`2^shift` pages per chunk). A first
//!    sync tells which chunks the accelerator holds dirty bits for.
//! 2. Iterate: walk the dirty pages in order, one window at a time (a chunk; 16 MiB in legacy mode).
//!    Entering a window: re-arm it in the accelerator if its "needs clear" bit is set (re-arm, then
//!    read, so a guest write after the read is always caught by a later sync), THEN ask the memory
//!    which of its pages are populated ([`MigrationBlock::populated`]): dirty pages that were never
//!    populated go as one zero range, not read. Zero pages read go as a marker. After each pass:
//!    sync, count the newly dirty pages, mark their chunks, and estimate the time to send what is
//!    left at the measured bandwidth (bytes sent / time spent sending, over the whole live phase).
//!    Legacy mode re-arms whole blocks right after each sync instead.
//! 3. Converge when the estimate is within the downtime limit: pause, save the CPU/device state
//!    (before the final sync, so guest RAM that saving writes is sent), sync, send the rest (no
//!    clears: the vCPUs are stopped), the state ([`VerifyMode::Strict`] only: a digest table of all
//!    RAM hashed while paused), the end marker; wait for the acknowledgement; send the
//!    confirmation (the commit); stop logging. [`MigrationStats::downtime_breakdown`] says where the
//!    downtime went. A migration that does not converge within `max_iterations`/`max_time` fails with
//!    [`Error::NotConverged`].
//! 4. Verify ([`VerifyMode::AfterResume`], the default): the destination resumes at the commit; the
//!    source, still paused, reads ALL of its final RAM on all cores (the pages its populated-pages
//!    answer reports are hashed; every other page is read to check it is zero, so a wrong answer
//!    cannot hide a page) and streams the digests of its non-zero pages; the destination compares
//!    them with the pages as it received them and answers with a verdict. A mismatch is
//!    [`Error::VerificationFailed`] on both sides, naming the pages on the destination; the source
//!    stays paused, never resumed by the engine. The destination never asks its own
//!    populated-pages answer: every page it receives as zero it reads, and zeroes if it held data
//!    before the stream. What each mode proves, and what not: [`VerifyMode`].
//! 5. On cancel or any error before the commit, logging stops and the guest is resumed if `pause`
//!    was called.
//!
//! # Stream format (version [`stream::VERSION`] = 1)
//!
//! All integers are little-endian. Bounds in brackets are checked by the decoder before anything is
//! allocated or written.
//!
//! Header:
//!
//! | field        | type      | meaning                                                         |
//! |--------------|-----------|-----------------------------------------------------------------|
//! | magic        | u64       | `b"CLEARLOG"` ([`stream::MAGIC`])                               |
//! | version      | u32       | 1                                                               |
//! | page_size    | u32       | 4096; must equal the destination's                              |
//! | flags        | u32       | bit 0: source waits for an acknowledgement; bit 1: full-RAM digest table ([`VerifyMode::Strict`]); bit 2: the source confirms the acknowledgement ([`stream::FLAG_CONFIRM`]); bit 3: final digests after the end marker ([`VerifyMode::AfterResume`]); exactly one of bits 1 and 3; other bits zero |
//! | block_count  | u32       | \[1, 1024\]                                                     |
//! | blocks       | repeated  | `name_len: u16` \[1, 256\], `name` (UTF-8), `size: u64` (bytes, non-zero page multiple) |
//!
//! The destination requires the same blocks (names and sizes, in order) as its own RAM.
//!
//! Records, each starting with a `u8` tag:
//!
//! | tag    | record  | payload                                                                                     |
//! |--------|---------|---------------------------------------------------------------------------------------------|
//! | `0x01` | pages   | `block: u32`, `count: u32` \[1, 256\], then `count` x (`page: u64` (index in the block, < its pages), `kind: u8` (0 = zero page, 1 = data), `page_size` bytes if kind is 1) |
//! | `0x06` | zero range | `block: u32`, `first_page: u64`, `npages: u64` \[>= 1, inside the block\]: all zero (never populated at the source) |
//! | `0x02` | state   | `name_len: u16` \[1, 256\], `name`, `len: u32` \[<= 64 MiB\], `len` bytes (at most 4096 blobs, 256 MiB in total) |
//! | `0x03` | digests | (bit 1 only) `block: u32`, `count: u64` (= the block's page count), `count` x `u64` xxh3-64 of each page's final content |
//! | `0xff` | end     | `b"CLRLEND!"` as u64, `page_records: u64` (page entries of `0x01` records in the whole stream) |
//!
//! After the end marker (and the handshake below, on a live stream), with bit 3:
//!
//! | tag    | record     | payload                                                                                  |
//! |--------|------------|------------------------------------------------------------------------------------------|
//! | `0x04` | verify     | `block: u32`, `count: u32` \[1, 4096\], `count` x (`page: u64`, `digest: u64`): xxh3-64 of the block's final non-zero pages (unlisted pages are zero) |
//! | `0x05` | verify end | `b"CLRLEND!"` as u64, `entries: u64` (entries of all verify records)                      |
//!
//! Allocation bound: the destination never allocates more than `MAX_STATE_BLOB_BYTES` (64 MiB) for a
//! stream field, and a field whose bytes have not arrived yet costs at most one 1 MiB read step, so any
//! single allocation while decoding `n` bytes of stream is at most `min(64 MiB, 2n + 2 MiB)` (plus the
//! tables sized by the destination's own RAM or by what it received: the digests of the pages received
//! as data). The fuzz targets in `migration/fuzz` enforce this bound with a checking global allocator.
//!
//! Order: header, pages and zero ranges (any number, a page may repeat: the last one wins), state
//! blobs, (bit 1) exactly one digest table per block, end. Pages or state after a digest table are
//! rejected.
//!
//! Acknowledgement (destination to source, only if flag bit 0 is set): `b"ACK1"` as u32, `status: u32`
//! (0 = loaded, checked (strict digests, the VMM's [`VmRestore::check_loaded`]) and restored;
//! 1 = failed, the destination will not resume).
//!
//! Confirmation (source to destination, only if flag bit 2 is set, after a positive acknowledgement):
//! `b"GO!!"` as u32, `0u32`. It is the source's commit point: until a whole confirmation has left the
//! source, any failure resumes the source's guest, and the destination, which resumes only after
//! reading the confirmation, does not. So the guest never runs on both sides. (If the confirmation
//! left but never arrives, neither side runs it: the source stays paused and its owner can resume it.)
//!
//! Verdict (destination to source, bit 3, after the verify end): `b"VRFY"` as u32, `status: u32`
//! (0 = verified, 1 = mismatch), `mismatched_pages: u64`, `resumed_at_unix_ns: u64`.
//!
//! The destination resumes the guest only after the end marker, (bit 1) a digest match of every page,
//! the VMM's check, a successful `restore_state`, a sent acknowledgement and (bit 2) the source's
//! confirmation; a snapshot file (no acknowledgement) is verified (bit 3) before it resumes.
//! Truncation at any byte, an unknown version, a page-size or layout mismatch, a page outside its
//! block, an oversized field and a digest mismatch each give their own [`Error`] variant.
//!
//! # Sessions (protocol version [`wire::SESSION_VERSION`] = 2)
//!
//! A session is one control channel and N page channels (1 to [`wire::MAX_CHANNELS`]; default
//! [`DEFAULT_CHANNELS`]), each a connection of its own. Every connection starts with a
//! [`wire::Hello`] (its kind, the session's random id, its channel index, the channel count, the
//! versions the source speaks) and waits for the destination's [`wire::HelloReply`]; the control
//! channel comes first, then the page channels in order. The destination picks the version (a
//! later source that still speaks 2 runs 2; one that does not is told which version the
//! destination speaks: [`Error::SessionVersion`] names both).
//!
//! The control channel then carries the version-1 stream above without its pages: the header's
//! fields (from `page_size` on), the state blobs, the digest tables, the end marker, and in the
//! other direction the acknowledgement, the confirmation, the verify records and the verdict (the
//! [`wire`] messages, read and written in one place). Each page channel carries page and zero-range
//! records, then a channel end (`0x07`, `b"CLRLEND!"` as u64, `page_records: u64` of this channel).
//! The destination loads every page channel on its own thread, in the order of that channel; the
//! control channel's end marker counts the page records of all channels.
//!
//! Before it switches over, the source drains: a drain record on the control channel (`0x08`,
//! `channels: u32`, then per page channel the page records it carried so far) is answered with
//! [`wire::Drained`] once the destination has loaded all of them. A destination slower than the
//! link holds a backlog in its channels' socket buffers (tens of MiB on Linux TCP); without the
//! drain the paused phase would wait for it. The source then syncs again and switches over only
//! if what its guest dirtied meanwhile still fits the downtime limit
//! ([`MigrationStats::drain_ms`]). A version-1 stream has no return path to ask on.
//!
//! A page always travels on the same channel: the source walks RAM in windows (a clear chunk; 16
//! MiB in legacy mode) and window `w` of a block goes on channel `w % N`, in every pass, the final
//! one included. So two copies of a page are ordered by their one channel, and a newer copy can
//! never be overwritten by an older one however the channels are delayed against each other.
//! Zero detection and hashing run on the channel threads; the bandwidth limit is one token bucket
//! shared by every channel ([`SharedBucket`]).
//!
//! With TLS ([`SessionOptions::tls`], [`ListenOptions::tls`]) every connection runs mutual TLS 1.3
//! before its hello ([`tls`]); every connection of a session must present the same client
//! certificate. A destination that is waiting refuses (and logs) every connection that is not
//! the start of a migration it can take, and keeps waiting: [`accept_incoming`].
//!
//! A `file:` snapshot is one version-1 stream; a destination reads version-1 streams (a file, or a
//! connection of a source that sends one: `vmm run --channels 0`) as before.
//!
//! # Transports
//!
//! [`connect_session`] opens a session to `tcp:HOST:PORT` or `unix:PATH`; [`open_session`] over a
//! [`ChannelConnector`] of your own (vsock, pre-connected descriptors). [`Listener::accept_incoming`]
//! accepts either a session or a version-1 stream; [`accept_incoming`] over a [`ChannelAcceptor`]
//! of your own. [`connect`] / [`Listener::bind`] take `tcp:HOST:PORT`, `unix:PATH` or `file:PATH`
//! for one version-1 stream (a migration to a file is a snapshot: no acknowledgement; restoring
//! reads it back). [`mem_channel`] connects two in-process ends for tests. Any `Read`/`Write` pair
//! works through [`Transport::new`].
//!
//! # Example
//!
//! See [`Source`] for an in-process migration over [`mem_channel`].
#![deny(unreachable_pub)]

mod cancel;
mod config;
mod cpu;
mod destination;
mod digest;
pub mod dirtyrate;
mod error;
#[cfg(feature = "vm-memory")]
mod guest_memory;
mod loader;
mod memory;
#[cfg(feature = "clearlog-memory")]
mod memory_system;
mod postcopy;
mod ratelimit;
mod sender;
mod session;
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "the live snapshot will call it")
)]
mod snapshot;
mod source;
mod stats;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
mod transport;
mod vm;
pub mod wire;

pub use cancel::CancelToken;
/// The bitmaps [`DirtyTracking`] passes (`clearlog-bitmap`'s, re-exported: an implementation
/// needs no other dependency).
pub use clearlog_bitmap::{Bitmap, ClearBitmap};
pub use config::{
    chunk_bytes_to_shift, shift_to_chunk_bytes, MigrationConfig, MigrationDirtyLogMode,
    PostcopyPolicy, VerifyMode, DEFAULT_ACK_TIMEOUT, DEFAULT_CLEAR_SHIFT, DEFAULT_DOWNTIME_LIMIT,
    DEFAULT_MID_PASS_SYNC,
};
pub use cpu::{process_cpu_time, thread_cpu_time};
pub use destination::{Destination, DEFAULT_CONFIRM_TIMEOUT};
pub use digest::{page_digests, ram_fingerprint};
pub use error::{BoxError, Error, Result};
#[cfg(feature = "vm-memory")]
pub use guest_memory::GuestMemoryBlock;
pub use memory::{
    DirtyTracking, HostMapping, MemoryResult, MigrationBlock, MigrationMemory, PAGE_SHIFT,
    PAGE_SIZE,
};
pub use ratelimit::{RateLimitedWriter, SharedBucket, TokenBucket};
pub use session::{
    accept_incoming, connect_session, open_session, Accepted, ChannelAcceptor, ChannelConnector,
    Incoming, IncomingSession, ListenOptions, Session, SessionOptions, DEFAULT_CHANNELS,
    DEFAULT_HANDSHAKE_TIMEOUT,
};
pub use source::Source;
pub use stats::{
    ChannelStats, DowntimeBreakdown, IncomingStats, IterationStats, MigrationStats, Progress,
};
pub use tls::{tls_client, tls_server, PeerIdentity, TlsClient, TlsError, TlsFiles, TlsServer};
pub use transport::{
    connect, connect_with, mem_channel, peek_header, pipe, ConnectOptions, Listener, MigrationUri,
    PipeReader, PipeWriter, Transport, TransportRead, DEFAULT_IO_TIMEOUT,
};
pub use vm::{StateBlob, VmControl, VmRestore};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
