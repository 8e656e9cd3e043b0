//! # flotilla-server: a Flotilla member
//!
//! Turns the pure Raft core (`flotilla-raft`), the durable log and the MVCC state machine
//! (`flotilla-kv`) into a networked member that speaks the etcd v3 gRPC API.
//!
//! - [`node`]: the member's node, `flotilla-runtime`'s (the driver and its tokio shell: raft
//!   task, WAL thread with group commit, apply thread) over the member's state machine.
//! - [`transport`] and [`peer_service`]: the peer protocol (batched Raft streams, a separate
//!   snapshot stream, forwarding, cluster info).
//! - [`services`] and [`frontend`]: the etcd client API; any member serves any request.
//! - [`config`], [`identity`], [`server`]: flags and config file, member and cluster ids in the
//!   data directory, wiring and graceful shutdown; [`metrics`] and [`http`]: observability.

pub mod alarms;
pub mod auth;
pub mod auth_service;
pub mod backup;
pub mod config;
pub mod corruption;
pub mod election_service;
pub mod errors;
pub mod frontend;
pub mod gateway;
pub mod held;
pub mod http;
pub mod identity;
pub mod inherited;
pub mod key_queue;
pub mod lease;
pub mod listener;
pub mod lock_service;
pub mod logging;
pub mod members;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod peer_service;
pub mod range_body;
pub mod range_read;
pub mod restore;
pub mod routing;
pub mod server;
pub mod services;
pub mod state_machine;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod watch;
pub mod write_coalescing;

/// The peer protocol (`flotilla-proto`'s `flotilla/peer/v1/peer.proto`).
pub use flotilla_proto::flotilla::peer::v1 as peer_proto;

pub use config::{ServeArgs, ServerConfig};
pub use server::{Exit, run};
