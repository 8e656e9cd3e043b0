#!/usr/bin/env bash
# Flotilla against etcd, side by side in one run, on this machine: starts a 3-member etcd
# cluster (client ports 42379, 42389, 42399) and a 3-member Flotilla cluster (client ports
# 52379, 52389, 52399), both on 127.0.0.1 with fsync on and default timings, then runs
# `flotilla bench` (256-byte values, 100,000 random keys, writes to the leader) at each client
# count against one system and then the other, and prints one table. Every process it
# started is stopped by PID at the end.
#
#   scripts/bench-vs-etcd.sh                       (DURATION=10s CLIENTS="1 16 64 256")
#
# Needs `etcd` (Debian: apt-get install etcd-server) and Python 3 for the table.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${DURATION:-10s}
clients_list=${CLIENTS:-"1 16 64 256"}
members=3
cargo build --release -q -p flotilla
flotilla=$PWD/target/release/flotilla
data=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-vs-etcd.XXXXXX")
pids=()

stop() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$data"
}
trap stop EXIT

# start SYSTEM BASE_PORT: a 3-member cluster; sets `endpoints` to its client endpoints.
# (Not run in a command substitution: the members must be this shell's children.)
start() {
    local system=$1 base=$2 cluster="" i client peer
    endpoints=""
    for ((i = 0; i < members; i++)); do
        cluster+="${cluster:+,}m$i=http://127.0.0.1:$((base + 1 + 10 * i))"
        endpoints+="${endpoints:+,}127.0.0.1:$((base + 10 * i))"
    done
    for ((i = 0; i < members; i++)); do
        client=http://127.0.0.1:$((base + 10 * i))
        peer=http://127.0.0.1:$((base + 1 + 10 * i))
        local flags=(--name "m$i" --data-dir "$data/$system-m$i"
            --listen-client-urls "$client" --advertise-client-urls "$client"
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer"
            --initial-cluster "$cluster" --initial-cluster-token "bench-$system")
        if [ "$system" = etcd ]; then
            etcd "${flags[@]}" --logger zap --log-level error >"$data/$system-m$i.log" 2>&1 &
        else
            "$flotilla" serve "${flags[@]}" --log-level warn >"$data/$system-m$i.log" 2>&1 &
        fi
        pids+=($!)
    done
    # Ready when a write succeeds (bounded: 20 s).
    local try
    for ((try = 0; try < 100; try++)); do
        if "$flotilla" --endpoints "$endpoints" --command-timeout 1s put bench/ready 1 >/dev/null 2>&1; then
            return
        fi
        sleep 0.2
    done
    echo "$system did not accept a write within 20 s; logs in $data" >&2
    exit 1
}

start etcd 42379
etcd_endpoints=$endpoints
start flotilla 52379
flotilla_endpoints=$endpoints
echo "etcd $(etcd --version | head -1 | awk '{print $3}') vs flotilla $(git rev-parse --short HEAD)," \
    "$members members each, $duration per run, $(nproc) cores" >&2

results=$data/results.jsonl
for clients in $clients_list; do
    for system in etcd flotilla; do
        endpoints=$etcd_endpoints
        [ "$system" = flotilla ] && endpoints=$flotilla_endpoints
        echo "bench: $system, $clients clients" >&2
        "$flotilla" bench --endpoints "$endpoints" --clients "$clients" --duration "$duration" \
            --json 2>/dev/null |
            python3 -c 'import json,sys; r=json.load(sys.stdin); r["system"]=sys.argv[1]; print(json.dumps(r))' "$system" \
            >>"$results"
    done
done

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'clients':>7} | {'system':<8} | {'writes/s':>9} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} | {'p99.9 ms':>8} | {'errors':>6}")
by = {}
for r in rows:
    w = r["writes"]; l = w["latency_ms"]
    by[(r["clients"], r["system"])] = w["throughput_per_second"]
    print(f"{r['clients']:>7} | {r['system']:<8} | {w['throughput_per_second']:>9.0f} | {l['p50']:>7.2f} | {l['p90']:>7.2f} | {l['p99']:>7.2f} | {l['p99.9']:>8.2f} | {w['errors']:>6}")
for clients in sorted({c for c, _ in by}):
    e, f = by.get((clients, "etcd")), by.get((clients, "flotilla"))
    if e and f:
        print(f"{clients} clients: flotilla / etcd = {f / e:.2f}x")
EOF
