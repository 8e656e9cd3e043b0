//! The state machine conformance suite: what the runtime relies on from a
//! [`StateMachine`], checked on commands of your choosing.
//!
//! - **Determinism**: two machines applying the same entries give the same outputs, the same
//!   applied index (each entry's), and the same snapshot bytes. The runtime's members apply
//!   the same log and must end in the same state; the suite compares snapshots, so a
//!   snapshot's bytes must be a function of the state (iterate in a fixed order).
//! - **Snapshot and restore**: a state restored from a snapshot (encoded in large steps and
//!   in small ones) has the snapshot's applied index, snapshots to the same bytes, and then
//!   applies the rest of the log exactly as the original does.
//! - **Point in time**: a snapshot taken while entries go on applying between its steps holds
//!   the state at the index it began at.
//! - **Bad snapshots**: restoring a truncated snapshot returns (an error, or a state), never
//!   panics.
//!
//! ```no_run
//! # use flotilla_runtime::{Index, SmallStateMachine};
//! # #[derive(Default)] struct Counter(Index, u64);
//! # impl SmallStateMachine for Counter {
//! #     type Output = u64;
//! #     fn applied_index(&self) -> Index { self.0 }
//! #     fn apply_command(&mut self, i: Index, c: &[u8]) -> u64 { self.0 = i; self.1 += c.len() as u64; self.1 }
//! #     fn apply_other(&mut self, i: Index) -> u64 { self.0 = i; self.1 }
//! #     fn snapshot(&self) -> Vec<u8> { [self.0.to_le_bytes(), self.1.to_le_bytes()].concat() }
//! #     fn restore(&mut self, b: &[u8]) -> Result<(), String> { Ok(()) }
//! # }
//! let commands: Vec<bytes::Bytes> = (0..100).map(|i| vec![0; i % 7].into()).collect();
//! flotilla_runtime::conformance::state_machine::run_suite(Counter::default, &commands);
//! ```

use std::fmt::Debug;

use bytes::Bytes;
use flotilla_raft::{Entry, EntryPayload, Membership, MembershipEntry};

use crate::state_machine::StateMachine;

/// Snapshot steps: small enough to cut most states into many steps, and large.
const STEP_BYTES: [usize; 2] = [16, 1 << 20];
/// Where the log is cut for a snapshot, as fractions of it.
const CUTS: [(usize, usize); 4] = [(0, 1), (1, 3), (2, 3), (1, 1)];

/// Runs every check on `commands` (applied in order as the log's commands, with a blank
/// entry first and a membership entry in the middle, as a real log has), each on fresh
/// machines from `make`.
pub fn run_suite<S>(make: impl Fn() -> S, commands: &[Bytes])
where
    S: StateMachine,
    S::Output: PartialEq + Debug,
{
    let log = log_of(commands);
    let outputs = deterministic(&make, &log);
    for (numerator, denominator) in CUTS {
        let cut = log.len() * numerator / denominator;
        for step_bytes in STEP_BYTES {
            restores_equivalently(&make, &log, &outputs, cut, step_bytes);
        }
        snapshot_is_point_in_time(&make, &log, cut);
    }
    survives_truncated_snapshots(&make, &log);
}

fn log_of(commands: &[Bytes]) -> Vec<Entry> {
    let mut payloads = vec![EntryPayload::Blank];
    let middle = commands.len() / 2;
    for (i, command) in commands.iter().enumerate() {
        if i == middle {
            payloads.push(EntryPayload::Membership(MembershipEntry {
                membership: Membership::with_voters([1, 2, 3]),
                context: Bytes::new(),
            }));
        }
        payloads.push(EntryPayload::Command(command.clone()));
    }
    payloads
        .into_iter()
        .zip(1..)
        .map(|(payload, index)| Entry {
            term: 1,
            index,
            payload,
        })
        .collect()
}

fn apply_all<S: StateMachine>(machine: &mut S, entries: &[Entry]) -> Vec<S::Output> {
    entries
        .iter()
        .map(|entry| {
            let output = machine.apply(entry);
            assert_eq!(
                machine.applied_index(),
                entry.index,
                "the applied index after applying entry {}",
                entry.index
            );
            output
        })
        .collect()
}

/// The whole snapshot of `machine`, encoded `step_bytes` at a time.
fn snapshot_of<S: StateMachine>(machine: &mut S, step_bytes: usize) -> Vec<u8> {
    let mut cursor = machine.begin_snapshot();
    let mut bytes = Vec::new();
    loop {
        let done = machine
            .continue_snapshot(&mut cursor, &mut bytes, step_bytes)
            .expect("a snapshot step");
        if done {
            break;
        }
    }
    machine.end_snapshot(cursor);
    bytes
}

fn deterministic<S>(make: &impl Fn() -> S, log: &[Entry]) -> Vec<S::Output>
where
    S: StateMachine,
    S::Output: PartialEq + Debug,
{
    let (mut first, mut second) = (make(), make());
    assert_eq!(
        first.applied_index(),
        0,
        "a new state machine has applied nothing"
    );
    let outputs = apply_all(&mut first, log);
    let again = apply_all(&mut second, log);
    for (entry, (one, other)) in log.iter().zip(outputs.iter().zip(&again)) {
        assert_eq!(
            one, other,
            "two machines gave different outputs for entry {}",
            entry.index
        );
    }
    assert!(
        snapshot_of(&mut first, STEP_BYTES[1]) == snapshot_of(&mut second, STEP_BYTES[1]),
        "two machines that applied the same {} entries snapshot to different bytes",
        log.len()
    );
    outputs
}

fn restores_equivalently<S>(
    make: &impl Fn() -> S,
    log: &[Entry],
    outputs: &[S::Output],
    cut: usize,
    step_bytes: usize,
) where
    S: StateMachine,
    S::Output: PartialEq + Debug,
{
    let mut original = make();
    apply_all(&mut original, &log[..cut]);
    let bytes = snapshot_of(&mut original, step_bytes);
    let mut restored = original.empty();
    assert_eq!(
        restored.applied_index(),
        0,
        "an empty state has applied nothing"
    );
    if let Err(err) = restored.restore(&mut &bytes[..]) {
        panic!("restoring a snapshot at entry {cut} ({step_bytes}-byte steps) failed: {err}");
    }
    assert_eq!(
        restored.applied_index(),
        cut as u64,
        "the applied index restored from a snapshot at entry {cut}"
    );
    assert!(
        snapshot_of(&mut restored, step_bytes) == bytes,
        "a state restored from a snapshot at entry {cut} snapshots to other bytes"
    );
    let after = apply_all(&mut restored, &log[cut..]);
    for (entry, (got, expected)) in log[cut..].iter().zip(after.iter().zip(&outputs[cut..])) {
        assert_eq!(
            got, expected,
            "after a restore at entry {cut}, entry {} gave another output",
            entry.index
        );
    }
}

fn snapshot_is_point_in_time<S: StateMachine>(make: &impl Fn() -> S, log: &[Entry], cut: usize) {
    let mut reference = make();
    apply_all(&mut reference, &log[..cut]);
    let expected = snapshot_of(&mut reference, STEP_BYTES[0]);

    let mut machine = make();
    apply_all(&mut machine, &log[..cut]);
    let mut cursor = machine.begin_snapshot();
    let mut bytes = Vec::new();
    let mut later = log[cut..].iter();
    loop {
        // One more entry applied between every two steps, as the apply thread does.
        if let Some(entry) = later.next() {
            machine.apply(entry);
        }
        let done = machine
            .continue_snapshot(&mut cursor, &mut bytes, STEP_BYTES[0])
            .expect("a snapshot step");
        if done {
            break;
        }
    }
    machine.end_snapshot(cursor);
    assert!(
        bytes == expected,
        "a snapshot begun at entry {cut} holds entries applied after it began"
    );
}

fn survives_truncated_snapshots<S: StateMachine>(make: &impl Fn() -> S, log: &[Entry]) {
    let mut machine = make();
    apply_all(&mut machine, log);
    let bytes = snapshot_of(&mut machine, STEP_BYTES[1]);
    let lengths = [
        0,
        1,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len().saturating_sub(1),
    ];
    for length in lengths {
        // Either outcome is allowed (a prefix can be a valid state); a panic is not.
        let _ = machine.empty().restore(&mut &bytes[..length]);
    }
}
