// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host/guest ABI of the workloads: parameter block and counter slots.
//!
//! Parameter block at [`PARAMS_ADDR`](crate::layout::PARAMS_ADDR), little-endian `u64`
//! fields at these offsets (written by the host, read by the guest):
//!
//! | offset | field            | meaning                                                   |
//! |--------|------------------|-----------------------------------------------------------|
//! | 0      | `magic`          | [`PARAMS_MAGIC`]                                          |
//! | 8      | `kind`           | [`WorkloadKind`](super::WorkloadKind) as `u64`            |
//! | 16     | `wss_start`      | guest physical start of the working set                   |
//! | 24     | `wss_pages`      | working-set size in 4 KiB pages                           |
//! | 32     | `ticks_per_page` | TSC ticks between page writes, per vCPU; 0 = unpaced; read at every write, so the host may change it at runtime |
//! | 40     | `seed`           | PRNG seed (`random`)                                      |
//! | 48     | `iteration`      | value the `random` workload stores at offset 0 of each page it writes; the host may change it at runtime |
//! | 56     | `flags`          | [`FLAG_DOORBELL_SYNC`]: the `random` workload rings the doorbell after every page write (read at every write) |
//! | 64     | `max_lag_ticks`  | if pacing falls further behind than this, the backlog is dropped (no burst after a pause) |
//! | 72     | `vcpus`          | number of vCPUs running the workload                      |
//! | 80     | `stall_epoch`    | the host bumps it to restart every vCPU's `max_gap_ticks` (`random`; read at every write) |
//! | 256    | `parts`          | [`MAX_VCPUS`](crate::layout::MAX_VCPUS) x (`start`, `pages`): vCPU `i`'s part of the working set, at `256 + 16 * i` |
//!
//! Each vCPU runs its own instance of the workload over its own part: the working set split into
//! `vcpus` contiguous parts, in vCPU order, the first `wss_pages % vcpus` parts one page longer
//! ([`split_parts`]).
//!
//! Counter slot of vCPU `i` at [`counter_slot_addr(i)`](crate::layout::counter_slot_addr),
//! `u64` fields written by the guest only:
//!
//! | offset | field           | meaning                                                    |
//! |--------|-----------------|------------------------------------------------------------|
//! | 0      | `pages_written` | page writes since `ready` (not counting the pre-fault)     |
//! | 8      | `sweeps`        | completed sweeps of the working set (`increment`)          |
//! | 16     | `ready`         | 1 once the pre-fault is done and the main loop starts      |
//! | 24     | `max_gap_ticks` | `random`: largest TSC gap between two consecutive page writes of this vCPU since the last `stall_epoch` change (or since `ready`) |
//! | 32     | `last_write_tsc`| `random`: TSC at the last page write (with `pages_written`, the achieved write rate) |
//! | 40     | `stall_epoch`   | `random`: the `stall_epoch` this vCPU last applied          |

/// Value of the `magic` field ("CLRLOGWL").
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"CLRLOGWL");
/// Offset of `magic`.
pub const P_MAGIC: u64 = 0;
/// Offset of `kind`.
pub const P_KIND: u64 = 8;
/// Offset of `wss_start`.
pub const P_WSS_START: u64 = 16;
/// Offset of `wss_pages`.
pub const P_WSS_PAGES: u64 = 24;
/// Offset of `ticks_per_page`.
pub const P_TICKS_PER_PAGE: u64 = 32;
/// Offset of `seed`.
pub const P_SEED: u64 = 40;
/// Offset of `iteration`.
pub const P_ITERATION: u64 = 48;
/// Offset of `flags`.
pub const P_FLAGS: u64 = 56;
/// Offset of `max_lag_ticks`.
pub const P_MAX_LAG_TICKS: u64 = 64;
/// Offset of `vcpus`.
pub const P_VCPUS: u64 = 72;
/// Offset of `stall_epoch`.
pub const P_STALL_EPOCH: u64 = 80;
/// Offset of the `parts` table (16 bytes per vCPU: start GPA, pages).
pub const P_PARTS: u64 = 256;
/// Size of the parameter block's fixed fields (the `parts` table follows at [`P_PARTS`]).
pub const PARAMS_SIZE: usize = 88;

/// Offset of `pages_written` in a counter slot.
pub const C_PAGES_WRITTEN: u64 = 0;
/// Offset of `sweeps` in a counter slot.
pub const C_SWEEPS: u64 = 8;
/// Offset of `ready` in a counter slot.
pub const C_READY: u64 = 16;
/// Offset of `max_gap_ticks` in a counter slot.
pub const C_MAX_GAP_TICKS: u64 = 24;
/// Offset of `last_write_tsc` in a counter slot.
pub const C_LAST_WRITE_TSC: u64 = 32;
/// Offset of `stall_epoch` (the one the vCPU applied) in a counter slot.
pub const C_STALL_EPOCH: u64 = 40;

/// vCPU `index`'s entry in the `parts` table.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::params::{part_entry_offset, P_PARTS};
/// assert_eq!(part_entry_offset(2), P_PARTS + 32);
/// ```
pub fn part_entry_offset(index: u32) -> u64 {
    P_PARTS + 16 * u64::from(index)
}

/// The working set `[wss_start, +wss_pages pages)` split over `vcpus` vCPUs: `(start GPA, pages)`
/// per vCPU, contiguous and in order, the first `wss_pages % vcpus` one page longer. A vCPU gets
/// 0 pages only when there are fewer pages than vCPUs (which `Workload::validate` refuses).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::params::split_parts;
/// assert_eq!(split_parts(0x10_0000, 5, 2), vec![(0x10_0000, 3), (0x10_3000, 2)]);
/// ```
pub fn split_parts(wss_start: u64, wss_pages: u64, vcpus: u32) -> Vec<(u64, u64)> {
    let n = u64::from(vcpus.max(1));
    let (base, extra) = (wss_pages / n, wss_pages % n);
    let mut start = wss_start;
    (0..n)
        .map(|i| {
            let pages = base + u64::from(i < extra);
            let part = (start, pages);
            start += pages * crate::PAGE_SIZE;
            part
        })
        .collect()
}

/// Value the built-in workloads write (as a `u32`) to
/// [`DOORBELL_ADDR`](crate::layout::DOORBELL_ADDR) once they are ready.
pub const DOORBELL_READY: u32 = 1;

/// `flags` bit: while set, the `random` workload writes [`DOORBELL_SYNC`] to the MMIO doorbell
/// after each page write (both of its stores), a sync point where
/// [`VcpuRunner::pause_at_doorbell`](crate::vcpu::runner::VcpuRunner::pause_at_doorbell) stops it
/// between two writes. Each ring is a VM exit: set it only to stop the guest.
pub const FLAG_DOORBELL_SYNC: u64 = 1;

/// Value the `random` workload writes (as a `u32`) to the doorbell at a sync point
/// ([`FLAG_DOORBELL_SYNC`]).
pub const DOORBELL_SYNC: u32 = 2;

/// The parameter block, host side.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::params::{ParamBlock, P_ITERATION};
///
/// let p = ParamBlock { iteration: 5, ..Default::default() };
/// let b = p.to_bytes();
/// assert_eq!(&b[P_ITERATION as usize..P_ITERATION as usize + 8], &5u64.to_le_bytes());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBlock {
    /// Workload kind.
    pub kind: u64,
    /// Working-set start (GPA).
    pub wss_start: u64,
    /// Working-set pages.
    pub wss_pages: u64,
    /// TSC ticks between page writes per vCPU (0 = unpaced).
    pub ticks_per_page: u64,
    /// PRNG seed.
    pub seed: u64,
    /// Iteration value written into pages.
    pub iteration: u64,
    /// Flags ([`FLAG_DOORBELL_SYNC`]).
    pub flags: u64,
    /// Largest pacing backlog kept, in TSC ticks.
    pub max_lag_ticks: u64,
    /// vCPUs running the workload.
    pub vcpus: u64,
    /// Stall epoch (0 at load).
    pub stall_epoch: u64,
}

impl ParamBlock {
    /// The block's bytes, magic included.
    pub fn to_bytes(&self) -> [u8; PARAMS_SIZE] {
        let mut b = [0u8; PARAMS_SIZE];
        let fields = [
            (P_MAGIC, PARAMS_MAGIC),
            (P_KIND, self.kind),
            (P_WSS_START, self.wss_start),
            (P_WSS_PAGES, self.wss_pages),
            (P_TICKS_PER_PAGE, self.ticks_per_page),
            (P_SEED, self.seed),
            (P_ITERATION, self.iteration),
            (P_FLAGS, self.flags),
            (P_MAX_LAG_TICKS, self.max_lag_ticks),
            (P_VCPUS, self.vcpus),
            (P_STALL_EPOCH, self.stall_epoch),
        ];
        for (off, v) in fields {
            let o = off as usize;
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}
