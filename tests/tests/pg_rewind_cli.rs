//! failback invoked as `pg_rewind` (through a symlink of that name), side by side with
//! PostgreSQL 15's own pg_rewind where the machine has it: the same exit statuses, nothing on
//! stdout but `--help` and `--version`, the same stderr lines for usage errors, the divergence,
//! "no rewind required" and a missing target WAL segment; and, for targets of versions whose
//! `postgres` is nowhere pg_rewind or Debian would look (13, 17, 18 from npm), crash recovery
//! and `-c` run with the target's own `postgres`, found through its `postmaster.opts`.
//! And `--source-server` with `-R`, as the orchestrators call it.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use failback_tests::rewind::{
    self, FAILBACK_TIMEOUT, promote, rejoin, start_rejoined, stop_for_rewind,
};
use failback_tests::run::run_with_timeout;
use failback_tests::{Cluster, ClusterOptions, PgMajor, StopMode, binaries, user};

/// A directory holding `pg_rewind`, a symlink to this build's failback (made once per test
/// process, in a directory of its own).
fn pg_rewind_link() -> &'static Path {
    static LINK: OnceLock<PathBuf> = OnceLock::new();
    LINK.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("failback-as-pg_rewind-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let link = dir.join("pg_rewind");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(failback_tests::programs::failback(), &link).unwrap();
        link
    })
}

/// One run of either program.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// Stderr with argv[0] (which getopt's complaints start with) made neutral.
    fn stderr_without(&self, argv0: &Path) -> String {
        self.stderr.replace(&argv0.display().to_string(), "ARGV0")
    }
}

fn run(mut cmd: Command) -> Ran {
    let out = run_with_timeout(&mut cmd, FAILBACK_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    Ran {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

/// failback as pg_rewind, as this test's user (root in CI: failback keeps the data
/// directory's ownership).
fn ours(args: &[OsString]) -> Ran {
    let mut cmd = Command::new(pg_rewind_link());
    user::clean_env(&mut cmd);
    cmd.args(args).current_dir("/");
    run(cmd)
}

/// PostgreSQL 15's pg_rewind, as PostgreSQL's user (it refuses root).
fn theirs(args: &[OsString]) -> Ran {
    let mut cmd = user::command(binaries::pg_rewind());
    cmd.args(args);
    run(cmd)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn local_args(target: &Cluster, source: &Cluster, more: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "-D".into(),
        target.data_dir().into(),
        "--source-pgdata".into(),
        source.data_dir().into(),
    ];
    a.extend(more.iter().map(OsString::from));
    a
}

/// The `pg_rewind: ` lines of a run that start with `prefix`.
fn lines_starting<'a>(stderr: &'a str, prefix: &str) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| l.starts_with(&format!("pg_rewind: {prefix}")))
        .collect()
}

#[test]
fn help_version_and_usage_errors_match_pg_rewind() {
    // --help: exit 0, the help on stdout only (Patroni probes with it).
    for args in [&["--help"][..], &["-?"]] {
        let (a, b) = (ours(&os(args)), theirs(&os(args)));
        assert_eq!(a.code, Some(0), "{}", a.show());
        assert_eq!(b.code, Some(0), "{}", b.show());
        assert!(
            a.stdout.contains("--target-pgdata") && a.stderr.is_empty(),
            "{}",
            a.show()
        );
        assert!(a.stdout.starts_with("pg_rewind "), "{}", a.show());
    }
    // --version: one line starting with pg_rewind, without claiming to be PostgreSQL.
    for args in [&["-V"][..], &["--version"]] {
        let (a, b) = (ours(&os(args)), theirs(&os(args)));
        assert_eq!(
            (a.code, b.code),
            (Some(0), Some(0)),
            "{}\n{}",
            a.show(),
            b.show()
        );
        assert!(
            b.stdout.starts_with("pg_rewind (PostgreSQL) 15"),
            "{}",
            b.show()
        );
        assert!(a.stdout.starts_with("pg_rewind (failback "), "{}", a.show());
        assert!(!a.stdout.contains("PostgreSQL)"), "{}", a.show());
        assert_eq!(a.stdout.lines().count(), 1, "{}", a.show());
        assert!(a.stderr.is_empty());
    }
    // Usage errors: exit 1, nothing on stdout, the very same stderr (argv[0] aside). Every
    // option named here is in PostgreSQL 15 (--sync-method came in 17).
    let cases: [&[&str]; 13] = [
        &["--bogus"],
        &["--bogus=1"],
        &["-x"],
        &["-nQ"],
        &["-D"],
        &["--target-pgdata"],
        &["--dry-run=yes"],
        &["--source"],
        &["--no"],
        &["--source-pgdata=/nonexistent"],
        &["-D", "/nonexistent"],
        &["-R", "-D", "/x", "--source-pgdata=/y"],
        &["-D", "/x", "--source-pgdata=/y", "extra"],
    ];
    let more: [&[&str]; 4] = [
        &["-D", "/x", "--help"],
        &["-D", "/x", "-V"],
        &["--source-pgdata=/a", "--source-server=host=b"],
        &["-D", "/x", "--source-pgdata=/y", "--", "-n"],
    ];
    for args in cases.iter().chain(more.iter()) {
        let (a, b) = (ours(&os(args)), theirs(&os(args)));
        assert_eq!(a.code, Some(1), "{args:?}: {}", a.show());
        assert_eq!(b.code, Some(1), "{args:?}: {}", b.show());
        assert!(a.stdout.is_empty(), "{args:?}: {}", a.show());
        assert_eq!(
            a.stderr_without(pg_rewind_link()),
            b.stderr_without(&binaries::pg_rewind()),
            "{args:?}"
        );
        assert!(
            a.stderr
                .ends_with("pg_rewind: hint: Try \"pg_rewind --help\" for more information.\n"),
            "{args:?}: {}",
            a.show()
        );
    }
}

/// A failed-over PostgreSQL 15 pair, both shut down: the old primary wrote after the fork.
fn diverged_15() -> (Cluster, Cluster) {
    let mut old = Cluster::start_new(PgMajor::V15, "old");
    old.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, 'common' FROM generate_series(1, 5000) i",
    );
    let mut new = old.create_standby("new");
    promote(&old, &new);
    old.execute("UPDATE t SET v = 'lost on old' WHERE id % 3 = 0; CREATE TABLE only_old (x int)");
    new.execute("UPDATE t SET v = 'kept on new' WHERE id % 5 = 0; CREATE TABLE only_new (x int)");
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);
    (old, new)
}

// A rewind from --source-pgdata: pg_rewind's dry run and failback's real run say where the
// servers diverged alike, failback says "Done!", prints nothing on stdout, exits 0, and the
// old primary rejoins with the new primary's data. With -P, pg_rewind's phases and copy lines.
#[test]
fn rewinds_from_a_source_pgdata_like_pg_rewind() {
    let (mut old, mut new) = diverged_15();
    let b = theirs(&local_args(&old, &new, &["-n"]));
    assert_eq!(b.code, Some(0), "{}", b.show());
    let a = ours(&local_args(&old, &new, &["-P"]));
    assert_eq!(a.code, Some(0), "{}", a.show());
    assert!(a.stdout.is_empty(), "{}", a.show());
    let diverged = lines_starting(&b.stderr, "servers diverged at WAL location ");
    assert_eq!(diverged.len(), 1, "{}", b.show());
    assert_eq!(
        lines_starting(&a.stderr, "servers diverged at WAL location "),
        diverged,
        "{}",
        a.show()
    );
    assert_eq!(
        a.stderr.lines().last(),
        Some("pg_rewind: Done!"),
        "{}",
        a.show()
    );
    for phase in [
        "reading source file list",
        "reading target file list",
        "reading WAL in target",
        "need to copy ",
        "syncing target data directory",
        "creating backup label and updating control file",
        "rewinding from the source's checkpoint at ",
    ] {
        assert_eq!(
            lines_starting(&a.stderr, phase).len(),
            1,
            "{phase}: {}",
            a.show()
        );
    }
    assert!(a.stderr.contains("kB (100%) copied\n"), "{}", a.show());
    assert!(!a.stderr.contains("failback:"), "{}", a.show());
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE v = 'lost on old'"),
        "0"
    );

    // Without -P: pg_rewind's unconditional lines only (and failback's one line on where the
    // rewound node's replay starts).
    let (mut old, mut new) = diverged_15();
    let a = ours(&local_args(&old, &new, &[]));
    assert_eq!(a.code, Some(0), "{}", a.show());
    assert!(a.stdout.is_empty());
    let kinds: Vec<&str> = a.stderr.lines().collect();
    assert_eq!(kinds.len(), 3, "{}", a.show());
    assert!(kinds[0].starts_with("pg_rewind: servers diverged at WAL location "));
    assert!(kinds[1].starts_with("pg_rewind: rewinding from the source's checkpoint at "));
    assert_eq!(kinds[2], "pg_rewind: Done!");
    rejoin(&mut old, &mut new);
}

// A switchover: the old primary shut down cleanly before the promotion, so its WAL ends at the
// switch point: both say where the servers diverged and "no rewind required", exit 0. Then the
// segment holding the old primary's last checkpoint is gone from its pg_wal: both fail with
// pg_rewind's exact line, the one Patroni parses to fetch the segment itself.
#[test]
fn no_rewind_required_and_a_missing_segment_like_pg_rewind() {
    let mut old = Cluster::start_new(PgMajor::V15, "old");
    old.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let mut new = old.create_standby("new");
    new.wait_for_catchup(&old);
    old.stop(StopMode::Fast);
    new.promote();
    new.execute("INSERT INTO t SELECT generate_series(1, 10)");
    new.stop(StopMode::Fast);

    let b = theirs(&local_args(&old, &new, &[]));
    let a = ours(&local_args(&old, &new, &[]));
    for r in [&a, &b] {
        assert_eq!(r.code, Some(0), "{}", r.show());
        assert!(r.stdout.is_empty(), "{}", r.show());
        assert_eq!(
            lines_starting(&r.stderr, "no rewind required").len(),
            1,
            "{}",
            r.show()
        );
    }
    assert_eq!(
        lines_starting(&a.stderr, "servers diverged at WAL location "),
        lines_starting(&b.stderr, "servers diverged at WAL location "),
        "{}\n{}",
        a.show(),
        b.show()
    );

    // The old primary's checkpoint record's segment, moved aside.
    let control = rewind::control_file(&old);
    let seg = rewind::wal_file_name_at(1, control.checkPoint, control.xlog_seg_size);
    let wal = old.data_dir().join("pg_wal").join(&seg);
    fs::rename(&wal, old.base_dir().join(&seg)).unwrap();
    let b = theirs(&local_args(&old, &new, &[]));
    let a = ours(&local_args(&old, &new, &[]));
    let expected = format!(
        "pg_rewind: error: could not open file \"{}\": No such file or directory",
        wal.display()
    );
    for r in [&a, &b] {
        assert_eq!(r.code, Some(1), "{}", r.show());
        assert!(r.stdout.is_empty(), "{}", r.show());
        assert!(
            r.stderr.lines().any(|l| l == expected),
            "{expected}\n{}",
            r.show()
        );
    }
    fs::rename(old.base_dir().join(&seg), &wal).unwrap();
    old.configure_as_standby_of(&new);
    start_rejoined(&mut old, &mut new);
}

// A crashed old primary of a version whose postgres is in none of the places pg_rewind or
// Debian would look (npm's, in the test bed's cache): crash recovery runs with the postgres
// its postmaster.opts names, then the rewind; the node rejoins with the new primary's data.
fn crashed_target(major: PgMajor) {
    let mut old = Cluster::start_new(major, "old");
    old.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let mut new = old.create_standby("new");
    promote(&old, &new);
    old.execute("INSERT INTO t SELECT generate_series(1, 5000); CREATE TABLE crashed (x int)");
    new.execute("DELETE FROM t WHERE i < 100");
    stop_for_rewind(&mut old, &mut new, StopMode::Immediate);
    let a = ours(&local_args(&old, &new, &[]));
    assert_eq!(a.code, Some(0), "{}", a.show());
    assert!(a.stdout.is_empty(), "{}", a.show());
    let line = lines_starting(&a.stderr, "executing \"");
    assert_eq!(line.len(), 1, "{}", a.show());
    let used = line[0]
        .split('"')
        .nth(1)
        .expect("the line quotes the postgres it ran");
    assert!(
        line[0].ends_with("\" for target server to complete crash recovery"),
        "{}",
        a.show()
    );
    assert_eq!(
        fs::canonicalize(used).unwrap(),
        fs::canonicalize(old.bins().postgres()).unwrap(),
        "{}",
        a.show()
    );
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_one("SELECT count(*) FROM pg_class WHERE relname = 'crashed'"),
        "0"
    );
}

#[test]
fn crashed_target_13_recovers_with_its_own_postgres() {
    crashed_target(PgMajor::V13);
}

#[test]
fn crashed_target_17_recovers_with_its_own_postgres() {
    crashed_target(PgMajor::V17);
}

#[test]
fn crashed_target_18_recovers_with_its_own_postgres() {
    crashed_target(PgMajor::V18);
}

// -c on PostgreSQL 18: the old primary's WAL since the fork is only in its archive. Without
// -c failback does better than pg_rewind (which fails): it compares chunk hashes, and says so
// in one line. With -c it reads restore_command from the target's configuration with 18's own
// postgres and takes the changes from the restored WAL.
#[test]
fn restore_target_wal_reads_restore_command_of_18() {
    let options = ClusterOptions::default().archive().wal_segment_size_mb(1);
    let mut old = Cluster::start_new_with(PgMajor::V18, "old", options);
    old.execute("CREATE TABLE t (i int, v text); INSERT INTO t SELECT i, 'common' FROM generate_series(1, 1000) i");
    let mut new = old.create_standby("new");
    let new_tli = promote(&old, &new);
    for _ in 0..2 {
        old.execute(
            "INSERT INTO t SELECT i, repeat('o', 200) FROM generate_series(1, 3000) i;
             SELECT pg_switch_wal()",
        );
    }
    new.execute("INSERT INTO t SELECT i, 'new' FROM generate_series(1, 100) i");
    stop_for_rewind(&mut old, &mut new, StopMode::Fast);
    let seg = 1 << 20;
    let first = rewind::wal_file_name_at(1, rewind::switch_point(&new, new_tli), seg);
    let archive = old.archive_dir().unwrap();
    for name in rewind::wal_segments(&old.data_dir()) {
        if name.as_str() >= first.as_str() {
            let from = old.data_dir().join("pg_wal").join(&name);
            let to = archive.join(&name);
            if !to.exists() {
                fs::copy(&from, &to).unwrap();
                user::give(&to);
            }
            fs::remove_file(&from).unwrap();
        }
    }
    old.append_conf(&format!(
        "restore_command = 'cp {}/%f %p'",
        archive.display()
    ));

    let a = ours(&local_args(&old, &new, &["-n"]));
    assert_eq!(a.code, Some(0), "{}", a.show());
    assert!(
        lines_starting(
            &a.stderr,
            "the target's changes are found by comparing chunk hashes"
        )
        .len()
            == 1,
        "{}",
        a.show()
    );
    let a = ours(&local_args(&old, &new, &["-c", "-P"]));
    assert_eq!(a.code, Some(0), "{}", a.show());
    assert!(a.stdout.is_empty(), "{}", a.show());
    assert_eq!(
        lines_starting(&a.stderr, "the target's WAL names ").len(),
        1,
        "{}",
        a.show()
    );
    rejoin(&mut old, &mut new);
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE v = 'new'"),
        "100"
    );
}

// --source-server and -R, as Patroni, repmgr, CloudNativePG and pg_auto_failover call it: the
// new primary running, the old one rewound from it, the standby configuration written.
#[test]
fn rewinds_from_a_source_server() {
    let mut old = Cluster::start_new(PgMajor::V15, "old");
    old.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let mut new = old.create_standby("new");
    promote(&old, &new);
    old.execute("INSERT INTO t SELECT generate_series(1, 5000)");
    new.execute("DELETE FROM t WHERE i < 100");
    old.stop(StopMode::Fast);
    let args: Vec<OsString> = vec![
        "-P".into(),
        "--source-server".into(),
        new.conninfo().into(),
        "--target-pgdata".into(),
        old.data_dir().into(),
        "-R".into(),
    ];
    let a = ours(&args);
    assert_eq!(a.code, Some(0), "{}", a.show());
    assert!(a.stdout.is_empty(), "{}", a.show());
    // Both lines pg_rewind says there: no WAL summaries, so rewound pg_rewind's way.
    for line in [
        "connected to server",
        "rewinding from last common checkpoint at ",
    ] {
        assert_eq!(
            lines_starting(&a.stderr, line).len(),
            1,
            "{line}: {}",
            a.show()
        );
    }
    assert_eq!(
        a.stderr.lines().last(),
        Some("pg_rewind: Done!"),
        "{}",
        a.show()
    );
    assert!(old.data_dir().join("standby.signal").exists());
    start_rejoined(&mut old, &mut new);
}

// A --source-server that cannot be used (nothing listens there) is an error in pg_rewind's
// form, exit 1.
#[test]
fn an_unusable_source_server_is_an_error() {
    let a = ours(&os(&[
        "-D",
        "/nonexistent",
        "--source-server",
        "host=/nonexistent",
    ]));
    assert_eq!(a.code, Some(1), "{}", a.show());
    assert!(a.stdout.is_empty());
    assert!(a.stderr.starts_with("pg_rewind: error: "), "{}", a.show());
}
