#!/usr/bin/env bash
# Drives a 3-member Flotilla cluster on 127.0.0.1 with the real etcdctl (API v3, Debian's
# etcd-client package) and checks each output. Exits non-zero on the first mismatch; stops
# every process it started, by PID, whatever happens.
#
#   scripts/interop-etcdctl.sh            # builds target/release/flotilla if needed
#   FLOTILLA_BIN=path/to/flotilla scripts/interop-etcdctl.sh
#   INTEROP_SKIP_PERF=1 ...               # skip `check perf` (it runs for 60 s)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${FLOTILLA_BIN:-target/release/flotilla}
if [ ! -x "$BIN" ]; then
    cargo build --release -p flotilla
fi
command -v etcdctl >/dev/null || { echo "etcdctl is missing: apt-get install -y etcd-client"; exit 1; }
export ETCDCTL_API=3

# Ports: BASE+{0..3} clients, BASE+{10..13} peers, BASE+{20..23} metrics.
# Below the ephemeral range (32768+), so no outgoing connection holds one of them.
BASE=${INTEROP_BASE_PORT:-24100}
WORK=$(mktemp -d /tmp/flotilla-interop.XXXXXX)
PIDS=()
cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ $status -ne 0 ]; then
        echo "--- member logs ---"
        tail -n 30 "$WORK"/*.log || true
    fi
    rm -rf "$WORK"
    exit $status
}
trap cleanup EXIT

client() { echo "127.0.0.1:$((BASE + $1))"; }
peer() { echo "http://127.0.0.1:$((BASE + 10 + $1))"; }
INITIAL="n0=$(peer 0),n1=$(peer 1),n2=$(peer 2)"
ENDPOINTS="$(client 0),$(client 1),$(client 2)"

start_member() { # index state initial-cluster
    local i=$1
    "$BIN" serve --name "n$i" --data-dir "$WORK/n$i" \
        --listen-client-urls "http://$(client "$i")" \
        --listen-peer-urls "$(peer "$i")" \
        --listen-metrics-urls "http://127.0.0.1:$((BASE + 20 + i))" \
        --initial-cluster "$3" --initial-cluster-state "$2" \
        --initial-cluster-token interop >"$WORK/n$i.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$i=$!"
}

fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "ok: $*"; }
# expect "description" "expected substring" command...
expect() {
    local what=$1 want=$2; shift 2
    local out
    out=$("$@" 2>&1) || fail "$what: exit status $? from: $* -> $out"
    [[ "$out" == *"$want"* ]] || fail "$what: expected '$want' in: $out"
    pass "$what"
}
expect_error() {
    local what=$1 want=$2; shift 2
    local out
    if out=$("$@" 2>&1); then fail "$what: expected an error, got: $out"; fi
    [[ "$out" == *"$want"* ]] || fail "$what: expected '$want' in: $out"
    pass "$what"
}
ctl() { etcdctl --endpoints="$ENDPOINTS" --command-timeout=10s "$@"; }
wait_for() { # description, seconds, command...
    local what=$1 limit=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "timed out waiting for $what"
        sleep 0.2
    done
}

for i in 0 1 2; do start_member "$i" new "$INITIAL"; done
wait_for "a healthy cluster" 30 ctl endpoint health

expect "put" "OK" ctl put foo bar
expect "get" $'foo\nbar' ctl get foo
ctl put foo2 baz >/dev/null
expect "get --prefix" $'foo\nbar\nfoo2\nbaz' ctl get foo --prefix
expect "get --prefix --keys-only" $'foo\n\nfoo2' ctl get foo --prefix --keys-only
REV=$(ctl get foo -w json | sed -E 's/.*"revision":([0-9]+).*/\1/')
ctl put foo newer >/dev/null
expect "get --rev" $'foo\nbar' ctl get foo --rev="$REV"
expect "get --consistency=s on each member" "newer" etcdctl --endpoints="$(client 2)" get foo --consistency=s
expect "get -w json carries the header" '"raft_term"' ctl get foo -w json
expect "del" "1" ctl del foo2
expect "get after del prints nothing" "" ctl get foo2
expect "txn (success branch)" $'SUCCESS\n\nOK' ctl txn <<'EOF'
value("foo") = "newer"

put txnkey yes

put txnkey no

EOF
expect "txn result" $'txnkey\nyes' ctl get txnkey
expect "txn (failure branch)" $'FAILURE\n\nOK' ctl txn <<'EOF'
value("foo") = "nope"

put txnkey yes

put txnkey no

EOF
NOW=$(ctl get foo -w json | sed -E 's/.*"revision":([0-9]+).*/\1/')
expect "compaction" "compacted revision $NOW" ctl compaction "$NOW"
expect_error "get below the compaction point" "required revision has been compacted" ctl get foo --rev=1
expect_error "get a future revision" "required revision is a future revision" ctl get foo --rev=100000
expect_error "empty key" "key is not provided" ctl put "" v

expect "member list" "started, n0, $(peer 0)" ctl member list
[ "$(ctl member list | wc -l)" -eq 3 ] || fail "member list: 3 members expected"
expect "endpoint status" "3.5.0" ctl endpoint status
[ "$(ctl endpoint status | grep -c ', true, ')" -eq 1 ] || fail "endpoint status: one leader expected"
expect "endpoint status -w table" "IS LEADER" ctl endpoint status -w table
expect "endpoint health" "is healthy: successfully committed proposal" ctl endpoint health
expect "alarm list (none)" "" ctl alarm list
expect "--user is tolerated while auth is off" $'foo\nnewer' ctl --user root:secret get foo
# Each member hashes its own applied state: they agree once all have applied the last write.
wait_for "the members' hashes to agree" 10 bash -c \
    "[ \$(etcdctl --endpoints=$ENDPOINTS endpoint hashkv | awk -F', ' '{print \$2}' | sort -u | wc -l) -eq 1 ]"
pass "endpoint hashkv: the members agree"
[ "$(ctl endpoint health 2>&1 | grep -c 'is healthy')" -eq 3 ] || fail "endpoint health: 3 healthy"

# move-leader to a follower.
LEADER=$(ctl endpoint status | awk -F', ' '$5 == "true" {print $2}')
TARGET=$(ctl endpoint status | awk -F', ' '$5 == "false" {print $2; exit}')
expect "move-leader" "Leadership transferred from $LEADER to $TARGET" ctl move-leader "$TARGET"
wait_for "the new leader" 10 bash -c "etcdctl --endpoints=$ENDPOINTS endpoint status | grep -q '$TARGET, .*, true, '"
pass "the leader is now $TARGET"

# member add, start with --initial-cluster-state existing, member remove.
expect "member add" "Member" ctl member add n3 --peer-urls="$(peer 3)"
start_member 3 existing "$INITIAL,n3=$(peer 3)"
wait_for "n3 to start" 30 bash -c "etcdctl --endpoints=$ENDPOINTS member list | grep -q 'started, n3'"
expect "the new member serves reads" "newer" etcdctl --endpoints="$(client 3)" get foo
N3=$(ctl member list | awk -F', ' '$3 == "n3" {print $1}')
expect "member remove" "Member $N3 removed" ctl member remove "$N3"
wait_for "the removed member to stop" 20 bash -c "! kill -0 $PID_3"
[ "$(ctl member list | wc -l)" -eq 3 ] || fail "member list: 3 members after the removal"
pass "the removed member stopped by itself"

if [ -z "${INTEROP_SKIP_PERF:-}" ]; then
    # 150 puts/s from 50 clients for 60 s: passes with >= 90% of the target throughput, the
    # slowest request under 0.5 s and a standard deviation under 0.1 s. The progress bar is cut.
    perf=$(ctl check perf --load s 2>&1 | sed -E 's/.*(PASS|FAIL)/\1/' || true)
    echo "$perf" | grep -E '^(PASS|FAIL)' || true
    [[ "$perf" == *"PASS: Throughput"* && "$perf" != *"FAIL"* ]] || fail "check perf --load s"
    pass "check perf --load s"
fi

echo "interop: all etcdctl checks passed"
