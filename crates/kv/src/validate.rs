//! Checks on requests that need no state.
//!
//! Two layers (see [`crate::limits`]):
//! - *Structure* (`check_*`): empty keys, the ignore_value/ignore_lease flags, sort options,
//!   duplicate keys in a txn. Independent of configuration, so apply runs them too and every
//!   member reaches the same answer for the same log entry.
//! - *Limits* (`validate_*`, public): sizes and txn operation counts against
//!   [`RequestLimits`], plus the structure checks. The server calls these before proposing,
//!   exactly as etcd checks in its gRPC layer; apply does not repeat them.

use std::collections::BTreeSet;

use flotilla_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, range_request,
    request_op::Request,
};
use flotilla_proto::flotilla::kv::v1::command::Operation;

use crate::command::Command;
use crate::error::{ErrorKind, KvError};
use crate::key_range::KeyRange;
use crate::limits::RequestLimits;

// ----- structure ---------------------------------------------------------------------------

fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(ErrorKind::EmptyKey.into());
    }
    Ok(())
}

pub(crate) fn check_range(request: &RangeRequest) -> Result<(), KvError> {
    check_key(&request.key)?;
    let order_known = range_request::SortOrder::try_from(request.sort_order).is_ok();
    let target_known = range_request::SortTarget::try_from(request.sort_target).is_ok();
    if !order_known || !target_known {
        return Err(KvError::with_detail(
            ErrorKind::InvalidSortOption,
            format!(
                "sort_order {} sort_target {}",
                request.sort_order, request.sort_target
            ),
        ));
    }
    Ok(())
}

/// etcd-api.md §1.4, Put rules: ignore_value needs an empty value, ignore_lease a zero lease.
pub(crate) fn check_put(request: &PutRequest) -> Result<(), KvError> {
    check_key(&request.key)?;
    if request.ignore_value && !request.value.is_empty() {
        return Err(ErrorKind::ValueProvided.into());
    }
    if request.ignore_lease && request.lease != 0 {
        return Err(ErrorKind::LeaseProvided.into());
    }
    Ok(())
}

pub(crate) fn check_delete_range(request: &DeleteRangeRequest) -> Result<(), KvError> {
    check_key(&request.key)
}

/// Every compare and operation is well formed, and no branch writes a key twice.
pub(crate) fn check_txn(request: &TxnRequest) -> Result<(), KvError> {
    check_txn_operations(request)?;
    BranchWrites::collect(&request.success)?;
    BranchWrites::collect(&request.failure)?;
    Ok(())
}

fn check_txn_operations(request: &TxnRequest) -> Result<(), KvError> {
    for compare in &request.compare {
        check_key(&compare.key)?;
    }
    for op in request.success.iter().chain(&request.failure) {
        check_op(op)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp) -> Result<(), KvError> {
    match &op.request {
        Some(Request::RequestRange(range)) => check_range(range),
        Some(Request::RequestPut(put)) => check_put(put),
        Some(Request::RequestDeleteRange(delete)) => check_delete_range(delete),
        Some(Request::RequestTxn(txn)) => check_txn_operations(txn),
        // etcd answers an empty operation with "key not found".
        None => Err(KvError::with_detail(
            ErrorKind::KeyNotFound,
            "empty operation in txn",
        )),
    }
}

/// The keys one branch writes, nested txns included (both of their branches, which may
/// overlap each other since only one runs). Refuses a key put twice, or put and deleted:
/// etcd-api.md §1.4 ("duplicate key given in txn request"). Checking puts against deletes in
/// both directions also guarantees each key changes at most once per revision.
#[derive(Default)]
struct BranchWrites<'a> {
    puts: BTreeSet<&'a [u8]>,
    deletes: Vec<KeyRange<'a>>,
}

impl<'a> BranchWrites<'a> {
    fn collect(ops: &'a [RequestOp]) -> Result<BranchWrites<'a>, KvError> {
        let mut writes = BranchWrites::default();
        for op in ops {
            match &op.request {
                Some(Request::RequestPut(put)) => writes.add_put(&put.key)?,
                Some(Request::RequestDeleteRange(delete)) => {
                    writes.add_delete(KeyRange::new(&delete.key, &delete.range_end))?
                }
                Some(Request::RequestTxn(txn)) => writes.add_nested(txn)?,
                Some(Request::RequestRange(_)) | None => {}
            }
        }
        Ok(writes)
    }

    fn add_put(&mut self, key: &'a [u8]) -> Result<(), KvError> {
        self.check_put(key)?;
        self.puts.insert(key);
        Ok(())
    }

    fn add_delete(&mut self, range: KeyRange<'a>) -> Result<(), KvError> {
        self.check_delete(range)?;
        self.deletes.push(range);
        Ok(())
    }

    fn add_nested(&mut self, txn: &'a TxnRequest) -> Result<(), KvError> {
        let success = BranchWrites::collect(&txn.success)?;
        let failure = BranchWrites::collect(&txn.failure)?;
        for branch in [&success, &failure] {
            for put in &branch.puts {
                self.check_put(put)?;
            }
            for delete in &branch.deletes {
                self.check_delete(*delete)?;
            }
        }
        for branch in [success, failure] {
            self.puts.extend(branch.puts);
            self.deletes.extend(branch.deletes);
        }
        Ok(())
    }

    fn check_put(&self, key: &[u8]) -> Result<(), KvError> {
        let single = KeyRange::Single(key);
        if self.puts.contains(key) || self.deletes.iter().any(|range| range.overlaps(&single)) {
            return Err(duplicate_key(key));
        }
        Ok(())
    }

    fn check_delete(&self, range: KeyRange<'_>) -> Result<(), KvError> {
        let Some(bounds) = range.bounds() else {
            return Ok(());
        };
        if let Some(put) = self.puts.range::<&[u8], _>(bounds).next() {
            return Err(duplicate_key(put));
        }
        Ok(())
    }
}

fn duplicate_key(key: &[u8]) -> KvError {
    KvError::with_detail(
        ErrorKind::DuplicateKey,
        format!("key {:?}", String::from_utf8_lossy(key)),
    )
}

// ----- limits (before proposing) -----------------------------------------------------------

fn too_large(what: &str, bytes: usize, limit_bytes: usize) -> KvError {
    KvError::with_detail(
        ErrorKind::RequestTooLarge,
        format!("{what} is {bytes} bytes, limit {limit_bytes}"),
    )
}

fn check_key_size(key: &[u8], limits: &RequestLimits) -> Result<(), KvError> {
    if key.len() > limits.key_bytes_max {
        return Err(too_large("key", key.len(), limits.key_bytes_max));
    }
    Ok(())
}

pub fn validate_range(request: &RangeRequest, limits: &RequestLimits) -> Result<(), KvError> {
    check_range(request)?;
    check_key_size(&request.key, limits)
}

pub fn validate_put(request: &PutRequest, limits: &RequestLimits) -> Result<(), KvError> {
    check_put(request)?;
    check_key_size(&request.key, limits)?;
    if request.value.len() > limits.value_bytes_max {
        return Err(too_large(
            "value",
            request.value.len(),
            limits.value_bytes_max,
        ));
    }
    Ok(())
}

pub fn validate_delete_range(
    request: &DeleteRangeRequest,
    limits: &RequestLimits,
) -> Result<(), KvError> {
    check_delete_range(request)?;
    check_key_size(&request.key, limits)
}

/// etcd's order: the operation count, then each compare and operation, then duplicate keys.
pub fn validate_txn(request: &TxnRequest, limits: &RequestLimits) -> Result<(), KvError> {
    validate_txn_limits(request, limits, limits.txn_ops_max)?;
    check_txn(request)
}

/// The longest of the compare, success and failure lists must fit `ops_max`; a nested txn
/// gets what its parent leaves.
fn validate_txn_limits(
    request: &TxnRequest,
    limits: &RequestLimits,
    ops_max: usize,
) -> Result<(), KvError> {
    let ops = request
        .compare
        .len()
        .max(request.success.len())
        .max(request.failure.len());
    if ops > ops_max {
        return Err(KvError::with_detail(
            ErrorKind::TooManyOps,
            format!("{ops} operations, limit {ops_max}"),
        ));
    }
    for compare in &request.compare {
        check_key_size(&compare.key, limits)?;
    }
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(Request::RequestRange(range)) => validate_range(range, limits)?,
            Some(Request::RequestPut(put)) => validate_put(put, limits)?,
            Some(Request::RequestDeleteRange(delete)) => validate_delete_range(delete, limits)?,
            Some(Request::RequestTxn(txn)) => validate_txn_limits(txn, limits, ops_max - ops)?,
            None => check_op(op)?,
        }
    }
    Ok(())
}

/// Everything the server checks before proposing `command`, whose encoding is
/// `encoded_bytes` long: the request size, then the operation's own checks.
pub fn validate_command(
    command: &Command,
    encoded_bytes: usize,
    limits: &RequestLimits,
) -> Result<(), KvError> {
    if encoded_bytes > limits.request_bytes_max {
        return Err(too_large(
            "request",
            encoded_bytes,
            limits.request_bytes_max,
        ));
    }
    match &command.operation {
        Operation::Put(put) => validate_put(put, limits),
        Operation::DeleteRange(delete) => validate_delete_range(delete, limits),
        Operation::Txn(txn) => validate_txn(txn, limits),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::etcdserverpb::Compare;

    use super::*;

    fn put_op(key: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.to_string().into(),
                ..Default::default()
            })),
        }
    }

    fn delete_op(key: &str, range_end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.to_string().into(),
                range_end: range_end.to_string().into(),
                prev_kv: false,
            })),
        }
    }

    fn txn_op(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }

    fn txn(success: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure: vec![],
        }
    }

    fn kind(result: Result<(), KvError>) -> Option<ErrorKind> {
        result.err().map(|error| error.kind())
    }

    /// §1.4: putting, or putting and deleting, overlapping keys in one branch is refused.
    #[test]
    fn duplicate_keys_in_a_branch_are_refused() {
        let dup = Some(ErrorKind::DuplicateKey);
        assert_eq!(kind(check_txn(&txn(vec![put_op("a"), put_op("a")]))), dup);
        assert_eq!(
            kind(check_txn(&txn(vec![put_op("b"), delete_op("a", "c")]))),
            dup
        );
        assert_eq!(
            kind(check_txn(&txn(vec![delete_op("a", "\0"), put_op("z")]))),
            dup
        );
        // Deletes may overlap each other; puts of different keys are fine.
        assert_eq!(
            kind(check_txn(&txn(vec![
                delete_op("a", "c"),
                delete_op("b", "d")
            ]))),
            None
        );
        assert_eq!(kind(check_txn(&txn(vec![put_op("a"), put_op("b")]))), None);
        // The two branches of one txn are checked separately.
        let split = TxnRequest {
            compare: vec![],
            success: vec![put_op("a")],
            failure: vec![put_op("a")],
        };
        assert_eq!(kind(check_txn(&split)), None);
    }

    #[test]
    fn nested_txns_count_for_duplicates_but_their_branches_exclude_each_other() {
        let dup = Some(ErrorKind::DuplicateKey);
        let nested_same_key = txn_op(vec![put_op("a")], vec![put_op("a")]);
        assert_eq!(kind(check_txn(&txn(vec![nested_same_key.clone()]))), None);
        assert_eq!(
            kind(check_txn(&txn(vec![put_op("a"), nested_same_key]))),
            dup
        );
        let nested_delete = txn_op(vec![delete_op("a", "b")], vec![]);
        assert_eq!(kind(check_txn(&txn(vec![nested_delete, put_op("a")]))), dup);
        // A put in one nested txn and a delete in a later sibling: refused as well.
        let sibling_put = txn_op(vec![put_op("k")], vec![]);
        let sibling_delete = txn_op(vec![delete_op("k", "")], vec![]);
        assert_eq!(
            kind(check_txn(&txn(vec![sibling_put, sibling_delete]))),
            dup
        );
    }

    #[test]
    fn empty_keys_and_empty_ops_are_refused() {
        let empty_compare = TxnRequest {
            compare: vec![Compare::default()],
            ..Default::default()
        };
        assert_eq!(kind(check_txn(&empty_compare)), Some(ErrorKind::EmptyKey));
        let empty_op = txn(vec![RequestOp { request: None }]);
        assert_eq!(kind(check_txn(&empty_op)), Some(ErrorKind::KeyNotFound));
        assert_eq!(
            kind(check_txn(&txn(vec![put_op("")]))),
            Some(ErrorKind::EmptyKey)
        );
    }

    /// §1.4: at most --max-txn-ops (default 128) operations.
    #[test]
    fn txn_operation_limit() {
        let limits = RequestLimits::default();
        let ops: Vec<_> = (0..128).map(|i| put_op(&format!("k{i}"))).collect();
        assert_eq!(kind(validate_txn(&txn(ops.clone()), &limits)), None);
        let mut too_many = ops;
        too_many.push(put_op("one-more"));
        assert_eq!(
            kind(validate_txn(&txn(too_many), &limits)),
            Some(ErrorKind::TooManyOps)
        );
    }

    #[test]
    fn size_limits_give_etcds_request_too_large() {
        let limits = RequestLimits {
            key_bytes_max: 4,
            value_bytes_max: 8,
            ..RequestLimits::default()
        };
        let long_key = PutRequest {
            key: "12345".into(),
            ..Default::default()
        };
        let error = validate_put(&long_key, &limits).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::RequestTooLarge);
        assert_eq!(error.client_message(), "etcdserver: request is too large");
        assert!(error.to_string().contains("key is 5 bytes, limit 4"));
        let long_value = PutRequest {
            key: "k".into(),
            value: vec![0; 9].into(),
            ..Default::default()
        };
        assert_eq!(
            kind(validate_put(&long_value, &limits)),
            Some(ErrorKind::RequestTooLarge)
        );
    }

    #[test]
    fn invalid_sort_option_is_refused() {
        let request = RangeRequest {
            key: "a".into(),
            sort_order: 7,
            ..Default::default()
        };
        assert_eq!(
            kind(check_range(&request)),
            Some(ErrorKind::InvalidSortOption)
        );
    }
}
