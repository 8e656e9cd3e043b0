//! The behaviours of §5.1–5.4 of the Raft paper ("In Search of an Understandable Consensus
//! Algorithm"), one test each, after etcd's `raft_paper_test.go` and raft-rs's
//! `test_raft_paper.rs` (the 26 scenarios listed in raft-anchors.md §4).
//!
//! Every test is init → step → assert the exact output. Unless a test says otherwise, node 1 is in
//! a 3-voter cluster {1, 2, 3} with an election timeout of 10 ticks, heartbeats every tick, and
//! neither pre-vote nor check-quorum (`paper_config`).
//!
//! Where our design differs from etcd, the test says so. The differences that recur:
//! - a candidate's own vote counts only once its persist batch (term and vote) is acknowledged,
//!   and every response that reports durable state (a vote, an append acknowledgement) is
//!   released only after persistence; `settle` persists and acknowledges at once;
//! - heartbeats are their own message type, carrying `min(commit, match)`, not empty appends;
//! - append responses carry the follower's match or a conflict hint, not its commit index.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use common::*;
use flotilla_raft::*;

// ----- Helpers ------------------------------------------------------------------------------

/// Node `id` of a cluster of `members`, over a log with the given entry terms and hard state.
fn node_with(
    id: NodeId,
    members: &[NodeId],
    terms: &[Term],
    hard_state: HardState,
) -> RaftNode<MemStorage> {
    let mut node = new_node(paper_config(id), storage_with(members, terms, hard_state));
    settle(&mut node);
    node
}

/// A fresh node 1 of {1, 2, 3}, settled.
fn fresh_node() -> RaftNode<MemStorage> {
    node_with(1, &[1, 2, 3], &[], HardState::default())
}

fn hard_state(term: Term, vote: NodeId, commit: Index) -> HardState {
    HardState { term, vote, commit }
}

fn other_voters(node: &RaftNode<MemStorage>) -> Vec<NodeId> {
    let id = node.id();
    node.membership()
        .voters
        .iter()
        .copied()
        .filter(|&v| v != id)
        .collect()
}

/// Makes the node campaign and win with a grant from every other voter; returns what settling
/// the whole exchange produced.
fn elect(node: &mut RaftNode<MemStorage>) -> Settled {
    node.campaign().unwrap();
    let mut settled = settle(node);
    let term = node.term();
    for from in other_voters(node) {
        node.step(msg(from, node.id(), term, vote_response(true)))
            .unwrap();
    }
    let after = settle(node);
    settled.messages.extend(after.messages);
    settled.applied.extend(after.applied);
    settled.persisted.extend(after.persisted);
    assert_eq!(node.role(), Role::Leader);
    settled
}

/// Elects the node and commits its blank entry with an acknowledgement from every follower.
fn elect_and_commit_blank(node: &mut RaftNode<MemStorage>) {
    elect(node);
    let (term, last) = (node.term(), node.last_id().index);
    for from in other_voters(node) {
        node.step(msg(from, node.id(), term, accepted(last)))
            .unwrap();
    }
    settle(node);
    assert_eq!(node.committed(), last);
}

fn propose(node: &mut RaftNode<MemStorage>, data: &'static str) -> EntryId {
    node.propose(Bytes::from_static(data.as_bytes())).unwrap()
}

fn blank(term: Term, index: Index) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Blank,
    }
}

fn reject(rejected_prev: Index, hint: EntryId) -> MessageBody {
    MessageBody::AppendResponse(AppendResponse::Rejected {
        rejected_prev,
        hint,
    })
}

fn applied_entries(settled: &Settled) -> Vec<Entry> {
    settled
        .applied
        .iter()
        .map(|apply| match apply {
            Apply::Entry(entry) => entry.clone(),
            Apply::Snapshot(meta) => panic!("unexpected snapshot {meta:?}"),
        })
        .collect()
}

fn terms_of(node: &RaftNode<MemStorage>) -> Vec<Term> {
    log_ids(node).iter().map(|id| id.term).collect()
}

/// The entries of every persist batch, in order.
fn persisted_entries(settled: &Settled) -> Vec<EntryId> {
    settled
        .persisted
        .iter()
        .flat_map(|batch| batch.entries.iter().map(Entry::id))
        .collect()
}

// ----- §5.1 Terms ---------------------------------------------------------------------------

/// §5.1: "If one server's current term is smaller than the other's, then it updates its current
/// term to the larger value." A follower at term 1 hearing a term-2 AppendEntries adopts term 2.
#[test]
fn follower_updates_term_from_message() {
    let mut node = node_with(1, &[1, 2, 3], &[], hard_state(1, 0, 0));
    node.step(msg(2, 1, 2, append(id(0, 0), vec![], 0)))
        .unwrap();
    let settled = settle(&mut node);
    assert_eq!(
        (node.role(), node.term(), node.leader()),
        (Role::Follower, 2, Some(2))
    );
    assert_eq!(settled.messages, vec![msg(1, 2, 2, accepted(0))]);
}

/// §5.1: "If a candidate or leader discovers that its term is out of date, it immediately reverts
/// to follower state." A term-1 candidate hearing a term-2 AppendEntries becomes a follower.
#[test]
fn candidate_updates_term_from_message() {
    let mut node = fresh_node();
    node.campaign().unwrap();
    settle(&mut node);
    assert_eq!((node.role(), node.term()), (Role::Candidate, 1));
    node.step(msg(2, 1, 2, append(id(0, 0), vec![], 0)))
        .unwrap();
    settle(&mut node);
    assert_eq!(
        (node.role(), node.term(), node.leader()),
        (Role::Follower, 2, Some(2))
    );
}

/// §5.1: a term-1 leader hearing a term-2 AppendEntries steps down to follower of term 2.
#[test]
fn leader_updates_term_from_message() {
    let mut node = fresh_node();
    elect(&mut node);
    assert_eq!(node.term(), 1);
    node.step(msg(2, 1, 2, append(id(0, 0), vec![], 0)))
        .unwrap();
    let settled = settle(&mut node);
    assert_eq!(
        (node.role(), node.term(), node.leader()),
        (Role::Follower, 2, Some(2))
    );
    assert_eq!(
        settled.role_states,
        vec![RoleState {
            role: Role::Follower,
            term: 2,
            leader: 2
        }]
    );
}

/// §5.1: "If a server receives a request with a stale term number, it rejects the request." Like
/// etcd, the paper configuration drops a stale AppendEntries without any state change or reply.
/// Our design differs with pre-vote or check-quorum on: then the stale leader gets a
/// HeartbeatResponse carrying the current term, because this node may have raised its term
/// without being able to win an election, and the stale leader would never learn of it otherwise.
#[test]
fn stale_term_message_is_rejected() {
    let mut node = node_with(1, &[1, 2, 3], &[1], hard_state(2, 0, 0));
    node.step(msg(2, 1, 1, append(id(1, 1), vec![entry(1, 2)], 1)))
        .unwrap();
    assert!(
        node.take_output().unwrap().is_empty(),
        "dropped without effect"
    );
    assert_eq!(
        (node.role(), node.term(), node.committed()),
        (Role::Follower, 2, 0)
    );
    assert_eq!(log_ids(&node), vec![id(1, 1)]);

    let storage = storage_with(&[1, 2, 3], &[1], hard_state(2, 0, 0));
    let mut node = new_node(config(1), storage);
    settle(&mut node);
    node.step(msg(2, 1, 1, append(id(1, 1), vec![entry(1, 2)], 1)))
        .unwrap();
    let heartbeat_response = MessageBody::HeartbeatResponse(HeartbeatResponse { read_round: 0 });
    assert_eq!(messages(&mut node), vec![msg(1, 2, 2, heartbeat_response)]);
    assert_eq!(
        log_ids(&node),
        vec![id(1, 1)],
        "the stale entries are not taken"
    );
}

// ----- §5.2 Leader election -----------------------------------------------------------------

/// §5.2: "When servers start up, they begin as followers."
#[test]
fn node_starts_as_follower() {
    let mut node = new_node(
        paper_config(1),
        MemStorage::new_with_membership(voters(&[1, 2, 3])),
    );
    let output = node.take_output().unwrap();
    assert_eq!(
        output.role_state,
        Some(RoleState {
            role: Role::Follower,
            term: 0,
            leader: NODE_NONE
        })
    );
    assert_eq!(output.persist, None);
    assert!(output.messages.is_empty());
}

/// §5.2: "Leaders send periodic heartbeats to all followers in order to maintain their
/// authority." A leader with 10 uncommitted entries ticks once and sends one heartbeat to each
/// follower. Our heartbeats are their own message type carrying `min(commit, match)` = 0.
#[test]
fn leader_broadcasts_heartbeat() {
    let mut node = fresh_node();
    elect(&mut node);
    for _ in 0..10 {
        propose(&mut node, "some data");
    }
    settle(&mut node);
    node.tick().unwrap();
    assert_eq!(
        messages(&mut node),
        vec![msg(1, 2, 1, heartbeat(0)), msg(1, 3, 1, heartbeat(0))]
    );
}

/// §5.2: "If a follower receives no communication over a period of time called the election
/// timeout, then it ... begins an election": it increments its term, votes for itself (durably:
/// the vote is in the persist batch) and sends RequestVote to the others.
#[test]
fn follower_starts_election() {
    let mut node = node_with(1, &[1, 2, 3], &[], hard_state(1, 0, 0));
    for _ in 1..2 * 10 {
        node.tick().unwrap();
    }
    let settled = settle(&mut node);
    assert_eq!(
        (node.role(), node.term(), node.vote()),
        (Role::Candidate, 2, 1)
    );
    assert_eq!(
        settled.messages,
        vec![
            msg(1, 2, 2, vote_request(id(0, 0))),
            msg(1, 3, 2, vote_request(id(0, 0)))
        ]
    );
    let hard_states: Vec<_> = settled.persisted.iter().map(|b| b.hard_state).collect();
    assert_eq!(hard_states, vec![Some(hard_state(2, 1, 0))]);
}

/// §5.2: "If many followers become candidates at the same time, votes could be split ... each
/// candidate will time out and start a new election by incrementing its term."
#[test]
fn candidate_starts_new_election() {
    let mut node = fresh_node();
    node.campaign().unwrap();
    settle(&mut node);
    assert_eq!((node.role(), node.term()), (Role::Candidate, 1));
    for _ in 1..2 * 10 {
        node.tick().unwrap();
    }
    let settled = settle(&mut node);
    assert_eq!(
        (node.role(), node.term(), node.vote()),
        (Role::Candidate, 2, 1)
    );
    assert_eq!(
        settled.messages,
        vec![
            msg(1, 2, 2, vote_request(id(0, 0))),
            msg(1, 3, 2, vote_request(id(0, 0)))
        ]
    );
}

/// §5.2: a candidate wins with votes from a majority (its own included), returns to follower when
/// a majority rejects it, and otherwise stays candidate. Our candidate counts its own vote only
/// once the vote is durable, which `settle` acknowledges before the replies arrive.
#[test]
fn leader_election_in_one_round() {
    /// Cluster size, vote replies, expected role.
    type Case = (u64, &'static [(NodeId, bool)], Role);
    let cases: &[Case] = &[
        (1, &[], Role::Leader),
        (3, &[(2, true), (3, true)], Role::Leader),
        (3, &[(2, true)], Role::Leader),
        (
            5,
            &[(2, true), (3, true), (4, true), (5, true)],
            Role::Leader,
        ),
        (5, &[(2, true), (3, true), (4, true)], Role::Leader),
        (5, &[(2, true), (3, true)], Role::Leader),
        (3, &[(2, false), (3, false)], Role::Follower),
        (
            5,
            &[(2, false), (3, false), (4, false), (5, false)],
            Role::Follower,
        ),
        (
            5,
            &[(2, true), (3, false), (4, false), (5, false)],
            Role::Follower,
        ),
        (3, &[], Role::Candidate),
        (5, &[(2, true)], Role::Candidate),
        (5, &[(2, false), (3, false)], Role::Candidate),
        (5, &[], Role::Candidate),
    ];
    for (size, votes, expected) in cases {
        let members: Vec<NodeId> = (1..=*size).collect();
        let mut node = node_with(1, &members, &[], HardState::default());
        node.campaign().unwrap();
        settle(&mut node);
        for &(from, granted) in *votes {
            node.step(msg(from, 1, 1, vote_response(granted))).unwrap();
        }
        settle(&mut node);
        assert_eq!(node.role(), *expected, "size {size}, votes {votes:?}");
        assert_eq!(node.term(), 1, "size {size}, votes {votes:?}");
    }
}

/// §5.2: "Each server will vote for at most one candidate in a given term, on a
/// first-come-first-served basis." A grant is sent only once the vote is durable.
#[test]
fn follower_votes_first_come_first_served() {
    let cases = [
        (NODE_NONE, 2, true),
        (NODE_NONE, 3, true),
        (2, 2, true),
        (3, 3, true),
        (2, 3, false),
        (3, 2, false),
    ];
    for (voted_for, candidate, granted) in cases {
        let mut node = node_with(1, &[1, 2, 3], &[], hard_state(1, voted_for, 0));
        node.step(msg(candidate, 1, 1, vote_request(id(0, 0))))
            .unwrap();
        let settled = settle(&mut node);
        let case = format!("voted for {voted_for}, asked by {candidate}");
        assert_eq!(
            settled.messages,
            vec![msg(1, candidate, 1, vote_response(granted))],
            "{case}"
        );
        let expected_vote = if granted { candidate } else { voted_for };
        assert_eq!(node.vote(), expected_vote, "{case}");
        assert_eq!(
            node.storage().hard_state().vote,
            expected_vote,
            "{case}: durable"
        );
    }
}

/// §5.2: "If the AppendEntries RPC is from a leader whose term is at least as large as the
/// candidate's current term, then the candidate recognizes the leader as legitimate and returns to
/// follower state."
#[test]
fn candidate_falls_back_to_follower() {
    for term in [1, 2] {
        let mut node = fresh_node();
        node.campaign().unwrap();
        settle(&mut node);
        node.step(msg(2, 1, term, append(id(0, 0), vec![], 0)))
            .unwrap();
        let settled = settle(&mut node);
        assert_eq!(
            (node.role(), node.term(), node.leader()),
            (Role::Follower, term, Some(2))
        );
        assert_eq!(
            settled.messages,
            vec![msg(1, 2, term, accepted(0))],
            "term {term}"
        );
    }
}

/// Ticks until the node sends something, at most `ticks_max` times; returns how many ticks.
fn ticks_until_message(node: &mut RaftNode<MemStorage>, ticks_max: u64) -> u64 {
    for tick in 1..=ticks_max {
        node.tick().unwrap();
        if !node.take_output().unwrap().messages.is_empty() {
            return tick;
        }
    }
    panic!("node {} sent nothing within {ticks_max} ticks", node.id());
}

fn seeded_node(seed: u64, members: &[NodeId], id: NodeId) -> RaftNode<MemStorage> {
    let mut config = paper_config(id);
    config.seed = seed;
    let mut node = new_node(config, MemStorage::new_with_membership(voters(members)));
    settle(&mut node);
    node
}

/// §5.2: "Raft uses randomized election timeouts ... chosen randomly from a fixed interval." Over
/// 500 seeds, the ticks until a follower campaigns take every value in [T, 2T).
#[test]
fn follower_election_timeout_is_randomized() {
    let observed: BTreeSet<u64> = (0..500)
        .map(|seed| ticks_until_message(&mut seeded_node(seed, &[1, 2, 3], 1), 20))
        .collect();
    assert_eq!(observed, (10..20).collect());
}

/// §5.2: the same for a candidate restarting its election.
#[test]
fn candidate_election_timeout_is_randomized() {
    let observed: BTreeSet<u64> = (0..500)
        .map(|seed| {
            let mut node = seeded_node(seed, &[1, 2, 3], 1);
            node.campaign().unwrap();
            settle(&mut node);
            ticks_until_message(&mut node, 20)
        })
        .collect();
    assert_eq!(observed, (10..20).collect());
}

/// Runs 1000 rounds of 5 nodes ticking in lockstep and counts the rounds in which more than one
/// node timed out on the first tick that any did.
fn election_timeout_conflicts(as_candidates: bool) -> usize {
    let members = [1, 2, 3, 4, 5];
    let mut conflicts = 0;
    for round in 0..1000u64 {
        let mut nodes: Vec<_> = members
            .iter()
            .map(|&id| seeded_node(round * 8 + id, &members, id))
            .collect();
        if as_candidates {
            for node in &mut nodes {
                node.campaign().unwrap();
                settle(node);
            }
        }
        for _ in 0..20 {
            let mut timed_out = 0;
            for node in &mut nodes {
                node.tick().unwrap();
                timed_out += usize::from(!node.take_output().unwrap().messages.is_empty());
            }
            if timed_out > 0 {
                conflicts += usize::from(timed_out > 1);
                break;
            }
        }
    }
    conflicts
}

/// §5.2: randomized timeouts "ensure that split votes are rare": in at most 30% of rounds do two
/// of five followers time out on the same tick.
#[test]
fn followers_election_timeouts_rarely_conflict() {
    let conflicts = election_timeout_conflicts(false);
    assert!(conflicts <= 300, "{conflicts} of 1000 rounds conflicted");
}

/// §5.2: the same for five candidates.
#[test]
fn candidates_election_timeouts_rarely_conflict() {
    let conflicts = election_timeout_conflicts(true);
    assert!(conflicts <= 300, "{conflicts} of 1000 rounds conflicted");
}

// ----- §5.3 Log replication -----------------------------------------------------------------

/// §5.3: "The leader appends the command to its log as a new entry, then issues AppendEntries RPCs
/// in parallel to each of the other servers." The entry is in the persist batch, and not
/// committed yet.
#[test]
fn leader_starts_replication() {
    let mut node = fresh_node();
    elect_and_commit_blank(&mut node);
    let li = node.last_id().index;
    assert_eq!(propose(&mut node, "some data"), id(1, li + 1));
    let settled = settle(&mut node);
    let expected_entry = command(1, li + 1, "some data");
    let expected_append = append(id(1, li), vec![expected_entry.clone()], li);
    assert_eq!(
        settled.messages,
        vec![
            msg(1, 2, 1, expected_append.clone()),
            msg(1, 3, 1, expected_append)
        ]
    );
    assert_eq!(persisted_entries(&settled), vec![id(1, li + 1)]);
    assert_eq!((node.last_id().index, node.committed()), (li + 1, li));
    assert!(settled.applied.is_empty());
}

/// §5.3: "When the entry has been safely replicated, the leader applies the entry to its state
/// machine", and later AppendEntries carry the new commit index. Ours is a commit-only append.
#[test]
fn leader_commits_entry() {
    let mut node = fresh_node();
    elect_and_commit_blank(&mut node);
    let li = node.last_id().index;
    propose(&mut node, "some data");
    settle(&mut node);
    for from in [2, 3] {
        node.step(msg(from, 1, 1, accepted(li + 1))).unwrap();
    }
    let settled = settle(&mut node);
    assert_eq!(node.committed(), li + 1);
    assert_eq!(
        applied_entries(&settled),
        vec![command(1, li + 1, "some data")]
    );
    let commit_only = append(id(1, li + 1), vec![], li + 1);
    assert_eq!(
        settled.messages,
        vec![msg(1, 2, 1, commit_only.clone()), msg(1, 3, 1, commit_only)]
    );
}

/// §5.3: "A log entry is committed once the leader that created the entry has replicated it on a
/// majority of the servers."
#[test]
fn leader_commits_once_a_majority_acknowledges() {
    let cases: &[(u64, &[NodeId], bool)] = &[
        (1, &[], true),
        (3, &[], false),
        (3, &[2], true),
        (3, &[2, 3], true),
        (5, &[], false),
        (5, &[2], false),
        (5, &[2, 3], true),
        (5, &[2, 3, 4], true),
        (5, &[2, 3, 4, 5], true),
    ];
    for (size, acks, committed) in cases {
        let members: Vec<NodeId> = (1..=*size).collect();
        let mut node = node_with(1, &members, &[], HardState::default());
        elect_and_commit_blank(&mut node);
        let index = propose(&mut node, "some data").index;
        settle(&mut node);
        for &from in *acks {
            node.step(msg(from, 1, 1, accepted(index))).unwrap();
        }
        settle(&mut node);
        assert_eq!(
            node.committed() == index,
            *committed,
            "size {size}, acks {acks:?}"
        );
    }
}

/// §5.3: committing an entry "also commits all preceding entries in the leader's log, including
/// entries created by previous leaders." Everything is applied in log order.
#[test]
fn leader_commits_preceding_entries() {
    let logs: &[&[Term]] = &[&[], &[2], &[1, 2], &[1]];
    for terms in logs {
        let mut node = node_with(1, &[1, 2, 3], terms, hard_state(2, 0, 0));
        let mut settled = elect(&mut node);
        assert_eq!(node.term(), 3);
        let n = terms.len() as u64;
        propose(&mut node, "some data");
        settled.applied.extend(settle(&mut node).applied);
        for from in [2, 3] {
            node.step(msg(from, 1, 3, accepted(n + 2))).unwrap();
        }
        settled.applied.extend(settle(&mut node).applied);
        let mut expected: Vec<Entry> = (1..=n).map(|i| entry(terms[i as usize - 1], i)).collect();
        expected.push(blank(3, n + 1));
        expected.push(command(3, n + 2, "some data"));
        assert_eq!(applied_entries(&settled), expected, "log {terms:?}");
    }
}

/// §5.3: "Once a follower learns that a log entry is committed, it applies the entry to its local
/// state machine (in log order)."
#[test]
fn follower_commits_entries() {
    let both = [command(1, 1, "some data"), command(1, 2, "some data2")];
    let cases: [(&[Entry], Index); 4] = [(&both[..1], 1), (&both, 2), (&both, 2), (&both, 1)];
    for (entries, commit) in cases {
        let mut node = node_with(1, &[1, 2, 3], &[], hard_state(1, 0, 0));
        node.step(msg(2, 1, 1, append(id(0, 0), entries.to_vec(), commit)))
            .unwrap();
        let settled = settle(&mut node);
        assert_eq!(node.committed(), commit);
        assert_eq!(
            applied_entries(&settled),
            entries[..commit as usize].to_vec()
        );
    }
}

/// §5.3: "If the follower does not find an entry in its log with the same index and term, then it
/// refuses the new entries." Rejections carry a conflict hint: the follower's last entry at or
/// below the rejected index with a term no higher than the leader's (etcd's hint index and term).
/// A prev below the commit index is answered with the commit index, as etcd does.
#[test]
fn follower_checks_append_consistency() {
    let cases = [
        (id(0, 0), accepted(1)),
        (id(1, 1), accepted(1)),
        (id(2, 2), accepted(2)),
        (id(1, 2), reject(2, id(1, 1))),
        (id(3, 3), reject(3, id(2, 2))),
    ];
    for (prev, response) in cases {
        let mut node = node_with(1, &[1, 2, 3], &[1, 2], hard_state(2, 0, 1));
        node.step(msg(2, 1, 2, append(prev, vec![], 1))).unwrap();
        assert_eq!(
            messages(&mut node),
            vec![msg(1, 2, 2, response)],
            "prev {prev}"
        );
        assert_eq!(node.committed(), 1, "prev {prev}");
    }
}

/// §5.3: "If an existing entry conflicts with a new one (same index but different terms), delete
/// the existing entry and all that follow it"; new entries are appended, entries already present
/// are left alone. The entries written are exactly those in the persist batches.
#[test]
fn follower_appends_entries() {
    /// Prev, entries, expected log terms, expected entries written.
    type Case = (EntryId, Vec<Entry>, Vec<Term>, Vec<EntryId>);
    let cases: [Case; 4] = [
        (id(2, 2), vec![entry(3, 3)], vec![1, 2, 3], vec![id(3, 3)]),
        (
            id(1, 1),
            vec![entry(3, 2), entry(4, 3)],
            vec![1, 3, 4],
            vec![id(3, 2), id(4, 3)],
        ),
        (id(0, 0), vec![entry(1, 1)], vec![1, 2], vec![]),
        (id(0, 0), vec![entry(3, 1)], vec![3], vec![id(3, 1)]),
    ];
    for (prev, entries, log_terms, written) in cases {
        let mut node = node_with(1, &[1, 2, 3], &[1, 2], hard_state(2, 0, 0));
        node.step(msg(2, 1, 2, append(prev, entries, 0))).unwrap();
        let settled = settle(&mut node);
        assert_eq!(terms_of(&node), log_terms, "prev {prev}");
        assert_eq!(persisted_entries(&settled), written, "prev {prev}");
    }
}

/// §5.3 and Figure 7: "the leader handles inconsistencies by forcing the followers' logs to
/// duplicate its own." The leader of term 8 wins term 9 with a stub vote from node 3 and brings
/// each of the six followers of Figure 7 to its log. Ours appends its blank entry on election
/// (etcd proposes an empty entry by hand), and we propose one more entry after it.
#[test]
fn leader_syncs_follower_log_figure_7() {
    let leader_terms: &[Term] = &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
    let followers: [(&str, &[Term]); 6] = [
        ("(a) missing an entry", &[1, 1, 1, 4, 4, 5, 5, 6, 6]),
        ("(b) far behind", &[1, 1, 1, 4]),
        (
            "(c) extra uncommitted term-6 entry",
            &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
        ),
        (
            "(d) extra term-7 entries",
            &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
        ),
        ("(e) diverging term-4 tail", &[1, 1, 1, 4, 4, 4, 4]),
        (
            "(f) diverging term-2/3 tail",
            &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
        ),
    ];
    for (case, follower_terms) in followers {
        let leader = node_with(1, &[1, 2, 3], leader_terms, hard_state(8, 0, 10));
        let follower = node_with(2, &[1, 2, 3], follower_terms, hard_state(7, 0, 0));
        let mut net = Network::from_nodes(BTreeMap::from([(1, leader), (2, follower)]));
        net.node(1).campaign().unwrap();
        net.node(1).step(msg(3, 1, 9, vote_response(true))).unwrap();
        net.deliver();
        assert_eq!(net.leader(), Some(1), "{case}");
        net.propose(1, "");
        net.tick_all(1);
        let last = net.node(1).last_id().index;
        assert_eq!(last, 12, "{case}");
        let leader_log = net.node(1).entries(1, last + 1, u64::MAX).unwrap();
        let follower_log = net.node(2).entries(1, last + 1, u64::MAX).unwrap();
        assert_eq!(follower_log, leader_log, "{case}");
        assert_eq!(net.node(2).last_id().index, last, "{case}");
        assert_eq!(net.node(2).committed(), last, "{case}");
    }
}

// ----- §5.4 Safety --------------------------------------------------------------------------

/// §5.4.1: "The RequestVote RPC ... includes information about the candidate's log": a follower
/// that received entries at term T-1 and times out asks for votes at term T with its last entry.
#[test]
fn vote_request_carries_last_log_entry() {
    let cases = [(vec![entry(1, 1)], 2), (vec![entry(1, 1), entry(2, 2)], 3)];
    for (entries, term) in cases {
        let last = entries.last().unwrap().id();
        let mut node = fresh_node();
        node.step(msg(2, 1, term - 1, append(id(0, 0), entries, 0)))
            .unwrap();
        settle(&mut node);
        for _ in 1..2 * 10 {
            node.tick().unwrap();
        }
        let votes: Vec<Message> = messages(&mut node)
            .into_iter()
            .filter(|m| matches!(m.body, MessageBody::Vote(_)))
            .collect();
        assert_eq!(
            votes,
            vec![
                msg(1, 2, term, vote_request(last)),
                msg(1, 3, term, vote_request(last))
            ],
            "log up to {last}"
        );
    }
}

/// §5.4.1: "the voter denies its vote if its own log is more up-to-date than that of the
/// candidate": later last term wins; with equal last terms, the longer log wins.
#[test]
fn voter_grants_only_to_up_to_date_candidates() {
    let cases: &[(&[Term], EntryId, bool)] = &[
        // Same last term: the candidate's index must be at least ours.
        (&[1], id(1, 1), true),
        (&[1], id(1, 2), true),
        (&[1, 1], id(1, 1), false),
        // The candidate's last term is higher.
        (&[1], id(2, 1), true),
        (&[1], id(2, 2), true),
        (&[1, 1], id(2, 1), true),
        // The voter's last term is higher.
        (&[2], id(1, 1), false),
        (&[2], id(1, 2), false),
        (&[2, 2], id(1, 1), false),
        // raft-rs's variant of the last case.
        (&[2, 1], id(1, 1), false),
    ];
    for (voter_terms, candidate_last, granted) in cases {
        let mut node = node_with(1, &[1, 2], voter_terms, HardState::default());
        node.step(msg(2, 1, 3, vote_request(*candidate_last)))
            .unwrap();
        assert_eq!(
            messages(&mut node),
            vec![msg(1, 2, 3, vote_response(*granted))],
            "voter log {voter_terms:?}, candidate last {candidate_last}"
        );
    }
}

/// §5.4.2: "Raft never commits log entries from previous terms by counting replicas. Only log
/// entries from the leader's current term are committed by counting replicas."
#[test]
fn leader_only_commits_entries_of_its_term() {
    let mut node = node_with(1, &[1, 2], &[1, 2], hard_state(2, 0, 0));
    elect(&mut node);
    assert_eq!(node.term(), 3);
    propose(&mut node, "some data");
    settle(&mut node);
    assert_eq!(log_ids(&node), vec![id(1, 1), id(2, 2), id(3, 3), id(3, 4)]);
    for (acked, committed) in [(1, 0), (2, 0), (3, 3)] {
        node.step(msg(2, 1, 3, accepted(acked))).unwrap();
        settle(&mut node);
        assert_eq!(node.committed(), committed, "follower acknowledged {acked}");
    }
}
