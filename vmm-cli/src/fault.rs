// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm run --fail-at STEP[@N]`: make one step of the source's first migration fail, for
//! `cargo xtask faults`. The engine must then stop logging, resume the guest and name the step.
//!
//! Every injection wraps the real thing (the memory system, the guest control, the transport) and
//! fails the N-th call of its step (1 by default) with an error that says it was injected. Only
//! the first migration attempt is wrapped: a `--retry-to` migration runs clean.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clearlog_bitmap::Bitmap;
use clearlog_memory::{is_zero_page, ClearBitmap, MemorySystem, RamBlock, PAGE_SIZE};
use clearlog_migration::{
    BoxError, DirtyTracking, HostMapping, MemoryResult, MigrationBlock, MigrationMemory, StateBlob,
    Transport, TransportRead, VmControl,
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
    /// A session's wait for the destination to catch up before the switchover (reading its
    /// drain answer; the guest is still running).
    Drain,
    /// Saving the CPU and device state.
    SaveState,
    /// Reading the destination's acknowledgement.
    Ack,
    /// Sending the confirmation that commits the migration (the source's last write).
    Confirm,
    /// A postcopy's write after the commit (a page pushed or asked for, the end): the link
    /// cut while the destination's guest runs with pages missing.
    PostcopySend,
    /// A postcopy's read after the commit (the destination's requests).
    PostcopyRequest,
}

impl FaultStep {
    /// Every step, in migration order.
    pub const ALL: [FaultStep; 11] = [
        FaultStep::Sync,
        FaultStep::Clear,
        FaultStep::Read,
        FaultStep::Send,
        FaultStep::Drain,
        FaultStep::Pause,
        FaultStep::SaveState,
        FaultStep::Ack,
        FaultStep::Confirm,
        FaultStep::PostcopySend,
        FaultStep::PostcopyRequest,
    ];

    /// The name `--fail-at` takes.
    pub fn name(self) -> &'static str {
        match self {
            FaultStep::Pause => "pause",
            FaultStep::Sync => "sync",
            FaultStep::Clear => "clear",
            FaultStep::Read => "read",
            FaultStep::Send => "send",
            FaultStep::Drain => "drain",
            FaultStep::SaveState => "save-state",
            FaultStep::Ack => "ack",
            FaultStep::Confirm => "confirm",
            FaultStep::PostcopySend => "postcopy-send",
            FaultStep::PostcopyRequest => "postcopy-request",
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

/// `--fault KIND=N`: a loss made on purpose, for testing that the default verification catches it
/// (or, on a destination, that it cannot happen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `lose-dirty-bits=N`: the source drops N dirty bits found at the sync after the first pass,
    /// so those pages are not sent again: the lost page this project exists to prevent.
    LoseDirtyBits(u64),
    /// `hide-populated=N`: the populated-pages answer leaves out N pages that hold data, for every
    /// caller, as a misclassified mapping would. On the source they are sent as zero; on a
    /// destination, N pages are first filled with data (RAM that was not zero before the
    /// stream) and hidden.
    HidePopulated(u64),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::LoseDirtyBits(n) => write!(f, "lose-dirty-bits={n}"),
            Fault::HidePopulated(n) => write!(f, "hide-populated={n}"),
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, n) = s.split_once('=').ok_or_else(|| {
            format!("unknown fault `{s}`: use lose-dirty-bits=N or hide-populated=N")
        })?;
        let count = n
            .parse::<u64>()
            .ok()
            .filter(|&c| c >= 1)
            .ok_or_else(|| format!("{kind}={n}: N must be a whole number of at least 1"))?;
        match kind {
            "lose-dirty-bits" => Ok(Fault::LoseDirtyBits(count)),
            "hide-populated" => Ok(Fault::HidePopulated(count)),
            _ => Err(format!(
                "unknown fault `{kind}`: use lose-dirty-bits=N or hide-populated=N"
            )),
        }
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

    /// The source paused its guest: reads from the destination are the acknowledgement now
    /// (before, a session's drain answers).
    paused: std::sync::atomic::AtomicBool,
    /// Bytes read back from the destination since the pause: once the 8-byte acknowledgement is
    /// in, the next write is the confirmation.
    ack_bytes: AtomicU64,
    /// The confirmation went out (the commit).
    committed: std::sync::atomic::AtomicBool,
}

impl Injector {
    /// An injector failing the step of `plan` and making the loss of `fault`.
    pub fn new(plan: Option<FaultPlan>, fault: Option<Fault>) -> Arc<Self> {
        let lose = match fault {
            Some(Fault::LoseDirtyBits(n)) => n,
            _ => 0,
        };
        Arc::new(Injector {
            plan,
            calls: AtomicU64::new(0),
            lose_left: AtomicU64::new(lose),
            syncs: AtomicU64::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
            ack_bytes: AtomicU64::new(0),
            committed: std::sync::atomic::AtomicBool::new(false),
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

/// The guest's memory with faults injected into sync, clear and read, and pages hidden from the
/// populated-pages answer.
#[derive(Debug)]
pub struct FaultyMemory<'a> {
    /// The real memory.
    pub inner: &'a MemorySystem,
    /// When to fail.
    pub faults: Arc<Injector>,
    /// `--fault hide-populated`: pages left out of each block's populated-pages answer, by block
    /// name.
    pub hidden: HashMap<String, Arc<BTreeSet<u64>>>,
}

impl<'a> FaultyMemory<'a> {
    /// `inner` with `faults`, hiding nothing yet.
    pub fn new(inner: &'a MemorySystem, faults: Arc<Injector>) -> Self {
        FaultyMemory {
            inner,
            faults,
            hidden: HashMap::new(),
        }
    }

    /// Source side of `--fault hide-populated=N`: hide N pages of the first block that hold data,
    /// spread over its populated part from 1 MiB on (the test guests' working set; their code and
    /// page tables below stay visible). Returns the hidden pages.
    pub fn hide_populated_pages(&mut self, n: u64) -> Result<Vec<u64>, BoxError> {
        let Some(block) = self.inner.ram_blocks().into_iter().next() else {
            return Ok(Vec::new());
        };
        let first = (1u64 << 20) / PAGE_SIZE;
        let mut ranges = Vec::new();
        if first < block.pages() {
            block.populated_pages(first, block.pages() - first, &mut ranges)?;
        }
        let candidates: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let stride = (candidates / n.max(1)).max(1);
        let mut hidden = BTreeSet::new();
        let mut page_buf = [0u8; PAGE_SIZE as usize];
        for page in ranges.into_iter().flatten().step_by(stride as usize) {
            if hidden.len() as u64 == n {
                break;
            }
            block.read_page(page, &mut page_buf)?;
            if !is_zero_page(&page_buf) {
                hidden.insert(page);
            }
        }
        tracing::warn!(
            block = block.name(),
            pages = ?hidden,
            "--fault hide-populated: these pages hold data and are left out of every populated-pages answer"
        );
        let pages = hidden.iter().copied().collect();
        self.hidden
            .insert(block.name().to_string(), Arc::new(hidden));
        Ok(pages)
    }

    /// Destination side of `--fault hide-populated=N`: fill the last N pages of the first block
    /// with data (memory that is not zero before the stream) and hide them. Returns the pages.
    pub fn fill_and_hide_last_pages(&mut self, n: u64) -> Result<Vec<u64>, BoxError> {
        let Some(block) = self.inner.ram_blocks().into_iter().next() else {
            return Ok(Vec::new());
        };
        let pages: Vec<u64> = (block.pages().saturating_sub(n)..block.pages()).collect();
        for &p in &pages {
            block.write_untracked(p * PAGE_SIZE + 64, b"stale data from before the stream")?;
        }
        tracing::warn!(
            block = block.name(),
            pages = ?pages,
            "--fault hide-populated: these pages hold data from before the stream and are left \
             out of every populated-pages answer"
        );
        self.hidden.insert(
            block.name().to_string(),
            Arc::new(pages.iter().copied().collect()),
        );
        Ok(pages)
    }
}

/// A RAM block whose reads may fail and whose populated-pages answer may hide pages.
#[derive(Debug, Clone)]
pub struct FaultyBlock {
    inner: Arc<RamBlock>,
    faults: Arc<Injector>,
    hidden: Option<Arc<BTreeSet<u64>>>,
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
    fn host_mapping(&self) -> Option<HostMapping> {
        MigrationBlock::host_mapping(&self.inner)
    }
    fn populated(
        &self,
        first_page: u64,
        npages: u64,
        out: &mut Vec<Range<u64>>,
    ) -> MemoryResult<()> {
        let base = out.len();
        MigrationBlock::populated(&self.inner, first_page, npages, out)?;
        if let Some(hidden) = &self.hidden {
            let answer: Vec<Range<u64>> = out.drain(base..).collect();
            out.extend(without(&answer, hidden));
        }
        Ok(())
    }
    fn nonzero_pages(&self, first_page: u64, npages: u64, out: &mut Vec<u64>) -> MemoryResult<()> {
        // The check that reads: not faulted, or it would not be a check.
        MigrationBlock::nonzero_pages(&self.inner, first_page, npages, out)
    }
}

/// `ranges` without the pages of `hidden`.
fn without(ranges: &[Range<u64>], hidden: &BTreeSet<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for r in ranges {
        let mut start = r.start;
        for &h in hidden.range(r.clone()) {
            if start < h {
                out.push(start..h);
            }
            start = h + 1;
        }
        if start < r.end {
            out.push(start..r.end);
        }
    }
    out
}

impl MigrationMemory for FaultyMemory<'_> {
    type Block = FaultyBlock;
    fn blocks(&self) -> Vec<FaultyBlock> {
        self.inner
            .ram_blocks()
            .into_iter()
            .map(|inner| FaultyBlock {
                hidden: self.hidden.get(inner.name()).cloned(),
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
        self.faults.paused.store(true, Ordering::Relaxed);
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

/// Wrap a transport so its writes (`send`, `confirm`) or its reads (`drain` before the pause,
/// `ack` after it) may fail.
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
        let f = &self.faults;
        let step = if f.committed.load(Ordering::Relaxed) {
            FaultStep::PostcopySend
        } else if f.ack_bytes.load(Ordering::Relaxed) >= 8 {
            FaultStep::Confirm
        } else {
            FaultStep::Send
        };
        f.check(step)?;
        let n = self.inner.write(buf)?;
        if step == FaultStep::Confirm {
            f.committed.store(true, Ordering::Relaxed);
        }
        Ok(n)
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
        let paused = self.faults.paused.load(Ordering::Relaxed);
        self.faults
            .check(if self.faults.committed.load(Ordering::Relaxed) {
                FaultStep::PostcopyRequest
            } else if paused {
                FaultStep::Ack
            } else {
                FaultStep::Drain
            })?;
        let n = self.inner.read(buf)?;
        if paused {
            self.faults.ack_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
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
        "read@0".parse::<FaultPlan>().unwrap_err();
        "read@x".parse::<FaultPlan>().unwrap_err();
        let e = "reboot".parse::<FaultPlan>().unwrap_err();
        assert!(e.contains("save-state"), "{e}");
        for step in FaultStep::ALL {
            assert_eq!(step.name().parse::<FaultPlan>().unwrap().step, step);
        }
    }

    #[test]
    fn faults_parse() {
        assert_eq!(
            "lose-dirty-bits=64".parse::<Fault>().unwrap(),
            Fault::LoseDirtyBits(64)
        );
        assert_eq!(
            "hide-populated=3".parse::<Fault>().unwrap(),
            Fault::HidePopulated(3)
        );
        for bad in [
            "lose-dirty-bits=0",
            "lose-dirty-bits=x",
            "lose=3",
            "",
            "hide-populated",
            "hide-populated=-1",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hidden_pages_are_cut_out_of_every_range() {
        let hidden: BTreeSet<u64> = [0, 5, 6, 20, 99].into();
        assert_eq!(
            without(&[0..10, 15..21, 30..40], &hidden),
            vec![1..5, 7..10, 15..20, 30..40]
        );
        assert!(without(&[5..7, 6..7], &hidden).is_empty());
    }

    #[test]
    fn only_the_nth_call_of_the_step_fails() {
        let inj = Injector::new(Some("clear@3".parse().unwrap()), None);
        inj.check(FaultStep::Sync).unwrap();
        inj.check(FaultStep::Clear).unwrap();
        inj.check(FaultStep::Clear).unwrap();
        assert!(inj.check(FaultStep::Clear).is_err());
        inj.check(FaultStep::Clear).unwrap();
    }
}
