// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the integration tests (real KVM).

#![allow(dead_code)]

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use clearlog_kvm::KvmMemoryListener;
use clearlog_kvm::{KvmDirtyLogMode, Vm, VmConfig};
use clearlog_memory::{
    DirtyClient, DirtyClients, DirtyMemory, ListenerError, MemoryListener, MemorySystem, RamBlock,
    RegionId, Section,
};
use clearlog_test_guest::guest_ram::{GuestRam, RawGuestRam};
use clearlog_test_guest::layout::{counter_slot_addr, PARAMS_ADDR};
use clearlog_test_guest::vcpu::runner::VcpuRunner;
use clearlog_test_guest::vcpu::Vcpu;
use clearlog_test_guest::workload::params::{C_SWEEPS, P_ITERATION, P_WSS_PAGES, P_WSS_START};
use clearlog_test_guest::workload::{Workload, WorkloadSpec};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Is a real KVM required (so that a test that cannot run must fail rather than skip)?
/// `CI=true` or `CLEARLOG_REQUIRE_KVM=1`.
pub fn kvm_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Returns true when the test can use /dev/kvm. Otherwise prints a loud SKIPPED line and
/// returns false, except that with CI=true or CLEARLOG_REQUIRE_KVM=1 an existing but
/// unusable /dev/kvm panics (and with CLEARLOG_REQUIRE_KVM=1 a missing one too).
pub fn kvm_available() -> bool {
    let dev = Path::new("/dev/kvm");
    let required = kvm_required();
    let explicit = std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1");
    if !dev.exists() {
        if explicit {
            panic!("CLEARLOG_REQUIRE_KVM=1 but /dev/kvm does not exist");
        }
        eprintln!("SKIPPED: /dev/kvm not available (no such device node; is a kvm module loaded?)");
        return false;
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => true,
        Err(e) if required => {
            panic!(
                "CI=true or CLEARLOG_REQUIRE_KVM=1, and /dev/kvm exists but cannot be opened: {e}"
            )
        }
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm not available ({e})");
            false
        }
    }
}

/// True when the kernel offers manual dirty-log protection with `INITIALLY_SET`. Otherwise
/// prints a loud SKIPPED line (or panics when KVM is required).
pub fn manual_available() -> bool {
    let caps = clearlog_kvm::KvmCaps::probe_device(Path::new("/dev/kvm")).expect("open /dev/kvm");
    if caps.manual_protect_flags & 3 == 3 {
        return true;
    }
    if kvm_required() {
        panic!(
            "KVM required but KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 offers {:#x}",
            caps.manual_protect_flags
        );
    }
    eprintln!("SKIPPED: manual dirty-log protection not offered by this kernel");
    false
}

/// Serializes tests that run vCPUs inside one test binary (2-core machine, rate checks).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM with one RAM region mapped from GPA 0.
#[derive(Debug)]
pub struct Guest {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
}

impl Guest {
    /// `size` bytes of RAM registered as memslot 0 from GPA 0.
    pub fn new(choice: Option<KvmDirtyLogMode>, size: u64, log_dirty: bool) -> Guest {
        let g = Guest::unmapped(choice, size);
        g.map(0, 0, size, log_dirty);
        g
    }

    /// A VM and RAM, with no memslot yet.
    pub fn unmapped(choice: Option<KvmDirtyLogMode>, size: u64) -> Guest {
        let vm = Vm::new(VmConfig {
            dirty_log: choice,
            ..Default::default()
        })
        .expect("Vm::new");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .expect("guest memory");
        Guest { vm, mem }
    }

    /// Registers `[gpa, gpa + size)` of the RAM as memslot `slot`.
    pub fn map(&self, slot: u32, gpa: u64, size: u64, log_dirty: bool) {
        let host = self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        // SAFETY: `self.mem` lives as long as `self.vm` (same struct, dropped after the VM's
        // users: tests stop vCPUs before dropping the Guest).
        unsafe { self.vm.set_memslot(slot, gpa, size, host, log_dirty) }.expect("set_memslot");
    }

    /// Host address of guest physical `gpa`.
    pub fn mem_host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// Loads `w` and starts its vCPUs.
    pub fn start(&self, w: &Workload) -> Vec<VcpuRunner> {
        let vcpus: Vec<Vcpu> = (0..w.vcpus())
            .map(|i| Vcpu::new(&self.vm, i).expect("Vcpu::new"))
            .collect();
        let tsc = vcpus[0].tsc_khz().expect("tsc_khz");
        w.load(&self.mem, tsc).expect("load");
        vcpus
            .into_iter()
            .map(|v| {
                v.setup_ring3(&w.entry(v.index()).unwrap())
                    .expect("setup_ring3");
                VcpuRunner::spawn(v).expect("spawn")
            })
            .collect()
    }
}

/// A guest program (run as an `Image` at 0x8000) that dirties pages on demand: whenever
/// the parameter block's `iteration` differs from the last value it handled, it writes the
/// first byte of every page of `[wss_start, wss_start + wss_pages * 4096)` and then stores
/// the iteration in its counter slot's `sweeps` field.
pub fn dirty_on_demand_image() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut wait = a.create_label();
    let mut page = a.create_label();
    let mut done = a.create_label();
    a.mov(qword_ptr(rsi + 16), 1).unwrap(); // ready
    a.xor(r12, r12).unwrap(); // last handled iteration
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.mov(rax, qword_ptr(rdi + P_ITERATION as i32)).unwrap();
    a.cmp(rax, r12).unwrap();
    a.je(wait).unwrap();
    a.mov(r12, rax).unwrap();
    a.mov(r8, qword_ptr(rdi + P_WSS_START as i32)).unwrap();
    a.mov(r9, qword_ptr(rdi + P_WSS_PAGES as i32)).unwrap();
    a.set_label(&mut page).unwrap();
    a.test(r9, r9).unwrap();
    a.jz(done).unwrap();
    a.mov(byte_ptr(r8), al).unwrap();
    a.add(r8, 4096).unwrap();
    a.dec(r9).unwrap();
    a.jmp(page).unwrap();
    a.set_label(&mut done).unwrap();
    a.mov(qword_ptr(rsi + C_SWEEPS as i32), r12).unwrap();
    a.jmp(wait).unwrap();
    a.assemble(0x8000).unwrap()
}

/// Drives [`dirty_on_demand_image`].
pub struct Dirtier<'a> {
    pub mem: &'a dyn GuestRam,
    pub round: u64,
}

impl std::fmt::Debug for Dirtier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dirtier")
            .field("round", &self.round)
            .finish_non_exhaustive()
    }
}

impl Dirtier<'_> {
    /// Has the guest write one byte into each page of `[gpa, gpa + pages * 4096)` and waits
    /// until it is done.
    pub fn dirty(&mut self, gpa: u64, pages: u64) {
        self.mem.store_u64(PARAMS_ADDR + P_WSS_START, gpa).unwrap();
        self.mem
            .store_u64(PARAMS_ADDR + P_WSS_PAGES, pages)
            .unwrap();
        self.round += 1;
        self.mem
            .store_u64(PARAMS_ADDR + P_ITERATION, self.round)
            .unwrap();
        let start = Instant::now();
        while self.mem.load_u64(counter_slot_addr(0) + C_SWEEPS).unwrap() != self.round {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "guest did not dirty pages"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Starts the on-demand dirtier on a guest whose RAM is at least 1 MiB.
pub fn start_dirtier(g: &Guest) -> VcpuRunner {
    let w = Workload::new(WorkloadSpec::Image {
        image: dirty_on_demand_image(),
        load_gpa: 0x8000,
        entry_gpa: 0x8000,
    });
    let mut r = g.start(&w);
    let mon = clearlog_test_guest::workload::monitor::WorkloadMonitor::new(&g.mem, 1);
    mon.wait_ready(Duration::from_secs(10))
        .expect("dirtier ready");
    r.pop().unwrap()
}

/// Bit `i` of a dirty bitmap.
pub fn bit(bm: &[u64], i: u64) -> bool {
    bm[(i / 64) as usize] >> (i % 64) & 1 == 1
}

/// Indices of the set bits among the first `n`.
pub fn set_bits(bm: &[u64], n: u64) -> Vec<u64> {
    (0..n).filter(|&i| bit(bm, i)).collect()
}

/// A VM whose memory map is a [`MemorySystem`] followed by a [`KvmMemoryListener`]: the way a
/// VMM uses this crate. The first RAM region (`low`) is mapped at GPA 0 and holds the guest
/// infrastructure (page tables, code, parameters, counters).
pub struct MemVm {
    pub vm: Arc<Vm>,
    pub memory: MemorySystem,
    pub listener: Arc<KvmMemoryListener>,
    pub low: RegionId,
    pub low_block: Arc<RamBlock>,
    /// Guest-physical view of `low` (GPA 0..low size).
    pub ram: RawGuestRam,
}

impl std::fmt::Debug for MemVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemVm")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl MemVm {
    /// A VM in `choice` mode with `low_size` bytes of RAM at GPA 0, listener registered.
    pub fn new(choice: Option<KvmDirtyLogMode>, low_size: u64) -> MemVm {
        let vm = Arc::new(
            Vm::new(VmConfig {
                dirty_log: choice,
                ..Default::default()
            })
            .expect("Vm::new"),
        );
        let memory = MemorySystem::new();
        let low = memory.add_ram("low", 0, low_size).expect("add_ram low");
        let listener = Arc::new(KvmMemoryListener::new(vm.clone()));
        memory
            .register_listener(listener.clone())
            .expect("register_listener");
        let low_block = memory.region_block(low).expect("low block").0;
        // SAFETY: `low_block` (an Arc kept in this struct next to `ram`) owns the mapping
        // `host_addr..host_addr + size`, page aligned, readable and writable, for as long as
        // `ram` exists; nothing forms a Rust reference into it (raw-pointer copies only).
        let ram = unsafe { RawGuestRam::new(low_block.host_addr() as *mut u8, low_block.size()) };
        MemVm {
            vm,
            memory,
            listener,
            low,
            low_block,
            ram,
        }
    }

    /// Loads `w` into `low` (after `prepare`, e.g. setting the iteration) and starts vCPU 0.
    pub fn start(&self, w: &Workload, prepare: impl FnOnce(&RawGuestRam)) -> VcpuRunner {
        self.start_vcpus(w, prepare).pop().expect("one vCPU")
    }

    /// [`start`](Self::start) on every vCPU of `w` (`Workload::with_vcpus`): they share its
    /// working set.
    #[allow(dead_code)]
    pub fn start_vcpus(&self, w: &Workload, prepare: impl FnOnce(&RawGuestRam)) -> Vec<VcpuRunner> {
        let vcpus: Vec<Vcpu> = (0..w.vcpus())
            .map(|i| Vcpu::new(&self.vm, i).expect("Vcpu::new"))
            .collect();
        let tsc = vcpus[0].tsc_khz().expect("tsc_khz");
        w.load(&self.ram, tsc).expect("load");
        prepare(&self.ram);
        let runners: Vec<VcpuRunner> = vcpus
            .into_iter()
            .map(|v| {
                v.setup_ring3(&w.entry(v.index()).unwrap())
                    .expect("setup_ring3");
                VcpuRunner::spawn_with_ring(v, ring_handler(&self.listener)).expect("spawn")
            })
            .collect();
        let mon =
            clearlog_test_guest::workload::monitor::WorkloadMonitor::new(&self.ram, w.vcpus());
        mon.wait_ready(Duration::from_secs(30))
            .expect("workload ready");
        runners
    }

    /// Starts the on-demand dirtier ([`dirty_on_demand_image`]); it can write anywhere in the
    /// first GiB of guest-physical space (the identity map covers it).
    pub fn start_dirtier(&self) -> VcpuRunner {
        let w = Workload::new(WorkloadSpec::Image {
            image: dirty_on_demand_image(),
            load_gpa: 0x8000,
            entry_gpa: 0x8000,
        });
        self.start(&w, |_| {})
    }

    /// The RAM block and Migration-client bits of `region` as block page numbers.
    pub fn client_pages(&self, region: RegionId, client: DirtyClient) -> Vec<u64> {
        let block = self.memory.region_block(region).unwrap().0;
        let first = block.ram_page_offset();
        let map = self.memory.dirty().client(client);
        (0..block.pages())
            .filter(|&p| map.test((first + p) as usize))
            .collect()
    }

    /// Replaces the registered listener by [`NaiveClear`] around it (which it returns).
    pub fn use_naive_clear(&self) -> Arc<dyn MemoryListener> {
        let l: Arc<dyn MemoryListener> = self.listener.clone();
        self.memory.unregister_listener(&l).unwrap();
        let n: Arc<dyn MemoryListener> = Arc::new(NaiveClear(self.listener.clone()));
        self.memory.register_listener(n.clone()).unwrap();
        n
    }

    /// Takes (and thereby clears) the Migration client's bits of `region`'s block.
    pub fn take_migration(&self, region: RegionId) -> Vec<u64> {
        let block = self.memory.region_block(region).unwrap().0;
        let mut dest = Bitmap::new(block.pages() as usize);
        self.memory.sync_migration_bitmap(&block, &mut dest, None);
        dest.iter_ones().map(|p| p as u64).collect()
    }
}

/// The `clearlog_kvm::Error` inside a memory-api listener error, if any.
pub fn kvm_error(e: &clearlog_memory::Error) -> Option<&clearlog_kvm::Error> {
    match e {
        clearlog_memory::Error::Listener { source, .. } => source.downcast_ref(),
        _ => None,
    }
}

/// A tiny xorshift PRNG for test schedules.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Ring mode: the vCPU's `KVM_EXIT_DIRTY_RING_FULL` handler (note the exit, reap through
/// `listener`); `None` for the bitmap modes.
#[allow(dead_code)]
pub fn ring_handler(
    listener: &Arc<KvmMemoryListener>,
) -> Option<clearlog_test_guest::vcpu::runner::RingFullHandler> {
    if !listener.vm().dirty_log_mode().is_ring() {
        return None;
    }
    let l = Arc::downgrade(listener);
    Some(Arc::new(move |index| {
        let l = l.upgrade().ok_or("listener gone")?;
        l.vm().note_ring_full_exit(index);
        l.reap_rings().map(|_| ()).map_err(|e| e.to_string())
    }))
}

/// Can this host give a dirty ring? Without it the ring tests skip loudly (and fail with
/// `CI=true`, like [`kvm_available`]).
#[allow(dead_code)]
pub fn ring_available() -> bool {
    let caps = clearlog_kvm::KvmCaps::probe_device("/dev/kvm".as_ref());
    match caps.ok().and_then(|c| clearlog_kvm::RingRange::of(&c)) {
        Some(_) => true,
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("KVM present but no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
        }
        None => {
            eprintln!("SKIPPED: no KVM dirty ring on this host");
            false
        }
    }
}

/// A listener that forwards everything to the real one except `log_clear`, which clears the
/// whole requested range in KVM (all ones, widened to 64 pages with zeros) without looking at
/// what the last sync reported: what each client clearing "its" bits on its own amounts to.
pub struct NaiveClear(pub Arc<KvmMemoryListener>);

impl MemoryListener for NaiveClear {
    fn name(&self) -> &str {
        "naive-kvm"
    }
    fn priority(&self) -> i32 {
        self.0.priority()
    }
    fn region_add(&self, s: &Section) -> Result<(), ListenerError> {
        self.0.region_add(s)
    }
    fn region_del(&self, s: &Section, d: &DirtyMemory) -> Result<(), ListenerError> {
        self.0.region_del(s, d)
    }
    fn log_start(
        &self,
        s: &Section,
        o: DirtyClients,
        n: DirtyClients,
    ) -> Result<(), ListenerError> {
        self.0.log_start(s, o, n)
    }
    fn log_stop(
        &self,
        s: &Section,
        o: DirtyClients,
        n: DirtyClients,
        d: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        self.0.log_stop(s, o, n, d)
    }
    fn log_sync(&self, s: &Section, d: &DirtyMemory) -> Result<(), ListenerError> {
        self.0.log_sync(s, d)
    }
    fn log_clear(&self, s: &Section, first: u64, npages: u64) -> Result<(), ListenerError> {
        if npages == 0 {
            return Ok(());
        }
        let slot = self.0.slot_id_at(s.guest_addr).ok_or("no slot")?;
        let start = first & !63;
        let end = (first + npages).next_multiple_of(64).min(s.pages());
        let mut bitmap = vec![0u64; (end - start).div_ceil(64) as usize];
        for p in first..first + npages {
            let b = p - start;
            bitmap[(b / 64) as usize] |= 1 << (b % 64);
        }
        clearlog_kvm::raw::clear_dirty_log(
            self.0.vm().as_fd(),
            slot,
            start,
            (end - start) as u32,
            &bitmap,
        )
        .map_err(|e| Box::new(e) as ListenerError)
    }
}
