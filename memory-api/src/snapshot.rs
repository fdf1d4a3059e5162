// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Snapshots taken by `snapshot_and_clear_dirty`.

use clearlog_bitmap::Bitmap;

use crate::{PAGE_SHIFT, PAGE_SIZE};

/// The dirty bits a client took for a range: answers "was page X dirty".
///
/// It covers the requested range widened to 64-page boundaries of the RAM address space (clipped to
/// the region): [`start`](Self::start) and [`len`](Self::len) tell what it covers; pages outside
/// read as clean.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyClient, MemorySystem};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// let vram = mem.add_ram("vram", 0, 0x100_000).unwrap(); // 256 pages
/// mem.set_region_logging(vram, DirtyClient::Vga, true).unwrap();
/// mem.ram_blocks()[0].write(0x5_0000, &[1]).unwrap(); // page 80
/// let snap = mem.snapshot_and_clear_dirty(vram, 0x4_1000, 0x1000, DirtyClient::Vga).unwrap();
/// assert_eq!((snap.start(), snap.len()), (0x4_0000, 0x4_0000)); // widened to pages 64..128
/// assert!(snap.is_dirty(0x5_0000));
/// assert!(!snap.is_dirty(0x4_1000));
/// ```
#[derive(Debug, Clone)]
pub struct DirtySnapshot {
    /// Region offset (bytes) of bit 0.
    start: u64,
    bits: Bitmap,
}

impl DirtySnapshot {
    pub(crate) fn new(start: u64, bits: Bitmap) -> Self {
        DirtySnapshot { start, bits }
    }

    /// Was the page at `offset` (bytes, relative to the region start) dirty?
    ///
    /// Offsets outside the snapshot's range answer `false`.
    ///
    /// # Examples
    ///
    /// See [`DirtySnapshot`].
    pub fn is_dirty(&self, offset: u64) -> bool {
        offset
            .checked_sub(self.start)
            .map(|rel| rel >> PAGE_SHIFT)
            .filter(|&page| page < self.bits.len() as u64)
            .is_some_and(|page| self.bits.test(page as usize))
    }

    /// Was any page of `[offset, offset + len)` dirty? (A display asks this per scan line.)
    ///
    /// # Examples
    ///
    /// ```
    /// # use clearlog_memory::{DirtyClient, MemorySystem};
    /// # let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// # let vram = mem.add_ram("vram", 0, 0x100_000).unwrap();
    /// # mem.set_region_logging(vram, DirtyClient::Vga, true).unwrap();
    /// mem.ram_blocks()[0].write(0x3000, &[1]).unwrap();
    /// let snap = mem.snapshot_and_clear_dirty(vram, 0, 0x100_000, DirtyClient::Vga).unwrap();
    /// assert!(snap.is_range_dirty(0x2800, 0x1000));
    /// assert!(!snap.is_range_dirty(0x4000, 0x10_000));
    /// ```
    pub fn is_range_dirty(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset.max(self.start);
        let end = offset.saturating_add(len).min(self.start + self.len());
        if first >= end {
            return false;
        }
        let first_page = (first - self.start) >> PAGE_SHIFT;
        let end_page = (end - self.start).div_ceil(PAGE_SIZE);
        !self
            .bits
            .is_range_clear(first_page as usize, (end_page - first_page) as usize)
    }

    /// Region offset (bytes) of the first page covered.
    ///
    /// # Examples
    ///
    /// See [`DirtySnapshot`].
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Bytes covered.
    ///
    /// # Examples
    ///
    /// See [`DirtySnapshot`].
    pub fn len(&self) -> u64 {
        (self.bits.len() as u64) << PAGE_SHIFT
    }

    /// Does the snapshot cover nothing?
    ///
    /// # Examples
    ///
    /// ```
    /// # use clearlog_memory::{DirtyClient, MemorySystem};
    /// # let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// # let vram = mem.add_ram("vram", 0, 0x10_000).unwrap();
    /// # mem.set_region_logging(vram, DirtyClient::Vga, true).unwrap();
    /// let snap = mem.snapshot_and_clear_dirty(vram, 0, 0, DirtyClient::Vga).unwrap();
    /// assert!(snap.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// Region offsets (bytes) of the dirty pages, ascending.
    ///
    /// # Examples
    ///
    /// ```
    /// # use clearlog_memory::{DirtyClient, MemorySystem};
    /// # let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// # let vram = mem.add_ram("vram", 0, 0x10_000).unwrap();
    /// # mem.set_region_logging(vram, DirtyClient::Vga, true).unwrap();
    /// mem.ram_blocks()[0].write(0x7000, &[1]).unwrap();
    /// let snap = mem.snapshot_and_clear_dirty(vram, 0, 0x10_000, DirtyClient::Vga).unwrap();
    /// assert_eq!(snap.dirty_offsets().collect::<Vec<_>>(), [0x7000]);
    /// ```
    pub fn dirty_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits
            .iter_ones()
            .map(move |page| self.start + ((page as u64) << PAGE_SHIFT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_relative_to_start_and_clean_outside() {
        let mut bits = Bitmap::new(64);
        bits.set(0);
        bits.set(63);
        let snap = DirtySnapshot::new(0x10_000, bits);
        assert!(snap.is_dirty(0x10_000));
        assert!(snap.is_dirty(0x10_fff));
        assert!(!snap.is_dirty(0x11_000));
        assert!(snap.is_dirty(0x10_000 + 63 * PAGE_SIZE));
        assert!(!snap.is_dirty(0x10_000 + 64 * PAGE_SIZE));
        assert!(!snap.is_dirty(0));
        assert!(!snap.is_dirty(u64::MAX));
        assert!(snap.is_range_dirty(0, 0x10_001));
        assert!(!snap.is_range_dirty(0, 0x10_000));
        assert!(!snap.is_range_dirty(u64::MAX - 1, 2));
        assert_eq!(snap.dirty_offsets().count(), 2);
    }
}
