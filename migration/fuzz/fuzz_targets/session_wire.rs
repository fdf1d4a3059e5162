// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes as each fixed-size session message (`clearlog_migration::wire`): a hello
//! (`Hello::parse`), the hello's reply (`HelloReply::read_expecting_accept`), the acknowledgement
//! (`Ack::wait_ok`), the confirmation (`Confirm::wait`), the drain answer (`Drained::wait`) and
//! the verdict (`Verdict::read`), each read from the start of the input.
//!
//! Checks, on every input: no panic, no hang; each reader accepts exactly what the wire table of
//! the module docs says (an independent reading here), and what it returns is what the bytes say
//! (a parsed hello writes back to the same 48 bytes).
#![no_main]

use std::io::Cursor;
use std::time::Duration;

use clearlog_migration::stream::{
    ACK_MAGIC, ACK_OK, CONFIRM_MAGIC, VERDICT_MAGIC, VERDICT_MISMATCH, VERDICT_OK,
};
use clearlog_migration::wire::{Ack, Confirm, Drained, Hello, HelloReply, Verdict};
use clearlog_migration::CancelToken;
use clearlog_migration_fuzz::session::{reference_hello, HELLO_LEN, SESSION_VERSION};
use clearlog_migration_fuzz::BoundedAlloc;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

/// The `i`-th little-endian `u32` of `data`, if it is there.
fn u32_at(data: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(4 * i..4 * i + 4)?.try_into().ok()?,
    ))
}

/// The `i`-th little-endian `u64` of `data`, if it is there.
fn u64_at(data: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(8 * i..8 * i + 8)?.try_into().ok()?,
    ))
}

fn reader(data: &[u8]) -> Cursor<Vec<u8>> {
    Cursor::new(data.to_vec())
}

const WAIT: Duration = Duration::from_millis(50);

fn hello(data: &[u8]) {
    match (Hello::parse(data), reference_hello(data)) {
        (Ok(h), Some(r)) => {
            assert_eq!(
                (h.kind(), h.session(), h.channel(), h.channels()),
                (r.kind, r.session, r.channel, r.channels)
            );
            let mut back = Vec::new();
            h.write_to(&mut back).unwrap();
            assert_eq!(
                back,
                data[..HELLO_LEN],
                "a parsed hello writes back other bytes"
            );
        }
        (Err(_), None) => {}
        (Ok(h), None) => panic!("Hello::parse accepts what the wire table refuses: {h:?}"),
        (Err(e), Some(r)) => panic!("Hello::parse refuses a hello of the wire table: {r:?}: {e}"),
    }
}

fn reply(data: &[u8]) {
    let ok = HelloReply::read_expecting_accept(&mut reader(data), WAIT).is_ok();
    let want = data.get(..4) == Some(b"HELO")
        && u32_at(data, 1) == Some(SESSION_VERSION)
        && u32_at(data, 2) == Some(0)
        && data.len() >= 16;
    assert_eq!(
        ok, want,
        "HelloReply accepted: {ok}, the wire table: {want}"
    );
}

fn ack(data: &[u8]) {
    let ok = Ack::wait_ok(&mut reader(data), WAIT, &CancelToken::new()).is_ok();
    let want = u32_at(data, 0) == Some(ACK_MAGIC) && u32_at(data, 1) == Some(ACK_OK);
    assert_eq!(ok, want, "Ack accepted: {ok}, the wire table: {want}");
}

fn confirm(data: &[u8]) {
    let ok = Confirm::wait(&mut reader(data), WAIT).is_ok();
    let want = u32_at(data, 0) == Some(CONFIRM_MAGIC) && u32_at(data, 1) == Some(0);
    assert_eq!(ok, want, "Confirm accepted: {ok}, the wire table: {want}");
}

fn drained(data: &[u8]) {
    let ok = Drained::wait(&mut reader(data), WAIT, &CancelToken::new()).is_ok();
    let want = data.len() >= 8 && data[..8] == *b"DRND\0\0\0\0";
    assert_eq!(ok, want, "Drained accepted: {ok}, the wire table: {want}");
}

fn verdict(data: &[u8]) {
    let got = Verdict::read(&mut reader(data), WAIT).ok();
    // Status 0 with no mismatched page, or status 1 with some; the resume time is any number.
    let want = match (
        u32_at(data, 0),
        u32_at(data, 1),
        u64_at(data, 1),
        u64_at(data, 2),
    ) {
        (Some(VERDICT_MAGIC), Some(status), Some(mismatched), Some(resumed))
            if (status == VERDICT_OK && mismatched == 0)
                || (status == VERDICT_MISMATCH && mismatched > 0) =>
        {
            Some((mismatched, resumed))
        }
        _ => None,
    };
    let got = got.map(|v| (v.mismatched_pages(), v.resumed_at_unix_ns()));
    assert_eq!(
        got, want,
        "Verdict read {got:?}, the wire table says {want:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    hello(data);
    reply(data);
    ack(data);
    confirm(data);
    drained(data);
    verdict(data);
});
