//! Backup windows held by failbackd on a running source (primary and standby), over gRPC and
//! QUIC, on every major version 13–18: a window opens with a checkpoint's redo position and
//! reserves the WAL from there (a temporary replication slot of failbackd's session); closing it
//! stops the backup and gives the copy's `backup_label`; the WAL stays reserved until the client
//! goes; a client that goes away without closing its window abandons it.

mod support;

use std::time::{Duration, Instant};

use failback_client::source::Source;
use failback_tests::failbackd::{Failbackd, Via};
use failback_tests::rewind::promote;
use failback_tests::{Cluster, pg_test};

const SLOTS: &str = "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'failback_%'";

/// Waits until `sql` answers `want` on `c` (failbackd's session ends a little after its client).
fn eventually(c: &Cluster, sql: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        let got = c.query_one(sql);
        if got == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{sql} still says {got}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn window_through(server: &Failbackd, via: Via, c: &Cluster, from: &str) {
    let mut source = support::connect_child(server, via);
    let start = source
        .open_window("failback test")
        .unwrap()
        .expect("a window on a running source");
    assert!(start.start <= c.current_lsn(), "{start:?}");
    assert_eq!(
        c.query_one(SLOTS),
        "1",
        "{via:?}: no WAL reserved for the window"
    );
    let end = source.close_window().unwrap();
    assert!(end.stop >= start.start, "{start:?} {end:?}");
    for line in [
        format!("START WAL LOCATION: {}", start.start),
        "LABEL: failback test".to_string(),
        format!("BACKUP FROM: {from}"),
    ] {
        assert!(
            end.backup_label.contains(&line),
            "{line} not in:\n{}",
            end.backup_label
        );
    }
    assert!(
        source.close_window().is_err(),
        "{via:?}: a window closed twice"
    );
    // Reserved until the client goes.
    assert_eq!(c.query_one(SLOTS), "1", "{via:?}");
    drop(source);
    eventually(c, SLOTS, "0");
}

pg_test!(windows_hold_a_backup_and_its_wal, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    primary.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let standby = primary.create_standby("standby");
    standby.wait_for_catchup(&primary);
    // PostgreSQL 13 still says "master".
    let from_primary = if major == failback_tests::PgMajor::V13 {
        "master"
    } else {
        "primary"
    };
    for via in [Via::Grpc, Via::Quic] {
        let server = Failbackd::serve_live(&primary);
        window_through(&server, via, &primary, from_primary);
        let server = Failbackd::serve_live(&standby);
        window_through(&server, via, &standby, "standby");
    }

    // A client that goes away without closing its window: the backup and the WAL reservation
    // end with failbackd's session.
    for via in [Via::Grpc, Via::Quic] {
        let server = Failbackd::serve_live(&primary);
        let mut source = support::connect_child(&server, via);
        source.open_window("abandoned").unwrap().unwrap();
        assert_eq!(primary.query_one(SLOTS), "1");
        drop(source);
        eventually(&primary, SLOTS, "0");
        eventually(
            &primary,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'failbackd'",
            "0",
        );
    }

    // A shut-down source needs no window; a running one served without --pg-conn cannot have
    // one, and says so.
    let promoted = promote(&primary, &standby);
    assert_eq!(promoted, 2);
    let server = Failbackd::serve(&primary.data_dir());
    let mut source = support::connect_child(&server, Via::Grpc);
    let e = source.open_window("x").unwrap_err().to_string();
    assert!(e.contains("backup window"), "{e}");
});
