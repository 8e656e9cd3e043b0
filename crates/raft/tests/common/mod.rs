//! Shared helpers for the core's integration tests: building nodes over in-memory storage,
//! settling a node's output (persist immediately, acknowledge, apply), and a small synchronous
//! network that delivers messages until the cluster is quiet.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use flotilla_raft::*;

/// Election timeout 10 ticks, heartbeat 1 tick, as in the paper tests of etcd and raft-rs.
pub fn config(id: NodeId) -> Config {
    let mut config = Config::new(id);
    config.election_timeout_ticks = 10;
    config.heartbeat_interval_ticks = 1;
    config
}

/// Paper behaviour: no pre-vote, no check-quorum.
pub fn paper_config(id: NodeId) -> Config {
    let mut config = config(id);
    config.pre_vote = false;
    config.check_quorum = false;
    config
}

pub fn voters(ids: &[NodeId]) -> Membership {
    Membership::with_voters(ids.iter().copied())
}

pub fn entry(term: Term, index: Index) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Command(Bytes::from(format!("{term}/{index}"))),
    }
}

pub fn command(term: Term, index: Index, data: &'static str) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Command(Bytes::from_static(data.as_bytes())),
    }
}

/// Storage holding a log whose entry terms are `terms` (index 1 onwards) and a hard state.
pub fn storage_with(members: &[NodeId], terms: &[Term], hard_state: HardState) -> MemStorage {
    let mut storage = MemStorage::new_with_membership(voters(members));
    let entries: Vec<Entry> = terms
        .iter()
        .enumerate()
        .map(|(i, &term)| entry(term, i as u64 + 1))
        .collect();
    storage.append(&entries).unwrap();
    storage.set_hard_state(hard_state);
    storage
}

pub fn new_node(config: Config, storage: MemStorage) -> RaftNode<MemStorage> {
    RaftNode::new(config, storage, 0).unwrap()
}

/// What settling a node produced.
#[derive(Debug, Default)]
pub struct Settled {
    pub messages: Vec<Message>,
    pub applied: Vec<Apply>,
    pub reads: Vec<ReadState>,
    pub reads_failed: Vec<(u64, ReadFailure)>,
    pub role_states: Vec<RoleState>,
    pub persisted: Vec<PersistBatch>,
}

/// Drains the node until quiet, persisting every batch at once and applying everything.
pub fn settle(node: &mut RaftNode<MemStorage>) -> Settled {
    let mut settled = Settled::default();
    for _ in 0..100 {
        let output = node.take_output().unwrap();
        if output.is_empty() {
            return settled;
        }
        settled.messages.extend(output.messages);
        settled.reads.extend(output.reads);
        settled.reads_failed.extend(output.reads_failed);
        settled.role_states.extend(output.role_state);
        if let Some(batch) = output.persist {
            node.storage_mut().persist(&batch).unwrap();
            node.on_persisted(batch.id).unwrap();
            settled.persisted.push(batch);
        }
        if let Some(last) = output.apply.last() {
            let index = last.index();
            settled.applied.extend(output.apply);
            node.on_applied(index).unwrap();
        }
    }
    panic!("node {} never settled", node.id());
}

/// The messages settling produces.
pub fn messages(node: &mut RaftNode<MemStorage>) -> Vec<Message> {
    settle(node).messages
}

/// The entries a node's log holds, as (term, index) pairs.
pub fn log_ids(node: &RaftNode<MemStorage>) -> Vec<EntryId> {
    let last = node.last_id().index;
    let first = node.first_index();
    if first > last {
        return Vec::new();
    }
    node.entries(first, last + 1, u64::MAX)
        .unwrap()
        .iter()
        .map(Entry::id)
        .collect()
}

pub fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

pub fn append(prev: EntryId, entries: Vec<Entry>, commit: Index) -> MessageBody {
    MessageBody::Append(AppendRequest {
        prev,
        entries,
        commit,
    })
}

pub fn accepted(match_index: Index) -> MessageBody {
    MessageBody::AppendResponse(AppendResponse::Accepted { match_index })
}

pub fn vote_request(last_log: EntryId) -> MessageBody {
    MessageBody::Vote(VoteRequest {
        pre_vote: false,
        last_log,
        leadership_transfer: false,
    })
}

pub fn vote_response(granted: bool) -> MessageBody {
    MessageBody::VoteResponse(VoteResponse {
        pre_vote: false,
        granted,
    })
}

pub fn heartbeat(commit: Index) -> MessageBody {
    MessageBody::Heartbeat(Heartbeat {
        commit,
        read_round: 0,
    })
}

pub fn id(term: Term, index: Index) -> EntryId {
    EntryId::new(term, index)
}

/// A synchronous network of nodes: `deliver` runs until no message is in flight.
pub struct Network {
    pub nodes: BTreeMap<NodeId, RaftNode<MemStorage>>,
    /// Links that drop everything, as (from, to).
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Every message delivered, in order, for assertions.
    pub delivered: Vec<Message>,
    /// Everything applied, per node.
    pub applied: BTreeMap<NodeId, Vec<Apply>>,
    pub reads: BTreeMap<NodeId, Vec<ReadState>>,
    pub reads_failed: BTreeMap<NodeId, Vec<(u64, ReadFailure)>>,
    queue: VecDeque<Message>,
}

impl Network {
    pub fn new(ids: &[NodeId], make_config: impl Fn(NodeId) -> Config) -> Self {
        let nodes = ids
            .iter()
            .map(|&id| {
                let storage = MemStorage::new_with_membership(voters(ids));
                (id, new_node(make_config(id), storage))
            })
            .collect();
        Self::from_nodes(nodes)
    }

    pub fn from_nodes(nodes: BTreeMap<NodeId, RaftNode<MemStorage>>) -> Self {
        Self {
            nodes,
            cut: BTreeSet::new(),
            delivered: Vec::new(),
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            reads_failed: BTreeMap::new(),
            queue: VecDeque::new(),
        }
    }

    pub fn node(&mut self, id: NodeId) -> &mut RaftNode<MemStorage> {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Settles every node and queues what they send.
    pub fn settle_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let settled = settle(self.nodes.get_mut(&id).unwrap());
            self.applied.entry(id).or_default().extend(settled.applied);
            self.reads.entry(id).or_default().extend(settled.reads);
            self.reads_failed
                .entry(id)
                .or_default()
                .extend(settled.reads_failed);
            self.queue.extend(settled.messages);
        }
    }

    /// Delivers messages until the network is quiet.
    pub fn deliver(&mut self) {
        for _ in 0..100_000 {
            self.settle_all();
            let Some(msg) = self.queue.pop_front() else {
                return;
            };
            if self.cut.contains(&(msg.from, msg.to)) || !self.nodes.contains_key(&msg.to) {
                continue;
            }
            self.delivered.push(msg.clone());
            self.nodes.get_mut(&msg.to).unwrap().step(msg).unwrap();
        }
        panic!("the network never went quiet");
    }

    pub fn tick(&mut self, id: NodeId, ticks: u64) {
        for _ in 0..ticks {
            self.node(id).tick().unwrap();
        }
        self.deliver();
    }

    pub fn tick_all(&mut self, ticks: u64) {
        for _ in 0..ticks {
            for node in self.nodes.values_mut() {
                node.tick().unwrap();
            }
            self.deliver();
        }
    }

    pub fn campaign(&mut self, id: NodeId) {
        self.node(id).campaign().unwrap();
        self.deliver();
    }

    pub fn propose(&mut self, id: NodeId, data: &'static str) -> EntryId {
        let entry_id = self
            .node(id)
            .propose(Bytes::from_static(data.as_bytes()))
            .unwrap();
        self.deliver();
        entry_id
    }

    pub fn isolate(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.nodes.keys().copied().filter(|&o| o != id).collect();
        for other in others {
            self.cut.insert((id, other));
            self.cut.insert((other, id));
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn leader(&self) -> Option<NodeId> {
        let leaders: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.is_leader())
            .map(|n| n.id())
            .collect();
        match leaders.as_slice() {
            [] => None,
            [one] => Some(*one),
            many => {
                let terms: Vec<Term> = many.iter().map(|id| self.nodes[id].term()).collect();
                assert!(
                    terms.iter().collect::<BTreeSet<_>>().len() == terms.len(),
                    "two leaders in one term: {many:?} {terms:?}"
                );
                // Stale leaders of older terms may linger while partitioned; report the newest.
                many.iter().copied().max_by_key(|id| self.nodes[id].term())
            }
        }
    }

    /// The commands applied on a node, in order.
    pub fn applied_commands(&self, id: NodeId) -> Vec<Bytes> {
        self.applied
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|apply| match apply {
                Apply::Entry(Entry {
                    payload: EntryPayload::Command(data),
                    ..
                }) => Some(data.clone()),
                _ => None,
            })
            .collect()
    }
}
