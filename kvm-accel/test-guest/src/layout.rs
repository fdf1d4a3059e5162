// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest physical memory layout used by the built-in workloads.
//!
//! Everything the workloads need besides their working set lives below 1 MiB:
//!
//! | GPA range            | Content                                                      |
//! |----------------------|--------------------------------------------------------------|
//! | `0x0000..0x1000`     | unused (null page)                                           |
//! | `0x1000..0x1038`     | GDT: null, ring-0 code/data (unused), ring-3 data, ring-3 code, TSS |
//! | `0x1800..0x1868`     | 64-bit TSS (required by `KVM_SET_SREGS`; never used)         |
//! | `0x2000..0x3000`     | PML4                                                         |
//! | `0x3000..0x4000`     | PDPT (512 entries of 1 GiB)                                  |
//! | `0x4000..0x4500`     | parameter block and parts table ([`crate::workload::params`]) |
//! | `0x5000..0x6000`     | counter block: one 64-byte slot per vCPU                     |
//! | `0x8000..0x10000`    | workload code                                                |
//! | `0x10000..0x90000`   | page directories (2 MiB pages), one per mapped GiB           |
//! | `0x90000..0xa0000`   | stacks, 1 KiB per vCPU, growing down from `0xa0000`          |
//! | `0x100000..`         | working set (default start)                                  |
//!
//! All page-table levels have the user bit set and the mapping is the identity, so the
//! ring-3 guest sees guest-physical addresses directly.
//!
//! The identity map covers the first [`IDENTITY_MAP_LIMIT`] (127 GiB) of RAM at most
//! ([`mapped_end`]): guest RAM may be larger (up to [`MAX_RAM`], 1 TiB), but the guest can only
//! touch what is mapped, so working sets and images must lie below [`mapped_end`] (checked by
//! [`crate::workload::Workload::validate`], i.e. at `Guest::boot`). RAM above it is still RAM
//! to the host (memslot, dirty log, migration); the built-in workloads never touch it.
//!
//! Besides RAM, the last 2 MiB page of the 128th GiB of virtual addresses is mapped: the
//! doorbell's page. The guest writes to the virtual address [`DOORBELL_ADDR`]; it is mapped to
//! the guest-physical [`doorbell_gpa`], which lies outside RAM: `DOORBELL_ADDR` itself for
//! guests up to 127 GiB (identity, as before), the last page of the first GiB above RAM for
//! larger ones. It is never backed by a memslot, so a guest write there exits to the host as
//! `KVM_EXIT_MMIO` (the workloads' signal to the host: port I/O from ring 3 faults on PVM, see
//! [`crate::long_mode`]); [`is_doorbell`] recognises the exit's address.

/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest physical address of the TSS.
pub const TSS_ADDR: u64 = 0x1800;
/// Size of a 64-bit TSS minus one (its segment limit).
pub const TSS_LIMIT: u32 = 0x67;
/// Guest physical address of the PML4.
pub const PML4_ADDR: u64 = 0x2000;
/// Guest physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0x3000;
/// Guest physical address of the parameter block.
pub const PARAMS_ADDR: u64 = 0x4000;
/// Guest physical address of the counter block.
pub const COUNTERS_ADDR: u64 = 0x5000;
/// Size of one vCPU's counter slot.
pub const COUNTER_SLOT_SIZE: u64 = 64;
/// Most vCPUs the layout has counter slots and stacks for.
pub const MAX_VCPUS: u32 = 64;
/// Guest physical address of the workload code.
pub const CODE_ADDR: u64 = 0x8000;
/// One past the end of the code area.
pub const CODE_END: u64 = 0x10000;
/// Guest physical address of the first page directory.
pub const PD_ADDR: u64 = 0x10000;
/// Number of page directories (each maps 1 GiB with 2 MiB pages).
pub const PD_COUNT: u64 = 128;
/// End of the identity map: the guest can touch RAM below this (127 GiB; the 128th GiB of
/// virtual addresses holds the doorbell).
pub const IDENTITY_MAP_LIMIT: u64 = (PD_COUNT - 1) << 30;
/// Largest guest RAM (1 TiB). RAM above [`IDENTITY_MAP_LIMIT`] is not mapped in the guest.
pub const MAX_RAM: u64 = 1 << 40;
/// Virtual address of the MMIO doorbell (what guest programs write to): the last page of the
/// 128th GiB. A 4-byte write there exits to the host with the written value, at the
/// guest-physical [`doorbell_gpa`] (equal to this address for guests up to 127 GiB).
pub const DOORBELL_ADDR: u64 = (PD_COUNT << 30) - 0x1000;
/// Top of vCPU 0's stack; vCPU `i`'s stack top is `STACK_TOP - i * STACK_SIZE`.
pub const STACK_TOP: u64 = 0xa0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x400;
/// End of the infrastructure area; default start of the working set.
pub const INFRA_END: u64 = 0x10_0000;
/// Default guest physical start of the working set.
pub const DEFAULT_WSS_START: u64 = INFRA_END;

/// GDT selector of the ring-3 data segment (with RPL 3).
pub const USER_DS: u16 = 0x18 | 3;
/// GDT selector of the ring-3 64-bit code segment (with RPL 3).
pub const USER_CS: u16 = 0x20 | 3;
/// GDT selector of the TSS.
pub const TSS_SEL: u16 = 0x28;

/// End of the RAM the guest can touch for a RAM ending at `ram_end`: the identity map covers
/// `[0, mapped_end(ram_end))`.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::layout::{mapped_end, IDENTITY_MAP_LIMIT};
/// assert_eq!(mapped_end(4 << 30), 4 << 30);
/// assert_eq!(mapped_end(256 << 30), IDENTITY_MAP_LIMIT);
/// ```
pub fn mapped_end(ram_end: u64) -> u64 {
    ram_end.min(IDENTITY_MAP_LIMIT)
}

/// Guest-physical address of the doorbell of a guest whose RAM ends at `ram_end`: never RAM.
/// [`DOORBELL_ADDR`] for RAM up to [`IDENTITY_MAP_LIMIT`], else the last page of the first GiB
/// above RAM (same offset in its 2 MiB page as [`DOORBELL_ADDR`], so one large page maps it).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::layout::{doorbell_gpa, DOORBELL_ADDR};
/// assert_eq!(doorbell_gpa(4 << 30), DOORBELL_ADDR);
/// assert_eq!(doorbell_gpa(256 << 30), (257 << 30) - 0x1000);
/// ```
pub fn doorbell_gpa(ram_end: u64) -> u64 {
    if ram_end <= IDENTITY_MAP_LIMIT {
        DOORBELL_ADDR
    } else {
        ram_end.next_multiple_of(1 << 30) + (1 << 30) - 0x1000
    }
}

/// Whether an MMIO exit at guest-physical `gpa` is a doorbell ring: `gpa` is the
/// [`doorbell_gpa`] of some RAM size (the last page of a GiB, from [`DOORBELL_ADDR`] up; such an
/// address is never RAM of the guest that rings it).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::layout::{doorbell_gpa, is_doorbell};
/// assert!(is_doorbell(doorbell_gpa(2 << 20)));
/// assert!(is_doorbell(doorbell_gpa(512 << 30)));
/// assert!(!is_doorbell((3 << 30) - 0x1000));
/// ```
pub fn is_doorbell(gpa: u64) -> bool {
    gpa >= DOORBELL_ADDR && gpa % (1 << 30) == (1 << 30) - 0x1000
}

/// Guest physical address of vCPU `index`'s counter slot.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::layout::{counter_slot_addr, COUNTERS_ADDR};
/// assert_eq!(counter_slot_addr(1), COUNTERS_ADDR + 64);
/// ```
pub fn counter_slot_addr(index: u32) -> u64 {
    COUNTERS_ADDR + u64::from(index) * COUNTER_SLOT_SIZE
}

/// Top of vCPU `index`'s stack.
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_test_guest::layout::stack_top(0), 0xa0000);
/// ```
pub fn stack_top(index: u32) -> u64 {
    STACK_TOP - u64::from(index) * STACK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_do_not_overlap() {
        let areas = [
            (GDT_ADDR, GDT_ADDR + 7 * 8),
            (TSS_ADDR, TSS_ADDR + u64::from(TSS_LIMIT) + 1),
            (PML4_ADDR, PML4_ADDR + 0x1000),
            (PDPT_ADDR, PDPT_ADDR + 0x1000),
            (PARAMS_ADDR, PARAMS_ADDR + 0x1000),
            (
                COUNTERS_ADDR,
                COUNTERS_ADDR + u64::from(MAX_VCPUS) * COUNTER_SLOT_SIZE,
            ),
            (CODE_ADDR, CODE_END),
            (PD_ADDR, PD_ADDR + PD_COUNT * 0x1000),
            (stack_top(MAX_VCPUS - 1) - STACK_SIZE, STACK_TOP),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 < a.1 && a.1 <= INFRA_END, "{a:x?}");
            for b in &areas[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        assert!(COUNTER_SLOT_SIZE * u64::from(MAX_VCPUS) <= 0x1000);
    }

    #[test]
    fn doorbell_is_outside_ram() {
        let gib = 1u64 << 30;
        for ram_end in [
            2 << 20,
            4 * gib,
            IDENTITY_MAP_LIMIT - (2 << 20),
            IDENTITY_MAP_LIMIT,
            IDENTITY_MAP_LIMIT + (2 << 20),
            128 * gib,
            256 * gib,
            MAX_RAM,
        ] {
            let db = doorbell_gpa(ram_end);
            assert!(db >= ram_end, "{ram_end:#x}: {db:#x}");
            assert!(is_doorbell(db));
            // One 2 MiB page maps the doorbell's virtual page to it.
            assert_eq!(db & 0x1f_ffff, DOORBELL_ADDR & 0x1f_ffff);
            assert!(mapped_end(ram_end) <= IDENTITY_MAP_LIMIT);
        }
        assert!(!is_doorbell(DOORBELL_ADDR - (1 << 30)));
        assert!(!is_doorbell(DOORBELL_ADDR + 0x1000));
    }
}
