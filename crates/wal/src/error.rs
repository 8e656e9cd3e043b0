//! Errors. Every message names the file, the offset where it applies, and the cause.

use std::io;
use std::path::{Path, PathBuf};

use flotilla_raft::{NodeId, PersistId};

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An operating-system call failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The data on disk is damaged or inconsistent. The node must not start on it; see the
    /// crate documentation for what an operator does then.
    #[error("corrupt write-ahead log: {path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error(
        "{path} belongs to cluster {found:#018x}, not to cluster {expected:#018x}: refusing to \
         open another cluster's data directory"
    )]
    WrongCluster {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error(
        "{path} belongs to node {found}, not to node {expected}: refusing to open another \
         member's data directory"
    )]
    WrongNode {
        path: PathBuf,
        expected: NodeId,
        found: NodeId,
    },

    #[error(
        "{path} has format version {found}, newer than version {supported} that this build \
         reads: run a newer flotilla on it"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// The caller broke the persist contract (a gap in the log, a chunk out of order, ...).
    /// Nothing of the batch was written.
    #[error("persist batch {id} is invalid, nothing of it was written: {reason}")]
    InvalidBatch { id: PersistId, reason: String },

    /// A snapshot to save is older than the current one, or its data does not match its size.
    #[error("snapshot {last} rejected: {reason}")]
    InvalidSnapshot { last: String, reason: String },

    /// The caller's snapshot data could not be read. Nothing was saved; the log goes on.
    #[error("cannot read the snapshot data to save into {path}: {source}")]
    SnapshotData {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// An earlier I/O failure (a failed fsync above all) stopped the log for good. It does not
    /// retry: after a failed fsync the kernel may have dropped the data while reporting later
    /// fsyncs as successful.
    #[error("the write-ahead log stopped after an earlier failure and refuses all work: {cause}")]
    Failed { cause: String },

    #[error("invalid write-ahead log options: {0}")]
    InvalidOptions(String),

    #[error("the write-ahead log is closed")]
    Closed,
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }

    /// True for errors that say the data on disk cannot be trusted.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Self::Corrupt { .. })
    }
}

/// Shorthand for wrapping an `io::Result` with the operation and the file.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, WalError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, WalError> {
        self.map_err(|source| WalError::io(op, path, source))
    }
}
