//! failbackd's metrics as an operator scrapes them: the real binary with `--metrics-listen`,
//! scraped before and after a real rewind through it, a refused client, and a scraper that
//! sends garbage.

mod support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use failback_client::source::remote::{RemoteOptions, connect};
use failback_tests::PgMajor;
use failback_tests::failbackd::{Failbackd, Via};
use support::*;

/// One sample: its metric name and labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
}

/// A scrape, parsed: every sample by series, and each family's type.
#[derive(Debug)]
struct Exposition {
    samples: BTreeMap<Series, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the text exposition format (0.0.4) as failbackd writes it; panics on anything
    /// else, so a malformed exposition fails the test.
    fn parse(text: &str) -> Exposition {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        let mut helped = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(!help.is_empty(), "{line}");
                helped.insert(name.to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name type");
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "{name} typed twice"
                );
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let (series, value) = parse_sample(line);
            assert!(types.contains_key(&series.name), "no TYPE before {line}");
            assert!(
                samples.insert(series, value).is_none(),
                "a series written twice: {line}"
            );
        }
        Exposition { samples, types }
    }

    /// The value of `name{labels}`; panics with the whole scrape when it is missing.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.try_get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in {:#?}", self.samples))
    }

    fn try_get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key = Series {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        self.samples.get(&key).copied()
    }

    /// The sum over the series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// `name{k="v",...} value`, label values unescaped.
fn parse_sample(line: &str) -> (Series, f64) {
    let (series, value) = line.rsplit_once(' ').expect("a sample and its value");
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("not a value: {line}"));
    let (name, mut rest) = match series.split_once('{') {
        Some((n, r)) => (n, r.strip_suffix('}').expect("labels end with }")),
        None => (series, ""),
    };
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "{line}"
    );
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("an unterminated label value") {
                (_, '\\') => match chars.next().expect("an escape").1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        assert!(labels.insert(key.to_string(), value).is_none(), "{line}");
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    (
        Series {
            name: name.to_string(),
            labels,
        },
        value,
    )
}

/// Sends `request` raw and reads the answer to the end: (status code, headers, body); status
/// 0 when the server closed without answering.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A huge request may be answered and closed before it is all sent.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8(answer).expect("a UTF-8 answer");
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        assert!(answer.is_empty(), "half an answer: {answer:?}");
        return (0, String::new(), String::new());
    };
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|h| h.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {head}"));
    (status, head.to_string(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: failbackd\r\nUser-Agent: test\r\n\r\n").as_bytes(),
    )
}

fn scrape(addr: SocketAddr) -> Exposition {
    let (status, head, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    Exposition::parse(&body)
}

/// A client of `server` via `via` presenting `token`.
fn connect_with(
    server: &Failbackd,
    via: Via,
    token: &str,
) -> Result<Box<dyn failback_client::source::Source>, failback_client::source::SourceError> {
    let args = server.source_args(via);
    let url = args[1].to_str().expect("a UTF-8 URL").to_string();
    connect(RemoteOptions {
        ca: Some(std::fs::read(&args[3]).expect("the CA certificate")),
        ..options(url, Some(token))
    })
}

const KINDS_OF_A_REWIND: [&str; 5] = [
    "Handshake",
    "ControlFile",
    "Timelines",
    "ListFiles",
    "ReadRanges",
];

#[test]
fn metrics_count_a_rewind_and_a_refused_client() {
    let (primary, new_primary) = diverged(PgMajor::V15);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "metrics-token\n").unwrap();
    let server = Failbackd::serve_with_flags(
        &new_primary.data_dir(),
        &[
            OsStr::new("--token-file"),
            token.as_os_str(),
            OsStr::new("--metrics-listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    let metrics = server.metrics_addr();

    // Nothing served yet: every counter at 0, and the families typed as they should be.
    let before = scrape(metrics);
    assert_eq!(
        before.get(
            "failbackd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let started = before.get("failbackd_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now && started > now - 600.0,
        "{started} vs {now}"
    );
    for (name, kind) in [
        ("failbackd_read_bytes_total", "counter"),
        ("failbackd_sent_bytes_total", "counter"),
        ("failbackd_chunks_total", "counter"),
        ("failbackd_requests_total", "counter"),
        ("failbackd_refusals_total", "counter"),
        ("failbackd_connections_accepted_total", "counter"),
        ("failbackd_requests_in_flight", "gauge"),
        ("failbackd_connections", "gauge"),
        ("failbackd_wal_summarized_segments", "gauge"),
    ] {
        assert_eq!(
            before.types.get(name).map(String::as_str),
            Some(kind),
            "{name}"
        );
    }
    for t in ["grpc", "quic"] {
        assert_eq!(
            before.get("failbackd_read_bytes_total", &[("transport", t)]),
            0.0
        );
        assert_eq!(
            before.get("failbackd_chunks_total", &[("transport", t)]),
            0.0
        );
        assert_eq!(
            before.sum("failbackd_requests_total", &[("transport", t)]),
            0.0
        );
    }
    assert_eq!(before.sum("failbackd_refusals_total", &[]), 0.0);

    // A scraper sending garbage, or far too much, is refused and hurts nothing.
    let (status, _, _) = http(metrics, b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n");
    assert_eq!(status, 400);
    let (status, _, _) = http(metrics, b"GET /metrics\r\n\r\n");
    assert_eq!(status, 400);
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 1 << 20));
    let (status, _, _) = http(metrics, &huge);
    assert!(
        status == 431 || status == 0,
        "huge request answered {status}"
    );
    assert_eq!(get(metrics, "/nowhere").0, 404);
    assert_eq!(http(metrics, b"DELETE /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(get(metrics, "/ready").0, 200);
    assert_eq!(get(metrics, "/health").0, 200);

    // Clients with the wrong token, on both transports.
    for via in [Via::Grpc, Via::Quic] {
        refused(connect_with(&server, via, "wrong-token"), "Unauthenticated");
    }

    let report = cli_rewind(
        &primary,
        &new_primary,
        &server.source_args(Via::Grpc)[1].to_string_lossy(),
        "metrics-token",
        &["--ca".into(), server.source_args(Via::Grpc)[3].clone()],
    );
    let fetched = report["execution"]["bytes_fetched"]
        .as_u64()
        .unwrap_or_else(|| panic!("no bytes_fetched in the report: {report}"));
    assert!(fetched > 0, "{report}");

    let after = scrape(metrics);
    let grpc = [("transport", "grpc")];
    let read = after.get("failbackd_read_bytes_total", &grpc);
    let sent = after.get("failbackd_sent_bytes_total", &grpc);
    // Every byte the client fetched was read and sent by failbackd (`--compress none`: as
    // many on the wire).
    assert!(
        read >= fetched as f64,
        "read {read} < fetched {fetched}: {report}"
    );
    assert!(
        sent >= fetched as f64,
        "sent {sent} < fetched {fetched}: {report}"
    );
    let chunks = after.get("failbackd_chunks_total", &grpc);
    assert!(
        chunks >= 1.0 && chunks * (1 << 20) as f64 >= read,
        "{chunks} chunks"
    );
    for kind in KINDS_OF_A_REWIND {
        let ok = [("transport", "grpc"), ("kind", kind), ("status", "ok")];
        assert!(
            after.get("failbackd_requests_total", &ok) >= 1.0,
            "no {kind} counted: {:#?}",
            after.samples
        );
    }
    // The rewind did not go over QUIC: its requests were counted where they came.
    assert_eq!(
        after.sum(
            "failbackd_requests_total",
            &[("transport", "quic"), ("status", "ok")]
        ),
        0.0
    );
    // The refused clients: one refusal each, and an unauthenticated request each, whose call
    // was never read.
    for t in ["grpc", "quic"] {
        let refused = [
            ("transport", t),
            ("kind", "unknown"),
            ("status", "unauthenticated"),
        ];
        assert!(
            after.get("failbackd_requests_total", &refused) >= 1.0,
            "{t}: {:#?}",
            after.samples
        );
    }
    assert!(after.get("failbackd_refusals_total", &[("reason", "token")]) >= 2.0);
    assert_eq!(
        after.get("failbackd_refusals_total", &[("reason", "path")]),
        0.0
    );
    // Connections: the rewind's and the refused clients', counted on both transports; none
    // left open by a finished rewind's requests.
    assert!(after.get("failbackd_connections_accepted_total", &grpc) >= 2.0);
    assert!(
        after.get(
            "failbackd_connections_accepted_total",
            &[("transport", "quic")]
        ) >= 1.0
    );
    assert_eq!(after.sum("failbackd_requests_in_flight", &[]), 0.0);
    assert_eq!(after.get("failbackd_start_time_seconds", &[]), started);
    // The server served on after the hostile scrapers, and still says it is ready.
    assert_eq!(
        get(metrics, "/ready"),
        (200, get(metrics, "/ready").1, "ready\n".into())
    );
}

/// `--metrics-listen` on the very address of `--listen` is refused at start-up.
#[test]
fn metrics_on_the_data_port_are_refused() {
    let out = std::process::Command::new(failback_tests::programs::failbackd())
        .args([
            "--pgdata",
            "/nonexistent",
            "--listen",
            "127.0.0.1:7999",
            "--metrics-listen",
            "127.0.0.1:7999",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--metrics-listen 127.0.0.1:7999 is the address of --listen"),
        "{err}"
    );
}
