// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Progress reports and statistics.

use serde::{Deserialize, Serialize};

/// Handed to the progress callback after every iteration (and once at switchover).
///
/// # Examples
///
/// ```
/// use clearlog_migration::Progress;
///
/// let mut cb = |p: &Progress| println!("iter {} {} bytes left", p.iteration, p.remaining_bytes);
/// cb(&Progress { iteration: 1, remaining_bytes: 4096, bandwidth_bytes_per_s: 1 << 30,
///                expected_downtime_ms: 0.004, paused: false });
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Iterations finished (1 after the first full pass).
    pub iteration: u32,
    /// Dirty bytes still to send.
    pub remaining_bytes: u64,
    /// Bandwidth measured over the last iteration, bytes/s.
    pub bandwidth_bytes_per_s: u64,
    /// Time to send `remaining_bytes` at that bandwidth, ms.
    pub expected_downtime_ms: f64,
    /// The guest is paused (final report of the switchover).
    pub paused: bool,
}

/// Where a migration's downtime went, in milliseconds (see [`MigrationStats::downtime_ms`]).
///
/// # Examples
///
/// ```
/// let b = clearlog_migration::DowntimeBreakdown::default();
/// assert_eq!(b.total_ms(), 0.0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// `VmControl::pause`.
    pub pause_ms: f64,
    /// The final dirty-log sync.
    pub final_sync_ms: f64,
    /// Sending the pages still dirty (no clears: the vCPUs are stopped).
    pub final_pages_ms: f64,
    /// `VmControl::save_state` and sending the state.
    pub state_ms: f64,
    /// Strict mode only: hashing all RAM and sending the digest table.
    pub verify_ms: f64,
    /// Waiting for the destination's acknowledgement (its loading, checks and restore).
    pub ack_ms: f64,
    /// Sending the confirmation (the commit).
    pub confirm_ms: f64,
}

impl DowntimeBreakdown {
    /// The sum of the parts.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = clearlog_migration::DowntimeBreakdown { pause_ms: 1.0, ack_ms: 2.5, ..Default::default() };
    /// assert_eq!(b.total_ms(), 3.5);
    /// ```
    pub fn total_ms(&self) -> f64 {
        self.pause_ms
            + self.final_sync_ms
            + self.final_pages_ms
            + self.state_ms
            + self.verify_ms
            + self.ack_ms
            + self.confirm_ms
    }
}

/// One iteration of the live phase (for plots).
///
/// # Examples
///
/// ```
/// let it = clearlog_migration::IterationStats::default();
/// assert_eq!(it.pages_sent, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IterationStats {
    /// 1-based iteration number.
    pub iteration: u32,
    /// Pages sent during the pass.
    pub pages_sent: u64,
    /// Of which zero pages.
    pub zero_pages: u64,
    /// Pages the sync after the pass found newly dirty.
    pub dirty_pages: u64,
    /// Dirty bytes left after that sync.
    pub remaining_bytes: u64,
    /// Wall time of the pass (without the sync), ms.
    pub pass_ms: f64,
    /// Wall time of the sync, ms.
    pub sync_ms: f64,
    /// Bandwidth measured over the live passes so far (this one included), bytes/s: what the
    /// convergence estimate used after this pass.
    pub bandwidth_bytes_per_s: u64,
    /// Bandwidth of this pass alone (its bytes / its wall time), bytes/s.
    #[serde(default)]
    pub pass_bandwidth_bytes_per_s: u64,
    /// `pass_bandwidth_bytes_per_s` / the limit (0 when unlimited): how full the pass kept the
    /// link.
    #[serde(default)]
    pub bandwidth_fraction_of_limit: f64,
    /// Chunk clears issued during the pass.
    pub log_clear_calls: u64,
}

/// Statistics of a finished (or failed) outgoing migration; serializable for reports.
///
/// # Examples
///
/// ```
/// let s = clearlog_migration::MigrationStats::default();
/// assert!(!s.converged);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// `"legacy"` or `"clear"`.
    pub mode: String,
    /// Clear chunk size in bytes (0 in legacy mode).
    pub clear_chunk_bytes: u64,
    /// Guest RAM size (all blocks).
    pub guest_mem_bytes: u64,
    /// From the call to `migrate` to the commit (the confirmation sent; for a file, the end of the
    /// stream); after a postcopy, to the destination's word that every missing page arrived. The
    /// verification after it is [`verify_after_ms`](Self::verify_after_ms).
    pub total_time_ms: f64,
    /// Starting dirty logging, first sync and allocating the bitmaps.
    pub setup_time_ms: f64,
    /// From `pause` to the commit: the confirmation sent (for a file: the end of the final flush).
    /// The guest's view, source pause to destination resume, is
    /// [`guest_visible_downtime_ms`](Self::guest_visible_downtime_ms).
    pub downtime_ms: f64,
    /// Where the downtime went.
    pub downtime_breakdown: DowntimeBreakdown,
    /// A session: how long the source waited, its guest running, for the destination to load
    /// what it had sent before switching over (the backlog in the channels' socket buffers; a
    /// destination slower than the link makes it grow). Not part of the downtime.
    #[serde(default)]
    pub drain_ms: f64,
    /// From the source's pause to the destination's resume, both on the host clock (`CLOCK_REALTIME`;
    /// across hosts as good as their clock sync). 0 when unknown (a file, strict mode without a
    /// verdict, or a destination that did not resume).
    pub guest_visible_downtime_ms: f64,
    /// When the source paused, Unix time in ns.
    pub paused_at_unix_ns: u64,
    /// `"after-resume"` or `"strict"` ([`crate::VerifyMode`]).
    pub verify_mode: String,
    /// Every check passed: the destination held exactly the source's final memory at switchover
    /// (and, for a destination with its own checks, those passed too: it acknowledged). False for a
    /// file: a snapshot is verified when it is restored.
    pub verified: bool,
    /// After the commit, outside the downtime ([`crate::VerifyMode::AfterResume`]): hashing the
    /// final RAM, sending the digests and waiting for the verdict.
    pub verify_after_ms: f64,
    /// Digests of final non-zero pages sent for verification.
    pub verify_pages: u64,
    /// Pages the populated-pages answer called never populated that the verification read to
    /// check they are zero ([`crate::VerifyMode::AfterResume`]; all of them, not a sample).
    #[serde(default)]
    pub verify_zero_checked_pages: u64,
    /// Of those, pages that held data: the populated-pages answer left them out (a wrong answer;
    /// they were sent as zero unless dirty tracking sent them again). Listed in the verification,
    /// so the destination's verdict says whether it holds them.
    #[serde(default)]
    pub verify_unreported_pages: u64,
    /// Iterations of the live phase (full passes, the first one included).
    pub iterations: u32,
    /// Dirty-log syncs (`log_sync_all` calls).
    pub dirty_syncs: u32,
    /// Of `dirty_syncs`, those made within a live pass (legacy mode,
    /// [`MigrationConfig::mid_pass_sync`](crate::MigrationConfig::mid_pass_sync)).
    #[serde(default)]
    pub mid_pass_syncs: u32,
    /// Page records sent (zero pages included).
    pub pages_sent: u64,
    /// Bytes of the migration stream written to the transport, the verify records after the
    /// commit included (the 8-byte confirmation of the commit handshake is not part of the
    /// stream).
    pub bytes_sent: u64,
    /// Pages sent as a zero marker.
    pub zero_pages: u64,
    /// Dirty pages sent as zero ranges without being read (memory the source never populated),
    /// not counted in `pages_sent`.
    pub zero_range_pages: u64,
    /// Page records for pages that had already been sent once (not QEMU's "duplicate").
    pub resent_pages: u64,
    /// Time spent in `log_sync_all`.
    pub log_sync_ms: f64,
    /// Calls to `clear_dirty_bitmap_block` (chunks in clear mode, whole blocks in legacy mode).
    pub log_clear_calls: u64,
    /// Time spent in those calls.
    pub log_clear_ms: f64,
    /// The configured limit (0 = unlimited).
    pub bandwidth_limit_bytes_per_s: u64,
    /// Bytes sent in the live phase / time spent sending them.
    pub measured_bandwidth_bytes_per_s: u64,
    /// The migration reached the switchover and was acknowledged.
    pub converged: bool,
    /// Highest auto-converge throttle applied, % (0 = never throttled).
    pub auto_converge_max_throttle_pct: u8,
    /// CPU time of the migrating thread while it walked dirty pages (reading, encoding,
    /// writing to the transport, clears and populated-page queries included), per page record
    /// sent, ns.
    #[serde(default)]
    pub source_ns_per_page: f64,
    /// CPU seconds (user + system) of the migrating thread from `migrate` to the commit.
    #[serde(default)]
    pub migration_thread_cpu_s: f64,
    /// CPU seconds (user + system) of the whole process from `migrate` to the commit: the
    /// vCPU threads of a running guest included (as QEMU's `cpu_s` of a process).
    #[serde(default)]
    pub cpu_s: f64,
    /// Page channels of the session (0: a version-1 stream, pages inline).
    #[serde(default)]
    pub page_channels: u32,
    /// What each page channel carried (empty for a version-1 stream).
    #[serde(default)]
    pub channel_stats: Vec<ChannelStats>,
    /// The migration switched to postcopy after `iterations` live passes.
    #[serde(default)]
    pub postcopy: bool,
    /// Postcopy: pages still dirty at the switch (sent after the destination resumed).
    #[serde(default)]
    pub postcopy_pages: u64,
    /// Postcopy: from the commit to the destination's "every page arrived", ms.
    #[serde(default)]
    pub postcopy_ms: f64,
    /// Postcopy: requests the destination sent for pages its guest touched.
    #[serde(default)]
    pub postcopy_requests: u64,
    /// Postcopy: requests answered before the background push had taken the page.
    #[serde(default)]
    pub postcopy_requests_first: u64,
    /// Postcopy: sessions opened to resume it after a cut.
    #[serde(default)]
    pub postcopy_recoveries: u32,
    /// Per-iteration details.
    pub iteration_history: Vec<IterationStats>,
}

/// What one page channel of a session carried.
///
/// # Examples
///
/// ```
/// let c = clearlog_migration::ChannelStats::default();
/// assert_eq!(c.pages, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// Page records (zero pages included).
    pub pages: u64,
    /// Bytes.
    pub bytes: u64,
    /// CPU time of the channel's thread per page record (reading, zero checks and encoding and
    /// writing on the source; reading, copying into guest RAM and hashing on the destination), ns.
    pub ns_per_page: f64,
}

/// Statistics of an incoming migration.
///
/// # Examples
///
/// ```
/// let s = clearlog_migration::IncomingStats::default();
/// assert_eq!(s.pages_received, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IncomingStats {
    /// Page records loaded (zero pages included).
    pub pages_received: u64,
    /// Of which zero pages.
    pub zero_pages: u64,
    /// Pages received as zero ranges (memory the source never populated), not counted above.
    pub zero_range_pages: u64,
    /// Pages received as zero (zero pages and zero ranges) that this side read to check they are
    /// zero here: every one of them (the destination's own populated-pages answer is not asked).
    #[serde(default)]
    pub zero_checked_pages: u64,
    /// Of those, pages that held data before the stream (not received as data in it) and were
    /// zeroed: stale memory of the destination.
    #[serde(default)]
    pub stale_pages_zeroed: u64,
    /// Bytes read from the transport.
    pub bytes_received: u64,
    /// State blobs received.
    pub state_blobs: u32,
    /// In strict mode, before resuming: checking the digest table (hashing all RAM).
    pub verify_ms: f64,
    /// After resuming ([`crate::VerifyMode::AfterResume`]): reading the source's digests and
    /// comparing them with the pages as received.
    pub verify_after_ms: f64,
    /// Every check passed: the memory loaded equals the source's final memory at switchover
    /// (strict or after-resume verification), the VMM's own checks passed, the state restored.
    pub verified: bool,
    /// Pages that differed from the source's final memory (0 when verified).
    pub mismatched_pages: u64,
    /// When the guest was resumed, Unix time in ns (0: not resumed here).
    pub resumed_at_unix_ns: u64,
    /// From the first byte to the end marker.
    pub load_time_ms: f64,
    /// CPU time of the receiving thread while loading the stream (reading, decoding, copying
    /// into guest RAM, tracking digests), per page record received, ns.
    #[serde(default)]
    pub dest_ns_per_page: f64,
    /// CPU seconds (user + system) of the receiving thread from the first byte to the verdict.
    #[serde(default)]
    pub migration_thread_cpu_s: f64,
    /// CPU seconds (user + system) of the whole process over the same span.
    #[serde(default)]
    pub cpu_s: f64,
    /// Page channels of the session (0: a version-1 stream, pages inline).
    #[serde(default)]
    pub page_channels: u32,
    /// What each page channel carried (empty for a version-1 stream).
    #[serde(default)]
    pub channel_stats: Vec<ChannelStats>,
    /// An acknowledgement was sent (false for a file).
    pub acked: bool,
    /// The guest was resumed.
    pub resumed: bool,
    /// The source switched to postcopy: the guest resumed with pages missing.
    #[serde(default)]
    pub postcopy: bool,
    /// Postcopy: from the switch record to the guest resumed (placement set up, state restored,
    /// acknowledged, confirmed), ms.
    #[serde(default)]
    pub postcopy_resume_ms: f64,
    /// Postcopy: from the guest resumed to the last missing page placed, ms.
    #[serde(default)]
    pub postcopy_ms: f64,
    /// Postcopy: pages missing when the guest resumed.
    #[serde(default)]
    pub postcopy_missing_pages: u64,
    /// Postcopy: pages asked for because the guest or the VMM touched them.
    #[serde(default)]
    pub postcopy_requested_pages: u64,
    /// Postcopy: pages that arrived again after they were placed (placed once).
    #[serde(default)]
    pub postcopy_duplicate_pages: u64,
    /// Postcopy: touched pages the source never listed (zero there), placed as zero.
    #[serde(default)]
    pub postcopy_zero_faults: u64,
    /// Postcopy: median time from a fault on a missing page to its placement, ms.
    #[serde(default)]
    pub fault_latency_median_ms: f64,
    /// Postcopy: the longest such wait, ms.
    #[serde(default)]
    pub fault_latency_max_ms: f64,
    /// Postcopy: sessions accepted to resume it after a cut (one that failed in turn counts too).
    #[serde(default)]
    pub postcopy_recoveries: u32,
}
