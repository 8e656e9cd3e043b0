//! Who this member is and which cluster it belongs to, decided once and kept in the data
//! directory (`member.json`), as etcd does: a restarted member reads it and ignores the
//! initial-cluster flags.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_raft::{Membership, NodeId};
use serde::{Deserialize, Serialize};
use tonic::transport::Endpoint;

use crate::config::{ClusterState, ServerConfig};
use crate::members::{Member, cluster_id, member_id};
use crate::peer_proto::ClusterInfoRequest;
use crate::transport::peer_client;

const IDENTITY_FILE: &str = "member.json";
const IDENTITY_FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub name: String,
    pub member_id: NodeId,
    pub cluster_id: u64,
    pub cluster_token: String,
    /// The members the cluster was created with: every member's state machine starts from
    /// this table.
    pub bootstrap_members: Vec<StoredMember>,
    /// The voters a brand-new cluster starts with; empty for a member that joined.
    pub bootstrap_voters: Vec<NodeId>,
    /// For a member that joined: the members at the time, so it can answer them before its
    /// state machine has caught up with the log that names them.
    #[serde(default)]
    pub peer_hints: Vec<StoredMember>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMember {
    pub id: NodeId,
    pub name: String,
    pub peer_urls: Vec<String>,
}

impl Identity {
    pub fn bootstrap_table(&self) -> Vec<Member> {
        self.bootstrap_members
            .iter()
            .map(|m| Member {
                id: m.id,
                name: m.name.clone(),
                peer_urls: m.peer_urls.clone(),
                client_urls: Vec::new(),
                is_learner: false,
            })
            .collect()
    }

    pub fn bootstrap_membership(&self) -> Membership {
        Membership::with_voters(self.bootstrap_voters.iter().copied())
    }

    pub fn wal_dir(data_dir: &Path) -> PathBuf {
        data_dir.join("wal")
    }
}

/// Reads the identity from the data directory, or decides it (and stores it) for a new member.
pub async fn load_or_create(config: &ServerConfig) -> anyhow::Result<(Identity, bool)> {
    let path = config.data_dir.join(IDENTITY_FILE);
    if path.exists() {
        let identity = read(&path)?;
        check_restart(config, &identity, &path)?;
        return Ok((identity, false));
    }
    let identity = match config.initial_cluster_state {
        ClusterState::New => new_cluster(config)?,
        ClusterState::Existing => join_existing(config).await?,
    };
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    write(&path, &identity)?;
    Ok((identity, true))
}

/// Decides the identity of a member of a brand-new cluster (as `--initial-cluster-state new`
/// does) and stores it in the data directory, for `flotilla snapshot restore`.
pub fn create_new_cluster_member(config: &ServerConfig) -> anyhow::Result<Identity> {
    let identity = new_cluster(config)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    write(&config.data_dir.join(IDENTITY_FILE), &identity)?;
    Ok(identity)
}

fn read(path: &Path) -> anyhow::Result<Identity> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let identity: Identity = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged or not a member file", path.display()))?;
    if identity.format > IDENTITY_FORMAT {
        bail!(
            "{} has format {}, newer than this flotilla reads ({IDENTITY_FORMAT}): upgrade",
            path.display(),
            identity.format
        );
    }
    Ok(identity)
}

/// Written to a temporary file, synced and renamed, so a crash leaves the old file or the new.
fn write(path: &Path, identity: &Identity) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(identity).expect("serialisable");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {}", tmp.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// A restarted member keeps its identity; flags that contradict it are refused, since they
/// mean the data directory is not the one the operator thinks.
fn check_restart(config: &ServerConfig, identity: &Identity, path: &Path) -> anyhow::Result<()> {
    if identity.name != config.name {
        bail!(
            "data directory {} belongs to member {:?} ({:x}) of cluster {:x}, but --name is \
             {:?}: point --data-dir at this member's own directory",
            config.data_dir.display(),
            identity.name,
            identity.member_id,
            identity.cluster_id,
            config.name
        );
    }
    if config.initial_cluster_token_given && identity.cluster_token != config.initial_cluster_token
    {
        bail!(
            "data directory {} belongs to cluster {:x} (token {:?}), but \
             --initial-cluster-token is {:?}: refusing to start on another cluster's data",
            config.data_dir.display(),
            identity.cluster_id,
            identity.cluster_token,
            config.initial_cluster_token
        );
    }
    tracing::info!(
        file = %path.display(),
        member = format!("{:x}", identity.member_id),
        cluster = format!("{:x}", identity.cluster_id),
        "restarting with the identity in the data directory; --initial-cluster flags are ignored"
    );
    Ok(())
}

/// The initial cluster, grouped by name (a member may list several peer URLs).
fn initial_members(config: &ServerConfig) -> Vec<StoredMember> {
    let mut members: Vec<StoredMember> = Vec::new();
    for (name, url) in &config.initial_cluster {
        match members.iter_mut().find(|m| &m.name == name) {
            Some(member) => member.peer_urls.push(url.clone()),
            None => members.push(StoredMember {
                id: 0,
                name: name.clone(),
                peer_urls: vec![url.clone()],
            }),
        }
    }
    for member in &mut members {
        member.id = member_id(&member.peer_urls, &config.initial_cluster_token, 0);
    }
    members
}

fn new_cluster(config: &ServerConfig) -> anyhow::Result<Identity> {
    let members = initial_members(config);
    let Some(me) = members.iter().find(|m| m.name == config.name) else {
        bail!(
            "--initial-cluster has no member named {:?} (--name): it lists {}",
            config.name,
            members
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let mut mine = config.initial_advertise_peer_urls.clone();
    let mut listed = me.peer_urls.clone();
    mine.sort();
    listed.sort();
    if mine != listed {
        bail!(
            "--initial-cluster lists {:?} for {:?}, but --initial-advertise-peer-urls is {:?}",
            listed,
            config.name,
            mine
        );
    }
    let ids: BTreeSet<NodeId> = members.iter().map(|m| m.id).collect();
    if ids.len() != members.len() {
        bail!("--initial-cluster lists the same peer URLs for two members");
    }
    Ok(Identity {
        format: IDENTITY_FORMAT,
        name: config.name.clone(),
        member_id: me.id,
        cluster_id: cluster_id(&ids, &config.initial_cluster_token),
        cluster_token: config.initial_cluster_token.clone(),
        bootstrap_voters: ids.into_iter().collect(),
        bootstrap_members: members,
        peer_hints: Vec::new(),
    })
}

/// Asks the members listed in --initial-cluster for the cluster id and finds this member (added
/// earlier with `member add`) by its peer URLs.
async fn join_existing(config: &ServerConfig) -> anyhow::Result<Identity> {
    let mut failures = Vec::new();
    let tls = crate::tls::dial_peers(config)?;
    for (name, url) in &config.initial_cluster {
        if config.initial_advertise_peer_urls.contains(url) {
            continue;
        }
        let endpoint = Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let channel = flotilla_tls::channel(endpoint, tls.as_ref());
        let info = match channel {
            Ok(channel) => peer_client(channel)
                .cluster_info(ClusterInfoRequest {})
                .await
                .map(|r| r.into_inner()),
            Err(err) => {
                failures.push(format!("{name} at {url}: {err}"));
                continue;
            }
        };
        let info = match info {
            Ok(info) => info,
            Err(status) => {
                failures.push(format!("{name} at {url}: {}", status.message()));
                continue;
            }
        };
        if info.cluster_token != config.initial_cluster_token {
            bail!(
                "{name} at {url} belongs to a cluster with token {:?}, not {:?}",
                info.cluster_token,
                config.initial_cluster_token
            );
        }
        let Some(me) = info.members.iter().find(|m| {
            m.peer_urls
                .iter()
                .any(|u| config.initial_advertise_peer_urls.contains(u))
        }) else {
            bail!(
                "the cluster at {url} has no member with peer URLs {:?}: add this member first \
                 with `flotilla member add {} --peer-urls {}`",
                config.initial_advertise_peer_urls,
                config.name,
                config.initial_advertise_peer_urls.join(",")
            );
        };
        return Ok(Identity {
            format: IDENTITY_FORMAT,
            name: config.name.clone(),
            member_id: me.id,
            cluster_id: info.cluster_id,
            cluster_token: info.cluster_token.clone(),
            bootstrap_members: info
                .bootstrap_members
                .iter()
                .map(|m| StoredMember {
                    id: m.id,
                    name: m.name.clone(),
                    peer_urls: m.peer_urls.clone(),
                })
                .collect(),
            bootstrap_voters: Vec::new(),
            peer_hints: info
                .members
                .iter()
                .map(|m| StoredMember {
                    id: m.id,
                    name: m.name.clone(),
                    peer_urls: m.peer_urls.clone(),
                })
                .collect(),
        });
    }
    bail!(
        "cannot join the existing cluster: no member in --initial-cluster answered ({})",
        failures.join("; ")
    )
}
