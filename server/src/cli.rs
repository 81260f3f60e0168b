//! The command line of `failbackd`, as a library so that its man page and shell completions
//! are generated from the same definitions the binary parses.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "failbackd", version = failback_common::long_version!(), about, long_about = None)]
pub struct Args {
    /// TOML file with the same settings as these flags (flags win over it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory to serve (read-only).
    #[arg(short = 'D', long, value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7432.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Also serve QUIC on this UDP address, e.g. 0.0.0.0:7433 (needs --tls-cert/--tls-key).
    #[arg(long, value_name = "ADDR")]
    pub quic_listen: Option<SocketAddr>,
    /// Serve metrics on this TCP address, e.g. 127.0.0.1:9187, over plain HTTP without a
    /// token: GET /metrics (Prometheus text format), /ready (503 once shutting down) and
    /// /health. Bind it where only the monitoring system reaches it.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM CA certificate: only clients presenting a certificate signed by it are served, on
    /// both transports (needs --tls-cert/--tls-key).
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// PEM certificate chain; with --tls-key, serve TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token every client must present.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Flow-control window per stream and per connection, both transports (64 KiB .. 1 GiB)
    /// [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    pub window: Option<u32>,
    /// QUIC connections served at once; more are refused [default: 64].
    #[arg(long, value_name = "N")]
    pub quic_max_connections: Option<usize>,
    /// Requests one QUIC connection may have open at once [default: 300].
    #[arg(long, value_name = "N")]
    pub quic_max_streams: Option<u32>,
    /// Bytes a new QUIC connection may send before its first acknowledgement, paced over the
    /// first round trip; about one round trip's worth of the link fills it from the start
    /// (14720 .. 1 GiB) [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub quic_initial_window: Option<u64>,
    /// The most raw bytes per chunk sent [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub max_chunk: Option<u64>,
    /// Connection string to the PostgreSQL server running on the data directory (local,
    /// any user that may call pg_current_wal_insert_lsn): lets failbackd serve a live source.
    #[arg(long, value_name = "CONNSTR")]
    pub pg_conn: Option<String>,
    /// What clients write as primary_conninfo for `failback rewind -R` (libpq keywords) [default:
    /// the port the running server listens on and the user of --pg-conn; the client adds the
    /// host it reached failbackd at].
    #[arg(long, value_name = "CONNINFO")]
    pub primary_conninfo: Option<String>,
    /// Seconds a reply may wait for a client that reads nothing before its request is ended,
    /// when other requests wait for a reader slot (a slow client alone is never cut off)
    /// [default: 120].
    #[arg(long, value_name = "SECS")]
    pub stall_timeout: Option<u64>,
    /// Do not summarize the WAL in the background: each rewind then decodes all of the
    /// source's WAL since the divergence (by default failbackd keeps, for each completed WAL
    /// segment, the blocks it changed, and a rewind reads those instead).
    #[arg(long)]
    pub no_wal_summaries: bool,
    /// Seconds the replies in flight may take to finish once SIGTERM or Ctrl-C asked
    /// failbackd to stop (new requests are refused meanwhile, and retried by clients); those
    /// left then are cut [default: 30].
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,
    /// How failbackd writes its lines on standard error: text (`failbackd: ...`) or json (one
    /// object a line: ts, level, msg and fields) [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<crate::log::Format>,
}
