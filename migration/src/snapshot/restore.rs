// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Eager restore: every page of the chain into guest memory, verified, then the guest resumes.

use std::time::Instant;

use super::chain::{SnapshotChain, Source};
use super::digests::hash_now;
use super::writer::PAGES_PER_READ;
use super::{SnapshotError, SnapshotResult};
use crate::memory::is_zero_page;
use crate::{Error, MigrationBlock, MigrationMemory, VmRestore, PAGE_SIZE};

/// What a restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreStats {
    /// Files in the chain.
    pub files: usize,
    /// Pages read from the files and placed (zero pages are not placed: new memory is zero).
    pub pages_placed: u64,
    /// Pages the files hold as zero, or that no file holds.
    pub zero_pages: u64,
    /// From the call to the guest running, in milliseconds.
    pub running_ms: f64,
    /// Of an eager restore: reading the chain into memory.
    pub load_ms: f64,
    /// Of an eager restore: reading memory back and comparing it with the digests.
    pub verify_ms: f64,
    /// Lazy restore: pages the guest touched before they arrived, served on demand.
    pub faults: u64,
    /// Lazy restore: the longest a fault waited, from its read to its page placed, in ms.
    pub fault_max_ms: f64,
    /// Lazy restore: from the call until every page was in place and checked, in ms.
    pub complete_ms: f64,
    /// Pages checked against the digests of the snapshot's pause (all of them when the restore
    /// returns without error).
    pub verified_pages: u64,
}

/// Restore the chain into `mem` and resume the guest through `vm`; eager: every page is placed
/// and the memory read back and compared with the newest snapshot's digests before the state
/// is restored and the guest resumes. `mem` must read as zero (a new guest's memory): zero
/// pages are not written.
///
/// A page that differs from the memory at the snapshot's pause (a lost dirty bit when it was
/// taken, a damaged file) fails the restore with [`SnapshotError::VerificationFailed`]; the
/// guest is not resumed.
pub fn restore<M: MigrationMemory, V: VmRestore>(
    chain: &SnapshotChain,
    mem: &M,
    vm: &V,
) -> SnapshotResult<RestoreStats> {
    let start = Instant::now();
    let blocks = mem.blocks();
    check_layout(chain, &blocks)?;
    let mut stats = RestoreStats {
        files: chain.len(),
        ..RestoreStats::default()
    };
    for (bi, b) in blocks.iter().enumerate() {
        load_block(chain, bi, b, &mut stats)?;
    }
    stats.load_ms = start.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    stats.verified_pages = verify(chain, &blocks)?;
    stats.verify_ms = t.elapsed().as_secs_f64() * 1e3;
    resume(chain, vm)?;
    stats.running_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(stats)
}

/// The chain's RAM layout must be the memory's.
pub(crate) fn check_layout<B: MigrationBlock>(
    chain: &SnapshotChain,
    blocks: &[B],
) -> SnapshotResult<()> {
    let ours: Vec<(String, u64)> = blocks
        .iter()
        .map(|b| (b.name().to_owned(), b.size()))
        .collect();
    chain
        .layout_mismatch(&ours)
        .map_or(Ok(()), |m| Err(SnapshotError::Layout(m)))
}

/// Restore the state and resume the guest.
pub(crate) fn resume<V: VmRestore>(chain: &SnapshotChain, vm: &V) -> SnapshotResult<()> {
    let hook = |hook| {
        move |source| SnapshotError::Engine {
            context: "resuming the restored guest",
            source: Error::Vm { hook, source },
        }
    };
    vm.restore_state(chain.state())
        .map_err(hook("restore_state"))?;
    vm.resume().map_err(hook("resume"))
}

/// Runs of consecutive pages with the same source, at most `max` long.
pub(crate) fn source_runs(
    sources: &[Source],
    max: u64,
) -> impl Iterator<Item = (Source, u64, u64)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let s = *sources.get(at)?;
        let first = at;
        while at < sources.len() && sources[at] == s && ((at - first) as u64) < max {
            at += 1;
        }
        Some((s, first as u64, (at - first) as u64))
    })
}

fn load_block<B: MigrationBlock>(
    chain: &SnapshotChain,
    bi: usize,
    block: &B,
    stats: &mut RestoreStats,
) -> SnapshotResult<()> {
    let sources = chain.sources(bi);
    let mut buf = vec![0u8; (PAGES_PER_READ * PAGE_SIZE) as usize];
    for (source, first, n) in source_runs(&sources, PAGES_PER_READ) {
        let Source::File(f) = source else {
            stats.zero_pages += n;
            continue;
        };
        let bytes = &mut buf[..(n * PAGE_SIZE) as usize];
        chain.read(f, bi, first, bytes)?;
        for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
            if is_zero_page(page) {
                stats.zero_pages += 1;
                continue;
            }
            block
                .write_untracked((first + i as u64) * PAGE_SIZE, page)
                .map_err(Error::memory("writing a restored page"))
                .map_err(SnapshotError::engine("restoring guest memory"))?;
            stats.pages_placed += 1;
        }
    }
    Ok(())
}

/// Read the memory back and compare every page with the newest snapshot's digests; the pages
/// checked.
fn verify<B: MigrationBlock>(chain: &SnapshotChain, blocks: &[B]) -> SnapshotResult<u64> {
    let found = hash_now(blocks)?;
    let mut wrong = Mismatches::default();
    let mut checked = 0u64;
    for (bi, digests) in found.iter().enumerate() {
        for (page, (have, want)) in digests.iter().zip(chain.digests(bi)).enumerate() {
            checked += 1;
            if have != want {
                wrong.note(bi, page as u64);
            }
        }
    }
    wrong.check(blocks).map(|()| checked)
}

/// Pages found to differ from the digests of the pause: how many, and the first.
#[derive(Debug, Default)]
pub(crate) struct Mismatches {
    count: u64,
    first: Option<(usize, u64)>,
}

impl Mismatches {
    /// Page `page` of block `bi` differs.
    pub(crate) fn note(&mut self, bi: usize, page: u64) {
        self.count += 1;
        self.first.get_or_insert((bi, page));
    }

    /// [`SnapshotError::VerificationFailed`] if any page differs.
    pub(crate) fn check<B: MigrationBlock>(self, blocks: &[B]) -> SnapshotResult<()> {
        match self.first {
            None => Ok(()),
            Some((bi, page)) => Err(SnapshotError::VerificationFailed {
                mismatched_pages: self.count,
                block: blocks[bi].name().to_owned(),
                page,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_runs_split_by_source_and_length() {
        let s = [
            Source::Zero,
            Source::File(0),
            Source::File(0),
            Source::File(0),
            Source::File(1),
            Source::Zero,
        ];
        let runs: Vec<_> = source_runs(&s, 2).collect();
        assert_eq!(
            runs,
            [
                (Source::Zero, 0, 1),
                (Source::File(0), 1, 2),
                (Source::File(0), 3, 1),
                (Source::File(1), 4, 1),
                (Source::Zero, 5, 1)
            ]
        );
    }
}
