// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A KVM virtual machine with a chosen dirty-log mode and raw memslot operations.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::caps::{DirtyLogMode, KvmCaps, INITIALLY_SET, MANUAL_PROTECT_ENABLE};
use crate::error::{Error, Result};
use crate::{clear_log, get_log, PAGE_SIZE};

/// The default KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Which dirty-log mode [`Vm::new`] should set up.
///
/// # Example
///
/// ```
/// use clearlog_kvm::vm::DirtyLogChoice;
/// assert_eq!(DirtyLogChoice::default(), DirtyLogChoice::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyLogChoice {
    /// The best the kernel offers ([`crate::caps::default_dirty_log_mode`]); falls back to
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
}

/// Configuration of a [`Vm`].
///
/// # Example
///
/// ```
/// use clearlog_kvm::vm::{DirtyLogChoice, VmConfig};
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

/// A memslot as registered with [`Vm::set_memslot`].
///
/// # Example
///
/// ```
/// use clearlog_kvm::vm::MemSlot;
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
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Number of `u64` words of the slot's dirty bitmap.
    pub fn bitmap_words(&self) -> usize {
        usize::try_from(self.pages().div_ceil(64)).unwrap_or(usize::MAX)
    }
}

/// A KVM VM: the system fd, the VM fd, the probed capabilities, the dirty-log mode and
/// a table of the memslots registered through it.
///
/// All methods take `&self`; the slot table has its own lock so a `Vm` can be shared
/// between threads (e.g. in an `Arc`). Memslot changes and dirty-log calls for the same
/// slot must still be ordered by the caller (the memory listener holds one slots lock).
///
/// # Example
///
/// ```no_run
/// use clearlog_kvm::vm::{Vm, VmConfig};
///
/// let vm = Vm::new(VmConfig::default()).unwrap();
/// println!("dirty log mode: {}", vm.dirty_log_mode());
/// ```
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    caps: KvmCaps,
    mode: DirtyLogMode,
    slots: Mutex<BTreeMap<u32, MemSlot>>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("caps", &self.caps)
            .field("mode", &self.mode)
            .field("slots", &*self.slots_lock())
            .finish_non_exhaustive()
    }
}

/// Opens a KVM device node with an error that names the device and the fix.
///
/// # Example
///
/// ```no_run
/// let kvm = clearlog_kvm::vm::open_kvm("/dev/kvm".as_ref()).unwrap();
/// ```
pub fn open_kvm(path: &Path) -> Result<Kvm> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::KvmOpen {
            path: path.to_owned(),
            source: vmm_sys_util::errno::Error::new(libc::EINVAL),
        }
    })?;
    Kvm::new_with_path(c_path).map_err(|source| match source.errno() {
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
    })
}

impl Vm {
    /// Opens KVM, creates a VM and sets up the dirty-log mode.
    ///
    /// Manual protection is enabled here, before any memslot exists, so it applies to
    /// every slot that later gets `KVM_MEM_LOG_DIRTY_PAGES`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use clearlog_kvm::vm::{DirtyLogChoice, Vm, VmConfig};
    ///
    /// let vm = Vm::new(VmConfig {
    ///     dirty_log: DirtyLogChoice::Manual { initially_set: false },
    ///     ..Default::default()
    /// })
    /// .unwrap();
    /// assert!(vm.dirty_log_mode().is_manual());
    /// ```
    pub fn new(config: VmConfig) -> Result<Self> {
        let kvm = open_kvm(&config.kvm_path)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(Error::ApiVersion(api));
        }
        let caps = KvmCaps::probe(&kvm);
        let fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let offered = caps.manual_protect_flags;
        let mode = match config.dirty_log {
            DirtyLogChoice::Legacy => DirtyLogMode::Legacy,
            DirtyLogChoice::Auto => {
                let wanted = caps.default_dirty_log_mode();
                match enable_manual(&fd, wanted) {
                    Ok(()) => wanted,
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            "enabling manual dirty-log protection failed: using legacy dirty logging"
                        );
                        DirtyLogMode::Legacy
                    }
                }
            }
            DirtyLogChoice::Manual { initially_set } => {
                let wanted = DirtyLogMode::Manual { initially_set };
                let requested = wanted.enable_flags();
                if offered & requested != requested {
                    return Err(Error::ManualProtectUnsupported { requested, offered });
                }
                enable_manual(&fd, wanted)?;
                wanted
            }
        };
        tracing::debug!(%caps, %mode, "created KVM VM");
        Ok(Vm {
            kvm,
            fd,
            caps,
            mode,
            slots: Mutex::new(BTreeMap::new()),
        })
    }

    /// The system (`/dev/kvm`) handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The capabilities probed at creation.
    pub fn caps(&self) -> &KvmCaps {
        &self.caps
    }

    /// The dirty-log mode in effect.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.mode
    }

    fn slots_lock(&self) -> MutexGuard<'_, BTreeMap<u32, MemSlot>> {
        // A panic while holding this lock cannot leave the map inconsistent: every
        // update is a single insert or remove.
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

    /// Creates or updates memslot `slot` (address-space id in bits 16-31).
    ///
    /// Calling it again for an existing slot with the same addresses and size toggles
    /// dirty logging (`log_dirty`). With manual protection and `INITIALLY_SET`, turning
    /// logging on makes every page of the slot read as dirty.
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
    /// use clearlog_kvm::vm::{Vm, VmConfig};
    ///
    /// let vm = Vm::new(VmConfig::default()).unwrap();
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    /// // SAFETY: `mem` outlives `vm` in this example.
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
        self.check_slot_id(slot)?;
        let bad = |reason| Err(Error::InvalidMemslot { slot, reason });
        if size == 0 {
            return bad("size is 0 (use remove_memslot)");
        }
        if size % PAGE_SIZE != 0 || guest_phys % PAGE_SIZE != 0 || host_addr % PAGE_SIZE != 0 {
            return bad("size and addresses must be multiples of 4 KiB");
        }
        if guest_phys.checked_add(size).is_none() || host_addr.checked_add(size).is_none() {
            return bad("range overflows");
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: guest_phys,
            memory_size: size,
            userspace_addr: host_addr,
        };
        let mut slots = self.slots_lock();
        // SAFETY: the caller guarantees the host range stays mapped while the slot exists.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        slots.insert(
            slot,
            MemSlot {
                guest_phys,
                size,
                host_addr,
                log_dirty,
            },
        );
        Ok(())
    }

    /// Deletes memslot `slot`. Sync its dirty log first if you need it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::vm::Vm::new(Default::default()).unwrap();
    /// vm.remove_memslot(0).unwrap();
    /// ```
    pub fn remove_memslot(&self, slot: u32) -> Result<()> {
        let mut slots = self.slots_lock();
        let Some(s) = slots.get(&slot).copied() else {
            return Err(Error::UnknownSlot(slot));
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: s.guest_phys,
            memory_size: 0,
            userspace_addr: s.host_addr,
        };
        // SAFETY: size 0 deletes the slot; the kernel stops using the host mapping.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        slots.remove(&slot);
        Ok(())
    }

    /// The registered memslot `slot`, if any.
    pub fn memslot(&self, slot: u32) -> Option<MemSlot> {
        self.slots_lock().get(&slot).copied()
    }

    /// All registered memslots, by slot id.
    pub fn memslots(&self) -> Vec<(u32, MemSlot)> {
        self.slots_lock().iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn logging_slot(&self, slot: u32) -> Result<MemSlot> {
        let s = self.memslot(slot).ok_or(Error::UnknownSlot(slot))?;
        if !s.log_dirty {
            return Err(Error::SlotNotLogging(slot));
        }
        Ok(s)
    }

    /// Copies the dirty bitmap of `slot` into `bitmap` (`KVM_GET_DIRTY_LOG`), without
    /// allocating.
    ///
    /// `bitmap` must hold at least [`MemSlot::bitmap_words`] words; only that many are
    /// written. In legacy mode the kernel also clears its bitmap and write-protects the
    /// slot; in manual mode it only copies (the same bits come back until cleared).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::vm::Vm::new(Default::default()).unwrap();
    /// let words = vm.memslot(0).unwrap().bitmap_words();
    /// let mut bitmap = vec![0u64; words];
    /// vm.get_dirty_log(0, &mut bitmap).unwrap();
    /// ```
    pub fn get_dirty_log(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        // Held across the ioctl: a concurrent remove + re-add of the slot with a larger size
        // would otherwise make the kernel write past the checked buffer.
        let slots = self.slots_lock();
        let s = *slots.get(&slot).ok_or(Error::UnknownSlot(slot))?;
        if !s.log_dirty {
            return Err(Error::SlotNotLogging(slot));
        }
        let needed = s.bitmap_words();
        if bitmap.len() < needed {
            return Err(Error::BufferTooSmall {
                needed,
                got: bitmap.len(),
            });
        }
        // SAFETY: the kernel's slot has `s.pages()` pages: we registered it through this Vm,
        // the only way to change it, and hold the slot-table lock that every change takes, so
        // the kernel writes `needed` words at most.
        let result = unsafe { get_log::get_dirty_log(&self.fd, slot, &mut bitmap[..needed]) }
            .map_err(Error::kvm("KVM_GET_DIRTY_LOG"));
        drop(slots);
        result
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
    /// # Example
    ///
    /// ```no_run
    /// # let vm = clearlog_kvm::vm::Vm::new(Default::default()).unwrap();
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
        if !self.mode.is_manual() {
            return Err(Error::NotManualMode);
        }
        let s = self.logging_slot(slot)?;
        let end = first_page.saturating_add(u64::from(num_pages));
        let slot_pages = s.pages();
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
        clear_log::clear_dirty_log(&self.fd, slot, first_page, num_pages, bitmap)?;
        Ok(())
    }
}

fn enable_manual(fd: &VmFd, mode: DirtyLogMode) -> Result<()> {
    let flags = mode.enable_flags() & (MANUAL_PROTECT_ENABLE | INITIALLY_SET);
    if flags == 0 {
        return Ok(());
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = flags;
    fd.enable_cap(&cap).map_err(Error::kvm(
        "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
    ))
}
