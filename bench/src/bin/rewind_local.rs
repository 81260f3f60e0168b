//! failback rewind vs pg_rewind, both from a local shut-down source, on the same diverged pair.
//!
//! The pair is [`failback_bench::pair::DivergedPair`] (pgbench scale 100 by default, 1 % of the
//! accounts changed on each side). The old primary's directory is copied once per tool, so each
//! rewinds the very same target. Reported per tool: wall time, CPU time, peak memory and the
//! bytes it read and wrote through the kernel.
//!
//! `cargo run --release -p failback-bench --bin rewind_local -- [--scale N] [--rounds N]`

use std::process::Command;

use failback_bench::args::{arg, done};
use failback_bench::measure;
use failback_bench::pair::{DivergedPair, copy_dir, workspace_binary};
use failback_tests::{binaries, user};

fn main() {
    let scale = arg("--scale", 100u32);
    let rounds = arg("--rounds", 2u32);
    done();
    let failback = workspace_binary("failback", None);
    let pair = DivergedPair::build(scale, 1);
    let (primary, source) = (&pair.old, &pair.new);

    let work = primary.base_dir().join("bench");
    user::create_dir(&work);
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
