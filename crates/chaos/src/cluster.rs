//! The cluster under test: real member processes (flotilla or etcd, same flags), each on
//! its own address with its own data directory and log file, every one stopped by PID.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use flotilla_client::{Client, ClientConfig, RetryPolicy, SessionPolicy};
use flotilla_proto::etcdserverpb::{RangeRequest, StatusResponse};
use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};

use crate::network::{Network, NetworkError};

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
const METRICS_PORT: u16 = 2381;
/// etcd's defaults; elections take about a second.
const HEARTBEAT_INTERVAL_MS: u32 = 100;
const ELECTION_TIMEOUT_MS: u32 = 1000;
/// How long a member may take to exit after SIGTERM before it is killed.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often health is polled while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Which server the harness drives. Both take etcd's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SystemKind {
    Flotilla,
    Etcd,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub kind: SystemKind,
    pub binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Client(#[from] flotilla_client::ClientError),
    #[error("{0}")]
    NotReady(String),
}

/// Where a member is in its life, as the nemesis left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    Running,
    /// SIGSTOPped.
    Paused,
    /// Killed or stopped; restarts from its data directory.
    Down,
    /// Removed from the cluster; comes back with a new data directory through member add.
    Removed,
}

#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    metrics_url: String,
    /// Bumped at each re-add, which starts from an empty data directory.
    data_generation: u32,
    /// `--initial-cluster` and `--initial-cluster-state` of the data directory's first start.
    initial_cluster: String,
    initial_state: &'static str,
    pub state: MemberState,
    /// The id it had when it was last removed: until the cluster has applied the removal,
    /// the member list still shows that member under its peer URL.
    pub removed_id: Option<u64>,
    process: Option<Child>,
    /// Exits no fault asked for: a member that crashed by itself.
    pub unexpected_exits: Vec<String>,
    pub starts: u32,
}

impl Member {
    pub fn endpoint(&self) -> String {
        self.client_url.trim_start_matches("http://").to_string()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Child::id)
    }
}

/// The running cluster. Dropping it SIGKILLs every member (tokio's kill-on-drop) and then
/// removes the network.
#[derive(Debug)]
pub struct Cluster {
    pub members: Vec<Member>,
    target: Target,
    logs_dir: PathBuf,
    data_dir: PathBuf,
    token: String,
    /// One client per member, talking to that member only, for health and status.
    member_clients: Vec<Client>,
    /// Declared last: dropped after the members are killed.
    pub network: Network,
}

/// A client for one endpoint that answers quickly or not at all.
async fn probe_client(endpoints: Vec<String>) -> Result<Client, ClusterError> {
    let config = ClientConfig::new(endpoints)
        .with_dial_timeout(Duration::from_millis(500))
        .with_sessions(SessionPolicy::Plain)
        .with_retry(RetryPolicy {
            attempts_max: 1,
            call_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(50),
        });
    Ok(Client::connect(config).await?)
}

/// Waits up to `timeout` for the process to exit, then SIGKILLs it; reaps it either way.
/// True if it exited by itself.
async fn exit_within_or_kill(mut child: Child, timeout: Duration) -> bool {
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return false;
    }
    true
}

impl Cluster {
    /// Starts every member and waits until the cluster is healthy.
    pub async fn start(
        target: Target,
        network: Network,
        size: usize,
        out_dir: &Path,
        ready_timeout: Duration,
    ) -> Result<Cluster, ClusterError> {
        let logs_dir = out_dir.join("logs");
        let data_dir = out_dir.join("data");
        for directory in [&logs_dir, &data_dir] {
            std::fs::create_dir_all(directory)
                .map_err(|error| ClusterError::Io(directory.display().to_string(), error))?;
        }
        let mut members: Vec<Member> = (0..size)
            .map(|index| {
                let address = network.address(index);
                Member {
                    name: format!("m{index}"),
                    client_url: format!("http://{address}:{CLIENT_PORT}"),
                    peer_url: format!("http://{address}:{PEER_PORT}"),
                    metrics_url: format!("http://{address}:{METRICS_PORT}"),
                    data_generation: 0,
                    initial_cluster: String::new(),
                    initial_state: "new",
                    state: MemberState::Down,
                    removed_id: None,
                    process: None,
                    unexpected_exits: Vec::new(),
                    starts: 0,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}={}", member.name, member.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        for member in &mut members {
            member.initial_cluster = initial_cluster.clone();
        }
        let mut member_clients = Vec::new();
        for member in &members {
            member_clients.push(probe_client(vec![member.endpoint()]).await?);
        }
        let mut cluster = Cluster {
            members,
            target,
            logs_dir,
            data_dir,
            token: format!("flotilla-chaos-{}", std::process::id()),
            member_clients,
            network,
        };
        for index in 0..size {
            cluster.spawn(index)?;
        }
        cluster.wait_healthy(ready_timeout).await?;
        Ok(cluster)
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    pub fn log_path(&self, index: usize) -> PathBuf {
        self.logs_dir
            .join(format!("{}.log", self.members[index].name))
    }

    fn member_data_dir(&self, index: usize) -> PathBuf {
        let member = &self.members[index];
        self.data_dir
            .join(format!("{}.{}", member.name, member.data_generation))
    }

    /// Starts member `index` from its data directory, its output appended to its log.
    fn spawn(&mut self, index: usize) -> Result<(), ClusterError> {
        let data_dir = self.member_data_dir(index);
        let log_path = self.log_path(index);
        let prefix = self.network.command_prefix(index);
        let member = &self.members[index];
        let mut words: Vec<String> = prefix;
        words.push(self.target.binary.display().to_string());
        if self.target.kind == SystemKind::Flotilla {
            words.push("serve".into());
        }
        words.extend(
            [
                ("--name", member.name.clone()),
                ("--data-dir", data_dir.display().to_string()),
                ("--listen-client-urls", member.client_url.clone()),
                ("--advertise-client-urls", member.client_url.clone()),
                ("--listen-peer-urls", member.peer_url.clone()),
                ("--initial-advertise-peer-urls", member.peer_url.clone()),
                ("--initial-cluster", member.initial_cluster.clone()),
                ("--initial-cluster-state", member.initial_state.to_string()),
                ("--initial-cluster-token", self.token.clone()),
                ("--listen-metrics-urls", member.metrics_url.clone()),
                ("--heartbeat-interval", HEARTBEAT_INTERVAL_MS.to_string()),
                ("--election-timeout", ELECTION_TIMEOUT_MS.to_string()),
            ]
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_string(), value]),
        );
        if self.target.kind == SystemKind::Etcd {
            words.extend(["--logger", "zap", "--log-outputs", "stderr"].map(String::from));
        }
        let (program, arguments) = (words[0].clone(), words[1..].to_vec());
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| ClusterError::Io(log_path.display().to_string(), error))?;
        {
            use std::io::Write;
            let _ = writeln!(
                log,
                "=== flotilla chaos: start {} of {}: {program} {}",
                member.starts + 1,
                member.name,
                arguments.join(" ")
            );
        }
        let stderr = log
            .try_clone()
            .map_err(|error| ClusterError::Io(log_path.display().to_string(), error))?;
        let child = Command::new(&program)
            .args(&arguments)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            // Its own process group: a Ctrl-C at the terminal reaches the harness only, which
            // then stops the members itself.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| ClusterError::Io(format!("starting {program}"), error))?;
        let member = &mut self.members[index];
        member.process = Some(child);
        member.state = MemberState::Running;
        member.starts += 1;
        Ok(())
    }

    fn signal(&self, index: usize, signal: Signal) {
        if let Some(pid) = self.members[index]
            .pid()
            .and_then(|pid| Pid::from_raw(pid as i32))
        {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// SIGKILL by PID, and reap.
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].process.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.members[index].state = MemberState::Down;
    }

    /// SIGTERM (after SIGCONT, in case it was paused), then SIGKILL if it has not exited in
    /// time.
    pub async fn terminate(&mut self, index: usize) {
        self.signal(index, Signal::CONT);
        self.signal(index, Signal::TERM);
        if let Some(child) = self.members[index].process.take() {
            exit_within_or_kill(child, GRACEFUL_STOP_TIMEOUT).await;
        }
        self.members[index].state = MemberState::Down;
    }

    /// Waits for a member to exit by itself (a removed member stops), then kills it if it
    /// has not. True if it exited by itself (or was not running).
    pub async fn await_exit_or_kill(&mut self, index: usize, timeout: Duration) -> bool {
        match self.members[index].process.take() {
            Some(child) => exit_within_or_kill(child, timeout).await,
            None => true,
        }
    }

    pub fn pause(&mut self, index: usize) {
        self.signal(index, Signal::STOP);
        self.members[index].state = MemberState::Paused;
    }

    pub fn resume(&mut self, index: usize) {
        self.signal(index, Signal::CONT);
        self.members[index].state = MemberState::Running;
    }

    /// Starts a member that is down, from its data directory.
    pub fn restart(&mut self, index: usize) -> Result<(), ClusterError> {
        self.spawn(index)
    }

    /// Marks a member removed and deletes its data directory (it comes back as a new member).
    pub fn forget_removed(&mut self, index: usize, id: u64) {
        let data_dir = self.member_data_dir(index);
        let _ = std::fs::remove_dir_all(data_dir);
        let member = &mut self.members[index];
        member.state = MemberState::Removed;
        member.removed_id = Some(id);
        member.data_generation += 1;
    }

    /// Starts a removed member anew, after member add: `--initial-cluster-state existing`
    /// with the cluster's current members.
    pub fn start_readded(&mut self, index: usize) -> Result<(), ClusterError> {
        let initial_cluster = self
            .members
            .iter()
            .enumerate()
            .filter(|(other, member)| *other == index || member.state != MemberState::Removed)
            .map(|(_, member)| format!("{}={}", member.name, member.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let member = &mut self.members[index];
        member.initial_cluster = initial_cluster;
        member.initial_state = "existing";
        self.spawn(index)
    }

    /// Notes members that exited although no fault stopped them (crashes).
    pub fn collect_unexpected_exits(&mut self) {
        for member in &mut self.members {
            let Some(process) = member.process.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = process.try_wait() {
                member
                    .unexpected_exits
                    .push(format!("{} exited by itself: {status}", member.name));
                member.process = None;
                member.state = MemberState::Down;
            }
        }
    }

    /// A client for every member's endpoint, with the harness's default retries.
    pub async fn client(&self) -> Result<Client, ClusterError> {
        let config = ClientConfig::new(self.endpoints())
            .with_dial_timeout(Duration::from_secs(1))
            .with_sessions(SessionPolicy::Plain);
        Ok(Client::connect(config).await?)
    }

    /// A client for the members other than `excluded`.
    pub async fn client_excluding(&self, excluded: usize) -> Result<Client, ClusterError> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != excluded)
            .map(|(_, member)| member.endpoint())
            .collect();
        let config = ClientConfig::new(endpoints)
            .with_dial_timeout(Duration::from_secs(1))
            .with_sessions(SessionPolicy::Plain);
        Ok(Client::connect(config).await?)
    }

    pub async fn status(&self, index: usize) -> Result<StatusResponse, ClusterError> {
        Ok(self.member_clients[index].status().await?)
    }

    /// The member's id, from its own Status answer.
    pub async fn member_id(&self, index: usize) -> Option<u64> {
        let status = self.status(index).await.ok()?;
        status.header.map(|header| header.member_id)
    }

    /// Indices of members that should be serving (not down, paused or removed).
    pub fn running(&self) -> Vec<usize> {
        (0..self.size())
            .filter(|&index| self.members[index].state == MemberState::Running)
            .collect()
    }

    /// The index of the leader, if the running members agree on one.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader_id = None;
        let mut ids = Vec::new();
        for index in self.running() {
            let status = self.status(index).await.ok()?;
            let id = status.header.as_ref().map(|header| header.member_id)?;
            ids.push((index, id));
            match leader_id {
                None if status.leader != 0 => leader_id = Some(status.leader),
                Some(leader) if leader != status.leader => return None,
                _ => {}
            }
        }
        let leader_id = leader_id?;
        ids.into_iter()
            .find(|&(_, id)| id == leader_id)
            .map(|(index, _)| index)
    }

    /// Polls until member `index` answers Status.
    pub async fn wait_serving(&self, index: usize, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.status(index).await {
                Ok(_) => return Ok(()),
                Err(error) if Instant::now() >= deadline => {
                    return Err(ClusterError::NotReady(format!(
                        "{} did not answer within {timeout:?}: {error}",
                        self.members[index].name
                    )));
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Polls until every member that should be running agrees on a leader among them and
    /// serves a linearizable read. Returns the leader's index.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<usize, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let problem = match self.health_problem().await {
                Ok(leader) => return Ok(leader),
                Err(problem) => problem,
            };
            if Instant::now() >= deadline {
                return Err(ClusterError::NotReady(format!(
                    "the cluster was not healthy within {timeout:?}: {problem}"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn health_problem(&self) -> Result<usize, String> {
        let running = self.running();
        if running.is_empty() {
            return Err("no member is running".into());
        }
        let leader = self
            .leader()
            .await
            .ok_or_else(|| "the members do not agree on a leader among them".to_string())?;
        for &index in &running {
            let read = RangeRequest {
                key: "flotilla-chaos-health".into(),
                ..Default::default()
            };
            if let Err(error) = self.member_clients[index].range(read).await {
                return Err(format!(
                    "{}: linearizable read failed: {error}",
                    self.members[index].name
                ));
            }
        }
        Ok(leader)
    }

    /// Stops every member (SIGTERM, then SIGKILL after a grace period) and removes the
    /// network.
    pub async fn shut_down(mut self) -> Vec<String> {
        for index in 0..self.size() {
            self.terminate(index).await;
        }
        self.network
            .tear_down()
            .into_iter()
            .map(|error| error.to_string())
            .collect()
    }

    /// Where the members' data directories are.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}
