// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Dirty logging and the dirty-memory clients: per-region logging (Vga, Code), global logging
//! (Migration), syncs, clears through every listener's `log_clear`, and a client's
//! take-then-re-arm snapshot.

use std::sync::Arc;

use clearlog_bitmap::Bitmap;

use super::listeners::{final_sync, hook, keep_first};
use super::{check_range, MemorySystem, State};
use crate::{
    DirtyClient, DirtyClients, DirtyMemory, DirtySnapshot, Error, RamBlock, RamBlockId, RegionId,
    Result, Section, PAGE_SHIFT, PAGE_SIZE,
};

impl State {
    /// The clients that log somewhere: per-region clients, Migration while global logging is on,
    /// Snapshot while dirty epochs are open.
    pub(super) fn logging_clients(&self) -> DirtyClients {
        self.tree
            .region_logging_clients()
            .union(self.global_clients())
    }

    /// Apply a change that only turns logging on (a client added to a region's set, global logging
    /// started), all or nothing: every listener gets `log_start` for every section whose set grows.
    ///
    /// If a `log_start` fails, the change is rolled back: the listeners that already started for it
    /// get the matching `log_stop` (new set back to the old one, latest first), the sections and the
    /// active clients stay as they were, and the error is returned. The caller restores the flag
    /// it changed (the region's set, `global_logging`, `epochs_open`).
    pub(super) fn start_logging(&mut self, dirty: &DirtyMemory) -> Result<()> {
        let new = self.tree.flatten(self.global_clients());
        let same_sections = new.len() == self.sections.len()
            && new
                .iter()
                .zip(&self.sections)
                .all(|(n, o)| n.key() == o.key() && o.log.minus(n.log).is_empty());
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
            if s.log.minus(old.log).is_empty() {
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
    pub(super) fn clear_block_range(&self, block: RamBlockId, start: u64, end: u64) -> Result<()> {
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

impl MemorySystem {
    /// Turn dirty logging on or off for a client on a region (Vga/Code; Migration and Snapshot are
    /// global).
    ///
    /// Logging set on a RAM region covers the aliases that show it. Listeners see `log_start` /
    /// `log_stop` for the sections whose logging set changes. Setting the state the region already
    /// has is a no-op.
    ///
    /// # Errors
    ///
    /// [`Error::NotPerRegionClient`] for Migration and Snapshot, [`Error::UnknownRegion`],
    /// [`Error::Listener`].
    ///
    /// Turning logging on is all or nothing: if a listener's `log_start` fails, the listeners that
    /// already started for this call get the matching `log_stop`, and the region's logging set, the
    /// sections and the active clients are as before the call (a retry starts logging again).
    /// Turning logging off cannot be refused: a failed `log_stop` is returned, logging is off anyway
    /// and the section is marked dirty for the clients that were logging it (see
    /// [`MemoryListener::log_stop`](crate::MemoryListener::log_stop)).
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
    /// assert!(mem.set_region_logging(vram, DirtyClient::Snapshot, true).is_err());
    /// ```
    pub fn set_region_logging(
        &self,
        region: RegionId,
        client: DirtyClient,
        on: bool,
    ) -> Result<()> {
        if matches!(client, DirtyClient::Migration | DirtyClient::Snapshot) {
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
}

#[cfg(test)]
mod tests {
    use super::super::recorder::Recorder;
    use super::*;

    #[test]
    fn a_global_start_a_listener_refuses_is_rolled_back() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 1 << 20).unwrap();
        let ok = Arc::new(Recorder::new("ok", 0));
        let no = Arc::new(Recorder::new("no", 1).refusing("log_global_start"));
        mem.register_listener(ok.clone()).unwrap();
        mem.register_listener(no).unwrap();
        assert!(mem.log_global_start().is_err());
        assert!(!mem.global_logging());
        assert_eq!(
            ok.calls()[1..],
            ["ok:log_global_start", "ok:log_global_stop"],
            "the listener that started is stopped again"
        );
        assert!(mem.read().logging_clients().is_empty());
    }

    #[test]
    fn clears_and_syncs_reach_logging_sections_only() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        let vram = mem.add_ram("vram", 0, 1 << 20).unwrap();
        let ram = mem.add_ram("ram", 1 << 20, 1 << 20).unwrap();
        let r = Arc::new(Recorder::new("r", 0));
        mem.register_listener(r.clone()).unwrap();
        assert!(matches!(
            mem.clear_dirty_bitmap(vram, 0, 4096),
            Err(Error::LoggingOff { .. })
        ));
        mem.set_region_logging(vram, DirtyClient::Vga, true)
            .unwrap();
        mem.log_sync_all().unwrap();
        mem.clear_dirty_bitmap(vram, 0, 4096).unwrap();
        assert!(mem.clear_dirty_bitmap(ram, 0, 4096).is_err());
        assert_eq!(
            r.calls()[2..],
            ["r:log_start@0x0", "r:log_sync@0x0", "r:log_clear@0x0"]
        );
        assert_eq!(
            mem.read().logging_clients(),
            DirtyClients::NONE.with(DirtyClient::Vga)
        );
    }

    #[test]
    fn a_snapshot_takes_the_clients_bits_then_rearms() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        let vram = mem.add_ram("vram", 0, 1 << 20).unwrap();
        mem.set_region_logging(vram, DirtyClient::Vga, true)
            .unwrap();
        mem.ram_blocks()[0].write(0x5000, &[1]).unwrap();
        let snap = mem
            .snapshot_and_clear_dirty(vram, 0, 1 << 20, DirtyClient::Vga)
            .unwrap();
        assert!(snap.is_dirty(0x5000) && !snap.is_dirty(0x6000));
        let again = mem
            .snapshot_and_clear_dirty(vram, 0, 1 << 20, DirtyClient::Vga)
            .unwrap();
        assert!(!again.is_dirty(0x5000), "taken once");
    }
}
