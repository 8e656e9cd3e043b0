//! `flotilla serve` configuration: etcd's flag names, each also read from `FLOTILLA_<FLAG>`
//! (upper case, dashes as underscores), and an optional TOML file (`--config-file`) using the
//! same names as keys.
//!
//! Precedence, lowest first: built-in defaults < the config file < environment variables <
//! command-line flags. (etcd differs: with `--config-file` it ignores flags and environment
//! entirely.)
// The flags' doc comments are their --help texts, where `<name>` is plain text.
#![allow(rustdoc::invalid_html_tags)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;

/// Flags of `flotilla serve`. Every one is optional here: unset ones fall back to the config
/// file, then to the defaults (see the module documentation).
#[derive(Args, Clone, Debug, Default)]
pub struct ServeArgs {
    /// A TOML file with any of these settings (keys as the flag names, e.g. `data-dir`).
    #[arg(long, env = "FLOTILLA_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// Human-readable name of this member [default: default].
    #[arg(long, env = "FLOTILLA_NAME")]
    pub name: Option<String>,
    /// Where the member keeps its data [default: <name>.flotilla].
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URLs to serve clients on, comma-separated [default: http://localhost:2379].
    #[arg(long, env = "FLOTILLA_LISTEN_CLIENT_URLS")]
    pub listen_client_urls: Option<String>,
    /// Client URLs announced to the cluster [default: the listen client URLs].
    #[arg(long, env = "FLOTILLA_ADVERTISE_CLIENT_URLS")]
    pub advertise_client_urls: Option<String>,
    /// URLs to serve peers on, comma-separated [default: http://localhost:2380].
    #[arg(long, env = "FLOTILLA_LISTEN_PEER_URLS")]
    pub listen_peer_urls: Option<String>,
    /// This member's peer URLs as the others reach them [default: the listen peer URLs].
    #[arg(long, env = "FLOTILLA_INITIAL_ADVERTISE_PEER_URLS")]
    pub initial_advertise_peer_urls: Option<String>,
    /// The initial cluster, `name=url,name=url,...` [default: <name>=<advertise peer URLs>].
    /// Ignored once the data directory exists.
    #[arg(long, env = "FLOTILLA_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// `new` to create a cluster, `existing` to join one (after `member add`) [default: new].
    #[arg(long, env = "FLOTILLA_INITIAL_CLUSTER_STATE")]
    pub initial_cluster_state: Option<ClusterState>,
    /// A token that makes the ids of this cluster unique [default: flotilla-cluster].
    #[arg(long, env = "FLOTILLA_INITIAL_CLUSTER_TOKEN")]
    pub initial_cluster_token: Option<String>,
    /// URLs to serve /metrics, /health, /readyz and /livez on, comma-separated [default: none].
    #[arg(long, env = "FLOTILLA_LISTEN_METRICS_URLS")]
    pub listen_metrics_urls: Option<String>,
    /// Listening sockets inherited from the process that started this one (socket
    /// activation), as descriptor numbers, comma-separated: each serves the `--listen-*-urls`
    /// entry with its address instead of a socket of the member's own, so the parent holds
    /// the port across restarts. Not read from the config file.
    #[arg(long, env = "FLOTILLA_LISTEN_FDS", value_delimiter = ',')]
    pub listen_fds: Vec<i32>,
    /// Milliseconds between leader heartbeats (one Raft tick) [default: 100].
    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<u64>,
    /// Milliseconds without a leader before an election (randomised up to twice that)
    /// [default: 1000].
    #[arg(long, env = "FLOTILLA_ELECTION_TIMEOUT")]
    pub election_timeout: Option<u64>,
    /// Applied entries between snapshots [default: 100000].
    #[arg(long, env = "FLOTILLA_SNAPSHOT_COUNT")]
    pub snapshot_count: Option<u64>,
    /// Entries kept in the log behind a snapshot, for slow followers [default: 5000].
    #[arg(long, env = "FLOTILLA_SNAPSHOT_CATCHUP_ENTRIES")]
    pub snapshot_catchup_entries: Option<u64>,
    /// Largest client request in bytes [default: 1572864].
    #[arg(long, env = "FLOTILLA_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most operations in one txn [default: 128].
    #[arg(long, env = "FLOTILLA_MAX_TXN_OPS")]
    pub max_txn_ops: Option<usize>,
    /// Space quota in bytes: a write that would take the store past it raises the NOSPACE
    /// alarm and fails, as in etcd. 0 means the default; negative means no quota. Unlike
    /// etcd there is no 8 GiB ceiling: the store is in memory, so the ceiling is a quarter of
    /// the member's memory (its cgroup's limit, else the machine's), and a larger quota is
    /// lowered to it with a warning [default: 2147483648].
    #[arg(
        long,
        env = "FLOTILLA_QUOTA_BACKEND_BYTES",
        allow_negative_numbers = true
    )]
    pub quota_backend_bytes: Option<i64>,
    /// Seconds a client session lives without a request [default: 60].
    #[arg(long, env = "FLOTILLA_SESSION_TTL")]
    pub session_ttl: Option<u64>,
    /// The tokens Authenticate issues, as etcd's flag: `simple`, or
    /// `jwt,sign-method=<RS256|ES256|HS256|...>,pub-key=<PEM file>,priv-key=<file>[,ttl=5m]`
    /// (HS* take the secret's file as priv-key) [default: simple].
    #[arg(long, env = "FLOTILLA_AUTH_TOKEN")]
    pub auth_token: Option<String>,
    /// Seconds a simple token lives after its last use [default: 300].
    #[arg(long, env = "FLOTILLA_AUTH_TOKEN_TTL")]
    pub auth_token_ttl: Option<u64>,
    /// bcrypt cost of stored passwords, 4 to 31; lower is faster and weaker (tests) [default: 10].
    #[arg(long, env = "FLOTILLA_BCRYPT_COST")]
    pub bcrypt_cost: Option<u32>,
    /// How often a quiet watcher that asked for progress notifications gets one, as a Go
    /// duration (`10m`, `5s`, `1m30s`) [default: 10m].
    #[arg(
        long,
        visible_alias = "watch-progress-notify-interval",
        env = "FLOTILLA_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        value_parser = parse_go_duration
    )]
    pub experimental_watch_progress_notify_interval: Option<Duration>,
    /// Before serving clients, compare this member's key-value hash with its peers' at the
    /// same revision, and refuse to start if one differs (etcd's flag) [default: false].
    #[arg(long, env = "FLOTILLA_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", num_args = 0..=1, default_missing_value = "true")]
    pub experimental_initial_corrupt_check: Option<bool>,
    /// How often the leader compares its key-value hash with every member's and raises the
    /// CORRUPT alarm for one that differs, as a Go duration; 0 turns it off (etcd's flag)
    /// [default: 0].
    #[arg(long, env = "FLOTILLA_EXPERIMENTAL_CORRUPT_CHECK_TIME", value_parser = parse_go_duration)]
    pub experimental_corrupt_check_time: Option<Duration>,
    /// Publish this member's Raft state (role, term, vote, election timer, commit and apply
    /// indexes, the log's tail, messages sent) on the metrics listener, as JSON at
    /// `/debug/raft` and as server-sent events at `/debug/raft/events`, for the cluster view
    /// of `flotilla dev` (see docs/raft-view.md) [default: false].
    #[arg(long, env = "FLOTILLA_EXPERIMENTAL_RAFT_VIEW", num_args = 0..=1, default_missing_value = "true")]
    pub experimental_raft_view: Option<bool>,
    /// Accept fault injection on the metrics listener, for `flotilla dev`'s cluster view:
    /// `POST /debug/faults/partition?peers=<id>,<id>` drops every message to and from those
    /// members (a partition made in the transport), `POST /debug/faults/heal` ends it. Never
    /// for a real cluster [default: false].
    #[arg(long, env = "FLOTILLA_EXPERIMENTAL_DEV_FAULTS", num_args = 0..=1, default_missing_value = "true")]
    pub experimental_dev_faults: Option<bool>,
    /// A step of the write path (a WAL group commit, preparing a segment, applying a batch,
    /// waiting for the state's lock, a raft round) slower than this is logged as a warning
    /// with its cause, as a Go duration (etcd's flag) [default: 100ms].
    #[arg(long, env = "FLOTILLA_WARNING_APPLY_DURATION", value_parser = parse_go_duration)]
    pub warning_apply_duration: Option<Duration>,
    /// Leader leases for linearizable reads: the leader answers them without a heartbeat round
    /// while a quorum acknowledged it within the last election timeout, less the drift margin.
    /// Safe only if clocks run at about the same rate on every member and every member sets
    /// it (a member with it ignores elections for an election timeout after it starts) [default: false].
    #[arg(long, env = "FLOTILLA_LEASE_READS", num_args = 0..=1, default_missing_value = "true")]
    pub lease_reads: Option<bool>,
    /// With --lease-reads: milliseconds taken off each lease for the members' clocks running at
    /// different rates [default: a tenth of the election timeout].
    #[arg(long, env = "FLOTILLA_LEASE_CLOCK_DRIFT")]
    pub lease_clock_drift: Option<u64>,
    /// UNSAFE, benchmarks only: never fsync; a crash may lose acknowledged writes.
    #[arg(long, env = "FLOTILLA_UNSAFE_NO_FSYNC", num_args = 0..=1, default_missing_value = "true")]
    pub unsafe_no_fsync: Option<bool>,
    /// Log format [default: text].
    #[arg(long, env = "FLOTILLA_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log level or filter, e.g. `info` or `flotilla_server=debug` [default: info].
    #[arg(long, env = "FLOTILLA_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// TLS: the client port's certificate (PEM), for https:// client URLs.
    #[arg(long, env = "FLOTILLA_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// TLS: the key of --cert-file (PEM).
    #[arg(long, env = "FLOTILLA_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// TLS: the CA that signs client certificates (PEM).
    #[arg(long, env = "FLOTILLA_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// TLS: refuse clients without a certificate signed by --trusted-ca-file [default: false].
    #[arg(long, env = "FLOTILLA_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: Option<bool>,
    /// TLS: serve https:// client URLs with a self-signed certificate made at start (kept in
    /// the data directory); clients must skip verification. Development only [default: false].
    #[arg(long, env = "FLOTILLA_AUTO_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub auto_tls: Option<bool>,
    /// TLS: the peer port's certificate (PEM), also presented when dialing peers.
    #[arg(long, env = "FLOTILLA_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// TLS: the key of --peer-cert-file (PEM).
    #[arg(long, env = "FLOTILLA_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// TLS: the CA that signs the peers' certificates (PEM), both ways.
    #[arg(long, env = "FLOTILLA_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// TLS: refuse peers without a certificate signed by --peer-trusted-ca-file [default: false].
    #[arg(long, env = "FLOTILLA_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub peer_client_cert_auth: Option<bool>,
    /// TLS: peers talk over self-signed certificates made at start, unverified. Development
    /// only [default: false].
    #[arg(long, env = "FLOTILLA_PEER_AUTO_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub peer_auto_tls: Option<bool>,
    /// TLS: the TLS 1.2 cipher suites to accept, comma-separated, in Go's names (TLS 1.3's are
    /// always on) [default: rustls' choice].
    #[arg(long, env = "FLOTILLA_CIPHER_SUITES")]
    pub cipher_suites: Option<String>,
    /// TLS: the lowest version accepted, TLS1.2 or TLS1.3 [default: TLS1.2].
    #[arg(long, env = "FLOTILLA_TLS_MIN_VERSION")]
    pub tls_min_version: Option<String>,
    /// Print the effective configuration (after file, environment and flags) and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    #[default]
    New,
    Existing,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The config file: the same settings as the flags, with the flag names as keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    listen_client_urls: Option<String>,
    advertise_client_urls: Option<String>,
    listen_peer_urls: Option<String>,
    initial_advertise_peer_urls: Option<String>,
    initial_cluster: Option<String>,
    initial_cluster_state: Option<ClusterState>,
    initial_cluster_token: Option<String>,
    listen_metrics_urls: Option<String>,
    heartbeat_interval: Option<u64>,
    election_timeout: Option<u64>,
    snapshot_count: Option<u64>,
    snapshot_catchup_entries: Option<u64>,
    max_request_bytes: Option<usize>,
    max_txn_ops: Option<usize>,
    quota_backend_bytes: Option<i64>,
    session_ttl: Option<u64>,
    auth_token: Option<String>,
    auth_token_ttl: Option<u64>,
    bcrypt_cost: Option<u32>,
    experimental_watch_progress_notify_interval: Option<String>,
    experimental_initial_corrupt_check: Option<bool>,
    experimental_corrupt_check_time: Option<String>,
    experimental_raft_view: Option<bool>,
    experimental_dev_faults: Option<bool>,
    warning_apply_duration: Option<String>,
    lease_reads: Option<bool>,
    lease_clock_drift: Option<u64>,
    unsafe_no_fsync: Option<bool>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    trusted_ca_file: Option<PathBuf>,
    client_cert_auth: Option<bool>,
    auto_tls: Option<bool>,
    peer_cert_file: Option<PathBuf>,
    peer_key_file: Option<PathBuf>,
    peer_trusted_ca_file: Option<PathBuf>,
    peer_client_cert_auth: Option<bool>,
    peer_auto_tls: Option<bool>,
    cipher_suites: Option<String>,
    tls_min_version: Option<String>,
}

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    pub initial_cluster: Vec<(String, String)>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    /// True if the token was given (not the default): a restart checks it against the data.
    pub initial_cluster_token_given: bool,
    pub listen_metrics_urls: Vec<String>,
    /// Inherited listening sockets (`--listen-fds`), each taken by the listen URL of its
    /// address (see `crate::inherited`).
    pub listen_fds: Vec<i32>,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// The space quota in bytes, `None` for none.
    pub quota_backend_bytes: Option<u64>,
    pub session_ttl: Duration,
    /// `--auth-token` as given (checked at start: see [`crate::auth::TokenKind::parse`]).
    pub auth_token: String,
    pub auth_token_ttl: Duration,
    pub bcrypt_cost: u32,
    pub watch_progress_notify_interval: Duration,
    pub initial_corrupt_check: bool,
    /// `None`: no periodic corruption check.
    pub corrupt_check_interval: Option<Duration>,
    /// Write-path steps slower than this are logged (`--warning-apply-duration`).
    pub slow_step: Duration,
    /// `--experimental-raft-view`.
    pub raft_view: bool,
    /// `--experimental-dev-faults`.
    pub dev_faults: bool,
    pub lease_reads: bool,
    pub lease_clock_drift: Duration,
    pub unsafe_no_fsync: bool,
    pub log_format: LogFormat,
    pub log_level: String,
    /// TLS of the client port (used for https:// client URLs).
    pub client_tls: TlsSide,
    /// TLS of the peer port (https:// peer URLs), also used to dial peers.
    pub peer_tls: TlsSide,
    pub tls_policy: flotilla_tls::TlsPolicy,
}

/// One port's TLS settings, as etcd's flags give them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSide {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub trusted_ca: Option<PathBuf>,
    pub client_cert_auth: bool,
    /// A self-signed certificate made at start instead of `cert` and `key`.
    pub auto_tls: bool,
}

impl TlsSide {
    /// Checks the combination; `what` is the flag prefix ("" or "peer-") and `urls` the URLs
    /// this side listens on.
    fn check(&self, what: &str, urls: &[String]) -> anyhow::Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("--{what}cert-file and --{what}key-file go together");
        }
        if self.client_cert_auth && self.trusted_ca.is_none() {
            bail!(
                "--{what}client-cert-auth needs --{what}trusted-ca-file (the CA that signs the certificates to accept)"
            );
        }
        let https = urls.iter().any(|url| url.starts_with("https://"));
        if https && self.cert.is_none() && !self.auto_tls {
            bail!(
                "https:// URLs need --{what}cert-file and --{what}key-file (or --{what}auto-tls): {}",
                urls.join(",")
            );
        }
        Ok(())
    }
}

pub const DEFAULT_CLUSTER_TOKEN: &str = "flotilla-cluster";
/// etcd's default space quota, 2 GiB.
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 << 30;
/// etcd's default.
pub const DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);

/// A Go duration: one or more number-and-unit pairs (`h`, `m`, `s`, `ms`, `us`, `ns`), such as
/// `10m`, `1m30s` or `1.5s`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (expected e.g. 10m, 5s, 500ms)");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let number: f64 = number.parse().map_err(|_| invalid())?;
        let seconds_per_unit = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(invalid()),
        };
        total += number * seconds_per_unit;
        rest = after;
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid())
}

impl ServeArgs {
    /// Applies the precedence rule and checks the result.
    pub fn resolve(&self) -> anyhow::Result<ServerConfig> {
        let file = match &self.config_file {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
        };
        let pick = |flag: &Option<String>, file: &Option<String>| flag.clone().or(file.clone());
        let name = pick(&self.name, &file.name).unwrap_or_else(|| "default".into());
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(format!("{name}.flotilla")));
        let listen_client_urls = split_urls(
            &pick(&self.listen_client_urls, &file.listen_client_urls)
                .unwrap_or_else(|| "http://localhost:2379".into()),
        )?;
        let advertise_client_urls =
            match pick(&self.advertise_client_urls, &file.advertise_client_urls) {
                Some(urls) => split_urls(&urls)?,
                None => listen_client_urls.clone(),
            };
        let listen_peer_urls = split_urls(
            &pick(&self.listen_peer_urls, &file.listen_peer_urls)
                .unwrap_or_else(|| "http://localhost:2380".into()),
        )?;
        let initial_advertise_peer_urls = match pick(
            &self.initial_advertise_peer_urls,
            &file.initial_advertise_peer_urls,
        ) {
            Some(urls) => split_urls(&urls)?,
            None => listen_peer_urls.clone(),
        };
        let initial_cluster = match pick(&self.initial_cluster, &file.initial_cluster) {
            Some(text) => parse_initial_cluster(&text)?,
            None => initial_advertise_peer_urls
                .iter()
                .map(|url| (name.clone(), url.clone()))
                .collect(),
        };
        let token = pick(&self.initial_cluster_token, &file.initial_cluster_token);
        let listen_metrics_urls = match pick(&self.listen_metrics_urls, &file.listen_metrics_urls) {
            Some(urls) => split_urls(&urls)?,
            None => Vec::new(),
        };
        let heartbeat_ms = self
            .heartbeat_interval
            .or(file.heartbeat_interval)
            .unwrap_or(100);
        let election_ms = self
            .election_timeout
            .or(file.election_timeout)
            .unwrap_or(1000);
        let watch_progress_notify_interval = match &self.experimental_watch_progress_notify_interval
        {
            Some(interval) => *interval,
            None => match &file.experimental_watch_progress_notify_interval {
                Some(text) => parse_go_duration(text).map_err(|e| {
                    anyhow::anyhow!("experimental-watch-progress-notify-interval: {e}")
                })?,
                None => DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL,
            },
        };
        if watch_progress_notify_interval.is_zero() {
            bail!("--experimental-watch-progress-notify-interval must be positive");
        }
        if heartbeat_ms == 0 || election_ms < 2 * heartbeat_ms {
            bail!(
                "--election-timeout ({election_ms} ms) must be at least twice \
                 --heartbeat-interval ({heartbeat_ms} ms), which must be positive"
            );
        }
        let corrupt_check_interval = match &self.experimental_corrupt_check_time {
            Some(interval) => *interval,
            None => match &file.experimental_corrupt_check_time {
                Some(text) => parse_go_duration(text)
                    .map_err(|e| anyhow::anyhow!("experimental-corrupt-check-time: {e}"))?,
                None => Duration::ZERO,
            },
        };
        let slow_step = match &self.warning_apply_duration {
            Some(duration) => *duration,
            None => match &file.warning_apply_duration {
                Some(text) => parse_go_duration(text)
                    .map_err(|e| anyhow::anyhow!("warning-apply-duration: {e}"))?,
                None => Duration::from_millis(100),
            },
        };
        if slow_step.is_zero() {
            bail!("--warning-apply-duration must be positive");
        }
        let auth_token =
            pick(&self.auth_token, &file.auth_token).unwrap_or_else(|| "simple".into());
        crate::auth::TokenKind::parse(&auth_token)?;
        let auth_token_ttl = self.auth_token_ttl.or(file.auth_token_ttl).unwrap_or(300);
        if auth_token_ttl == 0 {
            bail!("--auth-token-ttl must be positive");
        }
        let bcrypt_cost = self
            .bcrypt_cost
            .or(file.bcrypt_cost)
            .unwrap_or(crate::auth::password::DEFAULT_BCRYPT_COST);
        let costs = crate::auth::password::BCRYPT_COST_MIN..=crate::auth::password::BCRYPT_COST_MAX;
        if !costs.contains(&bcrypt_cost) {
            bail!("--bcrypt-cost {bcrypt_cost} is outside bcrypt's range {costs:?}");
        }
        let lease_reads = self.lease_reads.or(file.lease_reads).unwrap_or(false);
        let lease_clock_drift_ms = self
            .lease_clock_drift
            .or(file.lease_clock_drift)
            .unwrap_or(election_ms / 10);
        // The lease lasts T - 1 ticks (whole ticks of the election timeout) less the margin.
        let lease_ms = (election_ms / heartbeat_ms).saturating_sub(1) * heartbeat_ms;
        if lease_reads && election_ms / heartbeat_ms < 3 {
            bail!(
                "--lease-reads needs --election-timeout ({election_ms} ms) of at least three \
                 --heartbeat-interval ({heartbeat_ms} ms)"
            );
        }
        if lease_reads && lease_clock_drift_ms >= lease_ms {
            bail!(
                "--lease-reads: the lease lasts {lease_ms} ms (the election timeout less one \
                 heartbeat interval), which must exceed --lease-clock-drift \
                 ({lease_clock_drift_ms} ms)"
            );
        }
        let pick_path =
            |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or(file.clone());
        let client_tls = TlsSide {
            cert: pick_path(&self.cert_file, &file.cert_file),
            key: pick_path(&self.key_file, &file.key_file),
            trusted_ca: pick_path(&self.trusted_ca_file, &file.trusted_ca_file),
            client_cert_auth: self
                .client_cert_auth
                .or(file.client_cert_auth)
                .unwrap_or(false),
            auto_tls: self.auto_tls.or(file.auto_tls).unwrap_or(false),
        };
        let peer_tls = TlsSide {
            cert: pick_path(&self.peer_cert_file, &file.peer_cert_file),
            key: pick_path(&self.peer_key_file, &file.peer_key_file),
            trusted_ca: pick_path(&self.peer_trusted_ca_file, &file.peer_trusted_ca_file),
            client_cert_auth: self
                .peer_client_cert_auth
                .or(file.peer_client_cert_auth)
                .unwrap_or(false),
            auto_tls: self.peer_auto_tls.or(file.peer_auto_tls).unwrap_or(false),
        };
        client_tls.check("", &listen_client_urls)?;
        peer_tls.check("peer-", &listen_peer_urls)?;
        check_no_port_zero_advertised(
            &advertise_client_urls,
            &initial_advertise_peer_urls,
            &initial_cluster,
        )?;
        if let Some(url) = listen_metrics_urls
            .iter()
            .find(|u| u.starts_with("https://"))
        {
            bail!("--listen-metrics-urls: {url}: the metrics listener serves http:// only");
        }
        let tls_policy = flotilla_tls::TlsPolicy {
            cipher_suites: pick(&self.cipher_suites, &file.cipher_suites)
                .map(|list| {
                    list.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            min_version: pick(&self.tls_min_version, &file.tls_min_version),
        };
        tls_policy.provider()?;
        tls_policy.versions()?;
        let config = ServerConfig {
            name,
            data_dir,
            listen_client_urls,
            advertise_client_urls,
            listen_peer_urls,
            initial_advertise_peer_urls,
            initial_cluster,
            initial_cluster_state: self
                .initial_cluster_state
                .or(file.initial_cluster_state)
                .unwrap_or_default(),
            initial_cluster_token_given: token.is_some(),
            initial_cluster_token: token.unwrap_or_else(|| DEFAULT_CLUSTER_TOKEN.into()),
            listen_metrics_urls,
            listen_fds: self.listen_fds.clone(),
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            election_timeout: Duration::from_millis(election_ms),
            snapshot_count: self
                .snapshot_count
                .or(file.snapshot_count)
                .unwrap_or(100_000)
                .max(1),
            snapshot_catchup_entries: self
                .snapshot_catchup_entries
                .or(file.snapshot_catchup_entries)
                .unwrap_or(5_000),
            max_request_bytes: self
                .max_request_bytes
                .or(file.max_request_bytes)
                .unwrap_or(3 * 1024 * 1024 / 2),
            max_txn_ops: self.max_txn_ops.or(file.max_txn_ops).unwrap_or(128),
            quota_backend_bytes: match self
                .quota_backend_bytes
                .or(file.quota_backend_bytes)
                .unwrap_or(0)
            {
                0 => Some(DEFAULT_QUOTA_BACKEND_BYTES),
                bytes if bytes < 0 => None,
                bytes => Some(bytes as u64),
            },
            session_ttl: Duration::from_secs(
                self.session_ttl.or(file.session_ttl).unwrap_or(60).max(1),
            ),
            auth_token,
            auth_token_ttl: Duration::from_secs(auth_token_ttl),
            bcrypt_cost,
            watch_progress_notify_interval,
            initial_corrupt_check: self
                .experimental_initial_corrupt_check
                .or(file.experimental_initial_corrupt_check)
                .unwrap_or(false),
            corrupt_check_interval: (!corrupt_check_interval.is_zero())
                .then_some(corrupt_check_interval),
            slow_step,
            raft_view: self
                .experimental_raft_view
                .or(file.experimental_raft_view)
                .unwrap_or(false),
            dev_faults: self
                .experimental_dev_faults
                .or(file.experimental_dev_faults)
                .unwrap_or(false),
            lease_reads,
            lease_clock_drift: Duration::from_millis(lease_clock_drift_ms),
            unsafe_no_fsync: self
                .unsafe_no_fsync
                .or(file.unsafe_no_fsync)
                .unwrap_or(false),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            log_level: pick(&self.log_level, &file.log_level).unwrap_or_else(|| "info".into()),
            client_tls,
            peer_tls,
            tls_policy,
        };
        Ok(config)
    }
}

fn split_urls(text: &str) -> anyhow::Result<Vec<String>> {
    let urls: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(String::from)
        .collect();
    if urls.is_empty() {
        bail!("no URL given in {text:?}");
    }
    for url in &urls {
        parse_url(url)?;
    }
    Ok(urls)
}

/// `name=url,name=url`; a name may appear more than once (several peer URLs).
pub fn parse_initial_cluster(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut members = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, url)) = item.split_once('=') else {
            bail!("--initial-cluster entry {item:?} is not name=url");
        };
        parse_url(url).with_context(|| format!("--initial-cluster entry {item:?}"))?;
        members.push((name.trim().to_string(), url.trim().to_string()));
    }
    if members.is_empty() {
        bail!("--initial-cluster is empty");
    }
    Ok(members)
}

/// Checks an `http://host:port` or `https://host:port` URL; returns host and port.
pub fn parse_url(url: &str) -> anyhow::Result<(String, u16)> {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        bail!("{url}: not an http:// or https:// URL");
    };
    let rest = rest.trim_end_matches('/');
    let Some((host, port)) = rest.rsplit_once(':') else {
        bail!("{url}: the port is missing (http://host:port)");
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("{url}: invalid port {port:?}"))?;
    if host.is_empty() {
        bail!("{url}: the host is missing");
    }
    Ok((host.to_string(), port))
}

/// Port 0 in a listen URL lets the kernel choose (the member logs the port it got), but an
/// advertised URL is for others to dial: port 0 there is unreachable, and it is what the
/// advertised URLs default to with port 0 in the listen URLs.
fn check_no_port_zero_advertised(
    advertise_client_urls: &[String],
    initial_advertise_peer_urls: &[String],
    initial_cluster: &[(String, String)],
) -> anyhow::Result<()> {
    let port_zero = |url: &&String| parse_url(url).is_ok_and(|(_, port)| port == 0);
    let advertised = [
        (
            "--advertise-client-urls",
            advertise_client_urls.iter().find(port_zero),
        ),
        (
            "--initial-advertise-peer-urls",
            initial_advertise_peer_urls.iter().find(port_zero),
        ),
        (
            "--initial-cluster",
            initial_cluster.iter().map(|(_, url)| url).find(port_zero),
        ),
    ];
    for (flag, url) in advertised {
        if let Some(url) = url {
            bail!(
                "{flag}: {url} names port 0, which no one can dial (with port 0 in a listen \
                 URL, give the URLs others should use explicitly)"
            );
        }
    }
    Ok(())
}

/// The socket address to listen on for a URL.
pub fn listen_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let (host, port) = parse_url(url)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {url}"))?
        .next()
        .with_context(|| format!("{url} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_may_be_listened_on_but_not_advertised() {
        let args = |client: &str, advertise: Option<&str>| ServeArgs {
            listen_client_urls: Some(client.into()),
            advertise_client_urls: advertise.map(String::from),
            listen_peer_urls: Some("http://127.0.0.1:2380".into()),
            listen_metrics_urls: Some("http://127.0.0.1:0".into()),
            ..ServeArgs::default()
        };
        let error = args("http://127.0.0.1:0", None).resolve().unwrap_err();
        assert_eq!(
            error.to_string(),
            "--advertise-client-urls: http://127.0.0.1:0 names port 0, which no one can dial \
             (with port 0 in a listen URL, give the URLs others should use explicitly)"
        );
        let config = args("http://127.0.0.1:0", Some("http://127.0.0.1:2379"))
            .resolve()
            .unwrap();
        assert_eq!(config.listen_client_urls, vec!["http://127.0.0.1:0"]);
        assert_eq!(config.listen_metrics_urls, vec!["http://127.0.0.1:0"]);
        let peer_zero = ServeArgs {
            listen_peer_urls: Some("http://127.0.0.1:0".into()),
            ..args("http://127.0.0.1:2379", None)
        };
        assert!(
            peer_zero
                .resolve()
                .unwrap_err()
                .to_string()
                .starts_with("--initial-advertise-peer-urls: http://127.0.0.1:0 names port 0")
        );
    }

    #[test]
    fn defaults_follow_etcd() {
        let config = ServeArgs::default().resolve().unwrap();
        assert_eq!(config.name, "default");
        assert_eq!(config.data_dir, PathBuf::from("default.flotilla"));
        assert_eq!(config.listen_client_urls, vec!["http://localhost:2379"]);
        assert_eq!(
            config.initial_cluster,
            vec![("default".to_string(), "http://localhost:2380".to_string())]
        );
        assert_eq!(config.election_timeout, Duration::from_secs(1));
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla.toml");
        std::fs::write(
            &path,
            "name = \"from-file\"\nheartbeat-interval = 50\nelection-timeout = 500\n",
        )
        .unwrap();
        let args = ServeArgs {
            config_file: Some(path.clone()),
            name: Some("from-flag".into()),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.name, "from-flag");
        assert_eq!(config.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(config.election_timeout, Duration::from_millis(500));

        std::fs::write(&path, "nmae = \"typo\"\n").unwrap();
        let error = args.resolve().unwrap_err();
        assert!(format!("{error:#}").contains("unknown field"), "{error:#}");
    }

    #[test]
    fn slow_step_warnings_default_to_etcds_100ms_and_zero_is_refused() {
        assert_eq!(
            ServeArgs::default().resolve().unwrap().slow_step,
            Duration::from_millis(100)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla.toml");
        std::fs::write(&path, "warning-apply-duration = \"250ms\"\n").unwrap();
        let from_file = ServeArgs {
            config_file: Some(path.clone()),
            ..ServeArgs::default()
        };
        assert_eq!(
            from_file.clone().resolve().unwrap().slow_step,
            Duration::from_millis(250)
        );
        let flag = ServeArgs {
            warning_apply_duration: Some(Duration::from_millis(20)),
            ..from_file
        };
        assert_eq!(flag.resolve().unwrap().slow_step, Duration::from_millis(20));
        let error = ServeArgs {
            warning_apply_duration: Some(Duration::ZERO),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("must be positive"),
            "{error:#}"
        );
        std::fs::write(&path, "warning-apply-duration = \"soon\"\n").unwrap();
        let error = ServeArgs {
            config_file: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("warning-apply-duration"),
            "{error:#}"
        );
    }

    #[test]
    fn lease_reads_are_off_by_default_and_a_margin_that_leaves_no_lease_is_refused() {
        let config = ServeArgs::default().resolve().unwrap();
        assert!(!config.lease_reads);
        let on = ServeArgs {
            lease_reads: Some(true),
            ..ServeArgs::default()
        };
        let config = on.clone().resolve().unwrap();
        assert!(config.lease_reads);
        assert_eq!(config.lease_clock_drift, Duration::from_millis(100));
        let error = ServeArgs {
            lease_clock_drift: Some(900),
            ..on.clone()
        }
        .resolve()
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("must exceed --lease-clock-drift"),
            "{error:#}"
        );
        let error = ServeArgs {
            election_timeout: Some(200),
            ..on
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{error:#}").contains("at least three"), "{error:#}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("5 parsecs").is_err());
        let config = ServeArgs::default().resolve().unwrap();
        assert_eq!(
            config.watch_progress_notify_interval,
            DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL
        );
    }

    #[test]
    fn bad_urls_and_clusters_are_named() {
        assert!(parse_url("http://127.0.0.1:2379").is_ok());
        let err = parse_url("127.0.0.1:2379").unwrap_err().to_string();
        assert!(err.contains("not an http:// or https:// URL"), "{err}");
        assert!(parse_url("https://127.0.0.1:2379").is_ok());
        let err = parse_url("http://host").unwrap_err().to_string();
        assert!(err.contains("port is missing"), "{err}");
        let err = parse_initial_cluster("a=http://x:1,b")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"b\""), "{err}");
        let args = ServeArgs {
            heartbeat_interval: Some(100),
            election_timeout: Some(150),
            ..ServeArgs::default()
        };
        assert!(args.resolve().is_err());
    }

    #[test]
    fn tls_flags_are_checked_together() {
        let https = |extra: ServeArgs| ServeArgs {
            listen_client_urls: Some("https://127.0.0.1:2379".into()),
            ..extra
        };
        let err = https(ServeArgs::default())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("need --cert-file and --key-file (or --auto-tls)"),
            "{err}"
        );
        assert!(
            https(ServeArgs {
                auto_tls: Some(true),
                ..ServeArgs::default()
            })
            .resolve()
            .is_ok()
        );
        let err = ServeArgs {
            cert_file: Some("c.pem".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--cert-file and --key-file go together"),
            "{err}"
        );
        let err = ServeArgs {
            peer_client_cert_auth: Some(true),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--peer-client-cert-auth needs --peer-trusted-ca-file"),
            "{err}"
        );
        let err = ServeArgs {
            tls_min_version: Some("TLS0.9".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("--tls-min-version"), "{err}");
    }
}
