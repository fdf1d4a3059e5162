// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writes the seed corpus of the stream-decoder fuzz targets (`migration/fuzz/`): real streams made by
//! [`Source`], for the guest the fuzz targets load into (one 1 MiB RAM block named `ram` at 0).
//!
//! `cargo run -p clearlog-migration --example fuzz_corpus -- [OUT_DIR]` (default `migration/fuzz/corpus`)
//! writes the same files into `OUT_DIR/destination/` and `OUT_DIR/stream_reader/`:
//!
//! - idle RAM (zero pages but a few) and dirty RAM (a writer thread rewrites a few hot pages while the
//!   migration runs, under a bandwidth limit, so the stream has several passes and repeated pages);
//! - both verification modes (`AfterResume`: the final digests and, acknowledged, the confirmation
//!   follow the end marker; `Strict`: a digest table before it), clear and legacy dirty-log modes;
//! - several state blobs (one empty, one 64 KiB);
//! - with and without the acknowledgement flag (the source is given a reader holding an `ACK1`
//!   answer and a positive verdict).
//!
//! The corpus is kept small (well under 2 MB in total): few data pages per stream.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clearlog_memory::{MemorySystem, PAGE_SIZE};
use clearlog_migration::stream::{ACK_MAGIC, ACK_OK, VERDICT_MAGIC, VERDICT_OK};
use clearlog_migration::{
    BoxError, CancelToken, MigrationConfig, MigrationDirtyLogMode, Source, StateBlob, Transport,
    VerifyMode, VmControl,
};

/// The fuzz targets' guest: one block `ram` of 1 MiB at guest address 0.
const RAM_NAME: &str = "ram";
const RAM_SIZE: u64 = 1 << 20;

/// A source VM whose "vCPU" is a writer thread; pausing stops it.
struct Vm {
    paused: Arc<AtomicBool>,
    blobs: Vec<StateBlob>,
}

impl VmControl for Vm {
    fn pause(&self) -> Result<(), BoxError> {
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        Ok(self.blobs.clone())
    }
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Case {
    name: &'static str,
    dirty: bool,
    verify: VerifyMode,
    mode: MigrationDirtyLogMode,
    ack: bool,
    blobs: Vec<StateBlob>,
}

fn stream(case: &Case) -> Vec<u8> {
    let mem = MemorySystem::with_ram_capacity(RAM_SIZE);
    mem.add_ram(RAM_NAME, 0, RAM_SIZE).expect("add_ram");
    let block = mem.ram_blocks()[0].clone();
    // A few non-zero pages (deterministic), the rest zero.
    let data_pages: &[u64] = if case.dirty {
        &[0, 1, 2, 17, 64, 100, 200, 255]
    } else {
        &[3, 128]
    };
    for &p in data_pages {
        let page: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| (i as u8) ^ (p as u8) ^ 0x5a)
            .collect();
        block.write_untracked(p * PAGE_SIZE, &page).unwrap();
    }
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = case.dirty.then(|| {
        let (block, paused, stop) = (block.clone(), paused.clone(), stop.clone());
        std::thread::spawn(move || {
            // Six hot pages, one of which is sometimes zeroed again (a page that goes data -> zero).
            let hot = [1u64, 5, 17, 33, 130, 254];
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if !paused.load(Ordering::SeqCst) {
                    let page = hot[(n % hot.len() as u64) as usize];
                    if n % 13 == 0 {
                        block
                            .write(33 * PAGE_SIZE, &[0u8; PAGE_SIZE as usize])
                            .unwrap();
                    } else {
                        block
                            .write(page * PAGE_SIZE + (n % 512) * 8, &n.to_le_bytes())
                            .unwrap();
                    }
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    });
    let out = SharedBuf::default();
    let ack: Option<Box<dyn clearlog_migration::TransportRead>> = case.ack.then(|| {
        let mut a = Vec::new();
        a.extend_from_slice(&ACK_MAGIC.to_le_bytes());
        a.extend_from_slice(&ACK_OK.to_le_bytes());
        // The verdict a destination sends after checking the final digests (verified, resumed
        // at an unknown time).
        a.extend_from_slice(&VERDICT_MAGIC.to_le_bytes());
        a.extend_from_slice(&VERDICT_OK.to_le_bytes());
        a.extend_from_slice(&0u64.to_le_bytes());
        a.extend_from_slice(&0u64.to_le_bytes());
        let a: &'static [u8] = Box::leak(a.into_boxed_slice());
        Box::new(a) as Box<dyn clearlog_migration::TransportRead>
    });
    let config = MigrationConfig::default()
        .with_mode(case.mode)
        .with_verify(case.verify)
        // Slow enough (about 0.25 s for the whole 1 MiB if all data) that the writer dirties pages
        // between passes; idle streams are tiny anyway.
        .with_bandwidth_limit_bytes_per_s(if case.dirty { 256 << 10 } else { 0 })
        .with_downtime_limit(Duration::from_millis(100))
        .with_max_time(Some(Duration::from_secs(30)));
    let vm = Vm {
        paused,
        blobs: case.blobs.clone(),
    };
    let stats = Source::new(&mem, config)
        .unwrap()
        .migrate(
            Transport::new(ack, Some(Box::new(out.clone()))),
            &vm,
            None,
            &CancelToken::new(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    stop.store(true, Ordering::SeqCst);
    if let Some(w) = writer {
        w.join().unwrap();
    }
    let bytes = out.0.lock().unwrap().clone();
    println!(
        "{:<28} {:>7} bytes, {} iterations, {} pages sent",
        case.name,
        bytes.len(),
        stats.iterations,
        stats.pages_sent
    );
    bytes
}

fn main() {
    let out: PathBuf = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"),
        PathBuf::from,
    );
    let two = || {
        vec![
            StateBlob::new("vcpu0", (0..=255u8).collect()),
            StateBlob::new("devices", b"serial=on".to_vec()),
        ]
    };
    let many = || {
        vec![
            StateBlob::new("vcpu0", (0..200u8).collect()),
            StateBlob::new("vcpu1", (0..200u8).rev().collect()),
            StateBlob::new("empty", Vec::new()),
            StateBlob::new("big", vec![0xa5; 64 << 10]),
            StateBlob::new("devices", b"serial=on,virtio-net=off".to_vec()),
        ]
    };
    let clear = MigrationDirtyLogMode::Clear { shift: 6 };
    let cases = [
        Case {
            name: "idle-after",
            dirty: false,
            verify: VerifyMode::AfterResume,
            mode: clear,
            ack: false,
            blobs: two(),
        },
        Case {
            name: "idle-strict",
            dirty: false,
            verify: VerifyMode::Strict,
            mode: clear,
            ack: false,
            blobs: two(),
        },
        Case {
            name: "idle-after-ack-noblobs",
            dirty: false,
            verify: VerifyMode::AfterResume,
            mode: clear,
            ack: true,
            blobs: Vec::new(),
        },
        Case {
            name: "dirty-after",
            dirty: true,
            verify: VerifyMode::AfterResume,
            mode: clear,
            ack: false,
            blobs: many(),
        },
        Case {
            name: "dirty-strict",
            dirty: true,
            verify: VerifyMode::Strict,
            mode: clear,
            ack: false,
            blobs: many(),
        },
        Case {
            name: "dirty-strict-legacy-ack",
            dirty: true,
            verify: VerifyMode::Strict,
            mode: MigrationDirtyLogMode::Legacy,
            ack: true,
            blobs: two(),
        },
        Case {
            name: "dirty-after-ack",
            dirty: true,
            verify: VerifyMode::AfterResume,
            mode: clear,
            ack: true,
            blobs: two(),
        },
    ];
    let streams: Vec<(&str, Vec<u8>)> = cases.iter().map(|c| (c.name, stream(c))).collect();
    for target in ["destination", "stream_reader"] {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &streams {
            std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
        }
    }
    let total: usize = streams.iter().map(|(_, b)| b.len()).sum();
    println!(
        "wrote {} streams ({} bytes) into each of {}/{{destination,stream_reader}}",
        streams.len(),
        total,
        out.display()
    );
}
