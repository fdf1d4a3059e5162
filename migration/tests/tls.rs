// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The TLS layer over real loopback TCP, with certificates made by rcgen at test time: a good
//! handshake carries data both ways at once; every refusal is the expected error on the side that
//! refuses and a clear one on the other; stalled and plaintext peers; files made by `openssl`.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clearlog_migration::tls::{
    tls_client, tls_server, PeerIdentity, TlsClient, TlsError, TlsFiles, TlsServer,
};
use clearlog_migration::Transport;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::AlertDescription;

const TIMEOUT: Duration = Duration::from_secs(10);

// ---- certificates ----

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "clearlog-tls-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = p.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(p, key),
            pem,
        }
    }

    /// A certificate for `names`, valid from `from` to `to` (years), as (cert PEM, key PEM).
    fn issue(&self, names: &[&str], years: (i32, i32)) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("none"));
        p.not_before = date_time_ymd(years.0, 1, 1);
        p.not_after = date_time_ymd(years.1, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

const VALID: (i32, i32) = (2020, 2200);
const EXPIRED: (i32, i32) = (2000, 2001);
const NOT_YET: (i32, i32) = (2190, 2200);

/// Test PKI: a CA, a second CA nobody trusts, and one directory per identity.
struct Pki {
    dir: TempDir,
    ca: Ca,
    other: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: TempDir::new(),
            ca: Ca::new("clearlog test CA"),
            other: Ca::new("some other CA"),
        }
    }

    /// A side's directory holding our CA and a certificate from `by` for `names`.
    fn side(&self, label: &str, by: &Ca, names: &[&str], years: (i32, i32)) -> TlsFiles {
        let d = self.dir.0.join(label);
        std::fs::create_dir_all(&d).unwrap();
        let (cert, key) = by.issue(names, years);
        std::fs::write(d.join("ca.pem"), &self.ca.pem).unwrap();
        std::fs::write(d.join("cert.pem"), cert).unwrap();
        std::fs::write(d.join("key.pem"), key).unwrap();
        TlsFiles::in_dir(d)
    }

    fn server(&self) -> TlsServer {
        TlsServer::new(&self.side("dst", &self.ca, &["localhost", "127.0.0.1"], VALID)).unwrap()
    }

    fn client(&self, name: &str, server_name: &str) -> TlsClient {
        let files = self.side(name, &self.ca, &[name], VALID);
        TlsClient::new(&files, server_name).unwrap()
    }
}

// ---- connections ----

type ServerResult = Result<(Transport, PeerIdentity), TlsError>;
type ClientResult = Result<Transport, TlsError>;

/// Handshake `client` with `server` over loopback, each on a thread of its own.
fn pair(server: &TlsServer, client: &TlsClient) -> (ServerResult, ClientResult) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let (sock, _) = listener.accept().unwrap();
            tls_server(sock, server, TIMEOUT)
        });
        let cli = tls_client(TcpStream::connect(addr).unwrap(), client, TIMEOUT);
        (srv.join().unwrap(), cli)
    })
}

fn server_err(r: ServerResult) -> TlsError {
    match r {
        Ok((_, peer)) => panic!("the server accepted {peer:?}"),
        Err(e) => e,
    }
}

fn client_err(r: ClientResult) -> TlsError {
    match r {
        Ok(_) => panic!("the client accepted the server"),
        Err(e) => e,
    }
}

/// `e` says the peer refused the handshake with `alert`.
#[track_caller]
fn assert_peer_refused(e: &TlsError, alert: AlertDescription) {
    assert!(
        matches!(e, TlsError::PeerRefused { alert: a } if *a == alert),
        "{e:?}"
    );
}

/// The error, printed with its sources, as an operator would see it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A deterministic byte stream (xorshift64), different for each seed.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Write `total` bytes of pattern `seed` in writes of varying sizes, then drop the writer (sends
/// close_notify).
fn send_pattern(mut w: Box<dyn Write + Send>, seed: u64, total: usize) {
    let mut p = Pattern(seed);
    let mut buf = vec![0u8; 300 << 10];
    let mut sizes = Pattern(seed ^ 0x5555);
    let mut sent = 0;
    while sent < total {
        let mut r = [0u8; 8];
        sizes.fill(&mut r);
        // 1 byte to 300 KiB, multiples of 8 so the pattern stays aligned.
        let n = ((u64::from_le_bytes(r) as usize % (300 << 10)) / 8 * 8)
            .max(8)
            .min(total - sent);
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).unwrap();
        sent += n;
    }
    w.flush().unwrap();
}

/// Read exactly `total` bytes and check them against pattern `seed`; then the clean end.
fn check_pattern(mut r: Box<dyn clearlog_migration::TransportRead>, seed: u64, total: usize) {
    let mut p = Pattern(seed);
    let mut want = vec![0u8; 64 << 10];
    let mut got = vec![0u8; 64 << 10];
    let mut done = 0;
    while done < total {
        let n = (total - done).min(got.len());
        r.read_exact(&mut got[..n]).unwrap();
        p.fill(&mut want[..n]);
        assert!(
            got[..n] == want[..n],
            "mismatch in bytes {done}..{}",
            done + n
        );
        done += n;
    }
    // The writer was dropped after its last byte: close_notify is a clean end of stream.
    assert_eq!(r.read(&mut got).unwrap(), 0);
}

// ---- a good connection ----

#[test]
fn data_flows_both_ways_at_once_and_ends_cleanly() {
    let pki = Pki::new();
    let server = pki.server().with_authz(["source-a.example"]).unwrap();
    let client = pki.client("source-a.example", "localhost");
    let (srv, cli) = pair(&server, &client);
    let (st, peer) = srv.unwrap();
    let ct = cli.unwrap();
    assert_eq!(peer.dns_names, ["source-a.example"]);
    assert_eq!(peer.authorized_as.as_deref(), Some("source-a.example"));

    const TOTAL: usize = 64 << 20;
    let (sr, sw) = (st.reader.unwrap(), st.writer.unwrap());
    let (cr, cw) = (ct.reader.unwrap(), ct.writer.unwrap());
    // Four threads: each side reads on one while it writes on another, so both directions are
    // full at once (more than the socket buffers hold).
    std::thread::scope(|s| {
        s.spawn(|| send_pattern(cw, 1, TOTAL));
        s.spawn(|| send_pattern(sw, 2, TOTAL));
        s.spawn(|| check_pattern(sr, 1, TOTAL));
        s.spawn(|| check_pattern(cr, 2, TOTAL));
    });
}

#[test]
fn the_server_name_may_be_an_ip_address() {
    let pki = Pki::new();
    let (srv, cli) = pair(&pki.server(), &pki.client("source-a.example", "127.0.0.1"));
    let (_t, peer) = srv.unwrap();
    assert_eq!(peer.authorized_as, None);
    cli.unwrap();
}

#[test]
fn read_timeout_expires_and_the_connection_goes_on() {
    let pki = Pki::new();
    let (srv, cli) = pair(&pki.server(), &pki.client("source-a.example", "localhost"));
    let (mut st, _) = srv.unwrap();
    let mut ct = cli.unwrap();
    let r = st.reader.as_mut().unwrap();
    r.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t0 = Instant::now();
    let e = r.read(&mut [0; 16]).unwrap_err();
    assert!(matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ));
    assert!(t0.elapsed() < Duration::from_secs(5));
    let w = ct.writer.as_mut().unwrap();
    w.write_all(b"after the timeout").unwrap();
    w.flush().unwrap();
    let mut got = [0; 17];
    r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after the timeout");
}

#[test]
fn a_failed_writer_refuses_every_later_write() {
    let pki = Pki::new();
    let server = pki.server();
    let client = pki.client("source-a.example", "localhost");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (st, mut ct, raw) = std::thread::scope(|s| {
        let srv = s.spawn(|| tls_server(listener.accept().unwrap().0, &server, TIMEOUT));
        let sock = TcpStream::connect(addr).unwrap();
        let raw = sock.try_clone().unwrap();
        let ct = tls_client(sock, &client, TIMEOUT).unwrap();
        (srv.join().unwrap().unwrap().0, ct, raw)
    });
    // The connection breaks under the writer (as a reset link would).
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let w = ct.writer.as_mut().unwrap();
    let first = w.write_all(b"the confirmation");
    assert!(first.is_err());
    let again = w.write(b"x").unwrap_err();
    assert!(again.to_string().contains("earlier write"), "{again}");
    assert!(w.flush().is_err());
    drop(ct);
    // The peer never sees a clean close: what it got ends without close_notify.
    let mut r = st.reader.unwrap();
    let e = r.read(&mut [0; 64]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
}

// ---- refusals ----

#[test]
fn wrong_server_name_is_refused_by_the_client() {
    let pki = Pki::new();
    let (srv, cli) = pair(
        &pki.server(),
        &pki.client("source-a.example", "dst.example"),
    );
    let e = client_err(cli);
    match &e {
        TlsError::NameMismatch {
            expected,
            presented,
        } => {
            assert_eq!(expected, "dst.example");
            assert_eq!(presented, &["localhost", "127.0.0.1"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("not valid for dst.example"), "{e}");
    let e = server_err(srv);
    assert_peer_refused(&e, AlertDescription::BadCertificate);
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let files = pki.side("stranger", &pki.other, &["source-a.example"], VALID);
    let client = TlsClient::new(&files, "localhost").unwrap();
    let (srv, cli) = pair(&pki.server(), &client);
    let e = server_err(srv);
    assert!(matches!(e, TlsError::UntrustedCertificate), "{e:?}");
    assert_eq!(
        e.to_string(),
        "the peer's certificate is not signed by our CA (ca.pem)"
    );
    let e = client_err(cli);
    assert_peer_refused(&e, AlertDescription::UnknownCA);
    assert!(e.to_string().contains("does not trust the CA"), "{e}");
}

#[test]
fn server_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let files = pki.side("dst-stranger", &pki.other, &["localhost"], VALID);
    let server = TlsServer::new(&files).unwrap();
    let (srv, cli) = pair(&server, &pki.client("source-a.example", "localhost"));
    let e = client_err(cli);
    assert!(matches!(e, TlsError::UntrustedCertificate), "{e:?}");
    let e = server_err(srv);
    assert_peer_refused(&e, AlertDescription::UnknownCA);
}

#[test]
fn expired_client_certificate_is_refused() {
    let pki = Pki::new();
    let files = pki.side("old", &pki.ca, &["source-a.example"], EXPIRED);
    let client = TlsClient::new(&files, "localhost").unwrap();
    let (srv, cli) = pair(&pki.server(), &client);
    let e = server_err(srv);
    assert!(
        matches!(
            e,
            TlsError::CertificateExpired {
                not_after: Some(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("expired on 2001-01-01 00:00:00 UTC"),
        "{e}"
    );
    let e = client_err(cli);
    assert_peer_refused(&e, AlertDescription::CertificateExpired);
}

#[test]
fn expired_server_certificate_is_refused() {
    let pki = Pki::new();
    let files = pki.side("dst-old", &pki.ca, &["localhost"], EXPIRED);
    let server = TlsServer::new(&files).unwrap();
    let (srv, cli) = pair(&server, &pki.client("source-a.example", "localhost"));
    let e = client_err(cli);
    assert!(matches!(e, TlsError::CertificateExpired { .. }), "{e:?}");
    let e = server_err(srv);
    assert_peer_refused(&e, AlertDescription::CertificateExpired);
}

#[test]
fn not_yet_valid_client_certificate_is_refused() {
    let pki = Pki::new();
    let files = pki.side("future", &pki.ca, &["source-a.example"], NOT_YET);
    let client = TlsClient::new(&files, "localhost").unwrap();
    let (srv, cli) = pair(&pki.server(), &client);
    let e = server_err(srv);
    assert!(
        matches!(e, TlsError::CertificateNotYetValid { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("valid from 2190-01-01"), "{e}");
    let e = client_err(cli);
    assert_peer_refused(&e, AlertDescription::CertificateExpired);
}

#[test]
fn authz_accepts_listed_sources_and_refuses_others() {
    let pki = Pki::new();
    let server = pki
        .server()
        .with_authz("source-a.example,source-c.example".split(','))
        .unwrap();
    assert_eq!(
        server.authz().unwrap(),
        ["source-a.example", "source-c.example"]
    );

    let (srv, cli) = pair(&server, &pki.client("source-a.example", "localhost"));
    assert_eq!(
        srv.unwrap().1.authorized_as.as_deref(),
        Some("source-a.example")
    );
    cli.unwrap();

    let (srv, cli) = pair(&server, &pki.client("source-b.example", "localhost"));
    let e = server_err(srv);
    match &e {
        TlsError::NotAuthorized { presented, allowed } => {
            assert_eq!(presented, &["source-b.example"]);
            assert_eq!(allowed, &["source-a.example", "source-c.example"]);
        }
        other => panic!("{other:?}"),
    }
    let e = client_err(cli);
    assert_peer_refused(&e, AlertDescription::AccessDenied);
    assert!(
        e.to_string().contains("not in its authorization list"),
        "{e}"
    );
}

#[test]
fn authz_names_match_wildcard_certificates() {
    let pki = Pki::new();
    let server = pki
        .server()
        .with_authz(["source-b.migration.example"])
        .unwrap();
    let (srv, cli) = pair(&server, &pki.client("*.migration.example", "localhost"));
    assert_eq!(
        srv.unwrap().1.authorized_as.as_deref(),
        Some("source-b.migration.example")
    );
    cli.unwrap();
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let server = pki.server();
    // A client of our CA that presents no certificate (rustls directly: ours always presents one).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::pem::PemObject::from_pem_slice(pki.ca.pem.as_bytes()).unwrap())
        .unwrap();
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            #[allow(deprecated)]
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (srv, cli) = std::thread::scope(|s| {
        let srv = s.spawn(|| tls_server(listener.accept().unwrap().0, &server, TIMEOUT));
        let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
        let cli =
            rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap()).read(&mut [0; 8]);
        (srv.join().unwrap(), cli)
    });
    let e = server_err(srv);
    assert!(matches!(e, TlsError::NoPeerCertificate), "{e:?}");
    let e = cli.unwrap_err();
    assert!(e.to_string().contains("CertificateRequired"), "{e}");
}

// ---- peers that do not behave ----

/// `e` is a handshake timeout, reported no sooner than its 300 ms deadline and well before 3 s.
#[track_caller]
fn assert_timed_out_at_300ms(e: &TlsError, took: Duration) {
    assert!(matches!(e, TlsError::HandshakeTimeout(_)), "{e:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn a_silent_client_times_out_within_the_deadline() {
    let pki = Pki::new();
    let server = pki.server();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (sock, _) = listener.accept().unwrap();
    let t0 = Instant::now();
    let e = tls_server(sock, &server, Duration::from_millis(300)).unwrap_err();
    assert_timed_out_at_300ms(&e, t0.elapsed());
}

#[test]
fn a_silent_server_times_out_within_the_deadline() {
    let pki = Pki::new();
    let client = pki.client("source-a.example", "localhost");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let _silent = listener.accept().unwrap();
    let t0 = Instant::now();
    let e = tls_client(sock, &client, Duration::from_millis(300)).unwrap_err();
    assert_timed_out_at_300ms(&e, t0.elapsed());
}

#[test]
fn a_client_stalling_mid_handshake_times_out() {
    // A ClientHello record header that never completes.
    let pki = Pki::new();
    let server = pki.server();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut stalled = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    let t0 = Instant::now();
    let e = tls_server(sock, &server, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, TlsError::HandshakeTimeout(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_plaintext_source_on_a_tls_listener_is_recognised() {
    let pki = Pki::new();
    let server = pki.server();
    for (sent, clearlog) in [
        (&b"CLEARLOG\x01\x00\x00\x00"[..], true),
        (&b"GET / HTTP/1.1\r\n"[..], false),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut plain = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        plain.write_all(sent).unwrap();
        let (sock, _) = listener.accept().unwrap();
        let e = tls_server(sock, &server, TIMEOUT).unwrap_err();
        match &e {
            TlsError::NotTls { first_bytes } => assert_eq!(first_bytes[..], sent[..8]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.to_string().contains("plaintext clearlog stream"),
            clearlog,
            "{e}"
        );
    }
}

#[test]
fn a_tls_source_to_a_plaintext_destination_gets_a_clear_error() {
    let pki = Pki::new();
    let client = pki.client("source-a.example", "localhost");
    // A destination without TLS reads the ClientHello as a header, finds a bad magic and closes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut head = [0u8; 8];
        s.read_exact(&mut head).unwrap();
        head
    });
    let e = tls_client(TcpStream::connect(addr).unwrap(), &client, TIMEOUT).unwrap_err();
    assert!(clearlog_migration::tls::looks_like_tls(
        &dst.join().unwrap()
    ));
    assert!(matches!(e, TlsError::ClosedDuringHandshake { .. }), "{e:?}");
    assert!(e.to_string().contains("listening without TLS"), "{e}");

    // One that answers something else than TLS.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = tls_client(TcpStream::connect(addr).unwrap(), &client, TIMEOUT).unwrap_err();
    dst.join().unwrap();
    assert!(matches!(e, TlsError::NotTls { .. }), "{e:?}");
}

// ---- files ----

#[test]
fn file_problems_name_the_file() {
    let pki = Pki::new();
    let good = pki.side("good", &pki.ca, &["localhost"], VALID);
    let dir = pki.dir.0.join("broken");
    std::fs::create_dir_all(&dir).unwrap();
    let files = TlsFiles::in_dir(&dir);
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).unwrap();
    };

    // Missing.
    let e = TlsServer::new(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::FileMissing { path } if path == &files.ca),
        "{e:?}"
    );

    // Not PEM: no certificate in it.
    std::fs::write(&files.ca, "hello\n").unwrap();
    let e = TlsServer::new(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::NoCertificate { path, .. } if path == &files.ca),
        "{e:?}"
    );

    // Broken PEM.
    std::fs::write(&files.ca, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let e = TlsServer::new(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::BadPem { path, .. } if path == &files.ca),
        "{e:?}"
    );

    // A certificate that is not one.
    std::fs::write(
        &files.ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = TlsServer::new(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::BadCertificate { path, .. } if path == &files.ca),
        "{e:?}"
    );

    // The key where the certificate goes, and the certificate where the key goes.
    copy(&good.ca, &files.ca);
    copy(&good.key, &files.cert);
    copy(&good.cert, &files.key);
    let e = TlsServer::new(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::NoCertificate { path, found } if path == &files.cert && found == &["PRIVATE KEY"]),
        "{e:?}"
    );
    copy(&good.cert, &files.cert);
    let e = TlsServer::new(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::NoPrivateKey { path, found } if path == &files.key && found == &["CERTIFICATE"]),
        "{e:?}"
    );
    assert!(e.to_string().contains("(it holds: CERTIFICATE)"), "{e}");

    // Another key than the certificate's.
    let other = pki.side("other", &pki.ca, &["localhost"], VALID);
    copy(&other.key, &files.key);
    let e = TlsServer::new(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::KeyMismatch { key, cert } if key == &files.key && cert == &files.cert),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("does not match the certificate"),
        "{e}"
    );

    // Unreadable: a directory.
    std::fs::remove_file(&files.key).unwrap();
    std::fs::create_dir(&files.key).unwrap();
    let e = TlsClient::new(&files, "localhost").unwrap_err();
    assert!(
        matches!(&e, TlsError::FileUnreadable { path, .. } if path == &files.key),
        "{e:?}"
    );
    assert!(
        chain(&e).starts_with("cannot read TLS file"),
        "{}",
        chain(&e)
    );

    // Bad names.
    let e = TlsClient::new(&good, "not a host").unwrap_err();
    assert!(matches!(e, TlsError::InvalidName(_)), "{e:?}");
    let e = TlsServer::new(&good)
        .unwrap()
        .with_authz(Vec::<String>::new())
        .unwrap_err();
    assert!(matches!(e, TlsError::EmptyAuthz), "{e:?}");
    let e = TlsServer::new(&good)
        .unwrap()
        .with_authz(["source-a.example", "bad name"])
        .unwrap_err();
    assert!(matches!(e, TlsError::InvalidName(_)), "{e:?}");
}

/// Files made with the `openssl` commands of the module docs (`tests/data/tls/README.md`).
#[test]
fn openssl_made_files_work() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    let server = TlsServer::new(&TlsFiles::in_dir(data.join("dst")))
        .unwrap()
        .with_authz(["source-a.example"])
        .unwrap();
    for name in ["localhost", "127.0.0.1"] {
        let client = TlsClient::new(&TlsFiles::in_dir(data.join("src-a")), name).unwrap();
        let (srv, cli) = pair(&server, &client);
        let (mut st, peer) = srv.unwrap();
        assert_eq!(peer.authorized_as.as_deref(), Some("source-a.example"));
        let mut ct = cli.unwrap();
        ct.writer.as_mut().unwrap().write_all(b"ping").unwrap();
        let mut got = [0; 4];
        st.reader.as_mut().unwrap().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }
    let client = TlsClient::new(&TlsFiles::in_dir(data.join("src-b")), "localhost").unwrap();
    let (srv, cli) = pair(&server, &client);
    assert!(matches!(server_err(srv), TlsError::NotAuthorized { .. }));
    assert_peer_refused(&client_err(cli), AlertDescription::AccessDenied);
}

// ---- cost ----

/// Push 1 GiB one way through TLS, then through plain TCP, on loopback; print MiB/s and the CPU
/// time of the sending and receiving threads. Not a timed test: run it by hand, in release:
/// `cargo test --release -p clearlog-migration --test tls -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput_1gib() {
    const TOTAL: usize = 1 << 30;
    let pki = Pki::new();
    let (srv, cli) = pair(&pki.server(), &pki.client("source-a.example", "localhost"));
    let tls = (cli.unwrap(), srv.unwrap().0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let plain = (
        Transport::tcp(a).unwrap(),
        Transport::tcp(listener.accept().unwrap().0).unwrap(),
    );
    for (label, (src, dst)) in [("TLS 1.3", tls), ("plain TCP", plain)] {
        let mut w = src.writer.unwrap();
        let mut r = dst.reader.unwrap();
        let t0 = Instant::now();
        let (send_cpu, recv_cpu) = std::thread::scope(|s| {
            let sender = s.spawn(move || {
                let c0 = clearlog_migration::thread_cpu_time();
                let buf = vec![0x5au8; 1 << 20];
                for _ in 0..TOTAL / buf.len() {
                    w.write_all(&buf).unwrap();
                }
                w.flush().unwrap();
                clearlog_migration::thread_cpu_time() - c0
            });
            let c0 = clearlog_migration::thread_cpu_time();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            while n < TOTAL {
                n += r.read(&mut buf).unwrap();
            }
            (
                sender.join().unwrap(),
                clearlog_migration::thread_cpu_time() - c0,
            )
        });
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{label}: 1 GiB in {secs:.2} s = {:.0} MiB/s; CPU: sender {:.2} s, receiver {:.2} s",
            1024.0 / secs,
            send_cpu.as_secs_f64(),
            recv_cpu.as_secs_f64()
        );
    }
}
