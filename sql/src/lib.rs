//! failback-sql: what failback asks a running PostgreSQL server, in read-only SQL, and the
//! libpq connection strings it asks with.
//!
//! A running server's files change while they are copied, so a rewind from it must replay the
//! source's WAL up to a point reached *after* the copy: pg_rewind's libpq source asks for
//! `pg_current_wal_insert_lsn()` on a primary, and uses the control file's minRecoveryPoint on
//! a standby (`src/bin/pg_rewind/pg_rewind.c`, `perform_rewind`). [`end_of_wal`] answers the
//! same question: the insert position on a primary, the replay position
//! (`pg_last_wal_replay_lsn()`, never behind minRecoveryPoint) on a standby.
//!
//! The timeline needs the server too: right after a promotion, pg_control's
//! `checkPointCopy.ThisTimeLineID` (and `pg_control_checkpoint()`, which reads it) still names
//! the old timeline until the first checkpoint on the new one completes. The WAL file the
//! primary writes now is named after its current timeline, so `pg_walfile_name()` of the
//! current WAL position gives it at once; a standby reports the timeline its WAL receiver
//! streams (`pg_stat_wal_receiver.received_tli`), or what its control file says when no
//! receiver runs.
//!
//! Like pg_rewind's libpq source, a live source must run with `full_page_writes = on`.
//!
//! failbackd asks through its `--pg-conn`; a client that rewinds over a plain connection asks
//! the same queries.

pub mod conninfo;
pub mod libpq;

use failback_common::{Lsn, TimeLineId};
use libpq::{Conn, Format, PqError};

/// Why the source server could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("could not connect to the source server: {0}")]
    Connect(String),
    #[error("the source server refused {query:?}: {reason}")]
    Query {
        query: &'static str,
        reason: String,
        /// For want of a privilege (SQLSTATE 42501): another way may be open.
        permission_denied: bool,
    },
    /// The connection broke or the server fell silent during `query`: asking again on a new
    /// connection may help.
    #[error("the source server did not answer {query:?}")]
    Lost {
        query: &'static str,
        #[source]
        source: PqError,
    },
    #[error("the source server answered {what} with {value:?}, which is not {expected}")]
    Answer {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// The source server's end of WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndOfWal {
    pub lsn: Lsn,
    pub timeline: TimeLineId,
    pub in_recovery: bool,
    /// How far the WAL is in its files: the flush position on a primary (the insert position
    /// may lie in WAL buffers not yet written), the replay position on a standby. What reads
    /// WAL from `pg_wal` can read up to here.
    pub flushed: Lsn,
}

/// One statement, so that a promotion cannot fall between the recovery test and the position:
/// `pg_walfile_name` errors out during recovery, hence the CASE (volatile, never folded).
///
/// It must work for a role holding only what pg_rewind's role needs (EXECUTE on `pg_ls_dir`,
/// `pg_stat_file` and `pg_read_binary_file`): `pg_control_checkpoint()` and
/// `pg_control_recovery()` are asked only when the role may execute them, and `pg_stat_wal_receiver` shows such a role NULLs. A
/// standby's timeline then comes from what the caller read of its control file
/// ([`end_of_wal_or`]).
const END_OF_WAL: &str = "SELECT pg_is_in_recovery(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_insert_lsn() END)::text,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_walfile_name(pg_current_wal_lsn()) END,
       (SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1)::int8,
       (CASE WHEN has_function_privilege('pg_catalog.pg_control_recovery()', 'EXECUTE')
             THEN (SELECT min_recovery_end_timeline FROM pg_control_recovery()) END)::int8,
       (CASE WHEN has_function_privilege('pg_catalog.pg_control_checkpoint()', 'EXECUTE')
             THEN (SELECT timeline_id FROM pg_control_checkpoint()) END)::int8,
       current_setting('full_page_writes'),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_flush_lsn() END)::text";

/// Asks the server `conn` is connected to where its WAL ends.
pub fn end_of_wal(conn: &mut Conn) -> Result<EndOfWal, LiveError> {
    end_of_wal_or(conn, 0)
}

/// [`end_of_wal`], with the timeline a standby's control file names (`minRecoveryPointTLI`,
/// `checkPointCopy.ThisTimeLineID`, read by the caller; 0 when unknown) for when the server
/// will not tell this role its receiver's or its control file's timeline.
pub fn end_of_wal_or(conn: &mut Conn, control_tli: TimeLineId) -> Result<EndOfWal, LiveError> {
    let rows = conn
        .query(END_OF_WAL, &[], Format::Text)
        .map_err(|e| query_error("the end of WAL", e))?;
    let get = |i: usize| -> Result<Option<String>, LiveError> { Ok(rows.text(0, i)) };
    let get_int = |i: usize| -> Result<Option<i64>, LiveError> {
        Ok(rows.text(0, i).and_then(|t| t.parse().ok()))
    };
    let in_recovery = get(0)?.as_deref() == Some("t");
    let lsn_text = get(1)?.ok_or(LiveError::Answer {
        what: "the WAL position",
        value: "NULL".into(),
        expected: "an LSN (a standby that has replayed nothing yet cannot be a source)",
    })?;
    let parse_lsn = |text: String| -> Result<Lsn, LiveError> {
        text.parse().map_err(|_| LiveError::Answer {
            what: "the WAL position",
            value: text.clone(),
            expected: "an LSN",
        })
    };
    let lsn = parse_lsn(lsn_text)?;
    let flushed = parse_lsn(get(7)?.unwrap_or_default())?;
    // pg_rewind's libpq source insists on it too: a page copied while it was being written
    // is repaired by the full-page image that its first change after a checkpoint logged.
    let fpw = get(6)?.unwrap_or_default();
    if fpw != "on" {
        return Err(LiveError::Answer {
            what: "full_page_writes",
            value: fpw,
            expected: "on (pages copied while being written could not be repaired by replay)",
        });
    }
    let tli_of = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    let timeline = if in_recovery {
        // The receiver's timeline is the one recovery follows; without a receiver (a standby
        // restoring from an archive) the control file is the best there is.
        tli_of(get_int(3)?)
            .max(tli_of(get_int(4)?))
            .max(tli_of(get_int(5)?))
            .max(control_tli)
    } else {
        let name = get(2)?.unwrap_or_default();
        failback_common::lsn::wal_file_timeline(&name).ok_or(LiveError::Answer {
            what: "pg_walfile_name(pg_current_wal_lsn())",
            value: name,
            expected: "a WAL file name",
        })?
    };
    if timeline == 0 {
        return Err(LiveError::Answer {
            what: "the timeline",
            value: "0".into(),
            expected: "a timeline ID",
        });
    }
    Ok(EndOfWal {
        lsn,
        timeline,
        in_recovery,
        flushed,
    })
}

/// A query the server refused, or a connection that failed under it.
pub fn query_error(query: &'static str, e: PqError) -> LiveError {
    match e {
        e @ (PqError::Timeout(_) | PqError::Lost(_)) => LiveError::Lost { query, source: e },
        e => LiveError::Query {
            query,
            reason: e.to_string(),
            permission_denied: e.is_permission_denied(),
        },
    }
}

/// The major version of the server `conn` is connected to (`server_version_num` / 10000).
pub fn server_major(conn: &Conn) -> u32 {
    conn.server_major()
}

fn parse_lsn_answer(what: &'static str, text: String) -> Result<Lsn, LiveError> {
    text.parse().map_err(|_| LiveError::Answer {
        what,
        value: text.clone(),
        expected: "an LSN",
    })
}

/// Keeps the server's WAL from now on for as long as this session lasts: a temporary physical
/// replication slot that reserves WAL at once (`pg_create_physical_replication_slot(name, true,
/// true)`, dropped when the session ends). Returns where the reservation starts.
pub fn reserve_wal(conn: &mut Conn, slot: &str) -> Result<Lsn, LiveError> {
    let text = conn
        .query_one_text(
            "SELECT lsn::text FROM pg_create_physical_replication_slot($1, true, true)",
            &[slot],
        )
        .map_err(|e| query_error("pg_create_physical_replication_slot", e))?;
    parse_lsn_answer("the reserved WAL position", text.unwrap_or_default())
}

/// Starts a non-exclusive backup in this session, with an immediate checkpoint
/// (`pg_backup_start(label, true)`, `pg_start_backup(label, true, false)` before 15). Returns
/// the backup's start: the redo position of its checkpoint, from which WAL replay makes what is
/// copied during the backup consistent.
pub fn backup_start(conn: &mut Conn, major: u32, label: &str) -> Result<Lsn, LiveError> {
    let sql = if major >= 15 {
        "SELECT pg_backup_start($1, true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    let text = conn
        .query_one_text(sql, &[label])
        .map_err(|e| query_error("pg_backup_start", e))?;
    parse_lsn_answer("the backup's start", text.unwrap_or_default())
}

/// What ending a backup says: where the WAL its copy needs ends, and the two files the copy
/// must carry (`backup_label`, and `tablespace_map`, empty without tablespaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupStopped {
    pub lsn: Lsn,
    pub backup_label: String,
    pub tablespace_map: String,
}

/// Ends this session's non-exclusive backup without waiting for WAL archiving
/// (`pg_backup_stop(false)`, `pg_stop_backup(false, false)` before 15).
pub fn backup_stop(conn: &mut Conn, major: u32) -> Result<BackupStopped, LiveError> {
    let sql = if major >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let rows = conn
        .query(sql, &[], Format::Text)
        .map_err(|e| query_error("pg_backup_stop", e))?;
    let get = |i: usize| rows.text(0, i).unwrap_or_default();
    Ok(BackupStopped {
        lsn: parse_lsn_answer("the backup's end", get(0))?,
        backup_label: get(1),
        tablespace_map: get(2),
    })
}
