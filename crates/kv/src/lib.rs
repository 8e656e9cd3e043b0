//! # flotilla-kv: the replicated state machine
//!
//! A deterministic MVCC key-value store with etcd 3.4 semantics (facts in
//! `shared/reference/etcd-api.md` §1 and §3): revisions, versions, ranges, transactions,
//! compaction, leases, watch events, and client sessions for duplicate suppression. It does no
//! I/O and reads no clock: [`KvStore::apply`] is a pure function of the state before it, so
//! every member that applies the same log holds the same state.
//!
//! The server hands each committed Raft entry to [`KvStore::apply`] as an encoded
//! [`Command`], and serves reads ([`KvStore::range`], [`KvStore::read_only_txn`],
//! [`KvStore::events_since`]) from the applied state. Requests and responses are the etcd
//! types of `flotilla-proto`, so client requests pass straight through.
//!
//! ## Design in brief
//!
//! - **Command envelope.** A log entry is one format byte (1) then a protobuf
//!   `flotilla.kv.v1.Command`: an optional client session id and sequence number, and one
//!   operation (Put, DeleteRange, Txn, Compaction, LeaseGrant, LeaseRevoke, LeaseCheckpoint,
//!   RegisterSession, ExpireSessions). Within format 1 the message only ever gains fields and
//!   operations under new numbers; anything else takes a new format byte, and later versions
//!   keep every old decoder. Bytes this version cannot read are a `MalformedCommand` error on
//!   every member alike.
//! - **Limits.** Request sizes and txn operation counts ([`RequestLimits`]) are checked by the
//!   server before proposing ([`validate_command`]), as etcd does; apply checks only what is
//!   independent of configuration, so members never disagree over a log entry.
//! - **Sessions** (Raft thesis §6.3): at most [`SessionLimits::sessions_max`] sessions (one
//!   more evicts the least recently used) and one remembered response per session of at most
//!   [`SessionLimits::session_response_bytes_max`] bytes. A session has one write in flight;
//!   a retry of its last sequence gets the remembered response, an older sequence is refused.
//! - **Snapshots** stream record by record with a CRC-32C trailer ([`KvStore::write_snapshot`],
//!   [`KvStore::restore`]); [`KvStore::digest`] hashes that canonical encoding.
//!
//! ```
//! use flotilla_kv::{Command, KvStore, Limits, Response};
//! use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest};
//!
//! let mut store = KvStore::new(Limits::default());
//! let put = Command::put(PutRequest { key: "greeting".into(), value: "hello".into(), ..Default::default() });
//! let result = store.apply(1, &put.encode());
//! assert!(matches!(result.outcome, Ok(Response::Put(_))));
//! assert_eq!(result.revision, 2); // the store starts at revision 1
//!
//! let read = store.range(&RangeRequest { key: "greeting".into(), ..Default::default() }).unwrap();
//! assert_eq!(read.kvs[0].value, "hello");
//! ```

mod authorize;
mod command;
mod error;
mod key_range;
mod lease;
mod limits;
mod mvcc;
mod quota;
mod range;
mod response;
mod session;
mod snapshot;
mod store;
mod txn;
mod validate;
mod write;

pub use authorize::{AllowAll, Authorizer};
pub use command::{
    Author, COMMAND_FORMAT_V1, ClientRequestId, Command, DecodeError, ExpireSessions,
    LeaseCheckpoint, LeaseRemaining, Operation, Origin, tag_origin,
};
pub use error::{ErrorKind, GrpcCode, KvError};
pub use key_range::KeyRange;
pub use lease::Lease;
pub use limits::{LEASE_TTL_MAX_SECONDS, Limits, RequestLimits, SessionLimits};
pub use mvcc::{EVENT_SCAN_REVISIONS_MAX, EventBatch, VERSION_OVERHEAD_BYTES, version_cost_bytes};
pub use quota::{Admission, LEASE_COST_BYTES, space_cost_bytes};
pub use range::RangePager;
pub use response::{ApplyResult, Response};
pub use session::Session;
pub use snapshot::{SNAPSHOT_FORMAT_V1, SNAPSHOT_MAGIC, SnapshotCursor, SnapshotError};
pub use store::KvStore;
pub use validate::{
    validate_command, validate_delete_range, validate_put, validate_range, validate_txn,
};
