//! Running the target's own `postgres` binary, for the two things only PostgreSQL can do:
//! crash recovery of a target that was not shut down cleanly (`postgres --single`), and reading
//! the effective `restore_command` from its configuration (`postgres -C restore_command`).
//!
//! PostgreSQL refuses to run as root, so when failback runs as root these run as the owner of
//! the data directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use failback_common::PgMajor;

use crate::error::RewindError;

pub struct PgBin {
    bindir: Option<PathBuf>,
    run_as: Option<(u32, u32)>,
}

fn error(message: String) -> RewindError {
    RewindError::refused(message)
}

impl PgBin {
    pub fn new(bindir: Option<PathBuf>, run_as: Option<(u32, u32)>) -> Self {
        PgBin { bindir, run_as }
    }

    /// The `postgres` binary for `major`: `--pg-bindir`, else Debian's layout, else `PATH`.
    fn postgres(&self, major: Option<PgMajor>) -> PathBuf {
        if let Some(d) = &self.bindir {
            return d.join("postgres");
        }
        if let Some(m) = major {
            let p = PathBuf::from(format!("/usr/lib/postgresql/{m}/bin/postgres"));
            if p.exists() {
                return p;
            }
        }
        PathBuf::from("postgres")
    }

    fn command(&self, major: Option<PgMajor>) -> Command {
        let mut c = Command::new(self.postgres(major));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// The target's `restore_command`, as its server would see it.
    pub fn restore_command(
        &self,
        pgdata: &Path,
        config_file: Option<&Path>,
    ) -> Result<String, RewindError> {
        let major = std::fs::read_to_string(pgdata.join("PG_VERSION"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .and_then(PgMajor::from_number);
        let mut c = self.command(major);
        c.arg("-D").arg(pgdata);
        if let Some(f) = config_file {
            c.arg("-c").arg(format!("config_file={}", f.display()));
        }
        c.arg("-C").arg("restore_command");
        let out = c.stderr(Stdio::piped()).output().map_err(|e| {
            error(format!(
                "could not run {} to read restore_command: {e}; pass --pg-bindir",
                self.postgres(major).display()
            ))
        })?;
        if !out.status.success() {
            return Err(error(format!(
                "could not read restore_command from the target's configuration: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let cmd = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if cmd.is_empty() {
            return Err(error(
                "restore_command is not set in the target's configuration; -c needs it".into(),
            ));
        }
        Ok(cmd)
    }

    /// Crash recovery in single-user mode, leaving the target shut down cleanly.
    pub fn single_user_recovery(
        &self,
        pgdata: &Path,
        major: PgMajor,
        config_file: Option<&Path>,
    ) -> Result<(), RewindError> {
        let mut c = self.command(Some(major));
        c.arg("--single").arg("-F").arg("-D").arg(pgdata);
        if let Some(f) = config_file {
            c.arg("-c").arg(format!("config_file={}", f.display()));
        }
        c.arg("template1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let out = c.stderr(Stdio::piped()).output().map_err(|e| {
            error(format!(
                "could not run {} for crash recovery: {e}; pass --pg-bindir",
                self.postgres(Some(major)).display()
            ))
        })?;
        if !out.status.success() {
            return Err(error(format!(
                "postgres single-user mode in target cluster failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}
