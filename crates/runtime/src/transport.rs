//! How the runtime sends Raft messages to the other members, and what a transport tells it.
//!
//! Sending must never block the raft task: a transport queues the message (bounded) and
//! returns, or drops it and says so. Raft tolerates loss, reordering and duplication of
//! messages; a transport that keeps each peer's messages in order makes replication faster.
//! Received messages go to the node's inbox ([`crate::NodeParts::inbox`]).

use flotilla_raft::{Message, NodeId};

/// Carries the raft task's messages to their members.
pub trait Transport: Send + 'static {
    /// Queues `msg` for `msg.to`; false if it was dropped (queue full, peer unknown).
    fn send(&mut self, msg: Message) -> bool;

    /// The node is stopping: close connections, stop background tasks.
    fn shutdown(&mut self) {}
}

/// What a transport tells the raft task ([`crate::NodeParts::transport_events`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// Messages to this peer are not getting through: the leader probes it instead of
    /// streaming entries.
    Unreachable(NodeId),
    /// A peer refused this member because it was removed from the cluster: the node stops.
    Removed {
        /// The peer that said so.
        by: NodeId,
    },
}

mod local;
mod tcp;

pub use local::{LocalMember, LocalNetwork, LocalTransport};
pub use tcp::{MESSAGE_BYTES_MAX, PeerAddresses, TcpMember, TcpTransport};
