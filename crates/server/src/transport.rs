//! The peer transport: long-lived gRPC streams between members carrying Raft messages in
//! batches, one stream per peer for ordinary messages and one for InstallSnapshot chunks (so a
//! snapshot never delays heartbeats), each fed by a bounded queue.
//!
//! Sending never blocks the raft task: a full queue drops the message (Raft tolerates loss)
//! and reports the peer unreachable, so the leader slows down to probing. A broken stream is
//! reported the same way and reconnected with exponential backoff. Every stream carries the
//! cluster id and both member ids; a receiver of another cluster refuses it with a clear log
//! line on both sides, and a member that was removed is told so and stops.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raft::codec;
use flotilla_raft::{Message, MessageBody, NodeId};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use crate::peer_proto::RaftBatch;
use crate::peer_proto::peer_client::PeerClient;
use crate::state_machine::StateMachine;

pub const CLUSTER_ID_HEADER: &str = "flotilla-cluster-id";
pub const FROM_HEADER: &str = "flotilla-from";
pub const TO_HEADER: &str = "flotilla-to";
/// The status text that tells a member it was removed.
pub const REMOVED_MESSAGE: &str = "flotilla: member removed";

/// The largest peer message (a batch, or one snapshot chunk with its envelope).
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Messages queued per peer and stream before new ones are dropped.
const PEER_QUEUE_MESSAGES: usize = 4096;
/// A batch is cut at this many messages or bytes.
const BATCH_MESSAGES_MAX: usize = 512;
const BATCH_BYTES_MAX: usize = 8 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const URL_RECHECK: Duration = Duration::from_secs(1);

pub use flotilla_runtime::TransportEvent;

/// Which of the two streams to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamKind {
    Raft,
    Snapshot,
}

#[derive(Debug)]
struct PeerQueues {
    url: String,
    /// When `url` was last checked against the member table.
    checked_at: Instant,
    raft: mpsc::Sender<Message>,
    snapshot: mpsc::Sender<Message>,
}

/// Routes the raft task's messages to per-peer sender tasks, created on first use from the
/// peer URLs in the member table.
#[derive(Debug)]
pub struct PeerRouter {
    identity: Arc<PeerIdentity>,
    state: Arc<RwLock<StateMachine>>,
    peers: BTreeMap<NodeId, PeerQueues>,
    /// Peer URLs to fall back on for members the state machine does not know yet (a joining
    /// member before it has applied the entries that added the others).
    url_hints: BTreeMap<NodeId, String>,
    events: mpsc::Sender<TransportEvent>,
    shutdown_tx: watch::Sender<bool>,
}

/// Who this member is, as every stream announces.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub cluster_id: u64,
    pub member_id: NodeId,
    /// What this member presents and trusts when it dials a peer's https:// URL.
    pub dial_tls: Option<Arc<flotilla_tls::ClientConfig>>,
    /// With `--experimental-dev-faults`: the peers this member is cut off from, as a network
    /// partition would (`flotilla dev`'s cluster view sets them). `None` otherwise.
    pub cut_off: Option<Arc<CutOff>>,
}

/// The peers a member drops every message to and from (a partition made in the transport,
/// for `flotilla dev`): Raft messages both ways, and requests forwarded between them.
#[derive(Debug, Default)]
pub struct CutOff {
    peers: RwLock<std::collections::BTreeSet<NodeId>>,
}

impl CutOff {
    pub fn set(&self, peers: std::collections::BTreeSet<NodeId>) {
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    fn contains(&self, peer: NodeId) -> bool {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer)
    }
}

impl PeerIdentity {
    /// Messages to and from `peer` are dropped (a dev partition: see [`CutOff`]).
    pub fn is_cut_off_from(&self, peer: NodeId) -> bool {
        self.cut_off.as_ref().is_some_and(|cut| cut.contains(peer))
    }

    /// A lazily connecting channel to a peer (over TLS for an https:// URL).
    pub fn channel(&self, endpoint: Endpoint) -> Result<Channel, String> {
        flotilla_tls::channel(endpoint, self.dial_tls.as_ref()).map_err(|e| e.to_string())
    }

    /// Adds the identity headers to a peer request.
    pub fn stamp(&self, metadata: &mut MetadataMap, to: NodeId) {
        let insert = |metadata: &mut MetadataMap, key: &'static str, value: u64| {
            metadata.insert(key, value.to_string().parse().expect("digits are ASCII"));
        };
        insert(metadata, CLUSTER_ID_HEADER, self.cluster_id);
        insert(metadata, FROM_HEADER, self.member_id);
        insert(metadata, TO_HEADER, to);
    }
}

impl PeerRouter {
    pub fn new(
        identity: PeerIdentity,
        state: Arc<RwLock<StateMachine>>,
        url_hints: BTreeMap<NodeId, String>,
        events: mpsc::Sender<TransportEvent>,
    ) -> PeerRouter {
        PeerRouter {
            identity: Arc::new(identity),
            state,
            peers: BTreeMap::new(),
            url_hints,
            events,
            shutdown_tx: watch::channel(false).0,
        }
    }

    /// Queues a message; false if it was dropped.
    pub fn send(&mut self, msg: Message) -> bool {
        let to = msg.to;
        if self.identity.is_cut_off_from(to) {
            return true; // lost in the (dev) partition, as the network would lose it
        }
        // The member table is consulted for a new peer, and about once a second for a known
        // one (its URL may change with MemberUpdate), not for every message.
        let fresh = self
            .peers
            .get(&to)
            .is_some_and(|queues| queues.checked_at.elapsed() < URL_RECHECK);
        if !fresh {
            self.forget_removed_peers();
            let Some(url) = self.peer_url(to) else {
                tracing::debug!(peer = to, "no address known for peer; dropping a message");
                let _ = self.events.try_send(TransportEvent::Unreachable(to));
                return false;
            };
            match self.peers.get_mut(&to) {
                Some(queues) if queues.url == url => queues.checked_at = Instant::now(),
                _ => {
                    let queues = self.spawn_peer(to, url);
                    self.peers.insert(to, queues);
                }
            }
        }
        let queues = &self.peers[&to];
        let queue = match msg.body {
            MessageBody::Snapshot(_) => &queues.snapshot,
            _ => &queues.raft,
        };
        if queue.try_send(msg).is_err() {
            let _ = self.events.try_send(TransportEvent::Unreachable(to));
            return false;
        }
        true
    }

    /// The peer's URL from the member table, else from the hints; none for a removed member
    /// (the hints still name the initial members, removed ones included).
    fn peer_url(&self, id: NodeId) -> Option<String> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        if state.members.is_removed(id) {
            return None;
        }
        state
            .members
            .get(id)
            .and_then(|member| member.peer_urls.first().cloned())
            .or_else(|| self.url_hints.get(&id).cloned())
    }

    /// Drops the queues of peers removed from the cluster, which ends their sender tasks;
    /// otherwise each would reconnect to the removed member's URL for as long as this member
    /// runs (and, once the URL is reused by a re-added member, be refused every second).
    fn forget_removed_peers(&mut self) {
        let removed: Vec<NodeId> = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            self.peers
                .keys()
                .copied()
                .filter(|&id| state.members.is_removed(id))
                .collect()
        };
        for id in removed {
            tracing::debug!(
                peer = id,
                "peer removed from the cluster; closing its streams"
            );
            self.peers.remove(&id);
        }
    }

    fn spawn_peer(&self, to: NodeId, url: String) -> PeerQueues {
        let (raft_tx, raft_rx) = mpsc::channel(PEER_QUEUE_MESSAGES);
        let (snapshot_tx, snapshot_rx) = mpsc::channel(PEER_QUEUE_MESSAGES);
        for (kind, rx) in [
            (StreamKind::Raft, raft_rx),
            (StreamKind::Snapshot, snapshot_rx),
        ] {
            let sender = PeerSender {
                identity: self.identity.clone(),
                to,
                url: url.clone(),
                kind,
                events: self.events.clone(),
                shutdown: self.shutdown_tx.subscribe(),
            };
            tokio::spawn(sender.run(rx));
        }
        PeerQueues {
            url,
            checked_at: Instant::now(),
            raft: raft_tx,
            snapshot: snapshot_tx,
        }
    }

    /// Stops every sender task.
    pub fn shutdown(&mut self) {
        let _ = self.shutdown_tx.send(true);
        self.peers.clear();
    }
}

impl flotilla_runtime::Transport for PeerRouter {
    fn send(&mut self, msg: Message) -> bool {
        PeerRouter::send(self, msg)
    }

    fn shutdown(&mut self) {
        PeerRouter::shutdown(self);
    }
}

/// One stream to one peer.
struct PeerSender {
    identity: Arc<PeerIdentity>,
    to: NodeId,
    url: String,
    kind: StreamKind,
    events: mpsc::Sender<TransportEvent>,
    shutdown: watch::Receiver<bool>,
}

/// Why a connection ended.
enum Ended {
    /// The queue closed: the router dropped this peer.
    QueueClosed,
    /// The stream failed; reconnect.
    Broken { sent_batches: u64 },
}

impl PeerSender {
    async fn run(self, mut queue: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        let mut shutdown = self.shutdown.clone();
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                ended = self.connection(&mut queue) => ended,
            };
            let sent_batches = match ended {
                Ended::QueueClosed => return,
                Ended::Broken { sent_batches } => sent_batches,
            };
            let _ = self.events.try_send(TransportEvent::Unreachable(self.to));
            // Messages queued for a broken stream are stale by the time it is back.
            while queue.try_recv().is_ok() {}
            if sent_batches > 0 && started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection: opens the stream and pumps batches into it until it breaks.
    async fn connection(&self, queue: &mut mpsc::Receiver<Message>) -> Ended {
        let channel = Endpoint::from_shared(self.url.clone())
            .map_err(|err| err.to_string())
            .and_then(|endpoint| {
                self.identity.channel(
                    endpoint
                        .connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5)),
                )
            });
        let channel = match channel {
            Ok(channel) => channel,
            Err(err) => {
                tracing::error!(peer = self.to, url = %self.url, "cannot dial the peer: {err}");
                return Ended::Broken { sent_batches: 0 };
            }
        };
        let mut client = peer_client(channel);
        let (batches_tx, batches_rx) = mpsc::channel::<RaftBatch>(8);
        let mut request = tonic::Request::new(ReceiverStream::new(batches_rx));
        self.identity.stamp(request.metadata_mut(), self.to);
        let mut call = Box::pin(async move {
            match self.kind {
                StreamKind::Raft => client.raft(request).await,
                StreamKind::Snapshot => client.snapshot(request).await,
            }
        });
        let mut sent_batches = 0;
        loop {
            let permit = tokio::select! {
                result = &mut call => return self.ended(result, sent_batches),
                permit = batches_tx.reserve() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return Ended::Broken { sent_batches },
                },
            };
            let first = tokio::select! {
                result = &mut call => return self.ended(result, sent_batches),
                msg = queue.recv() => match msg {
                    Some(msg) => msg,
                    None => return Ended::QueueClosed,
                },
            };
            permit.send(take_batch(first, queue));
            sent_batches += 1;
        }
    }

    fn ended(
        &self,
        result: Result<tonic::Response<crate::peer_proto::StreamClosed>, tonic::Status>,
        sent_batches: u64,
    ) -> Ended {
        match result {
            Ok(_) => {}
            Err(status) if status.message() == REMOVED_MESSAGE => {
                let _ = self
                    .events
                    .try_send(TransportEvent::Removed { by: self.to });
            }
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                tracing::error!(
                    peer = self.to,
                    url = %self.url,
                    "peer refused this member: {}",
                    status.message()
                );
            }
            Err(status) => {
                tracing::debug!(peer = self.to, url = %self.url, "peer stream ended: {status}");
            }
        }
        Ended::Broken { sent_batches }
    }
}

/// A peer client with the peer message size limits.
pub fn peer_client(channel: Channel) -> PeerClient<Channel> {
    PeerClient::new(channel)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
}

/// Takes `first` and whatever else is queued, within the batch bounds.
fn take_batch(first: Message, queue: &mut mpsc::Receiver<Message>) -> RaftBatch {
    let mut messages = vec![encode(&first)];
    let mut bytes = messages[0].len();
    while messages.len() < BATCH_MESSAGES_MAX && bytes < BATCH_BYTES_MAX {
        match queue.try_recv() {
            Ok(msg) => {
                let encoded = encode(&msg);
                bytes += encoded.len();
                messages.push(encoded);
            }
            Err(_) => break,
        }
    }
    RaftBatch { messages }
}

fn encode(msg: &Message) -> Bytes {
    let mut out = Vec::with_capacity(64 + msg.body.payload_bytes() as usize);
    codec::encode_message(&mut out, msg);
    Bytes::from(out)
}

/// Reads a header the peer identity stamps.
pub fn header_u64(metadata: &MetadataMap, key: &str) -> Option<u64> {
    metadata.get(key)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use flotilla_raft::{AppendRequest, EntryId};

    use super::*;

    fn heartbeat(to: NodeId) -> Message {
        Message {
            from: 1,
            to,
            term: 3,
            body: MessageBody::Heartbeat(flotilla_raft::Heartbeat {
                commit: 5,
                read_round: 0,
            }),
        }
    }

    #[test]
    fn a_batch_takes_what_is_queued_and_decodes_back() {
        let (tx, mut rx) = mpsc::channel(16);
        for _ in 0..3 {
            tx.try_send(heartbeat(2)).unwrap();
        }
        let append = Message {
            body: MessageBody::Append(AppendRequest {
                prev: EntryId::new(3, 4),
                entries: Vec::new(),
                commit: 4,
            }),
            ..heartbeat(2)
        };
        let batch = take_batch(append.clone(), &mut rx);
        assert_eq!(batch.messages.len(), 4);
        let first = codec::decode_message_exact(batch.messages[0].clone()).unwrap();
        assert_eq!(first, append);
        assert!(rx.try_recv().is_err(), "the queue was drained");
    }

    #[test]
    fn a_batch_stops_at_the_message_bound() {
        let (tx, mut rx) = mpsc::channel(BATCH_MESSAGES_MAX + 10);
        for _ in 0..BATCH_MESSAGES_MAX + 5 {
            tx.try_send(heartbeat(2)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let batch = take_batch(first, &mut rx);
        assert_eq!(batch.messages.len(), BATCH_MESSAGES_MAX);
    }

    /// A table of members 1 and 2 (2 at an unused loopback port), with `removed` removed.
    fn member_table(removed: &[NodeId]) -> crate::members::MemberTable {
        use prost::Message as _;
        let member = |id: NodeId, port: u16| crate::peer_proto::MemberInfo {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("http://127.0.0.1:{port}")],
            ..Default::default()
        };
        let state = crate::peer_proto::MemberTableState {
            members: vec![member(1, 9), member(2, 9)],
            removed: removed.to_vec(),
            alarms: Vec::new(),
            auth: None,
        };
        crate::members::MemberTable::decode(&state.encode_to_vec()).unwrap()
    }

    /// Regression (found by `flotilla chaos --nemesis membership`): the sender tasks of a
    /// removed peer lived on, reconnecting to its URL every second for as long as the member
    /// ran, and were refused by the member re-added at that URL.
    #[tokio::test]
    async fn removed_peers_lose_their_streams_and_get_no_new_ones() {
        let state = Arc::new(RwLock::new(StateMachine::new(
            flotilla_kv::Limits::default(),
            member_table(&[]),
        )));
        // Member 3 is known from the initial cluster only (a hint), as a joining member sees it.
        let hints = BTreeMap::from([(3, "http://127.0.0.1:9".to_string())]);
        let (events, _events_rx) = mpsc::channel(64);
        let identity = PeerIdentity {
            cluster_id: 7,
            member_id: 1,
            dial_tls: None,
            cut_off: None,
        };
        let mut router = PeerRouter::new(identity, state.clone(), hints, events);
        assert!(router.send(heartbeat(2)));
        assert!(router.send(heartbeat(3)));
        assert_eq!(router.peers.keys().copied().collect::<Vec<_>>(), [2, 3]);

        // 3 is removed; at 2's next URL check the router drops 3's queues.
        state.write().unwrap().members = member_table(&[3]);
        router.peers.get_mut(&2).unwrap().checked_at = Instant::now() - URL_RECHECK;
        assert!(router.send(heartbeat(2)));
        assert_eq!(router.peers.keys().copied().collect::<Vec<_>>(), [2]);
        // The hint no longer brings it back.
        assert!(!router.send(heartbeat(3)));
        assert!(!router.peers.contains_key(&3));
        router.shutdown();
    }

    #[test]
    fn identity_headers_round_trip() {
        let identity = PeerIdentity {
            cluster_id: u64::MAX,
            member_id: 7,
            dial_tls: None,
            cut_off: None,
        };
        let mut metadata = MetadataMap::new();
        identity.stamp(&mut metadata, 9);
        assert_eq!(header_u64(&metadata, CLUSTER_ID_HEADER), Some(u64::MAX));
        assert_eq!(header_u64(&metadata, FROM_HEADER), Some(7));
        assert_eq!(header_u64(&metadata, TO_HEADER), Some(9));
        assert_eq!(header_u64(&MetadataMap::new(), TO_HEADER), None);
    }
}
