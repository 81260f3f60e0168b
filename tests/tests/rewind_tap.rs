//! pg_rewind's own TAP scenarios (`src/bin/pg_rewind/t/`, REL_18_STABLE), translated to
//! `failback rewind` with a local source and run for every major version 13–18.
//!
//! Where upstream's `RewindTest.pm` stops the old primary in immediate mode before a local
//! rewind (so that the tool runs crash recovery first), so do these; where upstream uses a
//! running source over libpq (007, 008), the source here is the same node shut down cleanly.
//! Each test checks what upstream checks, and then that the rewound node rejoins and holds the
//! same data as its new upstream.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use failback_tests::rewind::{
    self, TreeDigest, assert_refused, failover_and_rewind, promote, rejoin, rewind, rewind_ok,
    stop_for_rewind,
};
use failback_tests::{Cluster, ClusterOptions, StopMode, assert_same_data, pg_test, user};

// 001_basic: a table extended (trunc_tbl), one shrunk by DELETE + VACUUM (tail_tbl), one
// dropped (drop_tbl) on the old primary, one in a tablespace written on both (space_tbl); the
// refusals upstream checks first (running target, with and without --no-ensure-shutdown;
// running source) and a dry run that changes nothing. The rewind runs with --no-sync, --debug
// and --config-file, as upstream's local mode does.
pg_test!(t001_basic, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    primary.create_tablespace("space_test");
    primary.execute(
        "CREATE TABLE space_tbl (d text) TABLESPACE space_test;
         INSERT INTO space_tbl VALUES ('in primary, before promotion');
         CREATE TABLE tbl1 (d text); INSERT INTO tbl1 VALUES ('in primary');
         CREATE TABLE trunc_tbl (d text); INSERT INTO trunc_tbl VALUES ('in primary');
         CREATE TABLE tail_tbl (id integer, d text); INSERT INTO tail_tbl VALUES (0, 'in primary');
         CREATE TABLE drop_tbl (d text); INSERT INTO drop_tbl VALUES ('in primary')",
    );
    primary.execute("CHECKPOINT");
    let mut standby = primary.create_standby("standby");
    primary.execute(
        "INSERT INTO tbl1 values ('in primary, before promotion');
         INSERT INTO trunc_tbl values ('in primary, before promotion');
         INSERT INTO tail_tbl SELECT g, 'in primary, before promotion: ' || g
             FROM generate_series(1, 10000) g",
    );
    primary.execute("CHECKPOINT");
    promote(&primary, &standby);

    primary.execute("INSERT INTO tbl1 VALUES ('in primary, after promotion')");
    standby.execute("INSERT INTO tbl1 VALUES ('in standby, after promotion')");
    primary.execute(
        "INSERT INTO trunc_tbl SELECT 'in primary, after promotion: ' || g
         FROM generate_series(1, 10000) g",
    );
    primary.execute("DELETE FROM tail_tbl WHERE id > 10");
    primary.execute("VACUUM tail_tbl");
    primary.execute("insert into drop_tbl values ('in primary, after promotion')");
    primary.execute("DROP TABLE drop_tbl");
    primary.execute("INSERT INTO space_tbl VALUES ('in primary, after promotion')");
    standby.execute("INSERT INTO space_tbl VALUES ('in standby, after promotion')");

    // The refusals and the dry run of upstream's local mode.
    let run = rewind(&primary, &standby, &["--debug", "--no-sync"]);
    assert_refused(&run, &["target server is running"], &[&primary, &standby]);
    let run = rewind(
        &primary,
        &standby,
        &["--debug", "--no-sync", "--no-ensure-shutdown"],
    );
    assert_refused(&run, &["target server is running"], &[&primary, &standby]);
    primary.stop(StopMode::Fast);
    let run = rewind(
        &primary,
        &standby,
        &["--debug", "--no-sync", "--no-ensure-shutdown"],
    );
    assert_refused(
        &run,
        &["source data directory must be shut down cleanly"],
        &[&primary, &standby],
    );
    standby.stop(StopMode::Fast);
    let before = TreeDigest::of(&primary.data_dir());
    let run = rewind_ok(&primary, &standby, &["--debug", "--no-sync", "--dry-run"]);
    assert!(run.rewind_needed(), "{}", run.show());
    before.assert_unchanged(&TreeDigest::of(&primary.data_dir()), "--dry-run");
    standby.start();
    primary.start();

    // The configuration the old primary runs with, kept outside its data directory (the
    // rewind replaces postgresql.conf with the source's).
    let conf = primary.base_dir().join("primary-postgresql.conf");
    fs::copy(primary.data_dir().join("postgresql.conf"), &conf).unwrap();
    user::give(&conf);
    let conf_arg = format!("--config-file={}", conf.display());
    failover_and_rewind(
        &mut primary,
        &mut standby,
        StopMode::Immediate,
        &["--debug", "--no-sync", &conf_arg],
    );

    assert_eq!(
        primary.query_lines("SELECT * FROM space_tbl ORDER BY d"),
        "in primary, before promotion\nin standby, after promotion"
    );
    assert_eq!(
        primary.query_lines("SELECT * FROM tbl1 ORDER BY d"),
        "in primary\nin primary, before promotion\nin standby, after promotion"
    );
    assert_eq!(
        primary.query_lines("SELECT * FROM trunc_tbl ORDER BY d"),
        "in primary\nin primary, before promotion"
    );
    assert_eq!(primary.query_one("SELECT count(*) FROM tail_tbl"), "10001");
    assert_eq!(primary.query_lines("SELECT * FROM drop_tbl"), "in primary");
    rewind::assert_owned_by_pg_user(&primary);
    let mode = fs::metadata(primary.data_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
});

// 002_databases, with group access (initdb -g): databases created at each stage on each side;
// the rewound node has the new primary's, and modes 0750/0640.
pg_test!(t002_databases, |major| {
    let options = ClusterOptions::default().group_access();
    let mut primary = Cluster::start_new_with(major, "primary", options);
    primary.execute("CREATE DATABASE inprimary");
    let mut standby = primary.create_standby("standby");
    primary.execute("CREATE DATABASE beforepromotion");
    promote(&primary, &standby);
    primary.execute("CREATE DATABASE primary_afterpromotion");
    standby.execute("CREATE DATABASE standby_afterpromotion");

    stop_for_rewind(&mut primary, &mut standby, StopMode::Immediate);
    rewind_ok(&primary, &standby, &["--debug"]);
    // Checked before the test bed writes the standby configuration (always 0600).
    let mode = fs::metadata(primary.data_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o750);
    rewind::assert_owned_by_pg_user(&primary);
    rejoin(&mut primary, &mut standby);
    assert_eq!(
        primary.query_lines("SELECT datname FROM pg_database ORDER BY 1"),
        "beforepromotion\ninprimary\npostgres\nstandby_afterpromotion\ntemplate0\ntemplate1"
    );
});

/// Every path below `dir` whose name starts with `tst_`, or lies below such a directory,
/// relative to `dir`.
fn tst_paths(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, rel: &str, inside: bool, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let here = inside || name.starts_with("tst_");
            if here {
                out.push(r.clone());
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() && !ft.is_symlink() {
                walk(&e.path(), &r, here, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", false, &mut out);
    out.sort();
    out
}

// 003_extrafiles: stray files and directories on both sides, only on the new primary (one with
// spaces and quotes in its name, and a `.DS_Store`, which is never copied), and only on the old
// primary. The files only the new primary has are made by root with mode 0644: the copies must
// belong to PostgreSQL's user, with its modes.
pg_test!(t003_extrafiles, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    let p = primary.data_dir();
    user::create_dir(&p.join("tst_both_dir"));
    user::create_dir(&p.join("tst_both_dir/both_subdir"));
    user::write_file(&p.join("tst_both_dir/both_file1"), "in both1");
    user::write_file(&p.join("tst_both_dir/both_file2"), "in both2");
    user::write_file(&p.join("tst_both_dir/both_subdir/both_file3"), "in both3");
    let mut standby = primary.create_standby("standby");

    let s = standby.data_dir();
    let quoted = "file with spaces 'and' \"quotes\"";
    fs::create_dir_all(s.join("tst_standby_dir/standby_subdir")).unwrap();
    for (f, text) in [
        ("tst_standby_dir/standby_file1", "in standby1"),
        ("tst_standby_dir/standby_file2", "in standby2"),
        (
            "tst_standby_dir/standby_subdir/standby_file3",
            "in standby3",
        ),
        (&format!("tst_standby_dir/{quoted}") as &str, "quoted"),
        ("tst_standby_dir/.DS_Store", "macOS"),
    ] {
        fs::write(s.join(f), text).unwrap();
        fs::set_permissions(s.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    user::create_dir(&p.join("tst_primary_dir"));
    user::create_dir(&p.join("tst_primary_dir/primary_subdir"));
    user::write_file(&p.join("tst_primary_dir/primary_file1"), "in primary1");
    user::write_file(&p.join("tst_primary_dir/primary_file2"), "in primary2");
    user::write_file(
        &p.join("tst_primary_dir/primary_subdir/primary_file3"),
        "in primary3",
    );

    promote(&primary, &standby);
    failover_and_rewind(
        &mut primary,
        &mut standby,
        StopMode::Immediate,
        &["--debug"],
    );
    let expected = vec![
        "tst_both_dir".to_string(),
        "tst_both_dir/both_file1".into(),
        "tst_both_dir/both_file2".into(),
        "tst_both_dir/both_subdir".into(),
        "tst_both_dir/both_subdir/both_file3".into(),
        "tst_standby_dir".into(),
        format!("tst_standby_dir/{quoted}"),
        "tst_standby_dir/standby_file1".into(),
        "tst_standby_dir/standby_file2".into(),
        "tst_standby_dir/standby_subdir".into(),
        "tst_standby_dir/standby_subdir/standby_file3".into(),
    ];
    assert_eq!(tst_paths(&primary.data_dir()), expected);
    assert_eq!(
        fs::read_to_string(primary.data_dir().join(format!("tst_standby_dir/{quoted}"))).unwrap(),
        "quoted"
    );
    // The new primary's .DS_Store stays where it is, and only there.
    assert!(
        standby
            .data_dir()
            .join("tst_standby_dir/.DS_Store")
            .exists()
    );
    rewind::assert_owned_by_pg_user(&primary);
});

// 004_pg_xlog_symlink: the old primary's pg_wal is a symlink to a directory outside its data
// directory; the rewind writes through it and keeps it a link.
pg_test!(t004_pg_wal_symlink, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    primary.execute("CREATE TABLE tbl1 (d text); INSERT INTO tbl1 VALUES ('in primary')");
    primary.execute("CHECKPOINT");
    let mut standby = primary.create_standby("standby");
    // Moved only now: a copied standby would otherwise share the directory.
    primary.stop(StopMode::Fast);
    let elsewhere = primary.base_dir().join("wal_elsewhere");
    let link = primary.data_dir().join("pg_wal");
    fs::rename(&link, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    user::give(&link);
    primary.start();
    primary.execute("INSERT INTO tbl1 values ('in primary, before promotion')");
    primary.execute("CHECKPOINT");
    promote(&primary, &standby);
    primary.execute("INSERT INTO tbl1 VALUES ('in primary, after promotion')");
    standby.execute("INSERT INTO tbl1 VALUES ('in standby, after promotion')");

    failover_and_rewind(
        &mut primary,
        &mut standby,
        StopMode::Immediate,
        &["--debug"],
    );
    assert_eq!(
        primary.query_lines("SELECT * FROM tbl1 ORDER BY d"),
        "in primary\nin primary, before promotion\nin standby, after promotion"
    );
    assert_eq!(fs::read_link(&link).unwrap(), elsewhere);
    assert!(
        fs::read_dir(&elsewhere)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("00000002")),
        "the new timeline's WAL went through the link"
    );
    rewind::assert_owned_by_pg_user(&primary);
});

// 005_same_timeline: the source is a standby that was never promoted: nothing to rewind (after
// the crash recovery the immediate stop calls for).
pg_test!(t005_same_timeline, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    primary.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS i");
    let mut standby = primary.create_standby("standby");
    standby.wait_for_catchup(&primary);
    primary.stop(StopMode::Immediate);
    standby.stop(StopMode::Fast);
    let run = rewind_ok(&primary, &standby, &["--debug"]);
    assert!(run.stderr.contains("no rewind required"), "{}", run.show());
    assert!(!run.rewind_needed());
    assert!(!primary.data_dir().join("backup_label").exists());
    primary.start();
    assert_eq!(primary.query_one("SELECT count(*) FROM t"), "100");
});

// 007_standby_source: A → B → C; C is promoted and diverges; C is rewound from standby B
// (shut down) with -R, then follows B again and receives what A writes.
pg_test!(t007_standby_source, |major| {
    let mut a = Cluster::start_new(major, "node_a");
    a.execute("CREATE TABLE tbl1 (d text); INSERT INTO tbl1 VALUES ('in A')");
    a.execute("CHECKPOINT");
    let mut b = a.create_standby("node_b");
    let mut c = b.create_standby("node_c");
    a.execute("INSERT INTO tbl1 values ('in A, before promotion')");
    a.execute("CHECKPOINT");
    b.wait_for_catchup(&a);
    c.wait_for_replay(&b, a.flush_lsn());

    c.promote();
    a.execute("INSERT INTO tbl1 VALUES ('in A, after C was promoted')");
    b.wait_for_catchup(&a);
    c.execute("INSERT INTO tbl1 VALUES ('in C, after C was promoted')");

    c.stop(StopMode::Fast);
    b.stop(StopMode::Fast);
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=node_c",
        b.port()
    );
    let run = rewind_ok(
        &c,
        &b,
        &[
            "--debug",
            "--no-sync",
            "-R",
            "--primary-conninfo",
            &conninfo,
        ],
    );
    assert!(run.rewind_needed(), "{}", run.show());
    assert!(c.data_dir().join("standby.signal").exists());
    b.start();
    c.start();
    c.wait_for_replay(&b, a.flush_lsn());
    assert_eq!(
        c.query_lines("SELECT * FROM tbl1 ORDER BY d"),
        "in A\nin A, after C was promoted\nin A, before promotion"
    );
    a.execute("INSERT INTO tbl1 values ('in A, after rewind')");
    b.wait_for_catchup(&a);
    c.wait_for_replay(&b, a.flush_lsn());
    assert_eq!(
        c.query_lines("SELECT * FROM tbl1 ORDER BY d"),
        "in A\nin A, after C was promoted\nin A, after rewind\nin A, before promotion"
    );
    assert_same_data(&a, &c);
});

// 008_min_recovery_point: node_2 is a standby whose WAL runs past its last restartpoint (it
// replayed node_3's 'rewind this' after node_1 split away from node_3); only minRecoveryPoint
// tells that it must be rewound.
pg_test!(t008_min_recovery_point, |major| {
    let mut node_1 = Cluster::start_new(major, "node_1");
    node_1.execute(
        "CREATE TABLE public.foo (t TEXT); CREATE TABLE public.bar (t TEXT);
         INSERT INTO public.bar VALUES ('in both')",
    );
    let mut node_2 = node_1.create_standby("node_2");
    let mut node_3 = node_1.create_standby("node_3");
    node_2.wait_for_catchup(&node_1);
    node_3.wait_for_catchup(&node_1);
    node_1.stop(StopMode::Fast);
    node_3.promote();

    // node_1 rejoins node_3 (it stopped before the promotion: nothing to rewind); node_2
    // follows node_3.
    node_1.configure_as_standby_of(&node_3);
    node_1.start();
    node_2.stop(StopMode::Fast);
    node_2.configure_as_standby_of(&node_3);
    node_2.start();
    node_1.wait_for_catchup(&node_3);

    // Split brain: node_1 is promoted too.
    assert_eq!(node_1.promote(), 3);
    node_1.execute(
        "INSERT INTO public.foo (t) VALUES ('keep this');
         INSERT INTO public.foo (t) VALUES ('and this');
         INSERT INTO public.foo (t) VALUES ('and this too')",
    );
    node_3.execute("INSERT INTO public.bar (t) VALUES ('rewind this')");
    node_2.wait_for_catchup(&node_3);
    assert_eq!(node_2.query_one("SELECT count(*) FROM public.bar"), "2");

    node_2.stop(StopMode::Fast);
    node_3.stop(StopMode::Fast);
    node_1.stop(StopMode::Fast);
    let control = rewind::control_file(&node_2);
    assert!(
        control.minRecoveryPoint > control.checkPoint,
        "node_2's WAL must run past its restartpoint for this test to mean anything"
    );
    let run = rewind_ok(&node_2, &node_1, &["--debug"]);
    assert!(run.rewind_needed(), "{}", run.show());
    rejoin(&mut node_2, &mut node_1);
    assert_eq!(
        node_2.query_lines("SELECT * FROM public.foo ORDER BY t"),
        "and this\nand this too\nkeep this"
    );
    assert_eq!(node_2.query_lines("SELECT * FROM public.bar"), "in both");
});

// 009_growing_files: a file of the (shut-down) source grows while failback copies it — the
// run's own output is appended to it — so the rewind stops with "size of source file changed
// concurrently" instead of copying a torn file.
pg_test!(t009_growing_files, |major| {
    let mut primary = Cluster::start_new(major, "primary");
    primary.execute("CREATE TABLE tbl1 (d text); INSERT INTO tbl1 VALUES ('in primary')");
    primary.execute("CHECKPOINT");
    let mut standby = primary.create_standby("standby");
    primary.execute("INSERT INTO tbl1 values ('in primary, before promotion')");
    primary.execute("CHECKPOINT");
    promote(&primary, &standby);
    primary.execute("INSERT INTO tbl1 VALUES ('in primary, after promotion')");
    standby.execute("INSERT INTO tbl1 VALUES ('in standby, after promotion')");
    stop_for_rewind(&mut primary, &mut standby, StopMode::Fast);

    let grown = standby.data_dir().join("tst_both_dir/file1");
    fs::create_dir(grown.parent().unwrap()).unwrap();
    fs::write(&grown, "a").unwrap();
    // failback --debug lists the plan, file by file, after the listing and before the copy:
    // with its output appended to file1, file1 grows between the two.
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec "$0" "$@" >>"$FILE" 2>&1"#)
        .arg(failback_tests::programs::failback())
        .args(["rewind", "--debug", "--no-sync", "-D"])
        .arg(primary.data_dir())
        .arg("--source-pgdata")
        .arg(standby.data_dir())
        .arg("--pg-bindir")
        .arg(&primary.bins().bin_dir)
        .env("FILE", &grown);
    let out = failback_tests::run::run_with_timeout(&mut cmd, std::time::Duration::from_secs(300))
        .unwrap();
    let log = fs::read_to_string(&grown).unwrap();
    assert!(!out.status.success(), "the rewind did not fail:\n{log}");
    let copied = primary.data_dir().join("tst_both_dir/file1");
    assert_ne!(
        fs::metadata(&copied).map(|m| m.len()).ok(),
        Some(log.len() as u64),
        "the copy of the growing file has the source's final size"
    );
    let last = log.lines().rev().take(4).collect::<Vec<_>>().join("\n");
    assert!(
        last.contains("error:")
            && last.contains("size of source file \"tst_both_dir/file1\" changed concurrently"),
        "the run must end with the concurrent-change error:\n{last}"
    );
});

// 010_keep_recycled_wals: the old primary's segment holding the last common checkpoint never
// reached its archive (its archive_command fails for it), and the new primary no longer has it
// either (recycled; removed here by hand). pg_rewind must keep it on the old primary, which
// replays from that checkpoint; failback's rewound node replays from the source's checkpoint
// instead and needs it no more, but a segment from before the divergence is the target's own
// and is left alone. Upstream only checks the "not removing" message; here the rewound node must
// also get through recovery.
pg_test!(t010_keep_recycled_wals, |major| {
    let options = ClusterOptions::default().archive();
    let mut primary = Cluster::start_new_with(major, "primary", options);
    let mut standby = primary.create_standby("standby");
    let archive = primary.archive_dir().unwrap();
    standby.stop(StopMode::Fast);
    standby.append_conf(&format!(
        "restore_command = 'cp {}/%f %p'",
        archive.display()
    ));
    standby.start();
    standby.wait_for_catchup(&primary);

    primary.execute("CHECKPOINT"); // the last common checkpoint
    // From now on archiving fails (the server runs as an unprivileged user, who can no longer
    // write into the archive), as upstream's archive_command = false does.
    let segment = primary.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())");
    fs::set_permissions(&archive, fs::Permissions::from_mode(0o500)).unwrap();
    primary.execute("CREATE TABLE t(a int)");
    primary.execute("INSERT INTO t VALUES(0)");
    primary.execute("SELECT pg_switch_wal()");

    promote(&primary, &standby);
    standby.execute("INSERT INTO t values(0)");
    standby.execute("SELECT pg_switch_wal()");
    standby.stop(StopMode::Fast);
    primary.stop(StopMode::Fast);
    fs::set_permissions(&archive, fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        !archive.join(&segment).exists(),
        "{segment} must not have been archived"
    );
    for name in [segment.clone(), format!("{segment}.partial")] {
        let _ = fs::remove_file(standby.data_dir().join("pg_wal").join(name));
    }

    let run = rewind_ok(&primary, &standby, &["--debug", "--no-sync"]);
    let kept =
        format!("pg_wal/{segment} (NONE) -- the target's own WAL from before the divergence: kept");
    assert!(
        run.stderr.contains(&kept),
        "{segment} is not kept:\n{}",
        run.show()
    );
    assert!(primary.data_dir().join("pg_wal").join(&segment).exists());
    rejoin(&mut primary, &mut standby);
    assert_eq!(primary.query_one("SELECT count(*) FROM t"), "2");
});
