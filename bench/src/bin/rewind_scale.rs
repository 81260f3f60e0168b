//! `rewind_scale`: does a rewind cost what the divergence costs, or what the cluster weighs?
//!
//! A rewind should read, send and write what differs, and hold in memory what it must copy:
//! neither the number of files nor their size should show in its time, its memory or its bytes.
//! pg_rewind already behaves so for relation files the WAL does not name (it lists the source's
//! files and copies the blocks its WAL scan found). This benchmark holds the divergence fixed
//! and grows the cluster, from a few GB to a terabyte, and measures each tool at each size.
//!
//! The pair is [`failback_bench::pair::DivergedPair`] (pgbench, `--scale 10` by default, 1 % of
//! the accounts changed on each side) with, made on the primary before the standby is, so on
//! both sides:
//!
//! - `--relations N` tables (100,000 by default) of one row each, one 8 KiB relation file apiece,
//!   spread over `--databases` databases, the first of them in a tablespace: the catalogs, the
//!   file lists and the directory walks of a cluster with many relations;
//! - `ballast`, a table of one row. At each size the benchmark grows its relation, on both sides
//!   alike while both are shut down, to the size asked for, in 1 GiB segment files extended
//!   with `ftruncate`: all-zero pages, which PostgreSQL reads as new, empty pages
//!   (`PageIsNew`), and which cost no disk because the files are sparse. Neither side's WAL
//!   names them, as no WAL names the bulk of a real cluster's tables between a failover and a
//!   rewind.
//!
//! At every size (`--sizes`, GB of the target's data directory, its apparent size) both sides
//! are restored from their pristine copies (the new primary's WAL as it was, not as the runs of
//! the size before left it), grown, and the target rewound by each tool (`--tools`): `failback
//! rewind` through failbackd serving the running new primary (`--pg-conn`, the live source)
//! over gRPC and over QUIC; `failback rewind --source-server` (libpq, no failbackd);
//! `pg_rewind --source-server`; and `failback resync` through failbackd (every relation file
//! compared by hashes on both sides, so it reads the whole cluster: only at sizes up to
//! `--resync-max-gb`). Every link is loopback through the bench's proxy, which counts the bytes
//! (QUIC's goes straight to failbackd, whose metrics count them).
//! Reported per run: wall time and failback's phases (`--report`), CPU time and peak memory of
//! the client and of the server side (failbackd, or the backends that served libpq, sampled),
//! bytes on the wire, bytes the tool wrote to files. Then each tool's growth from the smallest
//! size to the largest against the goals of issue 17 (time, memory and bytes within 1.5×; peak
//! memory of each end under 256 MB at every size).
//!
//! Resync reads everything: its speed is the disk's or the hash's. The benchmark measures both on
//! this machine: blake3 over 1 MiB buffers on one core (GB/s), and the disk's sequential read
//! (`dd iflag=direct` of a 1 GiB file of random bytes written for the purpose).
//!
//! After all sizes, the ballast shrunk back to its one page on both sides, one more failback
//! rewind (gRPC) is started as a standby of the new primary and every table's fingerprint
//! compared, all databases included.
//!
//! ```text
//! cargo build --release -p failback-client -p failback-server -p failback-bench
//! target/release/rewind_scale [--sizes 4,64,1024] [--relations 100000] [--databases 4]
//!     [--scale 10] [--changed-percent 1] [--tools grpc,quic,libpq,pg_rewind,resync]
//!     [--resync-max-gb 64] [--jobs 16] [--compress auto] [--bin-dir DIR] [--log-dir DIR]
//!     [--skip-verify] [--out FILE]
//! ```

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use failback_bench::args::{self, arg, flag};
use failback_bench::host::{cpu_ticks, help_of, loadavg, mb, steal_percent, today};
use failback_bench::pair::{Data, DivergedPair, Pattern, copy_dir, sync_dir, workspace_binary};
use failback_bench::runs::{Bench, Row};
use failback_bench::wan::LinkSpec;
use failback_tests::{Cluster, StopMode, user};

/// PostgreSQL's relation segment size (RELSEG_SIZE blocks of BLCKSZ): a relation's files are
/// `REL`, `REL.1`, `REL.2`, … of this many bytes each, the last one shorter.
const SEGMENT: u64 = 1 << 30;
const BLCKSZ: u64 = 8192;
const GB: u64 = 1 << 30;
/// The goals of issue 17.
const GROWTH_GOAL: f64 = 1.5;
const RSS_GOAL_MB: f64 = 256.0;

/// Where the ballast relation's files live: `base/<db oid>/<relfilenode>` in both data
/// directories (the standby is a physical copy).
#[derive(Clone, Debug)]
struct Ballast {
    rel_path: String,
}

impl Ballast {
    /// Grows (or shrinks) the ballast of the data directory `data` so that the relation holds
    /// `bytes` (whole pages, at least its first, which holds its row): segment files extended
    /// or cut with `ftruncate`, never written, so they stay sparse.
    fn resize(&self, data: &Path, bytes: u64) {
        let bytes = bytes.max(BLCKSZ) / BLCKSZ * BLCKSZ;
        let first = data.join(&self.rel_path);
        let segments = bytes.div_ceil(SEGMENT);
        for seg in 0.. {
            let path = if seg == 0 {
                first.clone()
            } else {
                PathBuf::from(format!("{}.{seg}", first.display()))
            };
            if seg >= segments {
                if std::fs::remove_file(&path).is_err() {
                    break;
                }
                continue;
            }
            let len = (bytes - seg * SEGMENT).min(SEGMENT);
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            f.set_len(len)
                .unwrap_or_else(|e| panic!("ftruncate {}: {e}", path.display()));
            user::give(&path);
        }
    }
}

/// Bytes of every file under `dir` as their sizes say (sparse files at their full length), and
/// how many files.
fn apparent_size(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_symlink() {
                // A tablespace: its directory is counted as part of the cluster.
                if let Ok(t) = std::fs::read_link(e.path()) {
                    stack.push(t);
                }
            } else {
                bytes += m.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

/// On the primary, before the standby exists: the tablespace, the databases, `relations`
/// one-row tables spread over them, and the ballast. Tables are made a thousand to a
/// transaction (each holds a lock until its transaction ends).
fn make_relations(c: &Cluster, relations: u64, databases: u64, ballast: &Mutex<Option<Ballast>>) {
    let started = Instant::now();
    c.create_tablespace("scale_ts");
    for d in 1..=databases {
        let ts = if d == 1 { " TABLESPACE scale_ts" } else { "" };
        c.execute(&format!("CREATE DATABASE scale_db{d}{ts}"));
    }
    let per_db = relations.div_ceil(databases.max(1));
    let mut made = 0;
    for d in 1..=databases {
        let mut i = 0;
        while i < per_db && made < relations {
            let n = (per_db - i).min(relations - made).min(1000);
            c.execute_in(
                &format!("scale_db{d}"),
                &format!(
                    "DO $$ BEGIN FOR i IN {} .. {} LOOP \
                     EXECUTE format('CREATE TABLE r_%s AS SELECT %s AS id', i, i); \
                     END LOOP; END $$",
                    i,
                    i + n - 1
                ),
            );
            i += n;
            made += n;
        }
        eprintln!(
            "{made} of {relations} relations made ({:.0?})",
            started.elapsed()
        );
    }
    c.execute(
        "CREATE TABLE ballast (id int, note text); INSERT INTO ballast VALUES (1, 'one row')",
    );
    let rel_path = c.query_one("SELECT pg_relation_filepath('ballast')");
    *ballast.lock().unwrap() = Some(Ballast { rel_path });
}

/// blake3 over 1 MiB buffers on one core, in GB/s (10^9 bytes a second).
fn blake3_gbps() -> f64 {
    let buf: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let started = Instant::now();
    let mut hashed = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        std::hint::black_box(blake3::hash(&buf));
        hashed += buf.len() as u64;
    }
    hashed as f64 / started.elapsed().as_secs_f64() / 1e9
}

/// One measured run at one size.
struct Measured {
    size_gb: u64,
    row: Row,
}

fn phase(row: &Row, name: &str) -> String {
    row.phases
        .as_ref()
        .and_then(|p| p.get(name))
        .and_then(|v| v.as_f64())
        .map_or("-".to_string(), |s| format!("{s:.2}"))
}

fn table(runs: &[Measured]) -> String {
    let mut s = String::from(
        "| size (GB) | tool | wall (s) | checks | WAL scan | file lists | copy | sync, commit | wire (MB) | written (MB) | client CPU (s) | server CPU (s) | client peak RSS (MB) | server peak RSS (MB) | note |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for m in runs {
        let r = &m.row;
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {} | {:.1} | {} | {} |",
            m.size_gb,
            r.tool,
            r.client.wall.as_secs_f64(),
            phase(r, "checks"),
            phase(r, "wal_scan"),
            phase(r, "file_lists"),
            phase(r, "copy"),
            phase(r, "sync_and_commit"),
            mb(r.wire()),
            mb(r.client.storage_written),
            r.client.cpu.as_secs_f64(),
            r.server_columns().0,
            r.client.max_rss_kb as f64 / 1024.0,
            r.server_columns().1,
            if r.ok {
                r.note.clone()
            } else {
                r.note.replace('\n', " ")
            }
        );
    }
    s
}

/// Each tool's growth from its smallest size to its largest: wall, memory of each end, bytes on
/// the wire and written, against issue 17's goals.
fn growth(runs: &[Measured]) -> String {
    let mut s = String::from(
        "| tool | sizes (GB) | wall ×| client RSS × | server RSS × | wire × | written × | largest peak RSS, client / server (MB) | verdict |\n\
         |---|---|---:|---:|---:|---:|---:|---|---|\n",
    );
    let mut tools: Vec<&str> = Vec::new();
    for m in runs {
        if !tools.contains(&m.row.tool.as_str()) {
            tools.push(&m.row.tool);
        }
    }
    for tool in tools {
        let of: Vec<&Measured> = runs.iter().filter(|m| m.row.tool == tool).collect();
        let (Some(lo), Some(hi)) = (
            of.iter().min_by_key(|m| m.size_gb),
            of.iter().max_by_key(|m| m.size_gb),
        ) else {
            continue;
        };
        let ratio = |f: &dyn Fn(&Row) -> f64| f(&hi.row) / f(&lo.row).max(1e-9);
        let wall = ratio(&|r| r.client.wall.as_secs_f64());
        let crss = ratio(&|r| r.client.max_rss_kb as f64);
        let srss = ratio(&|r| r.server_rss_kb.unwrap_or(0) as f64);
        // A few kB either way is noise, not growth: ratios of bytes are taken over at least 1 MB.
        let wire = ratio(&|r| (r.wire() as f64).max(1e6));
        let written = ratio(&|r| (r.client.storage_written as f64).max(1e6));
        let peak = |f: &dyn Fn(&Row) -> f64| of.iter().map(|m| f(&m.row)).fold(0.0, f64::max);
        let peak_c = peak(&|r| r.client.max_rss_kb as f64 / 1024.0);
        let peak_s = peak(&|r| r.server_rss_kb.unwrap_or(0) as f64 / 1024.0);
        let all_ok = of.iter().all(|m| m.row.ok);
        let met = all_ok
            && [wall, crss, srss, wire, written]
                .iter()
                .all(|&g| g <= GROWTH_GOAL)
            && peak_c < RSS_GOAL_MB
            && peak_s < RSS_GOAL_MB;
        let _ = writeln!(
            s,
            "| {tool} | {} → {} | {wall:.2} | {crss:.2} | {srss:.2} | {wire:.2} | {written:.2} | {peak_c:.0} / {peak_s:.0} | {} |",
            lo.size_gb,
            hi.size_gb,
            if !all_ok {
                "a run FAILED"
            } else if met {
                "met (all ≤ 1.5×, < 256 MB)"
            } else {
                "NOT met"
            }
        );
    }
    s
}

fn main() {
    let sizes: Vec<u64> = arg("--sizes", "4,64,1024".to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("--sizes: GB, comma-separated"))
        .collect();
    let relations = arg("--relations", 100_000u64);
    let databases = arg("--databases", 4u64).max(1);
    let scale = arg("--scale", 10u32);
    let percent = arg("--changed-percent", 1u32);
    let tools: Vec<String> = arg("--tools", "grpc,quic,libpq,pg_rewind,resync".to_string())
        .split(',')
        .map(str::to_string)
        .collect();
    let resync_max_gb = arg("--resync-max-gb", 64u64);
    let jobs = arg("--jobs", 16u32);
    let compress = arg("--compress", "auto".to_string());
    let bin_dir = arg("--bin-dir", String::new());
    let bin_dir = (!bin_dir.is_empty()).then(|| PathBuf::from(bin_dir));
    let log_dir = arg("--log-dir", String::new());
    let log_dir = (!log_dir.is_empty()).then(|| PathBuf::from(log_dir));
    let skip_verify = flag("--skip-verify");
    let out_path = args::out_file(&format!("rewind_scale-{}.md", today()));
    args::done();
    let failback = workspace_binary("failback", bin_dir.as_deref());
    let failbackd = workspace_binary("failbackd", bin_dir.as_deref());
    assert!(
        help_of(&failbackd, &[]).contains("--pg-conn"),
        "this failbackd has no --pg-conn: the scale benchmark rewinds from the running source"
    );
    let wants = |t: &str| tools.iter().any(|x| x == t);

    let started = Instant::now();
    let load_before = loadavg();
    let ballast = Mutex::new(None);
    let DivergedPair {
        old,
        mut new,
        changed,
        ..
    } = DivergedPair::build_prepared(scale, percent, Data::Stock, Pattern::Contiguous, 0, &|c| {
        make_relations(c, relations, databases, &ballast)
    });
    let ballast = ballast.into_inner().unwrap().expect("the ballast's path");
    let work = old.base_dir().join("bench");
    user::create_dir(&work);
    let pristine = work.join("pristine");
    copy_dir(&old.data_dir(), &pristine);
    // The tablespace's directory, outside the data directory, is restored with it.
    let ts_dir = old.base_dir().join("ts").join("scale_ts");
    let pristine_ts = work.join("pristine-ts");
    copy_dir(&ts_dir, &pristine_ts);
    let (base_bytes, files) = apparent_size(&old.data_dir());
    eprintln!(
        "pair ready after {:.0?}: {:.1} GB in {files} files before growing",
        started.elapsed(),
        base_bytes as f64 / GB as f64
    );
    let ballast_for = |size_gb: u64| (size_gb * GB).saturating_sub(base_bytes);

    let hash_gbps = blake3_gbps();
    let disk_gbps = failback_bench::host::disk_speed(&work).read_gbps;

    // pg_rewind needs a checkpoint on the new primary's timeline. The new primary is saved as
    // it then is and restored at every size: each run writes WAL on it (backup windows,
    // checkpoints), and WAL written by the runs of one size would be copied by the replaying
    // tools at the next, as if the cluster's size had cost it.
    new.start();
    new.execute("CHECKPOINT");
    new.stop(StopMode::Fast);
    let pristine_new = work.join("pristine-new");
    copy_dir(&new.data_dir(), &pristine_new);
    let new_ts_dir = new.base_dir().join("ts").join("scale_ts");
    let pristine_new_ts = work.join("pristine-new-ts");
    copy_dir(&new_ts_dir, &pristine_new_ts);
    let restore_new = |new: &mut Cluster, ballast_bytes: u64| {
        if new.is_running() {
            new.stop(StopMode::Fast);
        }
        sync_dir(&pristine_new, &new.data_dir());
        sync_dir(&pristine_new_ts, &new_ts_dir);
        ballast.resize(&new.data_dir(), ballast_bytes);
        new.start();
    };
    let mut b = Bench {
        old,
        new,
        pristine,
        work: work.clone(),
        failback,
        failbackd,
        baseline: None,
        jobs,
        compress: compress.clone(),
        running_source: true,
        no_sync: false,
        log_dir,
        perf_dir: None,
        after_restore: None,
        subcommand: "rewind",
        restore_changed_only: true,
        warm_summaries: false,
    };
    let loopback = LinkSpec::unlimited();
    let ticks_before = cpu_ticks();
    let mut runs: Vec<Measured> = Vec::new();
    let mut sizes_seen = Vec::new();
    for &size_gb in &sizes {
        let grow = ballast_for(size_gb);
        restore_new(&mut b.new, grow);
        let (ts_dir, pristine_ts, ballast2) =
            (ts_dir.clone(), pristine_ts.clone(), ballast.clone());
        b.after_restore = Some(Box::new(move |data: &Path| {
            sync_dir(&pristine_ts, &ts_dir);
            ballast2.resize(data, grow);
        }));
        b.restore();
        let (bytes, files) = apparent_size(&b.old.data_dir());
        sizes_seen.push(format!(
            "{size_gb} GB asked: {:.1} GB in {files} files",
            bytes as f64 / GB as f64
        ));
        eprintln!(
            "size {size_gb} GB: the target holds {:.1} GB in {files} files",
            bytes as f64 / GB as f64
        );
        let mut measured = |row: Row| runs.push(Measured { size_gb, row });
        if wants("grpc") {
            measured(b.failback_run("loopback", loopback, false));
        }
        if wants("quic") {
            measured(b.failback_run("loopback", loopback, true));
        }
        if wants("libpq") {
            measured(b.libpq_run("loopback", loopback));
        }
        if wants("pg_rewind") {
            measured(b.pg_rewind_run("loopback", loopback));
        }
        if wants("resync") && size_gb <= resync_max_gb {
            b.subcommand = "resync";
            let mut row = b.failback_run("loopback", loopback, false);
            b.subcommand = "rewind";
            row.tool = "failback resync (gRPC)".to_string();
            measured(row);
        }
    }
    let ticks_after = cpu_ticks();

    // The table is written before the verification too: a verification cut short leaves it.
    let write_report = |verified: &str| {
        let steal = steal_percent(ticks_before, ticks_after);
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Rewinds as the cluster grows and the divergence does not — {}\n",
            today()
        );
        let _ = writeln!(
            out,
            "PostgreSQL 15. The pair: pgbench scale {scale} (stock data), {changed} accounts changed on \
             each side; {relations} one-row tables over {databases} databases (the first in a \
             tablespace); a ballast relation grown with sparse all-zero 1 GiB segments on both sides \
             to make the target's data directory the size in the first column ({}). Every tool \
             rewound a fresh copy of the same target against the running new primary, on loopback \
             through the bench's proxy (bytes counted; QUIC straight to failbackd, bytes from its \
             metrics). failback: --jobs {jobs} --compress {compress}; \
             failbackd with --pg-conn (the live source). `failback resync` at sizes up to \
             {resync_max_gb} GB only.\n",
            sizes_seen.join("; ")
        );
        let _ = writeln!(
            out,
            "- Correctness: {verified}.\n- Hashing against the disk on this machine: blake3 \
             {hash_gbps:.2} GB/s on one core (1 MiB buffers); the disk's sequential read {} \
             (`dd iflag=direct`, 1 GiB of random bytes).\n- Machine: {cpus} CPUs, load average \
             {load_before} at the start and {} at the end, {steal:.0} % of CPU time stolen by the \
             hypervisor during the runs; written (MB) is what the tool's process was charged for \
             writing to files (whole page-cache folios).\n",
            disk_gbps.map_or("not measured".to_string(), |g| format!("{g:.2} GB/s")),
            loadavg()
        );
        out.push_str(&table(&runs));
        out.push_str("\n## Growth from the smallest size to the largest (issue 17: ≤ 1.5×, peak RSS < 256 MB)\n\n");
        out.push_str(&growth(&runs));
        out.push_str("\n## failback's time per phase (`--report`, seconds)\n\n");
        for m in runs.iter().filter(|m| m.row.phases.is_some()) {
            let _ = writeln!(
                out,
                "- {} GB, {}: `{}`",
                m.size_gb,
                m.row.tool,
                m.row
                    .phases
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(out, "\nWhole run: {:.0?}.", started.elapsed());
        println!("{out}");
        if let Some(dir) = out_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::write(&out_path, &out) {
            Ok(()) => eprintln!("written to {}", out_path.display()),
            Err(e) => eprintln!("could not write {}: {e}", out_path.display()),
        }
    };
    write_report("running (the table is written again when it ends)");
    let mut verified = String::from("not run (--skip-verify)");
    if !skip_verify {
        restore_new(&mut b.new, 0);
        let (ts_dir, pristine_ts) = (ts_dir.clone(), pristine_ts.clone());
        b.after_restore = Some(Box::new(move |_: &Path| sync_dir(&pristine_ts, &ts_dir)));
        let ok = b.failback_run("loopback", loopback, false).ok;
        verified = if ok {
            b.verify();
            "after all sizes, the ballast shrunk back to one page on both sides, one more failback rewind (gRPC; not in the table) started as a standby of the new primary, caught up, and every table's fingerprint matched, in every database".to_string()
        } else {
            "FAILED: the verification rewind did not succeed".to_string()
        };
    }

    write_report(&verified);
}
