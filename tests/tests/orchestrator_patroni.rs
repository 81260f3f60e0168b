//! Patroni rewinds its old leader with the binary under test, and the node rejoins.
//!
//! What is proven: when the real Patroni (4.x, from PyPI, with etcd from Debian) finds its old
//! leader diverged after an unplanned failover, it runs the `pg_rewind` it was configured
//! with — the binary under test, failback's by default (see `failback_tests::orchestrator`) —
//! exactly as it runs PostgreSQL's: `BIN -D DATADIR --source-server DSN` as PostgreSQL's
//! user, connecting as the rewind role Patroni created with nothing but the four function
//! grants pg_rewind needs, its password only in the pgpass file Patroni writes (`pg_hba.conf`
//! demands a SCRAM password of that role). The rewind must succeed (Patroni logs its exit
//! code), the old leader must come back as a streaming replica of the new leader on the new
//! timeline, every table must be equal on both nodes, and the binary's own marks (its
//! messages in Patroni's log, the `backup_label` it left) must show it did the rewind.
//!
//! How: two Patroni nodes on PostgreSQL 15 and one etcd, all on loopback ports of their own.
//! The failover is the recipe of Patroni's own acceptance tests (`basic_replication.feature`):
//! pause the cluster, SIGTERM the leader's Patroni (paused, it leaves PostgreSQL running),
//! resume; the replica takes the leader key when the old one expires and promotes; the old
//! leader's PostgreSQL, still a primary on the old timeline, takes writes the new leader never
//! sees; its Patroni is started again, demotes it, sees the timelines diverge and rewinds.
//!
//! `FAILBACK_ORCH_REWIND=pg_rewind` runs the same test with PostgreSQL 15's pg_rewind, which
//! proves the harness and the recipe. Patroni and etcd come from `.ci/run`; missing, the test
//! fails (see `orchestrator::require`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use failback_tests::binaries;
use failback_tests::orchestrator::{
    self, Daemon, Etcd, PgServer, RewindBinary, assert_rejoined, kill_postmaster, short_tempdir,
    wait_for, wait_streaming, write_config,
};
use failback_tests::port::{PortLock, reserve_port};
use failback_tests::run::{run_ok, run_with_timeout};
use failback_tests::user;
use tempfile::TempDir;

/// Patroni's own bootstrap (initdb, start, roles) on two shared cores.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(90);
/// Until the replica takes over: the leader key's TTL (20 s) plus a few loops.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// From the old leader's Patroni starting to it streaming from the new leader.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// One Patroni node: its configuration, data directory, pgpass and log in one directory.
struct PatroniNode {
    name: String,
    dir: TempDir,
    pg_port: PortLock,
    api_port: PortLock,
    patroni: Option<Daemon>,
}

impl PatroniNode {
    fn new(name: &str, scope: &str, etcd: &Etcd, rewind: &RewindBinary) -> PatroniNode {
        let dir = short_tempdir("fb-patroni-");
        user::create_dir(dir.path());
        let node = PatroniNode {
            name: name.to_string(),
            dir,
            pg_port: reserve_port(),
            api_port: reserve_port(),
            patroni: None,
        };
        let base = node.dir.path().display().to_string();
        let (pg, api) = (node.pg_port.port, node.api_port.port);
        // Timeouts are Patroni's smallest valid ones (ttl >= loop_wait + 2 * retry_timeout,
        // ttl >= 20) so a failover takes seconds, not a minute. The superuser is trusted on
        // loopback so the test can look at both nodes; every other role must bring a password,
        // so the rewind role's can only come from Patroni's pgpass.
        let config = format!(
            "scope: {scope}
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: {etcd}
bootstrap:
  dcs:
    ttl: 20
    loop_wait: 2
    retry_timeout: 5
    maximum_lag_on_failover: 1073741824
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 40
        max_wal_senders: 5
        max_replication_slots: 5
        wal_keep_size: 256MB
  initdb:
    - encoding: UTF8
    - data-checksums
    - no-locale
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {base}/data
  pgpass: {base}/pgpass
  bin_dir: {bin_dir}
  bin_name:
    pg_rewind: {rewind}
  authentication:
    superuser:
      username: postgres
      password: superuser-secret
    replication:
      username: replicator
      password: replication-secret
    rewind:
      username: rewinder
      password: rewind-secret
  pg_hba:
    - local all all trust
    - host all postgres 127.0.0.1/32 trust
    - host replication replicator 127.0.0.1/32 scram-sha-256
    - host all all 127.0.0.1/32 scram-sha-256
  parameters:
    unix_socket_directories: {base}
    password_encryption: scram-sha-256
    shared_buffers: 16MB
    fsync: 'off'
",
            etcd = etcd.endpoint(),
            bin_dir = binaries::PG15_BIN,
            rewind = rewind.path().display(),
        );
        write_config(&node.config(), &config);
        node
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("patroni.yml")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("patroni.log")
    }

    fn server(&self) -> PgServer {
        PgServer::new(&self.name, self.pg_port.port)
    }

    /// Starts Patroni (as PostgreSQL's user; its log, PostgreSQL's included, goes to
    /// `patroni.log`, appended to across restarts).
    fn start(&mut self) {
        assert!(
            self.patroni.is_none(),
            "{}: Patroni already runs",
            self.name
        );
        let mut cmd = user::command(orchestrator::patroni_program("patroni"));
        cmd.arg(self.config());
        self.patroni = Some(Daemon::spawn(
            &format!("Patroni of {}", self.name),
            cmd,
            &self.log(),
        ));
    }

    /// SIGTERM to Patroni alone; while the cluster is paused it leaves PostgreSQL running.
    fn terminate_patroni(&mut self) {
        if let Some(mut d) = self.patroni.take() {
            d.stop_with(libc::SIGTERM, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log()).unwrap_or_default()).into_owned()
    }

    /// Waits for `needle` in the log after byte `from`, Patroni still running.
    fn wait_log(
        &mut self,
        needle: &str,
        from: usize,
        timeout: Duration,
        context: &dyn Fn() -> String,
    ) {
        let log = self.log();
        let name = self.name.clone();
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            if String::from_utf8_lossy(&text[from.min(text.len())..]).contains(needle) {
                return;
            }
            let running = self.patroni.as_mut().is_some_and(Daemon::is_running);
            assert!(
                running,
                "Patroni of {name} exited while waiting for {needle:?}\n{}",
                context()
            );
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {needle:?} in {name}'s Patroni log\n{}",
                context()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for PatroniNode {
    fn drop(&mut self) {
        // Patroni first (SIGKILL: it must not restart anything), then the PostgreSQL it
        // started in a session of its own, which outlives it.
        drop(self.patroni.take());
        kill_postmaster(&self.data_dir());
    }
}

/// The nodes' Patroni log tails (`(name, log)`) and etcd's, for failure messages.
fn logs(nodes: &[(&str, PathBuf)], etcd: &Etcd) -> String {
    let mut s = String::new();
    for (name, log) in nodes {
        s.push_str(&format!(
            "--- Patroni log of {name} ({}), last 60 lines ---\n{}\n",
            log.display(),
            orchestrator::file_tail(log, 60)
        ));
    }
    s.push_str(&format!(
        "--- etcd, last 10 lines ---\n{}\n",
        etcd.log_tail(10)
    ));
    s
}

/// `patronictl -c CONFIG ARGS...` as PostgreSQL's user; panics with its output on failure.
fn patronictl(node: &PatroniNode, args: &[&str]) -> String {
    let mut cmd = user::command(orchestrator::patroni_program("patronictl"));
    cmd.arg("-c").arg(node.config()).args(args);
    run_ok(&mut cmd, Duration::from_secs(60)).stdout
}

/// `patronictl list` with `config`, for failure messages; never panics.
fn cluster_list(config: &Path) -> String {
    let mut cmd = user::command(orchestrator::patroni_program("patronictl"));
    cmd.arg("-c").arg(config).arg("list");
    match run_with_timeout(&mut cmd, Duration::from_secs(20)) {
        Ok(out) => out.both(),
        Err(e) => e,
    }
}

/// The last pg_rewind run in a Patroni log: its exit code and what it printed (Patroni logs
/// ` stdout=…` and ` stderr=…` after `pg_rewind exit code=N`, multi-line values running up to
/// the next timestamped line).
fn last_rewind(log: &str) -> Option<(String, String)> {
    let at = log.rfind("pg_rewind exit code=")?;
    let rest = &log[at..];
    let mut lines = rest.lines();
    let code = lines
        .next()?
        .trim_start_matches("pg_rewind exit code=")
        .trim()
        .to_string();
    let timestamped = |l: &str| {
        let b = l.as_bytes();
        b.len() > 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b' ' && b[13] == b':'
    };
    let mut output = String::new();
    let mut inside = false;
    for l in lines {
        if timestamped(l) {
            if let Some(i) = l.find(" stdout=").or_else(|| l.find(" stderr=")) {
                inside = true;
                output.push_str(&l[i + 1..]);
                output.push('\n');
                continue;
            }
            if inside {
                break;
            }
        } else if inside {
            output.push_str(l);
            output.push('\n');
        }
    }
    Some((code, output))
}

#[test]
fn patroni_rewinds_the_old_leader_with_the_binary_under_test() {
    if !orchestrator::require(
        "orchestrator_patroni",
        &[
            (
                orchestrator::etcd_program(),
                "Debian's etcd-server, unpacked",
            ),
            (
                orchestrator::patroni_program("patroni"),
                "patroni[etcd3] 4.x from PyPI",
            ),
            (
                orchestrator::patroni_program("patronictl"),
                "patroni[etcd3] 4.x from PyPI",
            ),
            (binaries::pg15_tool("postgres"), "Debian's postgresql-15"),
        ],
    ) {
        return;
    }
    let started = Instant::now();
    let rewind = RewindBinary::from_env();
    eprintln!("binary under test: {}", rewind.describe());
    let etcd = Etcd::start();
    let scope = format!("failback-{}", std::process::id());
    let mut a = PatroniNode::new("node_a", &scope, &etcd, &rewind);
    let mut b = PatroniNode::new("node_b", &scope, &etcd, &rewind);
    let (sa, sb) = (a.server(), b.server());
    // Failure messages show both nodes' logs, etcd's, and Patroni's view of the cluster.
    let node_logs = [("node_a", a.log()), ("node_b", b.log())];
    let b_config = b.config();
    let ctx = || {
        format!(
            "{}\npatronictl list:\n{}",
            logs(&node_logs, &etcd),
            cluster_list(&b_config)
        )
    };

    // --- node_a bootstraps the cluster and leads; node_b joins as a streaming replica ---
    a.start();
    a.wait_log(
        "I am (node_a), the leader with the lock",
        0,
        BOOTSTRAP_TIMEOUT,
        &ctx,
    );
    b.start();
    wait_for(
        "node_b to stream from node_a",
        BOOTSTRAP_TIMEOUT,
        || {
            (sa.try_query_one("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                .ok()?
                == "1")
                .then_some(())
        },
        ctx,
    );
    eprintln!("[{:.0?}] node_a leads, node_b streams", started.elapsed());

    // The rewind role is Patroni's: not a superuser, and granted EXECUTE on exactly the four
    // functions pg_rewind uses. That is the privilege a drop-in must make do with.
    let rewinder = sa.query_rows_in(
        "postgres",
        "SELECT r.rolsuper::text, r.rolreplication::text, \
                coalesce((SELECT string_agg(p.oid::regprocedure::text, ', ' ORDER BY p.oid::regprocedure::text) \
                          FROM pg_proc p, aclexplode(p.proacl) a \
                          WHERE a.grantee = r.oid), '') \
         FROM pg_roles r WHERE r.rolname = 'rewinder'",
    );
    assert_eq!(
        rewinder,
        vec![vec![
            Some("false".to_string()),
            Some("false".to_string()),
            Some(
                "pg_ls_dir(text,boolean,boolean), pg_read_binary_file(text), \
                 pg_read_binary_file(text,bigint,bigint,boolean), pg_stat_file(text,boolean)"
                    .to_string()
            ),
        ]],
        "Patroni's rewind role is not what this test means to prove (superuser?, replication?, \
         functions granted)"
    );

    // --- data both nodes share: pgbench's tables and two of the test's own ---
    sa.create_shared_data("dropped_on_old_leader");
    sb.wait_for_catchup(&sa, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", ctx()));

    // --- the unplanned failover: node_a's Patroni goes, its PostgreSQL stays ---
    patronictl(&a, &["pause", "--wait"]);
    a.terminate_patroni();
    assert_eq!(
        sa.in_recovery(),
        Ok(false),
        "node_a's PostgreSQL must keep running as a primary after its Patroni was stopped \
         while paused\n{}",
        ctx()
    );
    patronictl(&b, &["resume", "--wait"]);
    wait_for(
        "node_b to take over as leader",
        FAILOVER_TIMEOUT,
        || (!sb.in_recovery().ok()?).then_some(()),
        ctx,
    );
    eprintln!("[{:.0?}] node_b promoted", started.elapsed());

    // --- both sides write: node_a's writes are the ones the rewind must undo ---
    sa.execute(
        "UPDATE pgbench_accounts SET abalance = abalance - 1, filler = 'lost on node_a' \
           WHERE aid % 37 = 0;
         DELETE FROM shared_rows WHERE id % 3 = 0;
         INSERT INTO shared_rows SELECT g, 'only on the old leader' FROM generate_series(20001, 30000) g;
         CREATE TABLE only_on_old_leader AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 10000) g;
         DROP TABLE dropped_on_old_leader;
         CHECKPOINT;",
    );
    sb.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 101 = 0;
         INSERT INTO shared_rows SELECT g, 'on the new leader' FROM generate_series(40001, 45000) g;
         CREATE TABLE only_on_new_leader AS SELECT g AS id FROM generate_series(1, 3000) g;",
    );
    sb.pgbench(&["-n", "-t", "200", "-c", "2"]);

    // --- node_a's Patroni comes back: it demotes node_a and rewinds it from node_b ---
    let log_from = a.log_text().len();
    a.start();
    let rejoin_started = Instant::now();
    a.wait_log("pg_rewind exit code=", log_from, REJOIN_TIMEOUT, &ctx);
    let new_log = a.log_text()[log_from..].to_string();
    let (code, output) = last_rewind(&new_log).expect("the log has a pg_rewind exit code");
    assert_eq!(
        code,
        "0",
        "Patroni's rewind of node_a with {} failed; it printed:\n{output}\n{}",
        rewind.describe(),
        ctx()
    );
    assert!(
        new_log.contains("running pg_rewind from dbname=postgres user=rewinder"),
        "Patroni did not connect the rewind as the rewind role\n{}",
        ctx()
    );
    wait_streaming(
        "node_a to stream from node_b after the rewind",
        &sa,
        &sb,
        REJOIN_TIMEOUT,
        ctx,
    );
    eprintln!(
        "[{:.0?}] node_a rewound and streaming again ({:.1?} after its Patroni started)",
        started.elapsed(),
        rejoin_started.elapsed()
    );

    // --- the proof: same data, node_a a replica, the binary under test did it ---
    let tables = assert_rejoined(&sb, &sa, "only on the old leader", ctx);
    assert!(
        !new_log.contains("reinitialize") && !new_log.contains("removing data directory"),
        "Patroni rebuilt node_a instead of rewinding it\n{}",
        ctx()
    );
    rewind.assert_ran(&output, &a.data_dir(), &ctx());
    eprintln!(
        "[{:.0?}] {tables} tables equal on both nodes; the binary under test printed:\n{output}",
        started.elapsed()
    );
}

#[test]
fn last_rewind_reads_patronis_log() {
    let log = "2026-12-01 07:06:17,582 INFO: running pg_rewind from node_b in progress
2026-12-01 07:06:18,138 INFO: pg_rewind exit code=0
2026-12-01 07:06:18,138 INFO:  stdout=
2026-12-01 07:06:18,138 INFO:  stderr=pg_rewind: servers diverged at WAL location 0/3048250 on timeline 1
pg_rewind: rewinding from last common checkpoint at 0/2000098 on timeline 1
pg_rewind: Done!
2026-12-01 07:06:18,200 INFO: Lock owner: node_b; I am node_a
";
    let (code, out) = last_rewind(log).unwrap();
    assert_eq!(code, "0");
    assert_eq!(
        out,
        "stdout=\nstderr=pg_rewind: servers diverged at WAL location 0/3048250 on timeline 1\n\
         pg_rewind: rewinding from last common checkpoint at 0/2000098 on timeline 1\n\
         pg_rewind: Done!\n"
    );
    assert_eq!(last_rewind("no rewind here"), None);
}
