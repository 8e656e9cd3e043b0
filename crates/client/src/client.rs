//! [`Client`]: typed etcd v3 calls over a retry loop that knows which failures are safe to
//! retry, with duplicate-suppressed writes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::etcdserverpb::{AuthenticateRequest, auth_client::AuthClient};
use flotilla_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, MoveLeaderRequest, PutRequest, PutResponse,
    RangeRequest, RangeResponse, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
    cluster_client::ClusterClient, kv_client::KvClient, maintenance_client::MaintenanceClient,
};
use flotilla_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, WatchRequest, WatchResponse,
    lease_client::LeaseClient, watch_client::WatchClient,
};
use flotilla_proto::flotilla::session::v1::{
    CloseRequest, RegisterRequest, session_client::SessionClient,
};
use flotilla_proto::v3electionpb::election_client::ElectionClient;
use flotilla_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ResignRequest,
    ResignResponse,
};
use flotilla_proto::v3lockpb::lock_client::LockClient;
use flotilla_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use flotilla_proto::{SEQUENCE_METADATA_KEY, SESSION_METADATA_KEY};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::config::ClientConfig;
use crate::endpoint::{Endpoint, Endpoints};
use crate::error::{AttemptFailure, ClientError, classify};
use crate::session::{LentSession, SessionMode, SessionPool, SessionTag};

/// Responses may be large (a range over many keys); etcdctl accepts up to 2 GiB too.
const RESPONSE_BYTES_MAX: usize = i32::MAX as usize;
/// Concurrent callers that all miss the leader look for it once, not each.
const LEADER_DISCOVERY_INTERVAL_MIN: Duration = Duration::from_millis(250);
/// A write whose session keeps vanishing is not moved to new sessions forever.
const SESSION_REREGISTRATIONS_MAX: u32 = 3;

/// An etcd v3 client for a Flotilla (or etcd) cluster. Cheap to clone; clones share
/// connections and sessions.
///
/// Every call is bounded by the retry policy's call timeout. A call that returns `Ok` took
/// effect; an error says with [`ClientError::outcome`] whether it did not, or whether that is
/// unknown (see the crate documentation for the contract).
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    endpoints: Endpoints,
    sessions: SessionPool,
    /// When the leader was last looked for; held while looking.
    last_leader_discovery: tokio::sync::Mutex<Option<Instant>>,
    /// With credentials: the token to send, once authenticated (`Some(None)`: the cluster
    /// has auth off, so no token). Held while authenticating.
    token: tokio::sync::Mutex<Option<Option<String>>>,
}

/// How a call may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallKind {
    /// No effect on the cluster: retried after any failure that is not a definite answer.
    Read,
    /// A KV write: carries a session when the server has them, and is then retried like a
    /// read, with the same sequence number.
    SessionWrite,
    /// A write without sessions (membership changes, leadership transfer): retried only when
    /// it certainly did not take effect.
    PlainWrite,
}

/// What one attempt of a call gets: where to send, how to tag it, how long it has.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) channel: Channel,
    tag: Option<SessionTag>,
    timeout: Duration,
    token: Option<String>,
}

impl Attempt {
    /// The channel, and `message` as a request carrying the attempt's deadline and session.
    pub(crate) fn into_parts<T>(self, message: T) -> (Channel, tonic::Request<T>) {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(tag) = self.tag {
            let metadata = request.metadata_mut();
            metadata.insert(SESSION_METADATA_KEY, tag.session_id.into());
            metadata.insert(SEQUENCE_METADATA_KEY, tag.sequence.into());
        }
        insert_token(request.metadata_mut(), self.token.as_deref());
        (self.channel, request)
    }
}

/// Why the attempt loop stopped without a response.
enum LoopExit {
    Failed(ClientError),
    /// The session is gone and nothing was applied under it: register another and go on.
    SessionNotFound,
}

/// One endpoint's answer to Status.
#[derive(Debug)]
pub struct EndpointStatus {
    /// The endpoint as configured.
    pub endpoint: String,
    pub status: Result<StatusResponse, ClientError>,
}

/// The leader as found through Status and MemberList.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    pub member_id: u64,
    /// The endpoint requests to the leader go to.
    pub endpoint: String,
}

impl Client {
    /// Sets up connections (lazily: no request is made until the first call, as etcd's own
    /// clients do).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let tls = match &config.tls {
            None => None,
            Some(tls) => Some(
                tls.config()
                    .map_err(|e| ClientError::Tls(format!("{e:#}")))?,
            ),
        };
        let dialer = crate::endpoint::Dialer {
            dial_timeout: config.dial_timeout,
            connections_per_endpoint: config.connections_per_endpoint,
            tls,
        };
        let endpoints = Endpoints::new(&config.endpoints, dialer)?;
        let sessions = SessionPool::new(config.sessions);
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                endpoints,
                sessions,
                last_leader_discovery: tokio::sync::Mutex::new(None),
                token: tokio::sync::Mutex::new(None),
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Whether writes carry sessions (decided by the first write).
    pub fn session_mode(&self) -> SessionMode {
        self.inner.sessions.mode()
    }

    /// A channel to the preferred endpoint, for streams (watch, lease keep-alive) that manage
    /// their own reconnection.
    pub fn channel(&self) -> Channel {
        self.inner.endpoints.pick(0, false).1.channel()
    }

    // --- KV -------------------------------------------------------------------------------

    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<PutResponse, ClientError> {
        let request = PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        self.put_request(request).await
    }

    pub async fn put_request(&self, request: PutRequest) -> Result<PutResponse, ClientError> {
        self.execute(CallKind::SessionWrite, |attempt| {
            let (channel, request) = attempt.into_parts(request.clone());
            async move { kv(channel).put(request).await }
        })
        .await
    }

    /// A linearizable read of one key.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<RangeResponse, ClientError> {
        let request = RangeRequest {
            key: key.into(),
            ..Default::default()
        };
        self.range(request).await
    }

    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse, ClientError> {
        self.execute(CallKind::Read, |attempt| {
            let (channel, request) = attempt.into_parts(request.clone());
            async move { kv(channel).range(request).await }
        })
        .await
    }

    /// Deletes one key.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<DeleteRangeResponse, ClientError> {
        let request = DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        };
        self.delete_range(request).await
    }

    pub async fn delete_range(
        &self,
        request: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, ClientError> {
        self.execute(CallKind::SessionWrite, |attempt| {
            let (channel, request) = attempt.into_parts(request.clone());
            async move { kv(channel).delete_range(request).await }
        })
        .await
    }

    /// A transaction. A read-only one is still sent as a write: the client cannot tell
    /// whether the branch taken will write.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, ClientError> {
        self.execute(CallKind::SessionWrite, |attempt| {
            let (channel, request) = attempt.into_parts(request.clone());
            async move { kv(channel).txn(request).await }
        })
        .await
    }

    pub async fn compact(&self, revision: i64) -> Result<CompactionResponse, ClientError> {
        let request = CompactionRequest {
            revision,
            physical: false,
        };
        self.compact_request(request).await
    }

    pub async fn compact_request(
        &self,
        request: CompactionRequest,
    ) -> Result<CompactionResponse, ClientError> {
        self.execute(CallKind::SessionWrite, |attempt| {
            let (channel, request) = attempt.into_parts(request);
            async move { kv(channel).compact(request).await }
        })
        .await
    }

    // --- Lease --------------------------------------------------------------------------------

    /// Grants a lease (`id` 0: the server picks). Not retried once sent: a second grant
    /// would make a second lease.
    pub async fn lease_grant(
        &self,
        ttl_seconds: i64,
        id: i64,
    ) -> Result<LeaseGrantResponse, ClientError> {
        self.execute(CallKind::PlainWrite, |attempt| {
            let (channel, request) = attempt.into_parts(LeaseGrantRequest {
                ttl: ttl_seconds,
                id,
            });
            async move { lease(channel).lease_grant(request).await }
        })
        .await
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, ClientError> {
        self.execute(CallKind::PlainWrite, |attempt| {
            let (channel, request) = attempt.into_parts(LeaseRevokeRequest { id });
            async move { lease(channel).lease_revoke(request).await }
        })
        .await
    }

    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, ClientError> {
        self.execute(CallKind::Read, |attempt| {
            let (channel, request) = attempt.into_parts(LeaseTimeToLiveRequest { id, keys });
            async move { lease(channel).lease_time_to_live(request).await }
        })
        .await
    }

    pub async fn lease_leases(&self) -> Result<LeaseLeasesResponse, ClientError> {
        self.execute(CallKind::Read, |attempt| {
            let (channel, request) = attempt.into_parts(LeaseLeasesRequest {});
            async move { lease(channel).lease_leases(request).await }
        })
        .await
    }

    /// Renews a lease once (a LeaseKeepAlive stream of one request); TTL 0 means the lease
    /// is gone. Retried like a read: a renewal may be repeated without harm.
    pub async fn lease_keep_alive_once(
        &self,
        id: i64,
    ) -> Result<LeaseKeepAliveResponse, ClientError> {
        self.execute(CallKind::Read, |attempt| {
            let (channel, request) =
                attempt.into_parts(tokio_stream::iter([LeaseKeepAliveRequest { id }]));
            async move {
                let mut answers = lease(channel).lease_keep_alive(request).await?;
                let metadata = answers.metadata().clone();
                match answers.get_mut().message().await? {
                    Some(answer) => Ok(tonic::Response::from_parts(
                        metadata,
                        answer,
                        Default::default(),
                    )),
                    None => Err(Status::unavailable("the keep-alive stream ended")),
                }
            }
        })
        .await
    }

    // --- Watch -------------------------------------------------------------------------------

    /// Opens a Watch stream: requests go in through the returned sender (bounded), responses
    /// come out of the stream. `attempt` 0 is the preferred endpoint, each next one the next
    /// endpoint: a caller whose stream broke opens another with `attempt + 1` and resumes
    /// from its last revision + 1.
    pub async fn watch_stream(
        &self,
        attempt: u32,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<WatchRequest>,
            tonic::Streaming<WatchResponse>,
        ),
        ClientError,
    > {
        const REQUESTS_QUEUED_MAX: usize = 16;
        let (requests, outbound) = tokio::sync::mpsc::channel(REQUESTS_QUEUED_MAX);
        let mut call = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
        // etcdctl's watch asks to be told when its member has no leader.
        call.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let deadline = Instant::now() + self.inner.config.retry.call_timeout;
        insert_token(call.metadata_mut(), self.token(deadline).await?.as_deref());
        let (index, endpoint) = self.inner.endpoints.pick(attempt, false);
        let responses = WatchClient::new(endpoint.channel())
            .max_decoding_message_size(RESPONSE_BYTES_MAX)
            .watch(call)
            .await
            .inspect_err(|_| self.inner.endpoints.report_failure(index))
            .map_err(|status| match status.code() {
                // Opening a stream changes nothing: any failure is "not applied".
                Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
                    ClientError::Unavailable {
                        message: status.message().to_string(),
                        attempts: 1,
                    }
                }
                _ => ClientError::Rejected(status),
            })?;
        Ok((requests, responses.into_inner()))
    }

    // --- Cluster --------------------------------------------------------------------------

    pub async fn member_list(&self) -> Result<MemberListResponse, ClientError> {
        self.execute(CallKind::Read, |attempt| {
            let (channel, request) = attempt.into_parts(MemberListRequest::default());
            async move { cluster(channel).member_list(request).await }
        })
        .await
    }

    pub async fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<MemberAddResponse, ClientError> {
        let request = MemberAddRequest {
            peer_urls,
            is_learner,
        };
        self.execute(CallKind::PlainWrite, |attempt| {
            let (channel, request) = attempt.into_parts(request.clone());
            async move { cluster(channel).member_add(request).await }
        })
        .await
    }

    pub async fn member_remove(&self, member_id: u64) -> Result<MemberRemoveResponse, ClientError> {
        self.execute(CallKind::PlainWrite, |attempt| {
            let (channel, request) = attempt.into_parts(MemberRemoveRequest { id: member_id });
            async move { cluster(channel).member_remove(request).await }
        })
        .await
    }

    pub async fn member_promote(
        &self,
        member_id: u64,
    ) -> Result<MemberPromoteResponse, ClientError> {
        self.execute(CallKind::PlainWrite, |attempt| {
            let (channel, request) = attempt.into_parts(MemberPromoteRequest { id: member_id });
            async move { cluster(channel).member_promote(request).await }
        })
        .await
    }

    pub async fn member_update(
        &self,
        member_id: u64,
        peer_urls: Vec<String>,
    ) -> Result<MemberUpdateResponse, ClientError> {
        let request = MemberUpdateRequest {
            id: member_id,
            peer_urls,
        };
        self.execute(CallKind::PlainWrite, |attempt| {
            let (channel, request) = attempt.into_parts(request.clone());
            async move { cluster(channel).member_update(request).await }
        })
        .await
    }

    // --- Lock and Election services ---------------------------------------------------------
    // These calls wait (for the lock, for leadership) as long as it takes, so they are made
    // once, on the preferred endpoint, without the retry loop's attempt timeouts.

    /// A request carrying this client's token.
    async fn authenticated<T>(&self, message: T) -> Result<tonic::Request<T>, ClientError> {
        let mut request = tonic::Request::new(message);
        let deadline = Instant::now() + self.inner.config.retry.call_timeout;
        insert_token(
            request.metadata_mut(),
            self.token(deadline).await?.as_deref(),
        );
        Ok(request)
    }

    /// Waits for the lock `name` under `lease` (the Lock service); the ownership key.
    pub async fn lock(
        &self,
        name: impl Into<Bytes>,
        lease: i64,
    ) -> Result<LockResponse, ClientError> {
        let request = self
            .authenticated(LockRequest {
                name: name.into(),
                lease,
            })
            .await?;
        let response = LockClient::new(self.channel()).lock(request).await;
        Ok(response.map_err(ClientError::Rejected)?.into_inner())
    }

    /// Releases the lock held through `key`.
    pub async fn unlock(&self, key: impl Into<Bytes>) -> Result<UnlockResponse, ClientError> {
        let request = self
            .authenticated(UnlockRequest { key: key.into() })
            .await?;
        let response = LockClient::new(self.channel()).unlock(request).await;
        Ok(response.map_err(ClientError::Rejected)?.into_inner())
    }

    /// Waits to lead the election `name` with `value` under `lease`.
    pub async fn campaign(
        &self,
        name: impl Into<Bytes>,
        lease: i64,
        value: impl Into<Bytes>,
    ) -> Result<CampaignResponse, ClientError> {
        let request = self
            .authenticated(CampaignRequest {
                name: name.into(),
                lease,
                value: value.into(),
            })
            .await?;
        let response = ElectionClient::new(self.channel()).campaign(request).await;
        Ok(response.map_err(ClientError::Rejected)?.into_inner())
    }

    /// Gives up leadership.
    pub async fn resign(&self, leader: LeaderKey) -> Result<ResignResponse, ClientError> {
        let request = self
            .authenticated(ResignRequest {
                leader: Some(leader),
            })
            .await?;
        let response = ElectionClient::new(self.channel()).resign(request).await;
        Ok(response.map_err(ClientError::Rejected)?.into_inner())
    }

    /// The election's leaders as they change, starting with the current one.
    pub async fn observe(
        &self,
        name: impl Into<Bytes>,
    ) -> Result<tonic::Streaming<LeaderResponse>, ClientError> {
        let request = self
            .authenticated(LeaderRequest { name: name.into() })
            .await?;
        let response = ElectionClient::new(self.channel()).observe(request).await;
        Ok(response.map_err(ClientError::Rejected)?.into_inner())
    }

    // --- Maintenance ----------------------------------------------------------------------

    /// Status of whichever endpoint answers first.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.execute(CallKind::Read, |attempt| {
            let (channel, request) = attempt.into_parts(StatusRequest::default());
            async move { maintenance(channel).status(request).await }
        })
        .await
    }

    /// Status of every endpoint, in the configured order, each asked once within the call
    /// timeout.
    pub async fn endpoint_statuses(&self) -> Vec<EndpointStatus> {
        let timeout = self.inner.config.retry.call_timeout;
        let endpoints = self.inner.endpoints.all();
        let mut results = status_of_each(&endpoints, timeout).await;
        endpoints
            .iter()
            .enumerate()
            .map(|(index, endpoint)| EndpointStatus {
                endpoint: endpoint.name.clone(),
                status: results[index].take().expect("one result per endpoint"),
            })
            .collect()
    }

    /// Finds the leader: Status on every endpoint gives its member id, and, if none of the
    /// endpoints is the leader itself, MemberList gives its client URL.
    pub async fn find_leader(&self) -> Result<LeaderInfo, ClientError> {
        let endpoints = self.inner.endpoints.all();
        let results = status_of_each(&endpoints, self.inner.config.dial_timeout).await;
        let mut leader_id = 0;
        let mut errors = Vec::new();
        for (index, result) in results.into_iter().enumerate() {
            match result.expect("one result per endpoint") {
                Ok(status) if status.leader != 0 => {
                    let member_id = status.header.map_or(0, |header| header.member_id);
                    if member_id == status.leader {
                        self.inner.endpoints.set_leader_index(index);
                        return Ok(LeaderInfo {
                            member_id,
                            endpoint: endpoints[index].name.clone(),
                        });
                    }
                    leader_id = status.leader;
                }
                Ok(_) => errors.push(format!("{}: no leader", endpoints[index].name)),
                Err(error) => errors.push(format!("{}: {error}", endpoints[index].name)),
            }
        }
        if leader_id == 0 {
            return Err(ClientError::NoLeader(errors.join("; ")));
        }
        self.locate_member(leader_id).await
    }

    /// Makes `member_id`'s endpoint the leader's, from its advertised client URL.
    async fn locate_member(&self, member_id: u64) -> Result<LeaderInfo, ClientError> {
        let members = self.member_list_once().await?.members;
        let url = members
            .iter()
            .find(|member| member.id == member_id)
            .and_then(|member| member.client_urls.first())
            .ok_or_else(|| {
                ClientError::NoLeader(format!("leader {member_id:x} has no client URL"))
            })?;
        let index = self.inner.endpoints.set_leader_url(url)?;
        let endpoint = self.inner.endpoints.all()[index].name.clone();
        Ok(LeaderInfo {
            member_id,
            endpoint,
        })
    }

    /// MemberList from the first endpoint that answers, without the retry loop (which
    /// itself looks for the leader through here).
    async fn member_list_once(&self) -> Result<MemberListResponse, ClientError> {
        let timeout = self.inner.config.dial_timeout;
        let mut last_error = ClientError::NoEndpoints;
        for endpoint in self.inner.endpoints.all() {
            let mut request = tonic::Request::new(MemberListRequest::default());
            request.set_timeout(timeout);
            let mut client = cluster(endpoint.channel());
            match tokio::time::timeout(timeout, client.member_list(request)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => last_error = ClientError::Rejected(status),
                Err(_elapsed) => {
                    last_error = ClientError::Unavailable {
                        message: format!("{}: no answer within {timeout:?}", endpoint.name),
                        attempts: 1,
                    }
                }
            }
        }
        Err(last_error)
    }

    /// Transfers leadership to `target_id`. MoveLeader must reach the leader, so the leader
    /// is found first, and again if it moved meanwhile. Returns the former leader's id.
    pub async fn move_leader(&self, target_id: u64) -> Result<u64, ClientError> {
        let policy = &self.inner.config.retry;
        let deadline = Instant::now() + policy.call_timeout;
        let mut last_error = String::new();
        for round in 0..policy.attempts_max {
            if round > 0 {
                self.backoff(round, deadline).await;
            }
            if Instant::now() >= deadline {
                break;
            }
            let leader = match self.find_leader().await {
                Ok(leader) => leader,
                Err(error) => {
                    last_error = error.to_string();
                    continue;
                }
            };
            let (_, endpoint) = self.inner.endpoints.leader().expect("find_leader sets it");
            let attempt = Attempt {
                channel: endpoint.channel(),
                tag: None,
                timeout: deadline.saturating_duration_since(Instant::now()),
                token: self.token(deadline).await?,
            };
            let (channel, request) = attempt.into_parts(MoveLeaderRequest { target_id });
            match maintenance(channel).move_leader(request).await {
                Ok(_) => return Ok(leader.member_id),
                Err(status) if status.message() == "etcdserver: not leader" => {
                    self.inner.endpoints.forget_leader();
                    last_error = format!("{}: {}", endpoint.name, status.message());
                }
                Err(status) => match classify(&status) {
                    AttemptFailure::NotApplied | AttemptFailure::MaybeApplied => {
                        self.inner.endpoints.forget_leader();
                        last_error = format!("{}: {}", endpoint.name, describe(&status));
                    }
                    _ => return Err(ClientError::Rejected(status)),
                },
            }
        }
        Err(ClientError::Unavailable {
            message: format!("could not transfer leadership: {last_error}"),
            attempts: policy.attempts_max,
        })
    }

    /// Closes the sessions not in use (best effort; the server expires forgotten ones).
    pub async fn close(&self) {
        for session in self.inner.sessions.drain_idle() {
            let (_, endpoint) = self.inner.endpoints.pick(0, false);
            let mut request = tonic::Request::new(CloseRequest {
                session_id: session.id,
            });
            request.set_timeout(self.inner.config.dial_timeout);
            let _ = SessionClient::new(endpoint.channel()).close(request).await;
        }
    }

    // --- The retry loop -------------------------------------------------------------------

    /// Runs `send` until it succeeds, fails definitely, or the retry budget runs out.
    pub(crate) async fn execute<R, F, Fut>(
        &self,
        kind: CallKind,
        mut send: F,
    ) -> Result<R, ClientError>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let deadline = Instant::now() + self.inner.config.retry.call_timeout;
        let mut lent = match kind {
            CallKind::SessionWrite => self.lend_session(deadline).await?,
            _ => None,
        };
        let mut reregistrations = 0;
        let result = loop {
            match self
                .attempt_loop(kind, &mut lent, deadline, &mut send)
                .await
            {
                Ok(response) => break Ok(response),
                Err(LoopExit::Failed(error)) => break Err(error),
                Err(LoopExit::SessionNotFound) if reregistrations < SESSION_REREGISTRATIONS_MAX => {
                    reregistrations += 1;
                    if let Err(error) = self.move_to_new_session(&mut lent, deadline).await {
                        break Err(error);
                    }
                }
                Err(LoopExit::SessionNotFound) => {
                    break Err(ClientError::Unavailable {
                        message: "the server keeps forgetting this client's sessions".into(),
                        attempts: reregistrations,
                    });
                }
            }
        };
        if let Some(lent) = lent {
            self.inner.sessions.give_back(lent);
        }
        result
    }

    async fn attempt_loop<R, F, Fut>(
        &self,
        kind: CallKind,
        lent: &mut Option<LentSession>,
        deadline: Instant,
        send: &mut F,
    ) -> Result<R, LoopExit>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let policy = &self.inner.config.retry;
        let want_leader = kind != CallKind::Read && self.inner.config.route_writes_to_leader;
        if want_leader {
            self.ensure_leader_known().await;
        }
        let retry_is_safe = kind == CallKind::Read || lent.is_some();
        let mut token = self.token(deadline).await.map_err(LoopExit::Failed)?;
        let mut reauthenticated = false;
        let mut maybe_applied = false;
        let mut last_error = String::from("no attempt made");
        let mut attempts = 0;
        while attempts < policy.attempts_max && Instant::now() < deadline {
            let remaining = deadline - Instant::now();
            let timeout = if retry_is_safe {
                policy.attempt_timeout.min(remaining)
            } else {
                remaining
            };
            let (index, endpoint) = self.inner.endpoints.pick(attempts, want_leader);
            attempts += 1;
            let attempt = Attempt {
                channel: endpoint.channel(),
                tag: lent.as_ref().map(|lent| lent.tag),
                timeout,
                token: token.clone(),
            };
            let failure = match tokio::time::timeout(timeout, send(attempt)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => {
                    last_error = format!("{}: {}", endpoint.name, describe(&status));
                    match classify(&status) {
                        AttemptFailure::Final => {
                            return Err(LoopExit::Failed(ClientError::Rejected(status)));
                        }
                        failure => failure,
                    }
                }
                Err(_elapsed) => {
                    last_error = format!("{}: no answer within {timeout:?}", endpoint.name);
                    AttemptFailure::MaybeApplied
                }
            };
            match failure {
                AttemptFailure::NotApplied => self.inner.endpoints.report_failure(index),
                AttemptFailure::MaybeApplied => {
                    self.inner.endpoints.report_failure(index);
                    maybe_applied |= kind != CallKind::Read;
                    if !retry_is_safe {
                        return Err(LoopExit::Failed(ClientError::OutcomeUnknown {
                            reason: last_error,
                            attempts,
                        }));
                    }
                }
                AttemptFailure::SessionNotFound => {
                    return Err(self.session_lost(lent, maybe_applied, attempts));
                }
                AttemptFailure::StaleSequence => {
                    return Err(LoopExit::Failed(ClientError::OutcomeUnknown {
                        reason: format!("{last_error} (the session moved past this write)"),
                        attempts,
                    }));
                }
                AttemptFailure::ResponseNotRetained => {
                    return Err(LoopExit::Failed(ClientError::AppliedResponseLost));
                }
                // Once per call, as etcd's clients do: a second refusal is the answer.
                AttemptFailure::CredentialsStale if !reauthenticated => {
                    reauthenticated = true;
                    token = self
                        .reauthenticate(token.as_deref(), deadline)
                        .await
                        .map_err(LoopExit::Failed)?;
                    continue;
                }
                AttemptFailure::CredentialsStale => {
                    return Err(LoopExit::Failed(ClientError::Unavailable {
                        message: format!("authenticated again and still refused: {last_error}"),
                        attempts,
                    }));
                }
                AttemptFailure::Final => unreachable!("final answers return above"),
            }
            // Go round the endpoints at once; back off between rounds.
            let endpoint_count = self.inner.endpoints.len() as u32;
            if attempts % endpoint_count == 0 {
                self.backoff(attempts / endpoint_count, deadline).await;
            }
        }
        let call_timeout = policy.call_timeout;
        Err(LoopExit::Failed(if maybe_applied {
            ClientError::OutcomeUnknown {
                reason: format!("gave up after {attempts} attempts; last error: {last_error}"),
                attempts,
            }
        } else {
            ClientError::Unavailable {
                message: format!(
                    "no endpoint served the request within {call_timeout:?} \
                     ({attempts} attempts); last error: {last_error}"
                ),
                attempts,
            }
        }))
    }

    /// The token to send: none without credentials or when the cluster has auth off;
    /// authenticates first if this client has not yet.
    pub(crate) async fn token(&self, deadline: Instant) -> Result<Option<String>, ClientError> {
        if self.inner.config.credentials.is_none() {
            return Ok(None);
        }
        let mut token = self.inner.token.lock().await;
        if let Some(known) = &*token {
            return Ok(known.clone());
        }
        let fresh = self.authenticate(deadline).await?;
        *token = Some(fresh.clone());
        Ok(fresh)
    }

    /// A new token in place of `stale` (unless another call already replaced it).
    async fn reauthenticate(
        &self,
        stale: Option<&str>,
        deadline: Instant,
    ) -> Result<Option<String>, ClientError> {
        let mut token = self.inner.token.lock().await;
        if let Some(known) = &*token
            && known.as_deref() != stale
        {
            return Ok(known.clone());
        }
        let fresh = self.authenticate(deadline).await?;
        *token = Some(fresh.clone());
        Ok(fresh)
    }

    /// Authenticate on the endpoints in turn; `None` when the cluster has auth off (etcd's
    /// clients then go on without a token).
    async fn authenticate(&self, deadline: Instant) -> Result<Option<String>, ClientError> {
        let credentials = self
            .inner
            .config
            .credentials
            .clone()
            .expect("authenticate is called with credentials");
        let mut last_error = ClientError::NoEndpoints;
        for endpoint in self.inner.endpoints.all() {
            let timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                break;
            }
            let mut request = tonic::Request::new(AuthenticateRequest {
                name: credentials.user.clone(),
                password: credentials.password.clone(),
            });
            request.set_timeout(timeout);
            let mut auth = AuthClient::new(endpoint.channel());
            match tokio::time::timeout(timeout, auth.authenticate(request)).await {
                Ok(Ok(response)) => return Ok(Some(response.into_inner().token)),
                Ok(Err(status)) if status.message() == AUTH_NOT_ENABLED => return Ok(None),
                Ok(Err(status)) if classify(&status) == AttemptFailure::Final => {
                    return Err(ClientError::Rejected(status));
                }
                Ok(Err(status)) => last_error = ClientError::Rejected(status),
                Err(_elapsed) => {
                    last_error = ClientError::Unavailable {
                        message: format!("{}: no answer to Authenticate", endpoint.name),
                        attempts: 1,
                    }
                }
            }
        }
        Err(last_error)
    }

    /// The server does not know the write's session. If no attempt may have been applied,
    /// the write can move to a new session; otherwise an earlier attempt may have been
    /// applied before the session vanished, and a retry under a new session could apply it
    /// twice, so the outcome is unknown.
    fn session_lost(
        &self,
        lent: &mut Option<LentSession>,
        maybe_applied: bool,
        attempts: u32,
    ) -> LoopExit {
        let lent = lent
            .as_mut()
            .expect("only writes with a session hear of sessions");
        lent.lost = true;
        if !maybe_applied {
            return LoopExit::SessionNotFound;
        }
        LoopExit::Failed(ClientError::OutcomeUnknown {
            reason: format!(
                "session {} expired while an earlier attempt's outcome was unknown",
                lent.tag.session_id
            ),
            attempts,
        })
    }

    async fn move_to_new_session(
        &self,
        lent: &mut Option<LentSession>,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        match self.register_session(deadline).await? {
            Some(session_id) => {
                let lent = lent.as_mut().expect("a lost session is still lent");
                lent.tag = SessionTag {
                    session_id,
                    sequence: 1,
                };
                lent.lost = false;
            }
            None => *lent = None,
        }
        Ok(())
    }

    /// A session for one write, registering one if the pool has a free slot but no session.
    /// `None` in plain mode.
    async fn lend_session(&self, deadline: Instant) -> Result<Option<LentSession>, ClientError> {
        let acquired = tokio::time::timeout_at(deadline, self.inner.sessions.acquire()).await;
        let permit = match acquired {
            Ok(Ok(lent)) => return Ok(lent),
            Ok(Err(permit)) => permit,
            Err(_elapsed) => {
                return Err(ClientError::Unavailable {
                    message: "timed out waiting for a free session (too many writes in flight)"
                        .into(),
                    attempts: 0,
                });
            }
        };
        Ok(self
            .register_session(deadline)
            .await?
            .map(|session_id| self.inner.sessions.lend_new(session_id, permit)))
    }

    /// Registers a session; `None` if the server has no Session service. Registering is
    /// retried freely: a duplicate registration only leaves an unused session to expire.
    async fn register_session(&self, deadline: Instant) -> Result<Option<u64>, ClientError> {
        let mut send = |attempt: Attempt| {
            let (channel, request) = attempt.into_parts(RegisterRequest {});
            async move { SessionClient::new(channel).register(request).await }
        };
        match self
            .attempt_loop(CallKind::Read, &mut None, deadline, &mut send)
            .await
        {
            Ok(response) => {
                self.inner.sessions.mark_sessions_supported();
                tracing::debug!(session_id = response.session_id, "registered a session");
                Ok(Some(response.session_id))
            }
            Err(LoopExit::Failed(ClientError::Rejected(status)))
                if status.code() == Code::Unimplemented =>
            {
                self.inner.sessions.fall_back_to_plain();
                Ok(None)
            }
            Err(LoopExit::Failed(error)) => Err(error),
            Err(LoopExit::SessionNotFound) => unreachable!("registration carries no session"),
        }
    }

    /// Looks for the leader unless it is known or someone looked a moment ago. Failure is
    /// fine: writes then go to the preferred endpoint, which forwards them.
    async fn ensure_leader_known(&self) {
        if self.inner.endpoints.leader().is_some() {
            return;
        }
        let mut last_discovery = self.inner.last_leader_discovery.lock().await;
        if self.inner.endpoints.leader().is_some() {
            return;
        }
        if last_discovery.is_some_and(|at| at.elapsed() < LEADER_DISCOVERY_INTERVAL_MIN) {
            return;
        }
        *last_discovery = Some(Instant::now());
        match self.find_leader().await {
            Ok(leader) => tracing::debug!(?leader, "found the leader"),
            Err(error) => tracing::debug!(%error, "leader not found; writes go to any endpoint"),
        }
    }

    /// Sleeps before round `round` (1-based) of retries: exponential, with jitter so many
    /// clients do not retry in step, and never past the deadline.
    async fn backoff(&self, round: u32, deadline: Instant) {
        let policy = &self.inner.config.retry;
        let exponential = policy
            .backoff_initial
            .saturating_mul(1 << round.saturating_sub(1).min(16))
            .min(policy.backoff_max);
        let jittered = exponential.mul_f64(0.75 + 0.5 * jitter_fraction());
        tokio::time::sleep_until((Instant::now() + jittered).min(deadline)).await;
    }
}

/// Status of each endpoint in parallel, each bounded by `timeout`; results in input order.
async fn status_of_each(
    endpoints: &[Arc<Endpoint>],
    timeout: Duration,
) -> Vec<Option<Result<StatusResponse, ClientError>>> {
    let mut tasks = JoinSet::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        let channel = endpoint.channel();
        tasks.spawn(async move {
            let mut request = tonic::Request::new(StatusRequest::default());
            request.set_timeout(timeout);
            let answer = tokio::time::timeout(timeout, maintenance(channel).status(request)).await;
            let result = match answer {
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(status)) => Err(ClientError::Rejected(status)),
                Err(_elapsed) => Err(ClientError::Unavailable {
                    message: format!("no answer within {timeout:?}"),
                    attempts: 1,
                }),
            };
            (index, result)
        });
    }
    let mut results: Vec<_> = endpoints.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined.expect("status tasks do not panic");
        results[index] = Some(result);
    }
    results
}

/// A status for messages: its text, or its code when the text is empty.
/// etcd's metadata key for the token.
const TOKEN_METADATA_KEY: &str = "token";
/// What Authenticate answers a cluster with auth off.
const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";

fn insert_token(metadata: &mut tonic::metadata::MetadataMap, token: Option<&str>) {
    if let Some(value) = token.and_then(|t| tonic::metadata::MetadataValue::try_from(t).ok()) {
        metadata.insert(TOKEN_METADATA_KEY, value);
    }
}

fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    }
}

/// A number in [0, 1) that differs between calls, for backoff jitter (no need for a real RNG).
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let random = RandomState::new().hash_one(std::time::Instant::now());
    (random >> 11) as f64 / (1u64 << 53) as f64
}

fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

fn lease(channel: Channel) -> LeaseClient<Channel> {
    LeaseClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

fn cluster(channel: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

fn maintenance(channel: Channel) -> MaintenanceClient<Channel> {
    MaintenanceClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}
