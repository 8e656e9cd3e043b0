//! The storage conformance suite: the same checks, with exact expected answers, run against
//! `MemStorage` (the reference) and the WAL on the simulated and the real file system.

use bytes::Bytes;
use flotilla_raft::{EntryId, HardState, MemStorage, Membership, PersistBatch, StorageError};

use crate::support::*;

/// Runs every check of the suite against fresh storages from `make`.
fn run_suite<S: WritableStorage>(make: impl Fn() -> S) {
    empty_storage(make());
    append_and_read(make());
    entries_byte_limits(make());
    truncate_replaces_the_suffix(make());
    compact_after_a_snapshot(make());
    install_snapshot_keeping_a_matching_suffix(make());
    install_snapshot_past_the_log(make());
    staging_restarts_at_offset_zero(make());
    snapshot_chunks_and_replacement(make());
    hard_state_and_restart(make());
    reads_across_segment_boundaries(make());
}

#[test]
fn mem_storage_passes_the_suite() {
    run_suite(|| MemStorage::new_with_membership(voters()));
}

#[test]
fn wal_on_sim_fs_passes_the_suite() {
    run_suite(|| WalUnderTest::sim(11, 4096, voters()));
}

#[test]
fn wal_on_the_real_file_system_passes_the_suite() {
    run_suite(|| WalUnderTest::real(8192, voters()));
}

fn batch(id: u64) -> PersistBatch {
    PersistBatch {
        id,
        ..PersistBatch::default()
    }
}

fn append(storage: &mut impl WritableStorage, id: u64, entries: Vec<flotilla_raft::Entry>) {
    let batch = PersistBatch {
        entries,
        ..batch(id)
    };
    storage.persist(&batch).expect("append");
}

fn empty_storage(s: impl WritableStorage) {
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
}

fn append_and_read(mut s: impl WritableStorage) {
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
}

fn entries_byte_limits(mut s: impl WritableStorage) {
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
}

fn truncate_replaces_the_suffix(mut s: impl WritableStorage) {
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
    let s = s.reopen();
    assert_eq!(s.last_index(), 2);
    assert_eq!(s.entries(1, 3, u64::MAX).unwrap(), entries(4, 1..=2, 1));
}

fn compact_after_a_snapshot(mut s: impl WritableStorage) {
    append(&mut s, 1, entries(1, 1..=10, 20));
    let data = snapshot_bytes(1, 100);
    s.save_snapshot(&snapshot_meta(1, 7), data.clone()).unwrap();
    assert_eq!(
        s.first_index(),
        1,
        "saving a snapshot does not touch the log"
    );
    let compact = |to| PersistBatch {
        compact_to: Some(to),
        ..batch(2)
    };
    s.persist(&compact(5)).unwrap();
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
    let mut s = s.reopen();
    assert_eq!((s.first_index(), s.last_index()), (6, 10));
    assert_eq!(s.term(5), Ok(1));
    let no_op = PersistBatch {
        compact_to: Some(3),
        ..batch(3)
    };
    s.persist(&no_op).unwrap();
    assert_eq!(
        s.first_index(),
        6,
        "compacting below the compaction point does nothing"
    );
    let info = s.snapshot_info().unwrap();
    assert_eq!(info.meta, snapshot_meta(1, 7));
    assert_eq!(read_snapshot(&s, &info), data);
}

fn install_snapshot_keeping_a_matching_suffix(mut s: impl WritableStorage) {
    append(&mut s, 1, entries(1, 1..=10, 20));
    let meta = snapshot_meta(1, 7);
    let data = snapshot_bytes(2, 2500);
    let pieces = chunks(&meta, &data, 1000);
    let first = PersistBatch {
        snapshot_chunks: pieces[..2].to_vec(),
        ..batch(2)
    };
    s.persist(&first).unwrap();
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
    s.persist(&last).unwrap();
    assert_eq!((s.first_index(), s.last_index()), (8, 10));
    assert_eq!(s.term(7), Ok(1));
    assert_eq!(s.entries(8, 11, u64::MAX).unwrap(), entries(1, 8..=10, 20));
    let s = s.reopen();
    let info = s.snapshot_info().unwrap();
    assert_eq!(info.meta, meta);
    assert_eq!(read_snapshot(&s, &info), data);
    assert_eq!((s.first_index(), s.last_index()), (8, 10));
    assert_eq!(s.hard_state().commit, 7);
}

fn install_snapshot_past_the_log(mut s: impl WritableStorage) {
    append(&mut s, 1, entries(1, 1..=3, 20));
    let meta = snapshot_meta(2, 10);
    let data = snapshot_bytes(3, 10);
    let install_batch = PersistBatch {
        snapshot_chunks: chunks(&meta, &data, 100),
        snapshot_install: install(&meta, 10),
        entries: entries(2, 11..=12, 5),
        ..batch(2)
    };
    s.persist(&install_batch).unwrap();
    assert_eq!((s.first_index(), s.last_index()), (11, 12));
    assert_eq!(s.term(10), Ok(2));
    let s = s.reopen();
    assert_eq!((s.first_index(), s.last_index()), (11, 12));
    assert_eq!(s.entries(11, 13, u64::MAX).unwrap(), entries(2, 11..=12, 5));
    assert_eq!(s.term(10), Ok(2));
}

fn staging_restarts_at_offset_zero(mut s: impl WritableStorage) {
    append(&mut s, 1, entries(1, 1..=5, 20));
    let abandoned = snapshot_meta(1, 3);
    let abandoned_data = snapshot_bytes(4, 300);
    let first = PersistBatch {
        snapshot_chunks: chunks(&abandoned, &abandoned_data, 100)[..2].to_vec(),
        ..batch(2)
    };
    s.persist(&first).unwrap();
    let meta = snapshot_meta(3, 8);
    let data = snapshot_bytes(5, 250);
    let second = PersistBatch {
        snapshot_chunks: chunks(&meta, &data, 100),
        snapshot_install: install(&meta, 8),
        ..batch(3)
    };
    s.persist(&second).unwrap();
    let info = s.snapshot_info().unwrap();
    assert_eq!(info.meta, meta);
    assert_eq!(read_snapshot(&s, &info), data);
    assert_eq!((s.first_index(), s.last_index()), (9, 8));
    let s = s.reopen();
    assert_eq!((s.first_index(), s.last_index()), (9, 8));
    assert_eq!(read_snapshot(&s, &s.snapshot_info().unwrap()), data);
}

fn snapshot_chunks_and_replacement(mut s: impl WritableStorage) {
    append(&mut s, 1, entries(1, 1..=6, 20));
    let old = snapshot_meta(1, 3);
    let data = Bytes::from_static(b"0123456789");
    s.save_snapshot(&old, data.clone()).unwrap();
    assert_eq!(s.snapshot_chunk(old.last, 0, 4).unwrap(), data.slice(0..4));
    assert_eq!(s.snapshot_chunk(old.last, 8, 4).unwrap(), data.slice(8..10));
    assert_eq!(s.snapshot_chunk(old.last, 10, 4).unwrap(), Bytes::new());
    assert_eq!(s.snapshot_chunk(old.last, 99, 4).unwrap(), Bytes::new());
    let new = snapshot_meta(1, 5);
    s.save_snapshot(&new, Bytes::from_static(b"abc")).unwrap();
    assert_eq!(
        s.snapshot_chunk(old.last, 0, 4),
        Err(StorageError::SnapshotGone {
            asked: old.last,
            current: new.last
        })
    );
    assert!(
        s.save_snapshot(&old, data).is_err(),
        "an older snapshot is refused"
    );
    let s = s.reopen();
    assert_eq!(
        s.snapshot_chunk(new.last, 1, 10).unwrap(),
        Bytes::from_static(b"bc")
    );
}

fn hard_state_and_restart(mut s: impl WritableStorage) {
    let hs = |term, vote, commit| HardState { term, vote, commit };
    let only_hard_state = |id, hard_state| PersistBatch {
        hard_state: Some(hard_state),
        ..batch(id)
    };
    s.persist(&only_hard_state(1, hs(1, 2, 0))).unwrap();
    append(&mut s, 2, entries(1, 1..=4, 8));
    s.persist(&only_hard_state(3, hs(2, 3, 4))).unwrap();
    assert_eq!(s.hard_state(), hs(2, 3, 4));
    let s = s.reopen();
    assert_eq!(s.hard_state(), hs(2, 3, 4));
    assert_eq!(s.initial_state().unwrap().hard_state, hs(2, 3, 4));
    assert_eq!(s.initial_state().unwrap().bootstrap_membership, voters());
    assert_eq!(s.last_index(), 4);
    let mut s = s.reopen();
    append(&mut s, 1, entries(2, 5..=5, 8));
    assert_eq!(
        s.hard_state(),
        hs(2, 3, 4),
        "appending leaves the hard state alone"
    );
    assert_ne!(voters(), Membership::default());
}

/// Many entries in small segments: reads span segments, compaction deletes whole segments,
/// and everything survives restarts.
fn reads_across_segment_boundaries(mut s: impl WritableStorage) {
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
    let mut s = s.reopen();
    assert_eq!(s.entries(1, 501, u64::MAX).unwrap(), written);
    s.save_snapshot(&snapshot_meta(1, 300), snapshot_bytes(6, 50))
        .unwrap();
    s.persist(&PersistBatch {
        compact_to: Some(250),
        ..batch(100)
    })
    .unwrap();
    assert_eq!(
        s.entries(251, 501, u64::MAX).unwrap(),
        written[250..].to_vec()
    );
    let s = s.reopen();
    assert_eq!((s.first_index(), s.last_index()), (251, 500));
    assert_eq!(
        s.entries(251, 501, u64::MAX).unwrap(),
        written[250..].to_vec()
    );
    assert_eq!(s.term(250), Ok(1));
}
