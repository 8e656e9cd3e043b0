//! etcd's gRPC status codes and exact message texts (etcd-api.md §3.1): the Go client turns the
//! text into typed errors and decides on retries from the code, so both are copied verbatim.

use flotilla_kv::{GrpcCode, KvError};
use tonic::{Code, Status};

use crate::node::NodeError;
use crate::routing::RouteError;
use flotilla_runtime::driver::Refusal;

pub const NO_LEADER: &str = "etcdserver: no leader";
pub const NOT_LEADER: &str = "etcdserver: not leader";
pub const LEADER_CHANGED: &str = "etcdserver: leader changed";
pub const REQUEST_TIMED_OUT: &str = "etcdserver: request timed out";
pub const REQUEST_TIMED_OUT_LEADER_FAIL: &str =
    "etcdserver: request timed out, possibly due to previous leader failure";
pub const TOO_MANY_REQUESTS: &str = "etcdserver: too many requests";
/// etcd's ErrRequestTooLarge.
pub const REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
pub const SERVER_STOPPED: &str = "etcdserver: server stopped";
pub const LEARNER_NOT_SUPPORTED: &str = "etcdserver: rpc not supported for learner";
pub const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";
pub const BAD_LEADER_TRANSFEREE: &str = "etcdserver: bad leader transferee";
pub const MEMBER_NOT_FOUND: &str = "etcdserver: member not found";
pub const MEMBER_EXISTS: &str = "etcdserver: member ID already exist";
pub const PEER_URL_EXISTS: &str = "etcdserver: Peer URLs already exists";
pub const INVALID_URLS: &str = "etcdserver: given member URLs are invalid";
pub const LEARNER_NOT_READY: &str =
    "etcdserver: can only promote a learner member which is in sync with leader";
pub const NOT_A_LEARNER: &str = "etcdserver: can only promote a learner member";
pub const NOT_ENOUGH_STARTED_MEMBERS: &str =
    "etcdserver: re-configuration failed due to not enough started members";
pub fn kv_status(error: &KvError) -> Status {
    let code = match error.grpc_code() {
        GrpcCode::InvalidArgument => Code::InvalidArgument,
        GrpcCode::NotFound => Code::NotFound,
        GrpcCode::FailedPrecondition => Code::FailedPrecondition,
        GrpcCode::OutOfRange => Code::OutOfRange,
        GrpcCode::ResourceExhausted => Code::ResourceExhausted,
        GrpcCode::DataLoss => Code::DataLoss,
        GrpcCode::PermissionDenied => Code::PermissionDenied,
    };
    Status::new(code, error.client_message())
}

/// A refusal or failure of the node, as the client sees it.
pub fn node_status(error: NodeError) -> Status {
    match error {
        NodeError::Timeout => Status::unavailable(REQUEST_TIMED_OUT),
        NodeError::Stopped => Status::unavailable(SERVER_STOPPED),
        NodeError::Refused(refusal) => refusal_status(refusal),
    }
}

/// A request that could not be carried out at the leader, as the client sees it: the one place
/// where the leader route's typed errors become etcd's codes and texts.
impl From<RouteError> for Status {
    fn from(error: RouteError) -> Status {
        match error {
            RouteError::NotLeader => Status::unavailable(NOT_LEADER),
            RouteError::Undelivered | RouteError::LeaderUnreachable | RouteError::NoLeader => {
                Status::unavailable(REQUEST_TIMED_OUT_LEADER_FAIL)
            }
            RouteError::TimedOut => Status::unavailable(REQUEST_TIMED_OUT),
            RouteError::TooManyHeld => Status::resource_exhausted(TOO_MANY_REQUESTS),
            RouteError::Node(error) => node_status(error),
            RouteError::Failed(status) => status,
        }
    }
}

pub fn refusal_status(refusal: Refusal) -> Status {
    match refusal {
        Refusal::NotLeader(None) => Status::unavailable(NO_LEADER),
        Refusal::NotLeader(Some(_)) => Status::unavailable(NOT_LEADER),
        Refusal::LeaderChanged => Status::unavailable(LEADER_CHANGED),
        Refusal::Overloaded(detail) => {
            tracing::debug!("refusing a request: {detail}");
            Status::resource_exhausted(TOO_MANY_REQUESTS)
        }
        Refusal::TooLarge { .. } => Status::invalid_argument(REQUEST_TOO_LARGE),
        Refusal::Stopped => Status::unavailable(SERVER_STOPPED),
        Refusal::TimedOut => Status::unavailable(REQUEST_TIMED_OUT),
        Refusal::Refused(err) => membership_status(&err),
    }
}

/// The core's refusals of membership changes and transfers, in etcd's words where etcd has
/// them.
fn membership_status(err: &flotilla_raft::Error) -> Status {
    use flotilla_raft::{Error, MembershipError};
    match err {
        Error::Membership(MembershipError::AlreadyMember(_)) => {
            Status::failed_precondition(MEMBER_EXISTS)
        }
        Error::Membership(MembershipError::UnknownMember(_)) => Status::not_found(MEMBER_NOT_FOUND),
        Error::Membership(MembershipError::NotALearner(_)) => {
            Status::failed_precondition(NOT_A_LEARNER)
        }
        Error::LearnerBehind { .. } => Status::failed_precondition(LEARNER_NOT_READY),
        Error::NotAVoter(_) => Status::failed_precondition(BAD_LEADER_TRANSFEREE),
        Error::TransferInProgress { .. } => Status::unavailable(LEADER_CHANGED),
        other => Status::failed_precondition(format!("flotilla: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_kv::{ErrorKind, KvError};
    use flotilla_raft::{Error, MembershipError};

    use super::*;

    /// etcd-api.md §3.1: codes and texts are copied exactly; "try elsewhere" is Unavailable.
    #[test]
    fn refusals_use_etcds_codes_and_texts() {
        let cases = [
            (Refusal::NotLeader(None), Code::Unavailable, NO_LEADER),
            (Refusal::LeaderChanged, Code::Unavailable, LEADER_CHANGED),
            (
                Refusal::Overloaded("x".into()),
                Code::ResourceExhausted,
                TOO_MANY_REQUESTS,
            ),
            (Refusal::Stopped, Code::Unavailable, SERVER_STOPPED),
            (
                Refusal::TooLarge {
                    bytes: 2,
                    limit_bytes: 1,
                },
                Code::InvalidArgument,
                REQUEST_TOO_LARGE,
            ),
            (
                Refusal::Refused(Error::Membership(MembershipError::UnknownMember(4))),
                Code::NotFound,
                MEMBER_NOT_FOUND,
            ),
            (
                Refusal::Refused(Error::NotAVoter(4)),
                Code::FailedPrecondition,
                BAD_LEADER_TRANSFEREE,
            ),
        ];
        for (refusal, code, text) in cases {
            let status = refusal_status(refusal);
            assert_eq!((status.code(), status.message()), (code, text));
        }
        let status = node_status(NodeError::Timeout);
        assert_eq!(status.message(), REQUEST_TIMED_OUT);
    }

    #[test]
    fn kv_errors_keep_their_code_and_text() {
        let status = kv_status(&KvError::with_detail(ErrorKind::Compacted, "at 5"));
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(
            status.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
    }
}
