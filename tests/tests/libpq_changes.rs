//! What a running source changed, and its chunk hashes, asked over plain libpq (no failbackd):
//! on every major version 13–18.
//!
//! - The changed-block set from the source's WAL read with `pg_read_binary_file` equals what
//!   failbackd's reading of the same `pg_wal` finds ([`failback_datadir::wal::source_changes`]),
//!   as superuser and as a role holding only pg_rewind's four grants, and it reads no more WAL
//!   than the segments pg_rewind would copy.
//! - On 17 and 18 with `summarize_wal = on`, the server's WAL summaries stand in for decoding,
//!   and name at least what decoding names.
//! - Once the WAL since the divergence is recycled, the answer is "unknown", not an error.
//! - The server's SQL SHA-256 of each chunk equals SHA-256 of the same bytes read here, and a
//!   chunk changed on one side is the only range to fetch.

use std::time::{Duration, Instant};

use failback_client::source::libpq::changes::{ChangesReport, source_changes_with};
use failback_client::source::libpq::hashes::chunk_hashes;
use failback_client::source::{ChangesAnswer, SourceChanges};
use failback_common::Lsn;
use failback_common::chunkdiff::{ChunkHash, ChunkList, ranges_to_fetch};
use failback_common::control::ControlFileData;
use failback_common::timeline::TimeLineHistory;
use failback_datadir::DataDir;
use failback_sql::libpq::Conn;
use failback_tests::cluster::ClusterOptions;
use failback_tests::rewind::{promote, switch_point};
use failback_tests::{Cluster, PgMajor, StopMode, pg_test, pg_versions};

/// A promoted standby `new` whose old primary stopped, the new one having changed rows, made
/// a table and copied a database after the promotion; and where their histories part.
fn diverge(major: PgMajor, options: ClusterOptions) -> (Cluster, Cluster, Lsn) {
    let mut old = Cluster::start_new_with(major, "old", options);
    old.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text) WITH (fillfactor = 50);
         INSERT INTO t SELECT i, repeat('x', 100) FROM generate_series(1, 20000) i",
    );
    let new = old.create_standby("new");
    promote(&old, &new);
    old.stop(StopMode::Fast);
    new.execute(
        "UPDATE t SET v = 'changed on the new primary' WHERE id % 997 = 0;
         CREATE TABLE made_on_new AS SELECT generate_series(1, 1000) AS i;
         DELETE FROM t WHERE id > 19000",
    );
    // Empty pages at the end are cut off: a truncation in the WAL.
    new.execute("VACUUM t");
    let strategy = if major >= PgMajor::V15 {
        " STRATEGY file_copy"
    } else {
        ""
    };
    new.execute(&format!("CREATE DATABASE copied_on_new{strategy}"));
    let since = switch_point(&new, 2);
    (old, new, since)
}

fn connect(conninfo: &str) -> Conn {
    Conn::connect(
        conninfo,
        "failback-test",
        Duration::from_secs(10),
        Some(Duration::from_secs(60)),
    )
    .unwrap_or_else(|e| panic!("{conninfo}: {e}"))
}

/// A role holding only what pg_rewind's documentation grants.
fn rewind_role(cluster: &Cluster) -> String {
    cluster.execute(
        "CREATE ROLE rewinder LOGIN;
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO rewinder;
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO rewinder;
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO rewinder;
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)
             TO rewinder;",
    );
    cluster.conninfo().replace("user=postgres", "user=rewinder")
}

/// The source's facts the libpq source reads anyway: its control file and its history.
fn facts(cluster: &Cluster) -> (ControlFileData, TimeLineHistory) {
    let control = failback_tests::rewind::control_file(cluster);
    let dir = DataDir::new(cluster.data_dir());
    let history = failback_datadir::history::history_of(&dir, cluster.timeline()).unwrap();
    (control, history)
}

/// What failbackd's reading of the directory finds for the same stretch.
fn decoded_locally(cluster: &Cluster, since: Lsn, until: Lsn) -> SourceChanges {
    let (control, _) = facts(cluster);
    let dir = DataDir::new(cluster.data_dir());
    failback_datadir::wal::source_changes(
        &dir,
        &control,
        since,
        Some((until, cluster.timeline())),
        None,
    )
    .unwrap()
}

fn over_libpq(
    conninfo: &str,
    cluster: &Cluster,
    since: Lsn,
    until: Lsn,
    summaries: bool,
) -> (ChangesAnswer, ChangesReport) {
    let (control, history) = facts(cluster);
    let mut conn = connect(conninfo);
    source_changes_with(&mut conn, &control, &history, since, until, summaries).unwrap()
}

fn found(answer: ChangesAnswer, what: &str) -> SourceChanges {
    match answer {
        ChangesAnswer::Found(f) => f,
        ChangesAnswer::Unknown { why } => panic!("{what}: unknown: {why}"),
    }
}

/// The WAL pg_rewind would copy of the stretch: every segment it lies in, whole.
fn segments_bytes(since: Lsn, until: Lsn, seg: u64) -> u64 {
    (until.0 / seg - since.0 / seg + 1) * seg
}

pg_test!(decoded_over_libpq_as_failbackd_decodes, |major| {
    let (_old, new, since) = diverge(major, ClusterOptions::default());
    new.execute("CHECKPOINT");
    let until = new.flush_lsn();
    let local = decoded_locally(&new, since, until);
    assert!(local.records > 0 && local.changes.block_count() > 0);
    let seg = u64::from(facts(&new).0.xlog_seg_size);
    let limited = rewind_role(&new);
    for (who, conninfo) in [
        ("superuser", new.conninfo()),
        ("pg_rewind's grants", limited),
    ] {
        let (answer, report) = over_libpq(&conninfo, &new, since, until, false);
        let remote = found(answer, who);
        assert_eq!(remote.changes, local.changes, "{who}");
        assert_eq!(
            (remote.records, remote.until),
            (local.records, local.until),
            "{who}"
        );
        assert_eq!(remote.summarized_segments, 0);
        assert!(
            report.wal_bytes > 0 && report.wal_bytes <= segments_bytes(since, until, seg),
            "{who}: {} bytes of WAL read for {since}..{until}",
            report.wal_bytes
        );
    }
});

// PostgreSQL 17's WAL summaries, where the server keeps them, stand in for decoding.
mod summaries {
    use super::*;

    fn body(major: PgMajor) {
        let options = ClusterOptions::default().setting("summarize_wal", "on");
        let (_old, new, since) = diverge(major, options);
        // The summarizer ends a summary at a checkpoint's redo point: one after the changes
        // makes them summarized, and what follows it is decoded.
        new.execute("CHECKPOINT");
        let redo: Lsn = new
            .query_one("SELECT redo_lsn FROM pg_control_checkpoint()")
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done: Lsn = new
                .query_one("SELECT summarized_lsn FROM pg_get_wal_summarizer_state()")
                .parse()
                .unwrap();
            if done >= redo {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "summarized to {done}, not {redo}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        new.execute("UPDATE t SET v = 'after the checkpoint' WHERE id % 1009 = 0");
        let until = new.flush_lsn();
        let local = decoded_locally(&new, since, until);
        let (answer, report) = over_libpq(&new.conninfo(), &new, since, until, true);
        let summarized = found(answer, "summaries");
        assert!(
            !report.summaries.is_empty() && report.summarized_until >= redo,
            "{report:?}, redo {redo}, since {since}, listed:\n{}",
            new.query_lines("SELECT * FROM pg_available_wal_summaries() ORDER BY 2")
        );
        assert!(summarized.summarized_segments > 0);
        assert!(
            summarized.records < local.records,
            "the summarized part was not decoded"
        );
        assert_covers(&new, &summarized, &local);

        // The summary functions are PUBLIC's in 17 and 18: pg_rewind's role reads them too;
        // and without them it decodes, finding what failbackd finds.
        let limited = rewind_role(&new);
        let (answer, report) = over_libpq(&limited, &new, since, until, true);
        assert!(!report.summaries.is_empty(), "{report:?}");
        assert_covers(
            &new,
            &found(answer, "pg_rewind's grants, summaries"),
            &local,
        );
        let (answer, report) = over_libpq(&limited, &new, since, until, false);
        assert!(report.summaries.is_empty(), "{report:?}");
        let decoded = found(answer, "pg_rewind's grants, decoding");
        assert_eq!(decoded.changes, local.changes);
    }

    /// Everything `decoded` names is named by `summarized` too, or copied whole, or lies past
    /// the end of the source's file (cut off anyway).
    fn assert_covers(cluster: &Cluster, summarized: &SourceChanges, decoded: &SourceChanges) {
        let s = &summarized.changes;
        for (path, blocks) in &decoded.changes.page_map.files {
            let len = std::fs::metadata(cluster.data_dir().join(path)).map_or(0, |m| m.len());
            let whole = failback_common::relpath::is_rel_data_file(path, cluster.major())
                .is_some_and(|(loc, _)| s.copies_whole(loc));
            for b in blocks.iter() {
                let named = s.page_map.files.get(path).is_some_and(|m| m.contains(b));
                assert!(
                    named || whole || u64::from(b) * 8192 >= len,
                    "block {b} of {path} ({len} bytes) decoded but not summarized"
                );
            }
        }
        for loc in &decoded.changes.created {
            assert!(s.copies_whole(*loc), "{loc:?}");
        }
        for db in &decoded.changes.databases {
            assert!(s.databases.contains(db), "{db:?}");
        }
    }

    #[test]
    fn pg17() {
        body(PgMajor::V17)
    }

    #[test]
    fn pg18() {
        body(PgMajor::V18)
    }
}

// Once the WAL since the divergence is recycled the source cannot say: not an error.
pg_test!(recycled_wal_is_unknown, |major| {
    let (_old, new, since) = diverge(major, ClusterOptions::default());
    new.execute("ALTER SYSTEM SET wal_keep_size = 0");
    new.execute("SELECT pg_reload_conf()");
    let seg = facts(&new).0.xlog_seg_size;
    let first = failback_tests::rewind::wal_file_name_at(2, since, seg);
    for _ in 0..4 {
        new.execute("CREATE TABLE IF NOT EXISTS churn (i int); INSERT INTO churn VALUES (1)");
        new.query_one("SELECT pg_switch_wal()");
        new.execute("CHECKPOINT");
    }
    assert!(
        !new.data_dir().join("pg_wal").join(&first).exists(),
        "{first} was not recycled"
    );
    let until = new.flush_lsn();
    match over_libpq(&new.conninfo(), &new, since, until, true).0 {
        ChangesAnswer::Unknown { why } => assert!(why.contains("no longer complete"), "{why}"),
        ChangesAnswer::Found(f) => panic!("changes from recycled WAL: {f:?}"),
    }
});

/// SHA-256 of each `chunk`-byte chunk of `bytes`.
fn sha256_chunks(bytes: &[u8], chunk: usize) -> Vec<[u8; 32]> {
    bytes
        .chunks(chunk)
        .map(|c| ChunkHash::Sha256.hash(c))
        .collect()
}

// The server's chunk hashes are SHA-256 of the file's chunks, over several connections, and
// they make only the changed chunk be fetched.
fn sql_chunk_hashes(major: PgMajor) {
    let cluster = Cluster::start_new(major, "src");
    cluster.execute(
        "CREATE TABLE h (i int, v text);
         INSERT INTO h SELECT i, md5(i::text) FROM generate_series(1, 30000) i;
         CHECKPOINT",
    );
    let rel = cluster.query_one("SELECT pg_relation_filepath('h')");
    let limited = rewind_role(&cluster);
    cluster.execute("CHECKPOINT");
    let paths = vec![
        rel.clone(),
        "global/pg_control".to_string(),
        "PG_VERSION".to_string(),
        "base/1/no_such_file".to_string(),
    ];
    for conninfo in [cluster.conninfo(), limited] {
        let mut conns = vec![connect(&conninfo), connect(&conninfo)];
        for chunk in [8192u64, 65536] {
            let got = chunk_hashes(&mut conns, &paths, chunk)
                .unwrap()
                .expect("the server hashes");
            assert_eq!(got.len(), paths.len());
            for (h, path) in got.iter().zip(&paths) {
                assert_eq!(&h.path, path);
                assert_eq!(h.algorithm, ChunkHash::Sha256);
                let Ok(bytes) = std::fs::read(cluster.data_dir().join(path)) else {
                    assert!(h.vanished && h.hashes.is_empty(), "{h:?}");
                    continue;
                };
                assert!(!h.vanished);
                assert_eq!(h.size, bytes.len() as u64, "{path}");
                assert_eq!(h.hashes, sha256_chunks(&bytes, chunk as usize), "{path}");
            }
        }
    }
    // A copy of the relation with one byte changed in chunk 3 of 8 KiB fetches that chunk.
    let bytes = std::fs::read(cluster.data_dir().join(&rel)).unwrap();
    assert!(bytes.len() > 10 * 8192);
    let mut target = bytes.clone();
    target[3 * 8192 + 100] ^= 0xff;
    let mut conns = vec![connect(&cluster.conninfo())];
    let source = chunk_hashes(&mut conns, std::slice::from_ref(&rel), 8192)
        .unwrap()
        .unwrap()
        .remove(0);
    let mine = sha256_chunks(&target, 8192);
    let ranges = ranges_to_fetch(
        8192,
        &ChunkList {
            size: source.size,
            hashes: &source.hashes,
        },
        &ChunkList {
            size: target.len() as u64,
            hashes: &mine,
        },
    );
    assert_eq!(
        ranges
            .iter()
            .map(|r| (r.offset, r.length))
            .collect::<Vec<_>>(),
        vec![(3 * 8192, 8192)]
    );
}

mod chunk_hashes_in_sql {
    use super::*;
    pg_versions!(sql_chunk_hashes);
}
