// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm qemu-image`: the `random` workload as a Multiboot kernel for QEMU (docs/design.md, "The
//! QEMU side of the comparison"). The guest TSC runs at the host's KVM TSC frequency, read here
//! from a throw-away vCPU exactly as `vmm run` reads it, so the image paces like our guests.

use clearlog_kvm::{Vm, VmConfig};
use clearlog_test_guest::boot_image::{
    build, BootImageSpec, BOOT_STATUS_ADDR, BOOT_STATUS_RING3, QEMU_MAX_RAM_BELOW_4G,
};
use clearlog_test_guest::layout::COUNTERS_ADDR;
use clearlog_test_guest::vcpu::Vcpu;

use crate::args::{QemuImageArgs, WorkloadKind, DEFAULT_DIRTY_RATE};
use crate::chain::ErrorChain;
use crate::{CliError, CliResult};

/// `vmm qemu-image`: prints one JSON line describing the image it wrote.
pub fn qemu_image(a: QemuImageArgs) -> CliResult {
    crate::setup::validate_guest(&a.guest, WorkloadKind::Random)?;
    let tsc_khz = host_tsc_khz()?;
    let rate = a.guest.dirty_rate.unwrap_or(DEFAULT_DIRTY_RATE);
    let spec = BootImageSpec::qemu_pc(a.guest.mem, a.guest.wss, rate, a.seed, tsc_khz);
    let img = build(&spec).map_err(|e| CliError::Usage(e.to_string()))?;
    std::fs::write(&a.out, &img)
        .map_err(|e| CliError::Failed(format!("writing {}: {e}", a.out.display())))?;
    println!(
        "{}",
        serde_json::json!({
            "image": a.out.display().to_string(),
            "image_bytes": img.len(),
            "mem_bytes": spec.mem_bytes,
            "low_ram_end": spec.low_ram_end,
            "wss_bytes": spec.wss_bytes,
            "dirty_rate_bytes_per_s": spec.dirty_rate_bytes_per_s,
            "seed": spec.seed,
            "tsc_khz": tsc_khz,
            // Where a harness reads the guest's progress (xtask qemu-bench), and how QEMU must
            // lay out RAM for the image.
            "boot_status_addr": BOOT_STATUS_ADDR,
            "boot_status_ring3": BOOT_STATUS_RING3,
            "counter_slot_addr": COUNTERS_ADDR,
            "max_ram_below_4g": QEMU_MAX_RAM_BELOW_4G,
        })
    );
    Ok(())
}

fn host_tsc_khz() -> CliResult<u32> {
    let fail = |what: &str, e: String| CliError::Failed(format!("{what}: {e}"));
    let vm = Vm::new(VmConfig::default())
        .map_err(|e| fail("creating a KVM VM", e.chain().to_string()))?;
    let vcpu = Vcpu::new(&vm, 0).map_err(|e| fail("creating a vCPU", e.chain().to_string()))?;
    vcpu.tsc_khz()
        .map_err(|e| fail("reading the TSC frequency", e.chain().to_string()))
}
