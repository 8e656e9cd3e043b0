//! Errors the core returns to its caller. Most are refusals of a request, which leave the node
//! unchanged; [`Error::Storage`] is fatal (see [`Error::is_fatal`]).

use crate::membership::MembershipError;
use crate::storage::StorageError;
use crate::types::{Index, NodeId};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Only the leader accepts proposals and membership changes. `leader_hint` is the leader
    /// this node knows of, if any, so the caller can redirect.
    #[error("not the leader (leader hint: {})", display_hint(*leader_hint))]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("leadership is being transferred to node {target}; retry shortly")]
    TransferInProgress { target: NodeId },
    #[error(
        "too many uncommitted bytes at the leader: {uncommitted_bytes} + {proposal_bytes} would \
         exceed the limit of {limit_bytes}"
    )]
    UncommittedLimit {
        uncommitted_bytes: u64,
        proposal_bytes: u64,
        limit_bytes: u64,
    },
    #[error("a membership change is already in progress (configuration entry {index})")]
    MembershipChangeInProgress { index: Index },
    #[error("invalid membership change: {0}")]
    Membership(#[from] MembershipError),
    #[error(
        "learner {id} is {lag_entries} entries behind the leader, more than the {limit_entries} \
         allowed for promotion; wait for it to catch up"
    )]
    LearnerBehind {
        id: NodeId,
        lag_entries: u64,
        limit_entries: u64,
    },
    #[error("node {0} is not a voter, so leadership cannot move to it")]
    NotAVoter(NodeId),
    #[error("too many reads waiting (limit {limit}); retry shortly")]
    ReadQueueFull { limit: usize },
    #[error("cannot snapshot at index {index}: {reason}")]
    InvalidSnapshot { index: Index, reason: String },
    #[error("message for node {to} delivered to node {this}")]
    Misdelivered { to: NodeId, this: NodeId },
    #[error("invalid config: {0}")]
    Config(String),
    /// Reading storage failed. The node stops: every later call returns this error again.
    #[error("fatal storage error: {0}")]
    Storage(#[from] StorageError),
}

fn display_hint(hint: Option<NodeId>) -> String {
    hint.map(|id| id.to_string())
        .unwrap_or_else(|| "none".to_string())
}

impl Error {
    /// True if the node has stopped and must not be used again.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::Storage(_))
    }
}
