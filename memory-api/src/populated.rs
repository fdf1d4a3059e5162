// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Which pages of a RAM block may hold data (see [`crate::RamBlock::populated_pages`]).
//!
//! Memory the host never populated reads as zero, so a migration source can send it as zero
//! without reading it. Two ways to know:
//!
//! - **Private anonymous memory**: this process's page tables. A page whose page-table entry is
//!   empty (neither present nor a swap-type entry) was never written since the mapping was made, or
//!   was discarded (`MADV_DONTNEED`): it reads as zero. The kernel reports non-empty entries with
//!   the `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7+). Every non-present, non-empty
//!   entry (swap, migration, device or marker entries) is in the kernel's `PAGE_IS_SWAPPED`
//!   category, so asking for `PAGE_IS_PRESENT | PAGE_IS_SWAPPED` misses nothing.
//! - **Shared or file-backed memory**: another process may have written the pages through its own
//!   mapping, so only the file knows: `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)` over the block's file
//!   range (holes read as zero). File systems without hole tracking report everything as data.
//!
//! The ABI below (ioctl number, `struct pm_scan_arg`, `struct page_region`, category bits) is
//! written from the kernel's documented user ABI (`Documentation/admin-guide/mm/pagemap.rst`,
//! `include/uapi/linux/fs.h`); Debian 12's libc headers predate it. Unit tests check it against the
//! running kernel.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock};

use vm_memory::MmapRegion;

use crate::mapping::{self, MappingKind, Vma};
use crate::{zero_scan, DirtyBitmap, Error, Result, PAGE_SHIFT, PAGE_SIZE};

/// Page category bits of `PAGEMAP_SCAN` (`PAGE_IS_*` in `include/uapi/linux/fs.h`).
pub(crate) mod category {
    /// The page may be write-protected through userfaultfd's async mode.
    #[cfg(test)]
    pub(crate) const WPALLOWED: u64 = 1 << 0;
    /// The page was written (userfaultfd write-protect tracking).
    #[cfg(test)]
    pub(crate) const WRITTEN: u64 = 1 << 1;
    /// The page is file-backed (page cache, including shmem/memfd).
    #[cfg(test)]
    pub(crate) const FILE: u64 = 1 << 2;
    /// The page-table entry maps a page.
    pub(crate) const PRESENT: u64 = 1 << 3;
    /// The page-table entry is a swap-type entry (swapped out, or being migrated).
    pub(crate) const SWAPPED: u64 = 1 << 4;
    /// The entry maps the shared zero page.
    pub(crate) const PFNZERO: u64 = 1 << 5;
    /// The entry maps a huge page (THP or hugetlb).
    #[cfg(test)]
    pub(crate) const HUGE: u64 = 1 << 6;
    /// The entry is soft-dirty.
    #[cfg(test)]
    pub(crate) const SOFT_DIRTY: u64 = 1 << 7;
    /// Every category the kernel knows of (the ABI's `PM_SCAN_CATEGORIES`).
    #[cfg(test)]
    pub(crate) const ALL: u64 =
        WPALLOWED | WRITTEN | FILE | PRESENT | SWAPPED | PFNZERO | HUGE | SOFT_DIRTY;
}

/// `struct pm_scan_arg` (`include/uapi/linux/fs.h`).
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    /// `sizeof(struct pm_scan_arg)`: the kernel refuses any other value.
    size: u64,
    /// `PM_SCAN_*` flags (none: report only, write-protect nothing).
    flags: u64,
    /// First address to scan (page aligned).
    start: u64,
    /// End of the range to scan.
    end: u64,
    /// Out: where the walk stopped (`end` unless the output vector filled up).
    walk_end: u64,
    /// Address of the `page_region` output array.
    vec: u64,
    /// Its length in entries.
    vec_len: u64,
    /// Stop after this many matching pages (0: no limit).
    max_pages: u64,
    /// Categories whose sense is inverted before matching.
    category_inverted: u64,
    /// A page matches only if it has all of these.
    category_mask: u64,
    /// ... and at least one of these (if non-zero).
    category_anyof_mask: u64,
    /// The categories reported in `page_region::categories` (adjacent pages with equal reported
    /// categories are merged into one region).
    return_mask: u64,
}

/// `struct page_region` (`include/uapi/linux/fs.h`): pages `[start, end)` with `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PageRegion {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) categories: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// `_IOWR(type, nr, size)` of the target's ioctl encoding.
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    // The generic encoding: 2 direction bits at 30 (read 2 | write 1), 14 size bits at 16.
    // powerpc, mips and sparc: 3 direction bits at 29 (read 2 | write 4), 13 size bits at 16.
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    let dir = (2u64 | 4) << 29;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    let dir = 3u64 << 30;
    dir | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub(crate) const PAGEMAP_SCAN: u64 = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

/// Output entries per ioctl: 6 KiB of stack. A 16 MiB chunk (4096 pages) fits in one call unless
/// more than 256 separate runs of populated pages are in it; then the walk continues.
const REGIONS_PER_CALL: usize = 256;

/// `PAGEMAP_SCAN` refused (ENOTTY/EINVAL: a kernel before 6.7; EPERM: a seccomp sandbox) or
/// `/proc/self/pagemap` missing:
/// private anonymous blocks then count as fully populated.
static SCAN_MISSING: AtomicBool = AtomicBool::new(false);

/// `/proc/self/pagemap`, opened once per process (`None`: it could not be opened).
///
/// The fd names this process's address space as of the open: a child made by `fork` that keeps
/// using it would query its parent's page tables. A VMM does not fork with guest RAM mapped.
fn pagemap() -> Option<&'static File> {
    static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();
    PAGEMAP
        .get_or_init(|| match File::open("/proc/self/pagemap") {
            Ok(f) => Some(f),
            Err(error) => {
                scan_missing(&format!("cannot open /proc/self/pagemap: {error}"));
                None
            }
        })
        .as_ref()
}

/// Switch to the fallback (everything populated) for good, logging once.
fn scan_missing(why: &str) {
    if !SCAN_MISSING.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reason = why,
            "PAGEMAP_SCAN unavailable (Linux 6.7+ needed): private anonymous guest RAM counts as \
             fully populated, so migration reads every page"
        );
    }
}

/// Is `PAGEMAP_SCAN` usable in this process (as far as known so far)?
#[cfg(test)]
pub(crate) fn pagemap_scan_usable() -> bool {
    pagemap().is_some() && !SCAN_MISSING.load(Ordering::Relaxed)
}

/// Call `f` for every region of `[start, end)` (host addresses, page aligned) whose categories
/// intersect `anyof`, reporting `return_mask`, in address order.
///
/// `Ok(false)`: the kernel has no `PAGEMAP_SCAN` (nothing was reported; the caller falls back).
pub(crate) fn scan(
    start: u64,
    end: u64,
    anyof: u64,
    return_mask: u64,
    mut f: impl FnMut(PageRegion),
) -> Result<bool> {
    if SCAN_MISSING.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let Some(pagemap) = pagemap() else {
        return Ok(false);
    };
    let mut regions = [PageRegion::default(); REGIONS_PER_CALL];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: REGIONS_PER_CALL as u64,
            category_anyof_mask: anyof,
            return_mask,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN on a pagemap fd reads `arg` (a live, correctly sized
        // `pm_scan_arg`: its `size` field says so), writes back inside `arg` (its `walk_end`) and at most
        // `arg.vec_len` entries of `regions` (a live local array of exactly that many
        // `page_region`s, each valid for any bit pattern). No flag asks it to change the page
        // tables: it only reads them. The fd is always this process's `/proc/self/pagemap`
        // (opened once by `pagemap()` and never closed), whose handler has exactly this contract.
        let rc = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                // ENOTTY/EINVAL: a kernel without PAGEMAP_SCAN (or with another `pm_scan_arg`);
                // EPERM/EACCES/ENOSYS: a sandbox (seccomp) refuses the ioctl.
                Some(libc::ENOTTY | libc::EINVAL | libc::EPERM | libc::EACCES | libc::ENOSYS) => {
                    scan_missing(&format!("PAGEMAP_SCAN: {error}"));
                    return Ok(false);
                }
                _ => {
                    return Err(Error::PopulatedScan {
                        what: "PAGEMAP_SCAN on /proc/self/pagemap",
                        source: error,
                    })
                }
            }
        }
        let filled = (rc as usize).min(REGIONS_PER_CALL);
        for r in &regions[..filled] {
            f(*r);
        }
        if arg.walk_end <= at {
            return Err(Error::PopulatedScan {
                what: "PAGEMAP_SCAN made no progress",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        // `walk_end < end`: the output vector filled up; go on from there.
        at = arg.walk_end;
    }
    Ok(true)
}

/// How a block finds its populated pages: decided from what the kernel says its mapping is
/// (its mapping type), when the block is made and again by
/// [`RamBlock::reclassify_mapping`](crate::RamBlock::reclassify_mapping).
///
/// # Examples
///
/// ```
/// use clearlog_memory::{MemorySystem, PopulatedMethod, RamBacking};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("anon", 0, 1 << 20).unwrap();
/// mem.add_ram_backed("memfd", 1 << 20, 1 << 20, RamBacking::Memfd { hugetlb: false }).unwrap();
/// let blocks = mem.ram_blocks();
/// assert_eq!(blocks[0].populated_method(), PopulatedMethod::PageTables);
/// assert_eq!(blocks[1].populated_method(), PopulatedMethod::FileData);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PopulatedMethod {
    /// Private anonymous memory: this process's page tables (`PAGEMAP_SCAN`).
    PageTables,
    /// One file mapped shared: the file's data ranges (`SEEK_DATA`/`SEEK_HOLE`).
    FileData,
    /// One file mapped private: pages copied on write (page tables) and the file's data ranges.
    PageTablesAndFileData,
    /// Nothing can be known without reading: every page counts as populated. A mapping of
    /// several kinds, a shared mapping whose file cannot be opened, memory registered with
    /// userfaultfd (a missing page's content comes from the handler), or no `/proc`.
    Everything,
}

/// The per-block state of the populated-pages query.
#[derive(Debug)]
pub(crate) struct Populated {
    state: RwLock<Classified>,
    /// Test switch: behave as on a kernel without `PAGEMAP_SCAN` or `SEEK_DATA`.
    force_fallback: AtomicBool,
}

/// What the kernel said the block's mapping is, and what follows for the query.
#[derive(Debug)]
struct Classified {
    method: PopulatedMethod,
    /// The mapped file, as a private open file description (`SEEK_DATA`/`SEEK_HOLE` move its
    /// offset, which the caller's fd must keep), for the file methods.
    file: Option<File>,
    /// File offset of the block's first byte.
    file_offset: u64,
}

impl Populated {
    /// The state of a new block over `mapping`, asking the kernel what the mapping is.
    pub(crate) fn for_mapping(mapping: &MmapRegion<DirtyBitmap>) -> Self {
        let vmas = current_vmas();
        Populated {
            state: RwLock::new(Classified::of(mapping, vmas.as_deref())),
            force_fallback: AtomicBool::new(false),
        }
    }

    /// Ask the kernel again (`vmas`: this process's VMAs, read once for several blocks).
    pub(crate) fn reclassify(&self, mapping: &MmapRegion<DirtyBitmap>, vmas: Option<&[Vma]>) {
        let fresh = Classified::of(mapping, vmas);
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.method != fresh.method {
            tracing::info!(
                host_addr = mapping.as_ptr() as u64,
                size = mapping.size(),
                was = ?state.method,
                now = ?fresh.method,
                "a RAM block's mapping changed: populated pages are now found another way"
            );
        }
        *state = fresh;
    }

    pub(crate) fn method(&self) -> PopulatedMethod {
        self.state.read().unwrap_or_else(|p| p.into_inner()).method
    }

    #[cfg(feature = "testing")]
    pub(crate) fn set_force_fallback(&self, on: bool) {
        self.force_fallback.store(on, Ordering::Relaxed);
    }

    /// Append to `out` the page ranges of `pages` (block page numbers, already checked to be in
    /// the block) that may hold data: sorted, merged, clipped to `pages`.
    pub(crate) fn query(
        &self,
        mapping: &MmapRegion<DirtyBitmap>,
        pages: Range<u64>,
        out: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let base = out.len();
        let result = self.query_into(mapping, pages, base, out);
        if result.is_err() {
            out.truncate(base);
        }
        result
    }

    fn query_into(
        &self,
        mapping: &MmapRegion<DirtyBitmap>,
        pages: Range<u64>,
        base: usize,
        out: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        let everything = |out: &mut Vec<Range<u64>>| -> Result<()> {
            out.truncate(base);
            out.push(pages.clone());
            Ok(())
        };
        if self.force_fallback.load(Ordering::Relaxed) {
            return everything(out);
        }
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let file = || state.file.as_ref().map(|f| (f, state.file_offset));
        match state.method {
            PopulatedMethod::Everything => everything(out),
            PopulatedMethod::PageTables => {
                if query_pagemap(mapping, &pages, base, out)? {
                    Ok(())
                } else {
                    everything(out)
                }
            }
            PopulatedMethod::FileData => {
                if query_file(file(), &pages, base, out)? {
                    Ok(())
                } else {
                    everything(out)
                }
            }
            PopulatedMethod::PageTablesAndFileData => {
                if !query_pagemap(mapping, &pages, base, out)? {
                    return everything(out);
                }
                let mid = out.len();
                if !query_file(file(), &pages, mid, out)? {
                    return everything(out);
                }
                normalize(out, base);
                Ok(())
            }
        }
    }

    /// Call `nonzero(page)` for every page of `pages` (block page numbers, checked by the caller)
    /// that holds a non-zero byte, by reading it, in page order, never from the populated-pages
    /// answer:
    ///
    /// - a file mapped shared: `pread` from the file (the same bytes; reading a hole through a
    ///   shared mapping would allocate it, `pread` reads it as zero without allocating);
    /// - private anonymous memory: one byte of every 2 MiB is read first, which maps untouched
    ///   memory to the kernel's shared zero page (a 2 MiB huge zero page with transparent huge
    ///   pages); then the kernel says which pages of the range now map that zero page
    ///   (`PAGEMAP_SCAN`, `PAGE_IS_PFNZERO`: a positive statement, the zero page is never
    ///   written, so those pages are zero by construction, not by absence) and every other page
    ///   is read in full. Without that answer (no `PAGEMAP_SCAN`, or it reports nothing) every
    ///   page is read in full: silence never counts as zero;
    /// - anything else: every page read in full, in place.
    pub(crate) fn nonzero_pages(
        &self,
        mapping: &MmapRegion<DirtyBitmap>,
        pages: Range<u64>,
        mut nonzero: impl FnMut(u64),
    ) -> Result<()> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let method = state.method;
        if let (PopulatedMethod::FileData, Some(file)) = (method, state.file.as_ref()) {
            return pread_nonzero(file, state.file_offset, pages, nonzero);
        }
        drop(state);
        let zero_mapped = if method == PopulatedMethod::PageTables
            && !self.force_fallback.load(Ordering::Relaxed)
        {
            zero_page_ranges(mapping, &pages)?
        } else {
            Vec::new()
        };
        // Read in full every page outside the ranges mapped to the zero page.
        let mut at = pages.start;
        for r in zero_mapped
            .iter()
            .chain(std::iter::once(&(pages.end..pages.end)))
        {
            if at < r.start {
                let base = mapping.as_ptr().wrapping_add((at << PAGE_SHIFT) as usize);
                // SAFETY: `at..r.start` lies inside `pages`, which lies inside the block (checked
                // by the caller), so the pages at `base` are inside `mapping`, which the caller's
                // borrow keeps mapped for the whole call; the mapping is page aligned.
                unsafe {
                    zero_scan::scan_nonzero(base, (r.start - at) as usize, |i| {
                        nonzero(at + i as u64);
                    });
                };
            }
            at = at.max(r.end);
        }
        Ok(())
    }
}

/// The page ranges of `pages` (block page numbers) that map the kernel's shared zero page, after
/// one byte of every 2 MiB of them was read (mapping untouched private anonymous memory to it):
/// sorted, merged, clipped to `pages`. Empty when `PAGEMAP_SCAN` is missing.
fn zero_page_ranges(
    mapping: &MmapRegion<DirtyBitmap>,
    pages: &Range<u64>,
) -> Result<Vec<Range<u64>>> {
    const HUGE: u64 = 2 << 20;
    let host = mapping.as_ptr() as u64;
    let start = host + (pages.start << PAGE_SHIFT);
    let end = host + (pages.end << PAGE_SHIFT);
    let mut at = start;
    while at < end {
        // SAFETY: `at` lies inside `[start, end)`, inside the mapping the caller's borrow keeps
        // mapped; a volatile one-byte read of memory the guest may write is fine.
        unsafe { std::ptr::read_volatile(at as *const u8) };
        at = (at / HUGE + 1) * HUGE;
    }
    let mut out = Vec::new();
    scan(start, end, category::PFNZERO, category::PFNZERO, |r| {
        // Inside the range, page aligned (the kernel reports whole pages of it).
        let first = (r.start.max(start) - host) >> PAGE_SHIFT;
        let last = (r.end.min(end) - host) >> PAGE_SHIFT;
        push_merged(&mut out, 0, first..last);
    })?;
    Ok(out)
}

/// This process's VMAs, or `None` (logged) when `/proc/self/smaps` cannot be read.
pub(crate) fn current_vmas() -> Option<Vec<Vma>> {
    match mapping::read_vmas() {
        Ok(v) => Some(v),
        Err(error) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    %error,
                    "cannot read /proc/self/smaps: every RAM block counts as fully populated, so \
                     migration reads every page"
                );
            }
            None
        }
    }
}

impl Classified {
    fn of(mapping: &MmapRegion<DirtyBitmap>, vmas: Option<&[Vma]>) -> Self {
        let everything = Classified {
            method: PopulatedMethod::Everything,
            file: None,
            file_offset: 0,
        };
        let Some(vmas) = vmas else {
            return everything;
        };
        let start = mapping.as_ptr() as u64;
        let kind = mapping::classify(vmas, start, mapping.size() as u64);
        let (method, dev, inode, offset) = match kind {
            MappingKind::PrivateAnonymous => {
                return Classified {
                    method: PopulatedMethod::PageTables,
                    ..everything
                }
            }
            MappingKind::Userfaultfd | MappingKind::Other => return everything,
            MappingKind::SharedFile { dev, inode, offset } => {
                (PopulatedMethod::FileData, dev, inode, offset)
            }
            MappingKind::PrivateFile { dev, inode, offset } => {
                (PopulatedMethod::PageTablesAndFileData, dev, inode, offset)
            }
        };
        match open_mapped_file(mapping, vmas, dev, inode) {
            Some(file) => Classified {
                method,
                file: Some(file),
                file_offset: offset,
            },
            None => {
                tracing::warn!(
                    host_addr = start,
                    "cannot open the file a RAM block maps (no FileOffset for it, and \
                     /proc/self/map_files needs CAP_SYS_ADMIN): the block counts as fully populated"
                );
                everything
            }
        }
    }
}

/// A private open file description of the file mapped at `mapping`, checked to be the one the
/// kernel maps there (`dev`, `inode`): the region's `FileOffset` file reopened, or else the file
/// behind `/proc/self/map_files/` (a raw mapping adopted without its file).
fn open_mapped_file(
    mapping: &MmapRegion<DirtyBitmap>,
    vmas: &[Vma],
    dev: (u32, u32),
    inode: u64,
) -> Option<File> {
    let is_it = |f: &File| {
        f.metadata().is_ok_and(|m| {
            mapping::dev_of(&m) == dev && std::os::unix::fs::MetadataExt::ino(&m) == inode
        })
    };
    if let Some(fo) = mapping.file_offset() {
        // A new open file description of the same file: our lseeks must not move the offset of
        // the caller's fd (or of a vhost-user backend that received it).
        if let Ok(f) = File::open(format!("/proc/self/fd/{}", fo.file().as_raw_fd())) {
            if is_it(&f) {
                return Some(f);
            }
        }
    }
    let start = mapping.as_ptr() as u64;
    let vma = vmas.iter().find(|v| v.range.contains(&start))?;
    let f = File::open(format!(
        "/proc/self/map_files/{:x}-{:x}",
        vma.range.start, vma.range.end
    ))
    .ok()?;
    is_it(&f).then_some(f)
}

/// `PAGEMAP_SCAN` over `pages` of `mapping`; `Ok(false)` without the ioctl.
fn query_pagemap(
    mapping: &MmapRegion<DirtyBitmap>,
    pages: &Range<u64>,
    base: usize,
    out: &mut Vec<Range<u64>>,
) -> Result<bool> {
    let host = mapping.as_ptr() as u64;
    let start = host + (pages.start << PAGE_SHIFT);
    let end = host + (pages.end << PAGE_SHIFT);
    let wanted = category::PRESENT | category::SWAPPED;
    scan(start, end, wanted, wanted, |r| {
        // Round outwards and clip: the kernel reports page-aligned regions inside the range.
        let first = (r.start.max(start) - host) >> PAGE_SHIFT;
        let last = (r.end.min(end) - host).div_ceil(PAGE_SIZE);
        push_merged(out, base, first..last);
    })
}

/// The data ranges of the mapped file over `pages`; `Ok(false)` without a file.
fn query_file(
    file: Option<(&File, u64)>,
    pages: &Range<u64>,
    base: usize,
    out: &mut Vec<Range<u64>>,
) -> Result<bool> {
    let Some((file, file_base)) = file else {
        return Ok(false);
    };
    let start = file_base + (pages.start << PAGE_SHIFT);
    let end = file_base + (pages.end << PAGE_SHIFT);
    let mut at = start;
    while at < end {
        let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
            break; // ENXIO: no data at or after `at`
        };
        if data >= end {
            break;
        }
        // There is always a hole at the end of the file, so SEEK_HOLE after data finds one.
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        if hole <= data {
            return Err(Error::PopulatedScan {
                what: "lseek(SEEK_HOLE) went backwards",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        // File systems may track holes in blocks smaller than a page: round outwards.
        let first = (data - file_base) >> PAGE_SHIFT;
        let last = (hole - file_base).div_ceil(PAGE_SIZE);
        push_merged(out, base, first..last);
        at = hole;
    }
    Ok(true)
}

/// Pages read per `pread` by [`pread_nonzero`] (256 KiB).
const PREAD_PAGES: u64 = 64;

/// [`Populated::nonzero_pages`] through the file: `pread`, then a zero check of each page.
fn pread_nonzero(
    file: &File,
    file_base: u64,
    pages: Range<u64>,
    mut nonzero: impl FnMut(u64),
) -> Result<()> {
    let mut buf = vec![0u8; (PREAD_PAGES * PAGE_SIZE) as usize];
    let mut page = pages.start;
    while page < pages.end {
        let n = (pages.end - page).min(PREAD_PAGES);
        let bytes = &mut buf[..(n * PAGE_SIZE) as usize];
        let mut got = 0;
        while got < bytes.len() {
            match file.read_at(
                &mut bytes[got..],
                file_base + (page << PAGE_SHIFT) + got as u64,
            ) {
                // Past the end of the file: a mapping cannot hold data there (it would fault).
                Ok(0) => {
                    bytes[got..].fill(0);
                    got = bytes.len();
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::PopulatedScan {
                        what: "pread of the RAM backing file",
                        source,
                    })
                }
            }
        }
        for (i, p) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
            if p.iter().any(|&b| b != 0) {
                nonzero(page + i as u64);
            }
        }
        page += n;
    }
    Ok(())
}

/// `lseek(file, offset, whence)`; `None` on ENXIO (no data or hole there: past the end of file).
fn seek(file: &File, offset: u64, whence: i32) -> Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(|_| Error::PopulatedScan {
        what: "file offset past off_t",
        source: io::Error::from_raw_os_error(libc::EOVERFLOW),
    })?;
    // SAFETY: plain lseek(2) on an fd we own (a private open file description, so moving its
    // offset affects nobody); no memory is handed to the kernel.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(Error::PopulatedScan {
            what: if whence == libc::SEEK_DATA {
                "lseek(SEEK_DATA) on the RAM backing file"
            } else {
                "lseek(SEEK_HOLE) on the RAM backing file"
            },
            source: error,
        });
    }
    Ok(Some(rc as u64))
}

/// Append `r` to `out`, merging with the last range if that one was appended by this query
/// (`out[base..]`) and touches or overlaps `r`. `r` must not start before that range.
fn push_merged(out: &mut Vec<Range<u64>>, base: usize, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    if out.len() > base {
        if let Some(last) = out.last_mut() {
            if r.start <= last.end {
                last.end = last.end.max(r.end);
                return;
            }
        }
    }
    out.push(r);
}

/// Sort and merge `out[base..]` in place (no allocation: `sort_unstable` works in place).
fn normalize(out: &mut Vec<Range<u64>>, base: usize) {
    out[base..].sort_unstable_by_key(|r| r.start);
    let mut w = base;
    for i in base..out.len() {
        let r = out[i].clone();
        if w > base && r.start <= out[w - 1].end {
            out[w - 1].end = out[w - 1].end.max(r.end);
        } else {
            out[w] = r;
            w += 1;
        }
    }
    out.truncate(w);
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one-range answers are what is being checked
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_the_kernel_abi() {
        // _IOWR('f', 16, 96 bytes) in the generic encoding, as <linux/fs.h> computes it.
        #[cfg(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        ))]
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn push_merged_merges_only_this_querys_ranges() {
        let mut out = vec![0..4];
        push_merged(&mut out, 1, 4..6);
        assert_eq!(out, [0..4, 4..6]);
        push_merged(&mut out, 1, 6..8);
        push_merged(&mut out, 1, 8..8);
        push_merged(&mut out, 1, 10..11);
        assert_eq!(out, [0..4, 4..8, 10..11]);
    }

    #[test]
    fn normalize_sorts_and_merges_the_tail() {
        let mut out = vec![100..200, 5..6, 1..3, 3..4, 9..12, 10..11, 0..1];
        normalize(&mut out, 1);
        assert_eq!(out, [100..200, 0..4, 5..6, 9..12]);
        let mut empty: Vec<Range<u64>> = vec![1..2];
        normalize(&mut empty, 1);
        assert_eq!(empty, [1..2]);
    }

    fn kernel_has_pagemap_scan() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut it = release.trim().split(['.', '-']);
        let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        (major, minor) >= (6, 7)
    }

    /// An anonymous private mapping without THP (so pages are reported one by one).
    fn anon(pages: usize) -> MmapRegion<DirtyBitmap> {
        let m = MmapRegion::<DirtyBitmap>::new(pages << PAGE_SHIFT).unwrap();
        // SAFETY: the range is exactly the mapping `m` owns; the advice changes no contents.
        let rc = unsafe { libc::madvise(m.as_ptr().cast(), m.size(), libc::MADV_NOHUGEPAGE) };
        assert_eq!(rc, 0);
        m
    }

    fn categories_of(m: &MmapRegion<DirtyBitmap>, anyof: u64) -> Vec<(u64, u64, u64)> {
        let host = m.as_ptr() as u64;
        let mut v = Vec::new();
        let ok = scan(host, host + m.size() as u64, anyof, category::ALL, |r| {
            v.push(((r.start - host) >> 12, (r.end - host) >> 12, r.categories));
        })
        .unwrap();
        assert!(ok, "PAGEMAP_SCAN refused on a kernel that has it");
        v
    }

    #[test]
    #[cfg_attr(miri, ignore = "ioctl")]
    fn categories_match_what_the_kernel_reports() {
        if !kernel_has_pagemap_scan() {
            eprintln!("SKIPPED: kernel older than 6.7 has no PAGEMAP_SCAN");
            return;
        }
        use vm_memory::VolatileMemory;
        let m = anon(16);
        m.get_slice(3 << 12, 1).unwrap().copy_from(&[1u8]); // written: private anonymous pages
        m.get_slice(4 << 12, 1).unwrap().copy_from(&[1u8]);
        let mut b = [0u8; 1];
        m.get_slice(8 << 12, 1).unwrap().copy_to(&mut b[..]); // read only: the shared zero page
        let got = categories_of(&m, category::PRESENT | category::SWAPPED);
        assert_eq!(got.len(), 2, "{got:x?}");
        let (s, e, c) = got[0];
        assert_eq!((s, e), (3, 5));
        assert_ne!(c & category::PRESENT, 0, "written page not PRESENT: {c:#x}");
        assert_eq!(
            c & (category::SWAPPED | category::FILE | category::PFNZERO | category::HUGE),
            0,
            "{c:#x}"
        );
        let (s, e, c) = got[1];
        assert_eq!((s, e), (8, 9));
        assert_ne!(c & category::PRESENT, 0, "{c:#x}");
        assert_ne!(
            c & category::PFNZERO,
            0,
            "read-only page not on the zero page: {c:#x}"
        );
        assert!(pagemap_scan_usable());

        // Nothing matches "swapped" in memory that never left RAM.
        assert!(categories_of(&m, category::SWAPPED).is_empty());
    }

    #[test]
    #[cfg_attr(miri, ignore = "ioctl")]
    fn shared_file_pages_are_file_category() {
        if !kernel_has_pagemap_scan() {
            eprintln!("SKIPPED: kernel older than 6.7 has no PAGEMAP_SCAN");
            return;
        }
        use vm_memory::{FileOffset, VolatileMemory};
        // SAFETY: a NUL-terminated name; no memory is handed over.
        let fd = unsafe { libc::memfd_create(c"populated-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(4 << 12).unwrap();
        let m = MmapRegion::<DirtyBitmap>::from_file(FileOffset::new(file, 0), 4 << 12).unwrap();
        m.get_slice(2 << 12, 1).unwrap().copy_from(&[7u8]);
        let got = categories_of(&m, category::PRESENT | category::SWAPPED);
        assert_eq!(got.len(), 1, "{got:x?}");
        assert_eq!((got[0].0, got[0].1), (2, 3));
        assert_ne!(got[0].2 & category::PRESENT, 0);
        assert_ne!(
            got[0].2 & category::FILE,
            0,
            "memfd page not FILE: {:#x}",
            got[0].2
        );
        assert_eq!(
            Populated::for_mapping(&m).method(),
            PopulatedMethod::FileData
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "mmap")]
    fn method_follows_what_the_kernel_says_the_mapping_is() {
        let m = anon(1);
        assert_eq!(
            Populated::for_mapping(&m).method(),
            PopulatedMethod::PageTables
        );
        // Shared anonymous memory is a shmem file inside the kernel: its data ranges are known
        // when /proc/self/map_files can be opened (CAP_SYS_ADMIN), and nothing is otherwise.
        let shared = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(4096, DirtyBitmap::new())
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_ANONYMOUS)
            .build()
            .unwrap();
        let method = Populated::for_mapping(&shared).method();
        assert!(
            matches!(
                method,
                PopulatedMethod::FileData | PopulatedMethod::Everything
            ),
            "{method:?}"
        );
    }

    /// `nonzero_pages` of private anonymous memory: pages mapped to the zero page after the
    /// touch are skipped, everything else is read, and the answer is exact either way.
    #[test]
    #[cfg_attr(miri, ignore = "mmap")]
    fn nonzero_pages_of_anonymous_memory_are_exact() {
        for huge in [false, true] {
            const PAGES: u64 = 4096; // 16 MiB
            let m = anon(PAGES as usize);
            if huge {
                // SAFETY: the range is exactly the mapping `m` owns; the advice changes no contents.
                unsafe { libc::madvise(m.as_ptr().cast(), m.size(), libc::MADV_HUGEPAGE) };
            }
            use vm_memory::VolatileMemory;
            for p in [0u64, 1, 511, 512, 3000, PAGES - 1] {
                m.get_slice((p << PAGE_SHIFT) as usize + 4095, 1)
                    .unwrap()
                    .copy_from(&[0x42u8]);
            }
            // Written, then zero again: present, not the zero page, but zero.
            m.get_slice(2000 << PAGE_SHIFT, 8)
                .unwrap()
                .copy_from(&[1u8; 8]);
            m.get_slice(2000 << PAGE_SHIFT, 8)
                .unwrap()
                .copy_from(&[0u8; 8]);
            let populated = Populated::for_mapping(&m);
            let mut found = Vec::new();
            populated
                .nonzero_pages(&m, 0..PAGES, |p| found.push(p))
                .unwrap();
            assert_eq!(
                found,
                [0, 1, 511, 512, 3000, PAGES - 1],
                "huge pages: {huge}"
            );
            found.clear();
            populated
                .nonzero_pages(&m, 100..3001, |p| found.push(p))
                .unwrap();
            assert_eq!(found, [511, 512, 3000], "huge pages: {huge}");
        }
    }

    /// A memfd of `pages` pages mapped `MAP_SHARED` by "the VMM" (this test), not by vm-memory.
    fn vmm_mapped_memfd(pages: usize) -> (File, *mut u8) {
        // SAFETY: a NUL-terminated name; no memory is handed over.
        let fd = unsafe { libc::memfd_create(c"vmm-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len((pages << PAGE_SHIFT) as u64).unwrap();
        // SAFETY: a new shared mapping of the memfd chosen by the kernel; the tests unmap it
        // only after every region over it is dropped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages << PAGE_SHIFT,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (file, p.cast())
    }

    /// Finding: the method came from `MmapRegion::flags()`, which `with_raw_mmap_pointer` leaves at
    /// `MAP_PRIVATE | MAP_ANONYMOUS` whatever the VMM mapped: a shared memfd was scanned as private
    /// anonymous memory, and a page written with `pwrite` (or by another process) was reported
    /// as never populated, so migration sent it as zero.
    #[test]
    #[cfg_attr(miri, ignore = "mmap")]
    fn a_raw_shared_memfd_mapping_is_not_taken_for_anonymous_memory() {
        if !kernel_has_pagemap_scan() {
            eprintln!("SKIPPED: kernel older than 6.7 has no PAGEMAP_SCAN");
            return;
        }
        const PAGES: usize = 16;
        let (file, p) = vmm_mapped_memfd(PAGES);
        // SAFETY: `p` is a live mapping of PAGES pages that outlives `m` (unmapped below, after
        // `m` is dropped); vm-memory does not unmap a raw pointer region.
        let m = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
                PAGES << PAGE_SHIFT,
                DirtyBitmap::new(),
            )
            .with_raw_mmap_pointer(p)
            .build()
            .unwrap()
        };
        // Written behind this process's page tables, as a vhost-user backend or `pwrite` does.
        file.write_all_at(&[0x5a; 4096], 9 << PAGE_SHIFT).unwrap();
        let populated = Populated::for_mapping(&m);
        assert_ne!(
            populated.method(),
            PopulatedMethod::PageTables,
            "a shared memfd mapping was classified from vm-memory's default flags"
        );
        let mut out = Vec::new();
        populated.query(&m, 0..PAGES as u64, &mut out).unwrap();
        assert!(
            out.iter().any(|r| r.contains(&9)),
            "page 9 (written with pwrite) reported as never populated: {out:?}"
        );
        let mut nonzero = Vec::new();
        populated
            .nonzero_pages(&m, 0..PAGES as u64, |p| nonzero.push(p))
            .unwrap();
        assert_eq!(nonzero, [9]);
        drop(m);
        // SAFETY: the mapping made by `vmm_mapped_memfd`; nothing refers to it any more.
        unsafe { libc::munmap(p.cast(), PAGES << PAGE_SHIFT) };
    }

    /// `struct uffdio_api` and `struct uffdio_register` (`include/uapi/linux/userfaultfd.h`).
    #[repr(C)]
    #[derive(Default)]
    struct UffdioApi {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct UffdioRegister {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }

    /// Finding: under a missing-mode userfaultfd a never-touched page is empty in the page tables
    /// but its content comes from the handler: it was reported as never populated (zero).
    #[test]
    #[cfg_attr(miri, ignore = "userfaultfd")]
    fn userfaultfd_registered_memory_counts_as_populated() {
        let m = anon(8);
        // SAFETY: userfaultfd(2) takes flags only.
        let uffd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if uffd < 0 {
            eprintln!(
                "SKIPPED: userfaultfd unavailable ({})",
                io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: `uffd` was just returned by the kernel and nothing else owns it.
        let uffd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(uffd as i32) };
        let mut api = UffdioApi {
            api: 0xaa,
            ..Default::default()
        };
        // UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)
        // SAFETY: the ioctl reads and writes one `uffdio_api`, which `api` is.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), iowr(0xaa, 0x3f, 24) as _, &mut api) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let mut reg = UffdioRegister {
            start: m.as_ptr() as u64,
            len: m.size() as u64,
            mode: 1, // UFFDIO_REGISTER_MODE_MISSING
            ..Default::default()
        };
        // UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register)
        // SAFETY: the ioctl reads and writes one `uffdio_register`, which `reg` is; it registers
        // a mapping this test owns (`m`), and no page of it is touched while registered.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), iowr(0xaa, 0x00, 32) as _, &mut reg) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let populated = Populated::for_mapping(&m);
        assert_eq!(populated.method(), PopulatedMethod::Everything);
        let mut out = Vec::new();
        populated.query(&m, 0..8, &mut out).unwrap();
        assert_eq!(out, [0..8]);
        // Closing the userfaultfd unregisters the range; asking again sees plain memory.
        drop(uffd);
        populated.reclassify(&m, current_vmas().as_deref());
        assert_eq!(populated.method(), PopulatedMethod::PageTables);
    }
}
