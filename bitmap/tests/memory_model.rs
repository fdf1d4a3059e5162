// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memory-model checks of [`AtomicBitmap`], meant for Miri (`cargo xtask miri`, or
//! `cargo +nightly miri test -p clearlog-bitmap --test memory_model`): Miri's data-race detector
//! follows C++20's release sequences, which x86 hardware never shows being broken. Outside Miri the
//! tests run as plain concurrency tests.
//!
//! The pattern they check is the dirty-tracking hand-over: a writer stores data, then marks its
//! page with a release operation; whoever later sees the bit with an acquire load reads the data.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clearlog_bitmap::AtomicBitmap;

/// A value written without atomics, published through the bitmap.
struct Published {
    data: UnsafeCell<u64>,
    map: AtomicBitmap,
    marked: AtomicBool,
    whole_word_set: AtomicBool,
}

// SAFETY: `data` is written by one thread before it publishes the write with a release operation
// on `map`, and read only after an acquire load of `map` saw that publication (what the test
// checks: a data race here is the bug Miri reports).
unsafe impl Sync for Published {}

fn spin_until(flag: &AtomicBool) {
    // Relaxed on purpose: the flags order the threads without creating happens-before, so the
    // only synchronization is the bitmap's.
    while !flag.load(Ordering::Relaxed) {
        std::hint::spin_loop();
        std::thread::yield_now();
    }
}

/// Finding: `set_range` stored `!0` into words wholly inside the range. A plain store ends the
/// release sequence of an earlier writer's `fetch_or`, so a reader whose acquire load sees the
/// full word synchronizes with the range setter only, and may read the first writer's data
/// before it landed (a lost page, on weakly ordered hardware). `set_range` must use read-modify-
/// writes for every word.
#[test]
fn a_whole_word_set_range_keeps_an_earlier_writers_release_sequence() {
    let runs = if cfg!(miri) { 12 } else { 200 };
    for _ in 0..runs {
        let p = Arc::new(Published {
            data: UnsafeCell::new(0),
            map: AtomicBitmap::new(64),
            marked: AtomicBool::new(false),
            whole_word_set: AtomicBool::new(false),
        });
        let writer = {
            let p = p.clone();
            std::thread::spawn(move || {
                // SAFETY: only this thread writes `data`, before publishing it (see `Published`).
                unsafe { *p.data.get() = 42 };
                p.map.set(3);
                p.marked.store(true, Ordering::Relaxed);
            })
        };
        let ranger = {
            let p = p.clone();
            std::thread::spawn(move || {
                spin_until(&p.marked);
                // A second client's mark of the whole word (a VMM write of 64 pages).
                p.map.set_range(0, 64);
                p.whole_word_set.store(true, Ordering::Relaxed);
            })
        };
        spin_until(&p.whole_word_set);
        while p.map.load_word(0) != !0 {
            std::thread::yield_now();
        }
        // The acquire load saw bit 3 set: the data written before it must be visible.
        // SAFETY: read after the acquire load above (see `Published`).
        let seen = unsafe { *p.data.get() };
        assert_eq!(seen, 42);
        writer.join().unwrap();
        ranger.join().unwrap();
    }
}
