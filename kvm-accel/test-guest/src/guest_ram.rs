// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`GuestRam`]: the small view of guest RAM that workload loading and monitoring need.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::error::{Error, Result};

/// Byte access to guest RAM by guest physical address.
///
/// Implemented for `vm_memory::GuestMemoryMmap` and for a raw host mapping
/// ([`RawGuestRam`]), so this crate does not depend on how the VMM manages memory.
/// Reads and writes may race with a running guest; [`load_u64`](GuestRam::load_u64) is an
/// atomic read for counters the guest updates.
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
/// ```
#[derive(Debug)]
pub struct RawGuestRam {
    host: *mut u8,
    size: u64,
}

// SAFETY: RawGuestRam only does volatile/atomic accesses through a raw pointer whose
// validity the creator guarantees for the object's lifetime; sharing it is as safe as
// sharing the guest memory itself, which the vCPUs access concurrently anyway.
unsafe impl Send for RawGuestRam {}
// SAFETY: see `Send`.
unsafe impl Sync for RawGuestRam {}

impl RawGuestRam {
    /// Wraps the host mapping `host..host + size` of guest physical `0..size`.
    ///
    /// # Safety
    ///
    /// The range must be a readable and writable mapping, 8-byte aligned, valid for the
    /// lifetime of the returned object.
    pub unsafe fn new(host: *mut u8, size: u64) -> Self {
        RawGuestRam { host, size }
    }

    fn check(&self, gpa: u64, len: usize) -> Result<*mut u8> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => {
                // SAFETY: gpa + len <= size, so the offset stays inside the mapping.
                Ok(unsafe { self.host.add(gpa as usize) })
            }
            _ => Err(oob(gpa, len)),
        }
    }

    fn atomic(&self, gpa: u64) -> Result<&AtomicU64> {
        if gpa % 8 != 0 {
            return Err(oob(gpa, 8));
        }
        let p = self.check(gpa, 8)?;
        // SAFETY: `p` is inside the mapping, 8-byte aligned (mapping aligned, gpa aligned)
        // and valid for the lifetime of `self`; all our accesses to it are atomic.
        Ok(unsafe { AtomicU64::from_ptr(p as *mut u64) })
    }
}

impl GuestRam for RawGuestRam {
    fn ram_end(&self) -> u64 {
        self.size
    }

    fn write_at(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let p = self.check(gpa, data.len())?;
        // Guest memory changes under our feet (vCPUs, other host threads): copy through
        // vm-memory's volatile slice rather than plain memcpy, so no Rust-level data race.
        // SAFETY: the range was checked to lie inside the mapping, which the creator
        // guarantees valid for this object's lifetime (see `new`).
        let slice = unsafe { VolatileSlice::new(p, data.len()) };
        slice.copy_from(data);
        Ok(())
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.check(gpa, buf.len())?;
        // SAFETY: as in `write_at`.
        let slice = unsafe { VolatileSlice::new(p, buf.len()) };
        slice.copy_to(buf);
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
