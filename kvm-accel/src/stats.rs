// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`DirtyLogStats`]: what a dirty-log cache did (syncs, clears, ring reaps), counted as it goes.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ring_registry::RingHarvest;

/// Counters of a dirty-log cache's work (a [`KvmMemoryListener`](crate::KvmMemoryListener) or a
/// [`VmmSlotCache`](crate::VmmSlotCache)), for stats and benchmarks.
///
/// # Example
///
/// ```
/// let stats = clearlog_kvm::DirtyLogStats::default();
/// assert_eq!(stats.syncs + stats.clears, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirtyLogStats {
    /// `KVM_GET_DIRTY_LOG` calls.
    pub syncs: u64,
    /// Time spent in syncs (GET + fold), nanoseconds.
    pub sync_ns: u64,
    /// Dirty pages reported by syncs (summed over syncs).
    pub pages_synced: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls made.
    pub clears: u64,
    /// Clear requests that needed no ioctl (nothing known dirty in the range).
    pub clears_skipped: u64,
    /// Time spent in clears, nanoseconds.
    pub clear_ns: u64,
    /// Dirty bits cleared in KVM.
    pub pages_cleared: u64,
    /// Clear requests for a slot whose cache was never synced since its logging started (a slot
    /// made or re-made after the caller's last sync, e.g. a region unmapped and mapped again
    /// during a migration): nothing is known dirty there, so nothing is cleared (no ioctl).
    pub clears_before_sync: u64,
    /// Ring mode: harvests of all vCPU rings (each followed by `KVM_RESET_DIRTY_RINGS` when it
    /// found entries), from syncs, the reaper thread and ring-full exits.
    pub ring_reaps: u64,
    /// Ring mode: entries harvested (one per page a vCPU dirtied since its last harvest).
    pub ring_entries: u64,
    /// Ring mode: time spent harvesting and resetting, nanoseconds.
    pub ring_reap_ns: u64,
    /// Ring mode: harvests that found a ring completely full without a ring-full exit (entries
    /// may have been lost by the kernel; see [`VcpuRingStats::found_full`](crate::VcpuRingStats::found_full)). Each makes every
    /// page of every logging slot dirty (this listener's, and the ones the [`Vm`](crate::Vm) keeps entries
    /// for), so the next sync reports them all: nothing lost can go unreported.
    pub ring_found_full: u64,
    /// Ring mode: entries of no logging memslot of the [`Vm`](crate::Vm) (a slot deleted or no longer
    /// logging since, or one the VMM made through its own fd), dropped. Entries of another
    /// owner's logging slot (a second listener's, one made with [`Vm::set_memslot`](crate::Vm::set_memslot)) are not
    /// dropped: the `Vm` keeps them for their owner.
    pub ring_foreign: u64,
}

/// The live counters behind [`DirtyLogStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    syncs: AtomicU64,
    sync_ns: AtomicU64,
    pages_synced: AtomicU64,
    clears: AtomicU64,
    clears_skipped: AtomicU64,
    clear_ns: AtomicU64,
    pages_cleared: AtomicU64,
    clears_before_sync: AtomicU64,
    ring_reaps: AtomicU64,
    ring_entries: AtomicU64,
    ring_reap_ns: AtomicU64,
    ring_found_full: AtomicU64,
    ring_foreign: AtomicU64,
}

impl Counters {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> DirtyLogStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirtyLogStats {
            syncs: load(&self.syncs),
            sync_ns: load(&self.sync_ns),
            pages_synced: load(&self.pages_synced),
            clears: load(&self.clears),
            clears_skipped: load(&self.clears_skipped),
            clear_ns: load(&self.clear_ns),
            pages_cleared: load(&self.pages_cleared),
            clears_before_sync: load(&self.clears_before_sync),
            ring_reaps: load(&self.ring_reaps),
            ring_entries: load(&self.ring_entries),
            ring_reap_ns: load(&self.ring_reap_ns),
            ring_found_full: load(&self.ring_found_full),
            ring_foreign: load(&self.ring_foreign),
        }
    }

    /// One sync that took `ns` and found `pages` dirty.
    pub(crate) fn add_sync(&self, ns: u64, pages: u64) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_ns.fetch_add(ns, Ordering::Relaxed);
        self.pages_synced.fetch_add(pages, Ordering::Relaxed);
    }

    /// One `KVM_CLEAR_DIRTY_LOG` that took `ns` and cleared `bits` bits.
    pub(crate) fn add_clear(&self, ns: u64, bits: u64) {
        self.clears.fetch_add(1, Ordering::Relaxed);
        self.clear_ns.fetch_add(ns, Ordering::Relaxed);
        self.pages_cleared.fetch_add(bits, Ordering::Relaxed);
    }

    /// A clear request that needed no ioctl: nothing known dirty in the range.
    pub(crate) fn add_clear_skipped(&self) {
        self.clears_skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// A clear request for a slot never synced since its logging started.
    pub(crate) fn add_clear_before_sync(&self) {
        self.clears_before_sync.fetch_add(1, Ordering::Relaxed);
    }

    /// One harvest of every ring.
    pub(crate) fn add_reap(&self, harvest: &RingHarvest) {
        self.ring_reaps.fetch_add(1, Ordering::Relaxed);
        self.ring_entries
            .fetch_add(harvest.entries, Ordering::Relaxed);
        self.ring_reap_ns.fetch_add(harvest.ns, Ordering::Relaxed);
        self.ring_found_full
            .fetch_add(harvest.found_full, Ordering::Relaxed);
        self.ring_foreign
            .fetch_add(harvest.dropped, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let c = Counters::default();
        c.add_sync(10, 3);
        c.add_sync(5, 1);
        c.add_clear(7, 2);
        c.add_clear_skipped();
        c.add_clear_before_sync();
        c.add_reap(&RingHarvest {
            entries: 4,
            dropped: 1,
            found_full: 1,
            ns: 9,
            ..RingHarvest::default()
        });
        let s = c.snapshot();
        assert_eq!((s.syncs, s.sync_ns, s.pages_synced), (2, 15, 4));
        assert_eq!((s.clears, s.clear_ns, s.pages_cleared), (1, 7, 2));
        assert_eq!((s.clears_skipped, s.clears_before_sync), (1, 1));
        assert_eq!(
            (
                s.ring_reaps,
                s.ring_entries,
                s.ring_reap_ns,
                s.ring_found_full,
                s.ring_foreign
            ),
            (1, 4, 9, 1, 1)
        );
    }
}
