//! failbackd and failback over gRPC: a real failover rewound through the wire, and the
//! server's refusals (tokens, paths out of the data directory, oversized requests).

mod support;

use std::process::Command;

use failback_client::progress::Terminal;
use failback_client::rewind::{RewindOptions, rewind};
use failback_client::source::grpc::GrpcSource;
use failback_client::source::remote::RemoteOptions;
use failback_client::source::{Source, SourceError};
use failback_tests::{Cluster, ClusterOptions, PgMajor, StopMode, pg_test};
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

/// The `failback` binary with `--source grpc://`, `--token-file`, `--jobs`, `--compress none`,
/// `--max-rate`, `--mode delta` and `--report`.
#[test]
fn cli_rewinds_through_failbackd() {
    let (primary, new_primary) = diverged(PgMajor::V15);
    let server = Failbackd::start(&new_primary.data_dir(), Some("cli-token"));
    let report = cli_rewind(
        &primary,
        &new_primary,
        &server.url(),
        "cli-token",
        &["--mode".into(), "delta".into()],
    );
    for side in ["target_changes", "source_changes"] {
        assert_eq!(report[side]["found_by"], "hashes", "{report}");
        assert_eq!(report[side]["why"], "--mode delta", "{report}");
    }
    let ex = &report["execution"];
    let n = |key: &str| {
        ex[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in the report: {report}"))
    };
    // Every byte fetched was written, found already there, or zeros allocated as such, and
    // no more was fetched than planned.
    assert!(n("bytes_fetched") > 0, "{report}");
    assert_eq!(
        n("bytes_written") + n("bytes_identical") + n("bytes_zeroed"),
        n("bytes_fetched"),
        "{report}"
    );
    assert!(
        n("bytes_fetched") <= report["bytes_to_fetch"].as_u64().unwrap(),
        "{report}"
    );
    // The relation files both sides hold cross as hashes: failbackd hashed them and most of
    // their bytes were not fetched.
    assert!(n("files_hashed") > 0, "{report}");
    assert!(n("bytes_skipped_by_hashes") > 0, "{report}");
    drop(server);
    rejoin_and_compare(primary, new_primary);
}

/// The source's changed blocks are fetched while the target's WAL is read (its end held back
/// 1.5 s here, as a slow disk would): from a running new primary under load, they had arrived
/// when the copy began, the copy took them up with the rest of the plan, and the rewound node
/// matches the new primary.
#[test]
fn source_changes_are_fetched_while_the_target_is_scanned() {
    // SAFETY: nextest runs each test in a process of its own, and no other thread of it has
    // started yet.
    unsafe { std::env::set_var("FAILBACK_FAULT", "slow-scan=1500") };
    let (primary, mut new_primary) = diverged(PgMajor::V15);
    new_primary.start();
    let opts = opts_for(&primary, &new_primary);
    let report = failback_tests::rewind::under_load(&new_primary, || {
        let server = Failbackd::start_live(&new_primary);
        let mut source = connect(server.url(), None).unwrap();
        rewind(&opts, &mut source, &mut Terminal::new(false, false))
            .unwrap()
            .report
    });
    assert_eq!(report.source_changes.found_by, "wal", "{report:?}");
    assert!(report.source_changes.changed_blocks > 0, "{report:?}");
    let ex = report.execution.as_ref().expect("a copy");
    assert!(report.seconds.wal_scan >= 1.5, "{report:?}");
    assert!(
        ex.bytes_fetched_ahead > 0,
        "nothing arrived during the scan: {report:?}"
    );
    assert!(ex.bytes_fetched_ahead <= ex.bytes_fetched, "{report:?}");
    rejoin_and_compare(primary, new_primary);
}

/// `pg_backup_start` switches to a new WAL segment, so the segment a short backup window
/// wrote is 16 MiB of zeros but for its first pages: only those pages are fetched, the rest
/// of the rewound target's segment is allocated as zeros (the file's blocks cover it, as
/// PostgreSQL's zero-filled segments are), and the node still replays the segment and
/// rejoins.
#[test]
fn the_zeros_of_the_windows_segment_are_allocated_not_written() {
    use std::os::unix::fs::MetadataExt;
    let (primary, mut new_primary) = diverged(PgMajor::V15);
    new_primary.start();
    let opts = opts_for(&primary, &new_primary);
    let server = Failbackd::start_live(&new_primary);
    let mut source = connect(server.url(), None).unwrap();
    let report = rewind(&opts, &mut source, &mut Terminal::new(false, false))
        .unwrap()
        .report;
    drop(source);
    drop(server);
    let ex = report.execution.as_ref().expect("a copy");
    // Only the window's WAL crosses, to the end of the page it ends in (read, as a live
    // source's whole copies are, a mebibyte at least): not the segment's 16 MiB.
    assert!(
        ex.window_wal_bytes > 0 && ex.window_wal_bytes <= 1 << 20,
        "{report:?}"
    );
    assert_eq!(
        ex.bytes_written + ex.bytes_identical + ex.bytes_zeroed,
        ex.bytes_fetched,
        "{report:?}"
    );
    let start: failback_common::Lsn = report.window_start.unwrap().parse().unwrap();
    let seg_size = 16 << 20;
    let segment = primary
        .data_dir()
        .join("pg_wal")
        .join(failback_common::lsn::wal_file_name(
            2,
            start.segment_number(seg_size),
            seg_size,
        ));
    let meta = std::fs::metadata(&segment).unwrap();
    assert_eq!(meta.len(), u64::from(seg_size), "{}", segment.display());
    assert!(
        meta.blocks() * 512 >= u64::from(seg_size),
        "{} blocks",
        meta.blocks()
    );
    rejoin_and_compare(primary, new_primary);
}

#[test]
fn cli_refuses_two_sources_or_none() {
    let run = |args: &[&str]| {
        Command::new(failback_tests::programs::failback())
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
    // A source that does not answer may come back: the target was not touched.
    assert_eq!(
        down.status.code(),
        Some(failback_tests::rewind::EXIT_SOURCE_UNAVAILABLE),
        "{err}"
    );
    let nowhere = run(&["rewind", "-D", "/x", "--source", "grpc://no-port"]);
    assert_eq!(nowhere.status.code(), Some(2), "{nowhere:?}");
    assert!(
        String::from_utf8_lossy(&nowhere.stderr).contains("must name a host and a port"),
        "{nowhere:?}"
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
    assert!(String::from_utf8_lossy(&bad.stderr).contains("neither auto, a zstd level"));
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
            .map(|_| pb::Range {
                path: "b".into(),
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
        compression_level: -200_000,
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
    let plain = Failbackd::start(&cluster.data_dir(), None);
    let t = raw_timelines(&plain);
    assert_eq!(t.current_timeline, 1);
    assert!(t.histories.is_empty());
}

/// The promoted standby is on timeline 2, with `00000002.history` served verbatim.
fn timelines_are_served(new_primary: &Cluster) {
    let server = Failbackd::start(&new_primary.data_dir(), None);
    let t = raw_timelines(&server);
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

// ---- a live source: failbackd with --pg-conn beside a running new primary ----

fn opts_for(target: &Cluster, new_primary: &Cluster) -> RewindOptions {
    RewindOptions {
        target: target.data_dir(),
        write_recovery_conf: true,
        primary_conninfo: Some(conninfo(new_primary)),
        pg_bindir: Some(target.bins().postgres().parent().unwrap().to_path_buf()),
        ..Default::default()
    }
}

/// The raw gRPC client, for what the `Source` trait does not show (in_recovery, refusals).
fn raw_client(
    server: &Failbackd,
) -> failback_proto::v1::failback_client::FailbackClient<tonic::transport::Channel> {
    server
        .rt
        .block_on(
            failback_proto::v1::failback_client::FailbackClient::connect(format!(
                "http://{}",
                server.addr()
            )),
        )
        .unwrap()
}

fn raw_end_of_wal(
    server: &Failbackd,
) -> Result<failback_proto::v1::EndOfWalResponse, tonic::Status> {
    let mut c = raw_client(server);
    server
        .rt
        .block_on(c.end_of_wal(failback_proto::v1::EndOfWalRequest {}))
        .map(|r| r.into_inner())
}

fn raw_timelines(server: &Failbackd) -> failback_proto::v1::TimelinesResponse {
    let mut c = raw_client(server);
    server
        .rt
        .block_on(c.timelines(failback_proto::v1::TimelinesRequest {}))
        .unwrap()
        .into_inner()
}

fn raw_timeline(server: &Failbackd) -> u32 {
    raw_timelines(server).current_timeline
}

fn capabilities(server: &Failbackd) -> Vec<String> {
    let mut c = raw_client(server);
    server
        .rt
        .block_on(c.handshake(failback_proto::v1::HandshakeRequest {
            protocol_version: failback_proto::PROTOCOL_VERSION,
            client_version: "test".into(),
        }))
        .unwrap()
        .into_inner()
        .capabilities
}

// The new primary was promoted moments ago (its checkpoint still pending, so pg_control names
// the old timeline) and runs under pgbench load during the whole rewind; failbackd without
// --pg-conn refuses it first (the target untouched), then with --pg-conn the rewind succeeds
// and the old primary rejoins with the same data once the load stops.
pg_test!(rewinds_a_live_source_under_load, |major| {
    // A slow, spread checkpoint after the promotion keeps pg_control on the old timeline.
    let options = ClusterOptions::default()
        .setting("checkpoint_timeout", "1h")
        .setting("checkpoint_completion_target", "0.9");
    let mut primary = Cluster::start_new_with(major, "old-primary", options);
    let mut new_primary = primary.create_standby("new-primary");
    // Loaded after the standby exists, so its replay leaves many buffers to checkpoint.
    primary.pgbench_init(2);
    new_primary.wait_for_catchup(&primary);
    assert_eq!(new_primary.query_one("SELECT pg_promote(true, 120)"), "t");
    primary.execute(
        "UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid % 30 = 0;
         CREATE TABLE only_old AS SELECT generate_series(1, 1000) AS x",
    );
    primary.stop(StopMode::Fast);
    // -R without --primary-conninfo: failbackd says where its server listens.
    let opts = RewindOptions {
        primary_conninfo: None,
        ..opts_for(&primary, &new_primary)
    };

    // Without --pg-conn the end of WAL is unknown: refused before anything changes.
    let before = failback_tests::rewind::TreeDigest::of(&primary.data_dir());
    {
        let server = Failbackd::start(&new_primary.data_dir(), None);
        let caps = capabilities(&server);
        assert!(caps.iter().any(|c| c == "running"), "{caps:?}");
        assert!(!caps.iter().any(|c| c == "live"), "{caps:?}");
        let mut source = connect(server.url(), None).unwrap();
        assert!(source.is_live());
        let e = rewind(&opts, &mut source, &mut Terminal::new(false, false)).unwrap_err();
        // What failback says, and failbackd's reason below it.
        let why = std::error::Error::source(&e).map(|s| s.to_string());
        assert!(e.to_string().contains("--pg-conn"), "{e}");
        assert!(
            why.as_deref().is_some_and(|w| w.contains("postmaster.pid")),
            "{e}: {why:?}"
        );
    }
    before.assert_unchanged(
        &failback_tests::rewind::TreeDigest::of(&primary.data_dir()),
        "a running source served without --pg-conn",
    );

    // pg_rewind 13-15 would say "no rewind required" here, going by pg_control alone.
    assert_eq!(
        failback_tests::rewind::control_file(&new_primary)
            .checkPointCopy
            .ThisTimeLineID,
        1,
        "the promotion's checkpoint already finished: the test needs it pending"
    );
    let report = failback_tests::rewind::under_load(&new_primary, || {
        let server = Failbackd::start_live(&new_primary);
        assert!(capabilities(&server).iter().any(|c| c == "live"));
        let mut source = connect(server.url(), None).unwrap();
        rewind(&opts, &mut source, &mut Terminal::new(false, false))
            .unwrap()
            .report
    });
    assert!(report.rewind_needed);
    assert_eq!(report.source_timeline, 2);
    // minRecoveryPoint is the source's end of WAL after the copy: past everything the load
    // had written when the rewind started.
    let mrp: failback_common::Lsn = report.min_recovery_point.unwrap().parse().unwrap();
    let control = failback_tests::rewind::control_file(&primary);
    assert_eq!(control.minRecoveryPoint, mrp);
    assert_eq!(control.minRecoveryPointTLI, 2);
    assert!(mrp > control.checkPoint, "{mrp} vs {}", control.checkPoint);
    let auto = std::fs::read_to_string(primary.data_dir().join("postgresql.auto.conf")).unwrap();
    let want = format!(
        "primary_conninfo = 'host=127.0.0.1 port={} user=postgres'",
        new_primary.port()
    );
    assert!(auto.contains(&want), "{want} not in:\n{auto}");
    // Started with only what -R wrote, it streams from the new primary.
    failback_tests::rewind::start_rejoined(&mut primary, &mut new_primary);
});

// EndOfWal on a primary and on a standby; failbackd without --pg-conn on a running server;
// the current timeline right after a promotion whose checkpoint has not finished.
pg_test!(end_of_wal_and_the_timeline_after_promotion, |major| {
    // A slow, spread checkpoint after the promotion keeps pg_control on the old timeline.
    let options = ClusterOptions::default()
        .setting("checkpoint_timeout", "1h")
        .setting("checkpoint_completion_target", "0.9");
    let mut primary = Cluster::start_new_with(major, "primary", options);
    primary.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS x");
    let standby = primary.create_standby("standby");
    standby.wait_for_catchup(&primary);

    let on_primary = Failbackd::start_live(&primary);
    let before = primary.current_lsn();
    let end = raw_end_of_wal(&on_primary).unwrap();
    assert!(!end.in_recovery);
    assert_eq!(end.timeline, 1);
    assert!(end.lsn >= before.0, "{} < {before}", end.lsn);
    let mut src = connect(on_primary.url(), None).unwrap();
    assert!(src.is_live());
    let e = src.end_of_wal().unwrap().unwrap();
    assert!(e.lsn >= failback_common::Lsn(end.lsn) && e.tli == 1);
    drop(src);
    drop(on_primary);

    // Dirty many buffers on the standby, so its post-promotion checkpoint takes long.
    primary.execute(
        "CREATE TABLE filler AS SELECT g, repeat('y', 200) AS y FROM generate_series(1, 100000) g",
    );
    standby.wait_for_catchup(&primary);
    let replayed = standby.current_lsn();
    let live = Failbackd::start_live(&standby);
    let files = Failbackd::start(&standby.data_dir(), None);
    let end = raw_end_of_wal(&live).unwrap();
    assert!(end.in_recovery);
    assert_eq!(end.timeline, 1);
    assert!(end.lsn >= replayed.0, "{} < {replayed}", end.lsn);
    let refused = raw_end_of_wal(&files).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("postmaster.pid") && refused.message().contains("--pg-conn"),
        "{}",
        refused.message()
    );
    assert_eq!(raw_timeline(&live), 1);
    assert_eq!(raw_timeline(&files), 1);

    assert_eq!(standby.query_one("SELECT pg_promote(true, 120)"), "t");
    let (with_conn, without_conn) = (raw_timeline(&live), raw_timeline(&files));
    let end = raw_end_of_wal(&live).unwrap();
    let control = failback_tests::rewind::control_file(&standby);
    assert_eq!(
        control.checkPointCopy.ThisTimeLineID, 1,
        "the promotion's checkpoint already finished: nothing left to prove"
    );
    assert_eq!(with_conn, 2, "Timelines with --pg-conn");
    assert_eq!(without_conn, 2, "Timelines from the newest history file");
    assert!(!end.in_recovery);
    assert_eq!(end.timeline, 2);
    drop(live);
    drop(files);
    // --pg-conn to a server that is shut down: served as a shut-down directory.
    primary.stop(StopMode::Fast);
    let stopped = Failbackd::start_live(&primary);
    let caps = capabilities(&stopped);
    assert!(
        !caps.iter().any(|c| c == "live" || c == "running"),
        "{caps:?}"
    );
    assert_eq!(raw_timeline(&stopped), 1);
    assert_eq!(
        raw_end_of_wal(&stopped).unwrap_err().code(),
        tonic::Code::Unavailable
    );
    assert!(!connect(stopped.url(), None).unwrap().is_live());
});

// Relation files compared whole (--mode delta) fetch only the pages that differ; and
// --max-rate holds the copy to its rate.
pg_test!(skips_identical_chunks_and_honours_max_rate, |major| {
    use failback_client::source::rate::RateLimited;
    use failback_common::ratelimit::TokenBucket;
    // No autovacuum: its hint bits and freezing after the fork would make the two sides' copies
    // of the untouched relation differ.
    let options = ClusterOptions::default()
        .setting("wal_keep_size", "1GB")
        .setting("checkpoint_timeout", "1h")
        .setting("autovacuum", "off");
    let mut primary = Cluster::start_new_with(major, "old-primary", options);
    primary.pgbench_init(1);
    let mut new_primary = primary.create_standby("new-primary");
    new_primary.wait_for_catchup(&primary);
    // A relation both sides hold alike.
    primary.execute(
        "CREATE TABLE filler AS SELECT g, repeat('z', 300) AS z FROM generate_series(1, 100000) g",
    );
    // And one whose every eighth page the old primary changes after the fork: one page in
    // each 64 KiB, so that only comparing page by page spares the other seven. Frozen first,
    // so that reading it after the fork sets no hint bits on the pages left alone; filled by
    // the first command of its transaction, as a standby's replay writes every tuple's
    // command id as the first (a later command's id would make each page differ).
    primary.execute("CREATE TABLE sparse (id int PRIMARY KEY, z text) WITH (fillfactor = 90)");
    primary
        .execute("INSERT INTO sparse SELECT g, repeat('z', 300) FROM generate_series(1, 160000) g");
    primary.execute("VACUUM (FREEZE) sparse");
    let sparse: u64 = primary
        .query_one("SELECT pg_relation_size('sparse')")
        .parse()
        .unwrap();
    new_primary.wait_for_catchup(&primary);
    failback_tests::rewind::promote(&primary, &new_primary);
    primary.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 10 = 0");
    primary.execute(&format!(
        "UPDATE sparse SET z = repeat('y', 300) WHERE ctid = ANY (ARRAY(
             SELECT format('(%s,1)', p)::tid FROM generate_series(3, {}, 8) p))",
        sparse / 8192 - 1
    ));
    failback_tests::rewind::stop_for_rewind(&mut primary, &mut new_primary, StopMode::Fast);

    let server = Failbackd::start(&new_primary.data_dir(), None);
    let rate = 16 << 20;
    let mut source = RateLimited::new(connect(server.url(), None).unwrap(), rate).unwrap();
    let mut opts = opts_for(&primary, &new_primary);
    opts.write_recovery_conf = false;
    opts.mode = failback_client::rewind::Mode::Delta;
    let report = rewind(&opts, &mut source, &mut Terminal::new(false, false))
        .unwrap()
        .report;
    let ex = report.execution.clone().unwrap();
    assert!(ex.files_hashed > 0, "{ex:?}");
    // At least a good part of it: hint bits set by whatever read it after the fork make pages
    // differ legitimately (on 15 about half of it was fetched).
    assert!(
        ex.bytes_skipped_by_hashes >= 8 << 20,
        "the identical relation was not skipped: {ex:?}"
    );
    // Seven pages in eight of `sparse` (a tenth spared for the pages its free space map and
    // visibility map make differ): more than the catalogs and `filler` together could make up
    // if it were compared in 64 KiB chunks, of which none is alike.
    assert!(
        ex.bytes_skipped_by_hashes >= sparse * 7 / 8 * 9 / 10 + (8 << 20),
        "`sparse` ({sparse} bytes, one page in eight changed) was not compared page by page: \
         {ex:?}"
    );
    assert_eq!(
        ex.bytes_fetched + ex.bytes_skipped_by_hashes,
        report.bytes_to_fetch,
        "{ex:?}"
    );
    // A lower bound only: never faster than the rate allows, whatever the machine.
    let burst = TokenBucket::default_burst(rate);
    assert!(
        ex.bytes_fetched > 4 * burst,
        "too little fetched to see the limit: {ex:?}"
    );
    let floor = (ex.bytes_fetched - burst) as f64 / rate as f64;
    assert!(
        report.seconds.copy >= floor,
        "{} bytes in {:.3} s at --max-rate {rate} (at least {floor:.3} s)",
        ex.bytes_fetched,
        report.seconds.copy
    );
    drop(source);
    drop(server);
    failback_tests::rewind::rejoin(&mut primary, &mut new_primary);
});

// A running standby of the new primary as the source, while the new primary is under load:
// the standby's end of WAL is its replay position, which becomes the target's minRecoveryPoint.
pg_test!(rewinds_from_a_live_standby, |major| {
    let mut primary = Cluster::start_new(major, "old-primary");
    primary.pgbench_init(1);
    let mut new_primary = primary.create_standby("new-primary");
    failback_tests::rewind::promote(&primary, &new_primary);
    let standby = new_primary.create_standby("standby-of-new");
    standby.wait_for_catchup(&new_primary);
    primary.execute(
        "UPDATE pgbench_accounts SET abalance = abalance - 3 WHERE aid % 20 = 0;
         CREATE TABLE only_old AS SELECT generate_series(1, 500) AS x",
    );
    primary.stop(StopMode::Fast);
    let opts = opts_for(&primary, &new_primary);
    let (report, replayed_before) = failback_tests::rewind::under_load(&new_primary, || {
        let replayed_before = standby.current_lsn();
        let server = Failbackd::start_live(&standby);
        let end = raw_end_of_wal(&server).unwrap();
        assert!(end.in_recovery);
        let mut source = connect(server.url(), None).unwrap();
        let r = rewind(&opts, &mut source, &mut Terminal::new(false, false));
        (r.unwrap().report, replayed_before)
    });
    assert!(report.rewind_needed);
    assert_eq!(report.source_timeline, 2);
    let mrp: failback_common::Lsn = report.min_recovery_point.unwrap().parse().unwrap();
    // At or past where the standby was before failbackd started (a quick rewind may end its
    // window before the load's next commit reaches the standby).
    assert!(mrp >= replayed_before, "{mrp} < {replayed_before}");
    let control = failback_tests::rewind::control_file(&primary);
    assert_eq!(
        (control.minRecoveryPoint, control.minRecoveryPointTLI),
        (mrp, 2)
    );
    drop(standby);
    failback_tests::rewind::start_rejoined(&mut primary, &mut new_primary);
});

/// ChunkHashes over the wire: the hashes of real files, the limits, and the confinement.
#[test]
fn chunk_hashes_are_served_within_limits() {
    use failback_proto::v1 as pb;
    let cluster = Cluster::init(PgMajor::V15, "hashed", ClusterOptions::default());
    let data = cluster.data_dir();
    let server = Failbackd::start(&data, None);
    let wal = failback_tests::rewind::wal_segments(&data)
        .into_iter()
        .next()
        .expect("a WAL segment");
    let wal = format!("pg_wal/{wal}");
    let bytes = std::fs::read(data.join(&wal)).unwrap();
    let mut src = connect(server.url(), None).unwrap();
    let got = src
        .chunk_hashes(&[wal.clone(), "base/1/999999".into()], 1 << 16)
        .unwrap()
        .expect("failbackd hashes");
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].path.as_str(), got[0].size),
        (wal.as_str(), bytes.len() as u64)
    );
    let want: Vec<[u8; 32]> = bytes
        .chunks(1 << 16)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    assert_eq!(got[0].hashes, want);
    assert!(got[1].vanished && got[1].hashes.is_empty());

    // The second round of a comparison: pages within byte ranges only, each range's chunks
    // cut at its end and at the file's.
    use failback_common::chunkdiff::ByteRange;
    let r = |offset, length| ByteRange { offset, length };
    let len = bytes.len() as u64;
    let ranges = vec![r(0, 8192), r(100_000, 70_000), r(len - 5000, 20_000)];
    assert!(src.hashes_ranges());
    let got = src
        .range_hashes(&[(wal.clone(), ranges.clone())], 8192)
        .unwrap()
        .expect("failbackd hashes ranges");
    let mut want = Vec::new();
    for x in &ranges {
        let end = (x.offset + x.length).min(len) as usize;
        want.extend(
            bytes[x.offset as usize..end]
                .chunks(8192)
                .map(|c| *blake3::hash(c).as_bytes()),
        );
    }
    assert_eq!((got[0].size, got[0].hashes.len()), (len, 1 + 9 + 1));
    assert_eq!(got[0].hashes, want);

    let mut raw = raw_client(&server);
    let ask = |paths: Vec<String>, chunk_size| pb::ChunkHashesRequest {
        paths,
        chunk_size,
        ranges: vec![],
    };
    let within = |extents: &[(u64, u64)]| pb::ChunkHashesRequest {
        paths: vec![wal.clone()],
        chunk_size: 8192,
        ranges: vec![pb::HashRanges {
            extents: extents
                .iter()
                .map(|&(offset, length)| pb::ByteExtent { offset, length })
                .collect(),
        }],
    };
    let code = |raw: &mut pb::failback_client::FailbackClient<_>, req| {
        server
            .rt
            .block_on(raw.chunk_hashes(req))
            .map(|_| ())
            .unwrap_err()
            .code()
    };
    for cs in [0, 4095, (16 << 20) + 1] {
        assert_eq!(
            code(&mut raw, ask(vec![wal.clone()], cs)),
            tonic::Code::InvalidArgument
        );
    }
    assert_eq!(
        code(&mut raw, ask(vec!["x".into(); 4097], 1 << 16)),
        tonic::Code::InvalidArgument
    );
    for bad in ["../etc/passwd", "/etc/passwd", "base/../../x"] {
        assert_eq!(
            code(&mut raw, ask(vec![bad.into()], 1 << 16)),
            tonic::Code::PermissionDenied
        );
    }
    // Ranges: one list per path; none empty, past the largest offset, out of order or
    // overlapping (each byte read at most once); at most 65,536.
    let mut two_lists = within(&[(0, 8192)]);
    two_lists.ranges.push(two_lists.ranges[0].clone());
    let many: Vec<(u64, u64)> = (0..65_537).map(|i| (i * 8192, 8192)).collect();
    for req in [
        two_lists,
        within(&[(0, 0)]),
        within(&[(u64::MAX - 10, 11)]),
        within(&[(8192, 8192), (0, 8192)]),
        within(&[(0, 16_384), (8192, 8192)]),
        within(&many),
    ] {
        assert_eq!(code(&mut raw, req), tonic::Code::InvalidArgument);
    }
    // A symlink planted under a served name is refused when the file is opened: the answer
    // ends with the refusal, after what was hashed before it.
    std::os::unix::fs::symlink("/etc/passwd", data.join("base/1/424242")).unwrap();
    let req = ask(vec![wal.clone(), "base/1/424242".into()], 1 << 16);
    let answered = server.rt.block_on(async {
        let mut replies = raw.chunk_hashes(req).await?.into_inner();
        let mut paths = Vec::new();
        loop {
            match replies.message().await {
                Ok(Some(h)) => paths.push(h.path),
                Ok(None) => return Ok((paths, None)),
                Err(s) => return Ok((paths, Some(s.code()))),
            }
        }
    });
    let answered: Result<_, tonic::Status> = answered;
    assert_eq!(
        answered.unwrap(),
        (vec![wal.clone()], Some(tonic::Code::PermissionDenied))
    );
    assert!(
        src.chunk_hashes(&[wal.clone(), "base/1/424242".into()], 1 << 16)
            .is_err(),
        "the client's source fails rather than comparing with a file outside"
    );
}
