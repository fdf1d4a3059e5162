// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What `cargo xtask faults` counts as a fault handled: the source survives and a retry from the
//! same process verifies, and no destination that failed resumes a guest; a cut after the commit
//! leaves the source paused, saying so, and the guest with the destination that had it; a cut
//! during the session handshake (before the source boots its guest) makes the source exit with a
//! clear error while the destination keeps waiting for the next source.

use std::time::Duration;

use crate::harness::{dest_outcome, jbool, jstr, ju64, Proc, Shape, Workload};

/// Where a fault stands with respect to the commit, and so what must come of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// During the session handshake, before the source boots: the source exits with a clear
    /// error, destination A keeps waiting and then verifies a migration from a new source.
    BeforeBoot,
    /// Before the commit: the source reports the failure, keeps its guest running, stops
    /// logging and migrates to B, which verifies; A never resumes.
    BeforeCommit,
    /// After the commit: the source says so and keeps its guest paused, never retries; A resumes
    /// (`a_resumes`: it had the confirmation) or not (it never got it).
    AfterCommit { a_resumes: bool },
    /// Either (a cut after a delay, a failure injected at a step): judged by where it landed; A
    /// may resume only after the commit.
    Either,
}

/// One case's result.
#[derive(Debug, Default)]
pub struct CaseResult {
    /// The fault happened (the first migration did not simply succeed).
    pub cut: bool,
    /// The source reported the failure (before the commit: "failed ... keeps running"; before it
    /// booted: "cannot reach the destination").
    pub source_reported: bool,
    /// Its guest kept running after the failure.
    pub source_survived: bool,
    /// Dirty logging was off right after the failure.
    pub logging_stopped: bool,
    /// The fault came during the session handshake: the source exited before booting and A was
    /// still waiting afterwards.
    pub before_boot: bool,
    /// The fault came after the commit: the source reported it and kept its guest paused.
    pub after_commit: bool,
    /// A resumed a guest (from the faulty migration).
    pub a_resumed: bool,
    /// The retry verified (to B; before boot: a new source to A).
    pub retry_verified: bool,
    /// A destination resumed when it must not have.
    pub wrongly_resumed: bool,
    /// The case was handled as it must be.
    pub ok: bool,
    /// A line for the report.
    pub note: String,
}

impl CaseResult {
    /// The source recovered: reported, survived, stopped logging, and the retry verified.
    fn recovered(&self) -> bool {
        self.source_reported && self.source_survived && self.logging_stopped && self.retry_verified
    }
}

/// Whether a case whose fault happened was handled as `expect` requires.
pub fn handled(expect: Expect, r: &CaseResult) -> bool {
    if !r.cut || r.wrongly_resumed {
        return false;
    }
    match expect {
        Expect::BeforeBoot => r.before_boot && r.source_reported && r.retry_verified,
        Expect::BeforeCommit => !r.after_commit && r.recovered(),
        Expect::AfterCommit { a_resumes } => r.after_commit && r.a_resumed == a_resumes,
        Expect::Either => r.after_commit || r.recovered(),
    }
}

/// Whether A may have resumed a guest, given where the fault landed.
fn a_may_resume(expect: Expect, after_commit: bool) -> bool {
    match expect {
        Expect::AfterCommit { a_resumes } => after_commit && a_resumes,
        Expect::Either => after_commit,
        Expect::BeforeBoot | Expect::BeforeCommit => false,
    }
}

/// The processes of a case whose first migration failed.
pub struct Judged<'a> {
    pub src: &'a mut Proc,
    pub src_status: Result<std::process::ExitStatus, String>,
    pub dst_a: &'a mut Proc,
    pub dst_b: &'a mut Proc,
    pub uri_b: &'a str,
    pub shape: &'a Shape,
}

/// Whether a migration to `dst` verified: the source and the destination exited 0, the
/// destination resumed with the source's RAM fingerprint, and (increment workload) the
/// increment rule held.
fn verified_on(
    src_json: &Option<serde_json::Value>,
    src_status: &Result<std::process::ExitStatus, String>,
    dst: &Proc,
    dst_status: &Result<std::process::ExitStatus, String>,
    shape: &Shape,
) -> (bool, String) {
    let d = dest_outcome(dst);
    let fp_src = jstr(src_json, "ram_fingerprint");
    let fp_dst = jstr(&d.json, "ram_fingerprint");
    let increment_ok = shape.workload != Workload::Increment
        || jbool(&d.json, "increment_consistent") == Some(true);
    let ok = matches!(src_status, Ok(s) if s.success())
        && matches!(dst_status, Ok(s) if s.success())
        && d.resumed
        && fp_src.is_some()
        && fp_src == fp_dst
        && increment_ok;
    let why = format!(
        "src {:?} {} dst {:?} fp {fp_src:?}/{fp_dst:?} incr_ok {increment_ok} dst err {}",
        src_status.as_ref().map(|s| s.code()),
        jstr(src_json, "first_error").unwrap_or_default(),
        dst_status.as_ref().map(|s| s.code()),
        dst.error_line().unwrap_or_default()
    );
    (ok, why)
}

/// The error text of a source's first failure, shortened for the report.
fn short_error(first_error: Option<&str>) -> &str {
    first_error
        .and_then(|e| {
            e.split(" failed: ")
                .nth(1)
                .or(e.split(" committed but ").nth(1))
        })
        .map_or("", |e| e.trim_end_matches("; the guest keeps running here"))
}

/// Judge a case whose first migration failed (the fault happened) against `expect`.
pub fn judge(
    j: Judged<'_>,
    expect: Expect,
    harness_error: Option<String>,
    head: String,
) -> CaseResult {
    let Judged {
        src,
        src_status,
        dst_a,
        dst_b,
        uri_b,
        shape,
    } = j;
    let mut r = CaseResult {
        cut: true,
        ..CaseResult::default()
    };
    let mut notes: Vec<String> = harness_error.into_iter().collect();
    let sj = src.json();
    let first_error = jstr(&sj, "first_error");
    r.source_reported = first_error
        .as_deref()
        .is_some_and(|e| e.contains("failed") && e.contains("keeps running"));
    r.after_commit = first_error
        .as_deref()
        .is_some_and(|e| e.contains("committed but") && e.contains("stays paused"));
    // A failed destination gives up within its --io-timeout; one still waiting for a migration
    // (it refused the broken connection) never ends.
    let a_status = dst_a.wait_timeout(Duration::from_secs(12));
    // No retry came (after the commit, or a source without --retry-to): B waits for nothing. A
    // retry after the commit would be a bug: then B is waited for, and resuming counts against it.
    let retried = src.stderr().contains(&format!("retrying to {uri_b}"));
    let b_status = if retried {
        dst_b.wait_timeout(Duration::from_secs(60))
    } else {
        dst_b.kill();
        Err("never reached".to_string())
    };
    let progress = ju64(&sj, "progress_after_failure_pages").unwrap_or(0);
    r.source_survived = r.source_reported && progress > 0;
    r.logging_stopped = jbool(&sj, "logging_after_failure") == Some(false);
    r.a_resumed = dest_outcome(dst_a).resumed;
    let b_resumed = dest_outcome(dst_b).resumed;
    // B resumes only from the retry, which comes only before the commit.
    r.wrongly_resumed =
        (r.a_resumed && !a_may_resume(expect, r.after_commit)) || (b_resumed && r.after_commit);
    if a_status.is_err() {
        notes.push("A had to be killed".to_string());
    }
    if !r.after_commit {
        let (ok, why) = verified_on(&sj, &src_status, dst_b, &b_status, shape);
        r.retry_verified = ok && jstr(&sj, "migrated_to").as_deref() == Some(uri_b);
        if !r.retry_verified {
            notes.push(format!("retry: {why}"));
        }
        if !r.source_reported {
            notes.push(format!(
                "source: {src_status:?} {}",
                src.error_line().unwrap_or_default()
            ));
        } else if !r.source_survived {
            notes.push(format!("source guest made no progress ({progress} pages)"));
        }
        if !r.logging_stopped {
            notes.push(format!(
                "logging after the failure: {:?}",
                jbool(&sj, "logging_after_failure")
            ));
        }
    }
    if r.wrongly_resumed {
        notes.push(format!(
            "WRONGLY RESUMED: A {} B {b_resumed}: {}",
            r.a_resumed,
            dst_a.stdout().trim()
        ));
    }
    if let Some(e) = dst_a.error_line() {
        notes.push(format!(
            "A: {}",
            e.trim_start_matches("vmm: error: ")
                .trim_end_matches("; no guest was resumed")
        ));
    } else if r.a_resumed {
        notes.push("A: resumed".into());
    }
    r.ok = handled(expect, &r);
    r.note = format!(
        "{head} +{progress}p err: {}{}{}",
        short_error(first_error.as_deref()),
        if notes.is_empty() { "" } else { " | " },
        notes.join("; ")
    );
    r
}

/// Judge a cut during the session handshake: the source must exit at once with a clear error
/// (it has no guest yet), A must still be waiting, and a new source migrating straight to A must
/// verify. B is never reached.
pub fn judge_before_boot(
    j: Judged<'_>,
    retry: impl FnOnce() -> Result<(Proc, Result<std::process::ExitStatus, String>), String>,
    head: String,
) -> Result<CaseResult, String> {
    let Judged {
        src,
        src_status,
        dst_a,
        dst_b,
        shape,
        ..
    } = j;
    let error = src.error_line().unwrap_or_default();
    let mut r = CaseResult {
        cut: true,
        source_reported: matches!(&src_status, Ok(s) if s.code() == Some(1))
            && error.contains("cannot reach the destination"),
        ..CaseResult::default()
    };
    // A drops the half-made session once the source's connections close.
    std::thread::sleep(Duration::from_millis(500));
    r.before_boot = r.source_reported && dst_a.running();
    let mut notes = Vec::new();
    if r.before_boot {
        let (new_src, new_status) = retry()?;
        let a_status = dst_a.wait_timeout(Duration::from_secs(60));
        let (ok, why) = verified_on(&new_src.json(), &new_status, dst_a, &a_status, shape);
        r.retry_verified = ok;
        if !ok {
            notes.push(format!("new source to A: {why}"));
        }
    } else {
        notes.push(format!(
            "source {src_status:?} `{error}`; A still waiting: {}",
            dst_a.running()
        ));
    }
    dst_b.kill();
    r.wrongly_resumed = dest_outcome(dst_b).resumed;
    r.ok = handled(Expect::BeforeBoot, &r);
    r.note = format!(
        "{head} err: {} | A kept waiting: {}, a new source to A verified: {}{}{}",
        error
            .split("cannot reach the destination ")
            .last()
            .and_then(|e| e.split(" (").next())
            .unwrap_or(""),
        r.before_boot,
        r.retry_verified,
        if notes.is_empty() { "" } else { " | " },
        notes.join("; ")
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A case that went as it must before the commit.
    fn recovered() -> CaseResult {
        CaseResult {
            cut: true,
            source_reported: true,
            source_survived: true,
            logging_stopped: true,
            retry_verified: true,
            ..CaseResult::default()
        }
    }

    #[test]
    fn before_the_commit_every_check_must_hold() {
        assert!(handled(Expect::BeforeCommit, &recovered()));
        assert!(handled(Expect::Either, &recovered()));
        let broken: [fn(&mut CaseResult); 7] = [
            |r| r.cut = false,
            |r| r.source_reported = false,
            |r| r.source_survived = false,
            |r| r.logging_stopped = false,
            |r| r.retry_verified = false,
            |r| r.wrongly_resumed = true,
            |r| r.after_commit = true,
        ];
        for (i, f) in broken.iter().enumerate() {
            let mut r = recovered();
            f(&mut r);
            assert!(!handled(Expect::BeforeCommit, &r), "check {i}");
        }
    }

    #[test]
    fn after_the_commit_a_resumes_exactly_when_it_had_the_confirmation() {
        let paused = |a_resumed| CaseResult {
            cut: true,
            after_commit: true,
            a_resumed,
            ..CaseResult::default()
        };
        for a_resumes in [true, false] {
            let expect = Expect::AfterCommit { a_resumes };
            assert!(handled(expect, &paused(a_resumes)), "{a_resumes}");
            assert!(!handled(expect, &paused(!a_resumes)), "{a_resumes}");
        }
        // A retry after the commit is no excuse: the source must say it committed.
        assert!(!handled(
            Expect::AfterCommit { a_resumes: false },
            &recovered()
        ));
        assert!(!a_may_resume(Expect::BeforeCommit, true));
        assert!(!a_may_resume(Expect::Either, false));
        assert!(a_may_resume(Expect::Either, true));
    }

    #[test]
    fn before_boot_needs_the_waiting_destination_to_verify_a_new_source() {
        let r = CaseResult {
            cut: true,
            source_reported: true,
            before_boot: true,
            retry_verified: true,
            ..CaseResult::default()
        };
        assert!(handled(Expect::BeforeBoot, &r));
        let stopped_waiting = CaseResult {
            before_boot: false,
            ..r
        };
        assert!(!handled(Expect::BeforeBoot, &stopped_waiting));
    }
}
