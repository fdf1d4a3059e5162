// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The library half of the `vmm` CLI: wiring the binary and its integration tests share.
//!
//! `vmm` itself adds no logic of its own beyond assembling the library crates; this is the one
//! piece of glue worth sharing: a `clearlog-kvm` guest seen through `clearlog-migration`'s traits.

#![forbid(unsafe_code)]

pub mod floor;
pub mod vm_control;

/// The code blocks of docs/adopting.md (both adoption paths), compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/adopting.md")]
pub struct AdoptingDoctests;
