// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A destination waiting for its migration is not used up by connections that are not one: a
//! port probe that connects and closes, one that connects and stays silent, one that sends
//! something else, a second session while one is joining, a page channel of no session. It
//! refuses them (a session connection gets a refusal it can print) and keeps waiting; the real
//! source, version 1 or a session, then migrates.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use clearlog_migration::*;
use common::*;

const MIB: &[(&str, u64, u64)] = &[("ram", 0, 1 << 20)];

/// How the real source migrates.
#[derive(Clone, Copy)]
enum Via {
    /// One version-1 stream.
    Stream,
    /// A session of this many page channels.
    Session(u32),
}

/// `probe` pokes the listener at `uri` first; then a real source migrates to it.
fn migrate_after(uri: &str, via: Via, probe: impl FnOnce(&str)) {
    let src = memory(MIB);
    prefill(&src, 7);
    let dst = memory(MIB);
    let listener = Listener::bind(uri).unwrap();
    let uri = listener.local_uri().unwrap();
    let vm_src = TestVm::default();
    let vm_dst = TestVm::default();
    let opts = ListenOptions::default().with_handshake_timeout(Duration::from_secs(2));
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let incoming = listener.accept_incoming(&opts)?;
            assert_eq!(incoming.header().blocks.len(), 1);
            Destination::new(&dst).receive_incoming(incoming, &vm_dst)
        });
        probe(&uri);
        let source = Source::new(&src, MigrationConfig::default()).unwrap();
        let s = match via {
            Via::Stream => {
                source.migrate(connect(&uri).unwrap(), &vm_src, None, &CancelToken::new())
            }
            Via::Session(channels) => {
                let opts = SessionOptions::default().with_channels(channels);
                source.migrate_session(
                    connect_session(&uri, &opts).unwrap(),
                    &vm_src,
                    None,
                    &CancelToken::new(),
                )
            }
        };
        (s, d.join().unwrap())
    });
    let (s, d) = match (s, d) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => panic!("source {s:?}\ndestination {d:?}"),
    };
    assert!(s.converged && s.verified);
    assert!(d.resumed && d.verified);
    if let Via::Session(n) = via {
        assert_eq!((s.page_channels, d.page_channels), (n, n));
    }
    assert!(diff_ram(&src, &dst).is_empty());
}

fn tcp_addr(uri: &str) -> &str {
    uri.strip_prefix("tcp:").unwrap()
}

const BOTH: [Via; 2] = [Via::Stream, Via::Session(2)];

#[test]
fn stray_connection_closing_without_a_byte_does_not_end_the_destination() {
    for via in BOTH {
        migrate_after("tcp:127.0.0.1:0", via, |uri| {
            // What a health check or `bash`'s `/dev/tcp` does.
            drop(std::net::TcpStream::connect(tcp_addr(uri)).unwrap());
            std::thread::sleep(Duration::from_millis(50));
        });
    }
}

#[test]
fn stray_connection_closing_mid_header_does_not_end_the_destination() {
    for via in BOTH {
        migrate_after("tcp:127.0.0.1:0", via, |uri| {
            let mut s = std::net::TcpStream::connect(tcp_addr(uri)).unwrap();
            s.write_all(&stream::MAGIC.to_le_bytes()[..5]).unwrap();
            drop(s);
            std::thread::sleep(Duration::from_millis(50));
        });
    }
}

#[test]
fn silent_connection_does_not_block_the_migration() {
    for via in BOTH {
        let mut idle = None;
        migrate_after("tcp:127.0.0.1:0", via, |uri| {
            // Connected, never sends, stays open for the whole migration.
            idle = Some(std::net::TcpStream::connect(tcp_addr(uri)).unwrap());
        });
        drop(idle);
    }
}

#[test]
fn stray_unix_connection_does_not_end_the_destination() {
    for (i, via) in BOTH.into_iter().enumerate() {
        let path =
            std::env::temp_dir().join(format!("clearlog-accept-{}-{i}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        migrate_after(&format!("unix:{}", path.display()), via, |uri| {
            drop(
                std::os::unix::net::UnixStream::connect(uri.strip_prefix("unix:").unwrap())
                    .unwrap(),
            );
            std::thread::sleep(Duration::from_millis(50));
        });
    }
}

/// Something that is not a clearlog source (an HTTP request, a TLS client hello, a version this
/// build does not speak) used to end the wait with an error; it is refused and logged now, and
/// the real source still migrates.
#[test]
fn a_wrong_first_message_is_refused_and_the_wait_goes_on() {
    let tls_client_hello = [
        0x16u8, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c, 0x03, 0x03, 0,
    ];
    let mut future = stream::MAGIC.to_le_bytes().to_vec();
    future.extend_from_slice(&9u32.to_le_bytes());
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        tls_client_hello.to_vec(),
        future,
    ] {
        for via in BOTH {
            let mut kept = None;
            migrate_after("tcp:127.0.0.1:0", via, |uri| {
                let mut s = std::net::TcpStream::connect(tcp_addr(uri)).unwrap();
                s.write_all(&garbage).unwrap();
                // Refused: the destination closes it.
                let mut b = [0u8; 1];
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                assert_eq!(s.read(&mut b).unwrap_or(0), 0);
                kept = Some(s);
            });
        }
    }
}

/// A session's hello to a destination that is setting up another session: refused with "busy",
/// which its source can print; a page channel of no session: refused too.
#[test]
fn a_second_session_and_a_stray_page_channel_are_refused() {
    let listener = Listener::bind("tcp:127.0.0.1:0").unwrap();
    let uri = listener.local_uri().unwrap();
    let dst = memory(MIB);
    let vm_dst = TestVm::default();
    std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let incoming = listener.accept_incoming(&ListenOptions::default())?;
            Destination::new(&dst).receive_incoming(incoming, &vm_dst)
        });
        // A page channel of a session nobody started.
        let mut stray = std::net::TcpStream::connect(tcp_addr(&uri)).unwrap();
        stray
            .write_all(&{
                let mut b = Vec::new();
                wire::Hello::new(wire::KIND_PAGES, [9; 16], 0, 1)
                    .write_to(&mut b)
                    .unwrap();
                b
            })
            .unwrap();
        let mut reply = [0u8; 16];
        stray.read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_le_bytes(reply[8..12].try_into().unwrap()),
            wire::HELLO_NO_SESSION
        );
        // The first session's control channel, then a second session while it joins.
        let opts = SessionOptions::default().with_channels(1);
        let mut first = std::net::TcpStream::connect(tcp_addr(&uri)).unwrap();
        let mut b = Vec::new();
        wire::Hello::new(wire::KIND_CONTROL, [1; 16], 0, 1)
            .write_to(&mut b)
            .unwrap();
        first.write_all(&b).unwrap();
        first.read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_le_bytes(reply[8..12].try_into().unwrap()),
            wire::HELLO_ACCEPTED
        );
        let err = connect_session(&uri, &opts).unwrap_err();
        assert!(
            matches!(err, Error::SessionRefused(why) if why.contains("busy")),
            "{err:?}"
        );
        // The first source goes away before its page channels: the destination drops it and
        // takes the next one.
        drop(first);
        std::thread::sleep(Duration::from_millis(100));
        let src = memory(MIB);
        prefill(&src, 3);
        let vm_src = TestVm::default();
        let s = Source::new(&src, MigrationConfig::default())
            .unwrap()
            .migrate_session(
                connect_session(&uri, &opts).unwrap(),
                &vm_src,
                None,
                &CancelToken::new(),
            )
            .unwrap();
        assert!(s.verified);
        assert!(d.join().unwrap().unwrap().verified);
        assert!(diff_ram(&src, &dst).is_empty());
    });
}

/// A destination that speaks only version 1 (simulated: it reads the hello as a header and
/// closes) gives the source an error that says so; and `channels: 0` is refused up front.
#[test]
fn a_session_to_a_version_1_destination_says_so() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let old = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        // Version 2 is not 1: an old destination gives up and closes.
    });
    let err = connect_session(&format!("tcp:{addr}"), &SessionOptions::default()).unwrap_err();
    old.join().unwrap();
    assert!(
        matches!(&err, Error::Handshake(why) if why.contains("version 1")),
        "{err:?}"
    );
    let none = SessionOptions::default().with_channels(0);
    connect_session(&format!("tcp:{addr}"), &none).unwrap_err();
}

/// Listening in plaintext on an address other than loopback needs an explicit yes.
#[test]
fn plaintext_on_a_public_address_is_refused_unless_asked_for() {
    let opts = ListenOptions::default();
    assert!(matches!(
        Listener::bind_with("tcp:0.0.0.0:0", &opts),
        Err(Error::PlaintextRefused { .. })
    ));
    let yes = ListenOptions::default().with_insecure_plaintext(true);
    Listener::bind_with("tcp:0.0.0.0:0", &yes).unwrap();
    Listener::bind_with("tcp:127.0.0.1:0", &opts).unwrap();
}

/// A source of a later protocol version sends the same hello layout. One that still speaks
/// version 2 (its lowest version) is answered "accepted, version 2"; one that does not is
/// answered with the version this destination speaks, which the source can name, and refused;
/// the destination keeps waiting and the real source migrates.
#[test]
fn a_later_version_is_negotiated_down_or_refused_naming_both() {
    let hello = |version: u32, min_version: u32| {
        let mut b = Vec::new();
        wire::Hello::new(wire::KIND_CONTROL, [9; 16], 0, 1)
            .write_to(&mut b)
            .unwrap();
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[40..44].copy_from_slice(&min_version.to_le_bytes());
        b
    };
    let reply = |uri: &str, bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(tcp_addr(uri)).unwrap();
        s.write_all(bytes).unwrap();
        let mut t = Transport::tcp(s).unwrap();
        wire::HelloReply::read_expecting_accept(
            t.reader.as_mut().unwrap().as_mut(),
            Duration::from_secs(5),
        )
        .map(|()| t)
    };
    migrate_after("tcp:127.0.0.1:0", Via::Session(2), |uri| {
        let e = reply(uri, &hello(4, 3)).map(drop).unwrap_err();
        assert!(
            matches!(e, Error::SessionVersion { ours: 2, theirs: 2 }),
            "{e:?}"
        );
        assert!(e.to_string().contains("version 2"), "{e}");
        // Version 3 that still speaks 2: accepted as version 2 (then it goes away without its
        // page channel, and the session is dropped when its channels do not join in time).
        let joined = reply(uri, &hello(3, 2)).unwrap();
        drop(joined);
        std::thread::sleep(Duration::from_millis(100));
    });
}
