// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Bit-granular copies between word slices at arbitrary bit offsets.
//!
//! These move dirty bits between a memory slot's KVM bitmap and a region-wide
//! bitmap whose bit 0 is not the slot's bit 0. They work a word at a time
//! (two shifts and an OR per destination word) and are correct for every shift
//! and every `nbits`, including 0.
//!
//! **Bits outside the written destination range are never modified**, not even
//! rewritten with their own value, whatever the alignment: only
//! `dst[0..nbits)` (or `dst[shift..shift + nbits)`) changes. (The C code this
//! replaces once cleared the rest of a partial last word on one path, which
//! silently dropped dirty bits belonging to a neighbouring slot.)
//!
//! Each copy comes in two forms: a panicking one for callers whose sizes are
//! correct by construction (documented under `# Panics`, like slice indexing),
//! and a `try_` one returning [`Error::OutOfRange`] for sizes that come from
//! outside.

use crate::word::{check_range_words, low_mask, BITS_PER_WORD};
use crate::Error;

/// Copies bits `src[shift..shift + nbits)` to `dst[0..nbits)`.
///
/// Destination bits at or past `nbits` are never touched, and neither are
/// source bits outside the range read. `shift` may be any value, aligned or
/// not; `nbits` may be 0 (then nothing is read or written). Slices may be
/// longer than needed.
///
/// # Panics
///
/// Panics if `src` holds fewer than `shift + nbits` bits, if `dst` holds fewer
/// than `nbits` bits, or if `shift + nbits` overflows. Use
/// [`try_copy_with_src_offset`] for sizes that are not known to be valid.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::copy_with_src_offset;
///
/// let src = [0xffff_0000_0000_0000u64, 0x0000_0000_0000_00ff];
/// let mut dst = [0xaaaa_aaaa_aaaa_aaaau64];
/// // Take the 24 bits starting at bit 48 of `src`.
/// copy_with_src_offset(&mut dst, &src, 48, 24);
/// assert_eq!(dst[0], 0xaaaa_aaaa_aaff_ffff); // bits 24.. keep their old value
/// ```
#[track_caller]
pub fn copy_with_src_offset(dst: &mut [u64], src: &[u64], shift: usize, nbits: usize) {
    if let Err(e) = try_copy_with_src_offset(dst, src, shift, nbits) {
        panic!("copy_with_src_offset: {e}");
    }
}

/// Fallible version of [`copy_with_src_offset`]: copies `src[shift..shift +
/// nbits)` to `dst[0..nbits)`, never touching destination bits at or past
/// `nbits`.
///
/// # Errors
///
/// Returns [`Error::OutOfRange`] without modifying `dst` if `src` holds fewer
/// than `shift + nbits` bits (`start` = `shift`, `size` = bits in `src`), or if
/// `dst` holds fewer than `nbits` bits (`start` = 0, `size` = bits in `dst`),
/// or if `shift + nbits` overflows.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::{try_copy_with_src_offset, Error};
///
/// let src = [u64::MAX; 2];
/// let mut dst = [0u64; 2];
/// assert_eq!(try_copy_with_src_offset(&mut dst, &src, 3, 100), Ok(()));
/// assert_eq!(dst, [u64::MAX, (1 << 36) - 1]);
/// assert_eq!(
///     try_copy_with_src_offset(&mut dst, &src, 30, 100),
///     Err(Error::OutOfRange { start: 30, len: 100, size: 128 })
/// );
/// ```
pub fn try_copy_with_src_offset(
    dst: &mut [u64],
    src: &[u64],
    shift: usize,
    nbits: usize,
) -> Result<(), Error> {
    check_range_words(shift, nbits, src.len())?;
    check_range_words(0, nbits, dst.len())?;
    if nbits == 0 {
        return Ok(());
    }
    let off = shift % BITS_PER_WORD;
    let src = &src[shift / BITS_PER_WORD..];
    let full = nbits / BITS_PER_WORD;
    let rem = nbits % BITS_PER_WORD;

    if off == 0 {
        dst[..full].copy_from_slice(&src[..full]);
        if rem != 0 {
            merge(&mut dst[full], src[full], low_mask(rem));
        }
        return Ok(());
    }

    let inv = BITS_PER_WORD - off;
    // Destination word i takes the high bits of src[i] and the low bits of
    // src[i + 1]; src[full] exists because off > 0 (checked above).
    let s = &src[..=full];
    for ((d, &lo), &hi) in dst[..full].iter_mut().zip(s).zip(&s[1..]) {
        *d = (lo >> off) | (hi << inv);
    }
    if rem != 0 {
        let mut v = src[full] >> off;
        if off + rem > BITS_PER_WORD {
            v |= src[full + 1] << inv;
        }
        merge(&mut dst[full], v, low_mask(rem));
    }
    Ok(())
}

/// Copies bits `src[0..nbits)` to `dst[shift..shift + nbits)`.
///
/// Destination bits outside `[shift, shift + nbits)` are never touched, in
/// particular the low `shift % 64` bits of the first word and the bits past the
/// range in the last word; source bits at or past `nbits` are ignored.
/// `shift` may be any value, aligned or not; `nbits` may be 0 (then nothing is
/// read or written). Slices may be longer than needed.
///
/// # Panics
///
/// Panics if `dst` holds fewer than `shift + nbits` bits, if `src` holds fewer
/// than `nbits` bits, or if `shift + nbits` overflows. Use
/// [`try_copy_with_dst_offset`] for sizes that are not known to be valid.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::copy_with_dst_offset;
///
/// let src = [0xffffu64];
/// let mut dst = [0x1u64, 0x8000_0000_0000_0000];
/// // Write 16 ones at bit 56: they straddle the two words.
/// copy_with_dst_offset(&mut dst, &src, 56, 16);
/// assert_eq!(dst, [0xff00_0000_0000_0001, 0x8000_0000_0000_00ff]);
/// ```
#[track_caller]
pub fn copy_with_dst_offset(dst: &mut [u64], src: &[u64], shift: usize, nbits: usize) {
    if let Err(e) = try_copy_with_dst_offset(dst, src, shift, nbits) {
        panic!("copy_with_dst_offset: {e}");
    }
}

/// Fallible version of [`copy_with_dst_offset`]: copies `src[0..nbits)` to
/// `dst[shift..shift + nbits)`, never touching destination bits outside that
/// range.
///
/// # Errors
///
/// Returns [`Error::OutOfRange`] without modifying `dst` if `dst` holds fewer
/// than `shift + nbits` bits (`start` = `shift`, `size` = bits in `dst`), or if
/// `src` holds fewer than `nbits` bits (`start` = 0, `size` = bits in `src`),
/// or if `shift + nbits` overflows.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::{try_copy_with_dst_offset, Error};
///
/// let src = [u64::MAX];
/// let mut dst = [0u64; 2];
/// assert_eq!(try_copy_with_dst_offset(&mut dst, &src, 60, 8), Ok(()));
/// assert_eq!(dst, [0xf000_0000_0000_0000, 0xf]);
/// assert_eq!(
///     try_copy_with_dst_offset(&mut dst, &src, 0, 65),
///     Err(Error::OutOfRange { start: 0, len: 65, size: 64 })
/// );
/// ```
pub fn try_copy_with_dst_offset(
    dst: &mut [u64],
    src: &[u64],
    shift: usize,
    nbits: usize,
) -> Result<(), Error> {
    check_range_words(shift, nbits, dst.len())?;
    check_range_words(0, nbits, src.len())?;
    if nbits == 0 {
        return Ok(());
    }
    let off = shift % BITS_PER_WORD;
    let dst = &mut dst[shift / BITS_PER_WORD..];

    if off == 0 {
        let full = nbits / BITS_PER_WORD;
        let rem = nbits % BITS_PER_WORD;
        dst[..full].copy_from_slice(&src[..full]);
        if rem != 0 {
            merge(&mut dst[full], src[full], low_mask(rem));
        }
        return Ok(());
    }

    let inv = BITS_PER_WORD - off;
    // Range end relative to dst[0], and the (inclusive) last word it touches.
    let end = off + nbits;
    let last = (end - 1) / BITS_PER_WORD;
    let head = !0u64 << off;
    if last == 0 {
        merge(&mut dst[0], src[0] << off, head & low_mask(end));
        return Ok(());
    }
    merge(&mut dst[0], src[0] << off, head);
    // Middle destination word j (1 <= j < last) takes the high bits of
    // src[j - 1] and the low bits of src[j]; all of src[..last] is in range.
    let s = &src[..last];
    for ((d, &lo), &hi) in dst[1..last].iter_mut().zip(s).zip(&s[1..]) {
        *d = (lo >> inv) | (hi << off);
    }
    // The last word may need src[last] or not (then it may not exist).
    let mut v = src[last - 1] >> inv;
    if let Some(&w) = src.get(last) {
        v |= w << off;
    }
    merge(&mut dst[last], v, low_mask(end - last * BITS_PER_WORD));
    Ok(())
}

/// Replaces the bits of `*dst` selected by `mask` with those of `value`.
#[inline(always)]
fn merge(dst: &mut u64, value: u64, mask: u64) {
    *dst = (*dst & !mask) | (value & mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0xaaaa_aaaa_aaaa_aaaa;

    #[test]
    fn src_offset_zero_bits_touches_nothing() {
        let mut dst = [A; 2];
        copy_with_src_offset(&mut dst, &[], 0, 0);
        copy_with_src_offset(&mut dst, &[1], 64, 0);
        copy_with_src_offset(&mut [], &[1], 5, 0);
        assert_eq!(dst, [A; 2]);
    }

    #[test]
    fn src_offset_aligned() {
        let src = [1, 2, 3, u64::MAX];
        let mut dst = [A; 3];
        copy_with_src_offset(&mut dst, &src, 64, 130);
        assert_eq!(dst, [2, 3, (A & !0b11) | 0b11]);
    }

    #[test]
    fn src_offset_unaligned() {
        let src = [u64::MAX << 1, u64::MAX, 0b1];
        let mut dst = [0u64; 3];
        copy_with_src_offset(&mut dst, &src, 1, 128);
        assert_eq!(dst, [u64::MAX, u64::MAX, 0]);
        let mut dst = [A; 2];
        copy_with_src_offset(&mut dst, &src, 63, 66);
        assert_eq!(dst, [u64::MAX, (A & !0b11) | 0b11]);
    }

    #[test]
    fn dst_offset_zero_bits_touches_nothing() {
        let mut dst = [A; 2];
        copy_with_dst_offset(&mut dst, &[], 7, 0);
        copy_with_dst_offset(&mut dst, &[], 128, 0);
        assert_eq!(dst, [A; 2]);
    }

    #[test]
    fn dst_offset_keeps_bits_outside() {
        let mut dst = [A; 3];
        copy_with_dst_offset(&mut dst, &[0, 0], 1, 126);
        assert_eq!(dst, [A & 1, 1 << 63, A]); // bit 127 is outside
        let mut dst = [!A; 3];
        copy_with_dst_offset(&mut dst, &[u64::MAX, u64::MAX], 63, 66);
        assert_eq!(dst, [!A | (1 << 63), u64::MAX, (!A) | 1]);
    }

    #[test]
    fn dst_offset_aligned() {
        let mut dst = [A; 3];
        copy_with_dst_offset(&mut dst, &[5, 0], 64, 65);
        assert_eq!(dst, [A, 5, A & !1]);
    }

    #[test]
    fn errors_leave_dst_alone() {
        let mut dst = [A; 2];
        assert_eq!(
            try_copy_with_src_offset(&mut dst, &[1], 1, 64),
            Err(Error::OutOfRange {
                start: 1,
                len: 64,
                size: 64
            })
        );
        assert_eq!(
            try_copy_with_src_offset(&mut dst, &[1; 3], 0, 129),
            Err(Error::OutOfRange {
                start: 0,
                len: 129,
                size: 128
            })
        );
        assert_eq!(
            try_copy_with_dst_offset(&mut dst, &[1; 3], 100, 29),
            Err(Error::OutOfRange {
                start: 100,
                len: 29,
                size: 128
            })
        );
        assert_eq!(
            try_copy_with_dst_offset(&mut dst, &[1], 0, 65),
            Err(Error::OutOfRange {
                start: 0,
                len: 65,
                size: 64
            })
        );
        assert!(try_copy_with_dst_offset(&mut dst, &[1], usize::MAX, 2).is_err());
        assert!(try_copy_with_src_offset(&mut dst, &[1], usize::MAX, 2).is_err());
        assert_eq!(dst, [A; 2]);
    }

    #[test]
    #[should_panic(
        expected = "copy_with_dst_offset: bit range of 10 bits at 60 out of range for bitmap of 64 bits"
    )]
    fn dst_offset_panics() {
        copy_with_dst_offset(&mut [0], &[0], 60, 10);
    }

    #[test]
    #[should_panic(expected = "copy_with_src_offset: bit range of 2 bits at 63 out of range")]
    fn src_offset_panics() {
        copy_with_src_offset(&mut [0], &[0], 63, 2);
    }
}
