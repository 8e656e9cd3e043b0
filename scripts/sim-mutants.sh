#!/usr/bin/env bash
# Negative controls for the simulator: break one safety rule at a time in a scratch copy of the
# source, and require the simulator to catch each broken variant within a bounded number of
# seeds. A simulator that passes with a rule broken proves nothing when it passes with the rule
# kept. Production code carries no switch for any of this: each mutant is a textual patch of a
# copy, made here and thrown away.
#
#   scripts/sim-mutants.sh [MUTANT...]      (default: every mutant)
#
# Environment: MUTANTS_DIR (scratch space for the copy, default target/mutants) and
# MUTANTS_TARGET_DIR (where the copy builds, default the main tree's target directory). The
# copy builds with the release profile in the same target directory as the real simulator, so
# every third-party crate, built with the same settings, is reused from the real build (that
# first build took about 3 of this script's 5 minutes in CI); only the workspace's own crates,
# whose artifacts cargo names by their path and so keeps apart from the real ones, are built
# again, at optimisation level 1, incrementally and without debug info, so each mutant after
# the first recompiles only what its patch touches. Assertions and overflow checks stay on.
# The one file both builds write is the uplifted binary, target/release/flotilla-sim: each
# mutant's is copied aside and run from there, and the real one is put back at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${MUTANTS_DIR:-$root/target/mutants}
mkdir -p "$work"
export CARGO_TARGET_DIR=${MUTANTS_TARGET_DIR:-$root/target}
workspace_overrides=()
for package in $(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(" ".join(p["name"] for p in json.load(sys.stdin)["packages"]))'); do
    for setting in opt-level=1 incremental=true debug=false; do
        workspace_overrides+=(--config "profile.release.package.\"$package\".$setting")
    done
done

# Each mutant: a name, the file, the text to replace (it must occur exactly once), its
# replacement, and the simulator arguments, whose --seeds is the bound within which the
# simulator must catch it. The sweep stops at its first failing seed (--fail-fast): one is
# proof enough, and most mutants fail within the first few seeds.
mutants() {
    mutant commit-earlier-term crates/raft/src/node/replication.rs \
        'if quorum_index <= self.log.committed() || self.log.term(quorum_index)? != self.term {' \
        'if quorum_index <= self.log.committed() {' \
        --seeds 300
    mutant vote-without-up-to-date-check crates/raft/src/node/election.rs \
        'let granted = can_vote && self.log.is_up_to_date(request.last_log);' \
        'let granted = can_vote;' \
        --seeds 300
    mutant vote-before-durable crates/raft/src/node/election.rs \
        'self.send_after_persist(msg.from, MessageBody::VoteResponse(response));' \
        'self.send(msg.from, MessageBody::VoteResponse(response));' \
        --seeds 300 --storage wal
    mutant snapshot-past-the-durable-log crates/raft/src/node/snapshot.rs \
        'if index > self.log.persisted() {' \
        'if false {' \
        --seeds 300
    mutant read-without-leadership-confirmation crates/raft/src/node/reads.rs \
        '.partition(|read| read.round != 0 && read.round <= confirmed);' \
        '.partition(|read| read.round != 0);' \
        --seeds 300
    mutant watcher-skips-a-revision-after-falling-behind crates/server/src/watch/watcher.rs \
        'self.next_revision = self.next_revision.max(revision);' \
        'self.next_revision = self.next_revision.max(revision + 1);' \
        --seeds 300
    mutant driver-acknowledges-another-entry crates/runtime/src/driver.rs \
        'Apply::Entry(applied) if proposed_index == index && applied.term == term => {' \
        'Apply::Entry(_) if proposed_index == index => {' \
        --seeds 300
    mutant session-retry-wrong-revision crates/kv/src/response.rs \
        'Some(Outcome::Put(response)) => Ok(Response::Put(response)),' \
        'Some(Outcome::Put(mut response)) => { if let Some(header) = response.header.as_mut() { header.revision += 1; } Ok(Response::Put(response)) }' \
        --seeds 300
    mutant lease-renewal-ignored crates/server/src/lease/lessor.rs \
        'self.expiry.set(id, now + seconds(ttl_seconds));
        self.schedule_checkpoint(now, id, ttl_seconds);
        Renewal::Renewed {' \
        'self.schedule_checkpoint(now, id, ttl_seconds);
        Renewal::Renewed {' \
        --seeds 100
    mutant lease-promotion-without-extension crates/server/src/lease/lessor.rs \
        '.set(lease.id, now + self.settings.extend + seconds(ttl));' \
        '.set(lease.id, now + seconds(ttl));' \
        --seeds 300
    mutant lease-renewal-skips-checkpoint-clear crates/server/src/lease/lessor.rs \
        'clear_checkpoint: self.checkpointed.get(&id).copied(),' \
        'clear_checkpoint: None,' \
        --seeds 300
    mutant sessions-apply-a-repeat-again crates/runtime/src/sessions.rs \
        'if sequence == session.sequence
            && let Some(output) = &session.output' \
        'if sequence == u64::MAX
            && let Some(output) = &session.output' \
        --seeds 300 --app hash-map
    mutant sessions-snapshot-forgets-outputs crates/runtime/src/sessions.rs \
        'if let Some(remembered) = &session.output {' \
        'if let Some(remembered) = &None::<S::Output> {' \
        --seeds 300 --app hash-map
    mutant snapshot-of-an-unknown-configuration crates/raft/src/node/snapshot.rs \
        'if membership.voters.is_empty() {' \
        'if false {' \
        --seeds 300 --seed-start 600000 --app hash-map --storage wal --membership
    mutant watch-shared-read-from-its-start crates/server/src/watch/watcher.rs \
        'let events = self.spec.select(&events[first..]);' \
        'let events = self.spec.select(&events[first - first..]);' \
        --seeds 300
}

wanted=("$@")
selected() {
    [ ${#wanted[@]} -eq 0 ] && return 0
    local name
    for name in "${wanted[@]}"; do [ "$name" = "$1" ] && return 0; done
    return 1
}

# A fresh copy of the source as it is in the work tree, committed or not (no target directory,
# nothing git ignores).
copy_source() {
    local dest=$1
    rm -rf "$dest"
    mkdir -p "$dest"
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do [ -e "$file" ] && printf '%s\0' "$file"; done |
        tar --null -T - -cf - | tar -xf - -C "$dest"
}

# Replaces the one occurrence of $2 by $3 in file $1; fails if it is not there exactly once, so
# a mutant can never silently become the unmodified program.
patch_once() {
    python3 - "$@" <<'PY'
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
count = text.count(old)
if count != 1:
    sys.exit(f"{path}: the text to mutate occurs {count} times, not once: {old!r}")
open(path, "w").write(text.replace(old, new))
PY
}

# The real simulator's uplifted binary, which the mutants' builds replace, is put back on exit.
real_sim=$CARGO_TARGET_DIR/release/flotilla-sim
if [ -e "$real_sim" ]; then
    cp -p "$real_sim" "$work/flotilla-sim-real"
    trap 'cp -p "$work/flotilla-sim-real" "$real_sim"' EXIT
fi

failures=0
ran=0
# The file the previous mutant patched. The fresh copy restores it with its original
# modification time, older than the mutant's build, so cargo would keep the mutant's build of
# it: it is touched, so that it is rebuilt as it is. Kept in a file, for the next run of this
# script on the same scratch space.
last_patched_file=$work/last-patched
last_patched=$(cat "$last_patched_file" 2>/dev/null || true)
mutant() {
    local name=$1 file=$2 old=$3 new=$4
    shift 4
    selected "$name" || return 0
    ran=$((ran + 1))
    local src=$work/src out=$work/$name.log
    copy_source "$src"
    if [ -n "$last_patched" ]; then touch "$src/$last_patched"; fi
    patch_once "$src/$file" "$old" "$new"
    last_patched=$file
    echo "$file" >"$last_patched_file"
    echo "=== mutant $name: $file"
    (cd "$src" && cargo build --release -q -p flotilla-sim "${workspace_overrides[@]}")
    cp "$CARGO_TARGET_DIR/release/flotilla-sim" "$work/flotilla-sim-mutant"
    if (cd "$src" && "$work/flotilla-sim-mutant" --fail-fast "$@") >"$out" 2>&1; then
        echo "NOT CAUGHT: the simulator passed every seed ($*) with $name"
        tail -1 "$out"
        failures=$((failures + 1))
    elif grep -q 'FAILED' "$out"; then
        echo "caught: $(tail -1 "$out") ($*)"
        grep -m1 'FAILED' "$out" | cut -c1-300
    else
        echo "the simulator failed without a failing seed:"
        tail -5 "$out"
        failures=$((failures + 1))
    fi
}
mutants

if [ "$ran" -eq 0 ]; then
    echo "no mutant matched: ${wanted[*]}"
    exit 2
fi
if [ "$failures" -gt 0 ]; then
    echo "$failures of $ran mutants were not caught"
    exit 1
fi
echo "all $ran mutants caught"
