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
//! | `0x4000..0x4050`     | parameter block ([`crate::workload::params`])                |
//! | `0x5000..0x6000`     | counter block: one 64-byte slot per vCPU                     |
//! | `0x8000..0x10000`    | workload code                                                |
//! | `0x10000..0x90000`   | page directories (2 MiB pages), one per GiB of RAM           |
//! | `0x90000..0xa0000`   | stacks, 1 KiB per vCPU, growing down from `0xa0000`          |
//! | `0x100000..`         | working set (default start)                                  |
//!
//! All page-table levels have the user bit set and the mapping is the identity, so the
//! ring-3 guest sees guest-physical addresses directly. Besides RAM (up to [`MAX_RAM`]),
//! the last GiB of the identity map ([`DOORBELL_ADDR`]) is mapped too: it is never backed by
//! a memslot, so a guest write there exits to the host as `KVM_EXIT_MMIO` (the workloads'
//! signal to the host: port I/O from ring 3 faults on PVM, see [`crate::long_mode`]).

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
/// Largest guest RAM the identity map covers (127 GiB; the 128th GiB holds the doorbell).
pub const MAX_RAM: u64 = (PD_COUNT - 1) << 30;
/// Guest physical address of the MMIO doorbell: the last page of the identity map, never
/// RAM. A 4-byte write there exits to the host with the written value.
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
}
