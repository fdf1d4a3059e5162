// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The digest of every page as at a snapshot's pause: what a restore checks itself against.
//! They come from reading memory, never from the dirty log, so a page the log missed shows.

use std::ops::Range;

use super::format::zero_page_digest;
use super::wp_arm::{ArmStats, ArmedWp};
use super::wp_digests::{ranges_in, PauseDigests};
use super::{SnapshotError, SnapshotResult};
use crate::digest::{final_digests, hash_threads};
use crate::memory::ask_populated;
use crate::{HostMapping, MigrationBlock};

/// Digests being taken.
pub(crate) enum Capture {
    /// Hashed during the pause.
    Done(Vec<Vec<u64>>),
    /// Being hashed after it, under write-protection; what the write-protection armed before the
    /// pause did, if it was.
    Background(PauseDigests, Option<ArmStats>),
}

impl Capture {
    /// Whether the hashing goes on after the pause.
    pub(crate) fn is_background(&self) -> bool {
        !matches!(self, Capture::Done(_))
    }

    /// What the write-protection armed before the pause did, if it was.
    pub(crate) fn arm_stats(&self) -> Option<ArmStats> {
        match self {
            Capture::Background(_, armed) => *armed,
            Capture::Done(_) => None,
        }
    }

    /// The digests, per block, one per page; and how many writes of the guest waited for the
    /// hashing after the pause.
    pub(crate) fn finish(self) -> SnapshotResult<(Vec<Vec<u64>>, u64)> {
        match self {
            Capture::Done(d) => Ok((d, 0)),
            Capture::Background(p, _) => {
                let (d, waits) = p.finish_with_stats().map_err(SnapshotError::Io)?;
                Ok((d, waits.faults))
            }
        }
    }
}

/// What was prepared for the digests while the guest still ran.
pub(crate) enum Armed {
    /// Nothing: the pause arms write-protection (`true`) or hashes everything (`false`).
    AtPause(bool),
    /// Write-protection armed: the pause re-protects what was written or populated since.
    Wp(ArmedWp),
}

/// Prepare the digests of `blocks` while their writers run, right before the last live pass:
/// `background` asks for them to be taken after the pause, and then write-protection is armed
/// now where the memory allows it (`Armed::AtPause(true)` where it does not, or on any error).
pub(crate) fn arm<B: MigrationBlock>(blocks: &[B], background: bool) -> SnapshotResult<Armed> {
    if !background {
        return Ok(Armed::AtPause(false));
    }
    let regions = match protectable(blocks) {
        Ok(Some(regions)) => regions,
        Ok(None) => return Ok(Armed::AtPause(true)),
        Err(e) => {
            tracing::info!(error = %e, "snapshot: write-protection armed in the pause");
            return Ok(Armed::AtPause(true));
        }
    };
    // SAFETY: as in `capture`; the blocks are held from here until the capture finishes, or
    // until the `Armed` is dropped if the snapshot fails before its pause.
    match unsafe { ArmedWp::arm(regions) } {
        Ok(a) => Ok(Armed::Wp(a)),
        Err(e) => {
            tracing::info!(error = %e, "snapshot: write-protection armed in the pause");
            Ok(Armed::AtPause(true))
        }
    }
}

/// Start taking the digests of `blocks`, whose writers are paused: under write-protection if
/// asked for and the memory allows it, else hashed now.
pub(crate) fn capture<B: MigrationBlock>(blocks: &[B], armed: Armed) -> SnapshotResult<Capture> {
    let background = match armed {
        Armed::AtPause(background) => background,
        Armed::Wp(armed) => return capture_armed(blocks, armed),
    };
    if background {
        if let Some(regions) = protectable(blocks)? {
            // SAFETY: every mapping is its block's own (`MigrationBlock::host_mapping`'s
            // contract), and the caller holds the blocks until the capture finishes, within one
            // snapshot. A write to the memory by any other path than the mappings (another
            // process, a discard) is not held back: it makes a digest wrong, which the restore
            // reports as a mismatch; it is no worse a race than any read of running guest memory.
            match unsafe { PauseDigests::start(regions) } {
                Ok(p) => return Ok(Capture::Background(p, None)),
                Err(e) => tracing::info!(error = %e, "snapshot: hashing during the pause"),
            }
        }
    }
    Ok(Capture::Done(hash_now(blocks)?))
}

/// [`capture`] with write-protection armed: the pages populated since arm outside the ranges
/// protected then are found, and [`ArmedWp::capture`] re-protects them with those written since.
/// If that fails, everything is un-protected and hashed now; if the scan fails, the snapshot
/// fails (and dropping `armed` un-protects everything).
fn capture_armed<B: MigrationBlock>(blocks: &[B], armed: ArmedWp) -> SnapshotResult<Capture> {
    let t = std::time::Instant::now();
    let new = blocks
        .iter()
        .zip(armed.protected())
        .map(|(b, protected)| populated_outside(b, protected))
        .collect::<SnapshotResult<Vec<_>>>()?;
    let scan = t.elapsed();
    match armed.capture(new) {
        Ok((p, stats)) => {
            tracing::debug!(
                ?scan,
                ?stats,
                "snapshot: write-protection re-armed in the pause"
            );
            Ok(Capture::Background(p, Some(stats)))
        }
        Err(e) => {
            tracing::info!(error = %e, "snapshot: hashing during the pause");
            Ok(Capture::Done(hash_now(blocks)?))
        }
    }
}

/// Two stretches of pages outside the protected ranges are scanned in one call when the range
/// between them is shorter than this (fewer calls; what the scan finds inside it is dropped).
const SCAN_ACROSS: u64 = 512;

/// The pages of `block` populated now outside `protected` (sorted, disjoint). Only the pages
/// outside are scanned, a small part of memory where most is populated: those inside cannot be
/// populated unseen, every write to them faults, even where nothing was there at arm (the
/// kernel leaves a write-protect marker there, `UFFD_FEATURE_WP_UNPOPULATED`; shmem always
/// does). A read there maps the zero page, whose digest is the zero page's either way.
fn populated_outside<B: MigrationBlock>(
    block: &B,
    protected: &[Range<u64>],
) -> SnapshotResult<Vec<Range<u64>>> {
    let mut windows: Vec<Range<u64>> = Vec::new();
    for g in complement(protected, block.pages()) {
        match windows.last_mut() {
            Some(w) if g.start - w.end < SCAN_ACROSS => w.end = g.end,
            _ => windows.push(g),
        }
    }
    let (mut found, mut new) = (Vec::new(), Vec::new());
    for w in windows {
        ask_populated(block, w.start, w.end - w.start, &mut found).map_err(populated_error)?;
        for f in &found {
            let mut at = f.start;
            for p in ranges_in(protected, f.clone()) {
                if p.start > at {
                    new.push(at..p.start);
                }
                at = p.end;
            }
            if at < f.end {
                new.push(at..f.end);
            }
        }
    }
    Ok(new)
}

/// The pages of `[0, pages)` outside `ranges` (sorted, disjoint).
fn complement(ranges: &[Range<u64>], pages: u64) -> Vec<Range<u64>> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    let mut at = 0;
    for r in ranges {
        if r.start > at {
            out.push(at..r.start);
        }
        at = r.end;
    }
    if at < pages {
        out.push(at..pages);
    }
    out
}

/// A failed populated-pages answer, as the snapshot reports it.
pub(crate) fn populated_error(e: crate::BoxError) -> SnapshotError {
    SnapshotError::engine("asking which pages hold data")(crate::Error::memory(
        "asking which pages are populated",
    )(e))
}

/// Every block's mapping with the pages that may hold data, if every block has a mapping the
/// kernel can write-protect.
#[allow(clippy::type_complexity)]
fn protectable<B: MigrationBlock>(
    blocks: &[B],
) -> SnapshotResult<Option<Vec<(HostMapping, Vec<Range<u64>>)>>> {
    let mut regions = Vec::with_capacity(blocks.len());
    for b in blocks {
        let Some(m) = b
            .host_mapping()
            .filter(|m| PauseDigests::supported(m.shared()))
        else {
            return Ok(None);
        };
        let mut ranges = Vec::new();
        ask_populated(b, 0, b.pages(), &mut ranges).map_err(populated_error)?;
        regions.push((m, ranges));
    }
    Ok(Some(regions))
}

/// Every page's digest, read now on all cores. Pages the populated-pages answer leaves out are
/// read too (to check they are zero), so a wrong answer cannot hide a page from the digests.
pub(crate) fn hash_now<B: MigrationBlock>(blocks: &[B]) -> SnapshotResult<Vec<Vec<u64>>> {
    blocks
        .iter()
        .map(|b| {
            let found = final_digests(b, hash_threads())
                .map_err(SnapshotError::engine("hashing guest memory"))?;
            let mut d = vec![zero_page_digest(); b.pages() as usize];
            for (page, digest) in found.entries {
                d[page as usize] = digest;
            }
            Ok(d)
        })
        .collect()
}

// The end-to-end test runs over a `clearlog-memory` RAM block.
#[cfg(all(test, feature = "clearlog-memory"))]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use clearlog_memory::MemorySystem;
    use xxhash_rust::xxh3::xxh3_64;

    use super::*;
    use crate::PAGE_SIZE;

    const PAGES: u64 = 16384;

    fn page(p: u64, seed: u8) -> Vec<u8> {
        let mut v = vec![seed; PAGE_SIZE as usize];
        v[..8].copy_from_slice(&p.to_le_bytes());
        v
    }

    /// A RAM block (anonymous, huge pages advised) through `arm` and `capture`, as a snapshot
    /// takes it: a writer changes pages between them, among them pages far from anything
    /// populated at arm, then pauses; after the capture it overwrites everything. The digests
    /// are the contents at the capture: the pages populated since arm were found and protected.
    #[test]
    fn armed_digests_are_those_at_the_capture_with_pages_populated_since_arm() {
        if !PauseDigests::supported(false) {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"));
            eprintln!("SKIPPED: userfaultfd write-protect is not available here");
            return;
        }
        let mem = MemorySystem::with_ram_capacity(1 << 30);
        mem.add_ram("ram", 0, PAGES * PAGE_SIZE).unwrap();
        let blocks = mem.ram_blocks();
        let b = &blocks[0];
        (0..4096).for_each(|p| b.write(p * PAGE_SIZE, &page(p, 1)).unwrap());
        let armed = arm(&blocks, true).unwrap();
        assert!(matches!(armed, Armed::Wp(_)), "not armed while running");
        // Far from the populated first 16 MiB: whole 2 MiB never touched before arm.
        let since: Vec<u64> = (8192..8300).chain([12000, PAGES - 1]).collect();
        let before: Vec<u64> = (0..4096).step_by(7).chain(since.iter().copied()).collect();
        let (digests, expected, stats) = std::thread::scope(|s| {
            let (paused, writer_paused) = mpsc::channel();
            let (go, wait) = mpsc::channel::<()>();
            let (done, writer_done) = mpsc::channel();
            s.spawn(move || {
                before
                    .iter()
                    .for_each(|&p| b.write(p * PAGE_SIZE, &page(p, 2)).unwrap());
                let _ = paused.send(());
                if wait.recv().is_ok() {
                    for p in (0..PAGES).rev() {
                        b.write(p * PAGE_SIZE, &page(p, 3)).unwrap();
                    }
                }
                let _ = done.send(());
            });
            writer_paused.recv_timeout(Duration::from_secs(60)).unwrap();
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            let expected: Vec<u64> = (0..PAGES)
                .map(|p| {
                    b.read(p * PAGE_SIZE, &mut buf).unwrap();
                    xxh3_64(&buf)
                })
                .collect();
            let c = capture(&blocks, armed).unwrap();
            let stats = c.arm_stats().expect("captured under the armed protection");
            go.send(()).unwrap();
            writer_done
                .recv_timeout(Duration::from_secs(60))
                .expect("no write waits for ever");
            (c.finish().unwrap().0, expected, stats)
        });
        let wrong: Vec<u64> = (0..PAGES)
            .filter(|&p| digests[0][p as usize] != expected[p as usize])
            .collect();
        assert!(wrong.is_empty(), "digests not as at the capture: {wrong:?}");
        assert!(stats.new_pages >= since.len() as u64, "{stats:?}");
        assert!(stats.faults > 0, "{stats:?}");
    }

    #[test]
    fn complement_is_what_the_ranges_leave() {
        assert_eq!(complement(&[2..4, 6..10], 12), vec![0..2, 4..6, 10..12]);
        assert_eq!(complement(std::slice::from_ref(&(0..12)), 12), vec![]);
        assert_eq!(complement(&[], 3), vec![0..3]);
    }
}
