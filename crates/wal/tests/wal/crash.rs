//! Crash tests over the simulated file system: for many seeds, random operations, syncs and
//! crashes (between operations, in the middle of one, after an injected I/O error). After
//! each crash the WAL must open, and what it holds must be exactly what the operations up to
//! some point produced, where that point is at or after everything reported durable: a prefix
//! of the operations, the last one possibly cut after any of its steps (any of its entries).
//! Nothing reported durable is missing; nothing is mixed.

use std::path::PathBuf;
use std::sync::Arc;

use flotilla_raft::{MemStorage, PersistBatch, PersistId};
use flotilla_wal::{SimFaults, SimFs, Wal, WalError, WalOptions};

use crate::support::*;

struct CrashRun {
    seed: u64,
    fs: SimFs,
    options: WalOptions,
    dir: PathBuf,
    wal: Wal,
    generator: Generator,
    /// The state recovered at the last open: durable.
    base: MemStorage,
    /// The operations since, attempted ones included, and the batch ids among them.
    ops: Vec<Op>,
    batch_ops: Vec<(PersistId, usize)>,
    /// `ops[..durable_ops]` are known durable.
    durable_ops: usize,
    crashes: u64,
    /// Batches large enough to be padded to a page boundary.
    large_batches: u64,
}

impl CrashRun {
    fn new(seed: u64) -> Self {
        Self::with_sizes(seed, 4096 * (1 + seed % 4), 300)
    }

    fn with_sizes(seed: u64, segment_bytes: u64, payload_bytes_max: u64) -> Self {
        let fs = SimFs::new(seed);
        let options = options(Arc::new(fs.clone()), segment_bytes, voters());
        let dir = PathBuf::from("/sim/crash/wal");
        let (wal, report) = Wal::open(&dir, options.clone()).expect("create");
        assert!(report.created);
        let model = MemStorage::new_with_membership(voters());
        let mut generator = Generator::new(seed ^ 0x5eed, model.clone());
        generator.payload_bytes_max = payload_bytes_max;
        Self {
            seed,
            fs,
            options,
            dir,
            wal,
            generator,
            base: model,
            ops: Vec::new(),
            batch_ops: Vec::new(),
            durable_ops: 0,
            crashes: 0,
            large_batches: 0,
        }
    }

    fn step(&mut self) {
        let roll = self.generator.prng.range(0, 100);
        let outcome = match roll {
            0..=54 => self.write_next(),
            55..=79 => self.sync(),
            80..=84 => {
                self.crash_and_recover("power loss between operations");
                Ok(())
            }
            85..=89 => {
                let ops = self.generator.prng.range(0, 12);
                self.fs.crash_after_ops(ops);
                Ok(())
            }
            90..=92 => {
                let (write, sync) = if self.generator.prng.chance(1, 2) {
                    (0, 3)
                } else {
                    (8, 0)
                };
                self.fs.set_faults(SimFaults {
                    write_error_one_in: write,
                    sync_error_one_in: sync,
                    ..SimFaults::default()
                });
                Ok(())
            }
            93..=94 => {
                self.restart_cleanly();
                Ok(())
            }
            _ => {
                assert_same(&self.wal, &self.generator.model, &self.context("reads"));
                Ok(())
            }
        };
        if let Err(err) = outcome {
            assert!(
                is_fatal(&err),
                "{}: a generated operation was refused: {err}",
                self.context("")
            );
            let later = self.wal.write(&PersistBatch {
                id: u64::MAX,
                ..PersistBatch::default()
            });
            assert!(
                matches!(later, Err(WalError::Failed { .. })),
                "{}: after {err} the WAL must refuse all work, got {later:?}",
                self.context("")
            );
            self.crash_and_recover("crash after a failed operation");
        }
    }

    fn write_next(&mut self) -> Result<(), WalError> {
        let op = self.generator.next_op();
        self.ops.push(op.clone());
        match &op {
            Op::Batch(batch) => {
                self.batch_ops.push((batch.id, self.ops.len() - 1));
                if flotilla_raft::entries_size_bytes(&batch.entries) >= 64 << 10 {
                    self.large_batches += 1;
                }
                self.wal.write(batch)
            }
            Op::SaveSnapshot(meta, data) => {
                self.wal.save_snapshot(meta, &data[..])?;
                // Durable on return, and it synced the log before it.
                self.durable_ops = self.ops.len();
                Ok(())
            }
        }
    }

    fn sync(&mut self) -> Result<(), WalError> {
        let synced = self.wal.sync();
        // Half the time prepare the next segment ahead (as the server does after each sync);
        // otherwise the rollover creates it on the write path. Both must survive crashes.
        if synced.is_ok() && self.generator.prng.chance(1, 2) {
            self.wal.prepare_ahead()?;
        }
        // Likewise the obsolete files (the server unlinks them on a thread of its own): a
        // crash may leave them renamed, not yet unlinked.
        if synced.is_ok() && self.generator.prng.chance(1, 2) {
            self.wal.reap()?;
        }
        let Some(id) = synced? else {
            return Ok(());
        };
        let &(_, position) = self
            .batch_ops
            .iter()
            .find(|&&(batch, _)| batch == id)
            .expect("sync reports a batch that was written");
        // A snapshot saved since may already have made more durable.
        self.durable_ops = self.durable_ops.max(position + 1);
        Ok(())
    }

    fn restart_cleanly(&mut self) {
        if let Err(err) = self.wal.close() {
            self.crash_and_recover(&format!("crash after close failed: {err}"));
            return;
        }
        self.durable_ops = self.ops.len();
        self.reopen_and_check("clean restart");
    }

    fn crash_and_recover(&mut self, why: &str) {
        self.fs.crash();
        self.fs.set_faults(SimFaults::default());
        self.crashes += 1;
        self.reopen_and_check(why);
    }

    fn reopen_and_check(&mut self, why: &str) {
        self.fs.set_faults(SimFaults::default());
        // A crash scheduled earlier may strike during recovery itself: recover again.
        let mut attempts = 0;
        self.wal = loop {
            attempts += 1;
            match Wal::open(&self.dir, self.options.clone()) {
                Ok((wal, _report)) => break wal,
                Err(err) if self.fs.is_frozen() && attempts < 3 => {
                    let _ = err;
                    self.fs.crash();
                    self.crashes += 1;
                }
                Err(err) => {
                    panic!(
                        "{}: the WAL does not open after a {why}: {err}",
                        self.context("")
                    )
                }
            }
        };
        let recovered = observe(&self.wal);
        let Some(matched) = self.matching_candidate(&recovered) else {
            panic!(
                "{}: after a {why}, the recovered state is not what any prefix of the {} \
                 operations since the last open (at least {} of them durable) produced:\n\
                 {recovered:#?}\nlast operations: {:#?}",
                self.context(""),
                self.ops.len(),
                self.durable_ops,
                &self.ops[self.ops.len().saturating_sub(3)..]
            );
        };
        self.base = matched.clone();
        self.generator.model = matched;
        self.generator.resync();
        self.generator.next_batch_id = 1;
        self.ops.clear();
        self.batch_ops.clear();
        self.durable_ops = 0;
    }

    /// The state after `ops[..k]`, or after `ops[..k]` plus part of `ops[k]`, for some
    /// `k >= durable_ops`, that equals `recovered`.
    fn matching_candidate(&self, recovered: &Observed) -> Option<MemStorage> {
        let mut model = self.base.clone();
        for (k, op) in self.ops.iter().enumerate() {
            if k >= self.durable_ops {
                if observe(&model) == *recovered {
                    return Some(model);
                }
                if let Op::Batch(batch) = op {
                    for partial in partial_batches(batch) {
                        let mut candidate = model.clone();
                        candidate
                            .persist(&partial)
                            .expect("a prefix of a valid batch");
                        if observe(&candidate) == *recovered {
                            return Some(candidate);
                        }
                    }
                }
            }
            op.apply_to_model(&mut model);
        }
        (observe(&model) == *recovered).then_some(model)
    }

    fn context(&self, what: &str) -> String {
        format!(
            "seed {} (rerun with FLOTILLA_WAL_SEED={}), crash {} {what}",
            self.seed, self.seed, self.crashes
        )
    }
}

/// Every way a batch can be cut short: its steps in order, and any prefix of its entries.
fn partial_batches(batch: &PersistBatch) -> Vec<PersistBatch> {
    let mut cut = PersistBatch {
        id: batch.id,
        snapshot_chunks: batch.snapshot_chunks.clone(),
        ..PersistBatch::default()
    };
    let mut out = vec![cut.clone()];
    if batch.snapshot_install.is_some() {
        cut.snapshot_install = batch.snapshot_install.clone();
        out.push(cut.clone());
    }
    if batch.compact_to.is_some() {
        cut.compact_to = batch.compact_to;
        out.push(cut.clone());
    }
    for count in 1..=batch.entries.len() {
        cut.entries = batch.entries[..count].to_vec();
        out.push(cut.clone());
    }
    out
}

fn run(seed: u64, steps: u64) -> CrashRun {
    run_with(CrashRun::new(seed), steps)
}

fn run_with(mut run: CrashRun, steps: u64) -> CrashRun {
    for _ in 0..steps {
        run.step();
    }
    run.crash_and_recover("final power loss");
    run
}

#[test]
fn everything_reported_durable_survives_any_crash() {
    if let Some(seed) = std::env::var("FLOTILLA_WAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run(seed, 400);
        return;
    }
    let mut crashes = 0;
    let mut syncs = 0;
    for seed in 0..seeds(48) {
        let finished = run(seed, 250);
        crashes += finished.crashes;
        syncs += finished.fs.stats().file_syncs;
    }
    assert!(
        crashes > 100 && syncs > 1000,
        "the runs crashed {crashes} times, synced {syncs}"
    );
}

/// Batches of 64 KiB and more end on a page boundary with a padding record: the same
/// guarantees hold for them, across segments of 256 KiB.
#[test]
fn large_padded_batches_survive_any_crash() {
    let mut large_batches = 0;
    for seed in 0..seeds(48) / 4 {
        let finished = run_with(CrashRun::with_sizes(seed, 256 << 10, 16 << 10), 120);
        large_batches += finished.large_batches;
    }
    assert!(large_batches > 10, "{large_batches} large batches");
}

#[test]
fn a_failed_fsync_stops_the_log_for_good() {
    let mut run = CrashRun::new(7);
    for _ in 0..20 {
        run.write_next().unwrap();
    }
    run.fs.set_faults(SimFaults {
        sync_error_one_in: 1,
        ..SimFaults::default()
    });
    let err = run.wal.sync().unwrap_err();
    assert!(matches!(err, WalError::Io { op: "fsync", .. }), "{err}");
    run.fs.set_faults(SimFaults::default());
    assert!(run.wal.is_failed());
    assert!(matches!(run.wal.sync(), Err(WalError::Failed { .. })));
    assert!(matches!(
        run.wal.write(&PersistBatch::default()),
        Err(WalError::Failed { .. })
    ));
    use flotilla_raft::LogStorage;
    assert!(run.wal.entries(1, 2, 10).is_err(), "reads fail too");
    assert!(run.wal.initial_state().is_err());
    run.crash_and_recover("power loss after a failed fsync");
}

#[test]
fn a_full_disk_stops_the_log_and_loses_nothing_durable() {
    let mut run = CrashRun::new(3);
    for _ in 0..10 {
        run.write_next().unwrap();
    }
    run.sync().unwrap();
    run.fs.set_faults(SimFaults {
        capacity_bytes: 0,
        ..SimFaults::default()
    });
    let failed = (0..200).find_map(|_| run.write_next().err());
    let err = failed.expect("the disk fills up");
    assert!(err.to_string().contains("full"), "{err}");
    run.crash_and_recover("power loss on a full disk");
}
