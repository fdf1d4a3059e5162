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
use clearlog_test_guest::lazy_pages::LazyPages;
use common::*;

const SIZE: u64 = 64 << 20;

fn config() -> MigrationConfig {
    MigrationConfig::default()
        .with_downtime_limit(Duration::from_millis(50))
        .with_max_time(Some(Duration::from_secs(30)))
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
    // The verification read what went as zero ranges, on both sides, and found nothing hidden;
    // the destination's stale page was zeroed by its own read.
    assert!(s.verify_zero_checked_pages > 0, "{s:?}");
    assert_eq!(s.verify_unreported_pages, 0, "{s:?}");
    assert_eq!(d.stale_pages_zeroed, 1, "{d:?}");
}

/// A memfd of `size` bytes mapped `MAP_SHARED` by "the VMM" (the test), twice: one mapping is the
/// guest RAM, the other stands for a vhost-user backend's view.
struct VmmMemfd {
    file: std::fs::File,
    ram: *mut u8,
    backend: *mut u8,
    size: usize,
}

impl VmmMemfd {
    fn new(size: usize) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: a NUL-terminated name; no memory is handed over.
        let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size as u64).unwrap();
        let map = || {
            // SAFETY: a new shared mapping of the memfd chosen by the kernel, unmapped in `drop`
            // after everything using it is gone.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p.cast::<u8>()
        };
        let (ram, backend) = (map(), map());
        VmmMemfd {
            file,
            ram,
            backend,
            size,
        }
    }
}

impl Drop for VmmMemfd {
    fn drop(&mut self) {
        // SAFETY: the two mappings made in `new`; the memory systems over them are dropped first
        // (declared after this value in the tests).
        unsafe {
            libc::munmap(self.ram.cast(), self.size);
            libc::munmap(self.backend.cast(), self.size);
        }
    }
}

/// Finding (issue "losses at the edges", 1), adopter-shaped: a VMM maps a memfd `MAP_SHARED`
/// itself, wraps the pointer with vm-memory's `with_raw_mmap_pointer` (no flags, no file) and
/// adopts it. vm-memory then says "private anonymous", the populated-pages answer came from the
/// page tables, and pages written with `pwrite` or through the backend's mapping were sent as zero
/// while both sides reported `verified`.
#[test]
fn an_adopted_raw_shared_memfd_mapping_loses_no_page() {
    use clearlog_memory::DirtyBitmap;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

    let vmm = VmmMemfd::new(SIZE as usize);
    // SAFETY: `vmm.ram` is a live mapping of SIZE bytes that outlives the region (`vmm` is
    // declared before the memory systems, so it is dropped after them).
    let region = unsafe {
        MmapRegionBuilder::new_with_bitmap(SIZE as usize, DirtyBitmap::new())
            .with_raw_mmap_pointer(vmm.ram)
            .build()
            .unwrap()
    };
    let gm =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    let src = MemorySystem::with_ram_capacity(SIZE);
    src.add_guest_memory(&gm).unwrap();
    // pwrite, the backend's mapping, and the guest RAM mapping itself.
    vmm.file
        .write_all_at(&[0xa5; 4096], 100 * PAGE_SIZE)
        .unwrap();
    for page in [2000u64, 2001, 7777] {
        // SAFETY: inside the backend's mapping of SIZE bytes; nothing else accesses these bytes.
        unsafe { std::ptr::write_bytes(vmm.backend.add((page * PAGE_SIZE) as usize), 0x3c, 64) };
    }
    src.ram_blocks()[0].write(5 * PAGE_SIZE, b"ours").unwrap();
    let dst = memory(&[("ram@0x0", 0, SIZE)]);
    let (s, d) = migrate(&src, &dst);
    let lost = diff_ram(&src, &dst);
    assert!(
        lost.is_empty(),
        "pages lost: {lost:?} (source verified: {}, destination verified: {})",
        s.verified,
        d.verified
    );
    assert!(s.verified && d.verified);
}

/// Finding (2): under a missing-mode userfaultfd (a lazy restore) a never-touched page is empty in
/// the page tables but not zero: its content comes from the handler. It was sent as zero, and
/// the default verification (which asked the same populated-pages answer) reported success.
#[test]
fn userfaultfd_registered_memory_is_read_not_sent_as_zero() {
    const LAZY: u64 = 8 << 20;
    let src = memory(&[("ram", 0, LAZY)]);
    let block = src.ram_blocks()[0].clone();
    let base = block.host_addr() as *mut u8;
    // SAFETY: the block's own mapping; no THP, so the handler serves 4 KiB pages.
    unsafe { libc::madvise(base.cast(), LAZY as usize, libc::MADV_NOHUGEPAGE) };
    // Registered after the block was made (the migration's start must notice).
    // A lazy snapshot restore, as firecracker and cloud-hypervisor do: the handler fills every
    // missing page with its page number.
    let fill = |page: u64, out: &mut [u8]| out.fill((page as u8) | 1);
    let lazy = match LazyPages::register(base as u64, LAZY, Box::new(fill)) {
        Ok(lazy) => lazy,
        Err(e) => {
            eprintln!("SKIPPED: userfaultfd: {e}");
            return;
        }
    };
    let dst = memory(&[("ram", 0, LAZY)]);
    let (s, d) = migrate(&src, &dst);
    let lost = diff_ram(&src, &dst);
    assert!(
        lost.is_empty(),
        "{} pages lost, first {:?} (source verified: {}, destination verified: {}, handler served {})",
        lost.len(),
        lost.first(),
        s.verified,
        d.verified,
        lazy.served()
    );
    assert!(s.verified && d.verified);
    drop(lazy);
}
