// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`MemorySystem`]: RAM blocks, the region tree, listeners and dirty logging behind one topology
//! lock. The struct, its state and its queries live here; each concept has its own file:
//!
//! - `topology`: RAM blocks and regions, aliases, mapping, removal;
//! - `listeners`: registering listeners, and telling them what the topology change did;
//! - `logging`: dirty logging and the dirty-memory clients (start/stop, sync, clear, snapshot);
//! - `migration_sync`: a block's Migration bits into the caller's bitmap;
//! - `adopt`: a VMM's vm-memory `GuestMemoryMmap` as RAM blocks, and a vm-memory view back;
//! - `epochs`: [`DirtyEpochs`], the Snapshot client's tracker (open, advance, close).

mod adopt;
mod epochs;
mod listeners;
mod logging;
mod migration_sync;
mod topology;

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::region::RegionTree;
use crate::{
    DirtyClient, DirtyClients, DirtyMemory, Error, RamBlock, RamBlockId, RegionId, Result, Section,
    PAGE_SIZE,
};

use listeners::ListenerEntry;

pub use epochs::DirtyEpochs;

/// RAM address space of [`MemorySystem::new`]: 64 GiB (8 MiB of dirty bitmaps for four clients).
pub const DEFAULT_RAM_CAPACITY: u64 = 64 << 30;

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
    /// A [`DirtyEpochs`] tracker is open: the Snapshot client logs all RAM.
    epochs_open: bool,
}

/// The RAM layout (the set of RAM blocks) is fixed while global logging (a migration) is on and
/// while a dirty-epoch tracker is open.
fn check_layout_fixed(st: &State, what: &'static str) -> Result<()> {
    if st.global_logging {
        return Err(Error::MigrationInProgress { what });
    }
    if st.epochs_open {
        return Err(Error::DirtyEpochsOpen { what });
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
    /// The clients that log all RAM: Migration while global logging is on, Snapshot while a
    /// dirty-epoch tracker is open.
    fn global_clients(&self) -> DirtyClients {
        let mut global = DirtyClients::NONE;
        if self.global_logging {
            global = global.with(DirtyClient::Migration);
        }
        if self.epochs_open {
            global = global.with(DirtyClient::Snapshot);
        }
        global
    }

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
    /// use clearlog_memory::MemorySystem;
    ///
    /// let other = MemorySystem::with_ram_capacity(1 << 24);
    /// other.add_ram("ram", 0, 0x1000).unwrap();
    /// let id = other.ram_blocks()[0].id(); // a block of another memory system
    /// assert!(MemorySystem::new().ram_block(id).is_err());
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
    /// Detach every block's [`DirtyBitmap`](crate::DirtyBitmap): vm-memory views that outlive the memory system mark
    /// nothing, and their regions may be adopted by another memory system.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for e in &st.blocks {
            e.block.mmap().bitmap().detach();
        }
    }
}

/// A listener for the unit tests of this module: it records every hook (`name:hook@guest_addr`)
/// and refuses the hooks it is told to.
#[cfg(test)]
pub(crate) mod recorder {
    use std::sync::Mutex;

    use crate::{DirtyClients, DirtyMemory, ListenerError, MemoryListener, Section};

    /// See the module docs.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub(crate) name: &'static str,
        pub(crate) priority: i32,
        pub(crate) calls: Mutex<Vec<String>>,
        /// Hooks that fail (`"region_add"`, `"log_global_start"`...).
        pub(crate) refuse: Vec<&'static str>,
    }

    impl Recorder {
        pub(crate) fn new(name: &'static str, priority: i32) -> Self {
            Recorder {
                name,
                priority,
                ..Recorder::default()
            }
        }

        pub(crate) fn refusing(mut self, hook: &'static str) -> Self {
            self.refuse.push(hook);
            self
        }

        pub(crate) fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        fn note(&self, hook: &'static str, at: Option<&Section>) -> Result<(), ListenerError> {
            let at = at
                .map(|s| format!("@{:#x}", s.guest_addr))
                .unwrap_or_default();
            self.calls
                .lock()
                .unwrap()
                .push(format!("{}:{hook}{at}", self.name));
            if self.refuse.contains(&hook) {
                return Err(format!("{} refuses {hook}", self.name).into());
            }
            Ok(())
        }
    }

    impl MemoryListener for Recorder {
        fn name(&self) -> &str {
            self.name
        }
        fn priority(&self) -> i32 {
            self.priority
        }
        fn region_add(&self, s: &Section) -> Result<(), ListenerError> {
            self.note("region_add", Some(s))
        }
        fn region_del(&self, s: &Section, _dirty: &DirtyMemory) -> Result<(), ListenerError> {
            self.note("region_del", Some(s))
        }
        fn log_start(
            &self,
            s: &Section,
            _o: DirtyClients,
            _n: DirtyClients,
        ) -> Result<(), ListenerError> {
            self.note("log_start", Some(s))
        }
        fn log_stop(
            &self,
            s: &Section,
            _o: DirtyClients,
            _n: DirtyClients,
            _dirty: &DirtyMemory,
        ) -> Result<(), ListenerError> {
            self.note("log_stop", Some(s))
        }
        fn log_global_start(&self) -> Result<(), ListenerError> {
            self.note("log_global_start", None)
        }
        fn log_global_stop(&self) -> Result<(), ListenerError> {
            self.note("log_global_stop", None)
        }
        fn log_sync(&self, s: &Section, _dirty: &DirtyMemory) -> Result<(), ListenerError> {
            self.note("log_sync", Some(s))
        }
        fn log_clear(&self, s: &Section, _first: u64, _n: u64) -> Result<(), ListenerError> {
            self.note("log_clear", Some(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_what_is_wrong() {
        check_page_aligned("x", 0x2000).unwrap();
        assert!(matches!(
            check_page_aligned("x", 0x2001),
            Err(Error::NotPageAligned {
                what: "x",
                value: 0x2001
            })
        ));
        check_range("r", 0x1000, 0x1000, 0x2000).unwrap();
        assert!(check_range("r", 1, u64::MAX, u64::MAX).is_err(), "overflow");
        assert!(check_range("r", 0x1000, 0x1001, 0x2000).is_err());
        let st = State {
            global_logging: true,
            ..State::default()
        };
        assert!(matches!(
            check_layout_fixed(&st, "add"),
            Err(Error::MigrationInProgress { what: "add" })
        ));
        let st = State {
            epochs_open: true,
            ..State::default()
        };
        assert!(matches!(
            check_layout_fixed(&st, "add"),
            Err(Error::DirtyEpochsOpen { what: "add" })
        ));
        assert_eq!(st.global_clients(), DirtyClient::Snapshot.into());
    }

    #[test]
    fn a_block_of_another_system_with_the_same_id_is_unknown() {
        let a = MemorySystem::with_ram_capacity(1 << 24);
        let b = MemorySystem::with_ram_capacity(1 << 24);
        a.add_ram("ram", 0, 1 << 20).unwrap();
        b.add_ram("ram", 0, 1 << 20).unwrap();
        let theirs = b.ram_blocks().remove(0);
        assert_eq!(theirs.id(), a.ram_blocks()[0].id());
        assert!(matches!(
            a.read().block_entry(&theirs),
            Err(Error::UnknownBlock(_))
        ));
        a.read().block_entry(&a.ram_blocks()[0]).unwrap();
    }
}
