// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The engine's traits for `clearlog-memory` (feature `clearlog-memory`, on by default): a
//! [`MemorySystem`] is a [`MigrationMemory`] with [`DirtyTracking`], its [`RamBlock`]s are
//! [`MigrationBlock`]s.

use std::sync::Arc;

use clearlog_bitmap::{Bitmap, ClearBitmap};
use clearlog_memory::{MemorySystem, RamBlock};

use crate::{DirtyTracking, HostMapping, MemoryResult, MigrationBlock, MigrationMemory};

impl MigrationBlock for RamBlock {
    fn name(&self) -> &str {
        RamBlock::name(self)
    }
    fn size(&self) -> u64 {
        RamBlock::size(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
        Ok(RamBlock::read(self, offset, buf)?)
    }
    fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
        Ok(RamBlock::write_untracked(self, offset, data)?)
    }
    fn populated(
        &self,
        first_page: u64,
        npages: u64,
        out: &mut Vec<std::ops::Range<u64>>,
    ) -> MemoryResult<()> {
        match self.populated_pages(first_page, npages, out) {
            Ok(()) => Ok(()),
            // The kernel could not tell: every page may hold data (correct, only slower).
            Err(clearlog_memory::Error::PopulatedScan { .. }) => {
                crate::memory::all_populated(first_page, npages, out);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
    fn nonzero_pages(&self, first_page: u64, npages: u64, out: &mut Vec<u64>) -> MemoryResult<()> {
        Ok(RamBlock::nonzero_pages(self, first_page, npages, out)?)
    }
    /// None on hugetlbfs: its pages are placed 2 MiB at a time, which postcopy does not do.
    fn host_mapping(&self) -> Option<HostMapping> {
        if self.is_hugetlbfs() {
            return None;
        }
        // SAFETY: the block's own mapping, which lives as long as the block and holds its guest
        // RAM only; a file-backed block is mapped shared (`RamBacking`'s memfds and files).
        Some(unsafe {
            HostMapping::new(
                self.host_addr(),
                RamBlock::size(self),
                self.file_offset().is_some(),
            )
        })
    }
}

impl MigrationMemory for MemorySystem {
    type Block = Arc<RamBlock>;
    fn blocks(&self) -> Vec<Arc<RamBlock>> {
        self.ram_blocks()
    }
}

/// Logging is the memory system's global logging (the Migration client); a sync is every
/// listener's `log_sync`; a block's bits are the Migration client's; a clear goes through every
/// listener's `log_clear`, which clears only what the accelerator saw (docs/design.md section 2).
impl DirtyTracking for MemorySystem {
    fn start_logging(&self) -> MemoryResult<()> {
        Ok(self.log_global_start()?)
    }
    fn stop_logging(&self) -> MemoryResult<()> {
        Ok(self.log_global_stop()?)
    }
    fn sync_dirty(&self) -> MemoryResult<()> {
        Ok(self.log_sync_all()?)
    }
    fn take_dirty(
        &self,
        block: &Arc<RamBlock>,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> MemoryResult<u64> {
        Ok(self.try_sync_migration_bitmap(block, dest, clear)?)
    }
    fn clear_dirty(&self, block: &Arc<RamBlock>, offset: u64, len: u64) -> MemoryResult<()> {
        Ok(self.clear_dirty_bitmap_block(block, offset, len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_system_migrates_through_the_traits() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 0x10_0000).unwrap();
        let block = MigrationMemory::blocks(&mem).remove(0);
        assert_eq!(
            (MigrationBlock::name(&block), MigrationBlock::pages(&block)),
            ("ram", 256)
        );
        mem.start_logging().unwrap();
        block.write(0x3000, &[1]).unwrap();
        mem.sync_dirty().unwrap();
        let mut dest = Bitmap::new(256);
        let mut clear = ClearBitmap::new(256, 6).unwrap();
        assert_eq!(
            mem.take_dirty(&block, &mut dest, Some(&mut clear)).unwrap(),
            1
        );
        assert!(dest.test(3) && clear.test(0));
        assert_eq!(
            mem.clear_chunks_before_send(&block, &mut clear, 3, 4)
                .unwrap(),
            1
        );
        assert_eq!(
            mem.clear_chunks_before_send(&block, &mut clear, 3, 4)
                .unwrap(),
            0
        );
        mem.stop_logging().unwrap();
    }
}
