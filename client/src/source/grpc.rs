//! failbackd over gRPC (`--source grpc://host:port`, `grpcs://` for TLS).
//!
//! The engine is synchronous; this source owns a small tokio runtime and blocks on it. A
//! fetch splits its ranges into batches and keeps up to `jobs` ReadRanges streams in flight, so
//! a long link stays busy, while every piece is handed to the sink on the calling thread. Each
//! chunk is decoded and its blake3 verified by [`failback_common::wire`] before the sink sees
//! it; a chunk that fails verification is asked for once more, then reported. Chunks must
//! arrive for the requested ranges, in order, at the expected offsets: the server cannot make
//! the client write anywhere it did not ask for.

use std::sync::Arc;

use failback_common::filemap::{FileEntry, FileType};
use failback_common::wire::{self, Compression, WireError};
use failback_proto::v1 as pb;
use failback_proto::v1::failback_client::FailbackClient;
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, mpsc};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::{FetchRange, Fetched, Source, SourceEnd, SourceError};

/// Bytes per ReadRanges request: large enough to stream, small enough to spread over jobs.
const BATCH_BYTES: u64 = 16 << 20;
/// Ranges per ReadRanges request (the server accepts up to 65536).
const BATCH_RANGES: usize = 4096;
/// The largest whole file [`Source::read_file`] fetches (history files are a few KB).
const MAX_SMALL_FILE: u64 = 64 << 20;
/// The largest chunk accepted whatever the server announces.
const MAX_CHUNK_LIMIT: u64 = failback_server::MAX_MAX_CHUNK;

/// How to reach failbackd.
#[derive(Clone, Debug)]
pub struct GrpcOptions {
    /// `grpc://host:port` or `grpcs://host:port`.
    pub url: String,
    /// PEM CA certificate(s) the server's certificate must chain to (`grpcs://` only).
    pub ca: Option<Vec<u8>>,
    pub token: Option<String>,
    /// ReadRanges requests in flight at once (at least 1).
    pub jobs: usize,
    pub compression: Compression,
}

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

pub struct GrpcSource {
    rt: Runtime,
    client: Client,
    url: String,
    jobs: usize,
    compression: Compression,
    max_chunk: u64,
    /// Handshake capabilities: failbackd knows the server's end of WAL (`live`), PostgreSQL
    /// runs on the served directory (`running`), ChunkHashes is served (`chunk-hashes`).
    capabilities: Vec<String>,
}

/// Paths per ChunkHashes request (the server accepts up to 4096).
const HASH_BATCH: usize = 1024;

fn status_err(what: &str, s: Status) -> SourceError {
    let reason = format!("{} ({:?})", s.message(), s.code());
    match s.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::Unimplemented
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

impl GrpcSource {
    /// Connects and shakes hands: the protocol version must match.
    pub fn connect(opts: GrpcOptions) -> Result<GrpcSource, SourceError> {
        let refuse = |reason: String| SourceError::Refused {
            what: opts.url.clone(),
            reason,
        };
        let (tls, rest) = if let Some(r) = opts.url.strip_prefix("grpc://") {
            (false, r)
        } else if let Some(r) = opts.url.strip_prefix("grpcs://") {
            (true, r)
        } else {
            return Err(refuse(
                "the source URL must start with grpc:// or grpcs://".into(),
            ));
        };
        let http = format!("{}://{rest}", if tls { "https" } else { "http" });
        let mut endpoint = Endpoint::from_shared(http)
            .map_err(|e| refuse(format!("not a valid address: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .tcp_nodelay(true);
        if tls {
            let ca = opts
                .ca
                .clone()
                .ok_or_else(|| refuse("grpcs:// needs --ca".into()))?;
            let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .domain_name(host),
                )
                .map_err(|e| refuse(format!("TLS configuration: {e}")))?;
        } else if opts.ca.is_some() {
            return Err(refuse("--ca is for grpcs:// sources".into()));
        }
        let bearer = match &opts.token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| refuse("the token is not printable ASCII".into()))?,
            ),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| SourceError::Io {
                what: "the gRPC runtime".into(),
                source: e,
            })?;
        let channel = rt.block_on(endpoint.connect()).map_err(|e| {
            SourceError::Transport(format!("{}: could not connect: {}", opts.url, chain(&e)))
        })?;
        let mut client = FailbackClient::with_interceptor(channel, Bearer(bearer))
            .max_decoding_message_size((MAX_CHUNK_LIMIT + (1 << 16)) as usize);
        let hs = rt
            .block_on(client.handshake(pb::HandshakeRequest {
                protocol_version: failback_proto::PROTOCOL_VERSION,
                client_version: env!("CARGO_PKG_VERSION").into(),
            }))
            .map_err(|s| status_err("the handshake", s))?
            .into_inner();
        if hs.protocol_version != failback_proto::PROTOCOL_VERSION {
            return Err(refuse(format!(
                "failbackd speaks protocol {}, this client {}",
                hs.protocol_version,
                failback_proto::PROTOCOL_VERSION
            )));
        }
        if hs.max_chunk == 0 || hs.max_chunk > MAX_CHUNK_LIMIT {
            return Err(refuse(format!(
                "failbackd announces chunks of {} bytes (1 .. {MAX_CHUNK_LIMIT} accepted)",
                hs.max_chunk
            )));
        }
        Ok(GrpcSource {
            rt,
            client,
            url: opts.url,
            jobs: opts.jobs.max(1),
            compression: opts.compression,
            max_chunk: hs.max_chunk,
            capabilities: hs.capabilities,
        })
    }
}

/// An error and its causes on one line (tonic's own message is only "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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

/// Streams one batch, checking that chunks follow the requested ranges, and sends pieces.
async fn run_batch(
    mut client: Client,
    ranges: Vec<FetchRange>,
    level: i32,
    limit: u64,
    tx: mpsc::Sender<Result<Piece, SourceError>>,
) -> Result<(), SourceError> {
    let req = pb::ReadRangesRequest {
        ranges: ranges
            .iter()
            .map(|r| pb::Range {
                path: r.path.clone(),
                offset: r.offset,
                length: r.length,
            })
            .collect(),
        compression_level: level,
    };
    let mut stream = client
        .read_ranges(req)
        .await
        .map_err(|s| status_err("ReadRanges", s))?
        .into_inner();
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
        .message()
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
                &mut client,
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
    if idx < ranges.len() {
        return Err(proto_err(
            "ReadRanges",
            format!("the stream ended before {:?} at {next}", ranges[idx].path),
        ));
    }
    Ok(())
}

/// Asks for one chunk again after a hash mismatch.
async fn refetch(
    client: &mut Client,
    r: &FetchRange,
    offset: u64,
    length: u64,
    level: i32,
    limit: u64,
    buf: &mut Vec<u8>,
) -> Result<(), WireError> {
    let again = client
        .read_ranges(pb::ReadRangesRequest {
            ranges: vec![pb::Range {
                path: r.path.clone(),
                offset,
                length,
            }],
            compression_level: level,
        })
        .await;
    let chunk = match again {
        Ok(s) => s.into_inner().message().await.ok().flatten(),
        Err(_) => None,
    };
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

impl Source for GrpcSource {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn control_file(&mut self) -> Result<Vec<u8>, SourceError> {
        let mut c = self.client.clone();
        let r = self
            .rt
            .block_on(c.control_file(pb::ControlFileRequest {}))
            .map_err(|s| status_err("global/pg_control", s))?;
        Ok(r.into_inner().data.to_vec())
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
        let mut c = self.client.clone();
        self.rt.block_on(async move {
            let mut s = c
                .list_files(pb::ListFilesRequest {})
                .await
                .map_err(|s| status_err("the file list", s))?
                .into_inner();
            let mut out = Vec::new();
            while let Some(e) = s
                .message()
                .await
                .map_err(|s| status_err("the file list", s))?
            {
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
                out.push(FileEntry {
                    path: e.path,
                    file_type,
                    size: e.size,
                    link_target: (file_type == FileType::Symlink).then_some(e.link_target),
                });
            }
            Ok(out)
        })
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
            let (client, tx, permits) = (self.client.clone(), tx.clone(), permits.clone());
            let limit = self.max_chunk;
            tasks.spawn_on(
                async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    if let Err(e) = run_batch(client, b, level, limit, tx.clone()).await {
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
        let mut c = self.client.clone();
        let r = self
            .rt
            .block_on(c.end_of_wal(pb::EndOfWalRequest {}))
            .map_err(|s| status_err("the source's end of WAL", s))?
            .into_inner();
        Ok(Some(SourceEnd {
            lsn: failback_common::Lsn(r.lsn),
            tli: r.timeline,
        }))
    }

    fn current_timeline(&mut self) -> Result<Option<failback_common::TimeLineId>, SourceError> {
        let mut c = self.client.clone();
        let r = self
            .rt
            .block_on(c.timelines(pb::TimelinesRequest {}))
            .map_err(|s| status_err("the source's timelines", s))?
            .into_inner();
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
            let mut c = self.client.clone();
            let got = self.rt.block_on(async move {
                let mut s = c
                    .chunk_hashes(pb::ChunkHashesRequest {
                        paths: batch.to_vec(),
                        chunk_size,
                    })
                    .await?
                    .into_inner();
                let mut v = Vec::new();
                while let Some(h) = s.message().await? {
                    v.push(h);
                }
                Ok::<_, Status>(v)
            });
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

impl GrpcSource {
    fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
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
