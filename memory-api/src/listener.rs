// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `MemoryListener` trait: how accelerators follow the memory map and dirty logging.

use crate::{DirtyClients, DirtyMemory, ListenerError, Section};

/// Hooks called by [`crate::MemorySystem`] when the memory map or dirty logging changes.
/// All hooks default to no-ops. Listeners are called in ascending `priority()` order for
/// additions/starts and in descending order for removals/stops.
///
/// Ties in priority keep registration order (reversed for removals/stops).
///
/// # Calling context
///
/// - `region_add`, `region_del`, `log_start`, `log_stop`, `log_global_start` and `log_global_stop`
///   run with the memory system's topology lock held for writing: they never run concurrently with
///   each other or with `log_sync`/`log_clear`.
/// - `log_sync` and `log_clear` run with the lock held for reading: a migration thread and a display
///   thread may call them concurrently, so a listener guards its own state (e.g. one slots lock).
/// - A hook must not call back into the `MemorySystem` that called it (it would wait on the lock
///   its caller holds). Everything a hook needs comes in its arguments.
///
/// # Logging state
///
/// `section.log` is always the section's current logging set. A section that appears with logging
/// already on (hotplug during migration, listener replay) gets only `region_add`, whose
/// `section.log` says so; `log_start`/`log_stop` are for sections that stay while their set changes.
///
/// # Examples
///
/// A listener that counts the pages it is told to re-arm:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use clearlog_memory::{ListenerError, MemoryListener, MemorySystem, Section};
///
/// #[derive(Default)]
/// struct Counter(AtomicU64);
///
/// impl MemoryListener for Counter {
///     fn name(&self) -> &str {
///         "counter"
///     }
///     fn log_clear(&self, _s: &Section, _first: u64, npages: u64) -> Result<(), ListenerError> {
///         self.0.fetch_add(npages, Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// let mem = MemorySystem::with_ram_capacity(1 << 24);
/// let ram = mem.add_ram("ram", 0, 0x100_000).unwrap();
/// let counter = Arc::new(Counter::default());
/// mem.register_listener(counter.clone()).unwrap();
/// mem.log_global_start().unwrap();
/// mem.clear_dirty_bitmap(ram, 0x1000, 0x3000).unwrap();
/// assert_eq!(counter.0.load(Ordering::Relaxed), 3);
/// ```
pub trait MemoryListener: Send + Sync {
    /// Name used in errors and traces.
    fn name(&self) -> &str {
        "listener"
    }
    /// Order among listeners (lower first when adding).
    fn priority(&self) -> i32 {
        0
    }
    /// A section appeared.
    fn region_add(&self, _section: &Section) -> Result<(), ListenerError> {
        Ok(())
    }
    /// A section is going away. An accelerator that logs it syncs it one last time first.
    ///
    /// If this fails for a section that was logging, the memory system cannot know which pages the
    /// lost sync would have reported: it marks every page of the section dirty for every client
    /// that was logging it (the whole section is resent, nothing is lost) and returns the error to
    /// the caller of the topology change.
    fn region_del(&self, _section: &Section, _dirty: &DirtyMemory) -> Result<(), ListenerError> {
        Ok(())
    }
    /// Logging started on a section for some client (`old` -> `new` client sets).
    fn log_start(
        &self,
        _section: &Section,
        _old: DirtyClients,
        _new: DirtyClients,
    ) -> Result<(), ListenerError> {
        Ok(())
    }
    /// Logging stopped for some client on a section. An accelerator syncs first if logging goes off.
    ///
    /// If this fails, every page of the section is marked dirty for the clients of `old` (as for a
    /// failed [`region_del`](Self::region_del)) and the error is returned to the caller.
    fn log_stop(
        &self,
        _section: &Section,
        _old: DirtyClients,
        _new: DirtyClients,
        _dirty: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        Ok(())
    }
    /// Global logging (migration) started.
    fn log_global_start(&self) -> Result<(), ListenerError> {
        Ok(())
    }
    /// Global logging (migration) stopped.
    fn log_global_stop(&self) -> Result<(), ListenerError> {
        Ok(())
    }
    /// Collect the accelerator's dirty bits for `section` into `dirty` (fold into `section.log`).
    /// In manual-protect mode nothing is cleared here; a legacy accelerator may clear while collecting.
    fn log_sync(&self, _section: &Section, _dirty: &DirtyMemory) -> Result<(), ListenerError> {
        Ok(())
    }
    /// Re-arm dirty tracking for pages `[first_page, first_page + npages)` of `section`
    /// (page numbers relative to the section start). Only bits the accelerator itself saw set
    /// since the last sync may be cleared.
    ///
    /// The range is exact (not widened): widening to the ioctl's 64-page granularity, with zeros in
    /// the widened parts, is the accelerator's job.
    fn log_clear(
        &self,
        _section: &Section,
        _first_page: u64,
        _npages: u64,
    ) -> Result<(), ListenerError> {
        Ok(())
    }
}
