//! `flotilla snapshot restore`: the data directory of one member of a new cluster, made from a
//! backup (as `etcdutl snapshot restore` makes one from an etcd snapshot).
//!
//! Every member of the new cluster is restored from the same backup with its own `--name`
//! and the same `--initial-cluster` and `--initial-cluster-token`. Each gets a new identity
//! (a new cluster id, derived from the members and the token as for any new cluster) and a
//! write-ahead log holding one snapshot: the backup's state with the new member table, at the
//! backup's applied index, term 1, committed. The members then elect a leader and go on from
//! there: every key, value, revision, compaction point, lease and client session of the
//! backup is kept. A lease keeps its TTL and starts counting again once the new cluster has a
//! leader (the time the backup spent on disk is not counted, as in etcd).

use std::path::Path;

use bytes::Bytes;
use flotilla_raft::{
    EntryId, HardState, NODE_NONE, PersistBatch, SnapshotChunk, SnapshotInstall, SnapshotMeta,
};

use crate::ServerConfig;
use crate::backup::{BackupStatus, read_backup};
use crate::members::MemberTable;

/// Creates `config.data_dir` for `config.name` from the backup at `backup`.
pub fn restore_member(config: &ServerConfig, backup: &Path) -> anyhow::Result<BackupStatus> {
    use anyhow::{Context, bail};
    let dir = &config.data_dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "--data-dir {} exists and is not empty: a restore creates a new member's directory",
            dir.display()
        );
    }
    let (mut state, status) =
        read_backup(backup).with_context(|| format!("cannot restore {}", backup.display()))?;
    if status.applied_index == 0 {
        bail!("the backup holds a state that applied nothing: there is nothing to restore");
    }
    let identity = crate::identity::create_new_cluster_member(config)?;
    state.members = MemberTable::from_members(identity.bootstrap_table());
    let mut data = Vec::new();
    state
        .write_snapshot(&mut data)
        .context("cannot encode the restored state")?;

    let storage = crate::storage::open_storage(config, &identity)?;
    let meta = SnapshotMeta {
        last: EntryId {
            term: 1,
            index: status.applied_index,
        },
        membership: identity.bootstrap_membership(),
    };
    let batch = PersistBatch {
        id: 1,
        snapshot_chunks: vec![SnapshotChunk {
            meta: meta.clone(),
            data_bytes: data.len() as u64,
            offset: 0,
            data: Bytes::from(data),
        }],
        snapshot_install: Some(SnapshotInstall {
            keep_through: meta.last.index,
            meta,
        }),
        compact_to: None,
        entries: Vec::new(),
        hard_state: Some(HardState {
            term: 1,
            vote: NODE_NONE,
            commit: status.applied_index,
        }),
    };
    let write = storage
        .write(&batch)
        .and_then(|()| storage.sync().map(drop))
        .and_then(|()| storage.close());
    write
        .map_err(|e| anyhow::anyhow!("cannot write the restored log in {}: {e}", dir.display()))?;
    tracing::info!(
        name = %config.name,
        cluster_id = format_args!("{:x}", identity.cluster_id),
        member_id = format_args!("{:x}", identity.member_id),
        index = status.applied_index,
        revision = status.revision,
        "restored a member's data directory from a backup"
    );
    Ok(status)
}
