//! How a [`crate::Client`] connects, retries and deduplicates.

use std::time::Duration;

/// Retries are bounded both in count and in time; whichever runs out first ends the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub attempts_max: u32,
    /// Time budget of a whole call, retries and backoff included (etcdctl's
    /// `--command-timeout`).
    pub call_timeout: Duration,
    /// Timeout of one attempt when a retry may follow. Writes that cannot be retried safely
    /// (no session) get the whole remaining call budget instead.
    pub attempt_timeout: Duration,
    /// Backoff before the second round over the endpoints; it doubles each round.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 20,
            call_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// Whether writes carry a session for duplicate suppression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionPolicy {
    /// Register up to `pool_size` sessions (one per concurrent write); fall back to plain
    /// writes if the server does not implement sessions (etcd).
    Sessions { pool_size: usize },
    /// Plain etcd writes: never retried once they may have been sent.
    Plain,
}

/// Configuration of a [`crate::Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` or `http://host:port`, as etcdctl's `--endpoints`.
    pub endpoints: Vec<String>,
    /// Timeout of establishing one connection (etcdctl's `--dial-timeout`).
    pub dial_timeout: Duration,
    pub retry: RetryPolicy,
    /// HTTP/2 connections per endpoint; requests are spread over them. One is plenty for a
    /// command; a benchmark with many clients wants a few, as one connection is served by one
    /// task on each side.
    pub connections_per_endpoint: usize,
    pub sessions: SessionPolicy,
    /// Send writes to the leader (found with Status and MemberList) to save the forwarding
    /// hop. Off, writes go to whichever endpoint is preferred.
    pub route_writes_to_leader: bool,
    /// TLS settings (etcdctl's `--cacert`, `--cert`, `--key`, `--insecure-skip-tls-verify`);
    /// with them, endpoints without a scheme are dialed over https.
    pub tls: Option<flotilla_tls::ClientTls>,
    /// A user and password (etcdctl's `--user`): the client authenticates before its first
    /// call, sends the token with every call, and authenticates again when the server says
    /// the token is void or stale, as etcd's clients do.
    pub credentials: Option<Credentials>,
}

/// A user name and its password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, in logs or panics.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new<I, S>(endpoints: I) -> ClientConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            dial_timeout: Duration::from_secs(2),
            retry: RetryPolicy::default(),
            connections_per_endpoint: 1,
            sessions: SessionPolicy::Sessions { pool_size: 4 },
            route_writes_to_leader: true,
            tls: None,
            credentials: None,
        }
    }

    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    pub fn with_dial_timeout(mut self, dial_timeout: Duration) -> Self {
        self.dial_timeout = dial_timeout;
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.retry.call_timeout = call_timeout;
        self.retry.attempt_timeout = self.retry.attempt_timeout.min(call_timeout);
        self
    }

    pub fn with_sessions(mut self, sessions: SessionPolicy) -> Self {
        self.sessions = sessions;
        self
    }

    pub fn with_connections_per_endpoint(mut self, connections: usize) -> Self {
        self.connections_per_endpoint = connections.max(1);
        self
    }

    pub fn with_tls(mut self, tls: Option<flotilla_tls::ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    pub fn with_leader_routing(mut self, route_writes_to_leader: bool) -> Self {
        self.route_writes_to_leader = route_writes_to_leader;
        self
    }
}
