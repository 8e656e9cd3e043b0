//! Benchmarks the write-ahead log on this machine's disk, against the raw floor measured in the
//! same run, and times recovery of a large log.
//!
//! ```text
//! cargo run --release -p flotilla-wal --bin wal-bench -- [--dir DIR] [--seconds S]
//!     [--rounds N] [--recovery-gib G] [--recovery-entry-bytes B] [--cold] [--skip-appends]
//! ```
//!
//! For each entry size (256 B, 4 KiB) and batch size (1, 8, 64, 512 entries per fsync) it runs,
//! `rounds` times in turn, for `seconds` each:
//!
//! * `wal`: `Wal::write` of one persist batch of N entries, then `Wal::sync`, on a log that only
//!   grows (every segment is new, reserved with fallocate);
//! * `wal-steady`: the same, with a snapshot saved and the log compacted every 128 MiB as a
//!   running node does, so that segments are recycled;
//! * `floor-append`: the plain loop, `write` of N entries' bytes to a file + `fdatasync`;
//! * `floor-prealloc`: the same into a zero-filled, preallocated file (as WAL segments are).
//!
//! and reports the median round. Recovery writes a log of `recovery-gib` GiB (fsync off while
//! building it), closes it, and times `Wal::open`; with `--cold` the files are first dropped
//! from the page cache (`dd iflag=nocache`). Everything is deleted afterwards.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raft::{
    Entry, EntryId, EntryPayload, HardState, LogStorage, Membership, PersistBatch, SnapshotMeta,
};
use flotilla_wal::{Wal, WalOptions};

const ENTRY_BYTES: [usize; 2] = [256, 4096];
const BATCH_ENTRIES: [usize; 4] = [1, 8, 64, 512];
const FLOOR_FILE_BYTES: u64 = 64 << 20;

#[derive(Debug)]
struct Args {
    dir: PathBuf,
    seconds: f64,
    rounds: usize,
    recovery_gib: f64,
    recovery_entry_bytes: usize,
    cold: bool,
    skip_appends: bool,
    segment_mib: u64,
    cases: Option<(usize, usize)>,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: std::env::temp_dir().join("flotilla-wal-bench"),
        seconds: 1.0,
        rounds: 3,
        recovery_gib: 1.0,
        recovery_entry_bytes: 256,
        cold: false,
        skip_appends: false,
        segment_mib: 64,
        cases: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()),
            "--seconds" => args.seconds = value().parse().unwrap_or_else(|_| usage("--seconds")),
            "--rounds" => args.rounds = value().parse().unwrap_or_else(|_| usage("--rounds")),
            "--recovery-gib" => {
                args.recovery_gib = value().parse().unwrap_or_else(|_| usage("--recovery-gib"))
            }
            "--recovery-entry-bytes" => {
                args.recovery_entry_bytes = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--recovery-entry-bytes"))
            }
            "--cold" => args.cold = true,
            "--segment-mib" => {
                args.segment_mib = value().parse().unwrap_or_else(|_| usage("--segment-mib"))
            }
            "--case" => {
                let case = value();
                let (entry, batch) = case
                    .split_once('x')
                    .unwrap_or_else(|| usage("--case EBYTESxN"));
                let parse = |v: &str| v.parse().unwrap_or_else(|_| usage("--case EBYTESxN"));
                args.cases = Some((parse(entry), parse(batch)));
            }
            "--skip-appends" => args.skip_appends = true,
            other => usage(&format!("unknown flag {other}")),
        }
    }
    args
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "wal-bench: {problem}\nusage: wal-bench [--dir DIR] [--seconds S] [--rounds N] \
         [--recovery-gib G] [--recovery-entry-bytes B] [--cold] [--skip-appends]"
    );
    std::process::exit(2)
}

/// Removes the benchmark directory on the way out, however the run ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    let args = parse_args();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).expect("create the benchmark directory");
    let _cleanup = Cleanup(args.dir.clone());
    println!("wal-bench in {} ({args:?})", args.dir.display());
    if !args.skip_appends {
        bench_appends(&args);
    }
    if args.recovery_gib > 0.0 {
        bench_recovery(&args);
    }
}

// ----- Appends ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Rate {
    #[allow(dead_code)]
    fsyncs_per_second: f64,
    entries_per_second: f64,
    payload_mb_per_second: f64,
}

fn rate(fsyncs: u64, batch: usize, entry_bytes: usize, elapsed: Duration) -> Rate {
    let seconds = elapsed.as_secs_f64();
    let entries = (fsyncs * batch as u64) as f64;
    Rate {
        fsyncs_per_second: fsyncs as f64 / seconds,
        entries_per_second: entries / seconds,
        payload_mb_per_second: entries * entry_bytes as f64 / seconds / 1e6,
    }
}

fn median(mut rates: Vec<Rate>) -> Rate {
    rates.sort_by(|a, b| a.entries_per_second.total_cmp(&b.entries_per_second));
    rates[rates.len() / 2]
}

fn bench_appends(args: &Args) {
    println!(
        "\n{:>5} {:>5} | {:>20} | {:>20} | {:>20} | {:>20} | {:>7} {:>7} {:>7}",
        "entry",
        "batch",
        "wal entries/s (MB/s)",
        "wal-steady",
        "floor-append",
        "floor-prealloc",
        "wal/pre",
        "std/pre",
        "wal/app"
    );
    let duration = Duration::from_secs_f64(args.seconds);
    for entry_bytes in ENTRY_BYTES {
        for batch in BATCH_ENTRIES {
            if args.cases.is_some_and(|case| case != (entry_bytes, batch)) {
                continue;
            }
            let (mut wal, mut steady) = (Vec::new(), Vec::new());
            let (mut append, mut prealloc) = (Vec::new(), Vec::new());
            for round in 0..args.rounds {
                let dir = args.dir.join(format!("case-{entry_bytes}-{batch}-{round}"));
                std::fs::create_dir_all(&dir).expect("create the case directory");
                append.push(floor(
                    &dir.join("append"),
                    false,
                    entry_bytes,
                    batch,
                    duration,
                ));
                prealloc.push(floor(
                    &dir.join("prealloc"),
                    true,
                    entry_bytes,
                    batch,
                    duration,
                ));
                let options = WalOptions::new(1, 1).with_segment_bytes(args.segment_mib << 20);
                let run = |name, compact| {
                    let path = dir.join(name);
                    wal_appends(
                        &path,
                        options.clone(),
                        entry_bytes,
                        batch,
                        duration,
                        compact,
                    )
                };
                wal.push(run("wal", false));
                steady.push(run("wal-steady", true));
                std::fs::remove_dir_all(&dir).expect("remove the case directory");
            }
            let (wal, steady) = (median(wal), median(steady));
            let (append, prealloc) = (median(append), median(prealloc));
            let cell = |r: Rate| {
                format!(
                    "{:>9.0} ({:>7.1})",
                    r.entries_per_second, r.payload_mb_per_second
                )
            };
            let ratio = |a: Rate, b: Rate| a.entries_per_second / b.entries_per_second;
            println!(
                "{entry_bytes:>5} {batch:>5} | {:>20} | {:>20} | {:>20} | {:>20} | {:>7.2} {:>7.2} \
                 {:>7.2}",
                cell(wal),
                cell(steady),
                cell(append),
                cell(prealloc),
                ratio(wal, prealloc),
                ratio(steady, prealloc),
                ratio(wal, append),
            );
        }
    }
}

/// The raw floor: a plain loop of one write of the batch's bytes and one fdatasync.
fn floor(path: &Path, preallocated: bool, entry_bytes: usize, batch: usize, d: Duration) -> Rate {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create the floor file");
    if preallocated {
        zero_fill(&file, FLOOR_FILE_BYTES);
    }
    let buf: Vec<u8> = (0..entry_bytes * batch).map(|i| i as u8).collect();
    let mut offset = 0u64;
    let mut fsyncs = 0u64;
    let start = Instant::now();
    while start.elapsed() < d {
        if offset + buf.len() as u64 > FLOOR_FILE_BYTES {
            if !preallocated {
                file.set_len(0).expect("truncate");
            }
            offset = 0;
        }
        file.write_all_at(&buf, offset).expect("write");
        file.sync_data().expect("fdatasync");
        offset += buf.len() as u64;
        fsyncs += 1;
    }
    let elapsed = start.elapsed();
    rate(fsyncs, batch, entry_bytes, elapsed)
}

fn zero_fill(file: &File, bytes: u64) {
    let zeros = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < bytes {
        file.write_all_at(&zeros, offset).expect("zero-fill");
        offset += zeros.len() as u64;
    }
    file.sync_data().expect("fsync");
}

/// `wal-steady` saves a snapshot and compacts the log every this many bytes.
const STEADY_COMPACTION_BYTES: u64 = 128 << 20;

fn wal_appends(
    dir: &Path,
    options: WalOptions,
    entry_bytes: usize,
    batch: usize,
    d: Duration,
    compact: bool,
) -> Rate {
    let (wal, _) = Wal::open(dir, options).expect("open the WAL");
    let payload = Bytes::from((0..entry_bytes).map(|i| i as u8).collect::<Vec<u8>>());
    let mut next_index = 1;
    let mut id = 0;
    let (mut write_time, mut sync_time) = (Duration::ZERO, Duration::ZERO);
    let mut bytes_since_snapshot = 0u64;
    let mut compact_to = None;
    let start = Instant::now();
    while start.elapsed() < d {
        id += 1;
        let batch = PersistBatch {
            id,
            entries: (next_index..next_index + batch as u64)
                .map(|index| Entry {
                    term: 1,
                    index,
                    payload: EntryPayload::Command(payload.clone()),
                })
                .collect(),
            hard_state: Some(HardState {
                term: 1,
                vote: 1,
                commit: next_index - 1,
            }),
            compact_to: compact_to.take(),
            ..PersistBatch::default()
        };
        next_index += batch.entries.len() as u64;
        let before_write = Instant::now();
        wal.write(&batch).expect("write");
        let before_sync = Instant::now();
        assert_eq!(wal.sync().expect("sync"), Some(id));
        write_time += before_sync - before_write;
        sync_time += before_sync.elapsed();
        bytes_since_snapshot += (entry_bytes * batch.entries.len()) as u64;
        if compact && bytes_since_snapshot >= STEADY_COMPACTION_BYTES {
            // What a running node does now and then: snapshot the state machine, compact.
            let meta = SnapshotMeta {
                last: EntryId::new(1, next_index - 1),
                membership: Membership::default(),
            };
            wal.save_snapshot(&meta, &b"state"[..])
                .expect("save a snapshot");
            compact_to = Some(next_index - 1);
            bytes_since_snapshot = 0;
        }
    }
    let elapsed = start.elapsed();
    if std::env::var_os("WAL_BENCH_VERBOSE").is_some() {
        eprintln!(
            "  wal {entry_bytes}x{batch} compact={compact}: {id} batches, write {:.1} us/batch, \
             sync {:.1} us/batch",
            write_time.as_secs_f64() * 1e6 / id as f64,
            sync_time.as_secs_f64() * 1e6 / id as f64
        );
    }
    assert_eq!(wal.last_index(), next_index - 1);
    rate(id, batch, entry_bytes, elapsed)
}

// ----- Recovery ------------------------------------------------------------------------------

fn bench_recovery(args: &Args) {
    let dir = args.dir.join("recovery");
    let target_bytes = (args.recovery_gib * (1u64 << 30) as f64) as u64;
    let entry_bytes = args.recovery_entry_bytes;
    let built = Instant::now();
    let options = WalOptions::new(1, 1).with_unsafe_no_fsync_for_benchmarks_only();
    let (wal, _) = Wal::open(&dir, options).expect("open the WAL");
    let payload = Bytes::from(vec![7u8; entry_bytes]);
    let batch_entries = ((1usize << 20) / entry_bytes).max(1);
    let mut next_index = 1u64;
    let mut id = 0;
    while log_bytes(&dir) < target_bytes {
        for _ in 0..64 {
            id += 1;
            let entries = (next_index..next_index + batch_entries as u64)
                .map(|index| Entry {
                    term: 1,
                    index,
                    payload: EntryPayload::Command(payload.clone()),
                })
                .collect();
            next_index += batch_entries as u64;
            let batch = PersistBatch {
                id,
                entries,
                ..PersistBatch::default()
            };
            wal.write(&batch).expect("write");
        }
        wal.sync().expect("sync");
    }
    wal.close().expect("close");
    drop(wal);
    sync_dir_files(&dir);
    let log = log_bytes(&dir);
    println!(
        "\nrecovery: built a log of {:.2} GiB, {} entries of {entry_bytes} bytes, in {:.1} s",
        log as f64 / (1u64 << 30) as f64,
        next_index - 1,
        built.elapsed().as_secs_f64()
    );
    for cold in [false, true] {
        if cold && !args.cold {
            continue;
        }
        if cold {
            drop_page_cache(&dir);
        }
        let start = Instant::now();
        let (wal, report) = Wal::open(&dir, WalOptions::new(1, 1)).expect("recover");
        let elapsed = start.elapsed();
        assert_eq!(wal.last_index(), next_index - 1);
        println!(
            "recovery ({}): Wal::open took {:.3} s for {} segments, {} entries ({:.0} MB/s)",
            if cold {
                "cold page cache"
            } else {
                "warm page cache"
            },
            elapsed.as_secs_f64(),
            report.segments,
            report.last_index,
            log as f64 / elapsed.as_secs_f64() / 1e6
        );
        wal.close().expect("close");
    }
    std::fs::remove_dir_all(&dir).expect("remove the recovery log");
}

/// The bytes of records in the log (segment files are preallocated, so their lengths say
/// little): approximated by the segment count times the size of the full ones.
fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            let segments = entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("segment-"))
                .count() as u64;
            segments.saturating_sub(1) * flotilla_wal::SEGMENT_BYTES_DEFAULT
        })
        .unwrap_or(0)
}

fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

fn sync_dir_files(dir: &Path) {
    for path in segment_paths(dir) {
        File::open(&path).and_then(|f| f.sync_all()).expect("fsync");
    }
}

/// Drops the log's files from the page cache (posix_fadvise DONTNEED, through GNU dd).
fn drop_page_cache(dir: &Path) {
    for path in segment_paths(dir) {
        let status = Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .expect("run dd");
        assert!(status.success(), "dd failed on {}", path.display());
    }
}
