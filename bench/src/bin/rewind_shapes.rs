//! How long until the old primary is a caught-up standby again: failback against
//! `pg_rewind --source-server`, a fresh `pg_basebackup`, and rsync inside a backup window, on
//! loopback and through a simulated WAN, over the shapes a failback takes.
//!
//! The input is one [`DivergedPair`] (pgbench scale 100 by default, 1 % of the accounts
//! changed on each side; `--data stock|realistic`, `--pattern contiguous|random`). The new
//! primary runs during every run, as it does after a failover. Every run starts from the same
//! saved pair (the target written back to disk first; the new primary started from its own
//! saved copy, since each backup window ends with a WAL segment switch that a later tool would
//! otherwise copy too) and ends only when the target, started as a standby of the new primary
//! through the same link, has replayed everything the new primary had written when the tool
//! finished: the time a tool takes plus the start-up replay it leaves.
//!
//! The tools, each through a [`TcpProxy`] that counts the bytes both ways:
//! - `failback rewind --source grpc://…`, failbackd serving the running new primary
//!   (`--pg-conn`);
//! - `pg_rewind --source-server` (PostgreSQL 15's);
//! - `pg_basebackup -X stream -c fast` into an emptied data directory (a re-clone);
//! - rsync as operators script it: `pg_backup_start`, `rsync -a --checksum --delete` from an
//!   rsync daemon beside the new primary (the directories PostgreSQL's documentation says to
//!   leave out, left out), `pg_backup_stop`, its `backup_label` written, the target's old WAL
//!   removed, the file system synced (rsync does not fsync).
//!
//! The shapes, in this order on the one pair (the busy source's cycles add up):
//! - `1pct`: the divergence as built;
//! - `wal-gone`: the same, the target's WAL since the divergence removed (recycled, never
//!   archived): pg_rewind cannot run; failback compares that side's files by hashes;
//! - `busyN`: the new primary has repeated its update N times since the split, each followed
//!   by a VACUUM of the table (as autovacuum would) and a CHECKPOINT, so the same pages are
//!   written again and again, and the WAL, kept (`wal_keep_size`), grows with N.
//!
//! Reported per run: the tool's wall time, the start-up to caught up, their sum, bytes on the
//! wire each way (the tool's and the standby's streaming), bytes the tool wrote to disk, CPU
//! time and peak RSS of the client and of the server side (failbackd; the backends serving
//! pg_rewind or pg_basebackup, sampled; the rsync daemon). The tables and the goals of issue
//! 13 go to stdout and to `bench/results/rewind_shapes-<date>-<data>-<pattern>.md`.
//!
//! ```text
//! cargo build --release -p failback-client -p failback-server -p failback-bench
//! target/release/rewind_shapes [--scale 100] [--data stock|realistic] [--pattern contiguous|random]
//!     [--shapes 1pct,wal-gone,busy1,busy4,busy16] [--tools failback,pg_rewind,pg_basebackup,rsync]
//!     [--nets loopback,wan] [--delay-ms 25] [--rate-mbit 200] [--jobs 16] [--compress auto]
//!     [--no-wal-summaries] [--bin-dir DIR] [--log-dir DIR] [--out FILE]
//! ```
//! failbackd summarizes the new primary's WAL as it runs beside it (one summary per completed
//! segment); each run starts it afresh on the saved source, so the rewind starts once it has
//! summarized what is in pg_wal, as a failbackd running since the promotion would have.
//! `--no-wal-summaries` runs it without, decoding all the source's WAL since the divergence.
//! rsync must be installed (`apt-get install rsync`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failback_bench::args::{self, arg, flag};
use failback_bench::host::{
    cpu_ticks, dir_size, failback_rewind_args, loadavg, mb, steal_percent, syncfs, tail, today,
    wait_listening,
};
use failback_bench::measure::{self, Cost, Sampler};
use failback_bench::pair::{
    Data, DivergedPair, Pattern, changed_rows, copy_dir, seed, workspace_binary,
};
use failback_bench::wan::{Counters, LinkSpec, TcpProxy};
use failback_common::Lsn;
use failback_tests::port::reserve_port;
use failback_tests::rewind::{remove_wal_since, switch_point};
use failback_tests::{Cluster, StopMode, binaries, user};

/// How long a node may take from its start to caught up before the run counts as failed.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(1800);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Failback,
    PgRewind,
    PgBasebackup,
    Rsync,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Failback => "failback (gRPC)",
            Tool::PgRewind => "pg_rewind --source-server",
            Tool::PgBasebackup => "pg_basebackup",
            Tool::Rsync => "rsync --checksum",
        }
    }

    fn parse(s: &str) -> Tool {
        match s {
            "failback" => Tool::Failback,
            "pg_rewind" => Tool::PgRewind,
            "pg_basebackup" => Tool::PgBasebackup,
            "rsync" => Tool::Rsync,
            _ => panic!("--tools: {s:?} is not failback, pg_rewind, pg_basebackup or rsync"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    OnePercent,
    TargetWalGone,
    Busy(u32),
}

impl Shape {
    fn parse(s: &str) -> Shape {
        match s {
            "1pct" => Shape::OnePercent,
            "wal-gone" => Shape::TargetWalGone,
            _ => match s.strip_prefix("busy").and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => Shape::Busy(n),
                _ => panic!("--shapes: {s:?} is not 1pct, wal-gone or busyN (N > 0)"),
            },
        }
    }

    fn title(self) -> String {
        match self {
            Shape::OnePercent => "the divergence as built".into(),
            Shape::TargetWalGone => "the target's WAL since the divergence gone".into(),
            Shape::Busy(n) => format!("busy source, N = {n} update + checkpoint cycles"),
        }
    }
}

/// One measured run.
struct Row {
    shape: Shape,
    tool: Tool,
    net: &'static str,
    ok: bool,
    note: String,
    client: Cost,
    /// From the node's start to caught up (None when the tool failed).
    catch_up: Option<Duration>,
    server_cpu: Duration,
    server_rss_kb: u64,
    up: u64,
    down: u64,
}

impl Row {
    fn total(&self) -> Option<Duration> {
        self.catch_up.map(|c| c + self.client.wall)
    }

    fn wire(&self) -> u64 {
        self.up + self.down
    }
}

/// What running a tool measured, before the catch-up.
struct Served {
    client: Cost,
    server_cpu: Duration,
    server_rss_kb: u64,
    /// The proxies the tool's own traffic went through.
    counters: Vec<Arc<Counters>>,
    note: String,
}

struct Bench {
    old: Cluster,
    new: Cluster,
    /// The saved target of the shape being measured.
    pristine: PathBuf,
    /// The saved source (shut down) of the shape being measured: every run ends its backup
    /// window with a WAL segment switch, and a tool run later must not find more WAL.
    source: PathBuf,
    work: PathBuf,
    failback: PathBuf,
    failbackd: PathBuf,
    jobs: u32,
    compress: String,
    /// `--no-wal-summaries`: failbackd decodes all the source's WAL for each rewind.
    wal_summaries: bool,
    log_dir: Option<PathBuf>,
    /// failback runs so far, to name their reports in `log_dir`.
    runs: u32,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Bytes each way through the proxies of one run.
fn add(counters: &[Arc<Counters>]) -> (u64, u64) {
    counters.iter().fold((0, 0), |(u, d), c| {
        let (cu, cd, _) = c.snapshot();
        (u + cu, d + cd)
    })
}

impl Bench {
    /// The saved target, and the saved source started.
    fn restore(&mut self) {
        if self.old.is_running() {
            self.old.stop(StopMode::Fast);
        }
        copy_dir(&self.pristine, &self.old.data_dir());
        self.restore_source();
        syncfs(&self.old.data_dir());
    }

    /// The saved source, started.
    fn restore_source(&mut self) {
        if self.new.is_running() {
            self.new.stop(StopMode::Fast);
        }
        copy_dir(&self.source, &self.new.data_dir());
        self.new.start();
    }

    /// Saves the source as it is now, shut down, for the runs to start from.
    fn save_source(&mut self) {
        if self.new.is_running() {
            self.new.stop(StopMode::Fast);
        }
        copy_dir(&self.new.data_dir(), &self.source);
    }

    fn postmaster_pid(&self) -> u32 {
        std::fs::read_to_string(self.new.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            .expect("the new primary's postmaster.pid")
    }

    fn keep(&self, name: &str, text: &str) {
        if let Some(dir) = &self.log_dir {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::write(dir.join(format!("{name}.log")), text);
        }
    }

    /// One tool over one link, from the saved target to a caught-up standby.
    fn run(&mut self, shape: Shape, tool: Tool, net: &'static str, spec: LinkSpec) -> Row {
        self.restore();
        // The new primary's port through the link: for pg_rewind and pg_basebackup, and for
        // the standby's streaming afterwards, whichever tool ran.
        let pg_proxy =
            TcpProxy::start(local(0), local(self.new.port()), spec, spec).expect("TCP proxy");
        let pg_conninfo = format!(
            "host=127.0.0.1 port={} user=postgres",
            pg_proxy.local_addr().port()
        );
        eprintln!("{shape:?}: {} over {net}", tool.name());
        let Served {
            client,
            server_cpu,
            server_rss_kb,
            mut counters,
            note,
        } = match tool {
            Tool::Failback => self.failback(spec),
            Tool::PgRewind => self.server_sampled(&pg_conninfo, false),
            Tool::PgBasebackup => self.server_sampled(&pg_conninfo, true),
            Tool::Rsync => self.rsync(spec),
        };
        counters.push(pg_proxy.counters());
        let label = format!("{shape:?}-{tool:?}-{net}");
        self.keep(&label, &client.stderr);
        let ok = client.exit_code == 0;
        let mut row = Row {
            shape,
            tool,
            net,
            ok,
            note,
            client,
            catch_up: None,
            server_cpu,
            server_rss_kb,
            up: 0,
            down: 0,
        };
        if ok {
            let caught = self.catch_up(&pg_conninfo);
            let log = std::fs::read_to_string(self.old.log_file()).unwrap_or_default();
            self.keep(&format!("{label}-server"), &log);
            match caught {
                Ok(d) => row.catch_up = Some(d),
                Err(e) => {
                    row.ok = false;
                    row.note = format!("did not catch up: {}", tail(&e, 3));
                    eprintln!("{label}: {e}");
                }
            }
        } else {
            eprintln!("{label} failed:\n{}", tail(&row.client.stderr, 20));
            row.note = format!(
                "failed (exit {}): {}",
                row.client.exit_code,
                tail(&row.client.stderr, 2)
            );
        }
        (row.up, row.down) = add(&counters);
        if self.old.is_running() {
            self.old.stop(StopMode::Fast);
        }
        row
    }

    /// Starts the target as a standby of the new primary through `conninfo` and waits until
    /// it replayed all the new primary has written.
    fn catch_up(&mut self, conninfo: &str) -> Result<Duration, String> {
        let lsn: Lsn = self
            .new
            .query_one("SELECT pg_current_wal_lsn()")
            .parse()
            .expect("an LSN");
        let data = self.old.data_dir();
        user::write_file(&data.join("standby.signal"), "");
        let auto = data.join("postgresql.auto.conf");
        let mut text: String = std::fs::read_to_string(&auto)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        let _ = writeln!(
            text,
            "primary_conninfo = '{conninfo} application_name=rejoined'"
        );
        user::write_file(&auto, text);
        let t = Instant::now();
        self.old.try_start()?;
        self.old
            .try_wait_for_replay(&self.new, lsn, CATCH_UP_LIMIT)?;
        Ok(t.elapsed())
    }

    fn failback(&mut self, spec: LinkSpec) -> Served {
        let port = reserve_port();
        let mut cmd = Command::new(&self.failbackd);
        user::clean_env(&mut cmd);
        cmd.arg("-D")
            .arg(self.new.data_dir())
            .arg("--listen")
            .arg(local(port.port).to_string())
            .arg("--pg-conn")
            .arg(self.new.conninfo());
        if !self.wal_summaries {
            cmd.arg("--no-wal-summaries");
        }
        let server = measure::spawn(&mut cmd).expect("start failbackd");
        if !wait_listening(local(port.port), &server) {
            server.signal(libc::SIGKILL);
            panic!(
                "failbackd did not start listening:\n{}",
                server.finish().stderr
            );
        }
        // failbackd runs beside the new primary from its promotion on, summarizing each WAL
        // segment as it completes: the one started here for the run first summarizes what is
        // in pg_wal, and the rewind starts once it has (its CPU time counts in the server's).
        let summarized = self.wal_summaries.then(|| wait_summarized(&server));
        let proxy = TcpProxy::start(local(0), local(port.port), spec, spec).expect("TCP proxy");
        let report = self.work.join("report.json");
        let _ = std::fs::remove_file(&report);
        let mut client = Command::new(&self.failback);
        user::clean_env(&mut client);
        failback_rewind_args(
            &mut client,
            "rewind",
            &self.old.data_dir(),
            &format!("grpc://{}", proxy.local_addr()),
            self.jobs,
            &self.compress,
            &self.old.bins().bin_dir,
            &report,
        );
        let cost = measure::run(&mut client);
        let counters = vec![proxy.counters()];
        drop(proxy);
        server.signal(libc::SIGINT);
        let server_cost = server.finish();
        if cost.exit_code != 0 {
            eprintln!("--- failbackd ---\n{}", tail(&server_cost.stderr, 20));
        }
        if let Some(dir) = &self.log_dir {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::copy(&report, dir.join(format!("report-{}.json", self.runs)));
        }
        self.runs += 1;
        let mut note = std::fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|r| report_note(&r))
            .unwrap_or_default();
        if let Some(s) = summarized {
            let _ = write!(note, "; failbackd had summarized pg_wal before it ({s})");
        }
        Served {
            client: cost,
            server_cpu: server_cost.cpu,
            server_rss_kb: server_cost.max_rss_kb,
            counters,
            note,
        }
    }

    /// pg_rewind (`basebackup` false) or pg_basebackup through `conninfo`, the backends that
    /// serve it sampled from /proc.
    fn server_sampled(&mut self, conninfo: &str, basebackup: bool) -> Served {
        let data = self.old.data_dir();
        let (mut cmd, sampler) = if basebackup {
            // A re-clone starts from nothing.
            std::fs::remove_dir_all(&data).expect("empty the target");
            let mut cmd = user::command(binaries::pg_basebackup());
            cmd.arg("-D")
                .arg(&data)
                .args(["-X", "stream", "-c", "fast", "-d", conninfo]);
            // Its two connections are WAL senders.
            (cmd, Sampler::start(self.postmaster_pid(), "walsender", ""))
        } else {
            let mut cmd = user::command(binaries::pg_rewind());
            cmd.arg("-D")
                .arg(&data)
                .arg("--source-server")
                .arg(conninfo);
            // A plain backend over TCP; the standbys' WAL senders are not it.
            (
                cmd,
                Sampler::start(self.postmaster_pid(), "127.0.0.1(", "walsender"),
            )
        };
        let cost = measure::run(&mut cmd);
        let (cpu, rss) = sampler.stop();
        Served {
            client: cost,
            server_cpu: cpu,
            server_rss_kb: rss,
            counters: Vec::new(),
            note: "server: its backends, sampled every 20 ms (a lower bound)".into(),
        }
    }

    /// `pg_backup_start`, `rsync --checksum` from a daemon beside the new primary,
    /// `pg_backup_stop`, its label written, the old WAL removed, the file system synced.
    fn rsync(&mut self, spec: LinkSpec) -> Served {
        let port = reserve_port();
        let conf = self.work.join("rsyncd.conf");
        user::write_file(
            &conf,
            format!(
                "use chroot = no\n[pgdata]\npath = {}\nread only = yes\n",
                self.new.data_dir().display()
            ),
        );
        let mut cmd = user::command("rsync");
        cmd.args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={}", port.port))
            .arg(format!("--config={}", conf.display()))
            .arg(format!(
                "--log-file={}",
                self.work.join("rsyncd.log").display()
            ));
        let daemon = measure::spawn(&mut cmd).expect("start the rsync daemon");
        let daemon_addr = local(port.port);
        assert!(
            wait_listening(daemon_addr, &daemon),
            "the rsync daemon did not start"
        );
        let proxy = TcpProxy::start(local(0), daemon_addr, spec, spec).expect("TCP proxy");
        let data = self.old.data_dir();
        let t = Instant::now();
        let mut session = failback_sql::conninfo::connect(&self.new.conninfo(), "bench-rsync")
            .expect("connect to the new primary");
        failback_sql::backup_start(&mut session, 15, "rsync").expect("pg_backup_start");
        let mut rsync = user::command("rsync");
        rsync.args(["-a", "--checksum", "--delete"]);
        for skip in [
            "/pg_wal/*",
            "/postmaster.pid",
            "/postmaster.opts",
            "/pg_replslot/*",
            "/pg_dynshmem/*",
            "/pg_notify/*",
            "/pg_serial/*",
            "/pg_snapshots/*",
            "/pg_stat_tmp/*",
            "/pg_subtrans/*",
            "pgsql_tmp*",
            "pg_internal.init",
        ] {
            rsync.arg(format!("--exclude={skip}"));
        }
        rsync
            .arg(format!("rsync://{}/pgdata/", proxy.local_addr()))
            .arg(format!("{}/", data.display()));
        let mut cost = measure::run(&mut rsync);
        let stopped = failback_sql::backup_stop(&mut session, 15).expect("pg_backup_stop");
        drop(session);
        if cost.exit_code == 0 {
            for e in std::fs::read_dir(data.join("pg_wal"))
                .expect("read pg_wal")
                .flatten()
            {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::remove_file(e.path()).expect("remove old WAL");
                }
            }
            user::write_file(&data.join("backup_label"), &stopped.backup_label);
            if !stopped.tablespace_map.is_empty() {
                user::write_file(&data.join("tablespace_map"), &stopped.tablespace_map);
            }
            syncfs(&data);
        }
        // The whole procedure, not rsync's part alone.
        cost.wall = t.elapsed();
        let counters = vec![proxy.counters()];
        drop(proxy);
        daemon.signal(libc::SIGTERM);
        let server = daemon.finish();
        Served {
            client: cost,
            server_cpu: server.cpu,
            server_rss_kb: server.max_rss_kb,
            counters,
            note: "tool time: pg_backup_start to synced".into(),
        }
    }

    /// The new primary repeats its update `cycles` times, each followed by VACUUM and CHECKPOINT.
    fn busy(&mut self, pattern: Pattern, scale: u32, changed: u64, cycles: u32) {
        for _ in 0..cycles {
            self.new.execute(&format!(
                "{}
                 UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE {};",
                seed(1),
                changed_rows(pattern, scale, changed, 1)
            ));
            self.new.execute("VACUUM pgbench_accounts");
            self.new.execute("CHECKPOINT");
        }
    }
}

/// What failback's report says about how it found each side's changes and what it fetched.
/// Waits until failbackd says it has summarized the WAL in pg_wal; returns what it said it
/// summarized ("N segments summarized in S s").
fn wait_summarized(server: &measure::Running) -> String {
    let t0 = Instant::now();
    loop {
        let log = server.stderr_so_far();
        if let Some(line) = log.lines().find(|l| l.contains("WAL summaries: caught up")) {
            return line
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map_or(line.to_string(), |(what, _)| what.to_string());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "failbackd did not summarize its WAL within 300 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn report_note(r: &serde_json::Value) -> String {
    let side = |k: &str| {
        let s = &r[k];
        match s["found_by"].as_str() {
            Some("wal") => match s["summarized_segments"].as_u64() {
                Some(n) => format!(
                    "WAL ({} blocks; {n} segments from failbackd's summaries)",
                    s["changed_blocks"]
                ),
                None => format!("WAL ({} blocks)", s["changed_blocks"]),
            },
            Some(other) => other.to_string(),
            None => "-".into(),
        }
    };
    format!(
        "target's changes by {}, source's by {}; {:.1} MB to fetch",
        side("target_changes"),
        side("source_changes"),
        mb(r["bytes_to_fetch"].as_u64().unwrap_or(0))
    )
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn table(rows: &[&Row]) -> String {
    let mut s = String::from(
        "| tool | network | tool (s) | start-up to caught up (s) | total (s) | wire client→server (MB) | wire server→client (MB) | written to disk (MB) | client CPU (s) | server CPU (s) | client peak RSS (MB) | server peak RSS (MB) | note |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} |",
            r.tool.name(),
            r.net,
            r.client.wall.as_secs_f64(),
            secs(r.catch_up),
            secs(r.total()),
            mb(r.up),
            mb(r.down),
            mb(r.client.disk_written),
            r.client.cpu.as_secs_f64(),
            r.server_cpu.as_secs_f64(),
            r.client.max_rss_kb as f64 / 1024.0,
            r.server_rss_kb as f64 / 1024.0,
            r.note.replace('\n', " ").replace('|', "/")
        );
    }
    s
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Issue 13's goals, judged on this run's rows. `few_pages`: under 10 % of the pages differ.
fn goals(rows: &[Row], few_pages: bool) -> String {
    let mut s = String::from(
        "| shape | network | measure | value | goal | verdict |\n|---|---|---|---:|---|---|\n",
    );
    let find = |shape: Shape, tool: Tool, net: &str| {
        rows.iter()
            .find(|r| r.shape == shape && r.tool == tool && r.net == net && r.ok)
    };
    let shapes: Vec<Shape> = {
        let mut v: Vec<Shape> = rows.iter().map(|r| r.shape).collect();
        v.dedup();
        v
    };
    for &shape in &shapes {
        for net in ["loopback", "wan"] {
            let Some(f) = find(shape, Tool::Failback, net) else {
                continue;
            };
            let ft = f.total().unwrap_or_default().as_secs_f64().max(1e-9);
            let Some(b) = find(shape, Tool::PgBasebackup, net) else {
                continue;
            };
            let bt = b.total().unwrap_or_default().as_secs_f64();
            if net == "loopback" {
                let _ = writeln!(
                    s,
                    "| {} | {net} | pg_basebackup's total ÷ failback's | {:.2}× | > 1× | {} |",
                    shape.title(),
                    bt / ft,
                    verdict(bt > ft)
                );
                continue;
            }
            let need = match shape {
                Shape::TargetWalGone => 3.0,
                _ if few_pages => 5.0,
                _ => continue,
            };
            let _ = writeln!(
                s,
                "| {} | {net} | pg_basebackup's total ÷ failback's | {:.2}× | ≥ {need}× | {} |",
                shape.title(),
                bt / ft,
                verdict(bt / ft >= need)
            );
            if let Some(r) = find(shape, Tool::Rsync, net)
                && shape != Shape::TargetWalGone
            {
                let rt = r.total().unwrap_or_default().as_secs_f64();
                let _ = writeln!(
                    s,
                    "| {} | {net} | rsync's total ÷ failback's | {:.2}× | ≥ {need}× | {} |",
                    shape.title(),
                    rt / ft,
                    verdict(rt / ft >= need)
                );
            }
            if shape != Shape::TargetWalGone {
                let share = f.wire() as f64 / b.wire().max(1) as f64;
                let _ = writeln!(
                    s,
                    "| {} | {net} | failback's bytes on the wire ÷ pg_basebackup's | {share:.3} | ≤ 0.1 | {} |",
                    shape.title(),
                    verdict(share <= 0.1)
                );
            }
        }
    }
    let busy: Vec<u32> = shapes
        .iter()
        .filter_map(|s| match s {
            Shape::Busy(n) => Some(*n),
            _ => None,
        })
        .collect();
    if let (Some(&lo), Some(&hi)) = (busy.iter().min(), busy.iter().max())
        && lo < hi
    {
        for net in ["loopback", "wan"] {
            for tool in [Tool::Failback, Tool::PgRewind] {
                let (Some(a), Some(z)) = (
                    find(Shape::Busy(lo), tool, net),
                    find(Shape::Busy(hi), tool, net),
                ) else {
                    continue;
                };
                let t = z.total().unwrap_or_default().as_secs_f64()
                    / a.total().unwrap_or_default().as_secs_f64().max(1e-9);
                let w = z.wire() as f64 / a.wire().max(1) as f64;
                let (goal, ok) = if tool == Tool::Failback {
                    ("≤ 1.3", t <= 1.3 && w <= 1.3)
                } else {
                    ("(grows)", true)
                };
                let _ = writeln!(
                    s,
                    "| busy source, N = {lo} → {hi} | {net} | {}: total time × {t:.2}, bytes on the wire × {w:.2} | {:.2} | {goal} | {} |",
                    tool.name(),
                    t.max(w),
                    if tool == Tool::Failback {
                        verdict(ok)
                    } else {
                        "-"
                    }
                );
            }
        }
    }
    s
}

fn list(name: &'static str, default: &str) -> Vec<String> {
    arg(name, default.to_string())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn main() {
    let scale = arg("--scale", 100u32);
    let data: Data = arg("--data", "stock".to_string())
        .parse()
        .unwrap_or_else(|e| panic!("--data {e}"));
    let pattern: Pattern = arg("--pattern", "contiguous".to_string())
        .parse()
        .unwrap_or_else(|e| panic!("--pattern {e}"));
    let shapes: Vec<Shape> = list("--shapes", "1pct,wal-gone,busy1,busy4,busy16")
        .iter()
        .map(|s| Shape::parse(s))
        .collect();
    let tools: Vec<Tool> = list("--tools", "failback,pg_rewind,pg_basebackup,rsync")
        .iter()
        .map(|s| Tool::parse(s))
        .collect();
    let delay_ms = arg("--delay-ms", 25u64);
    let rate_mbit = arg("--rate-mbit", 200u64);
    let wan = LinkSpec::wan(Duration::from_millis(delay_ms), rate_mbit);
    let nets: Vec<(&'static str, LinkSpec)> = list("--nets", "loopback,wan")
        .iter()
        .map(|n| match n.as_str() {
            "loopback" => ("loopback", LinkSpec::unlimited()),
            "wan" => ("wan", wan),
            _ => panic!("--nets: {n:?} is not loopback or wan"),
        })
        .collect();
    let bin_dir = arg("--bin-dir", String::new());
    let bin_dir = (!bin_dir.is_empty()).then(|| PathBuf::from(bin_dir));
    let log_dir = arg("--log-dir", String::new());
    let log_dir = (!log_dir.is_empty()).then(|| PathBuf::from(log_dir));
    let jobs = arg("--jobs", 16u32);
    let compress = arg("--compress", "auto".to_string());
    let wal_summaries = !flag("--no-wal-summaries");
    let path = args::out_file(&format!(
        "rewind_shapes-{}-{}-{}.md",
        today(),
        format!("{data:?}").to_lowercase(),
        format!("{pattern:?}").to_lowercase()
    ));
    args::done();
    assert!(
        Command::new("rsync").arg("--version").output().is_ok(),
        "rsync is not installed (apt-get install rsync)"
    );

    let started = Instant::now();
    let load_before = loadavg();
    let DivergedPair {
        old, new, changed, ..
    } = DivergedPair::build_with(scale, 1, data, pattern);
    let work = old.base_dir().join("bench");
    user::create_dir(&work);
    let pristine = work.join("pristine");
    copy_dir(&old.data_dir(), &pristine);
    let target_size = dir_size(&old.data_dir());
    let mut b = Bench {
        old,
        new,
        pristine: pristine.clone(),
        source: work.join("source"),
        work,
        failback: workspace_binary("failback", bin_dir.as_deref()),
        failbackd: workspace_binary("failbackd", bin_dir.as_deref()),
        jobs,
        compress,
        wal_summaries,
        log_dir,
        runs: 0,
    };
    // The source keeps all its WAL since the split (as an archive would), so pg_rewind can
    // run however busy it was; failback does not need it.
    b.new.append_conf("wal_keep_size = '64GB'\n");
    b.new.start();
    b.new.execute("CHECKPOINT");
    b.save_source();
    let divergence = switch_point(&b.new, 2);
    eprintln!("pair ready after {:.0?}", started.elapsed());

    let ticks_before = cpu_ticks();
    let mut rows = Vec::new();
    let mut cycles = 0;
    let mut shape_notes = Vec::new();
    for &shape in &shapes {
        b.pristine = pristine.clone();
        match shape {
            Shape::OnePercent => {}
            Shape::TargetWalGone => {
                let gone = b.work.join("pristine-wal-gone");
                if b.old.is_running() {
                    b.old.stop(StopMode::Fast);
                }
                copy_dir(&pristine, &b.old.data_dir());
                let removed = remove_wal_since(&b.old, divergence);
                assert!(
                    !removed.is_empty(),
                    "the target's WAL since the divergence is all in the segment of its last checkpoint"
                );
                copy_dir(&b.old.data_dir(), &gone);
                b.pristine = gone;
                shape_notes.push(format!(
                    "- {}: {} segments removed from the target's pg_wal (from the divergence at {divergence} to its last checkpoint's).",
                    shape.title(),
                    removed.len()
                ));
            }
            Shape::Busy(n) => {
                assert!(n >= cycles, "--shapes: busy cycles must grow");
                b.restore_source();
                let before: Lsn = b
                    .new
                    .query_one("SELECT pg_current_wal_lsn()")
                    .parse()
                    .unwrap();
                b.busy(pattern, scale, changed, n - cycles);
                cycles = n;
                let after: Lsn = b
                    .new
                    .query_one("SELECT pg_current_wal_lsn()")
                    .parse()
                    .unwrap();
                b.save_source();
                shape_notes.push(format!(
                    "- {}: the new primary had written {:.0} MB of WAL since the divergence ({:.0} MB in these cycles).",
                    shape.title(),
                    mb(after.0 - divergence.0),
                    mb(after.0 - before.0)
                ));
            }
        }
        for &(net, spec) in &nets {
            for &tool in &tools {
                let row = b.run(shape, tool, net, spec);
                eprintln!(
                    "  {} {net}: tool {:.1} s, caught up after {} s, {:.1} MB on the wire",
                    tool.name(),
                    row.client.wall.as_secs_f64(),
                    secs(row.catch_up),
                    mb(row.wire())
                );
                rows.push(row);
            }
        }
    }
    let ticks_after = cpu_ticks();
    let steal = steal_percent(ticks_before, ticks_after);
    let few_pages = pattern == Pattern::Contiguous;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Rewound to a caught-up standby: failback, pg_rewind, pg_basebackup, rsync — {} ({data:?} data, {pattern:?} changes)\n",
        today()
    );
    let _ = writeln!(
        out,
        "PostgreSQL 15, pgbench scale {scale} (target data directory {:.0} MB), {changed} accounts changed on each side ({}). \
         Data: {}. failback: --jobs {} --compress {}{}. Loopback: the proxy with no delay and no cap (TCP relayed inside the kernel). \
         WAN: {delay_ms} ms each way ({} ms RTT), {rate_mbit} Mbit/s each way (`failback_bench::wan`). \
         Every run started from the same saved pair (the target written back to disk first, the new primary started from its own saved copy) and ended when the node, \
         started as a standby of the new primary through the same link, had replayed all the new primary had written when the tool finished. \
         Written to disk: what the machine's disks wrote from the tool's start to its end, a sync at both (the target's files, and the new primary's checkpoint for a backup window); \
         the tool's own count (`write_bytes`) charges each 8 KiB block written into a file the kernel caches in large folios as a whole folio, several times the bytes where blocks are scattered. \
         One round per run; the machine is shared (2 CPUs, load average {load_before} at the start, {} at the end, {steal:.0} % of CPU time stolen).\n",
        mb(target_size),
        match pattern {
            Pattern::Contiguous => "a contiguous range on each: about 1 % of the pages",
            Pattern::Random => "rows drawn at random: about 45 % of the table's pages on each side",
        },
        match data {
            Data::Stock => "pgbench's own (blank filler: pages compress more than ten to one)",
            Data::Realistic =>
                "realistic (84 random hex digits of filler a row: pages compress about 2.5 to one)",
        },
        b.jobs,
        b.compress,
        if b.wal_summaries {
            " (failbackd with its WAL summaries: the rewind starts once it has summarized what \
             is in pg_wal, as one running beside the new primary since the promotion has; \
             the server's CPU time includes that)"
        } else {
            ", failbackd --no-wal-summaries"
        },
        2 * delay_ms,
        loadavg(),
    );
    for n in &shape_notes {
        let _ = writeln!(out, "{n}");
    }
    for &shape in &shapes {
        let these: Vec<&Row> = rows.iter().filter(|r| r.shape == shape).collect();
        let _ = writeln!(out, "\n## {}\n", shape.title());
        out.push_str(&table(&these));
    }
    out.push_str("\n## Against issue 13's goals\n\n");
    out.push_str(&goals(&rows, few_pages));
    println!("{out}");
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
