// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The default verification cannot share the transfer's blind spots: a populated-pages answer
//! that lies (leaves out pages that hold data, or returns ranges in any order, overlapping or
//! outside the block) must never give a destination that differs from the source while both sides
//! say `verified`.

mod common;

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use clearlog_bitmap::Bitmap;
use clearlog_memory::{ClearBitmap, MemorySystem, RamBlock, PAGE_SIZE};
use clearlog_migration::*;
use common::*;

const SIZE: u64 = 16 << 20;

/// A block whose populated-pages answer is wrong in a chosen way.
#[derive(Clone)]
struct LyingBlock {
    inner: Arc<RamBlock>,
    lie: Lie,
}

#[derive(Clone)]
enum Lie {
    /// Leave these pages out of every answer (a misclassified mapping).
    Hide(Arc<BTreeSet<u64>>),
    /// Answer with the right pages, but in reverse order, each range twice, plus a range before
    /// the asked window and one past the block's end.
    Scramble,
}

impl MigrationBlock for LyingBlock {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> MemoryResult<()> {
        MigrationBlock::read(&self.inner, offset, buf)
    }
    fn write_untracked(&self, offset: u64, data: &[u8]) -> MemoryResult<()> {
        MigrationBlock::write_untracked(&self.inner, offset, data)
    }
    fn populated(
        &self,
        first_page: u64,
        npages: u64,
        out: &mut Vec<Range<u64>>,
    ) -> MemoryResult<()> {
        let mut truth = Vec::new();
        MigrationBlock::populated(&self.inner, first_page, npages, &mut truth)?;
        match &self.lie {
            Lie::Hide(hidden) => {
                for r in truth {
                    let mut start = r.start;
                    for &h in hidden.range(r.clone()) {
                        if start < h {
                            out.push(start..h);
                        }
                        start = h + 1;
                    }
                    if start < r.end {
                        out.push(start..r.end);
                    }
                }
            }
            Lie::Scramble => {
                for r in truth.iter().rev() {
                    out.push(r.clone());
                    out.push(r.start..r.end.min(r.start + 3));
                }
                out.push(first_page.saturating_sub(100)..first_page);
                out.push(self.inner.pages()..self.inner.pages() + 50);
            }
        }
        Ok(())
    }
}

/// Memory whose blocks lie about what is populated.
struct Lying<'a> {
    mem: &'a MemorySystem,
    lie: Lie,
}

impl MigrationMemory for Lying<'_> {
    type Block = LyingBlock;
    fn blocks(&self) -> Vec<LyingBlock> {
        self.mem
            .ram_blocks()
            .into_iter()
            .map(|inner| LyingBlock {
                inner,
                lie: self.lie.clone(),
            })
            .collect()
    }
}

impl DirtyTracking for Lying<'_> {
    fn start_logging(&self) -> MemoryResult<()> {
        self.mem.start_logging()
    }
    fn stop_logging(&self) -> MemoryResult<()> {
        self.mem.stop_logging()
    }
    fn sync_dirty(&self) -> MemoryResult<()> {
        self.mem.sync_dirty()
    }
    fn take_dirty(
        &self,
        block: &LyingBlock,
        dest: &mut Bitmap,
        clear: Option<&mut ClearBitmap>,
    ) -> MemoryResult<u64> {
        self.mem.take_dirty(&block.inner, dest, clear)
    }
    fn clear_dirty(&self, block: &LyingBlock, offset: u64, len: u64) -> MemoryResult<()> {
        self.mem.clear_dirty(&block.inner, offset, len)
    }
}

fn config(mode: MigrationDirtyLogMode) -> MigrationConfig {
    MigrationConfig::default()
        .with_mode(mode)
        .with_downtime_limit(Duration::from_millis(50))
        .with_max_time(Some(Duration::from_secs(30)))
}

fn run<S: DirtyTracking + ?Sized, D: MigrationMemory + Sync + ?Sized>(
    src: &S,
    dst: &D,
    mode: MigrationDirtyLogMode,
) -> (Result<MigrationStats>, Result<IncomingStats>) {
    let (src_t, dst_t) = mem_channel();
    let vm_src = TestVm::default();
    let vm_dst = TestVm::default();
    std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(dst).receive(dst_t, &vm_dst));
        let s = Source::new(src, config(mode)).unwrap().migrate(
            src_t,
            &vm_src,
            None,
            &CancelToken::new(),
        );
        (s, d.join().unwrap())
    })
}

/// Pages with data in a fresh 16 MiB memory: scattered, some whole runs.
fn written_source() -> MemorySystem {
    let src = memory(&[("ram", 0, SIZE)]);
    let block = src.ram_blocks()[0].clone();
    for p in (0..SIZE / PAGE_SIZE).step_by(37) {
        block.write(p * PAGE_SIZE + 8, &p.to_le_bytes()).unwrap();
    }
    for p in 2000..2100u64 {
        block.write(p * PAGE_SIZE, &[0xee; 64]).unwrap();
    }
    src
}

/// Finding (3): the default verification asked the same populated-pages answer that chose what
/// to send. A source whose answer hides pages that hold data sent them as zero, listed no digest
/// for them, and both sides said `verified`. Now the source reads what its answer calls never
/// populated, and the verification fails on both sides, naming the pages.
#[test]
fn hidden_populated_pages_fail_the_default_verification_on_both_sides() {
    for mode in [
        MigrationDirtyLogMode::default(),
        MigrationDirtyLogMode::Legacy,
    ] {
        let src = written_source();
        let hidden: BTreeSet<u64> = [37u64 * 3, 2050, 2099].into();
        let lying = Lying {
            mem: &src,
            lie: Lie::Hide(Arc::new(hidden.clone())),
        };
        let dst = memory(&[("ram", 0, SIZE)]);
        let (s, d) = run(&lying, &dst, mode);
        let differ = diff_ram(&src, &dst);
        assert_eq!(
            differ.iter().map(|(_, p)| *p).collect::<BTreeSet<_>>(),
            hidden,
            "{mode:?}: the hidden pages are what differs"
        );
        match (&s, &d) {
            (
                Err(Error::VerificationFailed {
                    mismatched_pages: a,
                    ..
                }),
                Err(Error::VerificationFailed {
                    mismatched_pages: b,
                    first,
                    ..
                }),
            ) => {
                assert_eq!((*a, *b), (3, 3), "{mode:?}");
                assert!(first.contains("ram page 111"), "{mode:?}: {first}");
            }
            _ => panic!(
                "{mode:?}: the destination differs in {} pages but the verification said: source {s:?}, destination {d:?}",
                differ.len()
            ),
        }
    }
}

/// Finding (3), the destination side: a destination whose RAM held data before the stream, in
/// pages the source sends as zero, and whose own populated-pages answer hides them, kept the stale
/// data (its zero ranges followed its answer) and said `verified`. Now it reads what it did not
/// receive as data, so the answer does not matter: the memory ends equal.
#[test]
fn a_destination_hiding_its_stale_pages_still_ends_equal_to_the_source() {
    // Data in the first 2 MiB only: the rest goes as zero ranges (with transparent huge pages a
    // touched 2 MiB counts as populated whole).
    let src = memory(&[("ram", 0, SIZE)]);
    for p in 0..100u64 {
        src.ram_blocks()[0]
            .write(p * PAGE_SIZE, &p.to_le_bytes())
            .unwrap();
    }
    let dst_mem = memory(&[("ram", 0, SIZE)]);
    let stale: BTreeSet<u64> = [1000u64, 3000, 4095].into();
    for &p in &stale {
        dst_mem.ram_blocks()[0]
            .write_untracked(p * PAGE_SIZE + 100, &[0x77; 8])
            .unwrap();
    }
    let dst = Lying {
        mem: &dst_mem,
        lie: Lie::Hide(Arc::new(stale)),
    };
    let (s, d) = run(&src, &dst, MigrationDirtyLogMode::default());
    let differ = diff_ram(&src, &dst_mem);
    assert!(
        differ.is_empty(),
        "stale destination pages kept: {differ:?} (source {:?}, destination {:?})",
        s.as_ref().map(|s| s.verified),
        d.as_ref().map(|d| d.verified)
    );
    let s = s.unwrap();
    assert!(s.verified);
    assert!(s.zero_range_pages > 3000, "{s:?}");
    let d = d.unwrap();
    assert!(d.verified);
    assert_eq!(d.stale_pages_zeroed, 3, "{d:?}");
    assert!(d.zero_checked_pages >= s.zero_range_pages, "{d:?}");
}

/// Finding (8): the engine trusted a third party's `populated` output. Ranges out of order or
/// overlapping zeroed populated pages, and a range past the block's end panicked. The engine now
/// clips, sorts and merges what it gets.
#[test]
fn a_populated_answer_out_of_order_overlapping_or_past_the_end_loses_nothing() {
    for mode in [
        MigrationDirtyLogMode::default(),
        MigrationDirtyLogMode::Legacy,
    ] {
        let src = written_source();
        let lying = Lying {
            mem: &src,
            lie: Lie::Scramble,
        };
        let dst = memory(&[("ram", 0, SIZE)]);
        let (s, d) = run(&lying, &dst, mode);
        assert!(
            diff_ram(&src, &dst).is_empty(),
            "{mode:?}: pages lost: source {s:?}, destination {d:?}"
        );
        assert!(s.unwrap().verified && d.unwrap().verified, "{mode:?}");
    }
}

/// A VMM whose `save_state` writes guest RAM (a device flushing a queue into guest memory while
/// it saves), through the memory system, so the write is tracked.
struct FlushingVm<'a> {
    ram: &'a MemorySystem,
    page: u64,
}

impl VmControl for FlushingVm<'_> {
    fn pause(&self) -> std::result::Result<(), BoxError> {
        Ok(())
    }
    fn resume(&self) -> std::result::Result<(), BoxError> {
        Ok(())
    }
    fn save_state(&self) -> std::result::Result<Vec<StateBlob>, BoxError> {
        self.ram.ram_blocks()[0].write(self.page * PAGE_SIZE, b"flushed by save_state")?;
        Ok(vec![StateBlob::new("dev", vec![1])])
    }
}

/// Finding (review, smaller): `save_state` ran after the final pass, so guest RAM it wrote was
/// never sent (the verification then failed: the data was lost, at least not silently).
#[test]
fn guest_ram_written_while_saving_the_state_is_sent() {
    let src = written_source();
    let dst = memory(&[("ram", 0, SIZE)]);
    let (src_t, dst_t) = mem_channel();
    let vm_src = FlushingVm {
        ram: &src,
        page: 3333,
    };
    let vm_dst = TestVm::default();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(&dst).receive(dst_t, &vm_dst));
        let s = Source::new(&src, config(MigrationDirtyLogMode::default()))
            .unwrap()
            .migrate(src_t, &vm_src, None, &CancelToken::new());
        (s, d.join().unwrap())
    });
    assert!(
        diff_ram(&src, &dst).is_empty(),
        "the page written by save_state is missing: source {s:?}, destination {d:?}"
    );
    assert!(s.unwrap().verified && d.unwrap().verified);
}
