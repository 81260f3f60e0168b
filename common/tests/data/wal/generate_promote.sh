#!/usr/bin/env bash
# Regenerates common/tests/data/wal/pg15_promote/: WAL across a timeline switch, from a real
# promotion. A PostgreSQL 15 primary (1 MiB segments, checksums) streams to a pg_basebackup
# standby; the standby is promoted (END_OF_RECOVERY, timeline 2) and writes a little more.
# The fixture is the promoted standby's segment on timeline 2 that holds the switch point:
# pages before it still carry timeline 1 (copied from the old timeline's segment), pages after
# it timeline 2. fixture.json records the switch point from 00000002.history and the insert
# position after the writes on timeline 2.
#
# Usage (as root; servers run as the unprivileged user `postgres`):
#   generate_promote.sh [bindir] [outdir]
set -euo pipefail

bindir=${1:-/usr/lib/postgresql/15/bin}
outdir=${2:-$(cd "$(dirname "$0")" && pwd)/pg15_promote}
work=/tmp/failback-walfixtures/promote15
p1=55431
p2=55432

rm -rf "$work"
mkdir -p "$work"
chown postgres "$work"
as_pg() { runuser -u postgres -- "$@"; }
q() { as_pg psql -X -q -At -h "$work" -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -c "$2"; }

as_pg "$bindir/initdb" -k --wal-segsize=1 -A trust -U postgres -D "$work/primary" >/dev/null
cat >>"$work/primary/postgresql.conf" <<EOF
port = $p1
listen_addresses = ''
unix_socket_directories = '$work'
autovacuum = off
fsync = off
wal_keep_size = 1GB
EOF
echo "local replication postgres trust" >>"$work/primary/pg_hba.conf"
as_pg "$bindir/pg_ctl" -D "$work/primary" -l "$work/primary.log" -w start >/dev/null
q $p1 "CREATE TABLE before_promote (id int PRIMARY KEY, v text)"
q $p1 "INSERT INTO before_promote SELECT g, 'p' || g FROM generate_series(1, 3000) g"

as_pg "$bindir/pg_basebackup" -h "$work" -p $p1 -U postgres -D "$work/standby" -R -X stream -c fast
sed -i "s/^port = $p1/port = $p2/" "$work/standby/postgresql.conf"
as_pg "$bindir/pg_ctl" -D "$work/standby" -l "$work/standby.log" -w start >/dev/null

q $p1 "INSERT INTO before_promote SELECT g, 'q' || g FROM generate_series(3001, 4000) g"
target=$(q $p1 "SELECT pg_current_wal_insert_lsn()")
until [ "$(q $p2 "SELECT pg_last_wal_replay_lsn() >= '$target'")" = t ]; do sleep 0.1; done
as_pg "$bindir/pg_ctl" -D "$work/standby" -w promote >/dev/null
until [ "$(q $p2 "SELECT pg_is_in_recovery()")" = f ]; do sleep 0.1; done

q $p2 "CREATE TABLE after_promote (id int, v text)"
q $p2 "INSERT INTO after_promote SELECT g, 'n' || g FROM generate_series(1, 2000) g"
q $p2 "UPDATE before_promote SET v = 'changed' WHERE id % 5 = 0"
end_lsn=$(q $p2 "SELECT pg_current_wal_insert_lsn()")
after=$(q $p2 "SELECT pg_relation_filepath('after_promote')")
before=$(q $p2 "SELECT pg_relation_filepath('before_promote')")
as_pg "$bindir/pg_ctl" -D "$work/standby" -m fast -w stop >/dev/null
as_pg "$bindir/pg_ctl" -D "$work/primary" -m fast -w stop >/dev/null

history=$(cat "$work/standby/pg_wal/00000002.history")
switch_lsn=$(echo "$history" | awk '{print $2}')
hi=${switch_lsn%/*}
lo=${switch_lsn#*/}
seg=$(((0x$hi << 32 | 0x$lo) >> 20))
endhi=${end_lsn%/*}
endlo=${end_lsn#*/}
endseg=$(((0x$endhi << 32 | 0x$endlo) >> 20))

rm -rf "$outdir"
mkdir -p "$outdir"
segments=()
for ((s = seg; s <= endseg; s++)); do
  n=$(printf '%08X%08X%08X' 2 $((s >> 12)) $((s & 0xFFF)))
  zstd -q -19 "$work/standby/pg_wal/$n" -o "$outdir/$n.zst"
  chmod 644 "$outdir/$n.zst"
  segments+=("\"$n\"")
done
cp "$work/standby/pg_wal/00000002.history" "$outdir/"
chmod 644 "$outdir/00000002.history"
cat >"$outdir/fixture.json" <<EOF
{
  "server_version": "$(as_pg "$bindir/postgres" --version)",
  "major": 15,
  "seg_size": 1048576,
  "timeline": 2,
  "segments": [$(IFS=,; echo "${segments[*]}")],
  "switch_lsn": "$switch_lsn",
  "end_lsn": "$end_lsn",
  "before_promote_path": "$before",
  "after_promote_path": "$after"
}
EOF
du -sh "$outdir"
