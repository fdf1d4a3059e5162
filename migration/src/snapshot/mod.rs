// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live diff snapshots and their restore, eager or lazy (docs/design.md, "Snapshots").
//!
//! A [`Snapshotter`] writes a full snapshot, then diffs holding only the pages dirtied since the
//! previous one, while the guest runs; it pauses the guest only for the last delta and the CPU
//! state. Every file records the digest of every page at its pause, taken by means that do not
//! use the dirty log, so a restore proves it rebuilt exactly the memory of that pause.
//!
//! - [`format`]: the file, each page at a fixed offset, zero memory as holes.
//! - `digests`: every page's digest as at the pause, read from memory.
//! - `wp_digests`: those digests taken after the guest resumed, under userfaultfd
//!   write-protection.
//! - `wp_arm`: that write-protection armed while the guest runs; the pause re-protects only the
//!   pages written or populated since.
//! - `writer`: one file being written.
//! - `take`: the snapshot procedure over a VMM's memory, dirty epochs and vCPUs.
//! - `chain`: a chain of files opened, checked and linked for a restore.
//! - `restore`: eager restore, verified before the guest resumes.
//! - `lazy`: the guest resumes at once; pages arrive on demand through userfaultfd.

pub(crate) mod chain;
pub(crate) mod digests;
pub mod format;
pub(crate) mod lazy;
pub(crate) mod restore;
pub(crate) mod take;
pub(crate) mod wp_arm;
pub(crate) mod wp_digests;
pub(crate) mod writer;

use std::path::PathBuf;

pub use chain::{SnapshotChain, MAX_CHAIN};
pub use format::{BlockLayout, ParentRef, SnapshotHeader, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
pub use lazy::LazyRestore;
pub use restore::{restore, RestoreStats};
pub use take::{SnapshotEpochs, SnapshotOptions, SnapshotStats, Snapshotter};

/// Errors of snapshots and their restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Reading or writing a snapshot file failed.
    #[error("snapshot file I/O")]
    Io(#[from] std::io::Error),
    /// A file of the chain failed.
    #[error("{}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: Box<SnapshotError>,
    },
    /// The file does not start with the snapshot magic (not a snapshot, or never finished: the
    /// header is written last).
    #[error("not a snapshot file, or one whose writing never finished")]
    NotASnapshot,
    /// Written by a format version this build does not read.
    #[error("snapshot format version {0} (this build reads version {ver})", ver = format::SNAPSHOT_VERSION)]
    Version(u32),
    /// A file's header or meta is damaged or truncated.
    #[error("corrupt snapshot: {0}")]
    Corrupt(&'static str),
    /// The chain does not link: a wrong or missing parent, a layout that changed.
    #[error("snapshot chain: {0}")]
    Chain(String),
    /// The memory to snapshot or to restore into does not fit the file's layout.
    #[error("layout: {0}")]
    Layout(String),
    /// Pages restored differ from the memory at the snapshot's pause.
    #[error(
        "verification FAILED: {mismatched_pages} restored page(s) differ from the memory at the \
         snapshot's pause (first: block `{block}` page {page})"
    )]
    VerificationFailed {
        /// How many pages differ.
        mismatched_pages: u64,
        /// The first one's block.
        block: String,
        /// The first one's page.
        page: u64,
    },
    /// The VMM's memory, dirty tracking or vCPU hooks failed.
    #[error("snapshot, {context}")]
    Engine {
        /// What was being done.
        context: &'static str,
        /// The engine's error.
        #[source]
        source: crate::Error,
    },
    /// Lazy restore needs userfaultfd on the guest's memory.
    #[error("lazy restore is not possible here: {0}")]
    LazyUnavailable(String),
    /// Serving a lazily restored guest's page failed after it resumed: the pages not yet
    /// placed stay missing (their readers wait), never zero.
    #[error("lazy restore failed while {context}")]
    Lazy {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: Box<SnapshotError>,
    },
}

impl SnapshotError {
    pub(crate) fn corrupt(what: &'static str) -> Self {
        SnapshotError::Corrupt(what)
    }

    pub(crate) fn in_file(path: &std::path::Path) -> impl FnOnce(SnapshotError) -> SnapshotError {
        let path = path.to_path_buf();
        move |e| SnapshotError::File {
            path,
            source: Box::new(e),
        }
    }

    pub(crate) fn engine(context: &'static str) -> impl FnOnce(crate::Error) -> SnapshotError {
        move |source| SnapshotError::Engine { context, source }
    }

    /// Whether restored memory was found to differ from the snapshot's (exit code 3 in `vmm`).
    pub fn is_mismatch(&self) -> bool {
        match self {
            SnapshotError::VerificationFailed { .. } => true,
            SnapshotError::File { source, .. } | SnapshotError::Lazy { source, .. } => {
                source.is_mismatch()
            }
            _ => false,
        }
    }
}

/// Result alias of snapshots.
pub type SnapshotResult<T> = std::result::Result<T, SnapshotError>;
