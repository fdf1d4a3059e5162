// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The thread-safe [`AtomicBitmap`].

use std::iter::FusedIterator;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::word::{
    bit_pos, check_range, check_range_words, for_each_word_in_range, low_mask, valid_mask,
    words_for_bits, BITS_PER_WORD,
};
use crate::{Bitmap, ClearBitmap, Error};

/// Ordering of read-modify-write operations: a writer's earlier stores are
/// visible to whoever later observes (and e.g. takes) the bits it set.
const RMW: Ordering = Ordering::AcqRel;
const LOAD: Ordering = Ordering::Acquire;
const STORE: Ordering = Ordering::Release;

/// A bitmap of `len` bits shared between threads, stored as `AtomicU64` words
/// in KVM's layout (bit `i` is bit `i % 64` of word `i / 64`).
///
/// Every operation is atomic **per word**: operations on a range or on the
/// whole map are a sequence of single-word atomic operations, so they are not
/// atomic as a whole, but no bit set concurrently is ever lost: a bit set by
/// one thread is either taken by a concurrent [`take_range`](Self::take_range)
/// / [`take_word`](Self::take_word) or stays in the map. Read-modify-write
/// operations use acquire-release ordering, loads acquire and stores release.
///
/// Bits past `len` in the last word are always zero: word-level writes
/// ([`fetch_or_word`](Self::fetch_or_word), [`swap_word`](Self::swap_word),
/// [`or_words_at`](Self::or_words_at)) ignore them, as they cannot stand for
/// anything.
///
/// Bit or range indices past the end are programming errors and panic with a
/// message naming the index and the size, like slice indexing.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::AtomicBitmap;
/// use std::sync::Arc;
///
/// let map = Arc::new(AtomicBitmap::new(1024));
/// let writers: Vec<_> = (0..4)
///     .map(|t| {
///         let map = Arc::clone(&map);
///         std::thread::spawn(move || {
///             for i in (t..1024).step_by(4) {
///                 map.set(i);
///             }
///         })
///     })
///     .collect();
/// for w in writers {
///     w.join().unwrap();
/// }
/// let taken = map.take_range(0, 1024);
/// assert_eq!(taken.count_ones(), 1024);
/// assert_eq!(map.count_ones(), 0);
/// ```
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: usize,
}

impl AtomicBitmap {
    /// Creates an atomic bitmap of `len` bits, all zero.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(65);
    /// assert_eq!(map.len(), 65);
    /// assert_eq!(map.word_count(), 2);
    /// ```
    pub fn new(len: usize) -> Self {
        AtomicBitmap {
            words: (0..words_for_bits(len))
                .map(|_| AtomicU64::new(0))
                .collect(),
            len,
        }
    }

    /// Returns the number of bits.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::AtomicBitmap::new(7).len(), 7);
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns `true` if the bitmap has no bits at all (`len() == 0`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(clearlog_bitmap::AtomicBitmap::new(0).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the number of words, [`words_for_bits(len())`](crate::words_for_bits).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::AtomicBitmap::new(129).word_count(), 3);
    /// ```
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    #[track_caller]
    #[inline]
    fn check_bit(&self, bit: usize) {
        assert!(
            bit < self.len,
            "bit {bit} out of range for bitmap of {} bits",
            self.len
        );
    }

    #[track_caller]
    #[inline]
    fn check_range(&self, start: usize, len: usize) -> usize {
        match check_range(start, len, self.len) {
            Ok(end) => end,
            Err(e) => panic!("{e}"),
        }
    }

    #[track_caller]
    #[inline]
    fn word(&self, idx: usize) -> &AtomicU64 {
        match self.words.get(idx) {
            Some(w) => w,
            None => panic!(
                "word {idx} out of range for bitmap of {} words",
                self.words.len()
            ),
        }
    }

    /// Atomically sets bit `bit`.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(10);
    /// map.set(9);
    /// assert!(map.test(9));
    /// ```
    #[track_caller]
    pub fn set(&self, bit: usize) {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        self.words[w].fetch_or(m, RMW);
    }

    /// Atomically clears bit `bit`.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(10);
    /// map.set(9);
    /// map.clear(9);
    /// assert!(!map.test(9));
    /// ```
    #[track_caller]
    pub fn clear(&self, bit: usize) {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        self.words[w].fetch_and(!m, RMW);
    }

    /// Returns the current value of bit `bit`.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(10);
    /// assert!(!map.test(0));
    /// ```
    #[track_caller]
    pub fn test(&self, bit: usize) -> bool {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        self.words[w].load(LOAD) & m != 0
    }

    /// Atomically clears bit `bit` and returns its previous value.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(10);
    /// map.set(3);
    /// assert!(map.test_and_clear(3));
    /// assert!(!map.test_and_clear(3));
    /// ```
    #[track_caller]
    pub fn test_and_clear(&self, bit: usize) -> bool {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        self.words[w].fetch_and(!m, RMW) & m != 0
    }

    /// Sets bits `[start, start + len)`, atomically per word (`fetch_or` on every
    /// word, also those wholly inside the range: a plain store would end the release
    /// sequence of another thread's earlier `fetch_or` on the word, and a reader that
    /// sees the word full would then not see that thread's writes before its mark).
    ///
    /// # Panics
    ///
    /// Panics if `start + len > self.len()` (or overflows).
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(200);
    /// map.set_range(10, 150);
    /// assert_eq!(map.count_ones(), 150);
    /// ```
    #[track_caller]
    pub fn set_range(&self, start: usize, len: usize) {
        let end = self.check_range(start, len);
        for_each_word_in_range(start, end, |i, m| {
            self.words[i].fetch_or(m, RMW);
        });
    }

    /// Clears bits `[start, start + len)`, atomically per word (`fetch_and`; a
    /// plain release store for words wholly inside the range).
    ///
    /// # Panics
    ///
    /// Panics if `start + len > self.len()` (or overflows).
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(200);
    /// map.set_range(0, 200);
    /// map.clear_range(1, 198);
    /// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [0, 199]);
    /// ```
    #[track_caller]
    pub fn clear_range(&self, start: usize, len: usize) {
        let end = self.check_range(start, len);
        for_each_word_in_range(start, end, |i, m| {
            if m == !0 {
                self.words[i].store(0, STORE);
            } else {
                self.words[i].fetch_and(!m, RMW);
            }
        });
    }

    /// Loads word `idx`.
    ///
    /// # Panics
    ///
    /// Panics if `idx >= word_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(128);
    /// map.set(64);
    /// assert_eq!(map.load_word(1), 1);
    /// ```
    #[track_caller]
    pub fn load_word(&self, idx: usize) -> u64 {
        self.word(idx).load(LOAD)
    }

    /// Atomically ORs `mask` into word `idx` and returns the previous value.
    /// Bits of `mask` past `len()` are ignored.
    ///
    /// # Panics
    ///
    /// Panics if `idx >= word_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(66);
    /// assert_eq!(map.fetch_or_word(1, 0b1), 0);
    /// assert_eq!(map.fetch_or_word(1, 0b1110), 0b1);
    /// assert_eq!(map.load_word(1), 0b11); // bits 66.. do not exist
    /// ```
    #[track_caller]
    pub fn fetch_or_word(&self, idx: usize, mask: u64) -> u64 {
        self.word(idx)
            .fetch_or(mask & valid_mask(idx, self.len), RMW)
    }

    /// Atomically ANDs `mask` into word `idx` and returns the previous value.
    ///
    /// # Panics
    ///
    /// Panics if `idx >= word_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(64);
    /// map.fetch_or_word(0, 0b111);
    /// assert_eq!(map.fetch_and_word(0, !0b010), 0b111);
    /// assert_eq!(map.load_word(0), 0b101);
    /// ```
    #[track_caller]
    pub fn fetch_and_word(&self, idx: usize, mask: u64) -> u64 {
        self.word(idx).fetch_and(mask, RMW)
    }

    /// Atomically replaces word `idx` with `value` and returns the previous
    /// value. Bits of `value` past `len()` are ignored.
    ///
    /// # Panics
    ///
    /// Panics if `idx >= word_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(64);
    /// assert_eq!(map.swap_word(0, 5), 0);
    /// assert_eq!(map.swap_word(0, 6), 5);
    /// ```
    #[track_caller]
    pub fn swap_word(&self, idx: usize, value: u64) -> u64 {
        self.word(idx).swap(value & valid_mask(idx, self.len), RMW)
    }

    /// Atomically replaces word `idx` with zero and returns its previous
    /// value.
    ///
    /// # Panics
    ///
    /// Panics if `idx >= word_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(64);
    /// map.set(2);
    /// assert_eq!(map.take_word(0), 0b100);
    /// assert_eq!(map.load_word(0), 0);
    /// ```
    #[track_caller]
    pub fn take_word(&self, idx: usize) -> u64 {
        self.word(idx).swap(0, RMW)
    }

    /// ORs the word slice `words` (e.g. a bitmap returned by
    /// `KVM_GET_DIRTY_LOG`) into this map starting at word `first_word`, i.e.
    /// at bit `first_word * 64`. Each word is one atomic `fetch_or`; zero words
    /// are skipped. Bits that would land past `len()` in the last word are
    /// ignored.
    ///
    /// # Panics
    ///
    /// Panics if `first_word + words.len() > word_count()`. See
    /// [`try_or_words_at`](Self::try_or_words_at) for a non-panicking version.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(256);
    /// map.or_words_at(2, &[0b1, 0b10]);
    /// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [128, 193]);
    /// ```
    #[track_caller]
    pub fn or_words_at(&self, first_word: usize, words: &[u64]) {
        if let Err(e) = self.try_or_words_at(first_word, words) {
            panic!("or_words_at: {e}");
        }
    }

    /// Fallible version of [`or_words_at`](Self::or_words_at).
    ///
    /// # Errors
    ///
    /// Returns [`Error::OutOfRange`], expressed in bits (`start` =
    /// `first_word * 64`, `len` = `words.len() * 64`, `size` =
    /// `word_count() * 64`, saturating), without modifying the map if
    /// `first_word + words.len() > word_count()`.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::{AtomicBitmap, Error};
    ///
    /// let map = AtomicBitmap::new(128);
    /// assert_eq!(map.try_or_words_at(1, &[1]), Ok(()));
    /// assert_eq!(
    ///     map.try_or_words_at(1, &[1, 1]),
    ///     Err(Error::OutOfRange { start: 64, len: 128, size: 128 })
    /// );
    /// ```
    pub fn try_or_words_at(&self, first_word: usize, words: &[u64]) -> Result<(), Error> {
        let Some(dst) = first_word
            .checked_add(words.len())
            .and_then(|end| self.words.get(first_word..end))
        else {
            return Err(Error::OutOfRange {
                start: first_word.saturating_mul(BITS_PER_WORD),
                len: words.len().saturating_mul(BITS_PER_WORD),
                size: self.words.len().saturating_mul(BITS_PER_WORD),
            });
        };
        for (i, (d, &w)) in dst.iter().zip(words).enumerate() {
            let w = w & valid_mask(first_word + i, self.len);
            if w != 0 {
                d.fetch_or(w, RMW);
            }
        }
        Ok(())
    }

    /// ORs bits `src[0..nbits)` into this map's bits `[start, start + nbits)`,
    /// for any (also unaligned) `start`: the atomic counterpart of
    /// [`copy_with_dst_offset`](crate::copy_with_dst_offset) that ORs instead
    /// of overwriting. Each destination word is one atomic `fetch_or`, skipped
    /// when nothing is to be set in it; source bits at or past `nbits` are
    /// ignored.
    ///
    /// # Panics
    ///
    /// Panics if `start + nbits > len()` (or overflows) or if `src` holds fewer
    /// than `nbits` bits.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(200);
    /// map.or_bits_at(62, &[0b101, u64::MAX], 3);
    /// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [62, 64]);
    /// ```
    #[track_caller]
    pub fn or_bits_at(&self, start: usize, src: &[u64], nbits: usize) {
        let end = self.check_range(start, nbits);
        if let Err(e) = check_range_words(0, nbits, src.len()) {
            panic!("or_bits_at: source: {e}");
        }
        let first = start / BITS_PER_WORD;
        let off = start % BITS_PER_WORD;
        let get = |k: usize| src.get(k).copied().unwrap_or(0);
        for_each_word_in_range(start, end, |i, m| {
            let k = i - first;
            let v = if off == 0 {
                get(k)
            } else {
                let lo = if k == 0 {
                    0
                } else {
                    get(k - 1) >> (BITS_PER_WORD - off)
                };
                lo | (get(k) << off)
            } & m;
            if v != 0 {
                self.words[i].fetch_or(v, RMW);
            }
        });
    }

    /// Takes (reads and clears) bits `[start, start + len)`, atomically per
    /// word, and returns them as a bitmap of `len` bits whose bit 0 is bit
    /// `start` of this map. Bits outside the range are not touched, even in
    /// the partial first and last words (those use `fetch_and` with the range
    /// mask; inner words use `swap(0)`). A bit set concurrently is either in
    /// the result or still in the map afterwards, never lost.
    ///
    /// # Panics
    ///
    /// Panics if `start + len > self.len()` (or overflows).
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(200);
    /// map.set(60);
    /// map.set(70);
    /// map.set(150);
    /// let taken = map.take_range(61, 100);
    /// assert_eq!(taken.len(), 100);
    /// assert_eq!(taken.iter_ones().collect::<Vec<_>>(), [9, 89]);
    /// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [60]);
    /// ```
    #[track_caller]
    pub fn take_range(&self, start: usize, len: usize) -> Bitmap {
        let end = self.check_range(start, len);
        let mut out = Bitmap::new(len);
        let first = start / BITS_PER_WORD;
        let off = start % BITS_PER_WORD;
        let dst = out.as_words_mut();
        for_each_word_in_range(start, end, |i, m| {
            let taken = if m == !0 {
                self.words[i].swap(0, RMW)
            } else {
                self.words[i].fetch_and(!m, RMW) & m
            };
            if taken == 0 {
                return;
            }
            // Bit b of word i is bit (i - first) * 64 + b - off of the result.
            let k = i - first;
            if off == 0 {
                dst[k] = taken;
            } else {
                if k > 0 {
                    dst[k - 1] |= taken << (BITS_PER_WORD - off);
                }
                if let Some(d) = dst.get_mut(k) {
                    *d |= taken >> off;
                }
            }
        });
        out
    }

    /// Takes (reads and clears) every bit, atomically per word; same as
    /// [`take_range(0, len())`](Self::take_range).
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(70);
    /// map.set(69);
    /// assert_eq!(map.take_all().iter_ones().collect::<Vec<_>>(), [69]);
    /// assert_eq!(map.count_ones(), 0);
    /// ```
    pub fn take_all(&self) -> Bitmap {
        let words = self.words.iter().map(|w| w.swap(0, RMW)).collect();
        Bitmap::from_words(words, self.len).expect("word count matches length")
    }

    /// Moves the `nbits` bits from word `first_word` on (bit `first_word * 64`) into the first
    /// `nbits` bits of `dest`: each word is taken with one atomic exchange (a bit set
    /// concurrently is either moved or stays here) and OR-ed into `dest`; zero words cost one
    /// load. Returns how many moved bits were not already set in `dest`. With `clear`, marks the
    /// chunk of every moved bit ([`ClearBitmap`]: what a migration re-arms before it reads).
    ///
    /// This is a migration's sync of one block whose dirty bits were collected here (a KVM
    /// GET folded with [`or_words_at`](Self::or_words_at), a VMM's device writes): the block
    /// starts at word `first_word` and has `nbits` pages.
    ///
    /// # Errors
    ///
    /// Nothing is moved when the range leaves this map ([`Error::OutOfRange`]), `dest` has fewer
    /// than `nbits` bits or `clear` fewer chunks than `nbits` pages need
    /// ([`Error::LengthMismatch`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::{AtomicBitmap, Bitmap, ClearBitmap};
    ///
    /// let collected = AtomicBitmap::new(1024); // two blocks of 512 pages
    /// collected.set(512 + 1);
    /// collected.set(512 + 130);
    /// let mut to_send = Bitmap::new(512);
    /// to_send.set(1); // already known dirty
    /// let mut clear = ClearBitmap::new(512, 6).unwrap();
    /// let new = collected.take_into(512 / 64, 512, &mut to_send, Some(&mut clear)).unwrap();
    /// assert_eq!(new, 1);
    /// assert_eq!(to_send.iter_ones().collect::<Vec<_>>(), [1, 130]);
    /// assert!(clear.test(0) && clear.test(2) && clear.pending() == 2);
    /// assert_eq!(collected.count_ones(), 0);
    /// ```
    pub fn take_into(
        &self,
        first_word: usize,
        nbits: usize,
        dest: &mut Bitmap,
        mut clear: Option<&mut ClearBitmap>,
    ) -> Result<u64, Error> {
        let start = first_word
            .checked_mul(BITS_PER_WORD)
            .ok_or(Error::OutOfRange {
                start: usize::MAX,
                len: nbits,
                size: self.len,
            })?;
        check_range(start, nbits, self.len)?;
        if dest.len() < nbits {
            return Err(Error::LengthMismatch {
                expected: nbits,
                actual: dest.len(),
            });
        }
        if let Some(c) = clear.as_deref() {
            let need = (nbits as u64).div_ceil(1u64 << c.shift());
            if c.chunk_count() < need {
                return Err(Error::LengthMismatch {
                    expected: usize::try_from(need).unwrap_or(usize::MAX),
                    actual: usize::try_from(c.chunk_count()).unwrap_or(usize::MAX),
                });
            }
        }
        let nwords = words_for_bits(nbits);
        let tail = nbits % BITS_PER_WORD;
        let words = &self.words[first_word..first_word + nwords];
        let mut newly = 0;
        for (i, (word, dest)) in words.iter().zip(dest.as_words_mut()).enumerate() {
            if word.load(LOAD) == 0 {
                continue;
            }
            let taken = if i + 1 == nwords && tail != 0 {
                let mask = low_mask(tail);
                word.fetch_and(!mask, RMW) & mask
            } else {
                word.swap(0, RMW)
            };
            let old = *dest;
            *dest = old | taken;
            newly += u64::from((taken & !old).count_ones());
            if let Some(c) = clear.as_deref_mut() {
                c.mark_word(i, taken);
            }
        }
        Ok(newly)
    }

    /// Returns the number of bits set, counting one word at a time (not an
    /// atomic snapshot of the whole map).
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(100);
    /// map.set_range(0, 100);
    /// assert_eq!(map.count_ones(), 100);
    /// ```
    pub fn count_ones(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(LOAD).count_ones() as usize)
            .sum()
    }

    /// Returns the index of the lowest bit set at or after `from`, loading
    /// one word at a time, or `None`. `from >= len()` returns `None`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(300);
    /// map.set(250);
    /// assert_eq!(map.find_next_set(0), Some(250));
    /// assert_eq!(map.find_next_set(251), None);
    /// ```
    pub fn find_next_set(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let mut idx = from / BITS_PER_WORD;
        let mut w = self.words[idx].load(LOAD) & (!0u64 << (from % BITS_PER_WORD));
        loop {
            if w != 0 {
                return Some(idx * BITS_PER_WORD + w.trailing_zeros() as usize);
            }
            idx += 1;
            w = self.words.get(idx)?.load(LOAD);
        }
    }

    /// Returns an iterator over the indices of set bits in increasing order.
    /// Each word is loaded once, when the iterator reaches it, so concurrent
    /// changes to words not yet reached are seen.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(300);
    /// map.set(1);
    /// map.set(299);
    /// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [1, 299]);
    /// ```
    pub fn iter_ones(&self) -> AtomicIterOnes<'_> {
        AtomicIterOnes {
            words: &self.words,
            idx: 0,
            cur: self.words.first().map_or(0, |w| w.load(LOAD)),
        }
    }

    /// Returns a copy of the bits, loaded one word at a time (not an atomic
    /// snapshot of the whole map). Nothing is cleared.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(70);
    /// map.set(69);
    /// let snap = map.snapshot();
    /// assert!(snap.test(69));
    /// assert!(map.test(69));
    /// ```
    pub fn snapshot(&self) -> Bitmap {
        let words = self.words.iter().map(|w| w.load(LOAD)).collect();
        Bitmap::from_words(words, self.len).expect("word count matches length")
    }

    /// Clears every bit (one atomic store per word).
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::AtomicBitmap::new(70);
    /// map.set_range(0, 70);
    /// map.clear_all();
    /// assert_eq!(map.count_ones(), 0);
    /// ```
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, STORE);
        }
    }
}

impl From<Bitmap> for AtomicBitmap {
    /// Converts an owned bitmap into an atomic one with the same bits.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::{AtomicBitmap, Bitmap};
    ///
    /// let map = AtomicBitmap::from(Bitmap::new_filled(5));
    /// assert_eq!(map.count_ones(), 5);
    /// ```
    fn from(map: Bitmap) -> Self {
        let len = map.len();
        AtomicBitmap {
            words: map.into_words().into_iter().map(AtomicU64::new).collect(),
            len,
        }
    }
}

/// Iterator over the indices of the set bits of an [`AtomicBitmap`], in
/// increasing order; returned by [`AtomicBitmap::iter_ones`].
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::{AtomicBitmap, AtomicIterOnes};
///
/// let map = AtomicBitmap::new(10);
/// map.set(4);
/// let it: AtomicIterOnes<'_> = map.iter_ones();
/// assert_eq!(it.collect::<Vec<_>>(), [4]);
/// ```
#[derive(Debug)]
pub struct AtomicIterOnes<'a> {
    words: &'a [AtomicU64],
    /// Index of the word `cur` was loaded from.
    idx: usize,
    /// Bits of the loaded word not yet returned.
    cur: u64,
}

impl Iterator for AtomicIterOnes<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.cur == 0 {
            if self.idx + 1 >= self.words.len() {
                self.idx = self.words.len();
                return None;
            }
            self.idx += 1;
            self.cur = self.words[self.idx].load(LOAD);
        }
        let bit = self.cur.trailing_zeros() as usize;
        self.cur &= self.cur - 1;
        Some(self.idx * BITS_PER_WORD + bit)
    }
}

impl FusedIterator for AtomicIterOnes<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let m = AtomicBitmap::new(130);
        assert_eq!(m.len(), 130);
        assert!(!m.is_empty());
        for b in [0, 63, 64, 129] {
            m.set(b);
            assert!(m.test(b));
        }
        assert_eq!(m.count_ones(), 4);
        m.clear(63);
        assert!(!m.test(63));
        assert!(m.test_and_clear(129));
        assert!(!m.test_and_clear(129));
        assert_eq!(m.snapshot().as_words(), &[1, 1, 0]);
    }

    #[test]
    #[should_panic(expected = "bit 130 out of range for bitmap of 130 bits")]
    fn set_out_of_range() {
        AtomicBitmap::new(130).set(130);
    }

    #[test]
    #[should_panic(expected = "word 2 out of range for bitmap of 2 words")]
    fn word_out_of_range() {
        AtomicBitmap::new(128).load_word(2);
    }

    #[test]
    #[should_panic(expected = "or_words_at: bit range of 128 bits at 64 out of range")]
    fn or_words_out_of_range() {
        AtomicBitmap::new(128).or_words_at(1, &[0, 0]);
    }

    #[test]
    #[should_panic(expected = "bit range of 2 bits at 127 out of range for bitmap of 128 bits")]
    fn take_out_of_range() {
        AtomicBitmap::new(128).take_range(127, 2);
    }

    #[test]
    fn tail_bits_stay_zero() {
        let m = AtomicBitmap::new(65);
        m.fetch_or_word(1, !0);
        assert_eq!(m.load_word(1), 1);
        m.swap_word(1, !0);
        assert_eq!(m.load_word(1), 1);
        m.or_words_at(0, &[!0, !0]);
        assert_eq!(m.count_ones(), 65);
        assert_eq!(m.find_next_set(65), None);
        assert_eq!(m.take_word(1), 1);
        m.fetch_and_word(0, 0xf0);
        assert_eq!(m.load_word(0), 0xf0);
    }

    #[test]
    fn ranges() {
        let m = AtomicBitmap::new(300);
        m.set_range(3, 290);
        assert_eq!(m.count_ones(), 290);
        m.clear_range(64, 128);
        assert_eq!(m.count_ones(), 162);
        assert_eq!(m.find_next_set(64), Some(192));
        m.set_range(0, 0);
        m.clear_range(300, 0);
        assert_eq!(m.count_ones(), 162);
        m.clear_all();
        assert_eq!(m.count_ones(), 0);
        assert_eq!(m.iter_ones().next(), None);
    }

    #[test]
    fn take_range_unaligned() {
        let m = AtomicBitmap::new(256);
        m.set_range(0, 256);
        let t = m.take_range(63, 66);
        assert_eq!(t, Bitmap::new_filled(66));
        assert_eq!(m.count_ones(), 190);
        assert!(m.test(62));
        assert!(!m.test(63));
        assert!(!m.test(128));
        assert!(m.test(129));
        let t = m.take_range(0, 0);
        assert!(t.is_empty());
        let t = m.take_range(129, 127);
        assert_eq!(t.count_ones(), 127);
        assert_eq!(m.count_ones(), 63);
        assert_eq!(m.take_all().count_ones(), 63);
    }

    #[test]
    fn or_bits_unaligned() {
        let m = AtomicBitmap::new(256);
        m.or_bits_at(1, &[!0, !0, !0], 190);
        assert_eq!(m.count_ones(), 190);
        assert_eq!(m.find_next_set(0), Some(1));
        assert!(!m.test(191));
        m.or_bits_at(0, &[], 0);
        m.or_bits_at(256, &[], 0);
    }

    #[test]
    fn from_bitmap() {
        let mut b = Bitmap::new(100);
        b.set(99);
        let m = AtomicBitmap::from(b.clone());
        assert_eq!(m.snapshot(), b);
        assert!(AtomicBitmap::new(0).is_empty());
        assert_eq!(AtomicBitmap::new(0).take_all(), Bitmap::new(0));
    }
}
