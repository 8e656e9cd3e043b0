//! Measures the store's memory per key and per key revision by counting every allocation.
//!
//! `cargo run --release -p flotilla-kv --example memory_per_key [KEYS]` (default 1,000,000).
//!
//! Bytes are the net bytes requested from the allocator (allocated minus freed) while the
//! phase runs; the allocator's own bookkeeping per block (typically 8-16 bytes) comes on top,
//! and the resident set size is printed for comparison.

use std::alloc::System;

use bytes::Bytes;
use flotilla_kv::{Command, KvStore, Limits};
use flotilla_proto::etcdserverpb::{CompactionRequest, PutRequest};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEY_BYTES: usize = 14;
const VALUE_BYTES: usize = 256;

fn key(number: usize) -> Bytes {
    let key = Bytes::from(format!("key/{number:010}"));
    debug_assert_eq!(key.len(), KEY_BYTES);
    key
}

fn put(store: &mut KvStore, index: &mut u64, number: usize, fill: u8) {
    *index += 1;
    let command = Command::put(PutRequest {
        key: key(number),
        value: Bytes::from(vec![fill; VALUE_BYTES]),
        ..PutRequest::default()
    });
    let result = store.apply(*index, &command.encode());
    assert!(result.outcome.is_ok());
}

fn net_bytes(region: &Region<'_, System>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
        + change.bytes_reallocated as i64
}

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn report(phase: &str, bytes: i64, count: usize) {
    let per = bytes as f64 / count as f64;
    let overhead = per - (KEY_BYTES + VALUE_BYTES) as f64;
    println!(
        "{phase:<38} {:>8.1} MiB  {per:>7.1} B each  ({overhead:>6.1} B beyond the {KEY_BYTES}-byte key and {VALUE_BYTES}-byte value)",
        bytes as f64 / (1024.0 * 1024.0)
    );
}

fn main() {
    let keys: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(1_000_000);
    let rss_before = resident_bytes();
    let mut store = KvStore::new(Limits::default());
    let mut index = 0;

    let region = Region::new(GLOBAL);
    for number in 0..keys {
        put(&mut store, &mut index, number, b'a');
    }
    report("first revision of each key", net_bytes(&region), keys);

    let region = Region::new(GLOBAL);
    for number in 0..keys {
        put(&mut store, &mut index, number, b'b');
    }
    report("second revision of each key", net_bytes(&region), keys);

    let region = Region::new(GLOBAL);
    let current = store.current_revision();
    index += 1;
    let compaction = Command::compaction(CompactionRequest {
        revision: current,
        physical: true,
    });
    assert!(store.apply(index, &compaction.encode()).outcome.is_ok());
    let freed = -net_bytes(&region);
    println!(
        "compaction to the current revision     freed {:.1} MiB",
        freed as f64 / (1024.0 * 1024.0)
    );
    if let (Some(before), Some(after)) = (rss_before, resident_bytes()) {
        println!(
            "resident set grew by {:.1} MiB for {keys} keys (after compaction; freed memory may stay mapped)",
            (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0)
        );
    }
    assert_eq!(store.key_history_count(), keys);
}
