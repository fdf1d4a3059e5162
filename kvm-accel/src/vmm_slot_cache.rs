// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`VmmSlotCache`]: loss-free `KVM_GET_DIRTY_LOG`/`KVM_CLEAR_DIRTY_LOG` over memslots the VMM
//! creates and keeps itself, with no memory API: the per-slot [`SlotDirtyCache`] of
//! docs/design.md section 2 for a VMM shaped like cloud-hypervisor (its own `VmFd`, its own
//! memslots, its own `GuestMemoryMmap<AtomicBitmap>`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use clearlog_bitmap::{AtomicBitmap, Bitmap, ClearBitmap};

use crate::caps::{enable_manual_protect, KvmCaps};
use crate::dirty_cache::SlotDirtyCache;
use crate::error::{Error, Result};
use crate::fd::AsKvmFd;
use crate::guarded::GuardedWords;
use crate::ring_registry::RingHarvester;
use crate::slots::{fill_pages, MemSlot, SlotOwner};
use crate::stats::{Counters, DirtyLogStats};
use crate::vm::Vm;

/// One tracked memslot.
#[derive(Debug)]
struct Tracked {
    slot: MemSlot,
    /// Manual mode: the last GET minus every range cleared since.
    cache: Option<SlotDirtyCache>,
    /// What `KVM_GET_DIRTY_LOG` writes into (its words end right before a guard page); in ring
    /// mode, the pages harvested from the rings since the last sync.
    buffer: GuardedWords,
    /// The words of the last clear request, reused so a clear does not allocate.
    clear_words: Vec<u64>,
    /// What [`VmmSlotCache::sync_all`] and [`VmmSlotCache::mark`] collected and
    /// [`VmmSlotCache::take`] has not taken yet.
    collected: AtomicBitmap,
}

/// The per-slot dirty cache over memslots the VMM made itself (through its own VM fd, e.g.
/// kvm-ioctls' `VmFd::set_user_memory_region`) and keeps: [`track`](Self::track) a logging
/// memslot, then read its dirty log with [`sync`](Self::sync) and re-arm ranges with
/// [`clear`](Self::clear). A clear sends KVM only the bits the last sync reported and has not
/// cleared since, whoever asks, so two clients of the same bits (migration and a display, or a
/// retried migration) never clear a bit twice for one sync (docs/design.md section 2). Syncs and
/// clears of all tracked slots are serialized by one lock, held across each ioctl.
///
/// What [`KvmMemoryListener`](crate::KvmMemoryListener) is for `clearlog-memory`'s map, this is
/// for a VMM that keeps its own memslots and guest memory: no `MemorySystem`, no memslots of
/// ours. The modes behave as the listener's: manual protection caches (clear re-arms), legacy
/// GETs clear (clear does nothing), the ring harvests (a sync takes what the rings reported).
///
/// The VMM keeps owning its memslots: it turns logging on (`KVM_MEM_LOG_DIRTY_PAGES`) before
/// [`track`](Self::track) and calls [`untrack`](Self::untrack) (a last sync) before it turns
/// logging off, deletes or changes the slot. While a slot is tracked, the [`Vm`]'s own dirty-log
/// calls refuse it ([`Error::SlotOwnedByCache`]); nothing else may GET or CLEAR it (a
/// `VmFd::get_dirty_log` of the VMM's would lose bits in legacy mode and clear behind the cache's
/// back in manual mode).
///
/// # Example
///
/// The VMM's own VM and memslot, passed as they are:
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("VmmSlotCache") { return; }
/// use std::sync::Arc;
/// use clearlog_kvm::{enable_manual_protect, KvmCaps, MemSlot, Vm, VmmSlotCache};
/// use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
/// use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
///
/// // The VMM: guest memory, its VM (manual protection on), its memslot 0, logging.
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let vm_fd = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
/// let mode = enable_manual_protect(&vm_fd, KvmCaps::probe(&vm_fd).manual_protect_flags).unwrap();
/// let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
/// let region = kvm_userspace_memory_region {
///     slot: 0,
///     flags: KVM_MEM_LOG_DIRTY_PAGES,
///     guest_phys_addr: 0,
///     memory_size: 1 << 20,
///     userspace_addr: host,
/// };
/// // SAFETY: `mem` maps these bytes and outlives the VM (declared first, dropped last).
/// unsafe { vm_fd.set_user_memory_region(region) }.unwrap();
///
/// // clearlog: our cache over the VMM's slot.
/// let cache = VmmSlotCache::new(Arc::new(Vm::from_fd(&vm_fd, mode).unwrap()));
/// let slot = MemSlot { guest_phys: 0, size: 1 << 20, host_addr: host, log_dirty: true };
/// cache.track(0, slot).unwrap();
/// let mut dirty = 0;
/// cache.sync(0, |words| dirty = words.iter().map(|w| w.count_ones()).sum()).unwrap();
/// // INITIALLY_SET: everything reads dirty at first; re-arm all of it.
/// cache.clear(0, 0, slot.pages()).unwrap();
/// assert!(cache.clear(0, 0, slot.pages()).unwrap() == 0, "a bit is cleared once per sync");
/// cache.untrack(0, |_| {}).unwrap(); // a last sync before the VMM changes its slot
/// # let _ = dirty;
/// ```
pub struct VmmSlotCache {
    vm: Arc<Vm>,
    owner: SlotOwner,
    slots: Mutex<BTreeMap<u32, Tracked>>,
    counters: Counters,
}

impl std::fmt::Debug for VmmSlotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmSlotCache")
            .field("mode", &self.vm.dirty_log_mode())
            .field("slots", &self.lock().keys().collect::<Vec<_>>())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A harvest of the rings for a [`VmmSlotCache`]: entries of its slots go into their buffers.
struct CacheHarvest<'a> {
    slots: &'a mut BTreeMap<u32, Tracked>,
    owner: SlotOwner,
}

impl RingHarvester for CacheHarvest<'_> {
    fn owner(&self) -> Option<SlotOwner> {
        Some(self.owner)
    }
    fn all_dirty(&mut self) {
        for t in self.slots.values_mut() {
            let pages = t.slot.pages();
            fill_pages(&mut t.buffer, pages);
        }
    }
    fn take(&mut self, slot: u32, offset: u64) -> bool {
        match self.slots.get_mut(&slot) {
            Some(t) if offset < t.slot.pages() => {
                t.buffer[(offset / 64) as usize] |= 1 << (offset % 64);
                true
            }
            _ => false,
        }
    }
    fn drain(&mut self, slot: u32, owner: SlotOwner, bits: &[u64]) -> bool {
        if owner != self.owner {
            return false;
        }
        if let Some(t) = self.slots.get_mut(&slot) {
            for (w, b) in t.buffer.iter_mut().zip(bits) {
                *w |= b;
            }
        }
        true
    }
}

impl VmmSlotCache {
    /// A cache for memslots of `vm` (a [`Vm::from_fd`] of the VMM's VM fd, or a [`Vm::new`]).
    ///
    /// # Example
    ///
    /// See [`VmmSlotCache`].
    pub fn new(vm: Arc<Vm>) -> Self {
        VmmSlotCache {
            owner: vm.new_cache_owner(),
            vm,
            slots: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
        }
    }

    /// A cache on the VMM's own VM (kvm-ioctls' `VmFd` as it is, or any VM fd), in the best
    /// dirty-log mode the kernel offers: manual protection, with `INITIALLY_SET` where offered
    /// (logging starts without write-protecting anything), enabled on `vm_fd`; legacy where it
    /// is not offered. The VMM's fd stays the VMM's (the [`Vm`] keeps a duplicate).
    ///
    /// Call it before any memslot of the VM logs dirty pages: the kernel applies manual
    /// protection to slots whose logging starts afterwards.
    ///
    /// # Errors
    ///
    /// As [`enable_manual_protect`] and [`Vm::from_fd`] ([`Error::NotAVmFd`] for a fd that is
    /// not a KVM VM's).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("VmmSlotCache::from_vm_fd") { return; }
    /// let vm_fd = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
    /// let cache = clearlog_kvm::VmmSlotCache::from_vm_fd(&vm_fd).unwrap();
    /// assert!(cache.vm().dirty_log_mode().is_manual()); // where the kernel offers it
    /// ```
    pub fn from_vm_fd(vm_fd: impl AsKvmFd) -> Result<Self> {
        let fd = vm_fd.as_kvm_fd();
        let mode = match KvmCaps::probe(fd).default_dirty_log_mode() {
            m if m.is_manual() => enable_manual_protect(fd, m.enable_flags())?,
            m => m,
        };
        Ok(Self::new(Arc::new(Vm::from_fd(fd, mode)?)))
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Tracked>> {
        // Every change is a single insert or remove after the ioctl succeeded, or a cache update
        // the next sync replaces: a poisoned lock is still consistent.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks memslot `slot`, which the VMM made itself with `memslot`'s addresses and size and
    /// with dirty logging on (`KVM_MEM_LOG_DIRTY_PAGES`): from now on its dirty log is read and
    /// cleared through this cache only. The first [`sync`](Self::sync) reports what KVM holds
    /// (with manual protection and `INITIALLY_SET`, every page).
    ///
    /// Nothing is asked of the kernel here: a `memslot` that does not match the kernel's makes
    /// the first sync fail (a larger kernel slot gives [`Error::SlotChangedBehindVm`], never a
    /// write past our buffer).
    ///
    /// # Errors
    ///
    /// [`Error::SlotNotLogging`] when `memslot.log_dirty` is false; [`Error::SlotInUse`] when the
    /// [`Vm`] knows the id already (a listener's slot, the caller's, this or another cache's);
    /// [`Error::SlotOutOfRange`], [`Error::InvalidMemslot`], [`Error::GuardedBuffer`].
    pub fn track(&self, slot: u32, memslot: MemSlot) -> Result<()> {
        if !memslot.log_dirty {
            return Err(Error::SlotNotLogging(slot));
        }
        let buffer = GuardedWords::new(memslot.bitmap_words())
            .map_err(|source| Error::GuardedBuffer { source })?;
        let mut slots = self.lock();
        self.vm.adopt_slot(slot, memslot, self.owner)?;
        let cache = self
            .vm
            .dirty_log_mode()
            .is_manual()
            .then(|| SlotDirtyCache::new(memslot.pages()));
        slots.insert(
            slot,
            Tracked {
                slot: memslot,
                cache,
                buffer,
                clear_words: Vec::new(),
                collected: AtomicBitmap::new(memslot.pages() as usize),
            },
        );
        tracing::debug!(
            slot,
            guest_phys = memslot.guest_phys,
            size = memslot.size,
            "VMM memslot tracked"
        );
        Ok(())
    }

    /// Stops tracking memslot `slot` after a last [`sync`](Self::sync), whose bits go to `fold`:
    /// call it before the VMM turns the slot's logging off, deletes it or changes it (the kernel
    /// drops its dirty bitmap then). If the last sync fails, the slot is not released and the
    /// error is returned.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`] when `slot` is not tracked; the sync's errors.
    pub fn untrack(&self, slot: u32, fold: impl FnOnce(&[u64])) -> Result<()> {
        let mut slots = self.lock();
        self.sync_locked(&mut slots, slot, fold)?;
        self.vm.forget_slot_as(slot, self.owner)?;
        slots.remove(&slot);
        Ok(())
    }

    /// [`untrack`](Self::untrack) every tracked memslot; what their last syncs report goes with
    /// them, as their collected bits do (a migration ending).
    ///
    /// # Errors
    ///
    /// The first failed last sync; the slots before it are released, it and those after are
    /// still tracked.
    pub fn untrack_all(&self) -> Result<()> {
        let ids: Vec<u32> = self.lock().keys().copied().collect();
        for slot in ids {
            self.untrack(slot, |_| {})?;
        }
        Ok(())
    }

    /// Reads the dirty log of tracked memslot `slot` and calls `fold` with it, one bit per page of
    /// the slot (KVM's layout, bit 0 of word 0 = the slot's first page); returns how many pages
    /// it reports dirty.
    ///
    /// - Manual protection: `KVM_GET_DIRTY_LOG` into the slot's cache (it replaces it), `fold`
    ///   gets the cache: every page KVM holds dirty and nobody re-armed since. Nothing is cleared:
    ///   re-arm with [`clear`](Self::clear) before reading a page to send it.
    /// - Legacy: the GET clears and re-arms in the kernel; `fold` gets what it returned, once.
    /// - Ring: harvests every vCPU ring and resets them (kick the vCPUs first, so the CPU's log
    ///   buffers reach the rings); `fold` gets the slot's pages harvested since the last sync,
    ///   once. While a reset is owed ([`Error::DirtyRingResetOwed`]), nothing is handed over.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`]; [`Error::SlotChangedBehindVm`] (the kernel's slot is larger than
    /// tracked), [`Error::Kvm`] (e.g. `ENOENT`: the slot does not log), the ring's reset errors.
    pub fn sync(&self, slot: u32, fold: impl FnOnce(&[u64])) -> Result<u64> {
        self.sync_locked(&mut self.lock(), slot, fold)
    }

    fn sync_locked(
        &self,
        slots: &mut BTreeMap<u32, Tracked>,
        slot: u32,
        fold: impl FnOnce(&[u64]),
    ) -> Result<u64> {
        let start = Instant::now();
        self.reap_for_sync(slots)?;
        let t = slots.get_mut(&slot).ok_or(Error::UnknownSlot(slot))?;
        let found = self.fold_slot(slot, &mut t.cache, &mut t.buffer, fold)?;
        self.counters
            .add_sync(start.elapsed().as_nanos() as u64, found);
        Ok(found)
    }

    /// Ring mode: the harvest before a sync; an error while a reset is owed (the harvested
    /// pages may be writable: nothing may be handed over).
    fn reap_for_sync(&self, slots: &mut BTreeMap<u32, Tracked>) -> Result<()> {
        if !self.vm.dirty_log_mode().is_ring() {
            return Ok(());
        }
        self.reap_locked(slots)?;
        match self.vm.ring_reset_owed() {
            0 => Ok(()),
            owed => Err(Error::DirtyRingResetOwed { owed }),
        }
    }

    /// The GET (bitmap modes) of tracked `slot` into its buffer and cache, then `fold` of what it
    /// reports; the pages reported.
    fn fold_slot(
        &self,
        slot: u32,
        cache: &mut Option<SlotDirtyCache>,
        buffer: &mut GuardedWords,
        fold: impl FnOnce(&[u64]),
    ) -> Result<u64> {
        let ring = self.vm.dirty_log_mode().is_ring();
        if !ring {
            self.vm.get_dirty_log_as(slot, buffer, self.owner)?;
        }
        let words: &[u64] = match cache.as_mut() {
            Some(cache) => {
                let dest = cache.sync_buffer();
                let n = dest.len().min(buffer.len());
                dest[..n].copy_from_slice(&buffer[..n]);
                cache.mark_synced();
                cache.bits().as_words()
            }
            None => buffer,
        };
        let found = words.iter().map(|w| u64::from(w.count_ones())).sum();
        fold(words);
        if ring {
            // Handed over, like a legacy GET's bits.
            buffer.fill(0);
        }
        Ok(found)
    }

    /// Syncs every tracked memslot (as [`sync`](Self::sync); one harvest of the rings for all
    /// in ring mode) and adds what each reports to its collected bits, for
    /// [`take`](Self::take); returns the pages reported. The one-client way to use the cache
    /// (a migration): `sync_all`, [`mark`](Self::mark) the VMM's own writes, `take` each slot,
    /// [`clear`](Self::clear) each chunk before reading it.
    ///
    /// # Errors
    ///
    /// As [`sync`](Self::sync); the slots synced before a failure keep their collected bits.
    pub fn sync_all(&self) -> Result<u64> {
        let start = Instant::now();
        let mut slots = self.lock();
        self.reap_for_sync(&mut slots)?;
        let mut found = 0;
        for (&slot, t) in slots.iter_mut() {
            let Tracked {
                cache,
                buffer,
                collected,
                ..
            } = t;
            found += self.fold_slot(slot, cache, buffer, |words| {
                collected.or_words_at(0, words);
            })?;
        }
        self.counters
            .add_sync(start.elapsed().as_nanos() as u64, found);
        Ok(found)
    }

    /// Ring mode: harvests every vCPU ring into the tracked slots' buffers and resets the rings;
    /// returns the entries harvested (0 outside ring mode). The VMM's ring-full exit handler and
    /// a reaper thread call it; [`sync`](Self::sync) does it itself.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyRingResetFailed`] or [`Error::DirtyRingReset`]: the harvested bits are kept
    /// but held back until a later harvest's reset confirms them.
    pub fn reap_rings(&self) -> Result<u64> {
        if !self.vm.dirty_log_mode().is_ring() {
            return Ok(0);
        }
        self.reap_locked(&mut self.lock())
    }

    fn reap_locked(&self, slots: &mut BTreeMap<u32, Tracked>) -> Result<u64> {
        let mut h = CacheHarvest {
            slots,
            owner: self.owner,
        };
        let (harvest, result) = self.vm.harvest_rings(&mut h);
        self.counters.add_reap(&harvest);
        result?;
        Ok(harvest.entries)
    }

    /// Re-arms dirty tracking for pages `[first_page, first_page + npages)` of tracked memslot
    /// `slot`, before the caller reads them to send them: `KVM_CLEAR_DIRTY_LOG` of the bits the
    /// last sync reported there and nobody cleared since (the range widened to 64 pages with
    /// zeros, clamped at the slot end), which then leave the cache. Returns how many bits KVM
    /// was told to clear: 0 when nothing is known dirty there (no ioctl), in legacy and ring
    /// modes (their sync re-armed), and before the slot's first sync.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`], [`Error::DirtyCache`] (a range outside the slot),
    /// [`Error::ClearDirtyLog`].
    pub fn clear(&self, slot: u32, first_page: u64, npages: u64) -> Result<u64> {
        let start = Instant::now();
        let mut slots = self.lock();
        let t = slots.get_mut(&slot).ok_or(Error::UnknownSlot(slot))?;
        let Some(cache) = t.cache.as_mut() else {
            return Ok(0);
        };
        if !cache.is_synced() {
            self.counters.add_clear_before_sync();
            return Ok(0);
        }
        let Some(req) = cache.take_clear_into(first_page, npages, &mut t.clear_words)? else {
            self.counters.add_clear_skipped();
            return Ok(0);
        };
        // Still under the lock: no sync can refill the cache before the kernel is told.
        self.vm
            .clear_owned_slot(slot, req.first_page, req.num_pages, &t.clear_words)?;
        self.counters
            .add_clear(start.elapsed().as_nanos() as u64, req.bits);
        Ok(req.bits)
    }

    /// Adds `words` (one bit per page of tracked memslot `slot`, KVM's layout) to the slot's
    /// collected bits: the VMM's own writes to the slot's memory, which KVM does not see (its
    /// vm-memory bitmap, read and reset; a vhost-user backend's dirty log). Call it at the sync,
    /// after [`sync_all`](Self::sync_all): those writes need no re-arm (reading and resetting
    /// their bitmap is theirs).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`]; [`Error::Bitmap`] when `words` is longer than the slot's bitmap.
    pub fn mark(&self, slot: u32, words: &[u64]) -> Result<()> {
        let slots = self.lock();
        let t = slots.get(&slot).ok_or(Error::UnknownSlot(slot))?;
        Ok(t.collected.try_or_words_at(0, words)?)
    }

    /// Moves the collected bits of tracked memslot `slot` into `dest` (one bit per page of the
    /// slot): what a migration's `take_dirty` does
    /// ([`AtomicBitmap::take_into`](clearlog_bitmap::AtomicBitmap::take_into): with `clear`, the
    /// chunk of every bit taken is marked for a re-arm before its read). Returns how many bits
    /// were not set in `dest` already.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`]; [`Error::Bitmap`] when `dest` or `clear` is smaller than the slot.
    pub fn take(
        &self,
        slot: u32,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> Result<u64> {
        let slots = self.lock();
        let t = slots.get(&slot).ok_or(Error::UnknownSlot(slot))?;
        Ok(t.collected.take_into(0, t.collected.len(), dest, clear)?)
    }

    /// The tracked memslots, by id.
    pub fn tracked(&self) -> Vec<(u32, MemSlot)> {
        self.lock().iter().map(|(&id, t)| (id, t.slot)).collect()
    }

    /// Counters so far.
    pub fn stats(&self) -> DirtyLogStats {
        self.counters.snapshot()
    }
}

impl Drop for VmmSlotCache {
    /// The memslots stay the VMM's: they are only forgotten by the [`Vm`] (no ioctl).
    fn drop(&mut self) {
        let slots = std::mem::take(&mut *self.lock());
        for slot in slots.into_keys() {
            let _ = self.vm.forget_slot_as(slot, self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::DirtyRing;
    use crate::{KvmDirtyLogMode, VmConfig};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const SIZE: u64 = 128 * 4096;

    /// The VMM's memory and a VM in `mode` with its memslot 5 over it, made through the VM's
    /// own kvm-ioctls `VmFd` (not through the `Vm`), logging; `None` (SKIPPED) without KVM.
    fn vmm_slot(
        test: &str,
        mode: Option<KvmDirtyLogMode>,
    ) -> Option<(GuestMemoryMmap<()>, Arc<Vm>, MemSlot)> {
        if crate::doctest_kvm_skip(test) {
            return None;
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), SIZE as usize)]).unwrap();
        let vm = match Vm::new(VmConfig::with_dirty_log(mode)) {
            Err(e @ Error::DirtyRingUnsupported) => {
                eprintln!("SKIPPED: {test}: {e}");
                return None;
            }
            vm => Arc::new(vm.unwrap()),
        };
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 5,
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 1 << 30,
            memory_size: SIZE,
            userspace_addr: host,
        };
        // SAFETY: `mem` maps SIZE bytes at `host` and is returned first, so the caller drops it
        // after the VM.
        unsafe { vm.vm_fd().unwrap().set_user_memory_region(region) }.unwrap();
        let slot = MemSlot {
            guest_phys: 1 << 30,
            size: SIZE,
            host_addr: host,
            log_dirty: true,
        };
        Some((mem, vm, slot))
    }

    fn pages(words: &[u64]) -> Vec<u64> {
        (0..words.len() as u64 * 64)
            .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn manual_mode_clears_only_what_the_last_sync_saw_once() {
        let manual = Some(KvmDirtyLogMode::Manual {
            initially_set: true,
        });
        let Some((_mem, vm, slot)) = vmm_slot("vmm_slot_cache_manual", manual) else {
            return;
        };
        let cache = VmmSlotCache::new(vm.clone());
        assert!(matches!(
            cache.track(
                5,
                MemSlot {
                    log_dirty: false,
                    ..slot
                }
            ),
            Err(Error::SlotNotLogging(5))
        ));
        cache.track(5, slot).unwrap();
        assert!(vm.is_cache_slot(5));
        assert!(matches!(
            cache.track(5, slot),
            Err(Error::SlotInUse { slot: 5 })
        ));
        // The Vm's own calls refuse a tracked slot.
        assert!(matches!(
            vm.get_dirty_log(5, &mut [0; 2]),
            Err(Error::SlotOwnedByCache { slot: 5 })
        ));
        assert_eq!(
            cache.clear(5, 0, 64).unwrap(),
            0,
            "nothing known before the first sync"
        );
        // INITIALLY_SET: all dirty.
        assert_eq!(cache.sync(5, |_| {}).unwrap(), 128);
        assert_eq!(cache.clear(5, 0, 64).unwrap(), 64);
        assert_eq!(
            cache.clear(5, 0, 64).unwrap(),
            0,
            "cleared twice for one sync"
        );
        // Manual mode: the other half is still reported, the cleared half is not.
        let mut seen = Vec::new();
        cache.sync(5, |w| seen = pages(w)).unwrap();
        assert_eq!(seen, (64..128).collect::<Vec<_>>());
        cache.clear(5, 64, 64).unwrap();
        assert_eq!(cache.sync(5, |_| {}).unwrap(), 0);
        let s = cache.stats();
        assert_eq!((s.syncs, s.clears, s.pages_cleared), (3, 2, 128));
        cache.untrack(5, |_| {}).unwrap();
        assert!(!vm.is_cache_slot(5) && vm.memslot(5).is_none());
        assert!(matches!(cache.sync(5, |_| {}), Err(Error::UnknownSlot(5))));
    }

    #[test]
    fn a_tracked_slot_larger_in_the_kernel_fails_the_sync_cleanly() {
        let Some((_mem, vm, slot)) = vmm_slot("vmm_slot_cache_larger", None) else {
            return;
        };
        let cache = VmmSlotCache::new(vm);
        // The VMM says the slot is 1 page: its kernel slot has 128.
        cache.track(5, MemSlot { size: 4096, ..slot }).unwrap();
        assert!(matches!(
            cache.sync(5, |_| {}),
            Err(Error::SlotChangedBehindVm { slot: 5, .. })
        ));
    }

    #[test]
    fn ring_mode_hands_harvested_pages_over_once() {
        let ring = Some(KvmDirtyLogMode::Ring { bytes: 1 << 16 });
        let Some((_mem, vm, slot)) = vmm_slot("vmm_slot_cache_ring", ring) else {
            return;
        };
        let cache = VmmSlotCache::new(vm.clone());
        cache.track(5, slot).unwrap();
        vm.rings_for_test().register_fake(0, DirtyRing::fake(16));
        vm.rings_for_test()
            .fake_ring(0)
            .kernel_push(0, 5, 3)
            .unwrap();
        vm.rings_for_test()
            .fake_ring(0)
            .kernel_push(1, 5, 70)
            .unwrap();
        let mut seen = Vec::new();
        assert_eq!(cache.sync(5, |w| seen = pages(w)).unwrap(), 2);
        assert_eq!(seen, [3, 70]);
        assert_eq!(cache.sync(5, |_| {}).unwrap(), 0, "handed over once");
        assert_eq!(cache.clear(5, 0, 128).unwrap(), 0, "the harvest re-armed");
    }
}
