// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`EpochDelta`]: the pages that one dirty epoch, or a run of consecutive epochs, of a
//! [`crate::DirtyEpochs`] tracker reported.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clearlog_bitmap::Bitmap;

use crate::{Error, RamBlock, RamBlockId, Result};

/// A fresh identity for a tracker, so deltas of two trackers are never merged.
pub(crate) fn next_tracker_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The pages of every RAM block that a run of consecutive dirty epochs reported: what
/// [`DirtyEpochs::advance`](crate::DirtyEpochs::advance) returns (one epoch), or several of those
/// [`merge`](Self::merge)d (pages changed since an older epoch).
///
/// One bit per page of each RAM block (block page `p` is bit `p`), blocks in RAM-address-space
/// order. A delta may report pages that did not change (see [`crate::DirtyEpochs`]: never fewer).
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyEpochs, MemorySystem};
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// mem.add_ram("ram", 0, 64 << 12).unwrap();
/// let block = mem.ram_blocks()[0].clone();
/// let mut epochs = DirtyEpochs::open(&mem).unwrap();
/// block.write(3 << 12, b"epoch 0").unwrap();
/// let mut since_open = epochs.advance().unwrap();
/// block.write(9 << 12, b"epoch 1").unwrap();
/// let one = epochs.advance().unwrap();
/// assert_eq!(one.epochs(), 1..2);
/// assert_eq!(one.iter().collect::<Vec<_>>(), [(block.id(), 9)]);
///
/// since_open.merge(&one).unwrap(); // epochs 0 and 1: the pages changed since the tracker opened
/// assert_eq!(since_open.epochs(), 0..2);
/// assert!(since_open.is_dirty(block.id(), 3) && since_open.is_dirty(block.id(), 9));
/// assert_eq!(since_open.dirty_pages(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct EpochDelta {
    tracker: u64,
    epochs: Range<u64>,
    blocks: Vec<(Arc<RamBlock>, Bitmap)>,
}

impl EpochDelta {
    /// The delta of epoch `epoch` of tracker `tracker`.
    pub(crate) fn new(tracker: u64, epoch: u64, blocks: Vec<(Arc<RamBlock>, Bitmap)>) -> Self {
        EpochDelta {
            tracker,
            epochs: epoch..epoch + 1,
            blocks,
        }
    }

    /// The epochs covered: `n..n + 1` for the delta of epoch `n`, `a..b` once merged.
    ///
    /// # Examples
    ///
    /// See [`EpochDelta`].
    pub fn epochs(&self) -> Range<u64> {
        self.epochs.clone()
    }

    /// Every RAM block with its bits (one per page of the block), in RAM-address-space order.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyEpochs, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("a", 0, 16 << 12).unwrap();
    /// mem.add_ram("b", 16 << 12, 8 << 12).unwrap();
    /// let mut epochs = DirtyEpochs::open(&mem).unwrap();
    /// mem.ram_blocks()[1].write(0, &[1]).unwrap();
    /// let delta = epochs.advance().unwrap();
    /// let counts: Vec<(String, usize)> =
    ///     delta.blocks().map(|(b, bits)| (b.name().to_owned(), bits.count_ones())).collect();
    /// assert_eq!(counts, [("a".to_owned(), 0), ("b".to_owned(), 1)]);
    /// ```
    pub fn blocks(&self) -> impl Iterator<Item = (&Arc<RamBlock>, &Bitmap)> {
        self.blocks.iter().map(|(b, bits)| (b, bits))
    }

    /// The bits of one block (`None` for a block the delta does not cover).
    ///
    /// # Examples
    ///
    /// ```
    /// # use clearlog_memory::{DirtyEpochs, MemorySystem};
    /// # let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// # mem.add_ram("ram", 0, 16 << 12).unwrap();
    /// let mut epochs = DirtyEpochs::open(&mem).unwrap();
    /// let delta = epochs.advance().unwrap();
    /// assert_eq!(delta.pages(mem.ram_blocks()[0].id()).unwrap().len(), 16);
    /// ```
    pub fn pages(&self, block: RamBlockId) -> Option<&Bitmap> {
        self.blocks
            .iter()
            .find(|(b, _)| b.id() == block)
            .map(|(_, bits)| bits)
    }

    /// Did page `page` of block `block` change in the epochs covered? (`false` outside.)
    ///
    /// # Examples
    ///
    /// See [`EpochDelta`].
    pub fn is_dirty(&self, block: RamBlockId, page: u64) -> bool {
        self.pages(block)
            .filter(|bits| page < bits.len() as u64)
            .is_some_and(|bits| bits.test(page as usize))
    }

    /// Number of pages reported, over all blocks.
    ///
    /// # Examples
    ///
    /// See [`EpochDelta`].
    pub fn dirty_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|(_, bits)| bits.count_ones() as u64)
            .sum()
    }

    /// The pages reported, as (block, page of the block), in RAM-address-space order.
    ///
    /// # Examples
    ///
    /// See [`EpochDelta`].
    pub fn iter(&self) -> impl Iterator<Item = (RamBlockId, u64)> + '_ {
        self.blocks
            .iter()
            .flat_map(|(b, bits)| bits.iter_ones().map(move |p| (b.id(), p as u64)))
    }

    /// Add the next delta of the same tracker: afterwards `self` covers both runs of epochs (a
    /// page is reported if either reported it). This is how "the pages changed since epoch `n`"
    /// is answered: merge the deltas of the epochs after `n` (see [`crate::DirtyEpochs`]).
    ///
    /// # Errors
    ///
    /// [`Error::EpochMerge`] if `later` comes from another tracker or does not start where `self`
    /// ends; `self` is unchanged then.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyEpochs, Error, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.add_ram("ram", 0, 16 << 12).unwrap();
    /// let mut epochs = DirtyEpochs::open(&mem).unwrap();
    /// let mut e0 = epochs.advance().unwrap();
    /// let e1 = epochs.advance().unwrap();
    /// let e2 = epochs.advance().unwrap();
    /// assert!(matches!(e0.merge(&e2), Err(Error::EpochMerge { .. }))); // epoch 1 is missing
    /// e0.merge(&e1).unwrap();
    /// e0.merge(&e2).unwrap();
    /// assert_eq!(e0.epochs(), 0..3);
    /// ```
    pub fn merge(&mut self, later: &EpochDelta) -> Result<()> {
        let refuse = |why| Error::EpochMerge {
            ours: self.epochs(),
            theirs: later.epochs(),
            why,
        };
        if later.tracker != self.tracker {
            return Err(refuse("the deltas come from different trackers"));
        }
        if later.epochs.start != self.epochs.end {
            return Err(refuse("the later delta must start where this one ends"));
        }
        let same_blocks = self.blocks.len() == later.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&later.blocks)
                .all(|((a, x), (b, y))| Arc::ptr_eq(a, b) && x.len() == y.len());
        if !same_blocks {
            return Err(refuse("the deltas cover different RAM blocks"));
        }
        for ((_, bits), (_, more)) in self.blocks.iter_mut().zip(&later.blocks) {
            bits.or_assign(more);
        }
        self.epochs.end = later.epochs.end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemorySystem;

    fn delta(mem: &MemorySystem, tracker: u64, epoch: u64, dirty: &[u64]) -> EpochDelta {
        let blocks = mem
            .ram_blocks()
            .into_iter()
            .map(|b| {
                let mut bits = Bitmap::new(b.pages() as usize);
                dirty.iter().for_each(|&p| bits.set(p as usize));
                (b, bits)
            })
            .collect();
        EpochDelta::new(tracker, epoch, blocks)
    }

    #[test]
    fn merge_is_a_union_of_adjacent_epochs_of_one_tracker_only() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 100 << 12).unwrap();
        let id = mem.ram_blocks()[0].id();
        let mut a = delta(&mem, 7, 4, &[1, 99]);
        let b = delta(&mem, 7, 5, &[2, 99]);
        for (other, why) in [
            (delta(&mem, 8, 5, &[]), "different trackers"),
            (delta(&mem, 7, 6, &[]), "start where"),
            (delta(&mem, 7, 4, &[]), "start where"),
        ] {
            let e = a.merge(&other).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        assert_eq!(a.epochs(), 4..5, "a refused merge changes nothing");
        a.merge(&b).unwrap();
        assert_eq!(a.epochs(), 4..6);
        assert_eq!(a.iter().collect::<Vec<_>>(), [(id, 1), (id, 2), (id, 99)]);
        assert!(!a.is_dirty(id, 100) && !a.is_dirty(RamBlockId::new(99), 1));
        let other = MemorySystem::with_ram_capacity(1 << 24);
        other.add_ram("ram", 0, 100 << 12).unwrap();
        let e = a.merge(&delta(&other, 7, 6, &[])).unwrap_err();
        assert!(e.to_string().contains("different RAM blocks"), "{e}");
    }
}
