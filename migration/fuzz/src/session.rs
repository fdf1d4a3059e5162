// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The session fuzz targets' shared pieces: independent readings of the session messages (the
//! table of `clearlog_migration::wire`'s docs), the framing that turns one fuzz input into
//! several connections, and the oracle that says what a destination may accept from them.

use clearlog_migration::stream::{MAGIC, VERSION};
use clearlog_migration::Incoming;

use crate::{header_fields, Cur, Fields};

/// The session protocol's version.
pub const SESSION_VERSION: u32 = 2;
/// The most page channels a session may have.
pub const MAX_CHANNELS: u32 = 64;
/// Bytes of a hello.
pub const HELLO_LEN: usize = 48;
/// The hello's kinds: control channel, page channel.
pub const KIND_CONTROL: u32 = 1;
/// See [`KIND_CONTROL`].
pub const KIND_PAGES: u32 = 2;

/// A hello as the wire table describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefHello {
    /// [`KIND_CONTROL`] or [`KIND_PAGES`].
    pub kind: u32,
    /// The session id.
    pub session: [u8; 16],
    /// The page channel index (0 for the control channel).
    pub channel: u32,
    /// The session's page channel count.
    pub channels: u32,
}

/// A hello: `b"CLEARLOG"`, version 2 or later, kind 1 (control, channel 0) or 2 (page channel, index
/// below the count), a session of 1 to 64 page channels, a lowest version the source speaks that
/// this destination speaks too (at most 2), reserved 0. `None` for anything else.
pub fn reference_hello(bytes: &[u8]) -> Option<RefHello> {
    let mut c = Cur { b: bytes, at: 0 };
    if c.u64()? != MAGIC {
        return None;
    }
    // The highest version the source speaks: a later source still speaking 2 is understood.
    if c.u32()? < SESSION_VERSION {
        return None;
    }
    let kind = c.u32()?;
    let session: [u8; 16] = c.take(16)?.try_into().ok()?;
    let (channel, channels, min_version, reserved) = (c.u32()?, c.u32()?, c.u32()?, c.u32()?);
    let index_ok = match kind {
        KIND_CONTROL => channel == 0,
        KIND_PAGES => channel < channels,
        _ => false,
    };
    let ok = index_ok
        && (1..=MAX_CHANNELS).contains(&channels)
        && min_version <= SESSION_VERSION
        && reserved == 0;
    ok.then_some(RefHello {
        kind,
        session,
        channel,
        channels,
    })
}

/// Split a fuzz input into connections: the first byte says how many (1 to 6), then each but
/// the last is a little-endian `u16` length and that many bytes; the last takes the rest.
/// (`migration/examples/fuzz_session_corpus.rs` writes the seeds this way.)
pub fn split_connections(data: &[u8]) -> Vec<&[u8]> {
    let Some((&n, mut rest)) = data.split_first() else {
        return vec![&[]];
    };
    let n = 1 + usize::from(n) % 6;
    let mut conns = Vec::with_capacity(n);
    for _ in 1..n {
        let len = match rest {
            [a, b, tail @ ..] => {
                rest = tail;
                usize::from(u16::from_le_bytes([*a, *b]))
            }
            _ => 0,
        };
        let (conn, tail) = rest.split_at(len.min(rest.len()));
        conns.push(conn);
        rest = tail;
    }
    conns.push(rest);
    conns
}

/// A version-1 header at the start of `conn`: its flags and blocks.
fn stream_header(conn: &[u8]) -> Option<Fields> {
    let mut c = Cur { b: conn, at: 0 };
    if c.u64()? != MAGIC || c.u32()? != VERSION {
        return None;
    }
    header_fields(&mut c)
}

/// A control channel's hello and the header fields after it.
fn control(conn: &[u8]) -> Option<(RefHello, Fields)> {
    let hello = reference_hello(conn).filter(|h| h.kind == KIND_CONTROL)?;
    let mut c = Cur {
        b: conn,
        at: HELLO_LEN,
    };
    Some((hello, header_fields(&mut c)?))
}

/// Whether `conns` hold what a destination may accept as `incoming`: a version-1 header, or a
/// control channel (hello and header) with one page channel hello of the same session for each
/// index, each from a connection of its own. `Err` says why not.
pub fn check_accepted(conns: &[&[u8]], incoming: &Incoming) -> Result<(), String> {
    let h = incoming.header();
    let got = (
        h.flags,
        h.blocks
            .iter()
            .map(|b| (b.name.clone(), b.size))
            .collect::<Vec<_>>(),
    );
    match incoming {
        Incoming::Stream { .. } => conns
            .iter()
            .any(|c| stream_header(c).as_ref() == Some(&got))
            .then_some(())
            .ok_or_else(|| format!("a version-1 stream no connection holds: {h:?}")),
        Incoming::Session(_) => {
            let n = incoming.page_channels();
            let formed = conns.iter().enumerate().any(|(i, c)| {
                control(c).is_some_and(|(hello, fields)| {
                    fields == got && hello.channels as usize == n && pages_present(conns, i, hello)
                })
            });
            formed
                .then_some(())
                .ok_or_else(|| format!("a session of {n} page channels no connections form: {h:?}"))
        }
    }
}

/// Whether every page channel of `control`'s session has a hello on a connection other than
/// `control_conn`, each on its own.
fn pages_present(conns: &[&[u8]], control_conn: usize, control: RefHello) -> bool {
    let mut used = vec![false; conns.len()];
    used[control_conn] = true;
    (0..control.channels).all(|channel| {
        let found = conns.iter().enumerate().position(|(i, c)| {
            !used[i]
                && reference_hello(c).is_some_and(|h| {
                    h.kind == KIND_PAGES
                        && h.session == control.session
                        && h.channels == control.channels
                        && h.channel == channel
                })
        });
        found.inspect(|&i| used[i] = true).is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_splits_and_never_fails() {
        assert_eq!(split_connections(&[]), vec![&[][..]]);
        assert_eq!(split_connections(&[0, 1, 2]), vec![&[1u8, 2][..]]);
        let data = [1, 2, 0, 7, 8, 9, 10];
        assert_eq!(split_connections(&data), vec![&[7u8, 8][..], &[9, 10][..]]);
        // A length past the end takes what is there.
        assert_eq!(split_connections(&[1, 9, 0, 7]), vec![&[7u8][..], &[][..]]);
    }
}
