//! The metrics listener: `/metrics` (Prometheus text), `/health` (etcd's JSON: a leader is
//! known and a linearizable read succeeds), `/readyz` (can serve traffic) and `/livez` (the
//! node is running).

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
