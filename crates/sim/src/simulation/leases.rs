//! Lease time in the simulator: each member runs the server's own lease clock
//! (`flotilla_server::lease::LeaseClock`) as the server's lessor task does, on simulated time
//! (a unit of simulated time is a millisecond of lease time). It follows the member's role
//! after every round of output, is told of every grant the member applies, answers keep-alives,
//! and every tick (the task's shortest sleep) proposes the revokes and checkpoints that are
//! due, with the server's bounds. The [`LeaseChecker`](crate::lease_checker::LeaseChecker)
//! judges the outcome from what clients were told and what members applied.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_kv::{Command, Operation, Response};
use flotilla_raft::{Entry, EntryPayload, NodeId, Role};
use flotilla_server::lease::{
    LeaseClock, LessorSettings, REVOKE_RETRY, REVOKES_IN_FLIGHT_MAX, REVOKES_PER_ROUND,
    RenewDecision, RoleView, lessor_settings,
};
use flotilla_server::state_machine::Applied;

use super::application::{LessorWaiter, Waiter};
use super::etcd::EtcdApp;
use super::{ELECTION_TIMEOUT_TICKS, Phase, SimNode, Simulation};
use crate::options::TICK_TIME;
use crate::storage::SimStorage;

/// How often long leases are checkpointed: every three election timeouts (the server's is
/// five minutes, longer than any simulated lease), so checkpoints and the clears renewals
/// need happen in most runs.
const CHECKPOINT_INTERVAL_TIME: u64 = 3 * ELECTION_TIMEOUT_TICKS * TICK_TIME;

/// In the liveness phase, a lease must be revoked within this much of its deadline (the last
/// promotion's deadline or its own last promise): the expiry round, the revoke's commit and
/// application, and a retry after a failed revoke.
const REVOKE_ALLOWANCE_TIME: u64 = 2 * REVOKE_RETRY.as_millis() as u64;

/// Time for the healed cluster to settle at the start of the liveness phase (restarts,
/// an election, revokes stuck behind a partition committing), before the bound applies.
const LIVENESS_SETTLE_TIME: u64 = 10 * ELECTION_TIMEOUT_TICKS * TICK_TIME;

/// The lease side of a running member.
#[derive(Debug)]
pub(super) struct MemberLeases {
    pub(super) clock: LeaseClock,
    /// Revokes proposed and not yet applied or refused.
    revokes_in_flight: usize,
    /// Checkpoints proposed, by round, with their leases.
    checkpoints_in_flight: BTreeMap<u64, Vec<i64>>,
    next_checkpoint: u64,
}

impl MemberLeases {
    pub(super) fn new() -> MemberLeases {
        MemberLeases {
            clock: LeaseClock::new(settings()),
            revokes_in_flight: 0,
            checkpoints_in_flight: BTreeMap::new(),
            next_checkpoint: 0,
        }
    }

    /// For a liveness failure's report.
    pub(super) fn describe(&self) -> String {
        format!(
            "{}primary/{} kept/{} revoking",
            if self.clock.is_primary() { "" } else { "not " },
            self.clock.lease_count(),
            self.revokes_in_flight
        )
    }

    /// Carries out what the server's lessor task does when a proposal of its own is answered.
    fn answered(&mut self, waiter: LessorWaiter, applied: bool, now: Duration) {
        match waiter {
            LessorWaiter::Revoke(lease) => {
                self.revokes_in_flight -= 1;
                if applied {
                    // Revoked, or already gone: either way, done.
                    self.clock.revoke_done(lease);
                } else {
                    self.clock.revoke_failed(lease, now + REVOKE_RETRY);
                }
            }
            LessorWaiter::Checkpoint(round) => {
                if let Some(ids) = self.checkpoints_in_flight.remove(&round)
                    && !applied
                {
                    self.clock.checkpoint_failed(now, &ids);
                }
            }
        }
    }
}

/// The server's settings for the simulated election timeout, with a short checkpoint interval.
fn settings() -> LessorSettings {
    let election_timeout = Duration::from_millis(ELECTION_TIMEOUT_TICKS * TICK_TIME);
    LessorSettings {
        checkpoint_interval: Duration::from_millis(CHECKPOINT_INTERVAL_TIME),
        ..lessor_settings(election_timeout)
    }
}

/// Simulated time as lease time.
pub(super) fn lease_time(now: u64) -> Duration {
    Duration::from_millis(now)
}

impl<S: SimStorage> Simulation<S, EtcdApp> {
    /// Follows the member's role, as the lessor task does on each status change.
    pub(super) fn follow_leases(&mut self, id: NodeId) {
        let now = self.now;
        let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) else {
            return;
        };
        let node = member.driver.node();
        let state = member.app.state.read().expect("one thread: never poisoned");
        let role = RoleView {
            leading: node.role() == Role::Leader,
            term: node.term(),
            applied: state.applied_index(),
            last_index: node.last_id().index,
        };
        let change = member
            .app
            .leases
            .clock
            .follow(lease_time(now), role, &state.kv);
        drop(state);
        if change.promote {
            self.app.last_lease_promotion = now;
            self.trace.record(&[30, id, now]);
        }
        if self.options.verbose && (change.promote || change.demote) {
            println!("{now:>6}   n{id} lease clock {change:?}");
        }
    }

    /// A round of the lessor task: revokes and a checkpoint, if any is due.
    pub(super) fn lease_round(&mut self, id: NodeId) {
        self.follow_leases(id);
        if self.phase == Phase::Faults {
            self.renew_at_deposed_leader(id);
        }
        let now = lease_time(self.now);
        let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) else {
            return;
        };
        if member
            .app
            .leases
            .clock
            .next_wakeup()
            .is_none_or(|at| at > now)
        {
            return;
        }
        let leases = &mut member.app.leases;
        let state = member.app.state.read().expect("one thread: never poisoned");
        let room = (REVOKES_IN_FLIGHT_MAX - leases.revokes_in_flight).min(REVOKES_PER_ROUND);
        for lease in leases.clock.take_expired(now, &state.kv, room) {
            let command = LeaseClock::revoke_command(lease).encode();
            let waiter = Waiter::Lessor(LessorWaiter::Revoke(lease));
            match member.driver.propose(command, waiter) {
                Ok(_) => leases.revokes_in_flight += 1,
                Err(_) => leases.clock.revoke_failed(lease, now + REVOKE_RETRY),
            }
        }
        if let Some(checkpoint) = leases.clock.take_checkpoint(now, &state.kv) {
            let round = leases.next_checkpoint;
            leases.next_checkpoint += 1;
            let waiter = Waiter::Lessor(LessorWaiter::Checkpoint(round));
            match member.driver.propose(checkpoint.command.encode(), waiter) {
                Ok(_) => {
                    leases.checkpoints_in_flight.insert(round, checkpoint.ids);
                }
                Err(_) => leases.clock.checkpoint_failed(now, &checkpoint.ids),
            }
        }
        drop(state);
        self.process(id);
    }

    /// A client cut off with a deposed leader keeps renewing there: every lease the member
    /// still keeps time for is renewed, each tick, while a leader of a later term exists
    /// elsewhere. The deposed leader may well grant these (it has not noticed yet); the new
    /// leader's promotion must cover them. Renewals that need a clear through the log are left
    /// alone (the deposed leader could not commit it).
    fn renew_at_deposed_leader(&mut self, id: NodeId) {
        let Some(term) = self
            .nodes
            .get(&id)
            .and_then(SimNode::running)
            .map(|n| n.term())
        else {
            return;
        };
        let superseded = self
            .nodes
            .values()
            .filter_map(SimNode::running)
            .any(|n| n.is_leader() && n.term() > term);
        if !superseded {
            return;
        }
        let now = self.now;
        let member = self.member_mut(id);
        if !member.app.leases.clock.is_primary() {
            return;
        }
        let state = member.app.state.read().expect("one thread: never poisoned");
        let ids: Vec<i64> = state.kv.leases().map(|lease| lease.id()).collect();
        let mut acked = Vec::new();
        for lease in ids {
            if let RenewDecision::Answer { ttl_seconds } =
                member
                    .app
                    .leases
                    .clock
                    .renew(lease_time(now), &state.kv, lease)
                && ttl_seconds > 0
            {
                acked.push((lease, ttl_seconds));
            }
        }
        drop(state);
        for (lease, ttl_seconds) in acked {
            self.app.leases.keep_alive_acked(lease, ttl_seconds, now);
            self.trace.record(&[32, id, lease as u64]);
        }
    }

    /// A proposal of the lessor's was applied (`applied`) or refused.
    pub(super) fn lessor_answered(&mut self, id: NodeId, waiter: LessorWaiter, applied: bool) {
        let now = lease_time(self.now);
        if let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) {
            member.app.leases.answered(waiter, applied, now);
        }
    }

    /// What an applied entry means for leases: a grant starts the member's clock for it (as
    /// the apply thread tells the lessor); a first application anywhere is checked.
    pub(super) fn lease_entry_applied(
        &mut self,
        id: NodeId,
        entry: &Entry,
        applied: &Applied,
        first_anywhere: bool,
    ) -> Result<(), String> {
        let Applied::Kv(result) = applied else {
            return Ok(());
        };
        let Ok(response) = &result.outcome else {
            return Ok(());
        };
        match response {
            Response::LeaseGrant(grant) if !result.duplicate => {
                if let Some(member) = self.nodes.get_mut(&id).and_then(SimNode::member_mut) {
                    member
                        .app
                        .leases
                        .clock
                        .granted(lease_time(self.now), grant.id, grant.ttl);
                }
                if first_anywhere {
                    self.app.leases.granted(grant.id, grant.ttl, self.now);
                }
                Ok(())
            }
            Response::LeaseRevoke(_) if first_anywhere && !result.duplicate => {
                let EntryPayload::Command(data) = &entry.payload else {
                    return Ok(());
                };
                let Ok(Command {
                    operation: Operation::LeaseRevoke(revoke),
                    ..
                }) = Command::decode(data)
                else {
                    return Err(format!(
                        "leases: entry {} answered as a revoke is not one",
                        entry.index
                    ));
                };
                let renewals_promised = self.options.check_quorum || self.options.lease_reads;
                // The bound holds once some member keeps lease time: a revoke an earlier
                // primary proposed may commit late when the healed cluster is slow to elect a
                // leader that can commit, which is liveness, not the lease clock.
                let upper_bound = (self.phase == Phase::Liveness && self.lease_clock_running())
                    .then(|| self.revoke_bound(revoke.id))
                    .flatten();
                self.app
                    .leases
                    .revoked(revoke.id, self.now, renewals_promised, upper_bound)
            }
            _ => Ok(()),
        }
    }

    /// Some member's lease clock keeps time.
    fn lease_clock_running(&self) -> bool {
        self.nodes
            .values()
            .filter_map(SimNode::member)
            .any(|member| member.app.leases.clock.is_primary())
    }

    /// The latest a lease may be revoked in the liveness phase: the latest of its last
    /// promise, the last promotion's deadline for it (TTL plus the extension) and the healed
    /// cluster's settling, plus the allowance for revoking it.
    fn revoke_bound(&self, lease: i64) -> Option<u64> {
        let (promised_until, ttl_ms) = self.app.leases.latest_promise(lease)?;
        let extend = ELECTION_TIMEOUT_TICKS * TICK_TIME;
        let promoted_until = self.app.last_lease_promotion + extend + ttl_ms;
        let settled = self.options.fault_phase_time + LIVENESS_SETTLE_TIME;
        Some(promised_until.max(promoted_until).max(settled) + REVOKE_ALLOWANCE_TIME)
    }

    /// Whether the liveness phase waits for every lease to expire: only with pre-vote and
    /// check-quorum, as the server runs. Without them a member left out of the configuration
    /// (or never let into it) can disrupt the healed cluster with ever higher terms (thesis
    /// §4.2.3), so no leader stays long enough for a lease to run out, while the plain
    /// algorithm's convergence needs only a moment of stable leadership.
    pub(super) fn leases_must_expire(&self) -> bool {
        self.options.pre_vote && (self.options.check_quorum || self.options.lease_reads)
    }

    /// True once the leader's state holds no lease (the liveness phase waits for every lease
    /// to expire, since no one renews them any more; convergence then brings every member to
    /// the leader's state).
    pub(super) fn leases_gone(&self, leader: NodeId) -> bool {
        self.nodes
            .get(&leader)
            .and_then(SimNode::member)
            .is_some_and(|member| member.app.state().kv.leases().len() == 0)
    }
}
