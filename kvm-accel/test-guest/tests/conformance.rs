// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The memory-api conformance kit (`clearlog_memory::testing::check_memory_listener`) run against
//! `KvmMemoryListener` on real KVM, in manual, manual + INITIALLY_SET and legacy modes.
//!
//! The kit's `GuestWriter` must dirty a page *as the guest would*: here a vCPU runs "poke", a tiny
//! ring-3 program that spins on a mailbox word in guest RAM; the host writes a guest-physical
//! address there, the vCPU stores a byte at that address (a store KVM's dirty log sees) and clears
//! the mailbox, and the host waits for that. The kit registers the listener itself and adds its
//! region at 4 GiB, so the guest's low RAM is in the memory system beforehand, the identity map is
//! extended past 4 GiB, and the vCPU starts at the first `dirty()` (once the listener has made
//! the low memslot).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clearlog_kvm::{KvmDirtyLogMode, KvmMemoryListener, Vm, VmConfig};
use clearlog_memory::testing::{check_memory_listener, ConformanceConfig};
use clearlog_memory::{MemoryListener, MemorySystem, Section, PAGE_SIZE};
use clearlog_test_guest::guest_ram::{GuestRam, RawGuestRam};
use clearlog_test_guest::layout::CODE_ADDR;
use clearlog_test_guest::vcpu::runner::VcpuRunner;
use clearlog_test_guest::vcpu::Vcpu;
use clearlog_test_guest::workload::{Workload, WorkloadSpec};
use common::*;

/// The mailbox: a word of the parameter page, after the parameter block.
const MAILBOX: u64 = 0x4800;
const LOW: u64 = 2 << 20;

/// "poke": `loop { a = [MAILBOX]; if a != 0 { byte [a] = 1; [MAILBOX] = 0 } }`.
fn poke_image() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.pause().unwrap();
    a.mov(rax, qword_ptr(MAILBOX)).unwrap();
    a.test(rax, rax).unwrap();
    a.jz(top).unwrap();
    a.mov(byte_ptr(rax), 1).unwrap();
    a.mov(qword_ptr(MAILBOX), 0).unwrap();
    a.jmp(top).unwrap();
    a.assemble(CODE_ADDR).unwrap()
}

fn conformance(choice: Option<KvmDirtyLogMode>) {
    let vm = Arc::new(
        Vm::new(VmConfig {
            dirty_log: choice,
            ..Default::default()
        })
        .expect("Vm::new"),
    );
    let mem = MemorySystem::with_ram_capacity(64 << 20);
    let low = mem.add_ram("low", 0, LOW).expect("low RAM");
    let block = mem.region_block(low).unwrap().0;
    // SAFETY: `block` (kept alive below, past every use of `ram`) owns the mapping
    // `host_addr..host_addr + size`, page aligned, readable and writable; nothing forms a Rust
    // reference into it (the memory system's accesses are raw-pointer copies).
    let ram = unsafe { RawGuestRam::new(block.host_addr() as *mut u8, block.size()) };
    let vcpu = Vcpu::new(&vm, 0).expect("Vcpu::new");
    let w = Workload::new(WorkloadSpec::Image {
        image: poke_image(),
        load_gpa: CODE_ADDR,
        entry_gpa: CODE_ADDR,
    });
    w.load(&ram, vcpu.tsc_khz().unwrap()).expect("load poke");
    // The kit's region lies at 4 GiB: identity-map the first 5 GiB (and the doorbell's GiB).
    let config = ConformanceConfig::default();
    let map_end = (config.guest_addr + config.pages * PAGE_SIZE).next_multiple_of(1 << 30);
    clearlog_test_guest::long_mode::write_tables(&ram, map_end).expect("page tables");
    vcpu.setup_ring3(&w.entry(0).unwrap()).unwrap();

    let listener = Arc::new(KvmMemoryListener::new(vm));
    let idle = Mutex::new(Some(vcpu));
    let running: Mutex<Option<VcpuRunner>> = Mutex::new(None);
    let pokes = std::sync::atomic::AtomicU64::new(0);
    let writer = |s: &Section, page: u64| {
        // Started lazily: the kit registers the listener, which makes the low memslot.
        if let Some(v) = idle.lock().unwrap().take() {
            *running.lock().unwrap() = Some(VcpuRunner::spawn(v).expect("spawn poke"));
        }
        let gpa = s.guest_addr + page * PAGE_SIZE;
        ram.store_u64(MAILBOX, gpa).unwrap();
        let start = Instant::now();
        while ram.load_u64(MAILBOX).unwrap() != 0 {
            if let Some(r) = &*running.lock().unwrap() {
                assert!(
                    !matches!(
                        r.state(),
                        clearlog_test_guest::vcpu::runner::RunState::Failed(_)
                    ),
                    "{choice:?}: poke vCPU failed: {:?}",
                    r.state()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{choice:?}: the vCPU did not poke {gpa:#x}"
            );
            std::thread::yield_now();
        }
        pokes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    check_memory_listener(&mem, listener.clone() as Arc<dyn MemoryListener>, &writer);
    // The kit unregistered the listener (the low memslot is gone): stop the vCPU in any state.
    if let Some(r) = running.lock().unwrap().take() {
        r.stop().expect("stop poke");
    }
    let pokes = pokes.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "conformance {choice:?}: {pokes} guest writes, {:?}",
        listener.stats()
    );
    assert!(pokes > 10, "the kit made only {pokes} guest writes");
    // `ram` is not used past here; only now may the block go.
    drop(block);
}

#[test]
fn kvm_listener_passes_the_conformance_kit() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    conformance(Some(KvmDirtyLogMode::Legacy));
    if !manual_available() {
        return;
    }
    conformance(Some(KvmDirtyLogMode::Manual {
        initially_set: false,
    }));
    conformance(Some(KvmDirtyLogMode::Manual {
        initially_set: true,
    }));
}
