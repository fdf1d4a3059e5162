// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`ClearBitmap`]: migration's per-chunk "needs clear" bits, and the clear-then-read rule.

use crate::{Bitmap, Error};

/// Per-chunk "needs clear" bits of one block of guest RAM (QEMU's `clear_bmap`): one bit per
/// `2^shift` pages.
///
/// A migration keeps its own bitmap per block (one bit per page still to send). At every sync it
/// takes the block's dirty bits into that bitmap ([`AtomicBitmap::take_into`] does it for bits
/// collected in an [`AtomicBitmap`]) and, instead of re-arming the accelerator for the whole block
/// at once (one long vCPU stall on big guests), marks each chunk that received bits here. Before
/// sending the first page of a marked chunk it re-arms the chunk in the accelerator
/// ([`clear_run_before_read`](Self::clear_run_before_read)): re-arm first, then read, so a write
/// after the read is caught by the next sync.
///
/// [`AtomicBitmap`]: crate::AtomicBitmap
/// [`AtomicBitmap::take_into`]: crate::AtomicBitmap::take_into
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::ClearBitmap;
///
/// let mut clear = ClearBitmap::new(1000, 8).unwrap(); // 256-page chunks
/// assert_eq!(clear.chunk_count(), 4);
/// assert_eq!(clear.chunk_of(700), 2);
/// clear.set(2);
/// assert_eq!(clear.chunk_pages(3), (768, 232)); // the last chunk is clipped to the block
/// assert!(clear.test_and_clear(2));
/// assert!(!clear.test_and_clear(2));
/// assert!(ClearBitmap::new(1000, 5).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct ClearBitmap {
    bits: Bitmap,
    shift: u8,
    pages: u64,
}

impl ClearBitmap {
    /// Smallest shift: 64 pages, the granularity of `KVM_CLEAR_DIRTY_LOG`.
    pub const MIN_SHIFT: u8 = 6;
    /// Largest shift.
    pub const MAX_SHIFT: u8 = 31;

    /// Bitmap for a block of `pages` pages with chunks of `2^shift` pages.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidClearShift`] unless `MIN_SHIFT <= shift <= MAX_SHIFT`;
    /// [`Error::OutOfRange`] when the chunk count does not fit in `usize`.
    ///
    /// # Examples
    ///
    /// ```
    /// let clear = clearlog_bitmap::ClearBitmap::new(64, 6).unwrap();
    /// assert_eq!(clear.chunk_count(), 1);
    /// ```
    pub fn new(pages: u64, shift: u8) -> Result<Self, Error> {
        if !(Self::MIN_SHIFT..=Self::MAX_SHIFT).contains(&shift) {
            return Err(Error::InvalidClearShift { shift });
        }
        let chunks = pages.div_ceil(1u64 << shift);
        let chunks = usize::try_from(chunks).map_err(|_| Error::OutOfRange {
            start: 0,
            len: usize::MAX,
            size: usize::MAX,
        })?;
        Ok(ClearBitmap {
            bits: Bitmap::new(chunks),
            shift,
            pages,
        })
    }

    /// The shift.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::ClearBitmap::new(64, 15).unwrap().shift(), 15);
    /// ```
    pub fn shift(&self) -> u8 {
        self.shift
    }

    /// Chunk index of a page.
    ///
    /// # Examples
    ///
    /// ```
    /// let clear = clearlog_bitmap::ClearBitmap::new(1 << 20, 18).unwrap();
    /// assert_eq!(clear.chunk_of((1 << 18) + 5), 1);
    /// ```
    pub fn chunk_of(&self, page: u64) -> u64 {
        page >> self.shift
    }

    /// Test and clear a chunk's bit.
    ///
    /// # Panics
    ///
    /// Panics if `chunk >= self.chunk_count()` (like slice indexing: chunks come from
    /// [`chunk_of`](Self::chunk_of) of a page of the block).
    ///
    /// # Examples
    ///
    /// See [`ClearBitmap`].
    #[track_caller]
    pub fn test_and_clear(&mut self, chunk: u64) -> bool {
        self.bits.test_and_clear(index(chunk))
    }

    /// Mark a chunk as needing a clear.
    ///
    /// # Panics
    ///
    /// Panics if `chunk >= self.chunk_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut clear = clearlog_bitmap::ClearBitmap::new(128, 6).unwrap();
    /// clear.set(1);
    /// assert!(clear.test(1));
    /// ```
    #[track_caller]
    pub fn set(&mut self, chunk: u64) {
        self.bits.set(index(chunk));
    }

    /// Does a chunk need a clear?
    ///
    /// # Panics
    ///
    /// Panics if `chunk >= self.chunk_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let clear = clearlog_bitmap::ClearBitmap::new(128, 6).unwrap();
    /// assert!(!clear.test(0));
    /// ```
    #[track_caller]
    pub fn test(&self, chunk: u64) -> bool {
        self.bits.test(index(chunk))
    }

    /// Number of chunks (the last one may be partial).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::ClearBitmap::new(129, 6).unwrap().chunk_count(), 3);
    /// ```
    pub fn chunk_count(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Number of chunks that need a clear.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut clear = clearlog_bitmap::ClearBitmap::new(129, 6).unwrap();
    /// clear.set(0);
    /// clear.set(2);
    /// assert_eq!(clear.pending(), 2);
    /// ```
    pub fn pending(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// Pages of the block this bitmap was made for.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::ClearBitmap::new(129, 6).unwrap().block_pages(), 129);
    /// ```
    pub fn block_pages(&self) -> u64 {
        self.pages
    }

    /// First page and page count of a chunk, clipped to the block's end.
    ///
    /// # Examples
    ///
    /// See [`ClearBitmap`].
    pub fn chunk_pages(&self, chunk: u64) -> (u64, u64) {
        let first = chunk
            .checked_shl(u32::from(self.shift))
            .unwrap_or(u64::MAX)
            .min(self.pages);
        let end = first.saturating_add(1u64 << self.shift).min(self.pages);
        (first, end - first)
    }

    /// The chunk-clear-then-read rule, in one place: if `page`'s chunk is marked, unmark it and
    /// up to `max_chunks - 1` marked chunks right after it (stopping at the first unmarked one),
    /// and call `rearm(first_page, npages)` ONCE for the whole run (clipped to the block), before
    /// the caller reads any page of it. A write after the re-arm is then caught by the next sync
    /// (read first, and a write between the read and the re-arm is lost). Re-arming a chunk
    /// earlier than its read is safe (the rule is only "never after"); one call for adjacent
    /// chunks saves the per-call cost of the accelerator.
    ///
    /// Returns how many chunks were re-armed (0: `page`'s chunk was not marked, `rearm` was not
    /// called). If `rearm` fails, every chunk of the run stays marked and its error is returned.
    ///
    /// `clearlog_migration::DirtyTracking::clear_chunks_before_send` and every test of the rule
    /// go through this function.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] (converted into `E`) if `page` is outside the block; `rearm`'s error.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut clear = clearlog_bitmap::ClearBitmap::new(64 * 8, 6).unwrap();
    /// for c in [1, 2, 3, 5] { clear.set(c); }
    /// let mut rearmed = Vec::new();
    /// let mut rearm = |first, n| -> Result<(), clearlog_bitmap::Error> {
    ///     rearmed.push((first, n));
    ///     Ok(())
    /// };
    /// assert_eq!(clear.clear_run_before_read(64, 4, &mut rearm).unwrap(), 3); // chunks 1..4
    /// assert_eq!(clear.clear_run_before_read(200, 4, &mut rearm).unwrap(), 0); // chunk 3: done
    /// assert_eq!(clear.clear_run_before_read(64 * 5, 1, &mut rearm).unwrap(), 1);
    /// assert_eq!(clear.clear_run_before_read(0, 1, &mut rearm).unwrap(), 0); // never marked
    /// assert!(clear.clear_run_before_read(64 * 8, 1, &mut rearm).is_err()); // past the block
    /// assert_eq!(rearmed, [(64, 192), (320, 64)]);
    /// ```
    pub fn clear_run_before_read<E: From<Error>>(
        &mut self,
        page: u64,
        max_chunks: u64,
        rearm: impl FnOnce(u64, u64) -> Result<(), E>,
    ) -> Result<u64, E> {
        if page >= self.pages {
            return Err(Error::OutOfRange {
                start: usize::try_from(page).unwrap_or(usize::MAX),
                len: 1,
                size: usize::try_from(self.pages).unwrap_or(usize::MAX),
            }
            .into());
        }
        let chunk = self.chunk_of(page);
        if !self.test_and_clear(chunk) {
            return Ok(0);
        }
        let mut run = 1;
        while run < max_chunks
            && chunk + run < self.chunk_count()
            && self.test_and_clear(chunk + run)
        {
            run += 1;
        }
        let (first, _) = self.chunk_pages(chunk);
        let (last, last_pages) = self.chunk_pages(chunk + run - 1);
        if let Err(e) = rearm(first, last + last_pages - first) {
            for c in chunk..chunk + run {
                self.set(c);
            }
            return Err(e);
        }
        Ok(run)
    }

    /// Marks the chunk of every page whose bit is set in `words` (one 64-page word of the block,
    /// word index `word`): how [`AtomicBitmap::take_into`](crate::AtomicBitmap::take_into) marks
    /// what it takes.
    pub(crate) fn mark_word(&mut self, word: usize, bits: u64) {
        if bits == 0 {
            return;
        }
        // shift >= 6: a 64-page word lies inside one chunk.
        let chunk = (word << 6) >> self.shift;
        self.bits.set(chunk);
    }
}

/// A chunk number as a bit index (chunks of a `ClearBitmap` always fit: `new` checked).
#[track_caller]
fn index(chunk: u64) -> usize {
    usize::try_from(chunk).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_bounds() {
        assert_eq!(
            ClearBitmap::new(1, 5).unwrap_err(),
            Error::InvalidClearShift { shift: 5 }
        );
        ClearBitmap::new(1, 6).unwrap();
        ClearBitmap::new(1, 31).unwrap();
        ClearBitmap::new(1, 32).unwrap_err();
    }

    #[test]
    fn a_run_stops_at_the_cap_the_block_end_and_a_gap_and_fails_whole() {
        // 5 chunks of 64 pages, the last one 36 pages.
        let mut clear = ClearBitmap::new(4 * 64 + 36, 6).unwrap();
        for c in 0..5 {
            clear.set(c);
        }
        let mut calls = Vec::new();
        let n = clear
            .clear_run_before_read(10, 2, |f, n| -> Result<(), Error> {
                calls.push((f, n));
                Ok(())
            })
            .unwrap();
        assert_eq!((n, &calls[..]), (2, &[(0, 128)][..]));
        // A failing re-arm leaves every chunk of the run marked.
        let err = clear.clear_run_before_read(128, 8, |_, _| -> Result<(), Error> {
            Err(Error::LengthMismatch {
                expected: 0,
                actual: 1,
            })
        });
        err.unwrap_err();
        assert_eq!(clear.pending(), 3);
        // The run ends at the block end, clipped.
        calls.clear();
        let n = clear
            .clear_run_before_read(128, 8, |f, n| -> Result<(), Error> {
                calls.push((f, n));
                Ok(())
            })
            .unwrap();
        assert_eq!((n, &calls[..]), (3, &[(128, 164)][..]));
        // A gap ends a run.
        clear.set(0);
        clear.set(2);
        calls.clear();
        let n = clear
            .clear_run_before_read(0, 8, |f, n| -> Result<(), Error> {
                calls.push((f, n));
                Ok(())
            })
            .unwrap();
        assert_eq!((n, &calls[..]), (1, &[(0, 64)][..]));
        assert!(clear.test(2));
    }

    #[test]
    fn chunk_pages_clip_at_block_end() {
        let clear = ClearBitmap::new(100, 6).unwrap();
        assert_eq!(clear.chunk_count(), 2);
        assert_eq!(clear.chunk_pages(0), (0, 64));
        assert_eq!(clear.chunk_pages(1), (64, 36));
        assert_eq!(clear.chunk_pages(2), (100, 0));
    }

    #[test]
    fn a_marked_word_marks_its_chunk_only() {
        let mut clear = ClearBitmap::new(64 * 8, 7).unwrap(); // 128-page chunks
        clear.mark_word(0, 0);
        assert_eq!(clear.pending(), 0);
        clear.mark_word(3, 1 << 63); // pages 192..256: chunk 1
        assert!(clear.test(1) && clear.pending() == 1);
    }
}
