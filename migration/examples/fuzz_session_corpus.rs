// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writes the seed corpus of the session fuzz targets (`migration/fuzz/`): the fixed-size session
//! messages for `session_wire`, and sets of connections for `session_accept`, all made with this
//! crate's own encoders (fixed session ids, so the files are the same each time).
//!
//! `cargo run -p clearlog-migration --example fuzz_session_corpus -- [OUT_DIR]` (default
//! `migration/fuzz/corpus`) writes `OUT_DIR/session_wire/` and `OUT_DIR/session_accept/`.
//!
//! A `session_accept` input is one byte saying how many connections (1 + byte % 6), then each
//! connection but the last as a little-endian `u16` length and its bytes, and the last one's bytes
//! (`split_connections` in `migration/fuzz/src/session.rs` reads them).

use std::path::{Path, PathBuf};

use clearlog_migration::stream::{BlockInfo, Header, ACK_FAILED, ACK_OK, FLAG_ACK_REQUESTED};
use clearlog_migration::stream::{FLAG_CONFIRM, FLAG_VERIFY_AFTER};
use clearlog_migration::wire::{
    Ack, Confirm, Hello, HelloReply, Verdict, HELLO_ACCEPTED, HELLO_BUSY, KIND_CONTROL, KIND_PAGES,
};

fn hello(kind: u32, session: u8, channel: u32, channels: u32) -> Vec<u8> {
    let mut b = Vec::new();
    Hello::new(kind, [session; 16], channel, channels)
        .write_to(&mut b)
        .unwrap();
    b
}

/// A live source's header (acknowledged, confirmed, verified after resuming) for one 1 MiB block.
fn header() -> Header {
    Header {
        page_size: 4096,
        flags: FLAG_ACK_REQUESTED | FLAG_CONFIRM | FLAG_VERIFY_AFTER,
        blocks: vec![BlockInfo {
            name: "ram".into(),
            size: 1 << 20,
        }],
    }
}

/// A control channel: its hello, then the header's fields.
fn control(session: u8, channels: u32) -> Vec<u8> {
    let mut b = hello(KIND_CONTROL, session, 0, channels);
    header().write_fields_to(&mut b).unwrap();
    b
}

/// Frame connections as one `session_accept` input.
fn frame(conns: &[Vec<u8>]) -> Vec<u8> {
    assert!((1..=6).contains(&conns.len()));
    let mut b = vec![(conns.len() - 1) as u8];
    for (i, c) in conns.iter().enumerate() {
        if i + 1 < conns.len() {
            b.extend_from_slice(&(c.len() as u16).to_le_bytes());
        }
        b.extend_from_slice(c);
    }
    b
}

fn wire_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let msg = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = Vec::new();
        f(&mut b);
        b
    };
    vec![
        ("hello-control", hello(KIND_CONTROL, 1, 0, 2)),
        ("hello-page", hello(KIND_PAGES, 1, 1, 2)),
        (
            "reply-accepted",
            msg(&|b| HelloReply::new(HELLO_ACCEPTED).write_to(b).unwrap()),
        ),
        (
            "reply-busy",
            msg(&|b| HelloReply::new(HELLO_BUSY).write_to(b).unwrap()),
        ),
        ("ack-ok", msg(&|b| Ack::send(b, ACK_OK).unwrap())),
        ("ack-failed", msg(&|b| Ack::send(b, ACK_FAILED).unwrap())),
        ("confirm", msg(&|b| Confirm::send(b).unwrap())),
        ("verdict-ok", msg(&|b| Verdict::send(b, 0, 42).unwrap())),
        (
            "verdict-mismatch",
            msg(&|b| Verdict::send(b, 3, 42).unwrap()),
        ),
    ]
}

fn accept_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut v1 = Vec::new();
    header().write_to(&mut v1).unwrap();
    vec![
        (
            "session-1",
            frame(&[control(1, 1), hello(KIND_PAGES, 1, 0, 1)]),
        ),
        (
            "session-2-reversed",
            frame(&[
                control(2, 2),
                hello(KIND_PAGES, 2, 1, 2),
                hello(KIND_PAGES, 2, 0, 2),
            ]),
        ),
        (
            "session-4",
            frame(&[
                control(3, 4),
                hello(KIND_PAGES, 3, 0, 4),
                hello(KIND_PAGES, 3, 1, 4),
                hello(KIND_PAGES, 3, 2, 4),
                hello(KIND_PAGES, 3, 3, 4),
            ]),
        ),
        ("stream-v1", frame(&[v1.clone()])),
        (
            "probe-then-session",
            frame(&[
                b"GET / HTTP/1.0\r\n\r\n".to_vec(),
                control(4, 1),
                hello(KIND_PAGES, 4, 0, 1),
            ]),
        ),
        (
            "two-controls",
            frame(&[control(5, 1), control(6, 1), hello(KIND_PAGES, 6, 0, 1)]),
        ),
        (
            "page-of-another-session",
            frame(&[control(7, 1), hello(KIND_PAGES, 8, 0, 1)]),
        ),
        (
            "tls-client-hello",
            frame(&[vec![
                0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0,
            ]]),
        ),
        ("silent-then-stream", frame(&[Vec::new(), v1])),
        // Once accepted as a session of no page channel (`session_wire` found the hello).
        ("regression-no-page-channel", frame(&[control(9, 0)])),
    ]
}

fn write_all(dir: &Path, seeds: &[(&str, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
        println!(
            "{:<40} {:>5} bytes",
            format!("{}/{name}", dir.display()),
            bytes.len()
        );
    }
}

fn main() {
    let out: PathBuf = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"),
        PathBuf::from,
    );
    write_all(&out.join("session_wire"), &wire_seeds());
    write_all(&out.join("session_accept"), &accept_seeds());
}
