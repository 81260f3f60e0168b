//! The server running on the data directory, when failbackd serves it live (`--pg-conn`).
//!
//! failbackd connects per question, asks in read-only SQL (`failback-sql`), and keeps no
//! session open: the source server is never held up by failbackd between rewinds. Without a
//! connection failbackd cannot know where the WAL ends; it sees a running server by its
//! `postmaster.pid` and says so instead of serving a wrong answer.

use std::path::Path;

use failback_datadir::postmaster::running_port;
use failback_sql::{EndOfWal, LiveError, conninfo};

/// The application name failbackd's connections show in `pg_stat_activity`.
const APPLICATION: &str = "failbackd";

/// Asks the server at `pg_conn` where its WAL ends. Blocking: call it off the async runtime.
pub fn end_of_wal(pg_conn: &str) -> Result<EndOfWal, LiveError> {
    let mut client = conninfo::connect(pg_conn, APPLICATION)
        .map_err(|e| LiveError::Connect(format!("--pg-conn: {e}")))?;
    failback_sql::end_of_wal(&mut client)
}

/// What failbackd tells a client about reaching its server, when the operator did not say
/// (`--primary-conninfo`): the port the running server listens on, and the user of
/// `--pg-conn`. The client adds the host it reached failbackd at.
pub fn advertised_conninfo(pgdata: &Path, pg_conn: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let Some(port) = running_port(pgdata) {
        parts.push(format!("port={port}"));
    }
    if let Some(user) = pg_conn.and_then(conninfo::user) {
        parts.push(format!("user={}", conninfo::quote_value(&user)));
    }
    parts.join(" ")
}
