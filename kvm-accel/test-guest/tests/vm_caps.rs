// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! VM creation in each dirty-log mode, the capability report, memslot errors.

mod common;

use clearlog_kvm::Error;
use clearlog_kvm::KvmCaps;
use clearlog_kvm::{KvmDirtyLogMode, Vm, VmConfig};
use common::*;

#[test]
fn caps_report() {
    if !kvm_available() {
        return;
    }
    let caps = KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
    eprintln!("caps: {caps}");
    assert_eq!(caps.api_version, 12);
    assert!(caps.max_memslots > 0);
    assert!(caps.max_vcpus >= caps.nr_vcpus && caps.nr_vcpus > 0);
    assert_eq!(
        caps.default_dirty_log_mode().is_manual(),
        caps.manual_protect_flags & 1 == 1
    );
    assert_eq!(caps.to_string().split(' ').count(), caps.fields().len());
}

#[test]
fn each_mode() {
    if !kvm_available() {
        return;
    }
    let caps = KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
    let vm = Vm::new(VmConfig {
        dirty_log: Some(KvmDirtyLogMode::Legacy),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(vm.dirty_log_mode(), KvmDirtyLogMode::Legacy);

    let auto = Vm::new(VmConfig::default()).unwrap();
    assert_eq!(auto.dirty_log_mode(), caps.default_dirty_log_mode());
    assert_eq!(auto.caps(), &caps);

    for initially_set in [false, true] {
        let wanted = if initially_set { 3 } else { 1 };
        let r = Vm::new(VmConfig {
            dirty_log: Some(KvmDirtyLogMode::Manual { initially_set }),
            ..Default::default()
        });
        if caps.manual_protect_flags & wanted == wanted {
            assert_eq!(
                r.unwrap().dirty_log_mode(),
                KvmDirtyLogMode::Manual { initially_set }
            );
        } else {
            assert!(matches!(r, Err(Error::ManualProtectUnsupported { .. })));
        }
    }
}

#[test]
fn missing_device_is_a_clear_error() {
    let e = Vm::new(VmConfig {
        kvm_path: "/dev/does-not-exist-kvm".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, Error::KvmMissing { .. }), "{e}");
    assert!(e.to_string().contains("/dev/does-not-exist-kvm"), "{e}");
}

#[test]
fn permission_error_names_the_fix() {
    // A node we can find but not open as a KVM device: a directory gives EISDIR, a
    // read-only file EACCES only for non-root. Check the message of the variant itself.
    let e = Error::KvmPermission {
        path: "/dev/kvm".into(),
    };
    let s = e.to_string();
    assert!(s.contains("/dev/kvm") && s.contains("kvm group"), "{s}");
}

#[test]
fn memslot_errors() {
    if !kvm_available() {
        return;
    }
    let g = Guest::unmapped(None, 1 << 20);
    let host = 0x7f00_0000_0000u64;
    let max = g.vm.caps().max_memslots;
    // SAFETY: every call below is rejected before reaching the kernel.
    unsafe {
        assert!(matches!(
            g.vm.set_memslot(max, 0, 4096, host, false),
            Err(Error::SlotOutOfRange { .. })
        ));
        assert!(matches!(
            g.vm.set_memslot(0, 0, 0, host, false),
            Err(Error::InvalidMemslot { .. })
        ));
        assert!(matches!(
            g.vm.set_memslot(0, 0, 4095, host, false),
            Err(Error::InvalidMemslot { .. })
        ));
        assert!(matches!(
            g.vm.set_memslot(0, 1, 4096, host, false),
            Err(Error::InvalidMemslot { .. })
        ));
        assert!(matches!(
            g.vm.set_memslot(0, 0, 4096, host + 1, false),
            Err(Error::InvalidMemslot { .. })
        ));
        assert!(matches!(
            g.vm.set_memslot(0x0001_0000 * 64, 0, 4096, host, false),
            Err(Error::SlotOutOfRange { .. })
        ));
    }
    assert!(matches!(g.vm.remove_memslot(3), Err(Error::UnknownSlot(3))));
    assert!(g.vm.memslots().is_empty());
    g.map(2, 0, 1 << 20, true);
    assert_eq!(g.vm.memslot(2).unwrap().pages(), 256);
    // Overlapping slot: the kernel says EEXIST, reported with the slot, address and size.
    let host = g.mem_host(0);
    // SAFETY: `g.mem` outlives the VM.
    let e = unsafe { g.vm.set_memslot(3, 0, 4096, host, false) }.unwrap_err();
    assert!(
        matches!(
            e,
            Error::MemslotRefused {
                slot: 3,
                guest_phys: 0,
                size: 4096,
                ..
            }
        ),
        "{e}"
    );
    g.vm.remove_memslot(2).unwrap();
    assert!(g.vm.memslot(2).is_none());
    let mut bm = [0u64; 4];
    assert!(matches!(
        g.vm.get_dirty_log(2, &mut bm),
        Err(Error::UnknownSlot(2))
    ));
}
