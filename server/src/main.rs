//! `failbackd`: serves one PostgreSQL data directory, read-only, over gRPC and, with
//! `--quic-listen`, over QUIC too; with `--pg-conn`, also while PostgreSQL runs on it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use failback_server::cli::Args;
use failback_server::config::Settings;

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("could not read {what} {}", path.display()))
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
        .and_then(|rt| rt.block_on(serve(a)));
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // As failback reports its errors: the chain, outermost first, never a debug dump.
            eprintln!(
                "{}",
                failback_common::errors::error_message("failbackd", e.as_ref())
            );
            ExitCode::FAILURE
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
    };
    let s = match &a.config {
        Some(f) => Settings::read(f)?.overridden_by(flags),
        None => flags,
    };
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
    failback_datadir::check_data_directory(&pgdata)?;
    if config.tls.is_none() {
        eprintln!(
            "failbackd: warning: serving without TLS: the data directory's bytes{} cross the \
             network in clear text; give --tls-cert and --tls-key",
            if config.token.is_some() {
                " and the token"
            } else {
                ""
            }
        );
    }
    if config.token.is_none() && config.client_ca.is_none() {
        eprintln!(
            "failbackd: warning: serving without a token or client certificates: whoever \
             reaches {listen} can read the data directory; give --token-file (or --client-ca)"
        );
    }
    if config.pg_conn.is_none()
        && let Some(pid) = failback_datadir::postmaster::running_postmaster(&pgdata)
    {
        eprintln!(
            "failbackd: warning: PostgreSQL is running on {} (PID {pid}) and --pg-conn is \
             not set: rewinds from it will be refused until failbackd is restarted with \
             --pg-conn",
            pgdata.display()
        );
    }
    // Kept until failbackd ends: dropping it stops the thread.
    let _summarizer = s.wal_summaries.unwrap_or(true).then(|| {
        let summaries = std::sync::Arc::new(failback_datadir::summaries::WalSummaries::new());
        config.wal_summaries = Some(summaries.clone());
        failback_server::summarizer::spawn(
            failback_datadir::DataDir::new(&pgdata),
            summaries,
            failback_server::summarizer::INTERVAL,
            |m| eprintln!("failbackd: {m}"),
        )
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    eprintln!(
        "failbackd: serving {} on {}{}",
        pgdata.display(),
        listener.local_addr()?,
        if config.pg_conn.is_some() {
            " (live source, --pg-conn)"
        } else {
            ""
        }
    );
    // Both transports stop on the first Ctrl-C.
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let shutdown = |mut rx: tokio::sync::broadcast::Receiver<()>| async move {
        let _ = rx.recv().await;
    };
    let quic = match s.quic_listen {
        None => None,
        Some(addr) => {
            let socket = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("could not listen on UDP {addr}"))?;
            eprintln!(
                "failbackd: serving {} over QUIC on {}",
                pgdata.display(),
                socket.local_addr()?
            );
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
        eprintln!(
            "failbackd: metrics on http://{}/metrics",
            listener.local_addr()?
        );
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
    // Whichever ends first (Ctrl-C, or a server failing) stops the other.
    let (first, other) = tokio::select! {
        r = &mut grpc => (r, quic),
        r = &mut quic => (r, grpc),
        _ = tokio::signal::ctrl_c() => {
            let _ = stop.send(());
            (grpc.await, quic)
        }
    };
    let _ = stop.send(());
    first.context("a server task failed")??;
    other.await.context("a server task failed")??;
    Ok(())
}
