// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The source side: precopy iterations, convergence, switchover.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use clearlog_bitmap::{Bitmap, ClearBitmap};

use crate::cpu::{ns_per_page, process_cpu_time, thread_cpu_time};
use crate::digest::{final_digests, hash_threads, page_digests};
use crate::memory::ask_populated;
use crate::ratelimit::RateLimitedWriter;
use crate::stats::{IterationStats, MigrationStats, Progress};
use crate::stream::{
    self, BlockInfo, Header, PageBatch, FLAG_ACK_REQUESTED, FLAG_CONFIRM, FLAG_DIGEST_FULL,
    FLAG_VERIFY_AFTER,
};
use crate::transport::TransportRead;
use crate::{
    CancelToken, DirtyTracking, DowntimeBreakdown, Error, MigrationBlock, MigrationConfig,
    MigrationDirtyLogMode, Result, Transport, VerifyMode, VmControl, PAGE_SHIFT, PAGE_SIZE,
};

/// Capacity of the outgoing buffer (1 MiB): big writes keep the per-syscall cost negligible.
const WRITE_BUFFER: usize = 1 << 20;
/// Poll interval while waiting for the acknowledgement (bounds the reaction time to a cancel).
const ACK_POLL: Duration = Duration::from_millis(100);

/// Per-block state of the source.
struct BlockState<B> {
    block: B,
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
#[derive(Debug)]
pub struct Source<'a, M: ?Sized> {
    mem: &'a M,
    config: MigrationConfig,
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
        Ok(Source { mem, config })
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
        let writer = transport.writer.ok_or(Error::Io {
            context: "starting the migration",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "transport has no write half",
            ),
        })?;
        let mut run = Run {
            mem: self.mem,
            config: &self.config,
            vm,
            cancel,
            progress,
            out: RateLimitedWriter::new(
                BufWriter::with_capacity(WRITE_BUFFER, writer),
                self.config.bandwidth_limit_bytes_per_s,
            ),
            ack: transport.reader,
            blocks: Vec::new(),
            batch: PageBatch::new(PAGE_SIZE as usize),
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
        let result = run.run(start);
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
    }
}

struct Run<'r, 'p, M: DirtyTracking + ?Sized> {
    mem: &'r M,
    config: &'r MigrationConfig,
    vm: &'r dyn VmControl,
    cancel: &'r CancelToken,
    progress: Option<&'p mut dyn FnMut(&Progress)>,
    out: RateLimitedWriter<BufWriter<Box<dyn Write + Send>>>,
    ack: Option<Box<dyn TransportRead>>,
    blocks: Vec<BlockState<M::Block>>,
    batch: PageBatch,
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
            let bandwidth = if send_time.is_zero() {
                0
            } else {
                (live_bytes as f64 / send_time.as_secs_f64()) as u64
            };
            self.stats.measured_bandwidth_bytes_per_s = bandwidth;
            let pass_bandwidth = if pass_time.is_zero() {
                0
            } else {
                (pass.bytes as f64 / pass_time.as_secs_f64()) as u64
            };
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
            if expected <= cfg.downtime_limit {
                break;
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

    fn setup(&mut self) -> Result<()> {
        let blocks = self.mem.blocks();
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
        header
            .write_to(&mut self.out)
            .map_err(Error::io("sending the header"))?;
        self.stats.guest_mem_bytes = blocks.iter().map(|b| b.size()).sum();
        for block in blocks {
            let pages = block.pages() as usize;
            let clear = match self.config.mode {
                MigrationDirtyLogMode::Legacy | MigrationDirtyLogMode::Ring => None,
                MigrationDirtyLogMode::Clear { shift } => Some(
                    ClearBitmap::new(block.pages(), shift)
                        .map_err(|e| Error::memory("sizing the clear bitmap")(e.into()))?,
                ),
            };
            self.blocks.push(BlockState {
                block,
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
        for bs in &mut self.blocks {
            new += mem
                .take_dirty(&bs.block, &mut bs.dirty, bs.clear.as_mut())
                .map_err(Error::memory("taking the dirty bits"))?;
        }
        if self.config.mode.rearms_at_sync() {
            for bs in &self.blocks {
                let t = Instant::now();
                mem.clear_dirty(&bs.block, 0, bs.block.size())
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
        self.blocks
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

    fn send_batch(&mut self) -> Result<()> {
        if !self.batch.is_empty() {
            let record = self.batch.take();
            self.out
                .write_all(record)
                .map_err(Error::io("sending pages"))?;
        }
        Ok(())
    }

    /// One walk over all dirty pages, in order, one window at a time (a clear chunk, or
    /// [`LEGACY_WINDOW_PAGES`] in legacy mode). Entering a window: re-arm it (clear mode, live
    /// passes), THEN ask the memory which of its pages are populated, and send the dirty pages that
    /// are not as zero ranges without reading them; then read and send the others. Re-arm before
    /// asking: a page the guest populates after the question is dirty again (asked the other way
    /// round, it would be lost). A window whose pages all go as a zero range is still re-armed, or
    /// `INITIALLY_SET` would leave it dirty for the next pass.
    fn pass(&mut self) -> Result<PassCounters> {
        let cpu = thread_cpu_time();
        let result = self.walk();
        self.pass_cpu += thread_cpu_time().saturating_sub(cpu);
        result
    }

    /// [`pass`](Self::pass) without the CPU accounting.
    fn walk(&mut self) -> Result<PassCounters> {
        let mut c = PassCounters::default();
        let bytes_before = self.out.bytes_written();
        let clears_before = self.stats.log_clear_calls;
        let mem = self.mem;
        let mut populated = Vec::new();
        let mut rec = Vec::new();
        for bi in 0..self.blocks.len() {
            let mut next = self.blocks[bi].dirty.find_next_set(0);
            // End of the window being sent: pages below it were classified (and re-armed).
            let mut window_end = 0u64;
            while let Some(page) = next {
                let p = page as u64;
                // Between windows: pages below `window_end` are done for this pass.
                if p >= window_end && self.mid_pass_sync_if_due()? {
                    // Pages between the window's end and `p` may be dirty now: send them too.
                    next = self.blocks[bi].dirty.find_next_set(window_end as usize);
                    if next != Some(page) {
                        continue;
                    }
                }
                let bs = &mut self.blocks[bi];
                if p >= window_end {
                    let (first, npages) = match bs.clear.as_ref() {
                        Some(clear) => clear.chunk_pages(clear.chunk_of(p)),
                        None => {
                            let first = p - p % LEGACY_WINDOW_PAGES;
                            (first, LEGACY_WINDOW_PAGES.min(bs.block.pages() - first))
                        }
                    };
                    window_end = first + npages;
                    // Paused (the final pass): nothing can dirty a page any more, so re-arming is
                    // pointless work inside the downtime.
                    if let Some(clear) = bs.clear.as_mut().filter(|_| !self.paused) {
                        let t = Instant::now();
                        // Re-arm, THEN ask and read.
                        let max =
                            (CLEAR_MERGE_BYTES >> (u32::from(clear.shift()) + PAGE_SHIFT)).max(1);
                        if mem
                            .clear_chunks_before_send(&bs.block, clear, p, max)
                            .map_err(Error::memory("re-arming a chunk before sending it"))?
                            > 0
                        {
                            let took = t.elapsed();
                            self.stats.log_clear_calls += 1;
                            self.stats.log_clear_ms += ms(took);
                            tracing::trace!(
                                block = bs.block.name(),
                                first_page = first,
                                us = took.as_micros() as u64,
                                "dirty log clear"
                            );
                        }
                    }
                    ask_populated(&bs.block, p, window_end - p, &mut populated)
                        .map_err(Error::memory("asking which pages are populated"))?;
                    let mut cursor = p;
                    let gaps = populated
                        .iter()
                        .map(|r| (r.start, r.end))
                        .chain(std::iter::once((window_end, window_end)));
                    for (start, end) in gaps {
                        if cursor < start {
                            let (dirty, resent) =
                                take_zero_range(&mut bs.dirty, &mut bs.sent, cursor, start);
                            if dirty > 0 {
                                rec.clear();
                                stream::encode_zero_range(
                                    bi as u32,
                                    cursor,
                                    start - cursor,
                                    &mut rec,
                                );
                                // Pages batched so far go first: records keep page order.
                                if !self.batch.is_empty() {
                                    let pages = self.batch.take();
                                    self.out
                                        .write_all(pages)
                                        .map_err(Error::io("sending pages"))?;
                                }
                                self.out
                                    .write_all(&rec)
                                    .map_err(Error::io("sending pages"))?;
                                c.zero_range += dirty;
                                self.stats.resent_pages += resent;
                            }
                        }
                        cursor = cursor.max(end);
                    }
                    next = bs.dirty.find_next_set(page);
                    continue;
                }
                bs.dirty.clear(page);
                if bs.sent.test(page) {
                    self.stats.resent_pages += 1;
                } else {
                    bs.sent.set(page);
                }
                let block = &bs.block;
                let (zero, _) = self.batch.push_page(bi as u32, p, false, |buf| {
                    block
                        .read(p * PAGE_SIZE, buf)
                        .map_err(Error::memory("reading a page"))
                })?;
                c.pages += 1;
                c.zero += u64::from(zero);
                if self.batch.is_full() {
                    self.send_batch()?;
                    self.check_cancel()?;
                }
                next = self.blocks[bi].dirty.find_next_set(page + 1);
            }
            self.send_batch()?;
        }
        self.out.flush().map_err(Error::io("sending pages"))?;
        debug_assert!(self.batch.is_empty());
        self.page_records += c.pages;
        self.stats.pages_sent += c.pages;
        self.stats.zero_pages += c.zero;
        self.stats.zero_range_pages += c.zero_range;
        c.bytes = self.out.bytes_written() - bytes_before;
        c.clears = self.stats.log_clear_calls - clears_before;
        Ok(c)
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

    fn switchover(&mut self) -> Result<()> {
        self.check_cancel()?;
        let pause_at = Instant::now();
        self.stats.paused_at_unix_ns = unix_ns();
        let mut b = DowntimeBreakdown::default();
        // Marked before the call: a pause that fails may still have stopped some vCPUs, and the
        // failure path must resume them (resuming a running guest is harmless).
        self.paused = true;
        self.vm.pause().map_err(vm_err("pause"))?;
        b.pause_ms = ms(pause_at.elapsed());
        // The limit applies to the live phase only: do not stretch the downtime.
        self.out.set_rate(0);
        // The state first: a device that writes guest RAM while it saves (flushing a queue into
        // guest memory) dirties pages, and the final sync and pass below must send them.
        let t = Instant::now();
        let state = self.vm.save_state().map_err(vm_err("save_state"))?;
        let save_ms = ms(t.elapsed());
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
        b.final_pages_ms = ms(t.elapsed());
        tracing::info!(pages_sent = last.pages, "migration final pass (paused)");

        let t = Instant::now();
        let mut rec = Vec::new();
        for blob in &state {
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
        b.state_ms = save_ms + ms(t.elapsed());

        if self.config.verify == VerifyMode::Strict {
            // Strict: all of RAM hashed while paused, checked by the destination before it resumes.
            let t = Instant::now();
            let threads = hash_threads();
            for bi in 0..self.blocks.len() {
                let digests = page_digests(&self.blocks[bi].block, threads)?;
                rec.clear();
                stream::encode_digests(bi as u32, &digests, &mut rec);
                self.out
                    .write_all(&rec)
                    .map_err(Error::io("sending digests"))?;
            }
            b.verify_ms = ms(t.elapsed());
        }
        rec.clear();
        stream::encode_end(self.page_records, &mut rec);
        self.out
            .write_all(&rec)
            .map_err(Error::io("sending the end marker"))?;
        self.out.flush().map_err(Error::io("flushing the stream"))?;
        self.stats.bytes_sent = self.out.bytes_written();
        if let Some(reader) = self.ack.as_mut() {
            let t = Instant::now();
            wait_ack(reader.as_mut(), self.config.ack_timeout, self.cancel)?;
            b.ack_ms = ms(t.elapsed());
            // The commit point: once the confirmation is out the guest runs at the destination.
            // If it fails, no whole confirmation left us, the destination will not resume, and the
            // failure path resumes the guest here.
            // Written straight to the transport, not through the stream's buffer: a buffer that
            // failed to flush would try again when dropped, and a late confirmation could then
            // reach a destination after this side had resumed.
            let t = Instant::now();
            let mut confirm = [0u8; 8];
            confirm[..4].copy_from_slice(&stream::CONFIRM_MAGIC.to_le_bytes());
            let transport = self.out.get_mut().get_mut();
            transport
                .write_all(&confirm)
                .and_then(|()| transport.flush())
                .map_err(Error::io("sending the confirmation"))?;
            b.confirm_ms = ms(t.elapsed());
        }
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
            let block = &self.blocks[bi].block;
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
        self.stats.bytes_sent = self.out.bytes_written();
        if let Some(reader) = self.ack.as_mut() {
            let verdict = read_verdict(reader.as_mut(), self.config.ack_timeout)?;
            if verdict.resumed_at_unix_ns > self.stats.paused_at_unix_ns {
                self.stats.guest_visible_downtime_ms =
                    (verdict.resumed_at_unix_ns - self.stats.paused_at_unix_ns) as f64 / 1e6;
            }
            if verdict.mismatched_pages > 0 {
                self.stats.verify_after_ms = ms(t.elapsed());
                return Err(Error::VerificationFailed {
                    mismatched_pages: verdict.mismatched_pages,
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

    /// Cleanup on both paths: stop logging, drop the throttle, and on failure resume the guest.
    fn finish(&mut self, ok: bool) {
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

/// The destination's verdict on the verification after the commit.
struct Verdict {
    mismatched_pages: u64,
    resumed_at_unix_ns: u64,
}

/// Read the 24-byte verdict within `timeout`.
fn read_verdict(reader: &mut dyn TransportRead, timeout: Duration) -> Result<Verdict> {
    let incomplete = |why: String| Error::VerificationIncomplete(why);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 24];
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(incomplete(format!("no verdict within {timeout:?}")));
        }
        reader
            .set_read_timeout(Some(left.min(ACK_POLL)))
            .map_err(|e| incomplete(e.to_string()))?;
        match reader.read(&mut buf[got..]) {
            Ok(0) => return Err(incomplete("the destination closed the connection".into())),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(incomplete(e.to_string())),
        }
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let long = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[i..i + 8]);
        u64::from_le_bytes(w)
    };
    if word(0) != stream::VERDICT_MAGIC {
        return Err(incomplete(format!("bad verdict {buf:02x?}")));
    }
    let mismatched_pages = long(8);
    if (word(4) == stream::VERDICT_OK) != (mismatched_pages == 0) {
        return Err(incomplete(format!("inconsistent verdict {buf:02x?}")));
    }
    Ok(Verdict {
        mismatched_pages,
        resumed_at_unix_ns: long(16),
    })
}

/// Read the 8-byte acknowledgement, polling so a cancel or the timeout is noticed.
fn wait_ack(reader: &mut dyn TransportRead, timeout: Duration, cancel: &CancelToken) -> Result<()> {
    reader
        .set_read_timeout(Some(ACK_POLL))
        .map_err(Error::io("waiting for the acknowledgement"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(Error::AckTimeout(timeout));
        }
        match reader.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Error::Io {
                    context: "waiting for the acknowledgement",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })
            }
            Ok(n) => got += n,
            // A poll interval passed (the read timeout): check cancel and the deadline, read again.
            // `TimedOut` is not one: it is the connection itself timing out (ETIMEDOUT, e.g. from
            // TCP_USER_TIMEOUT on a dead link) and is reported as such.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                return Err(Error::Io {
                    context: "waiting for the acknowledgement",
                    source: e,
                })
            }
        }
    }
    let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let status = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if magic != stream::ACK_MAGIC {
        return Err(Error::BadAck);
    }
    if status != stream::ACK_OK {
        return Err(Error::DestinationRefused(status));
    }
    Ok(())
}
