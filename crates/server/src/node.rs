//! The member's Raft node: the runtime's node ([`flotilla_runtime::node`]) running the
//! member's [`StateMachine`], sending through the [`PeerRouter`] and reporting to the
//! member's [`Metrics`]. The server uses the runtime through its public API only.

pub use flotilla_runtime::node::{NodeError, NodeOptions, NodeStatus, RoleStatus, paced, view};

use crate::metrics::Metrics;
use crate::state_machine::{Applied, StateMachine};
use crate::transport::PeerRouter;

/// A running member's handle: propose, read, change membership, watch the status.
pub type NodeHandle = flotilla_runtime::NodeHandle<StateMachine, Metrics>;
/// A started member's task and threads.
pub type RunningNode = flotilla_runtime::RunningNode<StateMachine, Metrics>;
/// What the member's node is started with.
pub type NodeParts = flotilla_runtime::NodeParts<StateMachine, PeerRouter, Metrics>;
/// A write this member forwarded to the leader, waiting for its entry here.
pub type TrackedWrite = flotilla_runtime::node::TrackedWrite<Applied>;

pub use flotilla_runtime::start;
