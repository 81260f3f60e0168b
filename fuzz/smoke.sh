#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the stable toolchain and runs each for a bounded
# time; exits non-zero if any target crashes (a panic, a timeout, running out of memory).
#
#     fuzz/smoke.sh [SECONDS [TARGET...]]      (default: 30 s each, every target; 0: build only)
#
# What CI runs (.ci/run). No nightly and no cargo-fuzz needed: the build is what
# `cargo fuzz build -s none` does (release with debug assertions and overflow checks, one
# codegen unit, libFuzzer's SanitizerCoverage instrumentation, `--cfg fuzzing`), done with plain
# cargo, into fuzz/target (FAILBACK_FUZZ_TARGET_DIR to change it) where `cargo fuzz` finds
# it too. The corpora are fuzz/corpus/<target>, seeded by make_seeds.py when python3 and
# zstd are there; a crash is written to fuzz/artifacts/<target>/ and its path printed.
# Targets run FAILBACK_FUZZ_JOBS at a time (default: the number of cores).
set -euo pipefail

fuzz_dir=$(cd "$(dirname "$0")" && pwd)
seconds=${1:-30}
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(wal_decoder control_file history_file wire_messages)
fi
target_dir=${FAILBACK_FUZZ_TARGET_DIR:-$fuzz_dir/target}
jobs=${FAILBACK_FUZZ_JOBS:-$(nproc 2>/dev/null || echo 2)}
triple=$(rustc -vV | sed -n 's/^host: //p')

# cargo-fuzz 0.13's RUSTFLAGS for `cargo fuzz build -s none` on Linux (src/project.rs).
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
flags+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0"
flags+=" -Cllvm-args=-sanitizer-coverage-stack-depth -Cdebug-assertions -Ccodegen-units=1"
flags+=" ${RUSTFLAGS:-}"

start=$(date +%s)
echo "==> building the fuzz targets (stable $(rustc --version | cut -d' ' -f2), libFuzzer) into $target_dir"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
RUSTFLAGS="$flags" cargo build --manifest-path "$fuzz_dir/Cargo.toml" --target "$triple" \
    --release --config 'profile.release.debug="line-tables-only"' \
    --target-dir "$target_dir" "${bins[@]}"
echo "==> built in $(($(date +%s) - start)) s"

if [ "$seconds" -eq 0 ]; then
    exit 0
fi

if command -v python3 >/dev/null 2>&1 && command -v zstd >/dev/null 2>&1; then
    python3 "$fuzz_dir/make_seeds.py"
else
    echo "==> no python3 or zstd: the targets start from their corpora as they are, seeds not added"
fi

logs=$target_dir/smoke-logs
mkdir -p "$logs"
bin_dir=$target_dir/$triple/release

run_one() {
    local t=$1
    mkdir -p "$fuzz_dir/corpus/$t" "$fuzz_dir/artifacts/$t"
    # -verbosity=0 keeps the log to the end and whatever goes wrong, not each new input.
    "$bin_dir/$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -verbosity=0 -print_final_stats=1 \
        -artifact_prefix="$fuzz_dir/artifacts/$t/" "$fuzz_dir/corpus/$t" \
        >"$logs/$t.log" 2>&1
}

failed=()
report() {
    local t=$1 rc=$2
    if [ "$rc" -eq 0 ]; then
        echo "==> $t: $(grep -E '^stat::number_of_executed_units' "$logs/$t.log" | awk '{print $2}') runs," \
            "$(grep -E '^stat::peak_rss_mb' "$logs/$t.log" | awk '{print $2}') MB, no crash"
    else
        echo "==> $t CRASHED (exit $rc); the end of its log ($logs/$t.log):"
        tail -n 60 "$logs/$t.log"
        local artifact
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$logs/$t.log" | tail -n 1)
        echo "==> $t: reproducer ${artifact:-(none written)}; replay it with $bin_dir/$t ${artifact:-<file>}"
        failed+=("$t")
    fi
}

run_start=$(date +%s)
for ((i = 0; i < ${#targets[@]}; i += jobs)); do
    batch=("${targets[@]:i:jobs}")
    pids=()
    for t in "${batch[@]}"; do
        echo "==> fuzzing $t for $seconds s"
        run_one "$t" &
        pids+=($!)
    done
    for k in "${!batch[@]}"; do
        rc=0
        wait "${pids[$k]}" || rc=$?
        report "${batch[$k]}" "$rc"
    done
done
echo "==> fuzzed in $(($(date +%s) - run_start)) s; $(($(date +%s) - start)) s with the build"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "error: fuzz targets crashed: ${failed[*]}" >&2
    exit 1
fi
