//! Apply throughput on a large store: puts of 256-byte values into a store of 1 million keys,
//! and ranges of 100 keys.
//!
//! `cargo bench -p flotilla-kv --bench apply`. Set `FLOTILLA_BENCH_KEYS` for a smaller store.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flotilla_kv::{Command, KvStore, Limits};
use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest};

const VALUE_BYTES: usize = 256;
const COMMAND_POOL: usize = 4096;

fn store_keys() -> usize {
    std::env::var("FLOTILLA_BENCH_KEYS")
        .ok()
        .and_then(|keys| keys.parse().ok())
        .unwrap_or(1_000_000)
}

fn key(number: usize) -> Bytes {
    Bytes::from(format!("key/{number:010}"))
}

/// A small deterministic generator, so runs are comparable.
fn next_random(state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state as usize
}

fn put_command(number: usize, fill: u8) -> Bytes {
    Command::put(PutRequest {
        key: key(number),
        value: Bytes::from(vec![fill; VALUE_BYTES]),
        ..PutRequest::default()
    })
    .encode()
}

fn loaded_store(keys: usize) -> (KvStore, u64) {
    let mut store = KvStore::new(Limits::default());
    for number in 0..keys {
        let result = store.apply(number as u64 + 1, &put_command(number, b'v'));
        assert!(result.outcome.is_ok());
    }
    (store, keys as u64)
}

fn apply_benchmarks(c: &mut Criterion) {
    let keys = store_keys();
    let (mut store, mut index) = loaded_store(keys);
    let mut random = 0x9e37_79b9_7f4a_7c15_u64;
    let puts: Vec<Bytes> = (0..COMMAND_POOL)
        .map(|fill| put_command(next_random(&mut random) % keys, fill as u8))
        .collect();
    let ranges: Vec<RangeRequest> = (0..COMMAND_POOL)
        .map(|_| {
            let start = next_random(&mut random) % (keys - 100);
            RangeRequest {
                key: key(start),
                range_end: key(start + 100),
                ..RangeRequest::default()
            }
        })
        .collect();

    let mut group = c.benchmark_group(format!("store_of_{keys}_keys"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    let mut next = 0;
    group.bench_function("apply_put_256_byte_value", |b| {
        b.iter(|| {
            index += 1;
            next = (next + 1) % COMMAND_POOL;
            black_box(store.apply(index, &puts[next]));
        })
    });
    group.bench_function("range_100_keys", |b| {
        b.iter(|| {
            next = (next + 1) % COMMAND_POOL;
            let response = store.range(&ranges[next]).unwrap();
            assert_eq!(response.kvs.len(), 100);
            black_box(response);
        })
    });
    group.finish();
}

criterion_group!(benches, apply_benchmarks);
criterion_main!(benches);
