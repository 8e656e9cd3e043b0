//! One simulated run: members as the server runs them (the real driver over the real core, an
//! application's real state machine, the WAL on a simulated disk) on a simulated network,
//! client requests sent as the application's clients send them, a nemesis injecting faults,
//! and the checkers after every step.
//!
//! The Raft side (ticks, the network, the disk, crashes and recovery, the nemesis, the safety
//! and liveness checks) is here and is the same for every application; what a member applies
//! and what its clients ask is the [`Application`]'s: the etcd key-value store the server runs
//! ([`EtcdApp`]), or the runtime's hash-map example behind its client sessions
//! ([`HashMapApp`]).
//!
//! Time is discrete and single-threaded. Every random choice comes from one PRNG seeded by
//! the run's seed, and every collection that is iterated is ordered, so a seed replays bit for
//! bit. A run has two phases: faults (crashes, partitions, loss, duplication, reordering,
//! leadership transfers and, optionally, membership churn) and then liveness (everything
//! healed; the cluster must converge and resolve every pending proposal within a bound).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use bytes::Bytes;
use flotilla_raft::{
    Apply, ConfChange, ConfChangeStep, Config, EntryId, Error, Index, Membership, Message,
    MessageBody, NodeId, PersistBatch, PersistId, Prng, RaftNode, Role, SnapshotPolicy,
};
use flotilla_runtime::driver::{Actions, Driver, Refusal};

use crate::checker::{Checker, NodeView, Violation, believed_durable};
use crate::digest::{AppliedRecord, payload_digest, text_digest};
use crate::options::{SimOptions, TICK_TIME};
use crate::storage::SimStorage;
use crate::trace::TraceDigest;
use crate::workload;

mod application;
mod clients;
mod episodes;
mod etcd;
mod hash_map;
mod leases;
mod watchers;

pub use application::{Application, Waiter};
use episodes::Figure8;
pub use etcd::EtcdApp;
pub use hash_map::HashMapApp;
pub(crate) use watchers::is_watched;

/// The driver as the simulator runs it: the same code as the server's, with client ids for
/// waiters where the server has reply channels.
type SimDriver<S> = Driver<S, Waiter, Waiter>;

/// The simulated members' election timeout (the server's default is ten heartbeats too).
const ELECTION_TIMEOUT_TICKS: u64 = 10;

/// The most proposals a member keeps waiting (the server's default order of magnitude is far
/// above what the simulated clients send).
const PROPOSALS_MAX: usize = 256;

/// A client gives up on a request during the fault phase (its outcome stays unknown) once it
/// has tried this many times and this many client timeouts have passed since it began.
const ATTEMPTS_MIN: u32 = 2;
const DEADLINE_TIMEOUTS: u64 = 3;

/// The snapshot is encoded in steps of about this many bytes, as the server's encoder does in
/// larger ones, so that the stepwise path runs.
pub(crate) const SNAPSHOT_STEP_BYTES: usize = 512;

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub seed: u64,
    pub nodes: usize,
    pub digest: u64,
    pub events: u64,
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub writes_unknown: u64,
    pub reads_ok: u64,
    /// Of those, reads a leader answered from its lease.
    pub lease_reads_ok: u64,
    /// Events in the register history checked for linearizability.
    pub history_operations: u64,
    /// Watch events delivered by the members' watchers, each checked.
    pub watch_events_checked: u64,
    /// Watchers cancelled by a compaction and started again.
    pub watchers_restarted: u64,
    /// Keep-alives acknowledged to clients with a TTL.
    pub keep_alives_acked: u64,
    /// Leases revoked by expiry, each checked against what clients were promised.
    pub lease_expiries_checked: u64,
    /// Hash map: commands applied again that their session answered from memory.
    pub session_repeats: u64,
    /// Hash map: clients told their session had expired to make room for another.
    pub sessions_expired: u64,
    pub elections: u64,
    pub snapshots_installed: u64,
    pub membership_changes: u64,
    pub end_time: u64,
}

/// The first violated property of a run, with the report up to it.
#[derive(Debug)]
pub struct RunFailure {
    pub violation: Violation,
    pub report: RunReport,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Tick {
        node: NodeId,
        incarnation: u64,
    },
    Deliver(Box<MessageKey>),
    FsyncDone {
        node: NodeId,
        incarnation: u64,
        batch: PersistId,
    },
    ClientWake {
        client: usize,
    },
    ClientTimeout {
        client: usize,
        attempt: u64,
    },
    Nemesis,
    Restart {
        node: NodeId,
    },
    HealPartition {
        generation: u64,
    },
    StopRemoved {
        node: NodeId,
    },
    /// The next timed step of a Figure 8 episode (see [`episodes`]).
    Figure8Step {
        generation: u64,
    },
    /// The link from one node to another, cut on its own, works again.
    Reconnect {
        from: NodeId,
        to: NodeId,
    },
    /// The node's election timer fires now.
    Campaign {
        node: NodeId,
        incarnation: u64,
    },
}

/// A message in flight, ordered for the event queue by a sequence number only.
#[derive(Clone, Debug)]
struct MessageKey {
    seq: u64,
    msg: Message,
}

impl PartialEq for MessageKey {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}
impl Eq for MessageKey {}
impl PartialOrd for MessageKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for MessageKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.seq.cmp(&other.seq)
    }
}

/// One member as the server runs it: the driver over the core, and the application's side
/// (its state machine and what feeds on it).
struct Member<S: SimStorage, A: Application<S>> {
    driver: SimDriver<S>,
    app: A::Member,
}

enum NodeState<S: SimStorage, A: Application<S>> {
    Running(Box<Member<S, A>>),
    /// Crashed: only stable storage survives.
    Crashed {
        disk: Box<S::Disk>,
        believed: Believed,
    },
    /// Removed from the cluster and stopped for good.
    Stopped,
}

/// What a node had been told was durable when it crashed: recovery must bring it all back.
#[derive(Clone, Debug, Default)]
struct Believed {
    /// Entries up to here were compacted into a snapshot.
    compacted_through: Index,
    /// Entries after the compaction point, up to the persisted index.
    entries: BTreeMap<Index, u64>,
}

impl Believed {
    fn of<S: SimStorage>(node: &RaftNode<S>) -> Self {
        Self::try_of(node).expect("a healthy node's log is readable")
    }

    /// None if the storage has failed and cannot be read.
    fn try_of<S: SimStorage>(node: &RaftNode<S>) -> Option<Self> {
        let compacted_through = node.first_index() - 1;
        let mut entries = BTreeMap::new();
        let persisted = node.persisted();
        if persisted > compacted_through {
            for entry in node
                .entries(compacted_through + 1, persisted + 1, u64::MAX)
                .ok()?
            {
                entries.insert(entry.index, entry.term);
            }
        }
        Some(Self {
            compacted_through,
            entries,
        })
    }

    fn restricted_to(&self, persisted: Index) -> Self {
        let entries = self
            .entries
            .range(..=persisted)
            .map(|(&i, &t)| (i, t))
            .collect();
        Self {
            compacted_through: self.compacted_through.min(persisted),
            entries,
        }
    }

    fn holds(&self, entry: EntryId) -> bool {
        entry.index <= self.compacted_through || self.entries.get(&entry.index) == Some(&entry.term)
    }

    /// Recovery lost nothing acknowledged: every believed entry is back, or compacted.
    fn check_recovered<S: SimStorage>(&self, id: NodeId, node: &RaftNode<S>) -> Result<(), String> {
        let compacted = node.first_index() - 1;
        for (&index, &term) in self.entries.range(compacted + 1..) {
            let found = node.term_at(index).expect("log");
            if found != Some(term) {
                return Err(format!(
                    "durability: node {id} had {index}@{term} acknowledged as durable, but after \
                     recovery its log has {found:?} there"
                ));
            }
        }
        Ok(())
    }
}

struct SimNode<S: SimStorage, A: Application<S>> {
    id: NodeId,
    incarnation: u64,
    state: NodeState<S, A>,
    /// The highest batch acknowledged to the core in this incarnation.
    persist_acked: PersistId,
    /// What the node was told is durable, as of its last acknowledgement (kept only when disk
    /// errors are injected).
    believed: Believed,
    /// Fsyncs complete in order: none before this time.
    fsync_done_time: u64,
    /// The disk stalls (a nemesis): no fsync of this incarnation completes before this time,
    /// while the node goes on ticking, sending and receiving, as the server's raft task does
    /// while its WAL thread waits in `fdatasync`.
    disk_stalled_until: u64,
    /// The node learned it was removed.
    removed: bool,
}

impl<S: SimStorage, A: Application<S>> SimNode<S, A> {
    /// The core of a running node (to look at; everything it is asked goes through the driver).
    fn running(&self) -> Option<&RaftNode<S>> {
        self.member().map(|member| member.driver.node())
    }

    fn member(&self) -> Option<&Member<S, A>> {
        match &self.state {
            NodeState::Running(member) => Some(member),
            _ => None,
        }
    }

    fn member_mut(&mut self) -> Option<&mut Member<S, A>> {
        match &mut self.state {
            NodeState::Running(member) => Some(member),
            _ => None,
        }
    }

    fn driver_mut(&mut self) -> Option<&mut SimDriver<S>> {
        self.member_mut().map(|member| &mut member.driver)
    }

    /// True if the node holds `entry` durably, as far as it was told.
    fn holds_durably(&self, entry: EntryId) -> bool {
        match &self.state {
            NodeState::Running(member) => believed_durable(member.driver.node(), entry),
            NodeState::Crashed { believed, .. } => believed.holds(entry),
            NodeState::Stopped => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Faults,
    Liveness,
}

#[allow(missing_debug_implementations)]
pub struct Simulation<S: SimStorage, A: Application<S>> {
    options: SimOptions,
    prng: Prng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    nodes: BTreeMap<NodeId, SimNode<S, A>>,
    next_node_id: NodeId,
    /// Directed links that drop messages.
    cut: BTreeSet<(NodeId, NodeId)>,
    partition_generation: u64,
    loss_per_mille: u64,
    duplicate_per_mille: u64,
    checker: Checker,
    /// The application's side of the run: its clients and its checks.
    app: A,
    /// Nodes that were ever in a configuration some leader committed or proposed.
    ever_members: BTreeSet<NodeId>,
    /// The index of the newest configuration entry known to be committed.
    newest_committed_membership: Index,
    trace: TraceDigest,
    phase: Phase,
    report: RunReport,
    /// The Figure 8 episode in progress, if any; while it runs the nemesis does nothing else.
    figure8: Option<Figure8>,
    /// Tells a Figure 8 step that is still current from one that was superseded.
    figure8_generation: u64,
}

impl<S: SimStorage, A: Application<S>> Simulation<S, A> {
    pub fn new(options: SimOptions) -> Self {
        let prng = Prng::new(options.seed);
        let report = RunReport {
            seed: options.seed,
            nodes: options.nodes,
            digest: 0,
            events: 0,
            writes_ok: 0,
            writes_failed: 0,
            writes_unknown: 0,
            reads_ok: 0,
            lease_reads_ok: 0,
            history_operations: 0,
            watch_events_checked: 0,
            watchers_restarted: 0,
            keep_alives_acked: 0,
            lease_expiries_checked: 0,
            session_repeats: 0,
            sessions_expired: 0,
            elections: 0,
            snapshots_installed: 0,
            membership_changes: 0,
            end_time: 0,
        };
        let mut sim = Self {
            prng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: BTreeMap::new(),
            next_node_id: 1,
            cut: BTreeSet::new(),
            partition_generation: 0,
            loss_per_mille: options.loss_per_mille,
            duplicate_per_mille: options.duplicate_per_mille,
            checker: Checker::default(),
            app: A::new(&options),
            ever_members: BTreeSet::new(),
            newest_committed_membership: 0,
            trace: TraceDigest::default(),
            phase: Phase::Faults,
            report,
            figure8: None,
            figure8_generation: 0,
            options,
        };
        let ids: Vec<NodeId> = (1..=sim.options.nodes as NodeId).collect();
        sim.next_node_id = ids.len() as NodeId + 1;
        sim.ever_members.extend(ids.iter().copied());
        let membership = Membership::with_voters(ids.iter().copied());
        for &id in &ids {
            let storage = S::create(id, membership.clone(), sim.options.seed)
                .expect("creating storage on a fresh disk");
            sim.start_node(id, storage);
        }
        for client in 0..sim.options.clients {
            let delay = sim.prng.range(1, 50);
            sim.schedule(delay, Event::ClientWake { client });
        }
        let delay = sim.nemesis_delay();
        sim.schedule(delay, Event::Nemesis);
        sim
    }

    /// Runs to the end. Returns the report, or the first violated property.
    pub fn run(mut self) -> Result<RunReport, Box<RunFailure>> {
        let fault_end = self.options.fault_phase_time;
        let deadline = fault_end + self.options.liveness_time_max;
        loop {
            let Some(Reverse((time, _, event))) = self.queue.pop() else {
                return Err(self.fail("the event queue ran dry".into()));
            };
            if self.phase == Phase::Faults && time >= fault_end {
                self.now = fault_end;
                self.begin_liveness();
            }
            if time > deadline {
                let detail = self.liveness_detail();
                return Err(self.fail(format!(
                    "liveness: not converged by time {deadline}: {detail}"
                )));
            }
            self.now = time;
            if self.options.verbose {
                self.log_event(&event);
            }
            if let Err(violation) = self.handle(event).and_then(|()| self.check()) {
                return Err(self.fail(violation));
            }
            if self.phase == Phase::Liveness && self.converged() {
                // Every client's last request is answered: the history is complete.
                return match self.app.check_history() {
                    Ok(()) => Ok(self.finish()),
                    Err(violation) => Err(self.fail(violation)),
                };
            }
        }
    }

    fn log_event(&self, event: &Event) {
        match event {
            Event::Deliver(key) => {
                let msg = &key.msg;
                let cut = if self.cut.contains(&(msg.from, msg.to)) {
                    " (cut)"
                } else {
                    ""
                };
                println!(
                    "{:>6} deliver {}->{} t{} {:?}{cut}",
                    self.now, msg.from, msg.to, msg.term, msg.body
                );
            }
            Event::Tick { .. } => {}
            other => println!("{:>6} {other:?}", self.now),
        }
    }

    fn fail(self, violation: Violation) -> Box<RunFailure> {
        Box::new(RunFailure {
            violation,
            report: self.finish(),
        })
    }

    fn finish(mut self) -> RunReport {
        self.app.finish(&mut self.report);
        self.report.digest = self.trace.value();
        self.report.events = self.trace.events();
        self.report.end_time = self.now;
        self.report
    }

    fn schedule(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.queue
            .push(Reverse((self.now + delay, self.seq, event)));
    }

    fn nemesis_delay(&mut self) -> u64 {
        let mean = self.options.nemesis_interval_time;
        self.prng.range(mean / 2, mean * 3 / 2 + 1)
    }

    // ----- Nodes -----------------------------------------------------------------------------

    fn node_config(&self, id: NodeId) -> Config {
        let o = &self.options;
        let mut config = Config::new(id);
        config.seed = o.seed.wrapping_mul(1_000_003).wrapping_add(id);
        config.election_timeout_ticks = ELECTION_TIMEOUT_TICKS;
        config.heartbeat_interval_ticks = 1;
        config.pre_vote = o.pre_vote;
        config.check_quorum = o.check_quorum || o.lease_reads;
        config.lease_reads = o.lease_reads;
        config.append_bytes_max = o.append_bytes_max;
        config.inflight_messages_max = o.inflight_messages_max;
        config.inflight_bytes_max = o.append_bytes_max.max(1) * o.inflight_messages_max as u64;
        config.uncommitted_bytes_max = 64 << 10;
        config.snapshot_chunk_bytes = o.snapshot_chunk_bytes;
        config.snapshot_chunks_inflight_max = 2;
        config.snapshot_policy = SnapshotPolicy {
            entries_max: o.snapshot_entries_max,
            bytes_max: 1 << 30,
        };
        config.snapshot_trailing_entries = o.snapshot_trailing_entries;
        config.promotion_lag_entries_max = 20;
        config.read_queue_max = 64;
        config
    }

    /// Starts a member as the server does: the state machine from the stored snapshot, if
    /// any, and the core told how far that state has applied.
    fn start_node(&mut self, id: NodeId, storage: S) {
        storage.inject_disk_errors(self.disk_error_one_in());
        let stored = storage
            .snapshot_data()
            .unwrap_or_else(|err| panic!("node {id}: reading the stored snapshot failed: {err}"));
        let app = A::start_member(self, id, stored.as_ref().map(|(_, data)| &data[..]));
        let applied = A::applied_index(&app);
        if let Some((meta, _)) = &stored {
            assert_eq!(
                applied, meta.last.index,
                "node {id}: the stored snapshot's state is not at its index"
            );
        }
        let config = self.node_config(id);
        let node = RaftNode::new(config, storage, applied).expect("node starts from valid storage");
        let member = Member {
            driver: Driver::new(node, PROPOSALS_MAX),
            app,
        };
        let incarnation = self.nodes.get(&id).map(|n| n.incarnation + 1).unwrap_or(1);
        // A member removed before it crashed is still removed when it restarts (the server's
        // peers refuse it and say why): it stops again after a while.
        let removed = self.nodes.get(&id).is_some_and(|n| n.removed);
        self.nodes.insert(
            id,
            SimNode {
                id,
                incarnation,
                state: NodeState::Running(Box::new(member)),
                persist_acked: 0,
                believed: Believed::default(),
                fsync_done_time: self.now,
                disk_stalled_until: self.now,
                removed,
            },
        );
        if removed {
            let delay = self.prng.range(100, 1_000);
            self.schedule(delay, Event::StopRemoved { node: id });
        }
        let phase = self.prng.range(1, TICK_TIME + 1);
        self.schedule(
            phase,
            Event::Tick {
                node: id,
                incarnation,
            },
        );
        self.trace.record(&[1, id, incarnation, self.now]);
    }

    /// Power loss: the process dies and the disk keeps only what it had made durable.
    fn crash(&mut self, id: NodeId) {
        let Some(sim_node) = self.nodes.get_mut(&id) else {
            return;
        };
        let NodeState::Running(_) = &sim_node.state else {
            return;
        };
        let NodeState::Running(member) = std::mem::replace(&mut sim_node.state, NodeState::Stopped)
        else {
            unreachable!("checked above")
        };
        let node = member.driver.node();
        // If the storage failed, its log cannot be read: use what was recorded at the last
        // acknowledgement, less anything the node has since replaced (a truncation lowers the
        // persisted index below the replaced entries; their replacements were never
        // acknowledged, so either version may survive).
        let believed = Believed::try_of(node)
            .unwrap_or_else(|| sim_node.believed.restricted_to(node.persisted()));
        // The waiters die with the process: their clients hear nothing (and time out).
        let storage = member.driver.into_storage();
        sim_node.state = NodeState::Crashed {
            disk: Box::new(storage.power_loss()),
            believed,
        };
        self.trace.record(&[2, id, self.now]);
        A::member_stopped(self, id);
    }

    /// The core returned an error. Only a fatal storage error is expected (the WAL failed
    /// after an injected disk error); anything else is a bug.
    fn core_failed(&mut self, id: NodeId, err: Error) {
        assert!(
            err.is_fatal(),
            "node {id}: unexpected error from the core: {err}"
        );
        self.storage_failed(id, &err.to_string());
    }

    /// A storage write failed: the node stops at once (it must not carry on as if the write
    /// had happened) and comes back later through recovery.
    fn storage_failed(&mut self, id: NodeId, error: &str) {
        self.trace
            .record_str(&format!("storage failure on {id}: {error}"));
        if self.options.verbose {
            println!("{:>6}   n{id} storage failure: {error}", self.now);
        }
        self.crash(id);
        let downtime = self.prng.range(50, 500);
        self.schedule(downtime, Event::Restart { node: id });
    }

    fn restart(&mut self, id: NodeId) {
        let Some(sim_node) = self.nodes.get(&id) else {
            return;
        };
        let NodeState::Crashed { disk, believed } = &sim_node.state else {
            return;
        };
        let storage = S::recover(disk)
            .unwrap_or_else(|err| panic!("node {id} cannot recover its storage: {err}"));
        let believed = believed.clone();
        self.start_node(id, storage);
        let node = self.nodes[&id].running().expect("just started");
        if let Err(violation) = believed.check_recovered(id, node) {
            panic!("{violation}");
        }
        self.process(id);
    }

    /// Carries out a node's actions, repeatedly, until it has nothing more to say.
    fn process(&mut self, id: NodeId) {
        for _ in 0..64 {
            let Some(driver) = self.nodes.get_mut(&id).and_then(SimNode::driver_mut) else {
                return;
            };
            let actions = match driver.take_actions() {
                Ok(actions) => actions,
                Err(err) => return self.core_failed(id, err),
            };
            if actions.is_empty() {
                A::idle(self, id);
                return;
            }
            self.carry_out(id, actions);
        }
        panic!("node {id} kept producing output");
    }

    /// Does what the driver asks, in its order, as the server's raft task and apply thread do.
    fn carry_out(&mut self, id: NodeId, actions: Actions<Waiter, Waiter>) {
        if self.options.verbose {
            self.print_actions(id, &actions);
        }
        if let Some(state) = actions.role_state {
            self.trace
                .record(&[3, id, state.role as u64, state.term, state.leader]);
            if state.role == Role::Leader {
                self.report.elections += 1;
            }
        }
        if let Some(batch) = actions.persist {
            self.write_batch(id, batch);
            if self.nodes[&id].running().is_none() {
                // The write failed and the process died: nothing more happens.
                return;
            }
        }
        let votes: Vec<Message> = actions
            .messages
            .iter()
            .filter(|msg| matches!(msg.body, MessageBody::VoteResponse(_)))
            .cloned()
            .collect();
        for msg in actions.messages {
            self.send(msg);
        }
        if self.maybe_crash_at_vote(id, &votes) {
            return;
        }
        if !actions.apply.is_empty() {
            self.apply(id, actions.apply);
            if self.nodes[&id].running().is_none() {
                return;
            }
            A::after_apply(self, id);
        }
        for (waiter, refusal) in actions.proposals_failed {
            A::refused(self, id, waiter, &refusal);
        }
        for waiter in actions.reads_ready {
            A::read_ready(self, id, waiter);
        }
        for (waiter, refusal) in actions.reads_failed {
            A::refused(self, id, waiter, &refusal);
        }
        if actions.snapshot_due {
            self.take_snapshot(id);
        }
        if actions.removed {
            self.trace.record(&[4, id]);
            self.mark_removed(id);
        }
        self.figure8_observe(id);
    }

    fn print_actions(&self, id: NodeId, actions: &Actions<Waiter, Waiter>) {
        if let Some(state) = actions.role_state {
            println!("{:>6}   n{id} {:?}", self.now, state);
        }
        if let Some(batch) = &actions.persist {
            let entries: Vec<String> = batch.entries.iter().map(|e| e.id().to_string()).collect();
            println!(
                "{:>6}   n{id} persist #{} hs={:?} entries=[{}] chunks={} install={:?} compact={:?}",
                self.now,
                batch.id,
                batch.hard_state,
                entries.join(" "),
                batch.snapshot_chunks.len(),
                batch
                    .snapshot_install
                    .as_ref()
                    .map(|i| (i.meta.last, i.keep_through)),
                batch.compact_to
            );
        }
    }

    /// The node is out of the cluster. It keeps running for a while, to show it cannot disrupt
    /// the cluster, then stops.
    fn mark_removed(&mut self, id: NodeId) {
        let Some(sim_node) = self.nodes.get_mut(&id) else {
            return;
        };
        if sim_node.removed {
            return;
        }
        sim_node.removed = true;
        let delay = self.prng.range(100, 1_000);
        self.schedule(delay, Event::StopRemoved { node: id });
    }

    /// A configuration entry was applied, so it is committed. If it is the newest one and
    /// simple, the nodes it leaves out are told they were removed (in the server, the transport
    /// refuses a removed member and says why): a node removed while cut off would otherwise
    /// never learn it.
    fn configuration_committed(&mut self, index: Index, membership: &Membership) {
        if index <= self.newest_committed_membership || membership.is_joint() {
            return;
        }
        self.newest_committed_membership = index;
        let outsiders: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.removed && !membership.contains(n.id) && self.was_member(n.id))
            .map(|n| n.id)
            .collect();
        for outsider in outsiders {
            self.trace.record(&[21, outsider]);
            self.mark_removed(outsider);
        }
    }

    /// True if the node was ever part of a configuration (a node just added and not yet
    /// caught up is not "removed").
    fn was_member(&self, id: NodeId) -> bool {
        self.ever_members.contains(&id)
    }

    /// The batch is written now; it becomes durable when its simulated fsync completes.
    fn write_batch(&mut self, id: NodeId, batch: PersistBatch) {
        let delay = self.prng.range(
            self.options.fsync_delay_min,
            self.options.fsync_delay_max + 1,
        );
        let sim_node = self.nodes.get_mut(&id).expect("exists");
        let Some(driver) = sim_node.driver_mut() else {
            return;
        };
        if let Err(err) = driver.storage_mut().write(&batch) {
            return self.storage_failed(id, &err);
        }
        let done = (self.now + delay)
            .max(sim_node.fsync_done_time)
            .max(sim_node.disk_stalled_until);
        sim_node.fsync_done_time = done;
        let event = Event::FsyncDone {
            node: id,
            incarnation: sim_node.incarnation,
            batch: batch.id,
        };
        self.schedule(done - self.now, event);
    }

    fn fsync_done(&mut self, id: NodeId, batch_id: PersistId) {
        let sim_node = self.nodes.get_mut(&id).expect("exists");
        if self.now < sim_node.disk_stalled_until {
            // An fsync under way when the disk stalled finishes only when it recovers.
            let wait = sim_node.disk_stalled_until - self.now;
            let event = Event::FsyncDone {
                node: id,
                incarnation: sim_node.incarnation,
                batch: batch_id,
            };
            return self.schedule(wait, event);
        }
        let persist_acked = sim_node.persist_acked;
        let Some(driver) = sim_node.driver_mut() else {
            return;
        };
        if batch_id <= persist_acked {
            // An earlier fsync already covered it (group commit).
            return;
        }
        match driver.storage_mut().sync() {
            Ok(Some(durable)) if durable > persist_acked => {
                if let Err(err) = driver.persisted(durable) {
                    return self.core_failed(id, err);
                }
                let believed =
                    (self.options.disk_error_one_in > 0).then(|| Believed::of(driver.node()));
                sim_node.persist_acked = durable;
                if let Some(believed) = believed {
                    // Once a disk error stops the WAL it cannot be read: remember now what
                    // the node was told is durable, for the check after recovery.
                    sim_node.believed = believed;
                }
                self.trace.record(&[5, id, durable]);
                self.process(id);
            }
            Ok(_) => {}
            Err(err) => self.storage_failed(id, &err),
        }
    }

    /// Applies committed entries to the state machine, as the server's apply thread does, and
    /// answers the proposals they carry.
    fn apply(&mut self, id: NodeId, items: Vec<(Apply, Option<Waiter>)>) {
        let last_index = items
            .last()
            .map(|(item, _)| item.index())
            .expect("non-empty");
        for (item, waiter) in items {
            match item {
                Apply::Entry(entry) => {
                    let output = self.apply_entry(id, &entry);
                    if let (Some(waiter), Some(output)) = (waiter, output) {
                        A::answer(self, id, waiter, entry.index, &output);
                    }
                }
                Apply::Snapshot(meta) => self.load_snapshot(id, &meta),
            }
        }
        let sim_node = self.nodes.get_mut(&id).expect("exists");
        let Some(driver) = sim_node.driver_mut() else {
            return;
        };
        if let Err(err) = driver.applied(last_index) {
            self.core_failed(id, err);
        }
    }

    /// Applies one entry and checks that it did exactly what it did on every other member.
    fn apply_entry(&mut self, id: NodeId, entry: &flotilla_raft::Entry) -> Option<A::Output> {
        self.nodes.get(&id)?.member()?;
        let first_anywhere = !self.checker.applied.contains_key(&entry.index);
        let output = A::apply_entry(self, id, entry, first_anywhere);
        let record = AppliedRecord {
            term: entry.term,
            payload_digest: payload_digest(entry),
            effect_digest: text_digest(&format!("{output:?}")),
        };
        let known = *self.checker.applied.entry(entry.index).or_insert(record);
        assert_eq!(
            known, record,
            "state machine safety: node {id} applied {} differently from another node",
            entry.index
        );
        if entry.index.is_multiple_of(A::STATE_DIGEST_EVERY) {
            self.check_state(id, entry.index);
        }
        if let flotilla_raft::EntryPayload::Membership(change) = &entry.payload {
            self.trace
                .record_str(&format!("applied membership {}", change.membership));
            self.configuration_committed(entry.index, &change.membership);
        }
        Some(output)
    }

    /// Compares member `id`'s whole state, at `index`, with every other member's there.
    fn check_state(&mut self, id: NodeId, index: Index) {
        let digest = A::state_digest(&mut self.member_mut(id).app);
        if let Err(violation) = self.checker.check_state(id, index, digest) {
            panic!("{violation}");
        }
    }

    /// Replaces the state machine with the snapshot the core installed, as the server does.
    fn load_snapshot(&mut self, id: NodeId, meta: &flotilla_raft::SnapshotMeta) {
        let member = self.member_mut(id);
        let (stored, data) = member
            .driver
            .storage()
            .snapshot_data()
            .unwrap_or_else(|err| panic!("node {id}: reading the snapshot failed: {err}"))
            .expect("a snapshot to load is in storage");
        assert_eq!(
            &stored, meta,
            "node {id}: the snapshot to load is not the stored one"
        );
        A::restore(&mut member.app, &data)
            .unwrap_or_else(|err| panic!("node {id}: bad snapshot: {err}"));
        assert_eq!(
            A::applied_index(&member.app),
            meta.last.index,
            "node {id}: snapshot {} holds a state at another index",
            meta.last
        );
        self.check_state(id, meta.last.index);
        self.report.snapshots_installed += 1;
        self.trace.record(&[6, id, meta.last.index, meta.last.term]);
    }

    /// Saves a snapshot of the state machine at its applied index, encoded in steps from a
    /// point-in-time view as the server's encoder does.
    fn take_snapshot(&mut self, id: NodeId) {
        let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) else {
            return;
        };
        let index = A::applied_index(&member.app);
        if index <= member.driver.node().snapshot_id().index {
            return;
        }
        let meta = match member.driver.snapshot_meta(index) {
            Ok(meta) => meta,
            // Past the durable log (its disk is behind what it applied) the core refuses the
            // snapshot, and the server logs that and skips it: so does the simulator.
            Err(flotilla_raft::Error::InvalidSnapshot { .. }) => return,
            Err(err) => return self.core_failed(id, err),
        };
        let data = A::encode_snapshot(&mut member.app)
            .unwrap_or_else(|err| panic!("node {id}: encoding a snapshot failed: {err}"));
        if let Err(err) = member.driver.storage_mut().save_snapshot(&meta, data) {
            return self.storage_failed(id, &err);
        }
        if let Err(err) = member.driver.snapshot_saved(&meta) {
            return self.core_failed(id, err);
        }
        self.check_state(id, index);
        self.trace.record(&[7, id, index]);
    }

    // ----- Network ---------------------------------------------------------------------------

    fn send(&mut self, msg: Message) {
        self.trace
            .record(&[8, msg.from, msg.to, msg.term, msg.body.payload_bytes()]);
        self.trace.record_str(msg.body.kind());
        if self.prng.chance(self.loss_per_mille, 1000) {
            return;
        }
        let copies = if self.prng.chance(self.duplicate_per_mille, 1000) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.prng.range(
                self.options.message_delay_min,
                self.options.message_delay_max + 1,
            );
            self.seq += 1;
            let key = MessageKey {
                seq: self.seq,
                msg: msg.clone(),
            };
            self.schedule(delay, Event::Deliver(Box::new(key)));
        }
    }

    fn deliver(&mut self, msg: Message) {
        if self.cut.contains(&(msg.from, msg.to)) {
            return;
        }
        let to = msg.to;
        let Some(driver) = self.nodes.get_mut(&to).and_then(SimNode::driver_mut) else {
            return;
        };
        self.trace.record(&[9, msg.from, to, msg.term]);
        if let Err(err) = driver.step(msg) {
            return self.core_failed(to, err);
        }
        self.process(to);
    }

    // ----- Event handling --------------------------------------------------------------------

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::Tick { node, incarnation } => {
                let Some(sim_node) = self.nodes.get_mut(&node) else {
                    return Ok(());
                };
                if sim_node.incarnation != incarnation {
                    return Ok(());
                }
                let Some(driver) = sim_node.driver_mut() else {
                    return Ok(());
                };
                let ticked = driver.tick();
                self.schedule(TICK_TIME, Event::Tick { node, incarnation });
                if let Err(err) = ticked {
                    self.core_failed(node, err);
                    return Ok(());
                }
                self.process(node);
                A::ticked(self, node);
            }
            Event::Deliver(key) => self.deliver(key.msg),
            Event::FsyncDone {
                node,
                incarnation,
                batch,
            } => {
                if self
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.incarnation == incarnation)
                {
                    self.fsync_done(node, batch);
                }
            }
            Event::ClientWake { client } => A::client_wake(self, client),
            Event::ClientTimeout { client, attempt } => A::client_timeout(self, client, attempt),
            Event::Nemesis => {
                if self.phase == Phase::Faults {
                    self.nemesis();
                    let delay = self.nemesis_delay();
                    self.schedule(delay, Event::Nemesis);
                } else {
                    self.fill_log();
                    self.schedule(TICK_TIME * 5, Event::Nemesis);
                }
            }
            Event::Restart { node } => self.restart(node),
            Event::HealPartition { generation } => {
                if generation == self.partition_generation {
                    self.cut.clear();
                    self.trace.record(&[10, self.now]);
                }
            }
            Event::StopRemoved { node } => self.stop_removed(node),
            Event::Figure8Step { generation } => self.figure8_step(generation),
            Event::Campaign { node, incarnation } => self.campaign(node, incarnation),
            Event::Reconnect { from, to } => {
                self.cut.remove(&(from, to));
            }
        }
        Ok(())
    }

    fn stop_removed(&mut self, id: NodeId) {
        let Some(sim_node) = self.nodes.get_mut(&id) else {
            return;
        };
        if !sim_node.removed {
            return;
        }
        sim_node.state = NodeState::Stopped;
        self.trace.record(&[11, id]);
        A::member_stopped(self, id);
    }

    fn begin_liveness(&mut self) {
        self.end_figure8();
        self.phase = Phase::Liveness;
        self.cut.clear();
        self.loss_per_mille = 0;
        self.duplicate_per_mille = 0;
        let crashed: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| matches!(n.state, NodeState::Crashed { .. }))
            .map(|n| n.id)
            .collect();
        // Disk errors are faults too: the healed cluster's disks work.
        for sim_node in self.nodes.values() {
            if let Some(node) = sim_node.running() {
                node.storage().inject_disk_errors(0);
            }
        }
        for id in crashed {
            self.restart(id);
        }
        self.trace.record(&[12, self.now]);
    }

    /// One write or fsync in this many fails: only while faults are injected.
    fn disk_error_one_in(&self) -> u64 {
        match self.phase {
            Phase::Faults => self.options.disk_error_one_in,
            Phase::Liveness => 0,
        }
    }

    fn check(&mut self) -> Result<(), Violation> {
        let views: Vec<NodeView<'_, S>> = self
            .nodes
            .values()
            .filter_map(|n| {
                n.running().map(|node| NodeView {
                    id: n.id,
                    incarnation: n.incarnation,
                    node,
                })
            })
            .collect();
        let nodes = &self.nodes;
        let durable = |id: NodeId, entry: EntryId| {
            nodes.get(&id).is_some_and(|node| node.holds_durably(entry))
        };
        self.checker.check(&views, &durable)
    }

    // ----- Liveness --------------------------------------------------------------------------

    fn members_running(&self) -> Vec<&RaftNode<S>> {
        self.nodes
            .values()
            .filter(|n| !n.removed)
            .filter_map(SimNode::running)
            .collect()
    }

    fn converged(&self) -> bool {
        let nodes = self.members_running();
        let Some(leader) = nodes.iter().find(|n| n.is_leader()) else {
            return false;
        };
        if leader.membership().is_joint()
            || leader.committed() < leader.last_id().index
            || !A::converged(self, leader.id())
        {
            return false;
        }
        let members = leader.membership().members();
        let target = leader.committed();
        members.iter().all(|id| {
            self.nodes
                .get(id)
                .and_then(SimNode::running)
                .is_some_and(|n| n.applied() == target && n.leader() == Some(leader.id()))
        })
    }

    fn liveness_detail(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .values()
            .map(|n| match n.member() {
                Some(member) => {
                    let node = member.driver.node();
                    format!(
                        "n{}:{}@{} commit={} applied={} last={} members={} {}",
                        n.id,
                        node.role(),
                        node.term(),
                        node.committed(),
                        node.applied(),
                        node.last_id(),
                        node.membership(),
                        A::describe_member(&member.app)
                    )
                }
                None => format!("n{}:down", n.id),
            })
            .collect();
        format!(
            "nodes [{}] clients [{}]",
            nodes.join("; "),
            self.app.describe_clients()
        )
    }

    // ----- Nemesis ---------------------------------------------------------------------------

    fn nemesis(&mut self) {
        if self.figure8.is_some() {
            return;
        }
        let choice = self.prng.range(0, 13);
        match choice {
            12 => self.nemesis_disk_stall(),
            10 if self.options.crashes && self.options.partitions => self.nemesis_figure8(),
            11 if self.options.partitions => self.nemesis_deposed_leader(),
            0..=2 if self.options.crashes => self.nemesis_crash(),
            3..=5 if self.options.partitions => self.nemesis_partition(),
            6 if self.options.transfers => self.nemesis_transfer(),
            7..=8 if self.options.membership_churn => self.nemesis_membership(),
            9 => self.nemesis_snapshot(),
            _ => {}
        }
    }

    fn running_ids(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.running().is_some())
            .map(|n| n.id)
            .collect()
    }

    fn leader_id(&self) -> Option<NodeId> {
        self.nodes
            .values()
            .filter_map(|n| {
                n.running()
                    .filter(|r| r.is_leader())
                    .map(|r| (r.term(), n.id))
            })
            .max()
            .map(|(_, id)| id)
    }

    fn nemesis_crash(&mut self) {
        let target = if self.prng.chance(1, 2) {
            self.leader_id()
        } else {
            None
        };
        let running = self.running_ids();
        let Some(id) = target.or_else(|| {
            (!running.is_empty())
                .then(|| running[self.prng.range(0, running.len() as u64) as usize])
        }) else {
            return;
        };
        self.crash(id);
        let downtime = self.prng.range(50, 1_500);
        self.schedule(downtime, Event::Restart { node: id });
    }

    fn nemesis_partition(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.cut.clear();
        let shape = self.prng.range(0, 4);
        match shape {
            // Isolate the leader (or a random node).
            0 => {
                let victim = self
                    .leader_id()
                    .unwrap_or(ids[self.prng.range(0, ids.len() as u64) as usize]);
                for &other in &ids {
                    if other != victim {
                        self.cut.insert((victim, other));
                        self.cut.insert((other, victim));
                    }
                }
            }
            // Split into a majority and a minority (or two random halves).
            1 => {
                let side: BTreeMap<NodeId, bool> =
                    ids.iter().map(|&id| (id, self.prng.chance(1, 2))).collect();
                for &a in &ids {
                    for &b in &ids {
                        if side[&a] != side[&b] {
                            self.cut.insert((a, b));
                        }
                    }
                }
            }
            // A bridge: two sides that cannot talk, and one node that talks to both.
            2 => {
                let bridge = ids[self.prng.range(0, ids.len() as u64) as usize];
                let side: BTreeMap<NodeId, bool> =
                    ids.iter().map(|&id| (id, self.prng.chance(1, 2))).collect();
                for &a in &ids {
                    for &b in &ids {
                        if a != bridge && b != bridge && side[&a] != side[&b] {
                            self.cut.insert((a, b));
                        }
                    }
                }
            }
            // One-way links: some directions drop, the reverse works.
            _ => {
                for &a in &ids {
                    for &b in &ids {
                        if a != b && self.prng.chance(1, 4) {
                            self.cut.insert((a, b));
                        }
                    }
                }
            }
        }
        self.partition_generation += 1;
        self.trace.record(&[18, shape, self.cut.len() as u64]);
        let duration = self.prng.range(100, 2_000);
        self.schedule(
            duration,
            Event::HealPartition {
                generation: self.partition_generation,
            },
        );
    }

    /// A member's disk stops completing fsyncs for one to four election timeouts (the
    /// leader's, half the time): etcd issue #15247, where a leader stuck in `fdatasync` lost
    /// its leases. The member keeps running; only its durability waits, so a stalled leader
    /// must go on leading with its followers' acknowledgements, and its lease clock must
    /// neither expire a lease early nor keep one past its bound.
    fn nemesis_disk_stall(&mut self) {
        let running = self.running_ids();
        if running.is_empty() {
            return;
        }
        let victim = match self.leader_id() {
            Some(leader) if self.prng.chance(1, 2) => leader,
            _ => running[self.prng.range(0, running.len() as u64) as usize],
        };
        let election_time = ELECTION_TIMEOUT_TICKS * TICK_TIME;
        let stall = self.prng.range(election_time, 4 * election_time + 1);
        let sim_node = self.nodes.get_mut(&victim).expect("running");
        sim_node.disk_stalled_until = sim_node.disk_stalled_until.max(self.now + stall);
        self.trace.record(&[22, victim, stall]);
        if self.options.verbose {
            println!("{:>6}   n{victim} disk stalls for {stall}", self.now);
        }
    }

    fn nemesis_transfer(&mut self) {
        let Some(leader) = self.leader_id() else {
            return;
        };
        let voters: Vec<NodeId> = {
            let node = self.nodes[&leader].running().expect("running");
            node.membership().voters.iter().copied().collect()
        };
        let target = voters[self.prng.range(0, voters.len() as u64) as usize];
        let driver = &mut self.member_mut(leader).driver;
        let _ = driver.transfer_leader(target);
        self.trace.record(&[19, leader, target]);
        self.process(leader);
    }

    fn nemesis_snapshot(&mut self) {
        let running = self.running_ids();
        if running.is_empty() {
            return;
        }
        let id = running[self.prng.range(0, running.len() as u64) as usize];
        self.take_snapshot(id);
        self.process(id);
    }

    fn nemesis_membership(&mut self) {
        let Some(leader) = self.leader_id() else {
            return;
        };
        let membership = self.nodes[&leader]
            .running()
            .expect("running")
            .membership()
            .clone();
        let voters: Vec<NodeId> = membership.voters.iter().copied().collect();
        let learners: Vec<NodeId> = membership.learners.iter().copied().collect();
        let max_voters = self.options.nodes as u64 + 2;
        let step = match self.prng.range(0, 6) {
            0 | 1 if (voters.len() as u64) < max_voters => {
                let id = self.allocate_node();
                if self.prng.chance(1, 2) {
                    vec![ConfChangeStep::AddLearner(id)]
                } else {
                    vec![ConfChangeStep::AddVoter(id)]
                }
            }
            2 if !learners.is_empty() => {
                vec![ConfChangeStep::Promote(
                    learners[self.prng.range(0, learners.len() as u64) as usize],
                )]
            }
            3 if voters.len() > 2 => {
                vec![ConfChangeStep::Remove(
                    voters[self.prng.range(0, voters.len() as u64) as usize],
                )]
            }
            4 if voters.len() > 2 => {
                // Replace one voter by a new one in a single joint change.
                let old = voters[self.prng.range(0, voters.len() as u64) as usize];
                let new = self.allocate_node();
                vec![ConfChangeStep::Remove(old), ConfChangeStep::AddVoter(new)]
            }
            5 if voters.len() > 2 && voters.contains(&leader) => {
                vec![ConfChangeStep::Remove(leader)]
            }
            _ => return,
        };
        let change = ConfChange {
            steps: step.clone(),
            context: Bytes::new(),
        };
        let driver = &mut self.member_mut(leader).driver;
        let result = driver
            .propose_membership(change, Waiter::Internal)
            .map_err(|(_, refusal)| refusal);
        self.trace.record_str(&format!(
            "membership {step:?} {:?}",
            result.as_ref().map(|_| ())
        ));
        if result.is_ok() {
            self.report.membership_changes += 1;
            for step in step {
                if let ConfChangeStep::AddLearner(id) | ConfChangeStep::AddVoter(id) = step
                    && !self.nodes.contains_key(&id)
                {
                    // A new member starts empty and learns everything from the leader.
                    self.ever_members.insert(id);
                    let seed = self.options.seed;
                    let storage = S::create(id, Membership::default(), seed)
                        .expect("creating storage on a fresh disk");
                    self.start_node(id, storage);
                }
            }
        }
        self.process(leader);
    }

    /// In the liveness phase: a write accepted at an index the log no longer reaches (its
    /// entry was overwritten by a shorter log) resolves only once something else commits at
    /// that index. The filler proposes blank commands on the leader until the commit index
    /// passes every pending write, so each one becomes definitively committed or failed.
    fn fill_log(&mut self) {
        let Some(pending_max) = self.app.proposed_index_max() else {
            return;
        };
        let Some(leader) = self.leader_id() else {
            return;
        };
        if self.nodes[&leader]
            .running()
            .expect("running")
            .last_id()
            .index
            >= pending_max
        {
            return;
        }
        let command = self.app.internal_command(0);
        let driver = &mut self.member_mut(leader).driver;
        let _ = driver.propose(command, Waiter::Internal);
        self.trace.record(&[20, leader]);
        self.process(leader);
    }

    /// The member a client sends to: the leader it was told of, else any running member.
    fn pick_node(&mut self, hint: Option<NodeId>) -> Option<NodeId> {
        if let Some(id) = hint
            && self.nodes.get(&id).is_some_and(|n| n.running().is_some())
        {
            return Some(id);
        }
        let running: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.running().is_some() && !n.removed)
            .map(|n| n.id)
            .collect();
        if running.is_empty() {
            return None;
        }
        Some(running[self.prng.range(0, running.len() as u64) as usize])
    }

    /// A read of `client`'s answered by member `id` from its state at `applied`. A
    /// linearizable one (`floor_index` given: the highest write acknowledged before it began)
    /// must see every write acknowledged before it began.
    fn read_answered(
        &mut self,
        id: NodeId,
        client: usize,
        applied: Index,
        floor_index: Option<Index>,
    ) {
        if let Some(floor_index) = floor_index {
            assert!(
                applied >= floor_index,
                "stale read on node {id}: it applied {applied} but write {floor_index} was \
                 acknowledged before the read began"
            );
        }
        self.report.reads_ok += 1;
        self.trace.record(&[17, client as u64, applied]);
    }

    /// Counts how `client`'s request (its `requests_started`th, a `write` or not) ended, and
    /// schedules its next one.
    fn request_ended(
        &mut self,
        client: usize,
        requests_started: u64,
        write: bool,
        outcome: &workload::Outcome,
    ) {
        match outcome {
            workload::Outcome::Fail => self.report.writes_failed += 1,
            workload::Outcome::Unknown if write => self.report.writes_unknown += 1,
            _ => {}
        }
        self.trace.record(&[15, client as u64, requests_started]);
        let delay = self.prng.range(1, 30);
        self.schedule(delay, Event::ClientWake { client });
    }

    /// Running member `id`.
    fn member_mut(&mut self, id: NodeId) -> &mut Member<S, A> {
        self.nodes
            .get_mut(&id)
            .and_then(SimNode::member_mut)
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// How long a client waits before it sends a request again after an attempt without an
    /// answer that decides it, or `None` if it gives up (its outcome stays unknown): during
    /// the fault phase, once it has tried `ATTEMPTS_MIN` times and `DEADLINE_TIMEOUTS`
    /// client timeouts have passed since it began, as Flotilla's client retries until its
    /// deadline.
    fn retry_delay(&self, invoked_at: u64, attempts: u32, refusal: &Refusal) -> Option<u64> {
        let deadline = invoked_at + DEADLINE_TIMEOUTS * self.options.client_timeout_time;
        if self.phase == Phase::Faults && attempts >= ATTEMPTS_MIN && self.now >= deadline {
            return None;
        }
        Some(match refusal {
            Refusal::NotLeader(Some(_)) => TICK_TIME,
            _ => TICK_TIME * 3,
        })
    }

    fn allocate_node(&mut self) -> NodeId {
        let id = self.next_node_id;
        self.next_node_id += 1;
        id
    }
}
