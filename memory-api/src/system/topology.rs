// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The topology: RAM blocks placed in the RAM address space, RAM regions and aliases mapped in the
//! guest-physical address space, and their removal. Every change re-flattens the sections and
//! tells the listeners (`listeners::update_topology`).

use std::sync::Arc;

use vm_memory::MmapRegion;

use super::{check_layout_fixed, check_page_aligned, check_range, BlockEntry, MemorySystem, State};
use crate::region::{Mapping, RegionKind, RegionNode};
use crate::{
    DirtyBitmap, DirtyClient, DirtyClients, DirtyMemory, Error, RamBacking, RamBlock, RamBlockId,
    RegionId, Result, PAGE_SHIFT,
};

/// Where a new RAM block's host memory comes from.
pub(super) enum Source<'a> {
    /// Map new memory.
    Backing(&'a RamBacking),
    /// Share an existing vm-memory mapping (adoption), shown at this guest address.
    Mmap(Arc<MmapRegion<DirtyBitmap>>, u64),
}

impl State {
    /// Place a block of `pages` pages in the RAM address space: first fit at a 64-page boundary.
    fn alloc_block(
        &mut self,
        name: &str,
        size: u64,
        dirty: &Arc<DirtyMemory>,
        source: Source<'_>,
    ) -> Result<Arc<RamBlock>> {
        if self.blocks.iter().any(|e| e.block.name() == name) {
            return Err(Error::DuplicateName(name.to_owned()));
        }
        let pages = size >> PAGE_SHIFT;
        let mut cursor = 0u64;
        let mut index = self.blocks.len();
        for (i, e) in self.blocks.iter().enumerate() {
            if cursor + pages <= e.block.ram_page_offset() {
                index = i;
                break;
            }
            cursor = (e.block.ram_page_offset() + e.block.pages()).next_multiple_of(64);
        }
        let capacity = dirty.capacity_pages();
        if cursor.checked_add(pages).is_none_or(|end| end > capacity) {
            return Err(Error::RamSpaceExhausted {
                requested_pages: pages,
                capacity_pages: capacity,
            });
        }
        let id = RamBlockId::new(self.next_block_id);
        let block = Arc::new(match source {
            Source::Backing(backing) => {
                RamBlock::with_backing(id, name, size, cursor, dirty.clone(), backing)?
            }
            Source::Mmap(mmap, guest_addr) => RamBlock::new(
                id,
                name,
                mmap,
                cursor,
                dirty.clone(),
                false,
                Some(guest_addr),
            )?,
        });
        self.next_block_id += 1;
        // The region id is filled in by the caller right after inserting the region.
        self.blocks.insert(
            index,
            BlockEntry {
                block: block.clone(),
                region: RegionId::new(u32::MAX),
            },
        );
        Ok(block)
    }
}

impl MemorySystem {
    /// Allocate a RAM block of `size` bytes and map it at `guest_addr` as a region. Both page-aligned;
    /// overlapping another RAM region of the same priority is an error.
    ///
    /// The region is mapped at priority 0. Listeners see `region_add` for its sections.
    ///
    /// # Errors
    ///
    /// [`Error::MigrationInProgress`] while global logging is on (the RAM layout is fixed during a
    /// migration, see the crate docs), [`Error::NotPageAligned`], [`Error::ZeroSize`],
    /// [`Error::AddressOverflow`], [`Error::Overlap`], [`Error::DuplicateName`],
    /// [`Error::RamSpaceExhausted`], [`Error::Mmap`]; [`Error::Listener`] if a listener rejects the
    /// new sections (the region is then removed again). Nothing changes on an error.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{Error, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10_0000).unwrap();
    /// assert!(matches!(mem.add_ram("other", 0xf_f000, 0x2000), Err(Error::Overlap { .. })));
    /// ```
    pub fn add_ram(&self, name: &str, guest_addr: u64, size: u64) -> Result<RegionId> {
        self.add_ram_backed(name, guest_addr, size, RamBacking::Anonymous)
    }

    /// [`add_ram`](Self::add_ram) with the host memory of `backing`: anonymous, a memfd this
    /// crate creates, or the caller's file at an offset (see [`RamBacking`]).
    ///
    /// # Errors
    ///
    /// As [`add_ram`](Self::add_ram), and the backing's: [`Error::Memfd`],
    /// [`Error::HugePagesUnavailable`] (the host has no free huge pages), [`Error::NotHugePageAligned`],
    /// [`Error::BackingFile`], [`Error::BackingNotRegularFile`], [`Error::BackingPastEof`],
    /// [`Error::NotPageAligned`] (file offset), [`Error::Mmap`] (e.g. a file not opened read-write).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use clearlog_memory::{Error, MemorySystem, RamBacking};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let file = tempfile_of(1 << 20);
    /// let backing = RamBacking::File { file: Arc::new(file), offset: 0x8_0000 };
    /// mem.add_ram_backed("ram", 0, 0x8_0000, backing.clone()).unwrap();
    /// let err = mem.add_ram_backed("more", 0x10_0000, 0x10_0000, backing).unwrap_err();
    /// assert!(matches!(err, Error::BackingPastEof { .. }));
    /// # fn tempfile_of(len: u64) -> std::fs::File {
    /// #     let path = std::env::temp_dir().join(format!("clearlog-doc-{}", std::process::id()));
    /// #     let f = std::fs::OpenOptions::new().read(true).write(true).create(true).open(&path).unwrap();
    /// #     std::fs::remove_file(&path).unwrap();
    /// #     f.set_len(len).unwrap();
    /// #     f
    /// # }
    /// ```
    pub fn add_ram_backed(
        &self,
        name: &str,
        guest_addr: u64,
        size: u64,
        backing: RamBacking,
    ) -> Result<RegionId> {
        self.add_ram_region(
            name,
            size,
            Some(Mapping {
                guest_addr,
                priority: 0,
            }),
            Source::Backing(&backing),
        )
    }

    /// Allocate a RAM block of `size` bytes as a region that is not mapped yet: map it with
    /// [`map_region`](Self::map_region), or show parts of it with [`add_alias`](Self::add_alias).
    ///
    /// # Errors
    ///
    /// As [`add_ram`](Self::add_ram), without the overlap check.
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.create_ram("pc.ram", 0x10_0000).unwrap();
    /// assert!(mem.sections().is_empty());
    /// mem.map_region(ram, 0, 0).unwrap();
    /// assert_eq!(mem.sections().len(), 1);
    /// ```
    pub fn create_ram(&self, name: &str, size: u64) -> Result<RegionId> {
        self.create_ram_backed(name, size, RamBacking::Anonymous)
    }

    /// [`create_ram`](Self::create_ram) with the host memory of `backing`.
    ///
    /// # Errors
    ///
    /// As [`add_ram_backed`](Self::add_ram_backed), without the overlap check.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{MemorySystem, RamBacking};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.create_ram_backed("pc.ram", 0x10_0000, RamBacking::Memfd { hugetlb: false }).unwrap();
    /// mem.map_region(ram, 0, 0).unwrap();
    /// assert!(mem.ram_blocks()[0].file_offset().is_some());
    /// ```
    pub fn create_ram_backed(
        &self,
        name: &str,
        size: u64,
        backing: RamBacking,
    ) -> Result<RegionId> {
        self.add_ram_region(name, size, None, Source::Backing(&backing))
    }

    fn add_ram_region(
        &self,
        name: &str,
        size: u64,
        mapping: Option<Mapping>,
        source: Source<'_>,
    ) -> Result<RegionId> {
        let mut st = self.write();
        check_layout_fixed(&st, "add a RAM block")?;
        self.add_ram_locked(&mut st, name, size, mapping, source)
    }

    pub(super) fn add_ram_locked(
        &self,
        st: &mut State,
        name: &str,
        size: u64,
        mapping: Option<Mapping>,
        source: Source<'_>,
    ) -> Result<RegionId> {
        check_page_aligned("RAM size", size)?;
        if size == 0 {
            return Err(Error::ZeroSize { what: "RAM region" });
        }
        if let Some(m) = mapping {
            check_page_aligned("guest address", m.guest_addr)?;
            st.tree
                .check_overlap(name, m.guest_addr, size, m.priority, None)?;
        }
        let block = st.alloc_block(name, size, &self.dirty, source)?;
        let id = st.tree.insert(RegionNode {
            name: name.to_owned(),
            size,
            kind: RegionKind::Ram(block.clone()),
            mapping,
            log: DirtyClients::NONE,
            readonly: false,
        });
        if let Some(e) = st.blocks.iter_mut().find(|e| Arc::ptr_eq(&e.block, &block)) {
            e.region = id;
        }
        if let Err(e) = st.update_topology(&self.dirty) {
            self.remove_locked(st, id).ok();
            return Err(e);
        }
        tracing::debug!(
            name,
            size,
            ram_page_offset = block.ram_page_offset(),
            "RAM block added"
        );
        Ok(id)
    }

    /// Show `[offset, offset + size)` of RAM region `target` at `guest_addr`, with `priority`.
    /// The alias's sections are backed by the target's block; logging set on the target applies to
    /// them too. Allowed during a migration (an alias adds no RAM block).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRegion`], [`Error::NotRam`] (the target is an alias), [`Error::OutOfRange`]
    /// (window past the target's end), and the mapping errors of [`add_ram`](Self::add_ram).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 30);
    /// let ram = mem.create_ram("pc.ram", 0x30_0000).unwrap();
    /// mem.add_alias("below-hole", ram, 0, 0x20_0000, 0, 0).unwrap();
    /// mem.add_alias("above-hole", ram, 0x20_0000, 0x10_0000, 0x1_0000_0000, 0).unwrap();
    /// let offsets: Vec<u64> = mem.sections().iter().map(|s| s.offset_in_block).collect();
    /// assert_eq!(offsets, [0, 0x20_0000]);
    /// ```
    pub fn add_alias(
        &self,
        name: &str,
        target: RegionId,
        offset: u64,
        size: u64,
        guest_addr: u64,
        priority: i32,
    ) -> Result<RegionId> {
        check_page_aligned("alias offset", offset)?;
        check_page_aligned("alias size", size)?;
        check_page_aligned("guest address", guest_addr)?;
        if size == 0 {
            return Err(Error::ZeroSize { what: "alias" });
        }
        let mut st = self.write();
        let target_node = st.tree.get(target)?;
        if !matches!(target_node.kind, RegionKind::Ram(_)) {
            return Err(Error::NotRam(target));
        }
        check_range("alias target", offset, size, target_node.size)?;
        st.tree
            .check_overlap(name, guest_addr, size, priority, None)?;
        let id = st.tree.insert(RegionNode {
            name: name.to_owned(),
            size,
            kind: RegionKind::Alias { target, offset },
            mapping: Some(Mapping {
                guest_addr,
                priority,
            }),
            log: DirtyClients::NONE,
            readonly: false,
        });
        if let Err(e) = st.update_topology(&self.dirty) {
            self.remove_locked(&mut st, id).ok();
            return Err(e);
        }
        Ok(id)
    }

    /// Map an unmapped region at `guest_addr` with `priority` (higher priorities hide lower ones where
    /// they overlap; equal priorities must not overlap).
    ///
    /// Allowed during a migration: a remap keeps the RAM layout (the blocks) and the accelerator
    /// follows it (`region_add` with logging already on).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRegion`], [`Error::AlreadyMapped`], [`Error::NotPageAligned`],
    /// [`Error::AddressOverflow`], [`Error::Overlap`]; [`Error::Listener`] (the region is unmapped
    /// again).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10_0000).unwrap();
    /// let rom = mem.create_ram("rom", 0x1000).unwrap();
    /// mem.map_region(rom, 0x8000, 1).unwrap(); // punches a hole into "ram"
    /// assert_eq!(mem.sections().len(), 3);
    /// ```
    pub fn map_region(&self, region: RegionId, guest_addr: u64, priority: i32) -> Result<()> {
        check_page_aligned("guest address", guest_addr)?;
        let mut st = self.write();
        let node = st.tree.get(region)?;
        if node.mapping.is_some() {
            return Err(Error::AlreadyMapped(region));
        }
        let (name, size) = (node.name.clone(), node.size);
        st.tree
            .check_overlap(&name, guest_addr, size, priority, Some(region))?;
        st.tree.get_mut(region)?.mapping = Some(Mapping {
            guest_addr,
            priority,
        });
        if let Err(e) = st.update_topology(&self.dirty) {
            st.tree.get_mut(region)?.mapping = None;
            st.update_topology(&self.dirty).ok();
            return Err(e);
        }
        Ok(())
    }

    /// Unmap a region (it keeps its RAM block and can be mapped again).
    ///
    /// Allowed during a migration: the block stays in the RAM layout, listeners sync the section one
    /// last time in `region_del`, and the migration keeps sending the block.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRegion`], [`Error::NotMapped`], [`Error::Listener`] (the region is unmapped
    /// anyway; if a listener's last sync of a logging section failed, the section's pages are marked
    /// dirty for the clients that were logging it, see [`MemoryListener::region_del`](crate::MemoryListener::region_del)).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.add_ram("ram", 0, 0x10_0000).unwrap();
    /// mem.unmap_region(ram).unwrap();
    /// assert!(mem.sections().is_empty());
    /// assert!(mem.unmap_region(ram).is_err());
    /// ```
    pub fn unmap_region(&self, region: RegionId) -> Result<()> {
        let mut st = self.write();
        let node = st.tree.get_mut(region)?;
        if node.mapping.take().is_none() {
            return Err(Error::NotMapped(region));
        }
        st.update_topology(&self.dirty)
    }

    /// Remove a region (listeners see `region_del` for each of its sections first).
    ///
    /// Removing a RAM region frees its block (host memory is unmapped once no section refers to it)
    /// and clears the block's bits in every client. Removing an alias leaves the block and its bits.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRegion`], [`Error::MigrationInProgress`] (a RAM region while global logging
    /// is on: its block is part of the migration's layout; unmap it instead, or stop or finish the
    /// migration first; aliases may be removed), [`Error::RegionInUse`] (an alias targets it),
    /// [`Error::Listener`] (the region is removed anyway).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.add_ram("ram", 0, 0x10_0000).unwrap();
    /// mem.remove_region(ram).unwrap();
    /// assert!(mem.ram_blocks().is_empty());
    /// assert!(mem.remove_region(ram).is_err());
    /// ```
    pub fn remove_region(&self, region: RegionId) -> Result<()> {
        let mut st = self.write();
        if matches!(st.tree.get(region)?.kind, RegionKind::Ram(_)) {
            check_layout_fixed(&st, "remove a RAM region")?;
        }
        self.remove_locked(&mut st, region)
    }

    pub(super) fn remove_locked(&self, st: &mut State, region: RegionId) -> Result<()> {
        st.tree.get(region)?;
        if let Some(alias) = st.tree.alias_of(region) {
            return Err(Error::RegionInUse { region, alias });
        }
        let node = st.tree.remove(region).ok_or(Error::UnknownRegion(region))?;
        let result = st.update_topology(&self.dirty);
        if let RegionKind::Ram(block) = node.kind {
            st.blocks.retain(|e| !Arc::ptr_eq(&e.block, &block));
            st.reindex();
            // Writes through a vm-memory view that outlives the block mark nothing from now on
            // (and the region may join a memory system again).
            block.mmap().bitmap().detach();
            // A later block placed here must not inherit these bits.
            for client in DirtyClient::ALL {
                self.dirty
                    .client(client)
                    .clear_range(block.ram_page_offset() as usize, block.pages() as usize);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::recorder::Recorder;
    use super::*;

    #[test]
    fn blocks_go_first_fit_on_64_page_boundaries() {
        let mem = MemorySystem::with_ram_capacity(1 << 26);
        let a = mem.add_ram("a", 0, 10 << 12).unwrap(); // 10 pages: 0..10, next at 64
        mem.add_ram("b", 1 << 20, 64 << 12).unwrap(); // 64..128
        let offsets = |mem: &MemorySystem| {
            mem.ram_blocks()
                .iter()
                .map(|b| (b.name().to_owned(), b.ram_page_offset()))
                .collect::<Vec<_>>()
        };
        assert_eq!(offsets(&mem), [("a".into(), 0), ("b".into(), 64)]);
        mem.remove_region(a).unwrap();
        mem.add_ram("c", 2 << 20, 64 << 12).unwrap(); // fits the hole at 0
        assert_eq!(offsets(&mem), [("c".into(), 0), ("b".into(), 64)]);
        assert!(matches!(
            mem.add_ram("b", 3 << 20, 4096),
            Err(Error::DuplicateName(_))
        ));
    }

    #[test]
    fn a_region_a_listener_refuses_is_not_added() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        let r = std::sync::Arc::new(Recorder::new("r", 0).refusing("region_add"));
        mem.register_listener(r.clone()).unwrap();
        assert!(matches!(
            mem.add_ram("ram", 0, 1 << 20),
            Err(Error::Listener {
                hook: "region_add",
                ..
            })
        ));
        assert!(mem.ram_blocks().is_empty() && mem.sections().is_empty());
        assert_eq!(r.calls(), ["r:region_add@0x0", "r:region_del@0x0"]);
    }

    #[test]
    fn an_alias_keeps_its_target_until_it_goes() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        let ram = mem.create_ram("ram", 1 << 20).unwrap();
        let alias = mem
            .add_alias("hi", ram, 0x1000, 0x2000, 1 << 32, 0)
            .unwrap();
        assert!(matches!(
            mem.remove_region(ram),
            Err(Error::RegionInUse { .. })
        ));
        assert!(matches!(
            mem.add_alias("x", alias, 0, 0x1000, 0, 0),
            Err(Error::NotRam(_))
        ));
        mem.remove_region(alias).unwrap();
        mem.remove_region(ram).unwrap();
    }
}
