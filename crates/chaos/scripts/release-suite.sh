#!/usr/bin/env bash
# The release check, in one command: an hour of mixed faults on five members with the register
# workload (checked for linearizability), then set, counter and watch for ten minutes each
# under mixed faults, and the stale-read control. Needs root, iproute2 and nftables.
#
#   crates/chaos/scripts/release-suite.sh [OUT_DIR]      (default chaos-release)
#
# CHAOS_LONG (default 3600) and CHAOS_SHORT (default 600) set the durations in seconds.
# Ends with "N passed, M failed"; exits non-zero if any run failed. Each run's history,
# summary and member logs stay in OUT_DIR/<run>/ (and a failing run's data directories).
set -uo pipefail
cd "$(dirname "$0")/../../.."

out=${1:-chaos-release}
long=${CHAOS_LONG:-3600}
short=${CHAOS_SHORT:-600}
mkdir -p "$out"
cargo build --release -q -p flotilla || exit 1
chaos=(./target/release/flotilla chaos --system flotilla)

passed=0
failed=0
# run NAME EXPECTED_EXIT ARGS...
run() {
    local name=$1 expected=$2
    shift 2
    local started=$SECONDS
    "${chaos[@]}" --out "$out/$name" "$@" > "$out/$name.txt" 2>&1
    local code=$?
    if [ "$code" -eq "$expected" ]; then
        passed=$((passed + 1))
        echo "ok    $name ($((SECONDS - started)) s): $(tail -1 "$out/$name.txt")"
    else
        failed=$((failed + 1))
        echo "FAIL  $name ($((SECONDS - started)) s, exit $code, expected $expected): $(tail -1 "$out/$name.txt")"
        grep -E '^ANOMALY' "$out/$name.txt" | sed -n 1,20p | cut -c1-2000
    fi
}

echo "chaos release suite: ${long} s register, ${short} s each other workload, results in $out"
run register 0 --members 5 --workload register --nemesis mixed --duration "$long" --clients 10
for workload in set counter watch; do
    run "$workload" 0 --members 5 --workload "$workload" --nemesis mixed --duration "$short"
done
run stale-reads-must-fail 1 --members 5 --workload register --nemesis partition \
    --duration 60 --serializable-reads --seed 2

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
