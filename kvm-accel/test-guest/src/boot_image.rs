// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A bootable image of the `random` workload for other VMMs (QEMU's `-kernel`).
//!
//! Our own VMM starts vCPUs directly in ring 3 with `KVM_SET_SREGS`; a VMM that boots firmware
//! (QEMU) cannot. [`build`] makes a Multiboot (version 1) kernel, a flat binary with the "a.out
//! kludge" address fields, that QEMU loads with `-kernel FILE`. Its 32-bit ring-0 stub:
//!
//! 1. copies the infrastructure area it carries (GDT, TSS, page tables, parameter block, counter
//!    block and the workload code: exactly what [`Workload::load`] writes, see [`crate::layout`])
//!    to guest-physical `0x1000..`, where the ring-3 workload expects it;
//! 2. loads the GDT, CR4 (PAE), CR3, EFER.LME, CR0 (PG) and far-jumps to 64-bit ring 0;
//! 3. loads the TSS and `iretq`s to ring 3 at the workload's entry, with RDI = parameter block
//!    and RSI = vCPU 0's counter slot, as [`Workload::entry`] gives them.
//!
//! The ring-3 code is the same [`programs::random`](crate::workload::programs::random) our VMM
//! runs, with its parameters (working set, `ticks_per_page` from the host's TSC frequency, seed)
//! patched in. The stub writes [`BOOT_STATUS_COPIED`] then [`BOOT_STATUS_RING3`] to
//! [`BOOT_STATUS_ADDR`], so the host can tell how far the boot got (QEMU: `xp` in the monitor).
//!
//! On PVM hosts the stub is instruction-emulated (guest ring 0), which is fine for a few dozen
//! instructions and one copy; the workload runs natively in ring 3.
//!
//! RAM with a hole: a PC machine splits guest RAM at `low_ram_end` (below the 32-bit PCI hole)
//! and puts the rest at 4 GiB. The image's page tables map the guest-*virtual* range
//! `[0, mem)` contiguously (identity below `low_ram_end`, then `4 GiB + (va - low_ram_end)`), so
//! the ring-3 workload sees one working set from 1 MiB whatever the split. The harness must make
//! the machine's split equal `low_ram_end` (QEMU: `-machine max-ram-below-4g=...`).
//!
//! The image is loaded at [`LOAD_ADDR`] (1 MiB, the start of the working set, which the workload's
//! pre-fault overwrites after the stub has left it).
//!
//! # Example
//!
//! ```
//! use clearlog_test_guest::boot_image::{build, BootImageSpec, LOAD_ADDR};
//!
//! let img = build(&BootImageSpec {
//!     mem_bytes: 512 << 20,
//!     low_ram_end: 512 << 20,
//!     wss_bytes: 256 << 20,
//!     dirty_rate_bytes_per_s: 64 << 20,
//!     seed: 1,
//!     tsc_khz: 2_000_000,
//! })
//! .unwrap();
//! // Multiboot v1 magic at offset 0, loaded at 1 MiB.
//! assert_eq!(u32::from_le_bytes(img[0..4].try_into().unwrap()), 0x1bad_b002);
//! assert_eq!(u32::from_le_bytes(img[16..20].try_into().unwrap()) as u64, LOAD_ADDR);
//! ```

use std::cell::RefCell;

use iced_x86::code_asm::*;

use crate::error::{Error, Result};
use crate::guest_ram::GuestRam;
use crate::layout::*;
use crate::long_mode;
use crate::workload::{Workload, WorkloadSpec};

/// Where the image is loaded (guest-physical; 1 MiB).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Guest-physical address of the boot status word (a `u32`, in the parameter block's page).
pub const BOOT_STATUS_ADDR: u64 = PARAMS_ADDR + 0x800;
/// Boot status: the ring-0 stub ran and copied the infrastructure area.
pub const BOOT_STATUS_COPIED: u32 = 0xb007_0001;
/// Boot status: long mode is on; the next instruction is the `iretq` to ring 3.
pub const BOOT_STATUS_RING3: u32 = 0xb007_0002;

const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Header flags: bit 16, the load addresses in the header are valid (flat binary).
const MULTIBOOT_FLAGS: u32 = 1 << 16;
/// File offset of the GDT pseudo-descriptor that `lgdt` reads.
const GDTR_OFFSET: u64 = 0x20;
/// File offset of the 32-bit entry.
const ENTRY32_OFFSET: u64 = 0x40;
/// File offset of the 64-bit ring-0 code.
const ENTRY64_OFFSET: u64 = 0x400;
/// The infrastructure area carried by the image: guest-physical `[CARRY_START, CARRY_END)`,
/// stored at the same offsets of the file. It ends with the page directories (the doorbell's is
/// the last); the stacks above are zero and need no copy.
const CARRY_START: u64 = 0x1000;
const CARRY_END: u64 = PD_ADDR + PD_COUNT * 0x1000;
/// Temporary ring-0 stack for the `iretq` frame (below vCPU 0's ring-3 stack).
const RING0_STACK: u64 = STACK_TOP - 0x1000;
/// Ring-0 selectors of [`long_mode::gdt`].
const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
/// Where RAM above the PCI hole starts.
const HIGH_RAM_START: u64 = 1 << 32;

/// What the image runs.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::boot_image::BootImageSpec;
/// let s = BootImageSpec::qemu_pc(4 << 30, 3 << 30, 288 << 20, 1, 2_000_000);
/// assert_eq!(s.low_ram_end, 2 << 30);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootImageSpec {
    /// Guest RAM in bytes (what the guest sees as contiguous virtual memory from 0).
    pub mem_bytes: u64,
    /// Where the machine's RAM below 4 GiB ends; RAM beyond it is at 4 GiB. Equal to
    /// `mem_bytes` when the RAM has no hole. A multiple of 2 MiB.
    pub low_ram_end: u64,
    /// Working set of the `random` workload, from 1 MiB.
    pub wss_bytes: u64,
    /// Target dirty rate in bytes/s (0 = unpaced).
    pub dirty_rate_bytes_per_s: u64,
    /// PRNG seed.
    pub seed: u64,
    /// The guest TSC frequency in kHz (on KVM, the host's: `Vcpu::tsc_khz`).
    pub tsc_khz: u32,
}

impl BootImageSpec {
    /// The split a QEMU PC machine (pc or q35) makes when started with
    /// `-machine max-ram-below-4g=`[`QEMU_MAX_RAM_BELOW_4G`]: RAM below 2 GiB stays low, the rest
    /// goes to 4 GiB.
    pub fn qemu_pc(
        mem_bytes: u64,
        wss_bytes: u64,
        dirty_rate_bytes_per_s: u64,
        seed: u64,
        tsc_khz: u32,
    ) -> Self {
        BootImageSpec {
            mem_bytes,
            low_ram_end: mem_bytes.min(QEMU_MAX_RAM_BELOW_4G),
            wss_bytes,
            dirty_rate_bytes_per_s,
            seed,
            tsc_khz,
        }
    }

    fn workload(&self) -> Workload {
        Workload::new(WorkloadSpec::Random {
            wss_bytes: self.wss_bytes,
            dirty_rate_bytes_per_s: self.dirty_rate_bytes_per_s,
            seed: self.seed,
        })
    }
}

/// The `max-ram-below-4g` value [`BootImageSpec::qemu_pc`] assumes (2 GiB: both QEMU PC machine
/// types honour it for any RAM size, so the split does not depend on the machine type).
pub const QEMU_MAX_RAM_BELOW_4G: u64 = 2 << 30;

/// Guest RAM of the image under construction: the infrastructure area as a buffer, reporting the
/// guest's full size so that workload validation sees the real working set bounds.
struct ImageRam {
    buf: RefCell<Vec<u8>>,
    ram_end: u64,
}

impl ImageRam {
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let end = gpa.checked_add(len as u64);
        match end {
            Some(e) if e <= self.buf.borrow().len() as u64 => Ok(gpa as usize..e as usize),
            _ => Err(Error::GuestMemory { gpa, len }),
        }
    }
}

impl GuestRam for ImageRam {
    fn ram_end(&self) -> u64 {
        self.ram_end
    }

    fn write_at(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let r = self.range(gpa, data.len())?;
        self.buf.borrow_mut()[r].copy_from_slice(data);
        Ok(())
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.buf.borrow()[r]);
        Ok(())
    }

    fn load_u64(&self, gpa: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        if gpa % 8 != 0 {
            return Err(Error::GuestMemory { gpa, len: 8 });
        }
        self.read_at(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn store_u64(&self, gpa: u64, value: u64) -> Result<()> {
        if gpa % 8 != 0 {
            return Err(Error::GuestMemory { gpa, len: 8 });
        }
        self.write_at(gpa, &value.to_le_bytes())
    }
}

fn asm_err(e: iced_x86::IcedError) -> Error {
    Error::Assemble(e)
}

/// The 32-bit entry: copy the infrastructure area down, enable long mode, jump to 64-bit code.
fn entry32() -> Result<Vec<u8>> {
    (|| {
        let mut a = CodeAssembler::new(32)?;
        a.cli()?;
        a.cld()?;
        a.mov(esi, (LOAD_ADDR + CARRY_START) as u32)?;
        a.mov(edi, CARRY_START as u32)?;
        a.mov(ecx, ((CARRY_END - CARRY_START) / 4) as u32)?;
        a.rep().movsd()?;
        a.mov(dword_ptr(BOOT_STATUS_ADDR as u32), BOOT_STATUS_COPIED)?;
        a.lgdt(ptr((LOAD_ADDR + GDTR_OFFSET) as u32))?;
        a.mov(eax, long_mode::CR4 as u32)?;
        a.mov(cr4, eax)?;
        a.mov(eax, PML4_ADDR as u32)?;
        a.mov(cr3, eax)?;
        // EFER.LME (IA32_EFER is MSR 0xc000_0080); LMA follows when paging turns on.
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 1 << 8)?;
        a.wrmsr()?;
        a.mov(eax, long_mode::CR0 as u32)?;
        a.mov(cr0, eax)?;
        // jmp far KERNEL_CS:entry64 (ptr16:32), spelled out: the assembler has no far-pointer form.
        let target = (LOAD_ADDR + ENTRY64_OFFSET) as u32;
        let mut far = vec![0xea];
        far.extend_from_slice(&target.to_le_bytes());
        far.extend_from_slice(&KERNEL_CS.to_le_bytes());
        a.db(&far)?;
        a.assemble(LOAD_ADDR + ENTRY32_OFFSET)
    })()
    .map_err(asm_err)
}

/// The 64-bit ring-0 code: TSS, data segments, then `iretq` into the ring-3 workload.
fn entry64(w: &Workload) -> Result<Vec<u8>> {
    let entry = w.entry(0)?;
    (|| {
        let mut a = CodeAssembler::new(64)?;
        a.mov(ax, u32::from(TSS_SEL))?;
        a.ltr(ax)?;
        a.mov(ax, u32::from(KERNEL_DS))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(rsp, RING0_STACK)?;
        a.mov(dword_ptr(BOOT_STATUS_ADDR), BOOT_STATUS_RING3)?;
        // iretq frame: SS, RSP, RFLAGS (interrupts off: there is no IDT), CS, RIP.
        a.push(i32::from(USER_DS))?;
        a.mov(rax, entry.rsp)?;
        a.push(rax)?;
        a.push(0x2i32)?;
        a.push(i32::from(USER_CS))?;
        a.mov(rax, entry.rip)?;
        a.push(rax)?;
        a.mov(rdi, entry.rdi)?;
        a.mov(rsi, entry.rsi)?;
        a.iretq()?;
        a.assemble(LOAD_ADDR + ENTRY64_OFFSET)
    })()
    .map_err(asm_err)
}

/// Builds the image (see the [module documentation](self)).
///
/// Fails when the spec does not fit: working set beyond `mem_bytes` or beyond the guest's
/// identity map, `low_ram_end` not a multiple of 2 MiB, above 4 GiB or beyond `mem_bytes`,
/// RAM ending below the infrastructure area plus the image.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::boot_image::{build, BootImageSpec};
///
/// let mut s = BootImageSpec::qemu_pc(1 << 30, 512 << 20, 32 << 20, 7, 2_500_000);
/// assert!(build(&s).is_ok());
/// s.wss_bytes = 2 << 30; // larger than the guest
/// assert!(build(&s).is_err());
/// ```
pub fn build(spec: &BootImageSpec) -> Result<Vec<u8>> {
    let bad = |m: String| Err(Error::InvalidWorkload(m));
    let two_mib = 2u64 << 20;
    if spec.low_ram_end % two_mib != 0
        || spec.low_ram_end > HIGH_RAM_START
        || spec.low_ram_end > spec.mem_bytes
        || spec.low_ram_end < LOAD_ADDR + CARRY_END
    {
        return bad(format!(
            "low_ram_end {:#x} must be a multiple of 2 MiB, at most 4 GiB and guest RAM ({:#x}), and hold the image",
            spec.low_ram_end, spec.mem_bytes
        ));
    }
    if spec.mem_bytes % two_mib != 0 {
        return bad(format!(
            "guest RAM {:#x} must be a multiple of 2 MiB",
            spec.mem_bytes
        ));
    }
    let w = spec.workload();
    let ram = ImageRam {
        buf: RefCell::new(vec![0u8; INFRA_END as usize]),
        ram_end: spec.mem_bytes,
    };
    // Validates the working set against the guest's size and identity map, then writes exactly
    // what our VMM's guests get.
    w.load(&ram, spec.tsc_khz)?;
    // Above the split, guest-virtual addresses go to RAM at 4 GiB.
    let mut va = spec.low_ram_end;
    while va < mapped_end(spec.mem_bytes) {
        let pde_addr = PD_ADDR + (va >> 30) * 0x1000 + ((va >> 21) & 511) * 8;
        let old = ram.load_u64(pde_addr)?;
        let pa = HIGH_RAM_START + (va - spec.low_ram_end);
        ram.store_u64(pde_addr, (old & 0xfff) | pa)?;
        va += two_mib;
    }

    let e32 = entry32()?;
    let e64 = entry64(&w)?;
    debug_assert!(ENTRY32_OFFSET + e32.len() as u64 <= ENTRY64_OFFSET);
    debug_assert!(ENTRY64_OFFSET + e64.len() as u64 <= CARRY_START);
    let buf = ram.buf.into_inner();
    let mut img = vec![0u8; CARRY_END as usize];
    img[CARRY_START as usize..].copy_from_slice(&buf[CARRY_START as usize..CARRY_END as usize]);
    let load = LOAD_ADDR as u32;
    let header = [
        MULTIBOOT_MAGIC,
        MULTIBOOT_FLAGS,
        0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(MULTIBOOT_FLAGS)),
        load,                         // header_addr (the header is at offset 0)
        load,                         // load_addr
        load + CARRY_END as u32,      // load_end_addr
        0,                            // bss_end_addr: no bss
        load + ENTRY32_OFFSET as u32, // entry_addr
    ];
    for (i, v) in header.iter().enumerate() {
        img[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    let g = GDTR_OFFSET as usize;
    img[g..g + 2].copy_from_slice(&((long_mode::gdt().len() * 8 - 1) as u16).to_le_bytes());
    img[g + 2..g + 6].copy_from_slice(&(GDT_ADDR as u32).to_le_bytes());
    let o = ENTRY32_OFFSET as usize;
    img[o..o + e32.len()].copy_from_slice(&e32);
    let o = ENTRY64_OFFSET as usize;
    img[o..o + e64.len()].copy_from_slice(&e64);
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::params::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn spec() -> BootImageSpec {
        BootImageSpec::qemu_pc(4 << 30, 3 << 30, 288 << 20, 5, 2_000_000)
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: u64) -> u64 {
        u64::from_le_bytes(b[o as usize..o as usize + 8].try_into().unwrap())
    }

    #[test]
    fn multiboot_header_is_valid() {
        let img = build(&spec()).unwrap();
        let h: Vec<u32> = (0..8).map(|i| u32_at(&img, i * 4)).collect();
        assert_eq!(h[0], MULTIBOOT_MAGIC);
        assert_eq!(h[0].wrapping_add(h[1]).wrapping_add(h[2]), 0);
        assert_eq!(h[1] & (1 << 16), 1 << 16);
        assert_eq!(u64::from(h[3]), LOAD_ADDR);
        assert_eq!(u64::from(h[4]), LOAD_ADDR);
        assert_eq!(u64::from(h[5]) - LOAD_ADDR, img.len() as u64);
        assert_eq!(u64::from(h[7]), LOAD_ADDR + ENTRY32_OFFSET);
    }

    #[test]
    fn carries_the_workload_and_its_parameters() {
        let s = spec();
        let img = build(&s).unwrap();
        assert_eq!(u64_at(&img, PARAMS_ADDR + P_MAGIC), PARAMS_MAGIC);
        assert_eq!(u64_at(&img, PARAMS_ADDR + P_WSS_START), DEFAULT_WSS_START);
        assert_eq!(u64_at(&img, PARAMS_ADDR + P_WSS_PAGES), (3 << 30) / 4096);
        assert_eq!(u64_at(&img, PARAMS_ADDR + P_SEED), 5);
        assert_eq!(
            u64_at(&img, PARAMS_ADDR + P_TICKS_PER_PAGE),
            crate::workload::ticks_per_page(2_000_000, 288 << 20, 1)
        );
        let code = crate::workload::programs::random(CODE_ADDR).unwrap();
        let at = CODE_ADDR as usize;
        assert_eq!(&img[at..at + code.len()], &code[..]);
    }

    /// Walks the image's page tables like the CPU (2 MiB pages).
    fn translate(img: &[u8], va: u64) -> Option<u64> {
        let pml4e = u64_at(img, PML4_ADDR + ((va >> 39) & 511) * 8);
        let pdpte = u64_at(img, (pml4e & !0xfff) + ((va >> 30) & 511) * 8);
        if pml4e & 1 == 0 || pdpte & 1 == 0 {
            return None;
        }
        let pde = u64_at(img, (pdpte & !0xfff) + ((va >> 21) & 511) * 8);
        assert_eq!(pde & 0x87, 0x87, "user, writable, 2 MiB page at {va:#x}");
        (pde & 1 != 0).then_some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn page_tables_skip_the_pci_hole() {
        let img = build(&spec()).unwrap();
        assert_eq!(translate(&img, 0x10_0000), Some(0x10_0000));
        assert_eq!(translate(&img, (2 << 30) - 8), Some((2 << 30) - 8));
        assert_eq!(translate(&img, 2 << 30), Some(4 << 30));
        assert_eq!(translate(&img, (4 << 30) - 8), Some((6 << 30) - 8));
        assert_eq!(translate(&img, 4 << 30), None);
        // The doorbell stays outside RAM (a discarded MMIO write).
        assert_eq!(translate(&img, DOORBELL_ADDR), Some(DOORBELL_ADDR));
        // No hole: identity everywhere.
        let small = build(&BootImageSpec::qemu_pc(512 << 20, 256 << 20, 1 << 20, 1, 1)).unwrap();
        assert_eq!(translate(&small, (512 << 20) - 8), Some((512 << 20) - 8));
    }

    #[test]
    fn stubs_decode_and_end_in_ring3() {
        let img = build(&spec()).unwrap();
        let decode = |bits, off: u64, len: usize| {
            let code = &img[off as usize..off as usize + len];
            let mut d = Decoder::with_ip(bits, code, LOAD_ADDR + off, DecoderOptions::NONE);
            let mut v = Vec::new();
            while d.can_decode() {
                let i = d.decode();
                assert!(!i.is_invalid());
                v.push(i);
            }
            v
        };
        let m32 = decode(32, ENTRY32_OFFSET, entry32().unwrap().len());
        let last = m32.last().unwrap();
        assert_eq!(last.mnemonic(), Mnemonic::Jmp);
        assert_eq!(u64::from(last.far_branch32()), LOAD_ADDR + ENTRY64_OFFSET);
        assert_eq!(last.far_branch_selector(), KERNEL_CS);
        assert!(m32
            .iter()
            .any(|i| i.mnemonic() == Mnemonic::Movsd && i.has_rep_prefix()));
        assert!(m32.iter().any(|i| i.mnemonic() == Mnemonic::Wrmsr));
        let w = spec().workload();
        let m64 = decode(64, ENTRY64_OFFSET, entry64(&w).unwrap().len());
        assert_eq!(m64.last().unwrap().mnemonic(), Mnemonic::Iretq);
        assert!(m64.iter().any(|i| i.mnemonic() == Mnemonic::Ltr));
    }

    #[test]
    fn bad_specs_are_errors() {
        let mut s = spec();
        s.low_ram_end = (2 << 30) + 4096;
        build(&s).unwrap_err();
        let mut s = spec();
        s.low_ram_end = 5 << 30;
        build(&s).unwrap_err();
        let mut s = spec();
        s.wss_bytes = 5 << 30;
        build(&s).unwrap_err();
        let mut s = spec();
        s.mem_bytes = (4 << 30) + 4096;
        build(&s).unwrap_err();
    }
}
