// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! clearlog-kvm on a VM the VMM made itself with kvm-ioctls (real KVM): memslot ids next to the
//! VMM's own slot, the fd checks of `Vm::from_fd`, `enable_manual_protect`'s flag checks.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use clearlog_kvm::{
    enable_manual_protect, Error, KvmMemoryListener, ProtectMode, Vm, MANUAL_PROTECT_ENABLE,
};
use clearlog_memory::MemorySystem;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

mod common;
use common::kvm_available;

fn borrow(vm: &VmFd) -> BorrowedFd<'_> {
    // SAFETY: `vm` owns this open fd, and the borrow cannot outlive `vm`.
    unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }
}

const VMM_GPA: u64 = 1 << 30;
const VMM_SIZE: u64 = 2 << 20;
const RAM: u64 = 4 << 20;

/// The VMM's VM with manual protect and its own memslot 0, made with kvm-ioctls directly.
fn vmm_vm() -> (Kvm, VmFd, GuestMemoryMmap, ProtectMode) {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mode = enable_manual_protect(borrow(&vm), MANUAL_PROTECT_ENABLE).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), VMM_SIZE as usize)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: VMM_GPA,
        memory_size: VMM_SIZE,
        userspace_addr: host,
    };
    // SAFETY: `mem` is returned with the VM and the tests drop it last.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    (kvm, vm, mem, mode)
}

#[test]
fn default_listener_next_to_vmm_slot_0_names_the_clash() {
    if !kvm_available() {
        return;
    }
    let (_kvm, vm_fd, _vmm_mem, mode) = vmm_vm();
    let vm = Arc::new(Vm::from_fd(borrow(&vm_fd), mode).unwrap());
    let memory = MemorySystem::new();
    memory.add_ram("ram0", 0, RAM).unwrap();
    let e = memory
        .register_listener(Arc::new(KvmMemoryListener::new(vm.clone())))
        .unwrap_err();
    let inner = match &e {
        clearlog_memory::Error::Listener { source, .. } => source.downcast_ref::<Error>(),
        _ => None,
    };
    assert!(
        matches!(
            inner,
            Some(Error::MemslotRefused {
                slot: 0,
                guest_phys: 0,
                size: RAM,
                ..
            })
        ),
        "{e:?}"
    );
    let msg = inner.unwrap().to_string();
    for part in [
        "memslot 0",
        "guest 0x0",
        "size 0x400000",
        "VMM",
        "with_slot_ids",
    ] {
        assert!(msg.contains(part), "`{part}` missing from: {msg}");
    }
    // The VMM's slot is untouched and the refused one was not recorded.
    assert!(vm.memslot(0).is_none());
}

#[test]
fn listener_with_a_range_avoiding_the_vmm_slot_works() {
    if !kvm_available() {
        return;
    }
    let (_kvm, vm_fd, _vmm_mem, mode) = vmm_vm();
    let vm = Arc::new(Vm::from_fd(borrow(&vm_fd), mode).unwrap());
    let memory = MemorySystem::new();
    let ram = memory.add_ram("ram0", 0, RAM).unwrap();
    let listener = Arc::new(KvmMemoryListener::with_slot_ids(vm.clone(), 1..4).unwrap());
    memory.register_listener(listener.clone()).unwrap();
    assert_eq!(listener.slot_id_at(0), Some(1));
    assert!(vm.is_listener_slot(1));
    memory.log_global_start().unwrap();
    memory.log_sync_all().unwrap();
    memory.clear_dirty_bitmap(ram, 0, RAM).unwrap();
    memory.log_global_stop().unwrap();
    // A second region takes the next id of the range (RAM cannot be added while logging for a
    // migration).
    memory.add_ram("ram1", 64 << 20, RAM).unwrap();
    assert_eq!(listener.slot_id_at(64 << 20), Some(2));
}

#[test]
fn slot_id_ranges_are_checked() {
    if !kvm_available() {
        return;
    }
    let (_kvm, vm_fd, _vmm_mem, mode) = vmm_vm();
    let vm = Arc::new(Vm::from_fd(borrow(&vm_fd), mode).unwrap());
    let max = vm.caps().max_memslots;
    for ids in [3..3, 0..max + 1] {
        let e = KvmMemoryListener::with_slot_ids(vm.clone(), ids.clone()).unwrap_err();
        assert!(matches!(e, Error::InvalidSlotIds { .. }), "{ids:?}: {e}");
    }
    // Ids run out: a clear error naming the range.
    let memory = MemorySystem::new();
    memory.add_ram("a", 0, RAM).unwrap();
    memory.add_ram("b", 64 << 20, RAM).unwrap();
    let e = memory
        .register_listener(Arc::new(
            KvmMemoryListener::with_slot_ids(vm, 5..6).unwrap(),
        ))
        .unwrap_err();
    let msg = format!("{e:?} {e}");
    assert!(msg.contains("5..6"), "{msg}");
}

#[test]
fn from_fd_refuses_what_is_not_a_vm_fd() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().unwrap();
    // SAFETY: `kvm` owns this open fd and outlives the borrow.
    let sys = unsafe { BorrowedFd::borrow_raw(kvm.as_raw_fd()) };
    let e = Vm::from_fd(sys, ProtectMode::Legacy).unwrap_err();
    assert!(
        matches!(e, Error::NotAVmFd { .. }) && e.to_string().contains("/dev/kvm"),
        "{e}"
    );
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let e = Vm::from_fd(file.as_fd(), ProtectMode::Legacy).unwrap_err();
    assert!(matches!(e, Error::NotAVmFd { .. }), "{e}");
}

#[test]
fn from_fd_dups_the_fd_and_probes_the_vm() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm_fd = kvm.create_vm().unwrap();
    let vm = Vm::from_fd(borrow(&vm_fd), ProtectMode::Legacy).unwrap();
    assert_ne!(vm.as_fd().as_raw_fd(), vm_fd.as_raw_fd());
    assert_eq!(vm.caps().api_version, 12);
    assert!(vm.caps().max_memslots > 0);
    assert!(vm.kvm().is_none() && vm.vm_fd().is_none());
    // The VMM's fd stays usable after our Vm is gone.
    drop(vm);
    assert!(vm_fd.check_extension_raw(kvm_bindings::KVM_CAP_USER_MEMORY.into()) > 0);
}

#[test]
fn enable_manual_protect_checks_flags() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm_fd = kvm.create_vm().unwrap();
    for flags in [0, 2, 1 | 4] {
        let e = enable_manual_protect(borrow(&vm_fd), flags).unwrap_err();
        assert!(
            matches!(e, Error::InvalidProtectFlags { .. }),
            "{flags:#x}: {e}"
        );
    }
    let mode = enable_manual_protect(borrow(&vm_fd), MANUAL_PROTECT_ENABLE).unwrap();
    assert_eq!(
        mode,
        ProtectMode::Manual {
            initially_set: false
        }
    );
    // The mode it returns is what `Vm::from_fd` takes.
    let vm = Vm::from_fd(borrow(&vm_fd), mode).unwrap();
    assert!(vm.protect_mode().is_manual());
}
