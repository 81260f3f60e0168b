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
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    // With a token and without TLS: a warning that the bytes and the token cross in clear,
    // none about the token.
    let warning = line_with(&mut stderr, "warning:");
    assert!(
        warning.contains("without TLS") && warning.contains("and the token"),
        "{warning}"
    );
    let line = line_with(&mut stderr, "serving ");
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
    assert_eq!(ok.max_chunk, failback_proto::limits::DEFAULT_MAX_CHUNK);
}

/// The first line of failbackd's stderr that contains `needle`. The lines saying where it
/// listens come in a fixed order, but the WAL summarizer's line runs on its own thread and
/// may come before, between or after them.
fn line_with(stderr: &mut impl BufRead, needle: &str) -> String {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(
            n > 0,
            "failbackd ended its stderr before {needle:?}: {seen:?}"
        );
        if line.contains(needle) {
            return line;
        }
        seen.push(line);
    }
}

/// failbackd's stderr when it refuses to start with `args`.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "failbackd accepted {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// failbackd starts only on a PostgreSQL data directory: an empty directory, `/`, a file and
/// a path that does not exist are each refused with what is wrong, before anything listens.
#[test]
fn refuses_what_is_not_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("postgresql.conf");
    std::fs::write(&file, "port = 5432\n").unwrap();
    let missing = dir.path().join("missing");
    for (pgdata, says) in [
        (dir.path(), "not a PostgreSQL data directory"),
        (std::path::Path::new("/"), "not a PostgreSQL data directory"),
        (file.as_path(), "is not a directory"),
        (missing.as_path(), "does not exist"),
    ] {
        let p = pgdata.to_str().unwrap();
        let err = refused(&["--pgdata", p, "--listen", "127.0.0.1:0"]);
        assert!(err.contains(says) && err.contains(p), "{p}: {err}");
        assert!(!err.contains("serving"), "{err}");
    }
    // A directory with PG_VERSION but no valid control file.
    std::fs::write(dir.path().join("PG_VERSION"), "16\n").unwrap();
    std::fs::create_dir(dir.path().join("global")).unwrap();
    std::fs::write(dir.path().join("global/pg_control"), [0u8; 100]).unwrap();
    let err = refused(&[
        "-D",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("pg_control"), "{err}");
}

/// Without a token or client certificates failbackd warns that anyone may read the data.
#[test]
fn warns_when_serving_without_a_token() {
    let cluster = Cluster::init(PgMajor::V15, "failbackd-open", ClusterOptions::default());
    let mut child = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .arg("--pgdata")
        .arg(cluster.data_dir())
        .args(["--listen", "127.0.0.1:0", "--no-wal-summaries"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let tls = line_with(&mut stderr, "without TLS");
    let token = line_with(&mut stderr, "without a token");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!tls.contains("and the token"), "{tls}");
    assert!(token.contains("--token-file"), "{token}");
}

#[test]
fn bad_flags_are_refused() {
    let base = ["--pgdata", "/x", "--listen", "127.0.0.1:0"];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    let err = refused(&with(&["--max-chunk", "0"]));
    assert!(err.contains("--max-chunk 0 is out of range"), "{err}");
    // --tls-cert without --tls-key
    refused(&with(&["--tls-cert", "/c"]));
    let err = refused(&with(&["--window", "1000"]));
    assert!(err.contains("--window 1000 is out of range"), "{err}");
    let err = refused(&with(&["--quic-initial-window", "1200"]));
    assert!(
        err.contains("--quic-initial-window 1200 is out of range"),
        "{err}"
    );
}

fn self_signed(name: &str) -> (Vec<u8>, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (
        ck.cert.pem().into_bytes(),
        ck.signing_key.serialize_pem().into_bytes(),
    )
}

/// `--quic-listen` beside `--listen`, with `--client-ca`: a QUIC call with a client
/// certificate is answered, and Ctrl-C stops both transports cleanly.
#[test]
fn serves_quic_beside_grpc_and_stops_on_ctrl_c() {
    use failback_proto::v1::{QuicReply, QuicRequest, quic_reply, quic_request};
    use failback_transport::frame::{read_frame, write_frame};
    use failback_transport::tls::client_tls;
    use failback_transport::tune::transport_config;
    use prost::Message;
    use std::sync::Arc;

    let cluster = Cluster::init(PgMajor::V15, "failbackd-quic", ClusterOptions::default());
    let dir = cluster.base_dir();
    let (cert, key) = self_signed("localhost");
    let (client_cert, client_key) = self_signed("failback-client");
    for (name, pem) in [
        ("server.pem", &cert),
        ("server.key", &key),
        ("clients.pem", &client_cert),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_failbackd"))
        .arg("--pgdata")
        .arg(cluster.data_dir())
        .args(["--listen", "127.0.0.1:0", "--quic-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .arg("--client-ca")
        .arg(dir.join("clients.pem"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let quic_line = line_with(&mut stderr, "over QUIC");
    let quic: std::net::SocketAddr = quic_line
        .trim()
        .rsplit(" on ")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reply = rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let tls = client_tls(&cert, Some((&client_cert, &client_key))).unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(tls));
        config.transport_config(Arc::new(transport_config(1 << 20, 0, 1 << 20)));
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(quic, "localhost").unwrap().await.unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let req = QuicRequest {
            token: String::new(),
            call: Some(quic_request::Call::ControlFile(Default::default())),
        };
        write_frame(&mut send, &req).await.unwrap();
        send.finish().unwrap();
        let frame = read_frame(&mut tokio::io::BufReader::new(recv), 1 << 20)
            .await
            .unwrap()
            .unwrap();
        QuicReply::decode(&frame[..]).unwrap()
    });
    match reply.reply {
        Some(quic_reply::Reply::ControlFile(c)) => assert_eq!(
            c.data.as_ref(),
            std::fs::read(cluster.data_dir().join("global/pg_control")).unwrap()
        ),
        other => panic!("no control file: {other:?}"),
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("failbackd did not stop on Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn quic_and_client_certificates_need_tls() {
    for flags in [["--quic-listen", "127.0.0.1:0"], ["--client-ca", "/ca.pem"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_failbackd"))
            .args(["--pgdata", "/x", "--listen", "127.0.0.1:0"])
            .args(flags)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?} without TLS accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--tls-cert"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
