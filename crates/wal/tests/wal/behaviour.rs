//! Opening and refusing directories, invalid batches, file management, concurrency, and a real
//! Raft core running on the WAL.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_raft::{
    Apply, Config, EntryPayload, HardState, LogStorage, Membership, PersistBatch, RaftNode,
    SnapshotPolicy,
};
use flotilla_wal::{Fs, FsFile, RealFs, SimFs, Wal, WalError, WalOptions};

use crate::support::*;

fn sim_options(fs: &SimFs) -> WalOptions {
    options(Arc::new(fs.clone()), 4096, voters())
}

fn dir() -> PathBuf {
    PathBuf::from("/sim/behaviour/wal")
}

fn append_batch(id: u64, first: u64, count: u64, bytes: usize) -> PersistBatch {
    PersistBatch {
        id,
        entries: entries(1, first..=first + count - 1, bytes),
        ..PersistBatch::default()
    }
}

/// A closed log of 200 entries over several segments, with a snapshot at 150.
fn closed_log(fs: &SimFs) {
    let (wal, report) = Wal::open(dir(), sim_options(fs)).unwrap();
    assert!(report.created);
    for round in 0..10 {
        wal.write(&append_batch(round + 1, round * 20 + 1, 20, 100))
            .unwrap();
        wal.sync().unwrap();
    }
    wal.save_snapshot(&snapshot_meta(1, 150), &b"state"[..])
        .unwrap();
    wal.close().unwrap();
}

fn segment_files(fs: &SimFs) -> Vec<String> {
    fs.list(&dir())
        .unwrap()
        .into_iter()
        .filter(|name| name.starts_with("segment-"))
        .collect()
}

#[test]
fn another_clusters_or_members_directory_is_refused() {
    let fs = SimFs::new(1);
    closed_log(&fs);
    let mut other_cluster = sim_options(&fs);
    other_cluster.cluster_id += 1;
    let err = Wal::open(dir(), other_cluster).unwrap_err();
    assert!(matches!(err, WalError::WrongCluster { .. }), "{err}");
    assert!(err.to_string().contains("another cluster"), "{err}");
    let mut other_node = sim_options(&fs);
    other_node.node_id = 9;
    let err = Wal::open(dir(), other_node).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::WrongNode {
                found: 1,
                expected: 9,
                ..
            }
        ),
        "{err}"
    );
    Wal::open(dir(), sim_options(&fs)).expect("the right identity opens");
}

#[test]
fn a_newer_format_is_refused_with_a_clear_message() {
    let fs = SimFs::new(2);
    closed_log(&fs);
    let path = dir().join("flotilla-wal.meta");
    let file = fs.open(&path).unwrap();
    let mut header = [0u8; 16];
    file.read_exact_at(&mut header, 0).unwrap();
    header[8..12].copy_from_slice(&(flotilla_wal::FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc32c::crc32c(&header[0..12]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&header, 0).unwrap();
    let err = Wal::open(dir(), sim_options(&fs)).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::NewerFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn a_missing_segment_is_corruption_naming_the_gap() {
    let fs = SimFs::new(3);
    closed_log(&fs);
    let segments = segment_files(&fs);
    assert!(segments.len() >= 4, "{segments:?}");
    fs.remove_file(&dir().join(&segments[1])).unwrap();
    let err = Wal::open(dir(), sim_options(&fs)).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn deleting_old_segments_is_detected_unless_compaction_covered_them() {
    let fs = SimFs::new(4);
    closed_log(&fs);
    let segments = segment_files(&fs);
    fs.remove_file(&dir().join(&segments[0])).unwrap();
    let err = Wal::open(dir(), sim_options(&fs)).unwrap_err();
    assert!(err.to_string().contains("are missing"), "{err}");
}

#[test]
fn a_missing_or_damaged_snapshot_is_corruption() {
    let fs = SimFs::new(5);
    closed_log(&fs);
    let snapshot = fs
        .list(&dir())
        .unwrap()
        .into_iter()
        .find(|name| name.ends_with(".snap"))
        .unwrap();
    let path = dir().join(&snapshot);
    fs.flip_bit(&path, 2, 0).unwrap();
    let err = Wal::open(dir(), sim_options(&fs)).unwrap_err();
    assert!(err.to_string().contains("snapshot data checksum"), "{err}");
    fs.remove_file(&path).unwrap();
    let err = Wal::open(dir(), sim_options(&fs)).unwrap_err();
    assert!(
        matches!(&err, WalError::Corrupt { path: p, .. } if *p == path),
        "{err}"
    );
}

#[test]
fn a_directory_with_a_log_but_no_metadata_is_refused() {
    let fs = SimFs::new(6);
    closed_log(&fs);
    fs.remove_file(&dir().join("flotilla-wal.meta")).unwrap();
    let err = Wal::open(dir(), sim_options(&fs)).unwrap_err();
    assert!(
        err.to_string().contains("metadata file is missing"),
        "{err}"
    );
}

#[test]
fn an_interrupted_creation_is_started_over() {
    for ops in 0..16 {
        let fs = SimFs::new(ops);
        fs.crash_after_ops(ops);
        let _ = Wal::open(dir(), sim_options(&fs));
        fs.crash();
        let (wal, _) = Wal::open(dir(), sim_options(&fs))
            .unwrap_or_else(|err| panic!("crash after {ops} operations: {err}"));
        assert_eq!(wal.initial_state().unwrap().bootstrap_membership, voters());
        assert_eq!(wal.last_index(), 0);
    }
}

#[test]
fn a_torn_tail_is_cut_and_reported() {
    let fs = SimFs::new(7);
    let (wal, _) = Wal::open(dir(), sim_options(&fs)).unwrap();
    wal.write(&append_batch(1, 1, 5, 50)).unwrap();
    wal.sync().unwrap();
    wal.write(&append_batch(2, 6, 5, 50)).unwrap();
    drop(wal);
    // The second batch's last record torn: cut its bytes short, as a crash mid-write does. The
    // segment written to is the one with the most data (a recycled spare may follow it).
    let data_end = |name: &String| {
        let file = fs.open(&dir().join(name)).unwrap();
        let mut content = vec![0u8; file.len().unwrap() as usize];
        file.read_exact_at(&mut content, 0).unwrap();
        content
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |last| last + 1)
    };
    let last = segment_files(&fs).into_iter().max_by_key(data_end).unwrap();
    let path = dir().join(&last);
    let end = data_end(&last);
    let file = fs.open(&path).unwrap();
    file.write_all_at(&[0u8; 20], end as u64 - 20).unwrap();
    let (wal, report) = Wal::open(dir(), sim_options(&fs)).unwrap();
    let torn = report.torn_tail.expect("a torn tail");
    assert_eq!(torn.path, path);
    assert!(
        torn.reason.contains("checksum") || torn.reason.contains("runs past"),
        "{torn:?}"
    );
    assert_eq!(
        wal.last_index(),
        9,
        "the torn entry is gone, the ones before it are not"
    );
    drop(wal);
    let (_, report) = Wal::open(dir(), sim_options(&fs)).unwrap();
    assert_eq!(report.torn_tail, None, "the cut is durable");
}

#[test]
fn invalid_batches_are_refused_whole_and_the_log_goes_on() {
    let fs = SimFs::new(8);
    let (wal, _) = Wal::open(dir(), sim_options(&fs)).unwrap();
    wal.write(&append_batch(1, 1, 10, 10)).unwrap();
    let refused = [
        append_batch(2, 12, 1, 10),
        PersistBatch {
            compact_to: Some(5),
            ..PersistBatch {
                id: 3,
                ..PersistBatch::default()
            }
        },
        PersistBatch {
            id: 4,
            hard_state: Some(HardState {
                term: 1,
                vote: 1,
                commit: 11,
            }),
            ..PersistBatch::default()
        },
        PersistBatch {
            id: 5,
            snapshot_chunks: chunks(&snapshot_meta(1, 5), &Bytes::from_static(b"abcdef"), 3)[1..]
                .to_vec(),
            ..PersistBatch::default()
        },
        PersistBatch {
            id: 6,
            snapshot_install: install(&snapshot_meta(1, 5), 5),
            ..PersistBatch::default()
        },
        append_batch(1, 11, 1, 10),
    ];
    for batch in &refused {
        let err = wal.write(batch).unwrap_err();
        assert!(matches!(err, WalError::InvalidBatch { .. }), "{err}");
    }
    assert!(!wal.is_failed());
    wal.write(&append_batch(7, 11, 1, 10)).unwrap();
    assert_eq!(wal.sync().unwrap(), Some(7));
    assert_eq!(wal.last_index(), 11);
    let err = wal
        .save_snapshot(&snapshot_meta(2, 5), &b"wrong term"[..])
        .unwrap_err();
    assert!(matches!(err, WalError::InvalidSnapshot { .. }), "{err}");
    assert!(!wal.is_failed());
}

#[test]
fn compaction_deletes_old_segments_and_snapshots_once_durable() {
    let fs = SimFs::new(9);
    closed_log(&fs);
    let (wal, _) = Wal::open(dir(), sim_options(&fs)).unwrap();
    let before = segment_files(&fs).len();
    let compact = PersistBatch {
        id: 1,
        compact_to: Some(150),
        ..PersistBatch::default()
    };
    wal.write(&compact).unwrap();
    assert_eq!(
        segment_files(&fs).len(),
        before,
        "not before the compaction is durable"
    );
    wal.sync().unwrap();
    assert!(
        segment_files(&fs)
            .iter()
            .any(|name| name.ends_with(".reap")),
        "the dead segments are out of the log's way, to be unlinked by reap"
    );
    wal.reap().unwrap();
    let after = segment_files(&fs).len();
    assert!(
        after < before - 2,
        "{before} segments before, {after} after"
    );
    wal.save_snapshot(&snapshot_meta(1, 180), &b"newer"[..])
        .unwrap();
    wal.reap().unwrap();
    let snapshots: Vec<String> = fs
        .list(&dir())
        .unwrap()
        .into_iter()
        .filter(|name| name.contains(".snap"))
        .collect();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert_eq!(wal.first_index(), 151);
    assert_eq!(
        wal.entries(151, 201, u64::MAX).unwrap(),
        entries(1, 151..=200, 100)
    );
}

/// A snapshot file larger than a shrink step (8 MiB) is truncated in steps and then removed
/// by reap; the log reopens with only the newer snapshot.
#[test]
fn a_large_obsolete_snapshot_is_shrunk_and_removed_by_reap() {
    let fs = SimFs::new(11);
    closed_log(&fs);
    let (wal, _) = Wal::open(dir(), sim_options(&fs)).unwrap();
    let big = vec![7u8; 20 << 20];
    wal.save_snapshot(&snapshot_meta(1, 150), &big[..]).unwrap();
    wal.save_snapshot(&snapshot_meta(1, 180), &b"newer"[..])
        .unwrap();
    assert!(wal.has_reapable());
    // The big snapshot, and whatever the closed log had already made obsolete.
    assert!(wal.reap().unwrap() >= 1);
    assert!(!wal.has_reapable());
    let files = fs.list(&dir()).unwrap();
    assert!(
        !files.iter().any(|name| name.ends_with(".reap")),
        "{files:?}"
    );
    assert_eq!(
        files.iter().filter(|name| name.contains(".snap")).count(),
        1,
        "{files:?}"
    );
    wal.close().unwrap();
    drop(wal);
    let (wal, _) = Wal::open(dir(), sim_options(&fs)).unwrap();
    let (meta, data) = wal.snapshot_data().unwrap().expect("the newer snapshot");
    assert_eq!((meta.last.index, &data[..]), (180, &b"newer"[..]));
}

#[test]
fn without_fsync_nothing_is_synced() {
    let fs = SimFs::new(10);
    let options = sim_options(&fs).with_unsafe_no_fsync_for_benchmarks_only();
    let (wal, _) = Wal::open(dir(), options).unwrap();
    let synced = fs.stats().file_syncs;
    wal.write(&append_batch(1, 1, 100, 100)).unwrap();
    assert_eq!(wal.sync().unwrap(), Some(1));
    assert_eq!(fs.stats().file_syncs, synced);
}

/// The core reads on one thread while the I/O task writes and syncs on another.
#[test]
fn readers_see_consistent_entries_while_the_writer_writes_and_syncs() {
    let temp = TempDir::new("concurrent");
    let options = options(Arc::new(RealFs), 64 << 10, voters());
    let wal = Arc::new(Wal::open(temp.path().join("wal"), options).unwrap().0);
    let writer = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            for round in 0..200u64 {
                wal.write(&append_batch(round + 1, round * 10 + 1, 10, 200))
                    .unwrap();
                if round % 4 == 3 {
                    assert_eq!(wal.sync().unwrap(), Some(round + 1));
                }
            }
            wal.sync().unwrap();
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let last = wal.last_index();
        if last == 0 {
            continue;
        }
        let low = 1 + (reads * 37) % last;
        let got = wal.entries(low, last + 1, 64 << 10).unwrap();
        let expected = entries(1, low..=low + got.len() as u64 - 1, 200);
        assert_eq!(got, expected);
        reads += 1;
    }
    writer.join().unwrap();
    assert_eq!(wal.last_index(), 2000);
}

// ----- A Raft core on the WAL ----------------------------------------------------------------

/// A single-member cluster: proposals commit once the WAL says they are durable, the state
/// machine snapshots, the log compacts, and restarts (clean and power losses) lose nothing
/// that was applied.
#[test]
fn a_raft_node_runs_on_the_wal_through_snapshots_and_restarts() {
    let fs = SimFs::new(11);
    let options = sim_options(&fs).with_bootstrap_membership(Membership::with_voters([1]));
    let mut config = Config::new(1);
    config.snapshot_policy = SnapshotPolicy {
        entries_max: 40,
        bytes_max: 1 << 20,
    };
    config.snapshot_trailing_entries = 10;
    let mut applied: Vec<Bytes> = Vec::new();
    let mut proposed: Vec<Bytes> = Vec::new();
    for life in 0..6 {
        let wal = Arc::new(Wal::open(dir(), options.clone()).unwrap().0);
        // The state machine restores from the snapshot, then the log replays the rest.
        let applied_index = match wal.snapshot_data().unwrap() {
            Some((meta, data)) => {
                applied = decode_commands(&data);
                meta.last.index
            }
            None => {
                applied.clear();
                0
            }
        };
        let mut node = RaftNode::new(config.clone(), wal.clone(), applied_index).unwrap();
        node.campaign().unwrap();
        drive(&mut node, &wal, &mut applied);
        assert!(node.is_leader(), "life {life}");
        for i in 0..60 {
            let command = Bytes::from(format!("life {life} command {i}"));
            node.propose(command.clone()).unwrap();
            proposed.push(command);
            drive(&mut node, &wal, &mut applied);
        }
        assert_eq!(
            applied, proposed,
            "life {life}: applied exactly what was proposed"
        );
        assert!(wal.first_index() > 1, "life {life}: the log was compacted");
        if life % 2 == 0 {
            wal.close().unwrap();
        } else {
            fs.crash();
        }
    }
}

/// Carries out outputs until there are none, as a server's driver would.
fn drive(node: &mut RaftNode<Arc<Wal>>, wal: &Wal, applied: &mut Vec<Bytes>) {
    for _ in 0..100 {
        let output = node.take_output().unwrap();
        if output.is_empty() {
            return;
        }
        if let Some(batch) = &output.persist {
            wal.write(batch).unwrap();
            let durable = wal.sync().unwrap().expect("a batch was written");
            node.on_persisted(durable).unwrap();
        }
        let mut last_applied = None;
        for item in &output.apply {
            match item {
                Apply::Entry(entry) => {
                    if let EntryPayload::Command(data) = &entry.payload {
                        applied.push(data.clone());
                    }
                }
                Apply::Snapshot(_) => unreachable!("a single member receives no snapshot"),
            }
            last_applied = Some(item.index());
        }
        if let Some(index) = last_applied {
            node.on_applied(index).unwrap();
        }
        if output.snapshot_due.is_some() {
            let index = node.applied();
            let meta = node.snapshot_meta(index).unwrap();
            wal.save_snapshot(&meta, &encode_commands(applied)[..])
                .unwrap();
            node.on_snapshot_saved(&meta).unwrap();
        }
    }
    panic!("the node keeps producing output");
}

fn encode_commands(commands: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::new();
    for command in commands {
        out.extend_from_slice(&(command.len() as u32).to_le_bytes());
        out.extend_from_slice(command);
    }
    out
}

fn decode_commands(mut data: &[u8]) -> Vec<Bytes> {
    let mut commands = Vec::new();
    while !data.is_empty() {
        let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        commands.push(Bytes::copy_from_slice(&data[4..4 + len]));
        data = &data[4 + len..];
    }
    commands
}

#[test]
fn file_handles_survive_removal_as_on_unix() {
    let fs = SimFs::new(12);
    fs.create_dir_all(&dir()).unwrap();
    let path = dir().join("f");
    let file: Arc<dyn FsFile> = fs.create_new(&path).unwrap();
    file.write_all_at(b"kept", 0).unwrap();
    fs.remove_file(&path).unwrap();
    let mut buf = [0u8; 4];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"kept");
}

/// A write of 64 KiB or more ends on a page boundary (with a padding record), so that the next
/// one starts on one; the padding reads back as nothing.
#[test]
fn a_large_write_ends_on_a_page_boundary() {
    let fs = SimFs::new(13);
    let options = options(Arc::new(fs.clone()), 1 << 20, voters());
    let (wal, _) = Wal::open(dir(), options.clone()).unwrap();
    wal.write(&append_batch(1, 1, 100, 1000)).unwrap();
    wal.sync().unwrap();
    wal.write(&append_batch(2, 101, 1, 10)).unwrap();
    wal.sync().unwrap();
    let segment = segment_files(&fs)
        .into_iter()
        .max_by_key(|name| {
            let file = fs.open(&dir().join(name)).unwrap();
            let mut content = vec![0u8; file.len().unwrap() as usize];
            file.read_exact_at(&mut content, 0).unwrap();
            content.iter().filter(|&&b| b != 0).count()
        })
        .unwrap();
    let file = fs.open(&dir().join(&segment)).unwrap();
    let mut content = vec![0u8; file.len().unwrap() as usize];
    file.read_exact_at(&mut content, 0).unwrap();
    let padding_ends: Vec<usize> = (0..content.len() - 16)
        .step_by(8)
        .filter(|&offset| content[offset + 8] == 8 && content[offset + 9..offset + 12] == [0; 3])
        .map(|offset| {
            let payload = u32::from_le_bytes(content[offset + 4..offset + 8].try_into().unwrap());
            offset + 16 + payload as usize
        })
        .collect();
    assert!(
        padding_ends.iter().any(|end| end % 4096 == 0),
        "no padding record ends on a page boundary: {padding_ends:?}"
    );
    drop(wal);
    let (wal, _) = Wal::open(dir(), options).unwrap();
    assert_eq!(wal.last_index(), 101);
    let mut expected = entries(1, 1..=100, 1000);
    expected.extend(entries(1, 101..=101, 10));
    assert_eq!(wal.entries(1, 102, u64::MAX).unwrap(), expected);
}

/// Status's db size: what the log holds, not the space preallocated for segments.
#[test]
fn used_bytes_counts_what_is_written_not_what_is_preallocated() {
    let fs = SimFs::new(11);
    let segment_bytes = 64 << 10;
    let options = options(Arc::new(fs.clone()), segment_bytes, voters());
    let (wal, _) = Wal::open(dir(), options).unwrap();
    let allocated = |fs: &SimFs| -> u64 {
        fs.list(&dir())
            .unwrap()
            .into_iter()
            .map(|name| fs.open(&dir().join(name)).unwrap().len().unwrap())
            .sum()
    };
    let empty = wal.used_bytes();
    assert!(
        empty < segment_bytes / 4 && allocated(&fs) >= segment_bytes,
        "a new log uses {empty} bytes of {} allocated",
        allocated(&fs)
    );
    // 100 entries of 1,000 bytes: more than a segment, so one rolls over.
    for round in 0..10 {
        wal.write(&append_batch(round + 1, round * 10 + 1, 10, 1000))
            .unwrap();
        wal.sync().unwrap();
    }
    let used = wal.used_bytes();
    assert!(
        (100_000..140_000).contains(&(used - empty)),
        "100 kB of entries made the log {used} bytes ({empty} when empty)"
    );
    assert!(segment_files(&fs).len() >= 2, "a segment rolled over");
}
