//! `failback`: brings an old PostgreSQL primary back as a standby of the new primary.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use failback_client::cli::{Certs, Cli, Command, Inspect, RewindArgs};
use failback_client::error::{RewindError, exit};
use failback_client::inspect;
use failback_client::pg_rewind_cli;
use failback_client::source::Source;
use failback_common::compress_choice::CompressPolicy;
use failback_common::errors;
use failback_common::patience::Patience;
use failback_common::{Lsn, TimeLineId};

/// An argument that does not make a rewind: exit status 2, nothing looked at or changed.
fn usage(message: impl Into<String>) -> RewindError {
    RewindError::Usage(message.into())
}

fn read_secret(path: &std::path::Path, what: &str) -> Result<Vec<u8>, RewindError> {
    std::fs::read(path).map_err(|e| usage(format!("could not read {what} {}: {e}", path.display())))
}

fn open_source(a: &RewindArgs) -> Result<Box<dyn Source>, RewindError> {
    use failback_client::source::remote::RemoteOptions;
    let patience = a.timeout.map_or(Patience::DEFAULT, |t| Patience {
        timeout: std::time::Duration::from_secs(u64::from(t)),
    });
    // clap's `requires` cannot say "--source" while --source-server is also allowed: said here.
    let failbackd_only = a.ca.is_some()
        || a.server_fingerprint.is_some()
        || a.cert.is_some()
        || a.token_file.is_some()
        || a.connections.is_some()
        || a.compress.is_some();
    if let Some(conninfo) = &a.source_server {
        if failbackd_only {
            return Err(usage(
                "--ca, --server-fingerprint, --cert, --key, --token-file, --connections and \
                 --compress are for a failbackd source (--source <URL>); with --source-server, TLS is set in the \
                 connection string (sslmode, sslrootcert, sslcert, sslkey)",
            ));
        }
        return failback_client::pg_rewind_cli::open_libpq_source(
            conninfo,
            usize::from(a.jobs.unwrap_or(4)),
            patience,
            "failback",
        );
    }
    if let Some(dir) = &a.source_pgdata {
        // clap's `requires` does not fire here (the flags are also in a conflict), so say it.
        if failbackd_only || a.jobs.is_some() || a.timeout.is_some() {
            return Err(usage(
                "--ca, --server-fingerprint, --cert, --key, --token-file, --jobs, \
                 --connections, --compress and --timeout are for a failbackd source (--source <URL>) or a running server \
                 (--source-server <CONNSTR>)",
            ));
        }
        return Ok(Box::new(failback_client::source::local::LocalSource::new(
            dir.clone(),
        )));
    }
    let url = a
        .source
        .clone()
        .ok_or_else(|| usage("give --source-pgdata, --source-server or --source"))?;
    let token = match &a.token_file {
        None => None,
        Some(f) => {
            let t = String::from_utf8(read_secret(f, "token file")?)
                .map_err(|_| usage(format!("token file {} is not UTF-8", f.display())))?;
            Some(t.trim().to_string())
        }
    };
    let ca =
        a.ca.as_deref()
            .map(|f| read_secret(f, "CA certificate"))
            .transpose()?;
    let identity = match (&a.cert, &a.key) {
        (Some(c), Some(k)) => Some((
            read_secret(c, "client certificate")?,
            read_secret(k, "client key")?,
        )),
        _ => None,
    };
    let url = failback_transport::url::SourceUrl::parse(&url)
        .map_err(|e| usage(format!("--source {url}: {e}")))?;
    let opts = RemoteOptions {
        url,
        ca,
        identity,
        token,
        jobs: usize::from(a.jobs.unwrap_or(4)),
        connections: usize::from(a.connections.unwrap_or(1)),
        compression: a.compress.unwrap_or(CompressPolicy::DEFAULT),
        patience,
        // A stall the rewind rides out is still worth knowing about.
        notice: Some(std::sync::Arc::new(|note: &str| {
            eprintln!("failback: warning: {note}")
        })),
    };
    failback_client::certs::connect(opts, a.server_fingerprint).map_err(|source| {
        RewindError::Source {
            doing: "could not connect to failbackd".into(),
            source,
        }
    })
}

/// `failback rewind`: the exit status says whether to run it again (see
/// [`failback_client::error::exit`]).
fn rewind(a: RewindArgs, resync: bool) -> Result<ExitCode> {
    use failback_client::rewind::{RewindOptions, rewind};
    let report_path = a.report.clone();
    let outcome = (|| {
        let mut source = open_source(&a)?;
        if let Some(rate) = a.max_rate {
            source = Box::new(
                failback_client::source::rate::RateLimited::new(source, rate)
                    .ok_or_else(|| usage("--max-rate must be at least 1 byte per second"))?,
            );
        }
        if resync && a.mode.is_some() {
            return Err(usage(
                "--mode does not apply to failback resync, which compares every relation file \
                 with the source's",
            ));
        }
        let opts = RewindOptions {
            mode: a.mode.unwrap_or_default(),
            resync,
            target: a.target_pgdata,
            write_recovery_conf: a.write_recovery_conf,
            primary_conninfo: a.primary_conninfo,
            dry_run: a.dry_run,
            no_sync: a.no_sync,
            restore_target_wal: a.restore_target_wal,
            config_file: a.config_file,
            no_ensure_shutdown: a.no_ensure_shutdown,
            sync_method: a.sync_method,
            debug: a.debug,
            pg_bindir: a.pg_bindir,
        };
        let mut progress = failback_client::progress::Terminal::new(a.progress, a.debug);
        let outcome = rewind(&opts, source.as_mut(), &mut progress)?;
        Ok::<_, RewindError>((opts.dry_run, outcome))
    })();
    let (dry_run, outcome) = match outcome {
        Ok(done) => done,
        Err(e) => {
            eprintln!("{}", errors::error_message("failback", &e));
            return Ok(ExitCode::from(e.kind().exit_code()));
        }
    };
    if dry_run && let Some(plan) = &outcome.plan {
        println!("{:<10} {:>8} {:>16}", "action", "files", "bytes");
        for (action, t) in plan.totals() {
            println!("{action:<10} {:>8} {:>16}", t.files, t.bytes);
        }
        println!("{:<10} {:>8} {:>16}", "fetch", "", plan.fetch_bytes());
    }
    if let Some(path) = report_path {
        std::fs::write(&path, serde_json::to_string_pretty(&outcome.report)? + "\n")
            .with_context(|| format!("could not write report {}", path.display()))?;
    }
    Ok(ExitCode::from(exit::DONE))
}

fn inspect_wal(
    pgdata: &std::path::Path,
    start: Option<Lsn>,
    end: Option<Lsn>,
    timeline: Option<TimeLineId>,
    json: bool,
) -> Result<()> {
    use failback_datadir::wal::{WalEnd, WalReader};
    use std::io::Write;
    let control = inspect::read_control_file(pgdata)?;
    let tli = timeline.unwrap_or_else(|| control.timeline_for_rewind());
    let history = inspect::history_of(pgdata, tli)?;
    let params = failback_common::wal::WalParams::new(control.major, control.xlog_seg_size)
        .with_system_identifier(control.system_identifier);
    let mut reader = WalReader::new(pgdata, &history, params, None);
    let (start, at_page) = match start {
        Some(s) => (s, false),
        None => {
            let segno = reader
                .oldest_segment()
                .context("no WAL segment of this timeline's history in pg_wal")?;
            (
                failback_common::lsn::segment_start(segno, control.xlog_seg_size),
                true,
            )
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write_err = None;
    let stop = reader.walk(start, at_page, end, |r| {
        let line = if json {
            inspect::wal_record_json(r).to_string()
        } else {
            r.waldump_line().to_string()
        };
        if write_err.is_none()
            && let Err(e) = writeln!(out, "{line}")
        {
            write_err = Some(e);
        }
    })?;
    out.flush()?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    match stop {
        WalEnd::Reached(l) => eprintln!("failback: reached {l}"),
        WalEnd::EndOfWal { lsn, error } => eprintln!("failback: WAL ends at {lsn}: {error}"),
        WalEnd::NoMoreSegments { lsn, name } => {
            eprintln!("failback: WAL ends at {lsn}: segment {name} is not in pg_wal")
        }
    }
    Ok(())
}

/// `failback status`: the journal of an unfinished rewind, in words.
fn status(target: &std::path::Path) -> Result<ExitCode> {
    let Some(st) = failback_client::target::Target::unfinished(target)? else {
        println!("no unfinished rewind in {}", target.display());
        return Ok(ExitCode::from(exit::DONE));
    };
    let h = &st.header;
    println!("an unfinished rewind of {}", target.display());
    println!("  phase:                   {}", st.phase.name());
    println!(
        "  diverged at:             {} on timeline {}",
        h.divergence, h.divergence_tli
    );
    match h.window_start {
        Some(start) => {
            println!("  source's backup window:  began at {start} (a run opens a new one)")
        }
        None => println!("  source:                  shut down when planned"),
    }
    println!("  source system:           {}", h.system_identifier);
    println!("  planned to fetch:        {} bytes", h.plan.fetch_bytes());
    println!(
        "  written and synced:      {} bytes (a run resumes after them)",
        st.done_bytes()
    );
    println!(
        "PostgreSQL will not start on it until it is finished: run failback rewind -D {} again, \
         from the same new primary",
        target.display()
    );
    Ok(ExitCode::from(exit::UNFINISHED))
}

/// `failback certs`: what it made and where each file goes, or a fingerprint.
fn certs(c: Certs) -> Result<()> {
    match c {
        Certs::New {
            dir,
            server_names,
            client_name,
            days,
            force,
        } => {
            let made = failback_client::certs::NewCerts {
                dir,
                server_names,
                client_name,
                days,
                force,
            }
            .make()?;
            println!("{}", made.summary);
        }
        Certs::Fingerprint { file } => {
            println!("{}", failback_client::certs::fingerprint(&file)?)
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Status { target_pgdata } => return status(&target_pgdata),
        Command::Certs(c) => certs(c)?,
        Command::Rewind(a) => return rewind(*a, false),
        Command::Resync(a) => return rewind(*a, true),
        Command::Inspect(Inspect::Wal {
            pgdata,
            start,
            end,
            timeline,
            json,
        }) => inspect_wal(&pgdata, start, end, timeline, json)?,
        Command::Inspect(Inspect::Control { pgdata, json }) => {
            let c = inspect::read_control_file(&pgdata)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", inspect::control_text(&c));
            }
        }
        Command::Inspect(Inspect::History {
            file,
            timeline,
            json,
        }) => {
            let h = inspect::read_history(&file, timeline)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                print!("{}", inspect::history_text(&h));
            }
        }
    }
    Ok(ExitCode::from(exit::DONE))
}

fn main() -> ExitCode {
    // Installed or linked under the name pg_rewind, failback is pg_rewind: its options, exit
    // statuses and stderr lines, for the orchestrators that run it by that name.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .first()
        .is_some_and(|a| pg_rewind_cli::invoked_as_pg_rewind(a))
    {
        return pg_rewind_cli::main(argv);
    }
    match run(Cli::parse_from(argv)) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain, outermost first, so the user sees both what failed and why.
            eprintln!("{}", errors::error_message("failback", e.as_ref()));
            ExitCode::from(exit::FAILED)
        }
    }
}
