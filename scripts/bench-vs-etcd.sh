#!/usr/bin/env bash
# Flotilla against etcd, side by side in one run, through etcd's own Go client (clientv3),
# our client and etcdctl: see scripts/bench_vs_etcd.py for what is measured. Builds the
# release binary and the Go load driver (in GOPATH mode, against Debian's
# golang-etcd-server-dev: no module download), then runs the comparison. Arguments go to
# bench_vs_etcd.py, e.g.
#
#   scripts/bench-vs-etcd.sh                                   # everything, 3 runs, 10 s a point
#   scripts/bench-vs-etcd.sh --runs 1 --parts go --clients 64  # one quick point
#   scripts/bench-vs-etcd.sh --parts memory                    # RSS with 1M keys
#   scripts/bench-vs-etcd.sh --parts kubernetes                # kube-apiserver's traffic mix
#   scripts/bench-vs-etcd.sh --runs 1 --parts lists            # 20 clients listing 200k keys
#
# Needs etcd and etcdctl (apt-get install etcd-server etcd-client), Go and clientv3
# (apt-get install golang-go golang-etcd-server-dev) and Python 3.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in etcd go python3; do
    command -v "$tool" >/dev/null || {
        echo "bench-vs-etcd: $tool is missing (apt-get install etcd-server etcd-client golang-go golang-etcd-server-dev)" >&2
        exit 1
    }
done
cargo build --release -q -p flotilla
mkdir -p target/bench
scripts/build-etcd-go-load.sh target/bench/etcd-go-load
exec python3 scripts/bench_vs_etcd.py --flotilla "$PWD/target/release/flotilla" \
    --go-driver "$PWD/target/bench/etcd-go-load" --out target/bench/results.jsonl "$@"
