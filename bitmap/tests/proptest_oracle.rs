// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Every operation of the crate checked against obviously-correct oracles: a
//! `Vec<bool>` (one bool per bit) and, for the copies and the word layout,
//! bitvec's `BitSlice<u64, Lsb0>`.

use bitvec::prelude::*;
use clearlog_bitmap::*;
use proptest::prelude::*;

/// Bitmap lengths: the word-boundary cases, or anything up to ~1000.
fn any_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 63, 64, 65, 127, 128, 129]),
        0usize..1000,
    ]
}

/// Bit offsets: aligned and unaligned special cases, or anything up to 300.
fn any_shift() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 37, 63, 64, 65, 127, 128, 129]),
        0usize..300,
    ]
}

/// A random bit vector of length `len`: empty, sparse, half, dense or full.
fn bools(len: usize) -> impl Strategy<Value = Vec<bool>> {
    prop::sample::select(vec![0.0, 0.01, 0.5, 0.99, 1.0])
        .prop_flat_map(move |p| prop::collection::vec(prop::bool::weighted(p), len))
}

fn any_bools() -> impl Strategy<Value = Vec<bool>> {
    any_len().prop_flat_map(bools)
}

/// Two bit vectors of the same length.
fn bool_pair() -> impl Strategy<Value = (Vec<bool>, Vec<bool>)> {
    any_len().prop_flat_map(|len| (bools(len), bools(len)))
}

/// A bit vector and a range `(start, len)` inside it.
fn bools_and_range() -> impl Strategy<Value = (Vec<bool>, usize, usize)> {
    any_bools().prop_flat_map(|v| {
        let n = v.len();
        (Just(v), 0..=n).prop_flat_map(move |(v, start)| (Just(v), Just(start), 0..=n - start))
    })
}

/// Packs bools into words in KVM layout, the obvious way.
fn words_of(v: &[bool]) -> Vec<u64> {
    let mut w = vec![0u64; words_for_bits(v.len())];
    for (i, &b) in v.iter().enumerate() {
        if b {
            w[i / 64] |= 1 << (i % 64);
        }
    }
    w
}

fn bits_of(words: &[u64], len: usize) -> Vec<bool> {
    (0..len)
        .map(|i| words[i / 64] >> (i % 64) & 1 == 1)
        .collect()
}

fn bitmap_of(v: &[bool]) -> Bitmap {
    Bitmap::from_words(words_of(v), v.len()).unwrap()
}

/// Checks `map` against the oracle through every read-only view.
fn check_same(map: &Bitmap, v: &[bool]) -> Result<(), TestCaseError> {
    prop_assert_eq!(map.len(), v.len());
    prop_assert_eq!(map.as_words(), &words_of(v)[..]);
    Ok(())
}

proptest! {
    /// Our layout is bitvec's `BitVec<u64, Lsb0>` layout (= KVM's), and the
    /// bitmap built bit by bit equals the one built from words.
    #[test]
    fn layout_matches_bitvec(v in any_bools()) {
        let bv: BitVec<u64, Lsb0> = v.iter().copied().collect();
        let mut raw = bv.as_raw_slice().to_vec();
        let mut map = Bitmap::new(v.len());
        for (i, &b) in v.iter().enumerate() {
            if b {
                map.set(i);
            }
        }
        if v.len() % 64 != 0 {
            *raw.last_mut().unwrap() &= (1u64 << (v.len() % 64)) - 1;
        }
        prop_assert_eq!(map.as_words(), &raw[..]);
        prop_assert_eq!(&map, &bitmap_of(&v));
        prop_assert_eq!(bits_of(map.as_words(), v.len()), v);
    }

    #[test]
    fn from_words_masks_tail(words in prop::collection::vec(any::<u64>(), 0..20), cut in 0usize..64) {
        let len = (words.len() * 64).saturating_sub(cut);
        let map = Bitmap::from_words(words.clone(), len);
        if words_for_bits(len) == words.len() {
            let map = map.unwrap();
            let v = bits_of(&words, len);
            check_same(&map, &v)?;
            prop_assert_eq!(map.clone().into_words(), words_of(&v));
        } else {
            prop_assert_eq!(map, Err(Error::LengthMismatch { expected: words_for_bits(len), actual: words.len() }));
        }
    }

    #[test]
    fn new_and_fill(len in any_len(), value: bool) {
        check_same(&Bitmap::new(len), &vec![false; len])?;
        check_same(&Bitmap::new_filled(len), &vec![true; len])?;
        let mut map = Bitmap::new_filled(len);
        map.fill(value);
        check_same(&map, &vec![value; len])?;
        prop_assert_eq!(map.is_empty(), len == 0);
        prop_assert_eq!(map.word_count(), words_for_bits(len));
    }

    #[test]
    fn single_bit_ops(
        (mut v, ops) in any_bools().prop_flat_map(|v| {
            let n = v.len().max(1);
            (Just(v), prop::collection::vec((0u8..4, 0..n), 0..40))
        })
    ) {
        let mut map = bitmap_of(&v);
        for (op, bit) in ops {
            if bit >= v.len() {
                continue;
            }
            match op {
                0 => { map.set(bit); v[bit] = true; }
                1 => { map.clear(bit); v[bit] = false; }
                2 => prop_assert_eq!(map.test(bit), v[bit]),
                _ => { prop_assert_eq!(map.test_and_clear(bit), v[bit]); v[bit] = false; }
            }
        }
        check_same(&map, &v)?;
    }

    #[test]
    fn set_and_clear_range((mut v, start, len) in bools_and_range(), set: bool) {
        let mut map = bitmap_of(&v);
        if set {
            map.set_range(start, len);
        } else {
            map.clear_range(start, len);
        }
        v[start..start + len].fill(set);
        check_same(&map, &v)?;
    }

    #[test]
    fn counts((v, start, len) in bools_and_range()) {
        let map = bitmap_of(&v);
        prop_assert_eq!(map.count_ones(), v.iter().filter(|&&b| b).count());
        let in_range = v[start..start + len].iter().filter(|&&b| b).count();
        prop_assert_eq!(map.count_ones_in(start, len), in_range);
        prop_assert_eq!(map.is_range_clear(start, len), in_range == 0);
    }

    #[test]
    fn finds(v in any_bools()) {
        let map = bitmap_of(&v);
        prop_assert_eq!(map.find_first_set(), v.iter().position(|&b| b));
        for from in 0..v.len() + 3 {
            let set = (from..v.len()).find(|&i| v[i]);
            let zero = (from..v.len()).find(|&i| !v[i]);
            prop_assert_eq!(map.find_next_set(from), set, "find_next_set({})", from);
            prop_assert_eq!(map.find_next_zero(from), zero, "find_next_zero({})", from);
        }
        prop_assert_eq!(map.find_next_set(usize::MAX), None);
        prop_assert_eq!(map.find_next_zero(usize::MAX), None);
    }

    #[test]
    fn iter_ones(v in any_bools()) {
        let map = bitmap_of(&v);
        let expected: Vec<usize> = (0..v.len()).filter(|&i| v[i]).collect();
        prop_assert_eq!(map.iter_ones().collect::<Vec<_>>(), expected.clone());
        // Also through find_next_set, as a VMM scan loop would do.
        let mut via_find = Vec::new();
        let mut from = 0;
        while let Some(i) = map.find_next_set(from) {
            via_find.push(i);
            from = i + 1;
        }
        prop_assert_eq!(via_find, expected);
    }

    #[test]
    fn or_and_and_not((a, b) in bool_pair()) {
        let (ma, mb) = (bitmap_of(&a), bitmap_of(&b));
        let zip = |f: fn(bool, bool) -> bool| -> Vec<bool> {
            a.iter().zip(&b).map(|(&x, &y)| f(x, y)).collect()
        };
        let mut m = ma.clone();
        m.or_assign(&mb);
        check_same(&m, &zip(|x, y| x | y))?;
        let mut m = ma.clone();
        m.and_assign(&mb);
        check_same(&m, &zip(|x, y| x & y))?;
        let mut m = ma;
        m.and_not_assign(&mb);
        check_same(&m, &zip(|x, y| x & !y))?;
    }
}

/// Source words, shift and nbits such that `src[shift..shift + nbits)` is in
/// range, plus destination words able to hold `dst_bits` bits, all random and
/// with 0..2 extra words of slack.
fn copy_case(src_offset: bool) -> impl Strategy<Value = (Vec<u64>, Vec<u64>, usize, usize)> {
    (any_shift(), any_len(), 0usize..2, 0usize..2).prop_flat_map(move |(shift, nbits, xs, xd)| {
        let (src_bits, dst_bits) = if src_offset {
            (shift + nbits, nbits)
        } else {
            (nbits, shift + nbits)
        };
        (
            prop::collection::vec(any::<u64>(), words_for_bits(src_bits) + xs),
            prop::collection::vec(any::<u64>(), words_for_bits(dst_bits) + xd),
            Just(shift),
            Just(nbits),
        )
    })
}

proptest! {
    /// dst[0..nbits) = src[shift..shift + nbits), and every other dst bit
    /// (including the rest of the last word and the slack words) unchanged.
    #[test]
    fn copy_src_offset_vs_bitvec((src, dst0, shift, nbits) in copy_case(true)) {
        let mut expected = dst0.clone();
        expected.view_bits_mut::<Lsb0>()[..nbits]
            .copy_from_bitslice(&src.view_bits::<Lsb0>()[shift..shift + nbits]);
        let mut dst = dst0.clone();
        copy_with_src_offset(&mut dst, &src, shift, nbits);
        prop_assert_eq!(&dst, &expected);
        let mut dst = dst0;
        prop_assert_eq!(try_copy_with_src_offset(&mut dst, &src, shift, nbits), Ok(()));
        prop_assert_eq!(&dst, &expected);
    }

    /// dst[shift..shift + nbits) = src[0..nbits), every other dst bit unchanged.
    #[test]
    fn copy_dst_offset_vs_bitvec((src, dst0, shift, nbits) in copy_case(false)) {
        let mut expected = dst0.clone();
        expected.view_bits_mut::<Lsb0>()[shift..shift + nbits]
            .copy_from_bitslice(&src.view_bits::<Lsb0>()[..nbits]);
        let mut dst = dst0.clone();
        copy_with_dst_offset(&mut dst, &src, shift, nbits);
        prop_assert_eq!(&dst, &expected);
        let mut dst = dst0;
        prop_assert_eq!(try_copy_with_dst_offset(&mut dst, &src, shift, nbits), Ok(()));
        prop_assert_eq!(&dst, &expected);
    }

    /// The try_ forms succeed exactly when the ranges fit, and leave dst
    /// untouched on error.
    #[test]
    fn try_copy_bounds(
        src in prop::collection::vec(any::<u64>(), 0..5),
        dst0 in prop::collection::vec(any::<u64>(), 0..5),
        shift in 0usize..400,
        nbits in 0usize..400,
    ) {
        let (sb, db) = (src.len() * 64, dst0.len() * 64);
        let mut dst = dst0.clone();
        let r = try_copy_with_src_offset(&mut dst, &src, shift, nbits);
        prop_assert_eq!(r.is_ok(), shift + nbits <= sb && nbits <= db);
        if let Err(e) = r {
            prop_assert!(matches!(e, Error::OutOfRange { .. }), "not OutOfRange: {:?}", e);
            prop_assert_eq!(&dst, &dst0);
        }
        let mut dst = dst0.clone();
        let r = try_copy_with_dst_offset(&mut dst, &src, shift, nbits);
        prop_assert_eq!(r.is_ok(), shift + nbits <= db && nbits <= sb);
        if r.is_err() {
            prop_assert_eq!(&dst, &dst0);
        }
    }
}

/// One operation on an [`AtomicBitmap`] of `len` bits.
#[derive(Clone, Debug)]
enum AtomicOp {
    Set(usize),
    Clear(usize),
    Test(usize),
    TestAndClear(usize),
    SetRange(usize, usize),
    ClearRange(usize, usize),
    LoadWord(usize),
    FetchOrWord(usize, u64),
    FetchAndWord(usize, u64),
    SwapWord(usize, u64),
    TakeWord(usize),
    OrWordsAt(usize, Vec<u64>),
    OrBitsAt(usize, Vec<u64>, usize),
    TakeRange(usize, usize),
    FindNextSet(usize),
    ClearAll,
}

fn atomic_op(len: usize) -> impl Strategy<Value = AtomicOp> {
    use AtomicOp::*;
    let bit = 0..len.max(1);
    let words = words_for_bits(len);
    let word = 0..words.max(1);
    let range = (0..=len).prop_flat_map(move |s| (Just(s), 0..=len - s));
    prop_oneof![
        bit.clone().prop_map(Set),
        bit.clone().prop_map(Clear),
        bit.clone().prop_map(Test),
        bit.clone().prop_map(TestAndClear),
        range.clone().prop_map(|(s, l)| SetRange(s, l)),
        range.clone().prop_map(|(s, l)| ClearRange(s, l)),
        word.clone().prop_map(LoadWord),
        (word.clone(), any::<u64>()).prop_map(|(w, m)| FetchOrWord(w, m)),
        (word.clone(), any::<u64>()).prop_map(|(w, m)| FetchAndWord(w, m)),
        (word.clone(), any::<u64>()).prop_map(|(w, m)| SwapWord(w, m)),
        word.clone().prop_map(TakeWord),
        (0..=words)
            .prop_flat_map(move |first| {
                (
                    Just(first),
                    prop::collection::vec(any::<u64>(), 0..=words - first),
                )
            })
            .prop_map(|(f, w)| OrWordsAt(f, w)),
        range
            .clone()
            .prop_flat_map(|(s, l)| {
                (
                    Just(s),
                    prop::collection::vec(any::<u64>(), words_for_bits(l)..=words_for_bits(l) + 1),
                    Just(l),
                )
            })
            .prop_map(|(s, w, l)| OrBitsAt(s, w, l)),
        range.clone().prop_map(|(s, l)| TakeRange(s, l)),
        range.clone().prop_map(|(s, l)| TakeRange(s, l)),
        (0..len + 3).prop_map(FindNextSet),
        Just(ClearAll),
    ]
}

/// The oracle's word `idx` (bits past the end read as zero).
fn oracle_word(v: &[bool], idx: usize) -> u64 {
    (0..64)
        .filter(|b| v.get(idx * 64 + b).copied().unwrap_or(false))
        .fold(0, |w, b| w | 1 << b)
}

/// Sets the oracle's word `idx` to `w` (bits past the end ignored).
fn set_oracle_word(v: &mut [bool], idx: usize, w: u64) {
    for b in 0..64 {
        if let Some(x) = v.get_mut(idx * 64 + b) {
            *x = w >> b & 1 == 1;
        }
    }
}

proptest! {
    /// Random sequences of every AtomicBitmap operation, single-threaded,
    /// against a Vec<bool>.
    #[test]
    fn atomic_ops_vs_oracle(
        (mut v, ops) in any_bools().prop_flat_map(|v| {
            let len = v.len();
            (Just(v), prop::collection::vec(atomic_op(len), 0..25))
        })
    ) {
        use AtomicOp::*;
        let len = v.len();
        let map = AtomicBitmap::from(bitmap_of(&v));
        prop_assert_eq!(map.len(), len);
        prop_assert_eq!(map.is_empty(), len == 0);
        prop_assert_eq!(map.word_count(), words_for_bits(len));
        for op in ops {
            let words = map.word_count();
            match op {
                Set(b) | Clear(b) | Test(b) | TestAndClear(b) if b >= len => {}
                LoadWord(w) | FetchOrWord(w, _) | FetchAndWord(w, _) | SwapWord(w, _) | TakeWord(w)
                    if w >= words => {}
                Set(b) => { map.set(b); v[b] = true; }
                Clear(b) => { map.clear(b); v[b] = false; }
                Test(b) => prop_assert_eq!(map.test(b), v[b]),
                TestAndClear(b) => { prop_assert_eq!(map.test_and_clear(b), v[b]); v[b] = false; }
                SetRange(s, l) => { map.set_range(s, l); v[s..s + l].fill(true); }
                ClearRange(s, l) => { map.clear_range(s, l); v[s..s + l].fill(false); }
                LoadWord(w) => prop_assert_eq!(map.load_word(w), oracle_word(&v, w)),
                FetchOrWord(w, m) => {
                    let old = oracle_word(&v, w);
                    prop_assert_eq!(map.fetch_or_word(w, m), old);
                    set_oracle_word(&mut v, w, old | m);
                }
                FetchAndWord(w, m) => {
                    let old = oracle_word(&v, w);
                    prop_assert_eq!(map.fetch_and_word(w, m), old);
                    set_oracle_word(&mut v, w, old & m);
                }
                SwapWord(w, m) => {
                    prop_assert_eq!(map.swap_word(w, m), oracle_word(&v, w));
                    set_oracle_word(&mut v, w, m);
                }
                TakeWord(w) => {
                    prop_assert_eq!(map.take_word(w), oracle_word(&v, w));
                    set_oracle_word(&mut v, w, 0);
                }
                OrWordsAt(first, ws) => {
                    map.or_words_at(first, &ws);
                    for (i, w) in ws.iter().enumerate() {
                        let old = oracle_word(&v, first + i);
                        set_oracle_word(&mut v, first + i, old | w);
                    }
                }
                OrBitsAt(s, ws, l) => {
                    map.or_bits_at(s, &ws, l);
                    for i in 0..l {
                        v[s + i] |= ws[i / 64] >> (i % 64) & 1 == 1;
                    }
                }
                TakeRange(s, l) => {
                    let taken = map.take_range(s, l);
                    check_same(&taken, &v[s..s + l])?;
                    v[s..s + l].fill(false);
                }
                FindNextSet(from) => {
                    prop_assert_eq!(map.find_next_set(from), (from..len).find(|&i| v[i]));
                }
                ClearAll => { map.clear_all(); v.fill(false); }
            }
            check_same(&map.snapshot(), &v)?;
        }
        prop_assert_eq!(map.count_ones(), v.iter().filter(|&&b| b).count());
        let ones: Vec<usize> = (0..len).filter(|&i| v[i]).collect();
        prop_assert_eq!(map.iter_ones().collect::<Vec<_>>(), ones);
        prop_assert_eq!(map.find_next_set(0), v.iter().position(|&b| b));
        check_same(&map.take_all(), &v)?;
        prop_assert_eq!(map.count_ones(), 0);
    }

    /// try_or_words_at succeeds exactly when the words fit, and changes
    /// nothing otherwise.
    #[test]
    fn atomic_try_or_words_at_bounds(
        len in any_len(),
        first in 0usize..20,
        ws in prop::collection::vec(any::<u64>(), 0..20),
    ) {
        let map = AtomicBitmap::new(len);
        let r = map.try_or_words_at(first, &ws);
        prop_assert_eq!(r.is_ok(), first + ws.len() <= map.word_count());
        if r.is_err() {
            prop_assert_eq!(map.count_ones(), 0);
        }
    }
}
