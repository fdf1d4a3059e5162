// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the engine needs of guest memory: [`MigrationMemory`] (the RAM blocks, both sides),
//! [`DirtyTracking`] (dirty logging, the source) and [`MigrationBlock`] (one block's bytes).
//!
//! These are consumer-side traits: they hold exactly the calls the engine makes, and name
//! nothing but `clearlog-bitmap`'s bitmaps, so a VMM can migrate memory it manages itself (its
//! own vm-memory `GuestMemoryMmap`, its own memslots: `examples/ch_shaped.rs`). With the default
//! feature `clearlog-memory`, `clearlog-memory`'s `MemorySystem` implements them (and with it any
//! VMM memory adopted into a `MemorySystem`); so do `&T` and `Arc<T>` of an implementation.

use std::sync::Arc;

use clearlog_bitmap::{Bitmap, ClearBitmap};

use crate::BoxError;

/// log2 of the page size the engine migrates: 4 KiB, the dirty-log granularity of KVM.
pub const PAGE_SHIFT: u32 = 12;
/// The page size the engine migrates (4 KiB): blocks are multiples of it, dirty bits stand for one
/// page each.
///
/// # Examples
///
/// ```
/// assert_eq!(clearlog_migration::PAGE_SIZE, 1 << clearlog_migration::PAGE_SHIFT);
/// ```
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Whether a page (or any buffer) is all zero bytes.
pub(crate) fn is_zero_page(page: &[u8]) -> bool {
    crate::stream::is_zero(page)
}

/// Result of a [`MigrationMemory`], [`DirtyTracking`] or [`MigrationBlock`] call: the
/// implementation's own error, boxed.
pub type MemoryResult<T> = std::result::Result<T, BoxError>;

/// One block of guest RAM as the engine sees it: a name, a size and its bytes.
///
/// # Examples
///
/// A block over a `Vec` (a real VMM has its mappings; see [`MigrationMemory`] for a whole
/// destination):
///
/// ```
/// use std::sync::Mutex;
/// use clearlog_migration::{MemoryResult, MigrationBlock};
///
/// struct VecBlock(Mutex<Vec<u8>>);
/// impl MigrationBlock for VecBlock {
///     fn name(&self) -> &str { "ram" }
///     fn size(&self) -> u64 { self.0.lock().unwrap().len() as u64 }
///     fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
///         let o = offset as usize;
///         buf.copy_from_slice(self.0.lock().unwrap().get(o..o + buf.len()).ok_or("out of range")?);
///         Ok(())
///     }
///     fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
///         let o = offset as usize;
///         self.0.lock().unwrap().get_mut(o..o + data.len()).ok_or("out of range")?.copy_from_slice(data);
///         Ok(())
///     }
/// }
///
/// let block = VecBlock(Mutex::new(vec![0; 1 << 20]));
/// block.write_untracked(0x3000, &[7]).unwrap();
/// assert_eq!((block.name(), block.pages()), ("ram", 256));
/// let mut nonzero = Vec::new();
/// block.nonzero_pages(0, 256, &mut nonzero).unwrap(); // reads every page
/// assert_eq!(nonzero, [3]);
/// ```
pub trait MigrationBlock: Send + Sync {
    /// The block's name: it identifies the block in the stream, so both sides must use the same.
    fn name(&self) -> &str;
    /// Size in bytes, a non-zero multiple of the page size (4 KiB).
    fn size(&self) -> u64;
    /// Size in pages.
    fn pages(&self) -> u64 {
        self.size() >> PAGE_SHIFT
    }
    /// Copy `buf.len()` bytes at `offset` out of the block. The guest may be writing the same bytes
    /// concurrently: a torn copy is fine, the page is dirty again and will be re-sent.
    fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()>;
    /// Copy `data` into the block at `offset` without marking anything dirty (a destination loading
    /// incoming pages).
    fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()>;
    /// Append to `out` the sub-ranges of pages `[first_page, first_page + npages)` that may hold
    /// non-zero data; every other page of the range must read as zero now (memory the host never
    /// populated). The engine asks only after re-arming the range's dirty tracking, so a page
    /// populated after the answer is dirty again. The default reports the whole range.
    ///
    /// The contract: ranges sorted, not overlapping, inside the asked range. The engine does not
    /// rely on it: it clips what it gets to the asked range, sorts and merges it, so an answer
    /// out of order, overlapping or past the block costs at most extra reads. An answer that
    /// leaves out a page holding data makes the engine send that page as zero, and the default
    /// verification ([`crate::VerifyMode::AfterResume`]) then fails on both sides naming it,
    /// because it checks the pages this answer calls never populated with
    /// [`nonzero_pages`](Self::nonzero_pages), not with this answer.
    fn populated(
        &self,
        first_page: u64,
        npages: u64,
        out: &mut Vec<std::ops::Range<u64>>,
    ) -> MemoryResult<()> {
        all_populated(first_page, npages, out);
        Ok(())
    }

    /// Append to `out`, in order, the pages of `[first_page, first_page + npages)` that hold a
    /// non-zero byte, found by **reading** them: never from [`populated`](Self::populated)'s
    /// answer or anything that answer comes from. The verification rests on it: the source checks
    /// with it the pages its populated-pages answer called never populated, the destination the
    /// pages it received as zero. The default reads through [`read`](Self::read), 256 KiB at a
    /// time; an implementation may read faster (in place), never skip.
    fn nonzero_pages(&self, first_page: u64, npages: u64, out: &mut Vec<u64>) -> MemoryResult<()> {
        let mut buf = vec![0u8; (NONZERO_READ_PAGES * PAGE_SIZE) as usize];
        let end = first_page
            .checked_add(npages)
            .ok_or("page range overflows")?;
        let mut page = first_page;
        while page < end {
            let n = (end - page).min(NONZERO_READ_PAGES);
            let bytes = &mut buf[..(n * PAGE_SIZE) as usize];
            self.read(page * PAGE_SIZE, bytes)?;
            for (i, p) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                if !crate::stream::is_zero(p) {
                    out.push(page + i as u64);
                }
            }
            page += n;
        }
        Ok(())
    }

    /// Where the block's memory is mapped in this process, for a postcopy destination (which
    /// registers it with a userfaultfd, drops the pages the source still sends, and places them
    /// as they arrive). The default: `None`, and a postcopy into this block is refused before
    /// anything is committed.
    fn host_mapping(&self) -> Option<HostMapping> {
        None
    }
}

/// A block's memory as mapped in this process ([`MigrationBlock::host_mapping`]).
///
/// # Examples
///
/// ```
/// use clearlog_migration::{HostMapping, MigrationBlock};
///
/// let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
///     .unwrap();
/// let block = clearlog_migration::MigrationMemory::blocks(&mem).remove(0);
/// let m: HostMapping = block.host_mapping().unwrap();
/// assert_eq!((m.len(), m.shared()), (1 << 20, false));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMapping {
    addr: u64,
    len: u64,
    shared: bool,
}

impl HostMapping {
    /// The mapping at `addr` of `len` bytes (both page aligned); `shared`: a `MAP_SHARED`
    /// mapping (memfd, shmem), whose pages are dropped from the backing store, not just from
    /// this mapping.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must be the block's memory, mapped while the block lives, holding
    /// nothing but guest RAM: during a postcopy migration into it the engine drops pages there
    /// (their old contents are gone) and places pages with `UFFDIO_COPY`.
    pub unsafe fn new(addr: u64, len: u64, shared: bool) -> Self {
        HostMapping { addr, len, shared }
    }

    /// The start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is a shared mapping.
    pub fn shared(&self) -> bool {
        self.shared
    }
}

/// Pages the default [`MigrationBlock::nonzero_pages`] reads at a time (256 KiB).
const NONZERO_READ_PAGES: u64 = 64;

/// Guest RAM to migrate: its blocks, in stream order. All a destination needs.
///
/// # Examples
///
/// A destination over memory the VMM manages itself (here a `Vec`; a real VMM has its mappings):
///
/// ```
/// use std::sync::Mutex;
/// use clearlog_migration::{MemoryResult, MigrationBlock, MigrationMemory};
///
/// struct VecBlock(Mutex<Vec<u8>>);
/// impl MigrationBlock for VecBlock {
///     fn name(&self) -> &str { "ram" }
///     fn size(&self) -> u64 { self.0.lock().unwrap().len() as u64 }
///     fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
///         let o = offset as usize;
///         buf.copy_from_slice(self.0.lock().unwrap().get(o..o + buf.len()).ok_or("out of range")?);
///         Ok(())
///     }
///     fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
///         let o = offset as usize;
///         self.0.lock().unwrap().get_mut(o..o + data.len()).ok_or("out of range")?.copy_from_slice(data);
///         Ok(())
///     }
/// }
/// struct VecMemory(std::sync::Arc<VecBlock>);
/// impl MigrationMemory for VecMemory {
///     type Block = std::sync::Arc<VecBlock>;
///     fn blocks(&self) -> Vec<Self::Block> { vec![self.0.clone()] }
/// }
///
/// let mem = VecMemory(std::sync::Arc::new(VecBlock(Mutex::new(vec![0; 8192]))));
/// let _destination = clearlog_migration::Destination::new(&mem);
/// ```
pub trait MigrationMemory {
    /// A handle to one block (cheap to clone, e.g. an `Arc`).
    type Block: MigrationBlock;
    /// The RAM blocks, in stream order. Called once per migration, at its start.
    fn blocks(&self) -> Vec<Self::Block>;
}

/// Dirty logging of guest RAM: what a migration source needs besides the blocks.
///
/// The rules an implementation must keep (they are what makes migration loss-free):
/// - [`sync_dirty`](Self::sync_dirty) collects what the accelerator and the VMM's own writes dirtied
///   since the last sync; [`take_dirty`](Self::take_dirty) then moves a block's bits into the
///   engine's bitmap. Nothing may be lost between the two.
/// - [`clear_dirty`](Self::clear_dirty) re-arms tracking for a range: a write that lands after it
///   returns must be reported by a later sync. It may only clear what the accelerator reported
///   since the last sync, once (two dirty-memory clients must never clear a bit twice).
/// - The engine re-arms a chunk *before* reading its pages
///   ([`clear_chunks_before_send`](Self::clear_chunks_before_send)); an implementation must not
///   defer the clear past the call.
///
/// # Examples
///
/// `clearlog-memory`'s `MemorySystem` implements it (feature `clearlog-memory`, on by default:
/// see [`crate::Source`]); `examples/ch_shaped.rs` implements it for a cloud-hypervisor-shaped
/// VMM (vm-memory's own `AtomicBitmap`, its own memslots, `clearlog-kvm`'s cache on its own VM
/// fd).
pub trait DirtyTracking: MigrationMemory {
    /// Start dirty logging for migration (every block dirty from here on is reported).
    fn start_logging(&self) -> MemoryResult<()>;
    /// Stop dirty logging for migration.
    fn stop_logging(&self) -> MemoryResult<()>;
    /// Collect dirty bits from every dirty source (the accelerator, the VMM's device writes).
    fn sync_dirty(&self) -> MemoryResult<()>;
    /// Move `block`'s collected dirty bits into `dest` (one bit per page of the block) and return
    /// how many were not already set there; with `clear`, mark every chunk that received a bit.
    fn take_dirty(
        &self,
        block: &Self::Block,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> MemoryResult<u64>;
    /// Re-arm dirty tracking for bytes `[offset, offset + len)` of `block` (widened to pages).
    fn clear_dirty(&self, block: &Self::Block, offset: u64, len: u64) -> MemoryResult<()>;
    /// Re-arm `page`'s chunk, and up to `max_chunks - 1` marked chunks right after it, if
    /// `clear` still marks it, before the caller reads any of their pages; returns how many
    /// chunks were re-armed (0: not marked). On failure the chunks stay marked.
    ///
    /// The default is the rule's one implementation, [`ClearBitmap::clear_run_before_read`], with
    /// one [`clear_dirty`](Self::clear_dirty) for the whole run. Override it only to observe or
    /// test the engine (the consistency tests do, with a deliberately wrong order), never to
    /// defer the clear past the call.
    fn clear_chunks_before_send(
        &self,
        block: &Self::Block,
        clear: &mut ClearBitmap,
        page: u64,
        max_chunks: u64,
    ) -> MemoryResult<u64> {
        clear.clear_run_before_read(page, max_chunks, |first, npages| {
            self.clear_dirty(block, first << PAGE_SHIFT, npages << PAGE_SHIFT)
        })
    }
}

impl<T: MigrationBlock + ?Sized> MigrationBlock for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn pages(&self) -> u64 {
        (**self).pages()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
        (**self).read(offset, buf)
    }
    fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
        (**self).write_untracked(offset, data)
    }
    fn populated(
        &self,
        first_page: u64,
        npages: u64,
        out: &mut Vec<std::ops::Range<u64>>,
    ) -> MemoryResult<()> {
        (**self).populated(first_page, npages, out)
    }
    fn nonzero_pages(&self, first_page: u64, npages: u64, out: &mut Vec<u64>) -> MemoryResult<()> {
        (**self).nonzero_pages(first_page, npages, out)
    }
    fn host_mapping(&self) -> Option<HostMapping> {
        (**self).host_mapping()
    }
}

/// The answer "every page may hold data" for `npages` pages from `first_page`.
pub(crate) fn all_populated(first_page: u64, npages: u64, out: &mut Vec<std::ops::Range<u64>>) {
    if npages > 0 {
        out.push(first_page..first_page + npages);
    }
}

/// Forwards every call: lets the engine take `&mem`, `Arc<mem>` or `&Arc<mem>` alike.
macro_rules! forward_memory {
    ($($wrapper:ty),*) => {$(
        impl<T: MigrationMemory + ?Sized> MigrationMemory for $wrapper {
            type Block = T::Block;
            fn blocks(&self) -> Vec<T::Block> {
                (**self).blocks()
            }
        }

        impl<T: DirtyTracking + ?Sized> DirtyTracking for $wrapper {
            fn start_logging(&self) -> MemoryResult<()> {
                (**self).start_logging()
            }
            fn stop_logging(&self) -> MemoryResult<()> {
                (**self).stop_logging()
            }
            fn sync_dirty(&self) -> MemoryResult<()> {
                (**self).sync_dirty()
            }
            fn take_dirty(
                &self,
                block: &T::Block,
                dest: &mut Bitmap,
                clear: Option<&mut ClearBitmap>,
            ) -> MemoryResult<u64> {
                (**self).take_dirty(block, dest, clear)
            }
            fn clear_dirty(&self, block: &T::Block, offset: u64, len: u64) -> MemoryResult<()> {
                (**self).clear_dirty(block, offset, len)
            }
            fn clear_chunks_before_send(
                &self,
                block: &T::Block,
                clear: &mut ClearBitmap,
                page: u64,
                max_chunks: u64,
            ) -> MemoryResult<u64> {
                (**self).clear_chunks_before_send(block, clear, page, max_chunks)
            }
        }
    )*};
}

forward_memory!(&T, Arc<T>);

/// `block.populated(first_page, npages, out)`, then what the engine makes of any answer: clipped
/// to the asked range, sorted, overlapping and touching ranges merged, empty ones dropped (see
/// the contract on [`MigrationBlock::populated`]). `out` is cleared first.
pub(crate) fn ask_populated<B: MigrationBlock + ?Sized>(
    block: &B,
    first_page: u64,
    npages: u64,
    out: &mut Vec<std::ops::Range<u64>>,
) -> MemoryResult<()> {
    out.clear();
    block.populated(first_page, npages, out)?;
    normalize_ranges(out, first_page..first_page.saturating_add(npages));
    Ok(())
}

/// Clip every range of `ranges` to `window`, sort, merge, drop the empty ones (in place).
fn normalize_ranges(ranges: &mut Vec<std::ops::Range<u64>>, window: std::ops::Range<u64>) {
    for r in ranges.iter_mut() {
        r.start = r.start.clamp(window.start, window.end);
        r.end = r.end.clamp(r.start, window.end);
    }
    ranges.retain(|r| !r.is_empty());
    ranges.sort_unstable_by_key(|r| r.start);
    let mut w = 0;
    for i in 0..ranges.len() {
        let r = ranges[i].clone();
        if w > 0 && r.start <= ranges[w - 1].end {
            ranges[w - 1].end = ranges[w - 1].end.max(r.end);
        } else {
            ranges[w] = r;
            w += 1;
        }
    }
    ranges.truncate(w);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_populated_answer_is_clipped_sorted_and_merged() {
        let mut r = vec![
            90..200, // past the window's end
            40..50,
            0..12, // before the window's start
            45..60,
            60..61,
            70..70,
            30..30,
            95..99,
        ];
        normalize_ranges(&mut r, 10..100);
        assert_eq!(r, vec![10..12, 40..61, 90..100]);
        let mut none: Vec<std::ops::Range<u64>> = vec![0..5, 200..300];
        normalize_ranges(&mut none, 10..100);
        assert!(none.is_empty());
    }
}
