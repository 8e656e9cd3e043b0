//! What a request's failure means for the caller, and how the retry loop reads each failed
//! attempt.
//!
//! The chaos harness (and anyone recording a history) needs three outcomes for a write:
//! applied, not applied, or unknown. [`ClientError::outcome`] gives the last two (a returned
//! response is the first). The classification of single attempts ([`classify`]) is what lets
//! the retry loop stay safe: an attempt that *might* have reached the state machine is only
//! retried when a session makes the retry idempotent.

use std::error::Error as _;

use tonic::{Code, Status};

/// What became of a request, as a history checker records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request took effect (for a write: applied exactly once).
    Applied,
    /// The request definitely did not take effect.
    NotApplied,
    /// The request may or may not have taken effect (a timeout or a broken connection after
    /// it was sent, with no session to make a retry safe).
    Unknown,
}

/// Errors of [`crate::Client`] calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with a definite error (etcd's gRPC code and text, such as
    /// "etcdserver: mvcc: required revision has been compacted"). Nothing was applied.
    #[error("{}", .0.message())]
    Rejected(Status),
    /// Every attempt failed before the request could take effect (endpoints unreachable, no
    /// leader, overloaded) until the retry budget ran out. Nothing was applied.
    #[error("{message}")]
    Unavailable { message: String, attempts: u32 },
    /// A write was sent but its outcome could not be learned: it may or may not have been
    /// applied. See the crate documentation for when this happens.
    #[error("outcome unknown: {reason}")]
    OutcomeUnknown { reason: String, attempts: u32 },
    /// A retried write had already been applied, but the server no longer keeps its response
    /// (it was larger than a session may remember). The write took effect exactly once.
    #[error("the write was applied, but its response was too large for the server to keep")]
    AppliedResponseLost,
    /// An endpoint that is not `host:port` or `http://host:port`.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// The client was configured without endpoints.
    #[error("no endpoints given")]
    NoEndpoints,
    /// The TLS settings do not load (a missing file, a key that does not match).
    #[error("TLS: {0}")]
    Tls(String),
    /// No member reported a leader (for calls that must reach it, like move-leader).
    #[error("no leader found among the endpoints: {0}")]
    NoLeader(String),
}

impl ClientError {
    /// Whether the failed request took effect. Reads never do, so for them this is only a
    /// statement about retries.
    pub fn outcome(&self) -> Outcome {
        match self {
            ClientError::OutcomeUnknown { .. } => Outcome::Unknown,
            ClientError::AppliedResponseLost => Outcome::Applied,
            ClientError::Rejected(_)
            | ClientError::Unavailable { .. }
            | ClientError::InvalidEndpoint { .. }
            | ClientError::Tls(_)
            | ClientError::NoEndpoints
            | ClientError::NoLeader(_) => Outcome::NotApplied,
        }
    }

    /// The server's status, when the error is a definite answer from it.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Rejected(status) => Some(status),
            _ => None,
        }
    }
}

/// Message texts (etcd's, etcd-api.md §3.1) of `Unavailable`/`ResourceExhausted` answers given
/// before a request is proposed, so the request was certainly not applied.
const REFUSED_BEFORE_PROPOSAL: &[&str] = &[
    "etcdserver: no leader",
    "etcdserver: rpc not supported for learner",
    "etcdserver: too many requests",
    "etcdserver: not capable",
];

/// Texts of Flotilla's session errors (flotilla-kv `ErrorKind`), all `FailedPrecondition`.
pub(crate) const SESSION_NOT_FOUND_PREFIX: &str = "flotilla: client session not found";
const STALE_SEQUENCE_PREFIX: &str = "flotilla: request sequence number is older";
const RESPONSE_NOT_RETAINED_PREFIX: &str = "flotilla: request was already applied";

/// How the retry loop treats one failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AttemptFailure {
    /// A definite answer: stop and report it. Nothing was applied.
    Final,
    /// The request did not take effect (never sent, or refused before proposal); trying again
    /// elsewhere or later is safe for any request.
    NotApplied,
    /// The request may have taken effect: retrying is safe only for reads and for writes
    /// carrying a session.
    MaybeApplied,
    /// The session is unknown to the server (expired, evicted or never registered).
    SessionNotFound,
    /// The session has already moved past this sequence number.
    StaleSequence,
    /// Applied before, response not kept.
    ResponseNotRetained,
    /// The token is void ("invalid auth token") or older than the server's auth store
    /// ("revision of auth store is old"): nothing was applied; authenticate again and retry.
    CredentialsStale,
}

/// etcd's texts on which its clients authenticate again.
pub(crate) const INVALID_AUTH_TOKEN: &str = "etcdserver: invalid auth token";
pub(crate) const AUTH_OLD_REVISION: &str = "etcdserver: revision of auth store is old";

/// Reads one failed attempt's status. Pure, so every rule is unit-tested.
pub(crate) fn classify(status: &Status) -> AttemptFailure {
    if was_never_sent(status) {
        return AttemptFailure::NotApplied;
    }
    let message = status.message();
    match status.code() {
        Code::Unavailable | Code::ResourceExhausted
            if REFUSED_BEFORE_PROPOSAL.contains(&message) =>
        {
            AttemptFailure::NotApplied
        }
        // "request timed out", "leader changed", "server stopped", a connection that broke
        // mid-request: the proposal may still commit.
        Code::Unavailable => AttemptFailure::MaybeApplied,
        Code::Unauthenticated if message == INVALID_AUTH_TOKEN => AttemptFailure::CredentialsStale,
        Code::InvalidArgument if message == AUTH_OLD_REVISION => AttemptFailure::CredentialsStale,
        Code::FailedPrecondition if message.starts_with(SESSION_NOT_FOUND_PREFIX) => {
            AttemptFailure::SessionNotFound
        }
        Code::FailedPrecondition if message.starts_with(STALE_SEQUENCE_PREFIX) => {
            AttemptFailure::StaleSequence
        }
        Code::FailedPrecondition if message.starts_with(RESPONSE_NOT_RETAINED_PREFIX) => {
            AttemptFailure::ResponseNotRetained
        }
        // The client's deadline, a cancelled stream, an HTTP/2 reset or a server's
        // "context deadline exceeded" (etcd answers that as Unknown): no verdict was given.
        Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal
        | Code::Aborted => AttemptFailure::MaybeApplied,
        _ => AttemptFailure::Final,
    }
}

/// True when the channel could not connect, so the request never left this process.
fn was_never_sent(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_before_proposal_are_not_applied() {
        for message in REFUSED_BEFORE_PROPOSAL {
            let status = Status::unavailable(*message);
            assert_eq!(classify(&status), AttemptFailure::NotApplied, "{message}");
        }
        let overloaded = Status::resource_exhausted("etcdserver: too many requests");
        assert_eq!(classify(&overloaded), AttemptFailure::NotApplied);
    }

    #[test]
    fn timeouts_and_leader_changes_may_have_applied() {
        for message in [
            "etcdserver: request timed out",
            "etcdserver: leader changed",
            "etcdserver: server stopped",
            "transport error",
        ] {
            assert_eq!(
                classify(&Status::unavailable(message)),
                AttemptFailure::MaybeApplied,
                "{message}"
            );
        }
        let etcd_deadline = Status::unknown("context deadline exceeded");
        assert_eq!(classify(&etcd_deadline), AttemptFailure::MaybeApplied);
        let deadline = Status::deadline_exceeded("deadline");
        assert_eq!(classify(&deadline), AttemptFailure::MaybeApplied);
    }

    #[test]
    fn etcd_errors_are_final() {
        for status in [
            Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
            Status::invalid_argument("etcdserver: key is not provided"),
            Status::not_found("etcdserver: requested lease not found"),
            Status::failed_precondition("etcdserver: member not found"),
            Status::resource_exhausted("etcdserver: mvcc: database space exceeded"),
            Status::unimplemented("unknown service"),
        ] {
            assert_eq!(classify(&status), AttemptFailure::Final, "{status:?}");
        }
    }

    /// etcd's clients authenticate again on exactly these two answers; other auth errors
    /// (permission denied, user name is empty) are the answer.
    #[test]
    fn a_void_or_stale_token_means_authenticate_again() {
        let invalid = Status::unauthenticated(INVALID_AUTH_TOKEN);
        assert_eq!(classify(&invalid), AttemptFailure::CredentialsStale);
        let stale = Status::invalid_argument(AUTH_OLD_REVISION);
        assert_eq!(classify(&stale), AttemptFailure::CredentialsStale);
        for status in [
            Status::permission_denied("etcdserver: permission denied"),
            Status::invalid_argument("etcdserver: user name is empty"),
            Status::unauthenticated("something else"),
        ] {
            assert_eq!(classify(&status), AttemptFailure::Final, "{status:?}");
        }
    }

    #[test]
    fn session_errors_are_recognised_by_flotilla_texts() {
        let not_found = Status::failed_precondition(
            "flotilla: client session not found (never registered, expired or evicted)",
        );
        assert_eq!(classify(&not_found), AttemptFailure::SessionNotFound);
        let stale = Status::failed_precondition(
            "flotilla: request sequence number is older than the session's last applied request",
        );
        assert_eq!(classify(&stale), AttemptFailure::StaleSequence);
        let lost = Status::failed_precondition(
            "flotilla: request was already applied, but its response was too large to keep for retries",
        );
        assert_eq!(classify(&lost), AttemptFailure::ResponseNotRetained);
    }

    #[test]
    fn outcomes_of_errors() {
        let unknown = ClientError::OutcomeUnknown {
            reason: "timed out".into(),
            attempts: 1,
        };
        assert_eq!(unknown.outcome(), Outcome::Unknown);
        assert_eq!(ClientError::AppliedResponseLost.outcome(), Outcome::Applied);
        let rejected = ClientError::Rejected(Status::out_of_range("x"));
        assert_eq!(rejected.outcome(), Outcome::NotApplied);
        assert_eq!(rejected.to_string(), "x");
    }
}
