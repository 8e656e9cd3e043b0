//! Fault shapes the nemesis produces on purpose, because random faults almost never line up
//! into them, and each is what a broken safety rule needs in order to show.
//!
//! - **Figure 8** (§5.4.2): a leader replicates to a minority and crashes; a later leader of a
//!   higher term writes the same index alone and crashes; the first comes back, leads a third
//!   term, and crashes the moment its commit index advances; the second comes back. A leader
//!   that counted replicas of an earlier-term entry has by then committed an entry the second
//!   one overwrites.
//! - **Crash at the vote** (§5.2, Figure 2's "persistent state"): a node grants its vote and
//!   loses power at once; it restarts at once, the candidate's messages to it are lost for a
//!   while, and a rival candidate of the same term asks it. A node that answered before its vote was durable votes twice in one term.
//! - **A deposed leader that does not know it** (thesis §6.2, leases): the leader is cut off
//!   alone while clients still reach it, and a follower campaigns as soon as the followers'
//!   election timeouts allow, so a new leader takes over while the old one, whose check-quorum
//!   has not yet failed, still answers keep-alives for up to an election timeout. The new
//!   leader's lease clock must cover every renewal the old one granted.
//!
//! Each step is a legitimate fault (a crash, a partition, a timer firing, a burst of writes):
//! with the rules kept, nothing here can break safety.

use flotilla_raft::{Index, Message, MessageBody, NodeId, Role, Term, VoteResponse};

use super::{Application, Event, NodeState, Phase, SimNode, Simulation, Waiter};
use crate::options::TICK_TIME;
use crate::storage::SimStorage;

/// The Figure 8 episode in progress: which step it is at, and who plays which part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Figure8 {
    /// `old` leads, cut off with a minority, and takes a burst of writes; it crashes at the
    /// next step.
    Isolated { old: NodeId },
    /// `old` is down; the next node to win an election is cut off the moment it wins.
    AwaitRival { old: NodeId },
    /// `rival` leads alone (its blank entry stays on it); it crashes at the next step, and
    /// `old` restarts.
    RivalIsolated { old: NodeId, rival: NodeId },
    /// `old` is back. Once it leads (`led_from` is its commit index then), it crashes as soon
    /// as its commit index advances; then `rival` restarts.
    AwaitOldCommit {
        old: NodeId,
        rival: NodeId,
        led_from: Option<Index>,
    },
}

/// The longest a step waits for an election before the episode is abandoned.
const STEP_TIMEOUT_TIME: u64 = 150 * TICK_TIME;

impl<S: SimStorage, A: Application<S>> Simulation<S, A> {
    /// The current leader and the voters of its configuration.
    fn leader_and_voters(&self) -> Option<(NodeId, Vec<NodeId>)> {
        let leader = self.leader_id()?;
        let node = self.nodes[&leader].running().expect("the leader runs");
        Some((leader, node.membership().voters.iter().copied().collect()))
    }

    /// Starts a Figure 8 episode on the current leader, if there is one.
    pub(super) fn nemesis_figure8(&mut self) {
        let Some((old, voters)) = self.leader_and_voters() else {
            return;
        };
        if voters.len() < 3 || !voters.contains(&old) {
            return;
        }
        // The old leader's side: itself and partners, one short of a majority.
        let partners = (voters.len() - 1) / 2 - 1;
        let side: Vec<NodeId> = std::iter::once(old)
            .chain(
                voters
                    .iter()
                    .copied()
                    .filter(|&id| id != old)
                    .take(partners),
            )
            .collect();
        self.isolate(&side);
        // A burst of writes the old leader can only replicate to its side: several, and big
        // enough that catching another node up later takes more than one message.
        let writes = self.prng.range(4, 24);
        for _ in 0..writes {
            let size = self.prng.range(64, 512) as usize;
            let command = self.app.internal_command(size);
            let driver = self
                .nodes
                .get_mut(&old)
                .and_then(SimNode::driver_mut)
                .expect("the leader runs");
            if driver.propose(command, Waiter::Internal).is_err() {
                break;
            }
        }
        self.trace.record(&[30, old, side.len() as u64, writes]);
        self.say(format_args!(
            "figure 8: n{old} leads cut off with {side:?}, {writes} writes"
        ));
        self.figure8 = Some(Figure8::Isolated { old });
        self.process(old);
        let delay = self.prng.range(2 * TICK_TIME, 8 * TICK_TIME);
        self.schedule_figure8_step(delay);
    }

    /// Cuts `side` off from every other node (both directions).
    fn isolate(&mut self, side: &[NodeId]) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.cut.clear();
        for &a in side {
            for &b in &ids {
                if !side.contains(&b) {
                    self.cut.insert((a, b));
                    self.cut.insert((b, a));
                }
            }
        }
        // A partition the nemesis scheduled to heal must not heal this one.
        self.partition_generation += 1;
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.partition_generation += 1;
    }

    fn schedule_figure8_step(&mut self, delay: u64) {
        self.figure8_generation += 1;
        let generation = self.figure8_generation;
        self.schedule(delay, Event::Figure8Step { generation });
    }

    /// The timed steps of the episode (and its timeouts).
    pub(super) fn figure8_step(&mut self, generation: u64) {
        if generation != self.figure8_generation || self.phase != Phase::Faults {
            return;
        }
        match self.figure8 {
            Some(Figure8::Isolated { old }) => {
                self.crash(old);
                self.heal();
                self.trace.record(&[31, old]);
                self.say(format_args!("figure 8: n{old} crashed"));
                self.figure8 = Some(Figure8::AwaitRival { old });
                self.schedule_figure8_step(STEP_TIMEOUT_TIME);
            }
            Some(Figure8::RivalIsolated { old, rival }) => {
                self.crash(rival);
                self.heal();
                self.trace.record(&[32, rival]);
                self.say(format_args!("figure 8: n{rival} crashed, n{old} restarts"));
                self.figure8 = Some(Figure8::AwaitOldCommit {
                    old,
                    rival,
                    led_from: None,
                });
                self.restart(old);
                self.schedule_figure8_step(STEP_TIMEOUT_TIME);
            }
            // A timeout: the election the step waited for did not come.
            Some(Figure8::AwaitRival { .. } | Figure8::AwaitOldCommit { .. }) => {
                self.end_figure8();
            }
            None => {}
        }
    }

    /// Called after a node's output is carried out: the steps that wait for an election or a
    /// commit happen the moment it is seen.
    pub(super) fn figure8_observe(&mut self, id: NodeId) {
        let Some(episode) = self.figure8 else {
            return;
        };
        let Some(node) = self.nodes.get(&id).and_then(SimNode::running) else {
            return;
        };
        let leads = node.role() == Role::Leader;
        let committed = node.committed();
        match episode {
            Figure8::AwaitRival { old } if leads && id != old => {
                // Cut off before its blank entry is delivered anywhere.
                self.isolate(&[id]);
                self.trace.record(&[33, id]);
                self.say(format_args!("figure 8: n{id} leads, cut off alone"));
                self.figure8 = Some(Figure8::RivalIsolated { old, rival: id });
                let delay = self.prng.range(TICK_TIME, 6 * TICK_TIME);
                self.schedule_figure8_step(delay);
            }
            Figure8::AwaitOldCommit {
                old,
                rival,
                led_from: None,
            } if leads && id == old => {
                self.figure8 = Some(Figure8::AwaitOldCommit {
                    old,
                    rival,
                    led_from: Some(committed),
                });
            }
            Figure8::AwaitOldCommit {
                old,
                rival,
                led_from: Some(_),
            } if id == old && !leads => {
                // It lost the lead before committing: wait for it to lead again.
                self.figure8 = Some(Figure8::AwaitOldCommit {
                    old,
                    rival,
                    led_from: None,
                });
            }
            Figure8::AwaitOldCommit {
                old,
                rival,
                led_from: Some(from),
            } if id == old && committed > from => {
                self.crash(old);
                self.trace.record(&[34, old, committed]);
                self.say(format_args!(
                    "figure 8: n{old} crashed at commit {committed}, n{rival} restarts"
                ));
                let delay = self.prng.range(100, 500);
                self.schedule(delay, Event::Restart { node: old });
                self.figure8 = None;
                self.restart(rival);
            }
            _ => {}
        }
    }

    /// Abandons the episode: every node it crashed comes back, every cut heals.
    pub(super) fn end_figure8(&mut self) {
        let Some(episode) = self.figure8.take() else {
            return;
        };
        self.heal();
        let crashed: Vec<NodeId> = match episode {
            Figure8::Isolated { .. } => vec![],
            Figure8::AwaitRival { old } => vec![old],
            Figure8::RivalIsolated { old, .. } => vec![old],
            Figure8::AwaitOldCommit { old, rival, .. } => vec![old, rival],
        };
        self.trace.record(&[35, crashed.len() as u64]);
        self.say(format_args!("figure 8: abandoned at {episode:?}"));
        for id in crashed {
            if matches!(
                self.nodes.get(&id).map(|n| &n.state),
                Some(NodeState::Crashed { .. })
            ) {
                self.restart(id);
            }
        }
    }

    /// After a node sent messages: if one is a real vote it granted, sometimes it loses power
    /// at once, comes back at once, and a rival candidate of the vote's term asks it next.
    /// Returns true if the node crashed.
    pub(super) fn maybe_crash_at_vote(&mut self, id: NodeId, sent: &[Message]) -> bool {
        if !self.options.crashes || self.phase != Phase::Faults || self.figure8.is_some() {
            return false;
        }
        let Some(vote) = sent.iter().find(|msg| {
            msg.to != id
                && matches!(
                    msg.body,
                    MessageBody::VoteResponse(VoteResponse {
                        pre_vote: false,
                        granted: true,
                    })
                )
        }) else {
            return false;
        };
        if !self.prng.chance(1, 3) {
            return false;
        }
        let (candidate, term) = (vote.to, vote.term);
        let rivals = self.rival_candidates(id, candidate, term);
        self.crash(id);
        let restart = self.prng.range(1, TICK_TIME);
        self.schedule(restart, Event::Restart { node: id });
        // For a while the candidate's messages do not reach the voter (a one-way partition):
        // the voter, back up, hears a rival before it hears who won.
        if self.cut.insert((candidate, id)) {
            let reconnect = self.prng.range(10 * TICK_TIME, 30 * TICK_TIME);
            let (from, to) = (candidate, id);
            self.schedule(reconnect, Event::Reconnect { from, to });
        }
        self.trace.record(&[36, id, candidate, term]);
        self.say(format_args!(
            "crash at the vote: n{id} voted for n{candidate} in term {term}, rivals {rivals:?}"
        ));
        if rivals.is_empty() {
            return true;
        }
        let rival = rivals[self.prng.range(0, rivals.len() as u64) as usize];
        let incarnation = self.nodes[&rival].incarnation;
        let delay = restart + self.prng.range(0, 2 * TICK_TIME);
        self.schedule(
            delay,
            Event::Campaign {
                node: rival,
                incarnation,
            },
        );
        true
    }

    /// Cuts the leader off alone and has a follower campaign one election timeout (and a tick)
    /// later; heals a few election timeouts after that.
    pub(super) fn nemesis_deposed_leader(&mut self) {
        let Some((old, voters)) = self.leader_and_voters() else {
            return;
        };
        let voters: Vec<NodeId> = voters
            .into_iter()
            .filter(|&id| id != old && self.nodes.get(&id).is_some_and(|n| n.running().is_some()))
            .collect();
        if voters.is_empty() {
            return;
        }
        self.isolate(&[old]);
        let heal = self.partition_generation;
        let rival = voters[self.prng.range(0, voters.len() as u64) as usize];
        let incarnation = self.nodes[&rival].incarnation;
        let timeout = super::ELECTION_TIMEOUT_TICKS * TICK_TIME;
        let delay = timeout + self.prng.range(TICK_TIME, 3 * TICK_TIME);
        self.schedule(
            delay,
            Event::Campaign {
                node: rival,
                incarnation,
            },
        );
        self.schedule(
            delay + 3 * timeout,
            Event::HealPartition { generation: heal },
        );
        self.trace.record(&[38, old, rival]);
        self.say(format_args!(
            "deposed leader: n{old} cut off alone, n{rival} campaigns at +{delay}"
        ));
    }

    /// Running voters other than the voter and its candidate that have not yet heard of
    /// `term`: an election they start now is for that very term.
    fn rival_candidates(&self, voter: NodeId, candidate: NodeId, term: Term) -> Vec<NodeId> {
        let Some(node) = self.nodes.get(&voter).and_then(SimNode::running) else {
            return Vec::new();
        };
        node.membership()
            .voters
            .iter()
            .copied()
            .filter(|&other| other != voter && other != candidate)
            .filter(|other| {
                self.nodes
                    .get(other)
                    .and_then(SimNode::running)
                    .is_some_and(|n| n.term() + 1 == term && n.role() != Role::Leader)
            })
            .collect()
    }

    /// Prints a line about an episode when replaying verbosely.
    fn say(&self, line: std::fmt::Arguments<'_>) {
        if self.options.verbose {
            println!("{:>6} {line}", self.now);
        }
    }

    /// A node's election timer fires now (the rival of a crash at the vote).
    pub(super) fn campaign(&mut self, id: NodeId, incarnation: u64) {
        let Some(sim_node) = self.nodes.get_mut(&id) else {
            return;
        };
        if sim_node.incarnation != incarnation {
            return;
        }
        let Some(driver) = sim_node.driver_mut() else {
            return;
        };
        if let Err(err) = driver.campaign() {
            return self.core_failed(id, err);
        }
        self.trace.record(&[37, id]);
        self.process(id);
    }
}
