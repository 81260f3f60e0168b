//! The runs of a rewind benchmark: one target restored from its pristine copy before each run,
//! rewound by `pg_rewind --source-server`, by `failback` through `failbackd` (gRPC, QUIC) and by
//! `failback --source-server`, each measured as a whole process (wall time, CPU, peak memory)
//! with the bytes its link carried each way, and the rows a benchmark's table is made of.
//! `rewind_pair` and `rewind_scale` run their tools through it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::host::{
    Proxy, failback_rewind_args, mb, sent_bytes, syncfs, tail, wait_for, wait_listening,
};
use crate::measure::{self, Cost, Sampler};
use crate::pair::{copy_dir, sync_dir};
use crate::wan::{LinkSpec, TcpProxy, UdpProxy};
use failback_tests::port::reserve_port;
use failback_tests::rewind::rejoin;
use failback_tests::{Cluster, StopMode, binaries, user};

/// The row of `failback rewind --source-server`.
pub const LIBPQ: &str = "failback --source-server";

/// A step on the restored target's data directory, before a run.
pub type AfterRestore = Box<dyn Fn(&Path)>;

/// One measured rewind.
pub struct Row {
    pub tool: String,
    pub net: &'static str,
    pub ok: bool,
    pub client: Cost,
    /// Server side: failbackd, or the backend that served pg_rewind.
    pub server_cpu: Option<Duration>,
    pub server_rss_kb: Option<u64>,
    pub up: u64,
    pub down: u64,
    pub dropped: u64,
    /// failback's `--report` phase times.
    pub phases: Option<serde_json::Value>,
    /// failback's `--report` compression: the policy and, under `auto`, every choice it made.
    pub compression: Option<String>,
    /// failback's `--report` `execution.bytes_fetched_ahead`: what had arrived of the source's
    /// changed blocks when the copy began.
    pub fetched_ahead: Option<u64>,
    pub note: String,
    /// Every round's wall time in seconds, in round order (set by [`median`]).
    pub walls: Vec<f64>,
}

impl Row {
    pub fn wire(&self) -> u64 {
        self.up + self.down
    }

    /// The server side's CPU seconds and peak RSS (MB) as a table shows them, `-` if unknown.
    pub fn server_columns(&self) -> (String, String) {
        (
            self.server_cpu
                .map_or("-".to_string(), |c| format!("{:.2}", c.as_secs_f64())),
            self.server_rss_kb
                .map_or("-".to_string(), |k| format!("{:.1}", k as f64 / 1024.0)),
        )
    }
}

pub struct Bench {
    pub old: Cluster,
    pub new: Cluster,
    pub pristine: PathBuf,
    pub work: PathBuf,
    pub failback: PathBuf,
    pub failbackd: PathBuf,
    /// Another build's `failback` and `failbackd`, run beside these (`--baseline-bin-dir`).
    pub baseline: Option<(PathBuf, PathBuf)>,
    pub jobs: u32,
    pub compress: String,
    /// failbackd serves the running new primary through `--pg-conn`.
    pub running_source: bool,
    /// `-N` for both tools: leave out the final flush to disk, to see the network's share.
    pub no_sync: bool,
    /// Where to keep each run's stderr and failback's report.
    pub log_dir: Option<PathBuf>,
    /// Run failback and failbackd under `perf record -g`, profiles written here.
    pub perf_dir: Option<PathBuf>,
    /// What a benchmark does to the target after each restore (`rewind_scale` grows it).
    pub after_restore: Option<AfterRestore>,
    /// failback's subcommand: `rewind`, or `resync` (every relation file compared by hashes).
    pub subcommand: &'static str,
    /// Restore only the files a run changed (`rsync -a --delete`, by size and time) rather than
    /// copying the whole pristine directory: for clusters of many files, where a whole copy
    /// takes minutes.
    pub restore_changed_only: bool,
    /// Start each failback run only once failbackd's WAL summarizer has caught up with the new
    /// primary's `pg_wal`, as a failbackd deployed beside it has (it summarizes each segment as
    /// it completes); without it, failbackd starts just before the run and decodes what its
    /// summarizer has not reached yet for the request.
    pub warm_summaries: bool,
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

    pub fn restore(&mut self) {
        if self.old.is_running() {
            self.old.stop(StopMode::Fast);
        }
        if self.restore_changed_only {
            sync_dir(&self.pristine, &self.old.data_dir());
        } else {
            copy_dir(&self.pristine, &self.old.data_dir());
        }
        if let Some(grow) = &self.after_restore {
            grow(&self.old.data_dir());
        }
        syncfs(&self.old.data_dir());
    }

    pub fn failback_run(&mut self, net: &'static str, spec: LinkSpec, quic: bool) -> Row {
        let (failback, failbackd) = (self.failback.clone(), self.failbackd.clone());
        let tool = if quic {
            "failback (QUIC)"
        } else {
            "failback (gRPC)"
        };
        self.failback_run_of(&failback, &failbackd, tool, net, spec, quic)
    }

    /// [`Bench::failback_run`] with the baseline build's binaries, labelled as such.
    pub fn baseline_run(&mut self, net: &'static str, spec: LinkSpec, quic: bool) -> Option<Row> {
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
        let transport = if quic { "quic" } else { "grpc" };
        let name = match self.subcommand {
            "rewind" => format!("{transport}-{net}"),
            other => format!("{other}-{transport}-{net}"),
        };
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
        // QUIC over loopback goes straight to failbackd: a user-space relay of every datagram
        // on the same two cores cost more CPU than QUIC itself (by hand: a rewind through it
        // took twice as long, the relay using ~3 s of CPU), which no deployment pays. Its
        // bytes are then what failbackd says it sent.
        let direct = quic && spec.is_plain();
        let metrics_port = direct.then(reserve_port);
        if let Some(m) = &metrics_port {
            cmd.arg("--metrics-listen").arg(local(m.port).to_string());
        }
        let server = measure::spawn(&mut cmd).expect("start failbackd");
        if !wait_listening(local(grpc_port.port), &server) {
            server.signal(libc::SIGKILL);
            let c = server.finish();
            panic!("failbackd did not start listening:\n{}", c.stderr);
        }
        // Its summarizer says so on stderr, once, when it has summarized what pg_wal held.
        if self.warm_summaries
            && !wait_for(&server, Duration::from_secs(600), || {
                server.stderr_so_far().contains("WAL summaries: caught up")
            })
        {
            server.signal(libc::SIGKILL);
            let c = server.finish();
            panic!(
                "failbackd's WAL summarizer did not catch up within 10 minutes:\n{}",
                c.stderr
            );
        }
        if quic {
            // QUIC listens on UDP; give it a moment after the TCP listener is up.
            std::thread::sleep(Duration::from_millis(200));
        }
        let proxy = if direct {
            None
        } else if quic {
            Some(Proxy::Udp(
                UdpProxy::start(local(0), local(quic_port.port), spec, spec).expect("UDP proxy"),
            ))
        } else {
            Some(Proxy::Tcp(
                TcpProxy::start(local(0), local(grpc_port.port), spec, spec).expect("TCP proxy"),
            ))
        };
        let to = proxy.as_ref().map_or(local(quic_port.port), |p| p.addr());
        let url = format!("{}://{to}", if quic { "quic" } else { "grpc" });
        let report = self.work.join(format!(
            "report-{}-{net}.json",
            if quic { "quic" } else { "grpc" }
        ));
        let _ = std::fs::remove_file(&report);
        let mut client = self.profiled(failback, &format!("failback-{name}"));
        failback_rewind_args(
            &mut client,
            self.subcommand,
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
        let (up, down, dropped) = match (&proxy, &metrics_port) {
            (Some(p), _) => p.counters().snapshot(),
            (None, m) => (
                0,
                m.as_ref().map_or(0, |m| sent_bytes(local(m.port), "quic")),
                0,
            ),
        };
        drop(proxy);
        server.signal(libc::SIGINT);
        let server_cost = server.finish();
        self.keep(&name, &cost.stderr, Some(&report));
        let report = std::fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let phases = report.as_ref().map(|v| v["seconds"].clone());
        let compression = report
            .as_ref()
            .and_then(|v| v["compression"].as_str().map(str::to_string));
        let fetched_ahead = report
            .as_ref()
            .and_then(|v| v["execution"]["bytes_fetched_ahead"].as_u64());
        let ok = cost.exit_code == 0;
        let note = if ok && direct {
            "direct to failbackd, no relay; server→client: the chunk bytes failbackd sent \
             (its metrics), client→server not counted. "
                .to_string()
        } else if ok {
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
            compression,
            fetched_ahead,
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

    pub fn pg_rewind_run(&mut self, net: &'static str, spec: LinkSpec) -> Row {
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
            compression: None,
            fetched_ahead: None,
            note: "server CPU/RSS: the backend, sampled every 20 ms (lower bound)".to_string(),
            walls: Vec::new(),
        }
    }

    /// `failback rewind --source-server`: the same libpq link as pg_rewind's, no failbackd.
    pub fn libpq_run(&mut self, net: &'static str, spec: LinkSpec) -> Row {
        let (proxy, sampler, conninfo) = self.libpq_link(spec);
        let report = self.work.join(format!("report-libpq-{net}.json"));
        let _ = std::fs::remove_file(&report);
        eprintln!("running failback rewind --source-server '{conninfo}' ({net})");
        let mut cmd = self.profiled(&self.failback.clone(), &format!("failback-libpq-{net}"));
        cmd.arg(self.subcommand)
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
            compression: None,
            fetched_ahead: None,
            note,
            walls: Vec::new(),
        }
    }

    /// Copies a run's stderr (and report) into `--log-dir`, timestamps kept by the tools.
    pub fn keep(&self, name: &str, stderr: &str, report: Option<&Path>) {
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
    pub fn verify(&mut self) {
        eprintln!("verifying: the rewound target rejoins as a standby, fingerprints compared");
        rejoin(&mut self.old, &mut self.new);
        self.old.stop(StopMode::Fast);
    }
}

/// The round with the median wall time (failed rounds first, so a failure is not hidden),
/// its note listing every round's wall time.
pub fn median(mut rounds: Vec<Row>) -> Row {
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

pub fn table(rows: &[Row]) -> String {
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
            r.server_columns().0,
            r.client.max_rss_kb as f64 / 1024.0,
            r.server_columns().1,
            if r.ok {
                if r.dropped > 0 {
                    format!(
                        "{} datagrams dropped by the link (its queue full, or larger than its MTU). {}",
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
pub fn paired_speedup(slow: &[f64], fast: &[f64]) -> Option<f64> {
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
