// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A 64-bit long-mode, ring-3 execution environment set up entirely by the host.
//!
//! The vCPU starts at its first instruction in ring 3 of 64-bit mode: no guest ring-0 code
//! runs at all (on PVM, guest ring-0 code is emulated and slow, ring-3 code runs natively).
//! [`write_tables`] writes identity page tables (2 MiB pages, user bit on every level) and a
//! GDT with ring-3 segments into guest RAM (see [`crate::layout`]); [`ring3_sregs`] and
//! [`ring3_regs`] give the register state to load with `KVM_SET_SREGS`/`KVM_SET_REGS`.
//!
//! There is no IDT: any exception shuts the vCPU down (a `KVM_EXIT_SHUTDOWN`).
//!
//! RFLAGS is loaded with IOPL = 3, which on hardware virtualization lets ring 3 use
//! `in`/`out` (exiting as `KVM_EXIT_IO`). On PVM (this project's test machine) the guest's
//! ring 3 runs with the host's real flags (IOPL 0, IF 1, as `pushf` shows) and `in`/`out`
//! raise #GP, i.e. a shutdown here; so guests signal the host by writing to the MMIO
//! doorbell page ([`DOORBELL_ADDR`]) instead, which exits as `KVM_EXIT_MMIO`.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::error::{Error, Result};
use crate::guest_ram::GuestRam;
use crate::layout::*;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_LARGE: u64 = 1 << 7;

/// CR0: PE | MP | ET | NE | WP | PG.
pub const CR0: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: PAE | OSFXSR | OSXMMEXCPT (SSE usable).
pub const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: LME | LMA.
pub const EFER: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: reserved bit 1 and IOPL = 3; interrupts off.
pub const RFLAGS: u64 = 0x2 | (3 << 12);

/// Encodes a GDT code/data descriptor with base 0 and limit 4 GiB.
fn seg_desc(access: u64, flags: u64) -> u64 {
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The GDT entries (8 bytes each; the TSS takes two).
pub fn gdt() -> [u64; 7] {
    let tss_lo = u64::from(TSS_LIMIT)
        | ((TSS_ADDR & 0xff_ffff) << 16)
        | (0x89 << 40) // present, type 9 (available 64-bit TSS)
        | (((TSS_ADDR >> 24) & 0xff) << 56);
    let tss_hi = TSS_ADDR >> 32;
    [
        0,
        seg_desc(0x9b, 0xa), // 0x08: ring-0 code, L=1 (unused)
        seg_desc(0x93, 0xc), // 0x10: ring-0 data (unused)
        seg_desc(0xf3, 0xc), // 0x18: ring-3 data, accessed
        seg_desc(0xfb, 0xa), // 0x20: ring-3 64-bit code, accessed
        tss_lo,              // 0x28: TSS
        tss_hi,
    ]
}

/// Writes the GDT, TSS and identity page tables covering `[0, mapped_end(ram_end))` (at most
/// [`IDENTITY_MAP_LIMIT`], 127 GiB; see [`crate::layout`]) into guest RAM, plus the doorbell's
/// page: virtual [`DOORBELL_ADDR`] to guest-physical [`doorbell_gpa`]`(ram_end)`.
///
/// Fails if `ram_end` is beyond [`MAX_RAM`] or the infrastructure area is not backed.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::long_mode::write_tables;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
/// write_tables(&mem, 4 << 20).unwrap();
/// ```
pub fn write_tables(ram: &(impl GuestRam + ?Sized), ram_end: u64) -> Result<()> {
    if ram_end > MAX_RAM {
        return Err(Error::Layout(format!(
            "guest RAM end {ram_end:#x} beyond the identity map limit {MAX_RAM:#x}"
        )));
    }
    if ram.ram_end() < INFRA_END {
        return Err(Error::Layout(format!(
            "guest RAM must cover at least [0, {INFRA_END:#x})"
        )));
    }
    let mut gdt_bytes = Vec::with_capacity(7 * 8);
    for d in gdt() {
        gdt_bytes.extend_from_slice(&d.to_le_bytes());
    }
    ram.write_at(GDT_ADDR, &gdt_bytes)?;
    // TSS: all zero, I/O map base past the limit (no I/O bitmap; IOPL=3 anyway).
    let mut tss = [0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&((TSS_LIMIT + 1) as u16).to_le_bytes());
    ram.write_at(TSS_ADDR, &tss)?;

    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | flags).to_le_bytes());
    ram.write_at(PML4_ADDR, &pml4)?;

    let gibs = mapped_end(ram_end).div_ceil(1 << 30).max(1);
    let doorbell_gib = DOORBELL_ADDR >> 30;
    debug_assert!(gibs <= doorbell_gib);
    let mut pdpt = vec![0u8; 4096];
    // RAM (identity), then the doorbell's GiB: identity too for guests up to 127 GiB, else its
    // page (the last 2 MiB) goes to the doorbell's guest-physical address above RAM.
    for g in (0..gibs).chain(std::iter::once(doorbell_gib)) {
        let pd = PD_ADDR + g * 4096;
        let o = (g * 8) as usize;
        pdpt[o..o + 8].copy_from_slice(&(pd | flags).to_le_bytes());
        let mut pd_bytes = vec![0u8; 4096];
        let entries = if g == doorbell_gib && doorbell_gpa(ram_end) != DOORBELL_ADDR {
            511..512u64
        } else {
            0..512u64
        };
        for e in entries {
            let addr = if g == doorbell_gib {
                (doorbell_gpa(ram_end) & !((1 << 30) - 1)) | (e << 21)
            } else {
                (g << 30) | (e << 21)
            };
            let o = (e * 8) as usize;
            pd_bytes[o..o + 8].copy_from_slice(&(addr | flags | PTE_LARGE).to_le_bytes());
        }
        ram.write_at(pd, &pd_bytes)?;
    }
    ram.write_at(PDPT_ADDR, &pdpt)?;
    Ok(())
}

fn user_seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for ring-3 long mode, starting from the vCPU's current `sregs`
/// (to keep fields such as the APIC base).
///
/// # Example
///
/// ```
/// use clearlog_test_guest::layout::USER_CS;
/// let s = clearlog_test_guest::long_mode::ring3_sregs(Default::default());
/// assert_eq!(s.cs.selector, USER_CS);
/// assert_eq!(s.cs.dpl, 3);
/// ```
pub fn ring3_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cr0 = CR0;
    s.cr4 = CR4;
    s.cr3 = PML4_ADDR;
    s.efer = EFER;
    s.cs = user_seg(USER_CS, true);
    let ds = user_seg(USER_DS, false);
    s.ds = ds;
    s.es = ds;
    s.ss = ds;
    s.fs = ds;
    s.gs = ds;
    s.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (7 * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s
}

/// Where and how a ring-3 program starts.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::long_mode::{ring3_regs, EntryPoint};
/// let r = ring3_regs(&EntryPoint { rip: 0x8000, rsp: 0xa0000, rdi: 0x4000, rsi: 0x5000 });
/// assert_eq!(r.rip, 0x8000);
/// assert_eq!(r.rflags & 0x3000, 0x3000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// First argument register (the workloads' parameter block).
    pub rdi: u64,
    /// Second argument register (the workloads' counter slot).
    pub rsi: u64,
}

/// General-purpose registers for [`EntryPoint`]; RFLAGS = [`RFLAGS`].
pub fn ring3_regs(e: &EntryPoint) -> kvm_regs {
    kvm_regs {
        rip: e.rip,
        rsp: e.rsp,
        rdi: e.rdi,
        rsi: e.rsi,
        rflags: RFLAGS,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn descriptors() {
        let g = gdt();
        assert_eq!(g[3], 0x00cf_f300_0000_ffff);
        assert_eq!(g[4], 0x00af_fb00_0000_ffff);
        assert_eq!(u64::from(USER_DS & !3) / 8, 3);
        assert_eq!(u64::from(USER_CS & !3) / 8, 4);
        assert_eq!(u64::from(TSS_SEL) / 8, 5);
        assert_eq!(g[5] & 0xffff, u64::from(TSS_LIMIT));
        assert_eq!((g[5] >> 16) & 0xff_ffff, TSS_ADDR);
    }

    #[test]
    fn page_tables_identity_user() {
        let size = 3u64 << 29; // 1.5 GiB (sparse mmap, untouched pages cost nothing)
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write_tables(&mem, size).unwrap();
        // Walk a few addresses.
        for va in [0u64, 0x10_0000, 0x4020_1234, size - 1] {
            let pml4e = mem.load_u64(PML4_ADDR + ((va >> 39) & 511) * 8).unwrap();
            assert_eq!(pml4e & 7, 7);
            let pdpte = mem
                .load_u64((pml4e & !0xfff) + ((va >> 30) & 511) * 8)
                .unwrap();
            assert_eq!(pdpte & 7, 7);
            let pde = mem
                .load_u64((pdpte & !0xfff) + ((va >> 21) & 511) * 8)
                .unwrap();
            assert_eq!(pde & 0x87, 0x87);
            assert_eq!((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff), va);
        }
        // Second GiB is mapped, a third is not; the doorbell's GiB is.
        assert_ne!(mem.load_u64(PDPT_ADDR + 8).unwrap(), 0);
        assert_eq!(mem.load_u64(PDPT_ADDR + 16).unwrap(), 0);
        let db = mem.load_u64(PDPT_ADDR + (DOORBELL_ADDR >> 30) * 8).unwrap();
        let pde = mem
            .load_u64((db & !0xfff) + ((DOORBELL_ADDR >> 21) & 511) * 8)
            .unwrap();
        assert_eq!(pde & !0x1f_ffff, DOORBELL_ADDR & !0x1f_ffff);
    }

    /// The guest-physical address virtual `va` maps to, if mapped.
    fn translate(mem: &GuestMemoryMmap<()>, va: u64) -> Option<u64> {
        let pml4e = mem.load_u64(PML4_ADDR + ((va >> 39) & 511) * 8).unwrap();
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = mem
            .load_u64((pml4e & !0xfff) + ((va >> 30) & 511) * 8)
            .unwrap();
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = mem
            .load_u64((pdpte & !0xfff) + ((va >> 21) & 511) * 8)
            .unwrap();
        (pde & 1 != 0).then_some((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff))
    }

    #[test]
    fn huge_guest_maps_low_ram_and_the_doorbell_above_ram() {
        // Only the infrastructure area is backed; the tables describe a 256 GiB guest.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let ram_end = 256u64 << 30;
        write_tables(&mem, ram_end).unwrap();
        assert_eq!(translate(&mem, 0x10_0000), Some(0x10_0000));
        let top = IDENTITY_MAP_LIMIT - 8;
        assert_eq!(translate(&mem, top), Some(top));
        // The doorbell's virtual page goes above RAM; the rest of its GiB is unmapped.
        let db = translate(&mem, DOORBELL_ADDR).unwrap();
        assert_eq!(db, doorbell_gpa(ram_end));
        assert!(db >= ram_end && is_doorbell(db));
        assert_eq!(translate(&mem, IDENTITY_MAP_LIMIT), None);
        assert_eq!(translate(&mem, 200 << 30), None);
        // Small guests keep the identity doorbell.
        write_tables(&mem, 4 << 30).unwrap();
        assert_eq!(translate(&mem, DOORBELL_ADDR), Some(DOORBELL_ADDR));
    }

    #[test]
    fn too_much_ram_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert!(write_tables(&mem, MAX_RAM + 1).is_err());
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8000)]).unwrap();
        assert!(write_tables(&small, 0x8000).is_err());
    }
}
