#!/usr/bin/env bash
# Builds bench/etcd-go-load (a load driver on etcd's own Go client) to the path given, in
# GOPATH mode against Debian's golang-etcd-server-dev, so no Go module is downloaded.
set -euo pipefail
out=$(realpath -m "$1")
cd "$(dirname "$0")/../bench/etcd-go-load"
[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3 ] || {
    echo "etcd's Go client is missing: apt-get install golang-etcd-server-dev" >&2
    exit 1
}
# Go needs a build cache; CI may run without HOME.
export GOCACHE=${GOCACHE:-$(realpath -m ../../target/go-cache)}
GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= go build -o "$out" main.go
