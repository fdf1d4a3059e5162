// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination side: load, verify, restore, acknowledge, resume.

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;

use crate::cpu::{process_cpu_time, thread_cpu_time};

use crate::digest::{hash_threads, page_digests};
use crate::loader::{PageLoader, PostcopyCell, Received};
use crate::postcopy::missing::{Missing, ReplyPath};
use crate::postcopy::UffdPlacement;
use crate::stats::IncomingStats;
use crate::stream::Header;
use crate::stream::{
    self, Record, StreamReader, VerifyRecord, FLAG_ACK_REQUESTED, FLAG_CONFIRM, FLAG_DIGEST_FULL,
    FLAG_POSTCOPY_RECOVER, FLAG_VERIFY_AFTER,
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
pub struct Destination<'a, M: ?Sized> {
    mem: &'a M,
    confirm_timeout: Duration,
    recovery: Option<Recovery<'a>>,
}

impl<M: ?Sized> std::fmt::Debug for Destination<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("confirm_timeout", &self.confirm_timeout)
            .field("recovery", &self.recovery.as_ref().map(|r| r.timeout))
            .finish_non_exhaustive()
    }
}

/// Where a postcopy cut after its commit waits for the source to come back
/// ([`Destination::with_postcopy_recovery`]).
type AcceptUntil<'a> = Box<dyn FnMut(Instant) -> Result<Incoming> + Send + 'a>;

/// [`Destination::with_postcopy_recovery`]'s settings.
struct Recovery<'a> {
    accept: Mutex<AcceptUntil<'a>>,
    timeout: Duration,
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
            recovery: None,
        }
    }

    /// If a postcopy is cut after its commit (the guest runs here with pages missing), wait up
    /// to `timeout` for the source to come back: `accept(deadline)` gives the next incoming
    /// migration before `deadline` (e.g. [`crate::Listener::accept_incoming`] with
    /// [`crate::ListenOptions::with_accept_deadline`]); a session that resumes this postcopy
    /// ([`crate::stream::FLAG_POSTCOPY_RECOVER`], the same layout) gets the pages still missing
    /// and the requests still open, and the migration finishes on it; anything else is refused.
    /// Meanwhile the guest's threads wait on their missing pages. Without it (the default), a
    /// cut ends the postcopy with [`Error::Postcopy`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use clearlog_migration::{Destination, Error, Incoming};
    ///
    /// let mem = clearlog_memory::MemorySystem::new();
    /// let _dst = Destination::new(&mem).with_postcopy_recovery(Duration::from_secs(30), |_deadline| {
    ///     Err::<Incoming, _>(Error::AcceptTimeout) // a real VMM accepts on its listener here
    /// });
    /// ```
    pub fn with_postcopy_recovery(
        mut self,
        timeout: Duration,
        accept: impl FnMut(Instant) -> Result<Incoming> + Send + 'a,
    ) -> Self {
        self.recovery = Some(Recovery {
            accept: Mutex::new(Box::new(accept)),
            timeout,
        });
        self
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
            &mut writer,
            (vm, resume),
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
            // After a postcopy's commit the source waits for requests, not an answer.
            Err(e) if stats.postcopy => return Err(e),
            Err(e) => return Err(refuse(ack_target, e)),
        };
        // A snapshot (no source waiting for us) is verified before anything else happens to it.
        let mut verified_early = false;
        if verify_after && !wants_ack {
            self.verify_now(&mut r, &mut stats, std::mem::take(&mut received), None)?;
            verified_early = true;
        }
        // A postcopy handed the guest over (restored, acknowledged, confirmed, resumed) when it
        // began; what is left is the verification.
        if !stats.postcopy {
            let how = HandOver {
                wants_ack,
                wants_confirm,
                resume,
                postcopy: false,
            };
            let target = ack_target.map(|w| w.as_mut() as &mut (dyn Write + Send));
            self.hand_over(vm, &state, &mut r, target, how, &mut stats)?;
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

    /// Check and restore what was loaded, acknowledge, wait for the source's commit, resume.
    fn hand_over(
        &self,
        vm: &dyn VmRestore,
        state: &[StateBlob],
        r: &mut ControlReader,
        ack_target: Option<&mut (dyn Write + Send)>,
        how: HandOver,
        stats: &mut IncomingStats,
    ) -> Result<()> {
        let vm_err = |hook| move |source| Error::Vm { hook, source };
        let refuse = |ack_target: Option<&mut (dyn Write + Send)>, e: Error| {
            if let Some(w) = ack_target {
                let _ = Ack::send(w, stream::ACK_FAILED);
            }
            e
        };
        if !how.postcopy {
            if let Err(e) = vm.check_loaded().map_err(vm_err("check_loaded")) {
                return Err(refuse(ack_target, e));
            }
        }
        if let Err(e) = vm.restore_state(state).map_err(vm_err("restore_state")) {
            return Err(refuse(ack_target, e));
        }
        match ack_target {
            Some(w) => {
                // If the acknowledgement cannot be sent the source resumes its guest: we must not.
                Ack::send(w, stream::ACK_OK).map_err(Error::io("sending the acknowledgement"))?;
                stats.acked = true;
                if how.wants_confirm {
                    // Resume only once the source has committed: without its confirmation it
                    // may resume its own copy of the guest.
                    Confirm::wait(&mut ConfirmReader(r.get_mut()), self.confirm_timeout)?;
                }
            }
            None if how.wants_ack => {
                return Err(Error::no_half("sending the acknowledgement", "write"))
            }
            None => {}
        }
        // A live destination resumes as soon as the source committed, then verifies.
        if how.resume {
            if how.postcopy {
                vm.resume_postcopy().map_err(vm_err("resume_postcopy"))?;
            } else {
                vm.resume().map_err(vm_err("resume"))?;
            }
            stats.resumed = true;
            stats.resumed_at_unix_ns = crate::source::unix_ns();
        }
        Ok(())
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
    /// here up to the end marker; pages on the control channel are refused, except in a postcopy
    /// phase ([`Self::postcopy`]), which hands the guest over on the way.
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        r: &mut ControlReader,
        (session_header, pages, control_cut): Channels<'_>,
        writer: &mut Option<Box<dyn Write + Send>>,
        (vm, resume): (&dyn VmRestore, bool),
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
        // The return path, shared by the threads that answer on it; back in `writer` at the end
        // (a postcopy recovered on a new session leaves that session's writer there).
        let reply: ReplyPath = Mutex::new(writer.take());
        let postcopy = PostcopyCell::new();
        let stop_faults = AtomicBool::new(false);
        let ctx = LoadContext {
            blocks: &blocks,
            header: &header,
            track,
            full,
            session,
            progress: &progress,
            control_cut,
            reply: Some(&reply),
            postcopy: &postcopy,
            stop_faults: &stop_faults,
        };
        let loaded = std::thread::scope(|scope| {
            let result = self.load_streams(scope, &ctx, r, pages, (vm, resume), stats, received);
            // The fault thread (postcopy) serves until every stream ended.
            stop_faults.store(true, Ordering::Release);
            result
        });
        let mut postcopy = postcopy.into_inner();
        if let Some(m) = postcopy.as_mut() {
            postcopy_stats(m, stats, received);
        }
        let left = postcopy.as_ref().map_or(0, |m| m.left());
        // With pages missing, its drop keeps the userfaultfd open (the guest waits on them).
        drop(postcopy);
        *writer = reply.into_inner().unwrap_or_else(|p| p.into_inner());
        // Once the guest runs here, a failure with pages still missing strands it (one kind of
        // error); with every page here the guest is whole, only unverified.
        let (state, digests) = loaded.map_err(|e| match e {
            e if stats.resumed && left == 0 => Error::VerificationIncomplete(format!(
                "every page arrived, but the stream did not end: {}",
                crate::error::chain(&e)
            )),
            e @ Error::Postcopy { .. } => e,
            e if stats.resumed => Error::Postcopy {
                context: "receiving the missing pages",
                source: std::io::Error::other(crate::error::chain(&e)),
            },
            e => e,
        })?;
        if left > 0 {
            return Err(Error::Postcopy {
                context: "ending the postcopy phase",
                source: std::io::Error::other(format!(
                    "{left} pages never arrived: the guest waits on them and cannot go on"
                )),
            });
        }
        if full {
            let t = Instant::now();
            check_strict_digests(&blocks, digests)?;
            stats.verify_ms = t.elapsed().as_secs_f64() * 1000.0;
        }
        Ok(state)
    }

    /// Inside [`Self::load`]'s thread scope: one thread per page channel, the control channel
    /// here; with a postcopy phase in the middle if the source switches to one, and, if that
    /// phase is cut and [`Self::with_postcopy_recovery`] allows, the sessions that resume it.
    #[allow(clippy::too_many_arguments)]
    fn load_streams<'s, 'e: 's, 'w: 'e, B: MigrationBlock>(
        &self,
        scope: &'s std::thread::Scope<'s, 'e>,
        ctx: &'e LoadContext<'e, 'w, B>,
        r: &mut ControlReader,
        pages: Vec<Transport>,
        (vm, resume): (&dyn VmRestore, bool),
        stats: &mut IncomingStats,
        received: &mut Received,
    ) -> Result<Loaded> {
        let first = SessionIo {
            pages,
            cut: ctx.control_cut,
        };
        let mut end = self.session_streams(scope, ctx, r, first, Some((vm, resume)), stats);
        let handed_state = std::mem::take(&mut end.handed_state);
        let mut loaders = std::mem::take(&mut end.loaders);
        while end.result.is_err() && ctx.postcopy.get().is_some() && self.recovery.is_some() {
            let e = end.result.err().expect("checked");
            tracing::warn!(error = %crate::error::chain(&e), "postcopy cut: waiting for the source to come back");
            end = self.recover_session(scope, ctx, r, stats)?;
            loaders.append(&mut end.loaders);
            stats.postcopy_recoveries += 1;
        }
        let session_records = end.records;
        let (mut state, digests, page_records) = match end.result? {
            ControlEnd::End(read) => read,
            ControlEnd::Postcopy { .. } => {
                return Err(Error::UnexpectedRecord("a second postcopy switch"))
            }
        };
        if !handed_state.is_empty() {
            state = handed_state;
        }
        stats.state_blobs = state.len() as u32;
        let mut channel_stats = Vec::new();
        for l in loaders {
            if l.is_channel {
                channel_stats.push(l.channel_stats());
            }
            l.add_to(stats, received);
        }
        stats.channel_stats = channel_stats;
        if page_records != session_records {
            return Err(Error::Malformed(
                "end marker page count (page records lost or added)",
            ));
        }
        Ok((state, digests))
    }

    /// One session's streams: its page channels' threads, its control channel up to the end
    /// marker (handing the guest over on the way if the source switches to postcopy, `hand`),
    /// then the channels joined. Every stream's loader is kept, also when it failed: what it
    /// loaded before a cut counts.
    fn session_streams<'s, 'e: 's, 'w: 'e, B: MigrationBlock>(
        &self,
        scope: &'s std::thread::Scope<'s, 'e>,
        ctx: &'e LoadContext<'e, 'w, B>,
        r: &mut ControlReader,
        io: SessionIo<'e>,
        hand: Option<(&dyn VmRestore, bool)>,
        stats: &mut IncomingStats,
    ) -> SessionEnd<'e, B> {
        let cut = io.cut;
        let threads: Vec<_> = io
            .pages
            .into_iter()
            .enumerate()
            .map(|(i, t)| scope.spawn(move || ctx.channel(i, t, cut)))
            .collect();
        let mut inline = PageLoader::new(ctx.blocks, ctx.track);
        let mut control = load_control(r, &mut inline, ctx);
        let mut handed_state = Vec::new();
        if let (
            Ok(ControlEnd::Postcopy {
                state,
                missing,
                early,
            }),
            Some((vm, resume)),
        ) = (&mut control, hand)
        {
            let (state, missing, early) =
                (std::mem::take(state), std::mem::take(missing), early.take());
            control = self
                .postcopy(scope, ctx, r, (&state, missing, early), (vm, resume), stats)
                .and_then(|()| load_control(r, &mut inline, ctx));
            handed_state = state;
        }
        // Every channel thread ends (its stream ended, failed, or the source went away).
        let mut loaders = vec![inline];
        let mut channel_error = None;
        for (i, t) in threads.into_iter().enumerate() {
            let (loader, result) = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            loaders.push(loader);
            if let Err(e) = result {
                channel_error.get_or_insert(Error::Channel {
                    index: i as u32,
                    source: Box::new(e),
                });
            }
        }
        let records = loaders.iter().map(|l| l.pages_received).sum();
        SessionEnd {
            // A channel's own error says more than the control channel's end of stream.
            result: match channel_error {
                Some(e) => Err(e),
                None => control,
            },
            loaders,
            records,
            handed_state,
        }
    }

    /// A postcopy was cut: wait (until the recovery's deadline) for a session that resumes it,
    /// send it the pages still missing and the requests still open, and load it.
    fn recover_session<'s, 'e: 's, 'w: 'e, B: MigrationBlock>(
        &self,
        scope: &'s std::thread::Scope<'s, 'e>,
        ctx: &'e LoadContext<'e, 'w, B>,
        r: &mut ControlReader,
        stats: &mut IncomingStats,
    ) -> Result<SessionEnd<'e, B>> {
        let recovery = self.recovery.as_ref().expect("checked by the caller");
        let m = ctx.postcopy.get().expect("checked by the caller");
        let deadline = Instant::now() + recovery.timeout;
        let session = loop {
            let incoming = (lock(&recovery.accept))(deadline).map_err(|e| Error::Postcopy {
                context: "waiting for the source to resume the postcopy",
                source: std::io::Error::other(crate::error::chain(&e)),
            })?;
            match incoming {
                Incoming::Session(s)
                    if s.header.flags & FLAG_POSTCOPY_RECOVER != 0
                        && check_layout(ctx.blocks, &s.header).is_ok() =>
                {
                    break s
                }
                _ => tracing::warn!("refused a migration that does not resume this postcopy"),
            }
        };
        let (reader, writer) = (session.control.reader, session.control.writer);
        let reader = reader.ok_or_else(|| Error::no_half("resuming the postcopy", "read"))?;
        let writer = writer.ok_or_else(|| Error::no_half("resuming the postcopy", "write"))?;
        *r = StreamReader::with_layout(BufReader::with_capacity(READ_BUFFER, reader), ctx.header);
        m.announce(writer).map_err(|e| Error::Postcopy {
            context: "telling the source which pages are missing",
            source: e,
        })?;
        tracing::info!(missing = m.left(), "postcopy resumed by a new session");
        // Leaked (one small closure per recovery): it must outlive the threads of this session,
        // which the load's thread scope joins only at its end.
        let cut: Option<&'e (dyn Fn() + Send + Sync)> = session
            .control_cut
            .map(|c| &*Box::leak(c) as &'e (dyn Fn() + Send + Sync));
        let io = SessionIo {
            pages: session.pages,
            cut,
        };
        Ok(self.session_streams(scope, ctx, r, io, None, stats))
    }

    /// The source switched to postcopy: make the pages it still sends missing, start answering
    /// faults, hand the guest over (restore, acknowledge, wait for the commit, resume). Anything
    /// failing before the acknowledgement refuses, and the source resumes its guest.
    #[allow(clippy::too_many_arguments)]
    fn postcopy<'s, 'e: 's, 'w: 'e, B: MigrationBlock>(
        &self,
        scope: &'s std::thread::Scope<'s, 'e>,
        ctx: &'e LoadContext<'e, 'w, B>,
        r: &mut ControlReader,
        (state, missing, early): (&[StateBlob], Vec<Bitmap>, Option<Result<UffdPlacement>>),
        (vm, resume): (&dyn VmRestore, bool),
        stats: &mut IncomingStats,
    ) -> Result<()> {
        let Some(reply) = ctx.reply.filter(|_| ctx.session) else {
            return Err(Error::UnexpectedRecord(
                "a postcopy switch outside a session",
            ));
        };
        let refuse = |e: Error| {
            if let Some(w) = lock(reply).as_mut() {
                let _ = Ack::send(w.as_mut(), stream::ACK_FAILED);
            }
            e
        };
        let started = Instant::now();
        let mut placement = early
            .unwrap_or_else(|| UffdPlacement::prepare(ctx.blocks))
            .map_err(refuse)?;
        placement.discard(ctx.blocks, &missing).map_err(refuse)?;
        let m = Missing::new(
            Box::new(placement),
            &missing,
            reply,
            self.recovery.is_some(),
        );
        stats.postcopy = true;
        let m = ctx.postcopy.get_or_init(|| m);
        let stop = ctx.stop_faults;
        scope.spawn(move || {
            if let Err(e) = m.serve_faults(stop) {
                tracing::error!(error = %crate::error::chain(&e), "postcopy fault thread");
            }
        });
        let how = HandOver {
            wants_ack: true,
            wants_confirm: true,
            resume,
            postcopy: true,
        };
        {
            let mut w = lock(reply);
            let target = w.as_mut().map(|w| w.as_mut() as &mut (dyn Write + Send));
            self.hand_over(vm, state, r, target, how, stats)?;
        }
        // Nothing missing: say so now (no page will arrive to say it).
        m.send_done()?;
        stats.postcopy_resume_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(())
    }
}

/// What the streams of one [`Destination::load`] share.
struct LoadContext<'e, 'w, B> {
    blocks: &'e [B],
    header: &'e Header,
    track: bool,
    full: bool,
    session: bool,
    progress: &'e ChannelProgress,
    control_cut: Option<&'e (dyn Fn() + Send + Sync)>,
    reply: Option<&'w ReplyPath>,
    postcopy: &'e PostcopyCell<'w>,
    stop_faults: &'e AtomicBool,
}

impl<'e, B: MigrationBlock> LoadContext<'e, '_, B> {
    /// Page channel `i`'s thread: load it; on an error, wake the control channel's reader
    /// (`cut`, its session's). The loader comes back also after an error: what it loaded counts.
    fn channel(
        &self,
        i: usize,
        t: Transport,
        cut: Option<&(dyn Fn() + Send + Sync)>,
    ) -> (PageLoader<'e, B>, Result<()>) {
        let loaded = &self.progress.loaded[i.min(self.progress.loaded.len().saturating_sub(1))];
        let mut loader = PageLoader::new(self.blocks, self.track);
        loader.is_channel = true;
        let r = load_channel(i as u32, t, self, loaded, &mut loader);
        if r.is_err() {
            self.progress.failed.store(true, Ordering::Release);
            // Wake the control channel's reader: the migration (or this session) is over.
            if let Some(cut) = cut {
                cut();
            }
        }
        (loader, r)
    }
}

/// One session's connections: its page channels and how to cut its control channel.
struct SessionIo<'e> {
    pages: Vec<Transport>,
    cut: Option<&'e (dyn Fn() + Send + Sync)>,
}

/// How one session's streams ended ([`Destination::session_streams`]).
struct SessionEnd<'b, B> {
    result: Result<ControlEnd>,
    /// Every stream's loader, failed ones too.
    loaders: Vec<PageLoader<'b, B>>,
    /// Page records this session's streams loaded (what its end marker must say).
    records: u64,
    /// The state restored at a postcopy switch (the end marker comes with none then).
    handed_state: Vec<StateBlob>,
}

/// The postcopy phase's counts into `stats`, and its digests into `received` (in place of what
/// precopy had received for the pages it listed as missing).
fn postcopy_stats(m: &mut Missing<'_>, stats: &mut IncomingStats, received: &mut Received) {
    let (digests, s) = m.finish();
    stats.postcopy_missing_pages = s.missing_pages;
    stats.postcopy_requested_pages = s.requested_pages;
    stats.postcopy_duplicate_pages = s.duplicate_pages;
    stats.postcopy_zero_faults = s.zero_faults;
    stats.postcopy_ms = s.length.as_secs_f64() * 1000.0;
    stats.fault_latency_median_ms = s
        .latencies
        .get(s.latencies.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    stats.fault_latency_max_ms = s.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    received.forget(m.missing_bitmaps());
    received.push(digests);
}

/// A lock that a panicking holder did not poison for the others.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every stream of a [`Destination::load`] held: the state blobs and the digest tables
/// (strict mode).
type Loaded = (Vec<StateBlob>, Vec<Option<Vec<u64>>>);

/// What [`Destination::hand_over`] does besides restoring the state.
#[derive(Debug, Clone, Copy)]
struct HandOver {
    /// Acknowledge to the source (a live migration; a file has no one to answer).
    wants_ack: bool,
    /// Wait for the source's confirmation before resuming.
    wants_confirm: bool,
    /// Resume the guest.
    resume: bool,
    /// A postcopy: pages are missing, so no `check_loaded`, and `resume_postcopy`.
    postcopy: bool,
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

/// Where [`load_control`] stopped.
enum ControlEnd {
    /// At the end marker.
    End(ControlRead),
    /// At a postcopy switch: the state so far, the pages still to come, per block, and the
    /// placement set up ahead of the switch, if it was.
    Postcopy {
        state: Vec<StateBlob>,
        missing: Vec<Bitmap>,
        early: Option<Result<UffdPlacement>>,
    },
}

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
    reply: &'a ReplyPath,
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
        let mut w = lock(self.reply);
        let w = w
            .as_mut()
            .ok_or_else(|| Error::no_half("answering a drain request", "write"))?;
        Drained::send(w.as_mut()).map_err(Error::io("answering a drain request"))
    }
}

/// How often a drain request looks at the channels' progress.
const DRAIN_POLL: Duration = Duration::from_micros(200);

/// Read the control channel up to the end marker, or up to a postcopy switch. Pages go to
/// `inline`: a version-1 stream's, and a session's pages asked for in postcopy (otherwise a
/// session's pages travel on its page channels, so there they are refused). A session's drain
/// requests are answered on its reply path.
fn load_control<B: MigrationBlock>(
    r: &mut ControlReader,
    inline: &mut PageLoader<'_, B>,
    ctx: &LoadContext<'_, '_, B>,
) -> Result<ControlEnd> {
    let mut c = ControlState::new(ctx.blocks.len());
    loop {
        match r.next_record()? {
            Record::Pages { block, count } => {
                c.pages_allowed(ctx, "page record")?;
                inline.pages(r, block, count, ctx.postcopy)?;
            }
            Record::ZeroRange {
                block,
                first_page,
                npages,
            } => {
                c.pages_allowed(ctx, "zero range")?;
                inline.zero_range(block, first_page, npages, ctx.postcopy)?;
            }
            Record::State(blob) => c.state(blob)?,
            Record::Digests {
                block,
                digests: table,
            } => c.digests(ctx.full, block, table)?,
            Record::ChannelEnd { .. } => {
                return Err(Error::UnexpectedRecord(
                    "a channel end on the control channel",
                ))
            }
            Record::Drain { page_records } => match ctx.reply.filter(|_| ctx.session) {
                Some(reply) => {
                    // A drain after missing pages: the source waits here, its guest running,
                    // while the stale pages are dropped ahead of its switch to postcopy.
                    c.discard_early(ctx);
                    Drain {
                        progress: ctx.progress,
                        reply,
                    }
                    .answer(&page_records)?;
                }
                None => return Err(Error::UnexpectedRecord("a drain request outside a session")),
            },
            Record::Missing {
                block,
                first_page,
                words,
            } => c.missing(ctx, block, first_page, &words)?,
            Record::Postcopy { missing_pages } => return c.postcopy(missing_pages),
            Record::End { page_records } => {
                return Ok(ControlEnd::End((c.state, c.digests, page_records)))
            }
        }
    }
}

/// What [`load_control`] collected so far.
struct ControlState {
    state: Vec<StateBlob>,
    state_bytes: u64,
    digests: Vec<Option<Vec<u64>>>,
    in_digests: bool,
    /// Postcopy: the pages still to come, per block, as the source listed them.
    missing: Option<Vec<Bitmap>>,
    /// Postcopy: memory registered and stale pages dropped ahead of the switch (or why not).
    early: Option<Result<UffdPlacement>>,
}

impl ControlState {
    fn new(nblocks: usize) -> Self {
        ControlState {
            state: Vec::new(),
            state_bytes: 0,
            digests: vec![None; nblocks],
            in_digests: false,
            missing: None,
            early: None,
        }
    }

    /// Ahead of a postcopy switch: register the memory and drop the pages listed missing so
    /// far. A failure is kept for the switch, which refuses with it.
    fn discard_early<B: MigrationBlock>(&mut self, ctx: &LoadContext<'_, '_, B>) {
        let Some(missing) = self.missing.as_ref() else {
            return;
        };
        if matches!(self.early, Some(Err(_))) {
            return;
        }
        let placement = match self.early.take() {
            Some(p) => p,
            None => UffdPlacement::prepare(ctx.blocks),
        };
        self.early = Some(placement.and_then(|mut p| p.discard(ctx.blocks, missing).map(|()| p)));
    }

    /// Pages may come on the control channel: a version-1 stream's before its digest table, and
    /// a session's in its postcopy phase.
    fn pages_allowed<B>(&self, ctx: &LoadContext<'_, '_, B>, what: &'static str) -> Result<()> {
        if ctx.session && ctx.postcopy.get().is_none() {
            return Err(Error::UnexpectedRecord(match what {
                "page record" => "page record on a session's control channel",
                _ => "zero range on a session's control channel",
            }));
        }
        if self.in_digests {
            return Err(Error::UnexpectedRecord(match what {
                "page record" => "page record after the digest table",
                _ => "zero range after the digest table",
            }));
        }
        Ok(())
    }

    fn state(&mut self, blob: StateBlob) -> Result<()> {
        if self.in_digests {
            return Err(Error::UnexpectedRecord(
                "state record after the digest table",
            ));
        }
        if self.state.len() as u32 >= stream::MAX_STATE_BLOBS {
            return Err(Error::TooLarge {
                what: "state blob count",
                value: self.state.len() as u64 + 1,
                limit: stream::MAX_STATE_BLOBS.into(),
            });
        }
        self.state_bytes += blob.data.len() as u64;
        if self.state_bytes > stream::MAX_STATE_TOTAL_BYTES {
            return Err(Error::TooLarge {
                what: "total state size",
                value: self.state_bytes,
                limit: stream::MAX_STATE_TOTAL_BYTES,
            });
        }
        self.state.push(blob);
        Ok(())
    }

    fn digests(&mut self, full: bool, block: u32, table: Vec<u64>) -> Result<()> {
        if !full {
            return Err(Error::UnexpectedRecord(
                "digest table in a stream verified after resuming",
            ));
        }
        self.in_digests = true;
        let slot = &mut self.digests[block as usize];
        if slot.is_some() {
            return Err(Error::UnexpectedRecord(
                "digest table sent twice for one block",
            ));
        }
        *slot = Some(table);
        Ok(())
    }

    /// A list of pages still to come (postcopy, a session verified after resuming).
    fn missing<B: MigrationBlock>(
        &mut self,
        ctx: &LoadContext<'_, '_, B>,
        block: u32,
        first_page: u64,
        words: &[u64],
    ) -> Result<()> {
        if !ctx.session || ctx.full || ctx.postcopy.get().is_some() {
            return Err(Error::UnexpectedRecord(
                "missing pages outside a session's switch to postcopy",
            ));
        }
        let missing = self.missing.get_or_insert_with(|| {
            ctx.blocks
                .iter()
                .map(|b| Bitmap::new(b.pages() as usize))
                .collect()
        });
        let bits = missing[block as usize].as_words_mut();
        let first = (first_page / 64) as usize;
        // The decoder checked that every set bit is a page of the block.
        for (i, &w) in words.iter().enumerate().filter(|(_, w)| **w != 0) {
            bits[first + i] |= w;
        }
        Ok(())
    }

    /// The postcopy switch: the pages listed must add up to its count.
    fn postcopy(self, missing_pages: u64) -> Result<ControlEnd> {
        let missing = self.missing.unwrap_or_default();
        let listed: u64 = missing.iter().map(|b| b.count_ones() as u64).sum();
        if listed != missing_pages {
            return Err(Error::Malformed(
                "postcopy switch (missing page count differs from the pages listed)",
            ));
        }
        if self.in_digests {
            return Err(Error::UnexpectedRecord(
                "postcopy switch after a digest table",
            ));
        }
        Ok(ControlEnd::Postcopy {
            state: self.state,
            missing,
            early: self.early,
        })
    }
}

/// A page channel's thread: load its records up to its channel end.
fn load_channel<'b, B: MigrationBlock>(
    index: u32,
    t: Transport,
    ctx: &LoadContext<'b, '_, B>,
    loaded: &AtomicU64,
    loader: &mut PageLoader<'b, B>,
) -> Result<()> {
    let header = ctx.header;
    let cpu = thread_cpu_time();
    // Both halves are dropped when this returns: on an error the source sees the connection go.
    let Transport { reader, writer } = t;
    let _writer = writer;
    let reader = reader.ok_or_else(|| Error::no_half("a page channel", "read"))?;
    let mut r = StreamReader::with_layout(BufReader::with_capacity(READ_BUFFER, reader), header);
    loop {
        match r.next_record()? {
            Record::Pages { block, count } => {
                loader.pages(&mut r, block, count, ctx.postcopy)?;
                loaded.store(loader.pages_received, Ordering::Release);
            }
            Record::ZeroRange {
                block,
                first_page,
                npages,
            } => loader.zero_range(block, first_page, npages, ctx.postcopy)?,
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
    Ok(())
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
