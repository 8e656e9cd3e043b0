#!/usr/bin/env bash
# Issue 14's defragmentation measurement: how long do requests wait while a member
# defragments under load? Starts a 3-member cluster on 127.0.0.1 (Flotilla, then etcd when
# installed), fills it with etcd's Go client (bench/etcd-go-load), deletes half the keys and
# compacts (so there is something to reclaim), then runs a put load on the leader and, a few
# seconds in, `etcdctl defrag` on the leader. Prints, per system: the defrag's own duration
# and the put load's throughput and latency percentiles (max is the longest wait).
#
#   scripts/defrag-pause.sh                    # 200,000 keys of 1 KiB, 20 s of puts
#   KEYS=1000000 SECONDS_LOAD=30 scripts/defrag-pause.sh
#
# Needs target/release/flotilla and target/etcd-go-load (scripts/build-etcd-go-load.sh).
# Stops every process it started, by PID, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FLOTILLA_BIN:-target/release/flotilla}
LOAD=${ETCD_GO_LOAD:-target/etcd-go-load}
KEYS=${KEYS:-200000}
SECONDS_LOAD=${SECONDS_LOAD:-20}
DEFRAG_AT=${DEFRAG_AT:-5}
BASE=${BASE_PORT:-47000}
WORK=$(mktemp -d /tmp/flotilla-defrag.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
export ETCDCTL_API=3

start_cluster() { # system
    local system=$1 cluster="" i client peer
    for i in 0 1 2; do cluster="$cluster,m$i=http://127.0.0.1:$((BASE + 1 + 10 * i))"; done
    cluster=${cluster#,}
    for i in 0 1 2; do
        client=http://127.0.0.1:$((BASE + 10 * i))
        peer=http://127.0.0.1:$((BASE + 1 + 10 * i))
        local common=(--name "m$i" --data-dir "$WORK/$system-m$i" --listen-client-urls "$client"
            --advertise-client-urls "$client" --listen-peer-urls "$peer"
            --initial-advertise-peer-urls "$peer" --initial-cluster "$cluster"
            --initial-cluster-token defrag)
        if [ "$system" = flotilla ]; then
            "$BIN" serve "${common[@]}" >"$WORK/$system-m$i.log" 2>&1 &
        else
            etcd "${common[@]}" --quota-backend-bytes 8589934592 >"$WORK/$system-m$i.log" 2>&1 &
        fi
        PIDS+=($!)
    done
}

stop_cluster() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

measure() { # system
    local system=$1
    start_cluster "$system"
    local endpoints=127.0.0.1:$BASE,127.0.0.1:$((BASE + 10)),127.0.0.1:$((BASE + 20))
    local leader
    leader=$("$LOAD" --mode leader --endpoints "$endpoints")
    "$LOAD" --endpoints "$leader" --op fill --keys "$KEYS" --value-size 1024 --clients 32 --conns 4 >/dev/null
    # Delete the upper half of the keys and compact: space for the defrag to reclaim.
    local rev
    rev=$(etcdctl --endpoints="$leader" --command-timeout=60s del "$(printf 'fill/%010d' $((KEYS / 2)))" \
        fill0 -w json | sed -E 's/.*"revision":([0-9]+).*/\1/')
    etcdctl --endpoints="$leader" --command-timeout=60s compact "$rev" --physical >/dev/null
    local before
    before=$(etcdctl --endpoints="$leader" endpoint status -w json | sed -E 's/.*"dbSize":([0-9]+).*/\1/')
    (
        sleep "$DEFRAG_AT"
        local started ended
        started=$(date +%s%N)
        etcdctl --endpoints="$leader" --command-timeout=120s defrag >/dev/null
        ended=$(date +%s%N)
        echo "$(((ended - started) / 1000000))" >"$WORK/$system-defrag-ms"
    ) &
    local defrag_pid=$!
    local result
    result=$("$LOAD" --endpoints "$leader" --op put --keys "$KEYS" --value-size 1024 --clients 16 \
        --conns 4 --duration "${SECONDS_LOAD}s")
    wait "$defrag_pid"
    local after
    after=$(etcdctl --endpoints="$leader" endpoint status -w json | sed -E 's/.*"dbSize":([0-9]+).*/\1/')
    echo "$system: defrag took $(cat "$WORK/$system-defrag-ms") ms; db size $before -> $after bytes"
    echo "$system: puts during the run: $result"
    stop_cluster
}

measure flotilla
if command -v etcd >/dev/null; then
    measure etcd
else
    echo "SKIPPED: etcd is not installed"
fi
