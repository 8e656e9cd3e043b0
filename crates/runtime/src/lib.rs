//! Runs the Flotilla Raft core ([`flotilla_raft`]) for an application: a tokio task owns the
//! core and carries out its output; a WAL thread writes and syncs the log (group commit); an
//! apply thread applies committed entries to the application's [`StateMachine`] and answers
//! the proposals waiting for them; snapshots are encoded beside apply and compact the log.
//!
//! The application brings its state machine, its [`Transport`] between members and, if it
//! wants them, its [`NodeMetrics`]; storage is the write-ahead log ([`flotilla_wal::Wal`])
//! or anything else implementing [`DurableStorage`] ([`MemDurable`] for tests). Then
//! [`start`] returns a [`NodeHandle`] to propose commands, wait for linearizable reads,
//! change membership and hand leadership over.
//!
//! The etcd-compatible server (`flotilla-server`) is one such application.

pub mod conformance;
pub mod driver;
pub mod metrics;
pub mod node;
pub mod read_lease;
pub mod sessions;
pub mod state_machine;
pub mod storage;
pub mod transport;

pub use flotilla_raft as raft;
pub use flotilla_raft::{ConfChange, Config, Entry, EntryPayload, Index, Membership, NodeId, Role};

pub use driver::{Driver, Refusal};
pub use metrics::{NoMetrics, NodeMetrics};
pub use node::{
    NodeError, NodeHandle, NodeOptions, NodeParts, NodeRequest, NodeStatus, RoleStatus,
    RunningNode, start,
};
pub use sessions::{RememberedOutput, SessionClient, SessionReply, Sessions};
pub use state_machine::{Origin, SmallStateMachine, StateMachine};
pub use storage::{DurableStorage, MemDurable, SnapshotReader, StorageFailure, open_wal};
pub use transport::{
    LocalMember, LocalNetwork, LocalTransport, PeerAddresses, TcpMember, TcpTransport, Transport,
    TransportEvent,
};
