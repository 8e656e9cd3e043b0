//! The space quota's part in the state machine (etcd's backend quota and its capped and
//! corrupt appliers).
//!
//! The store measures itself in [`KvStore::size_bytes`](crate::KvStore::size_bytes) and
//! prices each request in [`space_cost_bytes`]. The server compares the two against its
//! configured quota *before* proposing, as etcd does, and raises the NOSPACE alarm through the
//! log when a request would pass it. Apply never reads the quota (members may be configured
//! differently); it reads only the replicated alarms, as an [`Admission`], so every member
//! refuses the same entries.

use flotilla_proto::etcdserverpb::request_op::Request;
use flotilla_proto::etcdserverpb::{RequestOp, TxnRequest};

use crate::command::Operation;
use crate::error::{ErrorKind, KvError};
use crate::mvcc::version_cost_bytes;

/// What one lease counts for in the store's size.
pub const LEASE_COST_BYTES: u64 = 64;

/// Which commands the cluster's active alarms let apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Admission {
    /// No alarm: everything applies.
    #[default]
    All,
    /// A NOSPACE alarm is active: a command that would take space (a put, a txn holding a
    /// put, a lease grant) is refused with "database space exceeded"; reads, deletes,
    /// compactions and revocations, which free space, still apply.
    NoNewSpace,
    /// A CORRUPT alarm is active: every client command is refused with "corrupt cluster".
    Nothing,
}

impl Admission {
    /// The refusal for `operation`, if it may not apply. The server's own bookkeeping
    /// (lease checkpoints, sessions) always applies.
    pub fn refusal(self, operation: &Operation) -> Option<KvError> {
        let client_operation = !matches!(
            operation,
            Operation::LeaseCheckpoint(_)
                | Operation::RegisterSession(_)
                | Operation::ExpireSessions(_)
        );
        match self {
            Admission::All => None,
            Admission::NoNewSpace if space_cost_bytes(operation) > 0 => {
                Some(KvError::new(ErrorKind::NoSpace))
            }
            Admission::NoNewSpace => None,
            Admission::Nothing if client_operation => Some(KvError::new(ErrorKind::Corrupt)),
            Admission::Nothing => None,
        }
    }
}

/// The bytes `operation` may add to the store: each put's key, value and version overhead
/// (both branches of a txn, nested txns included, since which branch runs is known only at
/// apply), or a lease. Zero for what takes no space.
pub fn space_cost_bytes(operation: &Operation) -> u64 {
    match operation {
        Operation::Put(put) => version_cost_bytes(put.key.len(), put.value.len()),
        Operation::Txn(txn) => txn_cost_bytes(txn),
        Operation::LeaseGrant(_) => LEASE_COST_BYTES,
        _ => 0,
    }
}

fn txn_cost_bytes(txn: &TxnRequest) -> u64 {
    txn.success
        .iter()
        .chain(&txn.failure)
        .map(request_op_cost_bytes)
        .sum()
}

fn request_op_cost_bytes(op: &RequestOp) -> u64 {
    match &op.request {
        Some(Request::RequestPut(put)) => version_cost_bytes(put.key.len(), put.value.len()),
        Some(Request::RequestTxn(txn)) => txn_cost_bytes(txn),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::etcdserverpb::{
        DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest,
    };

    use super::*;
    use crate::command::ExpireSessions;

    fn put(key: &'static str, value: &'static str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })),
        }
    }

    fn delete(key: &'static str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn puts_anywhere_in_a_txn_cost_space_deletes_and_reads_do_not() {
        let nested = TxnRequest {
            failure: vec![put("n", "12345")],
            ..Default::default()
        };
        let txn = TxnRequest {
            success: vec![put("a", "xy"), delete("b")],
            failure: vec![RequestOp {
                request: Some(Request::RequestTxn(nested)),
            }],
            ..Default::default()
        };
        assert_eq!(
            space_cost_bytes(&Operation::Txn(txn)),
            version_cost_bytes(1, 2) + version_cost_bytes(1, 5)
        );
        let only_deletes = TxnRequest {
            success: vec![delete("a")],
            failure: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest::default())),
            }],
            ..Default::default()
        };
        assert_eq!(space_cost_bytes(&Operation::Txn(only_deletes)), 0);
        assert_eq!(
            space_cost_bytes(&Operation::DeleteRange(DeleteRangeRequest::default())),
            0
        );
    }

    #[test]
    fn nospace_refuses_what_takes_space_and_corrupt_refuses_every_client_command() {
        let put = Operation::Put(PutRequest {
            key: "k".into(),
            ..Default::default()
        });
        let grant = Operation::LeaseGrant(LeaseGrantRequest::default());
        let delete = Operation::DeleteRange(DeleteRangeRequest::default());
        let expire = Operation::ExpireSessions(ExpireSessions::default());
        let kind = |admission: Admission, op: &Operation| admission.refusal(op).map(|e| e.kind());
        assert_eq!(kind(Admission::All, &put), None);
        assert_eq!(kind(Admission::NoNewSpace, &put), Some(ErrorKind::NoSpace));
        assert_eq!(
            kind(Admission::NoNewSpace, &grant),
            Some(ErrorKind::NoSpace)
        );
        assert_eq!(kind(Admission::NoNewSpace, &delete), None);
        assert_eq!(kind(Admission::Nothing, &delete), Some(ErrorKind::Corrupt));
        assert_eq!(kind(Admission::Nothing, &expire), None);
    }
}
