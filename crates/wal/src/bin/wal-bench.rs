//! Benchmarks the write-ahead log on this machine's disk, against the raw floor measured in the
//! same run, and times recovery of a large log.
//!
//! ```text
//! cargo run --release -p flotilla-wal --bin wal-bench -- [--dir DIR] [--seconds S]
//!     [--recovery-gib G] [--recovery-entry-bytes B] [--cold] [--skip-appends]
//! ```
//!
//! For each entry size (256 B, 4 KiB) and batch size (1, 8, 64, 512 entries per fsync) it runs
//! these for `seconds` each, in turn in 100 ms slices so that all see the same disk:
//!
//! * `wal`: `Wal::write` of one persist batch of N entries, then `Wal::sync`, on a log that only
//!   grows (every segment is new, reserved with fallocate);
//! * `wal-steady`: the same, with a snapshot saved and the log compacted every 128 MiB as a
//!   running node does, so that segments are recycled;
//! * `floor-append`: the plain loop, `write` of N entries' bytes to a file + `fdatasync`;
//! * `floor-prealloc`: the same into a zero-filled, preallocated file (as WAL segments are).
//!
//! Recovery writes a log of `recovery-gib` GiB (fsync off while
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

#[derive(Debug)]
struct Args {
    dir: PathBuf,
    seconds: f64,
    recovery_gib: f64,
    recovery_entry_bytes: usize,
    cold: bool,
    skip_appends: bool,
    segment_mib: u64,
    floor_mib: u64,
    cases: Option<(usize, usize)>,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: std::env::temp_dir().join("flotilla-wal-bench"),
        seconds: 2.0,
        recovery_gib: 1.0,
        recovery_entry_bytes: 256,
        cold: false,
        skip_appends: false,
        segment_mib: 64,
        floor_mib: 64,
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
            "--recovery-gib" => {
                args.recovery_gib = value().parse().unwrap_or_else(|_| usage("--recovery-gib"))
            }
            "--recovery-entry-bytes" => {
                args.recovery_entry_bytes = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--recovery-entry-bytes"))
            }
            "--cold" => args.cold = true,
            "--floor-mib" => {
                args.floor_mib = value().parse().unwrap_or_else(|_| usage("--floor-mib"))
            }
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
        "wal-bench: {problem}\nusage: wal-bench [--dir DIR] [--seconds S] \
         [--recovery-gib G] [--recovery-entry-bytes B] [--cold] [--skip-appends] \
         [--case ENTRYxBATCH] [--segment-mib M] [--floor-mib M]"
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

#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    entries_per_second: f64,
    payload_mb_per_second: f64,
}

/// One way of making batches durable, run a slice at a time.
trait Appender {
    /// Writes one batch and makes it durable.
    fn append_batch(&mut self);
}

/// The variants are run in turn, a short slice each, over the same stretch of time: the
/// disk's speed drifts (other work on the machine), and slices keep every variant under the
/// same conditions.
const SLICE: Duration = Duration::from_millis(100);

fn bench_appends(args: &Args) {
    println!(
        "\n{:>5} {:>5} | {:>20} | {:>20} | {:>20} | {:>20} | {:>7} {:>7} {:>7} {:>7}",
        "entry",
        "batch",
        "wal entries/s (MB/s)",
        "wal-steady",
        "floor-append",
        "floor-prealloc",
        "wal/app",
        "std/app",
        "wal/pre",
        "std/pre"
    );
    for entry_bytes in ENTRY_BYTES {
        for batch in BATCH_ENTRIES {
            if args.cases.is_some_and(|case| case != (entry_bytes, batch)) {
                continue;
            }
            let dir = args.dir.join(format!("case-{entry_bytes}-{batch}"));
            std::fs::create_dir_all(&dir).expect("create the case directory");
            let rates = run_case(args, &dir, entry_bytes, batch);
            std::fs::remove_dir_all(&dir).expect("remove the case directory");
            let cell = |r: Rate| {
                format!(
                    "{:>9.0} ({:>7.1})",
                    r.entries_per_second, r.payload_mb_per_second
                )
            };
            let ratio = |a: Rate, b: Rate| a.entries_per_second / b.entries_per_second;
            let [wal, steady, append, prealloc] = rates;
            println!(
                "{entry_bytes:>5} {batch:>5} | {:>20} | {:>20} | {:>20} | {:>20} | {:>7.2} {:>7.2} \
                 {:>7.2} {:>7.2}",
                cell(wal),
                cell(steady),
                cell(append),
                cell(prealloc),
                ratio(wal, append),
                ratio(steady, append),
                ratio(wal, prealloc),
                ratio(steady, prealloc),
            );
        }
    }
}

fn run_case(args: &Args, dir: &Path, entry_bytes: usize, batch: usize) -> [Rate; 4] {
    let options = WalOptions::new(1, 1).with_segment_bytes(args.segment_mib << 20);
    let floor = args.floor_mib << 20;
    let mut appenders: [Box<dyn Appender>; 4] = [
        Box::new(WalAppender::new(
            &dir.join("wal"),
            options.clone(),
            entry_bytes,
            batch,
            false,
        )),
        Box::new(WalAppender::new(
            &dir.join("steady"),
            options,
            entry_bytes,
            batch,
            true,
        )),
        Box::new(FloorAppender::new(
            &dir.join("append"),
            false,
            entry_bytes,
            batch,
            floor,
        )),
        Box::new(FloorAppender::new(
            &dir.join("prealloc"),
            true,
            entry_bytes,
            batch,
            floor,
        )),
    ];
    let slices = ((args.seconds / SLICE.as_secs_f64()).ceil() as usize).max(1);
    let mut batches = [0u64; 4];
    let mut elapsed = [Duration::ZERO; 4];
    for slice in 0..slices {
        // The order rotates too: a variant's slice can suffer from the one before it (the
        // file system discards blocks freed by a truncation, writeback trails, ...).
        for turn in 0..appenders.len() {
            let i = (slice + turn) % appenders.len();
            let appender = &mut appenders[i];
            let start = Instant::now();
            while start.elapsed() < SLICE {
                appender.append_batch();
                batches[i] += 1;
            }
            elapsed[i] += start.elapsed();
        }
    }
    std::array::from_fn(|i| {
        let seconds = elapsed[i].as_secs_f64();
        let entries = (batches[i] * batch as u64) as f64;
        Rate {
            entries_per_second: entries / seconds,
            payload_mb_per_second: entries * entry_bytes as f64 / seconds / 1e6,
        }
    })
}

/// The raw floor: a plain loop of one write of the batch's bytes and one fdatasync, either
/// appending to a file or overwriting a preallocated, zero-filled one (wrapping around).
struct FloorAppender {
    file: File,
    preallocated: bool,
    buf: Vec<u8>,
    offset: u64,
    file_bytes: u64,
}

impl FloorAppender {
    fn new(
        path: &Path,
        preallocated: bool,
        entry_bytes: usize,
        batch: usize,
        file_bytes: u64,
    ) -> Self {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .expect("create the floor file");
        if preallocated {
            zero_fill(&file, file_bytes);
        }
        Self {
            file,
            preallocated,
            buf: (0..entry_bytes * batch).map(|i| i as u8).collect(),
            offset: 0,
            file_bytes,
        }
    }
}

impl Appender for FloorAppender {
    fn append_batch(&mut self) {
        if self.offset + self.buf.len() as u64 > self.file_bytes {
            if !self.preallocated {
                self.file.set_len(0).expect("truncate");
            }
            self.offset = 0;
        }
        self.file
            .write_all_at(&self.buf, self.offset)
            .expect("write");
        self.file.sync_data().expect("fdatasync");
        self.offset += self.buf.len() as u64;
    }
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

/// `Wal::write` of one persist batch, then `Wal::sync`, as a node's I/O task does.
struct WalAppender {
    wal: Wal,
    payload: Bytes,
    batch: usize,
    next_index: u64,
    id: u64,
    compact: bool,
    bytes_since_snapshot: u64,
    compact_to: Option<u64>,
}

impl WalAppender {
    fn new(
        dir: &Path,
        options: WalOptions,
        entry_bytes: usize,
        batch: usize,
        compact: bool,
    ) -> Self {
        let (wal, _) = Wal::open(dir, options).expect("open the WAL");
        Self {
            wal,
            payload: Bytes::from((0..entry_bytes).map(|i| i as u8).collect::<Vec<u8>>()),
            batch,
            next_index: 1,
            id: 0,
            compact,
            bytes_since_snapshot: 0,
            compact_to: None,
        }
    }
}

impl Appender for WalAppender {
    fn append_batch(&mut self) {
        self.id += 1;
        let first = self.next_index;
        let batch = PersistBatch {
            id: self.id,
            entries: (first..first + self.batch as u64)
                .map(|index| Entry {
                    term: 1,
                    index,
                    payload: EntryPayload::Command(self.payload.clone()),
                })
                .collect(),
            hard_state: Some(HardState {
                term: 1,
                vote: 1,
                commit: first - 1,
            }),
            compact_to: self.compact_to.take(),
            ..PersistBatch::default()
        };
        self.next_index += self.batch as u64;
        self.wal.write(&batch).expect("write");
        assert_eq!(self.wal.sync().expect("sync"), Some(self.id));
        self.wal.prepare_ahead().expect("prepare the next segment");
        assert_eq!(self.wal.last_index(), self.next_index - 1);
        self.bytes_since_snapshot += (self.payload.len() * self.batch) as u64;
        if self.compact && self.bytes_since_snapshot >= STEADY_COMPACTION_BYTES {
            // What a running node does now and then: snapshot the state machine, compact.
            let meta = SnapshotMeta {
                last: EntryId::new(1, self.next_index - 1),
                membership: Membership::default(),
            };
            self.wal
                .save_snapshot(&meta, &b"state"[..])
                .expect("save a snapshot");
            self.compact_to = Some(self.next_index - 1);
            self.bytes_since_snapshot = 0;
        }
    }
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
