//! etcd's election service (`v3electionpb.Election`) on real `flotilla serve` processes: the
//! keys and revisions etcd's `concurrency.Election` uses, a leader at a time in campaign order,
//! proclaim and resign guarded by the leader key's create revision, Leader and Observe, etcd's
//! error texts, and a campaigner that gives up leaving the queue. Each test is bounded in time
//! and kills its processes by PID at the end.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use flotilla_proto::v3electionpb::election_client::ElectionClient;
use flotilla_proto::v3electionpb::{
    CampaignRequest, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ResignRequest,
};
use tonic::Streaming;

const LIMIT: Duration = Duration::from_secs(60);

fn campaign_request(name: &str, lease: i64, value: &str) -> CampaignRequest {
    CampaignRequest {
        name: Bytes::copy_from_slice(name.as_bytes()),
        lease,
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

fn leader_request(name: &str) -> LeaderRequest {
    LeaderRequest {
        name: Bytes::copy_from_slice(name.as_bytes()),
    }
}

fn proclaim_request(leader: &LeaderKey, value: &str) -> ProclaimRequest {
    ProclaimRequest {
        leader: Some(leader.clone()),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

/// The leader's key and value, as Observe or Leader reports it.
fn key_value(response: &LeaderResponse) -> (String, String) {
    let kv = response
        .kv
        .as_ref()
        .expect("a leader response carries the key");
    (
        String::from_utf8_lossy(&kv.key).into_owned(),
        String::from_utf8_lossy(&kv.value).into_owned(),
    )
}

async fn next_observed(observed: &mut Streaming<LeaderResponse>) -> (String, String) {
    let response = observed
        .message()
        .await
        .unwrap()
        .expect("the observe stream goes on");
    let (key, value) = key_value(&response);
    let kv = response.kv.unwrap();
    // The header is at least as new as the value it reports.
    assert!(response.header.unwrap().revision >= kv.mod_revision);
    (key, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_in_campaign_order_observed_from_another_member() {
    let cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let channel = cluster.channel(leader).await;
        let other = cluster.channel((leader + 1) % 3).await;
        let mut election = ElectionClient::new(channel.clone());
        let (a, b, c) = (
            grant(&channel).await,
            grant(&channel).await,
            grant(&channel).await,
        );
        let (a_key, b_key, c_key) = (
            format!("office/{a:x}"),
            format!("office/{b:x}"),
            format!("office/{c:x}"),
        );

        let none = election.leader(leader_request("office")).await.unwrap_err();
        assert_eq!(none.message(), "election: no leader");
        let mut observed = ElectionClient::new(other.clone())
            .observe(leader_request("office"))
            .await
            .unwrap()
            .into_inner();

        // a wins at once, under etcd's key; an observer on another member sees it.
        let won = election
            .campaign(campaign_request("office", a, "a-1"))
            .await
            .unwrap()
            .into_inner();
        let a_leader = won.leader.unwrap();
        assert_eq!(a_leader.name, "office".as_bytes());
        assert_eq!(a_leader.key, a_key.as_bytes());
        assert_eq!(a_leader.lease, a);
        assert_eq!(
            Some(a_leader.rev),
            created(&channel, a_key.as_bytes()).await
        );
        assert_eq!(won.header.unwrap().revision, a_leader.rev);
        assert_eq!(
            next_observed(&mut observed).await,
            (a_key.clone(), "a-1".into())
        );

        // b campaigns through another member and waits.
        let mut campaigner_b = ElectionClient::new(other.clone());
        let b_task = tokio::spawn(async move {
            campaigner_b
                .campaign(campaign_request("office", b, "b-1"))
                .await
        });
        eventually("b to queue", LIMIT, || async {
            created(&channel, b_key.as_bytes()).await
        })
        .await;
        assert!(!b_task.is_finished(), "a leads");

        // The leader proclaims a new value: Observe and Leader report it.
        election
            .proclaim(proclaim_request(&a_leader, "a-2"))
            .await
            .unwrap();
        assert_eq!(
            next_observed(&mut observed).await,
            (a_key.clone(), "a-2".into())
        );
        let current = election.leader(leader_request("office")).await.unwrap();
        assert_eq!(key_value(current.get_ref()), (a_key.clone(), "a-2".into()));

        // A leader key with the wrong revision, or none at all, proclaims nothing.
        let forged = LeaderKey {
            rev: a_leader.rev + 1,
            ..a_leader.clone()
        };
        let refused = election
            .proclaim(proclaim_request(&forged, "forged"))
            .await
            .unwrap_err();
        assert_eq!(refused.message(), "election: not leader");
        let missing = election
            .proclaim(ProclaimRequest {
                leader: None,
                value: "x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.message(), "\"leader\" field must be provided");

        // a resigns: b leads, and the observer sees the change.
        election
            .resign(ResignRequest {
                leader: Some(a_leader.clone()),
            })
            .await
            .unwrap();
        let b_won = b_task.await.unwrap().unwrap().into_inner();
        let b_leader = b_won.leader.unwrap();
        assert_eq!(b_leader.key, b_key.as_bytes());
        assert_eq!(
            next_observed(&mut observed).await,
            (b_key.clone(), "b-1".into())
        );

        // a's old leader key can no longer proclaim; resigning with it again changes nothing
        // and is not an error (etcd's behaviour).
        let stale = election
            .proclaim(proclaim_request(&a_leader, "a-3"))
            .await
            .unwrap_err();
        assert_eq!(stale.message(), "election: not leader");
        election
            .resign(ResignRequest {
                leader: Some(a_leader),
            })
            .await
            .unwrap();
        let current = election.leader(leader_request("office")).await.unwrap();
        assert_eq!(key_value(current.get_ref()), (b_key.clone(), "b-1".into()));

        // b's lease ends: no leader until c campaigns, and the observer sees c.
        revoke(&channel, b).await;
        let none = election.leader(leader_request("office")).await.unwrap_err();
        assert_eq!(none.message(), "election: no leader");
        election
            .campaign(campaign_request("office", c, "c-1"))
            .await
            .unwrap();
        assert_eq!(next_observed(&mut observed).await, (c_key, "c-1".into()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigning_again_under_a_lease_carries_the_new_value_and_a_missing_lease_is_refused() {
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let channel = cluster.channel(0).await;
        let mut election = ElectionClient::new(channel.clone());
        let missing = election
            .campaign(campaign_request("e", 0x1234, "v"))
            .await
            .unwrap_err();
        assert_eq!(missing.message(), "etcdserver: requested lease not found");

        let a = grant(&channel).await;
        let first = election
            .campaign(campaign_request("e", a, "v1"))
            .await
            .unwrap()
            .into_inner()
            .leader
            .unwrap();
        let again = election
            .campaign(campaign_request("e", a, "v2"))
            .await
            .unwrap()
            .into_inner()
            .leader
            .unwrap();
        assert_eq!(again, first, "the same key, created at the same revision");
        let current = election.leader(leader_request("e")).await.unwrap();
        assert_eq!(key_value(current.get_ref()).1, "v2");
    })
    .await;
}

/// A campaigner whose deadline passes leaves the queue, as etcd's Election resigns when the
/// caller's context ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaigner_that_gives_up_leaves_the_queue() {
    let cluster = TestCluster::start(1, &[]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let channel = cluster.channel(0).await;
        let mut election = ElectionClient::new(channel.clone());
        let (a, b) = (grant(&channel).await, grant(&channel).await);
        let won = election
            .campaign(campaign_request("e", a, "a"))
            .await
            .unwrap()
            .into_inner();
        let led_at = won.header.unwrap().revision;

        let mut request = tonic::Request::new(campaign_request("e", b, "b"));
        request.set_timeout(Duration::from_secs(1));
        let gave_up = election.campaign(request).await;
        assert!(gave_up.is_err(), "b cannot lead while a does: {gave_up:?}");

        let b_key = format!("e/{b:x}");
        let events = watch_prefix_until(&channel, "e/", led_at + 1, |seen| {
            seen.contains(&KeyEvent::Delete(b_key.clone()))
        })
        .await;
        assert_eq!(
            events,
            [KeyEvent::Put(b_key.clone()), KeyEvent::Delete(b_key)]
        );
    })
    .await;
}

/// A campaign waiting on a follower outlives a change of Raft leader: the old leader is
/// killed while b waits behind a; once a resigns (through another member), b's campaign
/// returns with b as the election's leader, and a Leader call on any member agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_outlives_a_raft_leader_change() {
    let mut cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let raft_leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let waiting_on = (raft_leader + 1) % 3;
        let resigning_on = (raft_leader + 2) % 3;
        let (at_waiter, at_resigner) = (
            cluster.channel(waiting_on).await,
            cluster.channel(resigning_on).await,
        );
        let (a, b) = (grant(&at_resigner).await, grant(&at_resigner).await);
        let won = ElectionClient::new(at_resigner.clone())
            .campaign(campaign_request("term", a, "a"))
            .await
            .unwrap()
            .into_inner();
        let a_leader = won.leader.unwrap();

        let mut waiter = ElectionClient::new(at_waiter.clone());
        let campaign =
            tokio::spawn(async move { waiter.campaign(campaign_request("term", b, "b")).await });
        // b is queued (its key exists) before the leader dies.
        let b_key = format!("term/{b:x}");
        eventually("b's campaign key", LIMIT, || {
            let channel = at_waiter.clone();
            let key = b_key.clone();
            async move { created(&channel, key.as_bytes()).await }
        })
        .await;
        cluster.kill9(raft_leader);
        cluster.wait_for_leader(&[waiting_on, resigning_on]).await;
        if campaign.is_finished() {
            panic!("b cannot lead while a does: {:?}", campaign.await);
        }

        ElectionClient::new(at_resigner.clone())
            .resign(ResignRequest {
                leader: Some(a_leader),
            })
            .await
            .unwrap();
        let b_won = campaign.await.unwrap().unwrap().into_inner();
        let b_leader = b_won.leader.unwrap();
        assert_eq!(b_leader.key.as_ref(), b_key.as_bytes());
        for channel in [&at_waiter, &at_resigner] {
            let now = ElectionClient::new(channel.clone())
                .leader(leader_request("term"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(key_value(&now), (b_key.clone(), "b".to_string()));
        }
    })
    .await;
}
