// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The small traits a VMM implements so the engine can pause, save, restore and resume its guest.

use crate::BoxError;

/// An opaque piece of VM state (CPU registers, a device...), carried as named bytes.
///
/// # Examples
///
/// ```
/// use clearlog_migration::StateBlob;
///
/// let blob = StateBlob::new("vcpu0", vec![1, 2, 3]);
/// assert_eq!(blob.name, "vcpu0");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBlob {
    /// Name (at most [`crate::stream::MAX_NAME_LEN`] bytes of UTF-8).
    pub name: String,
    /// Contents (at most [`crate::stream::MAX_STATE_BLOB_BYTES`] bytes).
    pub data: Vec<u8>,
}

impl StateBlob {
    /// A blob.
    ///
    /// # Examples
    ///
    /// ```
    /// let b = clearlog_migration::StateBlob::new("dev", b"x".to_vec());
    /// assert_eq!(b.data, b"x");
    /// ```
    pub fn new(name: impl Into<String>, data: Vec<u8>) -> Self {
        StateBlob {
            name: name.into(),
            data,
        }
    }
}

/// A blob from a name and its bytes (a VMM's snapshot entries, as they are).
///
/// # Examples
///
/// ```
/// use clearlog_migration::StateBlob;
///
/// let snapshot = vec![("vcpu0", vec![1, 2]), ("virtio", vec![3])];
/// let blobs: Vec<StateBlob> = snapshot.into_iter().map(StateBlob::from).collect();
/// assert_eq!(blobs[1], StateBlob::new("virtio", vec![3]));
/// ```
impl<N: Into<String>> From<(N, Vec<u8>)> for StateBlob {
    fn from((name, data): (N, Vec<u8>)) -> Self {
        StateBlob::new(name, data)
    }
}

/// What the source side needs from the VMM.
///
/// # Examples
///
/// ```
/// use clearlog_migration::{BoxError, StateBlob, VmControl};
///
/// struct MyVm;
/// impl VmControl for MyVm {
///     fn pause(&self) -> Result<(), BoxError> { Ok(()) }
///     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
///     fn save_state(&self) -> Result<Vec<StateBlob>, BoxError> {
///         Ok(vec![StateBlob::new("vcpu0", vec![0; 16])])
///     }
/// }
/// ```
pub trait VmControl {
    /// Stop the vCPUs (and devices that write guest RAM). Called once, at switchover.
    fn pause(&self) -> Result<(), BoxError>;
    /// Run the guest again: called when a migration fails or is cancelled after `pause` was
    /// called, even if `pause` itself failed (it may have stopped some vCPUs), so it must resume
    /// whatever is paused and leave running vCPUs alone.
    fn resume(&self) -> Result<(), BoxError>;
    /// Save CPU and device state. Called once, right after `pause` and before the final dirty
    /// sync and pass, so guest RAM that saving writes (a device flushing a queue into guest
    /// memory, through a tracked write) is sent with the final pages.
    fn save_state(&self) -> Result<Vec<StateBlob>, BoxError>;
    /// Auto-converge: slow the vCPUs down to run `percent`% less (0 = full speed). Return `Ok(false)` if
    /// throttling is not supported (the default), and the engine stops asking.
    fn set_throttle(&self, _percent: u8) -> Result<bool, BoxError> {
        Ok(false)
    }
}

/// What the destination side needs from the VMM.
///
/// # Examples
///
/// ```
/// use clearlog_migration::{BoxError, StateBlob, VmRestore};
///
/// struct MyVm;
/// impl VmRestore for MyVm {
///     fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> { Ok(()) }
///     fn resume(&self) -> Result<(), BoxError> { Ok(()) }
/// }
/// ```
pub trait VmRestore {
    /// Check the loaded memory with the VMM's own rules before anything is acknowledged (called
    /// after the stream ended and, in strict mode, its digests matched; before `restore_state`).
    /// An error refuses the migration: the source resumes its guest. Default: no check. Not
    /// called for a postcopy (pages are still missing when the guest resumes).
    fn check_loaded(&self) -> Result<(), BoxError> {
        Ok(())
    }
    /// Load the saved CPU/device state (called only after the stream ended and `check_loaded`
    /// passed).
    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError>;
    /// Start the guest (called only after `restore_state` succeeded, the acknowledgement was sent
    /// and the source confirmed).
    fn resume(&self) -> Result<(), BoxError>;
    /// Start the guest with pages still missing (a postcopy): as [`resume`](Self::resume), but
    /// every read of a missing page waits until the page arrives, so whatever reads guest memory
    /// here (a checksum of all of it) delays the guest; reads from the VMM's other threads later
    /// are fine. Default: [`resume`](Self::resume).
    fn resume_postcopy(&self) -> Result<(), BoxError> {
        self.resume()
    }
}
