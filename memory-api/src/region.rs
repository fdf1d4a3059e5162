// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The region tree and its flattened sections.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::ids::{DirtyClients, RamBlockId, RegionId};
use crate::{Error, RamBlock, Result};

/// A flattened, contiguous piece of guest-physical address space backed by one RAM block.
///
/// The region tree is a root container (the guest-physical address space) whose subregions are RAM regions
/// (each backed by one [`RamBlock`]) and aliases (a window into a RAM region shown at another
/// address, like a PC's RAM split below and above the 4 GiB hole). Each mapped subregion has a
/// priority: where mapped regions overlap, the higher priority is visible; overlapping regions of
/// equal priority are an error. Flattening the tree yields [`Section`]s: maximal pieces of visible
/// guest-physical space, each backed by one contiguous range of one RAM block. Sections are what an
/// accelerator registers (one KVM memslot each).
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0x10_0000, 0x8000).unwrap();
/// let section = &mem.sections()[0];
/// assert_eq!((section.guest_addr, section.size, section.pages()), (0x10_0000, 0x8000, 8));
/// assert_eq!(section.host_addr(), section.block.host_addr());
/// assert_eq!(section.ram_first_page(), 0);
/// assert!(section.log.is_empty());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Section {
    /// The region this section shows (for an alias: the alias region).
    pub region: RegionId,
    /// Offset of the section's start inside `region`, in bytes.
    pub offset_in_region: u64,
    /// Guest-physical address of the section's first byte.
    pub guest_addr: u64,
    /// Size in bytes (a page multiple).
    pub size: u64,
    /// The backing RAM block.
    pub block: Arc<RamBlock>,
    /// Offset of the section's start inside `block`, in bytes (a page multiple).
    pub offset_in_block: u64,
    /// Clients that have dirty logging on for this section.
    pub log: DirtyClients,
    /// Read-only mapping.
    pub readonly: bool,
}

impl Section {
    /// Host address of the section's first byte.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// # mem.add_ram("ram", 0, 0x8000).unwrap();
    /// let s = &mem.sections()[0];
    /// assert_eq!(s.host_addr(), s.block.host_addr() + s.offset_in_block);
    /// ```
    pub fn host_addr(&self) -> u64 {
        self.block.host_addr() + self.offset_in_block
    }

    /// Number of pages.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// # mem.add_ram("ram", 0, 0x8000).unwrap();
    /// assert_eq!(mem.sections()[0].pages(), 8);
    /// ```
    pub fn pages(&self) -> u64 {
        self.size >> crate::PAGE_SHIFT
    }

    /// First page of the section in the RAM address space.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.add_ram("ram", 0, 0x8000).unwrap();
    /// // Show pages 3.. of the block at 1 MiB as well.
    /// mem.add_alias("alias", ram, 0x3000, 0x2000, 0x10_0000, 0).unwrap();
    /// let alias = mem.sections().into_iter().find(|s| s.guest_addr == 0x10_0000).unwrap();
    /// assert_eq!(alias.ram_first_page(), 3);
    /// ```
    pub fn ram_first_page(&self) -> u64 {
        self.block.ram_page_offset() + (self.offset_in_block >> crate::PAGE_SHIFT)
    }

    /// The section's identity for topology diffs: everything but the logging state. Two sections with
    /// equal keys are the same memslot to an accelerator.
    pub(crate) fn key(&self) -> (u64, u64, RegionId, u64, RamBlockId, u64, bool) {
        (
            self.guest_addr,
            self.size,
            self.region,
            self.offset_in_region,
            self.block.id(),
            self.offset_in_block,
            self.readonly,
        )
    }
}

/// What a region shows.
#[derive(Debug)]
pub(crate) enum RegionKind {
    /// A whole RAM block.
    Ram(Arc<RamBlock>),
    /// A window `[offset, offset + size)` of a RAM region.
    Alias {
        /// The RAM region shown.
        target: RegionId,
        /// Offset of the window in the target, bytes.
        offset: u64,
    },
}

/// Where a region is mapped in the root container.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapping {
    pub(crate) guest_addr: u64,
    pub(crate) priority: i32,
}

/// One region of the tree.
#[derive(Debug)]
pub(crate) struct RegionNode {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) kind: RegionKind,
    pub(crate) mapping: Option<Mapping>,
    /// Per-region logging clients (Vga, Code); Migration comes from global logging.
    pub(crate) log: DirtyClients,
    pub(crate) readonly: bool,
}

/// The region tree: a root container with RAM and alias subregions.
#[derive(Debug, Default)]
pub(crate) struct RegionTree {
    regions: BTreeMap<RegionId, RegionNode>,
    next_id: u32,
}

impl RegionTree {
    /// Add a region (mapped or not; the caller checked overlaps).
    pub(crate) fn insert(&mut self, node: RegionNode) -> RegionId {
        let id = RegionId::new(self.next_id);
        self.next_id += 1;
        self.regions.insert(id, node);
        id
    }

    pub(crate) fn get(&self, id: RegionId) -> Result<&RegionNode> {
        self.regions.get(&id).ok_or(Error::UnknownRegion(id))
    }

    pub(crate) fn get_mut(&mut self, id: RegionId) -> Result<&mut RegionNode> {
        self.regions.get_mut(&id).ok_or(Error::UnknownRegion(id))
    }

    pub(crate) fn remove(&mut self, id: RegionId) -> Option<RegionNode> {
        self.regions.remove(&id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (RegionId, &RegionNode)> {
        self.regions.iter().map(|(id, node)| (*id, node))
    }

    /// An alias that targets `id`, if any (such a region cannot be removed).
    pub(crate) fn alias_of(&self, id: RegionId) -> Option<RegionId> {
        self.iter()
            .find(|(_, n)| matches!(n.kind, RegionKind::Alias { target, .. } if target == id))
            .map(|(a, _)| a)
    }

    /// Error if `[guest_addr, guest_addr + size)` overlaps a mapped region of the same priority
    /// (other than `except`).
    pub(crate) fn check_overlap(
        &self,
        name: &str,
        guest_addr: u64,
        size: u64,
        priority: i32,
        except: Option<RegionId>,
    ) -> Result<()> {
        let end = guest_addr.checked_add(size).ok_or(Error::AddressOverflow {
            start: guest_addr,
            len: size,
        })?;
        for (id, node) in self.iter() {
            let Some(m) = node.mapping else { continue };
            if Some(id) == except || m.priority != priority {
                continue;
            }
            if m.guest_addr < end && guest_addr < m.guest_addr + node.size {
                return Err(Error::Overlap {
                    name: name.to_owned(),
                    guest_addr,
                    size,
                    existing: id,
                });
            }
        }
        Ok(())
    }

    /// The RAM block a region shows and the offset of the region's first byte in it.
    pub(crate) fn resolve(&self, id: RegionId) -> Result<(Arc<RamBlock>, u64)> {
        match &self.get(id)?.kind {
            RegionKind::Ram(block) => Ok((block.clone(), 0)),
            RegionKind::Alias { target, offset } => {
                let (block, base) = self.resolve(*target)?;
                Ok((block, base + offset))
            }
        }
    }

    /// Logging clients of a region's sections: its own, its alias target's, and the clients that
    /// log all RAM (`global`: Migration while global logging is on, Snapshot while dirty epochs
    /// are open).
    pub(crate) fn log_of(&self, id: RegionId, global: DirtyClients) -> DirtyClients {
        let mut log = DirtyClients::NONE;
        let mut cur = Some(id);
        while let Some(node) = cur.and_then(|c| self.regions.get(&c)) {
            log = log.union(node.log);
            cur = match node.kind {
                RegionKind::Alias { target, .. } => Some(target),
                RegionKind::Ram(_) => None,
            };
        }
        log.union(global)
    }

    /// Clients that some region logs for (Migration and Snapshot excluded: they are global).
    pub(crate) fn region_logging_clients(&self) -> DirtyClients {
        self.iter()
            .fold(DirtyClients::NONE, |acc, (_, n)| acc.union(n.log))
    }

    /// Flatten the tree into sections sorted by guest address: higher priorities hide lower ones.
    pub(crate) fn flatten(&self, global: DirtyClients) -> Vec<Section> {
        let mut mapped: Vec<(RegionId, &RegionNode, Mapping)> = self
            .iter()
            .filter_map(|(id, n)| n.mapping.map(|m| (id, n, m)))
            .collect();
        // Highest priority first; equal priorities never overlap, so their order does not matter.
        mapped.sort_by_key(|(id, _, m)| (std::cmp::Reverse(m.priority), *id));
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        let mut sections = Vec::new();
        for (id, node, m) in mapped {
            let Ok((block, base)) = self.resolve(id) else {
                continue;
            };
            let log = self.log_of(id, global);
            let start = m.guest_addr;
            let end = start + node.size;
            let mut visible = Vec::new();
            let mut cur = start;
            for &(s, e) in &claimed {
                if e <= cur || s >= end {
                    continue;
                }
                if s > cur {
                    visible.push((cur, s));
                }
                cur = cur.max(e);
            }
            if cur < end {
                visible.push((cur, end));
            }
            for &(s, e) in &visible {
                sections.push(Section {
                    region: id,
                    offset_in_region: s - start,
                    guest_addr: s,
                    size: e - s,
                    block: block.clone(),
                    offset_in_block: base + (s - start),
                    log,
                    readonly: node.readonly,
                });
            }
            claimed.extend(visible);
            claimed.sort_unstable();
        }
        sections.sort_by_key(|s| s.guest_addr);
        sections
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DirtyClient, DirtyMemory, PAGE_SIZE};

    fn ram(tree: &mut RegionTree, pages: u64, at: Option<(u64, i32)>) -> RegionId {
        let dirty = Arc::new(DirtyMemory::new(1024));
        let block = Arc::new(
            RamBlock::with_backing(
                RamBlockId::new(tree.next_id),
                "r",
                pages * PAGE_SIZE,
                0,
                dirty,
                &crate::RamBacking::Anonymous,
            )
            .unwrap(),
        );
        tree.insert(RegionNode {
            name: "r".into(),
            size: pages * PAGE_SIZE,
            kind: RegionKind::Ram(block),
            mapping: at.map(|(a, p)| Mapping {
                guest_addr: a * PAGE_SIZE,
                priority: p,
            }),
            log: DirtyClients::NONE,
            readonly: false,
        })
    }

    fn layout(sections: &[Section]) -> Vec<(u64, u64, u32, u64)> {
        sections
            .iter()
            .map(|s| {
                (
                    s.guest_addr / PAGE_SIZE,
                    s.pages(),
                    s.region.get(),
                    s.offset_in_block / PAGE_SIZE,
                )
            })
            .collect()
    }

    #[test]
    #[cfg_attr(miri, ignore = "RamBlock::new calls madvise: unsupported by Miri")]
    fn higher_priority_punches_a_hole() {
        let mut tree = RegionTree::default();
        let low = ram(&mut tree, 16, Some((0, 0)));
        let high = ram(&mut tree, 4, Some((6, 1)));
        let s = tree.flatten(DirtyClients::NONE);
        assert_eq!(
            layout(&s),
            [
                (0, 6, low.get(), 0),
                (6, 4, high.get(), 0),
                (10, 6, low.get(), 10)
            ]
        );
        assert_eq!(s[2].offset_in_region, 10 * PAGE_SIZE);
    }

    #[test]
    #[cfg_attr(miri, ignore = "RamBlock::new calls madvise: unsupported by Miri")]
    fn unmapped_regions_have_no_sections() {
        let mut tree = RegionTree::default();
        ram(&mut tree, 4, None);
        assert!(tree.flatten(DirtyClient::Migration.into()).is_empty());
    }

    #[test]
    #[cfg_attr(miri, ignore = "RamBlock::new calls madvise: unsupported by Miri")]
    fn alias_resolves_into_its_target_block() {
        let mut tree = RegionTree::default();
        let target = ram(&mut tree, 16, None);
        let alias = tree.insert(RegionNode {
            name: "a".into(),
            size: 4 * PAGE_SIZE,
            kind: RegionKind::Alias {
                target,
                offset: 5 * PAGE_SIZE,
            },
            mapping: Some(Mapping {
                guest_addr: 0x100 * PAGE_SIZE,
                priority: 0,
            }),
            log: DirtyClients::NONE,
            readonly: false,
        });
        tree.get_mut(target).unwrap().log = DirtyClient::Vga.into();
        let s = tree.flatten(DirtyClient::Migration.into());
        assert_eq!(layout(&s), [(0x100, 4, alias.get(), 5)]);
        assert_eq!(
            s[0].log,
            DirtyClients::NONE
                .with(DirtyClient::Vga)
                .with(DirtyClient::Migration)
        );
        assert_eq!(tree.alias_of(target), Some(alias));
    }

    #[test]
    #[cfg_attr(miri, ignore = "RamBlock::new calls madvise: unsupported by Miri")]
    fn same_priority_overlap_is_detected() {
        let mut tree = RegionTree::default();
        let r = ram(&mut tree, 16, Some((0, 0)));
        assert!(matches!(
            tree.check_overlap("x", 15 * PAGE_SIZE, PAGE_SIZE, 0, None),
            Err(Error::Overlap { existing, .. }) if existing == r
        ));
        tree.check_overlap("x", 16 * PAGE_SIZE, PAGE_SIZE, 0, None)
            .unwrap();
        tree.check_overlap("x", 0, PAGE_SIZE, 1, None).unwrap();
        assert!(matches!(
            tree.check_overlap("x", u64::MAX, PAGE_SIZE, 0, None),
            Err(Error::AddressOverflow { .. })
        ));
    }
}
