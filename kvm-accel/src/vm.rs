// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A KVM virtual machine (made here, or the VMM's own VM fd) with its dirty-log mode: the handle,
//! and the public face of its memslot table (`slots`), its checked dirty-log calls
//! (`dirty_log`) and its vCPU ring registry (`ring_registry`).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::KVM_CAP_USER_MEMORY;
use kvm_ioctls::{Kvm, VmFd};

use crate::caps::{enable_manual_protect_on, KvmCaps};
use crate::device::{open_kvm, KVM_DEVICE};
use crate::dirty_log::{check_clear, clear_checked, get_guarded};
use crate::error::{Error, Result};
use crate::fd::{checked_vm_fd, AsKvmFd};
use crate::guarded::GuardedWords;
use crate::mode::KvmDirtyLogMode;
use crate::raw::{self, FdKind, KvmFd};
use crate::ring::{enable_dirty_ring_on, RingRange, VcpuRingStats};
use crate::ring_registry::{KeepAll, RingHarvest, RingHarvester, RingRegistry};
use crate::slots::{MemSlot, SlotOwner, SlotTable};

/// Configuration of a [`Vm`].
///
/// # Example
///
/// ```
/// use clearlog_kvm::{KvmDirtyLogMode, VmConfig};
///
/// let cfg = VmConfig { dirty_log: Some(KvmDirtyLogMode::Legacy), ..Default::default() };
/// assert_eq!(cfg.kvm_path, std::path::PathBuf::from("/dev/kvm"));
/// assert_eq!(VmConfig::default().dirty_log, None); // the best the kernel offers
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The dirty-log mode [`Vm::new`] sets up. `None` (the default): the best the kernel offers
    /// ([`KvmCaps::default_dirty_log_mode`]: manual protection where offered, never the ring),
    /// falling back to legacy, with a warning, when enabling manual protection fails. `Some`: that
    /// mode or an error (a manual mode the kernel does not offer, a ring size out of its range;
    /// vCPUs of a ring VM made through [`Vm::vm_fd`] must be registered with
    /// [`Vm::register_vcpu_ring`]).
    pub dirty_log: Option<KvmDirtyLogMode>,
    /// KVM device node, `/dev/kvm` by default.
    pub kvm_path: PathBuf,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            dirty_log: None,
            kvm_path: PathBuf::from(KVM_DEVICE),
        }
    }
}

impl VmConfig {
    /// The default configuration with dirty-log mode `mode` (`None`: the best offered).
    ///
    /// # Example
    ///
    /// ```
    /// use clearlog_kvm::{KvmDirtyLogMode, VmConfig};
    /// assert_eq!(VmConfig::with_dirty_log(Some(KvmDirtyLogMode::Legacy)).dirty_log, Some(KvmDirtyLogMode::Legacy));
    /// ```
    pub fn with_dirty_log(mode: Option<KvmDirtyLogMode>) -> Self {
        VmConfig {
            dirty_log: mode,
            ..VmConfig::default()
        }
    }
}

/// How the `Vm` holds the VM fd.
enum Handle {
    /// Made by [`Vm::new`]: the kvm-ioctls handles (vCPUs are created through them).
    Ioctls { kvm: Kvm, vm: VmFd },
    /// A duplicate of a VMM's VM fd ([`Vm::from_fd`]).
    Dup(OwnedFd),
}

/// A KVM VM: the VM fd, the probed capabilities, the dirty-log mode, a table of the memslots
/// registered through it (by the caller or by a dirty-log cache: a
/// [`KvmMemoryListener`](crate::KvmMemoryListener) or a [`VmmSlotCache`](crate::VmmSlotCache))
/// and, in ring mode, the registered vCPU rings.
///
/// Made either here ([`Vm::new`] opens `/dev/kvm` and creates the VM) or on a VM the VMM
/// already has ([`Vm::from_fd`]: kvm-ioctls' `VmFd` as it is, or any fd).
///
/// All methods take `&self`; the slot table and the rings have their own locks so a `Vm` can be
/// shared between threads (e.g. in an `Arc`). Memslot changes and dirty-log calls for the same
/// slot must still be ordered by the caller (a dirty-log cache holds one slots lock).
///
/// The safe dirty-log calls ([`Vm::get_dirty_log`], [`Vm::clear_dirty_log`]) and the memslot
/// calls refuse slots a cache owns ([`Error::SlotOwnedByCache`]): the cache's
/// [`SlotDirtyCache`](crate::SlotDirtyCache) must see every GET and CLEAR of them, or writes are
/// lost.
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("Vm") { return; }
/// use clearlog_kvm::{Vm, VmConfig};
///
/// let vm = Vm::new(VmConfig::default()).unwrap();
/// println!("dirty log mode: {}", vm.dirty_log_mode());
/// assert!(vm.memslots().is_empty());
/// ```
pub struct Vm {
    handle: Handle,
    caps: KvmCaps,
    mode: KvmDirtyLogMode,
    slots: Mutex<SlotTable>,
    next_owner: AtomicU64,
    /// The registered vCPU rings (ring mode), by vCPU index. Lock order: rings, then slots.
    rings: Mutex<RingRegistry>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("fd", &self.as_fd().as_raw_fd())
            .field("own_kvm", &self.kvm().is_some())
            .field("caps", &self.caps)
            .field("mode", &self.mode)
            .field("slots", &self.slots_lock().entries)
            .finish_non_exhaustive()
    }
}

impl AsFd for Vm {
    /// The VM fd (for the raw ioctls, or the VMM's own calls).
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.handle {
            Handle::Ioctls { vm, .. } => vm.as_kvm_fd(),
            Handle::Dup(fd) => fd.as_fd(),
        }
    }
}

impl AsKvmFd for Vm {
    fn as_kvm_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl Vm {
    /// Opens KVM, creates a VM and sets up the dirty-log mode of
    /// [`VmConfig::dirty_log`].
    ///
    /// Manual protection is enabled here, before any memslot exists, so it applies to
    /// every slot that later gets `KVM_MEM_LOG_DIRTY_PAGES`. A VMM with its own VM uses
    /// [`Vm::from_fd`] instead.
    ///
    /// # Errors
    ///
    /// The device's ([`Error::KvmMissing`], [`Error::KvmPermission`], [`Error::KvmOpen`],
    /// [`Error::ApiVersion`]), `KVM_CREATE_VM`'s ([`Error::Kvm`]), and the mode's
    /// ([`Error::ManualProtectUnsupported`], [`Error::DirtyRingUnsupported`],
    /// [`Error::DirtyRingSize`], [`Error::DirtyRingEnable`]).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::new") { return; }
    /// use clearlog_kvm::{KvmDirtyLogMode, Vm, VmConfig};
    ///
    /// let vm = Vm::new(VmConfig::with_dirty_log(Some(KvmDirtyLogMode::Legacy))).unwrap();
    /// assert_eq!(vm.dirty_log_mode(), KvmDirtyLogMode::Legacy);
    /// ```
    pub fn new(config: VmConfig) -> Result<Self> {
        let kvm = open_kvm(&config.kvm_path)?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        // SAFETY: KVM_CREATE_VM on the KVM device (`open_kvm` checked it) just returned this fd,
        // which `vm` keeps open while the borrow lives (this function).
        let fd = unsafe { KvmFd::new_unchecked(vm.as_kvm_fd(), FdKind::Vm) };
        // Probed on the VM fd: the answers are this VM's.
        let caps = KvmCaps::probe_kvm(fd);
        let mode = match config.dirty_log {
            None => Self::best_mode(fd, &caps),
            Some(KvmDirtyLogMode::Legacy) => KvmDirtyLogMode::Legacy,
            Some(wanted @ KvmDirtyLogMode::Manual { .. }) => {
                enable_manual_protect_on(fd, wanted.enable_flags())?
            }
            // Right after KVM_CREATE_VM: the ring can only be enabled before any vCPU exists.
            Some(KvmDirtyLogMode::Ring { bytes }) => enable_dirty_ring_on(fd, bytes)?,
        };
        tracing::debug!(%caps, %mode, "created KVM VM");
        Ok(Self::with_handle(Handle::Ioctls { kvm, vm }, caps, mode))
    }

    /// The best mode the kernel offers, enabled; legacy (with a warning) if enabling fails.
    fn best_mode(fd: KvmFd<'_>, caps: &KvmCaps) -> KvmDirtyLogMode {
        let wanted = caps.default_dirty_log_mode();
        if !wanted.is_manual() {
            return KvmDirtyLogMode::Legacy;
        }
        enable_manual_protect_on(fd, wanted.enable_flags()).unwrap_or_else(|e| {
            tracing::warn!(
                error = %e,
                "enabling manual dirty-log protection failed: using legacy dirty logging"
            );
            KvmDirtyLogMode::Legacy
        })
    }

    /// A `Vm` on a VM the VMM already has: `vm` is its VM fd (kvm-ioctls' `VmFd` as it is, or
    /// any fd: [`AsKvmFd`]).
    ///
    /// The fd is duplicated (`F_DUPFD_CLOEXEC`): the VMM keeps its own fd and the VM lives until
    /// both are closed. `/dev/kvm` is not opened: the capabilities are probed with
    /// `KVM_CHECK_EXTENSION` on the VM fd.
    ///
    /// `mode` is the dirty-log mode the VM is in: what
    /// [`enable_manual_protect`](crate::enable_manual_protect) (or
    /// [`enable_dirty_ring`](crate::enable_dirty_ring)) returned, or [`KvmDirtyLogMode::Legacy`]
    /// if neither was enabled. The kernel cannot be asked which mode is on, so it must be right:
    /// the caches rely on it (in manual mode they never expect a GET to clear). A manual mode the
    /// kernel does not offer is refused. A ring size larger than the one enabled makes the first
    /// harvest past the real ring raise `SIGBUS` (the process dies; no memory is touched).
    ///
    /// The fd is checked to be a KVM VM fd (the target of its `/proc/self/fd` link is
    /// `anon_inode:kvm-vm`) before any ioctl.
    ///
    /// Memslots the VMM made itself are unknown to this `Vm`: a [`VmmSlotCache`](crate::VmmSlotCache)
    /// tracks those the VMM wants tracked; a listener's memslot ids must avoid them
    /// ([`KvmMemoryListener::with_slot_ids`](crate::KvmMemoryListener::with_slot_ids)), and a
    /// listener probes each id before it creates a memslot, refusing one the VMM uses
    /// ([`Error::SlotIdTaken`]) rather than take the VMM's memslot over. vCPUs stay the VMM's
    /// business ([`Vm::kvm`] and [`Vm::vm_fd`] are `None`).
    ///
    /// # Errors
    ///
    /// [`Error::NotAVmFd`] when `vm` is not a KVM VM fd (a `/dev/kvm` fd, a vCPU fd, another
    /// file), [`Error::FdKindUnknown`] when that cannot be told (no `/proc`),
    /// [`Error::ManualProtectUnsupported`], [`Error::DirtyRingUnsupported`],
    /// [`Error::DirtyRingSize`], [`Error::DupVmFd`] when the fd cannot be duplicated.
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::from_fd") { return; }
    /// use clearlog_kvm::{enable_manual_protect, KvmCaps, Vm};
    ///
    /// let kvm = kvm_ioctls::Kvm::new().unwrap();
    /// let vm_fd = kvm.create_vm().unwrap(); // the VMM's VM, passed as it is
    /// let mode = enable_manual_protect(&vm_fd, KvmCaps::probe(&vm_fd).manual_protect_flags).unwrap();
    /// let vm = Vm::from_fd(&vm_fd, mode).unwrap();
    /// assert!(vm.kvm().is_none());
    /// assert_eq!(vm.dirty_log_mode(), mode);
    /// ```
    pub fn from_fd(vm: impl AsKvmFd, mode: KvmDirtyLogMode) -> Result<Self> {
        // Duplicated first, then checked: the checked fd is the one we keep.
        let dup = vm
            .as_kvm_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::DupVmFd { source })?;
        let vm = checked_vm_fd(dup.as_fd())?;
        if raw::check_extension(vm, KVM_CAP_USER_MEMORY) <= 0 {
            return Err(Error::NotAVmFd {
                reason: "it does not answer KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)",
            });
        }
        let caps = KvmCaps::probe_kvm(vm);
        if let KvmDirtyLogMode::Ring { bytes } = mode {
            RingRange::of(&caps)
                .ok_or(Error::DirtyRingUnsupported)?
                .check(bytes)?;
        }
        let requested = mode.enable_flags();
        if requested & caps.manual_protect_flags != requested {
            return Err(Error::ManualProtectUnsupported {
                requested,
                offered: caps.manual_protect_flags,
            });
        }
        tracing::debug!(%caps, %mode, "using the VMM's KVM VM");
        Ok(Self::with_handle(Handle::Dup(dup), caps, mode))
    }

    fn with_handle(handle: Handle, caps: KvmCaps, mode: KvmDirtyLogMode) -> Self {
        Vm {
            handle,
            caps,
            mode,
            slots: Mutex::new(SlotTable::default()),
            next_owner: AtomicU64::new(0),
            rings: Mutex::new(RingRegistry::default()),
        }
    }

    /// The VM fd, known to be a KVM VM fd.
    pub(crate) fn kvm_fd(&self) -> KvmFd<'_> {
        // SAFETY: `Vm::new` made the fd with KVM_CREATE_VM on the KVM device; `Vm::from_fd`
        // checked its duplicate (`checked_vm_fd`), which is the fd we keep; it never changes.
        unsafe { KvmFd::new_unchecked(self.as_fd(), FdKind::Vm) }
    }

    fn slots_lock(&self) -> MutexGuard<'_, SlotTable> {
        // A panic while holding this lock cannot leave the maps inconsistent: every update is a
        // single insert or remove (or one bit).
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rings_lock(&self) -> MutexGuard<'_, RingRegistry> {
        // Counters and read positions are updated entry by entry; a panic mid-harvest leaves
        // entries marked reset that the next reset recycles, nothing inconsistent.
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The system (`/dev/kvm`) handle, when this `Vm` opened it ([`Vm::new`]); `None` on a
    /// VMM's VM fd ([`Vm::from_fd`]). For creating vCPUs (`KVM_GET_SUPPORTED_CPUID`...).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::kvm") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(vm.kvm().is_some());
    /// ```
    pub fn kvm(&self) -> Option<&Kvm> {
        match &self.handle {
            Handle::Ioctls { kvm, .. } => Some(kvm),
            Handle::Dup(_) => None,
        }
    }

    /// The kvm-ioctls VM handle, when this `Vm` created the VM ([`Vm::new`]); `None` on a VMM's
    /// VM fd. For creating vCPUs. Every VM has [`AsFd`] instead.
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::vm_fd") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// let vcpu = vm.vm_fd().unwrap().create_vcpu(0).unwrap();
    /// ```
    pub fn vm_fd(&self) -> Option<&VmFd> {
        match &self.handle {
            Handle::Ioctls { vm, .. } => Some(vm),
            Handle::Dup(_) => None,
        }
    }

    /// The capabilities probed at creation (on the VM fd).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::caps") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(vm.caps().max_memslots > 0);
    /// ```
    pub fn caps(&self) -> &KvmCaps {
        &self.caps
    }

    /// The dirty-log mode in effect.
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::dirty_log_mode") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(!vm.dirty_log_mode().is_ring()); // never the default
    /// ```
    pub fn dirty_log_mode(&self) -> KvmDirtyLogMode {
        self.mode
    }

    /// A fresh owner id for a dirty-log cache (its slots are registered under it).
    pub(crate) fn new_cache_owner(&self) -> SlotOwner {
        SlotOwner::Cache(self.next_owner.fetch_add(1, Ordering::Relaxed))
    }
}

/// The memslot table.
impl Vm {
    fn check_slot_id(&self, slot: u32) -> Result<()> {
        let (id, as_id) = (slot & 0xffff, slot >> 16);
        if id >= self.caps.max_memslots || as_id >= self.caps.address_spaces {
            return Err(Error::SlotOutOfRange {
                slot,
                max: self.caps.max_memslots,
            });
        }
        Ok(())
    }

    /// Creates or updates memslot `slot` (address-space id in bits 16-31).
    ///
    /// Calling it again for an existing slot with the same addresses and size toggles
    /// dirty logging (`log_dirty`). With manual protection and `INITIALLY_SET`, turning
    /// logging on makes every page of the slot read as dirty. A slot a dirty-log cache owns is
    /// refused ([`Error::SlotOwnedByCache`]).
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr + size` must be a mapping of this process that stays valid
    /// (not unmapped, not remapped) until the slot is removed or the VM is dropped: the
    /// guest reads and writes it.
    ///
    /// # Errors
    ///
    /// [`Error::SlotOutOfRange`], [`Error::InvalidMemslot`], [`Error::SlotOwnedByCache`],
    /// [`Error::MemslotRefused`], [`Error::Kvm`].
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::set_memslot") { return; }
    /// use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    /// use clearlog_kvm::{Vm, VmConfig};
    ///
    /// // `mem` is declared first so it is dropped last: it outlives the VM and its memslot.
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// let vm = Vm::new(VmConfig::default()).unwrap();
    /// let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    /// // SAFETY: `mem` outlives `vm` (declared before it, so dropped after it).
    /// unsafe { vm.set_memslot(0, 0, 1 << 20, host, true).unwrap() };
    /// assert_eq!(vm.memslot(0).unwrap().pages(), 256);
    /// ```
    pub unsafe fn set_memslot(
        &self,
        slot: u32,
        guest_phys: u64,
        size: u64,
        host_addr: u64,
        log_dirty: bool,
    ) -> Result<()> {
        let s = MemSlot {
            guest_phys,
            size,
            host_addr,
            log_dirty,
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.set_slot_as(slot, s, SlotOwner::Caller, false) }
    }

    /// Creates (`create`) or updates memslot `slot` for `owner`.
    ///
    /// # Safety
    ///
    /// As [`Vm::set_memslot`].
    pub(crate) unsafe fn set_slot_as(
        &self,
        slot: u32,
        s: MemSlot,
        owner: SlotOwner,
        create: bool,
    ) -> Result<()> {
        self.check_slot_id(slot)?;
        // SAFETY: forwarded from the caller.
        unsafe { self.slots_lock().set(self.kvm_fd(), slot, s, owner, create) }
    }

    /// Records memslot `slot`, made by the VMM through its own fd, for the cache `owner` (no
    /// ioctl): [`VmmSlotCache::track`](crate::VmmSlotCache::track).
    pub(crate) fn adopt_slot(&self, slot: u32, s: MemSlot, owner: SlotOwner) -> Result<()> {
        self.check_slot_id(slot)?;
        self.slots_lock().adopt(slot, s, owner)
    }

    /// Forgets memslot `slot` of `owner` (no ioctl): the VMM deletes it itself.
    pub(crate) fn forget_slot_as(&self, slot: u32, owner: SlotOwner) -> Result<()> {
        let mut slots = self.slots_lock();
        slots.owned(slot, owner)?;
        slots.forget(slot);
        Ok(())
    }

    /// Deletes memslot `slot`. Sync its dirty log first if you need it. A slot a cache owns is
    /// refused ([`Error::SlotOwnedByCache`]): it goes when its cache lets it go.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`], [`Error::SlotOwnedByCache`], [`Error::Kvm`].
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::remove_memslot") { return; }
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    /// # let host = vm_memory::GuestMemoryBackend::get_host_address(&mem, vm_memory::GuestAddress(0)).unwrap() as u64;
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// // SAFETY: `mem` (declared first) outlives `vm`.
    /// unsafe { vm.set_memslot(0, 0, 1 << 20, host, false) }.unwrap();
    /// vm.remove_memslot(0).unwrap();
    /// assert!(vm.remove_memslot(0).is_err());
    /// ```
    pub fn remove_memslot(&self, slot: u32) -> Result<()> {
        self.remove_slot_as(slot, SlotOwner::Caller)
    }

    pub(crate) fn remove_slot_as(&self, slot: u32, owner: SlotOwner) -> Result<()> {
        self.slots_lock().remove(self.kvm_fd(), slot, owner)
    }

    /// Fault injection for unit tests: hand `slot` to the caller in this `Vm`'s table only (the
    /// kernel's memslot stays), so its owner's next delete fails before the ioctl.
    #[cfg(test)]
    pub(crate) fn steal_slot_for_test(&self, slot: u32) {
        if let Some(e) = self.slots_lock().entries.get_mut(&slot) {
            e.owner = SlotOwner::Caller;
        }
    }

    /// The registered memslot `slot`, if any (made by the caller or owned by a cache).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::memslot") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(vm.memslot(0).is_none());
    /// ```
    pub fn memslot(&self, slot: u32) -> Option<MemSlot> {
        self.slots_lock().entries.get(&slot).map(|e| e.slot)
    }

    /// All registered memslots, by slot id.
    ///
    /// # Example
    ///
    /// See [`Vm`].
    pub fn memslots(&self) -> Vec<(u32, MemSlot)> {
        self.slots_lock()
            .entries
            .iter()
            .map(|(k, e)| (*k, e.slot))
            .collect()
    }

    /// Does a dirty-log cache (a [`KvmMemoryListener`](crate::KvmMemoryListener) or a
    /// [`VmmSlotCache`](crate::VmmSlotCache)) own memslot `slot`?
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::is_cache_slot") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(!vm.is_cache_slot(0));
    /// ```
    pub fn is_cache_slot(&self, slot: u32) -> bool {
        self.slots_lock()
            .entries
            .get(&slot)
            .is_some_and(|e| matches!(e.owner, SlotOwner::Cache(_)))
    }
}

/// The checked dirty-log calls.
impl Vm {
    /// Copies the dirty bitmap of `slot` into `bitmap` (`KVM_GET_DIRTY_LOG`).
    ///
    /// `bitmap` must hold at least [`MemSlot::bitmap_words`] words; only that many are
    /// written. The kernel writes into a scratch buffer of this `Vm` that ends right before an
    /// inaccessible guard page (reused, allocated only when it grows), then the words are copied
    /// to `bitmap`: if the memslot was deleted and made again larger behind this `Vm`'s back
    /// (through the VM fd, e.g. [`Vm::vm_fd`] or the VMM's own fd), the kernel's copy hits the
    /// guard and the call fails with [`Error::SlotChangedBehindVm`] instead of writing past the
    /// buffer. In legacy mode the kernel also clears its bitmap and write-protects the
    /// slot; in manual mode it only copies (the same bits come back until cleared).
    ///
    /// In ring mode there is no kernel bitmap: the call harvests every vCPU ring, resets them
    /// (`KVM_RESET_DIRTY_RINGS`) and hands over, get-and-clear like a legacy GET, the pages of
    /// `slot` that this harvest or an earlier one (a cache's reap) found. Entries of other
    /// slots stay with this `Vm` for their owners. If the reset fails, nothing is handed over
    /// (the pages are still writable) and the bits stay for the next call.
    ///
    /// Only for slots made with [`Vm::set_memslot`]: a slot a cache owns gives
    /// [`Error::SlotOwnedByCache`] (a legacy GET would eat bits the cache never sees; sync it
    /// through its cache).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSlot`], [`Error::SlotOwnedByCache`], [`Error::SlotNotLogging`],
    /// [`Error::BufferTooSmall`], [`Error::SlotChangedBehindVm`], [`Error::GuardedBuffer`],
    /// [`Error::Kvm`]; in ring mode the reset's ([`Error::DirtyRingReset`],
    /// [`Error::DirtyRingResetFailed`]).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::get_dirty_log") { return; }
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    /// # let host = vm_memory::GuestMemoryBackend::get_host_address(&mem, vm_memory::GuestAddress(0)).unwrap() as u64;
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// // SAFETY: `mem` (declared first) outlives `vm`.
    /// unsafe { vm.set_memslot(0, 0, 1 << 20, host, true) }.unwrap();
    /// let mut bitmap = vec![0u64; vm.memslot(0).unwrap().bitmap_words()];
    /// vm.get_dirty_log(0, &mut bitmap).unwrap(); // no vCPU ran: nothing written
    /// ```
    pub fn get_dirty_log(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        if self.mode.is_ring() {
            return self.get_dirty_log_ring(slot, bitmap);
        }
        let vm = self.kvm_fd();
        let mut slots = self.slots_lock();
        let needed = slots.check_get(slot, SlotOwner::Caller, bitmap.len())?;
        // The kernel writes into a guarded scratch buffer, never into the caller's slice: a
        // memslot changed behind this Vm's back gives an error.
        let words = slots.scratch(needed)?.tail_mut(needed);
        get_guarded(vm, slot, words)?;
        bitmap[..needed].copy_from_slice(words);
        Ok(())
    }

    /// [`Vm::get_dirty_log`] in ring mode: harvest, reset, take the slot's pending pages.
    fn get_dirty_log_ring(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        let needed = self
            .slots_lock()
            .check_get(slot, SlotOwner::Caller, bitmap.len())?;
        /// A harvest for the caller's GET: it owns no buffer, every entry goes to the store, and
        /// it takes the store's bits of its slot.
        struct Get {
            slot: u32,
            bits: Option<Vec<u64>>,
        }
        impl RingHarvester for Get {
            fn owner(&self) -> Option<SlotOwner> {
                None
            }
            fn all_dirty(&mut self) {}
            fn take(&mut self, _slot: u32, _offset: u64) -> bool {
                false
            }
            fn drain(&mut self, slot: u32, owner: SlotOwner, bits: &[u64]) -> bool {
                let mine = slot == self.slot && owner == SlotOwner::Caller;
                if mine {
                    self.bits = Some(bits.to_vec());
                }
                mine
            }
        }
        let mut get = Get { slot, bits: None };
        let (_, result) = self.harvest_rings(&mut get);
        result?;
        let out = &mut bitmap[..needed];
        out.fill(0);
        if let Some(bits) = get.bits {
            // The slot may have been re-made (another size) since the check: copy what fits.
            let n = bits.len().min(needed);
            out[..n].copy_from_slice(&bits[..n]);
        }
        Ok(())
    }

    /// `KVM_GET_DIRTY_LOG` of `slot` (checked for `owner`) into the last words of `buffer`, as
    /// many as the slot has in this `Vm`'s table ([`GuardedWords::tail_mut`]).
    pub(crate) fn get_dirty_log_as(
        &self,
        slot: u32,
        buffer: &mut GuardedWords,
        owner: SlotOwner,
    ) -> Result<()> {
        let slots = self.slots_lock();
        let needed = slots.check_get(slot, owner, buffer.len())?;
        get_guarded(self.kvm_fd(), slot, buffer.tail_mut(needed))
    }

    /// Clears the bits set in `bitmap` for pages `[first_page, first_page + num_pages)` of
    /// `slot` and re-arms their tracking (`KVM_CLEAR_DIRTY_LOG`).
    ///
    /// Checks the whole of the kernel's rules against the slot table first (alignment to
    /// 64 pages, a length that is a multiple of 64 unless it ends at the slot end, nothing
    /// past the end), so a bad range gives [`Error::InvalidRange`] before the ioctl. Only
    /// allowed in manual mode ([`Error::NotManualMode`] otherwise; the kernel itself would
    /// accept it).
    ///
    /// Only for slots made with [`Vm::set_memslot`]: a slot a cache owns gives
    /// [`Error::SlotOwnedByCache`]. Its clears must go through its cache: a clear from a stale
    /// copy of the bitmap would wipe the dirty bit of a later write.
    ///
    /// # Errors
    ///
    /// [`Error::NotManualMode`], [`Error::UnknownSlot`], [`Error::SlotOwnedByCache`],
    /// [`Error::SlotNotLogging`], [`Error::InvalidRange`], [`Error::ClearDirtyLog`].
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::clear_dirty_log") { return; }
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    /// # let host = vm_memory::GuestMemoryBackend::get_host_address(&mem, vm_memory::GuestAddress(0)).unwrap() as u64;
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// # if !vm.dirty_log_mode().is_manual() { return; }
    /// // SAFETY: `mem` (declared first) outlives `vm`.
    /// unsafe { vm.set_memslot(0, 0, 1 << 20, host, true) }.unwrap();
    /// // Re-arm pages 0..31 of the slot; pages 32..63 are left alone.
    /// vm.clear_dirty_log(0, 0, 64, &[0xffff_ffff]).unwrap();
    /// assert!(vm.clear_dirty_log(0, 1, 64, &[1]).is_err()); // not 64-page aligned
    /// ```
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        if !self.mode.is_manual() {
            return Err(Error::NotManualMode);
        }
        let e = self.slots_lock().owned(slot, SlotOwner::Caller)?;
        check_clear(&e, slot, first_page, num_pages)?;
        self.clear_owned_slot(slot, first_page, num_pages, bitmap)
    }

    /// `KVM_CLEAR_DIRTY_LOG` for a range already known valid: one a cache built for its own
    /// logging slot (64-page aligned, inside the slot). Only the mode is checked and the slot
    /// table is not locked (the cache holds its own slots lock across its update and this call).
    pub(crate) fn clear_owned_slot(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        clear_checked(
            self.kvm_fd(),
            self.mode,
            slot,
            first_page,
            num_pages,
            bitmap,
        )
    }
}

/// The vCPU rings.
impl Vm {
    /// Maps the dirty ring of vCPU `index` from its vCPU fd (ring mode only). Every vCPU of a ring
    /// VM must be registered right after `KVM_CREATE_VCPU`, before it first runs: entries of an
    /// unregistered vCPU are never harvested, its ring fills and the vCPU stops with
    /// `KVM_EXIT_DIRTY_RING_FULL` forever. Takes kvm-ioctls' `VcpuFd` as it is, or any fd
    /// ([`AsKvmFd`]).
    ///
    /// Only a KVM vCPU fd is mapped (the target of its `/proc/self/fd` link is
    /// `anon_inode:kvm-vcpu:N`): the harvest stores `RESET` flags into the mapping, which must be
    /// KVM's ring, never another file's pages. That the vCPU belongs to this VM cannot be checked:
    /// a vCPU of another VM would have its ring harvested here (a correctness matter of the
    /// caller; past the end of a smaller real ring an access raises `SIGBUS`).
    ///
    /// # Errors
    ///
    /// [`Error::DirtyRingNotEnabled`] when the VM is not in ring mode; [`Error::DirtyRingVcpu`]
    /// when the index is registered already or the fd is not a KVM vCPU fd,
    /// [`Error::DirtyRingVcpuFd`] when that cannot be told, [`Error::DirtyRingMap`] when the
    /// mapping fails.
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::register_vcpu_ring") { return; }
    /// use clearlog_kvm::{KvmDirtyLogMode, Vm, VmConfig};
    ///
    /// let Ok(vm) = Vm::new(VmConfig::with_dirty_log(Some(KvmDirtyLogMode::Ring { bytes: 65536 }))) else {
    ///     return; // a kernel without the dirty ring
    /// };
    /// let vcpu = vm.vm_fd().unwrap().create_vcpu(0).unwrap();
    /// vm.register_vcpu_ring(0, &vcpu).unwrap();
    /// assert_eq!(vm.ring_stats().len(), 1);
    /// ```
    pub fn register_vcpu_ring(&self, index: u32, vcpu: impl AsKvmFd) -> Result<()> {
        let KvmDirtyLogMode::Ring { bytes } = self.mode else {
            return Err(Error::DirtyRingNotEnabled { mode: self.mode });
        };
        self.rings_lock().register(index, vcpu.as_kvm_fd(), bytes)
    }

    /// Drops the ring of vCPU `index` (after the VMM destroyed it or will never run it again).
    /// Returns whether it was registered.
    ///
    /// Entries still in the ring belong to their slots' owners: every ring is harvested first
    /// (into this `Vm`'s pending store, which the caches' next reaps and [`Vm::get_dirty_log`]
    /// take from) and reset, and the ring is dropped only once the reset confirmed them.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyRingResetFailed`] or [`Error::DirtyRingReset`]: the reset failed or reset
    /// fewer entries; the ring stays registered (its harvested entries are kept) and a later call
    /// or reap retries the reset.
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::unregister_vcpu_ring") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(!vm.unregister_vcpu_ring(0).unwrap());
    /// ```
    pub fn unregister_vcpu_ring(&self, index: u32) -> Result<bool> {
        let mut rings = self.rings_lock();
        if !rings.contains(index) {
            return Ok(false);
        }
        // Under one hold of the ring lock: no other harvest runs between this one and the drop.
        let (_, result) = rings.harvest(self.kvm_fd(), &mut self.slots_lock(), &mut KeepAll);
        result?;
        Ok(rings.remove(index))
    }

    /// Records a `KVM_EXIT_DIRTY_RING_FULL` exit of vCPU `index` (the VMM's vCPU loop calls it,
    /// then has the rings reaped before running the vCPU again).
    ///
    /// # Example
    ///
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("Vm::note_ring_full_exit") { return; }
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// vm.note_ring_full_exit(0); // no ring 0: nothing to count
    /// assert!(vm.ring_stats().is_empty());
    /// ```
    pub fn note_ring_full_exit(&self, index: u32) {
        self.rings_lock().note_full_exit(index);
    }

    /// Per-vCPU ring counters, by vCPU index (empty outside ring mode).
    ///
    /// # Example
    ///
    /// See [`Vm::register_vcpu_ring`].
    pub fn ring_stats(&self) -> Vec<VcpuRingStats> {
        self.rings_lock().stats()
    }

    /// Harvests every registered ring and resets them ([`RingRegistry::harvest`]). A cache
    /// harvesting holds its slots lock around this, so nobody sees a harvested bit before its
    /// page is re-protected. Returns the counts even when the reset failed.
    pub(crate) fn harvest_rings(&self, h: &mut dyn RingHarvester) -> (RingHarvest, Result<()>) {
        let start = Instant::now();
        let mut rings = self.rings_lock();
        let (mut total, result) = rings.harvest(self.kvm_fd(), &mut self.slots_lock(), h);
        drop(rings);
        total.ns = start.elapsed().as_nanos() as u64;
        (total, result)
    }

    /// Ring mode: entries harvested that no `KVM_RESET_DIRTY_RINGS` confirmed yet (0 when every
    /// harvested page is re-protected). While it is not 0, no harvested bit may be folded.
    pub(crate) fn ring_reset_owed(&self) -> u64 {
        self.rings_lock().owed()
    }

    /// Unit tests: the ring registry (to register fake rings, push entries, fake the reset).
    #[cfg(test)]
    pub(crate) fn rings_for_test(&self) -> MutexGuard<'_, RingRegistry> {
        self.rings_lock()
    }
}
