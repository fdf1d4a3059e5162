// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The engine over memory that is not `clearlog-memory`'s (`testing::PlainMemory`): these tests
//! run with and without the `clearlog-memory` feature (`cargo test -p clearlog-migration
//! --no-default-features --features testing`). A guest writer dirties pages while the engine
//! migrates, in every mode; the destination must hold exactly the source's final memory, and a
//! write no tracker sees must fail the verification on both sides.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use clearlog_migration::testing::PlainMemory;
use clearlog_migration::{
    mem_channel, BoxError, CancelToken, Destination, Error, MigrationBlock, MigrationConfig,
    MigrationDirtyLogMode, Source, StateBlob, VmControl, VmRestore, PAGE_SIZE,
};

const LAYOUT: &[(&str, u64)] = &[("low", 3 << 20), ("high", (1 << 20) + 5 * PAGE_SIZE)];

/// A writer thread standing in for a guest: writes pages until paused; `tracked` writes mark
/// their pages, the others do not (a write the VMM forgets to mark).
struct Guest {
    paused: Mutex<bool>,
    resumed: Condvar,
    stop: AtomicBool,
    writes: AtomicU64,
}

impl VmControl for Guest {
    fn pause(&self) -> Result<(), BoxError> {
        *self.paused.lock().unwrap() = true;
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        *self.paused.lock().unwrap() = false;
        self.resumed.notify_all();
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        Ok(vec![StateBlob::new("cpu", vec![7; 32])])
    }
}

struct Restored;
impl VmRestore for Restored {
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        assert_eq!(blobs.len(), 1);
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Writes until `guest.stop`, holding the pause lock across each write so that a pause waits
/// for the write in flight. `untracked_from`: after that many writes, every 50th write is
/// untracked.
fn write_loop(mem: &PlainMemory, guest: &Guest, untracked_from: Option<u64>) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while !guest.stop.load(Ordering::Acquire) {
        let paused = guest.paused.lock().unwrap();
        let paused = guest
            .resumed
            .wait_timeout_while(paused, Duration::from_millis(5), |p| *p)
            .unwrap()
            .0;
        if *paused || guest.stop.load(Ordering::Acquire) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = mem.block((x % 2) as usize);
        let offset = (x >> 8) % (block.size() / 8) * 8;
        let n = guest.writes.fetch_add(1, Ordering::Relaxed);
        let forget = untracked_from.is_some_and(|from| n >= from && n % 50 == 0);
        if forget {
            block.write_untracked(offset, &x.to_le_bytes()).unwrap();
        } else {
            block.write(offset, &x.to_le_bytes()).unwrap();
        }
        drop(paused);
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Migrates `src` (with a writer) to a fresh destination; both sides' results and the memories.
fn migrate(
    mode: MigrationDirtyLogMode,
    untracked_from: Option<u64>,
) -> (
    Result<(), Error>,
    Result<(), Error>,
    PlainMemory,
    PlainMemory,
) {
    let src = PlainMemory::new(LAYOUT);
    let dst = PlainMemory::new(LAYOUT);
    let guest = Guest {
        paused: Mutex::new(false),
        resumed: Condvar::new(),
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
    };
    let config = MigrationConfig::default()
        .with_mode(mode)
        .with_bandwidth_limit_bytes_per_s(32 << 20)
        .with_mid_pass_sync(Some(Duration::from_millis(20)));
    let (tx, rx) = mem_channel();
    let (sent, received) = std::thread::scope(|s| {
        let writer = s.spawn(|| write_loop(&src, &guest, untracked_from));
        while guest.writes.load(Ordering::Relaxed) < 200 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let incoming = s.spawn(|| Destination::new(&dst).receive_paused(rx, &Restored));
        let sent = Source::new(&src, config)
            .and_then(|source| source.migrate(tx, &guest, None, &CancelToken::new()));
        let received = incoming.join().unwrap();
        guest.stop.store(true, Ordering::Release);
        guest.resume().unwrap();
        writer.join().unwrap();
        (sent.map(drop), received.map(drop))
    });
    (sent, received, src, dst)
}

fn modes() -> [MigrationDirtyLogMode; 3] {
    [
        MigrationDirtyLogMode::Clear { shift: 6 },
        MigrationDirtyLogMode::Legacy,
        MigrationDirtyLogMode::Ring,
    ]
}

#[test]
fn the_destination_holds_the_sources_final_memory_in_every_mode() {
    for mode in modes() {
        let (sent, received, src, dst) = migrate(mode, None);
        sent.unwrap_or_else(|e| panic!("{mode:?}: source: {e}"));
        received.unwrap_or_else(|e| panic!("{mode:?}: destination: {e}"));
        for i in 0..LAYOUT.len() {
            assert!(
                src.block(i).bytes() == dst.block(i).bytes(),
                "{mode:?}: block {i} differs"
            );
        }
    }
}

#[test]
fn a_write_no_tracker_sees_fails_the_verification_on_both_sides() {
    for mode in modes() {
        let (sent, received, _, _) = migrate(mode, Some(300));
        assert!(
            matches!(received, Err(Error::VerificationFailed { .. })),
            "{mode:?}: destination: {received:?}"
        );
        assert!(
            matches!(sent, Err(Error::VerificationFailed { .. })),
            "{mode:?}: source: {sent:?}"
        );
    }
}
