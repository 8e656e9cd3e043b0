//! One test per semantic rule, each written from etcd's documented behaviour; the section of
//! `shared/reference/etcd-api.md` is cited on each.

mod common;

use common::*;
use flotilla_kv::{
    Admission, AllowAll, Author, Authorizer, Command, ErrorKind, KvStore, Limits, Response,
    SessionLimits,
};
use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::response_op::Response as OpResponse;
use flotilla_proto::etcdserverpb::{
    CompactionRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
};
use flotilla_proto::mvccpb::event::EventType;

fn error_kind(result: &flotilla_kv::ApplyResult) -> ErrorKind {
    match &result.outcome {
        Err(error) => error.kind(),
        Ok(response) => panic!("expected an error, got {response:?}"),
    }
}

fn keys(response: &flotilla_proto::etcdserverpb::RangeResponse) -> Vec<String> {
    response
        .kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
        .collect()
}

// ----- §1.3 the revision model --------------------------------------------------------------

/// §1.3: starts at 1; each write that changes something raises it by one; reads, read-only
/// txns and deletes of nothing keep it.
#[test]
fn revision_rises_only_on_changes() {
    let mut h = Harness::new();
    assert_eq!(h.revision(), 1);
    assert_eq!(h.put("a", "1").revision, 2);
    assert_eq!(h.delete("missing", "").revision, 2);
    let read_only = h.txn(txn(vec![], vec![range_op("a", "")], vec![]));
    assert_eq!(read_only.revision, 2);
    assert_eq!(expect_txn(&read_only).header.as_ref().unwrap().revision, 2);
    assert_eq!(h.delete("a", "").revision, 3);
}

/// §1.2: version 1 at creation, +1 per put even with the same value; delete resets it and a
/// re-created key gets a new create_revision.
#[test]
fn key_versions_and_create_revision() {
    let mut h = Harness::new();
    h.put("k", "v");
    h.put("k", "v");
    let kv = h.get("k").unwrap();
    assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (2, 2, 3));
    h.delete("k", "");
    assert!(h.get("k").is_none());
    h.put("k", "w");
    let kv = h.get("k").unwrap();
    assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (1, 5, 5));
}

// ----- §1.4 Range ----------------------------------------------------------------------------

fn abc_store() -> Harness {
    let mut h = Harness::new();
    for key in ["a", "b", "c", "foo", "foo/bar", "g"] {
        h.put(key, &format!("value-of-{key}"));
    }
    h
}

/// §1.4 key-range rules: single key, [key, end), prefix, "\0" = every key >= key, and
/// "\0".."\0" = all keys.
#[test]
fn range_forms() {
    let h = abc_store();
    assert_eq!(keys(&h.range(&range_request("b", ""))), ["b"]);
    assert_eq!(keys(&h.range(&range_request("b", "foo"))), ["b", "c"]);
    assert_eq!(
        keys(&h.range(&range_request("foo", "fop"))),
        ["foo", "foo/bar"]
    );
    assert_eq!(
        keys(&h.range(&range_request("c", "\0"))),
        ["c", "foo", "foo/bar", "g"]
    );
    assert_eq!(keys(&h.range(&range_request("\0", "\0"))).len(), 6);
    assert!(
        keys(&h.range(&range_request("z", "a"))).is_empty(),
        "inverted range is empty"
    );
}

/// §1.4: a missing key is not an error: OK, no kvs, count 0.
#[test]
fn missing_key_is_empty_not_error() {
    let h = abc_store();
    let response = h.range(&range_request("nope", ""));
    assert!(response.kvs.is_empty());
    assert_eq!(response.count, 0);
    assert_eq!(response.header.unwrap().revision, h.revision());
}

/// §1.4 / §3.1: an empty key is InvalidArgument "key is not provided".
#[test]
fn empty_key_is_refused_everywhere() {
    let mut h = Harness::new();
    let error = h.store.range(&range_request("", "\0")).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::EmptyKey);
    assert_eq!(error.client_message(), "etcdserver: key is not provided");
    assert_eq!(error_kind(&h.put("", "v")), ErrorKind::EmptyKey);
    assert_eq!(error_kind(&h.delete("", "\0")), ErrorKind::EmptyKey);
    assert_eq!(h.revision(), 1);
}

/// §1.4: limit cuts results and sets more; count is the whole range, before limit.
#[test]
fn limit_more_and_count() {
    let h = abc_store();
    let mut request = range_request("\0", "\0");
    request.limit = 2;
    let response = h.range(&request);
    assert_eq!(keys(&response), ["a", "b"]);
    assert!(response.more);
    assert_eq!(response.count, 6);
    request.limit = 6;
    assert!(!h.range(&request).more);
}

/// §1.4: keys_only leaves values out; count_only returns only the count.
#[test]
fn keys_only_and_count_only() {
    let h = abc_store();
    let mut request = range_request("a", "c");
    request.keys_only = true;
    let response = h.range(&request);
    assert_eq!(keys(&response), ["a", "b"]);
    assert!(response.kvs.iter().all(|kv| kv.value.is_empty()));
    request.keys_only = false;
    request.count_only = true;
    let response = h.range(&request);
    assert!(response.kvs.is_empty());
    assert_eq!(response.count, 2);
    assert!(!response.more);
}

/// §1.4 `revision`: older revisions read the past; future and compacted revisions are
/// OutOfRange with etcd's texts; reading at the compaction revision itself works; the header
/// carries the current revision even for an old read (§1.2).
#[test]
fn reads_at_past_revisions() {
    let mut h = Harness::new();
    h.put("k", "one"); // 2
    h.put("k", "two"); // 3
    h.put("k", "three"); // 4
    let mut request = range_request("k", "");
    request.revision = 2;
    let response = h.range(&request);
    assert_eq!(response.kvs[0].value, "one");
    assert_eq!(response.header.unwrap().revision, 4);
    request.revision = 5;
    let future = h.store.range(&request).unwrap_err();
    assert_eq!(
        future.client_message(),
        "etcdserver: mvcc: required revision is a future revision"
    );
    assert_eq!(future.grpc_code(), flotilla_kv::GrpcCode::OutOfRange);
    h.apply(Command::compaction(CompactionRequest {
        revision: 3,
        physical: false,
    }));
    request.revision = 2;
    let compacted = h.store.range(&request).unwrap_err();
    assert_eq!(
        compacted.client_message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    request.revision = 3;
    assert_eq!(h.range(&request).kvs[0].value, "two");
    request.revision = 0;
    assert_eq!(h.range(&request).kvs[0].value, "three");
    request.revision = -7;
    assert_eq!(
        h.range(&request).kvs[0].value,
        "three",
        "negative means latest"
    );
}

/// §1.4: with min/max filters etcd reads everything, filters, then limits; count is taken
/// before the filters.
#[test]
fn revision_filters() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("b", "1"); // 3
    h.put("c", "1"); // 4
    h.put("a", "2"); // 5
    let mut request = range_request("a", "\0");
    request.min_mod_revision = 3;
    request.max_mod_revision = 4;
    let response = h.range(&request);
    assert_eq!(keys(&response), ["b", "c"]);
    assert_eq!(response.count, 3);
    let mut request = range_request("a", "\0");
    request.max_create_revision = 3;
    request.limit = 1;
    let response = h.range(&request);
    assert_eq!(keys(&response), ["a"]);
    assert!(response.more);
    let mut request = range_request("a", "\0");
    request.min_create_revision = 3;
    assert_eq!(keys(&h.range(&request)), ["b", "c"]);
}

/// §1.4: sort by any target in either order; a non-KEY target with order NONE ascends; limit
/// applies after sorting.
#[test]
fn sorting() {
    let mut h = Harness::new();
    h.put("a", "z"); // 2
    h.put("b", "y"); // 3
    h.put("c", "x"); // 4
    h.put("b", "w"); // 5
    let mut request = range_request("a", "\0");
    request.sort_target = SortTarget::Mod as i32;
    request.sort_order = SortOrder::Descend as i32;
    assert_eq!(keys(&h.range(&request)), ["b", "c", "a"]);
    request.sort_order = SortOrder::None as i32;
    assert_eq!(
        keys(&h.range(&request)),
        ["a", "c", "b"],
        "NONE with a target ascends"
    );
    request.sort_target = SortTarget::Value as i32;
    request.sort_order = SortOrder::Ascend as i32;
    request.limit = 2;
    let response = h.range(&request);
    assert_eq!(keys(&response), ["b", "c"]);
    assert!(response.more);
    request.sort_target = SortTarget::Key as i32;
    request.sort_order = SortOrder::Descend as i32;
    request.limit = 0;
    assert_eq!(keys(&h.range(&request)), ["c", "b", "a"]);
    request.sort_target = SortTarget::Version as i32;
    assert_eq!(
        keys(&h.range(&request)),
        ["b", "a", "c"],
        "ties keep key order"
    );
    request.sort_target = SortTarget::Create as i32;
    request.sort_order = SortOrder::Ascend as i32;
    assert_eq!(keys(&h.range(&request)), ["a", "b", "c"]);
}

// ----- §1.4 Put and DeleteRange ------------------------------------------------------------

/// §1.4 Put: prev_kv is returned when asked and the key existed.
#[test]
fn put_returns_prev_kv_when_asked() {
    let mut h = Harness::new();
    let mut request = put_request("k", "1");
    request.prev_kv = true;
    let first = h.apply(Command::put(request.clone()));
    let Ok(Response::Put(response)) = first.outcome else {
        panic!()
    };
    assert!(response.prev_kv.is_none());
    assert_eq!(response.header.unwrap().revision, 2);
    request.value = bytes("2");
    let Ok(Response::Put(response)) = h.apply(Command::put(request)).outcome else {
        panic!()
    };
    assert_eq!(response.prev_kv.unwrap().value, "1");
    let Ok(Response::Put(response)) = h.put("k", "3").outcome else {
        panic!()
    };
    assert!(response.prev_kv.is_none(), "not asked");
}

/// §1.4 Put rules for ignore_value and ignore_lease, with their errors.
#[test]
fn ignore_value_and_ignore_lease() {
    let mut h = Harness::new();
    let lease = grant(&mut h, 0, 60);
    h.put_with_lease("k", "kept", lease);
    let keep_value = PutRequest {
        key: bytes("k"),
        ignore_value: true,
        ignore_lease: true,
        ..PutRequest::default()
    };
    assert!(h.apply(Command::put(keep_value.clone())).outcome.is_ok());
    let kv = h.get("k").unwrap();
    assert_eq!(
        (kv.value.as_ref(), kv.lease, kv.version),
        (&b"kept"[..], lease, 2)
    );

    let mut with_value = keep_value.clone();
    with_value.value = bytes("x");
    assert_eq!(
        error_kind(&h.apply(Command::put(with_value))),
        ErrorKind::ValueProvided
    );
    let mut with_lease = keep_value.clone();
    with_lease.lease = lease;
    assert_eq!(
        error_kind(&h.apply(Command::put(with_lease))),
        ErrorKind::LeaseProvided
    );
    let mut missing = keep_value;
    missing.key = bytes("missing");
    let result = h.apply(Command::put(missing));
    assert_eq!(error_kind(&result), ErrorKind::KeyNotFound);
    assert_eq!(
        result.outcome.unwrap_err().client_message(),
        "etcdserver: key not found"
    );
}

/// §1.4: a put with lease 0 detaches the key from its lease, unless ignore_lease.
#[test]
fn put_without_lease_detaches() {
    let mut h = Harness::new();
    let lease = grant(&mut h, 0, 60);
    h.put_with_lease("k", "1", lease);
    assert_eq!(h.store.lease(lease).unwrap().keys().len(), 1);
    h.put("k", "2");
    assert_eq!(h.get("k").unwrap().lease, 0);
    assert_eq!(h.store.lease(lease).unwrap().keys().len(), 0);
}

/// §1.4 / §3.1: a put on an unknown lease is NotFound "requested lease not found".
#[test]
fn put_with_unknown_lease() {
    let mut h = Harness::new();
    let result = h.put_with_lease("k", "v", 12345);
    assert_eq!(error_kind(&result), ErrorKind::LeaseNotFound);
    assert_eq!(
        result.outcome.unwrap_err().client_message(),
        "etcdserver: requested lease not found"
    );
    assert_eq!(h.revision(), 1);
}

/// §1.4 DeleteRange: reports the number deleted and the previous values when asked; §1.2:
/// a DELETE event's kv holds only the key and the delete's revision.
#[test]
fn delete_range_reports_and_emits_events() {
    let mut h = abc_store();
    let result = h.delete("foo", "fop");
    let Ok(Response::DeleteRange(response)) = &result.outcome else {
        panic!()
    };
    assert_eq!(response.deleted, 2);
    assert_eq!(response.prev_kvs.len(), 2);
    assert_eq!(response.prev_kvs[1].value, "value-of-foo/bar");
    assert_eq!(result.events.len(), 2);
    for event in &result.events {
        assert_eq!(event.r#type, EventType::Delete as i32);
        let kv = event.kv.as_ref().unwrap();
        assert_eq!(kv.mod_revision, result.revision);
        assert_eq!((kv.version, kv.create_revision, kv.lease), (0, 0, 0));
        assert!(kv.value.is_empty());
        assert!(event.prev_kv.is_some());
    }
}

// ----- §1.4 Txn ------------------------------------------------------------------------------

fn value_is(key: &str, value: &str) -> flotilla_proto::etcdserverpb::Compare {
    compare(
        key,
        CompareTarget::Value,
        CompareResult::Equal,
        TargetUnion::Value(bytes(value)),
    )
}

/// §1.4: every target with every result; integers numerically, values bytewise.
#[test]
fn compare_targets_and_results() {
    let mut h = Harness::new();
    let lease = grant(&mut h, 0, 60);
    h.put("k", "m"); // 2
    h.put_with_lease("k", "m", lease); // 3: version 2, create 2, mod 3
    let cases = [
        (
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(bytes("m")),
            true,
        ),
        (
            CompareTarget::Value,
            CompareResult::Greater,
            TargetUnion::Value(bytes("a")),
            true,
        ),
        (
            CompareTarget::Value,
            CompareResult::Less,
            TargetUnion::Value(bytes("a")),
            false,
        ),
        (
            CompareTarget::Value,
            CompareResult::NotEqual,
            TargetUnion::Value(bytes("m")),
            false,
        ),
        (
            CompareTarget::Version,
            CompareResult::Equal,
            TargetUnion::Version(2),
            true,
        ),
        (
            CompareTarget::Version,
            CompareResult::Less,
            TargetUnion::Version(10),
            true,
        ),
        (
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(2),
            true,
        ),
        (
            CompareTarget::Create,
            CompareResult::Greater,
            TargetUnion::CreateRevision(2),
            false,
        ),
        (
            CompareTarget::Mod,
            CompareResult::Equal,
            TargetUnion::ModRevision(3),
            true,
        ),
        (
            CompareTarget::Mod,
            CompareResult::NotEqual,
            TargetUnion::ModRevision(3),
            false,
        ),
        (
            CompareTarget::Lease,
            CompareResult::Equal,
            TargetUnion::Lease(lease),
            true,
        ),
        (
            CompareTarget::Lease,
            CompareResult::Greater,
            TargetUnion::Lease(0),
            true,
        ),
    ];
    for (target, result, operand, expected) in cases {
        let request = txn(
            vec![compare("k", target, result, operand.clone())],
            vec![],
            vec![],
        );
        let succeeded = h.store.read_only_txn(&request).unwrap().succeeded;
        assert_eq!(succeeded, expected, "{target:?} {result:?} {operand:?}");
    }
}

/// §1.4: against a missing key, VALUE compares fail and the others compare with zero, so
/// create_revision == 0 means "absent".
#[test]
fn compare_on_missing_key() {
    let h = Harness::new();
    let absent = compare(
        "nokey",
        CompareTarget::Create,
        CompareResult::Equal,
        TargetUnion::CreateRevision(0),
    );
    assert!(
        h.store
            .read_only_txn(&txn(vec![absent], vec![], vec![]))
            .unwrap()
            .succeeded
    );
    let version_zero = compare(
        "nokey",
        CompareTarget::Version,
        CompareResult::Equal,
        TargetUnion::Version(0),
    );
    assert!(
        h.store
            .read_only_txn(&txn(vec![version_zero], vec![], vec![]))
            .unwrap()
            .succeeded
    );
    let empty_value = value_is("nokey", "");
    assert!(
        !h.store
            .read_only_txn(&txn(vec![empty_value], vec![], vec![]))
            .unwrap()
            .succeeded
    );
    let not_equal = compare(
        "nokey",
        CompareTarget::Value,
        CompareResult::NotEqual,
        TargetUnion::Value(bytes("x")),
    );
    assert!(
        !h.store
            .read_only_txn(&txn(vec![not_equal], vec![], vec![]))
            .unwrap()
            .succeeded
    );
}

/// §1.4: a compare with range_end must hold for every key in the range; compares are ANDed.
#[test]
fn compare_over_a_range_and_conjunction() {
    let mut h = Harness::new();
    h.put("p/1", "x");
    h.put("p/2", "x");
    let mut all_x = value_is("p/", "x");
    all_x.range_end = bytes("p0");
    assert!(
        h.store
            .read_only_txn(&txn(vec![all_x.clone()], vec![], vec![]))
            .unwrap()
            .succeeded
    );
    h.put("p/3", "y");
    assert!(
        !h.store
            .read_only_txn(&txn(vec![all_x], vec![], vec![]))
            .unwrap()
            .succeeded
    );
    let both = vec![value_is("p/1", "x"), value_is("p/3", "x")];
    assert!(
        !h.store
            .read_only_txn(&txn(both, vec![], vec![]))
            .unwrap()
            .succeeded
    );
}

/// §1.4: the chosen branch runs at one new revision; succeeded says which; one response per
/// operation in order; reads inside see the txn's earlier writes.
#[test]
fn txn_branch_runs_atomically_at_one_revision() {
    let mut h = Harness::new();
    h.put("flag", "on"); // 2
    let request = txn(
        vec![value_is("flag", "on")],
        vec![
            put_op("a", "1"),
            put_op("b", "1"),
            range_op("a", "c"),
            delete_op("flag", ""),
        ],
        vec![put_op("never", "1")],
    );
    let result = h.txn(request.clone());
    let response = expect_txn(&result);
    assert!(response.succeeded);
    assert_eq!(response.responses.len(), 4);
    assert_eq!(result.revision, 3);
    assert_eq!(response.header.as_ref().unwrap().revision, 3);
    let inner = op_range(response, 2);
    assert_eq!(keys(inner), ["a", "b"]);
    assert_eq!(inner.kvs[0].mod_revision, 3);
    assert_eq!(result.events.len(), 3);
    assert!(
        result
            .events
            .iter()
            .all(|e| e.kv.as_ref().unwrap().mod_revision == 3)
    );
    assert!(h.get("never").is_none());
    // Now the flag is gone, so the failure branch runs.
    let result = h.txn(request);
    assert!(!expect_txn(&result).succeeded);
    assert!(h.get("never").is_some());
    assert_eq!(result.revision, 4);
}

/// §1.2: responses nested inside a Txn carry a header with only the revision set.
#[test]
fn nested_responses_carry_revision_headers() {
    let mut h = Harness::new();
    h.put("x", "0"); // 2
    let result = h.txn(txn(
        vec![],
        vec![range_op("x", ""), put_op("y", "1"), range_op("y", "")],
        vec![],
    ));
    let response = expect_txn(&result);
    let revisions: Vec<i64> = response
        .responses
        .iter()
        .map(|op| match op.response.as_ref().unwrap() {
            OpResponse::ResponseRange(r) => r.header.as_ref().unwrap().revision,
            OpResponse::ResponsePut(r) => r.header.as_ref().unwrap().revision,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(revisions, vec![2, 3, 3]);
    let header = op_range(response, 0).header.unwrap();
    assert_eq!(
        (header.cluster_id, header.member_id, header.raft_term),
        (0, 0, 0)
    );
}

/// §1.4: nested txns (since 3.3) choose their branch too; compares are evaluated against the
/// state before the txn, nested ones included (etcd 3.4 evaluates the whole path first).
#[test]
fn nested_txn_compares_see_the_state_before_the_txn() {
    let mut h = Harness::new();
    let inner = txn(
        vec![value_is("a", "new")],
        vec![put_op("saw-new", "1")],
        vec![put_op("saw-old", "1")],
    );
    h.put("a", "old");
    let result = h.txn(txn(vec![], vec![put_op("b", "1"), txn_op(inner)], vec![]));
    let response = expect_txn(&result);
    let Some(OpResponse::ResponseTxn(nested)) = &response.responses[1].response else {
        panic!()
    };
    assert!(!nested.succeeded);
    assert!(h.get("saw-old").is_some());
    // A nested compare on a key the outer txn writes sees the old value.
    let inner = txn(
        vec![value_is("c", "written")],
        vec![put_op("yes", "1")],
        vec![put_op("no", "1")],
    );
    h.txn(txn(
        vec![],
        vec![put_op("c", "written"), txn_op(inner)],
        vec![],
    ));
    assert!(h.get("no").is_some() && h.get("yes").is_none());
}

/// §1.4 / §3.1: overlapping puts (or put and delete) in one branch are refused with
/// "duplicate key given in txn request", and nothing changes.
#[test]
fn duplicate_keys_refuse_the_whole_txn() {
    let mut h = Harness::new();
    let result = h.txn(txn(
        vec![],
        vec![put_op("k", "1"), delete_op("a", "z")],
        vec![],
    ));
    assert_eq!(error_kind(&result), ErrorKind::DuplicateKey);
    assert_eq!(
        result.outcome.unwrap_err().client_message(),
        "etcdserver: duplicate key given in txn request"
    );
    assert_eq!(h.revision(), 1);
}

/// A check that fails on the chosen path (an unknown lease) refuses the txn before any write.
#[test]
fn failed_check_on_the_path_changes_nothing() {
    let mut h = Harness::new();
    let mut leased = put_request("b", "1");
    leased.lease = 99;
    let op = flotilla_proto::etcdserverpb::RequestOp {
        request: Some(flotilla_proto::etcdserverpb::request_op::Request::RequestPut(leased)),
    };
    let result = h.txn(txn(vec![], vec![put_op("a", "1"), op.clone()], vec![]));
    assert_eq!(error_kind(&result), ErrorKind::LeaseNotFound);
    assert!(h.get("a").is_none());
    assert_eq!(h.revision(), 1);
    // The same op on the branch not taken is not checked.
    let result = h.txn(txn(
        vec![value_is("x", "never")],
        vec![op],
        vec![put_op("a", "1")],
    ));
    assert!(result.outcome.is_ok());
    assert!(h.get("a").is_some());
}

/// A range inside a txn at a compacted revision refuses the txn with the compacted error.
#[test]
fn txn_range_at_compacted_revision() {
    let mut h = Harness::new();
    h.put("a", "1");
    h.put("a", "2");
    h.apply(Command::compaction(CompactionRequest {
        revision: 3,
        physical: false,
    }));
    let mut old_read = range_request("a", "");
    old_read.revision = 2;
    let op = flotilla_proto::etcdserverpb::RequestOp {
        request: Some(flotilla_proto::etcdserverpb::request_op::Request::RequestRange(old_read)),
    };
    let result = h.txn(txn(vec![], vec![put_op("b", "1"), op], vec![]));
    assert_eq!(error_kind(&result), ErrorKind::Compacted);
    assert!(h.get("b").is_none());
}

/// Read-only txns are served locally; one that may write is refused.
#[test]
fn read_only_txn_serving() {
    let mut h = abc_store();
    let reading = txn(
        vec![value_is("a", "value-of-a")],
        vec![range_op("a", "c")],
        vec![],
    );
    assert!(KvStore::is_read_only_txn(&reading));
    let response = h.store.read_only_txn(&reading).unwrap();
    assert_eq!(keys(op_range(&response, 0)), ["a", "b"]);
    let writing = txn(
        vec![],
        vec![],
        vec![txn_op(txn(vec![], vec![put_op("z", "1")], vec![]))],
    );
    assert!(!KvStore::is_read_only_txn(&writing));
    assert_eq!(
        h.store.read_only_txn(&writing).unwrap_err().kind(),
        ErrorKind::NotReadOnly
    );
    // Applied through the log, the same txn works.
    assert!(h.txn(writing).outcome.is_ok());
}

// ----- §1.4 Compaction -------------------------------------------------------------------------

/// §1.4 Compaction: at or below the compaction point → compacted; above current → future;
/// the latest version of every live key stays.
#[test]
fn compaction_rules() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("b", "1"); // 3
    h.delete("b", ""); // 4
    h.put("a", "2"); // 5
    let compact = |revision| {
        Command::compaction(CompactionRequest {
            revision,
            physical: true,
        })
    };
    assert_eq!(error_kind(&h.apply(compact(6))), ErrorKind::FutureRevision);
    let result = h.apply(compact(4));
    assert!(matches!(result.outcome, Ok(Response::Compaction(_))));
    assert_eq!(
        result.revision, 5,
        "compaction does not change the revision"
    );
    assert_eq!(h.store.compacted_revision(), 4);
    assert_eq!(error_kind(&h.apply(compact(4))), ErrorKind::Compacted);
    assert_eq!(error_kind(&h.apply(compact(3))), ErrorKind::Compacted);
    assert_eq!(h.get("a").unwrap().value, "2");
    let mut at_four = range_request("a", "\0");
    at_four.revision = 4;
    assert_eq!(keys(&h.range(&at_four)), ["a"]);
    assert_eq!(
        h.store.key_history_count(),
        2,
        "a delete at the compaction revision stays, for a watcher starting there"
    );
    let watched = h.store.events_since(4, b"b", b"", 10).unwrap();
    assert_eq!(
        watched.events.len(),
        1,
        "the delete at the compaction revision"
    );
    assert!(matches!(
        h.apply(compact(5)).outcome,
        Ok(Response::Compaction(_))
    ));
    assert_eq!(
        h.store.key_history_count(),
        1,
        "the deleted key's history is gone once it is older than the compaction"
    );
}

// ----- §1.6 Leases ---------------------------------------------------------------------------

fn grant(h: &mut Harness, id: i64, ttl: i64) -> i64 {
    let result = h.apply(Command::lease_grant(LeaseGrantRequest { ttl, id }));
    match result.outcome {
        Ok(Response::LeaseGrant(response)) => {
            assert_eq!(response.ttl, ttl);
            response.id
        }
        other => panic!("grant failed: {other:?}"),
    }
}

/// §1.6: grant with a chosen or assigned id; an existing id and a TTL over 9e9 are refused.
#[test]
fn lease_grant_rules() {
    let mut h = Harness::new();
    assert_eq!(grant(&mut h, 0x77, 30), 0x77);
    let assigned = grant(&mut h, 0, 30);
    assert!(assigned > 0 && assigned != 0x77);
    let again = h.apply(Command::lease_grant(LeaseGrantRequest {
        ttl: 30,
        id: 0x77,
    }));
    assert_eq!(error_kind(&again), ErrorKind::LeaseExists);
    assert_eq!(
        again.outcome.unwrap_err().client_message(),
        "etcdserver: lease already exists"
    );
    let huge = h.apply(Command::lease_grant(LeaseGrantRequest {
        ttl: 9_000_000_001,
        id: 0,
    }));
    assert_eq!(error_kind(&huge), ErrorKind::LeaseTtlTooLarge);
    assert_eq!(h.store.lease(0x77).unwrap().granted_ttl_seconds(), 30);
    let ids: Vec<_> = h.store.leases().map(|lease| lease.id()).collect();
    assert_eq!(ids, vec![assigned.min(0x77), assigned.max(0x77)]);
}

/// §1.6: revoke deletes every attached key in one revision with DELETE events; an unknown
/// id is NotFound.
#[test]
fn lease_revoke_deletes_attached_keys_in_one_revision() {
    let mut h = Harness::new();
    let lease = grant(&mut h, 0, 10);
    h.put_with_lease("b", "1", lease);
    h.put_with_lease("a", "1", lease);
    h.put("c", "unleased");
    let keys_attached: Vec<_> = h.store.lease(lease).unwrap().keys().cloned().collect();
    assert_eq!(keys_attached, vec![bytes("a"), bytes("b")]);
    let result = h.apply(Command::lease_revoke(LeaseRevokeRequest { id: lease }));
    assert_eq!(result.revision, 5);
    let deleted: Vec<_> = result
        .events
        .iter()
        .map(|e| e.kv.clone().unwrap().key)
        .collect();
    assert_eq!(deleted, vec![bytes("a"), bytes("b")]);
    assert!(
        result
            .events
            .iter()
            .all(|e| e.r#type == EventType::Delete as i32)
    );
    assert!(h.get("a").is_none() && h.get("c").is_some());
    assert!(h.store.lease(lease).is_none());
    let again = h.apply(Command::lease_revoke(LeaseRevokeRequest { id: lease }));
    assert_eq!(error_kind(&again), ErrorKind::LeaseNotFound);
}

/// Moving a key to another lease, or deleting it, detaches it from the old one.
#[test]
fn lease_attachment_follows_the_key() {
    let mut h = Harness::new();
    let first = grant(&mut h, 0, 10);
    let second = grant(&mut h, 0, 10);
    h.put_with_lease("k", "1", first);
    h.put_with_lease("k", "2", second);
    assert_eq!(h.store.lease(first).unwrap().keys().len(), 0);
    assert_eq!(h.store.lease(second).unwrap().keys().len(), 1);
    h.delete("k", "");
    assert_eq!(h.store.lease(second).unwrap().keys().len(), 0);
    // Revoking the second lease now deletes nothing and keeps the revision.
    let before = h.revision();
    let result = h.apply(Command::lease_revoke(LeaseRevokeRequest { id: second }));
    assert!(result.outcome.is_ok());
    assert_eq!(result.revision, before);
}

#[test]
fn lease_checkpoint_is_recorded() {
    let mut h = Harness::new();
    let lease = grant(&mut h, 0, 100);
    h.apply(Command::lease_checkpoint(vec![
        flotilla_kv::LeaseRemaining {
            id: lease,
            remaining_ttl: 40,
        },
    ]));
    assert_eq!(
        h.store
            .lease(lease)
            .unwrap()
            .checkpointed_remaining_ttl_seconds(),
        Some(40)
    );
}

// ----- §1.5 Watch events -------------------------------------------------------------------

/// §1.5: a PUT event carries the whole new key-value (version 1 on creation) and prev_kv; a
/// watch from an old revision replays history in order; a compacted start is refused.
#[test]
fn events_and_history_replay() {
    let mut h = Harness::new();
    let created = h.put("w/a", "1");
    assert_eq!(created.events.len(), 1);
    let kv = created.events[0].kv.as_ref().unwrap();
    assert_eq!((kv.version, kv.mod_revision, kv.create_revision), (1, 2, 2));
    assert!(created.events[0].prev_kv.is_none());
    let updated = h.put("w/a", "2");
    assert_eq!(updated.events[0].prev_kv.as_ref().unwrap().value, "1");
    h.txn(txn(
        vec![],
        vec![put_op("w/c", "1"), put_op("w/b", "1")],
        vec![],
    )); // 4
    h.put("other", "1"); // 5
    h.delete("w/", "w0"); // 6
    let batch = h.store.events_since(3, b"w/", b"w0", 100).unwrap();
    let seen: Vec<(i64, String)> = batch
        .events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (kv.mod_revision, String::from_utf8(kv.key.to_vec()).unwrap())
        })
        .collect();
    let expected = [
        (3, "w/a"),
        (4, "w/c"),
        (4, "w/b"),
        (6, "w/a"),
        (6, "w/b"),
        (6, "w/c"),
    ];
    let expected: Vec<_> = expected.iter().map(|(r, k)| (*r, k.to_string())).collect();
    assert_eq!(
        seen, expected,
        "txn order within a revision, key order for a range delete"
    );
    assert_eq!(batch.next_revision, 7);
    // events_max stops at a revision boundary.
    let partial = h.store.events_since(3, b"w/", b"w0", 2).unwrap();
    assert_eq!(partial.events.len(), 3);
    assert_eq!(partial.next_revision, 5);
    h.apply(Command::compaction(CompactionRequest {
        revision: 5,
        physical: false,
    }));
    let error = h.store.events_since(4, b"w/", b"w0", 100).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Compacted);
    assert_eq!(
        h.store
            .events_since(5, b"w/", b"w0", 100)
            .unwrap()
            .events
            .len(),
        3
    );
}

// ----- duplicate suppression (thesis §6.3) ---------------------------------------------------

fn register(h: &mut Harness) -> u64 {
    match h.apply(Command::register_session()).outcome {
        Ok(Response::SessionRegistered { session_id, .. }) => session_id,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retried_write_is_applied_once() {
    let mut h = Harness::new();
    let session = register(&mut h);
    assert_eq!(session, 1, "a session's id is its registration's log index");
    let put = Command::put(put_request("counter", "1")).with_client_request(session, 1);
    let first = h.apply(put.clone());
    let retry = h.apply(put);
    assert!(retry.duplicate);
    assert!(retry.events.is_empty());
    assert_eq!(retry.outcome, first.outcome);
    assert_eq!(h.get("counter").unwrap().version, 1);
    assert_eq!(h.revision(), 2);
    // The next sequence applies; an older one is stale.
    let next = Command::put(put_request("counter", "2")).with_client_request(session, 2);
    assert!(!h.apply(next).duplicate);
    let stale = Command::put(put_request("counter", "x")).with_client_request(session, 1);
    assert_eq!(error_kind(&h.apply(stale)), ErrorKind::StaleSequence);
    assert_eq!(h.get("counter").unwrap().value, "2");
}

#[test]
fn errors_are_remembered_too() {
    let mut h = Harness::new();
    let session = register(&mut h);
    let put = Command::put(PutRequest {
        key: bytes("k"),
        lease: 5,
        ..PutRequest::default()
    })
    .with_client_request(session, 1);
    assert_eq!(error_kind(&h.apply(put.clone())), ErrorKind::LeaseNotFound);
    grant(&mut h, 5, 10);
    let retry = h.apply(put);
    assert!(retry.duplicate);
    assert_eq!(
        error_kind(&retry),
        ErrorKind::LeaseNotFound,
        "same answer, not a second try"
    );
}

#[test]
fn unknown_expired_and_evicted_sessions_are_refused() {
    let limits = Limits {
        sessions: SessionLimits {
            sessions_max: 2,
            ..SessionLimits::default()
        },
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let unknown = Command::put(put_request("k", "v")).with_client_request(77, 1);
    assert_eq!(error_kind(&h.apply(unknown)), ErrorKind::SessionNotFound);
    let first = register(&mut h);
    let second = register(&mut h);
    h.apply(Command::put(put_request("k", "1")).with_client_request(second, 1));
    let third = register(&mut h); // evicts `first`, the least recently used
    assert!(h.store.session(first).is_none());
    let from_evicted = Command::put(put_request("k", "2")).with_client_request(first, 1);
    assert_eq!(
        error_kind(&h.apply(from_evicted)),
        ErrorKind::SessionNotFound
    );
    let expired = h.apply(Command::expire_sessions(vec![second, 999]));
    assert_eq!(
        expired.outcome,
        Ok(Response::SessionsExpired { expired: 1 })
    );
    let from_expired = Command::put(put_request("k", "3")).with_client_request(second, 2);
    assert_eq!(
        error_kind(&h.apply(from_expired)),
        ErrorKind::SessionNotFound
    );
    assert!(h.store.session(third).is_some());
    assert_eq!(h.get("k").unwrap().value, "1");
}

#[test]
fn oversized_responses_are_not_retained_but_still_applied_once() {
    let limits = Limits {
        sessions: SessionLimits {
            session_response_bytes_max: 64,
            ..SessionLimits::default()
        },
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let session = register(&mut h);
    h.put("big", &"x".repeat(200));
    let read_big = txn(
        vec![],
        vec![range_op("big", ""), put_op("marker", "1")],
        vec![],
    );
    let command = Command::txn(read_big).with_client_request(session, 1);
    assert!(h.apply(command.clone()).outcome.is_ok());
    let retry = h.apply(command);
    assert_eq!(error_kind(&retry), ErrorKind::ResponseNotRetained);
    assert_eq!(h.get("marker").unwrap().version, 1);
}

// ----- malformed commands --------------------------------------------------------------------

#[test]
fn malformed_commands_are_errors_and_change_nothing() {
    let mut a = KvStore::new(Limits::default());
    let mut b = KvStore::new(Limits::default());
    for (index, garbage) in [&[][..], &[9, 9, 9], &[1, 0xff, 0xff]]
        .into_iter()
        .enumerate()
    {
        let ra = a.apply(index as u64 + 1, garbage);
        let rb = b.apply(index as u64 + 1, garbage);
        assert_eq!(ra, rb);
        assert_eq!(ra.outcome.unwrap_err().kind(), ErrorKind::MalformedCommand);
    }
    assert_eq!(a.applied_index(), 3);
    assert_eq!(a.current_revision(), 1);
    assert_eq!(a.digest(), b.digest());
}

#[test]
#[should_panic(expected = "applied after entry")]
fn applying_an_old_index_is_a_driver_bug() {
    let mut store = KvStore::new(Limits::default());
    store.apply(5, &Command::register_session().encode());
    store.apply(5, &Command::register_session().encode());
}

#[test]
fn range_request_sanity() {
    // A bare request with defaults behaves as documented.
    let h = abc_store();
    let request = RangeRequest {
        key: bytes("a"),
        ..RangeRequest::default()
    };
    assert_eq!(h.range(&request).count, 1);
}

/// §1.8 HashKV: members that applied the same writes agree; the hash covers the history up
/// to the revision asked; a compacted revision is refused.
#[test]
fn hash_kv_agrees_and_follows_revisions() {
    let mut first = Harness::new();
    let mut second = Harness::new();
    for h in [&mut first, &mut second] {
        h.put("a", "1");
        h.put("b", "2");
    }
    assert_eq!(first.store.hash_kv(0), second.store.hash_kv(0));
    let (at_two, covered) = first.store.hash_kv(2).unwrap();
    assert_eq!(covered, 2);
    first.put("c", "3");
    assert_eq!(
        first.store.hash_kv(2).unwrap().0,
        at_two,
        "later writes do not change it"
    );
    assert_ne!(first.store.hash_kv(0).unwrap().0, at_two);
    first.apply(Command::compaction(CompactionRequest {
        revision: 3,
        physical: false,
    }));
    assert_eq!(
        first.store.hash_kv(2).unwrap_err().kind(),
        ErrorKind::Compacted
    );
}

#[test]
fn in_process_commands_with_zero_session_fields_are_malformed() {
    let mut h = Harness::new();
    let session = register(&mut h);
    for (session_id, sequence) in [(session, 0), (0, 1)] {
        let command = Command::put(put_request("k", "v")).with_client_request(session_id, sequence);
        h.index += 1;
        let result = h.store.apply_command(h.index, &command);
        assert_eq!(error_kind(&result), ErrorKind::MalformedCommand);
    }
    assert!(h.get("k").is_none());
}

/// Under a NOSPACE alarm puts and grants are refused and change nothing, deletes still apply;
/// under CORRUPT every client command is refused.
#[test]
fn alarms_refuse_what_they_cap_and_nothing_else() {
    use flotilla_kv::ErrorKind;
    let mut store = KvStore::new(Limits::default());
    let put = |key: &'static str| {
        Command::put(PutRequest {
            key: key.into(),
            value: "v".into(),
            ..Default::default()
        })
        .encode()
    };
    assert!(store.apply(1, &put("a")).outcome.is_ok());
    let size = store.size_bytes();
    let refused = store.apply_admitted(2, &put("b"), Admission::NoNewSpace, &AllowAll);
    assert_eq!(refused.outcome.unwrap_err().kind(), ErrorKind::NoSpace);
    assert_eq!((refused.revision, store.size_bytes()), (2, size));
    let grant = Command::lease_grant(flotilla_proto::etcdserverpb::LeaseGrantRequest {
        ttl: 10,
        ..Default::default()
    });
    let refused = store.apply_admitted(3, &grant.encode(), Admission::NoNewSpace, &AllowAll);
    assert_eq!(refused.outcome.unwrap_err().kind(), ErrorKind::NoSpace);
    assert_eq!(store.leases().len(), 0);
    let delete = Command::delete_range(flotilla_proto::etcdserverpb::DeleteRangeRequest {
        key: "a".into(),
        ..Default::default()
    });
    let corrupt = store.apply_admitted(4, &delete.encode(), Admission::Nothing, &AllowAll);
    assert_eq!(corrupt.outcome.unwrap_err().kind(), ErrorKind::Corrupt);
    let deleted = store.apply_admitted(5, &delete.encode(), Admission::NoNewSpace, &AllowAll);
    assert!(deleted.outcome.is_ok());
    assert_eq!(deleted.revision, 3);
}

/// Refuses every command of one author, lets everything else run.
struct RefuseAuthor(&'static str);

impl Authorizer for RefuseAuthor {
    fn authorize(
        &self,
        author: Option<&Author>,
        _: &flotilla_kv::Operation,
        _: &KvStore,
    ) -> Result<(), flotilla_kv::KvError> {
        match author {
            Some(author) if author.user == self.0 => {
                Err(flotilla_kv::KvError::new(ErrorKind::PermissionDenied))
            }
            _ => Ok(()),
        }
    }
}

/// A command its author may not run changes nothing, and its session does not remember the
/// refusal: the same request, retried with credentials that pass, applies once.
#[test]
fn an_authorizer_refusal_changes_nothing_and_is_decided_again_on_retry() {
    let mut store = KvStore::new(Limits::default());
    let registered = store.apply(1, &Command::register_session().encode());
    let session = registered.index;
    let put = |user: &str| {
        Command::put(PutRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        })
        .with_client_request(session, 1)
        .with_author(Some(Author {
            user: user.into(),
            auth_revision: 1,
        }))
        .encode()
    };
    let refused =
        store.apply_admitted(2, &put("mallory"), Admission::All, &RefuseAuthor("mallory"));
    assert_eq!(
        refused.outcome.unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    assert_eq!(refused.revision, 1, "nothing was written");
    let applied = store.apply_admitted(3, &put("alice"), Admission::All, &RefuseAuthor("mallory"));
    assert!(applied.outcome.is_ok());
    assert!(
        !applied.duplicate,
        "the refusal was not remembered as the answer"
    );
    assert_eq!(applied.revision, 2);
    let retried = store.apply_admitted(4, &put("alice"), Admission::All, &RefuseAuthor("mallory"));
    assert!(retried.duplicate, "the applied request is remembered");
    assert_eq!(retried.revision, 2);
    // A command without an author is the server's own: never refused.
    let internal = Command::lease_grant(flotilla_proto::etcdserverpb::LeaseGrantRequest {
        ttl: 10,
        ..Default::default()
    });
    let granted = store.apply_admitted(5, &internal.encode(), Admission::All, &RefuseAuthor(""));
    assert!(granted.outcome.is_ok());
}
