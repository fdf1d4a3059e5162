// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The wire format: constants, an encoder for the source and a validating decoder for the destination.
//!
//! The layout is documented in the crate docs ("Stream format"). All integers are little-endian.
//! The decoder checks every field before acting on it and bounds every allocation:
//! a name is at most [`MAX_NAME_LEN`] bytes, a state blob at most [`MAX_STATE_BLOB_BYTES`], a page
//! batch at most [`MAX_BATCH_PAGES`] pages (read into a fixed buffer), the header at most
//! [`MAX_BLOCKS`] blocks, and a digest table exactly the page count of the destination's own RAM block
//! (8 bytes per local page: never more than the destination already has).

use std::io::{BufRead, Read, Write};

use crate::{Error, Result, StateBlob};

/// `"CLEARLOG"` read as a little-endian `u64`: first field of every stream.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CLEARLOG");

/// The most page channels a session may have.
pub const MAX_CHANNELS: u32 = 64;

/// Stream format version written by this build (and the only one it reads).
pub const VERSION: u32 = 1;
/// Header flag: the source waits for an acknowledgement (network transports; not files).
pub const FLAG_ACK_REQUESTED: u32 = 1;
/// Header flag: a digest table of all guest RAM at switchover precedes the end marker
/// ([`crate::VerifyMode::Strict`]): the destination hashes its RAM after loading and resumes only on a
/// match.
pub const FLAG_DIGEST_FULL: u32 = 2;
/// Header flag (with [`FLAG_ACK_REQUESTED`]): after a positive acknowledgement the source sends a
/// confirmation ([`CONFIRM_MAGIC`]), and the destination resumes only once it has read it. The
/// source's commit point is the confirmation leaving it: before, any failure resumes the source
/// (the destination cannot resume without the confirmation); after, the guest runs at the
/// destination. So the two sides never both run the guest.
pub const FLAG_CONFIRM: u32 = 4;
/// Header flag: after the commit the source streams the digests of its final RAM
/// ([`TAG_VERIFY`] records, then [`TAG_VERIFY_END`]) and the destination answers with a verdict
/// ([`VERDICT_MAGIC`]): the default verification ([`crate::VerifyMode::AfterResume`]), outside the
/// downtime. On a file it follows the end marker and the destination checks it before resuming.
pub const FLAG_VERIFY_AFTER: u32 = 8;
/// Header flag of a session that resumes an interrupted postcopy: the destination answers on the
/// return path with the pages it still misses (`TAG_MISSING` records, then `TAG_POSTCOPY` with
/// their count), then its requests; the source sends them, then the end marker and the
/// verification, as the interrupted session would have.
pub const FLAG_POSTCOPY_RECOVER: u32 = 16;
/// Most entries in one verify record.
pub const MAX_VERIFY_ENTRIES: u32 = 4096;
/// Record tag (after the end marker): `(page, digest)` pairs of a block's final non-zero pages.
pub const TAG_VERIFY: u8 = 0x04;
/// Record tag: end of the verify records, with their entry count.
pub const TAG_VERIFY_END: u8 = 0x05;
/// `"VRFY"` as a little-endian `u32`: first field of the destination's verdict, followed by
/// `status: u32` ([`VERDICT_OK`] or [`VERDICT_MISMATCH`]), `mismatched_pages: u64` and
/// `resumed_at_unix_ns: u64` (0 if the destination had not resumed).
pub const VERDICT_MAGIC: u32 = u32::from_le_bytes(*b"VRFY");
/// Verdict status: the destination held exactly the source's final memory at switchover.
pub const VERDICT_OK: u32 = 0;
/// Verdict status: some pages differ.
pub const VERDICT_MISMATCH: u32 = 1;
/// Most RAM blocks a header may declare.
pub const MAX_BLOCKS: u32 = 1024;
/// Longest RAM block or state blob name, bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Largest state blob, bytes (64 MiB).
pub const MAX_STATE_BLOB_BYTES: u32 = 64 << 20;
/// Most state blobs in one stream.
pub const MAX_STATE_BLOBS: u32 = 4096;
/// Largest total size of all state blobs of one stream, bytes (256 MiB).
pub const MAX_STATE_TOTAL_BYTES: u64 = 256 << 20;
/// Most pages in one page record.
pub const MAX_BATCH_PAGES: u32 = 256;
/// Digest-table entries allocated before any of them is read (1 MiB of `u64`s); a longer table grows
/// as its bytes arrive, so a header announcing a huge block costs nothing until the data is there.
const DIGEST_PREALLOC: u64 = 1 << 17;
/// Record tag: a batch of pages of one block.
pub const TAG_PAGES: u8 = 0x01;
/// Record tag: a state blob.
pub const TAG_STATE: u8 = 0x02;
/// Record tag: a block's digest table.
pub const TAG_DIGESTS: u8 = 0x03;
/// Record tag: a range of a block's pages that are all zero (memory the source never populated):
/// `block: u32`, `first_page: u64`, `npages: u64`.
pub const TAG_ZERO_RANGE: u8 = 0x06;
/// Record tag: end of stream.
pub const TAG_END: u8 = 0xff;
/// Record tag: the end of a page channel of a session (`b"CLRLEND!"`, `page_records: u64`).
pub const TAG_CHANNEL_END: u8 = 0x07;
/// Record tag (a session's control channel): drain. `channels: u32` (the session's page channel
/// count), then per page channel `page_records: u64`, the page entries it carried so far; the
/// destination answers [`crate::wire::Drained`] once it has loaded them all.
pub const TAG_DRAIN: u8 = 0x08;
/// Tag of a postcopy list of missing pages: block (u32), first page (u64, a multiple of 64), word
/// count (u32, 1..=[`MAX_MISSING_WORDS`]), then that many little-endian u64 bitmap words.
pub const TAG_MISSING: u8 = 0x09;
/// Tag of the postcopy switch: [`END_MAGIC`], then the missing pages listed (u64). The state
/// records follow; the destination acknowledges, the source confirms, and the destination's guest
/// runs with those pages missing.
pub const TAG_POSTCOPY: u8 = 0x0a;
/// Most bitmap words in one missing-pages record (256 Ki pages).
pub const MAX_MISSING_WORDS: u32 = 4096;
/// Page entry kind: the page is all zeros (no data follows).
pub const PAGE_ZERO: u8 = 0;
/// Page entry kind: `page_size` bytes of data follow.
pub const PAGE_DATA: u8 = 1;
/// `"CLRLEND!"` as a little-endian `u64`: payload of the end record.
pub const END_MAGIC: u64 = u64::from_le_bytes(*b"CLRLEND!");
/// `"ACK1"` as a little-endian `u32`: first field of the destination's answer.
pub const ACK_MAGIC: u32 = u32::from_le_bytes(*b"ACK1");
/// Acknowledgement status: loaded and verified.
pub const ACK_OK: u32 = 0;
/// Acknowledgement status: the destination failed (it will not resume).
pub const ACK_FAILED: u32 = 1;
/// `"GO!!"` as a little-endian `u32`: the source's confirmation, followed by a `u32` 0; see
/// [`FLAG_CONFIRM`].
pub const CONFIRM_MAGIC: u32 = u32::from_le_bytes(*b"GO!!");

/// One RAM block of the header: its name and size in bytes.
///
/// # Examples
///
/// ```
/// let b = clearlog_migration::stream::BlockInfo { name: "ram0".into(), size: 1 << 20 };
/// assert_eq!(b.size, 1 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Block name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// The stream header.
///
/// # Examples
///
/// ```
/// use clearlog_migration::stream::{BlockInfo, Header};
///
/// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram".into(), size: 8192 }] };
/// let mut bytes = Vec::new();
/// h.write_to(&mut bytes).unwrap();
/// assert_eq!(&bytes[..8], b"CLEARLOG");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Page size of the source.
    pub page_size: u32,
    /// Flags ([`FLAG_ACK_REQUESTED`], [`FLAG_DIGEST_FULL`], [`FLAG_CONFIRM`],
    /// [`FLAG_VERIFY_AFTER`]).
    pub flags: u32,
    /// RAM layout.
    pub blocks: Vec<BlockInfo>,
}

impl Header {
    /// Encode (magic, version, page size, flags, block count, blocks).
    ///
    /// # Examples
    ///
    /// See [`Header`].
    pub fn write_to<W: Write>(&self, w: &mut W) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(24 + self.blocks.len() * 32);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&VERSION.to_le_bytes());
        self.encode_fields(&mut b);
        w.write_all(&b)
    }

    /// Encode the fields after the magic and the version (page size, flags, block count, blocks):
    /// what a version-2 session's control channel sends after its hello.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::stream::{BlockInfo, Header};
    ///
    /// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram".into(), size: 8192 }] };
    /// let mut fields = Vec::new();
    /// h.write_fields_to(&mut fields).unwrap();
    /// let mut all = Vec::new();
    /// h.write_to(&mut all).unwrap();
    /// assert_eq!(&all[12..], &fields[..]);
    /// ```
    pub fn write_fields_to<W: Write>(&self, w: &mut W) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(12 + self.blocks.len() * 32);
        self.encode_fields(&mut b);
        w.write_all(&b)
    }

    fn encode_fields(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for block in &self.blocks {
            b.extend_from_slice(&(block.name.len() as u16).to_le_bytes());
            b.extend_from_slice(block.name.as_bytes());
            b.extend_from_slice(&block.size.to_le_bytes());
        }
    }
}

/// Builds one page record in place, so pages are read straight into the outgoing buffer (no
/// per-page allocation).
///
/// The buffer is sized for a full batch and zeroed once, at creation; after that a page's bytes
/// are written exactly once, by the read from guest memory (no zero-fill before it), and the
/// zero check and the optional hash run on the copy while it is in the cache.
#[derive(Debug)]
pub(crate) struct PageBatch {
    buf: Vec<u8>,
    /// Bytes of `buf` in use.
    len: usize,
    count: u32,
    block: u32,
    page_size: usize,
}

impl PageBatch {
    pub(crate) fn new(page_size: usize) -> Self {
        PageBatch {
            buf: vec![0; 9 + MAX_BATCH_PAGES as usize * (9 + page_size)],
            len: 0,
            count: 0,
            block: 0,
            page_size,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(crate) fn is_full(&self) -> bool {
        self.count >= MAX_BATCH_PAGES
    }

    /// Start a batch for `block` if empty; the caller flushes before switching blocks.
    fn begin(&mut self, block: u32) {
        if self.count == 0 {
            self.buf[0] = TAG_PAGES;
            self.buf[1..5].copy_from_slice(&block.to_le_bytes());
            self.buf[5..9].copy_from_slice(&0u32.to_le_bytes());
            self.len = 9;
            self.block = block;
        }
        debug_assert_eq!(self.block, block);
    }

    /// Add page `page`, filling its data with `fill`; returns whether it was a zero page and, if `hash`,
    /// the page's xxh3-64 (hashed while it is in cache).
    pub(crate) fn push_page(
        &mut self,
        block: u32,
        page: u64,
        hash: bool,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<(bool, u64)> {
        assert!(!self.is_full(), "push_page on a full batch");
        self.begin(block);
        let entry = self.len;
        let data = entry + 9;
        let end = data + self.page_size;
        self.buf[entry..entry + 8].copy_from_slice(&page.to_le_bytes());
        // `fill` overwrites the whole page: stale bytes of an earlier batch never go out.
        fill(&mut self.buf[data..end])?;
        let zero = is_zero(&self.buf[data..end]);
        let digest = match (hash, zero) {
            (false, _) => 0,
            (true, true) => zero_page_digest(self.page_size),
            (true, false) => xxhash_rust::xxh3::xxh3_64(&self.buf[data..end]),
        };
        if zero {
            self.buf[data - 1] = PAGE_ZERO;
            self.len = data;
        } else {
            self.buf[data - 1] = PAGE_DATA;
            self.len = end;
        }
        self.count += 1;
        Ok((zero, digest))
    }

    /// The finished record (count patched in); the batch is empty afterwards.
    pub(crate) fn take(&mut self) -> &[u8] {
        let count = std::mem::take(&mut self.count);
        self.buf[5..9].copy_from_slice(&count.to_le_bytes());
        &self.buf[..std::mem::take(&mut self.len)]
    }
}

/// xxh3-64 of an all-zero page of `page_size` bytes (computed once per size).
pub(crate) fn zero_page_digest(page_size: usize) -> u64 {
    static CACHE: std::sync::OnceLock<(usize, u64)> = std::sync::OnceLock::new();
    let (size, digest) =
        *CACHE.get_or_init(|| (page_size, xxhash_rust::xxh3::xxh3_64(&vec![0; page_size])));
    if size == page_size {
        digest
    } else {
        xxhash_rust::xxh3::xxh3_64(&vec![0; page_size])
    }
}

/// Is the buffer all zeros? (Word-wise; the compiler vectorizes it.)
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned middle part.
        unsafe { buf.align_to::<u64>() }
    };
    // 64-byte steps: vectorized within a step, and a data page usually stops at the first.
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

/// Encode a state record.
pub(crate) fn encode_state(blob: &StateBlob, out: &mut Vec<u8>) {
    out.push(TAG_STATE);
    out.extend_from_slice(&(blob.name.len() as u16).to_le_bytes());
    out.extend_from_slice(blob.name.as_bytes());
    out.extend_from_slice(&(blob.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&blob.data);
}

/// Encode a digest-table record.
pub(crate) fn encode_digests(block: u32, digests: &[u64], out: &mut Vec<u8>) {
    out.reserve(13 + digests.len() * 8);
    out.push(TAG_DIGESTS);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&(digests.len() as u64).to_le_bytes());
    for d in digests {
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// Encode a zero-range record.
pub(crate) fn encode_zero_range(block: u32, first_page: u64, npages: u64, out: &mut Vec<u8>) {
    out.push(TAG_ZERO_RANGE);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&first_page.to_le_bytes());
    out.extend_from_slice(&npages.to_le_bytes());
}

/// Encode the end record.
pub(crate) fn encode_end(page_records: u64, out: &mut Vec<u8>) {
    out.push(TAG_END);
    out.extend_from_slice(&END_MAGIC.to_le_bytes());
    out.extend_from_slice(&page_records.to_le_bytes());
}

/// Encode the end record of a page channel.
/// Encode a drain request: the page entries each page channel carried so far.
pub(crate) fn encode_drain(page_records: &[u64], out: &mut Vec<u8>) {
    out.push(TAG_DRAIN);
    out.extend_from_slice(&(page_records.len() as u32).to_le_bytes());
    for r in page_records {
        out.extend_from_slice(&r.to_le_bytes());
    }
}

pub(crate) fn encode_channel_end(page_records: u64, out: &mut Vec<u8>) {
    out.push(TAG_CHANNEL_END);
    out.extend_from_slice(&END_MAGIC.to_le_bytes());
    out.extend_from_slice(&page_records.to_le_bytes());
}

/// Encode the missing pages of `block` from `first_page` (a multiple of 64): one bit per page.
pub(crate) fn encode_missing(block: u32, first_page: u64, words: &[u64], out: &mut Vec<u8>) {
    out.reserve(17 + words.len() * 8);
    out.push(TAG_MISSING);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&first_page.to_le_bytes());
    out.extend_from_slice(&(words.len() as u32).to_le_bytes());
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Encode the postcopy switch, with the number of missing pages listed before it.
pub(crate) fn encode_postcopy(missing_pages: u64, out: &mut Vec<u8>) {
    out.push(TAG_POSTCOPY);
    out.extend_from_slice(&END_MAGIC.to_le_bytes());
    out.extend_from_slice(&missing_pages.to_le_bytes());
}

/// Encode a verify record: `(page, digest)` pairs of block `block` (at most
/// [`MAX_VERIFY_ENTRIES`]).
pub(crate) fn encode_verify(block: u32, entries: &[(u64, u64)], out: &mut Vec<u8>) {
    out.reserve(9 + entries.len() * 16);
    out.push(TAG_VERIFY);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (page, digest) in entries {
        out.extend_from_slice(&page.to_le_bytes());
        out.extend_from_slice(&digest.to_le_bytes());
    }
}

/// Encode the end of the verify records.
pub(crate) fn encode_verify_end(entries: u64, out: &mut Vec<u8>) {
    out.push(TAG_VERIFY_END);
    out.extend_from_slice(&END_MAGIC.to_le_bytes());
    out.extend_from_slice(&entries.to_le_bytes());
}

/// What [`StreamReader::next_verify`] read.
///
/// # Examples
///
/// See [`StreamReader::next_verify`].
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyRecord {
    /// Entries of block `block` were appended to the caller's vector.
    Entries {
        /// Block index (checked against the header).
        block: u32,
    },
    /// The end of the verify records, with the entry count the source sent.
    End {
        /// Entries sent in all verify records.
        entries: u64,
    },
}

/// A record read by [`StreamReader::next_record`].
///
/// # Examples
///
/// See [`StreamReader::read_page`].
#[derive(Debug)]
pub enum Record {
    /// A page batch header: call [`StreamReader::read_page`] `count` times.
    Pages {
        /// Block index (checked against the header).
        block: u32,
        /// Pages in the batch (1..=[`MAX_BATCH_PAGES`]).
        count: u32,
    },
    /// A state blob.
    State(StateBlob),
    /// A block's digest table (length checked against the block).
    Digests {
        /// Block index.
        block: u32,
        /// One xxh3-64 per page.
        digests: Vec<u64>,
    },
    /// Pages `[first_page, first_page + npages)` of a block are all zero (checked to lie inside
    /// the block).
    ZeroRange {
        /// Block index.
        block: u32,
        /// First page of the range.
        first_page: u64,
        /// Pages in the range (at least 1).
        npages: u64,
    },
    /// The end marker, with the number of page entries the source sent.
    End {
        /// Page entries sent in the whole stream (a session: on all its page channels).
        page_records: u64,
    },
    /// The end of a page channel of a session, with the page entries sent on it.
    ChannelEnd {
        /// Page entries sent on this channel.
        page_records: u64,
    },
    /// A session's drain request: the page entries each page channel carried so far.
    Drain {
        /// Per page channel (at most [`MAX_CHANNELS`]).
        page_records: Vec<u64>,
    },
    /// Postcopy: pages of a block still to come, one bit per page from `first_page` (checked to
    /// lie inside the block).
    Missing {
        /// Block index.
        block: u32,
        /// First page the words cover (a multiple of 64).
        first_page: u64,
        /// Bitmap words (at most [`MAX_MISSING_WORDS`]).
        words: Vec<u64>,
    },
    /// Postcopy: the switch, after the missing-page lists.
    Postcopy {
        /// Missing pages listed in all missing-page records.
        missing_pages: u64,
    },
}

/// A page entry read by [`StreamReader::read_page`].
///
/// # Examples
///
/// See [`StreamReader::read_page`].
#[derive(Debug, PartialEq, Eq)]
pub enum PageEntry {
    /// Page index inside the block; the data is in the reader's page buffer.
    Data(u64),
    /// Page index of an all-zero page.
    Zero(u64),
}

/// The validating decoder.
///
/// # Examples
///
/// ```
/// use clearlog_migration::stream::{BlockInfo, Header, StreamReader};
/// use clearlog_migration::Error;
///
/// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram".into(), size: 8192 }] };
/// let mut bytes = Vec::new();
/// h.write_to(&mut bytes).unwrap();
/// let mut r = StreamReader::new(&bytes[..]);
/// assert_eq!(r.read_header(4096).unwrap(), h);
/// // Nothing follows the header: a clean truncation error.
/// assert!(matches!(r.next_record(), Err(Error::Truncated(_))));
/// ```
#[derive(Debug)]
pub struct StreamReader<R> {
    r: R,
    blocks: Vec<BlockInfo>,
    page: Vec<u8>,
    bytes: u64,
}

impl<R: Read> StreamReader<R> {
    /// A decoder over `r`.
    ///
    /// # Examples
    ///
    /// ```
    /// let r = clearlog_migration::stream::StreamReader::new(&b""[..]);
    /// assert_eq!(r.bytes_read(), 0);
    /// ```
    pub fn new(r: R) -> Self {
        StreamReader {
            r,
            blocks: Vec::new(),
            page: Vec::new(),
            bytes: 0,
        }
    }

    /// A decoder over `r` for records of a stream whose header was read elsewhere: a page channel
    /// of a session, whose layout the control channel's header gave.
    pub(crate) fn with_layout(r: R, header: &Header) -> Self {
        StreamReader {
            r,
            blocks: header.blocks.clone(),
            page: vec![0; header.page_size as usize],
            bytes: 0,
        }
    }

    /// The reader underneath (for what follows the stream: the destination reads the source's
    /// confirmation through it).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut r = clearlog_migration::stream::StreamReader::new(std::io::Cursor::new(vec![1u8]));
    /// assert_eq!(r.get_mut().position(), 0);
    /// ```
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Bytes consumed so far.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut r = clearlog_migration::stream::StreamReader::new(&b"CLEARLOG\x09\0\0\0"[..]);
    /// assert!(r.read_header(4096).is_err()); // version 9
    /// assert_eq!(r.bytes_read(), 12);
    /// ```
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The page buffer filled by the last [`PageEntry::Data`].
    ///
    /// # Examples
    ///
    /// See [`StreamReader::read_page`].
    pub fn page_data(&self) -> &[u8] {
        &self.page
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        self.r.read_exact(buf).map_err(Error::io(what))?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        let mut b = [0; 1];
        self.fill(&mut b, what)?;
        Ok(b[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        let mut b = [0; 2];
        self.fill(&mut b, what)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let mut b = [0; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let mut b = [0; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn name(&mut self, what: &'static str) -> Result<String> {
        let len = self.u16(what)? as usize;
        if len == 0 {
            return Err(Error::Malformed(what));
        }
        if len > MAX_NAME_LEN {
            return Err(Error::TooLarge {
                what,
                value: len as u64,
                limit: MAX_NAME_LEN as u64,
            });
        }
        let mut b = vec![0; len];
        self.fill(&mut b, what)?;
        String::from_utf8(b).map_err(|_| Error::Malformed(what))
    }

    /// Read and check the header: magic, version, page size (must equal `local_page_size`), block
    /// count, names and sizes (non-zero page multiples). Matching the layout with the destination's RAM
    /// is the caller's job (see [`crate::Destination`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::{stream::{BlockInfo, Header, StreamReader}, Error};
    ///
    /// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram".into(), size: 4096 }] };
    /// let mut bytes = Vec::new();
    /// h.write_to(&mut bytes).unwrap();
    /// let err = StreamReader::new(&bytes[..]).read_header(65536).unwrap_err();
    /// assert!(matches!(err, Error::PageSizeMismatch { stream: 4096, local: 65536 }));
    /// ```
    pub fn read_header(&mut self, local_page_size: u32) -> Result<Header> {
        let magic = self.u64("header magic")?;
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = self.u32("header version")?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        self.read_header_fields(local_page_size)
    }

    /// Read and check the header's fields after the magic and the version: what a version-2
    /// session's control channel carries after its hello (see [`Header::write_fields_to`]).
    ///
    /// # Errors
    ///
    /// As [`read_header`](Self::read_header), but for the magic and the version.
    pub fn read_header_fields(&mut self, local_page_size: u32) -> Result<Header> {
        let page_size = self.u32("header page size")?;
        if page_size != local_page_size {
            return Err(Error::PageSizeMismatch {
                stream: page_size,
                local: local_page_size,
            });
        }
        let flags = self.u32("header flags")?;
        if flags
            & !(FLAG_ACK_REQUESTED
                | FLAG_DIGEST_FULL
                | FLAG_CONFIRM
                | FLAG_VERIFY_AFTER
                | FLAG_POSTCOPY_RECOVER)
            != 0
        {
            return Err(Error::Malformed("header flags"));
        }
        let count = self.u32("header block count")?;
        if count == 0 {
            return Err(Error::Malformed("header block count"));
        }
        if count > MAX_BLOCKS {
            return Err(Error::TooLarge {
                what: "header block count",
                value: count.into(),
                limit: MAX_BLOCKS.into(),
            });
        }
        let mut blocks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = self.name("RAM block name")?;
            let size = self.u64("RAM block size")?;
            if size == 0 || size % u64::from(page_size) != 0 {
                return Err(Error::Malformed("RAM block size"));
            }
            blocks.push(BlockInfo { name, size });
        }
        self.page = vec![0; page_size as usize];
        self.blocks = blocks.clone();
        Ok(Header {
            page_size,
            flags,
            blocks,
        })
    }

    fn block_index(&mut self, what: &'static str) -> Result<u32> {
        let index = self.u32(what)?;
        if index as usize >= self.blocks.len() {
            return Err(Error::BlockOutOfRange {
                index,
                count: self.blocks.len() as u32,
            });
        }
        Ok(index)
    }

    /// A state blob (after its tag).
    fn state_record(&mut self) -> Result<Record> {
        let name = self.name("state blob name")?;
        let len = self.u32("state blob size")?;
        if len > MAX_STATE_BLOB_BYTES {
            return Err(Error::TooLarge {
                what: "state blob size",
                value: len.into(),
                limit: MAX_STATE_BLOB_BYTES.into(),
            });
        }
        // Read in bounded steps so a lying length on a short stream costs at most one step.
        let mut data = Vec::new();
        let mut left = len as usize;
        while left > 0 {
            let step = left.min(1 << 20);
            let at = data.len();
            data.resize(at + step, 0);
            self.fill(&mut data[at..], "state blob data")?;
            left -= step;
        }
        Ok(Record::State(StateBlob { name, data }))
    }

    /// A zero range (after its tag), inside its block.
    fn zero_range_record(&mut self) -> Result<Record> {
        let block = self.block_index("zero range block")?;
        let first_page = self.u64("zero range first page")?;
        let npages = self.u64("zero range length")?;
        let info = &self.blocks[block as usize];
        let pages = info.size / self.page.len() as u64;
        if npages == 0 {
            return Err(Error::Malformed("zero range length"));
        }
        if first_page.checked_add(npages).is_none_or(|end| end > pages) {
            return Err(Error::PageOutOfRange {
                block: info.name.clone(),
                page: first_page.saturating_add(npages - 1),
                pages,
            });
        }
        Ok(Record::ZeroRange {
            block,
            first_page,
            npages,
        })
    }

    /// A block's digest table (after its tag): one digest per page of the block.
    fn digests_record(&mut self) -> Result<Record> {
        let block = self.block_index("digest table block")?;
        let count = self.u64("digest table length")?;
        let pages = self.blocks[block as usize].size / self.page.len() as u64;
        if count != pages {
            return Err(Error::Malformed(
                "digest table length (must equal the block's page count)",
            ));
        }
        // `pages` comes from the header, which only the destination checks against its own
        // RAM: grow with the data actually read rather than trusting it up front.
        let mut digests = Vec::with_capacity(pages.min(DIGEST_PREALLOC) as usize);
        let mut buf = [0u8; 8 * 512];
        let mut left = count as usize;
        while left > 0 {
            let n = left.min(512);
            self.fill(&mut buf[..n * 8], "digest table")?;
            digests.extend(buf[..n * 8].chunks_exact(8).map(|c| {
                let mut w = [0; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            }));
            left -= n;
        }
        Ok(Record::Digests { block, digests })
    }

    /// A drain (after its tag): each page channel's record count, 1 to [`MAX_CHANNELS`].
    fn drain_record(&mut self) -> Result<Record> {
        let channels = self.u32("drain channel count")?;
        if channels == 0 {
            return Err(Error::Malformed("drain channel count (none)"));
        }
        if channels > MAX_CHANNELS {
            return Err(Error::TooLarge {
                what: "drain channel count",
                value: channels.into(),
                limit: MAX_CHANNELS.into(),
            });
        }
        let page_records = (0..channels)
            .map(|_| self.u64("drain page count"))
            .collect::<Result<_>>()?;
        Ok(Record::Drain { page_records })
    }

    /// A missing-pages list (after its tag), inside its block.
    fn missing_record(&mut self) -> Result<Record> {
        let block = self.block_index("missing pages block")?;
        let first_page = self.u64("missing pages first page")?;
        let nwords = self.u32("missing pages word count")?;
        if first_page % 64 != 0 || nwords == 0 {
            return Err(Error::Malformed("missing pages (first page or word count)"));
        }
        if nwords > MAX_MISSING_WORDS {
            return Err(Error::TooLarge {
                what: "missing pages word count",
                value: nwords.into(),
                limit: MAX_MISSING_WORDS.into(),
            });
        }
        let pages = self.blocks[block as usize].size / self.page.len() as u64;
        if first_page >= pages {
            return Err(Error::PageOutOfRange {
                block: self.blocks[block as usize].name.clone(),
                page: first_page,
                pages,
            });
        }
        let words = (0..nwords)
            .map(|_| self.u64("missing pages"))
            .collect::<Result<Vec<u64>>>()?;
        // The last set bit must be a page of the block.
        let last = words.iter().enumerate().rev().find(|(_, w)| **w != 0);
        if let Some((i, w)) = last {
            let page = first_page + i as u64 * 64 + 63 - u64::from(w.leading_zeros());
            if page >= pages {
                return Err(Error::PageOutOfRange {
                    block: self.blocks[block as usize].name.clone(),
                    page,
                    pages,
                });
            }
        }
        Ok(Record::Missing {
            block,
            first_page,
            words,
        })
    }

    /// A tag, the end magic and a count (the end marker, a channel end, the postcopy switch).
    fn marked_count(&mut self, what: &'static str, count: &'static str) -> Result<u64> {
        if self.u64(what)? != END_MAGIC {
            return Err(Error::Malformed(what));
        }
        self.u64(count)
    }

    /// Read the next record's tag and fixed fields (a page batch's entries are read with
    /// [`read_page`](Self::read_page)). Must follow [`read_header`](Self::read_header).
    ///
    /// # Examples
    ///
    /// See [`StreamReader`] and [`StreamReader::read_page`].
    pub fn next_record(&mut self) -> Result<Record> {
        if self.blocks.is_empty() {
            return Err(Error::UnexpectedRecord("record before the header"));
        }
        match self.u8("record tag")? {
            TAG_PAGES => {
                let block = self.block_index("page record block")?;
                let count = self.u32("page record count")?;
                if count == 0 {
                    return Err(Error::Malformed("page record count"));
                }
                if count > MAX_BATCH_PAGES {
                    return Err(Error::TooLarge {
                        what: "page record count",
                        value: count.into(),
                        limit: MAX_BATCH_PAGES.into(),
                    });
                }
                Ok(Record::Pages { block, count })
            }
            TAG_STATE => self.state_record(),
            TAG_ZERO_RANGE => self.zero_range_record(),
            TAG_DIGESTS => self.digests_record(),
            TAG_END => Ok(Record::End {
                page_records: self.marked_count("end marker", "end marker page count")?,
            }),
            TAG_CHANNEL_END => Ok(Record::ChannelEnd {
                page_records: self.marked_count("channel end marker", "channel end page count")?,
            }),
            TAG_DRAIN => self.drain_record(),
            TAG_MISSING => self.missing_record(),
            TAG_POSTCOPY => Ok(Record::Postcopy {
                missing_pages: self
                    .marked_count("postcopy switch", "postcopy missing page count")?,
            }),
            tag => Err(Error::UnknownRecord(tag)),
        }
    }

    /// The index (checked against the block's size) and kind byte of a page entry.
    fn page_head(&mut self, block: u32) -> Result<(u64, u8)> {
        let page = self.u64("page index")?;
        let info = &self.blocks[block as usize];
        let pages = info.size / self.page.len() as u64;
        if page >= pages {
            return Err(Error::PageOutOfRange {
                block: info.name.clone(),
                page,
                pages,
            });
        }
        Ok((page, self.u8("page kind")?))
    }

    /// Read one entry of a page batch of `block` (its index is checked against the block's size; data
    /// lands in [`page_data`](Self::page_data)).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::stream::*;
    ///
    /// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram".into(), size: 8192 }] };
    /// let mut b = Vec::new();
    /// h.write_to(&mut b).unwrap();
    /// b.push(TAG_PAGES);
    /// b.extend_from_slice(&0u32.to_le_bytes()); // block 0
    /// b.extend_from_slice(&1u32.to_le_bytes()); // one page
    /// b.extend_from_slice(&1u64.to_le_bytes()); // page 1
    /// b.push(PAGE_DATA);
    /// b.extend_from_slice(&[0xab; 4096]);
    /// let mut r = StreamReader::new(&b[..]);
    /// r.read_header(4096).unwrap();
    /// assert!(matches!(r.next_record().unwrap(), Record::Pages { block: 0, count: 1 }));
    /// assert_eq!(r.read_page(0).unwrap(), PageEntry::Data(1));
    /// assert_eq!(r.page_data()[0], 0xab);
    /// ```
    pub fn read_page(&mut self, block: u32) -> Result<PageEntry> {
        let (page, kind) = self.page_head(block)?;
        match kind {
            PAGE_ZERO => Ok(PageEntry::Zero(page)),
            PAGE_DATA => {
                let mut buf = std::mem::take(&mut self.page);
                let r = self.fill(&mut buf, "page data");
                self.page = buf;
                r?;
                Ok(PageEntry::Data(page))
            }
            _ => Err(Error::Malformed("page kind")),
        }
    }

    /// Like [`read_page`](Self::read_page), but a data page is handed to `load` as
    /// `(page, bytes)`, straight from the buffered reader's buffer when it holds the whole page
    /// (the usual case), so the page is copied once: from that buffer into wherever `load` puts
    /// it (guest RAM). [`page_data`](Self::page_data) is not updated on that path.
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::stream::*;
    ///
    /// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram".into(), size: 8192 }] };
    /// let mut b = Vec::new();
    /// h.write_to(&mut b).unwrap();
    /// b.push(TAG_PAGES);
    /// b.extend_from_slice(&0u32.to_le_bytes());
    /// b.extend_from_slice(&1u32.to_le_bytes());
    /// b.extend_from_slice(&1u64.to_le_bytes());
    /// b.push(PAGE_DATA);
    /// b.extend_from_slice(&[0xab; 4096]);
    /// let mut r = StreamReader::new(std::io::BufReader::new(&b[..]));
    /// r.read_header(4096).unwrap();
    /// assert!(matches!(r.next_record().unwrap(), Record::Pages { block: 0, count: 1 }));
    /// let mut first = 0;
    /// let e = r.read_page_with(0, |_, data| { first = data[0]; Ok(()) }).unwrap();
    /// assert_eq!((e, first), (PageEntry::Data(1), 0xab));
    /// ```
    pub fn read_page_with(
        &mut self,
        block: u32,
        load: impl FnOnce(u64, &[u8]) -> Result<()>,
    ) -> Result<PageEntry>
    where
        R: BufRead,
    {
        let page_size = self.page.len();
        let (page, kind) = self.page_head(block)?;
        match kind {
            PAGE_ZERO => Ok(PageEntry::Zero(page)),
            PAGE_DATA => {
                let avail = self.r.fill_buf().map_err(Error::io("page data"))?;
                if avail.len() >= page_size {
                    load(page, &avail[..page_size])?;
                    self.r.consume(page_size);
                    self.bytes += page_size as u64;
                } else {
                    // Split across two reads of the transport: through the page buffer.
                    let mut buf = std::mem::take(&mut self.page);
                    let r = self.fill(&mut buf, "page data");
                    self.page = buf;
                    r?;
                    load(page, &self.page)?;
                }
                Ok(PageEntry::Data(page))
            }
            _ => Err(Error::Malformed("page kind")),
        }
    }

    /// Read the next verify record (they follow the end marker with [`FLAG_VERIFY_AFTER`]):
    /// its `(page, digest)` entries are appended to `out` after checking each page lies inside its
    /// block; or the end of them.
    ///
    /// # Errors
    ///
    /// Truncation, an unknown tag, a block or page out of range, more than
    /// [`MAX_VERIFY_ENTRIES`] entries, a bad end marker: each its own [`Error`].
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::stream::{BlockInfo, Header, StreamReader, VerifyRecord};
    ///
    /// let h = Header { page_size: 4096, flags: 0, blocks: vec![BlockInfo { name: "ram".into(), size: 8192 }] };
    /// let mut bytes = Vec::new();
    /// h.write_to(&mut bytes).unwrap();
    /// bytes.push(0x04); // one entry for block 0: page 1, digest 7
    /// bytes.extend_from_slice(&0u32.to_le_bytes());
    /// bytes.extend_from_slice(&1u32.to_le_bytes());
    /// bytes.extend_from_slice(&1u64.to_le_bytes());
    /// bytes.extend_from_slice(&7u64.to_le_bytes());
    /// bytes.push(0x05);
    /// bytes.extend_from_slice(b"CLRLEND!");
    /// bytes.extend_from_slice(&1u64.to_le_bytes());
    /// let mut r = StreamReader::new(&bytes[..]);
    /// r.read_header(4096).unwrap();
    /// let mut entries = Vec::new();
    /// assert_eq!(r.next_verify(&mut entries).unwrap(), VerifyRecord::Entries { block: 0 });
    /// assert_eq!(entries, [(1, 7)]);
    /// assert_eq!(r.next_verify(&mut entries).unwrap(), VerifyRecord::End { entries: 1 });
    /// ```
    pub fn next_verify(&mut self, out: &mut Vec<(u64, u64)>) -> Result<VerifyRecord> {
        if self.blocks.is_empty() {
            return Err(Error::UnexpectedRecord("verify record before the header"));
        }
        match self.u8("verify record tag")? {
            TAG_VERIFY => {
                let block = self.block_index("verify record block")?;
                let count = self.u32("verify record count")?;
                if count == 0 {
                    return Err(Error::Malformed("verify record count"));
                }
                if count > MAX_VERIFY_ENTRIES {
                    return Err(Error::TooLarge {
                        what: "verify record count",
                        value: count.into(),
                        limit: MAX_VERIFY_ENTRIES.into(),
                    });
                }
                let info = &self.blocks[block as usize];
                let (name, pages) = (info.name.clone(), info.size / self.page.len() as u64);
                for _ in 0..count {
                    let page = self.u64("verify record page")?;
                    if page >= pages {
                        return Err(Error::PageOutOfRange {
                            block: name,
                            page,
                            pages,
                        });
                    }
                    let digest = self.u64("verify record digest")?;
                    out.push((page, digest));
                }
                Ok(VerifyRecord::Entries { block })
            }
            TAG_VERIFY_END => {
                if self.u64("verify end marker")? != END_MAGIC {
                    return Err(Error::Malformed("verify end marker"));
                }
                let entries = self.u64("verify end entry count")?;
                Ok(VerifyRecord::End { entries })
            }
            tag => Err(Error::UnknownRecord(tag)),
        }
    }

    /// Consume the decoder, returning the reader.
    ///
    /// # Examples
    ///
    /// ```
    /// let r = clearlog_migration::stream::StreamReader::new(&b"x"[..]);
    /// assert_eq!(r.into_inner(), b"x");
    /// ```
    pub fn into_inner(self) -> R {
        self.r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[1] = 1;
        assert!(!is_zero(&p[1..]));
    }

    /// Missing-page records: a list inside its block decodes; a first page past the block (the
    /// fuzzer's overflow: a first page near `u64::MAX`), a set bit past it, a first page not a multiple of 64
    /// or no words are refused, never a panic.
    #[test]
    fn missing_pages_records_are_checked_against_their_block() {
        let h = Header {
            page_size: 4096,
            flags: 0,
            blocks: vec![BlockInfo {
                name: "b".into(),
                size: 4096 * 100,
            }],
        };
        let decode = |first: u64, words: &[u64]| {
            let mut b = Vec::new();
            h.write_to(&mut b).unwrap();
            encode_missing(0, first, words, &mut b);
            let mut r = StreamReader::new(&b[..]);
            r.read_header(4096).unwrap();
            r.next_record()
        };
        let ok = decode(64, &[1 << 35, 0, 0]).unwrap();
        assert!(matches!(ok, Record::Missing { first_page: 64, .. }));
        assert!(matches!(
            decode(u64::MAX - 63, &[0, 1 << 63]),
            Err(Error::PageOutOfRange { .. })
        ));
        assert!(matches!(
            decode(64, &[1 << 36]),
            Err(Error::PageOutOfRange { page: 100, .. })
        ));
        assert!(matches!(decode(3, &[1]), Err(Error::Malformed(_))));
        assert!(matches!(decode(0, &[]), Err(Error::Malformed(_))));
    }

    #[test]
    fn batch_round_trip() {
        let h = Header {
            page_size: 4096,
            flags: 0,
            blocks: vec![BlockInfo {
                name: "b".into(),
                size: 4096 * 4,
            }],
        };
        let mut out = Vec::new();
        h.write_to(&mut out).unwrap();
        let mut batch = PageBatch::new(4096);
        let (zero, digest) = batch
            .push_page(0, 3, true, |b| {
                b.fill(0);
                Ok(())
            })
            .unwrap();
        assert!(zero);
        assert_eq!(digest, xxhash_rust::xxh3::xxh3_64(&[0; 4096]));
        let (zero, digest) = batch
            .push_page(0, 1, true, |b| {
                b.fill(7);
                Ok(())
            })
            .unwrap();
        assert!(!zero);
        assert_eq!(digest, xxhash_rust::xxh3::xxh3_64(&[7; 4096]));
        out.extend_from_slice(batch.take());
        encode_end(2, &mut out);
        let mut r = StreamReader::new(&out[..]);
        r.read_header(4096).unwrap();
        assert!(matches!(
            r.next_record().unwrap(),
            Record::Pages { block: 0, count: 2 }
        ));
        assert_eq!(r.read_page(0).unwrap(), PageEntry::Zero(3));
        assert_eq!(r.read_page(0).unwrap(), PageEntry::Data(1));
        assert!(r.page_data().iter().all(|&b| b == 7));
        assert!(matches!(
            r.next_record().unwrap(),
            Record::End { page_records: 2 }
        ));
        assert_eq!(r.bytes_read(), out.len() as u64);
    }
}
