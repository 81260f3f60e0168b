//! The retries a rewind rode out are counted and shown: `--report`'s `retries` (total, by
//! cause, by operation, the longest stall) and `-P`'s `retries N`.
//!
//! failbackd's real service, in this process, behind a wrapper that fails requests the way a
//! flaky deployment does, each once and at a known request rather than at a moment: the file
//! list refused as by a failbackd shutting down, the first multi-chunk ReadRanges cut after its
//! first chunk (a connection lost mid-stream), and that chunk damaged on the way (a checksum
//! mismatch, fetched again). The real `failback` rewinds a real PostgreSQL 15 pair through it,
//! and the rewound node rejoins. The same run through a wrapper that fails nothing reports no
//! retries.

mod support;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ::failback_server::service::FailbackService;
use failback_proto::v1::failback_server::{Failback, FailbackServer};
use failback_proto::v1::*;
use failback_tests::run::run_ok;
use failback_tests::{Cluster, PgMajor};
use tonic::codegen::tokio_stream::{self, Stream, StreamExt};
use tonic::{Request, Response, Status};

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How many of each fault are still to come.
#[derive(Default)]
struct Faults {
    /// ListFiles calls refused as by a failbackd shutting down.
    refuse_list: AtomicUsize,
    /// ReadRanges calls of more than one chunk ended after their first chunk.
    cut_read: AtomicUsize,
    /// Chunks with data damaged on the way.
    damage: AtomicUsize,
}

fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

/// failbackd's service, failing as [`Faults`] says.
struct Flaky {
    inner: FailbackService,
    faults: Arc<Faults>,
}

/// Damages `c`'s data when a damage is still due (and `c` has data to damage).
fn maybe_damage(faults: &Faults, mut c: Chunk) -> Chunk {
    if !c.data.is_empty() && take(&faults.damage) {
        let mut data = c.data.to_vec();
        let mid = data.len() / 2;
        data[mid] ^= 0x10;
        c.data = data.into();
    }
    c
}

#[tonic::async_trait]
impl Failback for Flaky {
    async fn handshake(
        &self,
        r: Request<HandshakeRequest>,
    ) -> Result<Response<HandshakeResponse>, Status> {
        self.inner.handshake(r).await
    }
    async fn control_file(
        &self,
        r: Request<ControlFileRequest>,
    ) -> Result<Response<ControlFileResponse>, Status> {
        self.inner.control_file(r).await
    }
    async fn timelines(
        &self,
        r: Request<TimelinesRequest>,
    ) -> Result<Response<TimelinesResponse>, Status> {
        self.inner.timelines(r).await
    }
    type ListFilesStream = <FailbackService as Failback>::ListFilesStream;
    async fn list_files(
        &self,
        r: Request<ListFilesRequest>,
    ) -> Result<Response<Self::ListFilesStream>, Status> {
        if take(&self.faults.refuse_list) {
            return Err(Status::unavailable("failbackd is shutting down"));
        }
        self.inner.list_files(r).await
    }
    type ReadRangesStream = BoxStream<Chunk>;
    async fn read_ranges(
        &self,
        r: Request<ReadRangesRequest>,
    ) -> Result<Response<Self::ReadRangesStream>, Status> {
        let mut chunks = self.inner.read_ranges(r).await?.into_inner();
        let faults = self.faults.clone();
        if faults.cut_read.load(Ordering::SeqCst) > 0 {
            let first = chunks.next().await;
            let second = chunks.next().await;
            let mut head: Vec<Result<Chunk, Status>> = Vec::new();
            head.extend(first.map(|c| c.map(|c| maybe_damage(&faults, c))));
            if second.is_some() && take(&faults.cut_read) {
                // The rest never comes: the call ends as a cut connection ends it.
                return Ok(Response::new(Box::pin(tokio_stream::iter(head))));
            }
            head.extend(second);
            let rest = chunks.map(move |c| c.map(|c| maybe_damage(&faults, c)));
            return Ok(Response::new(Box::pin(
                tokio_stream::iter(head).chain(rest),
            )));
        }
        Ok(Response::new(Box::pin(
            chunks.map(move |c| c.map(|c| maybe_damage(&faults, c))),
        )))
    }
    type ChunkHashesStream = <FailbackService as Failback>::ChunkHashesStream;
    async fn chunk_hashes(
        &self,
        r: Request<ChunkHashesRequest>,
    ) -> Result<Response<Self::ChunkHashesStream>, Status> {
        self.inner.chunk_hashes(r).await
    }
    async fn end_of_wal(
        &self,
        r: Request<EndOfWalRequest>,
    ) -> Result<Response<EndOfWalResponse>, Status> {
        self.inner.end_of_wal(r).await
    }
    type BackupWindowStream = <FailbackService as Failback>::BackupWindowStream;
    async fn backup_window(
        &self,
        r: Request<BackupWindowRequest>,
    ) -> Result<Response<Self::BackupWindowStream>, Status> {
        self.inner.backup_window(r).await
    }
    async fn end_backup_window(
        &self,
        r: Request<EndBackupWindowRequest>,
    ) -> Result<Response<EndBackupWindowResponse>, Status> {
        self.inner.end_backup_window(r).await
    }
    type ChangesStream = <FailbackService as Failback>::ChangesStream;
    async fn changes(
        &self,
        r: Request<ChangesRequest>,
    ) -> Result<Response<Self::ChangesStream>, Status> {
        self.inner.changes(r).await
    }
}

/// [`Flaky`] over plain gRPC on a port of its own, until dropped.
struct Server {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Server {
    fn start(pgdata: &std::path::Path, faults: Arc<Faults>) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        // Small chunks (as the pair tests serve them), so that requests span many.
        let mut config = ::failback_server::Config::new(pgdata);
        config.max_chunk = 64 << 10;
        let svc = FailbackServer::new(Flaky {
            inner: FailbackService::for_config(&config),
            faults,
        })
        .max_decoding_message_size(failback_proto::limits::MAX_REQUEST)
        .max_encoding_message_size(failback_proto::limits::MAX_REPLY);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = rt.spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = rx.await;
                    },
                ),
        );
        Server {
            rt,
            addr,
            stop: Some(tx),
            done: Some(done),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let r = self.rt.block_on(d);
            if !std::thread::panicking() {
                r.unwrap().unwrap();
            }
        }
    }
}

/// `failback rewind -P` of `old` from `server`, with `-R` and a report: the report, and what
/// failback printed on stderr.
fn rewind_through(old: &Cluster, new: &Cluster, server: &Server) -> (serde_json::Value, String) {
    let report = old.base_dir().join("retries.json");
    let _ = std::fs::remove_file(&report);
    let args: Vec<OsString> = vec![
        "rewind".into(),
        "-D".into(),
        old.data_dir().into(),
        "--source".into(),
        format!("grpc://{}", server.addr).into(),
        "--pg-bindir".into(),
        old.bins().bin_dir.clone().into(),
        // Stored chunks: a flipped byte is a checksum mismatch, never a decoding error.
        "--compress".into(),
        "none".into(),
        "--timeout".into(),
        "30".into(),
        "-P".into(),
        "-R".into(),
        "--primary-conninfo".into(),
        support::conninfo(new).into(),
        "--report".into(),
        report.clone().into(),
    ];
    let out = Command::new(failback_tests::programs::failback())
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failback rewind failed:\n{stderr}");
    let report = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (report, stderr)
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    run_ok(
        Command::new("cp").arg("-a").arg(from).arg(to),
        std::time::Duration::from_secs(120),
    );
}

#[test]
fn retries_are_reported_by_cause_and_shown_in_progress() {
    let (old, new) = support::diverged(PgMajor::V15);
    let snapshot = old.base_dir().join("diverged");
    copy_tree(&old.data_dir(), &snapshot);

    // A clean run counts nothing, and says nothing of retries.
    let clean = Server::start(&new.data_dir(), Arc::default());
    let (report, stderr) = rewind_through(&old, &new, &clean);
    drop(clean);
    assert_eq!(report["retries"]["total"], 0, "{}", report["retries"]);
    assert_eq!(report["retries"]["by_cause"], serde_json::json!({}));
    assert!(!stderr.contains("retries"), "{stderr}");
    assert!(stderr.contains("kB ("), "no -P line:\n{stderr}");

    // The same rewind through a flaky failbackd.
    copy_tree(&snapshot, &old.data_dir());
    let faults = Arc::new(Faults::default());
    // The early listing the handshake asks for fails too, without a retry.
    faults.refuse_list.store(2, Ordering::SeqCst);
    faults.cut_read.store(1, Ordering::SeqCst);
    faults.damage.store(1, Ordering::SeqCst);
    let flaky = Server::start(&new.data_dir(), faults.clone());
    let (report, stderr) = rewind_through(&old, &new, &flaky);
    drop(flaky);
    eprintln!("{stderr}");
    for (what, left) in [
        ("refused listing", &faults.refuse_list),
        ("cut read", &faults.cut_read),
        ("damaged chunk", &faults.damage),
    ] {
        assert_eq!(left.load(Ordering::SeqCst), 0, "no {what} happened");
    }
    let r = &report["retries"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    assert!(n(&r["by_cause"]["unavailable"]) >= 1, "{r}");
    assert!(n(&r["by_cause"]["connection_lost"]) >= 1, "{r}");
    assert_eq!(n(&r["by_cause"]["checksum"]), 1, "{r}");
    assert!(n(&r["by_operation"]["list"]) >= 1, "{r}");
    assert!(n(&r["by_operation"]["fetch"]) >= 2, "{r}");
    let by_cause: u64 = r["by_cause"].as_object().unwrap().values().map(n).sum();
    let by_op: u64 = r["by_operation"].as_object().unwrap().values().map(n).sum();
    assert_eq!((by_cause, by_op), (n(&r["total"]), n(&r["total"])), "{r}");
    // A retry waits at least the first back-off (250 ms) before the call goes on.
    assert!(r["longest_stall_seconds"].as_f64().unwrap() >= 0.25, "{r}");
    // -P's line counts them, and the run's last words sum them up.
    assert!(
        stderr.contains(", retries "),
        "no retries on the -P line:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "failback: the source needed {} retries (",
            n(&r["total"])
        )),
        "no retries in the summary:\n{stderr}"
    );
    assert!(stderr.contains("checksum mismatch 1"), "{stderr}");
    support::rejoin_and_compare(old, new);
}
