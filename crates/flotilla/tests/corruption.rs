//! etcd's corruption checks on real `flotilla serve` processes. A follower's log is changed on
//! disk the way a bad disk or a bug would change it (one committed put gets another value, the
//! record still well-formed, so nothing but a comparison of states can notice); then:
//! - restarted with `--experimental-initial-corrupt-check`, the follower refuses to start,
//!   naming the peer whose hash differs;
//! - restarted without it, it serves its diverged state until the leader's periodic check
//!   (`--experimental-corrupt-check-time`) raises the CORRUPT alarm for it, after which every
//!   member refuses writes with etcd's error and the corrupt one refuses reads too;
//! - a healthy member still restarts with the initial check beside the corrupt one.
//!
//! Each test is bounded in time and kills its processes by PID at the end.

mod common;

use std::time::Duration;

use common::*;
use flotilla_kv::{Command, Operation};
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{AlarmMember, AlarmRequest, AlarmType};
use flotilla_raft::{EntryPayload, LogStorage, PersistBatch};

const LIMIT: Duration = Duration::from_secs(120);

/// Rewrites member `i`'s log (the member is stopped): the put of `key` gets `value`, at the
/// same index and term, every later entry written back unchanged.
async fn change_put_on_disk(cluster: &TestCluster, i: usize, key: &str, value: &str) {
    let member = &cluster.members[i];
    let args = flotilla_server::ServeArgs {
        name: Some(member.name.clone()),
        data_dir: Some(member.data_dir.clone()),
        ..Default::default()
    };
    let config = args.resolve().unwrap();
    let (identity, created) = flotilla_server::identity::load_or_create(&config)
        .await
        .unwrap();
    assert!(!created, "the member's data directory exists");
    let storage = flotilla_server::storage::open_storage(&config, &identity).unwrap();
    let (first, last) = (storage.first_index(), storage.last_index());
    let mut entries = storage.entries(first, last + 1, u64::MAX).unwrap();
    let position = entries
        .iter()
        .position(|entry| match &entry.payload {
            EntryPayload::Command(data) => matches!(
                Command::decode(data),
                Ok(Command { operation: Operation::Put(ref put), .. }) if put.key == key.as_bytes()
            ),
            _ => false,
        })
        .expect("the put is in the member's log");
    let EntryPayload::Command(data) = &entries[position].payload else {
        unreachable!()
    };
    let mut command = Command::decode(data).unwrap();
    let Operation::Put(put) = &mut command.operation else {
        unreachable!()
    };
    put.value = value.to_string().into();
    entries[position].payload = EntryPayload::Command(command.encode());
    let batch = PersistBatch {
        id: 1,
        snapshot_chunks: Vec::new(),
        snapshot_install: None,
        compact_to: None,
        entries: entries.split_off(position),
        hard_state: None,
    };
    storage.write(&batch).unwrap();
    storage.sync().unwrap();
    storage.close().unwrap();
}

async fn corrupt_alarms(cluster: &TestCluster, i: usize) -> Option<Vec<AlarmMember>> {
    let response = MaintenanceClient::new(cluster.channel(i).await)
        .alarm(AlarmRequest {
            action: 0,
            member_id: 0,
            alarm: AlarmType::Corrupt as i32,
        })
        .await
        .ok()?;
    Some(response.into_inner().alarms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_state_diverged_is_refused_at_start_and_alarmed_by_the_leader() {
    let mut cluster = TestCluster::start(3, &["--experimental-corrupt-check-time", "300ms"]);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let mut kv = cluster.kv(leader).await;
        put(&mut kv, "k", "good").await.unwrap();
        put(&mut kv, "after", "x").await.unwrap();
        let index = cluster.status(leader).await.unwrap().raft_index;
        cluster.wait_applied(follower, index).await;
        let follower_id = cluster
            .status(follower)
            .await
            .unwrap()
            .header
            .unwrap()
            .member_id;
        cluster.kill9(follower);
        change_put_on_disk(&cluster, follower, "k", "evil").await;

        // With the initial check the follower refuses to start.
        cluster
            .extra_args
            .push("--experimental-initial-corrupt-check".into());
        cluster.restart(follower);
        let exit = cluster.members[follower]
            .process
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(30))
            .await;
        assert!(matches!(exit, Some(code) if code != 0), "exit {exit:?}");
        let log = cluster.members[follower].log_text();
        assert!(log.contains("found data inconsistency with peers"), "{log}");
        cluster.members[follower].process = None;
        cluster.extra_args.pop();

        // Without it, it starts, and the leader's periodic check (which asks each peer on its
        // peer port, so it may reach the follower before the follower serves clients) raises
        // CORRUPT for it; then every member refuses every client command.
        cluster.restart(follower);
        let alarms = eventually("the CORRUPT alarm", LIMIT, || async {
            corrupt_alarms(&cluster, leader)
                .await
                .filter(|a| !a.is_empty())
        })
        .await;
        assert_eq!(
            alarms,
            vec![AlarmMember {
                member_id: follower_id,
                alarm: AlarmType::Corrupt as i32,
            }]
        );
        // Every member refuses writes; the corrupt one refuses reads too, the others serve
        // the agreed state.
        for i in 0..3 {
            let refused = eventually("the alarm to apply everywhere", LIMIT, || async {
                put(&mut cluster.kv(i).await, "k", "new").await.err()
            })
            .await;
            assert_eq!(refused.code(), tonic::Code::DataLoss, "member {i}");
            assert_eq!(refused.message(), "etcdserver: corrupt cluster");
        }
        let refused = get(&mut cluster.kv(follower).await, "k", true)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::DataLoss);
        let agreed = get(&mut cluster.kv(leader).await, "k", false)
            .await
            .unwrap();
        assert_eq!(agreed.as_deref(), Some("good"));

        // A healthy member restarts with the initial check beside the corrupt one: one peer
        // agrees with it, one does not.
        let healthy = (leader + 2) % 3;
        cluster.kill9(healthy);
        cluster
            .extra_args
            .push("--experimental-initial-corrupt-check".into());
        cluster.restart(healthy);
        eventually("the healthy member to serve", LIMIT, || async {
            cluster.status(healthy).await
        })
        .await;
        let log = cluster.members[healthy].log_text();
        assert!(
            log.contains("hash differently from this member and the others"),
            "{log}"
        );
    })
    .await;
}
