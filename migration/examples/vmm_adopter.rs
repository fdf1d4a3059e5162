// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A small cloud-hypervisor-shaped VMM that adopts clearlog for live migration.
//!
//! ```text
//! cargo run --release -p clearlog-migration --example vmm_adopter
//! ```
//!
//! The VMM owns its guest memory the way rust-vmm VMMs do: a vm-memory `GuestMemoryMmap` (two
//! regions, one above 4 GiB), with clearlog's `DirtyBitmap` as the bitmap backend instead of
//! vm-memory's `AtomicBitmap`. While it runs, a "virtio" device thread writes descriptors' buffers
//! and used-ring entries through vm-memory (`write_slice`, `get_slice` + `write_obj`), and a writer
//! thread stands in for the guest's vCPU (on a real VMM the vCPU's writes are reported by KVM through
//! `clearlog-kvm`'s listener; here there is no KVM, so its writes go through vm-memory too and are
//! tracked by the same bitmap). The source migrates over a Unix socket to a destination VMM in
//! another thread, with chunked clears, then the example compares the two memories byte for byte.
//! The last line says whether the destination holds exactly the source's memory at switchover; the
//! exit code is 0 only if it does.
//!
//! `--untracked-writes` makes the vCPU stand-in write behind the bitmap's back (through the raw host
//! address), as a guest would if its VMM forgot to wire KVM's dirty log in: the check must then fail,
//! and `tests/examples.rs` asserts that it does.
//!
//! Adopter glue, the lines between the `glue begin`/`glue end` markers (everything that is not the
//! example's own VMM): 47 lines. `vmm_adopter_glue_is_small` in `tests/examples.rs` counts them.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use clearlog_memory::DirtyBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The guest's RAM layout: low memory, and a region above the 32-bit hole.
const RAM: [(u64, usize); 2] = [(0, 48 << 20), (1 << 32, 16 << 20)];
/// Where the "virtio" device keeps its used ring, and the buffers it fills.
const USED_RING: u64 = 0x10_0000;
const BUFFERS: u64 = 0x20_0000;

type Memory = GuestMemoryMmap<DirtyBitmap>;

/// The VMM's own guest memory, as any vm-memory VMM builds it.
fn guest_memory() -> Memory {
    let ranges: Vec<_> = RAM.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// The VMM's workers (device + vCPU stand-in), which pause at a barrier like real vCPUs do.
struct Workers {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    rendezvous: Arc<Barrier>,
    used_idx: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    fn start(mem: &Memory, untracked: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        // The two workers and the VMM thread meet here at every pause and resume.
        let rendezvous = Arc::new(Barrier::new(3));
        let used_idx = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for role in 0..2u64 {
            let (mem, stop, paused, rendezvous, used_idx) = (
                mem.clone(),
                stop.clone(),
                paused.clone(),
                rendezvous.clone(),
                used_idx.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ role;
                while !stop.load(Ordering::Acquire) {
                    if paused.load(Ordering::Acquire) {
                        rendezvous.wait(); // paused
                        rendezvous.wait(); // resumed
                        continue;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if role == 0 {
                        // The virtio device: fill a buffer, then publish a used-ring entry.
                        let idx = used_idx.fetch_add(1, Ordering::Relaxed);
                        let buf = GuestAddress(BUFFERS + (x % 512) * 4096);
                        mem.write_slice(&x.to_le_bytes().repeat(64), buf).unwrap();
                        let entry = mem.get_slice(GuestAddress(USED_RING + (idx % 256) * 8), 8);
                        entry.unwrap().write_obj(idx, 0).unwrap();
                    } else {
                        // The vCPU stand-in: random 8-byte writes anywhere in RAM.
                        let (base, size) = RAM[(x % 2) as usize];
                        let addr = GuestAddress(base + (x >> 8) % (size as u64 / 8) * 8);
                        if untracked {
                            let host = mem.get_host_address(addr).unwrap().cast::<u64>();
                            // SAFETY: `addr` is 8-byte aligned inside a region of `mem`, whose
                            // mapping lives as long as `mem` (this thread holds a clone); a
                            // volatile store is how guest memory is written behind Rust's back.
                            unsafe { host.write_volatile(x) };
                        } else {
                            mem.write_obj(x, addr).unwrap();
                        }
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
            }));
        }
        Workers {
            stop,
            paused,
            rendezvous,
            used_idx,
            threads,
        }
    }

    fn pause(&self) {
        self.paused.store(true, Ordering::Release);
        self.rendezvous.wait();
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.rendezvous.wait();
    }

    fn stop(self) {
        let paused = self.paused.load(Ordering::Acquire);
        self.stop.store(true, Ordering::Release);
        if paused {
            self.resume();
        }
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

// --- glue begin ---
use clearlog_memory::MemorySystem;
use clearlog_migration::{
    connect, BoxError, CancelToken, Destination, ListenOptions, Listener, MigrationConfig,
    MigrationDirtyLogMode, Source, StateBlob, VmControl, VmRestore,
};

impl VmControl for Workers {
    fn pause(&self) -> Result<(), BoxError> {
        Workers::pause(self);
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        Workers::resume(self);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        let idx = self.used_idx.load(Ordering::Relaxed).to_le_bytes().to_vec();
        Ok(vec![StateBlob::new("virtio-used-idx", idx)])
    }
}

/// The destination VMM's restore hook: keeps the device state it was given.
struct Restored(Mutex<Vec<StateBlob>>);
impl VmRestore for Restored {
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        *self.0.lock().unwrap() = blobs.to_vec();
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        Ok(())
    }
}
// --- glue end ---

fn main() -> ExitCode {
    let socket = std::env::temp_dir().join(format!("vmm-adopter-{}.sock", std::process::id()));
    let uri = format!("unix:{}", socket.display());

    let untracked = std::env::args().any(|a| a == "--untracked-writes");
    let source_mem = guest_memory();
    let workers = Workers::start(&source_mem, untracked);
    let dest_mem = guest_memory();
    let restored = Restored(Mutex::new(Vec::new()));

    // --- glue begin ---
    let source = MemorySystem::new();
    source.add_guest_memory(&source_mem).unwrap();
    let destination = MemorySystem::new();
    destination.add_guest_memory(&dest_mem).unwrap();
    let listener = Listener::bind(&uri).expect("bind the migration socket");
    let config = MigrationConfig::default()
        .with_mode(MigrationDirtyLogMode::from_clear_chunk_bytes(1 << 20).unwrap())
        .with_bandwidth_limit_bytes_per_s(256 << 20);
    let (sent, received) = std::thread::scope(|s| {
        let incoming = s.spawn(|| {
            let incoming = listener.accept_incoming(&ListenOptions::default())?;
            Destination::new(&destination).receive_incoming_paused(incoming, &restored)
        });
        std::thread::sleep(Duration::from_millis(200)); // let the guest run a little
        let sent = Source::new(&source, config)
            .and_then(|s| s.migrate(connect(&uri)?, &workers, None, &CancelToken::new()));
        (sent, incoming.join().unwrap())
    });
    // --- glue end ---

    let outcome = match (&sent, &received) {
        (Ok(stats), Ok(incoming)) => {
            println!(
                "migrated {} MiB in {:.0} ms ({} iterations, {} pages re-sent, downtime {:.1} ms); \
                 destination loaded {} pages",
                stats.guest_mem_bytes >> 20,
                stats.total_time_ms,
                stats.iterations,
                stats.resent_pages,
                stats.downtime_ms,
                incoming.pages_received,
            );
            let state_ok = *restored.0.lock().unwrap() == workers.save_state().unwrap();
            let differing = differing_pages(&source_mem, &dest_mem);
            println!(
                "device state carried over: {}",
                if state_ok { "yes" } else { "NO" }
            );
            println!(
                "destination memory is byte-equal to the source's at switchover: {}",
                if differing == 0 {
                    "yes".to_string()
                } else {
                    format!("NO ({differing} pages differ)")
                }
            );
            state_ok && differing == 0
        }
        (s, d) => {
            eprintln!("migration failed: source {s:?}, destination {d:?}");
            println!("destination memory is byte-equal to the source's at switchover: NO (migration failed)");
            false
        }
    };
    // After the commit the source stays paused (its guest runs at the destination, or, if the
    // verification failed, waits here intact for its owner to decide).
    workers.stop();
    if outcome {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Pages whose bytes differ between the two memories (same layout).
fn differing_pages(a: &Memory, b: &Memory) -> u64 {
    let mut differing = 0;
    let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
    for region in a.iter() {
        let base = region.start_addr().0;
        for page in 0..region.len() / 4096 {
            let addr = GuestAddress(base + page * 4096);
            a.read_slice(&mut pa, addr).unwrap();
            b.read_slice(&mut pb, addr).unwrap();
            differing += u64::from(pa != pb);
        }
    }
    differing
}
