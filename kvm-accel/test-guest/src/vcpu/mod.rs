// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! vCPUs: creation, ring-3 long-mode setup, state save/restore and a runner thread.

pub mod runner;
pub mod state;

use std::fmt;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_CAP_XSAVE2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;

use clearlog_kvm::{KvmCaps, Vm};
use kvm_ioctls::{Kvm, VmFd};

use crate::error::{Error, Result};
use crate::long_mode::{self, EntryPoint};
pub use state::VcpuState;

/// MSRs saved and restored with the vCPU state, when the kernel lists them
/// (`KVM_GET_MSR_INDEX_LIST`). EFER travels in `sregs`. `MSR_IA32_TSC` (0x10) is restored
/// last so the guest TSC continues from the saved value.
pub const MIGRATED_MSRS: &[u32] = &[
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    MSR_IA32_TSC,
];

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;

/// A vCPU of a [`Vm`], with CPUID set from `KVM_GET_SUPPORTED_CPUID`.
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("Vcpu") { return; }
/// use clearlog_kvm::Vm;
/// use clearlog_test_guest::{vcpu::Vcpu, workload::{Workload, WorkloadSpec}};
///
/// let vm = Vm::new(Default::default()).unwrap();
/// let vcpu = Vcpu::new(&vm, 0).unwrap();
/// let w = Workload::new(WorkloadSpec::Idle);
/// vcpu.setup_ring3(&w.entry(0).unwrap()).unwrap();
/// ```
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    msrs: Vec<u32>,
    xsave: bool,
    xcrs: bool,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .field("msrs", &self.msrs)
            .field("xsave", &self.xsave)
            .field("xcrs", &self.xcrs)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Creates vCPU `index` in `vm` and sets its CPUID to what KVM supports. `vm` must have been
    /// made by [`Vm::new`] ([`Error::NoKvmHandles`] otherwise: use [`Vcpu::from_fds`]). On a ring
    /// VM the vCPU's dirty ring is registered with `vm` ([`Vm::register_vcpu_ring`]).
    pub fn new(vm: &Vm, index: u32) -> Result<Self> {
        let (Some(kvm), Some(fd)) = (vm.kvm(), vm.vm_fd()) else {
            return Err(Error::NoKvmHandles);
        };
        let vcpu = Self::from_fds(kvm, fd, vm.caps(), index)?;
        if vm.dirty_log_mode().is_ring() {
            vm.register_vcpu_ring(index, vcpu.fd())?;
        }
        Ok(vcpu)
    }

    /// Creates vCPU `index` through kvm-ioctls handles the caller has (a VMM's VM, wrapped in a
    /// [`Vm`] with [`Vm::from_fd`]); `caps` are that VM's ([`Vm::caps`]).
    pub fn from_fds(kvm: &Kvm, vm: &VmFd, caps: &KvmCaps, index: u32) -> Result<Self> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC id.
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
                0xb | 0x1f => e.edx = index,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        let listed = kvm
            .get_msr_index_list()
            .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let listed = listed.as_slice();
        let msrs = MIGRATED_MSRS
            .iter()
            .copied()
            .filter(|m| listed.contains(m))
            .collect();
        // KVM_SET_XSAVE may read more than 4 KiB when KVM_CAP_XSAVE2 says so; we only use the
        // 4 KiB struct, so only when the size fits.
        let xsave2 = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_XSAVE2));
        let xsave = caps.xsave && xsave2 <= 4096;
        if caps.xsave && !xsave {
            tracing::warn!(
                xsave2,
                "xsave area larger than 4 KiB: migrating FPU state via KVM_GET_FPU only"
            );
        }
        Ok(Vcpu {
            index,
            fd,
            msrs,
            xsave,
            xcrs: caps.xcrs,
        })
    }

    /// The vCPU index (its APIC id).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU fd, mutably (for `run`).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// The MSRs saved with the state.
    pub fn migrated_msrs(&self) -> &[u32] {
        &self.msrs
    }

    /// The guest TSC frequency (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Result<u32> {
        self.fd.get_tsc_khz().map_err(Error::kvm("KVM_GET_TSC_KHZ"))
    }

    /// Puts the vCPU in 64-bit ring 3 at `entry` (see [`crate::long_mode`]); the page
    /// tables and GDT must already be in guest RAM ([`crate::long_mode::write_tables`],
    /// done by `Workload::load`).
    pub fn setup_ring3(&self, entry: &EntryPoint) -> Result<()> {
        let sregs = self.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&long_mode::ring3_sregs(sregs))
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&long_mode::ring3_regs(entry))
            .map_err(Error::kvm("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Reads the vCPU state. The vCPU must not be running (see
    /// [`runner::VcpuRunner::with_vcpu`]).
    pub fn save_state(&self) -> Result<VcpuState> {
        let regs = self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let fpu = self.fd.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?;
        let xcrs = if self.xcrs {
            Some(self.fd.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let xsave = if self.xsave {
            Some(
                self.fd
                    .get_xsave()
                    .map_err(Error::kvm("KVM_GET_XSAVE"))?
                    .region,
            )
        } else {
            None
        };
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(Error::MsrList)?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(Error::kvm("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave: xsave.map(Box::new),
            xcrs,
            msrs,
        })
    }

    /// Loads a saved state into this vCPU (of the same or another VM). CPUID is already
    /// set by [`Vcpu::new`]. Order: sregs, regs, xcrs, fpu, xsave, MSRs, TSC last.
    pub fn restore_state(&self, s: &VcpuState) -> Result<()> {
        self.fd
            .set_sregs(&s.sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&s.regs)
            .map_err(Error::kvm("KVM_SET_REGS"))?;
        if let (Some(xcrs), true) = (&s.xcrs, self.xcrs) {
            self.fd.set_xcrs(xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
        }
        self.fd.set_fpu(&s.fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
        if let (Some(region), true) = (&s.xsave, self.xsave) {
            let x = kvm_bindings::kvm_xsave {
                region: **region,
                ..Default::default()
            };
            // SAFETY: `self.xsave` is only true when KVM_CAP_XSAVE2 reports at most 4096 bytes,
            // so the kernel reads no more than the 4 KiB `kvm_xsave` we pass.
            unsafe { self.fd.set_xsave(&x) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
        }
        let mut entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .filter(|(i, _)| *i != MSR_IA32_TSC)
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        if let Some(&(index, data)) = s.msrs.iter().find(|(i, _)| *i == MSR_IA32_TSC) {
            entries.push(kvm_msr_entry {
                index,
                data,
                ..Default::default()
            });
        }
        if !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries).map_err(Error::MsrList)?;
            let n = self
                .fd
                .set_msrs(&msrs)
                .map_err(Error::kvm("KVM_SET_MSRS"))?;
            if n != entries.len() {
                return Err(Error::InvalidState(format!(
                    "KVM_SET_MSRS stopped at MSR {:#x} ({n} of {} set)",
                    entries[n].index,
                    entries.len()
                )));
            }
        }
        Ok(())
    }
}
