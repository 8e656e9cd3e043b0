#!/usr/bin/env bash
# Builds interop/rust-etcd-client, the checks run through the Rust `etcd-client` crate. That
# crate compiles etcd's protos with protoc when it builds (apt-get install protobuf-compiler),
# which is why it is not part of Flotilla's workspace: a plain `cargo build` needs no protoc.
# A debug build: the checks measure nothing, and it builds in about half the time of release.
#
#   scripts/build-rust-etcd-client.sh target/rust-etcd-client-interop
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTPUT" >&2; exit 2; }
root=$(realpath "$(dirname "$0")/..")
out=$(realpath -m "$1")
command -v protoc >/dev/null || {
    echo "protoc is missing (the etcd-client crate needs it to build): apt-get install protobuf-compiler" >&2
    exit 1
}
export CARGO_TARGET_DIR=$root/target/interop-rust
cargo build --locked --manifest-path "$root/interop/rust-etcd-client/Cargo.toml"
cp "$CARGO_TARGET_DIR/debug/rust-etcd-client-interop" "$out"
