#!/usr/bin/env bash
# Builds bench/etcd-go-load (a load driver on etcd's own Go client) to the path given.
set -euo pipefail
exec "$(dirname "$0")/build-go.sh" "$(dirname "$0")/../bench/etcd-go-load" "$1"
