//! A replicated hash map: three processes on loopback, each a member with its own
//! write-ahead log, talking Raft over TCP, each serving a line protocol to clients:
//!
//! ```text
//! put <key> <value>   ->  ok | ok, was <previous value>
//! delete <key>        ->  ok | ok, was <previous value>
//! get <key>           ->  value <value> | none          (linearizable: ReadIndex)
//! status              ->  member <id> <role> term <term> leader <id> commit <index>
//! ```
//!
//! A member that is not the leader answers a write with `redirect <address>` (the leader's
//! client address), or `retry: no leader yet` during an election.
//!
//! `cargo run -p flotilla-runtime --example replicated_hash_map -- demo` starts three members,
//! writes through them, kills the leader with SIGKILL, writes on through the two others and
//! checks that every write is there. `... -- member --id 1 --peers ... --clients ...` runs one
//! member (see `--help`).

#[path = "shared/demo.rs"]
mod demo;
#[path = "shared/hash_map.rs"]
mod hash_map;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_runtime::{
    Config, Membership, NoMetrics, NodeError, NodeHandle, NodeId, NodeOptions, NodeParts,
    PeerAddresses, Refusal, TcpTransport, open_wal,
};
use hash_map::{Command, HashMap, Outcome};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// All members of one cluster share its id; the transport refuses members of another.
const CLUSTER_ID: u64 = 0x4a5b_6c7d;
/// How long a client request may take (an election takes about a second).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
enum Args {
    /// Starts three members on loopback, kills the leader, checks that nothing was lost.
    Demo,
    /// Runs one member.
    Member(MemberArgs),
}

#[derive(Parser)]
struct MemberArgs {
    /// This member's id (one of the ids of --peers).
    #[arg(long)]
    id: NodeId,
    /// Every member's Raft address: `1=127.0.0.1:7101,2=...`.
    #[arg(long, value_parser = parse_addresses)]
    peers: BTreeMap<NodeId, SocketAddr>,
    /// Every member's client address, for redirects: `1=127.0.0.1:7201,2=...`.
    #[arg(long, value_parser = parse_addresses)]
    clients: BTreeMap<NodeId, SocketAddr>,
    /// Where this member keeps its log.
    #[arg(long)]
    data_dir: PathBuf,
}

fn parse_addresses(text: &str) -> Result<BTreeMap<NodeId, SocketAddr>, String> {
    text.split(',')
        .map(|pair| {
            let (id, address) = pair
                .split_once('=')
                .ok_or(format!("not id=address: {pair}"))?;
            let id = id
                .parse()
                .map_err(|e| format!("bad member id {id:?}: {e}"))?;
            let address = address
                .parse()
                .map_err(|e| format!("bad address {address:?}: {e}"))?;
            Ok((id, address))
        })
        .collect()
}

fn main() -> Result<(), String> {
    match Args::parse() {
        Args::Demo => demo::run(),
        Args::Member(args) => tokio::runtime::Runtime::new()
            .map_err(|e| format!("cannot start tokio: {e}"))?
            .block_on(run_member(args)),
    }
}

type Handle = NodeHandle<HashMap, NoMetrics>;

/// One member: its log, its node, its client listener, until SIGINT or SIGTERM.
async fn run_member(args: MemberArgs) -> Result<(), String> {
    let own = |map: &BTreeMap<NodeId, SocketAddr>| map.get(&args.id).copied();
    let (Some(peer_address), Some(client_address)) = (own(&args.peers), own(&args.clients)) else {
        return Err(format!(
            "member {} is not in --peers and --clients",
            args.id
        ));
    };
    let voters = Membership::with_voters(args.peers.keys().copied());
    let storage = open_wal(&args.data_dir.join("wal"), CLUSTER_ID, args.id, voters)
        .map_err(|e| e.to_string())?;
    let addresses = PeerAddresses::new(args.peers.clone());
    let tcp = TcpTransport::bind(CLUSTER_ID, args.id, peer_address, addresses)
        .await
        .map_err(|e| format!("cannot listen on {peer_address}: {e}"))?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = flotilla_runtime::start(NodeParts {
        options: NodeOptions::new(Config::new(args.id)),
        storage,
        state: Arc::new(RwLock::new(HashMap::default())),
        transport: tcp.transport,
        inbox: tcp.inbox,
        transport_events: tcp.events,
        metrics: Arc::new(NoMetrics),
        shutdown,
    })
    .map_err(|e| format!("cannot start the node: {e}"))?;
    let listener = TcpListener::bind(client_address)
        .await
        .map_err(|e| format!("cannot listen on {client_address}: {e}"))?;
    let clients = Arc::new(args.clients);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            Ok((stream, _)) = listener.accept() => {
                let (handle, clients) = (running.handle.clone(), clients.clone());
                tokio::spawn(serve_client(handle, clients, stream));
            }
        }
    }
    let _ = stop.send(true);
    running.join().await
}

/// Answers one client's lines in order until it hangs up.
async fn serve_client(
    handle: Handle,
    clients: Arc<BTreeMap<NodeId, SocketAddr>>,
    stream: TcpStream,
) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut answer = answer(&handle, &clients, &line).await;
        answer.push('\n');
        if write.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn answer(handle: &Handle, clients: &BTreeMap<NodeId, SocketAddr>, line: &str) -> String {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let refused = |err: NodeError| match err {
        NodeError::Refused(Refusal::NotLeader(Some(leader))) => match clients.get(&leader) {
            Some(address) => format!("redirect {address}"),
            None => format!("error: the leader {leader} has no client address"),
        },
        NodeError::Refused(Refusal::NotLeader(None)) => "retry: no leader yet".into(),
        err => format!("error: {err}"),
    };
    if let Some(key) = line.strip_prefix("get ") {
        return match handle.read_index(deadline).await {
            Ok(()) => match handle.state.read().unwrap().get(key) {
                Some(value) => format!("value {value}"),
                None => "none".into(),
            },
            Err(err) => refused(err),
        };
    }
    if line == "status" {
        let s = handle.status();
        let leader = s.leader.map_or("none".into(), |l| l.to_string());
        return format!(
            "member {} {} term {} leader {leader} commit {}",
            s.id, s.role, s.term, s.commit
        );
    }
    let command = match Command::parse(line) {
        Ok(command) => command,
        Err(reason) => return format!("error: {reason}"),
    };
    match handle.propose(command.encode(), deadline).await {
        Ok(Outcome::Done { previous: None }) => "ok".into(),
        Ok(Outcome::Done { previous: Some(v) }) => format!("ok, was {v}"),
        Ok(other) => format!("error: {other:?}"),
        Err(err) => refused(err),
    }
}
