// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The digest of every page as at a snapshot's pause: what a restore checks itself against.
//! They come from reading memory, never from the dirty log, so a page the log missed shows.

use super::format::zero_page_digest;
use super::{SnapshotError, SnapshotResult};
use crate::digest::{final_digests, hash_threads};
use crate::MigrationBlock;

/// Digests being taken.
pub(crate) enum Capture {
    /// Hashed during the pause.
    Done(Vec<Vec<u64>>),
}

impl Capture {
    /// Whether the hashing goes on after the pause.
    pub(crate) fn is_background(&self) -> bool {
        !matches!(self, Capture::Done(_))
    }

    /// The digests, per block, one per page.
    pub(crate) fn finish(self) -> SnapshotResult<Vec<Vec<u64>>> {
        match self {
            Capture::Done(d) => Ok(d),
        }
    }
}

/// Start taking the digests of `blocks`, whose writers are paused.
pub(crate) fn capture<B: MigrationBlock>(
    blocks: &[B],
    _background: bool,
) -> SnapshotResult<Capture> {
    Ok(Capture::Done(hash_now(blocks)?))
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
