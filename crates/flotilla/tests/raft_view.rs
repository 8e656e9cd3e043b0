//! The members' Raft view (`--experimental-raft-view`): `/debug/raft` and its server-sent
//! events on the metrics listener, as `flotilla dev`'s cluster view reads them. Every wait is
//! for an event or a state, bounded; nothing is judged by time.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const LIMIT: Duration = Duration::from_secs(60);

/// A member's view now.
async fn view(cluster: &TestCluster, i: usize) -> Option<Value> {
    let port = cluster.members[i].metrics_port();
    let body = http_get(&format!("http://127.0.0.1:{port}/debug/raft")).await?;
    serde_json::from_str(&body).ok()
}

/// A member's id as the view writes it.
async fn member_hex(cluster: &TestCluster, i: usize) -> String {
    let id = cluster.status(i).await.unwrap().header.unwrap().member_id;
    format!("{id:x}")
}

/// The `view` events of one member's `/debug/raft/events`, read as they come.
struct ViewEvents {
    reader: BufReader<tokio::net::TcpStream>,
}

impl ViewEvents {
    async fn open(metrics_port: u16) -> ViewEvents {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .unwrap();
        let request = "GET /debug/raft/events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        ViewEvents { reader }
    }

    /// The next view, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Value> {
        let mut event = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                assert_eq!(event, "view", "every event is a view");
                return Some(serde_json::from_str(data).expect("a view is JSON"));
            }
        }
    }
}

fn text(value: &Value, field: &str) -> String {
    value[field].as_str().unwrap_or_default().to_string()
}

fn number(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {value}"))
}

/// Three members show one leader in one term, each its own election timer and the log's tail;
/// a write shows as a committed entry of the leader's term and as appends to each follower;
/// after the leader is killed, a follower's event stream shows a new leader in a higher term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_show_their_raft_state_and_a_new_leader_after_a_kill() {
    let mut cluster = TestCluster::start(3, &["--experimental-raft-view"]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let leader_id = member_hex(&cluster, leader).await;
        let mut kv = cluster.kv(leader).await;
        put(&mut kv, "seen", "v").await.unwrap();
        let written = cluster.status(leader).await.unwrap().raft_index;

        // Every member agrees on the leader and term, and has applied the write.
        let views = eventually(
            "every member to show the leader and the write",
            LIMIT,
            || async {
                let mut views = Vec::new();
                for i in 0..3 {
                    let view = view(&cluster, i).await?;
                    let agrees =
                        text(&view, "leader") == leader_id && number(&view, "applied") >= written;
                    agrees.then_some(())?;
                    views.push(view);
                }
                Some(views)
            },
        )
        .await;
        let term = number(&views[leader], "term");
        for (i, view) in views.iter().enumerate() {
            assert_eq!(number(view, "term"), term, "one term: {view}");
            let role = if i == leader { "leader" } else { "follower" };
            assert_eq!(text(view, "role"), role, "{view}");
            assert_eq!(view["voters"].as_array().unwrap().len(), 3, "{view}");
            assert!(view["learners"].as_array().unwrap().is_empty());
            assert!(number(view, "election_timeout_ticks") > 0);
            assert!(number(view, "tick_ms") > 0);
            let tail = view["log_tail"].as_array().unwrap();
            let last = tail.last().expect("the log has entries");
            assert_eq!(number(last, "index"), number(view, "last_index"));
            assert_eq!(
                number(last, "term"),
                term,
                "the newest entry is of this term"
            );
            assert!(number(view, "commit") >= written);
        }
        assert_eq!(
            text(&views[leader], "vote"),
            leader_id,
            "a leader voted for itself"
        );
        let sent = views[leader]["messages_sent"].as_array().unwrap();
        for follower in (0..3).filter(|&i| i != leader) {
            let to = member_hex(&cluster, follower).await;
            assert!(
                sent.iter().any(|m| text(m, "to") == to
                    && text(m, "kind") == "Append"
                    && number(m, "count") > 0),
                "the leader's appends to {to}: {sent:?}"
            );
        }

        // A follower's stream: the current view first, then the next leader's.
        let follower = (leader + 1) % 3;
        let mut events = ViewEvents::open(cluster.members[follower].metrics_port()).await;
        let first = events.next().await.expect("the current view");
        assert_eq!(text(&first, "leader"), leader_id);
        cluster.kill9(leader);
        let next = loop {
            let view = events.next().await.expect("views while the member runs");
            let leader_now = text(&view, "leader");
            if !leader_now.is_empty() && leader_now != leader_id {
                break view;
            }
        };
        assert!(
            number(&next, "term") > term,
            "a new leader is of a higher term: {next}"
        );
        let survivors = [follower, (leader + 2) % 3];
        let mut ids = Vec::new();
        for i in survivors {
            ids.push(member_hex(&cluster, i).await);
        }
        assert!(ids.contains(&text(&next, "leader")), "{next}");
    })
    .await;
}

/// A bodiless POST to a member's metrics listener: the status line and the body.
async fn post(port: u16, path: &str) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!("POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// With `--experimental-dev-faults` a partition is made in the members' transport: a leader
/// cut off from both followers (each side drops the other's messages) is replaced by a leader
/// of a higher term among them and steps down itself (check-quorum); healed, all three follow
/// the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_in_the_transport_is_replaced_and_follows_once_healed() {
    let cluster = TestCluster::start(
        3,
        &["--experimental-raft-view", "--experimental-dev-faults"],
    );
    bounded(LIMIT, async {
        let old = cluster.wait_for_leader(&[0, 1, 2]).await;
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(member_hex(&cluster, i).await);
        }
        let old_term = number(&view(&cluster, old).await.unwrap(), "term");
        let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        let port = |i: usize| cluster.members[i].metrics_port();
        let cut_others = format!(
            "/debug/faults/partition?peers={},{}",
            ids[others[0]], ids[others[1]]
        );
        assert_eq!(post(port(old), &cut_others).await.0, "HTTP/1.0 200 OK");
        for &i in &others {
            let cut_old = format!("/debug/faults/partition?peers={}", ids[old]);
            assert_eq!(post(port(i), &cut_old).await.0, "HTTP/1.0 200 OK");
        }

        let new_leader = eventually("a new leader among the others", LIMIT, || async {
            for &i in &others {
                let view = view(&cluster, i).await?;
                if text(&view, "role") == "leader" && number(&view, "term") > old_term {
                    return Some(text(&view, "member"));
                }
            }
            None
        })
        .await;
        eventually("the cut-off leader to step down", LIMIT, || async {
            (text(&view(&cluster, old).await?, "role") != "leader").then_some(())
        })
        .await;

        for i in 0..3 {
            assert_eq!(
                post(port(i), "/debug/faults/heal").await.0,
                "HTTP/1.0 200 OK"
            );
        }
        eventually("all three to follow the new leader", LIMIT, || async {
            for i in 0..3 {
                (text(&view(&cluster, i).await?, "leader") == new_leader).then_some(())?;
            }
            Some(())
        })
        .await;
        let (status, body) = post(port(old), "/debug/faults/partition?peers=xyz").await;
        assert!(
            status.contains("400") && body.contains("xyz"),
            "{status} {body}"
        );
    })
    .await;
}

/// Without the flags nothing is published or injected, and the endpoints say how to turn
/// them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_view_and_dev_faults_are_off_unless_asked_for() {
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let port = cluster.members[0].metrics_port();
        for path in ["debug/raft", "debug/raft/events"] {
            let body = http_get(&format!("http://127.0.0.1:{port}/{path}"))
                .await
                .unwrap();
            assert!(body.contains("--experimental-raft-view"), "{path}: {body}");
        }
        for path in ["/debug/faults/partition?peers=1", "/debug/faults/heal"] {
            let (status, body) = post(port, path).await;
            assert!(
                status.contains("404") && body.contains("--experimental-dev-faults"),
                "{path}: {status} {body}"
            );
        }
    })
    .await;
}
