//! `failbackd`: serves one shut-down PostgreSQL data directory, read-only, over gRPC and,
//! with `--quic-listen`, over QUIC too.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(name = "failbackd", version, about, long_about = None)]
struct Args {
    /// The data directory to serve (read-only).
    #[arg(short = 'D', long, value_name = "DIR")]
    pgdata: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7432.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Also serve QUIC on this UDP address, e.g. 0.0.0.0:7433 (needs --tls-cert/--tls-key).
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    quic_listen: Option<SocketAddr>,
    /// PEM CA certificate: only clients presenting a certificate signed by it are served, on
    /// both transports (needs --tls-cert/--tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// PEM certificate chain; with --tls-key, serve TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File holding the bearer token every client must present.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Flow-control window per stream and per connection, both transports (64 KiB .. 1 GiB).
    #[arg(long, value_name = "BYTES", default_value_t = failback_server::DEFAULT_WINDOW)]
    window: u32,
    /// QUIC connections served at once; more are refused.
    #[arg(long, value_name = "N", requires = "quic_listen",
          default_value_t = failback_server::quic::QuicLimits::default().max_connections)]
    quic_max_connections: usize,
    /// Requests one QUIC connection may have open at once.
    #[arg(long, value_name = "N", requires = "quic_listen",
          default_value_t = failback_server::quic::QuicLimits::default().max_streams_per_connection)]
    quic_max_streams: u32,
    /// The most raw bytes per chunk sent.
    #[arg(long, value_name = "BYTES", default_value_t = failback_server::DEFAULT_MAX_CHUNK)]
    max_chunk: u64,
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("could not read {what} {}", path.display()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let mut config = failback_server::Config::new(&a.pgdata);
    config.max_chunk = a.max_chunk;
    config.window = a.window;
    config.quic.max_connections = a.quic_max_connections;
    config.quic.max_streams_per_connection = a.quic_max_streams;
    if let Some(f) = &a.token_file {
        let t = String::from_utf8(read(f, "token file")?)
            .with_context(|| format!("token file {} is not UTF-8", f.display()))?;
        let t = t.trim().to_string();
        anyhow::ensure!(!t.is_empty(), "token file {} is empty", f.display());
        config.token = Some(t);
    }
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        config.tls = Some((read(c, "certificate")?, read(k, "key")?));
    }
    if let Some(f) = &a.client_ca {
        config.client_ca = Some(read(f, "client CA certificate")?);
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("could not listen on {}", a.listen))?;
    eprintln!(
        "failbackd: serving {} on {}",
        a.pgdata.display(),
        listener.local_addr()?
    );
    // Both transports stop on the first Ctrl-C.
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let shutdown = |mut rx: tokio::sync::broadcast::Receiver<()>| async move {
        let _ = rx.recv().await;
    };
    let quic = match a.quic_listen {
        None => None,
        Some(addr) => {
            let socket = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("could not listen on UDP {addr}"))?;
            eprintln!(
                "failbackd: serving {} over QUIC on {}",
                a.pgdata.display(),
                socket.local_addr()?
            );
            Some(tokio::spawn(failback_server::quic::serve_quic(
                socket,
                config.clone(),
                shutdown(stop.subscribe()),
            )))
        }
    };
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
