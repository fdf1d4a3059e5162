// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A destination waiting for its migration is not used up by connections that are not one: a
//! port probe that connects and closes, or one that connects and stays silent. A connection that
//! sends a wrong header is still an error.

mod common;

use std::io::Write;
use std::time::Duration;

use clearlog_migration::*;
use common::*;

const MIB: &[(&str, u64, u64)] = &[("ram", 0, 1 << 20)];

/// `probe` pokes the listener at `uri` first; then a real source migrates to it.
fn migrate_after(uri: &str, probe: impl FnOnce(&str)) {
    let src = memory(MIB);
    prefill(&src, 7);
    let dst = memory(MIB);
    let listener = Listener::bind(uri).unwrap();
    let uri = listener.local_uri().unwrap();
    let vm_src = TestVm::default();
    let vm_dst = TestVm::default();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let (transport, header) = listener.accept_migration()?;
            assert_eq!(header.blocks.len(), 1);
            Destination::new(&dst).receive(transport, &vm_dst)
        });
        probe(&uri);
        let s = Source::new(&src, MigrationConfig::default())
            .unwrap()
            .migrate(connect(&uri).unwrap(), &vm_src, None, &CancelToken::new());
        (s, d.join().unwrap())
    });
    assert!(s.unwrap().converged);
    assert!(d.unwrap().resumed);
    assert!(diff_ram(&src, &dst).is_empty());
}

fn tcp_addr(uri: &str) -> &str {
    uri.strip_prefix("tcp:").unwrap()
}

#[test]
fn stray_connection_closing_without_a_byte_does_not_end_the_destination() {
    migrate_after("tcp:127.0.0.1:0", |uri| {
        // What a health check or `bash`'s `/dev/tcp` does.
        drop(std::net::TcpStream::connect(tcp_addr(uri)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    });
}

#[test]
fn stray_connection_closing_mid_header_does_not_end_the_destination() {
    migrate_after("tcp:127.0.0.1:0", |uri| {
        let mut s = std::net::TcpStream::connect(tcp_addr(uri)).unwrap();
        s.write_all(&stream::MAGIC.to_le_bytes()[..5]).unwrap();
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    });
}

#[test]
fn silent_connection_does_not_block_the_migration() {
    let mut idle = None;
    migrate_after("tcp:127.0.0.1:0", |uri| {
        // Connected, never sends, stays open for the whole migration.
        idle = Some(std::net::TcpStream::connect(tcp_addr(uri)).unwrap());
    });
    drop(idle);
}

#[test]
fn stray_unix_connection_does_not_end_the_destination() {
    let path = std::env::temp_dir().join(format!("clearlog-accept-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    migrate_after(&format!("unix:{}", path.display()), |uri| {
        drop(std::os::unix::net::UnixStream::connect(uri.strip_prefix("unix:").unwrap()).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    });
}

#[test]
fn wrong_header_is_still_an_error() {
    let listener = Listener::bind("tcp:127.0.0.1:0").unwrap();
    let uri = listener.local_uri().unwrap();
    let mut s = std::net::TcpStream::connect(tcp_addr(&uri)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let err = listener.accept_migration().unwrap_err();
    assert!(matches!(err, Error::BadMagic(_)), "{err:?}");
}
