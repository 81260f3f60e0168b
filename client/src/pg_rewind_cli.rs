//! failback as `pg_rewind`: the command line, exit statuses and stderr lines of PostgreSQL's
//! own `pg_rewind` (13 to 18), for the orchestrators and people that call it by that name.
//!
//! PostgreSQL's `pg_rewind` (`src/bin/pg_rewind/pg_rewind.c`) reads its arguments with the C
//! library's `getopt_long` (glibc's, on Linux): short options from the string `cD:nNPR`, which
//! may be bundled (`-nN`, `-nD DIR`, `-DDIR`); long options as `--name=value` or `--name value`,
//! abbreviated to any unambiguous prefix (`--no-s` is `--no-sync`); arguments that are not
//! options are moved to the end (and then refused as "too many command-line arguments"); `--`
//! ends the options. `--help`/`-?` and `--version`/`-V` are looked at only as the first
//! argument: anywhere else `-?` and `-V` are invalid options and `--help`/`--version` fall to
//! the "Try --help" hint. Every message goes to stderr as `pg_rewind: MSG` or
//! `pg_rewind: error: MSG` (getopt's own complaints start with argv[0] as invoked); stdout
//! carries only `--help` and `--version`. The exit status is 0 for success, for "no rewind
//! required", `--help` and `--version`, and 1 for everything else, usage errors included.
//!
//! Orchestrators depend on this: Patroni probes with `--help` and reads only the exit status,
//! and searches stderr for `could not open file "…/pg_wal/SEGMENT": ` to fetch a missing
//! segment itself; repmgr reads the first line of stdout (so it must stay empty);
//! CloudNativePG and pg_auto_failover pass `-P`. `reference/orchestrators.md` has the details.
//!
//! This module is pure where it can be: [`parse`] turns arguments into an [`Invocation`] (or
//! the exact lines to print), [`Invocation::options`] into failback's own
//! [`RewindOptions`], [`PgRewindProgress`] prints the engine's progress as pg_rewind's lines,
//! [`error_lines`] an error as pg_rewind's. [`main`] ties them to the engine, the same
//! [`crate::rewind::rewind`] that `failback rewind` drives.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use failback_datadir::wal::WalReadError;

use crate::error::RewindError;
use crate::fsutil::SyncMethod;
use crate::progress::Progress;
use crate::rewind::RewindOptions;
use crate::source::Source;

/// The name failback answers to as pg_rewind (argv[0]'s file name).
pub const PROGNAME: &str = "pg_rewind";

/// Whether argv[0] asks for the pg_rewind personality: its file name is `pg_rewind`, as when
/// failback is installed or symlinked under that name.
pub fn invoked_as_pg_rewind(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name() == Some(OsStr::new(PROGNAME))
}

/// Where the new primary's files come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceArg {
    /// `--source-pgdata=DIR`: a shut-down data directory on this machine.
    Pgdata(PathBuf),
    /// `--source-server=CONNSTR`: a running server, over libpq.
    Server(String),
}

/// A command line that asks for a rewind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// `-D/--target-pgdata`, exactly as given (pg_rewind names files under it as given).
    pub target_pgdata: PathBuf,
    pub source: SourceArg,
    /// `-c/--restore-target-wal`.
    pub restore_target_wal: bool,
    /// `-n/--dry-run`.
    pub dry_run: bool,
    /// `-N/--no-sync`.
    pub no_sync: bool,
    /// `-P/--progress`.
    pub progress: bool,
    /// `-R/--write-recovery-conf` (only with `--source-server`).
    pub write_recovery_conf: bool,
    /// `--config-file`.
    pub config_file: Option<PathBuf>,
    /// `--debug`.
    pub debug: bool,
    /// `--no-ensure-shutdown`.
    pub no_ensure_shutdown: bool,
    /// `--sync-method`.
    pub sync_method: Option<SyncMethod>,
}

/// What a command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// `--help` or `-?` as the first argument: the help on stdout, exit 0.
    Help,
    /// `--version` or `-V` as the first argument: one line on stdout, exit 0.
    Version,
    Run(Box<Invocation>),
}

/// A command line pg_rewind refuses: the lines it prints on stderr, and exit status 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError {
    pub lines: Vec<String>,
}

/// The hint pg_rewind (15 and later) prints after every usage error but a bad sync method.
fn hint() -> String {
    format!("{PROGNAME}: hint: Try \"{PROGNAME} --help\" for more information.")
}

impl UsageError {
    /// An error of pg_rewind's own, with the hint.
    fn ours(message: String) -> UsageError {
        UsageError {
            lines: vec![format!("{PROGNAME}: error: {message}"), hint()],
        }
    }

    /// A complaint of getopt's (prefixed by argv[0] as invoked, as glibc does), with the hint;
    /// or, for the options getopt accepts but pg_rewind's switch has no case for (`--help` and
    /// `--version` not first), the hint alone.
    fn getopt(argv0: &str, complaint: Option<String>) -> UsageError {
        let mut lines: Vec<String> = complaint
            .map(|c| format!("{argv0}: {c}"))
            .into_iter()
            .collect();
        lines.push(hint());
        UsageError { lines }
    }
}

/// The long options, in pg_rewind's table order (glibc lists ambiguous matches in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    Help,
    TargetPgdata,
    WriteRecoveryConf,
    SourcePgdata,
    SourceServer,
    NoEnsureShutdown,
    ConfigFile,
    Version,
    RestoreTargetWal,
    DryRun,
    NoSync,
    Progress,
    Debug,
    SyncMethod,
}

const LONG: [(&str, Opt); 14] = [
    ("help", Opt::Help),
    ("target-pgdata", Opt::TargetPgdata),
    ("write-recovery-conf", Opt::WriteRecoveryConf),
    ("source-pgdata", Opt::SourcePgdata),
    ("source-server", Opt::SourceServer),
    ("no-ensure-shutdown", Opt::NoEnsureShutdown),
    ("config-file", Opt::ConfigFile),
    ("version", Opt::Version),
    ("restore-target-wal", Opt::RestoreTargetWal),
    ("dry-run", Opt::DryRun),
    ("no-sync", Opt::NoSync),
    ("progress", Opt::Progress),
    ("debug", Opt::Debug),
    ("sync-method", Opt::SyncMethod),
];

impl Opt {
    fn takes_value(self) -> bool {
        matches!(
            self,
            Opt::TargetPgdata
                | Opt::SourcePgdata
                | Opt::SourceServer
                | Opt::ConfigFile
                | Opt::SyncMethod
        )
    }

    /// The option a short letter stands for (getopt's `cD:nNPR`).
    fn short(c: u8) -> Option<Opt> {
        Some(match c {
            b'c' => Opt::RestoreTargetWal,
            b'D' => Opt::TargetPgdata,
            b'n' => Opt::DryRun,
            b'N' => Opt::NoSync,
            b'P' => Opt::Progress,
            b'R' => Opt::WriteRecoveryConf,
            _ => return None,
        })
    }
}

/// The options as they are gathered, before pg_rewind's checks of what goes together.
#[derive(Default)]
struct Gathered {
    target: Option<OsString>,
    source_pgdata: Option<OsString>,
    source_server: Option<OsString>,
    config_file: Option<OsString>,
    sync_method: Option<SyncMethod>,
    restore_target_wal: bool,
    dry_run: bool,
    no_sync: bool,
    progress: bool,
    write_recovery_conf: bool,
    debug: bool,
    no_ensure_shutdown: bool,
}

impl Gathered {
    /// One option, as pg_rewind's `switch` takes it; a later one of a kind wins, as there.
    fn take(&mut self, argv0: &str, opt: Opt, value: Option<OsString>) -> Result<(), UsageError> {
        match opt {
            Opt::RestoreTargetWal => self.restore_target_wal = true,
            Opt::DryRun => self.dry_run = true,
            Opt::NoSync => self.no_sync = true,
            Opt::Progress => self.progress = true,
            Opt::WriteRecoveryConf => self.write_recovery_conf = true,
            Opt::Debug => self.debug = true,
            Opt::NoEnsureShutdown => self.no_ensure_shutdown = true,
            Opt::TargetPgdata => self.target = value,
            Opt::SourcePgdata => self.source_pgdata = value,
            Opt::SourceServer => self.source_server = value,
            Opt::ConfigFile => self.config_file = value,
            Opt::SyncMethod => {
                let v = value.unwrap_or_default();
                // pg_rewind 17+'s parse_sync_method: its own error, without the hint.
                self.sync_method = Some(match v.as_bytes() {
                    b"fsync" => SyncMethod::Fsync,
                    b"syncfs" => SyncMethod::Syncfs,
                    _ => {
                        return Err(UsageError {
                            lines: vec![format!(
                                "{PROGNAME}: error: unrecognized sync method: {}",
                                v.to_string_lossy()
                            )],
                        });
                    }
                });
            }
            // Accepted by getopt_long but without a case in pg_rewind's switch once past the
            // first argument: the hint alone.
            Opt::Help | Opt::Version => return Err(UsageError::getopt(argv0, None)),
        }
        Ok(())
    }
}

/// Parses pg_rewind's command line (`args` without argv[0]; `argv0` as invoked, for getopt's
/// messages) as pg_rewind and glibc's `getopt_long` do.
pub fn parse(argv0: &OsStr, args: &[OsString]) -> Result<Parsed, UsageError> {
    let argv0 = argv0.to_string_lossy();
    match args.first().map(|a| a.as_bytes()) {
        Some(b"--help" | b"-?") => return Ok(Parsed::Help),
        Some(b"--version" | b"-V") => return Ok(Parsed::Version),
        _ => {}
    }
    let mut g = Gathered::default();
    // Arguments that are not options: glibc moves them after the options, so they are only
    // refused once every option has been read.
    let mut operands: Vec<&OsString> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_bytes();
        i += 1;
        if arg == b"--" {
            operands.extend(&args[i..]);
            break;
        }
        if let Some(body) = arg.strip_prefix(b"--") {
            let (name, inline) = match body.iter().position(|&b| b == b'=') {
                Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
                None => (body, None),
            };
            let opt = long_option(&argv0, body, name)?;
            let long = LONG.iter().find(|(_, o)| *o == opt).map_or("", |(n, _)| n);
            let value = if opt.takes_value() {
                match inline {
                    Some(v) => Some(OsStr::from_bytes(v).to_os_string()),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => {
                        return Err(UsageError::getopt(
                            &argv0,
                            Some(format!("option '--{long}' requires an argument")),
                        ));
                    }
                }
            } else {
                if inline.is_some() {
                    return Err(UsageError::getopt(
                        &argv0,
                        Some(format!("option '--{long}' doesn't allow an argument")),
                    ));
                }
                None
            };
            g.take(&argv0, opt, value)?;
            continue;
        }
        match arg {
            [b'-', cluster @ ..] if !cluster.is_empty() => {
                for (j, &c) in cluster.iter().enumerate() {
                    let Some(opt) = Opt::short(c) else {
                        return Err(UsageError::getopt(
                            &argv0,
                            Some(format!("invalid option -- '{}'", char::from(c))),
                        ));
                    };
                    if !opt.takes_value() {
                        g.take(&argv0, opt, None)?;
                        continue;
                    }
                    // The rest of the cluster is the value (`-DDIR`, `-nDDIR`), else the next
                    // argument, whatever it looks like (`-D -n` names a directory "-n").
                    let rest = &cluster[j + 1..];
                    let value = if !rest.is_empty() {
                        OsStr::from_bytes(rest).to_os_string()
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return Err(UsageError::getopt(
                            &argv0,
                            Some(format!(
                                "option requires an argument -- '{}'",
                                char::from(c)
                            )),
                        ));
                    };
                    g.take(&argv0, opt, Some(value))?;
                    break;
                }
            }
            // `-` alone, and anything not starting with `-`, is an operand.
            _ => operands.push(&args[i - 1]),
        }
    }
    check(g, &operands).map(|inv| Parsed::Run(Box::new(inv)))
}

/// The long option `--body` names (`name` is `body` before any `=`): an exact name, else the
/// one option it is a prefix of, as glibc matches.
fn long_option(argv0: &str, body: &[u8], name: &[u8]) -> Result<Opt, UsageError> {
    if let Some((_, opt)) = LONG.iter().find(|(n, _)| n.as_bytes() == name) {
        return Ok(*opt);
    }
    let matches: Vec<&(&str, Opt)> = LONG
        .iter()
        .filter(|(n, _)| n.as_bytes().starts_with(name))
        .collect();
    let typed = String::from_utf8_lossy(body);
    match matches.as_slice() {
        [(_, opt)] => Ok(*opt),
        [] => Err(UsageError::getopt(
            argv0,
            Some(format!("unrecognized option '--{typed}'")),
        )),
        many => {
            let names: Vec<String> = many.iter().map(|(n, _)| format!("'--{n}'")).collect();
            Err(UsageError::getopt(
                argv0,
                Some(format!(
                    "option '--{typed}' is ambiguous; possibilities: {}",
                    names.join(" ")
                )),
            ))
        }
    }
}

/// pg_rewind's checks of what goes together, in its order.
fn check(g: Gathered, operands: &[&OsString]) -> Result<Invocation, UsageError> {
    let source = match (g.source_pgdata, g.source_server) {
        (None, None) => {
            return Err(UsageError::ours(
                "no source specified (--source-pgdata or --source-server)".into(),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(UsageError::ours(
                "only one of --source-pgdata or --source-server can be specified".into(),
            ));
        }
        (Some(dir), None) => SourceArg::Pgdata(dir.into()),
        (None, Some(conn)) => SourceArg::Server(conn.to_string_lossy().into_owned()),
    };
    let Some(target) = g.target else {
        return Err(UsageError::ours(
            "no target data directory specified (--target-pgdata)".into(),
        ));
    };
    if g.write_recovery_conf && !matches!(source, SourceArg::Server(_)) {
        return Err(UsageError::ours(
            "no source server information (--source-server) specified for \
             --write-recovery-conf"
                .into(),
        ));
    }
    if let Some(first) = operands.first() {
        return Err(UsageError::ours(format!(
            "too many command-line arguments (first is \"{}\")",
            first.to_string_lossy()
        )));
    }
    Ok(Invocation {
        target_pgdata: target.into(),
        source,
        restore_target_wal: g.restore_target_wal,
        dry_run: g.dry_run,
        no_sync: g.no_sync,
        progress: g.progress,
        write_recovery_conf: g.write_recovery_conf,
        config_file: g.config_file.map(PathBuf::from),
        debug: g.debug,
        no_ensure_shutdown: g.no_ensure_shutdown,
        sync_method: g.sync_method,
    })
}

impl Invocation {
    /// failback's own options for this command line. `-R`'s `primary_conninfo` is the
    /// connection string given (the source may say better once it is open; see [`main`]).
    pub fn options(&self) -> RewindOptions {
        RewindOptions {
            target: self.target_pgdata.clone(),
            write_recovery_conf: self.write_recovery_conf,
            primary_conninfo: match (&self.source, self.write_recovery_conf) {
                (SourceArg::Server(c), true) => Some(c.clone()),
                _ => None,
            },
            dry_run: self.dry_run,
            no_sync: self.no_sync,
            restore_target_wal: self.restore_target_wal,
            config_file: self.config_file.clone(),
            no_ensure_shutdown: self.no_ensure_shutdown,
            sync_method: self.sync_method,
            debug: self.debug,
            ..RewindOptions::default()
        }
    }
}

/// `pg_rewind --help`: pg_rewind's options in its order, in failback's words.
pub fn help() -> String {
    format!(
        "{PROGNAME} (failback) brings a PostgreSQL data directory back in line with another copy \
of the cluster,\ncopying only what differs.\n\n\
Usage:\n  {PROGNAME} [OPTION]...\n\n\
Options:\n\
\x20 -c, --restore-target-wal       fetch WAL missing from the target with its restore_command\n\
\x20 -D, --target-pgdata=DIRECTORY  existing data directory to modify\n\
\x20     --source-pgdata=DIRECTORY  source data directory to synchronize with\n\
\x20     --source-server=CONNSTR    source server to synchronize with\n\
\x20 -n, --dry-run                  stop before modifying anything\n\
\x20 -N, --no-sync                  do not wait for changes to be written safely to disk\n\
\x20 -P, --progress                 write progress messages\n\
\x20 -R, --write-recovery-conf      write configuration for replication\n\
\x20                                (requires --source-server)\n\
\x20     --config-file=FILENAME     the target's main configuration file, when it is not in\n\
\x20                                the data directory\n\
\x20     --debug                    write a lot of debug messages\n\
\x20     --no-ensure-shutdown       do not automatically fix unclean shutdown\n\
\x20     --sync-method=METHOD       how to sync files to disk (fsync, syncfs)\n\
\x20 -V, --version                  output version information, then exit\n\
\x20 -?, --help                     show this help, then exit\n\n\
This is failback under pg_rewind's name; run it as failback for what it adds\n\
(failback rewind --help).\n"
    )
}

/// `pg_rewind --version`: starts with `pg_rewind` like PostgreSQL's, without claiming to be
/// PostgreSQL.
pub fn version() -> String {
    format!(
        "{PROGNAME} (failback {}) for PostgreSQL 13 to 18",
        env!("CARGO_PKG_VERSION")
    )
}

/// pg_rewind's `-P` line: done and total in kB, the done column as wide as the total.
pub fn progress_line(done: u64, total: u64) -> String {
    // Like pg_rewind, never more than 100% nor a done bigger than the total.
    let total = total.max(done);
    let percent = (done * 100).checked_div(total).unwrap_or(0).min(100);
    let total_kb = (total / 1024).to_string();
    format!(
        "{:>width$}/{total_kb} kB ({percent}%) copied",
        done / 1024,
        width = total_kb.len()
    )
}

/// The engine's progress as pg_rewind prints it, on `out` (stderr): its lines as
/// `pg_rewind: …`, the phases pg_rewind names only with `-P`, `-P`'s copy line at most once a
/// second (redrawn in place on a terminal, a line each otherwise, a last one at the end), and
/// `--debug`'s lines as `pg_rewind: …`.
pub struct PgRewindProgress<W: Write> {
    out: W,
    show_progress: bool,
    show_debug: bool,
    is_tty: bool,
    total: u64,
    done: u64,
    /// The second of the last `-P` line, and whether a copy's last line is still owed.
    last_second: Option<u64>,
    owed: bool,
    clock: fn() -> u64,
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Lines of the engine's printed only with `-P`: pg_rewind's own `-P` line, and failback's
/// accounts of how it works out what to copy (its lines that say where it does better than
/// pg_rewind, and where replay starts, are printed always).
const PROGRESS_ONLY: [&str; 5] = [
    "need to copy ",
    "the target's WAL names ",
    "the source's WAL names ",
    "compared ",
    "dry run: ",
];

impl<W: Write> PgRewindProgress<W> {
    pub fn new(out: W, show_progress: bool, show_debug: bool, is_tty: bool) -> Self {
        PgRewindProgress {
            out,
            show_progress,
            show_debug,
            is_tty,
            total: 0,
            done: 0,
            last_second: None,
            owed: false,
            clock: unix_seconds,
        }
    }

    /// A progress line; the last one of a copy ends its line even on a terminal.
    fn draw(&mut self, finished: bool) {
        let now = (self.clock)();
        if !finished && self.last_second == Some(now) {
            return;
        }
        self.last_second = Some(now);
        self.owed = !finished;
        let end = if !finished && self.is_tty { '\r' } else { '\n' };
        let _ = write!(
            self.out,
            "{}{end}",
            progress_line(self.done, self.total.max(self.done))
        );
    }

    fn line(&mut self, text: &str) {
        let _ = writeln!(self.out, "{PROGNAME}: {text}");
    }

    /// The copy's last progress line, when one is owed (pg_rewind prints it after copying).
    fn finish_copy(&mut self) {
        if self.show_progress && self.owed {
            self.draw(true);
        }
    }

    pub fn into_inner(mut self) -> W {
        self.finish_copy();
        self.out
    }
}

impl<W: Write> Progress for PgRewindProgress<W> {
    fn phase(&mut self, name: &str) {
        self.finish_copy();
        // pg_rewind has no line for the copy itself: its progress lines are it.
        if self.show_progress && name != "copying" {
            self.line(name);
        }
    }
    fn total(&mut self, bytes: u64) {
        self.total = bytes;
        self.done = 0;
        if self.show_progress {
            self.owed = true;
        }
    }
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.show_progress {
            self.draw(false);
        }
    }
    fn info(&mut self, line: &str) {
        if !self.show_progress && PROGRESS_ONLY.iter().any(|p| line.starts_with(p)) {
            return;
        }
        self.finish_copy();
        self.line(line);
    }
    fn debug(&mut self, line: &str) {
        if self.show_debug {
            // PostgreSQL's frontend logging prefixes no level to debug lines.
            self.line(line);
        }
    }
}

/// What pg_rewind prints for `e`: `pg_rewind: error: …` with the causes on the same line; a
/// target WAL segment that is not there first as pg_rewind says it (Patroni looks for exactly
/// that line to fetch the segment itself), named under `target` as given with `-D`.
pub fn error_lines(e: &RewindError, target: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(name) = missing_segment(e) {
        lines.push(format!(
            "{PROGNAME}: error: could not open file \"{}/pg_wal/{name}\": No such file or \
             directory",
            target.display()
        ));
    }
    lines.push(format!(
        "{PROGNAME}: error: {}",
        failback_common::errors::one_line(e)
    ));
    lines
}

/// The target WAL segment whose absence stopped the rewind, if that is what did.
fn missing_segment(e: &RewindError) -> Option<&str> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(WalReadError::MissingSegment { name, .. }) = c.downcast_ref::<WalReadError>() {
            return Some(name);
        }
        if let Some(RewindError::Wal {
            source: WalReadError::MissingSegment { name, .. },
            ..
        }) = c.downcast_ref::<RewindError>()
        {
            return Some(name);
        }
        cause = c.source();
    }
    None
}

/// The source `--source-server` names: a running server over libpq, `jobs` connections, given
/// up on after `patience` without progress (pg_rewind has no timeout: a stalled source hangs
/// the orchestrator that called it). Warnings are printed as `program: warning: …`.
pub fn open_libpq_source(
    conninfo: &str,
    jobs: usize,
    patience: failback_common::patience::Patience,
    program: &'static str,
) -> Result<Box<dyn Source>, RewindError> {
    use crate::source::libpq::{LibpqOptions, connect};
    let source = connect(LibpqOptions {
        conninfo: conninfo.to_string(),
        jobs,
        patience,
        notice: Some(std::sync::Arc::new(move |note: &str| {
            eprintln!("{program}: warning: {note}")
        })),
    })
    .map_err(|source| RewindError::Source {
        doing: "could not connect to the source server".into(),
        source,
    })?;
    Ok(Box::new(source))
}

fn open_source(source: &SourceArg) -> Result<Box<dyn Source>, RewindError> {
    match source {
        SourceArg::Pgdata(dir) => Ok(Box::new(crate::source::local::LocalSource::new(
            dir.clone(),
        ))),
        SourceArg::Server(conninfo) => open_libpq_source(
            conninfo,
            4,
            failback_common::patience::Patience::DEFAULT,
            PROGNAME,
        ),
    }
}

/// failback run as `pg_rewind`: `argv` is the whole command line, argv[0] included.
pub fn main(argv: Vec<OsString>) -> ExitCode {
    use std::io::IsTerminal;
    let argv0 = argv.first().cloned().unwrap_or_else(|| PROGNAME.into());
    let args = argv.get(1..).unwrap_or_default();
    let inv = match parse(&argv0, args) {
        Ok(Parsed::Help) => {
            print!("{}", help());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("{}", version());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Run(inv)) => inv,
        Err(e) => {
            for l in e.lines {
                eprintln!("{l}");
            }
            return ExitCode::FAILURE;
        }
    };
    let mut opts = inv.options();
    let stderr = std::io::stderr();
    let is_tty = stderr.is_terminal();
    let mut progress = PgRewindProgress::new(stderr.lock(), inv.progress, inv.debug, is_tty);
    let outcome = open_source(&inv.source).and_then(|mut source| {
        if inv.progress && matches!(inv.source, SourceArg::Server(_)) {
            progress.line("connected to server");
        }
        // -R: what the source says the target should connect with, else what was given.
        if opts.write_recovery_conf
            && let Some(c) = source.primary_conninfo()
        {
            opts.primary_conninfo = Some(c);
        }
        crate::rewind::rewind(&opts, source.as_mut(), &mut progress)
    });
    let mut err = progress.into_inner();
    match outcome {
        // pg_rewind prints nothing on stdout, -n's plan included: repmgr reads stdout.
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            for l in error_lines(&e, &inv.target_pgdata) {
                let _ = writeln!(err, "{l}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARGV0: &str = "/usr/pgsql-17/bin/pg_rewind";

    fn run(args: &[&str]) -> Result<Parsed, UsageError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(OsStr::new(ARGV0), &args)
    }

    fn inv(args: &[&str]) -> Invocation {
        match run(args) {
            Ok(Parsed::Run(i)) => *i,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn refused(args: &[&str]) -> Vec<String> {
        match run(args) {
            Err(e) => e.lines,
            other => panic!("{args:?} was accepted: {other:?}"),
        }
    }

    const HINT: &str = "pg_rewind: hint: Try \"pg_rewind --help\" for more information.";

    #[test]
    fn the_name_decides_the_personality() {
        assert!(invoked_as_pg_rewind(OsStr::new("pg_rewind")));
        assert!(invoked_as_pg_rewind(OsStr::new(
            "/usr/lib/postgresql/17/bin/pg_rewind"
        )));
        assert!(!invoked_as_pg_rewind(OsStr::new("failback")));
        assert!(!invoked_as_pg_rewind(OsStr::new("/usr/bin/pg_rewind17")));
        assert!(!invoked_as_pg_rewind(OsStr::new("/pg_rewind/failback")));
    }

    #[test]
    fn help_and_version_only_as_the_first_argument() {
        assert_eq!(run(&["--help"]), Ok(Parsed::Help));
        assert_eq!(run(&["-?"]), Ok(Parsed::Help));
        assert_eq!(run(&["--help", "--bogus"]), Ok(Parsed::Help));
        assert_eq!(run(&["--version"]), Ok(Parsed::Version));
        assert_eq!(run(&["-V", "-D"]), Ok(Parsed::Version));
        // Later, getopt_long accepts --help and --version but pg_rewind has no case for them.
        assert_eq!(refused(&["-D", "x", "--help"]), [HINT]);
        assert_eq!(refused(&["-D", "x", "--version"]), [HINT]);
        assert_eq!(refused(&["-D", "x", "--ver"]), [HINT]);
        // -V and -? are not in "cD:nNPR".
        assert_eq!(
            refused(&["-D", "x", "-V"]),
            [format!("{ARGV0}: invalid option -- 'V'"), HINT.into()]
        );
        assert_eq!(
            refused(&["-n", "-?"]),
            [format!("{ARGV0}: invalid option -- '?'"), HINT.into()]
        );
        assert!(help().contains("--sync-method=METHOD"));
        assert!(version().starts_with("pg_rewind (failback "));
    }

    #[test]
    fn every_option_short_and_long() {
        let full = inv(&[
            "-c",
            "-D",
            "/t",
            "--source-pgdata",
            "/s",
            "-n",
            "-N",
            "-P",
            "--config-file",
            "/etc/pg.conf",
            "--debug",
            "--no-ensure-shutdown",
            "--sync-method",
            "syncfs",
        ]);
        let long = inv(&[
            "--restore-target-wal",
            "--target-pgdata=/t",
            "--source-pgdata=/s",
            "--dry-run",
            "--no-sync",
            "--progress",
            "--config-file=/etc/pg.conf",
            "--debug",
            "--no-ensure-shutdown",
            "--sync-method=syncfs",
        ]);
        assert_eq!(full, long);
        assert_eq!(full.target_pgdata, PathBuf::from("/t"));
        assert_eq!(full.source, SourceArg::Pgdata("/s".into()));
        assert!(full.restore_target_wal && full.dry_run && full.no_sync && full.progress);
        assert!(full.debug && full.no_ensure_shutdown && !full.write_recovery_conf);
        assert_eq!(full.config_file, Some(PathBuf::from("/etc/pg.conf")));
        assert_eq!(full.sync_method, Some(SyncMethod::Syncfs));

        let r = inv(&["-R", "-D", "/t", "--source-server", "host=a port=5432"]);
        assert!(r.write_recovery_conf);
        assert_eq!(r.source, SourceArg::Server("host=a port=5432".into()));
        let r2 = inv(&[
            "--write-recovery-conf",
            "--target-pgdata",
            "/t",
            "--source-server=host=a port=5432",
        ]);
        assert_eq!(r, r2);
        let plain = inv(&["-D", "/t", "--source-pgdata=/s"]);
        assert!(!plain.dry_run && !plain.progress && plain.sync_method.is_none());
        assert_eq!(
            inv(&["-D/t", "--source-pgdata=/s", "--sync-method", "fsync"]).sync_method,
            Some(SyncMethod::Fsync)
        );
    }

    #[test]
    fn short_flags_bundle_and_take_attached_values() {
        let a = inv(&["-nNPc", "-D", "/t", "--source-pgdata=/s"]);
        assert!(a.dry_run && a.no_sync && a.progress && a.restore_target_wal);
        // The value of D is the rest of its cluster, else the next argument.
        assert_eq!(
            inv(&["-nD/t", "--source-pgdata=/s"]).target_pgdata,
            PathBuf::from("/t")
        );
        let b = inv(&["-nD", "/t", "--source-pgdata=/s"]);
        assert!(b.dry_run);
        assert_eq!(b.target_pgdata, PathBuf::from("/t"));
        // Whatever the next argument looks like.
        assert_eq!(
            inv(&["-D", "-n", "--source-pgdata=/s"]).target_pgdata,
            PathBuf::from("-n")
        );
        assert_eq!(
            inv(&["--target-pgdata", "--dry-run", "--source-pgdata=/s"]).target_pgdata,
            PathBuf::from("--dry-run")
        );
        // An empty --x= value is a value.
        assert_eq!(
            inv(&["--target-pgdata=", "--source-pgdata=/s"]).target_pgdata,
            PathBuf::new()
        );
        // The last of a kind wins.
        assert_eq!(
            inv(&["-D/a", "-D/b", "--source-pgdata=/s"]).target_pgdata,
            PathBuf::from("/b")
        );
    }

    #[test]
    fn long_options_abbreviate_to_a_unique_prefix() {
        let a = inv(&[
            "--target=/t",
            "--source-p",
            "/s",
            "--no-s",
            "--prog",
            "--deb",
        ]);
        assert!(a.no_sync && a.progress && a.debug);
        assert_eq!(a.target_pgdata, PathBuf::from("/t"));
        assert_eq!(
            refused(&["--source"]),
            [
                format!(
                    "{ARGV0}: option '--source' is ambiguous; possibilities: '--source-pgdata' \
                     '--source-server'"
                ),
                HINT.into()
            ]
        );
        assert_eq!(
            refused(&["--no"]),
            [
                format!(
                    "{ARGV0}: option '--no' is ambiguous; possibilities: '--no-ensure-shutdown' \
                     '--no-sync'"
                ),
                HINT.into()
            ]
        );
        assert_eq!(
            refused(&["--s=1"])[0],
            format!(
                "{ARGV0}: option '--s=1' is ambiguous; possibilities: '--source-pgdata' \
                 '--source-server' '--sync-method'"
            )
        );
    }

    #[test]
    fn getopt_complaints_name_argv0_and_the_option() {
        assert_eq!(
            refused(&["--foo"]),
            [format!("{ARGV0}: unrecognized option '--foo'"), HINT.into()]
        );
        assert_eq!(
            refused(&["--foo=bar"])[0],
            format!("{ARGV0}: unrecognized option '--foo=bar'")
        );
        assert_eq!(
            refused(&["-nQ"])[0],
            format!("{ARGV0}: invalid option -- 'Q'")
        );
        assert_eq!(
            refused(&["-n", "-D"])[0],
            format!("{ARGV0}: option requires an argument -- 'D'")
        );
        assert_eq!(
            refused(&["--target-pgdata"])[0],
            format!("{ARGV0}: option '--target-pgdata' requires an argument")
        );
        // An abbreviation is named in full.
        assert_eq!(
            refused(&["--targ"])[0],
            format!("{ARGV0}: option '--target-pgdata' requires an argument")
        );
        assert_eq!(
            refused(&["--dry-run="])[0],
            format!("{ARGV0}: option '--dry-run' doesn't allow an argument")
        );
        assert_eq!(
            refused(&["--debug=1"])[0],
            format!("{ARGV0}: option '--debug' doesn't allow an argument")
        );
        // The first bad option stops the scan, before the checks of what goes together.
        assert_eq!(refused(&["--bogus", "-x"]).len(), 2);
        assert_eq!(
            refused(&["-D", "/t", "--source-pgdata=/s", "--sync-method=fdatasync"]),
            ["pg_rewind: error: unrecognized sync method: fdatasync"]
        );
    }

    #[test]
    fn pg_rewinds_own_checks_in_its_order() {
        let err = |m: &str| vec![format!("pg_rewind: error: {m}"), HINT.to_string()];
        assert_eq!(
            refused(&[]),
            err("no source specified (--source-pgdata or --source-server)")
        );
        assert_eq!(
            refused(&["-D", "x"]),
            err("no source specified (--source-pgdata or --source-server)")
        );
        assert_eq!(
            refused(&["--source-pgdata=a", "--source-server=b"]),
            err("only one of --source-pgdata or --source-server can be specified")
        );
        assert_eq!(
            refused(&["--source-pgdata=a", "extra"]),
            err("no target data directory specified (--target-pgdata)")
        );
        assert_eq!(
            refused(&["-R", "-D", "x", "--source-pgdata=a"]),
            err(
                "no source server information (--source-server) specified for \
                 --write-recovery-conf"
            )
        );
        // Operands are moved after the options, then refused: the first one is named.
        assert_eq!(
            refused(&["x", "-D", "y", "--source-pgdata=z", "w"]),
            err("too many command-line arguments (first is \"x\")")
        );
        assert_eq!(
            refused(&["-D", "y", "--source-pgdata=z", "--", "-n"]),
            err("too many command-line arguments (first is \"-n\")")
        );
        assert_eq!(
            refused(&["-D", "y", "--source-pgdata=z", "-"]),
            err("too many command-line arguments (first is \"-\")")
        );
    }

    #[test]
    fn the_invocation_becomes_failbacks_options() {
        let o = inv(&["-nNc", "-D", "/t", "--source-pgdata=/s", "--config-file=/c"]).options();
        assert_eq!(o.target, PathBuf::from("/t"));
        assert!(o.dry_run && o.no_sync && o.restore_target_wal);
        assert_eq!(o.config_file, Some(PathBuf::from("/c")));
        assert!(!o.resync && o.pg_bindir.is_none() && o.primary_conninfo.is_none());
        assert_eq!(o.mode, crate::rewind::Mode::Auto);
        let r = inv(&["-R", "-D", "/t", "--source-server=host=a"]).options();
        assert!(r.write_recovery_conf);
        assert_eq!(r.primary_conninfo.as_deref(), Some("host=a"));
    }

    #[test]
    fn progress_lines_are_pg_rewinds() {
        assert_eq!(
            progress_line(0, 10 * 1024 * 1024),
            "    0/10240 kB (0%) copied"
        );
        assert_eq!(
            progress_line(5 * 1024 * 1024, 10 * 1024 * 1024),
            " 5120/10240 kB (50%) copied"
        );
        assert_eq!(progress_line(2048, 1024), "2/2 kB (100%) copied");
        assert_eq!(progress_line(0, 0), "0/0 kB (0%) copied");
    }

    fn printed(
        show_progress: bool,
        debug: bool,
        tty: bool,
        f: impl FnOnce(&mut dyn Progress),
    ) -> String {
        let mut p = PgRewindProgress::new(Vec::new(), show_progress, debug, tty);
        p.clock = || 7;
        f(&mut p);
        String::from_utf8(p.into_inner()).unwrap()
    }

    fn a_rewind(p: &mut dyn Progress) {
        p.info("servers diverged at WAL location 0/3019068 on timeline 1");
        p.phase("reading WAL in target");
        p.phase("reading source file list");
        p.phase("reading target file list");
        p.info("need to copy 1 MB (total source directory size is 40 MB)");
        p.debug("base/5/16384 (copy)");
        p.phase("copying");
        p.total(2048 * 1024);
        p.advance(1024 * 1024);
        p.advance(1024 * 1024);
        p.phase("syncing target data directory");
        p.phase("creating backup label and updating control file");
        p.info("Done!");
    }

    #[test]
    fn without_p_only_pg_rewinds_unconditional_lines() {
        assert_eq!(
            printed(false, false, false, a_rewind),
            "pg_rewind: servers diverged at WAL location 0/3019068 on timeline 1\n\
             pg_rewind: Done!\n"
        );
    }

    #[test]
    fn with_p_the_phases_and_the_copy_lines() {
        // The clock stands still: one line during the copy, the last one after it.
        assert_eq!(
            printed(true, true, false, a_rewind),
            "pg_rewind: servers diverged at WAL location 0/3019068 on timeline 1\n\
             pg_rewind: reading WAL in target\n\
             pg_rewind: reading source file list\n\
             pg_rewind: reading target file list\n\
             pg_rewind: need to copy 1 MB (total source directory size is 40 MB)\n\
             pg_rewind: base/5/16384 (copy)\n\
             1024/2048 kB (50%) copied\n\
             2048/2048 kB (100%) copied\n\
             pg_rewind: syncing target data directory\n\
             pg_rewind: creating backup label and updating control file\n\
             pg_rewind: Done!\n"
        );
        // On a terminal the line is redrawn in place until the last.
        let tty = printed(true, false, true, a_rewind);
        assert!(tty.contains("1024/2048 kB (50%) copied\r2048/2048 kB (100%) copied\n"));
    }

    #[test]
    fn a_missing_target_segment_is_said_as_pg_rewind_says_it() {
        let e = RewindError::Wal {
            doing: "could not read the target's latest checkpoint record".into(),
            source: WalReadError::MissingSegment {
                name: "000000050000000000000003".into(),
                lsn: failback_common::Lsn(0x3019068),
                dir: "/data/pg_wal".into(),
            },
        };
        let lines = error_lines(&e, Path::new("/data"));
        assert_eq!(
            lines[0],
            "pg_rewind: error: could not open file \"/data/pg_wal/000000050000000000000003\": \
             No such file or directory"
        );
        assert!(lines[1].starts_with(
            "pg_rewind: error: could not read the target's latest checkpoint record: could not \
             find WAL segment 000000050000000000000003"
        ));
        // Also when the rewind had already changed the target.
        let unfinished = RewindError::Unfinished {
            target: "/data".into(),
            cause: Box::new(e),
        };
        assert_eq!(error_lines(&unfinished, Path::new("/data")).len(), 2);
        let other = error_lines(&RewindError::refused("no"), Path::new("/data"));
        assert_eq!(other, ["pg_rewind: error: no"]);
    }
}
