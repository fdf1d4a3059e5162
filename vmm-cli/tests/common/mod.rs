// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the `vmm-cli` integration tests (real KVM).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use clearlog_test_guest::Guest;

/// Is a real KVM required (a test that cannot run must then fail, not skip)?
/// `CI=true` or `CLEARLOG_REQUIRE_KVM=1`.
pub fn kvm_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Skip-or-fail guard of every KVM test: true when `/dev/kvm` opens read-write. Otherwise prints
/// a loud `SKIPPED:` line naming the test and returns false, or panics when KVM is required.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if kvm_required() => {
            panic!("{test}: CI=true or CLEARLOG_REQUIRE_KVM=1, but /dev/kvm cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {test}: /dev/kvm cannot be opened ({e}); set CLEARLOG_REQUIRE_KVM=1 to fail instead");
            false
        }
    }
}

/// Serializes the tests of one binary that run vCPUs (2-core machine: a paced vCPU spins on a
/// whole core).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

// Not every test binary that includes this module migrates.
#[allow(unused_imports)]
pub use vmm_cli::vm_control::GuestControl;

/// The first page (index) where the RAM of two guests of the same size differs, if any.
pub fn first_ram_difference(a: &Guest, b: &Guest) -> Option<u64> {
    assert_eq!(a.mem_bytes(), b.mem_bytes());
    const STEP: usize = 1 << 20;
    let (mut x, mut y) = (vec![0u8; STEP], vec![0u8; STEP]);
    let mut offset = 0u64;
    while offset < a.mem_bytes() {
        a.block().read(offset, &mut x).expect("read source RAM");
        b.block()
            .read(offset, &mut y)
            .expect("read destination RAM");
        if x != y {
            let i = x.iter().zip(&y).position(|(p, q)| p != q).unwrap_or(0);
            return Some((offset + i as u64) / 4096);
        }
        offset += STEP as u64;
    }
    None
}

/// A fresh scratch directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-cli-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
