// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One snapshot file being written: pages at their fixed offsets, then the meta, then the header.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use clearlog_bitmap::Bitmap;

use super::format::{self, BlockLayout, Meta, SnapshotHeader, RUN_BYTES, RUN_PAGES};
use super::{SnapshotError, SnapshotResult};
use crate::memory::is_zero_page;
use crate::{MigrationBlock, StateBlob, PAGE_SIZE};

/// Pages read from guest memory per call while writing (256 KiB).
pub(crate) const PAGES_PER_READ: u64 = 64;

/// A snapshot file being written. Until [`finish`](Self::finish) writes its header the file
/// has none, and every reader refuses it; dropping an unfinished writer removes the file.
#[derive(Debug)]
pub(crate) struct SnapshotWriter {
    file: File,
    path: PathBuf,
    header: SnapshotHeader,
    blocks: Vec<BlockLayout>,
    meta_offset: u64,
    /// Per block: the pages this file defines.
    present: Vec<Bitmap>,
    /// Per block: the pages written with data (the others are holes).
    data: Vec<Bitmap>,
    buf: Vec<u8>,
    pub(crate) zero_pages: u64,
    finished: bool,
}

impl SnapshotWriter {
    /// Create (or replace) `path` for `blocks` (`(name, size)`).
    pub(crate) fn create(
        path: &Path,
        header: SnapshotHeader,
        blocks: &[(String, u64)],
    ) -> SnapshotResult<Self> {
        let (layouts, meta_offset) = format::layout(blocks)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        // The data region is sparse: only pages holding data take disk.
        file.set_len(meta_offset)?;
        Ok(SnapshotWriter {
            file,
            path: path.to_path_buf(),
            header,
            present: layouts
                .iter()
                .map(|b| Bitmap::new(b.pages() as usize))
                .collect(),
            data: layouts
                .iter()
                .map(|b| Bitmap::new(b.pages() as usize))
                .collect(),
            blocks: layouts,
            meta_offset,
            buf: vec![0; (PAGES_PER_READ * PAGE_SIZE) as usize],
            zero_pages: 0,
            finished: false,
        })
    }

    /// Read pages `first..first + n` of `block` (index `bi`) from guest memory and store them:
    /// data at their offsets, a zero page as a hole.
    pub(crate) fn write_run<B: MigrationBlock + ?Sized>(
        &mut self,
        bi: usize,
        block: &B,
        first: u64,
        n: u64,
    ) -> SnapshotResult<()> {
        // The read buffer is lent out while `store` borrows the writer.
        let mut buf = std::mem::take(&mut self.buf);
        let mut stored = Ok(());
        let mut at = first;
        while stored.is_ok() && at < first + n {
            let count = (first + n - at).min(PAGES_PER_READ);
            let bytes = &mut buf[..(count * PAGE_SIZE) as usize];
            stored = block
                .read(at * PAGE_SIZE, bytes)
                .map_err(crate::Error::memory("reading a page to snapshot it"))
                .map_err(SnapshotError::engine("reading guest memory"))
                .and_then(|()| self.store(bi, at, bytes));
            at += count;
        }
        self.buf = buf;
        stored
    }

    /// Pages this file defines so far.
    pub(crate) fn defined_pages(&self) -> u64 {
        self.present.iter().map(|p| p.count_ones() as u64).sum()
    }

    /// Store pages copied from guest memory earlier.
    pub(crate) fn store_copied(&mut self, copied: &CopiedPages) -> SnapshotResult<()> {
        let mut at = 0usize;
        for &(bi, first, n) in &copied.runs {
            let len = (n * PAGE_SIZE) as usize;
            self.store(bi, first, &copied.buf[at..at + len])?;
            at += len;
        }
        Ok(())
    }

    /// Store `bytes` (whole pages), the first being page `first` of block `bi`.
    fn store(&mut self, bi: usize, first: u64, bytes: &[u8]) -> SnapshotResult<()> {
        let base = self.blocks[bi].data_offset;
        let count = bytes.len() as u64 / PAGE_SIZE;
        let page = |k: u64| &bytes[(k * PAGE_SIZE) as usize..((k + 1) * PAGE_SIZE) as usize];
        let mut i = 0;
        while i < count {
            let zero = is_zero_page(page(i));
            let mut end = i + 1;
            while end < count && is_zero_page(page(end)) == zero {
                end += 1;
            }
            let (p0, len) = (first + i, end - i);
            if zero {
                self.zero_pages += len;
                self.punch_written(bi, p0, len)?;
            } else {
                let data = &bytes[(i * PAGE_SIZE) as usize..(end * PAGE_SIZE) as usize];
                self.file.write_all_at(data, base + p0 * PAGE_SIZE)?;
                self.data[bi].set_range(p0 as usize, len as usize);
            }
            self.present[bi].set_range(p0 as usize, len as usize);
            i = end;
        }
        Ok(())
    }

    /// Make pages that an earlier pass wrote with data holes again (they are zero now).
    fn punch_written(&mut self, bi: usize, first: u64, len: u64) -> SnapshotResult<()> {
        if self.data[bi].is_range_clear(first as usize, len as usize) {
            return Ok(());
        }
        let offset = self.blocks[bi].data_offset + first * PAGE_SIZE;
        punch_hole(&self.file, offset, len * PAGE_SIZE)?;
        self.data[bi].clear_range(first as usize, len as usize);
        Ok(())
    }

    /// Compress, in place, every run of [`RUN_PAGES`] pages that holds data and shrinks by at
    /// least a page; per block, per run, its compressed length (0: stored as is).
    fn compress_runs(&mut self) -> SnapshotResult<Vec<Vec<u32>>> {
        let mut raw = vec![0u8; RUN_BYTES];
        let mut out = Vec::with_capacity(self.blocks.len());
        for (bi, b) in self.blocks.iter().enumerate() {
            let mut lens = vec![0u32; b.pages().div_ceil(RUN_PAGES) as usize];
            for (run, len) in lens.iter_mut().enumerate() {
                let first = run as u64 * RUN_PAGES;
                let n = (b.pages() - first).min(RUN_PAGES);
                if self.data[bi].is_range_clear(first as usize, n as usize) {
                    continue;
                }
                let offset = b.data_offset + first * PAGE_SIZE;
                let bytes = &mut raw[..(n * PAGE_SIZE) as usize];
                self.file.read_exact_at(bytes, offset)?;
                let packed = lz4_flex::block::compress(bytes);
                let stored = (packed.len() as u64).next_multiple_of(PAGE_SIZE);
                if stored >= n * PAGE_SIZE {
                    continue;
                }
                self.file.write_all_at(&packed, offset)?;
                punch_hole(&self.file, offset + stored, n * PAGE_SIZE - stored)?;
                *len = packed.len() as u32;
            }
            out.push(lens);
        }
        Ok(out)
    }

    /// Write the meta (`digests` per block, the state) and, once it and the pages are on disk,
    /// the header that makes the file a snapshot.
    pub(crate) fn finish(
        mut self,
        digests: Vec<Vec<u64>>,
        state: Vec<StateBlob>,
        (sync, compress): (bool, bool),
    ) -> SnapshotResult<u64> {
        let compressed = match compress {
            true => self.compress_runs()?,
            false => self
                .blocks
                .iter()
                .map(|b| vec![0; b.pages().div_ceil(RUN_PAGES) as usize])
                .collect(),
        };
        let meta = Meta {
            blocks: self.blocks.clone(),
            state,
            present: std::mem::take(&mut self.present),
            digests,
            compressed,
        };
        let extent = format::write_meta(&self.file, self.meta_offset, &meta)?;
        if sync {
            self.file.sync_data()?;
        }
        let header = format::encode_header(&self.header, self.blocks.len() as u32, extent);
        self.file.write_all_at(&header, 0)?;
        if sync {
            self.file.sync_data()?;
        }
        self.finished = true;
        Ok(extent.file_len)
    }
}

/// Free `len` bytes of `file` at `offset` (they read as zeros after).
fn punch_hole(file: &File, offset: u64, len: u64) -> SnapshotResult<()> {
    // SAFETY: fallocate(2) on our own open file descriptor, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        // No hole punching here (some file systems): zeros take disk, but read the same.
        file.write_all_at(&vec![0u8; len as usize], offset)?;
    }
    Ok(())
}

/// Pages copied from guest memory in a pause, to be written after it: `(block, first page,
/// pages)` runs, their bytes one after the other in `buf`.
///
/// The buffer is kept from one snapshot to the next and touched before the pause
/// ([`reserve`](Self::reserve)): a first touch of fresh memory costs a page fault per page,
/// which must not happen in the pause.
#[derive(Debug, Default)]
pub(crate) struct CopiedPages {
    runs: Vec<(usize, u64, u64)>,
    buf: Vec<u8>,
}

impl CopiedPages {
    /// Make room for `pages` pages, touching every page of it now.
    pub(crate) fn reserve(&mut self, pages: u64) {
        let bytes = (pages * PAGE_SIZE) as usize;
        if self.buf.len() < bytes {
            self.buf.resize(bytes, 0);
            // `resize` may leave fresh zeroed memory unmapped: touch it.
            for page in self.buf.chunks_mut(PAGE_SIZE as usize) {
                page[0] = 1;
            }
        }
    }

    /// Copy the pages set in `pages` (one bitmap per block) of `blocks`, replacing what was
    /// copied before.
    pub(crate) fn copy<B: MigrationBlock>(
        &mut self,
        blocks: &[B],
        pages: &[clearlog_bitmap::Bitmap],
    ) -> SnapshotResult<()> {
        self.runs.clear();
        let total: u64 = pages.iter().map(|b| b.count_ones() as u64).sum();
        self.reserve(total);
        let mut at = 0usize;
        for (bi, (b, bits)) in blocks.iter().zip(pages).enumerate() {
            for r in crate::postcopy::runs(bits) {
                let len = ((r.end - r.start) * PAGE_SIZE) as usize;
                b.read(r.start * PAGE_SIZE, &mut self.buf[at..at + len])
                    .map_err(crate::Error::memory("copying a page to snapshot it"))
                    .map_err(SnapshotError::engine("reading guest memory"))?;
                self.runs.push((bi, r.start, r.end - r.start));
                at += len;
            }
        }
        Ok(())
    }

    /// Pages copied.
    pub(crate) fn pages(&self) -> u64 {
        self.runs.iter().map(|&(_, _, n)| n).sum()
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
