// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The built-in guest programs, generated with iced-x86's code assembler.
//!
//! All run in 64-bit ring 3 and receive RDI = parameter block, RSI = this vCPU's counter
//! slot (see [`super::params`]). They never return and use no stack.

use iced_x86::code_asm::*;

use super::params::*;
use crate::error::{Error, Result};

fn asm_err(e: iced_x86::IcedError) -> Error {
    Error::Assemble(e)
}

/// Emits `r12 = rdtsc` (clobbers rax, rdx).
fn tsc_into(
    a: &mut CodeAssembler,
    dst: AsmRegister64,
) -> std::result::Result<(), iced_x86::IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(dst, rax)?;
    Ok(())
}

/// Emits the pacing step: when `ticks_per_page` (re-read every time) is non-zero, advance
/// the deadline in r12 by it and spin with `pause` until the TSC reaches it; when the TSC is
/// more than `max_lag_ticks` past the deadline, restart from now. Clobbers rax, rdx, r10, r14.
fn pace(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    let mut done = a.create_label();
    let mut wait = a.create_label();
    let mut late = a.create_label();
    a.mov(r10, qword_ptr(rdi + P_TICKS_PER_PAGE as i32))?;
    a.test(r10, r10)?;
    a.jz(done)?;
    a.add(r12, r10)?;
    a.set_label(&mut wait)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.cmp(rax, r12)?;
    a.jae(late)?;
    a.pause()?;
    a.jmp(wait)?;
    a.set_label(&mut late)?;
    a.mov(r14, rax)?;
    a.sub(r14, r12)?;
    a.cmp(r14, qword_ptr(rdi + P_MAX_LAG_TICKS as i32))?;
    a.jbe(done)?;
    a.mov(r12, rax)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// Loads this vCPU's part of the working set: r8 = start GPA, r9 = pages, from the parameter
/// block's `parts` table at the entry of this vCPU's index, `(rsi - COUNTERS_ADDR) / 64`.
/// Clobbers rax.
fn load_part(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    a.mov(rax, rsi)?;
    a.sub(rax, crate::layout::COUNTERS_ADDR as i32)?;
    a.shr(rax, 6)?;
    a.shl(rax, 4)?;
    a.add(rax, rdi)?;
    a.mov(r8, qword_ptr(rax + P_PARTS as i32))?;
    a.mov(r9, qword_ptr(rax + (P_PARTS + 8) as i32))?;
    Ok(())
}

/// Records the gap since the previous page write (r15 holds its TSC): a new `max_gap_ticks` if
/// larger (signed: a TSC that went backwards, as after a migration to another host, counts as
/// no gap), or a restart of the maximum when the host changed `stall_epoch`. Then r15 and
/// `last_write_tsc` = now. Clobbers rax, rcx, rdx.
fn record_gap(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    let mut reset = a.create_label();
    let mut store = a.create_label();
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rcx, qword_ptr(rdi + P_STALL_EPOCH as i32))?;
    a.cmp(rcx, qword_ptr(rsi + C_STALL_EPOCH as i32))?;
    a.jne(reset)?;
    a.mov(rcx, rax)?;
    a.sub(rcx, r15)?;
    a.cmp(rcx, qword_ptr(rsi + C_MAX_GAP_TICKS as i32))?;
    a.jle(store)?;
    a.mov(qword_ptr(rsi + C_MAX_GAP_TICKS as i32), rcx)?;
    a.jmp(store)?;
    a.set_label(&mut reset)?;
    a.mov(qword_ptr(rsi + C_STALL_EPOCH as i32), rcx)?;
    a.mov(qword_ptr(rsi + C_MAX_GAP_TICKS as i32), 0)?;
    a.set_label(&mut store)?;
    a.mov(r15, rax)?;
    a.mov(qword_ptr(rsi + C_LAST_WRITE_TSC as i32), rax)?;
    Ok(())
}

/// Marks the vCPU ready (counter slot, then one write of [`DOORBELL_READY`] to the MMIO
/// doorbell) and starts the pacing clock in r12.
fn ready(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    a.mov(qword_ptr(rsi + C_READY as i32), 1)?;
    a.mov(rax, crate::layout::DOORBELL_ADDR)?;
    a.mov(dword_ptr(rax), DOORBELL_READY)?;
    tsc_into(a, r12)
}

/// The `random` workload.
///
/// Each vCPU works on its own part of the working set (the `parts` table). Pre-faults its part
/// (writes `iteration` at offset 0 and the page's guest address at offset 16 of every page, so
/// the working set holds data, not zero pages), sets `ready`, then forever: xorshift64 picks a
/// page of the part uniformly (`page = (state * part_pages) >> 64`), writes `iteration` at
/// offset 0 and the new `pages_written` at offset 8, increments `pages_written`, records the gap
/// since its previous write (`max_gap_ticks`, `last_write_tsc`), paced by `ticks_per_page`.
/// The PRNG state starts as `(seed ^ counter_slot_address) | 1`, so vCPUs differ.
///
/// # Example
///
/// ```
/// let code = clearlog_test_guest::workload::programs::random(0x8000).unwrap();
/// assert!(!code.is_empty());
/// ```
pub fn random(ip: u64) -> Result<Vec<u8>> {
    (|| {
        let mut a = CodeAssembler::new(64)?;
        load_part(&mut a)?;
        a.mov(r11, qword_ptr(rdi + P_SEED as i32))?;
        a.xor(r11, rsi)?;
        a.or(r11, 1)?;
        // Pre-fault.
        let mut pf = a.create_label();
        let mut pf_done = a.create_label();
        a.xor(rcx, rcx)?;
        a.mov(r13, r8)?;
        a.set_label(&mut pf)?;
        a.cmp(rcx, r9)?;
        a.jae(pf_done)?;
        a.mov(rax, qword_ptr(rdi + P_ITERATION as i32))?;
        a.mov(qword_ptr(r13), rax)?;
        // Non-zero content, so the working set is data (as in the reference workload), not zero
        // pages that a migration would send as cheap markers.
        a.mov(qword_ptr(r13 + 16), r13)?;
        a.add(r13, 4096)?;
        a.inc(rcx)?;
        a.jmp(pf)?;
        a.set_label(&mut pf_done)?;
        ready(&mut a)?;
        // The first gap is measured from `ready`.
        a.mov(r15, r12)?;
        a.mov(qword_ptr(rsi + C_LAST_WRITE_TSC as i32), r12)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        pace(&mut a)?;
        // xorshift64 (13, 7, 17).
        a.mov(rax, r11)?;
        a.shl(rax, 13)?;
        a.xor(r11, rax)?;
        a.mov(rax, r11)?;
        a.shr(rax, 7)?;
        a.xor(r11, rax)?;
        a.mov(rax, r11)?;
        a.shl(rax, 17)?;
        a.xor(r11, rax)?;
        // page = (state * wss_pages) >> 64, in rdx.
        a.mov(rax, r11)?;
        a.mul(r9)?;
        a.shl(rdx, 12)?;
        a.add(rdx, r8)?;
        a.mov(rax, qword_ptr(rdi + P_ITERATION as i32))?;
        a.mov(qword_ptr(rdx), rax)?;
        a.mov(rax, qword_ptr(rsi + C_PAGES_WRITTEN as i32))?;
        a.inc(rax)?;
        a.mov(qword_ptr(rsi + C_PAGES_WRITTEN as i32), rax)?;
        a.mov(qword_ptr(rdx + 8), rax)?;
        record_gap(&mut a)?;
        // Sync point: both stores of this page are done; ring the doorbell if asked to.
        a.test(qword_ptr(rdi + P_FLAGS as i32), FLAG_DOORBELL_SYNC as i32)?;
        a.jz(top)?;
        a.mov(rax, crate::layout::DOORBELL_ADDR)?;
        a.mov(dword_ptr(rax), DOORBELL_SYNC)?;
        a.jmp(top)?;
        a.assemble(ip)
    })()
    .map_err(asm_err)
}

/// The `increment` workload (QEMU's migration-test guest).
///
/// Sets `ready`, then sweeps this vCPU's part of the working set (the `parts` table) forever
/// adding 1 to the first byte of each page, incrementing `pages_written` per page and `sweeps`
/// per sweep, paced by `ticks_per_page` (0 = unpaced). The consistency rule (walking a part's
/// pages in order, every first byte equals its predecessor except at most one place where it
/// is one less, mod 256) holds per part: one writer per part.
///
/// # Example
///
/// ```
/// let code = clearlog_test_guest::workload::programs::increment(0x8000).unwrap();
/// assert!(!code.is_empty());
/// ```
pub fn increment(ip: u64) -> Result<Vec<u8>> {
    (|| {
        let mut a = CodeAssembler::new(64)?;
        load_part(&mut a)?;
        ready(&mut a)?;
        let mut sweep = a.create_label();
        let mut page = a.create_label();
        let mut sweep_done = a.create_label();
        a.set_label(&mut sweep)?;
        a.xor(rcx, rcx)?;
        a.mov(r13, r8)?;
        a.set_label(&mut page)?;
        a.cmp(rcx, r9)?;
        a.jae(sweep_done)?;
        pace(&mut a)?;
        a.add(byte_ptr(r13), 1)?;
        a.inc(qword_ptr(rsi + C_PAGES_WRITTEN as i32))?;
        a.add(r13, 4096)?;
        a.inc(rcx)?;
        a.jmp(page)?;
        a.set_label(&mut sweep_done)?;
        a.inc(qword_ptr(rsi + C_SWEEPS as i32))?;
        a.jmp(sweep)?;
        a.assemble(ip)
    })()
    .map_err(asm_err)
}

/// The `idle` workload: sets `ready`, then spins on `rdtsc`/`pause` forever (a ring-3
/// guest cannot `hlt`).
///
/// # Example
///
/// ```
/// let code = clearlog_test_guest::workload::programs::idle(0x8000).unwrap();
/// assert!(!code.is_empty());
/// ```
pub fn idle(ip: u64) -> Result<Vec<u8>> {
    (|| {
        let mut a = CodeAssembler::new(64)?;
        ready(&mut a)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.rdtsc()?;
        a.pause()?;
        a.jmp(top)?;
        a.assemble(ip)
    })()
    .map_err(asm_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn mnemonics(code: &[u8]) -> Vec<Mnemonic> {
        let mut d = Decoder::with_ip(64, code, 0x8000, DecoderOptions::NONE);
        let mut v = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(!i.is_invalid());
            v.push(i.mnemonic());
        }
        v
    }

    #[test]
    fn programs_decode_and_signal_ready() {
        for code in [random(0x8000), increment(0x8000), idle(0x8000)] {
            let code = code.unwrap();
            assert!(code.len() < 0x8000);
            let m = mnemonics(&code);
            assert!(!m.contains(&Mnemonic::Out), "{m:?}");
            assert!(m.contains(&Mnemonic::Rdtsc), "{m:?}");
            // No privileged or faulting instructions in ring 3.
            for bad in [
                Mnemonic::Hlt,
                Mnemonic::Int,
                Mnemonic::Syscall,
                Mnemonic::Cli,
                Mnemonic::In,
            ] {
                assert!(!m.contains(&bad));
            }
        }
        assert!(mnemonics(&random(0x8000).unwrap()).contains(&Mnemonic::Pause));
    }
}
