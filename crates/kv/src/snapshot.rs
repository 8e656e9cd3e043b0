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

struct ChecksumWriter<'a, W: Write> {
    inner: &'a mut W,
    crc: u32,
    record: Vec<u8>,
}

impl<W: Write> ChecksumWriter<'_, W> {
    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.inner.write_all(bytes)
    }

    fn write_record(&mut self, record: Record) -> io::Result<()> {
        let mut buffer = std::mem::take(&mut self.record);
        buffer.clear();
        pb::SnapshotRecord {
            record: Some(record),
        }
        .encode(&mut buffer)
        .expect("a Vec grows as needed");
        let length = u32::try_from(buffer.len()).expect("records are split well below 4 GiB");
        self.write_bytes(&length.to_le_bytes())?;
        self.write_bytes(&buffer)?;
        self.record = buffer;
        Ok(())
    }
}

impl KvStore {
    /// Writes the whole state to `writer`, record by record.
    pub fn write_snapshot<W: Write>(&self, writer: &mut W) -> io::Result<()> {
        let mut out = ChecksumWriter {
            inner: writer,
            crc: 0,
            record: Vec::new(),
        };
        out.write_bytes(&SNAPSHOT_MAGIC)?;
        out.write_bytes(&SNAPSHOT_FORMAT_V1.to_le_bytes())?;
        out.write_record(Record::Header(pb::SnapshotHeader {
            applied_index: self.applied_index,
            current_revision: self.keyspace.current_revision(),
            compacted_revision: self.keyspace.compacted_revision(),
            next_lease_id: self.leases.next_id(),
        }))?;
        for lease in self.leases.iter() {
            out.write_record(Record::Lease(pb::LeaseState {
                id: lease.id(),
                granted_ttl: lease.granted_ttl_seconds(),
                remaining_ttl: lease.checkpointed_remaining_ttl_seconds().unwrap_or(0),
            }))?;
        }
        for (key, history) in self.keyspace.histories() {
            write_key_history(&mut out, key, history)?;
        }
        for session in self.sessions.iter() {
            out.write_record(Record::Session(pb::SessionState {
                id: session.id(),
                last_sequence: session.last_sequence(),
                last_used_index: session.last_used_index(),
                remembered: session.remembered().cloned(),
            }))?;
        }
        out.write_record(Record::End(pb::SnapshotEnd {
            key_count: self.keyspace.key_count() as u64,
            lease_count: self.leases.iter().len() as u64,
            session_count: self.sessions.len() as u64,
        }))?;
        let crc = out.crc;
        out.inner.write_all(&crc.to_le_bytes())
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

fn write_key_history<W: Write>(
    out: &mut ChecksumWriter<'_, W>,
    key: &Bytes,
    history: &KeyHistory,
) -> io::Result<()> {
    let mut versions = Vec::new();
    let mut record_bytes = 0;
    for version in history.versions() {
        record_bytes += version.value.len() + 64;
        versions.push(pb::KeyVersion {
            mod_revision: version.mod_revision,
            sub_revision: version.sub_revision,
            create_revision: version.create_revision,
            version: version.version,
            lease: version.lease,
            value: version.value.clone(),
        });
        if record_bytes >= KEY_RECORD_TARGET_BYTES {
            let chunk = std::mem::take(&mut versions);
            out.write_record(Record::Key(pb::KeyHistory {
                key: key.clone(),
                versions: chunk,
            }))?;
            record_bytes = 0;
        }
    }
    if !versions.is_empty() {
        out.write_record(Record::Key(pb::KeyHistory {
            key: key.clone(),
            versions,
        }))?;
    }
    Ok(())
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
