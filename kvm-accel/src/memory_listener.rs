// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `KvmMemoryListener`: memslots that follow the memory map, and dirty logging through the
//! per-slot [`SlotDirtyCache`].
//!
//! The listener is the only code that talks to KVM's dirty log. All of its slot bookkeeping, the
//! `KVM_GET_DIRTY_LOG` of a sync and the `KVM_CLEAR_DIRTY_LOG` of a clear happen under one lock,
//! the *slots lock*, so a clear can never interleave with a sync or a slot change. In manual mode:
//!
//! - `log_sync` copies the kernel bitmap into the slot's cache (replacing it) and folds the cache
//!   into the clients logging the section. Nothing is cleared, so the vCPUs are not stalled.
//! - `log_clear` sends KVM only the cached bits of the range (widened to 64 pages with zeros, clamped
//!   at the slot end), then drops exactly that range from the cache: a bit is cleared at most once
//!   per sync, and only if KVM reported it, whoever asks (migration, a display...).
//!
//! In legacy mode `log_sync` gets (and thereby clears) the kernel bitmap and `log_clear` does nothing.
//! In ring mode a sync harvests the vCPU rings (docs/design.md section 2a).
//!
//! When a logging slot is deleted (`region_del`) or stops logging (`log_stop`), it is synced one
//! last time, and then its whole range is marked dirty for the clients that were logging it: a
//! vCPU may write it between that last GET (or reap) and the deletion, and such a write is in no
//! bitmap any more. So unmapping a region during a migration resends all of it, and nothing is
//! lost.
//!
//! # Example
//! ```
//! # if clearlog_kvm::doctest_kvm_skip("memory_listener.rs") { return; }
//! use std::sync::Arc;
//! use clearlog_kvm::{KvmMemoryListener, Vm, VmConfig};
//! use clearlog_memory::MemorySystem;
//!
//! let vm = Arc::new(Vm::new(VmConfig::default()).unwrap());
//! let memory = MemorySystem::new();
//! memory.add_ram("ram", 0, 64 << 20).unwrap();
//! let listener = Arc::new(KvmMemoryListener::new(vm.clone()));
//! memory.register_listener(listener.clone()).unwrap(); // slots are created now
//! memory.log_global_start().unwrap();                   // dirty logging on
//! memory.log_sync_all().unwrap();                       // GET into the caches, fold into clients
//! println!("{:?}", listener.stats());
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clearlog_memory::{
    DirtyClients, DirtyMemory, ListenerError, MemoryListener, RamBlock, Section,
};

use crate::dirty_cache::SlotDirtyCache;
use crate::error::Error;
use crate::guarded::GuardedWords;
use crate::ring::VcpuRingStats;
use crate::ring_registry::RingHarvester;
use crate::slots::{fill_pages, MemSlot, SlotOwner};
use crate::stats::{Counters, DirtyLogStats};
use crate::vm::Vm;

/// The default interval of the ring reaper thread
/// ([`KvmMemoryListener::start_ring_reaper`]); measured in docs/design.md ("The dirty ring").
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_kvm::RING_REAP_INTERVAL.as_millis(), 10);
/// ```
pub const RING_REAP_INTERVAL: Duration = Duration::from_millis(10);

/// The ring reaper thread of a listener; dropping it stops (and joins) the thread.
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("RingReaper") { return; }
/// use clearlog_kvm::{KvmDirtyLogMode, Vm, VmConfig};
///
/// let Ok(vm) = Vm::new(VmConfig::with_dirty_log(Some(KvmDirtyLogMode::Ring { bytes: 65536 }))) else {
///     return; // a kernel without the dirty ring
/// };
/// let vm = std::sync::Arc::new(vm);
/// let listener = std::sync::Arc::new(clearlog_kvm::KvmMemoryListener::new(vm));
/// let reaper: clearlog_kvm::RingReaper = listener.start_ring_reaper(clearlog_kvm::RING_REAP_INTERVAL).unwrap();
/// ```
pub struct RingReaper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RingReaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingReaper").finish_non_exhaustive()
    }
}

impl Drop for RingReaper {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One memslot created for one section.
#[derive(Debug)]
struct KvmSlot {
    id: u32,
    size: u64,
    host_addr: u64,
    /// Keeps the host mapping alive for as long as KVM may use it.
    _block: Arc<RamBlock>,
    /// Present while dirty logging is on (manual mode).
    cache: Option<SlotDirtyCache>,
    /// Present while dirty logging is on. The buffer `KVM_GET_DIRTY_LOG` writes into (legacy
    /// mode; manual mode, then copied into the cache): its words end right before a guard page,
    /// so a memslot changed behind our back makes the GET fail instead of overflow. In ring mode,
    /// the pages harvested from the rings since the last sync (the ring's per-slot cache).
    log_buffer: Option<GuardedWords>,
    /// The words of the last clear request, reused so a clear does not allocate.
    clear_words: Vec<u64>,
}

impl KvmSlot {
    fn logging(&self) -> bool {
        self.cache.is_some() || self.log_buffer.is_some()
    }
}

/// The slots lock's data: memslots by guest-physical start.
#[derive(Debug, Default)]
struct SlotTable {
    by_guest_addr: BTreeMap<u64, KvmSlot>,
}

impl SlotTable {
    /// The lowest id of `ids` that neither this table nor `taken` uses.
    fn free_id(&self, ids: Range<u32>, taken: impl Fn(u32) -> bool) -> Option<u32> {
        ids.into_iter()
            .find(|&id| !taken(id) && !self.by_guest_addr.values().any(|s| s.id == id))
    }
}

/// A listener's ring harvest: entries of its logging slots go into their pending bitmaps.
struct ListenerHarvest<'a> {
    table: &'a mut SlotTable,
    owner: SlotOwner,
    /// (slot id, guest address) of the previous entry's slot: runs of entries of one slot.
    last: Option<(u32, u64)>,
}

impl ListenerHarvest<'_> {
    /// The pending bitmap of this listener's logging memslot `id`.
    fn pending(&mut self, id: u32) -> Option<&mut GuardedWords> {
        let key = match self.last {
            Some((last, addr)) if last == id => addr,
            _ => {
                let addr = self
                    .table
                    .by_guest_addr
                    .iter()
                    .find(|(_, s)| s.id == id)
                    .map(|(&a, _)| a)?;
                self.last = Some((id, addr));
                addr
            }
        };
        self.table
            .by_guest_addr
            .get_mut(&key)
            .and_then(|s| s.log_buffer.as_mut())
    }
}

impl RingHarvester for ListenerHarvest<'_> {
    fn owner(&self) -> Option<SlotOwner> {
        Some(self.owner)
    }

    fn all_dirty(&mut self) {
        for slot in self.table.by_guest_addr.values_mut() {
            let pages = slot.size / crate::PAGE_SIZE;
            if let Some(words) = slot.log_buffer.as_mut() {
                fill_pages(words, pages);
            }
        }
    }

    fn take(&mut self, slot: u32, offset: u64) -> bool {
        match self.pending(slot) {
            Some(words) if (offset / 64) < words.len() as u64 => {
                words[(offset / 64) as usize] |= 1 << (offset % 64);
                true
            }
            _ => false,
        }
    }

    fn drain(&mut self, slot: u32, owner: SlotOwner, bits: &[u64]) -> bool {
        if owner != self.owner {
            return false;
        }
        // A slot of ours that no longer logs: its bits go (as its bitmap would).
        if let Some(words) = self.pending(slot) {
            for (w, b) in words.iter_mut().zip(bits) {
                *w |= b;
            }
        }
        true
    }
}

/// A [`MemoryListener`] that maps every RAM section to a KVM memslot and implements `log_sync` and
/// `log_clear` with a [`SlotDirtyCache`] per slot (see the module docs).
///
/// It owns its memslots: the [`Vm`] refuses its safe dirty-log and memslot calls on them
/// ([`Error::SlotOwnedByCache`]), so every GET and CLEAR of a listener slot goes through
/// its cache. Memslot ids come from [`KvmMemoryListener::new`]'s `0..max` or the range given to
/// [`KvmMemoryListener::with_slot_ids`] (next to a VMM's own memslots).
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("KvmMemoryListener") { return; }
/// use std::sync::Arc;
/// use clearlog_kvm::{KvmMemoryListener, Vm};
///
/// let vm = Arc::new(Vm::new(Default::default()).unwrap());
/// // The VMM uses memslots 0..8 itself: the listener takes ids from 8 on.
/// let listener = KvmMemoryListener::with_slot_ids(vm, 8..64).unwrap();
/// assert_eq!(listener.slot_ids(), 8..64);
/// ```
pub struct KvmMemoryListener {
    vm: Arc<Vm>,
    owner: SlotOwner,
    slot_ids: Range<u32>,
    slots: Mutex<SlotTable>,
    counters: Counters,
    /// Ring mode: kicks every vCPU out of `KVM_RUN` (set by the VMM), before the harvest of a
    /// sync, a region removal or a logging stop.
    ring_kick: Mutex<Option<RingKick>>,
}

/// A VMM callback that kicks every vCPU out of `KVM_RUN` (ring mode), so entries still in the
/// CPU's log buffer (PML) reach the rings.
pub type RingKick = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for KvmMemoryListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMemoryListener")
            .field("mode", &self.vm.dirty_log_mode())
            .field("slot_ids", &self.slot_ids)
            .field("slots", &self.lock().by_guest_addr.len())
            .field("stats", &self.stats())
            .finish()
    }
}

fn listener_error(e: impl Into<Error>) -> ListenerError {
    Box::new(e.into())
}

/// Marks every page of `section` dirty for `clients`: after its memslot was deleted or stopped
/// logging, writes made since its last GET (or reap) are in no bitmap.
fn mark_whole_section(
    dirty: &DirtyMemory,
    section: &Section,
    clients: DirtyClients,
) -> Result<(), ListenerError> {
    dirty
        .mark_dirty(clients, section.ram_first_page(), section.pages())
        .map_err(|e| -> ListenerError { Box::new(e) })?;
    tracing::debug!(
        guest_addr = section.guest_addr,
        pages = section.pages(),
        ?clients,
        "memslot deleted or logging off: its whole range is marked dirty"
    );
    Ok(())
}

impl KvmMemoryListener {
    /// A listener creating memslots in `vm`, with any id the kernel offers (`0..max_memslots`,
    /// lowest free first). Register it with
    /// [`MemorySystem::register_listener`](clearlog_memory::MemorySystem::register_listener).
    /// Next to memslots the VMM made itself, use [`KvmMemoryListener::with_slot_ids`].
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("new") { return; }
    /// use std::sync::Arc;
    /// let vm = Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// ```
    pub fn new(vm: Arc<Vm>) -> Self {
        let all = 0..vm.caps().max_memslots;
        Self::build(vm, all)
    }

    /// A listener whose memslots take ids from `ids` only (lowest free first), so it can live next
    /// to memslots the VMM made itself with other ids (KVM cannot be asked which ids are taken).
    ///
    /// Before it creates a memslot the listener probes the id in the kernel (see docs/design.md
    /// section 2b): an id that a memslot made outside its `Vm` already uses is
    /// refused with [`Error::SlotIdTaken`], naming it, whatever range was allowed (KVM would
    /// otherwise accept an identical request as a no-op, and the listener would take over the
    /// VMM's slot). The probe has no side effect once the `Vm` knows a memslot; for the very first
    /// one it creates and deletes a 1-page slot over an inaccessible page of ours at the new
    /// slot's guest address (a vCPU touching that page in that instant gets `EFAULT`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSlotIds`] for an empty range or one past the kernel's
    /// `KVM_CAP_NR_MEMSLOTS`.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("with_slot_ids") { return; }
    /// use std::sync::Arc;
    /// let vm = Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// // The VMM keeps memslots 0..16 for itself.
    /// let listener = clearlog_kvm::KvmMemoryListener::with_slot_ids(vm, 16..512).unwrap();
    /// ```
    pub fn with_slot_ids(vm: Arc<Vm>, ids: Range<u32>) -> Result<Self, Error> {
        let max = vm.caps().max_memslots;
        if ids.is_empty() || ids.end > max {
            return Err(Error::InvalidSlotIds {
                start: ids.start,
                end: ids.end,
                max,
            });
        }
        Ok(Self::build(vm, ids))
    }

    fn build(vm: Arc<Vm>, slot_ids: Range<u32>) -> Self {
        Self {
            owner: vm.new_cache_owner(),
            vm,
            slot_ids,
            slots: Mutex::new(SlotTable::default()),
            counters: Counters::default(),
            ring_kick: Mutex::new(None),
        }
    }

    /// The memslot ids this listener may use.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("slot_ids") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// let listener = clearlog_kvm::KvmMemoryListener::with_slot_ids(vm, 4..8).unwrap();
    /// assert_eq!(listener.slot_ids(), 4..8);
    /// ```
    pub fn slot_ids(&self) -> Range<u32> {
        self.slot_ids.clone()
    }

    fn owner(&self) -> SlotOwner {
        self.owner
    }

    /// The VM.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("vm") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// # let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// println!("{}", listener.vm().dirty_log_mode());
    /// ```
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Counters so far.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("stats") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// # let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// assert_eq!(listener.stats().clears, 0);
    /// ```
    pub fn stats(&self) -> DirtyLogStats {
        self.counters.snapshot()
    }

    /// The memslot id used for the section starting at `guest_addr`, if any (for tests and tools).
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("slot_id_at") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// # let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// assert_eq!(listener.slot_id_at(0), None);
    /// ```
    pub fn slot_id_at(&self, guest_addr: u64) -> Option<u32> {
        self.lock().by_guest_addr.get(&guest_addr).map(|s| s.id)
    }

    /// A copy of the dirty cache of the slot at `guest_addr` (manual mode, logging on).
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("cache_at") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// # let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// assert!(listener.cache_at(0).is_none());
    /// ```
    pub fn cache_at(&self, guest_addr: u64) -> Option<SlotDirtyCache> {
        self.lock()
            .by_guest_addr
            .get(&guest_addr)
            .and_then(|s| s.cache.clone())
    }

    /// Ring mode: sets the callback that kicks every vCPU (e.g. a signal to each vCPU thread);
    /// every `log_sync`, `region_del` and `log_stop` calls it before harvesting (outside the slots
    /// lock), so entries the CPU still buffers (PML) are flushed to the rings at the vCPUs' exits.
    /// The kick does not wait for the exits: what a vCPU
    /// flushes after the harvest comes with the next one, and a final sync with the vCPUs paused
    /// (out of `KVM_RUN`, buffers flushed) misses nothing.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("set_ring_kick") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// # let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// listener.set_ring_kick(std::sync::Arc::new(|| { /* pthread_kill each vCPU thread */ }));
    /// ```
    pub fn set_ring_kick(&self, kick: RingKick) {
        *self.ring_kick.lock().unwrap_or_else(|p| p.into_inner()) = Some(kick);
    }

    /// Ring mode: harvests every vCPU ring into the per-slot caches and resets the rings (all
    /// under the slots lock). Returns the entries harvested. The reaper thread
    /// ([`start_ring_reaper`](Self::start_ring_reaper)) and a vCPU's `KVM_EXIT_DIRTY_RING_FULL`
    /// handler call it; syncs do it themselves. Outside ring mode it does nothing (0).
    ///
    /// # Errors
    ///
    /// [`Error::DirtyRingResetFailed`] or [`Error::DirtyRingReset`]: `KVM_RESET_DIRTY_RINGS`
    /// failed or reset fewer entries than were harvested. The harvested bits are kept but held
    /// back: no sync folds them (it fails with [`Error::DirtyRingResetOwed`]) until a later
    /// harvest (every one calls the reset again while entries are owed) confirms them.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("reap_rings") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// # let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// let entries = listener.reap_rings().unwrap();
    /// ```
    pub fn reap_rings(&self) -> Result<u64, Error> {
        if !self.vm.dirty_log_mode().is_ring() {
            return Ok(0);
        }
        let mut table = self.lock();
        self.reap_locked(&mut table)
    }

    /// Per-vCPU ring counters (entries harvested, ring-full exits, rings found full), by vCPU
    /// index; empty outside ring mode.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("ring_stats") { return; }
    /// # let vm = std::sync::Arc::new(clearlog_kvm::Vm::new(Default::default()).unwrap());
    /// # let listener = clearlog_kvm::KvmMemoryListener::new(vm);
    /// for s in listener.ring_stats() {
    ///     println!("vCPU {}: {} pages dirtied", s.vcpu, s.harvested);
    /// }
    /// ```
    pub fn ring_stats(&self) -> Vec<VcpuRingStats> {
        self.vm.ring_stats()
    }

    /// Ring mode: starts a thread that reaps the rings every `interval` (see docs/design.md for
    /// the measured default, [`RING_REAP_INTERVAL`]), so rings rarely fill between syncs. It
    /// stops when the returned [`RingReaper`] is dropped (or the listener is gone).
    ///
    /// # Errors
    ///
    /// [`Error::DirtyRingNotEnabled`] outside ring mode; the thread could not be spawned.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("start_ring_reaper") { return; }
    /// use clearlog_kvm::{KvmDirtyLogMode, Vm, VmConfig};
    ///
    /// let Ok(vm) = Vm::new(VmConfig::with_dirty_log(Some(KvmDirtyLogMode::Ring { bytes: 65536 }))) else {
    ///     return; // a kernel without the dirty ring
    /// };
    /// let vm = std::sync::Arc::new(vm);
    /// let listener = std::sync::Arc::new(clearlog_kvm::KvmMemoryListener::new(vm));
    /// let reaper = listener.start_ring_reaper(clearlog_kvm::RING_REAP_INTERVAL).unwrap();
    /// drop(reaper); // stops the thread
    /// ```
    pub fn start_ring_reaper(self: &Arc<Self>, interval: Duration) -> Result<RingReaper, Error> {
        if !self.vm.dirty_log_mode().is_ring() {
            return Err(Error::DirtyRingNotEnabled {
                mode: self.vm.dirty_log_mode(),
            });
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let weak = Arc::downgrade(self);
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-ring-reaper".into())
            .spawn(move || loop {
                let (lock, cv) = &*s;
                let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                let (guard, _) = cv
                    .wait_timeout_while(guard, interval, |stopped| !*stopped)
                    .unwrap_or_else(|p| p.into_inner());
                if *guard {
                    return;
                }
                drop(guard);
                let Some(listener) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = listener.reap_rings() {
                    tracing::error!(error = %e, "dirty ring reaper: harvest failed");
                }
            })
            .map_err(|source| Error::ReaperThread { source })?;
        Ok(RingReaper {
            stop,
            thread: Some(thread),
        })
    }

    /// Harvest all rings into the slots' pending bitmaps, then take what the `Vm` kept for this
    /// listener's slots from other harvests. Called with the slots lock held.
    fn reap_locked(&self, table: &mut SlotTable) -> Result<u64, Error> {
        let mut h = ListenerHarvest {
            table,
            owner: self.owner(),
            last: None,
        };
        let (harvest, result) = self.vm.harvest_rings(&mut h);
        self.counters.add_reap(&harvest);
        result?;
        Ok(harvest.entries)
    }

    /// Ring mode: calls the VMM's kick ([`set_ring_kick`](Self::set_ring_kick)) so the vCPUs
    /// exit and flush what their CPUs still buffer into the rings, before a reap. Never called
    /// with the slots lock held (a kicked vCPU may reap on a ring-full exit).
    fn kick_vcpus(&self) {
        if self.vm.dirty_log_mode().is_ring() {
            let kick = self
                .ring_kick
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(kick) = kick {
                kick();
            }
        }
    }

    /// Ring mode: reap before a section's pending bits are folded.
    fn reap_if_ring(&self, table: &mut SlotTable) -> Result<(), ListenerError> {
        if self.vm.dirty_log_mode().is_ring() {
            self.reap_locked(table).map_err(listener_error)?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, SlotTable> {
        // A panic while holding the lock leaves the table consistent (every change is a single
        // insert/remove after the ioctl succeeded), so a poisoned lock is still usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_for<'a>(
        table: &'a mut SlotTable,
        section: &Section,
    ) -> Result<&'a mut KvmSlot, ListenerError> {
        match table.by_guest_addr.get_mut(&section.guest_addr) {
            Some(slot) if slot.size == section.size => Ok(slot),
            _ => Err(format!(
                "no memslot for section at {:#x} (+{:#x}): the listener missed its region_add",
                section.guest_addr, section.size
            )
            .into()),
        }
    }

    /// Register (`create`) or re-register with new flags the slot's memory with KVM.
    fn set_slot(
        &self,
        slot: &KvmSlot,
        guest_addr: u64,
        log_dirty: bool,
        create: bool,
    ) -> Result<(), ListenerError> {
        let s = MemSlot {
            guest_phys: guest_addr,
            size: slot.size,
            host_addr: slot.host_addr,
            log_dirty,
        };
        // SAFETY: the host range belongs to `slot._block`, an `Arc<RamBlock>` the slot holds until
        // the memslot is deleted (region_del or Drop), so it stays mapped while KVM may use it.
        unsafe { self.vm.set_slot_as(slot.id, s, self.owner(), create) }.map_err(listener_error)
    }

    fn start_logging(
        &self,
        slot: &mut KvmSlot,
        guest_addr: u64,
        create: bool,
    ) -> Result<(), ListenerError> {
        let pages = slot.size / crate::PAGE_SIZE;
        // Mapped before logging starts: a failure leaves the slot as it was.
        let buffer = GuardedWords::new(pages.div_ceil(64) as usize)
            .map_err(|source| listener_error(Error::GuardedBuffer { source }))?;
        self.set_slot(slot, guest_addr, true, create)?;
        if self.vm.dirty_log_mode().is_manual() {
            slot.cache = Some(SlotDirtyCache::new(pages));
        }
        slot.log_buffer = Some(buffer);
        Ok(())
    }

    /// GET the slot's log and fold it into `clients`. Called with the slots lock held.
    fn sync_slot(
        &self,
        slot: &mut KvmSlot,
        section: &Section,
        clients: DirtyClients,
        dirty: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        let start = Instant::now();
        let pages = section.pages();
        let words: &[u64] = match (&mut slot.cache, &mut slot.log_buffer) {
            (Some(cache), Some(buffer)) => {
                self.vm
                    .get_dirty_log_as(slot.id, buffer, self.owner())
                    .map_err(listener_error)?;
                // The GET result replaces the cache (same size: one bit per page of the slot).
                let dest = cache.sync_buffer();
                let n = dest.len().min(buffer.len());
                dest[..n].copy_from_slice(&buffer[..n]);
                cache.mark_synced();
                cache.bits().as_words()
            }
            // Ring mode: the pages harvested since the last sync (the caller reaped just now,
            // under the slots lock), once KVM_RESET_DIRTY_RINGS re-protected them: while a reset
            // is owed, some may still be writable, so nothing is folded (the bits stay).
            (None, Some(buffer)) if self.vm.dirty_log_mode().is_ring() => {
                let owed = self.vm.ring_reset_owed();
                if owed > 0 {
                    return Err(listener_error(Error::DirtyRingResetOwed { owed }));
                }
                buffer
            }
            (None, Some(buffer)) => {
                self.vm
                    .get_dirty_log_as(slot.id, buffer, self.owner())
                    .map_err(listener_error)?;
                buffer
            }
            // The memory system says a client logs this section, but the slot has no dirty log:
            // logging never started on it (a failed log_start or region_add). Returning Ok would
            // tell the client "nothing was written" while KVM tracks nothing at all.
            (_, None) => {
                return Err(listener_error(Error::SyncOfSlotNotLogging {
                    slot: slot.id,
                    guest_addr: section.guest_addr,
                    size: section.size,
                }))
            }
        };
        let found = dirty.try_fold_bitmap(section.ram_first_page(), words, pages, clients)?;
        if self.vm.dirty_log_mode().is_ring() {
            // Folded into the clients: like a legacy GET, a ring sync hands its bits over.
            if let Some(b) = slot.log_buffer.as_mut() {
                b.fill(0);
            }
        }
        let ns = start.elapsed().as_nanos() as u64;
        self.counters.add_sync(ns, found);
        tracing::debug!(
            slot = slot.id,
            pages_dirty = found,
            us = ns / 1000,
            "dirty log sync"
        );
        Ok(())
    }
}

impl MemoryListener for KvmMemoryListener {
    fn name(&self) -> &str {
        "kvm"
    }

    fn priority(&self) -> i32 {
        // Accelerators go first when the map grows, last when it shrinks.
        10
    }

    fn region_add(&self, section: &Section) -> Result<(), ListenerError> {
        let mut table = self.lock();
        if table.by_guest_addr.contains_key(&section.guest_addr) {
            return Err(format!("a memslot already starts at {:#x}", section.guest_addr).into());
        }
        let id = table
            .free_id(self.slot_ids.clone(), |id| self.vm.memslot(id).is_some())
            .ok_or_else(|| {
                listener_error(Error::SlotLimit {
                    start: self.slot_ids.start,
                    end: self.slot_ids.end,
                })
            })?;
        let mut slot = KvmSlot {
            id,
            size: section.size,
            host_addr: section.host_addr(),
            _block: section.block.clone(),
            cache: None,
            log_buffer: None,
            clear_words: Vec::new(),
        };
        if section.log.is_empty() {
            self.set_slot(&slot, section.guest_addr, false, true)?;
        } else {
            self.start_logging(&mut slot, section.guest_addr, true)?;
        }
        tracing::debug!(
            slot = id,
            guest_addr = section.guest_addr,
            size = section.size,
            "memslot added"
        );
        table.by_guest_addr.insert(section.guest_addr, slot);
        Ok(())
    }

    fn region_del(&self, section: &Section, dirty: &DirtyMemory) -> Result<(), ListenerError> {
        // Ring mode: entries the CPUs still buffer reach the rings before the reap (outside the
        // slots lock, as in log_sync).
        self.kick_vcpus();
        let mut table = self.lock();
        let reaped = self.reap_if_ring(&mut table);
        let slot = Self::slot_for(&mut table, section)?;
        // Whatever the guest wrote since the last sync must reach the clients before the slot
        // (and its dirty bitmap) disappears.
        let logging = slot.logging();
        let synced = if logging {
            reaped.and_then(|()| self.sync_slot(slot, section, section.log, dirty))
        } else {
            reaped
        };
        // The region goes away whatever happened: delete the memslot even if the sync failed (the
        // error is still reported), so KVM never keeps a slot the memory map no longer has.
        let removed = self
            .vm
            .remove_slot_as(slot.id, self.owner())
            .map_err(listener_error);
        tracing::debug!(
            slot = slot.id,
            guest_addr = section.guest_addr,
            "memslot removed"
        );
        let mut marked = Ok(());
        if removed.is_ok() {
            table.by_guest_addr.remove(&section.guest_addr);
            if logging {
                // A vCPU may have written the slot after the last GET (or reap) and before its
                // deletion: those writes are in no bitmap any more, so the whole range is dirty
                // for the clients that were logging it.
                marked = mark_whole_section(dirty, section, section.log);
            }
        }
        synced.and(removed).and(marked)
    }

    fn log_start(
        &self,
        section: &Section,
        old: DirtyClients,
        new: DirtyClients,
    ) -> Result<(), ListenerError> {
        if !old.is_empty() || new.is_empty() {
            return Ok(()); // KVM logs for all clients at once: nothing changes in the kernel
        }
        let mut table = self.lock();
        let slot = Self::slot_for(&mut table, section)?;
        if !slot.logging() {
            self.start_logging(slot, section.guest_addr, false)?;
            tracing::debug!(slot = slot.id, mode = %self.vm.dirty_log_mode(), "dirty logging started");
        }
        Ok(())
    }

    fn log_stop(
        &self,
        section: &Section,
        old: DirtyClients,
        new: DirtyClients,
        dirty: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        if old.is_empty() || !new.is_empty() {
            return Ok(());
        }
        // Ring mode: entries the CPUs still buffer reach the rings before the reap.
        self.kick_vcpus();
        let mut table = self.lock();
        self.reap_if_ring(&mut table)?;
        let slot = Self::slot_for(&mut table, section)?;
        if slot.logging() {
            // Last sync, for the clients that were logging, before the kernel drops the bitmap.
            self.sync_slot(slot, section, old, dirty)?;
            self.set_slot(slot, section.guest_addr, false, false)?;
            slot.cache = None;
            slot.log_buffer = None;
            tracing::debug!(slot = slot.id, "dirty logging stopped");
            // A vCPU may have written the slot after that sync and before logging went off: those
            // writes are in no bitmap, so the whole range is dirty for the clients that logged.
            mark_whole_section(dirty, section, old)?;
        }
        Ok(())
    }

    fn log_sync(&self, section: &Section, dirty: &DirtyMemory) -> Result<(), ListenerError> {
        self.kick_vcpus();
        let mut table = self.lock();
        self.reap_if_ring(&mut table)?;
        let slot = Self::slot_for(&mut table, section)?;
        self.sync_slot(slot, section, section.log, dirty)
    }

    fn log_clear(
        &self,
        section: &Section,
        first_page: u64,
        npages: u64,
    ) -> Result<(), ListenerError> {
        if !self.vm.dirty_log_mode().is_manual() {
            return Ok(()); // legacy: the GET of the sync already re-protected everything
        }
        let start = Instant::now();
        let mut table = self.lock();
        let slot = Self::slot_for(&mut table, section)?;
        let Some(cache) = slot.cache.as_mut() else {
            return Err(listener_error(Error::SlotNotLogging(slot.id)));
        };
        if !cache.is_synced() {
            // Nothing is known dirty in a slot never synced since its logging started (it was
            // created or re-created after the caller's sync, e.g. its region was unmapped and
            // mapped again during a migration): there is nothing to clear. Its pages reach the
            // clients through its own syncs (INITIALLY_SET: all dirty at the first one; without,
            // KVM write-protects a slot created logging), so refusing would only kill the caller.
            self.counters.add_clear_before_sync();
            tracing::trace!(
                slot = slot.id,
                first_page,
                npages,
                "dirty log clear before the slot's first sync: nothing known dirty, nothing cleared"
            );
            return Ok(());
        }
        let request = cache
            .take_clear_into(first_page, npages, &mut slot.clear_words)
            .map_err(listener_error)?;
        let Some(req) = request else {
            self.counters.add_clear_skipped();
            return Ok(());
        };
        // Still under the slots lock: no sync can refill the cache before the kernel is told.
        // The range comes from the slot's own cache (aligned, inside the slot) and the slot is
        // this listener's and logging, so the Vm's table need not be consulted again.
        self.vm
            .clear_owned_slot(slot.id, req.first_page, req.num_pages, &slot.clear_words)
            .map_err(listener_error)?;
        let ns = start.elapsed().as_nanos() as u64;
        self.counters.add_clear(ns, req.bits);
        tracing::trace!(
            slot = slot.id,
            first_page = req.first_page,
            num_pages = req.num_pages,
            bits_cleared = req.bits,
            us = ns / 1000,
            "dirty log clear"
        );
        Ok(())
    }
}

impl Drop for KvmMemoryListener {
    fn drop(&mut self) {
        // The slots hold the RAM blocks alive; delete the memslots before those references go, so
        // KVM never keeps a host range that could be unmapped and reused.
        let table = std::mem::take(&mut *self.lock());
        for slot in table.by_guest_addr.into_values() {
            if let Err(e) = self.vm.remove_slot_as(slot.id, self.owner()) {
                // KVM may still map this host range into the guest: the mapping must outlive the
                // memslot (see `set_slot`), so the RAM block is leaked on purpose, never unmapped.
                tracing::error!(
                    slot = slot.id,
                    host_addr = slot.host_addr,
                    size = slot.size,
                    error = %e,
                    "could not delete memslot on drop: its RAM block is LEAKED (kept mapped for \
                     as long as the process lives) so KVM never uses a freed host range"
                );
                std::mem::forget(slot._block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::DirtyRing;
    use crate::ring_registry::FakeReset;
    use clearlog_memory::{DirtyClient, MemorySystem};

    /// A real VM, or None (with a loud SKIPPED line) when /dev/kvm cannot be opened; with
    /// `CI=true` or `CLEARLOG_REQUIRE_KVM=1` that is a failure instead.
    fn real_vm(test: &str) -> Option<Arc<Vm>> {
        match Vm::new(crate::VmConfig::default()) {
            Ok(vm) => Some(Arc::new(vm)),
            Err(e)
                if std::env::var("CI").is_ok_and(|v| v == "true")
                    || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1") =>
            {
                panic!("{test}: KVM required but unusable: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: {test}: no usable /dev/kvm ({e})");
                None
            }
        }
    }

    /// Finding: a sync of a section that clients log, whose slot has no dirty log, returned Ok
    /// with no bits (the client would wait forever for writes it is never told about).
    #[test]
    fn sync_of_a_slot_that_is_not_logging_is_an_error() {
        let Some(vm) = real_vm("sync_of_a_slot_that_is_not_logging_is_an_error") else {
            return;
        };
        let memory = MemorySystem::with_ram_capacity(1 << 20);
        memory.add_ram("ram", 0, 1 << 20).unwrap();
        let listener = Arc::new(KvmMemoryListener::new(vm));
        memory.register_listener(listener.clone()).unwrap();
        // The memory system believes Migration logs the section; the slot was made without
        // logging (as if log_start had failed).
        let mut section = memory.sections()[0].clone();
        assert!(section.log.is_empty());
        section.log = DirtyClients::NONE.with(DirtyClient::Migration);
        let err = listener
            .log_sync(&section, memory.dirty())
            .expect_err("a sync that cannot report anything must fail");
        let id = listener.slot_id_at(0).unwrap();
        match err.downcast_ref::<Error>() {
            Some(Error::SyncOfSlotNotLogging { slot, .. }) => assert_eq!(*slot, id),
            other => panic!("expected SyncOfSlotNotLogging, got {other:?} ({err})"),
        }
        assert!(err.to_string().contains(&format!("memslot {id}")), "{err}");
        assert_eq!(listener.stats().syncs, 0);
    }

    /// Finding: `drop` released the slot's RAM block even when deleting the memslot failed, so
    /// KVM could keep a host range that gets unmapped and reused.
    #[test]
    fn a_failed_memslot_delete_on_drop_keeps_the_ram_block_mapped() {
        let Some(vm) = real_vm("a_failed_memslot_delete_on_drop_keeps_the_ram_block_mapped") else {
            return;
        };
        let memory = MemorySystem::with_ram_capacity(1 << 20);
        let ram = memory.add_ram("ram", 0, 1 << 20).unwrap();
        let listener = Arc::new(KvmMemoryListener::new(vm.clone()));
        memory.register_listener(listener.clone()).unwrap();
        let block = Arc::downgrade(&memory.region_block(ram).unwrap().0);
        let id = listener.slot_id_at(0).unwrap();
        // Injection: the delete of this slot fails (the Vm no longer lets the listener touch it).
        vm.steal_slot_for_test(id);
        // Unregistering would try region_del first: drop the memory system (and its block
        // references) and the listener instead, as a VMM tearing down does.
        drop(memory);
        drop(listener);
        assert!(
            block.upgrade().is_some(),
            "the RAM block behind memslot {id} was freed although KVM still has the memslot"
        );
        // The kernel still has the slot: the VM's own teardown removes it.
        assert!(vm.memslot(id).is_some());
    }

    /// A real VM in ring mode (its memslots are real) whose rings the tests fake
    /// ([`Vm::register_fake_ring`]), or None (SKIPPED) without KVM or without a dirty ring.
    fn real_ring_vm(test: &str) -> Option<Arc<Vm>> {
        let required = std::env::var("CI").is_ok_and(|v| v == "true")
            || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1");
        match Vm::new(crate::VmConfig {
            dirty_log: Some(crate::KvmDirtyLogMode::Ring { bytes: 1 << 16 }),
            ..Default::default()
        }) {
            Ok(vm) => Some(Arc::new(vm)),
            Err(e @ Error::DirtyRingUnsupported) => {
                eprintln!("SKIPPED: {test}: {e}");
                None
            }
            Err(e) if required => panic!("{test}: KVM required but unusable: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: {test}: no usable /dev/kvm ({e})");
                None
            }
        }
    }

    const RING_RAM: u64 = 1 << 20; // 256 pages

    /// A memory system with `RING_RAM` of RAM at `gpa`, a listener on `vm` with `ids` registered
    /// and global logging on; returns the listener's memslot id too.
    fn ring_rig(
        vm: &Arc<Vm>,
        gpa: u64,
        ids: Range<u32>,
    ) -> (MemorySystem, Arc<KvmMemoryListener>, u32) {
        let memory = MemorySystem::with_ram_capacity(4 << 20);
        memory.add_ram("ram", gpa, RING_RAM).unwrap();
        let listener = Arc::new(KvmMemoryListener::with_slot_ids(vm.clone(), ids).unwrap());
        memory.register_listener(listener.clone()).unwrap();
        memory.log_global_start().unwrap();
        let id = listener.slot_id_at(gpa).unwrap();
        (memory, listener, id)
    }

    /// The Migration client's dirty pages of the memory system's only RAM block.
    fn migration_pages(memory: &MemorySystem) -> Vec<u64> {
        let block = memory.ram_blocks()[0].clone();
        let first = block.ram_page_offset();
        let map = memory.dirty().client(DirtyClient::Migration);
        (0..block.pages())
            .filter(|&p| map.test((first + p) as usize))
            .collect()
    }

    fn push(vm: &Vm, vcpu: u32, at: u32, slot: u32, offset: u64) {
        vm.rings_for_test()
            .fake_ring(vcpu)
            .kernel_push(at, slot, offset)
            .expect("a free ring entry");
    }

    /// Finding 4: a listener's reap dropped the entries of a logging slot the VMM made with
    /// `Vm::set_memslot`; `Vm::get_dirty_log` on it failed in ring mode.
    #[test]
    fn a_vmm_logging_slot_keeps_its_ring_entries() {
        use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        // Declared before the Vm: dropped after it, so it outlives the memslot.
        let vmm_mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(64 << 20), 64 * 4096)]).unwrap();
        let Some(vm) = real_ring_vm("a_vmm_logging_slot_keeps_its_ring_entries") else {
            return;
        };
        let host = vmm_mem.get_host_address(GuestAddress(64 << 20)).unwrap() as u64;
        // SAFETY: `vmm_mem` outlives `vm` (declared first, dropped last).
        unsafe { vm.set_memslot(100, 64 << 20, 64 * 4096, host, true) }.unwrap();
        let (memory, listener, id) = ring_rig(&vm, 0, 0..8);
        vm.rings_for_test().register_fake(0, DirtyRing::fake(16));
        push(&vm, 0, 0, 100, 4);
        push(&vm, 0, 1, id, 2);
        memory.log_sync_all().unwrap();
        assert_eq!(migration_pages(&memory), vec![2]);
        assert_eq!(listener.stats().ring_foreign, 0, "nothing was dropped");
        let mut bitmap = [0u64; 1];
        vm.get_dirty_log(100, &mut bitmap).unwrap();
        assert_eq!(
            bitmap,
            [1 << 4],
            "the VMM's slot gets the entry the listener harvested"
        );
        // Get-and-clear, like a legacy GET.
        vm.get_dirty_log(100, &mut bitmap).unwrap();
        assert_eq!(bitmap, [0]);
        // A GET harvests too, and keeps the listener's entries for the listener.
        push(&vm, 0, 2, 100, 6);
        push(&vm, 0, 3, id, 8);
        vm.get_dirty_log(100, &mut bitmap).unwrap();
        assert_eq!(bitmap, [1 << 6]);
        memory.log_sync_all().unwrap();
        assert_eq!(migration_pages(&memory), vec![2, 8]);
    }

    /// Finding 4: a second listener on the same Vm lost the entries the first one harvested.
    #[test]
    fn a_second_listener_gets_the_entries_the_first_one_harvested() {
        let Some(vm) = real_ring_vm("a_second_listener_gets_the_entries_the_first_one_harvested")
        else {
            return;
        };
        let (memory_a, listener_a, id_a) = ring_rig(&vm, 0, 0..8);
        let (memory_b, _listener_b, id_b) = ring_rig(&vm, 16 << 20, 8..16);
        vm.rings_for_test().register_fake(0, DirtyRing::fake(16));
        push(&vm, 0, 0, id_a, 1);
        push(&vm, 0, 1, id_b, 11);
        memory_a.log_sync_all().unwrap();
        assert_eq!(migration_pages(&memory_a), vec![1]);
        assert_eq!(listener_a.stats().ring_foreign, 0, "nothing was dropped");
        memory_b.log_sync_all().unwrap();
        assert_eq!(
            migration_pages(&memory_b),
            vec![11],
            "the second listener's entry, harvested by the first, must reach it"
        );
    }

    /// Finding 2: a failed `KVM_RESET_DIRTY_RINGS` left the harvested pages writable with their
    /// bits pending; a later sync with no new entry issued no reset and folded them.
    #[test]
    fn a_failed_ring_reset_blocks_the_fold_until_a_reset_confirms() {
        let Some(vm) = real_ring_vm("a_failed_ring_reset_blocks_the_fold_until_a_reset_confirms")
        else {
            return;
        };
        let (memory, listener, id) = ring_rig(&vm, 0, 0..8);
        vm.rings_for_test().register_fake(0, DirtyRing::fake(16));
        memory.log_sync_all().unwrap();
        vm.rings_for_test()
            .set_fake_reset(FakeReset::Fail(libc::EIO));
        push(&vm, 0, 0, id, 3);
        assert!(listener.reap_rings().is_err(), "the reset failed");
        // No new entry: the next sync must still not fold page 3 (it is writable, unreported).
        let synced = memory.log_sync_all();
        assert!(
            synced.is_err(),
            "a sync folded bits while KVM_RESET_DIRTY_RINGS was still owed: {:?}",
            migration_pages(&memory)
        );
        assert_eq!(migration_pages(&memory), Vec::<u64>::new());
        // The reset works again: the next harvest resets although nothing is new, then folds.
        vm.rings_for_test().set_fake_reset(FakeReset::Kernel);
        memory.log_sync_all().unwrap();
        assert_eq!(migration_pages(&memory), vec![3], "the bit is not lost");
        assert_eq!(vm.rings_for_test().fake_ring(0).kernel_marked_reset(), 0);
    }

    /// Finding 2: a partial reset (fewer entries than marked) is retried by every later harvest,
    /// even one with no new entry, and nothing folds before it is confirmed.
    #[test]
    fn a_partial_ring_reset_is_retried_by_the_next_harvest() {
        let Some(vm) = real_ring_vm("a_partial_ring_reset_is_retried_by_the_next_harvest") else {
            return;
        };
        let (memory, listener, id) = ring_rig(&vm, 0, 0..8);
        vm.rings_for_test().register_fake(0, DirtyRing::fake(16));
        memory.log_sync_all().unwrap();
        vm.rings_for_test().set_fake_reset(FakeReset::AtMost(1));
        push(&vm, 0, 0, id, 5);
        push(&vm, 0, 1, id, 6);
        assert!(listener.reap_rings().is_err(), "1 of 2 entries reset");
        vm.rings_for_test()
            .set_fake_reset(FakeReset::Fail(libc::EIO));
        assert!(
            memory.log_sync_all().is_err(),
            "a sync folded bits while an entry was still owed a reset: {:?}",
            migration_pages(&memory)
        );
        vm.rings_for_test().set_fake_reset(FakeReset::AtMost(1));
        memory.log_sync_all().unwrap();
        assert_eq!(
            vm.rings_for_test().fake_ring(0).kernel_marked_reset(),
            0,
            "the harvest with no new entry must call KVM_RESET_DIRTY_RINGS for the owed entry"
        );
        assert_eq!(migration_pages(&memory), vec![5, 6]);
    }

    /// Finding 1: a ring found completely full (no ring-full exit reported) may have lost entries,
    /// but the harvest only logged it: the next fold reported just the entries it found.
    #[test]
    fn a_ring_found_full_makes_every_logging_slot_dirty() {
        let Some(vm) = real_ring_vm("a_ring_found_full_makes_every_logging_slot_dirty") else {
            return;
        };
        let (memory, listener, id) = ring_rig(&vm, 0, 0..8);
        // A second listener on the same Vm: its slot's entries are kept for it by the Vm.
        let (memory_b, _listener_b, id_b) = ring_rig(&vm, 16 << 20, 8..16);
        vm.rings_for_test().register_fake(0, DirtyRing::fake(8));
        memory.log_sync_all().unwrap();
        assert_eq!(migration_pages(&memory), Vec::<u64>::new());
        // The kernel filled the whole ring (past its soft limit) and no exit was reported.
        for i in 0..7 {
            push(&vm, 0, i, id, u64::from(i) * 3);
        }
        push(&vm, 0, 7, id_b, 1);
        memory.log_sync_all().unwrap();
        assert_eq!(listener.stats().ring_found_full, 1);
        assert_eq!(
            migration_pages(&memory).len() as u64,
            RING_RAM / 4096,
            "a ring found full may have lost entries of any slot: every page of the harvesting \
             listener's logging slots must be reported"
        );
        memory_b.log_sync_all().unwrap();
        assert_eq!(
            migration_pages(&memory_b).len() as u64,
            RING_RAM / 4096,
            "a ring found full: every page of the other listener's logging slot must be reported"
        );
    }

    /// Finding 3: unregistering a ring dropped it with its unharvested entries.
    #[test]
    fn unregistering_a_ring_harvests_it_first() {
        let Some(vm) = real_ring_vm("unregistering_a_ring_harvests_it_first") else {
            return;
        };
        let (memory, _listener, id) = ring_rig(&vm, 0, 0..8);
        vm.rings_for_test().register_fake(7, DirtyRing::fake(16));
        memory.log_sync_all().unwrap();
        push(&vm, 7, 0, id, 9);
        assert!(vm.unregister_vcpu_ring(7).unwrap());
        assert!(vm.ring_stats().is_empty(), "the ring is gone");
        assert!(
            !vm.unregister_vcpu_ring(7).unwrap(),
            "not registered any more"
        );
        memory.log_sync_all().unwrap();
        assert_eq!(
            migration_pages(&memory),
            vec![9],
            "the entry left in the unregistered ring must reach its slot's owner"
        );
        // A reset that fails: the ring stays (with its entries, kept for their owner).
        vm.rings_for_test().register_fake(8, DirtyRing::fake(16));
        push(&vm, 8, 0, id, 10);
        vm.rings_for_test()
            .set_fake_reset(FakeReset::Fail(libc::EIO));
        vm.unregister_vcpu_ring(8).unwrap_err();
        assert_eq!(vm.ring_stats().len(), 1, "the ring is kept");
        vm.rings_for_test().set_fake_reset(FakeReset::Kernel);
        assert!(vm.unregister_vcpu_ring(8).unwrap());
        memory.log_sync_all().unwrap();
        assert_eq!(migration_pages(&memory), vec![9, 10]);
    }

    #[test]
    fn free_ids_fill_holes_and_respect_the_limit() {
        let memory = MemorySystem::new();
        memory.add_ram("ram", 0, 1 << 20).unwrap();
        let block = memory.ram_blocks()[0].clone();
        let slot = |id| KvmSlot {
            id,
            size: 4096,
            host_addr: 0,
            _block: block.clone(),
            cache: None,
            log_buffer: None,
            clear_words: Vec::new(),
        };
        let mut t = SlotTable::default();
        let none = |_| false;
        assert_eq!(t.free_id(0..2, none), Some(0));
        t.by_guest_addr.insert(0, slot(0));
        t.by_guest_addr.insert(4096, slot(2));
        assert_eq!(t.free_id(0..8, none), Some(1));
        t.by_guest_addr.insert(8192, slot(1));
        assert_eq!(t.free_id(0..8, none), Some(3));
        assert_eq!(t.free_id(0..3, none), None);
        // A caller-given range, and ids the Vm knows are taken by someone else.
        assert_eq!(t.free_id(2..8, none), Some(3));
        assert_eq!(t.free_id(2..8, |id| id == 3 || id == 4), Some(5));
        assert_eq!(t.free_id(5..6, |id| id == 5), None);
    }
}
