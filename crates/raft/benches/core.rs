//! Benchmarks of the Raft core alone: a 3-node cluster in one process, messages delivered
//! instantly, storage in memory, 256-byte payloads.
//!
//! - `commit/outstanding_1`: one proposal at a time, proposed, replicated, committed, applied.
//! - `commit/outstanding_64`: 64 proposals in flight, which the leader batches into one append.
//! - `step/*`: the cost of one `step` call on a follower for common messages.
//!
//! Criterion reports time per committed entry (throughput = 1 / time) and per step.
//! Run with `cargo bench -p flotilla-raft --bench core`.

// A benchmark measures wall-clock time; the determinism rules are for the core itself.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flotilla_raft::{
    AppendRequest, Config, Entry, EntryId, EntryPayload, Heartbeat, MemStorage, Membership,
    Message, MessageBody, NodeId, RaftNode,
};

const PAYLOAD_BYTES: usize = 256;

struct Cluster {
    nodes: Vec<RaftNode<MemStorage>>,
    queue: VecDeque<Message>,
    payload: Bytes,
    applied_commands: u64,
}

impl Cluster {
    fn new() -> Self {
        let membership = Membership::with_voters([1, 2, 3]);
        let nodes = (1..=3)
            .map(|id| {
                let mut config = Config::new(id);
                config.uncommitted_bytes_max = 1 << 30;
                let storage = MemStorage::new_with_membership(membership.clone());
                RaftNode::new(config, storage, 0).expect("valid config")
            })
            .collect();
        let mut cluster = Self {
            nodes,
            queue: VecDeque::new(),
            payload: Bytes::from(vec![7u8; PAYLOAD_BYTES]),
            applied_commands: 0,
        };
        cluster.nodes[0].campaign().expect("campaign");
        cluster.run_until_quiet();
        assert!(cluster.nodes[0].is_leader(), "node 1 leads");
        cluster
    }

    fn node(&mut self, id: NodeId) -> &mut RaftNode<MemStorage> {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Drains every node (persisting and applying at once) and delivers messages until quiet.
    fn run_until_quiet(&mut self) {
        loop {
            for index in 0..self.nodes.len() {
                self.drain(index);
            }
            if self.queue.is_empty() {
                return;
            }
            while let Some(msg) = self.queue.pop_front() {
                let to = msg.to;
                self.node(to).step(msg).expect("step");
            }
        }
    }

    fn drain(&mut self, index: usize) {
        loop {
            let node = &mut self.nodes[index];
            let output = node.take_output().expect("output");
            if output.is_empty() {
                return;
            }
            if let Some(batch) = &output.persist {
                node.storage_mut().persist(batch).expect("persist");
                node.on_persisted(batch.id).expect("ack");
            }
            if let Some(last) = output.apply.last() {
                node.on_applied(last.index()).expect("applied");
                if index == 0 {
                    self.applied_commands += output.apply.len() as u64;
                }
            }
            self.queue.extend(output.messages);
        }
    }

    /// Commits `count` proposals with `outstanding` in flight at a time.
    fn commit(&mut self, count: u64, outstanding: u64) {
        let target = self.applied_commands + count;
        while self.applied_commands < target {
            let batch = outstanding.min(target - self.applied_commands);
            for _ in 0..batch {
                self.nodes[0]
                    .propose(self.payload.clone())
                    .expect("leader accepts");
            }
            self.run_until_quiet();
        }
    }

    /// Keeps the log short so that memory stays flat over long runs.
    fn compact(&mut self) {
        for node in &mut self.nodes {
            let applied = node.applied();
            if applied < node.snapshot_id().index + 10_000 {
                continue;
            }
            let meta = node.snapshot_meta(applied).expect("meta");
            node.storage_mut()
                .save_snapshot(meta.clone(), Bytes::new())
                .expect("save");
            node.on_snapshot_saved(&meta).expect("saved");
        }
        self.run_until_quiet();
    }
}

fn bench_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(1));
    for outstanding in [1u64, 64] {
        group.bench_function(format!("outstanding_{outstanding}"), |b| {
            let mut cluster = Cluster::new();
            b.iter_custom(|iterations| {
                let start = Instant::now();
                let mut remaining = iterations;
                while remaining > 0 {
                    let chunk = remaining.min(4_096);
                    cluster.commit(chunk, outstanding);
                    remaining -= chunk;
                    cluster.compact();
                }
                start.elapsed()
            });
        });
    }
    group.finish();
}

fn bench_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    let payload = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    group.bench_function("follower_append_1_entry", |b| {
        let membership = Membership::with_voters([1, 2, 3]);
        let storage = MemStorage::new_with_membership(membership);
        let mut node = RaftNode::new(Config::new(2), storage, 0).expect("valid");
        let mut next_index = 1;
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                let entry = Entry {
                    term: 1,
                    index: next_index,
                    payload: EntryPayload::Command(payload.clone()),
                };
                let msg = Message {
                    from: 1,
                    to: 2,
                    term: 1,
                    body: MessageBody::Append(AppendRequest {
                        prev: EntryId::new(if next_index == 1 { 0 } else { 1 }, next_index - 1),
                        entries: vec![entry],
                        commit: next_index - 1,
                    }),
                };
                let start = Instant::now();
                node.step(black_box(msg)).expect("step");
                elapsed += start.elapsed();
                next_index += 1;
                // Persist and apply outside the timed region.
                let output = node.take_output().expect("output");
                if let Some(batch) = &output.persist {
                    node.storage_mut().persist(batch).expect("persist");
                    node.on_persisted(batch.id).expect("ack");
                }
                if let Some(last) = output.apply.last() {
                    node.on_applied(last.index()).expect("applied");
                }
                let _ = node.take_output().expect("output");
            }
            elapsed
        });
    });
    group.bench_function("follower_heartbeat", |b| {
        let membership = Membership::with_voters([1, 2, 3]);
        let storage = MemStorage::new_with_membership(membership);
        let mut node = RaftNode::new(Config::new(2), storage, 0).expect("valid");
        b.iter(|| {
            let msg = Message {
                from: 1,
                to: 2,
                term: 1,
                body: MessageBody::Heartbeat(Heartbeat {
                    commit: 0,
                    read_round: 0,
                }),
            };
            node.step(black_box(msg)).expect("step");
            black_box(node.take_output().expect("output"));
        });
    });
    group.finish();
}

criterion_group!(benches, bench_commit, bench_step);
criterion_main!(benches);
