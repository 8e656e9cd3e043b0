//! Fuzzing with proptest: no input of any shape makes the command decoder, apply or the
//! snapshot reader panic, and replicas fed the same garbage stay identical.

use flotilla_kv::{Command, KvStore, Limits};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Command::decode(&bytes);
    }

    /// With the right format byte, random bodies reach the protobuf decoder and, when they
    /// happen to decode, the state machine.
    #[test]
    fn apply_never_panics_on_format_1_garbage(
        entries in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..96), 1..24)
    ) {
        let mut first = KvStore::new(Limits::default());
        let mut second = KvStore::new(Limits::default());
        for (position, body) in entries.iter().enumerate() {
            let mut entry = vec![1u8];
            entry.extend_from_slice(body);
            let index = position as u64 + 1;
            prop_assert_eq!(first.apply(index, &entry), second.apply(index, &entry));
        }
        prop_assert_eq!(first.digest(), second.digest());
    }

    #[test]
    fn snapshot_reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut input = b"FLKVSNAP\x01\x00\x00\x00".to_vec();
        input.extend_from_slice(&bytes);
        prop_assert!(KvStore::restore(&mut &input[..], Limits::default()).is_err());
        let _ = KvStore::restore(&mut &bytes[..], Limits::default());
    }
}

mod structured {
    //! Well-formed protobuf with arbitrary field values: nested txns, unknown enum numbers,
    //! negative revisions, ignore flags on missing keys, leases that do not exist.

    use bytes::Bytes;
    use flotilla_kv::{Command, KvStore, Limits};
    use flotilla_proto::etcdserverpb::compare::TargetUnion;
    use flotilla_proto::etcdserverpb::request_op::Request;
    use flotilla_proto::etcdserverpb::{
        CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
        PutRequest, RangeRequest, RequestOp, TxnRequest,
    };
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = Bytes> {
        prop_oneof![
            prop::sample::select(&["", "a", "b", "\0", "\u{7f}"][..]).prop_map(Bytes::from),
            prop::collection::vec(any::<u8>(), 0..3).prop_map(Bytes::from),
        ]
    }

    fn small() -> impl Strategy<Value = i64> {
        prop_oneof![-3i64..12, any::<i64>()]
    }

    fn put() -> impl Strategy<Value = PutRequest> {
        (
            key(),
            key(),
            0i64..3,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(key, value, lease, prev_kv, ignore_value, ignore_lease)| {
                PutRequest {
                    key,
                    value,
                    lease,
                    prev_kv,
                    ignore_value,
                    ignore_lease,
                }
            })
    }

    fn range() -> impl Strategy<Value = RangeRequest> {
        (
            key(),
            key(),
            small(),
            small(),
            -1i32..5,
            -1i32..7,
            small(),
            small(),
        )
            .prop_map(
                |(
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order,
                    sort_target,
                    min_mod,
                    max_create,
                )| {
                    RangeRequest {
                        key,
                        range_end,
                        limit,
                        revision,
                        sort_order,
                        sort_target,
                        min_mod_revision: min_mod,
                        max_create_revision: max_create,
                        ..RangeRequest::default()
                    }
                },
            )
    }

    fn compare() -> impl Strategy<Value = Compare> {
        (key(), key(), -1i32..5, -1i32..6, small(), key(), 0u8..6).prop_map(
            |(key, range_end, result, target, number, value, which)| Compare {
                result,
                target,
                key,
                range_end,
                target_union: match which {
                    0 => None,
                    1 => Some(TargetUnion::Value(value)),
                    2 => Some(TargetUnion::Version(number)),
                    3 => Some(TargetUnion::CreateRevision(number)),
                    4 => Some(TargetUnion::ModRevision(number)),
                    _ => Some(TargetUnion::Lease(number)),
                },
            },
        )
    }

    fn request_op() -> impl Strategy<Value = RequestOp> {
        let leaf = prop_oneof![
            Just(RequestOp { request: None }),
            put().prop_map(|p| RequestOp {
                request: Some(Request::RequestPut(p))
            }),
            range().prop_map(|r| RequestOp {
                request: Some(Request::RequestRange(r))
            }),
            (key(), key(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| RequestOp {
                request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                    key,
                    range_end,
                    prev_kv
                })),
            }),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            (
                prop::collection::vec(compare(), 0..3),
                prop::collection::vec(inner.clone(), 0..4),
                prop::collection::vec(inner, 0..4),
            )
                .prop_map(|(compare, success, failure)| RequestOp {
                    request: Some(Request::RequestTxn(TxnRequest {
                        compare,
                        success,
                        failure,
                    })),
                })
        })
    }

    fn command() -> impl Strategy<Value = Command> {
        let operation = prop_oneof![
            3 => put().prop_map(Command::put),
            3 => request_op().prop_map(|op| match op.request {
                Some(Request::RequestTxn(txn)) => Command::txn(txn),
                _ => Command::txn(TxnRequest { compare: vec![], success: vec![op], failure: vec![] }),
            }),
            1 => small().prop_map(|revision| Command::compaction(CompactionRequest { revision, physical: false })),
            1 => (small(), 0i64..3).prop_map(|(ttl, id)| Command::lease_grant(LeaseGrantRequest { ttl, id })),
            1 => (0i64..3).prop_map(|id| Command::lease_revoke(LeaseRevokeRequest { id })),
            1 => Just(Command::register_session()),
            1 => prop::collection::vec(0u64..20, 0..3).prop_map(Command::expire_sessions),
        ];
        (operation, 0u64..6, 0u64..4).prop_map(|(command, session, sequence)| {
            if session > 0 && sequence > 0 {
                command.with_client_request(session, sequence)
            } else {
                command
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_commands_never_panic_and_replicas_agree(commands in prop::collection::vec(command(), 1..40)) {
            let mut first = KvStore::new(Limits::default());
            let mut second = KvStore::new(Limits::default());
            for (position, command) in commands.iter().enumerate() {
                let bytes = command.encode();
                let index = position as u64 + 1;
                prop_assert_eq!(first.apply(index, &bytes), second.apply(index, &bytes));
                if let flotilla_kv::Operation::Txn(txn) = &command.operation
                    && KvStore::is_read_only_txn(txn)
                {
                    let _ = first.read_only_txn(txn);
                }
                let _ = first.events_since(1, b"\0", b"\0", 50);
            }
            prop_assert_eq!(first.digest(), second.digest());
        }
    }
}
