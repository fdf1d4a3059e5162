// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The digest of every page as at a snapshot's pause: what a restore checks itself against.
//! They come from reading memory, never from the dirty log, so a page the log missed shows.

use super::format::zero_page_digest;
use super::wp_digests::PauseDigests;
use super::{SnapshotError, SnapshotResult};
use crate::digest::{final_digests, hash_threads};
use crate::memory::ask_populated;
use crate::MigrationBlock;

/// Digests being taken.
pub(crate) enum Capture {
    /// Hashed during the pause.
    Done(Vec<Vec<u64>>),
    /// Being hashed after it, under write-protection.
    Background(PauseDigests),
}

impl Capture {
    /// Whether the hashing goes on after the pause.
    pub(crate) fn is_background(&self) -> bool {
        !matches!(self, Capture::Done(_))
    }

    /// The digests, per block, one per page; and how many writes of the guest waited for the
    /// hashing after the pause.
    pub(crate) fn finish(self) -> SnapshotResult<(Vec<Vec<u64>>, u64)> {
        match self {
            Capture::Done(d) => Ok((d, 0)),
            Capture::Background(p) => {
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
}

/// Prepare the digests of `blocks` while their writers run, right before the last live pass:
/// `background` asks for them to be taken after the pause.
pub(crate) fn arm<B: MigrationBlock>(_blocks: &[B], background: bool) -> SnapshotResult<Armed> {
    Ok(Armed::AtPause(background))
}

/// Start taking the digests of `blocks`, whose writers are paused: under write-protection if
/// asked for and the memory allows it, else hashed now.
pub(crate) fn capture<B: MigrationBlock>(blocks: &[B], armed: Armed) -> SnapshotResult<Capture> {
    let Armed::AtPause(background) = armed;
    if background {
        if let Some(regions) = protectable(blocks)? {
            // SAFETY: every mapping is its block's own (`MigrationBlock::host_mapping`'s
            // contract), and the caller holds the blocks until the capture finishes, within one
            // snapshot. A write to the memory by any other path than the mappings (another
            // process, a discard) is not held back: it makes a digest wrong, which the restore
            // reports as a mismatch; it is no worse a race than any read of running guest memory.
            match unsafe { PauseDigests::start(regions) } {
                Ok(p) => return Ok(Capture::Background(p)),
                Err(e) => tracing::info!(error = %e, "snapshot: hashing during the pause"),
            }
        }
    }
    Ok(Capture::Done(hash_now(blocks)?))
}

/// Every block's mapping with the pages that may hold data, if every block has a mapping the
/// kernel can write-protect.
#[allow(clippy::type_complexity)]
fn protectable<B: MigrationBlock>(
    blocks: &[B],
) -> SnapshotResult<Option<Vec<(crate::HostMapping, Vec<std::ops::Range<u64>>)>>> {
    let mut regions = Vec::with_capacity(blocks.len());
    for b in blocks {
        let Some(m) = b
            .host_mapping()
            .filter(|m| PauseDigests::supported(m.shared()))
        else {
            return Ok(None);
        };
        let mut ranges = Vec::new();
        ask_populated(b, 0, b.pages(), &mut ranges).map_err(|e| SnapshotError::Engine {
            context: "asking which pages hold data",
            source: crate::Error::Memory {
                op: "asking which pages are populated",
                source: e,
            },
        })?;
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
