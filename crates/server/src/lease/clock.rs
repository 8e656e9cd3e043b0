//! A member's lease clock as one value without I/O: it follows the member's role, keeps the
//! leader's lease time ([`LessorCore`]) against the replicated lease table, and says which
//! commands to propose (revokes of expired leases, checkpoints, the clears renewals need).
//! The server's shell (`mod.rs`) and the simulator both run it, the first on the monotonic
//! clock and real proposals, the second on simulated time; neither decides anything itself.
//!
//! Every method that looks at the lease table takes the store, so the caller holds the state
//! machine's lock first and this clock's second (the server's lock order).

use std::time::Duration;

use flotilla_kv::{Command, KvStore};
use flotilla_proto::etcdserverpb::LeaseRevokeRequest;
use flotilla_proto::flotilla::kv::v1::LeaseRemaining;

use super::lessor::{LeaseRecord, LessorCore, LessorSettings, Renewal};

/// Leases in one checkpoint entry.
pub const CHECKPOINT_LEASES_MAX: usize = 1_000;

/// What the member's Raft role is, as the clock needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleView {
    /// The member leads (and is not stopping).
    pub leading: bool,
    pub term: u64,
    pub applied: u64,
    pub last_index: u64,
}

/// What [`LeaseClock::follow`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleChange {
    pub demote: bool,
    pub promote: bool,
}

/// The answer to a renewal (keep-alive).
#[derive(Debug, PartialEq)]
pub enum RenewDecision {
    /// This member does not keep lease time now: ask the leader.
    NotPrimary,
    /// Answer this TTL now: the lease's, or 0 if it does not exist or expired.
    Answer { ttl_seconds: i64 },
    /// Propose `clear` and answer `ttl_seconds` once it is applied (then report
    /// [`LeaseClock::checkpoint_cleared`] with `generation`): a new leader must not restart
    /// the lease from a remaining TTL recorded before this renewal.
    ClearFirst {
        ttl_seconds: i64,
        generation: u64,
        clear: Command,
    },
}

/// A checkpoint to propose: the leases it records, and the command.
#[derive(Debug)]
pub struct CheckpointProposal {
    pub ids: Vec<i64>,
    pub command: Command,
}

#[derive(Debug)]
pub struct LeaseClock {
    core: LessorCore,
    role: RoleFollower,
}

impl LeaseClock {
    pub fn new(settings: LessorSettings) -> LeaseClock {
        LeaseClock {
            core: LessorCore::new(settings),
            role: RoleFollower::default(),
        }
    }

    pub fn is_primary(&self) -> bool {
        self.core.is_primary()
    }

    /// Leases this member keeps time for.
    pub fn lease_count(&self) -> usize {
        self.core.lease_count()
    }

    /// Follows the member's role: starts keeping time once it leads and has applied its
    /// term's first entry (so every entry of earlier terms is applied, and `kv` holds every
    /// lease granted before), stops when it stops leading or a new term begins.
    pub fn follow(&mut self, now: Duration, role: RoleView, kv: &KvStore) -> RoleChange {
        let change = self.role_change(role);
        self.change_role(now, change, kv);
        change
    }

    /// The first half of [`LeaseClock::follow`], without the lease table: what the role
    /// means for the clock. Nearly every call changes nothing, so a caller that must lock the
    /// table to read it (the server, on every commit) does so only when this says to.
    pub fn role_change(&mut self, role: RoleView) -> RoleChange {
        self.role.next(role)
    }

    /// This member leads and waits to apply its term's first entry before it keeps time: only
    /// then does the applied index matter to [`LeaseClock::follow`], and not only the role.
    pub fn awaiting_promotion(&self) -> bool {
        self.role.pending.is_some()
    }

    /// The second half of [`LeaseClock::follow`]: carries out `change`, the answer of
    /// [`LeaseClock::role_change`].
    pub fn change_role(&mut self, now: Duration, change: RoleChange, kv: &KvStore) {
        if change.demote {
            self.core.demote();
        }
        if change.promote {
            let leases = kv.leases().map(|lease| LeaseRecord {
                id: lease.id(),
                granted_ttl_seconds: lease.granted_ttl_seconds(),
                checkpointed_remaining_seconds: lease.checkpointed_remaining_ttl_seconds(),
            });
            self.core.promote(now, leases);
        }
    }

    /// A grant was applied (not a duplicate).
    pub fn granted(&mut self, now: Duration, id: i64, ttl_seconds: i64) {
        self.core.granted(now, id, ttl_seconds);
    }

    /// A keep-alive of lease `id`.
    pub fn renew(&mut self, now: Duration, kv: &KvStore, id: i64) -> RenewDecision {
        let Some(lease) = kv.lease(id) else {
            return RenewDecision::Answer { ttl_seconds: 0 };
        };
        let ttl_seconds = lease.granted_ttl_seconds();
        match self.core.renew(now, id, ttl_seconds) {
            Renewal::NotPrimary => RenewDecision::NotPrimary,
            Renewal::Expired => RenewDecision::Answer { ttl_seconds: 0 },
            Renewal::Renewed {
                clear_checkpoint: None,
            } => RenewDecision::Answer { ttl_seconds },
            Renewal::Renewed {
                clear_checkpoint: Some(generation),
            } => RenewDecision::ClearFirst {
                ttl_seconds,
                generation,
                clear: Command::lease_checkpoint(vec![LeaseRemaining {
                    id,
                    remaining_ttl: 0,
                }]),
            },
        }
    }

    /// The clear of a [`RenewDecision::ClearFirst`] was applied.
    pub fn checkpoint_cleared(&mut self, id: i64, generation: u64) {
        self.core.checkpoint_cleared(id, generation);
    }

    /// Remaining TTL of lease `id` in whole seconds (etcd truncates): `Ok(None)` if the table
    /// has no such lease, `Err(NotPrimary)` if this member does not keep lease time.
    pub fn remaining_seconds(
        &self,
        now: Duration,
        kv: &KvStore,
        id: i64,
    ) -> Result<Option<i64>, NotPrimary> {
        let Some(lease) = kv.lease(id) else {
            return Ok(None);
        };
        if !self.core.is_primary() {
            return Err(NotPrimary);
        }
        let remaining = self
            .core
            .remaining(now, id)
            .map_or(lease.granted_ttl_seconds(), |left| left.as_secs() as i64);
        Ok(Some(remaining))
    }

    /// Up to `max` expired leases to revoke now (propose `LeaseRevoke` for each, then report
    /// [`LeaseClock::revoke_done`] or [`LeaseClock::revoke_failed`]). Leases already gone from
    /// the table are forgotten instead.
    pub fn take_expired(&mut self, now: Duration, kv: &KvStore, max: usize) -> Vec<i64> {
        let due = self.core.expire(now, max);
        due.into_iter()
            .filter(|&id| {
                let exists = kv.lease(id).is_some();
                if !exists {
                    self.core.forget(id);
                }
                exists
            })
            .collect()
    }

    /// The command that revokes an expired lease.
    pub fn revoke_command(id: i64) -> Command {
        Command::lease_revoke(LeaseRevokeRequest { id })
    }

    /// The revoke of `id` was applied (or the lease was already gone).
    pub fn revoke_done(&mut self, id: i64) {
        self.core.forget(id);
    }

    /// The revoke of `id` failed: hand it out again at `retry_at`.
    pub fn revoke_failed(&mut self, id: i64, retry_at: Duration) {
        self.core.revoke_failed(id, retry_at);
    }

    /// The checkpoint due now, if any (propose it while still holding this clock, so
    /// checkpoints and clears enter the log in the order they were decided).
    pub fn take_checkpoint(&mut self, now: Duration, kv: &KvStore) -> Option<CheckpointProposal> {
        let due: Vec<(i64, i64)> = self
            .core
            .due_checkpoints(now, CHECKPOINT_LEASES_MAX)
            .into_iter()
            .filter(|&(id, _)| kv.lease(id).is_some())
            .collect();
        if due.is_empty() {
            return None;
        }
        let ids = due.iter().map(|&(id, _)| id).collect();
        let command = Command::lease_checkpoint(
            due.into_iter()
                .map(|(id, remaining_ttl)| LeaseRemaining { id, remaining_ttl })
                .collect(),
        );
        Some(CheckpointProposal { ids, command })
    }

    /// A checkpoint of `ids` could not be proposed or applied: the next round retries.
    pub fn checkpoint_failed(&mut self, now: Duration, ids: &[i64]) {
        self.core.checkpoint_failed(now, ids);
    }

    /// When an expiry or a checkpoint is next due.
    pub fn next_wakeup(&mut self) -> Option<Duration> {
        self.core.next_wakeup()
    }
}

/// This member does not keep lease time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotPrimary;

/// Promotes once this member leads and has applied its term's first entry (so every entry of
/// earlier terms is applied); demotes when it stops leading or a new term begins.
#[derive(Debug, Default)]
struct RoleFollower {
    /// The term and the index to apply before promotion.
    pending: Option<(u64, u64)>,
    primary_term: Option<u64>,
}

impl RoleFollower {
    fn next(&mut self, role: RoleView) -> RoleChange {
        let mut change = RoleChange::default();
        if !role.leading || self.primary_term.is_some_and(|term| term != role.term) {
            self.pending = None;
            change.demote = self.primary_term.take().is_some();
        }
        if !role.leading || self.primary_term.is_some() {
            return change;
        }
        // A role seen for a later term (the steps between coalesced) starts over: the entries
        // to apply are those of the log as this term found it.
        if self.pending.is_none_or(|(term, _)| term != role.term) {
            self.pending = Some((role.term, role.last_index));
        }
        let (term, index) = self.pending.expect("set above");
        if role.applied >= index {
            self.pending = None;
            self.primary_term = Some(term);
            change.promote = true;
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(leading: bool, term: u64, applied: u64, last_index: u64) -> RoleView {
        RoleView {
            leading,
            term,
            applied,
            last_index,
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
        let mut role = RoleFollower::default();
        assert_eq!(role.next(view(false, 1, 5, 5)), NOTHING);
        assert_eq!(
            role.next(view(true, 2, 5, 8)),
            NOTHING,
            "3 entries to apply"
        );
        assert_eq!(role.next(view(true, 2, 7, 9)), NOTHING);
        assert_eq!(role.next(view(true, 2, 8, 9)), PROMOTE);
        assert_eq!(role.next(view(true, 2, 9, 9)), NOTHING, "already primary");
        assert_eq!(role.next(view(false, 3, 9, 9)), DEMOTE);
        assert_eq!(role.next(view(false, 3, 9, 9)), NOTHING);
    }

    /// The server's lessor follows every status change only while a promotion waits for its
    /// entries to be applied, and otherwise the role alone: the wait must be visible from its
    /// start to the promotion, and only then.
    #[test]
    fn a_promotion_is_awaited_from_leading_until_applied() {
        let mut clock = LeaseClock::new(LessorSettings {
            extend: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(300),
        });
        let kv = KvStore::new(flotilla_kv::Limits::default());
        let mut follow = |leading, applied| {
            clock.follow(Duration::ZERO, view(leading, 2, applied, 8), &kv);
            clock.awaiting_promotion()
        };
        assert!(!follow(false, 5), "a follower awaits nothing");
        assert!(follow(true, 5), "the new leader waits for entry 8");
        assert!(follow(true, 7));
        assert!(!follow(true, 8), "promoted");
        assert!(!follow(true, 9));
        assert!(!follow(false, 9));
    }

    /// Roles are coalesced: a leader may be seen leading in term 2, then in term 4 with
    /// nothing in between. Each term waits for its own log, and a term change demotes.
    #[test]
    fn a_later_term_seen_without_the_steps_between_starts_over() {
        let mut role = RoleFollower::default();
        assert_eq!(role.next(view(true, 2, 5, 8)), NOTHING);
        assert_eq!(role.next(view(true, 4, 8, 12)), NOTHING, "waits for 12");
        assert_eq!(role.next(view(true, 4, 12, 13)), PROMOTE);
        assert_eq!(
            role.next(view(true, 6, 13, 13)),
            RoleChange {
                demote: true,
                promote: true
            },
            "a new term: stop, and start again from this term's log"
        );
    }
}
