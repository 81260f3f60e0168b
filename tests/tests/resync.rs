//! `failback resync`: the same engine brings any node in line with the source, with no
//! divergence needed — a standby that fell behind past what its primary keeps (no slot, no
//! archive), resynced from the running primary through failbackd; a standby with damaged pages
//! (checksum failures), repaired from a shut-down primary locally and through failbackd over
//! gRPC and QUIC. Each ends with the node caught up as a standby, every table equal, every
//! page checksum valid and amcheck clean.

use std::ffi::OsString;
use std::os::unix::fs::FileExt;

use failback_tests::failbackd::{Failbackd, Via};
use failback_tests::rewind::{self, rejoin, run_failback};
use failback_tests::verify::{assert_amcheck_clean, assert_checksums_clean, checksums};
use failback_tests::{Cluster, ClusterOptions, StopMode, pg_test, scenario_test};

/// A primary with pgbench's tables, 1 MiB WAL segments and no WAL kept for standbys, and a
/// streaming standby (no slot) that has caught up.
fn pair(major: failback_common::PgMajor) -> (Cluster, Cluster) {
    let options = ClusterOptions::default()
        .wal_segment_size_mb(1)
        .setting("wal_keep_size", "0")
        .setting("max_wal_size", "32MB")
        .setting("min_wal_size", "2MB");
    let mut primary = Cluster::start_new_with(major, "primary", options);
    primary.pgbench_init(2);
    let standby = primary.create_standby("standby");
    standby.wait_for_catchup(&primary);
    (primary, standby)
}

// A standby stopped while its primary went on through many segments and checkpoints: the WAL
// it needs next is gone from the primary, so it could never catch up by streaming. Resynced
// from the running primary (under write load the whole time), it starts from its own pg_wal
// and streams on.
pg_test!(standby_fallen_behind_past_wal_keep_size, |major| {
    let (mut primary, mut standby) = pair(major);
    standby.stop(StopMode::Fast);
    let needed = {
        let c = rewind::control_file(&standby);
        let at = c.minRecoveryPoint.max(c.checkPointCopy.redo);
        rewind::wal_file_name_at(1, at, c.xlog_seg_size)
    };
    for round in 0..6 {
        primary.execute(&format!(
            "UPDATE pgbench_accounts SET abalance = abalance + {round} WHERE aid % 50 = {round};
             SELECT pg_switch_wal(); CHECKPOINT"
        ));
    }
    assert!(
        !primary.data_dir().join("pg_wal").join(&needed).exists(),
        "the primary still has {needed}, which the standby needs next"
    );
    // From now on the primary keeps its WAL, as a slot for the resynced node would: under load
    // and with 32 MB of max_wal_size it would otherwise recycle the WAL after the backup
    // window before the node connects, and the node would fall behind again.
    primary.execute("ALTER SYSTEM SET wal_keep_size = '1GB'");
    primary.query_one("SELECT pg_reload_conf()");
    let server = Failbackd::serve_live(&primary);
    let mut args: Vec<OsString> = vec!["resync".into(), "-D".into(), standby.data_dir().into()];
    args.extend(server.source_args(Via::Grpc));
    args.extend(["--pg-bindir".into(), standby.bins().bin_dir.clone().into()]);
    let report_path = standby.base_dir().join("resync.json");
    let run = rewind::under_load(&primary, || run_failback(&args, Some(&report_path)));
    assert!(run.success(), "{}", run.show());
    let report = run.report();
    assert_eq!(report["resync"], true, "{}", run.show());
    assert!(report["window_start"].is_string(), "{}", run.show());
    assert!(report["divergence_lsn"].is_null(), "{}", run.show());
    for side in ["target_changes", "source_changes"] {
        assert_eq!(
            report[side]["found_by"],
            "hashes",
            "{side}:\n{}",
            run.show()
        );
    }
    drop(server);
    assert_checksums_clean(&mut standby);
    rejoin(&mut standby, &mut primary);
    assert_amcheck_clean(&primary, &standby);
});

/// Flips a bit in `n` pages of `table`'s main fork in the shut-down `cluster`; returns how many
/// damaged pages a checksum scan then finds.
fn damage(cluster: &mut Cluster, relpath: &str, pages: &[u64]) -> usize {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cluster.data_dir().join(relpath))
        .unwrap();
    for &blk in pages {
        let off = blk * 8192 + 4321;
        let mut b = [0u8];
        f.read_exact_at(&mut b, off).unwrap();
        b[0] ^= 0x40;
        f.write_all_at(&b, off).unwrap();
    }
    checksums(cluster).bad.len()
}

// A standby whose pgbench_accounts has damaged pages (a checksum scan and PostgreSQL itself
// would refuse them), repaired by a resync from its shut-down primary: only what differs is
// fetched, and the node comes back whole.
scenario_test!(damaged_pages_repaired, |major| {
    let (mut primary, mut standby) = pair(major);
    let rel = primary.query_one("SELECT pg_relation_filepath('pgbench_accounts')");
    primary.execute("UPDATE pgbench_accounts SET abalance = 7 WHERE aid % 1000 = 1");
    standby.wait_for_catchup(&primary);
    standby.stop(StopMode::Fast);
    primary.stop(StopMode::Fast);
    assert_eq!(damage(&mut standby, &rel, &[1, 50, 200]), 3);

    let refused = rewind::resync(&standby, &primary, &["--mode", "wal"]);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.show());
    let run = rewind::resync(&standby, &primary, &[]);
    assert!(run.success(), "{}", run.show());
    let report = run.report();
    assert_eq!(report["resync"], true, "{}", run.show());
    // What was found identical (read locally, or compared by hashes through failbackd) was not
    // written: a good part of the cluster, though hint bits set on the primary and never
    // logged make many of the standby's pages differ byte for byte.
    let n = |k: &str| report["execution"][k].as_u64().unwrap_or(0);
    let same = n("bytes_identical") + n("bytes_skipped_by_hashes");
    let compared = n("bytes_fetched") + n("bytes_skipped_by_hashes");
    assert!(
        same * 4 > compared && n("bytes_written") < compared,
        "{}\n{}",
        report["execution"],
        run.show()
    );
    assert_checksums_clean(&mut standby);
    rejoin(&mut standby, &mut primary);
    assert_eq!(
        standby.query_one("SELECT count(*) FROM pgbench_accounts WHERE abalance = 7"),
        "200"
    );
    assert_amcheck_clean(&primary, &standby);
});
