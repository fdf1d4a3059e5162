// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared pieces of the fuzz targets (the session targets' own are in [`session`]): a global
//! allocator that aborts on any allocation over the documented bound, the fuzzed guest's layout,
//! and an independent reference validator of the stream format (the oracle that says whether a
//! guest may be resumed from a stream).
//!
//! # Allocation bound
//!
//! The destination never allocates more than [`HARD_LIMIT`] = `MAX_STATE_BLOB_BYTES` (64 MiB) for one
//! stream field, and a field whose bytes have not arrived yet costs at most one 1 MiB read step: every
//! single allocation while decoding `len` bytes of stream is at most
//! `min(HARD_LIMIT, 2 * len + 2 MiB)` ([`stream_bound`]: the 1 MiB `BufReader`, a state blob grown in
//! 1 MiB steps with `Vec` doubling, the header's block list of at most `MAX_BLOCKS` entries). Tables
//! sized by the destination's own RAM (8 bytes per local page) are far below that for the fuzzed 1 MiB
//! guest. [`BoundedAlloc`] enforces the bound and aborts (a libFuzzer crash) on the first violation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::collections::BTreeMap;

pub mod session;

use clearlog_migration::stream::{
    CONFIRM_MAGIC, END_MAGIC, FLAG_ACK_REQUESTED, FLAG_CONFIRM, FLAG_DIGEST_FULL,
    FLAG_VERIFY_AFTER, MAGIC, MAX_BATCH_PAGES, MAX_BLOCKS, MAX_NAME_LEN, MAX_STATE_BLOBS,
    MAX_STATE_BLOB_BYTES, MAX_STATE_TOTAL_BYTES, MAX_VERIFY_ENTRIES, PAGE_DATA, PAGE_ZERO,
    TAG_DIGESTS, TAG_END, TAG_PAGES, TAG_STATE, TAG_VERIFY, TAG_VERIFY_END, TAG_ZERO_RANGE,
    VERSION,
};

/// The fuzzed guest: one RAM block `ram` of 1 MiB at guest address 0 (as the seed corpus expects).
pub const RAM_NAME: &str = "ram";
/// Size of the fuzzed guest's RAM block.
pub const RAM_SIZE: u64 = 1 << 20;
/// Page size of the stream format.
pub const PAGE: usize = 4096;

/// Largest single allocation ever allowed: the largest stream field, `MAX_STATE_BLOB_BYTES`.
pub const HARD_LIMIT: usize = MAX_STATE_BLOB_BYTES as usize;
/// The decoder's read step for state blobs, and the destination's `BufReader` capacity (1 MiB each).
pub const READ_STEP: usize = 1 << 20;

/// The bound on any single allocation while decoding a stream of `len` bytes (see the crate docs).
pub fn stream_bound(len: usize) -> usize {
    HARD_LIMIT.min(len.saturating_mul(2).saturating_add(2 * READ_STEP))
}

static LIMIT: AtomicUsize = AtomicUsize::new(HARD_LIMIT);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// A global allocator that aborts the process on any allocation larger than the current limit
/// ([`HARD_LIMIT`] outside [`with_limit`]) and remembers the largest one seen inside [`with_limit`].
#[derive(Debug)]
pub struct BoundedAlloc;

impl BoundedAlloc {
    #[inline]
    fn check(size: usize) {
        let limit = LIMIT.load(Ordering::Relaxed);
        if size > limit {
            over_limit(size, limit);
        }
        if limit != HARD_LIMIT {
            LARGEST.fetch_max(size, Ordering::Relaxed);
        }
    }
}

#[cold]
fn over_limit(size: usize, limit: usize) -> ! {
    // No allocation here: format the two numbers into a stack buffer.
    let mut buf = [0u8; 128];
    let mut at = 0;
    for part in [
        &b"BoundedAlloc: single allocation of "[..],
        &b" bytes exceeds the bound of "[..],
        &b" bytes: aborting\n"[..],
    ]
    .iter()
    .enumerate()
    {
        let (i, text) = part;
        buf[at..at + text.len()].copy_from_slice(text);
        at += text.len();
        if i < 2 {
            let n = if i == 0 { size } else { limit };
            let mut digits = [0u8; 20];
            let mut d = digits.len();
            let mut v = n;
            loop {
                d -= 1;
                digits[d] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            let s = &digits[d..];
            buf[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
    }
    let _ = std::io::stderr().write_all(&buf[..at]);
    std::process::abort();
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged (so `System`'s
// guarantees are ours); the added check only reads atomics and may abort, it never unwinds or allocates.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: same contract as our caller's (non-zero-size layout).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`; caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Run `f` with the single-allocation limit set to [`stream_bound`]`(len)`; returns `f`'s result and
/// the largest single allocation made meanwhile (by any thread).
pub fn with_limit<R>(len: usize, f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    LIMIT.store(stream_bound(len), Ordering::Relaxed);
    let r = f();
    LIMIT.store(HARD_LIMIT, Ordering::Relaxed);
    (r, LARGEST.load(Ordering::Relaxed))
}

/// What the reference validator concluded about a stream for the fuzzed guest.
#[derive(Debug)]
pub struct Valid {
    /// The guest RAM image after loading the stream (from all-zero RAM).
    pub ram: Vec<u8>,
    /// The state blobs, in order.
    pub blobs: Vec<(String, Vec<u8>)>,
    /// The acknowledgement flag.
    pub ack: bool,
    /// The memory was verified against the source's final memory (strict digest table, or the
    /// final digests after the end marker). A live stream (acknowledged) that is valid up to the
    /// source's confirmation is resumed before its verification: `verified` false then means
    /// "resumed, then the verification failed".
    pub verified: bool,
    /// Bytes up to and including the end record (trailing bytes are never read).
    pub len: usize,
}

/// A cursor over bytes, reading the stream format's little-endian fields.
pub(crate) struct Cur<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) at: usize,
}

impl Cur<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn name(&mut self) -> Option<String> {
        let len = usize::from(self.u16()?);
        if len == 0 || len > MAX_NAME_LEN {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// A header's flags and blocks (name, size).
pub(crate) type Fields = (u32, Vec<(String, u64)>);

/// The header's fields after the magic and the version, as the format allows them: this page
/// size, only known flags, 1 to `MAX_BLOCKS` blocks, each with a 1- to 256-byte UTF-8 name and a
/// non-zero size that is a multiple of the page. Returns the flags and the blocks.
pub(crate) fn header_fields(c: &mut Cur<'_>) -> Option<Fields> {
    if c.u32()? != PAGE as u32 {
        return None;
    }
    let flags = c.u32()?;
    if flags & !(FLAG_ACK_REQUESTED | FLAG_DIGEST_FULL | FLAG_CONFIRM | FLAG_VERIFY_AFTER) != 0 {
        return None;
    }
    let count = c.u32()?;
    if count == 0 || count > MAX_BLOCKS {
        return None;
    }
    let mut blocks = Vec::new();
    for _ in 0..count {
        let name = c.name()?;
        let size = c.u64()?;
        if size == 0 || size % PAGE as u64 != 0 {
            return None;
        }
        blocks.push((name, size));
    }
    Some((flags, blocks))
}

/// An independent, straightforward reading of the stream format of the crate docs: `Some` iff a
/// destination holding the fuzzed guest's layout (all-zero RAM) must resume from `data` (for a
/// live, acknowledged stream: once it is valid up to the source's confirmation; the verification
/// after that decides [`Valid::verified`]). For a stream without acknowledgement (a snapshot)
/// `Some` also means verified.
pub fn reference(data: &[u8]) -> Option<Valid> {
    let mut c = Cur { b: data, at: 0 };
    if c.u64()? != MAGIC || c.u32()? != VERSION {
        return None;
    }
    let (flags, blocks) = header_fields(&mut c)?;
    let full = flags & FLAG_DIGEST_FULL != 0;
    let after = flags & FLAG_VERIFY_AFTER != 0;
    let ack = flags & FLAG_ACK_REQUESTED != 0;
    if full == after {
        return None;
    }
    // The destination's layout: exactly one block `ram` of RAM_SIZE.
    if blocks != [(RAM_NAME.to_string(), RAM_SIZE)] {
        return None;
    }
    let pages = RAM_SIZE / PAGE as u64;
    let mut ram = vec![0u8; RAM_SIZE as usize];
    // Digests of the pages received as data (the last version of each).
    let mut received: BTreeMap<u64, u64> = BTreeMap::new();
    let mut blobs = Vec::new();
    let mut state_bytes = 0u64;
    let mut table: Option<Vec<u64>> = None;
    let mut page_entries = 0u64;
    loop {
        match c.u8()? {
            TAG_PAGES => {
                if table.is_some() || c.u32()? != 0 {
                    return None;
                }
                let n = c.u32()?;
                if n == 0 || n > MAX_BATCH_PAGES {
                    return None;
                }
                for _ in 0..n {
                    let page = c.u64()?;
                    if page >= pages {
                        return None;
                    }
                    let dst = &mut ram[page as usize * PAGE..(page as usize + 1) * PAGE];
                    match c.u8()? {
                        PAGE_ZERO => {
                            dst.fill(0);
                            received.remove(&page);
                        }
                        PAGE_DATA => {
                            dst.copy_from_slice(c.take(PAGE)?);
                            received.insert(page, xxhash_rust::xxh3::xxh3_64(dst));
                        }
                        _ => return None,
                    }
                    page_entries += 1;
                }
            }
            TAG_ZERO_RANGE => {
                if table.is_some() || c.u32()? != 0 {
                    return None;
                }
                let first = c.u64()?;
                let n = c.u64()?;
                if n == 0 || first.checked_add(n).is_none_or(|end| end > pages) {
                    return None;
                }
                ram[first as usize * PAGE..(first + n) as usize * PAGE].fill(0);
                for page in first..first + n {
                    received.remove(&page);
                }
            }
            TAG_STATE => {
                if table.is_some() {
                    return None;
                }
                let name = c.name()?;
                let len = c.u32()?;
                if len > MAX_STATE_BLOB_BYTES || blobs.len() as u32 >= MAX_STATE_BLOBS {
                    return None;
                }
                let bytes = c.take(len as usize)?.to_vec();
                state_bytes += u64::from(len);
                if state_bytes > MAX_STATE_TOTAL_BYTES {
                    return None;
                }
                blobs.push((name, bytes));
            }
            TAG_DIGESTS => {
                if !full || c.u32()? != 0 || c.u64()? != pages || table.is_some() {
                    return None;
                }
                let t = c.take(pages as usize * 8)?;
                table = Some(
                    t.chunks_exact(8)
                        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                        .collect(),
                );
            }
            TAG_END => {
                if c.u64()? != END_MAGIC || c.u64()? != page_entries {
                    return None;
                }
                break;
            }
            _ => return None,
        }
    }
    if full {
        let local: Vec<u64> = ram
            .chunks_exact(PAGE)
            .map(xxhash_rust::xxh3::xxh3_64)
            .collect();
        if table? != local {
            return None;
        }
    }
    // A live destination resumes once the source confirmed; a snapshot only once verified.
    if ack && flags & FLAG_CONFIRM != 0 && (c.u32()? != CONFIRM_MAGIC || c.u32()? != 0) {
        return None;
    }
    let verified = !after || verify_after(&mut c, pages, received).unwrap_or(false);
    if !ack && !verified {
        return None;
    }
    Some(Valid {
        ram,
        blobs,
        ack,
        verified,
        len: c.at,
    })
}

/// The final digests after the end marker: `Some(true)` iff every listed page matches a page
/// received as data and every page received as data is listed; `None` for a malformed tail.
fn verify_after(c: &mut Cur<'_>, pages: u64, mut received: BTreeMap<u64, u64>) -> Option<bool> {
    let mut ok = true;
    let mut total = 0u64;
    loop {
        match c.u8()? {
            TAG_VERIFY => {
                if c.u32()? != 0 {
                    return None;
                }
                let n = c.u32()?;
                if n == 0 || n > MAX_VERIFY_ENTRIES {
                    return None;
                }
                for _ in 0..n {
                    let page = c.u64()?;
                    if page >= pages {
                        return None;
                    }
                    let digest = c.u64()?;
                    ok &= received.remove(&page) == Some(digest);
                }
                total += u64::from(n);
            }
            TAG_VERIFY_END => {
                if c.u64()? != END_MAGIC || c.u64()? != total {
                    return None;
                }
                return Some(ok && received.is_empty());
            }
            _ => return None,
        }
    }
}
