//! Errors the state machine answers with. Each kind maps to the gRPC status code and the exact
//! message text etcd uses (etcd-api.md §3.1), because etcd clients turn the text into typed
//! errors and decide on retries from the code. Flotilla's own kinds (sessions, malformed
//! commands) start with "flotilla:".

use std::fmt;

/// gRPC status codes used by the store, with their standard numeric values (as in
/// `tonic::Code`), so this crate needs no gRPC dependency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcCode {
    InvalidArgument = 3,
    NotFound = 5,
    PermissionDenied = 7,
    FailedPrecondition = 9,
    ResourceExhausted = 8,
    OutOfRange = 11,
    DataLoss = 15,
}

/// What went wrong. The discriminant is stable: it is stored in snapshots (inside remembered
/// session outcomes), so a number is never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum ErrorKind {
    EmptyKey = 1,
    KeyNotFound = 2,
    ValueProvided = 3,
    LeaseProvided = 4,
    TooManyOps = 5,
    DuplicateKey = 6,
    RequestTooLarge = 7,
    Compacted = 8,
    FutureRevision = 9,
    LeaseNotFound = 10,
    LeaseExists = 11,
    LeaseTtlTooLarge = 12,
    InvalidSortOption = 13,
    SessionNotFound = 14,
    StaleSequence = 15,
    ResponseNotRetained = 16,
    MalformedCommand = 17,
    NotReadOnly = 18,
    NoSpace = 19,
    Corrupt = 20,
    PermissionDenied = 21,
    AuthOldRevision = 22,
    UserEmpty = 23,
}

impl ErrorKind {
    const ALL: [ErrorKind; 23] = [
        ErrorKind::EmptyKey,
        ErrorKind::KeyNotFound,
        ErrorKind::ValueProvided,
        ErrorKind::LeaseProvided,
        ErrorKind::TooManyOps,
        ErrorKind::DuplicateKey,
        ErrorKind::RequestTooLarge,
        ErrorKind::Compacted,
        ErrorKind::FutureRevision,
        ErrorKind::LeaseNotFound,
        ErrorKind::LeaseExists,
        ErrorKind::LeaseTtlTooLarge,
        ErrorKind::InvalidSortOption,
        ErrorKind::SessionNotFound,
        ErrorKind::StaleSequence,
        ErrorKind::ResponseNotRetained,
        ErrorKind::MalformedCommand,
        ErrorKind::NotReadOnly,
        ErrorKind::NoSpace,
        ErrorKind::Corrupt,
        ErrorKind::PermissionDenied,
        ErrorKind::AuthOldRevision,
        ErrorKind::UserEmpty,
    ];

    /// The stable number stored in snapshots.
    pub fn number(self) -> u32 {
        self as u32
    }

    pub fn from_number(number: u32) -> Option<ErrorKind> {
        ErrorKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.number() == number)
    }

    pub fn grpc_code(self) -> GrpcCode {
        use ErrorKind::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge | InvalidSortOption | MalformedCommand | NotReadOnly
            | AuthOldRevision | UserEmpty => GrpcCode::InvalidArgument,
            Compacted | FutureRevision | LeaseTtlTooLarge => GrpcCode::OutOfRange,
            LeaseNotFound => GrpcCode::NotFound,
            LeaseExists | SessionNotFound | StaleSequence | ResponseNotRetained => {
                GrpcCode::FailedPrecondition
            }
            NoSpace => GrpcCode::ResourceExhausted,
            Corrupt => GrpcCode::DataLoss,
            PermissionDenied => GrpcCode::PermissionDenied,
        }
    }

    /// The message text clients see; for etcd's kinds it is etcd's text, byte for byte.
    pub fn message(self) -> &'static str {
        use ErrorKind::*;
        match self {
            EmptyKey => "etcdserver: key is not provided",
            KeyNotFound => "etcdserver: key not found",
            ValueProvided => "etcdserver: value is provided",
            LeaseProvided => "etcdserver: lease is provided",
            TooManyOps => "etcdserver: too many operations in txn request",
            DuplicateKey => "etcdserver: duplicate key given in txn request",
            RequestTooLarge => "etcdserver: request is too large",
            Compacted => "etcdserver: mvcc: required revision has been compacted",
            FutureRevision => "etcdserver: mvcc: required revision is a future revision",
            LeaseNotFound => "etcdserver: requested lease not found",
            LeaseExists => "etcdserver: lease already exists",
            LeaseTtlTooLarge => "etcdserver: too large lease TTL",
            InvalidSortOption => "etcdserver: invalid sort option",
            SessionNotFound => {
                "flotilla: client session not found (never registered, expired or evicted)"
            }
            StaleSequence => {
                "flotilla: request sequence number is older than the session's last applied request"
            }
            ResponseNotRetained => {
                "flotilla: request was already applied, but its response was too large to keep for retries"
            }
            MalformedCommand => "flotilla: malformed command",
            NotReadOnly => "flotilla: transaction writes, so it must go through the log",
            NoSpace => "etcdserver: mvcc: database space exceeded",
            Corrupt => "etcdserver: corrupt cluster",
            PermissionDenied => "etcdserver: permission denied",
            AuthOldRevision => "etcdserver: revision of auth store is old",
            UserEmpty => "etcdserver: user name is empty",
        }
    }

    /// True for kinds whose text is etcd's: clients must see that text unchanged.
    pub fn is_etcd_kind(self) -> bool {
        self.message().starts_with("etcdserver:")
    }
}

/// An error answer: the kind, plus a detail for logs and for Flotilla's own kinds (which size,
/// which limit, what failed to decode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvError {
    kind: ErrorKind,
    detail: String,
}

impl KvError {
    pub fn new(kind: ErrorKind) -> KvError {
        KvError {
            kind,
            detail: String::new(),
        }
    }

    pub fn with_detail(kind: ErrorKind, detail: impl Into<String>) -> KvError {
        KvError {
            kind,
            detail: detail.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn grpc_code(&self) -> GrpcCode {
        self.kind.grpc_code()
    }

    /// The text to send in the gRPC status. etcd's kinds carry exactly etcd's text, since
    /// clients match on it; Flotilla's own kinds add the detail.
    pub fn client_message(&self) -> String {
        if self.kind.is_etcd_kind() || self.detail.is_empty() {
            self.kind.message().to_string()
        } else {
            format!("{}: {}", self.kind.message(), self.detail)
        }
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.message())?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for KvError {}

impl From<ErrorKind> for KvError {
    fn from(kind: ErrorKind) -> KvError {
        KvError::new(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_numbers_round_trip_and_are_unique() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_number(kind.number()), Some(kind));
        }
        assert_eq!(ErrorKind::from_number(0), None);
        assert_eq!(ErrorKind::from_number(999), None);
    }

    /// etcd-api.md §3.1: code and text must be copied exactly.
    #[test]
    fn etcd_kinds_have_etcd_codes_and_texts() {
        let compacted = KvError::with_detail(ErrorKind::Compacted, "asked 3, compacted at 5");
        assert_eq!(compacted.grpc_code(), GrpcCode::OutOfRange);
        assert_eq!(
            compacted.client_message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        assert_eq!(ErrorKind::LeaseNotFound.grpc_code(), GrpcCode::NotFound);
        assert_eq!(
            ErrorKind::LeaseExists.grpc_code(),
            GrpcCode::FailedPrecondition
        );
        assert_eq!(ErrorKind::TooManyOps.grpc_code(), GrpcCode::InvalidArgument);
    }

    #[test]
    fn flotilla_kinds_carry_their_detail_to_the_client() {
        let error = KvError::with_detail(ErrorKind::MalformedCommand, "empty input");
        assert_eq!(
            error.client_message(),
            "flotilla: malformed command: empty input"
        );
        assert_eq!(
            error.to_string(),
            "flotilla: malformed command (empty input)"
        );
    }
}
