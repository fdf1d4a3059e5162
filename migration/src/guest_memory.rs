// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A vm-memory VMM's `GuestMemoryMmap`, as it is, as the engine's memory (feature `vm-memory`, on
//! by default): every region is a [`GuestMemoryBlock`], named after its guest address
//! (`ram@0x100000000`, as `clearlog-memory` names the regions it adopts, so either side of a
//! migration may use either).
//!
//! It gives [`MigrationMemory`]: all a destination needs. A source adds [`DirtyTracking`]
//! (`crate::DirtyTracking`) over its accelerator and its own writes; `examples/ch_shaped.rs` does
//! it for KVM memslots the VMM keeps, with `clearlog-kvm`'s `VmmSlotCache`.

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::{HostMapping, MemoryResult, MigrationBlock, MigrationMemory};

/// Region `index` of a [`GuestMemoryMmap`], as a migration block.
///
/// Reads and writes go through vm-memory (`Bytes`); a write marks the region's own vm-memory
/// bitmap, like any write of the VMM's (on a destination, where the engine writes, nothing
/// tracks it).
///
/// # Examples
///
/// ```
/// use clearlog_migration::{MigrationBlock, MigrationMemory};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[
///     (GuestAddress(0), 1 << 20),
///     (GuestAddress(1 << 32), 2 << 20),
/// ])
/// .unwrap();
/// let blocks = mem.blocks();
/// assert_eq!((blocks[1].name(), blocks[1].index(), blocks[1].pages()), ("ram@0x100000000", 1, 512));
/// blocks[1].write_untracked(0x3000, b"data").unwrap();
/// let mut buf = [0u8; 4];
/// blocks[1].read(0x3000, &mut buf).unwrap();
/// assert_eq!(&buf, b"data");
/// ```
#[derive(Debug, Clone)]
pub struct GuestMemoryBlock<B: Bitmap + 'static> {
    mem: GuestMemoryMmap<B>,
    index: usize,
    start: u64,
    size: u64,
    name: String,
}

impl<B: Bitmap + 'static> GuestMemoryBlock<B> {
    /// The region's index in the `GuestMemoryMmap` (its order by guest address).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The region's guest address.
    pub fn start(&self) -> u64 {
        self.start
    }

    fn addr(&self, offset: u64, len: usize) -> MemoryResult<GuestAddress> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(GuestAddress(self.start + offset)),
            _ => Err(format!(
                "{len} bytes at {offset:#x} are past the end of {}",
                self.name
            )
            .into()),
        }
    }
}

impl<B: Bitmap + Send + Sync + 'static> MigrationBlock for GuestMemoryBlock<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
        Ok(self.mem.read_slice(buf, self.addr(offset, buf.len())?)?)
    }
    fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
        Ok(self.mem.write_slice(data, self.addr(offset, data.len())?)?)
    }
    /// The region's mapping; shared when the region is file-backed (a private file mapping is
    /// refused by userfaultfd when a postcopy registers it, before anything is committed).
    fn host_mapping(&self) -> Option<HostMapping> {
        let region = self.mem.find_region(GuestAddress(self.start))?;
        let addr = region.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
        let shared = region.file_offset().is_some();
        // SAFETY: the region's own mapping, which the `GuestMemoryMmap` this block holds keeps
        // mapped, and which holds guest RAM only.
        Some(unsafe { HostMapping::new(addr, self.size, shared) })
    }
}

/// Every region, in guest-address order.
impl<B: Bitmap + Send + Sync + 'static> MigrationMemory for GuestMemoryMmap<B> {
    type Block = Arc<GuestMemoryBlock<B>>;
    fn blocks(&self) -> Vec<Self::Block> {
        self.iter()
            .enumerate()
            .map(|(index, region)| {
                let start = region.start_addr().0;
                Arc::new(GuestMemoryBlock {
                    mem: self.clone(),
                    index,
                    start,
                    size: region.len(),
                    name: format!("ram@{start:#x}"),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_past_a_block_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8192)]).unwrap();
        let b = mem.blocks().remove(0);
        assert!(b.read(4096, &mut [0; 4097]).is_err());
        assert!(b.write_untracked(u64::MAX, &[1]).is_err());
        b.write_untracked(8191, &[1]).unwrap();
    }
}
