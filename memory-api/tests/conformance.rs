// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `clearlog_memory::testing::check_memory_listener` has teeth: the model accelerator with the
//! per-slot cache passes it; the naive one (clears KVM directly, all ones for the range) fails it
//! on the one-clear-per-sync rule; one that does not fold into the Snapshot client fails the
//! dirty-epochs rule; a listener that never syncs fails the final-sync rule.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use clearlog_memory::testing::{
    check_memory_listener, check_memory_listener_with, ConformanceConfig,
};
use clearlog_memory::{DirtyClient, MemoryListener, MemorySystem, Section};
use common::{FakeKvm, ModelKernel};

/// Run the check against the model accelerator; the guest writes through the model kernel.
fn run(with_cache: bool, config: Option<ConformanceConfig>) {
    let kernel = Arc::new(Mutex::new(ModelKernel::default()));
    let kvm = FakeKvm::new(&kernel, with_cache);
    let mem = MemorySystem::with_ram_capacity(64 << 20);
    let guest = |s: &Section, page: u64| kernel.lock().unwrap().guest_write(s.guest_addr, page);
    match config {
        Some(c) => check_memory_listener_with(&mem, kvm, &guest, &c),
        None => check_memory_listener(&mem, kvm, &guest),
    }
}

fn panic_message(r: std::thread::Result<()>) -> String {
    let e = r.expect_err("the check should have failed");
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn cached_model_accelerator_passes() {
    run(true, None);
    // Off a 64-page boundary and at another address.
    run(
        true,
        Some(ConformanceConfig {
            guest_addr: 0x20_0000,
            pages: 200,
        }),
    );
}

#[test]
#[should_panic(expected = "rule broken (one clear per sync)")]
fn naive_model_accelerator_fails() {
    run(false, None);
}

#[test]
fn naive_failure_names_the_race() {
    let msg = panic_message(catch_unwind(AssertUnwindSafe(|| run(false, None))));
    assert!(msg.contains("one clear per sync"), "{msg}");
    assert!(msg.contains("chunk re-arm"), "{msg}");
}

/// A listener that never syncs: the guest's writes are invisible to every client.
struct NeverSyncs;
impl MemoryListener for NeverSyncs {
    fn name(&self) -> &str {
        "never-syncs"
    }
}

#[test]
fn listener_without_final_sync_fails() {
    let mem = MemorySystem::with_ram_capacity(64 << 20);
    let msg = panic_message(catch_unwind(AssertUnwindSafe(|| {
        check_memory_listener(&mem, Arc::new(NeverSyncs), &|_: &Section, _: u64| {});
    })));
    assert!(
        msg.contains("rule broken (final sync at log_stop)"),
        "{msg}"
    );
}

#[test]
fn the_check_cleans_up_after_itself() {
    let kernel = Arc::new(Mutex::new(ModelKernel::default()));
    let kvm = FakeKvm::new(&kernel, true);
    let mem = MemorySystem::with_ram_capacity(64 << 20);
    let guest = |s: &Section, page: u64| kernel.lock().unwrap().guest_write(s.guest_addr, page);
    check_memory_listener(&mem, kvm.clone(), &guest);
    assert!(mem.ram_blocks().is_empty());
    assert!(mem.sections().is_empty());
    assert!(!mem.global_logging());
    assert!(kernel.lock().unwrap().slots.is_empty());
    // The listener was unregistered: it can run the check again.
    check_memory_listener(&mem, kvm, &guest);
}

#[test]
#[should_panic(expected = "rule broken (epochs: a sync must fold into the Snapshot client)")]
fn an_accelerator_that_forgets_the_snapshot_client_fails() {
    let kernel = Arc::new(Mutex::new(ModelKernel::default()));
    let kvm = FakeKvm::skipping(&kernel, true, DirtyClient::Snapshot.into());
    let mem = MemorySystem::with_ram_capacity(64 << 20);
    let guest = |s: &Section, page: u64| kernel.lock().unwrap().guest_write(s.guest_addr, page);
    check_memory_listener(&mem, kvm, &guest);
}
