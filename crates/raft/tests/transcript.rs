//! Transcript tests: scripts in `tests/transcripts/*.txt` drive a small cluster of real nodes
//! over in-memory storage and a hand-driven network, and record the exact output of every
//! command. A run compares the output with the script; any difference fails with a diff.
//! `UPDATE_TRANSCRIPTS=1 cargo test -p flotilla-raft --test transcript` rewrites the scripts
//! with the actual output instead, to be reviewed in `git diff` before committing.
//!
//! # File format
//!
//! A line `> command` runs a command; the lines after it, up to the next blank line, are its
//! expected output (`ok` if there is none). Lines starting with `#` between blocks are
//! comments. Each node's output is carried out at once after every input: persist batches are
//! written to its `MemStorage` and acknowledged, committed entries are applied to a toy state
//! machine (the list of commands), and messages join one FIFO network queue.
//!
//! # Commands
//!
//! | command | effect |
//! | --- | --- |
//! | `nodes 1 2 3 [opt=v ...]` | create voters of a new cluster {1, 2, 3} |
//! | `add-node 4 [opt=v ...]` | create a node with empty storage, waiting to be told its configuration |
//! | `campaign 1` | node 1 starts an election (a pre-vote first if enabled) |
//! | `tick 1 2 [x3]`, `tick all [x3]` | tick nodes 1 and 2 (every running node) 3 times, in id order |
//! | `tick 2 3 until-message` | tick nodes 2 and 3 until one of them sends a message |
//! | `tick all x3 deliver` | tick every node 3 times, delivering until quiet after each round |
//! | `deliver` | deliver queued messages, and those they cause, until the network is quiet |
//! | `deliver once` | deliver only the messages queued now |
//! | `deliver 1->2 [Kind]`, `deliver *->2` | deliver only the queued messages that match, once |
//! | `drop 1->* [Kind] [first]` | drop the queued messages that match (only the first one) |
//! | `propose 1 data` | propose the command `data` on node 1 |
//! | `read-index 2 ctx=7` | request a linearizable read on node 2 |
//! | `transfer 1 to=3` | ask leader 1 to transfer leadership to node 3 |
//! | `change 1 add-voter 4 add-learner 5 promote 6 remove 2` | propose a membership change on node 1 |
//! | `partition 1 | 2 3` | cut every link between the groups (unlisted nodes keep their links) |
//! | `cut 1->2` | cut one direction of one link |
//! | `heal` | restore every link |
//! | `crash 2` | stop node 2; it keeps its storage (everything handed out is durable) |
//! | `restart 2` | start node 2 again from its storage, with an empty state machine |
//! | `snapshot 1 [at=4]` | snapshot node 1's state machine at its applied index (or at 4) and tell the core |
//! | `unreachable 1 to=3` | report to node 1 that node 3 could not be reached |
//! | `status [1 2]` | role, term, log and configuration of the nodes (all by default) |
//! | `log 2` | the entries node 2 holds |
//! | `progress 1` | leader 1's match and next index for each member |
//! | `queue` | the messages in flight |
//!
//! Any command may end with `silent` to run without recording its output. Node options:
//! `prevote`, `checkquorum` (true/false), `election`, `heartbeat` (ticks), `chunk` (snapshot
//! chunk bytes), `chunks-inflight`, `trailing` (snapshot trailing entries), `snapshot-entries`
//! (the snapshot policy), `lag-max` (promotion lag), `seed-offset` (added to the id as seed).
//! Options given to `nodes` or `add-node` stay in force for nodes created later.
//!
//! # Output
//!
//! - `n1 follower@1 -> candidate@2`: a change of role, term or known leader (` leader=3`).
//! - `n1 persist entries=[4@2] term=2 vote=1 commit=3`: a persist batch, written at once; also
//!   `chunk=5@1:0+4/10` (a snapshot chunk: offset+length/total), `install=5@1 keep=7`, `compact=3`.
//! - `1->2 Append t2 prev=3@1 commit=3 [4@2 5@2:data 6@2:conf]`: a message sent (the others:
//!   `Vote`/`PreVote last=.. [transfer]`, `VoteResp`/`PreVoteResp granted|rejected`,
//!   `AppendResp match=5` or `reject=5 hint=3@1`, `Heartbeat commit=3 [read=1]`,
//!   `HeartbeatResp [read=1]`, `Snapshot snap=5@1 off=0 len=4/10`,
//!   `SnapshotResp snap=5@1 next=4 received|resend|installed`, `ReadIndex ctx=7`,
//!   `ReadIndexResp ctx=7 index=3|none`, `TimeoutNow`). Messages dropped by a cut link or to a
//!   stopped node are dropped silently when delivered.
//! - `n1 apply 4@2 5@2:data`, `n1 apply snapshot=5@1 (a,b)`: entries and snapshots applied.
//! - `n1 read ctx=7 index=3`, `n1 read ctx=7 failed`: reads released or failed.
//! - `n1 snapshot due at 8`, `n1 removed`: the rest of the output.
//! - `n1 error: ...`: a command refused by the core.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use flotilla_raft::*;

// ----- Scripts ------------------------------------------------------------------------------

/// One command of a script, with the comments before it and its recorded output.
struct Block {
    preamble: Vec<String>,
    command: String,
    output: Vec<String>,
}

fn parse_script(text: &str) -> (Vec<Block>, Vec<String>) {
    let mut blocks = Vec::new();
    let mut preamble = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(command) = line.strip_prefix("> ") {
            let mut output = Vec::new();
            while let Some(next) = lines.next_if(|l| !l.is_empty()) {
                output.push(next.to_string());
            }
            lines.next_if(|l| l.is_empty());
            let preamble = std::mem::take(&mut preamble);
            let command = command.trim().to_string();
            blocks.push(Block {
                preamble,
                command,
                output,
            });
        } else {
            assert!(
                line.is_empty() || line.starts_with('#'),
                "expected a comment or `> command`, found {line:?}"
            );
            preamble.push(line.to_string());
        }
    }
    (blocks, preamble)
}

fn render_script(blocks: &[Block], trailer: &[String]) -> String {
    let mut lines: Vec<&str> = Vec::new();
    let command_lines: Vec<String> = blocks.iter().map(|b| format!("> {}", b.command)).collect();
    for (block, command) in blocks.iter().zip(&command_lines) {
        lines.extend(block.preamble.iter().map(String::as_str));
        lines.push(command);
        lines.extend(block.output.iter().map(String::as_str));
        lines.push("");
    }
    lines.extend(trailer.iter().map(String::as_str));
    let mut text = lines.join("\n");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// A line diff (longest common subsequence) showing changed lines with two lines of context.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            ops.push(('+', b[j]));
            j += 1;
        } else {
            ops.push(('-', a[i]));
            i += 1;
        }
    }
    let near_change = |k: usize| {
        ops[k.saturating_sub(2)..(k + 3).min(ops.len())]
            .iter()
            .any(|op| op.0 != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (tag, line)) in ops.iter().enumerate() {
        if near_change(k) {
            writeln!(out, "{tag} {line}").unwrap();
            skipped = false;
        } else if !skipped {
            out.push_str("  ...\n");
            skipped = true;
        }
    }
    out
}

fn run_transcript(name: &str) {
    let path = transcripts_dir().join(format!("{name}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let (mut blocks, trailer) = parse_script(&text);
    let mut cluster = Cluster::default();
    for block in &mut blocks {
        block.output = cluster.run(&block.command);
        if block.output.is_empty() {
            block.output.push("ok".to_string());
        }
    }
    let actual = render_script(&blocks, &trailer);
    if actual == text {
        return;
    }
    if std::env::var_os("UPDATE_TRANSCRIPTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    panic!(
        "transcript {name} differs (- expected, + actual); rerun with UPDATE_TRANSCRIPTS=1 to \
         accept:\n{}",
        diff(&text, &actual)
    );
}

fn transcripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts")
}

// ----- The cluster --------------------------------------------------------------------------

enum NodeState {
    Running(Box<RaftNode<MemStorage>>),
    Crashed(Box<MemStorage>),
}

struct SimNode {
    config: Config,
    state: NodeState,
    reported: Option<RoleState>,
    /// The toy state machine: the commands applied, in order, with their indexes.
    machine: Vec<(Index, String)>,
}

#[derive(Default)]
struct Cluster {
    nodes: BTreeMap<NodeId, SimNode>,
    queue: VecDeque<Message>,
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Options for nodes created from now on.
    options: BTreeMap<String, String>,
    out: Vec<String>,
}

/// Selects queued messages: `1->2`, `*->2`, `1->*`, optionally with a message kind.
struct Filter {
    from: Option<NodeId>,
    to: Option<NodeId>,
    kind: Option<String>,
}

impl Filter {
    fn parse(args: &[&str]) -> Self {
        let (from, to) = args[0].split_once("->").expect("a filter is FROM->TO");
        let id = |s: &str| (s != "*").then(|| s.parse().expect("a node id or *"));
        Self {
            from: id(from),
            to: id(to),
            kind: args.get(1).map(|s| s.to_string()),
        }
    }

    fn matches(&self, msg: &Message) -> bool {
        self.from.is_none_or(|from| from == msg.from)
            && self.to.is_none_or(|to| to == msg.to)
            && self
                .kind
                .as_deref()
                .is_none_or(|kind| kind == msg.body.kind())
    }
}

fn arg<'a>(args: &[&'a str], key: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
        .unwrap_or_else(|| panic!("missing {key}=..."))
}

fn node_id(s: &str) -> NodeId {
    s.parse().unwrap_or_else(|_| panic!("not a node id: {s:?}"))
}

impl Cluster {
    /// Runs one command line and returns its output.
    fn run(&mut self, line: &str) -> Vec<String> {
        let mut args: Vec<&str> = line.split_whitespace().collect();
        let silent = args.last() == Some(&"silent");
        if silent {
            args.pop();
        }
        let (command, args) = args.split_first().expect("empty command");
        self.out.clear();
        match *command {
            "nodes" | "add-node" => self.create_nodes(*command == "nodes", args),
            "campaign" => self.input(node_id(args[0]), |n| n.campaign().map(|_| None)),
            "tick" => self.tick(args),
            "deliver" => self.deliver(args),
            "drop" => self.drop_messages(args),
            "propose" => {
                let data = Bytes::from(args[1].to_string());
                self.input(node_id(args[0]), |n| {
                    n.propose(data).map(|id| Some(format!("proposed {id}")))
                })
            }
            "read-index" => {
                let context = arg(args, "ctx").parse().unwrap();
                self.input(node_id(args[0]), |n| n.read_index(context).map(|_| None))
            }
            "transfer" => {
                let target = node_id(arg(args, "to"));
                self.input(node_id(args[0]), |n| {
                    n.transfer_leader(target).map(|_| None)
                })
            }
            "change" => self.change(args),
            "partition" => self.partition(args),
            "cut" => {
                let filter = Filter::parse(args);
                self.cut.insert((filter.from.unwrap(), filter.to.unwrap()));
            }
            "heal" => self.cut.clear(),
            "crash" => self.crash(node_id(args[0])),
            "restart" => self.restart(node_id(args[0])),
            "snapshot" => {
                let at = args.get(1).map(|_| arg(args, "at").parse().unwrap());
                self.snapshot(node_id(args[0]), at)
            }
            "unreachable" => {
                let to = node_id(arg(args, "to"));
                self.input(node_id(args[0]), |n| {
                    n.report_unreachable(to);
                    Ok(None)
                })
            }
            "status" => self.status(args),
            "log" => self.log(node_id(args[0])),
            "progress" => self.progress(node_id(args[0])),
            "queue" => {
                let lines: Vec<String> = self.queue.iter().map(format_message).collect();
                self.out.extend(lines);
            }
            other => panic!("unknown command {other:?}"),
        }
        let out = std::mem::take(&mut self.out);
        if silent { Vec::new() } else { out }
    }

    fn node_config(&self, id: NodeId) -> Config {
        let mut config = common::config(id);
        for (key, value) in &self.options {
            let number = || value.parse::<u64>().unwrap();
            let flag = || value.parse::<bool>().unwrap();
            match key.as_str() {
                "prevote" => config.pre_vote = flag(),
                "checkquorum" => config.check_quorum = flag(),
                "election" => config.election_timeout_ticks = number(),
                "heartbeat" => config.heartbeat_interval_ticks = number(),
                "chunk" => config.snapshot_chunk_bytes = number(),
                "chunks-inflight" => config.snapshot_chunks_inflight_max = number() as usize,
                "trailing" => config.snapshot_trailing_entries = number(),
                "snapshot-entries" => config.snapshot_policy.entries_max = number(),
                "lag-max" => config.promotion_lag_entries_max = number(),
                "seed-offset" => config.seed = id + number(),
                other => panic!("unknown node option {other:?}"),
            }
        }
        config
    }

    fn create_nodes(&mut self, bootstrap: bool, args: &[&str]) {
        let (options, ids): (Vec<&str>, Vec<&str>) = args.iter().partition(|a| a.contains('='));
        for option in options {
            let (key, value) = option.split_once('=').unwrap();
            self.options.insert(key.to_string(), value.to_string());
        }
        let ids: Vec<NodeId> = ids.into_iter().map(node_id).collect();
        for &id in &ids {
            assert!(!self.nodes.contains_key(&id), "node {id} exists");
            let storage = if bootstrap {
                MemStorage::new_with_membership(common::voters(&ids))
            } else {
                MemStorage::new_empty()
            };
            let config = self.node_config(id);
            let node = RaftNode::new(config.clone(), storage, 0).unwrap();
            let reported = Some(RoleState {
                role: node.role(),
                term: node.term(),
                leader: NODE_NONE,
            });
            let state = NodeState::Running(Box::new(node));
            let machine = Vec::new();
            let sim_node = SimNode {
                config,
                state,
                reported,
                machine,
            };
            self.nodes.insert(id, sim_node);
            self.settle(id);
        }
    }

    fn running(&mut self, id: NodeId) -> Option<&mut RaftNode<MemStorage>> {
        match &mut self.nodes.get_mut(&id)?.state {
            NodeState::Running(node) => Some(node),
            NodeState::Crashed(_) => None,
        }
    }

    /// Gives node `id` an input, records its result, and carries out its output.
    fn input(
        &mut self,
        id: NodeId,
        f: impl FnOnce(&mut RaftNode<MemStorage>) -> Result<Option<String>, Error>,
    ) {
        let node = self
            .running(id)
            .unwrap_or_else(|| panic!("node {id} is not running"));
        match f(node) {
            Ok(Some(result)) => self.out.push(format!("n{id} {result}")),
            Ok(None) => {}
            Err(err) => self.out.push(format!("n{id} error: {err}")),
        }
        self.settle(id);
    }

    /// Carries out node `id`'s output until it has nothing more to say.
    fn settle(&mut self, id: NodeId) {
        for _ in 0..100 {
            let sim_node = self.nodes.get_mut(&id).unwrap();
            let NodeState::Running(node) = &mut sim_node.state else {
                return;
            };
            let output = node.take_output().unwrap();
            if output.is_empty() {
                return;
            }
            if let Some(state) = output.role_state
                && sim_node.reported != Some(state)
            {
                let line = match sim_node.reported {
                    Some(before) => {
                        format!("n{id} {} -> {}", format_role(before), format_role(state))
                    }
                    None => format!("n{id} restarted as {}", format_role(state)),
                };
                self.out.push(line);
                sim_node.reported = Some(state);
            }
            if let Some(batch) = &output.persist {
                self.out
                    .push(format!("n{id} persist{}", format_batch(batch)));
                node.storage_mut().persist(batch).unwrap();
                node.on_persisted(batch.id).unwrap();
            }
            self.out.extend(output.messages.iter().map(format_message));
            self.queue.extend(output.messages);
            if let Some(last) = output.apply.last() {
                let mut applied = Vec::new();
                for apply in &output.apply {
                    applied.push(apply_to_machine(node, &mut sim_node.machine, apply));
                }
                node.on_applied(last.index()).unwrap();
                self.out.push(format!("n{id} apply {}", applied.join(" ")));
            }
            for read in &output.reads {
                let ReadState { context, index } = read;
                self.out
                    .push(format!("n{id} read ctx={context} index={index}"));
            }
            for (context, _) in &output.reads_failed {
                self.out.push(format!("n{id} read ctx={context} failed"));
            }
            if let Some(index) = output.snapshot_due {
                self.out.push(format!("n{id} snapshot due at {index}"));
            }
            if output.removed {
                self.out.push(format!("n{id} removed"));
            }
        }
        panic!("node {id} never settled");
    }

    fn running_ids(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| matches!(n.state, NodeState::Running(_)))
            .map(|(&id, _)| id)
            .collect()
    }

    /// `tick IDS [xN | until-message] [deliver]`: tick the nodes in lockstep, N times or until
    /// one sends, delivering every message after each round if asked.
    fn tick(&mut self, args: &[&str]) {
        let (ids, mode): (Vec<&str>, Vec<&str>) = args
            .iter()
            .partition(|a| a.parse::<NodeId>().is_ok() || **a == "all");
        let ids = if ids == ["all"] {
            self.running_ids()
        } else {
            ids.into_iter().map(node_id).collect()
        };
        let deliver_each_round = mode.last() == Some(&"deliver");
        let mode = if deliver_each_round {
            &mode[..mode.len() - 1]
        } else {
            &mode[..]
        };
        let until_message = mode.first() == Some(&"until-message");
        let times = match mode.first() {
            None => 1,
            Some(&"until-message") => 1_000,
            Some(times) => times.strip_prefix('x').unwrap().parse().unwrap(),
        };
        for round in 1..=times {
            let queued = self.queue.len();
            for &id in &ids {
                self.input(id, |n| n.tick().map(|_| None));
            }
            if until_message && self.queue.len() > queued {
                self.out.insert(0, format!("ticked x{round}"));
                return;
            }
            if deliver_each_round {
                self.deliver(&[]);
            }
        }
        assert!(
            !until_message,
            "no node of {ids:?} sent anything in {times} ticks"
        );
    }

    fn deliver(&mut self, args: &[&str]) {
        match args.first() {
            None => {
                for _ in 0..100_000 {
                    let Some(msg) = self.queue.pop_front() else {
                        return;
                    };
                    self.deliver_one(msg);
                }
                panic!("the network never went quiet");
            }
            Some(&"once") => {
                let batch = std::mem::take(&mut self.queue);
                for msg in batch {
                    self.deliver_one(msg);
                }
            }
            Some(_) => {
                let filter = Filter::parse(args);
                let (batch, rest) = std::mem::take(&mut self.queue)
                    .into_iter()
                    .partition(|m| filter.matches(m));
                self.queue = rest;
                for msg in batch {
                    self.deliver_one(msg);
                }
            }
        }
    }

    fn deliver_one(&mut self, msg: Message) {
        let to = msg.to;
        if self.cut.contains(&(msg.from, to)) || self.running(to).is_none() {
            return;
        }
        self.input(to, |n| n.step(msg).map(|_| None));
    }

    fn drop_messages(&mut self, args: &[&str]) {
        let first_only = args.last() == Some(&"first");
        let args = if first_only {
            &args[..args.len() - 1]
        } else {
            args
        };
        let filter = Filter::parse(args);
        let mut dropped = false;
        self.queue.retain(|m| {
            let drop = filter.matches(m) && !(first_only && dropped);
            dropped |= drop;
            if drop {
                self.out.push(format!("dropped {}", format_message(m)));
            }
            !drop
        });
    }

    fn change(&mut self, args: &[&str]) {
        let steps = args[1..]
            .chunks(2)
            .map(|pair| {
                let id = node_id(pair[1]);
                match pair[0] {
                    "add-voter" => ConfChangeStep::AddVoter(id),
                    "add-learner" => ConfChangeStep::AddLearner(id),
                    "promote" => ConfChangeStep::Promote(id),
                    "remove" => ConfChangeStep::Remove(id),
                    other => panic!("unknown change step {other:?}"),
                }
            })
            .collect();
        let change = ConfChange {
            steps,
            context: Bytes::new(),
        };
        self.input(node_id(args[0]), |n| {
            let id = n.propose_membership(change)?;
            Ok(Some(format!("proposed {id} {}", n.membership())))
        });
    }

    fn partition(&mut self, args: &[&str]) {
        let groups: Vec<Vec<NodeId>> = args
            .split(|a| *a == "|")
            .map(|group| group.iter().map(|s| node_id(s)).collect())
            .collect();
        for (i, group) in groups.iter().enumerate() {
            for other in groups.iter().skip(i + 1) {
                for &a in group {
                    for &b in other {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        let sim_node = self.nodes.get_mut(&id).unwrap();
        let NodeState::Running(node) = &sim_node.state else {
            panic!("node {id} is not running");
        };
        sim_node.state = NodeState::Crashed(Box::new(node.storage().clone()));
        sim_node.machine.clear();
    }

    fn restart(&mut self, id: NodeId) {
        let sim_node = self.nodes.get_mut(&id).unwrap();
        let NodeState::Crashed(storage) = &sim_node.state else {
            panic!("node {id} is not crashed");
        };
        let node = RaftNode::new(sim_node.config.clone(), (**storage).clone(), 0).unwrap();
        sim_node.state = NodeState::Running(Box::new(node));
        sim_node.reported = None;
        self.settle(id);
    }

    fn snapshot(&mut self, id: NodeId, at: Option<Index>) {
        let sim_node = self.nodes.get_mut(&id).unwrap();
        let NodeState::Running(node) = &mut sim_node.state else {
            panic!("node {id} is not running");
        };
        let index = at.unwrap_or(node.applied());
        let commands: Vec<&str> = sim_node
            .machine
            .iter()
            .filter(|(at, _)| *at <= index)
            .map(|(_, command)| command.as_str())
            .collect();
        let data = commands.join(",");
        let result = node.snapshot_meta(index).and_then(|meta| {
            let bytes = Bytes::from(data.clone());
            node.storage_mut().save_snapshot(meta.clone(), bytes)?;
            node.on_snapshot_saved(&meta)?;
            Ok(meta)
        });
        match result {
            Ok(meta) => self
                .out
                .push(format!("n{id} snapshot {} ({data})", meta.last)),
            Err(err) => self.out.push(format!("n{id} error: {err}")),
        }
        self.settle(id);
    }

    fn status(&mut self, args: &[&str]) {
        let ids: Vec<NodeId> = if args.is_empty() {
            self.nodes.keys().copied().collect()
        } else {
            args.iter().map(|s| node_id(s)).collect()
        };
        for id in ids {
            let sim_node = &self.nodes[&id];
            let line = match &sim_node.state {
                NodeState::Crashed(_) => format!("n{id} crashed"),
                NodeState::Running(node) => {
                    let role = sim_node.reported.map(format_role).unwrap_or_default();
                    format!(
                        "n{id} {role} last={} commit={} applied={} first={} snap={} {}",
                        node.last_id(),
                        node.committed(),
                        node.applied(),
                        node.first_index(),
                        node.snapshot_id(),
                        node.membership()
                    )
                }
            };
            self.out.push(line);
        }
    }

    fn log(&mut self, id: NodeId) {
        let node = self.running(id).expect("running");
        let (first, last) = (node.first_index(), node.last_id().index);
        let entries = if first <= last {
            node.entries(first, last + 1, u64::MAX).unwrap()
        } else {
            Vec::new()
        };
        let mut lines = vec![format!("n{id} first={first} last={}", node.last_id())];
        lines.extend(entries.iter().map(|e| match &e.payload {
            EntryPayload::Membership(m) => format!("  {} conf {}", e.id(), m.membership),
            _ => format!("  {}", format_entry(e)),
        }));
        self.out.extend(lines);
    }

    fn progress(&mut self, id: NodeId) {
        let node = self.running(id).expect("running");
        let members = node.membership().members();
        let lines: Vec<String> = members
            .into_iter()
            .filter_map(|member| {
                let (matched, next) = node.progress_of(member)?;
                Some(format!("  {member} match={matched} next={next}"))
            })
            .collect();
        if lines.is_empty() {
            self.out.push(format!("n{id} is not the leader"));
        }
        self.out.extend(lines);
    }
}

/// Applies one item to the toy state machine and describes it.
fn apply_to_machine(
    node: &RaftNode<MemStorage>,
    machine: &mut Vec<(Index, String)>,
    apply: &Apply,
) -> String {
    match apply {
        Apply::Entry(entry) => {
            if let EntryPayload::Command(data) = &entry.payload {
                let command = String::from_utf8_lossy(data).into_owned();
                machine.push((entry.index, command));
            }
            format_entry(entry)
        }
        Apply::Snapshot(meta) => {
            let (stored, data) = node
                .storage()
                .snapshot_data()
                .expect("a snapshot in storage");
            assert_eq!(&stored, meta, "the snapshot to apply is the one in storage");
            let text = String::from_utf8_lossy(&data).into_owned();
            let index = meta.last.index;
            let commands = text.split(',').filter(|s| !s.is_empty());
            *machine = commands.map(|c| (index, c.to_string())).collect();
            format!("snapshot={} ({text})", meta.last)
        }
    }
}

// ----- Formatting ---------------------------------------------------------------------------

fn format_role(state: RoleState) -> String {
    let mut text = format!("{}@{}", state.role, state.term);
    if state.leader != NODE_NONE && state.role != Role::Leader {
        write!(text, " leader={}", state.leader).unwrap();
    }
    text
}

fn format_entry(entry: &Entry) -> String {
    match &entry.payload {
        EntryPayload::Blank => entry.id().to_string(),
        EntryPayload::Command(data) => format!("{}:{}", entry.id(), String::from_utf8_lossy(data)),
        EntryPayload::Membership(_) => format!("{}:conf", entry.id()),
    }
}

fn format_entries(entries: &[Entry]) -> String {
    let list: Vec<String> = entries.iter().map(format_entry).collect();
    format!("[{}]", list.join(" "))
}

fn format_batch(batch: &PersistBatch) -> String {
    let mut text = String::new();
    for chunk in &batch.snapshot_chunks {
        let len = chunk.data.len();
        let (last, offset, total) = (chunk.meta.last, chunk.offset, chunk.data_bytes);
        write!(text, " chunk={last}:{offset}+{len}/{total}").unwrap();
    }
    if let Some(install) = &batch.snapshot_install {
        write!(
            text,
            " install={} keep={}",
            install.meta.last, install.keep_through
        )
        .unwrap();
    }
    if let Some(index) = batch.compact_to {
        write!(text, " compact={index}").unwrap();
    }
    if !batch.entries.is_empty() {
        write!(text, " entries={}", format_entries(&batch.entries)).unwrap();
    }
    if let Some(hs) = batch.hard_state {
        write!(
            text,
            " term={} vote={} commit={}",
            hs.term, hs.vote, hs.commit
        )
        .unwrap();
    }
    text
}

fn format_message(msg: &Message) -> String {
    let mut text = format!("{}->{} {} t{}", msg.from, msg.to, msg.body.kind(), msg.term);
    let details = match &msg.body {
        MessageBody::Vote(vote) => {
            let transfer = if vote.leadership_transfer {
                " transfer"
            } else {
                ""
            };
            format!(" last={}{transfer}", vote.last_log)
        }
        MessageBody::VoteResponse(response) => {
            let verdict = if response.granted {
                "granted"
            } else {
                "rejected"
            };
            format!(" {verdict}")
        }
        MessageBody::Append(append) => format!(
            " prev={} commit={} {}",
            append.prev,
            append.commit,
            format_entries(&append.entries)
        ),
        MessageBody::AppendResponse(AppendResponse::Accepted { match_index }) => {
            format!(" match={match_index}")
        }
        MessageBody::AppendResponse(AppendResponse::Rejected {
            rejected_prev,
            hint,
        }) => format!(" reject={rejected_prev} hint={hint}"),
        MessageBody::Heartbeat(heartbeat) => {
            let mut text = format!(" commit={}", heartbeat.commit);
            if heartbeat.read_round > 0 {
                write!(text, " read={}", heartbeat.read_round).unwrap();
            }
            text
        }
        MessageBody::HeartbeatResponse(response) if response.read_round > 0 => {
            format!(" read={}", response.read_round)
        }
        MessageBody::HeartbeatResponse(_) | MessageBody::TimeoutNow => String::new(),
        MessageBody::Snapshot(chunk) => format!(
            " snap={} off={} len={}/{}",
            chunk.meta.last,
            chunk.offset,
            chunk.data.len(),
            chunk.data_bytes
        ),
        MessageBody::SnapshotResponse(response) => {
            let status = match response.status {
                SnapshotStatus::Received => "received",
                SnapshotStatus::Resend => "resend",
                SnapshotStatus::Installed => "installed",
            };
            format!(
                " snap={} next={} {status}",
                response.snapshot, response.next_offset
            )
        }
        MessageBody::ReadIndex(request) => format!(" ctx={}", request.context),
        MessageBody::ReadIndexResponse(response) => match response.index {
            Some(index) => format!(" ctx={} index={index}", response.context),
            None => format!(" ctx={} index=none", response.context),
        },
    };
    text.push_str(&details);
    text
}

// ----- The scripts --------------------------------------------------------------------------

macro_rules! transcripts {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_transcript(stringify!($name));
            }
        )*

        /// Every script in the directory has a test above, so none is silently skipped.
        #[test]
        fn every_script_is_run() {
            let listed: BTreeSet<String> = [$(stringify!($name)),*].iter().map(|s| s.to_string()).collect();
            let found: BTreeSet<String> = std::fs::read_dir(transcripts_dir())
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
                .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(found, listed, "scripts on disk vs. scripts listed in transcripts!");
        }
    };
}

transcripts!(
    checkquorum,
    joint_add_two,
    joint_leader_crash,
    joint_partition,
    learner,
    new_member_snapshot,
    prevote,
    read_index,
    remove_leader,
    removed_node,
    replace_all,
    smoke,
    snapshot,
    snapshot_abandon,
    snapshot_follower_log,
    snapshot_follower_restart,
    transfer,
);
