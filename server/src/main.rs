//! `failbackd`: serves one PostgreSQL data directory, read-only, over gRPC and, with
//! `--quic-listen`, over QUIC too; with `--pg-conn`, also while PostgreSQL runs on it.
//!
//! As a service: it checks what it was given before it binds anything
//! ([`failback_server::startup`]), tells systemd it is ready once every listener is bound
//! ([`failback_server::notify`]), and stops gracefully on SIGTERM or Ctrl-C
//! ([`failback_server::shutdown`]): new requests refused, replies in flight finished within
//! `--shutdown-timeout`, exit status 0. Every line goes through [`failback_server::log`].

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use failback_server::cli::Args;
use failback_server::config::Settings;
use failback_server::log::{self, Level};
use failback_server::notify::{Notifier, status_line};
use tokio::signal::unix::{Signal, SignalKind, signal};

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("could not read {what} {}", path.display()))
}

fn main() -> ExitCode {
    let a = Args::parse();
    // The flag's format from the first line; the config file's once it is read.
    if let Some(f) = a.log_format {
        log::set_format(f);
    }
    let run = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
        .and_then(|rt| {
            let r = rt.block_on(serve(a));
            // What is left (replies cut at the shutdown timeout, their blocking reads) ends
            // with the process; nothing is waited for.
            rt.shutdown_background();
            r
        });
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // As failback reports its errors: the chain, outermost first, never a debug dump.
            log::exit_error(e.as_ref());
            ExitCode::FAILURE
        }
    }
}

/// systemd's notification socket, when failbackd runs as a `Type=notify` unit.
struct Systemd(Option<Notifier>);

impl Systemd {
    fn from_env() -> Result<Systemd> {
        Ok(Systemd(Notifier::from_env().transpose()?))
    }

    /// Tells systemd `state`; a failure is logged, as failbackd serves whether or not systemd
    /// hears it (and systemd's own timeout says what it missed).
    fn tell(&self, state: &str) {
        if let Some(n) = &self.0
            && let Err(e) = n.send(state)
        {
            log::warning(&failback_common::errors::one_line(&e));
        }
    }
}

/// SIGTERM (a service manager's stop) and SIGINT (Ctrl-C), listened for from start-up on.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("could not listen for {name}"))
        };
        Ok(StopSignals {
            term: listen(SignalKind::terminate(), "SIGTERM")?,
            int: listen(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// The next one, by name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn serve(a: Args) -> Result<()> {
    let flags = Settings {
        pgdata: a.pgdata,
        listen: a.listen,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        token_file: a.token_file,
        max_chunk: a.max_chunk,
        pg_conn: a.pg_conn,
        quic_listen: a.quic_listen,
        metrics_listen: a.metrics_listen,
        client_ca: a.client_ca,
        window: a.window,
        quic_max_connections: a.quic_max_connections,
        quic_max_streams: a.quic_max_streams,
        quic_initial_window: a.quic_initial_window,
        primary_conninfo: a.primary_conninfo,
        wal_summaries: a.no_wal_summaries.then_some(false),
        stall_timeout: a.stall_timeout,
        shutdown_timeout: a.shutdown_timeout,
        log_format: a.log_format,
    };
    let s = match &a.config {
        Some(f) => Settings::read(f)?.overridden_by(flags),
        None => flags,
    };
    log::set_format(s.log_format.unwrap_or_default());
    // Listened for before anything is bound: a SIGTERM during start-up is a shutdown too.
    let mut signals = StopSignals::new()?;
    let systemd = Systemd::from_env()?;
    let pgdata = s
        .pgdata
        .context("no data directory: give -D/--pgdata, or pgdata in the --config file")?;
    let listen = s
        .listen
        .context("no address to listen on: give --listen, or listen in the --config file")?;
    // Port 0 twice is two ports; the same port twice is a start-up that fails late.
    anyhow::ensure!(
        s.metrics_listen
            .is_none_or(|m| m != listen || m.port() == 0),
        "--metrics-listen {listen} is the address of --listen: give the metrics an address \
         of their own"
    );
    let mut config = failback_server::Config::new(&pgdata);
    config.max_chunk = s
        .max_chunk
        .unwrap_or(failback_proto::limits::DEFAULT_MAX_CHUNK);
    config.pg_conn = s.pg_conn;
    if let Some(secs) = s.stall_timeout {
        anyhow::ensure!(secs >= 1, "--stall-timeout must be at least 1 second");
        config.stall_timeout = std::time::Duration::from_secs(secs);
    }
    if let Some(secs) = s.shutdown_timeout {
        config.shutdown_timeout = Duration::from_secs(secs);
    }
    config.primary_conninfo = s.primary_conninfo;
    let limits = failback_server::quic::QuicLimits::default();
    config.window = s.window.unwrap_or(failback_transport::tune::DEFAULT_WINDOW);
    config.quic.max_connections = s.quic_max_connections.unwrap_or(limits.max_connections);
    config.quic.max_streams_per_connection = s
        .quic_max_streams
        .unwrap_or(limits.max_streams_per_connection);
    config.quic.initial_window = s.quic_initial_window.unwrap_or(limits.initial_window);
    if let Some(f) = &s.token_file {
        let t = String::from_utf8(read(f, "token file")?)
            .with_context(|| format!("token file {} is not UTF-8", f.display()))?;
        let t = t.trim().to_string();
        anyhow::ensure!(!t.is_empty(), "token file {} is empty", f.display());
        config.token = Some(t);
    }
    match (&s.tls_cert, &s.tls_key) {
        (Some(c), Some(k)) => config.tls = Some((read(c, "certificate")?, read(k, "key")?)),
        (None, None) => {}
        _ => anyhow::bail!("tls_cert and tls_key go together: give both or neither"),
    }
    anyhow::ensure!(
        config.tls.is_some() || (s.quic_listen.is_none() && s.client_ca.is_none()),
        "QUIC (--quic-listen) and client certificates (--client-ca) need TLS: give --tls-cert \
         and --tls-key"
    );
    if let Some(f) = &s.client_ca {
        config.client_ca = Some(read(f, "client CA certificate")?);
    }
    config.check()?;
    failback_server::startup::check_data_directory(&pgdata)?;
    if let Some(pg_conn) = config.pg_conn.clone() {
        let dir = pgdata.clone();
        tokio::task::spawn_blocking(move || {
            failback_server::startup::check_pg_conn(&pg_conn, &dir)
        })
        .await
        .context("the --pg-conn check failed")??;
    }
    if config.tls.is_none() {
        log::warning(&format!(
            "serving without TLS: the data directory's bytes{} cross the network in clear \
             text; give --tls-cert and --tls-key",
            if config.token.is_some() {
                " and the token"
            } else {
                ""
            }
        ));
    }
    if config.token.is_none() && config.client_ca.is_none() {
        log::warning(&format!(
            "serving without a token or client certificates: whoever reaches {listen} can \
             read the data directory; give --token-file (or --client-ca)"
        ));
    }
    if config.pg_conn.is_none()
        && let Some(pid) = failback_datadir::postmaster::running_postmaster(&pgdata)
    {
        log::warning(&format!(
            "PostgreSQL is running on {} (PID {pid}) and --pg-conn is not set: rewinds from \
             it will be refused until failbackd is restarted with --pg-conn",
            pgdata.display()
        ));
    }
    // Kept until failbackd ends: dropping it stops the thread.
    let _summarizer = s.wal_summaries.unwrap_or(true).then(|| {
        let summaries = std::sync::Arc::new(failback_datadir::summaries::WalSummaries::new());
        config.wal_summaries = Some(summaries.clone());
        failback_server::summarizer::spawn(
            failback_datadir::DataDir::new(&pgdata),
            summaries,
            failback_server::summarizer::INTERVAL,
            |level, m| log::event(level, m, &[("event", "wal_summaries".into())]),
        )
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let mut serving = format!("serving {} on {}", pgdata.display(), listener.local_addr()?);
    log::info(&format!(
        "{serving}{}",
        if config.pg_conn.is_some() {
            " (live source, --pg-conn)"
        } else {
            ""
        }
    ));
    // Both transports stop on the first SIGTERM or Ctrl-C.
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let (drain, limit, metrics) = (
        config.drain.clone(),
        config.shutdown_timeout,
        config.metrics.clone(),
    );
    let shutdown = |mut rx: tokio::sync::broadcast::Receiver<()>| async move {
        let _ = rx.recv().await;
    };
    let quic = match s.quic_listen {
        None => None,
        Some(addr) => {
            let socket = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("could not listen on UDP {addr}"))?;
            log::info(&format!(
                "serving {} over QUIC on {}",
                pgdata.display(),
                socket.local_addr()?
            ));
            serving.push_str(&format!(" and over QUIC on {}", socket.local_addr()?));
            Some(tokio::spawn(failback_server::quic::serve_quic(
                socket,
                config.clone(),
                shutdown(stop.subscribe()),
            )))
        }
    };
    if let Some(addr) = s.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("could not listen on {addr} for --metrics-listen"))?;
        log::info(&format!(
            "metrics on http://{}/metrics",
            listener.local_addr()?
        ));
        // Served until failbackd exits, not only until shutdown begins: /ready answers 503
        // while the replies in flight drain, and their counts can still be scraped.
        tokio::spawn(failback_server::metrics::serve_metrics(
            listener,
            config.metrics.clone(),
            std::future::pending(),
        ));
    }
    // Every listener is bound: /ready says so until shutdown begins.
    config.metrics.set_ready(true);
    let mut grpc = tokio::spawn(failback_server::serve(
        listener,
        config,
        shutdown(stop.subscribe()),
    ));
    // Without QUIC, a stand-in that ends with the rest.
    let mut quic = quic.unwrap_or_else(|| {
        let done = shutdown(stop.subscribe());
        tokio::spawn(async move {
            done.await;
            Ok(())
        })
    });
    // Every listener is bound and the checks passed: clients may come.
    systemd.tell(&format!("READY=1\nSTATUS={}", status_line(&serving)));
    // Whichever ends first (a signal, or a server failing) stops the other.
    let signal = tokio::select! {
        r = &mut grpc => Err((r, true)),
        r = &mut quic => Err((r, false)),
        name = signals.next() => Ok(name),
    };
    metrics.set_ready(false);
    let in_flight = drain.begin();
    let _ = stop.send(());
    let signal = match signal {
        Ok(name) => name,
        Err((first, grpc_first)) => {
            // A server ended on its own: its error is failbackd's, once the other stopped.
            let other = if grpc_first { &mut quic } else { &mut grpc };
            let other = tokio::time::timeout(limit + Duration::from_secs(5), other).await;
            first.context("a server task failed")??;
            if let Ok(r) = other {
                r.context("a server task failed")??;
            }
            anyhow::bail!("a server stopped on its own");
        }
    };
    log::event(
        Level::Info,
        &format!(
            "shutting down ({signal} received): {in_flight} replies in flight, given up to {} s \
             to finish; new requests are refused",
            limit.as_secs()
        ),
        &[
            ("event", "shutting_down".into()),
            ("in_flight", in_flight.into()),
        ],
    );
    systemd.tell(&format!(
        "STOPPING=1\nSTATUS=shutting down: {in_flight} replies in flight"
    ));
    // Each server bounds its own wait by the shutdown timeout; the margin covers QUIC's
    // goodbye to its clients. A second signal cuts it short.
    let both = async {
        let (g, q) = tokio::join!(&mut grpc, &mut quic);
        (g, q)
    };
    let ended = tokio::select! {
        r = tokio::time::timeout(limit + Duration::from_secs(5), both) => r.ok(),
        name = signals.next() => {
            log::warning(&format!("{name} received again: cutting the replies in flight"));
            None
        }
    };
    if let Some((g, q)) = ended {
        g.context("a server task failed")??;
        q.context("a server task failed")??;
    }
    let left = drain.in_flight();
    let msg = if left == 0 {
        "stopped: every reply in flight finished".to_string()
    } else {
        format!(
            "stopped: {left} replies in flight cut (--shutdown-timeout {} s)",
            limit.as_secs()
        )
    };
    log::event(
        Level::Info,
        &msg,
        &[("event", "stopped".into()), ("cut", left.into())],
    );
    Ok(())
}
