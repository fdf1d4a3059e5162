// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A ring-3 KVM test guest for `clearlog-kvm`: what its tests, benchmarks, examples and the `vmm`
//! CLI run. Not needed to use `clearlog-kvm` in a VMM.
//!
//! - [`Guest`]: a whole test guest (memory system, [`clearlog_kvm::Vm`], listener, vCPUs,
//!   workload) in one value;
//! - [`vcpu`]: vCPUs started directly in 64-bit ring 3 (no guest ring-0 code: on PVM hosts ring 0
//!   is emulated, ring 3 runs natively), their state for migration and a runner thread with
//!   pause/resume/kick;
//! - [`layout`], [`long_mode`], [`guest_ram`]: the guest environment;
//! - [`lazy_pages`]: memory whose pages a userfaultfd handler places on first touch (lazy
//!   restore, postcopy), for tests;
//! - [`workload`]: guest programs (assembled with iced-x86) that dirty memory at a controlled rate,
//!   a progress monitor and the `increment` consistency check;
//! - [`boot_image`]: the `random` workload as a Multiboot kernel for QEMU's `-kernel`, to compare
//!   with QEMU on the same guest program.
//!
//! x86-64 only: on other architectures the crate is empty.
//!
//! # Example
//!
//! ```
//! # if clearlog_kvm::doctest_kvm_skip("lib.rs") { return; }
//! use clearlog_kvm::{Vm, VmConfig};
//! use clearlog_test_guest::vcpu::{runner::VcpuRunner, Vcpu};
//! use clearlog_test_guest::workload::{monitor::WorkloadMonitor, Workload, WorkloadSpec};
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
#![deny(unreachable_pub)]
#![cfg(target_arch = "x86_64")]

pub mod boot_image;
mod error;
mod guest;
pub mod guest_ram;
pub mod layout;
pub mod lazy_pages;
pub mod long_mode;
pub mod vcpu;
pub mod workload;

pub use error::{Error, Result};
pub use guest::{Guest, GuestConfig, RAM_BLOCK_NAME, VCPU_BLOB_PREFIX};

/// The guest page size (4 KiB), the same as [`clearlog_kvm::PAGE_SIZE`].
pub const PAGE_SIZE: u64 = clearlog_kvm::PAGE_SIZE;
