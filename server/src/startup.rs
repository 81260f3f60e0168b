//! What failbackd checks before it says it is ready: that it was given a data directory it
//! can serve, and, with `--pg-conn`, a connection that reaches the server running on it with
//! the rights every question failbackd asks needs.
//!
//! Each is found at start-up rather than by the first rewind, hours later, from the other
//! side of a failover: failbackd exits with what is wrong and what to give instead, and a
//! service manager shows it at once.
//!
//! What failbackd asks over `--pg-conn` (`failback-sql`): the end of WAL
//! (`pg_current_wal_insert_lsn()`, `pg_current_wal_lsn()`, `pg_current_wal_flush_lsn()`,
//! `pg_walfile_name()`, `pg_last_wal_replay_lsn()`, executable by every role unless revoked) and
//! backup windows (`pg_backup_start`/`pg_backup_stop`, `pg_start_backup`/`pg_stop_backup`
//! before 15, which only superusers may run unless granted, and a temporary physical replication
//! slot, which needs the `REPLICATION` attribute). The rights are read with
//! `has_function_privilege` and `pg_roles`, never by calling what they guard; the end of WAL,
//! read-only, is asked once as a rewind would.

use std::path::{Path, PathBuf};

use failback_common::PgMajor;
use failback_datadir::{DataDir, NotADataDirectory};
use failback_sql::libpq::Format;

/// Why failbackd does not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "{} is a PostgreSQL {version} data directory (its PG_VERSION says so): failbackd serves \
         PostgreSQL {first} to {last}; give -D the data directory of a server of one of those",
        .root.display(),
        first = PgMajor::ALL[0],
        last = PgMajor::ALL[PgMajor::ALL.len() - 1]
    )]
    Unsupported { root: PathBuf, version: String },
    #[error("{error}; {} holds one: give -D {}", .root.display(), .inside.display())]
    DataDirectoryInside {
        root: PathBuf,
        inside: PathBuf,
        #[source]
        error: NotADataDirectory,
    },
    #[error(transparent)]
    NotADataDirectory(#[from] NotADataDirectory),
    #[error(
        "--pg-conn: could not connect: {0}; start the PostgreSQL server running on the data \
         directory first (failbackd's unit ordered after it), or fix --pg-conn to reach it"
    )]
    Connect(String),
    #[error("--pg-conn: the server refused failbackd's check of its rights: {0}")]
    Check(String),
    #[error(
        "--pg-conn connects as role {role:?}, which lacks what failbackd needs of it ({missing}); \
         as a superuser, run: {grants} (or connect as a superuser)"
    )]
    Rights {
        role: String,
        missing: String,
        grants: String,
    },
    #[error("--pg-conn: the server {what}: {fix}")]
    Setting { what: String, fix: &'static str },
    #[error(
        "--pg-conn reaches the server of {theirs}, not {ours}: give --pg-conn a connection to the \
         server running on -D's data directory{port}"
    )]
    OtherServer {
        theirs: String,
        ours: String,
        port: String,
    },
    #[error("--pg-conn: the server cannot tell where its WAL ends: {0}")]
    EndOfWal(#[source] failback_sql::LiveError),
}

/// Whether `root` is a data directory failbackd serves: `PG_VERSION` of a supported major
/// version, then [`failback_datadir::check_data_directory`]. A directory that only holds one
/// (Debian's `/var/lib/postgresql/16`, with `main` inside) is named in the refusal.
pub fn check_data_directory(root: &Path) -> Result<(), StartupError> {
    if let Ok(Some(text)) = DataDir::new(root).read_file("PG_VERSION") {
        let version = String::from_utf8_lossy(&text).trim().to_string();
        // 9.6 and before wrote the version with its minor part.
        let major = version.split('.').next().unwrap_or_default();
        if let Ok(n) = major.parse::<u32>()
            && PgMajor::from_number(n).is_none()
        {
            return Err(StartupError::Unsupported {
                root: root.to_path_buf(),
                version,
            });
        }
    }
    match failback_datadir::check_data_directory(root) {
        Ok(()) => Ok(()),
        Err(error @ NotADataDirectory::NoPgVersion { .. }) => match data_directory_inside(root) {
            Some(inside) => Err(StartupError::DataDirectoryInside {
                root: root.to_path_buf(),
                inside,
                error,
            }),
            None => Err(error.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// A directory right under `root` that holds `PG_VERSION` and `global/pg_control`.
fn data_directory_inside(root: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("PG_VERSION").is_file() && p.join("global/pg_control").is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// What the server behind `--pg-conn` says about the role, its rights and itself.
const RIGHTS: &str = "SELECT current_user,
       r.rolsuper OR r.rolreplication,
       has_function_privilege('pg_catalog.pg_current_wal_insert_lsn()', 'EXECUTE'),
       has_function_privilege('pg_catalog.pg_current_wal_lsn()', 'EXECUTE'),
       has_function_privilege('pg_catalog.pg_current_wal_flush_lsn()', 'EXECUTE'),
       has_function_privilege('pg_catalog.pg_last_wal_replay_lsn()', 'EXECUTE'),
       has_function_privilege('pg_catalog.pg_walfile_name(pg_lsn)', 'EXECUTE'),
       has_function_privilege(
           'pg_catalog.pg_create_physical_replication_slot(name, boolean, boolean)', 'EXECUTE'),
       has_function_privilege($1, 'EXECUTE'),
       has_function_privilege($2, 'EXECUTE'),
       current_setting('wal_level'),
       current_setting('max_replication_slots'),
       (SELECT setting FROM pg_settings WHERE name = 'data_directory'),
       current_setting('port')
  FROM pg_roles r WHERE r.rolname = current_user";

/// The functions of a backup window on `major`, as `has_function_privilege` and `GRANT` name
/// them.
fn backup_functions(major: u32) -> [&'static str; 2] {
    if major >= 15 {
        [
            "pg_catalog.pg_backup_start(text, boolean)",
            "pg_catalog.pg_backup_stop(boolean)",
        ]
    } else {
        [
            "pg_catalog.pg_start_backup(text, boolean, boolean)",
            "pg_catalog.pg_stop_backup(boolean, boolean)",
        ]
    }
}

/// A role name as SQL writes an identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Connects once with `pg_conn` and checks that it reaches the server running on `pgdata`,
/// with every right failbackd's questions need, and that it answers where its WAL ends.
/// Blocking.
pub fn check_pg_conn(pg_conn: &str, pgdata: &Path) -> Result<(), StartupError> {
    let mut conn =
        failback_sql::conninfo::connect(pg_conn, "failbackd").map_err(StartupError::Connect)?;
    let major = conn.server_major();
    let [start, stop] = backup_functions(major);
    let rows = conn
        .query(RIGHTS, &[start, stop], Format::Text)
        .map_err(|e| StartupError::Check(e.to_string()))?;
    let text = |i| rows.text(0, i).unwrap_or_default();
    let yes = |i| text(i) == "t";
    let role = text(0);
    let who = quote_ident(&role);
    let mut missing = Vec::new();
    let mut grants = Vec::new();
    let functions = [
        (2, "pg_catalog.pg_current_wal_insert_lsn()"),
        (3, "pg_catalog.pg_current_wal_lsn()"),
        (4, "pg_catalog.pg_current_wal_flush_lsn()"),
        (5, "pg_catalog.pg_last_wal_replay_lsn()"),
        (6, "pg_catalog.pg_walfile_name(pg_lsn)"),
        (
            7,
            "pg_catalog.pg_create_physical_replication_slot(name, boolean, boolean)",
        ),
        (8, start),
        (9, stop),
    ];
    for (col, f) in functions {
        if !yes(col) {
            missing.push(format!("EXECUTE on {f}"));
            grants.push(format!("GRANT EXECUTE ON FUNCTION {f} TO {who};"));
        }
    }
    if !yes(1) {
        // A backup window's WAL is held by a temporary replication slot.
        missing.push("the REPLICATION attribute, for a backup window's slot".into());
        grants.push(format!("ALTER ROLE {who} REPLICATION;"));
    }
    if !missing.is_empty() {
        return Err(StartupError::Rights {
            role,
            missing: missing.join(", "),
            grants: grants.join(" "),
        });
    }
    if text(10) == "minimal" {
        return Err(StartupError::Setting {
            what: "runs with wal_level = minimal, which allows no backup window".into(),
            fix: "set wal_level = replica (or logical) and restart it",
        });
    }
    if text(11) == "0" {
        return Err(StartupError::Setting {
            what: "runs with max_replication_slots = 0, and a backup window's WAL is held by a \
                   temporary slot"
                .into(),
            fix: "set max_replication_slots to 1 or more (one per concurrent rewind) and restart it",
        });
    }
    same_server(pgdata, rows.text(0, 12), &text(13))?;
    failback_sql::end_of_wal(&mut conn).map_err(StartupError::EndOfWal)?;
    Ok(())
}

/// Whether the server that answered runs on `pgdata`: its `data_directory` when the role may
/// read it, else the port `pgdata`'s `postmaster.pid` names.
fn same_server(
    pgdata: &Path,
    data_directory: Option<String>,
    port: &str,
) -> Result<(), StartupError> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let ours = canonical(pgdata);
    let running = failback_datadir::postmaster::running_port(pgdata);
    let port_hint = running
        .map(|p| format!(" (it listens on port {p})"))
        .unwrap_or_default();
    let other = |theirs: String| StartupError::OtherServer {
        theirs,
        ours: ours.display().to_string(),
        port: port_hint.clone(),
    };
    if let Some(dir) = data_directory.filter(|d| !d.is_empty()) {
        if canonical(Path::new(&dir)) != ours {
            return Err(other(dir));
        }
        return Ok(());
    }
    match running {
        Some(p) if p.to_string() != port => Err(other(format!("port {port}"))),
        Some(_) => Ok(()),
        None => Err(StartupError::OtherServer {
            theirs: format!("port {port}"),
            ours: format!("{} (no PostgreSQL runs on it)", ours.display()),
            port: String::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_versions_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("PG_VERSION"), "12\n").unwrap();
        let e = check_data_directory(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("PostgreSQL 12 data directory") && e.contains("13 to 18"),
            "{e}"
        );
        std::fs::write(dir.path().join("PG_VERSION"), "9.6\n").unwrap();
        let e = check_data_directory(dir.path()).unwrap_err().to_string();
        assert!(e.contains("PostgreSQL 9.6 data directory"), "{e}");
    }

    #[test]
    fn a_directory_holding_one_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main");
        std::fs::create_dir_all(main.join("global")).unwrap();
        std::fs::write(main.join("PG_VERSION"), "16\n").unwrap();
        std::fs::write(main.join("global/pg_control"), [0u8; 8192]).unwrap();
        let e = check_data_directory(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no PG_VERSION"), "{e}");
        assert!(e.contains(&format!("give -D {}", main.display())), "{e}");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("re\"pl"), "\"re\"\"pl\"");
    }
}
