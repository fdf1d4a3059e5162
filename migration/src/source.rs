// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The source side: precopy iterations, convergence, switchover.

mod postcopy;

use std::io::Write;
use std::ops::Range;
use std::time::{Duration, Instant};

use clearlog_bitmap::{Bitmap, ClearBitmap};

use crate::cpu::{ns_per_page, process_cpu_time, thread_cpu_time};
use crate::digest::{final_digests, hash_threads, page_digests};
use crate::memory::ask_populated;
use crate::ratelimit::SharedBucket;
use crate::sender::{self, Channels, Encoder, Out, Sent, WindowJob};
use crate::stats::{ChannelStats, IterationStats, MigrationStats, Progress};
use crate::stream::{
    self, BlockInfo, Header, FLAG_ACK_REQUESTED, FLAG_CONFIRM, FLAG_DIGEST_FULL, FLAG_VERIFY_AFTER,
};
use crate::transport::TransportRead;
use crate::wire::{Ack, Confirm, Drained, Verdict};
use crate::{
    CancelToken, DirtyTracking, DowntimeBreakdown, Error, MigrationBlock, MigrationConfig,
    MigrationDirtyLogMode, Result, Session, Transport, VerifyMode, VmControl, PAGE_SHIFT,
    PAGE_SIZE,
};

/// Per-block state of the source.
struct BlockState {
    /// Pages still to send (QEMU's `bmap`).
    dirty: Bitmap,
    /// Pages sent at least once (for `resent_pages`).
    sent: Bitmap,
    /// Chunks whose accelerator bits must be re-armed before their pages are read.
    clear: Option<ClearBitmap>,
}

/// Adjacent chunks marked for a clear are re-armed in one call up to this many bytes (4 MiB): on
/// this machine's KVM one clear of 4 MiB costs about what two of 1 MiB do (fixed cost per call:
/// ioctl, locks, TLB flush), while merging bigger runs saves little (measured with the
/// `chunk_clear` table of the kvm-accel test-guest `dirty_log` bench; see docs/design.md).
/// Re-arming the next chunks a few ms before their pages are read is safe: only late is lossy.
const CLEAR_MERGE_BYTES: u64 = 4 << 20;

/// Legacy mode has no chunks: the pass asks which pages are populated this many at a time (16 MiB).
const LEGACY_WINDOW_PAGES: u64 = 4096;

/// Take pages `[start, end)` out of `dirty` as one zero range (they are sent without being read):
/// mark them sent, and return how many were dirty and how many of those had been sent before.
fn take_zero_range(dirty: &mut Bitmap, sent: &mut Bitmap, start: u64, end: u64) -> (u64, u64) {
    let (mut taken, mut resent) = (0u64, 0u64);
    let (d, s) = (dirty.as_words_mut(), sent.as_words_mut());
    let mut bit = start;
    while bit < end {
        let word = (bit / 64) as usize;
        let lo = bit % 64;
        let hi = (end - word as u64 * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        let was = d[word] & mask;
        taken += u64::from(was.count_ones());
        resent += u64::from((was & s[word]).count_ones());
        s[word] |= was;
        d[word] &= !mask;
        bit = word as u64 * 64 + hi;
    }
    (taken, resent)
}

/// Counters of one pass over the dirty pages.
#[derive(Default)]
struct PassCounters {
    pages: u64,
    zero: u64,
    /// Dirty pages sent inside zero ranges (not read).
    zero_range: u64,
    bytes: u64,
    clears: u64,
}

impl PassCounters {
    fn add_sent(&mut self, s: &Sent) {
        self.pages += s.pages;
        self.zero += s.zero;
        self.bytes += s.bytes;
    }
}

/// The outgoing side of a migration: see the crate docs for the algorithm.
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
/// use clearlog_migration::{mem_channel, BoxError, CancelToken, Destination, MigrationConfig, Source, StateBlob, VmControl, VmRestore};
///
/// struct Vm;
/// impl VmControl for Vm {
///     fn pause(&self) -> Result<(), BoxError> { Ok(()) }
///     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
///     fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> { Ok(vec![StateBlob::new("cpu", vec![1])]) }
/// }
/// impl VmRestore for Vm {
///     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
///     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
/// }
///
/// let src_mem = MemorySystem::new();
/// src_mem.add_ram("ram", 0, 1 << 20).unwrap();
/// src_mem.ram_blocks()[0].write(8192, b"hello").unwrap();
/// let dst_mem = MemorySystem::new();
/// dst_mem.add_ram("ram", 0, 1 << 20).unwrap();
///
/// let (src_t, dst_t) = mem_channel();
/// std::thread::scope(|s| {
///     let dst = s.spawn(|| Destination::new(&dst_mem).receive(dst_t, &Vm));
///     let stats = Source::new(&src_mem, MigrationConfig::default()).unwrap()
///         .migrate(src_t, &Vm, None, &CancelToken::new()).unwrap();
///     assert!(stats.converged);
///     assert!(dst.join().unwrap().unwrap().resumed);
/// });
/// let mut buf = [0u8; 5];
/// dst_mem.ram_blocks()[0].read(8192, &mut buf).unwrap();
/// assert_eq!(&buf, b"hello");
/// ```
pub struct Source<'a, M: ?Sized> {
    mem: &'a M,
    config: MigrationConfig,
    recovery: Option<SourceRecovery<'a>>,
}

impl<M: ?Sized> std::fmt::Debug for Source<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("config", &self.config)
            .field("recovery", &self.recovery.as_ref().map(|r| r.timeout))
            .finish_non_exhaustive()
    }
}

/// A new session to the same destination ([`Source::with_postcopy_recovery`]).
type Reconnect<'a> = Box<dyn FnMut() -> Result<Session> + Send + 'a>;

/// [`Source::with_postcopy_recovery`]'s settings.
struct SourceRecovery<'a> {
    reconnect: std::sync::Mutex<Reconnect<'a>>,
    timeout: Duration,
}

impl<'a, M: DirtyTracking + ?Sized> Source<'a, M> {
    /// A source for the RAM of `mem` (the config is validated here): a `clearlog-memory`
    /// `MemorySystem`, or any memory that implements [`DirtyTracking`].
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::{MigrationDirtyLogMode, Error, MigrationConfig, Source};
    ///
    /// let mem = clearlog_memory::MemorySystem::new();
    /// let bad = MigrationConfig::default().with_mode(MigrationDirtyLogMode::Clear { shift: 32 });
    /// assert!(matches!(Source::new(&mem, bad), Err(Error::ClearShiftOutOfRange(32))));
    /// ```
    pub fn new(mem: &'a M, config: MigrationConfig) -> Result<Self> {
        config.validate()?;
        Ok(Source {
            mem,
            config,
            recovery: None,
        })
    }

    /// If the postcopy phase is cut after its commit, keep the guest paused here and open new
    /// sessions with `reconnect` (to the same destination, or its new address) until one
    /// resumes the postcopy or `timeout` has passed since the cut: the destination says which
    /// pages it still misses, this side sends them (the requested ones first), and the migration
    /// ends and verifies on that session. Without it (the default), a cut ends the migration
    /// with [`Error::Postcopy`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use clearlog_migration::{connect_session, MigrationConfig, PostcopyPolicy, SessionOptions, Source};
    ///
    /// let mem = clearlog_memory::MemorySystem::new();
    /// let config = MigrationConfig::default().with_postcopy(PostcopyPolicy::AfterPasses(1));
    /// let _src = Source::new(&mem, config).unwrap().with_postcopy_recovery(
    ///     Duration::from_secs(30),
    ///     || connect_session("tcp:127.0.0.1:4444", &SessionOptions::default()),
    /// );
    /// ```
    pub fn with_postcopy_recovery(
        mut self,
        timeout: Duration,
        reconnect: impl FnMut() -> Result<Session> + Send + 'a,
    ) -> Self {
        self.recovery = Some(SourceRecovery {
            reconnect: std::sync::Mutex::new(Box::new(reconnect)),
            timeout,
        });
        self
    }

    /// Migrate: stream RAM while the guest runs, pause it when the rest fits in the downtime limit, send
    /// the rest with the CPU/device state and the digest table, and wait for the acknowledgement (when the
    /// transport has a read half).
    ///
    /// On any error (transport, accelerator, VMM hook, cancel, no convergence) global logging is stopped,
    /// the guest is resumed if it was paused, and the error is returned: the source VM keeps running.
    /// On success the guest stays paused (it now runs at the destination) and logging is stopped.
    ///
    /// # Examples
    ///
    /// Saving a snapshot to a file (no acknowledgement; see [`Source`] for a live migration):
    ///
    /// ```
    /// # use clearlog_migration::{connect, BoxError, CancelToken, Destination, Listener, MigrationConfig, Source, StateBlob, VmControl, VmRestore};
    /// # struct Vm;
    /// # impl VmControl for Vm {
    /// #     fn pause(&self) -> Result<(), BoxError> { Ok(()) }
    /// #     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
    /// #     fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> { Ok(vec![]) }
    /// # }
    /// let mem = clearlog_memory::MemorySystem::new();
    /// mem.add_ram("ram", 0, 1 << 20).unwrap();
    /// let path = std::env::temp_dir().join("clearlog-doc-migrate.snap");
    /// let transport = connect(&format!("file:{}", path.display())).unwrap();
    /// let stats = Source::new(&mem, MigrationConfig::default()).unwrap()
    ///     .migrate(transport, &Vm, None, &CancelToken::new()).unwrap();
    /// assert_eq!(std::fs::metadata(&path).unwrap().len(), stats.bytes_sent);
    /// ```
    pub fn migrate(
        &self,
        transport: Transport,
        vm: &dyn VmControl,
        progress: Option<&mut dyn FnMut(&Progress)>,
        cancel: &CancelToken,
    ) -> Result<MigrationStats> {
        self.drive(transport, Vec::new(), false, vm, progress, cancel)
    }

    /// Migrate over a session ([`crate::connect_session`], [`crate::open_session`]): pages go on
    /// its page channels (a window's pages always on the same channel; a thread per channel reads,
    /// checks for zero and sends them; the bandwidth limit is shared), everything else on its
    /// control channel. Otherwise as [`migrate`](Self::migrate): the same passes, switchover,
    /// commit handshake and verification, and on any error before the commit (a failed channel
    /// included) logging stops and the guest resumes.
    ///
    /// # Examples
    ///
    /// See [`crate::Destination::receive_incoming`].
    pub fn migrate_session(
        &self,
        session: Session,
        vm: &dyn VmControl,
        progress: Option<&mut dyn FnMut(&Progress)>,
        cancel: &CancelToken,
    ) -> Result<MigrationStats> {
        self.drive(session.control, session.pages, true, vm, progress, cancel)
    }

    fn drive(
        &self,
        control: Transport,
        pages: Vec<Transport>,
        session: bool,
        vm: &dyn VmControl,
        progress: Option<&mut dyn FnMut(&Progress)>,
        cancel: &CancelToken,
    ) -> Result<MigrationStats> {
        if !session && self.config.postcopy != crate::PostcopyPolicy::Off {
            return Err(Error::PostcopyNeedsSession);
        }
        let no_writer = || Error::no_half("starting the migration", "write");
        let writer = control.writer.ok_or_else(no_writer)?;
        let bucket = SharedBucket::new(self.config.bandwidth_limit_bytes_per_s);
        let mut page_outs = Vec::with_capacity(pages.len());
        for t in pages {
            page_outs.push(sender::out(t.writer.ok_or_else(no_writer)?, bucket.clone()));
        }
        let blocks = self.mem.blocks();
        let reconnect = || match self.recovery.as_ref() {
            Some(r) => (r.reconnect.lock().unwrap_or_else(|p| p.into_inner()))(),
            None => Err(Error::PostcopyNeedsSession),
        };
        std::thread::scope(|scope| {
            let channels = if session {
                Some(Channels::start(scope, &blocks, page_outs)?)
            } else {
                None
            };
            let mut run = Run {
                mem: self.mem,
                config: &self.config,
                recovery: self
                    .recovery
                    .as_ref()
                    .map(|r| (&reconnect as &dyn Fn() -> Result<Session>, r.timeout)),
                bucket: bucket.clone(),
                header: None,
                vm,
                cancel,
                progress,
                out: sender::out(writer, bucket),
                ack: control.reader,
                blocks: &blocks,
                states: Vec::new(),
                channels,
                encoder: Encoder::new(),
                session,
                page_records: 0,
                stats: MigrationStats::default(),
                paused: false,
                committed: false,
                committed_at: None,
                logging: false,
                throttle: 0,
                throttle_supported: true,
                pass_cpu: Duration::ZERO,
                cpu_at_commit: None,
                mid_pass_dirty: 0,
                next_mid_pass_sync: None,
            };
            let start = Instant::now();
            let cpu_start = (process_cpu_time(), thread_cpu_time());
            let result = run.run(start).map_err(|e| run.after_commit(e));
            run.finish(result.is_ok());
            result.map(|()| {
                // Until the commit: the verification after it is `verify_after_ms`.
                let end = run.committed_at.unwrap_or_else(Instant::now);
                run.stats.total_time_ms = ms(end.duration_since(start));
                let (process, thread) = run
                    .cpu_at_commit
                    .unwrap_or_else(|| (process_cpu_time(), thread_cpu_time()));
                run.stats.cpu_s = process.saturating_sub(cpu_start.0).as_secs_f64();
                run.stats.migration_thread_cpu_s = thread.saturating_sub(cpu_start.1).as_secs_f64();
                run.stats.source_ns_per_page = ns_per_page(run.pass_cpu, run.stats.pages_sent);
                std::mem::take(&mut run.stats)
            })
        })
    }
}

struct Run<'r, 'p, M: DirtyTracking + ?Sized> {
    mem: &'r M,
    config: &'r MigrationConfig,
    /// [`Source::with_postcopy_recovery`]: a new session, and how long to keep trying.
    recovery: Option<(&'r dyn Fn() -> Result<Session>, Duration)>,
    /// The bandwidth limit every writer shares (a session that resumes a postcopy too).
    bucket: SharedBucket,
    /// The header sent at the start (a session that resumes a postcopy sends it again).
    header: Option<Header>,
    vm: &'r dyn VmControl,
    cancel: &'r CancelToken,
    progress: Option<&'p mut dyn FnMut(&Progress)>,
    /// The control channel (a version-1 stream: the whole stream).
    out: Out,
    ack: Option<Box<dyn TransportRead>>,
    blocks: &'r [M::Block],
    states: Vec<BlockState>,
    /// A session's page channels (`None`: pages go inline, a version-1 stream).
    channels: Option<Channels>,
    /// Encodes pages inline (a version-1 stream).
    encoder: Encoder,
    /// A session (version 2): the header goes without magic and version, after the hello.
    session: bool,
    page_records: u64,
    stats: MigrationStats,
    paused: bool,
    /// The commit point passed (the confirmation left, or a file's stream ended): the guest now
    /// belongs to the destination.
    committed: bool,
    /// When the commit happened.
    committed_at: Option<Instant>,
    logging: bool,
    throttle: u8,
    throttle_supported: bool,
    /// Thread CPU time spent in passes (for `source_ns_per_page`).
    pass_cpu: Duration,
    /// Process and thread CPU time at the commit.
    cpu_at_commit: Option<(Duration, Duration)>,
    /// Pages newly dirty at this pass's mid-pass syncs (counted into the pass's sync).
    mid_pass_dirty: u64,
    /// When the next mid-pass sync is due (legacy mode, live passes).
    next_mid_pass_sync: Option<Instant>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `bytes` over `d` (0 for no time).
fn bytes_per_s(bytes: u64, d: Duration) -> u64 {
    if d.is_zero() {
        0
    } else {
        (bytes as f64 / d.as_secs_f64()) as u64
    }
}

fn vm_err(hook: &'static str) -> impl FnOnce(crate::BoxError) -> Error {
    move |source| Error::Vm { hook, source }
}

impl<M: DirtyTracking + ?Sized> Run<'_, '_, M> {
    fn run(&mut self, start: Instant) -> Result<()> {
        let cfg = self.config;
        self.stats.mode = cfg.mode.name().to_string();
        self.stats.verify_mode = cfg.verify.name().to_string();
        self.stats.clear_chunk_bytes = cfg.mode.clear_chunk_bytes().unwrap_or(0);
        self.stats.bandwidth_limit_bytes_per_s = cfg.bandwidth_limit_bytes_per_s;
        self.setup()?;
        self.stats.setup_time_ms = ms(start.elapsed());

        let mut send_time = Duration::ZERO;
        let mut live_bytes = 0u64;
        loop {
            self.check_cancel()?;
            self.stats.iterations += 1;
            let iteration = self.stats.iterations;
            let pass_start = Instant::now();
            let pass = self.pass()?;
            let pass_time = pass_start.elapsed();
            send_time += pass_time;
            live_bytes += pass.bytes;
            let sync_start = Instant::now();
            // With mid-pass syncs this counts dirtyings that cost a send: a page dirtied before a
            // mid-pass sync, sent, and dirtied again counts twice (it is sent twice).
            let dirty = self.sync()? + std::mem::take(&mut self.mid_pass_dirty);
            let sync_time = sync_start.elapsed();
            self.schedule_mid_pass_sync(sync_time);
            let remaining = self.remaining_bytes();
            let bandwidth = bytes_per_s(live_bytes, send_time);
            self.stats.measured_bandwidth_bytes_per_s = bandwidth;
            let pass_bandwidth = bytes_per_s(pass.bytes, pass_time);
            let fraction = if cfg.bandwidth_limit_bytes_per_s == 0 {
                0.0
            } else {
                pass_bandwidth as f64 / cfg.bandwidth_limit_bytes_per_s as f64
            };
            // The decision is taken here, after each full pass and its sync: see
            // docs/design.md ("When to switch over").
            let estimate_bw = cfg.estimate_bandwidth(bandwidth);
            let expected = if remaining == 0 {
                Duration::ZERO
            } else if estimate_bw == 0 {
                Duration::MAX
            } else {
                Duration::from_secs_f64(remaining as f64 / estimate_bw as f64)
            };
            tracing::info!(
                iteration,
                pages_sent = pass.pages,
                zero_pages = pass.zero,
                dirty_pages = dirty,
                remaining_bytes = remaining,
                pass_ms = ms(pass_time),
                sync_ms = ms(sync_time),
                log_clear_calls = pass.clears,
                bandwidth,
                pass_bandwidth,
                "migration iteration"
            );
            self.stats.iteration_history.push(IterationStats {
                iteration,
                pages_sent: pass.pages,
                zero_pages: pass.zero,
                dirty_pages: dirty,
                remaining_bytes: remaining,
                pass_ms: ms(pass_time),
                sync_ms: ms(sync_time),
                bandwidth_bytes_per_s: bandwidth,
                pass_bandwidth_bytes_per_s: pass_bandwidth,
                bandwidth_fraction_of_limit: fraction,
                log_clear_calls: pass.clears,
            });
            self.report(iteration, remaining, bandwidth, expected, false);
            if expected <= cfg.downtime_limit
                && self.drained_and_fits(&mut send_time, live_bytes)?
            {
                break;
            }
            if self.postcopy_due(iteration, dirty, pass_time, remaining, bandwidth) {
                return self.switch_to_postcopy();
            }
            let over_iterations = cfg.max_iterations.is_some_and(|max| iteration >= max);
            let over_time = cfg.max_time.is_some_and(|max| start.elapsed() >= max);
            if over_iterations || over_time {
                return Err(Error::NotConverged {
                    iterations: iteration,
                    elapsed: start.elapsed(),
                    remaining_bytes: remaining,
                    expected_downtime: expected,
                    downtime_limit: cfg.downtime_limit,
                });
            }
            if cfg.auto_converge && iteration >= 2 {
                self.auto_converge(dirty * PAGE_SIZE, pass.bytes)?;
            }
        }
        self.switchover()
    }

    /// The estimate fits: a session waits for its destination to catch up ([`Self::drain`]),
    /// counts the wait as sending time and decides again on what the guest dirtied meanwhile.
    /// `true`: switch over now.
    fn drained_and_fits(&mut self, send_time: &mut Duration, live_bytes: u64) -> Result<bool> {
        let Some(waited) = self.drain()? else {
            return Ok(true);
        };
        *send_time += waited;
        self.mid_pass_dirty += self.sync()?;
        let bandwidth = bytes_per_s(live_bytes, *send_time);
        self.stats.measured_bandwidth_bytes_per_s = bandwidth;
        let estimate_bw = self.config.estimate_bandwidth(bandwidth).max(1);
        let remaining = self.remaining_bytes();
        let expected = Duration::from_secs_f64(remaining as f64 / estimate_bw as f64);
        Ok(expected <= self.config.downtime_limit)
    }

    /// A session with a return path: wait until the destination has loaded every page record
    /// the channels sent so far (they were flushed at the pass's barrier); how long that took.
    /// `None` for a version-1 stream: it has no way to ask.
    fn drain(&mut self) -> Result<Option<Duration>> {
        let (Some(ch), Some(reader)) = (self.channels.as_ref(), self.ack.as_mut()) else {
            return Ok(None);
        };
        let t = Instant::now();
        let mut rec = Vec::new();
        stream::encode_drain(ch.records(), &mut rec);
        self.out
            .write_all(&rec)
            .and_then(|()| self.out.flush())
            .map_err(Error::io("sending the drain request"))?;
        Drained::wait(reader.as_mut(), self.config.ack_timeout, self.cancel)?;
        let waited = t.elapsed();
        self.stats.drain_ms += ms(waited);
        tracing::debug!(drain_ms = ms(waited), "the destination caught up");
        Ok(Some(waited))
    }

    fn setup(&mut self) -> Result<()> {
        let blocks = self.blocks;
        let header = Header {
            page_size: PAGE_SIZE as u32,
            flags: if self.ack.is_some() {
                FLAG_ACK_REQUESTED | FLAG_CONFIRM
            } else {
                0
            } | match self.config.verify {
                VerifyMode::Strict => FLAG_DIGEST_FULL,
                VerifyMode::AfterResume => FLAG_VERIFY_AFTER,
            },
            blocks: blocks
                .iter()
                .map(|b| BlockInfo {
                    name: b.name().to_string(),
                    size: b.size(),
                })
                .collect(),
        };
        if self.session {
            // The hello that came first carried the magic and the version.
            header.write_fields_to(&mut self.out)
        } else {
            header.write_to(&mut self.out)
        }
        .and_then(|()| self.out.flush())
        .map_err(Error::io("sending the header"))?;
        self.header = Some(header);
        self.stats.guest_mem_bytes = blocks.iter().map(|b| b.size()).sum();
        self.stats.page_channels = self.channels.as_ref().map_or(0, |c| c.len() as u32);
        for block in blocks {
            let pages = block.pages() as usize;
            let clear = match self.config.mode {
                MigrationDirtyLogMode::Legacy | MigrationDirtyLogMode::Ring => None,
                MigrationDirtyLogMode::Clear { shift } => Some(
                    ClearBitmap::new(block.pages(), shift)
                        .map_err(|e| Error::memory("sizing the clear bitmap")(e.into()))?,
                ),
            };
            self.states.push(BlockState {
                dirty: Bitmap::new_filled(pages),
                sent: Bitmap::new(pages),
                clear,
            });
        }
        self.logging = true;
        self.mem
            .start_logging()
            .map_err(Error::memory("starting dirty logging"))?;
        // First sync: learn which chunks the accelerator holds bits for (all of them with KVM's
        // INITIALLY_SET), so they are re-armed before the first pass reads them.
        let t = Instant::now();
        self.sync()?;
        self.schedule_mid_pass_sync(t.elapsed());
        Ok(())
    }

    /// Sync, fold into the per-block bitmaps, and (legacy) re-arm whole blocks at once.
    /// Returns the number of newly dirty pages.
    fn sync(&mut self) -> Result<u64> {
        let t = Instant::now();
        let mem = self.mem;
        mem.sync_dirty()
            .map_err(Error::memory("syncing the dirty log"))?;
        self.stats.log_sync_ms += ms(t.elapsed());
        self.stats.dirty_syncs += 1;
        let mut new = 0;
        for (block, bs) in self.blocks.iter().zip(&mut self.states) {
            new += mem
                .take_dirty(block, &mut bs.dirty, bs.clear.as_mut())
                .map_err(Error::memory("taking the dirty bits"))?;
        }
        if self.config.mode.rearms_at_sync() {
            for block in self.blocks {
                let t = Instant::now();
                mem.clear_dirty(block, 0, block.size())
                    .map_err(Error::memory("re-arming dirty tracking"))?;
                self.stats.log_clear_calls += 1;
                self.stats.log_clear_ms += ms(t.elapsed());
            }
        }
        Ok(new)
    }

    /// Legacy mode: when the next sync within a pass is due, given how long the last one took
    /// (see [`MigrationConfig::mid_pass_sync`]).
    fn schedule_mid_pass_sync(&mut self, last_sync: Duration) {
        self.next_mid_pass_sync = match (self.config.mode, self.config.mid_pass_sync) {
            // An interval too long to represent means never.
            (mode, Some(interval)) if mode.rearms_at_sync() => {
                Instant::now().checked_add(interval.max(last_sync.saturating_mul(50)))
            }
            _ => None,
        };
    }

    /// A sync within a live pass (legacy mode), at a window boundary: bits of pages still ahead
    /// of the cursor join this pass (they were set already, or are sent now once instead of
    /// twice), bits behind it wait for the next pass. Nothing is lost: every bit KVM hands over
    /// lands in the dirty bitmap, as at the end of a pass.
    fn mid_pass_sync_if_due(&mut self) -> Result<bool> {
        match self.next_mid_pass_sync {
            Some(due) if !self.paused && Instant::now() >= due => {
                let t = Instant::now();
                self.mid_pass_dirty += self.sync()?;
                self.stats.mid_pass_syncs += 1;
                self.schedule_mid_pass_sync(t.elapsed());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn remaining_bytes(&self) -> u64 {
        self.states
            .iter()
            .map(|b| b.dirty.count_ones() as u64 * PAGE_SIZE)
            .sum()
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// One walk over all dirty pages, in order, one window at a time (a clear chunk, or
    /// [`LEGACY_WINDOW_PAGES`] in legacy mode). Entering a window: re-arm it (clear mode, live
    /// passes), THEN ask the memory which of its pages are populated, and send the dirty pages that
    /// are not as zero ranges without reading them; then read and send the others. Re-arm before
    /// asking: a page the guest populates after the question is dirty again (asked the other way
    /// round, it would be lost). A window whose pages all go as a zero range is still re-armed, or
    /// `INITIALLY_SET` would leave it dirty for the next pass. On a session each window goes to
    /// the page channel of its index, whose thread reads (after the re-arm, which happened here
    /// before the hand-over) and sends it; the pass ends when every channel sent its windows.
    fn pass(&mut self) -> Result<PassCounters> {
        let cpu = thread_cpu_time();
        let result = self.walk();
        self.pass_cpu += thread_cpu_time().saturating_sub(cpu);
        result
    }

    /// [`pass`](Self::pass) without the CPU accounting.
    fn walk(&mut self) -> Result<PassCounters> {
        let mut c = PassCounters::default();
        let clears_before = self.stats.log_clear_calls;
        let mut populated = Vec::new();
        // Windows of earlier blocks, so every window of the guest has its own index.
        let mut window_base = 0u64;
        for bi in 0..self.blocks.len() {
            let window_pages = self.window_pages(bi);
            let mut next = self.states[bi].dirty.find_next_set(0);
            // End of the window sent last: pages below it are done for this pass.
            let mut cursor = 0usize;
            while let Some(page) = next {
                let p = page as u64;
                if self.mid_pass_sync_if_due()? {
                    // Pages between the last window's end and `p` may be dirty now: send them
                    // too (they are still ahead of the cursor).
                    next = self.states[bi].dirty.find_next_set(cursor);
                    if next != Some(page) {
                        continue;
                    }
                }
                let first = p - p % window_pages;
                let end = (first + window_pages).min(self.blocks[bi].pages());
                let job = self.take_window(bi, p, end, &mut populated, &mut c)?;
                self.send_window(window_base + first / window_pages, job, &mut c)?;
                self.check_cancel()?;
                cursor = end as usize;
                next = self.states[bi].dirty.find_next_set(cursor);
            }
            window_base += self.blocks[bi].pages().div_ceil(window_pages);
        }
        let sent = match self.channels.as_mut() {
            Some(ch) => ch.barrier()?,
            None => {
                self.out.flush().map_err(Error::io("sending pages"))?;
                Sent::default()
            }
        };
        c.add_sent(&sent);
        self.pass_cpu += sent.cpu;
        self.page_records += c.pages;
        self.stats.pages_sent += c.pages;
        self.stats.zero_pages += c.zero;
        self.stats.zero_range_pages += c.zero_range;
        c.clears = self.stats.log_clear_calls - clears_before;
        Ok(c)
    }

    /// Pages of a window of block `bi`: its clear chunk, or [`LEGACY_WINDOW_PAGES`].
    fn window_pages(&self, bi: usize) -> u64 {
        match self.states[bi].clear.as_ref() {
            Some(clear) => 1u64 << clear.shift(),
            None => LEGACY_WINDOW_PAGES,
        }
    }

    /// Re-arm the window `[p, end)` of block `bi` (clear mode, live), ask which of its pages are
    /// populated, and take its dirty pages: the never-populated ones as zero ranges, the others to
    /// read.
    fn take_window(
        &mut self,
        bi: usize,
        p: u64,
        end: u64,
        populated: &mut Vec<Range<u64>>,
        c: &mut PassCounters,
    ) -> Result<WindowJob> {
        let mem = self.mem;
        let block = &self.blocks[bi];
        let bs = &mut self.states[bi];
        // Paused (the final pass): nothing can dirty a page any more, so re-arming is pointless
        // work inside the downtime.
        if let Some(clear) = bs.clear.as_mut().filter(|_| !self.paused) {
            let t = Instant::now();
            // Re-arm, THEN ask and read.
            let max = (CLEAR_MERGE_BYTES >> (u32::from(clear.shift()) + PAGE_SHIFT)).max(1);
            if mem
                .clear_chunks_before_send(block, clear, p, max)
                .map_err(Error::memory("re-arming a chunk before sending it"))?
                > 0
            {
                let took = t.elapsed();
                self.stats.log_clear_calls += 1;
                self.stats.log_clear_ms += ms(took);
                tracing::trace!(
                    block = block.name(),
                    first_page = p,
                    us = took.as_micros() as u64,
                    "dirty log clear"
                );
            }
        }
        ask_populated(block, p, end - p, populated)
            .map_err(Error::memory("asking which pages are populated"))?;
        let mut job = WindowJob {
            block: bi as u32,
            ..WindowJob::default()
        };
        let mut cursor = p;
        for r in populated.iter().cloned().chain(std::iter::once(end..end)) {
            if cursor < r.start {
                let (dirty, resent) = take_zero_range(&mut bs.dirty, &mut bs.sent, cursor, r.start);
                if dirty > 0 {
                    job.zero_ranges.push(cursor..r.start);
                    c.zero_range += dirty;
                    self.stats.resent_pages += resent;
                }
            }
            let mut page = bs.dirty.find_next_set(r.start.max(cursor) as usize);
            while let Some(q) = page.filter(|&q| (q as u64) < r.end) {
                bs.dirty.clear(q);
                if bs.sent.test(q) {
                    self.stats.resent_pages += 1;
                } else {
                    bs.sent.set(q);
                }
                job.pages.push(q as u64);
                page = bs.dirty.find_next_set(q + 1);
            }
            cursor = cursor.max(r.end);
        }
        Ok(job)
    }

    /// Send a window: to the page channel of its index on a session, inline otherwise.
    fn send_window(&mut self, window: u64, job: WindowJob, c: &mut PassCounters) -> Result<()> {
        match self.channels.as_mut() {
            Some(ch) => {
                let index = (window % ch.len() as u64) as usize;
                ch.send(index, job)
            }
            None => {
                let sent =
                    self.encoder
                        .send(&job, &self.blocks[job.block as usize], &mut self.out)?;
                c.add_sent(&sent);
                Ok(())
            }
        }
    }

    fn report(
        &mut self,
        iteration: u32,
        remaining: u64,
        bandwidth: u64,
        expected: Duration,
        paused: bool,
    ) {
        if let Some(cb) = self.progress.as_mut() {
            cb(&Progress {
                iteration,
                remaining_bytes: remaining,
                bandwidth_bytes_per_s: bandwidth,
                expected_downtime_ms: if expected == Duration::MAX {
                    f64::INFINITY
                } else {
                    ms(expected)
                },
                paused,
            });
        }
    }

    /// QEMU-like auto-converge: when the guest dirtied more than half of what the pass sent, throttle
    /// harder (20%, then +10% per iteration, at most 99%).
    fn auto_converge(&mut self, dirtied: u64, sent: u64) -> Result<()> {
        if !self.throttle_supported || dirtied * 2 <= sent {
            return Ok(());
        }
        let next = if self.throttle == 0 {
            20
        } else {
            (self.throttle + 10).min(99)
        };
        if next == self.throttle {
            return Ok(());
        }
        if self.vm.set_throttle(next).map_err(vm_err("set_throttle"))? {
            self.throttle = next;
            self.stats.auto_converge_max_throttle_pct = next;
            tracing::info!(throttle_pct = next, "auto-converge throttle");
        } else {
            self.throttle_supported = false;
            tracing::warn!("auto-converge requested but the VMM does not support throttling");
        }
        Ok(())
    }

    /// After the final pass: every page channel ends (its end record says how many pages it
    /// carried) and reports its totals.
    fn finish_channels(&mut self) -> Result<()> {
        let Some(ch) = self.channels.as_mut() else {
            return Ok(());
        };
        ch.finish()?;
        self.finish_channel_stats();
        Ok(())
    }

    /// Every channel's totals into the stats.
    fn finish_channel_stats(&mut self) {
        let Some(ch) = self.channels.as_ref() else {
            return;
        };
        self.stats.channel_stats = ch
            .totals()
            .iter()
            .map(|s| ChannelStats {
                pages: s.pages,
                bytes: s.bytes,
                ns_per_page: ns_per_page(s.cpu, s.pages),
            })
            .collect();
    }

    /// The CPU and device state, checked against the stream's bounds, on the control channel.
    fn send_state(&mut self, state: &[crate::StateBlob]) -> Result<()> {
        let mut rec = Vec::new();
        for blob in state {
            if blob.name.is_empty() || blob.name.len() > stream::MAX_NAME_LEN {
                return Err(Error::Malformed(
                    "state blob name (empty or over 256 bytes) from save_state",
                ));
            }
            if blob.data.len() as u64 > u64::from(stream::MAX_STATE_BLOB_BYTES) {
                return Err(Error::TooLarge {
                    what: "state blob size",
                    value: blob.data.len() as u64,
                    limit: stream::MAX_STATE_BLOB_BYTES.into(),
                });
            }
            rec.clear();
            stream::encode_state(blob, &mut rec);
            self.out
                .write_all(&rec)
                .map_err(Error::io("sending state"))?;
        }
        Ok(())
    }

    /// Strict verification: all of RAM hashed while paused, checked by the destination before it
    /// resumes.
    fn send_strict_digests(&mut self) -> Result<()> {
        let threads = hash_threads();
        let mut rec = Vec::new();
        for bi in 0..self.blocks.len() {
            let digests = page_digests(&self.blocks[bi], threads)?;
            rec.clear();
            stream::encode_digests(bi as u32, &digests, &mut rec);
            self.out
                .write_all(&rec)
                .map_err(Error::io("sending digests"))?;
        }
        Ok(())
    }

    /// Pause the guest (the downtime starts here) and save its state: when the pause began, the
    /// breakdown so far, the state, and how long saving took. The state before the final sync: a
    /// device that writes guest RAM while it saves (flushing a queue into guest memory) dirties
    /// pages, and the final sync must see them.
    fn pause_and_save(
        &mut self,
    ) -> Result<(Instant, DowntimeBreakdown, Vec<crate::StateBlob>, f64)> {
        let pause_at = Instant::now();
        self.stats.paused_at_unix_ns = unix_ns();
        let mut b = DowntimeBreakdown::default();
        // Marked before the call: a pause that fails may still have stopped some vCPUs, and the
        // failure path must resume them (resuming a running guest is harmless).
        self.paused = true;
        self.vm.pause().map_err(vm_err("pause"))?;
        b.pause_ms = ms(pause_at.elapsed());
        let t = Instant::now();
        let state = self.vm.save_state().map_err(vm_err("save_state"))?;
        Ok((pause_at, b, state, ms(t.elapsed())))
    }

    fn switchover(&mut self) -> Result<()> {
        self.check_cancel()?;
        let (pause_at, mut b, state, save_ms) = self.pause_and_save()?;
        // The limit applies to the live phase only: do not stretch the downtime.
        self.out.set_rate(0);
        let t = Instant::now();
        self.sync()?;
        b.final_sync_ms = ms(t.elapsed());
        let remaining = self.remaining_bytes();
        self.report(
            self.stats.iterations,
            remaining,
            self.stats.measured_bandwidth_bytes_per_s,
            Duration::ZERO,
            true,
        );
        let t = Instant::now();
        let last = self.pass()?;
        self.finish_channels()?;
        b.final_pages_ms = ms(t.elapsed());
        tracing::info!(pages_sent = last.pages, "migration final pass (paused)");

        let t = Instant::now();
        self.send_state(&state)?;
        b.state_ms = save_ms + ms(t.elapsed());
        if self.config.verify == VerifyMode::Strict {
            let t = Instant::now();
            self.send_strict_digests()?;
            b.verify_ms = ms(t.elapsed());
        }
        let mut rec = Vec::new();
        stream::encode_end(self.page_records, &mut rec);
        self.out
            .write_all(&rec)
            .map_err(Error::io("sending the end marker"))?;
        self.out.flush().map_err(Error::io("flushing the stream"))?;
        self.stats.bytes_sent = self.bytes_sent();
        self.ack_and_confirm(&mut b)?;
        self.committed = true;
        self.committed_at = Some(Instant::now());
        self.cpu_at_commit = Some((process_cpu_time(), thread_cpu_time()));
        self.stats.downtime_ms = ms(pause_at.elapsed());
        self.stats.downtime_breakdown = b;
        self.stats.converged = true;
        tracing::info!(
            downtime_ms = self.stats.downtime_ms,
            ?b,
            "migration committed"
        );
        match self.config.verify {
            VerifyMode::AfterResume => self.verify_after_commit(),
            VerifyMode::Strict => {
                // The destination checked the table before acknowledging; a file is checked at
                // restore time.
                self.stats.verified = self.ack.is_some();
                Ok(())
            }
        }
    }

    /// A live destination (one with a return path): wait for its acknowledgement, then send the
    /// confirmation. The commit point: once the confirmation is out the guest runs at the
    /// destination. If it fails, no whole confirmation left us, the destination will not resume,
    /// and the failure path resumes the guest here. A file has no one to answer: nothing to do.
    fn ack_and_confirm(&mut self, b: &mut DowntimeBreakdown) -> Result<()> {
        let Some(reader) = self.ack.as_mut() else {
            return Ok(());
        };
        let t = Instant::now();
        Ack::wait_ok(reader.as_mut(), self.config.ack_timeout, self.cancel)?;
        b.ack_ms = ms(t.elapsed());
        // Written straight to the transport, not through the stream's buffer: a buffer that
        // failed to flush would try again when dropped, and a late confirmation could then reach
        // a destination after this side had resumed.
        let t = Instant::now();
        Confirm::send(self.out.get_mut().get_mut().as_mut())
            .map_err(Error::io("sending the confirmation"))?;
        b.confirm_ms = ms(t.elapsed());
        Ok(())
    }

    /// [`VerifyMode::AfterResume`]: the guest runs at the destination now; this side, still
    /// paused, hashes its final RAM, streams the digests of its non-zero pages and waits for the
    /// destination's verdict.
    fn verify_after_commit(&mut self) -> Result<()> {
        let t = Instant::now();
        let threads = hash_threads();
        let mut rec = Vec::new();
        let mut total = 0u64;
        let incomplete = |e: Error| Error::VerificationIncomplete(e.to_string());
        // Pages that hold data although the populated-pages answer left them out, as `block page N`.
        let mut unreported = Vec::new();
        for bi in 0..self.blocks.len() {
            let block = &self.blocks[bi];
            let found = final_digests(block, threads).map_err(incomplete)?;
            self.stats.verify_zero_checked_pages += found.zero_checked;
            self.stats.verify_unreported_pages += found.unreported.len() as u64;
            if !found.unreported.is_empty() {
                tracing::error!(
                    block = block.name(),
                    pages = found.unreported.len(),
                    "pages that hold data were missing from the populated-pages answer (sent as \
                     zero unless dirty tracking resent them): the destination's verdict decides"
                );
            }
            for &p in found
                .unreported
                .iter()
                .take(8usize.saturating_sub(unreported.len()))
            {
                unreported.push(format!("{} page {p}", block.name()));
            }
            let entries = found.entries;
            for part in entries.chunks(stream::MAX_VERIFY_ENTRIES as usize) {
                rec.clear();
                stream::encode_verify(bi as u32, part, &mut rec);
                self.out
                    .write_all(&rec)
                    .map_err(|e| incomplete(Error::io("sending the final digests")(e)))?;
            }
            total += entries.len() as u64;
        }
        rec.clear();
        stream::encode_verify_end(total, &mut rec);
        self.out
            .write_all(&rec)
            .and_then(|()| self.out.flush())
            .map_err(|e| incomplete(Error::io("sending the final digests")(e)))?;
        self.stats.verify_pages = total;
        self.stats.bytes_sent = self.bytes_sent();
        if let Some(reader) = self.ack.as_mut() {
            let verdict = Verdict::read(reader.as_mut(), self.config.ack_timeout)?;
            let resumed_at = verdict.resumed_at_unix_ns();
            if resumed_at > self.stats.paused_at_unix_ns {
                self.stats.guest_visible_downtime_ms =
                    (resumed_at - self.stats.paused_at_unix_ns) as f64 / 1e6;
            }
            if verdict.mismatched_pages() > 0 {
                self.stats.verify_after_ms = ms(t.elapsed());
                return Err(Error::VerificationFailed {
                    mismatched_pages: verdict.mismatched_pages(),
                    first: if unreported.is_empty() {
                        "the destination's error names them".into()
                    } else {
                        format!(
                            "the destination's error names them; this side's populated-pages \
                             answer had left out pages that hold data: {}",
                            unreported.join(", ")
                        )
                    },
                    after: "the source guest stays paused and intact: stop the destination and \
                            resume the source",
                });
            }
            self.stats.verified = true;
        }
        self.stats.verify_after_ms = ms(t.elapsed());
        tracing::info!(
            pages = total,
            zero_checked = self.stats.verify_zero_checked_pages,
            verified = self.stats.verified,
            ms = self.stats.verify_after_ms,
            "verification after the commit"
        );
        Ok(())
    }

    /// After the commit the guest belongs to the destination: whatever fails then comes back as
    /// an error that says so (never one a caller could take for "the guest still runs here"
    /// and migrate it again), `VerificationIncomplete` after a precopy, `Postcopy` after a
    /// postcopy. Errors before the commit pass unchanged.
    fn after_commit(&self, e: Error) -> Error {
        if !self.committed {
            return e;
        }
        match e {
            e @ (Error::VerificationFailed { .. }
            | Error::VerificationIncomplete(_)
            | Error::Postcopy { .. }) => e,
            e if self.stats.postcopy => Error::Postcopy {
                context: "finishing after the commit",
                source: std::io::Error::other(crate::error::chain(&e)),
            },
            e => Error::VerificationIncomplete(crate::error::chain(&e)),
        }
    }

    /// Bytes written to the control channel and every page channel.
    fn bytes_sent(&self) -> u64 {
        self.out.bytes_written()
            + self
                .channels
                .as_ref()
                .map_or(0, |c| c.totals().iter().map(|s| s.bytes).sum())
    }

    /// Cleanup on both paths: stop the page channels' threads, stop logging, drop the throttle,
    /// and on failure resume the guest.
    fn finish(&mut self, ok: bool) {
        // Their threads end when their queues close (at once, or after a write in flight, which
        // the connection's send timeout bounds).
        self.channels = None;
        if self.logging {
            if let Err(e) = self.mem.stop_logging() {
                tracing::error!(error = %e, "stopping dirty logging failed");
            }
        }
        if self.throttle != 0 {
            if let Err(e) = self.vm.set_throttle(0) {
                tracing::error!(error = %e, "removing the auto-converge throttle failed");
            }
        }
        // Once committed the guest belongs to the destination: never resume it here (a failed
        // verification leaves it paused and intact for its owner to decide).
        if !ok && self.paused && !self.committed {
            match self.vm.resume() {
                Ok(()) => tracing::warn!("migration failed after pause: source guest resumed"),
                Err(e) => {
                    tracing::error!(error = %e, "migration failed and the source guest could not be resumed");
                }
            }
        }
    }
}

/// Now, as Unix time in ns (the host clock both sides of a local migration share).
pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
