// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate layering rule and its check against `cargo metadata`.
//!
//! Dependencies point one way only: `bitmap` <- `memory-api` <- (`kvm-accel`, `migration`) <- `vmm-cli`,
//! with the test guest `kvm-accel/test-guest` on top of `kvm-accel` (the CLI runs it; `kvm-accel` may
//! use it as a dev-dependency, for its example and real-KVM tests).
//! `kvm-accel` and `migration` sit side by side: `migration` must work with any accelerator, so it never
//! depends on `kvm-accel` or the test guest; only its example of a cloud-hypervisor-shaped VMM
//! (`examples/ch_shaped.rs`) uses both, as dev-dependencies (path only: dropped when packaged).

/// One of our crates: its directory, package name and layer.
pub struct LayeredCrate {
    /// Directory under the workspace root.
    pub dir: &'static str,
    /// Cargo package name.
    pub package: &'static str,
    /// Packages of ours it may depend on (any dependency kind).
    pub may_use: &'static [&'static str],
    /// Packages of ours it may use as dev-dependencies only (examples, tests).
    pub may_dev_use: &'static [&'static str],
}

/// The library crates, bottom layer first.
pub const LIBRARY_CRATES: &[LayeredCrate] = &[
    LayeredCrate {
        dir: "bitmap",
        package: "clearlog-bitmap",
        may_use: &[],
        may_dev_use: &[],
    },
    LayeredCrate {
        dir: "memory-api",
        package: "clearlog-memory",
        may_use: &["clearlog-bitmap"],
        may_dev_use: &[],
    },
    LayeredCrate {
        dir: "kvm-accel",
        package: "clearlog-kvm",
        may_use: &["clearlog-bitmap", "clearlog-memory"],
        may_dev_use: &["clearlog-test-guest"],
    },
    LayeredCrate {
        dir: "kvm-accel/test-guest",
        package: "clearlog-test-guest",
        may_use: &["clearlog-bitmap", "clearlog-memory", "clearlog-kvm"],
        may_dev_use: &[],
    },
    LayeredCrate {
        dir: "migration",
        package: "clearlog-migration",
        may_use: &["clearlog-bitmap", "clearlog-memory"],
        may_dev_use: &["clearlog-kvm", "clearlog-test-guest"],
    },
];

/// The top: the CLI may use every library crate.
const CLI: LayeredCrate = LayeredCrate {
    dir: "vmm-cli",
    package: "vmm-cli",
    may_use: &[
        "clearlog-bitmap",
        "clearlog-memory",
        "clearlog-kvm",
        "clearlog-test-guest",
        "clearlog-migration",
    ],
    may_dev_use: &[],
};

fn rule_for(package: &str) -> Option<&'static LayeredCrate> {
    LIBRARY_CRATES
        .iter()
        .chain(std::iter::once(&CLI))
        .find(|c| c.package == package)
}

/// Check `cargo metadata --no-deps` output; returns one message per forbidden edge.
pub fn check(metadata: &serde_json::Value) -> Result<Vec<String>, String> {
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata has no `packages` array")?;
    let ours: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    for expected in LIBRARY_CRATES.iter().chain(std::iter::once(&CLI)) {
        if !ours.contains(&expected.package) {
            return Err(format!(
                "package `{}` (directory {}/) is missing from the workspace",
                expected.package, expected.dir
            ));
        }
    }
    let mut violations = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or("?");
        let deps = p["dependencies"].as_array().map_or(&[][..], Vec::as_slice);
        for d in deps {
            let dep = d["name"].as_str().unwrap_or("?");
            if !ours.contains(&dep) {
                continue; // third-party crates are not layered
            }
            let kind = d["kind"].as_str().unwrap_or("normal");
            let allowed = match rule_for(name) {
                Some(rule) => {
                    rule.may_use.contains(&dep)
                        || (kind == "dev" && rule.may_dev_use.contains(&dep))
                }
                None => false, // xtask and anything unknown may not use our crates
            };
            if !allowed {
                violations.push(format!(
                    "`{name}` depends on `{dep}` ({kind} dependency), which is not below it in the layering"
                ));
            }
        }
    }
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pkg(name: &str, deps: &[(&str, Option<&str>)]) -> serde_json::Value {
        json!({
            "name": name,
            "dependencies": deps.iter().map(|(d, k)| json!({"name": d, "kind": k})).collect::<Vec<_>>(),
        })
    }

    fn workspace(extra: &[(&str, Option<&str>)]) -> serde_json::Value {
        json!({ "packages": [
            pkg("clearlog-bitmap", &[("thiserror", None)]),
            pkg("clearlog-memory", &[("clearlog-bitmap", None)]),
            pkg(
                "clearlog-kvm",
                &[
                    ("clearlog-memory", None),
                    ("clearlog-bitmap", None),
                    ("clearlog-test-guest", Some("dev")),
                ],
            ),
            pkg(
                "clearlog-test-guest",
                &[("clearlog-kvm", None), ("clearlog-memory", None)],
            ),
            pkg("clearlog-migration", extra),
            pkg(
                "vmm-cli",
                &[
                    ("clearlog-kvm", None),
                    ("clearlog-test-guest", None),
                    ("clearlog-migration", None),
                ],
            ),
        ]})
    }

    #[test]
    fn accepts_the_intended_layering() {
        let m = workspace(&[("clearlog-memory", None)]);
        assert!(check(&m).unwrap().is_empty());
    }

    #[test]
    fn rejects_migration_on_kvm_and_the_test_guest_except_as_dev_dependencies() {
        for dep in ["clearlog-kvm", "clearlog-test-guest"] {
            let m = workspace(&[(dep, None)]);
            let v = check(&m).unwrap();
            assert_eq!(v.len(), 1, "{v:?}");
            assert!(v[0].contains("clearlog-migration") && v[0].contains(dep));
            assert!(check(&workspace(&[(dep, Some("dev"))])).unwrap().is_empty());
        }
    }

    #[test]
    fn kvm_may_use_the_test_guest_only_as_dev_dependency() {
        let mut m = workspace(&[]);
        m["packages"][2]["dependencies"][2]["kind"] = json!(null);
        let v = check(&m).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("clearlog-kvm") && v[0].contains("clearlog-test-guest"));
    }

    #[test]
    fn rejects_upward_dependency() {
        let mut m = workspace(&[]);
        m["packages"][0]["dependencies"] = json!([{"name": "clearlog-memory", "kind": null}]);
        assert_eq!(check(&m).unwrap().len(), 1);
    }

    #[test]
    fn missing_crate_is_an_error() {
        let m = json!({ "packages": [pkg("clearlog-bitmap", &[])] });
        check(&m).unwrap_err();
    }
}
