//! Record framing: how one record of the log is laid out on disk, checksummed and parsed.
//!
//! ```text
//!   offset  size  field
//!   0       4     crc32c over bytes 4..16 and the payload (Castagnoli, as etcd's WAL)
//!   4       4     payload_bytes
//!   8       1     kind (never 0: an all-zero header is unwritten space)
//!   9       3     reserved, zero
//!   12      4     the low 32 bits of the segment's number
//!   16      n     payload
//!   16+n    0..7  zero padding to a multiple of 8 bytes (not checksummed)
//! ```
//!
//! All integers are little-endian. Records start at multiples of 8, which lets recovery look
//! for surviving records after a damaged one without trying every byte. The segment number
//! makes records left in a recycled segment file (from its previous life) recognisable as not
//! belonging to the log, whatever their checksum says.

use bytes::{BufMut, Bytes};
use flotilla_raft::codec::{self, DecodeError, Reader};
use flotilla_raft::{EntryId, HardState, Index, SnapshotMeta};

pub(crate) const HEADER_BYTES: usize = 16;
pub(crate) const RECORD_ALIGN_BYTES: usize = 8;
/// The largest payload a record may carry. Larger entries are refused rather than written.
pub(crate) const PAYLOAD_BYTES_MAX: usize = 256 << 20;

/// What a record says. The numbers are part of the on-disk format: never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RecordKind {
    /// First record of every segment: the state of the log when the segment was started.
    Checkpoint = 1,
    /// One log entry, encoded with the core's codec. An entry at or below the last index
    /// replaces the suffix from there on (truncation).
    Entry = 2,
    HardState = 3,
    /// Entries up to and including this id are discarded.
    Compact = 4,
    /// A snapshot received from the leader became current; the log keeps only
    /// `(snapshot.last, keep_through]`.
    SnapshotInstall = 5,
    /// The local state machine saved a snapshot; the log is untouched.
    SnapshotSaved = 6,
    /// Written first after an fsync: everything in this segment before `durable_through` is
    /// known to be on disk. Recovery uses it to tell a torn tail from damaged durable data.
    SyncMark = 7,
    /// Filler up to a page boundary after a large write, so that the next write starts on one.
    Padding = 8,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Checkpoint,
            2 => Self::Entry,
            3 => Self::HardState,
            4 => Self::Compact,
            5 => Self::SnapshotInstall,
            6 => Self::SnapshotSaved,
            7 => Self::SyncMark,
            8 => Self::Padding,
            _ => return None,
        })
    }
}

/// The bytes a record with `payload_bytes` of payload takes, padding included.
pub(crate) fn record_bytes(payload_bytes: usize) -> usize {
    (HEADER_BYTES + payload_bytes).next_multiple_of(RECORD_ALIGN_BYTES)
}

/// The header's segment field: the low 32 bits of the segment number.
fn segment_tag(seq: u64) -> [u8; 4] {
    (seq as u32).to_le_bytes()
}

/// Appends one record of segment `seq` to `out`; `write_payload` appends the payload. `out`
/// must end on a record boundary. Returns the record's size on disk.
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    kind: RecordKind,
    seq: u64,
    write_payload: impl FnOnce(&mut Vec<u8>),
) -> usize {
    assert_eq!(out.len() % RECORD_ALIGN_BYTES, 0, "record not aligned");
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    write_payload(out);
    let payload_bytes = out.len() - start - HEADER_BYTES;
    assert!(
        payload_bytes <= PAYLOAD_BYTES_MAX,
        "record payload too large"
    );
    out[start + 4..start + 8].copy_from_slice(&(payload_bytes as u32).to_le_bytes());
    out[start + 8] = kind as u8;
    out[start + 12..start + 16].copy_from_slice(&segment_tag(seq));
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    out.resize(start + record_bytes(payload_bytes), 0);
    out.len() - start
}

/// Moves an encoded record (at the start of `record`) to segment `seq`, checksumming it anew.
pub(crate) fn reseal(record: &mut [u8], seq: u64) {
    let payload_bytes = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as usize;
    record[12..16].copy_from_slice(&segment_tag(seq));
    let crc = crc32c::crc32c(&record[4..HEADER_BYTES + payload_bytes]);
    record[0..4].copy_from_slice(&crc.to_le_bytes());
}

/// What lies at an offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    Record {
        kind: RecordKind,
        payload: &'a [u8],
        /// The offset just past this record and its padding.
        next: usize,
    },
    /// An all-zero header: space never written.
    Unwritten,
    /// A valid record of another segment: left from a recycled file's previous life.
    OtherSegment,
    /// Fewer bytes than a header are left.
    End,
    /// Not a valid record; says why.
    Invalid(String),
}

/// Parses the record of segment `seq` at `offset` of `buf`, checking its checksum.
pub(crate) fn parse_record(buf: &[u8], offset: usize, seq: u64) -> Parsed<'_> {
    debug_assert_eq!(offset % RECORD_ALIGN_BYTES, 0);
    let Some(header) = buf.get(offset..offset + HEADER_BYTES) else {
        return Parsed::End;
    };
    if header.iter().all(|&b| b == 0) {
        return Parsed::Unwritten;
    }
    let crc = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let payload_bytes = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    let Some(kind) = RecordKind::from_u8(header[8]) else {
        return Parsed::Invalid(format!("unknown record kind {}", header[8]));
    };
    if header[9..12] != [0, 0, 0] {
        return Parsed::Invalid("reserved header bytes are not zero".into());
    }
    if payload_bytes > PAYLOAD_BYTES_MAX {
        return Parsed::Invalid(format!("payload length {payload_bytes} is impossible"));
    }
    let payload_start = offset + HEADER_BYTES;
    let payload_end = payload_start + payload_bytes;
    if payload_end > buf.len() {
        return Parsed::Invalid(format!(
            "payload of {payload_bytes} bytes runs past the end of the file"
        ));
    }
    let actual = crc32c::crc32c_append(
        crc32c::crc32c(&header[4..]),
        &buf[payload_start..payload_end],
    );
    if actual != crc {
        return Parsed::Invalid(format!(
            "checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"
        ));
    }
    if header[12..16] != segment_tag(seq) {
        return Parsed::OtherSegment;
    }
    Parsed::Record {
        kind,
        payload: &buf[payload_start..payload_end],
        next: offset + record_bytes(payload_bytes),
    }
}

// ----- Payloads ------------------------------------------------------------------------------

/// A reference from the log to a snapshot file: which one, and what it must contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotRef {
    /// The file's generation number, unique within the directory (the file name).
    pub generation: u64,
    pub meta: SnapshotMeta,
    pub data_bytes: u64,
    pub data_crc: u32,
}

/// The first record of every segment: the state of the log at the point the segment starts,
/// so that the segments before it can be deleted once compaction no longer needs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub segment_seq: u64,
    /// Where the valid records of the previous segment end, or `None` for the first segment.
    /// Everything the previous segment holds before this offset must parse.
    pub prev_segment_end: Option<u64>,
    pub compacted: EntryId,
    pub last: EntryId,
    pub hard_state: HardState,
    pub snapshot: Option<SnapshotRef>,
}

/// A decoded record (entries keep only what recovery needs: their id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    Checkpoint(Checkpoint),
    Entry(EntryId),
    HardState(HardState),
    Compact(EntryId),
    SnapshotInstall {
        snapshot: SnapshotRef,
        keep_through: Index,
    },
    SnapshotSaved(SnapshotRef),
    SyncMark {
        durable_through: u64,
    },
    Padding,
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Self::Checkpoint(_) => RecordKind::Checkpoint,
            Self::Entry(_) => RecordKind::Entry,
            Self::HardState(_) => RecordKind::HardState,
            Self::Compact(_) => RecordKind::Compact,
            Self::SnapshotInstall { .. } => RecordKind::SnapshotInstall,
            Self::SnapshotSaved(_) => RecordKind::SnapshotSaved,
            Self::SyncMark { .. } => RecordKind::SyncMark,
            Self::Padding => RecordKind::Padding,
        }
    }
}

fn put_entry_id(out: &mut Vec<u8>, id: EntryId) {
    out.put_u64_le(id.term);
    out.put_u64_le(id.index);
}

fn get_entry_id(r: &mut Reader, what: &'static str) -> Result<EntryId, DecodeError> {
    let term = r.u64(what)?;
    let index = r.u64(what)?;
    Ok(EntryId::new(term, index))
}

pub(crate) fn put_snapshot_ref(out: &mut Vec<u8>, snapshot: &SnapshotRef) {
    out.put_u64_le(snapshot.generation);
    out.put_u64_le(snapshot.data_bytes);
    out.put_u32_le(snapshot.data_crc);
    codec::encode_snapshot_meta(out, &snapshot.meta);
}

pub(crate) fn get_snapshot_ref(r: &mut Reader) -> Result<SnapshotRef, DecodeError> {
    Ok(SnapshotRef {
        generation: r.u64("snapshot generation")?,
        data_bytes: r.u64("snapshot size")?,
        data_crc: r.u32("snapshot checksum")?,
        meta: codec::decode_snapshot_meta(r)?,
    })
}

const NO_PREV_SEGMENT: u64 = u64::MAX;

pub(crate) fn put_checkpoint(out: &mut Vec<u8>, checkpoint: &Checkpoint) {
    out.put_u64_le(checkpoint.segment_seq);
    out.put_u64_le(checkpoint.prev_segment_end.unwrap_or(NO_PREV_SEGMENT));
    put_entry_id(out, checkpoint.compacted);
    put_entry_id(out, checkpoint.last);
    codec::encode_hard_state(out, &checkpoint.hard_state);
    match &checkpoint.snapshot {
        None => out.put_u8(0),
        Some(snapshot) => {
            out.put_u8(1);
            put_snapshot_ref(out, snapshot);
        }
    }
}

fn get_checkpoint(r: &mut Reader) -> Result<Checkpoint, DecodeError> {
    let segment_seq = r.u64("segment number")?;
    let prev = r.u64("previous segment end")?;
    let compacted = get_entry_id(r, "compacted id")?;
    let last = get_entry_id(r, "last id")?;
    let hard_state = codec::decode_hard_state(r)?;
    let snapshot = match r.bool("snapshot flag")? {
        false => None,
        true => Some(get_snapshot_ref(r)?),
    };
    Ok(Checkpoint {
        segment_seq,
        prev_segment_end: (prev != NO_PREV_SEGMENT).then_some(prev),
        compacted,
        last,
        hard_state,
        snapshot,
    })
}

pub(crate) fn put_compact(out: &mut Vec<u8>, compacted: EntryId) {
    put_entry_id(out, compacted);
}

pub(crate) fn put_snapshot_install(out: &mut Vec<u8>, snapshot: &SnapshotRef, keep: Index) {
    out.put_u64_le(keep);
    put_snapshot_ref(out, snapshot);
}

pub(crate) fn put_sync_mark(out: &mut Vec<u8>, durable_through: u64) {
    out.put_u64_le(durable_through);
}

/// Decodes a checksummed payload. Entries are only checked as far as their id and tag: their
/// full decoding happens when they are read.
pub(crate) fn decode_record(kind: RecordKind, payload: &[u8]) -> Result<Record, DecodeError> {
    if kind == RecordKind::Entry {
        return decode_entry_id(payload);
    }
    let mut r = Reader::new(Bytes::copy_from_slice(payload));
    let record = match kind {
        RecordKind::Checkpoint => Record::Checkpoint(get_checkpoint(&mut r)?),
        RecordKind::Entry => unreachable!("handled above"),
        RecordKind::HardState => Record::HardState(codec::decode_hard_state(&mut r)?),
        RecordKind::Compact => Record::Compact(get_entry_id(&mut r, "compacted id")?),
        RecordKind::SnapshotInstall => {
            let keep_through = r.u64("keep_through")?;
            let snapshot = get_snapshot_ref(&mut r)?;
            Record::SnapshotInstall {
                snapshot,
                keep_through,
            }
        }
        RecordKind::SnapshotSaved => Record::SnapshotSaved(get_snapshot_ref(&mut r)?),
        RecordKind::SyncMark => Record::SyncMark {
            durable_through: r.u64("durable offset")?,
        },
        RecordKind::Padding => {
            let _ = r.bytes("padding")?;
            Record::Padding
        }
    };
    r.finish("record")?;
    Ok(record)
}

/// The id at the front of an encoded entry (the codec writes term, index, payload tag, ...).
fn decode_entry_id(payload: &[u8]) -> Result<Record, DecodeError> {
    const ENTRY_BYTES_MIN: usize = 17;
    if payload.len() < ENTRY_BYTES_MIN {
        return Err(DecodeError::Truncated {
            what: "entry",
            needed: ENTRY_BYTES_MIN - payload.len(),
            offset: payload.len(),
        });
    }
    let term = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
    Ok(Record::Entry(EntryId::new(term, index)))
}

#[cfg(test)]
mod tests {
    use flotilla_raft::Membership;

    use super::*;

    fn sample_records() -> Vec<(RecordKind, Vec<u8>)> {
        let snapshot = SnapshotRef {
            generation: 3,
            meta: SnapshotMeta {
                last: EntryId::new(2, 40),
                membership: Membership::with_voters([1, 2, 3]),
            },
            data_bytes: 1234,
            data_crc: 0xdead_beef,
        };
        let checkpoint = Checkpoint {
            segment_seq: 9,
            prev_segment_end: Some(4096),
            compacted: EntryId::new(1, 10),
            last: EntryId::new(2, 50),
            hard_state: HardState {
                term: 2,
                vote: 1,
                commit: 45,
            },
            snapshot: Some(snapshot.clone()),
        };
        let mut out = Vec::new();
        put_checkpoint(&mut out, &checkpoint);
        let mut install = Vec::new();
        put_snapshot_install(&mut install, &snapshot, 44);
        vec![
            (RecordKind::Checkpoint, out),
            (RecordKind::SnapshotInstall, install),
            (RecordKind::SyncMark, 96u64.to_le_bytes().to_vec()),
        ]
    }

    #[test]
    fn records_round_trip_and_are_aligned() {
        let mut buf = Vec::new();
        for (kind, payload) in sample_records() {
            let bytes = encode_record(&mut buf, kind, 9, |out| out.extend_from_slice(&payload));
            assert_eq!(bytes % RECORD_ALIGN_BYTES, 0);
        }
        let mut offset = 0;
        for (kind, payload) in sample_records() {
            let Parsed::Record {
                kind: parsed_kind,
                payload: parsed,
                next,
            } = parse_record(&buf, offset, 9)
            else {
                panic!("record at {offset} does not parse");
            };
            assert_eq!((parsed_kind, parsed), (kind, payload.as_slice()));
            decode_record(kind, parsed).unwrap();
            offset = next;
        }
        assert_eq!(parse_record(&buf, offset, 9), Parsed::End);
        buf.extend_from_slice(&[0; 32]);
        assert_eq!(parse_record(&buf, offset, 9), Parsed::Unwritten);
        assert_eq!(parse_record(&buf, 0, 10), Parsed::OtherSegment);
    }

    #[test]
    fn a_resealed_record_belongs_to_its_new_segment() {
        let mut buf = Vec::new();
        encode_record(&mut buf, RecordKind::SyncMark, 4, |out| {
            put_sync_mark(out, 8)
        });
        reseal(&mut buf, 5);
        assert_eq!(parse_record(&buf, 0, 4), Parsed::OtherSegment);
        assert!(matches!(parse_record(&buf, 0, 5), Parsed::Record { .. }));
    }

    #[test]
    fn every_single_bit_flip_in_a_record_is_caught() {
        let mut buf = Vec::new();
        encode_record(&mut buf, RecordKind::HardState, 3, |out| {
            codec::encode_hard_state(out, &HardState::default())
        });
        let checked_bytes = HEADER_BYTES + 24;
        for bit in 0..checked_bytes * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(parse_record(&damaged, 0, 3), Parsed::Invalid(_)),
                "flip of bit {bit} went unnoticed"
            );
        }
    }
}
