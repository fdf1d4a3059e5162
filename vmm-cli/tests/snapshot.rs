// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live diff snapshots on real KVM: `vmm snapshot` of an increment guest, a full snapshot and
//! five diffs, restored by `vmm incoming --from file:` eagerly and lazily (the increment rule
//! checked, every page checked against the digests of the pause); a lost dirty bit and a
//! damaged, truncated or unlinked file refused; and, in one process, a migration and the
//! snapshots' dirty epochs tracking the same guest at once, neither losing a write.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use clearlog_memory::DirtyEpochs;
use clearlog_migration::snapshot::{restore, SnapshotChain, SnapshotOptions, Snapshotter};
use clearlog_migration::{
    connect, BoxError, CancelToken, Destination, Listener, MigrationConfig, MigrationDirtyLogMode,
    Source, StateBlob, VmControl, VmRestore,
};
use clearlog_test_guest::workload::check::check_increment;
use clearlog_test_guest::workload::WorkloadSpec;
use clearlog_test_guest::{Guest, GuestConfig};
use common::*;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn vmm(args: &[&str]) -> Output {
    Command::new(VMM).args(args).output().expect("run vmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `vmm snapshot` of a small increment guest into `dir`: `count` snapshots.
fn take(dir: &Path, dirty_log: &str, count: u32, extra: &[&str]) -> serde_json::Value {
    let count = count.to_string();
    let mut args = vec![
        "snapshot",
        "--mem",
        "128M",
        "--wss",
        "8M",
        "--dirty-rate",
        "4M",
        "--workload",
        "increment",
        "--dirty-log",
        dirty_log,
        "--warmup",
        "300ms",
        "--every",
        "300ms",
        "--count",
        &count,
        "--no-sync",
        "--json",
        "--dir",
    ];
    let dir = dir.display().to_string();
    args.push(&dir);
    args.extend(extra);
    let out = vmm(&args);
    assert!(
        out.status.success(),
        "vmm {args:?}: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("json");
    v
}

/// `vmm incoming --from file:PATH [--lazy] --json`.
fn restore_cli(path: &Path, lazy: bool) -> Output {
    let from = format!("file:{}", path.display());
    let mut args = vec![
        "incoming",
        "--from",
        &from,
        "--run-after",
        "300ms",
        "--json",
    ];
    if lazy {
        args.push("--lazy");
    }
    vmm(&args)
}

fn chain_restores(dirty_log: &str) {
    let dir = TempDir::new(&format!("snapshot-chain-{dirty_log}"));
    // The legacy chain is compressed: a restore reads compressed and plain runs alike.
    let compress: &[&str] = if dirty_log == "legacy" {
        &["--compress"]
    } else {
        &[]
    };
    let v = take(dir.path(), dirty_log, 6, compress);
    let snaps = v["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 6);
    for (n, s) in snaps.iter().enumerate() {
        assert_eq!(s["sequence"], n as u64, "{s}");
        assert!(
            s["pages"].as_u64().unwrap() > 0,
            "snapshot {n} is empty: {s}"
        );
    }
    // A diff holds what changed, not the guest: the 8 MiB working set, not 128 MiB.
    assert!(
        snaps[5]["pages"].as_u64().unwrap() <= 2048 + 512,
        "{}",
        snaps[5]
    );
    let newest = dir.path().join("snap-5.clsnap");
    for lazy in [false, true] {
        let out = restore_cli(&newest, lazy);
        let err = text(&out.stderr);
        assert!(out.status.success(), "restore (lazy {lazy}): {err}");
        let r: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("json");
        assert_eq!(r["files"], 6, "{r}");
        assert_eq!(r["increment_consistent"], true, "{r}");
        assert_eq!(r["restore"]["verified_pages"], 128 * 256, "{r}");
        assert!(r["pages_written_after_resume"].as_u64().unwrap() > 0, "{r}");
    }
}

#[test]
fn a_full_snapshot_and_five_diffs_restore_eagerly_and_lazily_clear() {
    if !kvm_available("a_full_snapshot_and_five_diffs_restore_eagerly_and_lazily_clear") {
        return;
    }
    let _serial = serial();
    chain_restores("clear");
}

#[test]
fn a_full_snapshot_and_five_diffs_restore_eagerly_and_lazily_legacy() {
    if !kvm_available("a_full_snapshot_and_five_diffs_restore_eagerly_and_lazily_legacy") {
        return;
    }
    let _serial = serial();
    chain_restores("legacy");
}

/// A dirty bit lost in the last diff: both restores refuse with exit code 3 and no guest runs
/// on the stale page.
#[test]
fn a_lost_dirty_bit_in_a_diff_is_caught_at_restore() {
    if !kvm_available("a_lost_dirty_bit_in_a_diff_is_caught_at_restore") {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("snapshot-lossy");
    let v = take(dir.path(), "clear", 3, &["--fault", "lose-dirty-bits=8"]);
    assert!(v["lost_dirty_bits"].as_u64().unwrap() > 0, "{v}");
    let newest = dir.path().join("snap-2.clsnap");
    for lazy in [false, true] {
        let out = restore_cli(&newest, lazy);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "lazy {lazy}: {err}");
        assert!(err.contains("verification FAILED"), "{err}");
    }
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
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
}

/// A damaged page of a diff (exit 3), a truncated diff and a parent from another chain (exit 1):
/// each refused before a guest resumes.
#[test]
fn a_damaged_truncated_or_unlinked_diff_is_refused() {
    if !kvm_available("a_damaged_truncated_or_unlinked_diff_is_refused") {
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("snapshot-damaged");
    take(dir.path(), "clear", 2, &[]);
    let diff = dir.path().join("snap-1.clsnap");
    let bytes = std::fs::read(&diff).unwrap();
    let at = (2 << 20) + bytes[2 << 20..].iter().position(|&b| b != 0).unwrap() as u64;
    flip(&diff, at);
    let out = restore_cli(&diff, false);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no guest was resumed"), "{err}");
    flip(&diff, at);
    let f = std::fs::OpenOptions::new().write(true).open(&diff).unwrap();
    f.set_len(bytes.len() as u64 - 4096).unwrap();
    let out = restore_cli(&diff, true);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("truncated") && err.contains("no guest was resumed"),
        "{err}"
    );
    f.set_len(bytes.len() as u64).unwrap();
    std::fs::write(&diff, &bytes).unwrap();
    let other = TempDir::new("snapshot-other");
    take(other.path(), "clear", 1, &[]);
    std::fs::copy(
        other.path().join("snap-0.clsnap"),
        dir.path().join("snap-0.clsnap"),
    )
    .unwrap();
    let out = restore_cli(&diff, false);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another chain"), "{err}");
}

/// Pauses nest: the guest runs only when every pauser resumed it (a migration's switchover and
/// a snapshot's pause may overlap).
struct NestedPause<'a> {
    guest: &'a Guest,
    depth: &'a std::sync::Mutex<u32>,
}

impl VmControl for NestedPause<'_> {
    fn pause(&self) -> Result<(), BoxError> {
        let mut d = self.depth.lock().unwrap();
        if *d == 0 {
            self.guest.pause()?;
        }
        *d += 1;
        Ok(())
    }
    fn resume(&self) -> Result<(), BoxError> {
        let mut d = self.depth.lock().unwrap();
        *d -= 1;
        if *d == 0 {
            self.guest.resume()?;
        }
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        GuestControl(self.guest).save_state()
    }
}

/// Restores the state but leaves the guest paused, to check its memory first.
struct Paused<'a>(&'a Guest);

impl VmRestore for Paused<'_> {
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        GuestControl(self.0).restore_state(blobs)
    }
    fn resume(&self) -> Result<(), BoxError> {
        Ok(())
    }
}

const MEM: u64 = 128 << 20;

/// A migration (clear mode, chunked clears) and a snapshot chain on the same running increment
/// guest, at once: the destination and the restored chain both hold the increment rule, and
/// the chain's restore verifies against its pause's digests.
#[test]
fn a_migration_and_snapshot_epochs_at_once_lose_nothing() {
    if !kvm_available("a_migration_and_snapshot_epochs_at_once_lose_nothing") {
        return;
    }
    let _serial = serial();
    let src = Guest::boot(GuestConfig {
        mem_bytes: MEM,
        vcpus: 1,
        dirty_log: None,
        workload: WorkloadSpec::Increment {
            wss_bytes: 8 << 20,
            dirty_rate_bytes_per_s: 4 << 20,
        },
        ..GuestConfig::default()
    })
    .expect("boot");
    assert!(src.dirty_log_mode().is_manual(), "{}", src.dirty_log_mode());
    std::thread::sleep(Duration::from_millis(300));
    let dst = Guest::create(GuestConfig {
        mem_bytes: MEM,
        vcpus: 0,
        ..GuestConfig::default()
    })
    .expect("destination");
    let dir = TempDir::new("snapshot-with-migration");
    let depth = std::sync::Mutex::new(0);
    let control = NestedPause {
        guest: &src,
        depth: &depth,
    };
    let taken = AtomicU32::new(0);
    let listener = Listener::bind("tcp:127.0.0.1:0").expect("bind");
    let uri = listener.local_uri().expect("uri");
    let config = MigrationConfig::default()
        .with_mode(MigrationDirtyLogMode::Clear { shift: 12 })
        .with_bandwidth_limit_bytes_per_s(8 << 20)
        .with_max_time(Some(Duration::from_secs(90)));
    let (migrated, received) = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let t = listener.accept().expect("accept");
            Destination::new(dst.memory()).receive_paused(t, &GuestControl(&dst))
        });
        let snapshots = s.spawn(|| {
            let epochs = DirtyEpochs::open(src.memory().as_ref()).expect("epochs");
            let options = SnapshotOptions {
                sync: false,
                ..SnapshotOptions::default()
            };
            let mut snap = Snapshotter::new(src.memory().as_ref(), epochs, &control, options);
            for n in 0..5 {
                snap.snapshot(&dir.path().join(format!("snap-{n}.clsnap")))
                    .expect("snapshot");
                taken.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
            snap.into_epochs().close().expect("close");
        });
        // The migration starts once the chain has its full snapshot.
        while taken.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let source = Source::new(src.memory(), config).expect("config");
        let stats = source.migrate(
            connect(&uri).expect("connect"),
            &control,
            None,
            &CancelToken::new(),
        );
        snapshots.join().expect("snapshot thread");
        (stats, receiver.join().expect("receiver"))
    });
    let stats = migrated.expect("migration");
    assert!(stats.converged, "{stats:?}");
    received.expect("incoming");
    let check = check_increment(dst.ram()).expect("check");
    assert!(check.is_consistent(), "migrated: {check:?}");
    assert_eq!(first_ram_difference(&src, &dst), None);
    let restored = Guest::create(GuestConfig {
        mem_bytes: MEM,
        vcpus: 0,
        ..GuestConfig::default()
    })
    .expect("restore guest");
    let chain = SnapshotChain::open(&dir.path().join("snap-4.clsnap")).expect("chain");
    let r = restore(&chain, restored.memory().as_ref(), &Paused(&restored)).expect("restore");
    assert_eq!(r.verified_pages, MEM / 4096);
    let check = check_increment(restored.ram()).expect("check");
    assert!(check.is_consistent(), "restored: {check:?}");
}
