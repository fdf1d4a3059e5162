// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sessions over mutual TLS: every channel runs TLS; a destination waiting for its migration
//! refuses every peer that fails TLS (a plaintext source, a source not on its authorization list,
//! a source that refuses the destination's certificate, a peer that stalls or sends garbage, a
//! page channel presenting another identity than its control channel) and keeps waiting, and
//! the authorized source then migrates with every byte verified.
//!
//! The certificates are the openssl-made test files of `tests/data/tls` (their README).

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clearlog_migration::tls::{tls_client, TlsClient, TlsError, TlsFiles, TlsServer};
use clearlog_migration::*;
use common::*;

/// Four clear chunks (windows) of the default 16 MiB: one for each of four channels.
const RAM: &[(&str, u64, u64)] = &[("ram", 0, 64 << 20)];

fn files(who: &str) -> TlsFiles {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    TlsFiles::in_dir(dir.join(who))
}

/// A source's TLS configuration: `who`'s certificate, expecting the destination to be `name`.
fn client(who: &str, name: &str) -> TlsClient {
    TlsClient::new(&files(who), name).unwrap()
}

/// The destination's: only `source-a.example` may migrate in.
fn server() -> TlsServer {
    TlsServer::new(&files("dst"))
        .unwrap()
        .with_authz(["source-a.example"])
        .unwrap()
}

fn session_opts(tls: Option<TlsClient>, channels: u32) -> SessionOptions {
    let opts = SessionOptions::default()
        .with_channels(channels)
        .with_handshake_timeout(Duration::from_secs(5));
    match tls {
        Some(t) => opts.with_tls(t),
        None => opts,
    }
}

/// A destination listening with TLS at `listen_opts` gets `strays` first, each of which must fail
/// on the source side as `check` says; then `source-a` migrates over `channels` TLS channels.
fn migrate_after_strays(
    listen_opts: ListenOptions,
    channels: u32,
    strays: impl FnOnce(&str),
) -> (MigrationStats, IncomingStats, Option<tls::PeerIdentity>) {
    let src = memory(RAM);
    prefill(&src, 11);
    let dst = memory(RAM);
    let listener = Listener::bind_with("tcp:127.0.0.1:0", &listen_opts).unwrap();
    let uri = listener.local_uri().unwrap();
    let vm_src = TestVm {
        state: state_blobs(),
        ..TestVm::default()
    };
    let vm_dst = TestVm::default();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let incoming = listener.accept_incoming(&listen_opts)?;
            let who = incoming.peer_identity().cloned();
            Destination::new(&dst)
                .receive_incoming(incoming, &vm_dst)
                .map(|d| (d, who))
        });
        strays(&uri);
        let opts = session_opts(Some(client("src-a", "localhost")), channels);
        let s = connect_session(&uri, &opts).and_then(|session| {
            Source::new(&src, MigrationConfig::default())
                .unwrap()
                .migrate_session(session, &vm_src, None, &CancelToken::new())
        });
        (s, d.join().unwrap())
    });
    let (s, (d, who)) = match (s, d) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => panic!("source {s:?}\ndestination {d:?}"),
    };
    assert!(s.converged && s.verified && d.resumed && d.verified);
    assert_eq!((s.page_channels, d.page_channels), (channels, channels));
    assert!(diff_ram(&src, &dst).is_empty());
    assert_eq!(vm_dst.restored.lock().unwrap().len(), state_blobs().len());
    (s, d, who)
}

fn listen_opts() -> ListenOptions {
    ListenOptions::default()
        .with_tls(server())
        .with_handshake_timeout(Duration::from_secs(1))
}

/// The TLS error under a session error.
fn tls_error(e: &Error) -> &TlsError {
    match e {
        Error::Tls(t) => t,
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn an_authorized_source_migrates_over_four_tls_channels() {
    let (s, d, who) = migrate_after_strays(listen_opts(), 4, |_| {});
    let who = who.expect("a TLS session names its source");
    assert_eq!(who.authorized_as.as_deref(), Some("source-a.example"));
    assert_eq!(who.dns_names, ["source-a.example"]);
    // Every channel carried pages: they really ran over the four TLS connections.
    assert!(s.channel_stats.iter().all(|c| c.pages > 0), "{s:?}");
    assert_eq!(d.pages_received, s.pages_sent);
}

#[test]
fn every_tls_refusal_leaves_the_destination_waiting() {
    migrate_after_strays(listen_opts(), 2, |uri| {
        // A plaintext source: the destination's handshake sees no TLS and closes.
        let e = connect_session(uri, &session_opts(None, 2)).unwrap_err();
        assert!(matches!(e, Error::Handshake(_)), "{e:?}");
        assert!(e.to_string().contains("requires TLS"), "{e}");

        // A source with a valid certificate that the authorization list does not name.
        let e =
            connect_session(uri, &session_opts(Some(client("src-b", "localhost")), 2)).unwrap_err();
        assert!(
            matches!(tls_error(&e), TlsError::PeerRefused { .. }),
            "{e:?}"
        );

        // A source that expects another destination refuses this one's certificate.
        let e = connect_session(uri, &session_opts(Some(client("src-a", "dst.example")), 2))
            .unwrap_err();
        assert!(
            matches!(tls_error(&e), TlsError::NameMismatch { .. }),
            "{e:?}"
        );

        // A peer that sends garbage, and one that connects and stalls past the handshake
        // deadline (it stays open for the whole migration).
        let addr = uri.strip_prefix("tcp:").unwrap();
        let mut garbage = std::net::TcpStream::connect(addr).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let silent = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        drop((garbage, silent));
    });
}

/// Connects each channel with the next TLS configuration in line (control channel first).
struct Identities {
    addr: String,
    configs: Vec<TlsClient>,
}

impl ChannelConnector for Identities {
    fn connect(&mut self) -> clearlog_migration::Result<Transport> {
        let sock = std::net::TcpStream::connect(&self.addr).map_err(|source| Error::Io {
            context: "TCP connect",
            source,
        })?;
        let config = self.configs.remove(0);
        tls_client(sock, &config, Duration::from_secs(5)).map_err(Error::Tls)
    }
}

/// Without an authorization list both test sources are trusted, but a session is one source: a
/// page channel that presents another certificate than its control channel is refused (and the
/// session dropped once its channels do not all join); the real source then migrates.
#[test]
fn a_page_channel_with_another_identity_is_refused() {
    let opts = ListenOptions::default()
        .with_tls(TlsServer::new(&files("dst")).unwrap())
        .with_handshake_timeout(Duration::from_secs(1));
    let (_, _, who) = migrate_after_strays(opts, 1, |uri| {
        let mut mixed = Identities {
            addr: uri.strip_prefix("tcp:").unwrap().into(),
            configs: vec![client("src-b", "localhost"), client("src-a", "localhost")],
        };
        let e = open_session(&mut mixed, &session_opts(None, 1)).unwrap_err();
        assert!(matches!(e, Error::SessionRefused(_)), "{e:?}");
        // Past the handshake deadline: the half-joined session is dropped.
        std::thread::sleep(Duration::from_millis(1200));
    });
    let who = who.unwrap();
    assert_eq!(who.dns_names, ["source-a.example"]);
    assert_eq!(who.authorized_as, None);
}

#[test]
fn tls_over_a_unix_socket_is_refused_on_both_sides() {
    let path = std::env::temp_dir().join(format!("clearlog-tls-{}.sock", std::process::id()));
    let uri = format!("unix:{}", path.display());
    let e = Listener::bind_with(&uri, &ListenOptions::default().with_tls(server())).unwrap_err();
    assert!(matches!(e, Error::TlsNeedsTcp(_)), "{e:?}");
    let e =
        connect_session(&uri, &session_opts(Some(client("src-a", "localhost")), 1)).unwrap_err();
    assert!(matches!(e, Error::TlsNeedsTcp(_)), "{e:?}");
    // And a ChannelAcceptor's connections are already open: no TLS for them.
    struct Never;
    impl ChannelAcceptor for Never {
        fn poll_accept(&mut self) -> clearlog_migration::Result<Option<Accepted>> {
            Ok(None)
        }
    }
    let e = accept_incoming(&mut Never, &ListenOptions::default().with_tls(server())).unwrap_err();
    assert!(matches!(e, Error::TlsNeedsTcp(_)), "{e:?}");
}

#[test]
fn with_tls_a_destination_may_listen_beyond_loopback() {
    let plain = ListenOptions::default();
    assert!(matches!(
        Listener::bind_with("tcp:0.0.0.0:0", &plain),
        Err(Error::PlaintextRefused { .. })
    ));
    Listener::bind_with("tcp:0.0.0.0:0", &plain.with_tls(server())).unwrap();
}
