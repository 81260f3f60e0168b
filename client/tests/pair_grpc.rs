//! failbackd and failback over gRPC: a real failover rewound through the wire, and the
//! server's refusals (tokens, paths out of the data directory, oversized requests).

mod support;

use std::process::Command;

use failback_client::source::Source;
use failback_client::source::SourceError;
use failback_client::source::grpc::GrpcSource;
use failback_client::source::remote::RemoteOptions;
use failback_tests::{Cluster, ClusterOptions, PgMajor, pg_test};
use support::*;

fn connect(url: String, token: Option<&str>) -> Result<GrpcSource, SourceError> {
    GrpcSource::connect(options(url, token))
}

pg_test!(rewinds_through_failbackd, |major| {
    let (primary, new_primary) = diverged(major);
    let server = Failbackd::start(&new_primary.data_dir(), Some("s3cret"));
    let mut source = connect(server.url(), Some("s3cret")).expect("connect to failbackd");
    rewind_from(&mut source, &primary, &new_primary);
    timelines_are_served(&new_primary);
    drop(source);
    drop(server);
    rejoin_and_compare(primary, new_primary);
});

/// The `failback` binary with `--source grpc://`, `--token-file`, `--jobs`, `--compress none`.
#[test]
fn cli_rewinds_through_failbackd() {
    let (primary, new_primary) = diverged(PgMajor::V15);
    let server = Failbackd::start(&new_primary.data_dir(), Some("cli-token"));
    cli_rewind(&primary, &new_primary, &server.url(), "cli-token", &[]);
    drop(server);
    rejoin_and_compare(primary, new_primary);
}

#[test]
fn cli_refuses_two_sources_or_none() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_failback"))
            .args(args)
            .output()
            .unwrap()
    };
    let both = run(&[
        "rewind",
        "-D",
        "/nonexistent",
        "--source-pgdata",
        "/x",
        "--source",
        "grpc://127.0.0.1:1",
    ]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    let none = run(&["rewind", "-D", "/nonexistent"]);
    assert!(!none.status.success());
    let jobs_local = run(&["rewind", "-D", "/x", "--source-pgdata", "/y", "--jobs", "3"]);
    assert!(String::from_utf8_lossy(&jobs_local.stderr).contains("--source <URL>"));
    let down = run(&["rewind", "-D", "/x", "--source", "grpc://127.0.0.1:1"]);
    let err = String::from_utf8_lossy(&down.stderr).into_owned();
    assert!(
        err.contains("could not connect") && err.contains("refused"),
        "{err}"
    );
    let bad = run(&[
        "rewind",
        "-D",
        "/x",
        "--source",
        "grpc://127.0.0.1:1",
        "--compress",
        "fast",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("neither a zstd level"));
}

#[test]
fn tokens_and_paths_are_enforced_over_the_wire() {
    let cluster = cluster_with_escapes("served");
    let server = Failbackd::start(&cluster.data_dir(), Some("right"));
    assert_tokens_and_paths_enforced(&cluster, |token| {
        Ok(Box::new(connect(server.url(), token)?) as Box<dyn Source>)
    });
}

#[test]
fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    use failback_proto::v1 as pb;
    let cluster = Cluster::init(PgMajor::V15, "served-big", ClusterOptions::default());
    let server = Failbackd::start(&cluster.data_dir(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut raw = rt
        .block_on(pb::failback_client::FailbackClient::connect(format!(
            "http://{}",
            server.addr()
        )))
        .unwrap();
    let many = pb::ReadRangesRequest {
        ranges: (0..70_000)
            .map(|i| pb::Range {
                path: format!("base/1/{i}"),
                offset: 0,
                length: 1,
            })
            .collect(),
        compression_level: 0,
    };
    let e = rt.block_on(raw.read_ranges(many)).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let overflow = pb::ReadRangesRequest {
        ranges: vec![pb::Range {
            path: "global/pg_control".into(),
            offset: u64::MAX,
            length: 2,
        }],
        compression_level: 0,
    };
    let e = rt.block_on(raw.read_ranges(overflow)).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let level = pb::ReadRangesRequest {
        ranges: vec![],
        compression_level: 99,
    };
    let e = rt.block_on(raw.read_ranges(level)).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let hs = rt
        .block_on(raw.handshake(pb::HandshakeRequest {
            protocol_version: 1,
            client_version: "t".into(),
        }))
        .unwrap()
        .into_inner();
    assert_eq!(hs.pg_major, 15);
    assert_eq!(hs.block_size, 8192);
    assert_ne!(hs.system_identifier, 0);
    let mut src = connect(server.url(), None).unwrap();
    assert_eq!(src.control_file().unwrap().len(), 8192);
}

#[test]
fn tls_with_the_right_ca_only() {
    use failback_proto::v1 as pb;
    let cluster = Cluster::init(PgMajor::V15, "served-tls", ClusterOptions::default());
    let (cert, key) = self_signed("localhost");
    let server = Failbackd::start_with(&cluster.data_dir(), Some("t"), Some((cert.clone(), key)));
    let url = server.tls_url();
    let tls = |ca: Option<Vec<u8>>, url: &str| {
        GrpcSource::connect(RemoteOptions {
            ca,
            ..options(url.to_string(), Some("t"))
        })
    };
    let mut src = tls(Some(cert.clone()), &url).expect("TLS with the server's CA");
    assert_eq!(
        src.control_file().unwrap(),
        std::fs::read(cluster.data_dir().join("global/pg_control")).unwrap()
    );
    let (other_ca, _) = self_signed("localhost");
    assert!(
        tls(Some(other_ca), &url).is_err(),
        "a certificate from another CA was accepted"
    );
    assert!(
        tls(None, &url).is_err(),
        "grpcs:// without --ca was accepted"
    );
    // Plain HTTP/2 to a TLS server gets nowhere.
    assert!(connect(server.url(), Some("t")).is_err());
    drop(src);

    // Timelines: a fresh cluster is on timeline 1 without history files.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plain = Failbackd::start(&cluster.data_dir(), None);
    let mut raw = rt
        .block_on(pb::failback_client::FailbackClient::connect(format!(
            "http://{}",
            plain.addr()
        )))
        .unwrap();
    let t = rt
        .block_on(raw.timelines(pb::TimelinesRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(t.current_timeline, 1);
    assert!(t.histories.is_empty());
}

/// The promoted standby is on timeline 2, with `00000002.history` served verbatim.
fn timelines_are_served(new_primary: &Cluster) {
    use failback_proto::v1 as pb;
    let server = Failbackd::start(&new_primary.data_dir(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut raw = rt
        .block_on(pb::failback_client::FailbackClient::connect(format!(
            "http://{}",
            server.addr()
        )))
        .unwrap();
    let t = rt
        .block_on(raw.timelines(pb::TimelinesRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(t.current_timeline, 2);
    let h2 = t
        .histories
        .iter()
        .find(|h| h.timeline == 2)
        .expect("history of 2");
    assert_eq!(
        h2.data.as_ref(),
        std::fs::read(new_primary.data_dir().join("pg_wal/00000002.history")).unwrap()
    );
}

#[test]
fn a_damaged_chunk_is_retried_once_then_reported() {
    let (svc, damaged) = damaging::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(failback_proto::v1::failback_server::FailbackServer::new(
                svc,
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut src = connect(format!("grpc://{addr}"), None).unwrap();
    assert_damage_caught(&mut src, &damaged);
}
