// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The throwaway CA and certificates of `vmm bench --transports tls:N`.

use std::path::{Path, PathBuf};

use crate::{CliError, CliResult};

/// A throwaway CA and certificates for `tls:N` runs: `src/` and `dst/` under a temporary
/// directory (the destination's certificate names 127.0.0.1 and localhost), removed on drop.
pub struct BenchTls(PathBuf);

impl BenchTls {
    /// Makes the CA, both sides' certificates and keys, and writes them as `ca.pem`, `cert.pem`
    /// and `key.pem` in `src/` and `dst/`.
    pub fn make() -> CliResult<Self> {
        let dir = std::env::temp_dir().join(format!("vmm-bench-tls-{}", std::process::id()));
        let failed = |e: &dyn std::fmt::Display| {
            CliError::Failed(format!("making the bench's TLS certificates: {e}"))
        };
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| failed(&e))?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
        let ca_pem = ca.self_signed(&ca_key).map_err(|e| failed(&e))?.pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let tls = BenchTls(dir);
        for (side, names) in [
            ("dst", vec!["localhost".into(), "127.0.0.1".into()]),
            ("src", vec!["bench-source.example".to_string()]),
        ] {
            let key = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
            let cert = rcgen::CertificateParams::new(names)
                .and_then(|p| p.signed_by(&key, &issuer))
                .map_err(|e| failed(&e))?;
            let d = tls.0.join(side);
            std::fs::create_dir_all(&d).map_err(|e| failed(&e))?;
            for (file, pem) in [
                ("ca.pem", ca_pem.clone()),
                ("cert.pem", cert.pem()),
                ("key.pem", key.serialize_pem()),
            ] {
                std::fs::write(d.join(file), pem).map_err(|e| failed(&e))?;
            }
        }
        Ok(tls)
    }

    /// The directory holding `src/` and `dst/`.
    pub fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for BenchTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
