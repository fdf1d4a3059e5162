// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination's decoder on bad input: every failure is a distinct, clean error, and the guest is
//! never restored or resumed.

mod common;

use std::io::Cursor;
use std::sync::atomic::Ordering;

use clearlog_migration::stream::{self, BlockInfo, Header};
use clearlog_migration::*;
use common::*;

const SMALL: &[(&str, u64, u64)] = &[("ram", 0, 16 * 4096)];
/// Header length of the SMALL layout: 24 fixed bytes + 2 + "ram" + 8.
const HDR: usize = 24 + 2 + 3 + 8;

/// A real stream of the SMALL guest (file mode: no acknowledgement).
fn real_stream() -> (Vec<u8>, clearlog_memory::MemorySystem) {
    stream_of(SMALL)
}

fn stream_of(layout: &[(&str, u64, u64)]) -> (Vec<u8>, clearlog_memory::MemorySystem) {
    stream_with(layout, VerifyMode::Strict)
}

fn stream_with(
    layout: &[(&str, u64, u64)],
    verify: VerifyMode,
) -> (Vec<u8>, clearlog_memory::MemorySystem) {
    let src = memory(layout);
    prefill(&src, 7);
    let vm = TestVm {
        state: state_blobs(),
        ..TestVm::default()
    };
    let buf = SharedBuf::default();
    let t = Transport::new(None, Some(Box::new(buf.clone())));
    let config = MigrationConfig::default().with_verify(verify);
    let stats = Source::new(&src, config)
        .unwrap()
        .migrate(t, &vm, None, &CancelToken::new())
        .unwrap();
    assert!(stats.converged);
    let bytes = buf.0.lock().unwrap().clone();
    (bytes, src)
}

/// Receive `bytes` into a fresh SMALL destination; check the VM was neither restored nor resumed on error.
fn receive(bytes: Vec<u8>) -> Result<IncomingStats> {
    receive_into(bytes, SMALL)
}

fn receive_into(bytes: Vec<u8>, layout: &[(&str, u64, u64)]) -> Result<IncomingStats> {
    let dst = memory(layout);
    let vm = TestVm::default();
    let r = Destination::new(&dst).receive(
        Transport::new(Some(Box::new(Cursor::new(bytes))), None),
        &vm,
    );
    if r.is_err() {
        assert_eq!(vm.resumes.load(Ordering::SeqCst), 0, "resumed after {r:?}");
        assert_eq!(
            vm.restores.load(Ordering::SeqCst),
            0,
            "restored after {r:?}"
        );
    }
    r
}

fn header(blocks: &[(&str, u64)]) -> Vec<u8> {
    // Hand-made streams carry a full digest table (strict verification): one verification mode
    // must be announced.
    let h = Header {
        page_size: 4096,
        flags: stream::FLAG_DIGEST_FULL,
        blocks: blocks
            .iter()
            .map(|(n, s)| BlockInfo {
                name: n.to_string(),
                size: *s,
            })
            .collect(),
    };
    let mut v = Vec::new();
    h.write_to(&mut v).unwrap();
    v
}

fn small_header() -> Vec<u8> {
    header(&[("ram", 16 * 4096)])
}

/// Offset of the first data byte of the first data page entry in the first page record (zero
/// ranges, 21 bytes each, may come first).
fn first_data_page(bytes: &[u8]) -> usize {
    let mut rec = HDR;
    while bytes[rec] == stream::TAG_ZERO_RANGE {
        rec += 21;
    }
    assert_eq!(bytes[rec], stream::TAG_PAGES);
    let count = u32::from_le_bytes(bytes[rec + 5..rec + 9].try_into().unwrap());
    let mut at = rec + 9;
    for _ in 0..count {
        let kind = bytes[at + 8];
        if kind == stream::PAGE_DATA {
            return at + 9;
        }
        at += 9;
    }
    panic!("no data page in the first record");
}

#[test]
fn real_stream_loads_and_matches() {
    let (bytes, src) = real_stream();
    let dst = memory(SMALL);
    let vm = TestVm::default();
    let stats = Destination::new(&dst)
        .receive(
            Transport::new(Some(Box::new(Cursor::new(bytes.clone()))), None),
            &vm,
        )
        .unwrap();
    assert!(stats.resumed && !stats.acked);
    assert_eq!(stats.bytes_received, bytes.len() as u64);
    assert_eq!(stats.pages_received + stats.zero_range_pages, 16);
    assert!(stats.verified);
    assert!(diff_ram(&src, &dst).is_empty());
    assert_eq!(*vm.restored.lock().unwrap(), state_blobs());
}

#[test]
fn truncation_at_every_position_is_a_clean_error() {
    for verify in [VerifyMode::Strict, VerifyMode::AfterResume] {
        truncation_at_every_position(verify);
    }
}

fn truncation_at_every_position(verify: VerifyMode) {
    // A 4-page guest with data pages, zero pages, state blobs and a digest table (or the final
    // digests after the end marker): every record type.
    let tiny = &[("ram", 0, 4 * 4096)];
    let (bytes, _) = stream_with(tiny, verify);
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    assert!(bytes.len() > 4096, "at least one data page");
    let dst = memory(tiny);
    let vm = TestVm::default();
    for len in 0..bytes.len() {
        let t = Transport::new(Some(Box::new(&bytes[..len])), None);
        match Destination::new(&dst).receive(t, &vm) {
            Err(Error::Truncated(_)) => {}
            // Cut inside the final digests that follow the end marker: a snapshot is checked
            // before resuming, so nothing resumes either.
            Err(Error::VerificationIncomplete(why)) if why.contains("truncated") => {}
            other => panic!("prefix of {len}/{} bytes: {other:?}", bytes.len()),
        }
    }
    assert_eq!(
        vm.resumes.load(Ordering::SeqCst) + vm.restores.load(Ordering::SeqCst),
        0
    );
    let t = Transport::new(Some(Box::new(bytes)), None);
    assert!(Destination::new(&dst).receive(t, &vm).unwrap().resumed);
}

#[test]
fn bad_magic_version_page_size() {
    let (bytes, _) = real_stream();
    let mut b = bytes.clone();
    b[0] ^= 1;
    assert!(matches!(receive(b), Err(Error::BadMagic(_))));
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    ));
    let mut b = bytes.clone();
    b[12..16].copy_from_slice(&8192u32.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::PageSizeMismatch {
            stream: 8192,
            local: 4096
        })
    ));
    let mut b = bytes;
    b[16..20].copy_from_slice(&0x80u32.to_le_bytes());
    assert!(matches!(receive(b), Err(Error::Malformed("header flags"))));
}

#[test]
fn layout_mismatch() {
    let (bytes, _) = real_stream();
    assert!(matches!(
        receive_into(bytes.clone(), &[("ram", 0, 32 * 4096)]),
        Err(Error::LayoutMismatch(_))
    ));
    assert!(matches!(
        receive_into(bytes.clone(), &[("rom", 0, 16 * 4096)]),
        Err(Error::LayoutMismatch(_))
    ));
    let two = &[("ram", 0, 16 * 4096), ("ram2", 1 << 20, 4096)];
    assert!(matches!(
        receive_into(bytes, two),
        Err(Error::LayoutMismatch(_))
    ));
}

#[test]
fn page_outside_ram_and_bad_block() {
    let mut b = small_header();
    b.push(stream::TAG_PAGES);
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&16u64.to_le_bytes()); // the block has pages 0..16
    b.push(stream::PAGE_ZERO);
    match receive(b) {
        Err(Error::PageOutOfRange {
            block,
            page: 16,
            pages: 16,
        }) => assert_eq!(block, "ram"),
        other => panic!("{other:?}"),
    }
    let mut b = small_header();
    b.push(stream::TAG_PAGES);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::BlockOutOfRange { index: 1, count: 1 })
    ));
    let mut b = small_header();
    b.push(stream::TAG_PAGES);
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.push(7);
    assert!(matches!(receive(b), Err(Error::Malformed("page kind"))));
}

#[test]
fn absurd_sizes_are_bounded() {
    // Block count over 1024.
    let mut b = small_header();
    b[20..24].copy_from_slice(&1_000_000u32.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::TooLarge {
            what: "header block count",
            value: 1_000_000,
            limit: 1024
        })
    ));
    // Name over 256 bytes.
    let mut b = small_header();
    b[24..26].copy_from_slice(&300u16.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::TooLarge {
            value: 300,
            limit: 256,
            ..
        })
    ));
    // Block size not a page multiple.
    let mut b = small_header();
    b[29..37].copy_from_slice(&4097u64.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::Malformed("RAM block size"))
    ));
    // A 4 GiB state blob announced on a short stream: refused before allocating.
    let mut b = small_header();
    b.push(stream::TAG_STATE);
    b.extend_from_slice(&3u16.to_le_bytes());
    b.extend_from_slice(b"cpu");
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::TooLarge {
            what: "state blob size",
            ..
        })
    ));
    // A page batch of 100000 pages.
    let mut b = small_header();
    b.push(stream::TAG_PAGES);
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&100_000u32.to_le_bytes());
    assert!(matches!(
        receive(b),
        Err(Error::TooLarge {
            what: "page record count",
            ..
        })
    ));
    // A digest table longer than the block.
    let mut b = small_header();
    b.push(stream::TAG_DIGESTS);
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(receive(b), Err(Error::Malformed(_))));
}

#[test]
fn unknown_record_missing_digests_and_order() {
    let (bytes, _) = real_stream();
    let end = bytes.len() - 17;
    assert_eq!(bytes[end], stream::TAG_END);
    let mut b = bytes.clone();
    b[end] = 0x7f;
    assert!(matches!(receive(b), Err(Error::UnknownRecord(0x7f))));
    // Drop the digest table (13 + 16 * 8 bytes just before the end record).
    let table = end - (13 + 16 * 8);
    assert_eq!(bytes[table], stream::TAG_DIGESTS);
    let mut b = bytes[..table].to_vec();
    b.extend_from_slice(&bytes[end..]);
    assert!(matches!(receive(b), Err(Error::MissingDigests(name)) if name == "ram"));
    // The digest table twice.
    let mut b = bytes[..end].to_vec();
    b.extend_from_slice(&bytes[table..]);
    assert!(matches!(receive(b), Err(Error::UnexpectedRecord(_))));
    // A page after the digest table.
    let mut b = bytes[..end].to_vec();
    b.push(stream::TAG_PAGES);
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.push(stream::PAGE_ZERO);
    b.extend_from_slice(&bytes[end..]);
    assert!(matches!(receive(b), Err(Error::UnexpectedRecord(_))));
    // The end marker's page count disagrees (a page record was lost).
    let mut b = bytes;
    let n = b.len();
    b[n - 8..].copy_from_slice(&99u64.to_le_bytes());
    assert!(matches!(receive(b), Err(Error::Malformed(_))));
}

#[test]
fn digest_mismatch_refuses_to_resume() {
    // Strict: a digest table before the end marker, checked before anything resumes.
    let (bytes, _) = stream_with(SMALL, VerifyMode::Strict);
    assert!(bytes[16] & stream::FLAG_DIGEST_FULL as u8 != 0);
    // Corrupt one byte of page data: the stream is well-formed but the RAM is wrong.
    let mut b = bytes.clone();
    let at = first_data_page(&b);
    b[at + 100] ^= 0xff;
    match receive(b) {
        Err(Error::DigestMismatch {
            block,
            mismatched: 1,
            ..
        }) => assert_eq!(block, "ram"),
        other => panic!("{other:?}"),
    }
    // Corrupt the table itself (last page's digest).
    let mut b = bytes.clone();
    let last_digest = b.len() - 17 - 1;
    b[last_digest] ^= 1;
    assert!(matches!(
        receive(b),
        Err(Error::DigestMismatch {
            page: 15,
            mismatched: 1,
            ..
        })
    ));
    // Announcing both verifications, or none, is malformed.
    for flags in [
        0u8,
        (stream::FLAG_DIGEST_FULL | stream::FLAG_VERIFY_AFTER) as u8,
    ] {
        let mut b = bytes.clone();
        b[16] = flags;
        assert!(matches!(receive(b), Err(Error::Malformed(_))), "{flags}");
    }
}

#[test]
fn verification_after_resume_of_a_snapshot_refuses_to_resume() {
    // After-resume verification on a file: the final digests follow the end marker and a
    // snapshot (no source waiting) is checked before it resumes.
    let (bytes, _) = stream_with(SMALL, VerifyMode::AfterResume);
    assert!(bytes[16] & stream::FLAG_VERIFY_AFTER as u8 != 0);
    assert!(receive(bytes.clone()).unwrap().verified);
    // Corrupt one byte of page data: the verification names the page.
    let mut b = bytes.clone();
    let at = first_data_page(&b);
    b[at + 100] ^= 0xff;
    match receive(b) {
        Err(Error::VerificationFailed {
            mismatched_pages: 1,
            first,
            ..
        }) => assert!(first.starts_with("ram page "), "{first}"),
        other => panic!("{other:?}"),
    }
    // Corrupt the last final digest (the last 16 bytes of the last verify record come just
    // before the 17-byte verify end).
    let mut b = bytes.clone();
    let n = b.len();
    b[n - 17 - 1] ^= 1;
    assert!(matches!(
        receive(b),
        Err(Error::VerificationFailed {
            mismatched_pages: 1,
            ..
        })
    ));
    // The verify end's count disagrees (an entry was lost): incomplete, not resumed.
    let mut b = bytes;
    let n = b.len();
    b[n - 8..].copy_from_slice(&999u64.to_le_bytes());
    assert!(matches!(receive(b), Err(Error::VerificationIncomplete(_))));
}

#[test]
fn stream_reader_digest_table_of_a_huge_header_block_is_not_preallocated() {
    // Found by the `stream_reader` fuzz target (migration/fuzz). `StreamReader` alone does not know the
    // destination's RAM: a header may announce a 4 EiB block, and a digest record whose count matches
    // it used to reserve 8 bytes per announced page (2^53 bytes here) before reading a single entry,
    // aborting the process. Now the table grows with the bytes that actually arrive.
    let mut b = header(&[("ram", 1 << 62)]);
    b.push(stream::TAG_DIGESTS);
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&((1u64 << 62) / 4096).to_le_bytes());
    b.extend_from_slice(&[0xab; 8 * 3 + 5]); // three whole digests and part of a fourth
    let mut r = stream::StreamReader::new(&b[..]);
    r.read_header(4096).unwrap();
    assert!(matches!(
        r.next_record(),
        Err(Error::Truncated("digest table"))
    ));
    // The destination itself refuses such a header before any record (its RAM is 16 pages).
    assert!(matches!(receive(b), Err(Error::LayoutMismatch(_))));
}
