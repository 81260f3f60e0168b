//! A PostgreSQL cluster run by the test bed: one data directory and, while started, one
//! postmaster.
//!
//! A *cluster* in PostgreSQL's sense is a data directory made by `initdb` plus the server
//! (`postgres`, the postmaster and its child processes) that runs on it. Every [`Cluster`] lives
//! in its own short temporary directory (`/tmp/fb-XXXXXX/`):
//!
//! ```text
//! data/        the data directory (initdb -k: data checksums on; superuser `postgres`; trust auth)
//! s/           the unix socket directory (socket paths must stay under ~100 bytes)
//! server.log   everything the server printed, across restarts
//! archive/     WAL archive, when archiving is on
//! ts/<name>/   tablespace directories
//! ```
//!
//! Settings are small so a dozen clusters fit on two cores (16 MB shared buffers, no fsync:
//! the tests never crash the operating system, only the server) and suited to replication and
//! rewinding (`wal_level=replica`, `wal_log_hints=on` as pg_rewind requires, enough WAL senders,
//! `wal_keep_size`). What differs from node to node (port, socket directory, archive command)
//! is passed on the `postgres` command line rather than written to `postgresql.conf`: pg_rewind
//! copies the configuration files from the source server, and a rewound node must still listen
//! on its own port and archive into its own directory. Command-line settings override the files
//! and `ALTER SYSTEM`.
//!
//! The postmaster is started directly (not through `pg_ctl`, which detaches it into its own
//! session) as a child of the test process and stays in the test's process group, so a test
//! runner that kills a timed-out test kills its servers too. Stopping sends the postmaster the
//! signal of the shutdown mode (SIGINT: fast, SIGQUIT: immediate) and waits for it to exit.
//! Dropping a `Cluster`, also while a test panics, stops its server in immediate mode and
//! removes its directory.
//!
//! Standbys (see [`Cluster::create_standby`]) follow their primary by streaming replication:
//! `standby.signal` in the data directory and `primary_conninfo` in `postgresql.auto.conf`.
//!
//! Helpers panic with a message naming the cluster and showing what went wrong (for a server
//! that did not start, the tail of its log): this is a test bed, and a panic is a test failure.

use failback_common::control::{ControlFileData, DBState};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use failback_common::{Lsn, PgMajor, TimeLineId};
use postgres::{Client, NoTls, SimpleQueryMessage};
use tempfile::TempDir;

use crate::binaries::{self, PgBinaries};
use crate::port::{PortLock, reserve_port};
use crate::run::{Output, run_ok};
use crate::user;

/// How long a server may take to accept connections after being started.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a server may take to exit after being told to stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a standby may take to catch up with its primary.
pub const CATCHUP_TIMEOUT: Duration = Duration::from_secs(120);

/// How a cluster is made; everything else is the test bed's fixed settings.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// `initdb --wal-segsize`, in MB (a power of two, 1–1024); PostgreSQL's default is 16.
    pub wal_segment_size_mb: Option<u32>,
    /// `wal_compression` (`on`/`off` in all versions; 15+ also `pglz`, `lz4`, `zstd` when
    /// built with them).
    pub wal_compression: Option<String>,
    /// Archive every completed WAL segment into the cluster's `archive/` directory.
    pub archive: bool,
    /// More `postgresql.conf` settings, written after the test bed's own (so they win).
    pub settings: Vec<(String, String)>,
    /// `initdb -g`: the data directory and its files readable by the owner's group (modes
    /// 0750/0640 instead of 0700/0600).
    pub group_access: bool,
    /// Run the server inside this network namespace ([`crate::netns`]), listening on this
    /// address there as well as on its loopback; its Unix socket is reached from anywhere.
    pub netns: Option<crate::netns::Host>,
}

impl ClusterOptions {
    pub fn wal_segment_size_mb(mut self, mb: u32) -> Self {
        self.wal_segment_size_mb = Some(mb);
        self
    }

    pub fn wal_compression(mut self, value: &str) -> Self {
        self.wal_compression = Some(value.to_string());
        self
    }

    pub fn archive(mut self) -> Self {
        self.archive = true;
        self
    }

    pub fn group_access(mut self) -> Self {
        self.group_access = true;
        self
    }

    /// Runs the server on `host` (see [`ClusterOptions::netns`]).
    pub fn netns(mut self, host: &crate::netns::Host) -> Self {
        self.netns = Some(host.clone());
        self
    }

    /// Adds `name = value` to `postgresql.conf`; `value` is written as is (quote strings).
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }
}

/// PostgreSQL's shutdown modes that tests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, write a shutdown checkpoint: pg_control says "shut down".
    Fast,
    /// Kill everything at once, as a crash would: pg_control keeps "in production" (or "in
    /// archive recovery"), and the next start runs crash recovery.
    Immediate,
}

/// One PostgreSQL cluster (data directory plus, while started, its server).
pub struct Cluster {
    name: String,
    bins: &'static PgBinaries,
    options: ClusterOptions,
    port: PortLock,
    postmaster: Option<Child>,
    /// Whether the server ever started: until then a port clash may be fixed by a new port,
    /// afterwards standbys may already point at this one.
    started_once: bool,
    // Last, so the directory is removed after Drop has stopped the server.
    base: TempDir,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("major", &self.bins.major)
            .field("port", &self.port.port)
            .field("base", &self.base.path())
            .field("running", &self.postmaster.is_some())
            .finish()
    }
}

impl Cluster {
    /// Runs `initdb` for a new cluster of `major`; the server is not started.
    pub fn init(major: PgMajor, name: &str, options: ClusterOptions) -> Cluster {
        let cluster = Cluster::empty(major, name, options);
        let mut cmd = user::command(cluster.bins.initdb());
        cmd.arg("-D").arg(cluster.data_dir()).args([
            "-k",
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "-N",
        ]);
        if let Some(mb) = cluster.options.wal_segment_size_mb {
            cmd.arg(format!("--wal-segsize={mb}"));
        }
        if cluster.options.group_access {
            cmd.arg("-g");
        }
        run_ok(&mut cmd, Duration::from_secs(300));
        cluster.append_conf(&cluster.base_conf());
        cluster
    }

    /// A new cluster of `major` with default options, started.
    pub fn start_new(major: PgMajor, name: &str) -> Cluster {
        Cluster::start_new_with(major, name, ClusterOptions::default())
    }

    /// A new cluster of `major` with `options`, started.
    pub fn start_new_with(major: PgMajor, name: &str, options: ClusterOptions) -> Cluster {
        let mut c = Cluster::init(major, name, options);
        c.start();
        c
    }

    /// The directories of a cluster, without a data directory yet.
    fn empty(major: PgMajor, name: &str, options: ClusterOptions) -> Cluster {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "cluster name {name:?}: use letters, digits, '_' and '-'"
        );
        let bins = PgBinaries::get(major);
        // Unix socket paths are limited to ~100 bytes: stay short even if TMPDIR is long.
        let tmp = std::env::temp_dir();
        let root = if tmp.as_os_str().len() <= 40 {
            tmp
        } else {
            PathBuf::from("/tmp")
        };
        let base = tempfile::Builder::new()
            .prefix("fb-")
            .tempdir_in(&root)
            .unwrap_or_else(|e| panic!("could not create a directory in {}: {e}", root.display()));
        user::create_dir(base.path());
        let cluster = Cluster {
            name: name.to_string(),
            bins,
            options,
            port: reserve_port(),
            postmaster: None,
            started_once: false,
            base,
        };
        user::create_dir(&cluster.socket_dir());
        if cluster.options.archive {
            user::create_dir(&cluster.base_dir().join("archive"));
        }
        cluster
    }

    fn base_conf(&self) -> String {
        let mut conf = String::from(
            "\n# Added by the failback test bed (tests/src/cluster.rs).\n\
             shared_buffers = 16MB\n\
             max_connections = 40\n\
             max_worker_processes = 4\n\
             max_parallel_workers = 2\n\
             max_parallel_workers_per_gather = 0\n\
             wal_level = replica\n\
             wal_log_hints = on\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             wal_keep_size = 320MB\n\
             hot_standby = on\n\
             wal_retrieve_retry_interval = 500ms\n\
             fsync = off\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%a '\n",
        );
        if let Some(v) = &self.options.wal_compression {
            conf.push_str(&format!("wal_compression = {v}\n"));
        }
        for (k, v) in &self.options.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        conf
    }

    // ---- names and paths ----

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn major(&self) -> PgMajor {
        self.bins.major
    }

    pub fn bins(&self) -> &'static PgBinaries {
        self.bins
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The cluster's own directory, holding the data directory, socket, log, archive.
    pub fn base_dir(&self) -> &Path {
        self.base.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base_dir().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.base_dir().join("s")
    }

    pub fn log_file(&self) -> PathBuf {
        self.base_dir().join("server.log")
    }

    /// The WAL archive directory, when archiving is on.
    pub fn archive_dir(&self) -> Option<PathBuf> {
        self.options
            .archive
            .then(|| self.base_dir().join("archive"))
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port.port
    }

    /// A libpq connection string for database `postgres` as superuser `postgres`.
    pub fn conninfo(&self) -> String {
        self.conninfo_db("postgres")
    }

    pub fn conninfo_db(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.host(),
            self.port()
        )
    }

    /// Where the test bed reaches the server: 127.0.0.1, or, when it runs in a network
    /// namespace of its own (whose loopback is not this one), its Unix socket directory.
    pub fn host(&self) -> String {
        match &self.options.netns {
            Some(_) => self.socket_dir().display().to_string(),
            None => "127.0.0.1".into(),
        }
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read(self.log_file()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Appends `text` to `postgresql.conf`.
    pub fn append_conf(&self, text: &str) {
        let path = self.data_dir().join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("could not open {}: {e}", path.display()));
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
    }

    /// The state pg_control records (read from `global/pg_control`, no server needed).
    pub fn control_state(&self) -> DBState {
        let path = self.data_dir().join("global").join("pg_control");
        let bytes =
            fs::read(&path).unwrap_or_else(|e| panic!("could not read {}: {e}", path.display()));
        ControlFileData::parse(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .state
    }

    // ---- starting and stopping ----

    pub fn is_running(&mut self) -> bool {
        match &mut self.postmaster {
            None => false,
            Some(child) => match child.try_wait() {
                Ok(None) => true,
                _ => {
                    self.postmaster = None;
                    false
                }
            },
        }
    }

    /// Starts the server and waits until it accepts connections; panics with the log's tail
    /// if it does not.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// Starts the server and waits until it accepts connections (a standby: read-only
    /// connections, once consistent). Err says why not, with the log's tail.
    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(
            !self.is_running(),
            "cluster '{}' is already running",
            self.name
        );
        for _ in 0..5 {
            match self.start_once() {
                Ok(()) => {
                    self.started_once = true;
                    return Ok(());
                }
                Err((msg, log)) => {
                    let clash = log.contains("could not bind")
                        || log.contains("could not create any TCP/IP sockets");
                    if clash && !self.started_once {
                        self.port = reserve_port();
                        continue;
                    }
                    return Err(msg);
                }
            }
        }
        Err(format!(
            "cluster '{}' found no free port in 5 tries",
            self.name
        ))
    }

    /// One start; Err carries the message and what the server logged during this attempt.
    fn start_once(&mut self) -> Result<(), (String, String)> {
        let log_path = self.log_file();
        let log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("could not open {}: {e}", log_path.display()));
        user::give(&log_path);
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("could not dup log descriptor: {e}"));
        let mut cmd = user::command(self.bins.postgres());
        cmd.arg("-D").arg(self.data_dir());
        let mut set = |k: &str, v: String| {
            cmd.arg("-c").arg(format!("{k}={v}"));
        };
        set("port", self.port().to_string());
        set(
            "listen_addresses",
            match &self.options.netns {
                Some(host) => format!("127.0.0.1,{}", host.addr),
                None => "127.0.0.1".into(),
            },
        );
        set(
            "unix_socket_directories",
            self.socket_dir().display().to_string(),
        );
        set("cluster_name", self.name.clone());
        match self.archive_dir() {
            Some(dir) => {
                let dir = dir.display();
                set("archive_mode", "on".into());
                set(
                    "archive_command",
                    format!("test ! -f {dir}/%f && cp %p {dir}/%f"),
                );
            }
            None => set("archive_mode", "off".into()),
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = match &self.options.netns {
            Some(host) => crate::netns::spawn_in(&host.netns, &mut cmd),
            None => cmd.spawn(),
        };
        let child = child.unwrap_or_else(|e| {
            panic!(
                "could not start {} for '{}': {e}",
                self.bins.postgres().display(),
                self.name
            )
        });
        let pid = child.id();
        self.postmaster = Some(child);

        let new_log = |c: &Cluster| {
            let bytes = fs::read(c.log_file()).unwrap_or_default();
            let from = usize::try_from(log_start).unwrap_or(0).min(bytes.len());
            String::from_utf8_lossy(&bytes[from..]).into_owned()
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                let log = new_log(self);
                return Err((
                    format!(
                        "PostgreSQL {} cluster '{}' (port {}) exited during start; its log:\n{}",
                        self.major(),
                        self.name,
                        self.port(),
                        tail(&log, 40)
                    ),
                    log,
                ));
            }
            if self.postmaster_status(pid).as_deref() == Some("ready") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                let log = new_log(self);
                return Err((
                    format!(
                        "PostgreSQL {} cluster '{}' (port {}) did not accept connections within \
                         {START_TIMEOUT:?}; its log:\n{}",
                        self.major(),
                        self.name,
                        self.port(),
                        tail(&log, 40)
                    ),
                    log,
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status line of `postmaster.pid` (line 8: `starting`, `ready`, `standby`,
    /// `stopping`), if the file belongs to postmaster `pid`.
    fn postmaster_status(&self, pid: u32) -> Option<String> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.first()?.trim() != pid.to_string() {
            return None;
        }
        Some(lines.get(7)?.trim().to_string())
    }

    /// Stops the server (no-op when it is not running).
    pub fn stop(&mut self, mode: StopMode) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        let signal = match mode {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        };
        signal_pid(child.id(), signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "cluster '{}' did not stop ({mode:?}) within {STOP_TIMEOUT:?}; killed \
                         it. Log:\n{}",
                        self.name,
                        self.log_tail(40)
                    );
                }
            }
        }
    }

    /// Stops (fast) and starts the server.
    pub fn restart(&mut self) {
        self.stop(StopMode::Fast);
        self.start();
    }

    /// Immediate stop, then SIGKILL if it does not exit; never panics (used by Drop).
    fn kill(&mut self) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        signal_pid(child.id(), libc::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Promotes a standby, waits until it is out of recovery, and runs a checkpoint so that
    /// pg_control shows the new timeline (promotion only requests one; pg_rewind reads the
    /// source's timeline from pg_control). Returns the new timeline.
    pub fn promote(&self) -> TimeLineId {
        assert!(
            self.is_in_recovery(),
            "cluster '{}' is not a standby: nothing to promote",
            self.name
        );
        let done = self.query_one("SELECT pg_promote(true, 120)");
        assert_eq!(
            done,
            "t",
            "cluster '{}' did not finish promotion within 120 s; log:\n{}",
            self.name,
            self.log_tail(30)
        );
        let deadline = Instant::now() + START_TIMEOUT;
        while self.is_in_recovery() {
            assert!(
                Instant::now() < deadline,
                "cluster '{}' is still in recovery after promotion",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.execute("CHECKPOINT");
        self.timeline()
    }

    // ---- standbys ----

    /// A streaming standby of this cluster, started. PostgreSQL 15 takes it with
    /// `pg_basebackup -R` while this cluster runs; other versions have no client tools here,
    /// so the data directory is copied while this cluster is cleanly stopped (it is restarted
    /// afterwards if it was running). Tablespaces are copied to the standby's own `ts/`.
    pub fn create_standby(&mut self, name: &str) -> Cluster {
        self.create_standby_with(name, self.options.clone())
    }

    /// Like [`Cluster::create_standby`] with other options (archiving, extra settings; the WAL
    /// segment size is the primary's whatever the options say).
    pub fn create_standby_with(&mut self, name: &str, options: ClusterOptions) -> Cluster {
        let mut standby = Cluster::empty(self.major(), name, options);
        if self.major() == PgMajor::V15 && self.is_running() {
            self.base_backup_into(&standby);
        } else {
            let was_running = self.is_running();
            self.stop(StopMode::Fast);
            copy_data_dir(self, &standby);
            if was_running {
                self.start();
            }
        }
        standby.configure_as_standby_of(self);
        standby.start();
        standby
    }

    fn base_backup_into(&self, standby: &Cluster) {
        let mut cmd = user::command(binaries::pg_basebackup());
        cmd.arg("-D")
            .arg(standby.data_dir())
            .args(["-R", "-X", "stream", "-c", "fast", "-N", "-d"])
            .arg(format!(
                "host={} port={} user=postgres application_name={}",
                self.host(),
                self.port(),
                standby.name
            ));
        for (link_target, name) in tablespace_links(&self.data_dir()) {
            let new = standby.base_dir().join("ts").join(name);
            cmd.arg(format!(
                "--tablespace-mapping={}={}",
                link_target.display(),
                new.display()
            ));
        }
        run_ok(&mut cmd, Duration::from_secs(600));
    }

    /// Moves this stopped cluster's server into network namespace `host` (or back out, `None`)
    /// for its next start: a deployment across two hosts ([`crate::netns`]).
    pub fn set_netns(&mut self, host: Option<&crate::netns::Host>) {
        assert!(
            !self.is_running(),
            "cluster '{}' must be stopped to move it to another network namespace",
            self.name
        );
        self.options.netns = host.cloned();
    }

    /// Makes this stopped cluster a standby of `primary`: writes `standby.signal` and sets
    /// `primary_conninfo` in `postgresql.auto.conf` (replacing any earlier one). Used for new
    /// standbys and for an old primary that was rewound and will rejoin.
    pub fn configure_as_standby_of(&mut self, primary: &Cluster) {
        assert!(
            !self.is_running(),
            "cluster '{}' must be stopped to become a standby",
            self.name
        );
        user::write_file(&self.data_dir().join("standby.signal"), "");
        let auto = self.data_dir().join("postgresql.auto.conf");
        let old = fs::read_to_string(&auto).unwrap_or_default();
        let mut text: String = old
            .lines()
            .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!(
            "primary_conninfo = 'host={} port={} user=postgres application_name={}'\n",
            primary.host(),
            primary.port(),
            self.name
        ));
        user::write_file(&auto, text);
    }

    /// Waits until this standby follows `primary`'s current timeline and has replayed all WAL
    /// `primary` has written so far.
    pub fn wait_for_catchup(&self, primary: &Cluster) {
        // The write position, not the insert position: an insert position just past a page
        // header is never reached by replay when the last record ends at the page boundary.
        let lsn = primary.lsn_of("SELECT pg_current_wal_lsn()");
        self.wait_for_replay(primary, lsn);
    }

    /// Waits until this standby follows `primary`'s current timeline and has replayed up to
    /// `lsn`; panics after [`CATCHUP_TIMEOUT`] showing both positions and timelines.
    pub fn wait_for_replay(&self, primary: &Cluster, lsn: Lsn) {
        if let Err(e) = self.try_wait_for_replay(primary, lsn, CATCHUP_TIMEOUT) {
            panic!("{e}");
        }
    }

    /// Waits until this standby follows `primary`'s current timeline and has replayed up to
    /// `lsn`. Following is judged by the WAL receiver's timeline: a position alone is not
    /// enough, since a node that was never rewound can be further along its own old timeline.
    /// A receiver can only stream a timeline whose history contains the standby's position.
    pub fn try_wait_for_replay(
        &self,
        primary: &Cluster,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<(), String> {
        let want_tli = primary.timeline();
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.try_query_rows(
                "postgres",
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), \
                 (SELECT received_tli FROM pg_stat_wal_receiver), \
                 (SELECT status FROM pg_stat_wal_receiver)",
            );
            let seen = match state {
                Ok(rows) => {
                    let row = rows.into_iter().next().unwrap_or_default();
                    let get = |i: usize| row.get(i).cloned().flatten();
                    if get(0).as_deref() == Some("f") {
                        return Err(format!(
                            "'{}' is not a standby (not in recovery), so it cannot follow '{}'",
                            self.name, primary.name
                        ));
                    }
                    let replay: Option<Lsn> = get(1).and_then(|s| s.parse().ok());
                    let tli: Option<TimeLineId> = get(2).and_then(|s| s.parse().ok());
                    if tli == Some(want_tli) && replay.is_some_and(|r| r >= lsn) {
                        return Ok(());
                    }
                    format!(
                        "standby replayed up to {}, its WAL receiver is on timeline {} (status {})",
                        replay.map_or("nothing".to_string(), |l| l.to_string()),
                        tli.map_or("none (no WAL receiver)".to_string(), |t| t.to_string()),
                        get(3).unwrap_or_else(|| "not running".to_string())
                    )
                }
                Err(e) => format!("standby not queryable: {e}"),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "standby '{}' did not catch up with primary '{}' within {timeout:?}: wanted \
                     timeline {want_tli} replayed up to {lsn}; {seen}.\n--- tail of '{}' log \
                     ---\n{}",
                    self.name,
                    primary.name,
                    self.name,
                    self.log_tail(20)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    // ---- WAL position and timeline ----

    pub fn is_in_recovery(&self) -> bool {
        self.query_one("SELECT pg_is_in_recovery()") == "t"
    }

    /// The current WAL position: the insert position on a primary, the replay position on a
    /// standby.
    pub fn current_lsn(&self) -> Lsn {
        self.lsn_of(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_insert_lsn() END",
        )
    }

    /// The position up to which a primary has flushed WAL.
    pub fn flush_lsn(&self) -> Lsn {
        self.lsn_of("SELECT pg_current_wal_flush_lsn()")
    }

    fn lsn_of(&self, sql: &str) -> Lsn {
        let text = self.query_one(sql);
        text.parse()
            .unwrap_or_else(|e| panic!("cluster '{}': {sql} gave {text:?}: {e}", self.name))
    }

    /// The current timeline: on a primary, the one it writes WAL on; on a standby, the one
    /// its WAL receiver streams (or, without a receiver, that of the last restartpoint).
    pub fn timeline(&self) -> TimeLineId {
        let text = self.query_one(
            "SELECT CASE WHEN NOT pg_is_in_recovery() \
                 THEN ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 \
                 ELSE coalesce((SELECT received_tli::int8 FROM pg_stat_wal_receiver), \
                               (SELECT timeline_id::int8 FROM pg_control_checkpoint())) END",
        );
        text.parse()
            .unwrap_or_else(|e| panic!("cluster '{}': timeline {text:?}: {e}", self.name))
    }

    // ---- SQL ----

    /// A new connection to database `db`.
    pub fn connect(&self, db: &str) -> Client {
        self.try_connect(db).unwrap_or_else(|e| {
            panic!(
                "could not connect to database {db} of '{}' (port {}): {}\nlog:\n{}",
                self.name,
                self.port(),
                show_error(&e),
                self.log_tail(20)
            )
        })
    }

    pub fn try_connect(&self, db: &str) -> Result<Client, postgres::Error> {
        postgres::Config::new()
            .host(&self.host())
            .port(self.port())
            .user("postgres")
            .dbname(db)
            .application_name("failback-tests")
            .connect_timeout(Duration::from_secs(30))
            .connect(NoTls)
    }

    /// Runs `sql` (one or more statements) in database `postgres`.
    pub fn execute(&self, sql: &str) {
        self.execute_in("postgres", sql);
    }

    /// Runs `sql` (one or more statements) in database `db`.
    pub fn execute_in(&self, db: &str, sql: &str) {
        if let Err(e) = self.try_execute_in(db, sql) {
            panic!(
                "SQL failed on '{}' (PostgreSQL {}), database {db}: {}\n{sql}",
                self.name,
                self.major(),
                show_error(&e)
            );
        }
    }

    /// Runs `sql` in database `db`; Err when it fails.
    pub fn try_execute_in(&self, db: &str, sql: &str) -> Result<(), postgres::Error> {
        self.try_connect(db)?.batch_execute(sql)
    }

    /// The rows of `sql` as one string, a line per row and `|` between columns (NULL as
    /// empty), for comparing query results between nodes.
    pub fn query_lines(&self, sql: &str) -> String {
        self.query_rows(sql)
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(Option::unwrap_or_default)
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The rows `sql` returns in database `postgres`, every value as text (NULL is None).
    pub fn query_rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.query_rows_in("postgres", sql)
    }

    /// The rows `sql` returns in database `db`, every value as text (NULL is None).
    pub fn query_rows_in(&self, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        self.try_query_rows(db, sql).unwrap_or_else(|e| {
            panic!(
                "query failed on '{}' (PostgreSQL {}), database {db}: {}\n{sql}",
                self.name,
                self.major(),
                show_error(&e)
            )
        })
    }

    pub fn try_query_rows(
        &self,
        db: &str,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, postgres::Error> {
        rows_of(&mut self.try_connect(db)?, sql)
    }

    /// The single non-NULL value `sql` returns in database `postgres`.
    pub fn query_one(&self, sql: &str) -> String {
        self.query_one_in("postgres", sql)
    }

    /// The single non-NULL value `sql` returns in database `db`.
    pub fn query_one_in(&self, db: &str, sql: &str) -> String {
        let rows = self.query_rows_in(db, sql);
        match rows.as_slice() {
            [row] if row.len() == 1 => row[0].clone().unwrap_or_else(|| {
                panic!(
                    "'{}': {sql} returned NULL where a value was expected",
                    self.name
                )
            }),
            _ => panic!(
                "'{}': {sql} returned {} rows ({:?}) where one value was expected",
                self.name,
                rows.len(),
                rows
            ),
        }
    }

    // ---- client programs (PostgreSQL 15's, which work against 13–18) ----

    /// `pgbench -i -s scale` in database `postgres`.
    pub fn pgbench_init(&self, scale: u32) -> Output {
        self.pgbench(&["-i", "-q", "-s", &scale.to_string()])
    }

    /// `pgbench` with `args` against database `postgres`; panics unless it succeeds.
    pub fn pgbench(&self, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new(binaries::pgbench());
        user::clean_env(&mut cmd);
        cmd.args([
            "-h",
            &self.host(),
            "-p",
            &self.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .arg("postgres");
        run_ok(&mut cmd, Duration::from_secs(600))
    }

    /// `psql -c sql` in database `postgres`, unaligned and tuples only; returns stdout.
    pub fn psql(&self, sql: &str) -> String {
        let mut cmd = std::process::Command::new(binaries::psql());
        user::clean_env(&mut cmd);
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &self.host(),
        ])
        .args([
            "-p",
            &self.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-c", sql]);
        run_ok(&mut cmd, Duration::from_secs(600)).stdout
    }

    // ---- tablespaces ----

    /// Creates directory `ts/<name>` owned by the PostgreSQL user and `CREATE TABLESPACE name`
    /// there; returns the directory. Create tablespaces before standbys on the same machine:
    /// a standby replaying CREATE TABLESPACE would use (and first empty) the same directory.
    pub fn create_tablespace(&self, name: &str) -> PathBuf {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "tablespace name {name:?}: use lower-case letters, digits and '_'"
        );
        let dir = self.base_dir().join("ts").join(name);
        user::create_dir(&self.base_dir().join("ts"));
        user::create_dir(&dir);
        self.execute(&format!(
            "CREATE TABLESPACE {name} LOCATION '{}'",
            dir.display()
        ));
        dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal_pid(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own child, not reaped
        // yet, so the id cannot have been reused.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A postgres error with the server's message, not just "db error".
pub fn show_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The tablespace symlinks in `data/pg_tblspc`: (where each points, its directory name).
fn tablespace_links(data: &Path) -> Vec<(PathBuf, String)> {
    let dir = data.join("pg_tblspc");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut links = Vec::new();
    for entry in entries.flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| entry.file_name().to_string_lossy().into_owned());
            links.push((target, name));
        }
    }
    links.sort();
    links
}

/// The rows `sql` returns on `client`, every value as text (NULL is None).
pub fn rows_of(
    client: &mut Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, postgres::Error> {
    Ok(client
        .simple_query(sql)?
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// Copies a stopped cluster's data directory to `to`'s, and each tablespace to `to`'s own
/// `ts/` with the `pg_tblspc` link pointing at the copy.
fn copy_data_dir(from: &Cluster, to: &Cluster) {
    let copy = |src: &Path, dst: &Path| {
        let mut cmd = user::command("cp");
        cmd.arg("-a").arg(src).arg(dst);
        run_ok(&mut cmd, Duration::from_secs(600));
    };
    copy(&from.data_dir(), &to.data_dir());
    let _ = fs::remove_file(to.data_dir().join("postmaster.pid"));
    let links = tablespace_links(&from.data_dir());
    if !links.is_empty() {
        user::create_dir(&to.base_dir().join("ts"));
    }
    let tblspc = to.data_dir().join("pg_tblspc");
    for entry in fs::read_dir(&tblspc).into_iter().flatten().flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let name = target
            .file_name()
            .unwrap_or_else(|| panic!("tablespace link {} has no name", target.display()));
        let new = to.base_dir().join("ts").join(name);
        copy(&target, &new);
        fs::remove_file(entry.path())
            .unwrap_or_else(|e| panic!("could not remove {}: {e}", entry.path().display()));
        std::os::unix::fs::symlink(&new, entry.path())
            .unwrap_or_else(|e| panic!("could not link {}: {e}", entry.path().display()));
        user::give(&entry.path());
    }
}

/// A server started on a data directory for a while (the source of a rewind over
/// `--source-server` in a scenario written for a shut-down source); stopped, fast, when
/// dropped, so the scenario goes on with the directory shut down again.
pub struct TempServer {
    child: Option<Child>,
    port: PortLock,
    dir: TempDir,
    data: PathBuf,
}

impl TempServer {
    /// Starts PostgreSQL `bins` on `data` (shut down) on a free loopback port, and waits until
    /// it accepts connections. Err carries the log.
    pub fn start(bins: &PgBinaries, data: &Path) -> Result<TempServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("fb-tmp-")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        user::create_dir(dir.path());
        let log_path = dir.path().join("server.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| e.to_string())?;
        user::give(&log_path);
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let port = reserve_port();
        let mut cmd = user::command(bins.postgres());
        cmd.arg("-D").arg(data);
        for (k, v) in [
            ("port", port.port.to_string()),
            ("listen_addresses", "127.0.0.1".into()),
            ("unix_socket_directories", dir.path().display().to_string()),
            ("archive_mode", "off".into()),
        ] {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd.spawn().map_err(|e| e.to_string())?;
        let mut server = TempServer {
            child: Some(child),
            port,
            dir,
            data: data.to_path_buf(),
        };
        let pid = server.child.as_ref().map_or(0, Child::id);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = server
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            let status = fs::read_to_string(data.join("postmaster.pid"))
                .ok()
                .filter(|t| t.lines().next().map(str::trim) == Some(&pid.to_string()))
                .and_then(|t| t.lines().nth(7).map(|l| l.trim().to_string()));
            if status.as_deref() == Some("ready") {
                return Ok(server);
            }
            if exited || Instant::now() >= deadline {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                server.stop();
                return Err(format!(
                    "PostgreSQL on {} did not start; its log:\n{}",
                    data.display(),
                    tail(&log, 40)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port.port
    }

    /// How a superuser reaches it.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port()
        )
    }

    /// What it logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal_pid(child.id(), libc::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("the temporary server on {} was killed", self.data.display());
    }
}

impl Drop for TempServer {
    fn drop(&mut self) {
        self.stop();
    }
}
