//! `flotilla dev`: a local cluster in one command.
//!
//! Starts N members as child processes of this binary (`flotilla serve`) on 127.0.0.1, with
//! etcd's local-cluster ports (clients 2379, 22379, 32379, ...; peers 2380, 22380, 32380, ...;
//! metrics 2381, 22381, 32381, ...), each logging to `<data-dir>/<name>.log`, and shows a
//! status table every second. Ctrl-C (or SIGTERM) stops every member gracefully, by PID. The
//! data stays for the next run unless `--fresh`.
//!
//! With `--tls` every port speaks TLS with client certificate authentication: a throwaway CA
//! and certificates are made in `<data-dir>/tls` (kept for later runs), and the etcdctl flags
//! to use them are printed.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use flotilla_proto::etcdserverpb::StatusRequest;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of members (1 to 6).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Where the members keep their data and logs.
    #[arg(long, default_value = "flotilla-dev")]
    data_dir: PathBuf,
    /// Delete the data of earlier runs first.
    #[arg(long)]
    fresh: bool,
    /// Extra flags passed to every `flotilla serve`, e.g. `--serve-arg=--snapshot-count=1000`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// TLS on every port, clients and peers authenticated by certificates from a throwaway
    /// CA made in `<data-dir>/tls`.
    #[arg(long)]
    tls: bool,
    /// Where the cluster view (a web page of the live cluster, with controls) listens; an
    /// address other than loopback lets anyone who reaches it kill members.
    #[arg(long, default_value = "127.0.0.1:2378")]
    ui_addr: std::net::SocketAddr,
    /// No cluster view.
    #[arg(long)]
    no_ui: bool,
    /// Heartbeats every 500 ms and elections after 5 to 10 s (instead of 100 ms and 1 to
    /// 2 s), so that a person can follow an election in the cluster view.
    #[arg(long)]
    slow_motion: bool,
}

/// `--slow-motion`'s timing, passed to every member.
const SLOW_MOTION_FLAGS: [&str; 2] = ["--heartbeat-interval=500", "--election-timeout=5000"];

/// The throwaway PKI of `--tls`, in `<data-dir>/tls`.
struct DevTls {
    dir: PathBuf,
}

impl DevTls {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn member(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("member.pem"), self.dir.join("member-key.pem"))
    }
    fn client(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("client.pem"), self.dir.join("client-key.pem"))
    }

    /// Makes the CA, one certificate for the members (127.0.0.1 and localhost, server and
    /// client use) and one for clients, unless an earlier run made them.
    fn make_or_reuse(data_dir: &Path) -> anyhow::Result<DevTls> {
        use flotilla_tls::generate::CertificateAuthority;
        let tls = DevTls {
            dir: data_dir.join("tls"),
        };
        if tls.ca().exists() {
            return Ok(tls);
        }
        let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let ca = CertificateAuthority::new("flotilla dev CA")?;
        ca.issue("flotilla dev member", &hosts)?
            .write(&tls.dir, "member")?;
        ca.issue("root", &hosts)?.write(&tls.dir, "client")?;
        std::fs::write(tls.ca(), &ca.pem.cert)?;
        Ok(tls)
    }

    fn serve_flags(&self) -> Vec<String> {
        let (cert, key) = self.member();
        let ca = self.ca();
        let path = |p: &Path| p.display().to_string();
        [
            ("--cert-file", path(&cert)),
            ("--key-file", path(&key)),
            ("--trusted-ca-file", path(&ca)),
            ("--client-cert-auth", "true".into()),
            ("--peer-cert-file", path(&cert)),
            ("--peer-key-file", path(&key)),
            ("--peer-trusted-ca-file", path(&ca)),
            ("--peer-client-cert-auth", "true".into()),
        ]
        .into_iter()
        .map(|(flag, value)| format!("{flag}={value}"))
        .collect()
    }

    /// The flags etcdctl (and `flotilla`) need.
    fn client_flags(&self) -> String {
        let (cert, key) = self.client();
        format!(
            "--cacert={} --cert={} --key={}",
            self.ca().display(),
            cert.display(),
            key.display()
        )
    }

    fn client_tls(&self) -> flotilla_tls::ClientTls {
        let (cert, key) = self.client();
        flotilla_tls::ClientTls {
            trusted_ca: Some(self.ca()),
            cert: Some(cert),
            key: Some(key),
            insecure_skip_verify: false,
        }
    }
}

const MEMBERS_MAX: usize = 6;
const STOP_GRACE: Duration = Duration::from_secs(20);

struct Member {
    name: String,
    log: PathBuf,
    client_url: String,
    peer_url: String,
    metrics_url: String,
    child: Option<Child>,
    /// Why the process is gone when it exited on its own.
    exited: Option<String>,
    /// Killed from the cluster view (and not restarted since).
    killed: bool,
    /// Stopped with SIGSTOP from the cluster view.
    paused: bool,
    /// Removed from the cluster from the cluster view (it stops itself).
    removed: bool,
    /// `--initial-cluster` and `--initial-cluster-state` it was created with (a member added
    /// later joins an existing cluster).
    initial_cluster: String,
    cluster_state: &'static str,
}

/// The running cluster, shared by the status table and the cluster view's controls.
pub(crate) struct Cluster {
    args: DevArgs,
    tls: Option<DevTls>,
    client_tls: Option<std::sync::Arc<flotilla_tls::ClientConfig>>,
    scheme: &'static str,
    members: std::sync::Mutex<Vec<Member>>,
    /// Set once `dev` is stopping: no member is started again.
    stopping: std::sync::atomic::AtomicBool,
    /// The members cut off from all the others (from the cluster view).
    cut_off: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Cluster {
    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn member_names(&self) -> Vec<String> {
        self.members().iter().map(|m| m.name.clone()).collect()
    }

    pub(crate) fn slow_motion(&self) -> bool {
        self.args.slow_motion
    }

    /// The member's metrics listener as host:port.
    pub(crate) fn metrics_addr(&self, name: &str) -> Option<String> {
        let members = self.members();
        let member = members.iter().find(|m| m.name == name)?;
        Some(member.metrics_url.trim_start_matches("http://").to_string())
    }

    /// `running`, `paused`, `killed` or `exited`.
    pub(crate) fn process_state(&self, name: &str) -> Option<&'static str> {
        let members = self.members();
        let member = members.iter().find(|m| m.name == name)?;
        Some(match (&member.child, member.paused, member.killed) {
            _ if member.removed => "removed",
            (Some(_), true, _) => "paused",
            (Some(_), false, _) => "running",
            (None, _, true) => "killed",
            (None, _, false) => "exited",
        })
    }

    /// Makes the next member (`node<N+1>`, on the next ports of the convention) and starts it
    /// to join the cluster, once `add` (the MemberAdd call) has accepted its peer URL.
    pub(crate) async fn add_member<F, Fut>(&self, add: F) -> Result<String, String>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("the cluster is stopping".into());
        }
        let (mut member, joined) = {
            let members = self.members();
            let index = members.len();
            if index >= MEMBERS_MAX {
                return Err(format!(
                    "at most {MEMBERS_MAX} members (the port convention ends there)"
                ));
            }
            let member = new_member(&self.args.data_dir, self.scheme, index, "existing");
            let _ = std::fs::remove_dir_all(self.args.data_dir.join(&member.name));
            let mut joined: Vec<String> = members
                .iter()
                .filter(|m| !m.removed)
                .map(|m| format!("{}={}", m.name, m.peer_url))
                .collect();
            joined.push(format!("{}={}", member.name, member.peer_url));
            (member, joined.join(","))
        };
        add(member.peer_url.clone()).await?;
        member.initial_cluster = joined;
        let child =
            spawn_member(&member, &self.args, self.tls.as_ref()).map_err(|e| format!("{e:#}"))?;
        member.child = Some(child);
        let name = member.name.clone();
        self.members().push(member);
        Ok(name)
    }

    /// Marks a member removed (the MemberRemove call was accepted): it stops by itself.
    pub(crate) fn mark_removed(&self, name: &str) {
        if let Some(member) = self.members().iter_mut().find(|m| m.name == name) {
            member.removed = true;
        }
    }

    /// The members cut off from the others now.
    pub(crate) fn cut_off(&self) -> std::collections::BTreeSet<String> {
        self.cut_off
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Cuts `name` off from every other member (`cut` true) or heals it, and returns what
    /// each member must drop: an isolated member drops everyone else, the others drop the
    /// isolated ones.
    pub(crate) fn set_cut_off(
        &self,
        name: &str,
        cut: bool,
    ) -> Result<Vec<(String, std::collections::BTreeSet<String>)>, String> {
        let names = self.member_names();
        if !names.iter().any(|n| n == name) {
            return Err(format!("no member {name}"));
        }
        {
            let mut isolated = self.cut_off.lock().unwrap_or_else(|p| p.into_inner());
            if cut {
                isolated.insert(name.to_string());
            } else {
                isolated.remove(name);
            }
        }
        Ok(names
            .into_iter()
            .map(|member| {
                let drops = self.cut_off_plan(&member);
                (member, drops)
            })
            .collect())
    }

    /// What `name` must drop under the current partition (empty: nothing).
    pub(crate) fn cut_off_plan(&self, name: &str) -> std::collections::BTreeSet<String> {
        let isolated = self.cut_off();
        if isolated.contains(name) {
            self.member_names()
                .into_iter()
                .filter(|n| n != name)
                .collect()
        } else {
            isolated
        }
    }

    pub(crate) fn running_members(&self) -> Vec<String> {
        self.members()
            .iter()
            .filter(|m| m.child.is_some() && !m.paused)
            .map(|m| m.name.clone())
            .collect()
    }

    /// A gRPC channel to the member's client port (connected lazily).
    pub(crate) fn channel(&self, name: &str) -> Option<tonic::transport::Channel> {
        let url = {
            let members = self.members();
            let member = members
                .iter()
                .find(|m| m.name == name && m.child.is_some())?;
            member.client_url.clone()
        };
        let endpoint = tonic::transport::Endpoint::from_shared(url).ok()?;
        flotilla_tls::channel(endpoint, self.client_tls.as_ref()).ok()
    }

    /// Runs `act` on the member called `name`, under the lock.
    fn with_member<T>(
        &self,
        name: &str,
        act: impl FnOnce(&mut Member) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut members = self.members();
        let member = members
            .iter_mut()
            .find(|m| m.name == name)
            .ok_or_else(|| format!("no member {name}"))?;
        act(member)
    }

    /// Sends `signal` (SIGSTOP or SIGCONT) to a running member.
    pub(crate) fn signal(&self, name: &str, signal: rustix::process::Signal) -> Result<(), String> {
        self.with_member(name, |member| {
            let child = member
                .child
                .as_ref()
                .ok_or_else(|| format!("{name} is not running"))?;
            let pid = rustix::process::Pid::from_raw(child.id() as i32)
                .ok_or_else(|| format!("{name} has no process id"))?;
            rustix::process::kill_process(pid, signal).map_err(|e| format!("{name}: {e}"))?;
            member.paused = signal == rustix::process::Signal::STOP;
            Ok(())
        })
    }

    /// SIGKILL, by PID, and reaps it.
    pub(crate) fn kill(&self, name: &str) -> Result<(), String> {
        self.with_member(name, |member| {
            let mut child = member
                .child
                .take()
                .ok_or_else(|| format!("{name} is not running"))?;
            let _ = child.kill();
            let _ = child.wait();
            member.killed = true;
            member.paused = false;
            Ok(())
        })
    }

    /// Starts a member that was killed or exited again, from its data.
    pub(crate) fn restart(&self, name: &str) -> Result<(), String> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("the cluster is stopping".into());
        }
        self.with_member(name, |member| {
            if member.child.is_some() {
                return Err(format!("{name} is running"));
            }
            if member.removed {
                return Err(format!("{name} was removed from the cluster"));
            }
            let child = spawn_member(member, &self.args, self.tls.as_ref())
                .map_err(|e| format!("{e:#}"))?;
            member.child = Some(child);
            member.exited = None;
            member.killed = false;
            member.paused = false;
            Ok(())
        })
    }
}

/// etcd's convention: 2379, 22379, 32379, ... (and +1 for peers, +2 for metrics).
fn client_port(index: usize) -> u16 {
    if index == 0 {
        2379
    } else {
        ((index + 1) * 10_000 + 2379) as u16
    }
}

pub fn run(args: DevArgs) -> ExitCode {
    if args.nodes == 0 || args.nodes > MEMBERS_MAX {
        eprintln!(
            "flotilla dev: --nodes must be between 1 and {MEMBERS_MAX} (the port pattern \
             2379, 22379, ... ends at {})",
            client_port(MEMBERS_MAX - 1)
        );
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("flotilla dev: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_cluster(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("flotilla dev: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_cluster(args: DevArgs) -> anyhow::Result<()> {
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", args.data_dir.display()))?;
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.data_dir.display()))?;
    let made_with_tls = args.data_dir.join("tls").exists();
    if args.data_dir.join("node1").exists() && made_with_tls != args.tls {
        anyhow::bail!(
            "the cluster in {} was made {} --tls, and its members know each other by those URLs; \
             run with --fresh to start over",
            args.data_dir.display(),
            if made_with_tls { "with" } else { "without" }
        );
    }
    let tls = args
        .tls
        .then(|| DevTls::make_or_reuse(&args.data_dir))
        .transpose()
        .map_err(|e| anyhow::anyhow!("cannot make the TLS certificates: {e:#}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut members: Vec<Member> = (0..args.nodes)
        .map(|i| new_member(&args.data_dir, scheme, i, "new"))
        .collect();
    let initial_cluster = members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url))
        .collect::<Vec<_>>()
        .join(",");
    for member in &mut members {
        member.initial_cluster = initial_cluster.clone();
    }
    for i in 0..members.len() {
        match spawn_member(&members[i], &args, tls.as_ref()) {
            Ok(child) => members[i].child = Some(child),
            Err(err) => {
                stop_all(&mut members).await;
                return Err(err);
            }
        }
    }
    let client_tls = match &tls {
        Some(tls) => Some(tls.client_tls().config()?),
        None => None,
    };
    let cluster = std::sync::Arc::new(Cluster {
        args,
        tls,
        client_tls,
        scheme,
        members: std::sync::Mutex::new(members),
        stopping: Default::default(),
        cut_off: Default::default(),
    });
    let ui = if cluster.args.no_ui {
        None
    } else {
        match crate::dev_ui::serve(cluster.clone(), cluster.args.ui_addr).await {
            Ok(addr) => Some(addr),
            Err(err) => {
                let mut members = std::mem::take(&mut *cluster.members());
                stop_all(&mut members).await;
                return Err(err);
            }
        }
    };
    print_endpoints(&cluster, ui);
    let result = show_status_until_stopped(&cluster).await;
    cluster
        .stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut members = std::mem::take(&mut *cluster.members());
    println!("\nstopping {} members...", members.len());
    stop_all(&mut members).await;
    println!("stopped; data kept in {}", cluster.args.data_dir.display());
    result
}

/// Member `index` (from 0) of the port convention, not started; its `initial_cluster` is
/// set once the whole list is known.
fn new_member(data_dir: &Path, scheme: &str, index: usize, cluster_state: &'static str) -> Member {
    let port = client_port(index);
    Member {
        name: format!("node{}", index + 1),
        log: data_dir.join(format!("node{}.log", index + 1)),
        client_url: format!("{scheme}://127.0.0.1:{port}"),
        peer_url: format!("{scheme}://127.0.0.1:{}", port + 1),
        metrics_url: format!("http://127.0.0.1:{}", port + 2),
        child: None,
        exited: None,
        killed: false,
        paused: false,
        removed: false,
        initial_cluster: String::new(),
        cluster_state,
    }
}

fn spawn_member(member: &Member, args: &DevArgs, tls: Option<&DevTls>) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let log_path = &member.log;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", log_path.display()))?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("serve")
        .args(["--name", &member.name])
        .arg("--data-dir")
        .arg(args.data_dir.join(&member.name))
        .args(["--listen-client-urls", &member.client_url])
        .args(["--advertise-client-urls", &member.client_url])
        .args(["--listen-peer-urls", &member.peer_url])
        .args(["--initial-advertise-peer-urls", &member.peer_url])
        .args(["--listen-metrics-urls", &member.metrics_url])
        .args(["--initial-cluster", &member.initial_cluster])
        .args(["--initial-cluster-state", member.cluster_state])
        .args(["--initial-cluster-token", "flotilla-dev"])
        // The members' Raft state for anyone who wants to watch it (`/debug/raft` on each
        // metrics port): cheap, and this is a cluster for looking at.
        .arg("--experimental-raft-view")
        // And they take partitions from the cluster view (dropped in their transport).
        .arg("--experimental-dev-faults")
        .args(tls.map(DevTls::serve_flags).unwrap_or_default())
        .args(if args.slow_motion {
            &SLOW_MOTION_FLAGS[..]
        } else {
            &[]
        })
        .args(&args.serve_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own process group: Ctrl-C in the terminal reaches only `dev`, which then stops the
    // members one by one (a leader hands over first).
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", member.name))
}

fn print_endpoints(cluster: &Cluster, ui: Option<std::net::SocketAddr>) {
    let (members, data_dir, tls) = (
        &*cluster.members(),
        &cluster.args.data_dir,
        cluster.tls.as_ref(),
    );
    if let Some(ui) = ui {
        println!("flotilla dev: the cluster view is at http://{ui}/");
    }
    println!("flotilla dev: {} members", members.len());
    for m in members {
        println!(
            "  {:<6} clients {}  peers {}  metrics {}/metrics",
            m.name, m.client_url, m.peer_url, m.metrics_url
        );
    }
    let endpoints: Vec<&str> = members
        .iter()
        .map(|m| m.client_url.trim_start_matches("http://"))
        .collect();
    println!("  data and logs in {}", data_dir.display());
    match tls {
        None => println!(
            "  try: etcdctl --endpoints={} put hello world",
            endpoints.join(",")
        ),
        Some(tls) => {
            println!("  TLS everywhere, certificates in {}", tls.dir.display());
            println!(
                "  try: etcdctl --endpoints={} {} put hello world",
                endpoints.join(","),
                tls.client_flags()
            );
        }
    }
    println!("  Ctrl-C stops every member.\n");
}

/// One row of the status table.
struct Row {
    name: String,
    id: u64,
    role: String,
    term: u64,
    commit: u64,
    applied: u64,
    leader: u64,
}

async fn show_status_until_stopped(cluster: &Cluster) -> anyhow::Result<()> {
    let tls = cluster.client_tls.clone();
    let tty = std::io::stdout().is_terminal();
    // Created once: a signal that arrives while the table is being queried is kept for the
    // next `recv`, not lost (a fresh `ctrl_c()` per iteration would miss it).
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last_summary = String::new();
    let mut drawn_lines = 0;
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = ticker.tick() => {}
        }
        // What to query, taken under the lock; the queries run without it.
        let queries: Vec<(String, String, Option<String>)> = {
            let mut members = cluster.members();
            reap_exited(&mut members);
            if members.iter().all(|m| m.exited.is_some()) {
                let first_error = members
                    .iter()
                    .find_map(|m| last_error_line(&m.log))
                    .unwrap_or_else(|| "no error logged".into());
                anyhow::bail!("every member exited (first error: {first_error}); see their logs");
            }
            members
                .iter()
                .map(|m| {
                    let down = match (&m.exited, m.killed, m.paused) {
                        (Some(exited), _, _) => Some(exited.clone()),
                        (None, true, _) => Some("killed from the cluster view".to_string()),
                        (None, false, true) => Some("paused from the cluster view".to_string()),
                        (None, false, false) => None,
                    };
                    (m.name.clone(), m.client_url.clone(), down)
                })
                .collect()
        };
        let mut rows = Vec::new();
        for (name, client_url, down) in &queries {
            rows.push(status_row(name, client_url, down.as_deref(), tls.as_ref()).await);
        }
        let names: Vec<&str> = queries.iter().map(|(name, _, _)| name.as_str()).collect();
        let table = render_table(&names, &rows);
        if tty {
            // Move up over the previous table and redraw it.
            if drawn_lines > 0 {
                print!("\x1b[{drawn_lines}A\x1b[J");
            }
            print!("{table}");
            drawn_lines = table.lines().count();
        } else {
            // Not a terminal: print only when leadership changes.
            let summary: String = rows
                .iter()
                .map(|r| format!("{}:{}:{}", r.name, r.role, r.term))
                .collect();
            if summary != last_summary {
                print!("{table}");
                last_summary = summary;
            }
        }
        let _ = std::io::stdout().flush();
    }
}

/// The last line of a member's log that reports an error.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find(|line| line.contains("error"))
        .map(|line| line.trim().to_string())
}

fn reap_exited(members: &mut [Member]) {
    for m in members.iter_mut() {
        if let Some(child) = &mut m.child
            && let Ok(Some(status)) = child.try_wait()
        {
            m.exited = Some(format!("exited ({status}); see its log"));
            m.child = None;
        }
    }
}

async fn status_row(
    name: &str,
    client_url: &str,
    down: Option<&str>,
    tls: Option<&std::sync::Arc<flotilla_tls::ClientConfig>>,
) -> Row {
    let unknown = |role: &str| Row {
        name: name.to_string(),
        id: 0,
        role: role.to_string(),
        term: 0,
        commit: 0,
        applied: 0,
        leader: 0,
    };
    if let Some(down) = down {
        return unknown(down);
    }
    let query = async {
        let endpoint = tonic::transport::Endpoint::from_shared(client_url.to_string()).ok()?;
        let channel = flotilla_tls::channel(endpoint, tls).ok()?;
        let mut client = MaintenanceClient::new(channel);
        client
            .status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    let Ok(Some(status)) = tokio::time::timeout(Duration::from_millis(800), query).await else {
        return unknown("unreachable");
    };
    let id = status.header.map_or(0, |h| h.member_id);
    let role = if status.is_learner {
        "learner"
    } else if status.leader == 0 {
        "no leader"
    } else if status.leader == id {
        "leader"
    } else {
        "follower"
    };
    Row {
        name: name.to_string(),
        id,
        role: role.to_string(),
        term: status.raft_term,
        commit: status.raft_index,
        applied: status.raft_applied_index,
        leader: status.leader,
    }
}

fn render_table(members: &[&str], rows: &[Row]) -> String {
    let mut out = format!(
        "{:<7} {:<17} {:<22} {:>6} {:>10} {:>10}  {:<16}\n",
        "MEMBER", "ID", "ROLE", "TERM", "COMMIT", "APPLIED", "LEADER"
    );
    for row in rows {
        let leader_name = members
            .iter()
            .zip(rows)
            .find(|(_, r)| r.id != 0 && r.id == row.leader)
            .map_or_else(
                || {
                    if row.leader == 0 {
                        "-".to_string()
                    } else {
                        format!("{:x}", row.leader)
                    }
                },
                |(name, _)| name.to_string(),
            );
        out.push_str(&format!(
            "{:<7} {:<17} {:<22} {:>6} {:>10} {:>10}  {:<16}\n",
            row.name,
            if row.id == 0 {
                "-".to_string()
            } else {
                format!("{:x}", row.id)
            },
            row.role,
            row.term,
            row.commit,
            row.applied,
            leader_name
        ));
    }
    out
}

/// SIGTERM to every member by PID, then wait; SIGKILL whoever is still there after the grace.
async fn stop_all(members: &mut [Member]) {
    for m in members.iter() {
        if let Some(child) = &m.child
            && let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for m in members.iter_mut() {
        let Some(child) = &mut m.child else { continue };
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("{} did not stop in time; killing it", m.name);
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        m.child = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_etcds_local_cluster_convention() {
        assert_eq!(client_port(0), 2379);
        assert_eq!(client_port(1), 22379);
        assert_eq!(client_port(2), 32379);
        assert_eq!(client_port(5), 62379);
    }
}
