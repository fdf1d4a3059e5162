// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination side: load, verify, restore, acknowledge, resume.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use clearlog_bitmap::Bitmap;
use xxhash_rust::xxh3::xxh3_64;

use crate::cpu::{ns_per_page, process_cpu_time, thread_cpu_time};

use crate::digest::{hash_threads, page_digests};
use crate::memory::is_zero_page;
use crate::stats::IncomingStats;
use crate::stream::{
    self, PageEntry, Record, StreamReader, VerifyRecord, FLAG_ACK_REQUESTED, FLAG_CONFIRM,
    FLAG_DIGEST_FULL, FLAG_VERIFY_AFTER,
};
use crate::{
    Error, MigrationBlock, MigrationMemory, Result, StateBlob, Transport, VmRestore, PAGE_SIZE,
};

/// Capacity of the incoming buffer (1 MiB).
const READ_BUFFER: usize = 1 << 20;

/// The incoming side of a migration, loading into the RAM blocks of its own memory (a
/// `clearlog-memory` `MemorySystem`, or anything that implements [`MigrationMemory`]), which must
/// have the source's layout: same block names and sizes, in the same order.
///
/// A guest is never resumed from a stream that did not reach its end marker, nor before the
/// source's confirmation (live migrations), nor (strict verification, or a snapshot file) before its
/// memory was checked against the source's final memory. With the default verification the check
/// runs right after resuming, and a mismatch is [`Error::VerificationFailed`] naming the pages.
/// See [`crate::Source`] for a complete example.
///
/// # Examples
///
/// ```
/// use clearlog_memory::MemorySystem;
/// use clearlog_migration::{BoxError, Destination, Error, StateBlob, Transport, VmRestore};
///
/// struct Vm;
/// impl VmRestore for Vm {
///     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
///     fn resume(&self) -> Result<(), BoxError> { panic!("never resumed from a bad stream") }
/// }
/// let mem = MemorySystem::new();
/// mem.add_ram("ram", 0, 1 << 20).unwrap();
/// let garbage: &'static [u8] = b"not a migration stream";
/// let err = Destination::new(&mem).receive(Transport::new(Some(Box::new(garbage)), None), &Vm).unwrap_err();
/// assert!(matches!(err, Error::BadMagic(_)));
/// ```
#[derive(Debug)]
pub struct Destination<'a, M: ?Sized> {
    mem: &'a M,
    confirm_timeout: Duration,
}

/// How long a destination waits for the source's confirmation after acknowledging (default of
/// [`Destination::with_confirm_timeout`]).
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl<'a, M: MigrationMemory + ?Sized> Destination<'a, M> {
    /// A destination loading into `mem`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mem = clearlog_memory::MemorySystem::new();
    /// let _dst = clearlog_migration::Destination::new(&mem);
    /// ```
    pub fn new(mem: &'a M) -> Self {
        Destination {
            mem,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        }
    }

    /// How long to wait, after acknowledging, for the source's confirmation before giving up
    /// without resuming (default [`DEFAULT_CONFIRM_TIMEOUT`]). Only streams whose source asked for
    /// the handshake ([`crate::stream::FLAG_CONFIRM`]) have one.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let mem = clearlog_memory::MemorySystem::new();
    /// let _dst = clearlog_migration::Destination::new(&mem).with_confirm_timeout(Duration::from_secs(5));
    /// ```
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Load the stream, verify it, restore the state, acknowledge (if the source asked), then resume.
    ///
    /// # Examples
    ///
    /// Restoring a snapshot file (`file:` URI; see [`crate::Source`] for a live migration):
    ///
    /// ```no_run
    /// # use clearlog_migration::{connect, BoxError, CancelToken, Destination, Listener, MigrationConfig, Source, StateBlob, VmControl, VmRestore};
    /// # struct Vm;
    /// # impl VmRestore for Vm {
    /// #     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
    /// #     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
    /// # }
    /// let mem = clearlog_memory::MemorySystem::new();
    /// mem.add_ram("ram", 0, 1 << 30).unwrap();
    /// let transport = Listener::bind("file:/tmp/vm.snap").unwrap().accept().unwrap();
    /// let stats = Destination::new(&mem).receive(transport, &Vm).unwrap();
    /// assert!(stats.resumed);
    /// ```
    pub fn receive(&self, transport: Transport, vm: &dyn VmRestore) -> Result<IncomingStats> {
        self.receive_with(transport, vm, true)
    }

    /// Like [`receive`](Self::receive) but returns without resuming: RAM is loaded, the state
    /// restored, the acknowledgement sent, the source's confirmation received and the memory
    /// verified (with the default verification the source's final digests are read before this
    /// returns: the time it takes is downtime here). The caller resumes the guest (for example
    /// after saving or inspecting its memory).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use clearlog_migration::{connect, BoxError, CancelToken, Destination, Listener, MigrationConfig, Source, StateBlob, VmControl, VmRestore};
    /// # struct Vm;
    /// # impl VmRestore for Vm {
    /// #     fn restore_state(&self, _: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
    /// #     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
    /// # }
    /// let mem = clearlog_memory::MemorySystem::new();
    /// mem.add_ram("ram", 0, 1 << 30).unwrap();
    /// let listener = Listener::bind("tcp:0.0.0.0:4444").unwrap();
    /// let stats = Destination::new(&mem).receive_paused(listener.accept().unwrap(), &Vm).unwrap();
    /// assert!(stats.acked && !stats.resumed);
    /// // ... inspect or save `mem` ...
    /// Vm.resume().unwrap();
    /// ```
    pub fn receive_paused(
        &self,
        transport: Transport,
        vm: &dyn VmRestore,
    ) -> Result<IncomingStats> {
        self.receive_with(transport, vm, false)
    }

    fn receive_with(
        &self,
        transport: Transport,
        vm: &dyn VmRestore,
        resume: bool,
    ) -> Result<IncomingStats> {
        let start = Instant::now();
        let cpu_start = (process_cpu_time(), thread_cpu_time());
        let reader = transport.reader.ok_or(Error::Io {
            context: "starting the incoming migration",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "transport has no read half",
            ),
        })?;
        let mut writer = transport.writer;
        let mut r = StreamReader::new(BufReader::with_capacity(READ_BUFFER, reader));
        let mut stats = IncomingStats::default();
        let mut flags = 0;
        let mut received = Vec::new();
        let loaded = self.load(&mut r, &mut stats, &mut flags, &mut received);
        stats.dest_ns_per_page = ns_per_page(
            thread_cpu_time().saturating_sub(cpu_start.1),
            stats.pages_received,
        );
        let wants_ack = flags & FLAG_ACK_REQUESTED != 0;
        let wants_confirm = wants_ack && flags & FLAG_CONFIRM != 0;
        let verify_after = flags & FLAG_VERIFY_AFTER != 0;
        stats.bytes_received = r.bytes_read();
        stats.load_time_ms = start.elapsed().as_secs_f64() * 1000.0;
        let mut ack_target = if wants_ack { writer.as_mut() } else { None };
        let refuse = |ack_target: Option<&mut Box<dyn Write + Send>>, e: Error| {
            if let Some(w) = ack_target {
                let _ = send_ack(w.as_mut(), stream::ACK_FAILED);
            }
            e
        };
        let state = match loaded {
            Ok(state) => state,
            Err(e) => return Err(refuse(ack_target, e)),
        };
        let vm_err = |hook| move |source| Error::Vm { hook, source };
        // A snapshot (no source waiting for us) is verified before anything else happens to it.
        let mut verified_early = false;
        if verify_after && !wants_ack {
            self.verify_now(&mut r, &mut stats, received.split_off(0), None)?;
            verified_early = true;
        }
        if let Err(e) = vm.check_loaded().map_err(vm_err("check_loaded")) {
            return Err(refuse(ack_target, e));
        }
        if let Err(e) = vm.restore_state(&state).map_err(vm_err("restore_state")) {
            return Err(refuse(ack_target, e));
        }
        if let Some(w) = ack_target.as_mut() {
            // If the acknowledgement cannot be sent the source resumes its guest: we must not.
            send_ack(w.as_mut(), stream::ACK_OK)
                .map_err(Error::io("sending the acknowledgement"))?;
            stats.acked = true;
            if wants_confirm {
                // Resume only once the source has committed: without its confirmation it may
                // resume its own copy of the guest.
                wait_confirm(r.get_mut(), self.confirm_timeout)?;
            }
        } else if wants_ack {
            return Err(Error::Io {
                context: "sending the acknowledgement",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "transport has no write half",
                ),
            });
        }
        // A live destination resumes as soon as the source committed, then verifies.
        if resume {
            vm.resume().map_err(vm_err("resume"))?;
            stats.resumed = true;
            stats.resumed_at_unix_ns = crate::source::unix_ns();
        }
        if verify_after && !verified_early {
            let verdict_to = writer.as_mut().map(|w| w.as_mut() as &mut dyn Write);
            self.verify_now(&mut r, &mut stats, received, verdict_to)?;
        }
        stats.verified = true;
        stats.bytes_received = r.bytes_read();
        stats.cpu_s = process_cpu_time().saturating_sub(cpu_start.0).as_secs_f64();
        stats.migration_thread_cpu_s = thread_cpu_time().saturating_sub(cpu_start.1).as_secs_f64();
        Ok(stats)
    }

    /// Read the source's final digests, compare them with the pages as received, answer with the
    /// verdict (`verdict_to`, a live source), and fail naming the pages that differ.
    fn verify_now<R: Read>(
        &self,
        r: &mut StreamReader<R>,
        stats: &mut IncomingStats,
        received: Vec<BTreeMap<u64, u64>>,
        verdict_to: Option<&mut dyn Write>,
    ) -> Result<()> {
        let t = Instant::now();
        let result = verify_after_resume(r, &self.mem.blocks(), received);
        stats.verify_after_ms = t.elapsed().as_secs_f64() * 1000.0;
        let mismatched = result.map_err(|e| Error::VerificationIncomplete(e.to_string()))?;
        stats.mismatched_pages = mismatched.count;
        if let Some(w) = verdict_to {
            send_verdict(w, mismatched.count, stats.resumed_at_unix_ns)
                .map_err(|e| Error::VerificationIncomplete(format!("sending the verdict: {e}")))?;
        }
        if mismatched.count > 0 {
            return Err(Error::VerificationFailed {
                mismatched_pages: mismatched.count,
                first: mismatched.first.join(", "),
                after: if stats.resumed {
                    "this destination guest is RUNNING on wrong memory: stop it; the source \
                     still holds the guest, paused"
                } else {
                    "this destination did not resume the guest"
                },
            });
        }
        Ok(())
    }

    /// Read everything up to the end marker and verify the digests; returns the state blobs.
    ///
    /// `received` gets, per block, the xxh3-64 of every page received as data (the last version
    /// of each; a zero page removes its entry): what the verification after resuming compares with
    /// the source's final memory. Memory proportional to the pages received as data.
    fn load<R: std::io::BufRead>(
        &self,
        r: &mut StreamReader<R>,
        stats: &mut IncomingStats,
        flags: &mut u32,
        received: &mut Vec<BTreeMap<u64, u64>>,
    ) -> Result<Vec<StateBlob>> {
        let header = r.read_header(PAGE_SIZE as u32)?;
        *flags = header.flags;
        let full = header.flags & FLAG_DIGEST_FULL != 0;
        let track = header.flags & FLAG_VERIFY_AFTER != 0;
        if full == track {
            return Err(Error::Malformed(
                "header flags (exactly one verification: full digest table or after resuming)",
            ));
        }
        let blocks = self.mem.blocks();
        if blocks.len() != header.blocks.len() {
            return Err(Error::LayoutMismatch(format!(
                "stream has {} RAM blocks, destination has {}",
                header.blocks.len(),
                blocks.len()
            )));
        }
        for (ours, theirs) in blocks.iter().zip(&header.blocks) {
            if ours.name() != theirs.name || ours.size() != theirs.size {
                return Err(Error::LayoutMismatch(format!(
                    "stream block `{}` of {} bytes, destination block `{}` of {} bytes",
                    theirs.name,
                    theirs.size,
                    ours.name(),
                    ours.size()
                )));
            }
        }
        let zero_page = vec![0u8; PAGE_SIZE as usize];
        let mut scratch = Box::new([0u8; PAGE_SIZE as usize]);
        let mut nonzero = Vec::new();
        // Pages whose content now comes from a data record of this stream (a page zeroed later
        // that is not in here held data from before the stream: stale).
        let mut got_data: Vec<Bitmap> = blocks
            .iter()
            .map(|b| Bitmap::new(b.pages() as usize))
            .collect();
        *received = if track {
            blocks.iter().map(|_| BTreeMap::new()).collect()
        } else {
            Vec::new()
        };
        let mut state = Vec::new();
        let mut state_bytes = 0u64;
        let mut digests: Vec<Option<Vec<u64>>> = vec![None; blocks.len()];
        let mut in_digests = false;
        loop {
            match r.next_record()? {
                Record::Pages { block, count } => {
                    if in_digests {
                        return Err(Error::UnexpectedRecord(
                            "page record after the digest table",
                        ));
                    }
                    let ram = &blocks[block as usize];
                    let got = &mut got_data[block as usize];
                    for _ in 0..count {
                        let table = received.get_mut(block as usize);
                        // One copy: from the read buffer into guest RAM; the digest is taken
                        // from the same bytes while they are in the cache.
                        let entry = r.read_page_with(block, |page, data| {
                            ram.write_untracked(page * PAGE_SIZE, data)
                                .map_err(Error::memory("loading a page"))?;
                            if let Some(table) = table {
                                table.insert(page, xxh3_64(data));
                            }
                            Ok(())
                        })?;
                        match entry {
                            PageEntry::Data(page) => got.set(page as usize),
                            PageEntry::Zero(page) => {
                                // Read, and written only if not zero: fresh destination RAM is
                                // already zero, and writing zeros would fault in (allocate)
                                // every untouched page (a mostly idle guest then loaded ~10x
                                // slower than the source sends it, and the backlog showed up
                                // as downtime). Reading an untouched page maps the shared zero
                                // page instead.
                                if zero_page_in_place(ram, page, &mut scratch, &zero_page)?
                                    && !got.test(page as usize)
                                {
                                    stats.stale_pages_zeroed += 1;
                                }
                                got.clear(page as usize);
                                if let Some(table) = received.get_mut(block as usize) {
                                    table.remove(&page);
                                }
                                stats.zero_pages += 1;
                                stats.zero_checked_pages += 1;
                            }
                        }
                        stats.pages_received += 1;
                    }
                }
                Record::ZeroRange {
                    block,
                    first_page,
                    npages,
                } => {
                    if in_digests {
                        return Err(Error::UnexpectedRecord("zero range after the digest table"));
                    }
                    let ram = &blocks[block as usize];
                    // Every page is read (in place where the block can: untouched memory reads
                    // through the shared zero page) and only non-zero ones are written. Our own
                    // populated-pages answer is not asked: were it wrong, data this memory held
                    // before the stream would stay where the source has zeros.
                    nonzero.clear();
                    ram.nonzero_pages(first_page, npages, &mut nonzero)
                        .map_err(Error::memory("reading pages received as zero"))?;
                    let got = &mut got_data[block as usize];
                    for &page in &nonzero {
                        ram.write_untracked(page * PAGE_SIZE, &zero_page)
                            .map_err(Error::memory("loading a zero page"))?;
                        if !got.test(page as usize) {
                            stats.stale_pages_zeroed += 1;
                        }
                    }
                    got.clear_range(first_page as usize, npages as usize);
                    stats.zero_checked_pages += npages;
                    if let Some(table) = received.get_mut(block as usize) {
                        let end = first_page + npages;
                        let gone: Vec<u64> =
                            table.range(first_page..end).map(|(p, _)| *p).collect();
                        for page in gone {
                            table.remove(&page);
                        }
                    }
                    stats.zero_range_pages += npages;
                }
                Record::State(blob) => {
                    if in_digests {
                        return Err(Error::UnexpectedRecord(
                            "state record after the digest table",
                        ));
                    }
                    if state.len() as u32 >= stream::MAX_STATE_BLOBS {
                        return Err(Error::TooLarge {
                            what: "state blob count",
                            value: state.len() as u64 + 1,
                            limit: stream::MAX_STATE_BLOBS.into(),
                        });
                    }
                    state_bytes += blob.data.len() as u64;
                    if state_bytes > stream::MAX_STATE_TOTAL_BYTES {
                        return Err(Error::TooLarge {
                            what: "total state size",
                            value: state_bytes,
                            limit: stream::MAX_STATE_TOTAL_BYTES,
                        });
                    }
                    state.push(blob);
                    stats.state_blobs += 1;
                }
                Record::Digests {
                    block,
                    digests: table,
                } => {
                    if !full {
                        return Err(Error::UnexpectedRecord(
                            "digest table in a stream verified after resuming",
                        ));
                    }
                    in_digests = true;
                    let slot = &mut digests[block as usize];
                    if slot.is_some() {
                        return Err(Error::UnexpectedRecord(
                            "digest table sent twice for one block",
                        ));
                    }
                    *slot = Some(table);
                }
                Record::End { page_records } => {
                    if page_records != stats.pages_received {
                        return Err(Error::Malformed(
                            "end marker page count (page records lost or added)",
                        ));
                    }
                    break;
                }
            }
        }
        if !full {
            return Ok(state);
        }
        // Strict: hash all of our RAM and compare with the source's table before anything resumes.
        let t = Instant::now();
        let threads = hash_threads();
        for (ram, table) in blocks.iter().zip(digests) {
            let table = table.ok_or_else(|| Error::MissingDigests(ram.name().to_string()))?;
            let local = page_digests(ram, threads)?;
            let mut bad = local
                .iter()
                .zip(&table)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i as u64);
            if let Some(page) = bad.next() {
                return Err(Error::DigestMismatch {
                    block: ram.name().to_string(),
                    page,
                    mismatched: 1 + bad.count() as u64,
                });
            }
        }
        stats.verify_ms = t.elapsed().as_secs_f64() * 1000.0;
        Ok(state)
    }
}

/// Pages that differ between the source's final memory and ours at switchover.
struct Mismatches {
    count: u64,
    /// The first few, as `block page N`.
    first: Vec<String>,
}

impl Mismatches {
    fn push(&mut self, block: &str, page: u64) {
        self.count += 1;
        if self.first.len() < 8 {
            self.first.push(format!("{block} page {page}"));
        }
    }
}

/// Makes `page` of `ram` zero, writing only when it is not (see the zero-page record in `load`
/// for why); returns whether it wrote. `scratch` holds one page; `zero_page` is a page of zeros.
fn zero_page_in_place<B: MigrationBlock>(
    ram: &B,
    page: u64,
    scratch: &mut [u8; PAGE_SIZE as usize],
    zero_page: &[u8],
) -> Result<bool> {
    ram.read(page * PAGE_SIZE, &mut scratch[..])
        .map_err(Error::memory("reading a page"))?;
    if is_zero_page(scratch) {
        return Ok(false);
    }
    ram.write_untracked(page * PAGE_SIZE, zero_page)
        .map_err(Error::memory("loading a zero page"))?;
    Ok(true)
}

/// Read the source's final digests (verify records) and compare them with the pages as received:
/// a page listed with another digest, or not received as data, differs; a page received as data
/// that the source does not list (zero there) differs too.
fn verify_after_resume<R: Read, B: MigrationBlock>(
    r: &mut StreamReader<R>,
    blocks: &[B],
    mut received: Vec<BTreeMap<u64, u64>>,
) -> Result<Mismatches> {
    let mut bad = Mismatches {
        count: 0,
        first: Vec::new(),
    };
    let mut entries = Vec::new();
    let mut total = 0u64;
    loop {
        entries.clear();
        match r.next_verify(&mut entries)? {
            VerifyRecord::Entries { block } => {
                let table = &mut received[block as usize];
                for &(page, digest) in &entries {
                    if table.remove(&page) != Some(digest) {
                        bad.push(blocks[block as usize].name(), page);
                    }
                }
                total += entries.len() as u64;
            }
            VerifyRecord::End { entries } => {
                if entries != total {
                    return Err(Error::Malformed(
                        "verify end entry count (verify records lost or added)",
                    ));
                }
                break;
            }
        }
    }
    for (block, table) in blocks.iter().zip(&received) {
        let mut left: Vec<u64> = table.keys().copied().collect();
        left.sort_unstable();
        for page in left {
            bad.push(block.name(), page);
        }
    }
    Ok(bad)
}

/// Send the verdict (see [`stream::VERDICT_MAGIC`]).
fn send_verdict(
    w: &mut dyn Write,
    mismatched: u64,
    resumed_at_unix_ns: u64,
) -> std::io::Result<()> {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(&stream::VERDICT_MAGIC.to_le_bytes());
    let status = if mismatched == 0 {
        stream::VERDICT_OK
    } else {
        stream::VERDICT_MISMATCH
    };
    b[4..8].copy_from_slice(&status.to_le_bytes());
    b[8..16].copy_from_slice(&mismatched.to_le_bytes());
    b[16..].copy_from_slice(&resumed_at_unix_ns.to_le_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// Read the source's confirmation (see [`stream::FLAG_CONFIRM`]) within `timeout`.
fn wait_confirm(
    reader: &mut BufReader<Box<dyn crate::TransportRead>>,
    timeout: Duration,
) -> Result<()> {
    let failed = |why: String| Error::NotConfirmed(why);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failed(format!("no confirmation within {timeout:?}")));
        }
        reader
            .get_mut()
            .set_read_timeout(Some(left))
            .map_err(Error::io("waiting for the confirmation"))?;
        match reader.read(&mut buf[got..]) {
            Ok(0) => return Err(failed("the source closed the connection".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != stream::CONFIRM_MAGIC || buf[4..] != [0; 4] {
        return Err(failed(format!("bad confirmation {buf:02x?}")));
    }
    Ok(())
}

fn send_ack(w: &mut dyn Write, status: u32) -> std::io::Result<()> {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&stream::ACK_MAGIC.to_le_bytes());
    b[4..].copy_from_slice(&status.to_le_bytes());
    w.write_all(&b)?;
    w.flush()
}
