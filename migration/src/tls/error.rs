// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`TlsError`] and the words of its messages. A file of its own, with no import from the rest of
//! the crate, so the crate's [`Error`](crate::Error) can carry it without a circle of imports.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rustls::AlertDescription;
use rustls_pki_types::pem;

/// Errors of the TLS layer: reading the files, the configuration, and the handshake.
///
/// A refusal is reported by the side that refuses with a variant that says why, and by the other
/// side as [`TlsError::PeerRefused`]. Messages are short; where a variant has a source (an
/// [`io::Error`], a rustls error), it is not repeated: print the error's chain.
///
/// # Examples
///
/// ```
/// use clearlog_migration::tls::TlsError;
///
/// let e = TlsError::NotAuthorized {
///     presented: vec!["source-b.example".into()],
///     allowed: vec!["source-a.example".into()],
/// };
/// assert_eq!(
///     e.to_string(),
///     "the peer's certificate is not authorized: it is valid for source-b.example; \
///      the authorization list has source-a.example"
/// );
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    // ---- files ----
    /// A TLS file does not exist.
    #[error("TLS file {} does not exist", path.display())]
    FileMissing {
        /// The file.
        path: PathBuf,
    },
    /// A TLS file exists but cannot be read (permissions, a directory...).
    #[error("cannot read TLS file {}", path.display())]
    FileUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A TLS file is not well-formed PEM.
    #[error("TLS file {} is not valid PEM", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: pem::Error,
    },
    /// A file that must hold certificates holds none.
    #[error("no certificate in {}{}", path.display(), holds(found))]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// The labels of the PEM blocks it holds (`PRIVATE KEY`...), if any.
        found: Vec<String>,
    },
    /// The key file holds no private key rustls can read.
    #[error("no private key in {}{}", path.display(), key_hint(found))]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
        /// The labels of the PEM blocks it holds (`CERTIFICATE`, `ENCRYPTED PRIVATE KEY`...), if any.
        found: Vec<String>,
    },
    /// A certificate of a file cannot be used (malformed, not usable as a trust anchor...).
    #[error("a certificate in {} cannot be used", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The private key cannot be used (an unsupported algorithm...).
    #[error("the private key in {} cannot be used", path.display())]
    BadPrivateKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The private key is not the one of the certificate.
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },

    // ---- arguments ----
    /// A server name or authorized name is neither a DNS name nor an IP address.
    #[error("`{0}` is not a DNS name or an IP address")]
    InvalidName(String),
    /// An authorization list without a name (it would refuse every source).
    #[error("the TLS authorization list is empty")]
    EmptyAuthz,
    /// rustls refused the configuration (should not happen with files that loaded).
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),

    // ---- handshake ----
    /// The peer is not speaking TLS: its first bytes are not a TLS record.
    #[error("{}", not_tls(first_bytes))]
    NotTls {
        /// The first bytes it sent (up to 8).
        first_bytes: Vec<u8>,
    },
    /// The peer's certificate does not chain to our CA (`ca.pem`).
    #[error("the peer's certificate is not signed by our CA (ca.pem)")]
    UntrustedCertificate,
    /// The destination's certificate is not valid for the name the source expects.
    #[error(
        "the peer's certificate is not valid for {expected}: it is valid for {}",
        names(presented)
    )]
    NameMismatch {
        /// The name the source asked for (`--tls-hostname`, or the host of the URI).
        expected: String,
        /// The names the certificate holds (subject alternative names).
        presented: Vec<String>,
    },
    /// The source's certificate chains to our CA but is valid for none of the authorized names.
    #[error(
        "the peer's certificate is not authorized: it is valid for {}; the authorization list has {}",
        names(presented),
        allowed.join(", ")
    )]
    NotAuthorized {
        /// The names the certificate holds (subject alternative names).
        presented: Vec<String>,
        /// The authorization list.
        allowed: Vec<String>,
    },
    /// The peer's certificate has expired (or the local clock is wrong).
    #[error(
        "the peer's certificate has expired{}",
        when("expired on", not_after, now)
    )]
    CertificateExpired {
        /// Its `notAfter`, when known.
        not_after: Option<SystemTime>,
        /// The time it was checked at.
        now: Option<SystemTime>,
    },
    /// The peer's certificate is not valid yet (or a clock is wrong).
    #[error(
        "the peer's certificate is not valid yet{}",
        when("valid from", not_before, now)
    )]
    CertificateNotYetValid {
        /// Its `notBefore`, when known.
        not_before: Option<SystemTime>,
        /// The time it was checked at.
        now: Option<SystemTime>,
    },
    /// The peer sent no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate was refused for another reason (its key usage, a bad signature...).
    #[error("the peer's certificate is not acceptable")]
    BadPeerCertificate(#[source] rustls::Error),
    /// The peer aborted the handshake with this TLS alert: most often it refused our certificate.
    #[error("the peer refused the TLS handshake: {}", alert_text(alert))]
    PeerRefused {
        /// The alert received.
        alert: AlertDescription,
    },
    /// The handshake did not complete within its deadline (a peer that stalls).
    #[error("TLS handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer closed (or reset) the connection before the handshake completed.
    #[error(
        "the peer closed the connection during the TLS handshake (is it listening without TLS?)"
    )]
    ClosedDuringHandshake {
        /// The socket's error, for a reset.
        #[source]
        source: Option<io::Error>,
    },
    /// The destination's first bytes after the handshake are not [`ACCEPTED`].
    #[error("the peer did not confirm the TLS session (not a clearlog destination?)")]
    NotConfirmed,
    /// Another TLS protocol failure.
    #[error("TLS handshake failed")]
    Handshake(#[source] rustls::Error),
    /// The socket failed.
    #[error("TLS socket I/O while {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn holds(found: &[String]) -> String {
    if found.is_empty() {
        " (it holds no PEM block)".into()
    } else {
        format!(" (it holds: {})", found.join(", "))
    }
}

fn key_hint(found: &[String]) -> String {
    let mut s = holds(found);
    if found.iter().any(|l| l.contains("ENCRYPTED")) {
        s.push_str(
            "; the key is encrypted: decrypt it with `openssl pkey -in key.pem -out key.pem`",
        );
    }
    s
}

fn names(presented: &[String]) -> String {
    if presented.is_empty() {
        "no name (it has no subject alternative name)".into()
    } else {
        presented.join(", ")
    }
}

fn when(what: &str, t: &Option<SystemTime>, now: &Option<SystemTime>) -> String {
    match (t, now) {
        (Some(t), Some(now)) => format!(" ({what} {}, now {})", utc(*t), utc(*now)),
        (Some(t), None) => format!(" ({what} {})", utc(*t)),
        _ => String::new(),
    }
}

fn not_tls(first: &[u8]) -> String {
    if first.starts_with(b"CLEARLOG") {
        "the peer is not speaking TLS: it sent a plaintext clearlog stream (is TLS off on its side?)"
            .into()
    } else {
        format!("the peer is not speaking TLS (it sent {first:02x?})")
    }
}

fn alert_text(alert: &AlertDescription) -> String {
    let why = match alert {
        AlertDescription::UnknownCA => "it does not trust the CA that signed our certificate",
        AlertDescription::CertificateExpired => "our certificate is expired or not valid yet",
        AlertDescription::BadCertificate => {
            "our certificate is not valid for the name it expected, or malformed"
        }
        AlertDescription::AccessDenied => "our certificate is not in its authorization list",
        AlertDescription::CertificateRequired => "it requires a certificate",
        AlertDescription::CertificateUnknown | AlertDescription::UnsupportedCertificate => {
            "it does not accept our certificate"
        }
        AlertDescription::HandshakeFailure
        | AlertDescription::ProtocolVersion
        | AlertDescription::InsufficientSecurity => {
            "no TLS version or cipher in common (we speak TLS 1.3 only)"
        }
        AlertDescription::DecryptError => "a signature did not verify",
        _ => "",
    };
    if why.is_empty() {
        format!("alert {alert:?}")
    } else {
        format!("{why} (alert {alert:?})")
    }
}

/// `t` as `YYYY-MM-DD hh:mm:ss UTC`.
pub(super) fn utc(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs(),
        Err(_) => return "before 1970".into(),
    };
    // Civil from days (H. Hinnant's algorithm), proleptic Gregorian calendar.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}
