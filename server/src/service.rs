//! The gRPC service (`failback.v1.Failback`) over one [`DataDir`]; QUIC serves the same.
//!
//! failbackd answers questions and decides nothing: every answer comes from the data
//! directory through [`DataDir`], so a path that is absolute, climbs with `..`, or follows a
//! symlink other than `pg_tblspc/*` and `pg_wal` is refused, and nothing outside the directory
//! is ever served. File bytes go out in chunks of at most `max_chunk` raw bytes, each encoded
//! and hashed by [`failback_common::wire`], so the client verifies every chunk whatever the
//! transport. Reads run on the blocking pool, one request at a time per stream, so a slow or
//! hostile client occupies one task and nothing else.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use failback_common::ControlFileData;
use failback_common::chunkdiff::{ByteRange, ChunkHash, WHOLE_FILE};
use failback_common::filemap::FileType;
use failback_common::wire::{self, Compression};
use failback_datadir::history::{files_timeline, history_files};
use failback_datadir::postmaster::running_postmaster;
use failback_datadir::summaries::WalSummaries;
use failback_datadir::wal::{SourceChangesError, source_changes};
use failback_datadir::{
    DataDir, DataDirError, HashError, ReadStatus, check_relative, hash_buffer, hash_ranges,
};
use failback_proto::capability;
use failback_proto::limits::{
    MAX_CHANGED_FILES_PER_REPLY, MAX_HASH_CHUNK, MAX_HASH_PATHS, MAX_HASH_RANGES,
    MAX_HASHES_PER_FILE, MAX_PATH_LEN, MAX_RANGES_PER_REQUEST, MAX_ZSTD_LEVEL, MIN_HASH_CHUNK,
};
use failback_proto::v1::failback_server::Failback;
use failback_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit::{Audit, Peer};
use crate::metrics::{Refusal, Transport};
use crate::readers::{
    DEFAULT_STALL_TIMEOUT, MAX_READERS, MAX_READERS_PER_CONNECTION, MAX_WORKERS_PER_CONNECTION,
    Outbox, Readers, Sent, Unbatched, max_workers,
};

/// Who sent `request`: QUIC names the connection in an extension; gRPC's connection is its
/// remote address.
pub fn peer_of<T>(request: &Request<T>) -> Peer {
    match request.extensions().get::<Peer>() {
        Some(p) => *p,
        None => Peer::tcp(request.remote_addr()),
    }
}

pub struct FailbackService {
    dir: DataDir,
    max_chunk: u64,
    readers: Arc<Readers>,
    /// Worker slots of the answers that compute much for little ([`crate::readers`]).
    workers: Arc<Readers>,
    audit: Arc<Audit>,
    pg_conn: Option<Arc<str>>,
    /// `--primary-conninfo`: what the handshake tells clients about reaching the server.
    primary_conninfo: Option<Arc<str>>,
    /// Backup windows open on the server (`BackupWindow`).
    windows: Arc<crate::window::Windows>,
    /// What each completed WAL segment changed, kept by failbackd's summarizer thread.
    summaries: Option<Arc<WalSummaries>>,
}

impl FailbackService {
    pub fn new(dir: DataDir, max_chunk: u64) -> Self {
        FailbackService {
            dir,
            max_chunk,
            readers: Readers::new(
                MAX_READERS,
                MAX_READERS_PER_CONNECTION,
                DEFAULT_STALL_TIMEOUT,
            ),
            workers: Readers::new(
                max_workers(),
                MAX_WORKERS_PER_CONNECTION,
                DEFAULT_STALL_TIMEOUT,
            ),
            audit: Arc::default(),
            pg_conn: None,
            primary_conninfo: None,
            windows: Arc::default(),
            summaries: None,
        }
    }

    /// The service both transports serve for `config`: its data directory, chunk size and
    /// connection to the server running there.
    pub fn for_config(config: &crate::Config) -> Self {
        // Refusals are counted where the log hears of them, into the metrics exposed.
        config.audit.count_into(config.metrics.clone());
        config.metrics.watch_summaries(config.wal_summaries.clone());
        FailbackService::new(DataDir::new(config.pgdata.clone()), config.max_chunk)
            .with_pg_conn(config.pg_conn.clone())
            .with_primary_conninfo(config.primary_conninfo.clone())
            .with_wal_summaries(config.wal_summaries.clone())
            .with_limits(config.audit.clone(), config.stall_timeout)
    }

    /// Where refused and abusive clients are logged, and how long a stalled stream keeps its
    /// reader slot while others wait ([`crate::readers`]).
    pub fn with_limits(mut self, audit: Arc<Audit>, stall_timeout: std::time::Duration) -> Self {
        self.audit = audit;
        self.readers = Readers::new(MAX_READERS, MAX_READERS_PER_CONNECTION, stall_timeout);
        self.workers = Readers::new(max_workers(), MAX_WORKERS_PER_CONNECTION, stall_timeout);
        self
    }

    /// The WAL summaries [`Self::changes`] takes whole segments from.
    pub fn with_wal_summaries(mut self, summaries: Option<Arc<WalSummaries>>) -> Self {
        self.summaries = summaries;
        self
    }

    /// What to tell clients about reaching the server (`--primary-conninfo`).
    pub fn with_primary_conninfo(mut self, conninfo: Option<String>) -> Self {
        self.primary_conninfo = conninfo.map(Arc::from);
        self
    }

    /// A local connection string to the server running on the data directory.
    pub fn with_pg_conn(mut self, pg_conn: Option<String>) -> Self {
        self.pg_conn = pg_conn.map(Arc::from);
        self
    }

    /// A reader slot for `peer` (and a worker slot first when its answer computes much:
    /// `worker`) and the channel its streaming answer goes out through.
    async fn outbox<T>(
        &self,
        peer: Peer,
        call: &'static str,
        worker: bool,
    ) -> Result<(Outbox<T>, ReceiverStream<Result<T, Status>>), Status> {
        let work = match worker {
            true => Some(self.workers.acquire(peer).await?),
            false => None,
        };
        let slots = std::iter::once(self.readers.acquire(peer).await?)
            .chain(work)
            .collect();
        // A small channel: the reader stays at most a few replies ahead of the network.
        let (tx, rx) = mpsc::channel(4);
        Ok((
            Outbox::new(tx, slots, self.audit.clone(), call),
            ReceiverStream::new(rx),
        ))
    }

    /// Logs that `peer`'s `call` was refused for `reason`, and gives the status it is refused
    /// with.
    fn refuse(&self, peer: &Peer, call: &str, reason: Refusal, s: Status) -> Status {
        self.audit.refused(peer, call, reason, s.message());
        s
    }

    /// The source server's end of WAL, or why it cannot be known.
    async fn live_end(&self) -> Result<failback_sql::EndOfWal, Status> {
        let Some(conn) = self.pg_conn.clone() else {
            let root = self.dir.root().to_path_buf();
            let running = tokio::task::spawn_blocking(move || running_postmaster(&root))
                .await
                .ok()
                .flatten();
            return Err(Status::failed_precondition(match running {
                Some(pid) => format!(
                    "PostgreSQL is running on {} (postmaster.pid names live process {pid}) but \
                     failbackd was started without --pg-conn, so the source's end of WAL is \
                     unknown and a rewind from it could not be made consistent; restart \
                     failbackd with --pg-conn, or stop the source server",
                    self.dir.root().display()
                ),
                None => "failbackd was started without --pg-conn: it serves a shut-down data \
                         directory, whose end of WAL is its control file's checkpoint"
                    .to_string(),
            }));
        };
        tokio::task::spawn_blocking(move || crate::live::end_of_wal(&conn))
            .await
            .map_err(|e| Status::internal(format!("end-of-WAL task failed: {e}")))?
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(DataDir) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || f(dir))
            .await
            .map_err(|e| Status::internal(format!("reader task failed: {e}")))?
    }
}

fn status(e: DataDirError) -> Status {
    match e {
        DataDirError::PathNotAllowed(_) => Status::permission_denied(e.to_string()),
        DataDirError::Io { .. } => Status::unavailable(e.to_string()),
    }
}

/// A streaming answer's failure as it is sent: audited and counted as a path refusal when
/// [`status`] made it one (only a path outside the data directory is PERMISSION_DENIED).
fn failure<T>(out: &Outbox<T>, s: Status) -> Status {
    match s.code() {
        tonic::Code::PermissionDenied => out.refused(Refusal::Path, s),
        _ => s,
    }
}

fn control(dir: &DataDir) -> Result<(Vec<u8>, ControlFileData), Status> {
    let bytes = dir
        .read_file("global/pg_control")
        .map_err(status)?
        .ok_or_else(|| Status::failed_precondition("global/pg_control does not exist"))?;
    let parsed = ControlFileData::parse(&bytes)
        .map_err(|e| Status::failed_precondition(format!("global/pg_control: {e}")))?;
    Ok((bytes, parsed))
}

fn check_path(p: &str) -> Result<(), Status> {
    if p.len() > MAX_PATH_LEN {
        return Err(Status::invalid_argument(format!(
            "path of {} bytes is over the limit of {MAX_PATH_LEN}",
            p.len()
        )));
    }
    Ok(())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Failback for FailbackService {
    async fn handshake(
        &self,
        request: Request<HandshakeRequest>,
    ) -> Result<Response<HandshakeResponse>, Status> {
        let v = request.get_ref().protocol_version;
        if v != failback_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "client speaks protocol {v}, failbackd speaks {}",
                failback_proto::PROTOCOL_VERSION
            )));
        }
        let max_chunk = self.max_chunk;
        let (advertise, pg_conn) = (self.primary_conninfo.clone(), self.pg_conn.clone());
        let (running, conninfo, c) = self
            .blocking(move |d| {
                let running = running_postmaster(d.root()).is_some();
                let conninfo = match advertise {
                    Some(c) => c.to_string(),
                    None => crate::live::advertised_conninfo(d.root(), pg_conn.as_deref()),
                };
                Ok((running, conninfo, control(&d)?.1))
            })
            .await?;
        let mut capabilities = vec![
            capability::ZSTD.into(),
            capability::BLAKE3.into(),
            capability::CHUNK_HASHES.into(),
            capability::HASH_RANGES.into(),
            capability::CHANGES.into(),
        ];
        // With --pg-conn the source is live while its server runs: seen by postmaster.pid, or,
        // when failbackd cannot see the postmaster's PID (another PID namespace), by the
        // server answering. A --pg-conn left in a config file while the server is shut down
        // serves the directory as shut down.
        if self.pg_conn.is_some() && (running || self.live_end().await.is_ok()) {
            capabilities.push(capability::LIVE.into());
            capabilities.push(capability::BACKUP_WINDOW.into());
        }
        if running {
            capabilities.push(capability::RUNNING.into());
        }
        Ok(Response::new(HandshakeResponse {
            protocol_version: failback_proto::PROTOCOL_VERSION,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            pg_major: c.major.number(),
            system_identifier: c.system_identifier,
            block_size: c.blcksz,
            wal_segment_size: c.xlog_seg_size,
            capabilities,
            max_chunk,
            primary_conninfo: conninfo,
        }))
    }

    async fn control_file(
        &self,
        _: Request<ControlFileRequest>,
    ) -> Result<Response<ControlFileResponse>, Status> {
        let (bytes, _) = self.blocking(|d| control(&d)).await?;
        Ok(Response::new(ControlFileResponse {
            data: Bytes::from(bytes),
        }))
    }

    async fn timelines(
        &self,
        _: Request<TimelinesRequest>,
    ) -> Result<Response<TimelinesResponse>, Status> {
        // The running server knows its timeline at once; its control file only after the
        // first checkpoint on the new timeline (see crate::live). A server that does not
        // answer (shut down) leaves the files to say it.
        let live_tli = match self.pg_conn {
            Some(_) => self.live_end().await.ok().map(|e| e.timeline),
            None => None,
        };
        self.blocking(move |d| {
            let (_, c) = control(&d)?;
            let histories: Vec<HistoryFile> = history_files(&d)
                .map_err(status)?
                .into_iter()
                .map(|(timeline, data)| HistoryFile {
                    timeline,
                    data: Bytes::from(data),
                })
                .collect();
            let newest = histories.last().map(|h| h.timeline);
            let current_timeline = live_tli.unwrap_or(files_timeline(&c, newest));
            Ok(Response::new(TimelinesResponse {
                current_timeline,
                histories,
            }))
        })
        .await
    }

    type ListFilesStream = BoxStream<FileEntry>;

    async fn list_files(
        &self,
        _: Request<ListFilesRequest>,
    ) -> Result<Response<Self::ListFilesStream>, Status> {
        let entries = self.blocking(|d| d.list().map_err(status)).await?;
        let out = entries.into_iter().map(|e| {
            Ok(FileEntry {
                path: e.path,
                file_type: match e.file_type {
                    FileType::Regular => failback_proto::v1::FileType::Regular,
                    FileType::Directory => failback_proto::v1::FileType::Directory,
                    FileType::Symlink => failback_proto::v1::FileType::Symlink,
                } as i32,
                size: e.size,
                link_target: e.link_target.unwrap_or_default(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    type ReadRangesStream = BoxStream<Chunk>;

    async fn read_ranges(
        &self,
        request: Request<ReadRangesRequest>,
    ) -> Result<Response<Self::ReadRangesStream>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let refuse = |r: Refusal, s: Status| self.refuse(&peer, "ReadRanges", r, s);
        if req.ranges.len() > MAX_RANGES_PER_REQUEST {
            return Err(refuse(
                Refusal::OverLimit,
                Status::invalid_argument(format!(
                    "{} ranges in one request, over the limit of {MAX_RANGES_PER_REQUEST}",
                    req.ranges.len()
                )),
            ));
        }
        for r in &req.ranges {
            check_path(&r.path).map_err(|s| refuse(Refusal::OverLimit, s))?;
            // pread takes a signed offset: a range past it could never be read.
            if r.offset
                .checked_add(r.length)
                .is_none_or(|end| end > i64::MAX as u64)
            {
                return Err(refuse(
                    Refusal::Malformed,
                    Status::invalid_argument(format!(
                        "range of {:?} at {} of {} bytes ends past 2^63, the largest file offset",
                        r.path, r.offset, r.length
                    )),
                ));
            }
        }
        let compression = match Compression::from_level(req.compression_level) {
            // Higher levels cost many times the CPU per chunk for a few percent fewer bytes.
            Compression::Zstd(l) => Compression::Zstd(l.min(MAX_ZSTD_LEVEL)),
            none => none,
        };
        if let Compression::Zstd(l) = compression {
            wire::encode(&[], compression).map_err(|_| {
                refuse(
                    Refusal::Malformed,
                    Status::invalid_argument(format!("zstd level {l} is out of range")),
                )
            })?;
        }
        let dir = self.dir.clone();
        let max_chunk = self.max_chunk;
        let (out, rx) = self.outbox(peer, "ReadRanges", false).await?;
        tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            let mut reader = dir.range_reader();
            for r in req.ranges {
                let end = r.offset + r.length;
                let mut off = r.offset;
                while off < end {
                    let len = (end - off).min(max_chunk);
                    let chunk = match reader.read(&r.path, off, len, &mut buf) {
                        Err(e) => {
                            out.send(Err(failure(&out, status(e))));
                            return;
                        }
                        Ok(ReadStatus::Vanished) => Chunk {
                            path: r.path.clone(),
                            offset: off,
                            status: ChunkStatus::Vanished as i32,
                            ..Default::default()
                        },
                        // The buffer goes with the chunk (sent stored, it is the chunk's data);
                        // the next read takes a new one.
                        Ok(st) => match wire::encode_owned(std::mem::take(&mut buf), compression) {
                            Err(e) => {
                                out.send(Err(Status::internal(e.to_string())));
                                return;
                            }
                            Ok(enc) => Chunk {
                                path: r.path.clone(),
                                offset: off,
                                raw_length: enc.raw_length,
                                codec: enc.codec.to_u32(),
                                data: Bytes::from(enc.data),
                                hash: Bytes::copy_from_slice(&enc.hash),
                                status: if st == ReadStatus::Short {
                                    ChunkStatus::Short as i32
                                } else {
                                    ChunkStatus::Ok as i32
                                },
                            },
                        },
                    };
                    let stop = chunk.status != ChunkStatus::Ok as i32;
                    if out.send(Ok(chunk)) != Sent::Delivered {
                        return; // the client went away, or stalled while others waited
                    }
                    if stop {
                        break;
                    }
                    off += len;
                }
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }

    type ChunkHashesStream = BoxStream<FileHashes>;

    async fn chunk_hashes(
        &self,
        request: Request<ChunkHashesRequest>,
    ) -> Result<Response<Self::ChunkHashesStream>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let refuse = |r: Refusal, s: Status| self.refuse(&peer, "ChunkHashes", r, s);
        let cs = req.chunk_size;
        if !(MIN_HASH_CHUNK..=MAX_HASH_CHUNK).contains(&cs) {
            return Err(refuse(
                Refusal::Malformed,
                Status::invalid_argument(format!(
                    "chunk size {cs} is out of range ({MIN_HASH_CHUNK} .. {MAX_HASH_CHUNK})"
                )),
            ));
        }
        if req.paths.len() > MAX_HASH_PATHS {
            return Err(refuse(
                Refusal::OverLimit,
                Status::invalid_argument(format!(
                    "{} paths in one request, over the limit of {MAX_HASH_PATHS}",
                    req.paths.len()
                )),
            ));
        }
        for p in &req.paths {
            check_path(p).map_err(|s| refuse(Refusal::OverLimit, s))?;
            // A path its words put outside the data directory is refused up front; a symlink on
            // the way is found, and refused, when the file is opened, as ReadRanges does:
            // looking each path up twice cost as much as hashing a one-page file.
            check_relative(p).map_err(|e| refuse(Refusal::Path, status(e)))?;
        }
        let ranges = hash_ranges_of(&req).map_err(|(r, s)| refuse(r, s))?;
        let dir = self.dir.clone();
        let (out, rx) = self.outbox(peer, "ChunkHashes", true).await?;
        tokio::task::spawn_blocking(move || {
            let mut buf = hash_buffer(cs);
            let mut batch: Vec<FileHashes> = Vec::new();
            let mut batch_bytes = 0usize;
            for (i, path) in req.paths.into_iter().enumerate() {
                let within = ranges.as_ref().map(|r| r[i].as_slice());
                match hash_file(&dir, &path, cs, within, &mut buf) {
                    Ok(h) => {
                        batch_bytes += path.len() + 32 * h.hashes.len();
                        batch.push(h);
                    }
                    Err(s) => {
                        // What was hashed goes first, then why the rest is not.
                        if !batch.is_empty() && out.send(Ok(batch)) != Sent::Delivered {
                            return;
                        }
                        out.send(Err(failure(&out, s)));
                        return;
                    }
                }
                if batch_bytes >= REPLY_BATCH_BYTES {
                    batch_bytes = 0;
                    if out.send(Ok(std::mem::take(&mut batch))) != Sent::Delivered {
                        return;
                    }
                }
            }
            if !batch.is_empty() {
                out.send(Ok(batch));
            }
        });
        Ok(Response::new(Box::pin(Unbatched::new(rx))))
    }

    async fn end_of_wal(
        &self,
        _: Request<EndOfWalRequest>,
    ) -> Result<Response<EndOfWalResponse>, Status> {
        let end = self.live_end().await?;
        Ok(Response::new(EndOfWalResponse {
            lsn: end.lsn.0,
            timeline: end.timeline,
            in_recovery: end.in_recovery,
        }))
    }

    type BackupWindowStream = BoxStream<BackupWindowReply>;

    async fn backup_window(
        &self,
        request: Request<BackupWindowRequest>,
    ) -> Result<Response<Self::BackupWindowStream>, Status> {
        let Some(conn) = self.pg_conn.clone() else {
            return Err(Status::failed_precondition(
                "a backup window needs the running server: failbackd was started without \
                 --pg-conn",
            ));
        };
        let label = request.into_inner().label;
        let (tx, rx) = mpsc::channel(1);
        let (windows, rt) = (self.windows.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || windows.hold(&rt, &conn, &label, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn end_backup_window(
        &self,
        request: Request<EndBackupWindowRequest>,
    ) -> Result<Response<EndBackupWindowResponse>, Status> {
        let closed = self.windows.close(request.into_inner().window_id).await?;
        Ok(Response::new(closed))
    }

    type ChangesStream = BoxStream<ChangesReply>;

    async fn changes(
        &self,
        request: Request<ChangesRequest>,
    ) -> Result<Response<Self::ChangesStream>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let since = failback_common::Lsn(req.since_lsn);
        // A running server's WAL ends where it says, on the timeline it says (its control file
        // may still name the one before a promotion); a shut-down one's where its files say.
        let live = match self.pg_conn {
            Some(_) => Some(self.live_end().await?),
            None => None,
        };
        // Only what is in the files can be read: up to the flush position, not the insert one.
        let end = live.map(|e| {
            let until = if req.until_lsn == 0 {
                e.flushed
            } else {
                failback_common::Lsn(req.until_lsn).min(e.flushed)
            };
            (until, e.timeline)
        });
        let dir = self.dir.clone();
        let summaries = self.summaries.clone();
        let (out, rx) = self.outbox(peer, "Changes", true).await?;
        tokio::task::spawn_blocking(move || {
            let found = control(&dir).and_then(|(_, c)| {
                source_changes(&dir, &c, since, end, summaries.as_deref()).map_err(|e| match e {
                    SourceChangesError::Gone { .. } => {
                        Status::failed_precondition(failback_common::errors::one_line(&e))
                    }
                    e => Status::unavailable(failback_common::errors::one_line(&e)),
                })
            });
            let found = match found {
                Ok(f) => f,
                Err(s) => {
                    out.send(Err(s));
                    return;
                }
            };
            let files: Vec<ChangedFile> = found
                .changes
                .page_map
                .files
                .into_iter()
                .map(|(path, blocks)| ChangedFile {
                    path,
                    block_bitmap: Bytes::from(blocks.to_le_bytes()),
                })
                .collect();
            // Every reply but the last carries files only; the last one the rest.
            let mut chunks: Vec<&[ChangedFile]> =
                files.chunks(MAX_CHANGED_FILES_PER_REPLY).collect();
            let last = chunks.pop().unwrap_or_default();
            for chunk in chunks {
                let reply = ChangesReply {
                    files: chunk.to_vec(),
                    ..Default::default()
                };
                if out.send(Ok(reply)) != Sent::Delivered {
                    return;
                }
            }
            out.send(Ok(ChangesReply {
                files: last.to_vec(),
                created: found
                    .changes
                    .created
                    .iter()
                    .map(|l| RelationId {
                        spc_oid: l.spcOid,
                        db_oid: l.dbOid,
                        rel_number: l.relNumber,
                    })
                    .collect(),
                databases: found
                    .changes
                    .databases
                    .iter()
                    .map(|&(spc_oid, db_oid)| DatabaseId { spc_oid, db_oid })
                    .collect(),
                done: true,
                until_lsn: found.until.0,
                records: found.records,
                summarized_segments: found.summarized_segments,
            }));
        });
        Ok(Response::new(Box::pin(rx)))
    }
}

/// How many bytes of paths and hashes ChunkHashes gathers before it hands them on
/// ([`Unbatched`]): some thousand one-page files (the 512 paths failback asks at a time go as
/// one batch), while a file of many chunks goes out as soon as it is hashed.
const REPLY_BATCH_BYTES: usize = 64 << 10;

/// The byte ranges a ChunkHashes request asks hashed, one list per path; `None` for whole
/// files. Refused: a count other than one per path, more than [`MAX_HASH_RANGES`] in all, an
/// empty range, one past the largest offset, or ranges of a path out of order or overlapping
/// (so that one request reads each byte of a file at most once, as a whole-file one does).
fn hash_ranges_of(
    req: &ChunkHashesRequest,
) -> Result<Option<Vec<Vec<ByteRange>>>, (Refusal, Status)> {
    if req.ranges.is_empty() {
        return Ok(None);
    }
    let malformed = |why: String| (Refusal::Malformed, Status::invalid_argument(why));
    if req.ranges.len() != req.paths.len() {
        return Err(malformed(format!(
            "{} lists of ranges for {} paths; one per path is due",
            req.ranges.len(),
            req.paths.len()
        )));
    }
    let count: usize = req.ranges.iter().map(|r| r.extents.len()).sum();
    if count > MAX_HASH_RANGES {
        return Err((
            Refusal::OverLimit,
            Status::invalid_argument(format!(
                "{count} ranges in one request, over the limit of {MAX_HASH_RANGES}"
            )),
        ));
    }
    let mut out = Vec::with_capacity(req.ranges.len());
    for (r, path) in req.ranges.iter().zip(&req.paths) {
        let mut list: Vec<ByteRange> = Vec::with_capacity(r.extents.len());
        for e in &r.extents {
            if e.length == 0 || e.offset.checked_add(e.length).is_none() {
                return Err(malformed(format!(
                    "{path}: the range of {} bytes at {} is empty or ends past the largest offset",
                    e.length, e.offset
                )));
            }
            if let Some(last) = list.last()
                && e.offset < last.offset + last.length
            {
                return Err(malformed(format!(
                    "{path}: the range at {} starts before the end of the one before it ({}); \
                     ranges must be in order and apart",
                    e.offset,
                    last.offset + last.length
                )));
            }
            list.push(ByteRange {
                offset: e.offset,
                length: e.length,
            });
        }
        out.push(list);
    }
    Ok(Some(out))
}

/// The chunk hashes of one file, whole or `within` byte ranges, read to its current end (a
/// live file may have grown or shrunk since it was listed: the size sent is the size hashed).
fn hash_file(
    dir: &DataDir,
    path: &str,
    cs: u64,
    within: Option<&[ByteRange]>,
    buf: &mut [u8],
) -> Result<FileHashes, Status> {
    let mut out = FileHashes {
        path: path.to_string(),
        chunk_size: cs,
        ..Default::default()
    };
    let Some(file) = dir.open(path).map_err(status)? else {
        out.vanished = true;
        return Ok(out);
    };
    let ranges = within.unwrap_or(&[WHOLE_FILE]);
    let (size, hashes) = hash_ranges(
        ChunkHash::Blake3,
        &file,
        cs as usize,
        buf,
        ranges,
        MAX_HASHES_PER_FILE,
    )
    .map_err(|e| match e {
        HashError::TooManyChunks { max } => Status::invalid_argument(format!(
            "{path} has more than {max} chunks of {cs} bytes; ask with larger chunks"
        )),
        HashError::Io(e) => Status::unavailable(format!("{path}: {e}")),
    })?;
    out.size = size;
    out.hashes = hashes.iter().map(|h| Bytes::copy_from_slice(h)).collect();
    Ok(out)
}

/// Checks the bearer token of every call. The token and the one presented are compared as
/// their BLAKE3 hashes, whose comparison takes the same time wherever they differ: neither the
/// token's bytes nor its length can be learnt by timing refusals.
#[derive(Clone)]
pub struct TokenCheck {
    token: Option<blake3::Hash>,
}

impl TokenCheck {
    pub fn new(token: Option<String>) -> Self {
        TokenCheck {
            token: token.map(|t| blake3::hash(t.as_bytes())),
        }
    }

    /// Whether calls need a token at all.
    pub fn required(&self) -> bool {
        self.token.is_some()
    }

    /// Checks the token a caller presented (`None`: none), whatever the transport.
    pub fn check(&self, got: Option<&str>) -> Result<(), Status> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        // blake3::Hash's equality is constant-time.
        if got.is_some_and(|g| blake3::hash(g.as_bytes()) == *want) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// The gRPC side of the token check: refusals are logged with the peer's address.
#[derive(Clone)]
pub struct GrpcAuth {
    pub token: TokenCheck,
    pub audit: Arc<Audit>,
}

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let got = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Err(s) = self.token.check(got) {
            let peer = peer_of(&request);
            self.audit
                .refused(&peer, "a gRPC call", Refusal::Token, s.message());
            // Which call it was is not known here (tonic tells an interceptor only the
            // headers): nor is it read, as on QUIC.
            self.audit
                .metrics()
                .unread_request(Transport::Grpc, s.code());
            return Err(s);
        }
        Ok(request)
    }
}
