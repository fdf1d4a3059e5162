// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Loss-free dirty-page tracking on KVM with `KVM_CLEAR_DIRTY_LOG`, on a VM this crate creates or
//! on the VM a VMM already has.
//!
//! - [`KvmMemoryListener`]: memslots that follow a `clearlog-memory` map, with `log_sync`/`log_clear`
//!   through a per-slot [`SlotDirtyCache`] under one slots lock, so no dirty bit is ever cleared in
//!   KVM unless KVM reported it since the last sync. Its memslot ids come from a range the caller
//!   may choose ([`KvmMemoryListener::with_slot_ids`]), next to the VMM's own slots.
//! - [`VmmSlotCache`]: the same cache over memslots the VMM creates and keeps itself, for a VMM
//!   with its own guest memory and memslots and no `clearlog-memory` (cloud-hypervisor's shape).
//! - [`Vm`]: a VM fd ([`Vm::new`] makes one; [`Vm::from_fd`] takes the VMM's as it is: anything
//!   [`AsKvmFd`], such as kvm-ioctls' `VmFd`) with its [`KvmDirtyLogMode`], probed [`KvmCaps`]
//!   and checked memslot and dirty-log calls, which refuse slots a cache owns
//!   ([`Error::SlotOwnedByCache`]). Its GETs write into buffers that end right before a guard
//!   page, so a memslot re-made larger behind its back gives [`Error::SlotChangedBehindVm`]
//!   instead of a write past the buffer; a listener probes each memslot id before it creates a
//!   slot and refuses one the VMM made itself ([`Error::SlotIdTaken`]). Fds from the caller are
//!   checked to be KVM's (VM or vCPU) before any ioctl or mapping.
//! - The dirty ring ([`enable_dirty_ring`], [`Vm::register_vcpu_ring`]): harvest and
//!   `KVM_RESET_DIRTY_RINGS` under the listener's slots lock; entries of slots another owner logs
//!   are kept by the [`Vm`] for that owner; a failed or partial reset is owed and retried, and no
//!   bit folds before one confirms it; a ring found completely full makes every logging slot dirty
//!   (docs/design.md, sections 2a and 2b).
//! - [`enable_manual_protect`]: manual dirty-log protection on any VM fd.
//! - [`raw`]: the `KVM_GET_DIRTY_LOG` (into a caller buffer) and `KVM_CLEAR_DIRTY_LOG` ioctls on a
//!   [`BorrowedFd`](std::os::fd::BorrowedFd), for slots the caller manages itself.
//!
//! Nothing here is x86-specific: the crate builds for aarch64 too. The ring-3 test guest (vCPUs,
//! workloads) is the separate `clearlog-test-guest` crate.
//!
//! # Example
//!
//! ```
//! # if clearlog_kvm::doctest_kvm_skip("lib.rs") { return; }
//! use std::sync::Arc;
//! use clearlog_kvm::{KvmMemoryListener, Vm, VmConfig};
//! use clearlog_memory::MemorySystem;
//!
//! let vm = Arc::new(Vm::new(VmConfig::default()).unwrap()); // manual protect where offered
//! let memory = MemorySystem::new();
//! let ram = memory.add_ram("ram0", 0, 256 << 20).unwrap();
//! memory.register_listener(Arc::new(KvmMemoryListener::new(vm))).unwrap(); // memslot created
//! memory.log_global_start().unwrap();       // dirty logging on (Migration client)
//! memory.log_sync_all().unwrap();           // KVM_GET_DIRTY_LOG into the slot caches
//! memory.clear_dirty_bitmap(ram, 0, 1 << 20).unwrap(); // re-arm the first MiB: only bits KVM reported
//! ```
#![deny(unreachable_pub)]

mod caps;
mod device;
mod dirty_cache;
mod dirty_log;
mod error;
mod fd;
mod guarded;
mod memory_listener;
mod mode;
pub mod raw;
mod ring;
mod ring_registry;
mod skip;
mod slots;
mod stats;
mod vm;
mod vmm_slot_cache;

pub use caps::{enable_manual_protect, KvmCaps};
pub use device::KVM_DEVICE;
pub use dirty_cache::{CacheError, ClearRange, ClearRequest, SlotDirtyCache};
pub use error::{Error, Result};
pub use fd::AsKvmFd;
pub use memory_listener::{KvmMemoryListener, RingKick, RingReaper, RING_REAP_INTERVAL};
pub use mode::{default_dirty_log_mode, KvmDirtyLogMode, INITIALLY_SET, MANUAL_PROTECT_ENABLE};
pub use raw::ClearDirtyLogError;
pub use ring::{enable_dirty_ring, is_pvm_host, RingRange, VcpuRingStats, RING_MIN_BYTES};
#[doc(hidden)]
pub use skip::doctest_kvm_skip;
pub use slots::MemSlot;
pub use stats::DirtyLogStats;
pub use vm::{Vm, VmConfig};
pub use vmm_slot_cache::VmmSlotCache;

/// The page size of dirty logging: one dirty bit per 4 KiB page (x86-64, and arm64 kernels with
/// 4 KiB pages).
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_kvm::PAGE_SIZE, 4096);
/// ```
pub const PAGE_SIZE: u64 = 4096;

/// The examples of `README.md`, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
