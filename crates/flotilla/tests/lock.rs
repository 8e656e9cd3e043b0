//! etcd's lock service (`v3lockpb.Lock`) on real `flotilla serve` processes: the keys and
//! revisions etcd uses, waiters served in order, release by Unlock and by the lease ending,
//! clear errors, and fencing a holder whose lease ended. Each test is bounded in time and
//! kills its processes by PID at the end.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::request_op::Request as Op;
use flotilla_proto::etcdserverpb::{Compare, PutRequest, RequestOp, TxnRequest};
use flotilla_proto::v3lockpb::lock_client::LockClient;
use flotilla_proto::v3lockpb::{LockRequest, UnlockRequest};

const LIMIT: Duration = Duration::from_secs(60);

fn lock_request(name: &str, lease: i64) -> LockRequest {
    LockRequest {
        name: Bytes::copy_from_slice(name.as_bytes()),
        lease,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_the_lock_in_order_on_unlock_and_on_the_lease_ending() {
    let cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let channel = cluster.channel(leader).await;
        let other = cluster.channel(follower).await;
        let (a, b, c) = (
            grant(&channel).await,
            grant(&channel).await,
            grant(&channel).await,
        );

        // The first caller holds the lock at once, under the key etcd would use.
        let held = LockClient::new(channel.clone())
            .lock(lock_request("jobs", a))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(held.key, format!("jobs/{a:x}").as_bytes());
        let a_created = created(&channel, &held.key).await.expect("the key exists");
        assert_eq!(held.header.unwrap().revision, a_created);

        // Two more queue, through another member too; neither gets it while it is held.
        let mut waiter_b = LockClient::new(other.clone());
        let b_task = tokio::spawn(async move { waiter_b.lock(lock_request("jobs", b)).await });
        let b_key = format!("jobs/{b:x}");
        eventually("b to queue", LIMIT, || async {
            created(&channel, b_key.as_bytes()).await
        })
        .await;
        let mut waiter_c = LockClient::new(channel.clone());
        let c_task = tokio::spawn(async move { waiter_c.lock(lock_request("jobs", c)).await });
        let c_key = format!("jobs/{c:x}");
        eventually("c to queue", LIMIT, || async {
            created(&channel, c_key.as_bytes()).await
        })
        .await;
        assert!(
            !b_task.is_finished() && !c_task.is_finished(),
            "the lock is held"
        );

        // Unlock hands it to b, the next in order; c still waits.
        let unlocked = LockClient::new(channel.clone())
            .unlock(UnlockRequest {
                key: held.key.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let b_held = b_task.await.unwrap().unwrap().into_inner();
        assert_eq!(b_held.key, b_key.as_bytes());
        assert!(b_held.header.unwrap().revision >= unlocked.header.unwrap().revision);
        assert!(!c_task.is_finished(), "b holds it now");

        // b's lease ends (revoked: the same as expiring, without waiting for it): c gets it.
        revoke(&channel, b).await;
        let c_held = c_task.await.unwrap().unwrap().into_inner();
        assert_eq!(c_held.key, c_key.as_bytes());

        // Locking again under the lease that holds it returns at once, the same key.
        let again = LockClient::new(channel.clone())
            .lock(lock_request("jobs", c))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.key, c_key.as_bytes());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_lease_ends_fails_and_a_missing_lease_is_refused() {
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let channel = cluster.channel(0).await;
        let missing = LockClient::new(channel.clone())
            .lock(lock_request("l", 0x1234))
            .await
            .unwrap_err();
        assert_eq!(missing.message(), "etcdserver: requested lease not found");

        let (a, b) = (grant(&channel).await, grant(&channel).await);
        LockClient::new(channel.clone())
            .lock(lock_request("l", a))
            .await
            .unwrap();
        let mut waiter = LockClient::new(channel.clone());
        let task = tokio::spawn(async move { waiter.lock(lock_request("l", b)).await });
        let b_key = format!("l/{b:x}");
        eventually("b to queue", LIMIT, || async {
            created(&channel, b_key.as_bytes()).await
        })
        .await;
        revoke(&channel, b).await;
        let failed = task.await.unwrap().unwrap_err();
        assert_eq!(failed.message(), "session expired");
    })
    .await;
}

/// A holder that was paused until its lease ended still believes it holds the lock; a write
/// fenced by the ownership key's create revision cannot get through, while the same write from
/// the current holder does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_ended_cannot_write_through_a_fenced_transaction() {
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let channel = cluster.channel(0).await;
        let mut kv = cluster.kv(0).await;
        let (a, b) = (grant(&channel).await, grant(&channel).await);
        let held = LockClient::new(channel.clone())
            .lock(lock_request("fence", a))
            .await
            .unwrap()
            .into_inner();
        // The fencing token: the ownership key's create revision.
        let token = created(&channel, &held.key).await.unwrap();

        let fenced_write = |key: Bytes, token: i64, value: &'static str| TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key,
                range_end: Bytes::new(),
                target_union: Some(TargetUnion::CreateRevision(token)),
            }],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: "protected".into(),
                    value: value.into(),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        // While it holds the lock, its fenced write goes through.
        let ok = kv
            .txn(fenced_write(held.key.clone(), token, "from a"))
            .await
            .unwrap();
        assert!(ok.into_inner().succeeded);

        // Its lease ends while it is "paused"; b takes the lock.
        revoke(&channel, a).await;
        let b_held = LockClient::new(channel.clone())
            .lock(lock_request("fence", b))
            .await
            .unwrap()
            .into_inner();
        // a wakes up and writes with its old token: refused.
        let stale = kv
            .txn(fenced_write(held.key.clone(), token, "stale from a"))
            .await
            .unwrap();
        assert!(!stale.into_inner().succeeded);
        let b_token = created(&channel, &b_held.key).await.unwrap();
        assert!(b_token > token);
        let fresh = kv
            .txn(fenced_write(b_held.key.clone(), b_token, "from b"))
            .await
            .unwrap();
        assert!(fresh.into_inner().succeeded);
        assert_eq!(
            get(&mut kv, "protected", false).await.unwrap().as_deref(),
            Some("from b")
        );
    })
    .await;
}

/// A waiter whose deadline passes leaves the queue (etcd's Mutex deletes its key then), so the
/// next one gets the lock when the holder lets go instead of waiting for the lease to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_leaves_the_queue() {
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let channel = cluster.channel(0).await;
        let (a, b, c) = (
            grant(&channel).await,
            grant(&channel).await,
            grant(&channel).await,
        );
        let held = LockClient::new(channel.clone())
            .lock(lock_request("q", a))
            .await
            .unwrap()
            .into_inner();
        let held_at = held.header.unwrap().revision;

        // b waits with a deadline (sent as grpc-timeout, as a Go context deadline is); the
        // lock stays held, so the deadline passes.
        let mut request = tonic::Request::new(lock_request("q", b));
        request.set_timeout(Duration::from_secs(1));
        let gave_up = LockClient::new(channel.clone()).lock(request).await;
        assert!(gave_up.is_err(), "b cannot get a held lock: {gave_up:?}");

        // Its key came and went.
        let b_key = format!("q/{b:x}");
        let events = watch_prefix_until(&channel, "q/", held_at + 1, |seen| {
            seen.contains(&KeyEvent::Delete(b_key.clone()))
        })
        .await;
        assert_eq!(
            events,
            [
                KeyEvent::Put(b_key.clone()),
                KeyEvent::Delete(b_key.clone())
            ]
        );

        // c queues behind a alone and gets the lock when a lets go.
        let mut waiter_c = LockClient::new(channel.clone());
        let c_task = tokio::spawn(async move { waiter_c.lock(lock_request("q", c)).await });
        LockClient::new(channel.clone())
            .unlock(UnlockRequest { key: held.key })
            .await
            .unwrap();
        let c_held = c_task.await.unwrap().unwrap().into_inner();
        assert_eq!(c_held.key, format!("q/{c:x}").as_bytes());
    })
    .await;
}

/// What one racing client saw.
#[derive(Debug, Default)]
struct RaceTally {
    /// Fenced increments that certainly applied.
    increments: u64,
    /// Fenced writes whose outcome is unknown (a member died under them).
    unknown: u64,
    /// Fenced writes refused because the holder's lock was gone (its lease ended): the fence
    /// doing its job.
    fenced: u64,
    /// Increments made after the killed leader was back.
    after_restart: u64,
    /// Fenced writes that found the counter changed while this client held the lock: two
    /// holders at once.
    violations: Vec<String>,
}

/// One racing client: take the lock (3 s leases, so a lock lost with a dying member frees
/// itself), read the counter, and increment it through a transaction fenced by the ownership
/// key's create revision and the counter's mod revision. While a client holds the lock no
/// one else may write the counter; the fence refuses a holder whose lease ended.
async fn race_for_the_lock(
    id: usize,
    channels: Vec<tonic::transport::Channel>,
    stop: tokio::sync::watch::Receiver<bool>,
    restarted: tokio::sync::watch::Receiver<bool>,
) -> RaceTally {
    use flotilla_proto::etcdserverpb::kv_client::KvClient;
    use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
    use flotilla_proto::etcdserverpb::{LeaseGrantRequest, RangeRequest};
    let mut tally = RaceTally::default();
    let call_limit = Duration::from_secs(5);
    for round in 0.. {
        if *stop.borrow() {
            break;
        }
        let channel = channels[(id + round) % channels.len()].clone();
        let restarted_before = *restarted.borrow();
        let mut leases = LeaseClient::new(channel.clone());
        let grant = leases.lease_grant(LeaseGrantRequest { ttl: 3, id: 0 });
        let Ok(Ok(lease)) = tokio::time::timeout(call_limit, grant).await else {
            continue;
        };
        let lease = lease.into_inner().id;
        let mut locks = LockClient::new(channel.clone());
        let lock = locks.lock(lock_request("race", lease));
        let Ok(Ok(held)) = tokio::time::timeout(call_limit, lock).await else {
            continue;
        };
        let key = held.into_inner().key;
        let mut kv = KvClient::new(channel.clone());
        let read = |key: &'static str| RangeRequest {
            key: key.into(),
            ..Default::default()
        };
        let (Ok(Ok(owner)), Ok(Ok(counter))) = (
            tokio::time::timeout(
                call_limit,
                kv.clone().range(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                }),
            )
            .await,
            tokio::time::timeout(call_limit, kv.clone().range(read("counter"))).await,
        ) else {
            continue;
        };
        let Some(token) = owner.into_inner().kvs.first().map(|kv| kv.create_revision) else {
            tally.fenced += 1; // the lease ended between Lock and the read
            continue;
        };
        let counter = counter.into_inner();
        let (value, mod_revision) = counter.kvs.first().map_or((0, 0), |kv| {
            let text = String::from_utf8_lossy(&kv.value).into_owned();
            (text.parse::<u64>().unwrap(), kv.mod_revision)
        });
        let compare = |key: Bytes, target: CompareTarget, union: TargetUnion| Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key,
            range_end: Bytes::new(),
            target_union: Some(union),
        };
        let increment = TxnRequest {
            compare: vec![
                compare(
                    key.clone(),
                    CompareTarget::Create,
                    TargetUnion::CreateRevision(token),
                ),
                compare(
                    "counter".into(),
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(mod_revision),
                ),
            ],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: "counter".into(),
                    value: (value + 1).to_string().into(),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        match tokio::time::timeout(call_limit, kv.txn(increment)).await {
            Ok(Ok(answer)) if answer.get_ref().succeeded => {
                tally.increments += 1;
                if restarted_before {
                    tally.after_restart += 1;
                }
            }
            Ok(Ok(_)) => {
                // Which compare failed? If the ownership key is gone, the fence worked.
                let owner = RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                };
                match tokio::time::timeout(call_limit, kv.range(owner)).await {
                    Ok(Ok(owner))
                        if owner.get_ref().kvs.first().map(|kv| kv.create_revision)
                            == Some(token) =>
                    {
                        tally.violations.push(format!(
                            "client {id} held the lock (key {key:?} at {token}) and the \
                             counter moved from revision {mod_revision}"
                        ))
                    }
                    Ok(Ok(_)) => tally.fenced += 1,
                    _ => tally.unknown += 1,
                }
            }
            _ => tally.unknown += 1,
        }
        let mut locks = LockClient::new(channel);
        let _ = tokio::time::timeout(call_limit, locks.unlock(UnlockRequest { key })).await;
    }
    tally
}

/// Ten clients race for one lock, on all three members, while the Raft leader is killed and
/// later restarted: every increment of the shared counter goes through the fence, none
/// finds the counter changed under it (at most one holder at a time), the race makes
/// progress after the leader comes back, and the counter counts every increment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_racing_for_one_lock_under_a_leader_kill_hold_it_one_at_a_time() {
    let mut cluster = TestCluster::start(3, &[]);
    bounded(Duration::from_secs(120), async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let mut channels = Vec::new();
        for i in 0..3 {
            channels.push(cluster.channel(i).await);
        }
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let (restarted_tx, restarted) = tokio::sync::watch::channel(false);
        let racers: Vec<_> = (0..10)
            .map(|id| {
                tokio::spawn(race_for_the_lock(
                    id,
                    channels.clone(),
                    stop.clone(),
                    restarted.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.kill9(leader);
        let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        cluster.wait_for_leader(&survivors).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.restart(leader);
        cluster.wait_for_leader(&[0, 1, 2]).await;
        restarted_tx.send_replace(true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop_tx.send_replace(true);
        let mut total = RaceTally::default();
        for racer in racers {
            let tally = racer.await.unwrap();
            total.increments += tally.increments;
            total.unknown += tally.unknown;
            total.fenced += tally.fenced;
            total.after_restart += tally.after_restart;
            total.violations.extend(tally.violations);
        }
        assert!(
            total.violations.is_empty(),
            "two holders at once: {:?}",
            total.violations
        );
        assert!(
            total.increments >= 10,
            "the race made little progress: {total:?}"
        );
        assert!(
            total.after_restart > 0,
            "no progress after the leader came back: {total:?}"
        );
        let mut kv = cluster.kv((leader + 1) % 3).await;
        let counter: u64 = get(&mut kv, "counter", false)
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (total.increments..=total.increments + total.unknown).contains(&counter),
            "the counter says {counter}: {total:?}"
        );
    })
    .await;
}
