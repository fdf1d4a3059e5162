// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared test helpers: a fake KVM-like accelerator, a guest writer thread, a test VM.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use clearlog_bitmap::ClearBitmap;
use clearlog_memory::{
    DirtyMemory, ListenerError, MemoryListener, MemorySystem, RamBlock, Section, PAGE_SIZE,
};
use clearlog_migration::{
    mem_channel, BoxError, ChannelConnector, DirtyTracking, Error, MemoryResult, MigrationMemory,
    StateBlob, Transport, VmControl, VmRestore,
};
use rand::{Rng, SeedableRng};

/// One memslot of the fake accelerator: the "kernel" dirty bitmap (set by the guest writer) and the
/// accelerator's cache of the last GET (what it may clear).
struct Slot {
    kernel: Arc<Vec<AtomicU64>>,
    cache: Mutex<Vec<u64>>,
    pages: u64,
}

/// A fake manual-protect accelerator with `INITIALLY_SET` semantics, modelling `KVM_GET_DIRTY_LOG` /
/// `KVM_CLEAR_DIRTY_LOG` with a per-slot cache (docs/design.md section 2). Slots are keyed by block name.
#[derive(Default)]
pub struct FakeAccel {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    pub syncs: AtomicU64,
    pub clears: AtomicU64,
    pub clears_before_sync: AtomicU64,
}

impl FakeAccel {
    /// The kernel bitmap of a block (for the guest writer).
    pub fn kernel_bits(&self, block: &str) -> Arc<Vec<AtomicU64>> {
        self.slots.lock().unwrap()[block].kernel.clone()
    }
}

impl MemoryListener for FakeAccel {
    fn name(&self) -> &str {
        "fake-accel"
    }

    fn region_add(&self, section: &Section) -> Result<(), ListenerError> {
        let pages = section.pages();
        let words = pages.div_ceil(64) as usize;
        let slot = Slot {
            kernel: Arc::new((0..words).map(|_| AtomicU64::new(0)).collect()),
            cache: Mutex::new(vec![0; words]),
            pages,
        };
        self.slots
            .lock()
            .unwrap()
            .insert(section.block.name().to_string(), Arc::new(slot));
        Ok(())
    }

    fn log_start(
        &self,
        section: &Section,
        _old: clearlog_memory::DirtyClients,
        _new: clearlog_memory::DirtyClients,
    ) -> Result<(), ListenerError> {
        // INITIALLY_SET: every page reads dirty, nothing is write-protected yet.
        let slots = self.slots.lock().unwrap();
        let slot = &slots[section.block.name()];
        for (i, w) in slot.kernel.iter().enumerate() {
            let valid = (slot.pages - i as u64 * 64).min(64);
            w.store(
                if valid == 64 { !0 } else { (1u64 << valid) - 1 },
                Ordering::SeqCst,
            );
        }
        Ok(())
    }

    fn log_sync(&self, section: &Section, dirty: &DirtyMemory) -> Result<(), ListenerError> {
        let slot = self.slots.lock().unwrap()[section.block.name()].clone();
        let mut cache = slot.cache.lock().unwrap();
        // GET (manual mode: copy, do not clear) into the cache, then fold into the clients.
        for (c, k) in cache.iter_mut().zip(slot.kernel.iter()) {
            *c = k.load(Ordering::SeqCst);
        }
        dirty.fold_bitmap(section.ram_first_page(), &cache, slot.pages, section.log);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn log_clear(
        &self,
        section: &Section,
        first_page: u64,
        npages: u64,
    ) -> Result<(), ListenerError> {
        let slot = self.slots.lock().unwrap()[section.block.name()].clone();
        if self.syncs.load(Ordering::Relaxed) == 0 {
            self.clears_before_sync.fetch_add(1, Ordering::Relaxed);
        }
        if first_page + npages > slot.pages {
            return Err(format!(
                "clear past the slot end: {first_page}+{npages} > {}",
                slot.pages
            )
            .into());
        }
        let mut cache = slot.cache.lock().unwrap();
        // Clear only bits the cache saw set, and only in the requested range.
        for page in first_page..first_page + npages {
            let (w, b) = ((page / 64) as usize, 1u64 << (page % 64));
            if cache[w] & b != 0 {
                slot.kernel[w].fetch_and(!b, Ordering::SeqCst);
                cache[w] &= !b;
            }
        }
        self.clears.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A deliberately wrong dirty tracker for the loss tests: it re-arms each chunk only when the engine
/// asks for the NEXT one (or syncs), so every chunk's pages are read BEFORE it is re-armed, and a
/// write between the read and the late re-arm is lost. The consistency tests must catch that.
pub struct ReadBeforeClear<'a> {
    mem: &'a MemorySystem,
    /// The chunk the engine last asked to re-arm: block, first page, pages.
    pending: Mutex<Option<(Arc<RamBlock>, u64, u64)>>,
}

impl<'a> ReadBeforeClear<'a> {
    pub fn new(mem: &'a MemorySystem) -> Self {
        ReadBeforeClear {
            mem,
            pending: Mutex::new(None),
        }
    }

    fn flush(&self) -> MemoryResult<()> {
        if let Some((block, first, npages)) = self.pending.lock().unwrap().take() {
            self.mem
                .clear_dirty_bitmap_block(&block, first * PAGE_SIZE, npages * PAGE_SIZE)?;
        }
        Ok(())
    }
}

impl MigrationMemory for ReadBeforeClear<'_> {
    type Block = Arc<RamBlock>;
    fn blocks(&self) -> Vec<Arc<RamBlock>> {
        self.mem.blocks()
    }
}

impl DirtyTracking for ReadBeforeClear<'_> {
    fn start_logging(&self) -> MemoryResult<()> {
        self.mem.start_logging()
    }
    fn stop_logging(&self) -> MemoryResult<()> {
        self.flush()?;
        self.mem.stop_logging()
    }
    fn sync_dirty(&self) -> MemoryResult<()> {
        self.flush()?;
        self.mem.sync_dirty()
    }
    fn take_dirty(
        &self,
        block: &Arc<RamBlock>,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> MemoryResult<u64> {
        self.mem.take_dirty(block, dest, clear)
    }
    fn clear_dirty(&self, block: &Arc<RamBlock>, offset: u64, len: u64) -> MemoryResult<()> {
        self.mem.clear_dirty(block, offset, len)
    }
    fn clear_chunks_before_send(
        &self,
        block: &Arc<RamBlock>,
        clear: &mut ClearBitmap,
        page: u64,
        _max_chunks: u64,
    ) -> MemoryResult<u64> {
        clear.clear_run_before_read(page, 1, |first, npages| -> MemoryResult<()> {
            let previous = self
                .pending
                .lock()
                .unwrap()
                .replace((block.clone(), first, npages));
            if let Some((b, f, n)) = previous {
                self.mem
                    .clear_dirty_bitmap_block(&b, f * PAGE_SIZE, n * PAGE_SIZE)?;
            }
            Ok(())
        })
    }
}

/// Blocks of the test guests: sizes that are not multiples of 64 pages on purpose.
pub const LAYOUT: &[(&str, u64, u64)] = &[
    ("ram0", 0, 5 << 20),
    ("ram1", 1 << 30, (3 << 20) + 12 * 4096),
];

pub fn memory(layout: &[(&str, u64, u64)]) -> MemorySystem {
    let mem = MemorySystem::new();
    for (name, gpa, size) in layout {
        mem.add_ram(name, *gpa, *size).unwrap();
    }
    mem
}

/// How the guest writer's writes are tracked.
#[derive(Clone)]
pub enum Tracking {
    /// Guest writes: `write_untracked` + a bit in the fake accelerator's kernel bitmap (after the data).
    Accel(Arc<FakeAccel>),
    /// Host writes through `RamBlock::write` (memory-api's own tracking).
    Host,
}

/// The pause gate shared by the writer thread and the test VM: pause waits for an in-flight write.
#[derive(Default)]
pub struct Gate {
    paused: Mutex<bool>,
    pub stop: AtomicBool,
    pub writes: AtomicU64,
}

/// Start a writer thread: random pages, an 8-byte counter at a random aligned offset (sometimes a whole
/// page of zeros), at roughly `rate` writes/s, for `active` (then idle until stopped).
pub fn spawn_writer(
    mem: &MemorySystem,
    tracking: Tracking,
    gate: Arc<Gate>,
    seed: u64,
    rate: u64,
    active: Duration,
) -> JoinHandle<()> {
    let blocks: Vec<Arc<RamBlock>> = mem.ram_blocks();
    let kernel: Vec<Option<Arc<Vec<AtomicU64>>>> = blocks
        .iter()
        .map(|b| match &tracking {
            Tracking::Accel(a) => Some(a.kernel_bits(b.name())),
            Tracking::Host => None,
        })
        .collect();
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let mut counter = 1u64;
        let zeros = vec![0u8; PAGE_SIZE as usize];
        let burst = (rate / 1000).max(1);
        while !gate.stop.load(Ordering::SeqCst) {
            if start.elapsed() >= active {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for _ in 0..burst {
                let guard = gate.paused.lock().unwrap();
                if *guard {
                    break;
                }
                let bi = rng.random_range(0..blocks.len());
                let block = &blocks[bi];
                let page = rng.random_range(0..block.pages());
                let zero_page = rng.random_range(0..16) == 0;
                let (offset, data): (u64, &[u8]) = if zero_page {
                    (page * PAGE_SIZE, &zeros)
                } else {
                    (
                        page * PAGE_SIZE + rng.random_range(0..PAGE_SIZE / 8) * 8,
                        &[],
                    )
                };
                let bytes = counter.to_le_bytes();
                let data = if zero_page { data } else { &bytes[..] };
                counter += 1;
                match &kernel[bi] {
                    Some(k) => {
                        block.write_untracked(offset, data).unwrap();
                        // The "kernel" bit is set after the data: the racy-realistic order for a
                        // fault-then-write seen from the host.
                        k[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
                    }
                    None => block.write(offset, data).unwrap(),
                }
                gate.writes.fetch_add(1, Ordering::Relaxed);
                drop(guard);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

/// Fill RAM with a deterministic non-zero pattern on most pages (untracked: before migration).
pub fn prefill(mem: &MemorySystem, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    for block in mem.ram_blocks() {
        for page in 0..block.pages() {
            if rng.random_range(0..4) == 0 {
                continue; // leave some zero pages
            }
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            rng.fill(&mut buf[..]);
            block.write_untracked(page * PAGE_SIZE, &buf).unwrap();
        }
    }
}

/// A test VM: counts calls; pausing closes the writer's gate.
#[derive(Default)]
pub struct TestVm {
    pub gate: Arc<Gate>,
    pub pauses: AtomicU32,
    pub resumes: AtomicU32,
    pub restores: AtomicU32,
    pub restored: Mutex<Vec<StateBlob>>,
    pub state: Vec<StateBlob>,
    pub fail_restore: bool,
    /// `pause` stops the guest, then returns an error (a pause that half-worked).
    pub fail_pause: bool,
    pub throttle: AtomicU32,
    pub max_throttle: AtomicU32,
}

impl VmControl for TestVm {
    fn pause(&self) -> Result<(), BoxError> {
        *self.gate.paused.lock().unwrap() = true;
        self.pauses.fetch_add(1, Ordering::SeqCst);
        if self.fail_pause {
            return Err("vCPU 1 did not stop (vCPU 0 is paused)".into());
        }
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        *self.gate.paused.lock().unwrap() = false;
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        Ok(self.state.clone())
    }
    fn set_throttle(&self, percent: u8) -> Result<bool, BoxError> {
        self.throttle.store(percent.into(), Ordering::SeqCst);
        self.max_throttle
            .fetch_max(percent.into(), Ordering::SeqCst);
        Ok(true)
    }
}

impl VmRestore for TestVm {
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        self.restores.fetch_add(1, Ordering::SeqCst);
        if self.fail_restore {
            return Err("restore refused".into());
        }
        *self.restored.lock().unwrap() = blobs.to_vec();
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Page-by-page comparison; returns the differing (block, page) pairs.
pub fn diff_ram(a: &MemorySystem, b: &MemorySystem) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let (mut x, mut y) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
    for (ba, bb) in a.ram_blocks().iter().zip(b.ram_blocks()) {
        for page in 0..ba.pages() {
            ba.read(page * PAGE_SIZE, &mut x).unwrap();
            bb.read(page * PAGE_SIZE, &mut y).unwrap();
            if x != y {
                out.push((ba.name().to_string(), page));
            }
        }
    }
    out
}

/// The source side: each connection is an in-memory pair whose far end goes to the destination.
pub struct Pipes(pub std::sync::mpsc::Sender<Transport>);

impl ChannelConnector for Pipes {
    fn connect(&mut self) -> clearlog_migration::Result<Transport> {
        let (ours, theirs) = mem_channel();
        self.0
            .send(theirs)
            .map_err(|_| Error::Handshake("the destination is gone".into()))?;
        Ok(ours)
    }
}

/// A `Write` into a shared buffer (to capture a stream).
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn state_blobs() -> Vec<StateBlob> {
    vec![
        StateBlob::new("vcpu0", (0..200u8).collect()),
        StateBlob::new("devices", b"serial=on".to_vec()),
    ]
}
