// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The snapshot file: every page at a fixed offset, read and written here and nowhere else.
//!
//! | bytes                 | what |
//! |-----------------------|------|
//! | `0..4096`             | [`RawHeader`], written last: a file without it was never finished |
//! | per block, 2 MiB aligned | the block's pages, page `p` at `data_offset + p * 4096`; a page this file does not hold, or holds as zero, is a hole |
//! | meta, 4 KiB aligned   | the block table and the CPU/device state; then per block its present bits (one per page: this file defines the page), its digests (8 bytes per page), and the compressed length of each run (4 bytes per 64 pages, 0 for a run stored as is) |
//!
//! Compression (optional, lz4) works per run of 64 pages (256 KiB) and keeps the fixed offsets:
//! a compressed run's bytes start at its first page's offset, and the rest of its 256 KiB is a
//! hole, so it takes disk in proportion to its compressed size while any page can still be
//! found (and read by decompressing its run).
//!
//! Digests are stored XOR-ed with the digest of a zero page, so the digests of zero memory are
//! zero bytes and stay holes: the file of a sparse guest takes disk in proportion to what it
//! holds, not to the guest's size. The header carries the xxh3-64 of the meta and of itself, and
//! the file's length: a truncated or altered header or meta is refused before anything is read
//! from it; a page's data is checked against the digests at restore.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use clearlog_bitmap::Bitmap;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{SnapshotError, SnapshotResult};
use crate::{StateBlob, PAGE_SIZE};

/// The first 8 bytes of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"CLSNAP\0\x01";
/// The format version this build writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Bytes reserved for the header at the start of the file.
pub(crate) const HEADER_LEN: u64 = 4096;
/// Alignment of a block's data in the file (a huge page).
const DATA_ALIGN: u64 = 2 << 20;
/// Pages per compression run.
pub(crate) const RUN_PAGES: u64 = 64;
/// Bytes of a run.
pub(crate) const RUN_BYTES: usize = (RUN_PAGES * PAGE_SIZE) as usize;
/// Longest parent file name the header holds.
pub(crate) const MAX_PARENT_NAME: usize = 255;
/// Longest block or state name.
const MAX_NAME: usize = 255;
/// Largest meta section accepted when reading (bits and digests of 1 TiB of RAM, and state).
const MAX_META: u64 = (1 << 40) / PAGE_SIZE * 9 + (64 << 20);

/// The xxh3-64 of a zero page, which digests are XOR-ed with on disk.
pub(crate) fn zero_page_digest() -> u64 {
    crate::stream::zero_page_digest(PAGE_SIZE as usize)
}

/// The header, at offset 0, little-endian.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    page_size: U32,
    id: [u8; 16],
    parent_id: [u8; 16],
    sequence: U64,
    blocks: U32,
    parent_name_len: U32,
    meta_offset: U64,
    meta_len: U64,
    meta_digest: U64,
    file_len: U64,
    parent_name: [u8; 256],
    header_digest: U64,
}

const RAW_HEADER_LEN: usize = std::mem::size_of::<RawHeader>();
const _: () = assert!(RAW_HEADER_LEN as u64 <= HEADER_LEN);

/// What a snapshot file is and what it builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// This snapshot's identity (random).
    pub id: [u8; 16],
    /// The snapshot this one is a diff of, `None` for a full snapshot.
    pub parent: Option<ParentRef>,
    /// Position in its chain: 0 for a full snapshot, the parent's plus one for a diff.
    pub sequence: u64,
}

/// A diff snapshot's parent: its identity, and its file's name in the same directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// The parent's [`SnapshotHeader::id`].
    pub id: [u8; 16],
    /// The parent's file name (no directory).
    pub file_name: String,
}

/// One RAM block as a snapshot file lays it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// The block's name.
    pub name: String,
    /// Its size in bytes (a multiple of the page size).
    pub size: u64,
    /// File offset of its page 0.
    pub data_offset: u64,
}

impl BlockLayout {
    /// Pages of the block.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// The block layouts of a file holding `blocks` (`(name, size)`), and where the meta starts.
pub(crate) fn layout(blocks: &[(String, u64)]) -> SnapshotResult<(Vec<BlockLayout>, u64)> {
    let mut at = DATA_ALIGN;
    let mut out = Vec::with_capacity(blocks.len());
    for (name, size) in blocks {
        if name.len() > MAX_NAME || size % PAGE_SIZE != 0 {
            return Err(SnapshotError::Layout(format!(
                "block `{name}` cannot be stored (name over {MAX_NAME} bytes or size not whole pages)"
            )));
        }
        out.push(BlockLayout {
            name: name.clone(),
            size: *size,
            data_offset: at,
        });
        at = (at + size).next_multiple_of(DATA_ALIGN);
    }
    Ok((out, at))
}

/// The meta section: the block table and state, then each block's present bits and digests.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) blocks: Vec<BlockLayout>,
    pub(crate) state: Vec<StateBlob>,
    /// Per block: the pages this file defines.
    pub(crate) present: Vec<Bitmap>,
    /// Per block: xxh3-64 of every page at the snapshot's pause.
    pub(crate) digests: Vec<Vec<u64>>,
    /// Per block, per run of [`RUN_PAGES`] pages: its compressed length, 0 if stored as is.
    pub(crate) compressed: Vec<Vec<u32>>,
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

fn pad_page(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(PAGE_SIZE as usize), 0);
}

impl Meta {
    /// The meta's bytes (a multiple of the page size).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for b in &self.blocks {
            put_name(&mut out, &b.name);
            out.extend_from_slice(&b.size.to_le_bytes());
            out.extend_from_slice(&b.data_offset.to_le_bytes());
        }
        out.extend_from_slice(&(self.state.len() as u32).to_le_bytes());
        for s in &self.state {
            put_name(&mut out, &s.name);
            out.extend_from_slice(&(s.data.len() as u64).to_le_bytes());
            out.extend_from_slice(&s.data);
        }
        pad_page(&mut out);
        for p in &self.present {
            out.extend(p.as_words().iter().flat_map(|w| w.to_le_bytes()));
            pad_page(&mut out);
        }
        let zero = zero_page_digest();
        for d in &self.digests {
            out.extend(d.iter().flat_map(|d| (d ^ zero).to_le_bytes()));
            pad_page(&mut out);
        }
        for c in &self.compressed {
            out.extend(c.iter().flat_map(|n| n.to_le_bytes()));
            pad_page(&mut out);
        }
        out
    }

    /// Parse `bytes` (checked against its digest by the caller) for `blocks` blocks; the
    /// digests only `with_digests` (a restore uses only the newest file's).
    pub(crate) fn decode(bytes: &[u8], blocks: u32, with_digests: bool) -> SnapshotResult<Meta> {
        let mut r = Cursor { bytes, at: 0 };
        if r.u32()? != blocks {
            return Err(SnapshotError::corrupt(
                "the block table disagrees with the header",
            ));
        }
        let mut layouts = Vec::new();
        for _ in 0..blocks {
            let name = r.name()?;
            let size = r.u64()?;
            let data_offset = r.u64()?;
            if size % PAGE_SIZE != 0 || data_offset % PAGE_SIZE != 0 {
                return Err(SnapshotError::corrupt(
                    "a block's size or offset is not whole pages",
                ));
            }
            layouts.push(BlockLayout {
                name,
                size,
                data_offset,
            });
        }
        let mut state = Vec::new();
        for _ in 0..r.u32()? {
            let name = r.name()?;
            let len = r.u64()?;
            state.push(StateBlob::new(name, r.take(len)?.to_vec()));
        }
        r.pad_page();
        let mut present = Vec::new();
        for b in &layouts {
            let words = b.pages().div_ceil(64);
            let raw = r.take(words * 8)?;
            let words = raw
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .collect();
            let mut bits = Bitmap::from_words(words, b.pages() as usize)
                .map_err(|_| SnapshotError::corrupt("a block's present bits do not fit it"))?;
            bits.mask_tail();
            present.push(bits);
            r.pad_page();
        }
        let zero = zero_page_digest();
        let mut digests = Vec::new();
        for b in &layouts {
            let raw = r.take(b.pages() * 8)?;
            if !with_digests {
                digests.push(Vec::new());
                r.pad_page();
                continue;
            }
            digests.push(
                raw.chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ zero)
                    .collect(),
            );
            r.pad_page();
        }
        let mut compressed = Vec::new();
        for b in &layouts {
            let raw = r.take(b.pages().div_ceil(RUN_PAGES) * 4)?;
            let lens: Vec<u32> = raw
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
                .collect();
            if lens.iter().any(|&n| n as usize >= RUN_BYTES) {
                return Err(SnapshotError::corrupt(
                    "a compressed run is longer than a run",
                ));
            }
            compressed.push(lens);
            r.pad_page();
        }
        Ok(Meta {
            blocks: layouts,
            state,
            present,
            digests,
            compressed,
        })
    }
}

/// A bounds-checked reader over the meta's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> SnapshotResult<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| SnapshotError::corrupt("the meta section ends early"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> SnapshotResult<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> SnapshotResult<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn name(&mut self) -> SnapshotResult<String> {
        let len = self.u32()? as usize;
        if len > MAX_NAME {
            return Err(SnapshotError::corrupt("a name is too long"));
        }
        String::from_utf8(self.take(len as u64)?.to_vec())
            .map_err(|_| SnapshotError::corrupt("a name is not UTF-8"))
    }
    fn pad_page(&mut self) {
        self.at = self.at.next_multiple_of(PAGE_SIZE as usize);
    }
}

/// Where the meta lies and what it hashes to, as the header records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetaExtent {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) digest: u64,
    pub(crate) file_len: u64,
}

/// The header's bytes for `header`, `blocks` blocks and the meta at `meta`.
pub(crate) fn encode_header(header: &SnapshotHeader, blocks: u32, meta: MetaExtent) -> Vec<u8> {
    let (parent_id, name) = header
        .parent
        .as_ref()
        .map_or(([0; 16], ""), |p| (p.id, p.file_name.as_str()));
    let mut parent_name = [0u8; 256];
    parent_name[..name.len()].copy_from_slice(name.as_bytes());
    let mut raw = RawHeader {
        magic: SNAPSHOT_MAGIC,
        version: SNAPSHOT_VERSION.into(),
        page_size: (PAGE_SIZE as u32).into(),
        id: header.id,
        parent_id,
        sequence: header.sequence.into(),
        blocks: blocks.into(),
        parent_name_len: (name.len() as u32).into(),
        meta_offset: meta.offset.into(),
        meta_len: meta.len.into(),
        meta_digest: meta.digest.into(),
        file_len: meta.file_len.into(),
        parent_name,
        header_digest: 0.into(),
    };
    raw.header_digest = xxh3_64(&raw.as_bytes()[..RAW_HEADER_LEN - 8]).into();
    raw.as_bytes().to_vec()
}

/// Fill `buf` from `offset` of `file`; a file that ends first is corrupt (`short` says how).
pub(crate) fn read_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    short: &'static str,
) -> SnapshotResult<()> {
    file.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::corrupt(short),
        _ => SnapshotError::Io(e),
    })
}

/// Read and check the header of `file`: what it is, its block count and where its meta lies.
pub(crate) fn read_header(file: &File) -> SnapshotResult<(SnapshotHeader, u32, MetaExtent)> {
    let mut bytes = [0u8; RAW_HEADER_LEN];
    read_at(file, &mut bytes, 0, "shorter than a header")?;
    let raw = RawHeader::read_from_bytes(&bytes).expect("exact size");
    if raw.magic != SNAPSHOT_MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    if raw.version.get() != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version(raw.version.get()));
    }
    if raw.header_digest.get() != xxh3_64(&bytes[..RAW_HEADER_LEN - 8]) {
        return Err(SnapshotError::corrupt("the header's digest does not match"));
    }
    if u64::from(raw.page_size.get()) != PAGE_SIZE {
        return Err(SnapshotError::corrupt("written with another page size"));
    }
    let name_len = raw.parent_name_len.get() as usize;
    let parent = if raw.parent_id == [0; 16] {
        None
    } else {
        let file_name = std::str::from_utf8(raw.parent_name.get(..name_len).unwrap_or(&[]))
            .ok()
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| SnapshotError::corrupt("the parent's file name is not usable"))?;
        Some(ParentRef {
            id: raw.parent_id,
            file_name: file_name.to_owned(),
        })
    };
    let meta = MetaExtent {
        offset: raw.meta_offset.get(),
        len: raw.meta_len.get(),
        digest: raw.meta_digest.get(),
        file_len: raw.file_len.get(),
    };
    if meta.len > MAX_META || meta.offset.checked_add(meta.len) != Some(meta.file_len) {
        return Err(SnapshotError::corrupt(
            "the meta section's extent is not valid",
        ));
    }
    let header = SnapshotHeader {
        id: raw.id,
        parent,
        sequence: raw.sequence.get(),
    };
    Ok((header, raw.blocks.get(), meta))
}

/// Read the meta at `extent` of `file` and check its digest.
pub(crate) fn read_meta(
    file: &File,
    extent: MetaExtent,
    blocks: u32,
    with_digests: bool,
) -> SnapshotResult<Meta> {
    let mut bytes = vec![0u8; extent.len as usize];
    read_at(file, &mut bytes, extent.offset, "truncated")?;
    if xxh3_64(&bytes) != extent.digest {
        return Err(SnapshotError::corrupt(
            "the meta section's digest does not match",
        ));
    }
    Meta::decode(&bytes, blocks, with_digests)
}

/// Write `meta` at `offset` of `file` (pre-sized: its all-zero pages stay holes); its extent.
pub(crate) fn write_meta(file: &File, offset: u64, meta: &Meta) -> SnapshotResult<MetaExtent> {
    let bytes = meta.encode();
    let mut hasher = Xxh3::new();
    hasher.update(&bytes);
    let file_len = offset + bytes.len() as u64;
    file.set_len(file_len)?;
    for (i, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(page, offset + i as u64 * PAGE_SIZE)?;
        }
    }
    Ok(MetaExtent {
        offset,
        len: bytes.len() as u64,
        digest: hasher.digest(),
        file_len,
    })
}

/// The file name of `path`, for a child's header.
pub(crate) fn file_name_of(path: &Path) -> SnapshotResult<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.len() <= MAX_PARENT_NAME)
        .map(str::to_owned)
        .ok_or_else(|| {
            SnapshotError::Layout(format!(
                "{}: a snapshot's file name must be UTF-8 and at most {MAX_PARENT_NAME} bytes",
                path.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        let (blocks, _) =
            layout(&[("ram".into(), 130 * PAGE_SIZE), ("hi".into(), PAGE_SIZE)]).unwrap();
        let mut present = vec![Bitmap::new(130), Bitmap::new(1)];
        present[0].set(3);
        present[0].set(129);
        let mut digests = vec![vec![zero_page_digest(); 130], vec![7]];
        digests[0][3] = 42;
        Meta {
            blocks,
            state: vec![StateBlob::new("vcpu0", vec![1, 2, 3])],
            present,
            digests,
            compressed: vec![vec![0, 900, 0], vec![0]],
        }
    }

    #[test]
    fn meta_round_trips_and_zero_digests_are_zero_bytes() {
        let m = meta();
        let bytes = m.encode();
        assert_eq!(bytes.len() % PAGE_SIZE as usize, 0);
        let back = Meta::decode(&bytes, 2, true).unwrap();
        assert_eq!(back.blocks, m.blocks);
        assert_eq!(back.state, m.state);
        assert_eq!(back.present, m.present);
        assert_eq!(back.digests, m.digests);
        assert_eq!(back.compressed, m.compressed);
        // Page 0 of the first block's digests: zero page, stored as zero bytes.
        let digests_at = bytes.len() - 4 * PAGE_SIZE as usize;
        assert!(bytes[digests_at..digests_at + 8].iter().all(|&b| b == 0));
        Meta::decode(&bytes[..100], 2, true).unwrap_err();
        Meta::decode(&bytes, 3, true).unwrap_err();
        assert!(Meta::decode(&bytes, 2, false).unwrap().digests[0].is_empty());
    }

    #[test]
    fn a_header_round_trips_and_any_flipped_byte_is_refused() {
        let dir = std::env::temp_dir().join(format!("clsnap-hdr-{}", std::process::id()));
        let h = SnapshotHeader {
            id: [5; 16],
            parent: Some(ParentRef {
                id: [6; 16],
                file_name: "base.clsnap".into(),
            }),
            sequence: 3,
        };
        let extent = MetaExtent {
            offset: 8192,
            len: 4096,
            digest: 9,
            file_len: 12288,
        };
        let bytes = encode_header(&h, 2, extent);
        std::fs::write(&dir, &bytes).unwrap();
        let (back, blocks, e) = read_header(&File::open(&dir).unwrap()).unwrap();
        assert_eq!((back, blocks, e.len), (h, 2, 4096));
        for at in [0, 9, 40, 120, RAW_HEADER_LEN - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            std::fs::write(&dir, &bad).unwrap();
            assert!(
                read_header(&File::open(&dir).unwrap()).is_err(),
                "byte {at}"
            );
        }
        std::fs::write(&dir, &bytes[..50]).unwrap();
        read_header(&File::open(&dir).unwrap()).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
    }
}
