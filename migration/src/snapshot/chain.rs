// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A chain of snapshot files, from the full snapshot to the newest diff, checked and linked.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clearlog_bitmap::Bitmap;

use super::format::{self, BlockLayout, Meta, SnapshotHeader, RUN_PAGES};
use super::{SnapshotError, SnapshotResult};
use crate::{StateBlob, PAGE_SIZE};

/// Longest chain a restore follows (the owner of a page is kept in one byte).
pub const MAX_CHAIN: usize = 255;

/// One file of a chain.
#[derive(Debug)]
struct Link {
    path: PathBuf,
    file: File,
    header: SnapshotHeader,
    meta: Meta,
    /// The run decompressed last, `(block, run, bytes)`: a restore reads a run's pages one
    /// source at a time, often page by page.
    last_run: Mutex<Option<(usize, u64, Vec<u8>)>>,
}

/// A snapshot chain opened for a restore: the full snapshot first, the newest diff last.
///
/// [`open`](Self::open) reads and checks every header and meta (digests, lengths, links,
/// layout); the pages are read, and checked against the newest file's digests, by the restore.
#[derive(Debug)]
pub struct SnapshotChain {
    links: Vec<Link>,
}

/// Where a page of a restored guest comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Link `n` of the chain (0 = the full snapshot) defines it.
    File(u8),
    /// No file defines it: it was never written, a zero page.
    Zero,
}

impl SnapshotChain {
    /// Open the chain that ends with `newest`: it and its parents, found by the file names their
    /// headers give, in `newest`'s directory. A parent whose identity is not the one its child
    /// names, a layout that changed along the chain, a damaged or truncated header or meta: each
    /// is refused here, before anything is restored.
    pub fn open(newest: &Path) -> SnapshotResult<SnapshotChain> {
        let dir = newest.parent().unwrap_or(Path::new("."));
        let mut links = vec![open_link(newest, true)?];
        while let Some(parent) = links.last().expect("one link").header.parent.clone() {
            if links.len() >= MAX_CHAIN {
                return Err(SnapshotError::Chain(format!(
                    "longer than {MAX_CHAIN} files; restore fewer diffs"
                )));
            }
            let path = dir.join(&parent.file_name);
            let link = open_link(&path, false)?;
            let child = links.last().expect("one link");
            if link.header.id != parent.id {
                return Err(SnapshotError::Chain(format!(
                    "{} names {} as its parent, but that file is another snapshot (a different \
                     identity): it was replaced or belongs to another chain",
                    child.path.display(),
                    path.display()
                )));
            }
            if link.header.sequence + 1 != child.header.sequence {
                return Err(SnapshotError::Chain(format!(
                    "{} is number {} of its chain, its parent {} number {}",
                    child.path.display(),
                    child.header.sequence,
                    path.display(),
                    link.header.sequence
                )));
            }
            if link.meta.blocks != child.meta.blocks {
                return Err(SnapshotError::Chain(format!(
                    "{} and its parent {} lay out RAM differently",
                    child.path.display(),
                    path.display()
                )));
            }
            links.push(link);
        }
        if links.last().expect("one link").header.sequence != 0 {
            return Err(SnapshotError::Chain(
                "does not start with a full snapshot".into(),
            ));
        }
        links.reverse();
        Ok(SnapshotChain { links })
    }

    /// Files in the chain.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Always false: a chain holds at least its full snapshot.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The files, the full snapshot first.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.links.iter().map(|l| l.path.as_path())
    }

    /// The RAM blocks the chain holds.
    pub fn blocks(&self) -> &[BlockLayout] {
        &self.newest().meta.blocks
    }

    /// The CPU and device state saved at the newest snapshot's pause.
    pub fn state(&self) -> &[StateBlob] {
        &self.newest().meta.state
    }

    fn newest(&self) -> &Link {
        self.links.last().expect("a chain has a link")
    }

    /// The digests of block `bi` at the newest snapshot's pause.
    pub(crate) fn digests(&self, bi: usize) -> &[u64] {
        &self.newest().meta.digests[bi]
    }

    /// For every page of block `bi`, the newest file that defines it.
    pub(crate) fn sources(&self, bi: usize) -> Vec<Source> {
        let pages = self.blocks()[bi].pages() as usize;
        let mut out = vec![Source::Zero; pages];
        let mut done = Bitmap::new(pages);
        for (n, link) in self.links.iter().enumerate().rev() {
            let mut take = link.meta.present[bi].clone();
            take.and_not_assign(&done);
            for p in take.iter_ones() {
                out[p] = Source::File(n as u8);
            }
            done.or_assign(&take);
        }
        out
    }

    /// Read `buf.len() / 4096` pages of block `bi` from file `n`, from page `first`.
    pub(crate) fn read(&self, n: u8, bi: usize, first: u64, buf: &mut [u8]) -> SnapshotResult<()> {
        let link = &self.links[n as usize];
        read_pages(link, bi, first, buf).map_err(SnapshotError::in_file(&link.path))
    }

    /// The first block layout that differs from `blocks` (`(name, size)`), as a message.
    pub(crate) fn layout_mismatch(&self, blocks: &[(String, u64)]) -> Option<String> {
        let ours: Vec<(String, u64)> = self
            .blocks()
            .iter()
            .map(|b| (b.name.clone(), b.size))
            .collect();
        (ours != blocks)
            .then(|| format!("the snapshot holds RAM blocks {ours:?}, the guest has {blocks:?}"))
    }
}

/// Read pages of block `bi` from `link`: as they are, or by decompressing their runs.
fn read_pages(link: &Link, bi: usize, first: u64, buf: &mut [u8]) -> SnapshotResult<()> {
    let block = &link.meta.blocks[bi];
    let lens = &link.meta.compressed[bi];
    let count = buf.len() as u64 / PAGE_SIZE;
    let mut at = 0;
    while at < count {
        let page = first + at;
        let run = page / RUN_PAGES;
        let run_first = run * RUN_PAGES;
        let run_end = (run_first + RUN_PAGES).min(block.pages());
        let take = run_end.min(first + count) - page;
        let dst = &mut buf[(at * PAGE_SIZE) as usize..((at + take) * PAGE_SIZE) as usize];
        match lens[run as usize] {
            0 => read_at(&link.file, dst, block.data_offset + page * PAGE_SIZE)?,
            len => {
                let mut cached = link.last_run.lock().unwrap_or_else(|p| p.into_inner());
                if !matches!(&*cached, Some((b, r, _)) if *b == bi && *r == run) {
                    let bytes = decompress_run(link, block, run_first, run_end, len)?;
                    *cached = Some((bi, run, bytes));
                }
                let bytes = &cached.as_ref().expect("just filled").2;
                let from = ((page - run_first) * PAGE_SIZE) as usize;
                dst.copy_from_slice(&bytes[from..from + dst.len()]);
            }
        }
        at += take;
    }
    Ok(())
}

/// The pages `run_first..run_end` of `block`, stored as a compressed run of `len` bytes.
fn decompress_run(
    link: &Link,
    block: &BlockLayout,
    run_first: u64,
    run_end: u64,
    len: u32,
) -> SnapshotResult<Vec<u8>> {
    let mut packed = vec![0u8; len as usize];
    read_at(
        &link.file,
        &mut packed,
        block.data_offset + run_first * PAGE_SIZE,
    )?;
    let mut bytes = vec![0u8; ((run_end - run_first) * PAGE_SIZE) as usize];
    let got = lz4_flex::block::decompress_into(&packed, &mut bytes)
        .map_err(|_| SnapshotError::corrupt("a compressed run does not decompress"))?;
    if got != bytes.len() {
        return Err(SnapshotError::corrupt(
            "a compressed run has the wrong length",
        ));
    }
    Ok(bytes)
}

/// Fill `buf` from `offset` of `file`: a file that ends first is truncated.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> SnapshotResult<()> {
    format::read_at(file, buf, offset, "truncated")
}

/// Open one file and check its header, meta and length; keep its digests if `newest`.
fn open_link(path: &Path, newest: bool) -> SnapshotResult<Link> {
    let open = || -> SnapshotResult<Link> {
        let file = File::open(path)?;
        let (header, blocks, extent) = format::read_header(&file)?;
        if file.metadata()?.len() < extent.file_len {
            return Err(SnapshotError::corrupt("truncated"));
        }
        let meta = format::read_meta(&file, extent, blocks, newest)?;
        let data_end = meta
            .blocks
            .iter()
            .map(|b| b.data_offset.saturating_add(b.size))
            .max()
            .unwrap_or(0);
        if data_end > extent.offset
            || meta
                .blocks
                .iter()
                .any(|b| b.data_offset < format::HEADER_LEN)
        {
            return Err(SnapshotError::corrupt(
                "a block's pages overlap the header or meta",
            ));
        }
        Ok(Link {
            path: path.to_path_buf(),
            file,
            header,
            meta,
            last_run: Mutex::new(None),
        })
    };
    open().map_err(SnapshotError::in_file(path))
}
