// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sizes in the library crates' messages, as a user types them (`64K`, `256M`, `1G`).

/// `bytes` in the largest binary unit it is a whole number of (`64K`, `255M`, `1G`, `2T`); a size
/// that is no whole number of K says its bytes (`1000 bytes`), after the nearest unit when it is
/// larger (`4.9K (5000 bytes)`).
///
/// Not part of the API (hidden from the docs): the error messages of `clearlog-memory`,
/// `clearlog-kvm` and `clearlog-migration` print the sizes a VMM configured with it, in the
/// spelling of the `vmm` CLI (whose own copy, in `vmm-cli/src/units.rs`, `xtask` compiles too).
///
/// # Examples
///
/// ```
/// assert_eq!(clearlog_bitmap::format_size(16 << 20), "16M");
/// assert_eq!(clearlog_bitmap::format_size(5000), "4.9K (5000 bytes)");
/// ```
pub fn format_size(bytes: u64) -> String {
    let mut nearest = None;
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes >> shift != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
        if bytes >> shift != 0 && nearest.is_none() {
            nearest = Some((unit, shift));
        }
    }
    match nearest {
        Some((unit, shift)) => {
            let approx = bytes as f64 / (1u64 << shift) as f64;
            format!("{approx:.1}{unit} ({bytes} bytes)")
        }
        None => format!("{bytes} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::format_size;

    #[test]
    fn whole_units_and_exact_bytes() {
        assert_eq!(format_size(64 << 10), "64K");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(3 << 40), "3T");
        assert_eq!(format_size(4095), "4.0K (4095 bytes)");
        assert_eq!(format_size(1000), "1000 bytes");
        assert_eq!(format_size(0), "0 bytes");
    }
}
