//! `failbackd`: serves one PostgreSQL data directory, read-only, over gRPC; with `--pg-conn`,
//! also while PostgreSQL runs on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use failback_server::config::Settings;

#[derive(Parser)]
#[command(name = "failbackd", version, about, long_about = None)]
struct Args {
    /// TOML file with the same settings as these flags (flags win over it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The data directory to serve (read-only).
    #[arg(short = 'D', long, value_name = "DIR")]
    pgdata: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7432.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// PEM certificate chain; with --tls-key, serve TLS.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// File holding the bearer token every client must present.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The most raw bytes per chunk sent [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    max_chunk: Option<u64>,
    /// Connection string to the PostgreSQL server running on the data directory (local,
    /// any user that may call pg_current_wal_insert_lsn): lets failbackd serve a live source.
    #[arg(long, value_name = "CONNSTR")]
    pg_conn: Option<String>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("could not read {what} {}", path.display()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let flags = Settings {
        pgdata: a.pgdata,
        listen: a.listen,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        token_file: a.token_file,
        max_chunk: a.max_chunk,
        pg_conn: a.pg_conn,
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
    let mut config = failback_server::Config::new(&pgdata);
    config.max_chunk = s.max_chunk.unwrap_or(failback_server::DEFAULT_MAX_CHUNK);
    config.pg_conn = s.pg_conn;
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
    if config.pg_conn.is_none()
        && let Some(pid) = failback_server::live::running_postmaster(&pgdata)
    {
        eprintln!(
            "failbackd: warning: PostgreSQL is running on {} (PID {pid}) and --pg-conn is \
             not set: rewinds from it will be refused until failbackd is restarted with \
             --pg-conn",
            pgdata.display()
        );
    }
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
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    failback_server::serve(listener, config, shutdown).await?;
    Ok(())
}
