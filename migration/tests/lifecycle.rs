// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Transports end to end, snapshot/restore, and the failure paths: cancel, transport errors, no
//! convergence, refusal, ack timeout. The source VM is never lost.

mod common;

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clearlog_migration::*;
use common::*;

const MIB: &[(&str, u64, u64)] = &[("ram", 0, 1 << 20)];

fn config() -> MigrationConfig {
    MigrationConfig::default()
        .with_bandwidth_limit_bytes_per_s(64 << 20)
        .with_downtime_limit(Duration::from_millis(10))
        .with_max_time(Some(Duration::from_secs(30)))
}

/// Migrate `src` (with a writer running for `active`) over `src_t`, receiving on `dst_t` into `dst`.
fn migrate_pair(
    src: &clearlog_memory::MemorySystem,
    dst: &clearlog_memory::MemorySystem,
    src_t: Transport,
    dst_t: impl FnOnce() -> Transport + Send,
    active: Duration,
) -> (MigrationStats, IncomingStats) {
    let vm_src = TestVm {
        state: state_blobs(),
        ..TestVm::default()
    };
    let vm_dst = TestVm::default();
    let writer = spawn_writer(src, Tracking::Host, vm_src.gate.clone(), 9, 20_000, active);
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(dst).receive(dst_t(), &vm_dst));
        let s =
            Source::new(src, config())
                .unwrap()
                .migrate(src_t, &vm_src, None, &CancelToken::new());
        (s, d.join().unwrap())
    });
    let diff = diff_ram(src, dst);
    vm_src.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let (s, d) = (s.unwrap(), d.unwrap());
    assert!(diff.is_empty(), "{} pages differ", diff.len());
    assert_eq!(*vm_dst.restored.lock().unwrap(), state_blobs());
    (s, d)
}

/// Migrate `src` into `dst` with `cfg` over an in-memory channel (the source's VM is `vm`, the
/// destination's a fresh one); both sides' results.
fn migrate_in_memory(
    src: &clearlog_memory::MemorySystem,
    dst: &clearlog_memory::MemorySystem,
    cfg: MigrationConfig,
    vm: &TestVm,
) -> (
    clearlog_migration::Result<MigrationStats>,
    clearlog_migration::Result<IncomingStats>,
) {
    let (src_t, dst_t) = mem_channel();
    let vm_dst = TestVm::default();
    std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(dst).receive(dst_t, &vm_dst));
        let s = Source::new(src, cfg)
            .unwrap()
            .migrate(src_t, vm, None, &CancelToken::new());
        (s, d.join().unwrap())
    })
}

#[test]
fn tcp_loopback() {
    let src = memory(LAYOUT);
    prefill(&src, 1);
    let dst = memory(LAYOUT);
    let listener = Listener::bind("tcp:127.0.0.1:0").unwrap();
    let uri = listener.local_uri().unwrap();
    let (s, d) = migrate_pair(
        &src,
        &dst,
        connect(&uri).unwrap(),
        || listener.accept().unwrap(),
        Duration::from_millis(200),
    );
    assert!(s.converged && d.acked && d.resumed);
    assert_eq!(d.bytes_received, s.bytes_sent);
}

#[test]
fn unix_socket() {
    let path = std::env::temp_dir().join(format!("clearlog-mig-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let uri = format!("unix:{}", path.display());
    let src = memory(LAYOUT);
    prefill(&src, 2);
    let dst = memory(LAYOUT);
    let listener = Listener::bind(&uri).unwrap();
    let (s, d) = migrate_pair(
        &src,
        &dst,
        connect(&uri).unwrap(),
        || listener.accept().unwrap(),
        Duration::from_millis(100),
    );
    assert!(s.converged && d.acked);
    drop(listener);
    assert!(!path.exists(), "socket file removed");
}

#[test]
fn file_snapshot_then_restore_and_continue() {
    let path = std::env::temp_dir().join(format!("clearlog-mig-test-{}.snap", std::process::id()));
    let uri = format!("file:{}", path.display());
    let src = memory(LAYOUT);
    prefill(&src, 3);
    let vm = TestVm {
        state: state_blobs(),
        ..TestVm::default()
    };
    let writer = spawn_writer(
        &src,
        Tracking::Host,
        vm.gate.clone(),
        3,
        20_000,
        Duration::from_millis(150),
    );
    let stats = Source::new(&src, config())
        .unwrap()
        .migrate(connect(&uri).unwrap(), &vm, None, &CancelToken::new())
        .unwrap();
    vm.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(stats.converged);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), stats.bytes_sent);

    // Restore into a fresh memory system: same RAM, state restored, resumed.
    let restored = memory(LAYOUT);
    let vm2 = TestVm::default();
    let inc = Destination::new(&restored)
        .receive(Listener::bind(&uri).unwrap().accept().unwrap(), &vm2)
        .unwrap();
    assert!(inc.resumed && !inc.acked);
    assert!(diff_ram(&src, &restored).is_empty());
    assert_eq!(*vm2.restored.lock().unwrap(), state_blobs());

    // The restored guest continues: it runs, and migrates on again correctly.
    let again = memory(LAYOUT);
    let (src_t, dst_t) = mem_channel();
    let (s, _) = migrate_pair(
        &restored,
        &again,
        src_t,
        || dst_t,
        Duration::from_millis(100),
    );
    assert!(s.converged);
    assert!(
        !diff_ram(&src, &restored).is_empty(),
        "the restored guest kept writing"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn cancel_during_live_phase_keeps_the_source_running() {
    let src = memory(LAYOUT);
    prefill(&src, 4);
    let dst = memory(LAYOUT);
    let vm = TestVm::default();
    let vm_dst = TestVm::default();
    let cancel = CancelToken::new();
    let (src_t, dst_t) = mem_channel();
    let cfg = config().with_bandwidth_limit_bytes_per_s(4 << 20);
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(&dst).receive(dst_t, &vm_dst));
        let c = cancel.clone();
        sc.spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.cancel();
        });
        let s = Source::new(&src, cfg)
            .unwrap()
            .migrate(src_t, &vm, None, &cancel);
        (s, d.join().unwrap())
    });
    assert!(matches!(s, Err(Error::Cancelled)), "{s:?}");
    assert!(matches!(d, Err(Error::Truncated(_))), "{d:?}");
    assert!(!src.global_logging());
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 0);
    assert_eq!(vm_dst.resumes.load(Ordering::SeqCst), 0);
}

/// A destination that reads the whole stream and then says nothing.
fn silent_destination(mut t: Transport) {
    let mut sink = Vec::new();
    let _ = t.reader.as_mut().unwrap().read_to_end(&mut sink);
}

#[test]
fn cancel_while_waiting_for_ack_resumes_the_source() {
    let src = memory(MIB);
    let vm = TestVm::default();
    let cancel = CancelToken::new();
    let (src_t, dst_t) = mem_channel();
    let s = std::thread::scope(|sc| {
        sc.spawn(move || silent_destination(dst_t));
        let c = cancel.clone();
        sc.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.cancel();
        });
        Source::new(&src, config())
            .unwrap()
            .migrate(src_t, &vm, None, &cancel)
    });
    assert!(matches!(s, Err(Error::Cancelled)), "{s:?}");
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1, "paused guest resumed");
    assert!(!src.global_logging());
}

#[test]
fn ack_timeout_resumes_the_source() {
    let src = memory(MIB);
    let vm = TestVm::default();
    let (src_t, dst_t) = mem_channel();
    let cfg = config().with_ack_timeout(Duration::from_millis(300));
    let s = std::thread::scope(|sc| {
        sc.spawn(move || silent_destination(dst_t));
        Source::new(&src, cfg)
            .unwrap()
            .migrate(src_t, &vm, None, &CancelToken::new())
    });
    assert!(
        matches!(s, Err(Error::AckTimeout(t)) if t == Duration::from_millis(300)),
        "{s:?}"
    );
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1);
}

#[test]
fn transport_error_resumes_the_source() {
    let src = memory(LAYOUT);
    prefill(&src, 5);
    let vm = TestVm::default();
    let (src_t, mut dst_t) = mem_channel();
    let s = std::thread::scope(|sc| {
        sc.spawn(move || {
            let mut buf = vec![0u8; 100_000];
            dst_t.reader.as_mut().unwrap().read_exact(&mut buf).unwrap();
            drop(dst_t); // the destination dies
        });
        Source::new(&src, config())
            .unwrap()
            .migrate(src_t, &vm, None, &CancelToken::new())
    });
    assert!(matches!(s, Err(Error::Io { .. })), "{s:?}");
    assert!(!src.global_logging());
    assert_eq!(
        vm.pauses.load(Ordering::SeqCst),
        vm.resumes.load(Ordering::SeqCst)
    );
}

#[test]
fn destination_refusal_resumes_the_source_not_the_destination() {
    let src = memory(MIB);
    prefill(&src, 6);
    let dst = memory(MIB);
    let vm = TestVm {
        state: state_blobs(),
        ..TestVm::default()
    };
    let vm_dst = TestVm {
        fail_restore: true,
        ..TestVm::default()
    };
    let (src_t, dst_t) = mem_channel();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(&dst).receive(dst_t, &vm_dst));
        let s = Source::new(&src, config())
            .unwrap()
            .migrate(src_t, &vm, None, &CancelToken::new());
        (s, d.join().unwrap())
    });
    assert!(
        matches!(s, Err(Error::DestinationRefused(stream::ACK_FAILED))),
        "{s:?}"
    );
    assert!(
        matches!(
            d,
            Err(Error::Vm {
                hook: "restore_state",
                ..
            })
        ),
        "{d:?}"
    );
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1);
    assert_eq!(vm_dst.resumes.load(Ordering::SeqCst), 0);
}

/// Keeps iterating until the limit, then fails saying so; never pauses.
#[test]
fn no_convergence_hits_the_iteration_limit() {
    let src = memory(MIB);
    // Populated, so passes take long enough for the writer to keep everything dirty.
    prefill(&src, 1);
    let vm = Arc::new(TestVm::default());
    let writer = spawn_writer(
        &src,
        Tracking::Host,
        vm.gate.clone(),
        1,
        200_000,
        Duration::from_secs(60),
    );
    let cfg = config()
        .with_bandwidth_limit_bytes_per_s(4 << 20)
        .with_downtime_limit(Duration::from_micros(100))
        .with_max_iterations(Some(3));
    let (src_t, dst_t) = mem_channel();
    let s = std::thread::scope(|sc| {
        sc.spawn(move || silent_destination(dst_t));
        Source::new(&src, cfg)
            .unwrap()
            .migrate(src_t, &*vm, None, &CancelToken::new())
    });
    vm.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    match s {
        Err(e @ Error::NotConverged { iterations: 3, .. }) => {
            assert!(e.to_string().contains("did not converge"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 0);
    assert!(!src.global_logging());
}

/// The same guest and limits as `no_convergence_hits_the_iteration_limit`, but the estimate may
/// assume a fast paused phase (`switchover_bandwidth_bytes_per_s`): it switches over after the
/// first pass, and the migration still verifies.
#[test]
fn switchover_bandwidth_lets_it_converge_after_one_pass() {
    let src = memory(MIB);
    let dst = memory(MIB);
    prefill(&src, 1);
    let vm = Arc::new(TestVm {
        state: state_blobs(),
        ..TestVm::default()
    });
    let writer = spawn_writer(
        &src,
        Tracking::Host,
        vm.gate.clone(),
        1,
        200_000,
        Duration::from_secs(60),
    );
    let cfg = config()
        .with_bandwidth_limit_bytes_per_s(4 << 20)
        .with_downtime_limit(Duration::from_micros(100))
        .with_max_iterations(Some(3))
        // At most 1 MiB dirty / 1 TiB/s = 1 us < 100 us.
        .with_switchover_bandwidth_bytes_per_s(1 << 40);
    let (s, d) = migrate_in_memory(&src, &dst, cfg, &vm);
    vm.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let s = s.unwrap();
    assert!(s.converged && s.verified, "{s:?}");
    assert_eq!(s.iterations, 1);
    assert!(d.unwrap().verified);
    assert!(diff_ram(&src, &dst).is_empty());
}

#[test]
fn no_convergence_hits_the_time_limit_and_auto_converge_throttles() {
    let src = memory(MIB);
    // Populated: every pass reads and sends all of it (never-populated pages would go as cheap
    // zero ranges, passes would be short and the throttle would soon stop the writer).
    prefill(&src, 2);
    let vm = Arc::new(TestVm::default());
    let writer = spawn_writer(
        &src,
        Tracking::Host,
        vm.gate.clone(),
        2,
        200_000,
        Duration::from_secs(60),
    );
    let cfg = config()
        .with_bandwidth_limit_bytes_per_s(4 << 20)
        .with_downtime_limit(Duration::from_micros(100))
        .with_max_time(Some(Duration::from_millis(1500)))
        .with_auto_converge(true);
    let (src_t, dst_t) = mem_channel();
    let s = std::thread::scope(|sc| {
        sc.spawn(move || silent_destination(dst_t));
        Source::new(&src, cfg)
            .unwrap()
            .migrate(src_t, &*vm, None, &CancelToken::new())
    });
    vm.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    match s {
        Err(Error::NotConverged {
            elapsed,
            iterations,
            ..
        }) => {
            assert!(elapsed >= Duration::from_millis(1500));
            assert!(iterations >= 3);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        vm.max_throttle.load(Ordering::SeqCst) >= 20,
        "auto-converge throttled"
    );
    assert_eq!(
        vm.throttle.load(Ordering::SeqCst),
        0,
        "throttle removed at the end"
    );
}

#[test]
fn receive_paused_does_not_resume_and_stats_serialize() {
    let src = memory(MIB);
    prefill(&src, 8);
    let dst = memory(MIB);
    let vm = TestVm::default();
    let vm_dst = TestVm::default();
    let (src_t, dst_t) = mem_channel();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(&dst).receive_paused(dst_t, &vm_dst));
        let s = Source::new(&src, config())
            .unwrap()
            .migrate(src_t, &vm, None, &CancelToken::new());
        (s.unwrap(), d.join().unwrap().unwrap())
    });
    assert!(d.acked && !d.resumed);
    assert_eq!(vm_dst.resumes.load(Ordering::SeqCst), 0);
    let json = serde_json::to_value(&s).unwrap();
    for field in [
        "mode",
        "clear_chunk_bytes",
        "guest_mem_bytes",
        "total_time_ms",
        "setup_time_ms",
        "downtime_ms",
        "iterations",
        "dirty_syncs",
        "pages_sent",
        "bytes_sent",
        "zero_pages",
        "resent_pages",
        "log_sync_ms",
        "log_clear_calls",
        "log_clear_ms",
        "bandwidth_limit_bytes_per_s",
        "measured_bandwidth_bytes_per_s",
        "converged",
        "iteration_history",
    ] {
        assert!(json.get(field).is_some(), "missing {field}");
    }
    assert_eq!(json["mode"], "clear");
    assert_eq!(
        json["clear_chunk_bytes"],
        clearlog_migration::shift_to_chunk_bytes(clearlog_migration::DEFAULT_CLEAR_SHIFT)
    );
    assert_eq!(json["guest_mem_bytes"], 1u64 << 20);
    // Every page goes once: read and sent, or (never populated) inside a zero range.
    assert_eq!(s.pages_sent + s.zero_range_pages, 256);
    assert!(
        s.zero_range_pages > 0,
        "the prefill leaves never-written pages"
    );
    assert!(s.zero_pages < 256);
    let back: MigrationStats = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn invalid_config_is_refused_up_front() {
    let mem = memory(MIB);
    let cfg = MigrationConfig::default().with_mode(MigrationDirtyLogMode::Clear { shift: 40 });
    assert!(matches!(
        Source::new(&mem, cfg),
        Err(Error::ClearShiftOutOfRange(40))
    ));
    assert!(!mem.global_logging());
}

/// A pause that stopped some vCPUs and then failed: the failure path resumes the guest anyway.
#[test]
fn a_failed_pause_leaves_no_vcpu_paused() {
    let src = memory(MIB);
    let vm = TestVm {
        fail_pause: true,
        ..TestVm::default()
    };
    let (src_t, dst_t) = mem_channel();
    let dst = memory(MIB);
    let r = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(&dst).receive(dst_t, &TestVm::default()));
        let r = Source::new(&src, config())
            .unwrap()
            .migrate(src_t, &vm, None, &CancelToken::new());
        let _ = d.join().unwrap();
        r
    });
    assert!(matches!(r, Err(Error::Vm { hook: "pause", .. })), "{r:?}");
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1, "guest left paused");
    assert!(!src.global_logging());
}

/// The commit point: when the source cannot send its confirmation, it resumes its guest, and the
/// destination, which acknowledged but never got the confirmation, does not resume. The guest runs
/// on exactly one side.
#[test]
fn a_lost_confirmation_resumes_the_source_and_not_the_destination() {
    use std::io::Write;
    use std::sync::atomic::AtomicBool;

    /// Reads the acknowledgement and remembers it came.
    struct AckSeen(PipeReader, Arc<AtomicBool>);
    impl std::io::Read for AckSeen {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1.store(true, Ordering::SeqCst);
            Ok(n)
        }
    }
    impl TransportRead for AckSeen {
        fn set_read_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()> {
            self.0.set_read_timeout(t)
        }
    }
    /// Writes the stream; the first write after the acknowledgement came fails (a send timeout),
    /// later ones go through: nothing may resend the confirmation behind the source's back.
    struct FailsOnceAfterAck(PipeWriter, Arc<AtomicBool>, bool);
    impl Write for FailsOnceAfterAck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.1.load(Ordering::SeqCst) && !self.2 {
                self.2 = true;
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            self.0.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }

    let src = memory(MIB);
    prefill(&src, 3);
    let dst = memory(MIB);
    let (to_dst, from_src) = pipe();
    let (to_src, from_dst) = pipe();
    let acked = Arc::new(AtomicBool::new(false));
    let src_t = Transport::new(
        Some(Box::new(AckSeen(from_dst, acked.clone()))),
        Some(Box::new(FailsOnceAfterAck(to_dst, acked, false))),
    );
    let dst_t = Transport::new(Some(Box::new(from_src)), Some(Box::new(to_src)));
    let vm_src = TestVm::default();
    let vm_dst = TestVm::default();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            Destination::new(&dst)
                .with_confirm_timeout(Duration::from_secs(5))
                .receive(dst_t, &vm_dst)
        });
        let s =
            Source::new(&src, config())
                .unwrap()
                .migrate(src_t, &vm_src, None, &CancelToken::new());
        (s, d.join().unwrap())
    });
    let err = s.unwrap_err();
    assert!(err.to_string().contains("confirmation"), "{err}");
    assert_eq!(
        vm_src.resumes.load(Ordering::SeqCst),
        1,
        "source not resumed"
    );
    assert!(matches!(d, Err(Error::NotConfirmed(_))), "{d:?}");
    assert_eq!(
        vm_dst.resumes.load(Ordering::SeqCst),
        0,
        "destination resumed too"
    );
    assert!(!src.global_logging());
}

/// Legacy mode with a mid-pass sync interval too long to represent (a caller's "never"): no
/// panic, no sync within a pass, and the migration verifies.
#[test]
fn unrepresentable_mid_pass_sync_interval_means_never() {
    let src = memory(MIB);
    let dst = memory(MIB);
    prefill(&src, 3);
    let vm = TestVm {
        state: state_blobs(),
        ..TestVm::default()
    };
    let cfg = config()
        .with_mode(MigrationDirtyLogMode::Legacy)
        .with_mid_pass_sync(Some(Duration::MAX));
    let (s, d) = migrate_in_memory(&src, &dst, cfg, &vm);
    let s = s.unwrap();
    assert!(s.converged && s.verified, "{s:?}");
    assert_eq!(s.mid_pass_syncs, 0);
    assert!(d.unwrap().verified);
    assert!(diff_ram(&src, &dst).is_empty());
}
