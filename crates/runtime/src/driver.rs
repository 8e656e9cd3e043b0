//! The driver's decisions, without I/O: what to do with each part of the core's output, which
//! waiting client gets which answer, and when a read may be served.
//!
//! [`Driver`] owns the core and the tables of waiters. Inputs go in through its methods; each
//! call of [`Driver::take_actions`] returns the [`Actions`] the shell must carry out, in the
//! core's contract order (persist, send, apply, answer reads). The waiter types are generic, so
//! a simulator can run the driver with plain ids while the tokio shell uses reply channels.
//!
//! Proposals are matched to the log by (term, index): the core returns the id an entry will
//! have if it commits; when the entry at that index is applied with the same term the proposal
//! succeeded and its waiter travels with the entry to the state machine; with another term it
//! was overwritten by a new leader and failed.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_raft::{
    Apply, ConfChange, EntryId, Error, Index, LogStorage, Message, NodeId, PersistBatch, PersistId,
    RaftNode, ReadFailure, RoleState, SnapshotMeta,
};

/// Why a request could not be carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// This member is not the leader; the leader it knows of, if any.
    #[error("not the leader (the leader is {})", leader_name(*.0))]
    NotLeader(Option<NodeId>),
    /// Leadership changed before the request was decided: it did not happen (the entry was
    /// overwritten, or the read was never confirmed).
    #[error("the leader changed before the request was decided; it did not happen")]
    LeaderChanged,
    /// Too much is waiting already; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The proposal is larger than the node takes ([`crate::NodeOptions::proposal_bytes_max`]).
    #[error("the proposal of {bytes} bytes is over the limit of {limit_bytes}")]
    TooLarge {
        /// The proposal's size.
        bytes: usize,
        /// The node's limit.
        limit_bytes: usize,
    },
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopped,
    /// A read index asked of the leader got no answer in time; it did not happen.
    #[error("the leader did not confirm the read in time")]
    TimedOut,
    /// The core refused the request for a reason of its own (an invalid membership change,
    /// a transfer in progress, ...).
    #[error("refused: {0}")]
    Refused(Error),
}

impl Refusal {
    /// The leader to send the request to instead, if this refusal names one.
    pub fn leader_hint(&self) -> Option<NodeId> {
        match self {
            Refusal::NotLeader(leader) => *leader,
            _ => None,
        }
    }
}

fn leader_name(leader: Option<NodeId>) -> String {
    leader.map_or_else(|| "not known".into(), |id| format!("{id:x}"))
}

/// Everything the shell must do after some inputs, in this order.
#[derive(Debug)]
pub struct Actions<P, R> {
    /// Write and sync, then acknowledge with [`Driver::persisted`].
    pub persist: Option<PersistBatch>,
    /// Send now (even before `persist` is durable).
    pub messages: Vec<Message>,
    /// Apply in order; an entry proposed here carries its waiter. Report with
    /// [`Driver::applied`].
    pub apply: Vec<(Apply, Option<P>)>,
    /// Proposals that failed (overwritten by another leader).
    pub proposals_failed: Vec<(P, Refusal)>,
    /// Linearizable reads that may be served from the applied state now.
    pub reads_ready: Vec<R>,
    /// Linearizable reads that failed (leadership lost before they were confirmed).
    pub reads_failed: Vec<(R, Refusal)>,
    /// Set when role, term or leader changed.
    pub role_state: Option<RoleState>,
    /// Snapshot the state machine at its applied index, then call [`Driver::snapshot_saved`].
    pub snapshot_due: bool,
    /// This member is no longer part of the cluster: stop it.
    pub removed: bool,
}

impl<P, R> Actions<P, R> {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.persist.is_none()
            && self.messages.is_empty()
            && self.apply.is_empty()
            && self.proposals_failed.is_empty()
            && self.reads_ready.is_empty()
            && self.reads_failed.is_empty()
            && self.role_state.is_none()
            && !self.snapshot_due
            && !self.removed
    }
}

/// The core plus the waiters of the requests it is deciding.
pub struct Driver<S: LogStorage, P, R> {
    node: RaftNode<S>,
    /// Proposals by the index they were given, with the term they were given in.
    proposals: BTreeMap<Index, (u64, P)>,
    /// Reads by the context passed to the core.
    reads: BTreeMap<u64, R>,
    next_read_context: u64,
    /// The highest batch acknowledged, so a repeated acknowledgement is ignored.
    persisted: Option<PersistId>,
    /// The most proposals waiting at once.
    proposals_max: usize,
    /// Waiters of an older term whose index was handed out again: they failed.
    superseded: Vec<P>,
}

impl<S: LogStorage, P, R> std::fmt::Debug for Driver<S, P, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("node", &self.node)
            .field("proposals", &self.proposals.len())
            .field("reads", &self.reads.len())
            .finish()
    }
}

impl<S: LogStorage, P, R> Driver<S, P, R> {
    /// Drives `node`, keeping at most `proposals_max` proposals waiting.
    pub fn new(node: RaftNode<S>, proposals_max: usize) -> Self {
        Driver {
            node,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_read_context: 1,
            persisted: None,
            proposals_max,
            superseded: Vec::new(),
        }
    }

    /// The core, to read its state.
    pub fn node(&self) -> &RaftNode<S> {
        &self.node
    }

    /// The storage the core reads and the shell writes (a shell that shares its storage
    /// otherwise, as the server's does, need not use this).
    pub fn storage(&self) -> &S {
        self.node.storage()
    }

    /// The storage, to write what the core asked to persist.
    pub fn storage_mut(&mut self) -> &mut S {
        self.node.storage_mut()
    }

    /// Gives the storage back, for a shell that stops the member and keeps its disk.
    pub fn into_storage(self) -> S {
        self.node.into_storage()
    }

    /// Starts an election now, as if the election timeout had passed.
    pub fn campaign(&mut self) -> Result<(), Error> {
        self.node.campaign()
    }

    /// Proposals waiting for their entries.
    pub fn pending_proposals(&self) -> usize {
        self.proposals.len()
    }

    /// One tick of the logical clock.
    pub fn tick(&mut self) -> Result<(), Error> {
        self.node.tick()
    }

    /// A message from a peer.
    pub fn step(&mut self, msg: Message) -> Result<(), Error> {
        match self.node.step(msg) {
            // A message for another id (a stale address) is not this node's problem.
            Err(Error::Misdelivered { .. }) => Ok(()),
            other => other,
        }
    }

    /// The transport could not deliver to `to`: the leader probes it instead of streaming.
    pub fn report_unreachable(&mut self, to: NodeId) {
        self.node.report_unreachable(to);
    }

    /// Proposes a command. On refusal the waiter comes back with the reason.
    pub fn propose(&mut self, data: Bytes, waiter: P) -> Result<EntryId, (P, Refusal)> {
        if self.proposals.len() >= self.proposals_max {
            let reason = format!("{} proposals waiting", self.proposals.len());
            return Err((waiter, Refusal::Overloaded(reason)));
        }
        match self.node.propose(data) {
            Ok(id) => Ok(self.track(id, waiter)),
            Err(err) => Err((waiter, refusal(err))),
        }
    }

    /// Proposes a membership change. On refusal the waiter comes back with the reason.
    pub fn propose_membership(
        &mut self,
        change: ConfChange,
        waiter: P,
    ) -> Result<EntryId, (P, Refusal)> {
        match self.node.propose_membership(change) {
            Ok(id) => Ok(self.track(id, waiter)),
            Err(err) => Err((waiter, refusal(err))),
        }
    }

    fn track(&mut self, id: EntryId, waiter: P) -> EntryId {
        // A leader never hands out an index twice in one term; an older term's waiter at this
        // index lost its entry to a new leader (this member, elected again).
        if let Some((term, previous)) = self.proposals.insert(id.index, (id.term, waiter)) {
            assert!(
                term < id.term,
                "index {} proposed twice in term {term}",
                id.index
            );
            self.superseded.push(previous);
        }
        id
    }

    /// Asks for a linearizable read: the waiter comes back in `reads_ready` once the state
    /// machine may answer it.
    pub fn read(&mut self, waiter: R) -> Result<(), (R, Refusal)> {
        let context = self.next_read_context;
        match self.node.read_index(context) {
            Ok(()) => {
                self.next_read_context += 1;
                self.reads.insert(context, waiter);
                Ok(())
            }
            Err(err) => Err((waiter, refusal(err))),
        }
    }

    /// Starts handing leadership to `to` (thesis §3.10).
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), Refusal> {
        self.node.transfer_leader(to).map_err(refusal)
    }

    /// The voter with the highest match index, other than this leader, among `eligible`
    /// (all voters if empty): the best successor.
    pub fn most_up_to_date_follower(&self, eligible: &[NodeId]) -> Option<NodeId> {
        let membership = self.node.membership();
        membership
            .voters
            .iter()
            .filter(|&&id| id != self.node.id())
            .filter(|id| eligible.is_empty() || eligible.contains(id))
            .filter_map(|&id| self.node.progress_of(id).map(|(matched, _)| (matched, id)))
            .max()
            .map(|(_, id)| id)
    }

    /// Storage made batch `id` (and all before it) durable.
    pub fn persisted(&mut self, id: PersistId) -> Result<(), Error> {
        if self.persisted.is_some_and(|done| done >= id) {
            return Ok(());
        }
        self.persisted = Some(id);
        self.node.on_persisted(id)
    }

    /// The state machine has applied everything up to `index`.
    pub fn applied(&mut self, index: Index) -> Result<(), Error> {
        if index > self.node.applied() {
            self.node.on_applied(index)?;
        }
        Ok(())
    }

    /// The metadata for a snapshot of the state machine at `index` (applied).
    pub fn snapshot_meta(&self, index: Index) -> Result<SnapshotMeta, Error> {
        self.node.snapshot_meta(index)
    }

    /// A snapshot of the state machine at `meta` is saved in storage: the core may compact
    /// the log behind it.
    pub fn snapshot_saved(&mut self, meta: &SnapshotMeta) -> Result<(), Error> {
        self.node.on_snapshot_saved(meta)
    }

    /// Everything to do now. Call after every batch of inputs, until it returns nothing.
    pub fn take_actions(&mut self) -> Result<Actions<P, R>, Error> {
        let output = self.node.take_output()?;
        let mut actions = Actions {
            persist: output.persist,
            messages: output.messages,
            apply: Vec::with_capacity(output.apply.len()),
            proposals_failed: self
                .superseded
                .drain(..)
                .map(|waiter| (waiter, Refusal::LeaderChanged))
                .collect(),
            reads_ready: Vec::new(),
            reads_failed: Vec::new(),
            role_state: output.role_state,
            snapshot_due: output.snapshot_due.is_some(),
            removed: output.removed,
        };
        for item in output.apply {
            let waiter = self.match_proposals(&item, &mut actions.proposals_failed);
            actions.apply.push((item, waiter));
        }
        for read in output.reads {
            if let Some(waiter) = self.reads.remove(&read.context) {
                actions.reads_ready.push(waiter);
            }
        }
        for (context, failure) in output.reads_failed {
            if let Some(waiter) = self.reads.remove(&context) {
                let refusal = match failure {
                    ReadFailure::LeadershipLost => Refusal::LeaderChanged,
                    ReadFailure::TimedOut => Refusal::TimedOut,
                };
                actions.reads_failed.push((waiter, refusal));
            }
        }
        // Proposals of a leader that stepped down stay until their index is applied, with
        // whatever term it gets: the entry may still commit under the next leader.
        Ok(actions)
    }

    /// Resolves the proposals an applied item decides: the entry's own (attached to it if the
    /// terms match) and, for a snapshot, every proposal it covers (their outcome is unknown to
    /// this member, so they are reported as failed by a leader change).
    fn match_proposals(&mut self, item: &Apply, failed: &mut Vec<(P, Refusal)>) -> Option<P> {
        let index = item.index();
        let mut own = None;
        while let Some(entry) = self.proposals.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (proposed_index, (term, waiter)) = entry.remove_entry();
            match item {
                Apply::Entry(applied) if proposed_index == index && applied.term == term => {
                    own = Some(waiter);
                }
                _ => failed.push((waiter, Refusal::LeaderChanged)),
            }
        }
        own
    }

    /// Fails every waiter (the node is stopping).
    pub fn drain_waiters(&mut self) -> (Vec<P>, Vec<R>) {
        let proposals = std::mem::take(&mut self.proposals)
            .into_values()
            .map(|(_, waiter)| waiter)
            .collect();
        let reads = std::mem::take(&mut self.reads).into_values().collect();
        (proposals, reads)
    }
}

fn refusal(err: Error) -> Refusal {
    match err {
        Error::NotLeader { leader_hint } => Refusal::NotLeader(leader_hint),
        Error::ReadQueueFull { limit } => {
            Refusal::Overloaded(format!("{limit} linearizable reads waiting"))
        }
        Error::UncommittedLimit { .. } => Refusal::Overloaded(err.to_string()),
        other => Refusal::Refused(other),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_raft::{Config, EntryPayload, MemStorage, Membership};

    use super::*;

    type TestDriver = Driver<MemStorage, u32, u32>;
    /// What a run produced: applied commands with their waiters, failed proposals, reads.
    type RunResult = (Vec<(Index, Option<u32>)>, Vec<(u32, Refusal)>, Vec<u32>);

    /// Carries out actions the way the shell does, with storage that syncs at once.
    fn run(driver: &mut TestDriver) -> RunResult {
        let mut applied = Vec::new();
        let mut failed = Vec::new();
        let mut reads = Vec::new();
        for _ in 0..16 {
            let actions = driver.take_actions().unwrap();
            if actions.is_empty() {
                break;
            }
            if let Some(batch) = &actions.persist {
                driver.node.storage_mut().persist(batch).unwrap();
                driver.persisted(batch.id).unwrap();
            }
            for (item, waiter) in actions.apply {
                let index = item.index();
                if let Apply::Entry(entry) = &item
                    && matches!(entry.payload, EntryPayload::Command(_))
                {
                    applied.push((index, waiter));
                }
                driver.applied(index).unwrap();
            }
            failed.extend(actions.proposals_failed);
            reads.extend(actions.reads_ready);
        }
        (applied, failed, reads)
    }

    fn single_node_leader() -> TestDriver {
        let storage = MemStorage::new_with_membership(Membership::with_voters([1]));
        let node = RaftNode::new(Config::new(1), storage, 0).unwrap();
        let mut driver = Driver::new(node, 16);
        driver.node.campaign().unwrap();
        run(&mut driver);
        assert!(driver.node().is_leader());
        driver
    }

    #[test]
    fn a_proposal_waiter_travels_with_its_entry() {
        let mut driver = single_node_leader();
        driver.propose(Bytes::from_static(b"a"), 7).unwrap();
        driver.propose(Bytes::from_static(b"b"), 8).unwrap();
        let (applied, failed, _) = run(&mut driver);
        let waiters: Vec<_> = applied.iter().map(|(_, w)| *w).collect();
        assert_eq!(waiters, vec![Some(7), Some(8)]);
        assert!(failed.is_empty());
        assert_eq!(driver.pending_proposals(), 0);
    }

    #[test]
    fn a_proposal_overwritten_in_another_term_fails() {
        let mut driver = single_node_leader();
        // A proposal made at the next index in an older term, whose entry was lost.
        let next = driver.node().last_id().index + 1;
        driver.proposals.insert(next, (0, 9));
        driver.propose(Bytes::from_static(b"x"), 10).unwrap();
        let (applied, failed, _) = run(&mut driver);
        assert_eq!(applied, vec![(next, Some(10))]);
        assert_eq!(failed, vec![(9, Refusal::LeaderChanged)]);
    }

    #[test]
    fn an_entry_applied_with_another_term_fails_its_proposal() {
        let mut driver = single_node_leader();
        let next = driver.node().last_id().index + 1;
        // Index `next` was proposed in term 0 but will be applied with the current term.
        driver.proposals.insert(next, (0, 9));
        driver.node.propose(Bytes::from_static(b"y")).unwrap();
        let (applied, failed, _) = run(&mut driver);
        assert_eq!(applied, vec![(next, None)]);
        assert_eq!(failed, vec![(9, Refusal::LeaderChanged)]);
    }

    #[test]
    fn a_snapshot_fails_the_proposals_it_covers() {
        let mut driver = single_node_leader();
        driver.proposals.insert(100, (1, 3));
        driver.proposals.insert(200, (1, 4));
        let meta = flotilla_raft::SnapshotMeta {
            last: EntryId::new(1, 150),
            membership: Membership::with_voters([1]),
        };
        let mut failed = Vec::new();
        let own = driver.match_proposals(&Apply::Snapshot(meta), &mut failed);
        assert_eq!(own, None);
        assert_eq!(failed, vec![(3, Refusal::LeaderChanged)]);
        assert!(driver.proposals.contains_key(&200));
    }

    #[test]
    fn proposals_beyond_the_limit_are_refused() {
        let mut driver = single_node_leader();
        driver.proposals_max = 1;
        driver.propose(Bytes::from_static(b"a"), 1).unwrap();
        let (waiter, refusal) = driver.propose(Bytes::from_static(b"b"), 2).unwrap_err();
        assert_eq!(waiter, 2);
        assert!(matches!(refusal, Refusal::Overloaded(_)));
    }

    #[test]
    fn a_follower_without_leader_refuses_proposals_and_reads() {
        let storage = MemStorage::new_with_membership(Membership::with_voters([1, 2, 3]));
        let node = RaftNode::new(Config::new(1), storage, 0).unwrap();
        let mut driver: TestDriver = Driver::new(node, 16);
        let (_, refusal) = driver.propose(Bytes::from_static(b"a"), 1).unwrap_err();
        assert_eq!(refusal, Refusal::NotLeader(None));
        let (_, refusal) = driver.read(2).unwrap_err();
        assert_eq!(refusal, Refusal::NotLeader(None));
    }

    #[test]
    fn a_read_is_released_once_confirmed_and_applied() {
        let mut driver = single_node_leader();
        driver.read(5).unwrap();
        let (_, _, reads) = run(&mut driver);
        assert_eq!(reads, vec![5]);
    }

    /// Three drivers on an instant network that can cut one node off.
    struct Network {
        drivers: Vec<TestDriver>,
        cut: Option<NodeId>,
        /// (node, index, waiter) of every applied command entry that carried a waiter.
        succeeded: Vec<(NodeId, Index, u32)>,
        failed: Vec<(NodeId, u32, Refusal)>,
    }

    impl Network {
        fn new() -> Network {
            let drivers = (1..=3)
                .map(|id| {
                    let storage =
                        MemStorage::new_with_membership(Membership::with_voters([1, 2, 3]));
                    Driver::new(RaftNode::new(Config::new(id), storage, 0).unwrap(), 16)
                })
                .collect();
            Network {
                drivers,
                cut: None,
                succeeded: Vec::new(),
                failed: Vec::new(),
            }
        }

        fn driver(&mut self, id: NodeId) -> &mut TestDriver {
            &mut self.drivers[id as usize - 1]
        }

        /// Carries out every driver's actions until the network is quiet.
        fn settle(&mut self) {
            for _ in 0..64 {
                let mut messages = Vec::new();
                let mut quiet = true;
                for id in 1..=3 {
                    let driver = self.driver(id);
                    let actions = driver.take_actions().unwrap();
                    quiet &= actions.is_empty();
                    if let Some(batch) = &actions.persist {
                        driver.node.storage_mut().persist(batch).unwrap();
                        driver.persisted(batch.id).unwrap();
                    }
                    for (item, waiter) in actions.apply {
                        let index = item.index();
                        if let Some(waiter) = waiter {
                            self.succeeded.push((id, index, waiter));
                        }
                        self.driver(id).applied(index).unwrap();
                    }
                    for (waiter, refusal) in actions.proposals_failed {
                        self.failed.push((id, waiter, refusal));
                    }
                    messages.extend(actions.messages);
                }
                if quiet {
                    return;
                }
                for msg in messages {
                    if self.cut == Some(msg.from) || self.cut == Some(msg.to) {
                        continue;
                    }
                    let to = msg.to;
                    self.driver(to).step(msg).unwrap();
                }
            }
            panic!("the network did not settle");
        }
    }

    /// The leader changes while a proposal is pending on the old one: the new leader's blank
    /// entry takes its index, and the old proposal fails ("leader changed") rather than being
    /// reported as done, while the new leader's proposal succeeds.
    #[test]
    fn a_proposal_lost_to_a_new_leader_fails_and_the_new_one_succeeds() {
        let mut net = Network::new();
        net.driver(1).node.campaign().unwrap();
        net.settle();
        assert!(net.driver(1).node().is_leader());
        net.driver(1).propose(Bytes::from_static(b"a"), 1).unwrap();
        net.settle();
        assert_eq!(net.succeeded.len(), 1, "committed on the leader");

        // Node 1 is cut off with a proposal it can never commit.
        net.cut = Some(1);
        let lost = net.driver(1).propose(Bytes::from_static(b"b"), 2).unwrap();
        net.settle();
        // Nodes 2 and 3 stop hearing from node 1: after an election timeout one of them wins.
        let mut new = None;
        for _ in 0..100 {
            for id in [2, 3] {
                net.driver(id).tick().unwrap();
            }
            net.settle();
            new = [2, 3]
                .into_iter()
                .find(|&id| net.driver(id).node().is_leader());
            if new.is_some() {
                break;
            }
        }
        let new = new.expect("a new leader among 2 and 3");
        let won = net
            .driver(new)
            .propose(Bytes::from_static(b"c"), 3)
            .unwrap();
        net.settle();
        // The new leader's blank entry took the lost proposal's index.
        assert_eq!(won.index, lost.index + 1);
        assert!(net.succeeded.contains(&(new, won.index, 3)));

        // Healed: node 1 learns the new term, its entry is replaced, its proposal fails.
        net.cut = None;
        for _ in 0..30 {
            net.driver(new).tick().unwrap();
            net.settle();
        }
        assert!(!net.driver(1).node().is_leader());
        assert!(net.driver(1).node().applied() >= won.index);
        assert_eq!(net.failed, vec![(1, 2, Refusal::LeaderChanged)]);
        assert!(!net.succeeded.iter().any(|&(_, _, waiter)| waiter == 2));
        assert_eq!(net.driver(1).pending_proposals(), 0);
    }
}
