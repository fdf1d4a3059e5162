// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Private mappings of this process that the kernel is pointed at: dirty-bitmap buffers that end
//! right before an inaccessible guard page ([`GuardedWords`]), and the inaccessible page of the
//! memslot-id probe ([`ProbePage`]).

use std::io;
use std::ops::{Deref, DerefMut};

/// The page size these mappings are made of.
fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// A private, inaccessible (`PROT_NONE`) 1-page reservation: the `userspace_addr` of the
/// memslot-id probes ([`Vm`](crate::Vm)'s `probe_slot_id`). No memslot of anyone else can have
/// this address (it is ours, reserved for this), and a vCPU that touches a probe slot over it gets
/// `EFAULT`, never memory of ours. Unmapped on drop unless [`ProbePage::leak`] was called (a probe
/// slot over it could not be deleted: then the page must stay reserved for as long as the process
/// lives, so the address is never reused while the slot names it).
#[derive(Debug)]
pub(crate) struct ProbePage {
    addr: usize,
    len: usize,
    leaked: bool,
}

impl ProbePage {
    /// Reserves the page.
    pub(crate) fn new() -> io::Result<Self> {
        let len = page_size();
        // SAFETY: a new private anonymous mapping at an address the kernel picks (no MAP_FIXED),
        // so no existing mapping is touched; PROT_NONE: nothing can read or write it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ProbePage {
            addr: p as usize,
            len,
            leaked: false,
        })
    }

    /// The page's address (a `userspace_addr` no memslot of anyone else can have).
    pub(crate) fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Never unmap the page (a memslot over it may still exist).
    pub(crate) fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for ProbePage {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: `addr..addr + len` is the reservation `new` made, unmapped once, here; no
            // memslot names it any more (every probe slot was deleted, or `leak` was called).
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

/// `u64` words (zeroed) whose last byte lies right before an inaccessible (`PROT_NONE`) guard page:
/// the buffers `KVM_GET_DIRTY_LOG` writes into.
///
/// The kernel writes as many words as the memslot *it* knows has, which this crate cannot check:
/// a VMM holding the VM fd can delete a memslot and make it again, larger, behind the
/// [`Vm`](crate::Vm)'s back. Its copy to user memory fills the destination in ascending order and
/// stops at the first byte it cannot write, so a GET that runs past these words faults on the
/// guard page and fails with `EFAULT`; it never reaches memory past it. [`tail_mut`](Self::tail_mut)
/// gives the last `n` words (they end right before the guard too), so a large buffer serves
/// smaller GETs.
pub(crate) struct GuardedWords {
    /// Start of the mapping (data pages, then the guard page).
    map: usize,
    map_len: usize,
    /// First word; `len` words end exactly at the guard page.
    words: usize,
    len: usize,
}

impl std::fmt::Debug for GuardedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedWords")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl GuardedWords {
    /// `len` zeroed words followed by a guard page.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        let page = page_size();
        let bytes = len
            .checked_mul(8)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let data = bytes.div_ceil(page) * page;
        let map_len = data
            .checked_add(page)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new private anonymous mapping at an address the kernel picks (no MAP_FIXED),
        // so no existing mapping is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = p as usize;
        let guarded = GuardedWords {
            map,
            map_len,
            words: map + data - bytes,
            len,
        };
        // SAFETY: the last page of the mapping just made, which nothing references yet.
        if unsafe { libc::mprotect((map + data) as *mut libc::c_void, page, libc::PROT_NONE) } != 0
        {
            // Dropping `guarded` unmaps the whole mapping.
            return Err(io::Error::last_os_error());
        }
        Ok(guarded)
    }

    /// The last `n` words (all of them if `n` is larger): they end right before the guard page.
    pub(crate) fn tail_mut(&mut self, n: usize) -> &mut [u64] {
        let len = self.len;
        &mut self[len.saturating_sub(n)..]
    }
}

impl Deref for GuardedWords {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        // SAFETY: `words..words + len * 8` lies inside the readable and writable part of the
        // mapping, which `self` owns and keeps until it is dropped; it is 8-byte aligned (the
        // guard page is page aligned and `len * 8` a multiple of 8) and was zeroed by mmap, and
        // every bit pattern is a valid u64. The borrow of `self` bounds the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.words as *const u64, self.len) }
    }
}

impl DerefMut for GuardedWords {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference to the words.
        unsafe { std::slice::from_raw_parts_mut(self.words as *mut u64, self.len) }
    }
}

impl Drop for GuardedWords {
    fn drop(&mut self) {
        // SAFETY: `map..map + map_len` is the mapping `new` made, unmapped once, here; the slices
        // handed out borrowed `self`, so none outlives it.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_words_end_right_before_the_guard_page() {
        for len in [0usize, 1, 2, 511, 512, 513, 4096] {
            let mut g = GuardedWords::new(len).unwrap();
            assert_eq!(g.len(), len);
            assert!(g.iter().all(|&w| w == 0));
            g.iter_mut().enumerate().for_each(|(i, w)| *w = i as u64);
            let end = g.as_ptr() as usize + len * 8;
            assert_eq!(
                end % page_size(),
                0,
                "len {len}: the words end on the guard page"
            );
            assert_eq!(g.tail_mut(2).len(), len.min(2));
            if len > 0 {
                assert_eq!(g.tail_mut(1)[0], len as u64 - 1);
            }
        }
    }

    #[test]
    fn a_kernel_write_past_the_words_fails_with_efault() {
        // read(2) into the words: a copy to user memory, like KVM_GET_DIRTY_LOG's.
        let mut g = GuardedWords::new(1).unwrap();
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&zero);
        let ptr = g.as_mut_ptr().cast::<libc::c_void>();
        // SAFETY: the kernel writes at most 8 bytes into the word and faults on the guard page
        // for the rest (which is what this test checks); nothing else references the words.
        let n = unsafe { libc::read(fd, ptr, 64) };
        let errno = io::Error::last_os_error().raw_os_error();
        // A partial copy (the word) or EFAULT, never a write past the guard.
        assert!(
            n == 8 || (n == -1 && errno == Some(libc::EFAULT)),
            "{n} {errno:?}"
        );
    }
}
