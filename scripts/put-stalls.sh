#!/usr/bin/env bash
# Finds put stalls and lines them up with what the members were doing: starts a 3-member
# cluster on 127.0.0.1, fills it with etcd's Go client (bench/etcd-go-load), runs a put load
# that logs every request slower than a threshold, then prints the slow requests (UTC, by the
# time they started) merged with the members' snapshot and backup log lines and their warnings
# of slow write-path steps (--warning-apply-duration, MEMBER_SLOW here). For issue 18's "no
# stop-the-world pauses".
#
#   scripts/put-stalls.sh                      # 200,000 keys of 1 KiB, 40 s of puts, >= 30 ms
#   KEYS=1000000 SECONDS_LOAD=60 SLOW=50ms scripts/put-stalls.sh
#   BACKUP_AT=10 scripts/put-stalls.sh         # also take a backup 10 s into the load
#
# Needs target/release/flotilla and target/etcd-go-load (scripts/build-etcd-go-load.sh).
# Stops every process it started, by PID, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FLOTILLA_BIN:-target/release/flotilla}
LOAD=${ETCD_GO_LOAD:-target/etcd-go-load}
KEYS=${KEYS:-200000}
SECONDS_LOAD=${SECONDS_LOAD:-40}
SLOW=${SLOW:-30ms}
BASE=${BASE_PORT:-46000}
WORK=$(mktemp -d /tmp/flotilla-stalls.XXXXXX)
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
        --initial-cluster-token stalls --log-level info \
        --warning-apply-duration "${MEMBER_SLOW:-20ms}" >"$WORK/m$i.log" 2>&1 &
    PIDS+=($!)
done
endpoints=127.0.0.1:$BASE,127.0.0.1:$((BASE + 10)),127.0.0.1:$((BASE + 20))
leader=$("$LOAD" --mode leader --endpoints "$endpoints")
echo "leader $leader; filling $KEYS keys of 1 KiB"
"$LOAD" --endpoints "$leader" --op fill --keys "$KEYS" --value-size 1024 --clients 32 --conns 4 >/dev/null
if [ -n "${BACKUP_AT:-}" ]; then
    (sleep "$BACKUP_AT"; "$BIN" --endpoints "$leader" snapshot save "$WORK/backup.db" >/dev/null) &
    PIDS+=($!)
fi
"$LOAD" --endpoints "$leader" --op put --keys "$KEYS" --value-size 1024 --clients 8 --conns 2 \
    --duration "${SECONDS_LOAD}s" --slow "$SLOW" 2>"$WORK/slow.txt"
echo "slow requests (start UTC, latency) and member events:"
{
    while read -r _ started latency unit; do
        echo "$(date -u -d "@${started:0:10}.${started:10:3}" +%T.%3N) request took $latency $unit"
    done <"$WORK/slow.txt"
    for i in 0 1 2; do
        grep -hE "saved a snapshot|sending a backup|restored the state|slow |waited for" "$WORK/m$i.log" |
            sed -E "s/^[0-9-]+T([0-9:.]{12})[0-9]*Z/\1 m$i:/" || true
    done
} | sort
