//! The Raft state machine of one node: inputs in, one [`Output`] batch out.
//!
//! The structure follows etcd's raft: [`RaftNode::step`] first handles terms the same way for
//! every role (§5.1), then hands the message to the step function of the current role. Each
//! concern lives in its own file: elections (`election.rs`), log replication
//! (`replication.rs`), snapshots (`snapshot.rs`), linearizable reads (`reads.rs`) and
//! membership change and leadership transfer (`reconfig.rs`).

mod election;
mod reads;
mod reconfig;
mod replication;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::config::Config;
use crate::error::Error;
use crate::log::RaftLog;
use crate::membership::Membership;
use crate::message::{HeartbeatResponse, Message, MessageBody, VoteResponse};
use crate::output::{
    Apply, Output, PersistBatch, PersistId, PersistRecord, ReadFailure, ReadState, Role, RoleState,
    SnapshotChunk, SnapshotInstall,
};
use crate::prng::Prng;
use crate::progress::Progress;
use crate::storage::{LogStorage, SnapshotMeta, StorageError};
use crate::types::{Entry, EntryId, EntryPayload, HardState, Index, NODE_NONE, NodeId, Term};

pub use reads::LeaseRead;
pub(crate) use reads::{PendingRead, ReadOrigin};

/// State only a leader has.
#[derive(Debug)]
pub(crate) struct LeaderState {
    /// One entry per member, including the leader itself (whose match is its durable index).
    progress: BTreeMap<NodeId, Progress>,
    /// Followers to send appends to when the output is drained; batching proposals made in
    /// the same round into one message per follower.
    send_pending: BTreeSet<NodeId>,
    /// Broadcast a heartbeat when the output is drained (a new read round).
    heartbeat_pending: bool,
    /// The leadership transfer in progress, if any (thesis §3.10).
    transfer: Option<Transfer>,
    /// Bytes of entries appended and not yet handed out for apply.
    uncommitted_bytes: u64,
    /// The index of the blank entry this leader appended on election. Reads wait until it is
    /// committed: before that the leader may not know the latest commit index (thesis §6.4).
    term_start_index: Index,
    /// Reads waiting for leadership confirmation, in request order.
    reads: VecDeque<PendingRead>,
    /// The last read round broadcast in heartbeats.
    read_round: u64,
    /// With lease reads: the rounds broadcast and not yet confirmed by a quorum, each with the
    /// tick it was sent at, oldest first. At most `LEASE_ROUNDS_MAX`; the oldest are dropped.
    lease_rounds: VecDeque<(u64, u64)>,
    /// With lease reads: the tick at which the latest round a quorum acknowledged was sent.
    /// Every voter of that quorum ignores elections until at least one election timeout after
    /// it received that round, so no other leader can exist before then. Never decreases.
    lease_sent_tick: Option<u64>,
    /// A TimeoutNow was sent in this term: the target's election ignores leases, so this
    /// leader serves no lease read again in its term (even if the transfer is abandoned, the
    /// message may still arrive).
    lease_revoked: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Transfer {
    target: NodeId,
    timeout_now_sent: bool,
}

#[derive(Debug)]
pub(crate) enum RoleData {
    Follower,
    /// Votes received so far; `true` granted. The pre-candidate's own vote is included.
    PreCandidate {
        votes: BTreeMap<NodeId, bool>,
    },
    /// The candidate's own vote is counted only once its vote is durable.
    Candidate {
        votes: BTreeMap<NodeId, bool>,
    },
    Leader(Box<LeaderState>),
}

impl RoleData {
    fn role(&self) -> Role {
        match self {
            Self::Follower => Role::Follower,
            Self::PreCandidate { .. } => Role::PreCandidate,
            Self::Candidate { .. } => Role::Candidate,
            Self::Leader(_) => Role::Leader,
        }
    }
}

/// A snapshot being received from the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IncomingSnapshot {
    meta: SnapshotMeta,
    data_bytes: u64,
    /// Bytes before this offset are in persist batches already.
    next_offset: u64,
}

/// One Raft node. See the crate documentation for how to drive it and [`Output`] for the
/// contract of its output.
pub struct RaftNode<S: LogStorage> {
    config: Config,
    /// The latest term seen. Invariant: never decreases.
    term: Term,
    /// The candidate voted for in `term`, or `NODE_NONE`. Invariant: set at most once per term.
    vote: NodeId,
    /// The leader of `term`, if known.
    leader: NodeId,
    role: RoleData,
    log: RaftLog<S>,
    prng: Prng,
    /// Ticks since the last election timeout reset (heard from the leader, granted a vote,
    /// started an election; for a leader, since the last check-quorum round).
    election_elapsed_ticks: u64,
    /// For a leader: ticks since the last heartbeat.
    heartbeat_elapsed_ticks: u64,
    /// Drawn from [T, 2T) at every reset (§5.2).
    election_timeout_randomized_ticks: u64,

    /// The hard state as of the last persist batch handed out.
    hard_state_written: HardState,
    persist_next_id: PersistId,
    /// Batches handed out and not yet acknowledged, in id order.
    persist_inflight: VecDeque<PersistRecord>,
    /// Snapshot work for the next batch.
    pending_chunks: Vec<SnapshotChunk>,
    pending_install: Option<SnapshotInstall>,
    pending_compact: Option<Index>,
    /// Messages held until the batch with the given id is durable. Ascending ids.
    gated: VecDeque<(PersistId, Message)>,
    /// Released messages addressed to this node (the candidate's own vote), stepped at the end
    /// of the current input so that handlers never re-enter each other.
    self_messages: Vec<Message>,

    /// Output under construction.
    messages: Vec<Message>,
    apply_pending: Vec<Apply>,
    /// An installed snapshot to hand to the state machine once the batch with this id (which
    /// carries the install) is durable.
    snapshot_to_apply: Option<(PersistId, SnapshotMeta)>,
    /// Confirmed reads waiting for the state machine to reach their index.
    reads_waiting_apply: VecDeque<ReadState>,
    reads_failed: Vec<(u64, ReadFailure)>,
    /// Reads forwarded to the leader whose answer is awaited, by context.
    reads_forwarded: BTreeSet<u64>,
    /// The same reads in the order they were forwarded, with the tick they expire at: a
    /// request or answer lost in the network must not hold a read (and a slot of the bounded
    /// queue) forever. Entries already answered are skipped when they come up.
    reads_forwarded_expiry: VecDeque<(u64, u64)>,
    /// Ticks since the node started (logical time, for expiring forwarded reads).
    ticks: u64,
    role_state_reported: Option<RoleState>,
    /// Applied log since the snapshot policy last fired or a snapshot was saved.
    applied_since_snapshot_entries: u64,
    applied_since_snapshot_bytes: u64,
    snapshot_due: Option<Index>,

    incoming_snapshot: Option<IncomingSnapshot>,
    /// True once this node has seen itself in a configuration.
    ever_member: bool,
    removed: bool,
    removed_reported: bool,
    /// Set by a fatal storage error; the node refuses all further work.
    fatal: Option<StorageError>,
}

impl<S: LogStorage> std::fmt::Debug for RaftNode<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.config.id)
            .field("term", &self.term)
            .field("vote", &self.vote)
            .field("leader", &self.leader)
            .field("role", &self.role.role())
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// Why an election is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CampaignKind {
    PreElection,
    Election,
    /// An election asked for by the leader (TimeoutNow): no pre-vote, and voters ignore their
    /// leader lease.
    Transfer,
}

impl<S: LogStorage> RaftNode<S> {
    /// Creates a node over `storage`, resuming from whatever it holds. `applied` is the index
    /// the caller's state machine has durably applied (0 if it is rebuilt from the snapshot and
    /// the log at every start). If it is below the snapshot's index, the first output hands out
    /// the snapshot for the state machine to load.
    pub fn new(config: Config, storage: S, applied: Index) -> Result<Self, Error> {
        config.validate().map_err(|err| Error::Config(err.0))?;
        let init = storage.initial_state()?;
        let snapshot_meta = init.snapshot.as_ref().map(|info| info.meta.clone());
        let log = RaftLog::new(storage, &init, applied)?;
        let mut node = Self {
            prng: Prng::new(config.seed),
            term: init.hard_state.term,
            vote: init.hard_state.vote,
            leader: NODE_NONE,
            role: RoleData::Follower,
            log,
            election_elapsed_ticks: 0,
            heartbeat_elapsed_ticks: 0,
            election_timeout_randomized_ticks: config.election_timeout_ticks,
            hard_state_written: init.hard_state,
            persist_next_id: 1,
            persist_inflight: VecDeque::new(),
            pending_chunks: Vec::new(),
            pending_install: None,
            pending_compact: None,
            gated: VecDeque::new(),
            self_messages: Vec::new(),
            messages: Vec::new(),
            apply_pending: Vec::new(),
            snapshot_to_apply: None,
            reads_waiting_apply: VecDeque::new(),
            reads_failed: Vec::new(),
            reads_forwarded: BTreeSet::new(),
            reads_forwarded_expiry: VecDeque::new(),
            ticks: 0,
            role_state_reported: None,
            applied_since_snapshot_entries: 0,
            applied_since_snapshot_bytes: 0,
            snapshot_due: None,
            incoming_snapshot: None,
            ever_member: false,
            removed: false,
            removed_reported: false,
            fatal: None,
            config,
        };
        if let Some(meta) = snapshot_meta
            && applied < meta.last.index
        {
            node.log.snapshot_handed_out(meta.last.index);
            node.apply_pending.push(Apply::Snapshot(meta));
        }
        node.reset_election_timeout();
        node.note_membership();
        Ok(node)
    }

    // ----- Accessors -------------------------------------------------------------------------

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Ticks since this node was created: its logical clock.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// The current term (§5.1).
    pub fn term(&self) -> Term {
        self.term
    }

    /// Ticks since the election timer was last reset (for a leader, since its last
    /// check-quorum round): what a view of the cluster draws as the timer's progress.
    pub fn election_elapsed_ticks(&self) -> u64 {
        self.election_elapsed_ticks
    }

    /// The election timeout drawn at the last reset, in [T, 2T) (§5.2).
    pub fn election_timeout_ticks(&self) -> u64 {
        self.election_timeout_randomized_ticks
    }

    /// Whom this node voted for in the current term, or `NODE_NONE`.
    pub fn vote(&self) -> NodeId {
        self.vote
    }

    /// Follower, pre-candidate, candidate or leader.
    pub fn role(&self) -> Role {
        self.role.role()
    }

    /// True if this node is the leader of its term.
    pub fn is_leader(&self) -> bool {
        matches!(self.role, RoleData::Leader(_))
    }

    /// The leader of the current term as far as this node knows.
    pub fn leader(&self) -> Option<NodeId> {
        (self.leader != NODE_NONE).then_some(self.leader)
    }

    /// The highest index known to be committed (§5.3).
    pub fn committed(&self) -> Index {
        self.log.committed()
    }

    /// The highest index the caller reported applied.
    pub fn applied(&self) -> Index {
        self.log.applied()
    }

    /// The durable prefix of the log matches memory up to here.
    pub fn persisted(&self) -> Index {
        self.log.persisted()
    }

    /// The last entry of the log (memory and storage).
    pub fn last_id(&self) -> EntryId {
        self.log.last_id()
    }

    /// The first index the log holds (after the compaction point).
    pub fn first_index(&self) -> Index {
        self.log.first_index()
    }

    /// The newest snapshot this node holds (saved or being installed).
    pub fn snapshot_id(&self) -> EntryId {
        self.log.snapshot_id()
    }

    /// The configuration in force: the newest one in the log.
    pub fn membership(&self) -> &Membership {
        self.log.membership()
    }

    /// The term of the entry at `index`, or `None` if it is compacted or past the end.
    pub fn term_at(&self, index: Index) -> Result<Option<Term>, Error> {
        match self.log.term(index) {
            Ok(term) => Ok(Some(term)),
            Err(StorageError::Compacted { .. } | StorageError::Unavailable { .. }) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// The entries in `[low, high)` this node holds (memory and storage), within `bytes_max`.
    pub fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, Error> {
        Ok(self.log.entries(low, high, bytes_max)?)
    }

    /// The storage the node reads.
    pub fn storage(&self) -> &S {
        &self.log.storage
    }

    /// Mutable access to storage, for the caller to carry out persist batches and save
    /// snapshots. The caller must not change what the core has read except as batches say.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.log.storage
    }

    /// Stops the node and hands back its storage (what a crash or shutdown leaves behind).
    pub fn into_storage(self) -> S {
        self.log.storage
    }

    /// The leader's view of a follower's replication: (match index, next index), if this node
    /// is the leader and `id` a member.
    pub fn progress_of(&self, id: NodeId) -> Option<(Index, Index)> {
        match &self.role {
            RoleData::Leader(leader) => leader
                .progress
                .get(&id)
                .map(|pr| (pr.match_index, pr.next_index)),
            _ => None,
        }
    }

    // ----- Inputs ----------------------------------------------------------------------------

    /// Advances logical time by one tick.
    pub fn tick(&mut self) -> Result<(), Error> {
        self.check_fatal()?;
        self.ticks += 1;
        self.expire_forwarded_reads();
        let result = if self.is_leader() {
            self.tick_leader()
        } else {
            self.tick_election()
        };
        let result = result.and_then(|()| self.step_self_messages());
        self.record_fatal(result)
    }

    /// Handles a message from another node (or one this node addressed to itself).
    pub fn step(&mut self, msg: Message) -> Result<(), Error> {
        self.check_fatal()?;
        if msg.to != self.config.id {
            return Err(Error::Misdelivered {
                to: msg.to,
                this: self.config.id,
            });
        }
        let result = self
            .step_inner(msg)
            .and_then(|()| self.step_self_messages());
        self.record_fatal(result)
    }

    /// Starts an election now, as if the election timeout had passed.
    pub fn campaign(&mut self) -> Result<(), Error> {
        self.check_fatal()?;
        if self.is_leader() {
            return Ok(());
        }
        let kind = if self.config.pre_vote {
            CampaignKind::PreElection
        } else {
            CampaignKind::Election
        };
        self.campaign_with(kind);
        let result = self.step_self_messages();
        self.record_fatal(result)
    }

    /// Proposes a command. On the leader, returns the id the entry will have if it commits;
    /// the caller learns the outcome when that index is applied (with that term, it committed;
    /// with another term, it was overwritten and failed).
    pub fn propose(&mut self, data: Bytes) -> Result<EntryId, Error> {
        self.check_fatal()?;
        self.propose_entry(EntryPayload::Command(data))
    }

    /// The caller made persist batch `id` (and every earlier one) durable.
    pub fn on_persisted(&mut self, id: PersistId) -> Result<(), Error> {
        self.check_fatal()?;
        let result = self
            .handle_persisted(id)
            .and_then(|()| self.step_self_messages());
        self.record_fatal(result)
    }

    /// The caller's state machine has applied everything up to `index`.
    pub fn on_applied(&mut self, index: Index) -> Result<(), Error> {
        self.check_fatal()?;
        self.log.applied_to(index);
        Ok(())
    }

    /// Drains everything the caller must do now. See [`Output`] for the contract.
    pub fn take_output(&mut self) -> Result<Output, Error> {
        self.check_fatal()?;
        let result = self.build_output();
        self.record_fatal(result)
    }

    // ----- Fatal errors ----------------------------------------------------------------------

    fn check_fatal(&self) -> Result<(), Error> {
        match &self.fatal {
            Some(err) => Err(Error::Storage(err.clone())),
            None => Ok(()),
        }
    }

    fn record_fatal<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(Error::Storage(err)) = &result {
            self.fatal = Some(err.clone());
        }
        result
    }

    // ----- Shared term handling (§5.1) -------------------------------------------------------

    fn step_inner(&mut self, msg: Message) -> Result<(), Error> {
        if msg.term > self.term {
            if !self.step_higher_term(&msg) {
                return Ok(());
            }
        } else if msg.term < self.term {
            self.step_lower_term(&msg);
            return Ok(());
        }
        if let MessageBody::Vote(request) = &msg.body {
            self.handle_vote_request(&msg, *request);
            return Ok(());
        }
        match self.role {
            RoleData::Leader(_) => self.step_leader(msg),
            RoleData::Candidate { .. } | RoleData::PreCandidate { .. } => self.step_candidate(msg),
            RoleData::Follower => self.step_follower(msg),
        }
    }

    /// A message from a higher term. Returns false if the message is to be dropped.
    fn step_higher_term(&mut self, msg: &Message) -> bool {
        match &msg.body {
            MessageBody::Vote(request) => {
                // Check-quorum's leader lease (thesis §4.2.3): while this node has heard from a
                // leader within the minimum election timeout, it ignores elections, so a
                // partitioned node that rejoins cannot depose a working leader. A transfer is
                // exempt: the leader itself asked for it.
                // With lease reads, a node that started less than an election timeout ago
                // counts as in lease too: it may have acknowledged a leader before a restart.
                let timeout = self.config.election_timeout_ticks;
                let heard_or_just_started =
                    self.leader != NODE_NONE || (self.config.lease_reads && self.ticks < timeout);
                let in_lease = self.config.check_quorum
                    && heard_or_just_started
                    && self.election_elapsed_ticks < timeout;
                if in_lease && !request.leadership_transfer {
                    return false;
                }
                // A pre-vote never changes anyone's term.
                if !request.pre_vote {
                    self.become_follower(msg.term, NODE_NONE);
                }
                true
            }
            // A granted pre-vote carries the term the pre-candidate asked about; it is not news
            // of a higher term.
            MessageBody::VoteResponse(VoteResponse {
                pre_vote: true,
                granted: true,
            }) => true,
            MessageBody::Append(_) | MessageBody::Heartbeat(_) | MessageBody::Snapshot(_) => {
                self.become_follower(msg.term, msg.from);
                true
            }
            _ => {
                self.become_follower(msg.term, NODE_NONE);
                true
            }
        }
    }

    /// A message from a lower term: stale, dropped. Two kinds get an answer, so that a node
    /// with a stale term learns the current one.
    fn step_lower_term(&mut self, msg: &Message) {
        match &msg.body {
            // A leader of an old term: with check-quorum or pre-vote this node may have raised
            // its term without being able to win (it ignores votes while in lease, and never
            // raises its term on a failed pre-vote), so the stale leader would never hear of a
            // higher term. Answering tells it, and it steps down.
            MessageBody::Append(_) | MessageBody::Heartbeat(_)
                if self.config.check_quorum || self.config.pre_vote =>
            {
                let body = MessageBody::HeartbeatResponse(HeartbeatResponse { read_round: 0 });
                self.send(msg.from, body);
            }
            // Reject a stale pre-vote with our term, so the pre-candidate catches up.
            MessageBody::Vote(request) if request.pre_vote => {
                let body = MessageBody::VoteResponse(VoteResponse {
                    pre_vote: true,
                    granted: false,
                });
                self.send(msg.from, body);
            }
            _ => {}
        }
    }

    // ----- Role transitions ------------------------------------------------------------------

    /// Moves to `term` (if higher), forgetting the vote of the old term.
    fn reset(&mut self, term: Term) {
        assert!(
            term >= self.term,
            "term went back from {} to {term}",
            self.term
        );
        if term > self.term {
            self.term = term;
            self.vote = NODE_NONE;
        }
        self.leader = NODE_NONE;
        self.election_elapsed_ticks = 0;
        self.heartbeat_elapsed_ticks = 0;
        self.reset_election_timeout();
    }

    fn reset_election_timeout(&mut self) {
        let timeout = self.config.election_timeout_ticks;
        self.election_timeout_randomized_ticks = self.prng.range(timeout, 2 * timeout);
    }

    pub(crate) fn become_follower(&mut self, term: Term, leader: NodeId) {
        self.abandon_leadership();
        let old_leader = self.leader;
        self.role = RoleData::Follower;
        self.reset(term);
        self.leader = leader;
        if old_leader != leader {
            self.fail_forwarded_reads();
        }
    }

    /// Cleans up leader-only state when leaving the leader role.
    fn abandon_leadership(&mut self) {
        let RoleData::Leader(leader) = &mut self.role else {
            return;
        };
        let reads: Vec<PendingRead> = leader.reads.drain(..).collect();
        for read in reads {
            self.fail_read(read);
        }
    }

    // ----- Output ----------------------------------------------------------------------------

    /// Queues a message to send now.
    pub(crate) fn send(&mut self, to: NodeId, body: MessageBody) {
        if matches!(
            body,
            MessageBody::Append(_) | MessageBody::Heartbeat(_) | MessageBody::Snapshot(_)
        ) {
            assert!(
                self.is_leader(),
                "only a leader sends appends, heartbeats and snapshots"
            );
        }
        let msg = Message {
            from: self.config.id,
            to,
            term: self.term,
            body,
        };
        self.messages.push(msg);
    }

    /// Queues a message that reports state not yet durable: it is held until every write
    /// issued so far is durable.
    pub(crate) fn send_after_persist(&mut self, to: NodeId, body: MessageBody) {
        let msg = Message {
            from: self.config.id,
            to,
            term: self.term,
            body,
        };
        let gate = if self.has_unwritten_state() {
            self.persist_next_id
        } else if let Some(record) = self.persist_inflight.back() {
            record.id
        } else {
            // Everything is durable already.
            return self.deliver_released(msg);
        };
        debug_assert!(self.gated.back().is_none_or(|&(id, _)| id <= gate));
        self.gated.push_back((gate, msg));
    }

    /// True if state has changed that the next persist batch must carry.
    fn has_unwritten_state(&self) -> bool {
        let hs = self.hard_state();
        self.log.write_from() <= self.log.last_index()
            || hs.term != self.hard_state_written.term
            || hs.vote != self.hard_state_written.vote
            || !self.pending_chunks.is_empty()
            || self.pending_install.is_some()
            || self.pending_compact.is_some()
    }

    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed(),
        }
    }

    /// A released message: to self, it is stepped (the candidate's own vote); otherwise sent.
    fn deliver_released(&mut self, msg: Message) {
        if msg.to == self.config.id {
            self.self_messages.push(msg);
        } else {
            self.messages.push(msg);
        }
    }

    fn build_output(&mut self) -> Result<Output, Error> {
        self.step_self_messages()?;
        if self.is_leader() {
            self.flush_leader()?;
        }
        let persist = self.build_persist_batch();
        let apply = self.collect_apply()?;
        let role_state = self.report_role_state();
        let removed = self.removed && !self.removed_reported;
        self.removed_reported |= removed;
        let output = Output {
            persist,
            messages: std::mem::take(&mut self.messages),
            apply,
            reads: self.take_ready_reads(),
            reads_failed: std::mem::take(&mut self.reads_failed),
            role_state,
            snapshot_due: self.snapshot_due.take(),
            removed,
        };
        self.check_invariants();
        Ok(output)
    }

    fn build_persist_batch(&mut self) -> Option<PersistBatch> {
        if !self.has_unwritten_state() {
            // Nothing to write. A message gated on the batch that would have been next is
            // safe once the batches in flight are durable.
            self.regate_unbatched();
            return None;
        }
        let id = self.persist_next_id;
        self.persist_next_id += 1;
        let entries = self.log.take_unwritten();
        let hard_state = self.hard_state();
        let snapshot_install = self.pending_install.take();
        let last_written = entries
            .last()
            .map(Entry::id)
            .or_else(|| snapshot_install.as_ref().map(|install| install.meta.last));
        let batch = PersistBatch {
            id,
            snapshot_chunks: std::mem::take(&mut self.pending_chunks),
            snapshot_install,
            compact_to: self.pending_compact.take(),
            entries,
            hard_state: (hard_state != self.hard_state_written).then_some(hard_state),
        };
        self.hard_state_written = hard_state;
        self.persist_inflight.push_back(PersistRecord {
            id,
            last_written,
            installs_snapshot: batch.snapshot_install.is_some(),
        });
        Some(batch)
    }
}

impl<S: LogStorage> RaftNode<S> {
    /// Steps released messages addressed to this node. Bounded: stepping a self-vote produces
    /// no further self-messages.
    fn step_self_messages(&mut self) -> Result<(), Error> {
        for _ in 0..4 {
            if self.self_messages.is_empty() {
                return Ok(());
            }
            for msg in std::mem::take(&mut self.self_messages) {
                self.step_inner(msg)?;
            }
        }
        assert!(
            self.self_messages.is_empty(),
            "self-messages keep producing self-messages"
        );
        Ok(())
    }

    /// No batch was built: messages gated on it wait for the last batch in flight instead, or
    /// go now if nothing is in flight.
    fn regate_unbatched(&mut self) {
        let unbatched = self.persist_next_id;
        let Some(&(last_gate, _)) = self.gated.back() else {
            return;
        };
        if last_gate < unbatched {
            return;
        }
        match self.persist_inflight.back().map(|record| record.id) {
            Some(last_inflight) => {
                for (gate, _) in self.gated.iter_mut() {
                    if *gate == unbatched {
                        *gate = last_inflight;
                    }
                }
            }
            None => {
                while let Some((_, msg)) = self.gated.pop_front() {
                    self.deliver_released(msg);
                }
            }
        }
    }

    fn handle_persisted(&mut self, id: PersistId) -> Result<(), Error> {
        let front = self.persist_inflight.front().map(|record| record.id);
        let back = self.persist_inflight.back().map(|record| record.id);
        let (Some(front), Some(back)) = (front, back) else {
            panic!("on_persisted({id}) with no batch in flight");
        };
        assert!(
            id >= front && id <= back,
            "on_persisted({id}) but batches {front}..={back} are in flight"
        );
        while self
            .persist_inflight
            .front()
            .is_some_and(|record| record.id <= id)
        {
            let record = self.persist_inflight.pop_front().expect("checked");
            if let Some(last) = record.last_written {
                self.log.persisted_to(last)?;
            }
        }
        while self.gated.front().is_some_and(|&(gate, _)| gate <= id) {
            let (_, msg) = self.gated.pop_front().expect("checked");
            self.deliver_released(msg);
        }
        if let Some((gate, _)) = &self.snapshot_to_apply
            && *gate <= id
        {
            let (_, meta) = self.snapshot_to_apply.take().expect("checked");
            self.log.snapshot_handed_out(meta.last.index);
            self.apply_pending.push(Apply::Snapshot(meta));
        }
        if self.is_leader() {
            self.leader_persisted()?;
        }
        Ok(())
    }

    /// Hands out committed, durable entries for apply, unless an installed snapshot must be
    /// loaded first.
    fn collect_apply(&mut self) -> Result<Vec<Apply>, Error> {
        let mut apply = std::mem::take(&mut self.apply_pending);
        if self.snapshot_to_apply.is_some() {
            return Ok(apply);
        }
        let entries = self.log.next_to_apply(self.config.apply_bytes_max)?;
        if entries.is_empty() {
            return Ok(apply);
        }
        let bytes = crate::types::entries_size_bytes(&entries);
        if let RoleData::Leader(leader) = &mut self.role {
            leader.uncommitted_bytes = leader.uncommitted_bytes.saturating_sub(bytes);
        }
        self.applied_since_snapshot_entries += entries.len() as u64;
        self.applied_since_snapshot_bytes += bytes;
        let policy = self.config.snapshot_policy;
        if self.applied_since_snapshot_entries >= policy.entries_max
            || self.applied_since_snapshot_bytes >= policy.bytes_max
        {
            self.snapshot_due = Some(self.log.applying());
            self.applied_since_snapshot_entries = 0;
            self.applied_since_snapshot_bytes = 0;
        }
        apply.extend(entries.into_iter().map(Apply::Entry));
        Ok(apply)
    }

    fn report_role_state(&mut self) -> Option<RoleState> {
        let now = RoleState {
            role: self.role(),
            term: self.term,
            leader: self.leader,
        };
        if self.role_state_reported == Some(now) {
            return None;
        }
        self.role_state_reported = Some(now);
        Some(now)
    }

    /// Notes whether this node is in the configuration now in force.
    fn note_membership(&mut self) {
        if self.log.membership().contains(self.config.id) {
            self.ever_member = true;
        }
    }

    /// Reacts to a higher commit index: configurations that became committed, and reads that
    /// waited for the leader's first commit.
    pub(crate) fn on_commit_advanced(&mut self) -> Result<(), Error> {
        let committed = self.log.committed();
        let membership_committed = self.log.membership_index() <= committed;
        if membership_committed && self.ever_member && !self.log.membership().contains(self.id()) {
            self.removed = true;
        }
        if self.is_leader() {
            self.leader_commit_advanced()?;
        }
        Ok(())
    }

    /// Cheap invariants, checked after every output in every build.
    fn check_invariants(&self) {
        self.log.check_invariants();
        assert!(self.log.committed() <= self.log.last_index());
        assert!(
            self.hard_state_written.term <= self.term,
            "term went backwards"
        );
        if let RoleData::Leader(leader) = &self.role {
            assert_eq!(
                self.leader, self.config.id,
                "a leader knows itself as leader"
            );
            assert_eq!(self.vote, self.config.id, "a leader voted for itself");
            let own = &leader.progress[&self.config.id];
            assert!(own.match_index <= self.log.persisted());
        }
        if let RoleData::Candidate { .. } = &self.role {
            assert_eq!(self.vote, self.config.id, "a candidate voted for itself");
        }
    }
}
