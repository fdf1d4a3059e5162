// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Which pages of host memory are not all zero, found by reading every byte.
//!
//! This is the check that does not trust any populated-pages answer (see
//! [`crate::RamBlock::nonzero_pages`]), so it has to be cheap enough to run over a whole guest:
//! it reads in place (no copy), 16 bytes per volatile load, and stops at a page's first non-zero
//! line. Untouched private anonymous memory reads through the shared zero page (2 MiB at a time
//! with transparent huge pages), which stays in the CPU's caches, so a sparse guest is checked at
//! tens of GB/s.

use crate::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// Calls `nonzero(i)` for every page `i` of `pages` pages at `base` that holds a non-zero byte.
///
/// # Safety
///
/// `base` must be page aligned and valid for reads of `pages * PAGE_SIZE` bytes for the whole
/// call (a live mapping). The bytes may change concurrently (guest memory): every access is a
/// volatile load, and a page changing under the scan may be reported either way.
pub(crate) unsafe fn scan_nonzero(base: *const u8, pages: usize, mut nonzero: impl FnMut(usize)) {
    for i in 0..pages {
        let page = base.wrapping_add(i * PAGE);
        // SAFETY: `page` is inside the range the caller guarantees readable, page aligned.
        if unsafe { !page_is_zero(page) } {
            nonzero(i);
        }
    }
}

/// Is the page at `page` all zero? 128 bytes per step, early exit on a non-zero step.
///
/// # Safety
///
/// `page` is 16-byte aligned and valid for reads of one page.
#[cfg(target_arch = "x86_64")]
unsafe fn page_is_zero(page: *const u8) -> bool {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
    };
    let p = page.cast::<__m128i>();
    let mut i = 0;
    while i < PAGE / 16 {
        // SAFETY: 8 aligned 16-byte loads inside the page (`i + 7 < PAGE / 16`); volatile because
        // another agent (the guest) may write the memory. SSE2 is part of x86_64.
        let acc = unsafe {
            let l = |k: usize| std::ptr::read_volatile(p.add(i + k));
            _mm_or_si128(
                _mm_or_si128(_mm_or_si128(l(0), l(1)), _mm_or_si128(l(2), l(3))),
                _mm_or_si128(_mm_or_si128(l(4), l(5)), _mm_or_si128(l(6), l(7))),
            )
        };
        // SAFETY: SSE2 register operations only (no memory access).
        let zero = unsafe { _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) } == 0xffff;
        if !zero {
            return false;
        }
        i += 8;
    }
    true
}

/// Is the page at `page` all zero? 64 bytes per step, early exit on a non-zero step.
///
/// # Safety
///
/// `page` is 8-byte aligned and valid for reads of one page.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn page_is_zero(page: *const u8) -> bool {
    let p = page.cast::<u64>();
    let mut i = 0;
    while i < PAGE / 8 {
        let mut acc = 0u64;
        for k in 0..8 {
            // SAFETY: aligned 8-byte loads inside the page (`i + 7 < PAGE / 8`); volatile because
            // another agent (the guest) may write the memory.
            acc |= unsafe { std::ptr::read_volatile(p.add(i + k)) };
        }
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_of_every_page_counts() {
        #[repr(C, align(4096))]
        struct Pages([u8; 4 * PAGE]);
        let mut mem = Box::new(Pages([0; 4 * PAGE]));
        let scan = |m: &Pages| {
            let mut v = Vec::new();
            // SAFETY: `m` is 4 aligned pages we hold a reference to.
            unsafe { scan_nonzero(m.0.as_ptr(), 4, |i| v.push(i)) };
            v
        };
        assert!(scan(&mem).is_empty());
        for (page, byte) in [(0, 0), (1, PAGE - 1), (3, 1000), (3, 17)] {
            mem.0[page * PAGE + byte] = 0x80;
        }
        assert_eq!(scan(&mem), [0, 1, 3]);
        // Only the last byte of a page.
        let mut mem = Box::new(Pages([0; 4 * PAGE]));
        mem.0[3 * PAGE - 1] = 1;
        assert_eq!(scan(&mem), [2]);
    }
}
