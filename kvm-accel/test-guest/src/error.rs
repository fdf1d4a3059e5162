// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate-level [`Error`] type.

/// Errors returned by the test guest.
///
/// # Example
///
/// ```
/// use clearlog_test_guest::Error;
///
/// let e = Error::VcpuNotPaused(3);
/// assert!(e.to_string().contains('3'));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A `clearlog-kvm` operation (VM creation, memslots, dirty log) failed.
    #[error(transparent)]
    Vm(#[from] clearlog_kvm::Error),
    /// A vCPU or system ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// Name of the operation (ioctl) that failed.
        op: &'static str,
        /// The kernel's error.
        source: vmm_sys_util::errno::Error,
    },
    /// Guest memory access outside the guest RAM.
    #[error("guest memory access at {gpa:#x} (+{len:#x}) out of bounds")]
    GuestMemory {
        /// Guest physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },
    /// The guest RAM is too big or too small for the workload layout.
    #[error("invalid guest layout: {0}")]
    Layout(String),
    /// Generating a guest program failed.
    #[error("assembling guest code")]
    Assemble(#[source] iced_x86::IcedError),
    /// A generated guest program does not fit the code area.
    #[error("the guest program of {len} bytes is larger than the {max}-byte code area")]
    ProgramTooLarge {
        /// The program's size.
        len: usize,
        /// The code area's size.
        max: u64,
    },
    /// The guest RAM could not be set up in the memory system.
    #[error("setting up guest memory")]
    Memory(#[source] clearlog_memory::Error),
    /// An MSR list could not be built for `KVM_GET_MSRS`/`KVM_SET_MSRS`.
    #[error("building the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// A workload parameter is invalid.
    #[error("invalid workload: {0}")]
    InvalidWorkload(String),
    /// A saved vCPU state blob cannot be parsed.
    #[error("invalid vCPU state: {0}")]
    InvalidState(String),
    /// The vCPU left `KVM_RUN` for a reason the runner cannot handle.
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: u32,
        /// Exit reason or error, as text.
        reason: String,
    },
    /// The vCPU thread did not reach the requested state in time.
    #[error("vCPU {vcpu}: timed out waiting for it to {what}")]
    VcpuTimeout {
        /// vCPU index.
        vcpu: u32,
        /// What we waited for.
        what: &'static str,
    },
    /// A failure injected for testing ([`VcpuRunner::inject_pause_failure`](crate::vcpu::runner::VcpuRunner::inject_pause_failure)).
    #[error("vCPU {vcpu}: injected {what} failure")]
    Injected {
        /// The vCPU index.
        vcpu: u32,
        /// The operation that was made to fail.
        what: &'static str,
    },
    /// The operation needs the vCPU thread to be paused.
    #[error("vCPU {0} is not paused")]
    VcpuNotPaused(u32),
    /// Spawning, kicking or setting up the vCPU thread failed.
    #[error("vCPU thread: {what} failed")]
    Thread {
        /// What failed (`"spawn"`, `"pthread_kill"`, ...).
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread panicked (found when joining it).
    #[error("the vCPU thread panicked")]
    ThreadPanicked,
    /// The vCPU is still shared after its thread ended, so it cannot be given back.
    #[error("the vCPU is still shared after its thread ended")]
    VcpuStillShared,
    /// The workload did not become ready in time.
    #[error("workload not ready after {0:?}")]
    WorkloadTimeout(std::time::Duration),
    /// vCPUs need the kvm-ioctls handles of a `Vm` made by `Vm::new`.
    #[error("this Vm was built on a VMM's VM fd (Vm::from_fd): create vCPUs with Vcpu::from_fds and the VMM's kvm-ioctls handles")]
    NoKvmHandles,
}

/// Convenience alias for `Result<T, clearlog_test_guest::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }

    pub(crate) fn thread(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Thread { what, source }
    }
}
