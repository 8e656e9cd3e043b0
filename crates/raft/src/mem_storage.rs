//! An in-memory [`LogStorage`] for tests and the simulator. It is also the reference model the
//! write-ahead log is checked against.
//!
//! Everything written is "durable" the moment [`MemStorage::persist`] returns; the simulator
//! models lost writes by holding batches back until their simulated fsync and by dropping
//! them at a crash.

use bytes::{Bytes, BytesMut};

use crate::membership::Membership;
use crate::output::{PersistBatch, SnapshotChunk};
use crate::storage::{InitialState, LogStorage, SnapshotInfo, SnapshotMeta, StorageError};
use crate::types::{Entry, EntryId, HardState, Index, Term};

#[derive(Clone, Debug, Default)]
/// The log, hard state and snapshot in memory.
pub struct MemStorage {
    hard_state: HardState,
    bootstrap_membership: Membership,
    /// The compaction point: every entry up to and including it is gone.
    /// Invariant: `compacted.index <= snapshot.last.index` when a snapshot exists.
    compacted: EntryId,
    /// Invariant: `entries[i].index == compacted.index + 1 + i`.
    entries: Vec<Entry>,
    snapshot: Option<(SnapshotMeta, Bytes)>,
    /// A snapshot being received, not yet current.
    staging: Option<(SnapshotMeta, u64, BytesMut)>,
}

impl MemStorage {
    /// Empty storage for a member of a brand-new cluster with the given configuration.
    pub fn new_with_membership(membership: Membership) -> Self {
        Self {
            bootstrap_membership: membership,
            ..Self::default()
        }
    }

    /// Empty storage for a node that waits for a leader to tell it the configuration.
    pub fn new_empty() -> Self {
        Self::default()
    }

    /// The hard state last persisted.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The snapshot's data, if any.
    pub fn snapshot_data(&self) -> Option<(SnapshotMeta, Bytes)> {
        self.snapshot.clone()
    }

    /// Carries out a persist batch, step by step in field order.
    pub fn persist(&mut self, batch: &PersistBatch) -> Result<(), StorageError> {
        for chunk in &batch.snapshot_chunks {
            self.stage_chunk(chunk)?;
        }
        if let Some(install) = &batch.snapshot_install {
            self.install_staged(&install.meta, install.keep_through)?;
        }
        if let Some(index) = batch.compact_to {
            self.compact(index)?;
        }
        if !batch.entries.is_empty() {
            self.append(&batch.entries)?;
        }
        if let Some(hard_state) = batch.hard_state {
            self.hard_state = hard_state;
        }
        Ok(())
    }

    fn stage_chunk(&mut self, chunk: &SnapshotChunk) -> Result<(), StorageError> {
        if chunk.offset == 0 {
            let data = BytesMut::with_capacity(chunk.data_bytes as usize);
            self.staging = Some((chunk.meta.clone(), chunk.data_bytes, data));
        }
        let Some((meta, _, data)) = &mut self.staging else {
            return Err(StorageError::Io(
                "snapshot chunk without a staged snapshot".into(),
            ));
        };
        if *meta != chunk.meta || data.len() as u64 != chunk.offset {
            return Err(StorageError::Io(format!(
                "snapshot chunk at offset {} does not continue the staged snapshot {} at {}",
                chunk.offset,
                meta.last,
                data.len()
            )));
        }
        data.extend_from_slice(&chunk.data);
        Ok(())
    }

    fn install_staged(
        &mut self,
        meta: &SnapshotMeta,
        keep_through: Index,
    ) -> Result<(), StorageError> {
        let Some((staged, data_bytes, data)) = self.staging.take() else {
            return Err(StorageError::Io(
                "snapshot install without a staged snapshot".into(),
            ));
        };
        if staged != *meta || data.len() as u64 != data_bytes {
            return Err(StorageError::Io(format!(
                "staged snapshot {} is incomplete or is not {}",
                staged.last, meta.last
            )));
        }
        self.install_snapshot(meta.clone(), data.freeze(), keep_through)
    }

    /// Makes `data` the current snapshot and keeps only the stored entries in
    /// `(meta.last.index, keep_through]` (see [`crate::SnapshotInstall`]).
    pub fn install_snapshot(
        &mut self,
        meta: SnapshotMeta,
        data: Bytes,
        keep_through: Index,
    ) -> Result<(), StorageError> {
        let last = meta.last;
        if keep_through < last.index {
            return Err(StorageError::Io(format!(
                "keep_through {keep_through} is below the snapshot's last index {}",
                last.index
            )));
        }
        let kept: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.index > last.index && e.index <= keep_through)
            .cloned()
            .collect();
        self.entries = kept;
        self.compacted = last;
        self.snapshot = Some((meta, data));
        Ok(())
    }

    /// Saves a snapshot the local state machine produced, without touching the log.
    pub fn save_snapshot(&mut self, meta: SnapshotMeta, data: Bytes) -> Result<(), StorageError> {
        if let Some((current, _)) = &self.snapshot
            && current.last.index > meta.last.index
        {
            return Err(StorageError::Io(format!(
                "snapshot {} is older than the current snapshot {}",
                meta.last, current.last
            )));
        }
        self.snapshot = Some((meta, data));
        Ok(())
    }

    /// Discards entries up to and including `index`.
    pub fn compact(&mut self, index: Index) -> Result<(), StorageError> {
        if index <= self.compacted.index {
            return Ok(());
        }
        let term = self.term(index)?;
        let drop = (index - self.compacted.index) as usize;
        self.entries.drain(..drop);
        self.compacted = EntryId::new(term, index);
        Ok(())
    }

    /// Appends entries, first removing any stored entries at or after the first new index.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.compacted.index {
            return Err(StorageError::Io(format!(
                "append at {} overwrites the compacted log (compacted through {})",
                first.index, self.compacted.index
            )));
        }
        if first.index > self.last_index() + 1 {
            return Err(StorageError::Io(format!(
                "append at {} leaves a gap after the last index {}",
                first.index,
                self.last_index()
            )));
        }
        self.entries
            .truncate((first.index - self.compacted.index - 1) as usize);
        for (offset, entry) in entries.iter().enumerate() {
            assert_eq!(
                entry.index,
                first.index + offset as u64,
                "appended entries not contiguous"
            );
        }
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Sets the hard state (as a persisted batch would).
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }
}

impl LogStorage for MemStorage {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        Ok(InitialState {
            hard_state: self.hard_state,
            snapshot: self.snapshot_info(),
            bootstrap_membership: self.bootstrap_membership.clone(),
        })
    }

    fn first_index(&self) -> Index {
        self.compacted.index + 1
    }

    fn last_index(&self) -> Index {
        self.compacted.index + self.entries.len() as u64
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        if index == self.compacted.index {
            return Ok(self.compacted.term);
        }
        if index < self.compacted.index {
            return Err(StorageError::Compacted {
                index,
                first_index: self.first_index(),
            });
        }
        let offset = (index - self.compacted.index - 1) as usize;
        match self.entries.get(offset) {
            Some(entry) => Ok(entry.term),
            None => Err(StorageError::Unavailable {
                index,
                last_index: self.last_index(),
            }),
        }
    }

    fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, StorageError> {
        if low <= self.compacted.index {
            return Err(StorageError::Compacted {
                index: low,
                first_index: self.first_index(),
            });
        }
        if high > self.last_index() + 1 {
            return Err(StorageError::Unavailable {
                index: high - 1,
                last_index: self.last_index(),
            });
        }
        let start = (low - self.compacted.index - 1) as usize;
        let end = (high.max(low) - self.compacted.index - 1) as usize;
        Ok(limit_size(&self.entries[start..end], bytes_max))
    }

    fn snapshot_chunk(
        &self,
        last: EntryId,
        offset: u64,
        bytes_max: u64,
    ) -> Result<Bytes, StorageError> {
        let current = self
            .snapshot
            .as_ref()
            .map(|(meta, _)| meta.last)
            .unwrap_or_default();
        let Some((meta, data)) = &self.snapshot else {
            return Err(StorageError::SnapshotGone {
                asked: last,
                current,
            });
        };
        if meta.last != last {
            return Err(StorageError::SnapshotGone {
                asked: last,
                current,
            });
        }
        let start = (offset as usize).min(data.len());
        let end = (start + bytes_max as usize).min(data.len());
        Ok(data.slice(start..end))
    }

    fn snapshot_info(&self) -> Option<SnapshotInfo> {
        self.snapshot.as_ref().map(|(meta, data)| SnapshotInfo {
            meta: meta.clone(),
            data_bytes: data.len() as u64,
        })
    }
}

/// The longest prefix of `entries` within `bytes_max`, but at least one entry.
pub(crate) fn limit_size(entries: &[Entry], bytes_max: u64) -> Vec<Entry> {
    let mut total_bytes = 0;
    let mut count = 0;
    for entry in entries {
        total_bytes += entry.size_bytes();
        if count > 0 && total_bytes > bytes_max {
            break;
        }
        count += 1;
    }
    entries[..count].to_vec()
}
