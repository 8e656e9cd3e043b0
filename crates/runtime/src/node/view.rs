//! A member's Raft state as a view of the cluster draws it: role, term, vote, the election
//! timer, the commit and apply indexes, the tail of the log and the messages sent so far.
//! The raft task builds it after each round only when the member runs with
//! `--experimental-raft-view` (`flotilla dev` turns it on); it is served as JSON on the
//! metrics listener, `/debug/raft` and, as server-sent events, `/debug/raft/events` (the
//! format is documented in `docs/raft-view.md`).

use std::collections::BTreeMap;

use flotilla_raft::{Message, NodeId};
use serde::Serialize;

use super::NodeDriver;

/// Entries of the log's tail in a view: enough to see an entry reach a majority and commit,
/// and a new leader overwrite a follower's uncommitted ones.
pub const LOG_TAIL_ENTRIES: u64 = 16;

/// One member's Raft state. Ids are hexadecimal, as etcd prints member ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RaftView {
    /// This member.
    pub member: String,
    /// `follower`, `pre-candidate`, `candidate` or `leader`.
    pub role: String,
    /// A learner replicates the log but does not vote (§6 as etcd extends it).
    pub learner: bool,
    /// The current term (§5.1).
    pub term: u64,
    /// Who this member voted for in `term`, if anyone (§5.2: one vote per term).
    pub vote: Option<String>,
    /// The leader of the current term, if known.
    pub leader: Option<String>,
    /// The highest index known committed (§5.3).
    pub commit: u64,
    /// The highest index applied to the state machine.
    pub applied: u64,
    /// The highest index made durable here.
    pub persisted: u64,
    /// The last index the newest snapshot covers (§7); the log starts after it.
    pub snapshot_index: u64,
    /// The last index of the log.
    pub last_index: u64,
    /// How long a tick is.
    pub tick_ms: u64,
    /// Ticks since the election timer was last reset.
    pub election_elapsed_ticks: u64,
    /// The timer fires when the elapsed ticks reach this, drawn at random from [T, 2T) at
    /// each reset (§5.2).
    pub election_timeout_ticks: u64,
    /// The newest entries, oldest first (at most [`LOG_TAIL_ENTRIES`]).
    pub log_tail: Vec<LogEntryView>,
    /// The voters (of the incoming configuration during a joint change).
    pub voters: Vec<String>,
    /// Voters of the outgoing configuration while a joint consensus change is under way (§6).
    pub voters_outgoing: Vec<String>,
    /// Members that replicate the log without voting.
    pub learners: Vec<String>,
    /// Messages this member has sent since it started, by receiver and kind.
    pub messages_sent: Vec<MessageCount>,
    /// The raft task has stopped.
    pub stopped: bool,
}

/// One entry of the log's tail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogEntryView {
    /// Its index.
    pub index: u64,
    /// The term of the leader that created it.
    pub term: u64,
}

/// Messages sent to one member, of one kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageCount {
    /// The receiver.
    pub to: String,
    /// The message's kind as the core names it (`Append`, `Heartbeat`, `PreVote`, ...).
    pub kind: &'static str,
    /// How many.
    pub count: u64,
}

/// The raft task's count of the messages it sent, by receiver and kind.
#[derive(Debug, Default)]
pub(crate) struct SentMessages {
    counts: BTreeMap<(NodeId, &'static str), u64>,
}

impl SentMessages {
    pub(crate) fn count(&mut self, msg: &Message) {
        *self.counts.entry((msg.to, msg.body.kind())).or_default() += 1;
    }
}

fn hex(id: NodeId) -> String {
    format!("{id:x}")
}

impl RaftView {
    pub(crate) fn of<O>(
        driver: &NodeDriver<O>,
        tick_ms: u64,
        sent: &SentMessages,
        stopped: bool,
    ) -> Self {
        let node = driver.node();
        let membership = node.membership();
        let ids =
            |set: &std::collections::BTreeSet<NodeId>| set.iter().map(|&id| hex(id)).collect();
        let last_index = node.last_id().index;
        let tail_first = last_index
            .saturating_sub(LOG_TAIL_ENTRIES - 1)
            .max(node.first_index());
        let log_tail = (tail_first..=last_index)
            .filter_map(|index| {
                let term = node.term_at(index).ok().flatten()?;
                Some(LogEntryView { index, term })
            })
            .collect();
        RaftView {
            member: hex(node.id()),
            role: node.role().to_string(),
            learner: membership.is_learner(node.id()),
            term: node.term(),
            vote: (node.vote() != flotilla_raft::NODE_NONE).then(|| hex(node.vote())),
            leader: node.leader().map(hex),
            commit: node.committed(),
            applied: node.applied(),
            persisted: node.persisted(),
            snapshot_index: node.snapshot_id().index,
            last_index,
            tick_ms,
            election_elapsed_ticks: node.election_elapsed_ticks(),
            election_timeout_ticks: node.election_timeout_ticks(),
            log_tail,
            voters: ids(&membership.voters),
            voters_outgoing: ids(&membership.voters_outgoing),
            learners: ids(&membership.learners),
            messages_sent: sent
                .counts
                .iter()
                .map(|(&(to, kind), &count)| MessageCount {
                    to: hex(to),
                    kind,
                    count,
                })
                .collect(),
            stopped,
        }
    }
}
