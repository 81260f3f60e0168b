//! Running helper programs (npm, tar, initdb, pg_basebackup, pgbench, ...) with a time limit.
//!
//! A test bed that hangs is worse than one that fails: every external command gets a deadline,
//! and its output is captured so that a failure can say what the program said.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished program printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout and stderr together, for error messages.
    pub fn both(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion with stdin closed, capturing its output; kills it after `timeout`.
/// Err says which program failed to start or ran too long.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {shown}: {e}"))?;
    // Pipes are drained on their own threads so a chatty program cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(format!(
                    "{shown} did not finish within {timeout:?}; it printed:\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("could not wait for {shown}: {e}")),
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` and panics, showing its output, unless it exits with status 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    match run_with_timeout(cmd, timeout) {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!("{shown} failed ({}):\n{}", out.status, out.both()),
        Err(e) => panic!("{e}"),
    }
}

/// Takes an exclusive `flock` on `path` (created if need be), waiting for any other process
/// that holds it; released when the returned file is dropped. Many test processes start at
/// once, and some steps (fetching PostgreSQL, building the programs under test) must run once.
pub fn lock_exclusive(path: &std::path::Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let lock = std::fs::File::create(path)
        .unwrap_or_else(|e| panic!("could not create lock file {}: {e}", path.display()));
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!(
            "could not lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    lock
}
