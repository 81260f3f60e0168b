//! A diverged primary/standby pair at a pgbench scale, the common input of the end-to-end
//! rewind benchmarks (`rewind_local`, `rewind_pair`).
//!
//! A PostgreSQL 15 primary with a pgbench database (scale 100 is about 1.5 GB) gets a streaming
//! standby; the standby is promoted; then a share of the accounts (1 % unless a benchmark asks
//! for more) is updated on each side (a contiguous range on each, so the change is that share
//! of the pages too), with some history rows.
//! Both are stopped cleanly: the old primary is the rewind's target, the promoted standby its
//! source.

use std::path::{Path, PathBuf};
use std::process::Command;

use failback_tests::{Cluster, PgMajor, StopMode};

/// The two sides of a failover after both wrote, both stopped.
pub struct DivergedPair {
    /// The old primary: the target of a rewind.
    pub old: Cluster,
    /// The promoted standby: the source.
    pub new: Cluster,
    pub scale: u32,
    /// Accounts updated on each side.
    pub changed: u64,
}

impl DivergedPair {
    /// `percent` (1 to 49) of the accounts changed on each side, in ranges that do not meet.
    pub fn build(scale: u32, percent: u32) -> DivergedPair {
        assert!(
            (1..50).contains(&percent),
            "the share of accounts changed must be 1 to 49 %"
        );
        let accounts = u64::from(scale) * 100_000;
        let changed = accounts * u64::from(percent) / 100;
        eprintln!(
            "building a diverged pair: pgbench scale {scale}, {changed} accounts changed on each side"
        );
        let mut old = Cluster::start_new(PgMajor::V15, "bench-old-primary");
        let out = old.pgbench_init(scale);
        assert!(out.status.success(), "pgbench -i failed");
        old.execute("CHECKPOINT");
        let mut new = old.create_standby("bench-new-primary");
        new.wait_for_catchup(&old);
        new.promote();
        if percent > 1 {
            // A larger change writes more WAL than max_wal_size: both sides keep theirs back to
            // the divergence, as their archives would, or the old primary has nothing to rewind
            // from and, rewound, nothing to replay up to the new primary's WAL.
            for c in [&old, &new] {
                c.execute("ALTER SYSTEM SET wal_keep_size = '16GB'");
                c.execute("SELECT pg_reload_conf()");
            }
        }
        old.execute(&format!(
            "UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid BETWEEN 1 AND {changed};
             INSERT INTO pgbench_history SELECT 1, 1, g, -1, now() FROM generate_series(1, 10000) g"
        ));
        let lo = accounts / 2;
        new.execute(&format!(
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN {lo} AND {};
             INSERT INTO pgbench_history SELECT 2, 2, g, 1, now() FROM generate_series(1, 10000) g",
            lo + changed
        ));
        old.stop(StopMode::Fast);
        new.stop(StopMode::Fast);
        DivergedPair {
            old,
            new,
            scale,
            changed,
        }
    }
}

/// The value after `name` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// A binary of this workspace next to the running benchmark (same target/profile directory),
/// or in `dir` when given; panics saying how to build it when missing.
pub fn workspace_binary(name: &str, dir: Option<&Path>) -> PathBuf {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .expect("the executable's directory")
                .to_path_buf()
        }
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --release -p failback-client -p failback-server)",
        p.display()
    );
    p
}

/// `cp -a from to`, replacing `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}
