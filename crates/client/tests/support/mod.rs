//! Real etcd clusters on loopback for integration tests: reserved ports (see `ports`), a
//! temporary data directory, readiness awaited by polling Status, every process killed by PID
//! on drop.

mod ports;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flotilla_client::{Client, ClientConfig};

/// How long a cluster may take to elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails the test, saying what is missing, unless the `etcd` binary can be run (these tests
/// are ignored unless asked for, so asking without etcd is a mistake to report, not to skip).
pub fn require_etcd() {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "this test needs the `etcd` binary (apt-get install etcd-server)"
    );
}

pub fn etcdctl_available() -> bool {
    Command::new("etcdctl")
        .arg("version")
        .env("ETCDCTL_API", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    process: Option<Child>,
}

impl Member {
    /// `host:port`, as endpoints are usually written.
    pub fn endpoint(&self) -> String {
        self.client_url.trim_start_matches("http://").to_string()
    }

    /// SIGKILL by PID, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// A running etcd cluster; dropping it kills every member and removes the data.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    directory: PathBuf,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill();
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn temporary_directory() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let directory = std::env::temp_dir().join(format!(
        "flotilla-client-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&directory).unwrap();
    directory
}

impl EtcdCluster {
    /// Starts `size` members and waits until they agree on a leader.
    pub async fn start(size: usize) -> EtcdCluster {
        let directory = temporary_directory();
        let ports = ports::reserve_ports(2 * size);
        let mut members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_url: format!("http://127.0.0.1:{}", ports[2 * index]),
                peer_url: format!("http://127.0.0.1:{}", ports[2 * index + 1]),
                process: None,
            })
            .collect();
        let initial_cluster: Vec<String> = members
            .iter()
            .map(|member| format!("{}={}", member.name, member.peer_url))
            .collect();
        let initial_cluster = initial_cluster.join(",");
        for member in &mut members {
            let log =
                std::fs::File::create(directory.join(format!("{}.log", member.name))).unwrap();
            let process = Command::new("etcd")
                .args(["--name", &member.name])
                .arg("--data-dir")
                .arg(directory.join(&member.name))
                .args(["--listen-client-urls", &member.client_url])
                .args(["--advertise-client-urls", &member.client_url])
                .args(["--listen-peer-urls", &member.peer_url])
                .args(["--initial-advertise-peer-urls", &member.peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-token", "flotilla-client-test"])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd starts");
            member.process = Some(process);
        }
        let cluster = EtcdCluster { members, directory };
        cluster.await_leader().await;
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    pub async fn client(&self) -> Client {
        Client::connect(ClientConfig::new(self.endpoints()))
            .await
            .unwrap()
    }

    /// Polls Status until every live member reports the same, non-zero leader.
    pub async fn await_leader(&self) -> u64 {
        let client = self.client().await;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let live: Vec<String> = self
                .members
                .iter()
                .filter(|member| member.process.is_some())
                .map(Member::endpoint)
                .collect();
            let leaders: Vec<u64> = client
                .endpoint_statuses()
                .await
                .into_iter()
                .filter(|status| live.contains(&status.endpoint))
                .filter_map(|status| status.status.ok().map(|status| status.leader))
                .collect();
            if leaders.len() == live.len()
                && leaders[0] != 0
                && leaders.iter().all(|leader| *leader == leaders[0])
            {
                return leaders[0];
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd cluster did not elect a leader"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The member with this id (by its Status answer).
    pub async fn index_of(&self, member_id: u64) -> usize {
        let statuses = self.client().await.endpoint_statuses().await;
        statuses
            .iter()
            .position(|status| {
                status.status.as_ref().is_ok_and(|status| {
                    status
                        .header
                        .as_ref()
                        .is_some_and(|header| header.member_id == member_id)
                })
            })
            .expect("a member with that id")
    }
}
