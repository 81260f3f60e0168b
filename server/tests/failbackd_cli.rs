//! The `failbackd` binary as an operator runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use failback_proto::v1 as pb;
use failback_tests::{Cluster, ClusterOptions, PgMajor};

#[test]
fn serves_a_data_directory_with_a_token() {
    let cluster = Cluster::init(PgMajor::V15, "failbackd-cli", ClusterOptions::default());
    let token = cluster.base_dir().join("token");
    std::fs::write(&token, "tok-en\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .arg("--pgdata")
        .arg(cluster.data_dir())
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(" on ").next().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let mut c = pb::failback_client::FailbackClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let hs = |token: Option<&str>| {
            let mut r = tonic::Request::new(pb::HandshakeRequest {
                protocol_version: failback_proto::PROTOCOL_VERSION,
                client_version: "test".into(),
            });
            if let Some(t) = token {
                r.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            r
        };
        let refused = c.handshake(hs(None)).await.unwrap_err();
        let ok = c
            .handshake(hs(Some("tok-en")))
            .await
            .map(|r| r.into_inner());
        (refused, ok)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let (refused, ok) = result;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{line}");
    let ok = ok.unwrap();
    assert_eq!(ok.pg_major, 15);
    assert_eq!(ok.wal_segment_size, 16 << 20);
    assert_eq!(ok.max_chunk, failback_server::DEFAULT_MAX_CHUNK);
}

#[test]
fn bad_flags_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .args(["--pgdata", "/nonexistent", "--listen", "127.0.0.1:0"])
        .args(["--max-chunk", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-chunk 0 is out of range"));
    let out = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .args([
            "--pgdata",
            "/x",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/c",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "--tls-cert without --tls-key accepted"
    );
}
