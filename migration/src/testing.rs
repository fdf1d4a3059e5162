// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The engine's traits over plain process memory, for tests (feature `testing`): a reference
//! implementation of [`MigrationMemory`] and [`DirtyTracking`] that needs no memory API and no
//! accelerator, so the engine's own tests run with and without the `clearlog-memory` feature.
//!
//! Every block is a `Vec<u8>` behind a lock with a dirty bitmap beside it. [`PlainBlock::write`]
//! is a tracked write (the bytes, then the page's dirty bit, as a VMM's device write through
//! vm-memory); [`MigrationBlock::write_untracked`] is a write no tracker sees (a write the VMM
//! forgets to mark: what the verification must catch). Taking a block's bits is its re-arm, so a
//! sync and a clear have nothing to do.
//!
//! # Examples
//!
//! ```
//! use clearlog_migration::testing::PlainMemory;
//! use clearlog_migration::{mem_channel, CancelToken, Destination, MigrationConfig, Source};
//! # use clearlog_migration::{BoxError, StateBlob, VmControl, VmRestore};
//! # struct Vm;
//! # impl VmControl for Vm {
//! #     fn pause(&self) -> Result<(), BoxError> { Ok(()) }
//! #     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
//! #     fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> { Ok(vec![]) }
//! # }
//! # impl VmRestore for Vm {
//! #     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
//! #     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
//! # }
//!
//! let src = PlainMemory::new(&[("ram", 1 << 20)]);
//! src.block(0).write(0x3000, b"hello").unwrap();
//! let dst = PlainMemory::new(&[("ram", 1 << 20)]);
//! let (tx, rx) = mem_channel();
//! std::thread::scope(|s| {
//!     let incoming = s.spawn(|| Destination::new(&dst).receive(rx, &Vm));
//!     Source::new(&src, MigrationConfig::default())
//!         .unwrap()
//!         .migrate(tx, &Vm, None, &CancelToken::new())
//!         .unwrap();
//!     incoming.join().unwrap().unwrap();
//! });
//! assert_eq!(dst.block(0).bytes()[0x3000..0x3005], *b"hello");
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use clearlog_bitmap::{AtomicBitmap, Bitmap, ClearBitmap};

use crate::{DirtyTracking, MemoryResult, MigrationBlock, MigrationMemory, PAGE_SHIFT, PAGE_SIZE};

/// One block of [`PlainMemory`]: its bytes and its dirty bits.
#[derive(Debug)]
pub struct PlainBlock {
    name: String,
    bytes: Mutex<Vec<u8>>,
    dirty: AtomicBitmap,
}

impl PlainBlock {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A tracked write: the bytes, then the dirty bit of every page written.
    ///
    /// # Errors
    ///
    /// The range leaves the block.
    pub fn write(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
        self.write_untracked(offset, data)?;
        if !data.is_empty() {
            let first = (offset >> PAGE_SHIFT) as usize;
            let last = ((offset + data.len() as u64 - 1) >> PAGE_SHIFT) as usize;
            self.dirty.set_range(first, last - first + 1);
        }
        Ok(())
    }

    /// A copy of the block's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
}

impl MigrationBlock for PlainBlock {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
        let bytes = self.lock();
        let range = usize::try_from(offset)?..usize::try_from(offset)? + buf.len();
        buf.copy_from_slice(bytes.get(range).ok_or("read past the block")?);
        Ok(())
    }
    fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
        let mut bytes = self.lock();
        let range = usize::try_from(offset)?..usize::try_from(offset)? + data.len();
        bytes
            .get_mut(range)
            .ok_or("write past the block")?
            .copy_from_slice(data);
        Ok(())
    }
}

/// Blocks of plain process memory with host-write dirty tracking: see the module docs.
#[derive(Debug)]
pub struct PlainMemory {
    blocks: Vec<Arc<PlainBlock>>,
    logging: AtomicBool,
}

impl PlainMemory {
    /// Zeroed blocks of these names and sizes (multiples of [`PAGE_SIZE`]).
    ///
    /// # Panics
    ///
    /// A size that is not a non-zero multiple of [`PAGE_SIZE`].
    pub fn new(layout: &[(&str, u64)]) -> Self {
        let blocks = layout
            .iter()
            .map(|&(name, size)| {
                assert!(
                    size > 0 && size % PAGE_SIZE == 0,
                    "block {name}: size {size:#x}"
                );
                Arc::new(PlainBlock {
                    name: name.to_owned(),
                    bytes: Mutex::new(vec![0; size as usize]),
                    dirty: AtomicBitmap::new((size / PAGE_SIZE) as usize),
                })
            })
            .collect();
        PlainMemory {
            blocks,
            logging: AtomicBool::new(false),
        }
    }

    /// Block `i`.
    ///
    /// # Panics
    ///
    /// `i` is not a block index.
    pub fn block(&self, i: usize) -> &Arc<PlainBlock> {
        &self.blocks[i]
    }

    /// Is dirty logging on (between [`DirtyTracking::start_logging`] and `stop_logging`)?
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }
}

impl MigrationMemory for PlainMemory {
    type Block = Arc<PlainBlock>;
    fn blocks(&self) -> Vec<Arc<PlainBlock>> {
        self.blocks.clone()
    }
}

impl DirtyTracking for PlainMemory {
    fn start_logging(&self) -> MemoryResult<()> {
        for b in &self.blocks {
            b.dirty.clear_all();
        }
        self.logging.store(true, Ordering::Release);
        Ok(())
    }
    fn stop_logging(&self) -> MemoryResult<()> {
        self.logging.store(false, Ordering::Release);
        Ok(())
    }
    fn sync_dirty(&self) -> MemoryResult<()> {
        Ok(())
    }
    fn take_dirty(
        &self,
        block: &Arc<PlainBlock>,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> MemoryResult<u64> {
        Ok(block.dirty.take_into(0, block.dirty.len(), dest, clear)?)
    }
    fn clear_dirty(&self, _block: &Arc<PlainBlock>, _offset: u64, _len: u64) -> MemoryResult<()> {
        Ok(()) // the take was the re-arm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_writes_are_taken_once_untracked_ones_never() {
        let mem = PlainMemory::new(&[("a", 8 * PAGE_SIZE)]);
        let b = mem.block(0);
        mem.start_logging().unwrap();
        b.write(PAGE_SIZE - 1, &[1, 2]).unwrap(); // pages 0 and 1
        b.write_untracked(5 * PAGE_SIZE, &[3]).unwrap();
        let mut dest = Bitmap::new(8);
        assert_eq!(mem.take_dirty(b, &mut dest, None).unwrap(), 2);
        assert_eq!(dest.iter_ones().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(mem.take_dirty(b, &mut dest, None).unwrap(), 0);
        assert!(b.write(8 * PAGE_SIZE, &[1]).is_err());
        let mut buf = [0u8; 2];
        b.read(PAGE_SIZE - 1, &mut buf).unwrap();
        assert_eq!(buf, [1, 2]);
    }
}
