//! A running PostgreSQL server reached over an ordinary libpq connection (`--source-server`),
//! with no failbackd beside it.
//!
//! A server can hand out its own files through SQL: `pg_ls_dir` and `pg_stat_file` list the
//! data directory, `pg_read_binary_file(path, offset, length, missing_ok)` reads any range of
//! any file in it, and `pg_tablespace_location` says where a tablespace's link leads. That is
//! all pg_rewind's libpq source uses (`src/bin/pg_rewind/libpq_source.c`), and orchestrators
//! grant their rewind role EXECUTE on exactly those four functions and nothing more; so this
//! source asks nothing else of such a role, and the session is set up as pg_rewind sets its up
//! (no statement, lock, idle-in-transaction or — on 17 and later — transaction timeout, read
//! only, an empty `search_path`), with `full_page_writes` required to be on.
//!
//! The server runs while it is copied, so the copy is made inside a *backup window*
//! (see [`crate::rewind`]): WAL replay from the window's start repairs every page that changed
//! while it was read. A role that may run `pg_backup_start` gets a real backup on a connection
//! held for the window, as failbackd's window does (plus a temporary replication slot keeping
//! the window's WAL, when the role has REPLICATION). A role with only the four grants gets a
//! window made from the control file: it starts at the redo position of the source's last
//! checkpoint (or restartpoint), read before anything is copied, because with
//! `full_page_writes` on every page changed after that point is logged whole at its first
//! change, and replay from there rewrites it; it ends at the source's WAL position once the
//! copy is done (flushed WAL on a primary, replayed WAL on a standby: no copied page can be
//! newer), with a `backup_label` naming that checkpoint. Nothing keeps that WAL on the source:
//! if a checkpoint recycles it before the commit fetches it, the rewind says so and what to do.
//!
//! Data comes in pieces of at most 1 MiB, read by `pg_read_binary_file` over `unnest` of
//! arrays (binary results), several pieces a query, on `jobs` connections at once; the pieces
//! are handed over in the order asked. Every query is bounded by `--timeout`; a lost or silent
//! connection is replaced and the query asked again with back-off
//! ([`failback_common::patience`]) until the source has made no progress for `--timeout`. A
//! refusal (a missing grant) is not retried, and says which GRANT is missing.

pub mod changes;
pub mod hashes;

use hashes::text_array;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failback_common::control::ControlFileData;
use failback_common::filemap::{FileEntry, FileType};
use failback_common::patience::{Next, Patience, Stall};
use failback_common::timeline::TimeLineHistory;
use failback_common::{Lsn, TimeLineId};
use failback_datadir::wal::CheckpointAt;
use failback_sql::LiveError;
use failback_sql::libpq::{Conn, ConnOption, Format, PqError, Rows};

use super::remote::Notice;
use super::{
    ChangesAnswer, Fetch, FetchRange, Fetched, RetryLog, RetryOp, Source, SourceEnd, SourceError,
    WindowEnd, WindowStart,
};

/// The largest piece one `pg_read_binary_file` call reads (pg_rewind's chunk size).
const PIECE: u64 = 1 << 20;
/// Bytes asked for in one query: the whole answer is held in memory until handed over, on each
/// of `jobs` connections, so this bounds the memory a fetch takes.
const BATCH_BYTES: u64 = 8 << 20;
/// Pieces asked for in one query (many small files).
const BATCH_PIECES: usize = 256;
/// The largest whole file [`Source::read_file`] reads (history files are a few KB).
const MAX_SMALL_FILE: u64 = 64 << 20;
/// The name the session gives itself unless the connection string names another.
const APPLICATION: &str = "failback";

/// The statement pg_rewind's role may run to read ranges; `n` checks the order of the answer.
/// `unnest` of several arrays is a special form of the FROM clause (`ROWS FROM`), which a
/// schema-qualified name is not: pg_catalog is searched anyway.
const READ_PIECES: &str = "SELECT x.n, pg_catalog.pg_read_binary_file(x.p, x.o, x.l, true)
  FROM unnest($1::text[], $2::int8[], $3::int8[]) WITH ORDINALITY AS x(p, o, l, n)";

/// The data directory listed as pg_rewind lists it: every entry below it, tablespaces followed,
/// with a tablespace link's target from `pg_tablespace_location`.
const LIST_FILES: &str = "WITH RECURSIVE files (path, filename, size, isdir) AS (
    SELECT '' AS path, filename, size, isdir
      FROM (SELECT pg_catalog.pg_ls_dir('.', true, false) AS filename) AS fn,
           pg_catalog.pg_stat_file(fn.filename, true) AS this
    UNION ALL
    SELECT parent.path || parent.filename || '/', fn, this.size, this.isdir
      FROM files AS parent,
           pg_catalog.pg_ls_dir(parent.path || parent.filename, true, false) AS fn,
           pg_catalog.pg_stat_file(parent.path || parent.filename || '/' || fn, true) AS this
     WHERE parent.isdir = 't'
  )
  SELECT path || filename, size, isdir,
         pg_catalog.pg_tablespace_location(pg_tablespace.oid)
    FROM files
    LEFT OUTER JOIN pg_catalog.pg_tablespace
      ON files.path = 'pg_tblspc/' AND pg_tablespace.oid::text = files.filename";

/// What a role needs beyond connecting, as the GRANT that gives it.
fn grant_hint(user: &str) -> String {
    format!(
        "a role that is not superuser needs: GRANT EXECUTE ON FUNCTION \
         pg_catalog.pg_ls_dir(text, boolean, boolean), pg_catalog.pg_stat_file(text, boolean), \
         pg_catalog.pg_read_binary_file(text), \
         pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {}",
        failback_sql::conninfo::quote_value(user)
    )
}

/// How to reach the source server.
#[derive(Clone)]
pub struct LibpqOptions {
    /// A libpq connection string (keywords or a URI), read by libpq itself.
    pub conninfo: String,
    /// Connections reading file data at once (at least 1).
    pub jobs: usize,
    /// How long the server may make no progress before the rewind gives up.
    pub patience: Patience,
    /// Told of every failure that is retried, in words.
    pub notice: Option<Notice>,
}

/// Opens connections set up as pg_rewind sets them up, and retries what can heal.
#[derive(Clone)]
struct Connector {
    conninfo: Arc<str>,
    patience: Patience,
    notice: Option<Notice>,
    /// The role, for the GRANT a refusal names.
    user: Arc<str>,
    /// Every retry, shared by the connector's clones (one per fetch worker).
    log: RetryLog,
}

/// A failure a new connection may not meet, in the rewind's terms, by what it says of the
/// server: silent (a timeout), gone from under a query (the connection lost, or a connection
/// failure the server reported, SQLSTATE class 08), or not serving now (no connection could be
/// made; it is shutting down or restarting, class 57P). `None` for what will not heal.
pub(super) fn healable(what: &str, e: &PqError) -> Option<SourceError> {
    let sqlstate = match e {
        PqError::Query {
            sqlstate: Some(s), ..
        } => s.as_str(),
        _ => "",
    };
    Some(match e {
        PqError::Timeout(_) => SourceError::Timeout(format!("{what}: {e}")),
        PqError::Lost(_) => SourceError::Lost(format!("{what}: {e}")),
        PqError::Connect(m) => SourceError::Unavailable(format!("{what}: {m}")),
        PqError::Query { .. } if sqlstate.starts_with("08") => {
            SourceError::Lost(format!("{what}: {e}"))
        }
        PqError::Query { .. } if sqlstate.starts_with("57P") => {
            SourceError::Unavailable(format!("{what}: {e}"))
        }
        PqError::Query { .. } => return None,
    })
}

impl Connector {
    /// `n` more read-only connections, opened at once: each costs the link several round trips
    /// (the startup, the authentication, the session's settings), which one after another
    /// would add up to seconds across a continent.
    fn connect_many(
        &self,
        n: usize,
        timeout: Duration,
        purpose: &str,
    ) -> Result<Vec<Conn>, SourceError> {
        let opened: Vec<Result<Conn, PqError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|_| scope.spawn(|| self.connect(timeout, true)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        opened
            .into_iter()
            .map(|c| c.map_err(|e| self.error(&format!("a connection to {purpose}"), e)))
            .collect()
    }

    /// A new connection within `timeout`, its session set up; `read_only` unless it is to hold
    /// a backup window.
    fn connect(&self, timeout: Duration, read_only: bool) -> Result<Conn, PqError> {
        let mut conn = Conn::connect(&self.conninfo, APPLICATION, timeout, Some(timeout))?;
        let major = conn.server_major();
        // The settings pg_rewind's libpq source makes (init_libpq_conn): the rewind decides
        // how long to wait, not the server's defaults or PGOPTIONS.
        let mut setup = String::from(
            "SET statement_timeout = 0; SET lock_timeout = 0; \
             SET idle_in_transaction_session_timeout = 0;",
        );
        if major >= 17 {
            setup.push_str(" SET transaction_timeout = 0;");
        }
        // A window's connection is idle while the copy runs; so may a reading connection be
        // between fetches: idle_session_timeout (14 and later) must not end them.
        if major >= 14 {
            setup.push_str(" SET idle_session_timeout = 0;");
        }
        if read_only {
            setup.push_str(" SET default_transaction_read_only = on;");
        }
        setup.push_str(" SELECT pg_catalog.set_config('search_path', '', false);");
        conn.query(&setup, &[], Format::Text)?;
        Ok(conn)
    }

    /// The error a failed query on `what` is, in the rewind's terms.
    fn error(&self, what: &str, e: PqError) -> SourceError {
        if let Some(err) = healable(what, &e) {
            return err;
        }
        match e {
            ref q if q.is_permission_denied() => SourceError::Refused {
                what: what.to_string(),
                reason: format!("{e}; {}", grant_hint(&self.user)),
            },
            e => SourceError::Refused {
                what: what.to_string(),
                reason: e.to_string(),
            },
        }
    }

    /// Runs `f` on the connection in `slot` (made when there is none) until it answers,
    /// replacing the connection and asking again after failures that can heal, until the
    /// server has made no progress for the whole timeout.
    fn patiently<R>(
        &self,
        slot: &mut Option<Conn>,
        what: &str,
        op: RetryOp,
        mut f: impl FnMut(&mut Conn) -> Result<R, PqError>,
    ) -> Result<R, SourceError> {
        self.retrying(op, |budget| {
            let attempt = match slot.as_mut() {
                Some(conn) => {
                    conn.set_timeout(Some(budget));
                    f(conn)
                }
                None => self.connect(budget, true).and_then(|mut conn| {
                    let r = f(&mut conn);
                    *slot = Some(conn);
                    r
                }),
            };
            attempt.map_err(|e| {
                let err = self.error(what, e);
                // A connection that timed out or broke is not used again.
                if err.is_retryable() {
                    *slot = None;
                }
                err
            })
        })
    }

    /// Runs `attempt` (given what is left of the timeout) until it succeeds, again after a
    /// back-off when it failed in a way that can heal, until nothing has progressed for the
    /// whole timeout. The attempt drops the connections a failure broke. Retries are counted
    /// under `op`.
    fn retrying<R>(
        &self,
        op: RetryOp,
        mut attempt: impl FnMut(Duration) -> Result<R, SourceError>,
    ) -> Result<R, SourceError> {
        let mut stall = Stall::new(self.patience, Instant::now());
        loop {
            let (err, cause) = match attempt(stall.budget(Instant::now())) {
                Ok(r) => {
                    if let Some(stalled) = stall.ridden_out(Instant::now()) {
                        self.log.recovered(stalled);
                    }
                    return Ok(r);
                }
                Err(e) => match e.retry_cause() {
                    Some(cause) => (e, cause),
                    None => return Err(e),
                },
            };
            match stall.failed(Instant::now()) {
                Next::RetryAfter(delay) => {
                    self.log.retried(cause, op);
                    if let Some(notice) = &self.notice {
                        notice(&format!(
                            "{err}; trying again in {:.2} s on a new connection (attempt {})",
                            delay.as_secs_f64(),
                            stall.failures() + 1
                        ));
                    }
                    std::thread::sleep(delay);
                }
                Next::GiveUp { stalled, attempts } => {
                    return Err(SourceError::Stalled {
                        stalled,
                        attempts,
                        timeout: self.patience.timeout,
                        last: Box::new(err),
                    });
                }
            }
        }
    }
}

/// What the role may do beyond pg_rewind's four functions.
#[derive(Clone, Copy, Debug)]
struct Privileges {
    /// `pg_backup_start` (`pg_start_backup` before 15): a real backup window.
    backup: bool,
    /// REPLICATION (or superuser): a temporary slot keeps the window's WAL.
    replication: bool,
}

/// The backup window this source holds.
enum Window {
    /// `pg_backup_start` on a connection of its own, held until the source is dropped (ending
    /// the session abandons the backup and drops the slot).
    Backup {
        conn: Conn,
        timeline: TimeLineId,
        stopped: bool,
    },
    /// Made from the control file read before the copy: replay from `redo` (the checkpoint at
    /// `checkpoint`, on `tli`) repairs the copy.
    Control {
        redo: Lsn,
        checkpoint: Lsn,
        tli: TimeLineId,
        seg_size: u32,
        started: i64,
    },
}

/// A running server through libpq.
pub struct LibpqSource {
    connector: Connector,
    jobs: usize,
    /// The connection every question but file data goes over; replaced after a failure.
    main: Option<Conn>,
    /// Connections that read file data, between fetches.
    pool: Arc<Mutex<Vec<Conn>>>,
    major: u32,
    privileges: Privileges,
    describe: String,
    primary_conninfo: String,
    window: Option<Window>,
}

/// Connects to the server `opts.conninfo` names, checks it can be a source, and learns what
/// the role may do.
pub fn connect(opts: LibpqOptions) -> Result<LibpqSource, SourceError> {
    let first = Connector {
        conninfo: opts.conninfo.clone().into(),
        patience: opts.patience,
        notice: opts.notice.clone(),
        user: "".into(),
        log: RetryLog::default(),
    };
    let liveness = opts.patience.liveness().max(opts.patience.timeout);
    // The first connection is not retried: a wrong host, port or password will not heal, and
    // libpq's own words say which it is.
    let mut conn = first.connect(liveness, true).map_err(|e| match e {
        PqError::Connect(m) => SourceError::Refused {
            what: "the connection to the source server".into(),
            reason: m,
        },
        e => first.error("the source server's session settings", e),
    })?;
    let user = conn.user();
    let connector = Connector {
        user: user.clone().into(),
        ..first
    };
    let options = conn.options();
    let major = conn.server_major();
    if !(13..=18).contains(&major) {
        return Err(SourceError::Refused {
            what: "the source server".into(),
            reason: format!(
                "it runs PostgreSQL {} (server_version_num {}); failback reads 13 to 18",
                major,
                conn.server_version()
            ),
        });
    }
    // pg_rewind refuses a source without full-page writes: a page read while it was being
    // written is repaired only by the full-page image its first change after a checkpoint
    // logged.
    let fpw = conn
        .query_one_text("SHOW full_page_writes", &[])
        .map_err(|e| connector.error("SHOW full_page_writes", e))?
        .unwrap_or_default();
    if fpw != "on" {
        return Err(SourceError::Refused {
            what: "the source server".into(),
            reason: "\"full_page_writes\" must be enabled in the source server (pages copied \
                     while being written could not be repaired by replay)"
                .into(),
        });
    }
    let backup_fn = if major >= 15 {
        "pg_catalog.pg_backup_start(text, boolean)"
    } else {
        "pg_catalog.pg_start_backup(text, boolean, boolean)"
    };
    let rows = conn
        .query(
            "SELECT r.rolsuper OR pg_catalog.has_function_privilege($1::text, 'EXECUTE'),
                    r.rolsuper OR r.rolreplication
               FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[backup_fn],
            Format::Text,
        )
        .map_err(|e| connector.error("the role's privileges", e))?;
    let privileges = Privileges {
        backup: rows.text(0, 0).as_deref() == Some("t"),
        replication: rows.text(0, 1).as_deref() == Some("t"),
    };
    let get = |k: &str| {
        options
            .iter()
            .find(|o| o.keyword == k)
            .map(|o| o.value.clone())
            .unwrap_or_default()
    };
    let describe = format!(
        "the server at host={} port={} user={} dbname={}",
        get("host"),
        get("port"),
        user,
        get("dbname")
    );
    Ok(LibpqSource {
        connector,
        jobs: opts.jobs.max(1),
        main: Some(conn),
        pool: Arc::new(Mutex::new(Vec::new())),
        major,
        privileges,
        describe,
        primary_conninfo: primary_conninfo(&options, &opts.conninfo),
        window: None,
    })
}

/// What `-R` writes as `primary_conninfo`, as pg_rewind makes it from its connection
/// (`GenerateRecoveryConfig` in `fe_utils/recovery_gen.c`): every option libpq settled on,
/// except empty ones and those the WAL receiver sets itself (`replication`, `dbname`,
/// `fallback_application_name`). Unlike pg_rewind, whose libpq is the server's own version,
/// failback links the system's libpq, which may know options the server's WAL receiver does
/// not (`sslcertmode`, `load_balance_hosts`, …) and would refuse: an option at libpq's
/// compiled-in default says nothing and is left out, and so is the `connect_timeout` failback
/// sets for itself when neither `conninfo` nor `PGCONNECT_TIMEOUT` sets one.
fn primary_conninfo(options: &[ConnOption], conninfo: &str) -> String {
    let own_timeout = std::env::var_os("PGCONNECT_TIMEOUT").is_none()
        && failback_sql::libpq::keyword(conninfo, "connect_timeout").is_none();
    options
        .iter()
        .filter(|o| {
            let receivers_own = matches!(
                o.keyword.as_str(),
                "replication" | "dbname" | "fallback_application_name"
            );
            let ours = own_timeout && o.keyword == "connect_timeout";
            let default = o.compiled.as_deref() == Some(o.value.as_str());
            !(o.value.is_empty() || default || receivers_own || ours)
        })
        .map(|o| {
            format!(
                "{}={}",
                o.keyword,
                failback_sql::conninfo::quote_value(&o.value)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An int8 array literal.
fn int_array(items: impl Iterator<Item = u64>) -> String {
    let v: Vec<String> = items.map(|i| i.to_string()).collect();
    format!("{{{}}}", v.join(","))
}

fn live_err(connector: &Connector, e: LiveError) -> SourceError {
    match e {
        LiveError::Lost { query, source } => connector.error(query, source),
        LiveError::Query {
            query,
            reason,
            permission_denied,
        } => SourceError::Refused {
            what: query.to_string(),
            reason: if permission_denied {
                format!("{reason}; {}", grant_hint(&connector.user))
            } else {
                reason
            },
        },
        e => SourceError::Refused {
            what: "the source server".into(),
            reason: e.to_string(),
        },
    }
}

/// A live error that may heal is given back as the `PqError` under it, so that
/// [`Connector::patiently`] retries it.
fn live_retry(e: LiveError) -> Result<LiveError, PqError> {
    match e {
        LiveError::Lost { source, .. } => Err(source),
        e => Ok(e),
    }
}

impl LibpqSource {
    /// One question on the main connection, with the patience `--timeout` allows.
    fn ask<R>(
        &mut self,
        what: &str,
        op: RetryOp,
        f: impl FnMut(&mut Conn) -> Result<R, PqError>,
    ) -> Result<R, SourceError> {
        self.connector.patiently(&mut self.main, what, op, f)
    }

    /// A SQL helper of failback-sql on the main connection, retried when it lost its
    /// connection.
    fn ask_live<R>(
        &mut self,
        op: RetryOp,
        f: impl Fn(&mut Conn) -> Result<R, LiveError>,
    ) -> Result<R, SourceError> {
        let connector = self.connector.clone();
        let answer =
            connector.patiently(&mut self.main, "the source server", op, |c| match f(c) {
                Ok(r) => Ok(Ok(r)),
                Err(e) => live_retry(e).map(Err),
            })?;
        answer.map_err(|e| live_err(&self.connector, e))
    }

    /// The source's control file, parsed.
    fn control(&mut self) -> Result<ControlFileData, SourceError> {
        let bytes = self.control_file()?;
        ControlFileData::parse(&bytes).map_err(|e| SourceError::Refused {
            what: "global/pg_control".into(),
            reason: e.to_string(),
        })
    }

    /// The history of timeline `tli`, from its history file on the server.
    fn history(&mut self, tli: TimeLineId) -> Result<TimeLineHistory, SourceError> {
        if tli == 1 {
            return Ok(TimeLineHistory::single(1));
        }
        let name = failback_common::lsn::history_file_name(tli);
        let path = format!("pg_wal/{name}");
        let bytes = self.read_file(&path)?.ok_or_else(|| SourceError::Refused {
            what: path.clone(),
            reason: "the source server has no history file of its timeline".into(),
        })?;
        TimeLineHistory::parse(&bytes, tli, &path).map_err(|e| SourceError::Refused {
            what: path,
            reason: e.to_string(),
        })
    }

    /// The timeline a standby's control file names (for a role the server will not tell).
    fn control_tli(&mut self) -> Result<TimeLineId, SourceError> {
        let c = self.control()?;
        Ok(c.minRecoveryPointTLI.max(c.checkPointCopy.ThisTimeLineID))
    }

    fn end(&mut self) -> Result<failback_sql::EndOfWal, SourceError> {
        let tli = self.control_tli()?;
        self.ask_live(RetryOp::EndOfWal, |c| failback_sql::end_of_wal_or(c, tli))
    }

    /// A real backup on a connection of its own, when the role may.
    fn open_backup(&mut self, label: &str) -> Result<Option<WindowStart>, SourceError> {
        let budget = self.connector.patience.timeout;
        let mut conn = self.connector.connect(budget, false).map_err(|e| {
            self.connector
                .error("a connection for the backup window", e)
        })?;
        let tli = self.control_tli()?;
        let timeline = failback_sql::end_of_wal_or(&mut conn, tli)
            .map_err(|e| live_err(&self.connector, e))?
            .timeline;
        if self.privileges.replication {
            let slot = format!("failback_{}_{}", std::process::id(), now_unix());
            failback_sql::reserve_wal(&mut conn, &slot)
                .map_err(|e| live_err(&self.connector, e))?;
        }
        let start = match failback_sql::backup_start(&mut conn, self.major, label) {
            Ok(start) => start,
            // Granted on paper but refused (a role attribute, a policy): the control file's
            // window needs nothing more.
            Err(LiveError::Query {
                permission_denied: true,
                ..
            }) => return self.open_control_window().map(Some),
            Err(e) => return Err(live_err(&self.connector, e)),
        };
        self.window = Some(Window::Backup {
            conn,
            timeline,
            stopped: false,
        });
        Ok(Some(WindowStart {
            start,
            tli: timeline,
        }))
    }

    /// A window from the control file, read now, before anything is copied.
    fn open_control_window(&mut self) -> Result<WindowStart, SourceError> {
        let c = self.control()?;
        let from = CheckpointAt {
            lsn: c.checkPoint,
            redo: c.checkPointCopy.redo,
            tli: c.checkPointCopy.ThisTimeLineID,
        };
        self.checkpoint_window(from, c.xlog_seg_size)
            .map(|(start, _)| start)
    }

    /// A window whose replay starts at checkpoint `from`, with nothing asked of the server
    /// but where its WAL ends now (returned with the start: its flush position).
    fn checkpoint_window(
        &mut self,
        from: CheckpointAt,
        seg_size: u32,
    ) -> Result<(WindowStart, Lsn), SourceError> {
        let end = self.end()?;
        self.window = Some(Window::Control {
            redo: from.redo,
            checkpoint: from.lsn,
            tli: from.tli,
            seg_size,
            started: now_unix(),
        });
        Ok((
            WindowStart {
                start: from.redo,
                tli: end.timeline,
            },
            end.flushed,
        ))
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `backup_label`'s START TIME, in UTC.
fn label_time(t: i64) -> String {
    let c = failback_common::civil::from_unix(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

impl Source for LibpqSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn control_file(&mut self) -> Result<Vec<u8>, SourceError> {
        let rows = self.ask("global/pg_control", RetryOp::ControlFile, |c| {
            c.query(
                "SELECT pg_catalog.pg_read_binary_file('global/pg_control', 0, 8192, true)",
                &[],
                Format::Binary,
            )
        })?;
        rows.get(0, 0)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| SourceError::Refused {
                what: "global/pg_control".into(),
                reason: format!("{} has no global/pg_control", self.describe),
            })
    }

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let mut out = Vec::new();
        loop {
            let offset = out.len() as u64;
            if offset > MAX_SMALL_FILE {
                return Err(SourceError::Refused {
                    what: path.to_string(),
                    reason: format!("larger than {MAX_SMALL_FILE} bytes"),
                });
            }
            let (off, len) = (offset.to_string(), PIECE.to_string());
            let rows = self.ask(path, RetryOp::ReadFile, |c| {
                c.query(
                    "SELECT pg_catalog.pg_read_binary_file($1, $2::int8, $3::int8, true)",
                    &[path, off.as_str(), len.as_str()],
                    Format::Binary,
                )
            })?;
            let Some(piece) = rows.get(0, 0) else {
                // Gone; a file that vanished half-way is gone too.
                return Ok(None);
            };
            out.extend_from_slice(piece);
            if (piece.len() as u64) < PIECE {
                return Ok(Some(out));
            }
        }
    }

    fn list_files(&mut self) -> Result<Vec<FileEntry>, SourceError> {
        let rows = self.ask("the file list", RetryOp::List, |c| {
            c.query(LIST_FILES, &[], Format::Text)
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let (Some(path), Some(size)) = (rows.text(i, 0), rows.text(i, 1)) else {
                // Removed while the listing ran (pg_stat_file said NULL).
                continue;
            };
            let isdir = rows.text(i, 2).as_deref() == Some("t");
            let link = rows.text(i, 3).filter(|l| !l.is_empty());
            let size: u64 = size.parse().map_err(|_| SourceError::Refused {
                what: "the file list".into(),
                reason: format!("{path:?} has size {size:?}"),
            })?;
            out.push(match link {
                Some(target) => FileEntry {
                    path,
                    file_type: FileType::Symlink,
                    size: 0,
                    link_target: Some(target),
                },
                None if isdir => FileEntry {
                    path,
                    file_type: FileType::Directory,
                    size: 0,
                    link_target: None,
                },
                None => FileEntry::regular(&path, size),
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn fetch(&mut self, ranges: Vec<FetchRange>) -> Result<Box<dyn Fetch + '_>, SourceError> {
        Ok(Box::new(LibpqFetch::start(
            ranges,
            self.jobs,
            &self.connector,
            &self.pool,
        )))
    }

    fn is_live(&self) -> bool {
        true
    }

    fn retries(&self) -> RetryLog {
        self.connector.log.clone()
    }

    fn end_of_wal(&mut self) -> Result<Option<SourceEnd>, SourceError> {
        let end = self.end()?;
        Ok(Some(SourceEnd {
            lsn: end.lsn,
            tli: end.timeline,
        }))
    }

    fn current_timeline(&mut self) -> Result<Option<TimeLineId>, SourceError> {
        Ok(Some(self.end()?.timeline))
    }

    fn primary_conninfo(&self) -> Option<String> {
        Some(self.primary_conninfo.clone())
    }

    fn changes(&mut self, since: Lsn, until: Option<Lsn>) -> Result<ChangesAnswer, SourceError> {
        let control = self.control()?;
        let end = self.end()?;
        // WAL past the flush position may not be in the server's files yet.
        let until = until.unwrap_or(end.flushed).min(end.flushed);
        let history = self.history(end.timeline)?;
        let connector = self.connector.clone();
        let main = &mut self.main;
        connector.retrying(RetryOp::Changes, |budget| {
            let conn = match main.as_mut() {
                Some(c) => c,
                None => main.insert(
                    connector
                        .connect(budget, true)
                        .map_err(|e| connector.error("a connection to read WAL", e))?,
                ),
            };
            conn.set_timeout(Some(budget));
            changes::source_changes(conn, &control, &history, since, until).inspect_err(|e| {
                if e.is_retryable() {
                    *main = None;
                }
            })
        })
    }

    fn chunk_hash_algorithm(&self) -> failback_common::chunkdiff::ChunkHash {
        failback_common::chunkdiff::ChunkHash::Sha256
    }

    fn chunk_hashes(
        &mut self,
        paths: &[String],
        chunk_size: u64,
    ) -> Result<Option<Vec<super::FileHashes>>, SourceError> {
        let connector = self.connector.clone();
        let (pool, jobs) = (self.pool.clone(), self.jobs);
        let lock = || pool.lock().unwrap_or_else(|p| p.into_inner());
        connector.retrying(RetryOp::Hash, |budget| {
            let mut conns: Vec<Conn> = {
                let mut idle = lock();
                let keep = idle.len().saturating_sub(jobs);
                idle.split_off(keep)
            };
            conns.extend(connector.connect_many(jobs - conns.len(), budget, "hash files")?);
            for c in &mut conns {
                c.set_timeout(Some(budget));
            }
            let answer = hashes::chunk_hashes(&mut conns, paths, chunk_size);
            // After a failure that may have broken them, the connections are not used again.
            if !answer.as_ref().is_err_and(SourceError::is_retryable) {
                lock().extend(conns);
            }
            answer
        })
    }

    fn open_window(&mut self, label: &str) -> Result<Option<WindowStart>, SourceError> {
        // A window opened earlier (a resumed run plans again) is given up for the new one.
        self.window = None;
        if self.privileges.backup {
            return self.open_backup(label);
        }
        self.open_control_window().map(Some)
    }

    /// WAL summaries (17 and later, `summarize_wal = on`) name the source's changed blocks in a
    /// few rows; without them, naming them means reading the WAL since the divergence over
    /// this link, and copying it for replay costs no more.
    fn replays_own_wal(&mut self) -> Result<bool, SourceError> {
        if self.major < 17 {
            return Ok(true);
        }
        let on = self.ask("the summarize_wal setting", RetryOp::Other, |c| {
            c.query_one_text(
                "SELECT pg_catalog.current_setting('summarize_wal', true)",
                &[],
            )
        })?;
        Ok(on.as_deref() != Some("on"))
    }

    fn open_window_at(&mut self, from: CheckpointAt) -> Result<(WindowStart, Lsn), SourceError> {
        self.window = None;
        let seg_size = self.control()?.xlog_seg_size;
        self.checkpoint_window(from, seg_size)
    }

    fn close_window(&mut self) -> Result<WindowEnd, SourceError> {
        let no_window = || SourceError::Refused {
            what: "a backup window".into(),
            reason: "no backup window is open".into(),
        };
        let made_of_control = match self.window.as_ref().ok_or_else(no_window)? {
            Window::Backup { .. } => None,
            &Window::Control {
                redo,
                checkpoint,
                tli,
                seg_size,
                started,
            } => Some((redo, checkpoint, tli, seg_size, started)),
        };
        if let Some((redo, checkpoint, tli, seg_size, started)) = made_of_control {
            let end = self.end()?;
            // Every page copied is at most as new as the WAL on disk when it was read (WAL
            // before data), so replay to the flushed position (the replayed one on a
            // standby) covers the copy.
            let label = failback_common::recovery::backup_label(
                redo,
                tli,
                checkpoint,
                seg_size,
                &label_time(started),
            );
            return Ok(WindowEnd {
                stop: end.flushed.max(redo),
                tli: end.timeline,
                backup_label: label,
            });
        }
        let Some(Window::Backup {
            conn,
            timeline,
            stopped,
        }) = self.window.as_mut()
        else {
            return Err(no_window());
        };
        if *stopped {
            return Err(no_window());
        }
        // One attempt: the backup belongs to this session, and a new one would not hold it.
        // The session stays open (its slot keeping the window's WAL) until the source is
        // dropped.
        conn.set_timeout(Some(self.connector.patience.timeout));
        let s = failback_sql::backup_stop(conn, self.major)
            .map_err(|e| live_err(&self.connector, e))?;
        *stopped = true;
        Ok(WindowEnd {
            stop: s.lsn,
            tli: *timeline,
            backup_label: s.backup_label,
        })
    }
}

/// One piece of a range, as asked for in a query.
#[derive(Clone, Copy, Debug)]
struct PieceAsk {
    range: usize,
    offset: u64,
    length: u64,
}

/// The pieces of every range, in order, grouped into queries.
fn batches(ranges: &[FetchRange]) -> Vec<Vec<PieceAsk>> {
    let mut out: Vec<Vec<PieceAsk>> = Vec::new();
    let mut cur: Vec<PieceAsk> = Vec::new();
    let mut bytes = 0u64;
    let mut push = |p: PieceAsk, cur: &mut Vec<PieceAsk>, out: &mut Vec<Vec<PieceAsk>>| {
        if !cur.is_empty() && (bytes + p.length > BATCH_BYTES || cur.len() >= BATCH_PIECES) {
            out.push(std::mem::take(cur));
            bytes = 0;
        }
        bytes += p.length;
        cur.push(p);
    };
    for (i, r) in ranges.iter().enumerate() {
        if r.length == 0 {
            // Asked anyway: a file that is gone is said to be gone.
            push(
                PieceAsk {
                    range: i,
                    offset: r.offset,
                    length: 0,
                },
                &mut cur,
                &mut out,
            );
            continue;
        }
        let end = r.offset.saturating_add(r.length);
        let mut at = r.offset;
        while at < end {
            let length = (end - at).min(PIECE);
            push(
                PieceAsk {
                    range: i,
                    offset: at,
                    length,
                },
                &mut cur,
                &mut out,
            );
            at += length;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Reads one batch's pieces on `conn`; the answer is checked to come in the order asked.
fn read_batch(conn: &mut Conn, ranges: &[FetchRange], batch: &[PieceAsk]) -> Result<Rows, PqError> {
    let paths = text_array(batch.iter().map(|p| ranges[p.range].path.as_str()));
    let offsets = int_array(batch.iter().map(|p| p.offset));
    let lengths = int_array(batch.iter().map(|p| p.length));
    conn.query(READ_PIECES, &[&paths, &offsets, &lengths], Format::Binary)
}

/// A fetch: `workers` threads each read every `workers`-th batch on a connection of their own
/// and hand the answers over one at a time, so the pieces come out in the order asked while
/// the next batches are read.
struct LibpqFetch {
    ranges: Arc<Vec<FetchRange>>,
    batches: Arc<Vec<Vec<PieceAsk>>>,
    answers: Vec<Receiver<Result<Rows, SourceError>>>,
    stop: Arc<AtomicBool>,
    next_batch: usize,
    /// The batch being handed over, and its next piece.
    current: Option<(usize, Rows, usize)>,
    /// Ranges already answered in full (vanished, or ended short).
    over: Vec<bool>,
    /// A range ended short: said after its last data.
    pending_short: Option<(usize, u64)>,
}

impl LibpqFetch {
    fn start(
        ranges: Vec<FetchRange>,
        jobs: usize,
        connector: &Connector,
        pool: &Arc<Mutex<Vec<Conn>>>,
    ) -> LibpqFetch {
        let batches = Arc::new(batches(&ranges));
        let ranges = Arc::new(ranges);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = jobs.min(batches.len());
        let mut answers = Vec::with_capacity(workers);
        for w in 0..workers {
            // One answer waiting and one being read per worker: memory stays bounded when the
            // engine writes slower than the source reads.
            let (tx, rx) = sync_channel(1);
            answers.push(rx);
            let (ranges, batches, stop) = (ranges.clone(), batches.clone(), stop.clone());
            let (connector, pool) = (connector.clone(), pool.clone());
            std::thread::spawn(move || {
                read_every_nth(w, workers, &ranges, &batches, &stop, &connector, &pool, &tx)
            });
        }
        LibpqFetch {
            over: vec![false; ranges.len()],
            ranges,
            batches,
            answers,
            stop,
            next_batch: 0,
            current: None,
            pending_short: None,
        }
    }
}

/// A fetch worker: batches `first`, `first + step`, … on one connection, from the pool.
#[allow(clippy::too_many_arguments)]
fn read_every_nth(
    first: usize,
    step: usize,
    ranges: &[FetchRange],
    batches: &[Vec<PieceAsk>],
    stop: &AtomicBool,
    connector: &Connector,
    pool: &Mutex<Vec<Conn>>,
    tx: &SyncSender<Result<Rows, SourceError>>,
) {
    let lock = || pool.lock().unwrap_or_else(|p| p.into_inner());
    let mut conn = lock().pop();
    for b in (first..batches.len()).step_by(step) {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let answer = connector.patiently(&mut conn, "file data", RetryOp::Fetch, |c| {
            read_batch(c, ranges, &batches[b])
        });
        let failed = answer.is_err();
        if tx.send(answer).is_err() || failed {
            break;
        }
    }
    if let Some(c) = conn {
        lock().push(c);
    }
}

impl Drop for LibpqFetch {
    fn drop(&mut self) {
        // The workers stop after the query they are in; dropping the receivers wakes any
        // waiting to hand over.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What the next piece is, found before it is borrowed.
enum Step {
    Data { range: usize, offset: u64 },
    Short { range: usize, size: u64 },
    Vanished { range: usize },
}

impl LibpqFetch {
    fn advance(&mut self) -> Result<Option<Step>, SourceError> {
        loop {
            if let Some((range, size)) = self.pending_short.take() {
                return Ok(Some(Step::Short { range, size }));
            }
            let Some((b, rows, p)) = self.current.as_mut() else {
                if self.next_batch >= self.batches.len() {
                    return Ok(None);
                }
                let b = self.next_batch;
                let rx = &self.answers[b % self.answers.len()];
                let rows = rx.recv().map_err(|_| {
                    SourceError::Transport("a connection reading file data ended".into())
                })??;
                if rows.len() != self.batches[b].len() {
                    return Err(SourceError::Protocol(format!(
                        "{} pieces of file data for {} asked",
                        rows.len(),
                        self.batches[b].len()
                    )));
                }
                self.current = Some((b, rows, 0));
                continue;
            };
            let (b, i) = (*b, *p);
            if i >= self.batches[b].len() {
                self.current = None;
                self.next_batch += 1;
                continue;
            }
            *p += 1;
            let ask = self.batches[b][i];
            if self.over[ask.range] {
                continue;
            }
            if rows.int8(i, 0) != Some(i as i64 + 1) {
                return Err(SourceError::Protocol(
                    "pieces of file data came out of the order asked".into(),
                ));
            }
            let Some(data) = rows.get(i, 1) else {
                self.over[ask.range] = true;
                return Ok(Some(Step::Vanished { range: ask.range }));
            };
            let got = data.len() as u64;
            if got > ask.length {
                return Err(SourceError::Protocol(format!(
                    "{} bytes of {:?} at {} where {} were asked",
                    got, self.ranges[ask.range].path, ask.offset, ask.length
                )));
            }
            if got < ask.length {
                // The file ended before the range did.
                self.over[ask.range] = true;
                self.pending_short = Some((ask.range, ask.offset + got));
            }
            if got > 0 {
                return Ok(Some(Step::Data {
                    range: ask.range,
                    offset: ask.offset,
                }));
            }
        }
    }
}

impl Fetch for LibpqFetch {
    fn next(&mut self) -> Result<Option<Fetched<'_>>, SourceError> {
        let Some(next) = self.advance()? else {
            return Ok(None);
        };
        Ok(Some(match next {
            Step::Short { range, size } => Fetched::Short {
                path: &self.ranges[range].path,
                size,
            },
            Step::Vanished { range } => Fetched::Vanished {
                path: &self.ranges[range].path,
            },
            Step::Data { range, offset } => {
                let (_, rows, p) = self.current.as_ref().expect("the batch being handed over");
                Fetched::Data {
                    path: &self.ranges[range].path,
                    offset,
                    data: rows.get(*p - 1, 1).unwrap_or_default(),
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(path: &str, offset: u64, length: u64) -> FetchRange {
        FetchRange {
            path: path.into(),
            offset,
            length,
        }
    }

    #[test]
    fn ranges_are_cut_into_mebibyte_pieces_in_order_and_batched() {
        let b = batches(&[
            range("base/1/1", 0, 3 * PIECE + 5),
            range("empty", 7, 0),
            range("base/1/2", PIECE, 10),
        ]);
        let flat: Vec<(usize, u64, u64)> = b
            .iter()
            .flatten()
            .map(|p| (p.range, p.offset, p.length))
            .collect();
        assert_eq!(
            flat,
            [
                (0, 0, PIECE),
                (0, PIECE, PIECE),
                (0, 2 * PIECE, PIECE),
                (0, 3 * PIECE, 5),
                (1, 7, 0),
                (2, PIECE, 10),
            ]
        );
        let big = batches(&[range("big", 0, 20 * PIECE)]);
        assert!(
            big.iter()
                .all(|q| q.iter().map(|p| p.length).sum::<u64>() <= BATCH_BYTES)
        );
        assert_eq!(big.len(), 3);
    }

    #[test]
    fn array_literals_quote_what_postgresql_would_misread() {
        assert_eq!(
            text_array(["a", "b\"c", "d\\e", "f,g"].into_iter()),
            r#"{"a","b\"c","d\\e","f,g"}"#
        );
        assert_eq!(int_array([1u64, 1 << 40].into_iter()), "{1,1099511627776}");
    }

    #[test]
    fn primary_conninfo_keeps_what_libpq_settled_on_but_the_receivers_own() {
        let opts: Vec<ConnOption> = [
            ("host", "db 1", None),
            ("port", "5433", Some("5432")),
            ("dbname", "postgres", None),
            ("fallback_application_name", "failback", None),
            ("sslmode", "verify-full", Some("prefer")),
            ("sslcertmode", "allow", Some("allow")),
            ("connect_timeout", "60", None),
            ("options", "", None),
            ("replication", "true", None),
        ]
        .iter()
        .map(|(k, v, c)| ConnOption {
            keyword: k.to_string(),
            value: v.to_string(),
            compiled: c.map(str::to_string),
        })
        .collect();
        assert_eq!(
            primary_conninfo(&opts, "host='db 1' port=5433"),
            "host='db 1' port=5433 sslmode='verify-full'"
        );
        assert_eq!(
            primary_conninfo(&opts, "host='db 1' connect_timeout=60"),
            "host='db 1' port=5433 sslmode='verify-full' connect_timeout=60"
        );
    }
}
