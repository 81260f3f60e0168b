//! failbackd as a child process, so that a scenario can rewind through the wire.
//!
//! The scenarios of a local rewind are run again with the source behind failbackd: the same
//! failover, the same assertions, only the `failback rewind` command line differs
//! (`--source grpc://…` instead of `--source-pgdata`). Which way a test reaches its source is a
//! per-thread setting ([`Via`], [`with_via`]) that [`crate::rewind::rewind_dirs`] reads, so a
//! scenario body is written once; [`scenario_test!`](crate::scenario_test) runs it every way.
//!
//! failbackd is started from the same cargo target directory as the test, on port 0 of the
//! loopback; the address it bound is read from its first line on stderr. It is killed when the
//! [`Failbackd`] value is dropped, and everything it printed is kept for failure messages.

use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::rewind::failbackd_bin;

/// How a rewind reaches its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `--source-pgdata DIR`.
    Local,
    /// failbackd over gRPC: `--source grpc://ADDR`.
    Grpc,
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
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

/// How long failbackd may take to say where it listens.
const STARTUP: Duration = Duration::from_secs(30);

impl Failbackd {
    /// Serves `pgdata` on a loopback port, with failbackd's defaults.
    pub fn serve(pgdata: &Path) -> Failbackd {
        let mut child = Command::new(failbackd_bin())
            .arg("--pgdata")
            .arg(pgdata)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", failbackd_bin().display()));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        // Drains stderr for failbackd's whole life, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .rsplit_once(" on ")
                    .filter(|_| line.starts_with("failbackd: serving"))
                    .and_then(|(_, a)| a.trim().parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                }
                let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(STARTUP) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "failbackd did not say where it listens within {STARTUP:?}:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        };
        Failbackd { child, addr, log }
    }

    /// The `--source` URL for `via`.
    pub fn url(&self, via: Via) -> String {
        match via {
            Via::Local => panic!("a local rewind does not go through failbackd"),
            Via::Grpc => format!("grpc://{}", self.addr),
        }
    }

    /// What failbackd printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Failbackd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Defines a rewind scenario run every way a source can be reached, on every major version.
///
/// `scenario_test!(name, |major| { ... })` expands to a module `name` with submodules `local`
/// and `grpc`, each holding the tests `pg13` … `pg18`; the body runs with [`with_via`] set.
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
        }
    };
}
