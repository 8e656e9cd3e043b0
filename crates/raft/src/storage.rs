//! The read-only view of persisted state that the core reads through.
//!
//! The core never writes storage itself. It asks for writes in [`crate::PersistBatch`]es and
//! reads back, through this trait, only what the caller has acknowledged as durable (see the
//! contract on [`crate::Output`]). Two implementations exist: [`crate::MemStorage`] in this crate
//! (tests and the simulator) and the write-ahead log in `flotilla-wal`. Both pass the same
//! conformance suite.

use bytes::Bytes;

use crate::membership::Membership;
use crate::types::{Entry, EntryId, HardState, Index, Term};

/// What a snapshot covers: the log up to and including `last`, and the configuration in force
/// at that point (§7: "the last included index and term ... and the latest configuration").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The last entry the snapshot replaces.
    pub last: EntryId,
    /// The configuration as of `last` (possibly joint).
    pub membership: Membership,
}

/// A snapshot as storage holds it: its metadata and the size of its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its metadata.
    pub meta: SnapshotMeta,
    /// The size of its data.
    pub data_bytes: u64,
}

/// Everything a node reads at start-up to resume where it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitialState {
    /// The term, vote and commit index last persisted.
    pub hard_state: HardState,
    /// The newest snapshot, if the log was ever compacted or a snapshot was installed.
    pub snapshot: Option<SnapshotInfo>,
    /// The configuration to start with when neither the snapshot nor the log carries one: the
    /// bootstrap configuration of a brand-new cluster, or empty for a node that waits to be
    /// told by a leader.
    pub bootstrap_membership: Membership,
}

/// Why a read failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The entry was discarded by compaction; the reader should use the snapshot.
    #[error("index {index} is compacted (the log starts at {first_index})")]
    Compacted {
        /// The index asked for.
        index: Index,
        /// The first index the log still holds.
        first_index: Index,
    },
    /// The entry is past the end of the log.
    #[error("index {index} is past the last index {last_index}")]
    Unavailable {
        /// The index asked for.
        index: Index,
        /// The last index the log holds.
        last_index: Index,
    },
    /// The snapshot asked for was replaced by a newer one.
    #[error("snapshot {asked} is gone (the current snapshot is {current})")]
    SnapshotGone {
        /// The snapshot asked for.
        asked: EntryId,
        /// The snapshot storage holds now.
        current: EntryId,
    },
    /// The storage itself failed. Fatal for the node: it stops rather than act on a guess.
    #[error("storage failure: {0}")]
    Io(String),
}

/// Read access to the persisted log, hard state and snapshot.
///
/// Contract: after the caller acknowledges a [`crate::PersistBatch`] with
/// [`crate::RaftNode::on_persisted`], every read reflects that batch and all earlier ones. Reads
/// may also see writes not yet acknowledged; the core never asks for those.
pub trait LogStorage {
    /// The state to start from. Called once, when the node is created.
    fn initial_state(&self) -> Result<InitialState, StorageError>;

    /// The index of the first entry still in the log (the snapshot's last index + 1, or lower if
    /// some entries before the snapshot are retained).
    fn first_index(&self) -> Index;

    /// The index of the last entry in the log, or the snapshot's last index if the log is empty.
    fn last_index(&self) -> Index;

    /// The term of the entry at `index`. Also answers for the snapshot's last index.
    fn term(&self, index: Index) -> Result<Term, StorageError>;

    /// The entries in `[low, high)`, stopping early once `bytes_max` is reached (but always at
    /// least one entry if `low < high`).
    fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, StorageError>;

    /// Up to `bytes_max` bytes of the current snapshot's data, from `offset`. An empty result
    /// means `offset` is at the end. `last` names the snapshot the reader expects; if it has been
    /// replaced, the read fails with [`StorageError::SnapshotGone`].
    fn snapshot_chunk(
        &self,
        last: EntryId,
        offset: u64,
        bytes_max: u64,
    ) -> Result<Bytes, StorageError>;

    /// The current snapshot, if any.
    fn snapshot_info(&self) -> Option<SnapshotInfo>;
}

impl<T> LogStorage for std::sync::Arc<T>
where
    T: LogStorage + ?Sized,
{
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        (**self).initial_state()
    }
    fn first_index(&self) -> Index {
        (**self).first_index()
    }
    fn last_index(&self) -> Index {
        (**self).last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        (**self).term(index)
    }
    fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, StorageError> {
        (**self).entries(low, high, bytes_max)
    }
    fn snapshot_chunk(
        &self,
        last: EntryId,
        offset: u64,
        bytes_max: u64,
    ) -> Result<Bytes, StorageError> {
        (**self).snapshot_chunk(last, offset, bytes_max)
    }
    fn snapshot_info(&self) -> Option<SnapshotInfo> {
        (**self).snapshot_info()
    }
}
