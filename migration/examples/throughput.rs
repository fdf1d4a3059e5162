// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Measures the engine's unlimited throughput over the in-memory channel and loopback TCP, the CPU
//! time per page of each side, and the cost of hashing RAM for the digest table.
//!
//! `cargo run --release -p clearlog-migration --example throughput -- [MIB]` (default 1024 MiB; the guest
//! is filled with non-zero pages so every page goes out as data).

use std::time::Instant;

use clearlog_memory::{MemorySystem, PAGE_SIZE};
use clearlog_migration::{
    connect, mem_channel, page_digests, BoxError, CancelToken, Destination, Listener,
    MigrationConfig, MigrationStats, Source, StateBlob, Transport, VerifyMode, VmControl,
    VmRestore,
};

struct Vm;

impl VmControl for Vm {
    fn pause(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        Ok(vec![StateBlob::new("cpu", vec![0; 4096])])
    }
}

impl VmRestore for Vm {
    fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        Ok(())
    }
}

fn guest(size: u64, fill: bool) -> MemorySystem {
    let mem = MemorySystem::new();
    mem.add_ram("ram", 0, size).expect("add_ram");
    if fill {
        let block = &mem.ram_blocks()[0];
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..block.pages() {
            page[..8].copy_from_slice(&(p + 1).to_le_bytes());
            page[4000..4008].copy_from_slice(&(!p).to_le_bytes());
            block.write_untracked(p * PAGE_SIZE, &page).expect("write");
        }
    }
    mem
}

fn report(name: &str, s: &MigrationStats, secs: f64) {
    let mib = s.bytes_sent as f64 / f64::from(1 << 20);
    println!(
        "{name}: {mib:.0} MiB in {secs:.2} s = {:.0} MiB/s end to end; live-phase bandwidth {:.0} MiB/s; \
         downtime {:.1} ms (strict verification {:.1} ms of it); verification after the commit {:.1} ms; iterations {}",
        mib / secs,
        s.measured_bandwidth_bytes_per_s as f64 / f64::from(1 << 20),
        s.downtime_ms,
        s.downtime_breakdown.verify_ms,
        s.verify_after_ms,
        s.iterations
    );
}

fn run(
    name: &str,
    config: MigrationConfig,
    src: &MemorySystem,
    dst: &MemorySystem,
    src_t: Transport,
    dst_t: impl FnOnce() -> Transport + Send,
) {
    let t = Instant::now();
    let stats = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(dst).receive(dst_t(), &Vm));
        let s = Source::new(src, config)
            .expect("config")
            .migrate(src_t, &Vm, None, &CancelToken::new())
            .expect("migrate");
        let inc = d.join().expect("join").expect("receive");
        println!(
            "  destination verify {:.1} ms; CPU per page: source {:.0} ns, destination {:.0} ns",
            inc.verify_ms, s.source_ns_per_page, inc.dest_ns_per_page
        );
        s
    });
    report(name, &stats, t.elapsed().as_secs_f64());
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let src = guest(size, true);
    let dst = guest(size, false);

    for threads in [1, 2] {
        let t = Instant::now();
        let d = page_digests(&src.ram_blocks()[0], threads).expect("digests");
        let secs = t.elapsed().as_secs_f64();
        println!(
            "digest of {mib} MiB with {threads} thread(s): {:.1} ms ({:.0} ms per GiB); {} pages",
            secs * 1000.0,
            secs * 1000.0 * 1024.0 / mib as f64,
            d.len()
        );
    }

    // The first run also pays for faulting in the destination's fresh RAM; the second shows the engine.
    for round in ["first", "second"] {
        let (a, b) = mem_channel();
        run(
            &format!("mem_channel ({round} run)"),
            MigrationConfig::default(),
            &src,
            &dst,
            a,
            || b,
        );
    }

    let listener = Listener::bind("tcp:127.0.0.1:0").expect("bind");
    let uri = listener.local_uri().expect("uri");
    for verify in [VerifyMode::AfterResume, VerifyMode::Strict] {
        let config = MigrationConfig::default().with_verify(verify);
        let name = format!("tcp loopback, {} verification", verify.name());
        run(
            &name,
            config,
            &src,
            &dst,
            connect(&uri).expect("connect"),
            || listener.accept().expect("accept"),
        );
    }
}
