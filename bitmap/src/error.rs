// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate-level error type.

/// Errors returned by the fallible (`try_*` / constructor) functions of this crate.
///
/// Programming errors that can only come from a wrong index (for example
/// [`Bitmap::set`](crate::Bitmap::set) on a bit past the end) panic instead, like
/// slice indexing does; see each function's `# Panics` / `# Errors` section.
///
/// # Examples
///
/// ```
/// use clearlog_bitmap::{Bitmap, Error};
///
/// // 100 bits need 2 words, not 3.
/// let err = Bitmap::from_words(vec![0; 3], 100).unwrap_err();
/// assert_eq!(err, Error::LengthMismatch { expected: 2, actual: 3 });
/// assert_eq!(err.to_string(), "length mismatch: expected 2, got 3");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bit range `[start, start + len)` does not fit in a bitmap (or word
    /// slice) of `size` bits. Also returned when `start + len` overflows `usize`.
    #[error("bit range of {len} bits at {start} out of range for bitmap of {size} bits")]
    OutOfRange {
        /// First bit of the requested range.
        start: usize,
        /// Number of bits in the requested range.
        len: usize,
        /// Size, in bits, of the bitmap or word slice that was indexed.
        size: usize,
    },
    /// A length (in words or bits, depending on the function) differs from the
    /// one required.
    #[error("length mismatch: expected {expected}, got {actual}")]
    LengthMismatch {
        /// The required length.
        expected: usize,
        /// The length that was passed.
        actual: usize,
    },
    /// A [`ClearBitmap`](crate::ClearBitmap) chunk shift outside
    /// `ClearBitmap::MIN_SHIFT..=ClearBitmap::MAX_SHIFT`.
    #[error("clear-bitmap shift {shift} is outside 6..=31")]
    InvalidClearShift {
        /// The shift asked for.
        shift: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let e = Error::OutOfRange {
            start: 60,
            len: 10,
            size: 64,
        };
        assert_eq!(
            e.to_string(),
            "bit range of 10 bits at 60 out of range for bitmap of 64 bits"
        );
        let e = Error::LengthMismatch {
            expected: 1,
            actual: 2,
        };
        assert_eq!(e.to_string(), "length mismatch: expected 1, got 2");
    }

    #[test]
    fn is_std_error() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<Error>();
    }
}
