// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A token-bucket rate limiter for the outgoing stream.

use std::io::{self, Write};
use std::time::{Duration, Instant};

/// How much a bucket may hold: 50 ms worth of bytes (at least 64 KiB). Long enough to catch up
/// after the sender was preempted for a few scheduler slices or spent a moment clearing and
/// reading, short enough that a pass never runs visibly above the limit.
const BURST_SECS: f64 = 0.05;
/// The smallest bucket, for very low rates.
const MIN_BURST: f64 = 64.0 * 1024.0;

/// The token bucket behind [`RateLimitedWriter`], on an explicit clock (so it is tested without
/// sleeping).
///
/// Tokens may go negative: a piece is let through as soon as the balance is not negative, and
/// its size is then owed. The sender sleeps until the debt is paid; whatever it oversleeps stays
/// in the bucket (up to the burst), so short waits lose no tokens and the long-run rate is the
/// limit exactly, whatever the sleep granularity.
///
/// # Examples
///
/// ```
/// use std::time::{Duration, Instant};
/// use clearlog_migration::TokenBucket;
///
/// let t0 = Instant::now();
/// let mut b = TokenBucket::new(1 << 20, t0); // 1 MiB/s, starts empty
/// assert_eq!(b.admit(64 << 10, t0), None); // the first 64 KiB pass at once...
/// let wait = b.admit(64 << 10, t0).unwrap(); // ...and are paid for: 62.5 ms
/// assert!((wait.as_secs_f64() - 0.0625).abs() < 1e-6);
/// ```
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// An empty bucket for `rate` bytes/s (0 = unlimited) at time `now`: the first piece goes at
    /// once and is paid for afterwards, so a stream never runs above the limit on average, not
    /// even by one burst at its start.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = clearlog_migration::TokenBucket::new(400 << 20, std::time::Instant::now());
    /// assert_eq!(b.rate(), 400 << 20);
    /// ```
    pub fn new(rate: u64, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: 0.0,
            last: now,
        }
    }

    /// The limit in bytes/s (0 = unlimited).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(clearlog_migration::TokenBucket::new(0, std::time::Instant::now()).rate(), 0);
    /// ```
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The most bytes the bucket holds.
    fn burst(&self) -> f64 {
        (self.rate as f64 * BURST_SECS).max(MIN_BURST)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst());
    }

    /// Ask to send `len` bytes at `now`: `None` = go (the bytes are charged), `Some(wait)` =
    /// ask again after `wait` (nothing is charged).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let t0 = Instant::now();
    /// let mut b = clearlog_migration::TokenBucket::new(1 << 20, t0);
    /// assert_eq!(b.admit(1 << 20, t0), None); // a big piece goes on a non-negative balance...
    /// let wait = b.admit(1, t0).unwrap(); // ...and is paid for afterwards
    /// assert!(b.admit(1, t0 + wait).is_none());
    /// ```
    pub fn admit(&mut self, len: usize, now: Instant) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        self.refill(now);
        if self.tokens >= 0.0 {
            self.tokens -= len as f64;
            return None;
        }
        Some(Duration::from_secs_f64(-self.tokens / self.rate as f64))
    }
}

/// A writer that passes bytes to `inner` at most `rate` bytes/s on average (0 = unlimited); after
/// a stall it catches up by at most 50 ms worth of bytes (at least 64 KiB). It also counts the
/// bytes written.
///
/// A [`TokenBucket`] with carry-over: oversleeping is paid back by the next pieces, so the long-run
/// rate stays at the limit.
///
/// # Examples
///
/// ```
/// use std::io::Write;
/// use std::time::Instant;
/// use clearlog_migration::RateLimitedWriter;
///
/// let mut w = RateLimitedWriter::new(Vec::new(), 1 << 20); // 1 MiB/s
/// let t = Instant::now();
/// w.write_all(&vec![0u8; 256 << 10]).unwrap(); // 4 pieces of 64 KiB, the first one free
/// assert!(t.elapsed().as_secs_f64() > 0.15);
/// assert_eq!(w.bytes_written(), 256 << 10);
/// ```
#[derive(Debug)]
pub struct RateLimitedWriter<W> {
    inner: W,
    bucket: SharedBucket,
    written: u64,
}

/// A [`TokenBucket`] several writers share (a session's page channels: one limit for all).
///
/// # Examples
///
/// ```
/// use std::io::Write;
/// use clearlog_migration::{RateLimitedWriter, SharedBucket};
///
/// let bucket = SharedBucket::new(1 << 20);
/// let mut a = RateLimitedWriter::with_bucket(Vec::new(), bucket.clone());
/// let mut b = RateLimitedWriter::with_bucket(Vec::new(), bucket.clone());
/// let t = std::time::Instant::now();
/// a.write_all(&[0; 128 << 10]).unwrap();
/// b.write_all(&[0; 128 << 10]).unwrap(); // 256 KiB in all at 1 MiB/s
/// assert!(t.elapsed().as_secs_f64() > 0.15);
/// bucket.set_rate(0); // both unlimited now
/// ```
#[derive(Debug, Clone)]
pub struct SharedBucket(std::sync::Arc<std::sync::Mutex<TokenBucket>>);

impl SharedBucket {
    /// An empty bucket for `rate` bytes/s (0 = unlimited).
    pub fn new(rate: u64) -> Self {
        SharedBucket(std::sync::Arc::new(std::sync::Mutex::new(
            TokenBucket::new(rate, Instant::now()),
        )))
    }

    /// Change the limit for every writer sharing it (0 = unlimited); the bucket restarts empty.
    pub fn set_rate(&self, rate: u64) {
        *self.lock() = TokenBucket::new(rate, Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        // The bucket is a few numbers updated in one step: a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<W: Write> RateLimitedWriter<W> {
    /// Wrap `inner` with a limit of `rate` bytes/s (0 = unlimited).
    ///
    /// # Examples
    ///
    /// ```
    /// let w = clearlog_migration::RateLimitedWriter::new(std::io::sink(), 400 << 20);
    /// assert_eq!(w.bytes_written(), 0);
    /// ```
    pub fn new(inner: W, rate: u64) -> Self {
        Self::with_bucket(inner, SharedBucket::new(rate))
    }

    /// Wrap `inner` with a limit shared with other writers.
    ///
    /// # Examples
    ///
    /// See [`SharedBucket`].
    pub fn with_bucket(inner: W, bucket: SharedBucket) -> Self {
        RateLimitedWriter {
            inner,
            bucket,
            written: 0,
        }
    }

    /// Change the limit (0 = unlimited); the bucket restarts empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// let mut w = clearlog_migration::RateLimitedWriter::new(std::io::sink(), 1);
    /// w.set_rate(0);
    /// w.write_all(&[0; 1 << 20]).unwrap(); // no longer limited
    /// ```
    pub fn set_rate(&mut self, rate: u64) {
        self.bucket.set_rate(rate);
    }

    /// Write all of `buf` at once, ahead of any wait, and charge the shared limit afterwards: the
    /// other writers sharing it pay for it by waiting longer, so the long-run rate stays the
    /// limit. For a little urgent data (a page a postcopy guest waits on) among bulk data.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Instant;
    /// let mut w = clearlog_migration::RateLimitedWriter::new(Vec::new(), 1 << 10); // 1 KiB/s
    /// let t = Instant::now();
    /// w.write_ahead(&[7; 64 << 10]).unwrap();
    /// assert!(t.elapsed().as_secs() < 1, "no wait for 64 s worth of the limit");
    /// assert_eq!(w.bytes_written(), 64 << 10);
    /// ```
    pub fn write_ahead(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        {
            let mut bucket = self.bucket.lock();
            if bucket.rate != 0 {
                bucket.refill(Instant::now());
                bucket.tokens -= buf.len() as f64;
            }
        }
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Bytes accepted so far.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// let mut w = clearlog_migration::RateLimitedWriter::new(Vec::new(), 0);
    /// w.write_all(b"abc").unwrap();
    /// assert_eq!(w.bytes_written(), 3);
    /// ```
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The wrapped writer, this one gone (nothing is written or flushed by that).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// let mut w = clearlog_migration::RateLimitedWriter::new(Vec::new(), 0);
    /// w.write_all(b"abc").unwrap();
    /// assert_eq!(w.into_inner(), b"abc");
    /// ```
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// The wrapped writer.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// let mut w = clearlog_migration::RateLimitedWriter::new(Vec::new(), 0);
    /// w.write_all(b"abc").unwrap();
    /// assert_eq!(w.get_mut().as_slice(), b"abc");
    /// ```
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for RateLimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Pieces of at most one burst, so a huge buffer does not run ahead of the limit. The
        // lock is held only to count, never while sleeping or writing.
        let piece = {
            let mut bucket = self.bucket.lock();
            let piece = if bucket.rate == 0 {
                buf.len()
            } else {
                buf.len().min(bucket.burst() as usize)
            };
            loop {
                match bucket.admit(piece, Instant::now()) {
                    None => break piece,
                    Some(wait) => {
                        drop(bucket);
                        std::thread::sleep(wait);
                        bucket = self.bucket.lock();
                    }
                }
            }
        };
        let n = match self.inner.write(&buf[..piece]) {
            Ok(n) => n,
            Err(e) => {
                self.bucket.lock().tokens += piece as f64;
                return Err(e);
            }
        };
        // Charged for `piece`; give back what the inner writer did not take.
        self.bucket.lock().tokens += (piece - n) as f64;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a bucket on a simulated clock whose sleeps overshoot by `oversleep`; return the
    /// achieved rate of `pieces` pieces of `len` bytes.
    fn simulated_rate(rate: u64, len: usize, pieces: usize, oversleep: Duration) -> f64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = TokenBucket::new(rate, t0);
        for _ in 0..pieces {
            while let Some(wait) = b.admit(len, now) {
                now += wait + oversleep;
            }
        }
        // The last piece is charged but not yet paid for.
        let paid = ((pieces - 1) * len) as f64;
        let secs = now.duration_since(t0).as_secs_f64();
        paid / secs
    }

    #[test]
    fn short_oversleeps_lose_no_tokens() {
        let rate = 400u64 << 20;
        // 1 MiB records, every sleep 0.2 ms too long (a typical timer slack): the old bucket,
        // which waited for a whole piece and capped at the burst, ran 2-5% slow here.
        for oversleep_us in [0, 50, 200, 1000, 5000] {
            let r = simulated_rate(rate, 1 << 20, 2000, Duration::from_micros(oversleep_us));
            let frac = r / rate as f64;
            assert!(
                (0.995..=1.005).contains(&frac),
                "oversleep {oversleep_us} us: {frac:.4} of the rate"
            );
        }
    }

    #[test]
    fn small_pieces_hold_the_rate_too() {
        let rate = 10u64 << 20;
        let r = simulated_rate(rate, 4105, 100_000, Duration::from_micros(80));
        let frac = r / rate as f64;
        assert!((0.995..=1.005).contains(&frac), "{frac:.4} of the rate");
    }

    #[test]
    fn an_idle_sender_gets_at_most_one_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0);
        let later = t0 + Duration::from_secs(10);
        // Ten idle seconds buy one burst (64 KiB), not 10 MiB: after 1 MiB the debt is
        // 1 MiB - 64 KiB, 0.9375 s at 1 MiB/s.
        assert_eq!(b.admit(1 << 20, later), None);
        let wait = b.admit(1, later).unwrap();
        assert!((wait.as_secs_f64() - 0.9375).abs() < 1e-6, "{wait:?}");
    }

    #[test]
    fn holds_the_rate() {
        let rate = 8u64 << 20;
        let mut w = RateLimitedWriter::new(io::sink(), rate);
        let t = Instant::now();
        let chunk = vec![0u8; 100_000];
        for _ in 0..40 {
            w.write_all(&chunk).unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        // The last piece is not yet paid for.
        let measured = (4_000_000.0 - 100_000.0) / secs;
        // Allow for scheduling noise.
        assert!(measured < rate as f64 * 1.1, "{measured} B/s > {rate}");
        assert!(measured > rate as f64 * 0.8, "{measured} B/s too slow");
    }

    #[test]
    fn unlimited_is_fast() {
        let mut w = RateLimitedWriter::new(io::sink(), 0);
        let t = Instant::now();
        w.write_all(&vec![0u8; 64 << 20]).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(w.bytes_written(), 64 << 20);
    }
}
