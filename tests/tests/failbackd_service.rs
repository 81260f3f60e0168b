//! failbackd as an operator runs it: as a systemd service, stopped and restarted under a
//! rewind, refusing to start on what it cannot serve, logging for a machine.
//!
//! - SIGTERM in the middle of a rewind (the copy held to 4 MiB/s, one request at a time):
//!   failbackd finishes the reply in flight, says so and exits 0; the client, whose `--timeout`
//!   outlasts the restart, carries on against the failbackd started again on the same ports,
//!   and the old primary rejoins with the new primary's data. Over gRPC and over QUIC, whose
//!   shutdowns failbackd does differently (tonic's GOAWAY; its own refusals and close).
//! - `READY=1` reaches the `NOTIFY_SOCKET` the test binds only once the port accepts
//!   connections, and `STOPPING=1` comes with SIGTERM; every line of `--log-format json` is an
//!   object with `ts`, `level` and `msg`.
//! - failbackd exits non-zero, saying what to give instead, on a directory that is not a data
//!   directory, on a data directory of an unsupported version, with a `--pg-conn` that cannot
//!   connect, that reaches another server, or whose role lacks rights (the message names the
//!   GRANTs; once they are run, failbackd starts).
//!
//! PostgreSQL 15 only: none of this differs between versions.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use failback_common::journal::JOURNAL_FILE;
use failback_tests::failbackd::{Failbackd, Via};
use failback_tests::programs::failbackd as failbackd_bin;
use failback_tests::rewind::{
    FailbackRun, assert_tens_of_mb_rewound, diverged_with_tens_of_mb, rejoin, run_failback,
    stop_for_rewind,
};
use failback_tests::run::run_with_timeout;
use failback_tests::{Cluster, ClusterOptions, PgMajor, StopMode};

const MAJOR: PgMajor = PgMajor::V15;

// ---- SIGTERM under a rewind ----

/// `failback rewind` of `old` through `source` in the background, its copy held to 4 MiB/s.
/// Two requests of up to 16 MiB, uncompressed, share one connection's 16 MiB window: while the
/// client reads one at that rate, the other waits in failbackd for window, a reply in flight
/// for seconds. `--timeout 60` outlasts a restart.
fn rewind_in_background(old: &Cluster, source: Vec<OsString>) -> thread::JoinHandle<FailbackRun> {
    let mut args: Vec<OsString> = vec!["rewind".into(), "-D".into(), old.data_dir().into()];
    args.extend(source);
    args.extend(["--pg-bindir".into(), old.bins().bin_dir.clone().into()]);
    let held = [
        "--max-rate",
        "4M",
        "--timeout",
        "60",
        "--jobs",
        "2",
        "--connections",
        "1",
        "--compress",
        "none",
    ];
    for a in held {
        args.push(a.into());
    }
    let report = old.base_dir().join("rewind.json");
    thread::spawn(move || run_failback(&args, Some(&report)))
}

/// Waits until the copy is under way: the journal (written with the plan, before the first
/// fetch) exists, and a second has passed for the first requests to go out. Most of the 57 MB
/// is still to come, more than the two requests in flight carry.
fn wait_for_copy(old: &Cluster) {
    let journal = old.data_dir().join(JOURNAL_FILE);
    let t0 = Instant::now();
    while !journal.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the rewind never got to its copy"
        );
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_secs(1));
}

/// The N of failbackd's "N replies in flight" line.
fn replies_in_flight(log: &str) -> usize {
    let line = log
        .lines()
        .find(|l| l.contains("shutting down (SIGTERM received)"))
        .unwrap_or_else(|| panic!("failbackd did not say it was shutting down:\n{log}"));
    line.split(": ")
        .nth(2)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of replies in flight in {line:?}"))
}

fn sigterm_mid_rewind(via: Via) {
    let (mut old, mut new) = diverged_with_tens_of_mb(MAJOR);
    stop_for_rewind(&mut old, &mut new, StopMode::Immediate);
    let mut server = Failbackd::serve(&new.data_dir());
    let client = rewind_in_background(&old, server.source_args(via));
    wait_for_copy(&old);
    server.signal("TERM");
    let status = server.wait(Duration::from_secs(40));
    server.wait_for_log("failbackd: stopped", Duration::from_secs(5));
    let log = server.log();
    assert!(
        status.success(),
        "failbackd exited with {status} on SIGTERM:\n{log}"
    );
    // A reply was waiting for the client's window: it was in flight, and it was finished.
    assert!(
        replies_in_flight(&log) >= 1,
        "no reply in flight mid-copy:\n{log}"
    );
    assert!(
        log.contains("failbackd: stopped: every reply in flight finished"),
        "{log}"
    );
    // Back after longer than the client's window of buffered chunks lasts at 4 MiB/s (16 MiB:
    // 4 s), so that it has to ask while failbackd is down, as across a real restart.
    thread::sleep(Duration::from_secs(6));
    server.restart();
    let run = client.join().expect("the failback thread");
    assert!(
        run.success(),
        "failback did not carry on after failbackd's restart:\n{}\n--- failbackd ---\n{}",
        run.show(),
        server.log()
    );
    // Over QUIC the client's next request meets the refusal or the closed endpoint and is
    // retried. Over gRPC the client has been seen to finish without a retry (its remaining
    // requests answered before failbackd exited): not asserted there.
    assert!(
        via != Via::Quic || run.stderr.contains("trying again in"),
        "failback never had to wait for failbackd (the shutdown missed the copy):\n{}",
        run.show()
    );
    rejoin(&mut old, &mut new);
    assert_tens_of_mb_rewound(&old);
}

#[test]
fn sigterm_mid_rewind_finishes_the_replies_in_flight_and_the_rewind_carries_on_grpc() {
    sigterm_mid_rewind(Via::Grpc)
}

#[test]
fn sigterm_mid_rewind_finishes_the_replies_in_flight_and_the_rewind_carries_on_quic() {
    sigterm_mid_rewind(Via::Quic)
}

// ---- readiness and JSON lines ----

/// failbackd started by the test, its stderr lines sent on as they come.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(args: &[OsString], env: &[(&str, &Path)]) -> Running {
        let mut cmd = Command::new(failbackd_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting failbackd");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The lines printed until one holds `needle`.
    fn until(&mut self, needle: &str) {
        let t0 = Instant::now();
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = Duration::from_secs(30).saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "failbackd did not print {needle:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line, once failbackd has exited; and how it exited.
    fn finish(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "failbackd did not exit:\n{}",
                self.seen.join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        };
        self.seen.extend(self.lines.iter());
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "could not send SIGTERM to failbackd");
}

fn args(pgdata: &Path, more: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["-D".into(), pgdata.into()];
    a.extend(more.iter().map(OsString::from));
    a
}

#[test]
fn ready_is_told_to_systemd_once_the_port_is_open_and_json_lines_parse() {
    let cluster = Cluster::init(MAJOR, "ready", ClusterOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut running = Running::start(
        &args(
            &cluster.data_dir(),
            &["--listen", "127.0.0.1:0", "--log-format", "json"],
        ),
        &[("NOTIFY_SOCKET", &notify_path)],
    );
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("no READY=1 from failbackd");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.starts_with("READY=1\nSTATUS=serving "), "{ready:?}");
    // The address systemd is told is open by the time it is told.
    let addr: SocketAddr = ready
        .rsplit(" on ")
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {ready:?}"));
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("READY=1 came before {addr} accepted connections: {e}"));
    running.until("\"msg\":\"serving ");
    sigterm(&running.child);
    let n = notify.recv(&mut buf).expect("no STOPPING=1 from failbackd");
    let stopping = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=shutting down: 0 replies in flight"),
        "{stopping:?}"
    );
    let (status, lines) = running.finish();
    assert!(status.success(), "{status}:\n{}", lines.join("\n"));
    // Warnings (no TLS, no token), serving, shutting down, stopped: every one an object.
    assert!(lines.len() >= 5, "{}", lines.join("\n"));
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let ts = v["ts"].as_str().unwrap_or_else(|| panic!("no ts: {line}"));
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{line}"
        );
        assert!(
            ["info", "warning", "error"].contains(&v["level"].as_str().unwrap_or_default()),
            "{line}"
        );
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{line}");
    }
    let event = |e: &str| {
        lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["event"] == e)
            .unwrap_or_else(|| panic!("no {e} line:\n{}", lines.join("\n")))
    };
    assert_eq!(event("shutting_down")["in_flight"], 0);
    assert_eq!(event("stopped")["cut"], 0);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"level\":\"warning\"") && l.contains("without TLS")),
        "{}",
        lines.join("\n")
    );
}

// ---- refusing to start ----

/// failbackd with `args`, which must exit non-zero saying each of `needles`.
fn refused(args: &[OsString], needles: &[&str]) {
    let out = run_with_timeout(
        Command::new(failbackd_bin()).args(args),
        Duration::from_secs(60),
    )
    .expect("running failbackd");
    assert!(
        !out.status.success(),
        "failbackd started with {args:?}:\n{}",
        out.both()
    );
    for n in needles {
        assert!(out.stderr.contains(n), "no {n:?}:\n{}", out.both());
    }
}

#[test]
fn failbackd_refuses_what_it_cannot_serve_and_names_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        &args(dir.path(), &["--listen", "127.0.0.1:0"]),
        &[
            "failbackd: error:",
            "has no PG_VERSION: it is not a PostgreSQL data directory",
            "give -D the directory initdb created",
        ],
    );
    let mut running = Cluster::start_new(MAJOR, "source");
    // A data directory of another version: PG_VERSION is what names it.
    let old = dir.path().join("old");
    std::fs::create_dir_all(old.join("global")).unwrap();
    std::fs::write(old.join("PG_VERSION"), "12\n").unwrap();
    std::fs::copy(
        running.data_dir().join("global/pg_control"),
        old.join("global/pg_control"),
    )
    .unwrap();
    refused(
        &args(&old, &["--listen", "127.0.0.1:0"]),
        &[
            "is a PostgreSQL 12 data directory",
            "serves PostgreSQL 13 to 18",
        ],
    );
    let pgdata = running.data_dir();
    let listen = ["--listen", "127.0.0.1:0", "--pg-conn"];
    let with_conn = |conn: &str| {
        let mut a = args(&pgdata, &listen);
        a.push(conn.into());
        a
    };
    refused(
        &with_conn("host=/nonexistent-socket-dir port=1 user=postgres"),
        &[
            "--pg-conn: could not connect",
            "start the PostgreSQL server",
        ],
    );
    // Another server's connection: a cluster made beside it, shut down, is served instead.
    let other = Cluster::init(MAJOR, "other", ClusterOptions::default());
    let mut a = args(&other.data_dir(), &listen);
    a.push(running.conninfo().into());
    refused(
        &a,
        &[
            "--pg-conn reaches the server of",
            "give --pg-conn a connection to the server running on -D's data directory",
        ],
    );
    // A role that may log in and nothing more.
    running.execute("CREATE ROLE weak LOGIN");
    let weak = format!("{} user=weak", running.conninfo());
    let grants = [
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_backup_start(text, boolean) TO \"weak\";",
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_backup_stop(boolean) TO \"weak\";",
        "ALTER ROLE \"weak\" REPLICATION;",
    ];
    let mut needles = vec![
        "--pg-conn connects as role \"weak\"",
        "as a superuser, run:",
    ];
    needles.extend(grants);
    refused(&with_conn(&weak), &needles);
    // What the message says to run is all it takes.
    running.execute(&grants.join("\n"));
    let mut started = Running::start(&with_conn(&weak), &[]);
    started.until("failbackd: serving ");
    sigterm(&started.child);
    let (status, lines) = started.finish();
    assert!(status.success(), "{status}:\n{}", lines.join("\n"));
    running.stop(StopMode::Fast);
}
