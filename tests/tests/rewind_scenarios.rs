//! `failback rewind` on real failovers, for every major version 13–18, with the source reached
//! every way there is: its data directory (`--source-pgdata`) and failbackd (`--source
//! grpc://…`), each scenario written once (`scenario_test!`, `failback_tests::failbackd::Via`).
//!
//! Each scenario builds a primary and a streaming standby, promotes the standby, lets both
//! sides write (the old primary's writes after the fork are what the rewind must undo), stops
//! both, rewinds the old primary from the new primary's data directory, starts it as a standby
//! of the new primary and checks that, once it has caught up on the new timeline, it holds
//! exactly the new primary's data (see `failback_tests::rewind`).
//!
//! Then the refusals (each must leave every file of the target as it was), the oracle
//! (PostgreSQL 15's pg_rewind must plan the same blocks) and files past every 32-bit boundary
//! (PostgreSQL 15 only).

use std::fs;
use std::time::{Duration, Instant};

use failback_common::PgMajor;
use failback_tests::failbackd::{Via, via, with_via};
use failback_tests::rewind::{
    self, TreeDigest, assert_refused, failover_and_rewind, promote, rejoin, rewind, rewind_ok,
    start_rejoined, stop_for_rewind,
};
use failback_tests::{Cluster, ClusterOptions, StopMode, pg_test, scenario_test, user};

// A table updated, inserted into and deleted from on both sides after the fork, while pgbench
// runs on both.
scenario_test!(basic, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.pgbench_init(1);
    old.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, 'before the fork' FROM generate_series(1, 2000) i",
    );
    let mut new = old.create_standby("new");
    promote(&old, &new);

    for (side, c) in [("old", &old), ("new", &new)] {
        c.pgbench(&["-n", "-c", "2", "-T", "2"]);
        let (k, lo) = if side == "old" { (1, 3000) } else { (2, 5000) };
        c.execute(&format!(
            "UPDATE t SET v = 'updated on {side}' WHERE id % 7 = {k};
             INSERT INTO t SELECT i, 'inserted on {side}' FROM generate_series({lo}, {lo} + 499) i;
             DELETE FROM t WHERE id % 11 = {k}"
        ));
    }
    let count_by_value = "SELECT v, count(*) FROM t GROUP BY v ORDER BY 1";
    let expected = new.query_lines(count_by_value);
    // The old primary holds writes the rewind must undo.
    let before = old.query_lines(count_by_value);
    assert!(before.contains("updated on old"), "{before}");
    let run = failover_and_rewind(&mut old, &mut new, StopMode::Fast, &[]);
    let report = run.report();
    let lsn = |key: &str| -> failback_common::Lsn {
        report[key]
            .as_str()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("{key} is not an LSN:\n{}", run.show()))
    };
    // The histories part where the new primary's timeline began; both sides' changes come from
    // their WAL, and the rewound node replays only the shut-down source's last checkpoint on,
    // none of the WAL back to the divergence.
    assert_eq!(
        lsn("divergence_lsn"),
        rewind::switch_point(&new, 2),
        "{}",
        run.show()
    );
    // A running source over plain libpq (these servers keep no WAL summaries) is rewound
    // pg_rewind's way: its WAL since the divergence is not read to name blocks but replayed by
    // the rewound node, from the last common checkpoint, before the divergence; the source's
    // WAL that was complete then is copied with the plan.
    let libpq = via() == Via::Libpq;
    let sides: &[&str] = if libpq {
        rewind::assert_replayed_from_last_common_checkpoint(&run);
        &["target_changes"]
    } else {
        &["target_changes", "source_changes"]
    };
    for side in sides {
        assert_eq!(report[side]["found_by"], "wal", "{side}: {}", run.show());
        assert!(
            report[side]["changed_blocks"].as_u64().unwrap_or(0) > 0,
            "{side}: {}",
            run.show()
        );
    }
    let replay_from: failback_common::Lsn = report["replay"]["from"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no replay.from:\n{}", run.show()));
    if libpq {
        assert!(replay_from < lsn("divergence_lsn"), "{}", run.show());
        assert_eq!(
            report["window_start"],
            report["replay"]["from"],
            "{}",
            run.show()
        );
    } else {
        assert!(replay_from > lsn("divergence_lsn"), "{}", run.show());
    }
    assert!(
        report["changed_blocks"].as_u64().unwrap_or(0) > 0,
        "{}",
        run.show()
    );
    let after = old.query_lines(count_by_value);
    assert_eq!(after, expected);
    assert!(!after.contains("on old"), "{after}");
    rewind::assert_owned_by_pg_user(&old);
});

// A database created on the old primary after the fork (with both strategies where 15+ has
// two), and one dropped on the new primary.
scenario_test!(databases, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.execute("CREATE DATABASE dropped_on_new");
    old.execute_in(
        "dropped_on_new",
        "CREATE TABLE d (i int); INSERT INTO d VALUES (1)",
    );
    old.execute("CREATE DATABASE kept");
    let mut new = old.create_standby("new");
    promote(&old, &new);

    old.execute("CREATE DATABASE created_on_old");
    old.execute_in(
        "created_on_old",
        "CREATE TABLE c AS SELECT generate_series(1, 5000) i",
    );
    if major >= PgMajor::V15 {
        old.execute("CREATE DATABASE copied_on_old STRATEGY file_copy");
    }
    old.execute_in("kept", "CREATE TABLE written_on_old AS SELECT 1 AS i");
    new.execute("DROP DATABASE dropped_on_new");
    new.execute("CREATE DATABASE created_on_new");
    new.execute_in(
        "created_on_new",
        "CREATE TABLE n AS SELECT generate_series(1, 100) i",
    );

    failover_and_rewind(&mut old, &mut new, StopMode::Fast, &[]);
    let dbs = "SELECT datname FROM pg_database ORDER BY 1";
    assert_eq!(old.query_lines(dbs), new.query_lines(dbs));
    assert_eq!(
        old.query_lines(dbs),
        "created_on_new\nkept\npostgres\ntemplate0\ntemplate1"
    );
    rewind::assert_owned_by_pg_user(&old);
});

// Relation files created, truncated and dropped on the old primary after the fork, one
// truncated on the new primary; a table rewritten (new relfilenode) on the old one.
scenario_test!(smgr, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.execute(
        "CREATE TABLE trunc_on_old AS SELECT i, repeat('x', 100) AS pad FROM generate_series(1, 5000) i;
         CREATE TABLE drop_on_old AS SELECT i FROM generate_series(1, 5000) i;
         CREATE TABLE trunc_on_new AS SELECT i, repeat('y', 100) AS pad FROM generate_series(1, 5000) i;
         CREATE TABLE rewritten_on_old (i int PRIMARY KEY, v text);
         INSERT INTO rewritten_on_old SELECT i, 'v' FROM generate_series(1, 3000) i",
    );
    let mut new = old.create_standby("new");
    promote(&old, &new);

    old.execute(
        "CREATE TABLE created_on_old AS SELECT i FROM generate_series(1, 20000) i;
         TRUNCATE trunc_on_old;
         INSERT INTO trunc_on_old VALUES (1, 'after truncate');
         DROP TABLE drop_on_old;
         BEGIN; CREATE TABLE created_and_truncated (i int);
         INSERT INTO created_and_truncated SELECT generate_series(1, 1000);
         TRUNCATE created_and_truncated; COMMIT;
         CREATE TABLE created_and_dropped AS SELECT 1 AS i; DROP TABLE created_and_dropped;
         CREATE INDEX ON trunc_on_new (i);",
    );
    old.execute("VACUUM FULL rewritten_on_old");
    new.execute(
        "TRUNCATE trunc_on_new;
         INSERT INTO trunc_on_new VALUES (42, 'after truncate on new');
         INSERT INTO rewritten_on_old SELECT i, 'new' FROM generate_series(3001, 3100) i",
    );
    failover_and_rewind(&mut old, &mut new, StopMode::Fast, &[]);
    let tables = "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = \
                  'public'::regnamespace ORDER BY 1";
    assert_eq!(old.query_lines(tables), new.query_lines(tables));
    assert_eq!(old.query_one("SELECT count(*) FROM trunc_on_old"), "5000");
    assert_eq!(old.query_one("SELECT count(*) FROM drop_on_old"), "5000");
    assert_eq!(old.query_one("SELECT count(*) FROM trunc_on_new"), "1");
    assert_eq!(
        old.query_one("SELECT count(*) FROM rewritten_on_old"),
        "3100"
    );
    // Indexes must be usable too: the rewind copies them like any relation.
    assert_eq!(
        old.query_one(
            "SET enable_seqscan = off; SELECT count(*) FROM rewritten_on_old WHERE i > 2990"
        ),
        "110"
    );
});

// A table in a tablespace, written on both sides; the old primary also makes a tablespace of
// its own after the fork, which the rewind removes.
scenario_test!(tablespace, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.create_tablespace("space");
    old.execute(
        "CREATE TABLE in_space (i int, v text) TABLESPACE space;
         INSERT INTO in_space SELECT i, 'before' FROM generate_series(1, 5000) i",
    );
    let mut new = old.create_standby("new");
    promote(&old, &new);

    old.execute(
        "UPDATE in_space SET v = 'old' WHERE i % 3 = 0;
         INSERT INTO in_space SELECT i, 'old' FROM generate_series(5001, 9000) i;
         CREATE TABLE also_in_space TABLESPACE space AS SELECT 1 AS i",
    );
    old.create_tablespace("only_old");
    old.execute(
        "CREATE TABLE in_only_old (i int) TABLESPACE only_old; INSERT INTO in_only_old VALUES (1)",
    );
    new.execute(
        "UPDATE in_space SET v = 'new' WHERE i % 5 = 0;
         DELETE FROM in_space WHERE i < 100",
    );
    failover_and_rewind(&mut old, &mut new, StopMode::Fast, &[]);
    assert_eq!(
        old.query_lines("SELECT v, count(*) FROM in_space GROUP BY 1 ORDER BY 1"),
        new.query_lines("SELECT v, count(*) FROM in_space GROUP BY 1 ORDER BY 1")
    );
    assert_eq!(
        old.query_one("SELECT string_agg(spcname, ',' ORDER BY spcname) FROM pg_tablespace"),
        "pg_default,pg_global,space"
    );
    // The old primary's tablespace link is gone from pg_tblspc; its files with it.
    let links: Vec<_> = fs::read_dir(old.data_dir().join("pg_tblspc"))
        .unwrap()
        .flatten()
        .map(|e| fs::read_link(e.path()).unwrap())
        .collect();
    assert_eq!(
        links,
        vec![old.base_dir().join("ts").join("space")],
        "{links:?}"
    );
    rewind::assert_owned_by_pg_user(&old);
});

// Fail over back and forth, rewinding the loser each time, until the timeline history has five
// entries; then a target that itself switched timelines after the fork.
scenario_test!(many_timelines, |major| {
    let mut a = Cluster::start_new(major, "a");
    a.execute("CREATE TABLE t (tli int, side text, i int)");
    let mut b = a.create_standby("b");
    // (primary, standby) swap roles at each failover.
    let (mut primary, mut standby) = (&mut a, &mut b);
    let mut tli = 1;
    while tli < 6 {
        tli = promote(primary, standby);
        primary.execute(&format!(
            "INSERT INTO t SELECT {tli}, 'loser', generate_series(1, 200)"
        ));
        standby.execute(&format!(
            "INSERT INTO t SELECT {tli}, 'winner', generate_series(1, 100)"
        ));
        let run = failover_and_rewind(primary, standby, StopMode::Fast, &[]);
        assert_eq!(run.report()["source_timeline"], tli, "{}", run.show());
        std::mem::swap(&mut primary, &mut standby);
    }
    // `standby` is now the rewound loser following `primary` on timeline 6.
    let history = fs::read_to_string(primary.data_dir().join("pg_wal/00000006.history")).unwrap();
    let entries = history.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(entries, 5, "{history}");
    assert_eq!(
        primary.query_one("SELECT count(*) FROM t WHERE side = 'loser'"),
        "0"
    );
    assert_eq!(
        primary.query_one("SELECT count(DISTINCT tli) FROM t WHERE side = 'winner'"),
        "5"
    );
    drop((a, b));

    // A target that switched timeline after the fork: P's standby S2 keeps following P after
    // S1 was promoted, then S2 is promoted too (split brain) and is the one rewound from S1.
    // S1 is promoted twice (restarted as a standby of nothing in between) so that its timeline
    // number differs from the one S2 picks on its own.
    let mut p = Cluster::start_new(major, "p");
    p.execute(
        "CREATE TABLE t (side text, i int); INSERT INTO t SELECT 'common', generate_series(1, 100)",
    );
    let mut s1 = p.create_standby("s1");
    let mut s2 = p.create_standby("s2");
    promote(&p, &s1);
    s1.execute("INSERT INTO t SELECT 's1 on 2', generate_series(1, 10)");
    s1.stop(StopMode::Fast);
    user::write_file(&s1.data_dir().join("standby.signal"), "");
    let auto = s1.data_dir().join("postgresql.auto.conf");
    let text: String = fs::read_to_string(&auto)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("primary_conninfo"))
        .map(|l| format!("{l}\n"))
        .collect();
    user::write_file(&auto, text);
    s1.start();
    assert_eq!(s1.promote(), 3);
    s1.execute("INSERT INTO t SELECT 's1 on 3', generate_series(1, 10)");
    p.execute("INSERT INTO t SELECT 'p after the fork', generate_series(1, 1000)");
    s2.wait_for_catchup(&p);
    p.stop(StopMode::Fast);
    assert_eq!(s2.promote(), 2);
    s2.execute("INSERT INTO t SELECT 's2 on its own 2', generate_series(1, 500)");
    let run = failover_and_rewind(&mut s2, &mut s1, StopMode::Fast, &[]);
    let report = run.report();
    assert_eq!(report["target_timeline"], 2, "{}", run.show());
    assert_eq!(report["source_timeline"], 3, "{}", run.show());
    assert_eq!(report["divergence_timeline"], 1, "{}", run.show());
    assert_eq!(
        s2.query_lines("SELECT side, count(*) FROM t GROUP BY 1 ORDER BY 1"),
        "common|100\ns1 on 2|10\ns1 on 3|10"
    );
});

// The old primary's WAL after the fork went to its archive and is gone from pg_wal. Without
// -c the rewind refuses, naming the missing segment and suggesting -c, and changes nothing;
// with -c it fetches the segments with the target's restore_command.
scenario_test!(archived_wal, |major| {
    let options = ClusterOptions::default().archive().wal_segment_size_mb(1);
    let mut old = Cluster::start_new_with(major, "old", options);
    old.execute("CREATE TABLE t (i int, v text); INSERT INTO t SELECT i, 'common' FROM generate_series(1, 1000) i");
    let mut new = old.create_standby("new");
    let new_tli = promote(&old, &new);
    // A few segments of WAL on the old primary after the fork.
    for _ in 0..3 {
        old.execute(
            "INSERT INTO t SELECT i, repeat('o', 200) FROM generate_series(1, 3000) i;
             SELECT pg_switch_wal()",
        );
    }
    old.execute("UPDATE t SET v = 'last' WHERE i < 10");
    new.execute("INSERT INTO t SELECT i, 'new' FROM generate_series(1, 100) i");
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);

    // Move every segment from the fork on into the archive.
    let seg = 1 << 20;
    let fork = rewind::switch_point(&new, new_tli);
    let first = rewind::wal_file_name_at(1, fork, seg);
    let archive = old.archive_dir().unwrap();
    let mut moved = Vec::new();
    for name in rewind::wal_segments(&old.data_dir()) {
        if name.as_str() >= first.as_str() {
            let from = old.data_dir().join("pg_wal").join(&name);
            let to = archive.join(&name);
            if !to.exists() {
                fs::copy(&from, &to).unwrap();
                user::give(&to);
            }
            fs::remove_file(&from).unwrap();
            moved.push(name);
        }
    }
    assert!(moved.len() >= 3, "moved {moved:?}");
    old.append_conf(&format!(
        "restore_command = 'cp {}/%f %p'",
        archive.display()
    ));

    let before = TreeDigest::of(&old.data_dir());
    let run = rewind(&old, &new, &["--mode", "wal"]);
    assert_refused(&run, &["--restore-target-wal"], &[&old, &new]);
    assert!(
        moved.iter().any(|m| run.stderr.contains(m.as_str())),
        "the refusal names none of the missing segments {moved:?}:\n{}",
        run.show()
    );
    before.assert_unchanged(
        &TreeDigest::of(&old.data_dir()),
        "refused rewind without -c",
    );

    let run = rewind_ok(&old, &new, &["-c", "--mode", "wal"]);
    assert!(run.rewind_needed());
    assert_eq!(
        run.report()["target_changes"]["found_by"],
        "wal",
        "{}",
        run.show()
    );
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE v = 'new'"),
        "100"
    );
});

// The old primary crashed (immediate stop): failback first runs crash recovery in single-user
// mode with the target's own postgres binary.
scenario_test!(unclean_target, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.pgbench_init(1);
    let mut new = old.create_standby("new");
    promote(&old, &new);
    old.pgbench(&["-n", "-c", "2", "-t", "200"]);
    new.pgbench(&["-n", "-c", "2", "-t", "100"]);
    old.execute(
        "CREATE TABLE crashed (i int); INSERT INTO crashed SELECT generate_series(1, 1000)",
    );
    let run = failover_and_rewind(&mut old, &mut new, StopMode::Immediate, &[]);
    assert!(run.stderr.contains("crash recovery"), "{}", run.show());
    assert_eq!(
        old.query_one("SELECT count(*) FROM pg_class WHERE relname = 'crashed'"),
        "0"
    );
    rewind::assert_owned_by_pg_user(&old);
});

// The old primary's pg_wal holds segments past the end of its WAL: at its checkpoints
// PostgreSQL recycled segments it no longer needed as future ones (older WAL under later
// names). The rewind renames them to future segments of the new primary's timeline rather than
// removing them, and names them past all the WAL the rewound node replays; the rejoined
// standby then streams into those names as into segments it recycled itself.
scenario_test!(recycled_wal_segments, |major| {
    let options = ClusterOptions::default().setting("wal_keep_size", "0");
    let mut old = Cluster::start_new_with(major, "old", options);
    old.execute("CREATE TABLE t (side text, i int); INSERT INTO t SELECT 'common', generate_series(1, 1000)");
    let mut new = old.create_standby("new");
    for i in 0..8 {
        old.execute(&format!(
            "INSERT INTO t VALUES ('common', {i}); SELECT pg_switch_wal()"
        ));
    }
    // Streamed before the checkpoint recycles it: no slot keeps it for the standby.
    new.wait_for_catchup(&old);
    old.execute("CHECKPOINT");
    promote(&old, &new);
    old.execute("INSERT INTO t SELECT 'old', generate_series(1, 500)");
    new.execute("INSERT INTO t SELECT 'new', generate_series(1, 300)");
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);
    let control = rewind::control_file(&old);
    let seg_size = control.xlog_seg_size;
    let segno = |name: &str| failback_common::lsn::parse_wal_file_name(name, seg_size).unwrap();
    // The shut-down checkpoint is the last record: every later segment is a recycled one.
    let end = control.checkPoint.segment_number(seg_size);
    let ahead: Vec<String> = rewind::wal_segments(&old.data_dir())
        .into_iter()
        .filter(|n| segno(n).1 > end)
        .collect();
    assert!(
        ahead.len() >= 2,
        "PostgreSQL recycled no segments ahead of {end}: {:?}",
        rewind::wal_segments(&old.data_dir())
    );
    let run = rewind_ok(&old, &new, &[]);
    let recycled = run.report()["execution"]["wal_segments_recycled"].as_u64();
    assert_eq!(recycled, Some(ahead.len() as u64), "{}", run.show());
    // None of the old timeline's past the divergence is left; the recycled ones are the new
    // timeline's, past all the WAL the rewound node replays.
    let divergence = rewind::switch_point(&new, 2).segment_number(seg_size);
    let min: failback_common::Lsn = run
        .report_str("min_recovery_point")
        .unwrap()
        .parse()
        .unwrap();
    let after = rewind::wal_segments(&old.data_dir());
    assert!(
        after
            .iter()
            .all(|n| segno(n).0 != 1 || segno(n).1 <= divergence),
        "{after:?}"
    );
    let future: Vec<u64> = after
        .iter()
        .filter(|n| segno(n).0 == 2 && segno(n).1 > min.segment_number(seg_size))
        .map(|n| segno(n).1)
        .collect();
    assert_eq!(future.len(), ahead.len(), "{after:?}");
    // The new primary writes on into the recycled names while the old one follows it.
    rejoin(&mut old, &mut new);
    let last = *future.iter().max().unwrap();
    while segno(&new.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())")).1 <= last {
        new.execute("INSERT INTO t VALUES ('new, later', 1); SELECT pg_switch_wal()");
    }
    new.execute("INSERT INTO t VALUES ('new, last', 1)");
    old.wait_for_catchup(&new);
    failback_tests::fingerprint::assert_same_data(&new, &old);
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE side = 'old'"),
        "0"
    );
});

// The source is a shut-down standby of the new primary, with no WAL from before its last
// restartpoint (as a standby made by a base backup after the promotion has none): the segment
// holding the divergence point is then only the old primary's, and the part of it past the
// divergence must not survive the rewind, or recovery would replay the lost writes.
scenario_test!(standby_source, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.execute("CREATE TABLE t (side text, i int); INSERT INTO t SELECT 'common', generate_series(1, 1000)");
    let mut new = old.create_standby("new");
    promote(&old, &new);
    new.execute("INSERT INTO t SELECT 'new', generate_series(1, 300)");
    let mut cascade = new.create_standby("cascade");
    new.execute("INSERT INTO t SELECT 'new, later', generate_series(1, 30)");
    old.execute("INSERT INTO t SELECT 'old', generate_series(1, 3000); DELETE FROM t WHERE i < 50");
    // The cascade's last restartpoint in a later segment than the divergence point.
    new.execute("SELECT pg_switch_wal()");
    new.execute("CHECKPOINT");
    cascade.wait_for_catchup(&new);
    cascade.execute("CHECKPOINT");
    old.stop(StopMode::Fast);
    cascade.stop(StopMode::Fast);
    let control = rewind::control_file(&cascade);
    let seg_size = control.xlog_seg_size;
    let redo_seg = control.checkPointCopy.redo.segment_number(seg_size);
    let fork_seg = rewind::switch_point(&new, 2).segment_number(seg_size);
    assert!(
        fork_seg < redo_seg,
        "restartpoint in segment {redo_seg}, fork in {fork_seg}"
    );
    for name in rewind::wal_segments(&cascade.data_dir()) {
        let segno = failback_common::lsn::parse_wal_file_name(&name, seg_size)
            .unwrap()
            .1;
        if segno < redo_seg {
            fs::remove_file(cascade.data_dir().join("pg_wal").join(&name)).unwrap();
        }
    }
    let run = rewind_ok(&old, &cascade, &[]);
    assert!(run.rewind_needed(), "{}", run.show());
    // Consistent only once replay has passed everything the source's files may hold.
    let min: failback_common::Lsn = run
        .report_str("min_recovery_point")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        min >= control.minRecoveryPoint,
        "{} < {}",
        min,
        control.minRecoveryPoint
    );
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_lines("SELECT side, count(*) FROM t GROUP BY 1 ORDER BY 1"),
        "common|1000\nnew|300\nnew, later|30"
    );
});

// Nothing to rewind: a standby that was never promoted, and an old primary that stopped before
// the new one was promoted. failback says so, exits 0 and changes nothing but, with -R, the
// standby configuration.
scenario_test!(no_rewind_needed, |major| {
    let mut a = Cluster::start_new(major, "a");
    a.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let mut b = a.create_standby("b");
    b.wait_for_catchup(&a);

    // A standby never promoted: same timeline.
    b.stop(StopMode::Fast);
    a.stop(StopMode::Fast);
    let before = TreeDigest::of(&b.data_dir());
    let run = rewind_ok(&b, &a, &[]);
    assert!(run.stderr.contains("no rewind required"), "{}", run.show());
    assert!(!run.rewind_needed());
    before.assert_unchanged(&TreeDigest::of(&b.data_dir()), "no rewind, no -R");

    // The old primary stopped cleanly before the standby was promoted: its WAL ends where the
    // new timeline begins.
    a.start();
    b.start();
    a.execute("INSERT INTO t SELECT generate_series(1001, 2000)");
    b.wait_for_catchup(&a);
    a.stop(StopMode::Fast);
    let a_end = rewind::control_file(&a).checkPoint;
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.current_lsn() <= a_end {
        assert!(
            Instant::now() < deadline,
            "b never replayed a's shutdown checkpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    b.promote();
    b.execute("INSERT INTO t SELECT generate_series(2001, 2500)");
    b.stop(StopMode::Fast);
    let before = TreeDigest::of(&a.data_dir());
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=a",
        b.port()
    );
    let run = rewind_ok(&a, &b, &["-R", "--primary-conninfo", &conninfo]);
    assert!(run.stderr.contains("no rewind required"), "{}", run.show());
    let after = TreeDigest::of(&a.data_dir());
    let changed: Vec<String> = before.diff(&after);
    assert!(
        changed
            .iter()
            .all(|l| l.starts_with("standby.signal") || l.starts_with("postgresql.auto.conf")),
        "only the -R files may change:\n{}",
        changed.join("\n")
    );
    let auto = fs::read_to_string(a.data_dir().join("postgresql.auto.conf")).unwrap();
    assert_eq!(auto.matches("primary_conninfo").count(), 1, "{auto}");
    assert!(auto.contains(&format!("port={}", b.port())), "{auto}");
    // Started with what -R wrote, it follows b.
    start_rejoined(&mut a, &mut b);
    assert_eq!(a.query_one("SELECT count(*) FROM t"), "2500");
});

// Refusals: each leaves every file of the target as it was (a hash of every file before and
// after), says what is wrong, and the pair can still be rewound afterwards.
pg_test!(refusals, |major| {
    let mut old = Cluster::start_new(major, "old");
    old.execute("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)");
    let mut new = old.create_standby("new");
    let tli = promote(&old, &new);
    old.execute(
        "INSERT INTO t SELECT generate_series(1, 5000); CREATE TABLE only_old AS SELECT 1 AS i",
    );
    let only_old = old.query_one("SELECT pg_relation_filepath('only_old')");
    new.execute("DELETE FROM t WHERE i < 100");
    new.stop(StopMode::Fast);

    // A running target.
    let run = rewind(&old, &new, &[]);
    assert_refused(&run, &["target server is running"], &[&old, &new]);
    old.stop(StopMode::Fast);
    let before = TreeDigest::of(&old.data_dir());
    let unchanged = |what: &str| before.assert_unchanged(&TreeDigest::of(&old.data_dir()), what);
    unchanged("after the refusal of a running target");

    // A running source.
    new.start();
    let run = rewind(&old, &new, &[]);
    assert_refused(
        &run,
        &["source data directory must be shut down cleanly"],
        &[&old, &new],
    );
    unchanged("running source");
    new.stop(StopMode::Fast);

    // An unrelated cluster of the same version.
    let other = Cluster::init(major, "other", ClusterOptions::default());
    let run = rewind(&old, &other, &[]);
    assert_refused(&run, &["different systems"], &[&old, &other]);
    unchanged("different systems");
    drop(other);

    // A corrupt control file, on either side.
    let target_control = old.data_dir().join("global/pg_control");
    rewind::flip_bit(&target_control, 40, 2);
    let flipped = TreeDigest::of(&old.data_dir());
    let run = rewind(&old, &new, &[]);
    assert_refused(&run, &["target control file", "CRC"], &[&old, &new]);
    flipped.assert_unchanged(
        &TreeDigest::of(&old.data_dir()),
        "corrupt target control file",
    );
    rewind::flip_bit(&target_control, 40, 2);
    let source_control = new.data_dir().join("global/pg_control");
    rewind::flip_bit(&source_control, 100, 5);
    let run = rewind(&old, &new, &[]);
    assert_refused(&run, &["source control file", "CRC"], &[&old, &new]);
    unchanged("corrupt source control file");
    rewind::flip_bit(&source_control, 100, 5);

    // Target WAL since the divergence is missing (and there is no -c), and --mode wal forbids
    // comparing by hashes instead.
    let seg_size = rewind::control_file(&old).xlog_seg_size;
    let needed = rewind::wal_file_name_at(1, rewind::switch_point(&new, tli), seg_size);
    let wal = old.data_dir().join("pg_wal").join(&needed);
    let aside = old.base_dir().join(&needed);
    fs::rename(&wal, &aside).unwrap();
    let moved = TreeDigest::of(&old.data_dir());
    let run = rewind(&old, &new, &["--mode", "wal"]);
    assert_refused(&run, &[&needed, "--restore-target-wal"], &[&old, &new]);
    moved.assert_unchanged(&TreeDigest::of(&old.data_dir()), "missing WAL");
    fs::rename(&aside, &wal).unwrap();

    // A file the plan must overwrite, and a directory it must remove a file from, that cannot
    // be written (root ignores permission bits, not the immutable flag).
    let xact = old.data_dir().join("pg_xact/0000");
    let db_dir = old
        .data_dir()
        .join(&only_old)
        .parent()
        .unwrap()
        .to_path_buf();
    for (path, shown) in [
        (&xact, "pg_xact/0000".to_string()),
        (&db_dir, db_dir.display().to_string()),
    ] {
        match rewind::Immutable::set(std::slice::from_ref(path)) {
            Ok(guard) => {
                let run = rewind(&old, &new, &[]);
                assert_refused(&run, &[&shown, "cannot be written"], &[&old, &new]);
                unchanged("unwritable target");
                drop(guard);
            }
            Err(why) => {
                eprintln!("note: the unwritable-target refusal is not checked here: {why}");
                break;
            }
        }
    }

    // None of that harmed the pair.
    unchanged("all refusals");
    failover_and_rewind(&mut old, &mut new, StopMode::Fast, &[]);
});

// Clusters of two versions: the refusal names both.
#[test]
fn refuses_different_versions() {
    let (a, b) = (PgMajor::V15, PgMajor::V16);
    let target = Cluster::init(a, "target", ClusterOptions::default());
    let source = Cluster::init(b, "source", ClusterOptions::default());
    let before = TreeDigest::of(&target.data_dir());
    let run = rewind(&target, &source, &[]);
    assert_refused(
        &run,
        &[
            "source is PostgreSQL 16",
            "target is PostgreSQL 15",
            "same version",
        ],
        &[&target, &source],
    );
    before.assert_unchanged(&TreeDigest::of(&target.data_dir()), "different versions");
}

// The oracle (PostgreSQL 15, whose pg_rewind is on the machine): on the same diverged pair,
// failback's plan copies every (file, block) pair pg_rewind's does, and beyond them only blocks
// the source's WAL named (pg_rewind copies the source's WAL and replays it instead), and takes
// pg_rewind's action for every file pg_rewind lists, except where failback documents a
// refinement (WAL the rewound node does not replay not copied, the target's WAL past the
// divergence removed).
#[test]
fn plan_matches_pg_rewind() {
    let major = PgMajor::V15;
    let mut old = Cluster::start_new(major, "old");
    old.pgbench_init(2);
    old.execute(
        "CREATE TABLE shrinks AS SELECT i, repeat('s', 200) AS pad FROM generate_series(1, 20000) i;
         CREATE TABLE dropped AS SELECT generate_series(1, 1000) AS i;
         CREATE TABLE grows (i int)",
    );
    let mut new = old.create_standby("new");
    promote(&old, &new);
    old.pgbench(&["-n", "-c", "2", "-t", "300"]);
    old.execute(
        "DELETE FROM shrinks WHERE i > 100; INSERT INTO grows SELECT generate_series(1, 50000);
         DROP TABLE dropped; CREATE TABLE created AS SELECT 1 AS i",
    );
    old.execute("VACUUM shrinks");
    new.pgbench(&["-n", "-c", "2", "-t", "100"]);
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);

    let (theirs, their_output) = rewind::pg_rewind_dry_run(&old, &new);
    let run = rewind_ok(&old, &new, &["-n", "--debug"]);
    let ours = run.debug_plan();
    assert!(
        theirs.blocks.len() > 50,
        "the scenario should change blocks:\n{their_output}"
    );
    let only_theirs: Vec<_> = theirs.blocks.difference(&ours.blocks).collect();
    let only_ours: Vec<_> = ours.blocks.difference(&theirs.blocks).collect();
    let source_named = run.report()["source_changes"]["changed_blocks"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        only_theirs.is_empty() && only_ours.len() as u64 <= source_named,
        "blocks only pg_rewind fetches: {only_theirs:?}\nblocks only failback fetches \
         (the source's WAL named {source_named}): {only_ours:?}\n--- pg_rewind ---\n\
         {their_output}\n{}",
        run.show()
    );
    assert!(
        !only_ours.is_empty(),
        "the new primary's writes should add blocks\n{}",
        run.show()
    );
    // failback's documented refinements, each printed as a note on the path's line.
    let refined = |path: &str| {
        run.stderr.lines().any(|l| {
            l.contains(&format!(" {path} ("))
                && (l.contains("the rewound node does not replay")
                    || l.contains("past the divergence point")
                    || l.contains("from before the divergence: kept")
                    || l.contains("written at the end of the commit"))
        })
    };
    for (path, action) in &theirs.actions {
        let mine = ours.actions.get(path).map(String::as_str);
        assert!(
            mine == Some(action.as_str()) || refined(path),
            "{path}: pg_rewind {action}, failback {mine:?} without a documented reason\n{}",
            run.show()
        );
    }
    // What pg_rewind leaves alone (it lists only what it changes), failback leaves alone too.
    for (path, action) in &ours.actions {
        assert!(
            action == "NONE" || theirs.actions.contains_key(path) || refined(path),
            "{path}: failback {action}, pg_rewind does nothing\n{}",
            run.show()
        );
    }
    // And both leave the target as it was.
    assert!(!old.data_dir().join("backup_label").exists());
}

/// Makes `path` a sparse file of `len` bytes (extending or creating it, owned by PostgreSQL's
/// user with mode 0600) and writes `bytes` at each of `at`.
fn sparse_file(path: &std::path::Path, len: u64, at: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.set_len(len).unwrap();
    for (off, b) in at {
        f.write_all_at(b, *off).unwrap();
    }
    drop(f);
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    user::give(path);
}

fn read_at(path: &std::path::Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("{} at {off}: {e}", path.display()));
    buf
}

// Files past every 32-bit boundary (PostgreSQL 15 only: heavy). A sparse non-relation file of
// 4.5 GiB on both sides, differing past 2 GiB and past 4 GiB, ends up equal to the source's;
// a relation whose third segment (`.2`, from 2 GiB on) both sides write to after the fork has
// those blocks fetched. The relation's first two segments are holes (all-zero pages, which
// PostgreSQL reads as new, empty pages), made the same on both nodes while they are stopped.
#[test]
fn big_files() {
    big_files_via(Via::Local);
}

#[test]
fn big_files_grpc() {
    big_files_via(Via::Grpc);
}

#[test]
fn big_files_quic() {
    big_files_via(Via::Quic);
}

fn big_files_via(via: Via) {
    with_via(via, big_files_body);
}

fn big_files_body() {
    const GIB: u64 = 1 << 30;
    let t0 = Instant::now();
    let major = PgMajor::V15;
    let mut old = Cluster::start_new(major, "old");
    old.execute(
        "CREATE TABLE big (i int, side text) WITH (autovacuum_enabled = off);
         INSERT INTO big SELECT g, 'common' FROM generate_series(1, 100) g",
    );
    let rel = old.query_one("SELECT pg_relation_filepath('big')");
    let mut new = old.create_standby("new");
    new.wait_for_catchup(&old);
    old.execute("CHECKPOINT");
    new.wait_for_catchup(&old);
    new.stop(StopMode::Fast);
    old.stop(StopMode::Fast);
    // Segments 0 and 1 full (1 GiB each, holes past the 100 rows), segment 2 four empty pages.
    for c in [&old, &new] {
        let base = c.data_dir().join(&rel);
        sparse_file(&base, GIB, &[]);
        sparse_file(&base.with_extension("1"), GIB, &[]);
        sparse_file(&base.with_extension("2"), 4 * 8192, &[]);
    }
    old.start();
    new.start();
    assert_eq!(
        old.query_one("SELECT pg_relation_size('big')"),
        (2 * GIB + 4 * 8192).to_string()
    );
    promote(&old, &new);
    // New rows go to the last page, in segment 2, on both sides.
    old.execute("INSERT INTO big SELECT g, 'old' FROM generate_series(1, 5000) g");
    old.execute("UPDATE big SET side = 'old, updated' WHERE i < 50");
    new.execute("INSERT INTO big SELECT g, 'new' FROM generate_series(1, 300) g");
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);

    // A stray file over 4 GiB on both sides, differing past 2 GiB and past 4 GiB.
    let stray = |c: &Cluster| c.data_dir().join("big_stray_file");
    let (past2, past4) = (2 * GIB + 1, 4 * GIB + 5);
    sparse_file(
        &stray(&old),
        4 * GIB + GIB / 2,
        &[(past2, b"target"), (past4, b"target")],
    );
    sparse_file(
        &stray(&new),
        4 * GIB + GIB / 2,
        &[(past2, b"source"), (past4, b"source")],
    );
    let setup = t0.elapsed();

    let t1 = Instant::now();
    let run = rewind_ok(&old, &new, &["--debug"]);
    let rewind_time = t1.elapsed();
    let plan = run.debug_plan();
    let seg2 = format!("{rel}.2");
    assert!(
        plan.blocks.iter().any(|(p, _)| *p == seg2),
        "no changed block of {seg2} fetched:\n{}",
        run.show()
    );
    assert_eq!(
        plan.actions.get("big_stray_file").map(String::as_str),
        Some("COPY")
    );
    for off in [past2, past4] {
        assert_eq!(
            read_at(&stray(&old), off, 6),
            b"source",
            "byte {off} of the stray file"
        );
    }
    assert_eq!(fs::metadata(stray(&old)).unwrap().len(), 4 * GIB + GIB / 2);
    // Locally the identical pieces are read on both sides and not rewritten; through
    // failbackd they are not even sent (chunk hashes).
    let exec = &run.report()["execution"];
    let spared = exec["bytes_identical"].as_u64().unwrap()
        + exec["bytes_skipped_by_hashes"].as_u64().unwrap_or(0);
    assert!(
        spared > 4 * GIB,
        "the identical parts of the stray file were rewritten: {exec}"
    );

    let t2 = Instant::now();
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_lines("SELECT side, count(*) FROM big GROUP BY 1 ORDER BY 1"),
        "common|100\nnew|300"
    );
    eprintln!(
        "big_files: setup {setup:.1?}, rewind {rewind_time:.1?} ({}), rejoin and compare {:.1?}",
        run.report()["seconds"],
        t2.elapsed()
    );
}
