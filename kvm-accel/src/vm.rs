// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A KVM virtual machine (made here, or the VMM's own VM fd) with its dirty-log mode, a table of
//! its memslots and the checked dirty-log calls.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::{kvm_userspace_memory_region, KVM_CAP_USER_MEMORY, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};

use crate::caps::{enable_manual_protect_on, KvmCaps, ProtectMode, KVM_API_VERSION};
use crate::error::{Error, Result};
use crate::guarded::{GuardedWords, ProbePage};
use crate::raw::{FdKind, KvmFd};
use crate::ring::{enable_dirty_ring_on, DirtyRing, RingRange, VcpuRingStats};
use crate::{raw, PAGE_SIZE};

/// The default KVM device node.
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_kvm::KVM_DEVICE, "/dev/kvm");
/// ```
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Which dirty-log mode [`Vm::new`] should set up.
///
/// # Example
///
/// ```
/// use clearlog_kvm::DirtyLogChoice;
/// assert_eq!(DirtyLogChoice::default(), DirtyLogChoice::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyLogChoice {
    /// The best the kernel offers ([`crate::default_protect_mode`]); falls back to
    /// legacy, with a warning, when enabling manual protection fails.
    #[default]
    Auto,
    /// Legacy `KVM_GET_DIRTY_LOG` (get-and-clear), even if manual protection is offered.
    Legacy,
    /// Manual protection; an error if the kernel does not offer the requested flags or
    /// refuses to enable them.
    Manual {
        /// Also enable `KVM_DIRTY_LOG_INITIALLY_SET`.
        initially_set: bool,
    },
    /// The per-vCPU dirty ring of `bytes` per vCPU ([`crate::enable_dirty_ring`]); never chosen by
    /// `Auto`. vCPUs made through [`Vm::vm_fd`] must be registered with
    /// [`Vm::register_vcpu_ring`].
    Ring {
        /// Ring size per vCPU in bytes: a power of two within [`crate::RingRange`].
        bytes: u32,
    },
}

/// Configuration of a [`Vm`].
///
/// # Example
///
/// ```
/// use clearlog_kvm::{DirtyLogChoice, VmConfig};
///
/// let cfg = VmConfig { dirty_log: DirtyLogChoice::Legacy, ..Default::default() };
/// assert_eq!(cfg.kvm_path, std::path::PathBuf::from("/dev/kvm"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Requested dirty-log mode.
    pub dirty_log: DirtyLogChoice,
    /// KVM device node, `/dev/kvm` by default.
    pub kvm_path: PathBuf,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            dirty_log: DirtyLogChoice::Auto,
            kvm_path: PathBuf::from(KVM_DEVICE),
        }
    }
}

/// A memslot as registered with [`Vm::set_memslot`] (or by a
/// [`KvmMemoryListener`](crate::KvmMemoryListener)).
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
}

/// Who made a memslot of a [`Vm`]: the caller ([`Vm::set_memslot`]) or a listener, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotOwner {
    /// Made with [`Vm::set_memslot`]: the caller manages its dirty log.
    Caller,
    /// Made by the [`KvmMemoryListener`](crate::KvmMemoryListener) with this id.
    Listener(u64),
}

#[derive(Debug, Clone, Copy)]
struct SlotEntry {
    slot: MemSlot,
    owner: SlotOwner,
}

/// What the slot-table lock guards.
#[derive(Debug, Default)]
struct SlotState {
    /// The memslots registered through this `Vm`, by id.
    table: BTreeMap<u32, SlotEntry>,
    /// Ring mode: per logging memslot, the pages harvested from the rings by someone other than
    /// the slot's owner (another listener, a caller's GET, an unregister), one bit per page,
    /// waiting for the owner to take them (a listener's reap, [`Vm::get_dirty_log`]). Only taken
    /// after a `KVM_RESET_DIRTY_RINGS` confirmed them (docs/design.md section 2a).
    pending: BTreeMap<u32, Vec<u64>>,
    /// The inaccessible page the memslot-id probes point at, made at the first probe.
    probe_page: Option<ProbePage>,
    /// The guarded buffer [`Vm::get_dirty_log`] GETs into (grown as needed).
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

/// Who harvests the rings ([`Vm::harvest_rings`]) and what it does with the entries.
pub(crate) trait RingHarvester {
    /// The listener harvesting (its slots' entries go to [`take`](Self::take)); `None` for a
    /// harvest of the `Vm` itself (a caller's GET, an unregister), whose entries all go to the
    /// `Vm`'s pending store.
    fn listener(&self) -> Option<SlotOwner>;
    /// A ring was found completely full: the kernel may have lost entries of any slot, so every
    /// page of every logging slot of the harvester must be reported dirty.
    fn all_dirty(&mut self);
    /// Takes the entry of page `offset` of memslot `slot` if that slot is one of the harvester's
    /// own logging slots (false otherwise: the `Vm` keeps it for the slot's owner, or drops it
    /// when no logging slot has that id).
    fn take(&mut self, slot: u32, offset: u64) -> bool;
    /// After a confirmed reset: the pending pages the `Vm` keeps for `slot` (owned by `owner`).
    /// True takes them (the `Vm` forgets them), false leaves them for their owner.
    fn drain(&mut self, slot: u32, owner: SlotOwner, bits: &[u64]) -> bool;
}

/// How the `Vm` holds the VM fd.
enum Handle {
    /// Made by [`Vm::new`]: the kvm-ioctls handles (vCPUs are created through them).
    Ioctls { kvm: Kvm, vm: VmFd },
    /// A duplicate of a VMM's VM fd ([`Vm::from_fd`]).
    Dup(OwnedFd),
}

/// A KVM VM: the VM fd, the probed capabilities, the dirty-log mode and a table of the
/// memslots registered through it (by the caller or by a
/// [`KvmMemoryListener`](crate::KvmMemoryListener)).
///
/// Made either here ([`Vm::new`] opens `/dev/kvm` and creates the VM) or on a VM the VMM
/// already has ([`Vm::from_fd`]: any fd, whatever kvm-ioctls version made it).
///
/// All methods take `&self`; the slot table has its own lock so a `Vm` can be shared
/// between threads (e.g. in an `Arc`). Memslot changes and dirty-log calls for the same
/// slot must still be ordered by the caller (the memory listener holds one slots lock).
///
/// The safe dirty-log calls ([`Vm::get_dirty_log`], [`Vm::clear_dirty_log`]) and the memslot
/// calls refuse slots a listener owns ([`Error::SlotOwnedByListener`]): the listener's
/// [`SlotDirtyCache`](crate::SlotDirtyCache) must see every GET and CLEAR of them, or writes are
/// lost. Go through the memory system (`log_sync_all`, `clear_dirty_bitmap`) instead.
///
/// # Example
///
/// ```no_run
/// use clearlog_kvm::{Vm, VmConfig};
///
/// let vm = Vm::new(VmConfig::default()).unwrap();
/// println!("dirty log mode: {}", vm.protect_mode());
/// ```
pub struct Vm {
    handle: Handle,
    caps: KvmCaps,
    mode: ProtectMode,
    slots: Mutex<SlotState>,
    next_listener: AtomicU64,
    /// The registered vCPU rings (ring mode), by vCPU index.
    rings: Mutex<RingState>,
    /// Unit tests: `KVM_RESET_DIRTY_RINGS` played on the fake rings instead of the kernel.
    #[cfg(test)]
    fake_reset: Mutex<Option<FakeReset>>,
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

/// What the ring lock guards.
#[derive(Default)]
struct RingState {
    /// The registered rings, by vCPU index.
    rings: BTreeMap<u32, VcpuRing>,
    /// Entries harvested (marked reset) that no `KVM_RESET_DIRTY_RINGS` has confirmed yet (it
    /// failed, or reset fewer). Their pages may still be writable, so no harvested bit may be
    /// handed to a client while this is not 0, and every harvest calls the reset again.
    owed: u64,
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

/// What [`Vm::harvest_rings`] found over all rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RingHarvest {
    /// Entries harvested (and marked reset).
    pub entries: u64,
    /// Entries of logging slots the harvester does not own, kept in the `Vm`'s pending store.
    pub kept: u64,
    /// Entries of no logging slot of this `Vm` (deleted since, logging off, or unknown), dropped.
    pub dropped: u64,
    /// Rings found completely full without a ring-full exit reported.
    pub found_full: u64,
    /// Time of the harvest and `KVM_RESET_DIRTY_RINGS`, nanoseconds.
    pub ns: u64,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("fd", &self.as_fd().as_raw_fd())
            .field("own_kvm", &self.kvm().is_some())
            .field("caps", &self.caps)
            .field("mode", &self.mode)
            .field("slots", &self.slots_lock().table)
            .finish_non_exhaustive()
    }
}

impl AsFd for Vm {
    /// The VM fd (for the raw ioctls, or the VMM's own calls).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::os::fd::AsFd;
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// let caps = clearlog_kvm::KvmCaps::probe(vm.as_fd());
    /// ```
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.handle {
            // SAFETY: `vm` owns this open fd and lives as long as `self`, which the borrow
            // cannot outlive.
            Handle::Ioctls { vm, .. } => unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) },
            Handle::Dup(fd) => fd.as_fd(),
        }
    }
}

/// Opens a KVM device node with an error that names the device and the fix.
pub(crate) fn open_kvm(path: &Path) -> Result<Kvm> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::KvmOpen {
            path: path.to_owned(),
            source: vmm_sys_util::errno::Error::new(libc::EINVAL),
        }
    })?;
    let kvm = Kvm::new_with_path(c_path).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing {
            path: path.to_owned(),
        },
        libc::EACCES | libc::EPERM => Error::KvmPermission {
            path: path.to_owned(),
        },
        _ => Error::KvmOpen {
            path: path.to_owned(),
            source,
        },
    })?;
    // No ioctl before we know the node is the KVM device (character device 10:232).
    // SAFETY: `kvm` owns this open fd and outlives the borrow (this statement).
    let fd = unsafe { BorrowedFd::borrow_raw(kvm.as_raw_fd()) };
    if !matches!(FdKind::of(fd), Ok(FdKind::System)) {
        return Err(Error::KvmOpen {
            path: path.to_owned(),
            source: vmm_sys_util::errno::Error::new(libc::ENODEV),
        });
    }
    Ok(kvm)
}

impl Vm {
    /// Opens KVM, creates a VM and sets up the dirty-log mode.
    ///
    /// Manual protection is enabled here, before any memslot exists, so it applies to
    /// every slot that later gets `KVM_MEM_LOG_DIRTY_PAGES`. A VMM with its own VM uses
    /// [`Vm::from_fd`] instead.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use clearlog_kvm::{DirtyLogChoice, Vm, VmConfig};
    ///
    /// let vm = Vm::new(VmConfig {
    ///     dirty_log: DirtyLogChoice::Manual { initially_set: false },
    ///     ..Default::default()
    /// })
    /// .unwrap();
    /// assert!(vm.protect_mode().is_manual());
    /// ```
    pub fn new(config: VmConfig) -> Result<Self> {
        let kvm = open_kvm(&config.kvm_path)?;
        let api = kvm.get_api_version();
        if api != KVM_API_VERSION {
            return Err(Error::ApiVersion(api));
        }
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        // SAFETY: `vm` owns this open fd and outlives the borrow (this function).
        let fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        // SAFETY: KVM_CREATE_VM on the KVM device (`open_kvm` checked it) just returned this fd.
        let fd = unsafe { KvmFd::new_unchecked(fd, FdKind::Vm) };
        // Probed on the VM fd: the answers are this VM's.
        let caps = KvmCaps::probe_kvm(fd);
        let mode = match config.dirty_log {
            DirtyLogChoice::Legacy => ProtectMode::Legacy,
            DirtyLogChoice::Auto => {
                let wanted = caps.default_protect_mode();
                if wanted.is_manual() {
                    match enable_manual_protect_on(fd, wanted.enable_flags()) {
                        Ok(mode) => mode,
                        Err(e) => {
                            tracing::warn!(
                                error = %e,
                                "enabling manual dirty-log protection failed: using legacy dirty logging"
                            );
                            ProtectMode::Legacy
                        }
                    }
                } else {
                    ProtectMode::Legacy
                }
            }
            DirtyLogChoice::Manual { initially_set } => {
                let wanted = ProtectMode::Manual { initially_set };
                enable_manual_protect_on(fd, wanted.enable_flags())?
            }
            // Right after KVM_CREATE_VM: the ring can only be enabled before any vCPU exists.
            DirtyLogChoice::Ring { bytes } => enable_dirty_ring_on(fd, bytes)?,
        };
        tracing::debug!(%caps, %mode, "created KVM VM");
        Ok(Self::with_handle(Handle::Ioctls { kvm, vm }, caps, mode))
    }

    /// A `Vm` on a VM the VMM already has: `vm` is its VM fd, from any kvm-ioctls version
    /// (`VmFd` implements `AsRawFd`: borrow it with `BorrowedFd::borrow_raw`) or none.
    ///
    /// The fd is duplicated (`F_DUPFD_CLOEXEC`): the VMM keeps its own fd and the VM lives until
    /// both are closed. `/dev/kvm` is not opened: the capabilities are probed with
    /// `KVM_CHECK_EXTENSION` on the VM fd.
    ///
    /// `mode` is the dirty-log mode the VM is in: what
    /// [`enable_manual_protect`](crate::enable_manual_protect) (or
    /// [`enable_dirty_ring`](crate::enable_dirty_ring)) returned, or [`ProtectMode::Legacy`] if
    /// neither was enabled. The kernel cannot be asked which mode is on, so it must be right: the
    /// listener relies on it (in manual mode it never expects a GET to clear). A manual mode the
    /// kernel does not offer is refused. A ring size larger than the one enabled makes the first
    /// harvest past the real ring raise `SIGBUS` (the process dies; no memory is touched).
    ///
    /// The fd is checked to be a KVM VM fd (the target of its `/proc/self/fd` link is
    /// `anon_inode:kvm-vm`) before any ioctl.
    ///
    /// Memslots the VMM made itself are unknown to this `Vm`; give its listeners slot ids that
    /// avoid them ([`KvmMemoryListener::with_slot_ids`](crate::KvmMemoryListener::with_slot_ids)):
    /// a listener probes each id before it creates a memslot and refuses one the VMM uses
    /// ([`Error::SlotIdTaken`]) rather than take the VMM's memslot over.
    /// vCPUs stay the VMM's business ([`Vm::kvm`] and [`Vm::vm_fd`] are `None`).
    ///
    /// # Errors
    ///
    /// [`Error::NotAVmFd`] when `vm` is not a KVM VM fd (a `/dev/kvm` fd, a vCPU fd, another
    /// file), [`Error::FdKindUnknown`] when that cannot be told (no `/proc`),
    /// [`Error::ManualProtectUnsupported`], [`Error::Kvm`] when the fd cannot be duplicated.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::os::fd::{AsRawFd, BorrowedFd};
    /// use clearlog_kvm::{enable_manual_protect, Vm, MANUAL_PROTECT_ENABLE};
    ///
    /// let kvm = kvm_ioctls::Kvm::new().unwrap();
    /// let vm_fd = kvm.create_vm().unwrap(); // the VMM's VM
    /// // SAFETY: `vm_fd` owns the fd and outlives the borrows below.
    /// let fd = unsafe { BorrowedFd::borrow_raw(vm_fd.as_raw_fd()) };
    /// let mode = enable_manual_protect(fd, MANUAL_PROTECT_ENABLE).unwrap();
    /// let vm = Vm::from_fd(fd, mode).unwrap();
    /// assert!(vm.kvm().is_none());
    /// ```
    pub fn from_fd(vm: impl AsFd, mode: ProtectMode) -> Result<Self> {
        // Duplicated first, then checked: the checked fd is the one we keep.
        let dup = vm.as_fd().try_clone_to_owned().map_err(|e| Error::Kvm {
            op: "F_DUPFD_CLOEXEC (duplicating the VM fd)",
            source: vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)),
        })?;
        let vm = KvmFd::vm(dup.as_fd())?;
        if raw::check_extension(vm, KVM_CAP_USER_MEMORY) <= 0 {
            return Err(Error::NotAVmFd {
                reason: "it does not answer KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)",
            });
        }
        let caps = KvmCaps::probe_kvm(vm);
        if let ProtectMode::Ring { bytes, .. } = mode {
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

    fn with_handle(handle: Handle, caps: KvmCaps, mode: ProtectMode) -> Self {
        Vm {
            handle,
            caps,
            mode,
            slots: Mutex::new(SlotState::default()),
            next_listener: AtomicU64::new(0),
            rings: Mutex::new(RingState::default()),
            #[cfg(test)]
            fake_reset: Mutex::new(None),
        }
    }

    /// The VM fd, known to be a KVM VM fd.
    fn kvm_fd(&self) -> KvmFd<'_> {
        // SAFETY: `Vm::new` made the fd with KVM_CREATE_VM on the KVM device; `Vm::from_fd`
        // checked its duplicate (`KvmFd::vm`), which is the fd we keep; it never changes.
        unsafe { KvmFd::new_unchecked(self.as_fd(), FdKind::Vm) }
    }

    fn rings_lock(&self) -> MutexGuard<'_, RingState> {
        // Counters and read positions are updated entry by entry; a panic mid-harvest leaves
        // entries marked reset that the next reset recycles, nothing inconsistent.
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps the dirty ring of vCPU `index` from its vCPU fd (ring mode only). Every vCPU of a ring
    /// VM must be registered right after `KVM_CREATE_VCPU`, before it first runs: entries of an
    /// unregistered vCPU are never harvested, its ring fills and the vCPU stops with
    /// `KVM_EXIT_DIRTY_RING_FULL` forever. Works on a VMM's own vCPU fds (any kvm-ioctls version).
    ///
    /// Only a KVM vCPU fd is mapped (the target of its `/proc/self/fd` link is
    /// `anon_inode:kvm-vcpu:N`): the harvest stores `RESET` flags into the mapping, which must be
    /// KVM's ring, never another file's pages. That the vCPU belongs to this VM cannot be checked:
    /// a vCPU of another VM would have its ring harvested here (a correctness matter of the
    /// caller; past the end of a smaller real ring an access raises `SIGBUS`).
    ///
    /// # Errors
    ///
    /// [`Error::DirtyRingNotEnabled`] when the VM is not in ring mode, [`Error::DirtyRingVcpu`]
    /// when the index is registered already, the fd is not a KVM vCPU fd (or that cannot be told)
    /// or the mapping fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::os::fd::{AsRawFd, BorrowedFd};
    /// use clearlog_kvm::{DirtyLogChoice, Vm, VmConfig};
    ///
    /// let vm = Vm::new(VmConfig { dirty_log: DirtyLogChoice::Ring { bytes: 65536 }, ..Default::default() }).unwrap();
    /// let vcpu = vm.vm_fd().unwrap().create_vcpu(0).unwrap();
    /// // SAFETY: `vcpu` owns the fd and outlives the borrow.
    /// vm.register_vcpu_ring(0, unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) }).unwrap();
    /// ```
    pub fn register_vcpu_ring(&self, index: u32, vcpu: impl AsFd) -> Result<()> {
        let ProtectMode::Ring { bytes, .. } = self.mode else {
            return Err(Error::DirtyRingNotEnabled { mode: self.mode });
        };
        let mut rings = self.rings_lock();
        if rings.rings.contains_key(&index) {
            return Err(Error::DirtyRingVcpu {
                vcpu: index,
                reason: "already registered".into(),
            });
        }
        // Only a KVM vCPU fd is mapped: a ring of another file would get RESET stored into it.
        let fd = match KvmFd::check(vcpu.as_fd()) {
            Ok(Some(fd)) if fd.kind() == FdKind::Vcpu => fd,
            Ok(_) => {
                return Err(Error::DirtyRingVcpu {
                    vcpu: index,
                    reason: "not a KVM vCPU fd (its /proc/self/fd link is not \
                             anon_inode:kvm-vcpu:N)"
                        .into(),
                })
            }
            Err(e) => {
                return Err(Error::DirtyRingVcpu {
                    vcpu: index,
                    reason: format!(
                        "not known to be a KVM vCPU fd: its /proc/self/fd link cannot be read ({e})"
                    ),
                })
            }
        };
        let ring = DirtyRing::map(fd, bytes).map_err(|e| Error::DirtyRingVcpu {
            vcpu: index,
            reason: format!("mmap of the ring from the vCPU fd failed: {e}"),
        })?;
        rings.rings.insert(
            index,
            VcpuRing {
                ring,
                harvested: 0,
                full_since_harvest: 0,
                full_exits: 0,
                found_full: 0,
            },
        );
        Ok(())
    }

    /// Drops the ring of vCPU `index` (after the VMM destroyed it or will never run it again).
    /// Returns whether it was registered.
    ///
    /// Entries still in the ring belong to their slots' owners: every ring is harvested first
    /// (into this `Vm`'s pending store, which the listeners' next reaps and [`Vm::get_dirty_log`]
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
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(!vm.unregister_vcpu_ring(0).unwrap());
    /// ```
    pub fn unregister_vcpu_ring(&self, index: u32) -> Result<bool> {
        let mut state = self.rings_lock();
        if !state.rings.contains_key(&index) {
            return Ok(false);
        }
        /// The `Vm`'s own harvest: every entry goes to the pending store, for its slot's owner.
        struct Keep;
        impl RingHarvester for Keep {
            fn listener(&self) -> Option<SlotOwner> {
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
        // Under one hold of the ring lock: no other harvest runs between this one and the drop.
        let (_, result) = self.harvest_locked(&mut state, &mut Keep);
        result?;
        Ok(state.rings.remove(&index).is_some())
    }

    /// Records a `KVM_EXIT_DIRTY_RING_FULL` exit of vCPU `index` (the VMM's vCPU loop calls it, then
    /// has the rings reaped before running the vCPU again).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// vm.note_ring_full_exit(0);
    /// ```
    pub fn note_ring_full_exit(&self, index: u32) {
        if let Some(r) = self.rings_lock().rings.get_mut(&index) {
            r.full_exits += 1;
            r.full_since_harvest += 1;
        }
    }

    /// Per-vCPU ring counters, by vCPU index (empty outside ring mode).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(vm.ring_stats().is_empty());
    /// ```
    pub fn ring_stats(&self) -> Vec<VcpuRingStats> {
        self.rings_lock()
            .rings
            .iter()
            .map(|(&vcpu, r)| VcpuRingStats {
                vcpu,
                harvested: r.harvested,
                full_exits: r.full_exits,
                found_full: r.found_full,
            })
            .collect()
    }

    /// Harvests every registered ring, then `KVM_RESET_DIRTY_RINGS` re-protects the harvested
    /// pages. Each entry goes to the harvester if the slot is one of its own
    /// ([`RingHarvester::take`]), else to this `Vm`'s pending store when the slot is a logging slot
    /// of someone else (another listener, the caller), else it is dropped. Once the reset
    /// confirmed the entries, the harvester may take what the store holds for it
    /// ([`RingHarvester::drain`]).
    ///
    /// A listener harvesting holds its slots lock around this, so nobody sees a harvested bit
    /// before its page is re-protected. Returns the counts even when the reset failed.
    pub(crate) fn harvest_rings(&self, h: &mut dyn RingHarvester) -> (RingHarvest, Result<()>) {
        let start = Instant::now();
        let mut rings = self.rings_lock();
        let (mut total, result) = self.harvest_locked(&mut rings, h);
        drop(rings);
        total.ns = start.elapsed().as_nanos() as u64;
        (total, result)
    }

    /// [`Vm::harvest_rings`] with the ring lock held (lock order: rings, then slots).
    fn harvest_locked(
        &self,
        state: &mut RingState,
        h: &mut dyn RingHarvester,
    ) -> (RingHarvest, Result<()>) {
        let mut total = RingHarvest::default();
        let mut slots = self.slots_lock();
        let SlotState { table, pending, .. } = &mut *slots;
        for (&vcpu, r) in state.rings.iter_mut() {
            let pass = r.ring.harvest(|slot, offset| {
                if h.take(slot, offset) {
                    return;
                }
                match table.get(&slot) {
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
        if total.found_full > 0 {
            // Entries may be lost, of any slot: everything that logs may be dirty. The harvester
            // marks its own slots; the store gets every other logging slot, whole.
            h.all_dirty();
            let harvester = h.listener();
            for (&slot, e) in table.iter() {
                if e.slot.log_dirty && Some(e.owner) != harvester {
                    let words = pending
                        .entry(slot)
                        .or_insert_with(|| vec![0; e.slot.bitmap_words()]);
                    fill_pages(words, e.slot.pages());
                }
            }
        }
        // Entries a failed or partial reset left owed are reset again now, even when this harvest
        // found nothing new: until a reset confirms them their pages may be writable.
        state.owed += total.entries;
        if state.owed > 0 {
            match self.reset_dirty_rings(&mut state.rings) {
                // The kernel resets the entries marked reset, in ring order: once it reports as
                // many as are owed, every marked entry is re-protected.
                Ok(reset) => {
                    let marked = state.owed;
                    state.owed = marked.saturating_sub(reset);
                    if state.owed > 0 {
                        return (
                            total,
                            Err(Error::DirtyRingReset {
                                harvested: marked,
                                reset,
                                owed: state.owed,
                            }),
                        );
                    }
                }
                Err(source) => {
                    return (
                        total,
                        Err(Error::DirtyRingResetFailed {
                            owed: state.owed,
                            source,
                        }),
                    )
                }
            }
        }
        // Every harvested entry is re-protected: what the store holds is confirmed.
        pending.retain(|&slot, bits| match table.get(&slot) {
            Some(e) => !h.drain(slot, e.owner, bits),
            None => false,
        });
        (total, Ok(()))
    }

    /// Ring mode: entries harvested that no `KVM_RESET_DIRTY_RINGS` confirmed yet (0 when every
    /// harvested page is re-protected). While it is not 0, no harvested bit may be folded.
    pub(crate) fn ring_reset_owed(&self) -> u64 {
        self.rings_lock().owed
    }

    /// `KVM_RESET_DIRTY_RINGS` (in unit tests with fake rings: the fake kernel's reset).
    fn reset_dirty_rings(
        &self,
        rings: &mut BTreeMap<u32, VcpuRing>,
    ) -> std::result::Result<u64, vmm_sys_util::errno::Error> {
        #[cfg(test)]
        if let Some(fake) = *self.fake_reset.lock().unwrap_or_else(|p| p.into_inner()) {
            let mut left = match fake {
                FakeReset::Kernel => u64::MAX,
                FakeReset::Fail(errno) => return Err(vmm_sys_util::errno::Error::new(errno)),
                FakeReset::AtMost(n) => n,
            };
            let mut reset = 0;
            for r in rings.values_mut() {
                let n = r.ring.kernel_reset_at_most(left);
                left -= n;
                reset += n;
            }
            return Ok(reset);
        }
        let _ = rings;
        raw::reset_dirty_rings(self.kvm_fd())
    }

    /// Unit tests: registers a fake ring (process memory the test pushes entries into) as vCPU
    /// `index`; from now on `KVM_RESET_DIRTY_RINGS` is played on the fake rings
    /// ([`FakeReset::Kernel`] unless [`Vm::set_fake_reset`] said otherwise).
    #[cfg(test)]
    pub(crate) fn register_fake_ring(&self, index: u32, ring: DirtyRing) {
        self.fake_reset
            .lock()
            .unwrap()
            .get_or_insert(FakeReset::Kernel);
        self.rings_lock().rings.insert(
            index,
            VcpuRing {
                ring,
                harvested: 0,
                full_since_harvest: 0,
                full_exits: 0,
                found_full: 0,
            },
        );
    }

    /// Unit tests: how the fake `KVM_RESET_DIRTY_RINGS` behaves from now on.
    #[cfg(test)]
    pub(crate) fn set_fake_reset(&self, fake: FakeReset) {
        *self.fake_reset.lock().unwrap() = Some(fake);
    }

    /// Unit tests: runs `f` on the fake ring of vCPU `index` (to push entries as the kernel does).
    #[cfg(test)]
    pub(crate) fn with_fake_ring<R>(&self, index: u32, f: impl FnOnce(&mut DirtyRing) -> R) -> R {
        f(&mut self
            .rings_lock()
            .rings
            .get_mut(&index)
            .expect("a registered ring")
            .ring)
    }

    /// The system (`/dev/kvm`) handle, when this `Vm` opened it ([`Vm::new`]); `None` on a
    /// VMM's VM fd ([`Vm::from_fd`]). For creating vCPUs (`KVM_GET_SUPPORTED_CPUID`...).
    ///
    /// # Example
    ///
    /// ```no_run
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
    /// ```no_run
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
    /// ```no_run
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// println!("{} memslots", vm.caps().max_memslots);
    /// ```
    pub fn caps(&self) -> &KvmCaps {
        &self.caps
    }

    /// The dirty-log mode in effect.
    ///
    /// # Example
    ///
    /// ```no_run
    /// let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// println!("{}", vm.protect_mode());
    /// ```
    pub fn protect_mode(&self) -> ProtectMode {
        self.mode
    }

    fn slots_lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding this lock cannot leave the maps inconsistent: every update is a
        // single insert or remove (or one bit).
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_slot_id(&self, slot: u32) -> Result<()> {
        let id = slot & 0xffff;
        let as_id = slot >> 16;
        if id >= self.caps.max_memslots || as_id >= self.caps.address_spaces {
            return Err(Error::SlotOutOfRange {
                slot,
                max: self.caps.max_memslots,
            });
        }
        Ok(())
    }

    /// A fresh listener id (listeners register their slots under it).
    pub(crate) fn new_listener_id(&self) -> u64 {
        self.next_listener.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates or updates memslot `slot` (address-space id in bits 16-31).
    ///
    /// Calling it again for an existing slot with the same addresses and size toggles
    /// dirty logging (`log_dirty`). With manual protection and `INITIALLY_SET`, turning
    /// logging on makes every page of the slot read as dirty. A slot a
    /// [`KvmMemoryListener`](crate::KvmMemoryListener) owns is refused
    /// ([`Error::SlotOwnedByListener`]).
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr + size` must be a mapping of this process that stays valid
    /// (not unmapped, not remapped) until the slot is removed or the VM is dropped: the
    /// guest reads and writes it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    /// use clearlog_kvm::{Vm, VmConfig};
    ///
    /// // `mem` is declared first so it is dropped last: it outlives the VM and its memslot.
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// let vm = Vm::new(VmConfig::default()).unwrap();
    /// let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    /// // SAFETY: `mem` outlives `vm` (declared before it, so dropped after it).
    /// unsafe { vm.set_memslot(0, 0, 1 << 20, host, true).unwrap() };
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
        let bad = |reason| Err(Error::InvalidMemslot { slot, reason });
        if s.size == 0 {
            return bad("size is 0 (use remove_memslot)");
        }
        if s.size % PAGE_SIZE != 0 || s.guest_phys % PAGE_SIZE != 0 || s.host_addr % PAGE_SIZE != 0
        {
            return bad("size and addresses must be multiples of 4 KiB");
        }
        if s.guest_phys.checked_add(s.size).is_none() || s.host_addr.checked_add(s.size).is_none() {
            return bad("range overflows");
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: if s.log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: s.guest_phys,
            memory_size: s.size,
            userspace_addr: s.host_addr,
        };
        let mut slots = self.slots_lock();
        let existing = slots.table.get(&slot).copied();
        if let Some(e) = existing {
            if owner == SlotOwner::Caller && e.owner != owner {
                return Err(Error::SlotOwnedByListener { slot });
            }
            if create || e.owner != owner {
                return Err(Error::SlotInUse { slot });
            }
        }
        if create && existing.is_none() && matches!(owner, SlotOwner::Listener(_)) {
            // KVM accepts a request identical to an existing memslot as a no-op: without this a
            // listener would silently take over a memslot the VMM made through its own fd.
            Self::probe_slot_id(self.kvm_fd(), &mut slots, slot, s)?;
        }
        // SAFETY: the caller guarantees the host range stays mapped while the slot exists.
        unsafe { raw::set_user_memory_region(self.kvm_fd(), &region) }.map_err(|source| {
            let new = existing.is_none();
            match source.errno() {
                libc::EEXIST | libc::EINVAL if new => Error::MemslotRefused {
                    slot,
                    guest_phys: s.guest_phys,
                    size: s.size,
                    source,
                },
                _ => Error::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION",
                    source,
                },
            }
        })?;
        slots.table.insert(slot, SlotEntry { slot: s, owner });
        if !s.log_dirty {
            // Logging is off: what the rings reported for the slot goes, as a bitmap would.
            slots.pending.remove(&slot);
        }
        Ok(())
    }

    /// Fails unless memslot id `slot` is free in the kernel, i.e. no memslot exists with that id
    /// that was made outside this `Vm` (one of the VMM's own, made through its own fd): KVM cannot
    /// be asked which ids exist, so we probe, without side effects where possible.
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
    /// memslot this `Vm` knows in the same address space (a free id then gets `EEXIST`, nothing
    /// happens): `EINVAL` means the id is in use by someone else. When this `Vm` knows no memslot
    /// there yet, the request must create: 1 page at the new slot's guest address; `EINVAL` means
    /// in use, success means free (the probe slot is deleted before the real one is made).
    /// Caveat of that case: for that instant the first page of the new guest range maps the
    /// inaccessible page, and a vCPU touching it then gets `EFAULT` from `KVM_RUN` (the range was
    /// not guest memory before, so only a guest probing unmapped memory can notice). `EEXIST`
    /// there means the id is free but the range overlaps a memslot of the VMM: the real create
    /// reports it ([`Error::MemslotRefused`]).
    fn probe_slot_id(vm: KvmFd<'_>, state: &mut SlotState, slot: u32, new: MemSlot) -> Result<()> {
        let as_id = slot >> 16;
        let known = state
            .table
            .iter()
            .find(|(&id, _)| id >> 16 == as_id)
            .map(|(_, e)| e.slot.guest_phys);
        if state.probe_page.is_none() {
            let page = ProbePage::new().map_err(|source| Error::SlotProbePage { source })?;
            state.probe_page = Some(page);
        }
        let Some(page) = state.probe_page.as_mut() else {
            unreachable!("made just above")
        };
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

    /// Deletes memslot `slot`. Sync its dirty log first if you need it. A slot a listener owns is
    /// refused ([`Error::SlotOwnedByListener`]): it goes when its region is removed.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// vm.remove_memslot(0).unwrap();
    /// ```
    pub fn remove_memslot(&self, slot: u32) -> Result<()> {
        self.remove_slot_as(slot, SlotOwner::Caller)
    }

    pub(crate) fn remove_slot_as(&self, slot: u32, owner: SlotOwner) -> Result<()> {
        let mut slots = self.slots_lock();
        let Some(e) = slots.table.get(&slot).copied() else {
            return Err(Error::UnknownSlot(slot));
        };
        if e.owner != owner {
            return Err(Error::SlotOwnedByListener { slot });
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: e.slot.guest_phys,
            memory_size: 0,
            userspace_addr: e.slot.host_addr,
        };
        // SAFETY: size 0 deletes the slot; the kernel stops using the host mapping.
        unsafe { raw::set_user_memory_region(self.kvm_fd(), &region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        slots.table.remove(&slot);
        slots.pending.remove(&slot);
        Ok(())
    }

    /// Fault injection for unit tests: hand `slot` to the caller in this `Vm`'s table only (the
    /// kernel's memslot stays), so its owner's next delete fails before the ioctl.
    #[cfg(test)]
    pub(crate) fn steal_slot_for_test(&self, slot: u32) {
        if let Some(e) = self.slots_lock().table.get_mut(&slot) {
            e.owner = SlotOwner::Caller;
        }
    }

    /// The registered memslot `slot`, if any (made by the caller or by a listener).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(vm.memslot(0).is_none());
    /// ```
    pub fn memslot(&self, slot: u32) -> Option<MemSlot> {
        self.slots_lock().table.get(&slot).map(|e| e.slot)
    }

    /// All registered memslots, by slot id.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(vm.memslots().is_empty());
    /// ```
    pub fn memslots(&self) -> Vec<(u32, MemSlot)> {
        self.slots_lock()
            .table
            .iter()
            .map(|(k, e)| (*k, e.slot))
            .collect()
    }

    /// Does a [`KvmMemoryListener`](crate::KvmMemoryListener) own memslot `slot`?
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// assert!(!vm.is_listener_slot(0));
    /// ```
    pub fn is_listener_slot(&self, slot: u32) -> bool {
        self.slots_lock()
            .table
            .get(&slot)
            .is_some_and(|e| matches!(e.owner, SlotOwner::Listener(_)))
    }

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
    /// `slot` that this harvest or an earlier one (a listener's reap) found. Entries of other
    /// slots stay with this `Vm` for their owners. If the reset fails, nothing is handed over
    /// (the pages are still writable) and the bits stay for the next call.
    ///
    /// Only for slots made with [`Vm::set_memslot`]: a slot a listener owns gives
    /// [`Error::SlotOwnedByListener`] (a legacy GET would eat bits the listener never sees; sync
    /// it through the memory system).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// let words = vm.memslot(0).unwrap().bitmap_words();
    /// let mut bitmap = vec![0u64; words];
    /// vm.get_dirty_log(0, &mut bitmap).unwrap();
    /// ```
    pub fn get_dirty_log(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        if self.mode.is_ring() {
            return self.get_dirty_log_ring(slot, bitmap);
        }
        let mut slots = self.slots_lock();
        let needed = Self::check_get(&slots, slot, SlotOwner::Caller, bitmap.len())?;
        // The kernel writes into a guarded scratch buffer (see `get_dirty_log_guarded`), never
        // into the caller's slice: a memslot changed behind this Vm's back gives an error.
        if slots.scratch.as_ref().is_none_or(|s| s.len() < needed) {
            let scratch =
                GuardedWords::new(needed).map_err(|source| Error::GuardedBuffer { source })?;
            slots.scratch = Some(scratch);
        }
        let Some(scratch) = slots.scratch.as_mut() else {
            unreachable!("made just above")
        };
        let words = scratch.tail_mut(needed);
        Self::get_dirty_log_guarded(self.kvm_fd(), slot, words)?;
        bitmap[..needed].copy_from_slice(words);
        Ok(())
    }

    /// Checks a GET of `slot` for `owner` into `len` words; the words the slot needs.
    fn check_get(slots: &SlotState, slot: u32, owner: SlotOwner, len: usize) -> Result<usize> {
        let e = *slots.table.get(&slot).ok_or(Error::UnknownSlot(slot))?;
        if e.owner != owner {
            return Err(Error::SlotOwnedByListener { slot });
        }
        if !e.slot.log_dirty {
            return Err(Error::SlotNotLogging(slot));
        }
        let needed = e.slot.bitmap_words();
        if len < needed {
            return Err(Error::BufferTooSmall { needed, got: len });
        }
        Ok(needed)
    }

    /// [`Vm::get_dirty_log`] in ring mode: harvest, reset, take the slot's pending pages.
    fn get_dirty_log_ring(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        let needed = Self::check_get(&self.slots_lock(), slot, SlotOwner::Caller, bitmap.len())?;
        /// A harvest for the caller's GET: it owns no buffer, every entry goes to the store, and
        /// it takes the store's bits of its slot.
        struct Get {
            slot: u32,
            bits: Option<Vec<u64>>,
        }
        impl RingHarvester for Get {
            fn listener(&self) -> Option<SlotOwner> {
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
        let needed = Self::check_get(&slots, slot, owner, buffer.len())?;
        Self::get_dirty_log_guarded(self.kvm_fd(), slot, buffer.tail_mut(needed))
    }

    /// `KVM_GET_DIRTY_LOG` of `slot` into `words`, which end right before a guard page.
    fn get_dirty_log_guarded(vm: KvmFd<'_>, slot: u32, words: &mut [u64]) -> Result<()> {
        // SAFETY: `vm` is this Vm's VM fd. The kernel writes as many words as the memslot it
        // knows has; `words` are the last words of a `GuardedWords`, so they end right before
        // its PROT_NONE guard page. If the memslot has at most `words.len()` words (what this
        // Vm's table says) the copy stays inside `words`; if it was made larger behind this Vm's
        // back (through another fd), the kernel's ascending copy faults on the guard page and
        // the ioctl fails with EFAULT: no byte past `words` is ever written.
        unsafe { raw::get_dirty_log(vm.fd(), slot, words) }.map_err(|source| {
            if source.errno() == libc::EFAULT {
                Error::SlotChangedBehindVm { slot, source }
            } else {
                Error::Kvm {
                    op: "KVM_GET_DIRTY_LOG",
                    source,
                }
            }
        })
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
    /// Only for slots made with [`Vm::set_memslot`]: a slot a listener owns gives
    /// [`Error::SlotOwnedByListener`]. Its clears must go through its cache
    /// (`MemorySystem::clear_dirty_bitmap`): a clear from a stale copy of the bitmap would wipe
    /// the dirty bit of a later write.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
    /// // Re-arm pages 0..31 of a 64-page slot 0; pages 32..63 are left alone.
    /// vm.clear_dirty_log(0, 0, 64, &[0xffff_ffff]).unwrap();
    /// ```
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        self.clear_dirty_log_as(slot, first_page, num_pages, bitmap, SlotOwner::Caller)
    }

    /// `KVM_CLEAR_DIRTY_LOG` for a range already known valid: one that `clear_dirty_log_as`
    /// checked, or one a listener's cache built for its own logging slot (64-page aligned, inside
    /// the slot). Only the mode is checked and the slot table is not locked (the listener holds
    /// its own slots lock across its cache update and this call).
    pub(crate) fn clear_owned_slot(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        if !self.mode.is_manual() {
            return Err(Error::NotManualMode);
        }
        debug_assert_eq!(first_page % 64, 0);
        raw::clear_dirty_log_on(self.kvm_fd(), slot, first_page, num_pages, bitmap)?;
        Ok(())
    }

    pub(crate) fn clear_dirty_log_as(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
        owner: SlotOwner,
    ) -> Result<()> {
        if !self.mode.is_manual() {
            return Err(Error::NotManualMode);
        }
        let e = self
            .slots_lock()
            .table
            .get(&slot)
            .copied()
            .ok_or(Error::UnknownSlot(slot))?;
        if e.owner != owner {
            return Err(Error::SlotOwnedByListener { slot });
        }
        if !e.slot.log_dirty {
            return Err(Error::SlotNotLogging(slot));
        }
        let end = first_page.saturating_add(u64::from(num_pages));
        let slot_pages = e.slot.pages();
        let bad = |reason| {
            Err(Error::InvalidRange {
                slot,
                first_page,
                end,
                slot_pages,
                reason,
            })
        };
        if num_pages == 0 {
            return bad("empty range");
        }
        if first_page % 64 != 0 {
            return bad("first_page is not a multiple of 64");
        }
        if end > slot_pages {
            return bad("range extends past the slot end");
        }
        if num_pages % 64 != 0 && end != slot_pages {
            return bad(
                "num_pages is not a multiple of 64 and the range does not end at the slot end",
            );
        }
        self.clear_owned_slot(slot, first_page, num_pages, bitmap)
    }
}
