//! Backups on real `flotilla serve` processes: `flotilla snapshot save` under load (the
//! Maintenance.Snapshot stream), `snapshot status`, `snapshot restore` into a new 3-member
//! cluster that then holds every key with the same revisions, compaction point and leases;
//! Maintenance.Hash agreeing across members; damaged backups refused with the reason. Each
//! test is bounded in time and kills its processes by PID at the end.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{
    CompactionRequest, HashRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, RangeResponse,
};

const LIMIT: Duration = Duration::from_secs(120);

/// Runs the flotilla binary with `args`, off the async threads.
async fn flotilla(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BINARY)
            .args(&args)
            .output()
            .expect("run flotilla")
    })
    .await
    .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every key, as of `revision` (0: now).
async fn everything(cluster: &TestCluster, i: usize, revision: i64) -> RangeResponse {
    cluster
        .kv(i)
        .await
        .range(RangeRequest {
            key: vec![0].into(),
            range_end: vec![0].into(),
            revision,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Restores member `i` of `cluster` from `backup`.
async fn restore(cluster: &TestCluster, i: usize, backup: &std::path::Path) -> Output {
    let member = &cluster.members[i];
    flotilla(vec![
        "snapshot".into(),
        "restore".into(),
        backup.display().to_string(),
        "--name".into(),
        member.name.clone(),
        "--data-dir".into(),
        member.data_dir.display().to_string(),
        "--initial-cluster".into(),
        cluster.initial_cluster(),
        "--initial-cluster-token".into(),
        cluster.token.clone(),
        "--initial-advertise-peer-urls".into(),
        member.peer_url(),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_new_cluster_with_every_key_and_revision() {
    let source = TestCluster::start(3, &[]);
    let mut restored = TestCluster::reserve(3, &[]);
    restored.token = "restored-cluster".into();
    bounded(LIMIT, async {
        let leader = source.wait_for_leader(&[0, 1, 2]).await;
        let channel = source.channel(leader).await;
        let mut kv = source.kv(leader).await;
        // History, a compaction, and a key under a lease.
        let lease = grant(&channel).await;
        kv.put(PutRequest {
            key: "leased".into(),
            value: "v".into(),
            lease,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut last = 0;
        for i in 0..200 {
            last = put(&mut kv, &format!("k{:02}", i % 40), &format!("v{i}"))
                .await
                .unwrap();
        }
        let compacted_at = last - 100;
        kv.compact(CompactionRequest {
            revision: compacted_at,
            physical: false,
        })
        .await
        .unwrap();

        // A writer goes on while the backup is taken.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let mut kv = source.kv(leader).await;
            tokio::spawn(async move {
                let mut written = 0;
                while !stop.load(Ordering::Relaxed) {
                    put(&mut kv, &format!("load/{written:05}"), "x")
                        .await
                        .unwrap();
                    written += 1;
                }
                written
            })
        };
        eventually("the writer to start", LIMIT, || async {
            let now = everything(&source, leader, 0).await;
            (now.header.unwrap().revision > last + 20).then_some(())
        })
        .await;
        let backup = source.dir.path().join("backup.db");
        let saved = flotilla(vec![
            "--endpoints".into(),
            source.members[leader].client_url(),
            "snapshot".into(),
            "save".into(),
            backup.display().to_string(),
        ])
        .await;
        assert!(saved.status.success(), "{}", text(&saved));
        // The writer still runs: the backup is one point in its history.
        let at_save_end = everything(&source, leader, 0)
            .await
            .header
            .unwrap()
            .revision;
        eventually("more writes after the backup", LIMIT, || async {
            let now = everything(&source, leader, 0).await;
            (now.header.unwrap().revision > at_save_end + 20).then_some(())
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let written = writer.await.unwrap();

        let status = flotilla(vec![
            "-w".into(),
            "json".into(),
            "snapshot".into(),
            "status".into(),
            backup.display().to_string(),
        ])
        .await;
        assert!(status.status.success(), "{}", text(&status));
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let revision = status["revision"].as_i64().unwrap();
        assert!(revision > last && revision < last + 1 + written, "{status}");
        let expected = everything(&source, leader, revision).await;
        assert_eq!(
            status["totalKey"].as_u64().unwrap() as usize,
            expected.kvs.len()
        );
        assert_eq!(
            status["totalSize"].as_u64().unwrap(),
            std::fs::metadata(&backup).unwrap().len()
        );

        // Three members restored from the one backup form a new cluster.
        for i in 0..3 {
            let output = restore(&restored, i, &backup).await;
            assert!(output.status.success(), "{}", text(&output));
        }
        let initial = restored.initial_cluster();
        for i in 0..3 {
            restored.spawn(i, &initial, "new");
        }
        let new_leader = restored.wait_for_leader(&[0, 1, 2]).await;
        let now = everything(&restored, new_leader, 0).await;
        let header = now.header.unwrap();
        assert_eq!(header.revision, revision);
        assert_ne!(
            header.cluster_id,
            expected.header.unwrap().cluster_id,
            "a restored cluster is a new cluster"
        );
        assert!(now.kvs == expected.kvs, "every key, value and revision");
        // The compaction point and the lease came along.
        let below = restored
            .kv(new_leader)
            .await
            .range(RangeRequest {
                key: "k00".into(),
                revision: compacted_at - 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(below.message().contains("compacted"), "{below:?}");
        let ttl = flotilla_proto::etcdserverpb::lease_client::LeaseClient::new(
            restored.channel(new_leader).await,
        )
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
        assert!(ttl.ttl > 0, "{ttl:?}");
        assert_eq!(ttl.keys, [bytes::Bytes::from("leased")]);

        // It goes on from there, and its members hash alike.
        let mut kv = restored.kv(new_leader).await;
        assert_eq!(
            put(&mut kv, "after-restore", "1").await.unwrap(),
            revision + 1
        );
        let index = restored
            .status(new_leader)
            .await
            .unwrap()
            .raft_applied_index;
        let mut hashes = Vec::new();
        for i in 0..3 {
            restored.wait_applied(i, index).await;
            let hash = MaintenanceClient::new(restored.channel(i).await)
                .hash(HashRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(hash.header.unwrap().revision, revision + 1);
            hashes.push(hash.hash);
        }
        assert!(hashes.iter().all(|&h| h == hashes[0]), "{hashes:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_backups_and_used_directories_are_refused_with_the_reason() {
    let source = TestCluster::start(1, &[]);
    let target = TestCluster::reserve(1, &[]);
    bounded(LIMIT, async {
        source.wait_for_leader(&[0]).await;
        let mut kv = source.kv(0).await;
        for i in 0..20 {
            put(&mut kv, &format!("k{i}"), "v").await.unwrap();
        }
        let backup = source.dir.path().join("backup.db");
        let saved = flotilla(vec![
            "--endpoints".into(),
            source.members[0].client_url(),
            "snapshot".into(),
            "save".into(),
            backup.display().to_string(),
        ])
        .await;
        assert!(saved.status.success(), "{}", text(&saved));
        let good = std::fs::read(&backup).unwrap();

        let damaged = source.dir.path().join("damaged.db");
        let mut bytes = good.clone();
        bytes[good.len() / 2] ^= 0x01;
        std::fs::write(&damaged, &bytes).unwrap();
        let output = restore(&target, 0, &damaged).await;
        assert!(!output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("damaged or truncated"),
            "{}",
            text(&output)
        );
        assert!(
            !target.members[0].data_dir.exists(),
            "a refused restore creates nothing"
        );

        let truncated = source.dir.path().join("truncated.db");
        std::fs::write(&truncated, &good[..good.len() - 1]).unwrap();
        let output = flotilla(vec![
            "snapshot".into(),
            "status".into(),
            truncated.display().to_string(),
        ])
        .await;
        assert!(!output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("a multiple of 512 bytes"),
            "{}",
            text(&output)
        );

        // A directory in use is never overwritten.
        std::fs::create_dir_all(&target.members[0].data_dir).unwrap();
        std::fs::write(target.members[0].data_dir.join("keep"), "x").unwrap();
        let output = restore(&target, 0, &backup).await;
        assert!(!output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("is not empty"),
            "{}",
            text(&output)
        );
        assert_eq!(
            std::fs::read_to_string(target.members[0].data_dir.join("keep")).unwrap(),
            "x"
        );
    })
    .await;
}
