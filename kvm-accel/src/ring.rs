// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM's per-vCPU dirty ring: enabling it on a VM fd, mapping a vCPU's ring and harvesting it.
//!
//! With `KVM_CAP_DIRTY_LOG_RING(_ACQ_REL)` enabled, KVM no longer keeps a dirty bitmap for the
//! VM: every first write to a write-protected page of a logging memslot pushes one
//! `kvm_dirty_gfn { flags, slot, offset }` entry into the ring of the vCPU that wrote it (a
//! mapping of the vCPU fd) and sets `KVM_DIRTY_GFN_F_DIRTY` in `flags`. Userspace reads entries in
//! order, marks each harvested one `KVM_DIRTY_GFN_F_RESET`, and `KVM_RESET_DIRTY_RINGS` on the
//! VM fd then re-protects the pages of the reset entries and frees them for the kernel. When a
//! ring reaches its soft limit the vCPU exits with `KVM_EXIT_DIRTY_RING_FULL` and must not run
//! again before its ring was harvested and reset.
//!
//! The `flags` word is the hand-over point: the kernel stores `slot`/`offset` before setting
//! `DIRTY` (a release with `_ACQ_REL`), so we load `flags` with acquire before reading the entry,
//! and store `RESET` with release after reading it. See docs/design.md, "The dirty ring".

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_dirty_gfn, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};

use crate::caps::KvmCaps;
use crate::error::{Error, Result};
use crate::fd::{checked_vm_fd, AsKvmFd};
use crate::mode::KvmDirtyLogMode;
use crate::raw::{self, FdKind, KvmFd};

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page not harvested yet.
pub(crate) const GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace harvested the entry; the next reset recycles it.
pub(crate) const GFN_F_RESET: u32 = 1 << 1;

/// Size of one `kvm_dirty_gfn` entry in bytes.
const ENTRY_BYTES: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;

/// The smallest ring this crate asks for: one 4 KiB page of entries (256). The kernel may want
/// more (it keeps a reserve of entries for the CPU's log buffer, e.g. 512 PML entries on Intel):
/// it then refuses the size and [`enable_dirty_ring`] says so with the valid range.
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_kvm::RING_MIN_BYTES, 4096);
/// ```
pub const RING_MIN_BYTES: u32 = 4096;

/// The ring sizes (bytes, powers of two) this kernel accepts, and which capability gives them.
///
/// # Example
///
/// ```
/// let caps = clearlog_kvm::KvmCaps { dirty_ring_acq_rel_max_bytes: 65536, ..Default::default() };
/// let r = clearlog_kvm::RingRange::of(&caps).unwrap();
/// assert_eq!((r.min, r.max, r.acq_rel), (4096, 65536, true));
/// assert!(r.check(32768).is_ok());
/// assert!(r.check(5000).unwrap_err().to_string().contains("4K..=64K"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingRange {
    /// Smallest size asked for ([`RING_MIN_BYTES`]).
    pub min: u32,
    /// Largest size: what `KVM_CHECK_EXTENSION` returned.
    pub max: u32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (ordered `flags` hand-over) rather than the plain cap.
    pub acq_rel: bool,
}

impl RingRange {
    /// The range the probed capabilities offer; `None` when the kernel has no dirty ring (or only
    /// one smaller than [`RING_MIN_BYTES`]).
    ///
    /// # Example
    ///
    /// ```
    /// assert!(clearlog_kvm::RingRange::of(&Default::default()).is_none());
    /// ```
    pub fn of(caps: &KvmCaps) -> Option<Self> {
        let (max, acq_rel) = if caps.dirty_ring_acq_rel_max_bytes > 0 {
            (caps.dirty_ring_acq_rel_max_bytes, true)
        } else {
            (caps.dirty_ring_max_bytes, false)
        };
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        // The largest power of two the kernel allows.
        let max = if max == 0 { 0 } else { 1 << max.ilog2() };
        (max >= RING_MIN_BYTES).then_some(RingRange {
            min: RING_MIN_BYTES,
            max,
            acq_rel,
        })
    }

    /// Checks `bytes`: a power of two within `min..=max`.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyRingSize`], which lists the valid range.
    ///
    /// # Example
    ///
    /// ```
    /// let r = clearlog_kvm::RingRange { min: 4096, max: 1 << 20, acq_rel: true };
    /// assert!(r.check(1 << 21).is_err());
    /// ```
    pub fn check(&self, bytes: u32) -> Result<()> {
        if !bytes.is_power_of_two() || bytes < self.min || bytes > self.max {
            return Err(Error::DirtyRingSize {
                bytes: u64::from(bytes),
                min: self.min,
                max: self.max,
            });
        }
        Ok(())
    }
}

/// Is this a PVM host (KVM's `kvm_pvm` module is loaded)? There the kernel's ring loses entries
/// when guest code PVM emulates (ring 0) fills a ring (a warning in the kernel log from the ring
/// push); guest ring-3 code runs natively and is fine. The ring is never a default, and tools
/// should say so on such hosts (`vmm caps` does). A heuristic: `/sys/module/kvm_pvm` exists.
///
/// # Example
///
/// ```
/// println!("PVM host: {}", clearlog_kvm::is_pvm_host());
/// ```
pub fn is_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Enables the dirty ring of `bytes` per vCPU on a VM fd: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` where
/// offered, `KVM_CAP_DIRTY_LOG_RING` otherwise. Must be called after the VM is created and before
/// any vCPU (the kernel refuses it later), and never together with manual protection's
/// `INITIALLY_SET` (this crate enables no manual protection on a ring VM at all).
///
/// Returns the [`KvmDirtyLogMode::Ring`] to hand to [`Vm::from_fd`](crate::Vm::from_fd). vCPUs made
/// afterwards must be registered with [`Vm::register_vcpu_ring`](crate::Vm::register_vcpu_ring).
///
/// # Errors
///
/// [`Error::NotAVmFd`] when `vm` is not a KVM VM fd (checked through its `/proc/self/fd` link
/// before any ioctl; [`Error::FdKindUnknown`] when that cannot be told),
/// [`Error::DirtyRingUnsupported`] on a kernel without the capability, [`Error::DirtyRingSize`]
/// for a size that is not a power of two within the range (listed in the error), and
/// [`Error::DirtyRingEnable`] when the kernel refuses (e.g. vCPUs exist already).
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("enable_dirty_ring") { return; }
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let vm_fd = kvm.create_vm().unwrap(); // the VMM's kvm-ioctls `VmFd`, passed as it is
/// match clearlog_kvm::enable_dirty_ring(&vm_fd, 64 << 10) {
///     Ok(mode) => assert_eq!(mode, clearlog_kvm::KvmDirtyLogMode::Ring { bytes: 64 << 10 }),
///     Err(clearlog_kvm::Error::DirtyRingUnsupported) => {} // a kernel without the ring
///     Err(e) => panic!("{e}"),
/// }
/// ```
pub fn enable_dirty_ring(vm: impl AsKvmFd, bytes: u32) -> Result<KvmDirtyLogMode> {
    enable_dirty_ring_on(checked_vm_fd(vm.as_kvm_fd())?, bytes)
}

/// [`enable_dirty_ring`] on a fd known to be a KVM VM fd.
pub(crate) fn enable_dirty_ring_on(vm: KvmFd<'_>, bytes: u32) -> Result<KvmDirtyLogMode> {
    let caps = KvmCaps::probe_kvm(vm);
    let range = RingRange::of(&caps).ok_or(Error::DirtyRingUnsupported)?;
    range.check(bytes)?;
    let cap = if range.acq_rel {
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    } else {
        KVM_CAP_DIRTY_LOG_RING
    };
    raw::enable_cap(vm, cap, u64::from(bytes)).map_err(|source| Error::DirtyRingEnable {
        bytes,
        min: range.min,
        max: range.max,
        source,
    })?;
    Ok(KvmDirtyLogMode::Ring { bytes })
}

/// Per-vCPU dirty-ring counters ([`KvmMemoryListener::ring_stats`](crate::KvmMemoryListener::ring_stats),
/// [`Vm::ring_stats`](crate::Vm::ring_stats)).
///
/// # Example
///
/// ```
/// let s = clearlog_kvm::VcpuRingStats { vcpu: 1, ..Default::default() };
/// assert_eq!(s.harvested + s.full_exits + s.found_full, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuRingStats {
    /// The vCPU index.
    pub vcpu: u32,
    /// Entries harvested from this vCPU's ring (one per page the vCPU dirtied and we reaped).
    pub harvested: u64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits of this vCPU (reported by the VMM's vCPU loop with
    /// [`Vm::note_ring_full_exit`](crate::Vm::note_ring_full_exit)).
    pub full_exits: u64,
    /// Harvests that found every entry of the ring dirty although no ring-full exit was
    /// reported since the previous harvest: the kernel pushed past its soft limit, which is where
    /// entries can be lost (seen on PVM hosts when emulated ring-0 code fills a ring). Every such
    /// harvest marks every page of every logging memslot dirty.
    pub found_full: u64,
}

/// What one harvest of one ring found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RingPass {
    /// Entries harvested (and marked reset).
    pub entries: u64,
    /// Every entry of the ring was dirty: the ring was completely full.
    pub full: bool,
}

/// Where a ring's entries live.
enum Backing {
    /// `mmap` of a vCPU fd, unmapped on drop.
    Mapped { len: usize },
    /// Memory of this process (unit tests play the kernel on it): a boxed slice of `len` entries
    /// turned into a raw pointer (`Box::into_raw`), freed on drop.
    #[cfg(test)]
    Fake { len: usize },
}

/// One vCPU's dirty ring and our read position in it.
pub(crate) struct DirtyRing {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Index (not yet wrapped) of the next entry to harvest.
    next: u32,
    backing: Backing,
    /// Unit tests: the fake kernel's reset index (the next entry its reset looks at).
    #[cfg(test)]
    kernel_reset_next: u32,
}

// SAFETY: a `DirtyRing` owns what its pointer points at (a MAP_SHARED mapping of the vCPU fd,
// which belongs to the process, not to a thread; or the fake ring's boxed slice), so moving it to
// another thread moves nothing that is bound to the first one. It is not `Sync`, and the only
// code that reads or writes the entries is its own `&self`/`&mut self` methods, so no two of our
// threads access the entries at once (the `Vm` keeps its rings under a lock). The other party,
// the kernel, writes an entry's `slot`/`offset` only while the entry is its own (no `DIRTY`) and
// hands it over by setting `flags` with release semantics; we read `flags` with acquire before
// the entry and give it back with a release store, so no access of ours races with the kernel's,
// whatever thread we run on. (Two `Vm`s registering the same vCPU would make two owners of one
// ring: entries seen twice, a correctness problem, but every shared access stays atomic or a read
// of an entry the kernel does not write.)
unsafe impl Send for DirtyRing {}

impl std::fmt::Debug for DirtyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRing")
            .field("entries", &self.entries)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl DirtyRing {
    /// Maps the ring of `bytes` of the vCPU behind `vcpu` (`KVM_DIRTY_LOG_PAGE_OFFSET` pages into
    /// the vCPU fd).
    ///
    /// The mapping is of a KVM vCPU fd (checked by `KvmFd`), so it is KVM's ring pages or
    /// nothing: if the vCPU's VM has no ring, or a smaller one than `bytes` (a wrong
    /// `KvmDirtyLogMode::Ring` given to [`Vm::from_fd`](crate::Vm::from_fd), or a vCPU of another VM),
    /// the kernel has no page to give past its ring and an access there raises `SIGBUS` (the
    /// process dies), never touches memory of ours.
    pub(crate) fn map(vcpu: KvmFd<'_>, bytes: u32) -> std::io::Result<Self> {
        debug_assert_eq!(vcpu.kind(), FdKind::Vcpu);
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = if page > 0 { page as i64 } else { 4096 };
        let offset = i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        let len = bytes as usize;
        // SAFETY: a new shared mapping at an address the kernel picks (no MAP_FIXED), so no
        // existing mapping is touched, of a KVM vCPU fd at the offset KVM documents for the ring,
        // MAP_SHARED and not executable as KVM requires.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&vcpu.fd()),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirtyRing {
            base: NonNull::new(p.cast()).expect("mmap never returns NULL on success"),
            entries: bytes / ENTRY_BYTES,
            next: 0,
            backing: Backing::Mapped { len },
            #[cfg(test)]
            kernel_reset_next: 0,
        })
    }

    /// A ring in process memory, for unit tests (they push entries as the kernel would).
    #[cfg(test)]
    pub(crate) fn fake(entries: u32) -> Self {
        let mem = vec![kvm_dirty_gfn::default(); entries as usize].into_boxed_slice();
        // The pointer is taken from `Box::into_raw`, so no later move of a `Box` invalidates it.
        let raw = Box::into_raw(mem);
        let base = NonNull::new(raw.cast::<kvm_dirty_gfn>()).expect("a boxed slice is never NULL");
        DirtyRing {
            base,
            entries,
            next: 0,
            backing: Backing::Fake {
                len: entries as usize,
            },
            kernel_reset_next: 0,
        }
    }

    /// Number of entries.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    fn flags(&self, index: u32) -> &AtomicU32 {
        let e = self
            .base
            .as_ptr()
            .wrapping_add((index % self.entries) as usize);
        // SAFETY: `e` is an entry inside the mapping (index wrapped below `entries`, which is
        // `bytes / 16` of a mapping of `bytes`), which lives as long as `self` and so outlives the
        // returned reference; `flags` is a naturally aligned u32 (entries are 16-byte aligned in a
        // page-aligned mapping) that the kernel accesses only atomically too (READ_ONCE, acquire
        // loads and release stores), and we never access it non-atomically. (Past the end of a
        // vCPU's real ring, see `map`, an access raises SIGBUS: no memory is touched.)
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) }
    }

    /// Harvests every dirty entry from the read position on, in order, giving `(slot, offset)` to
    /// `found`, and marks each one reset. Stops at the first entry that is not dirty (or after one
    /// full turn). The caller then calls `KVM_RESET_DIRTY_RINGS`.
    pub(crate) fn harvest(&mut self, mut found: impl FnMut(u32, u64)) -> RingPass {
        let mut pass = RingPass::default();
        while pass.entries < u64::from(self.entries) {
            let flags = self.flags(self.next);
            // Acquire: the kernel's stores of slot and offset are visible once DIRTY is.
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                break;
            }
            let e = self
                .base
                .as_ptr()
                .wrapping_add((self.next % self.entries) as usize);
            // SAFETY: `e` is inside the mapping as in `flags`. The kernel writes an entry's slot
            // and offset only while the entry is its own (before it sets DIRTY with release) and
            // not again until we store RESET and KVM_RESET_DIRTY_RINGS frees it; our acquire load
            // saw DIRTY, so these reads see its stores and race with no write.
            let (slot, offset) = unsafe {
                (
                    std::ptr::addr_of!((*e).slot).read_volatile(),
                    std::ptr::addr_of!((*e).offset).read_volatile(),
                )
            };
            found(slot, offset);
            // Release: our reads of the entry happen before the kernel may recycle it.
            flags.store(GFN_F_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            pass.entries += 1;
        }
        pass.full = pass.entries == u64::from(self.entries);
        pass
    }

    /// Unit tests: push an entry as the kernel does (`None` when the slot is not free).
    #[cfg(test)]
    pub(crate) fn kernel_push(&mut self, at: u32, slot: u32, offset: u64) -> Option<()> {
        let flags = self.flags(at);
        if flags.load(Ordering::Acquire) != 0 {
            return None;
        }
        let e = self
            .base
            .as_ptr()
            .wrapping_add((at % self.entries) as usize);
        // SAFETY: an entry of the fake ring's boxed slice (index wrapped), which `self` owns; its
        // flags are 0, so the harvester does not read it, and `&mut self` excludes any other
        // access meanwhile.
        unsafe {
            std::ptr::addr_of_mut!((*e).slot).write_volatile(slot);
            std::ptr::addr_of_mut!((*e).offset).write_volatile(offset);
        }
        flags.store(GFN_F_DIRTY, Ordering::Release);
        Some(())
    }

    /// Unit tests: the kernel's reset: entries marked reset become free, in ring order from the
    /// kernel's reset index up to the first entry not marked; returns how many.
    #[cfg(test)]
    pub(crate) fn kernel_reset(&mut self) -> u64 {
        self.kernel_reset_at_most(u64::MAX)
    }

    /// Unit tests: entries marked reset that the (fake) kernel has not freed yet.
    #[cfg(test)]
    pub(crate) fn kernel_marked_reset(&self) -> u64 {
        (0..self.entries)
            .filter(|&i| self.flags(i).load(Ordering::Acquire) & GFN_F_RESET != 0)
            .count() as u64
    }

    /// Unit tests: a reset that frees at most `max` entries (a kernel that resets fewer than were
    /// marked); returns how many it freed.
    #[cfg(test)]
    pub(crate) fn kernel_reset_at_most(&mut self, max: u64) -> u64 {
        let mut n = 0;
        while n < max && n < u64::from(self.entries) {
            let f = self.flags(self.kernel_reset_next);
            if f.load(Ordering::Acquire) & GFN_F_RESET == 0 {
                break;
            }
            f.store(0, Ordering::Release);
            self.kernel_reset_next = self.kernel_reset_next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        match self.backing {
            Backing::Mapped { len } => {
                // SAFETY: `base..+len` is the mapping `map` made, unmapped once, here; no reference
                // into it outlives `self`.
                unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
            }
            #[cfg(test)]
            Backing::Fake { len } => {
                let slice = std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), len);
                // SAFETY: `slice` is exactly the boxed slice `fake` turned into a raw pointer with
                // `Box::into_raw`; it is turned back into a `Box` once, here, and no pointer into
                // it outlives `self`.
                drop(unsafe { Box::from_raw(slice) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harvest_reads_in_order_stops_at_a_clean_entry_and_marks_reset() {
        let mut r = DirtyRing::fake(8);
        for i in 0..3 {
            r.kernel_push(i, 1, u64::from(i) * 10).unwrap();
        }
        let mut got = Vec::new();
        let pass = r.harvest(|s, o| got.push((s, o)));
        assert_eq!(got, vec![(1, 0), (1, 10), (1, 20)]);
        assert_eq!(
            pass,
            RingPass {
                entries: 3,
                full: false
            }
        );
        // Nothing new: nothing harvested, the same entries are not seen twice.
        assert_eq!(r.harvest(|_, _| panic!("harvested twice")).entries, 0);
        assert_eq!(r.kernel_reset(), 3);
    }

    #[test]
    fn harvest_wraps_around_and_reports_a_full_ring() {
        let mut r = DirtyRing::fake(4);
        for i in 0..3 {
            r.kernel_push(i, 0, u64::from(i)).unwrap();
        }
        r.harvest(|_, _| {});
        assert_eq!(r.kernel_reset(), 3);
        // The kernel continues at index 3 and wraps: 4 entries fill the ring.
        for i in 3..7 {
            r.kernel_push(i, 2, u64::from(i)).unwrap();
        }
        assert!(r.kernel_push(7, 2, 7).is_none(), "ring is full");
        let mut got = Vec::new();
        let pass = r.harvest(|_, o| got.push(o));
        assert_eq!(got, vec![3, 4, 5, 6]);
        assert!(pass.full);
        assert_eq!(r.kernel_reset(), 4);
        r.kernel_push(7, 2, 7).unwrap();
        assert_eq!(r.harvest(|_, _| {}).entries, 1);
    }

    #[test]
    fn an_entry_not_yet_dirty_is_left_for_the_next_harvest() {
        let mut r = DirtyRing::fake(4);
        // The kernel filled entry 1 but not yet entry 0 (impossible in order, but the harvester
        // must not skip ahead): nothing is harvested.
        r.kernel_push(1, 0, 5).unwrap();
        assert_eq!(r.harvest(|_, _| {}).entries, 0);
        r.kernel_push(0, 0, 4).unwrap();
        let mut got = Vec::new();
        r.harvest(|_, o| got.push(o));
        assert_eq!(got, vec![4, 5]);
    }

    #[test]
    fn ring_sizes_outside_the_range_list_it() {
        let r = RingRange {
            min: 4096,
            max: 65536,
            acq_rel: false,
        };
        for bad in [0, 1000, 4095, 6144, 131072] {
            let e = r.check(bad).unwrap_err().to_string();
            assert!(e.contains("4K..=64K"), "{e}");
        }
        for good in [4096, 8192, 65536] {
            r.check(good).unwrap();
        }
        let caps = KvmCaps {
            dirty_ring_max_bytes: 100_000,
            ..Default::default()
        };
        assert_eq!(RingRange::of(&caps).unwrap().max, 65536);
        let tiny = KvmCaps {
            dirty_ring_max_bytes: 1024,
            ..Default::default()
        };
        assert!(RingRange::of(&tiny).is_none());
    }
}
