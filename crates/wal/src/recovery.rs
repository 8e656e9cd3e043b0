//! Start-up recovery: read every segment, verify every checksum, replay the records into a
//! [`LogIndex`], and decide whether what is on disk can be trusted.
//!
//! The rules:
//!
//! * Segments are numbered without gaps; a gap is a missing segment.
//! * Every segment starts with a checkpoint that must agree with the replay of the segments
//!   before it. Segments older than the oldest present one may have been deleted by
//!   compaction; the entries they held must then be compacted away by the records that follow.
//! * A segment other than the last was fsynced before the next one was started, so its records
//!   must parse exactly up to where the next segment's checkpoint says they end.
//! * In the last segment, the records parse up to some offset, after which there is unwritten
//!   space or garbage. Garbage there is a write torn by the crash, and is cut away, unless a
//!   sync mark after it proves the damaged bytes had already been fsynced: then it is damage to
//!   durable data. A last segment without a valid checkpoint is an unused preallocated segment
//!   or one whose first write was torn, and is discarded (under the same proof rule).
//! * The snapshot the log names must exist and match its checksum; the hard state's commit
//!   index must be inside the log.
//!
//! Anything else is corruption, reported with the file, the offset and the reason. Recovery
//! never drops a record it cannot prove was never acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{IoContext, WalError};
use crate::fs::{Fs, FsFile};
use crate::log_index::{EntryLocation, LogIndex};
use crate::record::{self, Checkpoint, HEADER_BYTES, Parsed, Record};
use crate::segment::{self, SegmentFile};
use crate::snapshot_file;

/// Garbage found after the last valid record of the log, and cut away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
}

#[derive(Debug)]
pub(crate) struct Recovered {
    pub index: LogIndex,
    /// The segments holding the log, oldest first; never empty.
    pub segments: Vec<SegmentFile>,
    /// Where the valid records of the last segment end.
    pub last_segment_end: u64,
    pub torn_tail: Option<TornTail>,
    /// A last segment without a valid checkpoint, to be removed.
    pub discarded_segment: Option<SegmentFile>,
    pub snapshot_file: Option<Arc<dyn FsFile>>,
}

/// Applies one record to the index. Shared by recovery and the writer, so that both give a
/// record the same meaning.
pub(crate) fn apply_record(
    index: &mut LogIndex,
    record: &Record,
    location: EntryLocation,
) -> Result<(), String> {
    match record {
        Record::Checkpoint(_) => Err("a checkpoint in the middle of a segment".into()),
        Record::Entry(id) => index.append(*id, location),
        Record::HardState(hard_state) => {
            index.hard_state = *hard_state;
            Ok(())
        }
        Record::Compact(to) => index.compact(*to),
        Record::SnapshotInstall {
            snapshot,
            keep_through,
        } => index.install_snapshot(snapshot.clone(), *keep_through),
        Record::SnapshotSaved(snapshot) => index.save_snapshot(snapshot.clone()),
        Record::SyncMark { .. } | Record::Padding => Ok(()),
    }
}

/// The state a checkpoint records, for comparison with the replay.
pub(crate) fn checkpoint_of(index: &LogIndex, seq: u64, prev_end: Option<u64>) -> Checkpoint {
    Checkpoint {
        segment_seq: seq,
        prev_segment_end: prev_end,
        compacted: index.compacted,
        last: index.last_id(),
        hard_state: index.hard_state,
        snapshot: index.snapshot.clone(),
    }
}

pub(crate) fn recover(fs: &dyn Fs, dir: &Path, seqs: &[u64]) -> Result<Recovered, WalError> {
    assert!(!seqs.is_empty(), "recovery needs at least one segment");
    for pair in seqs.windows(2) {
        if pair[1] != pair[0] + 1 {
            let path = dir.join(segment::file_name(pair[1]));
            let reason = format!(
                "segment {} is missing (the log jumps from segment {} to {})",
                pair[0] + 1,
                pair[0],
                pair[1]
            );
            return Err(WalError::corrupt(&path, 0, reason));
        }
    }
    let mut segments = seqs
        .iter()
        .map(|&seq| SegmentFile::open(fs, dir, seq))
        .collect::<Result<Vec<_>, _>>()?;
    let (checkpoints, discarded_segment) = read_checkpoints(&mut segments)?;
    let first = &checkpoints[0];
    if first.last.index < first.compacted.index {
        let reason = "the checkpoint's last entry is before its compaction point";
        return Err(WalError::corrupt(&segments[0].path, 0, reason));
    }
    let mut index = LogIndex::from_checkpoint(
        first.compacted,
        first.last,
        first.hard_state,
        first.snapshot.clone(),
    );
    let mut last_segment_end = 0;
    let mut torn_tail = None;
    let mut buf = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            check_checkpoint(&index, &checkpoints[i], segment)?;
        }
        let next_checkpoint = checkpoints.get(i + 1);
        let stop = match next_checkpoint {
            None => None,
            Some(next) => Some(next.prev_segment_end.ok_or_else(|| {
                let reason = "the checkpoint does not say where the previous segment ends";
                WalError::corrupt(&segments[i + 1].path, 0, reason)
            })?),
        };
        // A segment that is not the last is read only as far as its records go; the last one
        // whole, to look for sync marks past a damaged record.
        segment.read_into(&mut buf, stop.unwrap_or(u64::MAX))?;
        let end = replay_segment(&buf, segment, &mut index, stop)?;
        if stop.is_none() {
            last_segment_end = end.valid_end as u64;
            torn_tail = check_tail(&buf, segment, end)?;
        }
    }
    let snapshot_file = check_whole_log(fs, dir, &index, &segments, last_segment_end)?;
    index.check_invariants();
    Ok(Recovered {
        index,
        segments,
        last_segment_end,
        torn_tail,
        discarded_segment,
        snapshot_file,
    })
}

/// Reads every segment's checkpoint. A last segment without one is set aside, unless something
/// proves it held durable data.
fn read_checkpoints(
    segments: &mut Vec<SegmentFile>,
) -> Result<(Vec<Checkpoint>, Option<SegmentFile>), WalError> {
    let mut checkpoints = Vec::with_capacity(segments.len());
    let count = segments.len();
    for (i, segment) in segments.iter().enumerate() {
        match segment.read_checkpoint()? {
            Ok(checkpoint) => checkpoints.push(checkpoint),
            Err(reason) if i + 1 == count && i > 0 => {
                let buf = segment.read_all()?;
                if let Some((offset, durable)) = segment::find_vouching_mark(&buf, 0, segment.seq) {
                    let reason = format!(
                        "{reason}, yet the sync mark at offset {offset} says the segment was \
                         durable through offset {durable}"
                    );
                    return Err(WalError::corrupt(&segment.path, 0, reason));
                }
            }
            Err(reason) => return Err(WalError::corrupt(&segment.path, 0, reason)),
        }
    }
    let discarded = (checkpoints.len() < count).then(|| segments.pop().expect("not empty"));
    Ok((checkpoints, discarded))
}

fn check_checkpoint(
    index: &LogIndex,
    checkpoint: &Checkpoint,
    segment: &SegmentFile,
) -> Result<(), WalError> {
    let expected = checkpoint_of(index, segment.seq, checkpoint.prev_segment_end);
    if *checkpoint != expected {
        let reason = format!(
            "the checkpoint disagrees with the segments before it: it says {checkpoint:?}, the \
             log says {expected:?}"
        );
        return Err(WalError::corrupt(&segment.path, 0, reason));
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct ScanEnd {
    valid_end: usize,
    /// Why the records stop there, if not at unwritten space or the end of the file.
    damage: Option<String>,
}

/// Replays the records of one segment after its checkpoint, up to `stop` if the next segment
/// says where this one ends, or to the first thing that is not a record.
fn replay_segment(
    buf: &[u8],
    segment: &SegmentFile,
    index: &mut LogIndex,
    stop: Option<u64>,
) -> Result<ScanEnd, WalError> {
    let corrupt = |offset: usize, reason: String| {
        Err(WalError::corrupt(&segment.path, offset as u64, reason))
    };
    let Parsed::Record { mut next, .. } = record::parse_record(buf, 0, segment.seq) else {
        let reason = "the checkpoint does not fit before where the next segment says this one ends";
        return corrupt(0, reason.into());
    };
    let mut offset;
    // Bounded: every iteration moves forward by at least one header.
    loop {
        offset = next;
        if let Some(stop) = stop {
            if offset as u64 == stop {
                return Ok(ScanEnd {
                    valid_end: offset,
                    damage: None,
                });
            }
            if offset as u64 > stop {
                let reason = format!(
                    "a record runs past offset {stop}, where the next segment says this one ends"
                );
                return corrupt(offset, reason);
            }
        }
        let (kind, payload) = match record::parse_record(buf, offset, segment.seq) {
            Parsed::Record {
                kind,
                payload,
                next: after,
            } => {
                next = after;
                (kind, payload)
            }
            parsed => {
                let damage = match parsed {
                    Parsed::Invalid(reason) => Some(reason),
                    _ => None,
                };
                if let Some(stop) = stop {
                    let what = damage.unwrap_or_else(|| "the records end".into());
                    let reason = format!(
                        "{what}, before offset {stop} where the next segment says this one ends"
                    );
                    return corrupt(offset, reason);
                }
                return Ok(ScanEnd {
                    valid_end: offset,
                    damage,
                });
            }
        };
        let decoded = match record::decode_record(kind, payload) {
            Ok(decoded) => decoded,
            Err(err) => {
                return corrupt(offset, format!("a {kind:?} record does not decode: {err}"));
            }
        };
        let location = EntryLocation {
            segment_seq: segment_seq_u32(segment.seq),
            offset: offset as u32,
            record_bytes: (HEADER_BYTES + payload.len()) as u32,
        };
        if let Err(reason) = apply_record(index, &decoded, location) {
            return corrupt(offset, format!("{kind:?} record: {reason}"));
        }
    }
}

pub(crate) fn segment_seq_u32(seq: u64) -> u32 {
    u32::try_from(seq)
        .ok()
        .filter(|&s| s != u32::MAX)
        .expect("segment number overflow")
}

/// Decides what the end of the last segment is: a clean end, a torn write to cut away, or
/// damage to durable data.
fn check_tail(
    buf: &[u8],
    segment: &SegmentFile,
    end: ScanEnd,
) -> Result<Option<TornTail>, WalError> {
    if let Some((mark_offset, durable)) =
        segment::find_vouching_mark(buf, end.valid_end, segment.seq)
    {
        let what = end
            .damage
            .unwrap_or_else(|| "the records stop (unwritten space)".into());
        let reason = format!(
            "{what}, yet the sync mark at offset {mark_offset} says everything before offset \
             {durable} had been made durable"
        );
        return Err(WalError::corrupt(
            &segment.path,
            end.valid_end as u64,
            reason,
        ));
    }
    Ok(end.damage.map(|reason| TornTail {
        path: segment.path.clone(),
        offset: end.valid_end as u64,
        reason,
    }))
}

/// The checks that need the whole log: no entry lost with a deleted segment, the snapshot the
/// log names is there and intact, the commit index is inside the log.
fn check_whole_log(
    fs: &dyn Fs,
    dir: &Path,
    index: &LogIndex,
    segments: &[SegmentFile],
    last_segment_end: u64,
) -> Result<Option<Arc<dyn FsFile>>, WalError> {
    let oldest = &segments[0];
    if let (Some(first), Some(last)) = (index.first_missing(), index.last_missing()) {
        let reason = format!(
            "entries {first}..={last} are missing: the segments that held them, before segment \
             {}, are gone",
            oldest.seq
        );
        return Err(WalError::corrupt(&oldest.path, 0, reason));
    }
    let newest = segments.last().expect("not empty");
    let last_index = index.last_index();
    if index.hard_state.commit > last_index {
        let reason = format!(
            "the hard state's commit index {} is past the last index {last_index}: committed \
             entries are missing",
            index.hard_state.commit
        );
        return Err(WalError::corrupt(&newest.path, last_segment_end, reason));
    }
    let snapshot_index = index.snapshot.as_ref().map_or(0, |s| s.meta.last.index);
    if index.compacted.index > snapshot_index {
        let reason = format!(
            "the log is compacted through {} but no snapshot covers it (snapshot at {})",
            index.compacted, snapshot_index
        );
        return Err(WalError::corrupt(&newest.path, last_segment_end, reason));
    }
    let Some(snapshot) = &index.snapshot else {
        return Ok(None);
    };
    let path = dir.join(snapshot_file::file_name(snapshot.generation));
    if !fs.exists(&path).ctx("look for", &path)? {
        let reason = format!(
            "the file is missing, but the log names it as the current snapshot ({})",
            snapshot.meta.last
        );
        return Err(WalError::corrupt(&path, 0, reason));
    }
    let file = fs.open(&path).ctx("open", &path)?;
    snapshot_file::verify(file.as_ref(), &path, snapshot)?;
    Ok(Some(file))
}
