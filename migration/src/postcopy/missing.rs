// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination's side of postcopy: which pages are still missing, asking the source for the
//! ones the guest touches, and placing each page that arrives exactly once.
//!
//! Pages arrive twice as a rule (asked for on the return path, and pushed in the background); the
//! first placement wins, the second finds the page there and changes nothing. Only a placement
//! that put data in counts: its digest is what the verification compares with the source's.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clearlog_bitmap::{AtomicBitmap, Bitmap};
use xxhash_rust::xxh3::xxh3_64;

use crate::postcopy::uffd::Placed;
use crate::stream::{self, MAX_MISSING_WORDS};
use crate::wire::PostcopyMessage;
use crate::{Error, Result, PAGE_SIZE};

/// Where pages are placed: guest memory under a userfaultfd, or plain memory in unit tests.
pub(crate) trait Placement: Send + Sync {
    /// Place `data` at `page` of `block` if the page is missing.
    fn place(&self, block: usize, page: u64, data: &[u8; PAGE_SIZE as usize])
        -> io::Result<Placed>;
    /// Place a zero page at `page` of `block` if the page is missing.
    fn place_zero(&self, block: usize, page: u64) -> io::Result<Placed>;
    /// The next page a thread waits on, as `(block, page)`, waiting at most `timeout`.
    fn next_fault(&self, timeout: Duration) -> io::Result<Option<(usize, u64)>>;
}

/// The destination's return path, shared by the threads that write to it; `None` once its
/// connection is gone (a postcopy waiting for its source to come back puts the new one in).
pub(crate) type ReplyPath = Mutex<Option<Box<dyn Write + Send>>>;

/// How long the fault thread waits for a fault before it looks whether the phase ended.
const FAULT_POLL: Duration = Duration::from_millis(20);

/// Per block: the pages still to come and those already asked for.
struct BlockMissing {
    /// Set at the start from the source's list; a page's bit goes when the page is placed.
    pending: AtomicBitmap,
    /// Pages asked for on the return path (once each; again, by `announce`, on a session that
    /// resumes a cut postcopy).
    requested: AtomicBitmap,
    /// Digests of the pages placed here (for the verification).
    digests: Mutex<BTreeMap<u64, u64>>,
}

/// Fault latencies: from the first fault on a page to its placement.
#[derive(Debug, Default)]
struct Latencies {
    asked: BTreeMap<(usize, u64), Instant>,
    samples: Vec<Duration>,
}

/// What postcopy cost the destination's guest, for the stats.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct MissingStats {
    /// Pages that were missing when the guest resumed.
    pub(crate) missing_pages: u64,
    /// Pages asked for because the guest (or the VMM) touched them.
    pub(crate) requested_pages: u64,
    /// Placements that found the page there already (it came twice).
    pub(crate) duplicate_pages: u64,
    /// Faults on pages the source never listed: zero at the source, placed as zero here.
    pub(crate) zero_faults: u64,
    /// Fault latencies (first fault to placement), sorted.
    pub(crate) latencies: Vec<Duration>,
    /// From the start of the phase to the last page placed (so far, if pages are missing).
    pub(crate) length: Duration,
}

/// The postcopy phase of one destination.
pub(crate) struct Missing<'w> {
    /// Taken out only when the phase ends with every page here (see `Drop`).
    placement: Option<Box<dyn Placement + 'w>>,
    blocks: Vec<BlockMissing>,
    /// Pages missing when the guest resumed.
    missing: u64,
    /// Which they were, per block.
    missing_bitmaps: Vec<Bitmap>,
    /// When the phase began, and when its last page was placed.
    started: Instant,
    ended: Mutex<Option<Instant>>,
    /// Pages still missing.
    left: AtomicU64,
    requested: AtomicU64,
    duplicates: AtomicU64,
    zero_faults: AtomicU64,
    latencies: Mutex<Latencies>,
    /// The return path: requests, then the one "all placed" message.
    reply: &'w ReplyPath,
    /// A lost return path is waited out (the source may come back, [`Self::announce`]).
    recoverable: bool,
    done_sent: AtomicBool,
    /// A placement or the return path failed: the postcopy phase cannot end well.
    failed: AtomicBool,
}

impl<'w> Missing<'w> {
    /// The postcopy phase over `placement`: `pending[b]` are block `b`'s missing pages (made
    /// missing by the caller), requests and the end go to `reply`.
    pub(crate) fn new(
        placement: Box<dyn Placement + 'w>,
        pending: &[Bitmap],
        reply: &'w ReplyPath,
        recoverable: bool,
    ) -> Self {
        let mut left = 0;
        let blocks = pending
            .iter()
            .map(|p| {
                left += p.count_ones() as u64;
                let shared = AtomicBitmap::new(p.len());
                for page in p.iter_ones() {
                    shared.set(page);
                }
                BlockMissing {
                    pending: shared,
                    requested: AtomicBitmap::new(p.len()),
                    digests: Mutex::new(BTreeMap::new()),
                }
            })
            .collect();
        Missing {
            placement: Some(placement),
            blocks,
            missing: left,
            missing_bitmaps: pending.to_vec(),
            started: Instant::now(),
            ended: Mutex::new(None),
            left: AtomicU64::new(left),
            requested: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            latencies: Mutex::default(),
            reply,
            recoverable,
            done_sent: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        }
    }

    fn placement(&self) -> &dyn Placement {
        self.placement.as_deref().expect("taken only by drop")
    }

    /// The pages that were missing when the phase began, per block.
    pub(crate) fn missing_bitmaps(&self) -> &[Bitmap] {
        &self.missing_bitmaps
    }

    /// Pages still missing.
    pub(crate) fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    /// Whether `page` of `block` is still to come.
    pub(crate) fn is_pending(&self, block: usize, page: u64) -> bool {
        self.blocks[block].pending.test(page as usize)
    }

    /// Whether the phase failed (a placement or the return path).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The fault thread: answer every fault until `stop` is set (every stream ended) or the phase
    /// failed. It goes on after the last page arrived: a never-populated page touched then is
    /// still missing, and waits for its zero page until the userfaultfd closes.
    pub(crate) fn serve_faults(&self, stop: &AtomicBool) -> Result<()> {
        while !self.failed() && !stop.load(Ordering::Acquire) {
            let fault = self
                .placement()
                .next_fault(FAULT_POLL)
                .map_err(self.fail("reading page faults"))?;
            if let Some((block, page)) = fault {
                self.fault(block, page)?;
            }
        }
        Ok(())
    }

    /// The guest (or the VMM) touched `page` of `block`, which is missing: ask the source for it
    /// (once), or place a zero page if the source never listed it (it is zero there).
    pub(crate) fn fault(&self, block: usize, page: u64) -> Result<()> {
        let b = &self.blocks[block];
        if !b.pending.test(page as usize) {
            if self
                .placement()
                .place_zero(block, page)
                .map_err(self.fail("placing a zero page"))?
                == Placed::Now
            {
                self.zero_faults.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        if b.requested.test(page as usize) {
            return Ok(());
        }
        b.requested.set(page as usize);
        self.requested.fetch_add(1, Ordering::Relaxed);
        let asked = Instant::now();
        lock(&self.latencies).asked.insert((block, page), asked);
        self.send(
            PostcopyMessage::want(block as u32, page),
            "asking for a page",
        )
    }

    /// A page arrived: place it unless it is there already, and keep its digest.
    pub(crate) fn place(
        &self,
        block: usize,
        page: u64,
        data: &[u8; PAGE_SIZE as usize],
    ) -> Result<()> {
        let placed = self
            .placement()
            .place(block, page, data)
            .map_err(self.fail("placing a page"))?;
        self.placed(block, page, placed, Some(xxh3_64(data)))
    }

    /// A zero page arrived: place it unless the page is there already.
    pub(crate) fn place_zero(&self, block: usize, page: u64) -> Result<()> {
        let placed = self
            .placement()
            .place_zero(block, page)
            .map_err(self.fail("placing a zero page"))?;
        self.placed(block, page, placed, None)
    }

    /// Account for a placement; the last missing page sends the "all placed" message.
    fn placed(&self, block: usize, page: u64, placed: Placed, digest: Option<u64>) -> Result<()> {
        let b = &self.blocks[block];
        // Only the placement that put the page in owns it: a page that was never missing (not
        // pending) is refused by the kernel too, so `Now` always comes with a pending bit.
        if placed == Placed::Already || !b.pending.test_and_clear(page as usize) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Some(d) = digest {
            lock(&b.digests).insert(page, d);
        }
        {
            let mut lat = lock(&self.latencies);
            if let Some(t) = lat.asked.remove(&(block, page)) {
                lat.samples.push(t.elapsed());
            }
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.ended) = Some(Instant::now());
            self.send_done()?;
        }
        Ok(())
    }

    /// Tell the source every page is here (once; also when nothing was missing).
    pub(crate) fn send_done(&self) -> Result<()> {
        if self.left() > 0 || self.done_sent.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.send(PostcopyMessage::done(), "saying every page arrived")
    }

    fn send(&self, m: PostcopyMessage, context: &'static str) -> Result<()> {
        let mut w = lock(self.reply);
        let sent = match w.as_mut() {
            Some(w) => m.write_to(&mut **w).and_then(|()| w.flush()),
            None => Err(io::Error::other("the return path is gone")),
        };
        match sent {
            Ok(()) => Ok(()),
            // Kept: the request stays open (its page's bit too) and goes again on the session
            // that resumes the postcopy; "done" too.
            Err(e) if self.recoverable => {
                tracing::warn!(error = %e, "postcopy: the return path is gone; waiting for the source");
                *w = None;
                Ok(())
            }
            Err(e) => Err(self.fail(context)(e)),
        }
    }

    /// On the session that resumes a cut postcopy (its return path `writer`, which becomes this
    /// phase's): the pages still missing (missing-page records, then the switch record with
    /// their count), then a request for each page a thread still waits on, then "done" if
    /// nothing is missing. The return path stays locked until that is out: no request of the
    /// fault thread may come before it.
    pub(crate) fn announce(&self, mut writer: Box<dyn Write + Send>) -> io::Result<()> {
        let mut w = lock(self.reply);
        let mut rec = Vec::new();
        let mut total = 0u64;
        let mut waited_on = Vec::new();
        for (bi, b) in self.blocks.iter().enumerate() {
            let pending = b.pending.snapshot();
            total += pending.count_ones() as u64;
            for (i, part) in pending
                .as_words()
                .chunks(MAX_MISSING_WORDS as usize)
                .enumerate()
            {
                if part.iter().any(|&w| w != 0) {
                    let first = (i * MAX_MISSING_WORDS as usize * 64) as u64;
                    stream::encode_missing(bi as u32, first, part, &mut rec);
                }
            }
            let mut asked = b.requested.snapshot();
            asked.and_assign(&pending);
            waited_on.extend(
                asked
                    .iter_ones()
                    .map(|p| PostcopyMessage::want(bi as u32, p as u64)),
            );
        }
        stream::encode_postcopy(total, &mut rec);
        for m in &waited_on {
            rec.extend_from_slice(zerocopy::IntoBytes::as_bytes(m));
        }
        if total == 0 {
            rec.extend_from_slice(zerocopy::IntoBytes::as_bytes(&PostcopyMessage::done()));
        }
        writer.write_all(&rec)?;
        writer.flush()?;
        *w = Some(writer);
        Ok(())
    }

    /// Mark the phase failed, and say what failed.
    fn fail(&self, context: &'static str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |e| {
            self.failed.store(true, Ordering::Release);
            Error::Postcopy { context, source: e }
        }
    }

    /// The digests of the pages placed here, per block (each page once), and the stats.
    pub(crate) fn finish(&mut self) -> (Vec<BTreeMap<u64, u64>>, MissingStats) {
        let mut latencies = std::mem::take(&mut lock(&self.latencies).samples);
        latencies.sort_unstable();
        let stats = MissingStats {
            missing_pages: self.missing,
            requested_pages: self.requested.load(Ordering::Relaxed),
            duplicate_pages: self.duplicates.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            latencies,
            length: lock(&self.ended)
                .unwrap_or_else(Instant::now)
                .duration_since(self.started),
        };
        let digests = self
            .blocks
            .iter()
            .map(|b| std::mem::take(&mut *lock(&b.digests)))
            .collect();
        (digests, stats)
    }
}

/// A phase that ends with pages still missing keeps its userfaultfd open for the life of the
/// process: closed, it would let the running guest read zeros where the source has data. The
/// guest's threads wait on those pages instead, and the error says the guest cannot go on.
impl Drop for Missing<'_> {
    fn drop(&mut self) {
        let left = self.left();
        if left > 0 {
            if let Some(p) = self.placement.take() {
                tracing::error!(
                    pages = left,
                    "postcopy ended with pages missing: the guest's memory stays registered and \
                     its threads wait on them; stop this guest (the source still holds it, paused)"
                );
                std::mem::forget(p);
            }
        }
    }
}

/// A lock that a panicking holder did not poison for the others (the data stays consistent: each
/// holder does one insert or remove).
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain memory that knows which pages are there: a page is placed once, as the kernel does.
    #[derive(Default)]
    struct PlainPlacement {
        pages: Mutex<BTreeMap<(usize, u64), [u8; PAGE_SIZE as usize]>>,
        faults: Mutex<Vec<(usize, u64)>>,
    }

    impl Placement for &PlainPlacement {
        fn place(
            &self,
            block: usize,
            page: u64,
            data: &[u8; PAGE_SIZE as usize],
        ) -> io::Result<Placed> {
            let mut pages = lock(&self.pages);
            if pages.contains_key(&(block, page)) {
                return Ok(Placed::Already);
            }
            pages.insert((block, page), *data);
            Ok(Placed::Now)
        }
        fn place_zero(&self, block: usize, page: u64) -> io::Result<Placed> {
            self.place(block, page, &[0; PAGE_SIZE as usize])
        }
        fn next_fault(&self, _: Duration) -> io::Result<Option<(usize, u64)>> {
            Ok(lock(&self.faults).pop())
        }
    }

    fn missing(pages: &[u64]) -> Bitmap {
        let mut b = Bitmap::new(128);
        for &p in pages {
            b.set(p as usize);
        }
        b
    }

    /// A return path whose bytes the test reads while the phase still holds it.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The return path's bytes, parsed.
    fn sent(bytes: &[u8]) -> Vec<Option<(u32, u64)>> {
        bytes
            .chunks(PostcopyMessage::LEN)
            .map(|c| {
                PostcopyMessage::parse(c)
                    .unwrap()
                    .wanted()
                    .map(|w| (w.block, w.page))
            })
            .collect()
    }

    #[test]
    fn a_page_asked_for_is_asked_once_and_a_page_arriving_twice_is_placed_once() {
        let plain = PlainPlacement::default();
        let out = Sink::default();
        let reply: ReplyPath = Mutex::new(Some(Box::new(out.clone())));
        let m = Missing::new(
            Box::new(&plain),
            &[missing(&[3, 5]), missing(&[])],
            &reply,
            false,
        );
        m.fault(0, 3).unwrap();
        m.fault(0, 3).unwrap(); // a second vCPU on the same page
                                // A page the source never listed is zero there: placed here without asking.
        m.fault(1, 9).unwrap();
        assert_eq!(lock(&plain.pages).get(&(1, 9)), Some(&[0; 4096]));
        m.place(0, 3, &[3; 4096]).unwrap(); // the answer
        m.place(0, 3, &[33; 4096]).unwrap(); // the push's copy, late: placed already
        assert_eq!(lock(&plain.pages)[&(0, 3)][0], 3, "the first copy stays");
        assert_eq!(m.left(), 1);
        m.place(0, 5, &[5; 4096]).unwrap(); // the last one: "done" goes out
        assert_eq!(m.left(), 0);
        // A page arriving after the end changes nothing and sends nothing.
        m.place(0, 5, &[55; 4096]).unwrap();
        let mut m = m;
        let (digests, stats) = m.finish();
        assert_eq!(
            sent(&lock(&out.0)),
            vec![Some((0, 3)), None],
            "one request, then done"
        );
        assert_eq!(digests[0].len(), 2);
        assert_eq!(digests[0][&3], xxh3_64(&[3; 4096]));
        assert_eq!(
            (
                stats.missing_pages,
                stats.requested_pages,
                stats.duplicate_pages,
                stats.zero_faults
            ),
            (2, 1, 2, 1)
        );
        assert_eq!(stats.latencies.len(), 1, "one fault waited for its page");
    }

    #[test]
    fn nothing_missing_says_done_at_once_and_faults_are_served_until_stopped() {
        let plain = PlainPlacement::default();
        lock(&plain.faults).push((0, 7));
        let out = Sink::default();
        let reply: ReplyPath = Mutex::new(Some(Box::new(out.clone())));
        let m = Missing::new(Box::new(&plain), &[missing(&[])], &reply, false);
        m.send_done().unwrap();
        m.send_done().unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| m.serve_faults(&stop).unwrap());
            while lock(&plain.pages).is_empty() {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Release);
        });
        assert_eq!(sent(&lock(&out.0)), vec![None], "done, once");
        assert!(
            lock(&plain.pages).contains_key(&(0, 7)),
            "a zero fault served"
        );
    }

    #[test]
    fn a_phase_dropped_with_pages_missing_keeps_its_placement() {
        struct Dropped<'a>(&'a AtomicBool);
        impl Drop for Dropped<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        /// Holds its `Dropped` only to be dropped with it.
        struct Guarded<'a>(#[allow(dead_code)] Dropped<'a>);
        impl Placement for Guarded<'_> {
            fn place(&self, _: usize, _: u64, _: &[u8; 4096]) -> io::Result<Placed> {
                Ok(Placed::Now)
            }
            fn place_zero(&self, _: usize, _: u64) -> io::Result<Placed> {
                Ok(Placed::Now)
            }
            fn next_fault(&self, _: Duration) -> io::Result<Option<(usize, u64)>> {
                Ok(None)
            }
        }
        let (gone_missing, gone_complete) = (AtomicBool::new(false), AtomicBool::new(false));
        let reply: ReplyPath = Mutex::new(Some(Box::new(Sink::default())));
        let m = Missing::new(
            Box::new(Guarded(Dropped(&gone_missing))),
            &[missing(&[1])],
            &reply,
            false,
        );
        drop(m);
        assert!(
            !gone_missing.load(Ordering::SeqCst),
            "pages missing: the userfaultfd stays"
        );
        let m = Missing::new(
            Box::new(Guarded(Dropped(&gone_complete))),
            &[missing(&[1])],
            &reply,
            false,
        );
        m.place(0, 1, &[1; 4096]).unwrap();
        drop(m);
        assert!(
            gone_complete.load(Ordering::SeqCst),
            "every page here: closed"
        );
    }
}
