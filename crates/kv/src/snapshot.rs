//! Snapshot and restore of the whole state machine, streamed.
//!
//! # Format (version 1)
//!
//! ```text
//! magic            8 bytes  "FLKVSNAP"
//! format version   u32 LE   1
//! records          each: u32 LE length, then a flotilla.kv.v1.SnapshotRecord (protobuf)
//!                  in this order: header; leases by id; keys by key (a long history is
//!                  split over consecutive records of the same key); sessions by id; end
//! checksum         u32 LE   CRC-32C of every byte before it
//! ```
//!
//! The writer encodes one record at a time, so a snapshot never holds a second copy of the
//! store. The reader checks the order, the invariants it can check cheaply, the counts in the
//! end record and the checksum, and builds a new store: a corrupt snapshot gives an error and
//! leaves nothing half-restored. Versioning follows the command rule: records only gain
//! fields; an incompatible change takes a new format version, and later versions keep reading
//! older formats.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use bytes::Bytes;
use flotilla_proto::flotilla::kv::v1 as pb;
use flotilla_proto::flotilla::kv::v1::snapshot_record::Record;
use prost::Message;

use crate::lease::Leases;
use crate::limits::Limits;
use crate::mvcc::{KeyHistory, KeyVersion, Keyspace};
use crate::response::is_recallable;
use crate::session::Sessions;
use crate::store::KvStore;

pub const SNAPSHOT_MAGIC: [u8; 8] = *b"FLKVSNAP";
pub const SNAPSHOT_FORMAT_V1: u32 = 1;
/// Refuse records larger than this, so a corrupt length cannot make the reader allocate
/// gigabytes.
const RECORD_BYTES_MAX: usize = 256 * 1024 * 1024;
/// A key history is split into records of about this size.
const KEY_RECORD_TARGET_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("I/O error while reading the snapshot: {0}")]
    Io(#[from] io::Error),
    #[error("not a Flotilla key-value snapshot (bad magic bytes)")]
    BadMagic,
    #[error("unsupported snapshot format {0} (this version reads format {SNAPSHOT_FORMAT_V1})")]
    UnsupportedFormat(u32),
    #[error("snapshot ends early, in the {0}")]
    Truncated(&'static str),
    #[error("snapshot record {record} is {bytes} bytes, over the {RECORD_BYTES_MAX}-byte limit")]
    RecordTooLarge { record: u64, bytes: usize },
    #[error("snapshot record {record} does not decode: {reason}")]
    Decode { record: u64, reason: String },
    #[error("snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("snapshot record {record} is invalid: {reason}")]
    Invalid { record: u64, reason: String },
    #[error("snapshot has bytes after its checksum")]
    TrailingBytes,
}

// ----- writing -----------------------------------------------------------------------------

/// A snapshot of the store as of one applied index, written in steps while the store goes on
/// applying later entries: a point-in-time view, so apply never waits for a whole snapshot.
///
/// [`KvStore::begin_snapshot`] encodes the small parts at once (header, leases, sessions) and
/// pins the keyspace: until [`KvStore::end_snapshot`], versions are only added, never removed
/// (a compaction meanwhile is deferred), so each [`KvStore::continue_snapshot`] step can read
/// the versions at or below the snapshot's revision where it left off. The bytes are exactly
/// those [`KvStore::write_snapshot`] writes for the store as it was at the begin.
#[derive(Debug)]
pub struct SnapshotCursor {
    /// The pin this cursor holds on its store: a store that does not hold it (replaced by a
    /// restore meanwhile) is not the one being written. `None` when written in one go.
    pin: Option<u64>,
    /// The store revision at the snapshot: later versions are not part of it.
    revision: i64,
    /// The compaction at the snapshot: older versions are not part of it.
    compacted_revision: i64,
    stage: Stage,
    /// Magic, format, header and leases: the first step writes them.
    head: Vec<u8>,
    /// The session records: written after the last key.
    sessions: Vec<u8>,
    lease_count: u64,
    session_count: u64,
    keys_written: u64,
    /// CRC-32C of every byte written so far.
    crc: u32,
}

#[derive(Debug)]
enum Stage {
    Head,
    /// The next version to write is the `offset`-th of `key`'s (or, if `key` is `None`, the
    /// first key's) versions in the snapshot.
    Keys {
        key: Option<Bytes>,
        offset: usize,
    },
    Done,
}

/// Where pins come from: unique per process, so a store restored meanwhile never holds one.
static NEXT_PIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn encode_record(out: &mut Vec<u8>, record: Record) {
    let message = pb::SnapshotRecord {
        record: Some(record),
    };
    let length = u32::try_from(message.encoded_len()).expect("records are split well below 4 GiB");
    out.extend_from_slice(&length.to_le_bytes());
    message.encode(out).expect("a Vec grows as needed");
}

impl KvStore {
    /// Starts a snapshot of the store as it is now, to be written in steps beside later applies
    /// (see [`SnapshotCursor`]). Takes time in proportion to the leases and sessions only.
    /// Several snapshots may be in progress at once; compactions wait for the last to end.
    pub fn begin_snapshot(&mut self) -> SnapshotCursor {
        let pin = NEXT_PIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.keyspace.pin(pin);
        let mut cursor = self.snapshot_cursor();
        cursor.pin = Some(pin);
        cursor
    }

    /// Ends the snapshot `cursor` belongs to, written or abandoned: releases the pin, which
    /// drops the versions a compaction meanwhile left in place (the compaction's own cost, paid
    /// now). Does nothing if the store was replaced since.
    pub fn end_snapshot(&mut self, cursor: SnapshotCursor) {
        if let Some(pin) = cursor.pin {
            self.keyspace.unpin(pin);
        }
    }

    /// Appends the next part of the snapshot to `out`: whole records until at least
    /// `bytes_target` bytes (a step ends early at the end, and a record may take it past the
    /// target by up to one key record, 4 MiB plus a value). Returns true once the snapshot is
    /// complete. Fails if this is no longer the store the snapshot began on.
    pub fn continue_snapshot(
        &self,
        cursor: &mut SnapshotCursor,
        out: &mut Vec<u8>,
        bytes_target: usize,
    ) -> io::Result<bool> {
        if cursor
            .pin
            .is_some_and(|pin| !self.keyspace.is_pinned_by(pin))
        {
            return Err(io::Error::other(
                "the store was replaced while the snapshot was being written",
            ));
        }
        let start = out.len();
        let done = self.write_snapshot_step(cursor, out, start + bytes_target);
        cursor.crc = crc32c::crc32c_append(cursor.crc, &out[start..]);
        if done {
            out.extend_from_slice(&cursor.crc.to_le_bytes());
            cursor.stage = Stage::Done;
        }
        Ok(done)
    }

    /// Writes the whole state to `writer`, record by record.
    pub fn write_snapshot<W: Write>(&self, writer: &mut W) -> io::Result<()> {
        let mut cursor = self.snapshot_cursor();
        let mut chunk = Vec::new();
        loop {
            chunk.clear();
            let done = self.continue_snapshot(&mut cursor, &mut chunk, 256 << 10)?;
            writer.write_all(&chunk)?;
            if done {
                return Ok(());
            }
        }
    }

    /// A cursor at the start of a snapshot of the store as it is now, unpinned.
    fn snapshot_cursor(&self) -> SnapshotCursor {
        let mut head = Vec::new();
        head.extend_from_slice(&SNAPSHOT_MAGIC);
        head.extend_from_slice(&SNAPSHOT_FORMAT_V1.to_le_bytes());
        encode_record(
            &mut head,
            Record::Header(pb::SnapshotHeader {
                applied_index: self.applied_index,
                current_revision: self.keyspace.current_revision(),
                compacted_revision: self.keyspace.compacted_revision(),
                next_lease_id: self.leases.next_id(),
            }),
        );
        for lease in self.leases.iter() {
            encode_record(
                &mut head,
                Record::Lease(pb::LeaseState {
                    id: lease.id(),
                    granted_ttl: lease.granted_ttl_seconds(),
                    remaining_ttl: lease.checkpointed_remaining_ttl_seconds().unwrap_or(0),
                }),
            );
        }
        let mut sessions = Vec::new();
        for session in self.sessions.iter() {
            encode_record(
                &mut sessions,
                Record::Session(pb::SessionState {
                    id: session.id(),
                    last_sequence: session.last_sequence(),
                    last_used_index: session.last_used_index(),
                    remembered: session.remembered().cloned(),
                }),
            );
        }
        SnapshotCursor {
            pin: None,
            revision: self.keyspace.current_revision(),
            compacted_revision: self.keyspace.compacted_revision(),
            stage: Stage::Head,
            head,
            sessions,
            lease_count: self.leases.iter().len() as u64,
            session_count: self.sessions.len() as u64,
            keys_written: 0,
            crc: 0,
        }
    }

    /// Writes records until `out` reaches `bytes_end` or the snapshot ends (true).
    fn write_snapshot_step(
        &self,
        cursor: &mut SnapshotCursor,
        out: &mut Vec<u8>,
        bytes_end: usize,
    ) -> bool {
        loop {
            match &mut cursor.stage {
                Stage::Head => {
                    out.append(&mut cursor.head);
                    cursor.stage = Stage::Keys {
                        key: None,
                        offset: 0,
                    };
                }
                Stage::Keys { key, offset } => {
                    let (from_key, from_offset) = (key.take(), *offset);
                    if let Some((key, offset)) =
                        self.write_keys(cursor, from_key, from_offset, out, bytes_end)
                    {
                        cursor.stage = Stage::Keys {
                            key: Some(key),
                            offset,
                        };
                        return false;
                    }
                    out.append(&mut cursor.sessions);
                    encode_record(
                        out,
                        Record::End(pb::SnapshotEnd {
                            key_count: cursor.keys_written,
                            lease_count: cursor.lease_count,
                            session_count: cursor.session_count,
                        }),
                    );
                    return true;
                }
                Stage::Done => panic!("the snapshot is already complete"),
            }
            if out.len() >= bytes_end {
                return false;
            }
        }
    }

    /// Writes key records from `from_key`'s `from_offset`-th version on, until `out` reaches
    /// `bytes_end` (returns where to go on) or the keys end (`None`). A key's versions are those
    /// kept by the snapshot's compaction, up to its revision; keys with none are skipped.
    fn write_keys(
        &self,
        cursor: &mut SnapshotCursor,
        from_key: Option<Bytes>,
        from_offset: usize,
        out: &mut Vec<u8>,
        bytes_end: usize,
    ) -> Option<(Bytes, usize)> {
        let histories = self
            .keyspace
            .histories_from(from_key.as_ref(), cursor.compacted_revision);
        // Only the first key can be the one to resume: the keys start at it.
        let mut resume = from_key.as_ref().map(|key| (key, from_offset));
        for (key, versions) in histories {
            let offset = match resume.take() {
                Some((resume_key, offset)) if resume_key == key => offset,
                _ => 0,
            };
            let count = versions.partition_point(|version| version.mod_revision <= cursor.revision);
            if offset >= count {
                continue;
            }
            if offset == 0 {
                cursor.keys_written += 1;
            }
            let mut next = offset;
            while next < count {
                next += write_key_record(out, key, &versions[next..count]);
                if out.len() >= bytes_end {
                    return Some((key.clone(), next));
                }
            }
        }
        None
    }

    /// A 64-bit digest of the whole logical state (FNV-1a over the snapshot encoding, which
    /// is canonical: every collection is written in key order). Equal states have equal
    /// digests on every machine.
    pub fn digest(&self) -> u64 {
        let mut hasher = Fnv1a64::default();
        self.write_snapshot(&mut hasher)
            .expect("hashing never fails");
        hasher.state
    }
}

/// Writes one record of `key`'s versions, from the first of `versions` up to about
/// [`KEY_RECORD_TARGET_BYTES`] (a long history takes several). Returns how many it wrote.
fn write_key_record(out: &mut Vec<u8>, key: &Bytes, versions: &[KeyVersion]) -> usize {
    let mut record = Vec::new();
    let mut record_bytes = 0;
    for version in versions {
        record_bytes += version.value.len() + 64;
        record.push(pb::KeyVersion {
            mod_revision: version.mod_revision,
            sub_revision: version.sub_revision,
            create_revision: version.create_revision,
            version: version.version,
            lease: version.lease,
            value: version.value.clone(),
        });
        if record_bytes >= KEY_RECORD_TARGET_BYTES {
            break;
        }
    }
    let written = record.len();
    encode_record(
        out,
        Record::Key(pb::KeyHistory {
            key: key.clone(),
            versions: record,
        }),
    );
    written
}

#[derive(Debug)]
struct Fnv1a64 {
    state: u64,
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64 {
            state: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Write for Fnv1a64 {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        for &byte in bytes {
            self.state = (self.state ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ----- reading -----------------------------------------------------------------------------

struct ChecksumReader<'a, R: Read> {
    inner: &'a mut R,
    crc: u32,
    records_read: u64,
}

impl<R: Read> ChecksumReader<'_, R> {
    fn read_exact_unchecked(
        &mut self,
        buffer: &mut [u8],
        what: &'static str,
    ) -> Result<(), SnapshotError> {
        self.inner.read_exact(buffer).map_err(|error| {
            if error.kind() == io::ErrorKind::UnexpectedEof {
                SnapshotError::Truncated(what)
            } else {
                SnapshotError::Io(error)
            }
        })
    }

    fn read_exact(&mut self, buffer: &mut [u8], what: &'static str) -> Result<(), SnapshotError> {
        self.read_exact_unchecked(buffer, what)?;
        self.crc = crc32c::crc32c_append(self.crc, buffer);
        Ok(())
    }

    fn read_u32(&mut self, what: &'static str) -> Result<u32, SnapshotError> {
        let mut bytes = [0; 4];
        self.read_exact(&mut bytes, what)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn read_record(&mut self) -> Result<Record, SnapshotError> {
        let record = self.records_read;
        self.records_read += 1;
        let bytes = self.read_u32("record length")? as usize;
        if bytes > RECORD_BYTES_MAX {
            return Err(SnapshotError::RecordTooLarge { record, bytes });
        }
        // Read through `take` rather than into a buffer of the claimed size, so a corrupt
        // length cannot allocate more than the input really holds.
        let mut buffer = Vec::new();
        (&mut *self.inner)
            .take(bytes as u64)
            .read_to_end(&mut buffer)?;
        if buffer.len() != bytes {
            return Err(SnapshotError::Truncated("record body"));
        }
        self.crc = crc32c::crc32c_append(self.crc, &buffer);
        let decoded = pb::SnapshotRecord::decode(buffer.as_slice()).map_err(|error| {
            SnapshotError::Decode {
                record,
                reason: error.to_string(),
            }
        })?;
        decoded.record.ok_or_else(|| SnapshotError::Decode {
            record,
            reason: "record has no content (written by a newer version?)".into(),
        })
    }

    fn invalid(&self, reason: impl Into<String>) -> SnapshotError {
        SnapshotError::Invalid {
            record: self.records_read.saturating_sub(1),
            reason: reason.into(),
        }
    }
}

/// The parts of a store as they are read back.
struct Restoring {
    header: pb::SnapshotHeader,
    leases: Leases,
    keys: BTreeMap<Bytes, KeyHistory>,
    /// The key being read: its histories may span several records.
    open_key: Option<(Bytes, Vec<KeyVersion>)>,
    sessions: Sessions,
}

impl KvStore {
    /// Reads a snapshot written by [`KvStore::write_snapshot`] into a new store.
    /// `limits.sessions` must be the cluster's (a snapshot with more sessions is refused).
    pub fn restore<R: Read>(reader: &mut R, limits: Limits) -> Result<KvStore, SnapshotError> {
        let mut input = ChecksumReader {
            inner: reader,
            crc: 0,
            records_read: 0,
        };
        let mut magic = [0; 8];
        input.read_exact(&mut magic, "magic bytes")?;
        if magic != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let format = input.read_u32("format version")?;
        if format != SNAPSHOT_FORMAT_V1 {
            return Err(SnapshotError::UnsupportedFormat(format));
        }
        let Record::Header(header) = input.read_record()? else {
            return Err(input.invalid("the first record is not the header"));
        };
        let mut restoring = Restoring {
            header,
            leases: Leases::default(),
            keys: BTreeMap::new(),
            open_key: None,
            sessions: Sessions::new(limits.sessions.clone()),
        };
        let end = read_body(&mut input, &mut restoring)?;
        let computed = input.crc;
        let mut stored = [0; 4];
        input.read_exact_unchecked(&mut stored, "checksum")?;
        let stored = u32::from_le_bytes(stored);
        if stored != computed {
            return Err(SnapshotError::ChecksumMismatch { stored, computed });
        }
        if input.inner.read(&mut [0; 1])? != 0 {
            return Err(SnapshotError::TrailingBytes);
        }
        restoring.finish(&input, &end, limits)
    }
}

/// Reads leases, keys and sessions, in that order, up to the end record.
fn read_body<R: Read>(
    input: &mut ChecksumReader<'_, R>,
    restoring: &mut Restoring,
) -> Result<pb::SnapshotEnd, SnapshotError> {
    // 0: leases, 1: keys, 2: sessions.
    let mut section = 0;
    loop {
        let record = input.read_record()?;
        let record_section = match &record {
            Record::Lease(_) => 0,
            Record::Key(_) => 1,
            Record::Session(_) => 2,
            Record::End(_) => 3,
            Record::Header(_) => return Err(input.invalid("a second header")),
        };
        if record_section < section {
            return Err(input.invalid("records out of order"));
        }
        section = record_section;
        let result = match record {
            Record::Lease(lease) => {
                restoring
                    .leases
                    .restore(lease.id, lease.granted_ttl, lease.remaining_ttl)
            }
            Record::Key(history) => restoring.add_key_history(history),
            Record::Session(session) => restoring.add_session(session),
            Record::End(end) => {
                restoring
                    .close_key()
                    .map_err(|reason| input.invalid(reason))?;
                return Ok(end);
            }
            Record::Header(_) => unreachable!("refused above"),
        };
        result.map_err(|reason| input.invalid(reason))?;
    }
}

impl Restoring {
    fn add_key_history(&mut self, history: pb::KeyHistory) -> Result<(), String> {
        if history.key.is_empty() {
            return Err("empty key".into());
        }
        let versions = history
            .versions
            .into_iter()
            .map(|version| restore_version(&history.key, version))
            .collect::<Result<Vec<_>, _>>()?;
        match &mut self.open_key {
            Some((open, open_versions)) if *open == history.key => {
                open_versions.extend(versions);
                return Ok(());
            }
            Some((open, _)) if *open > history.key => {
                return Err("keys out of order".into());
            }
            _ => {}
        }
        self.close_key()?;
        self.open_key = Some((history.key, versions));
        Ok(())
    }

    fn close_key(&mut self) -> Result<(), String> {
        if let Some((key, versions)) = self.open_key.take() {
            let history = KeyHistory::from_versions(versions)
                .map_err(|reason| format!("key {key:?}: {reason}"))?;
            if let Some(live) = history.latest_live()
                && live.lease != 0
            {
                if !self.leases.contains(live.lease) {
                    return Err(format!(
                        "key {key:?} refers to missing lease {}",
                        live.lease
                    ));
                }
                self.leases.attach(live.lease, &key);
            }
            self.keys.insert(key, history);
        }
        Ok(())
    }

    fn add_session(&mut self, session: pb::SessionState) -> Result<(), String> {
        // Ids are registration indexes, so no session can be newer than the applied index;
        // a later registration would otherwise collide with it.
        if session.id > self.header.applied_index {
            return Err(format!(
                "session {} is newer than the applied index {}",
                session.id, self.header.applied_index
            ));
        }
        if let Some(remembered) = &session.remembered
            && !is_recallable(remembered)
        {
            return Err(format!("session {} has an unreadable outcome", session.id));
        }
        self.sessions.restore(
            session.id,
            session.last_sequence,
            session.last_used_index,
            session.remembered,
        )
    }

    fn finish<R: Read>(
        mut self,
        input: &ChecksumReader<'_, R>,
        end: &pb::SnapshotEnd,
        limits: Limits,
    ) -> Result<KvStore, SnapshotError> {
        let counts = (
            self.keys.len() as u64,
            self.leases.iter().len() as u64,
            self.sessions.len() as u64,
        );
        if counts != (end.key_count, end.lease_count, end.session_count) {
            return Err(input.invalid(format!(
                "read {counts:?} keys, leases, sessions; the end record says {:?}",
                (end.key_count, end.lease_count, end.session_count)
            )));
        }
        let header = &self.header;
        let keyspace = Keyspace::from_parts(
            self.keys,
            header.current_revision,
            header.compacted_revision,
        )
        .map_err(|reason| input.invalid(reason))?;
        self.leases.set_next_id(header.next_lease_id);
        Ok(KvStore {
            limits,
            keyspace,
            leases: self.leases,
            sessions: self.sessions,
            applied_index: header.applied_index,
        })
    }
}

fn restore_version(key: &Bytes, version: pb::KeyVersion) -> Result<KeyVersion, String> {
    let tombstone = version.version == 0;
    let consistent = if tombstone {
        version.create_revision == 0 && version.lease == 0 && version.value.is_empty()
    } else {
        version.version > 0
            && version.create_revision > 0
            && version.create_revision <= version.mod_revision
    };
    if version.mod_revision <= 0 || !consistent {
        return Err(format!(
            "key {key:?} has an inconsistent version at revision {}",
            version.mod_revision
        ));
    }
    Ok(KeyVersion {
        mod_revision: version.mod_revision,
        create_revision: version.create_revision,
        version: version.version,
        lease: version.lease,
        sub_revision: version.sub_revision,
        value: version.value,
    })
}
