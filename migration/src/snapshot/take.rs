// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Taking snapshots of a running guest: a full one, then diffs, each written while the guest
//! runs and finished with a short pause.

use std::path::Path;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;

use super::digests::{self, Armed, Capture};
use super::format::{self, ParentRef, SnapshotHeader};
use super::writer::{CopiedPages, SnapshotWriter};
use super::{SnapshotError, SnapshotResult};
use crate::memory::ask_populated;
use crate::postcopy::runs;
use crate::{BoxError, Error, MigrationBlock, MigrationMemory, VmControl};

/// Where a snapshot's deltas come from: a dirty-memory client that answers "which pages were
/// written since the last time I asked", losslessly, next to any other client (a migration, a
/// display). `clearlog_memory::DirtyEpochs` is one (feature `clearlog-memory`).
pub trait SnapshotEpochs {
    /// End the current epoch and start the next: per block of the memory (in
    /// [`MigrationMemory::blocks`] order), one bit per page written in the epoch that ends.
    /// May report pages that did not change, never fewer than did.
    fn advance(&mut self) -> Result<Vec<Bitmap>, BoxError>;
}

#[cfg(feature = "clearlog-memory")]
impl<M: std::ops::Deref<Target = clearlog_memory::MemorySystem>> SnapshotEpochs
    for clearlog_memory::DirtyEpochs<M>
{
    fn advance(&mut self) -> Result<Vec<Bitmap>, BoxError> {
        let delta = clearlog_memory::DirtyEpochs::advance(self)?;
        self.memory()
            .ram_blocks()
            .iter()
            .map(|b| {
                delta
                    .pages(b.id())
                    .cloned()
                    .ok_or_else(|| format!("the delta has no RAM block `{}`", b.name()).into())
            })
            .collect()
    }
}

/// How snapshots are taken.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Passes written while the guest runs, at most, before the pause (at least 2: the last one
    /// writes what changed while the digests were armed).
    pub max_live_passes: u32,
    /// Stop the live passes once a pass's delta is at most this many pages: what is left is
    /// written during the pause.
    pub pause_pages: u64,
    /// `fdatasync` the file before its header, and the header (a snapshot survives a crash).
    pub sync: bool,
    /// Compress the file's runs of 64 pages with lz4 (after the pause; a run that would not
    /// shrink by a page stays as is).
    pub compress: bool,
    /// Take the digests "as at the pause" after the guest resumed, under userfaultfd
    /// write-protection, where the memory allows it; otherwise they are hashed during the pause.
    /// Write-protection holds back the writes made through the blocks' mappings (vCPUs, the
    /// VMM's own accesses); turn it off if something else writes guest memory while a snapshot
    /// is taken (another process through a shared file, a balloon discarding pages): such a
    /// write would make a digest wrong, and the restore refuse the snapshot.
    pub background_digests: bool,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            max_live_passes: 4,
            pause_pages: 2048,
            sync: true,
            compress: false,
            background_digests: true,
        }
    }
}

/// What one snapshot did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SnapshotStats {
    /// Position in the chain: 0 for the full snapshot.
    pub sequence: u64,
    /// Pages the file defines (data or zero).
    pub pages: u64,
    /// Zero pages written (as holes), a page written in several passes counted each time.
    pub zero_pages: u64,
    /// Pages written while the guest ran, per live pass.
    pub live_pass_pages: Vec<u64>,
    /// Pages written during the pause (the last delta).
    pub pause_pages: u64,
    /// How long the guest was paused, in milliseconds.
    pub pause_ms: f64,
    /// Of the pause: the last delta's sync and take.
    pub pause_advance_ms: f64,
    /// Of the pause: copying the last delta to memory (written to the file after the pause).
    pub pause_copy_ms: f64,
    /// Of the pause: saving the CPU and device state.
    pub pause_state_ms: f64,
    /// Of the pause: hashing every page, or arming the write-protection that lets the
    /// hashing run after the pause, or (armed before the pause) re-protecting what was written
    /// or populated since.
    pub pause_digest_ms: f64,
    /// Whether the digests were taken after the pause (under write-protection).
    pub background_digests: bool,
    /// Before the last live pass: preparing the digests (write-protection armed while the guest
    /// runs).
    pub arm_ms: f64,
    /// Writes of the guest that faulted between that arming and the pause (each un-protected a
    /// 2 MiB group of pages and recorded it as written).
    pub arm_faults: u64,
    /// Of the pause's digests: pages re-protected, written or populated since the arming.
    pub pause_reprotected_pages: u64,
    /// After the pause: writing the last delta's copy to the file.
    pub copied_write_ms: f64,
    /// After the pause: compressing (if asked), writing the meta and header, syncing.
    pub finish_ms: f64,
    /// After the pause: the wait for the background hashing to end, in milliseconds.
    pub digest_ms: f64,
    /// Writes of the guest that waited for their page to be hashed after the pause.
    pub digest_waits: u64,
    /// From the call to the file being complete, in milliseconds.
    pub total_ms: f64,
    /// The file's length.
    pub file_len: u64,
    /// Bytes of disk the file takes (its allocated blocks).
    pub disk_bytes: u64,
}

/// Takes a full snapshot, then diff snapshots, of a running guest.
///
/// Every call to [`snapshot`](Self::snapshot) after the first writes a diff of the previous
/// one that finished; if a call fails, the pages it took from the dirty epochs stay due and
/// go into the next file, so a failed snapshot loses nothing.
pub struct Snapshotter<'a, M: MigrationMemory, E: SnapshotEpochs, V: VmControl> {
    mem: &'a M,
    epochs: E,
    vm: &'a V,
    options: SnapshotOptions,
    last: Option<(ParentRef, u64)>,
    /// Pages taken from the epochs since the last finished snapshot.
    due: Option<Vec<Bitmap>>,
    /// The pause's copy of its last delta, kept (and touched) from one snapshot to the next.
    copied: CopiedPages,
}

impl<M: MigrationMemory, E: SnapshotEpochs, V: VmControl> std::fmt::Debug
    for Snapshotter<'_, M, E, V>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("options", &self.options)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl<'a, M: MigrationMemory, E: SnapshotEpochs, V: VmControl> Snapshotter<'a, M, E, V> {
    /// A snapshotter for `mem`, whose dirty `epochs` were opened before the first snapshot,
    /// pausing through `vm`.
    pub fn new(mem: &'a M, epochs: E, vm: &'a V, options: SnapshotOptions) -> Self {
        Snapshotter {
            mem,
            epochs,
            vm,
            options,
            last: None,
            due: None,
            copied: CopiedPages::default(),
        }
    }

    /// The dirty epochs.
    pub fn epochs(&self) -> &E {
        &self.epochs
    }

    /// The dirty epochs, back (to close them).
    pub fn into_epochs(self) -> E {
        self.epochs
    }

    /// Write the next snapshot to `path`: full the first time, then a diff of the previous
    /// one (named in its header; keep the files in one directory).
    pub fn snapshot(&mut self, path: &Path) -> SnapshotResult<SnapshotStats> {
        let start = Instant::now();
        let blocks = self.mem.blocks();
        let header = SnapshotHeader {
            id: crate::session::random_id(),
            parent: self.last.as_ref().map(|(p, _)| p.clone()),
            sequence: self.last.as_ref().map_or(0, |(_, s)| s + 1),
        };
        let layout: Vec<(String, u64)> = blocks
            .iter()
            .map(|b| (b.name().to_owned(), b.size()))
            .collect();
        let mut w = SnapshotWriter::create(path, header.clone(), &layout)
            .map_err(SnapshotError::in_file(path))?;
        let mut stats = SnapshotStats {
            sequence: header.sequence,
            ..SnapshotStats::default()
        };
        let armed = self.live_passes(&blocks, &mut w, &mut stats)?;
        let (digests, state) = self.pause_and_finish(&blocks, &mut w, armed, &mut stats)?;
        stats.pages = w.defined_pages();
        stats.zero_pages = w.zero_pages;
        let t = Instant::now();
        stats.file_len = w.finish(digests, state, (self.options.sync, self.options.compress))?;
        stats.finish_ms = ms(t.elapsed());
        stats.disk_bytes = disk_bytes(path);
        stats.total_ms = ms(start.elapsed());
        self.last = Some((
            ParentRef {
                id: header.id,
                file_name: format::file_name_of(path)?,
            },
            header.sequence,
        ));
        self.due = None;
        tracing::info!(path = %path.display(), ?stats, "snapshot written");
        Ok(stats)
    }

    /// Write while the guest runs: all populated memory for a full snapshot, the pages due for
    /// a diff; then deltas until one is small; then arm the digests and write one more delta
    /// (what was written while they were armed), so the pause is left with little.
    fn live_passes(
        &mut self,
        blocks: &[M::Block],
        w: &mut SnapshotWriter,
        stats: &mut SnapshotStats,
    ) -> SnapshotResult<Armed> {
        let first = if self.last.is_none() {
            self.due = None;
            write_populated(blocks, w)?
        } else {
            self.advance()?;
            // Everything due: this epoch's pages, and those of a snapshot that failed.
            let due = self.due.clone().expect("set by the advance");
            write_pages(blocks, w, &due)?
        };
        stats.live_pass_pages.push(first);
        for _ in 2..self.options.max_live_passes.max(2) {
            if *stats.live_pass_pages.last().expect("one pass") <= self.options.pause_pages {
                break;
            }
            let delta = self.advance()?;
            stats.live_pass_pages.push(write_pages(blocks, w, &delta)?);
        }
        let t = Instant::now();
        let armed = digests::arm(blocks, self.options.background_digests)?;
        stats.arm_ms = ms(t.elapsed());
        let delta = self.advance()?;
        let n = write_pages(blocks, w, &delta)?;
        stats.live_pass_pages.push(n);
        // The pause's delta is about as large as this pass's: room for twice that, touched now.
        self.copied.reserve(2 * n.max(self.options.pause_pages));
        Ok(armed)
    }

    /// Pause, copy the last delta to memory, save the state, start the digests, resume; then
    /// write the copied pages and wait for the digests.
    fn pause_and_finish(
        &mut self,
        blocks: &[M::Block],
        w: &mut SnapshotWriter,
        armed: Armed,
        stats: &mut SnapshotStats,
    ) -> SnapshotResult<(Vec<Vec<u64>>, Vec<crate::StateBlob>)> {
        self.vm.pause().map_err(|e| vm_error("pause", e))?;
        let paused = Instant::now();
        let inside = self.while_paused(blocks, armed, stats);
        let resumed = self.vm.resume().map_err(|e| vm_error("resume", e));
        stats.pause_ms = ms(paused.elapsed());
        let (capture, state) = inside?;
        resumed?;
        stats.background_digests = capture.is_background();
        if let Some(armed) = capture.arm_stats() {
            stats.arm_faults = armed.faults;
            stats.pause_reprotected_pages = armed.reprotected_pages;
        }
        let t = Instant::now();
        w.store_copied(&self.copied)?;
        stats.copied_write_ms = ms(t.elapsed());
        let t = Instant::now();
        let (digests, waits) = capture.finish()?;
        stats.digest_ms = ms(t.elapsed());
        stats.digest_waits = waits;
        Ok((digests, state))
    }

    /// In the pause: the last delta copied to memory (the file is written after the guest
    /// resumed: a disk busy with write-back must not lengthen the pause), the state, the digests
    /// started.
    fn while_paused(
        &mut self,
        blocks: &[M::Block],
        armed: Armed,
        stats: &mut SnapshotStats,
    ) -> SnapshotResult<(Capture, Vec<crate::StateBlob>)> {
        let t = Instant::now();
        let delta = self.advance()?;
        stats.pause_advance_ms = ms(t.elapsed());
        let t = Instant::now();
        self.copied.copy(blocks, &delta)?;
        stats.pause_pages = self.copied.pages();
        stats.pause_copy_ms = ms(t.elapsed());
        let t = Instant::now();
        let state = self
            .vm
            .save_state()
            .map_err(|e| vm_error("save_state", e))?;
        stats.pause_state_ms = ms(t.elapsed());
        let t = Instant::now();
        let capture = digests::capture(blocks, armed)?;
        stats.pause_digest_ms = ms(t.elapsed());
        Ok((capture, state))
    }

    /// The next delta; its pages stay due until a snapshot finishes.
    fn advance(&mut self) -> SnapshotResult<Vec<Bitmap>> {
        let delta = self
            .epochs
            .advance()
            .map_err(Error::memory("advancing the dirty epochs"))
            .map_err(SnapshotError::engine(
                "taking the pages dirtied since the last snapshot",
            ))?;
        let pages: Vec<u64> = self.mem.blocks().iter().map(|b| b.pages()).collect();
        if delta.len() != pages.len() || delta.iter().zip(&pages).any(|(d, &p)| d.len() as u64 != p)
        {
            return Err(SnapshotError::Layout(
                "the dirty epochs' blocks do not match the memory's".into(),
            ));
        }
        match &mut self.due {
            Some(due) => due.iter_mut().zip(&delta).for_each(|(d, n)| d.or_assign(n)),
            None => self.due = Some(delta.clone()),
        }
        Ok(delta)
    }
}

fn vm_error(hook: &'static str, source: BoxError) -> SnapshotError {
    SnapshotError::Engine {
        context: "pausing the guest",
        source: Error::Vm { hook, source },
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bytes of disk `path` takes.
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Write every page of `blocks` that may hold data; the pages written.
fn write_populated<B: MigrationBlock>(blocks: &[B], w: &mut SnapshotWriter) -> SnapshotResult<u64> {
    let mut ranges = Vec::new();
    let mut n = 0;
    for (bi, b) in blocks.iter().enumerate() {
        ask_populated(b, 0, b.pages(), &mut ranges).map_err(digests::populated_error)?;
        for r in &ranges {
            w.write_run(bi, b, r.start, r.end - r.start)?;
            n += r.end - r.start;
        }
    }
    Ok(n)
}

/// Write the pages set in `pages` (one bitmap per block); how many.
fn write_pages<B: MigrationBlock>(
    blocks: &[B],
    w: &mut SnapshotWriter,
    pages: &[Bitmap],
) -> SnapshotResult<u64> {
    let mut n = 0;
    for (bi, (b, bits)) in blocks.iter().zip(pages).enumerate() {
        for r in runs(bits) {
            w.write_run(bi, b, r.start, r.end - r.start)?;
            n += r.end - r.start;
        }
    }
    Ok(n)
}
