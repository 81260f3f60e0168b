//! Running the real HA orchestrators (Patroni with etcd, repmgr) around a binary under test.
//!
//! Orchestrators call pg_rewind by path: Patroni's `postgresql.bin_name.pg_rewind`, repmgr's
//! `node rejoin --force-rewind=PATH`. The orchestrator tests (`tests/orchestrator_*.rs`) hand
//! them a [`RewindBinary`]: a directory of the test's own holding a `pg_rewind` symlink to the
//! binary under test, chosen by `FAILBACK_ORCH_REWIND`:
//!
//! - `failback` (the default): the `failback` binary this test run built ([`programs`]),
//!   which behaves as pg_rewind when invoked under that name. It is copied into the test's
//!   directory first: the orchestrators run it as PostgreSQL's unprivileged user, who may not
//!   be allowed into the cargo target directory (a clone under `/root` in CI).
//! - `pg_rewind`: PostgreSQL 15's own pg_rewind, which proves the harness and the recipes.
//!
//! After the rejoin a test asks [`RewindBinary::assert_ran`] for evidence that this binary,
//! and not some other pg_rewind, did the rewind. The evidence is what the binary itself left:
//! its messages as the orchestrator logged them, and the `backup_label` it wrote (PostgreSQL
//! renames it `backup_label.old` when it starts on it, and keeps it). PostgreSQL's pg_rewind
//! says `pg_rewind: Done!` and labels its backup `BACKUP METHOD: pg_rewind` with no `LABEL:`;
//! failback labels every backup it writes `LABEL: failback rewind` (a window the server opened,
//! or one made from the control file, which also says `BACKUP METHOD: pg_rewind`), and under
//! its own name it names itself in its messages. Either of failback's marks is accepted, as
//! pg_rewind can make neither.
//!
//! The orchestrators come from `.ci/run` (etcd and Patroni under [`CI_DIR`], repmgr from
//! Debian). A missing one fails the test with what to install ([`require`]): CI installs them,
//! so a missing orchestrator is a broken CI, never a skipped proof. Outside CI,
//! `FAILBACK_ORCH_SKIP_MISSING=1` turns that into a skip that says so on stderr.
//!
//! [`Daemon`] runs a long-lived program (etcd, Patroni) with its output in a log file and
//! kills it when dropped, also on panic; [`kill_postmaster`] stops a server an orchestrator
//! started (detached from the test, so only its `postmaster.pid` leads to it); [`PgServer`]
//! runs SQL on a server the test did not start, and fingerprints its data.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use tempfile::TempDir;

use crate::binaries;
use crate::cluster::show_error;
use crate::fingerprint::Fingerprint;
use crate::port::{PortLock, reserve_port};
use crate::programs;
use crate::user;

/// Where `.ci/run` installs what the orchestrator tests run.
pub const CI_DIR: &str = "/opt/failback-ci";

/// etcd, unpacked from Debian's `etcd-server`.
pub fn etcd_program() -> PathBuf {
    Path::new(CI_DIR).join("etcd/usr/bin/etcd")
}

/// A program of the Patroni venv (`patroni`, `patronictl`).
pub fn patroni_program(name: &str) -> PathBuf {
    Path::new(CI_DIR).join("patroni/bin").join(name)
}

/// repmgr of Debian's `postgresql-15-repmgr`.
pub fn repmgr_program() -> PathBuf {
    Path::new(binaries::PG15_BIN).join("repmgr")
}

/// Checks that every `(program, how to get it)` is installed. Returns false when the test
/// should skip (only outside CI with `FAILBACK_ORCH_SKIP_MISSING=1`, said loudly); panics
/// otherwise.
pub fn require(test: &str, programs: &[(PathBuf, &str)]) -> bool {
    let missing: Vec<String> = programs
        .iter()
        .filter(|(p, _)| !p.is_file())
        .map(|(p, how)| format!("  {} ({how})", p.display()))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let what = format!(
        "{test} needs programs that are not installed:\n{}\n`.ci/run` installs them (run it, or \
         its orchestrator steps, as root)",
        missing.join("\n")
    );
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let skip = std::env::var("FAILBACK_ORCH_SKIP_MISSING").is_ok_and(|v| v == "1");
    if skip && !ci {
        eprintln!("\n!!!!! SKIPPED: {what}\n!!!!! (FAILBACK_ORCH_SKIP_MISSING=1)\n");
        return false;
    }
    panic!("{what}; outside CI, FAILBACK_ORCH_SKIP_MISSING=1 skips this test instead");
}

/// Which pg_rewind the orchestrators are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderTest {
    /// failback's own binary, invoked as `pg_rewind`.
    Failback,
    /// PostgreSQL 15's pg_rewind.
    PgRewind,
}

/// The environment variable choosing the binary under test: `failback` (default) or
/// `pg_rewind`.
pub const REWIND_ENV: &str = "FAILBACK_ORCH_REWIND";

/// A `pg_rewind` for orchestrators to run: `<dir>/pg_rewind`, a symlink to the binary under
/// test, in a directory PostgreSQL's user can read.
pub struct RewindBinary {
    pub under_test: UnderTest,
    /// The symlink named `pg_rewind`.
    path: PathBuf,
    /// What the symlink points at.
    target: PathBuf,
    _dir: TempDir,
}

impl RewindBinary {
    /// The binary `FAILBACK_ORCH_REWIND` names (see the module header).
    pub fn from_env() -> RewindBinary {
        let choice = std::env::var(REWIND_ENV).unwrap_or_default();
        let under_test = match choice.as_str() {
            "" | "failback" => UnderTest::Failback,
            "pg_rewind" => UnderTest::PgRewind,
            other => panic!("{REWIND_ENV}={other:?}: say `failback` (the default) or `pg_rewind`"),
        };
        RewindBinary::new(under_test)
    }

    pub fn new(under_test: UnderTest) -> RewindBinary {
        let dir = short_tempdir("fb-bin-");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("could not chmod {}: {e}", dir.path().display()));
        let target = match under_test {
            UnderTest::PgRewind => binaries::pg_rewind(),
            UnderTest::Failback => {
                let copy = dir.path().join("failback");
                fs::copy(programs::failback(), &copy).unwrap_or_else(|e| {
                    panic!(
                        "could not copy {} to {}: {e}",
                        programs::failback().display(),
                        copy.display()
                    )
                });
                fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
                    .unwrap_or_else(|e| panic!("could not chmod {}: {e}", copy.display()));
                copy
            }
        };
        let path = dir.path().join("pg_rewind");
        std::os::unix::fs::symlink(&target, &path)
            .unwrap_or_else(|e| panic!("could not link {}: {e}", path.display()));
        RewindBinary {
            under_test,
            path,
            target,
            _dir: dir,
        }
    }

    /// The path to give the orchestrator: a symlink named `pg_rewind`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Describes the binary for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} -> {} ({:?}; {REWIND_ENV}=failback|pg_rewind chooses)",
            self.path.display(),
            self.target.display(),
            self.under_test
        )
    }

    /// Panics unless the rewind that left `data_dir` was done by this binary: `output` is
    /// what the binary printed as the orchestrator recorded it (empty when the orchestrator
    /// keeps none), `data_dir` the rewound node's, started since. `context` is added to the
    /// message (orchestrator logs).
    pub fn assert_ran(&self, output: &str, data_dir: &Path, context: &str) {
        let label = read_backup_label(data_dir);
        let failbacks = format!("LABEL: {}", failback_common::rewind::WINDOW_LABEL);
        let (ok, expected) = match self.under_test {
            UnderTest::PgRewind => (
                // Both marks: this proves the harness, so it may be strict.
                label.contains("BACKUP METHOD: pg_rewind")
                    && !label.contains(&failbacks)
                    && (output.is_empty() || output.contains("pg_rewind: Done!")),
                "PostgreSQL's pg_rewind: its backup_label says `BACKUP METHOD: pg_rewind` and no \
                 failback label, and its messages (when the orchestrator keeps them) end with `pg_rewind: Done!`",
            ),
            UnderTest::Failback => (
                label.contains(&failbacks) || output.contains("failback"),
                "failback: its backup_label says `LABEL: failback rewind`, or its messages name \
                 failback (PostgreSQL's pg_rewind does neither)",
            ),
        };
        assert!(
            ok,
            "the rewind was not done by the binary under test, {}.\nExpected {expected}.\n\
             backup_label(.old) of {}:\n{label}\nthe binary's output as recorded:\n{output}\n{context}",
            self.describe(),
            data_dir.display()
        );
    }
}

/// The `backup_label` a rewind left: `backup_label.old` once PostgreSQL started on it, or
/// `backup_label` before; a note when there is neither.
pub fn read_backup_label(data_dir: &Path) -> String {
    for name in ["backup_label.old", "backup_label"] {
        if let Ok(text) = fs::read_to_string(data_dir.join(name)) {
            return text;
        }
    }
    format!(
        "(no backup_label or backup_label.old in {})",
        data_dir.display()
    )
}

/// A temporary directory with a short path (unix socket paths are limited to ~100 bytes).
pub fn short_tempdir(prefix: &str) -> TempDir {
    let tmp = std::env::temp_dir();
    let root = if tmp.as_os_str().len() <= 40 {
        tmp
    } else {
        PathBuf::from("/tmp")
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&root)
        .unwrap_or_else(|e| panic!("could not create a directory in {}: {e}", root.display()))
}

/// The last `lines` lines of file `path` (empty if it cannot be read).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A long-running program with stdout and stderr appended to a log file; killed (SIGKILL) and
/// reaped when dropped unless it was stopped before.
pub struct Daemon {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `cmd`, its output appended to `log` (created owned by PostgreSQL's user, so a
    /// daemon running as that user may reopen it).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Daemon {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("could not open {}: {e}", log.display()));
        user::give(log);
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("could not dup a descriptor: {e}"));
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name} ({cmd:?}): {e}"));
        Daemon {
            name: name.to_string(),
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the program still runs (reaps it when it has exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` and waits up to `timeout` for the program to exit; Err (with the log's
    /// tail) when it does not, after which it is killed.
    pub fn stop_with(&mut self, signal: libc::c_int, timeout: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet, so
            // its id cannot have been reused.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} did not exit within {timeout:?} of signal {signal}; killed it. Its \
                         log ({}):\n{}",
                        self.name,
                        self.log.display(),
                        self.log_tail(40)
                    ));
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stops the postmaster whose `postmaster.pid` is in `data_dir` (one an orchestrator started,
/// so not the test's child): SIGQUIT (immediate), then SIGKILL after 10 s. The pid is only
/// signalled while `/proc/<pid>/cmdline` is a `postgres` naming this data directory, so a pid
/// reused by another process is left alone. Never panics (used by Drop).
pub fn kill_postmaster(data_dir: &Path) {
    let Some(pid) = postmaster_pid(data_dir) else {
        return;
    };
    let ours = || {
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("postgres") && c.contains(&*data_dir.to_string_lossy())
        })
    };
    let signal = |sig: libc::c_int| {
        // SAFETY: kill has no memory-safety preconditions; `ours` checked the pid just before.
        unsafe {
            libc::kill(pid, sig);
        }
    };
    if !ours() {
        return;
    }
    signal(libc::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours() {
        if Instant::now() >= deadline {
            signal(libc::SIGKILL);
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Wait out the children the postmaster leaves behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
}

/// The postmaster pid recorded in `data_dir/postmaster.pid`, if any.
pub fn postmaster_pid(data_dir: &Path) -> Option<libc::pid_t> {
    fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A running PostgreSQL server on 127.0.0.1 that the test reaches as superuser `postgres`
/// without a password (its `pg_hba.conf` trusts that user on loopback).
#[derive(Clone, Debug)]
pub struct PgServer {
    pub name: String,
    pub port: u16,
}

impl PgServer {
    pub fn new(name: &str, port: u16) -> PgServer {
        PgServer {
            name: name.to_string(),
            port,
        }
    }

    pub fn try_connect(&self, db: &str) -> Result<Client, postgres::Error> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .application_name("failback-tests")
            .connect_timeout(Duration::from_secs(10))
            .connect(NoTls)
    }

    /// The rows `sql` returns in database `db`, every value as text (NULL is None).
    pub fn try_query_rows(&self, db: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let run = || -> Result<_, postgres::Error> {
            crate::cluster::rows_of(&mut self.try_connect(db)?, sql)
        };
        run().map_err(|e| {
            format!(
                "on '{}' (port {}), database {db}: {}\n{sql}",
                self.name,
                self.port,
                show_error(&e)
            )
        })
    }

    pub fn query_rows_in(&self, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        self.try_query_rows(db, sql)
            .unwrap_or_else(|e| panic!("query failed {e}"))
    }

    /// The single value `sql` returns in database `postgres` (NULL as empty).
    pub fn try_query_one(&self, sql: &str) -> Result<String, String> {
        let rows = self.try_query_rows("postgres", sql)?;
        match rows.as_slice() {
            [row] if row.len() == 1 => Ok(row[0].clone().unwrap_or_default()),
            _ => Err(format!(
                "'{}': {sql} returned {rows:?} where one value was expected",
                self.name
            )),
        }
    }

    pub fn query_one(&self, sql: &str) -> String {
        self.try_query_one(sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `sql` (one or more statements) in database `postgres`.
    pub fn execute(&self, sql: &str) {
        if let Err(e) = self
            .try_connect("postgres")
            .and_then(|mut c| c.batch_execute(sql))
        {
            panic!(
                "SQL failed on '{}' (port {}): {}\n{sql}",
                self.name,
                self.port,
                show_error(&e)
            );
        }
    }

    /// Whether the server accepts connections and is in recovery (Err: it does not answer).
    pub fn in_recovery(&self) -> Result<bool, String> {
        self.try_query_one("SELECT pg_is_in_recovery()")
            .map(|v| v == "t")
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_with(&self.name, |db, sql| self.query_rows_in(db, sql))
    }

    /// Waits until this standby streams from a primary on timeline `tli` and has replayed
    /// `primary`'s current write position; Err says where it stands.
    pub fn wait_for_catchup(&self, primary: &PgServer, timeout: Duration) -> Result<(), String> {
        let target = primary.query_one("SELECT pg_current_wal_lsn()");
        let tli = primary.query_one("SELECT timeline_id FROM pg_control_checkpoint()");
        let sql = format!(
            "SELECT (pg_last_wal_replay_lsn() >= '{target}'::pg_lsn)::text || ' ' || \
             coalesce((SELECT received_tli::text || ' ' || status FROM pg_stat_wal_receiver), \
             'no-receiver') || ' ' || coalesce(pg_last_wal_replay_lsn()::text, '')"
        );
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_query_one(&sql) {
                Ok(v) => {
                    let parts: Vec<&str> = v.split(' ').collect();
                    if parts.first() == Some(&"true")
                        && parts.get(1) == Some(&tli.as_str())
                        && parts.get(2) == Some(&"streaming")
                    {
                        return Ok(());
                    }
                    v
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "'{}' did not catch up with '{}' (write position {target}, timeline {tli}) \
                     within {timeout:?}; last seen (replayed?, receiver timeline and status, \
                     replay position): {last}",
                    self.name, primary.name
                ));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Panics, listing every difference, unless `a` and `b` hold the same data; returns the
/// number of tables compared.
pub fn assert_same_data_on(a: &PgServer, b: &PgServer, context: &str) -> usize {
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    let diff = fa.diff(&fb, &a.name, &b.name);
    assert!(
        diff.is_empty(),
        "'{}' and '{}' hold different data:\n{diff}\n{context}",
        a.name,
        b.name
    );
    fa.table_count()
}

impl PgServer {
    /// `pgbench <args> postgres` against this server, as the superuser over TCP.
    pub fn pgbench(&self, args: &[&str]) {
        let mut cmd = Command::new(binaries::pgbench());
        user::clean_env(&mut cmd);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &self.port.to_string(),
        ])
        .args(args)
        .arg("postgres");
        crate::run::run_ok(&mut cmd, Duration::from_secs(300));
    }

    /// The data both nodes of an orchestrator test share before the failover: pgbench's
    /// tables (scale 2), `shared_rows` (20,000 rows) and `dropped`, a table the old primary
    /// drops after the split.
    pub fn create_shared_data(&self, dropped: &str) {
        self.pgbench(&["-i", "-q", "-s", "2"]);
        self.execute(&format!(
            "CREATE TABLE shared_rows (id int PRIMARY KEY, v text);
             INSERT INTO shared_rows
                 SELECT g, 'before the failover ' || g FROM generate_series(1, 20000) g;
             CREATE TABLE {dropped} AS SELECT g AS id FROM generate_series(1, 5000) g;"
        ));
    }
}

/// Waits until `replica` streams from `primary` on the primary's current timeline: what an
/// orchestrator's rejoin must end in.
pub fn wait_streaming(
    what: &str,
    replica: &PgServer,
    primary: &PgServer,
    timeout: Duration,
    context: impl FnOnce() -> String,
) {
    wait_for(
        what,
        timeout,
        || {
            (replica
                .try_query_one("SELECT status || ' ' || received_tli FROM pg_stat_wal_receiver")
                .ok()?
                == format!(
                    "streaming {}",
                    primary.query_one("SELECT timeline_id FROM pg_control_checkpoint()")
                ))
            .then_some(())
        },
        context,
    );
}

/// The proof of a rejoin: a row written on `primary` now reaches `replica`, which is in
/// recovery; every table is the same on both (at least six: the test's own are there); and no
/// row of `shared_rows` marked `lost` (written only on the old primary after the split)
/// survived. Returns the number of tables compared.
pub fn assert_rejoined(
    primary: &PgServer,
    replica: &PgServer,
    lost: &str,
    context: impl Fn() -> String,
) -> usize {
    primary.execute("INSERT INTO shared_rows VALUES (50000, 'after the rejoin')");
    replica
        .wait_for_catchup(primary, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", context()));
    assert_eq!(
        replica.in_recovery(),
        Ok(true),
        "'{}' is not a standby\n{}",
        replica.name,
        context()
    );
    let tables = assert_same_data_on(primary, replica, &context());
    assert!(
        tables >= 6,
        "only {tables} tables compared: the test's own tables are missing"
    );
    assert_eq!(
        replica.query_one(&format!(
            "SELECT count(*) FROM shared_rows WHERE v = '{lost}'"
        )),
        "0",
        "'{}' kept rows only it had written",
        replica.name
    );
    tables
}

/// Polls `check` every 200 ms until it returns Some, or panics after `timeout` with `what`
/// and `context()` (orchestrator logs, computed only then).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// etcd alone on two loopback ports of its own, its data in a directory of its own; stopped
/// and removed when dropped.
pub struct Etcd {
    pub client_port: PortLock,
    _peer_port: PortLock,
    daemon: Daemon,
    _dir: TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it answers on its client port.
    pub fn start() -> Etcd {
        let dir = short_tempdir("fb-etcd-");
        let client_port = reserve_port();
        let peer_port = reserve_port();
        let client = format!("http://127.0.0.1:{}", client_port.port);
        let peer = format!("http://127.0.0.1:{}", peer_port.port);
        let mut cmd = Command::new(etcd_program());
        cmd.arg("--name")
            .arg("failback-test")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("failback-test={peer}"))
            // One voter on loopback: no need for production's heartbeat slack.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"]);
        let log = dir.path().join("etcd.log");
        let mut daemon = Daemon::spawn("etcd", cmd, &log);
        let port = client_port.port;
        let up = wait_for(
            "etcd to listen on its client port",
            Duration::from_secs(60),
            || {
                if !daemon.is_running() {
                    return Some(false);
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| true)
            },
            || file_tail(&log, 30),
        );
        assert!(
            up,
            "etcd exited during start; its log:\n{}",
            file_tail(&log, 40)
        );
        // Serving clients is logged once the single member has elected itself.
        wait_for(
            "etcd to be ready",
            Duration::from_secs(60),
            || {
                let text = fs::read_to_string(&log).unwrap_or_default();
                text.contains("ready to serve client requests")
                    .then_some(())
            },
            || file_tail(&log, 30),
        );
        Etcd {
            client_port,
            _peer_port: peer_port,
            daemon,
            _dir: dir,
        }
    }

    /// `host:port` of the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port.port)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }
}

/// Creates `path` as a file owned by PostgreSQL's user with mode 0644 (configuration an
/// orchestrator running as that user reads).
pub fn write_config(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("could not chmod {}: {e}", path.display()));
    user::give(path);
}
