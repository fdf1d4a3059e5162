// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The source's switch to postcopy and its postcopy phase (docs/design.md, "Postcopy").

use std::io::Write;
use std::time::{Duration, Instant};

use clearlog_bitmap::AtomicBitmap;

use super::{ms, unix_ns, vm_err, Run};
use crate::postcopy::auto_switches;
use crate::postcopy::serve::{push_pending, serve_requests};
use crate::stream::{self, MAX_MISSING_WORDS};
use crate::{
    CancelToken, DirtyTracking, DowntimeBreakdown, Error, PostcopyPolicy, Result, PAGE_SIZE,
};

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
        let pause_at = Instant::now();
        self.stats.paused_at_unix_ns = unix_ns();
        let mut b = DowntimeBreakdown::default();
        self.paused = true;
        self.vm.pause().map_err(vm_err("pause"))?;
        b.pause_ms = ms(pause_at.elapsed());
        let t = Instant::now();
        let state = self.vm.save_state().map_err(vm_err("save_state"))?;
        let save_ms = ms(t.elapsed());
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
        // After the commit any failure strands the destination's guest: one kind of error.
        self.postcopy_phase().map_err(|e| match e {
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
        let mut rec = Vec::new();
        stream::encode_end(self.page_records, &mut rec);
        self.out
            .write_all(&rec)
            .and_then(|()| self.out.flush())
            .map_err(Error::io("sending the end marker"))?;
        self.stats.bytes_sent = self.bytes_sent();
        self.verify_after_commit()
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
        // Cancelled when the push fails or the caller cancels: the request server stops then.
        let stop = CancelToken::new();
        let (blocks, cancel) = (self.blocks, self.cancel);
        let reader = self.ack.as_mut().ok_or(Error::PostcopyNeedsSession)?;
        let channels = self.channels.as_mut().ok_or(Error::PostcopyNeedsSession)?;
        let out = &mut self.out;
        let (served, pushed) = std::thread::scope(|scope| {
            let server =
                scope.spawn(|| serve_requests(reader.as_mut(), out, blocks, &pending, &stop));
            let pushed = push_pending(channels, &pending, cancel);
            if pushed.is_err() || cancel.is_cancelled() {
                stop.cancel();
            }
            let served = server
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (served, pushed)
        });
        let pushed = pushed?;
        let served = served?;
        self.page_records += pushed.pages + served.sent.pages;
        self.stats.pages_sent += pushed.pages + served.sent.pages;
        self.stats.zero_pages += pushed.zero + served.sent.zero;
        self.stats.postcopy_requests = served.requests;
        self.stats.postcopy_requests_first = served.first;
        self.finish_channel_stats();
        Ok(())
    }
}
