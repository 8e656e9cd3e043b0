//! Backups: a member's state as of one moment, streamed to a client by `Maintenance.Snapshot`
//! (so `etcdctl snapshot save` works), and what reads them back (`flotilla snapshot status`
//! and `flotilla snapshot restore`). `Maintenance.Hash` hashes the same bytes.
//!
//! The state is encoded in steps from a pinned point-in-time view (see
//! [`StateMachine::begin_snapshot`]): apply goes on meanwhile, waiting at most for one step.
//!
//! # File format
//!
//! ```text
//! state     the state machine's snapshot encoding (member table and key-value store)
//! padding   zero bytes, so that everything before the digest is a multiple of 512 bytes
//! trailer   "FLBACKUP", then the state's length (u64 LE)
//! digest    SHA-256 of everything before it (32 bytes)
//! ```
//!
//! etcd streams its database followed by the SHA-256 of it, and etcdctl keeps a saved file
//! only if its size is a multiple of 512 plus the 32 digest bytes (etcd's pages); the padding
//! gives our files that shape.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::RwLock;

use flotilla_kv::Limits;
use sha2::{Digest, Sha256};

use crate::state_machine::{RestoreError, StateMachine};

const TRAILER_MAGIC: &[u8; 8] = b"FLBACKUP";
const TRAILER_BYTES: u64 = 16;
const DIGEST_BYTES: u64 = 32;
const SECTOR_BYTES: u64 = 512;
/// How much each encoding step writes: one step holds the state's read lock (about a tenth
/// of a millisecond), and the encoder idles after it (`flotilla_runtime::node::paced`).
pub const STEP_BYTES: usize = 64 << 10;

/// The moment a backup or hash is taken at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointInTime {
    pub applied_index: u64,
    pub revision: i64,
}

/// Encodes the state as it is now, a step at a time at a third of a core at most, passing
/// each step's bytes to `sink`.
/// The state is pinned for the duration (compactions meanwhile wait; nothing else does).
pub fn encode_state(
    state: &RwLock<StateMachine>,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<PointInTime> {
    let (mut cursor, at) = {
        let mut state = state.write().unwrap_or_else(|p| p.into_inner());
        let at = PointInTime {
            applied_index: state.applied_index(),
            revision: state.kv.current_revision(),
        };
        (state.begin_snapshot(), at)
    };
    let mut encode = || -> io::Result<()> {
        let mut step = Vec::with_capacity(STEP_BYTES + (STEP_BYTES >> 2));
        loop {
            step.clear();
            let done = flotilla_runtime::node::paced(|| {
                state
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .continue_snapshot(&mut cursor, &mut step, STEP_BYTES)
            })?;
            sink(&step)?;
            if done {
                return Ok(());
            }
        }
    };
    let encoded = encode();
    state
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .end_snapshot(cursor);
    encoded.map(|()| at)
}

/// Writes a backup file: the state's bytes as they come, then [`BackupWriter::finish`].
#[derive(Debug)]
pub struct BackupWriter<W: Write> {
    out: W,
    digest: Sha256,
    state_bytes: u64,
}

impl<W: Write> BackupWriter<W> {
    pub fn new(out: W) -> Self {
        BackupWriter {
            out,
            digest: Sha256::new(),
            state_bytes: 0,
        }
    }

    pub fn write_state(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(bytes)?;
        self.state_bytes += bytes.len() as u64;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.digest.update(bytes);
        self.out.write_all(bytes)
    }

    /// Writes the padding, the trailer and the digest; returns the writer and the file's
    /// length.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        let unpadded = self.state_bytes + TRAILER_BYTES;
        let padding = (SECTOR_BYTES - unpadded % SECTOR_BYTES) % SECTOR_BYTES;
        self.put(&vec![0; padding as usize])?;
        let mut trailer = Vec::with_capacity(TRAILER_BYTES as usize);
        trailer.extend_from_slice(TRAILER_MAGIC);
        trailer.extend_from_slice(&self.state_bytes.to_le_bytes());
        self.put(&trailer)?;
        let digest = self.digest.finalize();
        self.out.write_all(&digest)?;
        Ok((self.out, unpadded + padding + DIGEST_BYTES))
    }
}

/// Writes a backup of `state` as it is now into a temporary file in `dir`, unlinked at once
/// (nothing is left behind, even by a crash); returns the file, rewound, its length and the
/// moment it holds. The state stays pinned only while it is encoded, not while a slow client
/// downloads the file.
pub fn backup_to_temporary_file(
    state: &RwLock<StateMachine>,
    dir: &Path,
) -> io::Result<(std::fs::File, u64, PointInTime)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("backup-{}-{number}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    let mut writer = BackupWriter::new(io::BufWriter::with_capacity(1 << 20, &mut file));
    let at = encode_state(state, |bytes| writer.write_state(bytes))?;
    let (mut buffered, size) = writer.finish()?;
    buffered.flush()?;
    drop(buffered);
    file.seek(SeekFrom::Start(0))?;
    Ok((file, size, at))
}

/// The CRC-32C of the state's encoding as it is now (what `Maintenance.Hash` answers, and
/// what `flotilla snapshot status` reports for a backup of the same state).
pub fn hash_state(state: &RwLock<StateMachine>) -> io::Result<(u32, PointInTime)> {
    let mut crc = 0;
    let at = encode_state(state, |bytes| {
        crc = crc32c::crc32c_append(crc, bytes);
        Ok(())
    })?;
    Ok((crc, at))
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot read the backup: {0}")]
    Io(#[from] io::Error),
    #[error(
        "the file is {0} bytes: a backup is a multiple of 512 bytes plus a 32-byte SHA-256 \
         digest (truncated, or not a backup)"
    )]
    BadSize(u64),
    #[error(
        "the SHA-256 digest does not match the contents: the file is damaged or truncated \
         (expected {expected}, computed {computed})"
    )]
    DigestMismatch { expected: String, computed: String },
    #[error("no Flotilla backup trailer: not a Flotilla backup (an etcd bbolt snapshot?)")]
    NotFlotilla,
    #[error("the trailer says the state is {0} bytes, which does not fit in the file")]
    BadLength(u64),
    #[error("the padding after the state is not zero: the file is damaged")]
    BadPadding,
    #[error("the state in the backup is invalid: {0}")]
    State(#[from] RestoreError),
}

/// What `flotilla snapshot status` reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackupStatus {
    /// CRC-32C of the state's bytes: what `Maintenance.Hash` answered for the same state.
    pub hash: u32,
    pub revision: i64,
    #[serde(rename = "totalKey")]
    pub total_keys: usize,
    #[serde(rename = "totalSize")]
    pub total_size: u64,
    pub applied_index: u64,
    pub compacted_revision: i64,
    pub leases: usize,
}

/// Reads and checks a backup file: its size, digest and trailer, then the state itself.
pub fn read_backup(path: &Path) -> Result<(StateMachine, BackupStatus), BackupError> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size % SECTOR_BYTES != DIGEST_BYTES || size < SECTOR_BYTES + DIGEST_BYTES {
        return Err(BackupError::BadSize(size));
    }
    let body_bytes = size - DIGEST_BYTES;
    check_digest(&mut file, body_bytes)?;

    file.seek(SeekFrom::Start(body_bytes - TRAILER_BYTES))?;
    let mut trailer = [0u8; TRAILER_BYTES as usize];
    file.read_exact(&mut trailer)?;
    if &trailer[..8] != TRAILER_MAGIC {
        return Err(BackupError::NotFlotilla);
    }
    let state_bytes = u64::from_le_bytes(trailer[8..].try_into().expect("8 bytes"));
    let padding = (body_bytes - TRAILER_BYTES)
        .checked_sub(state_bytes)
        .filter(|padding| *padding < SECTOR_BYTES)
        .ok_or(BackupError::BadLength(state_bytes))?;
    file.seek(SeekFrom::Start(state_bytes))?;
    let mut zeros = vec![0u8; padding as usize];
    file.read_exact(&mut zeros)?;
    if zeros.iter().any(|&b| b != 0) {
        return Err(BackupError::BadPadding);
    }

    file.seek(SeekFrom::Start(0))?;
    let mut hashed = Crc32cReader {
        inner: io::BufReader::with_capacity(1 << 20, file).take(state_bytes),
        crc: 0,
    };
    let state = StateMachine::restore(&mut hashed, Limits::default())?;
    let status = BackupStatus {
        hash: hashed.crc,
        revision: state.kv.current_revision(),
        total_keys: state.kv.live_key_count(),
        total_size: size,
        applied_index: state.applied_index(),
        compacted_revision: state.kv.compacted_revision(),
        leases: state.kv.leases().len(),
    };
    Ok((state, status))
}

fn check_digest(file: &mut std::fs::File, body_bytes: u64) -> Result<(), BackupError> {
    let mut digest = Sha256::new();
    let mut body = io::BufReader::with_capacity(1 << 20, &mut *file).take(body_bytes);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = body.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        digest.update(&buffer[..n]);
    }
    let mut expected = [0u8; DIGEST_BYTES as usize];
    file.seek(SeekFrom::Start(body_bytes))?;
    file.read_exact(&mut expected)?;
    let computed = digest.finalize();
    if computed.as_slice() != expected {
        return Err(BackupError::DigestMismatch {
            expected: hex(&expected),
            computed: hex(&computed),
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Passes bytes through, keeping the CRC-32C of everything read.
struct Crc32cReader<R> {
    inner: R,
    crc: u32,
}

impl<R: Read> Read for Crc32cReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::MemberTable;

    fn sample_state() -> RwLock<StateMachine> {
        use flotilla_kv::Command;
        use flotilla_proto::etcdserverpb::PutRequest;
        let mut state = StateMachine::new(Limits::default(), MemberTable::default());
        for i in 0..100u64 {
            let put = Command::put(PutRequest {
                key: format!("key-{i:03}").into(),
                value: vec![b'x'; 300].into(),
                ..Default::default()
            });
            let entry = flotilla_raft::Entry {
                index: i + 1,
                term: 1,
                payload: flotilla_raft::EntryPayload::Command(put.encode()),
            };
            state.apply_entry(&entry);
        }
        RwLock::new(state)
    }

    fn write_backup(state: &RwLock<StateMachine>, path: &Path) -> (PointInTime, u64, u32) {
        let mut writer = BackupWriter::new(std::fs::File::create(path).unwrap());
        let mut crc = 0;
        let at = encode_state(state, |bytes| {
            crc = crc32c::crc32c_append(crc, bytes);
            writer.write_state(bytes)
        })
        .unwrap();
        let (_, size) = writer.finish().unwrap();
        (at, size, crc)
    }

    #[test]
    fn a_backup_reads_back_as_the_state_it_was_taken_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let state = sample_state();
        let (at, size, crc) = write_backup(&state, &path);
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert_eq!(size % 512, 32, "etcdctl's check: pages plus the digest");
        let (restored, status) = read_backup(&path).unwrap();
        let original = state.read().unwrap();
        assert_eq!(restored.kv.digest(), original.kv.digest());
        assert_eq!(restored.members, original.members);
        assert_eq!(
            status,
            BackupStatus {
                hash: crc,
                revision: at.revision,
                total_keys: 100,
                total_size: size,
                applied_index: at.applied_index,
                compacted_revision: 0,
                leases: 0,
            }
        );
    }

    #[test]
    fn damaged_truncated_and_foreign_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        write_backup(&sample_state(), &path);
        let good = std::fs::read(&path).unwrap();
        let refused = |bytes: &[u8]| {
            let bad = dir.path().join("bad.db");
            std::fs::write(&bad, bytes).unwrap();
            read_backup(&bad).unwrap_err()
        };

        let truncated = refused(&good[..good.len() - 100]);
        assert!(matches!(truncated, BackupError::BadSize(_)), "{truncated}");
        let mut flipped = good.clone();
        flipped[1000] ^= 0x10;
        let damaged = refused(&flipped);
        assert!(
            matches!(damaged, BackupError::DigestMismatch { .. }),
            "{damaged}"
        );
        assert!(damaged.to_string().contains("damaged or truncated"));

        // A well-formed file (right size and digest) that is not ours.
        let mut foreign = BackupWriter::new(Vec::new());
        foreign.write_state(&[7u8; 2000]).unwrap();
        let (mut foreign, _) = foreign.finish().unwrap();
        let trailer_at = foreign.len() - 32 - 16;
        foreign[trailer_at..trailer_at + 8].copy_from_slice(b"BOLTDB!!");
        let digest = Sha256::digest(&foreign[..foreign.len() - 32]);
        let end = foreign.len();
        foreign[end - 32..].copy_from_slice(&digest);
        assert!(matches!(refused(&foreign), BackupError::NotFlotilla));

        // Ours in shape, but the state inside is not a state.
        let mut garbage = BackupWriter::new(Vec::new());
        garbage.write_state(&[7u8; 2000]).unwrap();
        let (garbage, _) = garbage.finish().unwrap();
        let state = refused(&garbage);
        assert!(matches!(state, BackupError::State(_)), "{state}");
    }
}
