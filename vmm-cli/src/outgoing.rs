// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Where a source's migration goes: connecting to a destination (a session of page channels,
//! with or without mutual TLS, or one version-1 stream) and migrating over what it connected.

use std::time::Duration;

use clearlog_migration::tls::{TlsClient, TlsFiles};
use clearlog_migration::{
    connect_session, CancelToken, ConnectOptions, DirtyTracking, MigrationStats, MigrationUri,
    Progress, Session, SessionOptions, Source, Transport, VmControl,
};

use crate::args::SourceTlsArgs;
use crate::chain::ErrorChain;
use crate::{CliError, CliResult};

/// Where a migration goes: one version-1 stream (a `file:` snapshot, or `--channels 0`) or a
/// session.
pub enum Outgoing {
    /// One stream.
    Stream(Transport),
    /// A session of page channels.
    Session(Session),
}

impl Outgoing {
    /// Every connection wrapped with `f` (fault injection).
    pub fn map(self, mut f: impl FnMut(Transport) -> Transport) -> Outgoing {
        match self {
            Outgoing::Stream(t) => Outgoing::Stream(f(t)),
            Outgoing::Session(s) => Outgoing::Session(s.map(f)),
        }
    }

    /// Migrates `source` over this stream or session.
    pub fn send<M: DirtyTracking + ?Sized>(
        self,
        source: &Source<'_, M>,
        control: &dyn VmControl,
        progress: &mut dyn FnMut(&Progress),
        cancel: &CancelToken,
    ) -> clearlog_migration::Result<MigrationStats> {
        match self {
            Outgoing::Stream(t) => source.migrate(t, control, Some(progress), cancel),
            Outgoing::Session(s) => source.migrate_session(s, control, Some(progress), cancel),
        }
    }
}

/// Connect to a destination: a session of `channels` page channels for `tcp:` and `unix:`
/// (`0`: one version-1 stream), one stream for `file:`; with `--tls-dir`, every connection over
/// mutual TLS. TCP connections are guarded against a dead link for `io_timeout` (the send
/// timeout and `TCP_USER_TIMEOUT`), so a link that goes silent (cable pulled, peer host gone)
/// fails the migration in seconds and the guest keeps running here.
pub fn connect_source(
    uri: &str,
    io_timeout: Duration,
    channels: u32,
    tls: &SourceTlsArgs,
) -> CliResult<Outgoing> {
    let parsed = uri.parse::<MigrationUri>();
    let tls = tls_client(uri, parsed.as_ref().ok(), channels, tls)?;
    let with_tls = if tls.is_some() {
        ", with --tls-dir"
    } else {
        ""
    };
    let unreachable = |e: clearlog_migration::Error| {
        CliError::Failed(format!(
            "cannot reach the destination {uri}: {} (is `vmm incoming` listening there{with_tls}?)",
            e.chain(),
        ))
    };
    let is_file = matches!(parsed, Ok(MigrationUri::File(_)));
    if is_file || channels == 0 {
        return clearlog_migration::connect_with(uri, &ConnectOptions { io_timeout })
            .map(Outgoing::Stream)
            .map_err(unreachable);
    }
    let mut opts = SessionOptions::default()
        .with_channels(channels)
        .with_io_timeout(io_timeout);
    if let Some(tls) = tls {
        opts = opts.with_tls(tls);
    }
    connect_session(uri, &opts)
        .map(Outgoing::Session)
        .map_err(unreachable)
}

/// The source's TLS configuration from `--tls-dir` and `--tls-hostname`, for a `tcp:` session
/// only (`None` without `--tls-dir`).
fn tls_client(
    uri: &str,
    parsed: Option<&MigrationUri>,
    channels: u32,
    tls: &SourceTlsArgs,
) -> CliResult<Option<TlsClient>> {
    match (&tls.tls_dir, parsed) {
        (None, _) => Ok(None),
        (Some(dir), Some(MigrationUri::Tcp(addr))) if channels > 0 => {
            let name = tls.tls_hostname.clone().unwrap_or_else(|| uri_host(addr));
            TlsClient::new(&TlsFiles::in_dir(dir), &name)
                .map(Some)
                .map_err(|e| CliError::Usage(format!("--tls-dir {}: {}", dir.display(), e.chain())))
        }
        (Some(_), Some(MigrationUri::Tcp(_))) => Err(CliError::Usage(
            "--tls-dir needs a session: --channels 1 or more (0 is one version-1 stream, \
             without TLS)"
                .into(),
        )),
        (Some(_), _) => Err(CliError::Usage(format!(
            "--tls-dir: TLS runs over tcp: only, not {uri} (a Unix socket is guarded by its \
             file's permissions, a file by the file system's)"
        ))),
    }
}

/// The host of a `tcp:` URI's `HOST:PORT` (an IPv6 address without its brackets): the name a
/// destination's certificate must be valid for unless `--tls-hostname` says otherwise.
fn uri_host(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_name_is_the_uri_host() {
        assert_eq!(uri_host("dst.example:4444"), "dst.example");
        assert_eq!(uri_host("[::1]:4444"), "::1");
        assert_eq!(uri_host("10.0.0.2:1"), "10.0.0.2");
    }

    #[test]
    fn tls_needs_a_tcp_session() {
        let tls = SourceTlsArgs {
            tls_dir: Some("/nonexistent".into()),
            tls_hostname: None,
        };
        let usage = |r: CliResult<Option<TlsClient>>| match r {
            Err(CliError::Usage(m)) => m,
            _ => panic!("not a usage error"),
        };
        let unix = MigrationUri::Unix("/tmp/s".into());
        assert!(usage(tls_client("unix:/tmp/s", Some(&unix), 2, &tls)).contains("tcp: only"));
        let tcp = MigrationUri::Tcp("127.0.0.1:1".into());
        assert!(usage(tls_client("tcp:127.0.0.1:1", Some(&tcp), 0, &tls)).contains("a session"));
        assert!(usage(tls_client("tcp:127.0.0.1:1", Some(&tcp), 2, &tls)).contains("/nonexistent"));
        let none = SourceTlsArgs::default();
        assert!(tls_client("unix:/tmp/s", Some(&unix), 2, &none)
            .unwrap()
            .is_none());
    }
}
