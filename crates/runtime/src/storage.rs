//! The storage the node runs on: the core reads it through [`LogStorage`]; the WAL thread
//! writes persist batches and syncs them (group commit); the apply thread saves snapshots.
//!
//! [`DurableStorage`] is the seam: the write-ahead log implements it for real nodes, and
//! [`MemDurable`] (no durability at all) for tests of the layers above.

use std::io::Read;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use flotilla_raft::{
    Entry, EntryId, Index, InitialState, LogStorage, MemStorage, PersistBatch, PersistId,
    SnapshotInfo, SnapshotMeta, StorageError, Term,
};

/// A storage failure: fatal for the node, which stops rather than continue on a guess.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StorageFailure(pub String);

/// Durable storage for one node. Shared by the core's task (reads), the WAL thread (writes,
/// syncs) and the apply thread (snapshots), so every method takes `&self`.
pub trait DurableStorage: LogStorage + Send + Sync + std::fmt::Debug + 'static {
    /// Writes a batch: visible to reads at once, durable after the next [`Self::sync`].
    fn write(&self, batch: &PersistBatch) -> Result<(), StorageFailure>;
    /// Makes everything written durable with one fsync; returns the highest batch now durable.
    fn sync(&self) -> Result<Option<PersistId>, StorageFailure>;
    /// Saves a snapshot of the local state machine at `meta.last`, streamed from `data`.
    fn save_snapshot(&self, meta: &SnapshotMeta, data: &mut dyn Read)
    -> Result<(), StorageFailure>;
    /// Background work after a sync (the WAL prepares its next segment), off the critical
    /// path of acknowledging durability.
    fn prepare_ahead(&self) -> Result<(), StorageFailure> {
        Ok(())
    }
    /// True if obsolete files wait for [`Self::reap`].
    fn has_reapable(&self) -> bool {
        false
    }
    /// Unlinks obsolete files (slow for large ones): called from a thread of its own.
    fn reap(&self) -> Result<(), StorageFailure> {
        Ok(())
    }
    /// Makes everything durable and stops accepting work.
    fn close(&self) -> Result<(), StorageFailure>;
    /// Bytes the storage really holds, not space reserved ahead (for Status's db size); 0 if
    /// unknown.
    fn size_bytes(&self) -> u64 {
        0
    }
}

/// Reads the current snapshot's data in chunks through [`LogStorage::snapshot_chunk`], so a
/// restore never holds a second copy of it in memory.
#[derive(Debug)]
pub struct SnapshotReader<'a, S: LogStorage + ?Sized> {
    storage: &'a S,
    snapshot: EntryId,
    offset: u64,
    chunk: Bytes,
}

const SNAPSHOT_READ_CHUNK_BYTES: u64 = 1 << 20;

impl<'a, S: LogStorage + ?Sized> SnapshotReader<'a, S> {
    /// Reads the snapshot `snapshot` of `storage` from its start.
    pub fn new(storage: &'a S, snapshot: EntryId) -> Self {
        SnapshotReader {
            storage,
            snapshot,
            offset: 0,
            chunk: Bytes::new(),
        }
    }
}

impl<S: LogStorage + ?Sized> Read for SnapshotReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.chunk.is_empty() {
            self.chunk = self
                .storage
                .snapshot_chunk(self.snapshot, self.offset, SNAPSHOT_READ_CHUNK_BYTES)
                .map_err(std::io::Error::other)?;
            self.offset += self.chunk.len() as u64;
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// In-memory storage with the same contract and no durability: for tests.
#[derive(Debug)]
pub struct MemDurable {
    inner: Mutex<MemInner>,
}

#[derive(Debug)]
struct MemInner {
    storage: MemStorage,
    last_written: Option<PersistId>,
    closed: bool,
}

impl MemDurable {
    /// Durable-storage calls over `storage` (which starts with its bootstrap membership).
    pub fn new(storage: MemStorage) -> MemDurable {
        MemDurable {
            inner: Mutex::new(MemInner {
                storage,
                last_written: None,
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LogStorage for MemDurable {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.lock().storage.initial_state()
    }
    fn first_index(&self) -> Index {
        self.lock().storage.first_index()
    }
    fn last_index(&self) -> Index {
        self.lock().storage.last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.lock().storage.term(index)
    }
    fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, StorageError> {
        self.lock().storage.entries(low, high, bytes_max)
    }
    fn snapshot_chunk(
        &self,
        last: EntryId,
        offset: u64,
        bytes_max: u64,
    ) -> Result<Bytes, StorageError> {
        self.lock().storage.snapshot_chunk(last, offset, bytes_max)
    }
    fn snapshot_info(&self) -> Option<SnapshotInfo> {
        self.lock().storage.snapshot_info()
    }
}

impl DurableStorage for MemDurable {
    fn write(&self, batch: &PersistBatch) -> Result<(), StorageFailure> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(StorageFailure("storage is closed".into()));
        }
        inner
            .storage
            .persist(batch)
            .map_err(|e| StorageFailure(e.to_string()))?;
        inner.last_written = Some(batch.id);
        Ok(())
    }

    fn sync(&self) -> Result<Option<PersistId>, StorageFailure> {
        Ok(self.lock().last_written)
    }

    fn save_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: &mut dyn Read,
    ) -> Result<(), StorageFailure> {
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes)
            .map_err(|e| StorageFailure(format!("reading the snapshot data: {e}")))?;
        self.lock()
            .storage
            .save_snapshot(meta.clone(), Bytes::from(bytes))
            .map_err(|e| StorageFailure(e.to_string()))
    }

    fn close(&self) -> Result<(), StorageFailure> {
        self.lock().closed = true;
        Ok(())
    }
}

impl DurableStorage for flotilla_wal::Wal {
    fn write(&self, batch: &PersistBatch) -> Result<(), StorageFailure> {
        flotilla_wal::Wal::write(self, batch).map_err(|e| StorageFailure(e.to_string()))
    }

    fn sync(&self) -> Result<Option<PersistId>, StorageFailure> {
        flotilla_wal::Wal::sync(self).map_err(|e| StorageFailure(e.to_string()))
    }

    fn prepare_ahead(&self) -> Result<(), StorageFailure> {
        flotilla_wal::Wal::prepare_ahead(self).map_err(|e| StorageFailure(e.to_string()))
    }

    fn save_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: &mut dyn Read,
    ) -> Result<(), StorageFailure> {
        flotilla_wal::Wal::save_snapshot(self, meta, data)
            .map(drop)
            .map_err(|e| StorageFailure(e.to_string()))
    }

    fn has_reapable(&self) -> bool {
        flotilla_wal::Wal::has_reapable(self)
    }

    fn reap(&self) -> Result<(), StorageFailure> {
        flotilla_wal::Wal::reap(self)
            .map(drop)
            .map_err(|e| StorageFailure(e.to_string()))
    }

    fn close(&self) -> Result<(), StorageFailure> {
        flotilla_wal::Wal::close(self).map_err(|e| StorageFailure(e.to_string()))
    }

    fn size_bytes(&self) -> u64 {
        self.used_bytes()
    }
}

/// Opens the write-ahead log in `dir` for member `id` of cluster `cluster_id`, creating it
/// if it is new (a new log starts with `membership`). A directory of another cluster or
/// member is refused, naming both.
pub fn open_wal(
    dir: &std::path::Path,
    cluster_id: u64,
    id: flotilla_raft::NodeId,
    membership: flotilla_raft::Membership,
) -> Result<std::sync::Arc<dyn DurableStorage>, StorageFailure> {
    let options =
        flotilla_wal::WalOptions::new(cluster_id, id).with_bootstrap_membership(membership);
    let (wal, report) = flotilla_wal::Wal::open(dir, options).map_err(|err| {
        StorageFailure(format!(
            "cannot open the write-ahead log in {}: {err}",
            dir.display()
        ))
    })?;
    if let Some(torn) = &report.torn_tail {
        tracing::warn!("cut away a record torn by a crash (never acknowledged): {torn:?}");
    }
    Ok(std::sync::Arc::new(wal))
}
