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
//! The engine is synchronous; a source owns a small tokio runtime and blocks on it, while every
//! piece is handed to the sink on the calling thread.

use std::future::Future;
use std::sync::Arc;

use failback_common::filemap::{FileEntry, FileType};
use failback_common::wire::{self, Compression, WireError};
use failback_proto::v1 as pb;
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, mpsc};
use tonic::{Code, Status};

use super::{FetchRange, Fetched, Source, SourceEnd, SourceError};

/// Bytes per ReadRanges request: large enough to stream, small enough to spread over jobs.
const BATCH_BYTES: u64 = 16 << 20;
/// Ranges per ReadRanges request (the server accepts up to 65536).
const BATCH_RANGES: usize = 4096;
/// The largest whole file [`Source::read_file`] fetches (history files are a few KB).
const MAX_SMALL_FILE: u64 = 64 << 20;
/// How long the retry of a damaged chunk may take before the damage is reported.
const REFETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The largest chunk accepted whatever the server announces.
pub(crate) const MAX_CHUNK_LIMIT: u64 = failback_server::MAX_MAX_CHUNK;
/// Paths per ChunkHashes request (the server accepts up to 4096).
const HASH_BATCH: usize = 1024;
/// The largest reply message accepted: a chunk and its framing.
pub(crate) const MAX_REPLY: usize = (MAX_CHUNK_LIMIT + (1 << 16)) as usize;

/// How to reach failbackd.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// `grpc://host:port`, `grpcs://host:port` or `quic://host:port`.
    pub url: String,
    /// PEM CA certificate(s) the server's certificate must chain to (`grpcs://`, `quic://`).
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and key presented to a server that asks for client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub token: Option<String>,
    /// ReadRanges requests in flight at once (at least 1).
    pub jobs: usize,
    pub compression: Compression,
}

impl RemoteOptions {
    pub(crate) fn refuse(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Refused {
            what: self.url.clone(),
            reason: reason.into(),
        }
    }
}

/// Connects to the failbackd `opts.url` names, by its scheme.
pub fn connect(opts: RemoteOptions) -> Result<Box<dyn Source>, SourceError> {
    if opts.url.starts_with("quic://") {
        Ok(Box::new(super::quic::QuicSource::connect(opts)?))
    } else if opts.url.starts_with("grpc://") || opts.url.starts_with("grpcs://") {
        Ok(Box::new(super::grpc::GrpcSource::connect(opts)?))
    } else {
        Err(opts.refuse("the source URL must start with grpc://, grpcs:// or quic://"))
    }
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

    /// Says goodbye, so the server frees the connection now rather than at its idle timeout.
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
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
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
        Code::DeadlineExceeded => SourceError::Timeout(format!("{what}: {reason}")),
        _ => SourceError::Transport(format!("{what}: {reason}")),
    }
}

fn proto_err(what: &str, why: impl std::fmt::Display) -> SourceError {
    SourceError::Transport(format!("{what}: {why}"))
}

/// failbackd through transport `T`.
pub struct RemoteSource<T: Transport> {
    rt: Runtime,
    transport: T,
    url: String,
    jobs: usize,
    compression: Compression,
    max_chunk: u64,
    /// Handshake capabilities: failbackd knows the server's end of WAL (`live`), PostgreSQL
    /// runs on the served directory (`running`), ChunkHashes is served (`chunk-hashes`).
    capabilities: Vec<String>,
}

impl<T: Transport> RemoteSource<T> {
    /// Shakes hands over a connected transport: the protocol version must match and the
    /// announced chunk size be sane.
    pub(crate) fn handshake(
        rt: Runtime,
        transport: T,
        opts: RemoteOptions,
    ) -> Result<Self, SourceError> {
        let hs = rt
            .block_on(transport.handshake(pb::HandshakeRequest {
                protocol_version: failback_proto::PROTOCOL_VERSION,
                client_version: env!("CARGO_PKG_VERSION").into(),
            }))
            .map_err(|s| status_err("the handshake", s))?;
        if hs.protocol_version != failback_proto::PROTOCOL_VERSION {
            return Err(opts.refuse(format!(
                "failbackd speaks protocol {}, this client {}",
                hs.protocol_version,
                failback_proto::PROTOCOL_VERSION
            )));
        }
        if hs.max_chunk == 0 || hs.max_chunk > MAX_CHUNK_LIMIT {
            return Err(opts.refuse(format!(
                "failbackd announces chunks of {} bytes (1 .. {MAX_CHUNK_LIMIT} accepted)",
                hs.max_chunk
            )));
        }
        Ok(RemoteSource {
            rt,
            transport,
            url: opts.url,
            jobs: opts.jobs.max(1),
            compression: opts.compression,
            max_chunk: hs.max_chunk,
            capabilities: hs.capabilities,
        })
    }

    fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

impl<T: Transport> Drop for RemoteSource<T> {
    fn drop(&mut self) {
        let close = self.transport.close();
        self.rt.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
        });
    }
}

/// What a batch task hands to the calling thread.
enum Piece {
    Data {
        path: Arc<str>,
        offset: u64,
        data: Vec<u8>,
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

/// Streams one batch, checking that chunks follow the requested ranges, and sends pieces.
async fn run_batch<T: Transport>(
    transport: T,
    ranges: Vec<FetchRange>,
    level: i32,
    limit: u64,
    tx: mpsc::Sender<Result<Piece, SourceError>>,
) -> Result<(), SourceError> {
    let mut stream = transport
        .read_ranges(read_request(&ranges, level))
        .await
        .map_err(|s| status_err("ReadRanges", s))?;
    let mut idx = 0usize;
    let mut next = ranges.first().map_or(0, |r| r.offset);
    // Zero-length ranges get no chunk.
    let skip_empty = |idx: &mut usize, next: &mut u64| {
        while let Some(r) = ranges.get(*idx) {
            if *next < r.offset.saturating_add(r.length) {
                break;
            }
            *idx += 1;
            *next = ranges.get(*idx).map_or(0, |r| r.offset);
        }
    };
    skip_empty(&mut idx, &mut next);
    let mut buf = Vec::new();
    while let Some(chunk) = stream
        .next()
        .await
        .map_err(|s| status_err("ReadRanges", s))?
    {
        let Some(r) = ranges.get(idx) else {
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
            idx += 1;
            next = ranges.get(idx).map_or(0, |r| r.offset);
            skip_empty(&mut idx, &mut next);
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
        let mut attempt = wire::decode_into(
            chunk.codec,
            &chunk.data,
            &chunk.hash,
            chunk.raw_length,
            limit,
            &mut buf,
        );
        if matches!(attempt, Err(WireError::HashMismatch { .. })) {
            // Damaged on the way (or on the server's disk between two reads): ask once more.
            attempt = refetch(
                &transport,
                r,
                next,
                chunk.raw_length,
                level,
                limit,
                &mut buf,
            )
            .await;
        }
        attempt.map_err(|e| {
            proto_err(
                "ReadRanges",
                format!("chunk of {:?} at {next}: {e}", r.path),
            )
        })?;
        let got = buf.len() as u64;
        if !buf.is_empty()
            && tx
                .send(Ok(Piece::Data {
                    path: path.clone(),
                    offset: next,
                    data: std::mem::take(&mut buf),
                }))
                .await
                .is_err()
        {
            return Ok(());
        }
        next += got;
        if st == pb::ChunkStatus::Short {
            if tx
                .send(Ok(Piece::Short { path, size: next }))
                .await
                .is_err()
            {
                return Ok(());
            }
            idx += 1;
            next = ranges.get(idx).map_or(0, |r| r.offset);
        } else if got == 0 {
            return Err(proto_err("ReadRanges", "an empty chunk that is not Short"));
        }
        skip_empty(&mut idx, &mut next);
    }
    if let Some(r) = ranges.get(idx) {
        return Err(proto_err(
            "ReadRanges",
            format!("the stream ended before {:?} at {next}", r.path),
        ));
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
    buf: &mut Vec<u8>,
) -> Result<(), WireError> {
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
            wire::decode_into(c.codec, &c.data, &c.hash, c.raw_length, limit, buf)
        }
        _ => Err(WireError::HashMismatch { raw_length: length }),
    }
}

/// Groups ranges into requests. A range is never split between requests: a file that ends
/// early must be reported Short once, at its real size.
fn batches(ranges: &[FetchRange]) -> Vec<Vec<FetchRange>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0u64;
    for r in ranges {
        cur.push(r.clone());
        bytes = bytes.saturating_add(r.length);
        if bytes >= BATCH_BYTES || cur.len() >= BATCH_RANGES {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
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
        let r = self
            .rt
            .block_on(self.transport.control_file())
            .map_err(|s| status_err("global/pg_control", s))?;
        Ok(r.data.to_vec())
    }

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let mut out = Vec::new();
        let mut vanished = false;
        let range = FetchRange {
            path: path.to_string(),
            offset: 0,
            length: MAX_SMALL_FILE + 1,
        };
        let mut complete = true;
        self.fetch(std::slice::from_ref(&range), &mut |p| {
            match p {
                Fetched::Data { data, .. } => out.extend_from_slice(data),
                Fetched::Short { .. } => complete = false,
                Fetched::Vanished { .. } => vanished = true,
            }
            Ok(())
        })?;
        if vanished {
            return Ok(None);
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
        let entries = self
            .rt
            .block_on(self.transport.list_files())
            .map_err(|s| status_err("the file list", s))?;
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

    fn fetch(
        &mut self,
        ranges: &[FetchRange],
        sink: &mut dyn FnMut(Fetched<'_>) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        let batches = batches(ranges);
        if batches.is_empty() {
            return Ok(());
        }
        let (tx, mut rx) = mpsc::channel::<Result<Piece, SourceError>>(self.jobs * 4);
        let permits = Arc::new(Semaphore::new(self.jobs));
        let mut tasks = tokio::task::JoinSet::new();
        let level = self.compression.level();
        for b in batches {
            let (transport, tx, permits) = (self.transport.clone(), tx.clone(), permits.clone());
            let limit = self.max_chunk;
            tasks.spawn_on(
                async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    if let Err(e) = run_batch(transport, b, level, limit, tx.clone()).await {
                        let _ = tx.send(Err(e)).await;
                    }
                },
                self.rt.handle(),
            );
        }
        drop(tx);
        // Every sender is dropped once all batches are done: then recv() says None.
        let result = loop {
            let Some(piece) = self.rt.block_on(rx.recv()) else {
                break Ok(());
            };
            let r = match piece {
                Err(e) => Err(e),
                Ok(Piece::Data { path, offset, data }) => sink(Fetched::Data {
                    path: &path,
                    offset,
                    data: &data,
                }),
                Ok(Piece::Short { path, size }) => sink(Fetched::Short { path: &path, size }),
                Ok(Piece::Vanished { path }) => sink(Fetched::Vanished { path: &path }),
            };
            if let Err(e) = r {
                break Err(e);
            }
        };
        let _guard = self.rt.enter();
        tasks.abort_all();
        drop(tasks);
        result
    }

    fn is_live(&self) -> bool {
        // A running server without --pg-conn is live too: end_of_wal then reports failbackd's
        // refusal rather than letting the rewind take a wrong minRecoveryPoint.
        self.has("live") || self.has("running")
    }

    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError> {
        if !self.is_live() {
            return Ok(None);
        }
        let r = self
            .rt
            .block_on(self.transport.end_of_wal())
            .map_err(|s| status_err("the source's end of WAL", s))?;
        Ok(Some(SourceEnd {
            lsn: failback_common::Lsn(r.lsn),
            tli: r.timeline,
        }))
    }

    fn current_timeline(&mut self) -> Result<Option<failback_common::TimeLineId>, SourceError> {
        let r = self
            .rt
            .block_on(self.transport.timelines())
            .map_err(|s| status_err("the source's timelines", s))?;
        Ok((r.current_timeline != 0).then_some(r.current_timeline))
    }

    fn chunk_hashes(
        &mut self,
        paths: &[String],
        chunk_size: u64,
    ) -> Result<Option<Vec<super::FileHashes>>, SourceError> {
        if !self.has("chunk-hashes") {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(paths.len());
        for batch in paths.chunks(HASH_BATCH) {
            let got = self
                .rt
                .block_on(self.transport.chunk_hashes(pb::ChunkHashesRequest {
                    paths: batch.to_vec(),
                    chunk_size,
                }));
            let got = match got {
                Ok(v) => v,
                // Hashes only save bytes: a refusal (chunks too many, an older failbackd)
                // means fetching whole files, not failing.
                Err(s)
                    if matches!(
                        s.code(),
                        Code::InvalidArgument | Code::Unimplemented | Code::FailedPrecondition
                    ) =>
                {
                    return Ok(None);
                }
                Err(s) => return Err(status_err("ChunkHashes", s)),
            };
            if got.len() != batch.len() {
                return Err(proto_err(
                    "ChunkHashes",
                    format!("{} answers for {} paths", got.len(), batch.len()),
                ));
            }
            for (h, want) in got.into_iter().zip(batch) {
                if &h.path != want || h.chunk_size != chunk_size {
                    return Err(proto_err(
                        "ChunkHashes",
                        format!(
                            "hashes of {:?} in chunks of {} where {want:?} in chunks of \
                             {chunk_size} was due",
                            h.path, h.chunk_size
                        ),
                    ));
                }
                let hashes = h
                    .hashes
                    .iter()
                    .map(|b| <[u8; 32]>::try_from(b.as_ref()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        proto_err("ChunkHashes", format!("{want:?}: a hash is not 32 bytes"))
                    })?;
                out.push(super::FileHashes {
                    path: h.path,
                    size: h.size,
                    hashes,
                    vanished: h.vanished,
                });
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(b.len(), 2);
        assert_eq!(b[0], vec![input[0].clone()]);
        assert_eq!(b[1], input[1..].to_vec());
    }
}
