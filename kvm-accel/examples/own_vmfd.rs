// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! clearlog-kvm on a VM the VMM already has.
//!
//! The "VMM" here creates its VM with kvm-ioctls directly (`Kvm::new()`, `create_vm()`) and a
//! memslot of its own (slot 0). It then enables manual dirty-log protection with
//! `clearlog_kvm::enable_manual_protect`, wraps its VM fd in a `clearlog_kvm::Vm`, maps guest RAM
//! through a `clearlog_memory::MemorySystem` with a `KvmMemoryListener` whose memslot ids avoid
//! slot 0, runs a guest that dirties memory (the `increment` workload of `clearlog-test-guest`, on
//! a vCPU the VMM creates from its own fds) and checks what the cache and the clear report
//! against the workload's own counters.
//!
//! ```sh
//! cargo run --release -p clearlog-kvm --example own_vmfd
//! ```
//!
//! Prints every check; exits 0 only if all passed. Without a usable `/dev/kvm` it prints a loud
//! `SKIPPED` line and exits 0, like the tests (1 with `CI=true` or `CLEARLOG_REQUIRE_KVM=1`).

use std::process::ExitCode;

/// Runs the example: what it checked, one line per check, or the first failed check;
/// `Ok(None)` when KVM is not available here (skipped).
#[cfg(target_arch = "x86_64")]
pub fn run() -> Result<Option<Vec<String>>, String> {
    if let Err(why) = demo::kvm_usable() {
        eprintln!("SKIPPED: own_vmfd: /dev/kvm not available ({why})");
        return Ok(None);
    }
    demo::run().map(Some)
}

/// Runs the example; the test guest is x86-64 code, so elsewhere there is nothing to run.
#[cfg(not(target_arch = "x86_64"))]
pub fn run() -> Result<Option<Vec<String>>, String> {
    eprintln!("SKIPPED: own_vmfd: the test guest is x86-64 only");
    Ok(None)
}

#[allow(dead_code)] // the test that runs `run()` includes this file as a module
fn main() -> ExitCode {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1");
    match run() {
        Ok(Some(checks)) => {
            for c in &checks {
                println!("ok: {c}");
            }
            println!("own_vmfd: all {} checks passed", checks.len());
            ExitCode::SUCCESS
        }
        Ok(None) if required => {
            eprintln!("own_vmfd: FAILED: KVM is required here (CI=true or CLEARLOG_REQUIRE_KVM=1)");
            ExitCode::FAILURE
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("own_vmfd: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod demo {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use clearlog_bitmap::Bitmap;
    use clearlog_kvm::{
        enable_manual_protect, KvmDirtyLogMode, KvmMemoryListener, Vm, INITIALLY_SET,
        MANUAL_PROTECT_ENABLE, PAGE_SIZE,
    };
    use clearlog_memory::{MemorySystem, RamBlock, RegionId};
    use clearlog_test_guest::guest_ram::RawGuestRam;
    use clearlog_test_guest::layout::INFRA_END;
    use clearlog_test_guest::vcpu::runner::VcpuRunner;
    use clearlog_test_guest::vcpu::Vcpu;
    use clearlog_test_guest::workload::monitor::WorkloadMonitor;
    use clearlog_test_guest::workload::{Workload, WorkloadSpec};
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::Kvm;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;
    /// Guest RAM, from GPA 0 (the test guest's page tables, code and counters live at its start).
    const RAM: u64 = 64 * MIB;
    /// The increment workload's working set: pages written one after the other, in order.
    const WSS: u64 = 8 * MIB;
    const WSS_PAGES: u64 = WSS / PAGE_SIZE;
    /// 16 MiB/s = 4096 pages/s: a round of 200 ms writes ~800 pages, under the WSS (2048), so no
    /// page is written twice in that round and dirty pages == pages written.
    const RATE: u64 = 16 * MIB;
    const ROUND: Duration = Duration::from_millis(200);
    /// The VMM's own memslot: slot 0, 2 MiB at 1 GiB (above the guest RAM, never touched).
    const VMM_SLOT: u32 = 0;
    const VMM_GPA: u64 = 1 << 30;
    const VMM_SIZE: u64 = 2 * MIB;
    /// Memslot ids the example gives the listener: anything but the VMM's slot 0.
    const LISTENER_IDS: std::ops::Range<u32> = 1..32;

    pub fn kvm_usable() -> Result<(), String> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn check(checks: &mut Vec<String>, ok: bool, what: String) -> Result<(), String> {
        if ok {
            checks.push(what);
            Ok(())
        } else {
            Err(what)
        }
    }

    /// Syncs, and returns the WSS pages (page numbers relative to the WSS start) the Migration
    /// client now has dirty, taking (clearing) the client's bits.
    fn sync_and_take(memory: &MemorySystem, block: &RamBlock) -> Result<Vec<u64>, String> {
        memory
            .log_sync_all()
            .map_err(|e| format!("log_sync_all: {e}"))?;
        let mut dest = Bitmap::new(block.pages() as usize);
        memory.sync_migration_bitmap(block, &mut dest, None);
        let first = INFRA_END / PAGE_SIZE;
        let end = (INFRA_END + WSS) / PAGE_SIZE;
        Ok(dest
            .iter_ones()
            .map(|p| p as u64)
            .filter(|p| (first..end).contains(p))
            .map(|p| p - first)
            .collect())
    }

    /// Lets the guest run for `time`, or until it has written `min_pages` pages (then at most
    /// 30 s); returns the pages it wrote meanwhile (its own counter).
    fn round(
        runner: &VcpuRunner,
        monitor: &WorkloadMonitor<'_, RawGuestRam>,
        time: Duration,
        min_pages: u64,
    ) -> Result<u64, String> {
        let written = || monitor.pages_written().map_err(|e| e.to_string());
        let before = written()?;
        let start = Instant::now();
        runner.resume().map_err(|e| format!("resume: {e}"))?;
        while start.elapsed() < time
            || (written()? - before < min_pages && start.elapsed() < Duration::from_secs(30))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        runner.pause().map_err(|e| format!("pause: {e}"))?;
        Ok(written()? - before)
    }

    pub fn run() -> Result<Vec<String>, String> {
        let mut checks = Vec::new();

        // --- The VMM's side: its own kvm-ioctls VM and memslot. ---
        let kvm = Kvm::new().map_err(|e| format!("Kvm::new: {e}"))?;
        let vm_fd = kvm.create_vm().map_err(|e| format!("create_vm: {e}"))?;
        // kvm-ioctls' `VmFd` is passed as it is (`&vm_fd`: clearlog_kvm::AsKvmFd).
        let fd = &vm_fd;

        // Manual protect first: before any memslot logs dirty pages.
        let offered = clearlog_kvm::KvmCaps::probe(fd).manual_protect_flags;
        let flags = MANUAL_PROTECT_ENABLE | (offered & INITIALLY_SET);
        let mode = enable_manual_protect(fd, flags).map_err(|e| e.to_string())?;
        check(
            &mut checks,
            mode.is_manual(),
            format!("enable_manual_protect({flags:#x}) on the VMM's VM fd: mode {mode}"),
        )?;

        let vmm_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), VMM_SIZE as usize)])
            .map_err(|e| format!("VMM memory: {e}"))?;
        let vmm_host = vmm_mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| format!("VMM memory: {e}"))? as u64;
        let region = kvm_userspace_memory_region {
            slot: VMM_SLOT,
            flags: 0,
            guest_phys_addr: VMM_GPA,
            memory_size: VMM_SIZE,
            userspace_addr: vmm_host,
        };
        // SAFETY: `vmm_mem` maps VMM_SIZE bytes at `vmm_host` and is dropped after the VM (both
        // `vm_fd` and the `Vm`'s duplicate), so the mapping outlives the memslot.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(|e| format!("the VMM's own memslot: {e}"))?;

        // --- clearlog-kvm on that VM. ---
        let vm = Arc::new(Vm::from_fd(fd, mode).map_err(|e| e.to_string())?);
        check(
            &mut checks,
            vm.kvm().is_none() && vm.dirty_log_mode() == mode,
            format!(
                "Vm::from_fd: {} memslots offered, mode {}, no /dev/kvm opened",
                vm.caps().max_memslots,
                vm.dirty_log_mode()
            ),
        )?;
        let memory = MemorySystem::new();
        let ram: RegionId = memory
            .add_ram("ram0", 0, RAM)
            .map_err(|e| format!("add_ram: {e}"))?;
        let (block, _) = memory.region_block(ram).map_err(|e| e.to_string())?;
        let listener = Arc::new(
            KvmMemoryListener::with_slot_ids(vm.clone(), LISTENER_IDS)
                .map_err(|e| e.to_string())?,
        );
        memory
            .register_listener(listener.clone())
            .map_err(|e| format!("register_listener: {e}"))?;
        let slot = listener.slot_id_at(0).ok_or("no listener slot at GPA 0")?;
        check(
            &mut checks,
            LISTENER_IDS.contains(&slot) && vm.is_cache_slot(slot),
            format!("guest RAM is memslot {slot}, from the listener's ids {LISTENER_IDS:?}, next to the VMM's slot {VMM_SLOT}"),
        )?;

        // --- The guest: the increment workload on a vCPU the VMM makes from its own fds. ---
        // SAFETY: the block maps RAM bytes, page aligned, read-write, and `block` outlives `ram`;
        // the memory system accesses it through raw pointers only (no Rust reference into it).
        let guest_ram = unsafe { RawGuestRam::new(block.host_addr() as *mut u8, RAM) };
        let vcpu = Vcpu::from_fds(&kvm, &vm_fd, vm.caps(), 0).map_err(|e| e.to_string())?;
        let workload = Workload::new(WorkloadSpec::Increment {
            wss_bytes: WSS,
            dirty_rate_bytes_per_s: RATE,
        });
        let tsc_khz = vcpu.tsc_khz().map_err(|e| e.to_string())?;
        workload
            .load(&guest_ram, tsc_khz)
            .map_err(|e| format!("loading the workload: {e}"))?;
        vcpu.setup_ring3(&workload.entry(0).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let runner = VcpuRunner::spawn(vcpu).map_err(|e| e.to_string())?;
        let monitor = WorkloadMonitor::new(&guest_ram, 1);
        let result = (|| {
            monitor
                .wait_ready(Duration::from_secs(30))
                .map_err(|e| e.to_string())?;
            runner.pause().map_err(|e| format!("pause: {e}"))?;

            // Dirty logging on; with INITIALLY_SET every page starts dirty: sync and re-arm all.
            memory
                .log_global_start()
                .map_err(|e| format!("log_global_start: {e}"))?;
            let initial = sync_and_take(&memory, &block)?;
            memory
                .clear_dirty_bitmap(ram, 0, RAM)
                .map_err(|e| format!("clear_dirty_bitmap: {e}"))?;
            check(
                &mut checks,
                if mode
                    == (KvmDirtyLogMode::Manual {
                        initially_set: true,
                    })
                {
                    initial.len() as u64 == WSS_PAGES
                } else {
                    true
                },
                format!(
                    "first sync: {} WSS pages dirty, then the whole RAM re-armed",
                    initial.len()
                ),
            )?;
            let quiet = sync_and_take(&memory, &block)?;
            check(
                &mut checks,
                quiet.is_empty(),
                format!(
                    "paused guest, after the clear: {} WSS pages dirty (0 expected)",
                    quiet.len()
                ),
            )?;

            // Round 1: the cache reports exactly what the guest wrote.
            let written = round(&runner, &monitor, ROUND, 0)?;
            let dirty = sync_and_take(&memory, &block)?;
            let n = dirty.len() as u64;
            check(
                &mut checks,
                written > 0 && (written..=written + 1).contains(&n),
                format!("round 1: the workload counted {written} page writes, the sync found {n} dirty WSS pages"),
            )?;

            // Manual protect: a second GET still reports them (nothing was cleared).
            let again = sync_and_take(&memory, &block)?;
            check(
                &mut checks,
                again == dirty,
                format!(
                    "sync again without a clear: the same {} pages (a manual-mode GET only copies)",
                    again.len()
                ),
            )?;

            // Clear RAM up to the middle dirty page: only the pages above it stay dirty.
            let mid_gpa = INFRA_END + dirty[dirty.len() / 2] * PAGE_SIZE;
            let in_cleared = |p: &u64| INFRA_END + p * PAGE_SIZE < mid_gpa;
            let cleared_before = listener.stats().pages_cleared;
            memory
                .clear_dirty_bitmap(ram, 0, mid_gpa)
                .map_err(|e| format!("clear_dirty_bitmap: {e}"))?;
            let bits_cleared = listener.stats().pages_cleared - cleared_before;
            let expected: Vec<u64> = dirty.iter().copied().filter(|p| !in_cleared(p)).collect();
            let expected_cleared = dirty.iter().filter(|p| in_cleared(p)).count() as u64;
            let after = sync_and_take(&memory, &block)?;
            check(
                &mut checks,
                after == expected
                    && !after.is_empty()
                    && expected_cleared > 0
                    && bits_cleared >= expected_cleared,
                format!(
                    "clear of RAM [0, {mid_gpa:#x}): KVM cleared {bits_cleared} bits ({expected_cleared} \
                     of them WSS pages); exactly the {} dirty pages above it stay dirty",
                    after.len()
                ),
            )?;

            // Round 2, a full sweep: every WSS page is written again, and reported again, the
            // cleared ones included.
            let written = round(&runner, &monitor, ROUND, WSS_PAGES + 64)?;
            let dirty2 = sync_and_take(&memory, &block)?;
            let rewritten = dirty
                .iter()
                .filter(|p| in_cleared(p) && dirty2.contains(p))
                .count();
            check(
                &mut checks,
                written > WSS_PAGES
                    && dirty2.len() as u64 == WSS_PAGES
                    && rewritten as u64 == expected_cleared,
                format!(
                    "round 2: the workload counted {written} page writes (> {WSS_PAGES}, a full sweep), \
                     the sync found {} of {WSS_PAGES} WSS pages dirty, {rewritten} of the \
                     {expected_cleared} cleared ones reported again",
                    dirty2.len()
                ),
            )?;
            let stats = listener.stats();
            check(
                &mut checks,
                stats.syncs > 0 && stats.clears > 0,
                format!(
                    "listener stats: {} syncs ({} pages), {} clears ({} pages)",
                    stats.syncs, stats.pages_synced, stats.clears, stats.pages_cleared
                ),
            )?;
            Ok(())
        })();
        let stopped = runner
            .stop()
            .map(drop)
            .map_err(|e| format!("stopping the vCPU: {e}"));
        result.and(stopped)?;

        // Teardown in order: memslots of the listener, then the VM, then the VMM's memory.
        drop(memory);
        drop(listener);
        drop(vm);
        drop(vm_fd);
        drop(vmm_mem);
        Ok(checks)
    }
}
