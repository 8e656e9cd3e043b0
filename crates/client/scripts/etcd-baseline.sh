#!/usr/bin/env bash
# Measures etcd's baseline with `flotilla bench`: starts a local etcd cluster of MEMBERS
# members (1 or 3) on 127.0.0.1 (client ports 42379, 42389, ...; peer ports 42380, ...),
# runs the bench at 1, 16, 64 and 256 clients for DURATION each, and stops every etcd by PID.
#
#   MEMBERS=3 DURATION=10s crates/client/scripts/etcd-baseline.sh
#
# Needs `etcd` (Debian: apt-get install etcd-server) and a release build of the example:
#   cargo build --release -p flotilla-client --example flotilla-client
set -euo pipefail

members=${MEMBERS:-3}
duration=${DURATION:-10s}
clients_list=${CLIENTS:-"1 16 64 256"}
root=$(cd "$(dirname "$0")/../../.." && pwd)
bench_bin=${BENCH_BIN:-$root/target/release/examples/flotilla-client}
data=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-etcd-baseline.XXXXXX")
pids=()

stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$data"
}
trap stop EXIT

cluster=""
endpoints=""
for ((i = 0; i < members; i++)); do
  cluster+="${cluster:+,}m$i=http://127.0.0.1:$((42380 + 10 * i))"
  endpoints+="${endpoints:+,}127.0.0.1:$((42379 + 10 * i))"
done
for ((i = 0; i < members; i++)); do
  client=http://127.0.0.1:$((42379 + 10 * i))
  peer=http://127.0.0.1:$((42380 + 10 * i))
  etcd --name "m$i" --data-dir "$data/m$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$cluster" --initial-cluster-token flotilla-baseline \
    --logger zap --log-level error 2>"$data/m$i.log" &
  pids+=($!)
done

# Wait (bounded) until a write succeeds.
for ((try = 0; try < 100; try++)); do
  if "$bench_bin" --endpoints "$endpoints" --command-timeout 1s put baseline/ready 1 >/dev/null 2>&1; then
    break
  fi
  sleep 0.2
done

echo "etcd $(etcd --version | head -1 | awk '{print $3}'), $members member(s), data in $data"
for clients in $clients_list; do
  "$bench_bin" --endpoints "$endpoints" bench --clients "$clients" --duration "$duration" "$@"
done
