//! The endpoints a client talks to: one lazily connected channel set per endpoint, which one to
//! try first, and which one is the leader.
//!
//! Channels connect on first use and reconnect by themselves, so an endpoint that is down
//! costs nothing until a request picks it, and a connection error then comes back at once as
//! "never sent" (see `error::classify`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use crate::error::ClientError;

/// Marks "leader unknown" in [`Endpoints::leader`].
const NO_LEADER: usize = usize::MAX;

/// One server address and its connections.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// As the user wrote it, for messages and `status` rows.
    pub(crate) name: String,
    /// Normalised `http://host:port`, to match members' client URLs.
    pub(crate) url: String,
    channels: Vec<Channel>,
    next_channel: AtomicUsize,
}

/// How the client dials an endpoint.
#[derive(Clone, Debug)]
pub(crate) struct Dialer {
    pub(crate) dial_timeout: Duration,
    pub(crate) connections_per_endpoint: usize,
    /// TLS for https endpoints (and scheme-less ones, when given).
    pub(crate) tls: Option<Arc<flotilla_tls::ClientConfig>>,
}

impl Endpoint {
    fn connect_lazy(name: &str, dialer: &Dialer) -> Result<Self, ClientError> {
        let url = normalize_url(name, dialer.tls.is_some())?;
        let invalid = |reason: String| ClientError::InvalidEndpoint {
            endpoint: name.to_string(),
            reason,
        };
        let builder = TonicEndpoint::from_shared(url.clone())
            .map_err(|error| invalid(error.to_string()))?
            .connect_timeout(dialer.dial_timeout)
            .tcp_nodelay(true)
            // etcdctl's keepalive defaults: a peer that stops answering (SIGSTOP, partition)
            // fails in-flight requests instead of hanging them.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(6));
        let channels = (0..dialer.connections_per_endpoint.max(1))
            .map(|_| {
                flotilla_tls::channel(builder.clone(), dialer.tls.as_ref())
                    .map_err(|error| invalid(error.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Endpoint {
            name: name.to_string(),
            url,
            channels,
            next_channel: AtomicUsize::new(0),
        })
    }

    /// A channel for one request, round-robin over the endpoint's connections.
    pub(crate) fn channel(&self) -> Channel {
        let turn = self.next_channel.fetch_add(1, Ordering::Relaxed);
        self.channels[turn % self.channels.len()].clone()
    }
}

/// `host:port` becomes `http://host:port`, or `https://host:port` when the client has TLS
/// settings (as etcdctl does with `--cacert`); a trailing slash is dropped. An `https://`
/// endpoint without TLS settings is refused, saying which flags are missing.
pub fn normalize_url(endpoint: &str, tls: bool) -> Result<String, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = endpoint.trim().trim_end_matches('/');
    let (scheme, authority) = if let Some(rest) = trimmed.strip_prefix("https://") {
        if !tls {
            return Err(invalid(
                "an https endpoint needs TLS settings: --cacert (and --cert/--key if the server asks for a client certificate), or --insecure-skip-tls-verify",
            ));
        }
        ("https", rest)
    } else if let Some(rest) = trimmed.strip_prefix("http://") {
        ("http", rest)
    } else if tls {
        ("https", trimmed)
    } else {
        ("http", trimmed)
    };
    if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
        return Err(invalid(
            "expected host:port, http://host:port or https://host:port",
        ));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// The client's endpoints, with the one to try first and the leader if known.
#[derive(Debug)]
pub(crate) struct Endpoints {
    list: RwLock<Vec<Arc<Endpoint>>>,
    /// Index of the endpoint requests start from; moves on when it fails.
    preferred: AtomicUsize,
    /// Index of the leader's endpoint, or [`NO_LEADER`].
    leader: AtomicUsize,
    dialer: Dialer,
}

impl Endpoints {
    pub(crate) fn new(names: &[String], dialer: Dialer) -> Result<Endpoints, ClientError> {
        if names.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let list = names
            .iter()
            .map(|name| Endpoint::connect_lazy(name, &dialer).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Endpoints {
            list: RwLock::new(list),
            preferred: AtomicUsize::new(0),
            leader: AtomicUsize::new(NO_LEADER),
            dialer,
        })
    }

    pub(crate) fn all(&self) -> Vec<Arc<Endpoint>> {
        self.list.read().expect("endpoint list lock").clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.list.read().expect("endpoint list lock").len()
    }

    /// The endpoint for attempt `attempt` (0-based) of a call: the leader first if wanted and
    /// known, else the preferred endpoint, then the others in turn.
    pub(crate) fn pick(&self, attempt: u32, want_leader: bool) -> (usize, Arc<Endpoint>) {
        let list = self.list.read().expect("endpoint list lock");
        let leader = self.leader.load(Ordering::Relaxed);
        let start = if want_leader && leader < list.len() {
            leader
        } else {
            self.preferred.load(Ordering::Relaxed)
        };
        let index = (start + attempt as usize) % list.len();
        (index, list[index].clone())
    }

    /// An attempt on `index` failed for want of the endpoint (unreachable, no leader, timed
    /// out): later calls start elsewhere, and the leader must be found again.
    pub(crate) fn report_failure(&self, index: usize) {
        let len = self.len();
        let _ = self.preferred.compare_exchange(
            index,
            (index + 1) % len,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let _ =
            self.leader
                .compare_exchange(index, NO_LEADER, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn leader(&self) -> Option<(usize, Arc<Endpoint>)> {
        let list = self.list.read().expect("endpoint list lock");
        let leader = self.leader.load(Ordering::Relaxed);
        list.get(leader).map(|endpoint| (leader, endpoint.clone()))
    }

    pub(crate) fn forget_leader(&self) {
        self.leader.store(NO_LEADER, Ordering::Relaxed);
    }

    /// Records the leader's endpoint by client URL, adding it if the user did not list it
    /// (members advertise their client URLs in MemberList). Returns its index.
    pub(crate) fn set_leader_url(&self, client_url: &str) -> Result<usize, ClientError> {
        let url = normalize_url(client_url, self.dialer.tls.is_some())?;
        let mut list = self.list.write().expect("endpoint list lock");
        let index = match list.iter().position(|endpoint| endpoint.url == url) {
            Some(index) => index,
            None => {
                let endpoint = Endpoint::connect_lazy(client_url, &self.dialer)?;
                list.push(Arc::new(endpoint));
                list.len() - 1
            }
        };
        self.leader.store(index, Ordering::Relaxed);
        Ok(index)
    }

    pub(crate) fn set_leader_index(&self, index: usize) {
        self.leader.store(index, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised() {
        assert_eq!(
            normalize_url("127.0.0.1:2379", false).unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_url("http://localhost:2379/", false).unwrap(),
            "http://localhost:2379"
        );
        let error = normalize_url("https://127.0.0.1:2379", false).unwrap_err();
        assert!(error.to_string().contains("--cacert"), "{error}");
        assert_eq!(
            normalize_url("https://127.0.0.1:2379", true).unwrap(),
            "https://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_url("127.0.0.1:2379", true).unwrap(),
            "https://127.0.0.1:2379"
        );
        assert!(normalize_url("127.0.0.1", false).is_err());
        assert!(normalize_url("", false).is_err());
    }

    fn dialer() -> Dialer {
        Dialer {
            dial_timeout: Duration::from_secs(1),
            connections_per_endpoint: 1,
            tls: None,
        }
    }

    #[tokio::test]
    async fn failures_move_the_preferred_endpoint_and_forget_the_leader() {
        let names = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let endpoints = Endpoints::new(&names, dialer()).unwrap();
        assert_eq!(endpoints.pick(0, false).0, 0);
        assert_eq!(endpoints.pick(1, false).0, 1);
        endpoints.set_leader_index(1);
        assert_eq!(endpoints.pick(0, true).0, 1);
        assert_eq!(endpoints.pick(0, false).0, 0, "reads ignore the leader");
        endpoints.report_failure(1);
        assert!(endpoints.leader().is_none());
        endpoints.report_failure(0);
        assert_eq!(endpoints.pick(0, false).0, 1);
    }

    #[tokio::test]
    async fn an_unlisted_leader_url_is_added() {
        let names = vec!["127.0.0.1:1".to_string()];
        let endpoints = Endpoints::new(&names, dialer()).unwrap();
        assert_eq!(endpoints.set_leader_url("http://127.0.0.1:1").unwrap(), 0);
        assert_eq!(endpoints.set_leader_url("http://127.0.0.1:3").unwrap(), 1);
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints.leader().unwrap().1.url, "http://127.0.0.1:3");
    }
}
