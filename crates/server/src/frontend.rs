//! What the client services share: proposing writes (here or, on a follower, forwarded to the
//! leader), linearizable read barriers, membership changes, response headers, session activity.
//!
//! Any member serves any request (etcd-api.md §3.3): a write on a follower is forwarded to the
//! leader over the peer channel and answered with the leader's result; a linearizable read
//! waits for a read index (which the core fetches from the leader) and is then served from the
//! local state machine. A write is retried elsewhere only when it certainly did not happen (the
//! member asked was not the leader); an unknown outcome is returned as an error, never retried
//! here, so a write without a session is applied at most once.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_kv::{Author, Command, Response};
use flotilla_kv::{Operation, space_cost_bytes};
use flotilla_proto::etcdserverpb::alarm_request::AlarmAction;
use flotilla_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, AlarmType, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    ResponseHeader,
};
use flotilla_proto::{SEQUENCE_METADATA_KEY, SESSION_METADATA_KEY};
use flotilla_raft::{ConfChange, ConfChangeStep, Index, NodeId};
use prost::Message as _;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::driver::Refusal;
use crate::errors::{
    FORWARD_NOT_LEADER, FORWARD_UNDELIVERED, INVALID_URLS, MEMBER_NOT_FOUND, NO_LEADER,
    PEER_URL_EXISTS, REQUEST_TIMED_OUT, REQUEST_TIMED_OUT_LEADER_FAIL, TOO_MANY_REQUESTS,
    kv_status, node_status,
};
use crate::held::HeldRequests;
use crate::lease::{LeaseError, Lessor};
use crate::members::{encode_server_command, member_id};
use crate::node::{NodeError, NodeHandle};
use crate::peer_proto::peer_client::PeerClient;
use crate::peer_proto::{
    ForwardRequest, ForwardResponse, MemberChange, MemberInfo, Members, ServerCommand,
    forward_request, forward_response, member_change, server_command,
};
use crate::state_machine::Applied;
use crate::transport::{PeerIdentity, peer_client};

/// What a request presented to say who sent it.
#[derive(Clone, Debug)]
pub enum Credentials {
    None,
    Token(String),
    /// The common name of a verified client certificate (with --client-cert-auth).
    Certificate(String),
    /// Already resolved: the caller a service acts for (see `ClientServices::acting_for`).
    Resolved(Author),
}

/// At most this many requests wait for a leader at once, holding at most this many bytes;
/// more are refused with "too many requests".
pub const HELD_REQUESTS_MAX: usize = 10_000;
pub const HELD_BYTES_MAX: usize = 64 << 20;

/// What the space quota check needs of the state, read with the request limits (one lock).
#[derive(Clone, Copy, Debug)]
pub struct SpaceInUse {
    pub size_bytes: u64,
    pub nospace_active: bool,
}

impl SpaceInUse {
    pub fn of(state: &crate::state_machine::StateMachine) -> SpaceInUse {
        SpaceInUse {
            size_bytes: state.kv.size_bytes(),
            nospace_active: state.alarms.is_active(AlarmType::Nospace),
        }
    }
}

/// Shared by every service of a member.
#[derive(Debug)]
pub struct Frontend {
    pub node: NodeHandle,
    pub identity: Arc<PeerIdentity>,
    pub cluster_token: String,
    pub request_timeout: Duration,
    pub election_timeout: Duration,
    pub session_ttl: Duration,
    /// The lease clock (ticking only while this member leads).
    pub lessor: Arc<Lessor>,
    /// The space quota (`--quota-backend-bytes`), `None` for none.
    pub quota_bytes: Option<u64>,
    /// The tokens this member accepts and issues.
    pub tokens: Arc<crate::auth::Tokens>,
    /// `--bcrypt-cost` for passwords hashed here.
    pub bcrypt_cost: u32,
    /// `--client-cert-auth`: a verified client certificate's common name is the user.
    pub client_cert_auth: bool,
    /// This member is proposing its NOSPACE alarm: others refused meanwhile need not.
    raising_nospace: std::sync::atomic::AtomicBool,
    peers: Mutex<BTreeMap<NodeId, (String, PeerClient<Channel>)>>,
    /// Requests waiting for a leader (bounded).
    held: HeldRequests,
    /// On the leader: when each client session was last heard of.
    session_activity: Mutex<BTreeMap<u64, Instant>>,
    /// When each peer last sent Raft messages here: a member heard from recently is
    /// "started", for etcd's check that a reconfiguration keeps a quorum of started members.
    pub peer_activity: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Frontend {
    pub fn new(
        node: NodeHandle,
        identity: Arc<PeerIdentity>,
        cluster_token: String,
        request_timeout: Duration,
        election_timeout: Duration,
        session_ttl: Duration,
        lessor: Arc<Lessor>,
    ) -> Frontend {
        Frontend {
            node,
            identity,
            cluster_token,
            request_timeout,
            election_timeout,
            session_ttl,
            lessor,
            quota_bytes: None,
            tokens: Arc::new(crate::auth::Tokens::new(
                crate::auth::TokenKind::Simple,
                crate::auth::tokens::DEFAULT_TOKEN_TTL,
            )),
            bcrypt_cost: crate::auth::password::DEFAULT_BCRYPT_COST,
            client_cert_auth: false,
            raising_nospace: std::sync::atomic::AtomicBool::new(false),
            peers: Mutex::new(BTreeMap::new()),
            held: HeldRequests::new(HELD_REQUESTS_MAX, HELD_BYTES_MAX),
            session_activity: Mutex::new(BTreeMap::new()),
            peer_activity: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets the space quota (none by default).
    pub fn with_quota(mut self, quota_bytes: Option<u64>) -> Frontend {
        self.quota_bytes = quota_bytes;
        self
    }

    /// Sets the token table (shared with the apply thread's observers), the bcrypt cost and
    /// whether client certificates name users.
    pub fn with_auth(
        mut self,
        tokens: Arc<crate::auth::Tokens>,
        bcrypt_cost: u32,
        client_cert_auth: bool,
    ) -> Frontend {
        self.tokens = tokens;
        self.bcrypt_cost = bcrypt_cost;
        self.client_cert_auth = client_cert_auth;
        self
    }

    // ----- Credentials -----------------------------------------------------------------------

    /// Reads the applied auth store.
    pub fn read_auth<T>(&self, f: impl FnOnce(&crate::auth::AuthStore) -> T) -> T {
        let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
        f(&state.auth)
    }

    /// Who sent `request`: the user its token names, or (with --client-cert-auth) its
    /// certificate's common name, with the auth revision to judge it at; an empty user for
    /// a request without credentials, which auth refuses once it is on ("user name is
    /// empty"). A token that is not valid here is refused at once ("invalid auth token":
    /// the client authenticates again). With auth off, credentials are not looked at.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Author, Status> {
        let (enabled, revision) = self.read_auth(|auth| (auth.enabled(), auth.revision()));
        if !enabled {
            return Ok(Author::default());
        }
        self.resolve_at(&self.credentials(request), revision)
    }

    /// What `request` presents, kept by a long-lived stream (Watch) to resolve at each of
    /// its requests.
    pub fn credentials<T>(&self, request: &Request<T>) -> Credentials {
        if let Some(token) = crate::auth::credentials::token_of(request.metadata()) {
            return Credentials::Token(token.to_string());
        }
        // Parsing the certificate costs a few microseconds: only when auth is on (if it comes
        // on during the request, the request counts as anonymous and is refused, never let
        // through).
        if self.client_cert_auth
            && self.read_auth(|auth| auth.enabled())
            && let Some(user) = crate::auth::credentials::common_name(request.extensions())
        {
            return Credentials::Certificate(user);
        }
        Credentials::None
    }

    /// The caller `credentials` stand for now (see [`Frontend::caller`]).
    pub fn resolve(&self, credentials: &Credentials) -> Result<Author, Status> {
        let (enabled, revision) = self.read_auth(|auth| (auth.enabled(), auth.revision()));
        if !enabled {
            return Ok(Author::default());
        }
        self.resolve_at(credentials, revision)
    }

    /// [`Frontend::resolve`] with auth on, at the store's auth `revision`.
    fn resolve_at(&self, credentials: &Credentials, revision: u64) -> Result<Author, Status> {
        let (user, auth_revision) = match credentials {
            Credentials::Resolved(author) => return Ok(author.clone()),
            Credentials::Token(token) => {
                let info = self
                    .tokens
                    .lookup(token)
                    .ok_or(crate::auth::AuthError::InvalidAuthToken)?;
                (info.user, info.revision.unwrap_or(revision))
            }
            Credentials::Certificate(user) => (user.clone(), revision),
            Credentials::None => (String::new(), revision),
        };
        Ok(Author {
            user,
            auth_revision,
        })
    }

    /// etcd's IsAdminPermitted for `request`'s caller: the root role, once auth is on.
    pub fn require_root<T>(&self, request: &Request<T>) -> Result<Author, Status> {
        let caller = self.caller(request)?;
        self.read_auth(|auth| auth.check_admin(&caller.user))?;
        Ok(caller)
    }

    /// A read's permission, checked by the member serving it after its read barrier, so
    /// against an auth state at least as new as the barrier (etcd's doSerialize).
    pub fn check_read(&self, caller: &Author, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        self.read_auth(|auth| {
            auth.check_keys(
                &caller.user,
                caller.auth_revision,
                crate::auth::Access::Read,
                key,
                range_end,
            )
        })
        .map_err(Status::from)
    }

    pub fn deadline(&self) -> Instant {
        Instant::now() + self.request_timeout
    }

    /// A response header: cluster, this member, the revision given, the current term.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.node.status().term,
        })
    }

    pub fn current_revision(&self) -> i64 {
        self.node
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .kv
            .current_revision()
    }

    // ----- Request checks ------------------------------------------------------------------

    /// Learners serve only Status and serializable Range (etcd-api.md §3.3).
    pub fn refuse_learner(&self) -> Result<(), Status> {
        if self.node.status().is_learner {
            return Err(Status::unavailable(crate::errors::LEARNER_NOT_SUPPORTED));
        }
        Ok(())
    }

    /// A member the CORRUPT alarm names serves no reads: its state differs from the others'.
    /// (etcd keeps serving reads under CORRUPT; the other members still do here.)
    pub fn refuse_if_corrupt(&self) -> Result<(), Status> {
        let me = self.identity.member_id;
        let corrupt = {
            let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
            state.alarms.names(me, AlarmType::Corrupt)
        };
        if corrupt {
            return Err(kv_status(&flotilla_kv::KvError::new(
                flotilla_kv::ErrorKind::Corrupt,
            )));
        }
        Ok(())
    }

    /// etcd's "require leader" metadata (`hasleader: true`).
    pub fn check_require_leader<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let required = request
            .metadata()
            .get("hasleader")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "true");
        if required && self.node.status().leader.is_none() {
            return Err(Status::unavailable(NO_LEADER));
        }
        Ok(())
    }

    /// Tags a command with the client's session and sequence number, if it sent them.
    pub fn tag_session<T>(
        &self,
        request: &Request<T>,
        command: Command,
    ) -> Result<(Command, u64), Status> {
        let metadata = request.metadata();
        let read = |key: &str| -> Result<Option<u64>, Status> {
            match metadata.get(key) {
                None => Ok(None),
                Some(value) => value
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|&v| v != 0)
                    .map(Some)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "flotilla: metadata {key} must be a positive decimal integer"
                        ))
                    }),
            }
        };
        match (read(SESSION_METADATA_KEY)?, read(SEQUENCE_METADATA_KEY)?) {
            (Some(session), Some(sequence)) => {
                Ok((command.with_client_request(session, sequence), session))
            }
            (None, None) => Ok((command, 0)),
            _ => Err(Status::invalid_argument(format!(
                "flotilla: metadata {SESSION_METADATA_KEY} and {SEQUENCE_METADATA_KEY} go together"
            ))),
        }
    }

    // ----- Writes --------------------------------------------------------------------------

    /// etcd's quota check before proposing. A request that takes space is refused with
    /// "database space exceeded" while a NOSPACE alarm is active (apply would refuse it
    /// anyway), or when it would take the store past the quota: then this member first raises
    /// NOSPACE through the log, as etcd's quota alarmer does, so that every member stops
    /// admitting writes. Requests that take no space (reads, deletes, compactions,
    /// revocations) always pass: they are how an operator gets back under the quota.
    pub async fn check_space(
        &self,
        operation: &Operation,
        space: SpaceInUse,
    ) -> Result<(), Status> {
        let cost = space_cost_bytes(operation);
        if cost == 0 {
            return Ok(());
        }
        let no_space = || kv_status(&flotilla_kv::KvError::new(flotilla_kv::ErrorKind::NoSpace));
        if space.nospace_active {
            return Err(no_space());
        }
        match self.quota_bytes {
            Some(quota) if space.size_bytes.saturating_add(cost) > quota => {
                self.raise_nospace(space.size_bytes, cost, quota).await;
                Err(no_space())
            }
            _ => Ok(()),
        }
    }

    async fn raise_nospace(&self, size: u64, cost: u64, quota: u64) {
        if self.raising_nospace.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            size_bytes = size,
            request_bytes = cost,
            quota_bytes = quota,
            "the space quota is exhausted: raising the NOSPACE alarm (writes that take space \
             fail until an operator compacts, defragments and disarms it)"
        );
        let request = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.identity.member_id,
            alarm: AlarmType::Nospace as i32,
        };
        let command = ServerCommand {
            command: Some(server_command::Command::Alarm(request)),
        };
        if let Err(status) = self.write(encode_server_command(&command), 0).await {
            tracing::warn!("could not raise the NOSPACE alarm: {status}");
        }
        self.raising_nospace.store(false, Ordering::Release);
    }

    /// Proposes an encoded command, here or at the leader, and returns its result.
    pub async fn write(&self, data: Bytes, session_id: u64) -> Result<ForwardResponse, Status> {
        let deadline = self.deadline();
        loop {
            match self.node.propose(data.clone(), deadline).await {
                Ok(applied) => {
                    self.note_session(session_id);
                    return applied_response(applied);
                }
                // A leadership transfer is under way: nothing was proposed; wait for the
                // new leader and go there.
                Err(NodeError::Refused(Refusal::Refused(
                    flotilla_raft::Error::TransferInProgress { .. },
                ))) => {
                    let me = Some(self.identity.member_id);
                    let wait = Instant::now() + self.election_timeout;
                    self.node
                        .wait_for(wait.min(deadline), |s| s.leader != me)
                        .await;
                    if Instant::now() >= deadline {
                        return Err(Status::unavailable(REQUEST_TIMED_OUT));
                    }
                }
                Err(NodeError::Refused(Refusal::NotLeader(hint))) => {
                    let request = forward_request::Request::Command(data.clone());
                    if let Some(response) = self
                        .forward_or_wait(hint, request, session_id, deadline)
                        .await?
                    {
                        return Ok(response);
                    }
                }
                Err(err) => return Err(node_status(err)),
            }
        }
    }

    /// The leader's side of a forwarded write: propose here, never forward again.
    pub async fn write_here(
        &self,
        data: Bytes,
        session_id: u64,
    ) -> Result<ForwardResponse, Status> {
        match self.node.propose(data, self.deadline()).await {
            Ok(applied) => {
                self.note_session(session_id);
                applied_response(applied)
            }
            Err(err) => Err(node_status(err)),
        }
    }

    /// With a leader hint, forwards the request; `None` means "not done, try again" (the
    /// leader moved, or one was just elected). A request that finds no leader, or a leader
    /// that certainly did not get it (see [`never_sent`]; or one under a client session,
    /// which may safely be sent again), is held
    /// until a leader is known again, so a client's first attempt succeeds about one election
    /// after a leader dies; held requests are bounded in count and bytes. Errors at the
    /// deadline with etcd's text.
    async fn forward_or_wait(
        &self,
        hint: Option<NodeId>,
        request: forward_request::Request,
        session_id: u64,
        deadline: Instant,
    ) -> Result<Option<ForwardResponse>, Status> {
        if Instant::now() >= deadline {
            return Err(Status::unavailable(REQUEST_TIMED_OUT));
        }
        let bytes = request.encoded_len();
        let Some(leader) = hint else {
            self.hold(bytes, deadline, |s| s.leader.is_some()).await?;
            return Ok(None);
        };
        match self.forward(leader, request, session_id, deadline).await {
            Err(status) if status.message() == FORWARD_NOT_LEADER => {
                // The leader we knew has moved on; wait for news, briefly.
                let status_before = self.node.status().leader;
                let wait = Duration::from_millis(50).min(self.election_timeout);
                self.node
                    .wait_for(Instant::now() + wait, |s| s.leader != status_before)
                    .await;
                Ok(None)
            }
            Err(status) if status.message() == FORWARD_UNDELIVERED => {
                self.hold(bytes, deadline, |s| s.leader != Some(leader))
                    .await?;
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// Holds a request of `bytes` until `ready` holds of the node's status (a leader is known,
    /// or another than the unreachable one) or the deadline passes. Refused at once with
    /// "too many requests" when the held requests are at their bound.
    async fn hold(
        &self,
        bytes: usize,
        deadline: Instant,
        ready: impl Fn(&crate::node::NodeStatus) -> bool,
    ) -> Result<(), Status> {
        let Some(_held) = self.held.take(bytes) else {
            return Err(Status::resource_exhausted(TOO_MANY_REQUESTS));
        };
        match self.node.wait_for(deadline, ready).await {
            Some(_) => Ok(()),
            None => Err(Status::unavailable(REQUEST_TIMED_OUT_LEADER_FAIL)),
        }
    }

    async fn wait_for_leader(&self, deadline: Instant) -> Result<(), Status> {
        match self.node.wait_for(deadline, |s| s.leader.is_some()).await {
            Some(_) => Ok(()),
            None => Err(Status::unavailable(REQUEST_TIMED_OUT)),
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        request: forward_request::Request,
        session_id: u64,
        deadline: Instant,
    ) -> Result<ForwardResponse, Status> {
        let mut client = self.peer(leader)?;
        let mut call = Request::new(ForwardRequest {
            request: Some(request),
            session_id,
        });
        self.identity.stamp(call.metadata_mut(), leader);
        call.set_timeout(deadline.saturating_duration_since(Instant::now()));
        match client.forward(call).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if never_sent(&status) => {
                tracing::debug!(leader, "forwarding failed, nothing sent: {status}");
                Err(Status::unavailable(FORWARD_UNDELIVERED))
            }
            // Our own deadline passed.
            Err(status) if status.code() == tonic::Code::Cancelled => {
                Err(Status::unavailable(REQUEST_TIMED_OUT))
            }
            Err(status) if is_transport_failure(&status) => {
                tracing::debug!(leader, "forwarding failed: {status}");
                if session_id != 0 {
                    // Perhaps delivered, but under a session: the state machine answers a
                    // retry from memory, so sending it again applies it at most once.
                    Err(Status::unavailable(FORWARD_UNDELIVERED))
                } else {
                    // The leader is unreachable: it may have done the work or not.
                    Err(Status::unavailable(REQUEST_TIMED_OUT_LEADER_FAIL))
                }
            }
            Err(status) => Err(status),
        }
    }

    /// A client to a peer's Forward endpoint, cached by its URL.
    /// A client for member `id`'s peer service (cached per member and URL).
    pub fn peer(&self, id: NodeId) -> Result<PeerClient<Channel>, Status> {
        let url = {
            let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
            state
                .members
                .get(id)
                .and_then(|m| m.peer_urls.first().cloned())
        };
        let Some(url) = url else {
            return Err(Status::unavailable(NO_LEADER));
        };
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_url, client)) = peers.get(&id)
            && *cached_url == url
        {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Status::internal(format!("invalid peer URL {url}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let channel = self
            .identity
            .channel(endpoint)
            .map_err(|e| Status::unavailable(format!("cannot dial the leader at {url}: {e}")))?;
        let client = peer_client(channel);
        peers.insert(id, (url, client.clone()));
        Ok(client)
    }

    // ----- Reads ---------------------------------------------------------------------------

    /// The hash of the store at `revision` (0: the current one), as HashKV answers it.
    pub fn hash_kv(
        &self,
        revision: i64,
    ) -> Result<flotilla_proto::etcdserverpb::HashKvResponse, Status> {
        let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
        let (hash, hash_revision) = state.kv.hash_kv(revision).map_err(|e| kv_status(&e))?;
        Ok(flotilla_proto::etcdserverpb::HashKvResponse {
            header: self.header(state.kv.current_revision()),
            hash,
            compact_revision: state.kv.compacted_revision(),
            hash_revision,
        })
    }

    /// Waits until the local state machine may serve a linearizable read: from the leader's
    /// lease if it holds one (lease reads on), else by ReadIndex.
    pub async fn linearizable_barrier(&self) -> Result<(), Status> {
        let deadline = self.deadline();
        if let Some(index) = self.node.lease_read_index() {
            self.node
                .metrics
                .reads_from_lease
                .fetch_add(1, Ordering::Relaxed);
            return self.wait_applied(index, deadline).await;
        }
        loop {
            match self.node.read_index(deadline).await {
                Ok(()) => return Ok(()),
                // Not confirmed: nothing happened, so trying again is safe.
                Err(NodeError::Refused(
                    Refusal::NotLeader(_) | Refusal::LeaderChanged | Refusal::TimedOut,
                )) => {
                    if Instant::now() >= deadline {
                        return Err(Status::unavailable(REQUEST_TIMED_OUT));
                    }
                    self.wait_for_leader(deadline).await?;
                    let pause = Duration::from_millis(10);
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                Err(err) => return Err(node_status(err)),
            }
        }
    }

    /// Waits until the local state machine has applied `index`.
    async fn wait_applied(&self, index: Index, deadline: Instant) -> Result<(), Status> {
        let applied = || {
            let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
            state.applied_index()
        };
        if applied() >= index {
            return Ok(());
        }
        match self.node.wait_for(deadline, |s| s.applied >= index).await {
            Some(_) => Ok(()),
            None => Err(Status::unavailable(REQUEST_TIMED_OUT)),
        }
    }

    // ----- Membership ----------------------------------------------------------------------

    /// Adds, removes or promotes a member, here if leader, else at the leader.
    pub async fn change_membership(&self, change: MemberChange) -> Result<Vec<MemberInfo>, Status> {
        let deadline = self.deadline();
        loop {
            let hint = self.node.status().leader;
            if hint == Some(self.identity.member_id) {
                match self.change_membership_here(change.clone(), deadline).await {
                    // Leadership just moved: go to the new leader (within the deadline).
                    Err(status) if status.message() == FORWARD_NOT_LEADER => {
                        if Instant::now() >= deadline {
                            return Err(Status::unavailable(REQUEST_TIMED_OUT));
                        }
                        let me = Some(self.identity.member_id);
                        let wait = (Instant::now() + self.election_timeout).min(deadline);
                        self.node.wait_for(wait, |s| s.leader != me).await;
                        continue;
                    }
                    other => return other,
                }
            }
            let request = forward_request::Request::MemberChange(change.clone());
            if let Some(response) = self.forward_or_wait(hint, request, 0, deadline).await? {
                return members_of(response);
            }
        }
    }

    /// The leader's side of a membership change.
    pub async fn change_membership_here(
        &self,
        mut change: MemberChange,
        deadline: Instant,
    ) -> Result<Vec<MemberInfo>, Status> {
        let step = self.conf_change_step(&mut change)?;
        let context = MemberInfo {
            id: change.id,
            peer_urls: change.peer_urls.clone(),
            is_learner: change.is_learner,
            ..MemberInfo::default()
        };
        loop {
            let conf_change = ConfChange {
                steps: vec![step],
                context: Bytes::from(context.encode_to_vec()),
            };
            match self.node.propose_membership(conf_change, deadline).await {
                Ok(applied) => return members_of(applied_response(applied)?),
                // The previous change (or its second, joint-leaving step) is still on its way.
                Err(NodeError::Refused(Refusal::Refused(
                    flotilla_raft::Error::MembershipChangeInProgress { .. },
                ))) if Instant::now() < deadline => {
                    let pause = Duration::from_millis(20);
                    tokio::time::sleep(pause).await;
                }
                Err(err) => return Err(node_status(err)),
            }
        }
    }

    /// Checks the change against the member table and fills in the id of a new member.
    fn conf_change_step(&self, change: &mut MemberChange) -> Result<ConfChangeStep, Status> {
        let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
        let table = &state.members;
        let kind = member_change::Kind::try_from(change.kind)
            .map_err(|_| Status::invalid_argument("flotilla: unknown membership change kind"))?;
        match kind {
            member_change::Kind::Add => {
                if change.peer_urls.is_empty() || change.peer_urls.iter().any(|u| !valid_url(u)) {
                    return Err(Status::invalid_argument(INVALID_URLS));
                }
                if table.find_by_peer_url(&change.peer_urls).is_some() {
                    return Err(Status::failed_precondition(PEER_URL_EXISTS));
                }
                if !change.is_learner {
                    self.check_started_quorum(table, None, 1)?;
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64);
                change.id = member_id(&change.peer_urls, &self.cluster_token, now);
                Ok(if change.is_learner {
                    ConfChangeStep::AddLearner(change.id)
                } else {
                    ConfChangeStep::AddVoter(change.id)
                })
            }
            member_change::Kind::Remove | member_change::Kind::Promote => {
                let Some(member) = table.get(change.id) else {
                    return Err(Status::not_found(MEMBER_NOT_FOUND));
                };
                if kind == member_change::Kind::Remove && !member.is_learner {
                    self.check_started_quorum(table, Some(change.id), 0)?;
                }
                Ok(if kind == member_change::Kind::Remove {
                    ConfChangeStep::Remove(change.id)
                } else {
                    ConfChangeStep::Promote(change.id)
                })
            }
        }
    }

    /// etcd's strict reconfiguration check: after the change (one voter `removed`, or `added`
    /// voters not yet started), the started voters must still be a quorum, or the cluster
    /// would stop making progress until the new member starts.
    fn check_started_quorum(
        &self,
        table: &crate::members::MemberTable,
        removed: Option<NodeId>,
        added: usize,
    ) -> Result<(), Status> {
        let recent = 2 * self.election_timeout;
        let activity = self.peer_activity.lock().unwrap_or_else(|p| p.into_inner());
        let voters: Vec<NodeId> = table
            .members()
            .filter(|m| !m.is_learner && Some(m.id) != removed)
            .map(|m| m.id)
            .collect();
        let started = voters
            .iter()
            .filter(|&&id| {
                id == self.identity.member_id
                    || activity.get(&id).is_some_and(|at| at.elapsed() < recent)
            })
            .count();
        let quorum = (voters.len() + added) / 2 + 1;
        if started < quorum {
            return Err(Status::failed_precondition(
                crate::errors::NOT_ENOUGH_STARTED_MEMBERS,
            ));
        }
        Ok(())
    }

    /// Peers heard from within two election timeouts.
    pub fn recently_heard_peers(&self) -> Vec<NodeId> {
        let recent = 2 * self.election_timeout;
        self.peer_activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, at)| at.elapsed() < recent)
            .map(|(&id, _)| id)
            .collect()
    }

    /// A peer sent Raft messages here just now.
    pub fn note_peer_activity(&self, peer: NodeId) {
        self.peer_activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, Instant::now());
    }

    // ----- Leases --------------------------------------------------------------------------

    /// LeaseKeepAlive: renews at the leader (forwarded there from a follower); the TTL, or 0
    /// if the lease is gone.
    pub async fn keep_lease_alive(&self, id: i64) -> Result<i64, Status> {
        let deadline = self.deadline();
        loop {
            let leader = self.node.status().leader;
            if leader == Some(self.identity.member_id) {
                match self.keep_lease_alive_here(id, deadline).await {
                    Err(status) if status.message() == FORWARD_NOT_LEADER => {
                        self.wait_for_leader_change(deadline).await?;
                        continue;
                    }
                    other => return other,
                }
            }
            let request = forward_request::Request::LeaseKeepAlive(id);
            if let Some(response) = self.forward_idempotent(leader, request, deadline).await? {
                return expect_result(response, |r| match r {
                    forward_response::Result::LeaseTtl(ttl) => Some(ttl),
                    _ => None,
                });
            }
        }
    }

    /// The leader's side of a renewal. Just after an election the lease clock is not started
    /// yet (the new leader first applies its predecessors' entries): wait for it.
    pub async fn keep_lease_alive_here(&self, id: i64, deadline: Instant) -> Result<i64, Status> {
        loop {
            match self.lessor.renew(&self.node, id, deadline).await {
                Ok(ttl) => return Ok(ttl),
                Err(LeaseError::Failed(status)) => return Err(status),
                Err(LeaseError::NotPrimary) => self.wait_lease_clock(deadline).await?,
            }
        }
    }

    /// LeaseTimeToLive: by the leader's clock.
    pub async fn lease_time_to_live(
        &self,
        request: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        let deadline = self.deadline();
        loop {
            let leader = self.node.status().leader;
            if leader == Some(self.identity.member_id) {
                match self.lease_time_to_live_here(request, deadline).await {
                    Err(status) if status.message() == FORWARD_NOT_LEADER => {
                        self.wait_for_leader_change(deadline).await?;
                        continue;
                    }
                    other => return other,
                }
            }
            let forwarded = forward_request::Request::LeaseTimeToLive(request);
            if let Some(response) = self.forward_idempotent(leader, forwarded, deadline).await? {
                return expect_result(response, |r| match r {
                    forward_response::Result::LeaseTimeToLive(answer) => Some(answer),
                    _ => None,
                });
            }
        }
    }

    /// The leader's side of LeaseTimeToLive: TTL -1 for an unknown lease (not an error).
    pub async fn lease_time_to_live_here(
        &self,
        request: LeaseTimeToLiveRequest,
        deadline: Instant,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        loop {
            let answer = {
                let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
                self.lessor
                    .remaining_seconds(&state, request.id)
                    .map(|remaining| {
                        let lease = state.kv.lease(request.id);
                        LeaseTimeToLiveResponse {
                            header: None,
                            id: request.id,
                            ttl: remaining.unwrap_or(-1),
                            granted_ttl: lease.map_or(0, |l| l.granted_ttl_seconds()),
                            keys: match lease {
                                Some(lease) if request.keys => lease.keys().cloned().collect(),
                                _ => Vec::new(),
                            },
                        }
                    })
            };
            match answer {
                Ok(answer) => return Ok(answer),
                Err(LeaseError::Failed(status)) => return Err(status),
                Err(LeaseError::NotPrimary) => self.wait_lease_clock(deadline).await?,
            }
        }
    }

    /// Forwards a request that may be repeated without harm (a renewal, a time-to-live): a
    /// leader that cannot be reached (killed, partitioned) is not the end of it; wait for
    /// news of another, up to an election timeout at a time, and let the caller try again
    /// until its deadline. `None`: try again.
    async fn forward_idempotent(
        &self,
        leader: Option<NodeId>,
        request: forward_request::Request,
        deadline: Instant,
    ) -> Result<Option<ForwardResponse>, Status> {
        match self.forward_or_wait(leader, request, 0, deadline).await {
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && [REQUEST_TIMED_OUT, REQUEST_TIMED_OUT_LEADER_FAIL]
                        .contains(&status.message())
                    && Instant::now() < deadline =>
            {
                let wait = (Instant::now() + self.election_timeout).min(deadline);
                self.node.wait_for(wait, |s| s.leader != leader).await;
                Ok(None)
            }
            other => other,
        }
    }

    /// Waits a little for this leader's lease clock; "not leader" if leadership moved on.
    async fn wait_lease_clock(&self, deadline: Instant) -> Result<(), Status> {
        if self.node.status().leader != Some(self.identity.member_id) {
            return Err(Status::unavailable(FORWARD_NOT_LEADER));
        }
        let wait = (Instant::now() + Duration::from_millis(50)).min(deadline);
        if !self.lessor.wait_primary(wait).await && Instant::now() >= deadline {
            return Err(Status::unavailable(REQUEST_TIMED_OUT));
        }
        Ok(())
    }

    /// After "not leader" from this member's own leader role: wait for news of another.
    async fn wait_for_leader_change(&self, deadline: Instant) -> Result<(), Status> {
        if Instant::now() >= deadline {
            return Err(Status::unavailable(REQUEST_TIMED_OUT));
        }
        let me = Some(self.identity.member_id);
        let wait = (Instant::now() + self.election_timeout).min(deadline);
        self.node.wait_for(wait, |s| s.leader != me).await;
        Ok(())
    }

    // ----- Sessions ------------------------------------------------------------------------

    fn note_session(&self, session_id: u64) {
        if session_id != 0 {
            self.session_activity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(session_id, Instant::now());
        }
    }

    /// KeepAlive: true if the session exists (answered by the leader, which tracks activity).
    pub async fn keep_session_alive(&self, session_id: u64) -> Result<bool, Status> {
        let deadline = self.deadline();
        loop {
            let leader = self.node.status().leader;
            if leader == Some(self.identity.member_id) {
                return Ok(self.keep_session_alive_here(session_id));
            }
            let request = forward_request::Request::SessionKeepAlive(session_id);
            if let Some(response) = self
                .forward_or_wait(leader, request, session_id, deadline)
                .await?
            {
                return match response.result {
                    Some(forward_response::Result::SessionAlive(alive)) => Ok(alive),
                    _ => Err(Status::internal("flotilla: unexpected keep-alive answer")),
                };
            }
        }
    }

    pub fn keep_session_alive_here(&self, session_id: u64) -> bool {
        let alive = self
            .node
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .kv
            .session(session_id)
            .is_some();
        if alive {
            self.note_session(session_id);
        }
        alive
    }

    /// On the leader: sessions idle for longer than the TTL. A session this leader has not
    /// heard of yet starts its clock now, so a new leader never expires one early.
    pub fn idle_sessions(&self) -> Vec<u64> {
        let now = Instant::now();
        let known: Vec<u64> = {
            let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
            state.kv.sessions().map(|s| s.id()).collect()
        };
        let mut activity = self
            .session_activity
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        activity.retain(|id, _| known.binary_search(id).is_ok());
        known
            .into_iter()
            .filter(|id| {
                let seen = *activity.entry(*id).or_insert(now);
                now.duration_since(seen) > self.session_ttl
            })
            .collect()
    }

    /// Forgets activity (this member is no longer the leader).
    pub fn forget_session_activity(&self) {
        self.session_activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// The request certainly never reached the leader: the connection could not be opened
/// (refused: the leader's process is gone), or the connection was found closed before the
/// request was handed to it (hyper's "canceled": a leader killed just before, its closed
/// connection not yet noticed).
fn never_sent(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        let refused = error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        let canceled = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled);
        if refused || canceled {
            return true;
        }
        source = error.source();
    }
    false
}

fn is_transport_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
    ) && !status.message().starts_with("etcdserver:")
        && status.message() != FORWARD_NOT_LEADER
}

fn valid_url(url: &str) -> bool {
    crate::config::parse_url(url).is_ok()
}

/// The result of an applied entry, in the form forwarding carries it.
pub fn applied_response(applied: Applied) -> Result<ForwardResponse, Status> {
    use forward_response::Result as R;
    let revision = applied.revision();
    let result = match applied {
        Applied::Kv(result) => match result.outcome {
            Ok(Response::Put(r)) => R::Put(r),
            Ok(Response::DeleteRange(r)) => R::DeleteRange(r),
            Ok(Response::Txn(r)) => R::Txn(r),
            Ok(Response::Compaction(r)) => R::Compaction(r),
            Ok(Response::SessionRegistered { session_id, .. }) => R::SessionRegistered(session_id),
            Ok(Response::LeaseGrant(r)) => R::LeaseGrant(r),
            Ok(Response::LeaseRevoke(r)) => R::LeaseRevoke(r),
            Ok(_) => R::Done(true),
            Err(error) => return Err(crate::errors::kv_status(&error)),
        },
        Applied::Members { members, .. } => R::Members(Members { members }),
        Applied::Alarm { changed, .. } => R::Alarm(AlarmResponse {
            header: None,
            alarms: changed,
        }),
        Applied::Auth { outcome, .. } => match outcome {
            Ok(crate::auth::AuthApplied {
                token: Some((token, _)),
                ..
            }) => R::AuthToken(token),
            Ok(_) => R::Done(true),
            Err(error) => return Err(error.into()),
        },
        Applied::Server { .. } => R::Done(true),
    };
    Ok(ForwardResponse {
        revision: answered_revision(&result).unwrap_or(revision),
        result: Some(result),
    })
}

/// The revision recorded in a write's answer by the state machine. A retry answered from its
/// session's memory keeps its original revision, while the store (and so the applied entry's
/// revision) may have moved on since; a Put's header revision is the revision of that put.
fn answered_revision(result: &forward_response::Result) -> Option<i64> {
    use forward_response::Result as R;
    let header = match result {
        R::Put(r) => r.header.as_ref(),
        R::DeleteRange(r) => r.header.as_ref(),
        R::Txn(r) => r.header.as_ref(),
        R::Compaction(r) => r.header.as_ref(),
        R::LeaseGrant(r) => r.header.as_ref(),
        R::LeaseRevoke(r) => r.header.as_ref(),
        _ => None,
    };
    header.map(|header| header.revision)
}

fn members_of(response: ForwardResponse) -> Result<Vec<MemberInfo>, Status> {
    match response.result {
        Some(forward_response::Result::Members(members)) => Ok(members.members),
        other => Err(Status::internal(format!(
            "flotilla: unexpected answer to a membership change: {other:?}"
        ))),
    }
}

/// Turns a forward response into a specific etcd response, or an internal error.
pub fn expect_result<T>(
    response: ForwardResponse,
    pick: impl FnOnce(forward_response::Result) -> Option<T>,
) -> Result<T, Status> {
    response
        .result
        .and_then(pick)
        .ok_or_else(|| Status::internal("flotilla: unexpected answer from the leader"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forward over a connection that cannot be opened, and one over a connection the
    /// other side closes before answering: both certainly never delivered.
    #[tokio::test]
    async fn a_refused_or_dropped_connection_is_known_never_sent() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let refused = forward_to(port).await;
        assert!(never_sent(&refused), "{refused:?}");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let dropped = forward_to(port).await;
        assert!(never_sent(&dropped), "{dropped:?}");

        // The negative space: a status with no transport cause is not known to be unsent.
        assert!(!never_sent(&Status::unavailable("transport error")));
    }

    async fn forward_to(port: u16) -> Status {
        let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        peer_client(endpoint.connect_lazy())
            .forward(Request::new(ForwardRequest::default()))
            .await
            .unwrap_err()
    }
}
