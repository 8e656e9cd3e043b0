//! Leader election (§5.2), the election restriction (§5.4.1) and pre-vote (thesis §9.6).

use std::collections::BTreeMap;

use super::{CampaignKind, LeaderState, RaftNode, RoleData};
use crate::error::Error;
use crate::message::{Message, MessageBody, VoteRequest, VoteResponse};
use crate::progress::Progress;
use crate::quorum::{self, VoteResult};
use crate::storage::LogStorage;
use crate::types::{Entry, EntryPayload, NODE_NONE, NodeId};

impl<S: LogStorage> RaftNode<S> {
    /// True if this node may campaign: it votes in the configuration in force.
    pub(crate) fn is_promotable(&self) -> bool {
        self.log.membership().is_voter(self.id())
    }

    /// A follower or candidate counts towards its election timeout.
    pub(crate) fn tick_election(&mut self) -> Result<(), Error> {
        self.election_elapsed_ticks += 1;
        if self.is_promotable()
            && self.election_elapsed_ticks >= self.election_timeout_randomized_ticks
        {
            self.election_elapsed_ticks = 0;
            let kind = if self.config.pre_vote {
                CampaignKind::PreElection
            } else {
                CampaignKind::Election
            };
            self.campaign_with(kind);
        }
        Ok(())
    }

    pub(crate) fn campaign_with(&mut self, kind: CampaignKind) {
        if !self.is_promotable() {
            return;
        }
        let request_term = match kind {
            CampaignKind::PreElection => {
                self.become_pre_candidate();
                self.term + 1
            }
            CampaignKind::Election | CampaignKind::Transfer => {
                self.become_candidate();
                self.term
            }
        };
        let pre_vote = kind == CampaignKind::PreElection;
        let request = VoteRequest {
            pre_vote,
            last_log: self.log.last_id(),
            leadership_transfer: kind == CampaignKind::Transfer,
        };
        let id = self.id();
        let voters = self.log.membership().members();
        for to in voters.into_iter().filter(|&member| member != id) {
            if !self.log.membership().is_voter(to) {
                continue;
            }
            let msg = Message {
                from: self.id(),
                to,
                term: request_term,
                body: MessageBody::Vote(request),
            };
            self.messages.push(msg);
        }
        if pre_vote {
            // The pre-candidate's own vote needs no persistence: nothing changed.
            self.tally_vote(self.id(), true, true);
        } else {
            // The candidate's own vote counts only once the vote is durable: a node that
            // crashed before recording it could otherwise vote again in the same term.
            let body = MessageBody::VoteResponse(VoteResponse {
                pre_vote: false,
                granted: true,
            });
            self.send_after_persist(self.id(), body);
        }
    }

    fn become_pre_candidate(&mut self) {
        assert!(!self.is_leader(), "a leader does not become pre-candidate");
        // A pre-candidate keeps its term and vote (thesis §9.6); it forgets the leader, whom it
        // evidently stopped hearing from.
        self.role = RoleData::PreCandidate {
            votes: BTreeMap::new(),
        };
        self.leader = NODE_NONE;
        self.fail_forwarded_reads();
    }

    fn become_candidate(&mut self) {
        assert!(!self.is_leader(), "a leader does not become candidate");
        self.fail_forwarded_reads();
        self.reset(self.term + 1);
        self.vote = self.id();
        self.role = RoleData::Candidate {
            votes: BTreeMap::new(),
        };
    }

    pub(crate) fn become_leader(&mut self) {
        assert!(
            matches!(self.role, RoleData::Candidate { .. }),
            "only a candidate becomes leader"
        );
        self.reset(self.term);
        self.leader = self.id();
        let last_index = self.log.last_index();
        let mut leader = LeaderState {
            progress: Default::default(),
            send_pending: Default::default(),
            heartbeat_pending: false,
            transfer: None,
            uncommitted_bytes: 0,
            term_start_index: last_index + 1,
            reads: Default::default(),
            read_round: 0,
            lease_rounds: Default::default(),
            lease_sent_tick: None,
            lease_revoked: false,
        };
        for id in self.log.membership().members() {
            leader.progress.insert(id, Progress::new(last_index + 1));
        }
        let own = leader
            .progress
            .entry(self.id())
            .or_insert_with(|| Progress::new(last_index + 1));
        own.match_index = self.log.persisted();
        own.recent_active = true;
        self.role = RoleData::Leader(Box::new(leader));
        // §5.4.2 and §8: append a blank entry of the new term, so that entries of earlier terms
        // commit as soon as it does, and reads learn the commit index.
        let blank = Entry {
            term: self.term,
            index: last_index + 1,
            payload: EntryPayload::Blank,
        };
        self.leader_append(vec![blank]);
    }

    /// RequestVote, pre-vote or real, handled the same way in every role (§5.2, §5.4.1).
    pub(crate) fn handle_vote_request(&mut self, msg: &Message, request: VoteRequest) {
        // A real vote goes to whoever asked first in a term; a node that knows a leader of the
        // term votes for no one else. A pre-vote for a later term asks only "would you?".
        let can_vote = self.vote == msg.from
            || (self.vote == NODE_NONE && self.leader == NODE_NONE)
            || (request.pre_vote && msg.term > self.term);
        let granted = can_vote && self.log.is_up_to_date(request.last_log);
        let response = VoteResponse {
            pre_vote: request.pre_vote,
            granted,
        };
        if request.pre_vote {
            // A granted pre-vote answers in the term asked about, so that the pre-candidate
            // does not take it for stale; a refusal answers in ours, so it can catch up.
            let term = if granted { msg.term } else { self.term };
            let body = MessageBody::VoteResponse(response);
            self.messages.push(Message {
                from: self.id(),
                to: msg.from,
                term,
                body,
            });
            return;
        }
        if granted {
            self.vote = msg.from;
            self.election_elapsed_ticks = 0;
        }
        // The vote must be durable before the candidate hears of it.
        self.send_after_persist(msg.from, MessageBody::VoteResponse(response));
    }

    /// The step function of candidates and pre-candidates.
    pub(crate) fn step_candidate(&mut self, msg: Message) -> Result<(), Error> {
        match msg.body {
            MessageBody::VoteResponse(response) => {
                let pre_candidate = matches!(self.role, RoleData::PreCandidate { .. });
                if response.pre_vote == pre_candidate {
                    self.tally_vote(msg.from, response.granted, response.pre_vote);
                }
                Ok(())
            }
            // A leader of this term exists (§5.2: "if the AppendEntries RPC is from a leader
            // whose term is at least as large as the candidate's, it returns to follower").
            MessageBody::Append(_) | MessageBody::Heartbeat(_) | MessageBody::Snapshot(_) => {
                self.become_follower(msg.term, msg.from);
                self.step_follower(msg)
            }
            MessageBody::ReadIndex(request) => {
                self.refuse_remote_read(msg.from, request.context);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records a vote and acts on the result.
    fn tally_vote(&mut self, from: NodeId, granted: bool, pre_vote: bool) {
        let membership = self.log.membership().clone();
        let votes = match &mut self.role {
            RoleData::PreCandidate { votes } if pre_vote => votes,
            RoleData::Candidate { votes } if !pre_vote => votes,
            _ => return,
        };
        votes.entry(from).or_insert(granted);
        match quorum::vote_result(&membership, votes) {
            VoteResult::Pending => {}
            VoteResult::Won if pre_vote => self.campaign_with(CampaignKind::Election),
            VoteResult::Won => self.become_leader(),
            VoteResult::Lost => self.become_follower(self.term, NODE_NONE),
        }
    }
}
