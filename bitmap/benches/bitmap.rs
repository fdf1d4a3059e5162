// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Benchmarks on 1 MiB bitmaps (8,388,608 bits, i.e. 32 GiB of 4 KiB pages).
//!
//! Run with `cargo bench -p clearlog-bitmap --bench bitmap -- --quick`.

use std::hint::black_box;
use std::time::Duration;

use clearlog_bitmap::{copy_with_dst_offset, copy_with_src_offset, AtomicBitmap, Bitmap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BYTES: usize = 1 << 20;
const WORDS: usize = BYTES / 8;
const BITS: usize = BYTES * 8;

/// Deterministic pseudo-random words (xorshift64), no extra dependency.
fn random_words(n: usize, mut x: u64) -> Vec<u64> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

fn copies(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_1MiB");
    g.throughput(Throughput::Bytes(BYTES as u64));
    // One spare word so every shift up to 64 stays in range.
    let src = random_words(WORDS + 1, 1);
    let mut dst = random_words(WORDS + 1, 2);

    g.bench_function("copy_from_slice", |b| {
        b.iter(|| dst[..WORDS].copy_from_slice(black_box(&src[..WORDS])));
    });
    for shift in [0usize, 64, 1, 37] {
        g.bench_with_input(
            BenchmarkId::new("src_offset", shift),
            &shift,
            |b, &shift| {
                b.iter(|| copy_with_src_offset(&mut dst[..WORDS], black_box(&src), shift, BITS));
            },
        );
        g.bench_with_input(
            BenchmarkId::new("dst_offset", shift),
            &shift,
            |b, &shift| {
                b.iter(|| copy_with_dst_offset(&mut dst, black_box(&src[..WORDS]), shift, BITS));
            },
        );
    }
    g.finish();
}

/// Visits every set bit with a find_next_set loop; returns a checksum.
fn scan_find(map: &Bitmap) -> usize {
    let (mut sum, mut from) = (0usize, 0);
    while let Some(i) = map.find_next_set(from) {
        sum = sum.wrapping_add(i);
        from = i + 1;
    }
    sum
}

fn finds(c: &mut Criterion) {
    let mut sparse = Bitmap::new(BITS);
    (0..BITS).step_by(4096).for_each(|b| sparse.set(b));
    let full = Bitmap::new_filled(BITS);
    let half = Bitmap::from_words(random_words(WORDS, 3), BITS).unwrap();

    let mut g = c.benchmark_group("scan_1MiB");
    g.throughput(Throughput::Bytes(BYTES as u64));
    for (name, map) in [
        ("sparse_1_in_4096", &sparse),
        ("full", &full),
        ("random_50pct", &half),
    ] {
        g.bench_with_input(BenchmarkId::new("find_next_set", name), map, |b, m| {
            b.iter(|| scan_find(black_box(m)));
        });
        g.bench_with_input(BenchmarkId::new("iter_ones", name), map, |b, m| {
            b.iter(|| {
                black_box(m)
                    .iter_ones()
                    .fold(0usize, |s, i| s.wrapping_add(i))
            });
        });
    }
    g.bench_function("count_ones/random_50pct", |b| {
        b.iter(|| black_box(&half).count_ones());
    });
    let atomic = AtomicBitmap::from(half.clone());
    g.bench_function("atomic_count_ones/random_50pct", |b| {
        b.iter(|| black_box(&atomic).count_ones());
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short settings so that `-- --quick` (which caps each benchmark at the
    // measurement time) finishes the whole suite in well under a minute.
    config = Criterion::default()
        .sample_size(20)
        .nresamples(10_000)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(700))
        .without_plots();
    targets = copies, finds
}
criterion_main!(benches);
