//! etcd's JSON gateway: the client API as JSON over HTTP on the client port, beside gRPC.
//!
//! Every call is `POST /v3/<service>/<method>` with the request message as the body, in the
//! protobuf JSON mapping with etcd's field names (64-bit integers as strings, bytes as base64,
//! enums by name; reading also takes numbers and the .proto names). The answer is the
//! response message, or an error body `{"error", "code", "message"}` with the gRPC code and
//! the HTTP status etcd's gateway uses for it. Streams (`/v3/watch`, `/v3/lease/keepalive`,
//! `/v3/maintenance/snapshot`, `/v3/election/observe`) answer one JSON object per line,
//! `{"result": ...}` or `{"error": {...}}`; a watch or keep-alive takes the requests in its
//! body and then stays open until the client goes, as etcd's does.
//!
//! The gateway calls the same service implementations as gRPC, in process: same checks, same
//! errors. The gRPC `Authorization` header travels as the `authorization` metadata.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use flotilla_proto::etcdserverpb::auth_server::Auth;
use flotilla_proto::etcdserverpb::cluster_server::Cluster;
use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::etcdserverpb::lease_server::Lease;
use flotilla_proto::etcdserverpb::maintenance_server::Maintenance;
use flotilla_proto::etcdserverpb::{LeaseKeepAliveRequest, WatchRequest, WatchResponse};
use flotilla_proto::v3electionpb::election_server::Election;
use flotilla_proto::v3lockpb::lock_server::Lock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::BoxStream;
use tonic::{Code, Status};

use crate::election_service::ElectionService;
use crate::lock_service::LockService;
use crate::services::ClientServices;
use crate::watch::event::WatchOut;

/// What the gateway's handlers call.
#[derive(Clone, Debug)]
pub struct Gateway {
    pub services: ClientServices,
    pub lock: LockService,
    pub election: ElectionService,
}

/// A unary route: parse the body, call the service method, answer its response as JSON.
macro_rules! unary {
    ($service:ident :: $method:ident, $field:ident) => {
        post(
            |State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes| async move {
                match request(&headers, &body) {
                    Ok(request) => answer($service::$method(&gateway.$field, request).await),
                    Err(refusal) => refusal,
                }
            },
        )
    };
}

/// A route whose answer is a stream, from one request.
macro_rules! server_stream {
    ($service:ident :: $method:ident, $field:ident) => {
        post(
            |State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes| async move {
                match request(&headers, &body) {
                    Ok(request) => answer_stream(
                        $service::$method(&gateway.$field, request)
                            .await
                            .map(tonic::Response::into_inner),
                    ),
                    Err(refusal) => refusal,
                }
            },
        )
    };
}

/// The gateway's routes, etcd's paths.
pub fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/v3/kv/range", unary!(Kv::range, services))
        .route("/v3/kv/put", unary!(Kv::put, services))
        .route("/v3/kv/deleterange", unary!(Kv::delete_range, services))
        .route("/v3/kv/txn", unary!(Kv::txn, services))
        .route("/v3/kv/compaction", unary!(Kv::compact, services))
        .route("/v3/watch", post(watch))
        .route("/v3/lease/grant", unary!(Lease::lease_grant, services))
        .route("/v3/lease/revoke", unary!(Lease::lease_revoke, services))
        .route("/v3/kv/lease/revoke", unary!(Lease::lease_revoke, services))
        .route("/v3/lease/keepalive", post(keep_alive))
        .route(
            "/v3/lease/timetolive",
            unary!(Lease::lease_time_to_live, services),
        )
        .route(
            "/v3/kv/lease/timetolive",
            unary!(Lease::lease_time_to_live, services),
        )
        .route("/v3/lease/leases", unary!(Lease::lease_leases, services))
        .route("/v3/kv/lease/leases", unary!(Lease::lease_leases, services))
        .route(
            "/v3/cluster/member/add",
            unary!(Cluster::member_add, services),
        )
        .route(
            "/v3/cluster/member/remove",
            unary!(Cluster::member_remove, services),
        )
        .route(
            "/v3/cluster/member/update",
            unary!(Cluster::member_update, services),
        )
        .route(
            "/v3/cluster/member/list",
            unary!(Cluster::member_list, services),
        )
        .route(
            "/v3/cluster/member/promote",
            unary!(Cluster::member_promote, services),
        )
        .route(
            "/v3/maintenance/alarm",
            unary!(Maintenance::alarm, services),
        )
        .route(
            "/v3/maintenance/status",
            unary!(Maintenance::status, services),
        )
        .route(
            "/v3/maintenance/defragment",
            unary!(Maintenance::defragment, services),
        )
        .route("/v3/maintenance/hash", unary!(Maintenance::hash, services))
        .route(
            "/v3/maintenance/hashkv",
            unary!(Maintenance::hash_kv, services),
        )
        .route(
            "/v3/maintenance/snapshot",
            server_stream!(Maintenance::snapshot, services),
        )
        .route(
            "/v3/maintenance/transfer-leadership",
            unary!(Maintenance::move_leader, services),
        )
        .route("/v3/auth/enable", unary!(Auth::auth_enable, services))
        .route("/v3/auth/disable", unary!(Auth::auth_disable, services))
        .route("/v3/auth/status", unary!(Auth::auth_status, services))
        .route(
            "/v3/auth/authenticate",
            unary!(Auth::authenticate, services),
        )
        .route("/v3/auth/user/add", unary!(Auth::user_add, services))
        .route("/v3/auth/user/get", unary!(Auth::user_get, services))
        .route("/v3/auth/user/list", unary!(Auth::user_list, services))
        .route("/v3/auth/user/delete", unary!(Auth::user_delete, services))
        .route(
            "/v3/auth/user/changepw",
            unary!(Auth::user_change_password, services),
        )
        .route(
            "/v3/auth/user/grant",
            unary!(Auth::user_grant_role, services),
        )
        .route(
            "/v3/auth/user/revoke",
            unary!(Auth::user_revoke_role, services),
        )
        .route("/v3/auth/role/add", unary!(Auth::role_add, services))
        .route("/v3/auth/role/get", unary!(Auth::role_get, services))
        .route("/v3/auth/role/list", unary!(Auth::role_list, services))
        .route("/v3/auth/role/delete", unary!(Auth::role_delete, services))
        .route(
            "/v3/auth/role/grant",
            unary!(Auth::role_grant_permission, services),
        )
        .route(
            "/v3/auth/role/revoke",
            unary!(Auth::role_revoke_permission, services),
        )
        .route("/v3/lock/lock", unary!(Lock::lock, lock))
        .route("/v3/lock/unlock", unary!(Lock::unlock, lock))
        .route(
            "/v3/election/campaign",
            unary!(Election::campaign, election),
        )
        .route(
            "/v3/election/proclaim",
            unary!(Election::proclaim, election),
        )
        .route("/v3/election/leader", unary!(Election::leader, election))
        .route(
            "/v3/election/observe",
            server_stream!(Election::observe, election),
        )
        .route("/v3/election/resign", unary!(Election::resign, election))
        .with_state(Arc::new(gateway))
}

/// What a path that is neither a gRPC method nor a gateway route gets: gRPC's UNIMPLEMENTED
/// for a gRPC request, etcd's plain 404 for anything else.
pub async fn not_found(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let (parts, ()) = Status::unimplemented("").into_http::<()>().into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    (StatusCode::NOT_FOUND, "Not Found\n").into_response()
}

/// The request message of a unary call, with the caller's credentials as metadata; or the
/// answer refusing a body that is not the message in JSON.
#[allow(clippy::result_large_err)]
fn request<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<tonic::Request<T>, Response> {
    let message = parse(body).map_err(|status| error_response(&status))?;
    let mut request = tonic::Request::new(message);
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| tonic::metadata::MetadataValue::try_from(value.as_bytes()).ok())
    {
        request.metadata_mut().insert("authorization", token);
    }
    Ok(request)
}

/// A stream's credentials: the `Authorization` header's token, if any.
fn token_credentials(headers: &HeaderMap) -> crate::frontend::Credentials {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.strip_prefix("Bearer ").unwrap_or(value))
        .filter(|value| !value.is_empty())
        .map_or(crate::frontend::Credentials::None, |token| {
            crate::frontend::Credentials::Token(token.to_string())
        })
}

/// An empty body (or `null`) is the empty message, as in etcd's gateway.
fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    if body.trim_ascii().is_empty() || body.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| Status::invalid_argument(format!("the request body is not valid: {e}")))
}

/// Every JSON value in the body, one after another (a watch or keep-alive stream's requests).
fn parse_all<T: DeserializeOwned>(body: &[u8]) -> Result<Vec<T>, Status> {
    serde_json::Deserializer::from_slice(body)
        .into_iter::<T>()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| Status::invalid_argument(format!("the request body is not valid: {e}")))
}

fn answer<T: Serialize>(result: Result<tonic::Response<T>, Status>) -> Response {
    match result {
        Ok(response) => json_response(StatusCode::OK, &response.into_inner()),
        Err(status) => error_response(&status),
    }
}

fn json_response<T: Serialize>(code: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => error_response(&Status::internal(format!("cannot encode the answer: {e}"))),
    }
}

/// grpc-gateway's error body, with the HTTP status it gives the code.
fn error_response(status: &Status) -> Response {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        message: &'a str,
        code: i32,
    }
    let body = ErrorBody {
        error: status.message(),
        message: status.message(),
        code: status.code() as i32,
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    (
        http_status(status.code()),
        [(header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response()
}

/// The HTTP status grpc-gateway gives each gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One line of a streamed answer.
fn stream_line<T: Serialize>(item: Result<T, Status>) -> Bytes {
    #[derive(Serialize)]
    struct Line<T> {
        result: T,
    }
    #[derive(Serialize)]
    struct StreamError<'a> {
        grpc_code: i32,
        http_code: u16,
        message: &'a str,
        http_status: &'a str,
    }
    #[derive(Serialize)]
    struct ErrorLine<'a> {
        error: StreamError<'a>,
    }
    let encoded = match &item {
        Ok(result) => serde_json::to_vec(&Line { result }),
        Err(status) => {
            let http = http_status(status.code());
            serde_json::to_vec(&ErrorLine {
                error: StreamError {
                    grpc_code: status.code() as i32,
                    http_code: http.as_u16(),
                    message: status.message(),
                    http_status: http.canonical_reason().unwrap_or(""),
                },
            })
        }
    };
    let mut line = encoded.unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn answer_stream<T: Serialize + Send + 'static>(result: Result<BoxStream<T>, Status>) -> Response {
    match result {
        Ok(stream) => {
            let lines = stream.map(|item| Ok::<_, std::convert::Infallible>(stream_line(item)));
            (
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(lines),
            )
                .into_response()
        }
        Err(status) => error_response(&status),
    }
}

/// The body's requests, then nothing until the client goes: like a gRPC client that sent
/// them and keeps its side open.
fn requests_then_wait<T: Send + 'static>(
    requests: Vec<T>,
) -> std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(tokio_stream::iter(requests.into_iter().map(Ok)).chain(tokio_stream::pending()))
}

async fn watch(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    match parse_all::<WatchRequest>(&body) {
        Ok(requests) => answer_stream(
            gateway
                .services
                .open_watch(
                    requests_then_wait(requests),
                    false,
                    token_credentials(&headers),
                )
                .map(|responses| {
                    Box::pin(responses.map(|out| out.map(WatchOut::into_response)))
                        as BoxStream<WatchResponse>
                }),
        ),
        Err(status) => error_response(&status),
    }
}

async fn keep_alive(State(gateway): State<Arc<Gateway>>, body: Bytes) -> Response {
    match parse_all::<LeaseKeepAliveRequest>(&body) {
        Ok(requests) => answer_stream(
            gateway
                .services
                .open_keep_alive(requests_then_wait(requests)),
        ),
        Err(status) => error_response(&status),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest, WatchRequest};

    use super::*;

    #[test]
    fn bodies_parse_as_etcd_writes_them() {
        let range: RangeRequest =
            parse(br#"{"key": "Zm9v", "range_end": "Zm9w", "limit": "10"}"#).unwrap();
        assert_eq!(
            (&range.key[..], &range.range_end[..], range.limit),
            (&b"foo"[..], &b"fop"[..], 10)
        );
        let empty: PutRequest = parse(b" \n").unwrap();
        assert_eq!(empty, PutRequest::default());
        let bad = parse::<PutRequest>(br#"{"key": 5}"#).unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        let watches: Vec<WatchRequest> =
            parse_all(br#"{"create_request": {"key": "YQ=="}} {"progress_request": {}}"#).unwrap();
        assert_eq!(watches.len(), 2);
    }

    #[test]
    fn stream_lines_wrap_results_and_errors() {
        let ok = stream_line(Ok(PutRequest {
            key: "a".into(),
            ..Default::default()
        }));
        assert_eq!(&ok[..], b"{\"result\":{\"key\":\"YQ==\"}}\n");
        let error = stream_line::<PutRequest>(Err(Status::unavailable("etcdserver: no leader")));
        assert_eq!(
            &error[..],
            &b"{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"etcdserver: no leader\",\"http_status\":\"Service Unavailable\"}}\n"[..]
        );
    }
}
