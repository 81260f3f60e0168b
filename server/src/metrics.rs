//! What failbackd tells a monitoring system: counters and gauges an operator scrapes over HTTP
//! (`--metrics-listen`), in the Prometheus text exposition format (version 0.0.4).
//!
//! Every number lives in one [`Metrics`] of atomics, shared by both transports through
//! [`crate::Config::metrics`]: counting is a relaxed atomic add on the serving path, never a
//! lock. A scrape takes a [`Snapshot`] and [`render`]s it, a pure function of the numbers.
//!
//! Where each number is counted:
//! - requests, their status and the chunks they carried by [`Metered`], a [`Failback`] that
//!   wraps the service both transports serve, so a call is counted once whichever carried it;
//! - requests refused before their call is read (a wrong token, a request that does not
//!   decode) by the transport that refused them, with `kind="unknown"`: failbackd does not
//!   read what an unauthenticated client asks;
//! - refusals by their reason by the audit log ([`crate::audit`]), which hears of each;
//! - connections by the gRPC listener ([`count_connections`]) and the QUIC accept loop.
//!
//! The HTTP side ([`serve_metrics`]) is a minimal HTTP/1.1 responder of its own, so the
//! metrics need no web framework: it reads one request head (bounded in size and time),
//! answers `GET /metrics`, `/ready` and `/health`, and closes the connection. It serves no
//! data and takes no token: bind it to an address only the monitoring system reaches.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use failback_datadir::summaries::WalSummaries;
use failback_proto::v1::failback_server::Failback;
use failback_proto::v1::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Code, Request, Response, Status};

/// The transport a request or connection came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Quic,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Grpc, Transport::Quic];

    pub fn label(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Quic => "quic",
        }
    }

    /// The transport `request` came over: QUIC names its connection in an extension.
    pub fn of<T>(request: &Request<T>) -> Transport {
        match request.extensions().get::<crate::audit::Peer>() {
            Some(_) => Transport::Quic,
            None => Transport::Grpc,
        }
    }
}

/// What a request asks: the calls of `failback.v1.Failback`, and `Unknown` for a request
/// refused before its call was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    ControlFile,
    Timelines,
    ListFiles,
    ReadRanges,
    ChunkHashes,
    EndOfWal,
    Changes,
    BackupWindow,
    EndBackupWindow,
    Unknown,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Handshake,
        Kind::ControlFile,
        Kind::Timelines,
        Kind::ListFiles,
        Kind::ReadRanges,
        Kind::ChunkHashes,
        Kind::EndOfWal,
        Kind::Changes,
        Kind::BackupWindow,
        Kind::EndBackupWindow,
        Kind::Unknown,
    ];

    /// The call's name in the protocol (`unknown` for a request not read).
    pub fn label(self) -> &'static str {
        match self {
            Kind::Handshake => "Handshake",
            Kind::ControlFile => "ControlFile",
            Kind::Timelines => "Timelines",
            Kind::ListFiles => "ListFiles",
            Kind::ReadRanges => "ReadRanges",
            Kind::ChunkHashes => "ChunkHashes",
            Kind::EndOfWal => "EndOfWal",
            Kind::Changes => "Changes",
            Kind::BackupWindow => "BackupWindow",
            Kind::EndBackupWindow => "EndBackupWindow",
            Kind::Unknown => "unknown",
        }
    }
}

/// Why a client was refused or cut off (the `reason` label of `failbackd_refusals_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A missing or wrong bearer token.
    Token,
    /// A QUIC connection whose TLS handshake failed: no or an untrusted client certificate
    /// (`--client-ca`), or a client that does not speak failback's protocol.
    Handshake,
    /// A QUIC handshake not completed in time.
    HandshakeTimeout,
    /// A QUIC connection that sent no request with the right token in time.
    AuthTimeout,
    /// A QUIC connection past `--quic-max-connections`.
    ConnectionLimit,
    /// A QUIC connection, not yet authenticated, that made way for a newer one.
    GaveWay,
    /// A request over one of the protocol's limits (size, ranges, paths).
    OverLimit,
    /// A request that does not decode or asks something meaningless.
    Malformed,
    /// A path outside the data directory (absolute, climbing with `..`, a stray symlink).
    Path,
    /// A QUIC request not sent whole in time.
    RequestTimeout,
    /// A client that read nothing for the stall timeout while others waited for its slot.
    Stalled,
}

impl Refusal {
    pub const ALL: [Refusal; 11] = [
        Refusal::Token,
        Refusal::Handshake,
        Refusal::HandshakeTimeout,
        Refusal::AuthTimeout,
        Refusal::ConnectionLimit,
        Refusal::GaveWay,
        Refusal::OverLimit,
        Refusal::Malformed,
        Refusal::Path,
        Refusal::RequestTimeout,
        Refusal::Stalled,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Token => "token",
            Refusal::Handshake => "tls_handshake",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::AuthTimeout => "auth_timeout",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::GaveWay => "gave_way",
            Refusal::OverLimit => "over_limit",
            Refusal::Malformed => "malformed",
            Refusal::Path => "path",
            Refusal::RequestTimeout => "request_timeout",
            Refusal::Stalled => "stalled",
        }
    }
}

/// The gRPC status codes in their numbering (google.rpc.Code), as label values.
const CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

fn code_index(code: Code) -> usize {
    usize::try_from(code as i32)
        .ok()
        .filter(|&i| i < CODES.len())
        .unwrap_or(Code::Unknown as usize)
}

const T: usize = Transport::ALL.len();
const K: usize = Kind::ALL.len();
const C: usize = CODES.len();
const R: usize = Refusal::ALL.len();

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn load<const N: usize>(c: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| c[i].load(Ordering::Relaxed))
}

/// Every number failbackd exposes, counted as it serves.
#[derive(Debug)]
pub struct Metrics {
    start_time: SystemTime,
    ready: AtomicBool,
    read_bytes: [AtomicU64; T],
    sent_bytes: [AtomicU64; T],
    chunks: [AtomicU64; T],
    requests: [[[AtomicU64; C]; K]; T],
    in_flight: [AtomicU64; T],
    connections: [AtomicU64; T],
    accepted: [AtomicU64; T],
    refusals: [AtomicU64; R],
    summaries: OnceLock<Arc<WalSummaries>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            start_time: SystemTime::now(),
            ready: AtomicBool::new(false),
            read_bytes: counters(),
            sent_bytes: counters(),
            chunks: counters(),
            requests: std::array::from_fn(|_| std::array::from_fn(|_| counters())),
            in_flight: counters(),
            connections: counters(),
            accepted: counters(),
            refusals: counters(),
            summaries: OnceLock::new(),
        }
    }
}

impl Metrics {
    /// Whether failbackd serves (`/ready` answers 200): set once its listeners are bound, and
    /// cleared when it begins to shut down, so a load balancer stops sending clients first.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The WAL summaries whose segment count is exposed (the first ones given are kept).
    pub fn watch_summaries(&self, summaries: Option<Arc<WalSummaries>>) {
        if let Some(s) = summaries {
            let _ = self.summaries.set(s);
        }
    }

    /// A client was refused or cut off for `reason`.
    pub fn refused(&self, reason: Refusal) {
        add(&self.refusals[reason as usize], 1);
    }

    /// A request refused with `code` before its call was read (`kind="unknown"`).
    pub fn unread_request(&self, transport: Transport, code: Code) {
        add(
            &self.requests[transport as usize][Kind::Unknown as usize][code_index(code)],
            1,
        );
    }

    /// A request begins: counted in flight until the returned [`Call`] is dropped, and by its
    /// status then.
    pub fn call(self: &Arc<Self>, transport: Transport, kind: Kind) -> Call {
        add(&self.in_flight[transport as usize], 1);
        Call {
            metrics: self.clone(),
            transport,
            kind,
            done: false,
        }
    }

    /// A connection accepted: counted as connected until the returned guard is dropped.
    pub fn connection(self: &Arc<Self>, transport: Transport) -> ConnectionGuard {
        add(&self.accepted[transport as usize], 1);
        add(&self.connections[transport as usize], 1);
        ConnectionGuard {
            metrics: self.clone(),
            transport,
        }
    }

    fn chunk(&self, transport: Transport, raw: u64, wire: u64) {
        add(&self.chunks[transport as usize], 1);
        add(&self.read_bytes[transport as usize], raw);
        add(&self.sent_bytes[transport as usize], wire);
    }

    /// The numbers as they are now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            start_time: self
                .start_time
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            read_bytes: load(&self.read_bytes),
            sent_bytes: load(&self.sent_bytes),
            chunks: load(&self.chunks),
            requests: std::array::from_fn(|t| std::array::from_fn(|k| load(&self.requests[t][k]))),
            in_flight: load(&self.in_flight),
            connections: load(&self.connections),
            accepted: load(&self.accepted),
            refusals: load(&self.refusals),
            summarized_segments: self.summaries.get().map(|s| s.len() as u64),
        }
    }
}

/// One request being answered; counted by its status when finished or dropped (a request
/// dropped unfinished, its client gone, counts as `cancelled`).
pub struct Call {
    metrics: Arc<Metrics>,
    transport: Transport,
    kind: Kind,
    done: bool,
}

impl Call {
    /// The request ended with `code` (only the first end counts).
    pub fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            add(
                &self.metrics.requests[self.transport as usize][self.kind as usize]
                    [code_index(code)],
                1,
            );
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
        self.metrics.in_flight[self.transport as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection counted as connected while it lives.
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.connections[self.transport as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The numbers of [`Metrics`] at one moment, as [`render`] writes them.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub version: &'static str,
    /// Seconds since the Unix epoch when failbackd started.
    pub start_time: f64,
    pub read_bytes: [u64; T],
    pub sent_bytes: [u64; T],
    pub chunks: [u64; T],
    /// By transport, kind and status code.
    pub requests: [[[u64; C]; K]; T],
    pub in_flight: [u64; T],
    pub connections: [u64; T],
    pub accepted: [u64; T],
    pub refusals: [u64; R],
    /// `None` without background WAL summaries (`--no-wal-summaries`).
    pub summarized_segments: Option<u64>,
}

/// A label value with `\`, `"` and newlines escaped, as the exposition format asks.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric family: its help, its type and its samples (`(labels, value)`).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        match labels.is_empty() {
            true => {
                let _ = writeln!(out, "{name} {value}");
            }
            false => {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    }
}

fn by_transport(values: &[u64; T]) -> Vec<(String, String)> {
    Transport::ALL
        .iter()
        .map(|t| {
            (
                format!("transport=\"{}\"", t.label()),
                values[*t as usize].to_string(),
            )
        })
        .collect()
}

/// `s` in the Prometheus text exposition format, version 0.0.4.
///
/// Every series of a transport, a call or a reason is written, at 0 when nothing happened
/// yet, so that a rate over it starts from the first scrape; of the requests, those that
/// failed are written once a status other than `ok` was seen.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "failbackd_build_info",
        "gauge",
        "The failbackd running, by version; always 1.",
        &[(format!("version=\"{}\"", escape(s.version)), "1".into())],
    );
    family(
        &mut out,
        "failbackd_start_time_seconds",
        "gauge",
        "When failbackd started, in seconds since the Unix epoch.",
        &[(String::new(), format!("{:.3}", s.start_time))],
    );
    family(
        &mut out,
        "failbackd_read_bytes_total",
        "counter",
        "Bytes of data directory files read and served in chunks, before compression.",
        &by_transport(&s.read_bytes),
    );
    family(
        &mut out,
        "failbackd_sent_bytes_total",
        "counter",
        "Bytes of chunk data sent to clients, after compression.",
        &by_transport(&s.sent_bytes),
    );
    family(
        &mut out,
        "failbackd_chunks_total",
        "counter",
        "Chunks of file data sent to clients.",
        &by_transport(&s.chunks),
    );
    let mut requests = Vec::new();
    for t in Transport::ALL {
        for k in Kind::ALL {
            for (c, code) in CODES.iter().enumerate() {
                let n = s.requests[t as usize][k as usize][c];
                if n > 0 || (c == 0 && k != Kind::Unknown) {
                    requests.push((
                        format!(
                            "transport=\"{}\",kind=\"{}\",status=\"{code}\"",
                            t.label(),
                            k.label()
                        ),
                        n.to_string(),
                    ));
                }
            }
        }
    }
    family(
        &mut out,
        "failbackd_requests_total",
        "counter",
        "Requests answered, by transport, call (kind; unknown when refused before the call \
         was read) and status (ok, or the gRPC status code of the error; cancelled when the \
         client went away first).",
        &requests,
    );
    family(
        &mut out,
        "failbackd_requests_in_flight",
        "gauge",
        "Requests being answered now.",
        &by_transport(&s.in_flight),
    );
    family(
        &mut out,
        "failbackd_connections",
        "gauge",
        "Client connections open now (QUIC: once their TLS handshake completed).",
        &by_transport(&s.connections),
    );
    family(
        &mut out,
        "failbackd_connections_accepted_total",
        "counter",
        "Client connections accepted (QUIC: once their TLS handshake completed).",
        &by_transport(&s.accepted),
    );
    let refusals: Vec<_> = Refusal::ALL
        .iter()
        .map(|r| {
            (
                format!("reason=\"{}\"", r.label()),
                s.refusals[*r as usize].to_string(),
            )
        })
        .collect();
    family(
        &mut out,
        "failbackd_refusals_total",
        "counter",
        "Clients refused or cut off, by reason (each is also a line of the audit log).",
        &refusals,
    );
    if let Some(n) = s.summarized_segments {
        family(
            &mut out,
            "failbackd_wal_summarized_segments",
            "gauge",
            "Completed WAL segments of the data directory summarized in the background.",
            &[(String::new(), n.to_string())],
        );
    }
    out
}

/// What a chunk of a reply adds to the byte and chunk counts; only file data counts.
pub trait Observe {
    fn observe(&self, _metrics: &Metrics, _transport: Transport) {}
}

impl Observe for Chunk {
    fn observe(&self, metrics: &Metrics, transport: Transport) {
        metrics.chunk(transport, self.raw_length, self.data.len() as u64);
    }
}
impl Observe for FileEntry {}
impl Observe for FileHashes {}
impl Observe for ChangesReply {}
impl Observe for BackupWindowReply {}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A streaming answer as it leaves: its replies counted, its status when it ends.
struct Observed<S> {
    inner: S,
    call: Call,
}

impl<T: Observe, S: Stream<Item = Result<T, Status>> + Unpin> Stream for Observed<S> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = Pin::new(&mut this.inner).poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(reply))) => reply.observe(&this.call.metrics, this.call.transport),
            Poll::Ready(Some(Err(s))) => this.call.finish(s.code()),
            Poll::Ready(None) => this.call.finish(Code::Ok),
            Poll::Pending => {}
        }
        item
    }
}

/// A [`Failback`] service with every request counted: in flight while answered, then by its
/// kind and status, and the chunks of file data it sent.
pub struct Metered<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Metered { inner, metrics }
    }
}

fn unary<T>(mut call: Call, r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    call.finish(match &r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    });
    r
}

fn streaming<T, S>(
    mut call: Call,
    r: Result<Response<S>, Status>,
) -> Result<Response<BoxStream<T>>, Status>
where
    T: Observe + Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    match r {
        Ok(response) => Ok(response.map(|inner| {
            Box::pin(Observed {
                inner: Box::pin(inner),
                call,
            }) as BoxStream<T>
        })),
        Err(s) => {
            call.finish(s.code());
            Err(s)
        }
    }
}

#[tonic::async_trait]
impl<S: Failback> Failback for Metered<S> {
    async fn handshake(
        &self,
        r: Request<HandshakeRequest>,
    ) -> Result<Response<HandshakeResponse>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::Handshake);
        unary(call, self.inner.handshake(r).await)
    }

    async fn control_file(
        &self,
        r: Request<ControlFileRequest>,
    ) -> Result<Response<ControlFileResponse>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::ControlFile);
        unary(call, self.inner.control_file(r).await)
    }

    async fn timelines(
        &self,
        r: Request<TimelinesRequest>,
    ) -> Result<Response<TimelinesResponse>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::Timelines);
        unary(call, self.inner.timelines(r).await)
    }

    type ListFilesStream = BoxStream<FileEntry>;

    async fn list_files(
        &self,
        r: Request<ListFilesRequest>,
    ) -> Result<Response<Self::ListFilesStream>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::ListFiles);
        streaming(call, self.inner.list_files(r).await)
    }

    type ReadRangesStream = BoxStream<Chunk>;

    async fn read_ranges(
        &self,
        r: Request<ReadRangesRequest>,
    ) -> Result<Response<Self::ReadRangesStream>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::ReadRanges);
        streaming(call, self.inner.read_ranges(r).await)
    }

    type ChunkHashesStream = BoxStream<FileHashes>;

    async fn chunk_hashes(
        &self,
        r: Request<ChunkHashesRequest>,
    ) -> Result<Response<Self::ChunkHashesStream>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::ChunkHashes);
        streaming(call, self.inner.chunk_hashes(r).await)
    }

    async fn end_of_wal(
        &self,
        r: Request<EndOfWalRequest>,
    ) -> Result<Response<EndOfWalResponse>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::EndOfWal);
        unary(call, self.inner.end_of_wal(r).await)
    }

    type ChangesStream = BoxStream<ChangesReply>;

    async fn changes(
        &self,
        r: Request<ChangesRequest>,
    ) -> Result<Response<Self::ChangesStream>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::Changes);
        streaming(call, self.inner.changes(r).await)
    }

    type BackupWindowStream = BoxStream<BackupWindowReply>;

    async fn backup_window(
        &self,
        r: Request<BackupWindowRequest>,
    ) -> Result<Response<Self::BackupWindowStream>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::BackupWindow);
        streaming(call, self.inner.backup_window(r).await)
    }

    async fn end_backup_window(
        &self,
        r: Request<EndBackupWindowRequest>,
    ) -> Result<Response<EndBackupWindowResponse>, Status> {
        let call = self.metrics.call(Transport::of(&r), Kind::EndBackupWindow);
        unary(call, self.inner.end_backup_window(r).await)
    }
}

/// A client's TCP connection, counted as connected while it lives.
pub struct CountedIo<IO> {
    inner: IO,
    _connected: ConnectionGuard,
}

impl<IO: Connected> Connected for CountedIo<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CountedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CountedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The gRPC listener's connections, each counted as accepted and as connected while open.
pub fn count_connections<IO, E>(
    incoming: impl Stream<Item = Result<IO, E>>,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<CountedIo<IO>, E>> {
    use tokio_stream::StreamExt;
    incoming.map(move |io| {
        io.map(|inner| CountedIo {
            inner,
            _connected: metrics.connection(Transport::Grpc),
        })
    })
}

/// The largest request head read from a scraper; a longer one is answered 431 and closed.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scraper has to send its request and take the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapers served at once; a connection past them is closed at once.
pub const MAX_SCRAPERS: usize = 16;

/// Serves `/metrics`, `/ready` and `/health` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            // Out of file descriptors and the like: the next accept may work; an error here
            // must not end the data service's process.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(stream, &metrics)).await;
        });
    }
}

/// The status line and body answering a request head (`head`, without its blank line).
pub fn respond(head: &[u8], metrics: &Metrics) -> (&'static str, String) {
    let bad = ("400 Bad Request", "malformed request\n".to_string());
    let Ok(head) = std::str::from_utf8(head) else {
        return bad;
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad;
    };
    if !version.starts_with("HTTP/1.") {
        return bad;
    }
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", "only GET is served\n".into());
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => ("200 OK", render(&metrics.snapshot())),
        "/ready" if metrics.ready() => ("200 OK", "ready\n".into()),
        "/ready" => (
            "503 Service Unavailable",
            "not ready: starting or shutting down\n".into(),
        ),
        "/health" => ("200 OK", "ok\n".into()),
        _ => (
            "404 Not Found",
            "not found: failbackd serves /metrics, /ready and /health\n".into(),
        ),
    }
}

/// Reads one request head and answers it; the connection is closed after the answer.
async fn scrape(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break Some(end);
        }
        if buf.len() > MAX_REQUEST_HEAD {
            break None;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // closed before a whole head: nothing to answer
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (status, body) = match head_end {
        Some(end) => respond(&buf[..end], metrics),
        None => (
            "431 Request Header Fields Too Large",
            format!("request head over {MAX_REQUEST_HEAD} bytes\n"),
        ),
    };
    let head_only = buf.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Where a request head ends (its blank line), if it has.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples of an exposition, `name{labels}` to value, checking each family's HELP
    /// and TYPE come before its samples.
    fn parse(text: &str) -> std::collections::BTreeMap<String, f64> {
        let mut typed = std::collections::HashSet::new();
        let mut out = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{line}");
                }
                typed.insert(name.to_string());
            } else if line.starts_with("# HELP ") {
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert!(typed.contains(name), "{line}: no TYPE before it");
                assert!(name.starts_with("failbackd_"), "{line}");
                out.insert(series.to_string(), value.parse().unwrap());
            }
        }
        out
    }

    #[test]
    fn render_writes_every_family_with_its_labels() {
        let m = Arc::new(Metrics::default());
        {
            let mut call = m.call(Transport::Quic, Kind::ReadRanges);
            m.chunk(Transport::Quic, 100, 40);
            m.chunk(Transport::Quic, 50, 50);
            call.finish(Code::Ok);
            drop(call);
            let _in_flight = m.call(Transport::Grpc, Kind::Changes);
            let s = parse(&render(&m.snapshot()));
            assert_eq!(s["failbackd_requests_in_flight{transport=\"grpc\"}"], 1.0);
            assert_eq!(s["failbackd_requests_in_flight{transport=\"quic\"}"], 0.0);
        }
        m.unread_request(Transport::Grpc, Code::Unauthenticated);
        m.refused(Refusal::Token);
        m.refused(Refusal::Token);
        let conn = m.connection(Transport::Grpc);
        let s = parse(&render(&m.snapshot()));
        let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("no {k} in {s:?}"));
        assert_eq!(get("failbackd_read_bytes_total{transport=\"quic\"}"), 150.0);
        assert_eq!(get("failbackd_sent_bytes_total{transport=\"quic\"}"), 90.0);
        assert_eq!(get("failbackd_chunks_total{transport=\"quic\"}"), 2.0);
        assert_eq!(get("failbackd_read_bytes_total{transport=\"grpc\"}"), 0.0);
        assert_eq!(
            get("failbackd_requests_total{transport=\"quic\",kind=\"ReadRanges\",status=\"ok\"}"),
            1.0
        );
        // Dropped unfinished: its client went away.
        assert_eq!(
            get(
                "failbackd_requests_total{transport=\"grpc\",kind=\"Changes\",status=\"cancelled\"}"
            ),
            1.0
        );
        assert_eq!(
            get(
                "failbackd_requests_total{transport=\"grpc\",kind=\"unknown\",status=\"unauthenticated\"}"
            ),
            1.0
        );
        // Every call's ok series is there from the start; no error series nobody saw.
        assert_eq!(
            get(
                "failbackd_requests_total{transport=\"grpc\",kind=\"EndBackupWindow\",status=\"ok\"}"
            ),
            0.0
        );
        assert!(!s.keys().any(|k| k.contains("status=\"internal\"")));
        assert_eq!(get("failbackd_requests_in_flight{transport=\"grpc\"}"), 0.0);
        assert_eq!(get("failbackd_refusals_total{reason=\"token\"}"), 2.0);
        assert_eq!(get("failbackd_refusals_total{reason=\"path\"}"), 0.0);
        assert_eq!(get("failbackd_connections{transport=\"grpc\"}"), 1.0);
        drop(conn);
        let s = parse(&render(&m.snapshot()));
        assert_eq!(s["failbackd_connections{transport=\"grpc\"}"], 0.0);
        assert_eq!(
            s["failbackd_connections_accepted_total{transport=\"grpc\"}"],
            1.0
        );
        let version = format!(
            "failbackd_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(s[&version], 1.0);
        assert!(s["failbackd_start_time_seconds"] > 1.7e9);
        assert!(!s.contains_key("failbackd_wal_summarized_segments"));
    }

    #[test]
    fn render_is_a_function_of_the_snapshot() {
        let mut snap = Metrics::default().snapshot();
        snap.version = "1.2\"3";
        snap.start_time = 1234.5;
        snap.summarized_segments = Some(7);
        let text = render(&snap);
        assert_eq!(text, render(&snap.clone()));
        assert!(
            text.contains("failbackd_build_info{version=\"1.2\\\"3\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("\nfailbackd_start_time_seconds 1234.500\n"),
            "{text}"
        );
        assert!(
            text.contains("\nfailbackd_wal_summarized_segments 7\n"),
            "{text}"
        );
    }

    #[test]
    fn requests_are_answered_by_path() {
        let m = Metrics::default();
        let status = |head: &str| respond(head.as_bytes(), &m).0;
        assert_eq!(status("GET /metrics HTTP/1.1\r\nHost: x"), "200 OK");
        assert_eq!(status("GET /metrics?x=1 HTTP/1.0"), "200 OK");
        assert_eq!(status("GET /health HTTP/1.1"), "200 OK");
        assert_eq!(status("GET /ready HTTP/1.1"), "503 Service Unavailable");
        m.set_ready(true);
        assert_eq!(status("GET /ready HTTP/1.1"), "200 OK");
        assert_eq!(status("GET /nope HTTP/1.1"), "404 Not Found");
        assert_eq!(status("POST /metrics HTTP/1.1"), "405 Method Not Allowed");
        assert_eq!(status("GET /metrics"), "400 Bad Request");
        assert_eq!(status("\u{1}\u{2}"), "400 Bad Request");
        assert_eq!(status("GET /metrics SPDY/3"), "400 Bad Request");
        assert_eq!(respond(b"\xff\xfe", &m).0, "400 Bad Request");
    }

    #[tokio::test]
    async fn a_scraper_gets_one_answer_and_a_huge_head_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, m, async {
            let _ = stopped.await;
        }));
        let ask = |req: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            // The server may answer and close before taking all of a huge request.
            let _ = s.write_all(&req).await;
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        };
        let a = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains("Content-Type: text/plain; version=0.0.4"), "{a}");
        assert!(a.contains("\r\n\r\n# HELP failbackd_build_info"), "{a}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 64 << 10));
        let a = ask(huge).await;
        assert!(a.is_empty() || a.starts_with("HTTP/1.1 431 "), "{a}");
        let a = ask(b"HEAD /health HTTP/1.1\n\n".to_vec()).await;
        assert!(
            a.starts_with("HTTP/1.1 200 OK\r\n") && a.ends_with("\r\n\r\n"),
            "{a}"
        );
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
