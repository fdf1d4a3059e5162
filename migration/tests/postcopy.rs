// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Postcopy over an in-process session, with the destination's memory under a real
//! userfaultfd: the destination's "guest" (a thread) and its "VMM" (a device write) touch pages
//! while they are missing; every page ends as the source left it, and both sides verify.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use clearlog_memory::MemorySystem;
use clearlog_migration::*;
use common::*;
use rand::{Rng, SeedableRng};

struct PipeAcceptor(Receiver<Transport>);

impl ChannelAcceptor for PipeAcceptor {
    fn poll_accept(&mut self) -> clearlog_migration::Result<Option<Accepted>> {
        Ok(self.0.try_recv().ok().map(|transport| Accepted {
            transport,
            peer: "pipe".into(),
            shutdown: Box::new(|| {}),
        }))
    }
}

/// The destination: on resume, a "guest" thread reads pages at random (faulting on missing
/// ones), and the "VMM" writes `device_write` (block, page, offset, value) through the memory's
/// own write path, as a device model would.
struct PostcopyGuest {
    mem: Arc<MemorySystem>,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    guest: Mutex<Option<JoinHandle<()>>>,
    device_write: Option<(usize, u64, u64, u64)>,
    resumed: AtomicBool,
}

impl VmRestore for PostcopyGuest {
    fn restore_state(&self, _: &[StateBlob]) -> std::result::Result<(), BoxError> {
        Ok(())
    }

    fn resume(&self) -> std::result::Result<(), BoxError> {
        self.resumed.store(true, Ordering::SeqCst);
        let (mem, stop, reads) = (self.mem.clone(), self.stop.clone(), self.reads.clone());
        *self.guest.lock().unwrap() = Some(std::thread::spawn(move || {
            let blocks = mem.ram_blocks();
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut buf = [0u8; 8];
            while !stop.load(Ordering::SeqCst) {
                let b = &blocks[rng.random_range(0..blocks.len())];
                let page = rng.random_range(0..b.pages());
                b.read(page * PAGE_SIZE, &mut buf).unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
        if let Some((b, page, offset, value)) = self.device_write {
            let block = &self.mem.ram_blocks()[b];
            block.write(page * PAGE_SIZE + offset, &value.to_le_bytes())?;
        }
        Ok(())
    }
}

struct Outcome {
    source: MigrationStats,
    destination: IncomingStats,
    src: MemorySystem,
    dst: Arc<MemorySystem>,
    reads: u64,
}

/// Migrate a guest dirtying ~`rate` pages/s with postcopy after one pass over `channels`
/// channels at 8 MiB/s; the destination's guest reads pages from its resume on.
fn migrate(seed: u64, channels: u32, device_write: Option<(usize, u64, u64, u64)>) -> Outcome {
    let src = memory(LAYOUT);
    let fake = Arc::new(FakeAccel::default());
    src.register_listener(fake.clone()).unwrap();
    prefill(&src, seed);
    let dst = Arc::new(memory(LAYOUT));
    let vm_src = Arc::new(TestVm {
        state: state_blobs(),
        ..TestVm::default()
    });
    let guest = PostcopyGuest {
        mem: dst.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        reads: Arc::new(AtomicU64::new(0)),
        guest: Mutex::new(None),
        device_write,
        resumed: AtomicBool::new(false),
    };
    let writer = spawn_writer(
        &src,
        Tracking::Accel(fake.clone()),
        vm_src.gate.clone(),
        seed,
        20_000,
        Duration::from_secs(30),
    );
    let config = MigrationConfig::default()
        .with_mode(MigrationDirtyLogMode::Clear { shift: 6 })
        .with_bandwidth_limit_bytes_per_s(8 << 20)
        .with_downtime_limit(Duration::from_millis(1))
        .with_postcopy(PostcopyPolicy::AfterPasses(1))
        .with_max_time(Some(Duration::from_secs(30)));
    let (tx, rx) = channel();
    let mut acceptor = PipeAcceptor(rx);
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let incoming = accept_incoming(&mut acceptor, &ListenOptions::default())?;
            Destination::new(&*dst).receive_incoming(incoming, &guest)
        });
        let opts = SessionOptions::default().with_channels(channels);
        let s = open_session(&mut Pipes(tx), &opts).and_then(|session| {
            Source::new(&src, config).unwrap().migrate_session(
                session,
                &*vm_src,
                None,
                &CancelToken::new(),
            )
        });
        (s, d.join().unwrap())
    });
    guest.stop.store(true, Ordering::SeqCst);
    if let Some(g) = guest.guest.lock().unwrap().take() {
        g.join().unwrap();
    }
    vm_src.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let (source, destination) = match (s, d) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => panic!("seed {seed}: source {s:?}\ndestination {d:?}"),
    };
    assert_eq!(
        vm_src.resumes.load(Ordering::SeqCst),
        0,
        "the source never resumes after a postcopy commit"
    );
    Outcome {
        source,
        destination,
        src,
        dst,
        reads: guest.reads.load(Ordering::Relaxed),
    }
}

fn userfaultfd_works() -> bool {
    // SAFETY: userfaultfd(2) with flags only; the fd is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        eprintln!(
            "SKIPPED: userfaultfd is not available here ({})",
            std::io::Error::last_os_error()
        );
        return false;
    }
    // SAFETY: the fd just opened, closed once.
    unsafe { libc::close(fd as i32) };
    true
}

#[test]
fn a_guest_running_through_postcopy_ends_with_the_source_memory() {
    if !userfaultfd_works() {
        return;
    }
    for (seed, channels) in [(1, 1), (2, 4)] {
        let o = migrate(seed, channels, None);
        let (s, d) = (&o.source, &o.destination);
        assert!(s.postcopy && d.postcopy, "switched to postcopy");
        assert!(s.verified && d.verified);
        assert!(s.postcopy_pages > 0 && d.postcopy_missing_pages == s.postcopy_pages);
        let diff = diff_ram(&o.src, &o.dst);
        assert!(
            diff.is_empty(),
            "seed {seed}: {} pages differ: {:?}",
            diff.len(),
            &diff[..diff.len().min(8)]
        );
        assert!(o.reads > 0, "the destination's guest ran during postcopy");
        assert!(
            d.postcopy_requested_pages > 0 && s.postcopy_requests == d.postcopy_requested_pages,
            "pages were asked for: source {} destination {}",
            s.postcopy_requests,
            d.postcopy_requested_pages
        );
        assert_eq!(
            d.pages_received, s.pages_sent,
            "every page record arrived once"
        );
        eprintln!(
            "seed {seed}, {channels} channels: {} missing, {} asked for ({} before the push), \
             {} duplicates, fault latency median {:.2} ms max {:.2} ms, postcopy {:.0} ms",
            d.postcopy_missing_pages,
            d.postcopy_requested_pages,
            s.postcopy_requests_first,
            d.postcopy_duplicate_pages,
            d.fault_latency_median_ms,
            d.fault_latency_max_ms,
            d.postcopy_ms
        );
    }
}

#[test]
fn a_device_write_to_a_missing_page_waits_for_it_and_lands_on_the_source_data() {
    if !userfaultfd_works() {
        return;
    }
    // Block 0, page 100, offset 16: the writer writes each page ~10 times a second and the first
    // pass takes most of a second, so the page is missing at the switch but with odds of ~1e-4.
    let o = migrate(3, 2, Some((0, 100, 16, 0x0dd_ba11)));
    let (s, d) = (&o.source, &o.destination);
    assert!(s.verified && d.verified && d.postcopy);
    let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
    o.src.ram_blocks()[0].read(100 * PAGE_SIZE, &mut a).unwrap();
    o.dst.ram_blocks()[0].read(100 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(
        &b[16..24],
        &0x0dd_ba11u64.to_le_bytes(),
        "the device's write is there"
    );
    a[16..24].copy_from_slice(&0x0dd_ba11u64.to_le_bytes());
    assert!(a == b, "the rest of the page is the source's");
}
