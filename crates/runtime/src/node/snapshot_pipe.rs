//! Saving a snapshot beside apply: an encoder thread walks a pinned, point-in-time view of the
//! state in steps (each under the read lock for one step only) into a bounded pipe, and a saver
//! thread streams the pipe into storage. The encoder paces itself to a third of a core.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use flotilla_raft::SnapshotMeta;
use tokio::sync::mpsc;

use super::SnapshotRequest;
use crate::metrics::NodeMetrics;
use crate::state_machine::StateMachine;
use crate::storage::DurableStorage;

/// The nice value of background threads that hold no lock the write path needs (the WAL's
/// reaper, unlinking old files).
const BACKGROUND_THREAD_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_THREAD_NICE`] (on Linux a nice value
/// belongs to the thread). A failure only costs latency, so it is logged, not fatal.
///
/// Not for a thread that takes a lock the write path waits on: the snapshot encoder ran at
/// nice 10 and, preempted while it held the state's read lock for a step, kept the apply
/// thread waiting 20–50 ms for the write lock on a busy machine (priority inversion; the
/// `--warning-apply-duration` warnings showed it). The encoder paces itself instead
/// ([`ENCODE_IDLE_PER_BUSY`]).
pub fn lower_this_threads_priority() {
    if let Err(err) = rustix::process::nice(BACKGROUND_THREAD_NICE) {
        tracing::debug!("the background thread keeps its priority: {err}");
    }
}

/// After each step an encoder sleeps this many times as long as the step took, so encoding
/// a state (a snapshot, a backup, a hash) takes at most a third of a core however busy the
/// machine is, and the apply, WAL and client threads keep the rest; on an idle machine it
/// takes three times its encoding time.
const ENCODE_IDLE_PER_BUSY: u32 = 2;

/// Runs one step of encoding a state, then idles twice as long as the step took, so that an
/// encoder (a snapshot, a backup, a hash of the state) takes at most a third of a core.
pub fn paced<T>(step: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let done = step();
    std::thread::sleep(started.elapsed() * ENCODE_IDLE_PER_BUSY);
    done
}

/// Encodes a pinned state in steps into the pipe a [`SnapshotSaver`] streams into storage, then
/// releases the pin and, once the saver is done, lets the next snapshot begin.
pub(super) struct SnapshotEncoder<S> {
    pub(super) state: Arc<RwLock<S>>,
    pub(super) saving: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: StateMachine> SnapshotEncoder<S> {
    pub(super) fn run(
        self,
        mut cursor: S::SnapshotCursor,
        meta: SnapshotMeta,
        saver: SnapshotSaver,
    ) {
        let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel(4);
        // At the normal priority: at its end it holds the WAL's writer lock while it renames
        // and syncs, and the WAL thread waits for that lock.
        let saver = std::thread::Builder::new()
            .name("flotilla-snapshot-save".into())
            .spawn(move || saver.save(meta, chunks_rx));
        match saver {
            Ok(saver) => {
                let end = match self.encode(&mut cursor, &chunks_tx) {
                    Ok(()) => PipeChunk::End,
                    Err(err) => PipeChunk::Failed(err.to_string()),
                };
                self.release(cursor);
                let _ = chunks_tx.send(end);
                let _ = saver.join();
            }
            Err(err) => {
                tracing::warn!("no snapshot: cannot start the snapshot saver: {err}");
                self.release(cursor);
            }
        }
        self.saving.store(false, Ordering::Release);
    }

    /// Sends the snapshot a step at a time; the read lock is held for one step's encoding
    /// only, never while the pipe is full, and the thread idles between steps
    /// ([`ENCODE_IDLE_PER_BUSY`]).
    fn encode(
        &self,
        cursor: &mut S::SnapshotCursor,
        chunks: &std::sync::mpsc::SyncSender<PipeChunk>,
    ) -> io::Result<()> {
        loop {
            let mut chunk = Vec::with_capacity(PIPE_CHUNK_BYTES + (PIPE_CHUNK_BYTES >> 2));
            let done = paced(|| {
                self.state
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .continue_snapshot(cursor, &mut chunk, PIPE_CHUNK_BYTES)
            })?;
            chunks
                .send(PipeChunk::Data(Bytes::from(chunk)))
                .map_err(|_| io::Error::other("the snapshot saver stopped early"))?;
            if done {
                return Ok(());
            }
        }
    }

    fn release(&self, cursor: S::SnapshotCursor) {
        self.state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .end_snapshot(cursor);
    }
}

/// Streams an encoded snapshot into storage and tells the raft task.
pub(super) struct SnapshotSaver {
    pub(super) storage: Arc<dyn DurableStorage>,
    pub(super) snapshots: mpsc::Sender<SnapshotRequest>,
    pub(super) metrics: Arc<dyn NodeMetrics>,
}

impl SnapshotSaver {
    fn save(self, meta: SnapshotMeta, chunks: std::sync::mpsc::Receiver<PipeChunk>) {
        let started = Instant::now();
        let mut reader = PipeReader {
            rx: chunks,
            chunk: Bytes::new(),
            ended: false,
        };
        match self.storage.save_snapshot(&meta, &mut reader) {
            Ok(()) => {
                self.metrics.snapshot_saved(started.elapsed());
                tracing::info!(snapshot = %meta.last, elapsed = ?started.elapsed(), "saved a snapshot");
                let _ = self.snapshots.blocking_send(SnapshotRequest::Saved(meta));
            }
            // Not fatal here: a newer snapshot may have been installed meanwhile, and a failure
            // of the storage itself stops the WAL, which stops the node on its next write.
            Err(err) => tracing::warn!(snapshot = %meta.last, "snapshot not saved: {err}"),
        }
    }
}

/// Encoded bytes per step: the state's read lock is held for about a tenth of a millisecond.
const PIPE_CHUNK_BYTES: usize = 64 << 10;

enum PipeChunk {
    Data(Bytes),
    End,
    Failed(String),
}

/// Reads what a [`SnapshotEncoder`] sent; the end of data is an explicit marker, so a writer that
/// dies half way is an error, never a short snapshot.
struct PipeReader {
    rx: std::sync::mpsc::Receiver<PipeChunk>,
    chunk: Bytes,
    ended: bool,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(PipeChunk::Data(data)) => self.chunk = data,
                Ok(PipeChunk::End) => self.ended = true,
                Ok(PipeChunk::Failed(reason)) => return Err(io::Error::other(reason)),
                Err(_) => return Err(io::Error::other("the snapshot writer stopped early")),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}
