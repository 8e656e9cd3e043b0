//! The vocabulary of the protocol: node ids, terms, indexes, log entries and the hard state.

use bytes::Bytes;

use crate::membership::MembershipEntry;

/// Identifies a member of the cluster. Zero is reserved for "no node" (no vote, no leader).
pub type NodeId = u64;

/// The reserved id meaning "nobody": no vote cast, no leader known.
pub const NODE_NONE: NodeId = 0;

/// A Raft term (§5.1): a logical clock that increases monotonically on every node.
pub type Term = u64;

/// A position in the replicated log. The first entry has index 1; index 0 is the empty prefix.
pub type Index = u64;

/// Names one log entry by its index and the term in which a leader created it.
///
/// By the Log Matching property (§5.3), two logs holding entries with the same id are identical
/// up to and including that entry. The derived order compares the term first, then the index,
/// which is exactly the "at least as up to date" order of the election restriction (§5.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    /// The term of the leader that created the entry.
    pub term: Term,
    /// The entry's position in the log.
    pub index: Index,
}

impl EntryId {
    /// The entry at `index` created in `term`.
    pub const fn new(term: Term, index: Index) -> Self {
        Self { term, index }
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.index, self.term)
    }
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The term of the leader that created it.
    pub term: Term,
    /// Its position in the log.
    pub index: Index,
    /// What it carries.
    pub payload: EntryPayload,
}

/// What an entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryPayload {
    /// The empty entry a new leader appends at the start of its term, so that entries of earlier
    /// terms commit promptly (§5.4.2, §8).
    Blank,
    /// An opaque command for the state machine.
    Command(Bytes),
    /// A configuration (§6). It takes effect on a node as soon as it is in the node's log.
    Membership(MembershipEntry),
}

impl Entry {
    /// Its (term, index).
    pub fn id(&self) -> EntryId {
        EntryId::new(self.term, self.index)
    }

    /// The bytes this entry counts for in flow control and in the uncommitted-size bound. A
    /// fixed per-entry overhead keeps empty entries from being free.
    pub fn size_bytes(&self) -> u64 {
        const ENTRY_OVERHEAD_BYTES: u64 = 24;
        let payload_bytes = match &self.payload {
            EntryPayload::Blank => 0,
            EntryPayload::Command(data) => data.len() as u64,
            EntryPayload::Membership(entry) => entry.size_bytes(),
        };
        ENTRY_OVERHEAD_BYTES + payload_bytes
    }
}

/// The state every node must persist before it acts on it (Figure 2 "persistent state").
///
/// `commit` is persisted too so that a restarted node can apply what it knew to be committed
/// without waiting for a leader; it is never needed for safety.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, or [`NODE_NONE`].
    pub vote: NodeId,
    /// The highest index known to be committed.
    pub commit: Index,
}

/// The sum of [`Entry::size_bytes`] over `entries`.
pub fn entries_size_bytes(entries: &[Entry]) -> u64 {
    entries.iter().map(Entry::size_bytes).sum()
}
