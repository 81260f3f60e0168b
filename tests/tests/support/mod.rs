//! Scaffolding of the failbackd pair tests, whatever the transport (`pair_grpc.rs`,
//! `pair_quic.rs`): failbackd in this process serving gRPC, QUIC or both; a diverged pair of
//! real clusters and their rejoining; certificates; the checks both transports must pass; and
//! a failbackd stand-in that damages chunks.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use failback_client::progress::Terminal;
use failback_client::rewind::{RewindOptions, rewind};
use failback_client::source::remote::RemoteOptions;
use failback_client::source::{FetchRange, Fetched, Source, SourceError};
use failback_common::compress_choice::CompressPolicy;
use failback_common::wire::Compression;
use failback_server::{Config, ServeError};
use failback_tests::{Cluster, PgMajor};

type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// failbackd in this process, on ports of its own, until dropped.
pub struct Failbackd {
    pub rt: tokio::runtime::Runtime,
    addr: Option<SocketAddr>,
    quic_addr: Option<SocketAddr>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    done: Vec<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl Failbackd {
    /// gRPC, plain HTTP/2.
    pub fn start(pgdata: &Path, token: Option<&str>) -> Failbackd {
        Failbackd::start_with(pgdata, token, None)
    }

    /// gRPC, with TLS when `tls` (PEM certificate, key) is given.
    pub fn start_with(
        pgdata: &Path,
        token: Option<&str>,
        tls: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Failbackd {
        let mut config = Failbackd::config(pgdata);
        config.token = token.map(str::to_string);
        config.tls = tls;
        Failbackd::serve(config, false)
    }

    /// failbackd on a running cluster, with `--pg-conn` to it.
    pub fn start_live(cluster: &Cluster) -> Failbackd {
        let mut config = Failbackd::config(&cluster.data_dir());
        config.pg_conn = Some(cluster.conninfo());
        Failbackd::serve(config, false)
    }

    /// The tests' configuration: small chunks, so that files span many chunks and requests.
    pub fn config(pgdata: &Path) -> Config {
        let mut config = Config::new(pgdata);
        config.max_chunk = 64 << 10;
        config
    }

    fn new() -> Failbackd {
        Failbackd {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            addr: None,
            quic_addr: None,
            stops: Vec::new(),
            done: Vec::new(),
        }
    }

    fn spawn<F>(&mut self, serve: impl FnOnce(Stop) -> F)
    where
        F: Future<Output = Result<(), ServeError>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let f = serve(Box::pin(async {
            let _ = rx.await;
        }));
        self.done.push(self.rt.spawn(f));
        self.stops.push(tx);
    }

    /// gRPC and, with `quic`, QUIC beside it (`config` must then have TLS), as failbackd
    /// `--listen` and `--quic-listen` do.
    pub fn serve(config: Config, quic: bool) -> Failbackd {
        let mut d = Failbackd::new();
        let listener =
            d.rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
        d.addr = Some(listener.local_addr().unwrap());
        if quic {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            d.quic_addr = Some(socket.local_addr().unwrap());
            let config = config.clone();
            d.spawn(|stop| failback_server::quic::serve_quic(socket, config, stop));
        }
        d.spawn(|stop| failback_server::serve(listener, config, stop));
        d
    }

    /// Any service over QUIC only, with `config`'s TLS, token and limits.
    pub fn serve_quic_service<S: failback_proto::v1::failback_server::Failback>(
        svc: S,
        config: Config,
    ) -> Failbackd {
        let mut d = Failbackd::new();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        d.quic_addr = Some(socket.local_addr().unwrap());
        d.spawn(|stop| async move {
            failback_server::quic::serve_quic_with(socket, svc, &config, stop).await
        });
        d
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("failbackd serves gRPC")
    }

    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr())
    }

    /// `grpcs://` by name, for the certificate's name to match.
    pub fn tls_url(&self) -> String {
        format!("grpcs://localhost:{}", self.addr().port())
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr.expect("failbackd serves QUIC")
    }

    pub fn quic_url(&self) -> String {
        format!("quic://localhost:{}", self.quic_addr().port())
    }
}

impl Drop for Failbackd {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for d in self.done.drain(..) {
            let r = self.rt.block_on(d);
            if !std::thread::panicking() {
                r.unwrap().unwrap();
            }
        }
    }
}

/// Options for `url` with a token, jobs 3 and zstd 3; no certificates.
pub fn options(url: String, token: Option<&str>) -> RemoteOptions {
    RemoteOptions {
        url: failback_transport::url::SourceUrl::parse(&url).expect("a failbackd URL"),
        ca: None,
        identity: None,
        token: token.map(str::to_string),
        jobs: 3,
        // Two connections, so that batches are spread over both in every pair test.
        connections: 2,
        compression: CompressPolicy::Fixed(Compression::Zstd(3)),
        patience: failback_common::patience::Patience::DEFAULT,
        notice: None,
    }
}

/// A client of the test bed's failbackd (a child process serving TLS) `via` gRPC or QUIC.
pub fn connect_child(
    server: &failback_tests::failbackd::Failbackd,
    via: failback_tests::failbackd::Via,
) -> Box<dyn Source> {
    let mut args = server.source_args(via).into_iter();
    let (_, url, _, ca) = (args.next(), args.next(), args.next(), args.next());
    let url = url.expect("a URL").into_string().expect("a UTF-8 URL");
    failback_client::source::remote::connect(RemoteOptions {
        ca: Some(std::fs::read(ca.expect("a CA")).expect("the CA certificate")),
        ..options(url, None)
    })
    .expect("connect to failbackd")
}

/// Fetches one range; the pieces concatenated, or the error.
pub fn fetch_all(
    src: &mut dyn Source,
    path: &str,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>, SourceError> {
    let mut out = Vec::new();
    each_piece(
        src,
        vec![FetchRange {
            path: path.into(),
            offset,
            length,
        }],
        |p| {
            if let Fetched::Data { data, .. } = p {
                out.extend_from_slice(data);
            }
        },
    )?;
    Ok(out)
}

/// Fetches `ranges`, handing every piece to `f` as it comes.
pub fn each_piece(
    src: &mut dyn Source,
    ranges: Vec<FetchRange>,
    mut f: impl FnMut(Fetched<'_>),
) -> Result<(), SourceError> {
    let mut fetch = src.fetch(ranges)?;
    while let Some(piece) = fetch.next()? {
        f(piece);
    }
    Ok(())
}

/// The demo's pair, shut down: (old primary, new primary).
pub fn diverged(major: PgMajor) -> (Cluster, Cluster) {
    failback_tests::rewind::pgbench_pair(major, &mut |_| {})
}

/// Starts both, the old primary as the standby `-R` made it, and compares their data once it
/// caught up.
pub fn rejoin_and_compare(mut primary: Cluster, mut new_primary: Cluster) {
    failback_tests::rewind::start_rejoined(&mut primary, &mut new_primary);
}

/// Rewinds `primary` from `source` (failbackd serving `new_primary`), writing the recovery
/// configuration; the divergence must have changed blocks.
pub fn rewind_from(source: &mut dyn Source, primary: &Cluster, new_primary: &Cluster) {
    let opts = RewindOptions {
        target: primary.data_dir(),
        write_recovery_conf: true,
        primary_conninfo: Some(conninfo(new_primary)),
        pg_bindir: Some(primary.bins().postgres().parent().unwrap().to_path_buf()),
        ..Default::default()
    };
    let report = rewind(&opts, source, &mut Terminal::new(false, false))
        .unwrap()
        .report;
    assert!(
        report.changed_blocks > 0,
        "the divergence changed no block?"
    );
}

/// `failback rewind --source url` with a token file, `--jobs 5 --connections 3 --compress none
/// --max-rate 2G -R`, and `extra` (files they name may be put in [`tempfile_dir`], removed
/// afterwards); asserts success and returns the `--report` JSON.
pub fn cli_rewind(
    primary: &Cluster,
    new_primary: &Cluster,
    url: &str,
    token: &str,
    extra: &[OsString],
) -> serde_json::Value {
    let dir = tempfile_dir();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let out = Command::new(failback_tests::programs::failback())
        .args(["rewind", "-D"])
        .arg(primary.data_dir())
        .args(["--source", url, "--token-file"])
        .arg(&token_file)
        .args(extra)
        .args(["--jobs", "5", "--connections", "3"])
        // `--compress none` unless `extra` says otherwise.
        .args(if extra.iter().any(|a| a == "--compress") {
            &[][..]
        } else {
            &["--compress", "none"][..]
        })
        .args(["-R", "--primary-conninfo"])
        .arg(conninfo(new_primary))
        .arg("--pg-bindir")
        .arg(primary.bins().postgres().parent().unwrap())
        .args(["--max-rate", "2G", "--report"])
        .arg(dir.join("report.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "failback rewind failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    report
}

pub fn conninfo(c: &Cluster) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres application_name=old-primary",
        c.port()
    )
}

pub fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("failback-pair-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn refused(r: Result<impl Sized, SourceError>, code: &str) {
    match r {
        Err(SourceError::Refused { reason, .. }) => {
            assert!(
                reason.contains(code),
                "refused, but not with {code}: {reason}"
            )
        }
        Err(e) => panic!("expected a refusal with {code}, got {e}"),
        Ok(_) => panic!("expected a refusal with {code}, got an answer"),
    }
}

pub fn self_signed(name: &str) -> (Vec<u8>, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (
        ck.cert.pem().into_bytes(),
        ck.signing_key.serialize_pem().into_bytes(),
    )
}

/// A certificate authority issuing server and client certificates.
pub struct Ca {
    /// The CA certificate, PEM.
    pub pem: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem().into_bytes(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `name` and its key, PEM; a server's (for `localhost`) or a client's.
    pub fn issue(&self, name: &str, client: bool) -> (Vec<u8>, Vec<u8>) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

/// What every transport must enforce, on a freshly initialised PG15 data directory served
/// with token `right`: `connect(token)` reaches it. Tokens are checked; paths that climb out,
/// are absolute, or follow a stray symlink are refused, and the same connection keeps serving
/// real, verified bytes; Short and Vanished are reported as such.
pub fn assert_tokens_and_paths_enforced(
    cluster: &Cluster,
    connect: impl Fn(Option<&str>) -> Result<Box<dyn Source>, SourceError>,
) {
    let data = cluster.data_dir();
    let outside = cluster.base_dir().join("outside");
    refused(connect(None), "Unauthenticated");
    refused(connect(Some("wrong")), "Unauthenticated");
    refused(connect(Some("righ")), "Unauthenticated");

    let mut src = connect(Some("right")).unwrap();
    for path in [
        "../outside/secret",
        "global/../../outside/secret",
        "/etc/passwd",
        &outside.join("secret").display().to_string(),
        "escape/secret",
        "global/escape",
    ] {
        refused(fetch_all(src.as_mut(), path, 0, 100), "PermissionDenied");
        refused(src.read_file(path), "PermissionDenied");
    }
    // The listing shows the stray links as links, never what they point at.
    let list = src.list_files().unwrap();
    assert!(list.iter().all(|e| !e.path.contains("secret")));
    assert!(list.iter().any(|e| e.path == "global/pg_control"));

    // Still serving, also this connection: real bytes, across many chunks, verified.
    let control = src.control_file().unwrap();
    assert_eq!(
        control,
        std::fs::read(data.join("global/pg_control")).unwrap()
    );
    let pg_class = list
        .iter()
        .filter(|e| e.path.starts_with("base/") && e.size > 200_000)
        .max_by_key(|e| e.size)
        .expect("a relation file over 200 KB")
        .clone();
    let got = fetch_all(src.as_mut(), &pg_class.path, 0, pg_class.size).unwrap();
    assert_eq!(got, std::fs::read(data.join(&pg_class.path)).unwrap());
    // Past the end: Short at the real size; a missing file: Vanished.
    let mut seen = Vec::new();
    each_piece(
        src.as_mut(),
        vec![
            FetchRange {
                path: pg_class.path.clone(),
                offset: pg_class.size - 10,
                length: 100,
            },
            FetchRange {
                path: "base/1/999999".into(),
                offset: 0,
                length: 8192,
            },
        ],
        |p| seen.push(format!("{p:?}").split(", data").next().unwrap().to_string()),
    )
    .unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen[1].contains(&format!("size: {}", pg_class.size)),
        "{seen:?}"
    );
    assert!(seen[2].starts_with("Vanished"), "{seen:?}");
}

/// A data directory with a secret outside it and two stray symlinks to it, for
/// [`assert_tokens_and_paths_enforced`].
pub fn cluster_with_escapes(name: &str) -> Cluster {
    let cluster = Cluster::init(PgMajor::V15, name, Default::default());
    let data = cluster.data_dir();
    let outside = cluster.base_dir().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"not yours").unwrap();
    std::os::unix::fs::symlink(&outside, data.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), data.join("global/escape")).unwrap();
    cluster
}

/// The content [`damaging::Damaging`] serves, whatever the path.
pub fn damaging_content() -> Vec<u8> {
    (0..60_000u32).map(|i| (i / 100) as u8).collect()
}

/// Through a source connected to [`damaging::Damaging`] (serving [`damaging_content`]): a
/// chunk damaged once is fetched again and only good bytes reach the sink; a chunk damaged
/// twice is reported, and nothing reaches the sink.
pub fn assert_damage_caught(src: &mut dyn Source, damaged: &AtomicUsize) {
    let content = damaging_content();
    damaged.store(1, Ordering::SeqCst);
    assert_eq!(
        fetch_all(src, "f", 100, 50_000).unwrap(),
        &content[100..50_100]
    );
    assert_eq!(damaged.load(Ordering::SeqCst), 0, "nothing was damaged?");
    damaged.store(2, Ordering::SeqCst);
    let mut delivered = 0usize;
    let err = each_piece(
        src,
        vec![FetchRange {
            path: "f".into(),
            offset: 0,
            length: 50_000,
        }],
        |_| delivered += 1,
    )
    .expect_err("a twice-damaged chunk was accepted");
    assert_eq!(delivered, 0);
    let msg = err.to_string();
    assert!(msg.contains("ReadRanges"), "{msg}");
    assert!(msg.contains("does not match"), "{msg}");
}

/// A failbackd stand-in that damages the first `damaged` chunks it sends, to see the client
/// catch them (the real server cannot be made to send a bad chunk).
pub mod damaging {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use failback_common::wire::{Compression, encode};
    use failback_proto::v1::failback_server::Failback;
    use failback_proto::v1::*;
    use tonic::codegen::Bytes;
    use tonic::codegen::tokio_stream::{self, Stream};
    use tonic::{Request, Response, Status};

    pub struct Damaging {
        pub content: Vec<u8>,
        pub damaged: Arc<AtomicUsize>,
    }

    type S<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    #[tonic::async_trait]
    impl Failback for Damaging {
        async fn handshake(
            &self,
            _: Request<HandshakeRequest>,
        ) -> Result<Response<HandshakeResponse>, Status> {
            Ok(Response::new(HandshakeResponse {
                protocol_version: failback_proto::PROTOCOL_VERSION,
                max_chunk: 1 << 20,
                ..Default::default()
            }))
        }
        async fn control_file(
            &self,
            _: Request<ControlFileRequest>,
        ) -> Result<Response<ControlFileResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn timelines(
            &self,
            _: Request<TimelinesRequest>,
        ) -> Result<Response<TimelinesResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        type ListFilesStream = S<FileEntry>;
        async fn list_files(
            &self,
            _: Request<ListFilesRequest>,
        ) -> Result<Response<Self::ListFilesStream>, Status> {
            Err(Status::unimplemented(""))
        }
        type ReadRangesStream = S<Chunk>;
        async fn read_ranges(
            &self,
            r: Request<ReadRangesRequest>,
        ) -> Result<Response<Self::ReadRangesStream>, Status> {
            let mut out = Vec::new();
            for range in r.into_inner().ranges {
                let start = range.offset as usize;
                let raw = &self.content[start..start + range.length as usize];
                let e = encode(raw, Compression::Zstd(3)).unwrap();
                let mut data = e.data;
                let left = self.damaged.load(Ordering::SeqCst);
                if left > 0 {
                    self.damaged.store(left - 1, Ordering::SeqCst);
                    let mid = data.len() / 2;
                    data[mid] ^= 0x10;
                }
                out.push(Ok(Chunk {
                    path: range.path,
                    offset: range.offset,
                    raw_length: e.raw_length,
                    codec: e.codec.to_u32(),
                    data: Bytes::from(data),
                    hash: Bytes::copy_from_slice(&e.hash),
                    status: ChunkStatus::Ok as i32,
                }));
            }
            Ok(Response::new(Box::pin(tokio_stream::iter(out))))
        }
        type ChunkHashesStream = S<FileHashes>;
        async fn chunk_hashes(
            &self,
            _: Request<ChunkHashesRequest>,
        ) -> Result<Response<Self::ChunkHashesStream>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn end_of_wal(
            &self,
            _: Request<EndOfWalRequest>,
        ) -> Result<Response<EndOfWalResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        type BackupWindowStream = S<BackupWindowReply>;
        async fn backup_window(
            &self,
            _: Request<BackupWindowRequest>,
        ) -> Result<Response<Self::BackupWindowStream>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn end_backup_window(
            &self,
            _: Request<EndBackupWindowRequest>,
        ) -> Result<Response<EndBackupWindowResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        type ChangesStream = S<ChangesReply>;
        async fn changes(
            &self,
            _: Request<ChangesRequest>,
        ) -> Result<Response<Self::ChangesStream>, Status> {
            Err(Status::unimplemented(""))
        }
    }

    /// A stand-in serving [`super::damaging_content`], and its damage counter.
    pub fn new() -> (Damaging, Arc<AtomicUsize>) {
        let damaged = Arc::new(AtomicUsize::new(0));
        (
            Damaging {
                content: super::damaging_content(),
                damaged: damaged.clone(),
            },
            damaged,
        )
    }
}
