// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The listeners: registering and unregistering them, and telling them, in priority order, what a
//! topology change did to the sections (`State::update_topology`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::{MemorySystem, State};
use crate::{DirtyClients, DirtyMemory, Error, ListenerError, MemoryListener, Result, Section};

/// A registered listener and its place in the call order.
pub(super) struct ListenerEntry {
    pub(super) listener: Arc<dyn MemoryListener>,
    pub(super) priority: i32,
}

impl fmt::Debug for ListenerEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerEntry")
            .field("name", &self.listener.name())
            .field("priority", &self.priority)
            .finish()
    }
}

/// Wrap a listener's error with its name and the hook.
pub(super) fn hook(
    entry: &ListenerEntry,
    hook: &'static str,
    result: std::result::Result<(), ListenerError>,
) -> Result<()> {
    result.map_err(|source| Error::Listener {
        listener: entry.listener.name().to_owned(),
        hook,
        source,
    })
}

/// Keep the first error of a sequence of notifications that must all run.
pub(super) fn keep_first(first: &mut Option<Error>, result: Result<()>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "memory listener failed");
        first.get_or_insert(e);
    }
}

/// The result of a hook that syncs a logging section one last time (`region_del`, `log_stop`).
///
/// If it failed, the listener's dirty bits since its previous sync are lost: mark every page of the
/// section dirty for every client in `clients` (the clients that were logging it), so the whole
/// section is resent and nothing is lost. The error is still returned.
pub(super) fn final_sync(
    result: Result<()>,
    dirty: &DirtyMemory,
    section: &Section,
    clients: DirtyClients,
) -> Result<()> {
    if result.is_err() && !clients.is_empty() {
        dirty.set_dirty_range_for(clients, section.ram_first_page(), section.pages());
        tracing::warn!(
            guest_addr = section.guest_addr,
            pages = section.pages(),
            ?clients,
            "last sync of a logging section failed: the whole section is marked dirty"
        );
    }
    result
}

impl State {
    /// Re-flatten and tell the listeners what changed: deletions (listeners in descending order),
    /// logging changes, then additions (ascending). All notifications run even if one fails (so
    /// every listener stays consistent with the new view); the first error is returned.
    ///
    /// A `region_del` or `log_stop` that fails for a logging section marks the whole section dirty
    /// for the clients that were logging it (see [`final_sync`]).
    pub(super) fn update_topology(&mut self, dirty: &DirtyMemory) -> Result<()> {
        let active = self.logging_clients();
        // Host-side writes start reaching a newly logging client before the accelerator starts
        // logging for it: both are dirty sources and a page marked early is merely sent twice.
        dirty.set_active_clients(active.union(dirty.active_clients()));

        let new = self.tree.flatten(self.global_clients());
        let old = std::mem::take(&mut self.sections);
        let old_logs: HashMap<_, DirtyClients> = old.iter().map(|s| (s.key(), s.log)).collect();
        let new_keys: HashMap<_, ()> = new.iter().map(|s| (s.key(), ())).collect();
        let mut first = None;

        for s in old.iter().filter(|s| !new_keys.contains_key(&s.key())) {
            for l in self.listeners.iter().rev() {
                let r = hook(l, "region_del", l.listener.region_del(s, dirty));
                keep_first(&mut first, final_sync(r, dirty, s, s.log));
            }
        }
        for s in &new {
            let Some(&old_log) = old_logs.get(&s.key()) else {
                continue;
            };
            if !old_log.minus(s.log).is_empty() {
                for l in self.listeners.iter().rev() {
                    let r = hook(l, "log_stop", l.listener.log_stop(s, old_log, s.log, dirty));
                    keep_first(&mut first, final_sync(r, dirty, s, old_log));
                }
            }
            if !s.log.minus(old_log).is_empty() {
                for l in &self.listeners {
                    keep_first(
                        &mut first,
                        hook(l, "log_start", l.listener.log_start(s, old_log, s.log)),
                    );
                }
            }
        }
        for s in new.iter().filter(|s| !old_logs.contains_key(&s.key())) {
            for l in &self.listeners {
                keep_first(&mut first, hook(l, "region_add", l.listener.region_add(s)));
            }
        }
        self.sections = new;
        self.reindex();
        dirty.set_active_clients(active);
        first.map_or(Ok(()), Err)
    }
}

impl MemorySystem {
    /// Register a listener; it is replayed `region_add` (and logging state) for existing sections.
    ///
    /// Replay: `log_global_start` if global logging is on, then `region_add` for every section (whose
    /// `log` field carries its logging state).
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] if the replay fails; the listener is then not registered.
    ///
    /// # Examples
    ///
    /// See [`MemoryListener`].
    pub fn register_listener(&self, listener: Arc<dyn MemoryListener>) -> Result<()> {
        let mut st = self.write();
        let entry = ListenerEntry {
            priority: listener.priority(),
            listener,
        };
        if st.global_logging {
            hook(
                &entry,
                "log_global_start",
                entry.listener.log_global_start(),
            )?;
        }
        for s in &st.sections {
            hook(&entry, "region_add", entry.listener.region_add(s))?;
        }
        // After every entry of lower or equal priority: ties keep registration order.
        let at = st
            .listeners
            .partition_point(|e| e.priority <= entry.priority);
        st.listeners.insert(at, entry);
        Ok(())
    }

    /// Unregister a listener: it sees `region_del` for every section (so it syncs one last time and
    /// drops its memslots), then `log_global_stop` if global logging is on.
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] if a hook fails (the listener is unregistered anyway). Unregistering a
    /// listener that is not registered is [`Error::UnknownListener`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use clearlog_memory::{MemoryListener, MemorySystem};
    ///
    /// struct Nop;
    /// impl MemoryListener for Nop {}
    ///
    /// let mem = MemorySystem::with_ram_capacity(1 << 24);
    /// let l: Arc<dyn MemoryListener> = Arc::new(Nop);
    /// mem.register_listener(l.clone()).unwrap();
    /// mem.unregister_listener(&l).unwrap();
    /// assert!(mem.unregister_listener(&l).is_err());
    /// ```
    pub fn unregister_listener(&self, listener: &Arc<dyn MemoryListener>) -> Result<()> {
        let mut st = self.write();
        let at = st
            .listeners
            .iter()
            .position(|e| std::ptr::addr_eq(Arc::as_ptr(&e.listener), Arc::as_ptr(listener)))
            .ok_or(Error::UnknownListener)?;
        let entry = st.listeners.remove(at);
        let mut first = None;
        for s in st.sections.iter().rev() {
            let r = hook(
                &entry,
                "region_del",
                entry.listener.region_del(s, &self.dirty),
            );
            keep_first(&mut first, final_sync(r, &self.dirty, s, s.log));
        }
        if st.global_logging {
            keep_first(
                &mut first,
                hook(&entry, "log_global_stop", entry.listener.log_global_stop()),
            );
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::super::recorder::Recorder;
    use super::*;

    #[test]
    fn listeners_run_by_priority_additions_up_removals_down() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0x10_0000, 1 << 20).unwrap();
        let late = Arc::new(Recorder::new("late", 10));
        let early = Arc::new(Recorder::new("early", 0));
        let tie = Arc::new(Recorder::new("tie", 10));
        for r in [&late, &early, &tie] {
            mem.register_listener(r.clone()).unwrap(); // replays region_add
        }
        let all = || {
            [&early, &late, &tie]
                .iter()
                .flat_map(|r| r.calls.lock().unwrap().drain(..).collect::<Vec<_>>())
                .count()
        };
        assert_eq!(all(), 3, "each got its replay");
        mem.add_ram("more", 0x40_0000, 1 << 20).unwrap();
        mem.remove_region(mem.sections()[1].region).unwrap();
        // The first additions go to the lowest priority, ties in registration order.
        assert_eq!(
            early.calls(),
            ["early:region_add@0x400000", "early:region_del@0x400000"]
        );
        assert_eq!(
            late.calls(),
            ["late:region_add@0x400000", "late:region_del@0x400000"]
        );
        let l: Arc<dyn MemoryListener> = late.clone();
        mem.unregister_listener(&l).unwrap();
        assert_eq!(late.calls().last().unwrap(), "late:region_del@0x100000");
        assert!(matches!(
            mem.unregister_listener(&l),
            Err(Error::UnknownListener)
        ));
    }

    #[test]
    fn a_failed_final_sync_marks_the_whole_section_for_its_clients() {
        let mem = MemorySystem::with_ram_capacity(1 << 24);
        mem.add_ram("ram", 0, 1 << 20).unwrap();
        let section = mem.sections().remove(0);
        let clients = DirtyClients::NONE.with(crate::DirtyClient::Migration);
        let failed = Err(Error::UnknownListener);
        assert!(final_sync(failed, mem.dirty(), &section, clients).is_err());
        let map = mem.dirty().client(crate::DirtyClient::Migration);
        assert_eq!(map.count_ones() as u64, section.pages());
        // A success marks nothing.
        map.clear_all();
        final_sync(Ok(()), mem.dirty(), &section, clients).unwrap();
        assert_eq!(map.count_ones(), 0);
    }
}
