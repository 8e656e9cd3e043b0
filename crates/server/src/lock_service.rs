//! etcd's lock service (`v3lockpb.Lock`), built on keys, leases and revisions exactly as etcd
//! builds it (`key_queue.rs`), so that a lock taken here and an etcd `concurrency.Mutex` on
//! the same name exclude each other.
//!
//! Lock(name, lease) creates the ownership key `name/<lease id in hex>` under the caller's lease
//! (or finds it, if this lease already queued for the lock), and returns once no key under
//! `name/` has a lower create revision: the waiters are served in the order they queued. The
//! lock is held while the key exists: Unlock deletes it, and so does the lease ending. A caller
//! that gives up while it waits (its deadline passes, it cancels) leaves the queue.
//!
//! Holding a lock proves nothing to a third party: a holder paused past its lease's expiry
//! wakes up still believing it holds the lock. Writes that must be protected should compare the
//! ownership key's create revision in the same transaction (a fencing token; see the README).

use flotilla_proto::etcdserverpb::DeleteRangeRequest;
use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::v3lockpb::lock_server::Lock;
use flotilla_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

use crate::key_queue::{participant_key, queue_prefix};
use crate::services::ClientServices;

const LOCK: &str = "v3lockpb.Lock";

/// Serves `v3lockpb.Lock` through the member's own KV handlers (forwarding, sessions and
/// validation included) and its applied state.
#[derive(Clone, Debug)]
pub struct LockService {
    pub services: ClientServices,
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let services = &self
            .services
            .on_behalf_of(self.services.frontend.caller(&request)?);
        services
            .observe(LOCK, "Lock", async {
                let LockRequest { name, lease } = request.into_inner();
                let prefix = queue_prefix(&name);
                let key = participant_key(&prefix, lease);
                // etcd's Mutex deletes its key when the wait fails, whatever the reason.
                let (queued, withdrawal) = services
                    .queue_waiter(&key, Default::default(), lease)
                    .await?;
                let revision = services.wait_turn(&prefix, &key, queued.created).await?;
                withdrawal.keep();
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
        let services = &self
            .services
            .on_behalf_of(self.services.frontend.caller(&request)?);
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
