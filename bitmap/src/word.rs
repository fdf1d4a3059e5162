// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Word layout helpers shared by the owned bitmap, the atomic bitmap and the copies.
//!
//! The layout is KVM's: bit `i` of a map is bit `i % 64` of little-endian word `i / 64`.

use crate::Error;

/// Number of bits in one bitmap word.
///
/// # Examples
///
/// ```
/// assert_eq!(clearlog_bitmap::BITS_PER_WORD, 64);
/// ```
pub const BITS_PER_WORD: usize = u64::BITS as usize;

/// Number of `u64` words needed to hold `nbits` bits (`ceil(nbits / 64)`).
///
/// Never overflows, for any `nbits`.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::words_for_bits;
///
/// assert_eq!(words_for_bits(0), 0);
/// assert_eq!(words_for_bits(1), 1);
/// assert_eq!(words_for_bits(64), 1);
/// assert_eq!(words_for_bits(65), 2);
/// assert_eq!(words_for_bits(usize::MAX), usize::MAX / 64 + 1);
/// ```
#[inline]
pub const fn words_for_bits(nbits: usize) -> usize {
    nbits.div_ceil(BITS_PER_WORD)
}

/// A mask with the low `n` bits set, for `n` in `0..=64`.
#[inline(always)]
pub(crate) const fn low_mask(n: usize) -> u64 {
    if n >= BITS_PER_WORD {
        !0
    } else {
        (1u64 << n) - 1
    }
}

/// Word index and single-bit mask of `bit`.
#[inline(always)]
pub(crate) const fn bit_pos(bit: usize) -> (usize, u64) {
    (bit / BITS_PER_WORD, 1u64 << (bit % BITS_PER_WORD))
}

/// Mask of the valid bits of word `idx` in a map of `len` bits (all ones except
/// for a partial last word).
#[inline(always)]
pub(crate) const fn valid_mask(idx: usize, len: usize) -> u64 {
    let first_bit = idx * BITS_PER_WORD;
    if len >= first_bit + BITS_PER_WORD {
        !0
    } else if len <= first_bit {
        0
    } else {
        low_mask(len - first_bit)
    }
}

/// Checks that `[start, start + len)` lies within `size` bits and returns the
/// exclusive end of the range.
#[inline]
pub(crate) fn check_range(start: usize, len: usize, size: usize) -> Result<usize, Error> {
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(end),
        _ => Err(Error::OutOfRange { start, len, size }),
    }
}

/// Like [`check_range`] but against a word slice of `words` words, without
/// overflowing when `words * 64` does not fit a `usize`.
#[inline]
pub(crate) fn check_range_words(start: usize, len: usize, words: usize) -> Result<usize, Error> {
    match start.checked_add(len) {
        Some(end) if words_for_bits(end) <= words => Ok(end),
        _ => Err(Error::OutOfRange {
            start,
            len,
            size: words.saturating_mul(BITS_PER_WORD),
        }),
    }
}

/// Calls `f(word_index, mask)` for every word overlapping the bit range
/// `[start, end)`, where `mask` selects the bits of that word inside the range.
/// Middle words get a constant all-ones mask so the inlined loop is word-wide.
/// Does nothing for an empty range.
#[inline(always)]
pub(crate) fn for_each_word_in_range(start: usize, end: usize, mut f: impl FnMut(usize, u64)) {
    if start >= end {
        return;
    }
    let first = start / BITS_PER_WORD;
    let last = (end - 1) / BITS_PER_WORD;
    let head = !0u64 << (start % BITS_PER_WORD);
    let tail = low_mask(end - last * BITS_PER_WORD);
    if first == last {
        f(first, head & tail);
        return;
    }
    f(first, head);
    for idx in first + 1..last {
        f(idx, !0);
    }
    f(last, tail);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(low_mask(0), 0);
        assert_eq!(low_mask(1), 1);
        assert_eq!(low_mask(63), u64::MAX >> 1);
        assert_eq!(low_mask(64), u64::MAX);
        assert_eq!(bit_pos(0), (0, 1));
        assert_eq!(bit_pos(65), (1, 2));
        assert_eq!(valid_mask(0, 0), 0);
        assert_eq!(valid_mask(0, 64), !0);
        assert_eq!(valid_mask(1, 65), 1);
        assert_eq!(valid_mask(0, 65), !0);
        assert_eq!(valid_mask(2, 65), 0);
    }

    #[test]
    fn ranges() {
        assert_eq!(check_range(0, 0, 0), Ok(0));
        assert_eq!(check_range(3, 5, 8), Ok(8));
        check_range(3, 6, 8).unwrap_err();
        check_range(usize::MAX, 1, usize::MAX).unwrap_err();
        assert_eq!(check_range_words(60, 68, 2), Ok(128));
        assert_eq!(
            check_range_words(60, 69, 2),
            Err(Error::OutOfRange {
                start: 60,
                len: 69,
                size: 128
            })
        );
        check_range_words(0, 1, usize::MAX).unwrap();
    }

    #[test]
    fn word_walk() {
        let mut seen = Vec::new();
        for_each_word_in_range(3, 3, |i, m| seen.push((i, m)));
        assert!(seen.is_empty());
        for_each_word_in_range(3, 5, |i, m| seen.push((i, m)));
        assert_eq!(seen, [(0, 0b11000)]);
        seen.clear();
        for_each_word_in_range(63, 193, |i, m| seen.push((i, m)));
        assert_eq!(seen, [(0, 1 << 63), (1, !0), (2, !0), (3, 1)]);
        seen.clear();
        for_each_word_in_range(64, 128, |i, m| seen.push((i, m)));
        assert_eq!(seen, [(1, !0)]);
    }
}
