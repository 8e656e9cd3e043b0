//! Snapshot files: the data at offset 0 (so chunks are read in place), then a checksummed
//! trailer that says what the data is.
//!
//! ```text
//!   0               data_bytes   the snapshot's data
//!   data_bytes      n            trailer: generation u64, data_bytes u64, data_crc u32,
//!                                snapshot meta (core codec)
//!   end - 16        4            n (trailer length)
//!   end - 12        4            crc32c over the trailer and n
//!   end - 8         8            magic "FLOTSNP1"
//! ```
//!
//! A file is written under a temporary name (`.tmp` for snapshots the state machine saves,
//! `.partial` for one being received from the leader), fsynced, renamed to
//! `snapshot-<generation>.snap`, and the directory fsynced. Which snapshot is current is said
//! by the log (a `SnapshotSaved` or `SnapshotInstall` record, repeated in every segment's
//! checkpoint), never by the newest file: a file the log does not name is left over from a
//! write that did not complete, and is removed at start-up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use flotilla_raft::SnapshotMeta;
use flotilla_raft::codec::Reader;

use crate::error::{IoContext, WalError};
use crate::fs::{Fs, FsFile};
use crate::record::{SnapshotRef, get_snapshot_ref, put_snapshot_ref};

const MAGIC: &[u8; 8] = b"FLOTSNP1";
const TAIL_BYTES: u64 = 16;
const TRAILER_BYTES_MAX: u64 = 64 << 20;
/// Snapshot data is read and checksummed in pieces of this size.
pub(crate) const READ_CHUNK_BYTES: usize = 1 << 20;

const PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".snap";

pub(crate) fn file_name(generation: u64) -> String {
    format!("{PREFIX}{generation:020}{SUFFIX}")
}

pub(crate) fn partial_file_name(generation: u64) -> String {
    format!("{PREFIX}{generation:020}{SUFFIX}.partial")
}

pub(crate) fn tmp_file_name(generation: u64) -> String {
    format!("{PREFIX}{generation:020}{SUFFIX}.tmp")
}

/// The generation of a snapshot file name, or of a temporary one (`.tmp`, `.partial`).
pub(crate) fn parse_file_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.get(..20)?;
    let generation = digits.parse().ok()?;
    match &rest[20..] {
        SUFFIX => Some((generation, false)),
        ".snap.tmp" | ".snap.partial" => Some((generation, true)),
        _ => None,
    }
}

/// A snapshot file being written, in order, from offset 0.
#[derive(Debug)]
pub(crate) struct SnapshotWriter {
    pub path: PathBuf,
    pub file: Arc<dyn FsFile>,
    pub generation: u64,
    pub written_bytes: u64,
    data_crc: u32,
    /// Whether to fsync as it goes (see [`SYNC_EVERY_BYTES`]) and at the end.
    sync: bool,
    /// Bytes written since the last fsync; below [`SYNC_EVERY_BYTES`] while syncing.
    unsynced_bytes: u64,
}

/// A snapshot being written is fsynced every this many bytes, so that its dirty pages never
/// pile up: flushed all at once at the end, tens of megabytes held up the log's own fsyncs
/// (on ext4 a journal commit writes out every dirty page ahead of it) and stalled every write
/// for up to 50 ms.
const SYNC_EVERY_BYTES: u64 = 4 << 20;

impl SnapshotWriter {
    /// `sync` false only where the whole log runs without fsync (benchmarks).
    pub fn create(
        fs: &dyn Fs,
        path: PathBuf,
        generation: u64,
        sync: bool,
    ) -> Result<Self, WalError> {
        let file = fs.create_new(&path).ctx("create", &path)?;
        Ok(Self {
            path,
            file,
            generation,
            written_bytes: 0,
            data_crc: 0,
            sync,
            unsynced_bytes: 0,
        })
    }

    pub fn append(&mut self, data: &[u8]) -> Result<(), WalError> {
        self.file
            .write_all_at(data, self.written_bytes)
            .ctx("write", &self.path)?;
        self.written_bytes += data.len() as u64;
        self.data_crc = crc32c::crc32c_append(self.data_crc, data);
        self.unsynced_bytes += data.len() as u64;
        if self.sync && self.unsynced_bytes >= SYNC_EVERY_BYTES {
            self.file.sync_data().ctx("fsync", &self.path)?;
            self.unsynced_bytes = 0;
        }
        Ok(())
    }

    /// Writes the trailer and fsyncs the file (if syncing). The caller renames it.
    pub fn finish(&self, meta: &SnapshotMeta) -> Result<SnapshotRef, WalError> {
        let reference = SnapshotRef {
            generation: self.generation,
            meta: meta.clone(),
            data_bytes: self.written_bytes,
            data_crc: self.data_crc,
        };
        let mut trailer = Vec::new();
        put_snapshot_ref(&mut trailer, &reference);
        let trailer_bytes = trailer.len() as u32;
        trailer.put_u32_le(trailer_bytes);
        let crc = crc32c::crc32c(&trailer);
        trailer.put_u32_le(crc);
        trailer.extend_from_slice(MAGIC);
        self.file
            .write_all_at(&trailer, self.written_bytes)
            .ctx("write", &self.path)?;
        if self.sync {
            self.file.sync_data().ctx("fsync", &self.path)?;
        }
        Ok(reference)
    }
}

/// Reads and checks a snapshot file's trailer.
pub(crate) fn read_trailer(file: &dyn FsFile, path: &Path) -> Result<SnapshotRef, WalError> {
    let len = file.len().ctx("stat", path)?;
    if len < TAIL_BYTES {
        return Err(WalError::corrupt(
            path,
            0,
            "too short to be a snapshot file",
        ));
    }
    let tail_offset = len - TAIL_BYTES;
    let mut tail = [0u8; TAIL_BYTES as usize];
    file.read_exact_at(&mut tail, tail_offset)
        .ctx("read", path)?;
    if &tail[8..16] != MAGIC {
        return Err(WalError::corrupt(
            path,
            tail_offset + 8,
            "bad snapshot magic",
        ));
    }
    let trailer_bytes = u32::from_le_bytes(tail[0..4].try_into().expect("4 bytes")) as u64;
    let stored_crc = u32::from_le_bytes(tail[4..8].try_into().expect("4 bytes"));
    if trailer_bytes > TRAILER_BYTES_MAX || trailer_bytes > tail_offset {
        return Err(WalError::corrupt(
            path,
            tail_offset,
            format!("impossible trailer length {trailer_bytes}"),
        ));
    }
    let trailer_offset = tail_offset - trailer_bytes;
    let mut trailer = vec![0u8; trailer_bytes as usize + 4];
    file.read_exact_at(&mut trailer, trailer_offset)
        .ctx("read", path)?;
    let crc = crc32c::crc32c(&trailer);
    if crc != stored_crc {
        return Err(WalError::corrupt(
            path,
            trailer_offset,
            format!("trailer checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"),
        ));
    }
    trailer.truncate(trailer_bytes as usize);
    let mut r = Reader::new(Bytes::from(trailer));
    let reference = get_snapshot_ref(&mut r)
        .and_then(|reference| r.finish("snapshot trailer").map(|()| reference))
        .map_err(|err| WalError::corrupt(path, trailer_offset, err.to_string()))?;
    if reference.data_bytes != trailer_offset {
        return Err(WalError::corrupt(
            path,
            trailer_offset,
            format!(
                "trailer says {} bytes of data but the data ends at {trailer_offset}",
                reference.data_bytes
            ),
        ));
    }
    Ok(reference)
}

/// Checks that the file holds exactly the snapshot `expected` names, data checksum included.
pub(crate) fn verify(
    file: &dyn FsFile,
    path: &Path,
    expected: &SnapshotRef,
) -> Result<(), WalError> {
    let found = read_trailer(file, path)?;
    if found != *expected {
        return Err(WalError::corrupt(
            path,
            found.data_bytes,
            format!(
                "the log names snapshot {} (generation {}, {} bytes, crc {:#010x}) but the file \
                 holds {} (generation {}, {} bytes, crc {:#010x})",
                expected.meta.last,
                expected.generation,
                expected.data_bytes,
                expected.data_crc,
                found.meta.last,
                found.generation,
                found.data_bytes,
                found.data_crc
            ),
        ));
    }
    let crc = data_crc(file, path, found.data_bytes)?;
    if crc != expected.data_crc {
        return Err(WalError::corrupt(
            path,
            0,
            format!(
                "snapshot data checksum mismatch (expected {:#010x}, computed {crc:#010x})",
                expected.data_crc
            ),
        ));
    }
    Ok(())
}

fn data_crc(file: &dyn FsFile, path: &Path, data_bytes: u64) -> Result<u32, WalError> {
    let mut crc = 0;
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut offset = 0;
    while offset < data_bytes {
        let piece = (data_bytes - offset).min(READ_CHUNK_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..piece], offset)
            .ctx("read", path)?;
        crc = crc32c::crc32c_append(crc, &buf[..piece]);
        offset += piece as u64;
    }
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use flotilla_raft::{EntryId, Membership};

    use super::*;
    use crate::SimFs;

    /// A large snapshot is fsynced as it is written, so its dirty pages never pile up behind the
    /// log's fsyncs; without fsync (benchmarks) it never is.
    #[test]
    fn a_large_snapshot_is_synced_every_few_megabytes_as_it_is_written() {
        for sync in [true, false] {
            let fs = SimFs::new(1);
            let dir = PathBuf::from("/sim/snap");
            fs.create_dir_all(&dir).unwrap();
            let mut writer = SnapshotWriter::create(&fs, dir.join(file_name(1)), 1, sync).unwrap();
            let chunk = vec![7u8; 1 << 20];
            let mut syncs_seen = Vec::new();
            for _ in 0..10 {
                writer.append(&chunk).unwrap();
                syncs_seen.push(fs.stats().file_syncs);
            }
            let meta = SnapshotMeta {
                last: EntryId { term: 1, index: 1 },
                membership: Membership::with_voters([1]),
            };
            writer.finish(&meta).unwrap();
            if sync {
                // One fsync per 4 MiB: after the 4th and the 8th megabyte, then one at the end.
                assert_eq!(syncs_seen, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]);
                assert_eq!(fs.stats().file_syncs, 3);
            } else {
                assert_eq!(fs.stats().file_syncs, 0);
            }
        }
    }

    #[test]
    fn a_written_snapshot_verifies_and_any_bit_flip_is_caught() {
        let fs = SimFs::new(1);
        let dir = PathBuf::from("/sim/snap");
        fs.create_dir_all(&dir).unwrap();
        let path = dir.join(file_name(7));
        let mut writer = SnapshotWriter::create(&fs, path.clone(), 7, true).unwrap();
        writer.append(b"hello ").unwrap();
        writer.append(b"snapshot").unwrap();
        let meta = SnapshotMeta {
            last: EntryId::new(3, 99),
            membership: Membership::with_voters([1, 2]),
        };
        let reference = writer.finish(&meta).unwrap();
        assert_eq!(reference.data_bytes, 14);
        verify(writer.file.as_ref(), &path, &reference).unwrap();
        let len = fs.file_len(&path).unwrap();
        for offset in 0..len {
            fs.flip_bit(&path, offset, (offset % 8) as u8).unwrap();
            let err = verify(writer.file.as_ref(), &path, &reference).unwrap_err();
            assert!(err.is_corruption(), "flip at {offset}: {err}");
            fs.flip_bit(&path, offset, (offset % 8) as u8).unwrap();
        }
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&file_name(42)), Some((42, false)));
        assert_eq!(parse_file_name(&tmp_file_name(42)), Some((42, true)));
        assert_eq!(parse_file_name(&partial_file_name(42)), Some((42, true)));
        assert_eq!(parse_file_name("snapshot-x.snap"), None);
    }
}
