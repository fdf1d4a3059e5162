// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`DirtyEpochs`]: the [`DirtyClient::Snapshot`] client's tracker. Opening it logs all RAM for
//! Snapshot and takes a baseline; each advance syncs every listener, takes the client's bits
//! and re-arms the accelerators (take, re-arm, then the caller reads: docs/design.md section 2).

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use clearlog_bitmap::Bitmap;

use super::listeners::hook;
use super::{MemorySystem, State};
use crate::epochs::next_tracker_id;
use crate::{DirtyClient, DirtyMemory, EpochDelta, Error, RamBlock, Result};

/// Dirty epochs for snapshots: which pages changed since the previous epoch, lossless, next to a
/// running migration and a display.
///
/// A snapshot user opens one tracker per [`MemorySystem`] ([`open`](Self::open)); it owns the
/// [`DirtyClient::Snapshot`] client, which logs all RAM while the tracker is open. Epoch 0 starts
/// when `open` returns; each [`advance`](Self::advance) ends the running epoch, returns the pages
/// it changed as an [`EpochDelta`], and starts the next one. A diff snapshot is: `advance`, then
/// read every page of the delta. Dropping the tracker (or [`close`](Self::close)) turns the
/// client off.
///
/// # What it guarantees
///
/// - **No write is lost.** A write to a page, by a vCPU or by the VMM (a [`RamBlock::write`], or a
///   write through a vm-memory `GuestMemoryMmap<DirtyBitmap>`, see [`crate::DirtyBitmap`]), that
///   lands after `open` returned is reported by the delta of the epoch it landed in, or of a later
///   one. Precisely: a write that lands before an `advance` begins is in that advance's delta or an
///   earlier one, provided the vCPUs are out of `KVM_RUN` during the advance (paused); with vCPUs
///   running, an entry the CPU still buffers (Intel PML, the dirty ring) may come with the next
///   advance instead. A write that lands while an `advance` runs is in its delta (then it landed
///   before the page was re-armed, so a read after `advance` returns sees it) or in the next one.
/// - **So a chain of snapshots is exact.** Read all RAM after `open` returns (the full snapshot),
///   and after each `advance` read the pages of its delta: every page's latest content is in the
///   chain, or the page is in a later delta. The last delta, taken with the guest paused, leaves
///   nothing behind.
/// - **Other clients lose nothing.** The Snapshot client is one more client of the same
///   accelerator bits: a sync folds them into every client logging the section, and an advance
///   re-arms through the listeners' `log_clear`, which clears only bits the accelerator saw at its
///   last sync and has not cleared since (the per-slot cache rule). So a running migration (the
///   Migration client) or a display (Vga) never loses a write to the tracker's clears, and the
///   tracker never loses one to theirs. A migration may start and stop while the tracker is open,
///   and the reverse.
/// - **Never fewer, sometimes more.** A delta may report pages that did not change in its epoch: a
///   write that raced with the previous advance, a page rewritten with the same bytes, a section
///   unmapped (its pages are all reported), an accelerator that reports more. Never fewer.
/// - **Works in every dirty-log mode** of `clearlog-kvm`: clear (manual protect), legacy (the sync's
///   GET clears) and the dirty ring (the sync harvests and resets).
/// - While the tracker is open the RAM layout is fixed, as during a migration: adding a RAM block or
///   removing a RAM region is refused with [`Error::DirtyEpochsOpen`] (remaps are fine).
///
/// # What it costs
///
/// - Memory: the Snapshot client's bitmap (one bit per page of the RAM capacity, allocated with the
///   memory system), plus one bit per RAM page per delta the caller keeps.
/// - `open`: logging starts on every section that did not log yet (in clear mode with
///   `KVM_DIRTY_LOG_INITIALLY_SET` that costs nothing), then one baseline advance (its delta is
///   dropped: pages written before `open` are the full snapshot's business).
/// - Each `advance`: one `log_sync` of every mapped section (a clear-mode GET copies a slot's
///   bitmap without stalling vCPUs; a legacy GET clears and write-protects the slot, stalling
///   them; a ring sync harvests), a word-wise take of the client's bits, and one `log_clear` per
///   section (in clear mode `KVM_CLEAR_DIRTY_LOG` of the pages the accelerator saw dirty). Every
///   page of the delta is write-protected again, so the guest takes one fault at its next write
///   to it, as in a migration pass.
///
/// # Pages changed since an older epoch
///
/// The tracker keeps no history: the caller keeps the deltas it needs and merges consecutive ones
/// ([`EpochDelta::merge`]) to answer "changed since epoch `n`". Why: a diff-snapshot chain needs
/// only the previous epoch, each kept delta costs a bit per RAM page, and only the caller knows
/// when an old epoch can be forgotten (its snapshot merged or deleted). Merging is exact, since
/// each write is in some delta of the chain.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyClient, DirtyEpochs, Error, MemorySystem};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 30);
/// mem.add_ram("ram", 0, 16 << 20).unwrap();
/// let block = mem.ram_blocks()[0].clone();
///
/// let mut epochs = DirtyEpochs::open(&mem).unwrap();
/// assert!(mem.sections()[0].log.contains(DirtyClient::Snapshot));
/// // ... read all RAM: the full snapshot ...
/// block.write(0x5000, b"device DMA").unwrap();
/// mem.log_global_start().unwrap(); // a migration may run at the same time
/// let delta = epochs.advance().unwrap(); // the pages of epoch 0; epoch 1 starts
/// assert_eq!(delta.iter().collect::<Vec<_>>(), [(block.id(), 5)]);
/// // ... read page 5 of `block` into the diff snapshot ...
/// assert_eq!(epochs.epoch(), 1);
/// assert!(matches!(DirtyEpochs::open(&mem), Err(Error::DirtyEpochsOpen { .. })));
/// epochs.close().unwrap();
/// assert!(!mem.sections()[0].log.contains(DirtyClient::Snapshot));
/// ```
#[derive(Debug)]
pub struct DirtyEpochs<M: Deref<Target = MemorySystem>> {
    mem: M,
    tracker: u64,
    epoch: u64,
    open: bool,
}

impl<M: Deref<Target = MemorySystem>> DirtyEpochs<M> {
    /// Open the tracker of `mem` (`&MemorySystem`, `Arc<MemorySystem>`...): the Snapshot client
    /// logs all RAM, and epoch 0 starts when this returns.
    ///
    /// Listeners see `log_start` for every section (the Snapshot client joins its set), then a
    /// `log_sync` and a `log_clear` of every section: the baseline, whose pages are dropped.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyEpochsOpen`] if a tracker of `mem` is open; [`Error::Listener`] if a hook
    /// fails: then the tracker is not opened and logging for Snapshot is off again.
    ///
    /// # Examples
    ///
    /// See [`DirtyEpochs`].
    pub fn open(mem: M) -> Result<Self> {
        mem.open_epochs()?;
        Ok(DirtyEpochs {
            mem,
            tracker: next_tracker_id(),
            epoch: 0,
            open: true,
        })
    }

    /// The epoch running now (0 after `open`, `n + 1` after the `n + 1`-th advance).
    ///
    /// # Examples
    ///
    /// See [`DirtyEpochs`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The memory system tracked.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use clearlog_memory::{DirtyEpochs, MemorySystem};
    ///
    /// let mem = Arc::new(MemorySystem::with_ram_capacity(1 << 24));
    /// let epochs = DirtyEpochs::open(mem.clone()).unwrap(); // owns a clone of the Arc
    /// assert!(std::ptr::eq(epochs.memory(), &*mem));
    /// ```
    pub fn memory(&self) -> &MemorySystem {
        &self.mem
    }

    /// End the running epoch: sync every listener, take the Snapshot client's bits, re-arm the
    /// accelerators for every RAM block, and return the pages; the next epoch starts. Read the
    /// pages after this returns (take, re-arm, read: see the guarantees of [`DirtyEpochs`]).
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] if a sync or a clear fails. The epoch does not end then and nothing is
    /// lost: bits already taken are put back, and the next successful advance reports them.
    ///
    /// # Examples
    ///
    /// See [`DirtyEpochs`].
    pub fn advance(&mut self) -> Result<EpochDelta> {
        let blocks = self.mem.advance_epoch(self.epoch)?;
        let delta = EpochDelta::new(self.tracker, self.epoch, blocks);
        self.epoch += 1;
        Ok(delta)
    }

    /// Close the tracker: the Snapshot client stops logging (listeners see `log_stop`, with the
    /// last sync of a section that no client logs any more). Dropping the tracker does the same
    /// and logs a failure instead of returning it.
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] (the tracker is closed anyway).
    ///
    /// # Examples
    ///
    /// See [`DirtyEpochs`].
    pub fn close(mut self) -> Result<()> {
        self.open = false;
        self.mem.close_epochs()
    }
}

impl<M: Deref<Target = MemorySystem>> Drop for DirtyEpochs<M> {
    fn drop(&mut self) {
        if self.open {
            if let Err(e) = self.mem.close_epochs() {
                tracing::warn!(error = %e, "closing the dirty-epoch tracker failed");
            }
        }
    }
}

impl State {
    /// `log_sync` on every listener for every section that logs for Snapshot.
    fn sync_epoch_sections(&self, dirty: &DirtyMemory) -> Result<()> {
        for l in &self.listeners {
            for s in self
                .sections
                .iter()
                .filter(|s| s.log.contains(DirtyClient::Snapshot))
            {
                hook(l, "log_sync", l.listener.log_sync(s, dirty))?;
            }
        }
        Ok(())
    }

    /// Take the Snapshot client's bits of every block, then re-arm every block in the
    /// accelerators. If a re-arm fails, every taken bit is put back (OR-ed) and the error returned.
    fn take_and_rearm(&self, dirty: &DirtyMemory) -> Result<Vec<(Arc<RamBlock>, Bitmap)>> {
        let map = dirty.client(DirtyClient::Snapshot);
        let taken: Vec<(Arc<RamBlock>, Bitmap)> = self
            .blocks
            .iter()
            .map(|e| {
                let b = &e.block;
                let bits = map.take_range(b.ram_page_offset() as usize, b.pages() as usize);
                (b.clone(), bits)
            })
            .collect();
        let rearmed = taken
            .iter()
            .try_for_each(|(b, _)| self.clear_block_range(b.id(), 0, b.size()));
        if let Err(e) = rearmed {
            for (b, bits) in &taken {
                let client = DirtyClient::Snapshot.into();
                dirty.try_fold_bitmap(b.ram_page_offset(), bits.as_words(), b.pages(), client)?;
            }
            return Err(e);
        }
        Ok(taken)
    }
}

impl MemorySystem {
    /// Turn the Snapshot client on for all RAM and take the baseline (see [`DirtyEpochs::open`]).
    fn open_epochs(&self) -> Result<()> {
        let mut st = self.write();
        if st.epochs_open {
            return Err(Error::DirtyEpochsOpen {
                what: "open a second dirty-epoch tracker",
            });
        }
        // Bits of an earlier tracker (or its last sync) are not this tracker's.
        self.dirty.client(DirtyClient::Snapshot).clear_all();
        st.epochs_open = true;
        if let Err(e) = st.start_logging(&self.dirty) {
            st.epochs_open = false;
            return Err(e);
        }
        // The baseline: sync, take, re-arm, and drop what was taken (writes before `open` returns
        // are the full snapshot's; with INITIALLY_SET the first sync reports every page). The
        // re-arm also empties the per-slot caches of bits another client's sync put there before
        // Snapshot logged: their pages are writable, and a later clear of such a bit would hide a
        // write made after `open` from Snapshot, which never saw the bit.
        let baseline = st
            .sync_epoch_sections(&self.dirty)
            .and_then(|()| st.take_and_rearm(&self.dirty));
        if let Err(e) = baseline {
            st.epochs_open = false;
            let _ = st.update_topology(&self.dirty);
            self.dirty.client(DirtyClient::Snapshot).clear_all();
            return Err(e);
        }
        Ok(())
    }

    /// End epoch `epoch` (see [`DirtyEpochs::advance`]).
    fn advance_epoch(&self, epoch: u64) -> Result<Vec<(Arc<RamBlock>, Bitmap)>> {
        let started = Instant::now();
        let st = self.read();
        st.sync_epoch_sections(&self.dirty)?;
        let blocks = st.take_and_rearm(&self.dirty)?;
        tracing::debug!(
            epoch,
            pages = blocks
                .iter()
                .map(|(_, bits)| bits.count_ones())
                .sum::<usize>(),
            us = started.elapsed().as_micros() as u64,
            "dirty epoch ended"
        );
        Ok(blocks)
    }

    /// Turn the Snapshot client off (see [`DirtyEpochs::close`]).
    fn close_epochs(&self) -> Result<()> {
        let mut st = self.write();
        if !st.epochs_open {
            return Ok(());
        }
        st.epochs_open = false;
        let r = st.update_topology(&self.dirty);
        self.dirty.client(DirtyClient::Snapshot).clear_all();
        r
    }

    /// Open the dirty-epoch tracker of this memory system, borrowing it: same as
    /// [`DirtyEpochs::open`]`(self)`.
    ///
    /// # Errors
    ///
    /// As [`DirtyEpochs::open`].
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// let mut epochs = mem.open_dirty_epochs().unwrap();
    /// assert_eq!(epochs.advance().unwrap().dirty_pages(), 0);
    /// ```
    pub fn open_dirty_epochs(&self) -> Result<DirtyEpochs<&MemorySystem>> {
        DirtyEpochs::open(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::recorder::Recorder;
    use super::*;
    use crate::PAGE_SIZE;

    #[test]
    fn open_logs_then_takes_a_baseline_and_close_stops() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 1 << 20).unwrap();
        let r = Arc::new(Recorder::new("r", 0));
        mem.register_listener(r.clone()).unwrap();
        let epochs = DirtyEpochs::open(&mem).unwrap();
        assert_eq!(
            r.calls()[1..],
            ["r:log_start@0x0", "r:log_sync@0x0", "r:log_clear@0x0"],
            "logging starts, then the baseline syncs and re-arms"
        );
        assert!(mem.dirty().active_clients().contains(DirtyClient::Snapshot));
        drop(epochs); // dropping closes
        assert_eq!(r.calls()[4..], ["r:log_stop@0x0"]);
        assert!(mem.sections()[0].log.is_empty());
        assert!(!mem.dirty().active_clients().contains(DirtyClient::Snapshot));
    }

    #[test]
    fn host_writes_land_in_the_epoch_they_were_made_in() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 1 << 20).unwrap();
        let block = mem.ram_blocks()[0].clone();
        block.write(PAGE_SIZE, &[1]).unwrap(); // before open: the full snapshot's
        let mut epochs = mem.open_dirty_epochs().unwrap();
        block.write(2 * PAGE_SIZE, &[1]).unwrap();
        let e0 = epochs.advance().unwrap();
        block.write(3 * PAGE_SIZE + 10, &[1; 4096]).unwrap(); // pages 3 and 4
        let e1 = epochs.advance().unwrap();
        let e2 = epochs.advance().unwrap();
        let id = block.id();
        assert_eq!(e0.iter().collect::<Vec<_>>(), [(id, 2)]);
        assert_eq!(e1.iter().collect::<Vec<_>>(), [(id, 3), (id, 4)]);
        assert_eq!(e2.dirty_pages(), 0);
        assert_eq!((e1.epochs(), epochs.epoch()), (1..2, 3));
    }

    #[test]
    fn the_layout_is_fixed_and_one_tracker_at_a_time() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        let ram = mem.add_ram("ram", 0, 1 << 20).unwrap();
        let epochs = DirtyEpochs::open(&mem).unwrap();
        let refused = |r: Result<_>| matches!(r, Err(Error::DirtyEpochsOpen { .. }));
        assert!(refused(DirtyEpochs::open(&mem).map(drop)));
        assert!(refused(mem.add_ram("more", 1 << 20, 1 << 20).map(drop)));
        assert!(refused(mem.remove_region(ram)));
        assert!(matches!(
            mem.set_region_logging(ram, DirtyClient::Snapshot, true),
            Err(Error::NotPerRegionClient(DirtyClient::Snapshot))
        ));
        mem.unmap_region(ram).unwrap(); // remaps are fine
        mem.map_region(ram, 0, 0).unwrap();
        epochs.close().unwrap();
        mem.add_ram("more", 1 << 20, 1 << 20).unwrap();
        let _again = DirtyEpochs::open(&mem).unwrap();
    }

    #[test]
    fn a_failed_rearm_puts_the_bits_back_and_the_epoch_goes_on() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 1 << 20).unwrap();
        let block = mem.ram_blocks()[0].clone();
        let mut epochs = DirtyEpochs::open(&mem).unwrap();
        block.write(7 * PAGE_SIZE, &[1]).unwrap();
        let refuse: Arc<dyn crate::MemoryListener> =
            Arc::new(Recorder::new("no", 0).refusing("log_clear"));
        mem.register_listener(refuse.clone()).unwrap();
        assert!(matches!(epochs.advance(), Err(Error::Listener { .. })));
        assert_eq!(epochs.epoch(), 0, "the epoch did not end");
        mem.unregister_listener(&refuse).unwrap();
        let e0 = epochs.advance().unwrap();
        assert_eq!(e0.iter().collect::<Vec<_>>(), [(block.id(), 7)]);
    }

    #[test]
    fn a_failed_open_leaves_snapshot_logging_off() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 1 << 20).unwrap();
        for hook in ["log_start", "log_sync", "log_clear"] {
            let l: Arc<dyn crate::MemoryListener> = Arc::new(Recorder::new("no", 0).refusing(hook));
            mem.register_listener(l.clone()).unwrap();
            assert!(DirtyEpochs::open(&mem).is_err(), "{hook}");
            assert!(mem.sections()[0].log.is_empty(), "{hook}");
            assert!(mem.dirty().active_clients().is_empty(), "{hook}");
            mem.unregister_listener(&l).unwrap();
        }
        DirtyEpochs::open(&mem).unwrap();
    }
}
