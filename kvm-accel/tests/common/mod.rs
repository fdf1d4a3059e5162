// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the real-KVM tests of clearlog-kvm.

/// True when the test can use /dev/kvm; otherwise a loud SKIPPED line, or a panic when KVM is
/// required (CI=true or CLEARLOG_REQUIRE_KVM=1) and the device exists.
pub fn kvm_available() -> bool {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if required && std::path::Path::new("/dev/kvm").exists() => {
            panic!("KVM required, but /dev/kvm cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm not available ({e})");
            false
        }
    }
}
