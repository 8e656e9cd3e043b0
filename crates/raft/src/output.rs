//! The core's only side channel: one batch of effects per drain.
//!
//! # The contract
//!
//! The caller drives a node in a loop: feed inputs (`tick`, `step`, `propose`, ...), then call
//! [`crate::RaftNode::take_output`] and carry out the [`Output`] it returns:
//!
//! 1. **Persist.** Write `persist` to stable storage and, once it is durable (fsynced), call
//!    [`crate::RaftNode::on_persisted`] with its id. Batches must become durable in the order
//!    of their ids; acknowledging a batch acknowledges every earlier one. Within a batch the
//!    steps are applied in the order of the fields of [`PersistBatch`]; a crash in the middle
//!    may leave any prefix of those steps durable, never a later step without an earlier one.
//!    Before the caller acknowledges a batch, [`crate::LogStorage`] reads must reflect it.
//! 2. **Send.** Every message in `messages` may be sent at once, even before `persist` is
//!    durable: the core itself holds back anything that depends on unpersisted state (a vote, an
//!    append acknowledgement, the candidate's own vote) until the batch that carries that state
//!    is acknowledged, and emits it in a later output. This is what lets a leader send entries to
//!    its followers in parallel with its own fsync (thesis §10.2.1) while counting itself in the
//!    quorum only once its fsync is done. Messages may be lost, duplicated or reordered by the
//!    network; the protocol tolerates that.
//! 3. **Apply.** Apply `apply` to the state machine in order, at any pace, and report progress
//!    with [`crate::RaftNode::on_applied`]. Every entry handed out is committed: a majority
//!    holds it durably, though this node's own write of it may not be done yet (so a stalled
//!    local disk delays no answer; thesis §10.2.1). For that reason a snapshot of the state
//!    machine is taken only at an index durable here ([`crate::RaftNode::snapshot_meta`]
//!    refuses others). An [`Apply::Snapshot`] means: replace the state machine with the
//!    snapshot now in storage.
//! 4. **Answer reads.** Each [`ReadState`] in `reads` may be served now: the state machine has
//!    applied at least its index (as reported through `on_applied`).
//!
//! Nothing in an output is ever repeated; an output dropped on the floor is lost work, so the
//! caller must carry out each one fully or stop the node.

use bytes::Bytes;

use crate::Message;
use crate::storage::SnapshotMeta;
use crate::types::{Entry, EntryId, HardState, Index, NodeId, Term};

/// Identifies a persist batch; ids increase by one per batch.
pub type PersistId = u64;

/// Writes for stable storage, to be applied in field order and acknowledged once durable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PersistBatch {
    /// Acknowledge with this id once the batch is durable.
    pub id: PersistId,
    /// Step 1: chunks of a snapshot being received from the leader, to be stored at their
    /// offsets in a staging area. A chunk at offset 0 starts a new staging area, discarding any
    /// earlier partial one.
    pub snapshot_chunks: Vec<SnapshotChunk>,
    /// Step 2: the staged snapshot is complete; make it the current snapshot, atomically with
    /// discarding the log it covers.
    pub snapshot_install: Option<SnapshotInstall>,
    /// Step 3: discard log entries up to and including this index (compaction after the caller
    /// saved a snapshot and told the core with `on_snapshot_saved`).
    pub compact_to: Option<Index>,
    /// Step 4: entries to append. If the first entry's index is at or below the last index in
    /// storage, the stored entries from that index on are removed first: a conflicting suffix
    /// is replaced, never mixed with the new one.
    pub entries: Vec<Entry>,
    /// Step 5: the new hard state.
    pub hard_state: Option<HardState>,
}

impl PersistBatch {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.snapshot_chunks.is_empty()
            && self.snapshot_install.is_none()
            && self.compact_to.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
    }
}

/// A piece of a snapshot received from the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The snapshot's metadata.
    pub meta: SnapshotMeta,
    /// The size of the whole snapshot.
    pub data_bytes: u64,
    /// Where this chunk starts.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Bytes,
}

/// Make the staged snapshot current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInstall {
    /// The snapshot to make current.
    pub meta: SnapshotMeta,
    /// The log keeps only the stored entries in `(meta.last.index, keep_through]`; everything
    /// else is discarded. When the follower's log agrees with the snapshot's last entry, the
    /// entries after it are kept (§7: "if the follower has an entry that matches the snapshot's
    /// last included entry, it retains the entries following it"); otherwise `keep_through`
    /// equals `meta.last.index` and the whole log goes. Entries the storage does not hold are
    /// simply not there: the range is an upper bound, not a claim.
    pub keep_through: Index,
}

/// One item for the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Apply {
    /// A committed entry. Blank and membership entries are handed out too, so the caller sees
    /// every index in order.
    Entry(Entry),
    /// Replace the state machine with the snapshot in storage, which ends at `meta.last`.
    Snapshot(SnapshotMeta),
}

impl Apply {
    /// The log index the state machine has reached once this item is applied.
    pub fn index(&self) -> Index {
        match self {
            Self::Entry(entry) => entry.index,
            Self::Snapshot(meta) => meta.last.index,
        }
    }
}

/// A linearizable read that may now be served from the local state machine (thesis §6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The context the read was asked with.
    pub context: u64,
    /// Serve the read once the state machine has applied this index.
    pub index: Index,
}

/// Why a read request was dropped. The caller should retry, possibly elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFailure {
    /// This node lost leadership before confirming the read, or the leader refused it.
    LeadershipLost,
    /// A follower forwarded the read to the leader and heard nothing back within an election
    /// timeout (the request or the answer was lost).
    TimedOut,
}

/// The node's role, for transcripts, metrics and routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Follows a leader, or waits for one.
    Follower,
    /// Asks whether it could win before starting an election (pre-vote, thesis §9.6).
    PreCandidate,
    /// Campaigns for votes in a new term (§5.2).
    Candidate,
    /// Leads its term: appends, replicates, commits.
    Leader,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::Follower => "follower",
            Self::PreCandidate => "pre-candidate",
            Self::Candidate => "candidate",
            Self::Leader => "leader",
        };
        f.write_str(name)
    }
}

/// The role, term and known leader, reported whenever one of them changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleState {
    /// The role.
    pub role: Role,
    /// The current term.
    pub term: Term,
    /// The leader of `term` as far as this node knows, or `NODE_NONE`.
    pub leader: NodeId,
}

/// Everything the caller must do, per the contract in the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// 1. Write, make durable, acknowledge with `on_persisted`.
    pub persist: Option<PersistBatch>,
    /// 2. Send, at once.
    pub messages: Vec<Message>,
    /// 3. Apply in order, report with `on_applied`.
    pub apply: Vec<Apply>,
    /// 4. Serve these reads once applied this far.
    pub reads: Vec<ReadState>,
    /// Reads this node accepted but can no longer serve, by context.
    pub reads_failed: Vec<(u64, ReadFailure)>,
    /// Set when the role, the term or the known leader changed since the last output.
    pub role_state: Option<RoleState>,
    /// Set once when the applied log since the last snapshot passes the snapshot policy: the
    /// caller should snapshot the state machine at its applied index and report it with
    /// `on_snapshot_saved`. Set again if another policy's worth of log passes without one.
    pub snapshot_due: Option<Index>,
    /// Set when this node learned it is no longer a member: it was removed by a committed
    /// configuration, or a leader told it so. The caller should stop it.
    pub removed: bool,
}

impl Output {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.persist.is_none()
            && self.messages.is_empty()
            && self.apply.is_empty()
            && self.reads.is_empty()
            && self.reads_failed.is_empty()
            && self.role_state.is_none()
            && self.snapshot_due.is_none()
            && !self.removed
    }
}

/// What a persist batch left behind once acknowledged: the last log entry it wrote (or the
/// snapshot it installed), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PersistRecord {
    pub id: PersistId,
    pub last_written: Option<EntryId>,
    pub installs_snapshot: bool,
}
