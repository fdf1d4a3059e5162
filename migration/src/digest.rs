// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Per-page digests (xxh3-64) of RAM blocks, computed on all cores.

use std::ops::Range;

use crate::PAGE_SIZE;
use xxhash_rust::xxh3::xxh3_64;

use crate::memory::ask_populated;
use crate::{Error, MigrationBlock, MigrationMemory, Result};

/// Pages read per `MigrationBlock::read` call while hashing (256 KiB).
const PAGES_PER_READ: u64 = 64;

/// xxh3-64 of every page of `block`, hashed by `threads` threads (at least 1).
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
///
/// let mem = MemorySystem::new();
/// mem.add_ram("ram", 0, 1 << 20).unwrap();
/// let block = &mem.ram_blocks()[0];
/// let digests = clearlog_migration::page_digests(block, 2).unwrap();
/// assert_eq!(digests.len(), 256);
/// assert_eq!(digests[0], xxhash_rust::xxh3::xxh3_64(&[0u8; 4096]));
/// ```
pub fn page_digests<B: MigrationBlock + ?Sized>(block: &B, threads: usize) -> Result<Vec<u64>> {
    let pages = block.pages();
    let mut out = vec![0u64; pages as usize];
    let threads = threads.max(1);
    let per_thread = pages.div_ceil(threads as u64).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_mut(per_thread as usize)
            .enumerate()
            .map(|(i, slice)| {
                let first = i as u64 * per_thread;
                s.spawn(move || hash_pages(block, first, slice))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    Ok(out)
}

fn hash_pages<B: MigrationBlock + ?Sized>(block: &B, first: u64, out: &mut [u64]) -> Result<()> {
    let mut buf = vec![0u8; (PAGES_PER_READ * PAGE_SIZE) as usize];
    for (n, digests) in out.chunks_mut(PAGES_PER_READ as usize).enumerate() {
        let page = first + n as u64 * PAGES_PER_READ;
        let bytes = &mut buf[..digests.len() * PAGE_SIZE as usize];
        block
            .read(page * PAGE_SIZE, bytes)
            .map_err(Error::memory("reading a page to hash it"))?;
        for (d, p) in digests
            .iter_mut()
            .zip(bytes.chunks_exact(PAGE_SIZE as usize))
        {
            *d = xxh3_64(p);
        }
    }
    Ok(())
}

/// What the source's final check read of one block ([`final_digests`]).
#[derive(Debug, Default)]
pub(crate) struct FinalDigests {
    /// `(page, xxh3-64)` of every page of the block that holds a non-zero byte.
    pub(crate) entries: Vec<(u64, u64)>,
    /// Pages the populated-pages answer called never populated, read to check they are zero.
    pub(crate) zero_checked: u64,
    /// Pages among those that hold data: the answer left them out (they were sent as zero unless
    /// dirty tracking sent them again). In page order.
    pub(crate) unreported: Vec<u64>,
}

/// The xxh3-64 of every non-zero page of `block`, found by reading all of it, on `threads`
/// threads: what the source sends for [`crate::VerifyMode::AfterResume`]. The pages the block's
/// populated-pages answer reports are read and hashed; every other page is read too
/// ([`MigrationBlock::nonzero_pages`], in place where the block can) to check it is zero, so a
/// wrong answer cannot hide a page from the verification: a page holding data there is hashed
/// like the others and reported in [`FinalDigests::unreported`].
pub(crate) fn final_digests<B: MigrationBlock + ?Sized>(
    block: &B,
    threads: usize,
) -> Result<FinalDigests> {
    let pages = block.pages();
    let mut populated = Vec::new();
    ask_populated(block, 0, pages, &mut populated)
        .map_err(Error::memory("asking which pages are populated"))?;
    let mut unpopulated = Vec::new();
    let mut at = 0;
    for r in populated.iter().chain(std::iter::once(&(pages..pages))) {
        if at < r.start {
            unpopulated.push(at..r.start);
        }
        at = r.end;
    }
    let threads = threads.max(1);
    let hash_parts = split_evenly(&populated, threads);
    let check_parts = split_evenly(&unpopulated, threads);
    let results: Vec<Result<FinalDigests>> = std::thread::scope(|s| {
        let handles: Vec<_> = hash_parts
            .iter()
            .zip(&check_parts)
            .map(|(hash, check)| {
                s.spawn(move || {
                    let mut part = FinalDigests {
                        entries: hash_nonzero(block, hash)?,
                        ..FinalDigests::default()
                    };
                    check_zero(block, check, &mut part)?;
                    Ok(part)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out = FinalDigests::default();
    for r in results {
        let part = r?;
        out.entries.extend(part.entries);
        out.zero_checked += part.zero_checked;
        out.unreported.extend(part.unreported);
    }
    out.unreported.sort_unstable();
    Ok(out)
}

/// `ranges` cut into `n` lists of about the same number of pages (some may be empty).
fn split_evenly(ranges: &[Range<u64>], n: usize) -> Vec<Vec<Range<u64>>> {
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let per = total.div_ceil(n as u64).max(1);
    let mut parts: Vec<Vec<Range<u64>>> = vec![Vec::new(); n];
    let (mut part, mut filled) = (0, 0);
    for r in ranges {
        let mut r = r.clone();
        while r.start < r.end {
            let take = (per - filled).min(r.end - r.start);
            parts[part].push(r.start..r.start + take);
            r.start += take;
            filled += take;
            if filled == per && part + 1 < n {
                part += 1;
                filled = 0;
            }
        }
    }
    parts
}

/// Read `ranges` (pages called never populated) and add every page holding data to `out`, hashed.
fn check_zero<B: MigrationBlock + ?Sized>(
    block: &B,
    ranges: &[Range<u64>],
    out: &mut FinalDigests,
) -> Result<()> {
    let mut found = Vec::new();
    for r in ranges {
        found.clear();
        block
            .nonzero_pages(r.start, r.end - r.start, &mut found)
            .map_err(Error::memory("reading pages to check they are zero"))?;
        out.zero_checked += r.end - r.start;
        let mut page = [0u8; PAGE_SIZE as usize];
        for &p in &found {
            block
                .read(p * PAGE_SIZE, &mut page)
                .map_err(Error::memory("reading a page to hash it"))?;
            // The source is paused, so the page still holds what the check saw; a page listed
            // here must be non-zero (the destination treats a listed page it holds as zero as a
            // mismatch), so check again what was read.
            if !crate::stream::is_zero(&page) {
                out.entries.push((p, xxh3_64(&page)));
                out.unreported.push(p);
            }
        }
    }
    Ok(())
}

fn hash_nonzero<B: MigrationBlock + ?Sized>(
    block: &B,
    ranges: &[Range<u64>],
) -> Result<Vec<(u64, u64)>> {
    let mut buf = vec![0u8; (PAGES_PER_READ * PAGE_SIZE) as usize];
    let mut out = Vec::new();
    for r in ranges {
        let mut page = r.start;
        while page < r.end {
            let n = (r.end - page).min(PAGES_PER_READ);
            let bytes = &mut buf[..(n * PAGE_SIZE) as usize];
            block
                .read(page * PAGE_SIZE, bytes)
                .map_err(Error::memory("reading a page to hash it"))?;
            for (i, p) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                if !crate::stream::is_zero(p) {
                    out.push((page + i as u64, xxh3_64(p)));
                }
            }
            page += n;
        }
    }
    Ok(out)
}

/// Threads used for hashing at switchover: all available cores (the vCPUs are paused then).
pub(crate) fn hash_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One fingerprint of all guest RAM: xxh3-64 over the per-page digests of every block, in block
/// order. Two memories with the same layout and contents have the same fingerprint; a test or a
/// benchmark compares the source's (paused after a successful migration) with the destination's
/// (before it resumes) to prove the destination got exactly the source's memory at switchover.
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
///
/// let a = MemorySystem::new();
/// a.add_ram("ram", 0, 1 << 20).unwrap();
/// let b = MemorySystem::new();
/// b.add_ram("ram", 0, 1 << 20).unwrap();
/// assert_eq!(clearlog_migration::ram_fingerprint(&a, 2).unwrap(), clearlog_migration::ram_fingerprint(&b, 2).unwrap());
/// b.ram_blocks()[0].write(4096, &[1]).unwrap();
/// assert_ne!(clearlog_migration::ram_fingerprint(&a, 2).unwrap(), clearlog_migration::ram_fingerprint(&b, 2).unwrap());
/// ```
pub fn ram_fingerprint<M: MigrationMemory + ?Sized>(mem: &M, threads: usize) -> Result<u64> {
    let mut all = Vec::new();
    for block in mem.blocks() {
        for d in page_digests(&block, threads)? {
            all.extend_from_slice(&d.to_le_bytes());
        }
    }
    Ok(xxh3_64(&all))
}
