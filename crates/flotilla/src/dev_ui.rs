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
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{MoveLeaderRequest, PutRequest};
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
    /// The latest `view` event's data for each member, for a page that connects later.
    latest: Mutex<BTreeMap<String, String>>,
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
        if let Some(state) = self.cluster.process_state(name) {
            self.publish("process", json!({ "name": name, "state": state }));
        }
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
            continue;
        }
        if let Some(data) = line.strip_prefix("data: ") {
            let Ok(view) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            let event = json!({ "name": name, "view": view }).to_string();
            ui.latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string(), event.clone());
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

/// The page's event stream: the cluster's shape, each member's process state and latest
/// view first, then every event as it happens.
async fn events(State(ui): State<Arc<Ui>>) -> Response {
    let mut receiver = ui.events.subscribe();
    let (sender, stream) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let mut first = vec![(
        "cluster".to_string(),
        json!({
            "members": ui.cluster.member_names(),
            "slow_motion": ui.cluster.slow_motion(),
        })
        .to_string(),
    )];
    for name in ui.cluster.member_names() {
        if let Some(state) = ui.cluster.process_state(&name) {
            first.push((
                "process".to_string(),
                json!({ "name": name, "state": state }).to_string(),
            ));
        }
    }
    first.extend(
        ui.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|data| ("view".to_string(), data.clone())),
    );
    tokio::spawn(async move {
        for (event, data) in first {
            if sender
                .send(Ok(Event::default().event(event).data(data)))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let (event, data) = match receiver.recv().await {
                Ok(next) => next,
                // Too slow: some views were missed; the next ones replace them.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if sender
                .send(Ok(Event::default().event(event).data(data)))
                .await
                .is_err()
            {
                return;
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

fn bad(why: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, why.into())
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
    let result = async {
        check_origin(&headers)?;
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
            let mut request = tonic::Request::new(request);
            request.set_timeout(Duration::from_secs(5));
            match KvClient::new(channel).put(request).await {
                Ok(response) => {
                    let revision = response.into_inner().header.map_or(0, |h| h.revision);
                    let text = format!("put {} through {name}: revision {revision}", q.key);
                    ui.note(&text);
                    return Ok(text);
                }
                Err(status) => last_error = format!("{name}: {}", status.message()),
            }
        }
        Err((StatusCode::SERVICE_UNAVAILABLE, last_error))
    };
    answer(result.await)
}

/// Asks the leader (as the views say) to hand leadership to `to`.
async fn transfer(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(q): Query<TransferQuery>,
) -> Response {
    let result = async {
        check_origin(&headers)?;
        let views: Vec<serde_json::Value> = ui
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|data| serde_json::from_str(data).ok())
            .collect();
        let member_of = |name: &str| {
            views
                .iter()
                .find(|v| v["name"] == name)
                .and_then(|v| v["view"]["member"].as_str())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        };
        let target = member_of(&q.to).ok_or_else(|| bad(format!("no view of {} yet", q.to)))?;
        let leader = views
            .iter()
            .find(|v| {
                v["view"]["role"] == "leader" && !v["view"]["stopped"].as_bool().unwrap_or(false)
            })
            .and_then(|v| v["name"].as_str().map(str::to_string))
            .ok_or_else(|| bad("no member leads now"))?;
        if leader == q.to {
            return Err(bad(format!("{} leads already", q.to)));
        }
        let channel = ui
            .cluster
            .channel(&leader)
            .ok_or_else(|| bad(format!("{leader} is not running")))?;
        let mut request = tonic::Request::new(MoveLeaderRequest { target_id: target });
        request.set_timeout(Duration::from_secs(5));
        MaintenanceClient::new(channel)
            .move_leader(request)
            .await
            .map_err(|status| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    status.message().to_string(),
                )
            })?;
        let text = format!("leadership handed from {leader} to {}", q.to);
        ui.note(&text);
        Ok(text)
    };
    answer(result.await)
}
