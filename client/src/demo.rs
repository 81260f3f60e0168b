//! `failback demo`: a whole failback on throwaway clusters, to see the tool work in a minute.
//!
//! A primary and a streaming standby are created; the standby is promoted (the failover), both
//! sides are written to (the old primary did not know it had been replaced), the old primary is
//! rewound from the new one, started as its standby, and checked: every table on both sides must
//! hold the same rows. Everything lives in temporary directories and is removed at the end.
//!
//! Clusters are managed by the project's test bed (`failback-tests`), so the demo and the tests
//! fail over in one way.

use std::time::Instant;

use anyhow::{Result, bail};
use failback_common::PgMajor;
use failback_tests::{Cluster, Fingerprint, StopMode};

use crate::progress::Progress;
use crate::rewind::{RewindOptions, rewind};
use crate::source::local::LocalSource;

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
pub fn run(major: PgMajor, progress: &mut dyn Progress) -> Result<()> {
    let started = Instant::now();
    say(&format!(
        "creating a PostgreSQL {major} primary with data checksums, and a pgbench database"
    ));
    let mut primary = Cluster::start_new(major, "old-primary");
    primary.pgbench_init(2);
    primary.execute(
        "CREATE TABLE accounts_log (id bigint PRIMARY KEY, note text);
         INSERT INTO accounts_log SELECT g, 'before the failover' FROM generate_series(1, 5000) g",
    );

    say("creating a streaming standby and letting it catch up");
    let standby = primary.create_standby("new-primary");
    standby.wait_for_catchup(&primary);

    say("failover: promoting the standby; it is now the new primary");
    let tli = standby.promote();
    println!("    the new primary runs on timeline {tli}");

    say("split brain: both sides take writes the other never sees");
    primary.execute(
        "UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid % 50 = 0;
         INSERT INTO accounts_log SELECT g, 'written on the old primary' FROM generate_series(5001, 6000) g;
         DELETE FROM accounts_log WHERE id <= 100;
         CREATE TABLE only_on_old (x int); INSERT INTO only_on_old VALUES (1)",
    );
    standby.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 70 = 0;
         INSERT INTO accounts_log SELECT g, 'written on the new primary' FROM generate_series(5001, 7000) g;
         CREATE TABLE only_on_new (x int); INSERT INTO only_on_new SELECT generate_series(1, 100)",
    );

    say("stopping both servers (failback reads the new primary's directory directly here)");
    primary.stop(StopMode::Fast);
    let mut new_primary = standby;
    new_primary.stop(StopMode::Fast);

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
    let (report, _) = rewind(&opts, &mut source, progress)?;
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
