// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `MemorySystem`: RAM blocks, the region tree, listeners and dirty logging, in one place.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use clearlog_bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::region::{Mapping, RegionKind, RegionNode, RegionTree};
use crate::{
    ClearBitmap, DirtyBitmap, DirtyClient, DirtyClients, DirtyMemory, DirtySnapshot, Error,
    ListenerError, MemoryListener, RamBacking, RamBlock, RamBlockId, RegionId, Result, Section,
    PAGE_SHIFT, PAGE_SIZE,
};

/// RAM address space of [`MemorySystem::new`]: 64 GiB (6 MiB of dirty bitmaps for three clients).
pub const DEFAULT_RAM_CAPACITY: u64 = 64 << 30;

/// A registered listener and its place in the call order.
struct ListenerEntry {
    listener: Arc<dyn MemoryListener>,
    priority: i32,
}

impl fmt::Debug for ListenerEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerEntry")
            .field("name", &self.listener.name())
            .field("priority", &self.priority)
            .finish()
    }
}

/// A RAM block and the RAM region that owns it.
#[derive(Debug)]
struct BlockEntry {
    block: Arc<RamBlock>,
    region: RegionId,
}

/// Per-block index: what the per-page-chunk clear path needs, found without a scan.
#[derive(Debug)]
struct BlockIndex {
    block: Arc<RamBlock>,
    region: RegionId,
    /// Indices into `State::sections` of the sections backed by this block, in guest-address order.
    sections: Vec<usize>,
}

/// Where a new RAM block's host memory comes from.
enum Source<'a> {
    /// Map new memory.
    Backing(&'a RamBacking),
    /// Share an existing vm-memory mapping (adoption), shown at this guest address.
    Mmap(Arc<MmapRegion<DirtyBitmap>>, u64),
}

/// Everything the topology lock guards.
#[derive(Debug, Default)]
struct State {
    tree: RegionTree,
    /// Sorted by RAM page offset.
    blocks: Vec<BlockEntry>,
    /// The blocks by id, with their sections; rebuilt whenever blocks or sections change.
    index: HashMap<RamBlockId, BlockIndex>,
    next_block_id: u32,
    /// The flattened view, sorted by guest address.
    sections: Vec<Section>,
    /// Sorted by priority; equal priorities in registration order.
    listeners: Vec<ListenerEntry>,
    global_logging: bool,
}

/// Wrap a listener's error with its name and the hook.
fn hook(
    entry: &ListenerEntry,
    hook: &'static str,
    result: std::result::Result<(), ListenerError>,
) -> Result<()> {
    result.map_err(|source| Error::Listener {
        listener: entry.listener.name().to_owned(),
        hook,
        source,
    })
}

/// Keep the first error of a sequence of notifications that must all run.
fn keep_first(first: &mut Option<Error>, result: Result<()>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "memory listener failed");
        first.get_or_insert(e);
    }
}

/// The result of a hook that syncs a logging section one last time (`region_del`, `log_stop`).
///
/// If it failed, the listener's dirty bits since its previous sync are lost: mark every page of the
/// section dirty for every client in `clients` (the clients that were logging it), so the whole
/// section is resent and nothing is lost. The error is still returned.
fn final_sync(
    result: Result<()>,
    dirty: &DirtyMemory,
    section: &Section,
    clients: DirtyClients,
) -> Result<()> {
    if result.is_err() && !clients.is_empty() {
        dirty.set_dirty_range_for(clients, section.ram_first_page(), section.pages());
        tracing::warn!(
            guest_addr = section.guest_addr,
            pages = section.pages(),
            ?clients,
            "last sync of a logging section failed: the whole section is marked dirty"
        );
    }
    result
}

/// The RAM layout (the set of RAM blocks) is fixed while global logging (a migration) is on.
fn check_no_migration(st: &State, what: &'static str) -> Result<()> {
    if st.global_logging {
        return Err(Error::MigrationInProgress { what });
    }
    Ok(())
}

fn check_page_aligned(what: &'static str, value: u64) -> Result<()> {
    if value % PAGE_SIZE != 0 {
        return Err(Error::NotPageAligned { what, value });
    }
    Ok(())
}

fn check_range(what: &'static str, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            what,
            offset,
            len,
            size,
        }),
    }
}

impl State {
    /// The index entry of `block`, if it is a block of this system (ids alone are not enough: a
    /// block of another system may have the same id).
    fn block_entry(&self, block: &RamBlock) -> Result<&BlockIndex> {
        self.index
            .get(&block.id())
            .filter(|e| std::ptr::eq(Arc::as_ptr(&e.block), block))
            .ok_or(Error::UnknownBlock(block.id()))
    }

    /// Rebuild the per-block index from `blocks` and `sections`.
    fn reindex(&mut self) {
        let mut index: HashMap<RamBlockId, BlockIndex> = self
            .blocks
            .iter()
            .map(|e| {
                (
                    e.block.id(),
                    BlockIndex {
                        block: e.block.clone(),
                        region: e.region,
                        sections: Vec::new(),
                    },
                )
            })
            .collect();
        for (i, s) in self.sections.iter().enumerate() {
            if let Some(e) = index.get_mut(&s.block.id()) {
                e.sections.push(i);
            }
        }
        self.index = index;
    }

    /// The block a region shows and the byte window `[start, end)` of the block it shows.
    fn region_window(&self, region: RegionId) -> Result<(Arc<RamBlock>, u64, u64)> {
        let size = self.tree.get(region)?.size;
        let (block, base) = self.tree.resolve(region)?;
        Ok((block, base, base + size))
    }

    /// Sections showing bytes `[start, end)` of a block.
    fn sections_showing(
        &self,
        block: RamBlockId,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = &Section> {
        self.index
            .get(&block)
            .into_iter()
            .flat_map(|e| e.sections.iter())
            .map(|&i| &self.sections[i])
            .filter(move |s| s.offset_in_block < end && start < s.offset_in_block + s.size)
    }

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
        let id = RamBlockId(self.next_block_id);
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
                region: RegionId(u32::MAX),
            },
        );
        Ok(block)
    }

    /// Re-flatten and tell the listeners what changed: deletions (listeners in descending order),
    /// logging changes, then additions (ascending). All notifications run even if one fails (so
    /// every listener stays consistent with the new view); the first error is returned.
    ///
    /// A `region_del` or `log_stop` that fails for a logging section marks the whole section dirty
    /// for the clients that were logging it (see [`final_sync`]).
    fn update_topology(&mut self, dirty: &DirtyMemory) -> Result<()> {
        let active = self.logging_clients();
        // Host-side writes start reaching a newly logging client before the accelerator starts
        // logging for it: both are dirty sources and a page marked early is merely sent twice.
        dirty.set_active_clients(active.union(dirty.active_clients()));

        let new = self.tree.flatten(self.global_logging);
        let old = std::mem::take(&mut self.sections);
        let old_logs: HashMap<_, DirtyClients> = old.iter().map(|s| (s.key(), s.log)).collect();
        let new_keys: HashMap<_, ()> = new.iter().map(|s| (s.key(), ())).collect();
        let mut first = None;

        for s in old.iter().filter(|s| !new_keys.contains_key(&s.key())) {
            for l in self.listeners.iter().rev() {
                let r = hook(l, "region_del", l.listener.region_del(s, dirty));
                keep_first(&mut first, final_sync(r, dirty, s, s.log));
            }
        }
        for s in &new {
            let Some(&old_log) = old_logs.get(&s.key()) else {
                continue;
            };
            if old_log.0 & !s.log.0 != 0 {
                for l in self.listeners.iter().rev() {
                    let r = hook(l, "log_stop", l.listener.log_stop(s, old_log, s.log, dirty));
                    keep_first(&mut first, final_sync(r, dirty, s, old_log));
                }
            }
            if s.log.0 & !old_log.0 != 0 {
                for l in &self.listeners {
                    keep_first(
                        &mut first,
                        hook(l, "log_start", l.listener.log_start(s, old_log, s.log)),
                    );
                }
            }
        }
        for s in new.iter().filter(|s| !old_logs.contains_key(&s.key())) {
            for l in &self.listeners {
                keep_first(&mut first, hook(l, "region_add", l.listener.region_add(s)));
            }
        }
        self.sections = new;
        self.reindex();
        dirty.set_active_clients(active);
        first.map_or(Ok(()), Err)
    }

    /// The clients that log somewhere: per-region clients, and Migration while global logging is on.
    fn logging_clients(&self) -> DirtyClients {
        let active = self.tree.region_logging_clients();
        if self.global_logging {
            active.with(DirtyClient::Migration)
        } else {
            active
        }
    }

    /// Apply a change that only turns logging on (a client added to a region's set, global logging
    /// started), all or nothing: every listener gets `log_start` for every section whose set grows.
    ///
    /// If a `log_start` fails, the change is rolled back: the listeners that already started for it
    /// get the matching `log_stop` (new set back to the old one, latest first), the sections and the
    /// active clients stay as they were, and the error is returned. The caller restores the flag
    /// it changed (the region's set, `global_logging`).
    fn start_logging(&mut self, dirty: &DirtyMemory) -> Result<()> {
        let new = self.tree.flatten(self.global_logging);
        let same_sections = new.len() == self.sections.len()
            && new
                .iter()
                .zip(&self.sections)
                .all(|(n, o)| n.key() == o.key() && o.log.0 & !n.log.0 == 0);
        if !same_sections {
            // Not a pure logging start (cannot happen today): take the general path.
            return self.update_topology(dirty);
        }
        let before = dirty.active_clients();
        let active = self.logging_clients();
        // As in `update_topology`: host-side writes reach a new client before the accelerator logs.
        dirty.set_active_clients(active.union(before));
        let mut started: Vec<(usize, usize)> = Vec::new();
        for (i, (s, old)) in new.iter().zip(&self.sections).enumerate() {
            if s.log.0 & !old.log.0 == 0 {
                continue;
            }
            for (j, l) in self.listeners.iter().enumerate() {
                if let Err(e) = hook(l, "log_start", l.listener.log_start(s, old.log, s.log)) {
                    tracing::warn!(error = %e, "log_start failed: rolling the logging change back");
                    for &(si, lj) in started.iter().rev() {
                        let (s, old_log) = (&new[si], self.sections[si].log);
                        let back = Section {
                            log: old_log,
                            ..s.clone()
                        };
                        let l = &self.listeners[lj];
                        let r = hook(
                            l,
                            "log_stop",
                            l.listener.log_stop(&back, s.log, old_log, dirty),
                        );
                        keep_first(&mut None, final_sync(r, dirty, s, s.log));
                    }
                    dirty.set_active_clients(before);
                    return Err(e);
                }
                started.push((i, j));
            }
        }
        self.sections = new;
        self.reindex();
        dirty.set_active_clients(active);
        Ok(())
    }

    /// `log_clear` on every listener for every logging section of `block`, clipped to the
    /// page-aligned byte range `[start, end)` of the block.
    fn clear_block_range(&self, block: RamBlockId, start: u64, end: u64) -> Result<()> {
        for l in &self.listeners {
            for s in self
                .sections_showing(block, start, end)
                .filter(|s| !s.log.is_empty())
            {
                let from = start.max(s.offset_in_block);
                let to = end.min(s.offset_in_block + s.size);
                let first_page = (from - s.offset_in_block) >> PAGE_SHIFT;
                hook(
                    l,
                    "log_clear",
                    l.listener
                        .log_clear(s, first_page, (to - from) >> PAGE_SHIFT),
                )?;
            }
        }
        Ok(())
    }
}

/// The guest's memory: see the crate docs.
///
/// One lock (the topology lock) guards the region tree, the flattened sections and the listeners:
/// topology and logging changes take it for writing, syncs and clears for reading (so a migration
/// thread and a display thread sync and clear concurrently). The dirty bitmaps are outside the lock.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyClient, Error, MemorySystem};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 30);
/// let low = mem.add_ram("ram-low", 0, 0x80_0000).unwrap();
/// mem.add_ram("ram-high", 0x1_0000_0000, 0x80_0000).unwrap();
/// assert_eq!(mem.sections().len(), 2);
/// mem.log_global_start().unwrap();
/// assert!(mem.sections().iter().all(|s| s.log.contains(DirtyClient::Migration)));
/// // The RAM layout is fixed while a migration runs.
/// assert!(matches!(mem.remove_region(low), Err(Error::MigrationInProgress { .. })));
/// mem.log_global_stop().unwrap();
/// mem.remove_region(low).unwrap();
/// assert_eq!(mem.ram_blocks().len(), 1);
/// ```
#[derive(Debug)]
pub struct MemorySystem {
    dirty: Arc<DirtyMemory>,
    state: RwLock<State>,
}

impl MemorySystem {
    /// An empty memory system.
    ///
    /// Its RAM address space holds [`DEFAULT_RAM_CAPACITY`] bytes of RAM blocks; use
    /// [`with_ram_capacity`](Self::with_ram_capacity) for more (or less).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::new();
    /// assert!(mem.sections().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_ram_capacity(DEFAULT_RAM_CAPACITY)
    }

    /// An empty memory system whose RAM blocks may total up to `bytes` (including the padding that
    /// puts each block on a 64-page boundary). The dirty bitmaps (one bit per page per client) are
    /// allocated once, for this capacity, so they never move and never need a lock.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{Error, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 20);
    /// assert!(matches!(mem.add_ram("ram", 0, 2 << 20), Err(Error::RamSpaceExhausted { .. })));
    /// ```
    pub fn with_ram_capacity(bytes: u64) -> Self {
        MemorySystem {
            dirty: Arc::new(DirtyMemory::new(bytes.div_ceil(PAGE_SIZE))),
            state: RwLock::new(State::default()),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A listener that panicked left no half-done update behind that a reader could trip on:
        // sections are replaced in one assignment.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

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
        check_no_migration(&st, "add a RAM block")?;
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

    fn add_ram_region(
        &self,
        name: &str,
        size: u64,
        mapping: Option<Mapping>,
        source: Source<'_>,
    ) -> Result<RegionId> {
        let mut st = self.write();
        check_no_migration(&st, "add a RAM block")?;
        self.add_ram_locked(&mut st, name, size, mapping, source)
    }

    fn add_ram_locked(
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
    /// dirty for the clients that were logging it, see [`MemoryListener::region_del`]).
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
            check_no_migration(&st, "remove a RAM region")?;
        }
        self.remove_locked(&mut st, region)
    }

    fn remove_locked(&self, st: &mut State, region: RegionId) -> Result<()> {
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

    /// Register a listener; it is replayed `region_add` (and logging state) for existing sections.
    ///
    /// Replay: `log_global_start` if global logging is on, then `region_add` for every section (whose
    /// `log` field carries its logging state).
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] if the replay fails; the listener is then not registered.
    ///
    /// # Examples
    ///
    /// See [`MemoryListener`].
    pub fn register_listener(&self, listener: Arc<dyn MemoryListener>) -> Result<()> {
        let mut st = self.write();
        let entry = ListenerEntry {
            priority: listener.priority(),
            listener,
        };
        if st.global_logging {
            hook(
                &entry,
                "log_global_start",
                entry.listener.log_global_start(),
            )?;
        }
        for s in &st.sections {
            hook(&entry, "region_add", entry.listener.region_add(s))?;
        }
        // After every entry of lower or equal priority: ties keep registration order.
        let at = st
            .listeners
            .partition_point(|e| e.priority <= entry.priority);
        st.listeners.insert(at, entry);
        Ok(())
    }

    /// Unregister a listener: it sees `region_del` for every section (so it syncs one last time and
    /// drops its memslots), then `log_global_stop` if global logging is on.
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] if a hook fails (the listener is unregistered anyway). Unregistering a
    /// listener that is not registered is [`Error::UnknownListener`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use clearlog_memory::{MemoryListener, MemorySystem};
    ///
    /// struct Nop;
    /// impl MemoryListener for Nop {}
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let l: Arc<dyn MemoryListener> = Arc::new(Nop);
    /// mem.register_listener(l.clone()).unwrap();
    /// mem.unregister_listener(&l).unwrap();
    /// assert!(mem.unregister_listener(&l).is_err());
    /// ```
    pub fn unregister_listener(&self, listener: &Arc<dyn MemoryListener>) -> Result<()> {
        let mut st = self.write();
        let at = st
            .listeners
            .iter()
            .position(|e| std::ptr::addr_eq(Arc::as_ptr(&e.listener), Arc::as_ptr(listener)))
            .ok_or(Error::UnknownListener)?;
        let entry = st.listeners.remove(at);
        let mut first = None;
        for s in st.sections.iter().rev() {
            let r = hook(
                &entry,
                "region_del",
                entry.listener.region_del(s, &self.dirty),
            );
            keep_first(&mut first, final_sync(r, &self.dirty, s, s.log));
        }
        if st.global_logging {
            keep_first(
                &mut first,
                hook(&entry, "log_global_stop", entry.listener.log_global_stop()),
            );
        }
        first.map_or(Ok(()), Err)
    }

    /// Turn dirty logging on or off for a client on a region (Vga/Code; Migration is global).
    ///
    /// Logging set on a RAM region covers the aliases that show it. Listeners see `log_start` /
    /// `log_stop` for the sections whose logging set changes. Setting the state the region already
    /// has is a no-op.
    ///
    /// # Errors
    ///
    /// [`Error::NotPerRegionClient`] for Migration, [`Error::UnknownRegion`], [`Error::Listener`].
    ///
    /// Turning logging on is all or nothing: if a listener's `log_start` fails, the listeners that
    /// already started for this call get the matching `log_stop`, and the region's logging set, the
    /// sections and the active clients are as before the call (a retry starts logging again).
    /// Turning logging off cannot be refused: a failed `log_stop` is returned, logging is off anyway
    /// and the section is marked dirty for the clients that were logging it (see
    /// [`MemoryListener::log_stop`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let vram = mem.add_ram("vram", 0, 0x10_0000).unwrap();
    /// mem.set_region_logging(vram, DirtyClient::Vga, true).unwrap();
    /// assert!(mem.sections()[0].log.contains(DirtyClient::Vga));
    /// assert!(mem.set_region_logging(vram, DirtyClient::Migration, true).is_err());
    /// ```
    pub fn set_region_logging(
        &self,
        region: RegionId,
        client: DirtyClient,
        on: bool,
    ) -> Result<()> {
        if client == DirtyClient::Migration {
            return Err(Error::NotPerRegionClient(client));
        }
        let mut st = self.write();
        let node = st.tree.get_mut(region)?;
        let before = node.log;
        node.log = if on {
            node.log.with(client)
        } else {
            node.log.without(client)
        };
        if node.log == before {
            return Ok(());
        }
        if !on {
            return st.update_topology(&self.dirty);
        }
        if let Err(e) = st.start_logging(&self.dirty) {
            st.tree.get_mut(region)?.log = before;
            return Err(e);
        }
        Ok(())
    }

    /// Start global dirty logging (migration): the Migration client logs all RAM.
    ///
    /// Listeners see `log_global_start` (ascending priority), then `log_start` for every section.
    /// Host-side writes mark the Migration client from now on. Starting twice is a no-op. Every
    /// RAM block first asks the kernel again what its mapping is
    /// ([`RamBlock::reclassify_mapping`]), so a migration's populated-pages answers follow the
    /// mappings as they are now (e.g. registered with userfaultfd since the block was made).
    ///
    /// # Errors
    ///
    /// [`Error::Listener`]. Starting is all or nothing: if a `log_global_start` fails, the
    /// listeners that already started get `log_global_stop`; if a `log_start` for a section fails,
    /// the listeners that already started logging that change get the matching `log_stop`, then
    /// every listener gets `log_global_stop`. Either way global logging stays off, the sections and
    /// the active clients are as before, and a retry starts again from scratch.
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.log_global_start().unwrap();
    /// assert!(mem.global_logging());
    /// mem.log_global_stop().unwrap();
    /// assert!(!mem.global_logging());
    /// ```
    pub fn log_global_start(&self) -> Result<()> {
        let mut st = self.write();
        if st.global_logging {
            return Ok(());
        }
        let vmas = crate::populated::current_vmas();
        for entry in &st.blocks {
            entry.block.reclassify_with(vmas.as_deref());
        }
        for (i, l) in st.listeners.iter().enumerate() {
            if let Err(e) = hook(l, "log_global_start", l.listener.log_global_start()) {
                for started in st.listeners[..i].iter().rev() {
                    started.listener.log_global_stop().ok();
                }
                return Err(e);
            }
        }
        st.global_logging = true;
        if let Err(e) = st.start_logging(&self.dirty) {
            st.global_logging = false;
            for l in st.listeners.iter().rev() {
                keep_first(
                    &mut None,
                    hook(l, "log_global_stop", l.listener.log_global_stop()),
                );
            }
            return Err(e);
        }
        Ok(())
    }

    /// Stop global dirty logging.
    ///
    /// Listeners see `log_stop` for every section (descending priority; an accelerator syncs one
    /// last time there), then `log_global_stop`. Stopping when not started is a no-op.
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] (logging is stopped anyway).
    ///
    /// # Examples
    ///
    /// See [`log_global_start`](Self::log_global_start).
    pub fn log_global_stop(&self) -> Result<()> {
        let mut st = self.write();
        if !st.global_logging {
            return Ok(());
        }
        st.global_logging = false;
        let mut first = st.update_topology(&self.dirty).err();
        for l in st.listeners.iter().rev() {
            keep_first(
                &mut first,
                hook(l, "log_global_stop", l.listener.log_global_stop()),
            );
        }
        first.map_or(Ok(()), Err)
    }

    /// Is global logging on?
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(!clearlog_memory::MemorySystem::new().global_logging());
    /// ```
    pub fn global_logging(&self) -> bool {
        self.read().global_logging
    }

    /// Call `log_sync` on every listener for every logging section.
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] (stops at the first failure).
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10_0000).unwrap();
    /// mem.log_global_start().unwrap();
    /// mem.log_sync_all().unwrap();
    /// ```
    pub fn log_sync_all(&self) -> Result<()> {
        let st = self.read();
        for l in &st.listeners {
            for s in st.sections.iter().filter(|s| !s.log.is_empty()) {
                hook(l, "log_sync", l.listener.log_sync(s, &self.dirty))?;
            }
        }
        Ok(())
    }

    /// Call `log_sync` for the logging sections of one region.
    ///
    /// The sections are those showing the region's bytes (for a RAM region, also through aliases).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRegion`], [`Error::Listener`].
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let vram = mem.add_ram("vram", 0, 0x10_0000).unwrap();
    /// mem.set_region_logging(vram, DirtyClient::Vga, true).unwrap();
    /// mem.log_sync(vram).unwrap();
    /// ```
    pub fn log_sync(&self, region: RegionId) -> Result<()> {
        let st = self.read();
        let (block, start, end) = st.region_window(region)?;
        for l in &st.listeners {
            for s in st
                .sections_showing(block.id(), start, end)
                .filter(|s| !s.log.is_empty())
            {
                hook(l, "log_sync", l.listener.log_sync(s, &self.dirty))?;
            }
        }
        Ok(())
    }

    /// QEMU's `memory_region_clear_dirty_bitmap`: `log_clear` on every listener for every logging
    /// section of `region`, clipped to `[offset, offset + len)` (bytes relative to the region).
    ///
    /// The range is widened to whole pages. Sections are matched by the RAM they show, so clearing a
    /// RAM region also reaches the aliases that show the same bytes. Listeners are called in
    /// ascending priority, sections in guest-address order.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRegion`], [`Error::OutOfRange`], [`Error::NotMapped`] (no section shows the
    /// region), [`Error::LoggingOff`] (no section of the region logs), [`Error::Listener`].
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{Error, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.add_ram("ram", 0, 0x10_0000).unwrap();
    /// assert!(matches!(mem.clear_dirty_bitmap(ram, 0, 0x1000), Err(Error::LoggingOff { .. })));
    /// mem.log_global_start().unwrap();
    /// mem.clear_dirty_bitmap(ram, 0, 0x1000).unwrap();
    /// assert!(matches!(mem.clear_dirty_bitmap(ram, 0xff000, 0x2000), Err(Error::OutOfRange { .. })));
    /// ```
    pub fn clear_dirty_bitmap(&self, region: RegionId, offset: u64, len: u64) -> Result<()> {
        let st = self.read();
        let (block, start, end) = self.logging_window(&st, region, offset, len, None)?;
        st.clear_block_range(block.id(), start, end)
    }

    /// Check that `region` exists, `[offset, offset + len)` is inside it and some section of it logs
    /// (for `client`, if given); return its block and the range in block bytes, widened to pages.
    fn logging_window(
        &self,
        st: &State,
        region: RegionId,
        offset: u64,
        len: u64,
        client: Option<DirtyClient>,
    ) -> Result<(Arc<RamBlock>, u64, u64)> {
        let (block, win_start, win_end) = st.region_window(region)?;
        check_range("region", offset, len, win_end - win_start)?;
        let mut shown = st
            .sections_showing(block.id(), win_start, win_end)
            .peekable();
        if shown.peek().is_none() {
            return Err(Error::NotMapped(region));
        }
        if !shown.any(|s| client.map_or(!s.log.is_empty(), |c| s.log.contains(c))) {
            return Err(Error::LoggingOff { region, client });
        }
        let start = (win_start + offset) & !(PAGE_SIZE - 1);
        let end = (win_start + offset + len).next_multiple_of(PAGE_SIZE);
        Ok((block, start, end))
    }

    /// Same as `clear_dirty_bitmap`, addressed by RAM block (what migration uses).
    ///
    /// `offset` and `len` are bytes of the block (widened to pages). While global logging is on, a
    /// block that no section shows is simply clean for the accelerators: the call succeeds.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownBlock`] (not a block of this system), [`Error::OutOfRange`],
    /// [`Error::LoggingOff`] (nothing logs the block and global logging is off), [`Error::Listener`].
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10_0000).unwrap();
    /// mem.log_global_start().unwrap();
    /// let block = mem.ram_blocks()[0].clone();
    /// mem.clear_dirty_bitmap_block(&block, 0, 0x4_0000).unwrap();
    /// assert!(mem.clear_dirty_bitmap_block(&block, 0x10_0000, 1).is_err());
    /// ```
    pub fn clear_dirty_bitmap_block(&self, block: &RamBlock, offset: u64, len: u64) -> Result<()> {
        let st = self.read();
        let entry = st.block_entry(block)?;
        check_range("block", offset, len, block.size())?;
        if !st.global_logging
            && !st
                .sections_showing(block.id(), 0, block.size())
                .any(|s| !s.log.is_empty())
        {
            return Err(Error::LoggingOff {
                region: entry.region,
                client: None,
            });
        }
        let start = offset & !(PAGE_SIZE - 1);
        let end = (offset + len).next_multiple_of(PAGE_SIZE);
        st.clear_block_range(block.id(), start, end)
    }

    /// Re-arm the accelerators for the range (widened to 64-page alignment), then atomically take
    /// and clear `client`'s bits for it.
    ///
    /// The widening is in the RAM address space, clipped to the region (an alias never takes bits of
    /// block pages it does not show).
    ///
    /// # Order
    ///
    /// 1. Take: each bitmap word of `client` is taken with one atomic exchange, so a bit set
    ///    concurrently is either in the snapshot or still in the client's map.
    /// 2. Re-arm: every listener's `log_clear` for the logging sections of the range (what
    ///    [`clear_dirty_bitmap`](Self::clear_dirty_bitmap) does). An accelerator clears only bits it
    ///    saw at its last sync.
    /// 3. The caller reads the pages after this returns.
    ///
    /// Take, re-arm, read, as migration does (take at the sync, clear the chunk, read): every page
    /// whose bit was taken is re-armed before it is read, so a write after the read is caught.
    /// Re-arming BEFORE taking is not safe with two clients: between the re-arm and the take, another
    /// client's sync can fold a bit for a page written after the re-arm; this snapshot would take it
    /// and read the page while the accelerator still holds the bit with the page writable, and the
    /// other client's clear of that bit would then hide a later write from this client for good.
    /// If the re-arm fails (e.g. a listener refuses a clear), the taken bits are put back (OR-ed:
    /// a bit set meanwhile stays) and the error is returned: nothing is lost.
    ///
    /// # Errors
    ///
    /// As [`clear_dirty_bitmap`](Self::clear_dirty_bitmap); [`Error::LoggingOff`] if no section of the
    /// region logs for `client`. The client's bits are untouched on every error.
    ///
    /// # Examples
    ///
    /// See [`DirtySnapshot`].
    pub fn snapshot_and_clear_dirty(
        &self,
        region: RegionId,
        offset: u64,
        len: u64,
        client: DirtyClient,
    ) -> Result<DirtySnapshot> {
        let st = self.read();
        let (block, start, end) = self.logging_window(&st, region, offset, len, Some(client))?;
        let (_, win_start, win_end) = st.region_window(region)?;
        if len == 0 {
            return Ok(DirtySnapshot::new(offset, Bitmap::new(0)));
        }
        let ram0 = block.ram_page_offset();
        let first_page = (ram0 + (start >> PAGE_SHIFT)) & !63;
        let end_page = (ram0 + (end >> PAGE_SHIFT)).next_multiple_of(64);
        let first_page = first_page.max(ram0 + (win_start >> PAGE_SHIFT));
        let end_page = end_page.min(ram0 + (win_end >> PAGE_SHIFT));
        let block_start = (first_page - ram0) << PAGE_SHIFT;
        let block_end = (end_page - ram0) << PAGE_SHIFT;
        // Take, then re-arm (see "Order"); a failed re-arm puts the bits back.
        let npages = end_page - first_page;
        let bits = self
            .dirty
            .client(client)
            .take_range(first_page as usize, npages as usize);
        if let Err(e) = st.clear_block_range(block.id(), block_start, block_end) {
            self.dirty
                .try_fold_bitmap(first_page, bits.as_words(), npages, client.into())?;
            return Err(e);
        }
        Ok(DirtySnapshot::new(block_start - win_start, bits))
    }

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

    /// All RAM blocks, in RAM-address-space order.
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("a", 0, 0x1000).unwrap();
    /// mem.add_ram("b", 0x1000, 0x1000).unwrap();
    /// let names: Vec<String> = mem.ram_blocks().iter().map(|b| b.name().to_owned()).collect();
    /// assert_eq!(names, ["a", "b"]);
    /// ```
    pub fn ram_blocks(&self) -> Vec<Arc<RamBlock>> {
        self.read().blocks.iter().map(|e| e.block.clone()).collect()
    }

    /// A RAM block by id.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownBlock`].
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{MemorySystem, RamBlockId};
    /// assert!(MemorySystem::new().ram_block(RamBlockId(0)).is_err());
    /// ```
    pub fn ram_block(&self, id: RamBlockId) -> Result<Arc<RamBlock>> {
        self.read()
            .index
            .get(&id)
            .map(|e| e.block.clone())
            .ok_or(Error::UnknownBlock(id))
    }

    /// The RAM block a region shows and the offset of the region's first byte in it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRegion`].
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.create_ram("ram", 0x10_0000).unwrap();
    /// let alias = mem.add_alias("hi", ram, 0x8000, 0x1000, 0x1_0000_0000, 0).unwrap();
    /// let (block, offset) = mem.region_block(alias).unwrap();
    /// assert_eq!((block.name(), offset), ("ram", 0x8000));
    /// ```
    pub fn region_block(&self, region: RegionId) -> Result<(Arc<RamBlock>, u64)> {
        self.read().tree.resolve(region)
    }

    /// The flattened view.
    ///
    /// # Examples
    ///
    /// See [`Section`].
    pub fn sections(&self) -> Vec<Section> {
        self.read().sections.clone()
    }

    /// The clients' dirty bitmaps.
    ///
    /// # Examples
    ///
    /// See [`DirtyMemory::set_dirty_range`].
    pub fn dirty(&self) -> &Arc<DirtyMemory> {
        &self.dirty
    }
}

impl Default for MemorySystem {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MemorySystem {
    /// Detach every block's [`DirtyBitmap`]: vm-memory views that outlive the memory system mark
    /// nothing, and their regions may be adopted by another memory system.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for e in &st.blocks {
            e.block.mmap().bitmap().detach();
        }
    }
}
