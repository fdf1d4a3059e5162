// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Lazy restore: the guest resumes at once with all its memory missing; a thread places each
//! page it touches from the chain on demand (userfaultfd) and the rest in the background.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;

use super::chain::{SnapshotChain, Source};
use super::format::zero_page_digest;
use super::restore::{check_layout, resume, source_runs, Mismatches, RestoreStats};
use super::writer::PAGES_PER_READ;
use super::{SnapshotError, SnapshotResult};
use crate::memory::is_zero_page;
use crate::postcopy::missing::Placement;
use crate::postcopy::UffdPlacement;
use crate::{MigrationBlock, MigrationMemory, VmRestore, PAGE_SIZE};

/// A guest restored lazily and running: its pages arrive from the chain while it runs.
///
/// Every page is checked against the newest snapshot's digest before it is placed; a page that
/// differs is never placed, and it and every page not yet placed stay missing (whoever touches
/// them waits) rather than read as zero: [`wait`](Self::wait) returns the error, and the
/// VMM stops the guest.
#[derive(Debug)]
pub struct LazyRestore {
    thread: JoinHandle<SnapshotResult<RestoreStats>>,
    running_ms: f64,
}

impl LazyRestore {
    /// Make all of `mem` missing under a userfaultfd, restore the state, resume the guest, and
    /// start placing pages. Returns once the guest runs. Pages no file of the chain holds must
    /// be zero at the snapshot's pause (checked from the digests, before anything resumes).
    pub fn start<M: MigrationMemory, V: VmRestore>(
        chain: SnapshotChain,
        mem: &M,
        vm: &V,
    ) -> SnapshotResult<LazyRestore> {
        let start = Instant::now();
        let blocks = mem.blocks();
        check_layout(&chain, &blocks)?;
        let sources: Arc<[Vec<Source>]> = (0..blocks.len()).map(|bi| chain.sources(bi)).collect();
        let unheld = check_unheld_pages_are_zero(&chain, &blocks, &sources)?;
        let mut placement = UffdPlacement::prepare(&blocks)
            .map_err(|e| SnapshotError::LazyUnavailable(crate::error::chain(&e)))?;
        let all: Vec<Bitmap> = blocks
            .iter()
            .map(|b| Bitmap::new_filled(b.pages() as usize))
            .collect();
        placement
            .discard(&blocks, &all)
            .map_err(|e| SnapshotError::LazyUnavailable(crate::error::chain(&e)))?;
        resume(&chain, vm)?;
        let running_ms = start.elapsed().as_secs_f64() * 1e3;
        let files = chain.len();
        let server = Server {
            chain,
            sources,
            placement,
            stats: RestoreStats {
                files,
                running_ms,
                verified_pages: unheld,
                zero_pages: unheld,
                ..RestoreStats::default()
            },
            start,
            buf: vec![0; (PAGES_PER_READ * PAGE_SIZE) as usize],
        };
        let thread = std::thread::Builder::new()
            .name("lazy-restore".into())
            .spawn(move || server.run())?;
        Ok(LazyRestore { thread, running_ms })
    }

    /// Milliseconds from [`start`](Self::start) to the guest running.
    pub fn running_ms(&self) -> f64 {
        self.running_ms
    }

    /// Wait until every page is in place and checked.
    pub fn wait(self) -> SnapshotResult<RestoreStats> {
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

/// A page no file holds was never written since the full snapshot's read: its digest at the
/// pause must be a zero page's. One that is not was lost by the snapshots. The pages checked.
fn check_unheld_pages_are_zero<B: MigrationBlock>(
    chain: &SnapshotChain,
    blocks: &[B],
    sources: &[Vec<Source>],
) -> SnapshotResult<u64> {
    let zero = zero_page_digest();
    let mut wrong = Mismatches::default();
    let mut unheld = 0;
    for (bi, s) in sources.iter().enumerate() {
        for (page, (src, d)) in s.iter().zip(chain.digests(bi)).enumerate() {
            unheld += u64::from(*src == Source::Zero);
            if *src == Source::Zero && *d != zero {
                wrong.note(bi, page as u64);
            }
        }
    }
    wrong.check(blocks).map(|()| unheld)
}

struct Server {
    chain: SnapshotChain,
    /// Per block, where each page comes from (shared with the prefetch's walk over it).
    sources: Arc<[Vec<Source>]>,
    placement: UffdPlacement,
    stats: RestoreStats,
    start: Instant,
    buf: Vec<u8>,
}

impl Server {
    fn run(mut self) -> SnapshotResult<RestoreStats> {
        match self.place_all() {
            Ok(()) => {
                self.stats.complete_ms = self.start.elapsed().as_secs_f64() * 1e3;
                // Closing the userfaultfd now lets the pages still missing, which are all zero,
                // fill with zeros on their first touch.
                Ok(self.stats)
            }
            Err(e) => {
                // Keep the pages not placed missing for good: a guest thread that touches one
                // waits, it never reads zeros or a wrong page.
                std::mem::forget(self.placement);
                Err(SnapshotError::Lazy {
                    context: "placing the pages of the restored guest",
                    source: Box::new(e),
                })
            }
        }
    }

    /// Prefetch every page a file holds, in order, serving faults before each run.
    fn place_all(&mut self) -> SnapshotResult<()> {
        let sources = Arc::clone(&self.sources);
        for (bi, block) in sources.iter().enumerate() {
            for (source, first, n) in source_runs(block, PAGES_PER_READ) {
                self.serve_faults()?;
                if let Source::File(f) = source {
                    self.place_run(f, bi, first, n, false)?;
                }
            }
        }
        Ok(())
    }

    /// Serve the faults pending, without waiting for more.
    fn serve_faults(&mut self) -> SnapshotResult<()> {
        while let Some((bi, page)) = self.placement.next_fault(Duration::ZERO)? {
            let t = Instant::now();
            let source = self.sources[bi][page as usize];
            match source {
                Source::File(f) => self.place_run(f, bi, page, 1, true)?,
                Source::Zero => {
                    self.placement.place_zero(bi, page)?;
                }
            }
            self.stats.faults += 1;
            self.stats.fault_max_ms = self.stats.fault_max_ms.max(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    }

    /// Read `n` pages of block `bi` from file `f`, check each against its digest, place it
    /// (a zero page only if a thread waits on it: `touched`).
    fn place_run(
        &mut self,
        f: u8,
        bi: usize,
        first: u64,
        n: u64,
        touched: bool,
    ) -> SnapshotResult<()> {
        let bytes = &mut self.buf[..(n * PAGE_SIZE) as usize];
        self.chain.read(f, bi, first, bytes)?;
        let digests = self.chain.digests(bi);
        for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let p = first + i as u64;
            if xxhash_rust::xxh3::xxh3_64(page) != digests[p as usize] {
                return Err(SnapshotError::VerificationFailed {
                    mismatched_pages: 1,
                    block: self.chain.blocks()[bi].name.clone(),
                    page: p,
                });
            }
            let page: &[u8; PAGE_SIZE as usize] = page.try_into().expect("one page");
            if touched {
                if is_zero_page(page) {
                    self.placement.place_zero(bi, p)?;
                } else {
                    self.placement.place(bi, p, page)?;
                }
                continue;
            }
            self.stats.verified_pages += 1;
            if is_zero_page(page) {
                // Left missing: it fills with zeros when the userfaultfd closes, or is served
                // as a zero page if touched before.
                self.stats.zero_pages += 1;
                continue;
            }
            self.placement.place(bi, p, page)?;
            self.stats.pages_placed += 1;
        }
        Ok(())
    }
}
