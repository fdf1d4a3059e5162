// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Command-line arguments (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use clearlog_migration::PostcopyPolicy;

use crate::units::{parse_duration, parse_rate, parse_size};

/// Measure live migration of KVM guests, with and without KVM_CLEAR_DIRTY_LOG.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Cli {
    /// Log filter for tracing output on stderr (e.g. `info`, `clearlog_kvm=debug`); also RUST_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// What this host's KVM offers, and which dirty-log mode `vmm` would use.
    Caps {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Destination: wait for one migration (or restore a saved one), verify, resume.
    Incoming(IncomingArgs),
    /// Source: boot a guest workload, optionally migrate it.
    Run(RunArgs),
    /// Boot a guest workload and take live snapshots of it: a full one, then diffs holding only
    /// what changed, each pausing the guest only for its last delta (restore with `vmm incoming
    /// --from file:PATH`, optionally `--lazy`).
    Snapshot(SnapshotArgs),
    /// Run source and destination as two processes on loopback TCP for each mode, print the table.
    Bench(BenchArgs),
    /// Boot a guest workload and measure its dirty rate; predict whether a migration at
    /// --bandwidth with --downtime converges (same as `vmm run --dirtyrate MODE,DURATION`).
    Dirtyrate(DirtyrateArgs),
    /// The scale ladder: `bench` runs over growing guest sizes (4G..256G) with a fixed working
    /// set, legacy vs clear, reporting each cost per GiB of guest RAM.
    #[command(long_about = LADDER_ABOUT)]
    Ladder(LadderArgs),
    /// Write the `random` workload as a Multiboot kernel for QEMU's `-kernel` (the QEMU side of
    /// `vmm bench --compare`; `cargo xtask qemu-bench` runs it).
    QemuImage(QemuImageArgs),
}

/// `vmm qemu-image`.
#[derive(Debug, Args)]
pub struct QemuImageArgs {
    /// Guest shape and workload (the working set starts at 1 MiB, as in `vmm run`).
    #[command(flatten)]
    pub guest: GuestArgs,
    /// PRNG seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where to write the image.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

const LADDER_ABOUT: &str = "\
The scale ladder: how migration costs grow with guest RAM when the working set does not.

For each size of --ladder-sizes (default 4G,16G,64G,256G) and each mode of --modes (default
legacy,clear:16M), interleaved, N runs (--runs, default 1): a `vmm incoming` and a `vmm run
--migrate-to` process on loopback TCP, a `random` workload on a --wss working set (default 1G)
at --dirty-rate (default 96M), --bandwidth 400M, --downtime 100ms.

Per run and per GiB of guest RAM it reports: total time, first-pass time, downtime (and its
breakdown), guest-visible downtime, time per dirty-log sync, clear calls and time, log start
(setup), zero-range pages, verification after resume, and the peak RSS (VmHWM) of the source
and destination processes. A table on stdout; one JSON object per run with --json FILE.

Every run must verify (source and destination `verified: true`; with --ram-fingerprint the RAM
fingerprints must match too, which costs a pass over all RAM on each side: off by default).
Any run that does not verify makes the command exit 1.

Guests above 127 GiB are fine: untouched RAM costs nothing, and the guest only touches its
working set (which must lie in the first 127 GiB).";

/// `vmm incoming`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["listen", "from"])))]
pub struct IncomingArgs {
    /// Where to listen: `tcp:HOST:PORT` or `unix:PATH` (listens on that address only).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Restore a saved migration, or a snapshot chain (`vmm snapshot`; give its newest file):
    /// `file:PATH`.
    #[arg(long, value_name = "file:PATH")]
    pub from: Option<String>,
    /// With `--from` a snapshot: resume the guest at once and place its pages on demand
    /// (userfaultfd) and in the background, each checked against the snapshot's digests.
    #[arg(long, requires = "from")]
    pub lazy: bool,
    /// Write the guest RAM at switchover (before resuming) to PATH (guest physical 0 at offset 0).
    #[arg(long, value_name = "PATH")]
    pub save_memory: Option<PathBuf>,
    /// Keep the resumed guest running this long, then check it makes progress and exit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "1s")]
    pub run_after: Duration,
    /// Give up (without resuming anything) when the source sends nothing for this long, instead of
    /// waiting forever on a dead link. `0` waits forever.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "60s")]
    pub io_timeout: Duration,
    /// If a postcopy is cut after its commit (the guest runs here with pages missing), keep
    /// listening this long for the source to come back and finish it (`--listen` only; the
    /// source needs `--postcopy-recover-timeout` too). Without it a cut ends with exit code 4.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub postcopy_recover_timeout: Option<Duration>,
    /// Print a fingerprint of guest RAM at switchover (before resuming), to compare with the
    /// source's (`vmm run --ram-fingerprint`). Costs a pass over all RAM before the guest resumes.
    #[arg(long)]
    pub ram_fingerprint: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Listen on a TCP address other than loopback without TLS: anyone who can reach the port
    /// could write the guest's memory. Refused without this flag.
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure_plaintext: bool,
    /// Accept only sources that complete mutual TLS 1.3 with the files in DIR: `ca.pem` (the CA
    /// that signs both sides' certificates), `cert.pem` and `key.pem` (this destination's
    /// certificate and key). `tcp:` only.
    #[arg(long, value_name = "DIR", requires = "listen")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: accept only a source whose certificate is valid for one of these names
    /// (DNS names or IP addresses, comma-separated or repeated) [default: any certificate the CA
    /// signed].
    #[arg(
        long,
        value_name = "NAME[,NAME...]",
        value_delimiter = ',',
        requires = "tls_dir"
    )]
    pub tls_authz: Vec<String>,
    /// How long a connection may take to say what it is (its TLS handshake, then its first
    /// message) before it is refused; also how long a session's page channels may take to join.
    /// A refused connection never ends the wait.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// `hide-populated=N`: before the stream, fill the last N pages of guest RAM with data (memory
    /// that was not zero before the migration) and leave them out of this side's populated-pages
    /// answer. The destination reads every page it receives as zero, so the migration must
    /// still end with exactly the source's memory (`stale_pages_zeroed` counts them).
    #[arg(long, value_name = "hide-populated=N", help_heading = "Testing")]
    pub fault: Option<crate::fault::Fault>,
}

/// The guest workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Paced random page writes over the working set.
    Random,
    /// Sweep the working set adding 1 to the first byte of each page (QEMU's migration test).
    Increment,
    /// Spin.
    Idle,
    /// A user's flat binary (`--image`, `--load-addr`).
    Image,
}

/// The CLI's dirty-log mode (`--dirty-log`): it picks the VM's `KvmDirtyLogMode` and the
/// engine's `MigrationDirtyLogMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliDirtyLogMode {
    /// The accelerator clears (re-protects) everything at every sync.
    Legacy,
    /// KVM_CLEAR_DIRTY_LOG: re-protect each chunk just before sending it.
    Clear,
    /// KVM's per-vCPU dirty ring (`--ring-size`): harvest and reset re-protect. Never the default
    /// (on PVM hosts the kernel can lose ring entries when emulated ring-0 code fills a ring).
    Ring,
}

/// `vmm snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Guest shape and workload.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// The workload.
    #[arg(long, value_enum, default_value = "random")]
    pub workload: WorkloadKind,
    /// Dirty-log mode.
    #[arg(long, value_enum, default_value = "clear")]
    pub dirty_log: CliDirtyLogMode,
    /// Dirty ring size per vCPU in bytes (`ring` mode).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "64K")]
    pub ring_size: u64,
    /// Run the workload this long before the first snapshot.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "2s")]
    pub warmup: Duration,
    /// Directory of the files: `snap-0.clsnap` (full), then `snap-1.clsnap`... (diffs, each
    /// naming its parent).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Snapshots to take, the full one included.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub count: u32,
    /// Start a snapshot this often (the diff holds what changed since the last one).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "2s")]
    pub every: Duration,
    /// Do not fdatasync the files (faster; a crash may lose a snapshot, never mix one up: the
    /// header that makes a file a snapshot is written last).
    #[arg(long)]
    pub no_sync: bool,
    /// Compress each file's runs of 64 pages with lz4, after the pause (a run keeps its fixed
    /// offset; the space it no longer needs becomes a hole).
    #[arg(long)]
    pub compress: bool,
    /// Hash every page during the pause, instead of after it under write-protection.
    #[arg(long)]
    pub digests_in_pause: bool,
    /// After the chain, also take a full snapshot with the guest paused throughout (the usual
    /// way), into `full-paused.clsnap`, and report its pause beside the live ones.
    #[arg(long)]
    pub paused_full_dump: bool,
    /// Print the stats as JSON.
    #[arg(long)]
    pub json: bool,
    /// Testing: `lose-dirty-bits=N` drops N pages from the last snapshot's deltas (the first N
    /// its first delta reports), so they hold stale data in the chain: a restore must refuse it
    /// (exit code 3).
    #[arg(long, value_name = "lose-dirty-bits=N", help_heading = "Testing")]
    pub fault: Option<crate::fault::Fault>,
}

/// Guest shape and workload (shared by `run` and `bench`).
#[derive(Debug, Clone, Args)]
pub struct GuestArgs {
    /// Guest RAM size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "4G")]
    pub mem: u64,
    /// Working set the workload writes (starting at 1 MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "3G")]
    pub wss: u64,
    /// Target guest dirty rate in bytes/s [default for `random`: 288M; `increment` is unpaced
    /// unless given].
    #[arg(long, value_name = "RATE", value_parser = parse_rate, allow_hyphen_values = true)]
    pub dirty_rate: Option<u64>,
    /// vCPUs (1 to 64): each runs its own instance of the workload over its own part of the
    /// working set; `--dirty-rate` is the whole guest's, shared equally.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
}

/// The reference workload's dirty rate (docs/bench/README.md, "The reference workload").
pub const DEFAULT_DIRTY_RATE: u64 = 288 << 20;

/// Migration settings (shared by `run` and `bench`).
#[derive(Debug, Clone, Args)]
pub struct MigrationArgs {
    /// Bandwidth limit of the live phase in bytes/s, or `unlimited` (stored as 0).
    #[arg(long, value_name = "RATE|unlimited", value_parser = parse_bandwidth, allow_hyphen_values = true, default_value = "400M")]
    pub bandwidth: u64,
    /// Downtime limit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "100ms")]
    pub downtime: Duration,
    /// Bandwidth the switchover estimate assumes for the paused phase, bytes/s (like QEMU 8.2's
    /// avail-switchover-bandwidth) [default: off, the measured live-phase bandwidth].
    #[arg(long, value_name = "RATE", value_parser = parse_rate, allow_hyphen_values = true)]
    pub switchover_bandwidth: Option<u64>,
    /// Legacy and ring modes: also sync the dirty log this often within a pass (stretched to 50x
    /// the last sync's duration), or `off` for one sync per pass as QEMU does (`vmm bench`'s
    /// `legacy-qemu` rows are always off).
    #[arg(long, value_name = "DURATION|off", value_parser = parse_mid_pass_sync, default_value = "250ms")]
    pub mid_pass_sync: MidPassSync,
    /// Page channels of the session (`tcp:` and `unix:`; 1 to 64): each is a connection of its
    /// own with a thread on each side. `0`: one version-1 stream, what a destination that speaks
    /// only version 1 reads. A `file:` snapshot is always one stream.
    #[arg(long, value_name = "N", default_value_t = clearlog_migration::DEFAULT_CHANNELS)]
    pub channels: u32,
    /// Switch to postcopy: the destination resumes with the pages still dirty missing and gets
    /// them after (the ones its guest touches first). `--postcopy` alone: after the first pass;
    /// `--postcopy N`: after N passes; `--postcopy auto`: after the first pass unless the
    /// convergence model says precopy ends within the downtime limit in 3 more passes. Needs a
    /// session (`tcp:`/`unix:` with `--channels` 1 or more).
    #[arg(long, value_name = "N|auto", num_args = 0..=1, default_missing_value = "1", value_parser = parse_postcopy)]
    pub postcopy: Option<PostcopyPolicy>,
    /// Switch to postcopy after N passes (the same as `--postcopy N`).
    #[arg(long, value_name = "N", conflicts_with = "postcopy", value_parser = parse_postcopy_after)]
    pub postcopy_after: Option<PostcopyPolicy>,
}

impl MigrationArgs {
    /// `--postcopy` or `--postcopy-after`, off when neither is given.
    pub fn postcopy_policy(&self) -> PostcopyPolicy {
        self.postcopy.or(self.postcopy_after).unwrap_or_default()
    }
}

/// `--postcopy`: a number of passes (at least 1), or `auto`.
fn parse_postcopy(s: &str) -> Result<PostcopyPolicy, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(PostcopyPolicy::Auto);
    }
    parse_postcopy_after(s)
}

/// `--postcopy-after`: a number of passes, at least 1.
fn parse_postcopy_after(s: &str) -> Result<PostcopyPolicy, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(PostcopyPolicy::AfterPasses(n)),
        _ => Err(format!("`{s}`: a number of passes (1 or more), or auto")),
    }
}

/// `--bandwidth`: a positive rate, or `unlimited` (0, as the library's
/// `bandwidth_limit_bytes_per_s`). A rate of zero is refused: it reads like "no bandwidth".
fn parse_bandwidth(s: &str) -> Result<u64, String> {
    if s.trim().eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    match parse_rate(s)? {
        0 => Err("--bandwidth must be positive (e.g. 400M for 400 MiB/s), or unlimited".into()),
        r => Ok(r),
    }
}

/// `--bandwidth` as it is given on a command line (`unlimited` for 0).
pub fn bandwidth_arg(bandwidth: u64) -> String {
    match bandwidth {
        0 => "unlimited".into(),
        b => b.to_string(),
    }
}

/// `--mid-pass-sync`: an interval, or `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MidPassSync(pub Option<Duration>);

impl std::fmt::Display for MidPassSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{}ms", d.as_millis()),
            None => f.write_str("off"),
        }
    }
}

fn parse_mid_pass_sync(s: &str) -> Result<MidPassSync, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(MidPassSync(None));
    }
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("`{s}`: use a positive interval, or off")),
        d => Ok(MidPassSync(Some(d))),
    }
}

/// How a source authenticates its destination (`vmm run`).
#[derive(Debug, Clone, Default, Args)]
pub struct SourceTlsArgs {
    /// Migrate over mutual TLS 1.3 with the files in DIR: `ca.pem` (the CA that signs both sides'
    /// certificates), `cert.pem` and `key.pem` (this source's certificate and key). `tcp:`
    /// sessions only (`--channels` 1 or more).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the name the destination's certificate must be valid for (a DNS name or an
    /// IP address) [default: the host of the migration URI].
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_hostname: Option<String>,
}

/// `vmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest shape and workload.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// The workload.
    #[arg(long, value_enum, default_value = "random")]
    pub workload: WorkloadKind,
    /// Flat binary for `--workload image`.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Guest-physical load address (and entry point) of `--image`.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub load_addr: Option<u64>,
    /// Migrate to `tcp:HOST:PORT`, `unix:PATH` or `file:PATH`. Without it the guest runs for `--warmup`.
    #[arg(long, value_name = "URI")]
    pub migrate_to: Option<String>,
    /// If the migration to `--migrate-to` fails, migrate to this URI instead, in the same process
    /// (repeatable: tried in order until one succeeds). The guest keeps running between attempts.
    #[arg(long, value_name = "URI", requires = "migrate_to")]
    pub retry_to: Vec<String>,
    /// Fail a TCP migration whose connection accepts no data for this long (send timeout and
    /// TCP_USER_TIMEOUT), instead of waiting for the kernel to give up (~15 min).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "10s")]
    pub io_timeout: Duration,
    /// If the postcopy is cut after its commit, keep the guest paused and reconnect to
    /// `--migrate-to` (new sessions, same settings) for this long to finish it (the destination
    /// needs `--postcopy-recover-timeout` too). Without it a cut ends with exit code 4.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "migrate_to")]
    pub postcopy_recover_timeout: Option<Duration>,
    /// TLS.
    #[command(flatten)]
    pub tls: SourceTlsArgs,
    /// Migration settings.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Dirty-log mode.
    #[arg(long, value_enum, default_value = "clear")]
    pub dirty_log: CliDirtyLogMode,
    /// Clear chunk size (`clear` mode): a power of two from 256K (64 pages) to 8T (2^31 pages).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "16M")]
    pub clear_chunk: u64,
    /// Dirty ring size per vCPU in bytes (`ring` mode): a power of two within the kernel's range
    /// (`vmm caps` shows it).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "64K")]
    pub ring_size: u64,
    /// Run the workload this long before migrating.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "2s")]
    pub warmup: Duration,
    /// Give up when not converged after this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "300s")]
    pub max_time: Duration,
    /// After a successful migration, print a fingerprint of the (paused) source RAM, to compare
    /// with the destination's (`vmm incoming --ram-fingerprint`).
    #[arg(long)]
    pub ram_fingerprint: bool,
    /// Print the stats as JSON.
    #[arg(long)]
    pub json: bool,
    /// After the warm-up, measure the guest's dirty rate (MODE: sample, bitmap or ring; DURATION
    /// default 1s) and print it with the convergence verdict for --bandwidth and --downtime
    /// (a line of JSON with --json), before migrating (if --migrate-to) or exiting.
    #[arg(long, value_name = "MODE[,DURATION]", value_parser = parse_dirtyrate_spec)]
    pub dirtyrate: Option<DirtyrateSpec>,
    /// Pages hashed per GiB of guest RAM by `--dirtyrate sample`.
    #[arg(long, value_name = "N", default_value_t = clearlog_migration::dirtyrate::DEFAULT_SAMPLE_PAGES_PER_GIB)]
    pub sample_pages: u32,
    /// Make the N-th call of one step of the first migration fail (STEP[@N], N from 1): sync,
    /// clear, read, send, drain (a session), pause, save-state, ack, confirm. The source must report the step, stop logging and
    /// keep its guest running; `--retry-to` migrations run clean. For `cargo xtask faults`.
    #[arg(long, value_name = "STEP[@N]", help_heading = "Testing")]
    pub fail_at: Option<crate::fault::FaultPlan>,
    /// A loss made on purpose; the default verification must then fail the migration on both
    /// sides (exit code 3) naming the pages. `lose-dirty-bits=N`: the source drops N dirty bits
    /// found at the sync after the first pass, so those pages are not resent.
    /// `hide-populated=N`: the source's populated-pages answer leaves out N pages that hold data
    /// (as a misclassified mapping would), so they are sent as zero.
    #[arg(long, value_name = "KIND=N", help_heading = "Testing")]
    pub fault: Option<crate::fault::Fault>,
}

/// `vmm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Guest shape and workload.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Migration settings.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Modes to compare: `legacy-qemu` (KVM's legacy dirty log with one sync per pass, as QEMU
    /// drives it: `--mid-pass-sync off` for that row), `legacy` (the same log, syncing within
    /// passes as --mid-pass-sync says), `clear:CHUNK`, `ring` and `ring:SIZE` (dirty ring per
    /// vCPU), `postcopy` and `postcopy:CHUNK` (a first pass in clear chunks, 1M by default, then
    /// postcopy). The table has a ratio column to each legacy row it has, and a legend that says
    /// which is which.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "legacy-qemu,legacy,clear:1G,clear:128M,clear:16M,clear:1M"
    )]
    pub modes: Vec<String>,
    /// Transports to compare, each with every mode: `plain:N` (N page channels; `plain:0` is one
    /// version-1 stream) or `tls:N` (mutual TLS 1.3 on every channel, with a CA and certificates
    /// made for the bench) [default: plain with --channels].
    #[arg(long, value_delimiter = ',', value_name = "plain:N|tls:N")]
    pub transports: Vec<String>,
    /// Runs per mode.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Warm-up of each run before migrating.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "2s")]
    pub warmup: Duration,
    /// Write one JSON object per run to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw the runs as an SVG plot.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Add the migrations in FILE (JSON lines: `cargo xtask qemu-bench` output, raw QEMU
    /// `query-migrate` results, `vmm bench --json` lines) to a side-by-side table with medians
    /// and ratios to QEMU. With `--runs 0`, print that table from FILE alone.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
}

/// A dirty-rate measurement: mode and window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyrateSpec {
    /// How to measure.
    pub mode: clearlog_migration::dirtyrate::DirtyRateMode,
    /// The window.
    pub duration: Duration,
}

/// Parse `MODE[,DURATION]` (`sample`, `bitmap,500ms`...).
pub fn parse_dirtyrate_spec(s: &str) -> Result<DirtyrateSpec, String> {
    let (mode, duration) = match s.split_once(',') {
        Some((m, d)) => (m, parse_duration(d)?),
        None => (s, Duration::from_secs(1)),
    };
    let mode = mode.parse().map_err(|e| format!("{e}"))?;
    if duration.is_zero() {
        return Err("the dirty-rate window must be longer than zero, e.g. bitmap,1s".into());
    }
    Ok(DirtyrateSpec { mode, duration })
}

/// `vmm dirtyrate`.
#[derive(Debug, Args)]
pub struct DirtyrateArgs {
    /// Guest shape and workload.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// The workload.
    #[arg(long, value_enum, default_value = "random")]
    pub workload: WorkloadKind,
    /// How to measure: `sample` (hash sampled pages), `bitmap` (dirty logging) or `ring`
    /// (per-vCPU dirty rings).
    #[arg(long, default_value = "sample", value_parser = parse_mode)]
    pub mode: clearlog_migration::dirtyrate::DirtyRateMode,
    /// The measurement window.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "1s")]
    pub duration: Duration,
    /// Pages hashed per GiB of guest RAM in `sample` mode.
    #[arg(long, value_name = "N", default_value_t = clearlog_migration::dirtyrate::DEFAULT_SAMPLE_PAGES_PER_GIB)]
    pub sample_pages: u32,
    /// Bandwidth and downtime limit of the migration the verdict is about.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Dirty-log mode of the VM (`--mode ring` always runs the VM with the ring).
    #[arg(long, value_enum, default_value = "clear")]
    pub dirty_log: CliDirtyLogMode,
    /// Dirty ring size per vCPU in bytes (ring): a power of two within the kernel's range.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "64K")]
    pub ring_size: u64,
    /// Run the workload this long before measuring.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "1s")]
    pub warmup: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_mode(s: &str) -> Result<clearlog_migration::dirtyrate::DirtyRateMode, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// `vmm ladder`.
#[derive(Debug, Args)]
pub struct LadderArgs {
    /// Guest RAM sizes, run in this order (each a multiple of 2M, at most 1T).
    #[arg(long = "ladder-sizes", value_name = "SIZE,...", value_delimiter = ',', value_parser = parse_size, default_value = "4G,16G,64G,256G")]
    pub sizes: Vec<u64>,
    /// Working set the workload writes (starting at 1 MiB), the same at every size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "1G")]
    pub wss: u64,
    /// Guest dirty rate in bytes/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate, allow_hyphen_values = true, default_value = "96M")]
    pub dirty_rate: u64,
    /// Migration settings.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Modes to compare: `legacy-qemu` (one sync per pass, as QEMU does), `legacy` (syncs within
    /// passes as --mid-pass-sync says), `clear:CHUNK`, `ring` and `ring:SIZE` (dirty ring per vCPU),
    /// `postcopy` and `postcopy:CHUNK`.
    #[arg(long, value_delimiter = ',', default_value = "legacy,clear:16M")]
    pub modes: Vec<String>,
    /// Runs per size and mode.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Warm-up of each run before migrating.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true, default_value = "2s")]
    pub warmup: Duration,
    /// Also compare RAM fingerprints of source and destination (a pass over all RAM on each
    /// side: slow for big guests).
    #[arg(long)]
    pub ram_fingerprint: bool,
    /// Write one JSON object per run to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Parse a guest address: decimal, or hex with `0x`.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("`{s}` is not an address: use decimal or 0x-prefixed hex, like 0x200000"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn bandwidth_is_a_positive_rate_or_unlimited() {
        assert_eq!(parse_bandwidth("unlimited"), Ok(0));
        assert_eq!(parse_bandwidth("400M"), Ok(400 << 20));
        assert!(parse_bandwidth("0").unwrap_err().contains("or unlimited"));
        assert_eq!(bandwidth_arg(0), "unlimited");
        assert_eq!(parse_bandwidth(&bandwidth_arg(5 << 20)), Ok(5 << 20));
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn dirtyrate_specs() {
        use clearlog_migration::dirtyrate::DirtyRateMode;
        let s = parse_dirtyrate_spec("bitmap,500ms").unwrap();
        assert_eq!(
            (s.mode, s.duration),
            (DirtyRateMode::Bitmap, Duration::from_millis(500))
        );
        assert_eq!(
            parse_dirtyrate_spec("sample").unwrap().duration,
            Duration::from_secs(1)
        );
        assert!(parse_dirtyrate_spec("bits")
            .unwrap_err()
            .contains("sample, bitmap or ring"));
        parse_dirtyrate_spec("ring,0s").unwrap_err();
        parse_dirtyrate_spec("ring,fast").unwrap_err();
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("0x200000").unwrap(), 0x200000);
        assert_eq!(parse_addr("4096").unwrap(), 4096);
        parse_addr("zz").unwrap_err();
    }
}
