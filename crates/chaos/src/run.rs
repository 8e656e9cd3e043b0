//! One chaos run: start the cluster, run workers and nemesis for the duration, heal, wait for
//! health, read the final state, check, and give the verdict.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_client::{Client, SessionPolicy};
use tokio::task::JoinSet;

use crate::checkers::{WatchedWrite, WatcherLog, check_counter, check_set, check_watch};
use crate::cluster::{Cluster, SystemKind, Target};
use crate::history::{self, Recorder};
use crate::linearizability::{self, DEFAULT_CONFIGURATIONS_MAX, KeyVerdict};
use crate::nemesis::{Nemesis, NemesisKind, Timeline};
use crate::network::{self, Network, NetworkKind};
use crate::rng::Rng;
use crate::workloads::{self, RegisterShared, WorkerContext};
use crate::{ChaosArgs, Workload, watcher};

/// The cluster must elect a leader and serve reads within this, at start and after the
/// final heal.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Call budget of a worker's operation (retries included).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The counter's increments ride out longer faults by retrying under their session.
const COUNTER_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Watchers must reach the final revision within this once it is known.
const WATCH_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Process numbers of the final reads start here, clear of every worker's.
const FINAL_PROCESS: u64 = 1_000_000_000;

/// What a run found.
#[derive(Debug, Default)]
struct Findings {
    /// Summary lines, printed before the verdict.
    lines: Vec<String>,
    /// Each is a reason the run fails.
    anomalies: Vec<String>,
}

impl Findings {
    fn line(&mut self, text: impl Into<String>) {
        self.lines.push(text.into());
    }
    fn anomaly(&mut self, text: impl Into<String>) {
        self.anomalies.push(text.into());
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No anomaly found.
    Pass,
    /// At least one anomaly.
    Fail,
    /// The run could not be carried out (no binary, the cluster never started, ...).
    Error,
    /// Stopped by Ctrl-C or SIGTERM.
    Interrupted,
}

impl Verdict {
    pub fn exit_code(self) -> ExitCode {
        match self {
            Verdict::Pass => ExitCode::SUCCESS,
            Verdict::Fail => ExitCode::FAILURE,
            Verdict::Error => ExitCode::from(2),
            Verdict::Interrupted => ExitCode::from(130),
        }
    }
}

/// Runs the harness; exits 0 only when no anomaly was found.
pub async fn run(args: ChaosArgs) -> ExitCode {
    run_with_verdict(args).await.exit_code()
}

/// Runs the harness and prints its summary, the verdict last. Ctrl-C or SIGTERM stops it,
/// killing the members and removing the network on the way out.
pub async fn run_with_verdict(args: ChaosArgs) -> Verdict {
    tokio::select! {
        verdict = run_to_verdict(args) => verdict,
        signal = interrupted() => {
            // Leaving the select drops the run: members are SIGKILLed, the network removed.
            println!("VERDICT: INTERRUPTED ({signal}); members killed, network removed");
            Verdict::Interrupted
        }
    }
}

async fn interrupted() -> &'static str {
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        std::future::pending::<()>().await;
        unreachable!("pending never completes");
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = terminate.recv() => "terminated",
    }
}

async fn run_to_verdict(args: ChaosArgs) -> Verdict {
    let out = args.out.clone();
    match execute(args).await {
        Ok(findings) => {
            for line in &findings.lines {
                println!("{line}");
            }
            if findings.anomalies.is_empty() {
                println!(
                    "VERDICT: PASS: no anomaly found; history and logs in {}",
                    out.display()
                );
                Verdict::Pass
            } else {
                for anomaly in &findings.anomalies {
                    println!("ANOMALY: {anomaly}");
                }
                println!(
                    "VERDICT: FAIL: {} anomal{} found; history and member logs kept in {}",
                    findings.anomalies.len(),
                    if findings.anomalies.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    out.display()
                );
                Verdict::Fail
            }
        }
        Err(error) => {
            println!(
                "VERDICT: ERROR: the run could not be completed: {error:#} (logs in {})",
                out.display()
            );
            Verdict::Error
        }
    }
}

/// The server binary: `--binary`, else for flotilla this executable if it is `flotilla`
/// (the `flotilla chaos` subcommand) or a `flotilla` beside it, else `etcd` on the PATH.
fn resolve_binary(args: &ChaosArgs) -> anyhow::Result<PathBuf> {
    if let Some(binary) = &args.binary {
        return Ok(binary.clone());
    }
    match args.system {
        SystemKind::Etcd => Ok(PathBuf::from("etcd")),
        SystemKind::Flotilla => {
            let me = std::env::current_exe().context("finding this executable")?;
            if me.file_name().is_some_and(|name| name == "flotilla") {
                return Ok(me);
            }
            let sibling = me.with_file_name("flotilla");
            if sibling.exists() {
                return Ok(sibling);
            }
            bail!(
                "no flotilla binary beside {} (build it with `cargo build --release -p \
                 flotilla`, or pass --binary PATH)",
                me.display()
            )
        }
    }
}

/// Clears what an earlier run left in `out` (its data, logs and results).
fn prepare_out_dir(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for directory in ["data", "logs"] {
        let path = out.join(directory);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("clearing {}", path.display()))?;
        }
    }
    for file in [
        "history.jsonl",
        "nemesis.log",
        "summary.txt",
        "watch-events.txt",
    ] {
        let _ = std::fs::remove_file(out.join(file));
    }
    Ok(())
}

fn choose_network(args: &ChaosArgs, findings: &mut Findings) -> anyhow::Result<NetworkKind> {
    let wants_partitions = matches!(args.nemesis, NemesisKind::Partition);
    if args.network == NetworkKind::Loopback {
        if wants_partitions {
            bail!("the partition nemesis needs --network namespaces");
        }
        return Ok(NetworkKind::Loopback);
    }
    if network::namespaces_available() {
        return Ok(NetworkKind::Namespaces);
    }
    if wants_partitions {
        bail!("partitions need root with `ip` (iproute2) and `nft` (nftables)");
    }
    findings.line("network: not root or no ip/nft: members on loopback, no partitions");
    Ok(NetworkKind::Loopback)
}

async fn execute(args: ChaosArgs) -> anyhow::Result<Findings> {
    let mut findings = Findings::default();
    if args.clients == 0 || args.duration == 0 {
        bail!("--clients and --duration must be at least 1");
    }
    let binary = resolve_binary(&args)?;
    prepare_out_dir(&args.out)?;
    let network_kind = choose_network(&args, &mut findings)?;
    for leftover in network::sweep_stale() {
        findings.line(format!("removed a leftover of an earlier run: {leftover}"));
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |elapsed| elapsed.as_nanos() as u64)
    });
    let header = format!(
        "flotilla chaos: {:?} ({}), {} members, workload {:?}, nemesis {:?}, {} s, {} clients, \
         seed {seed}{}",
        args.system,
        binary.display(),
        args.members,
        args.workload,
        args.nemesis,
        args.duration,
        args.clients,
        if args.serializable_reads {
            ", SERIALIZABLE reads"
        } else {
            ""
        }
    )
    .to_lowercase();
    println!("{header}");
    findings.line(header);

    let network = Network::create(network_kind, args.members).context("setting up the network")?;
    let target = Target {
        kind: args.system,
        binary,
    };
    let mut cluster = Cluster::start(target, network, args.members, &args.out, HEALTH_TIMEOUT)
        .await
        .context("starting the cluster")?;
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut nemesis = Nemesis::new(args.nemesis, rng.fork(), Timeline::new(start));
    nemesis.timeline.note(format!(
        "cluster of {} up ({:?} network); workload starts",
        args.members, network_kind
    ));
    let recorder = Arc::new(Recorder::new(start));
    let deadline = start + Duration::from_secs(args.duration);
    let context = WorkerContext {
        recorder: recorder.clone(),
        deadline,
        pace: Duration::from_secs_f64(args.clients as f64 / f64::from(args.rate.max(1))),
        workers: args.clients as u64,
    };

    let outcome = match args.workload {
        Workload::Register => {
            run_register(
                &args,
                &mut cluster,
                &mut nemesis,
                &context,
                &mut rng,
                &mut findings,
            )
            .await
        }
        Workload::Set => {
            run_set(
                &args,
                &mut cluster,
                &mut nemesis,
                &context,
                &mut rng,
                &mut findings,
            )
            .await
        }
        Workload::Counter => {
            run_counter(
                &args,
                &mut cluster,
                &mut nemesis,
                &context,
                &mut rng,
                &mut findings,
            )
            .await
        }
        Workload::Watch => {
            run_watch(
                &args,
                &mut cluster,
                &mut nemesis,
                &context,
                &mut rng,
                &mut findings,
            )
            .await
        }
    };
    // Whatever happened, the history and the timeline are written.
    let events = recorder.events();
    history::write_jsonl(&args.out.join("history.jsonl"), &events)
        .context("writing the history")?;
    std::fs::write(
        args.out.join("nemesis.log"),
        nemesis.timeline.lines.join("\n") + "\n",
    )
    .context("writing the nemesis log")?;
    outcome?;

    let faults: Vec<String> = nemesis
        .counts
        .iter()
        .map(|(name, count)| format!("{name} x{count}"))
        .collect();
    findings.line(format!(
        "nemesis: {}",
        if faults.is_empty() {
            "no faults".to_string()
        } else {
            faults.join(", ")
        }
    ));
    findings.line(format!(
        "history: {} events in {}",
        events.len(),
        args.out.join("history.jsonl").display()
    ));
    cluster.collect_unexpected_exits();
    for member in &cluster.members {
        for exit in &member.unexpected_exits {
            findings.anomaly(format!(
                "member crash: {exit} (see {})",
                args.out.join("logs").display()
            ));
        }
    }
    let data_dir = cluster.data_dir().to_path_buf();
    for error in cluster.shut_down().await {
        findings.line(format!("cleanup: {error}"));
    }
    if findings.anomalies.is_empty() {
        // Member data is large (preallocated logs); a passing run keeps only history and logs.
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    std::fs::write(
        args.out.join("summary.txt"),
        findings.lines.join("\n") + "\n" + &findings.anomalies.join("\n"),
    )
    .context("writing the summary")?;
    Ok(findings)
}

/// Runs the nemesis while `workers` run, then heals and waits for health (an unhealthy
/// cluster is an anomaly).
async fn run_faults_while<T: 'static>(
    cluster: &mut Cluster,
    nemesis: &mut Nemesis,
    deadline: Instant,
    mut workers: JoinSet<T>,
    findings: &mut Findings,
) -> bool {
    let ((), ()) = tokio::join!(nemesis.run(cluster, deadline), async {
        while workers.join_next().await.is_some() {}
    });
    nemesis.timeline.note("workload over; healing");
    nemesis.heal_all(cluster).await;
    match cluster.wait_healthy(HEALTH_TIMEOUT).await {
        Ok(leader) => {
            nemesis.timeline.note(format!(
                "cluster healthy, leader {}",
                cluster.members[leader].name
            ));
            true
        }
        Err(error) => {
            nemesis
                .timeline
                .note(format!("cluster NOT healthy: {error}"));
            findings.anomaly(format!(
                "the cluster did not recover after healing: {error}"
            ));
            false
        }
    }
}

async fn worker_clients(
    cluster: &Cluster,
    count: usize,
    sessions: SessionPolicy,
    call_timeout: Duration,
) -> anyhow::Result<Vec<Client>> {
    let endpoints = cluster.endpoints();
    let mut clients = Vec::new();
    for worker in 0..count {
        clients.push(workloads::worker_client(&endpoints, worker, sessions, call_timeout).await?);
    }
    Ok(clients)
}

fn count_outcomes(events: &[history::Event], findings: &mut Findings) -> usize {
    use history::EventType;
    let count = |kind: EventType| events.iter().filter(|event| event.kind == kind).count();
    let invoked = count(EventType::Invoke);
    findings.line(format!(
        "operations: {invoked} invoked: {} ok, {} fail, {} info (unknown)",
        count(EventType::Ok),
        count(EventType::Fail),
        count(EventType::Info)
    ));
    invoked
}

async fn run_register(
    args: &ChaosArgs,
    cluster: &mut Cluster,
    nemesis: &mut Nemesis,
    context: &WorkerContext,
    rng: &mut Rng,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let shared = Arc::new(RegisterShared::new(args.serializable_reads));
    let clients = worker_clients(
        cluster,
        args.clients,
        SessionPolicy::Sessions { pool_size: 1 },
        CALL_TIMEOUT,
    )
    .await?;
    let endpoints = cluster.endpoints();
    let mut workers = JoinSet::new();
    for (worker, client) in clients.into_iter().enumerate() {
        let read_client = if args.serializable_reads {
            let home = std::slice::from_ref(&endpoints[worker % endpoints.len()]);
            workloads::worker_client(home, 0, SessionPolicy::Plain, CALL_TIMEOUT).await?
        } else {
            client.clone()
        };
        workers.spawn(workloads::register_worker(
            worker,
            client,
            read_client,
            shared.clone(),
            context.clone(),
            rng.fork(),
        ));
    }
    let healthy = run_faults_while(cluster, nemesis, context.deadline, workers, findings).await;
    if healthy {
        let client = cluster.client().await?;
        let keys = shared.keys();
        let read = workloads::register_final_reads(&client, &keys, FINAL_PROCESS, context).await;
        findings.line(format!("final reads: {read} of {} keys read", keys.len()));
    }
    let events = context.recorder.events();
    let invoked = count_outcomes(&events, findings);
    let operations = history::pair_operations(&events)?;
    let checked_at = Instant::now();
    let report = tokio::task::spawn_blocking(move || {
        linearizability::check_register(&operations, DEFAULT_CONFIGURATIONS_MAX)
    })
    .await??;
    let checked: usize = report.keys.iter().map(|key| key.operations_checked).sum();
    findings.line(format!(
        "register: {} keys, {invoked} operations ({checked} after dropping failures and \
         unobserved unknown writes) checked for linearizability in {:.1} s",
        report.keys.len(),
        checked_at.elapsed().as_secs_f64()
    ));
    for key in report.failures() {
        match &key.verdict {
            KeyVerdict::NotLinearizable(explanation) => findings.anomaly(format!(
                "key {} is not linearizable: {explanation}",
                key.key
            )),
            KeyVerdict::Unknown(reason) => findings.anomaly(format!(
                "key {}: the checker could not decide ({reason})",
                key.key
            )),
            KeyVerdict::Linearizable => {}
        }
    }
    if report.is_linearizable() {
        findings.line("register: every key linearizable");
    }
    Ok(())
}

async fn run_set(
    args: &ChaosArgs,
    cluster: &mut Cluster,
    nemesis: &mut Nemesis,
    context: &WorkerContext,
    rng: &mut Rng,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let clients = worker_clients(
        cluster,
        args.clients,
        SessionPolicy::Sessions { pool_size: 1 },
        CALL_TIMEOUT,
    )
    .await?;
    let mut workers = JoinSet::new();
    for (worker, client) in clients.into_iter().enumerate() {
        workers.spawn(workloads::set_worker(
            worker,
            client,
            context.clone(),
            rng.fork(),
        ));
    }
    let healthy = run_faults_while(cluster, nemesis, context.deadline, workers, findings).await;
    let events = context.recorder.events();
    count_outcomes(&events, findings);
    if !healthy {
        return Ok(());
    }
    let operations = history::pair_operations(&events)?;
    // The final read through each member in turn: every one must see the same set.
    let mut first_seen: Option<BTreeSet<String>> = None;
    for (index, member) in cluster.members.iter().enumerate() {
        let client =
            workloads::worker_client(&[member.endpoint()], 0, SessionPolicy::Plain, CALL_TIMEOUT)
                .await?;
        let present = match workloads::read_set(&client).await {
            Ok(present) => present,
            Err(error) => {
                findings.anomaly(format!(
                    "final read through {} failed: {error}",
                    member.name
                ));
                continue;
            }
        };
        let report = check_set(&operations, &present);
        if index == 0 {
            findings.line(format!(
                "set: {} acknowledged, {} unknown ({} present), {} failed adds; {} elements read",
                report.acknowledged,
                report.unknown,
                report.unknown_present,
                report.failed,
                report.final_size
            ));
        }
        for anomaly in report.anomalies {
            findings.anomaly(format!("set read through {}: {anomaly}", member.name));
        }
        match &first_seen {
            None => first_seen = Some(present),
            Some(first) if *first != present => findings.anomaly(format!(
                "members disagree: {} reads {} elements, {} reads {}",
                cluster.members[0].name,
                first.len(),
                member.name,
                present.len()
            )),
            Some(_) => {}
        }
    }
    Ok(())
}

async fn run_counter(
    args: &ChaosArgs,
    cluster: &mut Cluster,
    nemesis: &mut Nemesis,
    context: &WorkerContext,
    rng: &mut Rng,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let sessions = SessionPolicy::Sessions { pool_size: 1 };
    let clients = worker_clients(cluster, args.clients, sessions, COUNTER_CALL_TIMEOUT).await?;
    let first_client = clients.first().cloned();
    let mut workers = JoinSet::new();
    for (worker, client) in clients.into_iter().enumerate() {
        workers.spawn(workloads::counter_worker(
            worker,
            client,
            context.clone(),
            rng.fork(),
        ));
    }
    let healthy = run_faults_while(cluster, nemesis, context.deadline, workers, findings).await;
    let session_mode = first_client.map(|client| client.session_mode());
    let events = context.recorder.events();
    count_outcomes(&events, findings);
    let final_value = if healthy {
        let client = cluster.client().await?;
        workloads::read_counter(&client).await.ok()
    } else {
        None
    };
    let operations = history::pair_operations(&events)?;
    let report = check_counter(&operations, final_value);
    findings.line(format!(
        "counter: {} increments issued: {} acknowledged, {} unknown, {} failed; final value {}; \
         {} reads checked (sessions: {:?})",
        report.invoked,
        report.acknowledged,
        report.unknown,
        report.failed,
        final_value.map_or("unread".to_string(), |value| value.to_string()),
        report.reads_checked,
        session_mode
    ));
    for anomaly in report.anomalies {
        findings.anomaly(format!("counter: {anomaly}"));
    }
    Ok(())
}

async fn run_watch(
    args: &ChaosArgs,
    cluster: &mut Cluster,
    nemesis: &mut Nemesis,
    context: &WorkerContext,
    rng: &mut Rng,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let endpoints = cluster.endpoints();
    if let Err(error) = watcher::probe(&endpoints[0]).await {
        bail!("watch workload: {error} (flotilla's Watch comes with issue 8)");
    }
    let (target_sender, target) = tokio::sync::watch::channel(None);
    let mut watchers = JoinSet::new();
    let mut logs = Vec::new();
    for home in 0..cluster.size() {
        let log = Arc::new(Mutex::new(WatcherLog::default()));
        logs.push(log.clone());
        let name = format!("watcher-{}", cluster.members[home].name);
        watchers.spawn(watcher::run_watcher(
            name,
            endpoints.clone(),
            home,
            target.clone(),
            WATCH_CATCH_UP_TIMEOUT,
            log,
        ));
    }
    let writes = Arc::new(Mutex::new(Vec::<WatchedWrite>::new()));
    let next_value = Arc::new(AtomicI64::new(1));
    let clients = worker_clients(
        cluster,
        args.clients,
        SessionPolicy::Sessions { pool_size: 1 },
        CALL_TIMEOUT,
    )
    .await?;
    let mut workers = JoinSet::new();
    for (worker, client) in clients.into_iter().enumerate() {
        workers.spawn(workloads::watch_writer(
            worker,
            client,
            context.clone(),
            writes.clone(),
            next_value.clone(),
            rng.fork(),
        ));
    }
    let healthy = run_faults_while(cluster, nemesis, context.deadline, workers, findings).await;
    let events = context.recorder.events();
    count_outcomes(&events, findings);
    if !healthy {
        watchers.abort_all();
        return Ok(());
    }
    let client = cluster.client().await?;
    // The last write's revision: the highest mod revision under the prefix (nothing is
    // deleted there).
    let final_revision = client
        .range(flotilla_proto::etcdserverpb::RangeRequest {
            key: workloads::WATCH_PREFIX.into(),
            range_end: flotilla_client::prefix_range_end(workloads::WATCH_PREFIX.as_bytes()),
            ..Default::default()
        })
        .await?
        .kvs
        .iter()
        .map(|kv| kv.mod_revision)
        .max()
        .unwrap_or(0);
    let _ = target_sender.send(Some(final_revision));
    // The write history: a fresh watch from revision 1 on the healthy cluster.
    let history_log = Arc::new(Mutex::new(WatcherLog::default()));
    let reference = watcher::run_watcher(
        "history".into(),
        endpoints.clone(),
        0,
        target.clone(),
        WATCH_CATCH_UP_TIMEOUT,
        history_log.clone(),
    )
    .await;
    if let Err(error) = reference {
        bail!("watch workload: {error} (flotilla's Watch comes with issue 8)");
    }
    while let Some(joined) = watchers.join_next().await {
        if let Ok(Err(error)) = joined {
            bail!("watch workload: {error} (flotilla's Watch comes with issue 8)");
        }
    }
    let history = history_log.lock().expect("history log").events.clone();
    let watcher_logs: Vec<WatcherLog> = logs
        .iter()
        .map(|log| log.lock().expect("watcher log").clone())
        .collect();
    write_watch_events(&args.out, &history, &watcher_logs)?;
    let writes = writes.lock().expect("writes").clone();
    let report = check_watch(&writes, &history, &watcher_logs);
    findings.line(format!(
        "watch: {} acknowledged writes, history of {} events up to revision {final_revision}; \
         {} watchers, {} resumptions",
        report.writes_acknowledged, report.history_len, report.watchers, report.resumptions
    ));
    for anomaly in report.anomalies {
        findings.anomaly(format!("watch: {anomaly}"));
    }
    Ok(())
}

fn write_watch_events(
    out: &Path,
    history: &[crate::checkers::WatchEvent],
    watchers: &[WatcherLog],
) -> anyhow::Result<()> {
    let mut text = String::from("# history\n");
    for event in history {
        text.push_str(&format!("{event}\n"));
    }
    for watcher in watchers {
        text.push_str(&format!(
            "# {} ({} resumptions)\n",
            watcher.name, watcher.resumptions
        ));
        for event in &watcher.events {
            text.push_str(&format!("{event}\n"));
        }
    }
    std::fs::write(out.join("watch-events.txt"), text).context("writing watch events")
}
