//! etcd's lock service (`v3lockpb.Lock`), built on keys, leases and revisions exactly as etcd
//! builds it, so that a lock taken here and an etcd `concurrency.Mutex` on the same name exclude
//! each other.
//!
//! Lock(name, lease) creates the ownership key `name/<lease id in hex>` under the caller's lease
//! (or finds it, if this lease already queued for the lock), and returns once no key under
//! `name/` has a lower create revision: the waiters are served in the order they queued. The
//! lock is held while the key exists: Unlock deletes it, and so does the lease expiring.
//!
//! Holding a lock proves nothing to a third party: a holder paused past its lease's expiry
//! wakes up still believing it holds the lock. Writes that must be protected should compare the
//! ownership key's create revision in the same transaction (a fencing token; see the README).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::request_op::Request as Op;
use flotilla_proto::etcdserverpb::response_op::Response as OpResponse;
use flotilla_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest,
};
use flotilla_proto::etcdserverpb::{PutRequest, TxnResponse};
use flotilla_proto::prefix_range_end;
use flotilla_proto::v3lockpb::lock_server::Lock;
use flotilla_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

use crate::services::ClientServices;
use crate::watch::WatchHub;
use crate::watch::hub::{Drained, SubscriptionId, WatchedRange, WatcherQueue};

const LOCK: &str = "v3lockpb.Lock";

/// etcd's error when the waiter's own key disappeared (its lease expired) while it waited.
pub const SESSION_EXPIRED: &str = "session expired";

/// Serves `v3lockpb.Lock` through the member's own KV handlers (forwarding, sessions and
/// validation included) and its applied state.
#[derive(Clone, Debug)]
pub struct LockService {
    pub services: ClientServices,
}

/// `name/`: every waiter's key is under it.
pub fn lock_prefix(name: &[u8]) -> Bytes {
    let mut prefix = BytesMut::with_capacity(name.len() + 1);
    prefix.put_slice(name);
    prefix.put_u8(b'/');
    prefix.freeze()
}

/// `name/<lease id in lower-case hex>`, as etcd names it.
pub fn ownership_key(prefix: &[u8], lease: i64) -> Bytes {
    let mut key = BytesMut::from(prefix);
    key.put_slice(format!("{lease:x}").as_bytes());
    key.freeze()
}

/// Where a waiter stands, from the applied state.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// The waiter's key is the one created first under the prefix: it holds the lock, as of
    /// this revision.
    Acquired(i64),
    /// The waiter's key is gone (deleted, or its lease expired).
    Expired,
    Waiting,
}

impl ClientServices {
    /// Queues `key` under `lease` (a transaction: create it unless it exists); returns the
    /// key's create revision.
    pub(crate) async fn queue_key(
        &self,
        key: &Bytes,
        value: Bytes,
        lease: i64,
    ) -> Result<i64, Status> {
        let create_if_absent = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: key.clone(),
                range_end: Bytes::new(),
                target_union: Some(TargetUnion::CreateRevision(0)),
            }],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: key.clone(),
                    value,
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })),
            }],
        };
        let response = self.txn(Request::new(create_if_absent)).await?.into_inner();
        created_revision(&response)
            .ok_or_else(|| Status::internal("the lock key vanished within its own transaction"))
    }

    /// Where the waiter with `key` (created at `created`) stands among the keys under
    /// `prefix`, in the applied state.
    pub(crate) fn turn(&self, prefix: &Bytes, key: &Bytes, created: i64) -> Result<Turn, Status> {
        self.read_state(|state| {
            if state.kv.current_revision() < created {
                return Ok(Turn::Waiting);
            }
            let own = state
                .kv
                .range(&RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .map_err(|e| crate::errors::kv_status(&e))?;
            if own
                .kvs
                .first()
                .is_none_or(|kv| kv.create_revision != created)
            {
                return Ok(Turn::Expired);
            }
            // The owner: the key created first under the prefix (etcd's rule).
            let first = state
                .kv
                .range(&RangeRequest {
                    key: prefix.clone(),
                    range_end: prefix_range_end(prefix),
                    sort_target: SortTarget::Create as i32,
                    sort_order: SortOrder::Ascend as i32,
                    limit: 1,
                    ..Default::default()
                })
                .map_err(|e| crate::errors::kv_status(&e))?;
            let owner_created = first.kvs.first().map(|kv| kv.create_revision);
            Ok(if owner_created == Some(created) {
                Turn::Acquired(state.kv.current_revision())
            } else {
                Turn::Waiting
            })
        })
    }

    /// Waits until no key under `prefix` was created before `key` (created at `created`):
    /// re-checked on every change under the prefix this member applies.
    pub(crate) async fn wait_turn(
        &self,
        prefix: &Bytes,
        key: &Bytes,
        created: i64,
    ) -> Result<i64, Status> {
        let wake = Arc::new(tokio::sync::Notify::new());
        let queue = WatcherQueue::new(wake.clone());
        let range = WatchedRange {
            key: prefix.clone(),
            range_end: prefix_range_end(prefix),
        };
        // Subscribed before the first check, so no change between them goes unnoticed.
        let mut _subscription = HubSubscription::new(&self.watch.hub, &range, &queue);
        let mut stopping = self.stopping.clone();
        loop {
            match self.turn(prefix, key, created)? {
                Turn::Acquired(revision) => return Ok(revision),
                Turn::Expired => return Err(Status::unknown(SESSION_EXPIRED)),
                Turn::Waiting => {}
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = stopping.wait_for(|stop| *stop) => {
                    return Err(Status::unavailable(crate::errors::SERVER_STOPPED));
                }
            }
            // The events themselves do not matter: the state is read again. A queue that
            // overflowed was unsubscribed by the hub: subscribe again before the next check.
            // Draining everything takes two calls at most: the revisions, then the mark.
            for _ in 0..2 {
                match queue.drain(usize::MAX) {
                    Drained::Revisions(revisions) if revisions.is_empty() => break,
                    Drained::Revisions(_) => {}
                    Drained::FellBehind(_) => {
                        queue.clear();
                        // The new subscription is made before the old one is dropped.
                        _subscription = HubSubscription::new(&self.watch.hub, &range, &queue);
                        break;
                    }
                }
            }
        }
    }
}

/// The create revision of the key a [`ClientServices::queue_key`] transaction created or
/// found.
fn created_revision(response: &TxnResponse) -> Option<i64> {
    if response.succeeded {
        return response.header.as_ref().map(|h| h.revision);
    }
    match response.responses.first()?.response.as_ref()? {
        OpResponse::ResponseRange(range) => range.kvs.first().map(|kv| kv.create_revision),
        _ => None,
    }
}

/// A watch-hub subscription, ended when dropped (the handler's future may be dropped while it
/// waits).
struct HubSubscription {
    hub: Arc<WatchHub>,
    id: SubscriptionId,
}

impl HubSubscription {
    fn new(hub: &Arc<WatchHub>, range: &WatchedRange, queue: &Arc<WatcherQueue>) -> Self {
        Self {
            hub: hub.clone(),
            id: hub.subscribe(range.clone(), queue.clone()),
        }
    }
}

impl Drop for HubSubscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id);
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let services = &self.services;
        services
            .observe(LOCK, "Lock", async {
                let LockRequest { name, lease } = request.into_inner();
                let prefix = lock_prefix(&name);
                let key = ownership_key(&prefix, lease);
                let created = services.queue_key(&key, Bytes::new(), lease).await?;
                let revision = services.wait_turn(&prefix, &key, created).await?;
                Ok(LockResponse {
                    header: services.frontend.header(revision),
                    key,
                })
            })
            .await
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let services = &self.services;
        services
            .observe(LOCK, "Unlock", async {
                let key = request.into_inner().key;
                let delete = DeleteRangeRequest {
                    key,
                    ..Default::default()
                };
                let response = services.delete_range(Request::new(delete)).await?;
                Ok(UnlockResponse {
                    header: response.into_inner().header,
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_as_etcd_names_them() {
        let prefix = lock_prefix(b"my-lock");
        assert_eq!(&prefix[..], b"my-lock/");
        assert_eq!(
            &ownership_key(&prefix, 0x694d_7a1b_2c3d)[..],
            b"my-lock/694d7a1b2c3d"
        );
    }
}
