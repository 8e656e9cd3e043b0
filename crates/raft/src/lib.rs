#![deny(missing_docs)]
//! # flotilla-raft: the pure Raft consensus core
//!
//! A sans-I/O implementation of Raft (Ongaro & Ousterhout, "In Search of an Understandable
//! Consensus Algorithm", and Ongaro's thesis): leader election with pre-vote and check-quorum,
//! log replication with pipelining and flow control, the commit rule, linearizable ReadIndex
//! reads, leadership transfer, membership change by joint consensus with learners, and log
//! compaction with chunked InstallSnapshot.
//!
//! The core does no I/O at all: no clock, no threads, no files, no sockets, no OS randomness.
//! Time is a tick count, randomness comes from a PRNG seeded through [`Config`], and every
//! effect is returned in an [`Output`] batch whose contract is documented on the type.
//!
//! ```
//! use flotilla_raft::{Config, MemStorage, Membership, RaftNode};
//!
//! // A one-member cluster elects itself once its vote is durable.
//! let storage = MemStorage::new_with_membership(Membership::with_voters([1]));
//! let mut node = RaftNode::new(Config::new(1), storage, 0).unwrap();
//! node.campaign().unwrap();
//! for _ in 0..3 {
//!     let output = node.take_output().unwrap();
//!     if let Some(batch) = output.persist {
//!         node.storage_mut().persist(&batch).unwrap();
//!         node.on_persisted(batch.id).unwrap();
//!     }
//! }
//! assert!(node.is_leader());
//! ```

pub mod codec;
mod config;
mod error;
mod log;
mod mem_storage;
mod membership;
mod message;
mod node;
mod output;
mod prng;
mod progress;
pub mod quorum;
mod storage;
mod types;

pub use config::{Config, ConfigError, SnapshotPolicy};
pub use error::Error;
pub use mem_storage::MemStorage;
pub use membership::{ConfChange, ConfChangeStep, Membership, MembershipEntry, MembershipError};
pub use message::*;
pub use node::{LeaseRead, RaftNode};
pub use output::{
    Apply, Output, PersistBatch, PersistId, ReadFailure, ReadState, Role, RoleState, SnapshotChunk,
    SnapshotInstall,
};
pub use prng::Prng;
pub use storage::{InitialState, LogStorage, SnapshotInfo, SnapshotMeta, StorageError};
pub use types::{
    Entry, EntryId, EntryPayload, HardState, Index, NODE_NONE, NodeId, Term, entries_size_bytes,
};
