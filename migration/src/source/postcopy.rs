// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The source's switch to postcopy and its postcopy phase (docs/design.md, "Postcopy").

use std::io::Write;
use std::time::{Duration, Instant};

use clearlog_bitmap::AtomicBitmap;

use super::{ms, Run};
use crate::postcopy::auto_switches;
use crate::postcopy::serve::{serve_and_push, Served};
use crate::sender::{self, Channels, Sent};
use crate::stream::{self, MAX_MISSING_WORDS};
use crate::stream::{Header, Record, StreamReader, FLAG_POSTCOPY_RECOVER};
use crate::transport::TransportRead;
use crate::Session;
use crate::{DirtyTracking, DowntimeBreakdown, Error, PostcopyPolicy, Result, PAGE_SIZE};

impl<M: DirtyTracking + ?Sized> Run<'_, '_, M> {
    /// After live pass `iteration` (which took `pass_time` while the guest dirtied `dirty`
    /// pages, and left `remaining` bytes at `bandwidth`): is it time to switch to postcopy?
    pub(super) fn postcopy_due(
        &self,
        iteration: u32,
        dirty: u64,
        pass_time: Duration,
        remaining: u64,
        bandwidth: u64,
    ) -> bool {
        match self.config.postcopy {
            PostcopyPolicy::Off => false,
            PostcopyPolicy::AfterPasses(n) => iteration >= n,
            PostcopyPolicy::Auto => {
                let rate = (dirty * PAGE_SIZE) as f64 / pass_time.as_secs_f64().max(1e-3);
                auto_switches(rate, remaining, bandwidth, self.config.downtime_limit)
            }
        }
    }

    /// Pause, send the pages still dirty as missing and the state, wait for the destination's
    /// acknowledgement, commit, then serve its requests while pushing the rest; end the stream
    /// and verify as after any commit.
    pub(super) fn switch_to_postcopy(&mut self) -> Result<()> {
        if self.channels.is_none() || self.ack.is_none() {
            return Err(Error::PostcopyNeedsSession);
        }
        self.check_cancel()?;
        // While the guest still runs here: the destination loads every precopy page (a copy
        // landing after a page is dropped would overwrite what postcopy places), then drops the
        // pages dirty so far, before the pause; at the switch only the rest is left to drop.
        self.drain()?;
        self.send_missing()?;
        self.drain()?;
        // The bandwidth limit stays: the postcopy phase is live.
        let (pause_at, mut b, state, save_ms) = self.pause_and_save()?;
        let t = Instant::now();
        self.sync()?;
        b.final_sync_ms = ms(t.elapsed());
        let t = Instant::now();
        let missing = self.send_missing()?;
        self.send_state(&state)?;
        let mut rec = Vec::new();
        stream::encode_postcopy(missing, &mut rec);
        self.out
            .write_all(&rec)
            .and_then(|()| self.out.flush())
            .map_err(Error::io("sending the postcopy switch"))?;
        b.state_ms = save_ms + ms(t.elapsed());
        self.commit_postcopy(pause_at, b)?;
        self.stats.postcopy = true;
        self.stats.postcopy_pages = missing;
        let t = Instant::now();
        // After the commit any failure strands the destination's guest: one kind of error, never
        // one a caller could take for "the guest still runs here" (and migrate it again). The
        // end marker is part of the phase: a cut before it is recovered like any other.
        let mut phase = self
            .postcopy_phase()
            .and_then(|()| self.send_postcopy_end());
        let ended = loop {
            match phase {
                Ok(()) => break Ok(()),
                // Resumed on a new session (whose end marker goes next), or given up.
                Err(e) => match self.recover_postcopy(e) {
                    Ok(()) => phase = self.send_postcopy_end(),
                    Err(e) => break Err(e),
                },
            }
        };
        ended.map_err(|e| match e {
            e @ Error::Postcopy { .. } => e,
            e => Error::Postcopy {
                context: "sending the missing pages",
                source: std::io::Error::other(crate::error::chain(&e)),
            },
        })?;
        self.stats.postcopy_ms = ms(t.elapsed());
        // The migration's total runs to the last page's arrival, not to the commit: until then
        // the guest still depends on this side.
        self.committed_at = Some(Instant::now());
        self.stats.bytes_sent = self.bytes_sent();
        self.verify_after_commit()
    }

    /// The end marker of the postcopy's (last) session, with that session's page records.
    fn send_postcopy_end(&mut self) -> Result<()> {
        let mut rec = Vec::new();
        stream::encode_end(self.page_records, &mut rec);
        self.out
            .write_all(&rec)
            .and_then(|()| self.out.flush())
            .map_err(Error::io("sending the end marker"))
    }

    /// The pages still dirty, per block, as missing-page records (a superset of any list sent
    /// before: bits only come, until the switch); how many.
    fn send_missing(&mut self) -> Result<u64> {
        let mut total = 0;
        let mut rec = Vec::new();
        for (bi, bs) in self.states.iter().enumerate() {
            let words = bs.dirty.as_words();
            for (i, part) in words.chunks(MAX_MISSING_WORDS as usize).enumerate() {
                if part.iter().all(|&w| w == 0) {
                    continue;
                }
                total += part.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                rec.clear();
                let first_page = (i * MAX_MISSING_WORDS as usize * 64) as u64;
                stream::encode_missing(bi as u32, first_page, part, &mut rec);
                self.out
                    .write_all(&rec)
                    .map_err(Error::io("sending the missing pages"))?;
            }
        }
        Ok(total)
    }

    /// Wait for the destination's acknowledgement and confirm: the commit point, after which
    /// the guest runs there and this side never resumes it (its memory holds the missing pages).
    fn commit_postcopy(&mut self, pause_at: Instant, mut b: DowntimeBreakdown) -> Result<()> {
        self.ack_and_confirm(&mut b)?;
        self.committed = true;
        self.committed_at = Some(Instant::now());
        self.stats.downtime_ms = ms(pause_at.elapsed());
        self.stats.downtime_breakdown = b;
        self.stats.converged = false;
        tracing::info!(
            downtime_ms = self.stats.downtime_ms,
            ?b,
            "postcopy committed"
        );
        Ok(())
    }

    /// Serve requests on the control channel while the page channels push the rest, until the
    /// destination says every page arrived.
    fn postcopy_phase(&mut self) -> Result<()> {
        let pending: Vec<AtomicBitmap> = self
            .states
            .iter_mut()
            .map(|bs| {
                let bits = AtomicBitmap::new(bs.dirty.len());
                for p in bs.dirty.iter_ones() {
                    bits.set(p);
                }
                bs.dirty.fill(false);
                bits
            })
            .collect();
        let (blocks, cancel) = (self.blocks, self.cancel);
        let reader = self.ack.as_mut().ok_or(Error::PostcopyNeedsSession)?;
        let channels = self.channels.as_mut().ok_or(Error::PostcopyNeedsSession)?;
        let (served, pushed) = serve_and_push(
            &mut self.out,
            reader.as_mut(),
            channels,
            blocks,
            &pending,
            cancel,
        )?;
        self.count_postcopy(served, pushed);
        self.finish_channel_stats();
        Ok(())
    }

    fn count_postcopy(&mut self, served: Served, pushed: Sent) {
        self.page_records += pushed.pages + served.sent.pages;
        self.stats.pages_sent += pushed.pages + served.sent.pages;
        self.stats.zero_pages += pushed.zero + served.sent.zero;
        self.stats.postcopy_requests += served.requests;
        self.stats.postcopy_requests_first += served.first;
    }

    /// The postcopy phase was cut (`e`): with [`crate::Source::with_postcopy_recovery`], open
    /// sessions until one resumes it (or the time is up); without, fail with `e`.
    fn recover_postcopy(&mut self, e: Error) -> Result<()> {
        let Some((reconnect, timeout)) = self.recovery else {
            return Err(e);
        };
        tracing::warn!(error = %crate::error::chain(&e), "postcopy cut: the guest stays paused here; reconnecting");
        // The cut session ends here: its page channels stop and its connections close, so the
        // destination sees the cut too (a failure on this side only may have left them open).
        self.channels = None;
        self.ack = None;
        let cut = std::mem::replace(
            &mut self.out,
            sender::out(Box::new(std::io::sink()), self.bucket.clone()),
        );
        // What the cut session's control channel still buffers is dropped, not flushed: a late
        // end marker would tell the destination this session ended well (seen in a faults run:
        // it then waited for digests that never came instead of for the source).
        drop(cut.into_inner().into_parts());
        let deadline = Instant::now() + timeout;
        let mut last = e;
        while Instant::now() < deadline {
            self.check_cancel()?;
            match reconnect().and_then(|s| self.resume_on(s)) {
                Ok(()) => {
                    self.stats.postcopy_recoveries += 1;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), "postcopy not resumed yet");
                    last = e;
                    std::thread::sleep(RECONNECT_PAUSE);
                }
            }
        }
        Err(Error::Postcopy {
            context: "resuming the postcopy on a new session",
            source: std::io::Error::other(format!(
                "no session resumed it within {timeout:?}; last: {}",
                crate::error::chain(&last)
            )),
        })
    }

    /// Resume the cut postcopy on `session`: the header again (flagged), the destination's list
    /// of the pages it still misses, then requests and the push of those pages on new channels.
    /// On success the session's control channel carries the rest (end marker, verification).
    fn resume_on(&mut self, session: Session) -> Result<()> {
        let no_half = |half| Error::no_half("resuming the postcopy", half);
        let Session { control, pages } = session;
        let mut out = sender::out(
            control.writer.ok_or_else(|| no_half("write"))?,
            self.bucket.clone(),
        );
        let mut reader = control.reader.ok_or_else(|| no_half("read"))?;
        let mut header = self.header.clone().ok_or(Error::PostcopyNeedsSession)?;
        header.flags |= FLAG_POSTCOPY_RECOVER;
        header
            .write_fields_to(&mut out)
            .and_then(|()| out.flush())
            .map_err(Error::io("sending the header"))?;
        let pending = read_missing(reader.as_mut(), &header, self.config.ack_timeout)?;
        let mut outs = Vec::with_capacity(pages.len());
        for t in pages {
            outs.push(sender::out(
                t.writer.ok_or_else(|| no_half("write"))?,
                self.bucket.clone(),
            ));
        }
        let (blocks, cancel) = (self.blocks, self.cancel);
        let (served, pushed) = std::thread::scope(|scope| {
            let mut channels = Channels::start(scope, blocks, outs)?;
            serve_and_push(
                &mut out,
                reader.as_mut(),
                &mut channels,
                blocks,
                &pending,
                cancel,
            )
        })?;
        // The end marker of this session counts this session's page records.
        self.page_records = 0;
        self.count_postcopy(served, pushed);
        self.out = out;
        self.ack = Some(reader);
        Ok(())
    }
}

/// How long a source whose postcopy was cut waits between two attempts to resume it.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// The destination's answer to a session that resumes a postcopy: the pages it still misses
/// (missing-page records, then the switch record with their count), read within `timeout`.
fn read_missing(
    reader: &mut dyn TransportRead,
    header: &Header,
    timeout: Duration,
) -> Result<Vec<AtomicBitmap>> {
    reader
        .set_read_timeout(Some(timeout))
        .map_err(Error::io("reading the pages still missing"))?;
    let pending: Vec<AtomicBitmap> = header
        .blocks
        .iter()
        .map(|b| AtomicBitmap::new((b.size / PAGE_SIZE) as usize))
        .collect();
    let mut r = StreamReader::with_layout(&mut *reader, header);
    let listed = loop {
        match r.next_record()? {
            Record::Missing {
                block,
                first_page,
                words,
            } => {
                // The decoder checked every set bit; zero words past the block may follow.
                let used = words.iter().rposition(|&w| w != 0).map_or(0, |i| i + 1);
                pending[block as usize]
                    .try_or_words_at((first_page / 64) as usize, &words[..used])
                    .map_err(|_| Error::Malformed("missing pages (past the block)"))?;
            }
            Record::Postcopy { missing_pages } => break missing_pages,
            _ => return Err(Error::UnexpectedRecord("not a list of missing pages")),
        }
    };
    let counted: u64 = pending.iter().map(|p| p.count_ones() as u64).sum();
    if counted != listed {
        return Err(Error::Malformed(
            "missing pages (the count differs from the pages listed)",
        ));
    }
    reader
        .set_read_timeout(None)
        .map_err(Error::io("reading the pages still missing"))?;
    Ok(pending)
}
