// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Postcopy after precopy: the destination's guest resumes with the pages still dirty at the
//! switch missing; it asks for the ones it touches on the return path while the source pushes
//! the rest in the background (docs/design.md, "Postcopy").
//!
//! - [`missing`]: the destination's missing pages, its requests, each page placed once.
//! - [`uffd`]: the userfaultfd that makes guest memory wait for missing pages.
//! - [`serve`]: the source's answer to requests, ahead of its background push.

pub(crate) mod missing;
pub(crate) mod serve;
pub(crate) mod uffd;

use std::io;
use std::ops::Range;
use std::time::Duration;

use clearlog_bitmap::Bitmap;

use crate::postcopy::missing::Placement;
use crate::postcopy::uffd::{Placed, Userfaultfd};
use crate::{Error, HostMapping, MigrationBlock, Result, PAGE_SIZE};

/// Guest memory under a userfaultfd: the destination's placement for a real guest.
pub(crate) struct UffdPlacement {
    uffd: Userfaultfd,
    mappings: Vec<HostMapping>,
    /// Pages made missing so far, per block.
    discarded: Vec<Bitmap>,
}

impl UffdPlacement {
    /// Register every block with a new userfaultfd. Any failure here comes before the commit:
    /// the destination refuses and the source resumes.
    pub(crate) fn prepare<B: MigrationBlock>(blocks: &[B]) -> Result<Self> {
        let mappings = blocks
            .iter()
            .map(|b| {
                b.host_mapping().ok_or_else(|| {
                    Error::PostcopyUnavailable(format!(
                        "block `{}` has no mapping the engine may register (its memory does not \
                         say where it lives, or is hugetlbfs)",
                        b.name()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let uffd = Userfaultfd::new()
            .map_err(|e| Error::PostcopyUnavailable(format!("userfaultfd: {e}")))?;
        for (m, b) in mappings.iter().zip(blocks) {
            uffd.register(m.addr(), m.len()).map_err(|e| {
                Error::PostcopyUnavailable(format!(
                    "registering block `{}` with userfaultfd: {e}",
                    b.name()
                ))
            })?;
        }
        let discarded = blocks
            .iter()
            .map(|b| Bitmap::new(b.pages() as usize))
            .collect();
        Ok(UffdPlacement {
            uffd,
            mappings,
            discarded,
        })
    }

    /// Make the pages of `missing` missing, those not made missing before: their content here
    /// is stale (the source sends each of them again). Called while the source's guest still
    /// runs (most of them, outside the downtime), and at the switch for the rest.
    pub(crate) fn discard<B: MigrationBlock>(
        &mut self,
        blocks: &[B],
        missing: &[Bitmap],
    ) -> Result<()> {
        let mut calls = 0;
        for (bi, (m, b)) in self.mappings.iter().zip(blocks).enumerate() {
            let mut new = missing[bi].clone();
            new.and_not_assign(&self.discarded[bi]);
            for r in runs(&new) {
                // SAFETY: `m` is the block's own mapping (HostMapping's contract), and these
                // pages are still dirty at the source, which sends each of them again: their
                // content here is stale.
                unsafe {
                    uffd::discard(
                        m.addr() + r.start * PAGE_SIZE,
                        (r.end - r.start) * PAGE_SIZE,
                        m.shared(),
                    )
                }
                .map_err(|e| {
                    Error::PostcopyUnavailable(format!(
                        "discarding stale pages of `{}`: {e}",
                        b.name()
                    ))
                })?;
                calls += 1;
            }
            self.discarded[bi].or_assign(&new);
        }
        tracing::debug!(calls, "postcopy: stale pages discarded");
        Ok(())
    }

    fn addr(&self, block: usize, page: u64) -> u64 {
        self.mappings[block].addr() + page * PAGE_SIZE
    }
}

impl Placement for UffdPlacement {
    fn place(
        &self,
        block: usize,
        page: u64,
        data: &[u8; PAGE_SIZE as usize],
    ) -> io::Result<Placed> {
        self.uffd.copy(self.addr(block, page), data)
    }

    fn place_zero(&self, block: usize, page: u64) -> io::Result<Placed> {
        self.uffd.zero(self.addr(block, page))
    }

    fn next_fault(&self, timeout: Duration) -> io::Result<Option<(usize, u64)>> {
        let Some(addr) = self.uffd.next_fault(timeout)? else {
            return Ok(None);
        };
        Ok(self.mappings.iter().enumerate().find_map(|(i, m)| {
            (addr >= m.addr() && addr - m.addr() < m.len())
                .then(|| (i, (addr - m.addr()) / PAGE_SIZE))
        }))
    }
}

/// Live passes precopy may still take, by the model, for `--postcopy auto` to stay in precopy.
pub(crate) const AUTO_PRECOPY_PASSES: u32 = 3;

/// `PostcopyPolicy::Auto`'s decision after a pass: switch to postcopy unless precopy, by the
/// geometric model ([`crate::dirtyrate::predict_convergence`]: each pass sends what the guest
/// dirtied during the previous one), ends within `downtime` in at most
/// [`AUTO_PRECOPY_PASSES`] more passes. `dirty_rate`: bytes the guest dirtied per second during
/// the pass; `remaining`: bytes dirty now; `bandwidth`: bytes per second the passes sent.
pub(crate) fn auto_switches(
    dirty_rate: f64,
    remaining: u64,
    bandwidth: u64,
    downtime: Duration,
) -> bool {
    if remaining == 0 {
        return false;
    }
    if bandwidth == 0 {
        return true;
    }
    crate::dirtyrate::predict_convergence(
        dirty_rate,
        remaining,
        bandwidth,
        downtime,
        AUTO_PRECOPY_PASSES,
    )
    .map_or(true, |c| !c.converges)
}

/// The runs of set bits of `b`, as page ranges.
pub(crate) fn runs(b: &Bitmap) -> impl Iterator<Item = Range<u64>> + '_ {
    let mut next = b.find_next_set(0);
    std::iter::from_fn(move || {
        let start = next?;
        let mut end = start + 1;
        while end < b.len() && b.test(end) {
            end += 1;
        }
        next = b.find_next_set(end);
        Some(start as u64..end as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_switches_when_precopy_would_take_long_or_never_end() {
        let mib = (1u64 << 20) as f64;
        let ms100 = Duration::from_millis(100);
        // The seed workload after its first pass: 288 MiB/s over 400 MiB/s, ~2 GiB left.
        assert!(auto_switches(288.0 * mib, 2 << 30, 400 << 20, ms100));
        // Faster than the link: precopy never ends.
        assert!(auto_switches(600.0 * mib, 1 << 30, 400 << 20, ms100));
        // A quiet guest: 1 GiB left, 10 MiB/s dirtied: two more passes.
        assert!(!auto_switches(10.0 * mib, 1 << 30, 400 << 20, ms100));
        // Nothing left, or nothing measured.
        assert!(!auto_switches(0.0, 0, 400 << 20, ms100));
        assert!(auto_switches(1.0, 1 << 20, 0, ms100));
    }

    #[test]
    fn runs_are_the_set_ranges() {
        let mut b = Bitmap::new(200);
        for p in [0, 1, 2, 70, 130, 131, 199] {
            b.set(p);
        }
        assert_eq!(
            runs(&b).collect::<Vec<_>>(),
            vec![0..3, 70..71, 130..132, 199..200]
        );
        assert_eq!(runs(&Bitmap::new(64)).count(), 0);
    }
}
