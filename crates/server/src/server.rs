//! One member, wired up: listeners, identity, storage, the node, the services, and the
//! shutdown sequence.
//!
//! Graceful shutdown (SIGTERM or Ctrl-C), in order:
//! 1. a leader hands leadership to the most up-to-date follower and waits (bounded) for it;
//! 2. the client listener stops accepting; requests in flight finish (bounded by the request
//!    timeout);
//! 3. the raft task stops: anything still waiting gets "etcdserver: server stopped";
//! 4. the WAL thread syncs and closes the log; the peer listener stops.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::serve::ListenerExt as _;
use flotilla_kv::{Limits, RequestLimits};
use flotilla_proto::etcdserverpb::auth_server::AuthServer;
use flotilla_proto::etcdserverpb::cluster_server::ClusterServer;
use flotilla_proto::etcdserverpb::kv_server::KvServer;
use flotilla_proto::etcdserverpb::lease_server::LeaseServer;
use flotilla_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use flotilla_proto::flotilla::session::v1::session_server::SessionServer;
use flotilla_proto::mvccpb::Event;
use flotilla_raft::{Role, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::{ServerConfig, listen_addr};
use crate::election_service::ElectionService;
use crate::frontend::Frontend;
use crate::http;
use crate::identity::{Identity, load_or_create};
use crate::inherited::InheritedListeners;
use crate::lease::Lessor;
use crate::listener::{configure_accepted, grpc_incoming, tls_incoming};
use crate::lock_service::LockService;
use crate::members::MemberTable;
use crate::metrics::Metrics;
use crate::node::{self, NodeHandle, NodeOptions, NodeParts, RunningNode};
use crate::peer_proto::peer_server::PeerServer;
use crate::peer_service::PeerService;
use crate::services::{ClientServices, publish_attributes_command};
use crate::state_machine::{EventSink, StateMachine};
use crate::transport::{PEER_MESSAGE_BYTES_MAX, PeerIdentity, PeerRouter};
use crate::watch::{QueueBounds, WatchContext, WatchHub};
use flotilla_proto::v3electionpb::election_server::ElectionServer;
use flotilla_proto::v3lockpb::lock_server::LockServer;
use flotilla_runtime::DurableStorage;

/// What the apply thread tells: events to the watch hub, grants to the lessor.
#[derive(Debug)]
struct ApplyObservers {
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    tokens: Arc<crate::auth::Tokens>,
}

impl EventSink for ApplyObservers {
    fn publish(&self, revision: i64, events: &[Event]) {
        self.hub.publish(revision, events);
    }

    fn state_replaced(&self, previous_revision: i64) {
        self.hub.state_replaced(previous_revision);
    }

    fn lease_granted(&self, id: i64, ttl_seconds: i64) {
        self.lessor.granted(id, ttl_seconds);
    }

    fn auth_applied(&self, applied: &crate::auth::AuthApplied) {
        if let Some((token, user)) = &applied.token {
            self.tokens.register(token.clone(), user.clone());
        }
        if let Some(user) = &applied.revoke_tokens_of {
            self.tokens.revoke_user(user);
        }
        if applied.disabled {
            self.tokens.revoke_all();
        }
    }
}

/// How a member ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (signal).
    Shutdown,
    /// Removed from the cluster.
    Removed,
}

const INBOX_MESSAGES: usize = 8192;

/// Opens the storage for a member; the write-ahead log in production.
pub type StorageOpener =
    dyn Fn(&ServerConfig, &Identity) -> anyhow::Result<Arc<dyn DurableStorage>> + Send + Sync;

/// Runs a member until `shutdown` completes (then stops gracefully) or it stops on its own.
pub async fn run(
    config: ServerConfig,
    open_storage: &StorageOpener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Exit> {
    let listeners = Listeners::bind(&config)?;
    let (identity, created) = load_or_create(&config).await?;
    tracing::info!(
        name = %identity.name,
        member = format!("{:x}", identity.member_id),
        cluster = format!("{:x}", identity.cluster_id),
        created,
        "starting member"
    );
    let tls = crate::tls::member_tls(&config)?;
    let storage = open_storage(&config, &identity)?;
    let limits = Limits {
        request: RequestLimits {
            request_bytes_max: config.max_request_bytes,
            key_bytes_max: config.max_request_bytes,
            value_bytes_max: config.max_request_bytes,
            txn_ops_max: config.max_txn_ops,
        },
        ..Limits::default()
    };
    let metrics = Arc::new(Metrics::default());
    let hub = Arc::new(WatchHub::with_metrics(
        QueueBounds::default(),
        metrics.clone(),
    ));
    let lessor = Lessor::new(config.election_timeout);
    let tokens = Arc::new(crate::auth::Tokens::new(
        crate::auth::TokenKind::parse(&config.auth_token)?,
        config.auth_token_ttl,
    ));
    let observers = ApplyObservers {
        hub: hub.clone(),
        lessor: lessor.clone(),
        tokens: tokens.clone(),
    };
    let table = MemberTable::from_members(identity.bootstrap_table());
    let state = StateMachine::new(limits, table).with_events(Arc::new(observers));
    let state = Arc::new(RwLock::new(state));
    let peer_identity = PeerIdentity {
        cluster_id: identity.cluster_id,
        member_id: identity.member_id,
        dial_tls: tls.dial_peers.clone(),
        cut_off: config.dev_faults.then(Default::default),
    };
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_MESSAGES);
    let (events_tx, events_rx) = mpsc::channel(1024);
    let hints: BTreeMap<_, _> = identity
        .peer_hints
        .iter()
        .filter_map(|m| Some((m.id, m.peer_urls.first()?.clone())))
        .collect();
    let router = PeerRouter::new(peer_identity.clone(), state.clone(), hints, events_tx);
    let (stop_node_tx, stop_node_rx) = watch::channel(false);
    let running = node::start(NodeParts {
        options: node_options(&config, identity.member_id),
        storage,
        state,
        transport: router,
        inbox: inbox_rx,
        transport_events: events_rx,
        metrics: metrics.clone(),
        shutdown: stop_node_rx,
    })
    .map_err(|e| anyhow::anyhow!("cannot start the Raft node: {e}"))?;
    let frontend = Arc::new(
        Frontend::new(
            running.handle.clone(),
            Arc::new(peer_identity),
            identity.cluster_token.clone(),
            request_timeout(&config),
            config.election_timeout,
            config.session_ttl,
            lessor,
        )
        .with_quota(quota_in_force(&config))
        .with_auth(
            tokens,
            config.bcrypt_cost,
            config.client_tls.client_cert_auth,
        ),
    );
    if config.initial_corrupt_check
        && let Err(err) = crate::corruption::initial_check(&frontend).await
    {
        let _ = stop_node_tx.send(true);
        let _ = running.join().await;
        return Err(err);
    }
    let servers = Servers::start(
        listeners,
        &tls,
        &config,
        &identity,
        (frontend.clone(), hub),
        inbox_tx,
        metrics,
    );
    let background = spawn_background(&config, &identity, frontend.clone());
    let exit = tokio::select! {
        () = shutdown => Exit::Shutdown,
        exit = stopped_by_itself(&running.handle) => exit?,
    };
    stop(
        exit.clone(),
        &config,
        frontend,
        running,
        servers,
        stop_node_tx,
        background,
    )
    .await?;
    Ok(exit)
}

/// The deadline of one client request: etcd's 5 s plus two election timeouts.
fn request_timeout(config: &ServerConfig) -> Duration {
    Duration::from_secs(5) + 2 * config.election_timeout
}

fn node_options(config: &ServerConfig, id: u64) -> NodeOptions {
    let mut raft = flotilla_raft::Config::new(id);
    let tick_ms = config.heartbeat_interval.as_millis() as u64;
    raft.heartbeat_interval_ticks = 1;
    raft.election_timeout_ticks = (config.election_timeout.as_millis() as u64 / tick_ms).max(2);
    raft.seed = id
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    raft.snapshot_policy = SnapshotPolicy {
        entries_max: config.snapshot_count,
        bytes_max: 256 << 20,
    };
    raft.snapshot_trailing_entries = config.snapshot_catchup_entries;
    raft.lease_reads = config.lease_reads;
    let lease_duration = config.lease_reads.then(|| {
        flotilla_runtime::lease_duration(
            config.heartbeat_interval,
            raft.election_timeout_ticks,
            config.lease_clock_drift,
        )
        .expect("the configuration checked that the lease outlasts the drift margin")
    });
    // The runtime's bounds on the apply backlog and waiting proposals (etcd's order of
    // magnitude); the rest from the configuration.
    NodeOptions {
        tick: config.heartbeat_interval,
        // Half of what a peer message may carry: room for the envelope and the batch.
        proposal_bytes_max: crate::transport::PEER_MESSAGE_BYTES_MAX / 2,
        lease_duration,
        slow_step: config.slow_step,
        raft_view: config.raft_view,
        ..NodeOptions::new(raft)
    }
}

/// Resolves when the node stops without being asked: removed, or a fatal error.
async fn stopped_by_itself(handle: &NodeHandle) -> anyhow::Result<Exit> {
    let mut status = handle.role_watch();
    let status = status
        .wait_for(|s| s.stopped || s.removed)
        .await
        .map(|s| s.clone());
    match status {
        Ok(status) if status.removed => Ok(Exit::Removed),
        Ok(status) => bail!(
            "the member stopped: {}",
            status.fatal.unwrap_or_else(|| "unknown reason".into())
        ),
        Err(_) => bail!("the member stopped"),
    }
}

struct Listeners {
    client: Vec<(String, TcpListener)>,
    peer: Vec<(String, TcpListener)>,
    metrics: Vec<(String, TcpListener)>,
}

impl Listeners {
    /// Takes the inherited sockets and binds every other listener first, so a port in use
    /// fails the start at once and says which. Each listener's address is logged: with port 0
    /// in a URL, that is where the port the kernel chose is reported.
    fn bind(config: &ServerConfig) -> anyhow::Result<Listeners> {
        let mut inherited = InheritedListeners::adopt(&config.listen_fds)?;
        let listeners = Listeners {
            client: bind_all(&config.listen_client_urls, "clients", &mut inherited)?,
            peer: bind_all(&config.listen_peer_urls, "peers", &mut inherited)?,
            metrics: bind_all(&config.listen_metrics_urls, "metrics", &mut inherited)?,
        };
        inherited.finish()?;
        Ok(listeners)
    }
}

/// A listener for each URL: the inherited socket bound to its address, or a new one.
fn bind_all(
    urls: &[String],
    what: &str,
    inherited: &mut InheritedListeners,
) -> anyhow::Result<Vec<(String, TcpListener)>> {
    let mut listeners = Vec::new();
    for url in urls {
        let addr: SocketAddr = listen_addr(url)?;
        let (listener, handed_over) = match inherited.take(addr) {
            Some(listener) => {
                let listener = TcpListener::from_std(listener)?;
                crate::listener::widen_backlog(&listener)?;
                (listener, true)
            }
            None => {
                let listener = crate::listener::bind(addr)
                    .with_context(|| format!("cannot listen for {what} on {url} ({addr})"))?;
                (listener, false)
            }
        };
        let local = listener.local_addr()?;
        tracing::info!(%url, %local, inherited = handed_over, "listening for {what}");
        listeners.push((url.clone(), listener));
    }
    Ok(listeners)
}

struct Servers {
    client_stop: watch::Sender<bool>,
    client: Vec<tokio::task::JoinHandle<()>>,
    peer_stop: watch::Sender<bool>,
    peer: Vec<tokio::task::JoinHandle<()>>,
    http: Vec<tokio::task::JoinHandle<()>>,
}

impl Servers {
    fn start(
        listeners: Listeners,
        tls: &crate::tls::MemberTls,
        config: &ServerConfig,
        identity: &Identity,
        (frontend, hub): (Arc<Frontend>, Arc<WatchHub>),
        inbox: mpsc::Sender<flotilla_raft::Message>,
        metrics: Arc<Metrics>,
    ) -> Servers {
        let (client_stop, client_stop_rx) = watch::channel(false);
        let watch = Arc::new(WatchContext {
            frontend: frontend.clone(),
            hub,
            progress_interval: config.watch_progress_notify_interval,
            fragment_bytes_max: config.max_request_bytes,
            stopping: client_stop_rx.clone(),
        });
        let services = ClientServices {
            frontend: frontend.clone(),
            watch,
            stopping: client_stop_rx.clone(),
            backup_dir: config.data_dir.as_path().into(),
            maintenance_slots: Arc::new(tokio::sync::Semaphore::new(
                crate::services::MAINTENANCE_SLOTS,
            )),
            acting_for: None,
        };
        // etcd's gRPC receive limit: the request limit plus 512 KiB; the request itself is
        // checked against the limit with etcd's error text.
        let receive_bytes_max = config.max_request_bytes + (512 << 10);
        let mut client = Vec::new();
        for (url, listener) in listeners.client {
            tracing::info!(%url, "serving clients");
            let mut grpc = tonic::service::Routes::builder();
            grpc.add_service(
                KvServer::new(services.clone())
                    .max_decoding_message_size(receive_bytes_max)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(LeaseServer::new(services.clone()))
            .add_service(ClusterServer::new(services.clone()))
            .add_service(MaintenanceServer::new(services.clone()))
            .add_service(AuthServer::new(services.clone()))
            .add_service(SessionServer::new(services.clone()))
            .add_service(LockServer::new(LockService {
                services: services.clone(),
            }))
            .add_service(ElectionServer::new(ElectionService {
                services: services.clone(),
            }));
            // gRPC and the JSON gateway on one listener, told apart by path (gRPC's are
            // /<package>.<Service>/<Method>, the gateway's /v3/...): HTTP/2 and HTTP/1.1.
            let gateway = crate::gateway::router(crate::gateway::Gateway {
                services: services.clone(),
                lock: LockService {
                    services: services.clone(),
                },
                election: ElectionService {
                    services: services.clone(),
                },
            })
            .layer(axum::extract::DefaultBodyLimit::max(receive_bytes_max));
            // Range ahead of the generated KV service: its response is encoded as it is sent.
            let range = crate::range_body::router(crate::range_body::RangeRoute {
                services: services.clone(),
                receive_bytes_max,
            });
            // Watch with its own codec: each event's encoding is shared by its watchers.
            let watch = crate::watch::service::router(services.clone());
            let routes = tonic::service::Routes::from(
                grpc.routes()
                    .into_axum_router()
                    .merge(range)
                    .merge(watch)
                    .merge(gateway)
                    .fallback(crate::gateway::not_found),
            );
            let router = tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(routes);
            let tls = url
                .starts_with("https://")
                .then(|| tls.client.clone().expect("https client URLs have TLS"));
            client.push(tokio::spawn(serve_listener(
                router,
                listener,
                tls,
                client_stop_rx.clone(),
                format!("client server at {url}"),
            )));
        }
        let (peer_stop, peer_stop_rx) = watch::channel(false);
        let peer_service = Arc::new(PeerService {
            frontend: frontend.clone(),
            inbox,
            bootstrap_members: identity.bootstrap_table(),
        });
        let mut peer = Vec::new();
        for (url, listener) in listeners.peer {
            tracing::info!(%url, "serving peers");
            let service = PeerServer::from_arc(peer_service.clone())
                .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX);
            let router = tonic::transport::Server::builder().add_service(service);
            let tls = url
                .starts_with("https://")
                .then(|| tls.peer.clone().expect("https peer URLs have TLS"));
            peer.push(tokio::spawn(serve_listener(
                router,
                listener,
                tls,
                peer_stop_rx.clone(),
                format!("peer server at {url}"),
            )));
        }
        let mut http_tasks = Vec::new();
        for (url, listener) in listeners.metrics {
            tracing::info!(%url, "serving metrics and health");
            let app = http::router(frontend.clone(), metrics.clone());
            http_tasks.push(tokio::spawn(async move {
                let listener = listener.tap_io(configure_accepted);
                if let Err(err) = axum::serve(listener, app).await {
                    tracing::error!(%url, "metrics server failed: {err}");
                }
            }));
        }
        Servers {
            client_stop,
            client,
            peer_stop,
            peer,
            http: http_tasks,
        }
    }
}

/// Serves a gRPC router on a listener, over TLS when given, until `stop` turns true.
async fn serve_listener(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<Arc<flotilla_tls::ServerTls>>,
    mut stop: watch::Receiver<bool>,
    what: String,
) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let served = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, tls), stopped)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(grpc_incoming(listener), stopped)
                .await
        }
    };
    if let Err(err) = served {
        tracing::error!("the {what} failed: {err}");
    }
}

/// Tasks that run beside the node: publishing this member's attributes, expiring sessions,
/// the lease clock.
fn spawn_background(
    config: &ServerConfig,
    identity: &Identity,
    frontend: Arc<Frontend>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let publish = {
        let frontend = frontend.clone();
        let name = identity.name.clone();
        let urls = config.advertise_client_urls.clone();
        tokio::spawn(async move { publish_attributes(frontend, name, urls).await })
    };
    let leases = tokio::spawn(crate::lease::run(
        frontend.lessor.clone(),
        frontend.node.clone(),
        frontend.request_timeout,
    ));
    let mut tasks = vec![publish, leases];
    if let Some(interval) = config.corrupt_check_interval {
        let frontend = frontend.clone();
        tasks.push(tokio::spawn(crate::corruption::run_periodic_check(
            frontend, interval,
        )));
    }
    tasks.push(tokio::spawn(async move { expire_sessions(frontend).await }));
    tasks
}

/// Makes sure the member table has this member's name and client URLs (etcd's publish).
async fn publish_attributes(frontend: Arc<Frontend>, name: String, client_urls: Vec<String>) {
    let id = frontend.identity.member_id;
    loop {
        let published = {
            let state = frontend
                .node
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner());
            state
                .members
                .get(id)
                .is_some_and(|m| m.name == name && m.client_urls == client_urls)
        };
        if published {
            return;
        }
        // Wait for a leader (an event), then propose; after a failure, pause briefly.
        let leader_wait = Instant::now() + frontend.request_timeout;
        if frontend
            .node
            .wait_for(leader_wait, |s| s.leader.is_some())
            .await
            .is_none()
        {
            continue;
        }
        let command = publish_attributes_command(id, &name, &client_urls);
        if let Err(status) = frontend.write(command, 0).await {
            tracing::debug!("publishing attributes: {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// On the leader, expires client sessions idle for longer than their TTL.
async fn expire_sessions(frontend: Arc<Frontend>) {
    let period = (frontend.session_ttl / 4).max(Duration::from_millis(250));
    let mut ticker = tokio::time::interval(period);
    loop {
        ticker.tick().await;
        let status = frontend.node.status();
        if status.role != Role::Leader {
            frontend.forget_session_activity();
            continue;
        }
        let idle = frontend.idle_sessions();
        if idle.is_empty() {
            continue;
        }
        tracing::info!(sessions = ?idle, "expiring idle client sessions");
        let command = flotilla_kv::Command::expire_sessions(idle);
        if let Err(status) = frontend.write(command.encode(), 0).await {
            tracing::debug!("expiring sessions: {status}");
        }
    }
}

async fn stop(
    exit: Exit,
    config: &ServerConfig,
    frontend: Arc<Frontend>,
    running: RunningNode,
    servers: Servers,
    stop_node: watch::Sender<bool>,
    background: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    for task in background {
        task.abort();
    }
    if exit == Exit::Shutdown {
        hand_over_leadership(&frontend, config).await;
    }
    tracing::info!("stopping: no new client connections; finishing requests in flight");
    let _ = servers.client_stop.send(true);
    let drain = async {
        for task in servers.client {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(request_timeout(config), drain)
        .await
        .is_err()
    {
        tracing::warn!("client requests still in flight after the timeout; stopping anyway");
    }
    let _ = stop_node.send(true);
    let result = running.join().await;
    // Peer streams are long-lived and the node is gone: no draining, just stop.
    let _ = servers.peer_stop.send(true);
    for task in servers.peer {
        task.abort();
    }
    for task in servers.http {
        task.abort();
    }
    match result {
        Ok(()) => {
            tracing::info!("stopped; the write-ahead log is closed");
            Ok(())
        }
        Err(err) => bail!("{err}"),
    }
}

/// A leader hands over to the most up-to-date follower before stopping (etcd's Stop), so the
/// cluster does not wait an election timeout for a new leader.
async fn hand_over_leadership(frontend: &Frontend, config: &ServerConfig) {
    let me = frontend.identity.member_id;
    let status = frontend.node.status();
    if status.leader != Some(me) {
        return;
    }
    let deadline = Instant::now() + 3 * config.election_timeout;
    // Only to a follower heard from recently: a member that is down cannot take over.
    let live = frontend.recently_heard_peers();
    if live.is_empty() {
        tracing::warn!("no follower heard from recently to hand leadership to; stopping");
        return;
    }
    match frontend.node.transfer_leader(None, live, deadline).await {
        Ok(target) => {
            tracing::info!(
                to = format!("{target:x}"),
                "handing leadership over before stopping"
            );
            let moved = frontend
                .node
                .wait_for(deadline, |s| s.leader.is_some_and(|l| l != me))
                .await;
            if moved.is_none() {
                tracing::warn!("leadership did not move in time; stopping anyway");
            }
        }
        Err(err) => tracing::warn!("cannot hand leadership over: {err:?}"),
    }
}

/// The configured space quota, lowered to what the member's memory can hold (see
/// [`crate::memory`]).
fn quota_in_force(config: &ServerConfig) -> Option<u64> {
    let memory = crate::memory::memory_limit_bytes();
    let (quota, warning) = crate::memory::effective_quota(config.quota_backend_bytes, memory);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    quota
}
