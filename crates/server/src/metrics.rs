//! Prometheus metrics, rendered in the text exposition format.
//!
//! Names mirror etcd's under the `flotilla_` prefix (`flotilla_server_is_leader`, ...), except
//! the gRPC ones, which keep the names etcd and go-grpc-prometheus use
//! (`grpc_server_handled_total`, `grpc_server_handling_seconds`) so existing dashboards work.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_raft::{Index, Role, RoleState};
use flotilla_runtime::NodeMetrics;

/// Bucket upper bounds in seconds: from 0.5 ms to about 8 s, doubling (etcd's fsync buckets).
const BUCKETS_SECONDS: [f64; 15] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192,
];

/// A histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_SECONDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(bucket) = BUCKETS_SECONDS.iter().position(|&bound| seconds <= bound) {
            self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in BUCKETS_SECONDS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// Every metric of a member.
#[derive(Debug, Default)]
pub struct Metrics {
    pub is_leader: AtomicU64,
    pub has_leader: AtomicU64,
    pub term: AtomicU64,
    pub leader_changes: AtomicU64,
    pub commit_index: AtomicU64,
    pub apply_index: AtomicU64,
    pub proposals_committed: AtomicU64,
    pub proposals_failed: AtomicU64,
    pub proposals_pending: AtomicU64,
    pub snapshots_saved: AtomicU64,
    pub snapshots_restored: AtomicU64,
    pub peer_messages_dropped: AtomicU64,
    /// Linearizable reads answered from the leader's lease, without a heartbeat round.
    pub reads_from_lease: AtomicU64,
    /// Watchers whose bounded queue overflowed, sent back to catch up from history.
    pub watchers_fell_behind: AtomicU64,
    /// Bytes of unary Range responses encoded as they were sent (`range_body.rs`).
    pub range_bytes_streamed: AtomicU64,
    pub wal_fsync: Histogram,
    pub snapshot_save: Histogram,
    /// By (service, method, code).
    grpc_handled: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    /// By (service, method).
    grpc_handling: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
}

/// What the runtime reports, kept for `/metrics`.
impl NodeMetrics for Metrics {
    fn wal_synced(&self, took: Duration) {
        self.wal_fsync.observe(took);
    }

    fn role_changed(&self, state: &RoleState, leader_changed: bool) {
        if leader_changed {
            self.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
        self.is_leader
            .store(u64::from(state.role == Role::Leader), Ordering::Relaxed);
        self.has_leader.store(
            u64::from(state.leader != flotilla_raft::NODE_NONE),
            Ordering::Relaxed,
        );
        self.term.store(state.term, Ordering::Relaxed);
    }

    fn committed(&self, index: Index) {
        self.commit_index.store(index, Ordering::Relaxed);
    }

    fn applied(&self, index: Index, proposals_answered: usize) {
        self.apply_index.store(index, Ordering::Relaxed);
        self.proposals_committed
            .fetch_add(proposals_answered as u64, Ordering::Relaxed);
    }

    fn proposal_failed(&self) {
        self.proposals_failed.fetch_add(1, Ordering::Relaxed);
    }

    fn proposals_pending(&self, count: usize) {
        self.proposals_pending
            .store(count as u64, Ordering::Relaxed);
    }

    fn peer_message_dropped(&self) {
        self.peer_messages_dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot_saved(&self, took: Duration) {
        self.snapshot_save.observe(took);
    }

    fn snapshot_taken(&self) {
        self.snapshots_saved.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot_restored(&self) {
        self.snapshots_restored.fetch_add(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Records one finished unary RPC.
    pub fn grpc_handled(
        &self,
        service: &'static str,
        method: &'static str,
        code: tonic::Code,
        duration: Duration,
    ) {
        let code = code_name(code);
        *self
            .grpc_handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((service, method, code))
            .or_default() += 1;
        self.grpc_handling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((service, method))
            .or_default()
            .observe(duration);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        let gauges: [(&str, &str, &AtomicU64); 7] = [
            (
                "flotilla_server_is_leader",
                "1 if this member is the leader",
                &self.is_leader,
            ),
            (
                "flotilla_server_has_leader",
                "1 if a leader is known",
                &self.has_leader,
            ),
            ("flotilla_server_term", "The current Raft term", &self.term),
            (
                "flotilla_server_commit_index",
                "The committed Raft index",
                &self.commit_index,
            ),
            (
                "flotilla_server_apply_index",
                "The applied Raft index",
                &self.apply_index,
            ),
            (
                "flotilla_server_proposals_pending",
                "Proposals waiting to be applied",
                &self.proposals_pending,
            ),
            (
                "flotilla_server_proposals_committed_total",
                "Proposals committed and applied on this member (etcd reports it as a gauge)",
                &self.proposals_committed,
            ),
        ];
        for (name, help, value) in gauges {
            metric(&mut out, name, help, "gauge", value.load(Ordering::Relaxed));
        }
        let counters: [(&str, &str, &AtomicU64); 8] = [
            (
                "flotilla_server_reads_from_lease_total",
                "Linearizable reads answered from the leader's lease (--lease-reads)",
                &self.reads_from_lease,
            ),
            (
                "flotilla_server_leader_changes_seen_total",
                "Leader changes seen",
                &self.leader_changes,
            ),
            (
                "flotilla_server_proposals_failed_total",
                "Proposals that failed (refused, overwritten or timed out)",
                &self.proposals_failed,
            ),
            (
                "flotilla_server_snapshots_saved_total",
                "State machine snapshots saved",
                &self.snapshots_saved,
            ),
            (
                "flotilla_server_snapshots_restored_total",
                "State machine snapshots restored",
                &self.snapshots_restored,
            ),
            (
                "flotilla_watch_watchers_fell_behind_total",
                "Watchers whose queue overflowed and who caught up from history",
                &self.watchers_fell_behind,
            ),
            (
                "flotilla_kv_range_bytes_streamed_total",
                "Bytes of Range responses encoded a chunk at a time as they were sent",
                &self.range_bytes_streamed,
            ),
            (
                "flotilla_network_peer_messages_dropped_total",
                "Raft messages dropped because a peer queue was full or unreachable",
                &self.peer_messages_dropped,
            ),
        ];
        for (name, help, value) in counters {
            metric(
                &mut out,
                name,
                help,
                "counter",
                value.load(Ordering::Relaxed),
            );
        }
        histogram_header(
            &mut out,
            "flotilla_disk_wal_fsync_duration_seconds",
            "The latency of WAL fsyncs (group commits)",
        );
        self.wal_fsync
            .render(&mut out, "flotilla_disk_wal_fsync_duration_seconds", "");
        histogram_header(
            &mut out,
            "flotilla_snapshot_save_duration_seconds",
            "The time to save a state machine snapshot",
        );
        self.snapshot_save
            .render(&mut out, "flotilla_snapshot_save_duration_seconds", "");
        self.render_grpc(&mut out);
        out
    }

    fn render_grpc(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP grpc_server_handled_total Total number of RPCs completed on the server, \
             regardless of success or failure.\n# TYPE grpc_server_handled_total counter"
        );
        for ((service, method, code), count) in self
            .grpc_handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "grpc_server_handled_total{{grpc_code=\"{code}\",grpc_method=\"{method}\",\
                 grpc_service=\"{service}\",grpc_type=\"unary\"}} {count}"
            );
        }
        histogram_header(
            out,
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level \
             handled by the server.",
        );
        for ((service, method), histogram) in self
            .grpc_handling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let labels =
                format!("grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"unary\"");
            histogram.render(out, "grpc_server_handling_seconds", &labels);
        }
    }
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn histogram_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
}

/// gRPC's code names as go-grpc-prometheus spells them.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let metrics = Metrics::default();
        metrics.is_leader.store(1, Ordering::Relaxed);
        metrics.wal_fsync.observe(Duration::from_millis(3));
        metrics.grpc_handled(
            "etcdserverpb.KV",
            "Range",
            tonic::Code::Ok,
            Duration::from_millis(1),
        );
        let text = metrics.render();
        assert!(text.contains("flotilla_server_is_leader 1\n"));
        assert!(text.contains("flotilla_disk_wal_fsync_duration_seconds_bucket{le=\"0.004\"} 1"));
        assert!(text.contains("flotilla_disk_wal_fsync_duration_seconds_count 1"));
        assert!(text.contains(
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",\
             grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1"
        ));
        assert!(text.contains("grpc_server_handling_seconds_count{grpc_method=\"Range\""));
    }
}
