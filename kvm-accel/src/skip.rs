// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Whether this machine can run the real-KVM tests and doc examples, and what they do when it
//! cannot: print a loud `SKIPPED` line and pass, or fail where KVM is required (`CI=true` or
//! `CLEARLOG_REQUIRE_KVM=1`, which `cargo xtask test` sets under CI).

/// Is KVM required here (a test that cannot use it must fail)?
pub(crate) fn kvm_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Why `/dev/kvm` cannot be used here, if it cannot (it cannot be opened read-write).
fn kvm_unusable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(crate::KVM_DEVICE)
        .err()
        .map(|e| e.to_string())
}

/// For this crate's doc examples and tests that need a real `/dev/kvm`: `false` when KVM is
/// usable (run the example); `true` after printing `SKIPPED: <example>: ...` when it is not (the
/// example returns early and passes); panics instead when KVM is required here.
///
/// Not part of the API (hidden from the docs): the doc examples call it in a hidden first line.
///
/// # Panics
///
/// KVM is not usable but required (`CI=true` or `CLEARLOG_REQUIRE_KVM=1`).
#[doc(hidden)]
pub fn doctest_kvm_skip(example: &str) -> bool {
    let Some(why) = kvm_unusable() else {
        return false;
    };
    if kvm_required() {
        panic!("{example}: KVM is required here (CI=true or CLEARLOG_REQUIRE_KVM=1) but {} cannot be used: {why}", crate::KVM_DEVICE);
    }
    eprintln!(
        "SKIPPED: {example}: {} cannot be used: {why}",
        crate::KVM_DEVICE
    );
    true
}
