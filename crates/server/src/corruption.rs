//! etcd's corruption checks: members that applied the same log must hold the same key-value
//! state, and one that does not must stop serving it.
//!
//! - **At start** (`--experimental-initial-corrupt-check`): once the member has applied the
//!   log it had on disk, it asks each peer for `HashKV` at its own revision; a peer with the
//!   same compaction point and another hash means this member's state (or theirs) diverged.
//!   Unless the members agreeing with this one (itself included) outnumber those that
//!   disagree, the member refuses to start, before it serves any client.
//! - **Periodically** (`--experimental-corrupt-check-time`): the leader asks every member for
//!   `HashKV` at the leader's revision, and raises the CORRUPT alarm (through the log) for a
//!   member whose hash differs with the same compaction point, or for itself if its own hash
//!   of the same revision changed meanwhile. Under CORRUPT every member refuses every client
//!   command (see [`crate::alarms`]), and the member it names serves no reads either, until
//!   an operator clears it.
//!
//! Members that cannot answer (down, behind the revision, compacted past it) are skipped, as
//! in etcd: the check compares only what is comparable.

use std::sync::Arc;
use std::time::Duration;

use crate::peer_proto::peer_client::PeerClient;
use flotilla_proto::etcdserverpb::alarm_request::AlarmAction;
use flotilla_proto::etcdserverpb::{AlarmRequest, AlarmType, HashKvRequest};
use flotilla_raft::NodeId;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::frontend::Frontend;
use crate::members::encode_server_command;
use crate::peer_proto::{ServerCommand, server_command};

/// How long one peer gets to answer `HashKV`.
const PEER_HASH_TIMEOUT: Duration = Duration::from_secs(5);

/// A member's key-value hash at one revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    pub revision: i64,
    pub compacted_revision: i64,
}

/// Whether this member may start: the members holding its hash (itself included) must
/// outnumber the comparable peers holding another. etcd refuses on any difference, so one
/// corrupt member kept every healthy one from restarting; here the corrupt one refuses (every
/// comparable peer disagrees with it) and the periodic check raises its alarm.
pub fn may_start(local: &KvHash, peers: &[(NodeId, KvHash)]) -> bool {
    let disagreeing = diverged(local, peers).len();
    let agreeing = peers
        .iter()
        .filter(|(_, peer)| {
            peer.revision == local.revision
                && peer.compacted_revision == local.compacted_revision
                && peer.hash == local.hash
        })
        .count();
    agreeing + 1 > disagreeing
}

/// The members whose hash of `local.revision` differs from `local`'s at the same compaction
/// point. Peers that hashed another revision or another compaction are not comparable.
pub fn diverged(local: &KvHash, peers: &[(NodeId, KvHash)]) -> Vec<NodeId> {
    peers
        .iter()
        .filter(|(_, peer)| {
            peer.revision == local.revision
                && peer.compacted_revision == local.compacted_revision
                && peer.hash != local.hash
        })
        .map(|(id, _)| *id)
        .collect()
}

/// This member's hash at `revision` (0: the current one).
fn local_hash(frontend: &Frontend, revision: i64) -> Option<KvHash> {
    let state = frontend
        .node
        .state
        .read()
        .unwrap_or_else(|p| p.into_inner());
    let (hash, revision) = state.kv.hash_kv(revision).ok()?;
    Some(KvHash {
        hash,
        revision,
        compacted_revision: state.kv.compacted_revision(),
    })
}

/// Every other member's hash at `revision`, from those that answer.
async fn peer_hashes(frontend: &Frontend, revision: i64) -> Vec<(NodeId, KvHash)> {
    let me = frontend.identity.member_id;
    let peers: Vec<NodeId> = {
        let state = frontend
            .node
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner());
        state
            .members
            .members()
            .filter(|m| m.id != me)
            .map(|m| m.id)
            .collect()
    };
    let mut asks = tokio::task::JoinSet::new();
    for id in peers {
        let client = frontend.peer(id);
        let mut request = tonic::Request::new(HashKvRequest { revision });
        frontend.identity.stamp(request.metadata_mut(), id);
        asks.spawn(async move { (id, ask_hash(client, request).await) });
    }
    let mut hashes = Vec::new();
    while let Some(answer) = asks.join_next().await {
        match answer {
            Ok((id, Ok(hash))) => hashes.push((id, hash)),
            Ok((id, Err(reason))) => {
                tracing::debug!(
                    peer = format_args!("{id:x}"),
                    "no hash from a peer: {reason}"
                );
            }
            Err(e) => tracing::warn!("a peer hash request failed: {e}"),
        }
    }
    hashes.sort_unstable_by_key(|(id, _)| *id);
    hashes
}

/// A peer's hash, asked on its peer URL (with the peer TLS and the cluster's identity, so
/// no client credentials are needed when auth is on).
async fn ask_hash(
    client: Result<PeerClient<Channel>, tonic::Status>,
    request: tonic::Request<HashKvRequest>,
) -> Result<KvHash, String> {
    let mut client = client.map_err(|status| status.message().to_string())?;
    let asked = client.hash_kv(request);
    let response = tokio::time::timeout(PEER_HASH_TIMEOUT, asked)
        .await
        .map_err(|_| format!("no answer within {PEER_HASH_TIMEOUT:?}"))?
        .map_err(|status| status.message().to_string())?
        .into_inner();
    Ok(KvHash {
        hash: response.hash,
        revision: response.hash_revision,
        compacted_revision: response.compact_revision,
    })
}

/// The check at start: waits until the log on disk is applied, then compares with the peers.
/// An error names the peer and both hashes; the member must not serve.
pub async fn initial_check(frontend: &Frontend) -> anyhow::Result<()> {
    let me = frontend.identity.member_id;
    let committed = frontend.node.status().commit;
    let deadline = std::time::Instant::now() + frontend.request_timeout * 12;
    frontend
        .node
        .wait_for(deadline, |s| s.applied >= committed || s.stopped)
        .await
        .ok_or_else(|| {
            anyhow::anyhow!("the initial corruption check: the log on disk was not applied in time")
        })?;
    let Some(local) = local_hash(frontend, 0) else {
        anyhow::bail!("the initial corruption check: this member cannot hash its own state");
    };
    let peers = peer_hashes(frontend, local.revision).await;
    if peers.is_empty() {
        tracing::warn!(
            revision = local.revision,
            "the initial corruption check: no peer answered; starting without a comparison"
        );
        return Ok(());
    }
    let disagreeing = diverged(&local, &peers);
    let starting = may_start(&local, &peers);
    if !disagreeing.is_empty() && starting {
        tracing::error!(
            revision = local.revision,
            "the initial corruption check: members {} hash differently from this member and \
             the others; starting (the periodic check raises their CORRUPT alarm)",
            disagreeing
                .iter()
                .map(|id| format!("{id:x}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(peer) = disagreeing.first().filter(|_| !starting) {
        let theirs = peers.iter().find(|(id, _)| id == peer).map(|(_, h)| h.hash);
        anyhow::bail!(
            "{me:x} found data inconsistency with peers: at revision {} (compacted at {}) \
             member {peer:x} hashes {:08x}, this member {:08x}; not starting",
            local.revision,
            local.compacted_revision,
            theirs.unwrap_or_default(),
            local.hash
        );
    }
    tracing::info!(
        revision = local.revision,
        peers = peers.len(),
        "the initial corruption check found every peer consistent"
    );
    Ok(())
}

/// The leader's periodic check, every `interval`, until the task is dropped.
pub async fn run_periodic_check(frontend: Arc<Frontend>, interval: Duration) {
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let me = frontend.identity.member_id;
        if frontend.node.status().leader != Some(me) {
            continue;
        }
        for id in check_once(&frontend).await {
            raise_corrupt(&frontend, id).await;
        }
    }
}

/// One comparison from the leader: the members to raise CORRUPT for.
async fn check_once(frontend: &Frontend) -> Vec<NodeId> {
    let Some(before) = local_hash(frontend, 0) else {
        return Vec::new();
    };
    let peers = peer_hashes(frontend, before.revision).await;
    let mut corrupt = diverged(&before, &peers);
    // The leader's own hash of the same revision must not have changed meanwhile.
    if let Some(after) = local_hash(frontend, before.revision)
        && !diverged(&before, &[(frontend.identity.member_id, after)]).is_empty()
    {
        corrupt.push(frontend.identity.member_id);
    }
    {
        let state = frontend
            .node
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner());
        corrupt.retain(|&id| !state.alarms.names(id, AlarmType::Corrupt));
    }
    if !corrupt.is_empty() {
        tracing::error!(
            revision = before.revision,
            hash = format_args!("{:08x}", before.hash),
            ?peers,
            "the corruption check found members whose key-value state differs: {}",
            corrupt
                .iter()
                .map(|id| format!("{id:x}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    corrupt
}

async fn raise_corrupt(frontend: &Frontend, member_id: NodeId) {
    let command = ServerCommand {
        command: Some(server_command::Command::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id,
            alarm: AlarmType::Corrupt as i32,
        })),
    };
    if let Err(status) = frontend.write(encode_server_command(&command), 0).await {
        tracing::warn!("could not raise the CORRUPT alarm: {status}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(hash: u32, revision: i64, compacted_revision: i64) -> KvHash {
        KvHash {
            hash,
            revision,
            compacted_revision,
        }
    }

    #[test]
    fn only_comparable_hashes_that_differ_are_divergence() {
        let local = hash(7, 10, 4);
        let peers = [
            (1, hash(7, 10, 4)), // agrees
            (2, hash(8, 10, 4)), // differs at the same point: diverged
            (3, hash(8, 10, 6)), // compacted elsewhere: not comparable
            (4, hash(8, 9, 4)),  // another revision: not comparable
        ];
        assert_eq!(diverged(&local, &peers), vec![2]);
        assert!(diverged(&local, &[]).is_empty());
    }

    #[test]
    fn a_member_starts_only_if_its_hash_holds_a_majority_of_the_comparable() {
        let local = hash(7, 10, 4);
        let agree = hash(7, 10, 4);
        let differ = hash(8, 10, 4);
        let elsewhere = hash(8, 10, 6);
        assert!(may_start(&local, &[]));
        assert!(may_start(&local, &[(1, agree), (2, differ)]));
        assert!(may_start(
            &local,
            &[(1, agree), (2, agree), (3, differ), (4, differ)]
        ));
        assert!(may_start(&local, &[(1, elsewhere)]));
        assert!(!may_start(&local, &[(1, differ)]));
        assert!(!may_start(&local, &[(1, differ), (2, differ)]));
        assert!(!may_start(&local, &[(1, agree), (2, differ), (3, differ)]));
    }
}
