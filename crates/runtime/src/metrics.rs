//! Hooks through which the runtime reports what it does, for an application's metrics.
//!
//! Every method has an empty default, so an application implements only what it exports.
//! They are called on the runtime's own threads, on the write path: they must be cheap
//! (an atomic add, a histogram bucket) and must not block.

use std::time::Duration;

use flotilla_raft::{Index, RoleState};

/// Receives the runtime's measurements.
pub trait NodeMetrics: Send + Sync + std::fmt::Debug + 'static {
    /// One group commit's fsync took this long.
    fn wal_synced(&self, _took: Duration) {}
    /// The role, term or leader changed; `leader_changed` if the known leader is a new one.
    fn role_changed(&self, _state: &RoleState, _leader_changed: bool) {}
    /// Entries up to `index` are committed and handed to the apply thread.
    fn committed(&self, _index: Index) {}
    /// Entries up to `index` are applied; `proposals_answered` of them were proposed here.
    fn applied(&self, _index: Index, _proposals_answered: usize) {}
    /// A proposal was refused or failed (no leader, overloaded, lost to a new leader).
    fn proposal_failed(&self) {}
    /// Proposals waiting for their entries to apply.
    fn proposals_pending(&self, _count: usize) {}
    /// The transport dropped a message.
    fn peer_message_dropped(&self) {}
    /// A snapshot was written to storage in this long (the core takes it next).
    fn snapshot_saved(&self, _took: Duration) {}
    /// The core took a saved snapshot and may compact the log behind it.
    fn snapshot_taken(&self) {}
    /// The state machine was replaced by a snapshot from the leader.
    fn snapshot_restored(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct NoMetrics;

impl NodeMetrics for NoMetrics {}
