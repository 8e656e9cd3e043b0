//! The etcd v3 gRPC services (KV, Watch, Lease, Cluster, Maintenance, Auth.Authenticate) and
//! Flotilla's Session service. Every method not overridden here answers UNIMPLEMENTED (the
//! generated traits default to it).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use flotilla_kv::{Command, KvStore, validate_command, validate_range};
use flotilla_proto::etcdserverpb::cluster_server::Cluster;
use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::etcdserverpb::lease_server::Lease;
use flotilla_proto::etcdserverpb::maintenance_server::Maintenance;
use flotilla_proto::etcdserverpb::*;
use flotilla_proto::flotilla::session::v1 as session;
use flotilla_proto::flotilla::session::v1::session_server::Session;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::errors::{
    BAD_LEADER_TRANSFEREE, MEMBER_NOT_FOUND, NO_LEADER, NOT_LEADER, REQUEST_TIMED_OUT, kv_status,
    node_status,
};
use crate::frontend::{Credentials, Frontend};
use crate::members::encode_server_command;
use crate::peer_proto::{MemberChange, MemberInfo, ServerCommand, member_change, server_command};
use crate::routing::{Answer, AnswerResult};
use crate::watch::WatchContext;
use crate::watch::event::WatchOut;

/// The version Status reports: etcd clients expect 3.4 or later (etcd-api.md §1.8).
pub const REPORTED_VERSION: &str = "3.5.0";

/// One struct serves every client service.
#[derive(Clone, Debug)]
pub struct ClientServices {
    pub frontend: Arc<Frontend>,
    pub watch: Arc<WatchContext>,
    /// Becomes true when the member stops: long-lived streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Where backups are written before they are sent (the data directory).
    pub backup_dir: Arc<std::path::Path>,
    /// Bounds the backups and hashes encoding the state at once ([`MAINTENANCE_SLOTS`]).
    pub maintenance_slots: Arc<tokio::sync::Semaphore>,
    /// Set on the copy the Lock and Election services use for one call: the KV requests
    /// they make are their caller's, with its permissions.
    pub acting_for: Option<flotilla_kv::Author>,
}

type Reply<T> = Result<Response<T>, Status>;

impl ClientServices {
    /// Runs a handler, recording its latency and gRPC code.
    pub(crate) async fn observe<T>(
        &self,
        service: &'static str,
        method: &'static str,
        handler: impl Future<Output = Result<T, Status>>,
    ) -> Reply<T> {
        let started = Instant::now();
        let result = handler.await;
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.frontend
            .node
            .metrics
            .grpc_handled(service, method, code, started.elapsed());
        result.map(Response::new)
    }

    /// These services acting for `caller` (see [`ClientServices::acting_for`]).
    pub(crate) fn on_behalf_of(&self, caller: flotilla_kv::Author) -> ClientServices {
        ClientServices {
            acting_for: Some(caller),
            ..self.clone()
        }
    }

    /// Who sent `request`: the caller acted for, or its own credentials.
    pub(crate) fn caller<T>(&self, request: &Request<T>) -> Result<flotilla_kv::Author, Status> {
        match &self.acting_for {
            Some(caller) => Ok(caller.clone()),
            None => self.frontend.caller(request),
        }
    }

    /// What `request` presents, to resolve later (after a read barrier, as etcd does: a
    /// token voided before the read is void for it).
    fn credentials<T>(&self, request: &Request<T>) -> Credentials {
        match &self.acting_for {
            Some(caller) => Credentials::Resolved(caller.clone()),
            None => self.frontend.credentials(request),
        }
    }

    /// Everything a Range or RangeStream passes before it reads: the leader and corruption
    /// checks, validation, the linearizable barrier, then the caller, resolved after the
    /// barrier as etcd does (a token voided before the read is void here).
    async fn admit_range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<(flotilla_kv::Author, RangeRequest), Status> {
        self.frontend.check_require_leader(&request)?;
        self.frontend.refuse_if_corrupt()?;
        let credentials = self.credentials(&request);
        let range = request.into_inner();
        if !range.serializable {
            self.frontend.refuse_learner()?;
        }
        validate_range(&range, &self.limits()).map_err(|e| kv_status(&e))?;
        if !range.serializable {
            self.frontend.linearizable_barrier().await?;
        }
        Ok((self.frontend.resolve(&credentials)?, range))
    }

    fn limits(&self) -> flotilla_kv::RequestLimits {
        self.read_state(|state| state.limits().request.clone())
    }

    pub(crate) fn read_state<T>(
        &self,
        f: impl FnOnce(&crate::state_machine::StateMachine) -> T,
    ) -> T {
        let state = self
            .frontend
            .node
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner());
        f(&state)
    }

    /// Validates, tags with the client's session, encodes and proposes a KV command.
    async fn write_command<T>(
        &self,
        request: &Request<T>,
        command: Command,
    ) -> Result<Answer, Status> {
        self.frontend.refuse_learner()?;
        self.frontend.check_require_leader(request)?;
        let author = self.caller(request)?;
        let command = command.with_author(Some(author));
        let (command, session_id) = self.frontend.tag_session(request, command)?;
        let encoded = command.encode();
        let (limits, space) = self.read_state(|state| {
            (
                state.limits().request.clone(),
                crate::frontend::SpaceInUse::of(state),
            )
        });
        validate_command(&command, encoded.len(), &limits).map_err(|e| kv_status(&e))?;
        self.frontend.check_space(&command.operation, space).await?;
        Ok(self.frontend.write(encoded, session_id).await?)
    }

    fn members_response(&self, members: Vec<MemberInfo>) -> Vec<Member> {
        members.into_iter().map(member_of).collect()
    }
}

fn member_of(info: MemberInfo) -> Member {
    Member {
        id: info.id,
        name: info.name,
        peer_urls: info.peer_urls,
        client_urls: info.client_urls,
        is_learner: info.is_learner,
    }
}

const KV: &str = "etcdserverpb.KV";
const CLUSTER: &str = "etcdserverpb.Cluster";
const MAINTENANCE: &str = "etcdserverpb.Maintenance";
pub(crate) const AUTH: &str = "etcdserverpb.Auth";
const SESSION: &str = "flotilla.session.v1.Session";
const WATCH: &str = "etcdserverpb.Watch";
const LEASE: &str = "etcdserverpb.Lease";

/// Responses of one LeaseKeepAlive stream waiting for the client.
const KEEP_ALIVE_RESPONSES: usize = 16;

fn requires_leader<T>(request: &Request<T>) -> bool {
    request
        .metadata()
        .get("hasleader")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true")
}

impl ClientServices {
    /// The Watch method (served by `watch::service`, whose codec writes events' shared
    /// encodings).
    pub(crate) async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Reply<BoxStream<WatchOut>> {
        self.observe(WATCH, "Watch", async {
            self.frontend.check_require_leader(&request)?;
            let require_leader = requires_leader(&request);
            let credentials = self.frontend.credentials(&request);
            self.open_watch(Box::pin(request.into_inner()), require_leader, credentials)
        })
        .await
    }

    /// Serves one Watch stream of requests (from gRPC or the JSON gateway).
    pub(crate) fn open_watch(
        &self,
        inbound: crate::watch::stream::Inbound,
        require_leader: bool,
        credentials: crate::frontend::Credentials,
    ) -> Result<BoxStream<WatchOut>, Status> {
        // Learners refuse every stream (etcd-api.md §3.3).
        self.frontend.refuse_learner()?;
        let responses =
            crate::watch::stream::serve(self.watch.clone(), inbound, require_leader, credentials);
        Ok(Box::pin(responses) as BoxStream<WatchOut>)
    }

    /// Serves one LeaseKeepAlive stream of requests (from gRPC or the JSON gateway).
    pub(crate) fn open_keep_alive(
        &self,
        inbound: KeepAliveInbound,
    ) -> Result<BoxStream<LeaseKeepAliveResponse>, Status> {
        self.frontend.refuse_learner()?;
        let (out, responses) = tokio::sync::mpsc::channel(KEEP_ALIVE_RESPONSES);
        tokio::spawn(keep_alive_stream(
            self.frontend.clone(),
            inbound,
            out,
            self.stopping.clone(),
        ));
        let responses = tokio_stream::wrappers::ReceiverStream::new(responses);
        Ok(Box::pin(responses) as BoxStream<LeaseKeepAliveResponse>)
    }
}

/// The client's side of a LeaseKeepAlive stream.
pub(crate) type KeepAliveInbound = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send>,
>;

#[tonic::async_trait]
impl Lease for ClientServices {
    async fn lease_grant(&self, request: Request<LeaseGrantRequest>) -> Reply<LeaseGrantResponse> {
        self.observe(LEASE, "LeaseGrant", async {
            let mut grant = *request.get_ref();
            // etcd raises a TTL below its minimum (1.5 election timeouts) to the minimum.
            grant.ttl = grant.ttl.max(self.frontend.lessor.min_ttl_seconds);
            let response = self
                .write_command(&request, Command::lease_grant(grant))
                .await?;
            let revision = response.revision;
            let mut granted = response.pick(|r| match r {
                AnswerResult::LeaseGrant(granted) => Some(granted),
                _ => None,
            })?;
            granted.header = self.frontend.header(revision);
            Ok(granted)
        })
        .await
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Reply<LeaseRevokeResponse> {
        self.observe(LEASE, "LeaseRevoke", async {
            let command = Command::lease_revoke(*request.get_ref());
            let response = self.write_command(&request, command).await?;
            let revision = response.revision;
            let mut revoked = response.pick(|r| match r {
                AnswerResult::LeaseRevoke(revoked) => Some(revoked),
                _ => None,
            })?;
            revoked.header = self.frontend.header(revision);
            Ok(revoked)
        })
        .await
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Reply<BoxStream<LeaseKeepAliveResponse>> {
        self.observe(LEASE, "LeaseKeepAlive", async {
            self.frontend.check_require_leader(&request)?;
            self.open_keep_alive(Box::pin(request.into_inner()))
        })
        .await
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Reply<LeaseTimeToLiveResponse> {
        self.observe(LEASE, "LeaseTimeToLive", async {
            self.frontend.refuse_learner()?;
            self.frontend.check_require_leader(&request)?;
            let mut answer = self.frontend.lease_time_to_live(*request.get_ref()).await?;
            answer.header = self.frontend.header(self.frontend.current_revision());
            Ok(answer)
        })
        .await
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Reply<LeaseLeasesResponse> {
        self.observe(LEASE, "LeaseLeases", async {
            self.frontend.refuse_learner()?;
            self.frontend.check_require_leader(&request)?;
            self.frontend.linearizable_barrier().await?;
            let (leases, revision) = self.read_state(|state| {
                let leases = state
                    .kv
                    .leases()
                    .map(|l| LeaseStatus { id: l.id() })
                    .collect();
                (leases, state.kv.current_revision())
            });
            Ok(LeaseLeasesResponse {
                header: self.frontend.header(revision),
                leases,
            })
        })
        .await
    }
}

/// Serves one LeaseKeepAlive stream: one answer per request, in order (TTL 0 for a lease
/// that is gone). An error ends the stream, as in etcd; the client opens another.
async fn keep_alive_stream(
    frontend: Arc<Frontend>,
    mut inbound: KeepAliveInbound,
    out: tokio::sync::mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let request = tokio::select! {
            message = tokio_stream::StreamExt::next(&mut inbound) => match message {
                Some(Ok(request)) => request,
                None | Some(Err(_)) => return,
            },
            () = crate::watch::stream::stopped(&mut stopping) => {
                let _ = out.send(Err(Status::unavailable(crate::errors::SERVER_STOPPED))).await;
                return;
            }
            () = out.closed() => return,
        };
        let answer = frontend
            .keep_lease_alive(request.id)
            .await
            .map(|ttl| LeaseKeepAliveResponse {
                header: frontend.header(frontend.current_revision()),
                id: request.id,
                ttl,
            })
            .map_err(Status::from);
        let failed = answer.is_err();
        if out.send(answer).await.is_err() || failed {
            return;
        }
    }
}

#[tonic::async_trait]
impl Kv for ClientServices {
    async fn range(&self, request: Request<RangeRequest>) -> Reply<RangeResponse> {
        self.observe(KV, "Range", async {
            let (caller, range) = self.admit_range(request).await?;
            let mut response = crate::range_read::read_range(self, &caller, &range).await?;
            let revision = response.header.map_or(0, |h| h.revision);
            response.header = self.frontend.header(revision);
            Ok(response)
        })
        .await
    }

    async fn range_stream(
        &self,
        request: Request<RangeRequest>,
    ) -> Reply<BoxStream<RangeStreamResponse>> {
        self.observe(KV, "RangeStream", async {
            let (caller, range) = self.admit_range(request).await?;
            let messages = crate::range_read::stream_range(self, &caller, range)?;
            let messages = tokio_stream::wrappers::ReceiverStream::new(messages);
            Ok(Box::pin(messages) as BoxStream<RangeStreamResponse>)
        })
        .await
    }

    async fn put(&self, request: Request<PutRequest>) -> Reply<PutResponse> {
        self.observe(KV, "Put", async {
            let command = Command::put(request.get_ref().clone());
            let response = self.write_command(&request, command).await?;
            let revision = response.revision;
            let mut put = response.pick(|r| match r {
                AnswerResult::Put(put) => Some(put),
                _ => None,
            })?;
            put.header = self.frontend.header(revision);
            Ok(put)
        })
        .await
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Reply<DeleteRangeResponse> {
        self.observe(KV, "DeleteRange", async {
            let command = Command::delete_range(request.get_ref().clone());
            let response = self.write_command(&request, command).await?;
            let revision = response.revision;
            let mut delete = response.pick(|r| match r {
                AnswerResult::DeleteRange(delete) => Some(delete),
                _ => None,
            })?;
            delete.header = self.frontend.header(revision);
            Ok(delete)
        })
        .await
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Reply<TxnResponse> {
        self.observe(KV, "Txn", async {
            if KvStore::is_read_only_txn(request.get_ref()) {
                self.frontend.refuse_if_corrupt()?;
                self.frontend.refuse_learner()?;
                self.frontend.check_require_leader(&request)?;
                let credentials = self.credentials(&request);
                let txn = request.into_inner();
                flotilla_kv::validate_txn(&txn, &self.limits()).map_err(|e| kv_status(&e))?;
                self.frontend.linearizable_barrier().await?;
                let caller = self.frontend.resolve(&credentials)?;
                let mut response = self.read_state(|state| {
                    state
                        .auth
                        .check_txn(&caller.user, caller.auth_revision, &txn, None)
                        .map_err(Status::from)?;
                    state.kv.read_only_txn(&txn).map_err(|e| kv_status(&e))
                })?;
                let revision = response
                    .header
                    .map_or_else(|| self.frontend.current_revision(), |h| h.revision);
                response.header = self.frontend.header(revision);
                return Ok(response);
            }
            let command = Command::txn(request.get_ref().clone());
            let response = self.write_command(&request, command).await?;
            let revision = response.revision;
            let mut txn = response.pick(|r| match r {
                AnswerResult::Txn(txn) => Some(txn),
                _ => None,
            })?;
            txn.header = self.frontend.header(revision);
            Ok(txn)
        })
        .await
    }

    async fn compact(&self, request: Request<CompactionRequest>) -> Reply<CompactionResponse> {
        self.observe(KV, "Compact", async {
            let command = Command::compaction(*request.get_ref());
            let response = self.write_command(&request, command).await?;
            let revision = response.revision;
            let mut compaction = response.pick(|r| match r {
                AnswerResult::Compaction(c) => Some(c),
                _ => None,
            })?;
            compaction.header = self.frontend.header(revision);
            Ok(compaction)
        })
        .await
    }
}

#[tonic::async_trait]
impl Cluster for ClientServices {
    async fn member_add(&self, request: Request<MemberAddRequest>) -> Reply<MemberAddResponse> {
        self.observe(CLUSTER, "MemberAdd", async {
            self.frontend.refuse_learner()?;
            self.frontend.require_root(&request)?;
            let add = request.into_inner();
            let change = MemberChange {
                kind: member_change::Kind::Add as i32,
                id: 0,
                peer_urls: add.peer_urls.clone(),
                is_learner: add.is_learner,
            };
            let members = self.frontend.change_membership(change).await?;
            let added = members
                .iter()
                .find(|m| m.peer_urls.iter().any(|url| add.peer_urls.contains(url)))
                .cloned()
                .map(member_of);
            Ok(MemberAddResponse {
                header: self.frontend.header(self.frontend.current_revision()),
                member: added,
                members: self.members_response(members),
            })
        })
        .await
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Reply<MemberRemoveResponse> {
        self.observe(CLUSTER, "MemberRemove", async {
            self.frontend.require_root(&request)?;
            self.frontend.refuse_learner()?;
            let change = MemberChange {
                kind: member_change::Kind::Remove as i32,
                id: request.get_ref().id,
                ..MemberChange::default()
            };
            let members = self.frontend.change_membership(change).await?;
            Ok(MemberRemoveResponse {
                header: self.frontend.header(self.frontend.current_revision()),
                members: self.members_response(members),
            })
        })
        .await
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Reply<MemberUpdateResponse> {
        self.observe(CLUSTER, "MemberUpdate", async {
            self.frontend.require_root(&request)?;
            self.frontend.refuse_learner()?;
            let update = request.into_inner();
            if self.read_state(|s| s.members.get(update.id).is_none()) {
                return Err(Status::not_found(MEMBER_NOT_FOUND));
            }
            if update.peer_urls.is_empty()
                || update
                    .peer_urls
                    .iter()
                    .any(|u| crate::config::parse_url(u).is_err())
            {
                return Err(Status::invalid_argument(crate::errors::INVALID_URLS));
            }
            let command = ServerCommand {
                command: Some(server_command::Command::UpdatePeerUrls(MemberInfo {
                    id: update.id,
                    peer_urls: update.peer_urls,
                    ..MemberInfo::default()
                })),
            };
            let response = self
                .frontend
                .write(encode_server_command(&command), 0)
                .await?;
            let members = self.read_state(|s| s.members.infos());
            Ok(MemberUpdateResponse {
                header: self.frontend.header(response.revision),
                members: self.members_response(members),
            })
        })
        .await
    }

    async fn member_list(&self, request: Request<MemberListRequest>) -> Reply<MemberListResponse> {
        self.observe(CLUSTER, "MemberList", async {
            if request.get_ref().linearizable {
                self.frontend.linearizable_barrier().await?;
            }
            let members = self.read_state(|s| s.members.infos());
            Ok(MemberListResponse {
                header: self.frontend.header(self.frontend.current_revision()),
                members: self.members_response(members),
            })
        })
        .await
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Reply<MemberPromoteResponse> {
        self.observe(CLUSTER, "MemberPromote", async {
            self.frontend.require_root(&request)?;
            self.frontend.refuse_learner()?;
            let change = MemberChange {
                kind: member_change::Kind::Promote as i32,
                id: request.get_ref().id,
                ..MemberChange::default()
            };
            let members = self.frontend.change_membership(change).await?;
            Ok(MemberPromoteResponse {
                header: self.frontend.header(self.frontend.current_revision()),
                members: self.members_response(members),
            })
        })
        .await
    }
}

/// Backups and hashes encoding the whole state at once, per member: more wait their turn.
pub const MAINTENANCE_SLOTS: usize = 2;

impl ClientServices {
    async fn maintenance_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.maintenance_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable(crate::errors::SERVER_STOPPED))
    }
}

/// Runs `work` on a thread of its own; the answer comes back through the returned future.
/// Encoding a whole state takes a core for a while, and at full speed on a busy machine it
/// held up the apply and WAL threads (puts stalled for 100+ ms as a backup began): the
/// encoding paces itself (`flotilla_runtime::node::paced`). It does not run at a lowered priority, which
/// made it hold the state's read lock while preempted (see `lower_this_threads_priority`).
fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Result<T, Status>> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name(format!("flotilla-{name}"))
        .spawn(move || {
            let _ = answer.send(work());
        });
    let name = name.to_string();
    async move {
        started.map_err(|e| Status::internal(format!("cannot start the {name} thread: {e}")))?;
        answered
            .await
            .map_err(|_| Status::internal(format!("the {name} thread failed")))
    }
}

/// The longest a Defragment waits for its snapshot (etcd's takes as long as the rewrite).
const DEFRAGMENT_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(600);
/// How many snapshots a Defragment asks for before it gives up (see `defragment`).
const DEFRAGMENT_SNAPSHOT_ATTEMPTS: usize = 3;

/// Bytes per backup message.
const BACKUP_MESSAGE_BYTES: u64 = 64 << 10;

/// Streams a backup file to the client, each message saying how many bytes remain after it;
/// stops early if the client goes away.
fn send_backup(
    mut file: std::fs::File,
    size: u64,
    header: Option<ResponseHeader>,
    out: &tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
) {
    use std::io::Read;
    let mut remaining = size;
    while remaining > 0 {
        let length = remaining.min(BACKUP_MESSAGE_BYTES);
        let mut blob = vec![0u8; length as usize];
        let message = match file.read_exact(&mut blob) {
            Ok(()) => {
                remaining -= length;
                Ok(SnapshotResponse {
                    header,
                    remaining_bytes: remaining,
                    blob: blob.into(),
                    ..Default::default()
                })
            }
            Err(e) => {
                remaining = 0;
                Err(Status::internal(format!("cannot read the backup: {e}")))
            }
        };
        if out.blocking_send(message).is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Maintenance for ClientServices {
    async fn alarm(&self, request: Request<AlarmRequest>) -> Reply<AlarmResponse> {
        self.observe(MAINTENANCE, "Alarm", async {
            // Reading alarms is anyone's; raising or clearing one is root's.
            if request.get_ref().action != alarm_request::AlarmAction::Get as i32 {
                self.frontend.require_root(&request)?;
            }
            let request = request.into_inner();
            crate::alarms::check_alarm_change(&request)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if request.action == alarm_request::AlarmAction::Get as i32 {
                // etcd reads alarms through the log; a barrier is as linearizable.
                self.frontend.linearizable_barrier().await?;
                let (alarms, revision) = self.read_state(|s| {
                    let alarm = AlarmType::try_from(request.alarm).unwrap_or(AlarmType::None);
                    (s.alarms.get(alarm), s.kv.current_revision())
                });
                return Ok(AlarmResponse {
                    header: self.frontend.header(revision),
                    alarms,
                });
            }
            self.frontend.refuse_learner()?;
            let activate = request.action == alarm_request::AlarmAction::Activate as i32;
            if activate && self.read_state(|s| s.members.get(request.member_id).is_none()) {
                return Err(Status::not_found(MEMBER_NOT_FOUND));
            }
            let command = ServerCommand {
                command: Some(server_command::Command::Alarm(request)),
            };
            let response = self
                .frontend
                .write(encode_server_command(&command), 0)
                .await?;
            let revision = response.revision;
            let changed = response.pick(|r| match r {
                AnswerResult::Alarm(changed) => Some(changed),
                _ => None,
            })?;
            Ok(AlarmResponse {
                header: self.frontend.header(revision),
                alarms: changed.alarms,
            })
        })
        .await
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Reply<StatusResponse> {
        self.observe(MAINTENANCE, "Status", async {
            let status = self.frontend.node.status();
            let db_size = self.frontend.node.storage.size_bytes() as i64;
            let mut errors = if status.leader.is_none() {
                vec![NO_LEADER.to_string()]
            } else {
                Vec::new()
            };
            let (alarms, size_in_use) =
                self.read_state(|s| (s.alarms.to_members(), s.kv.size_bytes()));
            errors.extend(alarms.iter().map(crate::alarms::describe));
            Ok(StatusResponse {
                header: self.frontend.header(self.frontend.current_revision()),
                version: REPORTED_VERSION.to_string(),
                db_size,
                leader: status.leader.unwrap_or(0),
                raft_index: status.commit,
                raft_term: status.term,
                raft_applied_index: status.applied,
                errors,
                // What the space quota measures: the store's versions and leases.
                db_size_in_use: size_in_use as i64,
                is_learner: status.is_learner,
                db_size_quota: self.frontend.quota_bytes.unwrap_or(0) as i64,
            })
        })
        .await
    }

    async fn hash(&self, request: Request<HashRequest>) -> Reply<HashResponse> {
        self.observe(MAINTENANCE, "Hash", async {
            self.frontend.require_root(&request)?;
            // The slot goes with the work: an abandoned request's encoding still holds it.
            let slot = self.maintenance_slot().await?;
            let state = self.frontend.node.state.clone();
            let (hash, at) = in_background("hash", move || {
                let _slot = slot;
                crate::backup::hash_state(&state)
            })
            .await?
            .map_err(|e| Status::internal(format!("cannot hash the state: {e}")))?;
            Ok(HashResponse {
                header: self.frontend.header(at.revision),
                hash,
            })
        })
        .await
    }

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Reply<BoxStream<SnapshotResponse>> {
        self.observe(MAINTENANCE, "Snapshot", async {
            self.frontend.require_root(&request)?;
            let slot = self.maintenance_slot().await?;
            let state = self.frontend.node.state.clone();
            let dir = self.backup_dir.clone();
            // The slot goes with the work, encoding then sending: an abandoned request's
            // encoding still holds it.
            let (written, slot) = in_background("backup", move || {
                (crate::backup::backup_to_temporary_file(&state, &dir), slot)
            })
            .await?;
            let (file, size, at) =
                written.map_err(|e| Status::internal(format!("cannot write the backup: {e}")))?;
            tracing::info!(
                bytes = size,
                revision = at.revision,
                "sending a backup to a client"
            );
            let header = self.frontend.header(at.revision);
            let (out, responses) = tokio::sync::mpsc::channel(4);
            drop(in_background("backup-send", move || {
                let _slot = slot;
                send_backup(file, size, header, &out);
            }));
            let stream: BoxStream<SnapshotResponse> =
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(responses));
            Ok(stream)
        })
        .await
    }

    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Reply<HashKvResponse> {
        self.observe(MAINTENANCE, "HashKV", async {
            self.frontend.require_root(&request)?;
            self.frontend.refuse_learner()?;
            self.frontend.hash_kv(request.get_ref().revision)
        })
        .await
    }

    /// etcd rewrites its database file here and blocks every request meanwhile. Flotilla's
    /// store lives in memory and compaction already frees its space, so what is left to
    /// reclaim is on disk: the member saves a snapshot of its state now (a point-in-time view,
    /// encoded beside apply: requests go on), the log before it is truncated, and the WAL
    /// segments and the older snapshot file are unlinked. Answers once the snapshot is saved.
    async fn defragment(&self, request: Request<DefragmentRequest>) -> Reply<DefragmentResponse> {
        self.observe(MAINTENANCE, "Defragment", async {
            self.frontend.require_root(&request)?;
            let node = &self.frontend.node;
            let started = Instant::now();
            let bytes_before = node.storage.size_bytes();
            let target = node.status().applied;
            let deadline = started + DEFRAGMENT_TIME_MAX;
            // A snapshot already being saved (for an older index) makes the request a no-op
            // until it is done: ask again, a bounded number of times.
            for _ in 0..DEFRAGMENT_SNAPSHOT_ATTEMPTS {
                let seen = node.status().snapshot_index;
                if seen >= target {
                    break;
                }
                node.save_snapshot().await.map_err(node_status)?;
                node.wait_for(deadline, |s| s.snapshot_index > seen || s.stopped)
                    .await
                    .ok_or_else(|| Status::unavailable(REQUEST_TIMED_OUT))?;
            }
            let status = node.status();
            if status.stopped {
                return Err(Status::unavailable(crate::errors::SERVER_STOPPED));
            }
            if status.snapshot_index < target {
                return Err(Status::unavailable(format!(
                    "flotilla: defragment: no snapshot reached index {target} after \
                     {DEFRAGMENT_SNAPSHOT_ATTEMPTS} attempts (the newest is at {})",
                    status.snapshot_index
                )));
            }
            tracing::info!(
                snapshot_index = status.snapshot_index,
                disk_bytes_before = bytes_before,
                disk_bytes_after = node.storage.size_bytes(),
                elapsed = ?started.elapsed(),
                "defragmented: saved a snapshot and truncated the log"
            );
            Ok(DefragmentResponse {
                header: self.frontend.header(self.frontend.current_revision()),
            })
        })
        .await
    }

    async fn move_leader(&self, request: Request<MoveLeaderRequest>) -> Reply<MoveLeaderResponse> {
        self.observe(MAINTENANCE, "MoveLeader", async {
            self.frontend.require_root(&request)?;
            let target = request.get_ref().target_id;
            let me = self.frontend.identity.member_id;
            if self.frontend.node.status().leader != Some(me) {
                return Err(Status::failed_precondition(NOT_LEADER));
            }
            let is_voter =
                self.read_state(|s| s.members.get(target).is_some_and(|m| !m.is_learner));
            if !is_voter {
                return Err(Status::failed_precondition(BAD_LEADER_TRANSFEREE));
            }
            let deadline = self.frontend.deadline();
            self.frontend
                .node
                .transfer_leader(Some(target), Vec::new(), deadline)
                .await
                .map_err(node_status)?;
            self.frontend
                .node
                .wait_for(deadline, |s| s.leader == Some(target))
                .await
                .ok_or_else(|| Status::unavailable(REQUEST_TIMED_OUT))?;
            // etcd answers MoveLeader with no header, including a move to itself.
            Ok(MoveLeaderResponse { header: None })
        })
        .await
    }
}

#[tonic::async_trait]
impl Session for ClientServices {
    async fn register(
        &self,
        _request: Request<session::RegisterRequest>,
    ) -> Reply<session::RegisterResponse> {
        self.observe(SESSION, "Register", async {
            self.frontend.refuse_learner()?;
            let response = self
                .frontend
                .write(Command::register_session().encode(), 0)
                .await?;
            let revision = response.revision;
            let session_id = response.pick(|r| match r {
                AnswerResult::SessionRegistered(id) => Some(id),
                _ => None,
            })?;
            Ok(session::RegisterResponse {
                header: self.frontend.header(revision),
                session_id,
                ttl_seconds: self.frontend.session_ttl.as_secs() as i64,
            })
        })
        .await
    }

    async fn keep_alive(
        &self,
        request: Request<session::KeepAliveRequest>,
    ) -> Reply<session::KeepAliveResponse> {
        self.observe(SESSION, "KeepAlive", async {
            let alive = self
                .frontend
                .keep_session_alive(request.get_ref().session_id)
                .await?;
            Ok(session::KeepAliveResponse {
                header: self.frontend.header(self.frontend.current_revision()),
                alive,
            })
        })
        .await
    }

    async fn close(
        &self,
        request: Request<session::CloseRequest>,
    ) -> Reply<session::CloseResponse> {
        self.observe(SESSION, "Close", async {
            let id = request.get_ref().session_id;
            let command = Command::expire_sessions(vec![id]);
            let response = self.frontend.write(command.encode(), 0).await?;
            Ok(session::CloseResponse {
                header: self.frontend.header(response.revision),
            })
        })
        .await
    }
}

/// A server command announcing this member's name and client URLs.
pub fn publish_attributes_command(id: u64, name: &str, client_urls: &[String]) -> Bytes {
    encode_server_command(&ServerCommand {
        command: Some(server_command::Command::PublishAttributes(MemberInfo {
            id,
            name: name.to_string(),
            client_urls: client_urls.to_vec(),
            ..MemberInfo::default()
        })),
    })
}
