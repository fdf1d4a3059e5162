// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Findings of the line-by-line review of the dirty-bit path, one test (or two) each, named after
//! the finding. Each failed before its fix.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clearlog_memory::{
    DirtyClient, DirtyClients, DirtyMemory, Error, ListenerError, MemoryListener, MemorySystem,
    Section, PAGE_SIZE,
};
use common::{Call, FakeKvm, ModelKernel, Recorder};

const P: u64 = PAGE_SIZE;
type Journal = Arc<Mutex<Vec<(String, Call)>>>;

fn ones(mem: &MemorySystem, client: DirtyClient) -> Vec<usize> {
    mem.dirty().client(client).iter_ones().collect()
}

fn fail_once(r: &Recorder, hook: &'static str) {
    *r.fail.lock().unwrap() = Some(hook);
}

// Finding 1: a display snapshot before any sync drops its bits.

/// With the model accelerator, a snapshot before any sync of the slot fails in its `log_clear`
/// ("before any log_sync"). The Vga bits of the host-side write must still be there afterwards,
/// and the next snapshot (after a sync) must report the page.
#[test]
fn display_snapshot_before_any_sync_keeps_its_bits() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let kernel = Arc::new(Mutex::new(ModelKernel::default()));
    mem.register_listener(FakeKvm::new(&kernel, true)).unwrap();
    let vram = mem.add_ram("vram", 0, 128 * P).unwrap();
    mem.set_region_logging(vram, DirtyClient::Vga, true)
        .unwrap();
    let block = mem.ram_blocks()[0].clone();
    block.write(3 * P, b"pixel").unwrap();

    let err = mem
        .snapshot_and_clear_dirty(vram, 0, 128 * P, DirtyClient::Vga)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Listener {
                hook: "log_clear",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        ones(&mem, DirtyClient::Vga),
        [3],
        "a snapshot that could not re-arm the accelerator must not take the client's bits"
    );

    // After a sync the snapshot works and still reports the host-side write.
    mem.log_sync(vram).unwrap();
    let snap = mem
        .snapshot_and_clear_dirty(vram, 0, 128 * P, DirtyClient::Vga)
        .unwrap();
    assert!(snap.is_dirty(3 * P));
}

/// The same with a listener whose `log_clear` fails once: nothing is taken, the retry reports
/// exactly the page.
#[test]
fn display_snapshot_with_a_failing_clear_keeps_its_bits() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let kvm = Recorder::new("kvm", 0, &journal);
    mem.register_listener(kvm.clone()).unwrap();
    let vram = mem.add_ram("vram", 0, 128 * P).unwrap();
    mem.set_region_logging(vram, DirtyClient::Vga, true)
        .unwrap();
    mem.ram_blocks()[0].write(70 * P, &[1]).unwrap();

    fail_once(&kvm, "log_clear");
    mem.snapshot_and_clear_dirty(vram, 64 * P, P, DirtyClient::Vga)
        .unwrap_err();
    assert_eq!(ones(&mem, DirtyClient::Vga), [70]);

    let snap = mem
        .snapshot_and_clear_dirty(vram, 64 * P, P, DirtyClient::Vga)
        .unwrap();
    assert_eq!(snap.dirty_offsets().collect::<Vec<_>>(), [70 * P]);
    assert!(ones(&mem, DirtyClient::Vga).is_empty());
}

/// A listener that, while it re-arms a range, sees the guest write page `page` of the section (the
/// write lands in the dirty bitmap, as a concurrent host-side write or fold would).
struct WriteDuringClear {
    dirty: Arc<DirtyMemory>,
    page: u64,
    armed: AtomicBool,
}

impl MemoryListener for WriteDuringClear {
    fn log_clear(&self, s: &Section, _first: u64, _npages: u64) -> Result<(), ListenerError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.dirty
                .client(DirtyClient::Vga)
                .set((s.ram_first_page() + self.page) as usize);
        }
        Ok(())
    }
}

/// The snapshot takes its bits BEFORE re-arming (then the caller reads): a bit that arrives while
/// the accelerator re-arms is not in this snapshot but stays in the client's map, so the next
/// snapshot reads that page again. (Re-arming first would let another client's fold slip a bit
/// into this snapshot for a page the accelerator still holds writable: a later write hidden for
/// good, as the two-clients test on real KVM showed.)
#[test]
fn display_snapshot_takes_before_the_rearm_and_keeps_what_arrives_during_it() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let vram = mem.add_ram("vram", 0, 64 * P).unwrap();
    mem.register_listener(Arc::new(WriteDuringClear {
        dirty: mem.dirty().clone(),
        page: 9,
        armed: AtomicBool::new(true),
    }))
    .unwrap();
    mem.set_region_logging(vram, DirtyClient::Vga, true)
        .unwrap();
    mem.ram_blocks()[0].write(2 * P, &[1]).unwrap();
    let snap = mem
        .snapshot_and_clear_dirty(vram, 0, 64 * P, DirtyClient::Vga)
        .unwrap();
    assert_eq!(snap.dirty_offsets().collect::<Vec<_>>(), [2 * P]);
    assert_eq!(
        ones(&mem, DirtyClient::Vga),
        [9],
        "a bit set during the re-arm must stay for the next snapshot"
    );
}

// Finding 2: a failed final sync on region removal is silent.

/// `region_del` of a logging section fails (its last sync is lost): every page of the section is
/// marked dirty in every client that was logging it, and the error still reaches the caller.
#[test]
fn failed_final_sync_on_region_removal_marks_the_section_dirty() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let kvm = Recorder::new("kvm", 0, &journal);
    mem.register_listener(kvm.clone()).unwrap();
    let _pad = mem.add_ram("pad", 0x1000_0000, 3 * P).unwrap(); // "ram" starts at RAM page 64
    let ram = mem.add_ram("ram", 0, 100 * P).unwrap();
    let alias = mem
        .add_alias("alias", ram, 20 * P, 10 * P, 0x4000_0000, 0)
        .unwrap();
    mem.set_region_logging(ram, DirtyClient::Vga, true).unwrap();
    mem.log_global_start().unwrap();
    assert!(ones(&mem, DirtyClient::Migration).is_empty());

    // An alias goes away: its window of the block is resent.
    fail_once(&kvm, "region_del");
    let err = mem.remove_region(alias).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Listener {
                hook: "region_del",
                ..
            }
        ),
        "{err}"
    );
    let window: Vec<usize> = (64 + 20..64 + 30).collect();
    assert_eq!(ones(&mem, DirtyClient::Migration), window);
    assert_eq!(ones(&mem, DirtyClient::Vga), window);
    assert!(ones(&mem, DirtyClient::Code).is_empty());
    for c in DirtyClient::ALL {
        mem.dirty().client(c).clear_all();
    }

    // The RAM region is unmapped (a remap during migration): the whole region is resent.
    fail_once(&kvm, "region_del");
    assert!(mem.unmap_region(ram).is_err());
    let all: Vec<usize> = (64..164).collect();
    assert_eq!(ones(&mem, DirtyClient::Migration), all);
    assert_eq!(ones(&mem, DirtyClient::Vga), all);
    assert!(ones(&mem, DirtyClient::Code).is_empty());
}

/// A section that did not log loses nothing when its `region_del` fails: nothing is marked.
#[test]
fn failed_region_del_of_a_section_that_did_not_log_marks_nothing() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let kvm = Recorder::new("kvm", 0, &journal);
    mem.register_listener(kvm.clone()).unwrap();
    let ram = mem.add_ram("ram", 0, 64 * P).unwrap();
    fail_once(&kvm, "region_del");
    assert!(mem.unmap_region(ram).is_err());
    for c in DirtyClient::ALL {
        assert!(ones(&mem, c).is_empty());
    }
}

/// `log_stop` fails (the last sync before logging goes off): the section is marked for the clients
/// that were logging it; for Vga's stop and for the global stop.
#[test]
fn failed_final_sync_on_log_stop_marks_the_section_dirty() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let kvm = Recorder::new("kvm", 0, &journal);
    mem.register_listener(kvm.clone()).unwrap();
    let vram = mem.add_ram("vram", 0, 70 * P).unwrap();
    mem.set_region_logging(vram, DirtyClient::Vga, true)
        .unwrap();

    fail_once(&kvm, "log_stop");
    let err = mem
        .set_region_logging(vram, DirtyClient::Vga, false)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Listener {
                hook: "log_stop",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(ones(&mem, DirtyClient::Vga), (0..70).collect::<Vec<_>>());
    assert!(ones(&mem, DirtyClient::Migration).is_empty());
    mem.dirty().client(DirtyClient::Vga).clear_all();

    mem.log_global_start().unwrap();
    fail_once(&kvm, "log_stop");
    assert!(mem.log_global_stop().is_err());
    assert!(!mem.global_logging());
    assert_eq!(
        ones(&mem, DirtyClient::Migration),
        (0..70).collect::<Vec<_>>()
    );
    assert!(ones(&mem, DirtyClient::Vga).is_empty());
}

/// Unregistering a listener whose last `region_del` sync fails: the same rule.
#[test]
fn failed_final_sync_on_unregister_marks_the_section_dirty() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let kvm = Recorder::new("kvm", 0, &journal);
    mem.register_listener(kvm.clone()).unwrap();
    mem.add_ram("ram", 0, 64 * P).unwrap();
    mem.log_global_start().unwrap();
    fail_once(&kvm, "region_del");
    let l: Arc<dyn MemoryListener> = kvm;
    assert!(mem.unregister_listener(&l).is_err());
    assert_eq!(
        ones(&mem, DirtyClient::Migration),
        (0..64).collect::<Vec<_>>()
    );
}

// Finding 3: a failed `log_start` leaves logging marked on.

fn take(journal: &Journal) -> Vec<(String, Call)> {
    journal.lock().unwrap().drain(..).collect()
}

/// Global logging: listener "b" refuses `log_start` for the first section. Everything goes back:
/// "a" (already started for that section) gets the matching `log_stop`, both get
/// `log_global_stop`, global logging, the sections' logs and the active clients are as before.
/// A retry after "b" recovers really starts logging.
#[test]
fn failed_log_start_rolls_back_global_logging() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let a = Recorder::new("a", 0, &journal);
    let b = Recorder::new("b", 10, &journal);
    mem.register_listener(a).unwrap();
    mem.register_listener(b.clone()).unwrap();
    mem.add_ram("low", 0, 64 * P).unwrap();
    mem.add_ram("high", 0x1_0000_0000, 64 * P).unwrap();
    take(&journal);

    fail_once(&b, "log_start");
    let err = mem.log_global_start().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Listener {
                hook: "log_start",
                ..
            }
        ),
        "{err}"
    );
    assert!(!mem.global_logging());
    assert!(mem.sections().iter().all(|s| s.log.is_empty()));
    assert_eq!(mem.dirty().active_clients(), DirtyClients::NONE);
    let calls = take(&journal);
    let who_what: Vec<(&str, &Call)> = calls.iter().map(|(w, c)| (w.as_str(), c)).collect();
    assert_eq!(
        who_what,
        [
            ("a", &Call::GlobalStart),
            ("b", &Call::GlobalStart),
            ("a", &Call::Start(0, 0, 1)),
            // b refused Start(0, 0, 1): roll back.
            ("a", &Call::Stop(0, 1, 0)),
            ("b", &Call::GlobalStop),
            ("a", &Call::GlobalStop),
        ]
    );

    // Host-side writes no longer reach Migration.
    mem.ram_blocks()[0].write(0, &[1]).unwrap();
    assert!(ones(&mem, DirtyClient::Migration).is_empty());

    // The retry starts logging for real: b sees log_start.
    mem.log_global_start().unwrap();
    assert!(mem.global_logging());
    let calls = take(&journal);
    assert!(calls.contains(&("b".into(), Call::Start(0, 0, 1))));
    assert!(calls.contains(&("b".into(), Call::Start(0x1_0000_0000, 0, 1))));
    assert!(mem
        .sections()
        .iter()
        .all(|s| s.log.contains(DirtyClient::Migration)));
}

/// Per-region logging: the same rule for `set_region_logging`.
#[test]
fn failed_log_start_rolls_back_region_logging() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    let a = Recorder::new("a", 0, &journal);
    let b = Recorder::new("b", 10, &journal);
    mem.register_listener(a).unwrap();
    mem.register_listener(b.clone()).unwrap();
    let vram = mem.add_ram("vram", 0, 64 * P).unwrap();
    take(&journal);

    fail_once(&b, "log_start");
    assert!(mem
        .set_region_logging(vram, DirtyClient::Vga, true)
        .is_err());
    assert!(mem.sections().iter().all(|s| s.log.is_empty()));
    assert_eq!(mem.dirty().active_clients(), DirtyClients::NONE);
    assert!(matches!(
        mem.log_sync(vram),
        Ok(()) // nothing logs: no listener is asked
    ));
    assert!(matches!(
        mem.snapshot_and_clear_dirty(vram, 0, 64 * P, DirtyClient::Vga),
        Err(Error::LoggingOff { .. })
    ));
    let calls = take(&journal);
    assert_eq!(
        calls,
        [
            ("a".to_owned(), Call::Start(0, 0, 2)),
            ("a".to_owned(), Call::Stop(0, 2, 0)),
        ]
    );

    mem.set_region_logging(vram, DirtyClient::Vga, true)
        .unwrap();
    let calls = take(&journal);
    assert_eq!(
        calls,
        [
            ("a".to_owned(), Call::Start(0, 0, 2)),
            ("b".to_owned(), Call::Start(0, 0, 2)),
        ]
    );
    assert!(mem.sections()[0].log.contains(DirtyClient::Vga));
}

/// An accelerator (the model KVM) that refuses its first `log_start`.
struct FlakyStart {
    kvm: Arc<FakeKvm>,
    refuse: AtomicBool,
}

impl MemoryListener for FlakyStart {
    fn region_add(&self, s: &Section) -> Result<(), ListenerError> {
        self.kvm.region_add(s)
    }
    fn region_del(&self, s: &Section, d: &DirtyMemory) -> Result<(), ListenerError> {
        self.kvm.region_del(s, d)
    }
    fn log_start(
        &self,
        s: &Section,
        old: DirtyClients,
        new: DirtyClients,
    ) -> Result<(), ListenerError> {
        if self.refuse.swap(false, Ordering::SeqCst) {
            return Err("slot table busy".into());
        }
        self.kvm.log_start(s, old, new)
    }
    fn log_stop(
        &self,
        s: &Section,
        old: DirtyClients,
        new: DirtyClients,
        d: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        self.kvm.log_stop(s, old, new, d)
    }
    fn log_sync(&self, s: &Section, d: &DirtyMemory) -> Result<(), ListenerError> {
        self.kvm.log_sync(s, d)
    }
    fn log_clear(&self, s: &Section, first: u64, n: u64) -> Result<(), ListenerError> {
        self.kvm.log_clear(s, first, n)
    }
}

/// With an accelerator: after its `log_start` failed, a retry really turns KVM logging on and the
/// guest's writes are reported.
#[test]
fn failed_log_start_then_retry_really_logs() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let kernel = Arc::new(Mutex::new(ModelKernel::default()));
    mem.register_listener(Arc::new(FlakyStart {
        kvm: FakeKvm::new(&kernel, true),
        refuse: AtomicBool::new(true),
    }))
    .unwrap();
    let vram = mem.add_ram("vram", 0, 64 * P).unwrap();
    assert!(mem
        .set_region_logging(vram, DirtyClient::Vga, true)
        .is_err());
    assert!(!kernel.lock().unwrap().slots[&0].logging);

    mem.set_region_logging(vram, DirtyClient::Vga, true)
        .unwrap();
    assert!(kernel.lock().unwrap().slots[&0].logging);
    mem.log_sync(vram).unwrap(); // INITIALLY_SET: everything
    mem.snapshot_and_clear_dirty(vram, 0, 64 * P, DirtyClient::Vga)
        .unwrap();
    kernel.lock().unwrap().guest_write(0, 12);
    mem.log_sync(vram).unwrap();
    let snap = mem
        .snapshot_and_clear_dirty(vram, 0, 64 * P, DirtyClient::Vga)
        .unwrap();
    assert_eq!(snap.dirty_offsets().collect::<Vec<_>>(), [12 * P]);
}

// Finding 4: RAM layout changes during a migration are refused up front, remaps are allowed.

fn assert_migration_in_progress<T: std::fmt::Debug>(r: clearlog_memory::Result<T>, what: &str) {
    match r {
        Err(e @ Error::MigrationInProgress { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(what), "{msg}");
            assert!(msg.contains("stop or finish the migration first"), "{msg}");
        }
        other => panic!("expected MigrationInProgress for {what}, got {other:?}"),
    }
}

/// While global logging is on, every way to add a RAM block and removing a RAM region is refused
/// with `MigrationInProgress`, and nothing changes (blocks, sections, listener calls, bitmaps).
#[test]
fn ram_layout_changes_during_migration_are_refused() {
    use clearlog_memory::{DirtyBitmap, RamBacking};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    mem.register_listener(Recorder::new("kvm", 0, &journal))
        .unwrap();
    let ram = mem.add_ram("ram", 0, 64 * P).unwrap();
    let spare = mem.create_ram("spare", 16 * P).unwrap();
    mem.log_global_start().unwrap();
    journal.lock().unwrap().clear();
    let sections = |m: &MemorySystem| -> Vec<(u64, u64, u8)> {
        m.sections()
            .iter()
            .map(|s| (s.guest_addr, s.size, s.log.bits()))
            .collect()
    };
    let before = sections(&mem);

    assert_migration_in_progress(mem.add_ram("hotplug", 1 << 30, 64 * P), "add a RAM block");
    assert_migration_in_progress(mem.create_ram("hotplug", 64 * P), "add a RAM block");
    assert_migration_in_progress(
        mem.add_ram_backed("hotplug", 1 << 30, 64 * P, RamBacking::Anonymous),
        "add a RAM block",
    );
    assert_migration_in_progress(
        mem.create_ram_backed("hotplug", 64 * P, RamBacking::Anonymous),
        "add a RAM block",
    );
    let gm =
        GuestMemoryMmap::<DirtyBitmap>::from_ranges(&[(GuestAddress(1 << 30), 0x10_0000)]).unwrap();
    assert_migration_in_progress(mem.add_guest_memory(&gm), "add a RAM block");
    assert!(
        !gm.iter().next().unwrap().get_mmap().bitmap().is_attached(),
        "a refused adoption attaches nothing"
    );
    assert_migration_in_progress(mem.remove_region(ram), "remove a RAM region");
    assert_migration_in_progress(mem.remove_region(spare), "remove a RAM region");

    let names: Vec<String> = mem
        .ram_blocks()
        .iter()
        .map(|b| b.name().to_owned())
        .collect();
    assert_eq!(names, ["ram", "spare"]);
    assert_eq!(sections(&mem), before);
    assert!(journal.lock().unwrap().is_empty(), "listeners saw nothing");
    assert!(mem.global_logging());

    // After the migration the same changes work.
    mem.log_global_stop().unwrap();
    mem.add_ram("hotplug", 1 << 30, 64 * P).unwrap();
    mem.remove_region(spare).unwrap();
    mem.add_guest_memory(&gm).unwrap_err(); // overlaps "hotplug": an ordinary error now
}

/// Remaps of existing RAM and alias changes stay allowed during a migration: the accelerator
/// follows them (`region_del` with a final sync, `region_add` with logging already on).
#[test]
fn remaps_and_aliases_during_migration_are_allowed() {
    let mem = MemorySystem::with_ram_capacity(4096 * P);
    let journal: Journal = Arc::default();
    mem.register_listener(Recorder::new("kvm", 0, &journal))
        .unwrap();
    let ram = mem.add_ram("ram", 0, 64 * P).unwrap();
    let rom = mem.create_ram("rom", 4 * P).unwrap();
    mem.log_global_start().unwrap();
    take(&journal);

    mem.unmap_region(ram).unwrap();
    mem.map_region(ram, 0x10_0000, 0).unwrap();
    mem.map_region(rom, 0xf_0000, 0).unwrap();
    mem.unmap_region(rom).unwrap();
    let alias = mem.add_alias("hi", ram, 0, 16 * P, 1 << 32, 0).unwrap();
    mem.remove_region(alias).unwrap();
    let calls: Vec<Call> = take(&journal).into_iter().map(|(_, c)| c).collect();
    assert_eq!(
        calls,
        [
            Call::Del(0),
            Call::Add(0x10_0000, 64 * P, 1),
            Call::Add(0xf_0000, 4 * P, 1),
            Call::Del(0xf_0000),
            Call::Add(1 << 32, 16 * P, 1),
            Call::Del(1 << 32),
        ]
    );
    assert_eq!(mem.ram_blocks().len(), 2);
    assert!(mem.global_logging());
}
