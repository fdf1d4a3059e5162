// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Migration parameters: dirty-log mode, limits, and their validation.

use std::time::Duration;

use clearlog_bitmap::ClearBitmap;

use crate::PAGE_SHIFT;

use crate::{Error, Result};

/// Default clear-bitmap shift: 2^12 pages = 16 MiB chunks.
///
/// Chosen from `vmm bench` runs of the reference workload: 16 MiB chunks migrate about as fast as
/// 1 MiB ones with 16x fewer `KVM_CLEAR_DIRTY_LOG` calls, and faster than 1 GiB ones (QEMU's
/// default, shift 18). The figures are in docs/bench/README.md ("Clear chunk size").
pub const DEFAULT_CLEAR_SHIFT: u8 = 12;

/// The default [`MigrationConfig::mid_pass_sync`] interval (legacy mode): see there.
pub const DEFAULT_MID_PASS_SYNC: Duration = Duration::from_millis(250);

/// Default downtime limit: 100 ms, the limit of the reference workload's experiment (QEMU's
/// default is 300 ms; docs/bench/README.md compares the downtime both reach).
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(100);

/// Default time the source waits for the destination's acknowledgement after the end marker. The
/// destination hashes all of its RAM before acknowledging (docs/bench/README.md, "Verification
/// cost"), so this leaves a wide margin for big guests on slow hosts.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// The migration engine's dirty-log mode: how the source re-arms the accelerator's dirty
/// tracking, and what a migration reports as its `mode` ([`crate::MigrationStats::mode`]).
///
/// The accelerator's own mode is its business (`clearlog_kvm::KvmDirtyLogMode` on KVM): the VMM
/// picks the engine mode that matches it. Manual protection (`KVM_CLEAR_DIRTY_LOG`) goes with
/// [`Clear`](Self::Clear); get-and-clear logging with [`Legacy`](Self::Legacy); KVM's dirty ring
/// with [`Ring`](Self::Ring).
///
/// # Examples
///
/// ```
/// use clearlog_migration::MigrationDirtyLogMode;
///
/// let mode = MigrationDirtyLogMode::from_clear_chunk_bytes(128 << 20).unwrap();
/// assert_eq!(mode, MigrationDirtyLogMode::Clear { shift: 15 });
/// assert_eq!(mode.clear_chunk_bytes(), Some(128 << 20));
/// assert_eq!(mode.name(), "clear");
/// assert_eq!(MigrationDirtyLogMode::Legacy.name(), "legacy");
/// assert_eq!(MigrationDirtyLogMode::Ring.name(), "ring");
/// assert!(MigrationDirtyLogMode::Ring.rearms_at_sync());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationDirtyLogMode {
    /// Re-arm whole RAM blocks right after every sync (what an accelerator without manual protect
    /// does inside its sync). Kept for comparison.
    Legacy,
    /// Re-arm chunks of `2^shift` pages lazily, just before the first page of the chunk is read
    /// (`KVM_CLEAR_DIRTY_LOG`).
    Clear {
        /// log2 of the chunk size in pages, `6..=31`.
        shift: u8,
    },
    /// The accelerator's sync re-arms what it reports (KVM's dirty ring: harvest and
    /// `KVM_RESET_DIRTY_RINGS`). The engine runs as in [`Legacy`](Self::Legacy) (its whole-block
    /// clears cost nothing there); the migration says `ring`.
    Ring,
}

impl Default for MigrationDirtyLogMode {
    fn default() -> Self {
        MigrationDirtyLogMode::Clear {
            shift: DEFAULT_CLEAR_SHIFT,
        }
    }
}

impl MigrationDirtyLogMode {
    /// Clear mode with chunks of `bytes` bytes (a power of two, at least 256 KiB = 64 pages).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidClearChunkBytes`](crate::Error::InvalidClearChunkBytes).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::MigrationDirtyLogMode;
    ///
    /// assert_eq!(
    ///     MigrationDirtyLogMode::from_clear_chunk_bytes(1 << 30).unwrap(),
    ///     MigrationDirtyLogMode::Clear { shift: 18 }
    /// );
    /// assert!(MigrationDirtyLogMode::from_clear_chunk_bytes(4096).is_err());
    /// ```
    pub fn from_clear_chunk_bytes(bytes: u64) -> Result<Self> {
        Ok(MigrationDirtyLogMode::Clear {
            shift: chunk_bytes_to_shift(bytes)?,
        })
    }

    /// Chunk size in bytes (`None` unless clear mode).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::MigrationDirtyLogMode;
    ///
    /// assert_eq!(MigrationDirtyLogMode::Clear { shift: 6 }.clear_chunk_bytes(), Some(256 << 10));
    /// assert_eq!(MigrationDirtyLogMode::Legacy.clear_chunk_bytes(), None);
    /// ```
    pub fn clear_chunk_bytes(&self) -> Option<u64> {
        match self {
            MigrationDirtyLogMode::Legacy | MigrationDirtyLogMode::Ring => None,
            MigrationDirtyLogMode::Clear { shift } => Some(shift_to_chunk_bytes(*shift)),
        }
    }

    /// Does the engine re-arm whole blocks at every sync (legacy and ring), rather than chunks
    /// before they are read (clear)? Only then does it sync within a pass
    /// ([`MigrationConfig::mid_pass_sync`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use clearlog_migration::MigrationDirtyLogMode;
    /// assert!(MigrationDirtyLogMode::Legacy.rearms_at_sync());
    /// assert!(!MigrationDirtyLogMode::default().rearms_at_sync());
    /// ```
    pub fn rearms_at_sync(&self) -> bool {
        !matches!(self, MigrationDirtyLogMode::Clear { .. })
    }

    /// `"legacy"`, `"clear"` or `"ring"` (the `mode` field of [`crate::MigrationStats`]).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_migration::MigrationDirtyLogMode::Legacy.name(), "legacy");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            MigrationDirtyLogMode::Legacy => "legacy",
            MigrationDirtyLogMode::Clear { .. } => "clear",
            MigrationDirtyLogMode::Ring => "ring",
        }
    }
}

/// Chunk size in bytes of a clear-bitmap shift (`2^shift` pages). Saturates at `u64::MAX` for shifts
/// that do not fit (only possible outside the valid range).
///
/// # Examples
///
/// ```
/// assert_eq!(clearlog_migration::shift_to_chunk_bytes(15), 128 << 20);
/// ```
pub fn shift_to_chunk_bytes(shift: u8) -> u64 {
    1u64.checked_shl(u32::from(shift) + PAGE_SHIFT)
        .unwrap_or(u64::MAX)
}

/// Clear-bitmap shift of a chunk size in bytes: the size must be a power of two, a multiple of the
/// page size, and give a shift in `6..=31`.
///
/// # Examples
///
/// ```
/// use clearlog_migration::chunk_bytes_to_shift;
///
/// assert_eq!(chunk_bytes_to_shift(256 << 10).unwrap(), 6);
/// assert!(chunk_bytes_to_shift(3 << 20).is_err());
/// ```
pub fn chunk_bytes_to_shift(bytes: u64) -> Result<u8> {
    if !bytes.is_power_of_two() || bytes.trailing_zeros() < PAGE_SHIFT {
        return Err(Error::InvalidClearChunkBytes(bytes));
    }
    let shift = bytes.trailing_zeros() - PAGE_SHIFT;
    if !(u32::from(ClearBitmap::MIN_SHIFT)..=u32::from(ClearBitmap::MAX_SHIFT)).contains(&shift) {
        return Err(Error::InvalidClearChunkBytes(bytes));
    }
    // Cannot truncate: checked to be at most 31 just above.
    Ok(shift as u8)
}

/// How a migration proves the destination holds exactly the source's memory at switchover.
///
/// Both modes compare the xxh3-64 of every page of the source's final RAM (read while the source
/// guest is paused, after the last pass) with what the destination holds, so both catch a page
/// that dirty tracking lost (a stale copy at the destination), a lost or corrupted record, a
/// wrong page, or a page the source's populated-pages answer ([`crate::MigrationBlock::populated`])
/// left out. Neither trusts that answer: it only decides what the transfer may skip.
///
/// - [`AfterResume`](Self::AfterResume) (default): outside the downtime. **What it proves**:
///   (1) the source reads every page of its final RAM, the pages its populated-pages answer
///   reports to hash them and every other page with [`crate::MigrationBlock::nonzero_pages`] (in
///   place, all of them, not a sample) to check it is zero, and lists the digest of every page
///   that holds data; (2) the destination received each listed page as data, its last copy with
///   that digest, and received no data for an unlisted page; (3) every page the destination
///   received as zero (zero pages and zero ranges) was read by the destination itself and is
///   zero (made zero if it held data from before the stream: `stale_pages_zeroed`), never judged
///   by its own populated-pages answer. So the destination's RAM when it resumed equals the
///   source's final RAM. **What it does not prove**: that the destination's
///   [`write_untracked`](crate::MigrationBlock::write_untracked) stored what it was given (the
///   digest of a received page is taken from the bytes received, not re-read from RAM, which the
///   resumed guest is already changing), that no other agent (a device backend) wrote the
///   destination's RAM between the load and the resume, or that two pages are equal beyond
///   xxh3-64 (a random collision per compared page is about 2^-64). The destination keeps the
///   digest of every page received as data (memory proportional to those pages); the still
///   paused source reads its RAM on all cores after the commit (cost: its populated pages are
///   hashed, the rest is read in place; never-touched anonymous memory reads through the shared
///   zero page, at tens of GB/s), streams the digests, and the destination answers with a
///   verdict naming the pages that differ. The source stays paused (never resumed, never freed)
///   until the verdict, so its owner can still fall back to it; a mismatch is
///   [`Error::VerificationFailed`](crate::Error) on both sides.
/// - [`Strict`](Self::Strict): before the destination resumes. The source hashes all of its RAM
///   while paused and sends a digest table of every page; the destination hashes all of its own
///   RAM after loading (re-reading what it wrote) and resumes only on a match. It proves the
///   destination's RAM, as read back, equals the source's final RAM (up to xxh3-64), including
///   what `write_untracked` stored. Costs the hashing of all RAM on both sides in the downtime
///   (docs/bench/README.md, "Verification cost"): for tests and benchmarks that must not resume
///   a bad guest.
///
/// # Examples
///
/// ```
/// use clearlog_migration::{MigrationConfig, VerifyMode};
///
/// assert_eq!(MigrationConfig::default().verify, VerifyMode::AfterResume);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// Verify after the destination resumed, outside the downtime (default).
    #[default]
    AfterResume,
    /// Verify before the destination resumes (downtime cost accepted).
    Strict,
}

impl VerifyMode {
    /// The mode's name in stats and on the command line: `after-resume` or `strict`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_migration::VerifyMode::Strict.name(), "strict");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::AfterResume => "after-resume",
            VerifyMode::Strict => "strict",
        }
    }
}

/// Parameters of an outgoing migration.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use clearlog_migration::{MigrationDirtyLogMode, MigrationConfig};
///
/// let config = MigrationConfig::default()
///     .with_mode(MigrationDirtyLogMode::Clear { shift: 12 })
///     .with_bandwidth_limit_bytes_per_s(400 << 20)
///     .with_downtime_limit(Duration::from_millis(100))
///     .with_max_time(Some(Duration::from_secs(120)));
/// config.validate().unwrap();
///
/// // The estimate may assume a faster link for the paused phase (off by default).
/// let fast = config.clone().with_switchover_bandwidth_bytes_per_s(1 << 30);
/// assert_eq!(fast.estimate_bandwidth(400 << 20), 1 << 30);
/// assert_eq!(config.estimate_bandwidth(400 << 20), 400 << 20);
///
/// let bad = MigrationConfig::default().with_mode(MigrationDirtyLogMode::Clear { shift: 5 });
/// assert!(bad.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MigrationConfig {
    /// Dirty-log re-arm mode (default: clear, [`DEFAULT_CLEAR_SHIFT`]).
    pub mode: MigrationDirtyLogMode,
    /// Bandwidth limit of the live phase in bytes per second; 0 = unlimited (default). As in QEMU, the
    /// limit is lifted once the guest is paused, so it does not stretch the downtime.
    pub bandwidth_limit_bytes_per_s: u64,
    /// Switch to stop-and-copy when the remaining dirty bytes can be sent within this time at the
    /// measured bandwidth (default [`DEFAULT_DOWNTIME_LIMIT`]).
    pub downtime_limit: Duration,
    /// Bandwidth in bytes/s the convergence estimate assumes for the stop-and-copy phase instead
    /// of the bandwidth measured in the live phase; 0 = off (default: the measured bandwidth).
    /// For a link faster than the live-phase limit (the limit is lifted while the guest is
    /// paused), like QEMU 8.2's `avail-switchover-bandwidth`. Used only for the estimate: the
    /// live phase still runs at `bandwidth_limit_bytes_per_s`. Set it no higher than the link
    /// really delivers, or the downtime exceeds its limit.
    pub switchover_bandwidth_bytes_per_s: u64,
    /// Give up with [`Error::NotConverged`] after this many iterations (default: no limit).
    pub max_iterations: Option<u32>,
    /// Give up with [`Error::NotConverged`] after this much time (default: no limit).
    pub max_time: Option<Duration>,
    /// Throttle the vCPUs through [`crate::VmControl::set_throttle`] when an iteration does not shrink
    /// the dirty set enough (default off; the throttle used is reported in the stats).
    pub auto_converge: bool,
    /// How long to wait for the destination's acknowledgement (default [`DEFAULT_ACK_TIMEOUT`]).
    pub ack_timeout: Duration,
    /// When the destination's memory is verified against the source's final memory (default
    /// [`VerifyMode::AfterResume`]: outside the downtime).
    pub verify: VerifyMode,
    /// Legacy and ring modes only: also sync the dirty log this often *within* a live pass (default
    /// [`DEFAULT_MID_PASS_SYNC`]; `None`: once per pass, as QEMU does). A legacy sync re-arms the
    /// whole guest, so a page written after the pass's sync but before it is sent goes twice;
    /// syncing again mid-pass takes that write's bit while the page is still ahead of the cursor
    /// (sent once, in this pass) and leaves only the writes of the last interval to resend. Each
    /// sync costs in proportion to the guest's size (and stalls the vCPUs for it in legacy KVM),
    /// so the interval stretches to at least 50 times the last sync's duration: at most ~2% of
    /// the time goes to mid-pass syncs. Clear mode does not need it (each chunk is re-armed just
    /// before it is sent).
    pub mid_pass_sync: Option<Duration>,
    /// Whether and when to switch to postcopy (default [`PostcopyPolicy::Off`]). Needs a session
    /// (a return path) and [`VerifyMode::AfterResume`].
    pub postcopy: PostcopyPolicy,
}

/// When a migration switches from precopy to postcopy: the source pauses, sends the CPU state
/// and the list of pages still dirty, and the destination resumes at once with those pages
/// missing; the source sends them after, the ones the guest touches first (docs/design.md,
/// "Postcopy").
///
/// # Examples
///
/// ```
/// use clearlog_migration::{MigrationConfig, PostcopyPolicy};
///
/// let c = MigrationConfig::default().with_postcopy(PostcopyPolicy::AfterPasses(1));
/// c.validate().unwrap();
/// assert!(MigrationConfig::default().with_postcopy(PostcopyPolicy::AfterPasses(0)).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostcopyPolicy {
    /// Precopy to the end (the default).
    #[default]
    Off,
    /// Switch after this many live passes (at least 1) unless precopy fits the downtime limit
    /// first.
    AfterPasses(u32),
    /// After the first pass, switch unless the convergence model says precopy ends within the
    /// downtime limit in a few more passes (see [`crate::dirtyrate::predict_convergence`]).
    Auto,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            mode: MigrationDirtyLogMode::default(),
            bandwidth_limit_bytes_per_s: 0,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            switchover_bandwidth_bytes_per_s: 0,
            max_iterations: None,
            max_time: None,
            auto_converge: false,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            verify: VerifyMode::default(),
            mid_pass_sync: Some(DEFAULT_MID_PASS_SYNC),
            postcopy: PostcopyPolicy::Off,
        }
    }
}

/// `with_<field>`: the config with one field changed, for building a config in one expression
/// (the struct is `#[non_exhaustive]`: literals outside this crate cannot name every field).
macro_rules! with_fields {
    ($($with:ident: $field:ident: $ty:ty;)*) => {
        impl MigrationConfig {
            $(
                #[doc = concat!("The config with [`", stringify!($field), "`](Self::", stringify!($field), ") set to `", stringify!($field), "`.")]
                #[must_use]
                pub fn $with(mut self, $field: $ty) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

with_fields! {
    with_mode: mode: MigrationDirtyLogMode;
    with_bandwidth_limit_bytes_per_s: bandwidth_limit_bytes_per_s: u64;
    with_downtime_limit: downtime_limit: Duration;
    with_switchover_bandwidth_bytes_per_s: switchover_bandwidth_bytes_per_s: u64;
    with_max_iterations: max_iterations: Option<u32>;
    with_max_time: max_time: Option<Duration>;
    with_auto_converge: auto_converge: bool;
    with_ack_timeout: ack_timeout: Duration;
    with_verify: verify: VerifyMode;
    with_mid_pass_sync: mid_pass_sync: Option<Duration>;
    with_postcopy: postcopy: PostcopyPolicy;
}

impl MigrationConfig {
    /// The bandwidth the convergence estimate uses, given the one `measured` in the live phase:
    /// [`switchover_bandwidth_bytes_per_s`](Self::switchover_bandwidth_bytes_per_s) when set,
    /// else `measured`.
    ///
    /// # Examples
    ///
    /// ```
    /// let c = clearlog_migration::MigrationConfig::default();
    /// assert_eq!(c.estimate_bandwidth(123), 123);
    /// ```
    pub fn estimate_bandwidth(&self, measured: u64) -> u64 {
        if self.switchover_bandwidth_bytes_per_s > 0 {
            self.switchover_bandwidth_bytes_per_s
        } else {
            measured
        }
    }

    /// Check every parameter; each problem has its own [`Error`] variant.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use clearlog_migration::{Error, MigrationConfig};
    ///
    /// let c = MigrationConfig::default().with_downtime_limit(Duration::ZERO);
    /// assert!(matches!(c.validate(), Err(Error::ZeroDowntimeLimit)));
    /// ```
    pub fn validate(&self) -> Result<()> {
        if let MigrationDirtyLogMode::Clear { shift } = self.mode {
            if !(ClearBitmap::MIN_SHIFT..=ClearBitmap::MAX_SHIFT).contains(&shift) {
                return Err(Error::ClearShiftOutOfRange(shift));
            }
        }
        if self.downtime_limit.is_zero() {
            return Err(Error::ZeroDowntimeLimit);
        }
        if self.max_iterations == Some(0)
            || self.max_time == Some(Duration::ZERO)
            || self.mid_pass_sync == Some(Duration::ZERO)
            || self.postcopy == PostcopyPolicy::AfterPasses(0)
        {
            return Err(Error::ZeroMigrationLimit);
        }
        if self.postcopy != PostcopyPolicy::Off && self.verify == VerifyMode::Strict {
            return Err(Error::PostcopyUnavailable(
                "strict verification checks all of memory before the destination resumes, and \
                 postcopy resumes it first: use the default verification (after resuming)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_bytes_round_trip() {
        for shift in 6..=31u8 {
            let bytes = shift_to_chunk_bytes(shift);
            assert_eq!(chunk_bytes_to_shift(bytes).unwrap(), shift);
        }
    }

    #[test]
    fn bad_chunk_bytes() {
        for bytes in [0, 1, 4096, 128 << 10, (256 << 10) + 4096, 3 << 20, 1 << 44] {
            assert!(
                matches!(chunk_bytes_to_shift(bytes), Err(Error::InvalidClearChunkBytes(b)) if b == bytes)
            );
        }
        // The size as a user types it, not in bytes.
        assert_eq!(
            chunk_bytes_to_shift(3 << 20).unwrap_err().to_string(),
            "clear chunk size 3M invalid: must be a power of two between 256K and 8T"
        );
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        let ok = MigrationConfig::default();
        ok.validate().unwrap();
        for shift in [0, 5, 32, 255] {
            let c = ok.clone().with_mode(MigrationDirtyLogMode::Clear { shift });
            assert!(matches!(c.validate(), Err(Error::ClearShiftOutOfRange(s)) if s == shift));
        }
        let c = ok.clone().with_max_iterations(Some(0));
        assert!(matches!(c.validate(), Err(Error::ZeroMigrationLimit)));
        let c = ok.with_max_time(Some(Duration::ZERO));
        assert!(matches!(c.validate(), Err(Error::ZeroMigrationLimit)));
    }
}
