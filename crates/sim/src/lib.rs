//! # flotilla-sim: the deterministic simulator
//!
//! Runs clusters of members as the server runs them (the real driver over the real Raft core,
//! an application's real state machine, the real WAL) on a simulated network and disk, with the
//! application's client requests, driven by one seed, with faults (message loss, duplication,
//! delay and reordering; partitions of several shapes; crashes that lose unsynced writes;
//! leadership transfers; membership churn) and checks the Raft safety properties after every
//! step, then liveness once everything is healed. The same seed always produces the same run,
//! down to the trace digest.
//!
//! Two applications run on it: the etcd key-value store as `flotilla-server` runs it (the
//! default), and the runtime's replicated hash map behind its client sessions (`--app
//! hash-map`), which embedders of `flotilla-runtime` build on.

pub mod checker;
pub mod digest;
/// The runtime's hash-map example, the very file its examples and tests build.
#[path = "../../runtime/examples/shared/hash_map.rs"]
pub mod hash_map_example;
pub mod kv_checker;
pub mod lease_checker;
pub mod options;
pub mod simulation;
pub mod storage;
pub mod trace;
pub mod workload;

pub use options::{AppKind, SimOptions, StorageKind};
pub use simulation::{Application, EtcdApp, HashMapApp, RunFailure, RunReport, Simulation};
pub use storage::{MemDisk, SimStorage, WalDisk};

/// Runs one seed, turning a panic inside the core (a failed assertion) into a failure too.
pub fn run_seed(options: SimOptions) -> Result<RunReport, String> {
    let seed = options.seed;
    let result = std::panic::catch_unwind(|| match (options.app, options.storage) {
        (AppKind::Etcd, StorageKind::Mem) => Simulation::<MemDisk, EtcdApp>::new(options).run(),
        (AppKind::Etcd, StorageKind::Wal) => Simulation::<WalDisk, EtcdApp>::new(options).run(),
        (AppKind::HashMap, StorageKind::Mem) => {
            Simulation::<MemDisk, HashMapApp>::new(options).run()
        }
        (AppKind::HashMap, StorageKind::Wal) => {
            Simulation::<WalDisk, HashMapApp>::new(options).run()
        }
    });
    match result {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(failure)) => Err(format!(
            "{} (at time {}, digest {:016x})",
            failure.violation, failure.report.end_time, failure.report.digest
        )),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(format!("panic in seed {seed}: {message}"))
        }
    }
}

/// The cluster size a seed runs with when none is given: 3, 5 and 7 in turn.
pub fn nodes_for_seed(seed: u64) -> usize {
    [3, 5, 7][(seed % 3) as usize]
}
