//! Log replication (§5.3) and the commit rule (§5.4.2): the leader's side (proposals, appends,
//! flow control, check-quorum) and the follower's side (the consistency check).

use super::reads::LEASE_ROUNDS_MAX;
use super::{LeaderState, RaftNode, RoleData};
use crate::error::Error;
use crate::message::{
    AppendRequest, AppendResponse, Heartbeat, HeartbeatResponse, Message, MessageBody,
};
use crate::progress::{Progress, ProgressState};
use crate::quorum;
use crate::storage::{LogStorage, StorageError};
use crate::types::{Entry, EntryId, EntryPayload, Index, NODE_NONE, NodeId};

/// How many heartbeat answers without progress mark a stream of appends as lost.
const STALLED_HEARTBEATS_MAX: u32 = 3;

impl<S: LogStorage> RaftNode<S> {
    pub(crate) fn leader_state(&self) -> &LeaderState {
        match &self.role {
            RoleData::Leader(leader) => leader,
            _ => panic!("leader state asked of a {}", self.role.role()),
        }
    }

    pub(crate) fn leader_state_mut(&mut self) -> &mut LeaderState {
        match &mut self.role {
            RoleData::Leader(leader) => leader,
            _ => panic!("leader state asked of a non-leader"),
        }
    }

    // ----- Leader: time --------------------------------------------------------------------

    pub(crate) fn tick_leader(&mut self) -> Result<(), Error> {
        self.heartbeat_elapsed_ticks += 1;
        self.election_elapsed_ticks += 1;
        if self.election_elapsed_ticks >= self.config.election_timeout_ticks {
            self.election_elapsed_ticks = 0;
            if self.config.check_quorum && !self.check_quorum_active() {
                // Thesis §6.2: a leader that cannot reach a quorum within an election timeout
                // steps down, so clients go elsewhere instead of waiting on it.
                self.become_follower(self.term, NODE_NONE);
                return Ok(());
            }
            self.check_snapshot_transfers();
            // Thesis §3.10: a transfer that has not completed within an election timeout is
            // abandoned, and the leader accepts proposals again.
            self.leader_state_mut().transfer = None;
        }
        if self.heartbeat_elapsed_ticks >= self.config.heartbeat_interval_ticks {
            self.heartbeat_elapsed_ticks = 0;
            self.leader_state_mut().heartbeat_pending = true;
        }
        Ok(())
    }

    /// True if a quorum was heard from since the last check; resets the marks.
    fn check_quorum_active(&mut self) -> bool {
        let id = self.id();
        let membership = self.log.membership().clone();
        let leader = self.leader_state_mut();
        let active = leader
            .progress
            .iter()
            .filter(|(_, pr)| pr.recent_active)
            .map(|(&id, _)| id)
            .collect();
        for (&member, pr) in leader.progress.iter_mut() {
            pr.recent_active = member == id;
        }
        quorum::is_quorum(&membership, &active)
    }

    // ----- Leader: proposals ---------------------------------------------------------------

    pub(crate) fn propose_entry(&mut self, payload: EntryPayload) -> Result<EntryId, Error> {
        let RoleData::Leader(leader) = &self.role else {
            return Err(Error::NotLeader {
                leader_hint: self.leader(),
            });
        };
        if let Some(transfer) = leader.transfer {
            return Err(Error::TransferInProgress {
                target: transfer.target,
            });
        }
        let entry = Entry {
            term: self.term,
            index: self.log.last_index() + 1,
            payload,
        };
        let size_bytes = entry.size_bytes();
        let is_command = matches!(entry.payload, EntryPayload::Command(_));
        // Bound the uncommitted log (etcd's MaxUncommittedEntriesSize). One entry is always
        // allowed when nothing is uncommitted, so a large entry cannot be refused forever.
        if is_command
            && leader.uncommitted_bytes > 0
            && leader.uncommitted_bytes + size_bytes > self.config.uncommitted_bytes_max
        {
            return Err(Error::UncommittedLimit {
                uncommitted_bytes: leader.uncommitted_bytes,
                proposal_bytes: size_bytes,
                limit_bytes: self.config.uncommitted_bytes_max,
            });
        }
        let id = entry.id();
        self.leader_append(vec![entry]);
        Ok(id)
    }

    /// Appends entries the leader created and schedules sending them.
    pub(crate) fn leader_append(&mut self, entries: Vec<Entry>) {
        let membership_before = self.log.membership_index();
        let bytes = crate::types::entries_size_bytes(&entries);
        self.log.append(entries);
        let leader = self.leader_state_mut();
        leader.uncommitted_bytes += bytes;
        let followers: Vec<NodeId> = leader.progress.keys().copied().collect();
        leader.send_pending.extend(followers);
        if self.log.membership_index() != membership_before {
            self.sync_progress_with_membership();
        }
    }

    /// Makes the progress map match the configuration now in force: new members are probed
    /// from the end of the log, removed ones forgotten.
    pub(crate) fn sync_progress_with_membership(&mut self) {
        let members = self.log.membership().members();
        let next_index = self.log.last_index() + 1;
        let id = self.id();
        let leader = self.leader_state_mut();
        leader
            .progress
            .retain(|member, _| *member == id || members.contains(member));
        leader
            .send_pending
            .retain(|member| members.contains(member));
        for member in members {
            leader
                .progress
                .entry(member)
                .or_insert_with(|| Progress::new(next_index));
            leader.send_pending.insert(member);
        }
        self.note_membership();
    }

    // ----- Leader: output ------------------------------------------------------------------

    /// Sends what is pending: a heartbeat round, appends to followers with news, and the commit
    /// index to followers that have not heard it.
    pub(crate) fn flush_leader(&mut self) -> Result<(), Error> {
        if self.leader_state().heartbeat_pending {
            self.broadcast_heartbeat();
        }
        let committed = self.log.committed();
        let id = self.id();
        let leader = self.leader_state_mut();
        let mut targets = std::mem::take(&mut leader.send_pending);
        targets.extend(
            leader
                .progress
                .iter()
                .filter(|(_, pr)| pr.commit_sent < committed)
                .map(|(&id, _)| id),
        );
        targets.remove(&id);
        for to in targets {
            self.send_append(to)?;
            if !self.is_leader() {
                break;
            }
        }
        if self.is_leader() {
            self.release_confirmed_reads();
        }
        Ok(())
    }

    fn broadcast_heartbeat(&mut self) {
        let committed = self.log.committed();
        let id = self.id();
        let ticks = self.ticks;
        let lease_reads = self.config.lease_reads;
        let leader = self.leader_state_mut();
        leader.heartbeat_pending = false;
        if lease_reads
            || leader
                .reads
                .iter()
                .any(|read| read.round == leader.read_round + 1)
        {
            leader.read_round += 1;
        }
        let read_round = leader.read_round;
        if lease_reads {
            // Every heartbeat renews the lease once a quorum acknowledges it.
            if leader.lease_rounds.len() == LEASE_ROUNDS_MAX {
                leader.lease_rounds.pop_front();
            }
            leader.lease_rounds.push_back((read_round, ticks));
        }
        let beats: Vec<(NodeId, Index)> = leader
            .progress
            .iter()
            .filter(|&(&member, _)| member != id)
            .map(|(&member, pr)| (member, committed.min(pr.match_index)))
            .collect();
        for (to, commit) in beats {
            self.send(to, MessageBody::Heartbeat(Heartbeat { commit, read_round }));
        }
    }

    /// Sends `to` whatever its progress allows: appends (several in the replicate state), the
    /// commit index, or snapshot chunks.
    pub(crate) fn send_append(&mut self, to: NodeId) -> Result<(), Error> {
        for _ in 0..=self.config.inflight_messages_max {
            let Some(pr) = self.leader_state().progress.get(&to) else {
                return Ok(());
            };
            if let ProgressState::Snapshot(_) = pr.state {
                return self.send_snapshot_chunks(to);
            }
            if pr.is_paused(
                self.config.inflight_messages_max,
                self.config.inflight_bytes_max,
            ) {
                return Ok(());
            }
            let committed = self.log.committed();
            let next_index = pr.next_index;
            // A probing leader does not know where the follower's log ends until a probe is
            // answered: that alone is news. Without it, a probe lost to a member not yet
            // reachable (just added, or its address unknown) was never sent again on an idle
            // cluster, and the member never caught up.
            let unconfirmed = pr.state == ProgressState::Probe && pr.match_index + 1 < next_index;
            let has_news =
                next_index <= self.log.last_index() || pr.commit_sent < committed || unconfirmed;
            if !has_news {
                return Ok(());
            }
            let Some(append) = self.build_append(next_index)? else {
                return self.start_snapshot(to);
            };
            let last_sent = append.prev.index + append.entries.len() as u64;
            let bytes = crate::types::entries_size_bytes(&append.entries);
            let pr = self
                .leader_state_mut()
                .progress
                .get_mut(&to)
                .expect("checked");
            pr.commit_sent = committed;
            match pr.state {
                ProgressState::Replicate => {
                    pr.next_index = last_sent + 1;
                    pr.inflights.add(last_sent, bytes);
                }
                ProgressState::Probe => pr.probe_sent = true,
                ProgressState::Snapshot(_) => unreachable!("checked above"),
            }
            let probing = pr.state == ProgressState::Probe;
            self.send(to, MessageBody::Append(append));
            if probing || last_sent >= self.log.last_index() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// An append starting at `next_index`, or `None` if the entries it needs are compacted
    /// (the follower needs a snapshot).
    fn build_append(&self, next_index: Index) -> Result<Option<AppendRequest>, Error> {
        let prev_index = next_index - 1;
        let prev_term = match self.log.term(prev_index) {
            Ok(term) => term,
            Err(StorageError::Compacted { .. }) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let last_index = self.log.last_index();
        let entries = if next_index <= last_index {
            match self
                .log
                .entries(next_index, last_index + 1, self.config.append_bytes_max)
            {
                Ok(entries) => entries,
                Err(StorageError::Compacted { .. }) => return Ok(None),
                Err(err) => return Err(err.into()),
            }
        } else {
            Vec::new()
        };
        Ok(Some(AppendRequest {
            prev: EntryId::new(prev_term, prev_index),
            entries,
            commit: self.log.committed(),
        }))
    }

    // ----- Leader: responses ---------------------------------------------------------------

    /// The step function of the leader.
    pub(crate) fn step_leader(&mut self, msg: Message) -> Result<(), Error> {
        if let Some(pr) = self.leader_state_mut().progress.get_mut(&msg.from) {
            pr.recent_active = true;
        }
        match msg.body {
            MessageBody::AppendResponse(response) => {
                self.handle_append_response(msg.from, response)
            }
            MessageBody::HeartbeatResponse(response) => {
                self.handle_heartbeat_response(msg.from, response);
                Ok(())
            }
            MessageBody::SnapshotResponse(response) => {
                self.handle_snapshot_response(msg.from, response)
            }
            MessageBody::ReadIndex(request) => {
                self.leader_read_index(super::ReadOrigin::Remote(msg.from), request.context)
            }
            MessageBody::Append(_) | MessageBody::Heartbeat(_) | MessageBody::Snapshot(_) => {
                panic!(
                    "election safety violated: node {} and node {} both lead term {}",
                    self.id(),
                    msg.from,
                    self.term
                );
            }
            MessageBody::VoteResponse(_)
            | MessageBody::Vote(_)
            | MessageBody::ReadIndexResponse(_)
            | MessageBody::TimeoutNow => Ok(()),
        }
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        response: AppendResponse,
    ) -> Result<(), Error> {
        match response {
            AppendResponse::Accepted { match_index } => {
                self.handle_append_accepted(from, match_index)
            }
            AppendResponse::Rejected {
                rejected_prev,
                hint,
            } => {
                // Fast backtracking: skip every index the hint proves cannot match. If the
                // follower's entry at `hint.index` has term `hint.term`, our last entry at or
                // below it with a term no higher is the first candidate for agreement.
                let probe_from = if hint.term > 0 {
                    self.log.find_conflict_by_term(hint.index, hint.term)?.index + 1
                } else {
                    hint.index + 1
                };
                let Some(pr) = self.leader_state_mut().progress.get_mut(&from) else {
                    return Ok(());
                };
                if pr.maybe_decrease_to(rejected_prev, probe_from) {
                    self.leader_state_mut().send_pending.insert(from);
                }
                Ok(())
            }
        }
    }

    fn handle_append_accepted(&mut self, from: NodeId, match_index: Index) -> Result<(), Error> {
        let first_index = self.log.first_index();
        let last_index = self.log.last_index();
        let Some(pr) = self.leader_state_mut().progress.get_mut(&from) else {
            return Ok(());
        };
        assert!(
            match_index <= last_index,
            "follower {from} matched {match_index} past our log"
        );
        let updated = pr.maybe_update(match_index);
        match &pr.state {
            ProgressState::Probe if updated || pr.match_index + 1 == pr.next_index => {
                pr.become_replicate()
            }
            // The follower caught up another way (it had the entries): the log serves it.
            ProgressState::Snapshot(_) if pr.match_index + 1 >= first_index => pr.become_probe(),
            _ => {}
        }
        let matched_all = pr.match_index == last_index;
        self.leader_state_mut().send_pending.insert(from);
        if updated {
            self.maybe_commit()?;
        }
        if matched_all && self.is_leader() {
            self.maybe_send_timeout_now(from);
        }
        Ok(())
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, response: HeartbeatResponse) {
        let last_index = self.log.last_index();
        let leader = self.leader_state_mut();
        let Some(pr) = leader.progress.get_mut(&from) else {
            return;
        };
        pr.read_round_acked = pr.read_round_acked.max(response.read_round);
        match pr.state {
            // A probe whose answer was lost is retried at every heartbeat.
            ProgressState::Probe => pr.probe_sent = false,
            // Appends in flight with no progress over several heartbeats were lost; fall back
            // to probing from the match.
            ProgressState::Replicate => {
                if pr.inflights.count() > 0 && pr.match_index == pr.match_at_last_heartbeat {
                    pr.stalled_heartbeats += 1;
                    if pr.stalled_heartbeats >= STALLED_HEARTBEATS_MAX {
                        pr.become_probe();
                    }
                } else {
                    pr.stalled_heartbeats = 0;
                }
            }
            ProgressState::Snapshot(_) => {}
        }
        pr.match_at_last_heartbeat = pr.match_index;
        if pr.match_index < last_index {
            leader.send_pending.insert(from);
        }
        self.release_confirmed_reads();
    }

    /// §5.3, §5.4.2: an entry is committed once a quorum has it durably, but the leader counts
    /// replicas only for entries of its own term; earlier entries commit with them.
    pub(crate) fn maybe_commit(&mut self) -> Result<(), Error> {
        let progress = &self.leader_state().progress;
        let quorum_index = quorum::committed_index(self.log.membership(), |id| {
            progress.get(&id).map(|pr| pr.match_index).unwrap_or(0)
        });
        if quorum_index <= self.log.committed() || self.log.term(quorum_index)? != self.term {
            return Ok(());
        }
        self.log.commit_to(quorum_index);
        self.on_commit_advanced()
    }

    /// The leader's own writes became durable: it counts itself now.
    pub(crate) fn leader_persisted(&mut self) -> Result<(), Error> {
        let persisted = self.log.persisted();
        let id = self.id();
        let own = self
            .leader_state_mut()
            .progress
            .get_mut(&id)
            .expect("leader has own progress");
        if own.maybe_update(persisted) {
            self.maybe_commit()?;
        }
        Ok(())
    }

    // ----- Follower ------------------------------------------------------------------------

    /// The step function of the follower.
    pub(crate) fn step_follower(&mut self, msg: Message) -> Result<(), Error> {
        match msg.body {
            MessageBody::Append(request) => {
                self.hear_from_leader(msg.from);
                self.handle_append(msg.from, request)
            }
            MessageBody::Heartbeat(heartbeat) => {
                self.hear_from_leader(msg.from);
                self.handle_heartbeat(msg.from, heartbeat)
            }
            MessageBody::Snapshot(chunk) => {
                self.hear_from_leader(msg.from);
                self.handle_snapshot_chunk(msg.from, chunk)
            }
            MessageBody::TimeoutNow => {
                self.handle_timeout_now(msg.from);
                Ok(())
            }
            MessageBody::ReadIndexResponse(response) => {
                self.handle_read_index_response(response);
                Ok(())
            }
            MessageBody::ReadIndex(request) => {
                self.refuse_remote_read(msg.from, request.context);
                Ok(())
            }
            MessageBody::Vote(_)
            | MessageBody::VoteResponse(_)
            | MessageBody::AppendResponse(_)
            | MessageBody::HeartbeatResponse(_)
            | MessageBody::SnapshotResponse(_) => Ok(()),
        }
    }

    fn hear_from_leader(&mut self, from: NodeId) {
        self.election_elapsed_ticks = 0;
        if self.leader != from {
            self.leader = from;
            self.fail_forwarded_reads();
        }
    }

    /// The follower's side of AppendEntries (§5.3).
    fn handle_append(&mut self, from: NodeId, request: AppendRequest) -> Result<(), Error> {
        let committed = self.log.committed();
        if request.prev.index < committed {
            // Everything up to our commit index matches any leader's log (Leader Completeness),
            // so tell the leader to continue from there.
            let body = MessageBody::AppendResponse(AppendResponse::Accepted {
                match_index: committed,
            });
            self.send_after_persist(from, body);
            return Ok(());
        }
        let membership_before = self.log.membership_index();
        match self.log.maybe_append(request.prev, request.entries)? {
            Some(last_new) => {
                if self.log.membership_index() != membership_before {
                    self.note_membership();
                }
                if self.log.commit_to(request.commit.min(last_new)) {
                    self.on_commit_advanced()?;
                }
                let body = MessageBody::AppendResponse(AppendResponse::Accepted {
                    match_index: last_new,
                });
                self.send_after_persist(from, body);
            }
            None => {
                let hint_index = request.prev.index.min(self.log.last_index());
                let hint = self
                    .log
                    .find_conflict_by_term(hint_index, request.prev.term)?;
                let body = MessageBody::AppendResponse(AppendResponse::Rejected {
                    rejected_prev: request.prev.index,
                    hint,
                });
                self.send_after_persist(from, body);
            }
        }
        Ok(())
    }

    fn handle_heartbeat(&mut self, from: NodeId, heartbeat: Heartbeat) -> Result<(), Error> {
        // The leader caps the commit index at what we durably matched, so our log reaches it
        // unless our acknowledged data was lost, in which case acting on it would be unsafe.
        assert!(
            heartbeat.commit <= self.log.last_index(),
            "leader {from} says {} is committed, but node {} only has {}: was its log lost?",
            heartbeat.commit,
            self.id(),
            self.log.last_index()
        );
        if self.log.commit_to(heartbeat.commit) {
            self.on_commit_advanced()?;
        }
        let body = MessageBody::HeartbeatResponse(HeartbeatResponse {
            read_round: heartbeat.read_round,
        });
        self.send(from, body);
        Ok(())
    }
}
