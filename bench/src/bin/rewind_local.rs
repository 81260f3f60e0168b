//! failback rewind vs pg_rewind, both from a local shut-down source, on the same diverged pair.
//!
//! A PostgreSQL 15 primary with a pgbench database (scale 100 by default, about 1.5 GB) gets a
//! streaming standby; the standby is promoted; then about 1 % of the accounts are updated on each
//! side (a contiguous range on each, so the change is 1 % of the pages too), with some history
//! rows. Both are stopped cleanly and the old primary's directory is copied once per tool, so
//! each rewinds the very same target. Reported per tool: wall time, CPU time, peak memory and
//! the bytes it read and wrote through the kernel.
//!
//! `cargo run --release -p failback-bench --bin rewind_local -- [--scale N] [--rounds N]`

use std::path::{Path, PathBuf};
use std::process::Command;

use failback_bench::measure;
use failback_tests::{Cluster, PgMajor, StopMode, binaries, user};

fn arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn failback_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let p = exe.parent().unwrap().join("failback");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --release -p failback-client)",
        p.display()
    );
    p
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

fn main() {
    let scale = arg("--scale", 100);
    let rounds = arg("--rounds", 2);
    let accounts = u64::from(scale) * 100_000;
    let changed = accounts / 100;
    eprintln!(
        "building a diverged pair: pgbench scale {scale}, {changed} accounts changed on each side"
    );
    let mut primary = Cluster::start_new(PgMajor::V15, "bench-old-primary");
    let out = primary.pgbench_init(scale);
    assert!(out.status.success(), "pgbench -i failed");
    primary.execute("CHECKPOINT");
    let standby = primary.create_standby("bench-new-primary");
    standby.wait_for_catchup(&primary);
    standby.promote();
    primary.execute(&format!(
        "UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid BETWEEN 1 AND {changed};
         INSERT INTO pgbench_history SELECT 1, 1, g, -1, now() FROM generate_series(1, 10000) g"
    ));
    let lo = accounts / 2;
    standby.execute(&format!(
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN {lo} AND {};
         INSERT INTO pgbench_history SELECT 2, 2, g, 1, now() FROM generate_series(1, 10000) g",
        lo + changed
    ));
    primary.stop(StopMode::Fast);
    let mut source = standby;
    source.stop(StopMode::Fast);

    let work = primary.base_dir().join("bench");
    user::create_dir(&work);
    let failback = failback_binary();
    println!(
        "failback rewind vs pg_rewind --source-pgdata, PostgreSQL 15, pgbench scale {scale}, 1 % of accounts changed on each side"
    );
    println!("{}", measure::header());
    for round in 1..=rounds {
        for tool in ["failback", "pg_rewind"] {
            let target = work.join(format!("target-{tool}"));
            copy_dir(&primary.data_dir(), &target);
            let cost = if tool == "failback" {
                measure::run(
                    Command::new(&failback)
                        .arg("rewind")
                        .arg("-D")
                        .arg(&target)
                        .arg("--source-pgdata")
                        .arg(source.data_dir()),
                )
            } else {
                measure::run(
                    user::command(binaries::pg_rewind())
                        .arg("-D")
                        .arg(&target)
                        .arg("--source-pgdata")
                        .arg(source.data_dir()),
                )
            };
            assert_eq!(cost.exit_code, 0, "{tool} failed:\n{}", cost.stderr);
            println!(
                "{}",
                measure::row(&format!("{tool} (round {round})"), &cost)
            );
            let _ = std::fs::remove_dir_all(&target);
        }
    }
}
