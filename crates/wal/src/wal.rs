//! The write-ahead log: the writing side (persist batches, group commit, snapshots, segment
//! rollover and deletion) and the state the reading side shares with it.
//!
//! # Concurrency
//!
//! `Wal` is `Send + Sync` and every method takes `&self`. In the server the Raft core reads it
//! on one thread while an I/O task writes and fsyncs on another. Three locks, always taken in
//! this order, none held across an fsync that readers wait for:
//!
//! * `writer` (mutex): the current segment, the encode buffer, the staging snapshot. Held by
//!   `write` for the whole batch, and briefly by `sync` before and after its fsync.
//! * `spare` (mutex): the next segment, preallocated ahead of need.
//! * `read_state` (rwlock): the log index and open file handles. Readers hold it only to copy
//!   out locations and handles, then read files without it; the writer takes it for writing
//!   only to publish records it has already written.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use flotilla_raft::codec;
use flotilla_raft::{
    EntryId, HardState, Index, Membership, NodeId, PersistBatch, PersistId, SnapshotChunk,
    SnapshotInfo, SnapshotMeta,
};

use crate::error::{IoContext, WalError};
use crate::fs::{Fs, FsFile, RealFs};
use crate::log_index::{EntryLocation, LogIndex};
use crate::metadata::Metadata;
use crate::record::{self, HEADER_BYTES, PAYLOAD_BYTES_MAX, Record, SnapshotRef};
use crate::recovery::{self, apply_record, checkpoint_of, segment_seq_u32};
use crate::segment::{self, SegmentFile};
use crate::snapshot_file::{self, SnapshotWriter};

pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
pub const SEGMENT_BYTES_MIN: u64 = 4 << 10;
/// Entry locations are 32-bit offsets; one record may still push a segment past this.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;
/// How much of an obsolete file each step of [`Wal::reap`] frees (see `shrink_then_remove`).
const REAP_SHRINK_STEP_BYTES: u64 = 8 << 20;
/// The pause after each step: the reaper frees at most 800 MB a second.
const REAP_SHRINK_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// How to open a write-ahead log.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// The cluster the directory belongs to. A directory of another cluster is refused.
    pub cluster_id: u64,
    /// The member the directory belongs to. Another member's directory is refused.
    pub node_id: NodeId,
    /// The configuration of a brand-new cluster, recorded when the directory is created and
    /// returned by `initial_state` ever after; empty for a node that will be told by a leader.
    /// Ignored when the directory exists.
    pub bootstrap_membership: Membership,
    /// The size segments are preallocated to and rolled over at.
    pub segment_bytes: u64,
    /// **Unsafe: for benchmarks only.** Skip every fsync, while still reporting batches as
    /// durable. A crash or power loss may then lose acknowledged writes and votes, which
    /// breaks Raft's safety. Never set this on a node that holds data anyone cares about.
    pub unsafe_no_fsync: bool,
    pub fs: Arc<dyn Fs>,
}

impl WalOptions {
    /// Options for a member of `cluster_id` on the real file system.
    pub fn new(cluster_id: u64, node_id: NodeId) -> Self {
        Self {
            cluster_id,
            node_id,
            bootstrap_membership: Membership::default(),
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            unsafe_no_fsync: false,
            fs: Arc::new(RealFs),
        }
    }

    pub fn with_bootstrap_membership(mut self, membership: Membership) -> Self {
        self.bootstrap_membership = membership;
        self
    }

    pub fn with_segment_bytes(mut self, segment_bytes: u64) -> Self {
        self.segment_bytes = segment_bytes;
        self
    }

    pub fn with_fs(mut self, fs: Arc<dyn Fs>) -> Self {
        self.fs = fs;
        self
    }

    /// See [`WalOptions::unsafe_no_fsync`]: benchmarks only.
    pub fn with_unsafe_no_fsync_for_benchmarks_only(mut self) -> Self {
        self.unsafe_no_fsync = true;
        self
    }
}

/// The durable storage of one Raft node. See the crate documentation.
#[derive(Debug)]
pub struct Wal {
    pub(crate) dir: PathBuf,
    pub(crate) fs: Arc<dyn Fs>,
    pub(crate) sync_enabled: bool,
    pub(crate) segment_bytes: u64,
    pub(crate) metadata: Metadata,
    pub(crate) read_state: RwLock<ReadState>,
    pub(crate) writer: Mutex<Writer>,
    pub(crate) spare: Mutex<Spare>,
    /// Obsolete files (renamed to `<name>.reap`) to unlink, oldest first, by [`Wal::reap`]:
    /// unlinking a large file took tens of milliseconds, too long for the WAL's own thread or
    /// its writer lock.
    reapable: Mutex<VecDeque<PathBuf>>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
}

/// What readers share with the writer.
#[derive(Debug)]
pub(crate) struct ReadState {
    pub log: LogIndex,
    /// Open handles of the segments holding live records, by number.
    pub segments: BTreeMap<u32, Arc<dyn FsFile>>,
    pub snapshot_file: Option<Arc<dyn FsFile>>,
}

/// The suffix of an obsolete file waiting to be unlinked (see [`Wal::reap`]).
pub(crate) const REAP_SUFFIX: &str = ".reap";

/// A point in the log: a segment number and an offset in it.
type LogPosition = (u64, u64);

/// A file no longer needed once the log is durable past some position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Obsolete {
    /// A segment: recycled as the spare if none is ready, else removed.
    Segment(u64),
    Snapshot(PathBuf),
}

#[derive(Debug)]
pub(crate) struct Writer {
    pub segment: SegmentFile,
    /// Where the next record goes in the current segment.
    pub write_offset: u64,
    pub capacity_bytes: u64,
    /// The current segment is durable up to here.
    pub synced_offset: u64,
    /// The durable offset the last sync mark in this segment vouched for.
    pub marked_offset: u64,
    /// Encoded records not yet written, and what they mean.
    buf: Vec<u8>,
    pending: Vec<PendingRecord>,
    staging: Option<Staging>,
    pub next_snapshot_generation: u64,
    last_written_batch: Option<PersistId>,
    durable_batch: Option<PersistId>,
    /// Files to delete once the log is durable past the position that made them obsolete.
    deferred_removals: VecDeque<(LogPosition, Obsolete)>,
    closed: bool,
}

#[derive(Debug)]
struct PendingRecord {
    record: Record,
    buf_offset: usize,
    record_bytes: usize,
    /// For snapshot records: the file that becomes current.
    snapshot_file: Option<Arc<dyn FsFile>>,
}

/// A snapshot being received from the leader.
#[derive(Debug)]
struct Staging {
    writer: SnapshotWriter,
    meta: SnapshotMeta,
    data_bytes: u64,
}

/// The next segment, created and zero-filled before the current one fills up.
#[derive(Debug)]
pub(crate) struct Spare {
    pub next_seq: u64,
    pub prepared: Option<SegmentFile>,
    /// The prepared spare is a recycled segment (written blocks) rather than a fresh one
    /// (reserved blocks, whose first overwrite costs an extent conversion at fdatasync).
    pub recycled: bool,
}

/// What validation worked out for the write.
struct Plan {
    compact_to: Option<EntryId>,
}

/// The largest sync mark record.
const SYNC_MARK_BYTES: u64 = 24;
const PAGE_BYTES: u64 = 4096;
/// Writes at least this large end on a page boundary.
const PAD_WRITES_FROM_BYTES: u64 = 64 << 10;

impl Writer {
    pub(crate) fn new(
        segment: SegmentFile,
        write_offset: u64,
        capacity: u64,
        gen_next: u64,
    ) -> Self {
        Self {
            segment,
            write_offset,
            capacity_bytes: capacity,
            synced_offset: write_offset,
            marked_offset: write_offset,
            buf: Vec::new(),
            pending: Vec::new(),
            staging: None,
            next_snapshot_generation: gen_next,
            last_written_batch: None,
            durable_batch: None,
            deferred_removals: VecDeque::new(),
            closed: false,
        }
    }

    fn position(&self) -> LogPosition {
        (self.segment.seq, self.write_offset + self.buf.len() as u64)
    }
}

impl Wal {
    pub(crate) fn from_parts(
        dir: PathBuf,
        options: &WalOptions,
        metadata: Metadata,
        read_state: ReadState,
        writer: Writer,
    ) -> Self {
        let next_seq = writer.segment.seq + 1;
        Self {
            dir,
            fs: options.fs.clone(),
            sync_enabled: !options.unsafe_no_fsync,
            segment_bytes: options.segment_bytes,
            metadata,
            read_state: RwLock::new(read_state),
            writer: Mutex::new(writer),
            spare: Mutex::new(Spare {
                next_seq,
                prepared: None,
                recycled: false,
            }),
            reapable: Mutex::new(VecDeque::new()),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// Bytes the log really holds, for a Status's db size: each segment up to the end of its
    /// last live entry (the current one up to where the next record goes), plus every other
    /// file of the directory (snapshots, metadata). Space preallocated in segments, and the
    /// spare segment prepared ahead, do not count: they hold nothing yet.
    pub fn used_bytes(&self) -> u64 {
        let (current_seq, current_end) = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            (w.segment.seq, w.write_offset + w.buf.len() as u64)
        };
        let segments: u64 = {
            let read = self.read_state.read().unwrap_or_else(|p| p.into_inner());
            read.segments
                .keys()
                .map(|&seq| match u64::from(seq) == current_seq {
                    true => current_end,
                    false => read.log.segment_end(seq).unwrap_or(0),
                })
                .sum()
        };
        let others: u64 = self
            .fs
            .list(&self.dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|name| crate::segment::parse_file_name(name).is_none())
            .filter_map(|name| self.fs.open(&self.dir.join(name)).ok()?.len().ok())
            .sum();
        segments + others
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cluster_id(&self) -> u64 {
        self.metadata.cluster_id
    }

    /// True once an I/O failure stopped the log.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The highest persist batch id known durable, if any since the log was opened.
    pub fn durable_batch(&self) -> Option<PersistId> {
        self.lock_writer().ok().and_then(|w| w.durable_batch)
    }

    pub fn hard_state(&self) -> HardState {
        self.read().log.hard_state
    }

    // ----- Failure -------------------------------------------------------------------------

    /// Stops the log for good and returns the error that did it.
    pub(crate) fn fail(&self, err: WalError) -> WalError {
        if matches!(err, WalError::Failed { .. }) {
            return err;
        }
        let mut failure = self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        failure.get_or_insert_with(|| err.to_string());
        self.failed.store(true, Ordering::Release);
        err
    }

    pub(crate) fn check_not_failed(&self) -> Result<(), WalError> {
        if !self.is_failed() {
            return Ok(());
        }
        let cause = self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .unwrap_or_default();
        Err(WalError::Failed { cause })
    }

    fn lock_writer(&self) -> Result<MutexGuard<'_, Writer>, WalError> {
        self.check_not_failed()?;
        let writer = self.writer.lock().map_err(|_| {
            self.fail(WalError::Failed {
                cause: "a writer panicked while holding the log".into(),
            })
        })?;
        if writer.closed {
            return Err(WalError::Closed);
        }
        Ok(writer)
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, ReadState> {
        // A panic while publishing is an invariant breach; it poisons the lock and the log is
        // marked failed by the next writer. Readers still get the last consistent view.
        self.read_state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, ReadState> {
        self.read_state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ----- Writing persist batches ---------------------------------------------------------

    /// Writes a persist batch: appends its records (buffered by the OS, not yet durable) and
    /// makes reads reflect it. Call [`Wal::sync`] to make it durable.
    ///
    /// A batch that breaks the contract (a gap, a chunk out of order, ...) is refused whole
    /// with [`WalError::InvalidBatch`]; any other error stops the log for good.
    pub fn write(&self, batch: &PersistBatch) -> Result<(), WalError> {
        let mut w = self.lock_writer()?;
        let plan = self.validate(&w, batch)?;
        if let Err(err) = self.write_batch(&mut w, batch, &plan) {
            return Err(self.fail(err));
        }
        w.last_written_batch = Some(batch.id);
        Ok(())
    }

    fn validate(&self, w: &Writer, batch: &PersistBatch) -> Result<Plan, WalError> {
        let invalid = |reason: String| {
            Err(WalError::InvalidBatch {
                id: batch.id,
                reason,
            })
        };
        if let Some(last) = w.last_written_batch
            && batch.id <= last
        {
            return invalid(format!(
                "batch ids must increase (batch {last} was written)"
            ));
        }
        let mut staged = w
            .staging
            .as_ref()
            .map(|s| (s.meta.clone(), s.data_bytes, s.writer.written_bytes));
        for chunk in &batch.snapshot_chunks {
            if let Err(reason) = check_chunk(&mut staged, chunk) {
                return invalid(reason);
            }
        }
        let state = self.read();
        let log = &state.log;
        let mut compacted = log.compacted;
        let mut last_index = log.last_index();
        let mut snapshot_index = log.snapshot.as_ref().map_or(0, |s| s.meta.last.index);
        if let Some(install) = &batch.snapshot_install {
            let last = install.meta.last;
            match &staged {
                Some((meta, data_bytes, written))
                    if *meta == install.meta && written == data_bytes => {}
                _ => return invalid(format!("no complete staged snapshot {last} to install")),
            }
            if install.keep_through < last.index || last.index < compacted.index {
                return invalid(format!(
                    "snapshot {last} with keep_through {} does not fit the log compacted \
                     through {}",
                    install.keep_through, compacted.index
                ));
            }
            last_index = if last_index > last.index {
                last_index.min(install.keep_through)
            } else {
                last.index
            };
            compacted = last;
            snapshot_index = last.index;
        }
        let mut plan = Plan { compact_to: None };
        if let Some(index) = batch.compact_to
            && index > compacted.index
        {
            if index > last_index || index > snapshot_index {
                return invalid(format!(
                    "compact_to {index} is past the last index {last_index} or the snapshot \
                     at {snapshot_index}"
                ));
            }
            let term = log.term(index).expect("inside the log, checked above");
            compacted = EntryId::new(term, index);
            plan.compact_to = Some(compacted);
        }
        if let Err(reason) = check_entries(&batch.entries, compacted.index, last_index) {
            return invalid(reason);
        }
        if let Some(last) = batch.entries.last() {
            last_index = last.index;
        }
        if let Some(hard_state) = batch.hard_state
            && hard_state.commit > last_index
        {
            return invalid(format!(
                "the hard state's commit index {} is past the last index {last_index}",
                hard_state.commit
            ));
        }
        Ok(plan)
    }

    fn write_batch(
        &self,
        w: &mut Writer,
        batch: &PersistBatch,
        plan: &Plan,
    ) -> Result<(), WalError> {
        self.maybe_write_sync_mark(w)?;
        for chunk in &batch.snapshot_chunks {
            self.stage_chunk(w, chunk)?;
        }
        if let Some(install) = &batch.snapshot_install {
            let (snapshot, file) = self.finish_staging(w, &install.meta)?;
            let record = Record::SnapshotInstall {
                snapshot: snapshot.clone(),
                keep_through: install.keep_through,
            };
            self.append_record(w, record, Some(file), |out| {
                record::put_snapshot_install(out, &snapshot, install.keep_through)
            })?;
        }
        if let Some(to) = plan.compact_to {
            self.append_record(w, Record::Compact(to), None, |out| {
                record::put_compact(out, to)
            })?;
        }
        for entry in &batch.entries {
            self.append_record(w, Record::Entry(entry.id()), None, |out| {
                codec::encode_entry(out, entry)
            })?;
        }
        if let Some(hard_state) = batch.hard_state {
            self.append_record(w, Record::HardState(hard_state), None, |out| {
                codec::encode_hard_state(out, &hard_state)
            })?;
        }
        self.pad_large_write(w)?;
        self.flush(w)?;
        self.retire_dead_segments(w);
        Ok(())
    }

    /// After an fsync, the first write vouches for what it made durable, so that recovery can
    /// tell damage to durable data from a torn write.
    fn maybe_write_sync_mark(&self, w: &mut Writer) -> Result<(), WalError> {
        // Without room, the next record rolls over, and the next segment's checkpoint vouches
        // for all of this one.
        if w.synced_offset <= w.marked_offset || !mark_fits(w) {
            return Ok(());
        }
        let durable_through = w.synced_offset;
        w.marked_offset = durable_through;
        let record = Record::SyncMark { durable_through };
        self.append_record(w, record, None, |out| {
            record::put_sync_mark(out, durable_through)
        })
    }

    /// Ends a large write on a page boundary with a padding record, so that the next write
    /// starts on one: a write that begins mid-page makes the device rewrite that page and, on
    /// virtual disks backed by larger blocks, read-modify-write them. Small writes are left
    /// alone: padding would multiply their size, and their cost is the fsync's latency.
    fn pad_large_write(&self, w: &mut Writer) -> Result<(), WalError> {
        if (w.buf.len() as u64) < PAD_WRITES_FROM_BYTES {
            return Ok(());
        }
        let end = w.write_offset + w.buf.len() as u64;
        let gap = end.next_multiple_of(PAGE_BYTES) - end;
        // The smallest padding record is a header and a length; a smaller gap takes a page more.
        let record_bytes = if gap >= (HEADER_BYTES + 8) as u64 {
            gap
        } else {
            gap + PAGE_BYTES
        };
        if end + record_bytes > w.capacity_bytes {
            return Ok(());
        }
        let filler = record_bytes as usize - HEADER_BYTES - 4;
        self.append_record(w, Record::Padding, None, |out| {
            out.extend_from_slice(&(filler as u32).to_le_bytes());
            out.resize(out.len() + filler, 0);
        })
    }

    /// Encodes a record into the buffer, rolling over to a new segment first if it does not
    /// fit in this one.
    fn append_record(
        &self,
        w: &mut Writer,
        record: Record,
        snapshot_file: Option<Arc<dyn FsFile>>,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), WalError> {
        let mut start = w.buf.len();
        let kind = record.kind();
        let seq = w.segment.seq;
        let padded_bytes = record::encode_record(&mut w.buf, kind, seq, write_payload) as u64;
        let payload_bytes =
            u32::from_le_bytes(w.buf[start + 4..start + 8].try_into().expect("4 bytes")) as usize;
        if w.write_offset + w.buf.len() as u64 > w.capacity_bytes {
            let mut encoded = w.buf.split_off(start);
            self.flush(w)?;
            self.rollover(w, padded_bytes)?;
            record::reseal(&mut encoded, w.segment.seq);
            w.buf = encoded;
            start = 0;
        }
        w.pending.push(PendingRecord {
            record,
            buf_offset: start,
            record_bytes: HEADER_BYTES + payload_bytes,
            snapshot_file,
        });
        Ok(())
    }

    /// Writes the buffer to the current segment and publishes its records to readers.
    fn flush(&self, w: &mut Writer) -> Result<(), WalError> {
        if w.buf.is_empty() {
            assert!(w.pending.is_empty(), "records pending without bytes");
            return Ok(());
        }
        let base = w.write_offset;
        w.segment
            .file
            .write_all_at(&w.buf, base)
            .ctx("write", &w.segment.path)?;
        let end = (w.segment.seq, base + w.buf.len() as u64);
        let seq = segment_seq_u32(w.segment.seq);
        let mut state = self.write_state();
        for pending in std::mem::take(&mut w.pending) {
            let location = EntryLocation {
                segment_seq: seq,
                offset: u32::try_from(base + pending.buf_offset as u64).expect("segment < 4 GiB"),
                record_bytes: pending.record_bytes as u32,
            };
            let replaced = state.log.snapshot.as_ref().map(|s| s.generation);
            if let Err(reason) = apply_record(&mut state.log, &pending.record, location) {
                panic!("a validated record does not apply: {reason}");
            }
            if let Some(file) = pending.snapshot_file {
                state.snapshot_file = Some(file);
                if let Some(generation) = replaced {
                    let path = self.dir.join(snapshot_file::file_name(generation));
                    w.deferred_removals
                        .push_back((end, Obsolete::Snapshot(path)));
                }
            }
        }
        state.log.check_invariants();
        drop(state);
        w.write_offset = end.1;
        w.buf.clear();
        Ok(())
    }

    /// Moves to the next segment: the current one is fsynced first, so that only the last
    /// segment can ever hold records that are not durable.
    fn rollover(&self, w: &mut Writer, record_bytes: u64) -> Result<(), WalError> {
        assert!(
            w.buf.is_empty() && w.pending.is_empty(),
            "rollover with unwritten records"
        );
        if self.sync_enabled {
            w.segment.file.sync_data().ctx("fsync", &w.segment.path)?;
        }
        let prev_end = w.write_offset;
        let encode_checkpoint = |seq: u64| {
            let checkpoint = checkpoint_of(&self.read().log, seq, Some(prev_end));
            let mut encoded = Vec::new();
            record::encode_record(&mut encoded, record::RecordKind::Checkpoint, seq, |out| {
                record::put_checkpoint(out, &checkpoint)
            });
            encoded
        };
        // The checkpoint's size does not depend on the segment number.
        let checkpoint_bytes = encode_checkpoint(0).len() as u64;
        let capacity = self
            .segment_bytes
            .max(checkpoint_bytes + record_bytes + SYNC_MARK_BYTES);
        let next = self.take_spare(capacity)?;
        let checkpoint_buf = encode_checkpoint(next.seq);
        next.file
            .write_all_at(&checkpoint_buf, 0)
            .ctx("write", &next.path)?;
        self.write_state()
            .segments
            .insert(segment_seq_u32(next.seq), next.file.clone());
        w.segment = next;
        w.write_offset = checkpoint_buf.len() as u64;
        w.capacity_bytes = capacity;
        w.synced_offset = 0;
        w.marked_offset = 0;
        Ok(())
    }

    /// The spare segment if one is ready, else a new one made now.
    fn take_spare(&self, capacity: u64) -> Result<SegmentFile, WalError> {
        let mut spare = self.spare.lock().map_err(|_| WalError::Failed {
            cause: "a panic while preparing a segment".into(),
        })?;
        let seq = spare.next_seq;
        spare.recycled = false;
        let segment = match spare.prepared.take() {
            Some(segment) => {
                assert_eq!(segment.seq, seq, "the spare segment is out of sequence");
                let len = segment.file.len().ctx("stat", &segment.path)?;
                if len < capacity {
                    segment
                        .file
                        .allocate(capacity)
                        .ctx("preallocate", &segment.path)?;
                }
                segment
            }
            None => SegmentFile::create(&*self.fs, &self.dir, seq, capacity, self.sync_enabled)?,
        };
        spare.next_seq += 1;
        Ok(segment)
    }

    /// Creates the next segment ahead of need, off the write path.
    fn prepare_spare(&self) -> Result<(), WalError> {
        let mut spare = self.spare.lock().map_err(|_| WalError::Failed {
            cause: "a panic while preparing a segment".into(),
        })?;
        if spare.prepared.is_some() {
            return Ok(());
        }
        let seq = spare.next_seq;
        let segment = SegmentFile::create(
            &*self.fs,
            &self.dir,
            seq,
            self.segment_bytes,
            self.sync_enabled,
        )?;
        spare.prepared = Some(segment);
        Ok(())
    }

    /// Forgets the segments older than the first live entry; they are deleted once the
    /// records that made them obsolete are durable.
    fn retire_dead_segments(&self, w: &mut Writer) {
        let position = w.position();
        let mut state = self.write_state();
        let current = segment_seq_u32(w.segment.seq);
        let first_live = state
            .log
            .first_live_segment()
            .unwrap_or(current)
            .min(current);
        let dead: Vec<u32> = state
            .segments
            .range(..first_live)
            .map(|(&s, _)| s)
            .collect();
        for seq in dead {
            state.segments.remove(&seq);
            w.deferred_removals
                .push_back((position, Obsolete::Segment(seq as u64)));
        }
    }

    // ----- Snapshots received from the leader ----------------------------------------------

    fn stage_chunk(&self, w: &mut Writer, chunk: &SnapshotChunk) -> Result<(), WalError> {
        if chunk.offset == 0 {
            if let Some(old) = w.staging.take() {
                self.fs
                    .remove_file(&old.writer.path)
                    .ctx("remove", &old.writer.path)?;
            }
            let generation = w.next_snapshot_generation;
            w.next_snapshot_generation += 1;
            let path = self.dir.join(snapshot_file::partial_file_name(generation));
            w.staging = Some(Staging {
                writer: SnapshotWriter::create(&*self.fs, path, generation, self.sync_enabled)?,
                meta: chunk.meta.clone(),
                data_bytes: chunk.data_bytes,
            });
        }
        let staging = w.staging.as_mut().expect("validated: a staged snapshot");
        assert_eq!(
            staging.writer.written_bytes, chunk.offset,
            "validated: in order"
        );
        staging.writer.append(&chunk.data)
    }

    /// Makes the staged snapshot a durable file under its final name.
    fn finish_staging(
        &self,
        w: &mut Writer,
        meta: &SnapshotMeta,
    ) -> Result<(SnapshotRef, Arc<dyn FsFile>), WalError> {
        let staging = w.staging.take().expect("validated: a staged snapshot");
        let snapshot = staging.writer.finish(meta)?;
        let path = self.dir.join(snapshot_file::file_name(snapshot.generation));
        self.fs
            .rename(&staging.writer.path, &path)
            .ctx("rename", &staging.writer.path)?;
        if self.sync_enabled {
            self.fs
                .sync_dir(&self.dir)
                .ctx("fsync directory", &self.dir)?;
        }
        Ok((snapshot, staging.writer.file))
    }

    // ----- Group commit --------------------------------------------------------------------

    /// Makes everything written so far durable with one fsync (group commit), and returns the
    /// highest persist batch id now durable: the caller passes it to `RaftNode::on_persisted`.
    /// The writer lock is not held during the fsync, so reads and further writes go on.
    ///
    /// A failed fsync stops the log for good: the kernel may have dropped the data while a
    /// retried fsync would report success.
    pub fn sync(&self) -> Result<Option<PersistId>, WalError> {
        let (segment, target) = {
            let w = self.lock_writer()?;
            assert!(w.buf.is_empty(), "a batch was left half written");
            (w.segment.clone(), (w.last_written_batch, w.write_offset))
        };
        if self.sync_enabled
            && let Err(err) = segment.file.sync_data()
        {
            return Err(self.fail(WalError::io("fsync", &segment.path, err)));
        }
        let (durable, removals) = {
            let mut w = self.lock_writer()?;
            self.note_synced(&mut w, segment.seq, target)
        };
        self.remove_files(&removals)?;
        Ok(durable)
    }

    /// Creates the next segment ahead of need once the current one is three-quarters full.
    /// Call it off the critical path (after acknowledging what `sync` made durable): creating
    /// and preallocating a segment takes an fsync of its own. If nobody calls it, the rollover
    /// creates the segment itself, on the write path.
    pub fn prepare_ahead(&self) -> Result<(), WalError> {
        let due = {
            let w = self.lock_writer()?;
            w.write_offset * 4 > w.capacity_bytes * 3
        };
        if due && let Err(err) = self.prepare_spare() {
            return Err(self.fail(err));
        }
        Ok(())
    }

    /// Records that the log is durable through `target` in segment `seq`.
    fn note_synced(
        &self,
        w: &mut Writer,
        seq: u64,
        (batch, offset): (Option<PersistId>, u64),
    ) -> (Option<PersistId>, Vec<Obsolete>) {
        if batch > w.durable_batch {
            w.durable_batch = batch;
        }
        if w.segment.seq == seq {
            w.synced_offset = w.synced_offset.max(offset);
        }
        let mut removals = Vec::new();
        while w
            .deferred_removals
            .front()
            .is_some_and(|(position, _)| *position <= (seq, offset))
        {
            removals.push(w.deferred_removals.pop_front().expect("checked").1);
        }
        (w.durable_batch, removals)
    }

    /// At open everything recovered is durable: segments no longer needed go at once.
    pub(crate) fn remove_dead_segments_now(&self) -> Result<Vec<PathBuf>, WalError> {
        let obsolete: Vec<Obsolete> = {
            let mut w = self.lock_writer()?;
            self.retire_dead_segments(&mut w);
            w.deferred_removals
                .drain(..)
                .map(|(_, file)| file)
                .collect()
        };
        self.remove_files(&obsolete)
    }

    /// Recycles obsolete segments or renames them out of the log's way for [`Wal::reap`],
    /// oldest first (so that a crash part way leaves the remaining segments without a gap),
    /// likewise obsolete snapshots, then makes that durable. Returns the paths dealt with.
    fn remove_files(&self, obsolete: &[Obsolete]) -> Result<Vec<PathBuf>, WalError> {
        if obsolete.is_empty() {
            return Ok(Vec::new());
        }
        let mut gone = Vec::with_capacity(obsolete.len());
        for file in obsolete {
            let (path, result) = match file {
                Obsolete::Segment(seq) => {
                    let path = self.dir.join(segment::file_name(*seq));
                    let result = self.recycle_or_reap(&path);
                    (path, result)
                }
                Obsolete::Snapshot(path) => (path.clone(), self.queue_reapable(path)),
            };
            if let Err(err) = result {
                return Err(self.fail(err));
            }
            gone.push(path);
        }
        if self.sync_enabled
            && let Err(err) = self.fs.sync_dir(&self.dir)
        {
            return Err(self.fail(WalError::io("fsync directory", &self.dir, err)));
        }
        Ok(gone)
    }

    /// Renames an obsolete file out of the log's way (`<name>.reap`, which the next open
    /// removes, so order and gaps no longer matter for it) and queues it for [`Wal::reap`].
    /// A rename is cheap whatever the file's size; the unlink is what takes time.
    fn queue_reapable(&self, path: &Path) -> Result<(), WalError> {
        let mut name = path.as_os_str().to_owned();
        name.push(REAP_SUFFIX);
        let renamed = PathBuf::from(name);
        self.fs.rename(path, &renamed).ctx("rename", path)?;
        self.lock_reapable()?.push_back(renamed);
        Ok(())
    }

    fn lock_reapable(&self) -> Result<MutexGuard<'_, VecDeque<PathBuf>>, WalError> {
        self.reapable.lock().map_err(|_| WalError::Failed {
            cause: "a panic while reaping files".into(),
        })
    }

    /// True if obsolete files wait for [`Wal::reap`].
    pub fn has_reapable(&self) -> bool {
        self.reapable.lock().is_ok_and(|queue| !queue.is_empty())
    }

    /// Unlinks the obsolete files queued so far, oldest first, then syncs the directory.
    /// Meant for a thread of its own (the files may be large); the simulator calls it in
    /// line. Files a crash leaves behind are removed when the log is next opened.
    pub fn reap(&self) -> Result<usize, WalError> {
        let mut reaped = 0;
        loop {
            let next = self.lock_reapable()?.pop_front();
            let Some(path) = next else { break };
            if let Err(err) = self.shrink_then_remove(&path) {
                return Err(self.fail(err));
            }
            reaped += 1;
        }
        if reaped > 0
            && self.sync_enabled
            && let Err(err) = self.fs.sync_dir(&self.dir)
        {
            return Err(self.fail(WalError::io("fsync directory", &self.dir, err)));
        }
        Ok(reaped)
    }

    /// Removes an obsolete file, first shrinking a large one [`REAP_SHRINK_STEP_BYTES`] at a
    /// time with a pause after each step. Unlinking a 200 MB snapshot at once frees all its
    /// blocks in one file-system journal transaction, and every fsync on the disk (the
    /// members' WAL group commits among them) then waited for that commit: puts stalled
    /// 90–180 ms just after each snapshot, on every member at once. In steps, each commit
    /// carries a small part.
    fn shrink_then_remove(&self, path: &Path) -> Result<(), WalError> {
        if self.sync_enabled {
            let file = self.fs.open(path).ctx("open", path)?;
            let mut len = file.len().ctx("stat", path)?;
            while len > REAP_SHRINK_STEP_BYTES {
                len -= REAP_SHRINK_STEP_BYTES;
                file.set_len(len).ctx("truncate", path)?;
                std::thread::sleep(REAP_SHRINK_PAUSE);
            }
        }
        self.fs.remove_file(path).ctx("remove", path)
    }

    /// Renames a dead segment to be the next one, unless a recycled spare is ready already
    /// (then it is queued for [`Wal::reap`]). A fresh spare is replaced: a
    /// recycled segment's blocks are allocated and written, the cheapest to overwrite. The
    /// records left in it carry the old segment number, so recovery never takes them for the
    /// new segment's.
    fn recycle_or_reap(&self, path: &Path) -> Result<(), WalError> {
        let mut spare = self.spare.lock().map_err(|_| WalError::Failed {
            cause: "a panic while preparing a segment".into(),
        })?;
        if spare.prepared.is_some() && spare.recycled {
            drop(spare);
            return self.queue_reapable(path);
        }
        let seq = spare.next_seq;
        let target = self.dir.join(segment::file_name(seq));
        // Atomically replaces a fresh spare of that name, if there is one.
        self.fs.rename(path, &target).ctx("rename", path)?;
        spare.recycled = true;
        let file = self.fs.open(&target).ctx("open", &target)?;
        spare.prepared = Some(SegmentFile {
            seq,
            path: target,
            file,
        });
        Ok(())
    }

    /// Syncs while holding the writer lock (for rare operations that must be durable when
    /// they return).
    fn sync_locked(&self, w: &mut Writer) -> Result<(), WalError> {
        assert!(w.buf.is_empty(), "sync with unwritten records");
        if self.sync_enabled {
            w.segment.file.sync_data().ctx("fsync", &w.segment.path)?;
        }
        let target = (w.last_written_batch, w.write_offset);
        let seq = w.segment.seq;
        let (_, removals) = self.note_synced(w, seq, target);
        self.remove_files(&removals).map(drop)
    }

    /// Makes everything durable, vouches for it with a final sync mark (so that any later
    /// damage to the log is detected as such) and stops accepting work.
    pub fn close(&self) -> Result<(), WalError> {
        let mut w = self.lock_writer()?;
        let result = (|| {
            self.sync_locked(&mut w)?;
            if !mark_fits(&w) {
                // No room for the mark: the next segment's checkpoint vouches instead, since it
                // says exactly where this segment's records end.
                self.rollover(&mut w, 0)?;
            }
            self.maybe_write_sync_mark(&mut w)?;
            self.flush(&mut w)?;
            self.sync_locked(&mut w)
        })();
        if let Err(err) = result {
            return Err(self.fail(err));
        }
        w.closed = true;
        Ok(())
    }

    // ----- Snapshots of the local state machine --------------------------------------------

    /// Saves a snapshot the local state machine produced at `meta.last` (from
    /// `RaftNode::snapshot_meta`): streamed to a temporary file, fsynced, renamed, the
    /// directory fsynced, and recorded in the log, which is fsynced too. Durable when it
    /// returns; the previous snapshot file is deleted. The log itself is untouched: the core
    /// asks for compaction in a later batch once told with `on_snapshot_saved`.
    pub fn save_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: impl Read,
    ) -> Result<SnapshotInfo, WalError> {
        let generation = {
            let mut w = self.lock_writer()?;
            self.check_snapshot_fits(meta)?;
            w.next_snapshot_generation += 1;
            w.next_snapshot_generation - 1
        };
        let tmp = self.dir.join(snapshot_file::tmp_file_name(generation));
        // A failure to read the caller's data leaves the log untouched: the temporary file is
        // removed and the log goes on. A failure of the file system is fatal, as everywhere.
        let (snapshot, file) = match self.write_snapshot_file(&tmp, generation, meta, data) {
            Ok(written) => written,
            Err(err @ WalError::SnapshotData { .. }) => {
                if let Err(remove) = self.fs.remove_file(&tmp) {
                    return Err(self.fail(WalError::io("remove", &tmp, remove)));
                }
                return Err(err);
            }
            Err(err) => return Err(self.fail(err)),
        };
        let mut w = self.lock_writer()?;
        if let Err(err) = self.check_snapshot_fits(meta) {
            let _ = self.fs.remove_file(&tmp);
            return Err(err);
        }
        let result = (|| {
            let path = self.dir.join(snapshot_file::file_name(generation));
            self.fs.rename(&tmp, &path).ctx("rename", &tmp)?;
            if self.sync_enabled {
                self.fs
                    .sync_dir(&self.dir)
                    .ctx("fsync directory", &self.dir)?;
            }
            self.maybe_write_sync_mark(&mut w)?;
            let record = Record::SnapshotSaved(snapshot.clone());
            self.append_record(&mut w, record, Some(file), |out| {
                record::put_snapshot_ref(out, &snapshot)
            })?;
            self.flush(&mut w)?;
            self.sync_locked(&mut w)
        })();
        if let Err(err) = result {
            return Err(self.fail(err));
        }
        Ok(SnapshotInfo {
            meta: meta.clone(),
            data_bytes: snapshot.data_bytes,
        })
    }

    /// A saved snapshot must not be older than the current one and must agree with the log.
    fn check_snapshot_fits(&self, meta: &SnapshotMeta) -> Result<(), WalError> {
        let state = self.read();
        let log = &state.log;
        let last = meta.last;
        let current = log.snapshot.as_ref().map_or(0, |s| s.meta.last.index);
        let reason = if last.index < current {
            format!("it is older than the current snapshot at {current}")
        } else if last.index > log.last_index() {
            format!("it is past the last index {}", log.last_index())
        } else if log.term(last.index) != Ok(last.term) {
            format!(
                "the log has term {:?} at index {}",
                log.term(last.index),
                last.index
            )
        } else {
            return Ok(());
        };
        Err(WalError::InvalidSnapshot {
            last: last.to_string(),
            reason,
        })
    }

    fn write_snapshot_file(
        &self,
        tmp: &Path,
        generation: u64,
        meta: &SnapshotMeta,
        mut data: impl Read,
    ) -> Result<(SnapshotRef, Arc<dyn FsFile>), WalError> {
        let mut writer =
            SnapshotWriter::create(&*self.fs, tmp.to_path_buf(), generation, self.sync_enabled)?;
        let mut buf = vec![0u8; snapshot_file::READ_CHUNK_BYTES];
        loop {
            let read = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(read) => read,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(WalError::SnapshotData {
                        path: tmp.to_path_buf(),
                        source,
                    });
                }
            };
            writer.append(&buf[..read])?;
        }
        let snapshot = writer.finish(meta)?;
        Ok((snapshot, writer.file))
    }

    /// The current snapshot's metadata and data, read whole (for the state machine to restore
    /// from at start-up or after an install).
    pub fn snapshot_data(&self) -> Result<Option<(SnapshotMeta, Bytes)>, WalError> {
        self.check_not_failed()?;
        let (snapshot, file) = {
            let state = self.read();
            match (&state.log.snapshot, &state.snapshot_file) {
                (Some(snapshot), Some(file)) => (snapshot.clone(), file.clone()),
                _ => return Ok(None),
            }
        };
        let path = self.dir.join(snapshot_file::file_name(snapshot.generation));
        let mut data = vec![0u8; snapshot.data_bytes as usize];
        file.read_exact_at(&mut data, 0).ctx("read", &path)?;
        Ok(Some((snapshot.meta, Bytes::from(data))))
    }
}

fn mark_fits(w: &Writer) -> bool {
    w.write_offset + w.buf.len() as u64 + SYNC_MARK_BYTES <= w.capacity_bytes
}

/// Checks a snapshot chunk against the staging state, updating it.
fn check_chunk(
    staged: &mut Option<(SnapshotMeta, u64, u64)>,
    chunk: &SnapshotChunk,
) -> Result<(), String> {
    if chunk.offset == 0 {
        *staged = Some((chunk.meta.clone(), chunk.data_bytes, 0));
    }
    let Some((meta, data_bytes, written)) = staged else {
        return Err(format!(
            "snapshot chunk at offset {} without a staged snapshot",
            chunk.offset
        ));
    };
    if *meta != chunk.meta || *written != chunk.offset {
        return Err(format!(
            "snapshot chunk at offset {} does not continue the staged snapshot {} at {written}",
            chunk.offset, meta.last
        ));
    }
    if *written + chunk.data.len() as u64 > *data_bytes {
        return Err(format!(
            "snapshot chunk at offset {} runs past the snapshot's {data_bytes} bytes",
            chunk.offset
        ));
    }
    *written += chunk.data.len() as u64;
    Ok(())
}

/// Checks that entries are contiguous and attach to the log (possibly replacing a suffix).
fn check_entries(
    entries: &[flotilla_raft::Entry],
    compacted: Index,
    last_index: Index,
) -> Result<(), String> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    if first.index <= compacted {
        return Err(format!(
            "append at {} overwrites the compacted log (compacted through {compacted})",
            first.index
        ));
    }
    if first.index > last_index + 1 {
        return Err(format!(
            "append at {} leaves a gap after the last index {last_index}",
            first.index
        ));
    }
    for (offset, entry) in entries.iter().enumerate() {
        if entry.index != first.index + offset as u64 {
            return Err(format!(
                "appended entries are not contiguous: {} follows {}",
                entry.index,
                first.index + offset as u64 - 1
            ));
        }
        // The encoding is at most a few bytes larger than the accounted size.
        const ENCODING_OVERHEAD_BYTES_MAX: u64 = 64;
        if entry.size_bytes() + ENCODING_OVERHEAD_BYTES_MAX > PAYLOAD_BYTES_MAX as u64 {
            return Err(format!(
                "entry {} is {} bytes, more than a record holds ({PAYLOAD_BYTES_MAX})",
                entry.index,
                entry.size_bytes()
            ));
        }
    }
    Ok(())
}

/// Used by `open`: recovery's view of a new writer over the recovered log.
pub(crate) fn read_state_from(recovered: &recovery::Recovered, current: &SegmentFile) -> ReadState {
    let mut segments: BTreeMap<u32, Arc<dyn FsFile>> = recovered
        .segments
        .iter()
        .map(|s| (segment_seq_u32(s.seq), s.file.clone()))
        .collect();
    segments.insert(segment_seq_u32(current.seq), current.file.clone());
    ReadState {
        log: recovered.index.clone(),
        segments,
        snapshot_file: recovered.snapshot_file.clone(),
    }
}
