//! Everything about a run is derived from its seed, so the seed alone reproduces it.

use flotilla_raft::Prng;

/// Simulated time is counted in microticks; a node ticks every `TICK_TIME` of them.
pub const TICK_TIME: u64 = 10;

/// The application the simulated members run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AppKind {
    /// The etcd key-value store as `flotilla-server` runs it, with watchers and leases.
    Etcd,
    /// The runtime's replicated hash-map example behind the runtime's client sessions.
    HashMap,
}

/// The storage the simulated nodes run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageKind {
    /// The in-memory reference storage (fast).
    Mem,
    /// The write-ahead log over a simulated file system that loses unsynced writes, tears and
    /// reorders them at a crash, and sometimes fails a write or an fsync.
    Wal,
}

/// The parameters of one run.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub nodes: usize,
    /// Membership churn: adds, removals, promotions, leader removal.
    pub membership_churn: bool,
    /// How long faults are injected.
    pub fault_phase_time: u64,
    /// After healing, the cluster must converge within this time.
    pub liveness_time_max: u64,
    pub message_delay_min: u64,
    pub message_delay_max: u64,
    /// Chance in a thousand that a message is lost / duplicated.
    pub loss_per_mille: u64,
    pub duplicate_per_mille: u64,
    pub fsync_delay_min: u64,
    pub fsync_delay_max: u64,
    pub crashes: bool,
    pub partitions: bool,
    pub transfers: bool,
    /// The mean time between two nemesis actions.
    pub nemesis_interval_time: u64,
    pub clients: usize,
    /// A client gives up on an operation after this long (it becomes "unknown").
    pub client_timeout_time: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Small flow-control and snapshot bounds, so that those paths run often.
    pub append_bytes_max: u64,
    pub inflight_messages_max: usize,
    pub snapshot_entries_max: u64,
    pub snapshot_chunk_bytes: u64,
    pub snapshot_trailing_entries: u64,
    /// Print every event (for replaying a failing seed).
    pub verbose: bool,
    pub storage: StorageKind,
    pub app: AppKind,
    /// With the WAL: one write or fsync in this many fails (0: never), which stops the node.
    pub disk_error_one_in: u64,
    /// Leaders answer reads from their lease when they hold one (forces check-quorum on).
    pub lease_reads: bool,
    /// How many revisions a watcher's queue holds before it falls back to history (small, so
    /// that path runs).
    pub watch_queue_revisions_max: usize,
    /// How many clients a member's session table holds in the hash-map application (few, so
    /// that clients expire one another).
    pub hash_map_sessions_max: usize,
}

impl SimOptions {
    pub fn from_seed(seed: u64, nodes: usize, membership_churn: bool) -> Self {
        let mut prng = Prng::new(seed ^ 0x5eed_f107_11aa_0001);
        let message_delay_min = prng.range(1, 4);
        let fsync_delay_min = prng.range(1, 4);
        Self {
            seed,
            nodes,
            membership_churn,
            fault_phase_time: prng.range(4_000, 12_000),
            liveness_time_max: 6_000,
            message_delay_min,
            message_delay_max: message_delay_min + prng.range(1, 16),
            loss_per_mille: [0, 0, 10, 50, 150][prng.range(0, 5) as usize],
            duplicate_per_mille: [0, 10, 50][prng.range(0, 3) as usize],
            fsync_delay_min,
            fsync_delay_max: fsync_delay_min + prng.range(1, 12),
            crashes: prng.chance(3, 4),
            partitions: prng.chance(3, 4),
            transfers: prng.chance(1, 2),
            nemesis_interval_time: prng.range(100, 600),
            clients: prng.range(1, 6) as usize,
            client_timeout_time: prng.range(200, 800),
            // Mostly the production defaults; sometimes the plain algorithm of the paper.
            pre_vote: prng.chance(4, 5),
            check_quorum: prng.chance(4, 5),
            append_bytes_max: [64, 256, 4096][prng.range(0, 3) as usize],
            inflight_messages_max: [1, 4, 64][prng.range(0, 3) as usize],
            snapshot_entries_max: [20, 50, 200][prng.range(0, 3) as usize],
            snapshot_chunk_bytes: [64, 512, 4096][prng.range(0, 3) as usize],
            snapshot_trailing_entries: [0, 5, 50][prng.range(0, 3) as usize],
            verbose: false,
            storage: StorageKind::Mem,
            app: AppKind::Etcd,
            disk_error_one_in: [0, 0, 500, 3000][prng.range(0, 4) as usize],
            lease_reads: false,
            // Drawn last, so the fields above are what they were for every seed.
            watch_queue_revisions_max: [1, 4, 1024][prng.range(0, 3) as usize],
            hash_map_sessions_max: prng.range(2, 9) as usize,
        }
    }
}
