//! Shared test support: the "writable storage" trait both `MemStorage` and the WAL implement,
//! temporary directories, observations of a storage's whole state, and a generator of valid
//! persist batches (what a Raft core could ask for).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use flotilla_raft::{
    Entry, EntryId, EntryPayload, HardState, Index, LogStorage, MemStorage, Membership,
    PersistBatch, Prng, SnapshotChunk, SnapshotInfo, SnapshotMeta, StorageError, Term,
};
use flotilla_wal::{Fs, SimFs, Wal, WalError, WalOptions};

// Entries, snapshots and readers shared with the storage conformance suite.
pub use flotilla_runtime::conformance::storage::fixtures::*;

pub const CLUSTER_ID: u64 = 0xf107_111a;
pub const NODE_ID: u64 = 1;

/// How many seeds the randomized tests run: small by default so `cargo test` stays fast,
/// larger with `FLOTILLA_WAL_SEEDS=N`.
pub fn seeds(default: u64) -> u64 {
    std::env::var("FLOTILLA_WAL_SEEDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

// ----- Temporary directories ---------------------------------------------------------------

/// A directory under the system's temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "flotilla-wal-test-{}-{label}-{unique}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ----- Writable storage ----------------------------------------------------------------------

/// What the conformance suite and the model test need from a storage besides reads.
pub trait WritableStorage: LogStorage {
    /// Carries out a batch and makes it durable.
    fn persist(&mut self, batch: &PersistBatch) -> Result<(), String>;
    fn save_snapshot(&mut self, meta: &SnapshotMeta, data: Bytes) -> Result<(), String>;
    /// A clean restart.
    fn reopen(self) -> Self;
}

impl WritableStorage for MemStorage {
    fn persist(&mut self, batch: &PersistBatch) -> Result<(), String> {
        MemStorage::persist(self, batch).map_err(|err| err.to_string())
    }

    fn save_snapshot(&mut self, meta: &SnapshotMeta, data: Bytes) -> Result<(), String> {
        MemStorage::save_snapshot(self, meta.clone(), data).map_err(|err| err.to_string())
    }

    fn reopen(self) -> Self {
        self
    }
}

/// A WAL with what it takes to reopen it.
#[derive(Debug)]
pub struct WalUnderTest {
    pub wal: Wal,
    pub dir: PathBuf,
    pub options: WalOptions,
    _temp: Option<Arc<TempDir>>,
}

impl WalUnderTest {
    /// A WAL on the simulated file system.
    pub fn sim(seed: u64, segment_bytes: u64, membership: Membership) -> Self {
        let fs = SimFs::new(seed);
        let options = options(Arc::new(fs), segment_bytes, membership);
        Self::open(PathBuf::from("/sim/node1/wal"), options, None)
    }

    fn open(dir: PathBuf, options: WalOptions, temp: Option<Arc<TempDir>>) -> Self {
        let (wal, _report) = Wal::open(&dir, options.clone()).expect("open the WAL");
        Self {
            wal,
            dir,
            options,
            _temp: temp,
        }
    }
}

pub fn options(fs: Arc<dyn Fs>, segment_bytes: u64, membership: Membership) -> WalOptions {
    WalOptions::new(CLUSTER_ID, NODE_ID)
        .with_fs(fs)
        .with_segment_bytes(segment_bytes)
        .with_bootstrap_membership(membership)
}

impl LogStorage for WalUnderTest {
    fn initial_state(&self) -> Result<flotilla_raft::InitialState, StorageError> {
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

impl WritableStorage for WalUnderTest {
    fn persist(&mut self, batch: &PersistBatch) -> Result<(), String> {
        self.wal.write(batch).map_err(|err| err.to_string())?;
        let durable = self.wal.sync().map_err(|err| err.to_string())?;
        self.wal.prepare_ahead().map_err(|err| err.to_string())?;
        self.wal.reap().map_err(|err| err.to_string())?;
        assert_eq!(
            durable,
            Some(batch.id),
            "sync reports the batch just written"
        );
        Ok(())
    }

    fn save_snapshot(&mut self, meta: &SnapshotMeta, data: Bytes) -> Result<(), String> {
        let info = self
            .wal
            .save_snapshot(meta, &data[..])
            .map_err(|err| err.to_string())?;
        assert_eq!(info.data_bytes, data.len() as u64);
        Ok(())
    }

    fn reopen(self) -> Self {
        self.wal.close().expect("close the WAL");
        let Self {
            wal,
            dir,
            options,
            _temp,
        } = self;
        drop(wal);
        Self::open(dir, options, _temp)
    }
}

// ----- Observations --------------------------------------------------------------------------

/// Everything a storage tells through its read interface, for comparing two storages or one
/// storage before and after a restart, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub first_index: Index,
    pub last_index: Index,
    /// The terms from `first_index - 1` to `last_index`.
    pub terms: Vec<Term>,
    pub entries: Vec<Entry>,
    pub hard_state: HardState,
    pub bootstrap_membership: Membership,
    pub snapshot: Option<(SnapshotInfo, Bytes)>,
}

pub fn observe(storage: &impl LogStorage) -> Observed {
    let first_index = storage.first_index();
    let last_index = storage.last_index();
    let terms = (first_index - 1..=last_index)
        .map(|index| storage.term(index).expect("term inside the log"))
        .collect();
    let entries = read_all_entries(storage, first_index, last_index + 1);
    let init = storage.initial_state().expect("initial state");
    let snapshot = storage.snapshot_info().map(|info| {
        let data = read_snapshot(storage, &info);
        (info, data)
    });
    assert_eq!(
        init.snapshot,
        snapshot.as_ref().map(|(info, _)| info.clone())
    );
    Observed {
        first_index,
        last_index,
        terms,
        entries,
        hard_state: init.hard_state,
        bootstrap_membership: init.bootstrap_membership,
        snapshot,
    }
}

// ----- Entries and batches ---------------------------------------------------------------

// ----- A generator of valid operations -----------------------------------------------------

/// One operation on a storage.
#[derive(Clone, Debug)]
pub enum Op {
    Batch(PersistBatch),
    SaveSnapshot(SnapshotMeta, Bytes),
}

impl Op {
    pub fn apply_to_model(&self, model: &mut MemStorage) {
        match self {
            Self::Batch(batch) => model.persist(batch).expect("generated batches are valid"),
            Self::SaveSnapshot(meta, data) => model
                .save_snapshot(meta.clone(), data.clone())
                .expect("generated snapshots are valid"),
        }
    }
}

/// A snapshot being sent by a leader, over several batches.
#[derive(Clone, Debug)]
struct Incoming {
    meta: SnapshotMeta,
    data: Bytes,
    sent_bytes: usize,
}

/// Draws operations a Raft core could ask for, keeping a model of the log (every operation
/// generated so far, applied to `MemStorage`). The rules it keeps: terms never decrease, the
/// commit index never decreases and never passes the last index, committed entries are never
/// truncated, snapshots cover only committed entries, compaction stays behind the snapshot.
#[derive(Clone, Debug)]
pub struct Generator {
    pub prng: Prng,
    pub model: MemStorage,
    pub next_batch_id: u64,
    term: Term,
    incoming: Option<Incoming>,
    /// The largest entry payload drawn.
    pub payload_bytes_max: u64,
}

impl Generator {
    pub fn new(seed: u64, model: MemStorage) -> Self {
        let mut generator = Self {
            prng: Prng::new(seed),
            model,
            next_batch_id: 1,
            term: 1,
            incoming: None,
            payload_bytes_max: 300,
        };
        generator.resync();
        generator
    }

    /// Takes up after the model was replaced (by a recovered state).
    pub fn resync(&mut self) {
        let model = &self.model;
        let last_term = model.term(model.last_index()).unwrap_or(0);
        let snapshot_term = model.snapshot_info().map_or(0, |s| s.meta.last.term);
        self.term = self
            .term
            .max(model.hard_state().term)
            .max(last_term)
            .max(snapshot_term)
            .max(1);
        self.incoming = None;
    }

    /// What a core would take as committed: the hard state's commit, or the snapshot's index
    /// if that is past it (an install is committed by definition).
    fn commit(&self) -> Index {
        self.model.hard_state().commit.max(self.snapshot_index())
    }

    fn snapshot_index(&self) -> Index {
        self.model.snapshot_info().map_or(0, |s| s.meta.last.index)
    }

    pub fn next_op(&mut self) -> Op {
        if self.incoming.is_none()
            && self.prng.chance(1, 12)
            && self.commit() > self.snapshot_index()
        {
            return self.save_snapshot();
        }
        let op = Op::Batch(self.next_batch());
        op.apply_to_model(&mut self.model);
        op
    }

    fn save_snapshot(&mut self) -> Op {
        let index = self.prng.range(self.snapshot_index(), self.commit() + 1);
        let term = self
            .model
            .term(index)
            .expect("between the snapshot and the commit");
        let len = self.prng.range(0, 2000) as usize;
        let op = Op::SaveSnapshot(
            snapshot_meta(term, index),
            snapshot_bytes(self.prng.next_u64(), len),
        );
        op.apply_to_model(&mut self.model);
        op
    }

    fn next_batch(&mut self) -> PersistBatch {
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let mut batch = PersistBatch {
            id,
            ..PersistBatch::default()
        };
        if self.incoming.is_some() || self.prng.chance(1, 25) {
            self.continue_snapshot(&mut batch);
        }
        if batch.snapshot_install.is_none() && self.prng.chance(1, 6) {
            self.draw_compaction(&mut batch);
        }
        if self.prng.chance(3, 4) {
            batch.entries = self.draw_entries(&batch);
        }
        if batch.entries.is_empty() && batch.snapshot_install.is_none() || self.prng.chance(2, 3) {
            batch.hard_state = Some(self.draw_hard_state(&batch));
        }
        batch
    }

    /// The log as it will be once the batch's earlier steps are applied.
    fn log_after(&self, batch: &PersistBatch) -> (EntryId, Index, Index) {
        let mut model = self.model.clone();
        model.persist(batch).expect("valid so far");
        let compacted = model.first_index() - 1;
        let compacted = EntryId::new(model.term(compacted).expect("compaction point"), compacted);
        let snapshot = model.snapshot_info().map_or(0, |s| s.meta.last.index);
        let commit = model.hard_state().commit.max(snapshot);
        (compacted, model.last_index(), commit)
    }

    fn continue_snapshot(&mut self, batch: &mut PersistBatch) {
        if self.incoming.is_none() {
            // A leader's snapshot past our commit index, possibly past our log.
            let commit = self.commit();
            let last = self.model.last_index();
            let index = self.prng.range(commit + 1, last.max(commit) + 4);
            let matches = index <= last && self.prng.chance(1, 2);
            let term = if matches {
                self.model.term(index).expect("inside the log")
            } else {
                self.term += 1;
                self.term
            };
            let len = self.prng.range(0, 3000) as usize;
            self.incoming = Some(Incoming {
                meta: snapshot_meta(term, index),
                data: snapshot_bytes(self.prng.next_u64(), len),
                sent_bytes: 0,
            });
        }
        let incoming = self.incoming.as_mut().expect("set above");
        let chunk_bytes = self.prng.range(1, 1500) as usize;
        let pieces = self.prng.range(1, 3);
        for _ in 0..pieces {
            let start = incoming.sent_bytes;
            let end = (start + chunk_bytes).min(incoming.data.len());
            batch.snapshot_chunks.push(SnapshotChunk {
                meta: incoming.meta.clone(),
                data_bytes: incoming.data.len() as u64,
                offset: start as u64,
                data: incoming.data.slice(start..end),
            });
            incoming.sent_bytes = end;
            if end == incoming.data.len() {
                break;
            }
        }
        if incoming.sent_bytes < incoming.data.len() {
            return;
        }
        let incoming = self.incoming.take().expect("set above");
        let last = incoming.meta.last;
        let keep_through = match self.model.term(last.index) {
            Ok(term) if term == last.term => self.model.last_index().max(last.index),
            // Committed entries always match the leader's: a core drops a snapshot it has
            // caught up with meanwhile (the chunks stay staged, harmlessly).
            _ if last.index <= self.commit() => return,
            _ => last.index,
        };
        batch.snapshot_install = install(&incoming.meta, keep_through);
    }

    fn draw_compaction(&mut self, batch: &mut PersistBatch) {
        let compacted = self.model.first_index() - 1;
        let snapshot = self.snapshot_index();
        if snapshot > compacted {
            batch.compact_to = Some(self.prng.range(compacted + 1, snapshot + 1));
        }
    }

    fn draw_entries(&mut self, batch: &PersistBatch) -> Vec<Entry> {
        let (compacted, last, commit) = self.log_after(batch);
        let floor = commit.max(compacted.index);
        let first = if last > floor && self.prng.chance(1, 4) {
            // A follower's conflicting suffix replaced by a new leader's entries.
            self.term += 1;
            self.prng.range(floor + 1, last + 1)
        } else {
            if self.prng.chance(1, 10) {
                self.term += 1;
            }
            last + 1
        };
        let count = self.prng.range(1, 9);
        (first..first + count)
            .map(|index| match self.prng.range(0, 10) {
                0 => Entry {
                    term: self.term,
                    index,
                    payload: EntryPayload::Blank,
                },
                1 => membership_entry(self.term, index),
                _ => {
                    let bytes = self.prng.range(0, self.payload_bytes_max + 1) as usize;
                    command(self.term, index, bytes)
                }
            })
            .collect()
    }

    fn draw_hard_state(&mut self, batch: &PersistBatch) -> HardState {
        let (_, last, commit) = self.log_after(batch);
        let last = last.max(batch.entries.last().map_or(0, |e| e.index));
        let commit = if last > commit && self.prng.chance(1, 2) {
            self.prng.range(commit + 1, last + 1)
        } else {
            commit
        };
        HardState {
            term: self.term,
            vote: self.prng.range(0, 4),
            commit,
        }
    }
}

/// Asserts that `storage` tells the same as `model` through every read.
pub fn assert_same(storage: &impl LogStorage, model: &MemStorage, context: &str) {
    let got = observe(storage);
    let expected = observe(model);
    if got != expected {
        panic!(
            "{context}: the storage differs from the model\n got: {got:#?}\nwant: {expected:#?}"
        );
    }
}

/// True if the error stopped the WAL (as opposed to refusing one request).
pub fn is_fatal(err: &WalError) -> bool {
    !matches!(
        err,
        WalError::InvalidBatch { .. }
            | WalError::InvalidSnapshot { .. }
            | WalError::SnapshotData { .. }
    )
}
