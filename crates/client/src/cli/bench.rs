//! `flotilla bench`: N concurrent clients writing fixed-size values to random keys (and
//! optionally reading) for a while, through the etcd API only, so the same command measures
//! an etcd cluster too. Prints throughput and latency percentiles from HDR histograms.
//!
//! The bench is built not to be the bottleneck: several HTTP/2 connections (one is served by
//! a single task on each side), one shared value buffer, keys formatted into one small
//! allocation per request, per-client histograms merged at the end, and progress read from
//! two atomic counters.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tonic::transport::Channel;

use super::{Consistency, GlobalArgs, OutputFormat, parse_duration};
use crate::{Client, SessionPolicy};

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, to 3 significant digits.
const LATENCY_MAX_MICROS: u64 = 600_000_000;
/// After an error, a client pauses this long so a dead endpoint does not turn the bench into
/// a busy loop.
const PAUSE_AFTER_ERROR: Duration = Duration::from_millis(10);
/// Distinct error messages kept for the report.
const ERROR_SAMPLES_MAX: usize = 5;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long to run (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Size of each written value, in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Number of distinct keys; each operation picks one uniformly at random.
    #[arg(long, default_value_t = 100_000)]
    pub key_space: u64,
    /// Prefix of every key.
    #[arg(long, default_value = "bench/")]
    pub key_prefix: String,
    /// Fraction of operations that are reads (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub read_ratio: f64,
    /// Consistency of the reads: linearizable (l) or serializable (s).
    #[arg(long, value_enum, default_value = "l")]
    pub read_consistency: Consistency,
    /// Where requests go: the leader, or spread over every endpoint.
    #[arg(long, value_enum, default_value = "leader")]
    pub target: BenchTarget,
    /// gRPC connections per target endpoint (default: one per 8 clients, 1 to 16).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Write through Flotilla sessions (duplicate suppression, with retries) instead of
    /// plain etcd requests.
    #[arg(long)]
    pub sessions: bool,
    /// Print the results as JSON (as does `-w json`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchTarget {
    Leader,
    All,
}

/// Results of one operation kind.
#[derive(Clone, Debug, Default)]
pub struct OperationStats {
    pub count: u64,
    pub errors: u64,
    pub throughput_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Results of a bench run.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub clients: usize,
    pub elapsed: Duration,
    pub value_size_bytes: usize,
    pub key_space: u64,
    pub read_ratio: f64,
    pub endpoints: Vec<String>,
    pub connections: usize,
    pub writes: OperationStats,
    pub reads: OperationStats,
    pub error_samples: Vec<String>,
}

impl BenchReport {
    pub fn throughput_per_second(&self) -> f64 {
        self.writes.throughput_per_second + self.reads.throughput_per_second
    }

    pub fn to_json(&self) -> serde_json::Value {
        let stats = |stats: &OperationStats| {
            json!({
                "count": stats.count,
                "errors": stats.errors,
                "throughput_per_second": stats.throughput_per_second,
                "latency_ms": {
                    "p50": stats.p50_ms, "p90": stats.p90_ms, "p99": stats.p99_ms,
                    "p99.9": stats.p999_ms, "max": stats.max_ms, "mean": stats.mean_ms,
                },
            })
        };
        json!({
            "clients": self.clients,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "value_size_bytes": self.value_size_bytes,
            "key_space": self.key_space,
            "read_ratio": self.read_ratio,
            "endpoints": self.endpoints,
            "connections": self.connections,
            "throughput_per_second": self.throughput_per_second(),
            "writes": stats(&self.writes),
            "reads": stats(&self.reads),
            "error_samples": self.error_samples,
        })
    }

    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "bench: {} clients for {:.1}s, {}-byte values, {} keys, {:.0}% reads, {} connection(s) to {}",
            self.clients,
            self.elapsed.as_secs_f64(),
            self.value_size_bytes,
            self.key_space,
            self.read_ratio * 100.0,
            self.connections,
            self.endpoints.join(",")
        )?;
        for (name, stats) in [("writes", &self.writes), ("reads", &self.reads)] {
            if stats.count == 0 && stats.errors == 0 {
                continue;
            }
            writeln!(
                out,
                "{name:<7} {:>9} ok {:>6} errors {:>10.1} ops/s   latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
                stats.count,
                stats.errors,
                stats.throughput_per_second,
                stats.p50_ms,
                stats.p90_ms,
                stats.p99_ms,
                stats.p999_ms,
                stats.max_ms,
                stats.mean_ms
            )?;
        }
        writeln!(out, "total   {:.1} ops/s", self.throughput_per_second())?;
        for sample in &self.error_samples {
            writeln!(out, "error: {sample}")?;
        }
        Ok(())
    }
}

pub(crate) async fn run(
    global: &GlobalArgs,
    args: &BenchArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let report = bench(global, args).await?;
    if args.json || global.write_out == OutputFormat::Json {
        writeln!(out, "{}", report.to_json())?;
    } else {
        report.write_text(out)?;
    }
    let failed = report.writes.count + report.reads.count == 0;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the bench and returns its report.
pub async fn bench(global: &GlobalArgs, args: &BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.read_ratio),
        "--read-ratio must be within 0..1"
    );
    anyhow::ensure!(args.key_space > 0, "--key-space must be at least 1");
    let endpoints = target_endpoints(global, args.target).await?;
    let connections_per_endpoint = args
        .connections
        .unwrap_or((args.clients / 8).clamp(1, 16))
        .max(1);
    let channels = connect_all(global, &endpoints, connections_per_endpoint).await?;
    let session_client = if args.sessions {
        let config = crate::ClientConfig::new(endpoints.clone())
            .with_dial_timeout(global.dial_timeout)
            .with_call_timeout(global.command_timeout)
            .with_connections_per_endpoint(connections_per_endpoint)
            .with_sessions(SessionPolicy::Sessions {
                pool_size: args.clients,
            });
        Some(Client::connect(config).await?)
    } else {
        None
    };

    let shared = Arc::new(Shared {
        value: Bytes::from(vec![b'x'; args.value_size]),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        deadline: Instant::now() + args.duration,
        request_timeout: global.command_timeout,
    });
    let progress = Progress::start(args.duration, shared.clone());
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..args.clients {
        let worker = Worker {
            kv: KvClient::new(channels[index % channels.len()].clone()),
            session_client: session_client.clone(),
            shared: shared.clone(),
            rng: SplitMix64::seeded(index as u64),
            key_prefix: args.key_prefix.clone(),
            key_space: args.key_space,
            read_ratio: args.read_ratio,
            serializable: args.read_consistency == Consistency::Serializable,
        };
        workers.spawn(worker.run());
    }
    let mut totals = WorkerResults::new();
    while let Some(joined) = workers.join_next().await {
        totals.merge(joined.context("a bench client panicked")?);
    }
    let elapsed = started.elapsed();
    progress.finish();
    Ok(BenchReport {
        clients: args.clients,
        elapsed,
        value_size_bytes: args.value_size,
        key_space: args.key_space,
        read_ratio: args.read_ratio,
        endpoints,
        connections: channels.len(),
        writes: stats(&totals.writes, totals.write_errors, elapsed),
        reads: stats(&totals.reads, totals.read_errors, elapsed),
        error_samples: totals.error_samples,
    })
}

/// The leader's endpoint (found with Status and MemberList), or all of them.
async fn target_endpoints(global: &GlobalArgs, target: BenchTarget) -> anyhow::Result<Vec<String>> {
    let configured: Vec<String> = global
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .collect();
    if target == BenchTarget::All {
        return Ok(configured);
    }
    let client = Client::connect(global.client_config()).await?;
    match client.find_leader().await {
        Ok(leader) => Ok(vec![leader.endpoint]),
        Err(error) => {
            eprintln!("bench: leader not found ({error}); spreading over all endpoints");
            Ok(configured)
        }
    }
}

/// Connects eagerly, so the clock does not include connection setup and a wrong endpoint
/// fails at once.
async fn connect_all(
    global: &GlobalArgs,
    endpoints: &[String],
    connections_per_endpoint: usize,
) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for endpoint in endpoints {
        for _ in 0..connections_per_endpoint {
            channels.push(global.connect_one(endpoint).await?);
        }
    }
    Ok(channels)
}

/// What all clients share; read-only but for the counters.
struct Shared {
    value: Bytes,
    completed: AtomicU64,
    failed: AtomicU64,
    deadline: Instant,
    request_timeout: Duration,
}

struct Worker {
    kv: KvClient<Channel>,
    session_client: Option<Client>,
    shared: Arc<Shared>,
    rng: SplitMix64,
    key_prefix: String,
    key_space: u64,
    read_ratio: f64,
    serializable: bool,
}

struct WorkerResults {
    writes: Histogram<u64>,
    reads: Histogram<u64>,
    write_errors: u64,
    read_errors: u64,
    error_samples: Vec<String>,
}

impl WorkerResults {
    fn new() -> WorkerResults {
        let histogram =
            || Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).expect("valid bounds");
        WorkerResults {
            writes: histogram(),
            reads: histogram(),
            write_errors: 0,
            read_errors: 0,
            error_samples: Vec::new(),
        }
    }

    fn merge(&mut self, other: WorkerResults) {
        self.writes.add(&other.writes).expect("same bounds");
        self.reads.add(&other.reads).expect("same bounds");
        self.write_errors += other.write_errors;
        self.read_errors += other.read_errors;
        for sample in other.error_samples {
            self.sample_error(sample);
        }
    }

    fn sample_error(&mut self, message: String) {
        if self.error_samples.len() < ERROR_SAMPLES_MAX && !self.error_samples.contains(&message) {
            self.error_samples.push(message);
        }
    }
}

impl Worker {
    async fn run(mut self) -> WorkerResults {
        let mut results = WorkerResults::new();
        while Instant::now() < self.shared.deadline {
            let key = self.random_key();
            let is_read = self.read_ratio > 0.0 && self.rng.next_fraction() < self.read_ratio;
            let started = Instant::now();
            let outcome = if is_read {
                self.read(key).await
            } else {
                self.write(key).await
            };
            let micros = started.elapsed().as_micros() as u64;
            match outcome {
                Ok(()) => {
                    let histogram = if is_read {
                        &mut results.reads
                    } else {
                        &mut results.writes
                    };
                    histogram.saturating_record(micros.max(1));
                    self.shared.completed.fetch_add(1, Ordering::Relaxed);
                }
                Err(message) => {
                    if is_read {
                        results.read_errors += 1;
                    } else {
                        results.write_errors += 1;
                    }
                    results.sample_error(message);
                    self.shared.failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(PAUSE_AFTER_ERROR).await;
                }
            }
        }
        results
    }

    fn random_key(&mut self) -> Bytes {
        let index = self.rng.next() % self.key_space;
        Bytes::from(format!("{}{index:012}", self.key_prefix))
    }

    async fn write(&mut self, key: Bytes) -> Result<(), String> {
        if let Some(client) = &self.session_client {
            return client
                .put(key, self.shared.value.clone())
                .await
                .map(drop)
                .map_err(|error| error.to_string());
        }
        let request = PutRequest {
            key,
            value: self.shared.value.clone(),
            ..Default::default()
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.shared.request_timeout);
        self.kv
            .put(request)
            .await
            .map(drop)
            .map_err(|status| status.message().to_string())
    }

    async fn read(&mut self, key: Bytes) -> Result<(), String> {
        let request = RangeRequest {
            key,
            serializable: self.serializable,
            ..Default::default()
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.shared.request_timeout);
        self.kv
            .range(request)
            .await
            .map(drop)
            .map_err(|status| status.message().to_string())
    }
}

fn stats(histogram: &Histogram<u64>, errors: u64, elapsed: Duration) -> OperationStats {
    let millis = |micros: u64| micros as f64 / 1000.0;
    if histogram.is_empty() {
        return OperationStats {
            errors,
            ..Default::default()
        };
    }
    OperationStats {
        count: histogram.len(),
        errors,
        throughput_per_second: histogram.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: millis(histogram.value_at_quantile(0.50)),
        p90_ms: millis(histogram.value_at_quantile(0.90)),
        p99_ms: millis(histogram.value_at_quantile(0.99)),
        p999_ms: millis(histogram.value_at_quantile(0.999)),
        max_ms: millis(histogram.max()),
        mean_ms: histogram.mean() / 1000.0,
    }
}

/// A progress bar over the run's duration with the running throughput; hidden when stdout
/// is not a terminal.
struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(duration: Duration, shared: Arc<Shared>) -> Progress {
        let total_millis = duration.as_millis() as u64;
        let bar = if std::io::stdout().is_terminal() {
            ProgressBar::new(total_millis).with_style(
                ProgressStyle::with_template("{bar:40.cyan/blue} {elapsed:>4} / {msg}")
                    .expect("valid template"),
            )
        } else {
            ProgressBar::hidden()
        };
        let ticking = bar.clone();
        let ticker = tokio::spawn(async move {
            let started = Instant::now();
            let mut interval = tokio::time::interval(Duration::from_millis(200));
            loop {
                interval.tick().await;
                let elapsed = started.elapsed();
                let completed = shared.completed.load(Ordering::Relaxed);
                let failed = shared.failed.load(Ordering::Relaxed);
                let rate = completed as f64 / elapsed.as_secs_f64().max(0.001);
                ticking.set_position((elapsed.as_millis() as u64).min(total_millis));
                ticking.set_message(format!(
                    "{:.0}s  {completed} ops  {rate:.0} ops/s  {failed} errors",
                    duration.as_secs_f64()
                ));
            }
        });
        Progress { bar, ticker }
    }

    fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// A small, fast generator for key choice (SplitMix64); quality is ample for uniform keys.
struct SplitMix64(u64);

impl SplitMix64 {
    fn seeded(stream: u64) -> SplitMix64 {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        SplitMix64(clock ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_fraction(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut histogram = Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).unwrap();
        for micros in 1..=1000 {
            histogram.record(micros * 10).unwrap();
        }
        let stats = stats(&histogram, 2, Duration::from_secs(2));
        assert_eq!(stats.count, 1000);
        assert_eq!(stats.errors, 2);
        assert!((stats.throughput_per_second - 500.0).abs() < 1e-9);
        assert!((stats.p50_ms - 5.0).abs() < 0.01, "{}", stats.p50_ms);
        assert!((stats.p99_ms - 9.9).abs() < 0.01, "{}", stats.p99_ms);
        assert!((stats.max_ms - 10.0).abs() < 0.01, "{}", stats.max_ms);
    }

    #[test]
    fn random_fractions_are_in_range_and_spread() {
        let mut rng = SplitMix64::seeded(1);
        let samples: Vec<f64> = (0..10_000).map(|_| rng.next_fraction()).collect();
        assert!(samples.iter().all(|sample| (0.0..1.0).contains(sample)));
        let below_half = samples.iter().filter(|sample| **sample < 0.5).count();
        assert!((4_500..5_500).contains(&below_half), "{below_half}");
    }
}
