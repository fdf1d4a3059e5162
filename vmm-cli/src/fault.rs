// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm run --fail-at STEP[@N]`: make one step of the source's first migration fail, for
//! `cargo xtask faults`. The engine must then stop logging, resume the guest and name the step.
//!
//! Every injection wraps the real thing (the memory system, the guest control, the transport) and
//! fails the N-th call of its step (1 by default) with an error that says it was injected. Only
//! the first migration attempt is wrapped: a `--retry-to` migration runs clean.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clearlog_bitmap::Bitmap;
use clearlog_memory::{ClearBitmap, MemorySystem, RamBlock};
use clearlog_migration::{
    BoxError, DirtyTracking, MemoryResult, MigrationBlock, MigrationMemory, StateBlob, Transport,
    TransportRead, VmControl,
};

/// A step of the source's migration that `--fail-at` can break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStep {
    /// Pausing the guest at switchover (fails after the vCPUs were paused).
    Pause,
    /// A dirty-log sync.
    Sync,
    /// A chunk clear (or, in legacy mode, a whole-block re-arm).
    Clear,
    /// Reading a page to send it.
    Read,
    /// Writing the stream to the transport.
    Send,
    /// Saving the CPU and device state.
    SaveState,
    /// Reading the destination's acknowledgement.
    Ack,
    /// Sending the confirmation that commits the migration (the source's last write).
    Confirm,
}

impl FaultStep {
    /// Every step, in migration order.
    pub const ALL: [FaultStep; 8] = [
        FaultStep::Sync,
        FaultStep::Clear,
        FaultStep::Read,
        FaultStep::Send,
        FaultStep::Pause,
        FaultStep::SaveState,
        FaultStep::Ack,
        FaultStep::Confirm,
    ];

    /// The name `--fail-at` takes.
    pub fn name(self) -> &'static str {
        match self {
            FaultStep::Pause => "pause",
            FaultStep::Sync => "sync",
            FaultStep::Clear => "clear",
            FaultStep::Read => "read",
            FaultStep::Send => "send",
            FaultStep::SaveState => "save-state",
            FaultStep::Ack => "ack",
            FaultStep::Confirm => "confirm",
        }
    }
}

/// `--fail-at STEP[@N]`: fail the N-th call of STEP (N >= 1, default 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// The step to break.
    pub step: FaultStep,
    /// Which call of it fails (1 = the first).
    pub nth: u64,
}

impl FromStr for FaultPlan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, nth) = match s.split_once('@') {
            Some((name, n)) => (
                name,
                n.parse::<u64>()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("`{n}` is not a call number (1, 2, ...)"))?,
            ),
            None => (s, 1),
        };
        let step = FaultStep::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown step `{name}`: use one of {}",
                    FaultStep::ALL.map(FaultStep::name).join(", ")
                )
            })?;
        Ok(FaultPlan { step, nth })
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.step.name(), self.nth)
    }
}

/// `--fault lose-dirty-bits=N`: the source drops N dirty bits found at the sync after the first
/// pass, so those pages are not sent again: the lost page this project exists to prevent, made on
/// purpose, for testing that the verification catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyBitFault {
    /// How many bits to drop.
    pub bits: u64,
}

impl FromStr for DirtyBitFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let n = s
            .strip_prefix("lose-dirty-bits=")
            .ok_or_else(|| format!("unknown fault `{s}`: use lose-dirty-bits=N"))?;
        let bits = n.parse::<u64>().ok().filter(|&b| b >= 1).ok_or_else(|| {
            format!("lose-dirty-bits={n}: N must be a whole number of at least 1")
        })?;
        Ok(DirtyBitFault { bits })
    }
}

/// Counts the calls of the planned step and says when to fail.
#[derive(Debug)]
pub struct Injector {
    plan: Option<FaultPlan>,
    calls: AtomicU64,
    /// `--fault lose-dirty-bits=N`: dirty bits still to drop at the sync after the first pass.
    lose_left: AtomicU64,
    /// Dirty-log syncs so far (the first is the engine's setup sync).
    syncs: AtomicU64,

    /// Bytes read back from the destination: once the 8-byte acknowledgement is in, the next
    /// write is the confirmation.
    ack_bytes: AtomicU64,
}

impl Injector {
    /// An injector failing the step of `plan` and dropping `lose` dirty bits.
    pub fn new(plan: Option<FaultPlan>, lose: Option<DirtyBitFault>) -> Arc<Self> {
        Arc::new(Injector {
            plan,
            calls: AtomicU64::new(0),
            lose_left: AtomicU64::new(lose.map_or(0, |l| l.bits)),
            syncs: AtomicU64::new(0),

            ack_bytes: AtomicU64::new(0),
        })
    }

    /// Count a call of `step`; an error if it is the planned one.
    fn check(&self, step: FaultStep) -> Result<(), InjectedFault> {
        let Some(plan) = self.plan else {
            return Ok(());
        };
        if step == plan.step && self.calls.fetch_add(1, Ordering::Relaxed) + 1 == plan.nth {
            return Err(InjectedFault(plan));
        }
        Ok(())
    }
}

/// The error an injected fault raises.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("injected fault ({0})")]
pub struct InjectedFault(FaultPlan);

impl From<InjectedFault> for io::Error {
    fn from(e: InjectedFault) -> Self {
        io::Error::other(e)
    }
}

/// The guest's memory with faults injected into sync, clear and read.
#[derive(Debug)]
pub struct FaultyMemory<'a> {
    /// The real memory.
    pub inner: &'a MemorySystem,
    /// When to fail.
    pub faults: Arc<Injector>,
}

/// A RAM block whose reads may fail.
#[derive(Debug, Clone)]
pub struct FaultyBlock {
    inner: Arc<RamBlock>,
    faults: Arc<Injector>,
}

impl MigrationBlock for FaultyBlock {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
        self.faults.check(FaultStep::Read)?;
        MigrationBlock::read(&self.inner, offset, buf)
    }
    fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
        MigrationBlock::write_untracked(&self.inner, offset, data)
    }
}

impl MigrationMemory for FaultyMemory<'_> {
    type Block = FaultyBlock;
    fn blocks(&self) -> Vec<FaultyBlock> {
        self.inner
            .ram_blocks()
            .into_iter()
            .map(|inner| FaultyBlock {
                inner,
                faults: self.faults.clone(),
            })
            .collect()
    }
}

impl DirtyTracking for FaultyMemory<'_> {
    fn start_logging(&self) -> MemoryResult<()> {
        self.inner.start_logging()
    }
    fn stop_logging(&self) -> MemoryResult<()> {
        self.inner.stop_logging()
    }
    fn sync_dirty(&self) -> MemoryResult<()> {
        self.faults.check(FaultStep::Sync)?;
        self.faults.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync_dirty()
    }
    fn take_dirty(
        &self,
        block: &FaultyBlock,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> MemoryResult<u64> {
        let f = &self.faults;
        // The sync after the first pass (the first sync is the engine's setup).
        if f.syncs.load(Ordering::Relaxed) != 2 || f.lose_left.load(Ordering::Relaxed) == 0 {
            return self.inner.take_dirty(&block.inner, dest, clear);
        }
        let before = dest.clone();
        let newly = self.inner.take_dirty(&block.inner, dest, clear)?;
        let mut dropped = 0;
        for page in 0..dest.len() {
            if f.lose_left.load(Ordering::Relaxed) == 0 {
                break;
            }
            if dest.test(page) && !before.test(page) {
                dest.clear(page);
                // Re-arm it too, as a buggy accelerator that clears without telling would: with
                // manual protection the kernel would otherwise report it again at the next sync.
                self.inner
                    .clear_dirty(&block.inner, page as u64 * 4096, 4096)?;
                f.lose_left.fetch_sub(1, Ordering::Relaxed);
                dropped += 1;
            }
        }
        tracing::warn!(
            block = block.inner.name(),
            dropped,
            "--fault lose-dirty-bits: dropped dirty bits found at this sync"
        );
        Ok(newly - dropped)
    }
    fn clear_dirty(&self, block: &FaultyBlock, offset: u64, len: u64) -> MemoryResult<()> {
        self.faults.check(FaultStep::Clear)?;
        self.inner.clear_dirty(&block.inner, offset, len)
    }
    fn clear_chunk_before_send(
        &self,
        block: &FaultyBlock,
        clear: &mut ClearBitmap,
        page: u64,
    ) -> MemoryResult<bool> {
        // Counted only when a clear would really go out: the chunk is still marked.
        if clear.test(clear.chunk_of(page)) {
            self.faults.check(FaultStep::Clear)?;
        }
        DirtyTracking::clear_chunk_before_send(self.inner, &block.inner, clear, page)
    }
}

/// A guest control whose pause or state save may fail.
pub struct FaultyControl<'a> {
    /// The real control.
    pub inner: &'a dyn VmControl,
    /// When to fail.
    pub faults: Arc<Injector>,
}

impl fmt::Debug for FaultyControl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyControl")
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl VmControl for FaultyControl<'_> {
    fn pause(&self) -> Result<(), BoxError> {
        // Pause for real, then fail: the worst case, a pause that stopped vCPUs and still errs.
        self.inner.pause()?;
        Ok(self.faults.check(FaultStep::Pause)?)
    }
    fn resume(&self) -> Result<(), BoxError> {
        self.inner.resume()
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        self.faults.check(FaultStep::SaveState)?;
        self.inner.save_state()
    }
    fn set_throttle(&self, percent: u8) -> Result<bool, BoxError> {
        self.inner.set_throttle(percent)
    }
}

/// Wrap a transport so its writes (`send`) or its acknowledgement read (`ack`) may fail.
pub fn faulty_transport(t: Transport, faults: &Arc<Injector>) -> Transport {
    Transport::new(
        t.reader.map(|inner| -> Box<dyn TransportRead> {
            Box::new(FaultyReader {
                inner,
                faults: faults.clone(),
            })
        }),
        t.writer.map(|inner| -> Box<dyn Write + Send> {
            Box::new(FaultyWriter {
                inner,
                faults: faults.clone(),
            })
        }),
    )
}

struct FaultyWriter {
    inner: Box<dyn Write + Send>,
    faults: Arc<Injector>,
}

impl Write for FaultyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let acked = self.faults.ack_bytes.load(Ordering::Relaxed) >= 8;
        self.faults.check(if acked {
            FaultStep::Confirm
        } else {
            FaultStep::Send
        })?;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct FaultyReader {
    inner: Box<dyn TransportRead>,
    faults: Arc<Injector>,
}

impl Read for FaultyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.faults.check(FaultStep::Ack)?;
        let n = self.inner.read(buf)?;
        self.faults.ack_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl TransportRead for FaultyReader {
    fn set_read_timeout(&mut self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_reject_bad_input() {
        assert_eq!(
            "sync".parse::<FaultPlan>().unwrap(),
            FaultPlan {
                step: FaultStep::Sync,
                nth: 1
            }
        );
        assert_eq!("read@7".parse::<FaultPlan>().unwrap().nth, 7);
        assert!("read@0".parse::<FaultPlan>().is_err());
        assert!("read@x".parse::<FaultPlan>().is_err());
        let e = "reboot".parse::<FaultPlan>().unwrap_err();
        assert!(e.contains("save-state"), "{e}");
        for step in FaultStep::ALL {
            assert_eq!(step.name().parse::<FaultPlan>().unwrap().step, step);
        }
    }

    #[test]
    fn dirty_bit_faults_parse() {
        assert_eq!(
            "lose-dirty-bits=64".parse::<DirtyBitFault>().unwrap().bits,
            64
        );
        for bad in ["lose-dirty-bits=0", "lose-dirty-bits=x", "lose=3", ""] {
            assert!(bad.parse::<DirtyBitFault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_nth_call_of_the_step_fails() {
        let inj = Injector::new(Some("clear@3".parse().unwrap()), None);
        assert!(inj.check(FaultStep::Sync).is_ok());
        assert!(inj.check(FaultStep::Clear).is_ok());
        assert!(inj.check(FaultStep::Clear).is_ok());
        assert!(inj.check(FaultStep::Clear).is_err());
        assert!(inj.check(FaultStep::Clear).is_ok());
    }
}
