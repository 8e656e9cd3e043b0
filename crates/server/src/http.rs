//! The metrics listener: `/metrics` (Prometheus text), `/health` (etcd's JSON: a leader is
//! known and a linearizable read succeeds), `/readyz` (can serve traffic), `/livez` (the
//! node is running), with `--experimental-raft-view`, `/debug/raft` and
//! `/debug/raft/events` (the member's Raft state: see `node::view`), and with
//! `--experimental-dev-faults`, `/debug/faults/partition` and `/debug/faults/heal`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::frontend::Frontend;
use crate::metrics::Metrics;

#[derive(Clone)]
struct HttpState {
    frontend: Arc<Frontend>,
    metrics: Arc<Metrics>,
}

pub fn router(frontend: Arc<Frontend>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/readyz", get(readyz))
        .route("/livez", get(livez))
        .route("/debug/raft", get(raft_view))
        .route("/debug/raft/events", get(raft_view_events))
        .route("/debug/faults/partition", axum::routing::post(partition))
        .route("/debug/faults/heal", axum::routing::post(heal))
        .with_state(HttpState { frontend, metrics })
}

async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

fn health_json(
    healthy: bool,
    reason: &str,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({"health": healthy.to_string(), "reason": reason}).to_string();
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

/// Healthy when a leader is known, no alarm is active (etcd's rule: a NOSPACE or CORRUPT
/// cluster is unhealthy) and a linearizable read (a read index) succeeds.
async fn health(State(state): State<HttpState>) -> impl IntoResponse {
    let node = &state.frontend.node;
    if node.status().leader.is_none() {
        return health_json(false, "RAFT NO LEADER");
    }
    let alarms = node
        .state
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .alarms
        .to_members();
    if let Some(alarm) = alarms.first() {
        let name = crate::alarms::name(alarm.alarm);
        return health_json(false, &format!("ALARM {name}"));
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    match node.read_index(deadline).await {
        Ok(()) => health_json(true, ""),
        Err(err) => health_json(false, &format!("linearizable read failed: {err:?}")),
    }
}

/// Ready to serve clients: running, with a leader known.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let status = state.frontend.node.status();
    if status.stopped {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: stopped\n")
    } else if status.leader.is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no leader\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// Alive: the raft task is running.
async fn livez(State(state): State<HttpState>) -> impl IntoResponse {
    if state.frontend.node.status().stopped {
        (StatusCode::SERVICE_UNAVAILABLE, "not alive: stopped\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// At most one view event per interval for each subscriber: the raft task publishes a view
/// at every round and tick, and a page needs no more than this to draw it.
const VIEW_EVENTS_INTERVAL: Duration = Duration::from_millis(50);

fn raft_view_off() -> axum::response::Response {
    (
        StatusCode::NOT_FOUND,
        "the Raft view is off: start the member with --experimental-raft-view\n",
    )
        .into_response()
}

/// The member's Raft state now, as JSON.
async fn raft_view(State(state): State<HttpState>) -> axum::response::Response {
    let Some(view) = state.frontend.node.raft_view() else {
        return raft_view_off();
    };
    let json = serde_json::to_string(&*view.borrow()).expect("a view encodes as JSON");
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// The member's Raft state as server-sent events (`event: view`), the current one first, then
/// the latest at most every [`VIEW_EVENTS_INTERVAL`] while it changes; the stream ends after
/// the view that says the member stopped.
async fn raft_view_events(State(state): State<HttpState>) -> axum::response::Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let Some(mut view) = state.frontend.node.raft_view() else {
        return raft_view_off();
    };
    let (events, stream) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        loop {
            let json =
                serde_json::to_string(&*view.borrow_and_update()).expect("a view encodes as JSON");
            if events
                .send(Ok(Event::default().event("view").data(json)))
                .await
                .is_err()
            {
                return; // the subscriber went away
            }
            tokio::time::sleep(VIEW_EVENTS_INTERVAL).await;
            if view.changed().await.is_err() {
                return; // the raft task is gone; its last view was sent
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(stream))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(serde::Deserialize)]
struct PartitionQuery {
    /// Member ids in hexadecimal, comma-separated.
    peers: String,
}

fn dev_faults_off() -> axum::response::Response {
    (
        StatusCode::NOT_FOUND,
        "fault injection is off: start the member with --experimental-dev-faults\n",
    )
        .into_response()
}

/// Cuts this member off from `peers` (see `transport::CutOff`); replaces any earlier cut.
async fn partition(
    State(state): State<HttpState>,
    axum::extract::Query(query): axum::extract::Query<PartitionQuery>,
) -> axum::response::Response {
    let Some(cut_off) = &state.frontend.identity.cut_off else {
        return dev_faults_off();
    };
    let mut peers = std::collections::BTreeSet::new();
    for hex in query.peers.split(',').filter(|hex| !hex.is_empty()) {
        match u64::from_str_radix(hex, 16) {
            Ok(id) => peers.insert(id),
            Err(_) => {
                let why = format!("not a member id in hexadecimal: {hex:?}\n");
                return (StatusCode::BAD_REQUEST, why).into_response();
            }
        };
    }
    tracing::warn!(?peers, "dev fault: cut off from these members");
    cut_off.set(peers);
    (StatusCode::OK, "cut off\n").into_response()
}

/// Ends this member's partition.
async fn heal(State(state): State<HttpState>) -> axum::response::Response {
    let Some(cut_off) = &state.frontend.identity.cut_off else {
        return dev_faults_off();
    };
    tracing::warn!("dev fault: healed");
    cut_off.set(Default::default());
    (StatusCode::OK, "healed\n").into_response()
}
