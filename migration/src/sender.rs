// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sending pages: a window's pages and zero ranges encoded into records, by the migration thread
//! itself (a version-1 stream) or by a session's page-channel threads, one per channel.
//!
//! The migration thread decides everything about a window (re-arming it, asking which pages are
//! populated, taking its dirty bits) and hands the window to the channel of its index; the
//! channel's thread reads the pages, checks them for zero and writes the records. A page always
//! belongs to the same window, so it always travels on the same channel, in order.

use std::io::{BufWriter, Write};
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Duration;

use crate::PAGE_SIZE;

use crate::cpu::thread_cpu_time;
use crate::ratelimit::{RateLimitedWriter, SharedBucket};
use crate::stream::{self, PageBatch};
use crate::{Error, MigrationBlock, Result};

/// Capacity of the outgoing buffer of a stream or channel (1 MiB): big writes keep the per-syscall
/// cost negligible.
pub(crate) const WRITE_BUFFER: usize = 1 << 20;

/// Windows queued per channel: enough to keep a channel busy while the migration thread prepares
/// the next one, few enough that what is queued was re-armed only just before it is read.
const QUEUE: usize = 2;

/// The writer of a stream or channel: buffered, rate limited, counting bytes.
pub(crate) type Out = RateLimitedWriter<BufWriter<Box<dyn Write + Send>>>;

/// A stream or channel writer over `w`, sharing `bucket`'s limit.
pub(crate) fn out(w: Box<dyn Write + Send>, bucket: SharedBucket) -> Out {
    RateLimitedWriter::with_bucket(BufWriter::with_capacity(WRITE_BUFFER, w), bucket)
}

/// One window of one pass: what the migration thread decided, for a sender to send.
#[derive(Debug, Default)]
pub(crate) struct WindowJob {
    /// Block index.
    pub(crate) block: u32,
    /// Dirty pages that were never populated: sent as zero ranges, not read.
    pub(crate) zero_ranges: Vec<Range<u64>>,
    /// Dirty pages to read and send, in order.
    pub(crate) pages: Vec<u64>,
}

/// What a sender did since it was last asked.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Sent {
    /// Page records (zero pages included).
    pub(crate) pages: u64,
    /// Of which zero pages.
    pub(crate) zero: u64,
    /// Bytes written.
    pub(crate) bytes: u64,
    /// CPU time of the sending thread while it encoded and wrote.
    pub(crate) cpu: Duration,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Sent) {
        self.pages += o.pages;
        self.zero += o.zero;
        self.bytes += o.bytes;
        self.cpu += o.cpu;
    }
}

/// Encodes windows into records (one page batch buffer, reused).
#[derive(Debug)]
pub(crate) struct Encoder {
    batch: PageBatch,
    rec: Vec<u8>,
}

impl Encoder {
    pub(crate) fn new() -> Self {
        Encoder {
            batch: PageBatch::new(PAGE_SIZE as usize),
            rec: Vec::new(),
        }
    }

    /// Send `job`'s zero ranges, then its pages, read from `block`, to `out`. Zero ranges and
    /// pages of one window are disjoint, so their order does not matter.
    pub(crate) fn send<B: MigrationBlock + ?Sized>(
        &mut self,
        job: &WindowJob,
        block: &B,
        out: &mut Out,
    ) -> Result<Sent> {
        let before = out.bytes_written();
        let mut sent = Sent::default();
        for r in &job.zero_ranges {
            self.rec.clear();
            stream::encode_zero_range(job.block, r.start, r.end - r.start, &mut self.rec);
            out.write_all(&self.rec)
                .map_err(Error::io("sending pages"))?;
        }
        for &p in &job.pages {
            let (zero, _) = self.batch.push_page(job.block, p, false, |buf| {
                block
                    .read(p * PAGE_SIZE, buf)
                    .map_err(Error::memory("reading a page"))
            })?;
            sent.pages += 1;
            sent.zero += u64::from(zero);
            if self.batch.is_full() {
                out.write_all(self.batch.take())
                    .map_err(Error::io("sending pages"))?;
            }
        }
        if !self.batch.is_empty() {
            out.write_all(self.batch.take())
                .map_err(Error::io("sending pages"))?;
        }
        sent.bytes = out.bytes_written() - before;
        Ok(sent)
    }
}

/// A message to a channel's thread.
enum Msg {
    /// Send this window.
    Window(WindowJob),
    /// Flush, and report what was sent since the last report.
    Barrier(SyncSender<Result<Sent>>),
    /// Flush, send the channel's end record, report, and stop.
    Finish(SyncSender<Result<Sent>>),
}

/// The page channels' threads, as the migration thread sees them.
pub(crate) struct Channels {
    txs: Vec<SyncSender<Msg>>,
    /// Page records each channel sent in all (for its end record and the stream's).
    records: Vec<u64>,
    /// What each channel sent in all.
    totals: Vec<Sent>,
}

impl Channels {
    /// Start one thread per writer in `outs`, in `scope`, reading pages from `blocks`.
    pub(crate) fn start<'scope, 'env, B: MigrationBlock>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        blocks: &'env [B],
        outs: Vec<Out>,
    ) -> Result<Self> {
        let mut txs = Vec::with_capacity(outs.len());
        for (index, out) in outs.into_iter().enumerate() {
            let (tx, rx) = sync_channel(QUEUE);
            std::thread::Builder::new()
                .name(format!("migration-ch{index}"))
                .spawn_scoped(scope, move || channel_thread(index as u32, blocks, rx, out))
                .map_err(Error::io("starting a page channel thread"))?;
            txs.push(tx);
        }
        let n = txs.len();
        Ok(Channels {
            txs,
            records: vec![0; n],
            totals: vec![Sent::default(); n],
        })
    }

    /// How many channels.
    pub(crate) fn len(&self) -> usize {
        self.txs.len()
    }

    /// Hand `job` to channel `index`; waits while its queue is full.
    pub(crate) fn send(&mut self, index: usize, job: WindowJob) -> Result<()> {
        self.txs[index]
            .send(Msg::Window(job))
            .map_err(|_| gone(index))
    }

    /// Wait until every channel sent what it was given; what they sent meanwhile, in all.
    pub(crate) fn barrier(&mut self) -> Result<Sent> {
        self.ask(Msg::Barrier)
    }

    /// Every channel sends its end record and stops; what they sent since the last barrier.
    pub(crate) fn finish(&mut self) -> Result<Sent> {
        self.ask(Msg::Finish)
    }

    fn ask(&mut self, msg: fn(SyncSender<Result<Sent>>) -> Msg) -> Result<Sent> {
        let mut replies = Vec::with_capacity(self.txs.len());
        for (i, tx) in self.txs.iter().enumerate() {
            let (rtx, rrx) = sync_channel(1);
            tx.send(msg(rtx)).map_err(|_| gone(i))?;
            replies.push(rrx);
        }
        let mut all = Sent::default();
        for (i, r) in replies.into_iter().enumerate() {
            let sent = r.recv().map_err(|_| gone(i))??;
            self.records[i] += sent.pages;
            self.totals[i] += sent;
            all += sent;
        }
        Ok(all)
    }

    /// Page records each channel sent, up to the last barrier.
    pub(crate) fn records(&self) -> &[u64] {
        &self.records
    }

    /// What each channel sent in all.
    pub(crate) fn totals(&self) -> &[Sent] {
        &self.totals
    }
}

fn gone(index: usize) -> Error {
    Error::Channel {
        index: index as u32,
        source: Box::new(Error::Io {
            context: "sending pages",
            source: std::io::Error::other("the channel's thread stopped"),
        }),
    }
}

/// A channel's thread: send windows as they come; on an error, report it at the next barrier and
/// drop what follows (so the migration thread never waits on a dead channel).
fn channel_thread<B: MigrationBlock>(index: u32, blocks: &[B], rx: Receiver<Msg>, mut out: Out) {
    let mut enc = Encoder::new();
    let mut since = Sent::default();
    let mut records = 0u64;
    let mut failed: Option<Error> = None;
    let fail = |e: Error| Error::Channel {
        index,
        source: Box::new(e),
    };
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Window(job) => {
                if failed.is_some() {
                    continue;
                }
                let cpu = thread_cpu_time();
                match enc.send(&job, &blocks[job.block as usize], &mut out) {
                    Ok(mut sent) => {
                        sent.cpu = thread_cpu_time().saturating_sub(cpu);
                        records += sent.pages;
                        since += sent;
                    }
                    Err(e) => failed = Some(fail(e)),
                }
            }
            Msg::Barrier(reply) => {
                let r = match failed.take() {
                    Some(e) => Err(e),
                    None => out
                        .flush()
                        .map(|()| std::mem::take(&mut since))
                        .map_err(|e| fail(Error::io("sending pages")(e))),
                };
                if r.is_err() {
                    // Reported once; what follows is dropped, and a later barrier says so.
                    failed = Some(fail(Error::Io {
                        context: "sending pages",
                        source: std::io::Error::other("the channel failed earlier"),
                    }));
                }
                let _ = reply.send(r);
            }
            Msg::Finish(reply) => {
                let r = match failed.take() {
                    Some(e) => Err(e),
                    None => {
                        let mut rec = Vec::new();
                        stream::encode_channel_end(records, &mut rec);
                        since.bytes += rec.len() as u64;
                        out.write_all(&rec)
                            .and_then(|()| out.flush())
                            .map(|()| std::mem::take(&mut since))
                            .map_err(|e| fail(Error::io("sending the channel end")(e)))
                    }
                };
                let _ = reply.send(r);
                return;
            }
        }
    }
}
