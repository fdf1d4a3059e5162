// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The scenarios `vmm bench` and `vmm ladder` run: [`BenchScenario`] (`legacy-qemu`, `legacy`,
//! `clear:SIZE`, `ring[:SIZE]`), its table label, what the legend says of it and the `vmm run`
//! flags that select it, and the [`BenchTransport`] (`plain:N`, `tls:N`) each scenario runs over.

use crate::args::MidPassSync;
use crate::units::{fmt_duration, fmt_size, human_bytes, parse_size};
use crate::{CliError, CliResult};

/// One scenario of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchScenario {
    /// KVM legacy dirty log as QEMU drives it: one sync per pass (`--mid-pass-sync off` whatever
    /// the bench's `--mid-pass-sync`), the seed's baseline.
    LegacyQemu,
    /// KVM legacy dirty log, clear everything at every sync; syncs within passes as the bench's
    /// `--mid-pass-sync` says (every 250ms by default).
    Legacy,
    /// Manual protect + KVM_CLEAR_DIRTY_LOG in chunks of this many bytes.
    Clear(u64),
    /// KVM's dirty ring of this many bytes per vCPU (`ring` = the `vmm run` default, 64K).
    Ring(u64),
    /// Clear chunks of this many bytes for the first pass, then postcopy (`--postcopy`).
    Postcopy(u64),
}

/// `postcopy` without a size: the first pass in clear chunks of 1 MiB.
const POSTCOPY_CHUNK: u64 = 1 << 20;

impl BenchScenario {
    /// Parse `legacy-qemu`, `legacy`, `clear:SIZE`, `ring`, `ring:SIZE`, `postcopy` or
    /// `postcopy:SIZE`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "postcopy" {
            return Ok(BenchScenario::Postcopy(POSTCOPY_CHUNK));
        }
        if let Some(size) = s.strip_prefix("postcopy:") {
            return match BenchScenario::parse(&format!("clear:{size}"))? {
                BenchScenario::Clear(b) => Ok(BenchScenario::Postcopy(b)),
                _ => unreachable!("clear:SIZE parses to Clear"),
            };
        }
        if s == "legacy" {
            return Ok(BenchScenario::Legacy);
        }
        if s == "legacy-qemu" {
            return Ok(BenchScenario::LegacyQemu);
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
                "mode `{s}`: use `legacy-qemu`, `legacy`, `clear:SIZE` like clear:128M, `ring`, `ring:SIZE` like ring:64K, `postcopy` or `postcopy:SIZE`"
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
            BenchScenario::LegacyQemu => "legacy-qemu".into(),
            BenchScenario::Legacy => "legacy".into(),
            BenchScenario::Clear(b) => format!("clear {}", human_bytes(*b)),
            BenchScenario::Ring(b) => format!("ring {}", human_bytes(*b)),
            BenchScenario::Postcopy(b) => format!("postcopy {}", human_bytes(*b)),
        }
    }

    /// The `--mid-pass-sync` of this scenario's source, given the bench's: off for `legacy-qemu`
    /// (and meaningless for `clear`, whose engine never syncs within a pass).
    pub fn mid_pass_sync(&self, configured: MidPassSync) -> MidPassSync {
        match self {
            BenchScenario::LegacyQemu => MidPassSync(None),
            _ => configured,
        }
    }

    /// What the table's legend says of the scenario, with the bench's `--mid-pass-sync`:
    /// `legacy (QEMU-style: one sync per pass)`, `legacy (syncs within passes: --mid-pass-sync
    /// 250ms)`.
    pub fn describe(&self, configured: MidPassSync) -> String {
        let syncs = match configured.0 {
            Some(d) => format!("syncs within passes: --mid-pass-sync {}", fmt_duration(d)),
            None => "one sync per pass: --mid-pass-sync off".into(),
        };
        match self {
            BenchScenario::LegacyQemu => "legacy (QEMU-style: one sync per pass)".into(),
            BenchScenario::Legacy => format!("legacy ({syncs})"),
            BenchScenario::Clear(_) => {
                "KVM_CLEAR_DIRTY_LOG, each chunk re-protected just before it is sent".into()
            }
            BenchScenario::Ring(b) => {
                format!("dirty ring of {} per vCPU ({syncs})", fmt_size(*b))
            }
            BenchScenario::Postcopy(b) => format!(
                "postcopy after a first pass in clear chunks of {}: the destination resumes with \
                 the pages still dirty missing",
                fmt_size(*b)
            ),
        }
    }

    pub(crate) fn run_args(&self) -> Vec<String> {
        match self {
            BenchScenario::Legacy | BenchScenario::LegacyQemu => {
                vec!["--dirty-log".into(), "legacy".into()]
            }
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
            BenchScenario::Postcopy(b) => {
                let mut args = BenchScenario::Clear(*b).run_args();
                args.push("--postcopy".into());
                args
            }
        }
    }
}

/// How a run's migration travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchTransport {
    /// Page channels (0: one version-1 stream).
    pub channels: u32,
    /// Mutual TLS on every channel.
    pub tls: bool,
}

impl BenchTransport {
    /// Plaintext over `channels` page channels.
    pub fn plain(channels: u32) -> Self {
        BenchTransport {
            channels,
            tls: false,
        }
    }

    /// Parse `plain:N` or `tls:N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "transport `{s}`: use plain:N or tls:N (N page channels, 1 to {})",
                clearlog_migration::wire::MAX_CHANNELS
            )
        };
        let (kind, n) = s.split_once(':').ok_or_else(bad)?;
        let channels: u32 = n.parse().map_err(|_| bad())?;
        if channels > clearlog_migration::wire::MAX_CHANNELS {
            return Err(bad());
        }
        match kind {
            "plain" => Ok(BenchTransport::plain(channels)),
            "tls" if channels == 0 => Err(format!(
                "transport `{s}`: TLS runs over a session (tls:1 or more)"
            )),
            "tls" => Ok(BenchTransport {
                channels,
                tls: true,
            }),
            _ => Err(bad()),
        }
    }

    /// Table label.
    pub fn label(&self) -> String {
        match (self.tls, self.channels) {
            (false, 0) => "v1 stream".into(),
            (false, n) => format!("plain x{n}"),
            (true, n) => format!("tls x{n}"),
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
            BenchScenario::parse("legacy-qemu").unwrap(),
            BenchScenario::LegacyQemu
        );
        assert_eq!(BenchScenario::LegacyQemu.label(), "legacy-qemu");
        assert_eq!(
            BenchScenario::parse("postcopy").unwrap(),
            BenchScenario::Postcopy(1 << 20)
        );
        let p = BenchScenario::parse("postcopy:16M").unwrap();
        assert_eq!(p, BenchScenario::Postcopy(16 << 20));
        assert_eq!(p.label(), "postcopy 16 MiB");
        assert!(p.run_args().ends_with(&[
            "--clear-chunk".into(),
            (16u64 << 20).to_string(),
            "--postcopy".into()
        ]));
        assert!(BenchScenario::parse("postcopy:3M").is_err());
        assert!(BenchScenario::parse("legacy-kvm")
            .unwrap_err()
            .contains("`legacy-qemu`, `legacy`"));
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
    fn only_legacy_qemu_turns_mid_pass_syncs_off() {
        let every = MidPassSync(Some(std::time::Duration::from_millis(250)));
        let qemu = BenchScenario::LegacyQemu;
        assert_eq!(qemu.mid_pass_sync(every), MidPassSync(None));
        assert_eq!(BenchScenario::Legacy.mid_pass_sync(every), every);
        assert_eq!(qemu.run_args(), BenchScenario::Legacy.run_args());
        assert_eq!(
            qemu.describe(every),
            "legacy (QEMU-style: one sync per pass)"
        );
        assert_eq!(
            BenchScenario::Legacy.describe(every),
            "legacy (syncs within passes: --mid-pass-sync 250ms)"
        );
        assert_eq!(
            BenchScenario::Legacy.describe(MidPassSync(None)),
            "legacy (one sync per pass: --mid-pass-sync off)"
        );
        assert_eq!(
            BenchScenario::Ring(16 << 10).describe(every),
            "dirty ring of 16K per vCPU (syncs within passes: --mid-pass-sync 250ms)"
        );
    }

    #[test]
    fn transports_parse() {
        let t = |s| BenchTransport::parse(s);
        assert_eq!(t("plain:2").unwrap(), BenchTransport::plain(2));
        assert_eq!(t("plain:0").unwrap().label(), "v1 stream");
        assert_eq!(t("tls:4").unwrap().label(), "tls x4");
        assert!(t("tls:0").unwrap_err().contains("tls:1 or more"));
        t("plain:65").unwrap_err();
        t("quic:2").unwrap_err();
        t("plain").unwrap_err();
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
