// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `Guest`: a whole test guest assembled from the pieces of this crate, `clearlog-kvm` and
//! `clearlog-memory`.
//!
//! A [`MemorySystem`] with one RAM region at guest-physical 0, a [`Vm`] with the chosen dirty-log
//! mode, a [`KvmMemoryListener`] turning the region into a memslot, vCPUs started in 64-bit ring 3
//! and a [`Workload`] program. This is what the `vmm` CLI and the migration tests run; a VMM with
//! its own devices would assemble the same pieces itself.
//!
//! A guest is either booted here ([`Guest::boot`]: the workload is loaded and started) or created
//! empty as a migration destination ([`Guest::create`], then RAM arrives from a stream, then
//! [`Guest::restore_vcpus`] and [`Guest::resume`]).
//!
//! # Example
//! ```
//! # if clearlog_kvm::doctest_kvm_skip("guest.rs") { return; }
//! use clearlog_test_guest::{Guest, GuestConfig};
//! use clearlog_test_guest::workload::WorkloadSpec;
//!
//! let guest = Guest::boot(GuestConfig {
//!     mem_bytes: 256 << 20,
//!     workload: WorkloadSpec::Random { wss_bytes: 128 << 20, dirty_rate_bytes_per_s: 64 << 20, seed: 1 },
//!     ..GuestConfig::default()
//! })
//! .unwrap();
//! std::thread::sleep(std::time::Duration::from_millis(100));
//! println!("{} pages written", guest.pages_written().unwrap());
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clearlog_memory::{MemorySystem, RamBlock};

use clearlog_kvm::{
    KvmDirtyLogMode, KvmMemoryListener, RingReaper, Vm, VmConfig, RING_REAP_INTERVAL,
};

use crate::guest_ram::{GuestRam, RawGuestRam};
use crate::layout;
use crate::vcpu::runner::{RingFullHandler, RunState, VcpuKicker, VcpuRunner};
use crate::vcpu::state::VcpuState;
use crate::vcpu::Vcpu;
use crate::workload::monitor::WorkloadMonitor;
use crate::workload::{Workload, WorkloadSpec};
use crate::{Error, Result, PAGE_SIZE};

/// Name of the guest's single RAM block (it names the block in migration streams too).
pub const RAM_BLOCK_NAME: &str = "ram0";

/// Prefix of the vCPU state blobs: `vcpu0`, `vcpu1`, ...
pub const VCPU_BLOB_PREFIX: &str = "vcpu";

/// What to build.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Guest RAM in bytes: a multiple of 2 MiB, at least 2 MiB, at most [`layout::MAX_RAM`]
    /// (1 TiB). The guest itself can only touch the first [`layout::IDENTITY_MAP_LIMIT`]
    /// (127 GiB): the workload's working set must lie there ([`Guest::boot`] fails otherwise).
    pub mem_bytes: u64,
    /// Number of vCPUs (the workload runs on each).
    pub vcpus: u32,
    /// Dirty-log mode of the VM.
    pub dirty_log: Option<KvmDirtyLogMode>,
    /// The guest program.
    pub workload: WorkloadSpec,
    /// How long [`Guest::boot`] waits for the workload to pre-fault its working set.
    pub ready_timeout: Duration,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 256 << 20,
            vcpus: 1,
            dirty_log: None,
            workload: WorkloadSpec::Idle,
            ready_timeout: Duration::from_secs(60),
        }
    }
}

enum VcpuSet {
    /// Created (and maybe set up or restored), not running.
    Idle(Vec<Vcpu>),
    /// Running on their threads (or paused there).
    Running(Vec<VcpuRunner>),
}

/// A running (or ready-to-run) guest. See the module docs.
pub struct Guest {
    // Field order is drop order: vCPUs stop before the memslots go, memslots before the RAM.
    vcpus: Mutex<VcpuSet>,
    /// Ring mode: the background reaper of the vCPU rings.
    _reaper: Option<RingReaper>,
    listener: Arc<KvmMemoryListener>,
    memory: Arc<MemorySystem>,
    vm: Arc<Vm>,
    block: Arc<RamBlock>,
    ram: RawGuestRam,
    mem_bytes: u64,
    tsc_khz: AtomicU32,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("mem_bytes", &self.mem_bytes)
            .field("mode", &self.vm.dirty_log_mode())
            .finish_non_exhaustive()
    }
}

impl Guest {
    /// Create the VM, its RAM (registered as a memslot) and `vcpus` vCPUs, without running anything.
    /// A migration destination starts here.
    ///
    /// # Errors
    /// A size that is not a 2 MiB multiple or too large, `/dev/kvm` problems, memslot or mmap errors.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("create") { return; }
    /// let g = clearlog_test_guest::Guest::create(Default::default()).unwrap();
    /// assert_eq!(g.mem_bytes(), 256 << 20);
    /// ```
    pub fn create(config: GuestConfig) -> Result<Self> {
        let mem = config.mem_bytes;
        if mem == 0 || mem % (2 << 20) != 0 || mem > layout::MAX_RAM {
            return Err(Error::Layout(format!(
                "guest RAM must be a multiple of 2 MiB between 2 MiB and {} GiB, got {mem} bytes",
                layout::MAX_RAM >> 30
            )));
        }
        if config.vcpus > layout::MAX_VCPUS {
            return Err(Error::Layout(format!(
                "vCPU count must be 0..={}, got {}",
                layout::MAX_VCPUS,
                config.vcpus
            )));
        }
        let vm = Arc::new(Vm::new(VmConfig {
            dirty_log: config.dirty_log,
            ..VmConfig::default()
        })?);
        let memory = Arc::new(MemorySystem::with_ram_capacity(
            mem.next_multiple_of(64 * PAGE_SIZE),
        ));
        let region = memory
            .add_ram(RAM_BLOCK_NAME, 0, mem)
            .map_err(Error::Memory)?;
        let (block, _) = memory.region_block(region).map_err(Error::Memory)?;
        let listener = Arc::new(KvmMemoryListener::new(vm.clone()));
        memory
            .register_listener(listener.clone())
            .map_err(Error::Memory)?;
        // SAFETY: the block's mapping of `mem` bytes is page-aligned, readable and writable, and
        // lives as long as `block`, which this struct holds for as long as `ram`. Nothing forms a
        // Rust reference into it: the memory system and vm-memory (a migration's copies) access it
        // through raw pointers only, which `RawGuestRam`'s docs allow (their copies may overlap a
        // store made through `ram`: the shared-memory case described there).
        let ram = unsafe { RawGuestRam::new(block.host_addr() as *mut u8, mem) };
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            vcpus.push(Vcpu::new(&vm, i)?);
        }
        // A destination may start without vCPUs (they come with the state blobs); the TSC rate
        // is only needed to load a workload.
        let tsc_khz = match vcpus.first() {
            Some(v) => v.tsc_khz()?,
            None => 0,
        };
        let reaper = if vm.dirty_log_mode().is_ring() {
            Some(listener.start_ring_reaper(RING_REAP_INTERVAL)?)
        } else {
            None
        };
        Ok(Self {
            vcpus: Mutex::new(VcpuSet::Idle(vcpus)),
            _reaper: reaper,
            listener,
            memory,
            vm,
            block,
            ram,
            mem_bytes: mem,
            tsc_khz: AtomicU32::new(tsc_khz),
        })
    }

    /// Create the guest, load its workload, start the vCPUs and wait until the workload has
    /// pre-faulted its working set.
    ///
    /// # Example
    /// ```
    /// # if clearlog_kvm::doctest_kvm_skip("boot") { return; }
    /// let g = clearlog_test_guest::Guest::boot(Default::default()).unwrap();
    /// ```
    pub fn boot(config: GuestConfig) -> Result<Self> {
        let timeout = config.ready_timeout;
        let workload = Workload::new(config.workload.clone()).with_vcpus(config.vcpus);
        // Before creating anything: a working set the identity map does not cover fails here.
        workload.validate(config.mem_bytes)?;
        let guest = Self::create(config)?;
        // Boot-time writes go straight to RAM: no dirty logging is on yet, so nothing can be missed.
        workload.load(&guest.ram, guest.tsc_khz())?;
        {
            let mut set = guest.lock_vcpus();
            let VcpuSet::Idle(vcpus) = &*set else {
                unreachable!("a new guest's vCPUs are idle")
            };
            for v in vcpus {
                v.setup_ring3(&workload.entry(v.index())?)?;
            }
            Self::start(&mut set, guest.ring_handler(), &guest.listener)?;
        }
        if workload.spec().wss_bytes() > 0 {
            guest.monitor().wait_ready(timeout)?;
        }
        Ok(guest)
    }

    fn lock_vcpus(&self) -> MutexGuard<'_, VcpuSet> {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ring-full handler of this guest's vCPUs (ring mode): note the exit, reap the rings.
    fn ring_handler(&self) -> Option<RingFullHandler> {
        if !self.vm.dirty_log_mode().is_ring() {
            return None;
        }
        let listener = Arc::downgrade(&self.listener);
        Some(Arc::new(move |index| {
            let l = listener.upgrade().ok_or("the memory listener is gone")?;
            l.vm().note_ring_full_exit(index);
            l.reap_rings().map(|_| ()).map_err(|e| e.to_string())
        }))
    }

    fn start(
        set: &mut VcpuSet,
        ring: Option<RingFullHandler>,
        listener: &KvmMemoryListener,
    ) -> Result<()> {
        if let VcpuSet::Idle(vcpus) = set {
            let mut runners = Vec::new();
            for v in std::mem::take(vcpus) {
                runners.push(VcpuRunner::spawn_with_ring(v, ring.clone())?);
            }
            if ring.is_some() {
                // Every ring sync kicks the vCPUs first, so PML-buffered entries reach the rings.
                let kickers: Vec<VcpuKicker> = runners.iter().map(|r| r.kicker()).collect();
                listener.set_ring_kick(Arc::new(move || {
                    for k in &kickers {
                        k.kick();
                    }
                }));
            }
            *set = VcpuSet::Running(runners);
        }
        Ok(())
    }

    /// The memory system (for migration and dirty-memory clients).
    pub fn memory(&self) -> &Arc<MemorySystem> {
        &self.memory
    }

    /// The KVM memory listener (dirty-log stats, caches).
    pub fn listener(&self) -> &Arc<KvmMemoryListener> {
        &self.listener
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The RAM block.
    pub fn block(&self) -> &Arc<RamBlock> {
        &self.block
    }

    /// Direct, untracked access to guest RAM (counters, parameters, checks). Writes through it
    /// are NOT dirty-tracked: use [`RamBlock::write`] for writes that must be.
    pub fn ram(&self) -> &RawGuestRam {
        &self.ram
    }

    /// Guest RAM size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The dirty-log mode in use.
    pub fn dirty_log_mode(&self) -> KvmDirtyLogMode {
        self.vm.dirty_log_mode()
    }

    /// Guest TSC frequency in kHz (0 on a destination until its vCPUs are restored).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz.load(Ordering::Relaxed)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        match &*self.lock_vcpus() {
            VcpuSet::Idle(v) => v.len() as u32,
            VcpuSet::Running(r) => r.len() as u32,
        }
    }

    /// Workload progress counters.
    pub fn monitor(&self) -> WorkloadMonitor<'_, RawGuestRam> {
        WorkloadMonitor::new(&self.ram, self.vcpu_count())
    }

    /// Pages written by the workload so far (all vCPUs).
    pub fn pages_written(&self) -> Result<u64> {
        self.monitor().pages_written()
    }

    /// vCPUs whose thread ended on an exit it could not handle, with the reason.
    pub fn vcpu_failures(&self) -> Vec<(u32, String)> {
        match &*self.lock_vcpus() {
            VcpuSet::Idle(_) => Vec::new(),
            VcpuSet::Running(runners) => runners
                .iter()
                .filter_map(|r| match r.state() {
                    RunState::Failed(why) => Some((r.index(), why)),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Pause every vCPU (returns when all are out of `KVM_RUN`).
    ///
    /// # Errors
    ///
    /// The first vCPU that cannot be paused. The vCPUs this call already paused are resumed
    /// first (and a pause asked of the failing one is withdrawn), so a failed pause leaves the
    /// guest running as before; vCPUs that were paused before the call stay paused.
    pub fn pause(&self) -> Result<()> {
        let set = self.lock_vcpus();
        let VcpuSet::Running(runners) = &*set else {
            return Ok(());
        };
        let mut paused_here: Vec<&VcpuRunner> = Vec::new();
        for r in runners {
            if r.state() == RunState::Paused {
                continue;
            }
            if let Err(e) = r.pause() {
                r.cancel_pause();
                for p in paused_here.iter().rev() {
                    if let Err(re) = p.resume() {
                        tracing::error!(vcpu = p.index(), error = %re, "resuming a vCPU after a failed pause");
                    }
                }
                tracing::warn!(vcpu = r.index(), error = %e, resumed = paused_here.len(), "pause failed: the vCPUs it had paused run again");
                return Err(e);
            }
            paused_here.push(r);
        }
        Ok(())
    }

    /// Resume the vCPUs; vCPUs never started (a destination) start now.
    ///
    /// Resumes every paused vCPU (and withdraws pauses asked for but not reached), also after a
    /// failed [`pause`](Self::pause); failed vCPUs are skipped. Tries them all and returns the
    /// first error.
    pub fn resume(&self) -> Result<()> {
        let mut set = self.lock_vcpus();
        match &mut *set {
            VcpuSet::Idle(_) => Self::start(&mut set, self.ring_handler(), &self.listener),
            VcpuSet::Running(runners) => {
                let mut first = Ok(());
                for r in runners.iter() {
                    if r.state() == RunState::Paused {
                        if let Err(e) = r.resume() {
                            tracing::error!(vcpu = r.index(), error = %e, "resuming a vCPU");
                            first = first.and(Err(e));
                        }
                    } else {
                        r.cancel_pause();
                    }
                }
                first
            }
        }
    }

    /// The counters of each running vCPU (defaults for vCPUs not started yet).
    pub fn vcpu_stats(&self) -> Vec<crate::vcpu::runner::RunStats> {
        match &*self.lock_vcpus() {
            VcpuSet::Idle(v) => vec![Default::default(); v.len()],
            VcpuSet::Running(r) => r.iter().map(VcpuRunner::stats).collect(),
        }
    }

    /// The state of each vCPU thread (`Paused` for vCPUs not started yet).
    pub fn vcpu_states(&self) -> Vec<RunState> {
        match &*self.lock_vcpus() {
            VcpuSet::Idle(v) => vec![RunState::Paused; v.len()],
            VcpuSet::Running(r) => r.iter().map(VcpuRunner::state).collect(),
        }
    }

    /// Fault injection, for testing failure paths (a migration engine's pause handling): the
    /// next pause of running vCPU `vcpu` fails ([`Error::Injected`]) without pausing it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] if the vCPUs are not running or there is no such vCPU.
    pub fn inject_pause_failure(&self, vcpu: u32) -> Result<()> {
        match &*self.lock_vcpus() {
            VcpuSet::Running(r) => r
                .iter()
                .find(|r| r.index() == vcpu)
                .map(VcpuRunner::inject_pause_failure)
                .ok_or_else(|| Error::InvalidState(format!("no running vCPU {vcpu}"))),
            VcpuSet::Idle(_) => Err(Error::InvalidState("the vCPUs are not running".into())),
        }
    }

    /// Save every vCPU's state as `(name, bytes)` blobs (`vcpu0`, ...). The vCPUs must be paused.
    pub fn save_vcpus(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let set = self.lock_vcpus();
        let mut out = Vec::new();
        match &*set {
            VcpuSet::Idle(vcpus) => {
                for v in vcpus {
                    out.push((
                        format!("{VCPU_BLOB_PREFIX}{}", v.index()),
                        v.save_state()?.to_bytes(),
                    ));
                }
            }
            VcpuSet::Running(runners) => {
                for r in runners {
                    let state = r.with_vcpu(|v| v.save_state())??;
                    out.push((format!("{VCPU_BLOB_PREFIX}{}", r.index()), state.to_bytes()));
                }
            }
        }
        Ok(out)
    }

    /// Restore vCPU states from blobs named `vcpu0`, `vcpu1`, ... (other names are ignored).
    /// The guest must not have started; one blob is needed per vCPU. A guest created with 0 vCPUs
    /// (a migration destination) creates one per blob first.
    pub fn restore_vcpus(&self, blobs: &[(String, Vec<u8>)]) -> Result<()> {
        let mut set = self.lock_vcpus();
        let VcpuSet::Idle(vcpus) = &mut *set else {
            return Err(Error::InvalidState(
                "cannot restore vCPUs of a guest that already ran".into(),
            ));
        };
        if vcpus.is_empty() {
            let count = blobs
                .iter()
                .filter(|(n, _)| vcpu_blob_index(n).is_some())
                .count() as u32;
            if count == 0 || count > layout::MAX_VCPUS {
                return Err(Error::InvalidState(format!(
                    "the stream carries {count} vCPU states; expected 1..={}",
                    layout::MAX_VCPUS
                )));
            }
            for i in 0..count {
                vcpus.push(Vcpu::new(&self.vm, i)?);
            }
        }
        if let Some(v) = vcpus.first() {
            self.tsc_khz.store(v.tsc_khz()?, Ordering::Relaxed);
        }
        for v in vcpus.iter() {
            let name = format!("{VCPU_BLOB_PREFIX}{}", v.index());
            let (_, bytes) = blobs.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                Error::InvalidState(format!("no state blob `{name}` for vCPU {}", v.index()))
            })?;
            v.restore_state(&VcpuState::from_bytes(bytes)?)?;
        }
        let extra = blobs
            .iter()
            .filter(|(n, _)| vcpu_blob_index(n).is_some_and(|i| i as usize >= vcpus.len()))
            .count();
        if extra > 0 {
            return Err(Error::InvalidState(format!(
                "the stream has {extra} more vCPU state(s) than this guest's {} vCPU(s)",
                vcpus.len()
            )));
        }
        Ok(())
    }

    /// Stop the vCPU threads (the guest can't run again).
    pub fn shutdown(&self) -> Result<()> {
        let mut set = self.lock_vcpus();
        if let VcpuSet::Running(runners) = &mut *set {
            let mut vcpus = Vec::new();
            for r in std::mem::take(runners) {
                vcpus.push(r.stop()?);
            }
            *set = VcpuSet::Idle(vcpus);
        }
        Ok(())
    }

    /// Read one u64 of guest RAM (untracked, atomic).
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        self.ram.load_u64(gpa)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "stopping vCPUs of a dropped guest");
        }
    }
}

/// The vCPU index of a state blob name (`vcpu3` -> 3).
fn vcpu_blob_index(name: &str) -> Option<u32> {
    name.strip_prefix(VCPU_BLOB_PREFIX)?.parse().ok()
}
