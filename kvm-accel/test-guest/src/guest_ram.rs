// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`GuestRam`]: the small view of guest RAM that workload loading and monitoring need.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{Error, Result};

/// Byte access to guest RAM by guest physical address.
///
/// Implemented for `vm_memory::GuestMemoryMmap` and for a raw host mapping
/// ([`RawGuestRam`]), so this crate does not depend on how the VMM manages memory.
/// Reads and writes may race with a running guest (a copy may then be torn);
/// [`load_u64`](GuestRam::load_u64) is an atomic read for counters the guest updates. For
/// `GuestMemoryMmap` the copies are vm-memory's (`write_slice`/`read_slice`: volatile for up to 8
/// bytes, a plain `copy_nonoverlapping` beyond); [`RawGuestRam`] copies with atomic word accesses.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::guest_ram::GuestRam;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// mem.write_at(0x100, &7u64.to_le_bytes()).unwrap();
/// assert_eq!(mem.load_u64(0x100).unwrap(), 7);
/// assert!(mem.write_at(0x10000, &[1]).is_err());
/// ```
pub trait GuestRam {
    /// One past the highest guest physical address backed by RAM.
    fn ram_end(&self) -> u64;
    /// Copies `data` to guest physical address `gpa`.
    fn write_at(&self, gpa: u64, data: &[u8]) -> Result<()>;
    /// Copies guest memory at `gpa` into `buf`.
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<()>;
    /// Atomically reads the naturally aligned `u64` at `gpa`.
    fn load_u64(&self, gpa: u64) -> Result<u64>;
    /// Atomically writes the naturally aligned `u64` at `gpa`.
    fn store_u64(&self, gpa: u64, value: u64) -> Result<()>;
}

fn oob(gpa: u64, len: usize) -> Error {
    Error::GuestMemory { gpa, len }
}

impl<B: Bitmap + 'static> GuestRam for GuestMemoryMmap<B> {
    fn ram_end(&self) -> u64 {
        if self.num_regions() == 0 {
            return 0;
        }
        self.last_addr().0.saturating_add(1)
    }

    fn write_at(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.write_slice(data, GuestAddress(gpa))
            .map_err(|_| oob(gpa, data.len()))
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.read_slice(buf, GuestAddress(gpa))
            .map_err(|_| oob(gpa, len))
    }

    fn load_u64(&self, gpa: u64) -> Result<u64> {
        if gpa % 8 != 0 {
            return Err(oob(gpa, 8));
        }
        self.load::<u64>(GuestAddress(gpa), Ordering::Acquire)
            .map_err(|_| oob(gpa, 8))
    }

    fn store_u64(&self, gpa: u64, value: u64) -> Result<()> {
        if gpa % 8 != 0 {
            return Err(oob(gpa, 8));
        }
        self.store(value, GuestAddress(gpa), Ordering::Release)
            .map_err(|_| oob(gpa, 8))
    }
}

/// Guest RAM given as one host mapping of guest physical `0..size`.
///
/// Guest memory is shared with another agent, the vCPU, which writes it at any time. This type
/// never forms a reference to plain (non-atomic) data in the mapping: every access through it is
/// an atomic access of a naturally aligned `u64` word inside it (`AtomicU64::from_ptr`; byte
/// copies read or compare-and-swap whole words), so accesses through `RawGuestRam`s never race
/// each other, and a vCPU store is seen like another process's store to shared memory. A copy of
/// more than one word is not atomic as a whole: it may see some of a concurrent write and not the
/// rest (torn), which the callers tolerate (they load workloads before the vCPUs start and read
/// counters with [`load_u64`](GuestRam::load_u64)).
///
/// Other host code copies the same memory without atomics: a migration reads pages with plain
/// copies (vm-memory's, and `memcpy`) while a test may store a workload parameter through this
/// type into a page being copied. Rust's memory model calls that mix a data race; this crate does
/// what vm-memory and every VMM do with guest memory: no Rust reference ever points into it, every
/// access is a raw-pointer load, store or copy of plain bytes with no invariant, and a copy that
/// overlaps a store may be torn (a migration re-sends a page dirtied meanwhile). Host writes that
/// must reach a migration go through the memory system ([`crate::Guest::block`]), which marks them
/// dirty; writes through this type are not tracked.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::guest_ram::{GuestRam, RawGuestRam};
///
/// let mut buf = vec![0u64; 512];
/// // SAFETY: `buf` outlives `ram` and is only accessed through it meanwhile.
/// let ram = unsafe { RawGuestRam::new(buf.as_mut_ptr() as *mut u8, 4096) };
/// ram.store_u64(8, 42).unwrap();
/// assert_eq!(ram.load_u64(8).unwrap(), 42);
/// ram.write_at(13, b"unaligned bytes").unwrap();
/// let mut back = [0u8; 15];
/// ram.read_at(13, &mut back).unwrap();
/// assert_eq!(&back, b"unaligned bytes");
/// ```
#[derive(Debug)]
pub struct RawGuestRam {
    host: *mut u8,
    size: u64,
}

// SAFETY: RawGuestRam only does atomic accesses of aligned words through a raw pointer whose
// validity the creator guarantees for the object's lifetime (see `new`); atomics may be used from
// any thread, and the vCPUs share the memory anyway.
unsafe impl Send for RawGuestRam {}
// SAFETY: see `Send`: accesses through `RawGuestRam`s from several threads are all atomic, so they
// cannot race each other; plain copies by other host code are the shared-memory case of the type
// docs, the same with or without `Sync`.
unsafe impl Sync for RawGuestRam {}

impl RawGuestRam {
    /// Wraps the host mapping `host..host + size` of guest physical `0..size`.
    ///
    /// # Safety
    ///
    /// The range must be a readable and writable mapping, 8-byte aligned, with `size` a multiple
    /// of 8, valid (not unmapped or remapped) for the lifetime of the returned object, and never
    /// referenced by a Rust reference while it exists: other host code may access it only through
    /// raw pointers (atomic accesses, volatile accesses or copies), as guest memory is; see the
    /// type docs for what such concurrent copies may see.
    ///
    /// # Panics
    ///
    /// If `host` is not 8-byte aligned or `size` not a multiple of 8.
    pub unsafe fn new(host: *mut u8, size: u64) -> Self {
        assert!(
            host as usize % 8 == 0 && size % 8 == 0,
            "RawGuestRam needs an 8-byte aligned mapping of whole words"
        );
        RawGuestRam { host, size }
    }

    fn check(&self, gpa: u64, len: usize) -> Result<()> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(oob(gpa, len)),
        }
    }

    /// The word at word-aligned `offset` (< size), unchecked.
    fn word(&self, offset: u64) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset < self.size);
        // SAFETY: `offset` is 8-aligned and below `size` (a multiple of 8), so the 8 bytes lie
        // inside the mapping, which `new`'s caller guarantees valid, aligned and never referenced
        // for the lifetime of `self` (which the reference cannot outlive). Accesses through this
        // type are atomic; other host code's plain copies of the same bytes are the shared-memory
        // case of the type docs.
        unsafe { AtomicU64::from_ptr(self.host.add(offset as usize).cast::<u64>()) }
    }

    fn atomic(&self, gpa: u64) -> Result<&AtomicU64> {
        if gpa % 8 != 0 {
            return Err(oob(gpa, 8));
        }
        self.check(gpa, 8)?;
        Ok(self.word(gpa))
    }

    /// Calls `f(word_offset, first_byte_in_word, byte_count, position_in_data)` for each word
    /// that `[gpa, gpa + len)` touches (already checked).
    fn for_words(&self, gpa: u64, len: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut pos = 0usize;
        while pos < len {
            let at = gpa + pos as u64;
            let word = at & !7;
            let first = (at - word) as usize;
            let n = (8 - first).min(len - pos);
            f(word, first, n, pos);
            pos += n;
        }
    }
}

impl GuestRam for RawGuestRam {
    fn ram_end(&self) -> u64 {
        self.size
    }

    fn write_at(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.check(gpa, data.len())?;
        self.for_words(gpa, data.len(), |word, first, n, pos| {
            let w = self.word(word);
            let src = &data[pos..pos + n];
            if n == 8 {
                w.store(
                    u64::from_ne_bytes(src.try_into().unwrap()),
                    Ordering::Relaxed,
                );
            } else {
                // Part of a word: merge with a compare-and-swap so a concurrent store to the
                // word's other bytes (host or vCPU) is not undone.
                let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                    let mut b = old.to_ne_bytes();
                    b[first..first + n].copy_from_slice(src);
                    Some(u64::from_ne_bytes(b))
                });
            }
        });
        // Make the copy visible to a reader that synchronizes with a later Release store.
        std::sync::atomic::fence(Ordering::Release);
        Ok(())
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        std::sync::atomic::fence(Ordering::Acquire);
        let len = buf.len();
        self.for_words(gpa, len, |word, first, n, pos| {
            let b = self.word(word).load(Ordering::Relaxed).to_ne_bytes();
            buf[pos..pos + n].copy_from_slice(&b[first..first + n]);
        });
        Ok(())
    }

    fn load_u64(&self, gpa: u64) -> Result<u64> {
        Ok(self.atomic(gpa)?.load(Ordering::Acquire))
    }

    fn store_u64(&self, gpa: u64, value: u64) -> Result<()> {
        self.atomic(gpa)?.store(value, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_copies_at_every_alignment_round_trip() {
        let mut buf = vec![0u64; 64];
        // SAFETY: `buf` outlives `ram` and is only accessed through it meanwhile.
        let ram = unsafe { RawGuestRam::new(buf.as_mut_ptr().cast::<u8>(), 512) };
        for start in 0..16u64 {
            for len in 0..40usize {
                let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (start as u8 * 7)).collect();
                ram.write_at(start, &data).unwrap();
                let mut back = vec![0u8; len];
                ram.read_at(start, &mut back).unwrap();
                assert_eq!(back, data, "start {start} len {len}");
            }
        }
        // A partial-word write leaves the word's other bytes alone.
        ram.store_u64(64, u64::MAX).unwrap();
        ram.write_at(66, &[0, 0]).unwrap();
        assert_eq!(
            ram.load_u64(64).unwrap().to_ne_bytes(),
            [255, 255, 0, 0, 255, 255, 255, 255]
        );
        assert!(ram.write_at(510, &[0; 3]).is_err());
        assert!(ram.read_at(512, &mut [0; 1]).is_err());
    }
}
