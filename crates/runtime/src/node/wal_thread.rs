//! The WAL thread: writes the raft task's persist batches and makes them durable with one
//! fsync for all that waited (group commit), then reports the newest durable batch.

use std::time::{Duration, Instant};

use flotilla_raft::{PersistBatch, PersistId};
use tokio::sync::{mpsc, watch};

use super::SnapshotRequest;
use super::snapshot_pipe::lower_this_threads_priority;
use crate::metrics::NodeMetrics;
use crate::storage::{DurableStorage, StorageFailure};

/// Writes every batch waiting, then makes them all durable with one fsync (group commit).
/// Obsolete files are unlinked by a reaper thread beside it: unlinking a large snapshot or a
/// preallocated segment took 40–60 ms, and on this thread every write waited for it.
pub(super) fn wal_thread(
    storage: &dyn DurableStorage,
    batches: mpsc::Receiver<PersistBatch>,
    persisted: watch::Sender<Option<PersistId>>,
    fatal: mpsc::Sender<SnapshotRequest>,
    metrics: &dyn NodeMetrics,
    slow_step: Duration,
) -> Result<(), StorageFailure> {
    std::thread::scope(|scope| {
        let (reap_tx, reap_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let reaper = std::thread::Builder::new()
            .name("flotilla-wal-reap".into())
            .spawn_scoped(scope, move || {
                lower_this_threads_priority();
                while reap_rx.recv().is_ok() {
                    if let Err(err) = storage.reap() {
                        // The log is marked failed: the WAL thread stops at its next step.
                        tracing::error!("cannot remove obsolete log files: {err}");
                        return;
                    }
                }
            });
        if let Err(err) = reaper {
            return Err(StorageFailure(format!(
                "cannot start the reaper thread: {err}"
            )));
        }
        write_and_sync(
            storage, batches, &persisted, &fatal, metrics, &reap_tx, slow_step,
        )
        // The reaper sees its channel closed and finishes before the scope ends.
    })?;
    storage.close()
}

fn write_and_sync(
    storage: &dyn DurableStorage,
    mut batches: mpsc::Receiver<PersistBatch>,
    persisted: &watch::Sender<Option<PersistId>>,
    fatal: &mpsc::Sender<SnapshotRequest>,
    metrics: &dyn NodeMetrics,
    reap: &std::sync::mpsc::SyncSender<()>,
    slow_step: Duration,
) -> Result<(), StorageFailure> {
    let result = (|| {
        while let Some(batch) = batches.blocking_recv() {
            let writing = Instant::now();
            storage.write(&batch)?;
            let mut written = 1;
            while let Ok(batch) = batches.try_recv() {
                storage.write(&batch)?;
                written += 1;
            }
            let syncing = Instant::now();
            let durable = storage.sync()?;
            let synced = Instant::now();
            metrics.wal_synced(synced - syncing);
            if synced - writing > slow_step {
                tracing::warn!(
                    batches = written,
                    write = ?(syncing - writing),
                    fsync = ?(synced - syncing),
                    "slow WAL group commit"
                );
            }
            if durable.is_some() {
                persisted.send_replace(durable);
            }
            // Only now, with the writers acknowledged: the next segment's creation has an
            // fsync of its own.
            storage.prepare_ahead()?;
            if synced.elapsed() > slow_step {
                tracing::warn!(took = ?synced.elapsed(), "slow preparation of the next WAL segment");
            }
            if storage.has_reapable() {
                // Full means the reaper is already asked: it takes everything queued.
                let _ = reap.try_send(());
            }
        }
        Ok(())
    })();
    if let Err(err) = &result {
        let _ = fatal.blocking_send(SnapshotRequest::Fatal(format!(
            "the write-ahead log failed: {err}"
        )));
    }
    result
}
