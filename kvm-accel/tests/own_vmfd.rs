// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Runs the `own_vmfd` example's checks (real KVM), so the example cannot rot.

#[path = "../examples/own_vmfd.rs"]
mod own_vmfd;

#[test]
fn own_vmfd_example_passes() {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1");
    match own_vmfd::run() {
        Ok(Some(checks)) => {
            for c in &checks {
                eprintln!("ok: {c}");
            }
            assert!(checks.len() >= 8, "{checks:?}");
        }
        Ok(None) => assert!(
            !required || !std::path::Path::new("/dev/kvm").exists(),
            "KVM is required here but the example skipped"
        ),
        Err(e) => panic!("own_vmfd: {e}"),
    }
}
