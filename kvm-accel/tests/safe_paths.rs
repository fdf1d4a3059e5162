// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The safe API cannot be made to corrupt memory (real KVM): a memslot changed behind the `Vm`'s
//! back cannot make a GET write past its buffer, and fds that are not KVM's are refused before
//! any ioctl or mapping.

use std::io::Write;
use std::os::fd::{AsFd, FromRawFd};
use std::sync::Arc;

use clearlog_kvm::{Error, KvmCaps, KvmDirtyLogMode, KvmMemoryListener, Vm, VmConfig};
use clearlog_memory::MemorySystem;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

mod common;
use common::kvm_available;

const SIZE: u64 = 64 * 4096; // one bitmap word
const CANARY: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// Deletes memslot `slot` and re-creates it 4x larger (logging) through the VM's own fd, behind
/// the `Vm`'s back, as a VMM holding the fd can.
fn recreate_larger(vm: &Vm, slot: u32, host: u64) {
    let fd = vm.vm_fd().expect("made by Vm::new");
    let mut region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0,
        userspace_addr: host,
    };
    // SAFETY: size 0 deletes the slot.
    unsafe { fd.set_user_memory_region(region) }.unwrap();
    region.flags = KVM_MEM_LOG_DIRTY_PAGES;
    region.memory_size = 4 * SIZE;
    // SAFETY: the caller's mapping of 4 * SIZE bytes outlives the VM.
    unsafe { fd.set_user_memory_region(region) }.unwrap();
}

/// Finding 7a: `Vm::get_dirty_log` (safe) trusted its slot table for the size the kernel writes;
/// a slot deleted and re-created larger through the VM fd made the kernel write past the
/// caller's buffer.
#[test]
fn a_get_of_a_slot_changed_behind_the_vms_back_cannot_overflow() {
    if !kvm_available() {
        return;
    }
    // Declared before the Vm: dropped after it.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * SIZE as usize)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    for choice in [
        Some(KvmDirtyLogMode::Legacy),
        Some(KvmDirtyLogMode::Manual {
            initially_set: false,
        }),
    ] {
        let vm = Vm::new(VmConfig {
            dirty_log: choice,
            ..Default::default()
        })
        .unwrap();
        // SAFETY: `mem` outlives `vm`.
        unsafe { vm.set_memslot(0, 0, SIZE, host, true) }.unwrap();
        let mut words = [CANARY; 4];
        vm.get_dirty_log(0, &mut words[..1]).unwrap();
        assert_eq!(words, [0, CANARY, CANARY, CANARY]);
        recreate_larger(&vm, 0, host);
        words = [CANARY; 4];
        let got = vm.get_dirty_log(0, &mut words[..1]);
        assert_eq!(
            words[1..],
            [CANARY; 3],
            "{choice:?}: the kernel wrote past the 1-word buffer the safe GET was given"
        );
        let e = got.expect_err("a GET of a slot changed behind the Vm's back must fail");
        assert!(
            matches!(e, Error::SlotChangedBehindVm { slot: 0, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("memslot 0"), "{e}");
    }
}

/// Finding 7a, the listener's path: its sync GETs into guarded buffers too.
#[test]
fn a_listener_sync_of_a_slot_changed_behind_its_back_fails_cleanly() {
    if !kvm_available() {
        return;
    }
    let memory = MemorySystem::with_ram_capacity(4 << 20);
    memory.add_ram("ram", 0, SIZE).unwrap();
    let big = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * SIZE as usize)]).unwrap();
    let host = big.get_host_address(GuestAddress(0)).unwrap() as u64;
    for choice in [
        Some(KvmDirtyLogMode::Legacy),
        Some(KvmDirtyLogMode::Manual {
            initially_set: false,
        }),
    ] {
        let vm = Arc::new(
            Vm::new(VmConfig {
                dirty_log: choice,
                ..Default::default()
            })
            .unwrap(),
        );
        let listener = Arc::new(KvmMemoryListener::new(vm.clone()));
        let l: Arc<dyn clearlog_memory::MemoryListener> = listener.clone();
        memory.register_listener(l.clone()).unwrap();
        memory.log_global_start().unwrap();
        memory.log_sync_all().unwrap();
        let id = listener.slot_id_at(0).unwrap();
        recreate_larger(&vm, id, host);
        let e = memory.log_sync_all().unwrap_err();
        // The memory API's error names the listener; its source is the kvm error.
        let chain: Vec<String> =
            std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .map(|e| e.to_string())
                .collect();
        assert!(chain.iter().any(|m| m.contains("behind")), "{chain:?}");
        memory.log_global_stop().ok();
        memory.unregister_listener(&l).ok();
    }
}
/// A memfd of 1 MiB (zeros).
fn memfd() -> std::fs::File {
    // SAFETY: a NUL-terminated name; no memory is handed over.
    let fd = unsafe { libc::memfd_create(c"not-kvm".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    f
}

/// Finding 7b: the safe calls that issue KVM ioctls or map a ring from a caller's fd took any
/// fd on trust; a fd that is not KVM's must be refused before any ioctl or mapping.
#[test]
fn fds_that_are_not_kvms_are_refused() {
    if !kvm_available() {
        return;
    }
    let file = memfd();
    // A ring VM: registering a memfd as a vCPU would map it and store RESET flags into it.
    let caps = KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
    if let Some(range) = clearlog_kvm::RingRange::of(&caps) {
        let vm = Vm::new(VmConfig {
            dirty_log: Some(KvmDirtyLogMode::Ring {
                bytes: range.min.max(16 << 10),
            }),
            ..Default::default()
        })
        .unwrap();
        let e = vm
            .register_vcpu_ring(0, file.as_fd())
            .expect_err("a memfd is not a vCPU fd");
        assert!(e.to_string().contains("not a KVM vCPU fd"), "{e}");
        assert!(vm.ring_stats().is_empty());
        // A VM fd is not a vCPU fd either.
        let e = vm.register_vcpu_ring(0, vm.as_fd()).unwrap_err();
        assert!(e.to_string().contains("not a KVM vCPU fd"), "{e}");
    }
    let e = clearlog_kvm::raw::clear_dirty_log(file.as_fd(), 0, 0, 64, &[1]).unwrap_err();
    assert!(e.to_string().contains("not a KVM VM fd"), "{e}");
    let e = clearlog_kvm::enable_manual_protect(file.as_fd(), 1).unwrap_err();
    assert!(matches!(e, Error::NotAVmFd { .. }), "{e}");
    let e = clearlog_kvm::enable_dirty_ring(file.as_fd(), 1 << 16).unwrap_err();
    assert!(matches!(e, Error::NotAVmFd { .. }), "{e}");
    // Probing a fd that is not KVM's issues no ioctl and reports nothing offered.
    assert_eq!(KvmCaps::probe(file.as_fd()), KvmCaps::default());
    // The /dev/kvm system fd is still probed.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    assert_eq!(KvmCaps::probe(&kvm).api_version, 12);
}
