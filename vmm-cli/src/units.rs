// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parsing of the sizes, rates and durations the CLI takes (`4G`, `288M`, `100ms`), and sizes
//! printed back (`128 MiB`).
//!
//! Sizes and rates use binary units, as docs/design.md does: `400M` is 400 MiB. A bare number is bytes.
//!
//! `xtask` compiles this same file (`#[path]`) for its own flags: it must depend on nothing but
//! `std`.

use std::time::Duration;

/// `1 GiB`, `128 MiB`, `256 KiB`.
pub fn human_bytes(b: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if b >= 1 << shift && (b >> shift) << shift == b {
            return format!("{} {unit}", b >> shift);
        }
    }
    format!("{b} B")
}

/// Parse a size such as `4096`, `4K`, `128M`, `4G`, `1T` (binary units; an optional `B`/`iB`
/// suffix is accepted: `128MiB`, `128MB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size: give a number with an optional K/M/G/T suffix, like 4G".into());
    }
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is negative: sizes must be positive, like 128M"
        ));
    }
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, mult): (&str, u64) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        _ => (body, 1),
    };
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size: use a whole number with an optional K/M/G/T suffix, like 4G or 128M"))?;
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parse a rate in bytes per second: a size with an optional `/s` suffix (`288M`, `400M/s`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    parse_size(t).map_err(|e| e.replace("size", "rate"))
}

/// Parse a duration: `100ms`, `2s`, `1.5s`, `3m`, `250us`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is negative: durations must be positive, like 100ms"
        ));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("`{s}` is not a duration: use a number with a unit, like 100ms, 2s or 1m")
    })?;
    let secs = match unit.trim() {
        "" | "ms" => value / 1e3,
        "us" => value / 1e6,
        "s" | "sec" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}`; use us, ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("128M").unwrap(), 128 << 20);
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        parse_size("").unwrap_err();
        assert!(parse_size("-1G").unwrap_err().contains("negative"));
        parse_size("1.5G").unwrap_err();
        parse_size("abc").unwrap_err();
        parse_size("99999999999T").unwrap_err();
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("288M").unwrap(), 288 << 20);
        assert_eq!(parse_rate("400M/s").unwrap(), 400 << 20);
        assert!(parse_rate("fast").unwrap_err().contains("rate"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        parse_duration("-5ms").unwrap_err();
        parse_duration("5 parsecs").unwrap_err();
    }
}
