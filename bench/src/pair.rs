//! A diverged primary/standby pair at a pgbench scale, the common input of the end-to-end
//! rewind benchmarks (`rewind_local`, `rewind_pair`, `rewind_shapes`).
//!
//! A PostgreSQL 15 primary with a pgbench database (scale 100 is about 1.5 GB) gets a streaming
//! standby; the standby is promoted; then a share of the accounts (1 % unless a benchmark asks
//! for more) is updated on each side, with some history rows: a contiguous range on each
//! ([`Pattern::Contiguous`], so the change is that share of the pages too), or rows drawn at
//! random ([`Pattern::Random`]: 1 % of the rows touches about 45 % of the table's pages, and
//! every touched page is a full-page image in the WAL after a checkpoint).
//! Both are stopped cleanly: the old primary is the rewind's target, the promoted standby its
//! source.
//!
//! The data is pgbench's own ([`Data::Stock`]: `filler` is blank, pages compress more than ten
//! to one) or, as real tables are, barely compressible ([`Data::Realistic`]: `filler` holds 84
//! random hex digits, pages compress about 2.5 to one).

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

/// What the accounts' `filler` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// pgbench's blanks: pages compress more than ten to one.
    Stock,
    /// 84 random hex digits a row: pages compress about as real tables' do.
    Realistic,
}

/// Which accounts each side updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// A contiguous range on each side (the ranges do not meet): that share of the pages.
    Contiguous,
    /// Rows drawn at random on each side (a fixed seed per side).
    Random,
}

impl std::str::FromStr for Data {
    type Err = String;
    fn from_str(s: &str) -> Result<Data, String> {
        match s {
            "stock" => Ok(Data::Stock),
            "realistic" => Ok(Data::Realistic),
            _ => Err(format!("{s:?}: stock or realistic")),
        }
    }
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Pattern, String> {
        match s {
            "contiguous" => Ok(Pattern::Contiguous),
            "random" => Ok(Pattern::Random),
            _ => Err(format!("{s:?}: contiguous or random")),
        }
    }
}

/// The statement that makes [`changed_rows`] draw the same rows for `side` on every run.
pub fn seed(side: u8) -> String {
    format!("SELECT setseed(0.{});", 25 + u32::from(side) * 50)
}

/// The rows `side` (0: the old primary, 1: the new) updates: a `WHERE` condition on `aid`.
pub fn changed_rows(pattern: Pattern, scale: u32, changed: u64, side: u8) -> String {
    let accounts = u64::from(scale) * 100_000;
    match pattern {
        Pattern::Contiguous => {
            let lo = if side == 0 { 1 } else { accounts / 2 };
            format!("aid BETWEEN {lo} AND {}", lo + changed - 1)
        }
        // Drawn after `setseed` in the same statement batch (see `seed`): the same rows on
        // every run; a few draws repeat, so slightly fewer than `changed` rows.
        Pattern::Random => format!(
            "aid IN (SELECT DISTINCT 1 + (random() * {})::int8 FROM generate_series(1, {changed}))",
            accounts - 1
        ),
    }
}

/// `pgbench -i` at `scale`, with the accounts' `filler` as `data` says: for realistic data the
/// tables are created by pgbench and filled here, then vacuumed and keyed by pgbench, as its
/// own initialisation does.
pub fn pgbench_init(cluster: &Cluster, scale: u32, data: Data) {
    match data {
        Data::Stock => {
            let out = cluster.pgbench_init(scale);
            assert!(out.status.success(), "pgbench -i failed");
        }
        Data::Realistic => {
            cluster.pgbench(&["-i", "-q", "-I", "dt", "-s", &scale.to_string()]);
            let hex = "md5(random()::text) || md5(random()::text) || md5(random()::text)";
            cluster.execute(&format!(
                "INSERT INTO pgbench_branches (bid, bbalance) \
                     SELECT g, 0 FROM generate_series(1, {scale}) g;
                 INSERT INTO pgbench_tellers (tid, bid, tbalance) \
                     SELECT g, (g - 1) / 10 + 1, 0 FROM generate_series(1, {}) g;
                 INSERT INTO pgbench_accounts (aid, bid, abalance, filler) \
                     SELECT g, (g - 1) / 100000 + 1, 0, substr({hex}, 1, 84) \
                     FROM generate_series(1, {}) g",
                10 * scale,
                100_000 * u64::from(scale)
            ));
            cluster.pgbench(&["-i", "-q", "-I", "vp", "-s", &scale.to_string()]);
        }
    }
}

impl DivergedPair {
    /// `percent` (1 to 49) of the accounts changed on each side, in ranges that do not meet.
    pub fn build(scale: u32, percent: u32) -> DivergedPair {
        DivergedPair::build_with(scale, percent, Data::Stock, Pattern::Contiguous)
    }

    /// `percent` (1 to 49) of the accounts changed on each side as `pattern` says, the
    /// accounts' filler as `data` says.
    pub fn build_with(scale: u32, percent: u32, data: Data, pattern: Pattern) -> DivergedPair {
        DivergedPair::build_keeping(scale, percent, data, pattern, 0)
    }

    /// [`DivergedPair::build_with`], both sides also keeping about `kept_wal_mb` MB of WAL
    /// written before the divergence (`wal_keep_size`, as many HA clusters set it, or a
    /// replication slot would): WAL that pg_rewind copies whole and failback never needs.
    pub fn build_keeping(
        scale: u32,
        percent: u32,
        data: Data,
        pattern: Pattern,
        kept_wal_mb: u64,
    ) -> DivergedPair {
        DivergedPair::build_prepared(scale, percent, data, pattern, kept_wal_mb, &|_| {})
    }

    /// [`DivergedPair::build_keeping`], with `prepare` run on the primary after pgbench's
    /// tables are made and before the standby is: what it makes is on both sides.
    pub fn build_prepared(
        scale: u32,
        percent: u32,
        data: Data,
        pattern: Pattern,
        kept_wal_mb: u64,
        prepare: &dyn Fn(&Cluster),
    ) -> DivergedPair {
        assert!(
            (1..50).contains(&percent),
            "the share of accounts changed must be 1 to 49 %"
        );
        let accounts = u64::from(scale) * 100_000;
        let changed = accounts * u64::from(percent) / 100;
        eprintln!(
            "building a diverged pair: pgbench scale {scale} ({data:?} data), {changed} accounts \
             changed on each side ({pattern:?})"
        );
        let mut old = Cluster::start_new(PgMajor::V15, "bench-old-primary");
        pgbench_init(&old, scale, data);
        prepare(&old);
        old.execute("CHECKPOINT");
        let mut new = old.create_standby("bench-new-primary");
        new.wait_for_catchup(&old);
        if kept_wal_mb > 0 {
            eprintln!("writing {kept_wal_mb} MB of WAL before the divergence, kept on both sides");
            for c in [&old, &new] {
                c.execute("ALTER SYSTEM SET wal_keep_size = '16GB'");
                c.execute("SELECT pg_reload_conf()");
            }
            // A table written and dropped: its WAL stays in pg_wal, its files go. About 120
            // bytes of WAL a row.
            let rows = kept_wal_mb * (1 << 20) / 120;
            old.execute(&format!(
                "CREATE TABLE kept_wal AS SELECT g, md5(g::text) AS m FROM generate_series(1, {rows}) g;
                 DROP TABLE kept_wal"
            ));
            old.execute("CHECKPOINT");
            new.wait_for_catchup(&old);
            new.execute("CHECKPOINT");
        }
        new.promote();
        if kept_wal_mb == 0 && (percent > 1 || pattern == Pattern::Random) {
            // A larger change writes more WAL than max_wal_size: both sides keep theirs back to
            // the divergence, as their archives would, or the old primary has nothing to rewind
            // from and, rewound, nothing to replay up to the new primary's WAL.
            for c in [&old, &new] {
                c.execute("ALTER SYSTEM SET wal_keep_size = '16GB'");
                c.execute("SELECT pg_reload_conf()");
            }
        }
        for (side, c) in [&old, &new].into_iter().enumerate() {
            let side = side as u8;
            let delta = if side == 0 { -1 } else { 1 };
            c.execute(&format!(
                "{}
                 UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE {};
                 INSERT INTO pgbench_history \
                     SELECT {}, {}, g, {delta}, now() FROM generate_series(1, 10000) g",
                seed(side),
                changed_rows(pattern, scale, changed, side),
                side + 1,
                side + 1
            ));
        }
        // The old primary's WAL since the divergence in segments of its own, before that of its
        // last checkpoint: a benchmark can take it away, as recycling would.
        old.execute("SELECT pg_switch_wal()");
        old.execute("CHECKPOINT");
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

/// Makes `to` a copy of `from` again after a run changed it: `rsync -a --delete`, which copies
/// only files whose size or modification time differ (a tool's writes change the time) and
/// removes what `from` does not have. Needs rsync.
pub fn sync_dir(from: &Path, to: &Path) {
    let st = Command::new("rsync")
        .args(["-a", "--delete"])
        .arg(format!("{}/", from.display()))
        .arg(format!("{}/", to.display()))
        .status()
        .expect("rsync (apt-get install rsync)");
    assert!(
        st.success(),
        "rsync -a --delete {} {}",
        from.display(),
        to.display()
    );
}
