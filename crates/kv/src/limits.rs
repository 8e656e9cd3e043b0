//! Size and count limits.
//!
//! Two kinds, kept apart on purpose:
//!
//! - [`RequestLimits`] are checked by the server *before* it proposes a request
//!   ([`crate::validate`]), as etcd checks them in its gRPC layer. Apply does not check them:
//!   if it did, raising a limit on one member at a time (a rolling configuration change) would
//!   make members disagree about the same log entry.
//! - [`SessionLimits`] shape the replicated state itself (which session is evicted), so they
//!   must be the same on every member, like the command format.

/// etcd's largest lease TTL, in seconds (etcd-api.md §1.6).
pub const LEASE_TTL_MAX_SECONDS: i64 = 9_000_000_000;

/// Limits on client requests, checked before proposing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// etcd's `--max-request-bytes`, default 1.5 MiB.
    pub request_bytes_max: usize,
    /// etcd has no key limit of its own beyond the request size; neither does the default.
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    /// etcd's `--max-txn-ops`, default 128: the longest of a txn's compare, success and
    /// failure lists (nested txns get what the outer one leaves).
    pub txn_ops_max: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        let request_bytes_max = 3 * 1024 * 1024 / 2;
        RequestLimits {
            request_bytes_max,
            key_bytes_max: request_bytes_max,
            value_bytes_max: request_bytes_max,
            txn_ops_max: 128,
        }
    }
}

/// Bounds on duplicate-suppression state. Must be equal on every member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Registering a session beyond this evicts the least recently used one.
    pub sessions_max: usize,
    /// A remembered response larger than this (encoded) is replaced by the fact that the
    /// request was applied, so one session holds at most about this many bytes.
    pub session_response_bytes_max: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            // Worst case 4096 x 16 KiB = 64 MiB of remembered responses.
            sessions_max: 4 * 1024,
            session_response_bytes_max: 16 * 1024,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub request: RequestLimits,
    pub sessions: SessionLimits,
}
