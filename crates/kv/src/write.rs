//! Put and DeleteRange (etcd-api.md §1.4), used on their own and inside txns.
//!
//! Each write is split in two: `check_*` looks at the state before the request (and may
//! refuse it), `execute_*` cannot fail. A txn runs every check of its chosen path before its
//! first write, so a refused txn changes nothing.

use flotilla_proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
};

use crate::error::{ErrorKind, KvError};
use crate::key_range::KeyRange;
use crate::lease::{Leases, lease_not_found};
use crate::mvcc::{Keyspace, PendingWrite};
use crate::range::revision_header;

/// ignore_value / ignore_lease need the key to exist; a lease must exist to be attached.
pub(crate) fn check_put(
    keyspace: &Keyspace,
    leases: &Leases,
    request: &PutRequest,
) -> Result<(), KvError> {
    let current = keyspace.current_revision();
    if (request.ignore_value || request.ignore_lease)
        && keyspace.live_at(&request.key, current).is_none()
    {
        return Err(KvError::with_detail(
            ErrorKind::KeyNotFound,
            "ignore_value or ignore_lease on a missing key",
        ));
    }
    if request.lease != 0 && !leases.contains(request.lease) {
        return Err(lease_not_found(request.lease));
    }
    Ok(())
}

pub(crate) fn execute_put(
    keyspace: &mut Keyspace,
    leases: &mut Leases,
    write: &mut PendingWrite,
    request: &PutRequest,
) -> PutResponse {
    let (value, lease) = if request.ignore_value || request.ignore_lease {
        let current = keyspace
            .live_at(&request.key, write.view_revision())
            .expect("check_put confirmed the key exists");
        (
            if request.ignore_value {
                current.value.clone()
            } else {
                request.value.clone()
            },
            if request.ignore_lease {
                current.lease
            } else {
                request.lease
            },
        )
    } else {
        (request.value.clone(), request.lease)
    };
    let (key, prev_kv) = keyspace.put(write, request.key.clone(), value, lease);
    // A put with lease 0 detaches the key from its lease (etcd-api.md §1.4).
    let previous_lease = prev_kv.as_ref().map_or(0, |prev| prev.lease);
    if previous_lease != lease {
        leases.detach(previous_lease, &key);
        leases.attach(lease, &key);
    }
    PutResponse {
        header: revision_header(write.revision()),
        prev_kv: prev_kv.filter(|_| request.prev_kv),
    }
}

pub(crate) fn execute_delete_range(
    keyspace: &mut Keyspace,
    leases: &mut Leases,
    write: &mut PendingWrite,
    request: &DeleteRangeRequest,
) -> DeleteRangeResponse {
    let range = KeyRange::new(&request.key, &request.range_end);
    let keys: Vec<_> = keyspace
        .live_range(range, write.view_revision())
        .map(|(key, _)| key.clone())
        .collect();
    let mut prev_kvs = Vec::new();
    for key in &keys {
        let prev = keyspace
            .delete(write, key)
            .expect("the key was live a moment ago");
        leases.detach(prev.lease, key);
        if request.prev_kv {
            prev_kvs.push(prev);
        }
    }
    DeleteRangeResponse {
        header: revision_header(write.view_revision()),
        deleted: keys.len() as i64,
        prev_kvs,
    }
}
