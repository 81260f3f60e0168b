//! failbackd: answers questions about one PostgreSQL data directory; decides nothing.
//!
//! [`serve`] runs the gRPC service on a listener the caller bound, until a shutdown future
//! completes, so tests start it on port 0 and the binary on `--listen`.

pub mod config;
pub mod datadir;
pub mod live;
pub mod service;

use std::future::Future;
use std::path::PathBuf;

use failback_proto::v1::failback_server::FailbackServer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::datadir::DataDir;
use crate::service::{FailbackService, TokenCheck};

/// The default and the largest chunk failbackd sends, in raw bytes.
pub const DEFAULT_MAX_CHUNK: u64 = 1 << 20;
pub const MAX_MAX_CHUNK: u64 = 16 << 20;

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
    /// A local connection string to the PostgreSQL server running on `pgdata` (`--pg-conn`):
    /// with it failbackd serves a live source (its end of WAL, its current timeline).
    pub pg_conn: Option<String>,
}

impl Config {
    pub fn new(pgdata: impl Into<PathBuf>) -> Self {
        Config {
            pgdata: pgdata.into(),
            token: None,
            tls: None,
            max_chunk: DEFAULT_MAX_CHUNK,
            pg_conn: None,
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
}

/// Serves `config.pgdata` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if config.max_chunk == 0 || config.max_chunk > MAX_MAX_CHUNK {
        return Err(ServeError::MaxChunk(config.max_chunk));
    }
    let svc = FailbackService::new(DataDir::new(config.pgdata), config.max_chunk)
        .with_pg_conn(config.pg_conn);
    // Requests are small (lists of ranges); a chunk is at most max_chunk plus framing.
    let svc = FailbackServer::new(svc)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size((MAX_MAX_CHUNK + (1 << 16)) as usize);
    let svc =
        tonic::service::interceptor::InterceptedService::new(svc, TokenCheck::new(config.token));
    let mut builder = Server::builder();
    if let Some((cert, key)) = config.tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(ServeError::Tls)?;
    }
    builder
        .add_service(svc)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
        .map_err(ServeError::Transport)
}
