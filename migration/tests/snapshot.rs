// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live diff snapshots of a memory a "guest" thread keeps writing, restored eagerly and lazily
//! (real userfaultfd), with the chain's failures: lost dirty bits, damaged, truncated and
//! unlinked files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clearlog_memory::{DirtyEpochs, MemorySystem};
use clearlog_migration::snapshot::*;
use clearlog_migration::*;
use rand::{Rng, SeedableRng};

const LAYOUT: [(&str, u64, u64); 2] = [("low", 0, 1536), ("high", 1 << 32, 256)];

fn memory() -> MemorySystem {
    let mem = MemorySystem::with_ram_capacity(8 << 30);
    for (name, gpa, pages) in LAYOUT {
        mem.add_ram(name, gpa, pages * PAGE_SIZE).unwrap();
    }
    mem
}

/// Every byte of every block.
fn contents(mem: &MemorySystem) -> Vec<Vec<u8>> {
    mem.ram_blocks()
        .iter()
        .map(|b| {
            let mut v = vec![0u8; b.size() as usize];
            b.read(0, &mut v).unwrap();
            v
        })
        .collect()
}

/// A "guest" writing random words to random pages (a fifth of them zero pages) until stopped;
/// `pause` waits until it stands still. `save_state` records the memory at the pause.
struct Guest {
    mem: Arc<MemorySystem>,
    paused: AtomicBool,
    in_write: AtomicBool,
    stop: AtomicBool,
    writes: AtomicU64,
    at_pause: Mutex<Vec<Vec<Vec<u8>>>>,
}

impl Guest {
    fn run(&self, seed: u64) {
        let blocks = self.mem.ram_blocks();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::SeqCst) {
            if self.paused.load(Ordering::SeqCst) {
                std::thread::yield_now();
                continue;
            }
            self.in_write.store(true, Ordering::SeqCst);
            if !self.paused.load(Ordering::SeqCst) {
                let b = &blocks[rng.random_range(0..blocks.len())];
                let page = rng.random_range(0..b.pages());
                if rng.random_range(0..5) == 0 {
                    b.write(page * PAGE_SIZE, &[0u8; PAGE_SIZE as usize])
                        .unwrap();
                } else {
                    let at = page * PAGE_SIZE + rng.random_range(0..PAGE_SIZE / 8) * 8;
                    b.write(at, &rng.random::<u64>().to_le_bytes()).unwrap();
                }
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            self.in_write.store(false, Ordering::SeqCst);
        }
    }
}

impl VmControl for Guest {
    fn pause(&self) -> std::result::Result<(), BoxError> {
        self.paused.store(true, Ordering::SeqCst);
        while self.in_write.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        Ok(())
    }
    fn resume(&self) -> std::result::Result<(), BoxError> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> std::result::Result<Vec<StateBlob>, BoxError> {
        let n = self.at_pause.lock().unwrap().len();
        self.at_pause.lock().unwrap().push(contents(&self.mem));
        Ok(vec![StateBlob::new("cpu", n.to_le_bytes().to_vec())])
    }
}

/// The restoring side: records the state it was given and whether it resumed.
#[derive(Default)]
struct Restored {
    state: Mutex<Vec<StateBlob>>,
    resumed: AtomicBool,
}

impl VmRestore for Restored {
    fn restore_state(&self, blobs: &[StateBlob]) -> std::result::Result<(), BoxError> {
        *self.state.lock().unwrap() = blobs.to_vec();
        Ok(())
    }
    fn resume(&self) -> std::result::Result<(), BoxError> {
        self.resumed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Epochs that forget `lose` pages of the delta of the diff numbered `at` (its first live
/// pass): a dirty log that lost bits.
struct Lossy<E> {
    inner: E,
    advances: u32,
    at: u32,
    lose: usize,
}

impl<E: SnapshotEpochs> SnapshotEpochs for Lossy<E> {
    fn advance(&mut self) -> std::result::Result<Vec<Bitmap>, BoxError> {
        let mut delta = self.inner.advance()?;
        self.advances += 1;
        if self.advances == self.at {
            let mut lost = 0;
            for bits in &mut delta {
                let ones: Vec<usize> = bits.iter_ones().take(self.lose - lost).collect();
                lost += ones.len();
                ones.into_iter().for_each(|p| bits.clear(p));
            }
        }
        Ok(delta)
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clsnap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("snap-{n}.clsnap"))
}

/// Take a full snapshot and `diffs` diffs of a running guest into `dir`; the memory at each
/// pause. `lose`: drop that many dirty bits at the given advance.
fn take_chain(dir: &Path, diffs: usize, lose: Option<(u32, usize)>) -> Vec<Vec<Vec<u8>>> {
    take_chain_with(dir, diffs, lose, false)
}

/// [`take_chain`], `compress`ing every file.
fn take_chain_with(
    dir: &Path,
    diffs: usize,
    lose: Option<(u32, usize)>,
    compress: bool,
) -> Vec<Vec<Vec<u8>>> {
    let guest = Arc::new(Guest {
        mem: Arc::new(memory()),
        paused: AtomicBool::new(false),
        in_write: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
        at_pause: Mutex::new(Vec::new()),
    });
    // The first pages hold data before the tracking starts.
    let low = &guest.mem.ram_blocks()[0];
    for p in 0..64 {
        low.write(p * PAGE_SIZE, &[p as u8 + 1; 16]).unwrap();
    }
    let runner = {
        let g = guest.clone();
        std::thread::spawn(move || g.run(11))
    };
    let epochs = DirtyEpochs::open(guest.mem.as_ref()).unwrap();
    let (at, n) = lose.unwrap_or((0, 0));
    let lossy = Lossy {
        inner: epochs,
        advances: 0,
        at,
        lose: n,
    };
    let options = SnapshotOptions {
        sync: false,
        compress,
        ..SnapshotOptions::default()
    };
    let mut snap = Snapshotter::new(guest.mem.as_ref(), lossy, guest.as_ref(), options);
    let mut arm_faults = 0;
    for k in 0..=diffs {
        std::thread::sleep(Duration::from_millis(30));
        let stats = snap.snapshot(&file(dir, k)).unwrap();
        assert_eq!(stats.sequence, k as u64);
        assert!(stats.pause_ms >= 0.0 && stats.pages > 0, "{stats:?}");
        // Anonymous memory on this kernel: the digests are taken after the pause.
        assert!(stats.background_digests, "{stats:?}");
        arm_faults += stats.arm_faults;
    }
    // Armed before the pauses, the write-protection saw the guest's writes.
    assert!(
        arm_faults > 0,
        "no write faulted between an arming and its pause"
    );
    drop(snap);
    guest.stop.store(true, Ordering::SeqCst);
    runner.join().unwrap();
    assert!(
        guest.writes.load(Ordering::Relaxed) > 1000,
        "the guest barely ran"
    );
    std::mem::take(&mut *guest.at_pause.lock().unwrap())
}

/// What a restore returned, the memory it restored into, and what the "VMM" was told.
type Restore = (
    std::result::Result<RestoreStats, SnapshotError>,
    MemorySystem,
    Restored,
);

fn restore_eager(path: &Path) -> Restore {
    let mem = memory();
    let vm = Restored::default();
    let r = SnapshotChain::open(path).and_then(|c| restore(&c, &mem, &vm));
    (r, mem, vm)
}

/// `read`: a "guest" reads pages while they arrive (it would wait for good on a page a failed
/// restore never places).
fn restore_lazy(path: &Path, read: bool) -> Restore {
    let mem = memory();
    let vm = Restored::default();
    let r = SnapshotChain::open(path)
        .and_then(|c| LazyRestore::start(c, &mem, &vm))
        .and_then(|lazy| {
            for b in mem.ram_blocks().iter().filter(|_| read) {
                let mut word = [0u8; 8];
                for p in (0..b.pages()).rev().step_by(7) {
                    b.read(p * PAGE_SIZE, &mut word).unwrap();
                }
            }
            lazy.wait()
        });
    (r, mem, vm)
}

#[test]
fn a_chain_of_diffs_restores_to_each_pause_eagerly_and_lazily() {
    let d = dir("chain");
    let at_pause = take_chain(&d, 5, None);
    assert_eq!(at_pause.len(), 6);
    for (k, expected) in at_pause.iter().enumerate() {
        let (r, mem, vm) = restore_eager(&file(&d, k));
        let stats = r.unwrap_or_else(|e| panic!("restoring snapshot {k}: {e}"));
        assert_eq!(stats.files, k + 1);
        assert_eq!(&contents(&mem), expected, "snapshot {k}, eager");
        assert!(vm.resumed.load(Ordering::SeqCst));
        assert_eq!(vm.state.lock().unwrap()[0].data, k.to_le_bytes());
    }
    let (r, mem, vm) = restore_lazy(&file(&d, 5), true);
    let stats = r.unwrap();
    assert!(vm.resumed.load(Ordering::SeqCst));
    assert_eq!(&contents(&mem), &at_pause[5], "lazy");
    assert_eq!(
        stats.verified_pages,
        LAYOUT.iter().map(|l| l.2).sum::<u64>()
    );
    assert!(
        stats.faults > 0,
        "the reader never waited for a page: {stats:?}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_compressed_chain_restores_and_takes_less_disk() {
    let d = dir("compressed");
    let at_pause = take_chain_with(&d, 3, None, true);
    let disk = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let (r, mem, _) = restore_eager(&file(&d, 3));
    r.unwrap();
    assert_eq!(contents(&mem), at_pause[3]);
    let (r, mem, _) = restore_lazy(&file(&d, 3), true);
    r.unwrap();
    assert_eq!(contents(&mem), at_pause[3]);
    // The same guest uncompressed: the "guest" writes words into zero pages, which lz4 packs.
    let plain = dir("uncompressed");
    take_chain(&plain, 0, None);
    assert!(
        disk(&file(&d, 0)) * 4 < disk(&file(&plain, 0)),
        "compressed {} bytes, plain {}",
        disk(&file(&d, 0)),
        disk(&file(&plain, 0))
    );
    // A damaged compressed run: refused, never placed.
    let bytes = std::fs::read(file(&d, 3)).unwrap();
    let at = (2 << 20) + bytes[2 << 20..].iter().position(|&b| b != 0).unwrap() as u64 + 3;
    flip(&file(&d, 3), at);
    restore_eager(&file(&d, 3)).0.unwrap_err();
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::remove_dir_all(&plain).unwrap();
}

#[test]
fn lost_dirty_bits_are_caught_at_restore_eager_and_lazy() {
    let d = dir("lossy");
    // Each snapshot of this small guest takes two advances when full (a live pass, the pause)
    // and three as a diff (its first pass, the pass after arming the digests, the pause): advance 11 is the
    // pause of diff 3, the last, whose lost pages no later diff can bring back.
    // A delta may over-report (a page written during the advance before it), and losing such
    // a bit loses nothing: the whole delta is dropped, so pages written after their last copy
    // are lost for sure.
    take_chain(&d, 3, Some((11, usize::MAX)));
    let (r, _, vm) = restore_eager(&file(&d, 3));
    let e = r.unwrap_err();
    assert!(e.is_mismatch(), "{e}");
    assert!(!vm.resumed.load(Ordering::SeqCst));
    let (r, _, _) = restore_lazy(&file(&d, 3), false);
    assert!(r.unwrap_err().is_mismatch());
    std::fs::remove_dir_all(&d).unwrap();
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

#[test]
fn damaged_truncated_and_unlinked_files_are_refused() {
    let d = dir("damage");
    take_chain(&d, 2, None);
    let open_err = |p: &Path| {
        let e = SnapshotChain::open(p).unwrap_err();
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    };
    // A byte of a page the newest file holds: the restore's digests catch it.
    let data = std::fs::read(file(&d, 2)).unwrap();
    let at = (2 << 20) + data[2 << 20..].iter().position(|&b| b != 0).unwrap() as u64;
    flip(&file(&d, 2), at);
    let (r, _, vm) = restore_eager(&file(&d, 2));
    assert!(r.unwrap_err().is_mismatch());
    assert!(!vm.resumed.load(Ordering::SeqCst));
    assert!(restore_lazy(&file(&d, 2), false)
        .0
        .unwrap_err()
        .is_mismatch());
    flip(&file(&d, 2), at);
    restore_eager(&file(&d, 2)).0.unwrap();
    // The header, the meta, the length.
    let len = std::fs::metadata(file(&d, 1)).unwrap().len();
    flip(&file(&d, 1), 30);
    assert!(
        open_err(&file(&d, 2)).contains("header"),
        "{}",
        open_err(&file(&d, 2))
    );
    flip(&file(&d, 1), 30);
    flip(&file(&d, 1), len - 1 - 4096 * 3);
    assert!(open_err(&file(&d, 2)).contains("meta"));
    flip(&file(&d, 1), len - 1 - 4096 * 3);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file(&d, 2))
        .unwrap();
    f.set_len(len - 4096).unwrap();
    assert!(open_err(&file(&d, 2)).contains("truncated"));
    // A parent replaced by a snapshot of another chain.
    let other = dir("damage-other");
    take_chain(&other, 0, None);
    std::fs::copy(file(&other, 0), file(&d, 0)).unwrap();
    assert!(open_err(&file(&d, 1)).contains("another chain"));
    // A file whose writing never finished has no header.
    std::fs::write(file(&d, 0), vec![0u8; 8192]).unwrap();
    assert!(open_err(&file(&d, 0)).contains("never finished"));
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
}
