//! Evidence that failback reads PostgreSQL 13–18 as it lies on disk, through the `failback`
//! binary a user runs:
//!
//! - `failback inspect wal` against PostgreSQL's own reader: on a PostgreSQL 15 cluster under
//!   pgbench and DDL, with each `wal_compression` method and with 1 MB segments, every record
//!   between two positions has the same LSN, rmgr, lengths, xid, prev-link, record type and block
//!   references (relation, fork, block, full-page image) in `failback inspect wal` as in
//!   `pg_waldump` over the same range.
//! - For every major version (PostgreSQL 15's pg_waldump cannot read the others), the same
//!   workload's WAL is walked from the oldest segment to its end without an error, past the
//!   server's last insert position, with an unbroken prev-link chain, and it holds block
//!   references of the tables the workload wrote and the records that create, truncate and drop
//!   relation files and databases, with the right relfilenodes and database oids.
//! - On the same clusters, `failback inspect control` agrees with `pg_control_checkpoint()` and
//!   `pg_control_system()` (and, for 13–16, whose layout is PostgreSQL 15's, with
//!   `pg_controldata`).
//! - `failback inspect history` reads the history file of a cluster promoted twice, with the
//!   switch points the standbys had replayed up to.
//! - Hostile files (a truncated or bit-flipped pg_control, bit-flipped WAL) give a clear error
//!   or a clean end of WAL, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use failback_tests::binaries;
use failback_tests::run::{Output, run_with_timeout};
use failback_tests::{Cluster, ClusterOptions, Lsn, PgMajor, StopMode, pg_test};
use serde_json::Value;

// ---- the failback binary ----

/// Runs `failback args...`; returns what it printed, whatever its exit status.
fn failback(args: &[&str]) -> Output {
    let mut cmd = Command::new(failback_tests::programs::failback());
    cmd.args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `failback args...` and panics, showing its output, unless it succeeds.
fn failback_ok(args: &[&str]) -> Output {
    let out = failback(args);
    assert!(
        out.status.success(),
        "failback {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        tail_of(&out.both(), 40)
    );
    out
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn lsn(s: &str) -> Lsn {
    s.parse()
        .unwrap_or_else(|e| panic!("not an LSN: {s:?}: {e:?}"))
}

// ---- the workload ----

/// A relation file as WAL names it: (tablespace oid, database oid, relfilenode).
type Rel = (u32, u32, u32);

fn rel_text(r: Rel) -> String {
    format!("{}/{}/{}", r.0, r.1, r.2)
}

/// What the workload did, with the oids and relfilenodes the server gave it.
#[derive(Debug)]
struct Workload {
    /// The checkpoint record written just before the workload.
    start: Lsn,
    /// Tables written while they had the relfilenode shown, by name.
    written: Vec<(String, Rel)>,
    /// A table created (SMGR CREATE).
    created: Rel,
    /// A table VACUUM truncated to nothing (SMGR TRUNCATE).
    shrunk: Rel,
    /// Relation files dropped at commit: a dropped table, a truncated table's old file.
    dropped_at_commit: Vec<Rel>,
    /// A table dropped by a prepared transaction (COMMIT PREPARED with dropped relations).
    dropped_prepared: Rel,
    /// A database created by copying template1's directory (DBASE CREATE / CREATE_FILE_COPY).
    db_file_copy: u32,
    /// A database created and dropped; WAL-logged from 15 on (CREATE_WAL_LOG), then DBASE DROP.
    db_dropped: u32,
    /// The tablespace made for the workload.
    tablespace: u32,
}

/// Two-phase commit needs prepared transaction slots. Autovacuum is off so that nothing holds
/// back the VACUUM that must truncate `shrink_t` (an autoanalyze's snapshot would).
fn options() -> ClusterOptions {
    ClusterOptions::default()
        .setting("max_prepared_transactions", "5")
        .setting("autovacuum", "off")
}

/// The relation file of table (or index) `name` in database `db`, now.
fn rel_of(c: &Cluster, db: &str, name: &str) -> Rel {
    let rows = c.query_rows_in(
        db,
        &format!(
            "SELECT CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END, \
                    d.oid, pg_relation_filenode(c.oid) \
             FROM pg_class c, pg_database d \
             WHERE c.oid = '{name}'::regclass AND d.datname = current_database()"
        ),
    );
    let row = &rows[0];
    let n = |i: usize| -> u32 {
        row[i]
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: column {i} of {row:?}"))
    };
    (n(0), n(1), n(2))
}

fn db_oid(c: &Cluster, name: &str) -> u32 {
    c.query_one(&format!(
        "SELECT oid FROM pg_database WHERE datname = '{name}'"
    ))
    .parse()
    .expect("an oid")
}

/// pgbench and DDL: tables created, truncated (by TRUNCATE and by VACUUM) and dropped (also by
/// a prepared transaction), databases created both ways and dropped, a tablespace, an index,
/// VACUUM. Small: a few seconds of work.
fn run_workload(c: &Cluster) -> Workload {
    let major = c.major();
    c.execute("CHECKPOINT");
    let start = lsn(&c.query_one("SELECT checkpoint_lsn FROM pg_control_checkpoint()"));

    c.pgbench_init(1);
    c.execute("CREATE INDEX pgbench_history_aid ON pgbench_history (aid)");
    c.create_tablespace("space");
    let tablespace: u32 = c
        .query_one("SELECT oid FROM pg_tablespace WHERE spcname = 'space'")
        .parse()
        .unwrap();
    c.execute(
        "CREATE TABLE created_t (id int PRIMARY KEY, v text);
         INSERT INTO created_t SELECT i, md5(i::text) FROM generate_series(1, 500) i",
    );
    let created = rel_of(c, "postgres", "created_t");
    c.execute(
        "CREATE TABLE in_space (id int, v text) TABLESPACE space;
         INSERT INTO in_space SELECT i, md5(i::text) FROM generate_series(1, 500) i",
    );

    // VACUUM truncates a table whose tail is all dead rows: SMGR TRUNCATE.
    c.execute("CREATE TABLE shrink_t AS SELECT generate_series(1, 2000) AS i");
    c.execute("DELETE FROM shrink_t");
    c.execute("VACUUM shrink_t");
    let shrunk = rel_of(c, "postgres", "shrink_t");

    // TRUNCATE gives the table a new file and drops the old one at commit.
    c.execute("CREATE TABLE truncated_t AS SELECT generate_series(1, 200) AS i");
    let truncated_old = rel_of(c, "postgres", "truncated_t");
    c.execute("TRUNCATE truncated_t");
    c.execute("INSERT INTO truncated_t SELECT generate_series(1, 10)");
    let truncated_new = rel_of(c, "postgres", "truncated_t");
    assert_ne!(truncated_old, truncated_new);

    c.execute("CREATE TABLE dropped_t AS SELECT generate_series(1, 200) AS i");
    let dropped = rel_of(c, "postgres", "dropped_t");
    c.execute("DROP TABLE dropped_t");

    c.execute("CREATE TABLE dropped_2pc AS SELECT generate_series(1, 100) AS i");
    let dropped_prepared = rel_of(c, "postgres", "dropped_2pc");
    c.execute(
        "BEGIN;
         INSERT INTO created_t VALUES (1000000, 'prepared');
         DROP TABLE dropped_2pc;
         PREPARE TRANSACTION 'p1'",
    );
    c.execute("COMMIT PREPARED 'p1'");

    if major >= PgMajor::V15 {
        c.execute("CREATE DATABASE db_copy STRATEGY file_copy");
        c.execute("CREATE DATABASE db_gone STRATEGY wal_log");
    } else {
        c.execute("CREATE DATABASE db_copy");
        c.execute("CREATE DATABASE db_gone");
    }
    let db_file_copy = db_oid(c, "db_copy");
    let db_dropped = db_oid(c, "db_gone");
    c.execute("DROP DATABASE db_gone");
    c.execute_in(
        "db_copy",
        "CREATE TABLE k AS SELECT generate_series(1, 200) AS i",
    );

    c.pgbench(&["-c", "2", "-j", "2", "-t", "300"]);
    c.execute("VACUUM");

    let mut written = Vec::new();
    for t in [
        "pgbench_accounts",
        "pgbench_branches",
        "pgbench_tellers",
        "pgbench_history",
        "pgbench_accounts_pkey",
        "pgbench_history_aid",
        "created_t",
        "in_space",
        "truncated_t",
    ] {
        written.push((t.to_string(), rel_of(c, "postgres", t)));
    }
    written.push(("db_copy.k".to_string(), rel_of(c, "db_copy", "k")));
    Workload {
        start,
        written,
        created,
        shrunk,
        dropped_at_commit: vec![dropped, truncated_old],
        dropped_prepared,
        db_file_copy,
        db_dropped,
        tablespace,
    }
}

/// What the server said just before a clean stop.
struct Stopped {
    /// `pg_current_wal_insert_lsn()` after a CHECKPOINT.
    insert: Lsn,
    /// `pg_control_system()`, by column.
    system: Value,
    /// `pg_control_checkpoint()` after that CHECKPOINT, by column.
    checkpoint: Value,
}

/// Ends the workload: CHECKPOINT, what the server says then, and a clean stop (which writes
/// the shutdown checkpoint after it).
fn checkpoint_and_stop(c: &mut Cluster) -> Stopped {
    c.execute("CHECKPOINT");
    let insert = lsn(&c.query_one("SELECT pg_current_wal_insert_lsn()"));
    let system = row_json(c, "SELECT * FROM pg_control_system()");
    let checkpoint = row_json(c, "SELECT * FROM pg_control_checkpoint()");
    c.stop(StopMode::Fast);
    Stopped {
        insert,
        system,
        checkpoint,
    }
}

// ---- failback inspect wal --json ----

/// One line of `failback inspect wal --json`, as far as these tests read it.
#[derive(Debug, serde::Deserialize)]
struct JsonRecord {
    #[serde(deserialize_with = "de_lsn")]
    lsn: Lsn,
    #[serde(deserialize_with = "de_lsn")]
    end_lsn: Lsn,
    #[serde(deserialize_with = "de_lsn")]
    prev: Lsn,
    /// The timeline in the header of the page where the record starts.
    timeline: u32,
    rmgr: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, deserialize_with = "de_opt_string")]
    detail: String,
    blocks: Vec<JsonBlock>,
}

#[derive(Debug, serde::Deserialize)]
struct JsonBlock {
    tablespace: u32,
    database: u32,
    relation: u32,
    fork: String,
    block: u32,
    full_page_image: bool,
}

impl JsonBlock {
    fn rel(&self) -> Rel {
        (self.tablespace, self.database, self.relation)
    }
}

fn de_lsn<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
    let s: &str = serde::Deserialize::deserialize(d)?;
    s.parse()
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not an LSN: {e:?}")))
}

fn de_opt_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(s.unwrap_or_default())
}

fn parse_json_records(stdout: &str) -> Vec<JsonRecord> {
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a record as JSON: {e}: {line}"))
        })
        .collect()
}

/// `failback inspect wal -D data --json` from the oldest segment to the end of WAL.
fn walk_all(data: &Path) -> (Vec<JsonRecord>, String) {
    let out = failback_ok(&["inspect", "wal", "-D", path_str(data), "--json"]);
    (parse_json_records(&out.stdout), out.stderr)
}

/// Whether a record's detail names relation `rel` (as a whole `spc/db/rel` word).
fn detail_names(r: &JsonRecord, rel: Rel) -> bool {
    let want = rel_text(rel);
    r.detail
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .any(|w| w == want)
}

fn find<'a>(
    recs: &'a [JsonRecord],
    what: &str,
    pred: impl Fn(&JsonRecord) -> bool,
) -> &'a JsonRecord {
    recs.iter().find(|r| pred(r)).unwrap_or_else(|| {
        let mut kinds: BTreeMap<(String, String), usize> = BTreeMap::new();
        for r in recs {
            *kinds.entry((r.rmgr.clone(), r.kind.clone())).or_default() += 1;
        }
        panic!(
            "no record {what} among {} records; kinds seen: {kinds:?}",
            recs.len()
        )
    })
}

/// Consecutive records chain: each one's prev is the record before it, and it starts where
/// that one ended (after a page header, when that one ended at a page boundary; at the next
/// segment after a SWITCH).
fn assert_chain(recs: &[JsonRecord]) {
    for w in recs.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert_eq!(
            b.prev, a.lsn,
            "record at {} does not point back to {}",
            b.lsn, a.lsn
        );
        let gap = b.lsn.0.checked_sub(a.end_lsn.0).unwrap_or_else(|| {
            panic!(
                "record at {} starts before {} ends ({})",
                b.lsn, a.lsn, a.end_lsn
            )
        });
        // A page header is 24 bytes, 40 at a segment start.
        assert!(
            gap <= 40 || a.kind == "SWITCH",
            "{gap} bytes between the end of {} ({}) and the next record {}: a record was skipped",
            a.lsn,
            a.end_lsn,
            b.lsn
        );
    }
}

fn oldest_segment_start(data: &Path, seg_size: u64) -> Lsn {
    let oldest = std::fs::read_dir(data.join("pg_wal"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            (name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit())).then_some(name)
        })
        .min_by_key(|n| n[8..].to_string())
        .expect("a WAL segment in pg_wal");
    let log = u64::from_str_radix(&oldest[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&oldest[16..24], 16).unwrap();
    Lsn(log * 0x1_0000_0000 + seg * seg_size)
}

fn control_json(data: &Path) -> Value {
    let out = failback_ok(&["inspect", "control", "-D", path_str(data), "--json"]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

// Every major version: the whole WAL of a cluster that ran the workload is walked without an
// error and holds what the workload did; the control file reads as the server reports it.
pg_test!(workload_wal_and_control_file, |major| {
    let mut c = Cluster::start_new_with(major, "walk", options());
    let w = run_workload(&c);
    let stopped = checkpoint_and_stop(&mut c);
    let insert = stopped.insert;
    let data = c.data_dir();
    let control = control_json(&data);
    let seg_size = control["xlog_seg_size"].as_u64().unwrap();

    let (recs, stderr) = walk_all(&data);
    assert!(
        stderr.contains("failback: WAL ends at"),
        "the walk must stop at the end of WAL: {stderr}"
    );
    assert!(recs.len() > 1000, "only {} records", recs.len());

    // From the first record of the oldest segment ...
    let oldest = oldest_segment_start(&data, seg_size);
    let first = &recs[0];
    assert!(
        first.lsn.0 >= oldest.0 && first.lsn.0 < oldest.0 + seg_size,
        "first record {} is not in the oldest segment (starting {oldest})",
        first.lsn
    );
    // ... over an unbroken chain ...
    assert_chain(&recs);
    // ... to the shutdown checkpoint that pg_control points at, past the last insert position.
    let last = recs.last().unwrap();
    assert!(
        last.end_lsn >= insert,
        "the walk ended at {} before the server's insert position {insert}",
        last.end_lsn
    );
    assert_eq!(
        (last.rmgr.as_str(), last.kind.as_str()),
        ("XLOG", "CHECKPOINT_SHUTDOWN"),
        "{last:?}"
    );
    assert_eq!(last.lsn, lsn(control["checkPoint"].as_str().unwrap()));
    assert!(recs.iter().all(|r| r.timeline == 1));
    assert!(
        recs.iter()
            .any(|r| r.lsn == w.start && r.kind == "CHECKPOINT_ONLINE")
    );

    // Block references of every table the workload wrote, in the main fork; and of the
    // visibility map and free space map forks that VACUUM writes.
    let refs: BTreeSet<(Rel, String)> = recs
        .iter()
        .flat_map(|r| r.blocks.iter().map(|b| (b.rel(), b.fork.clone())))
        .collect();
    for (name, rel) in &w.written {
        assert!(
            refs.contains(&(*rel, "main".to_string())),
            "no block reference to {name} ({})",
            rel_text(*rel)
        );
    }
    let forks: BTreeSet<&str> = refs.iter().map(|(_, f)| f.as_str()).collect();
    assert!(
        forks.contains("vm") && forks.contains("fsm"),
        "forks seen: {forks:?}"
    );
    assert!(
        refs.iter().any(|((spc, _, _), _)| *spc == w.tablespace),
        "no block in tablespace {}",
        w.tablespace
    );
    assert!(
        recs.iter()
            .flat_map(|r| &r.blocks)
            .any(|b| b.full_page_image && b.rel() == w.written[0].1),
        "no full-page image of pgbench_accounts"
    );
    // pgbench_accounts at scale 1 has 1640 blocks; pgbench updates rows all over it.
    let top = recs
        .iter()
        .flat_map(|r| &r.blocks)
        .filter(|b| b.rel() == w.written[0].1)
        .map(|b| b.block)
        .max();
    assert!(
        top >= Some(1500),
        "highest block of pgbench_accounts seen: {top:?}"
    );

    // The special records, naming what they act on.
    find(&recs, "SMGR CREATE of created_t", |r| {
        r.rmgr == "Storage" && r.kind == "CREATE" && detail_names(r, w.created)
    });
    let trunc = find(&recs, "SMGR TRUNCATE of shrink_t", |r| {
        r.rmgr == "Storage" && r.kind == "TRUNCATE" && detail_names(r, w.shrunk)
    });
    assert!(trunc.detail.contains("to 0 blocks"), "{trunc:?}");
    for rel in &w.dropped_at_commit {
        find(&recs, &format!("COMMIT dropping {}", rel_text(*rel)), |r| {
            r.rmgr == "Transaction" && r.kind == "COMMIT" && detail_names(r, *rel)
        });
    }
    find(&recs, "PREPARE", |r| {
        r.rmgr == "Transaction" && r.kind == "PREPARE"
    });
    find(&recs, "COMMIT_PREPARED dropping dropped_2pc", |r| {
        r.rmgr == "Transaction"
            && r.kind == "COMMIT_PREPARED"
            && detail_names(r, w.dropped_prepared)
    });
    let (copy_kind, log_kind) = if major >= PgMajor::V15 {
        ("CREATE_FILE_COPY", "CREATE_WAL_LOG")
    } else {
        ("CREATE", "CREATE")
    };
    let copied = format!("to 1663/{}", w.db_file_copy);
    find(&recs, "DBASE create of db_copy", |r| {
        r.rmgr == "Database" && r.kind == copy_kind && r.detail.ends_with(&copied)
    });
    let gone = format!("1663/{}", w.db_dropped);
    find(&recs, "DBASE create of db_gone", |r| {
        r.rmgr == "Database" && r.kind == log_kind && r.detail.ends_with(&gone)
    });
    find(&recs, "DBASE DROP of db_gone", |r| {
        r.rmgr == "Database" && r.kind == "DROP" && r.detail.split(' ').any(|d| d == gone)
    });
    find(&recs, "Tablespace CREATE", |r| {
        r.rmgr == "Tablespace" && r.kind == "CREATE"
    });
    find(&recs, "a btree record", |r| r.rmgr == "Btree");
    find(&recs, "a heap2 record", |r| r.rmgr == "Heap2");

    check_control_file(&mut c, &stopped);
});

// ---- pg_waldump as the oracle (PostgreSQL 15) ----

/// The fields both tools print for a record: the header up to the record type, and the block
/// references. The description after the type differs by design.
#[derive(Debug, PartialEq, Eq)]
struct Line {
    header: String,
    kind: String,
    blocks: Vec<String>,
}

impl Line {
    fn parse(line: &str) -> Line {
        let mut parts = line.split(", blkref #");
        let head = parts.next().unwrap_or_default();
        let (header, desc) = head
            .split_once(" desc: ")
            .unwrap_or_else(|| panic!("no desc: in {line}"));
        let kind = desc
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let blocks = parts.map(|b| format!("#{}", b.trim_end())).collect();
        Line {
            header: header.to_string(),
            kind,
            blocks,
        }
    }

    fn show(&self) -> String {
        let mut s = format!("{} desc: {}", self.header, self.kind);
        for b in &self.blocks {
            let _ = write!(s, ", blkref {b}");
        }
        s
    }

    fn lsn(&self) -> &str {
        self.header
            .split("lsn: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap_or("?")
    }
}

/// The record types failback does not name (pg_waldump does): it prints UNKNOWN for them.
fn unnamed_rmgr(header: &str) -> bool {
    ["Hash", "Gin", "Gist", "SPGist", "BRIN"]
        .iter()
        .any(|r| header.starts_with(&format!("rmgr: {r:<11}")))
}

/// Runs the workload on a PostgreSQL 15 cluster with `options`, then compares `failback inspect
/// wal` with `pg_waldump` line by line from the checkpoint before the workload to the shutdown
/// checkpoint.
fn compare_with_pg_waldump(name: &str, options: ClusterOptions) {
    let mut c = Cluster::start_new_with(PgMajor::V15, name, options);
    let w = run_workload(&c);
    checkpoint_and_stop(&mut c);
    let data = c.data_dir();
    let end = lsn(control_json(&data)["checkPoint"].as_str().unwrap());
    let (start, end) = (w.start.to_string(), end.to_string());

    let ours = failback_ok(&[
        "inspect",
        "wal",
        "-D",
        path_str(&data),
        "--start",
        &start,
        "--end",
        &end,
    ]);
    let mut cmd = Command::new(binaries::pg_waldump());
    cmd.arg("-p")
        .arg(data.join("pg_wal"))
        .args(["-s", &start, "-e", &end]);
    let theirs = run_with_timeout(&mut cmd, Duration::from_secs(300)).unwrap();
    assert!(
        theirs.status.success(),
        "pg_waldump failed ({}): {}",
        theirs.status,
        tail_of(&theirs.stderr, 10)
    );

    let a: Vec<Line> = ours.stdout.lines().map(Line::parse).collect();
    let b: Vec<Line> = theirs.stdout.lines().map(Line::parse).collect();
    assert!(
        b.len() > 1000,
        "pg_waldump printed only {} records",
        b.len()
    );
    let mut diffs = Vec::new();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        let same = match (x, y) {
            (Some(x), Some(y)) => {
                x.header == y.header
                    && x.blocks == y.blocks
                    && (x.kind == y.kind || (x.kind == "UNKNOWN" && unnamed_rmgr(&x.header)))
            }
            _ => false,
        };
        if !same {
            diffs.push(format!(
                "record {i}:\n  pg_waldump: {}\n  failback:   {}",
                y.map_or("(none)".to_string(), Line::show),
                x.map_or("(none)".to_string(), Line::show)
            ));
            if diffs.len() == 5 {
                break;
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "failback inspect wal and pg_waldump differ between {start} and {end} ({} vs {} \
         records); first differences:\n{}",
        a.len(),
        b.len(),
        diffs.join("\n")
    );
    // The comparison covered what matters: images (compressed with the method asked for), and
    // every kind of block reference.
    let fpw = b
        .iter()
        .filter(|l| l.blocks.iter().any(|b| b.contains(" FPW")))
        .count();
    assert!(fpw > 100, "only {fpw} records with full-page images");
    assert!(
        b.iter()
            .any(|l| l.blocks.iter().any(|b| b.contains(" fork vm ")))
    );
    assert!(
        b.iter()
            .any(|l| l.blocks.iter().any(|b| b.contains(" fork fsm ")))
    );
    eprintln!(
        "{name}: {} records from {start} to {end} agree, {fpw} with full-page images (last {})",
        a.len(),
        a.last().map_or("-", Line::lsn)
    );
}

#[test]
fn same_as_pg_waldump_pglz() {
    compare_with_pg_waldump("pglz", options().wal_compression("pglz"));
}

#[test]
fn same_as_pg_waldump_lz4() {
    compare_with_pg_waldump("lz4", options().wal_compression("lz4"));
}

#[test]
fn same_as_pg_waldump_zstd() {
    compare_with_pg_waldump("zstd", options().wal_compression("zstd"));
}

#[test]
fn same_as_pg_waldump_1mb_segments() {
    compare_with_pg_waldump("seg1mb", options().wal_segment_size_mb(1));
}

// ---- the control file ----

/// Each column of `sql`'s single row, by name (via `row_to_json`).
fn row_json(c: &Cluster, sql: &str) -> Value {
    let text = c.query_one(&format!("SELECT row_to_json(x)::text FROM ({sql}) x"));
    serde_json::from_str(&text).unwrap()
}

fn num_of(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
        other => panic!("not a number: {other}"),
    }
}

/// `failback inspect control` on a cleanly stopped cluster reads what the server reports about
/// its control file: compared with what it said before the stop (identity and versions cannot
/// change) and, for the checkpoint, after a restart (a start after a clean stop writes no new
/// checkpoint). Leaves the cluster stopped.
fn check_control_file(c: &mut Cluster, stopped: &Stopped) {
    let major = c.major();
    let system = &stopped.system;
    let before = &stopped.checkpoint;
    let data = c.data_dir();
    let ours = control_json(&data);
    let text = failback_ok(&["inspect", "control", "-D", path_str(&data)]).stdout;

    assert_eq!(ours["major"].as_u64(), Some(u64::from(major.number())));
    assert_eq!(ours["state"], "shut down", "{ours}");
    for (mine, server) in [
        ("system_identifier", "system_identifier"),
        ("pg_control_version", "pg_control_version"),
        ("catalog_version_no", "catalog_version_no"),
    ] {
        assert_eq!(num_of(&ours[mine]), num_of(&system[server]), "{mine}");
    }
    // The shutdown checkpoint comes after the one the server reported while running.
    assert!(
        lsn(ours["checkPoint"].as_str().unwrap()) > lsn(before["checkpoint_lsn"].as_str().unwrap())
    );

    c.start();
    let after = row_json(c, "SELECT * FROM pg_control_checkpoint()");
    let cp = &ours["checkPointCopy"];
    assert_eq!(
        ours["checkPoint"], after["checkpoint_lsn"],
        "checkpoint LSN"
    );
    assert_eq!(cp["redo"], after["redo_lsn"], "redo LSN");
    // A shutdown checkpoint's redo point is the checkpoint record itself.
    assert_eq!(ours["checkPoint"], cp["redo"]);
    for (mine, server) in [
        ("ThisTimeLineID", "timeline_id"),
        ("PrevTimeLineID", "prev_timeline_id"),
        ("nextOid", "next_oid"),
        ("nextMulti", "next_multixact_id"),
        ("nextMultiOffset", "next_multi_offset"),
        ("oldestXid", "oldest_xid"),
        ("oldestXidDB", "oldest_xid_dbid"),
        ("oldestActiveXid", "oldest_active_xid"),
        ("oldestMulti", "oldest_multi_xid"),
        ("oldestMultiDB", "oldest_multi_dbid"),
        ("oldestCommitTsXid", "oldest_commit_ts_xid"),
        ("newestCommitTsXid", "newest_commit_ts_xid"),
    ] {
        assert_eq!(
            num_of(&cp[mine]),
            num_of(&after[server]),
            "{mine} vs {server}"
        );
    }
    assert_eq!(cp["nextXid"], after["next_xid"], "next xid");
    assert_eq!(cp["fullPageWrites"], after["full_page_writes"]);
    let time: i64 = c
        .query_one(
            "SELECT extract(epoch FROM checkpoint_time)::bigint FROM pg_control_checkpoint()",
        )
        .parse()
        .unwrap();
    assert_eq!(cp["time"].as_i64(), Some(time));
    let sysid = num_of(&system["system_identifier"]);
    let label = |l: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{l}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {l} in:\n{text}"))
            .to_string()
    };
    assert_eq!(label("Database system identifier"), sysid.to_string());
    assert_eq!(label("Latest checkpoint location"), after["checkpoint_lsn"]);
    assert_eq!(
        label("Latest checkpoint's REDO location"),
        after["redo_lsn"]
    );
    assert_eq!(label("Latest checkpoint's TimeLineID"), "1");
    c.stop(StopMode::Fast);

    // 13–16 share PostgreSQL 15's layout: pg_controldata 15 reads them, and every line both
    // print says the same (the checkpoint, now unchanged by the restart, included).
    if major <= PgMajor::V16 {
        let mut cmd = Command::new(binaries::pg_controldata());
        cmd.arg("-D").arg(&data).env("LC_ALL", "C");
        let theirs = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
        assert!(theirs.status.success(), "{}", theirs.both());
        let theirs: BTreeMap<&str, &str> = theirs
            .stdout
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let text = failback_ok(&["inspect", "control", "-D", path_str(&data)]).stdout;
        let mut compared = 0;
        for (k, v) in text.lines().filter_map(|l| l.split_once(':')) {
            if let Some(t) = theirs.get(k.trim()) {
                assert_eq!(v.trim(), *t, "{k}: failback vs pg_controldata");
                compared += 1;
            }
        }
        assert!(
            compared >= 20,
            "only {compared} lines in common with pg_controldata"
        );
    }
}

// ---- timeline history ----

/// Stops `primary` and waits until `standby` has replayed its shutdown checkpoint; returns the
/// standby's replay position, where a promotion now starts the next timeline.
fn stop_primary_and_drain(primary: &mut Cluster, standby: &Cluster) -> Lsn {
    primary.stop(StopMode::Fast);
    let shutdown = lsn(control_json(&primary.data_dir())["checkPoint"]
        .as_str()
        .unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let replay = lsn(&standby.query_one("SELECT pg_last_wal_replay_lsn()"));
        if replay > shutdown {
            return replay;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "standby replayed up to {replay}, not past the shutdown checkpoint at {shutdown}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// A cluster promoted twice (timeline 3): its history file read by failback names the switch
// points where each standby's replay ended, and its WAL is walked across the switch to 3.
#[test]
fn history_of_a_twice_promoted_cluster() {
    let mut first = Cluster::start_new(PgMajor::V15, "first");
    first.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let mut second = first.create_standby("second");
    first.execute("INSERT INTO t SELECT generate_series(1, 1000)");
    second.wait_for_catchup(&first);
    let switch1 = stop_primary_and_drain(&mut first, &second);
    assert_eq!(second.promote(), 2);
    second.execute("INSERT INTO t SELECT generate_series(1, 1000)");

    let mut third = second.create_standby("third");
    second.execute("INSERT INTO t SELECT generate_series(1, 1000)");
    third.wait_for_catchup(&second);
    let switch2 = stop_primary_and_drain(&mut second, &third);
    assert_eq!(third.promote(), 3);
    third.execute("INSERT INTO t SELECT generate_series(1, 1000)");
    third.stop(StopMode::Fast);

    let data = third.data_dir();
    let file = data.join("pg_wal").join("00000003.history");
    let json: Value = serde_json::from_str(
        &failback_ok(&["inspect", "history", path_str(&file), "--json"]).stdout,
    )
    .unwrap();
    let entries: Vec<(u64, String, Option<String>)> = json
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {json}"))
        .iter()
        .map(|e| {
            (
                e["tli"].as_u64().unwrap(),
                e["begin"].as_str().unwrap().to_string(),
                e["end"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (1, "0/0".to_string(), Some(switch1.to_string())),
            (2, switch1.to_string(), Some(switch2.to_string())),
            (3, switch2.to_string(), None),
        ]
    );
    let text = failback_ok(&["inspect", "history", path_str(&file)]).stdout;
    assert!(
        text.contains(&format!("2: {switch1} - {switch2}")),
        "{text}"
    );

    let control = control_json(&data);
    assert_eq!(control["checkPointCopy"]["ThisTimeLineID"], 3);
    // The walk follows the history from timeline 2's segments into 3's: timeline 3 begins with
    // its END_OF_RECOVERY record, at the switch point (after a page header if the switch point
    // is a page boundary). The page holding the switch point was begun on timeline 2 and keeps
    // that in its header; every later page says 3.
    let (recs, _) = walk_all(&data);
    assert_chain(&recs);
    let eor = find(&recs, "END_OF_RECOVERY of timeline 3", |r| {
        r.kind == "END_OF_RECOVERY" && r.detail.contains("tli 3; prev tli 2")
    });
    assert!(
        eor.lsn >= switch2 && eor.lsn.0 <= switch2.0 + 40,
        "{eor:?} vs {switch2}"
    );
    let next_page = (switch2.0 | 8191) + 1;
    assert!(recs.iter().any(|r| r.timeline == 2));
    assert!(recs.iter().any(|r| r.lsn.0 >= next_page));
    for r in &recs {
        let want = if r.lsn.0 < next_page { 2 } else { 3 };
        assert_eq!(r.timeline, want, "page timeline of the record at {}", r.lsn);
    }
}

// ---- hostile files ----

/// A failback run on damaged input ended as a program should: exit 0 or 1 with a message, not
/// a panic (exit 101) or a signal.
fn assert_clean_exit(out: &Output, what: &str) {
    match out.status.code() {
        Some(0) | Some(1) => {}
        _ => panic!(
            "{what}: failback ended with {}:\n{}",
            out.status,
            tail_of(&out.stderr, 20)
        ),
    }
    assert!(
        !out.stderr.contains("panicked"),
        "{what}: failback panicked:\n{}",
        tail_of(&out.stderr, 20)
    );
}

/// Writes byte `pos` of the file at `path` as `original[pos] ^ mask` (the original when `mask` is
/// 0), in place.
fn flip(path: &Path, original: &[u8], pos: usize, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[original[pos] ^ mask], pos as u64).unwrap();
}

/// A small deterministic generator of positions (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

// A truncated or bit-flipped pg_control, and WAL with bits flipped, as initdb left them (no
// server needed): a clear error, or a clean end of WAL, never a panic.
#[test]
fn hostile_files_give_errors_not_panics() {
    let cluster = Cluster::init(PgMajor::V15, "hostile", ClusterOptions::default());
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path();
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    let control = std::fs::read(cluster.data_dir().join("global/pg_control")).unwrap();
    let segment_name = "000000010000000000000001";
    let segment = std::fs::read(cluster.data_dir().join("pg_wal").join(segment_name)).unwrap();
    let d = path_str(data);
    let control_path = data.join("global/pg_control");
    let segment_path = data.join("pg_wal").join(segment_name);

    // Damaged control files: each command refuses with a message naming the problem.
    for (what, bytes, expect) in [
        ("empty pg_control", Vec::new(), "size 0"),
        ("truncated pg_control", control[..100].to_vec(), "size 100"),
        (
            "pg_control one byte short",
            control[..8191].to_vec(),
            "size 8191",
        ),
        (
            "pg_control with a flipped bit",
            {
                let mut b = control.clone();
                b[40] ^= 0x10;
                b
            },
            "CRC",
        ),
    ] {
        std::fs::write(&control_path, &bytes).unwrap();
        for args in [
            vec!["inspect", "control", "-D", d],
            vec!["inspect", "control", "-D", d, "--json"],
            vec!["inspect", "wal", "-D", d],
        ] {
            let out = failback(&args);
            assert_clean_exit(&out, what);
            assert_eq!(out.status.code(), Some(1), "{what}: {args:?} must fail");
            assert!(
                out.stderr.contains("pg_control") && out.stderr.contains(expect),
                "{what}: {args:?} says:\n{}",
                out.stderr
            );
        }
    }

    // The intact files: a clean walk, and where WAL ends.
    std::fs::write(&control_path, &control).unwrap();
    std::fs::write(&segment_path, &segment).unwrap();
    let clean = failback_ok(&["inspect", "wal", "-D", d]);
    let records = clean.stdout.lines().count();
    assert!(records > 100, "{}", clean.stderr);
    let end = clean
        .stderr
        .split("WAL ends at ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .map(lsn)
        .unwrap_or_else(|| panic!("no end of WAL in {}", clean.stderr));
    let used = usize::try_from(end.0 - 0x100_0000).unwrap();

    // Bits flipped where PostgreSQL's reader notices them, with what it would say: the long
    // page header of the segment (xlp_magic, xlp_pageaddr, xlp_seg_size, xlp_xlog_blcksz) and
    // the first record (its CRC).
    for (pos, exit, says) in [
        (0, 1, "invalid magic number"),
        (9, 0, "unexpected pageaddr"),
        (33, 1, "incorrect segment size"),
        (37, 1, "incorrect XLOG_BLCKSZ"),
        (42, 0, "WAL ends at 0/1000028"),
        (8192 + 1, 1, "invalid magic number"),
    ] {
        flip(&segment_path, &segment, pos, 0x01);
        let out = failback(&["inspect", "wal", "-D", d]);
        flip(&segment_path, &segment, pos, 0);
        let what = format!("bit 0 flipped at byte {pos} of the segment");
        assert_clean_exit(&out, &what);
        assert_eq!(out.status.code(), Some(exit), "{what}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{what}: {}", out.stderr);
    }

    // Bits flipped anywhere in the WAL that holds records: the walk stops with a message or
    // reads on (a flipped bit in a page's unused tail or in xlp_sysid, which nothing here
    // knows to check, changes nothing); it never panics, and never prints more records than
    // the intact WAL holds.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let positions: Vec<usize> = (0..20)
        .map(|_| (rng.next() % used as u64) as usize)
        .collect();
    let mut stopped_early = 0;
    for (i, pos) in positions.into_iter().enumerate() {
        flip(&segment_path, &segment, pos, 1 << (rng.next() % 8));
        // JSON output takes the same path through the decoder: a few runs suffice.
        let modes: &[bool] = if i % 10 == 0 {
            &[false, true]
        } else {
            &[false]
        };
        for &json in modes {
            let mut args = vec!["inspect", "wal", "-D", d];
            if json {
                args.push("--json");
            }
            let out = failback(&args);
            let what = format!("bit flipped at byte {pos} of the segment");
            assert_clean_exit(&out, &what);
            let n = out.stdout.lines().count();
            assert!(
                n <= records,
                "{what}: {n} records, more than the {records} intact"
            );
            if out.status.success() {
                assert!(out.stderr.contains("failback: "), "{what}: {}", out.stderr);
            } else {
                assert!(
                    out.stderr.contains("failback: error:"),
                    "{what}: {}",
                    out.stderr
                );
            }
            if !json && n < records {
                stopped_early += 1;
            }
        }
        flip(&segment_path, &segment, pos, 0);
    }
    // Most records are followed by more: a flip in one ends the walk there.
    assert!(
        stopped_early >= 15,
        "only {stopped_early} of 20 flips were noticed"
    );

    // A segment cut short, and a history file of garbage.
    std::fs::write(&segment_path, &segment[..12345]).unwrap();
    let out = failback(&["inspect", "wal", "-D", d]);
    assert_clean_exit(&out, "a truncated segment");
    let history = data.join("pg_wal/00000002.history");
    for junk in [
        &b"\xff\xfe garbage\n"[..],
        b"1\t0/ZZZ\tno\n",
        b"7\t0/10\tx\n",
        b"",
    ] {
        std::fs::write(&history, junk).unwrap();
        for json in [false, true] {
            let mut args = vec!["inspect", "history", path_str(&history)];
            if json {
                args.push("--json");
            }
            let out = failback(&args);
            assert_clean_exit(&out, &format!("history {junk:?}"));
        }
    }
}
