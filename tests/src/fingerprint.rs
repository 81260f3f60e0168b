//! A fingerprint of the data in a cluster: what "both sides hold the same data" means in tests.
//!
//! For every database that accepts connections (`datallowconn`, except `template1`, which
//! holds nothing of a test's), every user table (a permanent ordinary table outside
//! `pg_catalog`, `information_schema` and the toast and temp schemas), the fingerprint records
//! the row count and a hash over all rows. Unlogged tables are left out: a standby cannot read
//! them and a failover empties them.
//!
//! The hash is order-independent: each row's text (`ROW(r.*)::text`) is hashed with md5, and
//! the two 64-bit halves of those hashes are summed (as `numeric`, so nothing overflows). The
//! same multiset of rows gives the same sums however the rows are laid out on disk, no sort
//! is needed, and no string grows with the table (a `string_agg` over a big table would hit
//! PostgreSQL's 1 GB value limit).
//!
//! Two fingerprints compare into a list of readable differences naming `db.schema.table`.

use std::collections::BTreeMap;
use std::fmt;

use crate::cluster::{Cluster, rows_of};

/// Row count and hash of one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePrint {
    pub rows: u64,
    pub hash: String,
}

/// database → `schema.table` → print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub databases: BTreeMap<String, BTreeMap<String, TablePrint>>,
}

impl Fingerprint {
    /// Fingerprints every user table of every database of a running cluster (a primary or a
    /// hot standby).
    pub fn of(cluster: &Cluster) -> Fingerprint {
        // One connection per database, not per query: a cluster of many tables would spend
        // its time starting backends.
        let connections = std::cell::RefCell::new(std::collections::HashMap::new());
        Fingerprint::of_with(cluster.name(), |db, sql| {
            let mut connections = connections.borrow_mut();
            let client = connections
                .entry(db.to_string())
                .or_insert_with(|| cluster.connect(db));
            rows_of(client, sql).unwrap_or_else(|e| {
                panic!(
                    "query failed on '{}', database {db}: {}\n{sql}",
                    cluster.name(),
                    crate::cluster::show_error(&e)
                )
            })
        })
    }

    /// Fingerprints the server `query(database, sql)` reaches (rows as text, NULL as None;
    /// panicking on error), called `name` in messages: for servers the test bed did not start,
    /// such as an orchestrator's.
    pub fn of_with(
        name: &str,
        query: impl Fn(&str, &str) -> Vec<Vec<Option<String>>>,
    ) -> Fingerprint {
        let mut databases = BTreeMap::new();
        let dbs = query(
            "postgres",
            "SELECT datname FROM pg_database \
             WHERE datallowconn AND datname NOT IN ('template0', 'template1') ORDER BY 1",
        );
        for db in dbs
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
        {
            let tables = query(
                &db,
                "SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
                 ORDER BY 1, 2",
            );
            let mut prints = BTreeMap::new();
            for t in tables {
                let (Some(schema), Some(table), Some(quoted)) =
                    (t[0].clone(), t[1].clone(), t[2].clone())
                else {
                    continue;
                };
                let row = query(
                    &db,
                    &format!(
                        "SELECT count(*), \
                         coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::int8::numeric), 0) \
                         || '/' || \
                         coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::int8::numeric), 0) \
                         FROM (SELECT md5(ROW(r.*)::text) AS h FROM {quoted} AS r) AS s"
                    ),
                );
                let get = |i: usize| {
                    row.first()
                        .and_then(|r| r.get(i).cloned().flatten())
                        .unwrap_or_default()
                };
                let rows = get(0).parse().unwrap_or_else(|e| {
                    panic!("'{name}': row count of {db}.{quoted} is {:?}: {e}", get(0))
                });
                prints.insert(
                    format!("{schema}.{table}"),
                    TablePrint { rows, hash: get(1) },
                );
            }
            databases.insert(db, prints);
        }
        Fingerprint { databases }
    }

    /// Total number of tables.
    pub fn table_count(&self) -> usize {
        self.databases.values().map(BTreeMap::len).sum()
    }

    /// The differences between `self` (called `a`) and `other` (called `b`), one line each;
    /// empty when they are equal.
    pub fn diff(&self, other: &Fingerprint, a: &str, b: &str) -> Diff {
        let mut lines = Vec::new();
        let db_names: std::collections::BTreeSet<&String> = self
            .databases
            .keys()
            .chain(other.databases.keys())
            .collect();
        for db in db_names {
            let (Some(ta), Some(tb)) = (self.databases.get(db), other.databases.get(db)) else {
                let only = if self.databases.contains_key(db) {
                    a
                } else {
                    b
                };
                lines.push(format!("database {db}: only on {only}"));
                continue;
            };
            let names: std::collections::BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
            for name in names {
                match (ta.get(name), tb.get(name)) {
                    (Some(pa), Some(pb)) if pa == pb => {}
                    (Some(pa), Some(pb)) if pa.rows != pb.rows => lines.push(format!(
                        "{db}.{name}: {} rows on {a}, {} rows on {b}",
                        pa.rows, pb.rows
                    )),
                    (Some(pa), Some(pb)) => lines.push(format!(
                        "{db}.{name}: {} rows on both but different contents (hash {} on {a}, {} \
                         on {b})",
                        pa.rows, pa.hash, pb.hash
                    )),
                    (Some(pa), None) => {
                        lines.push(format!("{db}.{name}: only on {a} ({} rows)", pa.rows))
                    }
                    (None, Some(pb)) => {
                        lines.push(format!("{db}.{name}: only on {b} ({} rows)", pb.rows))
                    }
                    (None, None) => {}
                }
            }
        }
        Diff { lines }
    }
}

/// Differences between two fingerprints, one line per database or table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub lines: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Whether some difference names `needle` (e.g. `postgres.public.t`).
    pub fn mentions(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// Panics, listing every difference, unless `a` and `b` hold the same data.
pub fn assert_same_data(a: &Cluster, b: &Cluster) {
    let (fa, fb) = (Fingerprint::of(a), Fingerprint::of(b));
    let diff = fa.diff(&fb, a.name(), b.name());
    assert!(
        diff.is_empty(),
        "clusters '{}' and '{}' hold different data:\n{diff}",
        a.name(),
        b.name()
    );
}
