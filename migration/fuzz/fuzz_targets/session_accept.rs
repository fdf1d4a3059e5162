// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes as the connections a destination accepts (`accept_incoming` through a
//! `ChannelAcceptor` of in-memory transports, `mem_channel`): the input is split into 1 to 6
//! connections (`split_connections`), handed to the accept in order, each once the destination
//! answered or dropped the one before (as a source opens its page channels after the control
//! channel's answer), with its bytes written and its source side closed.
//!
//! Checks, on every input: no panic, no hang (a 50 ms handshake timeout bounds a session whose page
//! channels never come); the accept returns a migration only if the connections hold one (an
//! independent reading: a version-1 header, or a control channel's hello and header with a page
//! channel hello of the same session for each index), with the header they hold; otherwise it
//! keeps waiting until the acceptor, once the destination has let go of every connection, ends
//! the wait; no thread the accept started outlives it by more than 2 s.
//!
//! With `CLEARLOG_FUZZ_DEBUG` set, each input's result is printed (to check a corpus by hand:
//! `CLEARLOG_FUZZ_DEBUG=1 cargo +nightly fuzz run session_accept corpus/session_accept -- -runs=0`).
#![no_main]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clearlog_migration::{
    accept_incoming, mem_channel, Accepted, ChannelAcceptor, Error, ListenOptions, Result,
    Transport,
};
use clearlog_migration_fuzz::session::{check_accepted, split_connections};
use clearlog_migration_fuzz::BoundedAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

/// Hands out the input's connections one by one, as a source opens them: the next once the
/// destination has answered the last one's hello or let go of it; ends the wait once the
/// destination holds none of them.
struct Acceptor {
    /// Destination sides still to hand out, last first.
    waiting: Vec<Transport>,
    /// Source sides: the destination answered (wrote to) it, let go of it (end of file).
    ours: Vec<Ours>,
    /// A bound on the whole accept: a hang is a finding, not a stuck fuzzer.
    deadline: Instant,
}

/// The source side of one connection.
struct Ours {
    transport: Transport,
    answered: bool,
    released: bool,
}

impl Ours {
    /// Read what the destination wrote (its answer, dropped) for up to `wait`; note whether it
    /// answered or let go.
    fn poll(&mut self, wait: Duration) {
        let Some(r) = self.transport.reader.as_mut().filter(|_| !self.released) else {
            self.released = true;
            return;
        };
        let _ = r.set_read_timeout(Some(wait));
        let mut buf = [0u8; 64];
        loop {
            match r.read(&mut buf) {
                Ok(0) => {
                    self.released = true;
                    return;
                }
                Ok(_) => self.answered = true,
                Err(_) => return,
            }
        }
    }
}

/// How long a poll waits for each connection: short, so the accept loop runs meanwhile.
const WAIT: Duration = Duration::from_millis(1);

impl Acceptor {
    fn new(conns: &[&[u8]]) -> Acceptor {
        let mut waiting = Vec::new();
        let mut ours = Vec::new();
        for bytes in conns {
            let (mut src, dst) = mem_channel();
            if let Some(mut w) = src.writer.take() {
                // Each write is a queued buffer: never blocks.
                let _ = w.write_all(bytes);
            }
            waiting.push(dst);
            ours.push(Ours {
                transport: src,
                answered: false,
                released: false,
            });
        }
        waiting.reverse();
        Acceptor {
            waiting,
            ours,
            deadline: Instant::now() + Duration::from_secs(5),
        }
    }
}

impl ChannelAcceptor for Acceptor {
    fn poll_accept(&mut self) -> Result<Option<Accepted>> {
        assert!(
            Instant::now() < self.deadline,
            "the accept holds a connection for 5 s with a {HANDSHAKE:?} handshake timeout"
        );
        let handed = self.ours.len() - self.waiting.len();
        if let Some(last) = handed.checked_sub(1).map(|i| &mut self.ours[i]) {
            last.poll(WAIT);
            if !(last.answered || last.released) {
                return Ok(None);
            }
        }
        if let Some(transport) = self.waiting.pop() {
            return Ok(Some(Accepted {
                transport,
                peer: "fuzz".into(),
                // The source side is closed already: a blocked reader sees end of file.
                shutdown: Box::new(|| {}),
            }));
        }
        // Wait a little for the destination to let go: the accept loop idles 20 ms between polls.
        let until = Instant::now() + 5 * WAIT;
        while !self.ours.iter().all(|o| o.released) && Instant::now() < until {
            for o in &mut self.ours {
                o.poll(WAIT);
            }
        }
        if self.ours.iter().all(|o| o.released) {
            Err(Error::Cancelled)
        } else {
            Ok(None)
        }
    }
}

/// How long the destination waits for a connection to say what it is, and for a session's page
/// channels to join: short, as a partial session costs this much.
const HANDSHAKE: Duration = Duration::from_millis(50);

/// Threads of this process (`/proc/self/status`).
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Wait until the threads the accept started have ended: none may outlive its connections.
fn wait_for_threads(before: usize) {
    let until = Instant::now() + Duration::from_secs(2);
    while threads() > before {
        assert!(
            Instant::now() < until,
            "{} threads of the accept still run 2 s after it returned",
            threads() - before
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fuzz_target!(|data: &[u8]| {
    let before = threads();
    let conns = split_connections(data);
    let mut acceptor = Acceptor::new(&conns);
    let options = ListenOptions::default().with_handshake_timeout(HANDSHAKE);
    let accepted = accept_incoming(&mut acceptor, &options);
    if std::env::var_os("CLEARLOG_FUZZ_DEBUG").is_some() {
        eprintln!("{} connections: {accepted:?}", conns.len());
    }
    match accepted {
        Ok(incoming) => {
            if let Err(why) = check_accepted(&conns, &incoming) {
                panic!("accepted garbage: {why}");
            }
        }
        // The acceptor's own end of the wait: nothing was accepted.
        Err(Error::Cancelled) => {}
        Err(e) => panic!("the accept failed with an error of its own: {e}"),
    }
    drop(acceptor);
    wait_for_threads(before);
});
