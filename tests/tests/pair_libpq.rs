//! Rewinds from a running PostgreSQL server reached by `--source-server` alone: no failbackd,
//! only libpq, as `pg_rewind --source-server` reaches its source.
//!
//! Every test fails over a real pair (the standby promoted, both sides written after the split,
//! tens of MB for the rewind to copy), rewinds the old primary from the new one while the new
//! one runs, brings it back as a standby and compares every table. The source is a primary or
//! a standby of it; the role is a superuser (a real backup window held on its own connection)
//! or one holding only pg_rewind's four grants (a window made from the control file); the link
//! is TLS with `sslmode=verify-full` and a client certificate, or stalls; pgbench writes on the
//! source meanwhile; and a rewind killed half-way is resumed.

mod support;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use failback_tests::proxy::TcpCut;
use failback_tests::rewind::{
    assert_replayed_from_last_common_checkpoint, assert_tens_of_mb_rewound, assert_unfinished,
    context, diverged_with_tens_of_mb, diverged_with_tens_of_mb_with, rejoin, rewind_server,
    run_failback_with, start_rejoined, under_load,
};
use failback_tests::{Cluster, ClusterOptions, PgMajor, StopMode, pg_test, user};

/// pg_rewind's four grants, and nothing more (what Patroni and CloudNativePG give their rewind
/// role).
fn create_rewind_role(primary: &Cluster, role: &str) {
    primary.execute(&format!(
        "CREATE ROLE {role} LOGIN;
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {role};
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {role};
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {role};
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)
             TO {role};"
    ));
}

fn conninfo_as(server: &Cluster, role: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={role} dbname=postgres",
        server.port()
    )
}

// A superuser from the running new primary, which keeps no WAL summaries: rewound pg_rewind's
// way, the new primary's WAL since the divergence replayed by the rewound node from the last
// common checkpoint (a label made from that checkpoint, no pg_backup_start), and -R's
// primary_conninfo made from the connection as pg_rewind makes it. The node starts from what
// -R wrote.
pg_test!(from_a_live_primary, |major| {
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    old.stop(StopMode::Immediate);
    let run = rewind_server(&old, &new.conninfo(), &["-R"]);
    assert!(run.success(), "{}", context(&run, &[&old, &new]));
    assert!(run.rewind_needed(), "{}", run.show());
    assert_replayed_from_last_common_checkpoint(&run);
    let report = run.report();
    assert!(!run.stderr.contains("backup window"), "{}", run.show());
    let label = std::fs::read_to_string(old.data_dir().join("backup_label")).unwrap();
    assert!(label.contains("BACKUP METHOD: pg_rewind"), "{label}");
    let from = label.lines().next().unwrap_or_default();
    let redo = report["replay"]["from"].as_str().unwrap_or("none");
    assert!(
        from.starts_with(&format!("START WAL LOCATION: {redo} ")),
        "{label}"
    );
    let auto = std::fs::read_to_string(old.data_dir().join("postgresql.auto.conf")).unwrap();
    let conninfo = auto
        .lines()
        .find(|l| l.starts_with("primary_conninfo"))
        .unwrap_or_else(|| panic!("-R wrote no primary_conninfo:\n{auto}"));
    for part in [
        "host=127.0.0.1".to_string(),
        format!("port={}", new.port()),
        "user=postgres".into(),
    ] {
        assert!(conninfo.contains(&part), "{conninfo} lacks {part}");
    }
    assert!(!conninfo.contains("dbname="), "{conninfo}");
    start_rejoined(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
});

// Where the new primary keeps WAL summaries (17 and later), they name its changed blocks in a
// few rows: those blocks are copied inside a real backup window (pg_backup_start on a
// connection of its own, the window's WAL kept by a temporary slot), with pg_backup_stop's
// label, and none of the WAL since the divergence crosses.
#[test]
fn with_wal_summaries_a_real_backup_window() {
    let options = ClusterOptions::default().setting("summarize_wal", "on");
    let (mut old, mut new) = diverged_with_tens_of_mb_with(PgMajor::V17, options);
    old.stop(StopMode::Immediate);
    let run = rewind_server(&old, &new.conninfo(), &[]);
    assert!(run.success(), "{}", context(&run, &[&old, &new]));
    let report = run.report();
    assert_eq!(
        report["source_changes"]["found_by"],
        "wal",
        "{}",
        run.show()
    );
    assert!(
        run.stderr.contains("copying inside a backup window"),
        "{}",
        run.show()
    );
    let label = std::fs::read_to_string(old.data_dir().join("backup_label")).unwrap();
    assert!(label.contains("LABEL: "), "{label}");
    assert!(!label.contains("BACKUP METHOD: pg_rewind"), "{label}");
    let window_start: failback_common::Lsn = report["window_start"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no window_start:\n{}", run.show()));
    let divergence: failback_common::Lsn = report["divergence_lsn"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no divergence_lsn:\n{}", run.show()));
    assert!(window_start > divergence, "{}", run.show());
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
}

// A role holding only pg_rewind's four grants, from a running standby of the new primary: the
// window is made from the standby's control file (its last restartpoint), its timeline from
// the control file too (the role cannot see pg_stat_wal_receiver's or pg_control_*()'s).
// The standby is idle, so its WAL may end on a segment boundary (pg_basebackup's switch) with
// no next segment yet: the window's WAL is the segments before it.
pg_test!(from_a_live_standby_with_only_the_four_grants, |major| {
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    create_rewind_role(&new, "rewinder");
    let standby = new.create_standby("new-standby");
    standby.wait_for_catchup(&new);
    old.stop(StopMode::Immediate);
    let run = rewind_server(&old, &conninfo_as(&standby, "rewinder"), &[]);
    assert!(run.success(), "{}", context(&run, &[&old, &new, &standby]));
    assert!(run.rewind_needed(), "{}", run.show());
    let label = std::fs::read_to_string(old.data_dir().join("backup_label")).unwrap();
    assert!(label.contains("BACKUP FROM: standby"), "{label}");
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
});

// The four-grants role from the primary while pgbench writes on it the whole time: pages are
// copied while they change, and replay from the control file's redo repairs them. A role
// without the grants is refused first, with the GRANT it lacks, and nothing changes.
pg_test!(four_grants_under_pgbench_load, |major| {
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    create_rewind_role(&new, "rewinder");
    new.execute("CREATE ROLE nogrants LOGIN");
    old.stop(StopMode::Immediate);

    let refused = rewind_server(&old, &conninfo_as(&new, "nogrants"), &[]);
    assert!(!refused.success(), "{}", refused.show());
    assert!(
        refused
            .stderr
            .contains("GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean)"),
        "{}",
        refused.show()
    );
    assert!(refused.stderr.contains("TO nogrants"), "{}", refused.show());

    let run = under_load(&new, || {
        rewind_server(&old, &conninfo_as(&new, "rewinder"), &["--jobs", "3"])
    });
    assert!(run.success(), "{}", context(&run, &[&old, &new]));
    let label = std::fs::read_to_string(old.data_dir().join("backup_label")).unwrap();
    assert!(label.contains("BACKUP METHOD: pg_rewind"), "{label}");
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
});

// TLS as libpq does it: the server demands a client certificate (pg_hba `hostssl … cert`),
// the client verifies the server's against a CA and its name (`sslmode=verify-full`). Without
// its certificate the client is refused.
#[test]
fn tls_verify_full_with_a_client_certificate() {
    let major = PgMajor::V16;
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    let ca = support::Ca::new("failback test CA");
    let (server_cert, server_key) = ca.issue("localhost", false);
    let (client_cert, client_key) = ca.issue("tlsuser", true);
    let data = new.data_dir();
    for (name, bytes) in [
        ("server.crt", &server_cert),
        ("server.key", &server_key),
        ("root.crt", &ca.pem),
    ] {
        // Mode 0600, owned by the server's user: PostgreSQL refuses a key others may read.
        user::write_file(&data.join(name), bytes);
    }
    new.append_conf(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
         ssl_ca_file = 'root.crt'\n",
    );
    let hba = data.join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    user::write_file(
        &hba,
        format!(
            "hostssl all tlsuser 127.0.0.1/32 cert\nhostssl all tlsuser ::1/128 cert\n\
             host all tlsuser all reject\n{rest}"
        ),
    );
    new.execute("CREATE ROLE tlsuser LOGIN SUPERUSER");
    new.restart();
    old.stop(StopMode::Immediate);

    let dir = tempfile::tempdir().unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.path().join("ca.crt"),
        dir.path().join("client.crt"),
        dir.path().join("client.key"),
    );
    std::fs::write(&ca_path, &ca.pem).unwrap();
    std::fs::write(&cert_path, &client_cert).unwrap();
    std::fs::write(&key_path, &client_key).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let base = format!(
        "host=localhost port={} user=tlsuser dbname=postgres sslmode=verify-full sslrootcert={}",
        new.port(),
        ca_path.display()
    );
    let refused = rewind_server(&old, &format!("{base} sslcert=/nonexistent"), &[]);
    assert!(!refused.success(), "{}", refused.show());
    assert!(
        refused
            .stderr
            .contains("could not connect to the source server"),
        "{}",
        refused.show()
    );
    let run = rewind_server(
        &old,
        &format!(
            "{base} sslcert={} sslkey={}",
            cert_path.display(),
            key_path.display()
        ),
        &["-R"],
    );
    assert!(run.success(), "{}", context(&run, &[&old, &new]));
    let auto = std::fs::read_to_string(old.data_dir().join("postgresql.auto.conf")).unwrap();
    // -R's primary_conninfo keeps the TLS settings the rewind connected with.
    for part in ["sslmode=''verify-full''", "sslcert=", "sslrootcert="] {
        assert!(auto.contains(part), "{part}: {auto}");
    }
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
}

// The link to the source stops forwarding mid-copy, connections left open (a hung server, a
// black-holed route): the rewind ends with the timeout error within --timeout instead of
// hanging, resumable; once the source answers again a second run finishes it.
#[test]
fn a_stalled_source_ends_within_the_timeout() {
    let major = PgMajor::V15;
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    create_rewind_role(&new, "rewinder");
    old.stop(StopMode::Immediate);
    let proxy = TcpCut::start(format!("127.0.0.1:{}", new.port()).parse().unwrap());
    let through = format!(
        "host=127.0.0.1 port={} user=rewinder dbname=postgres",
        proxy.port()
    );
    let timeout = 6;
    // The programs under test are built by the first run of a test process, which can take
    // minutes: not while the clock below runs, or the stall would hit the build instead.
    failback_tests::programs::failback();
    let (run, stalled_at) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            rewind_server(
                &old,
                &through,
                &["--timeout", &timeout.to_string(), "--jobs", "2"],
            )
        });
        // The first connection asks the questions; more open once the source's files are
        // hashed or read. The server says when (asked directly, not through the proxy).
        let sessions = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'rewinder'";
        let t0 = Instant::now();
        while new.query_one(sessions).parse::<u32>().unwrap() < 2 && !t.is_finished() {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the rewind opened fewer than two sessions in 2 minutes"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        proxy.stall(true);
        let at = Instant::now();
        let run = t.join().unwrap();
        (run, at.elapsed())
    });
    proxy.stall(false);
    assert!(!run.success(), "{}", run.show());
    assert!(
        run.stderr.contains("made no progress"),
        "{}",
        context(&run, &[&old, &new])
    );
    assert!(
        stalled_at < Duration::from_secs(timeout + 10),
        "the rewind took {stalled_at:?} to give up on a stalled source with --timeout {timeout}"
    );
    assert_unfinished(&mut old);
    let again = rewind_server(&old, &conninfo_as(&new, "rewinder"), &[]);
    assert!(again.success(), "{}", context(&again, &[&old, &new]));
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
}

// Killed with SIGKILL half-way through the copy while pgbench writes on the source; a second
// run resumes (planning again inside a new window) and the node rejoins with identical data.
#[test]
fn killed_mid_copy_then_resumed_under_load() {
    let major = PgMajor::V15;
    let (mut old, mut new) = diverged_with_tens_of_mb(major);
    old.stop(StopMode::Immediate);
    let args: Vec<OsString> = vec![
        "rewind".into(),
        "-D".into(),
        old.data_dir().into(),
        "--source-server".into(),
        new.conninfo().into(),
        "--pg-bindir".into(),
        old.bins().bin_dir.clone().into(),
    ];
    let killed = under_load(&new, || {
        run_failback_with(
            &args,
            None,
            &[("FAILBACK_FAULT", &format!("kill-after-bytes={}", 24 << 20))],
        )
    });
    assert_eq!(killed.status.signal(), Some(9), "{}", killed.show());
    assert_unfinished(&mut old);
    new.execute("INSERT INTO t SELECT g, 'after the kill' FROM generate_series(100001, 101000) g");
    let run = under_load(&new, || rewind_server(&old, &new.conninfo(), &[]));
    assert!(run.success(), "{}", context(&run, &[&old, &new]));
    assert_eq!(run.report()["resumed"], true, "{}", run.show());
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE v = 'after the kill'"),
        "1000"
    );
}
