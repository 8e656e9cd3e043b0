//! Linearizable reads with ReadIndex (thesis §6.4).
//!
//! The leader records its commit index as the read index, confirms that it is still the leader
//! by a round of heartbeats acknowledged by a quorum, and releases the read once the state
//! machine has applied up to the read index. A new leader first waits until the blank entry of
//! its term commits: before that its commit index may lag the true one. Reads arriving while a
//! round is pending share it, so a burst of reads costs one heartbeat round. A follower asks
//! the leader for a read index and waits for its own state machine to reach it.
//!
//! With [`crate::Config::lease_reads`], every heartbeat is a round, and a leader whose round
//! sent at tick `s` a quorum acknowledged holds a lease until tick `s + T - 2` (thesis §6.4.1):
//! each voter of that quorum received the round after `s` and ignores elections for at least
//! `T - 1` tick intervals after that, so no other leader can be elected before then. Within
//! the lease the leader's commit index is a read index without a round.

use super::{RaftNode, RoleData};
use crate::error::Error;
use crate::message::{MessageBody, ReadIndexRequest, ReadIndexResponse};
use crate::output::{ReadFailure, ReadState};
use crate::quorum;
use crate::storage::LogStorage;
use crate::types::{Index, NodeId};

/// Lease rounds remembered while awaiting their acknowledgement. One is sent per heartbeat
/// interval (and per burst of reads); rounds older than an election timeout are useless.
pub(crate) const LEASE_ROUNDS_MAX: usize = 64;

/// What a leader's lease allows, from [`RaftNode::lease_read_index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRead {
    /// A read index: the state machine may answer once it has applied this far.
    pub index: Index,
    /// The tick (of [`RaftNode::ticks`]) at which the acknowledged round was sent. A caller
    /// measuring real time should count the lease from when its clock read that tick, and end
    /// it `election_timeout_ticks - 1` tick intervals later, less a margin for clock drift.
    pub sent_tick: u64,
    /// The last tick at which the lease holds in logical time.
    pub expires_tick: u64,
}

/// Who asked for a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadOrigin {
    Local,
    Remote(NodeId),
}

/// A read waiting at the leader for its round to be confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingRead {
    pub origin: ReadOrigin,
    pub context: u64,
    /// The commit index when the read was accepted; 0 until the leader's first commit.
    pub index: Index,
    /// The heartbeat round that confirms it; 0 until the leader's first commit.
    pub round: u64,
}

impl<S: LogStorage> RaftNode<S> {
    /// Requests a linearizable read. `context` is the caller's id for the read, unique among
    /// its reads in flight; the read comes back in [`crate::Output::reads`] (or
    /// [`crate::Output::reads_failed`]) with it.
    pub fn read_index(&mut self, context: u64) -> Result<(), Error> {
        self.check_fatal()?;
        match &self.role {
            RoleData::Leader(_) => self.leader_read_index(ReadOrigin::Local, context),
            RoleData::Follower if self.leader != crate::types::NODE_NONE => {
                if self.reads_forwarded.len() >= self.config.read_queue_max {
                    return Err(Error::ReadQueueFull {
                        limit: self.config.read_queue_max,
                    });
                }
                self.reads_forwarded.insert(context);
                let expires_at = self.ticks + self.config.election_timeout_ticks;
                self.reads_forwarded_expiry.push_back((expires_at, context));
                self.send(
                    self.leader,
                    MessageBody::ReadIndex(ReadIndexRequest { context }),
                );
                Ok(())
            }
            _ => Err(Error::NotLeader {
                leader_hint: self.leader(),
            }),
        }
    }

    pub(crate) fn leader_read_index(
        &mut self,
        origin: ReadOrigin,
        context: u64,
    ) -> Result<(), Error> {
        let committed = self.log.committed();
        let limit = self.config.read_queue_max;
        let leader = self.leader_state_mut();
        if leader.reads.len() >= limit {
            return match origin {
                ReadOrigin::Local => Err(Error::ReadQueueFull { limit }),
                ReadOrigin::Remote(from) => {
                    self.refuse_remote_read(from, context);
                    Ok(())
                }
            };
        }
        let committed_in_term = committed >= leader.term_start_index;
        let (index, round) = if committed_in_term {
            (committed, leader.read_round + 1)
        } else {
            (0, 0)
        };
        leader.reads.push_back(PendingRead {
            origin,
            context,
            index,
            round,
        });
        leader.heartbeat_pending |= committed_in_term;
        Ok(())
    }

    /// The leader's blank entry committed: reads that waited for it get the commit index and
    /// the next round.
    pub(crate) fn assign_waiting_reads(&mut self) {
        let committed = self.log.committed();
        let leader = self.leader_state_mut();
        if committed < leader.term_start_index {
            return;
        }
        let next_round = leader.read_round + 1;
        for read in leader.reads.iter_mut().filter(|read| read.round == 0) {
            read.index = committed;
            read.round = next_round;
            leader.heartbeat_pending = true;
        }
    }

    /// A read index the leader may serve without a heartbeat round, if lease reads are on and
    /// its lease holds at the current tick: it is the leader, its term's first entry has
    /// committed, a quorum acknowledged a round sent within the last `T - 2` ticks, and it has
    /// sent no TimeoutNow in this term.
    pub fn lease_read_index(&self) -> Option<LeaseRead> {
        if !self.config.lease_reads {
            return None;
        }
        let RoleData::Leader(leader) = &self.role else {
            return None;
        };
        let committed = self.log.committed();
        if leader.lease_revoked || committed < leader.term_start_index {
            return None;
        }
        let sent_tick = leader.lease_sent_tick?;
        let expires_tick = sent_tick + self.config.election_timeout_ticks - 2;
        (self.ticks <= expires_tick).then_some(LeaseRead {
            index: committed,
            sent_tick,
            expires_tick,
        })
    }

    /// Releases every read whose round a quorum has acknowledged, and extends the lease to the
    /// latest such round.
    pub(crate) fn release_confirmed_reads(&mut self) {
        let id = self.id();
        let leader = self.leader_state();
        if leader.reads.is_empty() && leader.lease_rounds.is_empty() {
            return;
        }
        let confirmed = quorum::committed_index(self.log.membership(), |member| {
            if member == id {
                leader.read_round
            } else {
                leader
                    .progress
                    .get(&member)
                    .map(|pr| pr.read_round_acked)
                    .unwrap_or(0)
            }
        });
        let leader = self.leader_state_mut();
        while let Some(&(round, sent_tick)) = leader.lease_rounds.front() {
            if round > confirmed {
                break;
            }
            leader.lease_rounds.pop_front();
            leader.lease_sent_tick = leader.lease_sent_tick.max(Some(sent_tick));
        }
        let (ready, waiting): (std::collections::VecDeque<PendingRead>, _) = leader
            .reads
            .drain(..)
            .partition(|read| read.round != 0 && read.round <= confirmed);
        leader.reads = waiting;
        for read in ready {
            match read.origin {
                ReadOrigin::Local => self.reads_waiting_apply.push_back(ReadState {
                    context: read.context,
                    index: read.index,
                }),
                ReadOrigin::Remote(from) => {
                    let response = ReadIndexResponse {
                        context: read.context,
                        index: Some(read.index),
                    };
                    self.send(from, MessageBody::ReadIndexResponse(response));
                }
            }
        }
    }

    pub(crate) fn fail_read(&mut self, read: PendingRead) {
        match read.origin {
            ReadOrigin::Local => self
                .reads_failed
                .push((read.context, ReadFailure::LeadershipLost)),
            ReadOrigin::Remote(from) => self.refuse_remote_read(from, read.context),
        }
    }

    pub(crate) fn refuse_remote_read(&mut self, from: NodeId, context: u64) {
        let response = ReadIndexResponse {
            context,
            index: None,
        };
        self.send(from, MessageBody::ReadIndexResponse(response));
    }

    /// The leader changed or is unknown: reads forwarded to the old one may never be answered.
    pub(crate) fn fail_forwarded_reads(&mut self) {
        for context in std::mem::take(&mut self.reads_forwarded) {
            self.reads_failed
                .push((context, ReadFailure::LeadershipLost));
        }
        self.reads_forwarded_expiry.clear();
    }

    /// Fails forwarded reads the leader has not answered within an election timeout: the
    /// request or the answer was lost. The caller may retry.
    pub(crate) fn expire_forwarded_reads(&mut self) {
        while let Some(&(expires_at, context)) = self.reads_forwarded_expiry.front() {
            if expires_at > self.ticks {
                return;
            }
            self.reads_forwarded_expiry.pop_front();
            if self.reads_forwarded.remove(&context) {
                self.reads_failed.push((context, ReadFailure::TimedOut));
            }
        }
    }

    pub(crate) fn handle_read_index_response(&mut self, response: ReadIndexResponse) {
        if !self.reads_forwarded.remove(&response.context) {
            return;
        }
        match response.index {
            Some(index) => self.reads_waiting_apply.push_back(ReadState {
                context: response.context,
                index,
            }),
            None => self
                .reads_failed
                .push((response.context, ReadFailure::LeadershipLost)),
        }
    }

    pub(crate) fn take_ready_reads(&mut self) -> Vec<ReadState> {
        let applied = self.log.applied();
        let (ready, waiting): (std::collections::VecDeque<ReadState>, _) = self
            .reads_waiting_apply
            .drain(..)
            .partition(|read| read.index <= applied);
        self.reads_waiting_apply = waiting;
        ready.into()
    }
}
