//! Log compaction and InstallSnapshot (§7): the caller's snapshots, the leader streaming one
//! to a follower in bounded, resumable chunks, and the follower installing it atomically.

use super::{IncomingSnapshot, RaftNode};
use crate::error::Error;
use crate::message::{
    AppendResponse, MessageBody, SnapshotChunkMessage, SnapshotResponse, SnapshotStatus,
};
use crate::output::{SnapshotChunk, SnapshotInstall};
use crate::progress::{ProgressState, SnapshotTransfer};
use crate::storage::{LogStorage, SnapshotMeta, StorageError};
use crate::types::{Index, NodeId};

/// A transfer idle for this many election timeouts is resent from the last acknowledged byte;
/// idle for twice that, it is abandoned and the follower probed again.
const SNAPSHOT_IDLE_TIMEOUTS_RESEND: u32 = 1;
const SNAPSHOT_IDLE_TIMEOUTS_ABANDON: u32 = 3;

impl<S: LogStorage> RaftNode<S> {
    // ----- The caller's snapshots ----------------------------------------------------------

    /// The metadata for a snapshot of the state machine at `index`, which must be applied,
    /// durable in the local log and not older than the current snapshot. The caller stores it
    /// with the snapshot data.
    ///
    /// Durable, because entries are applied once committed, before this node's own write of
    /// them may have finished: a snapshot saved past the durable log would leave storage, after
    /// a crash, with a snapshot beyond the end of its log. The log only grows durable from
    /// here (a truncation never reaches below the committed index), so the snapshot saved
    /// later is still covered.
    pub fn snapshot_meta(&self, index: Index) -> Result<SnapshotMeta, Error> {
        self.check_fatal()?;
        let invalid = |reason: String| Err(Error::InvalidSnapshot { index, reason });
        if index > self.log.applied() {
            return invalid(format!("only {} is applied", self.log.applied()));
        }
        if index > self.log.persisted() {
            return invalid(format!(
                "only {} is durable in the local log (its disk is behind)",
                self.log.persisted()
            ));
        }
        if index < self.log.snapshot_id().index {
            return invalid(format!(
                "the current snapshot is at {}",
                self.log.snapshot_id().index
            ));
        }
        let term = self.log.term(index)?;
        let membership = self.log.membership_at(index).clone();
        if membership.voters.is_empty() {
            // A member that joined later and caught up from the leader's log never saw the
            // founders' configuration (it is in their storage, not in the log) until the first
            // configuration entry. A snapshot saying "no voters" would tell whoever installs
            // it that it was removed; wait for an index whose configuration is known.
            return invalid(format!(
                "the configuration at {index} is not known here (this member joined after it; \
                 the first configuration entry it holds is later)"
            ));
        }
        Ok(SnapshotMeta {
            last: crate::types::EntryId::new(term, index),
            membership,
        })
    }

    /// The caller durably saved a snapshot with `meta` (from [`RaftNode::snapshot_meta`]). The
    /// log before it, less `snapshot_trailing_entries`, is compacted by the next persist batch.
    pub fn on_snapshot_saved(&mut self, meta: &SnapshotMeta) -> Result<(), Error> {
        self.check_fatal()?;
        let index = meta.last.index;
        let expected = self.snapshot_meta(index)?;
        if expected != *meta {
            return Err(Error::InvalidSnapshot {
                index,
                reason: format!("metadata {meta:?} does not match the log ({expected:?})"),
            });
        }
        // Never compact what is not durable, nor below what is already compacted.
        let compact_to = index
            .saturating_sub(self.config.snapshot_trailing_entries)
            .min(self.log.persisted());
        if self.log.snapshot_saved(meta, compact_to) {
            self.pending_compact = Some(compact_to);
        }
        self.applied_since_snapshot_entries = 0;
        self.applied_since_snapshot_bytes = 0;
        Ok(())
    }

    // ----- Leader --------------------------------------------------------------------------

    /// The follower needs entries that are compacted: send it the snapshot.
    pub(crate) fn start_snapshot(&mut self, to: NodeId) -> Result<(), Error> {
        let Some(info) = self.log.storage.snapshot_info() else {
            return Err(StorageError::Io(
                "the log is compacted but storage has no snapshot".into(),
            )
            .into());
        };
        let pr = self
            .leader_state_mut()
            .progress
            .get_mut(&to)
            .expect("member");
        pr.become_snapshot(SnapshotTransfer {
            snapshot: info.meta.last,
            meta: info.meta,
            data_bytes: info.data_bytes,
            sent_offset: 0,
            acked_offset: 0,
            sent_last: false,
            idle_timeouts: 0,
            rewound_to: None,
        });
        self.send_snapshot_chunks(to)
    }

    /// Sends chunks while the window allows.
    pub(crate) fn send_snapshot_chunks(&mut self, to: NodeId) -> Result<(), Error> {
        let chunk_bytes = self.config.snapshot_chunk_bytes;
        let window_bytes = chunk_bytes * self.config.snapshot_chunks_inflight_max as u64;
        for _ in 0..self.config.snapshot_chunks_inflight_max {
            let pr = self.leader_state().progress.get(&to).expect("member");
            let ProgressState::Snapshot(transfer) = &pr.state else {
                return Ok(());
            };
            if transfer.sent_last || transfer.sent_offset - transfer.acked_offset >= window_bytes {
                return Ok(());
            }
            let (snapshot, offset) = (transfer.snapshot, transfer.sent_offset);
            let data = match self
                .log
                .storage
                .snapshot_chunk(snapshot, offset, chunk_bytes)
            {
                Ok(data) => data,
                // A newer snapshot replaced it: probe again, which restarts with the new one.
                Err(StorageError::SnapshotGone { .. }) => {
                    let pr = self
                        .leader_state_mut()
                        .progress
                        .get_mut(&to)
                        .expect("member");
                    pr.become_probe();
                    self.leader_state_mut().send_pending.insert(to);
                    return Ok(());
                }
                Err(err) => return Err(err.into()),
            };
            let pr = self
                .leader_state_mut()
                .progress
                .get_mut(&to)
                .expect("member");
            let ProgressState::Snapshot(transfer) = &mut pr.state else {
                unreachable!()
            };
            let message = SnapshotChunkMessage {
                meta: transfer.meta.clone(),
                data_bytes: transfer.data_bytes,
                offset,
                data,
            };
            let end = offset + message.data.len() as u64;
            assert!(
                end <= transfer.data_bytes,
                "storage returned a chunk past the snapshot's end"
            );
            assert!(
                end > offset || transfer.data_bytes == offset,
                "storage returned an empty chunk"
            );
            transfer.sent_offset = end;
            transfer.sent_last = end == transfer.data_bytes;
            self.send(to, MessageBody::Snapshot(message));
        }
        Ok(())
    }

    pub(crate) fn handle_snapshot_response(
        &mut self,
        from: NodeId,
        response: SnapshotResponse,
    ) -> Result<(), Error> {
        let Some(pr) = self.leader_state_mut().progress.get_mut(&from) else {
            return Ok(());
        };
        let ProgressState::Snapshot(transfer) = &mut pr.state else {
            return Ok(());
        };
        if transfer.snapshot != response.snapshot {
            return Ok(());
        }
        transfer.idle_timeouts = 0;
        match response.status {
            SnapshotStatus::Received => {
                transfer.acked_offset = transfer.acked_offset.max(response.next_offset);
                // Progress past a rewind ends it: a later Resend to the same offset (say, the
                // follower restarted and lost the chunks it had) is new and must be obeyed,
                // not taken for an echo of the old one, or the transfer stalls for good.
                if transfer
                    .rewound_to
                    .is_some_and(|offset| transfer.acked_offset > offset)
                {
                    transfer.rewound_to = None;
                }
                // A late acknowledgement from before a rewind may prove the follower holds more
                // than we are resending: skip ahead.
                if transfer.acked_offset > transfer.sent_offset {
                    transfer.sent_offset = transfer.acked_offset;
                    transfer.sent_last = transfer.sent_offset == transfer.data_bytes;
                }
                self.send_snapshot_chunks(from)
            }
            SnapshotStatus::Resend => {
                let next_offset = response.next_offset.min(transfer.data_bytes);
                // Every stale chunk in flight draws a Resend for the same offset. Having rewound
                // there once (and resent since), answering each again would multiply the
                // traffic; a resend that is lost too is retried by the idle check.
                let already_resending =
                    transfer.rewound_to == Some(next_offset) && transfer.sent_offset > next_offset;
                if already_resending {
                    return Ok(());
                }
                transfer.rewound_to = Some(next_offset);
                transfer.acked_offset = next_offset;
                transfer.sent_offset = next_offset;
                transfer.sent_last = false;
                self.send_snapshot_chunks(from)
            }
            SnapshotStatus::Installed => {
                let index = transfer.snapshot.index;
                pr.maybe_update(index);
                pr.become_probe();
                self.leader_state_mut().send_pending.insert(from);
                self.maybe_commit()
            }
        }
    }

    /// Called every election timeout: resend or abandon transfers that made no progress.
    pub(crate) fn check_snapshot_transfers(&mut self) {
        let leader = self.leader_state_mut();
        for (&id, pr) in leader.progress.iter_mut() {
            let ProgressState::Snapshot(transfer) = &mut pr.state else {
                continue;
            };
            transfer.idle_timeouts += 1;
            if transfer.idle_timeouts >= SNAPSHOT_IDLE_TIMEOUTS_ABANDON {
                pr.become_probe();
                leader.send_pending.insert(id);
            } else if transfer.idle_timeouts >= SNAPSHOT_IDLE_TIMEOUTS_RESEND {
                transfer.sent_offset = transfer.acked_offset;
                transfer.sent_last = false;
                leader.send_pending.insert(id);
            }
        }
    }

    // ----- Follower ------------------------------------------------------------------------

    pub(crate) fn handle_snapshot_chunk(
        &mut self,
        from: NodeId,
        chunk: SnapshotChunkMessage,
    ) -> Result<(), Error> {
        let committed = self.log.committed();
        if chunk.meta.last.index <= committed {
            // We already have everything the snapshot covers (we caught up meanwhile).
            self.incoming_snapshot = None;
            let body = MessageBody::AppendResponse(AppendResponse::Accepted {
                match_index: committed,
            });
            self.send_after_persist(from, body);
            return Ok(());
        }
        if chunk.offset == 0 {
            self.incoming_snapshot = Some(IncomingSnapshot {
                meta: chunk.meta.clone(),
                data_bytes: chunk.data_bytes,
                next_offset: 0,
            });
        }
        let snapshot = chunk.meta.last;
        let next_offset = match &self.incoming_snapshot {
            Some(incoming)
                if incoming.meta == chunk.meta && incoming.data_bytes == chunk.data_bytes =>
            {
                incoming.next_offset
            }
            _ => 0,
        };
        if chunk.offset != next_offset || (next_offset == 0 && chunk.offset != 0) {
            let body = MessageBody::SnapshotResponse(SnapshotResponse {
                snapshot,
                next_offset,
                status: SnapshotStatus::Resend,
            });
            self.send_after_persist(from, body);
            return Ok(());
        }
        let is_last = chunk.is_last();
        let end = chunk.offset + chunk.data.len() as u64;
        self.pending_chunks.push(SnapshotChunk {
            meta: chunk.meta.clone(),
            data_bytes: chunk.data_bytes,
            offset: chunk.offset,
            data: chunk.data,
        });
        let incoming = self.incoming_snapshot.as_mut().expect("checked");
        incoming.next_offset = end;
        let status = if is_last {
            self.incoming_snapshot = None;
            self.install_snapshot(chunk.meta)?;
            SnapshotStatus::Installed
        } else {
            SnapshotStatus::Received
        };
        let body = MessageBody::SnapshotResponse(SnapshotResponse {
            snapshot,
            next_offset: end,
            status,
        });
        self.send_after_persist(from, body);
        Ok(())
    }

    /// The last chunk arrived: install the snapshot in the log now (the next persist batch
    /// carries the install), and hand it to the state machine once that batch is durable.
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), Error> {
        let keep_through = self.log.restore(&meta)?;
        self.pending_install = Some(SnapshotInstall {
            meta: meta.clone(),
            keep_through,
        });
        self.snapshot_to_apply = Some((self.persist_next_id, meta));
        self.note_membership();
        self.on_commit_advanced()
    }
}
