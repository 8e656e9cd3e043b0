//! # flotilla-client: an etcd v3 client for Flotilla
//!
//! [`Client`] speaks the etcd v3 gRPC API to a list of endpoints, so it works against a
//! Flotilla cluster and against etcd alike. It adds what the chaos harness and the CLI need:
//!
//! - **Failover.** Each endpoint has lazily connected channels. A call starts at the
//!   preferred endpoint (or, for writes, the leader, found through `Maintenance.Status` and
//!   `Cluster.MemberList`) and moves to the next on unavailability. Retries are bounded by
//!   [`RetryPolicy`]: a number of attempts and a call timeout, with exponential backoff and
//!   jitter between rounds over the endpoints.
//! - **Duplicate suppression.** Writes (Put, DeleteRange, Txn, Compact) carry a session id
//!   and a sequence number as gRPC metadata (`flotilla.session.v1`). A retry reuses the
//!   number, so the server applies the write once and answers the retry with the first
//!   response. Against a server without sessions (etcd answers `UNIMPLEMENTED` to
//!   `Session.Register`) the client falls back to plain writes and logs so.
//! - **Outcomes.** Every failed call says what became of the request:
//!   [`ClientError::outcome`] is [`Outcome::NotApplied`] or [`Outcome::Unknown`] (or
//!   [`Outcome::Applied`] for a write whose response the server could not keep). `Ok` means
//!   applied.
//!
//! ## The write contract
//!
//! Each attempt's failure is classified (etcd-api.md §3): a definite answer (etcd's error
//! codes) ends the call as *not applied*; "never sent" (connection refused) and refusals
//! before proposal ("no leader", "too many requests", learner) are retried anywhere, as
//! they certainly had no effect; a timeout, a broken connection or "request timed out" /
//! "leader changed" means the attempt *may* have been applied.
//!
//! - **With a session**, such an attempt is retried with the same session and sequence
//!   number, so the call ends with the real outcome unless the retry budget runs out (then
//!   it is *unknown*).
//! - **Without a session** (etcd, or [`SessionPolicy::Plain`]), it is not retried: the call
//!   ends as *unknown* at once, as etcd's own client does.
//! - **A session may vanish** (expired after its TTL without requests, or evicted). If the
//!   server reports it unknown before any attempt of the write may have been applied, the
//!   write moves to a newly registered session and goes on. If an earlier attempt may have
//!   been applied, a retry under a new session could apply it a second time, so the call
//!   ends as *unknown* instead; the session is replaced for later writes.
//! - **One write per session in flight**: the server remembers one response per session, so
//!   writes borrow sessions from a pool ([`SessionPolicy::Sessions`] `pool_size`) and wait
//!   when all are busy. A write abandoned mid-flight (its future dropped) abandons its
//!   session too.
//!
//! Reads are retried after any failure that is not a definite answer. For a history
//! checker, a failed read is simply a failure: reads change nothing.
//!
//! ## Extension points
//!
//! Unary calls go through one retry loop (`Client::execute`, crate-internal) given a
//! `CallKind` and a closure that sends one attempt; new typed methods (leases in
//! issue 8) are a few lines each. Streams (watch, lease keep-alive) can start from
//! [`Client::channel`].
//!
//! The [`cli`] module holds the client commands of the `flotilla` binary and `flotilla
//! bench`.

pub mod cli;
mod client;
mod config;
mod endpoint;
mod error;
mod session;

pub use client::{Client, EndpointStatus, LeaderInfo};
pub use config::{ClientConfig, Credentials, RetryPolicy, SessionPolicy};
pub use endpoint::normalize_url;
pub use error::{ClientError, Outcome};
pub use session::{SessionMode, SessionTag};

/// The `range_end` that selects every key starting with a prefix (etcd's convention).
pub use flotilla_proto::prefix_range_end;
