//! Segment files: `segment-<seq>.wal`, numbered without gaps, each preallocated with zeros to
//! its bounded size and starting with a checkpoint record.
//!
//! A segment is written front to back. Before the writer moves on to the next segment it
//! fsyncs this one, so only the last segment can hold records that were never made durable,
//! and the next segment's checkpoint says where this one's records end.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{IoContext, WalError};
use crate::fs::{Fs, FsFile};
use crate::record::{
    self, Checkpoint, HEADER_BYTES, PAYLOAD_BYTES_MAX, Parsed, RECORD_ALIGN_BYTES, Record,
    RecordKind,
};

const PREFIX: &str = "segment-";
const SUFFIX: &str = ".wal";

pub(crate) fn file_name(seq: u64) -> String {
    format!("{PREFIX}{seq:020}{SUFFIX}")
}

pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 {
        return None;
    }
    digits.parse().ok()
}

/// An open segment file.
#[derive(Clone, Debug)]
pub(crate) struct SegmentFile {
    pub seq: u64,
    pub path: PathBuf,
    pub file: Arc<dyn FsFile>,
}

impl SegmentFile {
    pub fn open(fs: &dyn Fs, dir: &Path, seq: u64) -> Result<Self, WalError> {
        let path = dir.join(file_name(seq));
        let file = fs.open(&path).ctx("open", &path)?;
        Ok(Self { seq, path, file })
    }

    /// Creates the file for segment `seq`, preallocated to `capacity_bytes` of zeros, and
    /// makes it and its directory entry durable (unless `sync` is false).
    pub fn create(
        fs: &dyn Fs,
        dir: &Path,
        seq: u64,
        capacity_bytes: u64,
        sync: bool,
    ) -> Result<Self, WalError> {
        let path = dir.join(file_name(seq));
        let file = fs.create_new(&path).ctx("create", &path)?;
        file.allocate(capacity_bytes).ctx("preallocate", &path)?;
        if sync {
            file.sync_data().ctx("fsync", &path)?;
            fs.sync_dir(dir).ctx("fsync directory", dir)?;
        }
        Ok(Self { seq, path, file })
    }

    pub fn read_all(&self) -> Result<Vec<u8>, WalError> {
        let mut buf = Vec::new();
        self.read_into(&mut buf, u64::MAX)?;
        Ok(buf)
    }

    /// Reads the first `bytes_max` bytes of the file (all of it if shorter) into `buf`,
    /// reusing its allocation.
    pub fn read_into(&self, buf: &mut Vec<u8>, bytes_max: u64) -> Result<(), WalError> {
        let len = self.file.len().ctx("stat", &self.path)?.min(bytes_max);
        buf.clear();
        buf.resize(len as usize, 0);
        self.file.read_exact_at(buf, 0).ctx("read", &self.path)
    }

    /// Reads and decodes the checkpoint at the start of the segment, or says why there is
    /// none.
    pub fn read_checkpoint(&self) -> Result<Result<Checkpoint, String>, WalError> {
        let len = self.file.len().ctx("stat", &self.path)?;
        let mut header = [0u8; HEADER_BYTES];
        if len < HEADER_BYTES as u64 {
            return Ok(Err(format!("the file is only {len} bytes long")));
        }
        self.file
            .read_exact_at(&mut header, 0)
            .ctx("read", &self.path)?;
        let payload_bytes = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as u64;
        // A damaged length is caught by the checksum; only bound the read.
        let record_bytes =
            (HEADER_BYTES as u64 + payload_bytes.min(PAYLOAD_BYTES_MAX as u64)).min(len);
        let mut buf = vec![0u8; record_bytes as usize];
        self.file
            .read_exact_at(&mut buf, 0)
            .ctx("read", &self.path)?;
        Ok(parse_checkpoint(&buf, self.seq))
    }
}

/// The checkpoint at the start of `buf`, checked to belong to segment `seq`.
pub(crate) fn parse_checkpoint(buf: &[u8], seq: u64) -> Result<Checkpoint, String> {
    let (kind, payload) = match record::parse_record(buf, 0, seq) {
        Parsed::Record { kind, payload, .. } => (kind, payload),
        Parsed::Unwritten => return Err("the segment was never written to".into()),
        Parsed::OtherSegment => {
            return Err("the segment holds only records of a previous life (recycled)".into());
        }
        Parsed::End => return Err("the segment is empty".into()),
        Parsed::Invalid(reason) => return Err(format!("the first record is damaged: {reason}")),
    };
    if kind != RecordKind::Checkpoint {
        return Err(format!("the first record is a {kind:?}, not a checkpoint"));
    }
    let Record::Checkpoint(checkpoint) =
        record::decode_record(kind, payload).map_err(|err| err.to_string())?
    else {
        unreachable!("a checkpoint record decodes to a checkpoint");
    };
    if checkpoint.segment_seq != seq {
        return Err(format!(
            "the checkpoint belongs to segment {}, not {seq}",
            checkpoint.segment_seq
        ));
    }
    Ok(checkpoint)
}

/// The first surviving sync mark at or after `from` that vouches for data past `from`: proof
/// that the damage at `from` hit data that had been made durable, rather than a write torn by
/// a crash. Only candidates that look like a sync mark are checksummed, so garbage cannot
/// make this scan slow.
pub(crate) fn find_vouching_mark(buf: &[u8], from: usize, seq: u64) -> Option<(usize, u64)> {
    const MARK_PAYLOAD_BYTES: u32 = 8;
    let mut offset = from.next_multiple_of(RECORD_ALIGN_BYTES);
    while offset + HEADER_BYTES <= buf.len() {
        let header = &buf[offset..offset + HEADER_BYTES];
        let payload_bytes = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if header[8] == RecordKind::SyncMark as u8
            && payload_bytes == MARK_PAYLOAD_BYTES
            && let Parsed::Record { kind, payload, .. } = record::parse_record(buf, offset, seq)
            && let Ok(Record::SyncMark { durable_through }) = record::decode_record(kind, payload)
            && durable_through > from as u64
        {
            return Some((offset, durable_through));
        }
        offset += RECORD_ALIGN_BYTES;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_by_number() {
        assert_eq!(parse_file_name(&file_name(7)), Some(7));
        assert!(file_name(9) < file_name(10));
        assert_eq!(parse_file_name("segment-7.wal"), None);
        assert_eq!(
            parse_file_name("segment-00000000000000000007.wal.tmp"),
            None
        );
    }

    #[test]
    fn a_mark_is_found_past_damage_only_if_it_vouches_for_it() {
        let mut buf = vec![0u8; 64];
        record::encode_record(&mut buf, RecordKind::SyncMark, 3, |out| {
            record::put_sync_mark(out, 40)
        });
        buf.extend_from_slice(&[0; 16]);
        assert_eq!(find_vouching_mark(&buf, 32, 3), Some((64, 40)));
        assert_eq!(find_vouching_mark(&buf, 40, 3), None);
        assert_eq!(
            find_vouching_mark(&buf, 32, 4),
            None,
            "another segment's mark"
        );
    }
}
