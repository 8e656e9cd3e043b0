//! The messages nodes exchange. One enum variant per RPC of the paper, plus the extensions
//! (pre-vote, heartbeats with read confirmation, chunked snapshots, read index, timeout-now).

use bytes::Bytes;

use crate::storage::SnapshotMeta;
use crate::types::{Entry, EntryId, Index, NodeId, Term};

/// A message between two nodes. Every message carries the sender's term, and the receiver
/// handles terms uniformly before anything else (§5.1), with the exceptions for pre-vote and
/// the leader lease documented in `RaftNode::step`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The sender's term (for a pre-vote, the term it would campaign in).
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
/// The RPC a message carries.
pub enum MessageBody {
    /// RequestVote (§5.2), or its pre-vote probe (thesis §9.6).
    Vote(VoteRequest),
    /// The answer to a vote or pre-vote.
    VoteResponse(VoteResponse),
    /// AppendEntries with at least one entry, or a probe with none (§5.3).
    Append(AppendRequest),
    /// The answer to an append.
    AppendResponse(AppendResponse),
    /// The leader's heartbeat; also confirms leadership for ReadIndex (thesis §6.4).
    Heartbeat(Heartbeat),
    /// The answer to a heartbeat.
    HeartbeatResponse(HeartbeatResponse),
    /// One chunk of InstallSnapshot (§7, Figure 13).
    Snapshot(SnapshotChunkMessage),
    /// The answer to a snapshot chunk.
    SnapshotResponse(SnapshotResponse),
    /// A follower asks the leader for a read index on behalf of a client (thesis §6.4).
    ReadIndex(ReadIndexRequest),
    /// The leader's answer to a follower's read index request.
    ReadIndexResponse(ReadIndexResponse),
    /// The leader tells a caught-up transfer target to start an election now (thesis §3.10).
    TimeoutNow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// A vote or pre-vote request (§5.2, thesis §9.6).
pub struct VoteRequest {
    /// A pre-vote asks "would you vote for me?" without anyone changing term. For a pre-vote
    /// the message term is the term the candidate would campaign in.
    pub pre_vote: bool,
    /// The candidate's last log entry, for the election restriction (§5.4.1).
    pub last_log: EntryId,
    /// Set when the election was started by a leadership transfer: voters then ignore the
    /// leader lease of check-quorum, since the leader itself asked for the election.
    pub leadership_transfer: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// A vote or pre-vote answer.
pub struct VoteResponse {
    /// Answers a pre-vote.
    pub pre_vote: bool,
    /// True if the vote is given (for a pre-vote: would be).
    pub granted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
/// AppendEntries (§5.3).
pub struct AppendRequest {
    /// The entry immediately before `entries`, which the follower must hold (consistency check).
    pub prev: EntryId,
    /// The entries to append after `prev` (none for a probe).
    pub entries: Vec<Entry>,
    /// The leader's commit index.
    pub commit: Index,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The answer to an append.
pub enum AppendResponse {
    /// The follower's log now matches the leader's up to `match_index`, durably.
    Accepted {
        /// The last index the follower's log matches.
        match_index: Index,
    },
    /// The consistency check failed at `rejected_prev`. `hint` is the follower's last entry at
    /// or below that index whose term is at most the rejected term: the leader can skip every
    /// index between the hint and the rejected one, which takes one round trip per term rather
    /// than per entry.
    Rejected {
        /// The `prev` index the check failed at.
        rejected_prev: Index,
        /// Where the leader may try next.
        hint: EntryId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The leader's heartbeat (§5.2).
pub struct Heartbeat {
    /// The leader's commit index capped at what the follower is known to hold, so a follower
    /// never learns a commit index beyond its own matching log.
    pub commit: Index,
    /// The leader's read round; echoed in the response (0 when no read is waiting).
    pub read_round: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The answer to a heartbeat.
pub struct HeartbeatResponse {
    /// The heartbeat's read round, echoed.
    pub read_round: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
/// One chunk of InstallSnapshot (§7, Figure 13).
pub struct SnapshotChunkMessage {
    /// The snapshot's metadata.
    pub meta: SnapshotMeta,
    /// The size of the whole snapshot.
    pub data_bytes: u64,
    /// Where this chunk starts in the snapshot.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Bytes,
}

impl SnapshotChunkMessage {
    /// True if this chunk ends the snapshot.
    pub fn is_last(&self) -> bool {
        self.offset + self.data.len() as u64 == self.data_bytes
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The answer to a snapshot chunk.
pub struct SnapshotResponse {
    /// The snapshot the response is about.
    pub snapshot: EntryId,
    /// Every byte before this offset is durably received.
    pub next_offset: u64,
    /// What the follower did with the chunk.
    pub status: SnapshotStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// What a follower did with a snapshot chunk.
pub enum SnapshotStatus {
    /// The chunk was stored; the leader may send more.
    Received,
    /// The chunk did not continue what the follower holds (a chunk was lost, or the follower
    /// restarted): the leader resumes from `next_offset`.
    Resend,
    /// The whole snapshot is received and installed.
    Installed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// A follower's request for a read index (thesis §6.4).
pub struct ReadIndexRequest {
    /// Chosen by the follower's caller, echoed back.
    pub context: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The leader's read index for a follower.
pub struct ReadIndexResponse {
    /// The request's context, echoed.
    pub context: u64,
    /// The read index, or `None` if the leader could not serve the read (it is no longer leader,
    /// or its read queue is full).
    pub index: Option<Index>,
}

impl MessageBody {
    /// A short name for logs and transcripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Vote(v) if v.pre_vote => "PreVote",
            Self::Vote(_) => "Vote",
            Self::VoteResponse(v) if v.pre_vote => "PreVoteResp",
            Self::VoteResponse(_) => "VoteResp",
            Self::Append(_) => "Append",
            Self::AppendResponse(_) => "AppendResp",
            Self::Heartbeat(_) => "Heartbeat",
            Self::HeartbeatResponse(_) => "HeartbeatResp",
            Self::Snapshot(_) => "Snapshot",
            Self::SnapshotResponse(_) => "SnapshotResp",
            Self::ReadIndex(_) => "ReadIndex",
            Self::ReadIndexResponse(_) => "ReadIndexResp",
            Self::TimeoutNow => "TimeoutNow",
        }
    }

    /// The bytes of log or snapshot payload the message carries, for flow control and for the
    /// simulator's accounting.
    pub fn payload_bytes(&self) -> u64 {
        match self {
            Self::Append(append) => crate::types::entries_size_bytes(&append.entries),
            Self::Snapshot(chunk) => chunk.data.len() as u64,
            _ => 0,
        }
    }
}
