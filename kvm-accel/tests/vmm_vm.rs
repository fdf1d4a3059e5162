// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! clearlog-kvm on a VM the VMM made itself with kvm-ioctls (real KVM): memslot ids next to the
//! VMM's own slot, the fd checks of `Vm::from_fd`, `enable_manual_protect`'s flag checks.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use clearlog_kvm::{
    enable_manual_protect, Error, KvmDirtyLogMode, KvmMemoryListener, Vm, MANUAL_PROTECT_ENABLE,
};
use clearlog_memory::MemorySystem;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

mod common;
use common::kvm_available;

const VMM_GPA: u64 = 1 << 30;
const VMM_SIZE: u64 = 2 << 20;
const RAM: u64 = 4 << 20;

/// The VMM's VM with manual protect and its own memslot 0, made with kvm-ioctls directly.
fn vmm_vm() -> (Kvm, VmFd, GuestMemoryMmap, KvmDirtyLogMode) {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mode = enable_manual_protect(&vm, MANUAL_PROTECT_ENABLE).unwrap();
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
    let vm = Arc::new(Vm::from_fd(&vm_fd, mode).unwrap());
    let memory = MemorySystem::new();
    memory.add_ram("ram0", 0, RAM).unwrap();
    let e = memory
        .register_listener(Arc::new(KvmMemoryListener::new(vm.clone())))
        .unwrap_err();
    let inner = match &e {
        clearlog_memory::Error::Listener { source, .. } => source.downcast_ref::<Error>(),
        _ => None,
    };
    // The probe finds the VMM's slot 0 before any create (KVM_SET_USER_MEMORY_REGION would
    // refuse this one with EINVAL, but it accepts an identical request as a no-op).
    assert!(
        matches!(
            inner,
            Some(Error::SlotIdTaken {
                slot: 0,
                guest_phys: 0,
                size: RAM,
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
    let vm = Arc::new(Vm::from_fd(&vm_fd, mode).unwrap());
    let memory = MemorySystem::new();
    let ram = memory.add_ram("ram0", 0, RAM).unwrap();
    let listener = Arc::new(KvmMemoryListener::with_slot_ids(vm.clone(), 1..4).unwrap());
    memory.register_listener(listener.clone()).unwrap();
    assert_eq!(listener.slot_id_at(0), Some(1));
    assert!(vm.is_cache_slot(1));
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
    let vm = Arc::new(Vm::from_fd(&vm_fd, mode).unwrap());
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
    let msg = chain(&e);
    assert!(msg.contains("5..6"), "{msg}");
}

#[test]
fn from_fd_refuses_what_is_not_a_vm_fd() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let e = Vm::from_fd(&kvm, KvmDirtyLogMode::Legacy).unwrap_err();
    assert!(
        matches!(e, Error::NotAVmFd { .. }) && e.to_string().contains("/dev/kvm"),
        "{e}"
    );
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let e = Vm::from_fd(file.as_fd(), KvmDirtyLogMode::Legacy).unwrap_err();
    assert!(matches!(e, Error::NotAVmFd { .. }), "{e}");
}

#[test]
fn from_fd_dups_the_fd_and_probes_the_vm() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm_fd = kvm.create_vm().unwrap();
    let vm = Vm::from_fd(&vm_fd, KvmDirtyLogMode::Legacy).unwrap();
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
        let e = enable_manual_protect(&vm_fd, flags).unwrap_err();
        assert!(
            matches!(e, Error::InvalidProtectFlags { .. }),
            "{flags:#x}: {e}"
        );
    }
    let mode = enable_manual_protect(&vm_fd, MANUAL_PROTECT_ENABLE).unwrap();
    assert_eq!(
        mode,
        KvmDirtyLogMode::Manual {
            initially_set: false
        }
    );
    // The mode it returns is what `Vm::from_fd` takes.
    let vm = Vm::from_fd(&vm_fd, mode).unwrap();
    assert!(vm.dirty_log_mode().is_manual());
}

/// One `KVM_SET_USER_MEMORY_REGION` through kvm-ioctls; the kernel's errno on failure.
///
/// # Safety
///
/// As `VmFd::set_user_memory_region`: a non-empty range must stay mapped while the slot exists.
unsafe fn set_region(
    vm: &VmFd,
    slot: u32,
    flags: u32,
    gpa: u64,
    size: u64,
    host: u64,
) -> Result<(), i32> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: forwarded from the caller.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.errno())
}

/// A private 1-page PROT_NONE reservation (never accessed; unmapped on drop).
struct Reservation(*mut libc::c_void);

impl Reservation {
    fn new() -> Self {
        // SAFETY: a new private anonymous mapping at an address the kernel picks; it changes no
        // other mapping and nothing reads or writes it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Reservation(p)
    }

    fn addr(&self) -> u64 {
        self.0 as u64
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once; the tests delete every memslot that
        // pointed at it before the reservation is dropped.
        unsafe { libc::munmap(self.0, 4096) };
    }
}

/// The kernel facts the slot-id probe of `KvmMemoryListener` relies on (Linux 6.x
/// `__kvm_set_memory_region`), checked on this host.
#[test]
fn kernel_memslot_facts_behind_the_slot_id_probe() {
    if !kvm_available() {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let reservation = Reservation::new();
    let res = reservation.addr();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    // SAFETY: every call below names `mem` or `reservation`, which outlive `vm` (declared
    // first); the probe slots that get created are deleted right away.
    unsafe {
        assert_eq!(set_region(&vm, 1, 0, 0, 1 << 20, host), Ok(()));
        // Identical parameters on an existing slot: accepted, nothing changes (the takeover).
        assert_eq!(set_region(&vm, 1, 0, 0, 1 << 20, host), Ok(()));
        // An existing id with another userspace_addr (or size): EINVAL, before any overlap check.
        assert_eq!(set_region(&vm, 1, 0, 0, 4096, res), Err(libc::EINVAL));
        assert_eq!(set_region(&vm, 1, 0, 1 << 30, 4096, res), Err(libc::EINVAL));
        // A free id whose range overlaps another slot: EEXIST, nothing created...
        assert_eq!(set_region(&vm, 2, 0, 0, 4096, res), Err(libc::EEXIST));
        // ...so deleting it is EINVAL (a delete of a free id).
        assert_eq!(set_region(&vm, 2, 0, 0, 0, res), Err(libc::EINVAL));
        // A free id that overlaps nothing: created (and deleted again).
        assert_eq!(set_region(&vm, 3, 0, 1 << 30, 4096, res), Ok(()));
        assert_eq!(set_region(&vm, 3, 0, 1 << 30, 0, res), Ok(()));
        assert_eq!(set_region(&vm, 3, 0, 1 << 30, 0, res), Err(libc::EINVAL));
        // The VMM's slot 1 is still there, unchanged.
        assert_eq!(set_region(&vm, 1, 0, 0, 4096, res), Err(libc::EINVAL));
        assert_eq!(set_region(&vm, 1, 0, 0, 1 << 20, host), Ok(()));
    }
}

/// Finding 6: a VMM with its own memslot 1 over RAM it also gave the listener, and a listener
/// allowed ids 1..16 on `Vm::from_fd`: KVM accepts the identical `KVM_SET_USER_MEMORY_REGION` on
/// the existing slot, so the listener took over the VMM's slot 1 silently.
#[test]
fn a_vmm_memslot_is_never_taken_over_by_a_listener() {
    use clearlog_memory::DirtyBitmap;
    if !kvm_available() {
        return;
    }
    let gm =
        GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let host = gm.get_host_address(GuestAddress(0)).unwrap() as u64;
    let reservation = Reservation::new();
    let kvm = Kvm::new().unwrap();
    let vm_fd = kvm.create_vm().unwrap();
    let mode = enable_manual_protect(&vm_fd, MANUAL_PROTECT_ENABLE).unwrap();
    // SAFETY: `gm` outlives `vm_fd` (declared first).
    unsafe { set_region(&vm_fd, 1, 0, 0, RAM, host) }.unwrap();
    let vm = Arc::new(Vm::from_fd(&vm_fd, mode).unwrap());
    let memory = MemorySystem::new();
    memory.add_guest_memory(&gm).unwrap();
    let listener = Arc::new(KvmMemoryListener::with_slot_ids(vm.clone(), 1..16).unwrap());
    let e = memory.register_listener(listener.clone()).unwrap_err();
    let inner = match &e {
        clearlog_memory::Error::Listener { source, .. } => source.downcast_ref::<Error>(),
        _ => None,
    };
    assert!(
        matches!(inner, Some(Error::SlotIdTaken { slot: 1, .. })),
        "{e:?}"
    );
    let msg = inner.unwrap().to_string();
    for part in ["memslot 1", "VMM", "with_slot_ids"] {
        assert!(msg.contains(part), "`{part}` missing from: {msg}");
    }
    assert!(vm.memslot(1).is_none() && listener.slot_id_at(0).is_none());
    // The VMM's slot 1 is still there (an existing id answers EINVAL to a 1-page request).
    // SAFETY: refused by the kernel, nothing is created.
    let probe = unsafe { set_region(&vm_fd, 1, 0, 0, 4096, reservation.addr()) };
    assert_eq!(probe, Err(libc::EINVAL));

    // Whatever range the caller allows, and wherever the RAM is: id 1 is refused.
    let other = MemorySystem::new();
    other.add_ram("ram", 64 << 20, RAM).unwrap();
    let e = other
        .register_listener(Arc::new(
            KvmMemoryListener::with_slot_ids(vm.clone(), 1..2).unwrap(),
        ))
        .unwrap_err();
    assert!(chain(&e).contains("memslot 1"), "{e}");

    // With a range next to the VMM's slot the listener works: its first slot is probed with a
    // create (the Vm knows no slot yet), the second against the first.
    let listener = Arc::new(KvmMemoryListener::with_slot_ids(vm, 2..16).unwrap());
    other.register_listener(listener.clone()).unwrap();
    assert_eq!(listener.slot_id_at(64 << 20), Some(2));
    other.add_ram("ram2", 128 << 20, RAM).unwrap();
    assert_eq!(listener.slot_id_at(128 << 20), Some(3));
    let ram = other.ram_blocks()[0].clone();
    other.log_global_start().unwrap();
    other.log_sync_all().unwrap();
    other.clear_dirty_bitmap_block(&ram, 0, RAM).unwrap();
    other.log_global_stop().unwrap();
    // Nothing was left behind by the probes: ids 4.. are free in the kernel.
    // SAFETY: refused by the kernel (overlaps slot 2), nothing is created.
    let probe = unsafe { set_region(&vm_fd, 4, 0, 64 << 20, 4096, reservation.addr()) };
    assert_eq!(probe, Err(libc::EEXIST));
}

/// An error and its sources, `outer: cause: ...` (the memory API's error names the listener, its
/// source is the kvm error).
fn chain(e: &dyn std::error::Error) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
