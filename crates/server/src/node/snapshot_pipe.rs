//! Saving a snapshot beside apply: an encoder thread walks a pinned, point-in-time view of the
//! state in steps (each under the read lock for one step only) into a bounded pipe, and a saver
//! thread streams the pipe into storage. Both run at a lowered priority.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use flotilla_raft::SnapshotMeta;
use tokio::sync::mpsc;

use super::SnapshotRequest;
use crate::metrics::Metrics;
use crate::state_machine::{StateMachine, StateSnapshotCursor};
use crate::storage::DurableStorage;

/// The nice value of the snapshot threads. Encoding a large state takes a core for a while;
/// at the default priority, on a machine whose cores the member's other threads already keep
/// busy, the scheduler then left the apply and WAL threads waiting for tens of milliseconds.
/// At 10 a snapshot gets about a tenth of a contended core (all of an idle one) and so still
/// ends; the log it lets go of is held a little longer.
const SNAPSHOT_THREAD_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`SNAPSHOT_THREAD_NICE`] (on Linux a nice value
/// belongs to the thread). A failure only costs latency, so it is logged, not fatal.
pub(crate) fn lower_this_threads_priority() {
    if let Err(err) = rustix::process::nice(SNAPSHOT_THREAD_NICE) {
        tracing::debug!("the snapshot thread keeps its priority: {err}");
    }
}

/// Encodes a pinned state in steps into the pipe a [`SnapshotSaver`] streams into storage, then
/// releases the pin and, once the saver is done, lets the next snapshot begin.
pub(super) struct SnapshotEncoder {
    pub(super) state: Arc<RwLock<StateMachine>>,
    pub(super) saving: Arc<std::sync::atomic::AtomicBool>,
}

impl SnapshotEncoder {
    pub(super) fn run(
        self,
        mut cursor: StateSnapshotCursor,
        meta: SnapshotMeta,
        saver: SnapshotSaver,
    ) {
        lower_this_threads_priority();
        let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel(4);
        let saver = std::thread::Builder::new()
            .name("flotilla-snapshot-save".into())
            .spawn(move || {
                lower_this_threads_priority();
                saver.save(meta, chunks_rx)
            });
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
    /// only, never while the pipe is full.
    fn encode(
        &self,
        cursor: &mut StateSnapshotCursor,
        chunks: &std::sync::mpsc::SyncSender<PipeChunk>,
    ) -> io::Result<()> {
        loop {
            let mut chunk = Vec::with_capacity(PIPE_CHUNK_BYTES + (PIPE_CHUNK_BYTES >> 2));
            let done = self
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .continue_snapshot(cursor, &mut chunk, PIPE_CHUNK_BYTES)?;
            chunks
                .send(PipeChunk::Data(Bytes::from(chunk)))
                .map_err(|_| io::Error::other("the snapshot saver stopped early"))?;
            if done {
                return Ok(());
            }
        }
    }

    fn release(&self, cursor: StateSnapshotCursor) {
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
    pub(super) metrics: Arc<Metrics>,
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
                self.metrics.snapshot_save.observe(started.elapsed());
                tracing::info!(snapshot = %meta.last, elapsed = ?started.elapsed(), "saved a snapshot");
                let _ = self.snapshots.blocking_send(SnapshotRequest::Saved(meta));
            }
            // Not fatal here: a newer snapshot may have been installed meanwhile, and a failure
            // of the storage itself stops the WAL, which stops the node on its next write.
            Err(err) => tracing::warn!(snapshot = %meta.last, "snapshot not saved: {err}"),
        }
    }
}

const PIPE_CHUNK_BYTES: usize = 256 << 10;

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
