//! Rewinding by the pages that differ: no WAL needed back to the divergence on either side.
//!
//! Each scenario fails a primary over, writes on both sides, then takes away WAL that
//! pg_rewind would need — the old primary's since the divergence (gone, not archived), the new
//! primary's since the divergence (recycled), or both — and rewinds by the default `--mode
//! auto`: a side whose WAL is gone has its changes found by comparing chunk hashes of its
//! relation files with the other side's. Every scenario ends with the old primary caught up as a
//! standby on the new timeline, every table equal, every page checksum valid and amcheck clean.
//! They run from a local directory and through failbackd over gRPC and QUIC, on 13–18.
//!
//! Then a busy source: the new primary rewrites the same rows through many checkpoints after
//! the split, and what the rewind copies stays the pages that differ, not the WAL it wrote.

use failback_tests::rewind::{self, promote, rejoin, remove_wal_since, rewind_ok, stop_for_rewind};
use failback_tests::verify::{assert_amcheck_clean, assert_checksums_clean};
use failback_tests::{Cluster, ClusterOptions, StopMode, pg_test, scenario_test};

/// A primary and its promoted standby, both running with 1 MiB WAL segments and no WAL kept
/// beyond what they need, each having written after the split: the old primary a few segments
/// of changes (the writes the rewind must undo), the new primary other changes and a table of
/// its own.
fn diverged(major: failback_common::PgMajor) -> (Cluster, Cluster) {
    let options = ClusterOptions::default().wal_segment_size_mb(1);
    let mut old = Cluster::start_new_with(major, "old", options);
    old.pgbench_init(1);
    old.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, 'before the fork' FROM generate_series(1, 5000) i",
    );
    let new = old.create_standby("new");
    promote(&old, &new);
    for round in 0..3 {
        old.execute(&format!(
            "UPDATE t SET v = 'lost on old {round}' WHERE id % 4 = {round};
             UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid % 97 = {round};
             SELECT pg_switch_wal()"
        ));
    }
    old.execute("CREATE TABLE only_old AS SELECT generate_series(1, 1000) AS x");
    new.execute(
        "UPDATE t SET v = 'kept on new' WHERE id % 5 = 0;
         UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 89 = 0;
         CREATE TABLE only_new AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g",
    );
    (old, new)
}

/// Which sides lose their WAL since the divergence.
#[derive(Clone, Copy)]
struct Gone {
    target: bool,
    source: bool,
}

/// The scenario: diverge, checkpoint both sides past the lost WAL, stop, take the WAL away,
/// rewind with `--mode auto`, check how each side's changes were found, rejoin and verify.
fn wal_gone(major: failback_common::PgMajor, gone: Gone) {
    let (mut old, mut new) = diverged(major);
    // Each side's last checkpoint lies past the WAL taken away, so each can still start.
    for c in [&old, &new] {
        c.execute("SELECT pg_switch_wal(); CHECKPOINT");
    }
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);
    let fork = rewind::switch_point(&new, 2);
    for (lose, c, side) in [(gone.target, &old, "old"), (gone.source, &new, "new")] {
        if lose {
            let removed = remove_wal_since(c, fork);
            assert!(
                !removed.is_empty(),
                "the {side} primary had no WAL since the divergence to take away"
            );
        }
    }
    let run = rewind_ok(&old, &new, &[]);
    let report = run.report();
    for (lost, side) in [
        (gone.target, "target_changes"),
        (gone.source, "source_changes"),
    ] {
        let want = if lost { "hashes" } else { "wal" };
        assert_eq!(report[side]["found_by"], want, "{side}:\n{}", run.show());
    }
    if gone.target || gone.source {
        assert!(
            report["execution"]["files_hashed"].as_u64().unwrap_or(0) > 0
                || report["execution"]["bytes_identical"].as_u64().unwrap_or(0) > 0,
            "relation files were compared:\n{}",
            run.show()
        );
    }
    assert_checksums_clean(&mut old);
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE v LIKE 'lost on old%'"),
        "0"
    );
    assert_eq!(old.query_one("SELECT count(*) FROM only_new"), "20000");
    assert_eq!(
        old.query_one("SELECT count(*) FROM pg_class WHERE relname = 'only_old'"),
        "0"
    );
    assert_amcheck_clean(&new, &old);
}

scenario_test!(target_wal_gone, |major| {
    wal_gone(
        major,
        Gone {
            target: true,
            source: false,
        },
    )
});

scenario_test!(source_wal_recycled, |major| {
    wal_gone(
        major,
        Gone {
            target: false,
            source: true,
        },
    )
});

scenario_test!(both_sides_wal_gone, |major| {
    wal_gone(
        major,
        Gone {
            target: true,
            source: true,
        },
    )
});

// A busy source: after the split the new primary updates the same 1 % of the accounts again
// and again through eight checkpoint cycles, writing far more WAL than there are pages that
// differ. pg_rewind would copy all of that WAL and replay it; the rewind copies the pages
// either side changed and the source's WAL from its last checkpoint only.
pg_test!(busy_source_through_many_checkpoints, |major| {
    let options = ClusterOptions::default()
        .wal_segment_size_mb(1)
        .setting("wal_keep_size", "1GB");
    let mut old = Cluster::start_new_with(major, "old", options);
    old.pgbench_init(4);
    let mut new = old.create_standby("new");
    promote(&old, &new);
    old.execute("UPDATE pgbench_accounts SET abalance = -1 WHERE aid % 100 = 1");
    let start = new.current_lsn();
    for cycle in 0..8 {
        new.execute(&format!(
            "UPDATE pgbench_accounts SET abalance = abalance + {cycle} WHERE aid % 100 = 2;
             CHECKPOINT"
        ));
    }
    let written = new.current_lsn().0 - start.0;
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);
    let run = rewind_ok(&old, &new, &[]);
    let report = run.report();
    let fetched = report["bytes_to_fetch"].as_u64().unwrap();
    let replay = report["replay"]["bytes"].as_u64().unwrap();
    // The accounts table is about 50 MB at scale 4; 1 % of its rows on each side touch most of
    // its pages, so the copy is bounded by the table, not by the WAL.
    assert!(
        written > fetched,
        "the new primary wrote {written} bytes of WAL, the rewind fetches {fetched}:\n{}",
        run.show()
    );
    assert!(
        replay <= 2 << 20,
        "the rewound node replays {replay} bytes of WAL, more than two segments:\n{}",
        run.show()
    );
    for side in ["target_changes", "source_changes"] {
        assert_eq!(report[side]["found_by"], "wal", "{side}:\n{}", run.show());
    }
    assert_checksums_clean(&mut old);
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_one("SELECT count(*) FROM pgbench_accounts WHERE abalance = -1"),
        "0"
    );
    assert_amcheck_clean(&new, &old);
});
