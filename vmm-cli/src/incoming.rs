// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm incoming`: the destination side.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::Scope;
use std::time::{Duration, Instant};

use clearlog_migration::stream::Header;
use clearlog_migration::{
    peek_header, ram_fingerprint, BoxError, Destination, Incoming, IncomingStats, ListenOptions,
    Listener, MigrationUri, StateBlob, Transport, VmRestore,
};
use clearlog_test_guest::workload::check::{check_increment, loaded_workload};
use clearlog_test_guest::workload::WorkloadKind;
use clearlog_test_guest::Guest;

use crate::args::IncomingArgs;
use crate::chain::ErrorChain;
use crate::fault::{Fault, FaultyMemory, Injector};
use crate::guest_view::PostcopyWatch;
use crate::output::print_incoming;
use crate::{CliError, CliResult};
use clearlog_migration::tls::{TlsError, TlsFiles, TlsServer};
use vmm_cli::vm_control::GuestControl;

/// Where `vmm incoming` listens, kept for a postcopy's source to come back to.
type Listening = Option<(Listener, ListenOptions)>;

/// Accept the incoming migration and read its header: a session or a version-1 connection
/// (stray and refused connections are logged and skipped), or the saved file. With `--listen`,
/// the listener too.
fn open_incoming(a: &IncomingArgs) -> CliResult<(Incoming, Listening)> {
    if let Some(uri) = &a.listen {
        match uri.parse::<MigrationUri>() {
            Ok(MigrationUri::File(_)) => {
                return Err(CliError::Usage(format!(
                    "--listen {uri}: a file is not something to listen on; use --from {uri} to restore it"
                )))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(CliError::Usage(format!(
                    "--listen {uri}: {e}; use tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444) or unix:PATH"
                )))
            }
        }
        if a.handshake_timeout.is_zero() {
            return Err(CliError::Usage(
                "--handshake-timeout must be positive (e.g. 10s)".into(),
            ));
        }
        let mut options = ListenOptions::default()
            .with_insecure_plaintext(a.insecure_plaintext)
            .with_handshake_timeout(a.handshake_timeout);
        if let Some(dir) = &a.tls_dir {
            options = options.with_tls(tls_server(dir, &a.tls_authz)?);
        }
        let listener = Listener::bind_with(uri, &options).map_err(|e| {
            let hint = match &e {
                clearlog_migration::Error::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    " (the address is already in use: pick another port or path)"
                }
                clearlog_migration::Error::PlaintextRefused { .. } => {
                    " (give --tls-dir, or --insecure-plaintext to accept anyone who can reach \
                     the port)"
                }
                _ => "",
            };
            CliError::Usage(format!("cannot listen on {uri}: {e}{hint}"))
        })?;
        let local = listener.local_uri().unwrap_or_else(|_| uri.clone());
        // Scripts (and `vmm bench`) wait for this line to know where to connect.
        eprintln!("vmm: listening on {local}");
        let _ = std::io::stderr().flush();
        // A port probe, a peer that is not a clearlog source, a second source while one joins:
        // refused and logged; the first source whose session (or version-1 header) is complete
        // is the migration.
        let incoming = listener.accept_incoming(&options).map_err(|e| {
            CliError::Failed(format!(
                "accepting the migration on {local} failed: {}; no guest was resumed",
                e.chain()
            ))
        })?;
        return Ok((incoming, Some((listener, options))));
    }
    let from = a.from.as_deref().unwrap_or_default();
    match from.parse::<MigrationUri>() {
        Ok(MigrationUri::File(path)) if a.lazy => Err(CliError::Usage(format!(
            "--lazy: {} is not a snapshot (`vmm snapshot` writes them); a saved migration \
             restores eagerly",
            path.display()
        ))),
        Ok(MigrationUri::File(path)) => {
            let mut transport = std::fs::File::open(&path)
                .map(Transport::file_reader)
                .map_err(|e| CliError::Failed(format!("cannot open {}: {e}", path.display())))?;
            let header = peek_header(&mut transport).map_err(|e| {
                CliError::Failed(format!(
                    "the incoming stream is not usable: {}; no guest was resumed",
                    e.chain()
                ))
            })?;
            Ok((Incoming::Stream { transport, header }, None))
        }
        Ok(_) => Err(CliError::Usage(format!(
            "--from {from}: only file:PATH can be restored; use --listen for sockets"
        ))),
        Err(e) => Err(CliError::Usage(format!(
            "--from {from}: {e}; use file:PATH"
        ))),
    }
}

/// The destination's TLS configuration from `--tls-dir` and `--tls-authz`.
fn tls_server(dir: &std::path::Path, authz: &[String]) -> CliResult<TlsServer> {
    let usage =
        |e: TlsError| CliError::Usage(format!("--tls-dir {}: {}", dir.display(), e.chain()));
    let server = TlsServer::new(&TlsFiles::in_dir(dir)).map_err(usage)?;
    if authz.is_empty() {
        return Ok(server);
    }
    server
        .with_authz(authz)
        .map_err(|e| CliError::Usage(format!("--tls-authz {}: {}", authz.join(","), e.chain())))
}

/// `vmm incoming`: accept the migration, make a guest of its RAM layout, receive (resuming the
/// guest at the commit), watch the guest run, report.
pub fn incoming(a: IncomingArgs) -> CliResult {
    if let Some(path) = crate::restore::snapshot_from(&a) {
        return crate::restore::restore(&a, &path);
    }
    let (incoming, listening) = open_incoming(&a)?;
    let guest = guest_for(incoming.header())?;
    let start = Instant::now();
    let stop_watch = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let control = IncomingControl {
            guest: &guest,
            args: &a,
            extra: Mutex::new(serde_json::Map::new()),
            postcopy_watch: Mutex::new(None),
            scope,
            stop_watch: &stop_watch,
        };
        let received = receive(&a, &guest, (incoming, listening.as_ref()), &control);
        let received_ms = start.elapsed().as_secs_f64() * 1e3;
        let watch = control
            .postcopy_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // The watch thread ends with the scope, whatever happened.
        stop_watch.store(true, Ordering::Relaxed);
        let received = received?;
        let mut extra = control
            .extra
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let stats = received_or_exit(received, &a, &extra)?;
        if let Some(w) = watch {
            let view = w.view(
                Duration::from_secs_f64(stats.postcopy_ms / 1e3),
                guest.tsc_khz(),
            );
            extra.insert(
                "postcopy_guest_max_stall_ms".into(),
                view.max_stall_ms.into(),
            );
            extra.insert(
                "postcopy_guest_write_rate_bytes_per_s".into(),
                view.write_rate_bytes_per_s.map(|r| r.round() as u64).into(),
            );
        }
        extra.insert("guest_mem_bytes".into(), guest.mem_bytes().into());
        extra.insert("receive_ms".into(), received_ms.into());
        run_after(&a, &guest, &stats, extra)
    })
}

/// The engine's answer, or the exit it maps to: 3 for pages that differ, 4 for a postcopy
/// that failed after its commit, 1 otherwise.
fn received_or_exit(
    received: clearlog_migration::Result<IncomingStats>,
    a: &IncomingArgs,
    extra: &serde_json::Map<String, serde_json::Value>,
) -> CliResult<IncomingStats> {
    match received {
        Ok(stats) => Ok(stats),
        Err(e @ clearlog_migration::Error::VerificationFailed { .. }) => {
            if a.json {
                println!("{}", serde_json::Value::Object(extra.clone()));
            }
            Err(CliError::Mismatch(format!(
                "incoming migration: {}",
                e.chain()
            )))
        }
        Err(e @ clearlog_migration::Error::Postcopy { .. }) => Err(CliError::Postcopy(format!(
            "incoming migration: {}; the guest runs here but waits on pages only the source \
             holds (the source keeps them, paused): stop this guest or let an orchestrator decide",
            e.chain()
        ))),
        Err(e) => {
            let resumed = if control_resumed(extra) {
                "the guest was resumed but could not be verified"
            } else {
                "no guest was resumed"
            };
            Err(CliError::Failed(format!(
                "incoming migration failed: {}; {resumed}",
                e.chain()
            )))
        }
    }
}

/// Fails a destination before anything resumed.
fn failed(what: &str, e: &dyn std::fmt::Display) -> CliError {
    CliError::Failed(format!("{what}: {e}; no guest was resumed"))
}

/// The destination guest for the stream's RAM layout (this VMM's one block); its vCPUs come from
/// the stream's state blobs.
fn guest_for(header: &Header) -> CliResult<Guest> {
    let layout: Vec<(String, u64)> = header
        .blocks
        .iter()
        .map(|b| (b.name.clone(), b.size))
        .collect();
    crate::restore::guest_for_layout(&layout)
}

/// Receives the migration into `guest` (`--fault hide-populated=N`: into memory that hides N
/// pages holding data from the engine).
fn receive(
    a: &IncomingArgs,
    guest: &Guest,
    (mut incoming, listening): (Incoming, Option<&(Listener, ListenOptions)>),
    control: &IncomingControl<'_, '_>,
) -> CliResult<clearlog_migration::Result<IncomingStats>> {
    if !a.io_timeout.is_zero() {
        // Only once the stream has started (a source may boot and warm up its guest for long
        // before sending its header). A read that times out fails the stream like any
        // transport error: nothing resumes.
        incoming.set_read_timeout(Some(a.io_timeout)).map_err(|e| {
            CliError::Failed(format!("setting the --io-timeout on the connection: {e}"))
        })?;
    }
    Ok(match a.fault {
        None => with_recovery(Destination::new(guest.memory()), a, listening)?
            .receive_incoming(incoming, control),
        Some(Fault::HidePopulated(n)) => {
            let mut memory = FaultyMemory::new(guest.memory(), Injector::new(None, None));
            memory
                .fill_and_hide_last_pages(n)
                .map_err(|e| failed("--fault hide-populated", &e.chain()))?;
            with_recovery(Destination::new(&memory), a, listening)?
                .receive_incoming(incoming, control)
        }
        Some(other) => {
            return Err(CliError::Usage(format!(
                "--fault {other}: a destination only takes hide-populated=N"
            )))
        }
    })
}

/// `--postcopy-recover-timeout`: a cut postcopy waits on the same listener for its source to
/// come back (each connection with the `--io-timeout` of the first).
fn with_recovery<'a, M: clearlog_migration::MigrationMemory + ?Sized>(
    d: Destination<'a, M>,
    a: &'a IncomingArgs,
    listening: Option<&'a (Listener, ListenOptions)>,
) -> CliResult<Destination<'a, M>> {
    let Some(timeout) = a.postcopy_recover_timeout else {
        return Ok(d);
    };
    let Some((listener, options)) = listening else {
        return Err(CliError::Usage(
            "--postcopy-recover-timeout needs --listen (a file has no source to come back)".into(),
        ));
    };
    Ok(d.with_postcopy_recovery(timeout, move |deadline| {
        let options = options.clone().with_accept_deadline(Some(deadline));
        let mut incoming = listener.accept_incoming(&options)?;
        if !a.io_timeout.is_zero() {
            incoming
                .set_read_timeout(Some(a.io_timeout))
                .map_err(|source| clearlog_migration::Error::Io {
                    context: "setting the --io-timeout",
                    source,
                })?;
        }
        Ok(incoming)
    }))
}

/// Lets the resumed guest run for `--run-after`, prints the report, and fails if the guest
/// failed or made no progress.
fn run_after(
    a: &IncomingArgs,
    guest: &Guest,
    stats: &IncomingStats,
    mut extra: serde_json::Map<String, serde_json::Value>,
) -> CliResult {
    let workload = loaded_workload(guest.ram()).ok().flatten();
    if stats.postcopy && workload == Some(WorkloadKind::Increment) {
        check_increment_paused(guest, &mut extra)?;
    }
    let before = guest.pages_written().unwrap_or(0);
    std::thread::sleep(a.run_after);
    let after = guest.pages_written().unwrap_or(0);
    let failures = guest.vcpu_failures();
    let run_after_ms = a.run_after.as_secs_f64() * 1e3;
    extra.insert("run_after_ms".into(), run_after_ms.into());
    let written = after.saturating_sub(before);
    extra.insert("pages_written_after_resume".into(), written.into());
    extra.insert("guest_ran_after_resume".into(), failures.is_empty().into());
    let rss = crate::output::peak_rss_bytes();
    extra.insert("peak_rss_bytes".into(), rss.into());
    print_incoming(stats, &serde_json::Value::Object(extra), a.json);
    crate::restore::check_ran(guest, &failures, after != before, a.run_after, "resumed")
}

/// The destination guest seen by the engine, with `vmm incoming`'s own checks: the increment rule
/// before anything is acknowledged, and the RAM fingerprint and `--save-memory` right before the
/// guest resumes (the memory is then exactly what the source had at switchover).
struct IncomingControl<'a, 's> {
    guest: &'a Guest,
    args: &'a IncomingArgs,
    extra: Mutex<serde_json::Map<String, serde_json::Value>>,
    /// Postcopy: the guest's own view from its resume on.
    postcopy_watch: Mutex<Option<PostcopyWatch<'s>>>,
    scope: &'s Scope<'s, 'a>,
    stop_watch: &'s AtomicBool,
}

impl IncomingControl<'_, '_> {
    fn note(&self, key: &str, value: serde_json::Value) {
        self.extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.into(), value);
    }
}

impl VmRestore for IncomingControl<'_, '_> {
    fn check_loaded(&self) -> Result<(), BoxError> {
        let workload = loaded_workload(self.guest.ram()).ok().flatten();
        self.note(
            "workload",
            workload
                .map_or("unknown".to_string(), |w| format!("{w:?}").to_lowercase())
                .into(),
        );
        if workload == Some(WorkloadKind::Increment) {
            let check = check_increment(self.guest.ram())?;
            self.note("increment_consistent", check.is_consistent().into());
            self.note("increment_bad_pages", check.bad_count.into());
            if !check.is_consistent() {
                return Err(format!(
                    "the received memory breaks the increment rule ({} bad pages: lost writes)",
                    check.bad_count
                )
                .into());
            }
        }
        Ok(())
    }

    fn restore_state(&self, blobs: &[StateBlob]) -> Result<(), BoxError> {
        GuestControl(self.guest).restore_state(blobs)
    }

    fn resume(&self) -> Result<(), BoxError> {
        if self.args.ram_fingerprint {
            let t = Instant::now();
            let fp = ram_fingerprint(self.guest.memory(), 2)?;
            self.note("ram_fingerprint", format!("{fp:016x}").into());
            self.note(
                "ram_fingerprint_ms",
                (t.elapsed().as_secs_f64() * 1e3).into(),
            );
        }
        if let Some(path) = &self.args.save_memory {
            save_memory(self.guest, path)
                .map_err(|e| format!("saving guest RAM to {}: {e}", path.display()))?;
            self.note("saved_memory", path.display().to_string().into());
        }
        self.note("resumed_by_engine", true.into());
        GuestControl(self.guest).resume()
    }

    /// Pages are missing: the fingerprint and `--save-memory` would read all of them before the
    /// guest runs (and the guest changes them right after): both are skipped, and the engine's
    /// verification is the proof. The increment rule is checked once every page arrived.
    fn resume_postcopy(&self) -> Result<(), BoxError> {
        if self.args.ram_fingerprint || self.args.save_memory.is_some() {
            self.note(
                "ram_fingerprint_skipped",
                "postcopy: the guest resumed with pages missing".into(),
            );
        }
        let watch = PostcopyWatch::start(self.scope, self.guest, self.stop_watch);
        *self
            .postcopy_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = watch;
        self.note("resumed_by_engine", true.into());
        GuestControl(self.guest).resume()
    }
}

/// After a postcopy (every page arrived): pause the guest, check the increment rule on its
/// memory, resume it. A page lost or placed wrong breaks the rule.
fn check_increment_paused(
    guest: &Guest,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> CliResult {
    let failed = |e: &dyn std::fmt::Display| {
        CliError::Failed(format!("checking the guest after postcopy: {e}"))
    };
    guest.pause().map_err(|e| failed(&e))?;
    let check = check_increment(guest.ram());
    guest.resume().map_err(|e| failed(&e))?;
    let check = check.map_err(|e| failed(&e))?;
    extra.insert("increment_consistent".into(), check.is_consistent().into());
    extra.insert("increment_bad_pages".into(), check.bad_count.into());
    if !check.is_consistent() {
        return Err(CliError::Mismatch(format!(
            "after postcopy the guest's memory breaks the increment rule ({} bad pages: lost \
             writes)",
            check.bad_count
        )));
    }
    Ok(())
}

/// Whether the engine got as far as resuming the guest.
fn control_resumed(extra: &serde_json::Map<String, serde_json::Value>) -> bool {
    extra.get("resumed_by_engine").is_some()
}

/// Write guest RAM to `path`: guest-physical 0 at file offset 0.
fn save_memory(guest: &Guest, path: &std::path::Path) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let block = guest.block();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < block.size() {
        let n = buf.len().min((block.size() - offset) as usize);
        block
            .read(offset, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        file.write_all(&buf[..n])?;
        offset += n as u64;
    }
    file.flush()
}
