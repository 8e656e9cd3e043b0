//! Watches and leases on real `flotilla serve` processes (issue 8): watchers on every member
//! see the same history, resume on another member after kill -9 of the leader without gap or
//! duplicate, the Watch stream protocol behaves as etcd's, a kept-alive lease survives a
//! leader failover and an abandoned one expires on time with its keys deleted in one revision.
//! Each test is bounded in time and kills its processes by PID at the end.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::strace;
use common::*;
use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::watch_request::RequestUnion;
use flotilla_proto::etcdserverpb::{
    CompactionRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use flotilla_proto::mvccpb::event::EventType;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

const LIMIT: Duration = Duration::from_secs(120);
const ELECTION: Duration = Duration::from_millis(ELECTION_MS);

/// One event as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    revision: i64,
    delete: bool,
    key: String,
    value: String,
}

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
}

fn prefix_end(prefix: &str) -> bytes::Bytes {
    flotilla_proto::prefix_range_end(prefix.as_bytes())
}

/// An open Watch stream: requests go in through `requests`, responses come out of `responses`.
struct WatchStream {
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl WatchStream {
    async fn open(url: &str) -> Result<WatchStream, tonic::Status> {
        let (requests, outbound) = mpsc::channel(16);
        let mut client = WatchClient::new(channel(url));
        let responses = client
            .watch(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(WatchStream {
            requests,
            responses,
        })
    }

    async fn send(&self, request: RequestUnion) {
        self.requests
            .send(WatchRequest {
                request_union: Some(request),
            })
            .await
            .expect("the stream's request task is alive");
    }

    async fn create(&self, create: WatchCreateRequest) {
        self.send(RequestUnion::CreateRequest(create)).await;
    }

    /// The next response of a stream that must stay open and keep its watchers.
    async fn next_events(&mut self, limit: Duration) -> WatchResponse {
        let response = self
            .next(limit)
            .await
            .unwrap()
            .expect("the stream stays open");
        assert!(!response.canceled, "{response:?}");
        response
    }

    /// The next response, failing the test if none comes within `limit`.
    async fn next(&mut self, limit: Duration) -> Result<Option<WatchResponse>, tonic::Status> {
        match tokio::time::timeout(limit, self.responses.message()).await {
            Ok(result) => result,
            Err(_) => panic!("no watch response within {limit:?}"),
        }
    }
}

fn prefix_watch(prefix: &str, start_revision: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: prefix.to_string().into(),
        range_end: prefix_end(prefix),
        start_revision,
        ..Default::default()
    }
}

fn seen_of(response: &WatchResponse) -> Vec<Seen> {
    response
        .events
        .iter()
        .map(|event| {
            let kv = event.kv.as_ref().expect("an event carries its key");
            Seen {
                revision: kv.mod_revision,
                delete: event.r#type == EventType::Delete as i32,
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                value: String::from_utf8_lossy(&kv.value).into_owned(),
            }
        })
        .collect()
}

/// Watches `prefix` from revision 1 until it sees a PUT of `last_key`, starting on member
/// `urls[first]` and moving to the next member whenever a stream breaks, resuming from the
/// last revision seen + 1. Checks order on the way; returns what it saw and the members it
/// used, in order.
async fn follow(urls: Vec<String>, first: usize, prefix: String, last_key: String) -> Followed {
    let mut seen: Vec<Seen> = Vec::new();
    let mut members = Vec::new();
    let mut member = first;
    let mut last_revision = 0;
    loop {
        members.push(member);
        if let Ok(mut stream) = WatchStream::open(&urls[member]).await {
            stream
                .create(prefix_watch(&prefix, last_revision + 1))
                .await;
            loop {
                let Ok(Some(response)) = stream.next(LIMIT).await else {
                    break; // the member went away: resume on another
                };
                assert_eq!(response.compact_revision, 0, "nothing is compacted here");
                if response.canceled {
                    break;
                }
                let events = seen_of(&response);
                // Exactly once and in order: a response starts after the last revision seen (one
                // revision's events come in one response) and is ordered within.
                if let Some(first_event) = events.first() {
                    assert!(
                        first_event.revision > last_revision,
                        "a response repeats revision {last_revision} (member {member})"
                    );
                    assert!(
                        events.windows(2).all(|w| w[0].revision <= w[1].revision),
                        "events out of order in one response: {events:?}"
                    );
                    last_revision = events.last().unwrap().revision;
                }
                let done = events.iter().any(|e| e.key == last_key && !e.delete);
                seen.extend(events);
                if done {
                    return Followed { seen, members };
                }
            }
        }
        member = (member + 1) % urls.len();
        // The next member may itself be the dead one: do not spin on it.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[derive(Debug)]
struct Followed {
    seen: Vec<Seen>,
    members: Vec<usize>,
}

/// A put through member `i`, retried on the next members until one answers; its revision.
async fn put_anywhere(urls: &[String], first: usize, key: &str, value: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut member = first;
    loop {
        let mut kv = flotilla_proto::etcdserverpb::kv_client::KvClient::new(channel(&urls[member]));
        match put(&mut kv, key, value).await {
            Ok(revision) => return revision,
            Err(error) => {
                assert!(Instant::now() < deadline, "put {key}: {error}");
                member = (member + 1) % urls.len();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

/// A watcher on each member while a writer writes; kill -9 of the leader half-way. Every
/// watcher (the one on the dead leader resuming on another member from its last revision + 1)
/// sees exactly the store's history of the prefix, in order, and every acknowledged write is
/// in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_every_member_see_one_history_across_a_leader_kill() {
    const WRITES: usize = 300;
    let mut cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let urls: Vec<String> = cluster.members.iter().map(|m| m.client_url()).collect();
        let last_key = "w/zz-end".to_string();
        let watchers: Vec<_> = (0..3)
            .map(|i| tokio::spawn(follow(urls.clone(), i, "w/".to_string(), last_key.clone())))
            .collect();
        let writer = (leader + 1) % 3;
        let mut acknowledged = Vec::new();
        for i in 0..WRITES {
            if i == WRITES / 2 {
                cluster.kill9(leader);
            }
            let key = format!("w/{i:04}");
            let revision = put_anywhere(&urls, writer, &key, &format!("v{i}")).await;
            acknowledged.push((revision, key));
        }
        let end = put_anywhere(&urls, writer, &last_key, "end").await;
        let mut followed = Vec::new();
        for watcher in watchers {
            followed.push(watcher.await.expect("a watcher task panicked"));
        }
        // The store's history of the prefix, read afresh from a survivor.
        let survivor = writer;
        let history = follow(urls.clone(), survivor, "w/".into(), last_key.clone())
            .await
            .seen;
        assert_eq!(history.last().map(|e| e.revision), Some(end));
        for (revision, key) in &acknowledged {
            assert!(
                history
                    .iter()
                    .any(|e| e.revision == *revision && e.key == *key && !e.delete),
                "acknowledged put of {key} at {revision} is in the history"
            );
        }
        for (i, watcher) in followed.iter().enumerate() {
            assert_eq!(
                watcher.seen.len(),
                history.len(),
                "watcher {i} (members {:?}) saw every event once",
                watcher.members
            );
            assert_eq!(watcher.seen, history, "watcher {i} saw the same history");
        }
        assert!(
            followed[leader].members.len() > 1,
            "the watcher on the killed leader resumed on another member"
        );
        println!(
            "watch: {} events seen identically by 3 watchers; the watcher on the killed leader \
             moved through members {:?}",
            history.len(),
            followed[leader].members
        );
    })
    .await;
}

/// The stream protocol as etcd clients rely on it: ids from 0 in creation order, `created`
/// first, filters, a progress request answered for the whole stream, cancel, a watch from a
/// compacted revision created and then cancelled with the compact revision, periodic progress
/// notifications for a quiet watcher that asked for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_stream_speaks_etcds_protocol() {
    const PROGRESS_INTERVAL: Duration = Duration::from_millis(300);
    let cluster = TestCluster::start(
        1,
        &["--experimental-watch-progress-notify-interval", "300ms"],
    );
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let url = cluster.members[0].client_url();
        let mut kv = cluster.kv(0).await;
        let first = put(&mut kv, "p/a", "1").await.unwrap();
        put(&mut kv, "p/a", "2").await.unwrap();
        let mut stream = WatchStream::open(&url).await.unwrap();
        let step = Duration::from_secs(10);
        // Two watchers on one stream: ids 0 and 1, each `created` before any event.
        stream.create(prefix_watch("p/", first)).await;
        let created = stream.next(step).await.unwrap().unwrap();
        assert!(created.created && !created.canceled);
        assert_eq!(created.watch_id, 0);
        let history = stream.next(step).await.unwrap().unwrap();
        assert_eq!(history.watch_id, 0);
        assert_eq!(
            seen_of(&history)
                .iter()
                .map(|e| e.value.as_str())
                .collect::<Vec<_>>(),
            vec!["1", "2"],
            "history replayed"
        );
        stream
            .create(WatchCreateRequest {
                key: "p/a".into(),
                filters: vec![0], // NOPUT
                prev_kv: true,
                ..Default::default()
            })
            .await;
        let created = stream.next(step).await.unwrap().unwrap();
        assert!(created.created);
        assert_eq!(created.watch_id, 1);
        let deleted = {
            let mut kv = kv.clone();
            kv.delete_range(flotilla_proto::etcdserverpb::DeleteRangeRequest {
                key: "p/a".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision
        };
        let mut by_watcher = std::collections::BTreeMap::new();
        for _ in 0..2 {
            let response = stream.next(step).await.unwrap().unwrap();
            by_watcher.insert(response.watch_id, response);
        }
        let delete_only = &by_watcher[&1];
        assert_eq!(delete_only.header.as_ref().unwrap().revision, deleted);
        assert_eq!(delete_only.events.len(), 1);
        assert_eq!(delete_only.events[0].r#type, EventType::Delete as i32);
        assert_eq!(
            delete_only.events[0].prev_kv.as_ref().unwrap().value,
            "2",
            "prev_kv"
        );
        assert_eq!(by_watcher[&0].events.len(), 1);
        // A progress request: one answer for the whole stream.
        stream
            .send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
            .await;
        let progress = stream.next(step).await.unwrap().unwrap();
        assert_eq!(progress.watch_id, -1);
        assert!(progress.events.is_empty() && !progress.created && !progress.canceled);
        assert_eq!(progress.header.unwrap().revision, deleted);
        // Cancel.
        stream
            .send(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: 1,
            }))
            .await;
        let canceled = stream.next(step).await.unwrap().unwrap();
        assert!(canceled.canceled);
        assert_eq!(canceled.watch_id, 1);
        // A duplicate id is refused.
        stream
            .create(WatchCreateRequest {
                key: "x".into(),
                watch_id: 0,
                ..Default::default()
            })
            .await;
        assert_eq!(stream.next(step).await.unwrap().unwrap().watch_id, 2);
        stream
            .create(WatchCreateRequest {
                key: "x".into(),
                watch_id: 2,
                ..Default::default()
            })
            .await;
        let refused = stream.next(step).await.unwrap().unwrap();
        assert!(refused.created && refused.canceled);
        assert_eq!(refused.watch_id, -1);
        // From a compacted revision: created, then cancelled with the compact revision.
        let mut kv_compact = kv.clone();
        kv_compact
            .compact(CompactionRequest {
                revision: deleted,
                physical: false,
            })
            .await
            .unwrap();
        stream.create(prefix_watch("p/", first)).await;
        let created = stream.next(step).await.unwrap().unwrap();
        assert!(created.created && !created.canceled);
        let cancelled = stream.next(step).await.unwrap().unwrap();
        assert_eq!(cancelled.watch_id, created.watch_id);
        assert!(cancelled.canceled);
        assert_eq!(cancelled.compact_revision, deleted);
        // Progress notifications: a quiet watcher that asked gets empty responses carrying the
        // store's revision, about once an interval.
        let mut quiet = WatchStream::open(&url).await.unwrap();
        quiet
            .create(WatchCreateRequest {
                key: "quiet".into(),
                progress_notify: true,
                ..Default::default()
            })
            .await;
        let created = quiet.next(step).await.unwrap().unwrap();
        assert!(created.created);
        let revision = put(&mut kv, "noise", "x").await.unwrap();
        let started = Instant::now();
        for _ in 0..2 {
            let notification = quiet.next(step).await.unwrap().unwrap();
            assert_eq!(notification.watch_id, created.watch_id);
            assert!(notification.events.is_empty() && !notification.canceled);
            assert_eq!(notification.header.unwrap().revision, revision);
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= PROGRESS_INTERVAL && elapsed < 4 * PROGRESS_INTERVAL,
            "two notifications in {elapsed:?}"
        );
    })
    .await;
}

/// Grants a lease through member `i`; its id and TTL.
async fn grant(url: &str, ttl: i64) -> (i64, i64) {
    let mut lease = LeaseClient::new(channel(url));
    let granted = lease
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(granted.error.is_empty(), "{}", granted.error);
    (granted.id, granted.ttl)
}

async fn put_with_lease(url: &str, key: &str, lease: i64) -> i64 {
    let mut kv = flotilla_proto::etcdserverpb::kv_client::KvClient::new(channel(url));
    kv.put(PutRequest {
        key: key.to_string().into(),
        value: "v".into(),
        lease,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .header
    .unwrap()
    .revision
}

async fn key_count(url: &str, prefix: &str) -> Option<i64> {
    let mut kv = flotilla_proto::etcdserverpb::kv_client::KvClient::new(channel(url));
    let response = kv
        .range(RangeRequest {
            key: prefix.to_string().into(),
            range_end: prefix_end(prefix),
            count_only: true,
            ..Default::default()
        })
        .await
        .ok()?;
    Some(response.into_inner().count)
}

/// Waits for the DELETE events of `count` keys under `prefix` (watched from `from`); checks
/// they came in one response, at one revision; when they arrived.
async fn await_deletes(url: &str, prefix: &str, from: i64, count: usize) -> (Instant, i64) {
    let mut stream = WatchStream::open(url).await.unwrap();
    stream.create(prefix_watch(prefix, from)).await;
    loop {
        let response = stream
            .next(LIMIT)
            .await
            .unwrap()
            .expect("the stream is open");
        // A response replaying history may hold the puts before the deletes.
        let events: Vec<Seen> = seen_of(&response)
            .into_iter()
            .filter(|e| e.delete)
            .collect();
        if !events.is_empty() {
            let at = Instant::now();
            assert_eq!(events.len(), count, "the keys go together: {events:?}");
            let revision = events[0].revision;
            assert!(events.iter().all(|e| e.revision == revision), "{events:?}");
            return (at, revision);
        }
    }
}

/// A lease left alone expires within its TTL plus one election timeout, never before its TTL,
/// and its keys disappear together in one revision. Then the lease is gone everywhere:
/// TimeToLive -1, not listed, revoking it is NotFound. A client revoke also deletes in one
/// revision, and a put with an unknown lease is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_lease_expires_on_time_and_its_keys_go_together() {
    const TTL_SECONDS: i64 = 2;
    let cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let url = cluster.members[follower].client_url();
        let asked = Instant::now();
        let (id, ttl) = grant(&url, TTL_SECONDS).await;
        let granted = Instant::now();
        assert_eq!(ttl, TTL_SECONDS);
        let mut first = 0;
        for key in ["exp/a", "exp/b", "exp/c"] {
            let revision = put_with_lease(&url, key, id).await;
            first = if first == 0 { revision } else { first };
        }
        let mut lease = LeaseClient::new(channel(&url));
        let alive = lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(alive.granted_ttl, TTL_SECONDS);
        assert!(alive.ttl > 0 && alive.ttl <= TTL_SECONDS, "{alive:?}");
        assert_eq!(alive.keys.len(), 3);
        let (deleted_at, _) = await_deletes(&url, "exp/", first, 3).await;
        let ttl = Duration::from_secs(TTL_SECONDS as u64);
        let earliest = deleted_at.duration_since(asked);
        let latest = deleted_at.duration_since(granted);
        println!("lease: TTL {ttl:?}, keys deleted {latest:?} after the grant was answered");
        assert!(earliest >= ttl, "expired early: {earliest:?}");
        assert!(latest <= ttl + ELECTION, "expired late: {latest:?}");
        assert_eq!(key_count(&url, "exp/").await, Some(0));
        let gone = lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(gone.ttl, -1);
        let listed = lease
            .lease_leases(LeaseLeasesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(listed.leases.iter().all(|l| l.id != id));
        let error = lease
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::NotFound);
        assert_eq!(error.message(), "etcdserver: requested lease not found");
        // A client revoke.
        let (other, _) = grant(&url, 60).await;
        let first = put_with_lease(&url, "rev/a", other).await;
        put_with_lease(&url, "rev/b", other).await;
        let deletes = tokio::spawn({
            let url = url.clone();
            async move { await_deletes(&url, "rev/", first, 2).await }
        });
        lease
            .lease_revoke(LeaseRevokeRequest { id: other })
            .await
            .unwrap();
        deletes.await.unwrap();
        assert_eq!(key_count(&url, "rev/").await, Some(0));
        let mut kv = cluster.kv(follower).await;
        let error = kv
            .put(PutRequest {
                key: "k".into(),
                value: "v".into(),
                lease: other,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(error.message(), "etcdserver: requested lease not found");
    })
    .await;
}

/// Keep-alives sent on a stream to a follower; the leader is killed; the keep-alives go on
/// (reopening the stream if it breaks) and the lease never expires, across the failover and
/// for several TTLs after. Once the keep-alives stop, the new leader expires it within its TTL
/// plus one election timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_lease_survives_a_leader_failover() {
    const TTL_SECONDS: i64 = 2;
    let mut cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let url = cluster.members[follower].client_url();
        let (id, _) = grant(&url, TTL_SECONDS).await;
        let first = put_with_lease(&url, "held/a", id).await;
        put_with_lease(&url, "held/b", id).await;
        let stop = Arc::new(AtomicBool::new(false));
        let keeper = tokio::spawn(keep_alive(url.clone(), id, stop.clone()));
        // A few renewals through the follower, then the leader dies.
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.kill9(leader);
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let new_leader = cluster.wait_for_leader(&others).await;
        // Three TTLs under the new leader: the lease must hold all along.
        let held_until = Instant::now() + 3 * Duration::from_secs(TTL_SECONDS as u64);
        let mut reads = 0;
        while Instant::now() < held_until {
            // A read may fail while the cluster settles; one that answers must see the keys.
            if let Some(count) = key_count(&url, "held/").await {
                assert_eq!(count, 2, "the kept-alive lease expired");
                reads += 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(reads > 5, "reads answered under the new leader: {reads}");
        stop.store(true, Ordering::SeqCst);
        let renewals = keeper.await.unwrap();
        let last_renewal = *renewals.last().expect("renewals were answered");
        println!(
            "lease: {} renewals answered through member {follower}; leader {leader} killed, \
             {new_leader} took over",
            renewals.len()
        );
        let (deleted_at, _) = await_deletes(&url, "held/", first, 2).await;
        let after = deleted_at.duration_since(last_renewal);
        println!("lease: expired {after:?} after the last renewal was answered");
        assert!(
            after <= Duration::from_secs(TTL_SECONDS as u64) + ELECTION,
            "expired late: {after:?}"
        );
    })
    .await;
}

/// etcd issue #15247: a leader stuck in `fdatasync` lost every lease. Here strace holds every
/// fsync of the leader's process, as a hung disk would, for more than two lease TTLs, while the
/// test writes and keeps leases alive through the leader: the writes are acknowledged with the
/// leader's WAL fsync still held (the followers' acknowledgements commit them, and the leader
/// applies committed entries without waiting for its own disk), the leader stays leader, and
/// no lease expires. Once the disk is back and no one renews them, the leases expire.
///
/// No assertion depends on timing: the held fsync is observed in /proc (the WAL thread stopped
/// in `fdatasync` by its tracer) before the writes and again after them; the only timed part
/// is how long the leases are kept alive through the stall (more than two TTLs). With apply waiting for
/// the local disk, the writes would wait for the release, which comes only after them: the
/// test would fail at its time bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs strace and ptrace (apt-get install strace); .ci/run runs it"]
async fn a_leaders_stalled_disk_delays_no_write_and_expires_no_lease() {
    const TTL_SECONDS: i64 = 2;
    const LEASES: usize = 10;
    const WRITES: usize = 50;
    let cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let url = cluster.members[leader].client_url();
        let mut ids = Vec::new();
        for i in 0..LEASES {
            let (id, _) = grant(&url, TTL_SECONDS).await;
            put_with_lease(&url, &format!("stalled/{i}"), id).await;
            ids.push(id);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let keepers: Vec<_> = ids
            .iter()
            .map(|&id| tokio::spawn(keep_alive(url.clone(), id, stop.clone())))
            .collect();

        let trace = cluster.dir.path().join("strace.out");
        let disk = strace::HeldDisk::hold(cluster.pid(leader), &trace, LIMIT).await;
        // A write makes the WAL fsync; the fsync is held.
        let mut kv = cluster.kv(leader).await;
        put(&mut kv, "stalled/w/first", "v").await.unwrap();
        disk.wait_holding(LIMIT).await;
        for i in 0..WRITES {
            put(&mut kv, &format!("stalled/w/{i}"), "v")
                .await
                .unwrap_or_else(|e| panic!("write {i} during the stall failed: {e}"));
        }
        // Leases renewed only through the stalled leader, for more than two TTLs.
        let held_until = Instant::now() + Duration::from_secs(2 * TTL_SECONDS as u64 + 1);
        while Instant::now() < held_until {
            assert_eq!(
                key_count(&url, "stalled/").await,
                Some((LEASES + WRITES + 1) as i64)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            disk.holding(),
            "the WAL's fsync was released before the writes and renewals were done"
        );
        let fsyncs = std::fs::read_to_string(&trace).unwrap_or_default();
        let wal_fsyncs = fsyncs
            .lines()
            .filter(|line| {
                line.starts_with(&format!("{} ", disk.wal)) && line.contains("fdatasync(")
            })
            .count();
        assert_eq!(wal_fsyncs, 1, "one WAL fsync held throughout:\n{fsyncs}");
        let status = cluster.status(leader).await.expect("the leader answers");
        assert_eq!(
            status.leader,
            status.header.unwrap().member_id,
            "leadership moved"
        );

        // The disk comes back.
        disk.release(LIMIT).await;
        stop.store(true, Ordering::SeqCst);
        for keeper in keepers {
            let renewals = keeper.await.expect("every renewal had a positive TTL");
            assert!(renewals.len() >= 4, "renewals answered: {}", renewals.len());
        }
        let left = (WRITES + 1) as i64;
        eventually("the leases to expire", LIMIT, || async {
            (key_count(&url, "stalled/").await == Some(left)).then_some(())
        })
        .await;
        println!("disk stall: {WRITES} writes acknowledged during it; no lease lost");
    })
    .await;
}

/// Renews lease `id` through `url` every 500 ms until `stop`, reopening the stream when it
/// breaks (as etcd's clients do). Every answer must carry a positive TTL. Returns when each
/// renewal was answered.
async fn keep_alive(url: String, id: i64, stop: Arc<AtomicBool>) -> Vec<Instant> {
    let mut answered = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let (requests, outbound) = mpsc::channel(4);
        let mut client = LeaseClient::new(channel(&url));
        let Ok(response) = client.lease_keep_alive(ReceiverStream::new(outbound)).await else {
            tokio::time::sleep(Duration::from_millis(25)).await;
            continue;
        };
        let mut responses = response.into_inner();
        while !stop.load(Ordering::SeqCst) {
            if requests.send(LeaseKeepAliveRequest { id }).await.is_err() {
                break;
            }
            match responses.message().await {
                Ok(Some(answer)) => {
                    assert!(answer.ttl > 0, "renewal answered TTL {}", answer.ttl);
                    answered.push(Instant::now());
                }
                _ => break, // reopen
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    answered
}

/// A watcher whose client reads nothing while thousands of revisions are written: the writes
/// and another watcher are not slowed by it (its queue is bounded; it is dropped to catch-up),
/// and once its client reads again it gets every event exactly once, in order, from history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_blocks_nobody_and_catches_up_from_history() {
    const WRITERS: usize = 8;
    const WRITES_PER_WRITER: usize = 600;
    const VALUE_BYTES: usize = 2048;
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let url = cluster.members[0].client_url();
        let mut stalled = WatchStream::open(&url).await.unwrap();
        stalled.create(prefix_watch("s/", 0)).await;
        let created = stalled
            .next(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert!(created.created);
        let start = created.header.unwrap().revision + 1;
        let total = WRITERS * WRITES_PER_WRITER;
        let last_key = "s/zz-end".to_string();
        let fast = tokio::spawn(follow(vec![url.clone()], 0, "s/".into(), last_key.clone()));
        let started = Instant::now();
        write_concurrently(
            &url,
            WRITERS,
            WRITES_PER_WRITER,
            "s/",
            &"x".repeat(VALUE_BYTES),
        )
        .await;
        let mut kv = cluster.kv(0).await;
        let end = put(&mut kv, &last_key, "end").await.unwrap();
        let wrote = started.elapsed();
        let fast = fast.await.unwrap().seen;
        assert_eq!(fast.len(), total + 1, "the other watcher saw every write");
        // Now the stalled client reads: everything, once, in order.
        let mut seen: Vec<Seen> = Vec::new();
        while seen.last().is_none_or(|e| e.revision < end) {
            let response = stalled.next_events(Duration::from_secs(30)).await;
            let events = seen_of(&response);
            if let (Some(last), Some(first)) = (seen.last(), events.first()) {
                assert!(first.revision > last.revision, "duplicate or reordered");
            }
            seen.extend(events);
        }
        let revisions: Vec<i64> = seen.iter().map(|e| e.revision).collect();
        let expected: Vec<i64> = (start..=end).collect();
        assert_eq!(revisions, expected, "every revision exactly once");
        assert_eq!(seen, fast);
        let fell_behind = cluster
            .metric(0, "flotilla_watch_watchers_fell_behind_total")
            .await
            .expect("the metric is exported");
        assert!(
            fell_behind >= 1.0,
            "the stalled watcher overflowed its queue"
        );
        println!(
            "watch: {total} writes of {VALUE_BYTES} B in {wrote:?} with a stalled watcher; it then \
             caught up with all {} events",
            seen.len()
        );
    })
    .await;
}

/// `flotilla watch` (our CLI) keeps watching across the loss of the member it was on: it
/// resumes on the next endpoint from its last revision + 1, printing every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_watch_resumes_on_another_member() {
    const BEFORE: usize = 10;
    const AFTER: usize = 10;
    let mut cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let urls: Vec<String> = cluster.members.iter().map(|m| m.client_url()).collect();
        // The CLI starts on a follower, which is then killed.
        let first = (leader + 1) % 3;
        let writer = (leader + 2) % 3;
        let endpoints: Vec<String> = (0..3).map(|k| urls[(first + k) % 3].clone()).collect();
        for i in 0..BEFORE {
            put_anywhere(&urls, writer, &format!("c/{i:02}"), "v").await;
        }
        let output_path = cluster.dir.path().join("cli-watch.out");
        let output = std::fs::File::create(&output_path).unwrap();
        let child = std::process::Command::new(BINARY)
            .args(["--endpoints", &endpoints.join(",")])
            .args(["watch", "c/", "--prefix", "--rev", "1"])
            .args(["--max-events", &(BEFORE + AFTER).to_string()])
            .stdout(output)
            .stderr(std::process::Stdio::null())
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start flotilla watch");
        let mut watch = Process { child };
        let printed_puts = || {
            std::fs::read_to_string(&output_path)
                .unwrap_or_default()
                .lines()
                .filter(|line| *line == "PUT")
                .count()
        };
        eventually("the CLI to print the history", LIMIT, || {
            let count = printed_puts();
            async move { (count == BEFORE).then_some(()) }
        })
        .await;
        cluster.kill9(first);
        for i in BEFORE..BEFORE + AFTER {
            put_anywhere(&urls, writer, &format!("c/{i:02}"), "v").await;
        }
        let code = watch.wait_exit(Duration::from_secs(60)).await;
        assert_eq!(code, Some(0), "flotilla watch exits after --max-events");
        let text = std::fs::read_to_string(&output_path).unwrap();
        let keys: Vec<&str> = text.lines().filter(|l| l.starts_with("c/")).collect();
        let expected: Vec<String> = (0..BEFORE + AFTER).map(|i| format!("c/{i:02}")).collect();
        assert_eq!(keys, expected, "every event once, in order:\n{text}");
    })
    .await;
}

/// A lease nobody renews, whose leader is killed just after granting it: the new leader
/// gives it its full TTL again plus an election timeout from its promotion, so it never
/// expires early, and at most that much late (the documented worst-case extension).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_kill_extends_an_abandoned_lease_by_at_most_the_documented_bound() {
    const TTL_SECONDS: i64 = 2;
    const SLACK: Duration = Duration::from_millis(500);
    let mut cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let url = cluster.members[follower].client_url();
        let asked = Instant::now();
        let (id, _) = grant(&url, TTL_SECONDS).await;
        let first = put_with_lease(&url, "ext/a", id).await;
        put_with_lease(&url, "ext/b", id).await;
        cluster.kill9(leader);
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        cluster.wait_for_leader(&others).await;
        let new_leader_seen = Instant::now();
        let (deleted_at, _) = await_deletes(&url, "ext/", first, 2).await;
        let ttl = Duration::from_secs(TTL_SECONDS as u64);
        let lived = deleted_at.duration_since(asked);
        let bound = new_leader_seen.duration_since(asked) + ELECTION + ttl + SLACK;
        println!(
            "lease: TTL {ttl:?}, leader killed after the grant; new leader seen after {:?}; \
             keys deleted {lived:?} after the grant was asked for (bound {bound:?})",
            new_leader_seen.duration_since(asked)
        );
        assert!(lived >= ttl, "expired early: {lived:?}");
        assert!(
            lived <= bound,
            "extended beyond the documented bound: {lived:?}"
        );
    })
    .await;
}

/// `writers` clients each putting `writes` keys `<prefix><writer>/<i>` at once, every put
/// acknowledged.
async fn write_concurrently(url: &str, writers: usize, writes: usize, prefix: &str, value: &str) {
    let writers: Vec<_> = (0..writers)
        .map(|w| {
            let (url, prefix, value) = (url.to_string(), prefix.to_string(), value.to_string());
            tokio::spawn(async move {
                let mut kv = flotilla_proto::etcdserverpb::kv_client::KvClient::new(channel(&url));
                for i in 0..writes {
                    put(&mut kv, &format!("{prefix}{w}/{i:04}"), &value)
                        .await
                        .expect("a write while others watch");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}

/// Watch fan-out: many watchers on one prefix, over several streams, while writers run. Every
/// watcher gets every revision of the prefix exactly once and in order (several revisions may
/// share a response when a watcher lags), and the writes all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_of_a_busy_prefix_gets_every_event_in_order() {
    const STREAMS: usize = 8;
    const WATCHERS_PER_STREAM: i64 = 50;
    const WRITERS: usize = 4;
    const WRITES_PER_WRITER: usize = 150;
    let cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let url = cluster.members[leader].client_url();
        let mut kv = cluster.kv(leader).await;
        let start = put(&mut kv, "elsewhere", "before").await.unwrap() + 1;
        let last_key = "f/zz-end".to_string();
        // Each stream's watchers, created before any write, read by one task per stream.
        let mut readers = Vec::new();
        for _ in 0..STREAMS {
            let mut stream = WatchStream::open(&url).await.unwrap();
            for _ in 0..WATCHERS_PER_STREAM {
                stream.create(prefix_watch("f/", start)).await;
            }
            let last_key = last_key.clone();
            readers.push(tokio::spawn(async move {
                let mut seen: std::collections::BTreeMap<i64, Vec<Seen>> = Default::default();
                let mut finished = 0;
                while finished < WATCHERS_PER_STREAM {
                    let response = stream.next_events(Duration::from_secs(60)).await;
                    let events = seen_of(&response);
                    let mine = seen.entry(response.watch_id).or_default();
                    if events.iter().any(|event| event.key == last_key) {
                        finished += 1;
                    }
                    mine.extend(events);
                }
                seen
            }));
        }
        write_concurrently(&url, WRITERS, WRITES_PER_WRITER, "f/", "v").await;
        let end = put(&mut kv, &last_key, "end").await.unwrap();
        let expected: Vec<i64> = (start..=end).collect();
        let mut watchers = 0;
        for reader in readers {
            let seen = reader.await.unwrap();
            assert_eq!(
                seen.len(),
                WATCHERS_PER_STREAM as usize,
                "one history per watch id"
            );
            for (watch_id, events) in seen {
                let revisions: Vec<i64> = events.iter().map(|event| event.revision).collect();
                assert_eq!(
                    revisions, expected,
                    "watcher {watch_id}: every revision once, in order"
                );
                watchers += 1;
            }
        }
        assert_eq!(watchers, STREAMS * WATCHERS_PER_STREAM as usize);
    })
    .await;
}
