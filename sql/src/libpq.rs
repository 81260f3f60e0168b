//! A connection to a PostgreSQL server through libpq itself.
//!
//! Operators and orchestrators hand failback a connection string written for libpq: keywords
//! or a `postgresql://` URI, `PG*` environment variables (`PGPASSFILE`, `PGOPTIONS`,
//! `PGCONNECT_TIMEOUT`, `PGSSLMODE`, …), `~/.pgpass`, service files, `sslmode` up to
//! `verify-full` with client certificates, several hosts with `target_session_attrs`,
//! `tcp_user_timeout`. Every one of those is libpq's own behaviour (`fe-connect.c`), and a
//! reimplementation would differ somewhere an operator depends on; so failback links the
//! libpq the system has (through the `pq-sys` binding) and reads strings exactly as
//! `pg_rewind --source-server` does.
//!
//! What libpq does not give is a bound on a silent server: a blocking `PQexec` waits for as
//! long as the TCP connection lives. Queries are therefore sent with `PQsendQueryParams` and
//! their results awaited by `poll(2)` on the connection's socket with a deadline; a query that
//! outlives it fails with [`PqError::Timeout`] and the connection is not used again.
//!
//! libpq's notices (a `WARNING` from `pg_backup_stop`, say) would go to standard error, where
//! orchestrators read pg_rewind's own lines; they are dropped.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use pq_sys as pq;

/// Why a connection or a query failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PqError {
    /// libpq could not connect: its own message, which names the host and the reason.
    #[error("{0}")]
    Connect(String),
    /// The server answered a query with an error.
    #[error("{message}")]
    Query {
        /// The five-character SQLSTATE, when the server sent one (`42501`: no privilege).
        sqlstate: Option<String>,
        message: String,
    },
    /// The server did not answer within the deadline; the connection is not used again.
    #[error("no answer from the server within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The connection broke (the server went away, the network failed).
    #[error("connection lost: {0}")]
    Lost(String),
}

impl PqError {
    /// Whether asking again on a new connection can help: a lost connection or a silent
    /// server can come back; a server's refusal will not change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PqError::Timeout(_) | PqError::Lost(_))
    }

    /// The server refused for want of a privilege (SQLSTATE 42501).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, PqError::Query { sqlstate: Some(s), .. } if s == "42501")
    }
}

/// The value a connection string gives `keyword` (keywords or a URI, as libpq parses them;
/// the environment is not consulted); `None` when it gives none or does not parse.
pub fn keyword(conninfo: &str, keyword: &str) -> Option<String> {
    let text = CString::new(conninfo).ok()?;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: a NUL-terminated string; the returned array is freed below.
    let opts = unsafe { pq::PQconninfoParse(text.as_ptr(), &mut err) };
    if !err.is_null() {
        // SAFETY: libpq allocated the message.
        unsafe { pq::PQfreemem(err.cast()) };
    }
    if opts.is_null() {
        return None;
    }
    let mut found = None;
    let mut i = 0;
    loop {
        // SAFETY: the array ends with an entry whose keyword is NULL.
        let o = unsafe { &*opts.add(i) };
        if o.keyword.is_null() {
            break;
        }
        if c_text(o.keyword) == keyword && !o.val.is_null() {
            found = Some(c_text(o.val));
        }
        i += 1;
    }
    // SAFETY: the array PQconninfoParse returned.
    unsafe { pq::PQconninfoFree(opts) };
    found
}

/// One option of an open connection ([`Conn::options`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnOption {
    pub keyword: String,
    pub value: String,
    /// libpq's compiled-in default for it, if it has one.
    pub compiled: Option<String>,
}

/// How a query's values come back: as text (what `::text` gives), or in PostgreSQL's binary
/// format (`bytea` as its raw bytes, `int8` as 8 big-endian bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

/// One libpq connection, used by one thread at a time (libpq allows that for a connection
/// that is not shared).
pub struct Conn {
    raw: NonNull<pq::PGconn>,
    /// How long a query may wait for its answer; `None`: for ever, as libpq does.
    timeout: Option<Duration>,
    /// A query timed out or the connection broke: nothing more is sent on it.
    broken: bool,
}

// SAFETY: a PGconn is not tied to the thread that made it; `Conn` is used through `&mut`, so
// by one thread at a time.
unsafe impl Send for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: `raw` came from PQconnectdbParams and is finished exactly once.
        unsafe { pq::PQfinish(self.raw.as_ptr()) }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("server_version", &self.server_version())
            .finish()
    }
}

unsafe extern "C" fn ignore_notice(_arg: *mut c_void, _message: *const c_char) {}

fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libpq returns NUL-terminated strings that live as long as their owner.
    unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim_end()
        .to_string()
}

fn c_string(what: &str, s: &str) -> Result<CString, PqError> {
    CString::new(s).map_err(|_| PqError::Connect(format!("{what} contains a NUL byte")))
}

impl Conn {
    /// Connects as libpq would with `conninfo` (keywords or a URI; empty: everything from the
    /// environment), naming itself `application` unless the string or `PGAPPNAME` names
    /// something else. A server that does not answer is given up on after
    /// `default_connect_timeout` unless the string or `PGCONNECT_TIMEOUT` says otherwise.
    /// `query_timeout` bounds every query's wait for its answer.
    pub fn connect(
        conninfo: &str,
        application: &str,
        default_connect_timeout: Duration,
        query_timeout: Option<Duration>,
    ) -> Result<Conn, PqError> {
        // Keywords are processed in order and the expanded `dbname` string overrides what comes
        // before it: failback's defaults first, the caller's string last.
        let mut keys = vec![c"fallback_application_name".to_owned()];
        let mut values = vec![c_string("the application name", application)?];
        if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
            keys.push(c"connect_timeout".to_owned());
            values.push(c_string(
                "the timeout",
                &default_connect_timeout.as_secs().max(2).to_string(),
            )?);
        }
        keys.push(c"dbname".to_owned());
        values.push(c_string("the connection string", conninfo)?);
        let mut key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        let mut value_ptrs: Vec<*const c_char> = values.iter().map(|v| v.as_ptr()).collect();
        key_ptrs.push(std::ptr::null());
        value_ptrs.push(std::ptr::null());
        // SAFETY: both arrays are NULL-terminated and their strings outlive the call.
        let raw = unsafe { pq::PQconnectdbParams(key_ptrs.as_ptr(), value_ptrs.as_ptr(), 1) };
        let raw = NonNull::new(raw)
            .ok_or_else(|| PqError::Connect("libpq could not allocate a connection".into()))?;
        let conn = Conn {
            raw,
            timeout: query_timeout,
            broken: false,
        };
        // SAFETY: a live connection.
        if unsafe { pq::PQstatus(conn.raw.as_ptr()) } != pq::ConnStatusType::CONNECTION_OK {
            return Err(PqError::Connect(conn.error_message()));
        }
        // SAFETY: a live connection; the processor takes no state.
        unsafe {
            pq::PQsetNoticeProcessor(conn.raw.as_ptr(), Some(ignore_notice), std::ptr::null_mut())
        };
        Ok(conn)
    }

    /// The server's version as `server_version_num` gives it (150018 for 15.18).
    pub fn server_version(&self) -> u32 {
        // SAFETY: a live connection.
        u32::try_from(unsafe { pq::PQserverVersion(self.raw.as_ptr()) }).unwrap_or(0)
    }

    /// The server's major version (15 for 15.18).
    pub fn server_major(&self) -> u32 {
        self.server_version() / 10_000
    }

    /// The role the session authenticated as.
    pub fn user(&self) -> String {
        // SAFETY: a live connection.
        c_text(unsafe { pq::PQuser(self.raw.as_ptr()) })
    }

    /// The connection's options as libpq settled them (`PQconninfo`), whether they came from
    /// the string, the environment, a service file or a default: each keyword with a value,
    /// and libpq's compiled-in default for it when it has one. What `pg_rewind -R` writes as
    /// `primary_conninfo` is made of these.
    pub fn options(&self) -> Vec<ConnOption> {
        // SAFETY: a live connection; the array is freed below.
        let opts = unsafe { pq::PQconninfo(self.raw.as_ptr()) };
        if opts.is_null() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            // SAFETY: the array ends with an entry whose keyword is NULL.
            let o = unsafe { &*opts.add(i) };
            if o.keyword.is_null() {
                break;
            }
            if !o.val.is_null() {
                out.push(ConnOption {
                    keyword: c_text(o.keyword),
                    value: c_text(o.val),
                    compiled: (!o.compiled.is_null()).then(|| c_text(o.compiled)),
                });
            }
            i += 1;
        }
        // SAFETY: the array PQconninfo returned.
        unsafe { pq::PQconninfoFree(opts) };
        out
    }

    /// Changes how long later queries may wait.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    fn error_message(&self) -> String {
        // SAFETY: a live connection.
        let m = c_text(unsafe { pq::PQerrorMessage(self.raw.as_ptr()) });
        m.strip_prefix("ERROR:  ").unwrap_or(&m).to_string()
    }

    /// Runs `sql` with text parameters `$1…`, values back in `format`. Several statements
    /// without parameters may be sent at once; the last one's rows are returned.
    pub fn query(&mut self, sql: &str, params: &[&str], format: Format) -> Result<Rows, PqError> {
        if self.broken {
            return Err(PqError::Lost(
                "an earlier query on this connection failed".into(),
            ));
        }
        let sql = CString::new(sql).map_err(|_| PqError::Query {
            sqlstate: None,
            message: "a query with a NUL byte".into(),
        })?;
        let params: Vec<CString> = params
            .iter()
            .map(|p| {
                CString::new(*p).map_err(|_| PqError::Query {
                    sqlstate: None,
                    message: "a parameter with a NUL byte".into(),
                })
            })
            .collect::<Result<_, _>>()?;
        let ptrs: Vec<*const c_char> = params.iter().map(|p| p.as_ptr()).collect();
        let nparams = c_int::try_from(ptrs.len()).map_err(|_| PqError::Query {
            sqlstate: None,
            message: "too many parameters".into(),
        })?;
        let result_format = match format {
            Format::Text => 0,
            Format::Binary => 1,
        };
        // SAFETY: the strings outlive the call, which copies them into libpq's buffer; NULL
        // types, lengths and formats mean text parameters whose types the server infers.
        let sent = unsafe {
            if nparams == 0 && result_format == 0 {
                pq::PQsendQuery(self.raw.as_ptr(), sql.as_ptr())
            } else {
                pq::PQsendQueryParams(
                    self.raw.as_ptr(),
                    sql.as_ptr(),
                    nparams,
                    std::ptr::null(),
                    ptrs.as_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                    result_format,
                )
            }
        };
        if sent != 1 {
            self.broken = true;
            return Err(PqError::Lost(self.error_message()));
        }
        self.wait_for_result()?;
        // Every result of the command string is taken, so the connection is ready for the
        // next; the first error wins, else the last result.
        let mut last: Option<Rows> = None;
        let mut error: Option<PqError> = None;
        loop {
            // SAFETY: a live connection; PQgetResult does not block once PQisBusy said 0.
            let res = unsafe { pq::PQgetResult(self.raw.as_ptr()) };
            let Some(res) = NonNull::new(res) else { break };
            let rows = Rows { res };
            // SAFETY: a live result.
            let status = unsafe { pq::PQresultStatus(rows.res.as_ptr()) };
            match status {
                pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_COMMAND_OK => {
                    last = Some(rows)
                }
                _ if error.is_none() => error = Some(rows.error()),
                _ => {}
            }
            self.wait_for_result()?;
        }
        if let Some(e) = error {
            if !self.is_ok() {
                self.broken = true;
                return Err(PqError::Lost(e.to_string()));
            }
            return Err(e);
        }
        last.ok_or_else(|| {
            self.broken = true;
            PqError::Lost(self.error_message())
        })
    }

    /// One row, one text column: the common shape of a question.
    pub fn query_one_text(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<Option<String>, PqError> {
        let rows = self.query(sql, params, Format::Text)?;
        if rows.len() != 1 {
            return Err(PqError::Query {
                sqlstate: None,
                message: format!("expected one row, got {}", rows.len()),
            });
        }
        Ok(rows.text(0, 0))
    }

    fn is_ok(&self) -> bool {
        // SAFETY: a live connection.
        unsafe { pq::PQstatus(self.raw.as_ptr()) == pq::ConnStatusType::CONNECTION_OK }
    }

    /// Reads from the socket until a result can be taken without blocking, within the
    /// deadline.
    fn wait_for_result(&mut self) -> Result<(), PqError> {
        let deadline = self.timeout.map(|t| (t, Instant::now() + t));
        loop {
            // SAFETY: a live connection.
            if unsafe { pq::PQconsumeInput(self.raw.as_ptr()) } != 1 {
                self.broken = true;
                return Err(PqError::Lost(self.error_message()));
            }
            // SAFETY: a live connection.
            if unsafe { pq::PQisBusy(self.raw.as_ptr()) } == 0 {
                return Ok(());
            }
            let wait_ms = match deadline {
                None => -1,
                Some((t, at)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.broken = true;
                        return Err(PqError::Timeout(t));
                    }
                    c_int::try_from(left.as_millis().max(1)).unwrap_or(c_int::MAX)
                }
            };
            // SAFETY: a live connection.
            let fd = unsafe { pq::PQsocket(self.raw.as_ptr()) };
            if fd < 0 {
                self.broken = true;
                return Err(PqError::Lost(self.error_message()));
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.broken = true;
                    return Err(PqError::Lost(e.to_string()));
                }
            }
        }
    }
}

/// The rows of one query's result.
pub struct Rows {
    res: NonNull<pq::PGresult>,
}

// SAFETY: a PGresult is plain memory owned by this value alone.
unsafe impl Send for Rows {}

impl Drop for Rows {
    fn drop(&mut self) {
        // SAFETY: `res` came from PQgetResult and is cleared exactly once.
        unsafe { pq::PQclear(self.res.as_ptr()) }
    }
}

impl Rows {
    pub fn len(&self) -> usize {
        // SAFETY: a live result.
        usize::try_from(unsafe { pq::PQntuples(self.res.as_ptr()) }).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn columns(&self) -> usize {
        // SAFETY: a live result.
        usize::try_from(unsafe { pq::PQnfields(self.res.as_ptr()) }).unwrap_or(0)
    }

    /// The value at `row`, `col` as it came (text or binary); `None` for NULL or out of range.
    pub fn get(&self, row: usize, col: usize) -> Option<&[u8]> {
        if row >= self.len() || col >= self.columns() {
            return None;
        }
        let (r, c) = (row as c_int, col as c_int);
        // SAFETY: row and column are in range; the value lives as long as the result.
        unsafe {
            if pq::PQgetisnull(self.res.as_ptr(), r, c) == 1 {
                return None;
            }
            let p = pq::PQgetvalue(self.res.as_ptr(), r, c);
            let n = usize::try_from(pq::PQgetlength(self.res.as_ptr(), r, c)).unwrap_or(0);
            Some(std::slice::from_raw_parts(p.cast::<u8>(), n))
        }
    }

    /// A value as text.
    pub fn text(&self, row: usize, col: usize) -> Option<String> {
        self.get(row, col)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// A binary `int8` value.
    pub fn int8(&self, row: usize, col: usize) -> Option<i64> {
        let v = self.get(row, col)?;
        Some(i64::from_be_bytes(v.try_into().ok()?))
    }

    fn error(&self) -> PqError {
        // SAFETY: a live result; the fields live as long as it.
        let (sqlstate, primary) = unsafe {
            (
                pq::PQresultErrorField(self.res.as_ptr(), pq::PG_DIAG_SQLSTATE as c_int),
                pq::PQresultErrorField(self.res.as_ptr(), pq::PG_DIAG_MESSAGE_PRIMARY as c_int),
            )
        };
        let sqlstate = (!sqlstate.is_null()).then(|| c_text(sqlstate));
        let mut message = c_text(primary);
        if message.is_empty() {
            // SAFETY: a live result.
            message = c_text(unsafe { pq::PQresultErrorMessage(self.res.as_ptr()) });
        }
        PqError::Query { sqlstate, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_are_read_as_libpq_reads_them() {
        let s = "host=db1 port=5433 user='re wind' dbname=postgres";
        assert_eq!(keyword(s, "user").as_deref(), Some("re wind"));
        assert_eq!(keyword(s, "port").as_deref(), Some("5433"));
        assert_eq!(keyword(s, "sslmode"), None);
        let uri = "postgresql://rewinder@db2:5444/postgres?sslmode=verify-full";
        assert_eq!(keyword(uri, "user").as_deref(), Some("rewinder"));
        assert_eq!(keyword(uri, "host").as_deref(), Some("db2"));
        assert_eq!(keyword(uri, "sslmode").as_deref(), Some("verify-full"));
        assert_eq!(keyword("host=", "user"), None);
        assert_eq!(
            keyword("nonsense_keyword=1", "user"),
            None,
            "libpq refuses it"
        );
    }

    #[test]
    fn a_server_that_is_not_there_is_a_connect_error_in_libpqs_words() {
        let e = Conn::connect(
            "host=127.0.0.1 port=1 user=nobody",
            "failback-test",
            Duration::from_secs(2),
            None,
        )
        .unwrap_err();
        let PqError::Connect(text) = &e else {
            panic!("{e:?}")
        };
        assert!(
            text.contains("127.0.0.1") && text.contains("refused"),
            "{text}"
        );
        assert!(!e.is_retryable());
    }
}
