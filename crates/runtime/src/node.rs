//! The tokio shell around the [`Driver`]: one task runs the core, one thread writes and syncs
//! the WAL (group commit), one thread applies committed entries to the state machine.
//!
//! ```text
//!   ticker ─┐                    ┌─► WAL thread: write batches, one fsync for all ─► persisted
//!   peers ──┼─► raft task ───────┼─► transport (at once, in parallel with the fsync)
//!   handles ┘   (Driver)         └─► apply thread: state machine, answer proposals ─► applied
//! ```
//!
//! Every channel is bounded. The raft task never blocks on a slow consumer: batches for the WAL
//! and the apply thread wait in its own queues while their channels are full, and it refuses
//! new proposals ("too many requests") while the apply backlog is too long. The WAL and apply
//! threads report progress through `watch` channels, which hold only the latest value and so
//! can never fill up.
//!
//! One concept per file: this one holds the handle the application uses and starts the rest;
//! `raft_loop.rs` is the raft task, `wal_thread.rs` the WAL thread, `apply.rs` the apply thread
//! and `snapshot_pipe.rs` the threads that encode a pinned state into a snapshot beside it.

mod apply;
mod forwarded;
mod raft_loop;
mod snapshot_pipe;
pub mod view;
mod wal_thread;

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raft::{ConfChange, Index, Message, NodeId, RaftNode, Role, SnapshotMeta};
use tokio::sync::{mpsc, oneshot, watch};

use self::apply::ApplyContext;
use self::forwarded::ForwardedWrites;
pub use self::forwarded::TrackedWrite;
use self::raft_loop::{RaftInputs, RaftLoop};
pub use self::snapshot_pipe::paced;
use self::wal_thread::wal_thread;
use crate::driver::{Driver, Refusal};
use crate::metrics::NodeMetrics;
use crate::read_lease::{PublishedLease, TickClock};
use crate::state_machine::StateMachine;
use crate::storage::{DurableStorage, StorageFailure};
use crate::transport::{Transport, TransportEvent};

/// Where the outcome of a proposal goes: the output of its entry, or why it failed.
pub(crate) type ProposalWaiter<O> = oneshot::Sender<Result<O, Refusal>>;
/// Where a read barrier's outcome goes.
pub(crate) type ReadWaiter = oneshot::Sender<Result<(), Refusal>>;
type NodeDriver<O> = Driver<Arc<dyn DurableStorage>, ProposalWaiter<O>, ReadWaiter>;

/// Requests from the application (a [`NodeHandle`]) to the raft task; `O` is the state
/// machine's output.
#[derive(Debug)]
pub(crate) enum NodeRequest<O> {
    Propose {
        data: Bytes,
        reply: ProposalWaiter<O>,
    },
    Membership {
        change: ConfChange,
        reply: ProposalWaiter<O>,
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
    /// This member.
    pub id: NodeId,
    /// Follower, pre-candidate, candidate or leader.
    pub role: Role,
    /// The current term (§5.1).
    pub term: u64,
    /// The leader of the current term, if this member knows it.
    pub leader: Option<NodeId>,
    /// The highest index known to be committed.
    pub commit: Index,
    /// The highest index the state machine has applied.
    pub applied: Index,
    /// The last index of the local log.
    pub last_index: Index,
    /// The index of the newest snapshot the core holds (0 before the first).
    pub snapshot_index: Index,
    /// This member is a learner: it replicates the log but does not vote.
    pub is_learner: bool,
    /// This member was removed from the cluster; it is stopping.
    pub removed: bool,
    /// The raft task has stopped (shutdown, removal or a fatal error).
    pub stopped: bool,
    /// Why the node stopped on its own, if it did.
    pub fatal: Option<String>,
}

/// The part of [`NodeStatus`] that changes only with elections and the member's life: what a
/// long-lived waiter on the role or the leader watches, so that it is not woken by every
/// commit (the full status changes several times per write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleStatus {
    /// As [`NodeStatus::role`].
    pub role: Role,
    /// As [`NodeStatus::term`].
    pub term: u64,
    /// As [`NodeStatus::leader`].
    pub leader: Option<NodeId>,
    /// As [`NodeStatus::is_learner`].
    pub is_learner: bool,
    /// As [`NodeStatus::removed`].
    pub removed: bool,
    /// As [`NodeStatus::stopped`].
    pub stopped: bool,
    /// As [`NodeStatus::fatal`].
    pub fatal: Option<String>,
}

impl RoleStatus {
    /// The role part of `status`.
    pub fn of(status: &NodeStatus) -> RoleStatus {
        RoleStatus {
            role: status.role,
            term: status.term,
            leader: status.leader,
            is_learner: status.is_learner,
            removed: status.removed,
            stopped: status.stopped,
            fatal: status.fatal.clone(),
        }
    }
}

/// Timing and bounds of the shell.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The core's configuration: this member's id, election timeout and heartbeat in ticks,
    /// pre-vote, check-quorum, flow control, snapshot policy, lease reads.
    pub raft: flotilla_raft::Config,
    /// One tick of the core.
    pub tick: Duration,
    /// Proposals are refused while more entries than this are committed and not applied
    /// (etcd's "too many requests").
    pub apply_backlog_entries_max: u64,
    /// Proposals waiting for their entries to commit before new ones are refused.
    pub proposals_max: usize,
    /// A proposal larger than this is refused ([`Refusal::TooLarge`]). The transport must
    /// carry a message of this size and its envelope (the TCP transport carries
    /// [`crate::transport::MESSAGE_BYTES_MAX`]).
    pub proposal_bytes_max: usize,
    /// With lease reads (`raft.lease_reads`): how long a lease lasts in real time from the
    /// tick its round was sent in (thesis §6.4.1: [`crate::lease_duration`] computes it).
    pub lease_duration: Option<Duration>,
    /// A step of the write path (a WAL group commit, preparing a segment, an apply batch, a
    /// wait for the state's lock, a raft round) slower than this is logged as a warning with
    /// what it did, as etcd warns of slow applies: a put stall then has a named cause.
    pub slow_step: Duration,
    /// Publish the Raft view ([`view::RaftView`]) after each round, for [`NodeHandle::raft_view`].
    pub raft_view: bool,
}

impl NodeOptions {
    /// The runtime's defaults around a core configuration: a tick of 100 ms (so the core's
    /// default election timeout of 10 ticks is 1 s, and heartbeats go every 100 ms), at most
    /// 5,000 committed entries waiting to apply and 65,536 waiting proposals before new ones
    /// are refused, proposals of up to 8 MiB, no lease reads, slow steps logged from 1 s, no Raft view.
    pub fn new(raft: flotilla_raft::Config) -> NodeOptions {
        NodeOptions {
            raft,
            tick: Duration::from_millis(100),
            apply_backlog_entries_max: 5_000,
            proposals_max: 65_536,
            proposal_bytes_max: 8 << 20,
            lease_duration: None,
            slow_step: Duration::from_secs(1),
            raft_view: false,
        }
    }
}

/// A running node, for the application: submit requests, watch the status, read the state.
/// Cheap to clone; every clone talks to the same node.
pub struct NodeHandle<S: StateMachine, M> {
    requests: mpsc::Sender<NodeRequest<S::Output>>,
    status: watch::Receiver<NodeStatus>,
    role: watch::Receiver<RoleStatus>,
    /// The state machine as the apply thread leaves it: read it under the read lock (a
    /// serializable read; for a linearizable one, [`NodeHandle::read_index`] first).
    pub state: Arc<RwLock<S>>,
    /// The node's storage, for what it reports (its size, its snapshot).
    pub storage: Arc<dyn DurableStorage>,
    /// The metrics the node reports to.
    pub metrics: Arc<M>,
    lease: Arc<PublishedLease>,
    forwarded: Arc<ForwardedWrites<S::Output>>,
    view: Option<watch::Receiver<view::RaftView>>,
}

impl<S: StateMachine, M> Clone for NodeHandle<S, M> {
    fn clone(&self) -> Self {
        NodeHandle {
            requests: self.requests.clone(),
            status: self.status.clone(),
            role: self.role.clone(),
            state: self.state.clone(),
            storage: self.storage.clone(),
            metrics: self.metrics.clone(),
            lease: self.lease.clone(),
            forwarded: self.forwarded.clone(),
            view: self.view.clone(),
        }
    }
}

impl<S: StateMachine, M> std::fmt::Debug for NodeHandle<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

/// Why a request to the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node answered that it could not carry the request out (it did not happen).
    #[error("{0}")]
    Refused(Refusal),
    /// No answer within the deadline: the outcome is unknown.
    #[error("no answer within the deadline; the request may or may not have taken effect")]
    Timeout,
    /// The node is stopping or stopped.
    #[error("the node is stopping")]
    Stopped,
}

impl<S: StateMachine, M> NodeHandle<S, M> {
    /// The status after the raft task's latest round.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// The Raft view, if the node publishes it ([`NodeOptions::raft_view`]).
    pub fn raft_view(&self) -> Option<watch::Receiver<view::RaftView>> {
        self.view.clone()
    }

    /// The status, to wait for changes of it (it changes several times per write: for the
    /// role and the leader, [`NodeHandle::role_watch`] wakes less often).
    pub fn status_watch(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// The role, leader and life of the member, changing only with them (see [`RoleStatus`]).
    pub fn role_watch(&self) -> watch::Receiver<RoleStatus> {
        self.role.clone()
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.status.borrow().id
    }

    /// The leader this member knows of now.
    pub fn leader(&self) -> Option<NodeId> {
        self.status.borrow().leader
    }

    async fn call<T>(
        &self,
        request: NodeRequest<S::Output>,
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

    /// Proposes a command and waits until it is applied here, returning its output. A
    /// follower refuses it with [`Refusal::NotLeader`] naming the leader it knows (send it
    /// there). After [`NodeError::Timeout`] the command may still apply: send it again only if
    /// it is idempotent or numbered by a session ([`crate::Sessions`]).
    pub async fn propose(&self, data: Bytes, deadline: Instant) -> Result<S::Output, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.call(NodeRequest::Propose { data, reply }, rx, deadline)
            .await
    }

    /// Enqueues a proposal without waiting, so proposals enqueued one after another (under a
    /// lock of the caller's) reach the log in that order; the receiver gets the outcome.
    pub fn submit(
        &self,
        data: Bytes,
    ) -> Result<oneshot::Receiver<Result<S::Output, Refusal>>, NodeError> {
        let (reply, outcome) = oneshot::channel();
        match self.requests.try_send(NodeRequest::Propose { data, reply }) {
            Ok(()) => Ok(outcome),
            Err(mpsc::error::TrySendError::Full(_)) => Err(NodeError::Refused(
                Refusal::Overloaded("the request queue is full".into()),
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NodeError::Stopped),
        }
    }

    /// Proposes a membership change (joint consensus, §6) and waits until it is applied here. Refused while another change is
    /// in progress ([`flotilla_raft::Error::MembershipChangeInProgress`]) or if it is invalid
    /// (an unknown member, a member added twice, ...).
    pub async fn propose_membership(
        &self,
        change: ConfChange,
        deadline: Instant,
    ) -> Result<S::Output, NodeError> {
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

    /// Asks for a snapshot at the applied index now, whatever the snapshot policy says; the
    /// status's [`NodeStatus::snapshot_index`] moves when it is saved.
    pub async fn save_snapshot(&self) -> Result<(), NodeError> {
        self.requests
            .send(NodeRequest::SaveSnapshot)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Tags a write about to be forwarded to the leader, so that its entry is recognised when
    /// it is applied here: put [`TrackedWrite::origin`] into the command, and have
    /// [`StateMachine::origin`] find it. If the leader's answer is lost, this member's own
    /// apply answers the write.
    pub fn track_forwarded(&self) -> TrackedWrite<S::Output> {
        self.forwarded.track()
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
pub struct RunningNode<S: StateMachine, M> {
    /// The handle the application uses (clone it freely).
    pub handle: NodeHandle<S, M>,
    raft_task: tokio::task::JoinHandle<()>,
    wal_thread: std::thread::JoinHandle<Result<(), StorageFailure>>,
    apply_thread: std::thread::JoinHandle<()>,
}

impl<S: StateMachine, M> RunningNode<S, M> {
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

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The core refused its configuration or could not read its storage.
    #[error("the Raft core did not start: {0}")]
    Core(#[from] flotilla_raft::Error),
    /// The operating system refused a thread (the threads started before it stop).
    #[error("cannot start the {thread} thread: {error}")]
    Thread {
        /// Which thread.
        thread: &'static str,
        /// The operating system's error.
        error: std::io::Error,
    },
}

/// Everything `start` needs.
#[derive(Debug)]
pub struct NodeParts<S, T, M> {
    /// Timing and bounds.
    pub options: NodeOptions,
    /// The log, the hard state and the snapshots: [`crate::open_wal`], [`crate::MemDurable`]
    /// or your own (check it with [`crate::conformance::storage`]).
    pub storage: Arc<dyn DurableStorage>,
    /// The state machine, holding what was applied before (at least what the newest snapshot
    /// holds, or nothing: the node restores the snapshot first).
    pub state: Arc<RwLock<S>>,
    /// Carries messages to the other members.
    pub transport: T,
    /// Messages the transport received for this member.
    pub inbox: mpsc::Receiver<Message>,
    /// What the transport reports.
    pub transport_events: mpsc::Receiver<TransportEvent>,
    /// Receives the node's measurements ([`crate::NoMetrics`] for none).
    pub metrics: Arc<M>,
    /// The node stops when this turns true.
    pub shutdown: watch::Receiver<bool>,
}

/// Starts the node: the raft task on the current tokio runtime, the WAL and apply threads
/// beside it. The state machine must hold what the core will not hand out again (its
/// applied index is passed to the core).
pub fn start<S, T, M>(parts: NodeParts<S, T, M>) -> Result<RunningNode<S, M>, StartError>
where
    S: StateMachine,
    T: Transport,
    M: NodeMetrics,
{
    let applied = parts
        .state
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .applied_index();
    let raft = RaftNode::new(parts.options.raft.clone(), parts.storage.clone(), applied)?;
    let driver = Driver::new(raft, parts.options.proposals_max);
    let initial = status_of(&driver, false, false, None);
    let (role_tx, role_rx) = watch::channel(RoleStatus::of(&initial));
    let (status_tx, status_rx) = watch::channel(initial);
    let (requests_tx, requests_rx) = mpsc::channel(REQUESTS_QUEUE);
    let (wal_tx, wal_rx) = mpsc::channel(WAL_QUEUE);
    let (apply_tx, apply_rx) = mpsc::channel(APPLY_QUEUE);
    let (persisted_tx, persisted_rx) = watch::channel(None);
    let (applied_tx, applied_rx) = watch::channel(applied);
    let (snapshot_tx, snapshot_rx) = mpsc::channel(2);
    let forwarded = Arc::new(ForwardedWrites::new(parts.options.raft.id));

    let wal_thread = {
        let storage = parts.storage.clone();
        let metrics = parts.metrics.clone();
        let fatal = snapshot_tx.clone();
        let slow_step = parts.options.slow_step;
        std::thread::Builder::new()
            .name("flotilla-wal".into())
            .spawn(move || wal_thread(&*storage, wal_rx, persisted_tx, fatal, &*metrics, slow_step))
            .map_err(|error| StartError::Thread {
                thread: "WAL",
                error,
            })?
    };
    let apply_thread = {
        let context = ApplyContext {
            storage: parts.storage.clone(),
            state: parts.state.clone(),
            metrics: parts.metrics.clone(),
            applied: applied_tx,
            snapshots: snapshot_tx,
            saving: Arc::default(),
            slow_step: parts.options.slow_step,
            forwarded: forwarded.clone(),
        };
        std::thread::Builder::new()
            .name("flotilla-apply".into())
            .spawn(move || context.run(apply_rx))
            .map_err(|error| StartError::Thread {
                thread: "apply",
                error,
            })?
    };
    let lease = Arc::new(PublishedLease::default());
    let clock = TickClock::new(driver.node().ticks(), Instant::now());
    let (view_tx, view_rx) = if parts.options.raft_view {
        let (tx, rx) = watch::channel(view::RaftView::default());
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let raft_loop = RaftLoop {
        driver,
        clock,
        lease: lease.clone(),
        options: parts.options,
        transport: parts.transport,
        wal_tx,
        wal_backlog: Default::default(),
        apply_tx,
        apply_backlog: VecDeque::new(),
        status: status_tx,
        role_status: role_tx,
        metrics: parts.metrics.clone(),
        role: None,
        removed: false,
        fatal: None,
        snapshots_deferred: 0,
        view: view_tx,
        sent: Default::default(),
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
        role: role_rx,
        state: parts.state,
        storage: parts.storage,
        metrics: parts.metrics,
        lease,
        forwarded,
        view: view_rx,
    };
    Ok(RunningNode {
        handle,
        raft_task,
        wal_thread,
        apply_thread,
    })
}

fn status_of<O>(
    driver: &NodeDriver<O>,
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
