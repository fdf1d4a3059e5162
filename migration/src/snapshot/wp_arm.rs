// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Write-protection armed while the guest runs, so that the pause re-protects only what changed.
//!
//! [`ArmedWp::arm`] (guest running, before the snapshot's last live pass) registers the guest's
//! mappings on a userfaultfd in write-protect mode and write-protects every populated range: the
//! expensive part (the kernel rewrites every page table entry, KVM drops its mappings of them),
//! now outside the pause. A thread then serves the write faults by un-protecting the written
//! page's group (2 MiB, `wp_digests::GROUP_PAGES`) and recording it as written since arm, without
//! hashing anything. That record is a second dirty tracker, independent of KVM's dirty log and
//! of the engine's bitmaps: the digests still catch a page the dirty log missed.
//!
//! In the pause, [`ArmedWp::capture`] stops the thread once it has served and recorded every
//! fault received so far, re-protects the pages written since arm and those populated since arm
//! outside the protected ranges (the caller finds them), in runs, and hands the userfaultfd to a
//! [`PauseDigests`] that hashes after the guest resumes, as if it had protected everything itself.
//!
//! # Why every digest is the page's content at the pause
//!
//! The pages hashed are those of the ranges populated at arm and those populated since; every
//! page stays write-protected from the pause until it is hashed:
//!
//! - A page of the arm ranges that the thread did not record was protected by `arm` and never
//!   un-protected since: only the thread un-protects (a fault's group), and it records every
//!   page of the group before; `capture` reads the record only after the thread served the last
//!   fault queued. So it could not change before its hash. (Pages of those ranges that were not
//!   there yet carry the kernel's marker, `UFFD_FEATURE_WP_UNPOPULATED`, so their first write
//!   faults like any other.)
//! - A page the thread recorded (written since arm, or in the group of one that was) was
//!   re-protected in the pause, every writer paused.
//! - A page populated since arm outside the arm ranges was never protected and its writes never
//!   faulted: the caller's populated scan of the pages outside those ranges finds it in the
//!   pause, and it is protected then.
//! - Any other page was not populated at the pause (outside the arm ranges and not found by the
//!   scan): a zero page, by the populated-pages contract, neither read nor protected.

use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;

use super::wp_digests::{
    check, group_of, ranges_in, register, set_protection, wp_userfaultfd, PauseDigests, Room,
    Tuning,
};
use crate::postcopy::uffd::{wp, Fault, Userfaultfd};
use crate::{HostMapping, PAGE_SIZE};

/// The longest the thread waits for a writer without looking at the stop flag (the stop also
/// wakes it at once).
const STOP_POLL: Duration = Duration::from_millis(100);

/// Write-protection armed over some memory while its writers run ([`Self::arm`]), waiting for
/// the pause ([`Self::capture`]). Dropped instead, it un-protects everything and releases any
/// waiting writer.
#[derive(Debug)]
pub(crate) struct ArmedWp {
    /// `None` once handed to the hashing.
    uffd: Option<Arc<Userfaultfd>>,
    /// Per region, its mapping and the ranges protected: populated at arm, and from `capture`
    /// on also those populated since. What `Drop` un-protects.
    regions: Vec<(HostMapping, Vec<Range<u64>>)>,
    /// Regions registered (the first ones).
    registered: usize,
    /// The thread serving the faults, and the socket that wakes it.
    tracker: Option<(JoinHandle<io::Result<Vec<Bitmap>>>, UnixStream)>,
    /// Where the digests go, made while the writers run.
    rooms: Vec<Room>,
    ctl: Arc<Ctl>,
    tuning: Tuning,
}

/// What the caller and the thread share.
#[derive(Debug, Default)]
struct Ctl {
    /// Serve what is queued, then end.
    stop: AtomicBool,
    faults: AtomicU64,
}

/// What the write-protection armed before the pause did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ArmStats {
    /// Write faults served between arm and the pause (each un-protected one group).
    pub(crate) faults: u64,
    /// Pages re-protected in the pause: written since arm, or populated since.
    pub(crate) reprotected_pages: u64,
    /// Of those, pages populated since arm outside the ranges protected then.
    pub(crate) new_pages: u64,
    /// The runs they were re-protected in (one ioctl each).
    pub(crate) runs: u64,
}

impl ArmedWp {
    /// Call with the writers running. `regions`: per region, its host mapping and the sorted,
    /// disjoint page ranges that may hold data. Registers the mappings, starts the thread that
    /// serves the writers, and write-protects the ranges. `ErrorKind::Unsupported` if the kernel
    /// or a mapping does not allow it; `InvalidInput` for ranges out of order or bounds.
    ///
    /// # Safety
    ///
    /// That of [`PauseDigests::start`], for as long as the value, or the [`PauseDigests`] its
    /// [`Self::capture`] returns, lives: each mapping stays mapped, and its memory changes only
    /// by writes through these mappings of this process.
    pub(crate) unsafe fn arm(regions: Vec<(HostMapping, Vec<Range<u64>>)>) -> io::Result<Self> {
        // SAFETY: the caller's promise is the one `arm_tuned` asks for.
        unsafe { Self::arm_tuned(regions, Tuning::DEFAULT) }
    }

    /// [`Self::arm`] with the groups (and the hashing after `capture`) tuned.
    ///
    /// # Safety
    ///
    /// As for [`Self::arm`].
    unsafe fn arm_tuned(
        regions: Vec<(HostMapping, Vec<Range<u64>>)>,
        tuning: Tuning,
    ) -> io::Result<Self> {
        check(&regions)?;
        let uffd = Arc::new(wp_userfaultfd(&regions)?);
        // From here on, dropping `armed` un-protects what it registered.
        let mut armed = ArmedWp {
            uffd: Some(Arc::clone(&uffd)),
            regions,
            registered: 0,
            tracker: None,
            rooms: Vec::new(),
            ctl: Arc::default(),
            tuning,
        };
        armed.rooms = armed.regions.iter().map(|(m, _)| Room::new(m)).collect();
        for (m, _) in &armed.regions {
            register(&uffd, m)?;
            armed.registered += 1;
        }
        // Before protecting: the writers that fault on the first ranges protected are served
        // while the others are protected.
        armed.start_tracker(uffd.clone())?;
        for (m, ranges) in &armed.regions {
            for r in ranges {
                set_protection(&uffd, m, r.clone(), true)?;
            }
        }
        if armed.tracker.as_ref().is_some_and(|(t, _)| t.is_finished()) {
            // It failed, possibly while ranges were still being protected after its last
            // un-protect: the drop releases them.
            return Err(armed
                .stop_tracker()
                .err()
                .unwrap_or_else(|| io::Error::other("the write-tracking thread ended")));
        }
        Ok(armed)
    }

    fn start_tracker(&mut self, uffd: Arc<Userfaultfd>) -> io::Result<()> {
        let (wake, wakes) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let tracker = Tracker {
            uffd,
            regions: (self.regions.iter())
                .map(|(map, ranges)| Tracked {
                    map: *map,
                    ranges: ranges.clone(),
                    written: Bitmap::new((map.len() / PAGE_SIZE) as usize),
                })
                .collect(),
            ctl: Arc::clone(&self.ctl),
            wake: wakes,
            tuning: self.tuning,
            complete: false,
        };
        let thread = std::thread::Builder::new()
            .name("wp-arm".into())
            .spawn(move || tracker.run())?;
        self.tracker = Some((thread, wake));
        Ok(())
    }

    /// Stop the thread; per region, the pages written since arm.
    fn stop_tracker(&mut self) -> io::Result<Vec<Bitmap>> {
        let Some((thread, mut wake)) = self.tracker.take() else {
            return Err(io::Error::other(
                "the write-tracking thread was stopped before",
            ));
        };
        self.ctl.stop.store(true, Ordering::Release);
        // Cuts the thread's wait short. Should the byte not go (it always fits: the socket is
        // new), the thread sees the flag within STOP_POLL.
        let _ = wake.write(&[1]);
        thread
            .join()
            .map_err(|_| io::Error::other("the write-tracking thread panicked"))?
    }

    /// Per region, the ranges protected at arm: the pages outside them that hold data now were
    /// populated since, unseen ([`Self::capture`] needs them).
    pub(crate) fn protected(&self) -> impl Iterator<Item = &[Range<u64>]> {
        self.regions.iter().map(|(_, r)| r.as_slice())
    }

    /// Faults served so far.
    #[cfg(test)]
    pub(super) fn faults(&self) -> u64 {
        self.ctl.faults.load(Ordering::Relaxed)
    }

    /// Call with every writer paused. `new`: per region, the sorted, disjoint ranges populated
    /// now outside those of [`Self::protected`]. Stops the thread once every fault received so
    /// far is served and recorded, re-protects the pages written since arm and those of `new`,
    /// and starts hashing, after which this is [`PauseDigests::start`]'s value. On an error
    /// everything is un-protected (no writer waits) and the caller hashes otherwise.
    pub(crate) fn capture(
        mut self,
        new: Vec<Vec<Range<u64>>>,
    ) -> io::Result<(PauseDigests, ArmStats)> {
        let t = Instant::now();
        let written = self.stop_tracker()?;
        let stopped = t.elapsed();
        if new.len() != self.regions.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "new ranges for another number of regions",
            ));
        }
        let new_regions: Vec<_> = (self.regions.iter().zip(new))
            .map(|((m, _), new)| (*m, new))
            .collect();
        check(&new_regions)?;
        let mut stats = ArmStats {
            faults: self.ctl.faults.load(Ordering::Relaxed),
            ..ArmStats::default()
        };
        let mut again = Vec::with_capacity(written.len());
        for ((_, ranges), (mut w, (_, new))) in
            (self.regions.iter_mut()).zip(written.into_iter().zip(new_regions))
        {
            new.iter()
                .for_each(|r| w.set_range(r.start as usize, (r.end - r.start) as usize));
            stats.new_pages += new.iter().map(|r| r.end - r.start).sum::<u64>();
            // The pages hashed, and from now on what `Drop` un-protects.
            *ranges = union(ranges, &new);
            again.push(w);
        }
        check(&self.regions)?;
        let uffd = self.uffd.clone().expect("handed over only below");
        let t = Instant::now();
        for ((m, _), w) in self.regions.iter().zip(&again) {
            for run in runs(w) {
                stats.reprotected_pages += run.end - run.start;
                stats.runs += 1;
                set_protection(&uffd, m, run, true)?;
            }
        }
        tracing::debug!(?stopped, reprotected = ?t.elapsed(), ?stats, "snapshot: re-protected");
        drop(uffd);
        let uffd = Arc::try_unwrap(self.uffd.take().expect("handed over once"))
            .map_err(|_| io::Error::other("the userfaultfd is still shared"))?;
        let regions = std::mem::take(&mut self.regions);
        let rooms = std::mem::take(&mut self.rooms);
        // SAFETY: `arm`'s caller promised `start`'s contract for the `PauseDigests` too. Every
        // page of `regions` is protected, and no other: the ranges protected at arm were never
        // un-protected but by the thread, which recorded each page it un-protected in `written`,
        // re-protected above with the pages `new` adds; nothing outside them was protected (the
        // thread's groups only un-protect). The thread served every fault queued before it
        // stopped, after the writers paused, so no writer waits on a fault nobody read.
        let digests = unsafe { PauseDigests::adopt(uffd, regions, rooms, self.tuning) }?;
        Ok((digests, stats))
    }
}

impl Drop for ArmedWp {
    /// Not captured (or its capture failed): stop the thread, un-protect everything; closing the
    /// fd then unregisters the mappings and wakes anyone left.
    fn drop(&mut self) {
        if self.tracker.is_some() {
            if let Err(e) = self.stop_tracker() {
                tracing::warn!("the write-tracking thread: {e}");
            }
        }
        let Some(uffd) = &self.uffd else {
            return;
        };
        for (m, ranges) in &self.regions[..self.registered] {
            for r in ranges {
                if let Err(e) = set_protection(uffd, m, r.clone(), false) {
                    tracing::warn!("un-protecting pages {r:?} of {:#x}: {e}", m.addr());
                }
            }
        }
    }
}

/// The runs of set bits of `b`.
fn runs(b: &Bitmap) -> impl Iterator<Item = Range<u64>> + '_ {
    let mut next = b.find_next_set(0);
    std::iter::from_fn(move || {
        let start = next?;
        let end = b.find_next_zero(start).unwrap_or(b.len());
        next = b.find_next_set(end);
        Some(start as u64..end as u64)
    })
}

/// The union of two sets of sorted, disjoint ranges, sorted, disjoint, and merged where they
/// touch.
fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.iter().chain(b).cloned().collect();
    all.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// One region as the thread sees it.
struct Tracked {
    map: HostMapping,
    /// Protected at arm.
    ranges: Vec<Range<u64>>,
    /// Pages of `ranges` un-protected since.
    written: Bitmap,
}

/// The thread's state. Dropped unfinished (error, panic), it un-protects every range, so that
/// no writer waits for a thread that is gone.
struct Tracker {
    uffd: Arc<Userfaultfd>,
    regions: Vec<Tracked>,
    ctl: Arc<Ctl>,
    /// Readable once `ArmedWp` wants the thread to stop.
    wake: UnixStream,
    tuning: Tuning,
    complete: bool,
}

impl Tracker {
    fn run(mut self) -> io::Result<Vec<Bitmap>> {
        loop {
            let stop = self.ctl.stop.load(Ordering::Acquire);
            // After the stop, the last time: the writers paused before it, so every fault they
            // made is queued by now, and served here.
            while let Some(fault) = self.uffd.read_fault()? {
                self.serve(fault)?;
            }
            if stop {
                break;
            }
            self.uffd
                .wait_readable_or(Some(self.wake.as_fd()), STOP_POLL)?;
        }
        self.complete = true;
        Ok(self
            .regions
            .iter_mut()
            .map(|r| std::mem::replace(&mut r.written, Bitmap::new(0)))
            .collect())
    }

    /// A writer waits on the page at `fault.addr`: record its group's protected pages as
    /// written, then un-protect the group, which wakes the writer.
    fn serve(&mut self, fault: Fault) -> io::Result<()> {
        if self.tuning.fail_on_fault {
            return Err(io::Error::other("injected failure on a write fault"));
        }
        let until = Instant::now() + self.tuning.serve_delay;
        while Instant::now() < until && !self.ctl.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if fault.flags & wp::PAGEFAULT_FLAG_WP == 0 {
            return Err(io::Error::other(format!(
                "a fault at {:#x} that is not a write-protect fault",
                fault.addr
            )));
        }
        let found = self.regions.iter_mut().find_map(|r| {
            let off = fault.addr.checked_sub(r.map.addr())?;
            (off < r.map.len()).then_some((r, off / PAGE_SIZE))
        });
        let Some((r, page)) = found else {
            return Err(io::Error::other(format!(
                "a write fault at {:#x}, outside every region",
                fault.addr
            )));
        };
        let group = group_of(&r.map, page, self.tuning.group_pages);
        for part in ranges_in(&r.ranges, group.clone()) {
            r.written
                .set_range(part.start as usize, (part.end - part.start) as usize);
        }
        set_protection(&self.uffd, &r.map, group, false)?;
        self.ctl.faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.complete {
            return;
        }
        for r in &self.regions {
            for p in &r.ranges {
                if let Err(e) = set_protection(&self.uffd, &r.map, p.clone(), false) {
                    // Its writers then wait until the fd is closed, which releases them.
                    tracing::warn!("un-protecting pages {p:?} of {:#x}: {e}", r.map.addr());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::mpsc;

    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    use xxhash_rust::xxh3::xxh3_64;

    use super::*;
    use crate::snapshot::wp_digests::tests::{pattern, supported, writes_waited, Mem, PAGES, SLOW};
    use crate::snapshot::wp_digests::WaitStats;

    /// Populated at arm.
    fn at_arm() -> Vec<Range<u64>> {
        vec![0..1024, 1536..3000, 3500..PAGES]
    }

    /// Inside those ranges but never written before arm (not there yet): their first write must
    /// fault all the same.
    const UNTOUCHED: Range<u64> = 2000..2050;

    /// Outside them: written between arm and the pause, populated unseen by the thread.
    const POPULATED_SINCE: [Range<u64>; 2] = [1100..1200, 3000..3100];

    fn inside(ranges: &[Range<u64>], p: u64) -> bool {
        ranges.iter().any(|r| r.contains(&p))
    }

    /// What one run did.
    struct Run {
        /// Faults served before the pause.
        faults: u64,
        stats: ArmStats,
        waits: WaitStats,
    }

    /// Arm over `mem`, have a writer change pages before the pause (among them pages never
    /// populated, inside and outside the armed ranges), pause it and record the contents,
    /// capture, have it overwrite every page: the digests are the contents at the capture, and
    /// every write landed.
    fn digests_are_as_at_capture(mem: &Mem, tuning: Tuning) -> Run {
        let armed_ranges = at_arm();
        for p in (0..PAGES).filter(|&p| inside(&armed_ranges, p) && !UNTOUCHED.contains(&p)) {
            mem.write(p, 1);
        }
        // Outside the armed ranges only POPULATED_SINCE: the capture is told of them only.
        let mut before: Vec<u64> = (0..PAGES)
            .filter(|&p| p % 3 == 0 && inside(&armed_ranges, p))
            .chain(UNTOUCHED)
            .chain(POPULATED_SINCE.iter().flat_map(Clone::clone))
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        before.shuffle(&mut StdRng::seed_from_u64(5));
        let mut after: Vec<u64> = (0..PAGES).collect();
        after.shuffle(&mut StdRng::seed_from_u64(6));
        let expected_faults = faults_for(mem, &before, &armed_ranges, tuning.group_pages);
        let expected_reprotected = reprotected_for(mem, &before, &armed_ranges, tuning.group_pages);
        // SAFETY: `mem` outlives `armed` and the digests (both end inside the scope below), and
        // only the writer writes it, through the mapping.
        let armed =
            unsafe { ArmedWp::arm_tuned(vec![(mem.mapping(), armed_ranges.clone())], tuning) }
                .expect("arm");
        let run = std::thread::scope(|s| {
            let (paused, writer_paused) = mpsc::channel();
            let (go, wait) = mpsc::channel::<()>();
            let (done, writer_done) = mpsc::channel();
            s.spawn(move || {
                before.iter().for_each(|&p| mem.write(p, 2));
                let _ = paused.send(());
                if wait.recv().is_ok() {
                    after.iter().for_each(|&p| mem.write(p, 3));
                }
                let _ = done.send(());
            });
            writer_paused
                .recv_timeout(Duration::from_secs(60))
                .expect("the writer got through the writes before the pause");
            let faults = armed.faults();
            let expected: Vec<u64> = (0..PAGES).map(|p| mem.digest(p)).collect();
            let (d, stats) = armed
                .capture(vec![POPULATED_SINCE.to_vec()])
                .expect("capture");
            go.send(()).expect("the writer waits");
            writer_done
                .recv_timeout(Duration::from_secs(60))
                .expect("the writer finished: no write waits for ever");
            let waits = d.wait_stats();
            let digests = d.finish().expect("finish");
            let wrong: Vec<u64> = (0..PAGES)
                .filter(|&p| digests[0][p as usize] != expected[p as usize])
                .collect();
            assert!(
                wrong.is_empty(),
                "{} pages' digests are not those at the capture, the first ones: {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(10)]
            );
            Run {
                faults,
                stats,
                waits,
            }
        });
        let lost: Vec<u64> = (0..PAGES)
            .filter(|&p| mem.digest(p) != xxh3_64(&pattern(p, 3)))
            .collect();
        assert!(lost.is_empty(), "writes lost on pages {lost:?}");
        // Read while the writer stood still; the thread may count a fault just after it
        // un-protected (and so released) its page: the capture's count is the settled one.
        assert!(run.faults <= expected_faults, "faults before the pause");
        assert_eq!(run.stats.faults, expected_faults, "faults before the pause");
        assert_eq!(run.stats.reprotected_pages, expected_reprotected);
        assert_eq!(run.stats.new_pages, 200);
        eprintln!("{:?} {:?}", run.stats, run.waits);
        run
    }

    /// The faults `written` makes: one per group holding a page of `armed`, un-protected
    /// whole by the first.
    fn faults_for(mem: &Mem, written: &[u64], armed: &[Range<u64>], group: u64) -> u64 {
        let m = mem.mapping();
        let groups: BTreeSet<u64> = written
            .iter()
            .filter(|&&p| inside(armed, p))
            .map(|&p| group_of(&m, p, group).start)
            .collect();
        groups.len() as u64
    }

    /// The pages re-protected in the pause: those of `armed` in the groups written, and those
    /// populated since.
    fn reprotected_for(mem: &Mem, written: &[u64], armed: &[Range<u64>], group: u64) -> u64 {
        let m = mem.mapping();
        let pages: BTreeSet<u64> = written
            .iter()
            .filter(|&&p| inside(armed, p))
            .flat_map(|&p| group_of(&m, p, group))
            .filter(|&p| inside(armed, p))
            .chain(POPULATED_SINCE.iter().flat_map(Clone::clone))
            .collect();
        pages.len() as u64
    }

    fn in_groups_of(group_pages: u64) -> Tuning {
        Tuning {
            group_pages,
            ..SLOW
        }
    }

    #[test]
    fn anonymous_memory_digests_are_as_at_capture() {
        if supported(false) {
            for group in [GROUP, 1] {
                let run = digests_are_as_at_capture(&Mem::anon(PAGES, false), in_groups_of(group));
                writes_waited(run.waits);
            }
        }
    }

    #[test]
    fn anonymous_huge_pages_digests_are_as_at_capture() {
        if supported(false) {
            for group in [GROUP, 1] {
                let run = digests_are_as_at_capture(&Mem::anon(PAGES, true), in_groups_of(group));
                writes_waited(run.waits);
            }
        }
    }

    #[test]
    fn memfd_memory_digests_are_as_at_capture() {
        if supported(true) {
            let run = digests_are_as_at_capture(&Mem::memfd(PAGES), in_groups_of(GROUP));
            writes_waited(run.waits);
        }
    }

    #[test]
    fn at_full_speed_the_digests_are_as_at_capture() {
        if supported(true) {
            digests_are_as_at_capture(&Mem::anon(PAGES, true), Tuning::DEFAULT);
            digests_are_as_at_capture(&Mem::memfd(PAGES), Tuning::DEFAULT);
        }
    }

    const GROUP: u64 = crate::snapshot::wp_digests::GROUP_PAGES;

    /// Wait until `done`, at most 20 s.
    fn finishes(what: &str, done: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < until, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn whole(mem: &Mem) -> Vec<(HostMapping, Vec<Range<u64>>)> {
        vec![(
            mem.mapping(),
            std::iter::once(0..mem.len / PAGE_SIZE).collect(),
        )]
    }

    /// Dropped without a capture while a writer waits (the thread is slow to serve it): the
    /// writer is released at once, and the memory is left unregistered (it can be armed again).
    #[test]
    fn dropping_it_uncaptured_releases_a_waiting_writer() {
        if !supported(false) {
            return;
        }
        let mem = Arc::new(Mem::anon(512, true));
        (0..512).for_each(|p| mem.write(p, 1));
        let tuning = Tuning {
            serve_delay: Duration::from_secs(60),
            ..Tuning::DEFAULT
        };
        // SAFETY: the writer's `Arc` keeps `mem` mapped until it is done, after `armed` is gone
        // if the test fails; only the writer writes it, through the mapping.
        let armed = unsafe { ArmedWp::arm_tuned(whole(&mem), tuning) }.expect("arm");
        // Not scoped: if the writer stays blocked, the test fails, and dropping `armed` releases it.
        let writer = std::thread::spawn({
            let mem = Arc::clone(&mem);
            move || mem.write(100, 2)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!writer.is_finished(), "the write did not wait");
        let t = Instant::now();
        drop(armed);
        finishes("the writer still waits after the drop", || {
            writer.is_finished()
        });
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(mem.digest(100), xxh3_64(&pattern(100, 2)));
        (0..512).for_each(|p| mem.write(p, 3));
        // SAFETY: as above.
        let again = unsafe { ArmedWp::arm(whole(&mem)) }.expect("armed again: unregistered");
        drop(again);
        assert!((0..512).all(|p| mem.digest(p) == xxh3_64(&pattern(p, 3))));
    }

    /// The thread fails on the first fault: it un-protects everything itself, so the writer
    /// runs on, and the capture fails (the caller then hashes in the pause).
    #[test]
    fn a_failure_of_the_thread_releases_the_writers_and_fails_the_capture() {
        if !supported(false) {
            return;
        }
        let mem = Arc::new(Mem::anon(512, false));
        (0..512).for_each(|p| mem.write(p, 1));
        let tuning = Tuning {
            fail_on_fault: true,
            ..Tuning::DEFAULT
        };
        // SAFETY: as in `dropping_it_uncaptured_releases_a_waiting_writer`.
        let armed = unsafe { ArmedWp::arm_tuned(whole(&mem), tuning) }.expect("arm");
        let writer = std::thread::spawn({
            let mem = Arc::clone(&mem);
            move || (0..512).for_each(|p| mem.write(p, 2))
        });
        finishes("the writer still waits after the error", || {
            writer.is_finished()
        });
        let e = armed.capture(vec![vec![]]).expect_err("the thread failed");
        assert!(e.to_string().contains("injected"), "{e}");
        assert!((0..512).all(|p| mem.digest(p) == xxh3_64(&pattern(p, 2))));
    }

    #[test]
    fn union_sorts_and_merges() {
        assert_eq!(
            union(&[0..4, 10..12, 20..30], &[4..6, 8..10, 31..32]),
            vec![0..6, 8..12, 20..30, 31..32]
        );
        let one = 1..2;
        assert_eq!(
            union(&[], std::slice::from_ref(&one)),
            std::slice::from_ref(&one)
        );
    }
}
