// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM_CLEAR_DIRTY_LOG against the real kernel: partial clears, tails of slots whose size
//! is not a multiple of 64 pages, and the kernel's refusals.

mod common;

use std::os::fd::AsFd;

use clearlog_kvm::raw::{clear_dirty_log, ClearDirtyLogError};
use clearlog_kvm::Error;
use clearlog_kvm::KvmDirtyLogMode;
use common::*;

const MIB: u64 = 1 << 20;
const SLOT: u32 = 1;

/// A guest with slot 0 = [0, 1 MiB) (no logging, infrastructure) and slot 1 =
/// `pages` pages at 1 MiB with logging, manual protect without INITIALLY_SET, and the
/// on-demand dirtier running.
fn setup(pages: u64) -> (Guest, clearlog_test_guest::vcpu::runner::VcpuRunner) {
    let g = Guest::unmapped(
        Some(KvmDirtyLogMode::Manual {
            initially_set: false,
        }),
        2 * MIB,
    );
    g.map(0, 0, MIB, false);
    g.map(SLOT, MIB, pages * 4096, true);
    let r = start_dirtier(&g);
    (g, r)
}

fn get(g: &Guest) -> Vec<u64> {
    let mut bm = vec![0u64; g.vm.memslot(SLOT).unwrap().bitmap_words()];
    g.vm.get_dirty_log(SLOT, &mut bm).unwrap();
    bm
}

#[test]
fn partial_clear_keeps_other_half_dirty() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let (g, r) = setup(64);
    let mut d = Dirtier {
        mem: &g.mem,
        round: 0,
    };
    assert_eq!(
        set_bits(&get(&g), 64),
        Vec::<u64>::new(),
        "no INITIALLY_SET"
    );
    d.dirty(MIB, 64);
    assert_eq!(get(&g), vec![u64::MAX]);
    // Clear pages 0..31 with a 64-page ioctl range whose upper half is zero.
    clear_dirty_log(g.vm.as_fd(), SLOT, 0, 64, &[0xffff_ffff]).unwrap();
    assert_eq!(
        get(&g),
        vec![0xffff_ffff_0000_0000],
        "pages 32..63 must stay dirty"
    );
    // Clearing re-armed tracking: new writes to 0..31 show up again.
    d.dirty(MIB, 8);
    assert_eq!(get(&g), vec![0xffff_ffff_0000_00ff]);
    // Through the Vm, clear everything.
    g.vm.clear_dirty_log(SLOT, 0, 64, &[u64::MAX]).unwrap();
    assert_eq!(get(&g), vec![0]);
    d.dirty(MIB + 63 * 4096, 1);
    assert_eq!(get(&g), vec![1 << 63]);
    r.stop().unwrap();
}

#[test]
fn slot_not_multiple_of_64_pages() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let (g, r) = setup(100);
    let mut d = Dirtier {
        mem: &g.mem,
        round: 0,
    };
    d.dirty(MIB, 100);
    let all = get(&g);
    assert_eq!(set_bits(&all, 128), (0..100).collect::<Vec<_>>());

    // [64, 96) with num_pages 32 does not end at the slot end: the kernel says EINVAL.
    assert_eq!(
        clear_dirty_log(g.vm.as_fd(), SLOT, 64, 32, &[u64::MAX]),
        Err(ClearDirtyLogError::InvalidArgument)
    );
    // The Vm refuses it before the ioctl.
    assert!(matches!(
        g.vm.clear_dirty_log(SLOT, 64, 32, &[u64::MAX]),
        Err(Error::InvalidRange { .. })
    ));
    // Past the slot end: EINVAL.
    assert_eq!(
        clear_dirty_log(g.vm.as_fd(), SLOT, 64, 64, &[u64::MAX]),
        Err(ClearDirtyLogError::InvalidArgument)
    );
    assert_eq!(get(&g), all, "refused clears changed nothing");

    // The tail [64, 100) is accepted (ends exactly at the slot end).
    clear_dirty_log(g.vm.as_fd(), SLOT, 64, 36, &[u64::MAX]).unwrap();
    assert_eq!(set_bits(&get(&g), 128), (0..64).collect::<Vec<_>>());
    // Only the requested bits of the tail: dirty the tail again, clear pages 64..67 only.
    d.dirty(MIB + 64 * 4096, 36);
    g.vm.clear_dirty_log(SLOT, 64, 36, &[0xf]).unwrap();
    assert_eq!(
        set_bits(&get(&g), 128),
        (0..64).chain(68..100).collect::<Vec<_>>()
    );
    r.stop().unwrap();
}

#[test]
fn userspace_validation() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let (g, r) = setup(64);
    let fd = g.vm.as_fd();
    assert_eq!(
        clear_dirty_log(fd, SLOT, 32, 32, &[u64::MAX]),
        Err(ClearDirtyLogError::Unaligned { first_page: 32 })
    );
    assert_eq!(
        clear_dirty_log(fd, SLOT, 0, 0, &[0]),
        Err(ClearDirtyLogError::Empty)
    );
    assert_eq!(
        clear_dirty_log(fd, SLOT, 0, 65, &[u64::MAX]),
        Err(ClearDirtyLogError::BitmapTooShort {
            num_pages: 65,
            needed: 2,
            got: 1
        })
    );
    assert!(matches!(
        clear_dirty_log(fd, SLOT, u64::MAX - 63, 64, &[0]),
        Err(ClearDirtyLogError::Overflow { .. })
    ));
    assert!(matches!(
        g.vm.clear_dirty_log(SLOT, 32, 32, &[0]),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        g.vm.clear_dirty_log(SLOT, 0, 128, &[0, 0]),
        Err(Error::InvalidRange { .. })
    ));
    let mut small: Vec<u64> = Vec::new();
    assert!(matches!(
        g.vm.get_dirty_log(SLOT, &mut small),
        Err(Error::BufferTooSmall { needed: 1, got: 0 })
    ));
    r.stop().unwrap();
}

#[test]
fn enoent_without_logging() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let (g, r) = setup(64);
    // Slot 0 has no dirty logging.
    assert_eq!(
        clear_dirty_log(g.vm.as_fd(), 0, 0, 64, &[u64::MAX]),
        Err(ClearDirtyLogError::NotLogging)
    );
    assert!(matches!(
        g.vm.clear_dirty_log(0, 0, 64, &[u64::MAX]),
        Err(Error::SlotNotLogging(0))
    ));
    // Turning logging off on slot 1 removes its bitmap.
    g.map(SLOT, MIB, 64 * 4096, false);
    assert_eq!(
        clear_dirty_log(g.vm.as_fd(), SLOT, 0, 64, &[u64::MAX]),
        Err(ClearDirtyLogError::NotLogging)
    );
    r.stop().unwrap();
}

#[test]
fn legacy_vm_refuses_clear() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let g = Guest::unmapped(Some(KvmDirtyLogMode::Legacy), 2 * MIB);
    g.map(0, 0, MIB, false);
    g.map(SLOT, MIB, 64 * 4096, true);
    assert!(matches!(
        g.vm.clear_dirty_log(SLOT, 0, 64, &[u64::MAX]),
        Err(Error::NotManualMode)
    ));
    // Fact about this kernel: the raw ioctl is accepted without manual protection.
    let raw = clear_dirty_log(g.vm.as_fd(), SLOT, 0, 64, &[u64::MAX]);
    eprintln!("raw KVM_CLEAR_DIRTY_LOG on a legacy VM: {raw:?}");
}
