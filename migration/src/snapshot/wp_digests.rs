// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Digests of guest memory as it was at the pause, computed while the guest runs again.
//!
//! A live snapshot records an xxh3-64 digest of every page as it was when the guest paused for the
//! last delta. Hashing all of memory in the pause would make the pause long, so the populated
//! pages are write-protected with a userfaultfd (by [`PauseDigests::start`] in the pause, or
//! mostly before it by `wp_arm`), and a thread hashes them after the guest resumes, a group at a
//! time, un-protecting each group once it is hashed. A write to a page not hashed yet waits (a
//! vCPU inside KVM's `get_user_pages`, a VMM thread as an ordinary page fault) until the thread
//! has hashed that page's group and un-protected it, as QEMU's background snapshot does. So each
//! page is hashed exactly once, before anything could change it.
//!
//! Pages are un-protected in groups of [`GROUP_PAGES`] aligned by address (2 MiB), hashed first
//! when a writer waits on one of them: a transparent huge page un-protected whole stays mapped
//! whole (un-protecting 4 KiB of it splits its mapping into 512 entries, which every later
//! protect and scan then walks one by one).
//!
//! Pages outside the populated ranges are zero pages: neither read nor protected, a write to one
//! after the pause does not wait, and its digest is the zero page's.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use xxhash_rust::xxh3::xxh3_64;

use crate::postcopy::uffd::{wp, Fault, Userfaultfd};
use crate::stream::zero_page_digest;
use crate::{HostMapping, PAGE_SIZE};

/// Pages hashed between two looks at the waiting writers (256 KiB, some tens of microseconds):
/// a writer waits at most about that long for a group the thread is not hashing.
const CHUNK_PAGES: u64 = 64;

/// Pages un-protected together, aligned by address: 2 MiB, a transparent huge page on x86-64.
pub(super) const GROUP_PAGES: u64 = 512;

/// The longest the thread waits for a writer without looking at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(10);

/// Digests (xxh3-64 per 4 KiB page) of some memory as it was when [`Self::start`] returned,
/// computed by a background thread while writers run again.
#[derive(Debug)]
pub(crate) struct PauseDigests {
    shared: Arc<Shared>,
    mappings: Vec<HostMapping>,
    thread: Option<JoinHandle<io::Result<Vec<Vec<u64>>>>>,
}

/// What the caller and the thread share.
#[derive(Debug)]
struct Shared {
    uffd: Userfaultfd,
    /// Set by `Drop`: the thread un-protects everything and ends.
    stop: AtomicBool,
    faults: AtomicU64,
    hashed_on_fault: AtomicU64,
}

/// Counts of the writes that waited, so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WaitStats {
    /// Write faults served (each woke the writers of one group).
    pub(crate) faults: u64,
    /// Pages hashed because a writer waited on their group before the thread's walk reached it.
    pub(crate) hashed_on_fault: u64,
}

/// How the thread works; tests slow it down, make it fail or change the groups.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tuning {
    pub(super) chunk_pages: u64,
    /// Pages un-protected together on a fault, aligned by address (a power of two).
    pub(super) group_pages: u64,
    /// After each chunk, serve writers only, for this long.
    pub(super) chunk_pause: Duration,
    /// Fail on the first fault, before serving it (tests of the error path).
    pub(super) fail_on_fault: bool,
    /// `wp_arm`'s thread waits this long before serving a fault, unless told to stop (tests: a
    /// writer still waits when the armed value goes).
    pub(super) serve_delay: Duration,
}

impl Tuning {
    pub(super) const DEFAULT: Tuning = Tuning {
        chunk_pages: CHUNK_PAGES,
        group_pages: GROUP_PAGES,
        chunk_pause: Duration::ZERO,
        fail_on_fault: false,
        serve_delay: Duration::ZERO,
    };

    /// The walk's step: whole groups, hashed a chunk at a time, un-protected at once.
    fn unit_pages(&self) -> u64 {
        self.group_pages.max(self.chunk_pages)
    }
}

/// The `UFFD_FEATURE_*` bits needed: write faults flagged as such, and a protected page that is
/// not there yet (never touched, or not mapped in this process) must wait too instead of being
/// filled unseen. Anonymous memory needs `WP_UNPOPULATED` for that; shmem always leaves markers
/// where it protects, and `WP_HUGETLBFS_SHMEM` is how the kernel says it can protect shmem at all
/// (Linux 6.18 registers shmem without it being asked, but an older kernel refuses).
fn needed_features(shared: bool) -> u64 {
    let anon = wp::FEATURE_PAGEFAULT_FLAG_WP | wp::FEATURE_WP_UNPOPULATED;
    if shared {
        anon | wp::FEATURE_WP_HUGETLBFS_SHMEM
    } else {
        anon
    }
}

/// A userfaultfd with the features `regions` need; `Unsupported` if the kernel lacks one.
pub(super) fn wp_userfaultfd(
    regions: &[(HostMapping, Vec<Range<u64>>)],
) -> io::Result<Userfaultfd> {
    let needed = needed_features(regions.iter().any(|(m, _)| m.shared()));
    let available = Userfaultfd::available_features()?;
    if available & needed != needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "userfaultfd write-protect: the kernel offers features {available:#x}, \
                 {needed:#x} are needed"
            ),
        ));
    }
    Userfaultfd::with_features(needed).map(|(uffd, _)| uffd)
}

/// Register `map` on `uffd` in write-protect mode.
pub(super) fn register(uffd: &Userfaultfd, map: &HostMapping) -> io::Result<()> {
    let (addr, len) = (map.addr(), map.len());
    uffd.register_wp(addr, len).map_err(|e| {
        // EINVAL: memory userfaultfd cannot protect (a file on disk, hugetlbfs pages the 4 KiB
        // ranges would split).
        let kind = if e.raw_os_error() == Some(libc::EINVAL) {
            io::ErrorKind::Unsupported
        } else {
            e.kind()
        };
        io::Error::new(
            kind,
            format!("registering {addr:#x}+{len:#x} for write-protect: {e}"),
        )
    })
}

/// Write-protect (`protect`) or un-protect the pages `span` of `map`.
pub(super) fn set_protection(
    uffd: &Userfaultfd,
    map: &HostMapping,
    span: Range<u64>,
    protect: bool,
) -> io::Result<()> {
    let len = (span.end - span.start) * PAGE_SIZE;
    uffd.writeprotect(map.addr() + span.start * PAGE_SIZE, len, protect)
}

/// The pages of `map` in the group of `group_pages` (a power of two), aligned by address, that
/// holds `page`.
pub(super) fn group_of(map: &HostMapping, page: u64, group_pages: u64) -> Range<u64> {
    let base = map.addr() / PAGE_SIZE;
    let at = base + page;
    let start = at & !(group_pages - 1);
    let end = (start + group_pages).min(base + map.len() / PAGE_SIZE);
    start.max(base) - base..end - base
}

/// The parts of `ranges` (sorted, disjoint) inside `span`.
pub(super) fn ranges_in(
    ranges: &[Range<u64>],
    span: Range<u64>,
) -> impl Iterator<Item = Range<u64>> + '_ {
    let first = ranges.partition_point(|r| r.end <= span.start);
    ranges[first..]
        .iter()
        .take_while(move |r| r.start < span.end)
        .map(move |r| r.start.max(span.start)..r.end.min(span.end))
}

impl PauseDigests {
    /// Whether this kernel offers what [`Self::start`] needs for private (`shared` false) or
    /// shared (memfd, shmem) memory, so that the caller can hash during the pause instead.
    /// [`Self::start`] can still refuse a mapping it cannot protect (a file on disk, hugetlbfs)
    /// with `ErrorKind::Unsupported`.
    pub(crate) fn supported(shared: bool) -> bool {
        let needed = needed_features(shared);
        Userfaultfd::available_features().is_ok_and(|f| f & needed == needed)
    }

    /// Call with every writer paused. `regions`: per region, its host mapping and the sorted,
    /// disjoint page ranges that may hold data; other pages are zero pages (digest of 4096 zero
    /// bytes), neither read nor protected. Write-protects the populated pages (this is the part
    /// in the pause) and starts the thread that hashes them. `ErrorKind::Unsupported` if the
    /// kernel or a mapping does not allow it; `InvalidInput` for ranges out of order or bounds.
    ///
    /// # Safety
    ///
    /// Each mapping must stay mapped until [`Self::finish`] returns or the value is dropped (the
    /// thread reads it until then). Until then its memory must be changed only by writes through
    /// these mappings of this process (vCPUs, the VMM's own accesses): not through another
    /// mapping of the same file, by another process, by device DMA, or by discarding pages
    /// (`MADV_DONTNEED`, `MADV_REMOVE`, balloon). Write protection holds back only the writes
    /// through these mappings; the others would race with the thread's reads.
    pub(crate) unsafe fn start(regions: Vec<(HostMapping, Vec<Range<u64>>)>) -> io::Result<Self> {
        // SAFETY: the caller's promise is the one `start_tuned` asks for.
        unsafe { Self::start_tuned(regions, Tuning::DEFAULT) }
    }

    /// [`Self::start`] with the thread tuned.
    ///
    /// # Safety
    ///
    /// As for [`Self::start`].
    unsafe fn start_tuned(
        regions: Vec<(HostMapping, Vec<Range<u64>>)>,
        tuning: Tuning,
    ) -> io::Result<Self> {
        check(&regions)?;
        let uffd = wp_userfaultfd(&regions)?;
        let rooms = regions.iter().map(|(m, _)| Room::new(m)).collect();
        // From here on, a `Hasher` dropped unfinished un-protects every populated page.
        let mut hasher = Hasher::new(uffd, regions, rooms, tuning);
        hasher.protect()?;
        Self::spawn(hasher)
    }

    /// Hash `regions` (checked by [`check`]) from now on, as [`Self::start`] does once it has
    /// protected them: `uffd` has every mapping registered in write-protect mode, and every page
    /// of the ranges, and only those, write-protected. `rooms`: one per region, for its mapping.
    ///
    /// # Safety
    ///
    /// As for [`Self::start`].
    pub(super) unsafe fn adopt(
        uffd: Userfaultfd,
        regions: Vec<(HostMapping, Vec<Range<u64>>)>,
        rooms: Vec<Room>,
        tuning: Tuning,
    ) -> io::Result<Self> {
        debug_assert!(check(&regions).is_ok());
        debug_assert!(regions.len() == rooms.len());
        let mut hasher = Hasher::new(uffd, regions, rooms, tuning);
        hasher.registered = hasher.regions.len();
        Self::spawn(hasher)
    }

    /// Start `hasher`'s thread. If it cannot start, `hasher` is dropped unfinished, which
    /// un-protects everything.
    fn spawn(hasher: Hasher) -> io::Result<Self> {
        let shared = Arc::clone(&hasher.shared);
        let mappings: Vec<HostMapping> = hasher.regions.iter().map(|r| r.map).collect();
        let thread = std::thread::Builder::new()
            .name("wp-digests".into())
            .spawn(move || hasher.run())?;
        Ok(PauseDigests {
            shared,
            mappings,
            thread: Some(thread),
        })
    }

    /// The writes that waited so far.
    pub(crate) fn wait_stats(&self) -> WaitStats {
        WaitStats {
            faults: self.shared.faults.load(Ordering::Relaxed),
            hashed_on_fault: self.shared.hashed_on_fault.load(Ordering::Relaxed),
        }
    }

    /// Whether the thread has ended (every page hashed, or an error).
    #[cfg(test)]
    fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread, unregisters the mappings, and returns per region the digest of
    /// each of its pages as it was at [`Self::start`]. An error of the thread is returned here;
    /// no writer waits on after it.
    #[cfg(test)]
    pub(crate) fn finish(self) -> io::Result<Vec<Vec<u64>>> {
        self.finish_with_stats().map(|(digests, _)| digests)
    }

    /// [`Self::finish`], with the count of the writes that waited.
    pub(crate) fn finish_with_stats(mut self) -> io::Result<(Vec<Vec<u64>>, WaitStats)> {
        let thread = self.thread.take().expect("the thread is joined once");
        let digests = thread
            .join()
            .map_err(|_| io::Error::other("the page-hashing thread panicked"))??;
        for m in &self.mappings {
            self.shared.uffd.unregister(m.addr(), m.len())?;
        }
        Ok((digests, self.wait_stats()))
    }
}

impl Drop for PauseDigests {
    /// Unfinished: stop the thread, which un-protects everything; closing the fd then
    /// unregisters the mappings.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shared.stop.store(true, Ordering::Relaxed);
            if thread.join().is_err() {
                tracing::warn!("the page-hashing thread panicked");
            }
        }
    }
}

/// `InvalidInput` unless every mapping is page aligned and non-empty, no two overlap, and each
/// region's ranges are non-empty, sorted, disjoint and inside it.
pub(super) fn check(regions: &[(HostMapping, Vec<Range<u64>>)]) -> io::Result<()> {
    let bad = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
    let mut spans = Vec::with_capacity(regions.len());
    for (m, ranges) in regions {
        let end = m.addr().checked_add(m.len());
        if m.is_empty() || m.addr() % PAGE_SIZE != 0 || m.len() % PAGE_SIZE != 0 || end.is_none() {
            return bad(format!(
                "mapping {:#x}+{:#x} is not page aligned",
                m.addr(),
                m.len()
            ));
        }
        let pages = m.len() / PAGE_SIZE;
        let mut prev_end = 0;
        for r in ranges {
            if r.start >= r.end || r.start < prev_end || r.end > pages {
                return bad(format!(
                    "populated range {r:?} of mapping {:#x} ({pages} pages) is empty, out of \
                     order or out of bounds",
                    m.addr()
                ));
            }
            prev_end = r.end;
        }
        spans.push((m.addr(), end.unwrap_or(u64::MAX)));
    }
    spans.sort_unstable();
    if spans.windows(2).any(|w| w[0].1 > w[1].0) {
        return bad("two mappings overlap".into());
    }
    Ok(())
}

/// Where the digests of one region go, made before the pause: a first touch of fresh memory
/// costs microseconds a page where the host itself is virtualized (8 MiB of digests for 4 GiB
/// took some 25 ms on a nested host).
#[derive(Debug)]
pub(super) struct Room {
    digests: Vec<u64>,
    hashed: Bitmap,
}

impl Room {
    /// For `map`: every digest that of the zero page (written, so touched), none hashed.
    pub(super) fn new(map: &HostMapping) -> Room {
        let pages = (map.len() / PAGE_SIZE) as usize;
        Room {
            digests: vec![zero_page_digest(PAGE_SIZE as usize); pages],
            hashed: Bitmap::new(pages),
        }
    }
}

/// One region as the thread sees it.
struct Region {
    map: HostMapping,
    ranges: Vec<Range<u64>>,
    /// Pages hashed (and so un-protected or about to be): never hashed again.
    hashed: Bitmap,
    digests: Vec<u64>,
}

impl Region {
    fn addr(&self, page: u64) -> u64 {
        self.map.addr() + page * PAGE_SIZE
    }

    fn populated(&self, page: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= page);
        self.ranges.get(i).is_some_and(|r| r.start <= page)
    }

    /// Hash `page`, a populated page not hashed yet, hence still write-protected.
    fn hash(&mut self, page: u64) {
        debug_assert!(self.populated(page) && !self.hashed.test(page as usize));
        let p = self.addr(page) as *const u8;
        // SAFETY: `page` is inside the mapping (`check` bounds every range by it), which
        // `start`'s (or `adopt`'s) caller keeps mapped while this thread runs (`finish` and
        // `Drop` join it first). A populated page not hashed yet is still write-protected (every
        // populated page was when the thread started: `protect` did it, or `adopt`'s caller
        // promises it; pages are un-protected only once hashed, a group or unit whose populated
        // pages are all hashed, or all at once when the thread ends), so writes through the
        // mapping wait until after this read; that caller promises there are no others. So the
        // 4 KiB do not change while the slice, which ends with this call, exists.
        let bytes = unsafe { std::slice::from_raw_parts(p, PAGE_SIZE as usize) };
        self.digests[page as usize] = xxh3_64(bytes);
        self.hashed.set(page as usize);
    }

    /// Hash the populated pages of `span` not hashed yet, from its start, stopping before the
    /// page that would be the `max + 1`th hashed: where it stopped (`span.end` once every page
    /// of `span` is hashed) and how many it hashed.
    fn hash_span(&mut self, span: Range<u64>, max: u64) -> (u64, u64) {
        let mut n = 0;
        let first = self.ranges.partition_point(|r| r.end <= span.start);
        for i in first..self.ranges.len() {
            let r = self.ranges[i].clone();
            if r.start >= span.end {
                break;
            }
            for page in r.start.max(span.start)..r.end.min(span.end) {
                if self.hashed.test(page as usize) {
                    continue;
                }
                if n == max {
                    return (page, n);
                }
                self.hash(page);
                n += 1;
            }
        }
        (span.end, n)
    }
}

/// Where the thread's walk over the populated pages is.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    region: usize,
    page: u64,
}

/// The thread's state. Dropped unfinished (error, stop, panic), it un-protects every populated
/// page, so that no writer waits for a thread that is gone.
struct Hasher {
    shared: Arc<Shared>,
    regions: Vec<Region>,
    at: Cursor,
    tuning: Tuning,
    /// Regions registered (the first ones): those `Drop` un-protects.
    registered: usize,
    complete: bool,
}

impl Hasher {
    fn new(
        uffd: Userfaultfd,
        regions: Vec<(HostMapping, Vec<Range<u64>>)>,
        rooms: Vec<Room>,
        tuning: Tuning,
    ) -> Self {
        let regions = regions
            .into_iter()
            .zip(rooms)
            .map(|((map, ranges), room)| Region {
                map,
                ranges,
                hashed: room.hashed,
                digests: room.digests,
            })
            .collect();
        Hasher {
            shared: Arc::new(Shared {
                uffd,
                stop: AtomicBool::new(false),
                faults: AtomicU64::new(0),
                hashed_on_fault: AtomicU64::new(0),
            }),
            regions,
            at: Cursor::default(),
            tuning,
            registered: 0,
            complete: false,
        }
    }

    /// Register every mapping and write-protect its populated ranges.
    fn protect(&mut self) -> io::Result<()> {
        let uffd = &self.shared.uffd;
        for r in &self.regions {
            register(uffd, &r.map)?;
            self.registered += 1;
            for p in &r.ranges {
                set_protection(uffd, &r.map, p.clone(), true)?;
            }
        }
        Ok(())
    }

    fn run(mut self) -> io::Result<Vec<Vec<u64>>> {
        while self.step()? {}
        self.complete = true;
        Ok(self
            .regions
            .iter_mut()
            .map(|r| std::mem::take(&mut r.digests))
            .collect())
    }

    /// Serve the waiting writers, then hash and un-protect one unit; false once every
    /// populated page is hashed (and so un-protected: no writer can wait any more).
    fn step(&mut self) -> io::Result<bool> {
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
        }
        self.serve_faults()?;
        if !self.hash_unit()? {
            return Ok(false);
        }
        if !self.tuning.chunk_pause.is_zero() {
            self.serve_for(self.tuning.chunk_pause)?;
        }
        Ok(true)
    }

    /// Serve the writers waiting now.
    fn serve_faults(&mut self) -> io::Result<()> {
        while let Some(fault) = self.shared.uffd.read_fault()? {
            self.serve(fault)?;
        }
        Ok(())
    }

    /// Serve writers as they come for `pause` (tests: a slow hasher), or until told to stop.
    fn serve_for(&mut self, pause: Duration) -> io::Result<()> {
        let until = Instant::now() + pause;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if left.is_zero() || self.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            if self.shared.uffd.wait_readable(left.min(STOP_POLL))? {
                self.serve_faults()?;
            }
        }
        Ok(())
    }

    /// A writer waits on the page at `fault.addr`: hash its group's populated pages not hashed
    /// yet, then un-protect the group, which wakes the writer.
    fn serve(&mut self, fault: Fault) -> io::Result<()> {
        if self.tuning.fail_on_fault {
            return Err(io::Error::other("injected failure on a write fault"));
        }
        if fault.flags & wp::PAGEFAULT_FLAG_WP == 0 {
            return Err(io::Error::other(format!(
                "a fault at {:#x} that is not a write-protect fault",
                fault.addr
            )));
        }
        let Some((region, page)) = self.locate(fault.addr) else {
            return Err(io::Error::other(format!(
                "a write fault at {:#x}, outside every region",
                fault.addr
            )));
        };
        let r = &mut self.regions[region];
        let group = group_of(&r.map, page, self.tuning.group_pages);
        let (_, hashed) = r.hash_span(group.clone(), u64::MAX);
        self.shared
            .hashed_on_fault
            .fetch_add(hashed, Ordering::Relaxed);
        // Every populated page of the group is hashed now (pages not populated were never
        // protected, nothing to hash): un-protecting it cannot lose one.
        set_protection(&self.shared.uffd, &r.map, group, false)?;
        self.shared.faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The region and page of `addr`.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = addr.checked_sub(r.map.addr())?;
            (off < r.map.len()).then_some((i, off / PAGE_SIZE))
        })
    }

    /// The next unit of the walk (aligned by address, within its region) that holds populated
    /// pages; the cursor moves past it.
    fn next_unit(&mut self) -> Option<(usize, Range<u64>)> {
        while let Some(r) = self.regions.get(self.at.region) {
            let i = r.ranges.partition_point(|x| x.end <= self.at.page);
            let Some(range) = r.ranges.get(i) else {
                self.at = Cursor {
                    region: self.at.region + 1,
                    page: 0,
                };
                continue;
            };
            let unit = group_of(
                &r.map,
                self.at.page.max(range.start),
                self.tuning.unit_pages(),
            );
            self.at.page = unit.end;
            return Some((self.at.region, unit));
        }
        None
    }

    /// Hash the next unit's populated pages not hashed yet, a chunk at a time with the waiting
    /// writers served in between, and un-protect it; false if none is left.
    fn hash_unit(&mut self) -> io::Result<bool> {
        let Some((region, unit)) = self.next_unit() else {
            return Ok(false);
        };
        let mut at = unit.start;
        loop {
            let (next, _) = self.regions[region].hash_span(at..unit.end, self.tuning.chunk_pages);
            if next >= unit.end {
                break;
            }
            at = next;
            self.serve_faults()?;
        }
        // Every populated page of the unit is hashed now: un-protecting it cannot lose one.
        let r = &self.regions[region];
        set_protection(&self.shared.uffd, &r.map, unit, false)?;
        Ok(true)
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        if self.complete {
            return;
        }
        for r in &self.regions[..self.registered] {
            for p in &r.ranges {
                if let Err(e) = set_protection(&self.shared.uffd, &r.map, p.clone(), false) {
                    // Its writers then wait until the fd is closed, which releases them.
                    tracing::warn!("un-protecting pages {p:?} of {:#x}: {e}", r.map.addr());
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::mpsc;

    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    use super::*;

    /// Test memory: private anonymous (with huge pages if asked) or a shared memfd mapping,
    /// unmapped on drop.
    pub(crate) struct Mem {
        pub(crate) addr: u64,
        pub(crate) len: u64,
        shared: bool,
        _file: Option<File>,
    }

    impl Mem {
        pub(crate) fn anon(pages: u64, huge: bool) -> Mem {
            let len = pages * PAGE_SIZE;
            let addr = map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
            if huge {
                // SAFETY: advice on the mapping just made, which holds nothing yet.
                let rc =
                    unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_HUGEPAGE) };
                assert_eq!(rc, 0, "MADV_HUGEPAGE: {}", io::Error::last_os_error());
            }
            Mem {
                addr,
                len,
                shared: false,
                _file: None,
            }
        }

        pub(crate) fn memfd(pages: u64) -> Mem {
            // SAFETY: memfd_create takes a NUL-terminated name and flags; a non-negative result
            // is a new fd that nothing else owns.
            let fd = unsafe { libc::memfd_create(c"wp-digests".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
            // SAFETY: `fd` is new and owned here only.
            let file = unsafe { File::from_raw_fd(fd) };
            Mem::file(file, pages)
        }

        /// `file` (resized to `pages` pages) mapped shared.
        fn file(file: File, pages: u64) -> Mem {
            let len = pages * PAGE_SIZE;
            file.set_len(len).expect("size the file");
            let addr = map(len, libc::MAP_SHARED, file.as_raw_fd());
            Mem {
                addr,
                len,
                shared: true,
                _file: Some(file),
            }
        }

        pub(crate) fn mapping(&self) -> HostMapping {
            // SAFETY: the test's own mapping, alive as long as `self`, holding test data only.
            unsafe { HostMapping::new(self.addr, self.len, self.shared) }
        }

        /// Write `pattern(page, seed)` over `page` (waits while it is write-protected).
        pub(crate) fn write(&self, page: u64, seed: u64) {
            self.write_bytes(page, &pattern(page, seed));
        }

        /// Write `data` (a page) over `page`.
        pub(crate) fn write_bytes(&self, page: u64, data: &[u8]) {
            assert!(page < self.len / PAGE_SIZE && data.len() == PAGE_SIZE as usize);
            let at = (self.addr + page * PAGE_SIZE) as *mut u8;
            // SAFETY: `page` lies inside the mapping (asserted), which lives as long as `self`;
            // a raw copy of one page, no reference to the mapping's bytes is formed.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, data.len()) };
        }

        /// xxh3-64 of `page` as it is now.
        pub(crate) fn digest(&self, page: u64) -> u64 {
            assert!(page < self.len / PAGE_SIZE);
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            let at = (self.addr + page * PAGE_SIZE) as *const u8;
            // SAFETY: as in `write`, copying the other way into a buffer of the same size.
            unsafe { std::ptr::copy_nonoverlapping(at, buf.as_mut_ptr(), buf.len()) };
            xxh3_64(&buf)
        }
    }

    impl Drop for Mem {
        fn drop(&mut self) {
            // SAFETY: the mapping `map` made, unmapped once, after every user is gone.
            unsafe { libc::munmap(self.addr as *mut _, self.len as usize) };
        }
    }

    /// All of `mem`, populated.
    fn whole(mem: &Mem) -> Vec<(HostMapping, Vec<Range<u64>>)> {
        vec![(
            mem.mapping(),
            std::iter::once(0..mem.len / PAGE_SIZE).collect(),
        )]
    }

    /// A new read-write mapping of `len` bytes (`fd` -1: anonymous).
    fn map(len: u64, flags: i32, fd: i32) -> u64 {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new mapping where the kernel chooses; no existing memory is touched.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, prot, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
        p as u64
    }

    /// A page's worth of bytes particular to `page` and `seed`.
    pub(crate) fn pattern(page: u64, seed: u64) -> Vec<u8> {
        (0..PAGE_SIZE / 8)
            .flat_map(|i| {
                let x = (page << 20 | i) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                x.wrapping_mul(0xbf58_476d_1ce4_e5b9).to_le_bytes()
            })
            .collect()
    }

    pub(crate) fn zero() -> u64 {
        xxh3_64(&[0u8; PAGE_SIZE as usize])
    }

    /// Whether write protection works here; without it the tests skip, loudly (and fail in CI).
    pub(crate) fn supported(shared: bool) -> bool {
        if PauseDigests::supported(shared) {
            return true;
        }
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "userfaultfd write-protect (shared: {shared}) is not available, and CI=true"
        );
        eprintln!("SKIPPED: userfaultfd write-protect (shared: {shared}) is not available here");
        false
    }

    pub(crate) const PAGES: u64 = 4096;
    /// Pages inside the populated ranges left unwritten before the start: zero and not there
    /// yet, their writes must wait all the same.
    const UNWRITTEN: Range<u64> = 2000..2050;

    /// Populated: all but two holes, 1500..1600 and 3000..3010, never touched before the start.
    fn populated() -> Vec<Range<u64>> {
        vec![0..1500, 1600..3000, 3010..PAGES]
    }

    /// A hasher slow enough (64 chunks, 5 ms each) that the writer gets to most pages first.
    pub(crate) const SLOW: Tuning = Tuning {
        chunk_pause: Duration::from_millis(5),
        ..Tuning::DEFAULT
    };

    /// Fill `mem`, start, have a writer overwrite every page in random order, finish: the
    /// digests are those of the pages at the start, and every write landed.
    fn digests_are_as_at_start(mem: &Mem, tuning: Tuning) -> WaitStats {
        let ranges = populated();
        let holds_data = |p: u64| ranges.iter().any(|r| r.contains(&p)) && !UNWRITTEN.contains(&p);
        for p in (0..PAGES).filter(|&p| holds_data(p)) {
            mem.write(p, 1);
        }
        let expected: Vec<u64> = (0..PAGES)
            .map(|p| {
                if holds_data(p) {
                    xxh3_64(&pattern(p, 1))
                } else {
                    zero()
                }
            })
            .collect();
        let mut order: Vec<u64> = (0..PAGES).collect();
        order.shuffle(&mut StdRng::seed_from_u64(7));
        let (digests, stats) = std::thread::scope(|s| {
            let (go, wait) = mpsc::channel::<()>();
            let (done, writer_done) = mpsc::channel();
            s.spawn(move || {
                if wait.recv().is_ok() {
                    order.iter().for_each(|&p| mem.write(p, 2));
                }
                let _ = done.send(());
            });
            // SAFETY: `mem` outlives the scope, and only the writer writes it, through the
            // mapping.
            let d =
                unsafe { PauseDigests::start_tuned(vec![(mem.mapping(), ranges.clone())], tuning) }
                    .expect("start");
            go.send(()).expect("the writer waits");
            writer_done
                .recv_timeout(Duration::from_secs(60))
                .expect("the writer finished: no write waits for ever");
            let stats = d.wait_stats();
            (d.finish().expect("finish"), stats)
        });
        assert_eq!(digests.len(), 1);
        let wrong: Vec<u64> = (0..PAGES)
            .filter(|&p| digests[0][p as usize] != expected[p as usize])
            .collect();
        assert!(
            wrong.is_empty(),
            "{} pages' digests are not those at the start, the first ones: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        );
        let lost: Vec<u64> = (0..PAGES)
            .filter(|&p| mem.digest(p) != xxh3_64(&pattern(p, 2)))
            .collect();
        assert!(
            lost.is_empty(),
            "writes lost on pages {:?}",
            &lost[..lost.len().min(10)]
        );
        eprintln!("{stats:?}");
        stats
    }

    /// Many writes must have waited for pages the thread had not reached: otherwise the test
    /// proves nothing about write protection.
    pub(crate) fn writes_waited(stats: WaitStats) {
        assert!(
            stats.hashed_on_fault >= 10,
            "only {} pages were hashed for a waiting writer ({stats:?})",
            stats.hashed_on_fault
        );
    }

    #[test]
    fn anonymous_memory_hashes_as_at_start_while_a_writer_overwrites_it() {
        if supported(false) {
            writes_waited(digests_are_as_at_start(&Mem::anon(PAGES, false), SLOW));
        }
    }

    #[test]
    fn anonymous_huge_pages_hash_as_at_start_while_a_writer_overwrites_them() {
        if supported(false) {
            writes_waited(digests_are_as_at_start(&Mem::anon(PAGES, true), SLOW));
        }
    }

    #[test]
    fn memfd_memory_hashes_as_at_start_while_a_writer_overwrites_it() {
        if supported(true) {
            writes_waited(digests_are_as_at_start(&Mem::memfd(PAGES), SLOW));
        }
    }

    /// 4 KiB groups: each fault hashes and un-protects its page only.
    #[test]
    fn in_groups_of_one_page_the_digests_are_as_at_start() {
        if supported(true) {
            let tuning = Tuning {
                group_pages: 1,
                ..SLOW
            };
            let stats = digests_are_as_at_start(&Mem::anon(PAGES, true), tuning);
            assert_eq!(stats.faults, stats.hashed_on_fault, "one page per fault");
            writes_waited(stats);
            writes_waited(digests_are_as_at_start(&Mem::memfd(PAGES), tuning));
        }
    }

    #[test]
    fn at_full_speed_the_digests_are_as_at_start() {
        if supported(true) {
            digests_are_as_at_start(&Mem::anon(PAGES, false), Tuning::DEFAULT);
            digests_are_as_at_start(&Mem::memfd(PAGES), Tuning::DEFAULT);
        }
    }

    /// Writes to pages outside the populated ranges (never protected) neither wait for the
    /// thread nor change their digest, the zero page's.
    fn outside_writes_do_not_wait(mem: &Mem) {
        let ranges = vec![0..200, 300..512];
        for p in ranges.iter().flat_map(Clone::clone) {
            mem.write(p, 1);
        }
        // 7 chunks of 64 pages, 100 ms each: the thread runs for 0.6 s at least.
        let tuning = Tuning {
            chunk_pause: Duration::from_millis(100),
            ..Tuning::DEFAULT
        };
        // SAFETY: `mem` outlives `d`, and only this thread writes it, through the mapping.
        let d = unsafe { PauseDigests::start_tuned(vec![(mem.mapping(), ranges)], tuning) }
            .expect("start");
        (200..300).for_each(|p| mem.write(p, 2));
        assert!(
            !d.thread_ended(),
            "the writes outside the populated pages waited for the thread"
        );
        assert_eq!(d.wait_stats().faults, 0, "a write outside faulted");
        let digests = d.finish().expect("finish");
        for p in 0..512 {
            let want = match p {
                200..300 => zero(),
                _ => xxh3_64(&pattern(p, 1)),
            };
            assert_eq!(digests[0][p as usize], want, "page {p}");
        }
        assert!((200..300).all(|p| mem.digest(p) == xxh3_64(&pattern(p, 2))));
    }

    #[test]
    fn a_write_outside_the_populated_pages_neither_waits_nor_changes_its_digest() {
        if supported(true) {
            outside_writes_do_not_wait(&Mem::anon(512, false));
            outside_writes_do_not_wait(&Mem::memfd(512));
        }
    }

    /// The thread fails on the first write fault: the waiting writer is released before
    /// `finish` (which returns the error), while the fd is still open.
    #[test]
    fn an_error_of_the_thread_releases_the_writers_and_is_returned() {
        if !supported(false) {
            return;
        }
        let mem = Arc::new(Mem::anon(PAGES, false));
        (0..PAGES).for_each(|p| mem.write(p, 1));
        let tuning = Tuning {
            chunk_pause: Duration::from_secs(30),
            fail_on_fault: true,
            ..Tuning::DEFAULT
        };
        // SAFETY: the writer's `Arc` keeps `mem` mapped until it is done, after `d` is gone if
        // the test fails; only the writer writes it, through the mapping.
        let d = unsafe { PauseDigests::start_tuned(whole(&mem), tuning) }.expect("start");
        // Not scoped: if the writer stays blocked, the test fails, and dropping `d` releases it.
        let writer = std::thread::spawn({
            let mem = Arc::clone(&mem);
            move || mem.write(PAGES - 1, 2)
        });
        let until = Instant::now() + Duration::from_secs(20);
        while !writer.is_finished() {
            assert!(
                Instant::now() < until,
                "the writer still waits after the error"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(mem.digest(PAGES - 1), xxh3_64(&pattern(PAGES - 1, 2)));
        let e = d.finish().expect_err("the thread failed");
        assert!(e.to_string().contains("injected"), "{e}");
    }

    /// Dropped unfinished, in the middle of a long pause of the thread: the drop does not wait
    /// for the thread to finish its walk, and writes run on.
    #[test]
    fn dropping_it_unfinished_stops_the_thread_promptly() {
        if !supported(false) {
            return;
        }
        let mem = Mem::anon(PAGES, false);
        (0..PAGES).for_each(|p| mem.write(p, 1));
        let tuning = Tuning {
            chunk_pause: Duration::from_secs(30),
            ..Tuning::DEFAULT
        };
        // SAFETY: `mem` outlives `d`, and only this thread writes it, through the mapping.
        let d = unsafe { PauseDigests::start_tuned(whole(&mem), tuning) }.expect("start");
        mem.write(PAGES - 1, 2);
        // The write's group, hashed for it (the walk is far from it).
        let group = group_of(&mem.mapping(), PAGES - 1, GROUP_PAGES);
        assert_eq!(d.wait_stats().hashed_on_fault, group.end - group.start);
        let t = Instant::now();
        drop(d);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "drop took {:?}",
            t.elapsed()
        );
        (0..PAGES).for_each(|p| mem.write(p, 3));
        assert!((0..PAGES).all(|p| mem.digest(p) == xxh3_64(&pattern(p, 3))));
    }

    #[test]
    fn ranges_out_of_order_or_bounds_are_refused() {
        let mem = Mem::anon(16, false);
        let bad = [
            vec![4..8, 2..3],
            vec![0..4, 3..6],
            vec![5..5, 6..7],
            vec![0..10, 10..17],
        ];
        for ranges in bad {
            // SAFETY: `mem` outlives the call; nothing writes it.
            let r = unsafe { PauseDigests::start(vec![(mem.mapping(), ranges.clone())]) };
            let e = r.expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{ranges:?}: {e}");
        }
        // SAFETY: an unaligned range that is never mapped by the call: it is refused first.
        let unaligned = unsafe { HostMapping::new(mem.addr + 8, PAGE_SIZE, false) };
        // SAFETY: as above.
        let r = unsafe { PauseDigests::start(vec![(unaligned, vec![])]) };
        assert_eq!(r.expect_err("refused").kind(), io::ErrorKind::InvalidInput);
        let halves = || {
            // SAFETY: the two halves of `mem`, overlapping on purpose; refused before any use.
            unsafe {
                [
                    HostMapping::new(mem.addr, 9 * PAGE_SIZE, false),
                    HostMapping::new(mem.addr + 8 * PAGE_SIZE, 8 * PAGE_SIZE, false),
                ]
            }
        };
        let [a, b] = halves();
        // SAFETY: as above.
        let r = unsafe { PauseDigests::start(vec![(a, vec![]), (b, vec![])]) };
        assert_eq!(r.expect_err("refused").kind(), io::ErrorKind::InvalidInput);
    }

    /// A file on disk cannot be write-protected: `Unsupported`, so the caller hashes in the
    /// pause. (Where the temporary directory is tmpfs, the file is shmem and can.)
    #[test]
    fn a_mapped_file_on_disk_is_unsupported() {
        if !supported(true) {
            return;
        }
        let path = std::env::temp_dir().join(format!("wp-digests-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create a file");
        let _ = std::fs::remove_file(&path);
        let mem = Mem::file(file, 16);
        mem.write(0, 1);
        // SAFETY: `mem` outlives the call and `d`; nothing writes it.
        match unsafe { PauseDigests::start(whole(&mem)) } {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}"),
            Ok(d) => {
                eprintln!("{} is tmpfs: its files can be protected", path.display());
                assert_eq!(d.finish().expect("finish")[0][0], xxh3_64(&pattern(0, 1)));
            }
        }
    }

    /// A real guest (KVM): the vCPU writing its working set waits, inside KVM, for each page it
    /// writes to be hashed first. The digests are those of the paused guest, and it runs on.
    #[test]
    fn a_running_vcpu_waits_for_the_pages_it_writes_to_be_hashed() {
        use clearlog_test_guest::workload::{check::check_increment, WorkloadSpec};
        use clearlog_test_guest::{Guest, GuestConfig};

        if clearlog_kvm::doctest_kvm_skip("wp_digests, a running vCPU") || !supported(false) {
            return;
        }
        let g = Guest::boot(GuestConfig {
            mem_bytes: 64 << 20,
            vcpus: 1,
            workload: WorkloadSpec::Increment {
                wss_bytes: 16 << 20,
                dirty_rate_bytes_per_s: 0,
            },
            ..GuestConfig::default()
        })
        .expect("boot the increment guest");
        std::thread::sleep(Duration::from_millis(300));
        g.pause().expect("pause");
        let block = Arc::clone(g.block());
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let expected: Vec<u64> = (0..block.pages())
            .map(|p| {
                block.read(p * PAGE_SIZE, &mut page).expect("read a page");
                xxh3_64(&page)
            })
            .collect();
        // SAFETY: the block's own private anonymous mapping, which `block` keeps mapped past
        // `d`; while `d` runs, only the vCPU (through KVM) and the harness write it, through it.
        let mapping = unsafe { HostMapping::new(block.host_addr(), block.size(), false) };
        let whole = vec![(mapping, std::iter::once(0..block.pages()).collect())];
        // SAFETY: as above.
        let d = unsafe { PauseDigests::start_tuned(whole, SLOW) }.expect("start");
        let before = g.pages_written().expect("pages written");
        g.resume().expect("resume");
        let stats = loop {
            // Read before `finish`, which takes `d`: the vCPU's writes that waited so far.
            if d.thread_ended() {
                break d.wait_stats();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let digests = d.finish().expect("finish");
        std::thread::sleep(Duration::from_millis(100));
        g.pause().expect("pause again");
        let after = g.pages_written().expect("pages written");
        assert!(
            digests[0] == expected,
            "the digests are not those of the paused guest"
        );
        eprintln!("vCPU: {stats:?}, {} pages written", after - before);
        writes_waited(stats);
        assert!(after > before, "the guest made no progress");
        assert!(g.vcpu_failures().is_empty(), "{:?}", g.vcpu_failures());
        let check = check_increment(g.ram()).expect("increment check");
        assert!(check.is_consistent(), "{} bad pages", check.bad_count);
    }

    /// A writer of random pages until `stop`: how many writes, the longest, and how many took
    /// over 50 us (those that waited, mostly).
    fn random_writer(mem: &Mem, stop: &AtomicBool) -> (u64, Duration, u64) {
        let mut rng = StdRng::seed_from_u64(3);
        let (mut n, mut longest, mut slow) = (0, Duration::ZERO, 0);
        let data = vec![0x5au8; PAGE_SIZE as usize];
        while !stop.load(Ordering::Relaxed) {
            let page = rand::Rng::random_range(&mut rng, 0..mem.len / PAGE_SIZE);
            let t = Instant::now();
            mem.write_bytes(page, &data);
            let took = t.elapsed();
            longest = longest.max(took);
            slow += u64::from(took > Duration::from_micros(50));
            n += 1;
        }
        (n, longest, slow)
    }

    /// `start` (in the pause) and the hashing of 1 GiB of populated memory, first alone, then
    /// with a writer of random pages.
    fn time_one_gib(kind: &str, mem: &Mem) {
        let pages = mem.len / PAGE_SIZE;
        let mut data = vec![0x11u8; PAGE_SIZE as usize];
        for p in 0..pages {
            data[..8].copy_from_slice(&p.to_le_bytes());
            mem.write_bytes(p, &data);
        }
        let t = Instant::now();
        let expected: Vec<u64> = (0..pages).map(|p| mem.digest(p)).collect();
        let in_pause = t.elapsed();
        let gib = mem.len as f64 / f64::from(1 << 30);
        eprintln!(
            "{kind}: hashing in the pause (copy + xxh3): {in_pause:?}, {:.2} GiB/s",
            gib / in_pause.as_secs_f64()
        );
        for with_writer in [false, true] {
            let stop = AtomicBool::new(false);
            let t = Instant::now();
            // SAFETY: `mem` outlives `d`; only the writer writes it, through the mapping.
            let d = unsafe { PauseDigests::start(whole(mem)) }.expect("start");
            let started = t.elapsed();
            let (digests, writes) = std::thread::scope(|s| {
                let writer = with_writer.then(|| s.spawn(|| random_writer(mem, &stop)));
                let digests = d.finish().expect("finish");
                stop.store(true, Ordering::Relaxed);
                (digests, writer.map(|w| w.join().expect("writer")))
            });
            let hashed = t.elapsed();
            assert!(
                digests[0] == expected,
                "digests differ from those at the start"
            );
            eprintln!(
                "{kind}, writer {with_writer}: start {started:?}, all hashed after {hashed:?} \
                 ({:.2} GiB/s); writes (count, longest, over 50 us): {writes:?}",
                gib / hashed.as_secs_f64()
            );
        }
    }

    #[test]
    #[ignore = "timing, 1 GiB: run with `--ignored --nocapture`"]
    fn one_gib_start_and_hash_rate() {
        if !supported(true) {
            return;
        }
        time_one_gib("anonymous", &Mem::anon(1 << 18, false));
        time_one_gib("anonymous, huge pages", &Mem::anon(1 << 18, true));
        time_one_gib("memfd", &Mem::memfd(1 << 18));
    }
}
