// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The scenarios `vmm bench` and `vmm ladder` run: [`BenchScenario`] (`legacy`, `clear:SIZE`,
//! `ring[:SIZE]`), its table label and the `vmm run` flags that select it.

use crate::units::{human_bytes, parse_size};
use crate::{CliError, CliResult};

/// One scenario of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchScenario {
    /// KVM legacy dirty log, clear everything at every sync.
    Legacy,
    /// Manual protect + KVM_CLEAR_DIRTY_LOG in chunks of this many bytes.
    Clear(u64),
    /// KVM's dirty ring of this many bytes per vCPU (`ring` = the `vmm run` default, 64K).
    Ring(u64),
}

impl BenchScenario {
    /// Parse `legacy`, `clear:SIZE`, `ring` or `ring:SIZE`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "legacy" {
            return Ok(BenchScenario::Legacy);
        }
        if s == "ring" {
            return Ok(BenchScenario::Ring(64 << 10));
        }
        if let Some(size) = s.strip_prefix("ring:") {
            let bytes = parse_size(size).map_err(|e| format!("mode `{s}`: {e}"))?;
            if !bytes.is_power_of_two() || bytes < u64::from(clearlog_kvm::RING_MIN_BYTES) {
                return Err(format!(
                    "mode `{s}`: the ring size must be a power of two of at least 4K (`vmm caps` shows this kernel's maximum)"
                ));
            }
            return Ok(BenchScenario::Ring(bytes));
        }
        let Some(size) = s.strip_prefix("clear:") else {
            return Err(format!(
                "mode `{s}`: use `legacy`, `clear:SIZE` like clear:128M, `ring` or `ring:SIZE` like ring:64K"
            ));
        };
        let bytes = parse_size(size).map_err(|e| format!("mode `{s}`: {e}"))?;
        clearlog_migration::MigrationDirtyLogMode::from_clear_chunk_bytes(bytes)
            .map_err(|e| format!("mode `{s}`: {e} (a power of two from 256K to 8T)"))?;
        Ok(BenchScenario::Clear(bytes))
    }

    /// Table label.
    pub fn label(&self) -> String {
        match self {
            BenchScenario::Legacy => "legacy".into(),
            BenchScenario::Clear(b) => format!("clear {}", human_bytes(*b)),
            BenchScenario::Ring(b) => format!("ring {}", human_bytes(*b)),
        }
    }

    pub(crate) fn run_args(&self) -> Vec<String> {
        match self {
            BenchScenario::Legacy => vec!["--dirty-log".into(), "legacy".into()],
            BenchScenario::Ring(b) => vec![
                "--dirty-log".into(),
                "ring".into(),
                "--ring-size".into(),
                b.to_string(),
            ],
            BenchScenario::Clear(b) => {
                vec![
                    "--dirty-log".into(),
                    "clear".into(),
                    "--clear-chunk".into(),
                    b.to_string(),
                ]
            }
        }
    }
}

/// `--runs` and `--modes` of `vmm bench` and `vmm ladder`, checked (`example` shows a valid
/// `--modes` in the error).
pub(crate) fn runs_and_modes(
    runs: u32,
    modes: &[String],
    example: &str,
) -> CliResult<Vec<BenchScenario>> {
    if runs == 0 {
        return Err(CliError::Usage("--runs must be at least 1".into()));
    }
    let modes = modes
        .iter()
        .map(|m| BenchScenario::parse(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::Usage)?;
    if modes.is_empty() {
        return Err(CliError::Usage(format!(
            "--modes is empty: give e.g. {example}"
        )));
    }
    Ok(modes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(
            BenchScenario::parse("legacy").unwrap(),
            BenchScenario::Legacy
        );
        assert_eq!(
            BenchScenario::parse("clear:128M").unwrap(),
            BenchScenario::Clear(128 << 20)
        );
        assert_eq!(
            BenchScenario::parse("clear:1G").unwrap().label(),
            "clear 1 GiB"
        );
        BenchScenario::parse("clear:3M").unwrap_err();
        BenchScenario::parse("clear:4K").unwrap_err();
        assert_eq!(
            BenchScenario::parse("ring").unwrap(),
            BenchScenario::Ring(64 << 10)
        );
        assert_eq!(
            BenchScenario::parse("ring:16K").unwrap().label(),
            "ring 16 KiB"
        );
        BenchScenario::parse("ring:3K").unwrap_err();
        BenchScenario::parse("ring:48K").unwrap_err();
        BenchScenario::parse("fast").unwrap_err();
    }

    #[test]
    fn runs_and_modes_are_checked() {
        runs_and_modes(0, &["legacy".into()], "legacy").unwrap_err();
        runs_and_modes(1, &[], "legacy").unwrap_err();
        assert_eq!(
            runs_and_modes(2, &["ring".into()], "x").unwrap(),
            [BenchScenario::Ring(64 << 10)]
        );
        assert_eq!(
            BenchScenario::Clear(1 << 20).run_args(),
            ["--dirty-log", "clear", "--clear-chunk", "1048576"]
        );
    }
}
