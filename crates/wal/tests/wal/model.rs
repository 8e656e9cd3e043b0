//! Property test: under the same sequence of operations, restarts included, the WAL and
//! `MemStorage` give identical answers to every read, errors included.
//!
//! Operations are drawn as plain numbers and interpreted against the model's current state, so
//! that every sequence is valid (what a Raft core could ask for) and shrinks well.

use flotilla_raft::{
    EntryId, HardState, Index, LogStorage, MemStorage, PersistBatch, SnapshotMeta, Term,
};
use proptest::prelude::*;

use crate::support::*;

#[derive(Clone, Debug)]
enum ModelOp {
    /// Append `count` entries of `bytes` each, replacing the suffix from a point chosen by
    /// `truncate` (if it says so and there is an uncommitted suffix), in a new term if `bump`.
    Append {
        count: u8,
        bytes: u16,
        truncate: Option<u8>,
        bump: bool,
    },
    HardState {
        commit: u8,
        vote: u8,
    },
    SaveSnapshot {
        at: u8,
        len: u16,
    },
    Compact {
        at: u8,
    },
    /// A snapshot from the leader, `ahead` past the commit index, sent in chunks.
    ReceiveSnapshot {
        ahead: u8,
        matching: bool,
        len: u16,
        chunk: u16,
        batches: u8,
    },
    Reopen,
    /// Reads `[low, low + span)` with a byte limit right at, just below or just above the
    /// size of the first `limit_entries` entries (or an arbitrary one).
    Read {
        low: u8,
        span: u8,
        limit_entries: u8,
        limit_delta: i8,
        snapshot_offset: u16,
    },
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        6 => (1u8..8, 0u16..400, proptest::option::weighted(0.3, any::<u8>()), any::<bool>())
            .prop_map(|(count, bytes, truncate, bump)| ModelOp::Append { count, bytes, truncate, bump }),
        3 => (any::<u8>(), 0u8..4).prop_map(|(commit, vote)| ModelOp::HardState { commit, vote }),
        1 => (any::<u8>(), 0u16..3000).prop_map(|(at, len)| ModelOp::SaveSnapshot { at, len }),
        1 => any::<u8>().prop_map(|at| ModelOp::Compact { at }),
        1 => (0u8..10, any::<bool>(), 0u16..3000, 1u16..2000, 1u8..4).prop_map(
            |(ahead, matching, len, chunk, batches)| ModelOp::ReceiveSnapshot {
                ahead, matching, len, chunk, batches
            }),
        1 => Just(ModelOp::Reopen),
        4 => (any::<u8>(), 0u8..40, 0u8..12, -1i8..=1, 0u16..3000).prop_map(
            |(low, span, limit_entries, limit_delta, snapshot_offset)| ModelOp::Read {
                low, span, limit_entries, limit_delta, snapshot_offset
            }),
    ]
}

/// Scales `fraction` (0..=255) into `low..=high`.
fn pick(fraction: u8, low: Index, high: Index) -> Index {
    assert!(low <= high);
    low + (high - low) * fraction as u64 / 255
}

struct Pair {
    mem: MemStorage,
    wal: Option<WalUnderTest>,
    next_id: u64,
    term: Term,
}

impl Pair {
    fn wal(&self) -> &WalUnderTest {
        self.wal.as_ref().expect("open")
    }

    fn commit(&self) -> Index {
        let snapshot = self.mem.snapshot_info().map_or(0, |s| s.meta.last.index);
        self.mem.hard_state().commit.max(snapshot)
    }

    fn batch(&mut self) -> PersistBatch {
        self.next_id += 1;
        PersistBatch {
            id: self.next_id,
            ..PersistBatch::default()
        }
    }

    fn persist(&mut self, batch: PersistBatch) {
        self.mem.persist(&batch).expect("a valid batch");
        WritableStorage::persist(self.wal.as_mut().expect("open"), &batch)
            .expect("the WAL takes what MemStorage takes");
    }

    fn apply(&mut self, op: &ModelOp) {
        match *op {
            ModelOp::Append {
                count,
                bytes,
                truncate,
                bump,
            } => self.append(count, bytes, truncate, bump),
            ModelOp::HardState { commit, vote } => {
                let commit = pick(commit, self.commit(), self.mem.last_index());
                let mut batch = self.batch();
                batch.hard_state = Some(HardState {
                    term: self.term,
                    vote: vote as u64,
                    commit,
                });
                self.persist(batch);
            }
            ModelOp::SaveSnapshot { at, len } => {
                let current = self.mem.snapshot_info().map_or(0, |s| s.meta.last.index);
                let commit = self.commit();
                if commit == 0 {
                    return;
                }
                let index = pick(at, current.max(1), commit);
                let meta = snapshot_meta(self.mem.term(index).expect("in the log"), index);
                let data = snapshot_bytes(index, len as usize);
                self.mem
                    .save_snapshot(meta.clone(), data.clone())
                    .expect("valid");
                self.wal
                    .as_mut()
                    .expect("open")
                    .save_snapshot(&meta, data)
                    .expect("the WAL saves what MemStorage saves");
            }
            ModelOp::Compact { at } => {
                let snapshot = self.mem.snapshot_info().map_or(0, |s| s.meta.last.index);
                let mut batch = self.batch();
                batch.compact_to = Some(pick(at, 0, snapshot));
                self.persist(batch);
            }
            ModelOp::ReceiveSnapshot {
                ahead,
                matching,
                len,
                chunk,
                batches,
            } => self.receive_snapshot(ahead, matching, len, chunk, batches),
            ModelOp::Reopen => {
                let wal = self.wal.take().expect("open");
                self.wal = Some(wal.reopen());
                self.next_id = 0;
            }
            ModelOp::Read {
                low,
                span,
                limit_entries,
                limit_delta,
                snapshot_offset,
            } => self.compare_reads(low, span, limit_entries, limit_delta, snapshot_offset),
        }
    }

    fn append(&mut self, count: u8, bytes: u16, truncate: Option<u8>, bump: bool) {
        let floor = self.commit().max(self.mem.first_index() - 1);
        let last = self.mem.last_index();
        let first = match truncate {
            Some(at) if last > floor => {
                self.term += 1;
                pick(at, floor + 1, last)
            }
            _ => {
                if bump {
                    self.term += 1;
                }
                last + 1
            }
        };
        let mut batch = self.batch();
        batch.entries = (first..first + count as u64)
            .map(|index| match index % 7 {
                0 => membership_entry(self.term, index),
                _ => command(self.term, index, bytes as usize),
            })
            .collect();
        self.persist(batch);
    }

    fn receive_snapshot(&mut self, ahead: u8, matching: bool, len: u16, chunk: u16, batches: u8) {
        let commit = self.commit();
        let last = self.mem.last_index();
        let index = commit + 1 + ahead as u64;
        let term = match self.mem.term(index) {
            Ok(term) if matching => term,
            _ => {
                self.term += 1;
                self.term
            }
        };
        let meta: SnapshotMeta = snapshot_meta(term, index);
        let data = snapshot_bytes(index ^ 0xabc, len as usize);
        let pieces = chunks(&meta, &data, chunk as usize);
        let per_batch = pieces.len().div_ceil(batches as usize).max(1);
        let groups: Vec<_> = pieces.chunks(per_batch).map(<[_]>::to_vec).collect();
        let keep_through = if self.mem.term(index) == Ok(term) {
            last
        } else {
            index
        };
        for (i, group) in groups.iter().enumerate() {
            let mut batch = self.batch();
            batch.snapshot_chunks = group.clone();
            if i + 1 == groups.len() {
                batch.snapshot_install = install(&meta, keep_through.max(index));
            }
            self.persist(batch);
        }
    }

    fn compare_reads(
        &self,
        low: u8,
        span: u8,
        limit_entries: u8,
        limit_delta: i8,
        snapshot_offset: u16,
    ) {
        let wal = self.wal();
        let last = self.mem.last_index();
        let low = pick(low, 0, last + 3);
        let high = low + span as u64;
        let sizes: Vec<u64> = self
            .mem
            .entries(low, high, u64::MAX)
            .unwrap_or_default()
            .iter()
            .map(|entry| entry.size_bytes())
            .collect();
        let prefix_bytes: u64 = sizes.iter().take(limit_entries as usize).sum();
        let bytes_max = prefix_bytes.saturating_add_signed(limit_delta as i64);
        assert_eq!(
            wal.entries(low, high, bytes_max),
            self.mem.entries(low, high, bytes_max),
            "entries({low}, {high}, {bytes_max})"
        );
        assert_eq!(wal.term(low), self.mem.term(low), "term({low})");
        assert_eq!(wal.first_index(), self.mem.first_index());
        assert_eq!(wal.last_index(), self.mem.last_index());
        let asked = self
            .mem
            .snapshot_info()
            .map_or(EntryId::new(1, 1), |s| s.meta.last);
        let offset = snapshot_offset as u64;
        assert_eq!(
            wal.snapshot_chunk(asked, offset, 700),
            self.mem.snapshot_chunk(asked, offset, 700)
        );
        let stale = EntryId::new(asked.term, asked.index + 1);
        assert_eq!(
            wal.snapshot_chunk(stale, 0, 10),
            self.mem.snapshot_chunk(stale, 0, 10)
        );
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_wal_answers_exactly_as_mem_storage(
        ops in proptest::collection::vec(model_op(), 1..60),
        seed in any::<u64>(),
    ) {
        let mut pair = Pair {
            mem: MemStorage::new_with_membership(voters()),
            wal: Some(WalUnderTest::sim(seed, 4096, voters())),
            next_id: 0,
            term: 1,
        };
        for (step, op) in ops.iter().enumerate() {
            pair.apply(op);
            let got = observe(pair.wal());
            let want = observe(&pair.mem);
            prop_assert_eq!(got, want, "after step {} ({:?})", step, op);
        }
        let wal = pair.wal.take().expect("open").reopen();
        prop_assert_eq!(observe(&wal), observe(&pair.mem), "after a final restart");
    }
}
