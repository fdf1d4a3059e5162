// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Loading page records into guest RAM: one [`PageLoader`] per stream (a version-1 stream, or
//! each channel of a session), writing pages in place during precopy and placing them through
//! the postcopy phase's [`Missing`] once the guest runs.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use clearlog_bitmap::Bitmap;
use xxhash_rust::xxh3::xxh3_64;

use crate::cpu::ns_per_page;
use crate::memory::is_zero_page;
use crate::postcopy::missing::Missing;
use crate::stats::{ChannelStats, IncomingStats};
use crate::stream::{PageEntry, StreamReader};
use crate::{Error, MigrationBlock, Result, PAGE_SIZE};

/// The postcopy phase, once it started (set by the control channel's reader).
pub(crate) type PostcopyCell<'w> = OnceLock<Missing<'w>>;

/// Per stream (a version-1 stream's one, or each page channel), per block, the xxh3-64 of every
/// page received as data on it. The streams carry disjoint pages (a page always travels on the
/// same channel), so they are kept apart: merging them would cost the downtime a pass over every
/// page received (80 ms for 1.5 M pages, measured before the acknowledgement).
#[derive(Debug, Default)]
pub(crate) struct Received(Vec<Vec<BTreeMap<u64, u64>>>);

impl Received {
    /// The digest `page` of `block` was last received with, taken out.
    pub(crate) fn take(&mut self, block: usize, page: u64) -> Option<u64> {
        self.0
            .iter_mut()
            .find_map(|stream| stream.get_mut(block)?.remove(&page))
    }

    /// The pages of `block` received as data and never taken, in order.
    pub(crate) fn left(&self, block: usize) -> Vec<u64> {
        let mut left: Vec<u64> = self
            .0
            .iter()
            .filter_map(|stream| stream.get(block))
            .flat_map(|table| table.keys().copied())
            .collect();
        left.sort_unstable();
        left
    }

    /// Forget, in every stream, the pages set in `missing[block]`: postcopy sends them again, and
    /// only what its placements record counts.
    pub(crate) fn forget(&mut self, missing: &[Bitmap]) {
        for stream in &mut self.0 {
            for (table, m) in stream.iter_mut().zip(missing) {
                table.retain(|&page, _| !m.test(page as usize));
            }
        }
    }

    /// Add one stream's digests (per block).
    pub(crate) fn push(&mut self, stream: Vec<BTreeMap<u64, u64>>) {
        self.0.push(stream);
    }
}

/// Loads page records and zero ranges of one stream (a version-1 stream, or one page channel of a
/// session) into guest RAM, keeping what the verification needs.
pub(crate) struct PageLoader<'b, B> {
    blocks: &'b [B],
    /// Per block, the xxh3-64 of every page received as data on this stream (the last copy; a
    /// page received as zero leaves it). Empty unless verifying after resuming.
    received: Vec<BTreeMap<u64, u64>>,
    /// Per block, pages whose content now comes from a data record of this stream (a page zeroed
    /// later that is not in here held data from before the stream: stale). A page always travels
    /// on the same channel, so one stream's view is the whole truth for its pages.
    got_data: Vec<Bitmap>,
    scratch: Box<[u8; PAGE_SIZE as usize]>,
    zero_page: Vec<u8>,
    nonzero: Vec<u64>,
    pub(crate) pages_received: u64,
    /// A page channel's loader (its stats are a channel's).
    pub(crate) is_channel: bool,
    zero_pages: u64,
    zero_range_pages: u64,
    zero_checked_pages: u64,
    stale_pages_zeroed: u64,
    pub(crate) bytes: u64,
    pub(crate) cpu: Duration,
}

impl<'b, B: MigrationBlock> PageLoader<'b, B> {
    pub(crate) fn new(blocks: &'b [B], track: bool) -> Self {
        PageLoader {
            blocks,
            received: if track {
                blocks.iter().map(|_| BTreeMap::new()).collect()
            } else {
                Vec::new()
            },
            got_data: blocks
                .iter()
                .map(|b| Bitmap::new(b.pages() as usize))
                .collect(),
            scratch: Box::new([0u8; PAGE_SIZE as usize]),
            zero_page: vec![0u8; PAGE_SIZE as usize],
            nonzero: Vec::new(),
            pages_received: 0,
            is_channel: false,
            zero_pages: 0,
            zero_range_pages: 0,
            zero_checked_pages: 0,
            stale_pages_zeroed: 0,
            bytes: 0,
            cpu: Duration::ZERO,
        }
    }

    /// Load a page batch of `count` entries of `block`.
    pub(crate) fn pages<R: std::io::BufRead>(
        &mut self,
        r: &mut StreamReader<R>,
        block: u32,
        count: u32,
        postcopy: &PostcopyCell<'_>,
    ) -> Result<()> {
        if let Some(m) = postcopy.get() {
            return self.place_pages(r, block, count, m);
        }
        let ram = &self.blocks[block as usize];
        let got = &mut self.got_data[block as usize];
        for _ in 0..count {
            let table = self.received.get_mut(block as usize);
            // One copy: from the read buffer into guest RAM; the digest is taken from the same
            // bytes while they are in the cache.
            let entry = r.read_page_with(block, |page, data| {
                ram.write_untracked(page * PAGE_SIZE, data)
                    .map_err(Error::memory("loading a page"))?;
                if let Some(table) = table {
                    table.insert(page, xxh3_64(data));
                }
                Ok(())
            })?;
            match entry {
                PageEntry::Data(page) => got.set(page as usize),
                PageEntry::Zero(page) => {
                    // Read, and written only if not zero: fresh destination RAM is already zero,
                    // and writing zeros would fault in (allocate) every untouched page (a mostly
                    // idle guest then loaded ~10x slower than the source sends it, and the backlog
                    // showed up as downtime). Reading an untouched page maps the shared zero page
                    // instead.
                    if zero_page_in_place(ram, page, &mut self.scratch, &self.zero_page)?
                        && !got.test(page as usize)
                    {
                        self.stale_pages_zeroed += 1;
                    }
                    got.clear(page as usize);
                    if let Some(table) = self.received.get_mut(block as usize) {
                        table.remove(&page);
                    }
                    self.zero_pages += 1;
                    self.zero_checked_pages += 1;
                }
            }
            self.pages_received += 1;
        }
        Ok(())
    }

    /// Load a zero range: every page is read (in place where the block can: untouched memory
    /// reads through the shared zero page) and only non-zero ones are written. Our own
    /// populated-pages answer is not asked: were it wrong, data this memory held before the
    /// stream would stay where the source has zeros.
    pub(crate) fn zero_range(
        &mut self,
        block: u32,
        first_page: u64,
        npages: u64,
        postcopy: &PostcopyCell<'_>,
    ) -> Result<()> {
        if let Some(m) = postcopy.get() {
            for page in first_page..first_page + npages {
                if m.is_pending(block as usize, page) {
                    m.place_zero(block as usize, page)?;
                }
            }
            self.zero_range_pages += npages;
            return Ok(());
        }
        let ram = &self.blocks[block as usize];
        self.nonzero.clear();
        ram.nonzero_pages(first_page, npages, &mut self.nonzero)
            .map_err(Error::memory("reading pages received as zero"))?;
        let got = &mut self.got_data[block as usize];
        for &page in &self.nonzero {
            ram.write_untracked(page * PAGE_SIZE, &self.zero_page)
                .map_err(Error::memory("loading a zero page"))?;
            if !got.test(page as usize) {
                self.stale_pages_zeroed += 1;
            }
        }
        got.clear_range(first_page as usize, npages as usize);
        if let Some(table) = self.received.get_mut(block as usize) {
            let end = first_page + npages;
            let gone: Vec<u64> = table.range(first_page..end).map(|(p, _)| *p).collect();
            for page in gone {
                table.remove(&page);
            }
        }
        self.zero_range_pages += npages;
        self.zero_checked_pages += npages;
        Ok(())
    }

    /// Postcopy: place a page batch through `m` (each page once, whichever path brings it first;
    /// `m` keeps the digests).
    fn place_pages<R: std::io::BufRead>(
        &mut self,
        r: &mut StreamReader<R>,
        block: u32,
        count: u32,
        m: &Missing<'_>,
    ) -> Result<()> {
        let b = block as usize;
        for _ in 0..count {
            let entry = r.read_page_with(block, |page, data| {
                let data = data.try_into().map_err(|_| Error::Malformed("page size"))?;
                m.place(b, page, data)
            })?;
            if let PageEntry::Zero(page) = entry {
                m.place_zero(b, page)?;
                self.zero_pages += 1;
            }
            self.pages_received += 1;
        }
        Ok(())
    }

    /// This stream as a page channel's stats.
    pub(crate) fn channel_stats(&self) -> ChannelStats {
        ChannelStats {
            pages: self.pages_received,
            bytes: self.bytes,
            ns_per_page: ns_per_page(self.cpu, self.pages_received),
        }
    }

    /// Add this stream's counts to `stats` and its digests to `received` (kept apart: the
    /// streams carry disjoint pages).
    pub(crate) fn add_to(self, stats: &mut IncomingStats, received: &mut Received) {
        stats.pages_received += self.pages_received;
        stats.zero_pages += self.zero_pages;
        stats.zero_range_pages += self.zero_range_pages;
        stats.zero_checked_pages += self.zero_checked_pages;
        stats.stale_pages_zeroed += self.stale_pages_zeroed;
        stats.bytes_received += self.bytes;
        if !self.received.is_empty() {
            received.0.push(self.received);
        }
    }
}

/// Makes `page` of `ram` zero, writing only when it is not (see [`PageLoader::pages`] for why);
/// returns whether it wrote. `scratch` holds one page; `zero_page` is a page of zeros.
fn zero_page_in_place<B: MigrationBlock>(
    ram: &B,
    page: u64,
    scratch: &mut [u8; PAGE_SIZE as usize],
    zero_page: &[u8],
) -> Result<bool> {
    ram.read(page * PAGE_SIZE, &mut scratch[..])
        .map_err(Error::memory("reading a page"))?;
    if is_zero_page(scratch) {
        return Ok(false);
    }
    ram.write_untracked(page * PAGE_SIZE, zero_page)
        .map_err(Error::memory("loading a zero page"))?;
    Ok(true)
}
