//! failbackd as a child process, so that a scenario can rewind through the wire.
//!
//! The scenarios of a local rewind are run again with the source behind failbackd: the same
//! failover, the same assertions, only the `failback rewind` command line differs
//! (`--source grpcs://…` or `quic://…` instead of `--source-pgdata`). Which way a test reaches its source is a
//! per-thread setting ([`Via`], [`with_via`]) that [`crate::rewind::rewind_dirs`] reads, so a
//! scenario body is written once; [`scenario_test!`](crate::scenario_test) runs it every way.
//!
//! failbackd is the binary cargo built for the run ([`crate::programs`]), started on port 0 of the
//! loopback, serving gRPC and QUIC (with a certificate made for the run: QUIC always runs TLS);
//! the addresses it bound are read from its stderr. It is killed when the [`Failbackd`] value
//! is dropped, and everything it printed is kept for failure messages.

use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::programs::failbackd as failbackd_bin;

/// How a rewind reaches its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `--source-pgdata DIR`.
    Local,
    /// failbackd over gRPC with TLS: `--source grpcs://localhost:PORT --ca CERT`.
    Grpc,
    /// failbackd over QUIC: `--source quic://localhost:PORT --ca CERT`.
    Quic,
    /// No failbackd: the source's server running, reached over libpq
    /// (`--source-server CONNSTR`); a scenario's shut-down source is started for the rewind and
    /// stopped again after it ([`crate::cluster::TempServer`]).
    Libpq,
}

thread_local! {
    static VIA: Cell<Via> = const { Cell::new(Via::Local) };
}

/// The way rewinds started from this thread reach their source.
pub fn via() -> Via {
    VIA.with(Cell::get)
}

/// Runs `f` with rewinds reaching their source `via`.
pub fn with_via<T>(via: Via, f: impl FnOnce() -> T) -> T {
    let before = VIA.with(|v| v.replace(via));
    let out = f();
    VIA.with(|v| v.set(before));
    out
}

/// A running failbackd, killed on drop.
pub struct Failbackd {
    child: Child,
    pgdata: PathBuf,
    addr: SocketAddr,
    quic_addr: SocketAddr,
    /// Where it serves its metrics, with `--metrics-listen` among its flags.
    metrics_addr: Option<SocketAddr>,
    /// The self-signed certificate failbackd serves, for the client's `--ca`.
    cert: PathBuf,
    key: PathBuf,
    /// Arguments beyond the listeners and TLS (`--pg-conn`), kept for [`Failbackd::restart`].
    extra: Vec<std::ffi::OsString>,
    _dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

/// How long failbackd may take to say where it listens.
const STARTUP: Duration = Duration::from_secs(30);

impl Failbackd {
    /// Serves `pgdata` on a loopback port, with failbackd's defaults.
    pub fn serve(pgdata: &Path) -> Failbackd {
        Failbackd::serve_with(pgdata, Vec::new())
    }

    /// Serves the data directory of a running cluster live: with `--pg-conn` to its server.
    pub fn serve_live(cluster: &crate::Cluster) -> Failbackd {
        Failbackd::serve_with(
            &cluster.data_dir(),
            vec!["--pg-conn".into(), cluster.conninfo().into()],
        )
    }

    /// Serves a running cluster live, with more of failbackd's flags.
    pub fn serve_live_with(cluster: &crate::Cluster, more: &[&str]) -> Failbackd {
        let mut extra: Vec<std::ffi::OsString> =
            vec!["--pg-conn".into(), cluster.conninfo().into()];
        extra.extend(more.iter().map(Into::into));
        Failbackd::serve_with(&cluster.data_dir(), extra)
    }

    /// Serves `pgdata` with more of failbackd's flags (`--metrics-listen 127.0.0.1:0`: its
    /// address is read too, [`Failbackd::metrics_addr`]).
    pub fn serve_with_flags(pgdata: &Path, flags: &[&std::ffi::OsStr]) -> Failbackd {
        Failbackd::serve_with(pgdata, flags.iter().map(Into::into).collect())
    }

    fn serve_with(pgdata: &Path, extra: Vec<std::ffi::OsString>) -> Failbackd {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("a self-signed certificate");
        std::fs::write(&cert, ck.cert.pem()).expect("writing the certificate");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("writing the key");
        let log = Arc::new(Mutex::new(String::new()));
        let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let (child, (addr, quic_addr, metrics_addr)) =
            spawn(pgdata, any, any, &cert, &key, &extra, &log);
        Failbackd {
            child,
            pgdata: pgdata.to_path_buf(),
            addr,
            quic_addr,
            metrics_addr,
            cert,
            key,
            extra,
            _dir: dir,
            log,
        }
    }

    /// Kills failbackd with SIGKILL, as a crash would: no goodbye to its clients.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) failbackd: a hung server still holds its
    /// connections open but answers nothing.
    pub fn pause(&self, paused: bool) {
        let sig = if paused { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not send {sig} to failbackd");
    }

    /// Sends failbackd signal `sig` (`"TERM"`, `"INT"`): a service manager's stop.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not send SIG{sig} to failbackd");
    }

    /// Waits for failbackd to exit; panics with its log if it has not within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for failbackd") {
                return status;
            }
            assert!(
                std::time::Instant::now() < until,
                "failbackd did not exit within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts failbackd again after [`Failbackd::kill`], on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        let (child, (addr, quic_addr, metrics_addr)) = spawn(
            &self.pgdata,
            self.addr,
            self.quic_addr,
            &self.cert,
            &self.key,
            &self.extra,
            &self.log,
        );
        assert_eq!((addr, quic_addr), (self.addr, self.quic_addr));
        self.child = child;
        self.metrics_addr = metrics_addr;
    }

    /// The address of failbackd's metrics (`--metrics-listen`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("failbackd was started with --metrics-listen")
    }

    /// The gRPC and QUIC addresses failbackd listens on.
    pub fn addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.addr, self.quic_addr)
    }

    /// The client arguments that reach `via` at `port` instead of failbackd's own (a proxy).
    pub fn source_args_at(&self, via: Via, port: u16) -> Vec<std::ffi::OsString> {
        let scheme = match via {
            Via::Local | Via::Libpq => panic!("{via:?}: this rewind does not go through failbackd"),
            Via::Grpc => "grpcs",
            Via::Quic => "quic",
        };
        vec![
            "--source".into(),
            format!("{scheme}://localhost:{port}").into(),
            "--ca".into(),
            self.cert.clone().into(),
        ]
    }

    /// The `failback rewind` arguments that reach this failbackd `via` a transport.
    pub fn source_args(&self, via: Via) -> Vec<std::ffi::OsString> {
        let port = match via {
            Via::Quic => self.quic_addr.port(),
            _ => self.addr.port(),
        };
        self.source_args_at(via, port)
    }

    /// What failbackd printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until failbackd has printed a line holding `needle`; panics with its log if it
    /// has not within `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let until = std::time::Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                std::time::Instant::now() < until,
                "failbackd did not print {needle:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Failbackd {
    fn drop(&mut self) {
        // SIGKILL ends a paused process too.
        self.kill();
    }
}

/// Starts failbackd on `listen` and `quic_listen`, appending what it prints to `log`; returns
/// the child and the addresses it bound: gRPC, QUIC and, with `--metrics-listen` in `extra`,
/// the metrics'.
fn spawn(
    pgdata: &Path,
    listen: SocketAddr,
    quic_listen: SocketAddr,
    cert: &Path,
    key: &Path,
    extra: &[std::ffi::OsString],
    log: &Arc<Mutex<String>>,
) -> (Child, (SocketAddr, SocketAddr, Option<SocketAddr>)) {
    let mut child = Command::new(failbackd_bin())
        .arg("--pgdata")
        .arg(pgdata)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--quic-listen")
        .arg(quic_listen.to_string())
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", failbackd_bin().display()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = Arc::clone(log);
    // Drains stderr for failbackd's whole life, so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .rsplit_once(" on ")
                .filter(|_| line.starts_with("failbackd: serving"))
                .and_then(|(_, a)| a.split_whitespace().next()?.parse::<SocketAddr>().ok())
            {
                let _ = tx.send((Some(line.contains("over QUIC")), addr));
            }
            // "failbackd: metrics on http://ADDR/metrics"
            if let Some(addr) = line
                .strip_prefix("failbackd: metrics on http://")
                .and_then(|a| a.strip_suffix("/metrics")?.parse::<SocketAddr>().ok())
            {
                let _ = tx.send((None, addr));
            }
            let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
            l.push_str(&line);
            l.push('\n');
        }
    });
    let (mut addr, mut quic_addr, mut metrics_addr) = (None, None, None);
    let metrics = extra.iter().any(|a| a == "--metrics-listen");
    while addr.is_none() || quic_addr.is_none() || (metrics && metrics_addr.is_none()) {
        match rx.recv_timeout(STARTUP) {
            Ok((Some(true), a)) => quic_addr = Some(a),
            Ok((Some(false), a)) => addr = Some(a),
            Ok((None, a)) => metrics_addr = Some(a),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "failbackd did not say where it listens within {STARTUP:?}:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        }
    }
    (
        child,
        (
            addr.expect("a gRPC address"),
            quic_addr.expect("a QUIC address"),
            metrics_addr,
        ),
    )
}

/// Defines a rewind scenario run every way a source can be reached, on every major version.
///
/// `scenario_test!(name, |major| { ... })` expands to a module `name` with submodules `local`,
/// `grpc`, `quic` and `libpq`, each holding the tests `pg13` … `pg18`; the body runs with [`with_via`]
/// set.
#[macro_export]
macro_rules! scenario_test {
    ($name:ident, |$major:ident| $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($major: $crate::PgMajor) {
                $body
            }

            mod local {
                fn run(major: $crate::PgMajor) {
                    $crate::failbackd::with_via($crate::failbackd::Via::Local, || {
                        super::body(major)
                    })
                }
                $crate::pg_versions!(run);
            }

            mod grpc {
                fn run(major: $crate::PgMajor) {
                    $crate::failbackd::with_via($crate::failbackd::Via::Grpc, || super::body(major))
                }
                $crate::pg_versions!(run);
            }

            mod quic {
                fn run(major: $crate::PgMajor) {
                    $crate::failbackd::with_via($crate::failbackd::Via::Quic, || super::body(major))
                }
                $crate::pg_versions!(run);
            }
            mod libpq {
                fn run(major: $crate::PgMajor) {
                    $crate::failbackd::with_via($crate::failbackd::Via::Libpq, || {
                        super::body(major)
                    })
                }
                $crate::pg_versions!(run);
            }
        }
    };
}
