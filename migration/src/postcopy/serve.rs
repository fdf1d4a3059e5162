// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The source's side of postcopy: pages the destination asks for go out on the control channel
//! at once, ahead of the background push on the page channels, until the destination says every
//! page arrived. A page goes at least once by either path; a page asked for after it was pushed
//! goes again (it may still sit in a page channel's queue), and the destination places it once.

use std::io::{self, Write};
use std::time::Duration;

use clearlog_bitmap::AtomicBitmap;

use crate::sender::{Channels, Out, Sent, WindowJob};
use crate::stream::PageBatch;
use crate::transport::TransportRead;
use crate::wire::{read_within, PostcopyMessage, ReadFailure};
use crate::{CancelToken, Error, MigrationBlock, Result, PAGE_SIZE};

/// Pages per window of the background push (1 MiB).
const PUSH_WINDOW_PAGES: usize = 256;

/// The request reader's deadline: none to speak of (see [`serve_requests`]).
const NO_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// What serving requests did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Served {
    /// Requests received.
    pub(crate) requests: u64,
    /// Of which for pages the background push had not taken yet.
    pub(crate) first: u64,
    /// Page records sent on the control channel.
    pub(crate) sent: Sent,
}

/// Answer the destination's requests on `out` until it says every page arrived. `pending[b]`:
/// block `b`'s pages neither path has taken yet. Ends early, with an error, when the return path
/// fails, or when `stop` is cancelled (the push failed, or the caller cancelled).
pub(crate) fn serve_requests<B: MigrationBlock>(
    reader: &mut dyn TransportRead,
    out: &mut Out,
    blocks: &[B],
    pending: &[AtomicBitmap],
    stop: &CancelToken,
) -> Result<Served> {
    let mut batch = PageBatch::new(PAGE_SIZE as usize);
    let mut served = Served::default();
    let mut buf = [0u8; PostcopyMessage::LEN];
    loop {
        // No deadline of its own: the destination may ask nothing for as long as the push takes.
        // A dead link fails the read; a failed push, or the caller, cancels `stop`.
        read_within(reader, &mut buf, NO_DEADLINE, Some(stop)).map_err(|e| Error::Postcopy {
            context: "reading the destination's requests",
            source: match e {
                ReadFailure::Io(e) => e,
                ReadFailure::Eof => io::ErrorKind::UnexpectedEof.into(),
                other => io::Error::other(other.to_string()),
            },
        })?;
        let Some(want) = PostcopyMessage::parse(&buf)?.wanted() else {
            return Ok(served);
        };
        let (b, page) = (want.block as usize, want.page);
        if b >= blocks.len() || page >= blocks[b].pages() {
            return Err(Error::Malformed("postcopy request (no such page)"));
        }
        served.requests += 1;
        if pending[b].test_and_clear(page as usize) {
            served.first += 1;
        }
        let (zero, _) = batch.push_page(want.block, page, false, |buf| {
            blocks[b]
                .read(page * PAGE_SIZE, buf)
                .map_err(Error::memory("reading a page asked for"))
        })?;
        let rec = batch.take();
        // Ahead of the push's share of the bandwidth limit: the guest waits on this page.
        out.write_ahead(rec)
            .and_then(|()| out.flush())
            .map_err(postcopy_io("sending a page asked for"))?;
        served.sent.pages += 1;
        served.sent.zero += u64::from(zero);
        served.sent.bytes += rec.len() as u64;
    }
}

/// Push every page still pending to the page channels, window by window, then end the channels.
/// A page the request server took meanwhile is skipped.
pub(crate) fn push_pending(
    channels: &mut Channels,
    pending: &[AtomicBitmap],
    cancel: &CancelToken,
) -> Result<Sent> {
    let mut window = 0usize;
    for (b, bits) in pending.iter().enumerate() {
        let mut next = bits.find_next_set(0);
        while let Some(first) = next {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let end = (first + PUSH_WINDOW_PAGES).min(bits.len());
            let pages: Vec<u64> = (first..end)
                .filter(|&p| bits.test_and_clear(p))
                .map(|p| p as u64)
                .collect();
            if !pages.is_empty() {
                let job = WindowJob {
                    block: b as u32,
                    zero_ranges: Vec::new(),
                    pages,
                };
                channels.send(window % channels.len(), job)?;
                window += 1;
            }
            next = bits.find_next_set(end);
        }
    }
    channels.finish()
}

/// Serve requests on `out` (read from `reader`) while `channels` push every page of `pending`,
/// until the destination says every page arrived; the channels end. What each path sent.
pub(crate) fn serve_and_push<B: MigrationBlock>(
    out: &mut Out,
    reader: &mut dyn TransportRead,
    channels: &mut Channels,
    blocks: &[B],
    pending: &[AtomicBitmap],
    cancel: &CancelToken,
) -> Result<(Served, Sent)> {
    // Cancelled when the push fails or the caller cancels: the request server stops then.
    let stop = CancelToken::new();
    let (served, pushed) = std::thread::scope(|scope| {
        let server = scope.spawn(|| serve_requests(reader, out, blocks, pending, &stop));
        let pushed = push_pending(channels, pending, cancel);
        if pushed.is_err() || cancel.is_cancelled() {
            stop.cancel();
        }
        let served = server
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (served, pushed)
    });
    // A failed push says more than the request server it called off.
    let pushed = pushed?;
    Ok((served?, pushed))
}

fn postcopy_io(context: &'static str) -> impl Fn(io::Error) -> Error {
    move |source| Error::Postcopy { context, source }
}
