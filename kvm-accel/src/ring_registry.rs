// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vCPU ring registry of a [`Vm`](crate::Vm): the mapped dirty rings by vCPU index, their
//! counters, the harvest that hands every entry to its slot's owner, and the reset accounting
//! (entries owed a `KVM_RESET_DIRTY_RINGS`). docs/design.md section 2a.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;

use crate::error::{Error, Result};
use crate::raw::{self, FdKind, KvmFd};
use crate::ring::{DirtyRing, VcpuRingStats};
use crate::slots::{fill_pages, SlotOwner, SlotTable};

/// Who harvests the rings ([`RingRegistry::harvest`]) and what it does with the entries.
pub(crate) trait RingHarvester {
    /// The cache harvesting (its slots' entries go to [`take`](Self::take)); `None` for a
    /// harvest of the `Vm` itself (a caller's GET, an unregister), whose entries all go to the
    /// pending store.
    fn owner(&self) -> Option<SlotOwner>;
    /// A ring was found completely full: the kernel may have lost entries of any slot, so every
    /// page of every logging slot of the harvester must be reported dirty.
    fn all_dirty(&mut self);
    /// Takes the entry of page `offset` of memslot `slot` if that slot is one of the harvester's
    /// own logging slots (false otherwise: the store keeps it for the slot's owner, or it is
    /// dropped when no logging slot has that id).
    fn take(&mut self, slot: u32, offset: u64) -> bool;
    /// After a confirmed reset: the pending pages the store keeps for `slot` (owned by `owner`).
    /// True takes them (the store forgets them), false leaves them for their owner.
    fn drain(&mut self, slot: u32, owner: SlotOwner, bits: &[u64]) -> bool;
}

/// A harvest that keeps every entry in the pending store for its slot's owner and takes nothing.
pub(crate) struct KeepAll;

impl RingHarvester for KeepAll {
    fn owner(&self) -> Option<SlotOwner> {
        None
    }
    fn all_dirty(&mut self) {}
    fn take(&mut self, _slot: u32, _offset: u64) -> bool {
        false
    }
    fn drain(&mut self, _slot: u32, _owner: SlotOwner, _bits: &[u64]) -> bool {
        false
    }
}

/// What [`RingRegistry::harvest`] found over all rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RingHarvest {
    /// Entries harvested (and marked reset).
    pub(crate) entries: u64,
    /// Entries of logging slots the harvester does not own, kept in the pending store.
    pub(crate) kept: u64,
    /// Entries of no logging slot (deleted since, logging off, or unknown), dropped.
    pub(crate) dropped: u64,
    /// Rings found completely full without a ring-full exit reported.
    pub(crate) found_full: u64,
    /// Time of the harvest and `KVM_RESET_DIRTY_RINGS`, nanoseconds (filled by the `Vm`).
    pub(crate) ns: u64,
}

/// One vCPU's ring and its counters.
struct VcpuRing {
    ring: DirtyRing,
    harvested: u64,
    /// Ring-full exits reported since the last harvest of this ring.
    full_since_harvest: u64,
    full_exits: u64,
    found_full: u64,
}

impl VcpuRing {
    fn new(ring: DirtyRing) -> Self {
        VcpuRing {
            ring,
            harvested: 0,
            full_since_harvest: 0,
            full_exits: 0,
            found_full: 0,
        }
    }
}

/// Unit tests: how the fake `KVM_RESET_DIRTY_RINGS` behaves.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FakeReset {
    /// Like the kernel: every entry marked reset is freed.
    Kernel,
    /// The ioctl fails with this errno; nothing is freed.
    Fail(i32),
    /// At most this many entries are freed (over all rings).
    AtMost(u64),
}

/// What the ring lock of a [`Vm`](crate::Vm) guards.
#[derive(Default)]
pub(crate) struct RingRegistry {
    /// The registered rings, by vCPU index.
    rings: BTreeMap<u32, VcpuRing>,
    /// Entries harvested (marked reset) that no `KVM_RESET_DIRTY_RINGS` has confirmed yet (it
    /// failed, or reset fewer). Their pages may still be writable, so no harvested bit may be
    /// handed to a client while this is not 0, and every harvest calls the reset again.
    owed: u64,
    /// Unit tests: `KVM_RESET_DIRTY_RINGS` played on the fake rings instead of the kernel.
    #[cfg(test)]
    fake_reset: Option<FakeReset>,
}

impl RingRegistry {
    /// Maps the ring of `bytes` of vCPU `index` from its fd, which must be a KVM vCPU fd.
    pub(crate) fn register(&mut self, index: u32, vcpu: BorrowedFd<'_>, bytes: u32) -> Result<()> {
        if self.rings.contains_key(&index) {
            return Err(Error::DirtyRingVcpu {
                vcpu: index,
                reason: "already registered",
            });
        }
        // Only a KVM vCPU fd is mapped: a ring of another file would get RESET stored into it.
        let fd = match KvmFd::check(vcpu) {
            Ok(Some(fd)) if fd.kind() == FdKind::Vcpu => fd,
            Ok(_) => {
                return Err(Error::DirtyRingVcpu {
                    vcpu: index,
                    reason: "not a KVM vCPU fd (its /proc/self/fd link is not \
                             anon_inode:kvm-vcpu:N)",
                })
            }
            Err(source) => {
                return Err(Error::DirtyRingVcpuFd {
                    vcpu: index,
                    source,
                })
            }
        };
        let ring = DirtyRing::map(fd, bytes).map_err(|source| Error::DirtyRingMap {
            vcpu: index,
            source,
        })?;
        self.rings.insert(index, VcpuRing::new(ring));
        Ok(())
    }

    /// Is vCPU `index` registered?
    pub(crate) fn contains(&self, index: u32) -> bool {
        self.rings.contains_key(&index)
    }

    /// Drops the ring of vCPU `index` (harvest and reset it first); whether it was registered.
    pub(crate) fn remove(&mut self, index: u32) -> bool {
        self.rings.remove(&index).is_some()
    }

    /// Records a `KVM_EXIT_DIRTY_RING_FULL` exit of vCPU `index`.
    pub(crate) fn note_full_exit(&mut self, index: u32) {
        if let Some(r) = self.rings.get_mut(&index) {
            r.full_exits += 1;
            r.full_since_harvest += 1;
        }
    }

    /// Per-vCPU counters, by vCPU index.
    pub(crate) fn stats(&self) -> Vec<VcpuRingStats> {
        self.rings
            .iter()
            .map(|(&vcpu, r)| VcpuRingStats {
                vcpu,
                harvested: r.harvested,
                full_exits: r.full_exits,
                found_full: r.found_full,
            })
            .collect()
    }

    /// Entries harvested that no reset confirmed yet.
    pub(crate) fn owed(&self) -> u64 {
        self.owed
    }

    /// Harvests every registered ring, then `KVM_RESET_DIRTY_RINGS` (on `vm`) re-protects the
    /// harvested pages. Each entry goes to the harvester if the slot is one of its own
    /// ([`RingHarvester::take`]), else to the pending store of `slots` when the slot is a logging
    /// slot of someone else, else it is dropped. Once the reset confirmed the entries, the
    /// harvester may take what the store holds for it ([`RingHarvester::drain`]).
    ///
    /// Lock order: the ring lock (`self`), then the slot table. Returns the counts even when the
    /// reset failed.
    pub(crate) fn harvest(
        &mut self,
        vm: KvmFd<'_>,
        slots: &mut SlotTable,
        h: &mut dyn RingHarvester,
    ) -> (RingHarvest, Result<()>) {
        let total = self.collect(slots, h);
        if total.found_full > 0 {
            // Entries may be lost, of any slot: everything that logs may be dirty. The harvester
            // marks its own slots; the store gets every other logging slot, whole.
            h.all_dirty();
            let harvester = h.owner();
            let SlotTable {
                entries, pending, ..
            } = slots;
            for (&slot, e) in entries.iter() {
                if e.slot.log_dirty && Some(e.owner) != harvester {
                    let words = pending
                        .entry(slot)
                        .or_insert_with(|| vec![0; e.slot.bitmap_words()]);
                    fill_pages(words, e.slot.pages());
                }
            }
        }
        if let Err(e) = self.settle(vm, total.entries) {
            return (total, Err(e));
        }
        // Every harvested entry is re-protected: what the store holds is confirmed.
        let SlotTable {
            entries, pending, ..
        } = slots;
        pending.retain(|&slot, bits| match entries.get(&slot) {
            Some(e) => !h.drain(slot, e.owner, bits),
            None => false,
        });
        (total, Ok(()))
    }

    /// Reads every ring's new entries into the harvester or the pending store.
    fn collect(&mut self, slots: &mut SlotTable, h: &mut dyn RingHarvester) -> RingHarvest {
        let mut total = RingHarvest::default();
        let SlotTable {
            entries, pending, ..
        } = slots;
        for (&vcpu, r) in &mut self.rings {
            let pass = r.ring.harvest(|slot, offset| {
                if h.take(slot, offset) {
                    return;
                }
                match entries.get(&slot) {
                    Some(e) if e.slot.log_dirty && offset < e.slot.pages() => {
                        let words = pending
                            .entry(slot)
                            .or_insert_with(|| vec![0; e.slot.bitmap_words()]);
                        words[(offset / 64) as usize] |= 1 << (offset % 64);
                        total.kept += 1;
                    }
                    _ => total.dropped += 1,
                }
            });
            r.harvested += pass.entries;
            if pass.full && r.full_since_harvest == 0 {
                r.found_full += 1;
                total.found_full += 1;
                tracing::warn!(
                    vcpu,
                    entries = r.ring.entries(),
                    "dirty ring found completely full without a ring-full exit: the kernel may \
                     have dropped entries (known on PVM hosts when emulated ring-0 code fills a ring)"
                );
            }
            if pass.entries > 0 {
                r.full_since_harvest = 0;
            }
            total.entries += pass.entries;
        }
        total
    }

    /// Adds `harvested` to what is owed a reset and, while anything is owed, resets: entries a
    /// failed or partial reset left owed are reset again now, even when this harvest found
    /// nothing new, since until a reset confirms them their pages may be writable.
    fn settle(&mut self, vm: KvmFd<'_>, harvested: u64) -> Result<()> {
        self.owed += harvested;
        if self.owed == 0 {
            return Ok(());
        }
        match self.reset(vm) {
            // The kernel resets the entries marked reset, in ring order: once it reports as many
            // as are owed, every marked entry is re-protected.
            Ok(reset) => {
                let marked = self.owed;
                self.owed = marked.saturating_sub(reset);
                if self.owed > 0 {
                    return Err(Error::DirtyRingReset {
                        harvested: marked,
                        reset,
                        owed: self.owed,
                    });
                }
                Ok(())
            }
            Err(source) => Err(Error::DirtyRingResetFailed {
                owed: self.owed,
                source,
            }),
        }
    }

    /// `KVM_RESET_DIRTY_RINGS` (in unit tests with fake rings: the fake kernel's reset).
    fn reset(&mut self, vm: KvmFd<'_>) -> std::result::Result<u64, vmm_sys_util::errno::Error> {
        #[cfg(test)]
        if let Some(fake) = self.fake_reset {
            let mut left = match fake {
                FakeReset::Kernel => u64::MAX,
                FakeReset::Fail(errno) => return Err(vmm_sys_util::errno::Error::new(errno)),
                FakeReset::AtMost(n) => n,
            };
            let mut reset = 0;
            for r in self.rings.values_mut() {
                let n = r.ring.kernel_reset_at_most(left);
                left -= n;
                reset += n;
            }
            return Ok(reset);
        }
        raw::reset_dirty_rings(vm)
    }

    /// Unit tests: registers a fake ring (process memory the test pushes entries into) as vCPU
    /// `index`; from now on `KVM_RESET_DIRTY_RINGS` is played on the fake rings
    /// ([`FakeReset::Kernel`] unless [`set_fake_reset`](Self::set_fake_reset) said otherwise).
    #[cfg(test)]
    pub(crate) fn register_fake(&mut self, index: u32, ring: DirtyRing) {
        self.fake_reset.get_or_insert(FakeReset::Kernel);
        self.rings.insert(index, VcpuRing::new(ring));
    }

    /// Unit tests: how the fake `KVM_RESET_DIRTY_RINGS` behaves from now on.
    #[cfg(test)]
    pub(crate) fn set_fake_reset(&mut self, fake: FakeReset) {
        self.fake_reset = Some(fake);
    }

    /// Unit tests: the fake ring of vCPU `index` (to push entries as the kernel does).
    #[cfg(test)]
    pub(crate) fn fake_ring(&mut self, index: u32) -> &mut DirtyRing {
        &mut self.rings.get_mut(&index).expect("a registered ring").ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::MemSlot;

    /// A harvester owning slot 1 (cache 7).
    struct Own(Vec<(u32, u64)>, bool);
    impl RingHarvester for Own {
        fn owner(&self) -> Option<SlotOwner> {
            Some(SlotOwner::Cache(7))
        }
        fn all_dirty(&mut self) {
            self.1 = true;
        }
        fn take(&mut self, slot: u32, offset: u64) -> bool {
            let mine = slot == 1;
            if mine {
                self.0.push((slot, offset));
            }
            mine
        }
        fn drain(&mut self, _slot: u32, owner: SlotOwner, _bits: &[u64]) -> bool {
            owner == SlotOwner::Cache(7)
        }
    }

    fn table() -> SlotTable {
        let mut t = SlotTable::default();
        let s = MemSlot {
            guest_phys: 0,
            size: 64 * 4096,
            host_addr: 0x7f00_0000_0000,
            log_dirty: true,
        };
        t.adopt(1, s, SlotOwner::Cache(7)).unwrap();
        t.adopt(
            2,
            MemSlot {
                guest_phys: 1 << 30,
                ..s
            },
            SlotOwner::Caller,
        )
        .unwrap();
        t
    }

    /// Runs `f` with the fd of a real VM (the fake reset never uses it, but the harvest takes a
    /// KVM VM fd); `None` (SKIPPED) without a usable `/dev/kvm`.
    fn with_vm<R>(test: &str, f: impl FnOnce(KvmFd<'_>) -> R) -> Option<R> {
        if crate::doctest_kvm_skip(test) {
            return None;
        }
        let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
        let fd = KvmFd::check(crate::AsKvmFd::as_kvm_fd(&vm))
            .unwrap()
            .unwrap();
        Some(f(fd))
    }

    #[test]
    fn entries_go_to_their_owner_the_store_or_nowhere() {
        let mut t = table();
        let mut reg = RingRegistry::default();
        reg.register_fake(0, DirtyRing::fake(8));
        for (i, (slot, offset)) in [(1, 3), (2, 5), (9, 1), (2, 500)].into_iter().enumerate() {
            reg.fake_ring(0)
                .kernel_push(i as u32, slot, offset)
                .unwrap();
        }
        let mut own = Own(Vec::new(), false);
        let Some((h, r)) = with_vm("entries_go_to_their_owner", |vm| {
            reg.harvest(vm, &mut t, &mut own)
        }) else {
            return;
        };
        r.unwrap();
        assert_eq!((h.entries, h.kept, h.dropped, h.found_full), (4, 1, 2, 0));
        assert_eq!(own.0, [(1, 3)]);
        assert_eq!(t.pending[&2], [1 << 5]);
        assert_eq!(reg.stats()[0].harvested, 4);
        assert_eq!(reg.owed(), 0);
    }

    #[test]
    fn a_failed_reset_is_owed_and_nothing_is_drained_until_one_confirms() {
        let mut t = table();
        t.pending.insert(1, vec![1]);
        let mut reg = RingRegistry::default();
        reg.register_fake(0, DirtyRing::fake(8));
        reg.fake_ring(0).kernel_push(0, 2, 1).unwrap();
        reg.set_fake_reset(FakeReset::Fail(libc::EIO));
        let mut own = Own(Vec::new(), false);
        let Some((_, r)) = with_vm("a_failed_reset_is_owed", |vm| {
            reg.harvest(vm, &mut t, &mut own)
        }) else {
            return;
        };
        assert!(matches!(
            r,
            Err(Error::DirtyRingResetFailed { owed: 1, .. })
        ));
        assert!(
            t.pending.contains_key(&1),
            "drained before a reset confirmed it"
        );
        reg.set_fake_reset(FakeReset::Kernel);
        let (h, r) = with_vm("a_failed_reset_is_owed", |vm| {
            reg.harvest(vm, &mut t, &mut own)
        })
        .unwrap();
        r.unwrap();
        assert_eq!(h.entries, 0);
        assert!(
            !t.pending.contains_key(&1),
            "the owner takes its bits once confirmed"
        );
        assert!(t.pending.contains_key(&2), "another owner's bits stay");
    }

    #[test]
    fn a_ring_found_full_makes_every_other_logging_slot_whole() {
        let mut t = table();
        let mut reg = RingRegistry::default();
        reg.register_fake(0, DirtyRing::fake(4));
        for i in 0..4 {
            reg.fake_ring(0).kernel_push(i, 1, u64::from(i)).unwrap();
        }
        let mut own = Own(Vec::new(), false);
        let Some((h, r)) = with_vm("a_ring_found_full", |vm| reg.harvest(vm, &mut t, &mut own))
        else {
            return;
        };
        r.unwrap();
        assert_eq!(h.found_full, 1);
        assert!(own.1, "the harvester must mark its own slots");
        assert_eq!(t.pending[&2], [u64::MAX]);
        reg.note_full_exit(0);
        assert_eq!(reg.stats()[0].full_exits, 1);
    }
}
