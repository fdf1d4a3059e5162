// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The owned, single-threaded [`Bitmap`].

use std::iter::FusedIterator;

use crate::word::{
    bit_pos, check_range, for_each_word_in_range, low_mask, words_for_bits, BITS_PER_WORD,
};
use crate::Error;

/// An owned bitmap of `len` bits stored in KVM's layout.
///
/// Bit `i` is bit `i % 64` of word `i / 64`, so [`as_words`](Self::as_words)
/// can be handed to (or filled by) `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG`
/// without conversion.
///
/// Invariant: the bits past `len` in the last word are always zero. Every
/// method keeps it; only [`as_words_mut`](Self::as_words_mut) can break it,
/// and [`mask_tail`](Self::mask_tail) restores it. Equality compares lengths
/// and words, so it relies on this invariant too.
///
/// Index errors (a bit or range past `len`, or two bitmaps of different
/// lengths combined) are programming errors and panic with a message naming
/// the index and the size, like slice indexing.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::Bitmap;
///
/// let mut map = Bitmap::new(100);
/// map.set(3);
/// map.set_range(64, 4);
/// assert_eq!(map.as_words(), &[1 << 3, 0b1111]);
/// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [3, 64, 65, 66, 67]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bitmap {
    words: Vec<u64>,
    len: usize,
}

impl Bitmap {
    /// Creates a bitmap of `len` bits, all zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let map = Bitmap::new(65);
    /// assert_eq!(map.len(), 65);
    /// assert_eq!(map.as_words(), &[0, 0]);
    /// ```
    pub fn new(len: usize) -> Self {
        Bitmap {
            words: vec![0; words_for_bits(len)],
            len,
        }
    }

    /// Creates a bitmap of `len` bits, all one. The bits past `len` in the last
    /// word stay zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let map = Bitmap::new_filled(66);
    /// assert_eq!(map.as_words(), &[u64::MAX, 0b11]);
    /// assert_eq!(map.count_ones(), 66);
    /// ```
    pub fn new_filled(len: usize) -> Self {
        let mut map = Bitmap {
            words: vec![!0; words_for_bits(len)],
            len,
        };
        map.mask_tail();
        map
    }

    /// Wraps `words` as a bitmap of `len` bits, clearing any bits past `len`
    /// in the last word.
    ///
    /// # Errors
    ///
    /// Returns [`Error::LengthMismatch`] (in words) if `words.len()` is not
    /// exactly [`words_for_bits(len)`](crate::words_for_bits).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::{Bitmap, Error};
    ///
    /// let map = Bitmap::from_words(vec![u64::MAX, u64::MAX], 68)?;
    /// assert_eq!(map.as_words(), &[u64::MAX, 0xf]);
    ///
    /// assert_eq!(
    ///     Bitmap::from_words(vec![0], 65),
    ///     Err(Error::LengthMismatch { expected: 2, actual: 1 })
    /// );
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_words(words: Vec<u64>, len: usize) -> Result<Self, Error> {
        let expected = words_for_bits(len);
        if words.len() != expected {
            return Err(Error::LengthMismatch {
                expected,
                actual: words.len(),
            });
        }
        let mut map = Bitmap { words, len };
        map.mask_tail();
        Ok(map)
    }

    /// Consumes the bitmap and returns its words (tail bits zero).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// assert_eq!(Bitmap::new_filled(3).into_words(), vec![0b111]);
    /// ```
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    /// Returns the number of bits.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::Bitmap::new(10).len(), 10);
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns `true` if the bitmap has no bits at all (`len() == 0`; this
    /// says nothing about the bits' values).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// assert!(Bitmap::new(0).is_empty());
    /// assert!(!Bitmap::new(1).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the number of words, [`words_for_bits(len())`](crate::words_for_bits).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::Bitmap::new(129).word_count(), 3);
    /// ```
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Returns the words in KVM layout; bits past `len()` are zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let mut map = Bitmap::new(128);
    /// map.set(127);
    /// assert_eq!(map.as_words(), &[0, 1 << 63]);
    /// ```
    pub fn as_words(&self) -> &[u64] {
        &self.words
    }

    /// Returns the words mutably, e.g. for the kernel to fill.
    ///
    /// The caller must leave the bits past `len()` in the last word zero, or
    /// call [`mask_tail`](Self::mask_tail) afterwards: other methods (counts,
    /// finds, equality) assume they are zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let mut map = Bitmap::new(4);
    /// map.as_words_mut()[0] = u64::MAX; // sets bits past len()...
    /// map.mask_tail(); // ...so restore the invariant
    /// assert_eq!(map.as_words(), &[0xf]);
    /// ```
    pub fn as_words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Clears the bits past `len()` in the last word.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let mut map = Bitmap::new(1);
    /// map.as_words_mut()[0] = 0b110;
    /// map.mask_tail();
    /// assert_eq!(map.count_ones(), 0);
    /// ```
    pub fn mask_tail(&mut self) {
        let rem = self.len % BITS_PER_WORD;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= low_mask(rem);
            }
        }
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
    fn check_same_len(&self, other: &Bitmap) {
        assert!(
            self.len == other.len,
            "bitmap length mismatch: {} bits vs {} bits",
            self.len,
            other.len
        );
    }

    /// Sets bit `bit` to one.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`, e.g. "bit 70 out of range for bitmap of 64 bits".
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(64);
    /// map.set(5);
    /// assert!(map.test(5));
    /// ```
    #[track_caller]
    pub fn set(&mut self, bit: usize) {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        self.words[w] |= m;
    }

    /// Clears bit `bit` to zero.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new_filled(64);
    /// map.clear(5);
    /// assert!(!map.test(5));
    /// ```
    #[track_caller]
    pub fn clear(&mut self, bit: usize) {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        self.words[w] &= !m;
    }

    /// Returns the value of bit `bit`.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::Bitmap::new_filled(3);
    /// assert!(map.test(2));
    /// ```
    #[track_caller]
    pub fn test(&self, bit: usize) -> bool {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        self.words[w] & m != 0
    }

    /// Clears bit `bit` and returns its previous value.
    ///
    /// # Panics
    ///
    /// Panics if `bit >= len()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(8);
    /// map.set(1);
    /// assert!(map.test_and_clear(1));
    /// assert!(!map.test_and_clear(1));
    /// ```
    #[track_caller]
    pub fn test_and_clear(&mut self, bit: usize) -> bool {
        self.check_bit(bit);
        let (w, m) = bit_pos(bit);
        let old = self.words[w];
        self.words[w] = old & !m;
        old & m != 0
    }

    /// Sets bits `[start, start + len)` to one, a word at a time.
    ///
    /// # Panics
    ///
    /// Panics if `start + len > self.len()` (or overflows).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(130);
    /// map.set_range(60, 70);
    /// assert_eq!(map.count_ones(), 70);
    /// assert_eq!(map.find_first_set(), Some(60));
    /// ```
    #[track_caller]
    pub fn set_range(&mut self, start: usize, len: usize) {
        let end = self.check_range(start, len);
        let words = &mut self.words;
        for_each_word_in_range(start, end, |i, m| words[i] |= m);
    }

    /// Clears bits `[start, start + len)` to zero, a word at a time.
    ///
    /// # Panics
    ///
    /// Panics if `start + len > self.len()` (or overflows).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new_filled(130);
    /// map.clear_range(1, 128);
    /// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [0, 129]);
    /// ```
    #[track_caller]
    pub fn clear_range(&mut self, start: usize, len: usize) {
        let end = self.check_range(start, len);
        let words = &mut self.words;
        for_each_word_in_range(start, end, |i, m| words[i] &= !m);
    }

    /// Sets every bit to `value` (tail bits stay zero).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(70);
    /// map.fill(true);
    /// assert_eq!(map.count_ones(), 70);
    /// map.fill(false);
    /// assert_eq!(map.count_ones(), 0);
    /// ```
    pub fn fill(&mut self, value: bool) {
        self.words.fill(if value { !0 } else { 0 });
        self.mask_tail();
    }

    /// Returns the number of bits set.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_bitmap::Bitmap::new_filled(100).count_ones(), 100);
    /// ```
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Returns the number of bits set in `[start, start + len)`.
    ///
    /// # Panics
    ///
    /// Panics if `start + len > self.len()` (or overflows).
    ///
    /// # Examples
    ///
    /// ```
    /// let map = clearlog_bitmap::Bitmap::new_filled(200);
    /// assert_eq!(map.count_ones_in(10, 100), 100);
    /// assert_eq!(map.count_ones_in(200, 0), 0);
    /// ```
    #[track_caller]
    pub fn count_ones_in(&self, start: usize, len: usize) -> usize {
        let end = self.check_range(start, len);
        let mut n = 0;
        for_each_word_in_range(start, end, |i, m| {
            n += (self.words[i] & m).count_ones() as usize;
        });
        n
    }

    /// Returns `true` if no bit in `[start, start + len)` is set (also for an
    /// empty range).
    ///
    /// # Panics
    ///
    /// Panics if `start + len > self.len()` (or overflows).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(200);
    /// map.set(150);
    /// assert!(map.is_range_clear(0, 150));
    /// assert!(!map.is_range_clear(100, 51));
    /// ```
    #[track_caller]
    pub fn is_range_clear(&self, start: usize, len: usize) -> bool {
        let end = self.check_range(start, len);
        let mut any = 0;
        for_each_word_in_range(start, end, |i, m| any |= self.words[i] & m);
        any == 0
    }

    /// Returns the index of the lowest set bit, or `None` if all are zero.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(300);
    /// assert_eq!(map.find_first_set(), None);
    /// map.set(299);
    /// assert_eq!(map.find_first_set(), Some(299));
    /// ```
    pub fn find_first_set(&self) -> Option<usize> {
        self.find_next_set(0)
    }

    /// Returns the index of the lowest set bit at or after `from`, or `None` if
    /// there is none. `from >= len()` is allowed and returns `None`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(300);
    /// map.set(10);
    /// map.set(200);
    /// assert_eq!(map.find_next_set(10), Some(10));
    /// assert_eq!(map.find_next_set(11), Some(200));
    /// assert_eq!(map.find_next_set(201), None);
    /// assert_eq!(map.find_next_set(1000), None);
    /// ```
    pub fn find_next_set(&self, from: usize) -> Option<usize> {
        find_next(&self.words, self.len, from, |w| w)
    }

    /// Returns the index of the lowest zero bit at or after `from`, or `None` if
    /// there is none below `len()`. `from >= len()` is allowed and returns
    /// `None`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new_filled(130);
    /// assert_eq!(map.find_next_zero(0), None);
    /// map.clear(129);
    /// assert_eq!(map.find_next_zero(3), Some(129));
    /// ```
    pub fn find_next_zero(&self, from: usize) -> Option<usize> {
        find_next(&self.words, self.len, from, |w| !w)
    }

    /// Returns an iterator over the indices of the set bits, in increasing
    /// order, skipping zero words a word at a time.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut map = clearlog_bitmap::Bitmap::new(1000);
    /// map.set(999);
    /// map.set(0);
    /// assert_eq!(map.iter_ones().collect::<Vec<_>>(), [0, 999]);
    /// ```
    pub fn iter_ones(&self) -> IterOnes<'_> {
        IterOnes {
            words: &self.words,
            idx: 0,
            cur: self.words.first().copied().unwrap_or(0),
        }
    }

    /// `self |= other`, a word at a time.
    ///
    /// # Panics
    ///
    /// Panics if the two bitmaps have different lengths.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let mut a = Bitmap::from_words(vec![0b0011], 4).unwrap();
    /// let b = Bitmap::from_words(vec![0b0101], 4).unwrap();
    /// a.or_assign(&b);
    /// assert_eq!(a.as_words(), &[0b0111]);
    /// ```
    #[track_caller]
    pub fn or_assign(&mut self, other: &Bitmap) {
        self.check_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// `self &= other`, a word at a time.
    ///
    /// # Panics
    ///
    /// Panics if the two bitmaps have different lengths.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let mut a = Bitmap::from_words(vec![0b0011], 4).unwrap();
    /// let b = Bitmap::from_words(vec![0b0101], 4).unwrap();
    /// a.and_assign(&b);
    /// assert_eq!(a.as_words(), &[0b0001]);
    /// ```
    #[track_caller]
    pub fn and_assign(&mut self, other: &Bitmap) {
        self.check_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= b;
        }
    }

    /// `self &= !other` (clears in `self` every bit set in `other`), a word at
    /// a time.
    ///
    /// # Panics
    ///
    /// Panics if the two bitmaps have different lengths.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_bitmap::Bitmap;
    ///
    /// let mut a = Bitmap::from_words(vec![0b0011], 4).unwrap();
    /// let b = Bitmap::from_words(vec![0b0101], 4).unwrap();
    /// a.and_not_assign(&b);
    /// assert_eq!(a.as_words(), &[0b0010]);
    /// ```
    #[track_caller]
    pub fn and_not_assign(&mut self, other: &Bitmap) {
        self.check_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }
}

/// Finds the first bit at or after `from` (and below `len`) that is set in
/// `f(word)`, a word at a time.
#[inline]
fn find_next(words: &[u64], len: usize, from: usize, f: impl Fn(u64) -> u64) -> Option<usize> {
    if from >= len {
        return None;
    }
    let mut idx = from / BITS_PER_WORD;
    let mut w = f(words[idx]) & (!0u64 << (from % BITS_PER_WORD));
    loop {
        if w != 0 {
            let bit = idx * BITS_PER_WORD + w.trailing_zeros() as usize;
            // For find_next_zero, the (zero) tail bits read as one.
            return (bit < len).then_some(bit);
        }
        idx += 1;
        w = f(*words.get(idx)?);
    }
}

/// Iterator over the indices of the set bits of a [`Bitmap`], in increasing
/// order; returned by [`Bitmap::iter_ones`].
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::{Bitmap, IterOnes};
///
/// let map = Bitmap::new_filled(2);
/// let it: IterOnes<'_> = map.iter_ones();
/// assert_eq!(it.collect::<Vec<_>>(), [0, 1]);
/// ```
#[derive(Clone, Debug)]
pub struct IterOnes<'a> {
    words: &'a [u64],
    /// Index of the word `cur` came from.
    idx: usize,
    /// Bits of `words[idx]` not yet returned.
    cur: u64,
}

impl Iterator for IterOnes<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.cur == 0 {
            if self.idx + 1 >= self.words.len() {
                self.idx = self.words.len();
                return None;
            }
            self.idx += 1;
            self.cur = self.words[self.idx];
        }
        let bit = self.cur.trailing_zeros() as usize;
        self.cur &= self.cur - 1;
        Some(self.idx * BITS_PER_WORD + bit)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Cheap bounds: exact for the current word, at most 64 per later word.
        let here = self.cur.count_ones() as usize;
        let later = self.words.len().saturating_sub(self.idx + 1);
        (here, here.checked_add(later.saturating_mul(BITS_PER_WORD)))
    }
}

impl FusedIterator for IterOnes<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_and_filled() {
        for len in [0, 1, 63, 64, 65, 128, 129] {
            let z = Bitmap::new(len);
            assert_eq!(z.len(), len);
            assert_eq!(z.word_count(), words_for_bits(len));
            assert_eq!(z.count_ones(), 0);
            let f = Bitmap::new_filled(len);
            assert_eq!(f.count_ones(), len);
            assert_eq!(f.find_next_zero(0), None);
            if len % 64 != 0 {
                assert_eq!(f.as_words().last().unwrap() >> (len % 64), 0);
            }
        }
    }

    #[test]
    fn from_words_masks_tail() {
        let m = Bitmap::from_words(vec![!0, !0], 65).unwrap();
        assert_eq!(m.as_words(), &[!0, 1]);
        assert_eq!(m, Bitmap::new_filled(65));
        assert_eq!(Bitmap::from_words(vec![], 0).unwrap(), Bitmap::new(0));
        assert_eq!(
            Bitmap::from_words(vec![0], 0),
            Err(Error::LengthMismatch {
                expected: 0,
                actual: 1
            })
        );
    }

    #[test]
    fn single_bits() {
        let mut m = Bitmap::new(130);
        for b in [0, 63, 64, 129] {
            assert!(!m.test(b));
            m.set(b);
            assert!(m.test(b));
        }
        assert_eq!(m.as_words(), &[1 | 1 << 63, 1, 1 << 1]);
        m.clear(63);
        assert!(!m.test(63));
        assert!(m.test_and_clear(129));
        assert!(!m.test_and_clear(129));
        assert_eq!(m.as_words(), &[1, 1, 0]);
    }

    #[test]
    #[should_panic(expected = "bit 70 out of range for bitmap of 64 bits")]
    fn set_out_of_range() {
        Bitmap::new(64).set(70);
    }

    #[test]
    #[should_panic(expected = "bit 0 out of range for bitmap of 0 bits")]
    fn test_out_of_range() {
        Bitmap::new(0).test(0);
    }

    #[test]
    #[should_panic(expected = "bit range of 2 bits at 63 out of range for bitmap of 64 bits")]
    fn range_out_of_range() {
        Bitmap::new(64).set_range(63, 2);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn range_overflow() {
        Bitmap::new(64).clear_range(usize::MAX, 2);
    }

    #[test]
    #[should_panic(expected = "bitmap length mismatch: 3 bits vs 4 bits")]
    fn or_length_mismatch() {
        Bitmap::new(3).or_assign(&Bitmap::new(4));
    }

    #[test]
    fn ranges() {
        let mut m = Bitmap::new(200);
        m.set_range(0, 0);
        m.set_range(200, 0);
        assert_eq!(m.count_ones(), 0);
        m.set_range(5, 190);
        assert_eq!(m.count_ones(), 190);
        assert_eq!(m.count_ones_in(0, 10), 5);
        assert_eq!(m.find_first_set(), Some(5));
        assert_eq!(m.find_next_zero(5), Some(195));
        m.clear_range(64, 64);
        assert_eq!(m.as_words()[1], 0);
        assert!(m.is_range_clear(64, 64));
        assert!(!m.is_range_clear(63, 2));
        assert!(m.is_range_clear(0, 5));
        assert!(m.is_range_clear(0, 0));
    }

    #[test]
    fn fill_keeps_tail() {
        let mut m = Bitmap::new(3);
        m.fill(true);
        assert_eq!(m.as_words(), &[0b111]);
        m.fill(false);
        assert_eq!(m.as_words(), &[0]);
    }

    #[test]
    fn finds() {
        let mut m = Bitmap::new(129);
        assert_eq!(m.find_first_set(), None);
        assert_eq!(m.find_next_zero(128), Some(128));
        assert_eq!(m.find_next_zero(129), None);
        m.set(128);
        assert_eq!(m.find_next_set(1), Some(128));
        assert_eq!(m.find_next_set(128), Some(128));
        assert_eq!(m.find_next_set(129), None);
        assert_eq!(m.find_next_zero(128), None);
        assert_eq!(Bitmap::new(0).find_next_zero(0), None);
    }

    #[test]
    fn iter() {
        assert_eq!(Bitmap::new(0).iter_ones().next(), None);
        let mut m = Bitmap::new(300);
        for b in [0, 1, 63, 64, 200, 299] {
            m.set(b);
        }
        assert_eq!(m.iter_ones().size_hint(), (3, Some(3 + 4 * 64)));
        assert_eq!(m.iter_ones().collect::<Vec<_>>(), [0, 1, 63, 64, 200, 299]);
        let mut it = m.iter_ones().skip(6);
        assert_eq!(it.next(), None);
        assert_eq!(it.next(), None);
    }

    #[test]
    fn logic() {
        let a0 = Bitmap::from_words(vec![0b1100, !0], 70).unwrap();
        let b = Bitmap::from_words(vec![0b1010, 1], 70).unwrap();
        let mut a = a0.clone();
        a.or_assign(&b);
        assert_eq!(a.as_words(), &[0b1110, 0x3f]);
        let mut a = a0.clone();
        a.and_assign(&b);
        assert_eq!(a.as_words(), &[0b1000, 1]);
        let mut a = a0;
        a.and_not_assign(&b);
        assert_eq!(a.as_words(), &[0b0100, 0x3e]);
    }
}
