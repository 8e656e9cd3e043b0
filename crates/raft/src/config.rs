//! Node configuration: timing in ticks, flow-control bounds and policies.

use crate::types::{NODE_NONE, NodeId};

/// When the caller should snapshot the state machine: after this many entries or bytes of log
/// have been applied since the last snapshot, whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Entries applied since the last snapshot.
    pub entries_max: u64,
    /// Bytes of entries applied since the last snapshot.
    pub bytes_max: u64,
}

/// Configuration of one node. Every bound is explicit; [`Config::new`] gives the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's id. Never [`NODE_NONE`].
    pub id: NodeId,
    /// T in the election timeout, which is drawn uniformly from [T, 2T) ticks (§5.2). Also the
    /// check-quorum period and the leader lease.
    pub election_timeout_ticks: u64,
    /// How often a leader sends heartbeats. Must be well below the election timeout.
    pub heartbeat_interval_ticks: u64,
    /// Probe with a pre-vote before starting a real election (thesis §9.6).
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within an election timeout steps down, and a
    /// follower that has heard from a leader within an election timeout ignores votes.
    pub check_quorum: bool,
    /// The most payload bytes in one AppendEntries message (at least one entry is always sent).
    pub append_bytes_max: u64,
    /// The most AppendEntries in flight to one follower in the replicate state.
    pub inflight_messages_max: usize,
    /// The most payload bytes in flight to one follower.
    pub inflight_bytes_max: u64,
    /// The most bytes of entries the leader holds uncommitted; proposals beyond are refused.
    pub uncommitted_bytes_max: u64,
    /// The most bytes of committed entries handed out for apply in one output.
    pub apply_bytes_max: u64,
    /// The size of one InstallSnapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// The most snapshot chunks in flight to one follower.
    pub snapshot_chunks_inflight_max: usize,
    /// When to ask the caller for a snapshot.
    pub snapshot_policy: SnapshotPolicy,
    /// Entries kept before a new snapshot when compacting, so that a follower slightly behind
    /// catches up from the log instead of needing the snapshot.
    pub snapshot_trailing_entries: u64,
    /// A learner more than this many entries behind the leader's last index is "far behind"
    /// and cannot be promoted to voter; the promotion is refused with an error.
    pub promotion_lag_entries_max: u64,
    /// The most linearizable reads waiting at a leader (or a follower) at once; further reads
    /// are refused.
    pub read_queue_max: usize,
    /// Leader leases for reads (thesis §6.4.1): a leader that a quorum acknowledged within the
    /// last election timeout serves reads without a heartbeat round
    /// ([`crate::RaftNode::lease_read_index`]). Safe only while clocks advance at about the same
    /// rate on every member, and only if every member enables it: a node that enables it also
    /// ignores elections for one election timeout after it starts, since a restart forgets the
    /// leader it acknowledged. Needs `check_quorum`.
    pub lease_reads: bool,
    /// Seeds the PRNG that randomises election timeouts.
    pub seed: u64,
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid raft config: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// A configuration with production defaults: with 100 ms ticks, a 1 s election timeout and
    /// 100 ms heartbeats.
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            append_bytes_max: 1 << 20,
            inflight_messages_max: 256,
            inflight_bytes_max: 32 << 20,
            uncommitted_bytes_max: 64 << 20,
            apply_bytes_max: 64 << 20,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_chunks_inflight_max: 4,
            snapshot_policy: SnapshotPolicy {
                entries_max: 100_000,
                bytes_max: 256 << 20,
            },
            snapshot_trailing_entries: 5_000,
            promotion_lag_entries_max: 1_000,
            read_queue_max: 4_096,
            lease_reads: false,
            seed: id,
        }
    }

    /// Checks the bounds and their relations; the error says which is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |reason: &str| Err(ConfigError(reason.to_string()));
        if self.id == NODE_NONE {
            return fail("id 0 is reserved");
        }
        if self.heartbeat_interval_ticks == 0 {
            return fail("heartbeat_interval_ticks must be at least 1");
        }
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks {
            return fail("election_timeout_ticks must exceed heartbeat_interval_ticks");
        }
        if self.lease_reads && !self.check_quorum {
            return fail(
                "lease_reads needs check_quorum: followers must ignore elections while a leader is alive",
            );
        }
        if self.lease_reads && self.election_timeout_ticks < 3 {
            return fail("lease_reads needs election_timeout_ticks of at least 3");
        }
        if self.inflight_messages_max == 0 || self.snapshot_chunks_inflight_max == 0 {
            return fail("in-flight limits must be at least 1");
        }
        if self.append_bytes_max == 0 || self.inflight_bytes_max < self.append_bytes_max {
            return fail("inflight_bytes_max must be at least append_bytes_max, which must be > 0");
        }
        if self.snapshot_chunk_bytes == 0 || self.apply_bytes_max == 0 {
            return fail("snapshot_chunk_bytes and apply_bytes_max must be positive");
        }
        if self.uncommitted_bytes_max == 0 || self.read_queue_max == 0 {
            return fail("uncommitted_bytes_max and read_queue_max must be positive");
        }
        if self.snapshot_policy.entries_max == 0 || self.snapshot_policy.bytes_max == 0 {
            return fail("the snapshot policy thresholds must be positive");
        }
        Ok(())
    }
}
