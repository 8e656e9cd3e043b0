//! The raft task: the one owner of the [`Driver`]. It turns ticks, peer messages and client
//! requests into the core's inputs, and hands each round's output to the WAL thread (persist),
//! the transport (send) and the apply thread (apply), in the order the output batch requires.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use flotilla_raft::{Index, Message, PersistBatch, PersistId, RoleState};
use tokio::sync::{mpsc, watch};

use super::apply::ApplyWork;
use super::view::{RaftView, SentMessages};
use super::{
    NodeDriver, NodeOptions, NodeRequest, NodeStatus, ProposalWaiter, ReadWaiter, RoleStatus,
    SnapshotRequest, status_of,
};
use crate::driver::{Actions, Refusal};
use crate::metrics::NodeMetrics;
use crate::read_lease::{self, Lease, PublishedLease, TickClock};
use crate::transport::{Transport, TransportEvent};

pub(super) struct RaftInputs<O> {
    pub(super) requests: mpsc::Receiver<NodeRequest<O>>,
    pub(super) inbox: mpsc::Receiver<Message>,
    pub(super) transport_events: mpsc::Receiver<TransportEvent>,
    pub(super) persisted: watch::Receiver<Option<PersistId>>,
    pub(super) applied: watch::Receiver<Index>,
    pub(super) snapshots: mpsc::Receiver<SnapshotRequest>,
    pub(super) shutdown: watch::Receiver<bool>,
}

pub(super) struct RaftLoop<O, T, M> {
    pub(super) driver: NodeDriver<O>,
    /// When recent ticks began, to turn the core's lease into a deadline.
    pub(super) clock: TickClock,
    /// The lease as the handlers see it; updated before each round's messages leave.
    pub(super) lease: Arc<PublishedLease>,
    pub(super) options: NodeOptions,
    pub(super) transport: T,
    pub(super) wal_tx: mpsc::Sender<PersistBatch>,
    pub(super) wal_backlog: WalBacklog,
    pub(super) apply_tx: mpsc::Sender<ApplyWork<O>>,
    pub(super) apply_backlog: VecDeque<ApplyWork<O>>,
    pub(super) status: watch::Sender<NodeStatus>,
    /// The same status, published only when its role part changes.
    pub(super) role_status: watch::Sender<RoleStatus>,
    pub(super) metrics: Arc<M>,
    pub(super) role: Option<RoleState>,
    pub(super) removed: bool,
    pub(super) fatal: Option<String>,
    /// Snapshot policy signals this leader let pass (see `on_snapshot_due`).
    pub(super) snapshots_deferred: u32,
    /// With `--experimental-raft-view`: the view published after each round, and the count
    /// of messages sent that it shows.
    pub(super) view: Option<watch::Sender<RaftView>>,
    pub(super) sent: SentMessages,
}

/// How many snapshot policy signals a leader lets pass before it saves a snapshot.
const LEADER_SNAPSHOT_DEFERRALS: u32 = 2;

/// Work waiting for the apply thread beyond its channel before the raft task stops taking
/// messages and requests.
const BACKLOG_BATCHES_MAX: usize = 256;

/// Persist batches waiting for the WAL thread beyond its channel. While the local disk stalls
/// the raft task goes on: entries commit with the followers' acknowledgements and are applied
/// (see `RaftLog::next_to_apply`), so a stall of seconds delays no client. The backlog holds
/// what waits for the disk meanwhile, up to [`WAL_BACKLOG_BYTES_MAX`] of log (about 6 s of
/// puts of 1 KiB at 10,000/s) or [`WAL_BACKLOG_BATCHES_MAX`] batches; then the raft task
/// stops taking messages and requests, and a leader whose disk hangs for good loses its
/// followers' heartbeat responses and steps down (check-quorum), so a member with a working
/// disk takes over.
#[derive(Debug, Default)]
pub(super) struct WalBacklog {
    /// Each batch with its size (`batch_bytes`), counted once.
    batches: VecDeque<(u64, PersistBatch)>,
    /// Invariant: the sum of the sizes in `batches`.
    bytes: u64,
}

const WAL_BACKLOG_BYTES_MAX: u64 = 64 << 20;
const WAL_BACKLOG_BATCHES_MAX: usize = 16_384;

impl WalBacklog {
    fn batch_bytes(batch: &PersistBatch) -> u64 {
        let chunks: u64 = batch
            .snapshot_chunks
            .iter()
            .map(|chunk| chunk.data.len() as u64)
            .sum();
        flotilla_raft::entries_size_bytes(&batch.entries) + chunks
    }

    fn push_back(&mut self, batch: PersistBatch) {
        let bytes = Self::batch_bytes(&batch);
        self.bytes += bytes;
        self.batches.push_back((bytes, batch));
    }

    fn pop_front(&mut self) -> Option<PersistBatch> {
        let (bytes, batch) = self.batches.pop_front()?;
        self.bytes -= bytes;
        Some(batch)
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn is_full(&self) -> bool {
        self.bytes >= WAL_BACKLOG_BYTES_MAX || self.batches.len() >= WAL_BACKLOG_BATCHES_MAX
    }
}

/// Inputs drained in one round before the output is taken, so that a burst of proposals
/// becomes one append and one fsync.
const ROUND_INPUTS_MAX: usize = 512;

impl<O: Send + 'static, T: Transport, M: NodeMetrics> RaftLoop<O, T, M> {
    pub(super) async fn run(mut self, mut inputs: RaftInputs<O>) {
        let mut ticker = tokio::time::interval(self.options.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Clones, so that waiting for room in a channel does not borrow `self`.
        let wal_tx = self.wal_tx.clone();
        let apply_tx = self.apply_tx.clone();
        loop {
            // While the WAL or the apply thread is far behind, take no new work: the peer
            // streams and the clients wait (back-pressure) instead of the backlogs growing.
            let accepting =
                !self.wal_backlog.is_full() && self.apply_backlog.len() < BACKLOG_BATCHES_MAX;
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
            let carrying_out = Instant::now();
            if let Err(err) = outcome.and_then(|()| self.carry_out()) {
                self.fail(format!("the Raft core stopped: {err}"));
            }
            if carrying_out.elapsed() > self.options.slow_step {
                tracing::warn!(took = ?carrying_out.elapsed(), "slow raft round");
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

    fn on_request(&mut self, request: NodeRequest<O>) {
        match request {
            NodeRequest::Propose { data, reply } => {
                if data.len() > self.options.proposal_bytes_max {
                    self.metrics.proposal_failed();
                    let refusal = Refusal::TooLarge {
                        bytes: data.len(),
                        limit_bytes: self.options.proposal_bytes_max,
                    };
                    let _ = reply.send(Err(refusal));
                    return;
                }
                if let Some(refusal) = self.backlog_refusal() {
                    let _ = reply.send(Err(refusal));
                    return;
                }
                if let Err((reply, refusal)) = self.driver.propose(data, reply) {
                    self.metrics.proposal_failed();
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
                    self.metrics.snapshot_taken();
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

    fn dispatch(&mut self, actions: Actions<ProposalWaiter<O>, ReadWaiter>) {
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
            if self.view.is_some() {
                self.sent.count(&msg);
            }
            if !self.transport.send(msg) {
                self.metrics.peer_message_dropped();
            }
        }
        if !actions.apply.is_empty() {
            let last = actions.apply.last().map(|(item, _)| item.index());
            self.metrics.committed(self.driver.node().committed());
            self.queue_apply(ApplyWork::Items(actions.apply));
            tracing::trace!(?last, "handed entries to the apply thread");
        }
        for (waiter, refusal) in actions.proposals_failed {
            self.metrics.proposal_failed();
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

    fn queue_apply(&mut self, work: ApplyWork<O>) {
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
        let leader_changed =
            leader_before != Some(state.leader) && state.leader != flotilla_raft::NODE_NONE;
        self.metrics.role_changed(&state, leader_changed);
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
            .proposals_pending(self.driver.pending_proposals());
        let role = RoleStatus::of(&status);
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
        self.role_status.send_if_modified(|current| {
            if *current == role {
                false
            } else {
                *current = role;
                true
            }
        });
        if let Some(view) = &self.view {
            let tick_ms = self.options.tick.as_millis() as u64;
            let now = RaftView::of(&self.driver, tick_ms, &self.sent, stopped);
            view.send_if_modified(|current| {
                if *current == now {
                    false
                } else {
                    *current = now;
                    true
                }
            });
        }
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
        self.transport.shutdown();
    }
}
