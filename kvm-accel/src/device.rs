// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The KVM device node: opening it, with errors that name the device and the fix.

use std::path::Path;

use kvm_ioctls::Kvm;

use crate::error::{Error, Result};
use crate::fd::AsKvmFd;
use crate::raw::FdKind;

/// The default KVM device node.
///
/// # Example
///
/// ```
/// assert_eq!(clearlog_kvm::KVM_DEVICE, "/dev/kvm");
/// ```
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The API version of every kernel this crate supports (`KVM_GET_API_VERSION`).
pub(crate) const KVM_API_VERSION: i32 = 12;

/// Opens a KVM device node, checks it is the KVM device (character device 10:232) before any
/// ioctl, and checks its API version.
pub(crate) fn open_kvm(path: &Path) -> Result<Kvm> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::KvmOpen {
            path: path.to_owned(),
            source: vmm_sys_util::errno::Error::new(libc::EINVAL),
        }
    })?;
    let kvm = Kvm::new_with_path(c_path).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing {
            path: path.to_owned(),
        },
        libc::EACCES | libc::EPERM => Error::KvmPermission {
            path: path.to_owned(),
        },
        _ => Error::KvmOpen {
            path: path.to_owned(),
            source,
        },
    })?;
    if !matches!(FdKind::of(kvm.as_kvm_fd()), Ok(FdKind::System)) {
        return Err(Error::KvmOpen {
            path: path.to_owned(),
            source: vmm_sys_util::errno::Error::new(libc::ENODEV),
        });
    }
    let api = kvm.get_api_version();
    if api != KVM_API_VERSION {
        return Err(Error::ApiVersion(api));
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_node_and_a_node_that_is_not_kvm_say_so() {
        let missing = open_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(missing, Error::KvmMissing { .. }), "{missing}");
        let null = open_kvm(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(null, Error::KvmOpen { .. }), "{null}");
    }
}
