// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The checked dirty-log ioctls of a [`Vm`](crate::Vm): `KVM_GET_DIRTY_LOG` only into buffers
//! that end right before a guard page, `KVM_CLEAR_DIRTY_LOG` only for ranges the kernel accepts.

use crate::error::{Error, Result};
use crate::mode::KvmDirtyLogMode;
use crate::raw::{self, KvmFd};
use crate::slots::SlotEntry;

/// `KVM_GET_DIRTY_LOG` of `slot` into `words`, which end right before a guard page: a memslot
/// made larger behind the table's back gives [`Error::SlotChangedBehindVm`], never a write past
/// `words`.
pub(crate) fn get_guarded(vm: KvmFd<'_>, slot: u32, words: &mut [u64]) -> Result<()> {
    // SAFETY: `vm` is a KVM VM fd. The kernel writes as many words as the memslot it knows has;
    // `words` are the last words of a `GuardedWords`, so they end right before its PROT_NONE
    // guard page. If the memslot has at most `words.len()` words (what the table says) the copy
    // stays inside `words`; if it was made larger behind the table's back (through another fd),
    // the kernel's ascending copy faults on the guard page and the ioctl fails with EFAULT: no
    // byte past `words` is ever written.
    unsafe { raw::get_dirty_log(vm.fd(), slot, words) }.map_err(|source| {
        if source.errno() == libc::EFAULT {
            Error::SlotChangedBehindVm { slot, source }
        } else {
            Error::Kvm {
                op: "KVM_GET_DIRTY_LOG",
                source,
            }
        }
    })
}

/// Checks a `KVM_CLEAR_DIRTY_LOG` of pages `[first_page, first_page + num_pages)` of the slot
/// `e` against the kernel's rules (docs/design.md section 1): [`Error::InvalidRange`] says
/// which one a range breaks.
pub(crate) fn check_clear(e: &SlotEntry, slot: u32, first_page: u64, num_pages: u32) -> Result<()> {
    if !e.slot.log_dirty {
        return Err(Error::SlotNotLogging(slot));
    }
    let end = first_page.saturating_add(u64::from(num_pages));
    let slot_pages = e.slot.pages();
    let bad = |reason| {
        Err(Error::InvalidRange {
            slot,
            first_page,
            end,
            slot_pages,
            reason,
        })
    };
    if num_pages == 0 {
        return bad("empty range");
    }
    if first_page % 64 != 0 {
        return bad("first_page is not a multiple of 64");
    }
    if end > slot_pages {
        return bad("range extends past the slot end");
    }
    if num_pages % 64 != 0 && end != slot_pages {
        return bad("num_pages is not a multiple of 64 and the range does not end at the slot end");
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG` for a range already known valid (checked by [`check_clear`], or built
/// by a cache for its own logging slot: 64-page aligned, inside the slot). Only the mode is
/// checked: manual protection ([`Error::NotManualMode`] otherwise; the kernel itself would
/// accept it).
pub(crate) fn clear_checked(
    vm: KvmFd<'_>,
    mode: KvmDirtyLogMode,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<()> {
    if !mode.is_manual() {
        return Err(Error::NotManualMode);
    }
    debug_assert_eq!(first_page % 64, 0);
    raw::clear_dirty_log_on(vm, slot, first_page, num_pages, bitmap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::{MemSlot, SlotOwner};

    #[test]
    fn clear_ranges_follow_the_kernels_rules() {
        let e = SlotEntry {
            slot: MemSlot {
                guest_phys: 0,
                size: 100 * 4096,
                host_addr: 0,
                log_dirty: true,
            },
            owner: SlotOwner::Caller,
        };
        check_clear(&e, 1, 0, 64).unwrap();
        check_clear(&e, 1, 64, 36).unwrap(); // the tail, up to the slot end
        for (first, n, why) in [
            (0, 0, "empty"),
            (1, 64, "multiple of 64"),
            (64, 64, "past the slot end"),
            (0, 32, "does not end at the slot end"),
        ] {
            let err = check_clear(&e, 1, first, n).unwrap_err().to_string();
            assert!(err.contains(why), "{first}+{n}: {err}");
        }
        let off = SlotEntry {
            slot: MemSlot {
                log_dirty: false,
                ..e.slot
            },
            ..e
        };
        assert!(matches!(
            check_clear(&off, 1, 0, 64),
            Err(Error::SlotNotLogging(1))
        ));
    }
}
