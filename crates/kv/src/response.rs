//! What applying a command answers, and how an answer is remembered for retries.

use flotilla_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeResponse, LeaseGrantResponse, LeaseRevokeResponse, PutResponse,
    TxnResponse,
};
use flotilla_proto::flotilla::kv::v1::{Failure, RememberedOutcome, remembered_outcome::Outcome};
use flotilla_proto::mvccpb::Event;

use crate::error::{ErrorKind, KvError};

/// A successful answer. etcd responses carry a header with only `revision` set; the server
/// fills in cluster id, member id and raft term.
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseCheckpoint,
    /// The new session's id (the registering command's log index) and the session evicted to
    /// make room, if any.
    SessionRegistered {
        session_id: u64,
        evicted_session_id: Option<u64>,
    },
    SessionsExpired {
        expired: u64,
    },
}

/// The result of applying one log entry.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyResult {
    pub index: u64,
    pub outcome: Result<Response, KvError>,
    /// Watch events, in revision order (one revision per entry at most); each carries
    /// `prev_kv` when the key existed before, for watchers that asked for it.
    pub events: Vec<Event>,
    /// The store revision after this entry.
    pub revision: i64,
    /// True when the entry was a retry answered from the session's memory.
    pub duplicate: bool,
    /// The command's [`crate::command::Origin`], for the member that forwarded it.
    pub origin: Option<crate::command::Origin>,
}

/// The outcome to keep in a session for a retry. Only requests a client can tag with a
/// session reach here.
pub(crate) fn remember(outcome: &Result<Response, KvError>) -> RememberedOutcome {
    let remembered = match outcome {
        Ok(Response::Put(response)) => Outcome::Put(response.clone()),
        Ok(Response::DeleteRange(response)) => Outcome::DeleteRange(response.clone()),
        Ok(Response::Txn(response)) => Outcome::Txn(response.clone()),
        Ok(Response::Compaction(response)) => Outcome::Compaction(*response),
        Ok(Response::LeaseGrant(response)) => Outcome::LeaseGrant(response.clone()),
        Ok(Response::LeaseRevoke(response)) => Outcome::LeaseRevoke(*response),
        Ok(other) => unreachable!("{other:?} is never tagged with a session"),
        Err(error) => Outcome::Failure(Failure {
            kind: error.kind().number(),
            detail: error.detail().to_string(),
        }),
    };
    RememberedOutcome {
        outcome: Some(remembered),
    }
}

/// The answer a retry gets.
pub(crate) fn recall(remembered: RememberedOutcome) -> Result<Response, KvError> {
    match remembered.outcome {
        Some(Outcome::Put(response)) => Ok(Response::Put(response)),
        Some(Outcome::DeleteRange(response)) => Ok(Response::DeleteRange(response)),
        Some(Outcome::Txn(response)) => Ok(Response::Txn(response)),
        Some(Outcome::Compaction(response)) => Ok(Response::Compaction(response)),
        Some(Outcome::LeaseGrant(response)) => Ok(Response::LeaseGrant(response)),
        Some(Outcome::LeaseRevoke(response)) => Ok(Response::LeaseRevoke(response)),
        Some(Outcome::Failure(failure)) => {
            let kind = ErrorKind::from_number(failure.kind)
                .expect("remembered error kinds were validated on the way in");
            Err(KvError::with_detail(kind, failure.detail))
        }
        Some(Outcome::NotRetained(not_retained)) => Err(KvError::with_detail(
            ErrorKind::ResponseNotRetained,
            format!("response was {} bytes", not_retained.response_bytes),
        )),
        None => unreachable!("remembered outcomes are validated on the way in"),
    }
}

/// True if a restored outcome can be recalled.
pub(crate) fn is_recallable(remembered: &RememberedOutcome) -> bool {
    match &remembered.outcome {
        None => false,
        Some(Outcome::Failure(failure)) => ErrorKind::from_number(failure.kind).is_some(),
        Some(_) => true,
    }
}
