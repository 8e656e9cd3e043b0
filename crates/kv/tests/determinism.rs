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
