//! Duplicate suppression and retries against an in-process mock server that implements
//! Session and KV.Put with the state machine's dedup rules, and can drop responses after
//! applying a write. Each test proves a retried write carries the same session and sequence
//! number and is applied once, or that the client reports the right outcome.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_client::{
    Client, ClientConfig, ClientError, Outcome, RetryPolicy, SessionMode, SessionPolicy,
};
use flotilla_proto::etcdserverpb::kv_server::{Kv, KvServer};
use flotilla_proto::etcdserverpb::{PutRequest, PutResponse, ResponseHeader};
use flotilla_proto::flotilla::session::v1::session_server::{Session, SessionServer};
use flotilla_proto::flotilla::session::v1::{RegisterRequest, RegisterResponse};
use flotilla_proto::{SEQUENCE_METADATA_KEY, SESSION_METADATA_KEY};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Every test finishes well within this.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// How the mock misbehaves on the next Put it applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// Apply, then never answer (the client's attempt times out).
    DropResponse,
    /// Apply, then answer Unavailable "etcdserver: leader changed".
    LeaderChanged,
    /// Apply, drop the response, and forget every session (as an expiry would).
    DropResponseAndExpireSessions,
}

#[derive(Debug)]
struct MockState {
    sessions_supported: bool,
    next_session_id: u64,
    /// Per session: the last sequence applied and its response.
    sessions: HashMap<u64, (u64, PutResponse)>,
    revision: i64,
    applied: u64,
    /// (session, sequence) of every Put received, in order.
    received: Vec<(Option<u64>, Option<u64>)>,
    /// Sessions with a Put being handled, to catch two writes in flight on one session.
    in_flight: HashSet<u64>,
    overlapping_writes: u64,
    faults: Vec<Fault>,
}

#[derive(Clone, Debug)]
struct Mock(Arc<Mutex<MockState>>);

impl Mock {
    fn new(sessions_supported: bool) -> Mock {
        Mock(Arc::new(Mutex::new(MockState {
            sessions_supported,
            next_session_id: 1,
            sessions: HashMap::new(),
            revision: 1,
            applied: 0,
            received: Vec::new(),
            in_flight: HashSet::new(),
            overlapping_writes: 0,
            faults: Vec::new(),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MockState> {
        self.0.lock().unwrap()
    }

    fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    fn forget_sessions(&self) {
        self.state().sessions.clear();
    }
}

fn metadata_number(request: &Request<PutRequest>, key: &str) -> Option<u64> {
    request
        .metadata()
        .get(key)
        .map(|value| value.to_str().unwrap().parse().unwrap())
}

/// What the state machine does with a Put, by flotilla-kv's session rules.
enum Decision {
    Answer(Result<PutResponse, Status>),
    Applied(PutResponse, Fault),
}

impl MockState {
    fn decide(&mut self, session: Option<u64>, sequence: Option<u64>) -> Decision {
        let Some(session) = session else {
            return self.apply(None);
        };
        let sequence = sequence.expect("a session comes with a sequence");
        match self.sessions.get(&session) {
            None => Decision::Answer(Err(Status::failed_precondition(
                "flotilla: client session not found (never registered, expired or evicted)",
            ))),
            Some((last, response)) if *last == sequence => Decision::Answer(Ok(response.clone())),
            Some((last, _)) if *last > sequence => {
                Decision::Answer(Err(Status::failed_precondition(
                    "flotilla: request sequence number is older than the session's last applied request",
                )))
            }
            Some(_) => self.apply(Some((session, sequence))),
        }
    }

    fn apply(&mut self, session: Option<(u64, u64)>) -> Decision {
        self.revision += 1;
        self.applied += 1;
        let response = PutResponse {
            header: Some(ResponseHeader {
                revision: self.revision,
                ..Default::default()
            }),
            prev_kv: None,
        };
        if let Some((id, sequence)) = session {
            self.sessions.insert(id, (sequence, response.clone()));
        }
        let fault = if self.faults.is_empty() {
            Fault::None
        } else {
            self.faults.remove(0)
        };
        if fault == Fault::DropResponseAndExpireSessions {
            self.sessions.clear();
        }
        Decision::Applied(response, fault)
    }
}

#[tonic::async_trait]
impl Kv for Mock {
    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let session = metadata_number(&request, SESSION_METADATA_KEY);
        let sequence = metadata_number(&request, SEQUENCE_METADATA_KEY);
        let decision = {
            let mut state = self.state();
            state.received.push((session, sequence));
            if let Some(session) = session
                && !state.in_flight.insert(session)
            {
                state.overlapping_writes += 1;
            }
            state.decide(session, sequence)
        };
        // Let concurrent writes overlap, if the client allowed it.
        tokio::time::sleep(Duration::from_millis(2)).await;
        if let Some(session) = session {
            self.state().in_flight.remove(&session);
        }
        match decision {
            Decision::Answer(answer) => answer.map(Response::new),
            Decision::Applied(response, Fault::None) => Ok(Response::new(response)),
            Decision::Applied(_, Fault::LeaderChanged) => {
                Err(Status::unavailable("etcdserver: leader changed"))
            }
            Decision::Applied(_, Fault::DropResponse | Fault::DropResponseAndExpireSessions) => {
                // Never answer; the client gives up on this attempt and the stream is reset.
                std::future::pending().await
            }
        }
    }
}

#[tonic::async_trait]
impl Session for Mock {
    async fn register(
        &self,
        _request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let mut state = self.state();
        if !state.sessions_supported {
            return Err(Status::unimplemented(
                "unknown service flotilla.session.v1.Session",
            ));
        }
        let session_id = state.next_session_id;
        state.next_session_id += 1;
        let response = PutResponse::default();
        state.sessions.insert(session_id, (0, response));
        Ok(Response::new(RegisterResponse {
            header: None,
            session_id,
            ttl_seconds: 60,
        }))
    }
}

/// A running mock; the server stops when this is dropped.
struct MockServer {
    address: SocketAddr,
    _shutdown: oneshot::Sender<()>,
}

async fn serve(mock: &Mock) -> MockServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(KvServer::new(mock.clone()))
        .add_service(SessionServer::new(mock.clone()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        });
    tokio::spawn(server);
    MockServer {
        address,
        _shutdown: shutdown,
    }
}

/// A port on loopback that refuses connections.
async fn refused_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn config(endpoints: &[SocketAddr], sessions: SessionPolicy) -> ClientConfig {
    let retry = RetryPolicy {
        attempt_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_secs(5),
        ..RetryPolicy::default()
    };
    ClientConfig::new(endpoints.iter().map(ToString::to_string))
        .with_retry(retry)
        .with_sessions(sessions)
        // The mock has no Status service; writes go to the preferred endpoint.
        .with_leader_routing(false)
}

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test exceeded its time bound")
}

const POOL_OF_ONE: SessionPolicy = SessionPolicy::Sessions { pool_size: 1 };

#[tokio::test]
async fn a_write_whose_response_is_dropped_is_retried_with_the_same_sequence_and_applied_once() {
    bounded(async {
        let mock = Mock::new(true);
        let server = serve(&mock).await;
        let client = Client::connect(config(&[server.address], POOL_OF_ONE))
            .await
            .unwrap();
        mock.inject(Fault::DropResponse);

        let response = client
            .put("k", "v")
            .await
            .expect("the retry gets the first response");

        assert_eq!(
            response.header.unwrap().revision,
            2,
            "the remembered response"
        );
        let state = mock.state();
        assert_eq!(state.applied, 1, "applied once");
        assert_eq!(state.received, vec![(Some(1), Some(1)), (Some(1), Some(1))]);
        assert_eq!(client.session_mode(), SessionMode::Sessions);
    })
    .await;
}

#[tokio::test]
async fn a_leader_change_after_apply_is_retried_under_the_same_sequence() {
    bounded(async {
        let mock = Mock::new(true);
        let server = serve(&mock).await;
        let client = Client::connect(config(&[server.address], POOL_OF_ONE))
            .await
            .unwrap();
        client.put("a", "1").await.unwrap();
        mock.inject(Fault::LeaderChanged);

        client.put("b", "2").await.unwrap();

        let state = mock.state();
        assert_eq!(state.applied, 2);
        assert_eq!(
            state.received,
            vec![(Some(1), Some(1)), (Some(1), Some(2)), (Some(1), Some(2))]
        );
    })
    .await;
}

#[tokio::test]
async fn without_sessions_a_possibly_applied_write_is_unknown_and_not_retried() {
    bounded(async {
        let mock = Mock::new(false);
        let server = serve(&mock).await;
        // A write that cannot be retried waits for the whole call budget.
        let mut config = config(&[server.address], POOL_OF_ONE);
        config.retry.call_timeout = Duration::from_secs(1);
        let client = Client::connect(config).await.unwrap();
        mock.inject(Fault::DropResponse);

        let error = client.put("k", "v").await.unwrap_err();

        assert_eq!(error.outcome(), Outcome::Unknown, "{error}");
        assert_eq!(client.session_mode(), SessionMode::Plain);
        let state = mock.state();
        assert_eq!(state.received, vec![(None, None)], "sent once, untagged");
        assert_eq!(state.applied, 1);
    })
    .await;
}

#[tokio::test]
async fn a_session_unknown_before_any_attempt_applied_moves_the_write_to_a_new_session() {
    bounded(async {
        let mock = Mock::new(true);
        let server = serve(&mock).await;
        let client = Client::connect(config(&[server.address], POOL_OF_ONE))
            .await
            .unwrap();
        client.put("a", "1").await.unwrap();
        mock.forget_sessions();

        client
            .put("b", "2")
            .await
            .expect("nothing was applied, so the write moves on");

        let state = mock.state();
        assert_eq!(state.applied, 2);
        assert_eq!(
            state.received,
            vec![(Some(1), Some(1)), (Some(1), Some(2)), (Some(2), Some(1))]
        );
    })
    .await;
}

#[tokio::test]
async fn a_session_lost_after_a_possibly_applied_attempt_makes_the_outcome_unknown() {
    bounded(async {
        let mock = Mock::new(true);
        let server = serve(&mock).await;
        let client = Client::connect(config(&[server.address], POOL_OF_ONE))
            .await
            .unwrap();
        mock.inject(Fault::DropResponseAndExpireSessions);

        let error = client.put("k", "v").await.unwrap_err();

        assert!(
            matches!(error, ClientError::OutcomeUnknown { .. }),
            "{error:?}"
        );
        assert_eq!(error.outcome(), Outcome::Unknown);
        assert_eq!(
            mock.state().applied,
            1,
            "not applied a second time under a new session"
        );
        // Later writes get a fresh session.
        client.put("k2", "v2").await.unwrap();
        let state = mock.state();
        assert_eq!(state.applied, 2);
        assert_eq!(state.received.last(), Some(&(Some(2), Some(1))));
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_endpoint_is_skipped_even_by_plain_writes() {
    bounded(async {
        let mock = Mock::new(false);
        let server = serve(&mock).await;
        let refused = refused_address().await;
        let client = Client::connect(config(&[refused, server.address], SessionPolicy::Plain))
            .await
            .unwrap();

        client
            .put("k", "v")
            .await
            .expect("connection refused means never sent: retried");

        assert_eq!(mock.state().received, vec![(None, None)]);
    })
    .await;
}

#[tokio::test]
async fn when_no_endpoint_is_reachable_the_write_is_not_applied_and_the_call_is_bounded() {
    bounded(async {
        let refused = [refused_address().await, refused_address().await];
        let mut config = config(&refused, SessionPolicy::Plain);
        config.retry.call_timeout = Duration::from_secs(1);
        let client = Client::connect(config).await.unwrap();
        let started = std::time::Instant::now();

        let error = client.put("k", "v").await.unwrap_err();

        assert!(
            matches!(error, ClientError::Unavailable { .. }),
            "{error:?}"
        );
        assert_eq!(error.outcome(), Outcome::NotApplied);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn concurrent_writes_never_share_a_session_in_flight() {
    bounded(async {
        let mock = Mock::new(true);
        let server = serve(&mock).await;
        let pool = SessionPolicy::Sessions { pool_size: 4 };
        let client = Client::connect(config(&[server.address], pool))
            .await
            .unwrap();

        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..32 {
            let client = client.clone();
            writers.spawn(async move { client.put(format!("k{writer}"), "v").await });
        }
        while let Some(result) = writers.join_next().await {
            result.unwrap().unwrap();
        }

        let state = mock.state();
        assert_eq!(state.applied, 32);
        assert_eq!(state.overlapping_writes, 0);
        assert!(
            state.next_session_id - 1 <= 4,
            "at most one session per slot"
        );
        // Every (session, sequence) pair was used once: no write reused another's number.
        let distinct: HashSet<_> = state.received.iter().collect();
        assert_eq!(distinct.len(), 32);
    })
    .await;
}
