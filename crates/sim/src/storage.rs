//! The storage a simulated node runs on: the in-memory reference, or the real write-ahead log
//! over the simulated file system, where a crash is a power loss (unsynced writes lost, the
//! last write torn, unsynced writes reordered) followed by recovery.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_raft::{
    Entry, EntryId, Index, InitialState, LogStorage, MemStorage, Membership, NodeId, PersistBatch,
    PersistId, SnapshotInfo, SnapshotMeta, StorageError, Term,
};
use flotilla_wal::{SimFaults, SimFs, Wal, WalOptions};

/// What the simulator needs of a node's storage besides reads.
pub trait SimStorage: LogStorage + Sized {
    /// What survives a power loss.
    type Disk;

    /// Storage for a node of a new cluster (`membership` non-empty) or a node that joins one.
    fn create(node: NodeId, membership: Membership, seed: u64) -> Result<Self, String>;

    /// Writes a batch; not yet durable. An error is fatal for the node.
    fn write(&mut self, batch: &PersistBatch) -> Result<(), String>;

    /// Makes everything written durable; returns the highest durable batch. An error is fatal.
    fn sync(&mut self) -> Result<Option<PersistId>, String>;

    /// Saves a snapshot of the state machine durably. An error is fatal.
    fn save_snapshot(&mut self, meta: &SnapshotMeta, data: Bytes) -> Result<(), String>;

    /// The current snapshot and its data.
    fn snapshot_data(&self) -> Result<Option<(SnapshotMeta, Bytes)>, String>;

    /// Loses power.
    fn power_loss(self) -> Self::Disk;

    /// Restarts from what survived: recovery.
    fn recover(disk: &Self::Disk) -> Result<Self, String>;

    /// Makes one write or fsync in `one_in` fail (0: never), for this boot.
    fn inject_disk_errors(&self, _one_in: u64) {}
}

/// The in-memory reference storage: batches become durable all at once at a sync.
#[derive(Debug)]
pub struct MemDisk {
    durable: MemStorage,
    written: Vec<PersistBatch>,
}

impl SimStorage for MemDisk {
    type Disk = MemStorage;

    fn create(_node: NodeId, membership: Membership, _seed: u64) -> Result<Self, String> {
        let durable = if membership == Membership::default() {
            MemStorage::new_empty()
        } else {
            MemStorage::new_with_membership(membership)
        };
        Ok(Self {
            durable,
            written: Vec::new(),
        })
    }

    fn write(&mut self, batch: &PersistBatch) -> Result<(), String> {
        self.written.push(batch.clone());
        Ok(())
    }

    fn sync(&mut self) -> Result<Option<PersistId>, String> {
        let mut last = None;
        for batch in self.written.drain(..) {
            self.durable
                .persist(&batch)
                .map_err(|err| err.to_string())?;
            last = Some(batch.id);
        }
        Ok(last)
    }

    fn save_snapshot(&mut self, meta: &SnapshotMeta, data: Bytes) -> Result<(), String> {
        self.durable
            .save_snapshot(meta.clone(), data)
            .map_err(|err| err.to_string())
    }

    fn snapshot_data(&self) -> Result<Option<(SnapshotMeta, Bytes)>, String> {
        Ok(self.durable.snapshot_data())
    }

    fn power_loss(self) -> MemStorage {
        self.durable
    }

    fn recover(disk: &MemStorage) -> Result<Self, String> {
        Ok(Self {
            durable: disk.clone(),
            written: Vec::new(),
        })
    }
}

impl LogStorage for MemDisk {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.durable.initial_state()
    }
    fn first_index(&self) -> Index {
        self.durable.first_index()
    }
    fn last_index(&self) -> Index {
        self.durable.last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.durable.term(index)
    }
    fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, StorageError> {
        self.durable.entries(low, high, bytes_max)
    }
    fn snapshot_chunk(
        &self,
        last: EntryId,
        offset: u64,
        bytes_max: u64,
    ) -> Result<Bytes, StorageError> {
        self.durable.snapshot_chunk(last, offset, bytes_max)
    }
    fn snapshot_info(&self) -> Option<SnapshotInfo> {
        self.durable.snapshot_info()
    }
}

/// The write-ahead log over a simulated file system of its own.
#[derive(Debug)]
pub struct WalDisk {
    wal: Wal,
    disk: WalDiskParts,
}

/// A node's simulated disk: it outlives the process.
#[derive(Clone, Debug)]
pub struct WalDiskParts {
    fs: SimFs,
    dir: PathBuf,
    node: NodeId,
}

/// Every node of a simulated cluster shares this cluster id.
const SIM_CLUSTER_ID: u64 = 0xf107_111a;

/// Small segments, so rollover, recycling and deletion happen often.
const SIM_SEGMENT_BYTES: u64 = 64 << 10;

impl WalDisk {
    fn open(parts: WalDiskParts, membership: Option<Membership>) -> Result<Self, String> {
        let mut options = WalOptions::new(SIM_CLUSTER_ID, parts.node)
            .with_segment_bytes(SIM_SEGMENT_BYTES)
            .with_fs(Arc::new(parts.fs.clone()));
        if let Some(membership) = membership {
            options = options.with_bootstrap_membership(membership);
        }
        let (wal, _report) = Wal::open(&parts.dir, options).map_err(|err| err.to_string())?;
        Ok(Self { wal, disk: parts })
    }
}

impl SimStorage for WalDisk {
    type Disk = WalDiskParts;

    fn create(node: NodeId, membership: Membership, seed: u64) -> Result<Self, String> {
        let parts = WalDiskParts {
            fs: SimFs::new(seed ^ node.wrapping_mul(0x9e37_79b9)),
            dir: PathBuf::from(format!("/sim/node{node}")),
            node,
        };
        let bootstrap = (membership != Membership::default()).then_some(membership);
        Self::open(parts, bootstrap)
    }

    fn write(&mut self, batch: &PersistBatch) -> Result<(), String> {
        self.wal.write(batch).map_err(|err| err.to_string())
    }

    fn sync(&mut self) -> Result<Option<PersistId>, String> {
        let durable = self.wal.sync().map_err(|err| err.to_string())?;
        self.wal.prepare_ahead().map_err(|err| err.to_string())?;
        self.wal.reap().map_err(|err| err.to_string())?;
        Ok(durable)
    }

    fn save_snapshot(&mut self, meta: &SnapshotMeta, data: Bytes) -> Result<(), String> {
        self.wal
            .save_snapshot(meta, &data[..])
            .map(|_| ())
            .map_err(|err| err.to_string())
    }

    fn snapshot_data(&self) -> Result<Option<(SnapshotMeta, Bytes)>, String> {
        self.wal.snapshot_data().map_err(|err| err.to_string())
    }

    fn power_loss(self) -> WalDiskParts {
        // Healthy disks after the restart: injected faults are per boot.
        self.disk.fs.set_faults(SimFaults::default());
        self.disk.fs.crash();
        self.disk
    }

    fn recover(disk: &WalDiskParts) -> Result<Self, String> {
        Self::open(disk.clone(), None)
    }

    fn inject_disk_errors(&self, one_in: u64) {
        self.disk.fs.set_faults(SimFaults {
            write_error_one_in: one_in,
            sync_error_one_in: one_in,
            capacity_bytes: u64::MAX,
        });
    }
}

impl LogStorage for WalDisk {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.wal.initial_state()
    }
    fn first_index(&self) -> Index {
        self.wal.first_index()
    }
    fn last_index(&self) -> Index {
        self.wal.last_index()
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.wal.term(index)
    }
    fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, StorageError> {
        self.wal.entries(low, high, bytes_max)
    }
    fn snapshot_chunk(
        &self,
        last: EntryId,
        offset: u64,
        bytes_max: u64,
    ) -> Result<Bytes, StorageError> {
        self.wal.snapshot_chunk(last, offset, bytes_max)
    }
    fn snapshot_info(&self) -> Option<SnapshotInfo> {
        self.wal.snapshot_info()
    }
}
