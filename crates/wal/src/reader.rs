//! The reading side: [`LogStorage`] for the Raft core, through `&self`, concurrently with the
//! writer. Locations and file handles are copied out under the read lock; the files are read
//! without it. Every record read is checksummed again, so damage that happens while the node
//! runs is caught too (and stops the node) rather than handed to the core.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_raft::codec;
use flotilla_raft::{
    Entry, EntryId, Index, InitialState, LogStorage, SnapshotInfo, StorageError, Term,
};

use crate::error::WalError;
use crate::fs::FsFile;
use crate::log_index::EntryLocation;
use crate::record::{self, HEADER_BYTES, Parsed, RECORD_ALIGN_BYTES, RecordKind};
use crate::segment;
use crate::snapshot_file;
use crate::wal::Wal;

/// An entry's record is at most this many bytes larger than the entry's accounted size
/// ([`Entry::size_bytes`]): header plus codec fields, less the accounting's fixed overhead.
const RECORD_BYTES_OVER_SIZE_MAX: u64 = 32;
/// Neighbouring records are read with one call, up to this many bytes.
const READ_SPAN_BYTES_MAX: u64 = 1 << 20;

/// An entry to read: its index, its term (from the index), and where it is.
type Wanted = (Index, Term, EntryLocation);

impl Wal {
    fn check_readable(&self) -> Result<(), StorageError> {
        self.check_not_failed()
            .map_err(|err| StorageError::Io(err.to_string()))
    }

    /// A read found damage: the log stops, and the core gets an I/O error (fatal to it).
    fn read_failed(&self, err: WalError) -> StorageError {
        StorageError::Io(self.fail(err).to_string())
    }

    /// Picks the entries to read, mirroring `MemStorage`'s errors exactly, with their file
    /// handles. Stops once the entries are certain to exceed `bytes_max`.
    #[allow(clippy::type_complexity)]
    fn plan_read(
        &self,
        low: Index,
        high: Index,
        bytes_max: u64,
    ) -> Result<(Vec<Wanted>, BTreeMap<u32, Arc<dyn FsFile>>), StorageError> {
        let state = self.read();
        let log = &state.log;
        if low <= log.compacted.index {
            return Err(StorageError::Compacted {
                index: low,
                first_index: log.first_index(),
            });
        }
        if high > log.last_index() + 1 {
            return Err(StorageError::Unavailable {
                index: high - 1,
                last_index: log.last_index(),
            });
        }
        let mut wanted = Vec::new();
        let mut files = BTreeMap::new();
        let mut size_bytes_min = 0u64;
        for index in low..high.max(low) {
            let location = log.location(index).expect("inside the log");
            let term = log.term(index).expect("inside the log");
            wanted.push((index, term, location));
            if let Some(file) = state.segments.get(&location.segment_seq) {
                files
                    .entry(location.segment_seq)
                    .or_insert_with(|| file.clone());
            }
            size_bytes_min +=
                (location.record_bytes as u64).saturating_sub(RECORD_BYTES_OVER_SIZE_MAX);
            if size_bytes_min > bytes_max {
                break;
            }
        }
        Ok((wanted, files))
    }

    fn read_entries(
        &self,
        low: Index,
        high: Index,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let (wanted, files) = self.plan_read(low, high, bytes_max)?;
        let mut entries = Vec::with_capacity(wanted.len());
        let mut total_bytes = 0u64;
        let mut rest = wanted.as_slice();
        // Bounded: every iteration consumes at least one wanted entry.
        while !rest.is_empty() {
            let run = contiguous_run(rest);
            let (run_entries, tail) = rest.split_at(run);
            rest = tail;
            for entry in self.read_run(run_entries, &files)? {
                total_bytes += entry.size_bytes();
                if !entries.is_empty() && total_bytes > bytes_max {
                    return Ok(entries);
                }
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// Reads records that lie back to back in one segment with one call.
    fn read_run(
        &self,
        run: &[Wanted],
        files: &BTreeMap<u32, Arc<dyn FsFile>>,
    ) -> Result<Vec<Entry>, StorageError> {
        let first = run[0].2;
        let last = run[run.len() - 1].2;
        let path = self.dir.join(segment::file_name(first.segment_seq as u64));
        let Some(file) = files.get(&first.segment_seq) else {
            let reason = "the segment holding a live entry is not open";
            return Err(self.read_failed(WalError::corrupt(&path, first.offset as u64, reason)));
        };
        let span_start = first.offset as u64;
        let span_end = last.offset as u64 + last.record_bytes as u64;
        let mut buf = vec![0u8; (span_end - span_start) as usize];
        if let Err(err) = file.read_exact_at(&mut buf, span_start) {
            return Err(self.read_failed(WalError::io("read", &path, err)));
        }
        let buf = Bytes::from(buf);
        let mut entries = Vec::with_capacity(run.len());
        for &(index, term, location) in run {
            let relative = (location.offset as u64 - span_start) as usize;
            let entry = decode_entry_at(
                &buf,
                relative,
                location.segment_seq,
                EntryId::new(term, index),
            )
            .map_err(|reason| {
                self.read_failed(WalError::corrupt(&path, location.offset as u64, reason))
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// How many of `wanted` lie back to back in one segment, within the read span limit.
fn contiguous_run(wanted: &[Wanted]) -> usize {
    let first = wanted[0].2;
    let mut count = 1;
    for pair in wanted.windows(2) {
        let (prev, next) = (pair[0].2, pair[1].2);
        let prev_end = (prev.offset as u64 + prev.record_bytes as u64)
            .next_multiple_of(RECORD_ALIGN_BYTES as u64);
        if next.segment_seq != first.segment_seq || next.offset as u64 != prev_end {
            break;
        }
        let span = next.offset as u64 + next.record_bytes as u64 - first.offset as u64;
        if span > READ_SPAN_BYTES_MAX {
            break;
        }
        count += 1;
    }
    count
}

/// Checks and decodes the entry record at `offset` of `buf`, which must be entry `expected`.
fn decode_entry_at(
    buf: &Bytes,
    offset: usize,
    seq: u32,
    expected: EntryId,
) -> Result<Entry, String> {
    let payload_len = match record::parse_record(buf, offset, seq as u64) {
        Parsed::Record {
            kind: RecordKind::Entry,
            payload,
            ..
        } => payload.len(),
        Parsed::Record { kind, .. } => return Err(format!("expected an entry, found a {kind:?}")),
        Parsed::Invalid(reason) => return Err(reason),
        Parsed::Unwritten | Parsed::End | Parsed::OtherSegment => {
            return Err("expected an entry, found nothing of this segment".into());
        }
    };
    let start = offset + HEADER_BYTES;
    let payload = buf.slice(start..start + payload_len);
    let entry = codec::decode_entry_exact(payload).map_err(|err| err.to_string())?;
    if entry.id() != expected {
        return Err(format!("expected entry {expected}, found {}", entry.id()));
    }
    Ok(entry)
}

impl LogStorage for Wal {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        self.check_readable()?;
        let state = self.read();
        Ok(InitialState {
            hard_state: state.log.hard_state,
            snapshot: state.log.snapshot.as_ref().map(|s| SnapshotInfo {
                meta: s.meta.clone(),
                data_bytes: s.data_bytes,
            }),
            bootstrap_membership: self.metadata.bootstrap_membership.clone(),
        })
    }

    fn first_index(&self) -> Index {
        self.read().log.first_index()
    }

    fn last_index(&self) -> Index {
        self.read().log.last_index()
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.check_readable()?;
        self.read().log.term(index)
    }

    fn entries(&self, low: Index, high: Index, bytes_max: u64) -> Result<Vec<Entry>, StorageError> {
        self.check_readable()?;
        self.read_entries(low, high, bytes_max)
    }

    fn snapshot_chunk(
        &self,
        last: EntryId,
        offset: u64,
        bytes_max: u64,
    ) -> Result<Bytes, StorageError> {
        self.check_readable()?;
        let (snapshot, file) = {
            let state = self.read();
            let current = state
                .log
                .snapshot
                .as_ref()
                .map(|s| s.meta.last)
                .unwrap_or_default();
            match (&state.log.snapshot, &state.snapshot_file) {
                (Some(snapshot), Some(file)) if snapshot.meta.last == last => {
                    (snapshot.clone(), file.clone())
                }
                _ => {
                    return Err(StorageError::SnapshotGone {
                        asked: last,
                        current,
                    });
                }
            }
        };
        let start = offset.min(snapshot.data_bytes);
        let end = start.saturating_add(bytes_max).min(snapshot.data_bytes);
        let mut buf = vec![0u8; (end - start) as usize];
        if let Err(err) = file.read_exact_at(&mut buf, start) {
            let path = self.dir.join(snapshot_file::file_name(snapshot.generation));
            return Err(self.read_failed(WalError::io("read", &path, err)));
        }
        Ok(Bytes::from(buf))
    }

    fn snapshot_info(&self) -> Option<SnapshotInfo> {
        let state = self.read();
        state.log.snapshot.as_ref().map(|s| SnapshotInfo {
            meta: s.meta.clone(),
            data_bytes: s.data_bytes,
        })
    }
}
