// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A token-bucket rate limiter for the outgoing stream.

use std::io::{self, Write};
use std::time::{Duration, Instant};

/// A writer that passes bytes to `inner` at most `rate` bytes/s on average (0 = unlimited), with bursts
/// of at most 10 ms worth of bytes (at least 64 KiB). It also counts the bytes written.
///
/// Tokens accrue from the real elapsed time, so oversleeping is paid back by the next piece (up to the
/// burst size) and the long-run rate stays at the limit.
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
/// w.write_all(&vec![0u8; 256 << 10]).unwrap(); // the bucket starts full (64 KiB)
/// assert!(t.elapsed().as_secs_f64() > 0.15);
/// assert_eq!(w.bytes_written(), 256 << 10);
/// ```
#[derive(Debug)]
pub struct RateLimitedWriter<W> {
    inner: W,
    rate: u64,
    tokens: f64,
    last: Instant,
    written: u64,
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
        let mut w = RateLimitedWriter {
            inner,
            rate,
            tokens: 0.0,
            last: Instant::now(),
            written: 0,
        };
        w.tokens = w.burst();
        w
    }

    fn burst(&self) -> f64 {
        (self.rate as f64 / 100.0).max(64.0 * 1024.0)
    }

    /// Change the limit (0 = unlimited); the bucket restarts full.
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
        self.rate = rate;
        self.tokens = self.burst();
        self.last = Instant::now();
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

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst());
    }
}

impl<W: Write> Write for RateLimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.rate == 0 {
            let n = self.inner.write(buf)?;
            self.written += n as u64;
            return Ok(n);
        }
        let piece = buf.len().min(self.burst() as usize);
        self.refill();
        if self.tokens < piece as f64 {
            let wait = (piece as f64 - self.tokens) / self.rate as f64;
            std::thread::sleep(Duration::from_secs_f64(wait));
            self.refill();
        }
        let n = self.inner.write(&buf[..piece])?;
        self.tokens -= n as f64;
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
        let measured = 4_000_000.0 / secs;
        // The first burst (84 KB) is free; allow for it and for scheduling noise.
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
