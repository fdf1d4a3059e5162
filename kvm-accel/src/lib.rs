// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Low-level KVM support for loss-free dirty-page tracking with `KVM_CLEAR_DIRTY_LOG`.
//!
//! - [`memory_listener`]: [`KvmMemoryListener`], memslots that follow a `clearlog-memory` map, with
//!   `log_sync`/`log_clear` through a per-slot [`SlotDirtyCache`] ([`dirty_cache`]) under one slots
//!   lock, so no dirty bit is ever cleared in KVM unless KVM reported it since the last sync;
//! - [`guest`]: a whole test guest (memory, VM, listener, vCPUs, workload) in one value;
//! - [`caps`]: what the kernel offers, and the default [`caps::DirtyLogMode`];
//! - [`clear_log`]: a safe, checked wrapper of `KVM_CLEAR_DIRTY_LOG`;
//! - [`get_log`]: `KVM_GET_DIRTY_LOG` into a caller buffer;
//! - [`vm`]: a [`vm::Vm`] with its dirty-log mode set up and raw memslot operations;
//! - [`vcpu`]: vCPUs started directly in 64-bit ring 3, their state for migration and a
//!   runner thread with pause/resume/kick;
//! - [`layout`], [`long_mode`], [`guest_ram`]: the guest environment;
//! - [`workload`]: guest programs that dirty memory at a controlled rate, and a monitor.
//!
//! # Example
//!
//! ```no_run
//! use clearlog_kvm::vcpu::{runner::VcpuRunner, Vcpu};
//! use clearlog_kvm::vm::{Vm, VmConfig};
//! use clearlog_kvm::workload::{monitor::WorkloadMonitor, Workload, WorkloadSpec};
//! use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
//!
//! let vm = Vm::new(VmConfig::default()).unwrap();
//! let size = 65usize << 20;
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
//! let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
//! // SAFETY: `mem` outlives the VM's use of it in this example.
//! unsafe { vm.set_memslot(0, 0, size as u64, host, true).unwrap() };
//! let vcpu = Vcpu::new(&vm, 0).unwrap();
//! let w = Workload::new(WorkloadSpec::Random {
//!     wss_bytes: 64 << 20,
//!     dirty_rate_bytes_per_s: 32 << 20,
//!     seed: 1,
//! });
//! w.load(&mem, vcpu.tsc_khz().unwrap()).unwrap();
//! vcpu.setup_ring3(&w.entry(0).unwrap()).unwrap();
//! let runner = VcpuRunner::spawn(vcpu).unwrap();
//! WorkloadMonitor::new(&mem, 1).wait_ready(std::time::Duration::from_secs(5)).unwrap();
//! ```
#![deny(missing_docs)]
#![cfg(target_arch = "x86_64")]

pub mod caps;
pub mod clear_log;
pub mod dirty_cache;
mod error;
pub mod get_log;
pub mod guest;
pub mod guest_ram;
pub mod layout;
pub mod long_mode;
pub mod memory_listener;
pub mod vcpu;
pub mod vm;
pub mod workload;

pub use dirty_cache::SlotDirtyCache;
pub use error::{Error, Result};
pub use memory_listener::{DirtyLogStats, KvmMemoryListener};

/// The page size of dirty logging (4 KiB on x86-64).
pub const PAGE_SIZE: u64 = 4096;
