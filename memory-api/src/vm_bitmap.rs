// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`DirtyBitmap`]: a vm-memory bitmap backend that marks pages in a memory system's dirty-memory
//! clients.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};

use crate::{DirtyClient, DirtyMemory, Error, Result, PAGE_SHIFT};

/// Where an attached bitmap marks: a window of the RAM address space of one memory system.
#[derive(Debug)]
struct Target {
    dirty: Arc<DirtyMemory>,
    ram_page_offset: u64,
    pages: u64,
}

impl Target {
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = (offset as u64) >> PAGE_SHIFT;
        if first >= self.pages {
            return;
        }
        let last =
            ((offset as u64).saturating_add(len as u64 - 1) >> PAGE_SHIFT).min(self.pages - 1);
        // In range: attach checked `ram_page_offset + pages` against the capacity.
        self.dirty
            .set_dirty_range(self.ram_page_offset + first, last - first + 1);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = (offset as u64) >> PAGE_SHIFT;
        page < self.pages
            && DirtyClient::ALL.iter().any(|c| {
                self.dirty
                    .client(*c)
                    .test((self.ram_page_offset + page) as usize)
            })
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// `None` while detached. Writers take the read lock (uncontended: two atomic operations);
    /// only attach and detach write it.
    target: RwLock<Option<Target>>,
}

impl Inner {
    fn with_target<R>(&self, f: impl FnOnce(&Target) -> R) -> Option<R> {
        let guard = self.target.read().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().map(f)
    }
}

/// A vm-memory [`Bitmap`] whose marks go to a [`crate::MemorySystem`]'s dirty-memory clients.
///
/// Use it as the bitmap type of vm-memory's `GuestMemoryMmap<DirtyBitmap>` /
/// `MmapRegion<DirtyBitmap>`; see "Attached and detached bitmaps" below for when it records.
/// Cloning is cheap and shares the attachment.
///
/// `dirty_at(offset)` says whether any client (active or not) has the page of `offset` marked.
///
/// vm-memory calls a region's bitmap after every write it performs (`Bytes::write_slice`,
/// `write_obj`, `read_volatile_from` a reader, `VolatileSlice` copies and stores, through slices
/// taken at any offset). With `GuestMemoryMmap<DirtyBitmap>` those writes mark the written pages
/// dirty for every *active* [`crate::DirtyClient`] of the memory system the region belongs to,
/// exactly as [`crate::RamBlock::write`] does: after the bytes landed, so whoever takes the bit
/// reads the new data.
///
/// # Attached and detached bitmaps
///
/// A bitmap is *attached* once its region is a RAM block of a memory system (made by
/// [`crate::MemorySystem::add_ram_backed`] or adopted by
/// [`crate::MemorySystem::add_guest_memory`]); it is *detached* again when that block is removed
/// or the memory system is dropped. A detached bitmap records nothing: a bitmap made by
/// [`NewBitmap::with_len`] (what `GuestMemoryMmap::from_ranges` uses) before its region joins a
/// memory system has no client to mark, and writes made before adoption are simply not tracked
/// (migration sends every page in its first pass anyway). All clones of a bitmap and all slices of
/// it share one attachment.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyBitmap, DirtyClient, MemorySystem};
/// use vm_memory::bitmap::Bitmap;
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0, 0x10000).unwrap();
/// mem.log_global_start().unwrap();
/// let block = mem.ram_blocks()[0].clone();
/// let bitmap: &DirtyBitmap = block.mmap().bitmap();
/// assert!(bitmap.is_attached());
/// bitmap.slice_at(0x2000).mark_dirty(0x10, 1); // a slice carries its base offset
/// assert!(mem.dirty().client(DirtyClient::Migration).test(2));
/// assert!(bitmap.dirty_at(0x2fff) && !bitmap.dirty_at(0x3000));
/// ```
///
/// A VMM's own `GuestMemoryMmap<DirtyBitmap>`, adopted:
///
/// ```
/// use clearlog_memory::{DirtyBitmap, DirtyClient, MemorySystem};
/// use vm_memory::bitmap::Bitmap;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
///
/// let gm = GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
/// let region = gm.iter().next().unwrap();
/// assert!(!region.bitmap().is_attached()); // not in a memory system yet: records nothing
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_guest_memory(&gm).unwrap();
/// mem.log_global_start().unwrap();
/// gm.write_obj(0xdead_beef_u32, GuestAddress(0x3ffe)).unwrap(); // straddles pages 3 and 4
/// let migration = mem.dirty().client(DirtyClient::Migration);
/// assert_eq!(migration.iter_ones().collect::<Vec<_>>(), [3, 4]);
/// assert!(region.bitmap().dirty_at(0x4000));
/// ```
#[derive(Clone, Default)]
pub struct DirtyBitmap {
    inner: Arc<Inner>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("attached", &self.is_attached())
            .finish()
    }
}

impl DirtyBitmap {
    /// A detached bitmap (records nothing until its region joins a memory system).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(!clearlog_memory::DirtyBitmap::new().is_attached());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Is the bitmap attached to a memory system (do writes through it mark pages)?
    ///
    /// # Examples
    ///
    /// See [`DirtyBitmap`].
    pub fn is_attached(&self) -> bool {
        self.inner.with_target(|_| ()).is_some()
    }

    /// Attach to `dirty`'s RAM address space at `ram_page_offset`, for `pages` pages.
    pub(crate) fn attach(
        &self,
        dirty: &Arc<DirtyMemory>,
        ram_page_offset: u64,
        pages: u64,
        guest_addr: Option<u64>,
    ) -> Result<()> {
        let mut guard = self
            .inner
            .target
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.is_some() {
            return Err(Error::AlreadyAttached { guest_addr });
        }
        let capacity = dirty.capacity_pages();
        if ram_page_offset
            .checked_add(pages)
            .is_none_or(|end| end > capacity)
        {
            return Err(Error::RamSpaceExhausted {
                requested_pages: pages,
                capacity_pages: capacity,
            });
        }
        *guard = Some(Target {
            dirty: dirty.clone(),
            ram_page_offset,
            pages,
        });
        Ok(())
    }

    /// Detach: later writes are not marked. Writes that were marking when this is called have
    /// finished marking when it returns.
    pub(crate) fn detach(&self) {
        *self
            .inner
            .target
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = DirtyBitmapSlice<'a>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.inner.with_target(|t| t.mark(offset, len));
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.inner
            .with_target(|t| t.dirty_at(offset))
            .unwrap_or(false)
    }

    fn slice_at(&self, offset: usize) -> DirtyBitmapSlice<'_> {
        DirtyBitmapSlice {
            inner: &self.inner,
            base: offset,
        }
    }
}

impl NewBitmap for DirtyBitmap {
    /// A detached bitmap: the length is taken from the RAM block when the region joins a memory
    /// system.
    fn with_len(_len: usize) -> Self {
        Self::new()
    }
}

/// A [`DirtyBitmap`] seen from byte `base` of its region: what vm-memory's `VolatileSlice`s carry.
/// Offsets given to it are relative to `base`.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyClient, MemorySystem};
/// use vm_memory::bitmap::Bitmap;
/// use vm_memory::{Bytes, VolatileMemory};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0, 0x10000).unwrap();
/// mem.log_global_start().unwrap();
/// let block = mem.ram_blocks()[0].clone();
/// let slice = block.mmap().get_slice(0x5000, 0x100).unwrap();
/// assert_eq!(slice.bitmap().base(), 0x5000);
/// slice.write_obj(7u8, 0x80).unwrap();
/// assert_eq!(mem.dirty().client(DirtyClient::Migration).iter_ones().collect::<Vec<_>>(), [5]);
/// ```
#[derive(Clone, Copy)]
pub struct DirtyBitmapSlice<'a> {
    inner: &'a Inner,
    base: usize,
}

impl DirtyBitmapSlice<'_> {
    /// Offset of the slice's first byte in its region.
    ///
    /// # Examples
    ///
    /// See [`DirtyBitmapSlice`].
    pub fn base(&self) -> usize {
        self.base
    }

    /// Is the bitmap attached to a memory system? (As [`DirtyBitmap::is_attached`].)
    ///
    /// # Examples
    ///
    /// See [`DirtyBitmap`].
    pub fn is_attached(&self) -> bool {
        self.inner.with_target(|_| ()).is_some()
    }
}

impl fmt::Debug for DirtyBitmapSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmapSlice")
            .field("base", &self.base)
            .finish()
    }
}

impl<'a> WithBitmapSlice<'_> for DirtyBitmapSlice<'a> {
    type S = Self;
}

impl BitmapSlice for DirtyBitmapSlice<'_> {}

impl Bitmap for DirtyBitmapSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // Wrapping like vm-memory's own slices: an overflow can only mark a page the access could
        // not have touched (a false positive), and `Target::mark` clips to the block.
        let offset = self.base.wrapping_add(offset);
        self.inner.with_target(|t| t.mark(offset, len));
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let offset = self.base.wrapping_add(offset);
        self.inner
            .with_target(|t| t.dirty_at(offset))
            .unwrap_or(false)
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyBitmapSlice {
            inner: self.inner,
            base: self.base.wrapping_add(offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DirtyClients, PAGE_SIZE};

    fn attached(pages: u64) -> (Arc<DirtyMemory>, DirtyBitmap) {
        let dirty = Arc::new(DirtyMemory::new(256));
        dirty.set_active_clients(DirtyClients::ALL);
        let b = DirtyBitmap::new();
        b.attach(&dirty, 64, pages, None).unwrap();
        (dirty, b)
    }

    fn marked(dirty: &DirtyMemory, c: DirtyClient) -> Vec<usize> {
        dirty.client(c).iter_ones().collect()
    }

    #[test]
    fn detached_records_nothing() {
        let b = DirtyBitmap::with_len(0x4000);
        b.mark_dirty(0, 0x4000);
        assert!(!b.dirty_at(0));
        assert!(!b.slice_at(0x1000).dirty_at(0));
        assert!(!b.is_attached());
    }

    #[test]
    fn marks_pages_at_block_offset_for_active_clients_only() {
        let (dirty, b) = attached(8);
        dirty.set_active_clients(DirtyClients::NONE.with(DirtyClient::Vga));
        b.mark_dirty(PAGE_SIZE as usize - 1, 2);
        assert_eq!(marked(&dirty, DirtyClient::Vga), [64, 65]);
        assert!(marked(&dirty, DirtyClient::Migration).is_empty());
        assert!(
            b.dirty_at(0) && b.dirty_at(PAGE_SIZE as usize) && !b.dirty_at(2 * PAGE_SIZE as usize)
        );
    }

    #[test]
    fn slices_carry_their_base_and_nest() {
        let (dirty, b) = attached(8);
        let s = b.slice_at(0x2000).slice_at(0x1000);
        assert_eq!(s.base(), 0x3000);
        s.mark_dirty(0xfff, 1);
        assert_eq!(marked(&dirty, DirtyClient::Code), [67]);
        assert!(s.dirty_at(0) && b.dirty_at(0x3000));
        assert!(!s.dirty_at(0x1000));
    }

    #[test]
    fn marks_are_clipped_to_the_block_and_empty_marks_nothing() {
        let (dirty, b) = attached(2);
        b.mark_dirty(0x1000, 0);
        b.mark_dirty(0x1800, usize::MAX);
        b.mark_dirty(usize::MAX, 10);
        assert_eq!(marked(&dirty, DirtyClient::Migration), [65]);
        assert!(!b.dirty_at(usize::MAX));
    }

    #[test]
    fn attach_twice_fails_and_detach_stops_marking() {
        let (dirty, b) = attached(2);
        assert!(matches!(
            b.attach(&dirty, 0, 1, Some(0x1000)),
            Err(Error::AlreadyAttached {
                guest_addr: Some(0x1000)
            })
        ));
        assert!(b.is_attached());
        b.detach();
        b.mark_dirty(0, 1);
        assert!(marked(&dirty, DirtyClient::Migration).is_empty());
        assert!(matches!(
            b.attach(&dirty, 250, 64, None),
            Err(Error::RamSpaceExhausted { .. })
        ));
    }

    #[test]
    fn concurrent_marks_all_land() {
        let (dirty, b) = attached(192);
        std::thread::scope(|s| {
            for t in 0..4usize {
                let b = b.clone();
                s.spawn(move || {
                    for p in (t..192).step_by(4) {
                        b.slice_at(p * PAGE_SIZE as usize).mark_dirty(1, 1);
                    }
                });
            }
        });
        assert_eq!(dirty.client(DirtyClient::Migration).count_ones(), 192);
    }
}
