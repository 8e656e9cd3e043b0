//! The tokio shell around the [`Driver`]: one task runs the core, one thread writes and syncs
//! the WAL (group commit), one thread applies committed entries to the state machine.
//!
//! ```text
//!   ticker ─┐                    ┌─► WAL thread: write batches, one fsync for all ─► persisted
//!   peers ──┼─► raft task ───────┼─► peer transport (at once, in parallel with the fsync)
//!   clients ┘   (Driver)         └─► apply thread: state machine, answer proposals ─► applied
//! ```
//!
//! Every channel is bounded. The raft task never blocks on a slow consumer: batches for the WAL
//! and the apply thread wait in its own queues while their channels are full, and it refuses
//! new proposals ("too many requests") while the apply backlog is too long. The WAL and apply
//! threads report progress through `watch` channels, which hold only the latest value and so
//! can never fill up.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_kv::Limits;
use flotilla_raft::{
    Apply, ConfChange, Index, Message, NodeId, PersistBatch, PersistId, RaftNode, Role, RoleState,
    SnapshotMeta,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::{Actions, Driver, Refusal};
use crate::metrics::Metrics;
use crate::read_lease::{self, Lease, PublishedLease, TickClock};
use crate::state_machine::{Applied, EventSink, StateMachine, StateSnapshotCursor};
use crate::storage::{DurableStorage, SnapshotReader, StorageFailure};
use crate::transport::{PeerRouter, TransportEvent};

pub type ProposalWaiter = oneshot::Sender<Result<Applied, Refusal>>;
pub type ReadWaiter = oneshot::Sender<Result<(), Refusal>>;
type NodeDriver = Driver<Arc<dyn DurableStorage>, ProposalWaiter, ReadWaiter>;

/// Requests from clients (through the gRPC services) to the raft task.
#[derive(Debug)]
pub enum NodeRequest {
    Propose {
        data: Bytes,
        reply: ProposalWaiter,
    },
    Membership {
        change: ConfChange,
        reply: ProposalWaiter,
    },
    Read {
        reply: ReadWaiter,
    },
    TransferLeader {
        /// `None`: to the most up-to-date follower among `among` (any voter if empty).
        to: Option<NodeId>,
        among: Vec<NodeId>,
        reply: oneshot::Sender<Result<NodeId, Refusal>>,
    },
    /// Save a snapshot at the applied index now (the policy's deferrals do not apply); the
    /// status's `snapshot_index` moves when it is saved.
    SaveSnapshot,
}

/// What the raft task publishes after each round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub commit: Index,
    pub applied: Index,
    pub last_index: Index,
    /// The index of the newest snapshot the core holds (0 before the first).
    pub snapshot_index: Index,
    pub is_learner: bool,
    /// This member was removed from the cluster; it is stopping.
    pub removed: bool,
    /// The raft task has stopped (shutdown, removal or a fatal error).
    pub stopped: bool,
    /// Why the node stopped on its own, if it did.
    pub fatal: Option<String>,
}

/// Timing and bounds of the shell.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub raft: flotilla_raft::Config,
    /// One tick of the core.
    pub tick: Duration,
    /// Proposals are refused while more entries than this are committed and not applied
    /// (etcd's "too many requests").
    pub apply_backlog_entries_max: u64,
    pub proposals_max: usize,
    pub limits: Limits,
    /// With lease reads (`raft.lease_reads`): how long a lease lasts in real time from the
    /// tick its round was sent in (see [`crate::read_lease`]).
    pub lease_duration: Option<Duration>,
}

/// A running node, for the services: submit requests, watch the status, read the state.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    requests: mpsc::Sender<NodeRequest>,
    status: watch::Receiver<NodeStatus>,
    pub state: Arc<RwLock<StateMachine>>,
    pub storage: Arc<dyn DurableStorage>,
    pub metrics: Arc<Metrics>,
    lease: Arc<PublishedLease>,
}

/// Why a request to the node failed.
#[derive(Debug)]
pub enum NodeError {
    Refused(Refusal),
    /// No answer within the deadline: the outcome is unknown.
    Timeout,
    /// The node is stopping or stopped.
    Stopped,
}

impl NodeHandle {
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    pub fn status_watch(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    pub fn id(&self) -> NodeId {
        self.status.borrow().id
    }

    async fn call<T>(
        &self,
        request: NodeRequest,
        reply: oneshot::Receiver<Result<T, Refusal>>,
        deadline: Instant,
    ) -> Result<T, NodeError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answered = tokio::time::timeout(remaining, async {
            self.requests
                .send(request)
                .await
                .map_err(|_| NodeError::Stopped)?;
            reply.await.map_err(|_| NodeError::Stopped)
        })
        .await;
        match answered {
            Err(_) => Err(NodeError::Timeout),
            Ok(Err(err)) => Err(err),
            Ok(Ok(result)) => result.map_err(NodeError::Refused),
        }
    }

    /// Proposes a command and waits until it is applied here.
    pub async fn propose(&self, data: Bytes, deadline: Instant) -> Result<Applied, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(NodeRequest::Propose { data, reply }, rx, deadline)
            .await
    }

    /// Enqueues a proposal without waiting, so proposals enqueued one after another (under a
    /// lock of the caller's) reach the log in that order; the receiver gets the outcome.
    pub fn submit(
        &self,
        data: Bytes,
    ) -> Result<oneshot::Receiver<Result<Applied, Refusal>>, NodeError> {
        let (reply, outcome) = oneshot::channel();
        match self.requests.try_send(NodeRequest::Propose { data, reply }) {
            Ok(()) => Ok(outcome),
            Err(mpsc::error::TrySendError::Full(_)) => Err(NodeError::Refused(
                Refusal::Overloaded("the request queue is full".into()),
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NodeError::Stopped),
        }
    }

    pub async fn propose_membership(
        &self,
        change: ConfChange,
        deadline: Instant,
    ) -> Result<Applied, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(NodeRequest::Membership { change, reply }, rx, deadline)
            .await
    }

    /// A read index from this leader's lease, if lease reads are on and the lease holds now:
    /// the state machine may answer a linearizable read once it has applied this far.
    pub fn lease_read_index(&self) -> Option<Index> {
        self.lease.read_index_at(Instant::now())
    }

    /// Waits until a linearizable read may be served from the local state machine.
    pub async fn read_index(&self, deadline: Instant) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(NodeRequest::Read { reply }, rx, deadline).await
    }

    /// Starts a leadership transfer to `to`, or to the most up-to-date follower among
    /// `among` (any voter if empty); returns the target.
    pub async fn transfer_leader(
        &self,
        to: Option<NodeId>,
        among: Vec<NodeId>,
        deadline: Instant,
    ) -> Result<NodeId, NodeError> {
        let (reply, rx) = oneshot::channel();
        let request = NodeRequest::TransferLeader { to, among, reply };
        self.call(request, rx, deadline).await
    }

    /// Asks for a snapshot at the applied index now (see [`NodeRequest::SaveSnapshot`]).
    pub async fn save_snapshot(&self) -> Result<(), NodeError> {
        self.requests
            .send(NodeRequest::SaveSnapshot)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Waits until the status satisfies `ready`, or the deadline passes.
    pub async fn wait_for(
        &self,
        deadline: Instant,
        ready: impl Fn(&NodeStatus) -> bool,
    ) -> Option<NodeStatus> {
        let mut status = self.status.clone();
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(remaining, status.wait_for(|s| ready(s)))
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|s| s.clone())
    }
}

/// Work for the apply thread, in log order.
#[derive(Debug)]
enum ApplyWork {
    Items(Vec<(Apply, Option<ProposalWaiter>)>),
    Snapshot,
}

/// From the apply thread to the raft task.
#[derive(Debug)]
enum SnapshotRequest {
    Meta {
        index: Index,
        reply: oneshot::Sender<Result<SnapshotMeta, String>>,
    },
    Saved(SnapshotMeta),
    Fatal(String),
}

/// The threads and task of a started node.
#[derive(Debug)]
pub struct RunningNode {
    pub handle: NodeHandle,
    raft_task: tokio::task::JoinHandle<()>,
    wal_thread: std::thread::JoinHandle<Result<(), StorageFailure>>,
    apply_thread: std::thread::JoinHandle<()>,
}

impl RunningNode {
    /// Waits until everything has stopped and the WAL is closed.
    pub async fn join(self) -> Result<(), String> {
        let _ = self.raft_task.await;
        let wal = tokio::task::spawn_blocking(move || {
            let wal = self.wal_thread.join();
            let _ = self.apply_thread.join();
            wal
        })
        .await
        .map_err(|e| e.to_string())?;
        match wal {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("closing the write-ahead log: {err}")),
            Err(_) => Err("the WAL thread panicked".into()),
        }
    }
}

/// Channel capacities.
const REQUESTS_QUEUE: usize = 4096;
const WAL_QUEUE: usize = 64;
const APPLY_QUEUE: usize = 64;

/// Everything `start` needs.
#[derive(Debug)]
pub struct NodeParts {
    pub options: NodeOptions,
    pub storage: Arc<dyn DurableStorage>,
    pub state: Arc<RwLock<StateMachine>>,
    pub router: PeerRouter,
    pub inbox: mpsc::Receiver<Message>,
    pub transport_events: mpsc::Receiver<TransportEvent>,
    pub events: Arc<dyn EventSink>,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
}

/// Starts the node. The state machine must hold what the core will not hand out again (its
/// applied index is passed to the core).
pub fn start(parts: NodeParts) -> Result<RunningNode, flotilla_raft::Error> {
    let applied = parts
        .state
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .applied_index();
    let raft = RaftNode::new(parts.options.raft.clone(), parts.storage.clone(), applied)?;
    let driver = Driver::new(raft, parts.options.proposals_max);
    let initial = status_of(&driver, false, false, None);
    let (status_tx, status_rx) = watch::channel(initial);
    let (requests_tx, requests_rx) = mpsc::channel(REQUESTS_QUEUE);
    let (wal_tx, wal_rx) = mpsc::channel(WAL_QUEUE);
    let (apply_tx, apply_rx) = mpsc::channel(APPLY_QUEUE);
    let (persisted_tx, persisted_rx) = watch::channel(None);
    let (applied_tx, applied_rx) = watch::channel(applied);
    let (snapshot_tx, snapshot_rx) = mpsc::channel(2);

    let wal_thread = {
        let storage = parts.storage.clone();
        let metrics = parts.metrics.clone();
        let fatal = snapshot_tx.clone();
        std::thread::Builder::new()
            .name("flotilla-wal".into())
            .spawn(move || wal_thread(&*storage, wal_rx, persisted_tx, fatal, &metrics))
            .expect("spawn the WAL thread")
    };
    let apply_thread = {
        let context = ApplyContext {
            storage: parts.storage.clone(),
            state: parts.state.clone(),
            events: parts.events.clone(),
            metrics: parts.metrics.clone(),
            limits: parts.options.limits.clone(),
            applied: applied_tx,
            snapshots: snapshot_tx,
            saving: Arc::default(),
        };
        std::thread::Builder::new()
            .name("flotilla-apply".into())
            .spawn(move || context.run(apply_rx))
            .expect("spawn the apply thread")
    };
    let lease = Arc::new(PublishedLease::default());
    let clock = TickClock::new(driver.node().ticks(), Instant::now());
    let raft_loop = RaftLoop {
        driver,
        clock,
        lease: lease.clone(),
        options: parts.options,
        router: parts.router,
        wal_tx,
        wal_backlog: VecDeque::new(),
        apply_tx,
        apply_backlog: VecDeque::new(),
        status: status_tx,
        metrics: parts.metrics.clone(),
        role: None,
        removed: false,
        fatal: None,
        snapshots_deferred: 0,
    };
    let raft_task = tokio::spawn(raft_loop.run(RaftInputs {
        requests: requests_rx,
        inbox: parts.inbox,
        transport_events: parts.transport_events,
        persisted: persisted_rx,
        applied: applied_rx,
        snapshots: snapshot_rx,
        shutdown: parts.shutdown,
    }));
    let handle = NodeHandle {
        requests: requests_tx,
        status: status_rx,
        state: parts.state,
        storage: parts.storage,
        metrics: parts.metrics,
        lease,
    };
    Ok(RunningNode {
        handle,
        raft_task,
        wal_thread,
        apply_thread,
    })
}

fn status_of(
    driver: &NodeDriver,
    removed: bool,
    stopped: bool,
    fatal: Option<String>,
) -> NodeStatus {
    let node = driver.node();
    NodeStatus {
        id: node.id(),
        role: node.role(),
        term: node.term(),
        leader: node.leader(),
        commit: node.committed(),
        applied: node.applied(),
        last_index: node.last_id().index,
        snapshot_index: node.snapshot_id().index,
        is_learner: node.membership().is_learner(node.id()),
        removed,
        stopped,
        fatal,
    }
}

// ----- The raft task ---------------------------------------------------------------------

struct RaftInputs {
    requests: mpsc::Receiver<NodeRequest>,
    inbox: mpsc::Receiver<Message>,
    transport_events: mpsc::Receiver<TransportEvent>,
    persisted: watch::Receiver<Option<PersistId>>,
    applied: watch::Receiver<Index>,
    snapshots: mpsc::Receiver<SnapshotRequest>,
    shutdown: watch::Receiver<bool>,
}

struct RaftLoop {
    driver: NodeDriver,
    /// When recent ticks began, to turn the core's lease into a deadline.
    clock: TickClock,
    /// The lease as the handlers see it; updated before each round's messages leave.
    lease: Arc<PublishedLease>,
    options: NodeOptions,
    router: PeerRouter,
    wal_tx: mpsc::Sender<PersistBatch>,
    wal_backlog: VecDeque<PersistBatch>,
    apply_tx: mpsc::Sender<ApplyWork>,
    apply_backlog: VecDeque<ApplyWork>,
    status: watch::Sender<NodeStatus>,
    metrics: Arc<Metrics>,
    role: Option<RoleState>,
    removed: bool,
    fatal: Option<String>,
    /// Snapshot policy signals this leader let pass (see `on_snapshot_due`).
    snapshots_deferred: u32,
}

/// How many snapshot policy signals a leader lets pass before it saves a snapshot.
const LEADER_SNAPSHOT_DEFERRALS: u32 = 2;

/// Batches waiting for the WAL or the apply thread beyond their channels before the raft task
/// stops taking messages and requests.
const BACKLOG_BATCHES_MAX: usize = 256;

/// Inputs drained in one round before the output is taken, so that a burst of proposals
/// becomes one append and one fsync.
const ROUND_INPUTS_MAX: usize = 512;

impl RaftLoop {
    async fn run(mut self, mut inputs: RaftInputs) {
        let mut ticker = tokio::time::interval(self.options.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Clones, so that waiting for room in a channel does not borrow `self`.
        let wal_tx = self.wal_tx.clone();
        let apply_tx = self.apply_tx.clone();
        loop {
            // While the WAL or the apply thread is far behind, take no new work: the peer
            // streams and the clients wait (back-pressure) instead of the backlogs growing.
            let accepting = self.wal_backlog.len() < BACKLOG_BATCHES_MAX
                && self.apply_backlog.len() < BACKLOG_BATCHES_MAX;
            // Not biased: under load the inbox and the requests are always ready, and a fixed
            // order would starve whatever comes after them (the ticker, the other one).
            let outcome = tokio::select! {
                _ = inputs.shutdown.wait_for(|stop| *stop) => break,
                Ok(()) = inputs.persisted.changed() => {
                    let id = *inputs.persisted.borrow_and_update();
                    id.map_or(Ok(()), |id| self.driver.persisted(id))
                }
                Ok(()) = inputs.applied.changed() => {
                    let index = *inputs.applied.borrow_and_update();
                    self.driver.applied(index)
                }
                Some(request) = inputs.snapshots.recv() => {
                    let index = *inputs.applied.borrow_and_update();
                    self.driver.applied(index).map(|()| self.on_snapshot_request(request))
                }
                permit = wal_tx.reserve(), if !self.wal_backlog.is_empty() => {
                    if let Ok(permit) = permit {
                        permit.send(self.wal_backlog.pop_front().expect("not empty"));
                    }
                    Ok(())
                }
                permit = apply_tx.reserve(), if !self.apply_backlog.is_empty() => {
                    if let Ok(permit) = permit {
                        permit.send(self.apply_backlog.pop_front().expect("not empty"));
                    }
                    Ok(())
                }
                Some(msg) = inputs.inbox.recv(), if accepting => {
                    self.on_messages(msg, &mut inputs.inbox)
                }
                Some(request) = inputs.requests.recv(), if accepting => {
                    self.on_request(request);
                    for _ in 0..ROUND_INPUTS_MAX {
                        match inputs.requests.try_recv() {
                            Ok(request) => self.on_request(request),
                            Err(_) => break,
                        }
                    }
                    Ok(())
                }
                Some(event) = inputs.transport_events.recv() => {
                    self.on_transport_event(event);
                    Ok(())
                }
                _ = ticker.tick() => {
                    // Read the clock first: what the core sends in this tick leaves later.
                    let now = Instant::now();
                    let ticked = self.driver.tick();
                    self.clock.record(self.driver.node().ticks(), now);
                    ticked
                }
            };
            if let Err(err) = outcome.and_then(|()| self.carry_out()) {
                self.fail(format!("the Raft core stopped: {err}"));
            }
            self.publish_lease();
            self.publish_status(false);
            if self.removed || self.fatal.is_some() {
                break;
            }
        }
        self.stop();
    }

    fn fail(&mut self, reason: String) {
        tracing::error!("{reason}");
        self.fatal.get_or_insert(reason);
    }

    fn on_messages(
        &mut self,
        first: Message,
        inbox: &mut mpsc::Receiver<Message>,
    ) -> Result<(), flotilla_raft::Error> {
        self.driver.step(first)?;
        for _ in 0..ROUND_INPUTS_MAX {
            match inbox.try_recv() {
                Ok(msg) => self.driver.step(msg)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn on_request(&mut self, request: NodeRequest) {
        match request {
            NodeRequest::Propose { data, reply } => {
                if let Some(refusal) = self.backlog_refusal() {
                    let _ = reply.send(Err(refusal));
                    return;
                }
                if let Err((reply, refusal)) = self.driver.propose(data, reply) {
                    self.metrics
                        .proposals_failed
                        .fetch_add(1, Ordering::Relaxed);
                    let _ = reply.send(Err(refusal));
                }
            }
            NodeRequest::Membership { change, reply } => {
                if let Err((reply, refusal)) = self.driver.propose_membership(change, reply) {
                    let _ = reply.send(Err(refusal));
                }
            }
            NodeRequest::Read { reply } => {
                if let Err((reply, refusal)) = self.driver.read(reply) {
                    let _ = reply.send(Err(refusal));
                }
            }
            NodeRequest::TransferLeader { to, among, reply } => {
                let target = to.or_else(|| self.driver.most_up_to_date_follower(&among));
                let result = match target {
                    None => Err(Refusal::Overloaded("no follower to hand over to".into())),
                    Some(target) => self.driver.transfer_leader(target).map(|()| target),
                };
                let _ = reply.send(result);
            }
            NodeRequest::SaveSnapshot => {
                self.snapshots_deferred = 0;
                self.queue_apply(ApplyWork::Snapshot);
            }
        }
    }

    /// etcd refuses proposals while the apply backlog is long ("too many requests").
    fn backlog_refusal(&self) -> Option<Refusal> {
        let node = self.driver.node();
        let backlog = node.committed().saturating_sub(node.applied());
        (backlog > self.options.apply_backlog_entries_max)
            .then(|| Refusal::Overloaded(format!("{backlog} committed entries not yet applied")))
    }

    fn on_transport_event(&mut self, event: TransportEvent) {
        match event {
            TransportEvent::Unreachable(peer) => self.driver.report_unreachable(peer),
            TransportEvent::Removed { by } => {
                tracing::warn!(
                    peer = by,
                    "a peer says this member was removed from the cluster; stopping"
                );
                self.removed = true;
            }
        }
    }

    fn on_snapshot_request(&mut self, request: SnapshotRequest) {
        match request {
            SnapshotRequest::Meta { index, reply } => {
                let meta = self.driver.snapshot_meta(index).map_err(|e| e.to_string());
                let _ = reply.send(meta);
            }
            SnapshotRequest::Saved(meta) => {
                if let Err(err) = self.driver.snapshot_saved(&meta) {
                    tracing::warn!("the core did not take snapshot {}: {err}", meta.last);
                } else {
                    self.metrics.snapshots_saved.fetch_add(1, Ordering::Relaxed);
                }
            }
            SnapshotRequest::Fatal(reason) => self.fail(reason),
        }
    }

    /// Carries out the core's output until it has nothing more to say.
    fn carry_out(&mut self) -> Result<(), flotilla_raft::Error> {
        for _ in 0..8 {
            let actions = self.driver.take_actions()?;
            if actions.is_empty() {
                break;
            }
            self.dispatch(actions);
        }
        Ok(())
    }

    fn dispatch(&mut self, actions: Actions<ProposalWaiter, ReadWaiter>) {
        // Before any message leaves: a TimeoutNow among them must find the lease withdrawn.
        self.publish_lease();
        if let Some(state) = actions.role_state {
            self.on_role_state(state);
        }
        // Persist first, then send: the core already holds back what must wait for the fsync.
        if let Some(batch) = actions.persist {
            self.queue_wal(batch);
        }
        for msg in actions.messages {
            if !self.router.send(msg) {
                self.metrics
                    .peer_messages_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if !actions.apply.is_empty() {
            let last = actions.apply.last().map(|(item, _)| item.index());
            self.metrics
                .commit_index
                .store(self.driver.node().committed(), Ordering::Relaxed);
            self.queue_apply(ApplyWork::Items(actions.apply));
            tracing::trace!(?last, "handed entries to the apply thread");
        }
        for (waiter, refusal) in actions.proposals_failed {
            self.metrics
                .proposals_failed
                .fetch_add(1, Ordering::Relaxed);
            let _ = waiter.send(Err(refusal));
        }
        for waiter in actions.reads_ready {
            let _ = waiter.send(Ok(()));
        }
        for (waiter, refusal) in actions.reads_failed {
            let _ = waiter.send(Err(refusal));
        }
        if actions.snapshot_due {
            self.on_snapshot_due();
        }
        if actions.removed {
            tracing::warn!("this member was removed from the cluster; stopping");
            self.removed = true;
        }
    }

    /// Saving a snapshot pauses apply while the state is encoded, and every member reaches
    /// the policy at the same index. A follower's pause delays no write, the leader's delays
    /// them all: so the leader lets the policy pass a few times (the core asks again after
    /// each policy's worth of log) before it pauses too, keeping a longer log meanwhile.
    fn on_snapshot_due(&mut self) {
        if self.driver.node().is_leader() && self.snapshots_deferred < LEADER_SNAPSHOT_DEFERRALS {
            self.snapshots_deferred += 1;
            tracing::debug!(
                deferred = self.snapshots_deferred,
                "the leader defers its snapshot"
            );
            return;
        }
        self.snapshots_deferred = 0;
        self.queue_apply(ApplyWork::Snapshot);
    }

    fn queue_wal(&mut self, batch: PersistBatch) {
        if self.wal_backlog.is_empty() {
            match self.wal_tx.try_send(batch) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(batch)) => self.wal_backlog.push_back(batch),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.fail("the WAL thread stopped".into())
                }
            }
        } else {
            self.wal_backlog.push_back(batch);
        }
    }

    fn queue_apply(&mut self, work: ApplyWork) {
        if self.apply_backlog.is_empty() {
            match self.apply_tx.try_send(work) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(work)) => self.apply_backlog.push_back(work),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.fail("the apply thread stopped".into())
                }
            }
        } else {
            self.apply_backlog.push_back(work);
        }
    }

    fn on_role_state(&mut self, state: RoleState) {
        let leader_before = self.role.map(|r| r.leader);
        if leader_before != Some(state.leader) && state.leader != flotilla_raft::NODE_NONE {
            self.metrics.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
        let m = &self.metrics;
        m.is_leader
            .store(u64::from(state.role == Role::Leader), Ordering::Relaxed);
        m.has_leader.store(
            u64::from(state.leader != flotilla_raft::NODE_NONE),
            Ordering::Relaxed,
        );
        m.term.store(state.term, Ordering::Relaxed);
        tracing::info!(
            role = %state.role,
            term = state.term,
            leader = format!("{:x}", state.leader),
            "raft role changed"
        );
        self.role = Some(state);
    }

    /// Publishes the core's lease as a real-time deadline, or withdraws it.
    fn publish_lease(&self) {
        let Some(duration) = self.options.lease_duration else {
            return;
        };
        let lease = self.driver.node().lease_read_index().and_then(|lease| {
            read_lease::deadline_of(lease, &self.clock, duration).map(|deadline| Lease {
                index: lease.index,
                deadline,
            })
        });
        self.lease.publish(lease);
    }

    fn publish_status(&self, stopped: bool) {
        let status = status_of(&self.driver, self.removed, stopped, self.fatal.clone());
        self.metrics
            .proposals_pending
            .store(self.driver.pending_proposals() as u64, Ordering::Relaxed);
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }

    /// Fails every waiting client and lets the threads finish: closing the channels makes the
    /// WAL thread sync and close the log, and the apply thread return.
    fn stop(mut self) {
        let (proposals, reads) = self.driver.drain_waiters();
        for waiter in proposals {
            let _ = waiter.send(Err(Refusal::Stopped));
        }
        for waiter in reads {
            let _ = waiter.send(Err(Refusal::Stopped));
        }
        self.lease.publish(None);
        self.publish_status(true);
        self.router.shutdown();
    }
}

// ----- The WAL thread --------------------------------------------------------------------

/// Writes every batch waiting, then makes them all durable with one fsync (group commit).
/// Obsolete files are unlinked by a reaper thread beside it: unlinking a large snapshot or a
/// preallocated segment took 40–60 ms, and on this thread every write waited for it.
fn wal_thread(
    storage: &dyn DurableStorage,
    batches: mpsc::Receiver<PersistBatch>,
    persisted: watch::Sender<Option<PersistId>>,
    fatal: mpsc::Sender<SnapshotRequest>,
    metrics: &Metrics,
) -> Result<(), StorageFailure> {
    std::thread::scope(|scope| {
        let (reap_tx, reap_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let reaper = std::thread::Builder::new()
            .name("flotilla-wal-reap".into())
            .spawn_scoped(scope, move || {
                lower_this_threads_priority();
                while reap_rx.recv().is_ok() {
                    if let Err(err) = storage.reap() {
                        // The log is marked failed: the WAL thread stops at its next step.
                        tracing::error!("cannot remove obsolete log files: {err}");
                        return;
                    }
                }
            });
        if let Err(err) = reaper {
            return Err(StorageFailure(format!(
                "cannot start the reaper thread: {err}"
            )));
        }
        write_and_sync(storage, batches, &persisted, &fatal, metrics, &reap_tx)
        // The reaper sees its channel closed and finishes before the scope ends.
    })?;
    storage.close()
}

fn write_and_sync(
    storage: &dyn DurableStorage,
    mut batches: mpsc::Receiver<PersistBatch>,
    persisted: &watch::Sender<Option<PersistId>>,
    fatal: &mpsc::Sender<SnapshotRequest>,
    metrics: &Metrics,
    reap: &std::sync::mpsc::SyncSender<()>,
) -> Result<(), StorageFailure> {
    let result = (|| {
        while let Some(batch) = batches.blocking_recv() {
            storage.write(&batch)?;
            while let Ok(batch) = batches.try_recv() {
                storage.write(&batch)?;
            }
            let started = Instant::now();
            let durable = storage.sync()?;
            metrics.wal_fsync.observe(started.elapsed());
            if durable.is_some() {
                persisted.send_replace(durable);
            }
            // Only now, with the writers acknowledged: the next segment's creation has an
            // fsync of its own.
            storage.prepare_ahead()?;
            if storage.has_reapable() {
                // Full means the reaper is already asked: it takes everything queued.
                let _ = reap.try_send(());
            }
        }
        Ok(())
    })();
    if let Err(err) = &result {
        let _ = fatal.blocking_send(SnapshotRequest::Fatal(format!(
            "the write-ahead log failed: {err}"
        )));
    }
    result
}

// ----- The apply thread ------------------------------------------------------------------

struct ApplyContext {
    storage: Arc<dyn DurableStorage>,
    state: Arc<RwLock<StateMachine>>,
    events: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
    limits: Limits,
    applied: watch::Sender<Index>,
    snapshots: mpsc::Sender<SnapshotRequest>,
    /// A snapshot is being saved in the background.
    saving: Arc<std::sync::atomic::AtomicBool>,
}

impl ApplyContext {
    fn run(self, mut work: mpsc::Receiver<ApplyWork>) {
        while let Some(item) = work.blocking_recv() {
            let result = match item {
                ApplyWork::Items(items) => self.apply(items),
                ApplyWork::Snapshot => self.snapshot(),
            };
            if let Err(reason) = result {
                let _ = self.snapshots.blocking_send(SnapshotRequest::Fatal(reason));
                return;
            }
        }
    }

    fn apply(&self, items: Vec<(Apply, Option<ProposalWaiter>)>) -> Result<(), String> {
        let mut replies = Vec::new();
        let mut last = None;
        let mut state = Some(self.state.write().unwrap_or_else(|p| p.into_inner()));
        for (item, waiter) in items {
            last = Some(item.index());
            match item {
                Apply::Entry(entry) => {
                    let state = state.get_or_insert_with(|| {
                        self.state.write().unwrap_or_else(|p| p.into_inner())
                    });
                    let applied = state.apply_entry(&entry);
                    match &applied {
                        Applied::Kv(result) => self.observe(result),
                        Applied::Auth {
                            outcome: Ok(auth), ..
                        } => self.events.auth_applied(auth),
                        _ => {}
                    }
                    if let Some(waiter) = waiter {
                        replies.push((waiter, applied));
                    }
                }
                Apply::Snapshot(meta) => {
                    // Restore without holding the lock (readers and the transport go on), then
                    // swap the new state in.
                    state = None;
                    let restored = self.restore(&meta)?;
                    let mut replaced = self.state.write().unwrap_or_else(|p| p.into_inner());
                    let previous_revision = replaced.kv.current_revision();
                    *replaced = restored;
                    self.events.state_replaced(previous_revision);
                    drop(replaced);
                    self.metrics
                        .snapshots_restored
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        drop(state);
        if let Some(index) = last {
            self.metrics.apply_index.store(index, Ordering::Relaxed);
            self.applied.send_replace(index);
        }
        self.metrics
            .proposals_committed
            .fetch_add(replies.len() as u64, Ordering::Relaxed);
        for (waiter, applied) in replies {
            let _ = waiter.send(Ok(applied));
        }
        Ok(())
    }

    /// Tells the observers (watch hub, lessor) what one applied entry did. Called with the
    /// state's write lock held.
    fn observe(&self, result: &flotilla_kv::ApplyResult) {
        if !result.events.is_empty() {
            self.events.publish(result.revision, &result.events);
        }
        if let Ok(flotilla_kv::Response::LeaseGrant(grant)) = &result.outcome
            && !result.duplicate
        {
            self.events.lease_granted(grant.id, grant.ttl);
        }
    }

    fn restore(&self, meta: &SnapshotMeta) -> Result<StateMachine, String> {
        let mut reader = SnapshotReader::new(&*self.storage, meta.last);
        let restored = StateMachine::restore(&mut reader, self.limits.clone())
            .map_err(|e| format!("restoring snapshot {}: {e}", meta.last))?;
        if restored.applied_index() != meta.last.index {
            return Err(format!(
                "snapshot {} holds a state machine at index {}",
                meta.last,
                restored.applied_index()
            ));
        }
        tracing::info!(snapshot = %meta.last, "restored the state machine from a snapshot");
        Ok(restored)
    }

    /// Saves a snapshot at the applied index, streamed from the state machine into storage.
    ///
    /// The state is pinned at the applied index (a point-in-time view: see
    /// [`StateMachine::begin_snapshot`]) and a background thread encodes it in steps of
    /// [`PIPE_CHUNK_BYTES`], each under the state's read lock, into a bounded pipe that another
    /// thread streams into storage. Apply goes on at once: it waits at most for one step's
    /// encoding, never for the whole state or the disk, and there is no second copy of the
    /// state in memory. One snapshot at a time.
    fn snapshot(&self) -> Result<(), String> {
        if self.saving.load(Ordering::Acquire) {
            return Ok(());
        }
        let index = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .applied_index();
        let current = self
            .storage
            .snapshot_info()
            .map_or(0, |s| s.meta.last.index);
        if index <= current {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        if self
            .snapshots
            .blocking_send(SnapshotRequest::Meta { index, reply })
            .is_err()
        {
            return Ok(()); // stopping
        }
        let meta = match answer.blocking_recv() {
            Ok(Ok(meta)) => meta,
            Ok(Err(reason)) => {
                tracing::warn!("no snapshot at {index}: {reason}");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        // Only this thread applies, so the state is still at `index`.
        let cursor = self
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .begin_snapshot();
        self.saving.store(true, Ordering::Release);
        let saver = SnapshotSaver {
            storage: self.storage.clone(),
            snapshots: self.snapshots.clone(),
            metrics: self.metrics.clone(),
        };
        let encoder = SnapshotEncoder {
            state: self.state.clone(),
            saving: self.saving.clone(),
        };
        let started = std::thread::Builder::new()
            .name("flotilla-snapshot-encode".into())
            .spawn(move || encoder.run(cursor, meta, saver));
        // Fatal: the node stops (and the state stays pinned, which nothing then notices).
        started
            .map(drop)
            .map_err(|err| format!("cannot start the snapshot encoder: {err}"))
    }
}

/// The nice value of the snapshot threads. Encoding a large state takes a core for a while;
/// at the default priority, on a machine whose cores the member's other threads already keep
/// busy, the scheduler then left the apply and WAL threads waiting for tens of milliseconds.
/// At 10 a snapshot gets about a tenth of a contended core (all of an idle one) and so still
/// ends; the log it lets go of is held a little longer.
const SNAPSHOT_THREAD_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`SNAPSHOT_THREAD_NICE`] (on Linux a nice value
/// belongs to the thread). A failure only costs latency, so it is logged, not fatal.
pub(crate) fn lower_this_threads_priority() {
    if let Err(err) = rustix::process::nice(SNAPSHOT_THREAD_NICE) {
        tracing::debug!("the snapshot thread keeps its priority: {err}");
    }
}

/// Encodes a pinned state in steps into the pipe a [`SnapshotSaver`] streams into storage, then
/// releases the pin and, once the saver is done, lets the next snapshot begin.
struct SnapshotEncoder {
    state: Arc<RwLock<StateMachine>>,
    saving: Arc<std::sync::atomic::AtomicBool>,
}

impl SnapshotEncoder {
    fn run(self, mut cursor: StateSnapshotCursor, meta: SnapshotMeta, saver: SnapshotSaver) {
        lower_this_threads_priority();
        let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel(4);
        let saver = std::thread::Builder::new()
            .name("flotilla-snapshot-save".into())
            .spawn(move || {
                lower_this_threads_priority();
                saver.save(meta, chunks_rx)
            });
        match saver {
            Ok(saver) => {
                let end = match self.encode(&mut cursor, &chunks_tx) {
                    Ok(()) => PipeChunk::End,
                    Err(err) => PipeChunk::Failed(err.to_string()),
                };
                self.release(cursor);
                let _ = chunks_tx.send(end);
                let _ = saver.join();
            }
            Err(err) => {
                tracing::warn!("no snapshot: cannot start the snapshot saver: {err}");
                self.release(cursor);
            }
        }
        self.saving.store(false, Ordering::Release);
    }

    /// Sends the snapshot a step at a time; the read lock is held for one step's encoding
    /// only, never while the pipe is full.
    fn encode(
        &self,
        cursor: &mut StateSnapshotCursor,
        chunks: &std::sync::mpsc::SyncSender<PipeChunk>,
    ) -> io::Result<()> {
        loop {
            let mut chunk = Vec::with_capacity(PIPE_CHUNK_BYTES + (PIPE_CHUNK_BYTES >> 2));
            let done = self
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .continue_snapshot(cursor, &mut chunk, PIPE_CHUNK_BYTES)?;
            chunks
                .send(PipeChunk::Data(Bytes::from(chunk)))
                .map_err(|_| io::Error::other("the snapshot saver stopped early"))?;
            if done {
                return Ok(());
            }
        }
    }

    fn release(&self, cursor: StateSnapshotCursor) {
        self.state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .end_snapshot(cursor);
    }
}

/// Streams an encoded snapshot into storage and tells the raft task.
struct SnapshotSaver {
    storage: Arc<dyn DurableStorage>,
    snapshots: mpsc::Sender<SnapshotRequest>,
    metrics: Arc<Metrics>,
}

impl SnapshotSaver {
    fn save(self, meta: SnapshotMeta, chunks: std::sync::mpsc::Receiver<PipeChunk>) {
        let started = Instant::now();
        let mut reader = PipeReader {
            rx: chunks,
            chunk: Bytes::new(),
            ended: false,
        };
        match self.storage.save_snapshot(&meta, &mut reader) {
            Ok(()) => {
                self.metrics.snapshot_save.observe(started.elapsed());
                tracing::info!(snapshot = %meta.last, elapsed = ?started.elapsed(), "saved a snapshot");
                let _ = self.snapshots.blocking_send(SnapshotRequest::Saved(meta));
            }
            // Not fatal here: a newer snapshot may have been installed meanwhile, and a failure
            // of the storage itself stops the WAL, which stops the node on its next write.
            Err(err) => tracing::warn!(snapshot = %meta.last, "snapshot not saved: {err}"),
        }
    }
}

const PIPE_CHUNK_BYTES: usize = 256 << 10;

enum PipeChunk {
    Data(Bytes),
    End,
    Failed(String),
}

/// Reads what a [`SnapshotEncoder`] sent; the end of data is an explicit marker, so a writer that
/// dies half way is an error, never a short snapshot.
struct PipeReader {
    rx: std::sync::mpsc::Receiver<PipeChunk>,
    chunk: Bytes,
    ended: bool,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(PipeChunk::Data(data)) => self.chunk = data,
                Ok(PipeChunk::End) => self.ended = true,
                Ok(PipeChunk::Failed(reason)) => return Err(io::Error::other(reason)),
                Err(_) => return Err(io::Error::other("the snapshot writer stopped early")),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use flotilla_kv::Command;
    use flotilla_proto::etcdserverpb::PutRequest;
    use flotilla_raft::{Entry, EntryId, EntryPayload, LogStorage, MemStorage, Membership};

    use super::*;
    use crate::members::MemberTable;
    use crate::state_machine::NoWatchers;
    use crate::storage::MemDurable;

    /// Storage whose snapshot saving waits until the test lets it go on.
    #[derive(Debug)]
    struct HeldSnapshots {
        inner: MemDurable,
        go: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl LogStorage for HeldSnapshots {
        fn initial_state(
            &self,
        ) -> Result<flotilla_raft::InitialState, flotilla_raft::StorageError> {
            self.inner.initial_state()
        }
        fn first_index(&self) -> Index {
            self.inner.first_index()
        }
        fn last_index(&self) -> Index {
            self.inner.last_index()
        }
        fn term(&self, index: Index) -> Result<flotilla_raft::Term, flotilla_raft::StorageError> {
            self.inner.term(index)
        }
        fn entries(
            &self,
            low: Index,
            high: Index,
            bytes_max: u64,
        ) -> Result<Vec<Entry>, flotilla_raft::StorageError> {
            self.inner.entries(low, high, bytes_max)
        }
        fn snapshot_chunk(
            &self,
            last: EntryId,
            offset: u64,
            bytes_max: u64,
        ) -> Result<Bytes, flotilla_raft::StorageError> {
            self.inner.snapshot_chunk(last, offset, bytes_max)
        }
        fn snapshot_info(&self) -> Option<flotilla_raft::SnapshotInfo> {
            self.inner.snapshot_info()
        }
    }

    impl DurableStorage for HeldSnapshots {
        fn write(
            &self,
            batch: &flotilla_raft::PersistBatch,
        ) -> Result<(), crate::storage::StorageFailure> {
            self.inner.write(batch)
        }
        fn sync(&self) -> Result<Option<flotilla_raft::PersistId>, crate::storage::StorageFailure> {
            self.inner.sync()
        }
        fn save_snapshot(
            &self,
            meta: &SnapshotMeta,
            data: &mut dyn Read,
        ) -> Result<(), crate::storage::StorageFailure> {
            let _ = self.go.lock().unwrap().recv();
            self.inner.save_snapshot(meta, data)
        }
        fn close(&self) -> Result<(), crate::storage::StorageFailure> {
            self.inner.close()
        }
    }

    fn put_entry(index: Index, key: usize) -> Apply {
        let put = Command::put(PutRequest {
            key: format!("key-{key:06}").into(),
            value: vec![b'v'; 1024].into(),
            ..Default::default()
        });
        Apply::Entry(Entry {
            term: 1,
            index,
            payload: EntryPayload::Command(put.encode()),
        })
    }

    /// The point-in-time view at work: while a snapshot of several megabytes cannot reach the
    /// disk at all, entries go on applying, and the snapshot saved afterwards is the state at
    /// the index it was taken at, not later.
    #[test]
    fn apply_goes_on_while_a_snapshot_is_being_saved() {
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let storage = Arc::new(HeldSnapshots {
            inner: MemDurable::new(MemStorage::new_with_membership(Membership::with_voters([
                1,
            ]))),
            go: Mutex::new(go_rx),
        });
        let state = Arc::new(RwLock::new(StateMachine::new(
            Limits::default(),
            MemberTable::default(),
        )));
        let (applied_tx, mut applied_rx) = watch::channel(0);
        let (snapshots_tx, mut snapshots_rx) = mpsc::channel(2);
        let context = ApplyContext {
            storage: storage.clone(),
            state: state.clone(),
            events: Arc::new(NoWatchers),
            metrics: Arc::new(Metrics::default()),
            limits: Limits::default(),
            applied: applied_tx,
            snapshots: snapshots_tx,
            saving: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let (work_tx, work_rx) = mpsc::channel(8);
        let apply_thread = std::thread::spawn(move || context.run(work_rx));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();

        // 8 MiB of state: far more than the pipe to the blocked saver holds.
        let before: Vec<_> = (1..=8192)
            .map(|i| (put_entry(i, i as usize), None))
            .collect();
        work_tx.blocking_send(ApplyWork::Items(before)).unwrap();
        work_tx.blocking_send(ApplyWork::Snapshot).unwrap();
        let Some(SnapshotRequest::Meta { index, reply }) = snapshots_rx.blocking_recv() else {
            panic!("the apply thread asked for no snapshot metadata");
        };
        assert_eq!(index, 8192);
        let meta = SnapshotMeta {
            last: EntryId { term: 1, index },
            membership: Membership::with_voters([1]),
        };
        reply.send(Ok(meta.clone())).unwrap();

        let after: Vec<_> = (8193..=8292).map(|i| (put_entry(i, 1), None)).collect();
        work_tx.blocking_send(ApplyWork::Items(after)).unwrap();
        // Bounded so that an apply thread stuck behind the snapshot fails the test, not hangs it.
        let applied = runtime.block_on(async {
            let wait = applied_rx.wait_for(|&applied| applied == 8292);
            tokio::time::timeout(Duration::from_secs(60), wait).await
        });
        assert!(
            matches!(applied, Ok(Ok(_))),
            "apply waited for the snapshot to reach the disk"
        );
        assert!(
            storage.snapshot_info().is_none(),
            "the snapshot is still held back"
        );

        go_tx.send(()).unwrap();
        let Some(SnapshotRequest::Saved(saved)) = snapshots_rx.blocking_recv() else {
            panic!("the snapshot was not saved");
        };
        assert_eq!(saved, meta);
        let mut reader = SnapshotReader::new(&*storage, meta.last);
        let restored = StateMachine::restore(&mut reader, Limits::default()).unwrap();
        assert_eq!(restored.applied_index(), 8192);
        let read = |machine: &StateMachine| {
            machine
                .kv
                .range(&flotilla_proto::etcdserverpb::RangeRequest {
                    key: "key-000001".into(),
                    ..Default::default()
                })
                .unwrap()
                .kvs[0]
                .mod_revision
        };
        assert_eq!(
            read(&restored),
            2,
            "the snapshot holds the state at its index"
        );
        assert_eq!(read(&state.read().unwrap()), 8293);
        drop(work_tx);
        apply_thread.join().unwrap();
    }
}
