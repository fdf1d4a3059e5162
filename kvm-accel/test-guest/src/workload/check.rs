// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checks of guest memory against what a workload guarantees.
//!
//! The `increment` workload sweeps its working set in page order, adding 1 to the first byte of
//! each page. Frozen at any instant (a paused guest, or a migration destination at switchover),
//! the first bytes read in page order are all equal except at most one place where a byte is one
//! less than its predecessor (mod 256): the sweep's current position. Anything else means some
//! page holds a stale value: a lost write.

use super::params::{PARAMS_MAGIC, P_KIND, P_MAGIC, P_WSS_PAGES, P_WSS_START};
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
    /// Places where a byte is one less than its predecessor (at most 1 is consistent).
    pub steps: u64,
    /// Pages whose byte is neither equal to nor one less than its predecessor's (must be 0).
    pub bad_count: u64,
    /// The first (up to 64) such pages, as indexes into the working set.
    pub bad_pages: Vec<u64>,
}

impl IncrementCheck {
    /// Does the memory satisfy the rule (no bad page, at most one step)?
    pub fn is_consistent(&self) -> bool {
        self.bad_count == 0 && self.steps <= 1
    }
}

/// The workload kind written in the parameter block of a loaded guest (`None` if the block is not
/// there, e.g. an image that overwrote it).
///
/// # Example
/// ```no_run
/// # fn f(ram: &impl clearlog_test_guest::guest_ram::GuestRam) {
/// let kind = clearlog_test_guest::workload::check::loaded_workload(ram).unwrap();
/// # }
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
/// ```no_run
/// # fn f(ram: &impl clearlog_test_guest::guest_ram::GuestRam) {
/// let check = clearlog_test_guest::workload::check::check_increment(ram).unwrap();
/// assert!(check.is_consistent(), "lost writes at pages {:?}", check.bad_pages);
/// # }
/// ```
pub fn check_increment(ram: &(impl GuestRam + ?Sized)) -> Result<IncrementCheck> {
    if loaded_workload(ram)? != Some(WorkloadKind::Increment) {
        return Err(Error::InvalidWorkload(
            "the guest does not run the increment workload".into(),
        ));
    }
    let start = ram.load_u64(PARAMS_ADDR + P_WSS_START)?;
    let pages = ram.load_u64(PARAMS_ADDR + P_WSS_PAGES)?;
    let mut check = IncrementCheck {
        pages,
        steps: 0,
        bad_count: 0,
        bad_pages: Vec::new(),
    };
    let mut prev: Option<u8> = None;
    for i in 0..pages {
        let mut b = [0u8; 1];
        ram.read_at(start + i * PAGE_SIZE, &mut b)?;
        if let Some(p) = prev {
            if b[0] == p.wrapping_sub(1) {
                check.steps += 1;
            } else if b[0] != p {
                check.bad_count += 1;
                if check.bad_pages.len() < 64 {
                    check.bad_pages.push(i);
                }
            }
        }
        prev = Some(b[0]);
    }
    Ok(check)
}
