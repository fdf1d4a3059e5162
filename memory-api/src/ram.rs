// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! RAM blocks: guest RAM backed by host memory (vm-memory's `MmapRegion`).

use std::sync::Arc;

use vm_memory::{MmapRegion, VolatileMemory};

use crate::{DirtyMemory, Error, Result, PAGE_SHIFT, PAGE_SIZE};

/// Identifies a RAM block inside one [`crate::MemorySystem`].
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0, 0x10000).unwrap();
/// let id = mem.ram_blocks()[0].id();
/// assert_eq!(mem.ram_block(id).unwrap().name(), "ram");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RamBlockId(pub u32);

/// A block of guest RAM: anonymous host memory, placed in the RAM address space at a page offset that
/// is a multiple of 64 pages (so its dirty bits start on a bitmap word).
///
/// The host memory is a private anonymous `MAP_NORESERVE` mapping made by vm-memory's
/// [`MmapRegion`]: untouched pages cost nothing, so a multi-GiB guest is cheap until it runs.
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
    mapping: MmapRegion,
    pages: u64,
    ram_page_offset: u64,
    dirty: Arc<DirtyMemory>,
}

impl RamBlock {
    /// Map `size` bytes (a non-zero page multiple, checked by the caller) of anonymous host memory.
    pub(crate) fn new(
        id: RamBlockId,
        name: &str,
        size: u64,
        ram_page_offset: u64,
        dirty: Arc<DirtyMemory>,
    ) -> Result<Self> {
        let mapping = usize::try_from(size)
            .map_err(|_| Error::AddressOverflow {
                start: 0,
                len: size,
            })
            .and_then(|len| MmapRegion::new(len).map_err(|source| Error::Mmap { size, source }))?;
        // Ask for transparent huge pages, as other VMMs do for guest RAM: the first touch of a
        // multi-GiB guest (boot, or a migration destination loading pages) then takes one fault per
        // 2 MiB instead of one per 4 KiB. Dirty logging still tracks 4 KiB pages (KVM maps logged
        // slots with small pages). Only advice: failure (THP disabled) changes nothing but speed.
        // SAFETY: the range is exactly the mapping vm-memory just created and still owns.
        let rc =
            unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_HUGEPAGE) on guest RAM");
        }
        Ok(RamBlock {
            id,
            name: name.to_owned(),
            mapping,
            pages: size >> PAGE_SHIFT,
            ram_page_offset,
            dirty,
        })
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
    /// The pages are marked after the bytes land, so whoever takes the dirty bit reads the new data.
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
        self.write_untracked(offset, data)?;
        if !data.is_empty() {
            let first = offset >> PAGE_SHIFT;
            let last = (offset + data.len() as u64 - 1) >> PAGE_SHIFT;
            self.dirty
                .set_dirty_range(self.ram_page_offset + first, last - first + 1);
        }
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
        let slice = self.slice(offset, data.len() as u64)?;
        slice.copy_from(data);
        Ok(())
    }

    /// The dirty bitmaps this block's writes mark (identifies the owning memory system).
    pub(crate) fn dirty_memory(&self) -> &Arc<DirtyMemory> {
        &self.dirty
    }

    fn slice(&self, offset: u64, len: u64) -> Result<vm_memory::VolatileSlice<'_, ()>> {
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
        RamBlock::new(RamBlockId(0), "test", pages * PAGE_SIZE, 64, dirty.clone()).unwrap()
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
