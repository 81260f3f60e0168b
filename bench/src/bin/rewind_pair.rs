//! failback's server/client pair vs `pg_rewind --source-server`, on loopback and through a
//! simulated WAN, side by side in one run.
//!
//! The input is [`failback_bench::pair::DivergedPair`] (pgbench scale 100 by default, 1 % of
//! the accounts changed on each side unless `--changed-percent`). The old primary's data directory is saved once and
//! restored before every run, so every tool rewinds the very same target:
//!
//! - `pg_rewind --source-server` (PostgreSQL 15's) against the running new primary, through
//!   a TCP [`TcpProxy`];
//! - `failback rewind --source grpc://…` through `failbackd`, through a TCP proxy;
//! - `failback rewind --source quic://…` through a UDP [`UdpProxy`], when `failbackd --help`
//!   offers `--quic-listen`;
//! - `failback rewind --source-server` against the running new primary through the same kind
//!   of TCP proxy as pg_rewind: plain libpq, no failbackd, when `failback rewind --help` offers
//!   it.
//!
//! `failbackd` serves the running new primary when it offers `--pg-conn`, otherwise its
//! shut-down data directory (the output says which). Each tool runs once on loopback (the proxy
//! with no delay and no cap, so bytes on the wire are counted the same way) and once through
//! the WAN (`--delay-ms` each way, `--rate-mbit` each way). Reported: wall time, bytes on the
//! wire each way, CPU time and peak RSS of the client and of the server side (failbackd; the
//! PostgreSQL backend that served pg_rewind, sampled from /proc). After all measured runs, one
//! more failback rewind (gRPC, WAN) is started as a standby of the new primary and the
//! fingerprints of all tables compared: last, because the rejoin makes the source write WAL
//! that a later run would have to copy too. Before every run the restored target is written
//! back to disk (syncfs), so no tool pays for the restore's dirty pages. The table goes to
//! stdout and to `bench/results/rewind_pair-<date>.md`.
//!
//! ```text
//! cargo build --release -p failback-client -p failback-server -p failback-bench
//! target/release/rewind_pair [--scale 100] [--changed-percent 1] [--delay-ms 25] [--rate-mbit 200] [--jobs 16]
//!     [--compress 1] [--bin-dir DIR] [--baseline-bin-dir DIR] [--source-mode auto|stopped|running] [--out FILE]
//!     [--rounds N] [--no-sync] [--log-dir DIR] [--perf DIR] [--skip-pg-rewind] [--skip-verify]
//!     [--hold FILE] [--data stock|realistic] [--pattern contiguous|random]
//!     [--kept-wal-mb N] [--skip-failbackd]
//! ```
//!
//! `--kept-wal-mb N` builds the pair with N MB of WAL written before the divergence and kept
//! on both sides (`wal_keep_size`): pg_rewind copies it all, failback none of it.
//! `--skip-failbackd` leaves out the failbackd rows (the libpq comparison alone).
//! `--baseline-bin-dir DIR` also runs the `failback`/`failbackd` of another build (an earlier
//! commit's `target/release`) in every round, beside this build's, and reports this build's
//! wall time against it round by round: a change is no slower when the median ratio is about 1.
//! `--data` and `--pattern` build the pair as `rewind_shapes` does (realistic filler, rows
//! drawn at random). `--changed-percent P` changes P % of the accounts on each side instead of 1 %: a rewind
//! whose bytes, not its round trips, take most of the time on the link.
//! `--rounds N` runs every configuration N times, round by round (each round runs every tool
//! once, so all see the same neighbours), and reports the round with the median wall time
//! and the median of the per-round speed-ups (the machine is shared: single runs are noisy). `--no-sync` passes `-N` to both tools (no final flush), to see the network's share of the
//! time; `--log-dir` keeps each run's `--debug` output and failback's report; `--perf DIR` runs
//! failback and failbackd under `perf record -g` (a profiling run, not a measurement);
//! `--hold FILE` builds the pair, starts the source, writes where everything is to FILE and
//! waits until FILE is removed, for runs by hand.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use failback_bench::host::{
    Proxy, cpu_ticks, dir_size, failback_rewind_args, help_of, loadavg, mb, syncfs, tail, today,
    wait_listening,
};
use failback_bench::measure::{self, Cost, Sampler};
use failback_bench::pair::{DivergedPair, arg, copy_dir, flag, workspace_binary};
use failback_bench::wan::{LinkSpec, TcpProxy, UdpProxy};
use failback_tests::port::reserve_port;
use failback_tests::rewind::rejoin;
use failback_tests::{Cluster, StopMode, binaries, user};

/// The row of `failback rewind --source-server`.
const LIBPQ: &str = "failback --source-server";

/// One measured rewind.
struct Row {
    tool: String,
    net: &'static str,
    ok: bool,
    client: Cost,
    /// Server side: failbackd, or the backend that served pg_rewind.
    server_cpu: Option<Duration>,
    server_rss_kb: Option<u64>,
    up: u64,
    down: u64,
    dropped: u64,
    /// failback's `--report` phase times.
    phases: Option<serde_json::Value>,
    note: String,
    /// Every round's wall time in seconds, in round order (set by [`median`]).
    walls: Vec<f64>,
}

impl Row {
    fn wire(&self) -> u64 {
        self.up + self.down
    }
}

struct Bench {
    old: Cluster,
    new: Cluster,
    pristine: PathBuf,
    work: PathBuf,
    failback: PathBuf,
    failbackd: PathBuf,
    /// Another build's `failback` and `failbackd`, run beside these (`--baseline-bin-dir`).
    baseline: Option<(PathBuf, PathBuf)>,
    jobs: u32,
    compress: String,
    /// failbackd serves the running new primary through `--pg-conn`.
    running_source: bool,
    /// `-N` for both tools: leave out the final flush to disk, to see the network's share.
    no_sync: bool,
    /// Where to keep each run's stderr and failback's report.
    log_dir: Option<PathBuf>,
    /// Run failback and failbackd under `perf record -g`, profiles written here.
    perf_dir: Option<PathBuf>,
}

impl Bench {
    /// A command for `bin`, under `perf record` when profiling (perf's own CPU time and memory
    /// are then counted too: a profiling run is not a measurement).
    fn profiled(&self, bin: &Path, name: &str) -> Command {
        let mut cmd = match &self.perf_dir {
            Some(dir) => {
                let _ = std::fs::create_dir_all(dir);
                let mut c = Command::new("perf");
                c.args(["record", "-g", "-q", "-o"])
                    .arg(dir.join(format!("{name}.data")))
                    .arg("--")
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        user::clean_env(&mut cmd);
        cmd
    }

    fn restore(&mut self) {
        if self.old.is_running() {
            self.old.stop(StopMode::Fast);
        }
        copy_dir(&self.pristine, &self.old.data_dir());
        syncfs(&self.old.data_dir());
    }

    fn failback_run(&mut self, net: &'static str, spec: LinkSpec, quic: bool) -> Row {
        let (failback, failbackd) = (self.failback.clone(), self.failbackd.clone());
        let tool = if quic {
            "failback (QUIC)"
        } else {
            "failback (gRPC)"
        };
        self.failback_run_of(&failback, &failbackd, tool, net, spec, quic)
    }

    /// [`Bench::failback_run`] with the baseline build's binaries, labelled as such.
    fn baseline_run(&mut self, net: &'static str, spec: LinkSpec, quic: bool) -> Option<Row> {
        let (failback, failbackd) = self.baseline.clone()?;
        let tool = if quic {
            "failback (QUIC), baseline"
        } else {
            "failback (gRPC), baseline"
        };
        Some(self.failback_run_of(&failback, &failbackd, tool, net, spec, quic))
    }

    fn failback_run_of(
        &mut self,
        failback: &Path,
        failbackd: &Path,
        tool: &'static str,
        net: &'static str,
        spec: LinkSpec,
        quic: bool,
    ) -> Row {
        self.restore();
        let grpc_port = reserve_port();
        let quic_port = reserve_port();
        let local = |p: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], p)) };
        let name = format!("{}-{net}", if quic { "quic" } else { "grpc" });
        let mut cmd = self.profiled(failbackd, &format!("failbackd-{name}"));
        cmd.arg("-D")
            .arg(self.new.data_dir())
            .arg("--listen")
            .arg(local(grpc_port.port).to_string());
        let ca = self.work.join("tls-cert.pem");
        if quic {
            // QUIC always runs TLS: a throwaway self-signed certificate, trusted by the client.
            let key = self.work.join("tls-key.pem");
            let ck = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .expect("a self-signed certificate");
            std::fs::write(&ca, ck.cert.pem()).expect("write the certificate");
            std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write the key");
            cmd.arg("--quic-listen")
                .arg(local(quic_port.port).to_string())
                .arg("--tls-cert")
                .arg(&ca)
                .arg("--tls-key")
                .arg(&key);
        }
        if self.running_source {
            cmd.arg("--pg-conn").arg(self.new.conninfo());
        }
        let server = measure::spawn(&mut cmd).expect("start failbackd");
        if !wait_listening(local(grpc_port.port), &server) {
            server.signal(libc::SIGKILL);
            let c = server.finish();
            panic!("failbackd did not start listening:\n{}", c.stderr);
        }
        let proxy = if quic {
            // QUIC listens on UDP; give it a moment after the TCP listener is up.
            std::thread::sleep(Duration::from_millis(200));
            Proxy::Udp(
                UdpProxy::start(local(0), local(quic_port.port), spec, spec).expect("UDP proxy"),
            )
        } else {
            Proxy::Tcp(
                TcpProxy::start(local(0), local(grpc_port.port), spec, spec).expect("TCP proxy"),
            )
        };
        let url = format!("{}://{}", if quic { "quic" } else { "grpc" }, proxy.addr());
        let report = self.work.join(format!(
            "report-{}-{net}.json",
            if quic { "quic" } else { "grpc" }
        ));
        let _ = std::fs::remove_file(&report);
        let mut client = self.profiled(failback, &format!("failback-{name}"));
        failback_rewind_args(
            &mut client,
            &self.old.data_dir(),
            &url,
            self.jobs,
            &self.compress,
            &self.old.bins().bin_dir,
            &report,
        );
        client.arg("--debug");
        if quic {
            client.arg("--ca").arg(&ca);
        }
        if self.no_sync {
            client.arg("-N");
        }
        eprintln!("running failback rewind --source {url} ({net})");
        let cost = measure::run(&mut client);
        let (up, down, dropped) = proxy.counters().snapshot();
        drop(proxy);
        server.signal(libc::SIGINT);
        let server_cost = server.finish();
        self.keep(&name, &cost.stderr, Some(&report));
        let phases = std::fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|v| v["seconds"].clone());
        let ok = cost.exit_code == 0;
        let note = if ok {
            String::new()
        } else {
            format!(
                "failed (exit {}): {}",
                cost.exit_code,
                tail(&cost.stderr, 5)
            )
        };
        if !ok {
            eprintln!(
                "{tool} over {net} failed:\n{}\n--- failbackd ---\n{}",
                cost.stderr,
                tail(&server_cost.stderr, 20)
            );
        }
        Row {
            tool: tool.to_string(),
            net,
            ok,
            client: cost,
            server_cpu: Some(server_cost.cpu),
            server_rss_kb: Some(server_cost.max_rss_kb),
            up,
            down,
            dropped,
            phases,
            note,
            walls: Vec::new(),
        }
    }

    /// The restored target, and a libpq link to the running new primary as pg_rewind and
    /// `failback --source-server` both reach it: a TCP proxy shaped by `spec`, the conninfo
    /// through it, and a sampler of the backends serving connections over TCP (the test bed's
    /// own connections may be TCP too, but none is open while a rewind runs).
    fn libpq_link(&mut self, spec: LinkSpec) -> (TcpProxy, Sampler, String) {
        self.restore();
        let target = SocketAddr::from(([127, 0, 0, 1], self.new.port()));
        let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), target, spec, spec)
            .expect("TCP proxy");
        let postmaster: u32 = std::fs::read_to_string(self.new.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            .expect("the new primary's postmaster.pid");
        let sampler = Sampler::start(postmaster, "127.0.0.1(", "walsender");
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            proxy.local_addr().port()
        );
        (proxy, sampler, conninfo)
    }

    fn pg_rewind_run(&mut self, net: &'static str, spec: LinkSpec) -> Row {
        let (proxy, sampler, conninfo) = self.libpq_link(spec);
        eprintln!("running pg_rewind --source-server '{conninfo}' ({net})");
        let mut cmd = user::command(binaries::pg_rewind());
        cmd.arg("-D")
            .arg(self.old.data_dir())
            .arg("--source-server")
            .arg(&conninfo)
            .arg("--debug");
        if self.no_sync {
            cmd.arg("-N");
        }
        let cost = measure::run(&mut cmd);
        self.keep(&format!("pg_rewind-{net}"), &cost.stderr, None);
        let (server_cpu, server_rss) = sampler.stop();
        let (up, down, dropped) = proxy.counters().snapshot();
        let ok = cost.exit_code == 0;
        assert!(ok, "pg_rewind over {net} failed:\n{}", cost.stderr);
        Row {
            tool: "pg_rewind --source-server".to_string(),
            net,
            ok,
            client: cost,
            server_cpu: Some(server_cpu),
            server_rss_kb: Some(server_rss),
            up,
            down,
            dropped,
            phases: None,
            note: "server CPU/RSS: the backend, sampled every 20 ms (lower bound)".to_string(),
            walls: Vec::new(),
        }
    }

    /// `failback rewind --source-server`: the same libpq link as pg_rewind's, no failbackd.
    fn libpq_run(&mut self, net: &'static str, spec: LinkSpec) -> Row {
        let (proxy, sampler, conninfo) = self.libpq_link(spec);
        let report = self.work.join(format!("report-libpq-{net}.json"));
        let _ = std::fs::remove_file(&report);
        eprintln!("running failback rewind --source-server '{conninfo}' ({net})");
        let mut cmd = self.profiled(&self.failback.clone(), &format!("failback-libpq-{net}"));
        cmd.arg("rewind")
            .arg("-D")
            .arg(self.old.data_dir())
            .arg("--source-server")
            .arg(&conninfo)
            .arg("--jobs")
            .arg(self.jobs.to_string())
            .arg("--pg-bindir")
            .arg(&self.old.bins().bin_dir)
            .arg("--report")
            .arg(&report)
            .arg("--debug");
        if self.no_sync {
            cmd.arg("-N");
        }
        let cost = measure::run(&mut cmd);
        self.keep(&format!("libpq-{net}"), &cost.stderr, Some(&report));
        let (server_cpu, server_rss) = sampler.stop();
        let (up, down, dropped) = proxy.counters().snapshot();
        let ok = cost.exit_code == 0;
        let phases = std::fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|v| v["seconds"].clone());
        let note = if ok {
            "server CPU/RSS: the backends, sampled every 20 ms (lower bound)".to_string()
        } else {
            eprintln!(
                "failback --source-server over {net} failed:\n{}",
                cost.stderr
            );
            format!(
                "failed (exit {}): {}",
                cost.exit_code,
                tail(&cost.stderr, 5)
            )
        };
        Row {
            tool: LIBPQ.to_string(),
            net,
            ok,
            client: cost,
            server_cpu: Some(server_cpu),
            server_rss_kb: Some(server_rss),
            up,
            down,
            dropped,
            phases,
            note,
            walls: Vec::new(),
        }
    }

    /// Copies a run's stderr (and report) into `--log-dir`, timestamps kept by the tools.
    fn keep(&self, name: &str, stderr: &str, report: Option<&Path>) {
        let Some(dir) = &self.log_dir else {
            return;
        };
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(dir.join(format!("{name}.stderr")), stderr);
        if let Some(r) = report {
            let _ = std::fs::copy(r, dir.join(format!("{name}.report.json")));
        }
    }

    /// Starts the rewound target as a standby of the new primary and compares fingerprints.
    fn verify(&mut self) {
        eprintln!("verifying: the rewound target rejoins as a standby, fingerprints compared");
        rejoin(&mut self.old, &mut self.new);
        self.old.stop(StopMode::Fast);
    }
}

/// The round with the median wall time (failed rounds first, so a failure is not hidden),
/// its note listing every round's wall time.
fn median(mut rounds: Vec<Row>) -> Row {
    let in_order: Vec<f64> = rounds.iter().map(|r| r.client.wall.as_secs_f64()).collect();
    rounds.sort_by(|a, b| a.ok.cmp(&b.ok).then(a.client.wall.cmp(&b.client.wall)));
    let walls: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.client.wall.as_secs_f64()))
        .collect();
    let failed = rounds.iter().any(|r| !r.ok);
    let mid = if failed { 0 } else { rounds.len() / 2 };
    let n = rounds.len();
    let mut row = rounds.swap_remove(mid);
    row.walls = in_order;
    if n > 1 {
        row.note = format!(
            "median of {n} rounds (walls {} s). {}",
            walls.join(" / "),
            row.note
        );
    }
    row
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| tool | network | wall (s) | wire client→server (MB) | wire server→client (MB) | wire total (MB) | client CPU (s) | server CPU (s) | client peak RSS (MB) | server peak RSS (MB) | note |\n",
    );
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {} | {} |",
            r.tool,
            r.net,
            r.client.wall.as_secs_f64(),
            mb(r.up),
            mb(r.down),
            mb(r.wire()),
            r.client.cpu.as_secs_f64(),
            r.server_cpu
                .map_or("-".to_string(), |c| format!("{:.2}", c.as_secs_f64())),
            r.client.max_rss_kb as f64 / 1024.0,
            r.server_rss_kb
                .map_or("-".to_string(), |k| format!("{:.1}", k as f64 / 1024.0)),
            if r.ok {
                if r.dropped > 0 {
                    format!(
                        "{} datagrams dropped at the bottleneck. {}",
                        r.dropped, r.note
                    )
                } else {
                    r.note.clone()
                }
            } else {
                r.note.replace('\n', " ")
            }
        );
    }
    s
}

/// The median over rounds of `slow[i] / fast[i]`: the tools of one round ran back to back,
/// under the same load from the machine's other tenants. None with fewer than two rounds.
fn paired_speedup(slow: &[f64], fast: &[f64]) -> Option<f64> {
    if slow.len() < 2 || slow.len() != fast.len() {
        return None;
    }
    let mut r: Vec<f64> = slow
        .iter()
        .zip(fast)
        .map(|(s, f)| s / f.max(1e-9))
        .collect();
    r.sort_by(f64::total_cmp);
    let n = r.len();
    Some(if n % 2 == 1 {
        r[n / 2]
    } else {
        (r[n / 2 - 1] + r[n / 2]) / 2.0
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The rows of `tool` against pg_rewind on `net`: bytes on the wire, speed-up, and the
/// speed-up round by round; each goal is its words and the bound it means.
fn against_pg_rewind(
    s: &mut String,
    tool: &str,
    net: &str,
    f: &Row,
    p: &Row,
    (bytes_goal, bytes_need): (&str, f64),
    (speed_goal, speed_need): (&str, f64),
) {
    let bytes = f.wire() as f64 / p.wire().max(1) as f64;
    let _ = writeln!(
        s,
        "| {tool} | {net} | bytes on the wire ÷ pg_rewind's | {bytes:.3} | {bytes_goal} | {} |",
        verdict(bytes <= bytes_need)
    );
    let speed = p.client.wall.as_secs_f64() / f.client.wall.as_secs_f64().max(1e-9);
    let _ = writeln!(
        s,
        "| {tool} | {net} | speed-up (pg_rewind wall ÷ failback wall) | {speed:.2}× | {speed_goal} | {} |",
        verdict(speed >= speed_need)
    );
    if let Some(paired) = paired_speedup(&p.walls, &f.walls) {
        let _ = writeln!(
            s,
            "| {tool} | {net} | speed-up round by round (median over rounds of that round's pg_rewind wall ÷ failback wall) | {paired:.2}× | {speed_goal} | {} |",
            verdict(paired >= speed_need)
        );
    }
}

fn goals(rows: &[Row], rate_bits: u64, kept_wal_mb: u64) -> String {
    let mut s = String::new();
    let find = |tool: &str, net: &str| rows.iter().find(|r| r.tool == tool && r.net == net && r.ok);
    s.push_str(
        "| pair | network | measure | value | goal | verdict |\n|---|---|---|---:|---|---|\n",
    );
    // The same libpq link as pg_rewind (issue 15): never slower, never more bytes; with much
    // WAL kept from before the divergence, ≥ 5× faster through the WAN with ≤ 1/10 the bytes.
    for net in ["loopback", "wan"] {
        let (Some(f), Some(p)) = (find(LIBPQ, net), find("pg_rewind --source-server", net)) else {
            continue;
        };
        let (bytes_goal, speed_goal) = if kept_wal_mb > 0 && net == "wan" {
            (("≤ 0.1", 0.1), ("≥ 5×", 5.0))
        } else {
            (("≤ 1", 1.0), ("≥ 1×", 1.0))
        };
        against_pg_rewind(&mut s, LIBPQ, net, f, p, bytes_goal, speed_goal);
    }
    for tool in ["failback (gRPC)", "failback (QUIC)"] {
        for net in ["loopback", "wan"] {
            let (Some(f), Some(p)) = (find(tool, net), find("pg_rewind --source-server", net))
            else {
                continue;
            };
            let speed_goal = if net == "wan" {
                ("≥ 5×", 5.0)
            } else {
                ("≥ 2×", 2.0)
            };
            against_pg_rewind(&mut s, tool, net, f, p, ("≤ 0.333", 1.0 / 3.0), speed_goal);
            if net == "wan" {
                let floor = f.down as f64 * 8.0 / rate_bits.max(1) as f64;
                let ratio = f.client.wall.as_secs_f64() / floor.max(1e-9);
                let _ = writeln!(
                    s,
                    "| {tool} | {net} | wall ÷ (server→client bytes ÷ link rate = {floor:.2} s) | {ratio:.2} | ≤ 1.3 | {} |",
                    verdict(ratio <= 1.3)
                );
            }
        }
    }
    s
}

/// This build's wall time against the baseline build's, per tool and network: the ratio of the
/// medians, and the median of each round's ratio (both ran in the same round, back to back).
fn against_baseline(rows: &[Row]) -> String {
    let mut s = String::from(
        "| tool | network | wall (s) | baseline wall (s) | wall ÷ baseline's | round by round |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for tool in ["failback (gRPC)", "failback (QUIC)"] {
        for net in ["loopback", "wan"] {
            let base = format!("{tool}, baseline");
            let find = |t: &str| rows.iter().find(|r| r.tool == t && r.net == net && r.ok);
            let (Some(new), Some(old)) = (find(tool), find(&base)) else {
                continue;
            };
            let (w, b) = (new.client.wall.as_secs_f64(), old.client.wall.as_secs_f64());
            let paired = paired_speedup(&new.walls, &old.walls)
                .map_or("-".to_string(), |r| format!("{r:.2}"));
            let _ = writeln!(
                s,
                "| {tool} | {net} | {w:.2} | {b:.2} | {:.2} | {paired} |",
                w / b.max(1e-9)
            );
        }
    }
    s
}

fn main() {
    let scale = arg("--scale", 100u32);
    let percent = arg("--changed-percent", 1u32);
    let delay_ms = arg("--delay-ms", 25u64);
    let rate_mbit = arg("--rate-mbit", 200u64);
    let jobs = arg("--jobs", 16u32);
    let compress = arg("--compress", "1".to_string());
    let bin_dir = arg("--bin-dir", String::new());
    let source_mode = arg("--source-mode", "auto".to_string());
    let no_sync = flag("--no-sync");
    let rounds = arg("--rounds", 1usize).max(1);
    let skip_pg_rewind = flag("--skip-pg-rewind");
    let skip_verify = flag("--skip-verify");
    let skip_failbackd = flag("--skip-failbackd");
    let kept_wal_mb = arg("--kept-wal-mb", 0u64);
    let log_dir = arg("--log-dir", String::new());
    let log_dir = (!log_dir.is_empty()).then(|| PathBuf::from(log_dir));
    let perf_dir = arg("--perf", String::new());
    let perf_dir = (!perf_dir.is_empty()).then(|| PathBuf::from(perf_dir));
    let bin_dir = (!bin_dir.is_empty()).then(|| PathBuf::from(bin_dir));
    let failback = workspace_binary("failback", bin_dir.as_deref());
    let failbackd = workspace_binary("failbackd", bin_dir.as_deref());
    let baseline = arg("--baseline-bin-dir", String::new());
    let baseline = (!baseline.is_empty()).then(|| {
        let dir = PathBuf::from(baseline);
        (
            workspace_binary("failback", Some(&dir)),
            workspace_binary("failbackd", Some(&dir)),
        )
    });
    let daemon_help = help_of(&failbackd, &[]);
    let client_help = help_of(&failback, &["rewind"]);
    let quic = daemon_help.contains("--quic-listen") && client_help.contains("quic");
    let pg_conn = daemon_help.contains("--pg-conn");
    let libpq = client_help.contains("--source-server");
    let running_source = match source_mode.as_str() {
        "running" => true,
        "stopped" => false,
        _ => pg_conn,
    };
    let data: failback_bench::pair::Data = arg("--data", "stock".to_string())
        .parse()
        .unwrap_or_else(|e| panic!("--data: {e}"));
    let pattern: failback_bench::pair::Pattern = arg("--pattern", "contiguous".to_string())
        .parse()
        .unwrap_or_else(|e| panic!("--pattern: {e}"));
    let wan = LinkSpec::wan(Duration::from_millis(delay_ms), rate_mbit);
    let nets: [(&'static str, LinkSpec); 2] = [("loopback", LinkSpec::unlimited()), ("wan", wan)];

    let started = Instant::now();
    let load_before = loadavg();
    let DivergedPair {
        old, new, changed, ..
    } = DivergedPair::build_keeping(scale, percent, data, pattern, kept_wal_mb);
    let work = old.base_dir().join("bench");
    user::create_dir(&work);
    let pristine = work.join("pristine");
    copy_dir(&old.data_dir(), &pristine);
    let target_size: u64 = dir_size(&old.data_dir());
    let mut b = Bench {
        old,
        new,
        pristine,
        work,
        failback,
        failbackd,
        baseline,
        jobs,
        compress,
        running_source,
        no_sync,
        log_dir,
        perf_dir,
    };
    eprintln!("pair ready after {:.0?}", started.elapsed());

    let mut rows = Vec::new();
    let mut verified = String::from("not run");
    if b.running_source {
        b.new.start();
        b.new.execute("CHECKPOINT");
    }
    let hold = arg("--hold", String::new());
    if !hold.is_empty() {
        hold_for_manual_runs(&b, Path::new(&hold));
        return;
    }
    // Round by round, every tool in turn: the machine is shared, and a tool measured only
    // while a neighbour is busy would carry that neighbour's load in its median.
    let ticks_before = cpu_ticks();
    let mut runs: Vec<Vec<Row>> = Vec::new();
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        let mut this_round = Vec::new();
        for (net, spec) in nets {
            if !b.running_source && b.new.is_running() {
                b.new.stop(StopMode::Fast);
            }
            if !skip_failbackd {
                this_round.push(b.failback_run(net, spec, false));
                this_round.extend(b.baseline_run(net, spec, false));
                if quic {
                    this_round.push(b.failback_run(net, spec, true));
                    this_round.extend(b.baseline_run(net, spec, true));
                }
            }
            // pg_rewind and failback --source-server need the source running, and pg_rewind a
            // checkpoint on its new timeline.
            if !b.new.is_running() && (libpq || !skip_pg_rewind) {
                b.new.start();
            }
            if round == 0 && !skip_pg_rewind {
                b.new.execute("CHECKPOINT");
            }
            if libpq {
                this_round.push(b.libpq_run(net, spec));
            }
            if !skip_pg_rewind {
                this_round.push(b.pg_rewind_run(net, spec));
            }
        }
        runs.push(this_round);
    }
    let ticks_after = cpu_ticks();
    let mut columns: Vec<Vec<Row>> = Vec::new();
    for round in runs {
        columns.resize_with(round.len(), Vec::new);
        for (i, row) in round.into_iter().enumerate() {
            columns[i].push(row);
        }
    }
    rows.extend(columns.into_iter().map(median));
    // Last, not before a measured run: the rejoin makes the source write WAL, and a later
    // run would have more to copy than the others.
    if !skip_verify {
        if !b.running_source && b.new.is_running() {
            b.new.stop(StopMode::Fast);
        }
        let (ok, how) = if skip_failbackd && libpq {
            if !b.new.is_running() {
                b.new.start();
            }
            (b.libpq_run("wan", wan).ok, "--source-server")
        } else {
            (b.failback_run("wan", wan, false).ok, "gRPC")
        };
        if ok {
            b.verify();
            verified = format!(
                "after all measured runs, one more failback rewind ({how}, WAN; not in the table) started as a standby of the new primary, caught up, and every table's fingerprint matched"
            );
        } else {
            verified = format!("FAILED: the verification rewind ({how}, WAN) did not succeed");
        }
    }
    let mode = if skip_failbackd {
        "no failbackd rows (--skip-failbackd): pg_rewind and failback --source-server, both against the running new primary"
    } else if b.running_source {
        "failbackd served the RUNNING new primary (--pg-conn), as pg_rewind --source-server does"
    } else if pg_conn {
        "failbackd served the new primary's data directory while it was SHUT DOWN (--source-mode stopped); pg_rewind ran against the running server"
    } else {
        "failbackd served the new primary's data directory while it was SHUT DOWN (this failbackd has no --pg-conn yet); pg_rewind ran against the running server"
    };
    let quic_note = if skip_failbackd {
        "QUIC: not measured (--skip-failbackd)."
    } else if quic {
        "QUIC: measured (failbackd --quic-listen, failback --source quic://) through the UDP proxy."
    } else {
        "QUIC: skipped — this failbackd has no --quic-listen (or this failback no quic:// source)."
    };
    let load_after = loadavg();
    let steal = (ticks_after.1 - ticks_before.1) as f64 * 100.0
        / (ticks_after.0 - ticks_before.0).max(1) as f64;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# failback pair vs pg_rewind --source-server — {}\n",
        today()
    );
    let _ = writeln!(
        out,
        "PostgreSQL 15, pgbench scale {scale} ({data:?} data, {pattern:?} rows; target data directory {:.0} MB), {changed} accounts changed on each side. \
         failback: --jobs {} --compress {}. Loopback: the proxy with no delay and no cap. \
         WAN: {delay_ms} ms each way ({} ms RTT), {rate_mbit} Mbit/s each way, token bucket {} KiB, queue {} KiB \
         (`failback_bench::wan`). Each tool rewound a fresh copy of the same diverged target, \
         written back to disk (syncfs) before the tool started. WAL kept on both sides from \
         before the divergence: {kept_wal_mb} MB (`--kept-wal-mb`).\n",
        mb(target_size),
        b.jobs,
        b.compress,
        2 * delay_ms,
        wan.burst / 1024,
        wan.queue / 1024
    );
    let sync_note = if b.no_sync {
        "Both tools ran with -N (no final flush to disk): a diagnostic run, not the comparison."
    } else {
        "Both tools flushed the target to disk at the end (their default)."
    };
    let _ = writeln!(
        out,
        "- Source mode: {mode}.\n- {quic_note}\n- {sync_note}\n- Correctness: {verified}.\n\
         - Machine: {cpus} CPUs, load average {load_before} at the start and {load_after} at the \
         end, {steal:.0} % of CPU time stolen by the hypervisor during the measured runs (other \
         work shares the machine; CPU-bound steps slow down with it).\n"
    );
    out.push_str(&table(&rows));
    out.push_str("\n## Against the goals (design.md)\n\n");
    out.push_str(&goals(&rows, rate_mbit * 1_000_000, kept_wal_mb));
    if b.baseline.is_some() {
        out.push_str("\n## Against the baseline build (`--baseline-bin-dir`)\n\n");
        out.push_str(&against_baseline(&rows));
    }
    out.push_str("\n## failback's time per phase (`--report`, seconds)\n\n");
    for r in rows.iter().filter(|r| r.phases.is_some()) {
        let _ = writeln!(
            out,
            "- {} over {}: `{}`",
            r.tool,
            r.net,
            r.phases.as_ref().map(|p| p.to_string()).unwrap_or_default()
        );
    }
    println!("{out}");
    let path = arg(
        "--out",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("rewind_pair-{}.md", today()))
            .display()
            .to_string(),
    );
    let path = PathBuf::from(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}

/// `--hold FILE`: writes to FILE, as shell assignments, where the pair is (the target, its
/// pristine copy, the source's data directory, conninfo and binaries), then waits until FILE
/// is removed: for profiling and tracing single runs by hand on one pair.
fn hold_for_manual_runs(b: &Bench, file: &Path) {
    let text = format!(
        "OLD={}\nPRISTINE={}\nNEW={}\nCONN='{}'\nPGBIN={}\nFAILBACK={}\nFAILBACKD={}\n",
        b.old.data_dir().display(),
        b.pristine.display(),
        b.new.data_dir().display(),
        b.new.conninfo(),
        b.old.bins().bin_dir.display(),
        b.failback.display(),
        b.failbackd.display(),
    );
    std::fs::write(file, text).expect("write the --hold file");
    eprintln!("holding the pair: remove {} to end", file.display());
    while file.exists() {
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::paired_speedup;

    #[test]
    fn paired_speedup_is_the_median_of_each_rounds_ratio() {
        // Round 2 ran while the machine was busy: both tools slowed down, the ratio held.
        let slow = [2.0, 4.0, 1.8];
        let fast = [1.0, 2.0, 1.2];
        assert_eq!(paired_speedup(&slow, &fast), Some(2.0));
        // The ratio of the medians would say 2.0 / 1.2 = 1.67.
        assert_eq!(paired_speedup(&[3.0, 1.0], &[1.0, 1.0]), Some(2.0));
        assert_eq!(
            paired_speedup(&[3.0], &[1.0]),
            None,
            "one round pairs nothing"
        );
        assert_eq!(paired_speedup(&[3.0, 1.0], &[1.0]), None);
    }
}
