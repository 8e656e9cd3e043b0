//! Membership change by joint consensus (§6) and leadership transfer (thesis §3.10).
//!
//! A configuration takes effect on a node as soon as its entry is in the node's log, committed
//! or not (§6); if that entry is truncated, the previous configuration is back in force (the
//! log tracks them). The leader allows one change at a time: the next may start only once the
//! newest configuration is committed and simple. When a joint configuration commits, the leader
//! appends the final one by itself; when the final one commits and the leader is not in it, the
//! leader hands over to the most up-to-date voter and steps down.

use super::{CampaignKind, RaftNode, RoleData, Transfer};
use crate::error::Error;
use crate::membership::{ConfChange, ConfChangeStep, MembershipEntry};
use crate::message::MessageBody;
use crate::progress::ProgressState;
use crate::storage::LogStorage;
use crate::types::{EntryId, EntryPayload, NODE_NONE, NodeId};

impl<S: LogStorage> RaftNode<S> {
    /// Proposes a membership change. Any set of additions, promotions and removals is made in
    /// one joint-consensus round; a change of learners only takes effect directly.
    ///
    /// Refused if this node is not the leader, if a change is still in progress, if the change
    /// is invalid for the current configuration, or if it promotes a learner that is more than
    /// `promotion_lag_entries_max` entries behind.
    pub fn propose_membership(&mut self, change: ConfChange) -> Result<EntryId, Error> {
        self.check_fatal()?;
        if !self.is_leader() {
            return Err(Error::NotLeader {
                leader_hint: self.leader(),
            });
        }
        let membership_index = self.log.membership_index();
        if membership_index > self.log.committed() || self.log.membership().is_joint() {
            return Err(Error::MembershipChangeInProgress {
                index: membership_index,
            });
        }
        let next = self.log.membership().apply_change(&change)?;
        for step in &change.steps {
            if let ConfChangeStep::Promote(id) = *step {
                self.check_learner_caught_up(id)?;
            }
        }
        let entry = MembershipEntry {
            membership: next,
            context: change.context,
        };
        self.propose_entry(EntryPayload::Membership(entry))
    }

    fn check_learner_caught_up(&self, id: NodeId) -> Result<(), Error> {
        let last_index = self.log.last_index();
        let match_index = self
            .leader_state()
            .progress
            .get(&id)
            .map(|pr| pr.match_index)
            .unwrap_or(0);
        let lag_entries = last_index - match_index;
        let limit_entries = self.config.promotion_lag_entries_max;
        if lag_entries > limit_entries {
            return Err(Error::LearnerBehind {
                id,
                lag_entries,
                limit_entries,
            });
        }
        Ok(())
    }

    /// The leader's reaction to a higher commit index.
    pub(crate) fn leader_commit_advanced(&mut self) -> Result<(), Error> {
        self.assign_waiting_reads();
        if self.log.membership_index() > self.log.committed() {
            return Ok(());
        }
        let membership = self.log.membership().clone();
        if membership.is_joint() {
            // C_old,new is committed: move on to C_new (§6).
            let entry = MembershipEntry {
                membership: membership.leave_joint(),
                context: Default::default(),
            };
            let entry = crate::types::Entry {
                term: self.term,
                index: self.log.last_index() + 1,
                payload: EntryPayload::Membership(entry),
            };
            self.leader_append(vec![entry]);
        } else if !membership.is_voter(self.id()) {
            // C_new is committed and excludes this leader: hand over and step down.
            self.step_down_removed();
        }
        Ok(())
    }

    fn step_down_removed(&mut self) {
        let last_index = self.log.last_index();
        let membership = self.log.membership().clone();
        let successor = self
            .leader_state()
            .progress
            .iter()
            .filter(|(id, pr)| membership.voters.contains(id) && pr.match_index == last_index)
            .map(|(&id, _)| id)
            .next();
        if let Some(successor) = successor {
            self.send(successor, MessageBody::TimeoutNow);
        }
        self.become_follower(self.term, NODE_NONE);
    }

    /// Moves leadership to `target` (thesis §3.10): bring it up to date, then tell it to start
    /// an election at once. Proposals are refused meanwhile; the transfer is abandoned after an
    /// election timeout.
    pub fn transfer_leader(&mut self, target: NodeId) -> Result<(), Error> {
        self.check_fatal()?;
        if !self.is_leader() {
            return Err(Error::NotLeader {
                leader_hint: self.leader(),
            });
        }
        if target == self.id() {
            return Ok(());
        }
        if !self.log.membership().voters.contains(&target) {
            return Err(Error::NotAVoter(target));
        }
        let leader = self.leader_state_mut();
        if leader
            .transfer
            .is_some_and(|transfer| transfer.target == target)
        {
            return Ok(());
        }
        leader.transfer = Some(Transfer {
            target,
            timeout_now_sent: false,
        });
        leader.send_pending.insert(target);
        self.election_elapsed_ticks = 0;
        let last_index = self.log.last_index();
        let pr = self
            .leader_state_mut()
            .progress
            .get_mut(&target)
            .expect("a voter has progress");
        if pr.match_index == last_index {
            self.maybe_send_timeout_now(target);
        } else if !matches!(pr.state, ProgressState::Snapshot(_)) {
            // Appends or a probe in flight to the target may have been lost, and noticing that
            // from heartbeats can take longer than the transfer may last: probe from its match
            // now, so that the target catches up within the transfer's election timeout.
            pr.become_probe();
        }
        Ok(())
    }

    /// Sends TimeoutNow to the transfer target once it matches the whole log.
    pub(crate) fn maybe_send_timeout_now(&mut self, from: NodeId) {
        let leader = self.leader_state_mut();
        let Some(transfer) = &mut leader.transfer else {
            return;
        };
        if transfer.target != from || transfer.timeout_now_sent {
            return;
        }
        transfer.timeout_now_sent = true;
        // The target's election will ignore the followers' leases: stop lease reads first.
        leader.lease_revoked = true;
        self.send(from, MessageBody::TimeoutNow);
    }

    pub(crate) fn handle_timeout_now(&mut self, from: NodeId) {
        if from != self.leader || !self.is_promotable() {
            return;
        }
        self.campaign_with(CampaignKind::Transfer);
    }

    /// The caller could not deliver a message to `to` (the connection broke). The leader stops
    /// streaming to it and probes again.
    pub fn report_unreachable(&mut self, to: NodeId) {
        let RoleData::Leader(leader) = &mut self.role else {
            return;
        };
        let Some(pr) = leader.progress.get_mut(&to) else {
            return;
        };
        match &mut pr.state {
            ProgressState::Replicate => pr.become_probe(),
            ProgressState::Snapshot(transfer) => {
                transfer.sent_offset = transfer.acked_offset;
                transfer.sent_last = false;
            }
            ProgressState::Probe => pr.probe_sent = false,
        }
    }
}
