// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A cloud-hypervisor-shaped VMM that migrates a real KVM guest with clearlog's engine, without
//! clearlog's memory API.
//!
//! ```text
//! cargo run --release -p clearlog-migration --example ch_shaped
//! ```
//!
//! The VMM is built the way cloud-hypervisor builds one: kvm-ioctls' `Kvm` and `VmFd`, guest
//! memory as vm-memory's own `GuestMemoryMmap<AtomicBitmap>` (two regions, one above 4 GiB),
//! memslots it creates and keeps with `set_user_memory_region`, dirty logging it turns on and off
//! itself (`start_dirty_log`/`stop_dirty_log`), a vCPU (the `increment` workload of
//! `clearlog-test-guest`, started in ring 3) and a "virtio" device thread that writes buffers
//! above 4 GiB through vm-memory (which marks its `AtomicBitmap`).
//!
//! clearlog adds, in the glue below: manual dirty-log protection on the VMM's `VmFd`
//! (`enable_manual_protect`), a `clearlog_kvm::VmmSlotCache` over the VMM's own memslots (the
//! per-slot cache that never clears a bit twice), and the engine's two traits,
//! `MigrationMemory` and `DirtyTracking`: a sync folds KVM's bits and the device's vm-memory bits
//! into one `clearlog_bitmap::AtomicBitmap` per region, the engine takes them from there and
//! re-arms each chunk through the cache right before it reads it.
//!
//! The source migrates to a destination VMM in another thread (its own VM, memory and memslots),
//! which receives paused; then the example compares the two memories byte for byte, checks the
//! guest's own increment rule on the destination and runs the destination guest for a moment.
//! The last line says whether the destination held exactly the source's memory at switchover;
//! the exit code is 0 only if it did (and everything else worked), 1 otherwise.
//!
//! `--forget-mark` makes the device also update a status page in low memory through its raw host
//! address, behind vm-memory's bitmap, every few milliseconds (a write the VMM forgets to mark).
//! The page is sent early in the first pass and changes after that, every time: the verification
//! must then fail, and `tests/examples.rs` asserts that it does.
//!
//! Adopter glue, the code lines between the `glue begin`/`glue end` markers (everything that is
//! not the example's own VMM or its report): 79 lines. `ch_shaped_glue_is_small` in
//! `tests/examples.rs` counts them.
//!
//! Without a usable `/dev/kvm` it prints a loud `SKIPPED` line and exits 0 (1 with `CI=true` or
//! `CLEARLOG_REQUIRE_KVM=1`); the test guest is x86-64 only, elsewhere it skips too.

use std::process::ExitCode;

#[cfg(target_arch = "x86_64")]
fn main() -> ExitCode {
    if let Err(why) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return skipped(&format!("/dev/kvm not available ({why})"));
    }
    let forget = std::env::args().any(|a| a == "--forget-mark");
    match run(forget) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("ch_shaped: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A source VMM running its guest, a destination VMM waiting, the migration, the checks.
#[cfg(target_arch = "x86_64")]
fn run(forget_mark: bool) -> Result<(), String> {
    let (src, dst) = (vmm::source(forget_mark)?, vmm::Vmm::new()?);
    let (sent, received) = glue::migrate(&src, &dst);
    report(sent, received, &src, &dst)
}

#[cfg(not(target_arch = "x86_64"))]
fn main() -> ExitCode {
    skipped("the test guest is x86-64 only")
}

fn skipped(why: &str) -> ExitCode {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1");
    eprintln!("SKIPPED: ch_shaped: {why}");
    if required {
        eprintln!("ch_shaped: FAILED: KVM is required here (CI=true or CLEARLOG_REQUIRE_KVM=1)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The VMM: nothing of clearlog's here but the test guest it runs.
#[cfg(target_arch = "x86_64")]
mod vmm {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use clearlog_test_guest::vcpu::runner::VcpuRunner;
    use clearlog_test_guest::vcpu::{Vcpu, VcpuState};
    use clearlog_test_guest::workload::check::check_increment;
    use clearlog_test_guest::workload::monitor::WorkloadMonitor;
    use clearlog_test_guest::workload::{Workload, WorkloadSpec};
    use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
    use kvm_ioctls::{Kvm, VmFd};
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    pub(crate) type Memory = GuestMemoryMmap<AtomicBitmap>;

    /// The guest's RAM: low memory with the guest program and its working set, and a region
    /// above 4 GiB that the device writes; memslot `i` is region `i`.
    pub(crate) const RAM: [(u64, u64); 2] = [(0, 48 << 20), (4 << 30, 8 << 20)];

    /// The increment workload's working set, written page after page at this rate.
    const WSS: u64 = 32 << 20;
    const RATE: u64 = 16 << 20;

    /// With `--forget-mark`, the page the device updates without marking it: below the guest's
    /// working set (which starts at 1 MiB) and above its stacks, so the guest never touches it.
    const FORGOTTEN_PAGE: u64 = 0xf_0000;

    /// The pause gate of the device thread (the vCPU runner has its own).
    #[derive(Default)]
    struct Gate {
        paused: Mutex<bool>,
        resumed: Condvar,
        stop: AtomicBool,
    }

    /// A VMM: its KVM handles, memory, memslots, vCPU and device.
    pub(crate) struct Vmm {
        pub(crate) kvm: Kvm,
        pub(crate) vm_fd: VmFd,
        pub(crate) mem: Memory,
        pub(crate) vcpu: Mutex<Option<VcpuRunner>>,
        /// A destination's vCPU, restored and not running yet.
        restored: Mutex<Option<Vcpu>>,
        device: Option<JoinHandle<()>>,
        gate: Arc<Gate>,
        /// The device's used-ring index: its state, migrated as a blob.
        pub(crate) used_idx: Arc<AtomicU64>,
    }

    impl Vmm {
        /// A VM with the memory and memslots (ids 0 and 1, one per region), no vCPU yet.
        pub(crate) fn new() -> Result<Vmm, String> {
            let kvm = Kvm::new().map_err(|e| format!("Kvm::new: {e}"))?;
            let vm_fd = kvm.create_vm().map_err(|e| format!("create_vm: {e}"))?;
            let ranges: Vec<_> = RAM
                .iter()
                .map(|&(a, s)| (GuestAddress(a), s as usize))
                .collect();
            let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| e.to_string())?;
            let vmm = Vmm {
                kvm,
                vm_fd,
                mem,
                vcpu: Mutex::new(None),
                restored: Mutex::new(None),
                device: None,
                gate: Arc::new(Gate::default()),
                used_idx: Arc::new(AtomicU64::new(0)),
            };
            vmm.set_memslots(false)?;
            Ok(vmm)
        }

        /// (Re-)registers every region as memslot `i`, logging or not.
        fn set_memslots(&self, log: bool) -> Result<(), String> {
            for (i, region) in self.mem.iter().enumerate() {
                let host = self.mem.get_host_address(region.start_addr()).unwrap() as u64;
                let r = kvm_userspace_memory_region {
                    slot: i as u32,
                    flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                    guest_phys_addr: region.start_addr().0,
                    memory_size: region.len(),
                    userspace_addr: host,
                };
                // SAFETY: `self.mem` maps the region at `host` and lives as long as the VM (the
                // memory is dropped with the VMM, after `vm_fd`, declared before it).
                unsafe { self.vm_fd.set_user_memory_region(r) }
                    .map_err(|e| format!("memslot {i}: {e}"))?;
            }
            Ok(())
        }

        /// cloud-hypervisor's `start_dirty_log`: every memslot logs from now on.
        pub(crate) fn start_dirty_log(&self) -> Result<(), String> {
            self.set_memslots(true)
        }

        /// cloud-hypervisor's `stop_dirty_log`.
        pub(crate) fn stop_dirty_log(&self) -> Result<(), String> {
            self.set_memslots(false)
        }

        /// The memslots: id, guest address, size, host address.
        pub(crate) fn memslots(&self) -> Vec<(u32, u64, u64, u64)> {
            let slot = |(i, &(gpa, size)): (usize, &(u64, u64))| {
                let host = self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
                (i as u32, gpa, size, host)
            };
            RAM.iter().enumerate().map(slot).collect()
        }

        /// The pages of memslot `slot` (region `slot`) the VMM's own writes dirtied since the
        /// last call (vm-memory's `AtomicBitmap`, read and reset: cloud-hypervisor's
        /// `dirty_log` does the same), one bit per page.
        pub(crate) fn vm_memory_dirty_log(&self, slot: u32) -> Vec<u64> {
            let gpa = RAM[slot as usize].0;
            let region = self.mem.find_region(GuestAddress(gpa)).unwrap();
            let mmap: &vm_memory::MmapRegion<AtomicBitmap> = region;
            mmap.bitmap().get_and_reset()
        }

        /// The VMM's snapshot of its vCPU and device (paused): named blobs.
        pub(crate) fn snapshot(&self) -> Result<Vec<(&'static str, Vec<u8>)>, String> {
            let idx = self.used_idx.load(Ordering::Relaxed);
            Ok(vec![
                ("vcpu0", self.vcpu_state()?),
                ("virtio", idx.to_le_bytes().to_vec()),
            ])
        }

        /// Boots the guest: loads the workload and starts its vCPU in ring 3.
        pub(crate) fn boot(&self) -> Result<(), String> {
            let vcpu = self.new_vcpu()?;
            let w = Workload::new(WorkloadSpec::Increment {
                wss_bytes: WSS,
                dirty_rate_bytes_per_s: RATE,
            });
            let tsc_khz = vcpu.tsc_khz().map_err(|e| e.to_string())?;
            w.load(&self.mem, tsc_khz).map_err(|e| e.to_string())?;
            vcpu.setup_ring3(&w.entry(0).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            self.run(vcpu)?;
            WorkloadMonitor::new(&self.mem, 1)
                .wait_ready(Duration::from_secs(30))
                .map_err(|e| e.to_string())
        }

        fn new_vcpu(&self) -> Result<Vcpu, String> {
            let caps = clearlog_kvm::KvmCaps::probe(&self.vm_fd);
            Vcpu::from_fds(&self.kvm, &self.vm_fd, &caps, 0).map_err(|e| e.to_string())
        }

        fn run(&self, vcpu: Vcpu) -> Result<(), String> {
            let runner = VcpuRunner::spawn(vcpu).map_err(|e| e.to_string())?;
            *self.vcpu.lock().unwrap() = Some(runner);
            Ok(())
        }

        /// Starts the "virtio" device: it fills a buffer above 4 GiB through vm-memory, then
        /// publishes a used-ring entry; with `forget`, it also writes its index into
        /// [`FORGOTTEN_PAGE`] through the raw host address, so vm-memory's bitmap never hears of
        /// it.
        pub(crate) fn start_device(&mut self, forget: bool) {
            let (mem, gate, used_idx) =
                (self.mem.clone(), self.gate.clone(), self.used_idx.clone());
            self.device = Some(std::thread::spawn(move || {
                let (base, size) = RAM[1];
                while !gate.stop.load(Ordering::Acquire) {
                    let paused = gate.paused.lock().unwrap();
                    let wait = Duration::from_millis(5);
                    let (paused, _) = gate
                        .resumed
                        .wait_timeout_while(paused, wait, |p| *p)
                        .unwrap();
                    if *paused || gate.stop.load(Ordering::Acquire) {
                        continue;
                    }
                    let idx = used_idx.fetch_add(1, Ordering::Relaxed);
                    let buf = GuestAddress(base + 4096 + (idx * 7919 % (size / 4096 - 1)) * 4096);
                    let data = (idx + 1).to_le_bytes().repeat(512);
                    mem.write_slice(&data, buf).unwrap();
                    if forget {
                        let host = mem.get_host_address(GuestAddress(FORGOTTEN_PAGE)).unwrap();
                        // SAFETY: a whole page inside a region of `mem`, which this thread keeps
                        // mapped (a clone); guest memory is written behind Rust's back (raw
                        // pointer, no reference), as a vhost-user backend would.
                        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) };
                    }
                    mem.write_obj(idx, GuestAddress(base + (idx % 512) * 8))
                        .unwrap();
                    drop(paused);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }));
        }

        /// Pauses the vCPU and the device (the device finishes its write in flight).
        pub(crate) fn pause(&self) -> Result<(), String> {
            *self.gate.paused.lock().unwrap() = true;
            match &*self.vcpu.lock().unwrap() {
                Some(r) => r.pause().map_err(|e| e.to_string()),
                None => Ok(()),
            }
        }

        /// Resumes the vCPU (a restored destination's starts) and the device.
        pub(crate) fn resume(&self) -> Result<(), String> {
            *self.gate.paused.lock().unwrap() = false;
            self.gate.resumed.notify_all();
            if let Some(vcpu) = self.restored.lock().unwrap().take() {
                return self.run(vcpu);
            }
            match &*self.vcpu.lock().unwrap() {
                Some(r) => r.resume().map_err(|e| e.to_string()),
                None => Ok(()),
            }
        }

        /// The vCPU's state (the vCPU is paused).
        pub(crate) fn vcpu_state(&self) -> Result<Vec<u8>, String> {
            let runner = self.vcpu.lock().unwrap();
            let runner = runner.as_ref().ok_or("no vCPU")?;
            let state = runner
                .with_vcpu(|v| v.save_state())
                .map_err(|e| e.to_string())?;
            Ok(state.map_err(|e| e.to_string())?.to_bytes())
        }

        /// A destination: restores the snapshot's vCPU (not running until
        /// [`resume`](Self::resume)) and device state.
        pub(crate) fn restore<'a>(
            &self,
            snapshot: impl Iterator<Item = (&'a str, &'a [u8])>,
        ) -> Result<(), String> {
            for (name, data) in snapshot {
                match name {
                    "vcpu0" => {
                        let state = VcpuState::from_bytes(data).map_err(|e| e.to_string())?;
                        let vcpu = self.new_vcpu()?;
                        vcpu.restore_state(&state).map_err(|e| e.to_string())?;
                        *self.restored.lock().unwrap() = Some(vcpu);
                    }
                    "virtio" => {
                        let idx = data.try_into().map_err(|_| "virtio state: 8 bytes")?;
                        self.used_idx
                            .store(u64::from_le_bytes(idx), Ordering::Relaxed);
                    }
                    other => return Err(format!("unknown state `{other}`")),
                }
            }
            Ok(())
        }

        /// Runs the guest for `time` (a restored destination's starts now); the pages its
        /// workload wrote meanwhile.
        pub(crate) fn run_for(&self, time: Duration) -> Result<u64, String> {
            let mon = WorkloadMonitor::new(&self.mem, 1);
            let before = mon.pages_written().map_err(|e| e.to_string())?;
            self.resume()?;
            std::thread::sleep(time);
            self.pause()?;
            Ok(mon.pages_written().map_err(|e| e.to_string())? - before)
        }

        /// The guest's own check of its memory: the increment rule.
        pub(crate) fn increment_ok(&self) -> Result<bool, String> {
            Ok(check_increment(&self.mem)
                .map_err(|e| e.to_string())?
                .is_consistent())
        }
    }

    /// A source VMM: the guest booted and running for a second (its working set fills with
    /// data), the device writing.
    pub(crate) fn source(forget_mark: bool) -> Result<Vmm, String> {
        let mut vmm = Vmm::new()?;
        vmm.boot()?;
        vmm.start_device(forget_mark);
        std::thread::sleep(Duration::from_secs(1));
        Ok(vmm)
    }

    impl Drop for Vmm {
        fn drop(&mut self) {
            self.gate.stop.store(true, Ordering::Release);
            self.gate.resumed.notify_all();
            if let Some(d) = self.device.take() {
                let _ = d.join();
            }
            if let Some(r) = self.vcpu.lock().unwrap().take() {
                let _ = r.stop();
            }
        }
    }

    /// Pages whose bytes differ between two memories of the same layout.
    pub(crate) fn differing_pages(a: &Memory, b: &Memory) -> u64 {
        let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
        let mut differing = 0;
        for region in a.iter() {
            for page in 0..region.len() / 4096 {
                let addr = GuestAddress(region.start_addr().0 + page * 4096);
                a.read_slice(&mut pa, addr).unwrap();
                b.read_slice(&mut pb, addr).unwrap();
                differing += u64::from(pa != pb);
            }
        }
        differing
    }
}

/// What the migration did, and whether the destination holds the source's memory: prints it,
/// `Ok` only if everything worked.
#[cfg(target_arch = "x86_64")]
fn report(
    sent: clearlog_migration::Result<clearlog_migration::MigrationStats>,
    received: clearlog_migration::Result<clearlog_migration::IncomingStats>,
    src: &vmm::Vmm,
    dst: &vmm::Vmm,
) -> Result<(), String> {
    let equal = |n: u64| match n {
        0 => "yes".to_string(),
        n => format!("NO ({n} pages differ)"),
    };
    let (stats, incoming) = match (sent, received) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => {
            println!(
                "migration failed: source {:?}, destination {:?}",
                s.err(),
                d.err()
            );
            let n = vmm::differing_pages(&src.mem, &dst.mem);
            println!(
                "destination memory is byte-equal to the source's at switchover: {}",
                equal(n)
            );
            return Err("the migration failed".into());
        }
    };
    println!(
        "migrated {} MiB in {:.0} ms ({} iterations, {} pages re-sent, downtime {:.1} ms, \
         mode {}); destination loaded {} pages",
        stats.guest_mem_bytes >> 20,
        stats.total_time_ms,
        stats.iterations,
        stats.resent_pages,
        stats.downtime_ms,
        stats.mode,
        incoming.pages_received,
    );
    let differing = vmm::differing_pages(&src.mem, &dst.mem);
    let increment = dst.increment_ok()?;
    println!("the guest's increment rule holds on the destination: {increment}");
    let progress = dst.run_for(std::time::Duration::from_millis(200))?;
    println!("the destination guest ran on: {progress} pages written in 200 ms");
    println!(
        "destination memory is byte-equal to the source's at switchover: {}",
        equal(differing)
    );
    if differing != 0 || !increment || progress == 0 {
        return Err("the destination does not hold the source's guest".into());
    }
    Ok(())
}

// --- glue begin ---
#[cfg(target_arch = "x86_64")]
mod glue {
    use clearlog_kvm::{MemSlot, VmmSlotCache};
    use clearlog_migration::{
        mem_channel, Bitmap, BoxError, CancelToken, ClearBitmap, Destination, DirtyTracking,
        IncomingStats, MemoryResult, MigrationConfig, MigrationMemory, MigrationStats, Result,
        Source, StateBlob, VmControl, VmRestore, PAGE_SIZE,
    };

    use crate::vmm::{Memory, Vmm};

    /// A source's memory: the VMM's own `GuestMemoryMmap`, its memslots with our cache.
    struct Tracked<'a>(&'a Vmm, VmmSlotCache);
    impl MigrationMemory for Tracked<'_> {
        type Block = <Memory as MigrationMemory>::Block;
        fn blocks(&self) -> Vec<Self::Block> {
            self.0.mem.blocks()
        }
    }
    impl DirtyTracking for Tracked<'_> {
        fn start_logging(&self) -> MemoryResult<()> {
            self.0.start_dirty_log()?;
            for (slot, gpa, size, host) in self.0.memslots() {
                self.1.track(slot, MemSlot::new(gpa, size, host, true))?;
            }
            Ok(())
        }
        fn stop_logging(&self) -> MemoryResult<()> {
            self.1.untrack_all()?;
            Ok(self.0.stop_dirty_log()?)
        }
        /// KVM's bits, then the VMM's own writes, from vm-memory's bitmap. A vhost-user
        /// backend's dirty log is marked here too, read and reset the same way.
        fn sync_dirty(&self) -> MemoryResult<()> {
            self.1.sync_all()?;
            for (slot, ..) in self.0.memslots() {
                self.1.mark(slot, &self.0.vm_memory_dirty_log(slot))?;
            }
            Ok(())
        }
        fn take_dirty(
            &self,
            block: &Self::Block,
            dest: &mut Bitmap,
            clear: Option<&mut ClearBitmap>,
        ) -> MemoryResult<u64> {
            Ok(self.1.take(block.index() as u32, dest, clear)?)
        }
        fn clear_dirty(&self, block: &Self::Block, offset: u64, len: u64) -> MemoryResult<()> {
            let (slot, pages) = (block.index() as u32, len.div_ceil(PAGE_SIZE));
            Ok(self.1.clear(slot, offset / PAGE_SIZE, pages).map(drop)?)
        }
    }

    /// The VMM's pause, resume, snapshot and restore, for the engine.
    impl VmControl for Vmm {
        fn pause(&self) -> std::result::Result<(), BoxError> {
            Ok(self.pause()?)
        }
        fn resume(&self) -> std::result::Result<(), BoxError> {
            Ok(self.resume()?)
        }
        fn save_state(&self) -> std::result::Result<Vec<StateBlob>, BoxError> {
            Ok(self.snapshot()?.into_iter().map(StateBlob::from).collect())
        }
    }
    impl VmRestore for Vmm {
        fn restore_state(&self, blobs: &[StateBlob]) -> std::result::Result<(), BoxError> {
            Ok(self.restore(blobs.iter().map(|b| (b.name.as_str(), &b.data[..])))?)
        }
        fn resume(&self) -> std::result::Result<(), BoxError> {
            Ok(self.resume()?)
        }
    }

    /// Migrates `src`'s guest into `dst` (which stays paused): what each side reports.
    pub(crate) fn migrate(src: &Vmm, dst: &Vmm) -> (Result<MigrationStats>, Result<IncomingStats>) {
        // Before the VMM's memslots log: manual protection on its VM fd, our cache over them.
        let tracked = Tracked(src, VmmSlotCache::from_vm_fd(&src.vm_fd).expect("a KVM VM"));
        let config = MigrationConfig::default().with_bandwidth_limit_bytes_per_s(64 << 20);
        let (tx, rx) = mem_channel();
        std::thread::scope(|s| {
            let incoming = s.spawn(|| Destination::new(&dst.mem).receive_paused(rx, dst));
            let sent = Source::new(&tracked, config)
                .and_then(|s| s.migrate(tx, src, None, &CancelToken::new()));
            (sent, incoming.join().unwrap())
        })
    }
}
// --- glue end ---
