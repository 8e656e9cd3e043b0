//! Leases (etcd-api.md §1.6): the replicated table lives in the state machine (flotilla-kv);
//! time lives here, on the leader only.
//!
//! - [`expiry`]: deadlines in a min-heap, so expiry never scans all leases.
//! - [`lessor`]: the sans-I/O rules: promotion (every lease gets its TTL again, plus an
//!   election timeout, when a new leader takes over), renewals, expiry in bounded batches,
//!   checkpoints of long leases.
//! - [`clock`]: a member's whole lease clock, still without I/O: those rules against the
//!   replicated lease table, following the member's role, saying what to propose. The
//!   simulator runs it as it is.
//! - This module: the shell. [`Lessor`] holds the clock behind a mutex shared by the apply
//!   thread (grants), the Lease service (renewals, time-to-live) and [`run`], the task that
//!   feeds it the member's role and the monotonic clock, and proposes what it says.
//!
//! Expired leases are revoked by ordinary LeaseRevoke entries, so every member deletes the
//! same keys at the same revision. At most [`REVOKES_PER_ROUND`] are proposed per round and
//! [`REVOKES_IN_FLIGHT_MAX`] wait at once, so a wave of expiries shares the log with clients
//! instead of stalling it.
//!
//! Lock order: the state machine, then the lessor. Proposals whose order matters (checkpoints
//! and the clears of renewals) are enqueued while the lessor's lock is held.

pub mod clock;
pub mod expiry;
pub mod lessor;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, watch};
use tonic::Status;

use crate::errors::{REQUEST_TIMED_OUT, SERVER_STOPPED, refusal_status};
use crate::node::{NodeError, NodeHandle, NodeStatus};
use crate::state_machine::StateMachine;
pub use clock::{LeaseClock, RenewDecision, RoleView};
pub use lessor::{LeaseRecord, LessorCore, LessorSettings, Renewal};

/// Expired leases proposed for revocation in one round.
pub const REVOKES_PER_ROUND: usize = 500;
/// Revocations proposed and not yet applied, at most.
pub const REVOKES_IN_FLIGHT_MAX: usize = 2_000;
/// Between rounds while work is due (a wave being revoked), so the task does not spin.
const ROUND_GAP_MIN: Duration = Duration::from_millis(10);
/// A failed revoke is tried again after this.
pub const REVOKE_RETRY: Duration = Duration::from_millis(500);
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
    clock: Mutex<LeaseClock>,
    /// The clock's time zero: it is given `origin.elapsed()`.
    origin: Instant,
    /// Something became due earlier than the task's sleep (a grant, a failed revoke).
    wake: Notify,
    primary: watch::Sender<bool>,
    /// The smallest TTL granted: 1.5 election timeouts, rounded up to a second (etcd).
    pub min_ttl_seconds: i64,
}

/// The clock's settings for a member with this election timeout.
pub fn lessor_settings(election_timeout: Duration) -> LessorSettings {
    LessorSettings {
        extend: election_timeout,
        checkpoint_interval: CHECKPOINT_INTERVAL,
    }
}

impl Lessor {
    pub fn new(election_timeout: Duration) -> Arc<Lessor> {
        Arc::new(Lessor {
            clock: Mutex::new(LeaseClock::new(lessor_settings(election_timeout))),
            origin: Instant::now(),
            wake: Notify::new(),
            primary: watch::Sender::new(false),
            min_ttl_seconds: min_ttl_seconds(election_timeout),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LeaseClock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The clock's time now.
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn is_primary(&self) -> bool {
        *self.primary.borrow()
    }

    /// From the apply thread, with the state's write lock held.
    pub fn granted(&self, id: i64, ttl_seconds: i64) {
        let mut clock = self.lock();
        if clock.is_primary() {
            clock.granted(self.now(), id, ttl_seconds);
            drop(clock);
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
            let mut clock = self.lock();
            match clock.renew(self.now(), &state.kv, id) {
                RenewDecision::NotPrimary => return Err(LeaseError::NotPrimary),
                RenewDecision::Answer { ttl_seconds } => return Ok(ttl_seconds),
                RenewDecision::ClearFirst {
                    ttl_seconds,
                    generation,
                    clear,
                } => (ttl_seconds, generation, node.submit(clear.encode())),
            }
        };
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
        self.lock()
            .remaining_seconds(self.now(), &state.kv, id)
            .map_err(|clock::NotPrimary| LeaseError::NotPrimary)
    }

    /// When the clock next has something due, on the monotonic clock.
    fn next_wakeup(&self) -> Option<Instant> {
        self.lock().next_wakeup().map(|at| self.origin + at)
    }

    /// Follows the member's role (see [`LeaseClock::follow`]).
    fn follow(&self, node: &NodeHandle, status: &NodeStatus) {
        let role = RoleView {
            leading: status.role == flotilla_raft::Role::Leader && !status.stopped,
            term: status.term,
            applied: status.applied,
            last_index: status.last_index,
        };
        // Status changes with every commit: the state's lock only when the role changes.
        let change = self.lock().role_change(role);
        if change == clock::RoleChange::default() {
            return;
        }
        let state = node.state.read().unwrap_or_else(|p| p.into_inner());
        let mut clock = self.lock();
        clock.change_role(self.now(), change, &state.kv);
        if change.promote {
            tracing::info!(
                leases = clock.lease_count(),
                "lease clock started: every lease has its TTL again plus an election timeout"
            );
        }
        drop(clock);
        drop(state);
        if change.demote && !change.promote && self.primary.send_replace(false) {
            tracing::info!("lease clock stopped (no longer the leader)");
        }
        if change.promote {
            self.primary.send_replace(true);
        }
    }

    /// Hands out the leases due now, up to what may be proposed.
    fn take_expired(&self, state: &std::sync::RwLock<StateMachine>, max: usize) -> Vec<i64> {
        let state = state.read().unwrap_or_else(|p| p.into_inner());
        self.lock().take_expired(self.now(), &state.kv, max)
    }

    /// Proposes the checkpoint due now, under the lock (see the module documentation).
    fn propose_checkpoint(&self, node: &NodeHandle) -> Option<(Vec<i64>, Proposed)> {
        let state = node.state.read().unwrap_or_else(|p| p.into_inner());
        let mut clock = self.lock();
        let now = self.now();
        let checkpoint = clock.take_checkpoint(now, &state.kv)?;
        match node.submit(checkpoint.command.encode()) {
            Ok(applied) => Some((checkpoint.ids, applied)),
            Err(_) => {
                clock.checkpoint_failed(now, &checkpoint.ids);
                None
            }
        }
    }
}

type Proposed = tokio::sync::oneshot::Receiver<
    Result<crate::state_machine::Applied, flotilla_runtime::driver::Refusal>,
>;

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
    let mut role = node.role_watch();
    let revokes = Arc::new(Semaphore::new(REVOKES_IN_FLIGHT_MAX));
    loop {
        role.borrow_and_update();
        let current = status.borrow_and_update().clone();
        lessor.follow(&node, &current);
        // The full status changes with every commit; only a promotion in wait needs those
        // changes (it waits for an index to be applied). Otherwise the role is enough, and
        // this task is not woken by every write. (The role is published after the status it
        // was taken from, so on its change the status read above is as new.)
        let awaiting_promotion = lessor.lock().awaiting_promotion();
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
            changed = status.changed(), if awaiting_promotion => if changed.is_err() { return },
            changed = role.changed() => if changed.is_err() { return },
            () = lessor.wake.notified() => {}
            () = tokio::time::sleep_until(wakeup) => {}
        }
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
            let command = LeaseClock::revoke_command(id);
            let deadline = Instant::now() + timeout;
            match node.propose(command.encode(), deadline).await {
                // Revoked, or already gone (a client revoked it first): either way, done.
                Ok(_) => lessor.lock().revoke_done(id),
                Err(error) => {
                    tracing::debug!(lease = id, "revoking an expired lease failed: {error:?}");
                    let retry_at = lessor.now() + REVOKE_RETRY;
                    lessor.lock().revoke_failed(id, retry_at);
                    lessor.wake.notify_one();
                }
            }
            drop(permit);
        });
    }
}

fn checkpoint(lessor: &Arc<Lessor>, node: &NodeHandle) {
    let Some((ids, applied)) = lessor.propose_checkpoint(node) else {
        return;
    };
    let lessor = lessor.clone();
    tokio::spawn(async move {
        if !matches!(applied.await, Ok(Ok(_))) {
            let now = lessor.now();
            lessor.lock().checkpoint_failed(now, &ids);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimum_ttl_follows_etcd() {
        assert_eq!(min_ttl_seconds(Duration::from_millis(1000)), 2);
        assert_eq!(min_ttl_seconds(Duration::from_millis(400)), 1);
        assert_eq!(min_ttl_seconds(Duration::from_millis(5000)), 8);
    }
}
