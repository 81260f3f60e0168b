//! failbackd over gRPC against clients that misbehave on purpose: one that asks and never
//! reads beside a real rewind, a flood of calls without the token, and requests that are
//! small on the wire but would buy large work. (QUIC's own: `server/tests/hostile_quic.rs`.)

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use failback_proto::v1 as pb;
use failback_proto::v1::failback_client::FailbackClient;
use failback_tests::{Cluster, ClusterOptions, PgMajor};
use support::*;
use tonic::transport::Channel;

/// failbackd with `token`, its audit lines collected, and `config` adjusted.
fn serve(
    pgdata: &std::path::Path,
    token: Option<&str>,
    adjust: impl FnOnce(&mut failback_server::Config),
) -> (Failbackd, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    let mut config = Failbackd::config(pgdata);
    config.token = token.map(str::to_string);
    config.audit = Arc::new(failback_server::audit::Audit::to(move |l| {
        l2.lock().unwrap().push(l.to_string())
    }));
    adjust(&mut config);
    (Failbackd::serve(config, false), lines)
}

/// A raw client on a connection of its own, carrying `token`.
async fn raw(
    server_addr: std::net::SocketAddr,
    token: Option<&str>,
) -> FailbackClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    >,
> {
    let channel = Channel::from_shared(format!("http://{server_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header = token.map(|t| format!("Bearer {t}").parse::<tonic::metadata::MetadataValue<_>>());
    let header = header.map(Result::unwrap);
    FailbackClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        if let Some(h) = &header {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20)
}

/// A client that asks for the source's WAL segments on two connections, 40 requests each,
/// and never reads a byte of the answers, holds every reader slot of failbackd (64), and
/// then some. A real rewind beside it still completes: each connection holds at most half
/// the slots, and once the rewind's requests wait, the stalled streams are ended after the
/// stall timeout and give theirs up.
#[test]
fn a_client_that_never_reads_does_not_stop_a_rewind() {
    let (primary, new_primary) = diverged(PgMajor::V15);
    let (server, lines) = serve(&new_primary.data_dir(), Some("tok"), |c| {
        c.stall_timeout = Duration::from_secs(2);
    });
    let mut segments: Vec<String> = std::fs::read_dir(new_primary.data_dir().join("pg_wal"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 24)
        .map(|n| format!("pg_wal/{n}"))
        .collect();
    segments.sort();
    assert!(!segments.is_empty());
    let addr = server.addr();
    let mut held = Vec::new();
    for _ in 0..2 {
        let client = server.rt.block_on(raw(addr, Some("tok")));
        for i in 0..40 {
            let mut client = client.clone();
            let req = pb::ReadRangesRequest {
                ranges: vec![pb::Range {
                    path: segments[i % segments.len()].clone(),
                    offset: 0,
                    length: 16 << 20,
                }],
                compression_level: 0,
            };
            held.push(server.rt.spawn(async move {
                let answer = client.read_ranges(req).await;
                // Holds the answer, never reading it.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(answer);
            }));
        }
    }
    // Let the streams fill their windows and take their slots.
    std::thread::sleep(Duration::from_secs(2));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (p, np, url) = (primary.data_dir(), new_primary.data_dir(), server.url());
    let rewind = std::thread::spawn(move || {
        let _ = (p, np);
        let mut source =
            failback_client::source::grpc::GrpcSource::connect(options(url, Some("tok")))
                .expect("connect to failbackd");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rewind_from(&mut source, &primary, &new_primary);
        }));
        let _ = done_tx.send(r.is_ok());
        (primary, new_primary)
    });
    let ok = done_rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the rewind did not finish within 5 minutes beside a client that never reads");
    assert!(ok, "the rewind failed beside a client that never reads");
    let (primary, new_primary) = rewind.join().unwrap();
    let log = lines.lock().unwrap().join("\n");
    assert!(
        log.contains("ended ReadRanges of 127.0.0.1:") && log.contains("read nothing"),
        "the stalled streams were not logged:\n{log}"
    );
    for h in held {
        h.abort();
    }
    drop(server);
    rejoin_and_compare(primary, new_primary);
}

/// Calls without the token, each with a large request, are refused from their headers, the
/// server keeps serving, and the log names the peer without a line per refusal.
#[test]
fn a_flood_without_the_token_is_refused_logged_and_rate_limited() {
    let cluster = Cluster::init(PgMajor::V15, "hostile-flood", ClusterOptions::default());
    let (server, lines) = serve(&cluster.data_dir(), Some("right"), |_| {});
    let addr = server.addr();
    let big = pb::ReadRangesRequest {
        ranges: (0..20_000)
            .map(|i| pb::Range {
                path: format!("base/1/{i:020}"),
                offset: 0,
                length: 8192,
            })
            .collect(),
        compression_level: 0,
    };
    let started = std::time::Instant::now();
    let codes: Vec<tonic::Code> = server.rt.block_on(async {
        let mut tasks = Vec::new();
        for token in [None, Some("wrong"), Some("righ"), Some("right-and-more")] {
            let client = raw(addr, token).await;
            for _ in 0..50 {
                let (mut c, req) = (client.clone(), big.clone());
                tasks.push(tokio::spawn(async move {
                    c.read_ranges(req).await.map(|_| ()).unwrap_err().code()
                }));
            }
        }
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.unwrap());
        }
        codes
    });
    assert!(
        codes.iter().all(|c| *c == tonic::Code::Unauthenticated),
        "{codes:?}"
    );
    let hs = server
        .rt
        .block_on(async {
            raw(addr, Some("right"))
                .await
                .handshake(pb::HandshakeRequest {
                    protocol_version: 1,
                    client_version: "t".into(),
                })
                .await
        })
        .expect("the right token is served after the flood")
        .into_inner();
    assert_eq!(hs.pg_major, 15);
    // The count of the lines held back is told, by a later line or, once the flood is over,
    // within a second of it.
    let told = |lines: &Vec<String>| lines.iter().any(|l| l.contains("held back"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !told(&lines.lock().unwrap()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The burst, then what the rate allows over the time since the flood began.
    let allowed = failback_server::audit::BURST
        + failback_server::audit::PER_SECOND * (started.elapsed().as_secs() + 1);
    let lines = lines.lock().unwrap();
    assert!(
        !lines.is_empty() && (lines.len() as u64) <= allowed && allowed < 200,
        "200 refusals gave {} lines (at most {allowed} allowed): {lines:?}",
        lines.len()
    );
    assert!(told(&lines), "{lines:?}");
    assert!(
        lines[0].starts_with("refused a gRPC call from 127.0.0.1:")
            && lines[0].contains("missing or wrong bearer token"),
        "{lines:?}"
    );
}

/// Requests small on the wire that would buy large work: more ranges than decoding should
/// ever hold, an offset no file reaches, the highest compression level.
#[test]
fn small_requests_cannot_buy_large_work() {
    let cluster = Cluster::init(PgMajor::V15, "hostile-work", ClusterOptions::default());
    let (server, lines) = serve(&cluster.data_dir(), None, |_| {});
    let addr = server.addr();
    let mut c = server.rt.block_on(raw(addr, None));
    // Half a million empty ranges: 1 MB on the wire, 20 MB once decoded.
    let empty = pb::ReadRangesRequest {
        ranges: vec![pb::Range::default(); 600_000],
        compression_level: 0,
    };
    let e = server
        .rt
        .block_on(c.read_ranges(empty))
        .map(|_| ())
        .expect_err("refused");
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e}"
    );
    // An offset past 2^63 can never be read: refused for good, not "try again".
    let far = pb::ReadRangesRequest {
        ranges: vec![pb::Range {
            path: "global/pg_control".into(),
            offset: 1 << 63,
            length: 1,
        }],
        compression_level: 0,
    };
    let e = server
        .rt
        .block_on(c.read_ranges(far))
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // A level past failbackd's highest is served at its highest.
    for level in [22, 99] {
        let req = pb::ReadRangesRequest {
            ranges: vec![pb::Range {
                path: "global/pg_control".into(),
                offset: 0,
                length: 8192,
            }],
            compression_level: level,
        };
        let chunks: Vec<pb::Chunk> = server.rt.block_on(async {
            let mut s = c.read_ranges(req).await.unwrap().into_inner();
            let mut out = Vec::new();
            while let Some(ch) = s.message().await.unwrap() {
                out.push(ch);
            }
            out
        });
        assert_eq!(chunks.len(), 1);
        let raw = failback_common::wire::decode(
            chunks[0].codec,
            &chunks[0].data,
            &chunks[0].hash,
            chunks[0].raw_length,
            8192,
        )
        .unwrap();
        assert_eq!(
            raw,
            std::fs::read(cluster.data_dir().join("global/pg_control")).unwrap()
        );
    }
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("ends past 2^63")),
        "{:?}",
        lines.lock().unwrap()
    );
}
