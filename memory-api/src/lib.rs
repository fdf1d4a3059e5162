// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory for a VMM with loss-free dirty-page tracking.
//!
//! Every public item is at the crate root (`clearlog_memory::MemorySystem`): the modules are
//! private, like kvm-ioctls', except the feature-gated `testing`. The pieces, one (private) module
//! each:
//!
//! - [`RamBlock`] (`ram`): guest RAM in host memory (vm-memory's `MmapRegion<DirtyBitmap>`), placed
//!   in one RAM address space at a 64-page-aligned page offset. Host-side writes through
//!   [`RamBlock::write`] always mark the pages dirty.
//! - [`RamBlock::populated_pages`] (`populated`): which pages of a block may hold data, from the
//!   page tables (`PAGEMAP_SCAN`) or the backing file (`SEEK_DATA`), chosen from what the kernel
//!   says the mapping is (`mapping`: `/proc/self/smaps`), so migration can send never-populated
//!   memory as zero without reading it; [`RamBlock::nonzero_pages`] (`zero_scan`) is the check
//!   that trusts no such answer: it reads every byte.
//! - [`RamBacking`] (`backing`): where a block's memory comes from: private anonymous memory, a
//!   memfd (optionally hugetlb) or the caller's file at an offset, mapped shared (vhost-user).
//! - [`DirtyBitmap`] (`vm_bitmap`): a vm-memory bitmap backend over the dirty-memory clients, so
//!   writes through a VMM's `GuestMemoryMmap<DirtyBitmap>` are tracked;
//!   [`MemorySystem::add_guest_memory`] adopts such memory, [`MemorySystem::guest_memory`] gives
//!   a vm-memory view of a memory system's RAM.
//! - Regions and [`Section`]s (`region`): RAM regions and aliases mapped in the guest-physical
//!   address space with priorities, flattened into sections (what an accelerator registers).
//! - [`MemoryListener`] (`listener`): the hooks an accelerator implements: map changes, logging
//!   start/stop, `log_sync` (collect only) and `log_clear` (re-arm a range).
//! - [`DirtyMemory`] (`dirty`): one atomic bitmap per [`DirtyClient`] (Migration, Vga, Code,
//!   Snapshot) over
//!   the RAM address space; the accelerator folds KVM's bitmaps into it.
//! - [`DirtySnapshot`] (`snapshot`): what [`MemorySystem::snapshot_and_clear_dirty`] returns.
//! - [`DirtyEpochs`] (`system::epochs`) and [`EpochDelta`] (`epochs`): dirty epochs for snapshots,
//!   the [`DirtyClient::Snapshot`] client's tracker: which pages changed since the previous epoch,
//!   lossless next to a migration and a display.
//! - [`ClearBitmap`] (re-exported from `clearlog-bitmap`): migration's per-chunk "needs clear" bits.
//! - [`MemorySystem`] (`system`): all of the above behind one topology lock.
//! - `testing` (cargo feature `testing`): a conformance check for [`MemoryListener`]
//!   implementations.
//!
//! # Why clears go through the accelerator
//!
//! Several clients hold copies of the same KVM dirty bit. If each told KVM to clear "its" bits, a
//! second clear for the same sync could wipe a write made after the first one, and that page would
//! never be sent again. So a client never clears KVM directly: it calls
//! [`MemorySystem::clear_dirty_bitmap`], which calls every listener's `log_clear` for the logging
//! sections of the range; the accelerator clears only bits it saw at its last sync and has not
//! cleared since.
//!
//! # Memory topology during migration
//!
//! While global logging is on (a migration runs), the RAM layout is fixed: the migration stream's
//! header lists the RAM blocks (names and sizes) when the migration starts, and every page record
//! names one of them. So these are refused up front with [`Error::MigrationInProgress`] and change
//! nothing: adding a RAM block ([`MemorySystem::add_ram`], [`MemorySystem::create_ram`],
//! [`MemorySystem::add_ram_backed`], [`MemorySystem::create_ram_backed`],
//! [`MemorySystem::add_guest_memory`]) and removing a RAM region ([`MemorySystem::remove_region`]
//! of a region that owns a block). Stop or finish the migration first. The same holds while a
//! [`DirtyEpochs`] tracker is open ([`Error::DirtyEpochsOpen`]).
//!
//! Remaps stay allowed, because they keep the blocks: [`MemorySystem::map_region`] and
//! [`MemorySystem::unmap_region`] of existing RAM, and adding or removing aliases
//! ([`MemorySystem::add_alias`], [`MemorySystem::remove_region`] of an alias). Following them is
//! the accelerator's job: it syncs a logging section one last time in `region_del` and registers
//! the new one, already logging, in `region_add`; the migration keeps sending the same blocks.
//!
//! ```
//! use clearlog_memory::{Error, MemorySystem};
//!
//! let mem = MemorySystem::with_ram_capacity(1 << 30);
//! let ram = mem.add_ram("ram", 0, 16 << 20).unwrap();
//! mem.log_global_start().unwrap(); // a migration starts
//! assert!(matches!(mem.add_ram("hotplug", 1 << 32, 1 << 20), Err(Error::MigrationInProgress { .. })));
//! assert!(matches!(mem.remove_region(ram), Err(Error::MigrationInProgress { .. })));
//! mem.unmap_region(ram).unwrap(); // a remap is fine
//! mem.map_region(ram, 0, 0).unwrap();
//! mem.log_global_stop().unwrap(); // the migration ended
//! mem.add_ram("hotplug", 1 << 32, 1 << 20).unwrap();
//! ```
//!
//! # Examples
//!
//! ```
//! use clearlog_bitmap::Bitmap;
//! use clearlog_memory::{ClearBitmap, DirtyClient, MemorySystem};
//!
//! let mem = MemorySystem::with_ram_capacity(1 << 30);
//! let ram = mem.add_ram("ram", 0, 16 << 20).unwrap();
//! let block = mem.ram_blocks()[0].clone();
//!
//! // Migration: start logging, then sync the block into migration's own bitmap.
//! mem.log_global_start().unwrap();
//! block.write(0x5000, b"device DMA").unwrap();
//! mem.log_sync_all().unwrap(); // accelerators fold KVM's bits here
//! let mut to_send = Bitmap::new_filled(block.pages() as usize);
//! let mut clear = ClearBitmap::new(block.pages(), 15).unwrap();
//! let newly = mem.sync_migration_bitmap(&block, &mut to_send, Some(&mut clear));
//! assert_eq!(newly, 0); // page 5 was already marked for the first pass
//!
//! // Before sending page 5: re-arm its chunk in the accelerator, then read it.
//! clear
//!     .clear_run_before_read(5, 1, |first, n| {
//!         mem.clear_dirty_bitmap_block(&block, first << 12, n << 12)
//!     })
//!     .unwrap();
//! let mut page = [0u8; 4096];
//! block.read_page(5, &mut page).unwrap();
//! assert_eq!(&page[..10], b"device DMA");
//! # let _ = ram;
//! ```
#![deny(unreachable_pub)]

mod backing;
mod dirty;
mod epochs;
mod error;
mod ids;
mod listener;
mod mapping;
mod populated;
mod ram;
mod region;
mod snapshot;
mod system;
#[cfg(feature = "testing")]
pub mod testing;
mod vm_bitmap;
mod zero_scan;

pub use backing::RamBacking;
pub use clearlog_bitmap::ClearBitmap;
pub use dirty::DirtyMemory;
pub use epochs::EpochDelta;
pub use error::{Error, ListenerError, Result};
pub use ids::{DirtyClient, DirtyClients, RamBlockId, RegionId};
pub use listener::MemoryListener;
pub use populated::PopulatedMethod;
pub use ram::{is_zero_page, RamBlock};
pub use region::Section;
pub use snapshot::DirtySnapshot;
pub use system::{DirtyEpochs, MemorySystem, DEFAULT_RAM_CAPACITY};
pub use vm_bitmap::{DirtyBitmap, DirtyBitmapSlice};

/// log2 of the page size tracked by dirty logging.
pub const PAGE_SHIFT: u32 = 12;
/// Page size tracked by dirty logging (4 KiB, KVM's dirty-log granularity).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// The examples of `README.md`, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// One path per public item: the modules are private and every public item is re-exported at the
/// crate root (`clearlog_memory::{MemorySystem, RamBlock, ...}`), like kvm-ioctls. Only `testing`
/// (feature `testing`) is a public module. Each block below must fail to compile.
///
/// ```compile_fail,E0603
/// use clearlog_memory::backing::RamBacking;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::dirty::DirtyMemory;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::error::Error;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::listener::MemoryListener;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::ram::RamBlock;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::region::Section;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::snapshot::DirtySnapshot;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::system::MemorySystem;
/// ```
///
/// ```compile_fail,E0603
/// use clearlog_memory::vm_bitmap::DirtyBitmap;
/// ```
///
/// ```
/// use clearlog_memory::{
///     ClearBitmap, DirtyBitmap, DirtyMemory, DirtySnapshot, Error, MemoryListener, MemorySystem,
///     RamBacking, RamBlock, Section,
/// };
/// ```
#[cfg(doctest)]
pub struct PrivateModules;
