// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live snapshots.

pub(crate) mod wp_digests;
