// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Never-populated memory goes as zero ranges, and what is populated arrives: a page written
//! through a second mapping of a memfd (another process's view, which this process's page tables
//! know nothing of), pages written through our own mapping, never-touched pages. The default
//! verification proves the destination got exactly the source's memory.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use clearlog_memory::{MemorySystem, RamBacking, PAGE_SIZE};
use clearlog_migration::*;
use common::*;

const SIZE: u64 = 64 << 20;

fn config() -> MigrationConfig {
    MigrationConfig {
        downtime_limit: Duration::from_millis(50),
        max_time: Some(Duration::from_secs(30)),
        ..MigrationConfig::default()
    }
}

fn migrate(src: &MemorySystem, dst: &MemorySystem) -> (MigrationStats, IncomingStats) {
    let (src_t, dst_t) = mem_channel();
    let vm_src = TestVm::default();
    let vm_dst = TestVm::default();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(dst).receive(dst_t, &vm_dst));
        let s =
            Source::new(src, config())
                .unwrap()
                .migrate(src_t, &vm_src, None, &CancelToken::new());
        (s, d.join().unwrap())
    });
    (s.unwrap(), d.unwrap())
}

#[test]
fn a_page_written_through_another_mapping_of_a_memfd_arrives() {
    let src = MemorySystem::with_ram_capacity(SIZE);
    src.add_ram_backed("ram", 0, SIZE, RamBacking::Memfd { hugetlb: false })
        .unwrap();
    let block = src.ram_blocks()[0].clone();
    // Written through the file (as a vhost-user backend's mapping would): never present in this
    // process's page tables.
    let file = block
        .file_offset()
        .expect("a memfd block has a file")
        .file();
    file.write_all_at(&[0xa5; 4096], 1000 * PAGE_SIZE).unwrap();
    // And one page through our own mapping.
    block.write(5 * PAGE_SIZE, b"ours").unwrap();
    let dst = memory(&[("ram", 0, SIZE)]);
    let (s, d) = migrate(&src, &dst);
    assert!(s.verified && d.verified, "{s:?} {d:?}");
    let mut page = [0u8; 4096];
    dst.ram_blocks()[0]
        .read(1000 * PAGE_SIZE, &mut page)
        .unwrap();
    assert_eq!(
        page, [0xa5; 4096],
        "the page written through the file is lost"
    );
    assert!(diff_ram(&src, &dst).is_empty());
    // The rest of the 64 MiB was never populated: zero ranges, not read page by page.
    assert!(
        s.zero_range_pages >= SIZE / PAGE_SIZE - 64,
        "{} zero-range pages",
        s.zero_range_pages
    );
    assert!(s.pages_sent < 64, "{} pages read and sent", s.pages_sent);
}

#[test]
fn never_populated_anonymous_memory_is_not_read() {
    let src = memory(&[("ram", 0, SIZE)]);
    let block = src.ram_blocks()[0].clone();
    for p in [0u64, 1, 4095, 9000, SIZE / PAGE_SIZE - 1] {
        block.write(p * PAGE_SIZE, &p.to_le_bytes()).unwrap();
    }
    let dst = memory(&[("ram", 0, SIZE)]);
    // Destination memory already holding data where the source has none must be zeroed.
    dst.ram_blocks()[0]
        .write_untracked(7000 * PAGE_SIZE, &[1; 16])
        .unwrap();
    let (s, d) = migrate(&src, &dst);
    assert!(s.verified && d.verified);
    assert!(
        diff_ram(&src, &dst).is_empty(),
        "destination page 7000 kept stale data"
    );
    assert!(s.zero_range_pages > 0 && s.pages_sent + s.zero_range_pages >= SIZE / PAGE_SIZE);
}
