//! The JSON gateway on real `flotilla serve` processes, spoken as curl speaks it: HTTP/1.1
//! POSTs to the client port (the same port as gRPC), JSON bodies in etcd's shape (base64
//! bytes, 64-bit integers as strings, etcd's field names), etcd's error bodies and HTTP
//! statuses, and a watch streamed one JSON object per line. Each test is bounded in time and
//! kills its processes by PID at the end.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const LIMIT: Duration = Duration::from_secs(60);

fn b64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn request_text(port: u16, path: &str, body: &str) -> String {
    request_text_as(port, path, body, None)
}

/// With a token, in the `Authorization` header as etcd's gateway takes it.
fn request_text_as(port: u16, path: &str, body: &str, token: Option<&str>) -> String {
    let authorization = token.map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         {authorization}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One POST; the HTTP status and the body.
async fn post(port: u16, path: &str, body: Value) -> (u16, String) {
    post_as(port, path, body, None).await
}

async fn post_as(port: u16, path: &str, body: Value, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let body = body.to_string();
    stream
        .write_all(request_text_as(port, path, &body, token).as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

async fn post_json(port: u16, path: &str, body: Value) -> Value {
    let (status, text) = post(port, path, body).await;
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_lease_cluster_and_errors_answer_as_etcds_gateway_does() {
    let cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = cluster.members[(leader + 1) % 3].client_port();

        // A put through a follower, read back through JSON and through gRPC.
        let put = post_json(follower, "/v3/kv/put", json!({"key": b64("foo"), "value": b64("bar")})).await;
        let revision = put["header"]["revision"].as_str().unwrap().to_string();
        let range = post_json(follower, "/v3/kv/range", json!({"key": b64("foo")})).await;
        assert_eq!(range["count"], "1");
        assert_eq!(range["kvs"][0]["value"], b64("bar"));
        assert_eq!(range["kvs"][0]["create_revision"], revision);
        assert_eq!(range["kvs"][0]["version"], "1");
        assert!(range["kvs"][0].get("lease").is_none(), "zero values are left out");
        let mut kv = cluster.kv(leader).await;
        assert_eq!(get(&mut kv, "foo", false).await.unwrap().as_deref(), Some("bar"));

        // A txn with an enum by name, and its nested response.
        let txn = json!({
            "compare": [{"key": b64("foo"), "target": "VALUE", "result": "EQUAL", "value": b64("bar")}],
            "success": [{"request_put": {"key": b64("foo"), "value": b64("baz"), "prev_kv": true}}],
        });
        let txn = post_json(follower, "/v3/kv/txn", txn).await;
        assert_eq!(txn["succeeded"], true);
        assert_eq!(txn["responses"][0]["response_put"]["prev_kv"]["value"], b64("bar"));

        // Leases and members use etcd's field names.
        let lease = post_json(follower, "/v3/lease/grant", json!({"TTL": 60})).await;
        assert_eq!(lease["TTL"], "60");
        let id = lease["ID"].as_str().unwrap();
        let ttl = post_json(follower, "/v3/lease/timetolive", json!({"ID": id})).await;
        assert_eq!(ttl["grantedTTL"], "60");
        let members = post_json(follower, "/v3/cluster/member/list", json!({})).await;
        let members = members["members"].as_array().unwrap();
        assert_eq!(members.len(), 3);
        assert!(members.iter().all(|m| m["peerURLs"].is_array() && m["ID"].is_string()));
        let status = post_json(follower, "/v3/maintenance/status", Value::Null).await;
        assert!(status["raftIndex"].is_string() && status["leader"].is_string());

        // Errors: etcd's body, code and HTTP status.
        let (status, text) = post(follower, "/v3/kv/compaction", json!({"revision": "1000"})).await;
        assert_eq!(status, 400);
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["code"], 11);
        assert_eq!(error["error"], "etcdserver: mvcc: required revision is a future revision");
        assert_eq!(error["message"], error["error"]);
        let (status, text) = post(follower, "/v3/kv/range", json!({"key": 5})).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("\"code\":3") && text.contains("base64"), "{text}");
        let (status, _) = post(follower, "/v3/kv/put", json!({"value": b64("x")})).await;
        assert_eq!(status, 400, "an empty key is etcd's InvalidArgument");
        let (status, text) = post(follower, "/v3/nonexistent", json!({})).await;
        assert_eq!((status, text.as_str()), (404, "Not Found\n"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_streams_one_json_object_per_line_until_the_client_goes() {
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let port = cluster.members[0].client_port();
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let body =
            json!({"create_request": {"key": b64("w/"), "range_end": b64("w0")}}).to_string();
        stream
            .write_all(request_text(port, "/v3/watch", &body).as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(stream).lines();
        // Skip the HTTP head and the chunk sizes: every JSON line starts with '{'.
        let mut next_json = async || -> Value {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the stream stays open");
                if line.starts_with('{') {
                    return serde_json::from_str(&line).unwrap();
                }
            }
        };
        let created = next_json().await;
        assert_eq!(created["result"]["created"], true);
        let mut kv = cluster.kv(0).await;
        put(&mut kv, "w/1", "one").await.unwrap();
        put(&mut kv, "w/2", "two").await.unwrap();
        let mut values = Vec::new();
        while values.len() < 2 {
            let line = next_json().await;
            for event in line["result"]["events"].as_array().unwrap() {
                values.push(event["kv"]["value"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(values, vec![b64("one"), b64("two")]);
    })
    .await;
}

/// The auth endpoints of etcd's gateway, then KV requests with the token in the
/// `Authorization` header (what `curl -H "Authorization: $TOKEN"` sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_through_the_gateway_with_the_token_in_the_authorization_header() {
    let cluster = TestCluster::start(1, &["--bcrypt-cost", "4"]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let port = cluster.members[0].client_port();
        post_json(
            port,
            "/v3/auth/user/add",
            json!({"name": "root", "password": "pw"}),
        )
        .await;
        post_json(
            port,
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        )
        .await;
        post_json(
            port,
            "/v3/auth/user/add",
            json!({"name": "bob", "password": "bobpw"}),
        )
        .await;
        post_json(port, "/v3/auth/enable", json!({})).await;
        let status = post_json(port, "/v3/auth/status", json!({})).await;
        assert_eq!(status["enabled"], true, "{status}");

        let (code, text) = post(
            port,
            "/v3/kv/put",
            json!({"key": b64("k"), "value": b64("v")}),
        )
        .await;
        assert_eq!(code, 400, "{text}");
        assert!(text.contains("etcdserver: user name is empty"), "{text}");
        let login = post_json(
            port,
            "/v3/auth/authenticate",
            json!({"name": "root", "password": "pw"}),
        )
        .await;
        let root = login["token"].as_str().unwrap().to_string();
        let (code, text) = post_as(
            port,
            "/v3/kv/put",
            json!({"key": b64("k"), "value": b64("v")}),
            Some(&root),
        )
        .await;
        assert_eq!(code, 200, "{text}");
        let login = post_json(
            port,
            "/v3/auth/authenticate",
            json!({"name": "bob", "password": "bobpw"}),
        )
        .await;
        let bob = login["token"].as_str().unwrap().to_string();
        let (code, text) =
            post_as(port, "/v3/kv/range", json!({"key": b64("k")}), Some(&bob)).await;
        assert_eq!(code, 403, "bob has no role: {text}");
        assert!(text.contains("etcdserver: permission denied"), "{text}");
        let (code, text) = post_as(
            port,
            "/v3/kv/range",
            json!({"key": b64("k")}),
            Some("not-a-token"),
        )
        .await;
        assert_eq!(code, 401, "{text}");
        assert!(text.contains("etcdserver: invalid auth token"), "{text}");
    })
    .await;
}
