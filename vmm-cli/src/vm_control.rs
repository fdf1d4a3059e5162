// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Wiring: a `clearlog-kvm` [`Guest`] seen through `clearlog-migration`'s VMM traits.

use clearlog_migration::{BoxError, StateBlob, VmControl, VmRestore};
use clearlog_test_guest::Guest;

/// Lets the migration engine pause, resume and save (or restore) a guest.
///
/// # Example
/// ```
/// # if clearlog_kvm::doctest_kvm_skip("GuestControl") { return; }
/// use clearlog_test_guest::{Guest, GuestConfig};
/// use vmm_cli::vm_control::GuestControl;
///
/// let guest = Guest::boot(GuestConfig::default()).unwrap();
/// let control = GuestControl(&guest); // a `VmControl` for `Source::migrate`
/// ```
#[derive(Debug, Clone, Copy)]
pub struct GuestControl<'a>(pub &'a Guest);

impl VmControl for GuestControl<'_> {
    fn pause(&self) -> Result<(), BoxError> {
        Ok(self.0.pause()?)
    }

    fn resume(&self) -> Result<(), BoxError> {
        Ok(self.0.resume()?)
    }

    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
        Ok(self
            .0
            .save_vcpus()?
            .into_iter()
            .map(|(name, data)| StateBlob::new(name, data))
            .collect())
    }
}

impl VmRestore for GuestControl<'_> {
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        let blobs: Vec<(String, Vec<u8>)> = blobs
            .iter()
            .map(|b| (b.name.clone(), b.data.clone()))
            .collect();
        Ok(self.0.restore_vcpus(&blobs)?)
    }

    fn resume(&self) -> Result<(), BoxError> {
        Ok(self.0.resume()?)
    }
}
