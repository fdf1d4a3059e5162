// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Per-page digests (xxh3-64) of RAM blocks, computed on all cores.

use clearlog_memory::PAGE_SIZE;
use xxhash_rust::xxh3::xxh3_64;

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

/// The xxh3-64 of every non-zero page of `block`, as `(page, digest)` in page order, hashed by
/// `threads` threads; pages the block reports as never populated are not read (they are zero).
/// What the source sends for [`crate::VerifyMode::AfterResume`].
pub(crate) fn final_digests<B: MigrationBlock + ?Sized>(
    block: &B,
    threads: usize,
) -> Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    block
        .populated(0, block.pages(), &mut ranges)
        .map_err(Error::memory("asking which pages are populated"))?;
    // Split the populated pages into `threads` runs of about the same size.
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let per_thread = total.div_ceil(threads.max(1) as u64).max(1);
    let mut parts: Vec<Vec<std::ops::Range<u64>>> = vec![Vec::new()];
    let mut filled = 0;
    for mut r in ranges {
        while r.start < r.end {
            let take = (per_thread - filled).min(r.end - r.start);
            if let Some(last) = parts.last_mut() {
                last.push(r.start..r.start + take);
            }
            r.start += take;
            filled += take;
            if filled == per_thread {
                parts.push(Vec::new());
                filled = 0;
            }
        }
    }
    let results: Vec<Result<Vec<(u64, u64)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|part| s.spawn(move || hash_nonzero(block, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out = Vec::new();
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

fn hash_nonzero<B: MigrationBlock + ?Sized>(
    block: &B,
    ranges: &[std::ops::Range<u64>],
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
