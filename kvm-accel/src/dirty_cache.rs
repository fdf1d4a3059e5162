// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `SlotDirtyCache`: what the accelerator knows is dirty in one memslot.
//!
//! With manual dirty-log protection, several users hold copies of the same KVM dirty bit (migration's
//! bitmap, a display's bitmap...). If each cleared "its" bits in KVM on its own, one bit could be
//! cleared twice for one sync, and the second clear would wipe a write made after the first one: the
//! page would never be sent again (the 8-step race of the KVM_CLEAR_DIRTY_LOG series).
//!
//! The cache prevents that. It holds the last `KVM_GET_DIRTY_LOG` result of the slot minus every
//! range cleared since. A clear sends KVM only `cache AND range`, then removes exactly that range from
//! the cache, so a bit is cleared at most once per sync and only if KVM reported it. The caller holds
//! the slots lock around the sync/clear and the ioctl, so nothing interleaves.
//!
//! This type is pure bookkeeping (no ioctl), so its rules are unit-tested without KVM.

use clearlog_bitmap::{words_for_bits, Bitmap};

/// Why a clear cannot be computed.
///
/// # Example
///
/// ```
/// use clearlog_kvm::{CacheError, SlotDirtyCache};
///
/// let mut cache = SlotDirtyCache::new(64);
/// assert!(matches!(cache.take_clear(0, 64), Err(CacheError::ClearBeforeSync { .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Nothing is known to be dirty: the slot was never synced since logging started.
    ///
    /// [`KvmMemoryListener`](crate::KvmMemoryListener) does not pass this on: it checks
    /// [`SlotDirtyCache::is_synced`] first and treats such a clear as a no-op (counted in
    /// [`DirtyLogStats::clears_before_sync`](crate::DirtyLogStats::clears_before_sync)), since a
    /// slot made after the caller's sync (a region re-mapped during a migration) has nothing to
    /// clear yet.
    #[error("clear of slot pages {first_page}..{end} before any sync of the slot: nothing is known dirty there (sync first)")]
    ClearBeforeSync {
        /// First page asked for.
        first_page: u64,
        /// End page asked for (exclusive).
        end: u64,
    },
    /// The range does not fit in the slot.
    #[error("clear range {first_page}+{npages} pages is outside the slot of {slot_pages} pages")]
    OutOfRange {
        /// First page asked for.
        first_page: u64,
        /// Pages asked for.
        npages: u64,
        /// Slot size in pages.
        slot_pages: u64,
    },
}

/// The arguments of one `KVM_CLEAR_DIRTY_LOG` call, computed from the cache.
///
/// The range is widened to the kernel's 64-page alignment (and clamped at the slot end), but the
/// widened parts carry zeros: only pages of the requested range can be cleared.
///
/// # Example
///
/// ```
/// let mut cache = clearlog_kvm::SlotDirtyCache::new(128);
/// cache.sync_buffer()[0] = 0b1010;
/// cache.mark_synced();
/// // Pages 2..4 asked for: widened to 0..64, only page 3 set.
/// let req: clearlog_kvm::ClearRequest = cache.take_clear(2, 2).unwrap().unwrap();
/// assert_eq!((req.first_page, req.num_pages, req.bitmap[0]), (0, 64, 0b1000));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClearRequest {
    /// First page, a multiple of 64.
    pub first_page: u64,
    /// Pages covered: a multiple of 64, or up to the slot end.
    pub num_pages: u32,
    /// One bit per page from `first_page`; set bits are cleared in KVM.
    pub bitmap: Vec<u64>,
    /// Number of set bits in `bitmap`.
    pub bits: u64,
}

/// What a [`SlotDirtyCache::take_clear_into`] request covers (its words are in the caller's
/// buffer).
///
/// # Example
/// ```
/// let r = clearlog_kvm::ClearRange { first_page: 64, num_pages: 64, bits: 3 };
/// assert_eq!(r.first_page % 64, 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClearRange {
    /// First page, a multiple of 64.
    pub first_page: u64,
    /// Pages covered: a multiple of 64, or up to the slot end.
    pub num_pages: u32,
    /// Number of set bits in the words.
    pub bits: u64,
}

/// Per-memslot copy of the last dirty-log GET, minus the ranges cleared since.
///
/// # Example
/// ```
/// use clearlog_kvm::SlotDirtyCache;
///
/// let mut cache = SlotDirtyCache::new(128);
/// // What KVM_GET_DIRTY_LOG returned: pages 3 and 70 dirty.
/// cache.sync_buffer()[0] = 1 << 3;
/// cache.sync_buffer()[1] = 1 << 6;
/// cache.mark_synced();
///
/// // Clear pages 0..64: KVM is told to clear page 3 only.
/// let req = cache.take_clear(0, 64).unwrap().unwrap();
/// assert_eq!((req.first_page, req.num_pages, req.bits), (0, 64, 1));
/// // A second clear of the same range before the next sync sends nothing.
/// assert!(cache.take_clear(0, 64).unwrap().is_none());
/// assert!(cache.bits().test(70));
/// ```
#[derive(Debug, Clone)]
pub struct SlotDirtyCache {
    bits: Bitmap,
    synced: bool,
}

impl SlotDirtyCache {
    /// An empty, never-synced cache for a slot of `pages` pages.
    ///
    /// # Example
    /// ```
    /// let cache = clearlog_kvm::SlotDirtyCache::new(100);
    /// assert_eq!(cache.pages(), 100);
    /// assert!(!cache.is_synced());
    /// ```
    pub fn new(pages: u64) -> Self {
        Self {
            bits: Bitmap::new(pages as usize),
            synced: false,
        }
    }

    /// Slot size in pages.
    ///
    /// # Example
    /// ```
    /// assert_eq!(clearlog_kvm::SlotDirtyCache::new(3).pages(), 3);
    /// ```
    pub fn pages(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Has the slot been synced since logging started?
    ///
    /// # Example
    /// ```
    /// let mut cache = clearlog_kvm::SlotDirtyCache::new(64);
    /// cache.mark_synced();
    /// assert!(cache.is_synced());
    /// ```
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The buffer `KVM_GET_DIRTY_LOG` writes into (one bit per page, KVM layout). Call
    /// [`mark_synced`](Self::mark_synced) after the GET succeeded. Writing here replaces the cache:
    /// the kernel's bitmap always holds every bit the cache holds (cleared bits left both).
    ///
    /// # Example
    /// ```
    /// let mut cache = clearlog_kvm::SlotDirtyCache::new(65);
    /// assert_eq!(cache.sync_buffer().len(), 2);
    /// ```
    pub fn sync_buffer(&mut self) -> &mut [u64] {
        self.bits.as_words_mut()
    }

    /// Record that the buffer now holds a fresh GET result.
    ///
    /// # Example
    /// ```
    /// let mut cache = clearlog_kvm::SlotDirtyCache::new(1);
    /// cache.sync_buffer()[0] = u64::MAX; // the kernel never sets bits past the slot end...
    /// cache.mark_synced();
    /// assert_eq!(cache.bits().count_ones(), 1); // ...and we mask them anyway
    /// ```
    pub fn mark_synced(&mut self) {
        self.bits.mask_tail();
        self.synced = true;
    }

    /// The pages known dirty and not cleared since the last sync.
    ///
    /// # Example
    /// ```
    /// assert_eq!(clearlog_kvm::SlotDirtyCache::new(10).bits().count_ones(), 0);
    /// ```
    pub fn bits(&self) -> &Bitmap {
        &self.bits
    }

    /// Compute the clear for slot pages `[first_page, first_page + npages)` and remove that range
    /// from the cache. Returns `Ok(None)` when nothing in the range is known dirty (no ioctl needed).
    ///
    /// The caller must issue the ioctl under the same lock it held for this call. If the ioctl then
    /// fails, nothing is lost: the bits are still set in the kernel and come back at the next sync.
    ///
    /// # Errors
    /// [`CacheError::ClearBeforeSync`] if the slot was never synced, [`CacheError::OutOfRange`] if
    /// the range leaves the slot.
    ///
    /// # Example
    /// ```
    /// let mut cache = clearlog_kvm::SlotDirtyCache::new(64);
    /// assert!(cache.take_clear(0, 32).is_err()); // never synced
    /// cache.sync_buffer()[0] = u64::MAX;
    /// cache.mark_synced();
    /// let req = cache.take_clear(0, 32).unwrap().unwrap();
    /// assert_eq!(req.bitmap, vec![0xffff_ffff]); // pages 32..63 are not touched
    /// ```
    pub fn take_clear(
        &mut self,
        first_page: u64,
        npages: u64,
    ) -> Result<Option<ClearRequest>, CacheError> {
        let mut bitmap = Vec::new();
        Ok(self
            .take_clear_into(first_page, npages, &mut bitmap)?
            .map(|r| ClearRequest {
                first_page: r.first_page,
                num_pages: r.num_pages,
                bitmap,
                bits: r.bits,
            }))
    }

    /// [`take_clear`](Self::take_clear) into a caller's buffer: `bitmap` is overwritten with the
    /// request's words (its capacity is reused, so a warm buffer makes a clear allocation-free);
    /// the returned range says what it covers.
    ///
    /// # Errors
    /// As [`take_clear`](Self::take_clear).
    ///
    /// # Example
    /// ```
    /// let mut cache = clearlog_kvm::SlotDirtyCache::new(128);
    /// cache.sync_buffer()[1] = 0b110;
    /// cache.mark_synced();
    /// let mut words = Vec::with_capacity(2);
    /// let r = cache.take_clear_into(64, 64, &mut words).unwrap().unwrap();
    /// assert_eq!((r.first_page, r.num_pages, r.bits), (64, 64, 2));
    /// assert_eq!(words, [0b110]);
    /// ```
    pub fn take_clear_into(
        &mut self,
        first_page: u64,
        npages: u64,
        bitmap: &mut Vec<u64>,
    ) -> Result<Option<ClearRange>, CacheError> {
        bitmap.clear();
        let slot_pages = self.pages();
        let end = first_page
            .checked_add(npages)
            .filter(|&e| e <= slot_pages)
            .ok_or(CacheError::OutOfRange {
                first_page,
                npages,
                slot_pages,
            })?;
        if !self.synced {
            return Err(CacheError::ClearBeforeSync { first_page, end });
        }
        if npages == 0 {
            return Ok(None);
        }
        // Widen to the kernel's alignment; the widened parts stay zero below.
        let start = first_page & !63;
        let widened_end = end.next_multiple_of(64).min(slot_pages);
        let num_pages = widened_end - start;
        let num_pages = u32::try_from(num_pages).map_err(|_| CacheError::OutOfRange {
            first_page,
            npages,
            slot_pages,
        })?;

        let words = self.bits.as_words();
        let first_word = (start / 64) as usize;
        bitmap
            .extend_from_slice(&words[first_word..first_word + words_for_bits(num_pages as usize)]);
        // Keep only [first_page, end) relative to `start`.
        let lo = first_page - start;
        let hi = end - start;
        let mut bits = 0u64;
        for (i, w) in bitmap.iter_mut().enumerate() {
            let word_lo = i as u64 * 64;
            let from = lo.saturating_sub(word_lo).min(64);
            let to = hi.saturating_sub(word_lo).min(64);
            let mask = range_mask(from, to);
            *w &= mask;
            bits += u64::from(w.count_ones());
        }
        self.bits.clear_range(first_page as usize, npages as usize);
        if bits == 0 {
            return Ok(None);
        }
        Ok(Some(ClearRange {
            first_page: start,
            num_pages,
            bits,
        }))
    }
}

/// Bits `[from, to)` of a word set (from <= to <= 64).
fn range_mask(from: u64, to: u64) -> u64 {
    if from >= to {
        return 0;
    }
    let upper = if to == 64 { u64::MAX } else { (1u64 << to) - 1 };
    upper & !((1u64 << from) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced(pages: u64, dirty: &[u64]) -> SlotDirtyCache {
        let mut c = SlotDirtyCache::new(pages);
        for &p in dirty {
            c.sync_buffer()[(p / 64) as usize] |= 1 << (p % 64);
        }
        c.mark_synced();
        c
    }

    #[test]
    fn range_masks() {
        assert_eq!(range_mask(0, 64), u64::MAX);
        assert_eq!(range_mask(0, 0), 0);
        assert_eq!(range_mask(3, 5), 0b11000);
        assert_eq!(range_mask(63, 64), 1 << 63);
        assert_eq!(range_mask(10, 4), 0);
    }

    #[test]
    fn clear_before_sync_is_rejected() {
        let mut c = SlotDirtyCache::new(64);
        assert!(matches!(
            c.take_clear(0, 64),
            Err(CacheError::ClearBeforeSync { .. })
        ));
    }

    #[test]
    fn out_of_range_is_rejected() {
        let mut c = synced(100, &[]);
        assert!(matches!(
            c.take_clear(90, 11),
            Err(CacheError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.take_clear(u64::MAX, 2),
            Err(CacheError::OutOfRange { .. })
        ));
        c.take_clear(90, 10).unwrap();
    }

    #[test]
    fn half_slot_clear_leaves_the_other_half() {
        let mut c = synced(64, &(0..64).collect::<Vec<_>>());
        let req = c.take_clear(0, 32).unwrap().unwrap();
        assert_eq!(req.first_page, 0);
        assert_eq!(req.num_pages, 64);
        assert_eq!(req.bitmap, vec![0xffff_ffff]);
        assert_eq!(req.bits, 32);
        assert_eq!(c.bits().count_ones(), 32);
        assert!((32..64).all(|p| c.bits().test(p)));
    }

    #[test]
    fn unaligned_range_is_widened_with_zeros() {
        let all: Vec<u64> = (0..256).collect();
        let mut c = synced(256, &all);
        let req = c.take_clear(70, 100).unwrap().unwrap();
        assert_eq!(req.first_page, 64);
        assert_eq!(req.num_pages, 128); // 64..192
        assert_eq!(req.bits, 100);
        assert_eq!(req.bitmap[0], !0u64 << 6); // pages 64..69 not cleared
        assert_eq!(req.bitmap[1], (1u64 << 42) - 1); // pages 128..169
        assert!(
            c.bits().test(69) && c.bits().test(170) && !c.bits().test(70) && !c.bits().test(169)
        );
    }

    #[test]
    fn slot_end_not_multiple_of_64_is_clamped() {
        let mut c = synced(100, &[65, 99]);
        let req = c.take_clear(64, 36).unwrap().unwrap();
        assert_eq!((req.first_page, req.num_pages, req.bits), (64, 36, 2));
        assert_eq!(req.bitmap.len(), 1);
        // Widening a range that ends before the slot end stops at the slot end too.
        let mut c = synced(100, &[65, 99]);
        let req = c.take_clear(64, 2).unwrap().unwrap();
        assert_eq!((req.first_page, req.num_pages, req.bits), (64, 36, 1));
    }

    #[test]
    fn nothing_is_cleared_twice_per_sync() {
        let mut c = synced(64, &[5]);
        assert_eq!(c.take_clear(0, 64).unwrap().unwrap().bits, 1);
        assert_eq!(c.take_clear(0, 64).unwrap(), None);
        assert_eq!(c.take_clear(5, 1).unwrap(), None);
    }
}
