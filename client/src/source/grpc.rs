//! failbackd over gRPC (`--source grpc://host:port`, `grpcs://` for TLS).
//!
//! Only the transport lives here: a tonic channel (HTTP/2, rustls for `grpcs://`, with the
//! large flow-control windows a long link needs), the bearer token as `authorization`
//! metadata, and the calls. Batching, verification and retries are [`super::remote`]'s; a
//! broken connection is replaced by a new one from the same endpoint, and HTTP/2 keep-alives
//! find a silent peer within the liveness that `--timeout` sets.

use std::sync::Arc;

use failback_proto::v1 as pb;
use failback_proto::v1::failback_client::FailbackClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::SourceError;
use super::remote::{
    CONNECT_TIMEOUT, ChunkStream, Current, Held, RemoteOptions, RemoteSource, Transport, chain,
    runtime,
};
use failback_proto::limits::MAX_REPLY;
use failback_transport::tune::DEFAULT_WINDOW;
use failback_transport::url::Scheme;

/// How to reach failbackd over gRPC.
pub type GrpcOptions = RemoteOptions;

/// failbackd over gRPC.
pub type GrpcSource = RemoteSource<GrpcTransport>;

#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

type Client = FailbackClient<InterceptedService<Channel, Bearer>>;

/// A tonic client with the token attached to every call, and how to connect it again.
#[derive(Clone)]
pub struct GrpcTransport {
    current: Arc<Current<Client>>,
    endpoint: Endpoint,
    bearer: Bearer,
}

fn client(channel: Channel, bearer: Bearer) -> Client {
    FailbackClient::with_interceptor(channel, bearer).max_decoding_message_size(MAX_REPLY)
}

impl GrpcTransport {
    fn c(&self) -> Client {
        self.current.get()
    }
}

impl ChunkStream for tonic::Streaming<pb::Chunk> {
    async fn next(&mut self) -> Result<Option<pb::Chunk>, Status> {
        self.message().await
    }
}

impl Transport for GrpcTransport {
    type Chunks = tonic::Streaming<pb::Chunk>;

    async fn handshake(&self, req: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, Status> {
        Ok(self.c().handshake(req).await?.into_inner())
    }

    async fn control_file(&self) -> Result<pb::ControlFileResponse, Status> {
        Ok(self
            .c()
            .control_file(pb::ControlFileRequest {})
            .await?
            .into_inner())
    }

    async fn list_files(&self) -> Result<Vec<pb::FileEntry>, Status> {
        let mut s = self
            .c()
            .list_files(pb::ListFilesRequest {})
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(e) = s.message().await? {
            out.push(e);
        }
        Ok(out)
    }

    async fn read_ranges(&self, req: pb::ReadRangesRequest) -> Result<Self::Chunks, Status> {
        Ok(self.c().read_ranges(req).await?.into_inner())
    }

    async fn timelines(&self) -> Result<pb::TimelinesResponse, Status> {
        Ok(self
            .c()
            .timelines(pb::TimelinesRequest {})
            .await?
            .into_inner())
    }

    async fn chunk_hashes(
        &self,
        req: pb::ChunkHashesRequest,
    ) -> Result<Vec<pb::FileHashes>, Status> {
        let mut s = self.c().chunk_hashes(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(h) = s.message().await? {
            out.push(h);
        }
        Ok(out)
    }

    async fn backup_window(
        &self,
        req: pb::BackupWindowRequest,
    ) -> Result<(pb::BackupWindowReply, Held), Status> {
        let mut s = self.c().backup_window(req).await?.into_inner();
        let first = s
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("failbackd ended the window's call at once"))?;
        Ok((first, Box::new(s)))
    }

    async fn end_backup_window(
        &self,
        req: pb::EndBackupWindowRequest,
    ) -> Result<pb::EndBackupWindowResponse, Status> {
        Ok(self.c().end_backup_window(req).await?.into_inner())
    }

    async fn changes(&self, req: pb::ChangesRequest) -> Result<Vec<pb::ChangesReply>, Status> {
        let mut s = self.c().changes(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(r) = s.message().await? {
            out.push(r);
        }
        Ok(out)
    }

    fn generation(&self) -> u64 {
        self.current.generation()
    }

    async fn reconnect(&self, generation: u64) {
        self.current
            .replace(generation, |_broken| async {
                let channel = tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect());
                Some(client(channel.await.ok()?.ok()?, self.bearer.clone()))
            })
            .await;
    }

    async fn end_of_wal(&self) -> Result<pb::EndOfWalResponse, Status> {
        Ok(self
            .c()
            .end_of_wal(pb::EndOfWalRequest {})
            .await?
            .into_inner())
    }
}

impl RemoteSource<GrpcTransport> {
    /// Connects and shakes hands: the protocol version must match.
    pub fn connect(opts: GrpcOptions) -> Result<GrpcSource, SourceError> {
        let tls = match opts.url.scheme {
            Scheme::Grpc => false,
            Scheme::Grpcs => true,
            Scheme::Quic => return Err(opts.refuse("a quic:// source is not reached over gRPC")),
        };
        let http = format!(
            "{}://{}",
            if tls { "https" } else { "http" },
            opts.url.authority
        );
        let window = DEFAULT_WINDOW;
        let mut endpoint = Endpoint::from_shared(http)
            .map_err(|e| opts.refuse(format!("not a valid address: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(opts.patience.liveness() / 3)
            .keep_alive_timeout(opts.patience.liveness())
            .keep_alive_while_idle(true)
            .initial_stream_window_size(window)
            .initial_connection_window_size(window);
        if tls {
            let ca = opts
                .ca
                .clone()
                .ok_or_else(|| opts.refuse("grpcs:// needs --ca"))?;
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(opts.url.host.clone());
            if let Some((cert, key)) = &opts.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| opts.refuse(format!("TLS configuration: {e}")))?;
        } else if opts.ca.is_some() || opts.identity.is_some() {
            return Err(opts.refuse("--ca, --cert and --key are for grpcs:// and quic:// sources"));
        }
        let bearer = Bearer(match &opts.token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| opts.refuse("the token is not printable ASCII"))?,
            ),
        });
        let rt = runtime("gRPC")?;
        // Each connect() is a TCP connection (and TLS session) of its own.
        let mut transports = Vec::with_capacity(opts.connections.max(1));
        for _ in 0..opts.connections.max(1) {
            let channel = rt.block_on(endpoint.connect()).map_err(|e| {
                SourceError::Transport(format!("{}: could not connect: {}", opts.url, chain(&e)))
            })?;
            transports.push(GrpcTransport {
                current: Arc::new(Current::new(client(channel, bearer.clone()))),
                endpoint: endpoint.clone(),
                bearer: bearer.clone(),
            });
        }
        RemoteSource::handshake(rt, transports, opts)
    }
}
