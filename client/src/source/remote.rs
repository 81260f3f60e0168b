//! failbackd, whatever the transport: what gRPC and QUIC sources share.
//!
//! A transport ([`Transport`]) only carries calls: it sends a request and hands back the
//! answer, or a stream of chunks, or a [`Status`]. Everything else lives here once: the
//! handshake's checks, batching ranges into requests with up to `jobs` of them in flight, the
//! checks that chunks follow the requested ranges (the server cannot make the client write
//! anywhere it did not ask for), blake3 verification by [`failback_common::wire`] with one
//! retry of a damaged chunk, the Short/Vanished mapping, and the mapping of statuses to
//! [`SourceError`]s.
//!
//! A source that stops answering is not a hang: every call and every batch is retried with
//! back-off after a failure that can heal (a reset connection, a restarted failbackd, a silent
//! peer), on a fresh connection, picking a batch up at the first byte not yet received, until
//! the source has made no progress for `--timeout` ([`failback_common::patience`]).
//!
//! The engine is synchronous; a source owns a small tokio runtime and blocks on it, while every
//! piece is handed to the sink on the calling thread.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::first_batch;
use failback_common::chunkdiff::ByteRange;
use failback_common::compress_choice::{CompressPolicy, CompressionChoice};
use failback_common::filemap::{FileEntry, FileType};
use failback_common::journal::RangeSet;
use failback_common::lsn::history_file_name;
use failback_common::patience::{Next, Patience, Stall};
use failback_common::wire::{self, Compression, WireError};
use failback_proto::capability;
use failback_proto::limits::{
    MAX_HASH_PATHS, MAX_HASH_RANGES, MAX_MAX_CHUNK, MAX_RANGES_PER_REQUEST, MAX_REQUEST,
};
use failback_proto::v1 as pb;
use failback_sql::conninfo;
use failback_transport::url::{Scheme, SourceUrl};
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Code, Status};

use super::{
    ChangesAnswer, Fetch, FetchRange, Fetched, RetryCause, RetryLog, RetryOp, Source, SourceEnd,
    SourceError, WindowEnd, WindowStart, range_sets, without,
};

/// Bytes per ReadRanges request: large enough to stream, small enough to spread over jobs.
const BATCH_BYTES: u64 = 16 << 20;
/// Bytes a `--compress auto` probe asks for: its stored probe crosses the link uncompressed,
/// alone, and through a thin link with pages that compress ten to one, 16 MiB of it costs as
/// much link time as 150 MiB compressed; a quarter of a request still measures the link's
/// rate over several round trips of a LAN and a few of a WAN.
const PROBE_BYTES: u64 = 4 << 20;
/// The most a fetch begun ahead of its plan asks for ([`Source::fetch_ahead`]): what arrives
/// waits in memory for the plan, so it is bounded (the client's memory goal is 256 MB), and
/// 64 MiB is some 2.5 s of a 200 Mbit/s link, longer than the target's WAL scan it overlaps
/// at the sizes measured.
const AHEAD_BYTES: u64 = 64 << 20;
/// Ranges per ReadRanges request: a sixteenth of what the server accepts.
const BATCH_RANGES: usize = MAX_RANGES_PER_REQUEST / 16;
/// The largest whole file [`Source::read_file`] fetches (history files are a few KB).
const MAX_SMALL_FILE: u64 = 64 << 20;
/// How long a new connection (TCP and TLS, or QUIC's handshake) may take.
pub(crate) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the retry of a damaged chunk may take before the damage is reported.
const REFETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Paths per ChunkHashes request: an eighth of what the server accepts, so that a batch of
/// paths of PostgreSQL's longest (MAXPGPATH, 1024 bytes) stays within [`MAX_REQUEST`].
const HASH_BATCH: usize = MAX_HASH_PATHS / 8;
/// Byte ranges per ChunkHashes request: an eighth of what the server accepts; each takes at
/// most 24 bytes, so that with a batch of paths a request stays within [`MAX_REQUEST`].
const HASH_RANGE_BATCH: usize = MAX_HASH_RANGES / 8;
const _: () = assert!(HASH_BATCH * (1024 + 8) + HASH_RANGE_BATCH * 24 < MAX_REQUEST);

/// How to reach failbackd.
#[derive(Clone)]
pub struct RemoteOptions {
    /// `grpc://host:port`, `grpcs://host:port` or `quic://host:port`.
    pub url: SourceUrl,
    /// PEM CA certificate(s) the server's certificate must chain to (`grpcs://`, `quic://`).
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and key presented to a server that asks for client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub token: Option<String>,
    /// ReadRanges requests in flight at once (at least 1).
    pub jobs: usize,
    /// Connections to failbackd (at least 1); the requests in flight are spread over them. On a
    /// long lossy link one TCP connection backs off on every loss; several back off separately.
    pub connections: usize,
    /// Compressed, stored, or whichever delivers more (`--compress`).
    pub compression: CompressPolicy,
    /// How long the source may make no progress before the rewind gives up.
    pub patience: Patience,
    /// Told of every failure that is retried, in words (the CLI prints it as a warning).
    pub notice: Option<Notice>,
}

/// A call held open (a backup window's): dropping it ends the call.
pub type Held = Box<dyn std::any::Any + Send>;

/// Where a source's notes on retried failures go.
pub type Notice = Arc<dyn Fn(&str) + Send + Sync>;

/// How a call or batch waits for a stalled source, whom it tells, and where it counts.
#[derive(Clone)]
pub(crate) struct Retry {
    patience: Patience,
    notice: Option<Notice>,
    log: RetryLog,
}

impl RemoteOptions {
    pub(crate) fn refuse(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Refused {
            what: self.url.to_string(),
            reason: reason.into(),
        }
    }

    /// The client certificate chain and key (`--cert`, `--key`), as the TLS set-up takes them.
    pub(crate) fn identity_pem(&self) -> Option<(&[u8], &[u8])> {
        self.identity
            .as_ref()
            .map(|(c, k)| (c.as_slice(), k.as_slice()))
    }
}

/// Connects to the failbackd `opts.url` names, by its scheme.
pub fn connect(opts: RemoteOptions) -> Result<Box<dyn Source>, SourceError> {
    Ok(match opts.url.scheme {
        Scheme::Quic => Box::new(super::quic::QuicSource::connect(opts)?),
        Scheme::Grpc | Scheme::Grpcs => Box::new(super::grpc::GrpcSource::connect(opts)?),
    })
}

/// The calls a transport carries. Errors are gRPC statuses on every transport, so they map to
/// [`SourceError`]s in one place.
pub trait Transport: Clone + Send + Sync + 'static {
    type Chunks: ChunkStream;

    fn handshake(
        &self,
        req: pb::HandshakeRequest,
    ) -> impl Future<Output = Result<pb::HandshakeResponse, Status>> + Send;

    fn control_file(&self) -> impl Future<Output = Result<pb::ControlFileResponse, Status>> + Send;

    /// The whole listing.
    fn list_files(&self) -> impl Future<Output = Result<Vec<pb::FileEntry>, Status>> + Send;

    fn read_ranges(
        &self,
        req: pb::ReadRangesRequest,
    ) -> impl Future<Output = Result<Self::Chunks, Status>> + Send;

    fn timelines(&self) -> impl Future<Output = Result<pb::TimelinesResponse, Status>> + Send;

    /// Every answer of one ChunkHashes call.
    fn chunk_hashes(
        &self,
        req: pb::ChunkHashesRequest,
    ) -> impl Future<Output = Result<Vec<pb::FileHashes>, Status>> + Send;

    fn end_of_wal(&self) -> impl Future<Output = Result<pb::EndOfWalResponse, Status>> + Send;

    /// Opens a backup window: its first reply, and the call, held open for as long as the
    /// window is to last (dropping it ends the call, and the window with it).
    fn backup_window(
        &self,
        req: pb::BackupWindowRequest,
    ) -> impl Future<Output = Result<(pb::BackupWindowReply, Held), Status>> + Send;

    fn end_backup_window(
        &self,
        req: pb::EndBackupWindowRequest,
    ) -> impl Future<Output = Result<pb::EndBackupWindowResponse, Status>> + Send;

    /// Every reply of one Changes call.
    fn changes(
        &self,
        req: pb::ChangesRequest,
    ) -> impl Future<Output = Result<Vec<pb::ChangesReply>, Status>> + Send;

    /// Says goodbye, so the server frees the connection now rather than at its idle timeout.
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Which connection calls go over now; [`Transport::reconnect`] moves it on.
    fn generation(&self) -> u64 {
        0
    }

    /// Replaces connection `generation` after a failure that may have broken it, unless another
    /// call already did. A failure to connect is the next attempt's to report.
    fn reconnect(&self, generation: u64) -> impl Future<Output = ()> + Send {
        let _ = generation;
        async {}
    }
}

/// The connection a transport's calls go over now, and its replacement after a failure: many
/// calls fail together when a connection breaks, and only the first to ask replaces it.
pub(crate) struct Current<C> {
    now: std::sync::Mutex<(u64, C)>,
    replacing: tokio::sync::Mutex<()>,
}

impl<C: Clone> Current<C> {
    pub(crate) fn new(conn: C) -> Current<C> {
        Current {
            now: std::sync::Mutex::new((0, conn)),
            replacing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, C)> {
        // Nothing panics while holding it; a poisoned lock still holds a usable connection.
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self) -> C {
        self.lock().1.clone()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.lock().0
    }

    /// Replaces connection `seen` by what `connect` makes of it (it may close the old one
    /// first), unless another caller already replaced it. When `connect` makes nothing, the
    /// old connection stays and the next failure asks again.
    pub(crate) async fn replace<F>(&self, seen: u64, connect: impl FnOnce(C) -> F)
    where
        F: Future<Output = Option<C>>,
    {
        let _one_at_a_time = self.replacing.lock().await;
        let (generation, old) = self.lock().clone();
        if generation != seen {
            return;
        }
        if let Some(new) = connect(old).await {
            *self.lock() = (generation + 1, new);
        }
    }
}

/// The chunks of one ReadRanges call, in the order the server sent them.
pub trait ChunkStream: Send {
    /// The next chunk; `None` once the server finished the call.
    fn next(&mut self) -> impl Future<Output = Result<Option<pb::Chunk>, Status>> + Send;
}

/// A multi-threaded runtime of two workers: one to drive the connection, one for the batches.
pub(crate) fn runtime(what: &str) -> Result<Runtime, SourceError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| SourceError::Io {
            what: format!("the {what} runtime"),
            source: e,
        })
}

/// An error and its causes on one line (tonic's and quinn's own messages are terse).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    failback_common::errors::one_line(e)
}

/// Why a call failed with `s`, as far as a retry is concerned: the I/O error under it when
/// there is one (tonic keeps it as the status's source), else the words of the status
/// (QUIC's and failbackd's own statuses carry no source), else its code.
pub(crate) fn status_cause(s: &Status) -> RetryCause {
    use std::io::ErrorKind as K;
    if s.code() == Code::DeadlineExceeded {
        return RetryCause::Timeout;
    }
    let mut under: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = under {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                K::ConnectionRefused
                | K::NotConnected
                | K::AddrNotAvailable
                | K::HostUnreachable
                | K::NetworkUnreachable => return RetryCause::Unavailable,
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                    return RetryCause::ConnectionLost;
                }
                K::TimedOut => return RetryCause::Timeout,
                _ => {}
            }
        }
        under = e.source();
    }
    let words = format!("{s}").to_lowercase();
    let says = |any: &[&str]| any.iter().any(|w| words.contains(w));
    if says(&["timed out", "timeout", "deadline"]) {
        RetryCause::Timeout
    } else if says(&[
        "shutting down",
        "connection refused",
        "could not connect",
        "tcp connect error",
        "dns error",
    ]) {
        RetryCause::Unavailable
    } else if says(&[
        "reset",
        "broken pipe",
        "connection lost",
        "connection closed",
        "closed by peer",
        "aborted by peer",
        "go away",
        "goaway",
        "error reading a body",
    ]) {
        RetryCause::ConnectionLost
    } else if s.code() == Code::Unavailable {
        RetryCause::Unavailable
    } else if matches!(s.code(), Code::Cancelled | Code::Aborted) {
        RetryCause::ConnectionLost
    } else {
        RetryCause::Transport
    }
}

pub(crate) fn status_err(what: &str, s: Status) -> SourceError {
    let reason = format!("{} ({:?})", s.message(), s.code());
    match s.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::Unimplemented
        | Code::ResourceExhausted
        | Code::NotFound => SourceError::Refused {
            what: what.to_string(),
            reason,
        },
        _ => {
            let reason = format!("{what}: {reason}");
            match status_cause(&s) {
                RetryCause::Timeout => SourceError::Timeout(reason),
                RetryCause::ConnectionLost => SourceError::Lost(reason),
                RetryCause::Unavailable => SourceError::Unavailable(reason),
                RetryCause::Transport | RetryCause::Checksum => SourceError::Transport(reason),
            }
        }
    }
}

fn proto_err(what: &str, why: impl std::fmt::Display) -> SourceError {
    SourceError::Protocol(format!("{what}: {why}"))
}

/// Runs `call` until it answers, trying again after failures that can heal, each time on a
/// fresh connection, until the source has been silent for the whole timeout.
async fn patiently<T: Transport, R, F, Fut>(
    transport: &T,
    retry: &Retry,
    what: &str,
    op: RetryOp,
    mut call: F,
) -> Result<R, SourceError>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<R, Status>>,
{
    let mut stall = Stall::new(retry.patience, Instant::now());
    loop {
        let generation = transport.generation();
        let budget = stall.budget(Instant::now());
        let err = match tokio::time::timeout(budget, call(transport.clone())).await {
            Ok(Ok(r)) => {
                if let Some(stalled) = stall.ridden_out(Instant::now()) {
                    retry.log.recovered(stalled);
                }
                return Ok(r);
            }
            Ok(Err(s)) => status_err(what, s),
            Err(_) => SourceError::Timeout(format!(
                "{what}: no answer in {:.1} s",
                budget.as_secs_f64()
            )),
        };
        wait_to_retry(transport, retry, &mut stall, generation, err, op).await?;
    }
}

/// After a failed attempt: `Err` when it is final (it cannot heal, or the timeout is used up),
/// otherwise waits the back-off and replaces the connection the attempt used.
async fn wait_to_retry<T: Transport>(
    transport: &T,
    retry: &Retry,
    stall: &mut Stall,
    generation: u64,
    err: SourceError,
    op: RetryOp,
) -> Result<(), SourceError> {
    let Some(cause) = err.retry_cause() else {
        return Err(err);
    };
    match stall.failed(Instant::now()) {
        Next::RetryAfter(delay) => {
            retry.log.retried(cause, op);
            if let Some(notice) = &retry.notice {
                notice(&format!(
                    "{err}; trying again in {:.2} s on a new connection (attempt {})",
                    delay.as_secs_f64(),
                    stall.failures() + 1
                ));
            }
            tokio::time::sleep(delay).await;
            // Connecting to a server that does not answer takes its own time-out: keep it
            // within what is left of ours.
            let budget = stall.budget(Instant::now());
            let _ = tokio::time::timeout(budget, transport.reconnect(generation)).await;
            Ok(())
        }
        Next::GiveUp { stalled, attempts } => Err(SourceError::Stalled {
            stalled,
            attempts,
            timeout: stall.patience().timeout,
            last: Box::new(err),
        }),
    }
}

/// failbackd through transport `T`.
pub struct RemoteSource<T: Transport> {
    rt: Runtime,
    /// One per connection, never empty; the first also carries every call but ReadRanges.
    transports: Vec<T>,
    url: String,
    jobs: usize,
    /// Shared by the requests in flight: each asks it, and tells it how its answer went.
    compression: SharedChoice,
    retry: Retry,
    max_chunk: u64,
    /// Handshake capabilities: failbackd knows the server's end of WAL (`live`), PostgreSQL
    /// runs on the served directory (`running`), ChunkHashes is served (`chunk-hashes`).
    capabilities: Vec<String>,
    /// How a standby reaches the source's server, host included.
    primary_conninfo: String,
    early: Early,
    /// The backup window this source opened: its id, and its call held open.
    window: Option<(u64, Held)>,
    /// Its end, asked ahead ([`super::Ask::CloseWindow`]) and not yet taken.
    closing: Option<tokio::task::JoinHandle<Result<pb::EndBackupWindowResponse, SourceError>>>,
    /// A fetch begun before its plan was made, for the next [`Source::fetch`] to take up.
    ahead: Option<Ahead>,
    /// Bytes of it that had arrived when that fetch began.
    ahead_arrived: u64,
}

/// A fetch begun ahead of its plan ([`Source::fetch_ahead`]): its batches run and fill the
/// channel (then wait, as any fetch does for a slow writer), and the rest of the plan's ranges,
/// once known, are sent to its dispatch to follow them.
struct Ahead {
    /// What it asks for, by path.
    asked: BTreeMap<String, RangeSet>,
    more: oneshot::Sender<Vec<FetchRange>>,
    rx: mpsc::Receiver<Result<Piece, SourceError>>,
    tasks: tokio::task::JoinSet<()>,
}

/// What every rewind asks first — the control file, the timelines and their history files,
/// the end of WAL, the file list — asked together with the handshake, so that over a long link
/// they cost one round trip instead of one each. Each answer is used once, by the first call
/// for it; later calls ask again. They are a head start only: one attempt each, and a call
/// whose early answer failed is made again, with the patience `--timeout` allows (an early
/// call never replaces a connection).
struct Early {
    control: Option<Answer<pb::ControlFileResponse>>,
    timelines: Option<Answer<pb::TimelinesResponse>>,
    end_of_wal: Option<Answer<pb::EndOfWalResponse>>,
    files: Option<Answer<Vec<pb::FileEntry>>>,
    asked: Instant,
    /// History files from the timelines answer, by path (`pg_wal/NNNNNNNN.history`): they
    /// never change once written, so they need no read of their own.
    histories: std::collections::BTreeMap<String, Vec<u8>>,
}

type Answer<R> = tokio::task::JoinHandle<Option<R>>;

/// The oldest file list used as an early answer: a live source's files change, and the target's
/// crash recovery and WAL scan may take a while between the handshake and the listing.
const EARLY_LIST_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

/// One attempt at `call`, on the runtime, bounded by the liveness the patience gives.
fn ask_early<T: Transport, R: Send + 'static, Fut>(
    rt: &Runtime,
    t: &T,
    patience: Patience,
    call: fn(T) -> Fut,
) -> Option<Answer<R>>
where
    Fut: Future<Output = Result<R, Status>> + Send + 'static,
{
    let limit = patience.liveness();
    let t = t.clone();
    Some(rt.spawn(async move { tokio::time::timeout(limit, call(t)).await.ok()?.ok() }))
}

impl Early {
    fn ask<T: Transport>(rt: &Runtime, t: &T, patience: Patience) -> Early {
        Early {
            control: ask_early(rt, t, patience, |t| async move { t.control_file().await }),
            timelines: ask_early(rt, t, patience, |t| async move { t.timelines().await }),
            end_of_wal: ask_early(rt, t, patience, |t| async move { t.end_of_wal().await }),
            files: ask_early(rt, t, patience, |t| async move { t.list_files().await }),
            asked: Instant::now(),
            histories: Default::default(),
        }
    }

    /// The early answer in `slot`, if it is still there and came (and then never again).
    fn take<R>(rt: &Runtime, slot: &mut Option<Answer<R>>) -> Option<R> {
        rt.block_on(slot.take()?).ok().flatten()
    }

    fn abort(&mut self) {
        let handles = [
            self.control.take().map(|h| h.abort_handle()),
            self.timelines.take().map(|h| h.abort_handle()),
            self.end_of_wal.take().map(|h| h.abort_handle()),
            self.files.take().map(|h| h.abort_handle()),
        ];
        for h in handles.into_iter().flatten() {
            h.abort();
        }
    }
}

impl<T: Transport> RemoteSource<T> {
    /// Shakes hands over the first of the connected transports: the protocol version must
    /// match and the announced chunk size be sane.
    pub(crate) fn handshake(
        rt: Runtime,
        transports: Vec<T>,
        opts: RemoteOptions,
    ) -> Result<Self, SourceError> {
        let Some(transport) = transports.first() else {
            return Err(opts.refuse("no connection"));
        };
        let mut early = Early::ask(&rt, transport, opts.patience);
        let hs = rt
            .block_on(transport.handshake(pb::HandshakeRequest {
                protocol_version: failback_proto::PROTOCOL_VERSION,
                client_version: env!("CARGO_PKG_VERSION").into(),
            }))
            .map_err(|s| {
                early.abort();
                status_err("the handshake", s)
            })?;
        if hs.protocol_version != failback_proto::PROTOCOL_VERSION {
            early.abort();
            return Err(opts.refuse(format!(
                "failbackd speaks protocol {}, this client {}",
                hs.protocol_version,
                failback_proto::PROTOCOL_VERSION
            )));
        }
        if hs.max_chunk == 0 || hs.max_chunk > MAX_MAX_CHUNK {
            early.abort();
            return Err(opts.refuse(format!(
                "failbackd announces chunks of {} bytes (1 .. {MAX_MAX_CHUNK} accepted)",
                hs.max_chunk
            )));
        }
        let primary_conninfo = conninfo::with_host(&hs.primary_conninfo, &opts.url.host);
        Ok(RemoteSource {
            rt,
            transports,
            primary_conninfo,
            url: opts.url.to_string(),
            jobs: opts.jobs.max(1),
            compression: Arc::new(std::sync::Mutex::new(CompressionChoice::new(
                opts.compression,
            ))),
            retry: Retry {
                patience: opts.patience,
                notice: opts.notice,
                log: RetryLog::default(),
            },
            max_chunk: hs.max_chunk,
            capabilities: hs.capabilities,
            early,
            window: None,
            closing: None,
            ahead: None,
            ahead_arrived: 0,
        })
    }

    /// The early timelines answer, once; keeps its history files for [`Source::read_file`].
    fn early_timelines(&mut self) -> Option<pb::TimelinesResponse> {
        let r = Early::take(&self.rt, &mut self.early.timelines)?;
        for h in &r.histories {
            let path = format!("pg_wal/{}", history_file_name(h.timeline));
            self.early.histories.insert(path, h.data.to_vec());
        }
        Some(r)
    }

    /// [`Source::fetch`], its retries counted under `op`.
    fn fetch_as(
        &mut self,
        ranges: Vec<FetchRange>,
        op: RetryOp,
    ) -> Result<Box<dyn Fetch + '_>, SourceError> {
        let (rx, tasks) = self.dispatch(ranges, op, None, 0);
        Ok(Box::new(RemoteFetch::new(self, rx, tasks)))
    }

    /// Starts sending `ranges`' batches, and then those `more` brings, if any; their pieces
    /// come out of the channel.
    ///
    /// `more`: the rest of a fetch begun ahead, once its plan is made; `expected`: the bytes
    /// that rest will at least ask for, known now (the part of the source's changed blocks cut
    /// off by [`AHEAD_BYTES`]), so that `--compress auto` can tell a large fetch from a small
    /// one before the rest comes.
    fn dispatch(
        &self,
        ranges: Vec<FetchRange>,
        op: RetryOp,
        more: Option<oneshot::Receiver<Vec<FetchRange>>>,
        expected: u64,
    ) -> (
        mpsc::Receiver<Result<Piece, SourceError>>,
        tokio::task::JoinSet<()>,
    ) {
        let total: u64 = ranges.iter().map(|r| r.length).sum();
        let queue: VecDeque<Vec<FetchRange>> = batches(&ranges).into();
        let (tx, rx) = mpsc::channel::<Result<Piece, SourceError>>(self.jobs * 4);
        let dispatch = Dispatch {
            transports: self.transports.clone(),
            jobs: self.jobs,
            choice: self.compression.clone(),
            limit: self.max_chunk,
            retry: self.retry.clone(),
            op,
            tx,
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn_on(dispatch.run(queue, total, more, expected), self.rt.handle());
        (rx, tasks)
    }

    /// The fetch begun ahead, taken up by the plan's `ranges`: the rest of them follow its
    /// batches, what already arrived is handed over first, and pieces the plan does not want
    /// (a relation the source dropped or cut short since) are left out.
    fn take_up(&mut self, mut ahead: Ahead, ranges: Vec<FetchRange>) -> Box<dyn Fetch + '_> {
        let wanted = range_sets(&ranges);
        let (rest, _) = without(ranges, &ahead.asked);
        // A dispatch gone already failed: its error waits in the channel.
        let _ = ahead.more.send(rest);
        let mut ready = VecDeque::new();
        while let Ok(piece) = ahead.rx.try_recv() {
            if let Ok(p @ Piece::Data { .. }) = &piece {
                let parts = wanted_parts(&wanted, p).unwrap_or_default();
                self.ahead_arrived += parts.iter().map(|(_, len)| len).sum::<u64>();
            }
            ready.push_back(piece);
        }
        let mut fetch = RemoteFetch::new(self, ahead.rx, ahead.tasks);
        fetch.ready = ready;
        fetch.wanted = Some(wanted);
        Box::new(fetch)
    }

    fn refuse_window(&self, reason: &str) -> SourceError {
        SourceError::Refused {
            what: format!("a backup window on {}", self.url),
            reason: reason.to_string(),
        }
    }

    fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// ChunkHashes of each path, whole (`None`) or within its byte ranges, in requests of at
    /// most [`HASH_BATCH`] paths and [`HASH_RANGE_BATCH`] ranges (a path with more goes
    /// alone), [`HASH_ASKS_IN_FLIGHT`] of them at a time; the answers in the order asked.
    /// `None` when failbackd refuses to hash: hashes only save bytes, so the caller fetches
    /// instead.
    fn ask_hashes(
        &self,
        asks: &[(&str, Option<&[ByteRange]>)],
        chunk_size: u64,
    ) -> Result<Option<Vec<super::FileHashes>>, SourceError> {
        let mut batches = Vec::new();
        let mut rest = asks;
        while !rest.is_empty() {
            let (batch, _) = first_batch(
                &rest[..rest.len().min(HASH_BATCH)],
                HASH_RANGE_BATCH as u64,
                |(_, r)| r.map_or(0, <[ByteRange]>::len) as u64,
            );
            rest = &rest[batch.len()..];
            batches.push(batch);
        }
        let mut out = Vec::with_capacity(asks.len());
        let answered = self.rt.block_on(async {
            let ask = |batch| {
                let (t, retry) = (self.transports[0].clone(), self.retry.clone());
                let req = hash_request(batch, chunk_size);
                tokio::spawn(async move { ask_hashes_once(&t, &retry, req).await })
            };
            let mut to_ask = batches.iter();
            let mut in_flight = VecDeque::new();
            let mut result = Ok(true);
            // Each answer is checked and taken as it arrives, its message dropped: the
            // answers to a batch of 100,000 files are held once, not twice.
            for batch in &batches {
                let room = HASH_ASKS_IN_FLIGHT - in_flight.len();
                in_flight.extend(to_ask.by_ref().take(room).map(|b| ask(b)));
                let first = in_flight
                    .pop_front()
                    .expect("the batch's request is in flight");
                result = match finished(first).await {
                    Ok(Some(got)) => {
                        checked_hashes(got, batch, chunk_size, &mut out).map(|()| true)
                    }
                    refused_or_failed => refused_or_failed.map(|_| false),
                };
                if !matches!(result, Ok(true)) {
                    break;
                }
            }
            // A refusal or a failure ends the asking: what is still in flight is not wanted.
            in_flight.iter().for_each(|h| h.abort());
            result
        })?;
        Ok(answered.then_some(out))
    }

    /// One call over the first connection, with the patience `--timeout` allows; its retries
    /// are counted under `op`.
    fn call<R, F, Fut>(&self, what: &str, op: RetryOp, call: F) -> Result<R, SourceError>
    where
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Result<R, Status>>,
    {
        self.rt
            .block_on(patiently(&self.transports[0], &self.retry, what, op, call))
    }
}

/// ChunkHashes requests in flight at once: failbackd hashes the next batch of files while the
/// answer to the one before crosses the link and is decoded here, instead of waiting idle for
/// it (a resync of 100,000 small relation files asks some 200 times).
const HASH_ASKS_IN_FLIGHT: usize = 2;

/// The ChunkHashes request for one batch of paths, whole (`None`) or within byte ranges.
fn hash_request(batch: &[(&str, Option<&[ByteRange]>)], chunk_size: u64) -> pb::ChunkHashesRequest {
    pb::ChunkHashesRequest {
        paths: batch.iter().map(|(p, _)| p.to_string()).collect(),
        chunk_size,
        ranges: if batch.iter().any(|(_, r)| r.is_some()) {
            batch
                .iter()
                .map(|(_, r)| pb::HashRanges {
                    extents: r
                        .unwrap_or_default()
                        .iter()
                        .map(|r| pb::ByteExtent {
                            offset: r.offset,
                            length: r.length,
                        })
                        .collect(),
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// One ChunkHashes request, retried as any call is; `None` when failbackd refuses to hash.
async fn ask_hashes_once<T: Transport>(
    t: &T,
    retry: &Retry,
    req: pb::ChunkHashesRequest,
) -> Result<Option<Vec<pb::FileHashes>>, SourceError> {
    patiently(t, retry, "ChunkHashes", RetryOp::Hash, |t| {
        let req = req.clone();
        async move {
            match t.chunk_hashes(req).await {
                Ok(v) => Ok(Some(v)),
                // Hashes only save bytes: a refusal (chunks too many, an older failbackd)
                // means fetching whole files, not failing.
                Err(s)
                    if matches!(
                        s.code(),
                        Code::InvalidArgument | Code::Unimplemented | Code::FailedPrecondition
                    ) =>
                {
                    Ok(None)
                }
                Err(s) => Err(s),
            }
        }
    })
    .await
}

/// What a spawned request came to; a panic in it is the caller's.
async fn finished<R>(task: tokio::task::JoinHandle<R>) -> R {
    match task.await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// `got`, failbackd's answer to a ChunkHashes request for `batch`, checked (an answer per
/// path asked, in order, in the chunks asked, of 32-byte hashes) and added to `out`.
fn checked_hashes(
    got: Vec<pb::FileHashes>,
    batch: &[(&str, Option<&[ByteRange]>)],
    chunk_size: u64,
    out: &mut Vec<super::FileHashes>,
) -> Result<(), SourceError> {
    if got.len() != batch.len() {
        return Err(proto_err(
            "ChunkHashes",
            format!("{} answers for {} paths", got.len(), batch.len()),
        ));
    }
    for (h, (want, _)) in got.into_iter().zip(batch) {
        if h.path != *want || h.chunk_size != chunk_size {
            return Err(proto_err(
                "ChunkHashes",
                format!(
                    "hashes of {:?} in chunks of {} where {want:?} in chunks of {chunk_size} \
                     was due",
                    h.path, h.chunk_size
                ),
            ));
        }
        let hashes = h
            .hashes
            .iter()
            .map(|b| <[u8; 32]>::try_from(b.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| proto_err("ChunkHashes", format!("{want:?}: a hash is not 32 bytes")))?;
        out.push(super::FileHashes {
            path: h.path,
            size: h.size,
            hashes,
            vanished: h.vanished,
            algorithm: failback_common::chunkdiff::ChunkHash::Blake3,
        });
    }
    Ok(())
}

impl<T: Transport> Drop for RemoteSource<T> {
    fn drop(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            let _guard = self.rt.enter();
            drop(ahead);
        }
        // Ending the window's call ends failbackd's session, and the window with it.
        if let Some((_, held)) = self.window.take() {
            let _guard = self.rt.enter();
            drop(held);
        }
        let closes = self.transports.iter().map(Transport::close);
        let all = futures_join_all(closes);
        self.rt.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), all).await;
        });
    }
}

/// Waits for every future (closing each connection at once rather than one after another).
async fn futures_join_all<F: Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// A fetch's batches running on the source's runtime; their pieces are handed over on the
/// calling thread. Every sender is dropped once all batches are done: then the channel says
/// there is nothing more. Dropped early, the batches still running are aborted.
struct RemoteFetch<'s> {
    rt: &'s Runtime,
    rx: mpsc::Receiver<Result<Piece, SourceError>>,
    tasks: tokio::task::JoinSet<()>,
    /// Told what the copy delivers, for `--compress auto`'s watch.
    choice: SharedChoice,
    /// Pieces that came before this fetch began (of a fetch begun ahead), handed over first.
    ready: VecDeque<Result<Piece, SourceError>>,
    /// For a fetch begun ahead, the ranges this fetch asks for, by path: pieces outside them
    /// are left out, and the parts of a piece inside them handed over one by one.
    wanted: Option<BTreeMap<String, RangeSet>>,
    /// The piece handed out last, which the caller borrows.
    piece: Option<Piece>,
    /// Its parts (offset, length) still to hand over.
    parts: VecDeque<(u64, u64)>,
}

impl<'s> RemoteFetch<'s> {
    fn new<T: Transport>(
        source: &'s RemoteSource<T>,
        rx: mpsc::Receiver<Result<Piece, SourceError>>,
        tasks: tokio::task::JoinSet<()>,
    ) -> RemoteFetch<'s> {
        RemoteFetch {
            rt: &source.rt,
            rx,
            tasks,
            choice: source.compression.clone(),
            ready: VecDeque::new(),
            wanted: None,
            piece: None,
            parts: VecDeque::new(),
        }
    }
}

/// The parts of `piece` a fetch that `wanted` these ranges hands over: these (a piece of data),
/// or all of it (`None`: a Short or Vanished of a file it asks for), or nothing (empty).
fn wanted_parts(wanted: &BTreeMap<String, RangeSet>, piece: &Piece) -> Option<Vec<(u64, u64)>> {
    Some(match piece {
        Piece::Data { path, offset, data } => wanted
            .get(&**path)
            .map(|set| set.present(*offset, data.len() as u64))
            .unwrap_or_default(),
        // Said of a file the plan asks nothing of, it says nothing the copy needs.
        Piece::Short { path, .. } | Piece::Vanished { path } => {
            let keep = wanted.contains_key(&**path);
            return (!keep).then(Vec::new);
        }
    })
}

impl Fetch for RemoteFetch<'_> {
    fn next(&mut self) -> Result<Option<Fetched<'_>>, SourceError> {
        if self.parts.is_empty() {
            self.piece = None;
            loop {
                let piece = match self.ready.pop_front() {
                    Some(p) => p,
                    None => match self.rt.block_on(self.rx.recv()) {
                        Some(p) => p,
                        None => return Ok(None),
                    },
                }?;
                if let Piece::Data { data, .. } = &piece {
                    lock_choice(&self.choice).delivered(data.len() as u64, Instant::now());
                }
                match self.wanted.as_ref().and_then(|w| wanted_parts(w, &piece)) {
                    Some(parts) if parts.is_empty() => continue,
                    Some(parts) => self.parts = parts.into(),
                    None => {}
                }
                self.piece = Some(piece);
                break;
            }
        }
        let Some(piece) = self.piece.as_ref() else {
            return Ok(None);
        };
        Ok(Some(match piece {
            Piece::Data { path, offset, data } => {
                let (at, len) = self
                    .parts
                    .pop_front()
                    .unwrap_or((*offset, data.len() as u64));
                let from = (at - offset) as usize;
                Fetched::Data {
                    path,
                    offset: at,
                    data: &data[from..from + len as usize],
                }
            }
            Piece::Short { path, size } => Fetched::Short { path, size: *size },
            Piece::Vanished { path } => Fetched::Vanished { path },
        }))
    }
}

impl Drop for RemoteFetch<'_> {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        self.tasks.abort_all();
    }
}

/// `--compress auto`'s state, shared by the requests in flight, the pieces handed over and the
/// report.
type SharedChoice = Arc<std::sync::Mutex<CompressionChoice>>;

/// The choice, whatever a panicking holder left (its state is a few rates and counters).
fn lock_choice(c: &SharedChoice) -> std::sync::MutexGuard<'_, CompressionChoice> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends a fetch's batches: at most `jobs` in flight, spread over the connections in turn,
/// each compressed as the choice says; a probe of `--compress auto` goes alone, once every
/// request before it has been answered, so that what it measures is its kind's and not its
/// place in a queue.
struct Dispatch<T: Transport> {
    transports: Vec<T>,
    jobs: usize,
    choice: SharedChoice,
    limit: u64,
    retry: Retry,
    op: RetryOp,
    tx: mpsc::Sender<Result<Piece, SourceError>>,
}

impl<T: Transport> Dispatch<T> {
    fn batch(
        &self,
        transport: T,
        b: Vec<FetchRange>,
        used: Compression,
    ) -> impl Future<Output = Result<u64, SourceError>> + Send + 'static {
        let (retry, tx) = (self.retry.clone(), self.tx.clone());
        run_batch(transport, b, used.level(), self.limit, retry, self.op, tx)
    }

    fn choice(&self) -> std::sync::MutexGuard<'_, CompressionChoice> {
        lock_choice(&self.choice)
    }

    async fn run(
        self,
        mut queue: VecDeque<Vec<FetchRange>>,
        total: u64,
        mut more: Option<oneshot::Receiver<Vec<FetchRange>>>,
        expected: u64,
    ) {
        let permits = Arc::new(Semaphore::new(self.jobs));
        let all = u32::try_from(self.jobs).unwrap_or(u32::MAX);
        let mut running = tokio::task::JoinSet::new();
        // What the fetch has still to ask for, the rest it expects included.
        let mut left = total + expected;
        // Where the round's first probe was taken: its second is the batch after it, the same
        // kind of data.
        let mut probed_at: Option<usize> = None;
        let mut sent = 0usize;
        // Raw bytes asked for by the requests running (not probes, which go alone).
        let mut in_flight = 0u64;
        loop {
            // The rest of a fetch begun ahead: waited for once its own batches are all sent.
            if let Some(rx) = more.as_mut() {
                let came = if queue.is_empty() {
                    Some(rx.await.ok())
                } else {
                    match rx.try_recv() {
                        Err(oneshot::error::TryRecvError::Empty) => None,
                        got => Some(got.ok()),
                    }
                };
                if let Some(rest) = came {
                    more = None;
                    // The plan is made: the target's WAL scan, which shared the CPUs with
                    // whatever probes ran ahead of it, is over.
                    self.choice().cpus_freed();
                    let rest = rest.unwrap_or_default();
                    left =
                        left.saturating_sub(expected) + rest.iter().map(|r| r.length).sum::<u64>();
                    queue.extend(batches(&rest));
                }
            }
            if queue.is_empty() {
                break;
            }
            let probe_at = |queue: &mut VecDeque<Vec<FetchRange>>| {
                probed_at
                    .filter(|&k| k < queue.len())
                    .unwrap_or_else(|| probe_batches(queue.make_contiguous()))
            };
            // Before its plan comes nothing takes a fetch's pieces out of the channel: a probe
            // whose pieces it could not hold would wait for the plan, and measure that wait.
            let fits = more.is_none() || {
                let at = probe_at(&mut queue);
                pieces(&queue[at], PROBE_BYTES, self.limit) < self.tx.capacity()
            };
            let probe = fits
                .then(|| self.choice().wants_probe(Instant::now(), left))
                .flatten();
            let b = match probe {
                Some(_) => {
                    let at = probe_at(&mut queue);
                    probed_at = Some(at);
                    queue.remove(at).map(|whole| {
                        let (probe, rest) = cut_batch(whole, PROBE_BYTES);
                        if !rest.is_empty() {
                            // The round's next probe is taken here: the same file.
                            queue.insert(at, rest);
                        }
                        probe
                    })
                }
                None => {
                    probed_at = None;
                    queue.pop_front()
                }
            };
            let Some(b) = b else { break };
            let asked: u64 = b.iter().map(|r| r.length).sum();
            left = left.saturating_sub(asked);
            let transport = self.transports[sent % self.transports.len()].clone();
            sent += 1;
            let Some(used) = probe else {
                // Within what `auto` allows in flight (a choice made again applies only to
                // requests not yet sent), and at least one request.
                while in_flight > 0
                    && self
                        .choice()
                        .in_flight_budget()
                        .is_some_and(|most| in_flight + asked > most)
                {
                    match running.join_next().await {
                        Some(Ok(done)) => in_flight -= done,
                        Some(Err(_)) => {}
                        None => in_flight = 0,
                    }
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let batch = self.batch(transport, b, self.choice().next_request());
                let tx = self.tx.clone();
                in_flight += asked;
                running.spawn(async move {
                    if let Err(e) = batch.await {
                        let _ = tx.send(Err(e)).await;
                    }
                    drop(permit);
                    asked
                });
                while let Some(done) = running.try_join_next() {
                    in_flight -= done.unwrap_or(0);
                }
                continue;
            };
            // Alone: every permit, so every request before it has been answered.
            let Ok(alone) = permits.clone().acquire_many_owned(all).await else {
                return;
            };
            let t = Instant::now();
            let done = self.batch(transport, b, used).await;
            match &done {
                Ok(delivered) => {
                    self.choice()
                        .probed(used, *delivered, t.elapsed(), Instant::now())
                }
                Err(_) => self.choice().probe_failed(Instant::now()),
            }
            drop(alone);
            if let Err(e) = done {
                let _ = self.tx.send(Err(e)).await;
                return;
            }
        }
        while running.join_next().await.is_some() {}
    }
}

/// What a batch task hands to the calling thread.
enum Piece {
    Data {
        path: Arc<str>,
        offset: u64,
        /// Verified bytes: a stored chunk's own, as the message brought them.
        data: Bytes,
    },
    Short {
        path: Arc<str>,
        size: u64,
    },
    Vanished {
        path: Arc<str>,
    },
}

fn read_request(ranges: &[FetchRange], level: i32) -> pb::ReadRangesRequest {
    pb::ReadRangesRequest {
        ranges: ranges
            .iter()
            .map(|r| pb::Range {
                path: r.path.clone(),
                offset: r.offset,
                length: r.length,
            })
            .collect(),
        compression_level: level,
    }
}

/// Streams one batch and sends its pieces; after a failure that can heal, asks again for what
/// has not arrived yet.
async fn run_batch<T: Transport>(
    transport: T,
    mut ranges: Vec<FetchRange>,
    level: i32,
    limit: u64,
    retry: Retry,
    op: RetryOp,
    tx: mpsc::Sender<Result<Piece, SourceError>>,
) -> Result<u64, SourceError> {
    let mut stall = Stall::new(retry.patience, Instant::now());
    // File bytes handed over: what the batch delivered, which a file shorter than asked for
    // (a live source's small files are asked for a mebibyte) makes less than it asked.
    let mut delivered = 0u64;
    loop {
        let generation = transport.generation();
        let mut at = Cursor::new(&ranges);
        let streamed = stream_batch(
            &transport,
            &ranges,
            &mut at,
            (level, limit),
            (&retry, op),
            &mut stall,
            &tx,
            &mut delivered,
        );
        let err = match streamed.await {
            Ok(()) => {
                if let Some(stalled) = stall.ridden_out(Instant::now()) {
                    retry.log.recovered(stalled);
                }
                return Ok(delivered);
            }
            Err(e) => e,
        };
        ranges = at.rest(&ranges);
        if ranges.is_empty() && err.is_retryable() {
            // Everything arrived; only the end of the call was lost.
            return Ok(delivered);
        }
        wait_to_retry(&transport, &retry, &mut stall, generation, err, op).await?;
    }
}

/// How far a batch got: the range due next and the offset due in it. Zero-length ranges and
/// ranges already answered in full are stepped over, so `idx` always names one still owed.
struct Cursor {
    idx: usize,
    next: u64,
}

impl Cursor {
    fn new(ranges: &[FetchRange]) -> Cursor {
        let mut c = Cursor {
            idx: 0,
            next: ranges.first().map_or(0, |r| r.offset),
        };
        c.skip_done(ranges);
        c
    }

    fn skip_done(&mut self, ranges: &[FetchRange]) {
        while let Some(r) = ranges.get(self.idx) {
            if self.next < r.offset.saturating_add(r.length) {
                break;
            }
            self.step(ranges);
        }
    }

    /// On to the next range.
    fn step(&mut self, ranges: &[FetchRange]) {
        self.idx += 1;
        self.next = ranges.get(self.idx).map_or(0, |r| r.offset);
    }

    /// The ranges still owed, the current one from `next`.
    fn rest(&self, ranges: &[FetchRange]) -> Vec<FetchRange> {
        let mut rest = ranges.get(self.idx..).unwrap_or_default().to_vec();
        if let Some(first) = rest.first_mut() {
            let end = first.offset.saturating_add(first.length);
            first.length = end.saturating_sub(self.next);
            first.offset = self.next;
        }
        rest
    }
}

/// One attempt at a batch: streams it, checking that chunks follow the requested ranges, and
/// sends pieces, moving `at` and `stall` on as they arrive and adding the file bytes it hands
/// over to `delivered`.
#[allow(clippy::too_many_arguments)]
async fn stream_batch<T: Transport>(
    transport: &T,
    ranges: &[FetchRange],
    at: &mut Cursor,
    (level, limit): (i32, u64),
    (retry, op): (&Retry, RetryOp),
    stall: &mut Stall,
    tx: &mpsc::Sender<Result<Piece, SourceError>>,
    delivered: &mut u64,
) -> Result<(), SourceError> {
    let silent = |stall: &Stall| {
        let budget = stall.budget(Instant::now());
        let what = format!("ReadRanges: nothing in {:.1} s", budget.as_secs_f64());
        (budget, what)
    };
    let (budget, what) = silent(stall);
    let mut stream =
        tokio::time::timeout(budget, transport.read_ranges(read_request(ranges, level)))
            .await
            .map_err(|_| SourceError::Timeout(what))?
            .map_err(|s| status_err("ReadRanges", s))?;
    let mut received = false;
    loop {
        if received {
            // The clock runs from when the last chunk was handed over, not received: a writer
            // held back by --max-rate is not a stalled source.
            let now = Instant::now();
            if let Some(stalled) = stall.ridden_out(now) {
                retry.log.recovered(stalled);
            }
            stall.progress(now);
        }
        let (budget, what) = silent(stall);
        let Some(chunk) = tokio::time::timeout(budget, stream.next())
            .await
            .map_err(|_| SourceError::Timeout(what))?
            .map_err(|s| status_err("ReadRanges", s))?
        else {
            break;
        };
        received = true;
        let next = at.next;
        let Some(r) = ranges.get(at.idx) else {
            return Err(proto_err("ReadRanges", "a chunk past the requested ranges"));
        };
        let end = r.offset.saturating_add(r.length);
        if chunk.path != r.path || chunk.offset != next {
            return Err(proto_err(
                "ReadRanges",
                format!(
                    "chunk for {:?} at {} where {:?} at {next} was due",
                    chunk.path, chunk.offset, r.path
                ),
            ));
        }
        let path: Arc<str> = Arc::from(r.path.as_str());
        let st = pb::ChunkStatus::try_from(chunk.status)
            .map_err(|_| proto_err("ReadRanges", format!("chunk status {}", chunk.status)))?;
        if st == pb::ChunkStatus::Vanished {
            if tx.send(Ok(Piece::Vanished { path })).await.is_err() {
                return Ok(());
            }
            at.step(ranges);
            at.skip_done(ranges);
            continue;
        }
        if chunk.raw_length > end - next {
            return Err(proto_err(
                "ReadRanges",
                format!(
                    "chunk of {} bytes at {next} of {:?} runs past the requested end {end}",
                    chunk.raw_length, r.path
                ),
            ));
        }
        let raw_length = chunk.raw_length;
        let mut attempt =
            wire::decode_shared(chunk.codec, chunk.data, &chunk.hash, raw_length, limit);
        if matches!(attempt, Err(WireError::HashMismatch { .. })) {
            // Damaged on the way (or on the server's disk between two reads): ask once more.
            retry.log.retried(RetryCause::Checksum, op);
            attempt = refetch(transport, r, next, raw_length, level, limit).await;
        }
        let data = attempt.map_err(|e| {
            proto_err(
                "ReadRanges",
                format!("chunk of {:?} at {next}: {e}", r.path),
            )
        })?;
        let got = data.len() as u64;
        if !data.is_empty()
            && tx
                .send(Ok(Piece::Data {
                    path: path.clone(),
                    offset: next,
                    data,
                }))
                .await
                .is_err()
        {
            return Ok(());
        }
        at.next += got;
        *delivered += got;
        if st == pb::ChunkStatus::Short {
            if tx
                .send(Ok(Piece::Short {
                    path,
                    size: at.next,
                }))
                .await
                .is_err()
            {
                return Ok(());
            }
            at.step(ranges);
        } else if got == 0 {
            return Err(proto_err("ReadRanges", "an empty chunk that is not Short"));
        }
        at.skip_done(ranges);
    }
    if let Some(r) = ranges.get(at.idx) {
        // A call that ends early lost its connection (a failbackd that restarted, a proxy that
        // cut it): ask again for the rest.
        return Err(SourceError::Lost(format!(
            "ReadRanges: the stream ended before {:?} at {}",
            r.path, at.next
        )));
    }
    Ok(())
}

/// Asks for one chunk again after a hash mismatch.
async fn refetch<T: Transport>(
    transport: &T,
    r: &FetchRange,
    offset: u64,
    length: u64,
    level: i32,
    limit: u64,
) -> Result<Bytes, WireError> {
    let one = FetchRange {
        path: r.path.clone(),
        offset,
        length,
    };
    // The retry runs while the batch's own call is still open: on a transport whose calls are
    // limited per connection (QUIC stream credit), it could wait for a call that waits for it.
    let again = async {
        match transport
            .read_ranges(read_request(std::slice::from_ref(&one), level))
            .await
        {
            Ok(mut s) => s.next().await.ok().flatten(),
            Err(_) => None,
        }
    };
    let chunk = tokio::time::timeout(REFETCH_TIMEOUT, again)
        .await
        .ok()
        .flatten();
    match chunk {
        Some(c) if c.offset == offset && c.path == r.path && c.raw_length == length => {
            wire::decode_shared(c.codec, c.data, &c.hash, c.raw_length, limit)
        }
        _ => Err(WireError::HashMismatch { raw_length: length }),
    }
}

/// Where `--compress auto`'s two probes are taken: two consecutive requests each within one
/// file, from the middle of the copy on if there are such. The bulk of a copy is large
/// relation files; its first requests are mostly catalogs, and requests over many small files
/// (a live source's small files are asked for a mebibyte each) deliver far less than they ask,
/// so they measure little and compress unlike the bulk.
fn probe_batches(batches: &[Vec<FetchRange>]) -> usize {
    let one_file = |b: &Vec<FetchRange>| b.windows(2).all(|w| w[0].path == w[1].path);
    let pair = |k: usize| {
        batches
            .get(k..k + 2)
            .is_some_and(|p| p.iter().all(one_file))
    };
    let middle = batches.len().saturating_sub(2) / 2;
    (middle..batches.len())
        .chain(0..middle)
        .find(|&k| pair(k))
        .unwrap_or(middle)
}

/// The first `most` bytes a batch asks for, and the rest (a range cut where they run out).
fn cut_batch(batch: Vec<FetchRange>, most: u64) -> (Vec<FetchRange>, Vec<FetchRange>) {
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    let mut left = most;
    for r in batch {
        if left == 0 {
            rest.push(r);
            continue;
        }
        let (head, tail) = r.cut(left);
        left -= head.length;
        first.push(head);
        rest.extend(tail);
    }
    (first, rest)
}

/// The most pieces the first `most` bytes of `batch` come back as, in chunks of at most
/// `chunk` bytes: one per chunk of each range, and a Short after each.
fn pieces(batch: &[FetchRange], most: u64, chunk: u64) -> usize {
    let mut left = most;
    let mut n = 0u64;
    for r in batch {
        if left == 0 {
            break;
        }
        let len = r.length.min(left);
        left -= len;
        n += len.div_ceil(chunk.max(1)).max(1) + 1;
    }
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Groups ranges into requests of about [`BATCH_BYTES`] (at most twice that), cutting a
/// longer range (a run of changed blocks, a whole relation segment) into pieces of that size:
/// one request of a hundred megabytes would be read and compressed by one thread of the source
/// and held in flight whole, and `--compress auto`'s probe of it would be sent stored, alone,
/// at the link's raw rate. A file that ends before a piece does is reported Short by every
/// piece from there on, each at its own offset: the target keeps the shortest
/// ([`Target::cut_short`](crate::target::Target::cut_short)).
fn batches(ranges: &[FetchRange]) -> Vec<Vec<FetchRange>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let (mut bytes, mut encoded) = (0u64, 0usize);
    for whole in ranges {
        let mut left = Some(whole.clone());
        while let Some(r) = left {
            let (piece, rest) = r.cut(BATCH_BYTES);
            bytes = bytes.saturating_add(piece.length);
            // A range's path, two varints and its framing.
            encoded += piece.path.len() + 32;
            cur.push(piece);
            if bytes >= BATCH_BYTES || cur.len() >= BATCH_RANGES || encoded >= MAX_REQUEST / 2 {
                out.push(std::mem::take(&mut cur));
                (bytes, encoded) = (0, 0);
            }
            left = rest;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl<T: Transport> Source for RemoteSource<T> {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn control_file(&mut self) -> Result<Vec<u8>, SourceError> {
        let r = match Early::take(&self.rt, &mut self.early.control) {
            Some(r) => r,
            None => self.call("global/pg_control", RetryOp::ControlFile, |t| async move {
                t.control_file().await
            })?,
        };
        Ok(r.data.to_vec())
    }

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let _ = self.early_timelines();
        if let Some(h) = self.early.histories.get(path) {
            return Ok(Some(h.clone()));
        }
        let mut out = Vec::new();
        let mut complete = true;
        let mut fetch = self.fetch_as(
            vec![FetchRange {
                path: path.to_string(),
                offset: 0,
                length: MAX_SMALL_FILE + 1,
            }],
            RetryOp::ReadFile,
        )?;
        while let Some(piece) = fetch.next()? {
            match piece {
                Fetched::Data { data, .. } => out.extend_from_slice(data),
                Fetched::Short { .. } => complete = false,
                Fetched::Vanished { .. } => return Ok(None),
            }
        }
        if complete {
            return Err(SourceError::Refused {
                what: path.to_string(),
                reason: format!("larger than {MAX_SMALL_FILE} bytes"),
            });
        }
        Ok(Some(out))
    }

    fn list_files(&mut self) -> Result<Vec<FileEntry>, SourceError> {
        let early = Early::take(&self.rt, &mut self.early.files)
            .filter(|_| self.early.asked.elapsed() <= EARLY_LIST_MAX_AGE);
        let entries = match early {
            Some(r) => r,
            None => self.call("the file list", RetryOp::List, |t| async move {
                t.list_files().await
            })?,
        };
        entries
            .into_iter()
            .map(|e| {
                let file_type = match pb::FileType::try_from(e.file_type) {
                    Ok(pb::FileType::Regular) => FileType::Regular,
                    Ok(pb::FileType::Directory) => FileType::Directory,
                    Ok(pb::FileType::Symlink) => FileType::Symlink,
                    _ => {
                        return Err(proto_err(
                            "the file list",
                            format!("{:?} has file type {}", e.path, e.file_type),
                        ));
                    }
                };
                Ok(FileEntry {
                    path: e.path,
                    file_type,
                    size: e.size,
                    link_target: (file_type == FileType::Symlink).then_some(e.link_target),
                })
            })
            .collect()
    }

    fn fetch(&mut self, ranges: Vec<FetchRange>) -> Result<Box<dyn Fetch + '_>, SourceError> {
        match self.ahead.take() {
            Some(ahead) => Ok(self.take_up(ahead, ranges)),
            None => self.fetch_as(ranges, RetryOp::Fetch),
        }
    }

    fn fetch_ahead(&mut self, ranges: Vec<FetchRange>) {
        let (ranges, beyond) = cut_batch(ranges, AHEAD_BYTES);
        if ranges.is_empty() {
            return;
        }
        let (more, rest) = oneshot::channel();
        let asked = range_sets(&ranges);
        // The plan asks for the blocks cut off too: a fetch that large probes now, before its
        // first requests, rather than compressing them all until the plan is made.
        let beyond = beyond.iter().map(|r| r.length).sum();
        let (rx, tasks) = self.dispatch(ranges, RetryOp::Fetch, Some(rest), beyond);
        if let Some(old) = self.ahead.replace(Ahead {
            asked,
            more,
            rx,
            tasks,
        }) {
            let _guard = self.rt.enter();
            drop(old);
        }
    }

    fn fetched_ahead(&self) -> u64 {
        self.ahead_arrived
    }

    fn retries(&self) -> RetryLog {
        self.retry.log.clone()
    }

    fn primary_conninfo(&self) -> Option<String> {
        Some(self.primary_conninfo.clone())
    }

    fn compression(&self) -> Option<String> {
        Some(lock_choice(&self.compression).summary())
    }

    fn is_live(&self) -> bool {
        // A running server without --pg-conn is live too: end_of_wal then reports failbackd's
        // refusal rather than letting the rewind take a wrong minRecoveryPoint.
        self.has(capability::LIVE) || self.has(capability::RUNNING)
    }

    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError> {
        if !self.is_live() {
            return Ok(None);
        }
        let r = match Early::take(&self.rt, &mut self.early.end_of_wal) {
            Some(r) => r,
            None => self.call(
                "the source's end of WAL",
                RetryOp::EndOfWal,
                |t| async move { t.end_of_wal().await },
            )?,
        };
        Ok(Some(SourceEnd {
            lsn: failback_common::Lsn(r.lsn),
            tli: r.timeline,
        }))
    }

    fn current_timeline(&mut self) -> Result<Option<failback_common::TimeLineId>, SourceError> {
        let r = match self.early_timelines() {
            Some(r) => r,
            None => self.call(
                "the source's timelines",
                RetryOp::Timelines,
                |t| async move { t.timelines().await },
            )?,
        };
        Ok((r.current_timeline != 0).then_some(r.current_timeline))
    }

    fn ask_ahead(&mut self, asks: &[super::Ask]) {
        let (rt, t, patience) = (&self.rt, &self.transports[0], self.retry.patience);
        for ask in asks {
            match ask {
                super::Ask::ControlFile => {
                    self.early.control =
                        ask_early(rt, t, patience, |t| async move { t.control_file().await });
                }
                super::Ask::EndOfWal if self.has(capability::LIVE) => {
                    self.early.end_of_wal =
                        ask_early(rt, t, patience, |t| async move { t.end_of_wal().await });
                }
                super::Ask::EndOfWal => {}
                // Not a head start but the call itself, retried as `close_window` would retry
                // it: closing is not repeatable (a second close finds no window), and
                // `pg_backup_stop` may wait on the archiver longer than a head start waits.
                super::Ask::CloseWindow => {
                    if let Some((id, _)) = &self.window
                        && self.closing.is_none()
                    {
                        self.closing =
                            Some(rt.spawn(end_window(t.clone(), self.retry.clone(), *id)));
                    }
                }
            }
        }
    }

    fn chunk_hashes(
        &mut self,
        paths: &[String],
        chunk_size: u64,
    ) -> Result<Option<Vec<super::FileHashes>>, SourceError> {
        if !self.has(capability::CHUNK_HASHES) {
            return Ok(None);
        }
        let asks: Vec<(&str, Option<&[ByteRange]>)> =
            paths.iter().map(|p| (p.as_str(), None)).collect();
        self.ask_hashes(&asks, chunk_size)
    }

    fn hashes_ranges(&self) -> bool {
        self.has(capability::CHUNK_HASHES) && self.has(capability::HASH_RANGES)
    }

    fn range_hashes(
        &mut self,
        asks: &[(String, Vec<ByteRange>)],
        chunk_size: u64,
    ) -> Result<Option<Vec<super::FileHashes>>, SourceError> {
        if !self.hashes_ranges() {
            return Ok(None);
        }
        let asks: Vec<(&str, Option<&[ByteRange]>)> = asks
            .iter()
            .map(|(p, r)| (p.as_str(), Some(r.as_slice())))
            .collect();
        self.ask_hashes(&asks, chunk_size)
    }

    fn open_window(&mut self, label: &str) -> Result<Option<WindowStart>, SourceError> {
        if !self.is_live() {
            return Ok(None);
        }
        if !self.has(capability::BACKUP_WINDOW) {
            return Err(self.refuse_window(
                "this failbackd cannot hold a backup window on its running server (it has no \
                 --pg-conn, or is older than this client)",
            ));
        }
        // One attempt: a window belongs to the call that opened it, and a retry would open
        // another.
        let req = pb::BackupWindowRequest {
            label: label.to_string(),
        };
        let t = self.transports[0].clone();
        let limit = self.retry.patience.timeout;
        let opened = self
            .rt
            .block_on(async { tokio::time::timeout(limit, t.backup_window(req)).await })
            .map_err(|_| {
                SourceError::Timeout(format!("BackupWindow: no answer in {} s", limit.as_secs()))
            })?
            .map_err(|s| status_err("BackupWindow", s))?;
        let (reply, held) = opened;
        self.window = Some((reply.window_id, held));
        Ok(Some(WindowStart {
            start: failback_common::Lsn(reply.start_lsn),
            tli: reply.timeline,
        }))
    }

    fn close_window(&mut self) -> Result<WindowEnd, SourceError> {
        let Some((id, _)) = &self.window else {
            return Err(self.refuse_window("no backup window is open"));
        };
        // The window's call stays open (and the WAL written during it reserved) until the
        // source is dropped, after that WAL is fetched.
        let closing = match self.closing.take() {
            Some(c) => c,
            None => self.rt.spawn(end_window(
                self.transports[0].clone(),
                self.retry.clone(),
                *id,
            )),
        };
        let r = self
            .rt
            .block_on(closing)
            .map_err(|e| SourceError::Transport(format!("EndBackupWindow: {e}")))??;
        Ok(WindowEnd {
            stop: failback_common::Lsn(r.stop_lsn),
            tli: r.timeline,
            backup_label: r.backup_label,
        })
    }

    fn changes(
        &mut self,
        since: failback_common::Lsn,
        until: Option<failback_common::Lsn>,
    ) -> Result<ChangesAnswer, SourceError> {
        if !self.has(capability::CHANGES) {
            return Ok(ChangesAnswer::Unknown {
                why: "this failbackd cannot read its WAL (no \"changes\" capability)".into(),
            });
        }
        let req = pb::ChangesRequest {
            since_lsn: since.0,
            until_lsn: until.map_or(0, |u| u.0),
        };
        let replies = self.call("Changes", RetryOp::Changes, |t| {
            async move {
                match t.changes(req).await {
                    Ok(v) => Ok(Ok(v)),
                    // The WAL since then is gone on the source: not an error of the rewind's.
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        Ok(Err(s.message().to_string()))
                    }
                    Err(s) => Err(s),
                }
            }
        })?;
        let replies = match replies {
            Ok(r) => r,
            Err(why) => return Ok(ChangesAnswer::Unknown { why }),
        };
        changes_from_replies(replies).map(ChangesAnswer::Found)
    }
}

/// Ends the backup window `id`, retried as any call is.
async fn end_window<T: Transport>(
    t: T,
    retry: Retry,
    id: u64,
) -> Result<pb::EndBackupWindowResponse, SourceError> {
    patiently(
        &t,
        &retry,
        "EndBackupWindow",
        RetryOp::Window,
        |t| async move {
            t.end_backup_window(pb::EndBackupWindowRequest { window_id: id })
                .await
        },
    )
    .await
}

/// The changes Changes replied, checked: whole bitmaps of bounded size, one last reply.
fn changes_from_replies(
    replies: Vec<pb::ChangesReply>,
) -> Result<failback_datadir::wal::SourceChanges, SourceError> {
    use failback_common::changes::Changes;
    use failback_common::plan::BlockBitmap;
    use failback_common::relpath::RelFileLocator;
    let mut changes = Changes::default();
    let Some(last) = replies.last() else {
        return Err(proto_err("Changes", "no reply"));
    };
    if !last.done || replies.iter().rev().skip(1).any(|r| r.done) {
        return Err(proto_err(
            "Changes",
            "the replies do not end with the one last reply",
        ));
    }
    let (until, records, summarized_segments) =
        (last.until_lsn, last.records, last.summarized_segments);
    for r in replies {
        for f in r.files {
            if f.block_bitmap.len() > failback_proto::limits::MAX_BLOCK_BITMAP {
                return Err(proto_err(
                    "Changes",
                    format!(
                        "a block bitmap of {} bytes for {:?}",
                        f.block_bitmap.len(),
                        f.path
                    ),
                ));
            }
            let blocks = BlockBitmap::from_le_bytes(&f.block_bitmap).ok_or_else(|| {
                proto_err(
                    "Changes",
                    format!("{:?}: a bitmap of partial words", f.path),
                )
            })?;
            changes.page_map.files.insert(f.path, blocks);
        }
        changes.created.extend(
            r.created
                .iter()
                .map(|l| RelFileLocator::new(l.spc_oid, l.db_oid, l.rel_number)),
        );
        changes
            .databases
            .extend(r.databases.iter().map(|d| (d.spc_oid, d.db_oid)));
    }
    Ok(failback_datadir::wal::SourceChanges {
        changes,
        until: failback_common::Lsn(until),
        records,
        summarized_segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a fetch hands over, in words: `path@offset+len`, `path short@size`, `path gone`.
    fn handed_over(fetch: &mut RemoteFetch<'_>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(p) = fetch.next().unwrap() {
            out.push(match p {
                Fetched::Data { path, offset, data } => {
                    let at = |i: usize| ((offset + i as u64) % 251) as u8;
                    let right = data.iter().enumerate().all(|(i, &b)| b == at(i));
                    assert!(right, "{path}@{offset}: bytes from elsewhere");
                    format!("{path}@{offset}+{}", data.len())
                }
                Fetched::Short { path, size } => format!("{path} short@{size}"),
                Fetched::Vanished { path } => format!("{path} gone"),
            });
        }
        out
    }

    #[test]
    fn a_fetch_begun_ahead_hands_over_only_what_the_plan_wants() {
        let rt = runtime("the test").unwrap();
        let (tx, rx) = mpsc::channel(16);
        // Bytes whose value says their offset, so that a part cut from the wrong place shows.
        let data = |path: &str, offset: u64, len: u64| {
            Ok(Piece::Data {
                path: Arc::from(path),
                offset,
                data: (offset..offset + len).map(|o| (o % 251) as u8).collect(),
            })
        };
        let arrived = [
            data("base/5/1", 0, 100),
            data("base/5/2", 0, 50),
            Ok(Piece::Short {
                path: Arc::from("base/5/2"),
                size: 50,
            }),
            Ok(Piece::Vanished {
                path: Arc::from("base/5/3"),
            }),
        ];
        let later = [
            data("base/5/1", 100, 20),
            Ok(Piece::Vanished {
                path: Arc::from("base/5/4"),
            }),
        ];
        let mut fetch = RemoteFetch {
            rt: &rt,
            rx,
            tasks: tokio::task::JoinSet::new(),
            choice: Arc::new(std::sync::Mutex::new(CompressionChoice::new(
                CompressPolicy::Fixed(Compression::None),
            ))),
            ready: arrived.into_iter().collect(),
            wanted: None,
            piece: None,
            parts: VecDeque::new(),
        };
        // The plan wants two stretches of file 1 and all of file 4; files 2 and 3 were dropped
        // or cut since the fetch began.
        let plan = [
            ("base/5/1", 10, 20),
            ("base/5/1", 60, 50),
            ("base/5/4", 0, 8),
        ];
        let plan: Vec<FetchRange> = plan
            .iter()
            .map(|&(path, offset, length)| FetchRange {
                path: path.into(),
                offset,
                length,
            })
            .collect();
        fetch.wanted = Some(range_sets(&plan));
        rt.block_on(async {
            for p in later {
                tx.send(p).await.unwrap();
            }
        });
        drop(tx);
        assert_eq!(
            handed_over(&mut fetch),
            [
                "base/5/1@10+20",
                "base/5/1@60+40",
                "base/5/1@100+10",
                "base/5/4 gone"
            ]
        );
    }

    #[test]
    fn statuses_are_retried_for_what_they_say_of_the_link() {
        // tonic keeps the I/O error under a transport status.
        let io = |k: std::io::ErrorKind| {
            let mut s = Status::unavailable("transport error");
            s.set_source(Arc::new(std::io::Error::from(k)));
            s
        };
        let c = |s: Status| status_cause(&s);
        assert_eq!(
            c(io(std::io::ErrorKind::ConnectionReset)),
            RetryCause::ConnectionLost
        );
        let refused = io(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(c(refused), RetryCause::Unavailable);
        assert_eq!(
            c(Status::unavailable("failbackd is shutting down")),
            RetryCause::Unavailable
        );
        assert_eq!(
            c(Status::unavailable("QUIC: connection lost: reset by peer")),
            RetryCause::ConnectionLost
        );
        assert_eq!(
            c(Status::unavailable("QUIC: connection lost: timed out")),
            RetryCause::Timeout
        );
        assert_eq!(c(Status::deadline_exceeded("")), RetryCause::Timeout);
        assert_eq!(
            c(Status::unknown(
                "h2 protocol error: error reading a body from connection"
            )),
            RetryCause::ConnectionLost
        );
        assert_eq!(c(Status::internal("odd")), RetryCause::Transport);
        // The error says the same.
        assert!(matches!(
            status_err(
                "ReadRanges",
                Status::unavailable("failbackd is shutting down")
            ),
            SourceError::Unavailable(_)
        ));
        assert!(matches!(
            status_err("ReadRanges", Status::unknown("connection reset")),
            SourceError::Lost(_)
        ));
        assert!(matches!(
            status_err("ReadRanges", Status::not_found("x")),
            SourceError::Refused { .. }
        ));
    }

    #[test]
    fn a_probe_counts_its_pieces_as_they_come_back() {
        let r = |offset: u64, length: u64| FetchRange {
            path: "base/5/1".into(),
            offset,
            length,
        };
        const MIB: u64 = 1 << 20;
        // A run of changed blocks: a piece per chunk of the probe's 4 MiB, and a Short.
        assert_eq!(pieces(&[r(0, 16 * MIB)], 4 * MIB, MIB), 5);
        assert_eq!(pieces(&[r(0, 16 * MIB)], 4 * MIB, 64 << 10), 65);
        // Blocks one by one: a piece and a Short each, for the 512 of them within 4 MiB.
        let pages: Vec<FetchRange> = (0..1000).map(|b| r(b * 16384, 8192)).collect();
        assert_eq!(pieces(&pages, 4 * MIB, MIB), 1024);
        assert_eq!(pieces(&[], 4 * MIB, MIB), 0);
    }

    #[test]
    fn batches_group_ranges_whole_and_in_order() {
        let r = |p: &str, o, l| FetchRange {
            path: p.into(),
            offset: o,
            length: l,
        };
        let input = [
            r("a", 0, 40 << 20),
            r("b", 8192, 8192),
            r("c", 0, 0),
            r("d", 0, 10 << 20),
            r("e", 0, 10 << 20),
        ];
        let b = batches(&input);
        // A range longer than a request is cut into requests of 16 MiB; each request closes
        // at 16 MiB.
        let m = 1 << 20;
        assert_eq!(
            b,
            vec![
                vec![r("a", 0, 16 * m)],
                vec![r("a", 16 * m, 16 * m)],
                vec![
                    r("a", 32 * m, 8 * m),
                    input[1].clone(),
                    input[2].clone(),
                    input[3].clone()
                ],
                vec![input[4].clone()],
            ]
        );
        let many: Vec<FetchRange> = (0..40).map(|i| r("f", i << 20, 1 << 20)).collect();
        let sizes: Vec<usize> = batches(&many).iter().map(Vec::len).collect();
        assert_eq!(sizes, [16, 16, 8]);
        // --compress auto probes two requests within one file each, from the middle on.
        let mixed: Vec<Vec<FetchRange>> = vec![
            vec![r("x", 0, 1), r("y", 0, 1)],
            vec![r("f", 0, 1)],
            vec![r("f", 1, 1)],
            vec![r("x", 0, 1), r("y", 0, 1)],
            vec![r("g", 0, 1), r("g", 5, 1)],
            vec![r("h", 0, 1)],
        ];
        assert_eq!(probe_batches(&mixed), 4);
        // A probe asks for the first bytes of its batch; the rest goes back in the queue.
        let (probe, rest) = cut_batch(vec![r("p", 0, 3 * m), r("p", 8 * m, 3 * m)], 4 * m);
        assert_eq!(probe, [r("p", 0, 3 * m), r("p", 8 * m, m)]);
        assert_eq!(rest, [r("p", 9 * m, 2 * m)]);
        let (probe, rest) = cut_batch(vec![r("p", 0, m)], 4 * m);
        assert_eq!((probe, rest), (vec![r("p", 0, m)], vec![]));
        assert_eq!(probe_batches(&mixed[..4]), 1);
        assert_eq!(probe_batches(&mixed[..1]), 0);
    }
}
