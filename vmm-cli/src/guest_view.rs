// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest's own view of a migration's live phase ([`GuestView`]), read by a [`VmControl`]
//! ([`LiveProbe`]) just before the engine pauses the guest.

use std::sync::Mutex;

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
