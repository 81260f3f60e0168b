//! The command line of `failback`, as a library so that its man page and shell completions
//! are generated from the same definitions the binary parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use failback_common::compress_choice::CompressPolicy;
use failback_common::{Lsn, TimeLineId};
use failback_transport::tls::Fingerprint;

use crate::rewind::Mode;

#[derive(Parser)]
#[command(name = "failback", version = failback_common::long_version!(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Bring an old primary (the target) back in line with the new primary (the source).
    Rewind(Box<RewindArgs>),
    /// Bring any node in line with the source, whatever its state: a standby that fell behind
    /// past what the primary keeps, a node restored from an old backup, a cluster with damaged
    /// pages. Every relation file is compared with the source's by chunk hashes and only what
    /// differs is copied; the flags are rewind's (without --mode).
    Resync(Box<RewindArgs>),
    /// Show what failback sees: the control file, timeline histories, WAL records.
    #[command(subcommand)]
    Inspect(Inspect),
    /// Make TLS certificates for failbackd and failback, or print a certificate's fingerprint.
    #[command(subcommand)]
    Certs(Certs),
    /// Say whether a rewind of a data directory is unfinished, and how far it got (exit status
    /// 0: none is; 3: one is, run `failback rewind` again to finish it).
    Status {
        /// The data directory.
        #[arg(short = 'D', long = "target-pgdata", value_name = "DIR")]
        target_pgdata: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct RewindArgs {
    /// The data directory to rewind (the old primary, shut down).
    #[arg(short = 'D', long = "target-pgdata", value_name = "DIR")]
    pub target_pgdata: PathBuf,
    /// A shut-down data directory of the new primary (or of a standby of it) on this machine.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present_any = ["source", "source_server"],
        conflicts_with_all = ["source", "source_server"]
    )]
    pub source_pgdata: Option<PathBuf>,
    /// A running PostgreSQL server (the new primary, or a standby of it), reached over libpq
    /// as pg_rewind reaches it: a connection string or URI, with the PG* environment, pgpass
    /// and service files. A role that is not superuser needs EXECUTE on pg_ls_dir,
    /// pg_stat_file and both pg_read_binary_file.
    #[arg(long, value_name = "CONNSTR", conflicts_with = "source")]
    pub source_server: Option<String>,
    /// failbackd serving the new primary's data directory (shut down, or running when
    /// failbackd has --pg-conn): grpc://HOST:PORT, or grpcs://HOST:PORT or quic://HOST:PORT
    /// with --ca.
    #[arg(long, value_name = "URL")]
    pub source: Option<String>,
    /// How each side's changes since the divergence are found: auto (from its WAL where it has
    /// it from the divergence on, else by comparing chunk hashes of its relation files), wal
    /// (WAL only: refuse without it), delta (chunk hashes of every relation file).
    /// [default: auto]
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<Mode>,
    /// PEM CA certificate that failbackd's TLS certificate must chain to (grpcs://, quic://),
    /// as failback certs new makes it (ca.crt); or failbackd's own certificate itself, such as
    /// a self-signed one from openssl req -x509, which is then trusted as it is, whatever its
    /// names and CA flag (its dates still count).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Trust failbackd by its certificate's SHA-256 instead of a CA (grpcs://, quic://):
    /// sha256:HEX, as `failback certs fingerprint server.crt` prints it where failbackd's
    /// certificate is. The certificate's dates and the handshake's signature are still
    /// checked; its names are not.
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "ca",
          value_parser = parse_fingerprint)]
    pub server_fingerprint: Option<Fingerprint>,
    /// PEM client certificate chain, for a failbackd started with --client-ca.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// File holding the bearer token failbackd expects.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Requests to failbackd in flight at once, or connections reading file data from
    /// --source-server [default: 4].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,
    /// Connections to failbackd; the requests in flight (--jobs) are spread over them
    /// [default: 1].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: Option<u16>,
    /// Compression of file data from failbackd: a zstd level (1-9), none, or auto (a copy of
    /// 256 MiB or more first sends one request stored and one at zstd level 1, alone, and
    /// goes on with whichever delivered more bytes a second; smaller copies use level 1)
    /// [default: auto; higher levels send fewer bytes for more of failbackd's CPU].
    #[arg(long, value_name = "auto|LEVEL|none", value_parser = parse_compress)]
    pub compress: Option<CompressPolicy>,
    /// How long the source (failbackd, or --source-server) may make no progress (no answer, a
    /// broken or silent connection) before the rewind stops; failures within it are retried
    /// with back-off on a fresh connection. In seconds [default: 60].
    #[arg(long, value_name = "SECONDS",
          value_parser = clap::value_parser!(u32).range(1..=86400))]
    pub timeout: Option<u32>,
    /// Hold the data fetched from the source to this average rate, in bytes per second:
    /// 50000000, 10M (MiB/s; also K, G), 200Mbit (also kbit, Gbit). Any source.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_rate: Option<u64>,
    /// Write standby.signal and primary_conninfo, so the target starts as a standby.
    #[arg(short = 'R', long)]
    pub write_recovery_conf: bool,
    /// The primary_conninfo -R writes. By default from --source-server's connection (as
    /// pg_rewind writes it), or from failbackd (the host it was reached at, the port its
    /// server listens on, the user of its --pg-conn); a local source needs it.
    #[arg(long, value_name = "CONNINFO")]
    pub primary_conninfo: Option<String>,
    /// Change nothing; print what would be done.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Do not wait for the changes to be written safely to disk.
    #[arg(short = 'N', long)]
    pub no_sync: bool,
    /// Show progress.
    #[arg(short = 'P', long)]
    pub progress: bool,
    /// Fetch missing target WAL from the archive with the target's restore_command.
    #[arg(short = 'c', long)]
    pub restore_target_wal: bool,
    /// The target's configuration file, when it is not in the data directory.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Refuse a target that was not shut down cleanly instead of running crash recovery.
    #[arg(long)]
    pub no_ensure_shutdown: bool,
    /// How to flush the target to disk at the end.
    #[arg(long, value_enum, value_name = "METHOD")]
    pub sync_method: Option<crate::fsutil::SyncMethod>,
    /// Print the plan: a line per file and its blocks.
    #[arg(long)]
    pub debug: bool,
    /// Write a JSON report: divergence, checkpoint, bytes per action, time per phase.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Directory of the target version's `postgres` binary (crash recovery, -c).
    #[arg(long, value_name = "DIR")]
    pub pg_bindir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Certs {
    /// Make a CA (ca.crt, ca.key), a certificate for failbackd (server.crt, server.key) naming
    /// every --server-name, and one for failback (client.crt, client.key) in DIR, and say
    /// which file goes to which host and flag. Keys are written readable by their owner only.
    New {
        /// Where to write the six files (made if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A host name or address clients dial failbackd by (the host in --source); repeat it
        /// for each, e.g. both nodes of a pair, so one certificate serves on either.
        #[arg(long = "server-name", value_name = "HOST|IP", required = true)]
        server_names: Vec<String>,
        /// The client certificate's name (its CN).
        #[arg(long, value_name = "NAME", default_value = "failback")]
        client_name: String,
        /// How many days the certificates are valid (from yesterday, for clocks that differ).
        #[arg(long, value_name = "N", default_value_t = 3650,
              value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Replace files already in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Print the SHA-256 fingerprint of a PEM certificate (the first, in a chain), as
    /// --server-fingerprint takes it.
    Fingerprint {
        /// The certificate, e.g. failbackd's --tls-cert.
        file: PathBuf,
    },
}

pub fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    s.parse()
}

#[derive(Subcommand)]
pub enum Inspect {
    /// The control file (global/pg_control) of a data directory.
    Control {
        /// The data directory.
        #[arg(short = 'D', long = "pgdata", value_name = "DIR")]
        pgdata: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A timeline history file (pg_wal/0000000N.history).
    History {
        file: PathBuf,
        /// The file's own timeline, when its name does not say.
        #[arg(long)]
        timeline: Option<TimeLineId>,
        #[arg(long)]
        json: bool,
    },
    /// WAL records of a data directory, in pg_waldump's layout, following timeline switches.
    Wal {
        #[arg(short = 'D', long = "pgdata", value_name = "DIR")]
        pgdata: PathBuf,
        /// First record (default: the start of the oldest segment in pg_wal).
        #[arg(long, value_name = "LSN")]
        start: Option<Lsn>,
        /// Stop before the record at or past this position (default: the end of valid WAL).
        #[arg(long, value_name = "LSN")]
        end: Option<Lsn>,
        /// The timeline whose history to follow (default: the control file's).
        #[arg(long, value_name = "N")]
        timeline: Option<TimeLineId>,
        /// One JSON object per record instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn parse_compress(s: &str) -> Result<CompressPolicy, String> {
    use failback_common::wire::Compression;
    use failback_proto::limits::MAX_ZSTD_LEVEL;
    match s {
        "auto" => return Ok(CompressPolicy::AUTO),
        "none" => return Ok(CompressPolicy::Fixed(Compression::None)),
        _ => {}
    }
    match s.parse::<i32>() {
        Ok(l) if (1..=MAX_ZSTD_LEVEL).contains(&l) => {
            Ok(CompressPolicy::Fixed(Compression::Zstd(l)))
        }
        _ => Err(format!(
            "{s:?} is neither auto, a zstd level (1-{MAX_ZSTD_LEVEL}: failbackd compresses at \
             {MAX_ZSTD_LEVEL} at most) nor none"
        )),
    }
}

pub fn parse_rate(s: &str) -> Result<u64, String> {
    failback_common::ratelimit::parse_rate(s).map_err(|e| e.to_string())
}
