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

use failback_common::{Lsn, TimeLineId};

/// Why the source server could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("could not connect to the source server: {0}")]
    Connect(String),
    #[error("the source server refused {query:?}: {reason}")]
    Query { query: &'static str, reason: String },
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
const END_OF_WAL: &str = "SELECT pg_is_in_recovery(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_insert_lsn() END)::text,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_walfile_name(pg_current_wal_lsn()) END,
       (SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1)::int8,
       (SELECT min_recovery_end_timeline FROM pg_control_recovery())::int8,
       (SELECT timeline_id FROM pg_control_checkpoint())::int8,
       current_setting('full_page_writes'),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_flush_lsn() END)::text";

/// Asks the server `client` is connected to where its WAL ends. Blocking: call it off an
/// async runtime.
pub fn end_of_wal(client: &mut postgres::Client) -> Result<EndOfWal, LiveError> {
    let row = client
        .query_one(END_OF_WAL, &[])
        .map_err(|e| LiveError::Query {
            query: "the end of WAL",
            reason: error_text(&e),
        })?;
    let get = |i: usize| -> Result<Option<String>, LiveError> {
        row.try_get::<_, Option<String>>(i)
            .map_err(|e| LiveError::Query {
                query: "the end of WAL",
                reason: error_text(&e),
            })
    };
    let get_int = |i: usize| -> Result<Option<i64>, LiveError> {
        row.try_get::<_, Option<i64>>(i)
            .map_err(|e| LiveError::Query {
                query: "the end of WAL",
                reason: error_text(&e),
            })
    };
    let in_recovery: bool = row.try_get(0).map_err(|e| LiveError::Query {
        query: "pg_is_in_recovery()",
        reason: error_text(&e),
    })?;
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

/// A PostgreSQL error with its server message, not only "db error".
pub fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            s
        }
    }
}

/// The major version of the server `client` is connected to (`server_version_num` / 10000).
pub fn server_major(client: &mut postgres::Client) -> Result<u32, LiveError> {
    let v: String = query_text(
        client,
        "SELECT current_setting('server_version_num')",
        "the version",
    )?;
    v.parse::<u32>()
        .map(|n| n / 10_000)
        .map_err(|_| LiveError::Answer {
            what: "server_version_num",
            value: v,
            expected: "a version number",
        })
}

/// The one text column of a one-row query.
fn query_text(
    client: &mut postgres::Client,
    sql: &str,
    what: &'static str,
) -> Result<String, LiveError> {
    let row = client.query_one(sql, &[]).map_err(|e| LiveError::Query {
        query: what,
        reason: error_text(&e),
    })?;
    row.try_get::<_, String>(0).map_err(|e| LiveError::Query {
        query: what,
        reason: error_text(&e),
    })
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
pub fn reserve_wal(client: &mut postgres::Client, slot: &str) -> Result<Lsn, LiveError> {
    let row = client
        .query_one(
            "SELECT lsn::text FROM pg_create_physical_replication_slot($1, true, true)",
            &[&slot],
        )
        .map_err(|e| LiveError::Query {
            query: "pg_create_physical_replication_slot",
            reason: error_text(&e),
        })?;
    let text: Option<String> = row.try_get(0).map_err(|e| LiveError::Query {
        query: "pg_create_physical_replication_slot",
        reason: error_text(&e),
    })?;
    parse_lsn_answer("the reserved WAL position", text.unwrap_or_default())
}

/// Starts a non-exclusive backup in this session, with an immediate checkpoint
/// (`pg_backup_start(label, true)`, `pg_start_backup(label, true, false)` before 15). Returns
/// the backup's start: the redo position of its checkpoint, from which WAL replay makes what is
/// copied during the backup consistent.
pub fn backup_start(
    client: &mut postgres::Client,
    major: u32,
    label: &str,
) -> Result<Lsn, LiveError> {
    let sql = if major >= 15 {
        "SELECT pg_backup_start($1, true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    let row = client
        .query_one(sql, &[&label])
        .map_err(|e| LiveError::Query {
            query: "pg_backup_start",
            reason: error_text(&e),
        })?;
    let text: String = row.try_get(0).map_err(|e| LiveError::Query {
        query: "pg_backup_start",
        reason: error_text(&e),
    })?;
    parse_lsn_answer("the backup's start", text)
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
pub fn backup_stop(client: &mut postgres::Client, major: u32) -> Result<BackupStopped, LiveError> {
    let sql = if major >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let row = client.query_one(sql, &[]).map_err(|e| LiveError::Query {
        query: "pg_backup_stop",
        reason: error_text(&e),
    })?;
    let get = |i: usize| -> Result<String, LiveError> {
        row.try_get::<_, Option<String>>(i)
            .map(Option::unwrap_or_default)
            .map_err(|e| LiveError::Query {
                query: "pg_backup_stop",
                reason: error_text(&e),
            })
    };
    Ok(BackupStopped {
        lsn: parse_lsn_answer("the backup's end", get(0)?)?,
        backup_label: get(1)?,
        tablespace_map: get(2)?,
    })
}
