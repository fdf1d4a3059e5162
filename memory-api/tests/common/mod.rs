// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Test doubles: a recording listener, a model of the kernel's dirty log in manual-protect mode, and
//! a fake KVM accelerator (with and without the per-slot cache of docs/design.md section 2).

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clearlog_memory::{DirtyClients, DirtyMemory, ListenerError, MemoryListener, Section};

/// One hook call, as seen by [`Recorder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `region_add(guest_addr, size, log)`
    Add(u64, u64, u8),
    /// `region_del(guest_addr)`
    Del(u64),
    /// `log_start(guest_addr, old, new)`
    Start(u64, u8, u8),
    /// `log_stop(guest_addr, old, new)`
    Stop(u64, u8, u8),
    /// `log_global_start`
    GlobalStart,
    /// `log_global_stop`
    GlobalStop,
    /// `log_sync(guest_addr)`
    Sync(u64),
    /// `log_clear(section guest_addr, first_page, npages)`
    Clear(u64, u64, u64),
}

/// A listener that records every call, tagged with its own name, into a shared journal.
pub struct Recorder {
    pub name: String,
    pub priority: i32,
    pub journal: Arc<Mutex<Vec<(String, Call)>>>,
    /// Fail this hook (by name) once.
    pub fail: Mutex<Option<&'static str>>,
}

impl Recorder {
    pub fn new(name: &str, priority: i32, journal: &Arc<Mutex<Vec<(String, Call)>>>) -> Arc<Self> {
        Arc::new(Recorder {
            name: name.into(),
            priority,
            journal: journal.clone(),
            fail: Mutex::new(None),
        })
    }

    fn record(&self, hook: &'static str, call: Call) -> Result<(), ListenerError> {
        let mut fail = self.fail.lock().unwrap();
        if *fail == Some(hook) {
            *fail = None;
            return Err(format!("{hook} refused").into());
        }
        self.journal.lock().unwrap().push((self.name.clone(), call));
        Ok(())
    }
}

impl MemoryListener for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn region_add(&self, s: &Section) -> Result<(), ListenerError> {
        self.record("region_add", Call::Add(s.guest_addr, s.size, s.log.bits()))
    }
    fn region_del(&self, s: &Section, _: &DirtyMemory) -> Result<(), ListenerError> {
        self.record("region_del", Call::Del(s.guest_addr))
    }
    fn log_start(
        &self,
        s: &Section,
        old: DirtyClients,
        new: DirtyClients,
    ) -> Result<(), ListenerError> {
        self.record(
            "log_start",
            Call::Start(s.guest_addr, old.bits(), new.bits()),
        )
    }
    fn log_stop(
        &self,
        s: &Section,
        old: DirtyClients,
        new: DirtyClients,
        _: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        self.record("log_stop", Call::Stop(s.guest_addr, old.bits(), new.bits()))
    }
    fn log_global_start(&self) -> Result<(), ListenerError> {
        self.record("log_global_start", Call::GlobalStart)
    }
    fn log_global_stop(&self) -> Result<(), ListenerError> {
        self.record("log_global_stop", Call::GlobalStop)
    }
    fn log_sync(&self, s: &Section, _: &DirtyMemory) -> Result<(), ListenerError> {
        self.record("log_sync", Call::Sync(s.guest_addr))
    }
    fn log_clear(&self, s: &Section, first: u64, npages: u64) -> Result<(), ListenerError> {
        self.record("log_clear", Call::Clear(s.guest_addr, first, npages))
    }
}

/// The kernel's state of one memslot: a dirty bit and a write-protection flag per page.
#[derive(Debug)]
pub struct KernelSlot {
    pub pages: u64,
    pub logging: bool,
    pub dirty: Vec<bool>,
    pub protected: Vec<bool>,
}

/// A model of KVM's dirty log with `MANUAL_PROTECT_ENABLE | INITIALLY_SET`, slots keyed by guest
/// address.
#[derive(Debug, Default)]
pub struct ModelKernel {
    pub slots: HashMap<u64, KernelSlot>,
}

impl ModelKernel {
    pub fn add_slot(&mut self, guest_addr: u64, pages: u64, logging: bool) {
        let mut slot = KernelSlot {
            pages,
            logging: false,
            dirty: vec![false; pages as usize],
            protected: vec![false; pages as usize],
        };
        set_logging(&mut slot, logging);
        self.slots.insert(guest_addr, slot);
    }

    pub fn remove_slot(&mut self, guest_addr: u64) {
        self.slots.remove(&guest_addr);
    }

    pub fn set_logging(&mut self, guest_addr: u64, on: bool) {
        if let Some(slot) = self.slots.get_mut(&guest_addr) {
            set_logging(slot, on);
        }
    }

    /// A guest store to page `page` of the slot at `guest_addr`: in manual mode the page becomes
    /// dirty (a protected page faults first, which unprotects it).
    pub fn guest_write(&mut self, guest_addr: u64, page: u64) {
        let slot = self
            .slots
            .get_mut(&guest_addr)
            .expect("write to a page with no slot");
        if slot.logging {
            slot.dirty[page as usize] = true;
            slot.protected[page as usize] = false;
        }
    }

    /// `KVM_GET_DIRTY_LOG` in manual mode: a copy, nothing cleared.
    pub fn get_dirty_log(&self, guest_addr: u64) -> Result<Vec<u64>, String> {
        let slot = self.slots.get(&guest_addr).ok_or("EINVAL: no slot")?;
        if !slot.logging {
            return Err("ENOENT: logging off".into());
        }
        let mut words = vec![0u64; slot.pages.div_ceil(64) as usize];
        for (i, _) in slot.dirty.iter().enumerate().filter(|(_, d)| **d) {
            words[i / 64] |= 1 << (i % 64);
        }
        Ok(words)
    }

    /// `KVM_CLEAR_DIRTY_LOG`, with the kernel's argument checks: clears and re-protects only pages
    /// whose bit is set in `mask` AND set in the kernel.
    pub fn clear_dirty_log(
        &mut self,
        guest_addr: u64,
        first: u64,
        npages: u64,
        mask: &[u64],
    ) -> Result<(), String> {
        let slot = self.slots.get_mut(&guest_addr).ok_or("EINVAL: no slot")?;
        if !slot.logging {
            return Err("ENOENT: logging off".into());
        }
        if first % 64 != 0 {
            return Err(format!("EINVAL: first_page {first} not a multiple of 64"));
        }
        if npages % 64 != 0 && first + npages != slot.pages {
            return Err(format!(
                "EINVAL: num_pages {npages} at {first} in a {}-page slot",
                slot.pages
            ));
        }
        if first + npages > slot.pages {
            return Err("EINVAL: past the slot end".into());
        }
        if (mask.len() as u64) < npages.div_ceil(64) {
            return Err("EFAULT: bitmap too short".into());
        }
        for i in 0..npages {
            if mask[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                let p = (first + i) as usize;
                if slot.dirty[p] {
                    slot.dirty[p] = false;
                    slot.protected[p] = true;
                }
            }
        }
        Ok(())
    }
}

fn set_logging(slot: &mut KernelSlot, on: bool) {
    slot.logging = on;
    // INITIALLY_SET: all bits read as 1 and nothing is protected until a clear reaches it.
    slot.dirty.iter_mut().for_each(|d| *d = on);
    slot.protected.iter_mut().for_each(|p| *p = false);
}

/// A fake KVM accelerator over [`ModelKernel`].
///
/// With the cache it follows docs/design.md section 2: `log_sync` GETs into a per-slot cache (replacing
/// it) and folds; `log_clear` sends (cache AND range) widened to 64 pages with zeros outside,
/// clamped at the slot end, and removes exactly the range from the cache; a clear before any sync
/// is an error. Without the cache (`naive`) `log_clear` sends all ones for the range: the design the
/// seed thread rejected.
pub struct FakeKvm {
    pub kernel: Arc<Mutex<ModelKernel>>,
    pub with_cache: bool,
    /// Clients a sync does not fold into (a broken accelerator, for the kit's teeth).
    pub skip_fold: DirtyClients,
    /// All slot state under one lock, like the accelerator's slots lock.
    caches: Mutex<HashMap<u64, Option<Vec<u64>>>>,
}

impl FakeKvm {
    pub fn new(kernel: &Arc<Mutex<ModelKernel>>, with_cache: bool) -> Arc<Self> {
        Self::skipping(kernel, with_cache, DirtyClients::NONE)
    }

    /// A fake whose syncs never fold into `skip_fold`.
    pub fn skipping(
        kernel: &Arc<Mutex<ModelKernel>>,
        with_cache: bool,
        skip_fold: DirtyClients,
    ) -> Arc<Self> {
        Arc::new(FakeKvm {
            kernel: kernel.clone(),
            with_cache,
            skip_fold,
            caches: Mutex::new(HashMap::new()),
        })
    }

    fn sync_locked(
        &self,
        caches: &mut HashMap<u64, Option<Vec<u64>>>,
        s: &Section,
        dirty: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        let words = self.kernel.lock().unwrap().get_dirty_log(s.guest_addr)?;
        let clients = s.log.minus(self.skip_fold);
        dirty.try_fold_bitmap(s.ram_first_page(), &words, s.pages(), clients)?;
        caches.insert(s.guest_addr, Some(words));
        Ok(())
    }
}

impl MemoryListener for FakeKvm {
    fn name(&self) -> &str {
        if self.with_cache {
            "fake-kvm"
        } else {
            "naive-kvm"
        }
    }
    fn region_add(&self, s: &Section) -> Result<(), ListenerError> {
        self.kernel
            .lock()
            .unwrap()
            .add_slot(s.guest_addr, s.pages(), !s.log.is_empty());
        self.caches.lock().unwrap().insert(s.guest_addr, None);
        Ok(())
    }
    fn region_del(&self, s: &Section, dirty: &DirtyMemory) -> Result<(), ListenerError> {
        let mut caches = self.caches.lock().unwrap();
        if !s.log.is_empty() {
            self.sync_locked(&mut caches, s, dirty)?;
        }
        caches.remove(&s.guest_addr);
        self.kernel.lock().unwrap().remove_slot(s.guest_addr);
        Ok(())
    }
    fn log_start(
        &self,
        s: &Section,
        old: DirtyClients,
        _new: DirtyClients,
    ) -> Result<(), ListenerError> {
        if old.is_empty() {
            self.kernel.lock().unwrap().set_logging(s.guest_addr, true);
            self.caches.lock().unwrap().insert(s.guest_addr, None);
        }
        Ok(())
    }
    fn log_stop(
        &self,
        s: &Section,
        old: DirtyClients,
        new: DirtyClients,
        dirty: &DirtyMemory,
    ) -> Result<(), ListenerError> {
        if new.is_empty() {
            let mut caches = self.caches.lock().unwrap();
            let mut last = s.clone();
            last.log = old;
            self.sync_locked(&mut caches, &last, dirty)?;
            caches.insert(s.guest_addr, None);
            self.kernel.lock().unwrap().set_logging(s.guest_addr, false);
        }
        Ok(())
    }
    fn log_sync(&self, s: &Section, dirty: &DirtyMemory) -> Result<(), ListenerError> {
        let mut caches = self.caches.lock().unwrap();
        self.sync_locked(&mut caches, s, dirty)
    }
    fn log_clear(&self, s: &Section, first: u64, npages: u64) -> Result<(), ListenerError> {
        let mut caches = self.caches.lock().unwrap();
        let pages = s.pages();
        if npages == 0 || first + npages > pages {
            return Err(format!("log_clear {first}+{npages} outside a {pages}-page slot").into());
        }
        let start = first & !63;
        let end = (first + npages).next_multiple_of(64).min(pages);
        let mut mask = vec![0u64; (end - start).div_ceil(64) as usize];
        let cache = caches
            .get_mut(&s.guest_addr)
            .ok_or("clear for an unknown slot")?;
        for p in first..first + npages {
            let known = if self.with_cache {
                let cache = cache
                    .as_mut()
                    .ok_or("log_clear before any log_sync of the slot")?;
                let (w, b) = ((p / 64) as usize, p % 64);
                let was = cache[w] >> b & 1 == 1;
                cache[w] &= !(1 << b);
                was
            } else {
                true
            };
            if known {
                let rel = p - start;
                mask[(rel / 64) as usize] |= 1 << (rel % 64);
            }
        }
        self.kernel
            .lock()
            .unwrap()
            .clear_dirty_log(s.guest_addr, start, end - start, &mask)?;
        Ok(())
    }
}

/// A read-write file of `len` bytes that is already unlinked (gone when the last fd closes).
pub fn unlinked_tempfile(tag: &str, len: u64) -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "clearlog-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.set_len(len).unwrap();
    f
}
