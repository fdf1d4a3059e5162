// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Mutual TLS for migration connections: TLS 1.3 only (rustls with the `ring` provider), both sides
//! present a certificate signed by one CA, and a destination can restrict which sources it accepts.
//!
//! A side is configured from a directory of three PEM files ([`TlsFiles::in_dir`]):
//!
//! | file       | what                                                                      |
//! |------------|---------------------------------------------------------------------------|
//! | `ca.pem`   | the CA that signs both sides' certificates (the only one trusted)         |
//! | `cert.pem` | this side's certificate, then any intermediate CA certificates            |
//! | `key.pem`  | its private key (PKCS#8, PKCS#1 or SEC1; not encrypted)                   |
//!
//! The source (TLS client, [`TlsClient`]) checks that the destination's certificate chains to
//! `ca.pem` and is valid for the name the caller gives: `--tls-hostname NAME`, by default the
//! host of the migration URI (a DNS name or an IP address, matched against the certificate's
//! subject alternative names). The destination (TLS server, [`TlsServer`]) requires a client
//! certificate that chains to `ca.pem`; with an authorization list (`--tls-authz NAME[,NAME...]`,
//! like QEMU's `tls-authz`) it accepts only a certificate valid for one of those names.
//!
//! [`tls_client`] and [`tls_server`] run the handshake on a connected [`TcpStream`] within a
//! deadline and return a [`Transport`]. Every refusal is an error on both sides: the side that
//! refuses says why ([`TlsError::UntrustedCertificate`], [`TlsError::NameMismatch`],
//! [`TlsError::NotAuthorized`], [`TlsError::CertificateExpired`]...), the other side gets the
//! TLS alert it was sent ([`TlsError::PeerRefused`]). A peer that is not speaking TLS, such as a
//! source started without TLS, is [`TlsError::NotTls`]; one that stalls is
//! [`TlsError::HandshakeTimeout`].
//!
//! # The connection
//!
//! After the TLS handshake, the destination sends [`ACCEPTED`] (8 bytes of application data) and
//! the source's [`tls_client`] returns only once it has read them. TLS 1.3 lets a client finish
//! its handshake before the server has looked at the client's certificate; without this, a source
//! that the destination refuses would only learn it at its first read, after it had started to
//! send. Session resumption is off: every connection presents and checks full certificates.
//!
//! The key exchange is X25519 or ECDHE (P-256/P-384): the `ring` provider has no post-quantum
//! key exchange, so a recorded migration stream is not protected against a future quantum
//! computer.
//!
//! The [`Transport`]'s reader and writer can be used from two threads at once. They share the
//! rustls connection state behind a mutex, and each has its own handle on the socket: the reader
//! reads ciphertext without the lock, then takes it to decrypt; the writer takes it to encrypt,
//! and writes the ciphertext after releasing it. No thread waits on the socket while holding the
//! lock, so two peers that both write much more than the socket buffers hold, each reading on
//! another thread, cannot deadlock. Only the writer ever sends, so records leave in the order they
//! were sealed. A write is sent before it returns (flush has nothing left to push); once a write
//! failed, the writer discards what it had not sent and refuses every later write, so nothing it
//! was given can reach the peer afterwards (see [`Transport`] about the confirmation). Dropping a
//! writer that never failed sends `close_notify`: the peer's reader then sees a clean end of
//! stream (`Ok(0)`); a connection cut without it is an [`std::io::ErrorKind::UnexpectedEof`].
//! [`TransportRead::set_read_timeout`] on the reader sets the socket's receive timeout (each wait
//! for ciphertext, as for a plain socket).
//!
//! # Example
//!
//! A loopback handshake with certificates made by `rcgen` (the files are written as an operator
//! would make them; see the next section for `openssl`):
//!
//! ```
//! use std::io::{Read, Write};
//! use std::time::Duration;
//! use clearlog_migration::tls::{tls_client, tls_server, TlsClient, TlsFiles, TlsServer};
//! use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
//!
//! let dir = std::env::temp_dir().join(format!("clearlog-tls-doc-{}", std::process::id()));
//! // A CA, then a certificate for each side, each in a directory of its own.
//! let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
//! ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
//! let ca_key = KeyPair::generate().unwrap();
//! let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
//! let issuer = Issuer::new(ca, ca_key);
//! for (side, name) in [("dst", "localhost"), ("src", "source-a.example")] {
//!     let key = KeyPair::generate().unwrap();
//!     let cert = CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
//!     std::fs::create_dir_all(dir.join(side)).unwrap();
//!     std::fs::write(dir.join(side).join("ca.pem"), &ca_pem).unwrap();
//!     std::fs::write(dir.join(side).join("cert.pem"), cert.pem()).unwrap();
//!     std::fs::write(dir.join(side).join("key.pem"), key.serialize_pem()).unwrap();
//! }
//!
//! let server = TlsServer::new(&TlsFiles::in_dir(dir.join("dst")))
//!     .unwrap()
//!     .with_authz(["source-a.example"])
//!     .unwrap();
//! let client = TlsClient::new(&TlsFiles::in_dir(dir.join("src")), "localhost").unwrap();
//!
//! let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let addr = listener.local_addr().unwrap();
//! let dst = std::thread::spawn(move || {
//!     let (sock, _) = listener.accept().unwrap();
//!     let (mut t, peer) = tls_server(sock, &server, Duration::from_secs(10)).unwrap();
//!     assert_eq!(peer.authorized_as.as_deref(), Some("source-a.example"));
//!     let mut hello = [0; 5];
//!     t.reader.as_mut().unwrap().read_exact(&mut hello).unwrap();
//!     hello
//! });
//! let sock = std::net::TcpStream::connect(addr).unwrap();
//! let mut t = tls_client(sock, &client, Duration::from_secs(10)).unwrap();
//! t.writer.as_mut().unwrap().write_all(b"hello").unwrap();
//! assert_eq!(&dst.join().unwrap(), b"hello");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```
//!
//! # Making the certificates
//!
//! With `openssl` (1.1.1 or later). These commands were run as written, by hand, with OpenSSL
//! 3.0.19 under `sh`: `TlsServer`/`TlsClient` loaded the files and a loopback handshake passed
//! with the server names `dst.example` and `192.0.2.10` and the authorization list
//! `source-a.example`. The files under `migration/tests/data/tls/` were made by the same commands
//! with test names and a 100-year validity (its README lists them); the test
//! `openssl_made_files_work` loads them. Keep `ca-key.pem` off the migration hosts: each host
//! needs only its own directory.
//!
//! ```sh
//! # The CA (10 years).
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
//!     -subj "/CN=clearlog migration CA" -keyout ca-key.pem -out ca.pem \
//!     -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
//!
//! # The destination (TLS server): its DNS name and IP address, as sources will name it.
//! mkdir -p dst && cp ca.pem dst/
//! openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
//!     -subj "/CN=dst.example" -keyout dst/key.pem -out dst.csr
//! printf '%s\n' "subjectAltName=DNS:dst.example,IP:192.0.2.10" "extendedKeyUsage=serverAuth" \
//!     "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" > dst.ext
//! openssl x509 -req -in dst.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
//!     -extfile dst.ext -out dst/cert.pem
//!
//! # A source (TLS client): the name the destination's --tls-authz lists.
//! mkdir -p src && cp ca.pem src/
//! openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
//!     -subj "/CN=source-a.example" -keyout src/key.pem -out src.csr
//! printf '%s\n' "subjectAltName=DNS:source-a.example" "extendedKeyUsage=clientAuth" \
//!     "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" > src.ext
//! openssl x509 -req -in src.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
//!     -extfile src.ext -out src/cert.pem
//!
//! # Check: both print "OK".
//! openssl verify -CAfile ca.pem dst/cert.pem src/cert.pem
//! ```
//!
//! Names are checked against the subject alternative names only, never the subject's CN. RSA keys
//! (`-newkey rsa:3072`) work too. A host that is both source and destination can use one
//! certificate for both (`extendedKeyUsage=serverAuth,clientAuth` and its names).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig,
    ServerConnection,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{Transport, TransportRead};

mod error;

/// What the destination sends, as the first application data, once it has accepted the source's
/// certificate; [`tls_client`] waits for it (see [the module docs](self)).
pub const ACCEPTED: [u8; 8] = *b"CLRLTLS1";

/// The most plaintext sealed per lock hold and per `write` call (4 TLS records).
const WRITE_CHUNK: usize = 64 << 10;
/// Ciphertext read from the socket per `read` call of the reader.
const READ_CHUNK: usize = 64 << 10;
/// How long a side that refused the handshake waits for the peer to close after its alert.
const LINGER: Duration = Duration::from_millis(500);
/// How long dropping a writer may wait to send `close_notify`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

pub use error::TlsError;

fn system_time(t: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

// ---- files ----

/// The three PEM files of one side (see [the module docs](self)).
///
/// # Examples
///
/// ```
/// use clearlog_migration::tls::TlsFiles;
///
/// let f = TlsFiles::in_dir("/etc/clearlog/tls");
/// assert_eq!(f.ca, std::path::Path::new("/etc/clearlog/tls/ca.pem"));
/// assert_eq!(f.key, std::path::Path::new("/etc/clearlog/tls/key.pem"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) trusted to sign the peer's certificate.
    pub ca: PathBuf,
    /// This side's certificate chain, its own certificate first.
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// `ca.pem`, `cert.pem` and `key.pem` in `dir`.
    ///
    /// # Examples
    ///
    /// See [`TlsFiles`].
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    fn load(&self, provider: &Arc<CryptoProvider>) -> Result<Loaded, TlsError> {
        let ca = read_certs(&self.ca)?;
        let mut roots = RootCertStore::empty();
        for c in &ca {
            roots
                .add(c.clone())
                .map_err(|source| TlsError::BadCertificate {
                    path: self.ca.clone(),
                    source,
                })?;
        }
        let chain = read_certs(&self.cert)?;
        let key = read_key(&self.key)?;
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|source| TlsError::BadPrivateKey {
                path: self.key.clone(),
                source,
            })?;
        let certified =
            CertifiedKey::from_der(chain.clone(), key, provider).map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    TlsError::KeyMismatch {
                        key: self.key.clone(),
                        cert: self.cert.clone(),
                    }
                }
                source => TlsError::BadCertificate {
                    path: self.cert.clone(),
                    source,
                },
            })?;
        Ok(Loaded {
            roots: Arc::new(roots),
            ca,
            chain,
            certified: Arc::new(SingleCertAndKey::from(certified)),
        })
    }
}

struct Loaded {
    roots: Arc<RootCertStore>,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    certified: Arc<SingleCertAndKey>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TlsError::FileMissing { path: path.into() }
        } else {
            TlsError::FileUnreadable {
                path: path.into(),
                source,
            }
        }
    })
}

/// The labels of the PEM blocks of `bytes` (`-----BEGIN LABEL-----`), to say what a file holds.
fn pem_labels(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("-----BEGIN ")?
                .strip_suffix("-----")
                .map(str::to_string)
        })
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.into(),
            found: pem_labels(&bytes),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Ok(k),
        Err(pem::Error::NoItemsFound) => Err(TlsError::NoPrivateKey {
            path: path.into(),
            found: pem_labels(&bytes),
        }),
        Err(source) => Err(TlsError::BadPem {
            path: path.into(),
            source,
        }),
    }
}

/// The `ring` provider (no C toolchain beyond `cc`, as cloud-hypervisor uses). rustls 0.23.48
/// deprecated its constructor because `ring` has no post-quantum key exchange (X25519MLKEM768):
/// the key exchange is classical X25519/ECDHE, so a recorded migration stream is not protected
/// against a future quantum computer. Moving to `aws-lc-rs` would add it.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A DNS name or an IP address (an IPv6 address may keep the brackets of a URI: `[::1]`).
fn parse_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let trimmed = name.trim();
    let bare = trimmed
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(trimmed);
    ServerName::try_from(bare)
        .map(|n| n.to_owned())
        .map_err(|_| TlsError::InvalidName(name.into()))
}

/// Log a warning when this side's own certificate would be refused by a peer that trusts the same
/// CA (not signed by it, expired): the peer will refuse it, and this says so before it does.
fn check_own_certificate(files: &TlsFiles, loaded: &Loaded, usage: webpki::KeyUsage) {
    let Some((ee, intermediates)) = loaded.chain.split_first() else {
        return;
    };
    let anchors: Vec<_> = loaded
        .ca
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let Ok(cert) = webpki::EndEntityCert::try_from(ee) else {
        return;
    };
    let algs = provider().signature_verification_algorithms.all;
    if let Err(e) = cert.verify_for_usage(
        algs,
        &anchors,
        intermediates,
        UnixTime::now(),
        usage,
        None,
        None,
    ) {
        tracing::warn!(
            cert = %files.cert.display(),
            ca = %files.ca.display(),
            error = ?e,
            "this side's own TLS certificate does not verify against its CA file: a peer that trusts the same CA will refuse it"
        );
    }
}

// ---- configurations ----

/// The source's (TLS client's) configuration: trusts only `ca.pem`, presents `cert.pem`, and
/// checks that the destination's certificate is valid for `server_name`.
///
/// # Examples
///
/// ```
/// use clearlog_migration::tls::{TlsClient, TlsError, TlsFiles};
///
/// let err = TlsClient::new(&TlsFiles::in_dir("/nonexistent"), "dst.example").unwrap_err();
/// assert!(matches!(err, TlsError::FileMissing { .. }));
/// assert_eq!(err.to_string(), "TLS file /nonexistent/ca.pem does not exist");
/// ```
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// Load `files` and check the destination's certificate against `server_name` (a DNS name or
    /// an IP address: `--tls-hostname`, or the host of the migration URI).
    ///
    /// # Errors
    ///
    /// The file variants of [`TlsError`] (naming the file), [`TlsError::InvalidName`].
    ///
    /// # Examples
    ///
    /// See [`TlsClient`] and [the module docs](self).
    pub fn new(files: &TlsFiles, server_name: &str) -> Result<Self, TlsError> {
        let server_name = parse_name(server_name)?;
        let provider = provider();
        let loaded = files.load(&provider)?;
        check_own_certificate(files, &loaded, webpki::KeyUsage::client_auth());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_root_certificates(loaded.roots)
            .with_client_cert_resolver(loaded.certified);
        config.resumption = Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name the destination's certificate must be valid for.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use clearlog_migration::tls::{TlsClient, TlsFiles};
    /// let c = TlsClient::new(&TlsFiles::in_dir("/etc/clearlog/tls"), "192.0.2.10").unwrap();
    /// assert_eq!(c.server_name(), "192.0.2.10");
    /// ```
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }
}

/// The destination's (TLS server's) configuration: presents `cert.pem`, requires a client
/// certificate that chains to `ca.pem` and, with an authorization list, is valid for one of its
/// names.
///
/// # Examples
///
/// ```
/// use clearlog_migration::tls::{TlsError, TlsFiles, TlsServer};
///
/// let dir = std::env::temp_dir().join(format!("clearlog-tls-doc-server-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join("ca.pem"), "not PEM at all\n").unwrap();
/// let err = TlsServer::new(&TlsFiles::in_dir(&dir)).unwrap_err();
/// assert!(matches!(err, TlsError::NoCertificate { .. }));
/// assert!(err.to_string().ends_with("ca.pem (it holds no PEM block)"));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct TlsServer {
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<SingleCertAndKey>,
    /// Without an authorization list: one configuration for every connection.
    config: Arc<ServerConfig>,
    authz: Option<Arc<Vec<(String, ServerName<'static>)>>>,
}

impl TlsServer {
    /// Load `files`: any client certificate that chains to `ca.pem` is accepted (see
    /// [`with_authz`](Self::with_authz) to restrict it).
    ///
    /// # Errors
    ///
    /// The file variants of [`TlsError`], naming the file.
    ///
    /// # Examples
    ///
    /// See [`TlsServer`] and [the module docs](self).
    pub fn new(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = provider();
        let loaded = files.load(&provider)?;
        check_own_certificate(files, &loaded, webpki::KeyUsage::server_auth());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(loaded.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        let config = server_config(&provider, verifier.clone(), loaded.certified.clone())?;
        Ok(TlsServer {
            provider,
            verifier,
            certified: loaded.certified,
            config,
            authz: None,
        })
    }

    /// Accept only clients whose certificate is valid for one of `names` (DNS names, or IP
    /// addresses, matched against its subject alternative names as a server name would be, so
    /// a wildcard certificate `*.migration.example` is valid for `source-a.migration.example`). The CLI's
    /// `--tls-authz a,b` passes `["a", "b"]`.
    ///
    /// # Errors
    ///
    /// [`TlsError::InvalidName`] for a name that is neither; [`TlsError::EmptyAuthz`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use clearlog_migration::tls::{TlsFiles, TlsServer};
    ///
    /// let arg = "source-a.example,source-c.example";
    /// let server = TlsServer::new(&TlsFiles::in_dir("/etc/clearlog/tls"))
    ///     .unwrap()
    ///     .with_authz(arg.split(','))
    ///     .unwrap();
    /// ```
    pub fn with_authz<I, S>(mut self, names: I) -> Result<Self, TlsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = names
            .into_iter()
            .map(|n| {
                let n = n.as_ref().trim();
                Ok((n.to_string(), parse_name(n)?))
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        if list.is_empty() {
            return Err(TlsError::EmptyAuthz);
        }
        self.authz = Some(Arc::new(list));
        Ok(self)
    }

    /// The authorization list, if any.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use clearlog_migration::tls::{TlsFiles, TlsServer};
    /// let s = TlsServer::new(&TlsFiles::in_dir("/etc/clearlog/tls")).unwrap();
    /// assert!(s.authz().is_none());
    /// ```
    pub fn authz(&self) -> Option<Vec<String>> {
        self.authz
            .as_ref()
            .map(|l| l.iter().map(|(s, _)| s.clone()).collect())
    }

    /// The configuration for one connection: with an authorization list, its own verifier, which
    /// keeps what it refused for the error.
    fn for_connection(&self) -> Result<(Arc<ServerConfig>, Option<Arc<AuthzVerifier>>), TlsError> {
        let Some(allowed) = &self.authz else {
            return Ok((self.config.clone(), None));
        };
        let authz = Arc::new(AuthzVerifier {
            inner: self.verifier.clone(),
            allowed: allowed.clone(),
            refused: Mutex::new(None),
        });
        let config = server_config(&self.provider, authz.clone(), self.certified.clone())?;
        Ok((config, Some(authz)))
    }
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<SingleCertAndKey>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certified);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The CA check of rustls's `WebPkiClientVerifier`, then the authorization list: the client's
/// certificate must be valid for one of its names (rustls-webpki's subject-name check).
#[derive(Debug)]
struct AuthzVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Arc<Vec<(String, ServerName<'static>)>>,
    /// The names of the certificate it refused (one connection uses this verifier).
    refused: Mutex<Option<Vec<String>>>,
}

/// rustls-webpki lists a certificate's names as `DnsName("a.example")`, `IpAddress(192.0.2.1)`:
/// show them as `a.example`, `192.0.2.1` (other kinds as they are).
fn plain_names(presented: &[String]) -> Vec<String> {
    presented
        .iter()
        .map(|n| {
            n.strip_prefix("DnsName(\"")
                .and_then(|r| r.strip_suffix("\")"))
                .or_else(|| n.strip_prefix("IpAddress(")?.strip_suffix(')'))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

/// The first of `allowed` that `cert` is valid for, or the names `cert` holds.
fn authorized_name<'a>(
    cert: &CertificateDer<'_>,
    allowed: &'a [(String, ServerName<'static>)],
) -> Result<&'a str, Vec<String>> {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return Err(Vec::new());
    };
    let mut presented = Vec::new();
    for (text, name) in allowed {
        match ee.verify_is_valid_for_subject_name(name) {
            Ok(()) => return Ok(text),
            Err(webpki::Error::CertNotValidForName(ctx)) => presented = plain_names(&ctx.presented),
            Err(_) => {}
        }
    }
    Err(presented)
}

impl ClientCertVerifier for AuthzVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match authorized_name(end_entity, &self.allowed) {
            Ok(_) => Ok(verified),
            Err(presented) => {
                if let Ok(mut r) = self.refused.lock() {
                    *r = Some(presented);
                }
                // Sends `access_denied`: the source is told it is not authorized.
                Err(CertificateError::ApplicationVerificationFailure.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who the source is, as its certificate says (returned by [`tls_server`]).
///
/// # Examples
///
/// ```
/// let p = clearlog_migration::tls::PeerIdentity::default();
/// assert!(p.dns_names.is_empty() && p.authorized_as.is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The DNS names of its certificate (subject alternative names; wildcards as written).
    pub dns_names: Vec<String>,
    /// The name of the authorization list it was accepted for (`None` without a list).
    pub authorized_as: Option<String>,
}

// ---- handshakes ----

/// Does `bytes` (the first bytes of a connection) start like a TLS handshake record
/// (`0x16 0x03`)? A plaintext destination can use it to tell a TLS source from a stray peer.
///
/// # Examples
///
/// ```
/// use clearlog_migration::tls::looks_like_tls;
///
/// assert!(looks_like_tls(&[0x16, 0x03, 0x01, 0x02, 0x00]));
/// assert!(!looks_like_tls(b"CLEARLOG"));
/// ```
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x16 && bytes[1] == 0x03
}

/// Source side: run the TLS handshake as a client on a connected socket, then wait for the
/// destination's [`ACCEPTED`], all within `timeout`. Sets `TCP_NODELAY`; the socket's read and
/// write timeouts are restored afterwards (so a send timeout set before, as
/// [`Transport::tcp_with_timeout`] does, stays).
///
/// # Errors
///
/// [`TlsError::UntrustedCertificate`], [`TlsError::NameMismatch`],
/// [`TlsError::CertificateExpired`]... when we refuse the destination;
/// [`TlsError::PeerRefused`] when it refuses us; [`TlsError::NotTls`],
/// [`TlsError::HandshakeTimeout`], [`TlsError::ClosedDuringHandshake`], [`TlsError::Io`].
///
/// # Examples
///
/// See [the module docs](self).
pub fn tls_client(
    sock: TcpStream,
    cfg: &TlsClient,
    timeout: Duration,
) -> Result<Transport, TlsError> {
    let conn = ClientConnection::new(cfg.config.clone(), cfg.server_name.clone())
        .map_err(TlsError::Config)?;
    let mut hs = Handshake::start(sock, Connection::Client(conn), timeout)?;
    let result = hs.client();
    hs.finish::<()>(result.map(|()| None)).map(|(t, _)| t)
}

/// Destination side: run the TLS handshake as a server on an accepted socket, check the client's
/// certificate (CA, validity, authorization list) and send [`ACCEPTED`], all within `timeout`.
/// Sets `TCP_NODELAY`; the socket's read and write timeouts are restored afterwards.
///
/// # Errors
///
/// [`TlsError::NotTls`] for a plaintext peer; [`TlsError::UntrustedCertificate`],
/// [`TlsError::NotAuthorized`], [`TlsError::CertificateExpired`], [`TlsError::NoPeerCertificate`]...
/// when we refuse the source; [`TlsError::PeerRefused`] when it refuses us;
/// [`TlsError::HandshakeTimeout`], [`TlsError::ClosedDuringHandshake`], [`TlsError::Io`].
///
/// # Examples
///
/// See [the module docs](self).
pub fn tls_server(
    sock: TcpStream,
    cfg: &TlsServer,
    timeout: Duration,
) -> Result<(Transport, PeerIdentity), TlsError> {
    let (config, authz) = cfg.for_connection()?;
    let conn = ServerConnection::new(config).map_err(TlsError::Config)?;
    let mut hs = Handshake::start(sock, Connection::Server(conn), timeout)?;
    let result = hs.server(authz.as_deref(), cfg.authz.as_deref().map(|v| &v[..]));
    let (transport, peer) = hs.finish(result.map(Some))?;
    Ok((transport, peer.unwrap_or_default()))
}

/// A handshake in progress on a blocking socket, with its deadline.
struct Handshake {
    sock: TcpStream,
    conn: Connection,
    deadline: Instant,
    timeout: Duration,
    saved: (Option<Duration>, Option<Duration>),
    sniffed: bool,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Handshake {
    fn start(sock: TcpStream, conn: Connection, timeout: Duration) -> Result<Self, TlsError> {
        let io = |context| move |source| TlsError::Io { context, source };
        sock.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
        // The deadline is kept with socket timeouts, which need a blocking socket.
        sock.set_nonblocking(false)
            .map_err(io("making the socket blocking"))?;
        let saved = (
            sock.read_timeout()
                .map_err(io("reading the socket timeouts"))?,
            sock.write_timeout()
                .map_err(io("reading the socket timeouts"))?,
        );
        Ok(Handshake {
            sock,
            conn,
            // A timeout too large for an Instant: a day is as good as forever here.
            deadline: Instant::now()
                .checked_add(timeout)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
            timeout,
            saved,
            sniffed: false,
        })
    }

    /// Time left, or the timeout error.
    fn remaining(&self) -> Result<Duration, TlsError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(TlsError::HandshakeTimeout(self.timeout))
        } else {
            Ok(left)
        }
    }

    fn io_err(&self, context: &'static str, source: io::Error) -> TlsError {
        if is_timeout(&source) {
            TlsError::HandshakeTimeout(self.timeout)
        } else if matches!(
            source.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ) {
            TlsError::ClosedDuringHandshake {
                source: Some(source),
            }
        } else {
            TlsError::Io { context, source }
        }
    }

    /// Send what rustls has queued.
    fn send(&mut self) -> Result<(), TlsError> {
        while self.conn.wants_write() {
            let left = self.remaining()?;
            self.sock
                .set_write_timeout(Some(left))
                .map_err(|e| self.io_err("setting the send timeout", e))?;
            if let Err(e) = self.conn.write_tls(&mut self.sock) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(self.io_err("sending the TLS handshake", e));
                }
            }
        }
        Ok(())
    }

    /// Before the first byte from the peer is processed: is it TLS? A ClientHello starts with
    /// `0x16 0x03`; a server answers with a handshake (`0x16`) or an alert (`0x15`) record.
    fn sniff(&mut self) -> Result<(), TlsError> {
        let first: &[u8] = match self.conn {
            Connection::Client(_) => &[0x15, 0x16],
            Connection::Server(_) => &[0x16],
        };
        let mut buf = [0u8; 8];
        loop {
            let left = match self.remaining() {
                Ok(left) => left,
                Err(timeout) => {
                    // Decide with what came, if anything.
                    return match self.sock.peek(&mut buf) {
                        Ok(n) if n > 0 && !first.contains(&buf[0]) => Err(TlsError::NotTls {
                            first_bytes: buf[..n].to_vec(),
                        }),
                        _ => Err(timeout),
                    };
                }
            };
            self.sock
                .set_read_timeout(Some(left))
                .map_err(|e| self.io_err("setting the receive timeout", e))?;
            let n = match self.sock.peek(&mut buf) {
                Ok(0) => return Err(TlsError::ClosedDuringHandshake { source: None }),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err("waiting for the peer's first bytes", e)),
            };
            let got = &buf[..n];
            if first.contains(&got[0]) {
                if n >= 2 {
                    return if got[1] == 0x03 {
                        Ok(())
                    } else {
                        Err(TlsError::NotTls {
                            first_bytes: got.to_vec(),
                        })
                    };
                }
            } else if n == buf.len() || !b"CLEARLOG".starts_with(got) {
                return Err(TlsError::NotTls {
                    first_bytes: got.to_vec(),
                });
            }
            // Part of what decides came: wait a little for the rest.
            std::thread::sleep(Duration::from_millis(1).min(left));
        }
    }

    /// Send what is queued, read from the peer once, and process it.
    fn pump(&mut self) -> Result<(), TlsError> {
        self.send()?;
        if !self.sniffed {
            self.sniff()?;
            self.sniffed = true;
        }
        let left = self.remaining()?;
        self.sock
            .set_read_timeout(Some(left))
            .map_err(|e| self.io_err("setting the receive timeout", e))?;
        match self.conn.read_tls(&mut self.sock) {
            Ok(0) => {
                // An alert may have come just before the end: process it first.
                self.process()?;
                return Err(TlsError::ClosedDuringHandshake { source: None });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(self.io_err("receiving the TLS handshake", e)),
        }
        self.process()
    }

    fn process(&mut self) -> Result<(), TlsError> {
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert telling the peer why: send it, best effort.
            let _ = self.send();
            self.linger();
            return Err(map_rustls(e));
        }
        Ok(())
    }

    /// After a failed handshake: close our direction and read what the peer still sends until it
    /// closes (briefly). Closing a socket with unread bytes makes the kernel reset the
    /// connection, and the peer could then get the reset instead of our alert.
    fn linger(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let until = Instant::now() + LINGER.min(self.timeout);
        let mut buf = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.sock.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match self.sock.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn client(&mut self) -> Result<(), TlsError> {
        while self.conn.is_handshaking() {
            self.pump()?;
        }
        self.send()?;
        // The destination's verdict on our certificate: ACCEPTED, or an alert.
        let mut got = [0u8; ACCEPTED.len()];
        let mut n = 0;
        while n < got.len() {
            match self.conn.reader().read(&mut got[n..]) {
                Ok(0) => return Err(TlsError::ClosedDuringHandshake { source: None }),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.pump()?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(TlsError::ClosedDuringHandshake { source: None })
                }
                Err(e) => return Err(self.io_err("reading the TLS confirmation", e)),
            }
        }
        if got != ACCEPTED {
            return Err(TlsError::NotConfirmed);
        }
        Ok(())
    }

    fn server(
        &mut self,
        authz: Option<&AuthzVerifier>,
        allowed: Option<&[(String, ServerName<'static>)]>,
    ) -> Result<PeerIdentity, TlsError> {
        while self.conn.is_handshaking() {
            match self.pump() {
                Ok(()) => {}
                Err(TlsError::BadPeerCertificate(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))) if authz.is_some() => {
                    let presented = authz
                        .and_then(|a| a.refused.lock().ok()?.take())
                        .unwrap_or_default();
                    return Err(TlsError::NotAuthorized {
                        presented,
                        allowed: allowed
                            .unwrap_or_default()
                            .iter()
                            .map(|(s, _)| s.clone())
                            .collect(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let ee = self
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(TlsError::NoPeerCertificate)?;
        let dns_names = webpki::EndEntityCert::try_from(ee)
            .map(|c| c.valid_dns_names().map(str::to_string).collect())
            .unwrap_or_default();
        let authorized_as = match allowed {
            Some(list) => Some(
                authorized_name(ee, list)
                    .map_err(|presented| TlsError::NotAuthorized {
                        presented,
                        allowed: list.iter().map(|(s, _)| s.clone()).collect(),
                    })?
                    .to_string(),
            ),
            None => None,
        };
        self.conn
            .writer()
            .write_all(&ACCEPTED)
            .map_err(|e| self.io_err("queueing the TLS confirmation", e))?;
        self.send()?;
        Ok(PeerIdentity {
            dns_names,
            authorized_as,
        })
    }

    /// Restore the socket's timeouts and split the connection, or return the handshake's error.
    fn finish<T>(
        self,
        result: Result<Option<T>, TlsError>,
    ) -> Result<(Transport, Option<T>), TlsError> {
        let extra = result?;
        let io = |context| move |source| TlsError::Io { context, source };
        let Handshake {
            sock,
            mut conn,
            saved,
            ..
        } = self;
        sock.set_read_timeout(saved.0)
            .map_err(io("restoring the socket timeouts"))?;
        sock.set_write_timeout(saved.1)
            .map_err(io("restoring the socket timeouts"))?;
        // We bound what is buffered ourselves (one WRITE_CHUNK at a time).
        conn.set_buffer_limit(None);
        let read_sock = sock.try_clone().map_err(io("cloning the TCP socket"))?;
        let conn = Arc::new(Mutex::new(conn));
        let reader = TlsReader {
            conn: conn.clone(),
            sock: read_sock,
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
        };
        let writer = TlsWriter {
            conn,
            sock,
            out: Vec::with_capacity(WRITE_CHUNK + 1024),
            failed: false,
        };
        Ok((
            Transport::new(Some(Box::new(reader)), Some(Box::new(writer))),
            extra,
        ))
    }
}

/// A rustls handshake error as ours.
fn map_rustls(e: rustls::Error) -> TlsError {
    use CertificateError as C;
    match e {
        rustls::Error::AlertReceived(alert) => TlsError::PeerRefused { alert },
        rustls::Error::NoCertificatesPresented => TlsError::NoPeerCertificate,
        rustls::Error::InvalidCertificate(ref c) => match c {
            C::UnknownIssuer | C::BadSignature => TlsError::UntrustedCertificate,
            C::Expired => TlsError::CertificateExpired {
                not_after: None,
                now: None,
            },
            C::ExpiredContext { time, not_after } => TlsError::CertificateExpired {
                not_after: Some(system_time(*not_after)),
                now: Some(system_time(*time)),
            },
            C::NotValidYet => TlsError::CertificateNotYetValid {
                not_before: None,
                now: None,
            },
            C::NotValidYetContext { time, not_before } => TlsError::CertificateNotYetValid {
                not_before: Some(system_time(*not_before)),
                now: Some(system_time(*time)),
            },
            C::NotValidForNameContext {
                expected,
                presented,
            } => TlsError::NameMismatch {
                expected: expected.to_str().into_owned(),
                presented: plain_names(presented),
            },
            _ => TlsError::BadPeerCertificate(e),
        },
        other => TlsError::Handshake(other),
    }
}

// ---- the halves ----

fn lock(conn: &Mutex<Connection>) -> io::Result<MutexGuard<'_, Connection>> {
    conn.lock()
        .map_err(|_| io::Error::other("TLS connection state poisoned by a panic"))
}

/// The read half: ciphertext from its socket handle, decrypted under the lock.
struct TlsReader {
    conn: Arc<Mutex<Connection>>,
    sock: TcpStream,
    /// Ciphertext read from the socket, `start..end` not yet handed to rustls.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl fmt::Debug for TlsReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReader")
            .field("pending", &(self.end - self.start))
            .finish()
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut conn = lock(&self.conn)?;
                loop {
                    match conn.reader().read(out) {
                        // Ok(0): the peer sent close_notify.
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // UnexpectedEof: the connection ended without close_notify.
                        Err(e) => return Err(e),
                    }
                    if self.start == self.end {
                        break;
                    }
                    let n = conn.read_tls(&mut &self.buf[self.start..self.end])?;
                    if n == 0 {
                        return Err(io::Error::other("TLS receive buffer full"));
                    }
                    self.start += n;
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
            }
            // Nothing to decrypt: wait for ciphertext without holding the lock.
            let n = self.sock.read(&mut self.buf)?;
            (self.start, self.end) = (0, n);
            if n == 0 {
                // End of the TCP stream: rustls tells a clean close from a cut one.
                let mut conn = lock(&self.conn)?;
                conn.read_tls(&mut io::empty())?;
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                return match conn.reader().read(out) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    r => r,
                };
            }
        }
    }
}

impl TransportRead for TlsReader {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }
}

/// The write half: seals under the lock, sends after releasing it; the only sender.
struct TlsWriter {
    conn: Arc<Mutex<Connection>>,
    sock: TcpStream,
    /// Sealed records of the current write.
    out: Vec<u8>,
    /// A write failed: what was not sent is gone, and nothing more is sent.
    failed: bool,
}

impl fmt::Debug for TlsWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsWriter")
            .field("failed", &self.failed)
            .finish()
    }
}

impl TlsWriter {
    fn refuse() -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "an earlier write on this TLS connection failed",
        )
    }

    /// Seal `data` (or only flush what rustls queued) and send it; on any error, drop what was not
    /// sent and fail from now on.
    fn seal_and_send(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(Self::refuse());
        }
        self.out.clear();
        let sealed = (|| {
            let mut conn = lock(&self.conn)?;
            let n = conn.writer().write(data)?;
            while conn.wants_write() {
                conn.write_tls(&mut self.out)?;
            }
            Ok(n)
        })();
        let result = sealed.and_then(|n| self.sock.write_all(&self.out).map(|()| n));
        if result.is_err() {
            self.failed = true;
            self.out = Vec::new();
        }
        result
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let chunk = &buf[..buf.len().min(WRITE_CHUNK)];
        match self.seal_and_send(chunk)? {
            0 => {
                self.failed = true;
                Err(io::ErrorKind::WriteZero.into())
            }
            n => Ok(n),
        }
    }

    /// Every write is sent before it returns: this only sends what rustls itself may have queued.
    fn flush(&mut self) -> io::Result<()> {
        self.seal_and_send(&[]).map(|_| ())
    }
}

impl Drop for TlsWriter {
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        self.out.clear();
        {
            let Ok(mut conn) = self.conn.lock() else {
                return;
            };
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(&mut self.out).is_err() {
                    return;
                }
            }
        }
        let shorter = match self.sock.write_timeout() {
            Ok(Some(t)) => t.min(CLOSE_TIMEOUT),
            _ => CLOSE_TIMEOUT,
        };
        let _ = self.sock.set_write_timeout(Some(shorter));
        let _ = self.sock.write_all(&self.out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_dates() {
        let at = |s| error::utc(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(978_307_199), "2000-12-31 23:59:59 UTC");
        assert_eq!(at(4_102_444_800), "2100-01-01 00:00:00 UTC");
    }

    #[test]
    fn looks_like_tls_needs_the_record_header() {
        assert!(looks_like_tls(&[0x16, 0x03]));
        assert!(!looks_like_tls(&[0x16]));
        assert!(!looks_like_tls(&[0x15, 0x03]));
        assert!(!looks_like_tls(b"GET / HTTP/1.1"));
    }

    #[test]
    fn messages_name_the_problem() {
        let e = TlsError::NotTls {
            first_bytes: b"CLEARLOG".to_vec(),
        };
        assert!(e.to_string().contains("plaintext clearlog stream"));
        let e = TlsError::NotTls {
            first_bytes: b"GET ".to_vec(),
        };
        assert_eq!(
            e.to_string(),
            "the peer is not speaking TLS (it sent [47, 45, 54, 20])"
        );
        let e = TlsError::PeerRefused {
            alert: rustls::AlertDescription::AccessDenied,
        };
        assert_eq!(
            e.to_string(),
            "the peer refused the TLS handshake: our certificate is not in its authorization \
             list (alert AccessDenied)"
        );
        let e = TlsError::NoPrivateKey {
            path: "k.pem".into(),
            found: vec!["ENCRYPTED PRIVATE KEY".into()],
        };
        assert!(e.to_string().starts_with(
            "no private key in k.pem (it holds: ENCRYPTED PRIVATE KEY); the key is encrypted"
        ));
        let e = TlsError::CertificateExpired {
            not_after: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(978_307_200)),
            now: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800)),
        };
        assert_eq!(
            e.to_string(),
            "the peer's certificate has expired (expired on 2001-01-01 00:00:00 UTC, now \
             2100-01-01 00:00:00 UTC)"
        );
    }

    #[test]
    fn names_are_dns_names_or_ip_addresses() {
        parse_name("dst.example").unwrap();
        parse_name("192.0.2.10").unwrap();
        parse_name("::1").unwrap();
        assert_eq!(parse_name("[::1]").unwrap(), parse_name("::1").unwrap());
        assert!(matches!(
            parse_name("not a name"),
            Err(TlsError::InvalidName(_))
        ));
    }

    #[test]
    fn presented_names_are_shown_plainly() {
        let raw = [
            "DnsName(\"a.example\")".to_string(),
            "IpAddress(192.0.2.1)".into(),
            "UniformResourceIdentifier(\"spiffe://x\")".into(),
        ];
        assert_eq!(
            plain_names(&raw),
            [
                "a.example",
                "192.0.2.1",
                "UniformResourceIdentifier(\"spiffe://x\")"
            ]
        );
    }

    #[test]
    fn pem_labels_list_the_blocks() {
        let pem = "x\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
                   -----BEGIN EC PRIVATE KEY-----\n";
        assert_eq!(
            pem_labels(pem.as_bytes()),
            ["CERTIFICATE", "EC PRIVATE KEY"]
        );
    }
}
