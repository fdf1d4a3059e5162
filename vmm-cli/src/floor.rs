// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The floor model of precopy with chunked clear under uniform random writes
//! (docs/bench/README.md, "The floor"): how long the live phase takes at exactly the bandwidth
//! limit, pass by pass, when each page is re-armed right before it is read and the guest writes
//! pages uniformly at random.

use std::time::Duration;

/// The model's answer for one set of parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    /// Duration of each live pass, seconds (the first one sends the whole working set).
    pub passes_s: Vec<f64>,
    /// Fraction of the working set left dirty by the first pass, `1 - (1 - e^-a) / a` with
    /// `a` = dirty rate / bandwidth.
    pub first_pass_dirty_fraction: f64,
    /// Bytes still dirty when the model switches over (they fit in the downtime limit).
    pub final_bytes: f64,
}

impl Floor {
    /// Total of the live passes, seconds: the model's migration time (the paused copy runs
    /// unlimited and is left out).
    ///
    /// # Examples
    ///
    /// ```
    /// let f = vmm_cli::floor::Floor { passes_s: vec![1.0, 0.5], first_pass_dirty_fraction: 0.2, final_bytes: 0.0 };
    /// assert_eq!(f.total_s(), 1.5);
    /// ```
    pub fn total_s(&self) -> f64 {
        self.passes_s.iter().sum()
    }
}

/// The floor for a working set of `wss` bytes written uniformly at random at `dirty_rate`
/// bytes/s, sent at exactly `bandwidth` bytes/s, switching over once the rest fits in
/// `downtime` at that bandwidth. `None` when it never converges (a dirty rate at or above the
/// bandwidth, or no bandwidth) or the inputs are empty.
///
/// Pass `k` sends the `R_k` bytes dirty at its start in `t_k = R_k / bandwidth`. Over it the guest
/// writes `b = dirty_rate * t_k / wss` times per page on average (Poisson). A page the pass sends,
/// re-armed at fraction `x` of the pass, ends dirty with probability `1 - e^(-b (1 - x))`
/// (averaged: `1 - (1 - e^-b) / b`); a page it does not send was clean and armed, and ends dirty
/// with probability `1 - e^-b`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// // The reference workload: 3 GiB at 288 MiB/s over 400 MiB/s, 100 ms.
/// let f = vmm_cli::floor::floor_model(3 << 30, 288 << 20, 400 << 20, Duration::from_millis(100)).unwrap();
/// assert!((f.passes_s[0] - 7.68).abs() < 1e-9);
/// assert!((f.total_s() - 13.3).abs() < 0.1);
/// ```
pub fn floor_model(wss: u64, dirty_rate: u64, bandwidth: u64, downtime: Duration) -> Option<Floor> {
    if wss == 0 || bandwidth == 0 || dirty_rate >= bandwidth {
        return None;
    }
    let (w, d, bw) = (wss as f64, dirty_rate as f64, bandwidth as f64);
    let dirty_after = |sent_fraction: f64, b: f64| {
        if b == 0.0 {
            return 0.0;
        }
        let e = (-b).exp();
        sent_fraction * (1.0 - (1.0 - e) / b) + (1.0 - sent_fraction) * (1.0 - e)
    };
    let mut passes = Vec::new();
    let mut remaining = w;
    let mut first = 0.0;
    // A dirty rate below the bandwidth shrinks every pass; the cap only guards rounding.
    for _ in 0..10_000 {
        let t = remaining / bw;
        passes.push(t);
        let fraction = dirty_after(remaining / w, d * t / w);
        if passes.len() == 1 {
            first = fraction;
        }
        remaining = fraction * w;
        if remaining / bw <= downtime.as_secs_f64() {
            return Some(Floor {
                passes_s: passes,
                first_pass_dirty_fraction: first,
                final_bytes: remaining,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_reference_workload_floor_is_13_28_s() {
        let f = floor_model(3072 * MIB, 288 * MIB, 400 * MIB, Duration::from_millis(100)).unwrap();
        assert!((f.passes_s[0] - 7.68).abs() < 1e-9);
        // 1 - (1 - e^-0.72) / 0.72 = 0.287
        assert!((f.first_pass_dirty_fraction - 0.287).abs() < 0.001, "{f:?}");
        let rounded: Vec<f64> = f.passes_s[1..]
            .iter()
            .map(|t| (t * 10.0).round() / 10.0)
            .collect();
        assert_eq!(rounded, [2.2, 1.2, 0.8, 0.5, 0.3, 0.2, 0.2, 0.1]);
        assert!(f.passes_s.windows(2).all(|p| p[1] < p[0]));
        assert!((f.total_s() - 13.28).abs() < 0.01, "{}", f.total_s());
        assert!(f.final_bytes <= 0.1 * (400 * MIB) as f64);
    }

    #[test]
    fn no_writes_is_one_pass() {
        let f = floor_model(1 << 30, 0, 1 << 30, Duration::from_millis(1)).unwrap();
        assert_eq!(f.passes_s, [1.0]);
        assert_eq!(f.final_bytes, 0.0);
    }

    #[test]
    fn a_slower_link_takes_longer() {
        let d = Duration::from_millis(100);
        let fast = floor_model(3072 * MIB, 288 * MIB, 800 * MIB, d).unwrap();
        let slow = floor_model(3072 * MIB, 288 * MIB, 400 * MIB, d).unwrap();
        assert!(fast.total_s() < slow.total_s() / 2.0);
    }

    #[test]
    fn no_convergence_is_none() {
        let d = Duration::from_millis(100);
        assert!(floor_model(1 << 30, 400 * MIB, 400 * MIB, d).is_none());
        assert!(floor_model(1 << 30, 1, 0, d).is_none());
        assert!(floor_model(0, 1, 1, d).is_none());
    }
}
