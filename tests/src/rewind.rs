//! Running `failback rewind` against the test bed's clusters, and the shape of a failover test.
//!
//! A *rewind* brings an old primary (the *target*) that kept writing after a failover back in
//! line with the new primary (the *source*): failback reads the target's WAL from the last
//! checkpoint both share, fetches every block the target changed since then (and every file that
//! is not a relation) from the source, and leaves a `backup_label` so that the target, started
//! as a standby, replays the source's WAL from that checkpoint. With a local source
//! (`--source-pgdata`) the source's data directory must be shut down cleanly, like the target.
//!
//! The program under test is the `failback` binary cargo built for this test run
//! ([`crate::programs`]). It is run as
//! the test process's user (root in CI, as an operator would), with a time limit, and its exit
//! status, stdout, stderr and `--report` JSON are kept in a [`FailbackRun`]. Assertions on a run
//! print what failback said and the tails of the servers' logs.
//!
//! The common shape of a scenario, in order:
//!
//! 1. [`promote`]: a primary and a streaming standby; the standby catches up and is promoted.
//! 2. the test writes on both sides (the old primary's writes are the ones to undo);
//! 3. [`stop_for_rewind`]: both stop — the new primary cleanly (a local source must be shut
//!    down), the old primary as the scenario wants (fast, or immediate for crash recovery);
//! 4. [`rewind_ok`]: `failback rewind -D old --source-pgdata new`, asserted to succeed;
//! 5. [`rejoin`]: the old primary is configured as a standby of the new one, both start, the
//!    new primary writes one more row, the old one catches up on the new timeline, and both
//!    must hold the same data ([`assert_same_data`]).
//!
//! [`failover_and_rewind`] does 3–5. Helpers for refusals compare every file of the target
//! before and after ([`TreeDigest`]), and [`assert_owned_by_pg_user`] checks that a rewind run
//! as root left the data directory owned by PostgreSQL's user with PostgreSQL's modes.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::binaries;
use crate::cluster::{Cluster, StopMode};
use crate::failbackd::{Failbackd, Via};
use crate::fingerprint::assert_same_data;
use crate::run::run_with_timeout;
use crate::user;

/// How long one failback run may take (crash recovery, big files and WAL restore included).
pub const FAILBACK_TIMEOUT: Duration = Duration::from_secs(600);

/// One finished `failback` run.
#[derive(Debug)]
pub struct FailbackRun {
    /// The arguments after the program name.
    pub args: Vec<OsString>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The `--report` JSON, when one was asked for and written.
    pub report: Option<serde_json::Value>,
    pub elapsed: Duration,
    /// What failbackd printed, when the source was reached through it.
    pub server_log: Option<String>,
}

impl FailbackRun {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The command line, exit status and everything failback printed.
    pub fn show(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        format!(
            "failback {} -> {} after {:.1?}\n--- failback stdout ---\n{}--- failback stderr \
             ---\n{}",
            args.join(" "),
            self.status,
            self.elapsed,
            self.stdout,
            self.stderr
        ) + &self
            .server_log
            .as_ref()
            .map(|l| format!("--- failbackd stderr ---\n{l}"))
            .unwrap_or_default()
    }

    /// The `--report` JSON; panics when there is none.
    pub fn report(&self) -> &serde_json::Value {
        self.report
            .as_ref()
            .unwrap_or_else(|| panic!("failback wrote no report\n{}", self.show()))
    }

    /// `report[key]` as a string (LSNs are strings), if present and not null.
    pub fn report_str(&self, key: &str) -> Option<String> {
        self.report()
            .get(key)
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// Whether the run found that the target must be rewound.
    pub fn rewind_needed(&self) -> bool {
        self.report()["rewind_needed"].as_bool().unwrap_or(false)
    }

    /// The plan `--debug` printed: every `(path, ACTION)` and every `(path, block)` listed
    /// under it (lines `failback: <path> (<ACTION>)` and `failback:   block N`).
    pub fn debug_plan(&self) -> DebugPlan {
        parse_debug_plan(&self.stderr, "failback:")
    }
}

/// Files and blocks a rewind plans to touch, as `--debug` prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebugPlan {
    /// path → action name (`COPY`, `COPY_TAIL`, `NONE`, `TRUNCATE`, `REMOVE`, `CREATE`).
    pub actions: BTreeMap<String, String>,
    /// (path, block number within the file) for every changed block fetched.
    pub blocks: BTreeSet<(String, u32)>,
}

/// Reads `<prefix> <path> (<ACTION>)` lines and the `<prefix> block N` lines after them (any
/// indentation), as both failback and pg_rewind print their file maps.
pub fn parse_debug_plan(text: &str, prefix: &str) -> DebugPlan {
    const ACTIONS: [&str; 6] = ["CREATE", "COPY", "COPY_TAIL", "NONE", "TRUNCATE", "REMOVE"];
    let mut plan = DebugPlan::default();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix) else {
            continue;
        };
        let trimmed = rest.trim();
        if let Some(n) = trimmed.strip_prefix("block ")
            && let Ok(n) = n.trim().parse::<u32>()
        {
            if let Some(path) = &current {
                plan.blocks.insert((path.clone(), n));
            }
            continue;
        }
        // `path (ACTION)`, possibly followed by a note (` -- ...`).
        let body = trimmed.split(" -- ").next().unwrap_or(trimmed);
        if let Some(open) = body.rfind(" (")
            && let Some(action) = body[open + 2..].strip_suffix(')')
            && ACTIONS.contains(&action)
        {
            let path = body[..open].to_string();
            plan.actions.insert(path.clone(), action.to_string());
            current = Some(path);
        } else {
            current = None;
        }
    }
    plan
}

/// Runs `failback` with `args` as the current user; panics only when it cannot be started or
/// exceeds [`FAILBACK_TIMEOUT`]. When `report` is given, `--report <report>` is added and the
/// file parsed afterwards (a missing file leaves `report` empty).
pub fn run_failback(args: &[OsString], report: Option<&Path>) -> FailbackRun {
    run_failback_with(args, report, &[])
}

/// [`run_failback`] with variables added to failback's environment (`FAILBACK_FAULT`).
pub fn run_failback_with(
    args: &[OsString],
    report: Option<&Path>,
    env: &[(&str, &str)],
) -> FailbackRun {
    let mut all: Vec<OsString> = args.to_vec();
    if let Some(r) = report {
        let _ = fs::remove_file(r);
        all.push("--report".into());
        all.push(r.into());
    }
    let mut cmd = Command::new(crate::programs::failback());
    user::clean_env(&mut cmd);
    cmd.args(&all).envs(env.iter().copied()).current_dir("/");
    let t0 = Instant::now();
    let out = run_with_timeout(&mut cmd, FAILBACK_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let elapsed = t0.elapsed();
    let report = report.and_then(|r| fs::read(r).ok()).map(|bytes| {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "failback's report is not JSON ({e}):\n{}",
                String::from_utf8_lossy(&bytes)
            )
        })
    });
    FailbackRun {
        args: all,
        status: out.status,
        stdout: out.stdout,
        stderr: out.stderr,
        report,
        elapsed,
        server_log: None,
    }
}

/// `failback rewind -D <target> --source-pgdata <source> --pg-bindir <target's bins> <args>`,
/// with a report; does not check the outcome.
pub fn rewind(target: &Cluster, source: &Cluster, args: &[&str]) -> FailbackRun {
    rewind_dirs(target, &source.data_dir(), args)
}

/// Like [`rewind`] with any source directory, reached the way [`crate::failbackd::via`] says:
/// directly, or through a failbackd serving it for this run only.
pub fn rewind_dirs(target: &Cluster, source_dir: &Path, args: &[&str]) -> FailbackRun {
    run_dirs("rewind", target, source_dir, args)
}

/// `failback resync -D <target>` from `source`'s directory, reached as [`rewind_dirs`] reaches
/// it, with a report; does not check the outcome.
pub fn resync(target: &Cluster, source: &Cluster, args: &[&str]) -> FailbackRun {
    run_dirs("resync", target, &source.data_dir(), args)
}

/// The port of the server running on `data_dir`, if one is (`postmaster.pid` names a live
/// process; its fourth line is the port).
fn running_port(data_dir: &Path) -> Option<u16> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim();
    if !Path::new("/proc").join(pid).exists() {
        return None;
    }
    lines.nth(2)?.trim().parse().ok()
}

fn run_dirs(command: &str, target: &Cluster, source_dir: &Path, args: &[&str]) -> FailbackRun {
    let via = crate::failbackd::via();
    let server = matches!(via, Via::Grpc | Via::Quic).then(|| Failbackd::serve(source_dir));
    // Over libpq the source must run: a scenario's shut-down source is started for this run
    // only (and stopped after it), a running one is reached where it listens.
    let live = match via {
        Via::Libpq => Some(match running_port(source_dir) {
            Some(port) => (
                None,
                format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            ),
            None => {
                let s = crate::cluster::TempServer::start(target.bins(), source_dir)
                    .unwrap_or_else(|e| panic!("{e}"));
                let conninfo = s.conninfo();
                (Some(s), conninfo)
            }
        }),
        _ => None,
    };
    let mut all: Vec<OsString> = vec![command.into(), "-D".into(), target.data_dir().into()];
    match (&server, &live) {
        (Some(s), _) => all.extend(s.source_args(via)),
        (None, Some((_, conninfo))) => all.extend(["--source-server".into(), conninfo.into()]),
        (None, None) => all.extend(["--source-pgdata".into(), source_dir.into()]),
    }
    all.extend(["--pg-bindir".into(), target.bins().bin_dir.clone().into()]);
    all.extend(args.iter().map(OsString::from));
    let report = target.base_dir().join("failback-report.json");
    let mut run = run_failback(&all, Some(&report));
    if let Some(s) = server {
        run.server_log = Some(s.log());
    }
    if let Some((Some(s), _)) = live {
        run.server_log = Some(s.log());
    }
    run
}

/// `failback rewind -D <target> --source-server <conninfo> --pg-bindir <target's bins> <args>`:
/// a running server reached over libpq, with a report; does not check the outcome.
pub fn rewind_server(target: &Cluster, conninfo: &str, args: &[&str]) -> FailbackRun {
    let mut all: Vec<OsString> = vec![
        "rewind".into(),
        "-D".into(),
        target.data_dir().into(),
        "--source-server".into(),
        conninfo.into(),
        "--pg-bindir".into(),
        target.bins().bin_dir.clone().into(),
    ];
    all.extend(args.iter().map(OsString::from));
    let report = target.base_dir().join("failback-report.json");
    run_failback(&all, Some(&report))
}

/// `failback status -D <target>`: exit status 0 when no rewind of it is unfinished, 3 when one
/// is (and stdout says how far it got).
pub fn status(target: &Cluster) -> FailbackRun {
    run_failback(
        &["status".into(), "-D".into(), target.data_dir().into()],
        None,
    )
}

/// Asserts that a rewind of `target` is unfinished and that it shows: `failback status` says so
/// (exit status 3), and PostgreSQL refuses to start on it, naming failback's marker.
pub fn assert_unfinished(target: &mut Cluster) {
    let st = status(target);
    assert_eq!(st.status.code(), Some(3), "{}", st.show());
    assert!(st.stdout.contains("unfinished rewind"), "{}", st.show());
    let refused = target.try_start();
    assert!(
        refused.is_err(),
        "PostgreSQL started on a half-rewound target '{}'",
        target.name()
    );
    let log = target.log_tail(30);
    assert!(
        log.contains("failback_unfinished_rewind"),
        "the refusal does not name failback's marker:\n{log}"
    );
}

/// Asserts that `run` resumed an unfinished rewind, did not fetch again at least `min_done`
/// bytes the interrupted run had recorded as done (the report's
/// `execution.bytes_already_done`), and fetched no more than what was left of the plan; returns
/// the bytes already done.
pub fn assert_resumed(run: &FailbackRun, min_done: u64) -> u64 {
    let report = run.report();
    assert_eq!(report["resumed"], true, "{}", run.show());
    let done = report["execution"]["bytes_already_done"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        done >= min_done,
        "the resumed run fetched again what the interrupted one had recorded as done \
         ({done} bytes skipped, at least {min_done} expected):\n{}",
        run.show()
    );
    // What was left, and no more: with what the interrupted run did, no more than the plan.
    let fetched = report["execution"]["bytes_fetched"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let planned = report["bytes_to_fetch"].as_u64().unwrap_or(0);
    assert!(
        fetched.saturating_add(done) <= planned,
        "the resumed run fetched {fetched} bytes besides the {done} already done, more than \
         the {planned} bytes the plan fetches:\n{}",
        run.show()
    );
    done
}

/// What failback said and the tails of the clusters' logs, for a failure message.
pub fn context(run: &FailbackRun, clusters: &[&Cluster]) -> String {
    let mut s = run.show();
    for c in clusters {
        let _ = write!(
            s,
            "\n--- tail of '{}' (PostgreSQL {}) log ---\n{}",
            c.name(),
            c.major(),
            c.log_tail(25)
        );
    }
    s
}

/// Runs [`rewind`] and panics, showing failback's output and both logs, unless it succeeds.
pub fn rewind_ok(target: &Cluster, source: &Cluster, args: &[&str]) -> FailbackRun {
    let run = rewind(target, source, args);
    assert!(
        run.success(),
        "failback rewind of '{}' from '{}' failed:\n{}",
        target.name(),
        source.name(),
        context(&run, &[target, source])
    );
    run
}

/// `failback rewind`'s exit status for a refusal that left the target untouched (README, "Exit
/// status").
pub const EXIT_REFUSED: i32 = 4;
/// `failback rewind`'s exit status for a rewind that stopped after its first change: the target
/// is marked unfinished; run it again.
pub const EXIT_UNFINISHED: i32 = 3;
/// `failback rewind`'s exit status when the source could not be reached (target untouched).
pub const EXIT_SOURCE_UNAVAILABLE: i32 = 5;

/// Asserts that `run` was refused with the target untouched (exit status 4) and that its
/// stderr contains every one of `needles`.
pub fn assert_refused(run: &FailbackRun, needles: &[&str], clusters: &[&Cluster]) {
    assert_failed(run, EXIT_REFUSED, needles, clusters);
}

/// Asserts that `run` stopped after its first change (exit status 3: run it again) and that
/// its stderr contains every one of `needles`.
pub fn assert_stopped_unfinished(run: &FailbackRun, needles: &[&str], clusters: &[&Cluster]) {
    assert_failed(run, EXIT_UNFINISHED, needles, clusters);
    assert!(
        run.stderr.contains("run failback rewind again"),
        "an unfinished rewind must say to run it again:\n{}",
        context(run, clusters)
    );
}

/// Asserts that `run` failed with exit status `code`, saying every one of `needles`, without
/// a panic.
pub fn assert_failed(run: &FailbackRun, code: i32, needles: &[&str], clusters: &[&Cluster]) {
    // Shown with the test's output when it fails, or with --no-capture.
    eprintln!("{}", run.show());
    assert!(
        !run.success(),
        "failback should have failed, but succeeded:\n{}",
        context(run, clusters)
    );
    assert_eq!(
        run.status.code(),
        Some(code),
        "failback must exit with status {code} here, not another, a crash or a signal:\n{}",
        context(run, clusters)
    );
    for n in needles {
        assert!(
            run.stderr.contains(n),
            "failback's error does not say {n:?}:\n{}",
            context(run, clusters)
        );
    }
    assert!(
        !run.stderr.contains("panicked"),
        "failback panicked:\n{}",
        context(run, clusters)
    );
}

// ---- the shape of a failover ----

/// Waits until `standby` has everything `primary` wrote, then promotes it. Returns its new
/// timeline.
pub fn promote(primary: &Cluster, standby: &Cluster) -> failback_common::TimeLineId {
    standby.wait_for_catchup(primary);
    standby.promote()
}

/// A failed-over pair, both still running, where the rewind has tens of MB to copy: the old
/// primary changed rows of `t` and made `only_old` after the promotion; the new one changed
/// other rows and made `only_new`, a relation of about 35 MB, and the WAL that made it.
/// [`assert_tens_of_mb_rewound`] checks the rejoined old primary.
pub fn diverged_with_tens_of_mb(major: failback_common::PgMajor) -> (Cluster, Cluster) {
    diverged_with_tens_of_mb_with(major, crate::ClusterOptions::default())
}

/// [`diverged_with_tens_of_mb`], the old primary made with `options` (and the new one, its
/// standby, inheriting its configuration).
pub fn diverged_with_tens_of_mb_with(
    major: failback_common::PgMajor,
    options: crate::ClusterOptions,
) -> (Cluster, Cluster) {
    let mut old = Cluster::start_new_with(major, "old", options);
    old.pgbench_init(1);
    old.execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, 'before the fork' FROM generate_series(1, 5000) i",
    );
    let new = old.create_standby("new");
    promote(&old, &new);
    old.execute("UPDATE t SET v = 'lost on old' WHERE id % 3 = 0; CREATE TABLE only_old (x int)");
    new.execute(
        "UPDATE t SET v = 'kept on new' WHERE id % 5 = 0;
         CREATE TABLE only_new AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 150000) g",
    );
    (old, new)
}

/// The pair a newcomer sees in the demo, and the wire tests rewind: a primary with pgbench's
/// tables and a log table, its streaming standby promoted, both written to after the split
/// (pgbench rows updated on each side, log rows added and removed, a table made on each side),
/// then both shut down cleanly. `step` hears each step in words as it begins. Returns (old
/// primary, new primary).
pub fn pgbench_pair(
    major: failback_common::PgMajor,
    step: &mut dyn FnMut(&str),
) -> (Cluster, Cluster) {
    step(&format!(
        "creating a PostgreSQL {major} primary with data checksums, and a pgbench database"
    ));
    let mut old = Cluster::start_new(major, "old-primary");
    old.pgbench_init(2);
    old.execute(
        "CREATE TABLE accounts_log (id bigint PRIMARY KEY, note text);
         INSERT INTO accounts_log
             SELECT g, 'before the failover ' || repeat('x', 180) FROM generate_series(1, 20000) g",
    );
    step("creating a streaming standby and letting it catch up");
    let mut new = old.create_standby("new-primary");
    new.wait_for_catchup(&old);
    step("failover: promoting the standby; it is now the new primary");
    new.promote();
    step("split brain: both sides take writes the other never sees");
    old.execute(
        "UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid % 50 = 0;
         INSERT INTO accounts_log
             SELECT g, 'written on the old primary' FROM generate_series(20001, 21000) g;
         DELETE FROM accounts_log WHERE id <= 500;
         CREATE TABLE only_on_old (x int); INSERT INTO only_on_old VALUES (1)",
    );
    new.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 70 = 0;
         INSERT INTO accounts_log
             SELECT g, 'written on the new primary' FROM generate_series(20001, 30000) g;
         CREATE TABLE only_on_new (x int); INSERT INTO only_on_new SELECT generate_series(1, 100)",
    );
    step("stopping both servers");
    old.stop(StopMode::Fast);
    new.stop(StopMode::Fast);
    (old, new)
}

/// That `run` (over `--source-server`, from a server without WAL summaries) rewound pg_rewind's
/// way: the source's WAL since the divergence replayed from the last common checkpoint, which
/// it names in pg_rewind's words, not read to name the blocks it changed.
pub fn assert_replayed_from_last_common_checkpoint(run: &FailbackRun) {
    assert_eq!(
        run.report()["source_changes"]["found_by"],
        "replay",
        "{}",
        run.show()
    );
    assert!(
        run.stderr
            .contains("rewinding from last common checkpoint at "),
        "{}",
        run.show()
    );
}

/// The old primary of [`diverged_with_tens_of_mb`], rewound and rejoined, lost its own writes
/// and holds the new primary's.
pub fn assert_tens_of_mb_rewound(old: &Cluster) {
    assert_eq!(
        old.query_one("SELECT count(*) FROM t WHERE v = 'lost on old'"),
        "0"
    );
    assert_eq!(old.query_one("SELECT count(*) FROM only_new"), "150000");
}

/// Stops both sides for a local-source rewind: the new primary cleanly (a source data
/// directory must be shut down), the old one with `old_mode`.
pub fn stop_for_rewind(old: &mut Cluster, new: &mut Cluster, old_mode: StopMode) {
    old.stop(old_mode);
    new.stop(StopMode::Fast);
}

/// Starts the stopped, rewound `node` as a standby with nothing to stream from (no
/// `primary_conninfo`, no `restore_command`) and asserts that it becomes consistent — accepts
/// read-only connections — from its own `pg_wal` alone; then stops it.
pub fn assert_consistent_alone(node: &mut Cluster) {
    user::write_file(&node.data_dir().join("standby.signal"), "");
    let auto = node.data_dir().join("postgresql.auto.conf");
    let text: String = fs::read_to_string(&auto)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
        .map(|l| format!("{l}\n"))
        .collect();
    user::write_file(&auto, text);
    if let Err(e) = node.try_start() {
        panic!(
            "the rewound node '{}' did not become consistent from its own pg_wal: {e}",
            node.name()
        );
    }
    assert!(node.is_in_recovery());
    node.stop(StopMode::Fast);
}

/// Brings a rewound old primary back as a standby of the new one and checks it holds the same
/// data: configures it, starts both, writes one more row on the new primary, waits until the
/// old one replayed it on the new primary's timeline, compares fingerprints.
pub fn rejoin(old: &mut Cluster, new: &mut Cluster) {
    if old.is_running() {
        old.stop(StopMode::Fast);
    }
    old.configure_as_standby_of(new);
    start_rejoined(old, new);
}

/// [`rejoin`] for an old primary whose standby configuration is already written (by `-R`):
/// starts both, writes a row on the new primary, waits for the old one, compares.
pub fn start_rejoined(old: &mut Cluster, new: &mut Cluster) {
    if !new.is_running() {
        new.start();
    }
    if let Err(e) = old.try_start() {
        panic!(
            "the rewound old primary '{}' did not start as a standby of '{}': {e}\n--- tail of \
             '{}' log ---\n{}",
            old.name(),
            new.name(),
            new.name(),
            new.log_tail(20)
        );
    }
    new.execute(
        "CREATE TABLE IF NOT EXISTS failback_rejoin_marker (at timestamptz DEFAULT now(), note text);
         INSERT INTO failback_rejoin_marker (note) VALUES ('written after the rewind')",
    );
    old.wait_for_catchup(new);
    assert!(
        old.is_in_recovery(),
        "the rejoined node must run as a standby"
    );
    assert_eq!(
        old.timeline(),
        new.timeline(),
        "the rejoined node must follow the new primary's timeline"
    );
    assert_same_data(new, old);
}

/// Steps 3–5 of a failover test: stop both (the old primary with `old_mode`), rewind the old
/// primary from the new one's directory with `args`, rejoin, compare. Returns the run.
pub fn failover_and_rewind(
    old: &mut Cluster,
    new: &mut Cluster,
    old_mode: StopMode,
    args: &[&str],
) -> FailbackRun {
    stop_for_rewind(old, new, old_mode);
    let run = rewind_ok(old, new, args);
    assert!(
        run.rewind_needed(),
        "the old primary diverged, so a rewind was needed:\n{}",
        run.show()
    );
    rejoin(old, new);
    run
}

/// Runs `f` while pgbench (`pgbench -n -T 1 -c 2`, over and over) writes on `primary`, from
/// before `f` starts until it returns, and checks that the load committed transactions
/// meanwhile: the source of a live rewind changing under it. `primary` needs the pgbench
/// tables (`pgbench_init`).
pub fn under_load<T>(primary: &Cluster, f: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let count = || -> u64 {
        primary
            .query_one("SELECT count(*) FROM pgbench_history")
            .parse()
            .unwrap()
    };
    /// Stops the load when dropped, also when `f` panics (the scope would wait for ever).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let stop = AtomicBool::new(false);
    let runs = AtomicU32::new(0);
    let (out, before, after) = std::thread::scope(|s| {
        let stopper = Stop(&stop);
        let load = s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                primary.pgbench(&["-n", "-T", "1", "-c", "2"]);
                runs.fetch_add(1, Ordering::SeqCst);
            }
        });
        while runs.load(Ordering::SeqCst) == 0 && !load.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let before = count();
        let out = f();
        let after = count();
        drop(stopper);
        load.join().expect("the pgbench load failed");
        (out, before, after)
    });
    assert!(
        after > before,
        "the load did not run meanwhile ({before} -> {after} pgbench_history rows)"
    );
    out
}

// ---- files of a data directory ----

/// Every entry below a data directory (following `pg_wal` and `pg_tblspc/*` links, as
/// PostgreSQL does): path → kind, owner, mode, size and a hash of the contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeDigest {
    pub entries: BTreeMap<String, String>,
}

impl TreeDigest {
    pub fn of(dir: &Path) -> TreeDigest {
        let mut entries = BTreeMap::new();
        digest_dir(dir, "", &mut entries);
        TreeDigest { entries }
    }

    /// The paths whose entries differ, one line each; empty when equal.
    pub fn diff(&self, after: &TreeDigest) -> Vec<String> {
        let keys: BTreeSet<&String> = self.entries.keys().chain(after.entries.keys()).collect();
        let mut out = Vec::new();
        for k in keys {
            match (self.entries.get(k), after.entries.get(k)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => out.push(format!("{k}: was {a}, now {b}")),
                (Some(_), None) => out.push(format!("{k}: removed")),
                (None, Some(b)) => out.push(format!("{k}: created ({b})")),
                (None, None) => {}
            }
        }
        out
    }

    /// Panics, listing the differences, unless `after` equals `self`.
    pub fn assert_unchanged(&self, after: &TreeDigest, what: &str) {
        let d = self.diff(after);
        assert!(
            d.is_empty(),
            "{what}: the target data directory changed:\n  {}",
            d.join("\n  ")
        );
    }
}

fn digest_dir(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel_path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let path = entry.path();
        let Ok(md) = fs::symlink_metadata(&path) else {
            continue;
        };
        let owner = format!("{}:{} {:o}", md.uid(), md.gid(), md.mode() & 0o7777);
        if md.file_type().is_symlink() {
            let to = fs::read_link(&path).unwrap_or_default();
            out.insert(
                rel_path.clone(),
                format!("link -> {} {owner}", to.display()),
            );
            let follow = rel_path == "pg_wal" || rel == "pg_tblspc";
            if follow && path.is_dir() {
                digest_dir(&path, &rel_path, out);
            }
        } else if md.is_dir() {
            out.insert(rel_path.clone(), format!("dir {owner}"));
            digest_dir(&path, &rel_path, out);
        } else {
            out.insert(
                rel_path,
                format!("file {owner} {} bytes {}", md.len(), hash_file(&path)),
            );
        }
    }
}

fn hash_file(path: &Path) -> String {
    // blake3 is a dependency, so optimised even in a test build: hashing every file of a data
    // directory several times per test must not cost more than the test's servers.
    let mut h = blake3::Hasher::new();
    if let Ok(mut f) = fs::File::open(path) {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    h.finalize().to_hex()[..32].to_string()
}

/// Panics, listing the offenders, unless every entry below the data directory (and its
/// tablespaces, and a linked pg_wal) is owned by PostgreSQL's user with PostgreSQL's modes:
/// 0700/0600, or 0750/0640 when the data directory has group access (`initdb -g`).
pub fn assert_owned_by_pg_user(cluster: &Cluster) {
    let data = cluster.data_dir();
    let md = fs::metadata(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
    let group = md.mode() & 0o070 != 0;
    let (file_mode, dir_mode) = if group {
        (0o640, 0o750)
    } else {
        (0o600, 0o700)
    };
    let pg = user::pg_user();
    let mut bad = Vec::new();
    check_owner(&data, "", (pg.uid, pg.gid), (file_mode, dir_mode), &mut bad);
    assert!(
        bad.is_empty(),
        "'{}': entries not owned by {} ({}:{}) with mode {file_mode:o}/{dir_mode:o}:\n  {}",
        cluster.name(),
        pg.name,
        pg.uid,
        pg.gid,
        bad.join("\n  ")
    );
}

fn check_owner(dir: &Path, rel: &str, ids: (u32, u32), modes: (u32, u32), bad: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel_path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = entry.path();
        let Ok(md) = fs::symlink_metadata(&path) else {
            continue;
        };
        let mode = md.mode() & 0o7777;
        if (md.uid(), md.gid()) != ids {
            bad.push(format!("{rel_path}: owned by {}:{}", md.uid(), md.gid()));
        }
        if md.file_type().is_symlink() {
            if (rel_path == "pg_wal" || rel == "pg_tblspc") && path.is_dir() {
                check_owner(&path, &rel_path, ids, modes, bad);
            }
        } else if md.is_dir() {
            if mode != modes.1 {
                bad.push(format!("{rel_path}: directory mode {mode:o}"));
            }
            check_owner(&path, &rel_path, ids, modes, bad);
        } else if mode != modes.0 {
            bad.push(format!("{rel_path}: file mode {mode:o}"));
        }
    }
}

/// Flips one bit of a file in place (owner and mode kept): a corrupt byte, as a disk or a bad
/// copy would leave it. Flipping the same bit again restores the file.
pub fn flip_bit(path: &Path, offset: u64, bit: u8) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b[0] ^= 1 << bit;
    f.write_all_at(&b, offset)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Paths made immutable with `chattr +i` (which even root cannot write, unlike permission
/// bits) until this value is dropped.
#[derive(Debug)]
pub struct Immutable {
    paths: Vec<PathBuf>,
}

impl Immutable {
    /// Sets the immutable flag on every path; Err says why it could not (no `chattr`, no
    /// CAP_LINUX_IMMUTABLE, a file system without the flag), with nothing left immutable.
    pub fn set(paths: &[PathBuf]) -> Result<Immutable, String> {
        let mut done = Immutable { paths: Vec::new() };
        for p in paths {
            let out = Command::new("chattr").arg("+i").arg(p).output();
            match out {
                Ok(o) if o.status.success() => done.paths.push(p.clone()),
                Ok(o) => {
                    return Err(format!(
                        "chattr +i {} failed: {}",
                        p.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                }
                Err(e) => return Err(format!("could not run chattr: {e}")),
            }
        }
        Ok(done)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
    }
}

// ---- WAL files ----

/// The WAL segment files in `pg_wal` (24 hex digits), sorted.
pub fn wal_segments(data_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(data_dir.join("pg_wal"))
        .unwrap_or_else(|e| panic!("{}/pg_wal: {e}", data_dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    v.sort();
    v
}

/// Removes from the shut-down `cluster`'s `pg_wal` every segment from the one holding `from`
/// up to (not including) the one its last checkpoint's redo point lies in: the WAL since the
/// divergence, gone as recycled or archived-and-removed WAL is, while the cluster itself can
/// still start. Returns the names removed.
pub fn remove_wal_since(cluster: &Cluster, from: failback_common::Lsn) -> Vec<String> {
    let control = control_file(cluster);
    let seg = control.xlog_seg_size;
    let first = from.segment_number(seg);
    let keep = control.checkPointCopy.redo.segment_number(seg);
    let mut removed = Vec::new();
    for name in wal_segments(&cluster.data_dir()) {
        let (_, segno) = failback_common::lsn::parse_wal_file_name(&name, seg).unwrap();
        if segno >= first && segno < keep {
            std::fs::remove_file(cluster.data_dir().join("pg_wal").join(&name)).unwrap();
            removed.push(name);
        }
    }
    removed
}

/// The name of the WAL segment holding `lsn` on timeline `tli`.
pub fn wal_file_name_at(
    tli: failback_common::TimeLineId,
    lsn: failback_common::Lsn,
    segment_size: u32,
) -> String {
    failback_common::lsn::wal_file_name(tli, lsn.segment_number(segment_size), segment_size)
}

/// The control file of a stopped cluster, parsed.
pub fn control_file(cluster: &Cluster) -> failback_common::control::ControlFileData {
    let path = cluster.data_dir().join("global/pg_control");
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    failback_common::control::ControlFileData::parse(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where timeline `tli` of `cluster` branched off its parent: the end of the parent's entry
/// in `pg_wal/<tli>.history`.
pub fn switch_point(cluster: &Cluster, tli: failback_common::TimeLineId) -> failback_common::Lsn {
    let name = failback_common::lsn::history_file_name(tli);
    let path = cluster.data_dir().join("pg_wal").join(&name);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let h = failback_common::timeline::TimeLineHistory::parse(&bytes, tli, &name)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    h.entries()
        .iter()
        .rev()
        .find_map(|e| e.end)
        .unwrap_or_else(|| panic!("{} has no switch point", path.display()))
}

// ---- pg_rewind, the oracle (PostgreSQL 15 only) ----

/// PostgreSQL 15's `pg_rewind --dry-run --debug -D <target> --source-pgdata <source>`, run as
/// PostgreSQL's user (it refuses root). Returns the plan it printed and its whole output.
pub fn pg_rewind_dry_run(target: &Cluster, source: &Cluster) -> (DebugPlan, String) {
    let mut cmd = user::command(binaries::pg_rewind());
    cmd.args(["--dry-run", "--debug", "-D"])
        .arg(target.data_dir())
        .arg("--source-pgdata")
        .arg(source.data_dir());
    let out = run_with_timeout(&mut cmd, FAILBACK_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "pg_rewind --dry-run failed ({}):\n{}",
        out.status,
        out.both()
    );
    (parse_debug_plan(&out.stderr, "pg_rewind:"), out.stderr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_plans_of_both_tools_parse_alike() {
        let fb = "failback: servers diverged at WAL location 0/3000000 on timeline 1\n\
                  failback: base/5/16384 (NONE)\n\
                  failback:   block 3\n\
                  failback:   block 7\n\
                  failback: pg_wal/000000010000000000000001 (NONE) -- WAL the rewound node does not replay: not copied\n\
                  failback: my dir/a 'b' (COPY)\n\
                  failback: need to copy 1 MB (total source directory size is 40 MB)\n";
        let pg = "pg_rewind: base/5/16384 (NONE)\npg_rewind: block 3\npg_rewind: block 7\n\
                  pg_rewind: pg_wal/000000010000000000000001 (NONE)\n\
                  pg_rewind: my dir/a 'b' (COPY)\n";
        let a = parse_debug_plan(fb, "failback:");
        let b = parse_debug_plan(pg, "pg_rewind:");
        assert_eq!(a, b);
        assert_eq!(a.actions.len(), 3);
        assert_eq!(a.actions["my dir/a 'b'"], "COPY");
        assert!(a.blocks.contains(&("base/5/16384".to_string(), 7)));
        assert_eq!(a.blocks.len(), 2);
    }
}
