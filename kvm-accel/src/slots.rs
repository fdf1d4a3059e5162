// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The memslot table of a [`Vm`](crate::Vm): the memslots made (or adopted) through it, who owns
//! each, the ring entries kept for their owners, and the memslot-id probe (docs/design.md
//! section 2b).

use std::collections::BTreeMap;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};

use crate::error::{Error, Result};
use crate::guarded::{GuardedWords, ProbePage};
use crate::raw::{self, KvmFd};
use crate::PAGE_SIZE;

/// A memslot as registered with [`Vm::set_memslot`](crate::Vm::set_memslot), made by a
/// [`KvmMemoryListener`](crate::KvmMemoryListener), or made by the VMM and tracked by a
/// [`VmmSlotCache`](crate::VmmSlotCache).
///
/// # Example
///
/// ```
/// use clearlog_kvm::MemSlot;
///
/// let s = MemSlot { guest_phys: 0, size: 100 * 4096, host_addr: 0x7f00_0000_0000, log_dirty: true };
/// assert_eq!(s.pages(), 100);
/// assert_eq!(s.bitmap_words(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSlot {
    /// Guest physical address of the first byte.
    pub guest_phys: u64,
    /// Size in bytes, a multiple of the page size.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// `KVM_MEM_LOG_DIRTY_PAGES` is set.
    pub log_dirty: bool,
}

impl MemSlot {
    /// A memslot of `size` bytes at guest address `guest_phys`, host address `host_addr`,
    /// logging dirty pages or not.
    ///
    /// # Example
    ///
    /// ```
    /// let s = clearlog_kvm::MemSlot::new(1 << 32, 2 << 20, 0x7f00_0000_0000, true);
    /// assert_eq!((s.pages(), s.log_dirty), (512, true));
    /// ```
    pub fn new(guest_phys: u64, size: u64, host_addr: u64, log_dirty: bool) -> Self {
        MemSlot {
            guest_phys,
            size,
            host_addr,
            log_dirty,
        }
    }

    /// Number of 4 KiB pages.
    ///
    /// # Example
    ///
    /// ```
    /// let s = clearlog_kvm::MemSlot { guest_phys: 0, size: 8192, host_addr: 0, log_dirty: false };
    /// assert_eq!(s.pages(), 2);
    /// ```
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Number of `u64` words of the slot's dirty bitmap.
    ///
    /// # Example
    ///
    /// ```
    /// let s = clearlog_kvm::MemSlot { guest_phys: 0, size: 65 * 4096, host_addr: 0, log_dirty: true };
    /// assert_eq!(s.bitmap_words(), 2);
    /// ```
    pub fn bitmap_words(&self) -> usize {
        usize::try_from(self.pages().div_ceil(64)).unwrap_or(usize::MAX)
    }

    /// Checks what the kernel would refuse (or misread) before any ioctl: a zero size, sizes and
    /// addresses that are not page multiples, ranges that overflow.
    fn check(&self, slot: u32) -> Result<()> {
        let bad = |reason| Err(Error::InvalidMemslot { slot, reason });
        if self.size == 0 {
            return bad("size is 0 (use remove_memslot)");
        }
        if self.size % PAGE_SIZE != 0
            || self.guest_phys % PAGE_SIZE != 0
            || self.host_addr % PAGE_SIZE != 0
        {
            return bad("size and addresses must be multiples of 4 KiB");
        }
        if self.guest_phys.checked_add(self.size).is_none()
            || self.host_addr.checked_add(self.size).is_none()
        {
            return bad("range overflows");
        }
        Ok(())
    }

    fn region(&self, slot: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot,
            flags: if self.log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: self.guest_phys,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }
}

/// Who owns a memslot of a [`Vm`](crate::Vm): the caller ([`Vm::set_memslot`](crate::Vm::set_memslot))
/// or a dirty-log cache (a [`KvmMemoryListener`](crate::KvmMemoryListener) or a
/// [`VmmSlotCache`](crate::VmmSlotCache)), by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotOwner {
    /// Made with [`Vm::set_memslot`](crate::Vm::set_memslot): the caller manages its dirty log.
    Caller,
    /// Owned by the dirty-log cache with this id: every GET and CLEAR goes through its cache.
    Cache(u64),
}

/// One memslot of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotEntry {
    pub(crate) slot: MemSlot,
    pub(crate) owner: SlotOwner,
}

/// What the slot-table lock of a [`Vm`](crate::Vm) guards.
#[derive(Debug, Default)]
pub(crate) struct SlotTable {
    /// The memslots registered through the `Vm` (or adopted by it), by id.
    pub(crate) entries: BTreeMap<u32, SlotEntry>,
    /// Ring mode: per logging memslot, the pages harvested from the rings by someone other than
    /// the slot's owner (another cache, a caller's GET, an unregister), one bit per page, waiting
    /// for the owner to take them. Only taken after a `KVM_RESET_DIRTY_RINGS` confirmed them
    /// (docs/design.md section 2a).
    pub(crate) pending: BTreeMap<u32, Vec<u64>>,
    /// The inaccessible page the memslot-id probes point at, made at the first probe.
    probe_page: Option<ProbePage>,
    /// The guarded buffer [`Vm::get_dirty_log`](crate::Vm::get_dirty_log) GETs into (grown as
    /// needed).
    scratch: Option<GuardedWords>,
}

/// Sets the bits of the first `pages` pages of `words` (the rest stays 0).
pub(crate) fn fill_pages(words: &mut [u64], pages: u64) {
    for (i, w) in words.iter_mut().enumerate() {
        let first = i as u64 * 64;
        *w = match pages.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1 << n) - 1,
        };
    }
}

impl SlotTable {
    /// The entry of `slot` if `owner` owns it: [`Error::UnknownSlot`] if there is none,
    /// [`Error::SlotOwnedByCache`] if someone else owns it.
    pub(crate) fn owned(&self, slot: u32, owner: SlotOwner) -> Result<SlotEntry> {
        let e = *self.entries.get(&slot).ok_or(Error::UnknownSlot(slot))?;
        if e.owner != owner {
            return Err(Error::SlotOwnedByCache { slot });
        }
        Ok(e)
    }

    /// Checks a GET of `slot` for `owner` into `len` words; the words the slot needs.
    pub(crate) fn check_get(&self, slot: u32, owner: SlotOwner, len: usize) -> Result<usize> {
        let e = self.owned(slot, owner)?;
        if !e.slot.log_dirty {
            return Err(Error::SlotNotLogging(slot));
        }
        let needed = e.slot.bitmap_words();
        if len < needed {
            return Err(Error::BufferTooSmall { needed, got: len });
        }
        Ok(needed)
    }

    /// The guarded scratch buffer, at least `words` long (made or grown here).
    pub(crate) fn scratch(&mut self, words: usize) -> Result<&mut GuardedWords> {
        if self.scratch.as_ref().is_none_or(|s| s.len() < words) {
            let scratch =
                GuardedWords::new(words).map_err(|source| Error::GuardedBuffer { source })?;
            self.scratch = Some(scratch);
        }
        Ok(self
            .scratch
            .get_or_insert_with(|| unreachable!("made just above")))
    }

    /// Creates (`create`) or updates memslot `slot` for `owner` in the kernel (through `vm`) and
    /// in the table.
    ///
    /// # Safety
    ///
    /// With a non-zero size, `s.host_addr..s.host_addr + s.size` must be a mapping of this
    /// process that stays valid until the slot is removed or the VM is dropped.
    pub(crate) unsafe fn set(
        &mut self,
        vm: KvmFd<'_>,
        slot: u32,
        s: MemSlot,
        owner: SlotOwner,
        create: bool,
    ) -> Result<()> {
        s.check(slot)?;
        let existing = self.entries.get(&slot).copied();
        if let Some(e) = existing {
            if owner == SlotOwner::Caller && e.owner != owner {
                return Err(Error::SlotOwnedByCache { slot });
            }
            if create || e.owner != owner {
                return Err(Error::SlotInUse { slot });
            }
        }
        if create && existing.is_none() && matches!(owner, SlotOwner::Cache(_)) {
            // KVM accepts a request identical to an existing memslot as a no-op: without this a
            // cache would silently take over a memslot the VMM made through its own fd.
            self.probe_id(vm, slot, s)?;
        }
        // SAFETY: the caller guarantees the host range stays mapped while the slot exists.
        unsafe { raw::set_user_memory_region(vm, &s.region(slot)) }.map_err(
            |source| match source.errno() {
                libc::EEXIST | libc::EINVAL if existing.is_none() => Error::MemslotRefused {
                    slot,
                    guest_phys: s.guest_phys,
                    size: s.size,
                    source,
                },
                _ => Error::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION",
                    source,
                },
            },
        )?;
        self.record(slot, s, owner);
        Ok(())
    }

    /// Records memslot `slot` for `owner` without any ioctl: a memslot the VMM made itself,
    /// whose dirty log a [`VmmSlotCache`](crate::VmmSlotCache) reads and clears from now on.
    /// Its id must not be in the table already ([`Error::SlotInUse`]).
    pub(crate) fn adopt(&mut self, slot: u32, s: MemSlot, owner: SlotOwner) -> Result<()> {
        s.check(slot)?;
        if self.entries.contains_key(&slot) {
            return Err(Error::SlotInUse { slot });
        }
        self.record(slot, s, owner);
        Ok(())
    }

    fn record(&mut self, slot: u32, s: MemSlot, owner: SlotOwner) {
        self.entries.insert(slot, SlotEntry { slot: s, owner });
        if !s.log_dirty {
            // Logging is off: what the rings reported for the slot goes, as a bitmap would.
            self.pending.remove(&slot);
        }
    }

    /// Deletes memslot `slot` of `owner` in the kernel and the table.
    pub(crate) fn remove(&mut self, vm: KvmFd<'_>, slot: u32, owner: SlotOwner) -> Result<()> {
        let e = self.owned(slot, owner)?;
        let region = kvm_userspace_memory_region {
            memory_size: 0,
            flags: 0,
            ..e.slot.region(slot)
        };
        // SAFETY: size 0 deletes the slot; the kernel stops using the host mapping.
        unsafe { raw::set_user_memory_region(vm, &region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        self.forget(slot);
        Ok(())
    }

    /// Drops memslot `slot` from the table (its ring entries too), without any ioctl.
    pub(crate) fn forget(&mut self, slot: u32) -> Option<SlotEntry> {
        self.pending.remove(&slot);
        self.entries.remove(&slot)
    }

    /// Fails unless memslot id `slot` is free in the kernel, i.e. no memslot exists with that id
    /// that was made outside this table (one of the VMM's own, made through its own fd): KVM
    /// cannot be asked which ids exist, so we probe, without side effects where possible.
    ///
    /// Kernel facts (Linux 6.x `__kvm_set_memory_region`, checked on real KVM by the test
    /// `kernel_memslot_facts_behind_the_slot_id_probe`): for an existing id, a request whose
    /// `userspace_addr` or size differs from the slot's fails with `EINVAL` before any overlap
    /// check; for a free id, a create overlapping another memslot fails with `EEXIST` (nothing is
    /// created) and one overlapping none creates the slot; a delete (size 0) of a free id is
    /// `EINVAL` (we never probe with a delete: on an existing id it would delete the VMM's slot).
    ///
    /// So the probe is a 1-page request for id `slot` whose `userspace_addr` is our own
    /// inaccessible reservation ([`ProbePage`]: no memslot can have it), at the guest address of a
    /// memslot this table knows in the same address space (a free id then gets `EEXIST`, nothing
    /// happens): `EINVAL` means the id is in use by someone else. When this table knows no memslot
    /// there yet, the request must create: 1 page at the new slot's guest address; `EINVAL` means
    /// in use, success means free (the probe slot is deleted before the real one is made).
    /// Caveat of that case: for that instant the first page of the new guest range maps the
    /// inaccessible page, and a vCPU touching it then gets `EFAULT` from `KVM_RUN` (the range was
    /// not guest memory before, so only a guest probing unmapped memory can notice). `EEXIST`
    /// there means the id is free but the range overlaps a memslot of the VMM: the real create
    /// reports it ([`Error::MemslotRefused`]).
    fn probe_id(&mut self, vm: KvmFd<'_>, slot: u32, new: MemSlot) -> Result<()> {
        let as_id = slot >> 16;
        let known = self
            .entries
            .iter()
            .find(|&(&id, _)| id >> 16 == as_id)
            .map(|(_, e)| e.slot.guest_phys);
        if self.probe_page.is_none() {
            let page = ProbePage::new().map_err(|source| Error::SlotProbePage { source })?;
            self.probe_page = Some(page);
        }
        let page = self
            .probe_page
            .get_or_insert_with(|| unreachable!("made just above"));
        let probe = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: known.unwrap_or(new.guest_phys),
            memory_size: PAGE_SIZE,
            userspace_addr: page.addr(),
        };
        // SAFETY: the request names our reservation `page`, a mapping of this process that stays
        // mapped while any probe slot over it exists: the kernel refuses the request (nothing is
        // created) or creates a 1-page slot over it, which is deleted right below; if that delete
        // fails the page is leaked, never unmapped, so the slot can never name reused memory. The
        // page is PROT_NONE: a vCPU touching it gets EFAULT, never our memory.
        let created = unsafe { raw::set_user_memory_region(vm, &probe) };
        match created {
            Err(e) if e.errno() == libc::EINVAL => Err(Error::SlotIdTaken {
                slot,
                guest_phys: new.guest_phys,
                size: new.size,
            }),
            Err(e) if e.errno() == libc::EEXIST => Ok(()),
            Err(source) => Err(Error::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION (memslot id probe)",
                source,
            }),
            Ok(()) => {
                // The id was free and the probe made a slot: delete it (it is ours).
                let delete = kvm_userspace_memory_region {
                    memory_size: 0,
                    ..probe
                };
                // SAFETY: size 0 deletes the probe slot just made (the kernel stops using the
                // page); the page stays mapped if this fails.
                unsafe { raw::set_user_memory_region(vm, &delete) }.map_err(|source| {
                    page.leak();
                    Error::Kvm {
                        op: "KVM_SET_USER_MEMORY_REGION (deleting the memslot id probe)",
                        source,
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_pages_sets_the_first_pages_only() {
        let mut w = [7u64; 3];
        fill_pages(&mut w, 70);
        assert_eq!(w, [u64::MAX, 0b11_1111, 0]);
    }

    #[test]
    fn adopted_slots_are_checked_owned_and_forgotten() {
        let mut t = SlotTable::default();
        let s = MemSlot {
            guest_phys: 1 << 30,
            size: 65 * PAGE_SIZE,
            host_addr: 0x7f00_0000_0000,
            log_dirty: true,
        };
        let bad = MemSlot { size: 100, ..s };
        assert!(matches!(
            t.adopt(3, bad, SlotOwner::Cache(1)),
            Err(Error::InvalidMemslot { .. })
        ));
        t.adopt(3, s, SlotOwner::Cache(1)).unwrap();
        assert!(matches!(
            t.adopt(3, s, SlotOwner::Caller),
            Err(Error::SlotInUse { .. })
        ));
        assert_eq!(t.check_get(3, SlotOwner::Cache(1), 2).unwrap(), 2);
        assert!(matches!(
            t.check_get(3, SlotOwner::Cache(1), 1),
            Err(Error::BufferTooSmall { .. })
        ));
        assert!(matches!(
            t.check_get(3, SlotOwner::Caller, 2),
            Err(Error::SlotOwnedByCache { slot: 3 })
        ));
        assert!(matches!(
            t.check_get(4, SlotOwner::Caller, 2),
            Err(Error::UnknownSlot(4))
        ));
        t.pending.insert(3, vec![1, 0]);
        assert!(t.forget(3).is_some());
        assert!(t.pending.is_empty() && t.entries.is_empty());
        // A slot that does not log: nothing to GET.
        t.adopt(
            5,
            MemSlot {
                log_dirty: false,
                ..s
            },
            SlotOwner::Caller,
        )
        .unwrap();
        assert!(matches!(
            t.check_get(5, SlotOwner::Caller, 2),
            Err(Error::SlotNotLogging(5))
        ));
    }
}
