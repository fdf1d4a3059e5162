// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `RamBlock::populated_pages`: which pages may hold data, per backing, checked against what the
//! memory really holds. Every page outside the answer must read as zero; every written page must be
//! in it.

// One-range answers are what is being checked.
#![allow(clippy::single_range_in_vec_init)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use clearlog_memory::{
    is_zero_page, DirtyBitmap, Error, MemorySystem, PopulatedMethod, RamBacking, RamBlock,
    PAGE_SIZE,
};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, VolatileMemory,
};

const PS: usize = PAGE_SIZE as usize;

fn populated(block: &RamBlock, first: u64, n: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    block.populated_pages(first, n, &mut out).unwrap();
    out
}

fn all(block: &RamBlock) -> Vec<Range<u64>> {
    populated(block, 0, block.pages())
}

/// Sorted, merged ranges of a set of pages.
fn ranges_of(pages: &BTreeSet<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(last) if last.end == p => last.end += 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

/// Does the kernel have PAGEMAP_SCAN (Linux 6.7+)? Without it every anonymous range is reported
/// whole, which the exact tests below cannot check.
fn have_pagemap_scan() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release.trim().split(['.', '-']);
    let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let ok = (major, minor) >= (6, 7);
    if !ok {
        eprintln!("SKIPPED: kernel {release} has no PAGEMAP_SCAN (6.7+)");
    }
    ok
}

fn madvise(block: &RamBlock, first: u64, n: u64, advice: i32) -> std::io::Result<()> {
    assert!(first + n <= block.pages());
    let addr = (block.host_addr() + first * PAGE_SIZE) as *mut libc::c_void;
    // SAFETY: the range lies inside the block's mapping (asserted above), which `block` keeps alive.
    // The advice used here (MADV_NOHUGEPAGE, MADV_PAGEOUT, MADV_DONTNEED) changes no memory Rust
    // has a reference to: guest memory is only accessed through volatile copies, and discarding
    // private anonymous pages (MADV_DONTNEED) makes them read as zero, a valid value for bytes.
    let rc = unsafe { libc::madvise(addr, (n * PAGE_SIZE) as usize, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An anonymous block without transparent huge pages (so pages are populated one by one).
fn small_page_block(mem: &MemorySystem, name: &str, guest_addr: u64, size: u64) -> Arc<RamBlock> {
    let id = mem.add_ram(name, guest_addr, size).unwrap();
    let block = mem
        .ram_blocks()
        .into_iter()
        .find(|b| b.name() == name)
        .unwrap();
    madvise(&block, 0, block.pages(), libc::MADV_NOHUGEPAGE).unwrap();
    let _ = id;
    block
}

/// Every page outside `reported` reads as zero.
fn check_unreported_pages_are_zero(block: &RamBlock, reported: &[Range<u64>]) {
    let mut page = [0u8; PS];
    let mut next = 0;
    for r in reported
        .iter()
        .chain(std::iter::once(&(block.pages()..block.pages())))
    {
        for p in next..r.start {
            block.read_page(p, &mut page).unwrap();
            assert!(is_zero_page(&page), "unreported page {p} holds data");
        }
        next = r.end;
    }
}

#[test]
fn huge_untouched_block_reports_exactly_the_written_pages_fast() {
    if !have_pagemap_scan() {
        return;
    }
    const SIZE: u64 = 64 << 30;
    let mem = MemorySystem::with_ram_capacity(SIZE);
    let block = small_page_block(&mem, "ram", 0, SIZE);
    let pages = block.pages();

    // Scattered pages (a 64-bit LCG), a few runs (merged into one range each), both ends.
    let mut written = BTreeSet::new();
    let mut x = 0x1234_5678_9abc_def0u64;
    while written.len() < 30_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        written.insert((x >> 20) % pages);
    }
    written.extend(0..10);
    written.extend(1_000_000..1_000_700);
    written.insert(pages - 1);
    for &p in &written {
        block.write(p * PAGE_SIZE + 17, &[0x5a]).unwrap();
    }
    let expected = ranges_of(&written);

    let t = Instant::now();
    let got = all(&block);
    let whole = t.elapsed();
    assert_eq!(got, expected);

    // The migration engine's pattern: one query per 16 MiB chunk (4096 pages), one Vec.
    let mut out = Vec::with_capacity(expected.len() + 4096);
    let t = Instant::now();
    for chunk in (0..pages).step_by(4096) {
        block.populated_pages(chunk, 4096, &mut out).unwrap();
    }
    let chunked = t.elapsed();
    // Ranges are clipped to each chunk, so runs crossing a chunk boundary come in two pieces.
    let mut set = BTreeSet::new();
    for r in &out {
        assert!(
            r.start / 4096 == (r.end - 1) / 4096,
            "{r:?} crosses a chunk"
        );
        set.extend(r.clone());
    }
    assert_eq!(set, written);
    eprintln!(
        "populated_pages over 64 GiB, {} touched pages scattered (one per 2 MiB, the kernel walks \
         a page table for each) in {} ranges: whole block {whole:?}, 4096 chunks of 16 MiB \
         {chunked:?}",
        written.len(),
        expected.len()
    );

    // A clustered working set: 37k more pages in runs of 64 within the first GiB.
    let mut more = BTreeSet::new();
    for run in 0..580u64 {
        let first = (run * 449) % (262_144 - 64);
        more.extend(first..first + 64);
    }
    for &p in &more {
        block.write(p * PAGE_SIZE, &[0xa5]).unwrap();
    }
    written.extend(more.iter().copied());
    let mut out = Vec::new();
    let t = Instant::now();
    block.populated_pages(0, 262_144, &mut out).unwrap();
    let clustered = t.elapsed();
    let in_first_gib: BTreeSet<u64> = written.range(..262_144).copied().collect();
    assert_eq!(out, ranges_of(&in_first_gib));
    eprintln!(
        "populated_pages over the first GiB, {} touched pages in {} ranges: {clustered:?}",
        in_first_gib.len(),
        out.len()
    );
}

#[test]
fn answer_is_clipped_to_the_asked_range_and_appended() {
    if !have_pagemap_scan() {
        return;
    }
    let mem = MemorySystem::with_ram_capacity(64 << 20);
    let block = small_page_block(&mem, "ram", 0, 16 << 20);
    block.write(10 * PAGE_SIZE, &[1; 10 * PS]).unwrap(); // pages 10..20
    block.write(40 * PAGE_SIZE, &[1]).unwrap();
    assert_eq!(all(&block), [10..20, 40..41]);
    assert_eq!(populated(&block, 12, 3), [12..15]);
    assert_eq!(populated(&block, 15, 30), [15..20, 40..41]);
    assert_eq!(populated(&block, 19, 22), [19..20, 40..41]);
    assert_eq!(populated(&block, 20, 20), []);
    assert_eq!(populated(&block, 41, block.pages() - 41), []);
    assert_eq!(populated(&block, 5, 0), []);
    // Appends after the caller's entries, without merging into them.
    let mut out = vec![0..10];
    block.populated_pages(10, 5, &mut out).unwrap();
    assert_eq!(out, [0..10, 10..15]);
}

#[test]
fn bad_ranges_are_errors_and_append_nothing() {
    let mem = MemorySystem::with_ram_capacity(64 << 20);
    mem.add_ram("ram", 0, 1 << 20).unwrap();
    mem.add_ram_backed(
        "shm",
        1 << 20,
        1 << 20,
        RamBacking::Memfd { hugetlb: false },
    )
    .unwrap();
    for block in mem.ram_blocks() {
        let pages = block.pages();
        let mut out = vec![7..8];
        for (first, n) in [
            (pages, 1),
            (pages + 1, 0),
            (0, pages + 1),
            (pages - 1, 2),
            (u64::MAX, 1),
            (1, u64::MAX),
            (u64::MAX, u64::MAX),
        ] {
            let err = block.populated_pages(first, n, &mut out).unwrap_err();
            assert!(
                matches!(err, Error::OutOfRange { what: "block", .. }),
                "{err}"
            );
        }
        assert_eq!(out, [7..8]);
        block.populated_pages(pages, 0, &mut out).unwrap();
        assert_eq!(out, [7..8]);
    }
}

#[test]
fn transparent_huge_pages_are_reported_whole_and_nothing_is_lost() {
    // `add_ram` blocks ask for THP: a touched page may bring its whole 2 MiB with it.
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    mem.add_ram("ram", 0, 256 << 20).unwrap();
    let block = mem.ram_blocks()[0].clone();
    let written = [3u64, 600, 601, 20_000, 65_535];
    for &p in &written {
        block.write(p * PAGE_SIZE, &[1]).unwrap();
    }
    let got = all(&block);
    for p in written {
        assert!(
            got.iter().any(|r| r.contains(&p)),
            "page {p} not reported: {got:?}"
        );
    }
    if have_pagemap_scan() {
        // Every reported page shares a (host-aligned) 2 MiB frame with a written page.
        let frame = |p: u64| (block.host_addr() + p * PAGE_SIZE) >> 21;
        let frames: BTreeSet<u64> = written.iter().map(|&p| frame(p)).collect();
        for r in &got {
            for p in r.clone() {
                assert!(
                    frames.contains(&frame(p)),
                    "page {p} reported without a reason"
                );
            }
        }
        let n: u64 = got.iter().map(|r| r.end - r.start).sum();
        eprintln!("THP block: {} written pages, {n} reported", written.len());
    }
    check_unreported_pages_are_zero(&block, &got);
}

#[test]
fn writes_through_vm_memory_views_are_reported() {
    if !have_pagemap_scan() {
        return;
    }
    // A view of this memory system's RAM.
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    let block = small_page_block(&mem, "ram", 0x10_0000, 4 << 20);
    let gm = mem.guest_memory().unwrap();
    gm.write_slice(b"virtio", GuestAddress(0x10_0000 + 7 * PAGE_SIZE + 100))
        .unwrap();
    gm.write_obj(1u64, GuestAddress(0x10_0000 + 8 * PAGE_SIZE))
        .unwrap();
    block.write(3 * PAGE_SIZE, &[1]).unwrap();
    assert_eq!(all(&block), [3..4, 7..9]);

    // A VMM's own anonymous guest memory, adopted (no THP advice: pages one by one).
    let vmm =
        GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(1 << 32), 4 << 20)]).unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    mem.add_guest_memory(&vmm).unwrap();
    let block = mem.ram_blocks()[0].clone();
    vmm.write_obj(0xffu8, GuestAddress((1 << 32) + 100 * PAGE_SIZE))
        .unwrap();
    assert_eq!(all(&block), [100..101]);
}

fn memfd_block(mem: &MemorySystem, name: &str, guest_addr: u64, size: u64) -> Arc<RamBlock> {
    mem.add_ram_backed(name, guest_addr, size, RamBacking::Memfd { hugetlb: false })
        .unwrap();
    mem.ram_blocks()
        .into_iter()
        .find(|b| b.name() == name)
        .unwrap()
}

#[test]
fn memfd_pages_written_by_any_mapping_or_pwrite_are_reported() {
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    let block = memfd_block(&mem, "shm", 0, 4 << 20);
    assert_eq!(all(&block), []);
    block.write(PAGE_SIZE, &[1]).unwrap();

    // Another process (a vhost-user backend) maps the same memfd: its writes never touch our page
    // tables.
    let fd = block.file_offset().unwrap().file().try_clone().unwrap();
    let other = MmapRegion::<()>::from_file(FileOffset::new(fd, 0), 4 << 20).unwrap();
    other.get_slice(7 * PS + 5, 1).unwrap().copy_from(&[0xeeu8]);
    // ... or writes the file.
    let file = block.file_offset().unwrap().file();
    file.write_at(&[0xdd], 12 * PAGE_SIZE + 9).unwrap();
    // A vm-memory view of ours.
    let gm = mem.guest_memory().unwrap();
    gm.write_obj(5u32, GuestAddress(13 * PAGE_SIZE)).unwrap();

    let got = all(&block);
    assert_eq!(got, [1..2, 7..8, 12..14]);
    assert_eq!(populated(&block, 2, 11), [7..8, 12..13]);
    let mut page = [0u8; PS];
    block.read_page(7, &mut page).unwrap();
    assert_eq!(page[5], 0xee);
    check_unreported_pages_are_zero(&block, &got);
}

#[test]
fn file_backing_is_asked_without_moving_the_callers_file_offset() {
    let path = std::env::temp_dir().join(format!("clearlog-populated-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(8 << 20).unwrap();
    // Data before the block's offset and inside it.
    file.write_at(&[1], 0).unwrap();
    file.write_at(&[2], (1 << 20) + 3 * PAGE_SIZE).unwrap();
    let file = Arc::new(file);
    (&*file).seek(SeekFrom::Start(4321)).unwrap();

    let mem = MemorySystem::with_ram_capacity(1 << 30);
    let backing = RamBacking::File {
        file: file.clone(),
        offset: 1 << 20,
    };
    mem.add_ram_backed("file", 0, 4 << 20, backing).unwrap();
    let block = mem.ram_blocks()[0].clone();
    block.write(100 * PAGE_SIZE, &[3]).unwrap();
    let got = all(&block);
    // The host file system may track holes in blocks larger than a page: reported ranges then
    // cover whole blocks, never less.
    for p in [3, 100] {
        assert!(
            got.iter().any(|r| r.contains(&p)),
            "page {p} not reported: {got:?}"
        );
    }
    check_unreported_pages_are_zero(&block, &got);
    eprintln!("file-backed block: pages 3 and 100 written, reported {got:?}");
    assert_eq!((&*file).stream_position().unwrap(), 4321);
}

#[test]
fn private_file_mapping_reports_file_data_and_copied_pages() {
    if !have_pagemap_scan() {
        return;
    }
    // A memfd mapped MAP_PRIVATE: page 3 has data in the file, page 5 is written through the
    // private mapping (copied on write: the file never sees it).
    // SAFETY: a NUL-terminated name; no memory is handed over.
    let fd = unsafe { libc::memfd_create(c"populated-private".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    file.set_len(4 << 20).unwrap();
    file.write_at(&[3], 3 * PAGE_SIZE).unwrap();
    let fd = file.try_clone().unwrap();
    let mmap = MmapRegionBuilder::new_with_bitmap(4 << 20, DirtyBitmap::new())
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE)
        .build()
        .unwrap();
    let region = GuestRegionMmap::new(mmap, GuestAddress(0)).unwrap();
    let gm = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    mem.add_guest_memory(&gm).unwrap();
    let block = mem.ram_blocks()[0].clone();
    gm.write_obj(5u8, GuestAddress(5 * PAGE_SIZE)).unwrap();
    let mut b = [9u8];
    fd.read_at(&mut b, 5 * PAGE_SIZE).unwrap();
    assert_eq!(b, [0], "a private mapping wrote through to the file");
    assert_eq!(all(&block), [3..4, 5..6]);
    assert_eq!(populated(&block, 4, 100), [5..6]);
}

/// Shared anonymous memory is a shmem file inside the kernel, with no file the VMM can hand us:
/// its data ranges are known when `/proc/self/map_files` can be opened (`CAP_SYS_ADMIN`),
/// and every page counts as populated otherwise. Either way no page that holds data is missed.
#[test]
fn shared_anonymous_mapping_is_its_shmem_file_or_everything() {
    let mmap = MmapRegionBuilder::new_with_bitmap(1 << 20, DirtyBitmap::new())
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_ANONYMOUS)
        .build()
        .unwrap();
    let region = GuestRegionMmap::new(mmap, GuestAddress(0)).unwrap();
    let gm = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    mem.add_guest_memory(&gm).unwrap();
    let block = mem.ram_blocks()[0].clone();
    block.write(17 * PAGE_SIZE, b"shared").unwrap();
    match block.populated_method() {
        PopulatedMethod::FileData => assert_eq!(all(&block), [17..18]),
        PopulatedMethod::Everything => {
            assert_eq!(all(&block), [0..256]);
            assert_eq!(populated(&block, 10, 5), [10..15]);
        }
        other => panic!("shared anonymous memory classified as {other:?}"),
    }
    check_unreported_pages_are_zero(&block, &all(&block));
}

#[test]
fn discarded_anonymous_pages_are_no_longer_reported_and_read_zero() {
    if !have_pagemap_scan() {
        return;
    }
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    let block = small_page_block(&mem, "ram", 0, 4 << 20);
    block.write(3 * PAGE_SIZE, &[1; 2 * PS]).unwrap();
    assert_eq!(all(&block), [3..5]);
    madvise(&block, 3, 1, libc::MADV_DONTNEED).unwrap();
    assert_eq!(all(&block), [4..5]);
    let mut page = [1u8; PS];
    block.read_page(3, &mut page).unwrap();
    assert!(is_zero_page(&page));
    // Reading mapped the shared zero page: reported again (harmless, it reads as zero).
    let after_read = all(&block);
    assert!(
        after_read == [3..5] || after_read == [4..5],
        "{after_read:?}"
    );
}

#[cfg(feature = "testing")]
#[test]
fn fallback_reports_the_whole_range() {
    use clearlog_memory::testing::force_populated_fallback;
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    mem.add_ram("ram", 0, 4 << 20).unwrap();
    let shm = memfd_block(&mem, "shm", 4 << 20, 4 << 20);
    let anon = mem.ram_blocks()[0].clone();
    for block in [&anon, &shm] {
        block.write(2 * PAGE_SIZE, &[1]).unwrap();
        force_populated_fallback(block, true);
        assert_eq!(all(block), [0..1024]);
        assert_eq!(populated(block, 100, 7), [100..107]);
        assert_eq!(populated(block, 1024, 0), []);
        let mut out = vec![0..1];
        block.populated_pages(1, 3, &mut out).unwrap();
        assert_eq!(out, [0..1, 1..4]);
        assert!(block.populated_pages(1, 1024, &mut out).is_err());
        force_populated_fallback(block, false);
        assert!(all(block).iter().any(|r| r.contains(&2)));
    }
    if have_pagemap_scan() {
        assert_eq!(all(&shm), [2..3]);
    }
}

/// A swap file, swapped on, removed (swapped off first) on drop, also when the test fails.
struct SwapFile {
    path: PathBuf,
    on: bool,
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if self.on {
            match Command::new("swapoff").arg(&self.path).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "swapoff {} failed: {}",
                    self.path.display(),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("swapoff {}: {e}", self.path.display()),
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{what}: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Swap on a 256 MiB file under /var/tmp (root only; `None` and a loud skip otherwise).
fn swap_on() -> Option<SwapFile> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED swapped_pages_are_reported: needs root (swapon)");
        return None;
    }
    let mut swap = SwapFile {
        path: PathBuf::from(format!(
            "/var/tmp/clearlog-populated-swap-{}",
            std::process::id()
        )),
        on: false,
    };
    let path = swap.path.clone();
    let steps = || -> Result<(), String> {
        // dd, not fallocate: swapon refuses files with holes or unwritten extents on some file
        // systems.
        run(
            "dd",
            Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", path.display()))
                .args(["bs=1M", "count=256", "status=none"]),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod: {e}"))?;
        run("mkswap", Command::new("mkswap").arg(&path))?;
        run("swapon", Command::new("swapon").arg(&path))
    };
    match steps() {
        Ok(()) => {
            swap.on = true;
            Some(swap)
        }
        Err(e) => {
            eprintln!("SKIPPED swapped_pages_are_reported: cannot set up swap ({e})");
            None
        }
    }
}

/// `/proc/self/pagemap` the classic way (64 bits per page: 63 present, 62 swapped), independent
/// of the code under test.
fn present_and_swapped(block: &RamBlock, page: u64) -> (bool, bool) {
    let pagemap = File::open("/proc/self/pagemap").unwrap();
    let mut e = [0u8; 8];
    let vpn = (block.host_addr() + page * PAGE_SIZE) / PAGE_SIZE;
    pagemap.read_exact_at(&mut e, vpn * 8).unwrap();
    let e = u64::from_ne_bytes(e);
    (e >> 63 & 1 == 1, e >> 62 & 1 == 1)
}

#[test]
fn swapped_pages_are_reported() {
    if !have_pagemap_scan() {
        return;
    }
    let Some(swap) = swap_on() else {
        return;
    };
    let mem = MemorySystem::with_ram_capacity(1 << 30);
    let block = small_page_block(&mem, "ram", 0, 64 << 20);
    let written: BTreeSet<u64> = (0..600).step_by(3).collect();
    for &p in &written {
        block
            .write(p * PAGE_SIZE, &[(p % 251) as u8 + 1; PS])
            .unwrap();
    }
    if let Err(e) = madvise(&block, 0, block.pages(), libc::MADV_PAGEOUT) {
        eprintln!("SKIPPED swapped_pages_are_reported: MADV_PAGEOUT refused ({e})");
        return;
    }
    let swapped: Vec<u64> = written
        .iter()
        .copied()
        .filter(|&p| present_and_swapped(&block, p) == (false, true))
        .collect();
    if swapped.is_empty() {
        eprintln!("SKIPPED swapped_pages_are_reported: the kernel kept every page in RAM");
        return;
    }
    // Swapped pages are not zero: all written pages are reported, swapped or not, and only them.
    assert_eq!(all(&block), ranges_of(&written));
    let mut page = [0u8; PS];
    for &p in &written {
        block.read_page(p, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == (p % 251) as u8 + 1),
            "page {p} lost data"
        );
    }
    eprintln!(
        "swap test ran: {} of {} written pages were swapped out, all reported, data read back",
        swapped.len(),
        written.len()
    );
    drop(swap);
}
