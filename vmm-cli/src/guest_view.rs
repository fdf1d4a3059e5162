// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest's own view of a migration's live phase ([`GuestView`]), read by a [`VmControl`]
//! ([`LiveProbe`]) just before the engine pauses the guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use clearlog_migration::{BoxError, StateBlob, VmControl};
use clearlog_test_guest::workload::check::loaded_workload;
use clearlog_test_guest::workload::monitor::{achieved_rate, ticks_to_ms, WriteMark};
use clearlog_test_guest::workload::{reset_stall, WorkloadKind as GuestWorkload};
use clearlog_test_guest::Guest;
use vmm_cli::vm_control::GuestControl;

/// The guest's own view of a migration's live phase, from the `random` workload's counter block:
/// the largest gap between two consecutive page writes (any vCPU) and the write rate it achieved,
/// both in guest TSC time, from the migration's start to the moment the engine paused the guest
/// (so the downtime is not in them). `None` for other workloads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuestView {
    /// `guest_max_stall_ms`.
    pub max_stall_ms: Option<f64>,
    /// `guest_write_rate_bytes_per_s`.
    pub write_rate_bytes_per_s: Option<f64>,
}

impl GuestView {
    pub(crate) fn add_to(&self, v: &mut serde_json::Value) {
        if let Some(map) = v.as_object_mut() {
            map.insert("guest_max_stall_ms".into(), self.max_stall_ms.into());
            map.insert(
                "guest_write_rate_bytes_per_s".into(),
                self.write_rate_bytes_per_s.map(|r| r.round() as u64).into(),
            );
        }
    }

    pub(crate) fn print(&self) {
        if let Some(ms) = self.max_stall_ms {
            println!("  guest max stall   {ms:>10.2} ms   (largest gap between two page writes, live phase)");
        }
        if let Some(r) = self.write_rate_bytes_per_s {
            println!(
                "  guest write rate  {:>10.1} MiB/s (achieved, guest clock, live phase)",
                r / (1u64 << 20) as f64
            );
        }
    }
}

/// A [`VmControl`] that reads the guest's view ([`GuestView`]) just before it pauses the guest.
pub(crate) struct LiveProbe<'a> {
    inner: GuestControl<'a>,
    start: Option<Vec<WriteMark>>,
    at_pause: Mutex<Option<(u64, Vec<WriteMark>)>>,
}

impl<'a> LiveProbe<'a> {
    /// Restart the guest's stall measurement now (the migration's start).
    pub(crate) fn start(guest: &'a Guest) -> Self {
        let random = loaded_workload(guest.ram()).ok().flatten() == Some(GuestWorkload::Random);
        let start = random
            .then(|| {
                reset_stall(guest.ram()).ok()?;
                guest.monitor().write_marks().ok()
            })
            .flatten();
        LiveProbe {
            inner: GuestControl(guest),
            start,
            at_pause: Mutex::new(None),
        }
    }

    pub(crate) fn view(&self) -> GuestView {
        let guest = self.inner.0;
        let at = self.at_pause.lock().unwrap_or_else(|p| p.into_inner());
        match (&self.start, &*at) {
            (Some(m0), Some((gap, m1))) => GuestView {
                max_stall_ms: Some(ticks_to_ms(*gap, guest.tsc_khz())),
                write_rate_bytes_per_s: achieved_rate(m0, m1, guest.tsc_khz()),
            },
            _ => GuestView::default(),
        }
    }
}

impl VmControl for LiveProbe<'_> {
    fn pause(&self) -> Result<(), BoxError> {
        if self.start.is_some() {
            let mon = self.inner.0.monitor();
            let mut at = self.at_pause.lock().unwrap_or_else(|p| p.into_inner());
            // The first pause ends the live phase (a failed one resumes and fails the migration).
            if at.is_none() {
                *at = Some((mon.max_gap_ticks()?, mon.write_marks()?));
            }
        }
        self.inner.pause()
    }
    fn resume(&self) -> Result<(), BoxError> {
        self.inner.resume()
    }
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        self.inner.save_state()
    }
}

/// How often [`PostcopyWatch`] reads the guest's counters.
const WATCH_EVERY: Duration = Duration::from_millis(5);

/// The destination guest's own view while it runs with pages missing: from its resume, the
/// `random` workload's counters read every [`WATCH_EVERY`], so the view up to the postcopy
/// phase's end (known only afterwards) can be picked out.
pub(crate) struct PostcopyWatch<'s> {
    stop: &'s AtomicBool,
    thread: ScopedJoinHandle<'s, Vec<Sample>>,
}

/// When (after the resume), the largest stall so far, the write marks.
type Sample = (Duration, u64, Vec<WriteMark>);

impl<'s> PostcopyWatch<'s> {
    /// Start watching `guest` (before it resumes) in `scope` until `stop`; `None` unless it runs
    /// the `random` workload. Reads the counter page, which may be missing: one fault, served
    /// like the guest's own.
    pub(crate) fn start<'e>(
        scope: &'s Scope<'s, 'e>,
        guest: &'e Guest,
        stop: &'s AtomicBool,
    ) -> Option<Self> {
        if loaded_workload(guest.ram()).ok().flatten() != Some(GuestWorkload::Random) {
            return None;
        }
        reset_stall(guest.ram()).ok()?;
        let first = sample(guest, Duration::ZERO)?;
        let thread = scope.spawn(move || {
            let t0 = Instant::now();
            let mut samples = vec![first];
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(WATCH_EVERY);
                samples.extend(sample(guest, t0.elapsed()));
            }
            samples
        });
        Some(PostcopyWatch { stop, thread })
    }

    /// The guest's view from its resume to `until` after it (the postcopy phase's length): its
    /// largest stall and its write rate.
    pub(crate) fn view(self, until: Duration, tsc_khz: u32) -> GuestView {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.join().unwrap_or_default();
        let (Some(first), Some(end)) = (
            samples.first(),
            samples.iter().find(|s| s.0 >= until).or(samples.last()),
        ) else {
            return GuestView::default();
        };
        GuestView {
            max_stall_ms: Some(ticks_to_ms(end.1, tsc_khz)),
            write_rate_bytes_per_s: achieved_rate(&first.2, &end.2, tsc_khz),
        }
    }
}

fn sample(guest: &Guest, at: Duration) -> Option<Sample> {
    let monitor = guest.monitor();
    Some((
        at,
        monitor.max_gap_ticks().ok()?,
        monitor.write_marks().ok()?,
    ))
}
