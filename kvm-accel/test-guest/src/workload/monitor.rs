// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Host-side view of a running workload's counter block.

use std::time::{Duration, Instant};

use super::params::*;
use crate::error::{Error, Result};
use crate::guest_ram::GuestRam;
use crate::layout::{counter_slot_addr, MAX_VCPUS};
use crate::PAGE_SIZE;

/// A measured dirty rate.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::monitor::RateSample;
/// let r = RateSample { pages: 1024, elapsed: std::time::Duration::from_secs(1) };
/// assert_eq!(r.bytes_per_s(), 4.0 * 1024.0 * 1024.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSample {
    /// Pages written during the interval.
    pub pages: u64,
    /// Wall-clock length of the interval.
    pub elapsed: Duration,
}

impl RateSample {
    /// Pages per second.
    pub fn pages_per_s(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Bytes per second (4 KiB per page).
    pub fn bytes_per_s(&self) -> f64 {
        self.pages_per_s() * PAGE_SIZE as f64
    }
}

/// One vCPU's write progress as the guest recorded it (`random` workload): pages written and the
/// guest TSC at the last of them. Two marks give the achieved write rate in guest time, which
/// does not depend on when the host happened to read them ([`achieved_rate`]).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::workload::monitor::{achieved_rate, WriteMark};
/// let a = [WriteMark { pages_written: 0, last_write_tsc: 0 }];
/// let b = [WriteMark { pages_written: 256, last_write_tsc: 1_000_000_000 }];
/// // 256 pages in 1 s of a 1 GHz TSC: 1 MiB/s.
/// assert_eq!(achieved_rate(&a, &b, 1_000_000), Some((1 << 20) as f64));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteMark {
    /// `pages_written`.
    pub pages_written: u64,
    /// `last_write_tsc`.
    pub last_write_tsc: u64,
}

/// The achieved write rate in bytes/s between two sets of marks (one per vCPU, same order): the
/// sum of each vCPU's pages over its own guest-TSC interval. `None` if no vCPU wrote in between
/// or `tsc_khz` is 0.
pub fn achieved_rate(before: &[WriteMark], after: &[WriteMark], tsc_khz: u32) -> Option<f64> {
    if tsc_khz == 0 {
        return None;
    }
    let hz = f64::from(tsc_khz) * 1e3;
    let mut rate = 0.0;
    let mut any = false;
    for (b, a) in before.iter().zip(after) {
        let pages = a.pages_written.wrapping_sub(b.pages_written);
        let ticks = a.last_write_tsc.wrapping_sub(b.last_write_tsc) as i64;
        if pages > 0 && ticks > 0 {
            rate += pages as f64 * PAGE_SIZE as f64 * hz / ticks as f64;
            any = true;
        }
    }
    any.then_some(rate)
}

/// TSC ticks to milliseconds at `tsc_khz` (0 for a 0 kHz TSC).
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_test_guest::workload::monitor::ticks_to_ms(3_000_000, 3_000_000), 1.0);
/// ```
pub fn ticks_to_ms(ticks: u64, tsc_khz: u32) -> f64 {
    if tsc_khz == 0 {
        return 0.0;
    }
    ticks as f64 / f64::from(tsc_khz)
}

/// Reads the counter slots of a workload running on `vcpus` vCPUs.
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("WorkloadMonitor") { return; }
/// use clearlog_test_guest::workload::monitor::WorkloadMonitor;
/// use std::time::Duration;
/// # let guest = clearlog_test_guest::Guest::boot(Default::default()).unwrap();
/// # let mem = guest.ram();
///
/// // `mem`: the RAM of a guest running a workload on one vCPU.
/// let mon = WorkloadMonitor::new(mem, 1);
/// mon.wait_ready(Duration::from_secs(5)).unwrap();
/// let rate = mon.measure_rate(Duration::from_secs(1)).unwrap();
/// println!("{:.1} MiB/s", rate.bytes_per_s() / (1 << 20) as f64);
/// ```
#[derive(Debug)]
pub struct WorkloadMonitor<'a, R: GuestRam + ?Sized> {
    ram: &'a R,
    vcpus: u32,
}

impl<'a, R: GuestRam + ?Sized> WorkloadMonitor<'a, R> {
    /// A monitor over `ram` for `vcpus` vCPUs (clamped to `1..=MAX_VCPUS`).
    pub fn new(ram: &'a R, vcpus: u32) -> Self {
        WorkloadMonitor {
            ram,
            vcpus: vcpus.clamp(1, MAX_VCPUS),
        }
    }

    fn field(&self, index: u32, off: u64) -> Result<u64> {
        self.ram.load_u64(counter_slot_addr(index) + off)
    }

    /// `pages_written` of vCPU `index`.
    pub fn pages_written_of(&self, index: u32) -> Result<u64> {
        self.field(index, C_PAGES_WRITTEN)
    }

    /// Sum of `pages_written` over all vCPUs.
    pub fn pages_written(&self) -> Result<u64> {
        (0..self.vcpus).try_fold(0u64, |acc, i| {
            Ok(acc.wrapping_add(self.pages_written_of(i)?))
        })
    }

    /// `sweeps` of vCPU `index`.
    pub fn sweeps_of(&self, index: u32) -> Result<u64> {
        self.field(index, C_SWEEPS)
    }

    /// Every vCPU's [`WriteMark`], in vCPU order.
    pub fn write_marks(&self) -> Result<Vec<WriteMark>> {
        (0..self.vcpus)
            .map(|i| {
                Ok(WriteMark {
                    pages_written: self.field(i, C_PAGES_WRITTEN)?,
                    last_write_tsc: self.field(i, C_LAST_WRITE_TSC)?,
                })
            })
            .collect()
    }

    /// The largest gap between two consecutive page writes of any vCPU, in guest TSC ticks, since
    /// each vCPU applied the last [`reset_stall`](super::reset_stall) (or since `ready`). A vCPU
    /// that has not written since the reset still reports its old maximum: read after at least
    /// one write (`random` workload only; 0 for the others).
    pub fn max_gap_ticks(&self) -> Result<u64> {
        (0..self.vcpus).try_fold(0u64, |m, i| Ok(m.max(self.field(i, C_MAX_GAP_TICKS)?)))
    }

    /// Whether every vCPU has applied stall epoch `epoch` (its maximum restarted then).
    pub fn stall_epoch_applied(&self, epoch: u64) -> Result<bool> {
        for i in 0..self.vcpus {
            if self.field(i, C_STALL_EPOCH)? != epoch {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// True when every vCPU has set `ready`.
    pub fn is_ready(&self) -> Result<bool> {
        for i in 0..self.vcpus {
            if self.field(i, C_READY)? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Polls until every vCPU is ready, or fails with [`Error::WorkloadTimeout`].
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.is_ready()? {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(Error::WorkloadTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sleeps for `interval` and returns how many pages the guest wrote meanwhile.
    pub fn measure_rate(&self, interval: Duration) -> Result<RateSample> {
        let p0 = self.pages_written()?;
        let t0 = Instant::now();
        std::thread::sleep(interval);
        let p1 = self.pages_written()?;
        let elapsed = t0.elapsed();
        Ok(RateSample {
            pages: p1.wrapping_sub(p0),
            elapsed,
        })
    }
}
