//! The Raft safety properties (Figure 3 of the paper), checked after every simulation step.
//!
//! - **Election safety**: at most one leader per term.
//! - **Leader append-only**: a leader never overwrites or deletes entries in its log.
//! - **Log matching**: if two logs hold an entry with the same index and term, they are
//!   identical up to it. Checked by induction: every (index, term) is registered with the term
//!   of the entry before it, and no log may disagree with the registry.
//! - **Leader completeness**: a leader holds every entry committed before its term.
//! - **State machine safety**: no two nodes apply different entries at one index, with
//!   different effects, or hold different states at one index (checked in the simulation when
//!   entries are applied, with a digest of each entry's effect, and of the whole state at
//!   intervals and at every snapshot; see [`Checker::check_state`]).
//! - Commit indexes never decrease (within one run of a node), and every entry a leader commits
//!   is durable on a quorum of its configuration.

use std::collections::BTreeMap;

use flotilla_raft::{EntryId, Index, LogStorage, Membership, NodeId, RaftNode, Term};

use crate::digest::AppliedRecord;

/// A violated property, with what was seen.
pub type Violation = String;

#[derive(Debug, Default)]
pub struct Checker {
    /// Term -> the node that led it.
    leaders: BTreeMap<Term, NodeId>,
    /// (index, term) -> the term of the entry before it.
    registry: BTreeMap<(Index, Term), Term>,
    /// Per node: (incarnation, last entry whose prefix is registered).
    registered_to: BTreeMap<NodeId, (u64, EntryId)>,
    /// Per node: (incarnation, commit index).
    commits: BTreeMap<NodeId, (u64, Index)>,
    /// Per leader: (incarnation, term, last entry) when last seen leading.
    leader_logs: BTreeMap<NodeId, (u64, Term, EntryId)>,
    /// Every committed entry known, by index.
    committed: BTreeMap<Index, Term>,
    /// The term in which each index became committed (the committing leader's term). Leader
    /// completeness is about these: a leader of term T holds every entry committed in a term
    /// before T, whatever the entry's own term.
    commit_terms: BTreeMap<Index, Term>,
    /// What was applied at each index.
    pub applied: BTreeMap<Index, AppliedRecord>,
    /// The digest of the whole state at some indexes, as the first member there had it.
    state_digests: BTreeMap<Index, u64>,
}

/// What the checker needs to see of one node.
#[derive(Debug)]
pub struct NodeView<'a, S: LogStorage> {
    pub id: NodeId,
    pub incarnation: u64,
    pub node: &'a RaftNode<S>,
}

impl Checker {
    /// Compares a member's whole state at `index` with the first member's at that index.
    pub fn check_state(&mut self, id: NodeId, index: Index, digest: u64) -> Result<(), Violation> {
        let known = *self.state_digests.entry(index).or_insert(digest);
        if known != digest {
            return Err(format!(
                "state machine safety: node {id}'s state at index {index} differs from another \
                 member's at that index (digest {digest:016x}, expected {known:016x})"
            ));
        }
        Ok(())
    }

    pub fn committed_max(&self) -> Option<EntryId> {
        self.committed
            .iter()
            .next_back()
            .map(|(&index, &term)| EntryId::new(term, index))
    }

    pub fn committed_term(&self, index: Index) -> Option<Term> {
        self.committed.get(&index).copied()
    }

    /// Checks every property over the running nodes. `durable` answers whether a node's stable
    /// storage holds an entry (for crashed nodes too).
    pub fn check<S: LogStorage>(
        &mut self,
        nodes: &[NodeView<'_, S>],
        durable: &dyn Fn(NodeId, EntryId) -> bool,
    ) -> Result<(), Violation> {
        for view in nodes {
            self.check_election_safety(view)?;
            self.check_log_matching(view)?;
        }
        for view in nodes {
            self.check_commit(view, durable)?;
        }
        for view in nodes {
            self.check_leader(view)?;
        }
        for view in nodes {
            self.check_lease(view)?;
        }
        Ok(())
    }

    /// A leader's lease (thesis §6.4.1) is exclusive: while a leader of term t may answer reads
    /// from its lease, no leader of a later term has ever existed (it could have committed
    /// writes the lease holder has not seen). Checked after every step.
    fn check_lease<S: LogStorage>(&self, view: &NodeView<'_, S>) -> Result<(), Violation> {
        if view.node.lease_read_index().is_none() {
            return Ok(());
        }
        let term = view.node.term();
        match self.leaders.range(term + 1..).next() {
            Some((later, leader)) => Err(format!(
                "lease safety: node {} answers reads from its lease in term {term}, but node \
                 {leader} already led term {later}",
                view.id
            )),
            None => Ok(()),
        }
    }

    fn check_election_safety<S: LogStorage>(
        &mut self,
        view: &NodeView<'_, S>,
    ) -> Result<(), Violation> {
        if !view.node.is_leader() {
            return Ok(());
        }
        let term = view.node.term();
        let leader = *self.leaders.entry(term).or_insert(view.id);
        if leader != view.id {
            return Err(format!(
                "election safety: nodes {leader} and {} both led term {term}",
                view.id
            ));
        }
        Ok(())
    }

    fn check_log_matching<S: LogStorage>(
        &mut self,
        view: &NodeView<'_, S>,
    ) -> Result<(), Violation> {
        let node = view.node;
        let first = node.first_index();
        let last = node.last_id();
        let start = match self.registered_to.get(&view.id) {
            Some(&(incarnation, upto))
                if incarnation == view.incarnation
                    && upto.index >= first
                    && term_at(node, upto.index) == Some(upto.term) =>
            {
                upto.index + 1
            }
            _ => first,
        };
        if start <= last.index {
            let mut prev_term = term_at(node, start - 1).unwrap_or(0);
            for entry in node
                .entries(start, last.index + 1, u64::MAX)
                .expect("readable log")
            {
                let registered = *self
                    .registry
                    .entry((entry.index, entry.term))
                    .or_insert(prev_term);
                if registered != prev_term {
                    return Err(format!(
                        "log matching: node {} holds {}@{} after term {prev_term}, another log \
                         holds it after term {registered}",
                        view.id, entry.index, entry.term
                    ));
                }
                if entry.term < prev_term {
                    return Err(format!(
                        "log terms must not decrease: node {} has term {} at {} after {prev_term}",
                        view.id, entry.term, entry.index
                    ));
                }
                prev_term = entry.term;
            }
        }
        self.registered_to.insert(view.id, (view.incarnation, last));
        Ok(())
    }

    fn check_commit<S: LogStorage>(
        &mut self,
        view: &NodeView<'_, S>,
        durable: &dyn Fn(NodeId, EntryId) -> bool,
    ) -> Result<(), Violation> {
        let node = view.node;
        let commit = node.committed();
        let previous = match self.commits.get(&view.id) {
            Some(&(incarnation, previous)) if incarnation == view.incarnation => {
                if commit < previous {
                    return Err(format!(
                        "commit index of node {} went back from {previous} to {commit}",
                        view.id
                    ));
                }
                previous
            }
            _ => 0,
        };
        self.commits.insert(view.id, (view.incarnation, commit));
        if commit == previous {
            return Ok(());
        }
        let from = (previous + 1).max(node.first_index());
        for index in from..=commit {
            let Some(term) = term_at(node, index) else {
                continue;
            };
            self.commit_terms.entry(index).or_insert(node.term());
            match self.committed.insert(index, term) {
                Some(known) if known != term => {
                    return Err(format!(
                        "committed entry changed: index {index} was committed with term {known}, \
                         node {} committed term {term}",
                        view.id
                    ));
                }
                _ => {}
            }
        }
        if node.is_leader() {
            let entry = EntryId::new(
                term_at(node, commit).expect("own commit is in the log"),
                commit,
            );
            check_quorum_durable(view.id, node.membership(), entry, durable)?;
        }
        Ok(())
    }

    fn check_leader<S: LogStorage>(&mut self, view: &NodeView<'_, S>) -> Result<(), Violation> {
        let node = view.node;
        if !node.is_leader() {
            self.leader_logs.remove(&view.id);
            return Ok(());
        }
        let term = node.term();
        let last = node.last_id();
        if let Some(&(incarnation, seen_term, seen_last)) = self.leader_logs.get(&view.id)
            && incarnation == view.incarnation
            && seen_term == term
        {
            let still_there = seen_last.index < node.first_index()
                || term_at(node, seen_last.index) == Some(seen_last.term);
            if last.index < seen_last.index || !still_there {
                return Err(format!(
                    "leader append-only: leader {} of term {term} had {seen_last}, now its last \
                     entry is {last}",
                    view.id
                ));
            }
        }
        self.leader_logs
            .insert(view.id, (view.incarnation, term, last));
        // Leader completeness: every entry committed in an earlier term is in this log.
        let committed_before = self
            .commit_terms
            .iter()
            .rev()
            .find(|&(_, &commit_term)| commit_term < term);
        if let Some((&index, _)) = committed_before {
            let committed_term = self.committed[&index];
            let covered = index <= node.snapshot_id().index;
            if !covered && term_at(node, index) != Some(committed_term) {
                return Err(format!(
                    "leader completeness: leader {} of term {term} lacks committed entry \
                     {index}@{committed_term}",
                    view.id
                ));
            }
        }
        Ok(())
    }
}

fn term_at<S: LogStorage>(node: &RaftNode<S>, index: Index) -> Option<Term> {
    node.term_at(index).expect("readable log")
}

/// Every entry a leader commits must be durable on a majority of each half of its
/// configuration.
fn check_quorum_durable(
    leader: NodeId,
    membership: &Membership,
    entry: EntryId,
    durable: &dyn Fn(NodeId, EntryId) -> bool,
) -> Result<(), Violation> {
    for half in [&membership.voters, &membership.voters_outgoing] {
        if half.is_empty() {
            continue;
        }
        let holders = half.iter().filter(|&&id| durable(id, entry)).count();
        if holders < half.len() / 2 + 1 {
            return Err(format!(
                "leader {leader} committed {entry} but only {holders} of voters {half:?} hold it \
                 durably"
            ));
        }
    }
    Ok(())
}

/// True if `node` was told that `entry` is durable: it is at or below the node's persisted
/// index and in its log, or compacted into a snapshot. The storage's side of the bargain, that
/// recovery brings back everything acknowledged, is checked at every restart.
pub fn believed_durable<S: LogStorage>(node: &RaftNode<S>, entry: EntryId) -> bool {
    entry.index <= node.persisted()
        && (entry.index < node.first_index() || term_at(node, entry.index) == Some(entry.term))
}
