//! # flotilla-wal: durable storage for a Flotilla node
//!
//! A segmented write-ahead log with the hard state and snapshot files, written against a small
//! file-system seam ([`Fs`]) so that the simulator can run it over [`SimFs`], a deterministic
//! file system that loses unsynced data, tears and reorders writes, flips bits and fails.
//!
//! [`Wal`] implements the core's read-only [`flotilla_raft::LogStorage`] and carries out its
//! [`flotilla_raft::PersistBatch`]es, all through `&self`:
//!
//! ```
//! use std::sync::Arc;
//! use flotilla_raft::{Config, LogStorage, Membership, RaftNode};
//! use flotilla_wal::{SimFs, Wal, WalOptions};
//!
//! let options = WalOptions::new(0xc1u64, 1)
//!     .with_bootstrap_membership(Membership::with_voters([1]))
//!     .with_fs(Arc::new(SimFs::new(7)));
//! let (wal, _report) = Wal::open("/sim/node1", options).unwrap();
//! let wal = Arc::new(wal);
//! let mut node = RaftNode::new(Config::new(1), wal.clone(), 0).unwrap();
//! node.campaign().unwrap();
//! for _ in 0..3 {
//!     let output = node.take_output().unwrap();
//!     if let Some(batch) = output.persist {
//!         wal.write(&batch).unwrap();           // buffered, visible to reads
//!         let durable = wal.sync().unwrap();    // one fsync for everything written
//!         node.on_persisted(durable.unwrap()).unwrap();
//!     }
//! }
//! assert!(node.is_leader());
//! assert_eq!(wal.hard_state().vote, 1);
//! ```
//!
//! # On disk
//!
//! A data directory holds:
//!
//! * `flotilla-wal.meta`: format version, cluster id, node id, bootstrap configuration
//!   (see [`metadata`]); written last when the directory is created.
//! * `segment-<20 digits>.wal`: the log, in numbered segments reserved (fallocate) to
//!   `segment_bytes`. Each starts with a checkpoint record (the state of the log at that point,
//!   and where the previous segment's records end) followed by records: entries (an entry at or
//!   below the last index replaces the suffix: truncation), hard states (the last one wins),
//!   compactions, snapshot installs and saves, sync marks, and padding. Each record is framed
//!   with a 16-byte header (CRC32C over header and payload, length, kind, segment number) and
//!   aligned to 8 bytes (see [`record`]). A segment made obsolete by compaction
//!   is recycled as the next spare (its stale records carry the old segment number); others
//!   are deleted once the compaction is durable.
//! * `snapshot-<20 digits>.snap`: snapshot files, data first, checksummed trailer last. The log
//!   names the current one.
//!
//! # Durability
//!
//! [`Wal::write`] appends a batch's records in field order (so a crash leaves a prefix of the
//! batch's steps, and a truncation is either not there or followed by a prefix of the new
//! suffix, never mixed); [`Wal::sync`] makes everything written durable with one fsync and says
//! which batch is now durable. A failed fsync stops the log for good.
//!
//! # When the WAL refuses to start
//!
//! Recovery refuses to open a directory whose durable data is damaged or inconsistent (a bad
//! checksum in the middle of the log, a missing segment, a snapshot that does not match, a
//! commit index past the end of the log, ...), naming the file, the offset and the cause. The
//! only exception is a record torn by a crash at the very end of the log, which was never
//! acknowledged: it is cut away and reported in [`RecoveryReport::torn_tail`]. What to do:
//!
//! 1. Do not edit, truncate or delete files in the data directory to make it start: a member
//!    that restarts with less than it had acknowledged can vote twice in a term or lose
//!    committed entries, and silently break the whole cluster's guarantees.
//! 2. Keep the directory aside (rename it) for investigation, and check the disk
//!    (`dmesg`, SMART): corruption usually means failing hardware or a misconfigured volume
//!    (write cache without power-loss protection, a file system mounted with barriers off).
//! 3. From a healthy member, remove the broken member from the cluster
//!    (`flotilla member remove <id>`), then add it back (`flotilla member add`) and start it
//!    with an empty data directory. It catches up from the leader by snapshot and log, as a new
//!    member would. While it is out, the cluster runs with one member fewer: restore it before
//!    another failure costs the quorum.
//! 4. If a majority of members refuse to start, the cluster has lost its quorum's data; the
//!    only way on is a disaster recovery from a backup or snapshot, not a restart.
//!
//! A directory of another cluster or member, or written by a newer version, is refused with a
//! message that says so; point the node at the right directory or upgrade it.

mod error;
mod fs;
mod log_index;
pub mod metadata;
mod open;
mod reader;
pub mod record;
mod recovery;
mod segment;
mod sim_fs;
mod snapshot_file;
mod wal;

pub use error::WalError;
pub use fs::{Fs, FsFile, RealFs};
pub use metadata::FORMAT_VERSION;
pub use open::RecoveryReport;
pub use recovery::TornTail;
pub use sim_fs::{SimFaults, SimFs, SimFsStats};
pub use wal::{SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN, Wal, WalOptions};

#[cfg(test)]
mod tests {
    /// The server shares one `Wal` between the core's thread and the I/O task.
    #[test]
    fn the_wal_and_the_file_systems_are_send_and_sync() {
        fn shareable<T: Send + Sync>() {}
        shareable::<super::Wal>();
        shareable::<super::SimFs>();
        shareable::<super::RealFs>();
        shareable::<std::sync::Arc<dyn super::FsFile>>();
    }
}
