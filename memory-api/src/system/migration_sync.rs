// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A migration's sync of one RAM block: the Migration client's bits into the caller's bitmap
//! (`clearlog-bitmap`'s [`AtomicBitmap::take_into`](clearlog_bitmap::AtomicBitmap::take_into)),
//! the chunks that received bits marked for a re-arm before their read.

use std::sync::Arc;

use clearlog_bitmap::Bitmap;

use super::MemorySystem;
use crate::{ClearBitmap, DirtyClient, Error, RamBlock, Result};

impl MemorySystem {
    /// Migration sync of one block: take the block's Migration-client bits, OR them into `dest`
    /// (one bit per page of the block), return how many were not already set in `dest`; when `clear`
    /// is given, set its chunk bit for every chunk that received a bit.
    ///
    /// Word-wise: zero words cost one load, others one atomic exchange, an OR and a popcount. It does
    /// not take the topology lock.
    ///
    /// # Panics
    ///
    /// Panics where [`try_sync_migration_bitmap`](Self::try_sync_migration_bitmap) returns an error
    /// (a bitmap too small for the block, a block of another memory system).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    /// use clearlog_memory::{ClearBitmap, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x100_000).unwrap(); // 256 pages
    /// mem.log_global_start().unwrap();
    /// let block = mem.ram_blocks()[0].clone();
    /// block.write(0x1000, &[1]).unwrap(); // page 1
    /// block.write(0x80_000, &[1]).unwrap(); // page 128
    /// let mut dest = Bitmap::new(256);
    /// dest.set(1); // already known dirty
    /// let mut clear = ClearBitmap::new(256, 6).unwrap();
    /// assert_eq!(mem.sync_migration_bitmap(&block, &mut dest, Some(&mut clear)), 1);
    /// assert_eq!(dest.iter_ones().collect::<Vec<_>>(), [1, 128]);
    /// assert!(clear.test(0) && clear.test(2) && !clear.test(1));
    /// ```
    #[track_caller]
    pub fn sync_migration_bitmap(
        &self,
        block: &RamBlock,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> u64 {
        match self.try_sync_migration_bitmap(block, dest, clear) {
            Ok(n) => n,
            Err(e) => panic!("sync_migration_bitmap: {e}"),
        }
    }

    /// Fallible version of [`sync_migration_bitmap`](Self::sync_migration_bitmap).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownBlock`] if `block` belongs to another memory system; [`Error::BitmapTooSmall`]
    /// if `dest` has fewer bits than the block has pages or `clear` fewer chunks than the block.
    /// Nothing is taken then.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    /// use clearlog_memory::{Error, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x100_000).unwrap();
    /// let block = mem.ram_blocks()[0].clone();
    /// let r = mem.try_sync_migration_bitmap(&block, &mut Bitmap::new(10), None);
    /// assert!(matches!(r, Err(Error::BitmapTooSmall { .. })));
    /// ```
    pub fn try_sync_migration_bitmap(
        &self,
        block: &RamBlock,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> Result<u64> {
        if !Arc::ptr_eq(block.dirty_memory(), &self.dirty) {
            return Err(Error::UnknownBlock(block.id()));
        }
        let pages = block.pages();
        if (dest.len() as u64) < pages {
            return Err(Error::BitmapTooSmall {
                what: "migration bitmap",
                need: pages,
                have: dest.len() as u64,
            });
        }
        if let Some(c) = clear.as_deref() {
            let need = pages.div_ceil(1u64 << c.shift());
            if c.chunk_count() < need {
                return Err(Error::BitmapTooSmall {
                    what: "clear bitmap",
                    need,
                    have: c.chunk_count(),
                });
            }
        }
        // Blocks start on a 64-page boundary: block word i is map word first + i.
        let first = (block.ram_page_offset() / 64) as usize;
        Ok(self.dirty.client(DirtyClient::Migration).take_into(
            first,
            pages as usize,
            dest,
            clear,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_takes_once_counts_new_bits_and_refuses_foreign_blocks() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("a", 0, 1 << 20).unwrap();
        mem.add_ram("b", 1 << 20, 65 << 12).unwrap(); // 65 pages: a partial last word
        mem.log_global_start().unwrap();
        let b = mem.ram_blocks().remove(1);
        b.write(64 << 12, &[1]).unwrap();
        let mut dest = Bitmap::new(65);
        let mut clear = ClearBitmap::new(65, 6).unwrap();
        assert_eq!(
            mem.try_sync_migration_bitmap(&b, &mut dest, Some(&mut clear))
                .unwrap(),
            1
        );
        assert!(dest.test(64) && clear.test(1) && !clear.test(0));
        assert_eq!(
            mem.try_sync_migration_bitmap(&b, &mut dest, None).unwrap(),
            0
        );
        let other = MemorySystem::with_ram_capacity(1 << 24);
        other.add_ram("b", 0, 65 << 12).unwrap();
        let theirs = other.ram_blocks().remove(0);
        assert!(matches!(
            mem.try_sync_migration_bitmap(&theirs, &mut dest, None),
            Err(Error::UnknownBlock(_))
        ));
        let mut small = ClearBitmap::new(64, 6).unwrap();
        assert!(matches!(
            mem.try_sync_migration_bitmap(&b, &mut dest, Some(&mut small)),
            Err(Error::BitmapTooSmall {
                what: "clear bitmap",
                ..
            })
        ));
    }
}
