//! failbackd over gRPC (`--source grpc://host:port`, `grpcs://` for TLS).
//!
//! Only the transport lives here: a tonic channel (HTTP/2, rustls for `grpcs://`, with the
//! large flow-control windows a long link needs), the bearer token as `authorization`
//! metadata, and the calls. Batching, verification and retries are [`super::remote`]'s.

use failback_proto::v1 as pb;
use failback_proto::v1::failback_client::FailbackClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::SourceError;
use super::remote::{
    ChunkStream, MAX_REPLY, RemoteOptions, RemoteSource, Transport, chain, runtime,
};

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

/// A tonic client with the token attached to every call.
#[derive(Clone)]
pub struct GrpcTransport(FailbackClient<InterceptedService<Channel, Bearer>>);

impl ChunkStream for tonic::Streaming<pb::Chunk> {
    async fn next(&mut self) -> Result<Option<pb::Chunk>, Status> {
        self.message().await
    }
}

impl Transport for GrpcTransport {
    type Chunks = tonic::Streaming<pb::Chunk>;

    async fn handshake(&self, req: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, Status> {
        Ok(self.0.clone().handshake(req).await?.into_inner())
    }

    async fn control_file(&self) -> Result<pb::ControlFileResponse, Status> {
        Ok(self
            .0
            .clone()
            .control_file(pb::ControlFileRequest {})
            .await?
            .into_inner())
    }

    async fn list_files(&self) -> Result<Vec<pb::FileEntry>, Status> {
        let mut s = self
            .0
            .clone()
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
        Ok(self.0.clone().read_ranges(req).await?.into_inner())
    }

    async fn timelines(&self) -> Result<pb::TimelinesResponse, Status> {
        Ok(self
            .0
            .clone()
            .timelines(pb::TimelinesRequest {})
            .await?
            .into_inner())
    }

    async fn chunk_hashes(
        &self,
        req: pb::ChunkHashesRequest,
    ) -> Result<Vec<pb::FileHashes>, Status> {
        let mut s = self.0.clone().chunk_hashes(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(h) = s.message().await? {
            out.push(h);
        }
        Ok(out)
    }

    async fn end_of_wal(&self) -> Result<pb::EndOfWalResponse, Status> {
        Ok(self
            .0
            .clone()
            .end_of_wal(pb::EndOfWalRequest {})
            .await?
            .into_inner())
    }
}

impl RemoteSource<GrpcTransport> {
    /// Connects and shakes hands: the protocol version must match.
    pub fn connect(opts: GrpcOptions) -> Result<GrpcSource, SourceError> {
        let (tls, rest) = if let Some(r) = opts.url.strip_prefix("grpc://") {
            (false, r)
        } else if let Some(r) = opts.url.strip_prefix("grpcs://") {
            (true, r)
        } else {
            return Err(opts.refuse("the source URL must start with grpc:// or grpcs://"));
        };
        let http = format!("{}://{rest}", if tls { "https" } else { "http" });
        let window = failback_server::DEFAULT_WINDOW;
        let mut endpoint = Endpoint::from_shared(http)
            .map_err(|e| opts.refuse(format!("not a valid address: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .tcp_nodelay(true)
            .initial_stream_window_size(window)
            .initial_connection_window_size(window);
        if tls {
            let ca = opts
                .ca
                .clone()
                .ok_or_else(|| opts.refuse("grpcs:// needs --ca"))?;
            let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(host);
            if let Some((cert, key)) = &opts.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| opts.refuse(format!("TLS configuration: {e}")))?;
        } else if opts.ca.is_some() || opts.identity.is_some() {
            return Err(opts.refuse("--ca, --cert and --key are for grpcs:// and quic:// sources"));
        }
        let bearer = match &opts.token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| opts.refuse("the token is not printable ASCII"))?,
            ),
        };
        let rt = runtime("gRPC")?;
        let channel = rt.block_on(endpoint.connect()).map_err(|e| {
            SourceError::Transport(format!("{}: could not connect: {}", opts.url, chain(&e)))
        })?;
        let client = FailbackClient::with_interceptor(channel, Bearer(bearer))
            .max_decoding_message_size(MAX_REPLY);
        RemoteSource::handshake(rt, GrpcTransport(client), opts)
    }
}
