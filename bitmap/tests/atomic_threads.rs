// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! AtomicBitmap under real concurrency: no bit set by any thread may be lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use clearlog_bitmap::{AtomicBitmap, Bitmap};

const THREADS: usize = 4;
const BITS: usize = 64 * 1024 + 37; // not a word multiple

/// Runs `f(thread_index)` on `THREADS` threads released together.
fn on_threads(f: impl Fn(usize) + Send + Sync + 'static) {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (f, barrier) = (Arc::clone(&f), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                f(t);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Interleaved bits: every thread writes into every word, so the per-word
/// read-modify-writes really contend.
#[test]
fn disjoint_interleaved_set() {
    let map = Arc::new(AtomicBitmap::new(BITS));
    let m = Arc::clone(&map);
    on_threads(move |t| {
        for bit in (t..BITS).step_by(THREADS) {
            m.set(bit);
        }
    });
    assert_eq!(map.count_ones(), BITS);
    assert_eq!(map.snapshot(), Bitmap::new_filled(BITS));
}

/// Each thread ORs its own stripe of every word with fetch_or_word, and sets
/// short ranges that straddle word boundaries in a disjoint pattern.
#[test]
fn disjoint_words_and_ranges() {
    let map = Arc::new(AtomicBitmap::new(BITS));
    let m = Arc::clone(&map);
    on_threads(move |t| {
        // Bits t, t+4, t+8, ... of every word.
        let stripe = (0..64)
            .filter(|b| b % THREADS == t)
            .fold(0u64, |w, b| w | 1 << b);
        for w in 0..m.word_count() {
            m.fetch_or_word(w, stripe);
        }
    });
    assert_eq!(map.count_ones(), BITS);

    let map = Arc::new(AtomicBitmap::new(BITS));
    let m = Arc::clone(&map);
    // Chunks of 13 bits (never word aligned), dealt round-robin to threads.
    on_threads(move |t| {
        for chunk in (t..BITS.div_ceil(13)).step_by(THREADS) {
            let start = chunk * 13;
            m.set_range(start, 13.min(BITS - start));
        }
    });
    assert_eq!(map.count_ones(), BITS);
}

/// Overlapping writers: all threads set (different mixes of) the same bits;
/// the result is exactly the union.
#[test]
fn overlapping_set_kinds() {
    let map = Arc::new(AtomicBitmap::new(BITS));
    let m = Arc::clone(&map);
    on_threads(move |t| match t % 3 {
        0 => (0..BITS).step_by(3).for_each(|b| m.set(b)),
        1 => {
            for s in (0..BITS).step_by(96) {
                m.set_range(s, 5.min(BITS - s));
            }
        }
        _ => {
            for w in 0..m.word_count() {
                m.fetch_or_word(w, 0x8000_0000_0000_0001);
            }
        }
    });
    let mut expected = Bitmap::new(BITS);
    (0..BITS).step_by(3).for_each(|b| expected.set(b));
    for s in (0..BITS).step_by(96) {
        expected.set_range(s, 5.min(BITS - s));
    }
    for w in 0..expected.word_count() {
        expected.as_words_mut()[w] |= 0x8000_0000_0000_0001;
    }
    expected.mask_tail();
    assert_eq!(map.snapshot(), expected);
}

/// Writers set bits (several ways) while another thread repeatedly takes
/// unaligned ranges; everything taken plus what is left must be exactly
/// everything that was set. The map is sized so it ends up about half full:
/// a misplaced or lost bit cannot hide in a saturated map.
#[test]
fn take_range_loses_nothing() {
    const BITS: usize = (1 << 20) + 37;
    let map = Arc::new(AtomicBitmap::new(BITS));
    let done = Arc::new(AtomicBool::new(false));
    // All writers and the taker start together, so takes and writes overlap.
    let start_line = Arc::new(Barrier::new(THREADS));
    // Full passes the taker finished. A writer waits, after its last write, for a whole pass
    // that started after it: on a loaded host the taker may otherwise only run once every
    // writer is done, and the test would show no overlap at all.
    let passes_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let writers: Vec<_> = (0..THREADS - 1)
        .map(|t| {
            let (m, start_line) = (Arc::clone(&map), Arc::clone(&start_line));
            let passes_done = Arc::clone(&passes_done);
            thread::spawn(move || {
                let mut set = Bitmap::new(BITS);
                start_line.wait();
                // A cheap deterministic pseudo-random walk (xorshift).
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                for _ in 0..60_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let bit = (x % BITS as u64) as usize;
                    match x >> 62 {
                        0 | 1 => m.set(bit),
                        2 => {
                            let len = ((x >> 40) % 16) as usize;
                            let len = len.min(BITS - bit);
                            m.set_range(bit, len);
                            set.set_range(bit, len);
                        }
                        _ => {
                            let w = bit / 64;
                            let mask = x.rotate_left(7)
                                & x.rotate_left(23)
                                & x.rotate_left(41)
                                & x.rotate_left(53);
                            m.fetch_or_word(w, mask);
                            set.as_words_mut()[w] |= mask;
                            set.mask_tail(); // fetch_or_word ignores bits past BITS too
                        }
                    }
                    if x >> 62 <= 1 {
                        set.set(bit);
                    }
                }
                let after = passes_done.load(Ordering::Acquire);
                while passes_done.load(Ordering::Acquire) < after + 2 {
                    thread::yield_now();
                }
                set
            })
        })
        .collect();

    let taker = {
        let (m, done) = (Arc::clone(&map), Arc::clone(&done));
        let start_line = Arc::clone(&start_line);
        let passes_done = Arc::clone(&passes_done);
        thread::spawn(move || {
            let mut taken = Bitmap::new(BITS);
            start_line.wait();
            let mut passes = 0usize;
            let mut start = 0usize;
            while !done.load(Ordering::Acquire) || passes < 3 {
                // Unaligned, varying ranges, wrapping round the map.
                let len = 1 + (start * 7 + 129) % 5000;
                let len = len.min(BITS - start);
                let part = m.take_range(start, len);
                for i in part.iter_ones() {
                    taken.set(start + i);
                }
                start += len;
                if start >= BITS {
                    start = (passes * 31) % 64;
                    passes += 1;
                    passes_done.store(passes, Ordering::Release);
                }
            }
            taken
        })
    };

    let mut all_set = Bitmap::new(BITS);
    for w in writers {
        all_set.or_assign(&w.join().unwrap());
    }
    done.store(true, Ordering::Release);
    let mut seen = taker.join().unwrap();
    assert!(seen.count_ones() > 0, "taker never saw a bit");
    let density = all_set.count_ones() as f64 / BITS as f64;
    assert!((0.2..0.9).contains(&density), "density {density}");
    seen.or_assign(&map.snapshot());
    assert_eq!(seen.count_ones(), all_set.count_ones());
    assert_eq!(seen, all_set);
}

/// Writers OR word slices (as from KVM) while another thread takes words.
#[test]
fn or_words_at_with_take_word() {
    let map = Arc::new(AtomicBitmap::new(BITS));
    let words = map.word_count();
    let m = Arc::clone(&map);
    let taker = thread::spawn(move || {
        let mut taken = vec![0u64; words];
        for _ in 0..200 {
            for (w, t) in taken.iter_mut().enumerate() {
                *t |= m.take_word(w);
            }
        }
        taken
    });
    let m = Arc::clone(&map);
    on_threads_limited(move |t| {
        let slice: Vec<u64> = (0..16).map(|i| 1u64 << ((i * 4 + t) % 64)).collect();
        for first in (0..words - 16).step_by(7) {
            m.or_words_at(first, &slice);
        }
    });
    let mut seen = Bitmap::from_words(taker.join().unwrap(), BITS).unwrap();
    seen.or_assign(&map.snapshot());
    let mut expected = Bitmap::new(BITS);
    for t in 0..THREADS - 1 {
        for first in (0..words - 16).step_by(7) {
            for i in 0..16 {
                expected.as_words_mut()[first + i] |= 1u64 << ((i * 4 + t) % 64);
            }
        }
    }
    assert_eq!(seen, expected);
}

/// Like `on_threads` but with `THREADS - 1` threads (one core is taken by a
/// concurrent reader).
fn on_threads_limited(f: impl Fn(usize) + Send + Sync + 'static) {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..THREADS - 1)
        .map(|t| {
            let f = Arc::clone(&f);
            thread::spawn(move || f(t))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
