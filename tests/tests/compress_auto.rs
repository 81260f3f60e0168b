//! `--compress auto` through a link that changes under the copy: failback chooses compression
//! by two probes sent alone, watches what the copy delivers afterwards, and when the link
//! widens (or narrows) for good it probes again, and measures the link as it is now; a large
//! fetch begun ahead of its plan probes before the plan comes, when its probes fit what can
//! wait for it, and a close choice to compress made before the plan came (while the target's
//! WAL scan shared the CPUs) is measured again once it comes. A real failbackd serves a real cluster's relation, through a loopback proxy
//! whose rate the test changes mid-fetch.

mod support;

use std::time::Duration;

use failback_client::source::remote::{self, RemoteOptions};
use failback_client::source::{FetchRange, Fetched, Source};
use failback_common::compress_choice::{CompressPolicy, Measuring};
use failback_tests::proxy::TcpCut;
use failback_tests::{Cluster, PgMajor, StopMode};

const MIB: u64 = 1 << 20;

/// The rates in MB/s each round's probes measured, stored then compressed, from the source's
/// compression summary ("… (probes: stored 4 MB/s, compressed 7 MB/s of raw bytes) …").
fn probe_rates(summary: &str) -> Vec<(f64, f64)> {
    summary
        .split("(probes: stored ")
        .skip(1)
        .map(|r| {
            let num = |s: &str| s.split(' ').next().and_then(|n| n.parse::<f64>().ok());
            let stored = num(r).unwrap_or(0.0);
            let zstd = r
                .split_once("compressed ")
                .and_then(|(_, z)| num(z))
                .unwrap_or(0.0);
            (stored, zstd)
        })
        .collect()
}

/// A stopped PostgreSQL 15 cluster with one relation of pages that compress about two to one
/// (md5 text, never the same twice, as real tables' pages do): the cluster, the relation's
/// path and size.
fn md5_relation() -> (Cluster, String, u64) {
    relation("md5(g::text) || md5((-g)::text) AS pad")
}

/// A stopped PostgreSQL 15 cluster with one relation of 300,000 rows of `columns` besides
/// their number `g`: the cluster, the relation's path and size.
fn relation(columns: &str) -> (Cluster, String, u64) {
    let mut c = Cluster::start_new(PgMajor::V15, "source");
    c.execute(&format!(
        "CREATE TABLE t WITH (autovacuum_enabled = off) AS
           SELECT g, {columns} FROM generate_series(1, 300000) g"
    ));
    let rel = c.query_one("SELECT pg_relation_filepath('t')");
    let size: u64 = c.query_one("SELECT pg_relation_size('t')").parse().unwrap();
    c.stop(StopMode::Fast);
    (c, rel, size)
}

/// The relation's pages one by one, as a rewind asks for changed blocks, `times` times over.
fn every_page(rel: &str, size: u64, times: u64) -> Vec<FetchRange> {
    (0..times)
        .flat_map(|_| {
            (0..size / 8192).map(|b| FetchRange {
                path: rel.to_string(),
                offset: b * 8192,
                length: 8192,
            })
        })
        .collect()
}

// PostgreSQL 15 only: what is tested is the client's measuring, not a version's format.
#[test]
fn a_link_that_widens_mid_copy_is_measured_again() {
    let (c, rel, size) = md5_relation();
    let server = support::Failbackd::start(&c.data_dir(), None);
    let proxy = TcpCut::start(server.addr());
    // A thin link: 4 MiB/s.
    proxy.set_rate(Some(4 * MIB));
    let measuring = Measuring {
        min_fetch: 4 * MIB,
        window: Duration::from_millis(100),
        drift: 2,
        sustain: 3,
        min_interval: Duration::from_secs(1),
        ..Measuring::DEFAULT
    };
    let mut src = remote::connect(RemoteOptions {
        jobs: 4,
        compression: CompressPolicy::Auto {
            level: 1,
            measuring,
        },
        ..support::options(format!("grpc://127.0.0.1:{}", proxy.port()), None)
    })
    .expect("connect through the proxy");

    let ranges = every_page(&rel, size, 16);
    let want = ranges.len() as u64 * 8192;
    let mut got = 0u64;
    let mut widened = false;
    {
        let mut fetch = src.fetch(ranges).expect("fetch");
        while let Some(piece) = fetch.next().expect("a piece") {
            if let Fetched::Data { data, .. } = piece {
                got += data.len() as u64;
            }
            // The first round's probes are a request each, 16 MiB: after 56 MiB the round
            // has chosen, and the copy has been watched for 24 MiB more, 3 s or more at the
            // thin link's rate (two to one, at most 8 MiB/s of raw bytes).
            if !widened && got >= 56 * MIB {
                proxy.set_rate(None);
                widened = true;
            }
        }
    }
    assert_eq!(got, want, "every page delivered");
    let summary = src.compression().expect("a remote source's compression");
    let rounds = probe_rates(&summary);
    assert!(
        rounds.len() >= 2,
        "the link widened from 4 MiB/s to loopback's and nothing was measured again: {summary}"
    );
    // Which kind each round chose depends on this machine's load as much as on the link
    // (a compressor starved of CPU loses even through 4 MiB/s, and then stored is right):
    // the unit tests hold the choice itself. Here: the last round measured the wider link.
    // Twice the thin link's rate: the cap holds stored bytes to 4 MiB/s, and with six tests on
    // two cores the uncapped loopback gave 2.5 times that (10 MB/s against 4) in a clean run.
    let (thin_stored, _) = rounds[0];
    let (wide_stored, _) = rounds[rounds.len() - 1];
    assert!(
        wide_stored >= 2.0 * thin_stored,
        "the last round did not measure the wider link: {summary}"
    );
    eprintln!("{summary}");
}

/// A fetch begun ahead of its plan (the source's changed blocks, while the target's WAL is
/// read) takes at most 64 MiB, but the plan will ask for all of them: when they are many,
/// `auto` probes at once, rather than compressing the first 64 MiB whatever the link.
#[test]
fn a_large_fetch_begun_ahead_probes_before_its_plan_comes() {
    let (c, rel, size) = md5_relation();
    // failbackd's own chunks (a mebibyte), not the tests' small ones: a probe fits the
    // channel of a fetch that nothing reads from yet as it does in a rewind.
    let mut config = support::Failbackd::config(&c.data_dir());
    config.max_chunk = failback_proto::limits::DEFAULT_MAX_CHUNK;
    let server = support::Failbackd::serve(config, false);
    let measuring = Measuring {
        min_fetch: 100 * MIB,
        ..Measuring::DEFAULT
    };
    let connect = || {
        remote::connect(RemoteOptions {
            jobs: 16,
            compression: CompressPolicy::Auto {
                level: 1,
                measuring,
            },
            ..support::options(format!("grpc://{}", server.addr()), None)
        })
        .expect("connect")
    };
    let probed_within = |src: &dyn Source, limit: Duration| {
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            let summary = src.compression().unwrap();
            if !probe_rates(&summary).is_empty() {
                return Some(summary);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    };
    // The whole relation, over and over (a run of changed blocks): more than the minimum in
    // all, of which the fetch ahead asks for 64 MiB.
    let whole = |times: u64| -> Vec<FetchRange> {
        (0..times)
            .map(|_| FetchRange {
                path: rel.clone(),
                offset: 0,
                length: size,
            })
            .collect()
    };
    let times = (100 * MIB).div_ceil(size) + 1;
    let mut src = connect();
    src.fetch_ahead(whole(times));
    let summary = probed_within(&*src, Duration::from_secs(30));
    assert!(
        summary.is_some(),
        "{} MiB of changed blocks fetched ahead, and no probe before the plan",
        times * size / MIB
    );
    // Fewer than the minimum in all: compressed, unprobed, until a plan asks for more.
    let mut src = connect();
    src.fetch_ahead(whole((50 * MIB).div_ceil(size)));
    assert_eq!(probed_within(&*src, Duration::from_secs(2)), None);
    // As many, page by page: a probe's 512 pieces would wait in the channel for a plan to
    // take them, and measure that wait; the probes wait for the plan too, and measure the
    // link once it comes.
    let mut src = connect();
    // Copies of the relation's file, so that what is left for the plan, past what was fetched
    // ahead, is more than the minimum too.
    let copies = (200 * MIB).div_ceil(size);
    let pages: Vec<FetchRange> = (0..copies)
        .flat_map(|k| {
            let copy = format!("{rel}{k}");
            std::fs::copy(c.data_dir().join(&rel), c.data_dir().join(&copy)).unwrap();
            every_page(&copy, size, 1)
        })
        .collect();
    src.fetch_ahead(pages.clone());
    assert_eq!(probed_within(&*src, Duration::from_secs(1)), None);
    {
        let mut fetch = src.fetch(pages).expect("fetch");
        while fetch.next().expect("a piece").is_some() {}
    }
    let summary = src.compression().unwrap();
    let rounds = probe_rates(&summary);
    assert!(
        rounds.first().is_some_and(|&(stored, _)| stored > 10.0),
        "4 MiB within the second the plan took to come is 4 MB/s: {summary}"
    );
}

/// Probes made while a fetch runs ahead of its plan share the CPUs with the target's WAL scan;
/// a choice to compress they made by a little is measured again once the plan comes (the scan
/// is over then). Pages compressing about 1.6 to one (32 random bytes and 32 hex digits a row)
/// through 4 MiB/s: compressed delivers some 1.6 times stored, between `auto`'s margin (1.25)
/// and what the test counts as close (2; failback's own 1.5 would need pages compressing
/// within a hair of 1.4 to one).
#[test]
fn a_close_choice_made_ahead_is_measured_again_when_the_plan_comes() {
    let (c, rel, size) =
        relation("decode(md5(g::text) || md5((-g)::text), 'hex') AS b, md5((g * 7)::text) AS t");
    let mut config = support::Failbackd::config(&c.data_dir());
    config.max_chunk = failback_proto::limits::DEFAULT_MAX_CHUNK;
    let server = support::Failbackd::serve(config, false);
    let measuring = Measuring {
        min_fetch: 16 * MIB,
        close: 2.0,
        ..Measuring::DEFAULT
    };
    // Copies of the relation's file: what runs ahead (64 MiB of them) and what the plan adds.
    let copies: Vec<String> = (0..(120 * MIB).div_ceil(size))
        .map(|k| {
            let copy = format!("{rel}{k}");
            std::fs::copy(c.data_dir().join(&rel), c.data_dir().join(&copy)).unwrap();
            copy
        })
        .collect();
    let whole = |files: &[String]| -> Vec<FetchRange> {
        files
            .iter()
            .map(|f| FetchRange {
                path: f.clone(),
                offset: 0,
                length: size,
            })
            .collect()
    };
    let ahead = whole(&copies[..copies.len() / 2]);
    let plan = whole(&copies);
    // The compressor may lose even through 4 MiB/s on a machine starved of CPU: a few tries
    // for a first round that chose to compress by a little.
    let mut first_rounds = Vec::new();
    for _ in 0..3 {
        let proxy = TcpCut::start(server.addr());
        proxy.set_rate(Some(4 * MIB));
        let mut src = remote::connect(RemoteOptions {
            jobs: 16,
            compression: CompressPolicy::Auto {
                level: 1,
                measuring,
            },
            ..support::options(format!("grpc://127.0.0.1:{}", proxy.port()), None)
        })
        .expect("connect through the proxy");
        src.fetch_ahead(ahead.clone());
        let t = std::time::Instant::now();
        let summary = loop {
            let summary = src.compression().unwrap();
            if !probe_rates(&summary).is_empty() || t.elapsed() > Duration::from_secs(60) {
                break summary;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rounds = probe_rates(&summary);
        let close = summary.starts_with("compression auto: Zstd(1)")
            && rounds
                .first()
                .is_some_and(|&(stored, zstd)| zstd < measuring.close * stored);
        // The scan is over and the link as wide as loopback: the plan comes.
        proxy.set_rate(None);
        {
            let mut fetch = src.fetch(plan.clone()).expect("fetch");
            while fetch.next().expect("a piece").is_some() {}
        }
        let summary = src.compression().unwrap();
        if !close {
            first_rounds.push(summary);
            continue;
        }
        assert!(
            summary.contains("then, the CPUs no longer shared, "),
            "a close choice made ahead of the plan, not measured again when it came: {summary}"
        );
        assert_eq!(probe_rates(&summary).len(), 2, "{summary}");
        eprintln!("{summary}");
        return;
    }
    panic!("no first round chose to compress by a little: {first_rounds:#?}");
}
