//! failbackd over gRPC (`--source grpc://host:port`, `grpcs://` for TLS).
//!
//! Only the transport lives here: a tonic channel (HTTP/2 with the large flow-control windows
//! a long link needs), the bearer token as `authorization` metadata, and the calls. For
//! `grpcs://` the channel runs over a TLS connection made here (tokio-rustls), not by tonic:
//! the client's rustls configuration is [`failback_transport::tls`]'s, the same as QUIC's, so
//! both transports trust failbackd the same ways (`--ca`, a pinned certificate,
//! `--server-fingerprint`) and explain a failed handshake in the same words. Batching, verification and retries are [`super::remote`]'s; a
//! broken connection is replaced by a new one from the same endpoint, and HTTP/2 keep-alives
//! find a silent peer within the liveness that `--timeout` sets.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use failback_proto::v1 as pb;
use failback_proto::v1::failback_client::FailbackClient;
use failback_transport::tls::{
    Dialled, Failure, Fingerprint, Refusals, ServerTrust, client_config, hint, server_name,
    speaks_tls,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::codegen::Service;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
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
    dial: Dial,
    bearer: Bearer,
}

/// How a channel is made: tonic's own TCP connection, or ours with TLS.
#[derive(Clone)]
struct Dial {
    endpoint: Endpoint,
    tls: Option<TlsDial>,
    dialled: Arc<Dialled>,
}

impl Dial {
    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            None => self.endpoint.connect().await,
            Some(tls) => self.endpoint.connect_with_connector(tls.clone()).await,
        }
    }

    /// A failed first call in words, when TLS (or the lack of it) is why.
    async fn explain(&self, s: Status) -> Status {
        match &self.tls {
            Some(tls) => {
                // TLS 1.3 lets the client finish its handshake before failbackd has checked
                // the client's certificate: a refusal arrives as an alert at the first call.
                // hyper reports a connection that broke under a call as the call cancelled:
                // the TLS error is what the connection kept of it.
                let broke = tls.broke.lock().unwrap_or_else(|p| p.into_inner()).take();
                let failure = find::<rustls::Error>(&s)
                    .or(broke.as_ref())
                    .and_then(|e| Failure::from_rustls(e, &tls.refusals));
                match failure {
                    Some(f) => Status::permission_denied(hint(&f, &self.dialled)),
                    None => s,
                }
            }
            None => {
                use tonic::Code;
                // An HTTP/2 preface sent to a TLS port breaks the connection, one way or
                // another: ask the port whether it speaks TLS before saying so.
                let broken = matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                );
                if broken && speaks_tls(&self.dialled.authority, &self.dialled.host).await {
                    Status::failed_precondition(hint(&Failure::ServesTls, &self.dialled))
                } else {
                    s
                }
            }
        }
    }
}

/// Connects TCP and TLS for tonic (`Endpoint::connect_with_connector`), with the server's
/// name in SNI; a refused handshake becomes [`TlsRefused`].
#[derive(Clone)]
struct TlsDial {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    authority: String,
    refusals: Refusals,
    dialled: Arc<Dialled>,
    /// The TLS error that broke the last connection after its handshake, if one did.
    broke: Broke,
}

type Broke = Arc<std::sync::Mutex<Option<rustls::Error>>>;

/// A TLS connection that keeps the TLS error that breaks it: TLS 1.3 delivers failbackd's
/// refusal of the client's certificate after the handshake, as an alert the next read meets,
/// and hyper tells the call in flight only that it was cancelled.
struct Watched {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    broke: Broke,
    /// A write that failed, held back until its connection's last words are read.
    write_failed: Option<std::io::Error>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let read = Pin::new(&mut me.tls).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &read
            && let Some(t) = find::<rustls::Error>(e)
        {
            *me.broke.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
        }
        read
    }
}

impl Watched {
    /// A write failed because failbackd closed the connection: if failbackd refused the
    /// client, it said why first, and its alert sits unread before the close (failbackd
    /// closes with the client's HTTP/2 preface unread, so the kernel resets the connection, and
    /// hyper gives up on a failed write without reading again). The write's error is held back
    /// until a read has met the alert, the end, or an error of its own; the reads wait for the
    /// socket to be readable, which a closed connection soon is. The connection is broken, so
    /// whatever else is read is of no use.
    fn last_words<T>(
        &mut self,
        cx: &mut Context<'_>,
        wrote: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        match wrote {
            Poll::Ready(Err(e)) if matches!(e.kind(), BrokenPipe | ConnectionReset) => {
                self.write_failed = Some(e);
            }
            other => return other,
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut *self), cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                Poll::Ready(_) => {
                    let e = self.write_failed.take();
                    return Poll::Ready(Err(e.unwrap_or_else(|| BrokenPipe.into())));
                }
            }
        }
    }

    /// The write to do, or the failed write whose last words are still being read.
    fn write<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(
            Pin<&mut tokio_rustls::client::TlsStream<TcpStream>>,
            &mut Context<'_>,
        ) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        let wrote = match self.write_failed.take() {
            Some(e) => Poll::Ready(Err(e)),
            None => write(Pin::new(&mut self.tls), cx),
        };
        self.last_words(cx, wrote)
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().write(cx, |tls, cx| tls.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .write(cx, |tls, cx| tls.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().write(cx, |tls, cx| tls.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// A TLS handshake with failbackd failed: what to do, in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TlsRefused(String);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for TlsDial {
    type Response = TokioIo<Watched>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let d = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&d.authority).await?;
            // As tonic's own connector: a reply's trailers must not wait for a delayed ACK.
            tcp.set_nodelay(true)?;
            match d.connector.connect(d.name.clone(), tcp).await {
                Ok(tls) => Ok(TokioIo::new(Watched {
                    tls,
                    broke: d.broke.clone(),
                    write_failed: None,
                })),
                Err(e) => {
                    let failure = match find::<rustls::Error>(&e) {
                        Some(r) => Failure::from_rustls(r, &d.refusals),
                        // Closed in the middle of the handshake, with no alert: what a plain
                        // HTTP/2 server does with a ClientHello.
                        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            Some(Failure::NotTls)
                        }
                        None => d.refusals.take().map(Failure::Refused),
                    };
                    Err(match failure {
                        Some(f) => Box::new(TlsRefused(hint(&f, &d.dialled))) as BoxError,
                        None => Box::new(e),
                    })
                }
            }
        })
    }
}

/// The first error of type `T` in `e`'s chain, looking inside I/O errors (whose `source`
/// skips the error they wrap).
fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(t) = inner.downcast_ref::<T>() {
                return Some(t);
            }
            if let Some(t) = find::<T>(inner) {
                return Some(t);
            }
        }
        next = e.source();
    }
    None
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
        match self.c().handshake(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.dial.explain(s).await),
        }
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
                let channel = tokio::time::timeout(CONNECT_TIMEOUT, self.dial.connect());
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
        GrpcSource::connect_with(opts, None)
    }

    /// Connects, over `grpcs://` trusting failbackd by `--ca` or, given, by its certificate's
    /// fingerprint (`--server-fingerprint`), and shakes hands.
    pub fn connect_with(
        opts: GrpcOptions,
        fingerprint: Option<Fingerprint>,
    ) -> Result<GrpcSource, SourceError> {
        let tls = match opts.url.scheme {
            Scheme::Grpc => false,
            Scheme::Grpcs => true,
            Scheme::Quic => return Err(opts.refuse("a quic:// source is not reached over gRPC")),
        };
        // http:// even with TLS: tonic is handed a TLS connection by our connector, and would
        // want its own TLS settings for an https:// URL.
        let http = format!("http://{}", opts.url.authority);
        let window = DEFAULT_WINDOW;
        let endpoint = Endpoint::from_shared(http)
            .map_err(|e| opts.refuse(format!("not a valid address: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(opts.patience.liveness() / 3)
            .keep_alive_timeout(opts.patience.liveness())
            .keep_alive_while_idle(true)
            .initial_stream_window_size(window)
            .initial_connection_window_size(window);
        let dialled = Arc::new(Dialled {
            url: opts.url.to_string(),
            host: opts.url.host.clone(),
            authority: opts.url.authority.clone(),
            grpc: true,
            ca: opts.ca.is_some(),
            fingerprint: fingerprint.is_some(),
            identity: opts.identity.is_some(),
        });
        let tls = if tls {
            let trust = ServerTrust::new(opts.ca.as_deref(), fingerprint)
                .map_err(|e| opts.refuse(format!("grpcs:// runs TLS: {e}")))?;
            let identity = opts.identity_pem();
            let (config, refusals) = client_config(&trust, identity, b"h2")
                .map_err(|e| opts.refuse(format!("TLS configuration: {e}")))?;
            let name = server_name(&opts.url.host)
                .ok_or_else(|| opts.refuse("the host is neither a DNS name nor an address"))?;
            Some(TlsDial {
                connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
                name,
                authority: opts.url.authority.clone(),
                refusals,
                dialled: dialled.clone(),
                broke: Broke::default(),
            })
        } else if opts.ca.is_some() || opts.identity.is_some() || fingerprint.is_some() {
            return Err(opts.refuse(
                "--ca, --server-fingerprint, --cert and --key are for grpcs:// and quic:// \
                 sources: this grpc:// URL has no TLS",
            ));
        } else {
            None
        };
        let dial = Dial {
            endpoint,
            tls,
            dialled,
        };
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
            let channel =
                rt.block_on(dial.connect())
                    .map_err(|e| match find::<TlsRefused>(&e) {
                        Some(words) => SourceError::Refused {
                            what: opts.url.to_string(),
                            reason: words.0.clone(),
                        },
                        None => SourceError::Transport(format!(
                            "{}: could not connect: {}",
                            opts.url,
                            chain(&e)
                        )),
                    })?;
            transports.push(GrpcTransport {
                current: Arc::new(Current::new(client(channel, bearer.clone()))),
                dial: dial.clone(),
                bearer: bearer.clone(),
            });
        }
        RemoteSource::handshake(rt, transports, opts)
    }
}
