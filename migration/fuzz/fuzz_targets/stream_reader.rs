// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes through the public `StreamReader` API alone: `read_header`, then `next_record` (and
//! `read_page` for each entry of a page batch) until the end record or the first error.
//!
//! Unlike the destination, nothing here checks the header's layout against local RAM: block sizes and
//! counts are whatever the input says, so this target checks that the decoder's own bounds hold for any
//! header (no panic, no hang, no allocation over `stream_bound`).
#![no_main]

use clearlog_migration::stream::{PageEntry, Record, StreamReader, MAX_BATCH_PAGES};
use clearlog_migration_fuzz::{with_limit, BoundedAlloc, PAGE};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

fn decode(data: &[u8]) {
    let mut r = StreamReader::new(data);
    let Ok(header) = r.read_header(PAGE as u32) else {
        assert!(r.bytes_read() <= data.len() as u64);
        return;
    };
    assert!(!header.blocks.is_empty());
    loop {
        match r.next_record() {
            Ok(Record::Pages { block, count }) => {
                assert!((block as usize) < header.blocks.len());
                assert!((1..=MAX_BATCH_PAGES).contains(&count));
                let pages = header.blocks[block as usize].size / PAGE as u64;
                for _ in 0..count {
                    match r.read_page(block) {
                        Ok(PageEntry::Data(p)) => {
                            assert!(p < pages);
                            assert_eq!(r.page_data().len(), PAGE);
                        }
                        Ok(PageEntry::Zero(p)) => assert!(p < pages),
                        Err(_) => return,
                    }
                }
            }
            Ok(Record::State(blob)) => {
                assert!(!blob.name.is_empty() && blob.name.len() <= 256);
            }
            Ok(Record::Digests { block, digests }) => {
                let pages = header.blocks[block as usize].size / PAGE as u64;
                assert_eq!(digests.len() as u64, pages);
            }
            Ok(Record::ZeroRange {
                block,
                first_page,
                npages,
            }) => {
                let pages = header.blocks[block as usize].size / PAGE as u64;
                assert!(npages > 0 && first_page + npages <= pages);
            }
            Ok(Record::Drain { page_records }) => {
                assert!((1..=64).contains(&page_records.len()));
            }
            // Postcopy's list of missing pages: every set bit is a page of its block.
            Ok(Record::Missing {
                block,
                first_page,
                words,
            }) => {
                let pages = header.blocks[block as usize].size / PAGE as u64;
                assert!(first_page % 64 == 0 && (1..=4096).contains(&words.len()));
                for (i, w) in words.iter().enumerate() {
                    for bit in 0..64 {
                        if w & (1 << bit) != 0 {
                            assert!(first_page + i as u64 * 64 + bit < pages);
                        }
                    }
                }
            }
            Ok(Record::Postcopy { .. }) => {}
            // A session's page channel ends with its own marker.
            Ok(Record::End { .. } | Record::ChannelEnd { .. }) | Err(_) => break,
        }
        assert!(r.bytes_read() <= data.len() as u64);
    }
    assert!(r.bytes_read() <= data.len() as u64);
}

fuzz_target!(|data: &[u8]| {
    with_limit(data.len(), || decode(data));
});
