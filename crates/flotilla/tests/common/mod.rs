//! A cluster of real `flotilla serve` processes on 127.0.0.1 for integration tests: ports the
//! kernel picked, held by the harness and handed to each member start as listening sockets
//! (see `sockets`), a temporary data directory, every process killed by PID when the test ends (even on
//! panic), and helpers that wait for events with a deadline instead of sleeping.

#![allow(dead_code)]

pub mod sockets;
pub mod strace;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_proto::etcdserverpb::cluster_client::ClusterClient;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest, StatusRequest, StatusResponse};
use rustix::process::{Pid, Signal, kill_process};
use tonic::transport::{Channel, Endpoint};

pub const BINARY: &str = env!("CARGO_BIN_EXE_flotilla");
/// Fast timing for tests: 50 ms heartbeats, 400 ms election timeout.
pub const HEARTBEAT_MS: u64 = 50;
pub const ELECTION_MS: u64 = 400;

/// Runs a test body with a hard time bound.
pub async fn bounded<F: Future<Output = ()>>(limit: Duration, body: F) {
    if tokio::time::timeout(limit, body).await.is_err() {
        panic!("the test did not finish within {limit:?}");
    }
}

/// Polls `check` until it returns `Some`, failing the test at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A child process killed (SIGKILL, by PID) when dropped.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32).expect("a child has a positive pid")
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill_process(self.pid(), signal);
    }

    /// Waits for the process to exit by itself; its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        eventually("the process to exit", limit, || {
            let status = self.child.try_wait().ok().flatten();
            async move { status }
        })
        .await
        .code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct TestMember {
    pub name: String,
    /// "http", or "https" for a member serving TLS on both ports.
    pub scheme: &'static str,
    /// The client, peer and metrics ports, held for the test's life.
    pub reserved: [sockets::ReservedPort; 3],
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub process: Option<Process>,
}

impl TestMember {
    pub fn client_port(&self) -> u16 {
        self.reserved[0].port()
    }

    pub fn peer_port(&self) -> u16 {
        self.reserved[1].port()
    }

    pub fn metrics_port(&self) -> u16 {
        self.reserved[2].port()
    }

    pub fn client_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port())
    }

    pub fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.peer_port())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[derive(Debug)]
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<TestMember>,
    pub extra_args: Vec<String>,
    pub token: String,
    /// How the test dials https:// members.
    pub client_tls: Option<std::sync::Arc<flotilla_tls::ClientConfig>>,
}

impl TestCluster {
    /// Starts `size` members with extra `serve` flags.
    pub fn start(size: usize, extra_args: &[&str]) -> TestCluster {
        let mut cluster = TestCluster::reserve(size, extra_args);
        let initial = cluster.initial_cluster();
        for i in 0..size {
            cluster.spawn(i, &initial, "new");
        }
        cluster
    }

    /// Reserves ports and directories for `size` members without starting them.
    pub fn reserve(size: usize, extra_args: &[&str]) -> TestCluster {
        let mut cluster = TestCluster {
            dir: tempfile::tempdir().expect("a temporary directory"),
            members: Vec::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            token: "test-cluster".into(),
            client_tls: None,
        };
        for _ in 0..size {
            cluster.add_member_slot();
        }
        cluster
    }

    /// Reserves ports and a directory for one more member; returns its index.
    pub fn add_member_slot(&mut self) -> usize {
        let reserved = [(); 3].map(|()| sockets::ReservedPort::new());
        let index = self.members.len();
        let name = format!("m{}", index + 1);
        self.members.push(TestMember {
            scheme: "http",
            data_dir: self.dir.path().join(&name),
            log: self.dir.path().join(format!("{name}.log")),
            name,
            reserved,
            process: None,
        });
        index
    }

    pub fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The command line of member `i`.
    pub fn command(&self, i: usize, initial_cluster: &str, state: &str) -> Command {
        self.command_in(i, initial_cluster, state, &self.members[i].data_dir)
    }

    /// The command line of member `i` with another data directory, handed new listening
    /// sockets on the member's ports.
    pub fn command_in(
        &self,
        i: usize,
        initial_cluster: &str,
        state: &str,
        data_dir: &std::path::Path,
    ) -> Command {
        let mut command = self.command_binding_itself(i, initial_cluster, state, data_dir);
        let listeners = self.members[i].reserved.iter().map(|port| port.listener());
        sockets::hand_over(&mut command, listeners.collect());
        command
    }

    /// The command line of member `i`, binding its ports itself (they are reserved, so it
    /// fails to).
    pub fn command_binding_itself(
        &self,
        i: usize,
        initial_cluster: &str,
        state: &str,
        data_dir: &std::path::Path,
    ) -> Command {
        let m = &self.members[i];
        let mut command = Command::new(BINARY);
        command
            .arg("serve")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", m.metrics_port()),
            ])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_MS.to_string()])
            .args(["--log-level", "info"])
            .args(&self.extra_args)
            .stdin(Stdio::null());
        command
    }

    pub fn spawn(&mut self, i: usize, initial_cluster: &str, state: &str) {
        let mut command = self.command(i, initial_cluster, state);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.members[i].log)
            .expect("open the member log");
        command.stdout(log.try_clone().unwrap()).stderr(log);
        let child = command.spawn().expect("start flotilla serve");
        self.members[i].process = Some(Process { child });
    }

    /// Restarts a stopped member with the same flags (the data directory decides).
    pub fn restart(&mut self, i: usize) {
        let initial = self.initial_cluster();
        self.spawn(i, &initial, "new");
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(process) = self.members[i].process.take() {
            drop(process); // SIGKILL and reap
        }
    }

    pub fn signal(&self, i: usize, signal: Signal) {
        self.members[i]
            .process
            .as_ref()
            .expect("member is running")
            .signal(signal);
    }

    /// The process id of running member `i`.
    pub fn pid(&self, i: usize) -> i32 {
        self.members[i]
            .process
            .as_ref()
            .expect("member is running")
            .pid()
            .as_raw_nonzero()
            .get()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].process.is_some())
            .collect()
    }

    pub async fn channel(&self, i: usize) -> Channel {
        let endpoint = Endpoint::from_shared(self.members[i].client_url())
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10));
        flotilla_tls::channel(endpoint, self.client_tls.as_ref()).unwrap()
    }

    pub async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i).await)
    }

    pub async fn cluster_client(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(i).await)
    }

    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        let mut client = MaintenanceClient::new(self.channel(i).await);
        let call = client.status(StatusRequest {});
        match tokio::time::timeout(Duration::from_millis(500), call).await {
            Ok(Ok(response)) => Some(response.into_inner()),
            _ => None,
        }
    }

    /// The index of the member every running member agrees is the leader.
    pub async fn wait_for_leader(&self, among: &[usize]) -> usize {
        let what = format!("members {among:?} to agree on a leader");
        eventually(&what, Duration::from_secs(15), || async {
            let mut leader = None;
            for &i in among {
                let status = self.status(i).await?;
                if status.leader == 0 || leader.is_some_and(|l| l != status.leader) {
                    return None;
                }
                leader = Some(status.leader);
            }
            let leader = leader?;
            for &i in among {
                if self.status(i).await?.header?.member_id == leader {
                    return Some(i);
                }
            }
            None
        })
        .await
    }

    /// Waits until member `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64) {
        let what = format!("member {i} to apply index {index}");
        eventually(&what, Duration::from_secs(20), || async {
            let status = self.status(i).await?;
            (status.raft_applied_index >= index).then_some(())
        })
        .await;
    }

    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let url = format!(
            "http://127.0.0.1:{}/metrics",
            self.members[i].metrics_port()
        );
        let text = http_get(&url).await?;
        text.lines()
            .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }
}

/// A minimal HTTP/1.0 GET over a TCP stream (tests only need the body).
pub async fn http_get(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

pub async fn put(
    client: &mut KvClient<Channel>,
    key: &str,
    value: &str,
) -> Result<i64, tonic::Status> {
    let response = client
        .put(PutRequest {
            key: key.to_string().into(),
            value: value.to_string().into(),
            ..Default::default()
        })
        .await?;
    Ok(response.into_inner().header.map_or(0, |h| h.revision))
}

pub async fn get(
    client: &mut KvClient<Channel>,
    key: &str,
    serializable: bool,
) -> Result<Option<String>, tonic::Status> {
    let response = client
        .range(RangeRequest {
            key: key.to_string().into(),
            serializable,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response
        .kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

impl Drop for TestCluster {
    /// A failing test shows the members' logs; the processes are then killed by `Process`.
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs(self);
        }
    }
}

/// Prints the members' logs (for a failing test).
pub fn dump_logs(cluster: &TestCluster) {
    for m in &cluster.members {
        let text = m.log_text();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("----- {} (last 40 lines) -----", m.name);
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}

/// The socket a server process accepted for the connection whose client end is `client_end`:
/// found among the process's file descriptors by its peer address and duplicated into this
/// process (pidfd_getfd; the test is the server's parent, so it may), so its options can be
/// read. `None` while the server has not accepted it yet.
pub fn accepted_socket(
    server: Pid,
    client_end: std::net::SocketAddr,
) -> Option<std::net::TcpStream> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let pidfd = pidfd_open(server, PidfdFlags::empty()).expect("pidfd_open on a child");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.as_raw_nonzero())).ok()?;
    for entry in fds.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // The descriptor may have been closed since the directory was read.
        let Ok(owned) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let stream = std::net::TcpStream::from(owned);
        if stream.peer_addr().is_ok_and(|peer| peer == client_end) {
            return Some(stream);
        }
    }
    None
}

/// One event as the tests check it: a put or a delete of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyEvent {
    Put(String),
    Delete(String),
}

/// Watches the keys under `prefix` from `start_revision` on (etcd's Watch API) until `done`
/// holds for the events seen so far, and returns them in order.
pub async fn watch_prefix_until(
    channel: &Channel,
    prefix: &str,
    start_revision: i64,
    done: impl Fn(&[KeyEvent]) -> bool,
) -> Vec<KeyEvent> {
    use flotilla_proto::etcdserverpb::watch_client::WatchClient;
    use flotilla_proto::etcdserverpb::watch_request::RequestUnion;
    use flotilla_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
    use flotilla_proto::mvccpb::event::EventType;

    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: prefix.to_string().into(),
            range_end: flotilla_proto::prefix_range_end(prefix.as_bytes()),
            start_revision,
            ..Default::default()
        })),
    };
    // The request side stays open while the events are read: a closed side ends the watch.
    let (requests, outbound) = tokio::sync::mpsc::channel(1);
    requests.send(create).await.unwrap();
    let mut responses = WatchClient::new(channel.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while !done(&seen) {
        let response = responses
            .message()
            .await
            .unwrap()
            .expect("the watch stream ended");
        for event in response.events {
            let key = String::from_utf8_lossy(&event.kv.unwrap().key).into_owned();
            seen.push(if event.r#type == EventType::Delete as i32 {
                KeyEvent::Delete(key)
            } else {
                KeyEvent::Put(key)
            });
        }
    }
    drop(requests);
    seen
}

/// A lease of 60 s, granted through `channel`.
pub async fn grant(channel: &Channel) -> i64 {
    use flotilla_proto::etcdserverpb::LeaseGrantRequest;
    use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
    LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// Ends a lease now: the same as its expiry, without waiting for it.
pub async fn revoke(channel: &Channel, id: i64) {
    use flotilla_proto::etcdserverpb::LeaseRevokeRequest;
    use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
    LeaseClient::new(channel.clone())
        .lease_revoke(LeaseRevokeRequest { id })
        .await
        .unwrap();
}

/// The create revision of `key`, if it exists.
pub async fn created(channel: &Channel, key: &[u8]) -> Option<i64> {
    let response = KvClient::new(channel.clone())
        .range(RangeRequest {
            key: bytes::Bytes::copy_from_slice(key),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    response.kvs.first().map(|kv| kv.create_revision)
}
