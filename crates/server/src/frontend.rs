//! What the client services share: proposing writes and the other requests only the leader
//! carries out (through the one leader route, `routing.rs`), linearizable read barriers,
//! membership checks, response headers, session activity.
//!
//! Any member serves any request (etcd-api.md §3.3): a write on a follower is forwarded to the
//! leader and answered with the leader's result; a linearizable read waits for a read index
//! (which the core fetches from the leader) and is then served from the local state machine.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_kv::{Author, Command};
use flotilla_kv::{Operation, space_cost_bytes};
use flotilla_proto::etcdserverpb::alarm_request::AlarmAction;
use flotilla_proto::etcdserverpb::{
    AlarmRequest, AlarmType, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, ResponseHeader,
};
use flotilla_proto::{SEQUENCE_METADATA_KEY, SESSION_METADATA_KEY};
use flotilla_raft::{ConfChangeStep, Index, NodeId};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::errors::{
    INVALID_URLS, MEMBER_NOT_FOUND, NO_LEADER, PEER_URL_EXISTS, REQUEST_TIMED_OUT, kv_status,
    node_status,
};
use crate::held::HeldRequests;
use crate::lease::{LeaseError, Lessor};
use crate::members::{encode_server_command, member_id};
use crate::node::{NodeError, NodeHandle};
use crate::peer_proto::peer_client::PeerClient;
use crate::peer_proto::{MemberChange, MemberInfo, ServerCommand, member_change, server_command};
use crate::routing::{Answer, AnswerResult, LeaderRequest, RouteError};
use crate::transport::{PeerIdentity, peer_client};
use flotilla_runtime::driver::Refusal;

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
    pub(crate) held: HeldRequests,
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

    /// Proposes an encoded command at the leader and returns its result.
    pub async fn write(&self, data: Bytes, session_id: u64) -> Result<Answer, RouteError> {
        self.at_leader(LeaderRequest::Command(data), session_id)
            .await
    }

    async fn wait_for_leader(&self, deadline: Instant) -> Result<(), Status> {
        match self.node.wait_for(deadline, |s| s.leader.is_some()).await {
            Some(_) => Ok(()),
            None => Err(Status::unavailable(REQUEST_TIMED_OUT)),
        }
    }

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

    /// Waits until the local state machine has applied `index`; "stopped" as soon as the node
    /// stops, "request timed out" at the deadline.
    pub(crate) async fn wait_applied(&self, index: Index, deadline: Instant) -> Result<(), Status> {
        let applied = || {
            let state = self.node.state.read().unwrap_or_else(|p| p.into_inner());
            state.applied_index()
        };
        if applied() >= index {
            return Ok(());
        }
        match self
            .node
            .wait_for(deadline, |s| s.applied >= index || s.stopped)
            .await
        {
            Some(status) if !status.stopped => Ok(()),
            Some(_) => Err(node_status(NodeError::Stopped)),
            None => Err(Status::unavailable(REQUEST_TIMED_OUT)),
        }
    }

    // ----- Membership ----------------------------------------------------------------------

    /// Adds, removes or promotes a member, at the leader; the members after the change.
    pub async fn change_membership(
        &self,
        change: MemberChange,
    ) -> Result<Vec<MemberInfo>, RouteError> {
        self.at_leader(LeaderRequest::MemberChange(change), 0)
            .await?
            .pick(|r| match r {
                AnswerResult::Members(members) => Some(members.members),
                _ => None,
            })
    }

    /// Checks the change against the member table and fills in the id of a new member.
    pub(crate) fn conf_change_step(
        &self,
        change: &mut MemberChange,
    ) -> Result<ConfChangeStep, Status> {
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
    pub async fn keep_lease_alive(&self, id: i64) -> Result<i64, RouteError> {
        self.at_leader(LeaderRequest::LeaseKeepAlive(id), 0)
            .await?
            .pick(|r| match r {
                AnswerResult::LeaseTtl(ttl) => Some(ttl),
                _ => None,
            })
    }

    /// The leader's side of a renewal. Just after an election the lease clock is not started
    /// yet (the new leader first applies its predecessors' entries): wait for it.
    pub async fn keep_lease_alive_here(
        &self,
        id: i64,
        deadline: Instant,
    ) -> Result<i64, RouteError> {
        loop {
            match self.lessor.renew(&self.node, id, deadline).await {
                Err(LeaseError::NotPrimary) => self.wait_lease_clock(deadline).await?,
                done => return done.map_err(RouteError::from),
            }
        }
    }

    /// LeaseTimeToLive: by the leader's clock.
    pub async fn lease_time_to_live(
        &self,
        request: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, RouteError> {
        self.at_leader(LeaderRequest::LeaseTimeToLive(request), 0)
            .await?
            .pick(|r| match r {
                AnswerResult::LeaseTimeToLive(answer) => Some(answer),
                _ => None,
            })
    }

    /// The leader's side of LeaseTimeToLive: TTL -1 for an unknown lease (not an error).
    pub async fn lease_time_to_live_here(
        &self,
        request: LeaseTimeToLiveRequest,
        deadline: Instant,
    ) -> Result<LeaseTimeToLiveResponse, RouteError> {
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
                Err(LeaseError::NotPrimary) => self.wait_lease_clock(deadline).await?,
                done => return done.map_err(RouteError::from),
            }
        }
    }

    /// Waits a little for this leader's lease clock; "not leader" if leadership moved on.
    async fn wait_lease_clock(&self, deadline: Instant) -> Result<(), RouteError> {
        if self.node.leader() != Some(self.identity.member_id) {
            return Err(RouteError::NotLeader);
        }
        let wait = (Instant::now() + Duration::from_millis(50)).min(deadline);
        if !self.lessor.wait_primary(wait).await && Instant::now() >= deadline {
            return Err(RouteError::TimedOut);
        }
        Ok(())
    }

    // ----- Sessions ------------------------------------------------------------------------

    pub(crate) fn note_session(&self, session_id: u64) {
        if session_id != 0 {
            self.session_activity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(session_id, Instant::now());
        }
    }

    /// KeepAlive: true if the session exists (answered by the leader, which tracks activity).
    pub async fn keep_session_alive(&self, session_id: u64) -> Result<bool, RouteError> {
        let request = LeaderRequest::SessionKeepAlive(session_id);
        self.at_leader(request, session_id)
            .await?
            .pick(|r| match r {
                AnswerResult::SessionAlive(alive) => Some(alive),
                _ => None,
            })
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

fn valid_url(url: &str) -> bool {
    crate::config::parse_url(url).is_ok()
}
