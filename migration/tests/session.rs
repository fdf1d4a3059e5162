// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A session's page channels delivered at different speeds: a page always travels on the same
//! channel, so however the channels are delayed against each other, an older copy of a page never
//! lands after a newer one, and the destination ends with the source's memory.
//!
//! The channels are in-memory pipes; the destination reads each through a reader that sleeps at
//! random (different delays per channel), while a writer thread dirties pages through a fake
//! accelerator so pages are sent again and again, on their channel.

mod common;

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use clearlog_migration::*;
use common::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// The destination side: connections arrive from [`Pipes`]; each one's reads are delayed at
/// random, differently per connection.
struct SlowPipes {
    rx: Receiver<Transport>,
    rng: rand::rngs::StdRng,
    max_delay_us: u64,
    /// Counts the bytes read on page channels (every connection after the first, the control).
    page_bytes_read: Option<Arc<std::sync::atomic::AtomicU64>>,
    accepted: usize,
}

impl ChannelAcceptor for SlowPipes {
    fn poll_accept(&mut self) -> clearlog_migration::Result<Option<Accepted>> {
        match self.rx.try_recv() {
            Ok(mut t) => {
                let mut inner = t.reader.take().unwrap();
                if let Some(n) = self.page_bytes_read.as_ref().filter(|_| self.accepted > 0) {
                    inner = Box::new(Counted {
                        inner,
                        n: n.clone(),
                    });
                }
                self.accepted += 1;
                t.reader = Some(Box::new(Slow {
                    inner,
                    rng: rand::rngs::StdRng::seed_from_u64(self.rng.random()),
                    max_delay_us: self.max_delay_us,
                }));
                Ok(Some(Accepted {
                    transport: t,
                    peer: "pipe".into(),
                    shutdown: Box::new(|| {}),
                }))
            }
            Err(_) => Ok(None),
        }
    }
}

/// A reader that sleeps a random time before some reads.
struct Slow {
    inner: Box<dyn TransportRead>,
    rng: rand::rngs::StdRng,
    max_delay_us: u64,
}

impl Read for Slow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.rng.random_range(0..4) == 0 {
            let us = self.rng.random_range(0..=self.max_delay_us);
            std::thread::sleep(Duration::from_micros(us));
        }
        // Small reads, so a channel's records trickle in.
        let n = buf.len().min(self.rng.random_range(1..64 << 10));
        self.inner.read(&mut buf[..n])
    }
}

impl TransportRead for Slow {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }
}

fn migrate_over_slow_channels(
    seed: u64,
    channels: u32,
    legacy: bool,
    max_delay_us: u64,
) -> MigrationStats {
    let src = memory(LAYOUT);
    let fake = Arc::new(FakeAccel::default());
    src.register_listener(fake.clone()).unwrap();
    prefill(&src, seed);
    let dst = memory(LAYOUT);
    let vm_src = Arc::new(TestVm {
        state: state_blobs(),
        ..TestVm::default()
    });
    let vm_dst = TestVm::default();
    let writer = spawn_writer(
        &src,
        Tracking::Accel(fake.clone()),
        vm_src.gate.clone(),
        seed,
        8 << 20,
        Duration::from_millis(300),
    );
    let config = MigrationConfig::default()
        .with_mode(if legacy {
            MigrationDirtyLogMode::Legacy
        } else {
            MigrationDirtyLogMode::Clear { shift: 6 }
        })
        .with_bandwidth_limit_bytes_per_s(16 << 20)
        .with_downtime_limit(Duration::from_millis(10))
        .with_max_time(Some(Duration::from_secs(30)));
    let (tx, rx) = channel();
    let mut acceptor = SlowPipes {
        rx,
        rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0xde1a),
        max_delay_us,
        page_bytes_read: None,
        accepted: 0,
    };
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let incoming = accept_incoming(&mut acceptor, &ListenOptions::default())?;
            Destination::new(&dst).receive_incoming(incoming, &vm_dst)
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
    let diff = diff_ram(&src, &dst);
    vm_src.gate.stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let (s, d) = match (s, d) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => panic!("seed {seed}: source {s:?}\ndestination {d:?}"),
    };
    assert!(
        diff.is_empty(),
        "seed {seed}, {channels} channels: {} pages differ: {:?}",
        diff.len(),
        &diff[..diff.len().min(8)]
    );
    assert!(s.verified && d.verified);
    assert_eq!((s.page_channels, d.page_channels), (channels, channels));
    assert_eq!(s.channel_stats.len(), channels as usize);
    assert_eq!(
        s.channel_stats.iter().map(|c| c.pages).sum::<u64>(),
        s.pages_sent
    );
    assert_eq!(d.pages_received, s.pages_sent);
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Channels delayed at random against each other: no page's older copy wins.
    #[test]
    fn delayed_channels_never_let_an_older_copy_win(
        seed in any::<u64>(),
        channels in 1u32..=4,
        legacy in any::<bool>(),
        max_delay_us in 0u64..3000,
    ) {
        migrate_over_slow_channels(seed, channels, legacy, max_delay_us);
    }
}

/// Pages are sent again while the channels are slow: the property above is not vacuous. (With
/// windows handed to channels round-robin per pass instead of by their index, which breaks the
/// rule, this and the property fail: seen while writing them.)
#[test]
fn pages_are_resent_over_the_channels() {
    let s = migrate_over_slow_channels(5, 3, false, 2000);
    assert!(s.resent_pages > 0, "{s:?}");
    assert!(s.iterations >= 2, "{s:?}");
}

/// Counts the bytes through a connection's half.
struct Counted<T> {
    inner: T,
    n: Arc<std::sync::atomic::AtomicU64>,
}

impl std::io::Write for Counted<Box<dyn std::io::Write + Send>> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Read for Counted<Box<dyn TransportRead>> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
}

impl TransportRead for Counted<Box<dyn TransportRead>> {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }
}

/// The source's guest: at `pause`, notes the page-channel bytes the source had written and the
/// destination had read.
struct Watched<'a> {
    vm: &'a TestVm,
    written: Arc<std::sync::atomic::AtomicU64>,
    read: Arc<std::sync::atomic::AtomicU64>,
    at_pause: std::sync::Mutex<Option<(u64, u64)>>,
}

impl VmControl for Watched<'_> {
    fn pause(&self) -> std::result::Result<(), BoxError> {
        let seen = (
            self.written.load(Ordering::SeqCst),
            self.read.load(Ordering::SeqCst),
        );
        *self.at_pause.lock().unwrap() = Some(seen);
        self.vm.pause()
    }
    fn resume(&self) -> std::result::Result<(), BoxError> {
        VmControl::resume(self.vm)
    }
    fn save_state(&self) -> std::result::Result<Vec<StateBlob>, BoxError> {
        self.vm.save_state()
    }
}

/// A destination slower than the link holds a backlog in its channels (here the in-memory
/// pipes' buffers; on TCP the socket buffers, tens of MiB). The source drains before it switches
/// over: when it pauses, the destination has read every byte the page channels carried, so the
/// paused phase never waits for that backlog. (With the drain disabled, the destination had read
/// 1.1 of 6.4 MiB at the pause in this test, and the downtime was 31 ms instead of 1 ms.)
#[test]
fn the_source_pauses_only_once_the_destination_caught_up() {
    let src = memory(LAYOUT);
    prefill(&src, 3);
    let dst = memory(LAYOUT);
    let vm_src = TestVm::default();
    let vm_dst = TestVm::default();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watched = Watched {
        vm: &vm_src,
        written: written.clone(),
        read: read.clone(),
        at_pause: std::sync::Mutex::new(None),
    };
    let (tx, rx) = channel();
    let mut acceptor = SlowPipes {
        rx,
        rng: rand::rngs::StdRng::seed_from_u64(7),
        max_delay_us: 2000,
        page_bytes_read: Some(read.clone()),
        accepted: 0,
    };
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let incoming = accept_incoming(&mut acceptor, &ListenOptions::default())?;
            Destination::new(&dst).receive_incoming(incoming, &vm_dst)
        });
        let opts = SessionOptions::default().with_channels(2);
        let mut index = 0;
        let s = open_session(&mut Pipes(tx), &opts).and_then(|session| {
            let session = session.map(|mut t| {
                // The control channel comes first; count the page channels only.
                if index > 0 {
                    let w = t.writer.take().unwrap();
                    t.writer = Some(Box::new(Counted {
                        inner: w,
                        n: written.clone(),
                    }));
                }
                index += 1;
                t
            });
            Source::new(&src, MigrationConfig::default())
                .unwrap()
                .migrate_session(session, &watched, None, &CancelToken::new())
        });
        (s, d.join().unwrap())
    });
    let (s, d) = match (s, d) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => panic!("source {s:?}\ndestination {d:?}"),
    };
    assert!(s.verified && d.verified);
    let (written_at_pause, read_at_pause) = watched.at_pause.lock().unwrap().unwrap();
    assert!(written_at_pause > 1 << 20, "{written_at_pause}");
    // The destination also read each page channel's hello, written before the session was
    // wrapped for counting.
    let hellos = 2 * wire::Hello::LEN as u64;
    assert_eq!(read_at_pause, written_at_pause + hellos, "{s:?}");
    assert!(s.drain_ms > 0.0, "{s:?}");
}
