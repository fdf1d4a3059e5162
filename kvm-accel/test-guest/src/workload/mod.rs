// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest workloads: tiny ring-3 x86-64 programs that dirty memory at a controlled rate.
//!
//! A [`Workload`] is described on the host by a [`WorkloadSpec`], loaded into guest RAM with
//! [`Workload::load`] (page tables, GDT, code, parameter block, zeroed counters; see
//! [`crate::layout`] for where), and started on each vCPU at [`Workload::entry`]. Progress
//! is read from the counter block with [`monitor::WorkloadMonitor`].
//!
//! Execution environment of every workload, including user [`WorkloadSpec::Image`]s:
//! 64-bit long mode, ring 3 (CPL 3, IOPL 3), identity-mapped guest RAM with 2 MiB pages,
//! no IDT (an exception shuts the vCPU down), RDI = parameter block address, RSI = the
//! vCPU's counter slot address, RSP = top of a 1 KiB stack below 1 MiB. A 4-byte write to
//! [`DOORBELL_ADDR`] exits to the host (`KVM_EXIT_MMIO`);
//! port I/O faults on PVM.
//!
//! # Example
//!
//! ```
//! # if clearlog_kvm::doctest_kvm_skip("workload/mod.rs") { return; }
//! use clearlog_test_guest::workload::{Workload, WorkloadSpec};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 65 << 20)]).unwrap();
//! let w = Workload::new(WorkloadSpec::Random {
//!     wss_bytes: 64 << 20,
//!     dirty_rate_bytes_per_s: 16 << 20,
//!     seed: 1,
//! });
//! w.load(&mem, 2_000_000).unwrap(); // TSC at 2 GHz
//! let entry = w.entry(0).unwrap();
//! assert_eq!(entry.rip, clearlog_test_guest::layout::CODE_ADDR);
//! ```

pub mod check;
pub mod monitor;
pub mod params;
pub mod programs;

use crate::error::{Error, Result};
use crate::guest_ram::GuestRam;
use crate::layout::*;
use crate::long_mode::{self, EntryPoint};
use crate::PAGE_SIZE;
use params::*;

/// Workload kinds, as stored in the parameter block's `kind` field.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::WorkloadKind;
/// assert_eq!(WorkloadKind::Random as u64, 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum WorkloadKind {
    /// Spin forever.
    Idle = 0,
    /// Uniform random page writes.
    Random = 1,
    /// Sweep adding 1 to the first byte of each page.
    Increment = 2,
    /// A user image.
    Image = 3,
}

/// What the guest should run.
///
/// Rates are in bytes per second over the whole VM (all vCPUs), one 4 KiB page counting as
/// 4096 bytes; 0 means unpaced (as fast as the vCPU goes).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::WorkloadSpec;
/// let s = WorkloadSpec::Increment { wss_bytes: 1 << 20, dirty_rate_bytes_per_s: 0 };
/// assert_eq!(s.wss_bytes(), 1 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadSpec {
    /// Spin on `rdtsc`/`pause`.
    Idle,
    /// Pre-fault the working set, then write 8 bytes into uniformly random pages.
    Random {
        /// Working-set size in bytes (a multiple of 4 KiB).
        wss_bytes: u64,
        /// Target dirty rate; 0 = unpaced.
        dirty_rate_bytes_per_s: u64,
        /// PRNG seed.
        seed: u64,
    },
    /// Sweep the working set adding 1 to the first byte of each page (each vCPU sweeps its own
    /// part, see [`params::split_parts`]).
    Increment {
        /// Working-set size in bytes (a multiple of 4 KiB).
        wss_bytes: u64,
        /// Target dirty rate; 0 = unpaced.
        dirty_rate_bytes_per_s: u64,
    },
    /// A flat binary loaded at `load_gpa`, started at `entry_gpa`.
    Image {
        /// The code and data.
        image: Vec<u8>,
        /// Where to load it: inside `[CODE_ADDR, CODE_END)` or at or above 1 MiB.
        load_gpa: u64,
        /// First instruction, inside the image.
        entry_gpa: u64,
    },
}

impl WorkloadSpec {
    /// Working-set size in bytes (0 for idle and image).
    pub fn wss_bytes(&self) -> u64 {
        match self {
            WorkloadSpec::Random { wss_bytes, .. } | WorkloadSpec::Increment { wss_bytes, .. } => {
                *wss_bytes
            }
            _ => 0,
        }
    }

    /// Target dirty rate in bytes/s (0 = unpaced or not applicable).
    pub fn dirty_rate(&self) -> u64 {
        match self {
            WorkloadSpec::Random {
                dirty_rate_bytes_per_s,
                ..
            }
            | WorkloadSpec::Increment {
                dirty_rate_bytes_per_s,
                ..
            } => *dirty_rate_bytes_per_s,
            _ => 0,
        }
    }

    /// The kind.
    pub fn kind(&self) -> WorkloadKind {
        match self {
            WorkloadSpec::Idle => WorkloadKind::Idle,
            WorkloadSpec::Random { .. } => WorkloadKind::Random,
            WorkloadSpec::Increment { .. } => WorkloadKind::Increment,
            WorkloadSpec::Image { .. } => WorkloadKind::Image,
        }
    }
}

/// TSC ticks between two page writes of one vCPU for a VM-wide `rate_bytes_per_s` spread
/// over `vcpus` vCPUs; 0 when `rate_bytes_per_s` is 0 (unpaced). At least 1 otherwise.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::ticks_per_page;
/// // 2 GHz TSC, 4 MiB/s = 1024 pages/s: one page every 1/1024 s.
/// assert_eq!(ticks_per_page(2_000_000, 4 << 20, 1), 2_000_000_000 / 1024);
/// assert_eq!(ticks_per_page(2_000_000, 0, 1), 0);
/// ```
pub fn ticks_per_page(tsc_khz: u32, rate_bytes_per_s: u64, vcpus: u32) -> u64 {
    if rate_bytes_per_s == 0 {
        return 0;
    }
    let num = u128::from(tsc_khz) * 1000 * u128::from(PAGE_SIZE) * u128::from(vcpus.max(1));
    u64::try_from(num / u128::from(rate_bytes_per_s))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A workload ready to be loaded: spec plus placement.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::{Workload, WorkloadSpec};
/// let w = Workload::new(WorkloadSpec::Idle).with_vcpus(2);
/// assert_eq!(w.vcpus(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    spec: WorkloadSpec,
    wss_start: u64,
    vcpus: u32,
}

impl Workload {
    /// A workload on one vCPU with the working set at [`DEFAULT_WSS_START`].
    pub fn new(spec: WorkloadSpec) -> Self {
        Workload {
            spec,
            wss_start: DEFAULT_WSS_START,
            vcpus: 1,
        }
    }

    /// Places the working set at `gpa` (must be 4 KiB aligned and at or above 1 MiB).
    pub fn with_wss_start(mut self, gpa: u64) -> Self {
        self.wss_start = gpa;
        self
    }

    /// Runs the workload on `n` vCPUs: each runs its own instance over its own part of the
    /// working set ([`params::split_parts`]), with its own counter slot, stack and (`random`)
    /// PRNG state.
    pub fn with_vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// The spec.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// Working-set start.
    pub fn wss_start(&self) -> u64 {
        self.wss_start
    }

    /// Working-set size in pages.
    pub fn wss_pages(&self) -> u64 {
        self.spec.wss_bytes() / PAGE_SIZE
    }

    /// Each vCPU's part of the working set: `(start GPA, pages)`, in vCPU order.
    pub fn parts(&self) -> Vec<(u64, u64)> {
        split_parts(self.wss_start, self.wss_pages(), self.vcpus)
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Checks the spec against a guest RAM ending at `ram_end`: the working set (or a high
    /// image) must lie in RAM the identity map covers, below [`mapped_end`]`(ram_end)` (at most
    /// 127 GiB, whatever the RAM size; see [`crate::layout`]).
    pub fn validate(&self, ram_end: u64) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidWorkload(m));
        let mapped = mapped_end(ram_end);
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!(
                "vcpus must be in 1..={MAX_VCPUS}, got {}",
                self.vcpus
            ));
        }
        if ram_end < INFRA_END {
            return bad(format!("guest RAM must be at least {INFRA_END:#x} bytes"));
        }
        match &self.spec {
            WorkloadSpec::Idle => {}
            WorkloadSpec::Random { wss_bytes, .. } | WorkloadSpec::Increment { wss_bytes, .. } => {
                if *wss_bytes == 0 || wss_bytes % PAGE_SIZE != 0 {
                    return bad(format!(
                        "wss_bytes {wss_bytes} must be a non-zero multiple of 4096"
                    ));
                }
                if wss_bytes / PAGE_SIZE < u64::from(self.vcpus) {
                    return bad(format!(
                        "a working set of {} page(s) cannot give each of {} vCPUs a part of its own",
                        wss_bytes / PAGE_SIZE,
                        self.vcpus
                    ));
                }
                if self.wss_start < INFRA_END || self.wss_start % PAGE_SIZE != 0 {
                    return bad(format!(
                        "wss_start {:#x} must be 4 KiB aligned and at or above {INFRA_END:#x}",
                        self.wss_start
                    ));
                }
                match self.wss_start.checked_add(*wss_bytes) {
                    Some(end) if end <= ram_end && end <= mapped => {}
                    Some(end) if end <= ram_end => {
                        return bad(format!(
                        "working set [{:#x}, +{wss_bytes:#x}) beyond the guest's identity map, which covers RAM below {mapped:#x} ({} GiB) only",
                        self.wss_start,
                        mapped >> 30
                    ))
                    }
                    _ => {
                        return bad(format!(
                        "working set [{:#x}, +{wss_bytes:#x}) beyond guest RAM end {ram_end:#x}",
                        self.wss_start
                    ))
                    }
                }
            }
            WorkloadSpec::Image {
                image,
                load_gpa,
                entry_gpa,
            } => {
                let len = image.len() as u64;
                let end = load_gpa.checked_add(len);
                let in_code = *load_gpa >= CODE_ADDR && end.is_some_and(|e| e <= CODE_END);
                let high = *load_gpa >= INFRA_END && end.is_some_and(|e| e <= mapped);
                if image.is_empty() || !(in_code || high) {
                    return bad(format!(
                        "image [{load_gpa:#x}, +{len:#x}) must lie in [{CODE_ADDR:#x}, {CODE_END:#x}) or in [{INFRA_END:#x}, {mapped:#x}) (RAM the identity map covers)"
                    ));
                }
                if *entry_gpa < *load_gpa || *entry_gpa >= load_gpa + len {
                    return bad(format!("entry {entry_gpa:#x} outside the image"));
                }
            }
        }
        Ok(())
    }

    /// Builds the guest code for this workload at [`CODE_ADDR`] (not for images).
    fn code(&self) -> Result<Vec<u8>> {
        let code = match self.spec.kind() {
            WorkloadKind::Idle => programs::idle(CODE_ADDR)?,
            WorkloadKind::Random => programs::random(CODE_ADDR)?,
            WorkloadKind::Increment => programs::increment(CODE_ADDR)?,
            WorkloadKind::Image => Vec::new(),
        };
        if code.len() as u64 > CODE_END - CODE_ADDR {
            return Err(Error::ProgramTooLarge {
                len: code.len(),
                max: CODE_END - CODE_ADDR,
            });
        }
        Ok(code)
    }

    /// The parameter block for a guest TSC of `tsc_khz`.
    pub fn params(&self, tsc_khz: u32) -> ParamBlock {
        let (seed, kind) = match &self.spec {
            WorkloadSpec::Random { seed, .. } => (*seed, WorkloadKind::Random),
            s => (0, s.kind()),
        };
        ParamBlock {
            kind: kind as u64,
            wss_start: self.wss_start,
            wss_pages: self.wss_pages(),
            ticks_per_page: ticks_per_page(tsc_khz, self.spec.dirty_rate(), self.vcpus),
            seed,
            iteration: 0,
            flags: 0,
            // Keep at most 50 ms of backlog.
            max_lag_ticks: u64::from(tsc_khz) * 50,
            vcpus: u64::from(self.vcpus),
            stall_epoch: 0,
        }
    }

    /// Writes page tables, GDT, TSS, code (or image), parameter block and zeroed counter
    /// slots into guest RAM. `tsc_khz` is the guest TSC frequency (`Vcpu::tsc_khz`), used
    /// to turn the dirty rate into `ticks_per_page`.
    ///
    /// The working set itself is not touched (the `random` workload pre-faults it).
    pub fn load(&self, ram: &(impl GuestRam + ?Sized), tsc_khz: u32) -> Result<()> {
        let ram_end = ram.ram_end();
        self.validate(ram_end)?;
        long_mode::write_tables(ram, ram_end)?;
        match &self.spec {
            WorkloadSpec::Image {
                image, load_gpa, ..
            } => ram.write_at(*load_gpa, image)?,
            _ => ram.write_at(CODE_ADDR, &self.code()?)?,
        }
        ram.write_at(PARAMS_ADDR, &self.params(tsc_khz).to_bytes())?;
        let mut parts = vec![0u8; 16 * MAX_VCPUS as usize];
        for (i, (start, pages)) in self.parts().into_iter().enumerate() {
            parts[16 * i..16 * i + 8].copy_from_slice(&start.to_le_bytes());
            parts[16 * i + 8..16 * i + 16].copy_from_slice(&pages.to_le_bytes());
        }
        ram.write_at(PARAMS_ADDR + P_PARTS, &parts)?;
        ram.write_at(
            COUNTERS_ADDR,
            &vec![0u8; (COUNTER_SLOT_SIZE * u64::from(MAX_VCPUS)) as usize],
        )?;
        Ok(())
    }

    /// Initial registers of vCPU `index`.
    pub fn entry(&self, index: u32) -> Result<EntryPoint> {
        if index >= self.vcpus {
            return Err(Error::InvalidWorkload(format!(
                "vCPU index {index} out of range for {} vCPUs",
                self.vcpus
            )));
        }
        let rip = match &self.spec {
            WorkloadSpec::Image { entry_gpa, .. } => *entry_gpa,
            _ => CODE_ADDR,
        };
        Ok(EntryPoint {
            rip,
            rsp: stack_top(index),
            rdi: PARAMS_ADDR,
            rsi: counter_slot_addr(index),
        })
    }
}

/// Changes the `iteration` value the `random` workload writes into pages (takes effect at
/// the next page write).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::guest_ram::GuestRam;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// clearlog_test_guest::workload::set_iteration(&mem, 3).unwrap();
/// ```
pub fn set_iteration(ram: &(impl GuestRam + ?Sized), value: u64) -> Result<()> {
    ram.store_u64(PARAMS_ADDR + P_ITERATION, value)
}

/// Turns the `random` workload's doorbell sync points on or off
/// ([`params::FLAG_DOORBELL_SYNC`]; used with
/// [`VcpuRunner::pause_at_doorbell`](crate::vcpu::runner::VcpuRunner::pause_at_doorbell)).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::guest_ram::GuestRam;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// clearlog_test_guest::workload::set_doorbell_sync(&mem, true).unwrap();
/// ```
pub fn set_doorbell_sync(ram: &(impl GuestRam + ?Sized), on: bool) -> Result<()> {
    ram.store_u64(
        PARAMS_ADDR + P_FLAGS,
        if on { FLAG_DOORBELL_SYNC } else { 0 },
    )
}

/// Restarts the `random` workload's stall measurement: bumps `stall_epoch`, and each vCPU resets
/// its `max_gap_ticks` at its next page write (so the largest gap is measured from about now;
/// read it with [`monitor::WorkloadMonitor::max_gap_ticks`]). Returns the new epoch.
///
/// # Example
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// assert_eq!(clearlog_test_guest::workload::reset_stall(&mem).unwrap(), 1);
/// ```
pub fn reset_stall(ram: &(impl GuestRam + ?Sized)) -> Result<u64> {
    // Only the host writes this field, so load + store is not racy.
    let epoch = ram.load_u64(PARAMS_ADDR + P_STALL_EPOCH)?.wrapping_add(1);
    ram.store_u64(PARAMS_ADDR + P_STALL_EPOCH, epoch)?;
    Ok(epoch)
}

/// Changes the dirty rate of a running workload (VM-wide bytes/s over `vcpus` vCPUs;
/// 0 = unpaced).
///
/// # Example
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// clearlog_test_guest::workload::set_dirty_rate(&mem, 2_000_000, 8 << 20, 1).unwrap();
/// ```
pub fn set_dirty_rate(
    ram: &(impl GuestRam + ?Sized),
    tsc_khz: u32,
    rate_bytes_per_s: u64,
    vcpus: u32,
) -> Result<()> {
    ram.store_u64(
        PARAMS_ADDR + P_TICKS_PER_PAGE,
        ticks_per_page(tsc_khz, rate_bytes_per_s, vcpus),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn validation() {
        let mb = 1u64 << 20;
        let ok = Workload::new(WorkloadSpec::Random {
            wss_bytes: 4 * mb,
            dirty_rate_bytes_per_s: 0,
            seed: 0,
        });
        ok.validate(5 * mb).unwrap();
        assert!(ok.validate(5 * mb - 1).is_err());
        assert!(ok
            .clone()
            .with_wss_start(0x8_0000)
            .validate(8 * mb)
            .is_err());
        assert!(ok.clone().with_vcpus(0).validate(8 * mb).is_err());
        assert!(ok.with_vcpus(MAX_VCPUS + 1).validate(8 * mb).is_err());
        let unaligned = Workload::new(WorkloadSpec::Increment {
            wss_bytes: 4097,
            dirty_rate_bytes_per_s: 0,
        });
        assert!(unaligned.validate(8 * mb).is_err());
        let img = |load_gpa, entry_gpa| {
            Workload::new(WorkloadSpec::Image {
                image: vec![0x90; 16],
                load_gpa,
                entry_gpa,
            })
            .validate(2 * mb)
        };
        img(CODE_ADDR, CODE_ADDR).unwrap();
        img(INFRA_END, INFRA_END + 15).unwrap();
        assert!(img(INFRA_END, INFRA_END + 16).is_err());
        assert!(img(PARAMS_ADDR, PARAMS_ADDR).is_err());
        assert!(img(CODE_END - 8, CODE_END - 8).is_err());
        assert!(img(2 * mb - 8, 2 * mb - 8).is_err());
        // Huge guests: the working set must lie in the identity-mapped low RAM.
        let huge = 256u64 << 30;
        let wss = |bytes| {
            Workload::new(WorkloadSpec::Random {
                wss_bytes: bytes,
                dirty_rate_bytes_per_s: 0,
                seed: 0,
            })
        };
        wss(64 * mb).validate(huge).unwrap();
        wss(IDENTITY_MAP_LIMIT - INFRA_END).validate(huge).unwrap();
        let e = wss(IDENTITY_MAP_LIMIT).validate(huge).unwrap_err();
        assert!(e.to_string().contains("identity map"), "{e}");
        assert!(wss(64 * mb)
            .with_wss_start(200 << 30)
            .validate(huge)
            .is_err());
    }

    #[test]
    fn load_writes_params_and_code() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 3 << 20)]).unwrap();
        let w = Workload::new(WorkloadSpec::Random {
            wss_bytes: 1 << 20,
            dirty_rate_bytes_per_s: 1 << 20,
            seed: 9,
        })
        .with_vcpus(2);
        mem.store_u64(COUNTERS_ADDR, 77).unwrap();
        w.load(&mem, 1_000_000).unwrap();
        assert_eq!(mem.load_u64(PARAMS_ADDR + P_MAGIC).unwrap(), PARAMS_MAGIC);
        assert_eq!(mem.load_u64(PARAMS_ADDR + P_WSS_PAGES).unwrap(), 256);
        assert_eq!(mem.load_u64(PARAMS_ADDR + P_SEED).unwrap(), 9);
        // 1 GHz, 256 pages/s over 2 vCPUs: 128 pages/s each.
        assert_eq!(
            mem.load_u64(PARAMS_ADDR + P_TICKS_PER_PAGE).unwrap(),
            1_000_000_000 / 128
        );
        assert_eq!(mem.load_u64(COUNTERS_ADDR).unwrap(), 0);
        let code = programs::random(CODE_ADDR).unwrap();
        let mut got = vec![0u8; code.len()];
        mem.read_at(CODE_ADDR, &mut got).unwrap();
        assert_eq!(got, code);
        let e1 = w.entry(1).unwrap();
        assert_eq!(e1.rsi, counter_slot_addr(1));
        assert_eq!(e1.rsp, stack_top(1));
        w.entry(2).unwrap_err();
        // Each vCPU's part, in the parts table.
        for (i, (start, pages)) in [(INFRA_END, 128u64), (INFRA_END + (128 << 12), 128)]
            .into_iter()
            .enumerate()
        {
            let off = PARAMS_ADDR + part_entry_offset(i as u32);
            assert_eq!(mem.load_u64(off).unwrap(), start);
            assert_eq!(mem.load_u64(off + 8).unwrap(), pages);
        }
    }

    #[test]
    fn parts_cover_the_working_set() {
        for (pages, n) in [(1u64, 1u32), (7, 3), (256, 2), (1000, 64), (64, 64)] {
            let parts = split_parts(INFRA_END, pages, n);
            assert_eq!(parts.len(), n as usize);
            assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), pages);
            assert!(parts.iter().all(|p| p.1 > 0));
            for w in parts.windows(2) {
                assert_eq!(w[0].0 + w[0].1 * PAGE_SIZE, w[1].0);
                assert!(w[0].1 >= w[1].1 && w[0].1 - w[1].1 <= 1);
            }
        }
        let few = Workload::new(WorkloadSpec::Random {
            wss_bytes: 2 * PAGE_SIZE,
            dirty_rate_bytes_per_s: 0,
            seed: 0,
        })
        .with_vcpus(3);
        assert!(few
            .validate(4 << 20)
            .unwrap_err()
            .to_string()
            .contains("part"));
    }

    #[test]
    fn ticks_rounding() {
        assert_eq!(ticks_per_page(1, 1 << 40, 1), 1);
        assert_eq!(
            ticks_per_page(3_000_000, 64 << 20, 1),
            3_000_000_000 / 16384
        );
        assert_eq!(
            ticks_per_page(3_000_000, 64 << 20, 4),
            4 * 3_000_000_000 / 16384
        );
    }
}
