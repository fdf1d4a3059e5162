// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination side: load, verify, restore, acknowledge, resume.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use xxhash_rust::xxh3::xxh3_64;

use crate::cpu::{ns_per_page, process_cpu_time, thread_cpu_time};

use crate::digest::{hash_threads, page_digests};
use crate::memory::is_zero_page;
use crate::stats::{ChannelStats, IncomingStats};
use crate::stream::Header;
use crate::stream::{
    self, PageEntry, Record, StreamReader, VerifyRecord, FLAG_ACK_REQUESTED, FLAG_CONFIRM,
    FLAG_DIGEST_FULL, FLAG_VERIFY_AFTER,
};
use crate::transport::TransportRead;
use crate::wire::{Ack, Confirm, Drained, Verdict};
use crate::{
    Error, Incoming, MigrationBlock, MigrationMemory, Result, StateBlob, Transport, VmRestore,
    PAGE_SIZE,
};

/// The control channel's record reader.
type ControlReader = StreamReader<BufReader<Box<dyn TransportRead>>>;

/// The reader of the control channel's records, and the bytes of a session's header (read while
/// the session was accepted: counted with the stream).
fn control_reader(
    reader: Option<Box<dyn TransportRead>>,
    session_header: Option<&Header>,
) -> Result<(ControlReader, u64)> {
    let reader = reader.ok_or_else(|| Error::no_half("starting the incoming migration", "read"))?;
    let buffered = BufReader::with_capacity(READ_BUFFER, reader);
    Ok(match session_header {
        // The header came before the page channels joined: what follows are records.
        Some(h) => {
            let mut b = Vec::new();
            let _ = h.write_fields_to(&mut b);
            (StreamReader::with_layout(buffered, h), b.len() as u64)
        }
        None => (StreamReader::new(buffered), 0),
    })
}

/// Strict verification: hash all of our RAM and compare it with the source's tables before
/// anything resumes.
fn check_strict_digests<B: MigrationBlock>(
    blocks: &[B],
    digests: Vec<Option<Vec<u64>>>,
) -> Result<()> {
    let threads = hash_threads();
    for (ram, table) in blocks.iter().zip(digests) {
        let table = table.ok_or_else(|| Error::MissingDigests(ram.name().to_string()))?;
        let local = page_digests(ram, threads)?;
        let mut bad = local
            .iter()
            .zip(&table)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64);
        if let Some(page) = bad.next() {
            return Err(Error::DigestMismatch {
                block: ram.name().to_string(),
                page,
                mismatched: 1 + bad.count() as u64,
            });
        }
    }
    Ok(())
}

/// CPU per page record received: this thread's while it loaded (`load_cpu`), and the page
/// channels' threads'.
fn ns_per_page_received(stats: &IncomingStats, load_cpu: Duration) -> f64 {
    let channels_cpu: f64 = stats
        .channel_stats
        .iter()
        .map(|c| c.ns_per_page * c.pages as f64)
        .sum();
    if stats.pages_received == 0 {
        0.0
    } else {
        (load_cpu.as_nanos() as f64 + channels_cpu) / stats.pages_received as f64
    }
}

/// Capacity of the incoming buffer (1 MiB).
const READ_BUFFER: usize = 1 << 20;

/// How long the destination waits, after resuming, for each part of the source's final digests
/// (the source reads all of its RAM first: seconds for a big guest).
const VERIFY_WAIT: Duration = Duration::from_secs(600);

/// The incoming side of a migration, loading into the RAM blocks of its own memory (a
/// `clearlog-memory` `MemorySystem`, or anything that implements [`MigrationMemory`]), which must
/// have the source's layout: same block names and sizes, in the same order.
///
/// A guest is never resumed from a stream that did not reach its end marker, nor before the
/// source's confirmation (live migrations), nor (strict verification, or a snapshot file) before its
/// memory was checked against the source's final memory. With the default verification the check
/// runs right after resuming, and a mismatch is [`Error::VerificationFailed`] naming the pages.
/// See [`crate::Source`] for a complete example.
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
/// use clearlog_migration::{BoxError, Destination, Error, StateBlob, Transport, VmRestore};
///
/// struct Vm;
/// impl VmRestore for Vm {
///     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
///     fn resume(&self) -> Result<(), BoxError> { panic!("never resumed from a bad stream") }
/// }
/// let mem = MemorySystem::new();
/// mem.add_ram("ram", 0, 1 << 20).unwrap();
/// let garbage: &'static [u8] = b"not a migration stream";
/// let err = Destination::new(&mem).receive(Transport::new(Some(Box::new(garbage)), None), &Vm).unwrap_err();
/// assert!(matches!(err, Error::BadMagic(_)));
/// ```
#[derive(Debug)]
pub struct Destination<'a, M: ?Sized> {
    mem: &'a M,
    confirm_timeout: Duration,
}

/// How long a destination waits for the source's confirmation after acknowledging (default of
/// [`Destination::with_confirm_timeout`]).
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl<'a, M: MigrationMemory + ?Sized> Destination<'a, M> {
    /// A destination loading into `mem`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::new();
    /// let _dst = clearlog_migration::Destination::new(&mem);
    /// ```
    pub fn new(mem: &'a M) -> Self {
        Destination {
            mem,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        }
    }

    /// How long to wait, after acknowledging, for the source's confirmation before giving up
    /// without resuming (default [`DEFAULT_CONFIRM_TIMEOUT`]). Only streams whose source asked for
    /// the handshake ([`crate::stream::FLAG_CONFIRM`]) have one.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mem = clearlog_memory::MemorySystem::new();
    /// let _dst = clearlog_migration::Destination::new(&mem).with_confirm_timeout(Duration::from_secs(5));
    /// ```
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Load the stream, verify it, restore the state, acknowledge (if the source asked), then resume.
    ///
    /// # Examples
    ///
    /// Restoring a snapshot file (`file:` URI; see [`crate::Source`] for a live migration):
    ///
    /// ```no_run
    /// # use clearlog_migration::{connect, BoxError, CancelToken, Destination, Listener, MigrationConfig, Source, StateBlob, VmControl, VmRestore};
    /// # struct Vm;
    /// # impl VmRestore for Vm {
    /// #     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
    /// #     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
    /// # }
    /// let mem = clearlog_memory::MemorySystem::new();
    /// mem.add_ram("ram", 0, 1 << 30).unwrap();
    /// let transport = Listener::bind("file:/tmp/vm.snap").unwrap().accept().unwrap();
    /// let stats = Destination::new(&mem).receive(transport, &Vm).unwrap();
    /// assert!(stats.resumed);
    /// ```
    pub fn receive(&self, transport: Transport, vm: &dyn VmRestore) -> Result<IncomingStats> {
        self.receive_with(transport, Vec::new(), None, None, vm, true)
    }

    /// Like [`receive`](Self::receive) but returns without resuming: RAM is loaded, the state
    /// restored, the acknowledgement sent, the source's confirmation received and the memory
    /// verified (with the default verification the source's final digests are read before this
    /// returns: the time it takes is downtime here). The caller resumes the guest (for example
    /// after saving or inspecting its memory).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use clearlog_migration::{connect, BoxError, CancelToken, Destination, Listener, MigrationConfig, Source, StateBlob, VmControl, VmRestore};
    /// # struct Vm;
    /// # impl VmRestore for Vm {
    /// #     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
    /// #     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
    /// # }
    /// let mem = clearlog_memory::MemorySystem::new();
    /// mem.add_ram("ram", 0, 1 << 30).unwrap();
    /// let listener = Listener::bind("tcp:0.0.0.0:4444").unwrap();
    /// let stats = Destination::new(&mem).receive_paused(listener.accept().unwrap(), &Vm).unwrap();
    /// assert!(stats.acked && !stats.resumed);
    /// // ... inspect or save `mem` ...
    /// Vm.resume().unwrap();
    /// ```
    pub fn receive_paused(
        &self,
        transport: Transport,
        vm: &dyn VmRestore,
    ) -> Result<IncomingStats> {
        self.receive_with(transport, Vec::new(), None, None, vm, false)
    }

    /// Receive what [`crate::Listener::accept_incoming`] accepted: a version-1 stream (a
    /// connection or a `file:` snapshot) or a session, whose page channels are loaded by a thread
    /// each (reading, copying into guest RAM, checking zero pages and hashing run there) while
    /// the control channel is read here. Otherwise as [`receive`](Self::receive).
    ///
    /// # Examples
    ///
    /// A migration over a session of two page channels:
    ///
    /// ```
    /// use clearlog_memory::MemorySystem;
    /// use clearlog_migration::{
    ///     connect_session, BoxError, CancelToken, Destination, ListenOptions, Listener,
    ///     MigrationConfig, SessionOptions, Source, StateBlob, VmControl, VmRestore,
    /// };
    ///
    /// struct Vm;
    /// impl VmControl for Vm {
    ///     fn pause(&self) -> Result<(), BoxError> { Ok(()) }
    ///     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
    ///     fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> { Ok(vec![]) }
    /// }
    /// impl VmRestore for Vm {
    ///     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
    ///     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
    /// }
    /// let src = MemorySystem::new();
    /// src.add_ram("ram", 0, 4 << 20).unwrap();
    /// src.ram_blocks()[0].write(12345, b"hello").unwrap();
    /// let dst = MemorySystem::new();
    /// dst.add_ram("ram", 0, 4 << 20).unwrap();
    ///
    /// let listener = Listener::bind("tcp:127.0.0.1:0").unwrap();
    /// let uri = listener.local_uri().unwrap();
    /// std::thread::scope(|s| {
    ///     let d = s.spawn(|| {
    ///         let incoming = listener.accept_incoming(&ListenOptions::default()).unwrap();
    ///         Destination::new(&dst).receive_incoming(incoming, &Vm)
    ///     });
    ///     let session = connect_session(&uri, &SessionOptions::default().with_channels(2)).unwrap();
    ///     let stats = Source::new(&src, MigrationConfig::default()).unwrap()
    ///         .migrate_session(session, &Vm, None, &CancelToken::new()).unwrap();
    ///     assert!(stats.verified && stats.page_channels == 2);
    ///     assert!(d.join().unwrap().unwrap().verified);
    /// });
    /// let mut buf = [0u8; 5];
    /// dst.ram_blocks()[0].read(12345, &mut buf).unwrap();
    /// assert_eq!(&buf, b"hello");
    /// ```
    pub fn receive_incoming(
        &self,
        incoming: Incoming,
        vm: &dyn VmRestore,
    ) -> Result<IncomingStats> {
        self.receive_incoming_with(incoming, vm, true)
    }

    /// [`receive_incoming`](Self::receive_incoming) without resuming, as
    /// [`receive_paused`](Self::receive_paused).
    pub fn receive_incoming_paused(
        &self,
        incoming: Incoming,
        vm: &dyn VmRestore,
    ) -> Result<IncomingStats> {
        self.receive_incoming_with(incoming, vm, false)
    }

    fn receive_incoming_with(
        &self,
        incoming: Incoming,
        vm: &dyn VmRestore,
        resume: bool,
    ) -> Result<IncomingStats> {
        match incoming {
            Incoming::Stream { transport, .. } => {
                self.receive_with(transport, Vec::new(), None, None, vm, resume)
            }
            Incoming::Session(s) => self.receive_with(
                s.control,
                s.pages,
                Some(s.header),
                s.control_cut,
                vm,
                resume,
            ),
        }
    }

    fn receive_with(
        &self,
        control: Transport,
        pages: Vec<Transport>,
        session_header: Option<Header>,
        control_cut: Option<Box<dyn Fn() + Send + Sync>>,
        vm: &dyn VmRestore,
        resume: bool,
    ) -> Result<IncomingStats> {
        let start = Instant::now();
        let cpu_start = (process_cpu_time(), thread_cpu_time());
        let (mut r, header_bytes) = control_reader(control.reader, session_header.as_ref())?;
        let mut writer = control.writer;
        let mut stats = IncomingStats {
            page_channels: pages.len() as u32,
            ..IncomingStats::default()
        };
        let mut flags = 0;
        let mut received = Received::default();
        let loaded = self.load(
            &mut r,
            (session_header, pages, control_cut.as_deref()),
            writer.as_mut().map(|w| w.as_mut() as &mut dyn Write),
            &mut stats,
            &mut flags,
            &mut received,
        );
        let load_cpu = thread_cpu_time().saturating_sub(cpu_start.1);
        stats.dest_ns_per_page = ns_per_page_received(&stats, load_cpu);
        let wants_ack = flags & FLAG_ACK_REQUESTED != 0;
        let wants_confirm = wants_ack && flags & FLAG_CONFIRM != 0;
        let verify_after = flags & FLAG_VERIFY_AFTER != 0;
        stats.bytes_received += r.bytes_read();
        stats.load_time_ms = start.elapsed().as_secs_f64() * 1000.0;
        let ack_target = if wants_ack { writer.as_mut() } else { None };
        let refuse = |ack_target: Option<&mut Box<dyn Write + Send>>, e: Error| {
            if let Some(w) = ack_target {
                let _ = Ack::send(w.as_mut(), stream::ACK_FAILED);
            }
            e
        };
        let state = match loaded {
            Ok(state) => state,
            Err(e) => return Err(refuse(ack_target, e)),
        };
        let vm_err = |hook| move |source| Error::Vm { hook, source };
        // A snapshot (no source waiting for us) is verified before anything else happens to it.
        let mut verified_early = false;
        if verify_after && !wants_ack {
            self.verify_now(&mut r, &mut stats, std::mem::take(&mut received), None)?;
            verified_early = true;
        }
        if let Err(e) = vm.check_loaded().map_err(vm_err("check_loaded")) {
            return Err(refuse(ack_target, e));
        }
        if let Err(e) = vm.restore_state(&state).map_err(vm_err("restore_state")) {
            return Err(refuse(ack_target, e));
        }
        match ack_target {
            Some(w) => {
                // If the acknowledgement cannot be sent the source resumes its guest: we must not.
                Ack::send(w.as_mut(), stream::ACK_OK)
                    .map_err(Error::io("sending the acknowledgement"))?;
                stats.acked = true;
                if wants_confirm {
                    // Resume only once the source has committed: without its confirmation it
                    // may resume its own copy of the guest.
                    Confirm::wait(&mut ConfirmReader(r.get_mut()), self.confirm_timeout)?;
                }
            }
            None if wants_ack => {
                return Err(Error::no_half("sending the acknowledgement", "write"))
            }
            None => {}
        }
        // A live destination resumes as soon as the source committed, then verifies.
        if resume {
            vm.resume().map_err(vm_err("resume"))?;
            stats.resumed = true;
            stats.resumed_at_unix_ns = crate::source::unix_ns();
        }
        if verify_after && !verified_early {
            // The source hashes and checks all of its RAM before its digests come: a bound for a
            // source that went silent, generous for a big guest.
            r.get_mut()
                .get_mut()
                .set_read_timeout(Some(VERIFY_WAIT))
                .map_err(Error::io("waiting for the final digests"))?;
            let verdict_to = writer.as_mut().map(|w| w.as_mut() as &mut dyn Write);
            self.verify_now(&mut r, &mut stats, received, verdict_to)?;
        }
        stats.verified = true;
        stats.bytes_received = r.bytes_read()
            + header_bytes
            + stats.channel_stats.iter().map(|c| c.bytes).sum::<u64>();
        stats.cpu_s = process_cpu_time().saturating_sub(cpu_start.0).as_secs_f64();
        stats.migration_thread_cpu_s = thread_cpu_time().saturating_sub(cpu_start.1).as_secs_f64();
        Ok(stats)
    }

    /// Read the source's final digests, compare them with the pages as received, answer with the
    /// verdict (`verdict_to`, a live source), and fail naming the pages that differ.
    fn verify_now<R: Read>(
        &self,
        r: &mut StreamReader<R>,
        stats: &mut IncomingStats,
        received: Received,
        verdict_to: Option<&mut dyn Write>,
    ) -> Result<()> {
        let t = Instant::now();
        let result = verify_after_resume(r, &self.mem.blocks(), received);
        stats.verify_after_ms = t.elapsed().as_secs_f64() * 1000.0;
        let mismatched = result.map_err(|e| Error::VerificationIncomplete(e.to_string()))?;
        stats.mismatched_pages = mismatched.count;
        if let Some(w) = verdict_to {
            Verdict::send(w, mismatched.count, stats.resumed_at_unix_ns)
                .map_err(|e| Error::VerificationIncomplete(format!("sending the verdict: {e}")))?;
        }
        if mismatched.count > 0 {
            return Err(Error::VerificationFailed {
                mismatched_pages: mismatched.count,
                first: mismatched.first.join(", "),
                after: if stats.resumed {
                    "this destination guest is RUNNING on wrong memory: stop it; the source \
                     still holds the guest, paused"
                } else {
                    "this destination did not resume the guest"
                },
            });
        }
        Ok(())
    }

    /// Read everything up to the end marker and verify the digests; returns the state blobs.
    ///
    /// `received` gets, per block, the xxh3-64 of every page received as data (the last version
    /// of each; a zero page removes its entry): what the verification after resuming compares with
    /// the source's final memory. Memory proportional to the pages received as data.
    ///
    /// A session (`session_header` read already, `pages` its page channels): each page channel is
    /// loaded by a thread of its own up to its channel end, while the control channel is read
    /// here up to the end marker; pages on the control channel are refused.
    fn load<R: std::io::BufRead>(
        &self,
        r: &mut StreamReader<R>,
        (session_header, pages, control_cut): Channels<'_>,
        reply: Option<&mut dyn Write>,
        stats: &mut IncomingStats,
        flags: &mut u32,
        received: &mut Received,
    ) -> Result<Vec<StateBlob>> {
        let session = session_header.is_some();
        let header = match session_header {
            Some(h) => h,
            None => r.read_header(PAGE_SIZE as u32)?,
        };
        *flags = header.flags;
        let full = header.flags & FLAG_DIGEST_FULL != 0;
        let track = header.flags & FLAG_VERIFY_AFTER != 0;
        if full == track {
            return Err(Error::Malformed(
                "header flags (exactly one verification: full digest table or after resuming)",
            ));
        }
        let blocks = self.mem.blocks();
        check_layout(&blocks, &header)?;
        let progress = ChannelProgress::new(pages.len());
        let (state, digests) = std::thread::scope(|scope| -> Result<_> {
            let threads: Vec<_> = pages
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    let (blocks, header, progress) = (&blocks, &header, &progress);
                    scope.spawn(move || {
                        let loaded = &progress.loaded[i];
                        let r = load_channel(i as u32, t, blocks, header, track, loaded);
                        if r.is_err() {
                            progress.failed.store(true, Ordering::Release);
                            // Wake the control channel's reader: the migration is over.
                            if let Some(cut) = control_cut {
                                cut();
                            }
                        }
                        r
                    })
                })
                .collect();
            let mut inline = PageLoader::new(&blocks, track);
            let drain = reply.filter(|_| session).map(|reply| Drain {
                progress: &progress,
                reply,
            });
            let control = load_control(r, &mut inline, session, drain, full, blocks.len());
            // Every channel thread ends (its stream ended, failed, or the source went away).
            let mut loaders = vec![inline];
            let mut channel_error = None;
            for (i, t) in threads.into_iter().enumerate() {
                match t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                    Ok(l) => loaders.push(l),
                    Err(e) => {
                        channel_error.get_or_insert(Error::Channel {
                            index: i as u32,
                            source: Box::new(e),
                        });
                    }
                }
            }
            // A channel's own error says more than the control channel's end of stream.
            if let Some(e) = channel_error {
                return Err(e);
            }
            let (state, digests, page_records) = control?;
            stats.state_blobs = state.len() as u32;
            let mut channel_stats = Vec::new();
            for (i, l) in loaders.into_iter().enumerate() {
                if i > 0 {
                    channel_stats.push(l.channel_stats());
                }
                l.add_to(stats, received);
            }
            stats.channel_stats = channel_stats;
            if page_records != stats.pages_received {
                return Err(Error::Malformed(
                    "end marker page count (page records lost or added)",
                ));
            }
            Ok((state, digests))
        })?;
        if full {
            let t = Instant::now();
            check_strict_digests(&blocks, digests)?;
            stats.verify_ms = t.elapsed().as_secs_f64() * 1000.0;
        }
        Ok(state)
    }
}

/// Pages that differ between the source's final memory and ours at switchover.
struct Mismatches {
    count: u64,
    /// The first few, as `block page N`.
    first: Vec<String>,
}

impl Mismatches {
    fn push(&mut self, block: &str, page: u64) {
        self.count += 1;
        if self.first.len() < 8 {
            self.first.push(format!("{block} page {page}"));
        }
    }
}

/// Read the source's final digests (verify records) and compare them with the pages as received:
/// a page listed with another digest, or not received as data, differs; a page received as data
/// that the source does not list (zero there) differs too.
fn verify_after_resume<R: Read, B: MigrationBlock>(
    r: &mut StreamReader<R>,
    blocks: &[B],
    mut received: Received,
) -> Result<Mismatches> {
    let mut bad = Mismatches {
        count: 0,
        first: Vec::new(),
    };
    let mut entries = Vec::new();
    let mut total = 0u64;
    loop {
        entries.clear();
        match r.next_verify(&mut entries)? {
            VerifyRecord::Entries { block } => {
                for &(page, digest) in &entries {
                    if received.take(block as usize, page) != Some(digest) {
                        bad.push(blocks[block as usize].name(), page);
                    }
                }
                total += entries.len() as u64;
            }
            VerifyRecord::End { entries } => {
                if entries != total {
                    return Err(Error::Malformed(
                        "verify end entry count (verify records lost or added)",
                    ));
                }
                break;
            }
        }
    }
    for (i, block) in blocks.iter().enumerate() {
        for page in received.left(i) {
            bad.push(block.name(), page);
        }
    }
    Ok(bad)
}

/// Per stream (a version-1 stream's one, or each page channel), per block, the xxh3-64 of every
/// page received as data on it. The streams carry disjoint pages (a page always travels on the
/// same channel), so they are kept apart: merging them would cost the downtime a pass over every
/// page received (80 ms for 1.5 M pages, measured before the acknowledgement).
#[derive(Debug, Default)]
struct Received(Vec<Vec<BTreeMap<u64, u64>>>);

impl Received {
    /// The digest `page` of `block` was last received with, taken out.
    fn take(&mut self, block: usize, page: u64) -> Option<u64> {
        self.0
            .iter_mut()
            .find_map(|stream| stream.get_mut(block)?.remove(&page))
    }

    /// The pages of `block` received as data and never taken, in order.
    fn left(&self, block: usize) -> Vec<u64> {
        let mut left: Vec<u64> = self
            .0
            .iter()
            .filter_map(|stream| stream.get(block))
            .flat_map(|table| table.keys().copied())
            .collect();
        left.sort_unstable();
        left
    }
}

/// A session's parts for [`Destination::load`]: the header its control channel sent, its page
/// channels, and how to shut its control connection down.
type Channels<'c> = (
    Option<Header>,
    Vec<Transport>,
    Option<&'c (dyn Fn() + Send + Sync)>,
);

/// The destination's RAM must have the header's layout: same block names and sizes, in order.
fn check_layout<B: MigrationBlock>(blocks: &[B], header: &Header) -> Result<()> {
    if blocks.len() != header.blocks.len() {
        return Err(Error::LayoutMismatch(format!(
            "stream has {} RAM blocks, destination has {}",
            header.blocks.len(),
            blocks.len()
        )));
    }
    for (ours, theirs) in blocks.iter().zip(&header.blocks) {
        if ours.name() != theirs.name || ours.size() != theirs.size {
            return Err(Error::LayoutMismatch(format!(
                "stream block `{}` of {} bytes, destination block `{}` of {} bytes",
                theirs.name,
                theirs.size,
                ours.name(),
                ours.size()
            )));
        }
    }
    Ok(())
}

/// What the control channel (a version-1 stream: the whole stream) held up to its end marker: the
/// state blobs, the digest tables (strict mode) and the end marker's page count.
type ControlRead = (Vec<StateBlob>, Vec<Option<Vec<u64>>>, u64);

/// How far each page channel of a session has loaded, for drain requests.
struct ChannelProgress {
    /// Page records each channel has loaded into guest memory.
    loaded: Vec<AtomicU64>,
    /// A channel failed: a drain waits no longer.
    failed: AtomicBool,
}

impl ChannelProgress {
    fn new(channels: usize) -> Self {
        ChannelProgress {
            loaded: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicBool::new(false),
        }
    }
}

/// What answers a session's drain requests: the channels' progress and the control channel's
/// writer.
struct Drain<'a> {
    progress: &'a ChannelProgress,
    reply: &'a mut dyn Write,
}

impl Drain<'_> {
    /// Wait until every channel has loaded at least `page_records` (one count per channel), then
    /// answer [`Drained`]. A channel that fails ends the wait (its own error is what the
    /// migration reports); a channel that never gets there runs into its read timeout.
    fn answer(&mut self, page_records: &[u64]) -> Result<()> {
        if page_records.len() != self.progress.loaded.len() {
            return Err(Error::Malformed(
                "drain request (not one count per page channel)",
            ));
        }
        let caught_up = || {
            self.progress
                .loaded
                .iter()
                .zip(page_records)
                .all(|(loaded, &sent)| loaded.load(Ordering::Acquire) >= sent)
        };
        while !caught_up() {
            if self.progress.failed.load(Ordering::Acquire) {
                return Err(Error::Io {
                    context: "draining the page channels",
                    source: std::io::Error::other("a page channel failed"),
                });
            }
            std::thread::sleep(DRAIN_POLL);
        }
        Drained::send(self.reply).map_err(Error::io("answering a drain request"))
    }
}

/// How often a drain request looks at the channels' progress.
const DRAIN_POLL: Duration = Duration::from_micros(200);

/// Read the control channel up to the end marker. Pages go to `inline` (a version-1 stream; a
/// session's pages travel on its page channels, so there they are refused, and its drain
/// requests are answered through `drain`).
fn load_control<R: std::io::BufRead, B: MigrationBlock>(
    r: &mut StreamReader<R>,
    inline: &mut PageLoader<'_, B>,
    session: bool,
    mut drain: Option<Drain<'_>>,
    full: bool,
    nblocks: usize,
) -> Result<ControlRead> {
    let mut state = Vec::new();
    let mut state_bytes = 0u64;
    let mut digests: Vec<Option<Vec<u64>>> = vec![None; nblocks];
    let mut in_digests = false;
    let pages_here = |what| {
        if session {
            Err(Error::UnexpectedRecord(what))
        } else {
            Ok(())
        }
    };
    loop {
        match r.next_record()? {
            Record::Pages { block, count } => {
                pages_here("page record on a session's control channel")?;
                if in_digests {
                    return Err(Error::UnexpectedRecord(
                        "page record after the digest table",
                    ));
                }
                inline.pages(r, block, count)?;
            }
            Record::ZeroRange {
                block,
                first_page,
                npages,
            } => {
                pages_here("zero range on a session's control channel")?;
                if in_digests {
                    return Err(Error::UnexpectedRecord("zero range after the digest table"));
                }
                inline.zero_range(block, first_page, npages)?;
            }
            Record::State(blob) => {
                if in_digests {
                    return Err(Error::UnexpectedRecord(
                        "state record after the digest table",
                    ));
                }
                if state.len() as u32 >= stream::MAX_STATE_BLOBS {
                    return Err(Error::TooLarge {
                        what: "state blob count",
                        value: state.len() as u64 + 1,
                        limit: stream::MAX_STATE_BLOBS.into(),
                    });
                }
                state_bytes += blob.data.len() as u64;
                if state_bytes > stream::MAX_STATE_TOTAL_BYTES {
                    return Err(Error::TooLarge {
                        what: "total state size",
                        value: state_bytes,
                        limit: stream::MAX_STATE_TOTAL_BYTES,
                    });
                }
                state.push(blob);
            }
            Record::Digests {
                block,
                digests: table,
            } => {
                if !full {
                    return Err(Error::UnexpectedRecord(
                        "digest table in a stream verified after resuming",
                    ));
                }
                in_digests = true;
                let slot = &mut digests[block as usize];
                if slot.is_some() {
                    return Err(Error::UnexpectedRecord(
                        "digest table sent twice for one block",
                    ));
                }
                *slot = Some(table);
            }
            Record::ChannelEnd { .. } => {
                return Err(Error::UnexpectedRecord(
                    "a channel end on the control channel",
                ))
            }
            Record::Drain { page_records } => match drain.as_mut() {
                Some(d) => d.answer(&page_records)?,
                None => return Err(Error::UnexpectedRecord("a drain request outside a session")),
            },
            Record::End { page_records } => return Ok((state, digests, page_records)),
        }
    }
}

/// A page channel's thread: load its records up to its channel end.
fn load_channel<'b, B: MigrationBlock>(
    index: u32,
    t: Transport,
    blocks: &'b [B],
    header: &Header,
    track: bool,
    loaded: &AtomicU64,
) -> Result<PageLoader<'b, B>> {
    let cpu = thread_cpu_time();
    // Both halves are dropped when this returns: on an error the source sees the connection go.
    let Transport { reader, writer } = t;
    let _writer = writer;
    let reader = reader.ok_or_else(|| Error::no_half("a page channel", "read"))?;
    let mut r = StreamReader::with_layout(BufReader::with_capacity(READ_BUFFER, reader), header);
    let mut loader = PageLoader::new(blocks, track);
    loop {
        match r.next_record()? {
            Record::Pages { block, count } => {
                loader.pages(&mut r, block, count)?;
                loaded.store(loader.pages_received, Ordering::Release);
            }
            Record::ZeroRange {
                block,
                first_page,
                npages,
            } => loader.zero_range(block, first_page, npages)?,
            Record::ChannelEnd { page_records } => {
                if page_records != loader.pages_received {
                    return Err(Error::Malformed(
                        "channel end page count (page records lost or added)",
                    ));
                }
                break;
            }
            _ => {
                return Err(Error::UnexpectedRecord(
                    "a record other than pages on a page channel",
                ))
            }
        }
    }
    loader.bytes = r.bytes_read();
    loader.cpu = thread_cpu_time().saturating_sub(cpu);
    tracing::debug!(
        channel = index,
        pages = loader.pages_received,
        "page channel ended"
    );
    Ok(loader)
}

/// Loads page records and zero ranges of one stream (a version-1 stream, or one page channel of a
/// session) into guest RAM, keeping what the verification needs.
struct PageLoader<'b, B> {
    blocks: &'b [B],
    /// Per block, the xxh3-64 of every page received as data on this stream (the last copy; a
    /// page received as zero leaves it). Empty unless verifying after resuming.
    received: Vec<BTreeMap<u64, u64>>,
    /// Per block, pages whose content now comes from a data record of this stream (a page zeroed
    /// later that is not in here held data from before the stream: stale). A page always travels
    /// on the same channel, so one stream's view is the whole truth for its pages.
    got_data: Vec<Bitmap>,
    scratch: Box<[u8; PAGE_SIZE as usize]>,
    zero_page: Vec<u8>,
    nonzero: Vec<u64>,
    pages_received: u64,
    zero_pages: u64,
    zero_range_pages: u64,
    zero_checked_pages: u64,
    stale_pages_zeroed: u64,
    bytes: u64,
    cpu: Duration,
}

impl<'b, B: MigrationBlock> PageLoader<'b, B> {
    fn new(blocks: &'b [B], track: bool) -> Self {
        PageLoader {
            blocks,
            received: if track {
                blocks.iter().map(|_| BTreeMap::new()).collect()
            } else {
                Vec::new()
            },
            got_data: blocks
                .iter()
                .map(|b| Bitmap::new(b.pages() as usize))
                .collect(),
            scratch: Box::new([0u8; PAGE_SIZE as usize]),
            zero_page: vec![0u8; PAGE_SIZE as usize],
            nonzero: Vec::new(),
            pages_received: 0,
            zero_pages: 0,
            zero_range_pages: 0,
            zero_checked_pages: 0,
            stale_pages_zeroed: 0,
            bytes: 0,
            cpu: Duration::ZERO,
        }
    }

    /// Load a page batch of `count` entries of `block`.
    fn pages<R: std::io::BufRead>(
        &mut self,
        r: &mut StreamReader<R>,
        block: u32,
        count: u32,
    ) -> Result<()> {
        let ram = &self.blocks[block as usize];
        let got = &mut self.got_data[block as usize];
        for _ in 0..count {
            let table = self.received.get_mut(block as usize);
            // One copy: from the read buffer into guest RAM; the digest is taken from the same
            // bytes while they are in the cache.
            let entry = r.read_page_with(block, |page, data| {
                ram.write_untracked(page * PAGE_SIZE, data)
                    .map_err(Error::memory("loading a page"))?;
                if let Some(table) = table {
                    table.insert(page, xxh3_64(data));
                }
                Ok(())
            })?;
            match entry {
                PageEntry::Data(page) => got.set(page as usize),
                PageEntry::Zero(page) => {
                    // Read, and written only if not zero: fresh destination RAM is already zero,
                    // and writing zeros would fault in (allocate) every untouched page (a mostly
                    // idle guest then loaded ~10x slower than the source sends it, and the backlog
                    // showed up as downtime). Reading an untouched page maps the shared zero page
                    // instead.
                    if zero_page_in_place(ram, page, &mut self.scratch, &self.zero_page)?
                        && !got.test(page as usize)
                    {
                        self.stale_pages_zeroed += 1;
                    }
                    got.clear(page as usize);
                    if let Some(table) = self.received.get_mut(block as usize) {
                        table.remove(&page);
                    }
                    self.zero_pages += 1;
                    self.zero_checked_pages += 1;
                }
            }
            self.pages_received += 1;
        }
        Ok(())
    }

    /// Load a zero range: every page is read (in place where the block can: untouched memory
    /// reads through the shared zero page) and only non-zero ones are written. Our own
    /// populated-pages answer is not asked: were it wrong, data this memory held before the
    /// stream would stay where the source has zeros.
    fn zero_range(&mut self, block: u32, first_page: u64, npages: u64) -> Result<()> {
        let ram = &self.blocks[block as usize];
        self.nonzero.clear();
        ram.nonzero_pages(first_page, npages, &mut self.nonzero)
            .map_err(Error::memory("reading pages received as zero"))?;
        let got = &mut self.got_data[block as usize];
        for &page in &self.nonzero {
            ram.write_untracked(page * PAGE_SIZE, &self.zero_page)
                .map_err(Error::memory("loading a zero page"))?;
            if !got.test(page as usize) {
                self.stale_pages_zeroed += 1;
            }
        }
        got.clear_range(first_page as usize, npages as usize);
        if let Some(table) = self.received.get_mut(block as usize) {
            let end = first_page + npages;
            let gone: Vec<u64> = table.range(first_page..end).map(|(p, _)| *p).collect();
            for page in gone {
                table.remove(&page);
            }
        }
        self.zero_range_pages += npages;
        self.zero_checked_pages += npages;
        Ok(())
    }

    /// This stream as a page channel's stats.
    fn channel_stats(&self) -> ChannelStats {
        ChannelStats {
            pages: self.pages_received,
            bytes: self.bytes,
            ns_per_page: ns_per_page(self.cpu, self.pages_received),
        }
    }

    /// Add this stream's counts to `stats` and its digests to `received` (kept apart: the
    /// streams carry disjoint pages).
    fn add_to(self, stats: &mut IncomingStats, received: &mut Received) {
        stats.pages_received += self.pages_received;
        stats.zero_pages += self.zero_pages;
        stats.zero_range_pages += self.zero_range_pages;
        stats.zero_checked_pages += self.zero_checked_pages;
        stats.stale_pages_zeroed += self.stale_pages_zeroed;
        stats.bytes_received += self.bytes;
        if !self.received.is_empty() {
            received.0.push(self.received);
        }
    }
}

/// Makes `page` of `ram` zero, writing only when it is not (see [`PageLoader::pages`] for why);
/// returns whether it wrote. `scratch` holds one page; `zero_page` is a page of zeros.
fn zero_page_in_place<B: MigrationBlock>(
    ram: &B,
    page: u64,
    scratch: &mut [u8; PAGE_SIZE as usize],
    zero_page: &[u8],
) -> Result<bool> {
    ram.read(page * PAGE_SIZE, &mut scratch[..])
        .map_err(Error::memory("reading a page"))?;
    if is_zero_page(scratch) {
        return Ok(false);
    }
    ram.write_untracked(page * PAGE_SIZE, zero_page)
        .map_err(Error::memory("loading a zero page"))?;
    Ok(true)
}

/// The control channel's buffered reader as a [`TransportRead`]: the confirmation is read through
/// the buffer (bytes it already holds are not lost), with the timeout set on the connection.
struct ConfirmReader<'a>(&'a mut BufReader<Box<dyn TransportRead>>);

impl Read for ConfirmReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl TransportRead for ConfirmReader<'_> {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.0.get_mut().set_read_timeout(timeout)
    }
}
