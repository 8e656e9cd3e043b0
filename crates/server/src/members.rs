//! Member identity and the replicated member table.
//!
//! Ids follow etcd's idea: a member id is a hash of the member's peer URLs and the cluster
//! token (plus, for members added later, the time of the addition, so a removed id is never
//! reused), and the cluster id is a hash of the initial member ids and the token. Both are
//! stored in the data directory, so a restarted member ignores the initial-cluster flags.
//!
//! The member table (names, peer and client URLs, learner flags, removed ids) is part of the
//! replicated state: it changes only by applying log entries (membership entries, whose
//! context carries the added member's attributes, and the server's own commands), and it is
//! saved in the state machine snapshot next to the key-value store.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, Bytes};
use flotilla_raft::{Membership, NodeId};
use prost::Message;

use crate::peer_proto::{MemberInfo, MemberTableState, ServerCommand, server_command};

/// The first byte of a log entry carrying a [`ServerCommand`] rather than a key-value command
/// (whose format byte is 1).
pub const SERVER_COMMAND_FORMAT: u8 = 0x80;

/// FNV-1a, 64 bits: stable across versions and platforms, which ids must be.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate the parts so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Never zero: zero means "no member" to the core.
fn nonzero(id: u64) -> u64 {
    if id == 0 { 1 } else { id }
}

/// The id of a member of the initial cluster.
pub fn member_id(peer_urls: &[String], cluster_token: &str, added_at_unix_nanos: u64) -> NodeId {
    let mut urls: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    let mut parts: Vec<&[u8]> = urls.iter().map(|url| url.as_bytes()).collect();
    parts.push(cluster_token.as_bytes());
    let time = added_at_unix_nanos.to_le_bytes();
    if added_at_unix_nanos != 0 {
        parts.push(&time);
    }
    nonzero(fnv1a(&parts))
}

/// The id of a cluster created with these members.
pub fn cluster_id(member_ids: &BTreeSet<NodeId>, cluster_token: &str) -> u64 {
    let ids: Vec<[u8; 8]> = member_ids.iter().map(|id| id.to_le_bytes()).collect();
    let mut parts: Vec<&[u8]> = ids.iter().map(|id| &id[..]).collect();
    parts.push(cluster_token.as_bytes());
    nonzero(fnv1a(&parts))
}

/// One member as the table knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    /// Empty until the member has started and published its attributes.
    pub name: String,
    pub peer_urls: Vec<String>,
    /// Empty until the member has started and published its attributes.
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

impl Member {
    pub fn to_info(&self) -> MemberInfo {
        MemberInfo {
            id: self.id,
            name: self.name.clone(),
            peer_urls: self.peer_urls.clone(),
            client_urls: self.client_urls.clone(),
            is_learner: self.is_learner,
        }
    }

    pub fn from_info(info: &MemberInfo) -> Member {
        Member {
            id: info.id,
            name: info.name.clone(),
            peer_urls: info.peer_urls.clone(),
            client_urls: info.client_urls.clone(),
            is_learner: info.is_learner,
        }
    }
}

/// The replicated member table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberTable {
    members: BTreeMap<NodeId, Member>,
    removed: BTreeSet<NodeId>,
}

/// Why a table snapshot could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the member table in the snapshot does not decode: {0}")]
pub struct MemberTableDecodeError(String);

impl MemberTableDecodeError {
    pub fn new(reason: String) -> MemberTableDecodeError {
        MemberTableDecodeError(reason)
    }
}

impl MemberTable {
    pub fn from_members(members: impl IntoIterator<Item = Member>) -> MemberTable {
        MemberTable {
            members: members.into_iter().map(|m| (m.id, m)).collect(),
            removed: BTreeSet::new(),
        }
    }

    pub fn get(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn infos(&self) -> Vec<MemberInfo> {
        self.members.values().map(Member::to_info).collect()
    }

    pub fn is_removed(&self, id: NodeId) -> bool {
        self.removed.contains(&id)
    }

    /// The member that uses one of these peer URLs, if any.
    pub fn find_by_peer_url(&self, urls: &[String]) -> Option<&Member> {
        self.members
            .values()
            .find(|m| m.peer_urls.iter().any(|url| urls.contains(url)))
    }

    /// A configuration entry was applied: the configuration decides who is a member and who
    /// learns; the entry's context (a [`MemberInfo`]) names a member being added.
    pub fn apply_membership(&mut self, membership: &Membership, context: &[u8]) {
        let added = (!context.is_empty())
            .then(|| MemberInfo::decode(context).ok())
            .flatten();
        let now = membership.members();
        for id in &now {
            let member = self.members.entry(*id).or_insert_with(|| Member {
                id: *id,
                ..Member::default()
            });
            if let Some(info) = added.as_ref().filter(|info| info.id == *id)
                && member.peer_urls.is_empty()
            {
                member.peer_urls = info.peer_urls.clone();
            }
            member.is_learner = membership.is_learner(*id);
        }
        let gone: Vec<NodeId> = self
            .members
            .keys()
            .filter(|id| !now.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.members.remove(&id);
            self.removed.insert(id);
        }
    }

    /// Applies a server command. Unknown members are ignored: every replica ignores them alike.
    pub fn apply_command(&mut self, command: &ServerCommand) {
        match &command.command {
            Some(server_command::Command::PublishAttributes(info)) => {
                if let Some(member) = self.members.get_mut(&info.id) {
                    member.name = info.name.clone();
                    member.client_urls = info.client_urls.clone();
                }
            }
            Some(server_command::Command::UpdatePeerUrls(info)) => {
                if let Some(member) = self.members.get_mut(&info.id) {
                    member.peer_urls = info.peer_urls.clone();
                }
            }
            // Alarms and auth are the state machine's, beside the table.
            Some(server_command::Command::Alarm(_) | server_command::Command::Auth(_)) | None => {}
        }
    }

    /// The table as the snapshot carries it (the state machine adds the alarms).
    pub fn to_state(&self) -> MemberTableState {
        MemberTableState {
            members: self.infos(),
            removed: self.removed.iter().copied().collect(),
            alarms: Vec::new(),
            auth: None,
        }
    }

    pub fn from_state(state: &MemberTableState) -> MemberTable {
        MemberTable {
            members: state
                .members
                .iter()
                .map(|info| (info.id, Member::from_info(info)))
                .collect(),
            removed: state.removed.iter().copied().collect(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        self.to_state().encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<MemberTable, MemberTableDecodeError> {
        let state =
            MemberTableState::decode(bytes).map_err(|e| MemberTableDecodeError(e.to_string()))?;
        Ok(MemberTable::from_state(&state))
    }
}

/// Encodes a server command as a log entry.
pub fn encode_server_command(command: &ServerCommand) -> Bytes {
    let mut buf = Vec::with_capacity(1 + command.encoded_len());
    buf.put_u8(SERVER_COMMAND_FORMAT);
    command.encode(&mut buf).expect("a Vec grows as needed");
    Bytes::from(buf)
}

/// Decodes a log entry written by [`encode_server_command`]; `None` if it is not one.
pub fn decode_server_command(entry: &[u8]) -> Option<Result<ServerCommand, prost::DecodeError>> {
    match entry.split_first() {
        Some((&SERVER_COMMAND_FORMAT, body)) => Some(ServerCommand::decode(body)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_depend_on_urls_and_token() {
        let urls = vec!["http://127.0.0.1:2380".to_string()];
        let a = member_id(&urls, "token", 0);
        assert_eq!(a, member_id(&urls, "token", 0));
        assert_ne!(a, member_id(&urls, "other", 0));
        assert_ne!(a, member_id(&urls, "token", 5));
        let ids: BTreeSet<_> = [a, 7].into();
        assert_eq!(cluster_id(&ids, "t"), cluster_id(&ids, "t"));
        assert_ne!(cluster_id(&ids, "t"), cluster_id(&ids, "u"));
    }

    #[test]
    fn membership_entries_add_and_remove_members() {
        let mut table = MemberTable::from_members([Member {
            id: 1,
            name: "a".into(),
            peer_urls: vec!["http://a".into()],
            ..Member::default()
        }]);
        let mut membership = Membership::with_voters([1]);
        membership.learners.insert(2);
        let context = MemberInfo {
            id: 2,
            peer_urls: vec!["http://b".into()],
            ..MemberInfo::default()
        }
        .encode_to_vec();
        table.apply_membership(&membership, &context);
        let added = table.get(2).unwrap();
        assert!(added.is_learner);
        assert_eq!(added.peer_urls, vec!["http://b".to_string()]);

        table.apply_membership(&Membership::with_voters([2]), &[]);
        assert!(table.get(1).is_none());
        assert!(table.is_removed(1));
        assert!(!table.get(2).unwrap().is_learner);
        assert_eq!(MemberTable::decode(&table.encode()).unwrap(), table);
    }

    #[test]
    fn server_commands_round_trip_and_kv_commands_are_not_mistaken_for_them() {
        let command = ServerCommand {
            command: Some(server_command::Command::PublishAttributes(MemberInfo {
                id: 3,
                name: "c".into(),
                ..MemberInfo::default()
            })),
        };
        let entry = encode_server_command(&command);
        assert_eq!(decode_server_command(&entry).unwrap().unwrap(), command);
        assert!(decode_server_command(&[1, 2, 3]).is_none());
    }
}
