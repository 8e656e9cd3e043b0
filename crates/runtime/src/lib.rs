#![deny(missing_docs)]
//! # flotilla-runtime: Raft for your own state machine
//!
//! Runs the Flotilla Raft core ([`flotilla_raft`], re-exported as [`raft`]) for any
//! application: bring a [`StateMachine`], pick a storage and a transport, call [`start`], and
//! use the [`NodeHandle`] it gives you to propose commands, read linearizably, change the
//! membership and hand leadership over. The etcd-compatible server of this workspace is one
//! application built this way, through this API only.
//!
//! ```text
//!   ticker ─┐                    ┌─► WAL thread: write batches, one fsync for all ─► persisted
//!   peers ──┼─► raft task ───────┼─► transport (at once, in parallel with the fsync)
//!   handle ─┘   (the core)       └─► apply thread: your state machine, answer proposals ─► applied
//! ```
//!
//! ## A replicated counter in one process
//!
//! ```
//! use std::sync::{Arc, RwLock};
//! use std::time::{Duration, Instant};
//! use flotilla_runtime::{
//!     Config, Index, LocalNetwork, MemDurable, Membership, NoMetrics, NodeOptions, NodeParts,
//!     SmallStateMachine, raft::MemStorage,
//! };
//!
//! /// Adds each command's length to a total.
//! #[derive(Default)]
//! struct Counter { applied: Index, total: u64 }
//!
//! impl SmallStateMachine for Counter {
//!     type Output = u64;
//!     fn applied_index(&self) -> Index { self.applied }
//!     fn apply_command(&mut self, index: Index, command: &[u8]) -> u64 {
//!         self.applied = index;
//!         self.total += command.len() as u64;
//!         self.total
//!     }
//!     fn apply_other(&mut self, index: Index) -> u64 { self.applied = index; self.total }
//!     fn snapshot(&self) -> Vec<u8> {
//!         [self.applied.to_le_bytes(), self.total.to_le_bytes()].concat()
//!     }
//!     fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
//!         let field = |at: usize| bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
//!         self.applied = field(0).ok_or("no applied index")?;
//!         self.total = field(8).ok_or("no total")?;
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let network = LocalNetwork::new();
//! let mut members = Vec::new();
//! for id in [1, 2, 3] {
//!     let joined = network.join(id);
//!     let (stop, shutdown) = tokio::sync::watch::channel(false);
//!     let storage = MemDurable::new(MemStorage::new_with_membership(Membership::with_voters([1, 2, 3])));
//!     let running = flotilla_runtime::start(NodeParts {
//!         options: NodeOptions { tick: Duration::from_millis(10), ..NodeOptions::new(Config::new(id)) },
//!         storage: Arc::new(storage),
//!         state: Arc::new(RwLock::new(Counter::default())),
//!         transport: joined.transport,
//!         inbox: joined.inbox,
//!         transport_events: joined.events,
//!         metrics: Arc::new(NoMetrics),
//!         shutdown,
//!     })
//!     .unwrap();
//!     members.push((running, stop));
//! }
//! // Wait for a leader, then propose through it.
//! let deadline = Instant::now() + Duration::from_secs(10);
//! let status = members[0].0.handle.wait_for(deadline, |s| s.leader.is_some()).await.unwrap();
//! let leader = &members[status.leader.unwrap() as usize - 1].0.handle;
//! assert_eq!(leader.propose("four".into(), deadline).await.unwrap(), 4);
//! assert_eq!(leader.propose("two".into(), deadline).await.unwrap(), 7);
//! // A linearizable read on any member: confirm with a quorum, then read the local state.
//! let follower = &members.iter().find(|(m, _)| m.handle.id() != leader.id()).unwrap().0.handle;
//! follower.read_index(deadline).await.unwrap();
//! assert_eq!(follower.state.read().unwrap().total, 7);
//! for (running, stop) in members {
//!     stop.send(true).unwrap();
//!     running.join().await.unwrap();
//! }
//! # });
//! ```
//!
//! The examples go further: `examples/replicated_hash_map.rs` (three processes over TCP with
//! write-ahead logs; `cargo run -p flotilla-runtime --example replicated_hash_map -- demo`),
//! `examples/lock_service.rs` (fencing tokens, its own snapshot format, sessions), and
//! `tests/hash_map_in_process.rs`, a template for testing your state machine in one process.
//!
//! ## A guided tour
//!
//! **Roles and terms** (§5.1–5.2). Every member starts as a follower. A follower that hears
//! from no leader for an election timeout (drawn at random in `[T, 2T)` ticks, so that
//! members rarely time out together) first asks a pre-vote round whether it could win
//! (thesis §9.6, so a member cut off and rejoining does not disrupt the cluster), then
//! becomes a candidate in a new term and asks for votes; a member grants one vote per term,
//! only to a candidate whose log is at least as up to date as its own. A majority makes a
//! leader. A leader that stops hearing from a majority steps down (check-quorum).
//! [`NodeStatus`] shows the role, term and leader; [`NodeHandle::role_watch`] waits for them.
//!
//! **Proposals.** Only the leader appends to the log. [`NodeHandle::propose`] on a follower
//! is refused with [`Refusal::NotLeader`], naming the leader it knows: send it there (the
//! examples answer clients with a redirect). The leader appends the command, replicates it,
//! and the entry commits once a majority has it durably in its log, an entry of the
//! leader's own term included (§5.3–5.4); the proposal's future resolves with your state
//! machine's output once this member has applied it.
//!
//! **The output batch and what is persisted before what.** The core does no I/O; after each
//! input it hands out a batch of effects whose contract is documented on
//! [`raft::Output`]: write `persist` and fsync it before acknowledging it; send `messages`
//! at once (the core itself holds back what depends on unpersisted state: a vote, an append
//! acknowledgement, the leader counting itself); apply `apply` in order; answer `reads`. The
//! runtime carries this out: the raft task sends, the WAL thread writes and syncs a group of
//! batches with one fsync, the apply thread applies. Your storage must make a batch's steps
//! durable in order ([`conformance::storage`] checks it).
//!
//! **Reads.** [`NodeHandle::read_index`] waits until the local state machine reflects every
//! write acknowledged before the call (ReadIndex, thesis §6.4): then read
//! [`NodeHandle::state`]. Reading the state without it is a serializable read, possibly
//! stale. With lease reads on ([`raft::Config::lease_reads`] and
//! [`NodeOptions::lease_duration`]) the leader skips the quorum round while its lease holds,
//! trusting bounded clock drift.
//!
//! **Duplicates.** A proposal that timed out may still apply. [`Sessions`] wraps your state
//! machine so that a client's numbered commands apply at most once, and a retry gets the
//! first outcome (thesis §6.3).
//!
//! **Membership** (§6). [`NodeHandle::propose_membership`] adds voters and learners,
//! promotes and removes members by joint consensus; a change is refused while another is in
//! progress. A removed member stops ([`NodeStatus::removed`]). Transports learn new
//! members' addresses from you ([`PeerAddresses::set`] before proposing the addition).
//!
//! **Snapshots** (§7). When the log grows past the snapshot policy, the apply thread pins
//! the state ([`StateMachine::begin_snapshot`]) and encodes it in steps beside apply, and
//! the core compacts the log behind it. A member too far behind receives the snapshot and
//! restores it ([`StateMachine::restore`]).
//!
//! **Leadership transfer** (thesis §3.10). [`NodeHandle::transfer_leader`] hands leadership
//! to a caught-up follower, for maintenance without an election timeout's pause.
//!
//! **Shutdown.** Send `true` on the shutdown channel and await [`RunningNode::join`]: waiting
//! proposals fail with [`Refusal::Stopped`], the WAL is synced and closed.
//!
//! **Checking your parts.** [`conformance::state_machine::run_suite`] checks determinism and
//! snapshots of your state machine; [`conformance::storage::run_suite`] checks a storage of
//! your own. Each is one line in a test.

pub mod conformance;
pub mod driver;
pub mod metrics;
pub mod node;
mod read_lease;
pub mod sessions;
pub mod state_machine;
pub mod storage;
pub mod transport;

pub use flotilla_raft as raft;
pub use flotilla_raft::{ConfChange, Config, Entry, EntryPayload, Index, Membership, NodeId, Role};

pub use driver::{Driver, Refusal};
pub use metrics::{NoMetrics, NodeMetrics};
pub use node::{
    NodeError, NodeHandle, NodeOptions, NodeParts, NodeStatus, RoleStatus, RunningNode, StartError,
    start,
};
pub use read_lease::lease_duration;
pub use sessions::{RememberedOutput, SessionClient, SessionReply, Sessions};
pub use state_machine::{Origin, SmallStateMachine, StateMachine};
pub use storage::{DurableStorage, MemDurable, SnapshotReader, StorageFailure, open_wal};
pub use transport::{
    LocalMember, LocalNetwork, LocalTransport, PeerAddresses, TcpMember, TcpTransport, Transport,
    TransportEvent,
};
