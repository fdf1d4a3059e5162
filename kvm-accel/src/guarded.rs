// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Private mappings of this process that the kernel is pointed at: the inaccessible page of the
//! memslot-id probe ([`ProbePage`]).

use std::io;

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
