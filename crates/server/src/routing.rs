//! Getting a request to the leader: the one path every leader-only request takes (writes,
//! membership changes, lease renewals and time-to-live, session keep-alives).
//!
//! [`Frontend::at_leader`] serves a request here when this member leads ([`Frontend::serve_here`],
//! which is also what the leader runs for a forwarded request) and otherwise forwards it over
//! the peer channel, answering with the leader's result. The reasons to go round again are
//! typed ([`RouteError::NotLeader`], [`RouteError::Undelivered`]); nothing here looks at an
//! error's text. The etcd status a client sees is made from a [`RouteError`] in one place
//! (`errors.rs`).
//!
//! A write is sent again only when it certainly did not happen (the member asked was not the
//! leader, or the connection to the leader was never made) or when its client session makes a
//! repeat harmless, so a write without a session is applied at most once. When the leader's
//! answer to a forwarded write is lost (the leader died) or late (it went quiet), the write's
//! entry may still commit under the next leader: the entry carries the forwarder's origin tag,
//! and the forwarder answers with the outcome of applying it itself as soon as it does, while
//! the forward is still waiting or after it failed. Only if that does not happen by the
//! deadline is the outcome unknown. A request that finds no leader is held (bounded in count and bytes)
//! until one is known, so a client's first attempt succeeds about one election after a leader
//! dies.

use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_kv::Response;
use flotilla_proto::etcdserverpb::AlarmResponse;
use flotilla_raft::{ConfChange, NodeId};
use prost::Message as _;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::frontend::Frontend;
use crate::lease::LeaseError;
use crate::node::{NodeError, NodeStatus, TrackedWrite};
use crate::peer_proto::peer_client::PeerClient;
use crate::peer_proto::{
    ForwardRequest, ForwardResponse, MemberInfo, Members, forward_request, forward_response,
};
use crate::state_machine::Applied;
use flotilla_runtime::driver::Refusal;

/// A request only the leader can carry out, as it is forwarded to the leader.
pub type LeaderRequest = forward_request::Request;

/// What the leader answered: one of the peer protocol's typed results.
pub type AnswerResult = forward_response::Result;

/// The leader's answer to a [`LeaderRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The store revision the answer reports (for a write answered from its session's memory,
    /// the revision of the original write).
    pub revision: i64,
    pub result: AnswerResult,
}

/// Why a request routed to the leader got no answer. The first two are reasons to go round
/// again, handled by [`Frontend::at_leader`]; the others end the request and become the
/// client's etcd status at the edge (`impl From<RouteError> for Status`).
#[derive(Debug)]
pub enum RouteError {
    /// The member asked does not lead (or leadership is being handed over): nothing was done.
    NotLeader,
    /// The leader could not be reached and certainly did not get the request, or may safely
    /// get it again (a write under a client session, answered from memory if repeated).
    Undelivered,
    /// The leader was asked and could not be heard from: it may or may not have done it.
    LeaderUnreachable,
    /// No leader could be found before the deadline.
    NoLeader,
    /// The deadline passed.
    TimedOut,
    /// The bound on requests held for a leader is reached.
    TooManyHeld,
    /// The node refused the request or failed.
    Node(NodeError),
    /// The request's own outcome is an error (from the store, auth, a membership check, or the
    /// leader): handed to the client as it is.
    Failed(Status),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NotLeader => f.write_str("the member asked is not the leader"),
            RouteError::Undelivered => f.write_str("the leader could not be reached"),
            RouteError::LeaderUnreachable => {
                f.write_str("the leader could not be heard from; the outcome is unknown")
            }
            RouteError::NoLeader => f.write_str("no leader before the deadline"),
            RouteError::TimedOut => f.write_str("the deadline passed"),
            RouteError::TooManyHeld => f.write_str("too many requests wait for a leader"),
            RouteError::Node(error) => write!(f, "{error:?}"),
            RouteError::Failed(status) => f.write_str(status.message()),
        }
    }
}

impl From<Status> for RouteError {
    fn from(status: Status) -> RouteError {
        RouteError::Failed(status)
    }
}

impl From<NodeError> for RouteError {
    fn from(error: NodeError) -> RouteError {
        match error {
            NodeError::Refused(Refusal::NotLeader(_))
            | NodeError::Refused(Refusal::Refused(flotilla_raft::Error::TransferInProgress {
                ..
            })) => RouteError::NotLeader,
            NodeError::Timeout => RouteError::TimedOut,
            other => RouteError::Node(other),
        }
    }
}

impl From<LeaseError> for RouteError {
    fn from(error: LeaseError) -> RouteError {
        match error {
            LeaseError::NotPrimary => RouteError::NotLeader,
            LeaseError::Failed(status) => RouteError::Failed(status),
        }
    }
}

impl RouteError {
    /// The leader's side of a forwarded request that failed, as the wire carries it.
    fn into_wire(self) -> AnswerResult {
        match self {
            RouteError::NotLeader => AnswerResult::NotLeader(true),
            other => {
                let status = Status::from(other);
                AnswerResult::Error(crate::peer_proto::Error {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                })
            }
        }
    }
}

impl Answer {
    /// The answer as the peer protocol carries it back to the forwarder.
    pub fn into_wire(answered: Result<Answer, RouteError>) -> ForwardResponse {
        match answered {
            Ok(answer) => ForwardResponse {
                revision: answer.revision,
                result: Some(answer.result),
            },
            Err(error) => ForwardResponse {
                revision: 0,
                result: Some(error.into_wire()),
            },
        }
    }

    /// The forwarder's side: the leader's answer, or its typed refusal or error.
    fn from_wire(response: ForwardResponse) -> Result<Answer, RouteError> {
        match response.result {
            Some(AnswerResult::NotLeader(_)) => Err(RouteError::NotLeader),
            Some(AnswerResult::Error(error)) => Err(RouteError::Failed(Status::new(
                tonic::Code::from_i32(error.code),
                error.message,
            ))),
            Some(result) => Ok(Answer {
                revision: response.revision,
                result,
            }),
            None => Err(RouteError::Failed(Status::internal(
                "flotilla: the leader's answer was empty",
            ))),
        }
    }

    /// The specific result the caller expects, or an internal error. (On every write's path:
    /// the other answer is not formatted into the error, which would cost a Debug rendering of
    /// every response.)
    pub fn pick<T>(self, pick: impl FnOnce(AnswerResult) -> Option<T>) -> Result<T, RouteError> {
        pick(self.result).ok_or_else(|| {
            RouteError::Failed(Status::internal(
                "flotilla: unexpected answer from the leader",
            ))
        })
    }

    /// The result of an entry applied here.
    pub fn of_applied(applied: Applied) -> Result<Answer, RouteError> {
        use forward_response::Result as R;
        let revision = applied.revision();
        let result = match applied {
            Applied::Kv(result) => match result.outcome {
                Ok(Response::Put(r)) => R::Put(r),
                Ok(Response::DeleteRange(r)) => R::DeleteRange(r),
                Ok(Response::Txn(r)) => R::Txn(r),
                Ok(Response::Compaction(r)) => R::Compaction(r),
                Ok(Response::SessionRegistered { session_id, .. }) => {
                    R::SessionRegistered(session_id)
                }
                Ok(Response::LeaseGrant(r)) => R::LeaseGrant(r),
                Ok(Response::LeaseRevoke(r)) => R::LeaseRevoke(r),
                Ok(_) => R::Done(true),
                Err(error) => return Err(crate::errors::kv_status(&error).into()),
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
                Err(error) => return Err(Status::from(error).into()),
            },
            Applied::Server { .. } => R::Done(true),
        };
        Ok(Answer {
            revision: answered_revision(&result).unwrap_or(revision),
            result,
        })
    }
}

/// The revision recorded in a write's answer by the state machine. A retry answered from its
/// session's memory keeps its original revision, while the store (and so the applied entry's
/// revision) may have moved on since; a Put's header revision is the revision of that put.
fn answered_revision(result: &AnswerResult) -> Option<i64> {
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

/// Answered from the leader's state machine (a lease's keys and expiry, a session's
/// existence) rather than through the log; so it may be sent again after an unknown outcome
/// (renewing a lease, asking its time to live or a session's liveness does the same whether
/// it happens once or twice).
fn reads_leader_state(request: &LeaderRequest) -> bool {
    matches!(
        request,
        LeaderRequest::LeaseKeepAlive(_)
            | LeaderRequest::LeaseTimeToLive(_)
            | LeaderRequest::SessionKeepAlive(_)
    )
}

impl Frontend {
    /// Carries out `request` at the leader, here or forwarded, within the request timeout.
    /// `session_id` is the client session a write belongs to (0 for none).
    pub async fn at_leader(
        &self,
        request: LeaderRequest,
        session_id: u64,
    ) -> Result<Answer, RouteError> {
        let deadline = self.deadline();
        let me = self.identity.member_id;
        let mut request = request;
        // Set when a write without a session is first forwarded: then a lost answer is not
        // the end of it (see `ForwardedWrites`).
        let mut tracked: Option<TrackedWrite> = None;
        loop {
            if Instant::now() >= deadline {
                return Err(RouteError::TimedOut);
            }
            let leader = self.node.leader();
            let asked = match leader {
                Some(leader) if leader == me => {
                    self.serve_here(&request, session_id, deadline).await
                }
                Some(leader) => {
                    if tracked.is_none() && session_id == 0 {
                        tracked = self.tag_forwarded(&mut request);
                    }
                    let forwarded = self.forward(leader, &request, session_id, deadline);
                    match tracked.as_mut() {
                        // Applied here first (the leader went quiet, and the next one
                        // committed the entry): that is the outcome.
                        Some(tracked) => tokio::select! {
                            asked = forwarded => asked,
                            applied = tracked.applied() => return applied_outcome(applied),
                        },
                        None => forwarded.await,
                    }
                }
                None => {
                    self.hold(&request, deadline, |s| s.leader.is_some())
                        .await?;
                    continue;
                }
            };
            if let (Err(RouteError::LeaderUnreachable), Some(tracked)) = (&asked, &mut tracked) {
                return self.await_applied_here(tracked, deadline).await;
            }
            match asked {
                // Leadership moved (or is being handed over) since we looked: wait for news
                // of the next leader, briefly, and go there.
                Err(RouteError::NotLeader) => {
                    let wait = if leader == Some(me) {
                        self.election_timeout
                    } else {
                        Duration::from_millis(50).min(self.election_timeout)
                    };
                    self.node
                        .wait_for((Instant::now() + wait).min(deadline), |s| {
                            s.leader != leader
                        })
                        .await;
                }
                Err(RouteError::Undelivered) => {
                    self.hold(&request, deadline, |s| s.leader != leader)
                        .await?;
                }
                // The leader went quiet: for a request that may be repeated, wait for news of
                // another, up to an election timeout at a time, and ask again.
                Err(RouteError::LeaderUnreachable | RouteError::TimedOut)
                    if reads_leader_state(&request) && Instant::now() < deadline =>
                {
                    let wait = (Instant::now() + self.election_timeout).min(deadline);
                    self.node.wait_for(wait, |s| s.leader != leader).await;
                }
                other => return other,
            }
        }
    }

    /// The leader's side of `request`: what this member does when it leads, for its own
    /// clients and for requests forwarded to it. Never forwards.
    pub async fn serve_here(
        &self,
        request: &LeaderRequest,
        session_id: u64,
        deadline: Instant,
    ) -> Result<Answer, RouteError> {
        let revision = || self.current_revision();
        if reads_leader_state(request) {
            self.apply_committed_here(deadline).await?;
        }
        match request {
            LeaderRequest::Command(data) => {
                let applied = self.node.propose(data.clone(), deadline).await?;
                self.note_session(session_id);
                Answer::of_applied(applied)
            }
            LeaderRequest::MemberChange(change) => {
                let members = self
                    .change_membership_here(change.clone(), deadline)
                    .await?;
                Ok(Answer {
                    revision: revision(),
                    result: AnswerResult::Members(Members { members }),
                })
            }
            LeaderRequest::SessionKeepAlive(id) => Ok(Answer {
                result: AnswerResult::SessionAlive(self.keep_session_alive_here(*id)),
                revision: revision(),
            }),
            LeaderRequest::LeaseKeepAlive(id) => Ok(Answer {
                result: AnswerResult::LeaseTtl(self.keep_lease_alive_here(*id, deadline).await?),
                revision: revision(),
            }),
            LeaderRequest::LeaseTimeToLive(ttl_request) => Ok(Answer {
                result: AnswerResult::LeaseTimeToLive(
                    self.lease_time_to_live_here(*ttl_request, deadline).await?,
                ),
                revision: revision(),
            }),
        }
    }

    /// Waits until this leader has applied every entry it knows to be committed. A write
    /// forwarded by a follower may be answered by that follower as soon as it applies the
    /// entry itself (see `ForwardedWrites`), possibly before the leader's own apply thread
    /// gets there: without this wait, a lease's keys read here right after such a write
    /// could miss it (CI's Kubernetes-shapes check once saw 11 of 12 keys).
    async fn apply_committed_here(&self, deadline: Instant) -> Result<(), RouteError> {
        let commit = self.node.status().commit;
        self.wait_applied(commit, deadline)
            .await
            .map_err(RouteError::Failed)
    }

    /// The leader's side of a membership change: proposed once the previous one is done.
    async fn change_membership_here(
        &self,
        mut change: crate::peer_proto::MemberChange,
        deadline: Instant,
    ) -> Result<Vec<MemberInfo>, RouteError> {
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
                Ok(applied) => {
                    return Answer::of_applied(applied)?.pick(|r| match r {
                        AnswerResult::Members(members) => Some(members.members),
                        _ => None,
                    });
                }
                // The previous change (or its second, joint-leaving step) is still on its way.
                Err(NodeError::Refused(Refusal::Refused(
                    flotilla_raft::Error::MembershipChangeInProgress { .. },
                ))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Tags a write command about to be forwarded with an origin of this member's, so that
    /// its entry is recognised when it is applied here. `None` for anything else (a server
    /// command, a lease renewal), which then goes untagged.
    fn tag_forwarded(&self, request: &mut LeaderRequest) -> Option<TrackedWrite> {
        let LeaderRequest::Command(data) = request else {
            return None;
        };
        let tracked = self.node.track_forwarded();
        let origin = flotilla_kv::Origin {
            member_id: tracked.origin.member_id,
            request: tracked.origin.request,
        };
        *data = flotilla_kv::tag_origin(data, &origin)?;
        Some(tracked)
    }

    /// The leader could not be heard from after it may have taken a tagged write: the entry
    /// may still commit, under that leader or the next. Its outcome is what this member
    /// applies, as the leader's answer would have been; if it is not applied by the deadline
    /// (the entry was lost with the leader), the outcome stays unknown, as etcd reports it.
    async fn await_applied_here(
        &self,
        tracked: &mut TrackedWrite,
        deadline: Instant,
    ) -> Result<Answer, RouteError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, tracked.applied()).await {
            Ok(applied) => applied_outcome(applied),
            Err(_) => Err(RouteError::LeaderUnreachable),
        }
    }

    /// Holds `request` until `ready` holds of the node's status (a leader is known, or another
    /// than the unreachable one) or the deadline passes. Refused at once when the held
    /// requests are at their bound.
    async fn hold(
        &self,
        request: &LeaderRequest,
        deadline: Instant,
        ready: impl Fn(&NodeStatus) -> bool,
    ) -> Result<(), RouteError> {
        let Some(_held) = self.held.take(request.encoded_len()) else {
            return Err(RouteError::TooManyHeld);
        };
        match self.node.wait_for(deadline, ready).await {
            Some(_) => Ok(()),
            None => Err(RouteError::NoLeader),
        }
    }

    /// Sends `request` to `leader` and returns its answer. Err(Status) from the call itself
    /// is always about the call (the leader's own refusals and errors come in the answer).
    async fn forward(
        &self,
        leader: NodeId,
        request: &LeaderRequest,
        session_id: u64,
        deadline: Instant,
    ) -> Result<Answer, RouteError> {
        if self.identity.is_cut_off_from(leader) {
            return Err(RouteError::Undelivered); // the (dev) partition
        }
        let client = self.peer(leader)?;
        let mut call = Request::new(ForwardRequest {
            request: Some(request.clone()),
            session_id,
        });
        self.identity.stamp(call.metadata_mut(), leader);
        call.set_timeout(deadline.saturating_duration_since(Instant::now()));
        match send_forward(client, call).await {
            Ok(response) => Answer::from_wire(response.into_inner()),
            Err(status) if never_sent(&status) => {
                tracing::debug!(leader, "forwarding failed, nothing sent: {status}");
                Err(RouteError::Undelivered)
            }
            // Our own deadline passed.
            Err(status) if status.code() == tonic::Code::Cancelled => Err(RouteError::TimedOut),
            Err(status) if is_transport_failure(&status) => {
                tracing::debug!(leader, "forwarding failed: {status}");
                if session_id != 0 {
                    // Perhaps delivered, but under a session: the state machine answers a
                    // retry from memory, so sending it again applies it at most once.
                    Err(RouteError::Undelivered)
                } else {
                    Err(RouteError::LeaderUnreachable)
                }
            }
            Err(status) => Err(RouteError::Failed(status)),
        }
    }
}

/// Sends a forwarded request on a task of its own, so that the call runs to its end even when
/// the caller stops waiting for it (the write was applied here first, see
/// `Frontend::at_leader`). Dropped instead, the call would reset its HTTP/2 stream; the
/// leader's answer, arriving once the stream is forgotten (h2 remembers 50 reset streams),
/// counts as a protocol error on the connection, and h2 closes a connection after 1,024 of
/// them (GOAWAY, ENHANCE_YOUR_CALM), failing every forward in flight on it. Under `etcdctl
/// check perf --load=m` that happened every 10 to 15 s on each follower.
async fn send_forward(
    mut client: PeerClient<Channel>,
    call: Request<ForwardRequest>,
) -> Result<tonic::Response<ForwardResponse>, Status> {
    let call = tokio::spawn(async move { client.forward(call).await });
    call.await.unwrap_or_else(|join_error| {
        Err(Status::internal(format!(
            "flotilla: the forwarding task failed: {join_error}"
        )))
    })
}

/// A tracked write's outcome as this member applied it (`None`: the apply thread stopped).
fn applied_outcome(applied: Option<Applied>) -> Result<Answer, RouteError> {
    match applied {
        Some(applied) => Answer::of_applied(applied),
        None => Err(RouteError::Node(NodeError::Stopped)),
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

/// The call failed on its way (the leader answers its own refusals and errors inside a
/// successful call, so any of these codes here is the transport's).
fn is_transport_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tonic::transport::Endpoint;

    use super::*;
    use crate::peer_proto::peer_server::{Peer, PeerServer};
    use crate::transport::peer_client;

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

    /// A peer that answers each forward only when told to, and says when a forward was
    /// cancelled (its stream reset by the caller) before it answered.
    struct SlowPeer {
        entered: tokio::sync::mpsc::UnboundedSender<()>,
        release: Arc<tokio::sync::Semaphore>,
        cancelled: tokio::sync::mpsc::UnboundedSender<()>,
    }

    /// Says so if dropped before `answered` is set.
    struct CancelSignal {
        cancelled: tokio::sync::mpsc::UnboundedSender<()>,
        answered: bool,
    }

    impl Drop for CancelSignal {
        fn drop(&mut self) {
            if !self.answered {
                let _ = self.cancelled.send(());
            }
        }
    }

    /// Only `forward` is served; the generated defaults answer the rest UNIMPLEMENTED.
    #[tonic::async_trait]
    impl Peer for SlowPeer {
        /// Dropped by the server if the caller resets the stream while it waits.
        async fn forward(
            &self,
            _: Request<ForwardRequest>,
        ) -> Result<tonic::Response<ForwardResponse>, Status> {
            let mut signal = CancelSignal {
                cancelled: self.cancelled.clone(),
                answered: false,
            };
            self.entered.send(()).expect("the test listens");
            self.release.acquire().await.expect("never closed").forget();
            signal.answered = true;
            Ok(tonic::Response::new(ForwardResponse::default()))
        }
    }

    /// A forward whose caller stops waiting (the write was applied at the follower first)
    /// runs to its end: its stream is not reset, and the leader answers it. (Before, the
    /// dropped call reset its stream; when the leader's answer was already on its way, h2
    /// counted it as a protocol error, and closed the connection after 1,024, failing every
    /// forward in flight on it: under `etcdctl check perf --load=m`, every 10 to 15 s.)
    #[tokio::test]
    async fn a_forward_runs_to_its_end_when_its_caller_stops_waiting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let (cancelled_tx, mut cancelled) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let peer = SlowPeer {
            entered: entered_tx,
            release: release.clone(),
            cancelled: cancelled_tx,
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        let client = peer_client(endpoint.connect_lazy());
        let forward = || {
            tokio::spawn(send_forward(
                client.clone(),
                Request::new(ForwardRequest::default()),
            ))
        };
        const CALLS: usize = 20;
        let callers: Vec<_> = (0..CALLS).map(|_| forward()).collect();
        for _ in 0..CALLS {
            entered.recv().await.expect("the peer runs");
        }
        // Every call reached the peer, and its caller gives up.
        for caller in &callers {
            caller.abort();
        }
        for caller in callers {
            assert!(caller.await.unwrap_err().is_cancelled());
        }
        // One more call on the same connection: the peer reads it after any reset of the
        // earlier streams (frames arrive in order), and this single-threaded runtime runs the
        // earlier streams' tasks, woken by those resets, before the new one's.
        let last = forward();
        entered.recv().await.expect("the peer runs");
        let mut reset = 0;
        while cancelled.try_recv().is_ok() {
            reset += 1;
        }
        assert_eq!(
            reset, 0,
            "forwards whose callers left were reset at the peer"
        );
        release.add_permits(CALLS + 1);
        last.await
            .expect("not aborted")
            .expect("the connection still carries forwards");
        server.abort();
    }

    async fn forward_to(port: u16) -> Status {
        let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        peer_client(endpoint.connect_lazy())
            .forward(Request::new(ForwardRequest::default()))
            .await
            .unwrap_err()
    }

    /// The leader's typed refusal and its errors cross the wire as values: a "not leader"
    /// comes back as the typed reason to go round again whatever text an error carries, and
    /// an error keeps its code and text.
    #[test]
    fn refusals_and_errors_cross_the_wire_typed() {
        let not_leader = Answer::into_wire(Err(RouteError::NotLeader));
        assert!(matches!(
            Answer::from_wire(not_leader),
            Err(RouteError::NotLeader)
        ));

        let failed = Answer::into_wire(Err(RouteError::Failed(Status::invalid_argument(
            "etcdserver: key is not provided",
        ))));
        match Answer::from_wire(failed) {
            Err(RouteError::Failed(status)) => {
                assert_eq!(status.code(), tonic::Code::InvalidArgument);
                assert_eq!(status.message(), "etcdserver: key is not provided");
            }
            other => panic!("{other:?}"),
        }

        // The leader timing out is an error for the client, not a reason to go elsewhere.
        let timed_out = Answer::into_wire(Err(RouteError::TimedOut));
        match Answer::from_wire(timed_out) {
            Err(RouteError::Failed(status)) => {
                assert_eq!(status.message(), crate::errors::REQUEST_TIMED_OUT);
            }
            other => panic!("{other:?}"),
        }

        let answer = Answer {
            revision: 7,
            result: AnswerResult::LeaseTtl(30),
        };
        assert_eq!(
            Answer::from_wire(Answer::into_wire(Ok(answer.clone()))).unwrap(),
            answer
        );
    }
}
