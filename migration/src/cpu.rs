// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! CPU time of this process and of the calling thread, for the per-page cost in the stats.

use std::time::Duration;

/// User + system CPU time of the whole process (all threads, the vCPUs included), from
/// `getrusage(RUSAGE_SELF)`.
///
/// # Examples
///
/// ```
/// let a = clearlog_migration::process_cpu_time();
/// let mut x = 0u64;
/// for i in 0..1_000_000u64 { x = x.wrapping_add(i * i); }
/// std::hint::black_box(x);
/// assert!(clearlog_migration::process_cpu_time() >= a);
/// ```
pub fn process_cpu_time() -> Duration {
    // SAFETY: `rusage` is plain old data (all-zero is valid) and getrusage only writes it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF is valid and `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`, user + system, ns resolution).
///
/// # Examples
///
/// ```
/// let a = clearlog_migration::thread_cpu_time();
/// assert!(clearlog_migration::thread_cpu_time() >= a);
/// ```
pub fn thread_cpu_time() -> Duration {
    // SAFETY: `timespec` is plain old data; clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `cpu` spread over `pages`, in ns per page (0 without pages).
pub(crate) fn ns_per_page(cpu: Duration, pages: u64) -> f64 {
    if pages == 0 {
        0.0
    } else {
        cpu.as_nanos() as f64 / pages as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_accumulates_cpu_time() {
        let (p0, t0) = (process_cpu_time(), thread_cpu_time());
        let start = std::time::Instant::now();
        let mut x = 1u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let (p1, t1) = (process_cpu_time(), thread_cpu_time());
        // 30 ms of spinning shows up (allowing for preemption on a shared machine).
        assert!(t1 - t0 >= Duration::from_millis(1), "{:?}", t1 - t0);
        assert!(
            p1 >= p0 + (t1 - t0) / 2,
            "process {:?} thread {:?}",
            p1 - p0,
            t1 - t0
        );
    }

    #[test]
    fn ns_per_page_of_nothing_is_zero() {
        assert_eq!(ns_per_page(Duration::from_secs(1), 0), 0.0);
        assert_eq!(ns_per_page(Duration::from_micros(3), 3), 1000.0);
    }
}
