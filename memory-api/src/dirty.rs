// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Dirty-memory clients and their bitmaps over the RAM address space.

use std::sync::atomic::{fence, AtomicU8, Ordering};

use clearlog_bitmap::{words_for_bits, AtomicBitmap, BITS_PER_WORD};

use crate::ids::{DirtyClient, DirtyClients};
use crate::{Error, Result};

/// The clients' dirty bitmaps: one bit per page of the RAM address space, per client.
///
/// Several consumers want to know which guest pages changed: live migration, a display that redraws
/// what changed, a code cache. Each is a [`DirtyClient`] with its own [`AtomicBitmap`] over the whole
/// RAM address space (one bit per page; RAM block `b`'s page `p` is bit `b.ram_page_offset() + p`);
/// [`DirtyClient::Snapshot`] is the client of [`crate::DirtyEpochs`].
/// Two sources set bits: the accelerator (it folds what KVM reports with
/// [`DirtyMemory::fold_bitmap`]) and the VMM itself (device writes, DMA, image loading, through
/// [`DirtyMemory::set_dirty_range`]). Each client takes its own bits, so clients never steal each
/// other's.
///
/// The bitmaps are sized once, for the whole RAM address space (its capacity), so they never move:
/// folds, host-side writes and takes run lock-free, concurrently with each other. Besides the
/// bitmaps it keeps the set of *active* clients: those that receive host-side writes
/// ([`set_dirty_range`](Self::set_dirty_range)). Migration is active while global logging is on;
/// Snapshot while a [`crate::DirtyEpochs`] tracker is open; Vga and Code while at least one region
/// logs for them.
///
/// # Examples
///
/// ```
/// use clearlog_memory::{DirtyClient, DirtyClients, DirtyMemory};
///
/// let dirty = DirtyMemory::new(256);
/// // KVM reported pages 1 and 64 of a slot that starts at RAM page 3.
/// let kvm_log = [1u64 << 1, 1];
/// let clients = DirtyClients::NONE.with(DirtyClient::Vga);
/// assert_eq!(dirty.fold_bitmap(3, &kvm_log, 65, clients), 2);
/// let vga = dirty.client(DirtyClient::Vga);
/// assert_eq!(vga.iter_ones().collect::<Vec<_>>(), [4, 67]);
/// assert_eq!(dirty.client(DirtyClient::Migration).count_ones(), 0);
/// ```
#[derive(Debug)]
pub struct DirtyMemory {
    clients: [AtomicBitmap; 4],
    active: AtomicU8,
}

impl DirtyMemory {
    /// Bitmaps for a RAM address space of `pages` pages (rounded up to a multiple of 64). No client
    /// is active yet.
    ///
    /// # Examples
    ///
    /// ```
    /// let dirty = clearlog_memory::DirtyMemory::new(100);
    /// assert_eq!(dirty.capacity_pages(), 128);
    /// ```
    pub fn new(pages: u64) -> Self {
        let bits = words_for_bits(pages as usize) * BITS_PER_WORD;
        DirtyMemory {
            clients: std::array::from_fn(|_| AtomicBitmap::new(bits)),
            active: AtomicU8::new(0),
        }
    }

    /// Number of pages the bitmaps cover (the RAM address space's capacity).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_memory::DirtyMemory::new(64).capacity_pages(), 64);
    /// ```
    pub fn capacity_pages(&self) -> u64 {
        self.clients[0].len() as u64
    }

    /// Clients that currently receive host-side writes.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// assert_eq!(mem.dirty().active_clients(), DirtyClients::NONE);
    /// mem.log_global_start().unwrap();
    /// assert_eq!(mem.dirty().active_clients(), DirtyClients::from(DirtyClient::Migration));
    /// ```
    pub fn active_clients(&self) -> DirtyClients {
        DirtyClients::from_bits(self.active.load(Ordering::Acquire))
    }

    /// Set the active clients (the memory system does this when logging changes).
    pub(crate) fn set_active_clients(&self, clients: DirtyClients) {
        self.active.store(clients.bits(), Ordering::Release);
        // Pairs with the fence in `set_dirty_range`: a client turned on here, then reading
        // pages, and a host write that stores a page, then loads the active set, form a
        // store-buffering pattern. With a `SeqCst` fence between the store and the load on each
        // side, at least one of them sees the other: the write is marked for the client, or the
        // client's read sees the write.
        fence(Ordering::SeqCst);
    }

    /// Fold an accelerator bitmap (KVM layout, bit 0 = `ram_first_page`) of `npages` pages into every
    /// client in `clients` (the section's logging clients; Migration only while global logging is on).
    /// `ram_first_page` need not be word-aligned. Returns the number of set bits folded.
    ///
    /// Bits of `words` at or past `npages` are ignored. Each destination word is one atomic OR, so a
    /// fold never loses a bit that a client takes concurrently. One pass over `words` serves all
    /// clients; zero words cost one load.
    ///
    /// # Panics
    ///
    /// Panics if `words` holds fewer than `npages` bits or if the range passes the capacity. Use
    /// [`try_fold_bitmap`](Self::try_fold_bitmap) when the sizes are not correct by construction.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients, DirtyMemory};
    ///
    /// let dirty = DirtyMemory::new(128);
    /// let n = dirty.fold_bitmap(64, &[0b1011], 2, DirtyClients::ALL);
    /// assert_eq!(n, 2); // bit 3 is past npages and ignored
    /// assert_eq!(dirty.client(DirtyClient::Code).iter_ones().collect::<Vec<_>>(), [64, 65]);
    /// ```
    #[track_caller]
    pub fn fold_bitmap(
        &self,
        ram_first_page: u64,
        words: &[u64],
        npages: u64,
        clients: DirtyClients,
    ) -> u64 {
        match self.try_fold_bitmap(ram_first_page, words, npages, clients) {
            Ok(n) => n,
            Err(e) => panic!("fold_bitmap: {e}"),
        }
    }

    /// Fallible version of [`fold_bitmap`](Self::fold_bitmap).
    ///
    /// # Errors
    ///
    /// [`Error::BitmapTooSmall`] if `words` holds fewer than `npages` bits, [`Error::OutOfRange`] if
    /// `[ram_first_page, ram_first_page + npages)` passes the capacity. Nothing is folded then.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClients, DirtyMemory};
    ///
    /// let dirty = DirtyMemory::new(64);
    /// assert!(dirty.try_fold_bitmap(32, &[1], 64, DirtyClients::ALL).is_err());
    /// ```
    pub fn try_fold_bitmap(
        &self,
        ram_first_page: u64,
        words: &[u64],
        npages: u64,
        clients: DirtyClients,
    ) -> Result<u64> {
        let have = (words.len() as u64).saturating_mul(64);
        if have < npages {
            return Err(Error::BitmapTooSmall {
                what: "accelerator bitmap",
                need: npages,
                have,
            });
        }
        self.check_range(ram_first_page, npages)?;
        let targets: Vec<&AtomicBitmap> =
            clients.iter().map(|c| &self.clients[c.index()]).collect();
        let nwords = words_for_bits(npages as usize);
        let first_word = (ram_first_page / 64) as usize;
        let shift = (ram_first_page % 64) as u32;
        let tail_bits = (npages % 64) as u32;
        let mut folded = 0u64;
        for (k, &raw) in words[..nwords].iter().enumerate() {
            let word = if k + 1 == nwords && tail_bits != 0 {
                raw & ((1u64 << tail_bits) - 1)
            } else {
                raw
            };
            if word == 0 {
                continue;
            }
            folded += u64::from(word.count_ones());
            // Source word k covers RAM bits [first + 64k + shift, ...): it straddles two destination
            // words unless the section starts on a word boundary.
            let low = word << shift;
            let high = if shift == 0 { 0 } else { word >> (64 - shift) };
            for map in &targets {
                if low != 0 {
                    map.fetch_or_word(first_word + k, low);
                }
                if high != 0 {
                    // In range: `high` only holds bits below `ram_first_page + npages`.
                    map.fetch_or_word(first_word + k + 1, high);
                }
            }
        }
        Ok(folded)
    }

    /// Mark pages dirty for every client that is logging them (host-side writes: devices, DMA, image loading).
    ///
    /// Marks every [active](Self::active_clients) client. Call it *after* the data is written, so a
    /// client that takes the bit reads the new data.
    ///
    /// # Panics
    ///
    /// Panics if the range passes the capacity (RAM blocks only ever pass ranges inside themselves).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, MemorySystem};
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// mem.log_global_start().unwrap();
    /// mem.dirty().set_dirty_range(10, 3);
    /// let migration = mem.dirty().client(DirtyClient::Migration);
    /// assert_eq!(migration.iter_ones().collect::<Vec<_>>(), [10, 11, 12]);
    /// assert_eq!(mem.dirty().client(DirtyClient::Vga).count_ones(), 0); // Vga not logging
    /// ```
    #[track_caller]
    pub fn set_dirty_range(&self, ram_first_page: u64, npages: u64) {
        // The data is written; order that store before the load of the active set (see
        // `set_active_clients`).
        fence(Ordering::SeqCst);
        self.set_dirty_range_for(self.active_clients(), ram_first_page, npages);
    }

    /// Mark pages dirty for the clients in `clients` (active or not).
    ///
    /// # Panics
    ///
    /// As [`set_dirty_range`](Self::set_dirty_range).
    #[track_caller]
    pub(crate) fn set_dirty_range_for(
        &self,
        clients: DirtyClients,
        ram_first_page: u64,
        npages: u64,
    ) {
        if let Err(e) = self.check_range(ram_first_page, npages) {
            panic!("set_dirty_range: {e}");
        }
        for client in clients.iter() {
            self.clients[client.index()].set_range(ram_first_page as usize, npages as usize);
        }
    }

    /// The client's bitmap.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyMemory};
    ///
    /// let dirty = DirtyMemory::new(64);
    /// dirty.client(DirtyClient::Vga).set(5);
    /// assert!(dirty.client(DirtyClient::Vga).test(5));
    /// ```
    pub fn client(&self, client: DirtyClient) -> &AtomicBitmap {
        &self.clients[client.index()]
    }

    fn check_range(&self, first: u64, npages: u64) -> Result<()> {
        let size = self.capacity_pages();
        match first.checked_add(npages) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                what: "RAM address space (pages)",
                offset: first,
                len: npages,
                size,
            }),
        }
    }

    /// Mark pages `[ram_first_page, ram_first_page + npages)` dirty for every client in `clients`,
    /// active or not: for an accelerator that can no longer tell which pages of a range were
    /// written (e.g. a memslot deleted while a vCPU could still write it after its last sync), so
    /// the clients that were logging the range get all of it.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if the range passes the capacity (or overflows); nothing is marked.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_memory::{DirtyClient, DirtyClients, DirtyMemory};
    ///
    /// let dirty = DirtyMemory::new(128);
    /// let vga = DirtyClients::NONE.with(DirtyClient::Vga);
    /// dirty.mark_dirty(vga, 62, 3).unwrap();
    /// assert_eq!(dirty.client(DirtyClient::Vga).iter_ones().collect::<Vec<_>>(), [62, 63, 64]);
    /// assert_eq!(dirty.client(DirtyClient::Migration).count_ones(), 0);
    /// assert!(dirty.mark_dirty(vga, 100, 29).is_err());
    /// ```
    pub fn mark_dirty(
        &self,
        clients: DirtyClients,
        ram_first_page: u64,
        npages: u64,
    ) -> Result<()> {
        self.check_range(ram_first_page, npages)?;
        for client in clients.iter() {
            self.clients[client.index()].set_range(ram_first_page as usize, npages as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ones(map: &AtomicBitmap) -> Vec<usize> {
        map.iter_ones().collect()
    }

    /// Finding: turning a client on (a store of the active set, then the client reads the pages)
    /// and a VMM write (a store of the page, then a load of the active set to know whom to mark)
    /// are a store-buffering pattern: with only release/acquire, both loads may miss the other
    /// side's store (the write is neither marked for the client nor seen by its read: a lost
    /// page). x86 forbids that outcome only because of its locked store; arm64 allows it. Run it
    /// under Miri (`cargo xtask miri`), whose weak-memory emulation produces the outcome when no
    /// `SeqCst` fence separates the store from the load on each side.
    #[test]
    fn turning_a_client_on_and_a_host_write_never_both_miss() {
        use std::sync::atomic::AtomicU64;
        use std::sync::Arc;
        let runs = if cfg!(miri) { 64 } else { 2000 };
        for run in 0..runs {
            let dirty = Arc::new(DirtyMemory::new(64));
            // The page's bytes (a relaxed atomic stands for the guest memory the VMM writes).
            let page = Arc::new(AtomicU64::new(0));
            let writer = {
                let (dirty, page) = (dirty.clone(), page.clone());
                std::thread::spawn(move || {
                    page.store(1, Ordering::Relaxed);
                    dirty.set_dirty_range(5, 1);
                })
            };
            let migration = {
                let (dirty, page) = (dirty.clone(), page.clone());
                std::thread::spawn(move || {
                    dirty.set_active_clients(DirtyClients::NONE.with(DirtyClient::Migration));
                    page.load(Ordering::Relaxed)
                })
            };
            writer.join().unwrap();
            let seen = migration.join().unwrap();
            let marked = dirty.client(DirtyClient::Migration).test(5);
            assert!(
                marked || seen == 1,
                "run {run}: the write was neither marked for migration nor seen by its read"
            );
        }
    }

    #[test]
    fn fold_aligned_and_unaligned_agree_with_bitwise_reference() {
        for start in [0u64, 1, 37, 63, 64, 100] {
            let dirty = DirtyMemory::new(512);
            let words = [0x8000_0000_0000_0001u64, 0xf0f0, u64::MAX];
            let npages = 150;
            let clients = DirtyClients::NONE
                .with(DirtyClient::Migration)
                .with(DirtyClient::Vga);
            let n = dirty.fold_bitmap(start, &words, npages, clients);
            let expected: Vec<usize> = (0..npages as usize)
                .filter(|&i| words[i / 64] >> (i % 64) & 1 == 1)
                .map(|i| i + start as usize)
                .collect();
            assert_eq!(n as usize, expected.len(), "start {start}");
            assert_eq!(
                ones(dirty.client(DirtyClient::Migration)),
                expected,
                "start {start}"
            );
            assert_eq!(
                ones(dirty.client(DirtyClient::Vga)),
                expected,
                "start {start}"
            );
            assert_eq!(dirty.client(DirtyClient::Code).count_ones(), 0);
        }
    }

    #[test]
    fn fold_keeps_existing_bits() {
        let dirty = DirtyMemory::new(128);
        dirty.client(DirtyClient::Vga).set(0);
        dirty.fold_bitmap(5, &[1], 1, DirtyClient::Vga.into());
        assert_eq!(ones(dirty.client(DirtyClient::Vga)), [0, 5]);
    }

    #[test]
    fn fold_rejects_bad_sizes() {
        let dirty = DirtyMemory::new(128);
        assert!(matches!(
            dirty.try_fold_bitmap(0, &[1], 65, DirtyClients::ALL),
            Err(Error::BitmapTooSmall { .. })
        ));
        assert!(matches!(
            dirty.try_fold_bitmap(100, &[1], 64, DirtyClients::ALL),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            dirty.try_fold_bitmap(u64::MAX, &[1], 1, DirtyClients::ALL),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn set_dirty_range_marks_only_active_clients() {
        let dirty = DirtyMemory::new(128);
        dirty.set_dirty_range(0, 3);
        assert!(DirtyClient::ALL
            .iter()
            .all(|c| dirty.client(*c).count_ones() == 0));
        dirty.set_active_clients(DirtyClients::NONE.with(DirtyClient::Code));
        dirty.set_dirty_range(62, 4);
        assert_eq!(ones(dirty.client(DirtyClient::Code)), [62, 63, 64, 65]);
        assert_eq!(dirty.client(DirtyClient::Vga).count_ones(), 0);
    }

    #[test]
    fn clients_set_operations() {
        let s = DirtyClients::from(DirtyClient::Vga);
        assert!(!s.is_empty());
        assert_eq!(s.without(DirtyClient::Vga), DirtyClients::NONE);
        assert_eq!(s.union(DirtyClient::Code.into()).iter().count(), 2);
    }
}
