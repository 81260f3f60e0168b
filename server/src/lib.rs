//! failbackd: answers questions about one PostgreSQL data directory; decides nothing.
//!
//! [`serve`] runs the gRPC service on a listener the caller bound, and [`quic::serve_quic`] the
//! same service over QUIC on a bound UDP socket, each until a shutdown future completes, so
//! tests start them on port 0 and the binary on `--listen` / `--quic-listen`.
//!
//! What it reads comes through `failback-datadir` (confined to the data directory), what it
//! asks a running server through `failback-sql`, and both transports are tuned for long fat
//! links by `failback-transport` ([`failback_transport::tune`]).

pub mod audit;
pub mod cli;
pub mod config;
pub mod live;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod quic;
pub mod readers;
pub mod service;
pub mod shutdown;
pub mod startup;
pub mod summarizer;
pub mod window;

use std::future::Future;
use std::path::PathBuf;

use failback_proto::v1::failback_server::FailbackServer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use failback_proto::limits::{DEFAULT_MAX_CHUNK, MAX_MAX_CHUNK, MAX_REPLY, MAX_REQUEST};
use failback_transport::tune::{DEFAULT_WINDOW, MAX_WINDOW, MIN_INITIAL_WINDOW, MIN_WINDOW};

use crate::service::{FailbackService, GrpcAuth, TokenCheck};

/// Locks `m`, whether or not a thread panicked holding it: every lock of failbackd guards
/// bookkeeping that each holder leaves consistent before it can panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The most a client may send failbackd on one gRPC stream before it is read: a request of
/// [`MAX_REQUEST`] crosses in one window.
const REQUEST_WINDOW: u32 = MAX_REQUEST as u32;

/// What failbackd serves and how.
#[derive(Clone, Debug)]
pub struct Config {
    pub pgdata: PathBuf,
    /// Bearer token every call must carry; `None` lets every caller in.
    pub token: Option<String>,
    /// PEM certificate chain and private key; `None` serves plain HTTP/2.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// The most raw bytes per chunk (1 .. [`MAX_MAX_CHUNK`]).
    pub max_chunk: u64,
    /// PEM CA certificate(s): when set, a client must present a certificate signed by one of
    /// them, on both transports (needs `tls`).
    pub client_ca: Option<Vec<u8>>,
    /// Flow-control window in bytes, per stream and per connection (HTTP/2 and QUIC).
    pub window: u32,
    /// Limits of the QUIC listener.
    pub quic: quic::QuicLimits,
    /// A local connection string to the PostgreSQL server running on `pgdata` (`--pg-conn`):
    /// with it failbackd serves a live source (its end of WAL, its current timeline).
    pub pg_conn: Option<String>,
    /// How standbys reach the server (libpq keywords), told to clients for `-R`; by default
    /// the port the running server listens on and the user of `pg_conn`.
    pub primary_conninfo: Option<String>,
    /// What each completed WAL segment of `pgdata` changed, kept up to date by a thread of
    /// failbackd's own ([`summarizer`]); `None` decodes the WAL for every request.
    pub wal_summaries: Option<std::sync::Arc<failback_datadir::summaries::WalSummaries>>,
    /// Where refused and abusive clients are logged (rate-limited), by both transports.
    pub audit: std::sync::Arc<audit::Audit>,
    /// How long a reply may wait for a client that reads nothing, while other requests wait
    /// for a reader slot, before its stream is ended ([`readers`]).
    pub stall_timeout: std::time::Duration,
    /// What both transports count as they serve, exposed by [`metrics::serve_metrics`].
    pub metrics: std::sync::Arc<metrics::Metrics>,
    /// Shutdown under way and the replies in flight, shared by both transports
    /// ([`shutdown`]).
    pub drain: std::sync::Arc<shutdown::Drain>,
    /// How long the replies in flight when shutdown begins may take to finish before they are
    /// cut (`--shutdown-timeout`).
    pub shutdown_timeout: std::time::Duration,
}

impl Config {
    pub fn new(pgdata: impl Into<PathBuf>) -> Self {
        Config {
            pgdata: pgdata.into(),
            token: None,
            tls: None,
            max_chunk: DEFAULT_MAX_CHUNK,
            client_ca: None,
            window: DEFAULT_WINDOW,
            quic: quic::QuicLimits::default(),
            pg_conn: None,
            primary_conninfo: None,
            wal_summaries: None,
            audit: Default::default(),
            stall_timeout: readers::DEFAULT_STALL_TIMEOUT,
            metrics: Default::default(),
            drain: Default::default(),
            shutdown_timeout: shutdown::DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--max-chunk {0} is out of range (1 .. {MAX_MAX_CHUNK})")]
    MaxChunk(u64),
    #[error("TLS configuration refused")]
    Tls(#[source] tonic::transport::Error),
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
    #[error("--window {0} is out of range ({MIN_WINDOW} .. {MAX_WINDOW})")]
    Window(u32),
    #[error("--quic-max-connections and --quic-max-streams must be at least 1")]
    QuicLimits,
    #[error(
        "--quic-initial-window {0} is out of range ({min} .. {MAX_WINDOW})",
        min = MIN_INITIAL_WINDOW
    )]
    QuicInitialWindow(u64),
    #[error("--client-ca needs --tls-cert and --tls-key: client certificates are checked by TLS")]
    ClientCaWithoutTls,
    #[error("QUIC needs TLS: give --tls-cert and --tls-key")]
    QuicWithoutTls,
    #[error("QUIC TLS configuration refused: {0}")]
    QuicTls(String),
    #[error("QUIC socket: {0}")]
    QuicSocket(#[source] std::io::Error),
}

impl Config {
    /// Refuses settings out of range or that contradict each other.
    pub fn check(&self) -> Result<(), ServeError> {
        if self.max_chunk == 0 || self.max_chunk > MAX_MAX_CHUNK {
            return Err(ServeError::MaxChunk(self.max_chunk));
        }
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&self.window) {
            return Err(ServeError::Window(self.window));
        }
        if self.quic.max_connections == 0 || self.quic.max_streams_per_connection == 0 {
            return Err(ServeError::QuicLimits);
        }
        if !(MIN_INITIAL_WINDOW..=u64::from(MAX_WINDOW)).contains(&self.quic.initial_window) {
            return Err(ServeError::QuicInitialWindow(self.quic.initial_window));
        }
        if self.client_ca.is_some() && self.tls.is_none() {
            return Err(ServeError::ClientCaWithoutTls);
        }
        Ok(())
    }
}

/// Serves `config.pgdata` on `listener` until `shutdown` completes; then, as [`shutdown`]
/// describes, refuses new connections and requests and waits for the replies in flight, for
/// at most `config.shutdown_timeout`. Connections still open then are left to the caller
/// (failbackd exits).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.check()?;
    let svc = metrics::Metered::new(FailbackService::for_config(&config), config.metrics.clone());
    // Requests are small (lists of ranges); a chunk is at most max_chunk plus framing.
    let svc = FailbackServer::new(svc)
        .max_decoding_message_size(MAX_REQUEST)
        .max_encoding_message_size(MAX_REPLY);
    let auth = GrpcAuth {
        token: TokenCheck::new(config.token),
        audit: config.audit.clone(),
    };
    let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);
    let svc = shutdown::Draining::new(svc, config.drain.clone());
    let (drain, limit) = (config.drain.clone(), config.shutdown_timeout);
    let shutdown = {
        let drain = drain.clone();
        async move {
            shutdown.await;
            drain.begin();
        }
    };
    let _flush = audit::flush_every_second(config.audit.clone());
    // What the server's windows bound is what clients may send it before it reads: requests,
    // small, and checked for their token only once their headers are in. Replies flow in
    // the client's windows.
    let mut builder = Server::builder()
        .initial_stream_window_size(config.window.min(REQUEST_WINDOW))
        .initial_connection_window_size(config.window.min(4 * REQUEST_WINDOW))
        .max_concurrent_streams(quic::QuicLimits::default().max_streams_per_connection)
        // A peer that vanished without closing its connection is found and dropped.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    if let Some((cert, key)) = config.tls {
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = config.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls).map_err(ServeError::Tls)?;
    }
    let serving = builder
        .add_service(svc)
        // Without TCP_NODELAY a reply's last small frame (the trailers after the message)
        // waits for the client's delayed ACK, 40 ms on Linux: every unary call cost that.
        .serve_with_incoming_shutdown(
            metrics::count_connections(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                config.metrics.clone(),
            ),
            shutdown,
        );
    // tonic waits for every connection to end, however long its replies take: the bound is
    // ours.
    tokio::select! {
        r = serving => r.map_err(ServeError::Transport),
        () = async {
            drain.stopping().await;
            tokio::time::sleep(limit).await;
        } => Ok(()),
    }
}
