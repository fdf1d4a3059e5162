// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM_GET_DIRTY_LOG semantics in legacy, manual and manual+INITIALLY_SET modes.

mod common;

use clearlog_kvm::{KvmCaps, KvmDirtyLogMode};
use common::*;

const MIB: u64 = 1 << 20;
const SLOT: u32 = 1;
const PAGES: u64 = 128;

fn setup(choice: Option<KvmDirtyLogMode>) -> Guest {
    let g = Guest::unmapped(choice, 2 * MIB);
    g.map(0, 0, MIB, false);
    g.map(SLOT, MIB, PAGES * 4096, true);
    g
}

fn get(g: &Guest) -> Vec<u64> {
    let mut bm = vec![0u64; 2];
    g.vm.get_dirty_log(SLOT, &mut bm).unwrap();
    bm
}

#[test]
fn legacy_get_clears() {
    if !kvm_available() {
        return;
    }
    let _s = serial();
    let g = setup(Some(KvmDirtyLogMode::Legacy));
    assert_eq!(g.vm.dirty_log_mode(), KvmDirtyLogMode::Legacy);
    let r = start_dirtier(&g);
    let mut d = Dirtier {
        mem: &g.mem,
        round: 0,
    };
    assert_eq!(get(&g), vec![0, 0]);
    d.dirty(MIB + 4096, 3); // pages 1, 2, 3
    assert_eq!(get(&g), vec![0b1110, 0]);
    assert_eq!(get(&g), vec![0, 0], "legacy GET clears");
    d.dirty(MIB + 100 * 4096, 1);
    assert_eq!(get(&g), vec![0, 1 << 36], "legacy GET re-armed tracking");
    r.stop().unwrap();
}

#[test]
fn manual_get_only_copies() {
    if !kvm_available() {
        return;
    }
    let caps = KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
    if caps.manual_protect_flags & 1 == 0 {
        eprintln!("SKIPPED: manual dirty-log protection not offered");
        return;
    }
    let _s = serial();
    let g = setup(Some(KvmDirtyLogMode::Manual {
        initially_set: false,
    }));
    let r = start_dirtier(&g);
    let mut d = Dirtier {
        mem: &g.mem,
        round: 0,
    };
    assert_eq!(get(&g), vec![0, 0]);
    d.dirty(MIB, 2);
    d.dirty(MIB + 127 * 4096, 1);
    let expect = vec![0b11, 1 << 63];
    assert_eq!(get(&g), expect);
    assert_eq!(get(&g), expect, "manual GET does not clear");
    g.vm.clear_dirty_log(SLOT, 0, PAGES as u32, &[u64::MAX, u64::MAX])
        .unwrap();
    assert_eq!(get(&g), vec![0, 0]);
    d.dirty(MIB + 64 * 4096, 1);
    assert_eq!(get(&g), vec![0, 1]);
    r.stop().unwrap();
}

#[test]
fn initially_set_first_get_is_all_ones() {
    if !kvm_available() {
        return;
    }
    let caps = KvmCaps::probe_device("/dev/kvm".as_ref()).unwrap();
    if caps.manual_protect_flags & 3 != 3 {
        eprintln!("SKIPPED: KVM_DIRTY_LOG_INITIALLY_SET not offered");
        return;
    }
    let _s = serial();
    let g = setup(Some(KvmDirtyLogMode::Manual {
        initially_set: true,
    }));
    // No guest ran: every bit is set anyway.
    assert_eq!(get(&g), vec![u64::MAX, u64::MAX]);
    let r = start_dirtier(&g);
    let mut d = Dirtier {
        mem: &g.mem,
        round: 0,
    };
    g.vm.clear_dirty_log(SLOT, 0, PAGES as u32, &[u64::MAX, u64::MAX])
        .unwrap();
    assert_eq!(get(&g), vec![0, 0]);
    d.dirty(MIB + 5 * 4096, 1);
    assert_eq!(
        get(&g),
        vec![1 << 5, 0],
        "tracking armed lazily by the clear"
    );
    // Toggling logging off and on sets all bits again.
    g.map(SLOT, MIB, PAGES * 4096, false);
    g.map(SLOT, MIB, PAGES * 4096, true);
    assert_eq!(get(&g), vec![u64::MAX, u64::MAX]);
    r.stop().unwrap();
}
