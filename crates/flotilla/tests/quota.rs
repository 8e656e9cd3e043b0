//! The space quota and alarms on real `flotilla serve` processes: a write past
//! `--quota-backend-bytes` raises NOSPACE through the log, every member then refuses writes
//! that take space with etcd's error while reads, deletes and compactions go on; the alarm
//! survives a restart, shows in Status and /health, and `Alarm DEACTIVATE` (what `etcdctl
//! alarm disarm` sends) clears it once space was freed. Each test is bounded in time and kills
//! its processes by PID at the end.

mod common;

use std::time::Duration;

use common::*;
use flotilla_proto::etcdserverpb::alarm_request::AlarmAction;
use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmType, CompactionRequest, DeleteRangeRequest, LeaseGrantRequest,
    PutRequest,
};

const LIMIT: Duration = Duration::from_secs(90);
const QUOTA_BYTES: u64 = 64 * 1024;
const VALUE_BYTES: usize = 4 * 1024;

async fn alarms(cluster: &TestCluster, i: usize) -> Vec<AlarmMember> {
    MaintenanceClient::new(cluster.channel(i).await)
        .alarm(AlarmRequest::default())
        .await
        .unwrap()
        .into_inner()
        .alarms
}

async fn alarm(
    cluster: &TestCluster,
    i: usize,
    action: AlarmAction,
    member_id: u64,
    alarm: AlarmType,
) -> Result<Vec<AlarmMember>, tonic::Status> {
    let request = AlarmRequest {
        action: action as i32,
        member_id,
        alarm: alarm as i32,
    };
    let response = MaintenanceClient::new(cluster.channel(i).await)
        .alarm(request)
        .await?;
    Ok(response.into_inner().alarms)
}

fn put_request(key: String) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: vec![b'v'; VALUE_BYTES].into(),
        ..Default::default()
    }
}

fn assert_no_space(status: &tonic::Status) {
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "etcdserver: mvcc: database space exceeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_quota_raises_nospace_everywhere_until_disarmed() {
    let quota = QUOTA_BYTES.to_string();
    let mut cluster = TestCluster::start(3, &["--quota-backend-bytes", &quota]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let mut kv = cluster.kv(follower).await;
        // Fill the store through a follower until a put is refused; the quota allows about
        // QUOTA_BYTES / VALUE_BYTES of them.
        let mut stored = 0;
        let refusal = loop {
            match kv.put(put_request(format!("fill/{stored:04}"))).await {
                Ok(_) => stored += 1,
                Err(status) => break status,
            }
            assert!(stored < 100, "the quota never refused a put");
        };
        assert_no_space(&refusal);
        assert!(stored >= 10, "only {stored} puts fitted");

        // The follower raised NOSPACE for itself, through the log: every member lists it.
        let raised_by = cluster
            .status(follower)
            .await
            .unwrap()
            .header
            .unwrap()
            .member_id;
        let expected = vec![AlarmMember {
            member_id: raised_by,
            alarm: AlarmType::Nospace as i32,
        }];
        for i in 0..3 {
            assert_eq!(alarms(&cluster, i).await, expected, "member {i}");
        }

        // Every member refuses what takes space: a small put, a txn put, a lease grant.
        for i in 0..3 {
            let small = PutRequest {
                key: "small".into(),
                value: "x".into(),
                ..Default::default()
            };
            assert_no_space(&cluster.kv(i).await.put(small).await.unwrap_err());
        }
        let grant = LeaseClient::new(cluster.channel(leader).await)
            .lease_grant(LeaseGrantRequest {
                ttl: 30,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_no_space(&grant);

        // Status and /health say so.
        let status = cluster.status(leader).await.unwrap();
        assert!(
            status.errors.iter().any(|e| e.contains("alarm:NOSPACE")),
            "{:?}",
            status.errors
        );
        assert_eq!(status.db_size_quota, QUOTA_BYTES as i64);
        let health = http_get(&format!(
            "http://127.0.0.1:{}/health",
            cluster.members[leader].metrics_port()
        ))
        .await
        .unwrap();
        assert!(health.contains("ALARM NOSPACE"), "{health}");

        // The alarm is replicated state: it survives a restart of the member that raised it.
        cluster.kill9(follower);
        cluster.restart(follower);
        let found = eventually("the restarted member to list its alarm", LIMIT, || async {
            let response = MaintenanceClient::new(cluster.channel(follower).await)
                .alarm(AlarmRequest::default())
                .await
                .ok()?;
            Some(response.into_inner().alarms)
        })
        .await;
        assert_eq!(found, expected);

        // Reads, deletes and compaction still work; they free the space.
        let mut kv = cluster.kv(leader).await;
        assert!(get(&mut kv, "fill/0000", false).await.unwrap().is_some());
        let deleted = kv
            .delete_range(DeleteRangeRequest {
                key: "fill/".into(),
                range_end: "fill0".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(deleted.deleted, stored);
        let revision = deleted.header.unwrap().revision;
        kv.compact(CompactionRequest {
            revision,
            physical: true,
        })
        .await
        .unwrap();
        let status = cluster.status(leader).await.unwrap();
        assert!(
            (status.db_size_in_use as u64) < QUOTA_BYTES / 4,
            "compaction freed the space: {} bytes in use",
            status.db_size_in_use
        );
        // Still refused until disarmed: freeing space does not clear an alarm.
        assert_no_space(&put(&mut kv, "after", "x").await.unwrap_err());

        // Disarm (etcdctl alarm disarm: DEACTIVATE each listed alarm) through any member.
        let cleared = alarm(
            &cluster,
            (leader + 2) % 3,
            AlarmAction::Deactivate,
            raised_by,
            AlarmType::Nospace,
        )
        .await
        .unwrap();
        assert_eq!(cleared, expected);
        for i in 0..3 {
            assert!(alarms(&cluster, i).await.is_empty(), "member {i}");
        }
        assert!(put(&mut kv, "after", "x").await.is_ok());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_can_be_raised_and_cleared_for_any_member_and_bad_requests_are_refused() {
    let cluster = TestCluster::start(3, &[]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let other = cluster.status((leader + 1) % 3).await.unwrap();
        let other_id = other.header.unwrap().member_id;

        // Raising for another member; raising again changes nothing and says so.
        let raised = alarm(
            &cluster,
            leader,
            AlarmAction::Activate,
            other_id,
            AlarmType::Nospace,
        )
        .await
        .unwrap();
        assert_eq!(raised.len(), 1);
        let again = alarm(
            &cluster,
            leader,
            AlarmAction::Activate,
            other_id,
            AlarmType::Nospace,
        )
        .await
        .unwrap();
        assert!(again.is_empty());
        let mut kv = cluster.kv(leader).await;
        assert_no_space(&put(&mut kv, "k", "v").await.unwrap_err());

        // CORRUPT refuses every client command with etcd's error.
        alarm(
            &cluster,
            leader,
            AlarmAction::Activate,
            other_id,
            AlarmType::Corrupt,
        )
        .await
        .unwrap();
        let refused = kv
            .delete_range(DeleteRangeRequest {
                key: "k".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::DataLoss);
        assert_eq!(refused.message(), "etcdserver: corrupt cluster");
        assert_eq!(alarms(&cluster, leader).await.len(), 2);
        for kind in [AlarmType::Corrupt, AlarmType::Nospace] {
            alarm(&cluster, leader, AlarmAction::Deactivate, other_id, kind)
                .await
                .unwrap();
        }
        assert!(put(&mut kv, "k", "v").await.is_ok());

        // Bad input: an unknown member, no alarm type, an unknown action.
        let unknown = alarm(
            &cluster,
            leader,
            AlarmAction::Activate,
            12345,
            AlarmType::Nospace,
        )
        .await
        .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        assert_eq!(unknown.message(), "etcdserver: member not found");
        let none = alarm(
            &cluster,
            leader,
            AlarmAction::Activate,
            other_id,
            AlarmType::None,
        )
        .await
        .unwrap_err();
        assert_eq!(none.code(), tonic::Code::InvalidArgument);
        assert!(none.message().contains("alarm type 0"), "{none:?}");
        let bad_action = MaintenanceClient::new(cluster.channel(leader).await)
            .alarm(AlarmRequest {
                action: 9,
                member_id: other_id,
                alarm: AlarmType::Nospace as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(bad_action.code(), tonic::Code::InvalidArgument);
        assert!(alarms(&cluster, leader).await.is_empty());
    })
    .await;
}

/// Defragment saves a snapshot at once (the snapshot policy is far off here) and answers once
/// it is saved, while writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragment_saves_a_snapshot_while_writes_go_on() {
    let cluster = TestCluster::start(1, &["--snapshot-count", "1000000"]);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let mut kv = cluster.kv(0).await;
        for i in 0..200 {
            kv.put(put_request(format!("k/{i:04}"))).await.unwrap();
        }
        let saved = "flotilla_server_snapshots_saved_total";
        assert_eq!(cluster.metric(0, saved).await, Some(0.0));
        let writer = {
            let mut kv = cluster.kv(0).await;
            tokio::spawn(async move {
                for i in 0..200 {
                    kv.put(put_request(format!("during/{i:04}"))).await.unwrap();
                }
            })
        };
        MaintenanceClient::new(cluster.channel(0).await)
            .defragment(flotilla_proto::etcdserverpb::DefragmentRequest {})
            .await
            .unwrap();
        assert!(cluster.metric(0, saved).await.unwrap() >= 1.0);
        writer.await.unwrap();
        // A second Defragment saves what the writer added meanwhile, or has nothing to do.
        MaintenanceClient::new(cluster.channel(0).await)
            .defragment(flotilla_proto::etcdserverpb::DefragmentRequest {})
            .await
            .unwrap();
        assert_eq!(
            get(&mut kv, "during/0199", true)
                .await
                .unwrap()
                .map(|v| v.len()),
            Some(VALUE_BYTES)
        );
    })
    .await;
}
