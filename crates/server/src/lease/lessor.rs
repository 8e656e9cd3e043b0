//! The leader's lease clock, without I/O: when each lease expires, which renewals to accept,
//! which leases to revoke and which remaining TTLs to checkpoint. The shell (`mod.rs`) feeds it
//! the time and carries its decisions out through the log.
//!
//! # Rules
//!
//! - Only the *primary* (the leader, once it has applied every entry of earlier terms) keeps
//!   time. A follower keeps nothing; a leader that steps down forgets everything.
//! - **Promotion** (etcd's rule): the new primary gives every lease its full TTL again, or the
//!   remaining TTL last checkpointed if there is one, plus `extend` (one election timeout),
//!   counted from the promotion. No lease expires early: a renewal acknowledged by the old
//!   leader promised at most `TTL` from its acknowledgement, and the old leader acknowledges
//!   nothing later than one election timeout after the new leader could be elected (it steps
//!   down when check-quorum finds no quorum), which `extend` covers.
//! - **Checkpoints** bound the extension for long leases: every `checkpoint_interval` a lease
//!   whose TTL is longer than the interval gets its remaining TTL (rounded up) recorded in the
//!   log, so a new leader restarts it from there instead of from the full TTL. A renewal of a
//!   lease with a recorded remaining TTL must first clear it through the log (a checkpoint of
//!   0), and is acknowledged only once that is applied; otherwise a new leader could restart
//!   the lease from a remaining TTL older than the renewal. Proposals of checkpoints and
//!   clears are made in the order of these decisions (the shell makes them under one lock).
//! - **Worst-case extension** at a leader change: a lease may outlive its last renewal by
//!   the time to elect and promote the new leader, plus `extend`, plus its full TTL (or at most
//!   `checkpoint_interval` more than it had left, for checkpointed leases). Every further
//!   leader change can add as much again.
//! - **Expiry** hands out due leases in bounded batches, earliest first; a lease handed out is
//!   not renewable (renewals answer TTL 0) until its revoke is applied or fails.
//!
//! Times are durations since the clock's origin (the server's start, the simulator's time
//! zero): the core never reads a clock, so the simulator runs it on simulated time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::expiry::ExpiryQueue;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LessorSettings {
    /// Added to every lease's TTL at promotion.
    pub extend: Duration,
    /// How often long leases get their remaining TTL checkpointed; leases with a TTL at or
    /// below it are never checkpointed.
    pub checkpoint_interval: Duration,
}

/// A lease as the state machine holds it, for promotion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    pub granted_ttl_seconds: i64,
    pub checkpointed_remaining_seconds: Option<i64>,
}

/// The answer to a renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed for its TTL. With `clear_checkpoint`, the recorded remaining TTL must be
    /// cleared through the log before the renewal is acknowledged; report the clear's
    /// application with [`LessorCore::checkpoint_cleared`] and this generation.
    Renewed { clear_checkpoint: Option<u64> },
    /// The lease expired (its revoke is on its way): answer TTL 0.
    Expired,
    /// This member does not keep lease time now.
    NotPrimary,
}

#[derive(Debug)]
pub struct LessorCore {
    settings: LessorSettings,
    primary: bool,
    expiry: ExpiryQueue,
    /// Expired and handed out to be revoked.
    revoking: HashSet<i64>,
    /// When each long lease's next checkpoint is due.
    checkpoints: ExpiryQueue,
    /// Leases whose remaining TTL is recorded in the log, or about to be, with the
    /// generation of the last checkpoint proposed: a clear removes the mark only if no later
    /// checkpoint was proposed meanwhile.
    checkpointed: HashMap<i64, u64>,
    next_generation: u64,
}

fn seconds(ttl_seconds: i64) -> Duration {
    Duration::from_secs(ttl_seconds.max(0) as u64)
}

impl LessorCore {
    pub fn new(settings: LessorSettings) -> LessorCore {
        LessorCore {
            settings,
            primary: false,
            expiry: ExpiryQueue::default(),
            revoking: HashSet::new(),
            checkpoints: ExpiryQueue::default(),
            checkpointed: HashMap::new(),
            next_generation: 1,
        }
    }

    fn mark_checkpointed(&mut self, id: i64) {
        self.checkpointed.insert(id, self.next_generation);
        self.next_generation += 1;
    }

    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// Leases this primary keeps time for (expiring ones included).
    pub fn lease_count(&self) -> usize {
        self.expiry.len() + self.revoking.len()
    }

    /// Becomes primary: every lease gets its full (or checkpointed) TTL plus `extend` from
    /// `now`.
    pub fn promote(&mut self, now: Duration, leases: impl IntoIterator<Item = LeaseRecord>) {
        self.demote();
        self.primary = true;
        for lease in leases {
            let ttl = lease
                .checkpointed_remaining_seconds
                .unwrap_or(lease.granted_ttl_seconds);
            self.expiry
                .set(lease.id, now + self.settings.extend + seconds(ttl));
            if lease.checkpointed_remaining_seconds.is_some() {
                self.mark_checkpointed(lease.id);
            }
            self.schedule_checkpoint(now, lease.id, lease.granted_ttl_seconds);
        }
    }

    pub fn demote(&mut self) {
        self.primary = false;
        self.expiry.clear();
        self.revoking.clear();
        self.checkpoints.clear();
        self.checkpointed.clear();
    }

    /// A lease was granted (applied) while primary.
    pub fn granted(&mut self, now: Duration, id: i64, ttl_seconds: i64) {
        if !self.primary {
            return;
        }
        self.revoking.remove(&id);
        self.checkpointed.remove(&id);
        self.expiry.set(id, now + seconds(ttl_seconds));
        self.schedule_checkpoint(now, id, ttl_seconds);
    }

    fn schedule_checkpoint(&mut self, now: Duration, id: i64, ttl_seconds: i64) {
        if seconds(ttl_seconds) > self.settings.checkpoint_interval {
            self.checkpoints
                .set(id, now + self.settings.checkpoint_interval);
        } else {
            self.checkpoints.remove(id);
        }
    }

    /// A renewal of a lease that exists with this TTL.
    pub fn renew(&mut self, now: Duration, id: i64, ttl_seconds: i64) -> Renewal {
        if !self.primary {
            return Renewal::NotPrimary;
        }
        let expired = self.revoking.contains(&id)
            || self
                .expiry
                .deadline(id)
                .is_some_and(|deadline| deadline <= now);
        if expired {
            return Renewal::Expired;
        }
        self.expiry.set(id, now + seconds(ttl_seconds));
        self.schedule_checkpoint(now, id, ttl_seconds);
        Renewal::Renewed {
            clear_checkpoint: self.checkpointed.get(&id).copied(),
        }
    }

    /// A clear (checkpoint of 0) proposed by a renewal that saw `generation` was applied.
    pub fn checkpoint_cleared(&mut self, id: i64, generation: u64) {
        if self.checkpointed.get(&id) == Some(&generation) {
            self.checkpointed.remove(&id);
        }
    }

    /// How long the lease has left; `None` when not primary or the lease is unknown here.
    pub fn remaining(&self, now: Duration, id: i64) -> Option<Duration> {
        if !self.primary {
            return None;
        }
        if self.revoking.contains(&id) {
            return Some(Duration::ZERO);
        }
        let deadline = self.expiry.deadline(id)?;
        Some(deadline.saturating_sub(now))
    }

    /// Up to `max` leases due by `now`, earliest first, handed out to be revoked.
    pub fn expire(&mut self, now: Duration, max: usize) -> Vec<i64> {
        if !self.primary {
            return Vec::new();
        }
        let due = self.expiry.pop_due(now, max);
        for &id in &due {
            self.checkpoints.remove(id);
            self.checkpointed.remove(&id);
            self.revoking.insert(id);
        }
        due
    }

    /// The lease is gone (revoked, by expiry or by a client).
    pub fn forget(&mut self, id: i64) {
        self.revoking.remove(&id);
        self.expiry.remove(id);
        self.checkpoints.remove(id);
        self.checkpointed.remove(&id);
    }

    /// A revoke could not be carried out: try again at `retry_at`.
    pub fn revoke_failed(&mut self, id: i64, retry_at: Duration) {
        if self.primary && self.revoking.remove(&id) {
            self.expiry.set(id, retry_at);
        }
    }

    /// Up to `max` leases whose checkpoint is due, with their remaining TTL in whole seconds
    /// (rounded up, so a new leader never restarts them shorter). They are marked
    /// checkpointed; the caller proposes the checkpoint.
    pub fn due_checkpoints(&mut self, now: Duration, max: usize) -> Vec<(i64, i64)> {
        if !self.primary {
            return Vec::new();
        }
        let mut due = Vec::new();
        for id in self.checkpoints.pop_due(now, max) {
            let Some(deadline) = self.expiry.deadline(id) else {
                continue;
            };
            let remaining = deadline.saturating_sub(now);
            let remaining_seconds = remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0);
            if remaining_seconds == 0 {
                continue;
            }
            due.push((id, remaining_seconds as i64));
            self.mark_checkpointed(id);
            if remaining > self.settings.checkpoint_interval {
                self.checkpoints
                    .set(id, now + self.settings.checkpoint_interval);
            }
        }
        due
    }

    /// A checkpoint proposed for `ids` failed: their recorded TTL is unknown, so keep them
    /// marked (a renewal clears them anyway); nothing to do but let the next round retry.
    pub fn checkpoint_failed(&mut self, now: Duration, ids: &[i64]) {
        for &id in ids {
            if self.expiry.deadline(id).is_some() {
                self.checkpoints
                    .set(id, now + self.settings.checkpoint_interval);
            }
        }
    }

    /// When something is next due (an expiry or a checkpoint).
    pub fn next_wakeup(&mut self) -> Option<Duration> {
        if !self.primary {
            return None;
        }
        match (
            self.expiry.next_deadline(),
            self.checkpoints.next_deadline(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTEND: Duration = Duration::from_millis(400);
    const INTERVAL: Duration = Duration::from_secs(300);

    fn core() -> LessorCore {
        LessorCore::new(LessorSettings {
            extend: EXTEND,
            checkpoint_interval: INTERVAL,
        })
    }

    fn lease(id: i64, ttl: i64, checkpointed: Option<i64>) -> LeaseRecord {
        LeaseRecord {
            id,
            granted_ttl_seconds: ttl,
            checkpointed_remaining_seconds: checkpointed,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_follower_keeps_no_time() {
        let now = Duration::ZERO;
        let mut core = core();
        core.granted(now, 1, 5);
        assert_eq!(core.renew(now, 1, 5), Renewal::NotPrimary);
        assert_eq!(core.remaining(now, 1), None);
        assert!(core.expire(now + secs(100), 10).is_empty());
        assert_eq!(core.next_wakeup(), None);
    }

    /// etcd's rule: a new leader gives every lease its full TTL again plus `extend`, counted
    /// from the promotion, whatever was left under the old leader.
    #[test]
    fn promotion_restarts_every_lease_from_its_full_ttl() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, [lease(1, 10, None), lease(2, 60, None)]);
        assert_eq!(core.remaining(now, 1), Some(secs(10) + EXTEND));
        assert!(core.expire(now + secs(10), 10).is_empty(), "not early");
        assert_eq!(core.expire(now + secs(10) + EXTEND, 10), vec![1]);
        assert_eq!(core.next_wakeup(), Some(now + secs(60) + EXTEND));
    }

    #[test]
    fn a_checkpointed_lease_restarts_from_its_remaining_ttl() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, [lease(1, 3600, Some(100))]);
        assert_eq!(core.remaining(now, 1), Some(secs(100) + EXTEND));
        // Renewals must clear the recorded TTL through the log until a clear is applied.
        let Renewal::Renewed {
            clear_checkpoint: Some(generation),
        } = core.renew(now, 1, 3600)
        else {
            panic!("a clear is needed");
        };
        assert_eq!(
            core.renew(now, 1, 3600),
            Renewal::Renewed {
                clear_checkpoint: Some(generation)
            }
        );
        core.checkpoint_cleared(1, generation);
        assert_eq!(
            core.renew(now, 1, 3600),
            Renewal::Renewed {
                clear_checkpoint: None
            }
        );
    }

    /// A clear applied after a later checkpoint was proposed leaves the lease marked: the
    /// later checkpoint lands after the clear in the log.
    #[test]
    fn a_clear_does_not_unmark_a_later_checkpoint() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, [lease(1, 3600, Some(100))]);
        let Renewal::Renewed {
            clear_checkpoint: Some(first),
        } = core.renew(now, 1, 3600)
        else {
            panic!("a clear is needed");
        };
        let later = now + INTERVAL + Duration::from_millis(1);
        assert_eq!(core.due_checkpoints(later, 10).len(), 1);
        core.checkpoint_cleared(1, first);
        assert!(matches!(
            core.renew(later, 1, 3600),
            Renewal::Renewed {
                clear_checkpoint: Some(_)
            }
        ));
    }

    #[test]
    fn renewals_move_the_deadline_and_expired_leases_stay_expired() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, []);
        core.granted(now, 7, 10);
        core.renew(now + secs(8), 7, 10);
        assert!(core.expire(now + secs(17), 10).is_empty());
        assert_eq!(core.expire(now + secs(18), 10), vec![7]);
        assert_eq!(core.renew(now + secs(18), 7, 10), Renewal::Expired);
        assert_eq!(core.remaining(now + secs(18), 7), Some(Duration::ZERO));
        // The revoke failed (say, a timeout): retried later, still not renewable meanwhile.
        core.revoke_failed(7, now + secs(19));
        assert_eq!(core.renew(now + secs(19), 7, 10), Renewal::Expired);
        assert_eq!(core.expire(now + secs(19), 10), vec![7]);
        core.forget(7);
        assert_eq!(core.remaining(now + secs(19), 7), None);
        assert_eq!(core.lease_count(), 0);
    }

    #[test]
    fn a_renewal_at_the_deadline_is_too_late() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, [lease(1, 5, None)]);
        let deadline = now + secs(5) + EXTEND;
        assert_eq!(core.renew(deadline, 1, 5), Renewal::Expired);
    }

    #[test]
    fn expiry_comes_in_bounded_batches_earliest_first() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, []);
        for id in 1..=10 {
            core.granted(now, id, 20 - id);
        }
        let later = now + secs(100);
        assert_eq!(core.expire(later, 3), vec![10, 9, 8]);
        assert_eq!(core.expire(later, 3), vec![7, 6, 5]);
        assert_eq!(core.lease_count(), 10, "handed-out leases are still kept");
    }

    /// Long leases are checkpointed every interval with their remaining TTL rounded up;
    /// short ones never.
    #[test]
    fn long_leases_are_checkpointed_every_interval() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, []);
        core.granted(now, 1, 3600);
        core.granted(now, 2, 60);
        assert_eq!(core.next_wakeup(), Some(now + secs(60)));
        let first = now + INTERVAL + Duration::from_millis(1);
        assert_eq!(core.due_checkpoints(first, 10), vec![(1, 3300)]);
        assert_eq!(core.due_checkpoints(first, 10), vec![]);
        let second = first + INTERVAL;
        assert_eq!(core.due_checkpoints(second, 10), vec![(1, 3000)]);
        // A renewal after a checkpoint clears it.
        assert!(matches!(
            core.renew(second, 1, 3600),
            Renewal::Renewed {
                clear_checkpoint: Some(_)
            }
        ));
    }

    #[test]
    fn stepping_down_forgets_everything() {
        let now = Duration::ZERO;
        let mut core = core();
        core.promote(now, [lease(1, 10, None)]);
        core.demote();
        assert!(!core.is_primary());
        assert_eq!(core.lease_count(), 0);
        assert_eq!(core.renew(now, 1, 10), Renewal::NotPrimary);
    }
}
