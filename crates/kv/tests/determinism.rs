//! Determinism and snapshots: the same commands on two stores, one of them snapshotted and
//! restored midway, give the same answers and end with the same digest. Corrupt snapshots
//! are refused with an error, never a panic.

mod common;

use common::{bytes, delete_op, put_op, put_request, range_op};
use flotilla_kv::{Command, KvStore, LeaseRemaining, Limits, SessionLimits, SnapshotError};
use flotilla_proto::etcdserverpb::compare::{CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    PutRequest, TxnRequest,
};
use proptest::prelude::*;

fn limits() -> Limits {
    Limits {
        sessions: SessionLimits {
            sessions_max: 3,
            session_response_bytes_max: 256,
        },
        ..Limits::default()
    }
}

/// A command built from small random numbers, covering every operation.
fn command(choice: u8, a: u8, b: u8, c: u8) -> Command {
    let key = |n: u8| bytes(&format!("k{}", n % 8));
    let command = match choice % 10 {
        0..=2 => Command::put(PutRequest {
            key: key(a),
            value: bytes(&"v".repeat(usize::from(b % 40))),
            lease: if c.is_multiple_of(3) {
                i64::from(c % 4)
            } else {
                0
            },
            prev_kv: b.is_multiple_of(2),
            ..PutRequest::default()
        }),
        3 => Command::delete_range(DeleteRangeRequest {
            key: key(a),
            range_end: if b.is_multiple_of(2) {
                Default::default()
            } else {
                key(b)
            },
            prev_kv: true,
        }),
        4 => Command::txn(TxnRequest {
            compare: vec![Compare {
                result: i32::from(b % 4),
                target: CompareTarget::Version as i32,
                key: key(a),
                target_union: Some(TargetUnion::Version(i64::from(c % 3))),
                range_end: Default::default(),
            }],
            success: vec![put_op(&format!("k{}", b % 8), "t"), range_op("k0", "k9")],
            failure: vec![delete_op(&format!("k{}", c % 8), "")],
        }),
        5 => Command::compaction(CompactionRequest {
            revision: i64::from(a),
            physical: false,
        }),
        6 => match a % 3 {
            0 => Command::lease_grant(LeaseGrantRequest {
                ttl: i64::from(b) + 1,
                id: i64::from(c % 4),
            }),
            1 => Command::lease_revoke(LeaseRevokeRequest {
                id: i64::from(c % 4),
            }),
            _ => Command::lease_checkpoint(vec![LeaseRemaining {
                id: i64::from(c % 4),
                remaining_ttl: i64::from(b),
            }]),
        },
        7 => Command::register_session(),
        8 => Command::expire_sessions(vec![u64::from(a)]),
        _ => Command::put(put_request("plain", "p")),
    };
    // Many commands carry a session tag, often a retry of the previous sequence.
    if c.is_multiple_of(2) {
        command.with_client_request(u64::from(a % 12) + 1, u64::from(b % 4) + 1)
    } else {
        command
    }
}

fn snapshot(store: &KvStore) -> Vec<u8> {
    let mut buffer = Vec::new();
    store.write_snapshot(&mut buffer).unwrap();
    buffer
}

fn restore(bytes: &[u8]) -> Result<KvStore, SnapshotError> {
    KvStore::restore(&mut &bytes[..], limits())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_and_restore_midway_changes_nothing(
        commands in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()), 2..80),
        split in any::<prop::sample::Index>(),
    ) {
        let commands: Vec<Command> = commands.into_iter().map(|(w, a, b, c)| command(w, a, b, c)).collect();
        let split = split.index(commands.len());
        let mut straight = KvStore::new(limits());
        let mut restored = KvStore::new(limits());
        for (position, command) in commands[..split].iter().enumerate() {
            let bytes = command.encode();
            let index = position as u64 + 1;
            prop_assert_eq!(straight.apply(index, &bytes), restored.apply(index, &bytes));
        }
        let image = snapshot(&restored);
        let mut restored = restore(&image).unwrap();
        prop_assert_eq!(restored.digest(), straight.digest());
        prop_assert_eq!(snapshot(&restored), image, "a restored store writes the same snapshot");
        for (position, command) in commands.iter().enumerate().skip(split) {
            let bytes = command.encode();
            let index = position as u64 + 1;
            prop_assert_eq!(straight.apply(index, &bytes), restored.apply(index, &bytes));
        }
        prop_assert_eq!(restored.digest(), straight.digest());
        prop_assert_eq!(restored.current_revision(), straight.current_revision());
        for revision in straight.compacted_revision().max(1)..=straight.current_revision() {
            let history = |store: &KvStore| store.events_since(revision, b"\0", b"\0", 1_000).unwrap();
            prop_assert_eq!(history(&restored), history(&straight));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A snapshot written in small steps while later commands (compactions included) apply is
    /// byte for byte the snapshot of the store at its beginning, and the deferred compaction
    /// changes nothing a reader sees, during or after.
    #[test]
    fn a_snapshot_written_beside_applies_is_the_state_at_its_beginning(
        commands in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()), 2..80),
        split in any::<prop::sample::Index>(),
        steps in prop::collection::vec(1usize..300, 1..80),
    ) {
        let commands: Vec<Command> = commands.into_iter().map(|(w, a, b, c)| command(w, a, b, c)).collect();
        let split = split.index(commands.len());
        let mut straight = KvStore::new(limits());
        let mut stepped = KvStore::new(limits());
        for (position, command) in commands[..split].iter().enumerate() {
            let bytes = command.encode();
            let index = position as u64 + 1;
            prop_assert_eq!(straight.apply(index, &bytes), stepped.apply(index, &bytes));
        }
        let image = snapshot(&straight);
        let mut cursor = stepped.begin_snapshot();
        let mut written = Vec::new();
        let mut done = false;
        let mut budgets = steps.iter().cycle();
        for (position, command) in commands.iter().enumerate().skip(split) {
            let bytes = command.encode();
            let index = position as u64 + 1;
            prop_assert_eq!(straight.apply(index, &bytes), stepped.apply(index, &bytes));
            prop_assert_eq!(stepped.digest(), straight.digest());
            prop_assert_eq!(stepped.hash_kv(0), straight.hash_kv(0));
            let revision = straight.compacted_revision().max(1);
            let history = |store: &KvStore| store.events_since(revision, b"\0", b"\0", 1_000);
            prop_assert_eq!(history(&stepped), history(&straight));
            if !done {
                let budget = *budgets.next().unwrap();
                done = stepped.continue_snapshot(&mut cursor, &mut written, budget).unwrap();
            }
        }
        while !done {
            let budget = *budgets.next().unwrap();
            done = stepped.continue_snapshot(&mut cursor, &mut written, budget).unwrap();
        }
        prop_assert!(written == image, "the stepped snapshot differs from the one at its beginning");
        stepped.end_snapshot(cursor);
        prop_assert_eq!(&stepped, &straight, "the deferred compaction ran when the snapshot ended");
    }
}

/// The case that needs the pin: a compaction mid-snapshot would drop versions the snapshot
/// has yet to write.
#[test]
fn a_compaction_during_a_snapshot_waits_for_it_without_showing_readers() {
    let mut store = KvStore::new(limits());
    let mut commands = Vec::new();
    for round in 0..3 {
        for key in 0..50 {
            commands.push(Command::put(put_request(
                &format!("k{key:02}"),
                &format!("v{round}"),
            )));
        }
    }
    commands.push(Command::delete_range(DeleteRangeRequest {
        key: bytes("k00"),
        ..DeleteRangeRequest::default()
    }));
    // A later write, so that the delete is older than the compaction revision (a tombstone at
    // the compaction revision itself stays, for watchers starting there).
    commands.push(Command::put(put_request("k01", "v3")));
    for (position, command) in commands.iter().enumerate() {
        store.apply(position as u64 + 1, &command.encode());
    }
    let image = snapshot(&store);
    let mut straight = store.clone();
    let at_begin = store.current_revision();
    let mut cursor = store.begin_snapshot();
    let mut written = Vec::new();
    assert!(
        !store
            .continue_snapshot(&mut cursor, &mut written, 1)
            .unwrap()
    );
    let later = [
        Command::compaction(CompactionRequest {
            revision: at_begin,
            physical: false,
        }),
        Command::put(put_request("k01", "after")),
    ];
    for (position, command) in later.iter().enumerate() {
        let index = (commands.len() + position) as u64 + 1;
        let result = store.apply(index, &command.encode());
        assert!(result.outcome.is_ok(), "{:?}", result.outcome);
        assert_eq!(result, straight.apply(index, &command.encode()));
    }
    // Readers see the compaction at once.
    assert!(store.events_since(at_begin - 1, b"k", b"l", 1_000).is_err());
    assert_eq!(store.digest(), straight.digest());
    assert_eq!(store.key_history_count(), 50, "the compaction waits");
    while !store
        .continue_snapshot(&mut cursor, &mut written, 64)
        .unwrap()
    {}
    assert!(
        written == image,
        "the snapshot lost the versions the compaction dropped"
    );
    store.end_snapshot(cursor);
    // The versions really go once the snapshot ends.
    assert_eq!(store.key_history_count(), 49);
    assert_eq!(store, straight);
}

/// Two snapshots overlap (a Raft snapshot and a backup): a compaction between their begins
/// waits for both, and each writes the store as it was when it began.
#[test]
fn overlapping_snapshots_each_write_their_own_point_in_time() {
    let mut store = KvStore::new(limits());
    let mut index = 0;
    let mut apply = |store: &mut KvStore, command: Command| {
        index += 1;
        let result = store.apply(index, &command.encode());
        assert!(result.outcome.is_ok(), "{:?}", result.outcome);
    };
    for round in 0..2 {
        for key in 0..20 {
            apply(
                &mut store,
                Command::put(put_request(&format!("k{key:02}"), &format!("v{round}"))),
            );
        }
    }
    let first_image = snapshot(&store);
    let mut first = store.begin_snapshot();
    let compact_at = store.current_revision();
    apply(&mut store, Command::put(put_request("k00", "v2")));
    apply(
        &mut store,
        Command::compaction(CompactionRequest {
            revision: compact_at,
            physical: false,
        }),
    );
    let second_image = snapshot(&store);
    let mut second = store.begin_snapshot();
    apply(&mut store, Command::put(put_request("k01", "v3")));
    let versions_kept = store.key_history_count();

    let write = |store: &KvStore, cursor: &mut flotilla_kv::SnapshotCursor| {
        let mut written = Vec::new();
        while !store.continue_snapshot(cursor, &mut written, 16).unwrap() {}
        written
    };
    assert!(
        write(&store, &mut first) == first_image,
        "the first snapshot's point in time"
    );
    store.end_snapshot(first);
    assert_eq!(
        store.key_history_count(),
        versions_kept,
        "the compaction still waits for the second snapshot"
    );
    assert!(
        write(&store, &mut second) == second_image,
        "the second snapshot's point in time"
    );
    store.end_snapshot(second);
    // Unpinned, the store is what a restore of its own snapshot is.
    assert_eq!(store, restore(&snapshot(&store)).unwrap());
}

#[test]
fn a_snapshot_of_a_store_replaced_meanwhile_fails_and_says_so() {
    let mut store = sample_store();
    let mut cursor = store.begin_snapshot();
    let mut written = Vec::new();
    assert!(
        !store
            .continue_snapshot(&mut cursor, &mut written, 1)
            .unwrap()
    );
    let replaced = restore(&snapshot(&store)).unwrap();
    let error = replaced
        .continue_snapshot(&mut cursor, &mut written, 1)
        .unwrap_err();
    assert!(error.to_string().contains("replaced"), "{error}");
    store.end_snapshot(cursor);
    // The pin is released: the next snapshot may begin.
    let cursor = store.begin_snapshot();
    store.end_snapshot(cursor);
}

fn sample_store() -> KvStore {
    let mut store = KvStore::new(limits());
    let commands = [
        Command::register_session(),
        Command::lease_grant(LeaseGrantRequest { ttl: 30, id: 7 }),
        Command::put(PutRequest {
            key: bytes("leased"),
            value: bytes("1"),
            lease: 7,
            ..PutRequest::default()
        }),
        Command::put(put_request("a", "1")).with_client_request(1, 1),
        Command::put(put_request("a", "2")),
        Command::delete_range(DeleteRangeRequest {
            key: bytes("a"),
            ..DeleteRangeRequest::default()
        }),
        Command::put(put_request("b", &"x".repeat(100))),
    ];
    for (position, command) in commands.iter().enumerate() {
        store.apply(position as u64 + 1, &command.encode());
    }
    store
}

#[test]
fn digest_tracks_the_state() {
    let store = sample_store();
    let mut changed = store.clone();
    assert_eq!(changed.digest(), store.digest());
    changed.apply(100, &Command::put(put_request("b", "other")).encode());
    assert_ne!(changed.digest(), store.digest());
    let mut index_only = store.clone();
    index_only.skip_index(200);
    assert_ne!(
        index_only.digest(),
        store.digest(),
        "the applied index is state too"
    );
}

#[test]
fn restore_keeps_leases_sessions_and_history() {
    let store = sample_store();
    let restored = restore(&snapshot(&store)).unwrap();
    assert_eq!(restored, store);
    let keys: Vec<_> = restored.lease(7).unwrap().keys().cloned().collect();
    assert_eq!(keys, vec![bytes("leased")]);
    assert_eq!(restored.session(1).unwrap().last_sequence(), 1);
    assert_eq!(restored.applied_index(), 7);
}

#[test]
fn corrupt_snapshots_are_refused() {
    let image = snapshot(&sample_store());
    let mut bad_magic = image.clone();
    bad_magic[0] = b'X';
    assert!(matches!(restore(&bad_magic), Err(SnapshotError::BadMagic)));
    let mut future_format = image.clone();
    future_format[8] = 9;
    assert!(matches!(
        restore(&future_format),
        Err(SnapshotError::UnsupportedFormat(9))
    ));
    let mut trailing = image.clone();
    trailing.push(0);
    assert!(matches!(
        restore(&trailing),
        Err(SnapshotError::TrailingBytes)
    ));
    for length in 0..image.len() {
        assert!(restore(&image[..length]).is_err(), "truncated at {length}");
    }
    // Any single flipped bit is caught: by the checksum, or earlier by a structural check.
    for position in 12..image.len() {
        let mut flipped = image.clone();
        flipped[position] ^= 0x10;
        assert!(restore(&flipped).is_err(), "flip at {position}");
    }
    let mut body_flip = image.clone();
    let last_value_byte = image.len() - 40;
    body_flip[last_value_byte] ^= 1;
    let error = restore(&body_flip).unwrap_err();
    assert!(error.to_string().contains("checksum") || error.to_string().contains("invalid"));
}

#[test]
fn snapshot_of_an_empty_store_round_trips() {
    let store = KvStore::new(limits());
    let restored = restore(&snapshot(&store)).unwrap();
    assert_eq!(restored.digest(), store.digest());
    assert_eq!(restored.current_revision(), 1);
}
