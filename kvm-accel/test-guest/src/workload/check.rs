// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checks of guest memory against what a workload guarantees.
//!
//! The `increment` workload sweeps its working set in page order, adding 1 to the first byte of
//! each page. Frozen at any instant (a paused guest, or a migration destination at switchover),
//! the first bytes read in page order are all equal except at most one place where a byte is one
//! less than its predecessor (mod 256): the sweep's current position. Anything else means some
//! page holds a stale value: a lost write. With several vCPUs each sweeps its own part of the
//! working set (the parameter block's `parts` table), so the rule holds per part.

use super::params::{part_entry_offset, PARAMS_MAGIC, P_KIND, P_MAGIC, P_VCPUS};
use super::WorkloadKind;
use crate::error::{Error, Result};
use crate::guest_ram::GuestRam;
use crate::layout::PARAMS_ADDR;
use crate::PAGE_SIZE;

/// Result of [`check_increment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncrementCheck {
    /// Pages walked.
    pub pages: u64,
    /// Parts walked (one per vCPU).
    pub parts: u64,
    /// Places where a byte is one less than its predecessor, over all parts.
    pub steps: u64,
    /// The most such places in one part (at most 1 is consistent).
    pub max_part_steps: u64,
    /// Pages whose byte is neither equal to nor one less than its predecessor's (must be 0).
    pub bad_count: u64,
    /// The first (up to 64) such pages, as indexes into the whole working set.
    pub bad_pages: Vec<u64>,
}

impl IncrementCheck {
    /// Does the memory satisfy the rule (no bad page, at most one step in each part)?
    pub fn is_consistent(&self) -> bool {
        self.bad_count == 0 && self.max_part_steps <= 1
    }
}

/// The workload kind written in the parameter block of a loaded guest (`None` if the block is not
/// there, e.g. an image that overwrote it).
///
/// # Example
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("loaded_workload") { return; }
/// use clearlog_test_guest::workload::{WorkloadKind, check::loaded_workload};
///
/// let guest = clearlog_test_guest::Guest::boot(Default::default()).unwrap();
/// assert_eq!(loaded_workload(guest.ram()).unwrap(), Some(WorkloadKind::Idle));
/// ```
pub fn loaded_workload(ram: &(impl GuestRam + ?Sized)) -> Result<Option<WorkloadKind>> {
    if ram.load_u64(PARAMS_ADDR + P_MAGIC)? != PARAMS_MAGIC {
        return Ok(None);
    }
    Ok(match ram.load_u64(PARAMS_ADDR + P_KIND)? {
        0 => Some(WorkloadKind::Idle),
        1 => Some(WorkloadKind::Random),
        2 => Some(WorkloadKind::Increment),
        3 => Some(WorkloadKind::Image),
        _ => None,
    })
}

/// Check the `increment` rule over the working set recorded in the guest's parameter block.
/// Call it on frozen memory (paused guest or a destination before resume).
///
/// # Errors
/// [`Error::InvalidWorkload`] if the guest does not run the `increment` workload.
///
/// # Example
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("check_increment") { return; }
/// use clearlog_test_guest::{Guest, GuestConfig, workload::WorkloadSpec};
///
/// let guest = Guest::boot(GuestConfig {
///     workload: WorkloadSpec::Increment { wss_bytes: 16 << 20, dirty_rate_bytes_per_s: 0 },
///     ..GuestConfig::default()
/// })
/// .unwrap();
/// guest.pause().unwrap(); // frozen memory
/// let check = clearlog_test_guest::workload::check::check_increment(guest.ram()).unwrap();
/// assert!(check.is_consistent(), "lost writes at pages {:?}", check.bad_pages);
/// ```
pub fn check_increment(ram: &(impl GuestRam + ?Sized)) -> Result<IncrementCheck> {
    if loaded_workload(ram)? != Some(WorkloadKind::Increment) {
        return Err(Error::InvalidWorkload(
            "the guest does not run the increment workload".into(),
        ));
    }
    let vcpus = ram.load_u64(PARAMS_ADDR + P_VCPUS)?;
    if vcpus == 0 || vcpus > u64::from(crate::layout::MAX_VCPUS) {
        return Err(Error::InvalidWorkload(format!(
            "the parameter block says {vcpus} vCPUs"
        )));
    }
    let mut check = IncrementCheck {
        pages: 0,
        parts: vcpus,
        steps: 0,
        max_part_steps: 0,
        bad_count: 0,
        bad_pages: Vec::new(),
    };
    for part in 0..vcpus as u32 {
        let start = ram.load_u64(PARAMS_ADDR + part_entry_offset(part))?;
        let pages = ram.load_u64(PARAMS_ADDR + part_entry_offset(part) + 8)?;
        let mut steps = 0;
        let mut prev: Option<u8> = None;
        for i in 0..pages {
            let mut b = [0u8; 1];
            ram.read_at(start + i * PAGE_SIZE, &mut b)?;
            if let Some(p) = prev {
                if b[0] == p.wrapping_sub(1) {
                    steps += 1;
                } else if b[0] != p {
                    check.bad_count += 1;
                    if check.bad_pages.len() < 64 {
                        check.bad_pages.push(check.pages + i);
                    }
                }
            }
            prev = Some(b[0]);
        }
        check.pages += pages;
        check.steps += steps;
        check.max_part_steps = check.max_part_steps.max(steps);
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Workload, WorkloadSpec};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn rule_holds_per_part() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let w = Workload::new(WorkloadSpec::Increment {
            wss_bytes: 8 * PAGE_SIZE,
            dirty_rate_bytes_per_s: 0,
        })
        .with_vcpus(2);
        w.load(&mem, 1_000_000).unwrap();
        let set = |page: u64, v: u8| {
            mem.write_at(w.wss_start() + page * PAGE_SIZE, &[v])
                .unwrap();
        };
        // Part 0 (pages 0..4) mid-sweep at page 2, part 1 (pages 4..8) mid-sweep at page 5:
        // one step each, consistent.
        for (p, v) in [
            (0, 3),
            (1, 3),
            (2, 2),
            (3, 2),
            (4, 7),
            (5, 6),
            (6, 6),
            (7, 6),
        ] {
            set(p, v);
        }
        let c = check_increment(&mem).unwrap();
        assert_eq!((c.pages, c.parts, c.steps, c.max_part_steps), (8, 2, 2, 1));
        assert!(c.is_consistent(), "{c:?}");
        // Two steps in one part is a lost write, even though the other part has none.
        set(5, 7);
        set(6, 6);
        set(7, 5);
        let c = check_increment(&mem).unwrap();
        assert_eq!(c.max_part_steps, 2);
        assert!(!c.is_consistent());
        // A stale byte is reported with its index in the whole working set.
        set(6, 9);
        let c = check_increment(&mem).unwrap();
        assert_eq!(c.bad_pages, vec![6, 7]);
    }
}
