// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VMM's vm-memory guest memory: adopted as it is (every region a RAM block sharing its
//! mapping, its `DirtyBitmap` attached), and a vm-memory view of a memory system's RAM.

use std::sync::Arc;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::topology::Source;
use super::{check_layout_fixed, check_page_aligned, MemorySystem};
use crate::region::{Mapping, RegionKind};
use crate::{DirtyBitmap, Error, RamBlock, RegionId, Result};

impl MemorySystem {
    /// Adopt a VMM's vm-memory guest memory as it is: every region becomes a RAM block that
    /// shares the region's mapping (`GuestRegionMmap::get_mmap`), mapped at the region's guest
    /// address (priority 0), and the region's [`DirtyBitmap`] is attached to this memory system.
    /// The VMM's devices keep writing through their own `GuestMemoryMmap`: those writes are
    /// tracked like [`RamBlock::write`]s from now on (writes made before adoption are not).
    ///
    /// Blocks are named after their guest address: `ram@0x100000000` (`format!("ram@{addr:#x}")`).
    /// Returns the new regions, in the order of `memory`'s regions.
    ///
    /// # Errors
    ///
    /// [`Error::MigrationInProgress`] while global logging is on (nothing is adopted),
    /// [`Error::AlreadyAttached`] if a region is already attached to a memory system (this one or
    /// another), [`Error::NotPageAligned`], [`Error::ZeroSize`], and the errors of
    /// [`add_ram`](Self::add_ram) (e.g. [`Error::Overlap`], [`Error::DuplicateName`]). On an error
    /// nothing is adopted: regions already added by this call are removed again.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyBitmap, DirtyClient, Error, MemorySystem};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[
    ///     (GuestAddress(0), 0x10_0000),
    ///     (GuestAddress(0x1_0000_0000), 0x10_0000),
    /// ])
    /// .unwrap();
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_guest_memory(&gm).unwrap();
    /// let names: Vec<String> = mem.ram_blocks().iter().map(|b| b.name().to_owned()).collect();
    /// assert_eq!(names, ["ram@0x0", "ram@0x100000000"]);
    ///
    /// mem.log_global_start().unwrap();
    /// gm.write_slice(b"virtio", GuestAddress(0x1_0000_2000)).unwrap();
    /// let block = &mem.ram_blocks()[1];
    /// let dirty = mem.dirty().client(DirtyClient::Migration);
    /// assert!(dirty.test(block.ram_page_offset() as usize + 2));
    ///
    /// // A region belongs to one memory system at a time.
    /// let other = MemorySystem::with_ram_capacity(1 << 24);
    /// assert!(matches!(other.add_guest_memory(&gm), Err(Error::AlreadyAttached { .. })));
    /// ```
    pub fn add_guest_memory(&self, memory: &GuestMemoryMmap<DirtyBitmap>) -> Result<Vec<RegionId>> {
        for region in memory.iter() {
            let guest_addr = region.start_addr().0;
            check_page_aligned("guest address", guest_addr)?;
            check_page_aligned("vm-memory region size", region.len())?;
            if region.len() == 0 {
                return Err(Error::ZeroSize {
                    what: "vm-memory region",
                });
            }
            if region.get_mmap().bitmap().is_attached() {
                return Err(Error::AlreadyAttached {
                    guest_addr: Some(guest_addr),
                });
            }
        }
        // One topology lock for the whole adoption: a migration cannot start half-way.
        let mut st = self.write();
        check_layout_fixed(&st, "add a RAM block")?;
        let mut added = Vec::new();
        for region in memory.iter() {
            let guest_addr = region.start_addr().0;
            let result = self.add_ram_locked(
                &mut st,
                &format!("ram@{guest_addr:#x}"),
                region.len(),
                Some(Mapping {
                    guest_addr,
                    priority: 0,
                }),
                Source::Mmap(region.get_mmap(), guest_addr),
            );
            match result {
                Ok(id) => added.push(id),
                Err(e) => {
                    for id in added.into_iter().rev() {
                        self.remove_locked(&mut st, id).ok();
                    }
                    return Err(e);
                }
            }
        }
        Ok(added)
    }

    /// A vm-memory view of the mapped RAM regions, for a VMM that starts from this memory system:
    /// one `GuestRegionMmap` per RAM region mapped in the guest-physical address space, at its guest
    /// address, over the block's own mapping (writes through it are tracked like
    /// [`RamBlock::write`]s). Unmapped RAM regions and aliases are not in the view (a vm-memory
    /// region shows a whole mapping at one address). The view is a snapshot of the topology: call
    /// it again after adding or removing RAM.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemoryView`] if mapped RAM regions overlap (a higher-priority RAM region over
    /// another one): vm-memory regions cannot overlap.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, MemorySystem};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0x10_0000, 0x10_0000).unwrap();
    /// mem.log_global_start().unwrap();
    /// let gm = mem.guest_memory().unwrap();
    /// assert_eq!(gm.num_regions(), 1);
    /// gm.write_obj(7u64, GuestAddress(0x10_3000)).unwrap();
    /// let block = &mem.ram_blocks()[0];
    /// let mut buf = [0u8; 8];
    /// block.read(0x3000, &mut buf).unwrap();
    /// assert_eq!(u64::from_ne_bytes(buf), 7);
    /// assert!(mem.dirty().client(DirtyClient::Migration).test(3));
    /// ```
    pub fn guest_memory(&self) -> Result<GuestMemoryMmap<DirtyBitmap>> {
        let st = self.read();
        let mut mapped: Vec<(u64, Arc<RamBlock>)> = st
            .tree
            .iter()
            .filter_map(|(_, n)| match (&n.kind, n.mapping) {
                (RegionKind::Ram(block), Some(m)) => Some((m.guest_addr, block.clone())),
                _ => None,
            })
            .collect();
        drop(st);
        if mapped.is_empty() {
            return Ok(GuestMemoryMmap::new());
        }
        mapped.sort_by_key(|(addr, _)| *addr);
        let regions = mapped
            .into_iter()
            .map(|(addr, block)| {
                GuestRegionMmap::with_arc(block.mmap().clone(), GuestAddress(addr)).ok_or(
                    Error::AddressOverflow {
                        start: addr,
                        len: block.size(),
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        GuestMemoryMmap::from_regions(regions).map_err(Error::GuestMemoryView)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adoption_is_all_or_nothing_and_the_view_shows_mapped_ram() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("low", 0x10_0000, 1 << 20).unwrap();
        // The second region overlaps the RAM mapped above: nothing of this memory is adopted.
        let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x10_0000), 1 << 20),
        ])
        .unwrap();
        mem.add_guest_memory(&gm).unwrap_err();
        assert_eq!(mem.ram_blocks().len(), 1);
        assert!(gm.iter().all(|r| !r.get_mmap().bitmap().is_attached()));
        let view = mem.guest_memory().unwrap();
        assert_eq!(view.num_regions(), 1);
        assert_eq!(
            view.iter().next().unwrap().start_addr(),
            GuestAddress(0x10_0000)
        );
    }
}
