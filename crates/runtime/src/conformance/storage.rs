//! The storage conformance suite: what the runtime and the core expect of a
//! [`DurableStorage`], as checks with exact expected answers. The write-ahead log, the
//! in-memory storage and the simulator's storage pass it; run it against your own:
//!
//! ```no_run
//! # use flotilla_runtime::{MemDurable, Membership, raft::MemStorage};
//! // In a test of your crate:
//! flotilla_runtime::conformance::storage::run_suite(
//!     |membership: Membership| MemDurable::new(MemStorage::new_with_membership(membership)),
//!     |storage| storage, // nothing to reopen: it keeps nothing across a restart
//! );
//! ```
//!
//! The factory gets the membership a new storage must start with (its bootstrap
//! membership) and returns an empty storage. A check that fails panics with what it expected.

use bytes::Bytes;
use flotilla_raft::{EntryId, HardState, Membership, PersistBatch, SnapshotMeta, StorageError};

pub use self::fixtures::voters;
use self::fixtures::*;
use crate::storage::DurableStorage;

/// Runs every check of the suite, each against a fresh storage from `make`. `reopen`
/// closes a storage and opens it again from what it made durable, as a restarted member
/// would (storage without durability returns it as it is).
pub fn run_suite<S: DurableStorage>(make: impl Fn(Membership) -> S, reopen: impl Fn(S) -> S) {
    empty_storage(make(voters()), &reopen);
    append_and_read(make(voters()), &reopen);
    entries_byte_limits(make(voters()), &reopen);
    truncate_replaces_the_suffix(make(voters()), &reopen);
    compact_after_a_snapshot(make(voters()), &reopen);
    install_snapshot_keeping_a_matching_suffix(make(voters()), &reopen);
    install_snapshot_past_the_log(make(voters()), &reopen);
    staging_restarts_at_offset_zero(make(voters()), &reopen);
    snapshot_chunks_and_replacement(make(voters()), &reopen);
    hard_state_and_restart(make(voters()), &reopen);
    reads_across_segment_boundaries(make(voters()), &reopen);
}

/// Writes a batch and makes it durable, as the WAL thread does; sync must report it.
fn persist<S: DurableStorage>(s: &mut S, batch: &PersistBatch) -> Result<(), String> {
    s.write(batch).map_err(|e| e.to_string())?;
    let durable = s.sync().map_err(|e| e.to_string())?;
    s.prepare_ahead().map_err(|e| e.to_string())?;
    s.reap().map_err(|e| e.to_string())?;
    assert_eq!(
        durable,
        Some(batch.id),
        "sync reports the batch just written"
    );
    Ok(())
}

fn save_snapshot<S: DurableStorage>(
    s: &mut S,
    meta: &SnapshotMeta,
    data: Bytes,
) -> Result<(), String> {
    DurableStorage::save_snapshot(s, meta, &mut &data[..]).map_err(|e| e.to_string())
}

fn hard_state<S: DurableStorage>(s: &S) -> HardState {
    s.initial_state().expect("the initial state").hard_state
}

/// Log entries, snapshots and readers for storage tests (the suite's own, and the WAL's).
pub mod fixtures {
    use bytes::Bytes;
    use flotilla_raft::{
        Entry, EntryId, EntryPayload, Index, LogStorage, Membership, MembershipEntry, Prng,
        SnapshotChunk, SnapshotInfo, SnapshotInstall, SnapshotMeta, Term,
    };

    /// Reads `[low, high)` in pieces of at most 4 KiB, as the core does.
    pub fn read_all_entries(storage: &impl LogStorage, low: Index, high: Index) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut next = low;
        while next < high {
            let batch = storage
                .entries(next, high, 4096)
                .expect("entries inside the log");
            assert!(!batch.is_empty(), "at least one entry per read");
            next += batch.len() as u64;
            entries.extend(batch);
        }
        entries
    }

    /// The whole data of the current snapshot, read in chunks of 1,000 bytes.
    pub fn read_snapshot(storage: &impl LogStorage, info: &SnapshotInfo) -> Bytes {
        let mut data = Vec::new();
        loop {
            let chunk = storage
                .snapshot_chunk(info.meta.last, data.len() as u64, 1000)
                .expect("snapshot chunk");
            if chunk.is_empty() {
                break;
            }
            data.extend_from_slice(&chunk);
        }
        assert_eq!(data.len() as u64, info.data_bytes);
        Bytes::from(data)
    }

    /// A command entry of `bytes` bytes whose content depends on its term and index.
    pub fn command(term: Term, index: Index, bytes: usize) -> Entry {
        let data: Vec<u8> = (0..bytes)
            .map(|i| (index as usize * 31 + i * 7 + term as usize) as u8)
            .collect();
        Entry {
            term,
            index,
            payload: EntryPayload::Command(Bytes::from(data)),
        }
    }

    /// Command entries of one term at `indexes`, `bytes` bytes each.
    pub fn entries(
        term: Term,
        indexes: std::ops::RangeInclusive<Index>,
        bytes: usize,
    ) -> Vec<Entry> {
        indexes.map(|index| command(term, index, bytes)).collect()
    }

    /// A membership entry (voters 1, 2, 3) at `index`.
    pub fn membership_entry(term: Term, index: Index) -> Entry {
        Entry {
            term,
            index,
            payload: EntryPayload::Membership(MembershipEntry {
                membership: Membership::with_voters([1, 2, 3]),
                context: Bytes::from_static(b"ctx"),
            }),
        }
    }

    /// The bootstrap membership of every storage the suite makes: voters 1, 2 and 3.
    pub fn voters() -> Membership {
        Membership::with_voters([1, 2, 3])
    }

    /// A snapshot's metadata at (`term`, `index`) with voters 1, 2, 3.
    pub fn snapshot_meta(term: Term, index: Index) -> SnapshotMeta {
        SnapshotMeta {
            last: EntryId::new(term, index),
            membership: voters(),
        }
    }

    /// `len` bytes of snapshot data drawn from `seed`.
    pub fn snapshot_bytes(seed: u64, len: usize) -> Bytes {
        let mut prng = Prng::new(seed);
        Bytes::from((0..len).map(|_| prng.next_u64() as u8).collect::<Vec<u8>>())
    }

    /// The chunks of a snapshot sent from the leader, `chunk_bytes` at a time.
    pub fn chunks(meta: &SnapshotMeta, data: &Bytes, chunk_bytes: usize) -> Vec<SnapshotChunk> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let end = (offset + chunk_bytes).min(data.len());
            out.push(SnapshotChunk {
                meta: meta.clone(),
                data_bytes: data.len() as u64,
                offset: offset as u64,
                data: data.slice(offset..end),
            });
            offset = end;
            if offset >= data.len() {
                return out;
            }
        }
    }

    /// The batch field that installs the staged snapshot `meta`, keeping the log through
    /// `keep_through`.
    pub fn install(meta: &SnapshotMeta, keep_through: Index) -> Option<SnapshotInstall> {
        Some(SnapshotInstall {
            meta: meta.clone(),
            keep_through,
        })
    }
}

fn batch(id: u64) -> PersistBatch {
    PersistBatch {
        id,
        ..PersistBatch::default()
    }
}

fn append<S: DurableStorage>(storage: &mut S, id: u64, entries: Vec<flotilla_raft::Entry>) {
    let batch = PersistBatch {
        entries,
        ..batch(id)
    };
    persist(storage, &batch).expect("append");
}

fn empty_storage<S: DurableStorage>(s: S, reopen: &dyn Fn(S) -> S) {
    assert_eq!((s.first_index(), s.last_index()), (1, 0));
    assert_eq!(s.term(0), Ok(0));
    assert_eq!(
        s.term(1),
        Err(StorageError::Unavailable {
            index: 1,
            last_index: 0
        })
    );
    assert_eq!(s.entries(1, 1, u64::MAX), Ok(vec![]));
    assert_eq!(
        s.entries(1, 2, u64::MAX),
        Err(StorageError::Unavailable {
            index: 1,
            last_index: 0
        })
    );
    let init = s.initial_state().unwrap();
    assert_eq!(init.hard_state, HardState::default());
    assert_eq!(init.snapshot, None);
    assert_eq!(init.bootstrap_membership, voters());
    assert_eq!(s.snapshot_info(), None);
    assert_eq!(
        s.snapshot_chunk(EntryId::new(1, 1), 0, 10),
        Err(StorageError::SnapshotGone {
            asked: EntryId::new(1, 1),
            current: EntryId::default()
        })
    );
    let s = reopen(s);
    assert_eq!(
        (s.first_index(), s.last_index()),
        (1, 0),
        "empty after a restart"
    );
    assert_eq!(s.initial_state().unwrap().bootstrap_membership, voters());
}

fn append_and_read<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    let mut written = entries(1, 1..=3, 10);
    written.push(membership_entry(2, 4));
    written.push(flotilla_raft::Entry {
        term: 2,
        index: 5,
        payload: flotilla_raft::EntryPayload::Blank,
    });
    append(&mut s, 1, written.clone());
    append(&mut s, 2, entries(2, 6..=7, 0));
    written.extend(entries(2, 6..=7, 0));
    assert_eq!((s.first_index(), s.last_index()), (1, 7));
    assert_eq!(s.entries(1, 8, u64::MAX).unwrap(), written);
    assert_eq!(s.entries(3, 5, u64::MAX).unwrap(), written[2..4].to_vec());
    assert_eq!(s.entries(4, 4, u64::MAX).unwrap(), vec![]);
    assert_eq!(s.term(4), Ok(2));
    assert_eq!(s.term(3), Ok(1));
    assert_eq!(
        s.entries(6, 9, u64::MAX),
        Err(StorageError::Unavailable {
            index: 8,
            last_index: 7
        })
    );
    let s = reopen(s);
    assert_eq!(
        s.entries(1, 8, u64::MAX).unwrap(),
        written,
        "after a restart"
    );
}

fn entries_byte_limits<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    let written = entries(1, 1..=10, 100);
    append(&mut s, 1, written.clone());
    let size = written[0].size_bytes();
    assert_eq!(s.entries(1, 11, 0).unwrap().len(), 1, "always at least one");
    assert_eq!(s.entries(1, 11, size).unwrap().len(), 1);
    assert_eq!(s.entries(1, 11, 3 * size).unwrap().len(), 3);
    assert_eq!(s.entries(1, 11, 3 * size + 1).unwrap().len(), 3);
    assert_eq!(s.entries(1, 11, 4 * size - 1).unwrap().len(), 3);
    assert_eq!(s.entries(2, 11, 4 * size).unwrap(), written[1..5].to_vec());
    assert_eq!(s.entries(1, 11, u64::MAX).unwrap(), written);
    let s = reopen(s);
    assert_eq!(s.entries(2, 11, 4 * size).unwrap(), written[1..5].to_vec());
}

fn truncate_replaces_the_suffix<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    append(&mut s, 1, entries(1, 1..=10, 20));
    append(&mut s, 2, entries(2, 6..=8, 30));
    assert_eq!(s.last_index(), 8);
    assert_eq!(s.term(5), Ok(1));
    assert_eq!(s.term(6), Ok(2));
    assert_eq!(
        s.entries(5, 9, u64::MAX).unwrap()[1..],
        entries(2, 6..=8, 30)[..]
    );
    // Truncating at the very next index is a plain append; at the first index replaces all.
    append(&mut s, 3, entries(3, 9..=9, 1));
    append(&mut s, 4, entries(4, 1..=2, 1));
    assert_eq!(s.last_index(), 2);
    assert_eq!(s.entries(1, 3, u64::MAX).unwrap(), entries(4, 1..=2, 1));
    let s = reopen(s);
    assert_eq!(s.last_index(), 2);
    assert_eq!(s.entries(1, 3, u64::MAX).unwrap(), entries(4, 1..=2, 1));
}

fn compact_after_a_snapshot<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    append(&mut s, 1, entries(1, 1..=10, 20));
    let data = snapshot_bytes(1, 100);
    save_snapshot(&mut s, &snapshot_meta(1, 7), data.clone()).unwrap();
    assert_eq!(
        s.first_index(),
        1,
        "saving a snapshot does not touch the log"
    );
    let compact = |to| PersistBatch {
        compact_to: Some(to),
        ..batch(2)
    };
    persist(&mut s, &compact(5)).unwrap();
    assert_eq!((s.first_index(), s.last_index()), (6, 10));
    assert_eq!(s.term(5), Ok(1), "the compaction point's term is kept");
    assert_eq!(
        s.term(4),
        Err(StorageError::Compacted {
            index: 4,
            first_index: 6
        })
    );
    assert_eq!(
        s.entries(5, 7, u64::MAX),
        Err(StorageError::Compacted {
            index: 5,
            first_index: 6
        })
    );
    assert_eq!(s.entries(6, 11, u64::MAX).unwrap(), entries(1, 6..=10, 20));
    let mut s = reopen(s);
    assert_eq!((s.first_index(), s.last_index()), (6, 10));
    assert_eq!(s.term(5), Ok(1));
    let no_op = PersistBatch {
        compact_to: Some(3),
        ..batch(3)
    };
    persist(&mut s, &no_op).unwrap();
    assert_eq!(
        s.first_index(),
        6,
        "compacting below the compaction point does nothing"
    );
    let info = s.snapshot_info().unwrap();
    assert_eq!(info.meta, snapshot_meta(1, 7));
    assert_eq!(read_snapshot(&s, &info), data);
}

fn install_snapshot_keeping_a_matching_suffix<S: DurableStorage>(
    mut s: S,
    reopen: &dyn Fn(S) -> S,
) {
    append(&mut s, 1, entries(1, 1..=10, 20));
    let meta = snapshot_meta(1, 7);
    let data = snapshot_bytes(2, 2500);
    let pieces = chunks(&meta, &data, 1000);
    let first = PersistBatch {
        snapshot_chunks: pieces[..2].to_vec(),
        ..batch(2)
    };
    persist(&mut s, &first).unwrap();
    assert_eq!(s.snapshot_info(), None, "a staged snapshot is not current");
    let last = PersistBatch {
        snapshot_chunks: pieces[2..].to_vec(),
        snapshot_install: install(&meta, 10),
        hard_state: Some(HardState {
            term: 1,
            vote: 0,
            commit: 7,
        }),
        ..batch(3)
    };
    persist(&mut s, &last).unwrap();
    assert_eq!((s.first_index(), s.last_index()), (8, 10));
    assert_eq!(s.term(7), Ok(1));
    assert_eq!(s.entries(8, 11, u64::MAX).unwrap(), entries(1, 8..=10, 20));
    let s = reopen(s);
    let info = s.snapshot_info().unwrap();
    assert_eq!(info.meta, meta);
    assert_eq!(read_snapshot(&s, &info), data);
    assert_eq!((s.first_index(), s.last_index()), (8, 10));
    assert_eq!(hard_state(&s).commit, 7);
}

fn install_snapshot_past_the_log<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    append(&mut s, 1, entries(1, 1..=3, 20));
    let meta = snapshot_meta(2, 10);
    let data = snapshot_bytes(3, 10);
    let install_batch = PersistBatch {
        snapshot_chunks: chunks(&meta, &data, 100),
        snapshot_install: install(&meta, 10),
        entries: entries(2, 11..=12, 5),
        ..batch(2)
    };
    persist(&mut s, &install_batch).unwrap();
    assert_eq!((s.first_index(), s.last_index()), (11, 12));
    assert_eq!(s.term(10), Ok(2));
    let s = reopen(s);
    assert_eq!((s.first_index(), s.last_index()), (11, 12));
    assert_eq!(s.entries(11, 13, u64::MAX).unwrap(), entries(2, 11..=12, 5));
    assert_eq!(s.term(10), Ok(2));
}

fn staging_restarts_at_offset_zero<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    append(&mut s, 1, entries(1, 1..=5, 20));
    let abandoned = snapshot_meta(1, 3);
    let abandoned_data = snapshot_bytes(4, 300);
    let first = PersistBatch {
        snapshot_chunks: chunks(&abandoned, &abandoned_data, 100)[..2].to_vec(),
        ..batch(2)
    };
    persist(&mut s, &first).unwrap();
    let meta = snapshot_meta(3, 8);
    let data = snapshot_bytes(5, 250);
    let second = PersistBatch {
        snapshot_chunks: chunks(&meta, &data, 100),
        snapshot_install: install(&meta, 8),
        ..batch(3)
    };
    persist(&mut s, &second).unwrap();
    let info = s.snapshot_info().unwrap();
    assert_eq!(info.meta, meta);
    assert_eq!(read_snapshot(&s, &info), data);
    assert_eq!((s.first_index(), s.last_index()), (9, 8));
    let s = reopen(s);
    assert_eq!((s.first_index(), s.last_index()), (9, 8));
    assert_eq!(read_snapshot(&s, &s.snapshot_info().unwrap()), data);
}

fn snapshot_chunks_and_replacement<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    append(&mut s, 1, entries(1, 1..=6, 20));
    let old = snapshot_meta(1, 3);
    let data = Bytes::from_static(b"0123456789");
    save_snapshot(&mut s, &old, data.clone()).unwrap();
    assert_eq!(s.snapshot_chunk(old.last, 0, 4).unwrap(), data.slice(0..4));
    assert_eq!(s.snapshot_chunk(old.last, 8, 4).unwrap(), data.slice(8..10));
    assert_eq!(s.snapshot_chunk(old.last, 10, 4).unwrap(), Bytes::new());
    assert_eq!(s.snapshot_chunk(old.last, 99, 4).unwrap(), Bytes::new());
    let new = snapshot_meta(1, 5);
    save_snapshot(&mut s, &new, Bytes::from_static(b"abc")).unwrap();
    assert_eq!(
        s.snapshot_chunk(old.last, 0, 4),
        Err(StorageError::SnapshotGone {
            asked: old.last,
            current: new.last
        })
    );
    assert!(
        save_snapshot(&mut s, &old, data).is_err(),
        "an older snapshot is refused"
    );
    let s = reopen(s);
    assert_eq!(
        s.snapshot_chunk(new.last, 1, 10).unwrap(),
        Bytes::from_static(b"bc")
    );
}

fn hard_state_and_restart<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    let hs = |term, vote, commit| HardState { term, vote, commit };
    let only_hard_state = |id, hard_state| PersistBatch {
        hard_state: Some(hard_state),
        ..batch(id)
    };
    persist(&mut s, &only_hard_state(1, hs(1, 2, 0))).unwrap();
    append(&mut s, 2, entries(1, 1..=4, 8));
    persist(&mut s, &only_hard_state(3, hs(2, 3, 4))).unwrap();
    assert_eq!(hard_state(&s), hs(2, 3, 4));
    let s = reopen(s);
    assert_eq!(hard_state(&s), hs(2, 3, 4));
    assert_eq!(s.initial_state().unwrap().hard_state, hs(2, 3, 4));
    assert_eq!(s.initial_state().unwrap().bootstrap_membership, voters());
    assert_eq!(s.last_index(), 4);
    let mut s = reopen(s);
    append(&mut s, 1, entries(2, 5..=5, 8));
    assert_eq!(
        hard_state(&s),
        hs(2, 3, 4),
        "appending leaves the hard state alone"
    );
    assert_ne!(voters(), Membership::default());
}

/// Many entries in small segments: reads span segments, compaction deletes whole segments,
/// and everything survives restarts.
fn reads_across_segment_boundaries<S: DurableStorage>(mut s: S, reopen: &dyn Fn(S) -> S) {
    let mut written = Vec::new();
    for round in 0..20u64 {
        let batch_entries = entries(1, round * 25 + 1..=round * 25 + 25, 90 + round as usize);
        written.extend(batch_entries.clone());
        append(&mut s, round + 1, batch_entries);
    }
    assert_eq!(read_all_entries(&s, 1, 501), written);
    assert_eq!(
        s.entries(20, 480, u64::MAX).unwrap(),
        written[19..479].to_vec()
    );
    let mut s = reopen(s);
    assert_eq!(s.entries(1, 501, u64::MAX).unwrap(), written);
    save_snapshot(&mut s, &snapshot_meta(1, 300), snapshot_bytes(6, 50)).unwrap();
    persist(
        &mut s,
        &PersistBatch {
            compact_to: Some(250),
            ..batch(100)
        },
    )
    .unwrap();
    assert_eq!(
        s.entries(251, 501, u64::MAX).unwrap(),
        written[250..].to_vec()
    );
    let s = reopen(s);
    assert_eq!((s.first_index(), s.last_index()), (251, 500));
    assert_eq!(
        s.entries(251, 501, u64::MAX).unwrap(),
        written[250..].to_vec()
    );
    assert_eq!(s.term(250), Ok(1));
}
