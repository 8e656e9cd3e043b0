//! Opening a data directory: create it if new, check that it is ours, recover the log, make
//! what was recovered durable, clear away leftovers, and start a fresh segment to write to.

use std::path::{Path, PathBuf};

use flotilla_raft::{EntryId, HardState, Index};

use crate::error::{IoContext, WalError};
use crate::fs::Fs;
use crate::log_index::LogIndex;
use crate::metadata::{self, Metadata};
use crate::record::{self, Parsed, RecordKind};
use crate::recovery::{self, Recovered, TornTail, checkpoint_of};
use crate::segment::{self, SegmentFile};
use crate::snapshot_file;
use crate::wal::{SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN, Wal, WalOptions, Writer, read_state_from};

/// What opening found and did, for the log and for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The directory was new (or held only the remains of an interrupted creation).
    pub created: bool,
    /// Segments holding the log once opened, the new one included.
    pub segments: usize,
    pub first_index: Index,
    pub last_index: Index,
    pub hard_state: HardState,
    pub snapshot: Option<EntryId>,
    /// Garbage after the last valid record (a write torn by a crash), cut away.
    pub torn_tail: Option<TornTail>,
    /// Files removed: an unused or torn last segment, temporary and superseded snapshot
    /// files, segments no longer needed.
    pub removed_files: Vec<PathBuf>,
}

/// The files of a data directory, by kind.
#[derive(Debug, Default)]
struct Listing {
    segments: Vec<u64>,
    /// Final snapshot files, by generation.
    snapshots: Vec<u64>,
    /// Temporary files of interrupted writes.
    temporary: Vec<String>,
    generation_max: u64,
}

fn list(fs: &dyn Fs, dir: &Path) -> Result<Listing, WalError> {
    let mut listing = Listing::default();
    for name in fs.list(dir).ctx("list", dir)? {
        if let Some(seq) = segment::parse_file_name(&name) {
            listing.segments.push(seq);
        } else if let Some((generation, temporary)) = snapshot_file::parse_file_name(&name) {
            listing.generation_max = listing.generation_max.max(generation);
            if temporary {
                listing.temporary.push(name);
            } else {
                listing.snapshots.push(generation);
            }
        } else if metadata::is_tmp_file(&name) || name.ends_with(crate::wal::REAP_SUFFIX) {
            listing.temporary.push(name);
        }
    }
    listing.segments.sort_unstable();
    Ok(listing)
}

impl Wal {
    /// Opens the write-ahead log in `dir`, creating it if the directory holds none, and
    /// recovers it. Refuses, with an error naming the file, the offset and the cause, a
    /// directory of another cluster or member, of a newer format, or with corrupt data.
    pub fn open(
        dir: impl Into<PathBuf>,
        options: WalOptions,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        let dir = dir.into();
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&options.segment_bytes) {
            return Err(WalError::InvalidOptions(format!(
                "segment_bytes {} is outside {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                options.segment_bytes
            )));
        }
        let fs = &*options.fs;
        fs.create_dir_all(&dir).ctx("create directory", &dir)?;
        let mut created = false;
        let metadata = match metadata::read(fs, &dir)? {
            Some(found) => {
                check_identity(&dir, &found, &options)?;
                found
            }
            None => {
                created = true;
                create(fs, &dir, &options)?
            }
        };
        let listing = list(fs, &dir)?;
        if listing.segments.is_empty() {
            let path = dir.join(metadata::FILE_NAME);
            let reason = "the directory has a metadata file but no log segments";
            return Err(WalError::corrupt(&path, 0, reason));
        }
        let recovered = recovery::recover(fs, &dir, &listing.segments)?;
        finish_open(dir, options, metadata, listing, recovered, created)
    }
}

fn check_identity(dir: &Path, found: &Metadata, options: &WalOptions) -> Result<(), WalError> {
    let path = dir.join(metadata::FILE_NAME);
    if found.cluster_id != options.cluster_id {
        return Err(WalError::WrongCluster {
            path,
            expected: options.cluster_id,
            found: found.cluster_id,
        });
    }
    if found.node_id != options.node_id {
        return Err(WalError::WrongNode {
            path,
            expected: options.node_id,
            found: found.node_id,
        });
    }
    Ok(())
}

/// Creates a new data directory: the first segment, durable, then the metadata file, whose
/// presence marks the creation as complete.
fn create(fs: &dyn Fs, dir: &Path, options: &WalOptions) -> Result<Metadata, WalError> {
    let sync = !options.unsafe_no_fsync;
    let listing = list(fs, dir)?;
    let leftover = match listing.segments.as_slice() {
        [] => false,
        [1] if listing.snapshots.is_empty() && is_creation_leftover(fs, dir)? => true,
        _ => {
            let path = dir.join(metadata::FILE_NAME);
            let reason = "the metadata file is missing but the directory holds a write-ahead \
                          log; refusing to start over on top of it";
            return Err(WalError::corrupt(&path, 0, reason));
        }
    };
    if leftover {
        let path = dir.join(segment::file_name(1));
        fs.remove_file(&path).ctx("remove", &path)?;
    }
    for name in &listing.temporary {
        let path = dir.join(name);
        fs.remove_file(&path).ctx("remove", &path)?;
    }
    let first = SegmentFile::create(fs, dir, 1, options.segment_bytes, sync)?;
    let checkpoint = checkpoint_of(&LogIndex::default(), 1, None);
    let mut encoded = Vec::new();
    record::encode_record(&mut encoded, RecordKind::Checkpoint, 1, |out| {
        record::put_checkpoint(out, &checkpoint)
    });
    first
        .file
        .write_all_at(&encoded, 0)
        .ctx("write", &first.path)?;
    if sync {
        first.file.sync_data().ctx("fsync", &first.path)?;
    }
    let metadata = Metadata {
        cluster_id: options.cluster_id,
        node_id: options.node_id,
        bootstrap_membership: options.bootstrap_membership.clone(),
    };
    metadata::write(fs, dir, &metadata, sync)?;
    Ok(metadata)
}

/// True if segment 1 holds nothing but (at most) its checkpoint: what a creation interrupted
/// before the metadata file was written leaves behind. Nothing was ever acknowledged from it.
fn is_creation_leftover(fs: &dyn Fs, dir: &Path) -> Result<bool, WalError> {
    let segment = SegmentFile::open(fs, dir, 1)?;
    let buf = segment.read_all()?;
    match record::parse_record(&buf, 0, 1) {
        Parsed::Record { next, .. } => Ok(!matches!(
            record::parse_record(&buf, next, 1),
            Parsed::Record { .. }
        )),
        _ => Ok(true),
    }
}

fn finish_open(
    dir: PathBuf,
    options: WalOptions,
    metadata: Metadata,
    listing: Listing,
    recovered: Recovered,
    created: bool,
) -> Result<(Wal, RecoveryReport), WalError> {
    let fs = &*options.fs;
    let sync = !options.unsafe_no_fsync;
    let mut removed_files = Vec::new();
    if let Some(discarded) = &recovered.discarded_segment {
        fs.remove_file(&discarded.path)
            .ctx("remove", &discarded.path)?;
        removed_files.push(discarded.path.clone());
    }
    // Make everything recovered durable before acting on any of it: a crashed process leaves
    // unsynced writes in the page cache that a power loss would still take away. A torn tail
    // stays where it is: the next segment's checkpoint says where the records end, and replay
    // never reads past that in a segment that is not the last.
    let last = recovered.segments.last().expect("not empty");
    if sync {
        last.file.sync_data().ctx("fsync", &last.path)?;
    }
    let current_generation = recovered.index.snapshot.as_ref().map(|s| s.generation);
    let superseded = listing
        .snapshots
        .iter()
        .filter(|&&generation| Some(generation) != current_generation)
        .map(|&generation| snapshot_file::file_name(generation));
    for name in listing.temporary.iter().cloned().chain(superseded) {
        let path = dir.join(name);
        fs.remove_file(&path).ctx("remove", &path)?;
        removed_files.push(path);
    }
    if sync {
        fs.sync_dir(&dir).ctx("fsync directory", &dir)?;
    }
    let (writer, current) = start_segment(fs, &dir, &options, &recovered, last.seq + 1)?;
    let read_state = read_state_from(&recovered, &current);
    let index = &recovered.index;
    let mut report = RecoveryReport {
        created,
        segments: 0,
        first_index: index.first_index(),
        last_index: index.last_index(),
        hard_state: index.hard_state,
        snapshot: index.snapshot.as_ref().map(|s| s.meta.last),
        torn_tail: recovered.torn_tail.clone(),
        removed_files,
    };
    let writer = Writer::new(current, writer.0, writer.1, listing.generation_max + 1);
    let wal = Wal::from_parts(dir, &options, metadata, read_state, writer);
    report.removed_files.extend(wal.remove_dead_segments_now()?);
    report.segments = wal.read().segments.len();
    Ok((wal, report))
}

/// Creates the segment the log continues in, with a checkpoint of the recovered state.
/// Returns (write offset, capacity) and the segment.
fn start_segment(
    fs: &dyn Fs,
    dir: &Path,
    options: &WalOptions,
    recovered: &Recovered,
    seq: u64,
) -> Result<((u64, u64), SegmentFile), WalError> {
    let checkpoint = checkpoint_of(&recovered.index, seq, Some(recovered.last_segment_end));
    let mut encoded = Vec::new();
    record::encode_record(&mut encoded, RecordKind::Checkpoint, seq, |out| {
        record::put_checkpoint(out, &checkpoint)
    });
    let capacity = options.segment_bytes.max(2 * encoded.len() as u64);
    let sync = !options.unsafe_no_fsync;
    let segment = SegmentFile::create(fs, dir, seq, capacity, sync)?;
    segment
        .file
        .write_all_at(&encoded, 0)
        .ctx("write", &segment.path)?;
    if sync {
        segment.file.sync_data().ctx("fsync", &segment.path)?;
    }
    Ok(((encoded.len() as u64, capacity), segment))
}
