//! Leases (etcd-api.md §1.6): the replicated table lives in the state machine (flotilla-kv);
//! time lives here, on the leader only.
//!
//! - [`expiry`]: deadlines in a min-heap, so expiry never scans all leases.
//! - [`lessor`]: the sans-I/O rules: promotion (every lease gets its TTL again, plus an
//!   election timeout, when a new leader takes over), renewals, expiry in bounded batches,
//!   checkpoints of long leases.
//! - This module: the shell. [`Lessor`] holds the core behind a mutex shared by the apply
//!   thread (grants), the Lease service (renewals, time-to-live) and [`run`], the task that
//!   follows the member's role, revokes expired leases through the log and proposes
//!   checkpoints.
//!
//! Expired leases are revoked by ordinary LeaseRevoke entries, so every member deletes the
//! same keys at the same revision. At most [`REVOKES_PER_ROUND`] are proposed per round and
//! [`REVOKES_IN_FLIGHT_MAX`] wait at once, so a wave of expiries shares the log with clients
//! instead of stalling it.
//!
//! Lock order: the state machine, then the lessor. Proposals whose order matters (checkpoints
//! and the clears of renewals) are enqueued while the lessor's lock is held.

pub mod expiry;
pub mod lessor;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flotilla_kv::Command;
use flotilla_proto::etcdserverpb::LeaseRevokeRequest;
use flotilla_proto::flotilla::kv::v1::LeaseRemaining;
use tokio::sync::{Notify, Semaphore, watch};
use tonic::Status;

use crate::errors::{REQUEST_TIMED_OUT, SERVER_STOPPED, refusal_status};
use crate::node::{NodeError, NodeHandle, NodeStatus};
use crate::state_machine::StateMachine;
pub use lessor::{LeaseRecord, LessorCore, LessorSettings, Renewal};

/// Expired leases proposed for revocation in one round.
pub const REVOKES_PER_ROUND: usize = 500;
/// Revocations proposed and not yet applied, at most.
pub const REVOKES_IN_FLIGHT_MAX: usize = 2_000;
/// Leases in one checkpoint entry.
const CHECKPOINT_LEASES_MAX: usize = 1_000;
/// Between rounds while work is due (a wave being revoked), so the task does not spin.
const ROUND_GAP_MIN: Duration = Duration::from_millis(10);
/// A failed revoke is tried again after this.
const REVOKE_RETRY: Duration = Duration::from_millis(500);
/// etcd's checkpoint interval.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);

/// Why a renewal or time-to-live was not answered here.
#[derive(Debug)]
pub enum LeaseError {
    /// This member does not keep lease time (not the leader, or not yet promoted).
    NotPrimary,
    Failed(Status),
}

/// The lease clock of a member (only a leader's ticks).
#[derive(Debug)]
pub struct Lessor {
    core: Mutex<LessorCore>,
    /// Something became due earlier than the task's sleep (a grant, a failed revoke).
    wake: Notify,
    primary: watch::Sender<bool>,
    /// The smallest TTL granted: 1.5 election timeouts, rounded up to a second (etcd).
    pub min_ttl_seconds: i64,
}

impl Lessor {
    pub fn new(election_timeout: Duration) -> Arc<Lessor> {
        let settings = LessorSettings {
            extend: election_timeout,
            checkpoint_interval: CHECKPOINT_INTERVAL,
        };
        Arc::new(Lessor {
            core: Mutex::new(LessorCore::new(settings)),
            wake: Notify::new(),
            primary: watch::Sender::new(false),
            min_ttl_seconds: min_ttl_seconds(election_timeout),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LessorCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_primary(&self) -> bool {
        *self.primary.borrow()
    }

    /// From the apply thread, with the state's write lock held.
    pub fn granted(&self, id: i64, ttl_seconds: i64) {
        let mut core = self.lock();
        if core.is_primary() {
            core.granted(Instant::now(), id, ttl_seconds);
            drop(core);
            self.wake.notify_one();
        }
    }

    /// Waits (until `deadline`) for this member to keep lease time; true if it does.
    pub async fn wait_primary(&self, deadline: Instant) -> bool {
        let mut primary = self.primary.subscribe();
        let waited = tokio::time::timeout_at(deadline.into(), primary.wait_for(|p| *p)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// Renews lease `id` on the leader; its TTL, or 0 if it does not exist or expired.
    pub async fn renew(
        &self,
        node: &NodeHandle,
        id: i64,
        deadline: Instant,
    ) -> Result<i64, LeaseError> {
        let (ttl, generation, clear) = {
            let state = node.state.read().unwrap_or_else(|p| p.into_inner());
            let Some(lease) = state.kv.lease(id) else {
                return Ok(0);
            };
            let ttl = lease.granted_ttl_seconds();
            let mut core = self.lock();
            match core.renew(Instant::now(), id, ttl) {
                Renewal::NotPrimary => return Err(LeaseError::NotPrimary),
                Renewal::Expired => return Ok(0),
                Renewal::Renewed {
                    clear_checkpoint: None,
                } => return Ok(ttl),
                Renewal::Renewed {
                    clear_checkpoint: Some(generation),
                } => {
                    let clear = Command::lease_checkpoint(vec![LeaseRemaining {
                        id,
                        remaining_ttl: 0,
                    }]);
                    (ttl, generation, node.submit(clear.encode()))
                }
            }
        };
        // The renewal is acknowledged once the clear is applied, so a new leader never
        // restarts the lease from a remaining TTL recorded before it.
        let applied = clear.map_err(|error| LeaseError::Failed(node_error_status(error)))?;
        match tokio::time::timeout_at(deadline.into(), applied).await {
            Ok(Ok(Ok(_))) => {
                self.lock().checkpoint_cleared(id, generation);
                Ok(ttl)
            }
            Ok(Ok(Err(refusal))) => Err(LeaseError::Failed(refusal_status(refusal))),
            Ok(Err(_)) => Err(LeaseError::Failed(Status::unavailable(SERVER_STOPPED))),
            Err(_) => Err(LeaseError::Failed(Status::unavailable(REQUEST_TIMED_OUT))),
        }
    }

    /// Remaining TTL of lease `id` in whole seconds (etcd truncates), on the leader; `None`
    /// if the state has no such lease.
    pub fn remaining_seconds(
        &self,
        state: &StateMachine,
        id: i64,
    ) -> Result<Option<i64>, LeaseError> {
        let Some(lease) = state.kv.lease(id) else {
            return Ok(None);
        };
        let core = self.lock();
        if !core.is_primary() {
            return Err(LeaseError::NotPrimary);
        }
        let remaining = core
            .remaining(Instant::now(), id)
            .map_or(lease.granted_ttl_seconds(), |left| left.as_secs() as i64);
        Ok(Some(remaining))
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.lock().next_wakeup()
    }

    /// Becomes primary from the applied state (every entry of earlier terms applied).
    fn promote(&self, state: &std::sync::RwLock<StateMachine>) {
        let state = state.read().unwrap_or_else(|p| p.into_inner());
        let leases = state.kv.leases().map(|lease| LeaseRecord {
            id: lease.id(),
            granted_ttl_seconds: lease.granted_ttl_seconds(),
            checkpointed_remaining_seconds: lease.checkpointed_remaining_ttl_seconds(),
        });
        let mut core = self.lock();
        core.promote(Instant::now(), leases);
        tracing::info!(
            leases = core.lease_count(),
            "lease clock started: every lease has its TTL again plus an election timeout"
        );
        drop(core);
        self.primary.send_replace(true);
    }

    fn demote(&self) {
        self.lock().demote();
        if self.primary.send_replace(false) {
            tracing::info!("lease clock stopped (no longer the leader)");
        }
    }

    /// Hands out the leases due now, up to what may be proposed, dropping those already gone.
    fn take_expired(&self, state: &std::sync::RwLock<StateMachine>, max: usize) -> Vec<i64> {
        let state = state.read().unwrap_or_else(|p| p.into_inner());
        let mut core = self.lock();
        let due = core.expire(Instant::now(), max);
        due.into_iter()
            .filter(|&id| {
                let exists = state.kv.lease(id).is_some();
                if !exists {
                    core.forget(id);
                }
                exists
            })
            .collect()
    }

    /// Proposes the checkpoints due now (under the lock: see the module documentation).
    fn propose_checkpoints(&self, node: &NodeHandle) -> Option<(Vec<i64>, Proposed)> {
        let state = node.state.read().unwrap_or_else(|p| p.into_inner());
        let mut core = self.lock();
        let now = Instant::now();
        let due: Vec<(i64, i64)> = core
            .due_checkpoints(now, CHECKPOINT_LEASES_MAX)
            .into_iter()
            .filter(|&(id, _)| state.kv.lease(id).is_some())
            .collect();
        if due.is_empty() {
            return None;
        }
        let ids: Vec<i64> = due.iter().map(|&(id, _)| id).collect();
        let command = Command::lease_checkpoint(
            due.into_iter()
                .map(|(id, remaining_ttl)| LeaseRemaining { id, remaining_ttl })
                .collect(),
        );
        match node.submit(command.encode()) {
            Ok(applied) => Some((ids, applied)),
            Err(_) => {
                core.checkpoint_failed(now, &ids);
                None
            }
        }
    }
}

type Proposed =
    tokio::sync::oneshot::Receiver<Result<crate::state_machine::Applied, crate::driver::Refusal>>;

/// etcd's minimum TTL: 1.5 election timeouts, rounded up to whole seconds.
pub fn min_ttl_seconds(election_timeout: Duration) -> i64 {
    let millis = election_timeout.as_millis() as i64 * 3 / 2;
    (millis + 999) / 1000
}

fn node_error_status(error: NodeError) -> Status {
    crate::errors::node_status(error)
}

/// The lessor's task: follows the member's role, revokes expired leases, proposes
/// checkpoints. Runs until aborted or the node stops.
pub async fn run(lessor: Arc<Lessor>, node: NodeHandle, request_timeout: Duration) {
    let mut status = node.status_watch();
    let mut role = RoleFollower::default();
    let revokes = Arc::new(Semaphore::new(REVOKES_IN_FLIGHT_MAX));
    loop {
        let current = status.borrow_and_update().clone();
        role.follow(&lessor, &node, &current);
        // Status changes with every commit; only a due deadline is worth the locks.
        if lessor.next_wakeup().is_some_and(|at| at <= Instant::now()) {
            revoke_expired(&lessor, &node, &revokes, request_timeout);
            checkpoint(&lessor, &node);
        }
        let now = tokio::time::Instant::now();
        let wakeup = lessor.next_wakeup().map_or(now + request_timeout, |at| {
            tokio::time::Instant::from_std(at).max(now + ROUND_GAP_MIN)
        });
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            () = lessor.wake.notified() => {}
            () = tokio::time::sleep_until(wakeup) => {}
        }
    }
}

/// Promotes the lessor once this member leads and has applied its term's first entry (so
/// every entry of earlier terms is applied); demotes it when the member stops leading or a
/// new term begins.
#[derive(Debug, Default)]
struct RoleFollower {
    /// The term and the index to apply before promotion.
    pending: Option<(u64, u64)>,
    primary_term: Option<u64>,
}

/// What the lessor must do after a status change: demote first, then promote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RoleChange {
    demote: bool,
    promote: bool,
}

impl RoleFollower {
    fn follow(&mut self, lessor: &Lessor, node: &NodeHandle, status: &NodeStatus) {
        let change = self.next(status);
        if change.demote {
            lessor.demote();
        }
        if change.promote {
            lessor.promote(&node.state);
        }
    }

    /// The decision alone (no I/O), for tests.
    fn next(&mut self, status: &NodeStatus) -> RoleChange {
        let mut change = RoleChange::default();
        let leading = status.role == flotilla_raft::Role::Leader && !status.stopped;
        if !leading || self.primary_term.is_some_and(|term| term != status.term) {
            self.pending = None;
            change.demote = self.primary_term.take().is_some();
        }
        if !leading || self.primary_term.is_some() {
            return change;
        }
        // A status seen for a later term (the steps between coalesced) starts over: the
        // entries to apply are those of the log as this term found it.
        if self.pending.is_none_or(|(term, _)| term != status.term) {
            self.pending = Some((status.term, status.last_index));
        }
        let (term, index) = self.pending.expect("set above");
        if status.applied >= index {
            self.pending = None;
            self.primary_term = Some(term);
            change.promote = true;
        }
        change
    }
}

fn revoke_expired(
    lessor: &Arc<Lessor>,
    node: &NodeHandle,
    revokes: &Arc<Semaphore>,
    timeout: Duration,
) {
    let room = revokes.available_permits().min(REVOKES_PER_ROUND);
    if room == 0 {
        return;
    }
    let expired = lessor.take_expired(&node.state, room);
    if expired.is_empty() {
        return;
    }
    tracing::debug!(count = expired.len(), "revoking expired leases");
    for id in expired {
        let permit = revokes
            .clone()
            .try_acquire_owned()
            .expect("no more leases taken than permits");
        let lessor = lessor.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let command = Command::lease_revoke(LeaseRevokeRequest { id });
            let deadline = Instant::now() + timeout;
            match node.propose(command.encode(), deadline).await {
                // Revoked, or already gone (a client revoked it first): either way, done.
                Ok(_) => lessor.lock().forget(id),
                Err(error) => {
                    tracing::debug!(lease = id, "revoking an expired lease failed: {error:?}");
                    lessor
                        .lock()
                        .revoke_failed(id, Instant::now() + REVOKE_RETRY);
                    lessor.wake.notify_one();
                }
            }
            drop(permit);
        });
    }
}

fn checkpoint(lessor: &Arc<Lessor>, node: &NodeHandle) {
    let Some((ids, applied)) = lessor.propose_checkpoints(node) else {
        return;
    };
    let lessor = lessor.clone();
    tokio::spawn(async move {
        if !matches!(applied.await, Ok(Ok(_))) {
            lessor.lock().checkpoint_failed(Instant::now(), &ids);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(role: flotilla_raft::Role, term: u64, applied: u64, last_index: u64) -> NodeStatus {
        NodeStatus {
            id: 1,
            role,
            term,
            leader: (role == flotilla_raft::Role::Leader).then_some(1),
            commit: applied,
            applied,
            last_index,
            snapshot_index: 0,
            is_learner: false,
            removed: false,
            stopped: false,
            fatal: None,
        }
    }

    const PROMOTE: RoleChange = RoleChange {
        demote: false,
        promote: true,
    };
    const DEMOTE: RoleChange = RoleChange {
        demote: true,
        promote: false,
    };
    const NOTHING: RoleChange = RoleChange {
        demote: false,
        promote: false,
    };

    /// The lease clock starts only once the new leader has applied the log as its term found
    /// it, and stops when it stops leading.
    #[test]
    fn the_clock_starts_after_the_predecessors_entries_are_applied() {
        use flotilla_raft::Role::{Follower, Leader};
        let mut role = RoleFollower::default();
        assert_eq!(role.next(&status(Follower, 1, 5, 5)), NOTHING);
        assert_eq!(
            role.next(&status(Leader, 2, 5, 8)),
            NOTHING,
            "3 entries to apply"
        );
        assert_eq!(role.next(&status(Leader, 2, 7, 9)), NOTHING);
        assert_eq!(role.next(&status(Leader, 2, 8, 9)), PROMOTE);
        assert_eq!(
            role.next(&status(Leader, 2, 9, 9)),
            NOTHING,
            "already primary"
        );
        assert_eq!(role.next(&status(Follower, 3, 9, 9)), DEMOTE);
        assert_eq!(role.next(&status(Follower, 3, 9, 9)), NOTHING);
    }

    /// Statuses are coalesced: a leader may be seen leading in term 2, then in term 4 with
    /// nothing in between. Each term waits for its own log, and a term change demotes.
    #[test]
    fn a_later_term_seen_without_the_steps_between_starts_over() {
        use flotilla_raft::Role::Leader;
        let mut role = RoleFollower::default();
        assert_eq!(role.next(&status(Leader, 2, 5, 8)), NOTHING);
        assert_eq!(
            role.next(&status(Leader, 4, 8, 12)),
            NOTHING,
            "waits for 12"
        );
        assert_eq!(role.next(&status(Leader, 4, 12, 13)), PROMOTE);
        assert_eq!(
            role.next(&status(Leader, 6, 13, 13)),
            RoleChange {
                demote: true,
                promote: true
            },
            "a new term: stop, and start again from this term's log"
        );
    }

    #[test]
    fn the_minimum_ttl_follows_etcd() {
        assert_eq!(min_ttl_seconds(Duration::from_millis(1000)), 2);
        assert_eq!(min_ttl_seconds(Duration::from_millis(400)), 1);
        assert_eq!(min_ttl_seconds(Duration::from_millis(5000)), 8);
    }
}
