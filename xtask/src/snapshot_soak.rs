// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask snapshot-soak --rounds N [--seed S]`: N chains of live snapshots of random
//! guests (`vmm snapshot`: random size, workload, rate, dirty-log mode, number of diffs, epoch
//! lengths, compression), each restored twice (`vmm incoming --from file:`, eagerly and
//! `--lazy`):
//! - a clean chain must restore verified both ways (every page checked against the digests of
//!   the last pause; the increment rule on an increment guest), and the guest must run;
//! - about one chain in five loses dirty bits on purpose (`--fault lose-dirty-bits=N`): both
//!   restores must refuse it with exit code 3. One that says verified is a lost page, and fails
//!   the soak.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::harness::{build_vmm, check_opts, is_ci, kvm_usable, opt_value, Rng};

/// One chain: how it was taken.
#[derive(Debug)]
struct Chain {
    mem_mib: u64,
    wss_mib: u64,
    increment: bool,
    rate_mib: u64,
    mode: &'static str,
    count: u64,
    every_ms: u64,
    compress: bool,
    lose: Option<u64>,
}

impl Chain {
    fn random(rng: &mut Rng, ring: bool) -> Chain {
        let mem_mib = rng.range(2, 8) * 64;
        let modes: &[&str] = if ring {
            &["clear", "legacy", "ring"]
        } else {
            &["clear", "legacy"]
        };
        Chain {
            mem_mib,
            wss_mib: rng.range(4, mem_mib / 2),
            increment: rng.chance(60),
            rate_mib: rng.range(4, 128),
            mode: modes[rng.range(0, modes.len() as u64 - 1) as usize],
            count: rng.range(2, 7),
            every_ms: rng.range(50, 600),
            compress: rng.chance(40),
            lose: rng.chance(20).then(|| rng.range(1, 64)),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}M wss {}M {} @{}M/s {} x{} every {}ms{}{}",
            self.mem_mib,
            self.wss_mib,
            if self.increment { "incr" } else { "rand" },
            self.rate_mib,
            self.mode,
            self.count,
            self.every_ms,
            if self.compress { " lz4" } else { "" },
            self.lose
                .map_or(String::new(), |n| format!(" lose-dirty-bits={n}")),
        )
    }

    fn snapshot_args(&self, dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = [
            "snapshot",
            &format!("--mem={}M", self.mem_mib),
            &format!("--wss={}M", self.wss_mib),
            &format!("--dirty-rate={}M", self.rate_mib),
            if self.increment {
                "--workload=increment"
            } else {
                "--workload=random"
            },
            &format!("--dirty-log={}", self.mode),
            &format!("--count={}", self.count),
            &format!("--every={}ms", self.every_ms),
            "--warmup=300ms",
            "--no-sync",
            "--json",
            &format!("--dir={}", dir.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.compress {
            v.push("--compress".into());
        }
        if let Some(n) = self.lose {
            v.push(format!("--fault=lose-dirty-bits={n}"));
        }
        v
    }
}

#[derive(Debug, Default)]
struct Totals {
    chains: u32,
    ok: u32,
    restores_verified: u32,
    loss_chains: u32,
    losses_refused: u32,
    /// A chain that lost pages, restored and said verified: must stay 0.
    losses_undetected: u32,
    failed: u32,
}

/// `cargo xtask snapshot-soak`.
pub fn snapshot_soak(args: &[String]) -> Result<(), String> {
    check_opts(args, &["--rounds", "--seed"])?;
    let rounds: u32 = opt_value(args, "--rounds")?.unwrap_or(50);
    let seed: u64 = opt_value(args, "--seed")?.unwrap_or_else(Rng::clock_seed);
    if let Err(e) = kvm_usable() {
        if is_ci() && Path::new("/dev/kvm").exists() {
            return Err(format!("snapshot-soak: {e} (CI=true)"));
        }
        println!("snapshot-soak: SKIPPED: {e}");
        return Ok(());
    }
    let vmm = build_vmm()?;
    let ring = Command::new(&vmm)
        .args(["caps", "--json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .is_some_and(|v| v["dirty_ring"] == true);
    println!("\n==> xtask snapshot-soak: {rounds} snapshot chains, each restored eagerly and lazily, seed {seed} (rerun with --seed {seed})");
    let dir = std::env::temp_dir().join(format!("clearlog-snapshot-soak-{}", std::process::id()));
    let mut rng = Rng::new(seed);
    let mut t = Totals::default();
    let start = Instant::now();
    for i in 0..rounds {
        let chain = Chain::random(&mut rng, ring);
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = Instant::now();
        let verdict = run_chain(&vmm, &chain, &dir, &mut t);
        let _ = std::fs::remove_dir_all(&dir);
        t.chains += 1;
        let ok = verdict.is_ok();
        if ok {
            t.ok += 1;
        } else {
            t.failed += 1;
        }
        println!(
            "  {:>3}/{rounds} {:<58} {:>5.1}s {} {}",
            i + 1,
            chain.describe(),
            t0.elapsed().as_secs_f64(),
            if ok { "ok" } else { "FAIL" },
            verdict.unwrap_or_else(|e| e)
        );
    }
    println!(
        "\n==> xtask snapshot-soak summary (seed {seed}, {:.0} s): {} chains, {} ok, {} failed; {} restores verified; {} chains lost pages on purpose, {} refused both ways, {} lost pages not caught",
        start.elapsed().as_secs_f64(),
        t.chains,
        t.ok,
        t.failed,
        t.restores_verified,
        t.loss_chains,
        t.losses_refused,
        t.losses_undetected
    );
    if t.failed > 0 || t.losses_undetected > 0 {
        return Err(format!(
            "snapshot-soak: {} chain(s) failed, {} loss(es) not caught (seed {seed})",
            t.failed, t.losses_undetected
        ));
    }
    Ok(())
}

/// Take the chain and restore it both ways; what happened, or why it is a failure.
fn run_chain(vmm: &Path, chain: &Chain, dir: &Path, t: &mut Totals) -> Result<String, String> {
    let out = Command::new(vmm)
        .args(chain.snapshot_args(dir))
        .output()
        .map_err(|e| format!("vmm snapshot: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vmm snapshot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("vmm snapshot --json: {e}"))?;
    let lost = v["lost_dirty_bits"].as_u64().unwrap_or(0);
    let newest = v["newest"].as_str().ok_or("no newest file in the JSON")?;
    let pauses = format!(
        "diff pause median {:.1} ms",
        v["diff_pause_ms_median"].as_f64().unwrap_or(0.0)
    );
    if chain.lose.is_some() {
        t.loss_chains += 1;
    }
    let mut refused = 0;
    for lazy in [false, true] {
        let from = format!("file:{newest}");
        let mut args = vec![
            "incoming",
            "--from",
            &from,
            "--run-after",
            "200ms",
            "--json",
        ];
        if lazy {
            args.push("--lazy");
        }
        let r = Command::new(vmm)
            .args(&args)
            .output()
            .map_err(|e| format!("vmm incoming: {e}"))?;
        let how = if lazy { "lazy" } else { "eager" };
        match (r.status.code(), lost > 0) {
            (Some(0), false) => {
                let j: serde_json::Value = serde_json::from_slice(&r.stdout)
                    .map_err(|e| format!("{how} restore --json: {e}"))?;
                if chain.increment && j["increment_consistent"] != true {
                    return Err(format!(
                        "{how} restore: the increment rule does not hold: {j}"
                    ));
                }
                t.restores_verified += 1;
            }
            (Some(0), true) => {
                t.losses_undetected += 1;
                return Err(format!(
                    "{how} restore said verified, but {lost} dirty bits were dropped: a lost page"
                ));
            }
            (Some(3), true) => refused += 1,
            (code, _) => {
                return Err(format!(
                    "{how} restore exited {code:?}: {}",
                    String::from_utf8_lossy(&r.stderr).trim()
                ))
            }
        }
    }
    if lost > 0 && refused == 2 {
        t.losses_refused += 1;
        return Ok(format!(
            "{lost} dirty bits dropped, refused both ways; {pauses}"
        ));
    }
    if chain.lose.is_some() && lost == 0 {
        return Ok(format!(
            "no dirty bit to drop in the last snapshot; {pauses}"
        ));
    }
    Ok(pauses)
}
