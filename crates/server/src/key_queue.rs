//! Keys queued under a prefix in the order they were created: the mechanism under etcd's locks
//! (`lock_service.rs`) and elections (`election_service.rs`), with etcd's keys and order so
//! that participants using etcd's Go `concurrency` package and participants using the
//! services interoperate.
//!
//! A participant queues the key `prefix<lease id in hex>` under its lease. Its turn comes when
//! no key under the prefix was created before its own: the key created first owns the lock (or
//! leads the election). A key leaves the queue when it is deleted, by its owner or by its lease
//! ending.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::request_op::Request as Op;
use flotilla_proto::etcdserverpb::response_op::Response as OpResponse;
use flotilla_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse,
};
use flotilla_proto::prefix_range_end;
use tonic::{Request, Status};

use crate::services::ClientServices;
use crate::watch::WatchHub;
use crate::watch::hub::{Drained, SubscriptionId, WatchedRange, WatcherQueue};

/// etcd's error when a waiter's own key disappeared (its lease ended) while it waited.
pub const SESSION_EXPIRED: &str = "session expired";

/// `name/`: every participant's key is under it.
pub fn queue_prefix(name: &[u8]) -> Bytes {
    let mut prefix = BytesMut::with_capacity(name.len() + 1);
    prefix.put_slice(name);
    prefix.put_u8(b'/');
    prefix.freeze()
}

/// `name/<lease id in lower-case hex>`, as etcd names it.
pub fn participant_key(prefix: &[u8], lease: i64) -> Bytes {
    let mut key = BytesMut::from(prefix);
    key.put_slice(format!("{lease:x}").as_bytes());
    key.freeze()
}

/// A key queued (or found queued) by `ClientServices::queue_key`.
#[derive(Debug)]
pub struct Queued {
    /// The key's create revision: its place in the queue.
    pub created: i64,
    /// The header of the queuing transaction.
    pub header: Option<ResponseHeader>,
    /// The key's value when it was already queued (the same lease queued before), or `None`
    /// when this transaction created it.
    pub found_value: Option<Bytes>,
}

/// Where a waiter stands, from the applied state.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// The waiter's key is the one created first under the prefix: its turn has come, as of
    /// this revision.
    Reached(i64),
    /// The waiter's key is gone (deleted, or its lease ended).
    Expired,
    Waiting,
}

impl ClientServices {
    /// Queues `key` with `value` under `lease`, in one transaction: create it unless it
    /// exists, else read it.
    async fn queue_key(&self, key: &Bytes, value: Bytes, lease: i64) -> Result<Queued, Status> {
        let create_if_absent = TxnRequest {
            compare: vec![created_at(key, 0)],
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
        queued(response)
            .ok_or_else(|| Status::internal("the queued key vanished within its own transaction"))
    }

    /// `ClientServices::queue_key` for a caller that is about to wait for its turn: the key
    /// comes with its [`Withdrawal`]. If the caller gives up while the queuing transaction is
    /// still under way, the transaction completes on its own task and the key is withdrawn
    /// then, so a cancelled caller never leaves a key that blocks the queue until its lease
    /// ends.
    pub(crate) async fn queue_waiter(
        &self,
        key: &Bytes,
        value: Bytes,
        lease: i64,
    ) -> Result<(Queued, Withdrawal), Status> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let services = self.clone();
        let queued_key = key.clone();
        tokio::spawn(async move {
            let queued = services.queue_key(&queued_key, value, lease).await;
            if let Err(Ok(queued)) = answer.send(queued) {
                services.withdraw(&queued_key, queued.created).await;
            }
        });
        let queued = answered
            .await
            .map_err(|_| Status::internal("the queuing task ended without an answer"))??;
        let withdrawal = Withdrawal {
            services: Some(self.clone()),
            key: key.clone(),
            created: queued.created,
        };
        Ok((queued, withdrawal))
    }

    /// Deletes a queued key whose caller gave up.
    async fn withdraw(&self, key: &Bytes, created: i64) {
        if let Err(status) = self.delete_if_created(key, created).await {
            // The key stays until its lease ends.
            tracing::warn!(
                ?key,
                "could not withdraw a queued key: {}",
                status.message()
            );
        }
    }

    /// Puts `value` on `key` under `lease` if `key` is still the one created at `created`;
    /// the transaction's answer says whether it was.
    pub(crate) async fn put_if_created(
        &self,
        key: &Bytes,
        created: i64,
        value: Bytes,
        lease: i64,
    ) -> Result<TxnResponse, Status> {
        let put = Op::RequestPut(PutRequest {
            key: key.clone(),
            value,
            lease,
            ..Default::default()
        });
        self.if_created(key, created, put).await
    }

    /// Deletes `key` if it is still the one created at `created`.
    pub(crate) async fn delete_if_created(
        &self,
        key: &Bytes,
        created: i64,
    ) -> Result<TxnResponse, Status> {
        let delete = Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.clone(),
            ..Default::default()
        });
        self.if_created(key, created, delete).await
    }

    async fn if_created(&self, key: &Bytes, created: i64, op: Op) -> Result<TxnResponse, Status> {
        let txn = TxnRequest {
            compare: vec![created_at(key, created)],
            success: vec![RequestOp { request: Some(op) }],
            failure: Vec::new(),
        };
        Ok(self.txn(Request::new(txn)).await?.into_inner())
    }

    /// The key created first under `prefix` (the owner, or the leader), read linearizably.
    pub(crate) async fn first_created(&self, prefix: &Bytes) -> Result<RangeResponse, Status> {
        Ok(self
            .range(Request::new(first_created_request(prefix)))
            .await?
            .into_inner())
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
            let first = state
                .kv
                .range(&first_created_request(prefix))
                .map_err(|e| crate::errors::kv_status(&e))?;
            let first_created = first.kvs.first().map(|kv| kv.create_revision);
            Ok(if first_created == Some(created) {
                Turn::Reached(state.kv.current_revision())
            } else {
                Turn::Waiting
            })
        })
    }

    /// Waits until no key under `prefix` was created before `key` (created at `created`):
    /// re-checked on every change under the prefix this member applies. Returns the revision
    /// at which the turn came.
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
                Turn::Reached(revision) => return Ok(revision),
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

/// The comparison "`key` was created at `revision`" (0: `key` does not exist).
fn created_at(key: &Bytes, revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.clone(),
        range_end: Bytes::new(),
        target_union: Some(TargetUnion::CreateRevision(revision)),
    }
}

/// etcd's "first create" read: the key under `prefix` with the lowest create revision.
fn first_created_request(prefix: &Bytes) -> RangeRequest {
    RangeRequest {
        key: prefix.clone(),
        range_end: prefix_range_end(prefix),
        sort_target: SortTarget::Create as i32,
        sort_order: SortOrder::Ascend as i32,
        limit: 1,
        ..Default::default()
    }
}

/// What a `ClientServices::queue_key` transaction created or found.
fn queued(response: TxnResponse) -> Option<Queued> {
    if response.succeeded {
        return Some(Queued {
            created: response.header.as_ref()?.revision,
            header: response.header,
            found_value: None,
        });
    }
    let OpResponse::ResponseRange(range) = response.responses.into_iter().next()?.response? else {
        return None;
    };
    let kv = range.kvs.into_iter().next()?;
    Some(Queued {
        created: kv.create_revision,
        header: response.header,
        found_value: Some(kv.value),
    })
}

/// A queued key that leaves the queue if its caller gives up before its turn: when dropped
/// before [`Withdrawal::keep`], it deletes the key (if it is still the one created at
/// `created`), as etcd's Mutex and Election do when the caller's context ends while it waits.
/// The deletion runs on its own task, since a handler is dropped when its client cancels.
#[derive(Debug)]
pub struct Withdrawal {
    services: Option<ClientServices>,
    key: Bytes,
    created: i64,
}

impl Withdrawal {
    /// The waiter keeps its key: nothing is deleted.
    pub fn keep(mut self) {
        self.services = None;
    }
}

impl Drop for Withdrawal {
    fn drop(&mut self) {
        let Some(services) = self.services.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (key, created) = (self.key.clone(), self.created);
        runtime.spawn(async move { services.withdraw(&key, created).await });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_as_etcd_names_them() {
        let prefix = queue_prefix(b"my-lock");
        assert_eq!(&prefix[..], b"my-lock/");
        assert_eq!(
            &participant_key(&prefix, 0x694d_7a1b_2c3d)[..],
            b"my-lock/694d7a1b2c3d"
        );
    }
}
