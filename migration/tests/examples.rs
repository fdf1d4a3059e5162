// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The adopter examples must keep working and keep their glue small: `cargo test` builds the
//! examples, these tests run them and count their glue.

use std::path::PathBuf;
use std::process::Command;

/// The glue of an example: code lines (not blank, not comments) between the
/// `// --- glue begin ---` and `// --- glue end ---` markers.
fn glue_lines(source: &str) -> usize {
    let mut inside = false;
    let mut count = 0;
    for line in source.lines().map(str::trim) {
        match line {
            "// --- glue begin ---" => inside = true,
            "// --- glue end ---" => inside = false,
            l if inside && !l.is_empty() && !l.starts_with("//") => count += 1,
            _ => {}
        }
    }
    count
}

/// The source of `examples/{name}.rs`, after checking that its glue is under `limit` lines and
/// that its header states the count (`{claim} N lines.`).
fn glue_checked(name: &str, limit: usize, claim: &str) -> String {
    let path = format!("{}/examples/{name}.rs", env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(&path).unwrap();
    let glue = glue_lines(&source);
    assert!(glue > 0, "no glue markers found in {path}");
    assert!(
        glue < limit,
        "{name} glue grew to {glue} lines (limit: under {limit})"
    );
    let claimed = format!("{claim} {glue} lines.");
    assert!(
        source.contains(&claimed),
        "the example's header must state its glue size: expected `{claimed}`"
    );
    source
}

#[test]
fn vmm_adopter_glue_is_small() {
    glue_checked("vmm_adopter", 60, "example's own VMM):");
}

/// The example binary cargo built beside this test (`cargo test` builds every example).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/examples-<hash> -> target/<profile>/examples/<name>
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

#[test]
fn vmm_adopter_migrates_byte_equal_memory() {
    let bin = example("vmm_adopter");
    assert!(
        bin.exists(),
        "{} missing: run through `cargo test`, which builds the examples",
        bin.display()
    );
    let out = Command::new(&bin).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vmm_adopter failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    assert_eq!(
        last, "destination memory is byte-equal to the source's at switchover: yes",
        "{stdout}"
    );
}

/// The check has teeth: writes that bypass dirty tracking make the example fail, naming the pages.
#[test]
fn vmm_adopter_detects_untracked_writes() {
    let out = Command::new(example("vmm_adopter"))
        .arg("--untracked-writes")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("byte-equal to the source's at switchover: NO ("),
        "{stdout}"
    );
}

/// Is KVM usable here? Without it the KVM example skips (and so do its tests, loudly), unless
/// KVM is required (`CI=true` or `CLEARLOG_REQUIRE_KVM=1`): then the tests run and fail.
fn kvm_or_skip(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CLEARLOG_REQUIRE_KVM").is_ok_and(|v| v == "1");
    if !usable && !required {
        eprintln!("SKIPPED: {test}: /dev/kvm is not usable");
    }
    usable || required
}

#[test]
fn ch_shaped_glue_is_small() {
    let source = glue_checked("ch_shaped", 80, "report):");
    assert!(
        !source.contains("MemorySystem") && !source.contains("clearlog_memory"),
        "ch_shaped must not use clearlog's memory API"
    );
}

#[test]
fn ch_shaped_migrates_a_kvm_guest_byte_equal() {
    if !kvm_or_skip("ch_shaped_migrates_a_kvm_guest_byte_equal") {
        return;
    }
    let out = Command::new(example("ch_shaped")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ch_shaped failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("increment rule holds on the destination: true"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or("");
    assert_eq!(
        last, "destination memory is byte-equal to the source's at switchover: yes",
        "{stdout}"
    );
}

/// A write the VMM forgets to mark (a device writing behind vm-memory's bitmap) must fail the
/// example: the engine's verification catches it on both sides, naming the page (the example's
/// `FORGOTTEN_PAGE`, 0xf0000: page 240 of the low region), and the memories differ.
#[test]
fn ch_shaped_fails_on_a_write_the_vmm_forgets_to_mark() {
    if !kvm_or_skip("ch_shaped_fails_on_a_write_the_vmm_forgets_to_mark") {
        return;
    }
    let out = Command::new(example("ch_shaped"))
        .arg("--forget-mark")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("VerificationFailed"), "{stdout}");
    assert!(stdout.contains("ram@0x0 page 240"), "{stdout}");
    assert!(
        stdout.contains("byte-equal to the source's at switchover: NO ("),
        "{stdout}"
    );
}
