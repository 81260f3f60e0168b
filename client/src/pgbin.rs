//! Running the target's own `postgres` binary, for the two things only PostgreSQL can do:
//! crash recovery of a target that was not shut down cleanly (`postgres --single`), and reading
//! the effective `restore_command` from its configuration (`postgres -C restore_command`).
//!
//! A data directory can be run only by a `postgres` of its own major version (the one in its
//! `PG_VERSION` file); any other refuses it ("database files are incompatible with server").
//! pg_rewind runs the `postgres` beside its own binary and checks that it is of its own
//! version. failback serves every major version from one binary, so it looks in more places,
//! in this order, and takes the first whose `postgres -V` names the target's major version:
//!
//! 1. `--pg-bindir` (failback's CLI), when given;
//! 2. the first word of the target's `postmaster.opts`: PostgreSQL writes there, at every
//!    start, the full path of the `postgres` that runs the directory — the surest witness;
//! 3. the directory failback was invoked from (argv[0] as given, symlinks not followed), when it
//!    holds a `postgres`: failback linked as `/usr/pgsql-17/bin/pg_rewind`;
//! 4. Debian's `/usr/lib/postgresql/N/bin`, then RHEL's `/usr/pgsql-N/bin`;
//! 5. every directory of `PATH`.
//!
//! When none fits, the error names each place tried and what was there.
//!
//! PostgreSQL refuses to run as root, so when failback runs as root these run as the owner of
//! the data directory.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use failback_common::PgMajor;

use crate::error::RewindError;

pub struct PgBin {
    bindir: Option<PathBuf>,
    run_as: Option<(u32, u32)>,
    invoked: Option<PathBuf>,
    path_env: Option<OsString>,
}

fn error(message: String) -> RewindError {
    RewindError::refused(message)
}

/// A place a `postgres` may be, and which rule named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub from: &'static str,
}

/// The `postgres` path PostgreSQL recorded in `postmaster.opts`: the file's first word, the
/// path written unquoted before the quoted arguments (`/usr/lib/postgresql/15/bin/postgres
/// "-D" "/data"`), so a path with spaces is taken whole up to ` "`.
pub fn postmaster_opts_binary(text: &str) -> Option<PathBuf> {
    let line = text.lines().next()?;
    let path = match line.find(" \"") {
        Some(i) => &line[..i],
        None => line,
    }
    .trim();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The major version `postgres -V` prints: `postgres (PostgreSQL) 17.2`, `… 15.18 (Debian …)`,
/// `… 18beta1`.
pub fn postgres_major(version_output: &str) -> Option<u32> {
    let rest = &version_output[version_output.find(") ")? + 2..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The directory failback was invoked from, as invoked: argv[0]'s directory when it names a
/// path, else the `PATH` directory that holds argv[0]'s name. Symlinks are not followed: a
/// link named `/usr/pgsql-17/bin/pg_rewind` stands in that bin directory.
pub fn invoked_dir(argv0: &OsStr, path_env: Option<&OsStr>) -> Option<PathBuf> {
    if argv0.as_bytes().contains(&b'/') {
        let parent = Path::new(argv0).parent()?;
        return Some(if parent.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            parent.to_path_buf()
        });
    }
    std::env::split_paths(path_env?)
        .find(|d| d.join(argv0).is_file())
        .filter(|d| !d.as_os_str().is_empty())
}

/// Where to look for the target's `postgres`, in order (see the module header), without
/// duplicates.
pub fn candidates(
    pg_bindir: Option<&Path>,
    postmaster_opts: Option<&str>,
    invoked: Option<&Path>,
    major: Option<PgMajor>,
    path_env: Option<&OsStr>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut add = |path: PathBuf, from: &'static str| {
        if !out.iter().any(|c| c.path == path) {
            out.push(Candidate { path, from });
        }
    };
    if let Some(d) = pg_bindir {
        add(d.join("postgres"), "--pg-bindir");
    }
    if let Some(p) = postmaster_opts.and_then(postmaster_opts_binary) {
        add(p, "the target's postmaster.opts");
    }
    if let Some(d) = invoked {
        add(d.join("postgres"), "beside this program");
    }
    if let Some(m) = major {
        add(
            PathBuf::from(format!("/usr/lib/postgresql/{m}/bin/postgres")),
            "Debian's layout",
        );
        add(
            PathBuf::from(format!("/usr/pgsql-{m}/bin/postgres")),
            "RHEL's layout",
        );
    }
    for d in path_env.map(std::env::split_paths).into_iter().flatten() {
        if !d.as_os_str().is_empty() {
            add(d.join("postgres"), "PATH");
        }
    }
    out
}

/// The target's major version, from its `PG_VERSION`.
fn target_major(pgdata: &Path) -> Option<PgMajor> {
    std::fs::read_to_string(pgdata.join("PG_VERSION"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .and_then(PgMajor::from_number)
}

impl PgBin {
    pub fn new(bindir: Option<PathBuf>, run_as: Option<(u32, u32)>) -> Self {
        let path_env = std::env::var_os("PATH");
        let invoked = std::env::args_os()
            .next()
            .and_then(|a| invoked_dir(&a, path_env.as_deref()));
        PgBin {
            bindir,
            run_as,
            invoked,
            path_env,
        }
    }

    fn command(&self, postgres: &Path) -> Command {
        let mut c = Command::new(postgres);
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// The `postgres` that can run `pgdata` (of `major`, else of its `PG_VERSION`), for
    /// `purpose`: the first candidate whose `postgres -V` says that major version.
    pub fn find(
        &self,
        pgdata: &Path,
        major: Option<PgMajor>,
        purpose: &str,
    ) -> Result<PathBuf, RewindError> {
        let major = major.or_else(|| target_major(pgdata));
        let opts = std::fs::read_to_string(pgdata.join("postmaster.opts")).ok();
        let mut tried = Vec::new();
        for c in candidates(
            self.bindir.as_deref(),
            opts.as_deref(),
            self.invoked.as_deref(),
            major,
            self.path_env.as_deref(),
        ) {
            if !c.path.is_file() {
                // Every PATH directory without one is not worth naming.
                if c.from != "PATH" {
                    tried.push(format!("{} ({}): not there", c.path.display(), c.from));
                }
                continue;
            }
            let out = self
                .command(&c.path)
                .arg("-V")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            let found = match &out {
                Ok(o) if o.status.success() => postgres_major(&String::from_utf8_lossy(&o.stdout)),
                _ => None,
            };
            match (found, major) {
                (Some(f), Some(m)) if f == m.number() => return Ok(c.path),
                (Some(_), None) => return Ok(c.path),
                (Some(f), Some(_)) => {
                    tried.push(format!("{} ({}): PostgreSQL {f}", c.path.display(), c.from))
                }
                (None, _) => tried.push(format!(
                    "{} ({}): `postgres -V` did not run",
                    c.path.display(),
                    c.from
                )),
            }
        }
        let version = major.map_or("the target's version".to_string(), |m| {
            format!("PostgreSQL {m}")
        });
        Err(error(format!(
            "could not find a postgres of {version} for {purpose}, which must be the target's \
             own (tried {}); pass --pg-bindir to failback, or link pg_rewind into that \
             version's bin directory",
            if tried.is_empty() {
                "nothing: no candidate".to_string()
            } else {
                tried.join("; ")
            }
        )))
    }

    /// The target's `restore_command`, as its server would see it.
    pub fn restore_command(
        &self,
        pgdata: &Path,
        config_file: Option<&Path>,
    ) -> Result<String, RewindError> {
        let postgres = self.find(pgdata, None, "reading restore_command (-c)")?;
        let mut c = self.command(&postgres);
        c.arg("-D").arg(pgdata);
        if let Some(f) = config_file {
            c.arg("-c").arg(format!("config_file={}", f.display()));
        }
        c.arg("-C").arg("restore_command");
        let out = c.stderr(Stdio::piped()).output().map_err(|e| {
            error(format!(
                "could not run {} to read restore_command: {e}",
                postgres.display()
            ))
        })?;
        if !out.status.success() {
            return Err(error(format!(
                "could not read restore_command from the target's configuration with {}: {}",
                postgres.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let cmd = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if cmd.is_empty() {
            return Err(error(
                "restore_command is not set in the target cluster; -c needs it".into(),
            ));
        }
        Ok(cmd)
    }

    /// Crash recovery in single-user mode with `postgres` (from [`PgBin::find`]), leaving the
    /// target shut down cleanly.
    pub fn single_user_recovery(
        &self,
        postgres: &Path,
        pgdata: &Path,
        config_file: Option<&Path>,
    ) -> Result<(), RewindError> {
        let mut c = self.command(postgres);
        c.arg("--single").arg("-F").arg("-D").arg(pgdata);
        if let Some(f) = config_file {
            c.arg("-c").arg(format!("config_file={}", f.display()));
        }
        c.arg("template1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let out = c.stderr(Stdio::piped()).output().map_err(|e| {
            error(format!(
                "could not run {} for crash recovery: {e}",
                postgres.display()
            ))
        })?;
        if !out.status.success() {
            return Err(error(format!(
                "postgres single-user mode in target cluster failed ({}): {}",
                postgres.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postmaster_opts_names_the_binary_that_ran_the_directory() {
        assert_eq!(
            postmaster_opts_binary("/usr/lib/postgresql/15/bin/postgres \"-D\" \"/data\"\n"),
            Some(PathBuf::from("/usr/lib/postgresql/15/bin/postgres"))
        );
        assert_eq!(
            postmaster_opts_binary("/opt/pg 17/bin/postgres \"-D\" \"/d\"\n"),
            Some(PathBuf::from("/opt/pg 17/bin/postgres"))
        );
        assert_eq!(
            postmaster_opts_binary("/usr/pgsql-17/bin/postgres\n"),
            Some(PathBuf::from("/usr/pgsql-17/bin/postgres"))
        );
        assert_eq!(postmaster_opts_binary(""), None);
        assert_eq!(postmaster_opts_binary("\n"), None);
    }

    #[test]
    fn postgres_v_says_the_major_version() {
        assert_eq!(postgres_major("postgres (PostgreSQL) 17.2\n"), Some(17));
        assert_eq!(
            postgres_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(postgres_major("postgres (PostgreSQL) 18beta1\n"), Some(18));
        assert_eq!(postgres_major("garbage"), None);
        assert_eq!(postgres_major("postgres (PostgreSQL) \n"), None);
    }

    #[test]
    fn the_invoked_directory_is_argv0s_own() {
        assert_eq!(
            invoked_dir(OsStr::new("/usr/pgsql-17/bin/pg_rewind"), None),
            Some(PathBuf::from("/usr/pgsql-17/bin"))
        );
        assert_eq!(
            invoked_dir(OsStr::new("./pg_rewind"), None),
            Some(PathBuf::from("."))
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg_rewind"), b"").unwrap();
        let path = std::env::join_paths(["/nonexistent", dir.path().to_str().unwrap()]).unwrap();
        assert_eq!(
            invoked_dir(OsStr::new("pg_rewind"), Some(&path)),
            Some(dir.path().to_path_buf())
        );
        assert_eq!(invoked_dir(OsStr::new("pg_rewind"), None), None);
    }

    #[test]
    fn candidates_come_in_order_without_duplicates() {
        let c = candidates(
            Some(Path::new("/opt/pg17/bin")),
            Some("/work/pg/17/native/bin/postgres \"-D\" \"/d\"\n"),
            Some(Path::new("/usr/pgsql-17/bin")),
            PgMajor::from_number(17),
            Some(OsStr::new("/usr/local/bin::/usr/pgsql-17/bin")),
        );
        let got: Vec<(String, &str)> = c
            .iter()
            .map(|c| (c.path.display().to_string(), c.from))
            .collect();
        assert_eq!(
            got,
            [
                ("/opt/pg17/bin/postgres".to_string(), "--pg-bindir"),
                (
                    "/work/pg/17/native/bin/postgres".into(),
                    "the target's postmaster.opts"
                ),
                ("/usr/pgsql-17/bin/postgres".into(), "beside this program"),
                (
                    "/usr/lib/postgresql/17/bin/postgres".into(),
                    "Debian's layout"
                ),
                ("/usr/local/bin/postgres".into(), "PATH"),
            ]
        );
        assert!(candidates(None, None, None, None, None).is_empty());
    }

    #[test]
    fn a_postgres_of_another_version_is_skipped_and_named() {
        // Two fake postgres binaries: one says 15, one says 17.
        let dir = tempfile::tempdir().unwrap();
        let fake = |name: &str, version: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            let p = d.join("postgres");
            std::fs::write(
                &p,
                format!("#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n"),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            d
        };
        let pg15 = fake("15", "15.18 (Debian 15.18-0+deb12u1)");
        let pg17 = fake("17", "17.10");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("PG_VERSION"), "17\n").unwrap();
        let bin = PgBin {
            bindir: Some(pg15.clone()),
            run_as: None,
            invoked: None,
            path_env: Some(std::env::join_paths([&pg15, &pg17]).unwrap()),
        };
        assert_eq!(
            bin.find(&data, None, "crash recovery").unwrap(),
            pg17.join("postgres")
        );
        std::fs::write(data.join("PG_VERSION"), "13\n").unwrap();
        let e = bin
            .find(&data, None, "crash recovery")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("could not find a postgres of PostgreSQL 13 for crash recovery"),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "{} (--pg-bindir): PostgreSQL 15",
                pg15.join("postgres").display()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "{} (PATH): PostgreSQL 17",
                pg17.join("postgres").display()
            )),
            "{e}"
        );
        assert!(
            e.contains("/usr/pgsql-13/bin/postgres (RHEL's layout): not there"),
            "{e}"
        );
    }
}
