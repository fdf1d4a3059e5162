// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Losses made on purpose (`vmm run/incoming --fault`) for `cargo xtask faults` and `soak`: the
//! default verification must catch every loss it lets through, and a destination must not keep
//! stale memory whatever its own populated-pages answer says.

use std::time::Duration;

use crate::harness::{
    dest_outcome, digest_mismatches, incoming_cmd, jbool, jstr, ju64, Proc, Shape, Workload,
};

/// A loss made on purpose, and what must come of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// `vmm run --fault hide-populated=8`: the source's populated-pages answer hides 8 pages that
    /// hold data; they go as zero. Both sides must fail the verification (exit code 3).
    SourceHidesPopulated,
    /// `vmm run --fault lose-dirty-bits=64`: the source drops 64 dirty bits after the first pass.
    /// Both sides must fail the verification, unless every dropped page was dirtied again and
    /// resent (then nothing was lost, which the RAM fingerprints show).
    SourceLosesDirtyBits,
    /// `vmm incoming --fault hide-populated=8`: the destination's RAM holds data in 8 pages before
    /// the stream, hidden from its own populated-pages answer. It must end with the source's
    /// memory, verified.
    DestinationHidesStale,
}

impl Loss {
    /// Every kind.
    pub const ALL: [Loss; 3] = [
        Loss::SourceHidesPopulated,
        Loss::SourceLosesDirtyBits,
        Loss::DestinationHidesStale,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Loss::SourceHidesPopulated => "loss:src-hide",
            Loss::SourceLosesDirtyBits => "loss:src-bits",
            Loss::DestinationHidesStale => "loss:dst-hide",
        }
    }

    fn source_fault(self) -> Option<&'static str> {
        match self {
            Loss::SourceHidesPopulated => Some("--fault=hide-populated=8"),
            Loss::SourceLosesDirtyBits => Some("--fault=lose-dirty-bits=64"),
            Loss::DestinationHidesStale => None,
        }
    }

    fn destination_fault(self) -> Option<&'static str> {
        (self == Loss::DestinationHidesStale).then_some("--fault=hide-populated=8")
    }
}

/// What came of one loss case.
#[derive(Debug, Default)]
pub struct LossOutcome {
    /// The loss really happened (pages differed, or stale pages were there to zero).
    pub made: bool,
    /// It was handled as it must be: caught on both sides, or (destination) repaired.
    pub ok: bool,
    /// The destination's memory differed from the source's while a side said `verified`: the
    /// worst outcome. Must never happen.
    pub undetected: bool,
    /// Pages the verification reported as differing.
    pub mismatched_pages: u64,
    /// A line for the report.
    pub note: String,
}

/// Run one migration of `shape` with `loss` and judge it.
pub fn run_loss(
    vmm: &std::path::Path,
    loss: Loss,
    shape: &Shape,
    warmup_ms: u64,
) -> Result<LossOutcome, String> {
    // The random workload (the increment rule would refuse a lost write before the commit, another
    // good outcome but not this check), and a working set that ends 4 MiB before the end of RAM,
    // so the destination's stale last pages are ones the source sends as zero.
    let mut shape = shape.clone();
    shape.workload = Workload::Random;
    shape.wss = shape
        .wss
        .min(shape.mem.saturating_sub(5 << 20))
        .max(1 << 20);
    let mut incoming = incoming_cmd(vmm, &[], "127.0.0.1");
    incoming.args(loss.destination_fault());
    let mut dst = Proc::spawn("incoming", incoming)?;
    let uri = dst.listen_uri()?;
    let mut cmd = std::process::Command::new(vmm);
    cmd.args(shape.run_args()).args([
        format!("--migrate-to={uri}"),
        format!("--warmup={warmup_ms}ms"),
        "--max-time=60s".into(),
        "--ram-fingerprint".into(),
        "--json".into(),
    ]);
    cmd.args(loss.source_fault());
    let mut src = Proc::spawn("source", cmd)?;
    let src_code = src
        .wait_timeout(Duration::from_secs(120))
        .ok()
        .and_then(|s| s.code());
    let dst_code = dst
        .wait_timeout(Duration::from_secs(60))
        .ok()
        .and_then(|s| s.code());
    let d = dest_outcome(&dst);
    let sj = src.json();
    let verified = (jbool(&sj, "verified"), jbool(&d.json, "verified"));
    let (fp_src, fp_dst) = (
        jstr(&sj, "ram_fingerprint"),
        jstr(&d.json, "ram_fingerprint"),
    );
    let fingerprints_equal = fp_src.is_some() && fp_src == fp_dst;
    let mut out = LossOutcome {
        mismatched_pages: digest_mismatches(&dst.stderr()),
        ..LossOutcome::default()
    };
    let a_side_verified = verified.0 == Some(true) || verified.1 == Some(true);
    out.undetected = a_side_verified && fp_src.is_some() && fp_dst.is_some() && !fingerprints_equal;
    match loss {
        Loss::SourceHidesPopulated | Loss::SourceLosesDirtyBits => {
            let caught = src_code == Some(3) && dst_code == Some(3) && out.mismatched_pages > 0;
            // Nothing lost: every dropped page was resent (lose-dirty-bits only).
            let nothing_lost = src_code == Some(0) && dst_code == Some(0) && fingerprints_equal;
            out.made = caught || out.undetected;
            out.ok = caught || (nothing_lost && loss == Loss::SourceLosesDirtyBits);
            out.note = if caught {
                format!("caught on both sides ({} pages)", out.mismatched_pages)
            } else if out.ok {
                "no page lost (the dropped pages were resent)".into()
            } else {
                format!(
                    "NOT CAUGHT: exit codes source {src_code:?} destination {dst_code:?}, verified {verified:?}, fingerprints {fp_src:?}/{fp_dst:?}: {}",
                    src.error_line().or_else(|| dst.error_line()).unwrap_or_default()
                )
            };
        }
        Loss::DestinationHidesStale => {
            let stale = ju64(&d.json, "stale_pages_zeroed").unwrap_or(0);
            out.made = stale > 0;
            out.ok = src_code == Some(0)
                && dst_code == Some(0)
                && verified == (Some(true), Some(true))
                && fingerprints_equal;
            out.note = if out.ok {
                format!("verified, {stale} stale pages zeroed")
            } else {
                format!(
                    "FAILED: exit codes source {src_code:?} destination {dst_code:?}, verified {verified:?}, fingerprints {fp_src:?}/{fp_dst:?}: {}",
                    dst.error_line().or_else(|| src.error_line()).unwrap_or_default()
                )
            };
        }
    }
    Ok(out)
}
