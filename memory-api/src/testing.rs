// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A conformance check for [`MemoryListener`] implementations (cargo feature `testing`).
//!
//! An accelerator author calls [`check_memory_listener`] from their own test with a memory system,
//! their listener and a [`GuestWriter`] that dirties a guest page *as the guest would* (a store the
//! accelerator's dirty log sees: a vCPU write, or the model kernel's write in a unit test; never
//! [`crate::RamBlock::write`], which marks the clients directly and would hide a broken listener).
//! It panics, naming the rule broken, if the listener can lose a write:
//!
//! 1. **Clear before read.** A page written after a sync and the clear of its chunk
//!    ([`ClearBitmap::clear_run_before_read`] over [`MemorySystem::clear_dirty_bitmap_block`]) is
//!    reported by the next sync.
//! 2. **One clear per sync.** When two clients clear the same range after one sync (Migration with
//!    its chunk re-arm, Vga with [`MemorySystem::snapshot_and_clear_dirty`], in both
//!    orders), the second clear must not re-arm a page written after the first one: `log_clear` may
//!    clear only bits the accelerator saw at its last sync and has not cleared since (the 8-step race
//!    of the `KVM_CLEAR_DIRTY_LOG` series).
//! 3. **Dirty epochs.** A [`DirtyEpochs`] tracker next to the migration: a page the guest writes
//!    in an epoch is in that epoch's delta, and after the tracker's advance re-armed a page, the
//!    migration's re-arm of the same chunk (from the bits of an older sync) must not hide the
//!    next write from the next epoch (the same rule as 2, with the Snapshot client).
//! 4. **Final sync.** A page dirtied before logging stops on a section (`log_stop` of a Vga-only
//!    region, `log_global_stop`) or before its section goes away (`region_del`, here by unmapping)
//!    is in the clients' bitmaps afterwards.
//!
//! Extra dirty pages are never an error: `KVM_DIRTY_LOG_INITIALLY_SET`-style "everything dirty at
//! first" (and any over-reporting) only costs resends.
//!
//! The check registers the listener, adds one RAM region (`conformance`, at
//! [`ConformanceConfig::guest_addr`]), turns Vga and global logging on and off, and at the end
//! removes the region and unregisters the listener. The memory system must not have global logging
//! on, nor a dirty-epoch tracker open, nor a region in the way.
//!
//! # Examples
//!
//! A listener that ignores dirty logging altogether loses the write the guest makes:
//!
//! ```should_panic
//! use std::sync::Arc;
//! use clearlog_memory::testing::check_memory_listener;
//! use clearlog_memory::{MemoryListener, MemorySystem, Section};
//!
//! struct Deaf;
//! impl MemoryListener for Deaf {}
//!
//! let mem = MemorySystem::with_ram_capacity(64 << 20);
//! // The "guest" here writes somewhere no dirty log sees.
//! check_memory_listener(&mem, Arc::new(Deaf), &|_s: &Section, _page: u64| {});
//! ```
//!
//! An accelerator's own test looks like this (with its VM, its listener, and a vCPU or model
//! kernel that writes guest-physical `section.guest_addr + page * PAGE_SIZE`):
//!
//! ```ignore
//! #[test]
//! fn my_listener_conforms() {
//!     let mem = clearlog_memory::MemorySystem::new();
//!     let (listener, vm) = my_accelerator(&mem);
//!     clearlog_memory::testing::check_memory_listener(&mem, listener, &|s: &Section, page: u64| {
//!         vm.guest_store(s.guest_addr + page * clearlog_memory::PAGE_SIZE, 1u8);
//!     });
//! }
//! ```

use std::sync::Arc;

use clearlog_bitmap::Bitmap;

use crate::{
    ClearBitmap, DirtyClient, DirtyEpochs, MemoryListener, MemorySystem, RamBlock, RegionId,
    Section, PAGE_SHIFT,
};

/// Make [`RamBlock::populated_pages`] of `block` answer as on a kernel without `PAGEMAP_SCAN` or
/// `SEEK_DATA` (`on = true`): every asked range is reported whole. For testing a caller's fallback
/// path (e.g. a migration that must then read every page); `false` restores the real answer. Only
/// this block is affected, so tests running in parallel do not see it.
///
/// # Examples
///
/// ```
/// use clearlog_memory::testing::force_populated_fallback;
/// use clearlog_memory::MemorySystem;
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0, 1 << 20).unwrap();
/// let block = &mem.ram_blocks()[0];
/// force_populated_fallback(block, true);
/// let mut populated = Vec::new();
/// block.populated_pages(10, 20, &mut populated).unwrap();
/// assert_eq!(populated, [10..30]);
/// ```
pub fn force_populated_fallback(block: &RamBlock, on: bool) {
    block.set_populated_fallback(on);
}

/// Dirties a guest page as the guest would, so only the accelerator's dirty log sees it.
///
/// `page` is relative to the start of `section` (guest-physical address
/// `section.guest_addr + page * PAGE_SIZE`; the accelerator's slot is the one it registered for
/// `section`). Closures `Fn(&Section, u64)` implement it.
///
/// # Examples
///
/// ```
/// use std::sync::Mutex;
/// use clearlog_memory::testing::GuestWriter;
/// use clearlog_memory::{MemorySystem, Section};
///
/// let writes = Mutex::new(Vec::new());
/// let writer = |s: &Section, page: u64| writes.lock().unwrap().push(s.guest_addr + page * 4096);
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0x10_0000, 0x10000).unwrap();
/// writer.dirty(&mem.sections()[0], 2);
/// assert_eq!(*writes.lock().unwrap(), [0x10_2000]);
/// ```
pub trait GuestWriter {
    /// Make page `page` of `section` dirty in the accelerator's log.
    fn dirty(&self, section: &Section, page: u64);
}

impl<F: Fn(&Section, u64)> GuestWriter for F {
    fn dirty(&self, section: &Section, page: u64) {
        self(section, page);
    }
}

/// Where and how big the check's RAM region is.
///
/// # Examples
///
/// ```
/// let config = clearlog_memory::testing::ConformanceConfig::default();
/// assert_eq!(config.pages % 64, 0);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ConformanceConfig {
    /// Guest-physical address of the region (page-aligned).
    pub guest_addr: u64,
    /// Size in pages (at least 128: the check uses two 64-page chunks).
    pub pages: u64,
}

impl Default for ConformanceConfig {
    fn default() -> Self {
        ConformanceConfig {
            guest_addr: 0x1_0000_0000,
            pages: 256,
        }
    }
}

/// Run the conformance check with [`ConformanceConfig::default`] (256 pages at 4 GiB).
///
/// # Panics
///
/// Panics with a message naming the rule broken (or the step that failed), see the
/// [module docs](self).
///
/// # Examples
///
/// See the [module docs](self).
#[track_caller]
pub fn check_memory_listener(
    mem: &MemorySystem,
    listener: Arc<dyn MemoryListener>,
    guest: &dyn GuestWriter,
) {
    check_memory_listener_with(mem, listener, guest, &ConformanceConfig::default());
}

/// Run the conformance check with an explicit region placement.
///
/// # Panics
///
/// As [`check_memory_listener`]; also if `config.pages < 128`.
///
/// # Examples
///
/// See the [module docs](self).
#[track_caller]
pub fn check_memory_listener_with(
    mem: &MemorySystem,
    listener: Arc<dyn MemoryListener>,
    guest: &dyn GuestWriter,
    config: &ConformanceConfig,
) {
    assert!(
        config.pages >= 128,
        "conformance: the region needs at least 128 pages, got {}",
        config.pages
    );
    assert!(
        !mem.global_logging(),
        "conformance: start with global logging off"
    );
    let name = listener.name().to_owned();
    mem.register_listener(listener.clone())
        .unwrap_or_else(|e| panic!("conformance: register_listener({name}) failed: {e}"));
    let ram = mem
        .add_ram("conformance", config.guest_addr, config.pages << PAGE_SHIFT)
        .unwrap_or_else(|e| panic!("conformance: add_ram failed: {e}"));
    let (block, _) = ok(mem.region_block(ram), "region_block");
    let mut c = Check {
        mem,
        guest,
        ram,
        to_send: Bitmap::new(block.pages() as usize),
        clear: ok(
            ClearBitmap::new(block.pages(), ClearBitmap::MIN_SHIFT).map_err(crate::Error::from),
            "ClearBitmap::new",
        ),
        block,
    };
    c.final_sync_at_vga_log_stop();
    ok(mem.log_global_start(), "log_global_start");
    c.clear_before_read();
    c.one_clear_per_sync();
    c.epochs_next_to_migration();
    c.final_sync_at_global_stop();
    c.final_sync_at_region_del();
    ok(mem.remove_region(ram), "remove_region");
    ok(mem.unregister_listener(&listener), "unregister_listener");
}

#[track_caller]
fn ok<T>(r: crate::Result<T>, step: &str) -> T {
    r.unwrap_or_else(|e| panic!("conformance: {step} failed: {e}"))
}

struct Check<'a> {
    mem: &'a MemorySystem,
    guest: &'a dyn GuestWriter,
    ram: RegionId,
    block: Arc<RamBlock>,
    /// Migration's pages to send, and its chunks to clear.
    to_send: Bitmap,
    clear: ClearBitmap,
}

impl Check<'_> {
    /// The guest writes page `page` of the block (through the section that shows it).
    fn guest_dirty(&self, page: u64) {
        let offset = page << PAGE_SHIFT;
        let section = self
            .mem
            .sections()
            .into_iter()
            .find(|s| {
                Arc::ptr_eq(&s.block, &self.block)
                    && s.offset_in_block <= offset
                    && offset < s.offset_in_block + s.size
            })
            .unwrap_or_else(|| panic!("conformance: page {page} of the region is not mapped"));
        self.guest
            .dirty(&section, (offset - section.offset_in_block) >> PAGE_SHIFT);
    }

    fn ram_bit(&self, page: u64) -> usize {
        (self.block.ram_page_offset() + page) as usize
    }

    /// Migration's sync: every listener's `log_sync`, then take the Migration bits.
    fn migration_sync(&mut self) {
        ok(self.mem.log_sync_all(), "log_sync_all");
        self.take_migration_bits();
    }

    /// Take the Migration bits into `to_send` without a new `log_sync`.
    fn take_migration_bits(&mut self) {
        ok(
            self.mem.try_sync_migration_bitmap(
                &self.block,
                &mut self.to_send,
                Some(&mut self.clear),
            ),
            "sync_migration_bitmap",
        );
    }

    /// Migration sends page `page`: clear its chunk first (if it needs it), then "read" it.
    fn send(&mut self, page: u64) {
        ok(
            self.clear.clear_run_before_read(page, 1, |first, n| {
                self.mem
                    .clear_dirty_bitmap_block(&self.block, first << PAGE_SHIFT, n << PAGE_SHIFT)
            }),
            "clear_run_before_read (re-arm the chunk before its read)",
        );
        self.to_send.clear(page as usize);
    }

    /// Migration sends everything it has.
    fn send_all(&mut self) {
        let dirty: Vec<usize> = self.to_send.iter_ones().collect();
        for p in dirty {
            self.send(p as u64);
        }
    }

    /// Vga's snapshot of the whole region.
    fn vga_snapshot(&self) -> crate::DirtySnapshot {
        ok(
            self.mem
                .snapshot_and_clear_dirty(self.ram, 0, self.block.size(), DirtyClient::Vga),
            "snapshot_and_clear_dirty",
        )
    }

    /// Sync, send and snapshot until nothing the clients hold is pending (first syncs may report
    /// everything: allowed).
    fn drain(&mut self, vga: bool) {
        if self.mem.global_logging() {
            self.migration_sync();
            self.send_all();
        } else {
            ok(self.mem.log_sync(self.ram), "log_sync");
        }
        if vga {
            self.vga_snapshot();
        }
    }

    fn final_sync_at_vga_log_stop(&mut self) {
        ok(
            self.mem
                .set_region_logging(self.ram, DirtyClient::Vga, true),
            "set_region_logging(Vga, on)",
        );
        self.drain(true);
        let p = 7;
        self.guest_dirty(p);
        ok(
            self.mem
                .set_region_logging(self.ram, DirtyClient::Vga, false),
            "set_region_logging(Vga, off)",
        );
        assert!(
            self.mem
                .dirty()
                .client(DirtyClient::Vga)
                .test(self.ram_bit(p)),
            "rule broken (final sync at log_stop): page {p}, dirtied by the guest before the \
             region's only logging client (Vga) stopped, is not in Vga's bitmap: log_stop must \
             sync the section before logging goes off"
        );
        self.mem
            .dirty()
            .client(DirtyClient::Vga)
            .clear_range(self.ram_bit(0), self.block.pages() as usize);
    }

    fn clear_before_read(&mut self) {
        self.drain(false);
        let last = self.block.pages() - 1;
        let pages = [0, 1, 63, 64, last];
        for p in pages {
            self.guest_dirty(p);
        }
        self.migration_sync();
        for p in pages {
            assert!(
                self.to_send.test(p as usize),
                "rule broken (clear before read): page {p}, written by the guest after a sync and \
                 the re-arm of its chunk, was not reported by the next sync"
            );
        }
        // Once more for pages whose chunk was just cleared by sending them.
        self.send_all();
        for p in pages {
            self.guest_dirty(p);
        }
        self.migration_sync();
        for p in pages {
            assert!(
                self.to_send.test(p as usize),
                "rule broken (clear before read): page {p}, written by the guest after it was \
                 sent (its chunk cleared first), was not reported by the next sync"
            );
        }
        self.send_all();
    }

    fn one_clear_per_sync(&mut self) {
        ok(
            self.mem
                .set_region_logging(self.ram, DirtyClient::Vga, true),
            "set_region_logging(Vga, on)",
        );
        self.drain(true);
        self.drain(true);

        // Migration clears first, then Vga clears the same range.
        let p = 5;
        self.guest_dirty(p);
        self.migration_sync();
        assert!(
            self.to_send.test(p as usize),
            "rule broken (sync): page {p} written by the guest was not reported to Migration"
        );
        self.send(p); // re-arm the chunk, then read
        self.guest_dirty(p); // a write after Migration's clear
        let snap = self.vga_snapshot();
        assert!(
            snap.is_dirty(p << PAGE_SHIFT),
            "rule broken (sync): page {p} written by the guest before the last sync is not in \
             Vga's snapshot"
        );
        self.migration_sync();
        assert!(
            self.to_send.test(p as usize),
            "rule broken (one clear per sync): page {p} was written after Migration's \
             chunk re-arm; Vga's snapshot_and_clear_dirty of the same range then cleared \
             the accelerator's bit again for the same sync and the write was lost. log_clear may \
             clear only bits the accelerator saw at its last sync and has not cleared since"
        );
        self.send_all();
        self.vga_snapshot();

        // Vga clears first, then Migration clears the same chunk.
        let q = 70;
        self.guest_dirty(q);
        ok(self.mem.log_sync(self.ram), "log_sync (Vga)");
        let snap = self.vga_snapshot(); // Vga reads q
        assert!(
            snap.is_dirty(q << PAGE_SHIFT),
            "rule broken (sync): page {q} written by the guest is not in Vga's snapshot"
        );
        self.guest_dirty(q); // a write after Vga's clear
        self.take_migration_bits(); // Migration holds q from Vga's sync
        assert!(
            self.to_send.test(q as usize),
            "rule broken (sync): a log_sync must fold page {q} into every logging client \
             (Migration did not get it)"
        );
        self.send(q);
        self.migration_sync();
        assert!(
            self.to_send.test(q as usize),
            "rule broken (one clear per sync): page {q} was written after Vga's \
             snapshot_and_clear_dirty; Migration's re-arm of the same chunk then \
             cleared the accelerator's bit again for the same sync and the write was lost. \
             log_clear may clear only bits the accelerator saw at its last sync and has not \
             cleared since"
        );
        let snap = self.vga_snapshot();
        assert!(
            snap.is_dirty(q << PAGE_SHIFT),
            "rule broken (one clear per sync): page {q}, written after Vga's clear, is not in \
             Vga's next snapshot"
        );
        self.send_all();
        ok(
            self.mem
                .set_region_logging(self.ram, DirtyClient::Vga, false),
            "set_region_logging(Vga, off)",
        );
    }

    /// An advance of `epochs`: page `p` must be in the delta.
    fn epoch_must_hold(&self, epochs: &mut DirtyEpochs<&MemorySystem>, p: u64, why: &str) {
        let delta = ok(epochs.advance(), "DirtyEpochs::advance");
        assert!(
            delta.is_dirty(self.block.id(), p),
            "rule broken ({why}): page {p}, written by the guest in epoch {}, is not in its delta",
            delta.epochs().start
        );
    }

    fn epochs_next_to_migration(&mut self) {
        self.drain(false);
        let mut epochs = ok(DirtyEpochs::open(self.mem), "DirtyEpochs::open");
        // A write in an epoch, with a migration sync and re-arm in the middle.
        let p = 13;
        self.guest_dirty(p);
        self.migration_sync();
        self.send(p);
        self.guest_dirty(p); // after Migration's re-arm
        self.epoch_must_hold(
            &mut epochs,
            p,
            "epochs: a sync must fold into the Snapshot client",
        );
        self.migration_sync();
        assert!(
            self.to_send.test(p as usize),
            "rule broken (epochs): page {p}, written after Migration's re-arm, was not reported \
             to Migration after the epoch's advance synced and re-armed it"
        );
        self.send_all();

        // The epoch's re-arm first, then Migration's re-arm of the same chunk.
        let q = 77;
        self.guest_dirty(q);
        self.migration_sync(); // Migration holds q
        self.epoch_must_hold(&mut epochs, q, "epochs: sync");
        self.guest_dirty(q); // after the advance's re-arm
        self.send(q); // Migration re-arms q's chunk from its older bits
        self.epoch_must_hold(
            &mut epochs,
            q,
            "one clear per sync, epochs: Migration's re-arm of the chunk cleared the \
             accelerator's bit again after the advance had re-armed it, and the write was lost. \
             log_clear may clear only bits the accelerator saw at its last sync and has not \
             cleared since",
        );
        self.migration_sync();
        self.send_all();
        ok(epochs.close(), "DirtyEpochs::close");
    }

    fn final_sync_at_global_stop(&mut self) {
        self.drain(false);
        let p = 9;
        self.guest_dirty(p);
        ok(self.mem.log_global_stop(), "log_global_stop");
        assert!(
            self.mem
                .dirty()
                .client(DirtyClient::Migration)
                .test(self.ram_bit(p)),
            "rule broken (final sync at log_stop): page {p}, dirtied by the guest before \
             log_global_stop, is not in Migration's bitmap: log_stop must sync the section \
             before logging goes off"
        );
        self.take_migration_bits();
        self.to_send.fill(false);
    }

    fn final_sync_at_region_del(&mut self) {
        ok(self.mem.log_global_start(), "log_global_start");
        self.drain(false);
        let p = 11;
        self.guest_dirty(p);
        ok(self.mem.unmap_region(self.ram), "unmap_region");
        assert!(
            self.mem
                .dirty()
                .client(DirtyClient::Migration)
                .test(self.ram_bit(p)),
            "rule broken (final sync at region_del): page {p}, dirtied by the guest before its \
             section went away, is not in Migration's bitmap: region_del must sync a logging \
             section first"
        );
        ok(self.mem.log_global_stop(), "log_global_stop");
    }
}
