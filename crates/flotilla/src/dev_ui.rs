//! The cluster view of `flotilla dev`: a web page (bundled into the binary) that shows the
//! real members' Raft state as it changes, and controls that act on the real processes.
//!
//! Each member publishes its Raft view as server-sent events (`--experimental-raft-view`,
//! `/debug/raft/events` on its metrics port). This module follows every member's stream and
//! serves the page one stream of its own, `/events`, merging them with what happens to the
//! processes; the format is documented in `docs/raft-view.md`. The controls are POST requests
//! that must carry the header `x-flotilla-dev: 1`, which a page of another origin cannot send
//! without a CORS preflight this server never grants, so no other site can drive them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flotilla_proto::etcdserverpb::cluster_client::ClusterClient;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{
    MemberAddRequest, MemberPromoteRequest, MemberRemoveRequest, MoveLeaderRequest, PutRequest,
};
use rustix::process::Signal;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::broadcast;

use crate::dev::Cluster;

const PAGE_HTML: &str = include_str!("ui/index.html");
const PAGE_JS: &str = include_str!("ui/app.js");

/// Events kept for a page that is slow to read before it misses some (it then gets the
/// latest state again).
const EVENTS_QUEUE: usize = 1024;

/// How long to wait before following a member's stream again after it ended (the member
/// was killed or is restarting).
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// The page's shared state: the cluster, the latest view of each member, and the stream of
/// events for the pages.
pub struct Ui {
    cluster: Arc<Cluster>,
    /// The latest view of each member, by name: for a page that connects later, and for the
    /// controls that need a member's id or the leader.
    latest: Mutex<BTreeMap<String, serde_json::Value>>,
    events: broadcast::Sender<(String, String)>,
}

pub async fn serve(cluster: Arc<Cluster>, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for the cluster view on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let ui = Arc::new(Ui {
        cluster: cluster.clone(),
        latest: Mutex::default(),
        events: broadcast::channel(EVENTS_QUEUE).0,
    });
    for name in cluster.member_names() {
        tokio::spawn(follow_member(ui.clone(), name));
    }
    let router = Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/events", get(events))
        .route("/api/kill", post(kill))
        .route("/api/restart", post(restart))
        .route("/api/pause", post(pause))
        .route("/api/resume", post(resume))
        .route("/api/put", post(put))
        .route("/api/transfer", post(transfer))
        .route("/api/partition", post(partition))
        .route("/api/heal", post(heal))
        .route("/api/add-learner", post(add_learner))
        .route("/api/promote", post(promote))
        .route("/api/remove", post(remove))
        .with_state(ui);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("flotilla dev: the cluster view stopped: {err}");
        }
    });
    Ok(local)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Ui {
    fn publish(&self, event: &str, data: serde_json::Value) {
        let _ = self.events.send((event.to_string(), data.to_string()));
    }

    /// A line for the page's timeline.
    fn note(&self, text: &str) {
        self.publish("note", json!({ "at_ms": now_ms(), "text": text }));
    }

    fn publish_process(&self, name: &str) {
        if let Some(event) = process_event(&self.cluster, name) {
            let _ = self.events.send(("process".to_string(), event));
        }
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, serde_json::Value>> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Member ids (hexadecimal) by name, from the views seen so far.
    fn member_ids(&self) -> BTreeMap<String, String> {
        self.latest()
            .iter()
            .filter_map(|(name, view)| Some((name.clone(), view["member"].as_str()?.to_string())))
            .collect()
    }

    /// Tells `name` which members to drop (none: healed). A member that is down or paused
    /// misses it; it is told again when its view stream comes back.
    async fn push_drops(
        &self,
        name: &str,
        drops: &std::collections::BTreeSet<String>,
    ) -> Result<(), String> {
        let ids = self.member_ids();
        let peers: Vec<&str> = drops
            .iter()
            .map(|n| {
                ids.get(n)
                    .map(String::as_str)
                    .ok_or_else(|| format!("no view of {n} yet"))
            })
            .collect::<Result<_, _>>()?;
        let metrics = self
            .cluster
            .metrics_addr(name)
            .ok_or_else(|| format!("no member {name}"))?;
        let path = if peers.is_empty() {
            "/debug/faults/heal".to_string()
        } else {
            format!("/debug/faults/partition?peers={}", peers.join(","))
        };
        post_to_member(&metrics, &path).await
    }
}

/// The `cluster` event: the members (removed ones included) and the timing.
fn cluster_event(cluster: &Cluster) -> String {
    json!({ "members": cluster.member_names(), "slow_motion": cluster.slow_motion() }).to_string()
}

/// The `view` event of a member.
fn view_event(name: &str, view: &serde_json::Value) -> String {
    json!({ "name": name, "view": view }).to_string()
}

/// The `process` event of a member: its process state and whether it is cut off.
fn process_event(cluster: &Cluster, name: &str) -> Option<String> {
    let state = cluster.process_state(name)?;
    let cut_off = cluster.cut_off().contains(name);
    Some(json!({ "name": name, "state": state, "cut_off": cut_off }).to_string())
}

/// How long a request to a member's metrics listener may take (a paused member never answers).
const MEMBER_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// A bodiless POST to a member's metrics listener; Ok on 200.
async fn post_to_member(metrics: &str, path: &str) -> Result<(), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(metrics).await?;
        let request =
            format!("POST {path} HTTP/1.0\r\nHost: {metrics}\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut status = String::new();
        BufReader::new(stream).read_line(&mut status).await?;
        std::io::Result::Ok(status)
    };
    match tokio::time::timeout(MEMBER_REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(status)) if status.split_whitespace().nth(1) == Some("200") => Ok(()),
        Ok(Ok(status)) => Err(format!("{metrics}{path}: {}", status.trim())),
        Ok(Err(err)) => Err(format!("{metrics}: {err}")),
        Err(_) => Err(format!(
            "{metrics}: no answer within {MEMBER_REQUEST_TIMEOUT:?}"
        )),
    }
}

/// Follows one member's view stream for as long as `dev` runs, reconnecting when it ends.
async fn follow_member(ui: Arc<Ui>, name: String) {
    let Some(metrics) = ui.cluster.metrics_addr(&name) else {
        return;
    };
    loop {
        let _ = read_views(&ui, &name, &metrics).await;
        ui.publish_process(&name);
        if ui.cluster.process_state(&name) == Some("removed") {
            return;
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

async fn read_views(ui: &Ui, name: &str, metrics: &str) -> std::io::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(metrics).await?;
    let request = format!("GET /debug/raft/events HTTP/1.0\r\nHost: {metrics}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let mut in_body = false;
    while let Some(line) = lines.next_line().await? {
        if !in_body {
            in_body = line.is_empty();
            if in_body {
                // Back (or first up): it must drop whom the partition says, if anyone.
                let drops = ui.cluster.cut_off_plan(name);
                if !drops.is_empty() {
                    let _ = ui.push_drops(name, &drops).await;
                }
            }
            continue;
        }
        if let Some(data) = line.strip_prefix("data: ") {
            let Ok(view) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            let event = view_event(name, &view);
            ui.latest().insert(name.to_string(), view);
            let _ = ui.events.send(("view".to_string(), event));
        }
    }
    Ok(())
}

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE_HTML,
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        PAGE_JS,
    )
}

/// What a page needs to draw the cluster now: its shape, each member's process and latest
/// view, as events.
fn current_state(ui: &Ui) -> Vec<(String, String)> {
    let mut state = vec![("cluster".to_string(), cluster_event(&ui.cluster))];
    for name in ui.cluster.member_names() {
        if let Some(event) = process_event(&ui.cluster, &name) {
            state.push(("process".to_string(), event));
        }
    }
    state.extend(
        ui.latest()
            .iter()
            .map(|(name, view)| ("view".to_string(), view_event(name, view))),
    );
    state
}

/// The page's event stream: the current state first, then every event as it happens. A page
/// too slow to keep up, which misses events, gets the current state again.
async fn events(State(ui): State<Arc<Ui>>) -> Response {
    let mut receiver = ui.events.subscribe();
    let (sender, stream) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut pending = current_state(&ui);
        loop {
            for (event, data) in pending.drain(..) {
                if sender
                    .send(Ok(Event::default().event(event).data(data)))
                    .await
                    .is_err()
                {
                    return; // the page went away
                }
            }
            match receiver.recv().await {
                Ok(next) => pending.push(next),
                Err(broadcast::error::RecvError::Lagged(_)) => pending = current_state(&ui),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(stream))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
struct MemberQuery {
    member: String,
}

#[derive(Deserialize)]
struct PutQuery {
    key: String,
    value: String,
}

#[derive(Deserialize)]
struct TransferQuery {
    to: String,
}

/// Controls answer 200 with what was done, or an error status with why not.
type Control = Result<String, (StatusCode, String)>;

fn answer(result: Control) -> Response {
    match result {
        Ok(done) => (StatusCode::OK, done).into_response(),
        Err((status, why)) => (status, why).into_response(),
    }
}

fn check_origin(headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    match headers.get("x-flotilla-dev") {
        Some(value) if value == "1" => Ok(()),
        _ => Err((
            StatusCode::FORBIDDEN,
            "controls need the header x-flotilla-dev: 1 (the page sends it)".into(),
        )),
    }
}

/// A member refused or did not answer a call made for the page.
fn unavailable(status: tonic::Status) -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        status.message().to_string(),
    )
}

fn bad(why: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, why.into())
}

/// Runs a control for the page: checks the header only the page sends, runs `action`, and
/// tells the pages what it did if it succeeded.
async fn control(
    ui: &Ui,
    headers: &HeaderMap,
    action: impl std::future::Future<Output = Control>,
) -> Response {
    let result = match check_origin(headers) {
        Ok(()) => action.await,
        Err(refused) => Err(refused),
    };
    if let Ok(text) = &result {
        ui.note(text);
    }
    answer(result)
}

/// Acts on a member's process with `act`, then tells the pages.
fn process_control(
    ui: &Ui,
    headers: &HeaderMap,
    name: &str,
    act: impl FnOnce(&Cluster, &str) -> Result<(), String>,
    done: &str,
) -> Response {
    let result = check_origin(headers).and_then(|()| act(&ui.cluster, name).map_err(bad));
    answer(result.map(|()| {
        let text = format!("{name} {done}");
        ui.note(&text);
        ui.publish_process(name);
        text
    }))
}

async fn kill(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    process_control(&ui, &headers, &q.member, Cluster::kill, "killed (SIGKILL)")
}

async fn restart(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    process_control(&ui, &headers, &q.member, Cluster::restart, "restarted")
}

async fn pause(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    let stop = |cluster: &Cluster, name: &str| cluster.signal(name, Signal::STOP);
    process_control(&ui, &headers, &q.member, stop, "paused (SIGSTOP)")
}

async fn resume(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    let resume = |cluster: &Cluster, name: &str| cluster.signal(name, Signal::CONT);
    process_control(&ui, &headers, &q.member, resume, "resumed (SIGCONT)")
}

/// Puts a key through the first member that takes it (any member forwards to the leader).
async fn put(State(ui): State<Arc<Ui>>, headers: HeaderMap, Query(q): Query<PutQuery>) -> Response {
    control(&ui, &headers, async {
        if q.key.is_empty() {
            return Err(bad("the key is empty"));
        }
        let mut last_error = String::from("no member is running");
        for name in ui.cluster.running_members() {
            let Some(channel) = ui.cluster.channel(&name) else {
                continue;
            };
            let request = PutRequest {
                key: q.key.clone().into(),
                value: q.value.clone().into(),
                ..Default::default()
            };
            match KvClient::new(channel).put(member_call(request)).await {
                Ok(response) => {
                    let revision = response.into_inner().header.map_or(0, |h| h.revision);
                    let text = format!("put {} through {name}: revision {revision}", q.key);
                    return Ok(text);
                }
                Err(status) => last_error = format!("{name}: {}", status.message()),
            }
        }
        Err((StatusCode::SERVICE_UNAVAILABLE, last_error))
    })
    .await
}

/// Asks the leader (as the views say) to hand leadership to `to`.
async fn transfer(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<TransferQuery>,
) -> Response {
    control(&ui, &headers, async {
        let target = member_id(&ui, &q.to)?;
        let leader = ui
            .latest()
            .iter()
            .find(|(_, view)| view["role"] == "leader" && view["stopped"] != true)
            .map(|(name, _)| name.clone())
            .ok_or_else(|| bad("no member leads now"))?;
        if leader == q.to {
            return Err(bad(format!("{} leads already", q.to)));
        }
        let channel = ui
            .cluster
            .channel(&leader)
            .ok_or_else(|| bad(format!("{leader} is not running")))?;
        MaintenanceClient::new(channel)
            .move_leader(member_call(MoveLeaderRequest { target_id: target }))
            .await
            .map_err(unavailable)?;
        Ok(format!("leadership handed from {leader} to {}", q.to))
    })
    .await
}

/// Cuts a member off from all the others (every member drops the messages between them).
async fn partition(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    answer(set_partition(&ui, &headers, &q.member, true).await)
}

/// Ends a member's partition.
async fn heal(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    answer(set_partition(&ui, &headers, &q.member, false).await)
}

async fn set_partition(ui: &Ui, headers: &HeaderMap, name: &str, cut: bool) -> Control {
    check_origin(headers)?;
    if cut && ui.cluster.cut_off().contains(name) {
        return Err(bad(format!("{name} is cut off already")));
    }
    let plan = ui.cluster.set_cut_off(name, cut).map_err(bad)?;
    // Members that are down learn it when they come back (see `read_views`).
    let mut missed = Vec::new();
    for (member, drops) in &plan {
        if !ui.cluster.running_members().contains(member) {
            continue;
        }
        if let Err(err) = ui.push_drops(member, drops).await {
            missed.push(format!("{member}: {err}"));
        }
    }
    let mut text = if cut {
        format!("{name} cut off from the others (messages both ways dropped)")
    } else {
        format!("{name} healed")
    };
    if !missed.is_empty() {
        text.push_str(&format!("; not told yet: {}", missed.join("; ")));
    }
    ui.note(&text);
    for member in ui.cluster.member_names() {
        ui.publish_process(&member);
    }
    Ok(text)
}

/// A cluster client through the first running member that is not `except`.
fn cluster_client(
    ui: &Ui,
    except: &str,
) -> Result<ClusterClient<tonic::transport::Channel>, (StatusCode, String)> {
    ui.cluster
        .running_members()
        .into_iter()
        .filter(|name| name != except)
        .find_map(|name| ui.cluster.channel(&name))
        .map(ClusterClient::new)
        .ok_or_else(|| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "no member is running".to_string(),
            )
        })
}

fn member_call<T>(request: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(5));
    request
}

/// The member's id from its latest view.
fn member_id(ui: &Ui, name: &str) -> Result<u64, (StatusCode, String)> {
    ui.member_ids()
        .get(name)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| bad(format!("no view of {name} yet")))
}

/// Adds the next member as a learner (MemberAdd), then starts it to join (§6; a learner
/// receives the log without voting until it is promoted).
async fn add_learner(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    control(&ui, &headers, async {
        let mut members = cluster_client(&ui, "")?;
        let added = ui
            .cluster
            .add_member(|peer_url| async move {
                let request = MemberAddRequest {
                    peer_urls: vec![peer_url],
                    is_learner: true,
                };
                members
                    .member_add(member_call(request))
                    .await
                    .map(|_| ())
                    .map_err(|status| status.message().to_string())
            })
            .await
            .map_err(|why| (StatusCode::SERVICE_UNAVAILABLE, why))?;
        let _ = ui
            .events
            .send(("cluster".to_string(), cluster_event(&ui.cluster)));
        tokio::spawn(follow_member(ui.clone(), added.clone()));
        ui.publish_process(&added);
        Ok(format!("{added} added as a learner, and started"))
    })
    .await
}

/// Promotes a learner to a voter (etcd refuses it until the learner has caught up).
async fn promote(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    control(&ui, &headers, async {
        let id = member_id(&ui, &q.member)?;
        cluster_client(&ui, "")?
            .member_promote(member_call(MemberPromoteRequest { id }))
            .await
            .map_err(unavailable)?;
        Ok(format!("{} promoted to a voter", q.member))
    })
    .await
}

/// Removes a member from the cluster (MemberRemove through another member); it stops itself.
async fn remove(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<MemberQuery>,
) -> Response {
    control(&ui, &headers, async {
        let id = member_id(&ui, &q.member)?;
        cluster_client(&ui, &q.member)?
            .member_remove(member_call(MemberRemoveRequest { id }))
            .await
            .map_err(unavailable)?;
        ui.cluster.mark_removed(&q.member);
        ui.publish_process(&q.member);
        Ok(format!("{} removed from the cluster", q.member))
    })
    .await
}
