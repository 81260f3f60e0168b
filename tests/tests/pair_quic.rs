//! failbackd and failback over QUIC: a real failover rewound through the wire on every
//! version, the CLI with `quic://`, and the server's refusals (tokens, client certificates on
//! both transports, paths out of the data directory, oversized and malformed requests), with
//! the server serving on after each.

mod support;

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failback_client::source::quic::QuicSource;
use failback_client::source::remote::{self, RemoteOptions};
use failback_client::source::{Source, SourceError};
use failback_proto::v1::{self as pb, QuicReply, QuicRequest, quic_reply::Reply, quic_request};
use failback_server::Config;
use failback_tests::{Cluster, ClusterOptions, PgMajor, pg_test};
use failback_transport::frame::read_frame;
use failback_transport::tls::client_tls;
use failback_transport::tune::transport_config;
use prost::Message;
use support::*;

/// `config` with TLS: a `localhost` certificate from `ca`.
fn with_tls(mut config: Config, ca: &Ca) -> Config {
    config.tls = Some(ca.issue("localhost", false));
    config
}

fn quic_options(server: &Failbackd, ca: &Ca, token: Option<&str>) -> RemoteOptions {
    RemoteOptions {
        ca: Some(ca.pem.clone()),
        ..options(server.quic_url(), token)
    }
}

fn quic_connect(
    server: &Failbackd,
    ca: &Ca,
    token: Option<&str>,
) -> Result<QuicSource, SourceError> {
    QuicSource::connect(quic_options(server, ca, token))
}

pg_test!(rewinds_through_quic, |major| {
    let (primary, new_primary) = diverged(major);
    let ca = Ca::new("failback test CA");
    let mut config = with_tls(Failbackd::config(&new_primary.data_dir()), &ca);
    config.token = Some("s3cret".into());
    let server = Failbackd::serve(config, true);
    let mut source = quic_connect(&server, &ca, Some("s3cret")).expect("connect over QUIC");
    rewind_from(&mut source, &primary, &new_primary);
    drop(source);
    drop(server);
    rejoin_and_compare(primary, new_primary);
});

/// The `failback` binary with `--source quic://`, `--ca`, a client certificate (`--cert/--key`)
/// for a failbackd started with `--client-ca`, and `--compress auto`.
#[test]
fn cli_rewinds_through_quic() {
    let (primary, new_primary) = diverged(PgMajor::V15);
    let ca = Ca::new("failback test CA");
    let mut config = with_tls(Failbackd::config(&new_primary.data_dir()), &ca);
    config.token = Some("cli-token".into());
    config.client_ca = Some(ca.pem.clone());
    let server = Failbackd::serve(config, true);
    let dir = tempfile_dir();
    let (cert, key) = ca.issue("failback-client", true);
    let mut extra = Vec::<OsString>::new();
    for (flag, name, pem) in [
        ("--ca", "ca.pem", &ca.pem),
        ("--cert", "client.pem", &cert),
        ("--key", "client.key", &key),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
        extra.push(flag.into());
        extra.push(dir.join(name).into());
    }
    // And the compression chosen as the copy goes.
    extra.push("--compress".into());
    extra.push("auto".into());
    cli_rewind(
        &primary,
        &new_primary,
        &server.quic_url(),
        "cli-token",
        &extra,
    );
    drop(server);
    rejoin_and_compare(primary, new_primary);
}

#[test]
fn tokens_and_paths_are_enforced_over_quic() {
    let cluster = cluster_with_escapes("served-quic");
    let ca = Ca::new("failback test CA");
    let mut config = with_tls(Failbackd::config(&cluster.data_dir()), &ca);
    config.token = Some("right".into());
    let server = Failbackd::serve(config, true);
    assert_tokens_and_paths_enforced(&cluster, |token| {
        Ok(Box::new(quic_connect(&server, &ca, token)?) as Box<dyn Source>)
    });
}

#[test]
fn client_certificates_are_required_on_both_transports() {
    let cluster = Cluster::init(PgMajor::V15, "served-mtls", ClusterOptions::default());
    let control = std::fs::read(cluster.data_dir().join("global/pg_control")).unwrap();
    let ca = Ca::new("failback test CA");
    let stranger = Ca::new("another CA");
    let mut config = with_tls(Failbackd::config(&cluster.data_dir()), &ca);
    config.client_ca = Some(ca.pem.clone());
    let server = Failbackd::serve(config, true);
    let ours = ca.issue("failback-client", true);
    let theirs = stranger.issue("failback-client", true);
    for url in [server.tls_url(), server.quic_url()] {
        let connect_to = |server_ca: &Ca, identity: Option<&(Vec<u8>, Vec<u8>)>| {
            remote::connect(RemoteOptions {
                ca: Some(server_ca.pem.clone()),
                identity: identity.cloned(),
                ..options(url.clone(), None)
            })
        };
        let connect = |identity| connect_to(&ca, identity);
        assert!(
            connect_to(&stranger, Some(&ours)).is_err(),
            "{url}: a server certificate from another CA was accepted"
        );
        assert!(
            connect(None).is_err(),
            "{url}: a client without a certificate was served"
        );
        assert!(
            connect(Some(&theirs)).is_err(),
            "{url}: a client certificate from another CA was accepted"
        );
        let mut src = connect(Some(&ours)).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(src.control_file().unwrap(), control, "{url}");
    }
    // A QUIC source needs --ca: QUIC always runs TLS.
    let no_ca = remote::connect(options(server.quic_url(), None));
    assert!(matches!(no_ca, Err(SourceError::Refused { .. })));
}

/// A bare QUIC connection, to send what a real client never would.
struct Raw {
    rt: tokio::runtime::Runtime,
    conn: quinn::Connection,
}

impl Raw {
    fn connect(server: &Failbackd, ca: &Ca) -> Raw {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let conn = rt.block_on(async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let mut config = quinn::ClientConfig::new(Arc::new(client_tls(&ca.pem, None).unwrap()));
            config.transport_config(Arc::new(transport_config(1 << 20, 0, 1 << 20)));
            endpoint.set_default_client_config(config);
            endpoint
                .connect(server.quic_addr(), "localhost")
                .unwrap()
                .await
                .unwrap()
        });
        Raw { rt, conn }
    }

    /// Writes `bytes` on a new stream and reads every reply.
    fn call(&self, bytes: &[u8]) -> Vec<Reply> {
        self.rt.block_on(async {
            let (mut send, recv) = self.conn.open_bi().await.unwrap();
            // The server may stop reading (an oversized request): then the write fails.
            let _ = send.write_all(bytes).await;
            let _ = send.finish();
            let mut recv = tokio::io::BufReader::new(recv);
            let mut out = Vec::new();
            while let Some(f) = read_frame(&mut recv, 32 << 20).await.unwrap() {
                out.push(QuicReply::decode(&f[..]).unwrap().reply.unwrap());
            }
            out
        })
    }

    fn request(&self, call: quic_request::Call) -> Vec<Reply> {
        let req = QuicRequest {
            token: String::new(),
            call: Some(call),
        };
        self.call(&req.encode_length_delimited_to_vec())
    }
}

/// The call ended with one error of `code`, after `before` other replies.
fn failed(replies: &[Reply], before: usize, code: tonic::Code) {
    assert_eq!(replies.len(), before + 1, "{replies:?}");
    match replies.last() {
        Some(Reply::Error(s)) => assert_eq!(s.code, code as i32, "{s:?}"),
        other => panic!("expected an error {code:?}, got {other:?}"),
    }
}

#[test]
fn malformed_and_oversized_requests_get_an_error_and_the_server_keeps_serving() {
    let cluster = Cluster::init(PgMajor::V15, "served-raw", ClusterOptions::default());
    let ca = Ca::new("failback test CA");
    let mut config = with_tls(Failbackd::config(&cluster.data_dir()), &ca);
    config.quic.max_request = 4096;
    config.quic.max_connections = 2;
    let server = Failbackd::serve(config, true);
    let raw = Raw::connect(&server, &ca);
    use quic_request::Call;
    use tonic::Code;

    // Raw garbage; a frame whose body is not a request; a frame cut short; two frames;
    // a request naming no call.
    failed(
        &raw.call(b"\xff\xff\xff\xff garbage"),
        0,
        Code::InvalidArgument,
    );
    failed(
        &raw.call(b"\x05\xff\xff\xff\xff\xff"),
        0,
        Code::InvalidArgument,
    );
    failed(&raw.call(b"\x40abc"), 0, Code::InvalidArgument);
    let hs = QuicRequest {
        token: String::new(),
        call: Some(Call::Handshake(pb::HandshakeRequest {
            protocol_version: failback_proto::PROTOCOL_VERSION,
            client_version: "raw".into(),
        })),
    }
    .encode_length_delimited_to_vec();
    failed(
        &raw.call(&[hs.clone(), hs.clone()].concat()),
        0,
        Code::InvalidArgument,
    );
    failed(&raw.call(b"\x00"), 0, Code::InvalidArgument);
    // Over the request limit.
    let big = Call::ReadRanges(pb::ReadRangesRequest {
        ranges: (0..100)
            .map(|i| pb::Range {
                path: format!("base/1/{i}{}", "x".repeat(100)),
                offset: 0,
                length: 1,
            })
            .collect(),
        compression_level: 0,
    });
    failed(&raw.request(big), 0, Code::ResourceExhausted);
    // Refused by the service, as over gRPC.
    let overflow = Call::ReadRanges(pb::ReadRangesRequest {
        ranges: vec![pb::Range {
            path: "global/pg_control".into(),
            offset: u64::MAX,
            length: 2,
        }],
        compression_level: 0,
    });
    failed(&raw.request(overflow), 0, Code::InvalidArgument);
    let outside = Call::ReadRanges(pb::ReadRangesRequest {
        ranges: vec![pb::Range {
            path: "../outside".into(),
            offset: 0,
            length: 2,
        }],
        compression_level: 0,
    });
    failed(&raw.request(outside), 0, Code::PermissionDenied);

    // The same connection still answers.
    match &raw.call(&hs)[..] {
        [Reply::Handshake(h)] => assert_eq!(h.pg_major, 15),
        other => panic!("no handshake: {other:?}"),
    }
    let listed = raw.request(Call::ListFiles(pb::ListFilesRequest {}));
    assert!(listed.len() > 100, "{}", listed.len());
    assert!(
        listed
            .iter()
            .all(|r| matches!(r, Reply::FileEntry(e) if !e.path.is_empty()))
    );

    // Two connections at most: the raw one and one source; a third is refused until one goes.
    let one = |server: &Failbackd| {
        QuicSource::connect(RemoteOptions {
            connections: 1,
            ..quic_options(server, &ca, None)
        })
    };
    assert!(
        QuicSource::connect(quic_options(&server, &ca, None)).is_err(),
        "a source of two connections was served beside the raw one"
    );
    let mut src = one(&server).unwrap();
    assert_eq!(src.control_file().unwrap().len(), 8192);
    assert!(one(&server).is_err(), "a third connection was served");
    drop(src);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        match one(&server) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("the freed slot stays taken: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(again.control_file().unwrap().len(), 8192);
}

#[test]
fn a_damaged_chunk_is_retried_once_then_reported_over_quic() {
    let (svc, damaged) = damaging::new();
    let ca = Ca::new("failback test CA");
    let config = with_tls(Config::new("/nonexistent"), &ca);
    let server = Failbackd::serve_quic_service(svc, config);
    let mut src = quic_connect(&server, &ca, None).unwrap();
    assert_damage_caught(&mut src, &damaged);
}

/// With one stream allowed per connection, the reads `--jobs` would run side by side wait for
/// QUIC stream credit, one after the other, and every byte still arrives where it belongs.
#[test]
fn reads_over_the_stream_limit_wait_for_their_turn() {
    use failback_client::source::{FetchRange, Fetched};
    let cluster = Cluster::init(PgMajor::V15, "served-1-stream", ClusterOptions::default());
    let ca = Ca::new("failback test CA");
    let mut config = with_tls(Failbackd::config(&cluster.data_dir()), &ca);
    config.quic.max_streams_per_connection = 1;
    let server = Failbackd::serve(config, true);
    let mut src = QuicSource::connect(RemoteOptions {
        jobs: 8,
        connections: 1,
        ..quic_options(&server, &ca, None)
    })
    .unwrap();
    // One range per byte: more ranges than one request carries, so several requests.
    let ranges: Vec<FetchRange> = (0..8192)
        .map(|i| FetchRange {
            path: "global/pg_control".into(),
            offset: i,
            length: 1,
        })
        .collect();
    let mut got = vec![0u8; 8192];
    let mut pieces = 0;
    each_piece(&mut src, ranges, |p| {
        let Fetched::Data { offset, data, .. } = p else {
            panic!("{p:?}")
        };
        got[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        pieces += 1;
    })
    .unwrap();
    assert_eq!(pieces, 8192);
    assert_eq!(
        got,
        std::fs::read(cluster.data_dir().join("global/pg_control")).unwrap()
    );
}
