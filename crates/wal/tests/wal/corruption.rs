//! Corruption tests: flip one bit at a random offset of a random file of a closed log. Opening
//! must then either recover exactly what was there (the flip hit unwritten space, padding, or
//! the final sync mark, which carries no data) or refuse with a corruption error naming the
//! damaged file and an offset at or before the flip. It must never return different data.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_raft::{LogStorage, MemStorage};
use flotilla_wal::{Fs, SimFs, Wal, WalError, WalOptions};

use crate::support::*;

struct ClosedLog {
    fs: SimFs,
    options: WalOptions,
    dir: PathBuf,
    expected: Observed,
}

/// A log written by random operations, each made durable, with restarts, then closed.
fn closed_log(seed: u64) -> ClosedLog {
    let fs = SimFs::new(seed);
    let options = options(Arc::new(fs.clone()), 4096, voters());
    let dir = PathBuf::from("/sim/corrupt/wal");
    let mut wal = Wal::open(&dir, options.clone()).expect("create").0;
    let mut generator = Generator::new(seed, MemStorage::new_with_membership(voters()));
    let ops = 20 + generator.prng.range(0, 60);
    for _ in 0..ops {
        match generator.next_op() {
            Op::Batch(batch) => {
                wal.write(&batch).expect("write");
                wal.sync().expect("sync");
            }
            Op::SaveSnapshot(meta, data) => {
                wal.save_snapshot(&meta, &data[..]).expect("save");
            }
        }
        if generator.prng.chance(1, 20) {
            wal.close().expect("close");
            wal = Wal::open(&dir, options.clone()).expect("reopen").0;
            generator.next_batch_id = 1;
            generator.resync();
        }
    }
    wal.close().expect("close");
    let expected = observe(&wal);
    assert_same(&wal, &generator.model, "before the flip");
    ClosedLog {
        fs,
        options,
        dir,
        expected,
    }
}

fn read_file(fs: &dyn Fs, path: &Path) -> Vec<u8> {
    let file = fs.open(path).expect("open");
    let mut buf = vec![0u8; file.len().expect("len") as usize];
    file.read_exact_at(&mut buf, 0).expect("read");
    buf
}

#[derive(Debug, Default)]
struct Outcomes {
    recovered_exactly: u64,
    refused: u64,
}

fn flip_one_bit_and_open(seed: u64, outcomes: &mut Outcomes) {
    let log = closed_log(seed);
    let names = log.fs.list(&log.dir).expect("list");
    let pick = log.fs.random_range(0, names.len() as u64) as usize;
    let path = log.dir.join(&names[pick]);
    let content = read_file(&log.fs, &path);
    // Mostly aim at the written part: preallocated segments are mostly zeros.
    let data_end = content
        .iter()
        .rposition(|&b| b != 0)
        .map_or(1, |last| last + 1);
    let limit = if log.fs.random_range(0, 4) < 3 {
        data_end
    } else {
        content.len()
    };
    let offset = log.fs.random_range(0, limit as u64);
    let bit = log.fs.random_range(0, 8) as u8;
    log.fs.flip_bit(&path, offset, bit).expect("flip");
    let context = format!(
        "seed {seed}: bit {bit} of byte {offset} of {}",
        path.display()
    );
    match Wal::open(&log.dir, log.options.clone()) {
        Ok((wal, _report)) => {
            let got = observe(&wal);
            assert!(
                got == log.expected,
                "{context}: opened with different data:\n{got:#?}"
            );
            outcomes.recovered_exactly += 1;
        }
        Err(WalError::Corrupt {
            path: reported,
            offset: at,
            reason,
        }) => {
            assert_eq!(
                reported, path,
                "{context}: the error names another file: {reason}"
            );
            assert!(
                at <= offset,
                "{context}: the error points past the flip ({at}): {reason}"
            );
            outcomes.refused += 1;
        }
        Err(err) => panic!("{context}: not a corruption error: {err}"),
    }
}

#[test]
fn a_flipped_bit_is_recovered_exactly_or_refused_by_file_and_offset() {
    let mut outcomes = Outcomes::default();
    for seed in 0..seeds(120) {
        flip_one_bit_and_open(seed, &mut outcomes);
    }
    assert!(
        outcomes.refused > outcomes.recovered_exactly / 4 && outcomes.recovered_exactly > 0,
        "both outcomes happen: {outcomes:?}"
    );
}

/// Damage that happens while the node runs is caught when the entry is read: the read fails
/// (and the log stops) rather than hand the core wrong data.
#[test]
fn a_bit_flipped_under_a_running_log_fails_reads_instead_of_lying() {
    let mut caught = 0;
    for seed in 0..seeds(40) {
        let log = closed_log(seed);
        let (wal, _) = Wal::open(&log.dir, log.options.clone()).expect("open");
        let segments: Vec<String> = log
            .fs
            .list(&log.dir)
            .expect("list")
            .into_iter()
            .filter(|name| name.starts_with("segment-"))
            .collect();
        let path = log
            .dir
            .join(&segments[log.fs.random_range(0, segments.len() as u64) as usize]);
        let content = read_file(&log.fs, &path);
        let data_end = content
            .iter()
            .rposition(|&b| b != 0)
            .map_or(1, |last| last + 1);
        let offset = log.fs.random_range(0, data_end as u64);
        log.fs
            .flip_bit(&path, offset, (seed % 8) as u8)
            .expect("flip");
        let (first, last) = (wal.first_index(), wal.last_index());
        match wal.entries(first, last + 1, u64::MAX) {
            Ok(entries) => assert_eq!(entries, log.expected.entries, "seed {seed}"),
            Err(err) => {
                assert!(
                    wal.is_failed(),
                    "seed {seed}: a failed read stops the log: {err}"
                );
                caught += 1;
            }
        }
    }
    assert!(caught > 0);
}
