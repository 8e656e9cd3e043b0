#!/usr/bin/env bash
# What a put costs the members besides its latency: starts a 3-member cluster on 127.0.0.1,
# runs puts with etcd's Go client (bench/etcd-go-load) against the leader, and prints for each
# run the throughput, the p50, and the members' CPU and context switches per put (all threads
# of the three processes, from /proc). On two cores shared by three members and the client,
# every wake-up waits for a core, so switches per put are latency (issue 13's profiling).
#
#   scripts/put-wakeups.sh                           # 2 runs of 4 s at 1 and at 64 clients
#   RUNS=3 SECONDS_LOAD=10 CLIENTS="1 16 64" scripts/put-wakeups.sh
#
# Needs target/release/flotilla and target/etcd-go-load (scripts/build-etcd-go-load.sh).
# Stops every process it started, by PID, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FLOTILLA_BIN:-target/release/flotilla}
LOAD=${ETCD_GO_LOAD:-target/etcd-go-load}
RUNS=${RUNS:-2}
SECONDS_LOAD=${SECONDS_LOAD:-4}
CLIENTS=${CLIENTS:-1 64}
BASE=${BASE_PORT:-47000}
WORK=$(mktemp -d /tmp/flotilla-wakeups.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

cluster=""
for i in 0 1 2; do cluster="$cluster,m$i=http://127.0.0.1:$((BASE + 1 + 10 * i))"; done
cluster=${cluster#,}
for i in 0 1 2; do
    client=http://127.0.0.1:$((BASE + 10 * i))
    peer=http://127.0.0.1:$((BASE + 1 + 10 * i))
    "$BIN" serve --name "m$i" --data-dir "$WORK/m$i" --listen-client-urls "$client" \
        --advertise-client-urls "$client" --listen-peer-urls "$peer" \
        --initial-advertise-peer-urls "$peer" --initial-cluster "$cluster" \
        --initial-cluster-token wakeups >"$WORK/m$i.log" 2>&1 &
    PIDS+=($!)
done
endpoints=127.0.0.1:$BASE,127.0.0.1:$((BASE + 10)),127.0.0.1:$((BASE + 20))
leader=$("$LOAD" --mode leader --endpoints "$endpoints")
echo "leader $leader"

# Context switches (voluntary and not, every thread) and CPU ticks of the three members.
counters() {
    local switches=0 ticks=0 pid task
    for pid in "${PIDS[@]}"; do
        for task in /proc/"$pid"/task/*; do
            switches=$((switches + $(awk '/ctxt_switches/ { n += $2 } END { print n + 0 }' \
                "$task/status" 2>/dev/null || echo 0)))
        done
        ticks=$((ticks + $(awk '{ print $14 + $15 }' /proc/"$pid"/stat)))
    done
    echo "$switches $ticks"
}
hz=$(getconf CLK_TCK)
for clients in $CLIENTS; do
    conns=$((clients < 8 ? clients : 8))
    for run in $(seq 1 "$RUNS"); do
        read -r switches_before ticks_before < <(counters)
        result=$("$LOAD" --endpoints "$leader" --op put --clients "$clients" --conns "$conns" \
            --duration "${SECONDS_LOAD}s" | tail -1)
        read -r switches_after ticks_after < <(counters)
        ops=$(grep -o '"ops":[0-9]*' <<<"$result" | cut -d: -f2)
        p50=$(grep -o '"p50":[0-9.]*' <<<"$result" | cut -d: -f2)
        awk -v c="$clients" -v r="$run" -v ops="$ops" -v s="$SECONDS_LOAD" -v p50="$p50" \
            -v sw=$((switches_after - switches_before)) -v t=$((ticks_after - ticks_before)) \
            -v hz="$hz" 'BEGIN {
                printf "%3d clients, run %d: %6.0f puts/s, p50 %.3f ms, %4.0f µs CPU/put, %4.1f switches/put\n",
                    c, r, ops / s, p50, t * 1e6 / hz / ops, sw / ops
            }'
    done
done
