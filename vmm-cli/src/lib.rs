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

/// The code blocks of the workspace README (an example per crate), compiled and run as doc tests.
/// Here rather than in a library crate: `vmm-cli` is not published, and its dev-dependencies have
/// every crate the examples use (a published crate could not include a file outside its package).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct TopReadmeDoctests;
