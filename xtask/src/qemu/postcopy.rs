// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! QEMU's postcopy row of `cargo xtask qemu-bench` (modes `postcopy` and `postcopy:CHUNK`).
//!
//! Both sides get the `postcopy-ram` capability (the destination before `migrate-incoming`, the
//! source before `migrate`), the source `max-postcopy-bandwidth` equal to `max-bandwidth`:
//! QEMU's postcopy phase is paced by that parameter alone (its default 0 is no limit), while
//! `vmm run --postcopy` keeps the one `--bandwidth` for the whole migration. Everything else is
//! as in clear mode (dirty logging, `downtime-limit`, multifd if asked and supported).
//!
//! **When to switch: after the first pass**, the point `vmm run --postcopy` switches at. QEMU
//! counts dirty-bitmap syncs in `ram.dirty-sync-count`: the first is at setup (the bitmap starts
//! all dirty, the count is 1 as soon as `query-migrate` shows `active`), the second when the
//! first pass has left less than QEMU's switchover threshold (about bandwidth x downtime limit)
//! to send. So the harness polls `query-migrate` every 10 ms and sends `migrate-start-postcopy`
//! at the first answer with status `active` and `dirty-sync-count` >= 2; QEMU switches at its
//! next iteration (the source's `STOP` event). Checked on 7.2.22 and 10.0.13 (the smoke's 512 MiB
//! guest): the first poll shows 1, and at the count of 2 `ram.normal` already exceeded the
//! working set's pages (66,230 and 66,323 for 65,536): the first pass had sent all of it. Had the sync found so little dirty that precopy ends
//! within the downtime limit, QEMU completes without postcopy, as `vmm run --postcopy` does; the
//! run then fails its check (no `postcopy-active`). The JSON keeps the statuses and the sync
//! counts seen, and `query-migrate` at the switch. After the switch, `query-migrate` is polled
//! until `completed`.
//!
//! Postcopy with multifd: QEMU 10.0 refuses the pair ("Postcopy is not yet compatible with
//! multifd"); QEMU 7.2 takes both capabilities without checking them together, but QEMU declared
//! them incompatible until its support came after 10.0. The harness refuses them together, before
//! any run, for QEMU older than 10.1 and says why; a newer QEMU decides for itself, and any
//! refusal of `postcopy-ram` (e.g. no userfaultfd at the destination) names the side and the
//! capability.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Mode, Qmp};

/// The dirty-sync-count that says the first pass is done (1 is the setup sync).
const FIRST_PASS_SYNCS: u64 = 2;

/// The first QEMU that can run postcopy with multifd.
const MULTIFD_POSTCOPY_SINCE: (u32, u32) = (10, 1);

/// Whether a `query-migrate` answer shows the first pass done (see the module documentation).
pub(super) fn first_pass_done(r: &Value) -> bool {
    r["ram"]["dirty-sync-count"]
        .as_u64()
        .is_some_and(|n| n >= FIRST_PASS_SYNCS)
}

/// What the harness saw of a migration while polling `query-migrate`, and the postcopy switch.
#[derive(Debug, Default)]
pub(super) struct Trace {
    /// Distinct statuses, in the order seen.
    statuses: Vec<String>,
    /// Distinct `ram.dirty-sync-count` values, in the order seen.
    sync_counts: Vec<u64>,
    /// Milliseconds from `migrate` to `migrate-start-postcopy`, and `query-migrate` then.
    switch: Option<(f64, Value)>,
    /// What QEMU answered `migrate-start-postcopy`, if it refused.
    start_error: Option<String>,
}

impl Trace {
    /// Notes one `query-migrate` answer.
    pub(super) fn record(&mut self, r: &Value) {
        let status = r["status"].as_str();
        if status.is_some() && self.statuses.last().map(String::as_str) != status {
            self.statuses.extend(status.map(str::to_string));
        }
        let syncs = r["ram"]["dirty-sync-count"].as_u64();
        if syncs.is_some() && self.sync_counts.last().copied() != syncs {
            self.sync_counts.extend(syncs);
        }
    }

    fn saw(&self, status: &str) -> bool {
        self.statuses.iter().any(|s| s == status)
    }

    /// How long to wait before the next poll: 10 ms until a postcopy is under way (the switch
    /// follows the first pass closely, and `postcopy-active` is seen), 50 ms otherwise.
    pub(super) fn interval(&self, mode: Mode) -> Duration {
        if mode.is_postcopy() && !self.saw("postcopy-active") {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(50)
        }
    }

    /// In a postcopy run, sends `migrate-start-postcopy` once: at the first answer `r` that shows
    /// the migration active with its first pass done (`since`: when `migrate` was sent). A
    /// refusal is kept for the check (the migration may have ended in precopy meanwhile).
    pub(super) fn switch_if_due(&mut self, mode: Mode, sq: &mut Qmp, r: &Value, since: Instant) {
        if !mode.is_postcopy()
            || self.switch.is_some()
            || r["status"] != "active"
            || !first_pass_done(r)
        {
            return;
        }
        self.switch = Some((since.elapsed().as_secs_f64() * 1e3, r.clone()));
        if let Err(e) = sq.cmd("migrate-start-postcopy", json!({})) {
            self.start_error = Some(e);
        }
    }

    /// The run's fields of the trace.
    pub(super) fn json(&self) -> Value {
        json!({
            "query_migrate_statuses": self.statuses,
            "dirty_sync_counts_seen": self.sync_counts,
            "postcopy_started_after_ms": self.switch.as_ref().map(|s| s.0),
            "postcopy_switch_query_migrate": self.switch.as_ref().map(|s| s.1.clone()),
            "postcopy_start_error": self.start_error,
        })
    }
}

/// What makes a postcopy run's line meaningless: `postcopy-ram` off at a side, the postcopy
/// phase not held to `bandwidth`, no switch, or no `postcopy-active` status seen.
pub(super) fn check(bandwidth: u64, line: &Value) -> Vec<String> {
    let mut p = Vec::new();
    for side in ["source", "destination"] {
        if line["postcopy_ram_capability"][side] != true {
            p.push(format!("postcopy-ram is not on at the {side}"));
        }
    }
    let held = &line["migration_parameters"]["max-postcopy-bandwidth"];
    if held.as_u64() != Some(bandwidth) {
        p.push(format!(
            "QEMU holds max-postcopy-bandwidth {held}, not the {bandwidth} asked for"
        ));
    }
    if let Some(e) = line["postcopy_start_error"].as_str() {
        p.push(format!("migrate-start-postcopy failed: {e}"));
    } else if line["postcopy_started_after_ms"].is_null() {
        p.push(format!(
            "migrate-start-postcopy never sent: the migration ended before dirty-sync-count reached {FIRST_PASS_SYNCS}"
        ));
    }
    let saw_postcopy = line["query_migrate_statuses"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s == "postcopy-active"));
    if !saw_postcopy {
        p.push(format!(
            "QEMU never reported postcopy-active (statuses {}): it did not switch",
            line["query_migrate_statuses"]
        ));
    }
    if !line["ram"]["postcopy-requests"].is_u64() {
        p.push("query-migrate reports no ram.postcopy-requests".into());
    }
    p
}

/// QEMU's (major, minor) from its `--version` line ("QEMU emulator version 10.0.13 (Debian...)").
fn version_of(line: &str) -> Option<(u32, u32)> {
    let v = line.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|n| n.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Refuses postcopy modes with `--multifd` on a QEMU (`version_line`: its `--version` line) older
/// than 10.1, before any run (see the module documentation).
pub(super) fn check_multifd(modes: &[Mode], multifd: u8, version_line: &str) -> Result<(), String> {
    let postcopy: Vec<String> = modes
        .iter()
        .filter(|m| m.is_postcopy())
        .map(|m| m.label())
        .collect();
    if multifd == 0 || postcopy.is_empty() {
        return Ok(());
    }
    match version_of(version_line) {
        Some(v) if v < MULTIFD_POSTCOPY_SINCE => Err(format!(
            "postcopy with --multifd {multifd}: {version_line} cannot run them together (10.0 refuses \
             postcopy-ram beside multifd: \"Postcopy is not yet compatible with multifd\"; 7.2 takes \
             both without checking the pair, which QEMU supports only from {}.{}): run the {} \
             mode(s) without --multifd, or the other modes with it",
            MULTIFD_POSTCOPY_SINCE.0,
            MULTIFD_POSTCOPY_SINCE.1,
            postcopy.join(", ")
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_pass_is_done_at_the_second_sync() {
        let q = |status: &str, syncs: u64| json!({"status": status, "ram": {"dirty-sync-count": syncs}});
        assert!(!first_pass_done(&json!({"status": "setup"})));
        assert!(!first_pass_done(&q("active", 1)));
        assert!(first_pass_done(&q("active", 2)));
        assert!(first_pass_done(&q("active", 3)));

        let mut t = Trace::default();
        for r in [
            q("setup", 0),
            q("active", 1),
            q("active", 1),
            q("active", 2),
        ] {
            t.record(&r);
        }
        t.record(&q("postcopy-active", 3));
        t.record(&q("completed", 3));
        let j = t.json();
        assert_eq!(
            j["query_migrate_statuses"],
            json!(["setup", "active", "postcopy-active", "completed"])
        );
        assert_eq!(j["dirty_sync_counts_seen"], json!([0, 1, 2, 3]));
        assert!(j["postcopy_started_after_ms"].is_null());
        assert_eq!(t.interval(Mode::Postcopy(None)), Duration::from_millis(50));
        assert_eq!(
            Trace::default().interval(Mode::Postcopy(None)),
            Duration::from_millis(10)
        );
        assert_eq!(
            Trace::default().interval(Mode::Clear(1 << 20)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn postcopy_checks() {
        let good = json!({
            "postcopy_ram_capability": {"source": true, "destination": true},
            "migration_parameters": {"max-postcopy-bandwidth": 400u64 << 20},
            "postcopy_started_after_ms": 812.5,
            "postcopy_start_error": null,
            "query_migrate_statuses": ["setup", "active", "postcopy-active", "completed"],
            "ram": {"postcopy-requests": 17},
        });
        assert!(
            check(400 << 20, &good).is_empty(),
            "{:?}",
            check(400 << 20, &good)
        );
        // Another postcopy bandwidth than the link's: the phase ran at another speed.
        assert_eq!(check(0, &good).len(), 1);
        // Completed by precopy before the switch: never sent, never postcopy-active.
        let mut precopy = good.clone();
        precopy["postcopy_started_after_ms"] = Value::Null;
        precopy["query_migrate_statuses"] = json!(["setup", "active", "completed"]);
        let p = check(400 << 20, &precopy);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("never sent"), "{p:?}");
        // Refused: said as QEMU said it; and a side without the capability.
        let mut refused = precopy.clone();
        refused["postcopy_start_error"] = json!("QMP migrate-start-postcopy: {}");
        refused["postcopy_ram_capability"]["destination"] = json!(false);
        refused["ram"] = json!({});
        let p = check(400 << 20, &refused);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p
            .iter()
            .any(|p| p.contains("migrate-start-postcopy failed")));
    }

    #[test]
    fn multifd_with_postcopy_needs_a_recent_qemu() {
        let q10 = "QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)";
        let q72 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)";
        assert_eq!(version_of(q10), Some((10, 0)));
        assert_eq!(version_of(q72), Some((7, 2)));
        assert_eq!(version_of("QEMU emulator version 10.1.0"), Some((10, 1)));
        assert_eq!(version_of("garbage"), None);
        let pc = [Mode::Clear(1 << 20), Mode::Postcopy(None)];
        let e = check_multifd(&pc, 2, q10).unwrap_err();
        assert!(
            e.contains("--multifd 2") && e.contains("postcopy mode"),
            "{e}"
        );
        check_multifd(&pc, 2, q72).unwrap_err();
        check_multifd(&pc, 0, q72).unwrap();
        check_multifd(&[Mode::Clear(1 << 20)], 2, q72).unwrap();
        check_multifd(&pc, 2, "QEMU emulator version 10.1.2").unwrap();
        // An unknown version: QEMU decides.
        check_multifd(&pc, 2, "qemu?").unwrap();
    }
}
