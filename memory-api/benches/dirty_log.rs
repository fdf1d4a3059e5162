// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Folding a 4 GiB guest's KVM bitmap into the clients, and the migration sync of a 4 GiB block.

use std::hint::black_box;

use clearlog_bitmap::Bitmap;
use clearlog_memory::{ClearBitmap, DirtyClient, DirtyClients, DirtyMemory, MemorySystem};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const GUEST: u64 = 4 << 30;
const PAGES: u64 = GUEST / 4096;

/// A KVM bitmap for the whole guest: every word dirty (`dense`) or one word in 64 (`sparse`).
fn kvm_bitmap(dense: bool) -> Vec<u64> {
    (0..PAGES / 64)
        .map(|i| {
            if dense || i % 64 == 0 {
                0x5555_5555_5555_5555u64.rotate_left(i as u32)
            } else {
                0
            }
        })
        .collect()
}

fn fold(c: &mut Criterion) {
    let dirty = DirtyMemory::new(PAGES + 64);
    let clients = DirtyClients::NONE
        .with(DirtyClient::Migration)
        .with(DirtyClient::Vga);
    let mut group = c.benchmark_group("fold_4GiB");
    group.throughput(Throughput::Elements(PAGES));
    for (name, dense) in [("dense", true), ("sparse", false)] {
        let words = kvm_bitmap(dense);
        group.bench_function(format!("{name}/aligned/2_clients"), |b| {
            b.iter(|| dirty.fold_bitmap(0, black_box(&words), PAGES, clients));
        });
        group.bench_function(format!("{name}/unaligned/2_clients"), |b| {
            b.iter(|| dirty.fold_bitmap(3, black_box(&words), PAGES, clients));
        });
    }
    group.finish();
}

fn migration_sync(c: &mut Criterion) {
    let mem = MemorySystem::with_ram_capacity(GUEST);
    mem.add_ram("ram", 0, GUEST)
        .expect("4 GiB MAP_NORESERVE mapping");
    mem.log_global_start().unwrap();
    let block = mem.ram_blocks()[0].clone();
    let mut dest = Bitmap::new(PAGES as usize);
    let mut clear = ClearBitmap::new(PAGES, 15).unwrap();
    let mut group = c.benchmark_group("migration_sync_4GiB");
    group.throughput(Throughput::Elements(PAGES));
    for (name, dense) in [("dense", true), ("sparse", false)] {
        let words = kvm_bitmap(dense);
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    mem.dirty()
                        .fold_bitmap(0, &words, PAGES, DirtyClient::Migration.into());
                    Bitmap::new(PAGES as usize)
                },
                |mut fresh| mem.sync_migration_bitmap(&block, &mut fresh, Some(&mut clear)),
                BatchSize::PerIteration,
            );
        });
    }
    group.bench_function("clean", |b| {
        b.iter(|| mem.sync_migration_bitmap(&block, &mut dest, Some(&mut clear)));
    });
    group.finish();
}

criterion_group!(benches, fold, migration_sync);
criterion_main!(benches);
