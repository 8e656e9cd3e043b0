//! An in-process network: members of one process exchange messages through bounded channels.
//! For tests and examples; it can cut members off from each other, as a partition would.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_raft::{Message, NodeId};
use tokio::sync::mpsc;

use super::{Transport, TransportEvent};

/// Messages queued for one member before new ones are dropped.
const INBOX_MESSAGES_MAX: usize = 4096;
/// Events queued for one member's raft task before new ones are dropped.
const EVENTS_MAX: usize = 256;

/// The members of one process and the links between them. Cheap to clone; every clone is the
/// same network.
#[derive(Clone, Debug, Default)]
pub struct LocalNetwork {
    inner: Arc<Mutex<NetworkState>>,
}

#[derive(Debug, Default)]
struct NetworkState {
    /// Each joined member's inbox.
    inboxes: BTreeMap<NodeId, mpsc::Sender<Message>>,
    /// Members whose messages to and from everyone are lost.
    isolated: BTreeSet<NodeId>,
}

/// What a member needs from the network to start (see [`crate::NodeParts`]).
#[derive(Debug)]
pub struct LocalMember {
    /// The member's transport.
    pub transport: LocalTransport,
    /// Messages for the member.
    pub inbox: mpsc::Receiver<Message>,
    /// What the transport tells the member's raft task.
    pub events: mpsc::Receiver<TransportEvent>,
}

/// One member's side of a [`LocalNetwork`].
#[derive(Debug)]
pub struct LocalTransport {
    network: LocalNetwork,
    events: mpsc::Sender<TransportEvent>,
}

enum Dropped {
    Unknown,
    Full,
}

impl LocalNetwork {
    /// An empty network.
    pub fn new() -> LocalNetwork {
        LocalNetwork::default()
    }

    fn state(&self) -> MutexGuard<'_, NetworkState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins member `id`, replacing an earlier member of that id (a restart): messages sent
    /// to `id` go to the new inbox from now on.
    pub fn join(&self, id: NodeId) -> LocalMember {
        let (inbox_tx, inbox) = mpsc::channel(INBOX_MESSAGES_MAX);
        let (events_tx, events) = mpsc::channel(EVENTS_MAX);
        self.state().inboxes.insert(id, inbox_tx);
        LocalMember {
            transport: LocalTransport {
                network: self.clone(),
                events: events_tx,
            },
            inbox,
            events,
        }
    }

    /// Loses every message to and from `id` until [`LocalNetwork::heal`].
    pub fn isolate(&self, id: NodeId) {
        self.state().isolated.insert(id);
    }

    /// Ends every isolation.
    pub fn heal(&self) {
        self.state().isolated.clear();
    }

    /// Delivers `msg`, or loses it if a link is cut; an error if it could not be queued.
    fn deliver(&self, msg: Message) -> Result<(), Dropped> {
        let state = self.state();
        if state.isolated.contains(&msg.from) || state.isolated.contains(&msg.to) {
            return Ok(()); // lost on the wire, as a partition loses it
        }
        let inbox = state.inboxes.get(&msg.to).ok_or(Dropped::Unknown)?;
        inbox.try_send(msg).map_err(|_| Dropped::Full)
    }
}

impl Transport for LocalTransport {
    fn send(&mut self, msg: Message) -> bool {
        let to = msg.to;
        match self.network.deliver(msg) {
            Ok(()) => true,
            Err(Dropped::Unknown | Dropped::Full) => {
                // A full event queue already tells the raft task enough.
                let _ = self.events.try_send(TransportEvent::Unreachable(to));
                false
            }
        }
    }
}
