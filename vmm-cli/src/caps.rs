// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm caps`.

use clearlog_kvm::{is_pvm_host, KvmCaps, RingRange};

use crate::chain::ErrorChain;
use crate::{CliError, CliResult};

/// Print what this host's KVM offers and which dirty-log mode `vmm` would use.
pub fn caps(json: bool) -> CliResult {
    let caps = KvmCaps::probe_device("/dev/kvm".as_ref())
        .map_err(|e| CliError::Failed(e.chain().to_string()))?;
    let mode = caps.default_dirty_log_mode();
    if json {
        let mut map = serde_json::Map::new();
        for (k, v) in caps.fields() {
            // Numbers (flag masks are printed as hex, like `0x3`) become JSON numbers.
            let value = v
                .parse::<i64>()
                .ok()
                .or_else(|| {
                    v.strip_prefix("0x")
                        .and_then(|h| i64::from_str_radix(h, 16).ok())
                })
                .map_or_else(
                    || match v.as_str() {
                        "true" | "yes" => true.into(),
                        "false" | "no" => false.into(),
                        _ => v.clone().into(),
                    },
                    serde_json::Value::from,
                );
            map.insert(k.to_string(), value);
        }
        map.insert("dirty_log_mode".into(), mode.to_string().into());
        map.insert("clear_dirty_log".into(), mode.is_manual().into());
        let ring = RingRange::of(&caps);
        map.insert("dirty_ring".into(), ring.is_some().into());
        map.insert("dirty_ring_min_bytes".into(), ring.map(|r| r.min).into());
        map.insert(
            "dirty_ring_max_bytes_usable".into(),
            ring.map(|r| r.max).into(),
        );
        map.insert("dirty_ring_acq_rel".into(), ring.map(|r| r.acq_rel).into());
        map.insert("dirty_ring_default".into(), false.into());
        map.insert("pvm_host".into(), is_pvm_host().into());
        println!("{}", serde_json::Value::Object(map));
    } else {
        println!("KVM capabilities of this host (/dev/kvm):");
        for (k, v) in caps.fields() {
            println!("  {k:<30} {v}");
        }
        println!("dirty-log mode vmm uses: {mode}");
        if mode.is_manual() {
            println!(
                "  (KVM_CLEAR_DIRTY_LOG available: `--dirty-log clear` re-protects chunk by chunk)"
            );
        } else {
            println!(
                "  (no manual protect: `--dirty-log clear` falls back to clearing at every sync)"
            );
        }
        match RingRange::of(&caps) {
            Some(r) => println!(
                "dirty ring: available (`--dirty-log ring --ring-size N`, N a power of two in {}..={}{}), never the default",
                crate::units::fmt_size(r.min.into()),
                crate::units::fmt_size(r.max.into()),
                if r.acq_rel { ", acquire/release" } else { "" }
            ),
            None => println!("dirty ring: not available on this kernel"),
        }
        if is_pvm_host() {
            println!(
                "  PVM host: off by default; the kernel's ring loses entries when emulated guest ring-0 code fills a ring (guest ring-3 writers, like vmm's workloads, are fine); rings found full without a ring-full exit are counted (rings_found_full)"
            );
        }
    }
    Ok(())
}
