// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parsing of the sizes, rates and durations the CLI takes (`4G`, `288M`, `100ms`), printing them
//! back in messages as they are typed ([`fmt_size`], [`fmt_rate`], [`fmt_duration`]: `1G`,
//! `400M/s`, `100ms`), and table labels (`128 MiB`).
//!
//! Sizes and rates use binary units, as docs/design.md does: `400M` is 400 MiB. A bare number is bytes.
//!
//! `xtask` compiles this same file (`#[path]`) for its own flags: it must depend on nothing but
//! `std`.

use std::time::Duration;

/// `1 GiB`, `128 MiB`, `256 KiB`: table and mode labels (`clear 1 MiB`). Messages use [`fmt_size`].
pub fn human_bytes(b: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if b >= 1 << shift && (b >> shift) << shift == b {
            return format!("{} {unit}", b >> shift);
        }
    }
    format!("{b} B")
}

/// A size as it is typed (`1G`, `255M`, `4K`): the largest binary unit it is a whole number of.
/// A size that is no whole number of K says its bytes (`1000 bytes`), after the nearest unit when
/// it is larger (`4.9K (5000 bytes)`). Every message that echoes a size uses it.
pub fn fmt_size(bytes: u64) -> String {
    scaled(bytes, "", "bytes")
}

/// A rate in bytes per second as it is typed: `400M/s`, `1000 bytes/s`, `4.9K/s (5000 bytes/s)`.
pub fn fmt_rate(bytes_per_s: u64) -> String {
    scaled(bytes_per_s, "/s", "bytes/s")
}

/// `b` in the largest unit it is a whole number of, with `per` after the unit (`/s`); otherwise
/// the exact count in `exact_unit`, after the nearest unit rounded to a tenth.
fn scaled(b: u64, per: &str, exact_unit: &str) -> String {
    const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    let mut nearest = None;
    for (unit, shift) in UNITS {
        if b >> shift == 0 {
            continue;
        }
        if b.trailing_zeros() >= shift {
            return format!("{}{unit}{per}", b >> shift);
        }
        nearest = nearest.or(Some((unit, shift)));
    }
    match nearest {
        Some((unit, shift)) => format!(
            "{:.1}{unit}{per} ({b} {exact_unit})",
            b as f64 / (1u64 << shift) as f64
        ),
        None => format!("{b} {exact_unit}"),
    }
}

/// A duration as it is typed: `100ms`, `2s`, `1.5s`, `250us` (the largest of s, ms, us and ns
/// it is at least one of, with the decimals it needs).
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    let (unit, per) = match ns {
        0 => return "0s".into(),
        n if n >= 1_000_000_000 => ("s", 1_000_000_000),
        n if n >= 1_000_000 => ("ms", 1_000_000),
        n if n >= 1_000 => ("us", 1_000),
        _ => ("ns", 1),
    };
    let (whole, frac) = (ns / per, ns % per);
    if frac == 0 {
        return format!("{whole}{unit}");
    }
    // `per` is 10^k: the fraction has k digits, less its trailing zeros.
    let digits = per.ilog10() as usize;
    let frac = format!("{frac:0digits$}");
    format!("{whole}.{}{unit}", frac.trim_end_matches('0'))
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

    #[test]
    fn sizes_print_as_typed() {
        assert_eq!(fmt_size(1 << 30), "1G");
        assert_eq!(fmt_size(256 << 20), "256M");
        assert_eq!(fmt_size(255 << 20), "255M");
        assert_eq!(fmt_size(1536 << 20), "1536M");
        assert_eq!(fmt_size(64 << 10), "64K");
        assert_eq!(fmt_size(2 << 40), "2T");
        assert_eq!(fmt_size(1000), "1000 bytes");
        assert_eq!(fmt_size(0), "0 bytes");
        assert_eq!(fmt_size(5000), "4.9K (5000 bytes)");
        assert_eq!(fmt_size((1 << 30) + 1), "1.0G (1073741825 bytes)");
        assert_eq!(
            fmt_size(u64::MAX),
            "16777216.0T (18446744073709551615 bytes)"
        );
        // What is printed parses back to the same size.
        for b in [4096, 255 << 20, 3 << 30, 1000] {
            let shown = fmt_size(b);
            assert_eq!(
                parse_size(shown.trim_end_matches(" bytes")),
                Ok(b),
                "{shown}"
            );
        }
    }

    #[test]
    fn rates_print_as_typed() {
        assert_eq!(fmt_rate(400 << 20), "400M/s");
        assert_eq!(fmt_rate(288 << 20), "288M/s");
        assert_eq!(fmt_rate(1000), "1000 bytes/s");
        assert_eq!(fmt_rate(1_500_000), "1.4M/s (1500000 bytes/s)");
        assert_eq!(parse_rate(&fmt_rate(400 << 20)), Ok(400 << 20));
    }

    #[test]
    fn durations_print_as_typed() {
        let ms = Duration::from_millis;
        assert_eq!(fmt_duration(ms(100)), "100ms");
        assert_eq!(fmt_duration(ms(2000)), "2s");
        assert_eq!(fmt_duration(ms(300_000)), "300s");
        assert_eq!(fmt_duration(ms(1500)), "1.5s");
        assert_eq!(fmt_duration(ms(1001)), "1.001s");
        assert_eq!(fmt_duration(Duration::from_micros(250)), "250us");
        assert_eq!(fmt_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(
            fmt_duration(Duration::from_nanos(1_000_000_007)),
            "1.000000007s"
        );
        assert_eq!(fmt_duration(Duration::from_nanos(12)), "12ns");
        assert_eq!(fmt_duration(Duration::ZERO), "0s");
        for d in [ms(100), ms(1500), Duration::from_micros(250), ms(250_000)] {
            assert_eq!(parse_duration(&fmt_duration(d)), Ok(d));
        }
    }
}
