// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The dirty ring on real KVM: bad sizes, the order rules, and a VMM's own VM and vCPU fds.

use std::sync::Arc;

use clearlog_kvm::{
    enable_dirty_ring, Error, KvmCaps, KvmDirtyLogMode, KvmMemoryListener, RingRange, Vm, VmConfig,
};
use clearlog_memory::MemorySystem;

mod common;
use common::kvm_available;

/// The ring range of this host, or None (skipped loudly; CI wants a ring where KVM is).
fn ring_range() -> Option<RingRange> {
    if !kvm_available() {
        return None;
    }
    let caps = KvmCaps::probe_device("/dev/kvm".as_ref()).expect("probe");
    let r = RingRange::of(&caps);
    if r.is_none() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "no dirty ring on a KVM host in CI"
        );
        eprintln!("SKIPPED: no dirty ring on this host");
    }
    r
}

fn ring_vm(bytes: u32) -> Result<Vm, Error> {
    Vm::new(VmConfig {
        dirty_log: Some(KvmDirtyLogMode::Ring { bytes }),
        ..Default::default()
    })
}

#[test]
fn bad_ring_sizes_list_the_valid_range() {
    let Some(r) = ring_range() else { return };
    // The range as a user types it (`4K..=64K`).
    let size = |b: u32| clearlog_bitmap::format_size(b.into());
    let range = format!("{}..={}", size(r.min), size(r.max));
    for bad in [0, 1000, r.min + 16, r.min / 2, r.max.saturating_mul(2)] {
        match ring_vm(bad) {
            Err(e @ Error::DirtyRingSize { .. }) => {
                assert!(e.to_string().contains(&range), "{e}");
            }
            other => panic!("size {bad}: expected DirtyRingSize, got {other:?}"),
        }
    }
    let vm = ring_vm(r.max).expect("the largest size");
    assert_eq!(vm.dirty_log_mode(), KvmDirtyLogMode::Ring { bytes: r.max });
}

#[test]
fn the_ring_must_be_enabled_before_any_vcpu() {
    if ring_range().is_none() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm_fd = kvm.create_vm().unwrap();
    let _vcpu = vm_fd.create_vcpu(0).unwrap();
    match enable_dirty_ring(&vm_fd, 64 << 10) {
        Err(e @ Error::DirtyRingEnable { .. }) => {
            assert!(e.to_string().contains("before any vCPU"), "{e}");
        }
        other => panic!("expected DirtyRingEnable, got {other:?}"),
    }
}

#[test]
fn ring_calls_outside_ring_mode_are_refused() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(VmConfig::default()).unwrap();
    let vcpu = vm.vm_fd().unwrap().create_vcpu(0).unwrap();
    assert!(matches!(
        vm.register_vcpu_ring(0, &vcpu),
        Err(Error::DirtyRingNotEnabled { .. })
    ));
    let listener = Arc::new(KvmMemoryListener::new(Arc::new(vm)));
    listener
        .start_ring_reaper(clearlog_kvm::RING_REAP_INTERVAL)
        .unwrap_err();
    assert_eq!(listener.reap_rings().unwrap(), 0);
}

/// A VMM's own VM and vCPU fds: ring enabled on its fd, vCPU registered, memslot logged by a
/// listener on `Vm::from_fd`; a write by the host through KVM is not needed: the reap must run
/// clean (no entries, nothing reset) and a second registration is refused.
#[test]
fn a_vmms_own_vm_and_vcpu_register_their_ring() {
    let Some(r) = ring_range() else { return };
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm_fd = kvm.create_vm().unwrap();
    let mode = enable_dirty_ring(&vm_fd, r.min.max(16 << 10)).unwrap();
    let vm = Arc::new(Vm::from_fd(&vm_fd, mode).unwrap());
    let vcpu = vm_fd.create_vcpu(0).unwrap();
    vm.register_vcpu_ring(0, &vcpu).unwrap();
    assert!(matches!(
        vm.register_vcpu_ring(0, &vcpu),
        Err(Error::DirtyRingVcpu { vcpu: 0, .. })
    ));
    let memory = MemorySystem::with_ram_capacity(1 << 20);
    memory.add_ram("ram", 0, 1 << 20).unwrap();
    let listener = Arc::new(KvmMemoryListener::new(vm));
    memory.register_listener(listener.clone()).unwrap();
    memory.log_global_start().unwrap();
    memory.log_sync_all().unwrap();
    assert_eq!(listener.reap_rings().unwrap(), 0);
    let stats = listener.ring_stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].harvested, 0);
    // A from_fd ring mode with a size the kernel cannot have is refused.
    let err = Vm::from_fd(&vm_fd, KvmDirtyLogMode::Ring { bytes: 3000 }).unwrap_err();
    assert!(matches!(err, Error::DirtyRingSize { .. }), "{err}");
}
