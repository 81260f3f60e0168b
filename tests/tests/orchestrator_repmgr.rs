//! repmgr rejoins a diverged old primary with `node rejoin --force-rewind=<binary under test>`.
//!
//! What is proven: `repmgr node rejoin --force-rewind=PATH` (repmgr 5.3, Debian's
//! `postgresql-15-repmgr`) runs the binary under test — failback's by default (see
//! `failback_tests::orchestrator`) — as it runs pg_rewind: `PATH -D 'DATADIR'
//! --source-server='CONNINFO'` through `popen`, as PostgreSQL's user, success read from the
//! exit code alone; then it writes the standby configuration and starts the node itself. The
//! rejoin must succeed, the old primary must stream from the new one on the new timeline,
//! every table must be equal on both, and the `backup_label` the binary left must be its own.
//!
//! How: a primary and a standby on PostgreSQL 15, both registered with repmgr, started and
//! stopped with `pg_ctl` the way repmgr does it (per-node port and socket on pg_ctl's command
//! line, so that configuration files a rewind copies from the other node change neither).
//! repmgr will not promote while it can reach the primary, so the failover is the one repmgr
//! is made for: the primary goes down, `repmgr standby promote`; the old primary then comes
//! back on its own as a primary on the old timeline and takes writes (a split brain); it is
//! stopped and `repmgr node rejoin --force-rewind` brings it back.
//!
//! `FAILBACK_ORCH_REWIND=pg_rewind` runs the same test with PostgreSQL 15's pg_rewind, which
//! proves the harness and the recipe. repmgr comes from `.ci/run`; missing, the test fails
//! (see `orchestrator::require`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use failback_tests::binaries::{self, PG15_BIN};
use failback_tests::orchestrator::{
    self, PgServer, RewindBinary, assert_rejoined, kill_postmaster, short_tempdir, wait_streaming,
    write_config,
};
use failback_tests::port::{PortLock, reserve_port};
use failback_tests::run::{Output, run_ok, run_with_timeout};
use failback_tests::user;
use tempfile::TempDir;

/// How long one repmgr command may take (a clone, a rejoin waiting for its node to attach).
const REPMGR_TIMEOUT: Duration = Duration::from_secs(180);

/// One node: data directory, socket, server log and repmgr.conf in a directory of its own.
struct Node {
    name: String,
    dir: TempDir,
    port: PortLock,
}

impl Node {
    fn new(name: &str, id: u32) -> Node {
        let dir = short_tempdir("fb-repmgr-");
        user::create_dir(dir.path());
        let node = Node {
            name: name.to_string(),
            dir,
            port: reserve_port(),
        };
        // node_rejoin_timeout: a rejoin that works attaches in seconds; one that does not
        // should fail the test well before its own time limit.
        let conf = format!(
            "node_id={id}
node_name='{name}'
conninfo='{conninfo}'
data_directory='{data}'
pg_bindir='{PG15_BIN}'
pg_ctl_options='{pg_ctl_options}'
replication_user='repmgr'
node_rejoin_timeout=60
log_level=INFO
",
            conninfo = node.conninfo(),
            data = node.data_dir().display(),
            pg_ctl_options = node.pg_ctl_options(),
        );
        write_config(&node.conf(), &conf);
        node
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("repmgr.conf")
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=repmgr dbname=repmgr connect_timeout=5",
            self.port.port
        )
    }

    /// What repmgr passes to `pg_ctl start` (and so does the test): the log, and the port and
    /// socket directory on the server's command line, where a copied `postgresql.conf` cannot
    /// change them.
    fn pg_ctl_options(&self) -> String {
        format!(
            "-l {} -o \"-p {} -k {}\"",
            self.log().display(),
            self.port.port,
            self.dir.path().display()
        )
    }

    fn server(&self) -> PgServer {
        PgServer::new(&self.name, self.port.port)
    }

    fn log_tail(&self, lines: usize) -> String {
        orchestrator::file_tail(&self.log(), lines)
    }

    /// `initdb` and the settings replication, rewinding and repmgr need.
    fn init(&self) {
        let mut cmd =
            user::command(binaries::PgBinaries::get(failback_tests::PgMajor::V15).initdb());
        cmd.arg("-D").arg(self.data_dir()).args([
            "-k",
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "-N",
        ]);
        run_ok(&mut cmd, Duration::from_secs(300));
        let conf = self.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .unwrap_or_else(|e| panic!("could not read {}: {e}", conf.display()));
        text.push_str(
            "\n# failback tests/orchestrator_repmgr.rs
listen_addresses = '127.0.0.1'
shared_buffers = 16MB
max_connections = 40
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
hot_standby = on
wal_retrieve_retry_interval = 500ms
fsync = off
shared_preload_libraries = 'repmgr'
",
        );
        user::write_file(&conf, text);
    }

    /// `pg_ctl start` with the node's options, waiting until it accepts connections.
    fn start(&self) {
        self.pg_ctl(&format!(
            "start -w -t 120 -D {} {}",
            self.data_dir().display(),
            self.pg_ctl_options()
        ));
    }

    /// `pg_ctl stop -m fast`: a clean shutdown, which `repmgr node rejoin` requires.
    fn stop(&self) {
        self.pg_ctl(&format!(
            "stop -w -t 120 -m fast -D {}",
            self.data_dir().display()
        ));
    }

    /// pg_ctl through the shell, as repmgr runs it (the options hold quotes).
    fn pg_ctl(&self, args: &str) {
        let mut cmd = user::command("/bin/sh");
        cmd.arg("-c").arg(format!("{PG15_BIN}/pg_ctl {args}"));
        let out =
            run_with_timeout(&mut cmd, Duration::from_secs(180)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "pg_ctl {args} failed for {} ({}):\n{}\nserver log:\n{}",
            self.name,
            out.status,
            out.both(),
            self.log_tail(30)
        );
    }

    /// `repmgr -f repmgr.conf ARGS...` as PostgreSQL's user.
    fn repmgr(&self, args: &[&str]) -> Output {
        let mut cmd = user::command(orchestrator::repmgr_program());
        cmd.arg("-f").arg(self.conf()).args(args);
        run_with_timeout(&mut cmd, REPMGR_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Node::repmgr`], panicking with everything said unless it succeeds.
    fn repmgr_ok(&self, args: &[&str], context: &dyn Fn() -> String) -> Output {
        let out = self.repmgr(args);
        assert!(
            out.status.success(),
            "repmgr {} on {} failed ({}):\n{}\n{}",
            args.join(" "),
            self.name,
            out.status,
            out.both(),
            context()
        );
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // pg_ctl detaches the server from the test; only its postmaster.pid leads to it.
        kill_postmaster(&self.data_dir());
    }
}

/// Both nodes' server logs, and repmgr's view of the cluster, for failure messages.
fn context(nodes: &[&Node]) -> String {
    let mut s = String::new();
    for n in nodes {
        s.push_str(&format!(
            "--- server log of {} ({}), last 40 lines ---\n{}\n",
            n.name,
            n.log().display(),
            n.log_tail(40)
        ));
    }
    if let Some(n) = nodes.first() {
        let out = n.repmgr(&["cluster", "show"]);
        s.push_str(&format!("--- repmgr cluster show ---\n{}", out.both()));
    }
    s
}

#[test]
fn repmgr_rejoins_the_old_primary_with_the_binary_under_test() {
    if !orchestrator::require(
        "orchestrator_repmgr",
        &[
            (
                orchestrator::repmgr_program(),
                "Debian's postgresql-15-repmgr",
            ),
            (binaries::pg15_tool("postgres"), "Debian's postgresql-15"),
        ],
    ) {
        return;
    }
    let started = Instant::now();
    let rewind = RewindBinary::from_env();
    eprintln!("binary under test: {}", rewind.describe());
    let primary = Node::new("node1", 1);
    let standby = Node::new("node2", 2);
    let (sp, ss) = (primary.server(), standby.server());
    let ctx = || context(&[&primary, &standby]);

    // --- a registered primary and a registered, streaming standby cloned by repmgr ---
    primary.init();
    primary.start();
    // Two statements: a batch runs as one transaction, which CREATE DATABASE refuses.
    sp.execute("CREATE ROLE repmgr SUPERUSER LOGIN");
    sp.execute("CREATE DATABASE repmgr OWNER repmgr");
    primary.repmgr_ok(&["primary", "register"], &ctx);
    let port = primary.port.port.to_string();
    standby.repmgr_ok(
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "repmgr",
            "-d",
            "repmgr",
            "standby",
            "clone",
            "--fast-checkpoint",
        ],
        &ctx,
    );
    standby.start();
    standby.repmgr_ok(&["standby", "register"], &ctx);

    // --- data both share: pgbench's tables and two of the test's own ---
    sp.create_shared_data("dropped_on_old_primary");
    ss.wait_for_catchup(&sp, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", ctx()));
    eprintln!("[{:.0?}] node1 primary, node2 streams", started.elapsed());

    // --- the failover: node1 goes down, repmgr promotes node2 ---
    primary.stop();
    let promoted = standby.repmgr_ok(&["standby", "promote"], &ctx);
    assert!(
        promoted.both().contains("STANDBY PROMOTE successful"),
        "repmgr standby promote did not say it succeeded:\n{}",
        promoted.both()
    );
    // pg_rewind reads the source's timeline from its pg_control, which a promotion updates
    // only when its end-of-recovery checkpoint completes, spread over many seconds. repmgr
    // does not wait for it (Patroni does), and a rewind started before it finds both sides
    // "on the same timeline" and does nothing; an operator checkpoints first.
    ss.execute("CHECKPOINT");

    // --- split brain: node1 comes back alone as a primary and takes writes ---
    primary.start();
    assert_eq!(sp.in_recovery(), Ok(false), "node1 came back as a standby");
    sp.execute(
        "UPDATE pgbench_accounts SET abalance = abalance - 1, filler = 'lost on node1' \
           WHERE aid % 37 = 0;
         DELETE FROM shared_rows WHERE id % 3 = 0;
         INSERT INTO shared_rows SELECT g, 'only on the old primary' FROM generate_series(20001, 30000) g;
         CREATE TABLE only_on_old_primary AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 10000) g;
         DROP TABLE dropped_on_old_primary;",
    );
    ss.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 101 = 0;
         INSERT INTO shared_rows SELECT g, 'on the new primary' FROM generate_series(40001, 45000) g;
         CREATE TABLE only_on_new_primary AS SELECT g AS id FROM generate_series(1, 3000) g;",
    );
    ss.pgbench(&["-n", "-t", "200", "-c", "2"]);
    primary.stop();
    eprintln!("[{:.0?}] node2 promoted, node1 diverged", started.elapsed());

    // --- repmgr node rejoin --force-rewind=<binary under test> ---
    let rejoin_started = Instant::now();
    let force = format!("--force-rewind={}", rewind.path().display());
    let source = standby.conninfo();
    let out = primary.repmgr(&["node", "rejoin", "-d", &source, &force, "--verbose"]);
    let said = out.both();
    assert!(
        out.status.success() && said.contains("NODE REJOIN successful"),
        "repmgr node rejoin with {} failed ({}):\n{said}\n{}",
        rewind.describe(),
        out.status,
        ctx()
    );
    // repmgr names the command it ran; the binary's own messages it keeps in a temporary
    // file and removes.
    let command = format!("pg_rewind command is \"{} -D ", rewind.path().display());
    assert!(
        said.contains(&command),
        "repmgr did not run the binary under test ({command:?} not in its output):\n{said}"
    );
    wait_streaming(
        "node1 to stream from node2 after the rejoin",
        &sp,
        &ss,
        Duration::from_secs(60),
        ctx,
    );
    eprintln!(
        "[{:.0?}] node1 rewound and streaming again ({:.1?} for the rejoin)",
        started.elapsed(),
        rejoin_started.elapsed()
    );

    // --- the proof: same data, node1 a standby, the binary under test did it ---
    let tables = assert_rejoined(&ss, &sp, "only on the old primary", ctx);
    let show = primary.repmgr_ok(&["cluster", "show"], &ctx).stdout;
    let node1_line = show
        .lines()
        .find(|l| l.contains("node1"))
        .unwrap_or_default()
        .to_string();
    assert!(
        node1_line.contains("standby")
            && node1_line.contains("running")
            && node1_line.contains("node2"),
        "repmgr does not show node1 as a running standby of node2:\n{show}"
    );
    rewind.assert_ran(
        "",
        &primary.data_dir(),
        &format!("repmgr said:\n{said}\n{}", ctx()),
    );
    eprintln!(
        "[{:.0?}] {tables} tables equal on both nodes; repmgr said:\n{said}",
        started.elapsed()
    );
}
