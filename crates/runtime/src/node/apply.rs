//! The apply thread: applies committed entries and installed snapshots to the state machine in
//! log order, tells the observers (watches, leases, auth) what each did, answers the waiting
//! proposals, and starts snapshots of the applied state.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use flotilla_raft::{Apply, Index, SnapshotMeta};
use tokio::sync::{mpsc, oneshot, watch};

use super::forwarded::ForwardedWrites;
use super::snapshot_pipe::{SnapshotEncoder, SnapshotSaver};
use super::{ProposalWaiter, SnapshotRequest};
use crate::metrics::NodeMetrics;
use crate::state_machine::StateMachine;
use crate::storage::{DurableStorage, SnapshotReader};

/// The apply thread gives the state's write lock up after applying this many bytes of entries
/// in a row, so that a reader (a range, a watcher catching up, a snapshot step) waits for at
/// most about that much work, not for a whole batch (up to the core's `apply_bytes_max`,
/// 64 MiB). A reader in between sees the state at an index within the batch: a committed,
/// applied prefix of the log, as it would between two batches.
const LOCK_HELD_BYTES_MAX: usize = 1 << 20;

/// Work for the apply thread, in log order.
#[derive(Debug)]
pub(super) enum ApplyWork<O> {
    Items(Vec<(Apply, Option<ProposalWaiter<O>>)>),
    Snapshot,
}

pub(super) struct ApplyContext<S: StateMachine> {
    pub(super) storage: Arc<dyn DurableStorage>,
    pub(super) state: Arc<RwLock<S>>,
    pub(super) metrics: Arc<dyn NodeMetrics>,
    pub(super) applied: watch::Sender<Index>,
    pub(super) snapshots: mpsc::Sender<SnapshotRequest>,
    /// A snapshot is being saved in the background.
    pub(super) saving: Arc<std::sync::atomic::AtomicBool>,
    /// An apply batch or a wait for the lock slower than this is logged.
    pub(super) slow_step: std::time::Duration,
    /// This member's forwarded writes whose leader's answer may be lost.
    pub(super) forwarded: Arc<ForwardedWrites<S::Output>>,
}

impl<S: StateMachine> ApplyContext<S> {
    pub(super) fn run(self, mut work: mpsc::Receiver<ApplyWork<S::Output>>) {
        while let Some(item) = work.blocking_recv() {
            let result = match item {
                ApplyWork::Items(items) => self.apply(items),
                ApplyWork::Snapshot => self.snapshot(),
            };
            if let Err(reason) = result {
                let _ = self.snapshots.blocking_send(SnapshotRequest::Fatal(reason));
                return;
            }
        }
    }

    fn apply(&self, items: Vec<(Apply, Option<ProposalWaiter<S::Output>>)>) -> Result<(), String> {
        let started = Instant::now();
        let entries = items.len();
        let mut replies = Vec::new();
        let mut forwarded_replies = Vec::new();
        let mut last = None;
        let mut state = Some(self.write_state());
        let mut budget = LockBudget::default();
        for (item, waiter) in items {
            last = Some(item.index());
            match item {
                Apply::Entry(entry) => {
                    let machine = state.get_or_insert_with(|| self.write_state());
                    let output = machine.apply(&entry);
                    if let Some(waiter) = waiter {
                        // Proposed here: whoever tagged it is the same request, answered
                        // through the proposal.
                        replies.push((waiter, output));
                    } else if let Some(origin) = S::origin(&output)
                        && let Some(claim) = self.forwarded.take(&origin)
                    {
                        forwarded_replies.push((claim, output));
                    }
                    if budget.spend(entry_bytes(&entry)) {
                        // Let the readers waiting on the lock in before the next entry.
                        state = None;
                        std::thread::yield_now();
                    }
                }
                Apply::Snapshot(meta) => {
                    // Restore without holding the lock (readers and the transport go on), then
                    // swap the new state in.
                    state = None;
                    let restored = self.restore(&meta)?;
                    self.state
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .replace(restored);
                    self.metrics.snapshot_restored();
                }
            }
        }
        drop(state);
        if started.elapsed() > self.slow_step {
            tracing::warn!(entries, took = ?started.elapsed(), "slow apply");
        }
        if let Some(index) = last {
            self.metrics.applied(index, replies.len());
            self.applied.send_replace(index);
        }
        for (waiter, applied) in replies {
            let _ = waiter.send(Ok(applied));
        }
        for (claim, applied) in forwarded_replies {
            let _ = claim.send(applied);
        }
        Ok(())
    }

    /// The state's write lock; a long wait (readers held it) is logged with its length.
    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, S> {
        let waiting = Instant::now();
        let state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if waiting.elapsed() > self.slow_step {
            tracing::warn!(waited = ?waiting.elapsed(), "the apply thread waited for the state's lock");
        }
        state
    }

    /// A state machine restored from the snapshot `meta` names, built beside the current one
    /// (readers go on meanwhile).
    fn restore(&self, meta: &SnapshotMeta) -> Result<S, String> {
        let mut reader = SnapshotReader::new(&*self.storage, meta.last);
        let mut restored = self.state.read().unwrap_or_else(|p| p.into_inner()).empty();
        restored
            .restore(&mut reader)
            .map_err(|e| format!("restoring snapshot {}: {e}", meta.last))?;
        if restored.applied_index() != meta.last.index {
            return Err(format!(
                "snapshot {} holds a state machine at index {}",
                meta.last,
                restored.applied_index()
            ));
        }
        tracing::info!(snapshot = %meta.last, "restored the state machine from a snapshot");
        Ok(restored)
    }

    /// Saves a snapshot at the applied index, streamed from the state machine into storage.
    ///
    /// The state is pinned at the applied index (a point-in-time view: see
    /// [`StateMachine::begin_snapshot`]) and a background thread encodes it in steps of
    /// [`PIPE_CHUNK_BYTES`], each under the state's read lock, into a bounded pipe that another
    /// thread streams into storage. Apply goes on at once: it waits at most for one step's
    /// encoding, never for the whole state or the disk, and there is no second copy of the
    /// state in memory. One snapshot at a time.
    fn snapshot(&self) -> Result<(), String> {
        if self.saving.load(Ordering::Acquire) {
            return Ok(());
        }
        let index = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .applied_index();
        let current = self
            .storage
            .snapshot_info()
            .map_or(0, |s| s.meta.last.index);
        if index <= current {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        if self
            .snapshots
            .blocking_send(SnapshotRequest::Meta { index, reply })
            .is_err()
        {
            return Ok(()); // stopping
        }
        let meta = match answer.blocking_recv() {
            Ok(Ok(meta)) => meta,
            Ok(Err(reason)) => {
                tracing::warn!("no snapshot at {index}: {reason}");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        // Only this thread applies, so the state is still at `index`.
        let cursor = self
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .begin_snapshot();
        self.saving.store(true, Ordering::Release);
        let saver = SnapshotSaver {
            storage: self.storage.clone(),
            snapshots: self.snapshots.clone(),
            metrics: self.metrics.clone(),
        };
        let encoder = SnapshotEncoder {
            state: self.state.clone(),
            saving: self.saving.clone(),
        };
        let started = std::thread::Builder::new()
            .name("flotilla-snapshot-encode".into())
            .spawn(move || encoder.run(cursor, meta, saver));
        // Fatal: the node stops (and the state stays pinned, which nothing then notices).
        started
            .map(drop)
            .map_err(|err| format!("cannot start the snapshot encoder: {err}"))
    }
}

/// How much the apply thread has applied since it took the write lock.
#[derive(Debug, Default)]
struct LockBudget {
    held_bytes: usize,
}

impl LockBudget {
    /// Counts an applied entry; true if the lock is to be given up now (the count restarts).
    fn spend(&mut self, bytes: usize) -> bool {
        self.held_bytes += bytes;
        if self.held_bytes < LOCK_HELD_BYTES_MAX {
            return false;
        }
        self.held_bytes = 0;
        true
    }
}

/// The bytes an entry weighs for the lock bound: its command (a blank entry or a membership
/// change weighs nothing worth counting).
fn entry_bytes(entry: &flotilla_raft::Entry) -> usize {
    match &entry.payload {
        flotilla_raft::EntryPayload::Command(data) => data.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;
    use flotilla_raft::{Entry, EntryId, EntryPayload, LogStorage, MemStorage, Membership};

    use super::*;
    use crate::metrics::NoMetrics;
    use crate::storage::{MemDurable, StorageFailure};

    /// Keeps every command in order. A snapshot pins the commands applied so far: later ones
    /// are appended after them and never change them, so the pinned prefix is the state at
    /// the snapshot's index however long the encoding takes.
    #[derive(Debug, Default)]
    struct Appends {
        applied: Index,
        commands: Vec<(Index, Bytes)>,
    }

    /// The commands pinned (`pinned`), those encoded so far (`next`), and whether the header
    /// (the applied index at the pin) is written.
    #[derive(Debug)]
    struct AppendsCursor {
        applied: Index,
        pinned: usize,
        next: usize,
        header_written: bool,
    }

    impl StateMachine for Appends {
        type Output = Index;
        type SnapshotCursor = AppendsCursor;

        fn applied_index(&self) -> Index {
            self.applied
        }

        fn apply(&mut self, entry: &Entry) -> Index {
            if let EntryPayload::Command(data) = &entry.payload {
                self.commands.push((entry.index, data.clone()));
            }
            self.applied = entry.index;
            entry.index
        }

        fn begin_snapshot(&mut self) -> AppendsCursor {
            AppendsCursor {
                applied: self.applied,
                pinned: self.commands.len(),
                next: 0,
                header_written: false,
            }
        }

        fn continue_snapshot(
            &self,
            cursor: &mut AppendsCursor,
            out: &mut Vec<u8>,
            bytes_max: usize,
        ) -> std::io::Result<bool> {
            if !cursor.header_written {
                out.extend_from_slice(&cursor.applied.to_le_bytes());
                cursor.header_written = true;
            }
            while cursor.next < cursor.pinned && out.len() < bytes_max {
                let (index, data) = &self.commands[cursor.next];
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                out.extend_from_slice(data);
                cursor.next += 1;
            }
            Ok(cursor.next == cursor.pinned)
        }

        fn end_snapshot(&mut self, _cursor: AppendsCursor) {}

        fn empty(&self) -> Appends {
            Appends::default()
        }

        fn restore(&mut self, snapshot: &mut dyn Read) -> Result<(), String> {
            let mut bytes = Vec::new();
            snapshot
                .read_to_end(&mut bytes)
                .map_err(|e| e.to_string())?;
            let take = |bytes: &mut &[u8], n: usize| -> Result<Vec<u8>, String> {
                if bytes.len() < n {
                    return Err("truncated".into());
                }
                let (head, rest) = bytes.split_at(n);
                *bytes = rest;
                Ok(head.to_vec())
            };
            let mut rest = &bytes[..];
            let u64_of = |b: Vec<u8>| u64::from_le_bytes(b.try_into().expect("8 bytes"));
            self.applied = u64_of(take(&mut rest, 8)?);
            while !rest.is_empty() {
                let index = u64_of(take(&mut rest, 8)?);
                let length = u32::from_le_bytes(take(&mut rest, 4)?.try_into().expect("4"));
                let data = take(&mut rest, length as usize)?;
                self.commands.push((index, Bytes::from(data)));
            }
            Ok(())
        }
    }

    /// Storage whose snapshot saving waits until the test lets it go on.
    #[derive(Debug)]
    struct HeldSnapshots {
        inner: MemDurable,
        go: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl LogStorage for HeldSnapshots {
        fn initial_state(
            &self,
        ) -> Result<flotilla_raft::InitialState, flotilla_raft::StorageError> {
            self.inner.initial_state()
        }
        fn first_index(&self) -> Index {
            self.inner.first_index()
        }
        fn last_index(&self) -> Index {
            self.inner.last_index()
        }
        fn term(&self, index: Index) -> Result<flotilla_raft::Term, flotilla_raft::StorageError> {
            self.inner.term(index)
        }
        fn entries(
            &self,
            low: Index,
            high: Index,
            bytes_max: u64,
        ) -> Result<Vec<Entry>, flotilla_raft::StorageError> {
            self.inner.entries(low, high, bytes_max)
        }
        fn snapshot_chunk(
            &self,
            last: EntryId,
            offset: u64,
            bytes_max: u64,
        ) -> Result<Bytes, flotilla_raft::StorageError> {
            self.inner.snapshot_chunk(last, offset, bytes_max)
        }
        fn snapshot_info(&self) -> Option<flotilla_raft::SnapshotInfo> {
            self.inner.snapshot_info()
        }
    }

    impl DurableStorage for HeldSnapshots {
        fn write(&self, batch: &flotilla_raft::PersistBatch) -> Result<(), StorageFailure> {
            self.inner.write(batch)
        }
        fn sync(&self) -> Result<Option<flotilla_raft::PersistId>, StorageFailure> {
            self.inner.sync()
        }
        fn save_snapshot(
            &self,
            meta: &SnapshotMeta,
            data: &mut dyn Read,
        ) -> Result<(), StorageFailure> {
            let _ = self.go.lock().unwrap().recv();
            self.inner.save_snapshot(meta, data)
        }
        fn close(&self) -> Result<(), StorageFailure> {
            self.inner.close()
        }
    }

    fn command_entry(index: Index) -> Apply {
        Apply::Entry(Entry {
            term: 1,
            index,
            payload: EntryPayload::Command(Bytes::from(vec![b'v'; 1024])),
        })
    }

    /// A batch of 64 MiB of 1 KiB commands gives the write lock up every 1 MiB, not once at
    /// the end; a batch of small entries keeps it throughout.
    #[test]
    fn the_write_lock_is_given_up_every_mebibyte_of_entries() {
        let mut budget = LockBudget::default();
        let entry_bytes = 1024;
        let releases: Vec<usize> = (1..=64 * 1024)
            .filter(|_| budget.spend(entry_bytes))
            .collect();
        assert_eq!(releases.len(), 64);
        assert!(releases.iter().all(|n| n % 1024 == 0), "{releases:?}");
        let mut small = LockBudget::default();
        assert!((0..1000).all(|_| !small.spend(100)), "100 kB in all");
    }

    /// The point-in-time view at work: while a snapshot of several megabytes cannot reach the
    /// disk at all, entries go on applying, and the snapshot saved afterwards is the state at
    /// the index it was taken at, not later.
    #[test]
    fn apply_goes_on_while_a_snapshot_is_being_saved() {
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let storage = Arc::new(HeldSnapshots {
            inner: MemDurable::new(MemStorage::new_with_membership(Membership::with_voters([
                1,
            ]))),
            go: Mutex::new(go_rx),
        });
        let state = Arc::new(RwLock::new(Appends::default()));
        let (applied_tx, mut applied_rx) = watch::channel(0);
        let (snapshots_tx, mut snapshots_rx) = mpsc::channel(2);
        let context = ApplyContext {
            storage: storage.clone(),
            state: state.clone(),
            metrics: Arc::new(NoMetrics),
            applied: applied_tx,
            snapshots: snapshots_tx,
            saving: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            slow_step: Duration::from_millis(100),
            forwarded: Arc::new(ForwardedWrites::new(1)),
        };
        let (work_tx, work_rx) = mpsc::channel(8);
        let apply_thread = std::thread::spawn(move || context.run(work_rx));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();

        // 8 MiB of state: far more than the pipe to the blocked saver holds.
        let before: Vec<_> = (1..=8192).map(|i| (command_entry(i), None)).collect();
        work_tx.blocking_send(ApplyWork::Items(before)).unwrap();
        work_tx.blocking_send(ApplyWork::Snapshot).unwrap();
        let Some(SnapshotRequest::Meta { index, reply }) = snapshots_rx.blocking_recv() else {
            panic!("the apply thread asked for no snapshot metadata");
        };
        assert_eq!(index, 8192);
        let meta = SnapshotMeta {
            last: EntryId { term: 1, index },
            membership: Membership::with_voters([1]),
        };
        reply.send(Ok(meta.clone())).unwrap();

        let after: Vec<_> = (8193..=8292).map(|i| (command_entry(i), None)).collect();
        work_tx.blocking_send(ApplyWork::Items(after)).unwrap();
        // Bounded so that an apply thread stuck behind the snapshot fails the test, not hangs it.
        let applied = runtime.block_on(async {
            let wait = applied_rx.wait_for(|&applied| applied == 8292);
            tokio::time::timeout(Duration::from_secs(60), wait).await
        });
        assert!(
            matches!(applied, Ok(Ok(_))),
            "apply waited for the snapshot to reach the disk"
        );
        assert!(
            storage.snapshot_info().is_none(),
            "the snapshot is still held back"
        );

        go_tx.send(()).unwrap();
        let Some(SnapshotRequest::Saved(saved)) = snapshots_rx.blocking_recv() else {
            panic!("the snapshot was not saved");
        };
        assert_eq!(saved, meta);
        let mut restored = Appends::default();
        restored
            .restore(&mut SnapshotReader::new(&*storage, meta.last))
            .unwrap();
        assert_eq!(restored.applied_index(), 8192);
        assert_eq!(
            restored.commands.len(),
            8192,
            "the snapshot holds the state at its index"
        );
        assert_eq!(state.read().unwrap().commands.len(), 8292);
        drop(work_tx);
        apply_thread.join().unwrap();
    }
}
