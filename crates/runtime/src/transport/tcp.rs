//! A TCP transport: one connection to each peer, carrying Raft messages in the core's binary
//! encoding ([`flotilla_raft::codec`]), each prefixed by its length, after a hello that names
//! the cluster and both members. Connections are made on the first message to a peer and
//! again after a failure, with backoff; `TCP_NODELAY` is set on both ends, so a small message
//! is never held back waiting for an acknowledgement.
//!
//! It has no encryption and no authentication beyond the cluster id: run it on loopback or a
//! trusted network (the etcd server's gRPC transport has TLS).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use flotilla_raft::codec::{self, Reader};
use flotilla_raft::{Message, NodeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::{Transport, TransportEvent};

const HELLO_MAGIC: &[u8; 8] = b"FLRTTCP1";
const HELLO_BYTES: usize = 8 + 3 * 8;
/// The largest message accepted: a batch of entries or a snapshot chunk is far smaller.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Messages queued per peer before new ones are dropped (and the peer reported unreachable).
const PEER_QUEUE_MESSAGES: usize = 4096;
/// Messages for this member queued before its connections stop being read (back-pressure).
const INBOX_MESSAGES: usize = 8192;
const EVENTS_MAX: usize = 256;
/// Messages written in one go, and bytes: a burst becomes one write.
const WRITE_BATCH_MESSAGES_MAX: usize = 512;
const WRITE_BATCH_BYTES_MAX: usize = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where each member listens. Shared between the application (which adds a member's address
/// before proposing to add the member) and the transport. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct PeerAddresses {
    inner: Arc<RwLock<BTreeMap<NodeId, SocketAddr>>>,
}

impl PeerAddresses {
    /// The members and their addresses.
    pub fn new(addresses: impl IntoIterator<Item = (NodeId, SocketAddr)>) -> PeerAddresses {
        PeerAddresses {
            inner: Arc::new(RwLock::new(addresses.into_iter().collect())),
        }
    }

    /// Sets (or changes) where member `id` listens.
    pub fn set(&self, id: NodeId, address: SocketAddr) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, address);
    }

    /// Where member `id` listens, if known.
    pub fn get(&self, id: NodeId) -> Option<SocketAddr> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
    }
}

/// What a member needs from the transport to start (see [`crate::NodeParts`]).
#[derive(Debug)]
pub struct TcpMember {
    /// The member's transport.
    pub transport: TcpTransport,
    /// Messages for the member.
    pub inbox: mpsc::Receiver<Message>,
    /// What the transport tells the member's raft task.
    pub events: mpsc::Receiver<TransportEvent>,
    /// The address it listens on (the port chosen, if 0 was asked for).
    pub local_addr: SocketAddr,
}

/// One member's side of the TCP transport.
#[derive(Debug)]
pub struct TcpTransport {
    id: NodeId,
    cluster_id: u64,
    addresses: PeerAddresses,
    /// A queue and a sender task per peer, made on the first message to it.
    peers: BTreeMap<NodeId, mpsc::Sender<Message>>,
    events: mpsc::Sender<TransportEvent>,
    shutdown: watch::Sender<bool>,
}

impl TcpTransport {
    /// Listens on `listen` for the members of cluster `cluster_id` and returns member `id`'s
    /// side of the transport. Runs its tasks on the current tokio runtime until
    /// [`Transport::shutdown`] (the node calls it when it stops).
    pub async fn bind(
        cluster_id: u64,
        id: NodeId,
        listen: SocketAddr,
        addresses: PeerAddresses,
    ) -> io::Result<TcpMember> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (inbox_tx, inbox) = mpsc::channel(INBOX_MESSAGES);
        let (events_tx, events) = mpsc::channel(EVENTS_MAX);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let receiving = Receiving {
            cluster_id,
            id,
            inbox: inbox_tx,
            shutdown: shutdown_rx,
        };
        tokio::spawn(receiving.accept(listener));
        Ok(TcpMember {
            transport: TcpTransport {
                id,
                cluster_id,
                addresses,
                peers: BTreeMap::new(),
                events: events_tx,
                shutdown,
            },
            inbox,
            events,
            local_addr,
        })
    }

    fn queue_to(&mut self, to: NodeId) -> &mpsc::Sender<Message> {
        self.peers.entry(to).or_insert_with(|| {
            let (queue_tx, queue) = mpsc::channel(PEER_QUEUE_MESSAGES);
            let sender = Sending {
                hello: hello(self.cluster_id, self.id, to),
                to,
                addresses: self.addresses.clone(),
                events: self.events.clone(),
                shutdown: self.shutdown.subscribe(),
            };
            tokio::spawn(sender.run(queue));
            queue_tx
        })
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, msg: Message) -> bool {
        let to = msg.to;
        if self.queue_to(to).try_send(msg).is_ok() {
            return true;
        }
        let _ = self.events.try_send(TransportEvent::Unreachable(to));
        false
    }

    fn shutdown(&mut self) {
        let _ = self.shutdown.send(true);
        self.peers.clear();
    }
}

fn hello(cluster_id: u64, from: NodeId, to: NodeId) -> [u8; HELLO_BYTES] {
    let mut hello = [0u8; HELLO_BYTES];
    hello[..8].copy_from_slice(HELLO_MAGIC);
    hello[8..16].copy_from_slice(&cluster_id.to_le_bytes());
    hello[16..24].copy_from_slice(&from.to_le_bytes());
    hello[24..32].copy_from_slice(&to.to_le_bytes());
    hello
}

/// One peer's sender task: connects, writes the queue's messages in batches, reconnects after
/// a failure.
struct Sending {
    hello: [u8; HELLO_BYTES],
    to: NodeId,
    addresses: PeerAddresses,
    events: mpsc::Sender<TransportEvent>,
    shutdown: watch::Receiver<bool>,
}

impl Sending {
    async fn run(mut self, mut queue: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let first = tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => return,
                msg = queue.recv() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            match self.stream(first, &mut queue, &mut backoff).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::debug!(peer = self.to, "the connection to the peer failed: {err}");
                    let _ = self.events.try_send(TransportEvent::Unreachable(self.to));
                }
            }
            tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Connects and writes until the queue closes (`Ok`) or the connection fails.
    async fn stream(
        &mut self,
        first: Message,
        queue: &mut mpsc::Receiver<Message>,
        backoff: &mut Duration,
    ) -> io::Result<()> {
        let address = self
            .addresses
            .get(self.to)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for the peer"))?;
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"))??;
        stream.set_nodelay(true)?;
        stream.write_all(&self.hello).await?;
        *backoff = BACKOFF_MIN;
        let mut next = Some(first);
        let mut batch = Vec::new();
        loop {
            let Some(msg) = next.take() else {
                tokio::select! {
                    _ = self.shutdown.wait_for(|stop| *stop) => return Ok(()),
                    msg = queue.recv() => match msg {
                        Some(msg) => next = Some(msg),
                        None => return Ok(()),
                    },
                }
                continue;
            };
            batch.clear();
            encode_frame(&mut batch, &msg);
            for _ in 1..WRITE_BATCH_MESSAGES_MAX {
                if batch.len() >= WRITE_BATCH_BYTES_MAX {
                    break;
                }
                match queue.try_recv() {
                    Ok(msg) => encode_frame(&mut batch, &msg),
                    Err(_) => break,
                }
            }
            stream.write_all(&batch).await?;
        }
    }
}

/// Appends `msg` as a frame: its length (u32, little-endian), then its encoding.
fn encode_frame(out: &mut Vec<u8>, msg: &Message) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    codec::encode_message(out, msg);
    let length = u32::try_from(out.len() - start - 4).expect("a message is under 4 GiB");
    out[start..start + 4].copy_from_slice(&length.to_le_bytes());
}

/// The listener's side: accepts connections and reads their messages into the inbox.
#[derive(Clone)]
struct Receiving {
    cluster_id: u64,
    id: NodeId,
    inbox: mpsc::Sender<Message>,
    shutdown: watch::Receiver<bool>,
}

impl Receiving {
    async fn accept(mut self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let receiving = self.clone();
                    tokio::spawn(async move {
                        if let Err(err) = receiving.read(stream).await {
                            tracing::warn!(%peer, "dropped a peer connection: {err}");
                        }
                    });
                }
                Err(err) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!("cannot accept a peer connection: {err}");
                    tokio::time::sleep(BACKOFF_MAX).await;
                }
            }
        }
    }

    async fn read(mut self, mut stream: TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let mut hello = [0u8; HELLO_BYTES];
        tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut hello))
            .await
            .map_err(|_| invalid("no hello within 5 s".into()))??;
        let from = self.check_hello(&hello)?;
        loop {
            let mut length = [0u8; 4];
            tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => return Ok(()),
                read = stream.read_exact(&mut length) => match read {
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(err) => return Err(err),
                },
            }
            let length = u32::from_le_bytes(length) as usize;
            if length > MESSAGE_BYTES_MAX {
                return Err(invalid(format!(
                    "member {from:x} sent a message of {length} bytes, over the limit of \
                     {MESSAGE_BYTES_MAX}"
                )));
            }
            let mut frame = vec![0u8; length];
            stream.read_exact(&mut frame).await?;
            let mut reader = Reader::new(Bytes::from(frame));
            let msg = codec::decode_message(&mut reader)
                .and_then(|msg| reader.finish("message").map(|()| msg))
                .map_err(|err| invalid(format!("a message from {from:x} is malformed: {err}")))?;
            if msg.from != from || msg.to != self.id {
                return Err(invalid(format!(
                    "a message from {:x} to {:x} on the connection from {from:x} to {:x}",
                    msg.from, msg.to, self.id
                )));
            }
            if self.inbox.send(msg).await.is_err() {
                return Ok(()); // the node stopped
            }
        }
    }

    /// The sender named by a valid hello.
    fn check_hello(&self, hello: &[u8; HELLO_BYTES]) -> io::Result<NodeId> {
        let field = |at: usize| u64::from_le_bytes(hello[at..at + 8].try_into().expect("8 bytes"));
        if &hello[..8] != HELLO_MAGIC {
            return Err(invalid("not a Flotilla runtime peer (bad hello)".into()));
        }
        let (cluster_id, from, to) = (field(8), field(16), field(24));
        if cluster_id != self.cluster_id {
            return Err(invalid(format!(
                "member {from:x} is of cluster {cluster_id:x}, this member of {:x}",
                self.cluster_id
            )));
        }
        if to != self.id {
            return Err(invalid(format!(
                "member {from:x} meant to reach member {to:x}, this is {:x}",
                self.id
            )));
        }
        Ok(from)
    }
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}
