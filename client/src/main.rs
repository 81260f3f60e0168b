//! `failback`: brings an old PostgreSQL primary back as a standby of the new primary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use failback_client::inspect;
use failback_common::TimeLineId;

#[derive(Parser)]
#[command(name = "failback", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what failback sees: the control file, timeline histories, WAL records.
    #[command(subcommand)]
    Inspect(Inspect),
}

#[derive(Subcommand)]
enum Inspect {
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
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, outermost first, so the user sees both what failed and why.
            eprintln!("failback: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
