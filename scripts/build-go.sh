#!/usr/bin/env bash
# Builds one of this repository's Go programs on etcd's own Go client, in GOPATH mode against
# Debian's golang-etcd-server-dev, so no Go module is downloaded.
#
#   scripts/build-go.sh bench/etcd-go-load target/etcd-go-load
#   scripts/build-go.sh interop/etcd-go-concurrency target/etcd-go-concurrency
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 SOURCE_DIR OUTPUT" >&2; exit 2; }
root=$(realpath "$(dirname "$0")/..")
src=$(realpath "$1")
out=$(realpath -m "$2")
[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3 ] || {
    echo "etcd's Go client is missing: apt-get install golang-etcd-server-dev" >&2
    exit 1
}
# Go needs a build cache; CI may run without HOME.
export GOCACHE=${GOCACHE:-$root/target/go-cache}
cd "$src"
GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= go build -o "$out" .
