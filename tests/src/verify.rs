//! What a rewound or resynced node must pass besides equal tables: every page checksum
//! (`pg_checksums --check`, for any version, through [`failback_datadir::checksums`]) and
//! amcheck (every B-tree index with its heap, and on 14+ every table's heap).

use crate::Cluster;
use failback_datadir::DataDir;
use failback_datadir::checksums::{self, ChecksumScan};

/// Every page checksum of `cluster`, which must be shut down.
pub fn checksums(cluster: &mut Cluster) -> ChecksumScan {
    assert!(
        !cluster.is_running(),
        "checksums are checked on a shut-down cluster"
    );
    let control = crate::rewind::control_file(cluster);
    checksums::verify(
        &DataDir::new(cluster.data_dir()),
        cluster.major(),
        control.blcksz,
        control.relseg_size,
    )
    .unwrap_or_else(|e| panic!("could not check the checksums of '{}': {e}", cluster.name()))
}

/// Asserts that every page checksum of `cluster` (shut down) checks out, and that there were
/// pages to check.
pub fn assert_checksums_clean(cluster: &mut Cluster) {
    let scan = checksums(cluster);
    assert!(
        scan.is_clean(),
        "'{}' has damaged pages: {:?} torn files: {:?}",
        cluster.name(),
        scan.bad,
        scan.torn
    );
    assert!(
        scan.pages > 100,
        "'{}': only {} pages checked",
        cluster.name(),
        scan.pages
    );
}

/// Runs amcheck on `standby`, a running standby of the running `primary`, in every database
/// that takes connections: `bt_index_check(index, heapallindexed => true)` on every B-tree
/// index, and on 14+ `verify_heapam` on every table, materialised view and TOAST table. The
/// extension is created on the primary (a standby cannot) and replayed first.
pub fn assert_amcheck_clean(primary: &Cluster, standby: &Cluster) {
    let dbs: Vec<String> = primary
        .query_rows("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    for db in &dbs {
        primary.execute_in(db, "CREATE EXTENSION IF NOT EXISTS amcheck");
    }
    standby.wait_for_catchup(primary);
    let heap = standby.major() >= failback_common::PgMajor::V14;
    for db in &dbs {
        let indexes = standby.query_one_in(
            db,
            "SELECT count(bt_index_check(c.oid, true)) FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_am am ON am.oid = c.relam
              WHERE am.amname = 'btree' AND c.relpersistence = 'p' AND i.indisready
                AND i.indisvalid",
        );
        assert!(
            indexes.parse::<u64>().unwrap_or(0) > 0,
            "amcheck checked no index in {db}"
        );
        if heap {
            let damaged = standby.query_rows_in(
                db,
                "SELECT c.oid::regclass::text, v.blkno::text, v.msg FROM pg_class c,
                        LATERAL verify_heapam(c.oid) v
                  WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p'",
            );
            assert!(
                damaged.is_empty(),
                "verify_heapam found damage in {db} on '{}': {damaged:?}",
                standby.name()
            );
        }
    }
}
