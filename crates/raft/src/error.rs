//! Errors the core returns to its caller. Most are refusals of a request, which leave the node
//! unchanged; [`Error::Storage`] is fatal (see [`Error::is_fatal`]).

use crate::membership::MembershipError;
use crate::storage::StorageError;
use crate::types::{Index, NodeId};

/// Why the core refused a request, or stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Only the leader accepts proposals and membership changes. `leader_hint` is the leader
    /// this node knows of, if any, so the caller can redirect.
    #[error("not the leader (leader hint: {})", display_hint(*leader_hint))]
    NotLeader {
        /// The leader this node knows of.
        leader_hint: Option<NodeId>,
    },
    /// Proposals wait while leadership moves (thesis §3.10).
    #[error("leadership is being transferred to node {target}; retry shortly")]
    TransferInProgress {
        /// The node leadership moves to.
        target: NodeId,
    },
    /// The proposal would take the uncommitted log past its bound (back-pressure).
    #[error(
        "too many uncommitted bytes at the leader: {uncommitted_bytes} + {proposal_bytes} would \
         exceed the limit of {limit_bytes}"
    )]
    UncommittedLimit {
        /// Uncommitted now.
        uncommitted_bytes: u64,
        /// The proposal's size.
        proposal_bytes: u64,
        /// `Config::uncommitted_bytes_max`.
        limit_bytes: u64,
    },
    /// One membership change at a time.
    #[error("a membership change is already in progress (configuration entry {index})")]
    MembershipChangeInProgress {
        /// The index of the change in progress.
        index: Index,
    },
    /// The change itself is invalid.
    #[error("invalid membership change: {0}")]
    Membership(#[from] MembershipError),
    /// A learner promoted before it caught up.
    #[error(
        "learner {id} is {lag_entries} entries behind the leader, more than the {limit_entries} \
         allowed for promotion; wait for it to catch up"
    )]
    LearnerBehind {
        /// The learner.
        id: NodeId,
        /// How far behind it is.
        lag_entries: u64,
        /// `Config::promotion_lag_entries_max`.
        limit_entries: u64,
    },
    /// Leadership can only move to a voter.
    #[error("node {0} is not a voter, so leadership cannot move to it")]
    NotAVoter(NodeId),
    /// Too many linearizable reads wait already.
    #[error("too many reads waiting (limit {limit}); retry shortly")]
    ReadQueueFull {
        /// `Config::read_queue_max`.
        limit: usize,
    },
    /// A snapshot asked for at an index that cannot have one.
    #[error("cannot snapshot at index {index}: {reason}")]
    InvalidSnapshot {
        /// The index asked for.
        index: Index,
        /// Why not.
        reason: String,
    },
    /// A message for another node.
    #[error("message for node {to} delivered to node {this}")]
    Misdelivered {
        /// Whom it was for.
        to: NodeId,
        /// This node.
        this: NodeId,
    },
    /// The configuration is invalid.
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
