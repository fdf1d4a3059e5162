// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! RAM blocks: guest RAM backed by host memory (vm-memory's `MmapRegion` with a [`DirtyBitmap`]).

use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use crate::backing::NewMapping;
use crate::ids::RamBlockId;
use crate::populated::Populated;
use crate::{
    DirtyBitmap, DirtyMemory, Error, PopulatedMethod, RamBacking, Result, PAGE_SHIFT, PAGE_SIZE,
};

/// A block of guest RAM: host memory, placed in the RAM address space at a page offset that
/// is a multiple of 64 pages (so its dirty bits start on a bitmap word).
///
/// The host memory is a vm-memory [`MmapRegion<DirtyBitmap>`], shared (as an `Arc`) with any
/// vm-memory `GuestMemoryMmap<DirtyBitmap>` that shows it (see
/// [`crate::MemorySystem::add_guest_memory`] and [`crate::MemorySystem::guest_memory`]): writes
/// through either are marked dirty by the region's [`DirtyBitmap`]. By default
/// ([`RamBacking::Anonymous`]) it is a private anonymous `MAP_NORESERVE` mapping: untouched pages
/// cost nothing, so a multi-GiB guest is cheap until it runs. [`RamBacking`] gives memfd and
/// file-backed (shared, possibly hugetlbfs) blocks.
/// All host-side accesses are volatile copies, because the guest may write the same bytes at any time.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyClient, MemorySystem};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0, 0x10000).unwrap();
/// let block = mem.ram_blocks()[0].clone();
/// mem.log_global_start().unwrap();
/// block.write(0x2000, b"hello").unwrap();
/// let mut buf = [0u8; 5];
/// block.read(0x2000, &mut buf).unwrap();
/// assert_eq!(&buf, b"hello");
/// // The write is dirty for migration.
/// assert!(mem.dirty().client(DirtyClient::Migration).test(block.ram_page_offset() as usize + 2));
/// ```
#[derive(Debug)]
pub struct RamBlock {
    id: RamBlockId,
    name: String,
    mapping: Arc<MmapRegion<DirtyBitmap>>,
    pages: u64,
    ram_page_offset: u64,
    dirty: Arc<DirtyMemory>,
    populated: Populated,
}

impl RamBlock {
    /// A block over `mapping` (size a non-zero page multiple, checked by the caller) at
    /// `ram_page_offset` of `dirty`'s RAM address space; attaches the mapping's bitmap there.
    ///
    /// `anonymous`: the mapping is ours and anonymous, so it gets the THP advice.
    pub(crate) fn new(
        id: RamBlockId,
        name: &str,
        mapping: Arc<MmapRegion<DirtyBitmap>>,
        ram_page_offset: u64,
        dirty: Arc<DirtyMemory>,
        anonymous: bool,
        guest_addr: Option<u64>,
    ) -> Result<Self> {
        let pages = (mapping.size() as u64) >> PAGE_SHIFT;
        mapping
            .bitmap()
            .attach(&dirty, ram_page_offset, pages, guest_addr)?;
        if anonymous {
            // Ask for transparent huge pages, as other VMMs do for guest RAM: the first touch of a
            // multi-GiB guest (boot, or a migration destination loading pages) then takes one fault
            // per 2 MiB instead of one per 4 KiB. Dirty logging still tracks 4 KiB pages (KVM maps
            // logged slots with small pages). Only advice: failure (THP disabled) changes nothing
            // but speed.
            // SAFETY: the range is exactly the anonymous mapping vm-memory created for this block
            // and still owns (kept alive by `mapping`); MADV_HUGEPAGE does not change its contents.
            let rc = unsafe {
                libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE)
            };
            if rc != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_HUGEPAGE) on guest RAM");
            }
        }
        let populated = Populated::for_mapping(&mapping);
        Ok(RamBlock {
            id,
            name: name.to_owned(),
            populated,
            mapping,
            pages,
            ram_page_offset,
            dirty,
        })
    }

    /// Map `size` bytes (a non-zero page multiple, checked by the caller) of `backing`.
    pub(crate) fn with_backing(
        id: RamBlockId,
        name: &str,
        size: u64,
        ram_page_offset: u64,
        dirty: Arc<DirtyMemory>,
        backing: &RamBacking,
    ) -> Result<Self> {
        let NewMapping { mmap, anonymous } = backing.map(name, size)?;
        Self::new(
            id,
            name,
            Arc::new(mmap),
            ram_page_offset,
            dirty,
            anonymous,
            None,
        )
    }

    /// Block id.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// # mem.add_ram("ram", 0, 0x10000).unwrap();
    /// let block = &mem.ram_blocks()[0];
    /// assert!(mem.ram_block(block.id()).is_ok());
    /// ```
    pub fn id(&self) -> RamBlockId {
        self.id
    }

    /// Block name (unique in its memory system; it names the block in a migration stream).
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("pc.ram", 0, 0x10000).unwrap();
    /// assert_eq!(mem.ram_blocks()[0].name(), "pc.ram");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes (a page multiple).
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10000).unwrap();
    /// assert_eq!(mem.ram_blocks()[0].size(), 0x10000);
    /// ```
    pub fn size(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }

    /// Size in pages.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10000).unwrap();
    /// assert_eq!(mem.ram_blocks()[0].pages(), 16);
    /// ```
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// First page of this block in the RAM address space (a multiple of 64).
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("a", 0, 0x1000).unwrap(); // 1 page, but blocks start on 64-page boundaries
    /// mem.add_ram("b", 0x1000, 0x1000).unwrap();
    /// let offsets: Vec<u64> = mem.ram_blocks().iter().map(|b| b.ram_page_offset()).collect();
    /// assert_eq!(offsets, [0, 64]);
    /// ```
    pub fn ram_page_offset(&self) -> u64 {
        self.ram_page_offset
    }

    /// Host virtual address of the block's first byte (what an accelerator registers with KVM).
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10000).unwrap();
    /// assert_eq!(mem.ram_blocks()[0].host_addr() % 4096, 0);
    /// ```
    pub fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }

    /// The host mapping, shared with any vm-memory `GuestRegionMmap` that shows this block (build
    /// one with `GuestRegionMmap::with_arc(block.mmap().clone(), guest_addr)`; writes through it
    /// are tracked by its [`DirtyBitmap`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
    /// use clearlog_memory::{DirtyClient, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0x10_0000, 0x10000).unwrap();
    /// mem.log_global_start().unwrap();
    /// let block = mem.ram_blocks()[0].clone();
    /// let region = GuestRegionMmap::with_arc(block.mmap().clone(), GuestAddress(0x10_0000)).unwrap();
    /// let gm = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    /// gm.write_slice(b"dma", GuestAddress(0x10_1000)).unwrap();
    /// assert!(mem.dirty().client(DirtyClient::Migration).test(1));
    /// ```
    pub fn mmap(&self) -> &Arc<MmapRegion<DirtyBitmap>> {
        &self.mapping
    }

    /// The file and offset backing this block, if it has one ([`RamBacking::Memfd`] or
    /// [`RamBacking::File`], or an adopted file-backed vm-memory region): what a VMM hands to a
    /// vhost-user backend.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{MemorySystem, RamBacking};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("anon", 0, 0x10000).unwrap();
    /// mem.add_ram_backed("shared", 0x10000, 0x10000, RamBacking::Memfd { hugetlb: false }).unwrap();
    /// let blocks = mem.ram_blocks();
    /// assert!(blocks[0].file_offset().is_none());
    /// assert_eq!(blocks[1].file_offset().unwrap().start(), 0);
    /// ```
    pub fn file_offset(&self) -> Option<&FileOffset> {
        self.mapping.file_offset()
    }

    /// Is the block's memory on hugetlbfs (a `MFD_HUGETLB` memfd or a hugetlbfs file)?
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x10000).unwrap();
    /// assert!(!mem.ram_blocks()[0].is_hugetlbfs());
    /// ```
    pub fn is_hugetlbfs(&self) -> bool {
        self.mapping.is_hugetlbfs() == Some(true)
    }

    /// Copy bytes out of the block at `offset` (volatile: the guest may be writing concurrently).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `[offset, offset + buf.len())` is not inside the block.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x1000).unwrap();
    /// let block = &mem.ram_blocks()[0];
    /// let mut buf = [1u8; 8];
    /// block.read(0xff8, &mut buf).unwrap();
    /// assert_eq!(buf, [0; 8]);
    /// assert!(block.read(0xff9, &mut buf).is_err());
    /// ```
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let slice = self.slice(offset, buf.len() as u64)?;
        // `copy_to` of bytes is one `memcpy`; the source is guest memory, so a concurrent guest write
        // may tear the copy: callers that need a consistent page re-send it when it is dirty again.
        slice.copy_to(buf);
        Ok(())
    }

    /// Copy one page out of the block (what migration sends): one 4 KiB `memcpy` from guest memory.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `page >= self.pages()`.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{is_zero_page, PAGE_SIZE};
    /// # let mem = clearlog_memory::MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x4000).unwrap();
    /// let block = &mem.ram_blocks()[0];
    /// block.write(PAGE_SIZE * 3 + 7, &[9]).unwrap();
    /// let mut page = [0u8; PAGE_SIZE as usize];
    /// block.read_page(3, &mut page).unwrap();
    /// assert_eq!(page[7], 9);
    /// assert!(!is_zero_page(&page));
    /// ```
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE as usize]) -> Result<()> {
        let offset = page.checked_mul(PAGE_SIZE).ok_or(Error::OutOfRange {
            what: "block",
            offset: u64::MAX,
            len: PAGE_SIZE,
            size: self.size(),
        })?;
        self.read(offset, buf)
    }

    /// Write bytes into the block at `offset` and mark the pages dirty for every logging client:
    /// no host-side write through this API escapes tracking.
    ///
    /// The write goes through the mapping's [`DirtyBitmap`], like a write through vm-memory. The
    /// pages are marked after the bytes land, so whoever takes the dirty bit reads the new data.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `[offset, offset + data.len())` is not inside the block (nothing is
    /// written then).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let ram = mem.add_ram("vram", 0, 0x4000).unwrap();
    /// mem.set_region_logging(ram, DirtyClient::Vga, true).unwrap();
    /// let block = &mem.ram_blocks()[0];
    /// block.write(0xffe, &[1, 2, 3, 4]).unwrap(); // straddles pages 0 and 1
    /// let vga = mem.dirty().client(DirtyClient::Vga);
    /// assert_eq!(vga.iter_ones().collect::<Vec<_>>(), [0, 1]);
    /// ```
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        // `copy_from` marks the slice's pages in the bitmap after the copy.
        self.slice(offset, data.len() as u64)?.copy_from(data);
        Ok(())
    }

    /// Write bytes WITHOUT marking them dirty: for a migration destination loading incoming pages
    /// (documented as the only intended use).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if the range is not inside the block.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 0x4000).unwrap();
    /// mem.log_global_start().unwrap();
    /// mem.ram_blocks()[0].write_untracked(0, &[1]).unwrap();
    /// assert_eq!(mem.dirty().client(DirtyClient::Migration).count_ones(), 0);
    /// ```
    pub fn write_untracked(&self, offset: u64, data: &[u8]) -> Result<()> {
        // Checks the range (the block size fits in usize, so the casts below are lossless).
        self.slice(offset, data.len() as u64)?;
        let start = self.mapping.as_ptr().wrapping_add(offset as usize);
        // SAFETY: `[offset, offset + len)` was just checked to lie inside the mapping, which `self`
        // keeps alive for the slice's lifetime (the borrow of `self`), so the pointer is valid for
        // `len` bytes. `VolatileSlice` never forms a Rust reference to the bytes, only raw-pointer
        // copies (vm-memory uses volatile accesses up to 8 bytes and a plain `memcpy` above): guest
        // memory is shared with the vCPU, an agent outside Rust, and whoever reads bytes the guest
        // may be writing tolerates a torn copy (migration resends a page that is dirty again).
        let untracked = unsafe { VolatileSlice::new(start, data.len()) };
        untracked.copy_from(data);
        Ok(())
    }

    /// Append to `out` the sub-ranges of pages `[first_page, first_page + npages)` (block page
    /// numbers) that MAY hold non-zero data: sorted, merged (adjacent ranges this call appends are
    /// joined; `out`'s earlier entries are left alone) and clipped to the asked range. Every other
    /// page of the range reads as zero right now, without being read: a migration source can send
    /// it as a zero page.
    ///
    /// How the block knows depends on what the **kernel** says its mapping is
    /// (`/proc/self/smaps`, read when the block is made and again by
    /// [`reclassify_mapping`](Self::reclassify_mapping); never vm-memory's flags, which a region
    /// built with `with_raw_mmap_pointer` reports as private anonymous whatever was mapped), see
    /// [`populated_method`](Self::populated_method):
    ///
    /// - **Private anonymous** ([`PopulatedMethod::PageTables`]: [`RamBacking::Anonymous`], an
    ///   adopted vm-memory `from_ranges` region): this process's page tables, with the
    ///   `PAGEMAP_SCAN` ioctl (Linux 6.7+). A page neither present nor swapped (nor otherwise
    ///   non-empty) was never written since the mapping was made, or was discarded
    ///   (`MADV_DONTNEED`). Swapped pages are reported. Pages mapped to the shared zero page (read
    ///   but never written) are reported too. With transparent huge pages, a touched huge page is
    ///   reported whole (512 pages).
    /// - **One file mapped shared** ([`PopulatedMethod::FileData`]: [`RamBacking::Memfd`],
    ///   [`RamBacking::File`], an adopted region with a `FileOffset`, or a raw shared mapping of a
    ///   memfd, tmpfs or hugetlbfs file): the file's data ranges (`lseek(SEEK_DATA/SEEK_HOLE)` on
    ///   a private open file description of the file, so no caller's file offset moves). Writes
    ///   through any mapping of the file, by any process, and `pwrite`s are seen. The file is the
    ///   region's `FileOffset` if it is the mapped file (same device and inode), else the one
    ///   behind `/proc/self/map_files` (which needs `CAP_SYS_ADMIN`). File systems without hole
    ///   tracking (hugetlbfs) report everything.
    /// - **One file mapped private** ([`PopulatedMethod::PageTablesAndFileData`]): both, merged.
    /// - **Anything else** ([`PopulatedMethod::Everything`]): the whole range. That is a mapping
    ///   made of VMAs of different kinds, a shared mapping whose file cannot be opened, **memory
    ///   registered with userfaultfd** in missing or minor mode (`um`/`ui` in `VmFlags`: a lazy
    ///   snapshot restore or a postcopy destination, where a page absent from the page tables
    ///   gets its content from the handler, not zero), or no readable `/proc/self/smaps`.
    ///
    /// Without `PAGEMAP_SCAN` (kernel before 6.7, or a seccomp sandbox refusing the ioctl), a
    /// private anonymous range is reported whole (correct, just no faster than reading it); this
    /// is logged once per process.
    ///
    /// The answer is a snapshot: a page written after the call is not in it. Migration asks after
    /// re-arming a chunk's dirty tracking, so such a write is caught by the next dirty sync. A
    /// mapping changed after the block was made (a `mmap(MAP_FIXED)` over it, a userfaultfd
    /// registered on it) is seen at the next [`reclassify_mapping`](Self::reclassify_mapping),
    /// which [`crate::MemorySystem::log_global_start`] calls for every block; in between, the
    /// answer follows the old kind. Migration does not depend on this answer to verify: its
    /// default verification reads the pages this answer calls never populated
    /// ([`nonzero_pages`](Self::nonzero_pages)). The call costs one ioctl (or two `lseek`s per
    /// data run) and allocates nothing beyond growing `out`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if the range is not inside the block (nothing is appended);
    /// [`Error::PopulatedScan`] if the kernel fails the query unexpectedly (nothing is appended:
    /// treat the range as populated).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{Error, MemorySystem, PAGE_SIZE};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 30);
    /// mem.add_ram("ram", 0, 1 << 30).unwrap(); // untouched: costs nothing
    /// let block = &mem.ram_blocks()[0];
    /// block.write(5 * PAGE_SIZE, b"x").unwrap();
    ///
    /// let mut populated = Vec::new();
    /// block.populated_pages(0, block.pages(), &mut populated).unwrap();
    /// // Page 5 may hold data (with transparent huge pages, its whole 2 MiB is reported).
    /// assert!(populated.iter().any(|r| r.contains(&5)));
    /// // Far fewer than the block's 262144 pages (unless the kernel lacks PAGEMAP_SCAN).
    /// let reported: u64 = populated.iter().map(|r| r.end - r.start).sum();
    /// assert!(reported >= 1);
    ///
    /// assert!(matches!(
    ///     block.populated_pages(block.pages() - 1, 2, &mut populated),
    ///     Err(Error::OutOfRange { .. })
    /// ));
    /// ```
    pub fn populated_pages(
        &self,
        first_page: u64,
        npages: u64,
        out: &mut Vec<std::ops::Range<u64>>,
    ) -> Result<()> {
        let pages = self.page_range(first_page, npages)?;
        self.populated.query(&self.mapping, pages, out)
    }

    /// Append to `out`, in order, the pages of `[first_page, first_page + npages)` that hold a
    /// non-zero byte, found by **reading every byte**: no populated-pages answer is asked, so a
    /// wrong one cannot hide a page from it. What migration uses to check what it sent as zero.
    ///
    /// How, by the block's [`populated_method`](Self::populated_method):
    ///
    /// - **Private anonymous memory** ([`PopulatedMethod::PageTables`]): one byte of every 2 MiB
    ///   is read first, which maps never-touched memory to the kernel's shared zero page (a 2 MiB
    ///   huge zero page with transparent huge pages: no memory is allocated); then the kernel says
    ///   which pages of the range now map that zero page (`PAGEMAP_SCAN`'s `PAGE_IS_PFNZERO`, a
    ///   positive statement: the zero page is never written, so those pages are zero by
    ///   construction, not because nothing was found); every other page is read in full, in
    ///   place. Without that answer every page is read in full: silence never counts as zero.
    ///   A sparse 64 GiB guest is checked in well under a second this way.
    /// - **A file mapped shared** ([`PopulatedMethod::FileData`]): `pread` from that file, the
    ///   same bytes, but a hole reads as zero without being allocated (reading it through a
    ///   shared mapping would allocate it).
    /// - **Anything else**: every page read in full, in place (16-byte volatile loads, stopping
    ///   at a page's first non-zero bytes). On memory registered with userfaultfd a missing
    ///   page's read waits for the handler, like any read.
    ///
    /// Reading leaves never-touched private anonymous pages mapped to the zero page (as any read
    /// of them does); a later write to one gets a fresh page as before (a write to the huge zero
    /// page gets a fresh huge page, docs/bench/README.md).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if the range is not inside the block (nothing is appended);
    /// [`Error::PopulatedScan`] if a `pread` fails (what was appended stays).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{MemorySystem, PAGE_SIZE};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 30);
    /// mem.add_ram("ram", 0, 64 << 20).unwrap();
    /// let block = &mem.ram_blocks()[0];
    /// block.write(7 * PAGE_SIZE + 4095, &[1]).unwrap();
    /// block.write(9000 * PAGE_SIZE, &[0]).unwrap(); // written, but zero
    /// let mut nonzero = Vec::new();
    /// block.nonzero_pages(0, block.pages(), &mut nonzero).unwrap();
    /// assert_eq!(nonzero, [7]);
    /// ```
    pub fn nonzero_pages(&self, first_page: u64, npages: u64, out: &mut Vec<u64>) -> Result<()> {
        let pages = self.page_range(first_page, npages)?;
        self.populated
            .nonzero_pages(&self.mapping, pages, |page| out.push(page))
    }

    /// How [`populated_pages`](Self::populated_pages) finds populated pages, from what the kernel
    /// said the mapping is when the block was made or last
    /// [reclassified](Self::reclassify_mapping).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{MemorySystem, PopulatedMethod};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 1 << 20).unwrap();
    /// assert_eq!(mem.ram_blocks()[0].populated_method(), PopulatedMethod::PageTables);
    /// ```
    pub fn populated_method(&self) -> PopulatedMethod {
        self.populated.method()
    }

    /// Ask the kernel again what the block's mapping is (`/proc/self/smaps`): after the VMM
    /// changed it (registered a userfaultfd on it, mapped something else over it). Cheap enough
    /// for every migration start ([`crate::MemorySystem::log_global_start`] does it for every
    /// block), not for every query: reading `/proc/self/smaps` walks the page tables.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{MemorySystem, PopulatedMethod};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 1 << 20).unwrap();
    /// let block = &mem.ram_blocks()[0];
    /// block.reclassify_mapping();
    /// assert_eq!(block.populated_method(), PopulatedMethod::PageTables);
    /// ```
    pub fn reclassify_mapping(&self) {
        let vmas = crate::populated::current_vmas();
        self.reclassify_with(vmas.as_deref());
    }

    /// [`reclassify_mapping`](Self::reclassify_mapping) with this process's VMAs read once for
    /// several blocks.
    pub(crate) fn reclassify_with(&self, vmas: Option<&[crate::mapping::Vma]>) {
        self.populated.reclassify(&self.mapping, vmas);
    }

    /// `[first_page, first_page + npages)`, checked to be inside the block.
    fn page_range(&self, first_page: u64, npages: u64) -> Result<std::ops::Range<u64>> {
        match first_page.checked_add(npages) {
            Some(end) if end <= self.pages => Ok(first_page..end),
            _ => Err(Error::OutOfRange {
                what: "block",
                offset: first_page.saturating_mul(PAGE_SIZE),
                len: npages.saturating_mul(PAGE_SIZE),
                size: self.size(),
            }),
        }
    }

    /// Test switch ([`crate::testing::force_populated_fallback`]): answer as on a kernel without
    /// `PAGEMAP_SCAN` or `SEEK_DATA`.
    #[cfg(feature = "testing")]
    pub(crate) fn set_populated_fallback(&self, on: bool) {
        self.populated.set_force_fallback(on);
    }

    /// The dirty bitmaps this block's writes mark (identifies the owning memory system).
    pub(crate) fn dirty_memory(&self) -> &Arc<DirtyMemory> {
        &self.dirty
    }

    fn slice(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<VolatileSlice<'_, crate::vm_bitmap::DirtyBitmapSlice<'_>>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => {}
            _ => {
                return Err(Error::OutOfRange {
                    what: "block",
                    offset,
                    len,
                    size: self.size(),
                })
            }
        }
        // In range (checked above), so both casts are lossless: the block size fits in usize.
        Ok(self.mapping.get_slice(offset as usize, len as usize)?)
    }
}

/// Is a page all zeros? (Migration sends zero pages as a marker.) Word-at-a-time, memory speed.
///
/// # Examples
///
/// ```
/// use clearlog_memory::is_zero_page;
///
/// let mut page = [0u8; 4096];
/// assert!(is_zero_page(&page));
/// page[4095] = 1;
/// assert!(!is_zero_page(&page));
/// ```
pub fn is_zero_page(page: &[u8; PAGE_SIZE as usize]) -> bool {
    // OR whole 64-byte lines so the compiler vectorizes; bail out at the first non-zero line.
    page.chunks_exact(64).all(|line| {
        line.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]))
        }) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(pages: u64, dirty: &Arc<DirtyMemory>) -> RamBlock {
        RamBlock::with_backing(
            RamBlockId::new(0),
            "test",
            pages * PAGE_SIZE,
            64,
            dirty.clone(),
            &RamBacking::Anonymous,
        )
        .unwrap()
    }

    #[test]
    #[cfg_attr(miri, ignore = "RamBlock::new calls madvise: unsupported by Miri")]
    fn write_marks_every_touched_page_after_writing() {
        let dirty = Arc::new(DirtyMemory::new(256));
        dirty.set_active_clients(crate::DirtyClients::ALL);
        let b = block(8, &dirty);
        b.write(PAGE_SIZE - 1, &[0xaa; 2 + PAGE_SIZE as usize])
            .unwrap();
        let marked: Vec<usize> = dirty.client(crate::DirtyClient::Vga).iter_ones().collect();
        assert_eq!(marked, [64, 65, 66]);
        let mut buf = [0u8; 1];
        b.read(2 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(buf, [0xaa]);
    }

    #[test]
    #[cfg_attr(miri, ignore = "RamBlock::new calls madvise: unsupported by Miri")]
    fn empty_write_marks_nothing() {
        let dirty = Arc::new(DirtyMemory::new(256));
        dirty.set_active_clients(crate::DirtyClients::ALL);
        let b = block(1, &dirty);
        b.write(PAGE_SIZE, &[]).unwrap();
        assert_eq!(dirty.client(crate::DirtyClient::Vga).count_ones(), 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "RamBlock::new calls madvise: unsupported by Miri")]
    fn out_of_range_accesses_are_errors() {
        let dirty = Arc::new(DirtyMemory::new(256));
        let b = block(1, &dirty);
        assert!(matches!(
            b.write(PAGE_SIZE, &[1]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            b.read(u64::MAX, &mut [0]),
            Err(Error::OutOfRange { .. })
        ));
        let mut page = [0u8; PAGE_SIZE as usize];
        assert!(b.read_page(1, &mut page).is_err());
        assert!(b.read_page(u64::MAX, &mut page).is_err());
    }

    #[test]
    fn zero_page_detection() {
        let mut page = [0u8; PAGE_SIZE as usize];
        assert!(is_zero_page(&page));
        page[100] = 1;
        assert!(!is_zero_page(&page));
    }
}
