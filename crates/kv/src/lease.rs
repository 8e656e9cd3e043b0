//! Leases as replicated state (etcd-api.md §1.6). Time is not here: the server's leader
//! decides when a lease expires and proposes a revoke; this table records which leases exist,
//! the TTL each was granted, the last checkpointed remaining TTL, and which keys are attached.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::error::{ErrorKind, KvError};
use crate::limits::LEASE_TTL_MAX_SECONDS;

/// One lease, as the server needs it for TimeToLive and Leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    id: i64,
    granted_ttl_seconds: i64,
    /// 0 until a checkpoint records how long the lease had left.
    remaining_ttl_seconds: i64,
    keys: BTreeSet<Bytes>,
}

impl Lease {
    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn granted_ttl_seconds(&self) -> i64 {
        self.granted_ttl_seconds
    }

    /// The remaining TTL last checkpointed, if any: a new leader restarts the lease's timer
    /// from this rather than from the full TTL.
    pub fn checkpointed_remaining_ttl_seconds(&self) -> Option<i64> {
        (self.remaining_ttl_seconds > 0).then_some(self.remaining_ttl_seconds)
    }

    /// Attached keys, in key order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &Bytes> {
        self.keys.iter()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Leases {
    by_id: BTreeMap<i64, Lease>,
    /// Where the search for a free id starts when the client lets the store choose.
    next_id: i64,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            by_id: BTreeMap::new(),
            next_id: 1,
        }
    }
}

impl Leases {
    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.by_id.get(&id)
    }

    pub fn contains(&self, id: i64) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Lease> {
        self.by_id.values()
    }

    pub fn next_id(&self) -> i64 {
        self.next_id
    }

    /// Grants a lease. `requested_id` 0 lets the store pick the lowest free id at or above
    /// `next_id`, which every replica computes alike.
    pub fn grant(&mut self, requested_id: i64, ttl_seconds: i64) -> Result<i64, KvError> {
        if ttl_seconds > LEASE_TTL_MAX_SECONDS {
            return Err(KvError::with_detail(
                ErrorKind::LeaseTtlTooLarge,
                format!("TTL {ttl_seconds} s, limit {LEASE_TTL_MAX_SECONDS} s"),
            ));
        }
        let id = if requested_id == 0 {
            self.free_id()
        } else {
            requested_id
        };
        if self.by_id.contains_key(&id) {
            return Err(KvError::with_detail(
                ErrorKind::LeaseExists,
                format!("lease {id:#x}"),
            ));
        }
        self.by_id.insert(
            id,
            Lease {
                id,
                granted_ttl_seconds: ttl_seconds,
                remaining_ttl_seconds: 0,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    fn free_id(&mut self) -> i64 {
        if self.next_id <= 0 {
            self.next_id = 1;
        }
        // Terminates: fewer leases exist than positive ids.
        while self.by_id.contains_key(&self.next_id) {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        }
        let id = self.next_id;
        self.next_id = id.checked_add(1).unwrap_or(1);
        id
    }

    /// Removes the lease and returns its keys (the caller deletes them).
    pub fn revoke(&mut self, id: i64) -> Result<BTreeSet<Bytes>, KvError> {
        let lease = self.by_id.remove(&id).ok_or_else(|| lease_not_found(id))?;
        Ok(lease.keys)
    }

    /// Records remaining TTLs; ids no longer present are skipped (revoked meanwhile).
    pub fn checkpoint(&mut self, id: i64, remaining_ttl_seconds: i64) {
        if let Some(lease) = self.by_id.get_mut(&id) {
            lease.remaining_ttl_seconds = remaining_ttl_seconds.max(0);
        }
    }

    pub fn attach(&mut self, id: i64, key: &Bytes) {
        if id == 0 {
            return;
        }
        let lease = self
            .by_id
            .get_mut(&id)
            .expect("lease existence checked before the write");
        lease.keys.insert(key.clone());
    }

    pub fn detach(&mut self, id: i64, key: &[u8]) {
        if id == 0 {
            return;
        }
        if let Some(lease) = self.by_id.get_mut(&id) {
            let removed = lease.keys.remove(key);
            debug_assert!(removed, "key was attached to lease {id}");
        }
    }

    /// Restores one lease (keys are attached afterwards from the keyspace).
    pub fn restore(
        &mut self,
        id: i64,
        granted_ttl_seconds: i64,
        remaining_ttl_seconds: i64,
    ) -> Result<(), String> {
        if id == 0 {
            return Err("lease id 0".into());
        }
        if self.by_id.contains_key(&id) {
            return Err(format!("lease {id} appears twice"));
        }
        self.by_id.insert(
            id,
            Lease {
                id,
                granted_ttl_seconds,
                remaining_ttl_seconds,
                keys: BTreeSet::new(),
            },
        );
        Ok(())
    }

    pub fn set_next_id(&mut self, next_id: i64) {
        self.next_id = next_id.max(1);
    }
}

pub(crate) fn lease_not_found(id: i64) -> KvError {
    KvError::with_detail(ErrorKind::LeaseNotFound, format!("lease {id:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigned_ids_skip_ids_in_use() {
        let mut leases = Leases::default();
        assert_eq!(leases.grant(2, 10), Ok(2));
        assert_eq!(leases.grant(0, 10), Ok(1));
        assert_eq!(leases.grant(0, 10), Ok(3));
    }

    /// §1.6: an existing id is refused; a TTL over 9e9 s is refused.
    #[test]
    fn grant_refusals() {
        let mut leases = Leases::default();
        leases.grant(7, 10).unwrap();
        assert_eq!(
            leases.grant(7, 10).unwrap_err().kind(),
            ErrorKind::LeaseExists
        );
        let too_long = leases.grant(8, LEASE_TTL_MAX_SECONDS + 1).unwrap_err();
        assert_eq!(too_long.kind(), ErrorKind::LeaseTtlTooLarge);
        assert!(leases.grant(8, LEASE_TTL_MAX_SECONDS).is_ok());
    }

    #[test]
    fn revoke_returns_attached_keys_and_unknown_is_not_found() {
        let mut leases = Leases::default();
        leases.grant(5, 10).unwrap();
        leases.attach(5, &Bytes::from("b"));
        leases.attach(5, &Bytes::from("a"));
        let keys: Vec<_> = leases.revoke(5).unwrap().into_iter().collect();
        assert_eq!(keys, vec![Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(
            leases.revoke(5).unwrap_err().kind(),
            ErrorKind::LeaseNotFound
        );
    }

    #[test]
    fn checkpoint_records_remaining_ttl() {
        let mut leases = Leases::default();
        leases.grant(5, 60).unwrap();
        assert_eq!(
            leases.get(5).unwrap().checkpointed_remaining_ttl_seconds(),
            None
        );
        leases.checkpoint(5, 42);
        leases.checkpoint(6, 1);
        assert_eq!(
            leases.get(5).unwrap().checkpointed_remaining_ttl_seconds(),
            Some(42)
        );
    }
}
