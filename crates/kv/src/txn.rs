//! Transactions (etcd-api.md §1.4, "How a Txn is evaluated").
//!
//! Order of work, as etcd 3.4 does it:
//! 1. structure checks (empty keys, duplicate keys) over both branches;
//! 2. every compare of the txn *and of the nested txns on the chosen path* is evaluated
//!    against the state before the txn, giving the path;
//! 3. the operations on the path are checked against that same state (read revisions, keys
//!    that ignore_value/ignore_lease need, leases);
//! 4. the path runs; reads inside it see the txn's own earlier writes, and all writes share
//!    one new revision (or none if nothing changed).

use std::cmp::Ordering;

use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::request_op::Request;
use flotilla_proto::etcdserverpb::response_op::Response;
use flotilla_proto::etcdserverpb::{Compare, RequestOp, ResponseOp, TxnRequest, TxnResponse};
use flotilla_proto::mvccpb::Event;

use crate::error::{ErrorKind, KvError};
use crate::key_range::KeyRange;
use crate::lease::Leases;
use crate::mvcc::{KeyVersion, Keyspace, PendingWrite};
use crate::range::{range, revision_header};
use crate::validate::check_txn;
use crate::write::{check_put, execute_delete_range, execute_put};

/// Which branch each txn on the chosen path takes, in pre-order (the txn, then its nested
/// txns in operation order, depth first).
struct Path {
    succeeded: Vec<bool>,
    next: usize,
}

impl Path {
    fn choose(keyspace: &Keyspace, txn: &TxnRequest) -> Path {
        let mut path = Path {
            succeeded: Vec::new(),
            next: 0,
        };
        path.visit(keyspace, txn, keyspace.current_revision());
        path
    }

    fn visit(&mut self, keyspace: &Keyspace, txn: &TxnRequest, revision: i64) {
        let succeeded = txn
            .compare
            .iter()
            .all(|compare| compare_holds(keyspace, compare, revision));
        self.succeeded.push(succeeded);
        for op in branch(txn, succeeded) {
            if let Some(Request::RequestTxn(nested)) = &op.request {
                self.visit(keyspace, nested, revision);
            }
        }
    }

    fn take(&mut self) -> bool {
        let succeeded = self.succeeded[self.next];
        self.next += 1;
        succeeded
    }

    fn rewind(&mut self) {
        self.next = 0;
    }

    fn is_consumed(&self) -> bool {
        self.next == self.succeeded.len()
    }
}

fn branch(txn: &TxnRequest, succeeded: bool) -> &[RequestOp] {
    if succeeded {
        &txn.success
    } else {
        &txn.failure
    }
}

/// All keys in the compare's range must satisfy it. With no key in the range, a VALUE
/// compare fails and the others compare against zero (so `create_revision == 0` tests that a
/// key is absent).
fn compare_holds(keyspace: &Keyspace, compare: &Compare, revision: i64) -> bool {
    let range = KeyRange::new(&compare.key, &compare.range_end);
    let mut any_key = false;
    for (_, version) in keyspace.live_range(range, revision) {
        any_key = true;
        if !compare_one(compare, Some(version)) {
            return false;
        }
    }
    if any_key {
        return true;
    }
    compare.target != CompareTarget::Value as i32 && compare_one(compare, None)
}

/// `target(key) <result> operand`. An operand of the wrong kind counts as zero (or empty); an
/// unknown result holds, an unknown target compares equal, as in etcd 3.4.
fn compare_one(compare: &Compare, version: Option<&KeyVersion>) -> bool {
    let field = |get: fn(&KeyVersion) -> i64| version.map_or(0, get);
    let ordering = match CompareTarget::try_from(compare.target) {
        Ok(CompareTarget::Value) => {
            let operand = match &compare.target_union {
                Some(TargetUnion::Value(value)) => &value[..],
                _ => &[],
            };
            version.map_or(&[][..], |v| &v.value[..]).cmp(operand)
        }
        Ok(CompareTarget::Version) => field(|v| v.version).cmp(&int_operand(compare)),
        Ok(CompareTarget::Create) => field(|v| v.create_revision).cmp(&int_operand(compare)),
        Ok(CompareTarget::Mod) => field(|v| v.mod_revision).cmp(&int_operand(compare)),
        Ok(CompareTarget::Lease) => field(|v| v.lease).cmp(&int_operand(compare)),
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(compare.result) {
        Ok(CompareResult::Equal) => ordering == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ordering != Ordering::Equal,
        Ok(CompareResult::Greater) => ordering == Ordering::Greater,
        Ok(CompareResult::Less) => ordering == Ordering::Less,
        Err(_) => true,
    }
}

fn int_operand(compare: &Compare) -> i64 {
    let expected = CompareTarget::try_from(compare.target);
    match (&compare.target_union, expected) {
        (Some(TargetUnion::Version(value)), Ok(CompareTarget::Version))
        | (Some(TargetUnion::CreateRevision(value)), Ok(CompareTarget::Create))
        | (Some(TargetUnion::ModRevision(value)), Ok(CompareTarget::Mod))
        | (Some(TargetUnion::Lease(value)), Ok(CompareTarget::Lease)) => *value,
        _ => 0,
    }
}

/// Checks every operation on the path against the state before the txn.
fn check_path(
    keyspace: &Keyspace,
    leases: &Leases,
    txn: &TxnRequest,
    path: &mut Path,
) -> Result<(), KvError> {
    let succeeded = path.take();
    for op in branch(txn, succeeded) {
        match &op.request {
            Some(Request::RequestRange(request)) => {
                keyspace.check_read_revision(request.revision, keyspace.current_revision())?;
            }
            Some(Request::RequestPut(request)) => check_put(keyspace, leases, request)?,
            Some(Request::RequestTxn(nested)) => check_path(keyspace, leases, nested, path)?,
            Some(Request::RequestDeleteRange(_)) | None => {}
        }
    }
    Ok(())
}

/// True if no branch, at any depth, writes.
pub(crate) fn is_read_only(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .all(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
            Some(Request::RequestTxn(nested)) => is_read_only(nested),
            Some(Request::RequestRange(_)) | None => true,
        })
}

/// Applies a txn: one new revision for all its writes, or none if it wrote nothing.
pub(crate) fn apply_txn(
    keyspace: &mut Keyspace,
    leases: &mut Leases,
    txn: &TxnRequest,
) -> Result<(TxnResponse, Vec<Event>), KvError> {
    check_txn(txn)?;
    let mut path = Path::choose(keyspace, txn);
    check_path(keyspace, leases, txn, &mut path)?;
    path.rewind();
    let mut write = keyspace.begin_write();
    let mut response = execute_path(keyspace, leases, &mut write, txn, &mut path);
    assert!(path.is_consumed(), "execution followed the checked path");
    let events = keyspace.commit(write);
    response.header = revision_header(keyspace.current_revision());
    Ok((response, events))
}

fn execute_path(
    keyspace: &mut Keyspace,
    leases: &mut Leases,
    write: &mut PendingWrite,
    txn: &TxnRequest,
    path: &mut Path,
) -> TxnResponse {
    let succeeded = path.take();
    let mut responses = Vec::with_capacity(branch(txn, succeeded).len());
    for op in branch(txn, succeeded) {
        let response = match op.request.as_ref().expect("empty ops are refused") {
            Request::RequestRange(request) => Response::ResponseRange(
                range(keyspace, request, write.view_revision())
                    .expect("read revisions were checked before the first write"),
            ),
            Request::RequestPut(request) => {
                Response::ResponsePut(execute_put(keyspace, leases, write, request))
            }
            Request::RequestDeleteRange(request) => Response::ResponseDeleteRange(
                execute_delete_range(keyspace, leases, write, request),
            ),
            Request::RequestTxn(nested) => {
                Response::ResponseTxn(execute_path(keyspace, leases, write, nested, path))
            }
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    TxnResponse {
        header: revision_header(write.view_revision()),
        succeeded,
        responses,
    }
}

/// Serves a txn that writes nothing from the applied state, without the log (etcd serves
/// read-only txns locally after a ReadIndex).
pub(crate) fn read_only_txn(keyspace: &Keyspace, txn: &TxnRequest) -> Result<TxnResponse, KvError> {
    check_txn(txn)?;
    if !is_read_only(txn) {
        return Err(ErrorKind::NotReadOnly.into());
    }
    let mut path = Path::choose(keyspace, txn);
    // A read-only txn has no puts, so the lease table is never consulted.
    let no_leases = Leases::default();
    check_path(keyspace, &no_leases, txn, &mut path)?;
    path.rewind();
    let response = read_path(keyspace, txn, &mut path);
    Ok(response)
}

fn read_path(keyspace: &Keyspace, txn: &TxnRequest, path: &mut Path) -> TxnResponse {
    let succeeded = path.take();
    let revision = keyspace.current_revision();
    let responses = branch(txn, succeeded)
        .iter()
        .map(|op| {
            let response = match op.request.as_ref().expect("empty ops are refused") {
                Request::RequestRange(request) => Response::ResponseRange(
                    range(keyspace, request, revision).expect("read revisions were checked"),
                ),
                Request::RequestTxn(nested) => {
                    Response::ResponseTxn(read_path(keyspace, nested, path))
                }
                Request::RequestPut(_) | Request::RequestDeleteRange(_) => {
                    unreachable!("read-only txn checked")
                }
            };
            ResponseOp {
                response: Some(response),
            }
        })
        .collect();
    TxnResponse {
        header: revision_header(revision),
        succeeded,
        responses,
    }
}
