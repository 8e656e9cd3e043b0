//! `flotilla-sim`: run many seeds, or replay one.
//!
//! ```text
//! cargo run --release -p flotilla-sim -- --seeds 500 [--seed-start S] [--nodes K] [--membership]
//!     [--app etcd|hash-map] [--storage mem|wal] [--lease-reads]
//! cargo run --release -p flotilla-sim -- --seed S [--nodes K] [--membership] --digest
//! ```

use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clap::Parser;
use flotilla_sim::{AppKind, SimOptions, StorageKind, nodes_for_seed, run_seed};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a Flotilla Raft cluster under faults")]
struct Args {
    /// Run this many seeds.
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<u64>,
    /// The first seed of a sweep.
    #[arg(long, default_value_t = 0)]
    seed_start: u64,
    /// Run (replay) exactly this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Cluster size; by default a sweep cycles through 3, 5 and 7 nodes.
    #[arg(long)]
    nodes: Option<usize>,
    /// Add membership churn: adds, removals, promotions, leader removal.
    #[arg(long)]
    membership: bool,
    /// Print the run's trace digest as the last line.
    #[arg(long)]
    digest: bool,
    /// What the nodes store their log on: memory, or the WAL over a faulty simulated disk.
    #[arg(long, value_enum, default_value_t = StorageKind::Mem)]
    storage: StorageKind,
    /// What the members run: the etcd key-value store as the server runs it, or the runtime's
    /// replicated hash-map example behind the runtime's client sessions.
    #[arg(long, value_enum, default_value_t = AppKind::Etcd)]
    app: AppKind,
    /// Leaders answer reads from their lease (thesis §6.4.1) when they hold one; every
    /// read is still checked to see every write acknowledged before it began. The etcd
    /// application's reads only (the hash map's clients read through ReadIndex).
    #[arg(long)]
    lease_reads: bool,
    /// Print every event of a replayed seed.
    #[arg(long, requires = "seed")]
    verbose: bool,
    /// Worker threads for a sweep (default: available cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Stop a sweep at its first failing seed (the negative controls need only one).
    #[arg(long, requires = "seeds")]
    fail_fast: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(nodes) = args.nodes
        && !(1..=9).contains(&nodes)
    {
        eprintln!("--nodes must be between 1 and 9, got {nodes}");
        return ExitCode::from(2);
    }
    if args.lease_reads && args.app != AppKind::Etcd {
        eprintln!(
            "--lease-reads is for the etcd application: the hash map's clients read through ReadIndex"
        );
        return ExitCode::from(2);
    }
    match (args.seed, args.seeds) {
        (Some(seed), _) => replay(&args, seed),
        (None, Some(count)) => sweep(&args, count),
        (None, None) => {
            eprintln!("give --seeds N to run a sweep or --seed S to replay one seed");
            ExitCode::from(2)
        }
    }
}

fn options(args: &Args, seed: u64) -> SimOptions {
    let nodes = args.nodes.unwrap_or_else(|| nodes_for_seed(seed));
    let mut options = SimOptions::from_seed(seed, nodes, args.membership);
    options.verbose = args.verbose;
    options.storage = args.storage;
    options.lease_reads = args.lease_reads;
    options.app = args.app;
    options
}

fn replay_command(args: &Args, seed: u64) -> String {
    let nodes = args.nodes.unwrap_or_else(|| nodes_for_seed(seed));
    let membership = if args.membership { " --membership" } else { "" };
    let storage = if args.storage == StorageKind::Wal {
        " --storage wal"
    } else {
        ""
    };
    let lease = if args.lease_reads {
        " --lease-reads"
    } else {
        ""
    };
    let app = if args.app == AppKind::HashMap {
        " --app hash-map"
    } else {
        ""
    };
    format!(
        "cargo run --release -p flotilla-sim -- --seed {seed} --nodes {nodes}{app}{membership}{storage}{lease}"
    )
}

fn replay(args: &Args, seed: u64) -> ExitCode {
    let result = run_seed(options(args, seed));
    let code = match &result {
        Ok(report) => {
            println!(
                "seed {seed}: ok: {} nodes, {} events, {} writes ok / {} failed / {} unknown, \
                 {} reads ({} from a lease), {} history events checked, {} watch events checked ({} watchers restarted \
                 after a compaction), {} keep-alives acknowledged, {} lease expiries checked, {} retries answered from a \
                 session's memory, {} sessions expired, {} leaders elected, {} snapshots installed, {} membership changes, \
                 ended at time {}",
                report.nodes,
                report.events,
                report.writes_ok,
                report.writes_failed,
                report.writes_unknown,
                report.reads_ok,
                report.lease_reads_ok,
                report.history_operations,
                report.watch_events_checked,
                report.watchers_restarted,
                report.keep_alives_acked,
                report.lease_expiries_checked,
                report.session_repeats,
                report.sessions_expired,
                report.elections,
                report.snapshots_installed,
                report.membership_changes,
                report.end_time
            );
            if args.digest {
                println!("digest: {:016x}", report.digest);
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("seed {seed}: FAILED: {failure}");
            println!("replay: {}", replay_command(args, seed));
            ExitCode::FAILURE
        }
    };
    if args.digest && result.is_err() {
        println!("digest: failed");
    }
    code
}

fn sweep(args: &Args, count: u64) -> ExitCode {
    // Failures are reported per seed below; the default hook would interleave backtraces.
    std::panic::set_hook(Box::new(|_| {}));
    let jobs = args
        .jobs
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let next = AtomicU64::new(0);
    let failed_once = AtomicBool::new(false);
    let results: Mutex<Vec<(u64, Result<(), String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let offset = next.fetch_add(1, Ordering::Relaxed);
                    if offset >= count || (args.fail_fast && failed_once.load(Ordering::Relaxed)) {
                        return;
                    }
                    let seed = args.seed_start + offset;
                    let outcome = run_seed(options(args, seed)).map(|_| ());
                    if outcome.is_err() {
                        failed_once.store(true, Ordering::Relaxed);
                    }
                    results
                        .lock()
                        .expect("no panics while holding the lock")
                        .push((seed, outcome));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("workers finished");
    results.sort_by_key(|(seed, _)| *seed);
    let mut failed = 0;
    for (seed, outcome) in &results {
        if let Err(failure) = outcome {
            failed += 1;
            println!("seed {seed} FAILED: {failure}");
            println!("  replay: {}", replay_command(args, *seed));
        }
    }
    let stopped = if args.fail_fast && failed > 0 {
        " (stopped at the first failure)"
    } else {
        ""
    };
    println!(
        "{} passed, {failed} failed{stopped}",
        results.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
