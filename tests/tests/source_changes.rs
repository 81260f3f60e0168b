//! The source's changes since the divergence, from its own WAL: served by failbackd beside a
//! running new primary (`Changes`), and read by a local source from a shut-down one; and what
//! both say once that WAL is gone. On every major version 13–18.
//!
//! What the WAL must name is known from SQL: the blocks holding the rows updated on the new
//! primary after the promotion (their new versions' `ctid`), the relfilenode of a table made
//! after it, and the OID of a database copied from a template (outside WAL) after it.

mod support;

use failback_client::source::local::LocalSource;
use failback_client::source::{ChangesAnswer, Source, SourceChanges};
use failback_common::relpath::RelFileLocator;
use failback_common::{Lsn, PgMajor};
use failback_tests::failbackd::{Failbackd, Via};
use failback_tests::rewind::{promote, switch_point};
use failback_tests::{Cluster, StopMode, pg_test};

/// What the new primary did after the promotion, as SQL sees it.
struct Expected {
    /// `pg_relation_filepath('t')` and the blocks of its updated rows' new versions.
    path: String,
    blocks: Vec<u32>,
    created: RelFileLocator,
    database: (u32, u32),
}

fn diverge(major: PgMajor) -> (Cluster, Cluster, Lsn, Expected) {
    let mut old = Cluster::start_new(major, "old");
    old.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text) WITH (fillfactor = 50);
         INSERT INTO t SELECT i, repeat('x', 100) FROM generate_series(1, 20000) i",
    );
    let new = old.create_standby("new");
    promote(&old, &new);
    old.stop(StopMode::Fast);
    new.execute(
        "UPDATE t SET v = 'changed on the new primary' WHERE id % 997 = 0;
         CREATE TABLE made_on_new AS SELECT generate_series(1, 1000) AS i",
    );
    // Made by copying the template's files: no block of it is in the WAL.
    let strategy = if major >= PgMajor::V15 {
        " STRATEGY file_copy"
    } else {
        ""
    };
    new.execute(&format!("CREATE DATABASE copied_on_new{strategy}"));
    let path = new.query_one("SELECT pg_relation_filepath('t')");
    let blocks: Vec<u32> = new
        .query_lines(
            "SELECT DISTINCT (ctid::text::point)[0]::int FROM t \
             WHERE v = 'changed on the new primary' ORDER BY 1",
        )
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(blocks.len() > 5, "{blocks:?}");
    let num = |sql: &str| -> u32 { new.query_one(sql).parse().unwrap() };
    let created = RelFileLocator::new(
        1663,
        num("SELECT oid FROM pg_database WHERE datname = current_database()"),
        num("SELECT relfilenode FROM pg_class WHERE relname = 'made_on_new'"),
    );
    let database = (
        1663,
        num("SELECT oid FROM pg_database WHERE datname = 'copied_on_new'"),
    );
    let divergence = switch_point(&new, 2);
    (
        old,
        new,
        divergence,
        Expected {
            path,
            blocks,
            created,
            database,
        },
    )
}

fn assert_names_what_changed(found: &SourceChanges, e: &Expected, since: Lsn, what: &str) {
    let blocks = found
        .changes
        .page_map
        .files
        .get(&e.path)
        .unwrap_or_else(|| panic!("{what}: no changed block of {} at all", e.path));
    let missing: Vec<u32> = e
        .blocks
        .iter()
        .copied()
        .filter(|b| !blocks.contains(*b))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: blocks {missing:?} of {} not named",
        e.path
    );
    assert!(
        found.changes.created.contains(&e.created),
        "{what}: {:?}",
        found.changes.created
    );
    assert!(
        found.changes.databases.contains(&e.database),
        "{what}: {:?}",
        found.changes.databases
    );
    assert!(
        found.until > since && found.records > 0,
        "{what}: {found:?}"
    );
}

fn remote(server: &Failbackd) -> Box<dyn Source> {
    support::connect_child(server, Via::Grpc)
}

pg_test!(the_sources_own_wal_names_what_it_changed, |major| {
    let (_old, mut new, since, expected) = diverge(major);

    // Running, through failbackd with --pg-conn.
    {
        let server = Failbackd::serve_live(&new);
        let mut source = remote(&server);
        match source.changes(since, None).unwrap() {
            ChangesAnswer::Found(found) => {
                assert_names_what_changed(&found, &expected, since, "failbackd, live");
                assert!(found.until <= new.current_lsn(), "{found:?}");
            }
            ChangesAnswer::Unknown { why } => panic!("failbackd could not say: {why}"),
        }
    }

    // Shut down, read where it lies.
    new.stop(StopMode::Fast);
    let mut local = LocalSource::new(new.data_dir());
    match local.changes(since, None).unwrap() {
        ChangesAnswer::Found(found) => {
            assert_names_what_changed(&found, &expected, since, "local, shut down")
        }
        ChangesAnswer::Unknown { why } => panic!("the local source could not say: {why}"),
    }
});

// Once the source has recycled the WAL from the divergence on, neither way can say, and both
// say why: the rewind then compares chunk hashes.
pg_test!(recycled_wal_cannot_say, |major| {
    let (_old, mut new, since, _) = diverge(major);
    new.execute("ALTER SYSTEM SET wal_keep_size = 0");
    new.execute("SELECT pg_reload_conf()");
    let first = failback_tests::rewind::wal_file_name_at(2, since, 16 << 20);
    for _ in 0..6 {
        new.execute("CREATE TABLE IF NOT EXISTS churn (i int); INSERT INTO churn VALUES (1)");
        new.query_one("SELECT pg_switch_wal()");
        new.execute("CHECKPOINT");
    }
    assert!(
        !new.data_dir().join("pg_wal").join(&first).exists(),
        "{first} was not recycled"
    );
    {
        let server = Failbackd::serve_live(&new);
        let mut source = remote(&server);
        match source.changes(since, None).unwrap() {
            ChangesAnswer::Unknown { why } => {
                assert!(why.contains("no longer complete"), "{why}")
            }
            ChangesAnswer::Found(f) => panic!("changes from recycled WAL: {f:?}"),
        }
    }
    new.stop(StopMode::Fast);
    match LocalSource::new(new.data_dir())
        .changes(since, None)
        .unwrap()
    {
        ChangesAnswer::Unknown { why } => assert!(why.contains("no longer complete"), "{why}"),
        ChangesAnswer::Found(f) => panic!("changes from recycled WAL: {f:?}"),
    }
});

// failbackd's WAL summaries stand in for decoding the whole segments since the divergence:
// the same blocks, created relations, copied databases and records as decoding all of it.
pg_test!(wal_summaries_give_what_decoding_gives, |major| {
    let (_old, new, since, expected) = diverge(major);
    // More segments of WAL since the divergence, each with changes of its own; the update
    // after each switch begins the next segment, which completes the one before.
    for i in 0..5 {
        new.execute(&format!(
            "UPDATE t SET v = 'round {i}' WHERE id % 101 = {i}; \
             CREATE TABLE made_in_round_{i} AS SELECT 1 AS i"
        ));
        new.query_one("SELECT pg_switch_wal()");
    }
    new.execute("UPDATE t SET v = 'after the switches' WHERE id % 89 = 0");
    let summarizing = Failbackd::serve_live(&new);
    summarizing.wait_for_log(
        "WAL summaries: caught up",
        std::time::Duration::from_secs(60),
    );
    let decoding = Failbackd::serve_live_with(&new, &["--no-wal-summaries"]);
    let found = |server: &Failbackd, until: Option<Lsn>| match remote(server)
        .changes(since, until)
        .unwrap()
    {
        ChangesAnswer::Found(f) => f,
        ChangesAnswer::Unknown { why } => panic!("failbackd could not say: {why}"),
    };
    let summarized = found(&summarizing, None);
    let decoded = found(&decoding, Some(summarized.until));
    assert_names_what_changed(&summarized, &expected, since, "from WAL summaries");
    assert!(
        summarized.summarized_segments >= 4,
        "{} segments from summaries:\n{}",
        summarized.summarized_segments,
        summarizing.log()
    );
    assert_eq!(decoded.summarized_segments, 0);
    assert_eq!(summarized.until, decoded.until);
    assert_eq!(summarized.records, decoded.records);
    assert_eq!(summarized.changes, decoded.changes);
    assert!(
        !decoding.log().contains("WAL summaries"),
        "{}",
        decoding.log()
    );
    // Without summaries, whole segments are decoded each on a thread of its own (as the
    // target's WAL is): one pass through the same stretch finds the same.
    let control = failback_tests::rewind::control_file(&new);
    let dir = failback_datadir::DataDir::new(new.data_dir());
    let history = failback_datadir::history::history_of(&dir, 2).unwrap();
    let params = failback_common::wal::WalParams::new(control.major, control.xlog_seg_size)
        .with_system_identifier(control.system_identifier);
    let mut reader = failback_datadir::wal::WalReader::new(&new.data_dir(), &history, params, None);
    let until = decoded.until;
    let one_pass = reader
        .changes(since, until, control.relseg_size, || {})
        .unwrap();
    let threaded = reader
        .changes_in_parallel(since, until, control.relseg_size, 3, || {})
        .unwrap();
    assert_eq!(one_pass.records(), threaded.records());
    assert_eq!(one_pass.records(), decoded.records);
    assert_eq!(one_pass.finish(major), threaded.finish(major));
});
