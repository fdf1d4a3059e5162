// Copyright 2025 The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Dirty-page bitmaps in KVM's layout.
//!
//! A bitmap of `n` bits is `ceil(n / 64)` little-endian `u64` words, bit `i`
//! being bit `i % 64` of word `i / 64`: exactly what `KVM_GET_DIRTY_LOG` fills
//! and `KVM_CLEAR_DIRTY_LOG` reads, so maps are exchanged with the kernel as
//! `&[u64]` / `&mut [u64]` without conversion.
//!
//! - [`Bitmap`]: an owned bitmap (set/clear/test, ranges, counts, finds,
//!   iteration, and/or/and-not), a word at a time.
//! - [`AtomicBitmap`]: a bitmap shared between threads; every operation is
//!   atomic per word, and [`AtomicBitmap::take_range`] takes bits without ever
//!   losing one set concurrently.
//! - [`ClearBitmap`]: a migration's per-chunk "needs clear" bits and the one implementation of
//!   the clear-then-read rule ([`ClearBitmap::clear_run_before_read`]);
//!   [`AtomicBitmap::take_into`] moves a block's collected dirty bits into a migration's bitmap
//!   and marks their chunks.
//! - [`copy_with_src_offset`] / [`copy_with_dst_offset`] (and their `try_`
//!   forms): copies at any bit offset that never touch destination bits
//!   outside the written range.
//!
//! Bit or range indices past the end are programming errors and panic with a
//! clear message, like slice indexing; sizes that typically come from outside
//! (word vectors, copy lengths) also have `Result`-returning forms with
//! [`Error`].
//!
//! # Examples
//!
//! Fold a memory slot's KVM dirty bitmap into a region-wide atomic map, then
//! take the dirty pages of the slot:
//!
//! ```
//! use clearlog_bitmap::{copy_with_src_offset, AtomicBitmap, Bitmap};
//!
//! // A 256-page region; the slot covers pages 128..256.
//! let region = AtomicBitmap::new(256);
//! let kvm_log: Vec<u64> = vec![0b1001, 1 << 63]; // as filled by KVM_GET_DIRTY_LOG
//! region.or_words_at(128 / 64, &kvm_log);
//! assert_eq!(region.iter_ones().collect::<Vec<_>>(), [128, 131, 255]);
//!
//! // Take pages 130..256: page 128 stays dirty in the region.
//! let taken: Bitmap = region.take_range(130, 126);
//! assert_eq!(taken.iter_ones().collect::<Vec<_>>(), [1, 125]);
//! assert_eq!(region.iter_ones().collect::<Vec<_>>(), [128]);
//!
//! // Extract bits 1.. of `taken` into the low bits of another word slice.
//! let mut out = [0u64; 2];
//! copy_with_src_offset(&mut out, taken.as_words(), 1, 125);
//! assert_eq!(out, [1, 1 << 60]);
//! ```

#![forbid(unsafe_code)]
#![deny(unreachable_pub)]

mod atomic;
mod bitmap;
mod clear;
mod copy;
mod error;
mod size;
mod word;

pub use atomic::{AtomicBitmap, AtomicIterOnes};
pub use bitmap::{Bitmap, IterOnes};
pub use clear::ClearBitmap;
pub use copy::{
    copy_with_dst_offset, copy_with_src_offset, try_copy_with_dst_offset, try_copy_with_src_offset,
};
pub use error::Error;
#[doc(hidden)]
pub use size::format_size;
pub use word::{words_for_bits, BITS_PER_WORD};

/// The examples of `README.md`, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
