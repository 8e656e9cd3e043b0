//! Checks the promises a lease makes, from what the clients were told and what the members
//! applied (never from the lessor's own state):
//!
//! - **No lease expires early.** A lease is not revoked by expiry before its TTL has run from
//!   the first application of its grant anywhere, nor, with check-quorum on, before its TTL
//!   has run from the leader's decision on any keep-alive a client was told succeeded. (Without
//!   check-quorum a deposed leader may renew leases for as long as it believes it leads, which
//!   no lease clock can cover; the server always runs check-quorum, the simulator sometimes
//!   not.)
//! - **No lease outlives its bound.** In the liveness phase, with the cluster healed and no
//!   one renewing, every lease is revoked within its TTL, the extension a new leader grants,
//!   and a settling allowance from the later of its last promise and the start of the phase.
//!
//! A revocation is by expiry when no client ever asked to revoke that lease. Times are the
//! simulator's, in milliseconds of lease time.

use std::collections::{BTreeMap, BTreeSet};

use crate::checker::Violation;

#[derive(Debug, Default)]
pub struct LeaseChecker {
    /// For each lease: its TTL in milliseconds and the first application of its grant.
    granted: BTreeMap<i64, Grant>,
    /// The latest end of an acknowledged keep-alive (decision time + TTL), per lease.
    renewed_until: BTreeMap<i64, u64>,
    /// Leases some client asked to revoke: their revocation needs no expiry.
    revoked_by_clients: BTreeSet<i64>,
    /// Leases revoked by expiry, checked.
    pub expiries_checked: u64,
    /// Keep-alives acknowledged with a TTL.
    pub keep_alives_acked: u64,
}

#[derive(Clone, Copy, Debug)]
struct Grant {
    applied_at: u64,
    ttl_ms: u64,
}

impl LeaseChecker {
    /// The grant of `id` was applied for the first time, anywhere.
    pub fn granted(&mut self, id: i64, ttl_seconds: i64, now: u64) {
        self.granted.entry(id).or_insert(Grant {
            applied_at: now,
            ttl_ms: ttl_seconds.max(0) as u64 * 1000,
        });
    }

    /// A client was told its keep-alive of `id`, decided by the leader at `decided_at`, renewed
    /// the lease for `ttl_seconds`.
    pub fn keep_alive_acked(&mut self, id: i64, ttl_seconds: i64, decided_at: u64) {
        let until = decided_at + ttl_seconds.max(0) as u64 * 1000;
        let end = self.renewed_until.entry(id).or_default();
        *end = (*end).max(until);
        self.keep_alives_acked += 1;
    }

    /// A client asked to revoke `id`.
    pub fn revoke_requested(&mut self, id: i64) {
        self.revoked_by_clients.insert(id);
    }

    /// The revocation of `id` was applied for the first time, anywhere, at `now`.
    ///
    /// `renewals_promised`: keep-alive promises hold (check-quorum is on).
    /// `upper_bound`: in the liveness phase, the latest time allowed, given the lease's
    /// promises (see [`LeaseChecker::latest_promise`]).
    pub fn revoked(
        &mut self,
        id: i64,
        now: u64,
        renewals_promised: bool,
        upper_bound: Option<u64>,
    ) -> Result<(), Violation> {
        if self.revoked_by_clients.contains(&id) {
            return Ok(());
        }
        let Some(grant) = self.granted.get(&id).copied() else {
            return Err(format!(
                "leases: lease {id} was revoked at {now}, but its grant was never applied"
            ));
        };
        self.expiries_checked += 1;
        let granted_until = grant.applied_at + grant.ttl_ms;
        if now < granted_until {
            return Err(format!(
                "leases: lease {id} (TTL {} ms) expired at {now}, before its TTL had run from \
                 its grant's first application at {}",
                grant.ttl_ms, grant.applied_at
            ));
        }
        if renewals_promised
            && let Some(&until) = self.renewed_until.get(&id)
            && now < until
        {
            return Err(format!(
                "leases: lease {id} (TTL {} ms) expired at {now}, but a keep-alive a client was \
                 told succeeded promised it until {until}",
                grant.ttl_ms
            ));
        }
        if let Some(bound) = upper_bound
            && now > bound
        {
            return Err(format!(
                "leases: lease {id} (TTL {} ms) was revoked only at {now}, past its bound {bound}",
                grant.ttl_ms
            ));
        }
        Ok(())
    }

    /// The later of the lease's grant and its last acknowledged keep-alive, with its TTL in
    /// milliseconds: what an upper bound on its life counts from.
    pub fn latest_promise(&self, id: i64) -> Option<(u64, u64)> {
        let grant = self.granted.get(&id)?;
        let renewed = self.renewed_until.get(&id).copied().unwrap_or(0);
        Some(((grant.applied_at + grant.ttl_ms).max(renewed), grant.ttl_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_before_the_grant_or_an_acked_renewal_has_run_is_caught() {
        let mut leases = LeaseChecker::default();
        leases.granted(1, 2, 100);
        assert!(
            leases.revoked(1, 2_099, true, None).is_err(),
            "before grant + TTL"
        );
        leases.keep_alive_acked(1, 2, 1_000);
        assert!(
            leases.revoked(1, 2_500, true, None).is_err(),
            "renewed until 3000"
        );
        assert!(
            leases.revoked(1, 2_500, false, None).is_ok(),
            "renewals promise nothing without check-quorum"
        );
        assert!(leases.revoked(1, 3_000, true, None).is_ok());
        assert!(
            leases.revoked(1, 9_000, true, Some(8_000)).is_err(),
            "kept too long"
        );
    }

    #[test]
    fn a_revocation_a_client_asked_for_is_no_expiry() {
        let mut leases = LeaseChecker::default();
        leases.granted(7, 5, 0);
        leases.revoke_requested(7);
        assert!(leases.revoked(7, 10, true, None).is_ok());
        assert_eq!(leases.expiries_checked, 0);
    }
}
