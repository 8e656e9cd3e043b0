//! The leader's view of one follower's log (etcd's Progress): how much it matches, what to send
//! next, and how much may be in flight.
//!
//! ```text
//!              +--------------------------------------------------------+
//!              |                 send snapshot (log compacted)          |
//!              v                                                        |
//!   +--------------------+   snapshot installed / log usable   +----------+
//!   |      Snapshot      | ----------------------------------> |  Probe   |
//!   +--------------------+                                     +----------+
//!                              accepted append                   |    ^
//!                           +------------------------------------+    | rejection
//!                           v                                         | or unreachable
//!                     +-----------+ --------------------------------- +
//!                     | Replicate |
//!                     +-----------+
//! ```
//!
//! In **Probe** the leader sends one append at a time and waits for the answer (the follower's
//! log position is unknown). In **Replicate** it streams appends optimistically, bounded by a
//! window of in-flight messages and bytes. In **Snapshot** it streams InstallSnapshot chunks.

use std::collections::VecDeque;

use crate::storage::SnapshotMeta;
use crate::types::{EntryId, Index};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ProgressState {
    Probe,
    Replicate,
    Snapshot(SnapshotTransfer),
}

/// A snapshot being streamed to a follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotTransfer {
    pub meta: SnapshotMeta,
    pub snapshot: EntryId,
    pub data_bytes: u64,
    /// The next byte to send. Invariant: `acked_offset <= sent_offset <= data_bytes`.
    pub sent_offset: u64,
    /// Every byte before this is durably received by the follower.
    pub acked_offset: u64,
    /// True once the last chunk has been sent.
    pub sent_last: bool,
    /// Election timeouts that passed without the follower acknowledging anything.
    pub idle_timeouts: u32,
    /// Where the last follower-requested resend rewound to: the other stale chunks in flight
    /// draw a resend request for the same offset, which must not rewind again.
    pub rewound_to: Option<u64>,
}

/// Appends in flight to one follower: the last index of each, and their bytes. Bounded in
/// count and in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Inflights {
    /// Ascending by index.
    sent: VecDeque<(Index, u64)>,
    bytes: u64,
}

impl Inflights {
    pub fn add(&mut self, last_index: Index, bytes: u64) {
        debug_assert!(self.sent.back().is_none_or(|&(i, _)| i <= last_index));
        self.sent.push_back((last_index, bytes));
        self.bytes += bytes;
    }

    /// Frees every append whose last index is at or below `index`.
    pub fn free_to(&mut self, index: Index) {
        while let Some(&(last, bytes)) = self.sent.front() {
            if last > index {
                break;
            }
            self.sent.pop_front();
            self.bytes -= bytes;
        }
    }

    pub fn clear(&mut self) {
        self.sent.clear();
        self.bytes = 0;
    }

    pub fn count(&self) -> usize {
        self.sent.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The highest index known to match the leader's log, durably on the follower.
    pub match_index: Index,
    /// The next index to send. Invariant: `match_index < next_index`.
    pub next_index: Index,
    pub state: ProgressState,
    /// In Probe: an append was sent and its answer is awaited.
    pub probe_sent: bool,
    pub inflights: Inflights,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// The highest read round the follower acknowledged (thesis §6.4).
    pub read_round_acked: u64,
    /// The highest commit index sent to the follower in an append.
    pub commit_sent: Index,
    /// The match index when the last heartbeat answer arrived, and how many answers in a row
    /// saw no progress while appends were in flight (they were probably lost).
    pub match_at_last_heartbeat: Index,
    pub stalled_heartbeats: u32,
}

impl Progress {
    pub fn new(next_index: Index) -> Self {
        Self {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: Inflights::default(),
            recent_active: false,
            read_round_acked: 0,
            commit_sent: 0,
            match_at_last_heartbeat: 0,
            stalled_heartbeats: 0,
        }
    }

    /// Probes from just after the match. The match itself only ever rises on an
    /// acknowledgement: a snapshot transfer abandoned midway proves nothing.
    pub fn become_probe(&mut self) {
        self.next_index = self.match_index + 1;
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.stalled_heartbeats = 0;
        self.inflights.clear();
    }

    pub fn become_replicate(&mut self) {
        self.next_index = self.match_index + 1;
        self.state = ProgressState::Replicate;
        self.probe_sent = false;
        self.inflights.clear();
    }

    pub fn become_snapshot(&mut self, transfer: SnapshotTransfer) {
        self.state = ProgressState::Snapshot(transfer);
        self.probe_sent = false;
        self.inflights.clear();
    }

    /// The follower acknowledged a match up to `index`. Returns true if that was news.
    pub fn maybe_update(&mut self, index: Index) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index + 1);
        self.inflights.free_to(index);
        updated
    }

    /// The follower rejected an append whose previous entry was `rejected_prev`; `probe_from`
    /// is where the leader's log may start to agree with the follower's (from the conflict
    /// hint). Returns false if the rejection is stale (answers an append sent before the
    /// leader already learned better).
    pub fn maybe_decrease_to(&mut self, rejected_prev: Index, probe_from: Index) -> bool {
        match self.state {
            ProgressState::Replicate => {
                if rejected_prev <= self.match_index {
                    return false;
                }
                self.become_probe();
                true
            }
            ProgressState::Probe => {
                if self.next_index - 1 != rejected_prev {
                    return false;
                }
                self.next_index = rejected_prev.min(probe_from).max(self.match_index + 1);
                self.probe_sent = false;
                true
            }
            ProgressState::Snapshot(_) => false,
        }
    }

    /// True if no append may be sent now.
    pub fn is_paused(&self, inflight_messages_max: usize, inflight_bytes_max: u64) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => {
                self.inflights.count() >= inflight_messages_max
                    || self.inflights.bytes() >= inflight_bytes_max
            }
            ProgressState::Snapshot(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_free_in_order_and_track_bytes() {
        let mut inflights = Inflights::default();
        inflights.add(5, 100);
        inflights.add(9, 50);
        inflights.add(12, 25);
        assert_eq!((inflights.count(), inflights.bytes()), (3, 175));
        inflights.free_to(8);
        assert_eq!((inflights.count(), inflights.bytes()), (2, 75));
        inflights.free_to(12);
        assert_eq!((inflights.count(), inflights.bytes()), (0, 0));
    }

    #[test]
    fn stale_rejections_are_ignored() {
        let mut pr = Progress::new(11);
        pr.match_index = 4;
        pr.become_replicate();
        pr.next_index = 11;
        // A rejection at or below the match answers an old append.
        assert!(!pr.maybe_decrease_to(4, 3));
        assert_eq!(pr.state, ProgressState::Replicate);
        assert!(pr.maybe_decrease_to(7, 6));
        assert_eq!(pr.state, ProgressState::Probe);
        assert_eq!(pr.next_index, 5);
        // In probe, only a rejection of the append just sent counts.
        assert!(!pr.maybe_decrease_to(9, 2));
        assert!(pr.maybe_decrease_to(4, 9));
        assert_eq!(pr.next_index, 5, "never below match + 1");
    }

    #[test]
    fn probe_jumps_back_to_the_hint() {
        let mut pr = Progress::new(101);
        assert!(pr.maybe_decrease_to(100, 41));
        assert_eq!(pr.next_index, 41);
        assert!(!pr.probe_sent);
    }

    #[test]
    fn pausing_follows_the_state() {
        let mut pr = Progress::new(1);
        assert!(!pr.is_paused(2, 100));
        pr.probe_sent = true;
        assert!(pr.is_paused(2, 100));
        pr.become_replicate();
        pr.inflights.add(1, 10);
        assert!(!pr.is_paused(2, 100));
        pr.inflights.add(2, 10);
        assert!(pr.is_paused(2, 100));
        pr.inflights.free_to(2);
        pr.inflights.add(3, 100);
        assert!(pr.is_paused(2, 100), "byte bound");
    }
}
