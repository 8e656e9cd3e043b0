//! etcd's election service (`v3electionpb.Election`), built on keys, leases and revisions as
//! etcd's `concurrency.Election` builds it (`key_queue.rs`), so that candidates using etcd's Go
//! package and candidates using this service take part in the same elections.
//!
//! - Campaign(name, lease, value) queues the key `name/<lease id in hex>` with the value under
//!   the lease (or finds it, and proclaims the new value if it differs) and returns once that
//!   key is the one created first under `name/`: the caller leads. A caller that gives up
//!   while it waits leaves the queue.
//! - Proclaim and Resign act on a leader key only while it is the key created at the revision
//!   the campaign returned, so a leader whose lease ended (and whose key a successor may have
//!   re-created) changes nothing.
//! - Leader reads the key created first; Observe streams the leader's values as they change:
//!   the current one, each new one it proclaims, then the next leader's.
//!
//! Errors carry etcd's texts. Unlike etcd 3.4, a campaign whose own key disappears while it
//! waits fails with "session expired" instead of reporting a leadership it does not have.

use std::sync::Arc;

use bytes::Bytes;
use flotilla_proto::etcdserverpb::ResponseHeader;
use flotilla_proto::mvccpb::KeyValue;
use flotilla_proto::mvccpb::event::EventType;
use flotilla_proto::v3electionpb::election_server::Election;
use flotilla_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use crate::key_queue::{participant_key, queue_prefix};
use crate::services::ClientServices;
use crate::watch::event::WatchEvent;
use crate::watch::hub::WatchedRange;
use crate::watch::watcher::{Batch, Sources, Step, WatchSpec, Watcher};

const ELECTION: &str = "v3electionpb.Election";

/// etcd's errors.
pub const NOT_LEADER: &str = "election: not leader";
pub const NO_LEADER: &str = "election: no leader";
pub const MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

/// Leader changes waiting for an Observe client.
const OBSERVED_RESPONSES: usize = 16;

/// Serves `v3electionpb.Election` through the member's own KV handlers (forwarding, sessions
/// and validation included) and its applied state.
#[derive(Clone, Debug)]
pub struct ElectionService {
    pub services: ClientServices,
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let services = &self
            .services
            .on_behalf_of(self.services.frontend.caller(&request)?);
        services
            .observe(
                ELECTION,
                "Campaign",
                campaign(services, request.into_inner()),
            )
            .await
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let services = &self
            .services
            .on_behalf_of(self.services.frontend.caller(&request)?);
        services
            .observe(ELECTION, "Proclaim", async {
                let ProclaimRequest { leader, value } = request.into_inner();
                let leader = leader.ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
                let response = services
                    .put_if_created(&leader.key, leader.rev, value, leader.lease)
                    .await?;
                if !response.succeeded {
                    return Err(Status::unknown(NOT_LEADER));
                }
                Ok(ProclaimResponse {
                    header: response.header,
                })
            })
            .await
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let services = &self
            .services
            .on_behalf_of(self.services.frontend.caller(&request)?);
        services
            .observe(ELECTION, "Leader", async {
                let prefix = queue_prefix(&request.into_inner().name);
                let first = services.first_created(&prefix).await?;
                let kv = first.kvs.into_iter().next();
                let kv = kv.ok_or_else(|| Status::unknown(NO_LEADER))?;
                Ok(LeaderResponse {
                    header: first.header,
                    kv: Some(kv),
                })
            })
            .await
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<BoxStream<LeaderResponse>>, Status> {
        let services = self
            .services
            .on_behalf_of(self.services.frontend.caller(&request)?);
        let prefix = queue_prefix(&request.into_inner().name);
        let (out, responses) = mpsc::channel(OBSERVED_RESPONSES);
        tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = follow_leaders(&services, &prefix, &out) => outcome,
                () = out.closed() => return,
            };
            if let Err(status) = outcome {
                let _ = out.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let services = &self
            .services
            .on_behalf_of(self.services.frontend.caller(&request)?);
        services
            .observe(ELECTION, "Resign", async {
                let leader = request.into_inner().leader;
                let leader = leader.ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
                // A key that is no longer the one the campaign created is left alone; as in
                // etcd, that is not an error.
                let response = services.delete_if_created(&leader.key, leader.rev).await?;
                Ok(ResignResponse {
                    header: response.header,
                })
            })
            .await
    }
}

async fn campaign(
    services: &ClientServices,
    request: CampaignRequest,
) -> Result<CampaignResponse, Status> {
    let CampaignRequest { name, lease, value } = request;
    let prefix = queue_prefix(&name);
    let key = participant_key(&prefix, lease);
    let (queued, withdrawal) = services.queue_waiter(&key, value.clone(), lease).await?;
    // The lease already campaigned with another value: the campaign carries the new one.
    if queued.found_value.is_some_and(|found| found != value) {
        let proclaimed = services
            .put_if_created(&key, queued.created, value, lease)
            .await?;
        if !proclaimed.succeeded {
            return Err(Status::unknown(NOT_LEADER));
        }
    }
    services.wait_turn(&prefix, &key, queued.created).await?;
    withdrawal.keep();
    Ok(CampaignResponse {
        // etcd answers with the header of the transaction that queued the key.
        header: queued.header,
        leader: Some(LeaderKey {
            name,
            key,
            rev: queued.created,
            lease,
        }),
    })
}

/// Sends the election's leaders to `out` as etcd's Observe reports them: the current leader
/// (or, if there is none, the first key put under the prefix), then each value put on its key,
/// then, once the key is deleted, the next leader. Returns when the client is gone or the
/// history it needs was compacted (etcd ends the stream then too).
async fn follow_leaders(
    services: &ClientServices,
    prefix: &Bytes,
    out: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    loop {
        let first = services.first_created(prefix).await?;
        let read_at = first.header.as_ref().map_or(0, |h| h.revision);
        let (revision, leader) = match first.kvs.into_iter().next() {
            Some(kv) => (read_at, kv),
            None => {
                let under_prefix = WatchedRange {
                    key: prefix.clone(),
                    range_end: flotilla_proto::prefix_range_end(prefix),
                };
                let mut events = Events::follow(services, under_prefix, read_at + 1);
                match events.first_put().await? {
                    Some(kv) => (kv.mod_revision, kv),
                    None => return Ok(()),
                }
            }
        };
        let header = services.frontend.header(revision);
        let key = leader.key.clone();
        if !send(out, header, leader).await {
            return Ok(());
        }
        let only_key = WatchedRange {
            key,
            range_end: Bytes::new(),
        };
        let mut events = Events::follow(services, only_key, revision + 1);
        'leader: loop {
            let Some(batches) = events.next().await? else {
                return Ok(());
            };
            for Batch { revision, events } in batches {
                for event in events.iter().map(WatchEvent::to_event) {
                    if event.r#type == EventType::Delete as i32 {
                        break 'leader;
                    }
                    let Some(kv) = event.kv else { continue };
                    if !send(out, services.frontend.header(revision), kv).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// False when the client is gone.
async fn send(
    out: &mpsc::Sender<Result<LeaderResponse, Status>>,
    header: Option<ResponseHeader>,
    kv: KeyValue,
) -> bool {
    let response = LeaderResponse {
        header,
        kv: Some(kv),
    };
    out.send(Ok(response)).await.is_ok()
}

/// The events of a key range from a revision on, in order: a watcher of this member's applied
/// state (history first, then live), closed when dropped.
struct Events<'a> {
    services: &'a ClientServices,
    watcher: Watcher,
    wake: Arc<Notify>,
}

impl<'a> Events<'a> {
    fn follow(services: &'a ClientServices, range: WatchedRange, start_revision: i64) -> Self {
        let spec = WatchSpec {
            watch_id: 0,
            range,
            no_put: false,
            no_delete: false,
            prev_kv: false,
            progress_notify: false,
            fragment: false,
        };
        let wake = Arc::new(Notify::new());
        let sources = sources(services);
        let (watcher, _) = Watcher::create(spec, start_revision.max(1), sources, wake.clone());
        Events {
            services,
            watcher,
            wake,
        }
    }

    /// The next events, waiting for them; `None` when the history they are in was compacted.
    async fn next(&mut self) -> Result<Option<Vec<Batch>>, Status> {
        let mut stopping = self.services.stopping.clone();
        loop {
            // Each step is bounded; a step may yield nothing (every event filtered out).
            while self.watcher.has_work() {
                match self.watcher.step(sources(self.services)) {
                    Step::Batches(batches) if !batches.is_empty() => return Ok(Some(batches)),
                    Step::Batches(_) => tokio::task::yield_now().await,
                    Step::Compacted(_) => return Ok(None),
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                _ = stopping.wait_for(|stop| *stop) => {
                    return Err(Status::unavailable(crate::errors::SERVER_STOPPED));
                }
            }
        }
    }

    /// The first key put, or `None` when the history was compacted.
    async fn first_put(&mut self) -> Result<Option<KeyValue>, Status> {
        loop {
            let Some(batches) = self.next().await? else {
                return Ok(None);
            };
            let put = batches
                .into_iter()
                .flat_map(|batch| batch.events)
                .map(|event| event.to_event())
                .find(|event| event.r#type == EventType::Put as i32);
            if let Some(kv) = put.and_then(|event| event.kv) {
                return Ok(Some(kv));
            }
        }
    }
}

impl Drop for Events<'_> {
    fn drop(&mut self) {
        self.watcher.close(&self.services.watch.hub);
    }
}

fn sources(services: &ClientServices) -> Sources<'_> {
    Sources {
        state: &services.frontend.node.state,
        hub: &services.watch.hub,
    }
}
