// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Running a vCPU on its own thread, with pause, resume, kick and stop.
//!
//! Kicking uses a real-time signal ([`kick_signal`], `SIGRTMIN() + 0`) sent to the vCPU
//! thread. Its handler sets `kvm_run.immediate_exit` of the vCPU that thread runs, so a
//! kick is never lost: if the signal arrives while the thread is in `KVM_RUN`, the ioctl
//! returns `EINTR`; if it arrives just before, `KVM_RUN` returns at once. The thread then
//! clears `immediate_exit` (`VcpuFd::set_kvm_immediate_exit(0)`) and looks at what the
//! controller wants.
//!
//! [`VcpuRunner::pause`] returns only once the thread is out of `KVM_RUN` and parked, with
//! the [`Vcpu`] released so the controller can save its state
//! ([`VcpuRunner::with_vcpu`]).

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::VcpuExit;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::Vcpu;
use crate::error::{Error, Result};

/// The signal used to kick vCPU threads out of `KVM_RUN`.
///
/// # Example
///
/// ```
/// assert!(clearlog_test_guest::vcpu::runner::kick_signal() >= libc::SIGRTMIN());
/// ```
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // Async-signal-safe: a const-initialized thread local and one volatile store.
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` is this thread's vCPU `kvm_run` mapping, set by the vCPU thread and
        // cleared before the mapping can go away; the kernel expects userspace to write
        // `immediate_exit` at any time.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

fn register_kick_handler() -> Result<()> {
    // The errno of the one registration, kept for every later caller.
    static REGISTERED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(|errno| Error::Thread {
            what: "registering the kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// What the vCPU thread is doing.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::vcpu::runner::RunState;
/// assert_ne!(RunState::Running, RunState::Paused);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// In or around `KVM_RUN`.
    Running,
    /// Parked outside `KVM_RUN`, the vCPU available to the controller.
    Paused,
    /// The thread has ended normally.
    Stopped,
    /// The thread has ended because of an exit it cannot handle.
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    /// Pause when the guest next exits on a write to the MMIO doorbell.
    PauseAtDoorbell,
    Stop,
}

struct Ctl {
    want: Want,
    state: RunState,
}

struct Shared {
    index: u32,
    vcpu: Mutex<Vcpu>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    pending: AtomicBool,
    io_exits: AtomicU64,
    last_out: AtomicU64,
    mmio_exits: AtomicU64,
    last_mmio_addr: AtomicU64,
    last_mmio_value: AtomicU64,
    kicks: AtomicU64,
    doorbell_pauses: AtomicU64,
    fail_next_pause: AtomicBool,
    ring_full_exits: AtomicU64,
    on_ring_full: Option<RingFullHandler>,
    /// The vCPU thread's id while it runs: set at its start, cleared (under this lock) before it
    /// ends, so a [`VcpuKicker`] holding the lock only ever signals a live thread.
    thread_id: Mutex<Option<libc::pthread_t>>,
}

/// Kicks one vCPU out of `KVM_RUN` from any thread, without the [`VcpuRunner`] (e.g. a dirty-ring
/// sync kicking every vCPU so the CPU's buffered dirty entries reach the rings). Harmless once the
/// vCPU thread has ended.
#[derive(Clone)]
pub struct VcpuKicker(std::sync::Weak<Shared>);

impl std::fmt::Debug for VcpuKicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuKicker").finish_non_exhaustive()
    }
}

impl VcpuKicker {
    /// Sends the kick signal if the vCPU thread still runs; returns whether it did.
    pub fn kick(&self) -> bool {
        let Some(shared) = self.0.upgrade() else {
            return false;
        };
        let id = shared.thread_id.lock().unwrap_or_else(|p| p.into_inner());
        match *id {
            // SAFETY: the thread clears `thread_id` under this lock before it ends (a drop guard,
            // so also when it unwinds), so `t` names
            // a live thread of this process while we hold the lock; the kick signal's handler is
            // registered (by `spawn`) and async-signal-safe.
            Some(t) => unsafe { libc::pthread_kill(t, kick_signal()) == 0 },
            None => false,
        }
    }
}

/// Clears the vCPU thread's id when dropped: on the thread's way out, normal or unwinding.
struct ForgetThreadId<'a>(&'a Mutex<Option<libc::pthread_t>>);

impl Drop for ForgetThreadId<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Called on the vCPU thread at a `KVM_EXIT_DIRTY_RING_FULL` exit with the vCPU index: it must
/// harvest and reset the rings (e.g. `KvmMemoryListener::reap_rings`) before returning, since the
/// vCPU runs again right after. It runs outside any runner lock, so a migration that pauses the
/// vCPUs meanwhile just finds the vCPU parking once the reap returns.
pub type RingFullHandler = Arc<dyn Fn(u32) -> std::result::Result<(), String> + Send + Sync>;

impl Shared {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counters of a running vCPU.
///
/// # Example
///
/// ```
/// let s = clearlog_test_guest::vcpu::runner::RunStats::default();
/// assert_eq!(s.io_exits, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Port I/O exits handled.
    pub io_exits: u64,
    /// Last `out`: `port << 32 | value` (value of up to 4 bytes), 0 if none.
    pub last_out: u64,
    /// MMIO exits handled (e.g. writes to the workloads' doorbell).
    pub mmio_exits: u64,
    /// Address of the last MMIO write, 0 if none.
    pub last_mmio_addr: u64,
    /// Value of the last MMIO write (up to 8 bytes, little-endian).
    pub last_mmio_value: u64,
    /// `KVM_RUN` returns caused by kicks (`EINTR`).
    pub kicks: u64,
    /// Pauses taken at a doorbell exit ([`VcpuRunner::pause_at_doorbell`]).
    pub doorbell_pauses: u64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits (each one handled by the [`RingFullHandler`]).
    pub ring_full_exits: u64,
}

/// A vCPU running on its own thread.
///
/// Port I/O and MMIO exits are handled (reads return all ones, writes are recorded in
/// [`RunStats`]; the workloads signal through the MMIO doorbell); any other exit ends the
/// thread with [`RunState::Failed`].
///
/// # Example
///
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("VcpuRunner") { return; }
/// use clearlog_test_guest::vcpu::{runner::VcpuRunner, Vcpu};
/// # use clearlog_test_guest::workload::{monitor::WorkloadMonitor, Workload, WorkloadSpec};
/// # use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
/// # let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
/// # let vm = clearlog_kvm::Vm::new(Default::default()).unwrap();
/// # let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
/// # // SAFETY: `mem` (declared first) outlives `vm`.
/// # unsafe { vm.set_memslot(0, 0, 4 << 20, host, false).unwrap() };
/// # let vcpu = Vcpu::new(&vm, 0).unwrap();
/// # let w = Workload::new(WorkloadSpec::Idle);
/// # w.load(&mem, vcpu.tsc_khz().unwrap()).unwrap();
/// # vcpu.setup_ring3(&w.entry(0).unwrap()).unwrap();
/// // `vcpu` is set up to run a workload loaded in `mem`.
/// let runner = VcpuRunner::spawn(vcpu).unwrap();
/// runner.pause().unwrap();
/// let state = runner.with_vcpu(|v| v.save_state()).unwrap().unwrap();
/// runner.resume().unwrap();
/// let vcpu = runner.stop().unwrap();
/// ```
pub struct VcpuRunner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("index", &self.shared.index)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// What the vCPU loop does after an exit of `KVM_RUN`.
enum AfterExit {
    /// Run again.
    Run,
    /// Run again; the exit was a write to the doorbell (the guest is at a sync point).
    Doorbell,
    /// A kick (signal or `immediate_exit`): clear `immediate_exit`, run again.
    Kicked,
    /// An exit this runner does not handle: the vCPU thread ends with it.
    Unhandled(String),
    /// The vCPU thread ends.
    End(RunState),
}

/// Handles one exit of `KVM_RUN` (port and MMIO exits are answered and counted; a ring-full
/// exit has the rings reaped).
fn on_exit(
    shared: &Shared,
    exit: std::result::Result<VcpuExit<'_>, vmm_sys_util::errno::Error>,
) -> AfterExit {
    match exit {
        Ok(VcpuExit::IoOut(port, data)) => {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            shared.last_out.store(
                (u64::from(port) << 32) | u64::from(u32::from_le_bytes(v)),
                Ordering::Release,
            );
            shared.io_exits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(VcpuExit::IoIn(_, data)) => {
            data.fill(0xff);
            shared.io_exits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            let mut v = [0u8; 8];
            let n = data.len().min(8);
            v[..n].copy_from_slice(&data[..n]);
            shared
                .last_mmio_value
                .store(u64::from_le_bytes(v), Ordering::Release);
            shared.last_mmio_addr.store(addr, Ordering::Release);
            shared.mmio_exits.fetch_add(1, Ordering::Release);
            if crate::layout::is_doorbell(addr) {
                return AfterExit::Doorbell;
            }
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            data.fill(0xff);
            shared.mmio_exits.fetch_add(1, Ordering::Release);
        }
        Ok(VcpuExit::Intr) => return AfterExit::Kicked,
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
            shared.ring_full_exits.fetch_add(1, Ordering::Relaxed);
            let Some(reap) = &shared.on_ring_full else {
                return AfterExit::End(RunState::Failed(
                    "KVM_EXIT_DIRTY_RING_FULL and no ring-full handler to reap the rings".into(),
                ));
            };
            // The ring must be harvested and reset before KVM_RUN, or the vCPU exits again at
            // once. No runner lock is held: the reap takes only the listener's slots lock.
            if let Err(e) = reap(shared.index) {
                return AfterExit::End(RunState::Failed(format!("reaping the dirty rings: {e}")));
            }
        }
        Ok(exit) => return AfterExit::Unhandled(format!("{exit:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return AfterExit::Kicked
        }
        Err(e) => return AfterExit::End(RunState::Failed(format!("KVM_RUN: {e}"))),
    }
    AfterExit::Run
}

/// Parks the vCPU thread (the vCPU released) until the wish is no longer a pause: `false` when
/// the wish is now to stop.
fn park(shared: &Shared, mut ctl: MutexGuard<'_, Ctl>, doorbell_sync: bool) -> bool {
    if doorbell_sync {
        shared.doorbell_pauses.fetch_add(1, Ordering::Relaxed);
    }
    ctl.state = RunState::Paused;
    shared.cv.notify_all();
    while matches!(ctl.want, Want::Pause | Want::PauseAtDoorbell) {
        ctl = shared.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
    }
    if ctl.want == Want::Stop {
        return false;
    }
    ctl.state = RunState::Running;
    shared.cv.notify_all();
    true
}

fn run_loop(shared: &Shared) -> RunState {
    let mut guard = shared.vcpu.lock().unwrap_or_else(|p| p.into_inner());
    let run_ptr: *mut kvm_run = guard.fd_mut().get_kvm_run();
    KVM_RUN_PTR.with(|c| c.set(run_ptr));
    // Set when the last exit was a write to the doorbell: the guest is at a sync point.
    let mut at_doorbell = false;
    let result = loop {
        let doorbell_sync =
            std::mem::take(&mut at_doorbell) && shared.ctl().want == Want::PauseAtDoorbell;
        if doorbell_sync || shared.pending.swap(false, Ordering::AcqRel) {
            let ctl = shared.ctl();
            match ctl.want {
                Want::Run => {}
                // A doorbell pause is taken only right after a doorbell exit; anywhere else
                // (another wish's kick) the vCPU keeps running.
                Want::PauseAtDoorbell if !doorbell_sync => {}
                Want::Stop => break RunState::Stopped,
                Want::Pause | Want::PauseAtDoorbell => {
                    // Park: release the vCPU, report, wait for another wish.
                    drop(guard);
                    if !park(shared, ctl, doorbell_sync) {
                        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
                        return RunState::Stopped;
                    }
                    guard = shared.vcpu.lock().unwrap_or_else(|p| p.into_inner());
                    continue;
                }
            }
        }
        match on_exit(shared, guard.fd_mut().run()) {
            AfterExit::Run => {}
            AfterExit::Doorbell => at_doorbell = true,
            AfterExit::Kicked => {
                guard.fd_mut().set_kvm_immediate_exit(0);
                shared.kicks.fetch_add(1, Ordering::Relaxed);
            }
            AfterExit::Unhandled(what) => {
                let rip = guard.fd().get_regs().map_or(0, |r| r.rip);
                break RunState::Failed(format!("unhandled exit {what} at rip {rip:#x}"));
            }
            AfterExit::End(state) => break state,
        }
    };
    KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
    drop(guard);
    tracing::debug!(vcpu = shared.index, state = ?result, "vCPU thread ends");
    result
}

impl VcpuRunner {
    /// Starts `vcpu` running on a new thread named `vcpu<N>`.
    pub fn spawn(vcpu: Vcpu) -> Result<Self> {
        Self::spawn_with_ring(vcpu, None)
    }

    /// [`spawn`](Self::spawn) for a vCPU of a dirty-ring VM: `on_ring_full` reaps the rings at
    /// its `KVM_EXIT_DIRTY_RING_FULL` exits (without one such an exit ends the thread).
    pub fn spawn_with_ring(vcpu: Vcpu, on_ring_full: Option<RingFullHandler>) -> Result<Self> {
        register_kick_handler()?;
        let index = vcpu.index();
        let shared = Arc::new(Shared {
            index,
            vcpu: Mutex::new(vcpu),
            ctl: Mutex::new(Ctl {
                want: Want::Run,
                state: RunState::Running,
            }),
            cv: Condvar::new(),
            pending: AtomicBool::new(false),
            io_exits: AtomicU64::new(0),
            last_out: AtomicU64::new(0),
            mmio_exits: AtomicU64::new(0),
            last_mmio_addr: AtomicU64::new(0),
            last_mmio_value: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
            doorbell_pauses: AtomicU64::new(0),
            fail_next_pause: AtomicBool::new(false),
            ring_full_exits: AtomicU64::new(0),
            on_ring_full,
            thread_id: Mutex::new(None),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                *s.thread_id.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(unsafe { libc::pthread_self() });
                // Forget the thread id however `run_loop` ends, a panic (e.g. in a ring-full
                // handler) included: a kicker must never signal a thread that has ended.
                let forget = ForgetThreadId(&s.thread_id);
                let end = run_loop(&s);
                drop(forget);
                let mut ctl = s.ctl();
                ctl.state = end;
                s.cv.notify_all();
            })
            .map_err(Error::thread("spawning the vCPU thread"))?;
        Ok(VcpuRunner {
            shared,
            thread: Some(thread),
            timeout: Duration::from_secs(5),
        })
    }

    /// Sets how long [`pause`](Self::pause) and [`resume`](Self::resume) wait (5 s by
    /// default).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.shared.index
    }

    /// The thread's current state.
    pub fn state(&self) -> RunState {
        self.shared.ctl().state.clone()
    }

    /// Exit counters.
    pub fn stats(&self) -> RunStats {
        RunStats {
            io_exits: self.shared.io_exits.load(Ordering::Acquire),
            last_out: self.shared.last_out.load(Ordering::Acquire),
            mmio_exits: self.shared.mmio_exits.load(Ordering::Acquire),
            last_mmio_addr: self.shared.last_mmio_addr.load(Ordering::Acquire),
            last_mmio_value: self.shared.last_mmio_value.load(Ordering::Acquire),
            kicks: self.shared.kicks.load(Ordering::Acquire),
            doorbell_pauses: self.shared.doorbell_pauses.load(Ordering::Acquire),
            ring_full_exits: self.shared.ring_full_exits.load(Ordering::Acquire),
        }
    }

    /// A [`VcpuKicker`] for this vCPU, usable from any thread.
    pub fn kicker(&self) -> VcpuKicker {
        VcpuKicker(Arc::downgrade(&self.shared))
    }

    /// Forces the vCPU out of `KVM_RUN` once; it goes back in unless a pause or stop is
    /// pending.
    pub fn kick(&self) -> Result<()> {
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                t.kill(kick_signal()).map_err(|e| Error::Thread {
                    what: "pthread_kill",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
            }
        }
        Ok(())
    }

    fn request(&self, want: Want) -> Result<()> {
        {
            let mut ctl = self.shared.ctl();
            if let RunState::Failed(reason) = &ctl.state {
                return Err(Error::VcpuFailed {
                    vcpu: self.index(),
                    reason: reason.clone(),
                });
            }
            ctl.want = want;
            self.shared.cv.notify_all();
        }
        self.shared.pending.store(true, Ordering::Release);
        self.kick()
    }

    fn wait_for(&self, what: &'static str, ok: impl Fn(&RunState) -> bool) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut ctl = self.shared.ctl();
        loop {
            if ok(&ctl.state) {
                return Ok(());
            }
            if let RunState::Failed(reason) = &ctl.state {
                return Err(Error::VcpuFailed {
                    vcpu: self.index(),
                    reason: reason.clone(),
                });
            }
            if ctl.state == RunState::Stopped {
                return Err(Error::VcpuFailed {
                    vcpu: self.index(),
                    reason: "thread stopped".into(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::VcpuTimeout {
                    vcpu: self.index(),
                    what,
                });
            }
            ctl = self
                .shared
                .cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops the vCPU and returns once its thread is out of `KVM_RUN` and parked.
    ///
    /// The kick can land anywhere in the guest program, also between a store that faulted (its
    /// page already marked dirty) and its retirement. To stop between two guest steps, use
    /// [`pause_at_doorbell`](Self::pause_at_doorbell).
    pub fn pause(&self) -> Result<()> {
        if self.shared.fail_next_pause.swap(false, Ordering::AcqRel) {
            return Err(Error::Injected {
                vcpu: self.index(),
                what: "pause",
            });
        }
        self.request(Want::Pause)?;
        self.wait_for("pause", |s| *s == RunState::Paused)
    }

    /// Pauses the vCPU at its next exit on a write to the MMIO doorbell
    /// ([`DOORBELL_ADDR`](crate::layout::DOORBELL_ADDR)) and returns once it is parked: the guest
    /// is then at a sync point of its program (every store before the doorbell write retired,
    /// none after it started). No kick is sent; the guest must ring the doorbell within the
    /// timeout (the `random` workload does after every page write while
    /// [`FLAG_DOORBELL_SYNC`](crate::workload::params::FLAG_DOORBELL_SYNC) is set).
    ///
    /// On a timeout the wish is withdrawn (the vCPU keeps running) and
    /// [`Error::VcpuTimeout`] is returned.
    pub fn pause_at_doorbell(&self) -> Result<()> {
        {
            let mut ctl = self.shared.ctl();
            if let RunState::Failed(reason) = &ctl.state {
                return Err(Error::VcpuFailed {
                    vcpu: self.index(),
                    reason: reason.clone(),
                });
            }
            if ctl.state == RunState::Paused {
                return Ok(());
            }
            ctl.want = Want::PauseAtDoorbell;
            self.shared.cv.notify_all();
        }
        let r = self.wait_for("pause at the doorbell", |s| *s == RunState::Paused);
        if r.is_err() {
            self.cancel_pause();
        }
        r
    }

    /// Withdraws a pause that was asked for but not reached (the vCPU stays running). A vCPU
    /// already parked stays paused (use [`resume`](Self::resume)).
    pub fn cancel_pause(&self) {
        let mut ctl = self.shared.ctl();
        if ctl.state == RunState::Running && matches!(ctl.want, Want::Pause | Want::PauseAtDoorbell)
        {
            ctl.want = Want::Run;
            self.shared.cv.notify_all();
        }
    }

    /// Fault injection, for testing the failure paths of callers (e.g. a migration engine):
    /// the next [`pause`](Self::pause) of this vCPU fails with [`Error::Injected`] without
    /// pausing it.
    pub fn inject_pause_failure(&self) {
        self.shared.fail_next_pause.store(true, Ordering::Release);
    }

    /// Lets a paused vCPU run again; returns once the thread has left its parking spot.
    pub fn resume(&self) -> Result<()> {
        {
            let mut ctl = self.shared.ctl();
            if ctl.state != RunState::Paused {
                return Err(Error::VcpuNotPaused(self.index()));
            }
            ctl.want = Want::Run;
            self.shared.cv.notify_all();
        }
        self.wait_for("resume", |s| *s == RunState::Running)
    }

    /// Runs `f` on the paused vCPU (e.g. to save or restore its state).
    pub fn with_vcpu<R>(&self, f: impl FnOnce(&mut Vcpu) -> R) -> Result<R> {
        if self.state() != RunState::Paused {
            return Err(Error::VcpuNotPaused(self.index()));
        }
        let mut v = self.shared.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut v))
    }

    /// Stops the thread, joins it and gives the vCPU back. Works in any state; a failed
    /// vCPU is returned too (its failure was reported by `pause`/`resume`/`state`).
    pub fn stop(mut self) -> Result<Vcpu> {
        self.stop_thread()?;
        let shared = self.shared.clone();
        // Drops our other reference (the thread's one went with the join).
        drop(self);
        let shared = Arc::try_unwrap(shared).map_err(|_| Error::VcpuStillShared)?;
        Ok(shared.vcpu.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    fn stop_thread(&mut self) -> Result<()> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        {
            let mut ctl = self.shared.ctl();
            ctl.want = Want::Stop;
            self.shared.cv.notify_all();
        }
        self.shared.pending.store(true, Ordering::Release);
        if !t.is_finished() {
            // The thread may exit between the check and the kill; ESRCH is fine then.
            let _ = t.kill(kick_signal());
        }
        t.join().map_err(|_| Error::ThreadPanicked)
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}
