// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm bench --compare FILE`: QEMU results beside ours in one table.
//!
//! FILE holds JSON lines, one migration each, of three kinds (blank lines are skipped):
//! - what `cargo xtask qemu-bench` writes: QEMU's `query-migrate` result plus our fields
//!   (`system: "qemu"`, `mode`, `chunk_bytes`, `stop_to_resume_ms`, `source_cpu_s`, ...);
//! - a raw `query-migrate` result (`{"status": "completed", "total-time": ..., "ram": {...}}`),
//!   or the whole QMP reply `{"return": {...}}`; its mode is unknown unless `mode` is given;
//! - a `vmm bench --json` line (`scenario`, `total_time_ms`, ...): more rows of ours, so runs
//!   interleaved by hand or by `cargo xtask qemu-bench --interleave-with-vmm` make one table.
//!
//! The table gives medians per system and mode, and each `vmm` row's ratio to QEMU: legacy rows
//! (`legacy-qemu` and `legacy`) against QEMU's legacy, postcopy rows (`postcopy 1 MiB`) against
//! QEMU's best (fastest median) postcopy mode (`postcopy`, `postcopy 1 MiB`, ...; QEMU's best
//! clear mode when the file has no QEMU postcopy row), the others against QEMU's best clear mode.

use std::path::Path;

use serde_json::Value;

use crate::{CliError, CliResult};

/// One migration of either system, as the table needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `qemu` or `vmm`.
    pub system: String,
    /// Mode label as `vmm bench` prints it (`legacy`, `clear 1 MiB`), or `unknown`.
    pub mode: String,
    /// The migration completed (QEMU) or verified (vmm); others are left out of the medians.
    pub ok: bool,
    /// Total migration time in seconds.
    pub total_s: f64,
    /// Downtime as the system reports it, ms.
    pub downtime_ms: f64,
    /// Guest-visible downtime (QEMU: source STOP to destination RESUME event), ms.
    pub guest_downtime_ms: Option<f64>,
    /// Bytes sent.
    pub sent_bytes: f64,
    /// Dirty-log syncs (QEMU `dirty-sync-count`, vmm `dirty_syncs`).
    pub syncs: Option<f64>,
    /// CPU seconds of the source and destination processes during the migration.
    pub cpu_s: (Option<f64>, Option<f64>),
    /// The guest's write rate while being migrated, bytes/s.
    pub guest_rate: Option<f64>,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Parses one line of a compare file; `Ok(None)` for a blank line.
pub fn parse_line(line: &str) -> Result<Option<Row>, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if let Some(inner) = v.get("return").filter(|r| r.is_object()) {
        v = inner.clone();
    }
    let get_cpu = |a: &str, b: &str| num(&v, a).or_else(|| num(&v, b));
    if v.get("scenario").is_some() || v.get("total_time_ms").is_some() {
        // A `vmm bench --json` line.
        let need = |k: &str| num(&v, k).ok_or_else(|| format!("vmm line without a number `{k}`"));
        let mode = match (
            v.get("scenario").and_then(Value::as_str),
            v.get("mode").and_then(Value::as_str),
        ) {
            (Some(s), _) => s.to_string(),
            (None, Some(m @ ("legacy" | "ring"))) => m.into(),
            (None, Some(_)) => format!(
                "clear {}",
                crate::units::human_bytes(num(&v, "clear_chunk_bytes").unwrap_or(0.0) as u64)
            ),
            (None, None) => "unknown".into(),
        };
        return Ok(Some(Row {
            system: "vmm".into(),
            mode,
            ok: v.get("verified").and_then(Value::as_bool).unwrap_or(false),
            total_s: need("total_time_ms")? / 1e3,
            downtime_ms: need("downtime_ms")?,
            // The bench's destination hashes its RAM (`--ram-fingerprint`) before it resumes, a
            // cross-check of the bench, not of the migration: it is left out, as QEMU has none.
            guest_downtime_ms: num(&v, "guest_visible_downtime_ms").map(|g| {
                let fingerprint = v
                    .get("destination")
                    .and_then(|d| num(d, "ram_fingerprint_ms"))
                    .unwrap_or(0.0);
                g - fingerprint
            }),
            sent_bytes: need("bytes_sent")?,
            syncs: num(&v, "dirty_syncs"),
            guest_rate: num(&v, "guest_dirty_rate_during_migration_bytes_per_s"),
            cpu_s: (
                get_cpu("source_cpu_s", "cpu_s"),
                v.get("destination")
                    .and_then(|d| num(d, "cpu_s").or_else(|| num(d, "destination_cpu_s")))
                    .or_else(|| num(&v, "dest_cpu_s"))
                    .or_else(|| num(&v, "destination_cpu_s")),
            ),
        }));
    }
    // QEMU: a query-migrate result, maybe extended by the harness.
    let status = v.get("status").and_then(Value::as_str).ok_or(
        "neither a query-migrate result (no `status`) nor a vmm bench line (no `scenario`)",
    )?;
    let system = v
        .get("system")
        .and_then(Value::as_str)
        .unwrap_or("qemu")
        .to_string();
    let mode = match (
        v.get("mode").and_then(Value::as_str),
        num(&v, "chunk_bytes"),
    ) {
        (Some(m), _) => m.to_string(),
        (None, Some(0.0)) => "legacy".into(),
        (None, Some(c)) => format!("clear {}", crate::units::human_bytes(c as u64)),
        (None, None) => "unknown".into(),
    };
    let ok = status == "completed";
    let need = |k: &str, x: Option<f64>| -> Result<f64, String> {
        match x {
            Some(x) => Ok(x),
            None if !ok => Ok(f64::NAN),
            None => Err(format!(
                "completed query-migrate result without a number `{k}`"
            )),
        }
    };
    let ram = v.get("ram").cloned().unwrap_or(Value::Null);
    Ok(Some(Row {
        system,
        mode,
        ok,
        total_s: need("total-time", num(&v, "total-time"))? / 1e3,
        downtime_ms: need("downtime", num(&v, "downtime"))?,
        guest_downtime_ms: num(&v, "stop_to_resume_ms"),
        sent_bytes: need("ram.transferred", num(&ram, "transferred"))?,
        syncs: num(&ram, "dirty-sync-count"),
        cpu_s: (num(&v, "source_cpu_s"), num(&v, "destination_cpu_s")),
        guest_rate: num(&v, "guest_write_rate_during_migration_bytes_per_s"),
    }))
}

/// Reads a compare file; an error names the file and line.
pub fn load(path: &Path) -> CliResult<Vec<Row>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("--compare {}: {e}", path.display())))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line(line) {
            Ok(Some(r)) => rows.push(r),
            Ok(None) => {}
            Err(e) => {
                return Err(CliError::Usage(format!(
                    "--compare {} line {}: {e}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    if rows.is_empty() {
        return Err(CliError::Usage(format!(
            "--compare {}: no results in the file",
            path.display()
        )));
    }
    Ok(rows)
}

/// The vmm rows of this bench's runs: `(mode label, the run's source JSON)`.
pub fn vmm_rows<'a>(runs: impl IntoIterator<Item = (String, &'a Value, bool)>) -> Vec<Row> {
    runs.into_iter()
        .map(|(label, v, verified)| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.insert("scenario".into(), label.into());
                m.insert("verified".into(), verified.into());
            }
            parse_line(&v.to_string()).ok().flatten().unwrap_or(Row {
                system: "vmm".into(),
                mode: v["scenario"].as_str().unwrap_or("unknown").into(),
                ok: false,
                total_s: f64::NAN,
                downtime_ms: f64::NAN,
                guest_downtime_ms: None,
                sent_bytes: f64::NAN,
                syncs: None,
                cpu_s: (None, None),
                guest_rate: None,
            })
        })
        .collect()
}

/// Median of the finite values (NaN when none).
pub fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of one system and mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// System.
    pub system: String,
    /// Mode label.
    pub mode: String,
    /// Runs that count / all runs.
    pub ok: usize,
    /// All runs.
    pub runs: usize,
    /// Median total seconds.
    pub total_s: f64,
    /// Median reported downtime, ms.
    pub downtime_ms: f64,
    /// Median guest-visible downtime, ms.
    pub guest_downtime_ms: f64,
    /// Median MiB sent.
    pub sent_mib: f64,
    /// Median syncs.
    pub syncs: f64,
    /// Median CPU seconds, source and destination.
    pub cpu_s: (f64, f64),
    /// Median guest write rate while migrated, MiB/s.
    pub guest_mib_s: f64,
    /// Ratio of the median total to the QEMU reference, with the reference's mode.
    pub vs_qemu: Option<(f64, String)>,
}

/// Groups rows by (system, mode) in first-seen order, with medians and ratios.
pub fn groups(rows: &[Row]) -> Vec<Group> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rows {
        let k = (r.system.clone(), r.mode.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    // vmm first, then QEMU, each in first-seen order.
    keys.sort_by_key(|k| k.0 != "vmm");
    let mut out: Vec<Group> = keys
        .into_iter()
        .map(|(system, mode)| {
            let all: Vec<&Row> = rows
                .iter()
                .filter(|r| r.system == system && r.mode == mode)
                .collect();
            let ok: Vec<&&Row> = all.iter().filter(|r| r.ok).collect();
            let m = |f: &dyn Fn(&Row) -> Option<f64>| median(ok.iter().filter_map(|r| f(r)));
            Group {
                ok: ok.len(),
                runs: all.len(),
                total_s: m(&|r| Some(r.total_s)),
                downtime_ms: m(&|r| Some(r.downtime_ms)),
                guest_downtime_ms: m(&|r| r.guest_downtime_ms),
                sent_mib: m(&|r| Some(r.sent_bytes / (1u64 << 20) as f64)),
                syncs: m(&|r| r.syncs),
                cpu_s: (m(&|r| r.cpu_s.0), m(&|r| r.cpu_s.1)),
                guest_mib_s: m(&|r| r.guest_rate.map(|x| x / (1u64 << 20) as f64)),
                system,
                mode,
                vs_qemu: None,
            }
        })
        .collect();
    let qemu_legacy = out
        .iter()
        .find(|g| g.system == "qemu" && g.mode == "legacy" && g.total_s.is_finite())
        .map(|g| (g.total_s, g.mode.clone()));
    // QEMU's fastest mode whose label starts with `prefix`.
    let qemu_best = |prefix: &str| {
        out.iter()
            .filter(|g| g.system == "qemu" && g.mode.starts_with(prefix) && g.total_s.is_finite())
            .min_by(|a, b| a.total_s.total_cmp(&b.total_s))
            .map(|g| (g.total_s, g.mode.clone()))
    };
    let qemu_best_clear = qemu_best("clear");
    let qemu_best_postcopy = qemu_best("postcopy").or_else(|| qemu_best_clear.clone());
    for g in out
        .iter_mut()
        .filter(|g| g.system == "vmm" && g.total_s.is_finite())
    {
        // Both legacy rows of ours (`legacy-qemu`, `legacy`, with a transport after it or not).
        let reference = if g.mode.starts_with("legacy") {
            qemu_legacy.clone()
        } else if g.mode.starts_with("postcopy") {
            qemu_best_postcopy.clone()
        } else {
            qemu_best_clear.clone()
        };
        g.vs_qemu = reference.map(|(t, m)| (g.total_s / t, m));
    }
    out
}

/// Prints the side-by-side table of `rows` (ours and QEMU's).
pub fn print_table(rows: &[Row]) {
    let f = |x: f64, prec: usize| {
        if x.is_finite() {
            format!("{x:.prec$}")
        } else {
            "-".into()
        }
    };
    println!("\nvmm and QEMU side by side (medians per system and mode):");
    println!(
        "{:<6} {:<14} {:>5} {:>9} {:>13} {:>14} {:>10} {:>6} {:>13} {:>11} {:>22}",
        "system",
        "mode",
        "runs",
        "total (s)",
        "downtime (ms)",
        "guest-vis (ms)",
        "sent (MiB)",
        "syncs",
        "cpu src/dst",
        "guest MiB/s",
        "vs QEMU"
    );
    for g in groups(rows) {
        let vs = match &g.vs_qemu {
            Some((r, m)) => format!("{r:.2}x qemu {m}"),
            None => "-".into(),
        };
        let runs = if g.ok == g.runs {
            g.runs.to_string()
        } else {
            format!("{}/{}", g.ok, g.runs)
        };
        println!(
            "{:<6} {:<14} {:>5} {:>9} {:>13} {:>14} {:>10} {:>6} {:>13} {:>11} {:>22}",
            g.system,
            g.mode,
            runs,
            f(g.total_s, 2),
            f(g.downtime_ms, 1),
            f(g.guest_downtime_ms, 1),
            f(g.sent_mib, 0),
            f(g.syncs, 0),
            format!("{}/{}", f(g.cpu_s.0, 1), f(g.cpu_s.1, 1)),
            f(g.guest_mib_s, 0),
            vs
        );
    }
    println!(
        "downtime: as each system reports it; guest-vis: QEMU source STOP to destination RESUME event, vmm guest_visible_downtime_ms less the bench's RAM fingerprint pass (destination.ram_fingerprint_ms); cpu: CPU seconds of each whole process (vCPU included) during the migration; guest MiB/s: what the guest wrote while being migrated. Runs that did not complete (QEMU) or verify (vmm) are left out of the medians (shown as ok/all)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_EXTENDED: &str = r#"{"status":"completed","total-time":15500,"downtime":30,"setup-time":2,"ram":{"transferred":5935988736,"dirty-sync-count":12,"normal":1449000,"mbps":3200.5},"system":"qemu","version":"7.2.22","mode":"clear 1 MiB","chunk_bytes":1048576,"stop_to_resume_ms":41.5,"source_cpu_s":9.5,"destination_cpu_s":6.25,"guest_write_rate_during_migration_bytes_per_s":301989888}"#;
    const QEMU_RAW: &str = r#"{"return": {"status":"completed","total-time":21800,"downtime":25,"ram":{"transferred":8425308160,"dirty-sync-count":20}}}"#;
    const VMM_LINE: &str = r#"{"scenario":"clear 1 MiB","verified":true,"total_time_ms":14900,"downtime_ms":73,"guest_visible_downtime_ms":80,"bytes_sent":5852102656,"dirty_syncs":11,"run":1}"#;

    #[test]
    fn parses_all_three_kinds() {
        let q = parse_line(QEMU_EXTENDED).unwrap().unwrap();
        assert_eq!(
            (q.system.as_str(), q.mode.as_str(), q.ok),
            ("qemu", "clear 1 MiB", true)
        );
        assert_eq!(q.total_s, 15.5);
        assert_eq!(q.guest_downtime_ms, Some(41.5));
        assert_eq!(q.syncs, Some(12.0));
        assert_eq!(q.cpu_s, (Some(9.5), Some(6.25)));
        assert_eq!(q.guest_rate, Some(288.0 * (1u64 << 20) as f64));
        let raw = parse_line(QEMU_RAW).unwrap().unwrap();
        assert_eq!(
            (raw.system.as_str(), raw.mode.as_str()),
            ("qemu", "unknown")
        );
        assert_eq!(raw.downtime_ms, 25.0);
        assert_eq!(raw.guest_downtime_ms, None);
        let v = parse_line(VMM_LINE).unwrap().unwrap();
        assert_eq!(
            (v.system.as_str(), v.mode.as_str(), v.ok),
            ("vmm", "clear 1 MiB", true)
        );
        assert_eq!(v.sent_bytes, 5852102656.0);
        assert_eq!(v.guest_downtime_ms, Some(80.0));
        // The bench's fingerprint pass before the destination resumes is not the migration's.
        let fp = VMM_LINE.replace(
            r#""run":1"#,
            r#""run":1,"destination":{"ram_fingerprint_ms":60.0}"#,
        );
        let v = parse_line(&fp).unwrap().unwrap();
        assert_eq!(v.guest_downtime_ms, Some(20.0));
        assert!(parse_line("   ").unwrap().is_none());
    }

    #[test]
    fn chunk_bytes_names_the_mode_and_failed_runs_parse() {
        let legacy = parse_line(r#"{"status":"completed","total-time":1,"downtime":1,"ram":{"transferred":1},"chunk_bytes":0}"#).unwrap().unwrap();
        assert_eq!(legacy.mode, "legacy");
        let c = parse_line(r#"{"status":"completed","total-time":1,"downtime":1,"ram":{"transferred":1},"chunk_bytes":16777216}"#).unwrap().unwrap();
        assert_eq!(c.mode, "clear 16 MiB");
        let failed = parse_line(r#"{"status":"failed","mode":"legacy"}"#)
            .unwrap()
            .unwrap();
        assert!(!failed.ok);
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        for bad in [
            "{not json",
            "[1,2]",
            r#"{"hello":1}"#,
            r#"{"status":"completed","downtime":1,"ram":{"transferred":1}}"#,
            r#"{"scenario":"legacy","downtime_ms":1,"bytes_sent":1}"#,
        ] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("vmm-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.jsonl");
        std::fs::write(&p, format!("{QEMU_EXTENDED}\n\n{{oops\n")).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("bad.jsonl"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("no results"));
        std::fs::write(&p, format!("{QEMU_EXTENDED}\n{VMM_LINE}\n")).unwrap();
        assert_eq!(load(&p).unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn medians_and_ratios_against_qemu() {
        let q = |mode: &str, total_ms: u32| {
            parse_line(&format!(
                r#"{{"status":"completed","total-time":{total_ms},"downtime":20,"ram":{{"transferred":1048576}},"mode":"{mode}"}}"#
            ))
            .unwrap()
            .unwrap()
        };
        let v = |mode: &str, total_ms: u32, verified: bool| {
            parse_line(&format!(
                r#"{{"scenario":"{mode}","verified":{verified},"total_time_ms":{total_ms},"downtime_ms":50,"bytes_sent":2097152}}"#
            ))
            .unwrap()
            .unwrap()
        };
        let rows = vec![
            q("legacy", 20000),
            q("legacy", 22000),
            q("legacy", 30000),
            q("clear 1 MiB", 16000),
            q("clear 16 MiB", 15000),
            v("legacy", 19000, true),
            v("legacy-qemu", 24000, true),
            v("clear 1 MiB", 12000, true),
            v("clear 1 MiB", 13000, true),
            v("clear 1 MiB", 1000, false),
        ];
        let g = groups(&rows);
        // vmm rows come first.
        assert_eq!(g[0].system, "vmm");
        let find = |s: &str, m: &str| {
            g.iter()
                .find(|x| x.system == s && x.mode == m)
                .unwrap()
                .clone()
        };
        assert_eq!(find("qemu", "legacy").total_s, 22.0);
        let vl = find("vmm", "legacy");
        let (r, m) = vl.vs_qemu.unwrap();
        assert!((r - 19.0 / 22.0).abs() < 1e-9 && m == "legacy");
        // QEMU-style legacy of ours against QEMU's legacy too, not against a clear mode.
        let (r, m) = find("vmm", "legacy-qemu").vs_qemu.unwrap();
        assert!((r - 24.0 / 22.0).abs() < 1e-9 && m == "legacy");
        // The failed run is not in the median; the reference is QEMU's fastest clear mode.
        let vc = find("vmm", "clear 1 MiB");
        assert_eq!((vc.ok, vc.runs, vc.total_s), (2, 3, 12.5));
        let (r, m) = vc.vs_qemu.unwrap();
        assert!((r - 12.5 / 15.0).abs() < 1e-9 && m == "clear 16 MiB");
        assert!(find("qemu", "clear 1 MiB").vs_qemu.is_none());
        assert_eq!(find("qemu", "clear 1 MiB").sent_mib, 1.0);
        assert_eq!(median([3.0, 1.0, f64::NAN, 2.0]), 2.0);
        assert!(median([]).is_nan());
    }

    #[test]
    fn postcopy_rows_against_qemu_postcopy() {
        // What `cargo xtask qemu-bench --modes postcopy,postcopy:1M,clear:1M` writes.
        let q = |mode: &str, total_ms: u32| {
            parse_line(&format!(
                r#"{{"status":"completed","total-time":{total_ms},"downtime":20,"ram":{{"transferred":1048576,"postcopy-requests":40}},"system":"qemu","mode":"{mode}","chunk_bytes":null,"stop_to_resume_ms":300.0}}"#
            ))
            .unwrap()
            .unwrap()
        };
        // `vmm bench --modes postcopy,clear:1M` labels its postcopy `postcopy 1 MiB`.
        let v = |mode: &str, total_ms: u32| {
            parse_line(&format!(
                r#"{{"scenario":"{mode}","verified":true,"total_time_ms":{total_ms},"downtime_ms":8,"bytes_sent":2097152}}"#
            ))
            .unwrap()
            .unwrap()
        };
        let qp = q("postcopy", 10400);
        assert_eq!(
            (qp.mode.as_str(), qp.guest_downtime_ms),
            ("postcopy", Some(300.0))
        );
        let rows = vec![
            qp,
            q("postcopy 1 MiB", 10000),
            q("clear 1 MiB", 13800),
            v("postcopy 1 MiB", 9000),
            v("clear 1 MiB", 13400),
        ];
        let g = groups(&rows);
        let find = |s: &str, m: &str| g.iter().find(|x| x.system == s && x.mode == m).unwrap();
        // Ours against QEMU's fastest postcopy row, whatever its chunk.
        let (r, m) = find("vmm", "postcopy 1 MiB").vs_qemu.clone().unwrap();
        assert!((r - 0.9).abs() < 1e-9 && m == "postcopy 1 MiB", "{r} {m}");
        // Clear rows still against QEMU's clear rows, never its postcopy.
        let (r, m) = find("vmm", "clear 1 MiB").vs_qemu.clone().unwrap();
        assert!(
            (r - 13.4 / 13.8).abs() < 1e-9 && m == "clear 1 MiB",
            "{r} {m}"
        );
        // Only QEMU's default-chunk postcopy: that one.
        let g = groups(&[q("postcopy", 10000), v("postcopy 1 MiB", 9000)]);
        let (_, m) = g[0].vs_qemu.clone().unwrap();
        assert_eq!(m, "postcopy");
        // No QEMU postcopy row: QEMU's best clear mode, named in the column.
        let g = groups(&[q("clear 16 MiB", 15000), v("postcopy 1 MiB", 9000)]);
        let (r, m) = g[0].vs_qemu.clone().unwrap();
        assert!((r - 0.6).abs() < 1e-9 && m == "clear 16 MiB", "{r} {m}");
    }
}
