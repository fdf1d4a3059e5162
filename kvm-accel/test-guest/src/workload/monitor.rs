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

/// Reads the counter slots of a workload running on `vcpus` vCPUs.
///
/// # Example
///
/// ```no_run
/// use clearlog_test_guest::workload::monitor::WorkloadMonitor;
/// use std::time::Duration;
/// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
///
/// let mon = WorkloadMonitor::new(&mem, 1);
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
