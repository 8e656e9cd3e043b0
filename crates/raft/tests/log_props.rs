//! Property tests of the follower's log (§5.3), through the node's public interface: random
//! AppendEntries against a plain `Vec` model of the consistency check and truncation rule, and
//! convergence of a diverged follower in a bounded number of rejections (fast backtracking).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use flotilla_raft::*;
use proptest::prelude::*;

/// One AppendEntries: where it attaches, whether its prev term is the follower's (when the
/// follower has that index), and the term increments of its entries.
#[derive(Clone, Debug)]
struct AppendOp {
    prev_index: u64,
    prev_matches: bool,
    prev_term: Term,
    entry_term_steps: Vec<Term>,
}

fn append_op() -> impl Strategy<Value = AppendOp> {
    (
        0..10u64,
        any::<bool>(),
        1..6u64,
        prop::collection::vec(0..2u64, 0..4),
    )
        .prop_map(
            |(prev_index, prev_matches, prev_term, entry_term_steps)| AppendOp {
                prev_index,
                prev_matches,
                prev_term,
                entry_term_steps,
            },
        )
}

/// The model: the follower's log as the terms of entries 1..=len.
fn model_term(log: &[Term], index: Index) -> Option<Term> {
    match index {
        0 => Some(0),
        i => log.get(i as usize - 1).copied(),
    }
}

/// §5.3 on the model: the consistency check, then "if an existing entry conflicts with a new one
/// (same index but different terms), delete the existing entry and all that follow it", then
/// append what is new. Returns the expected response.
fn model_append(log: &mut Vec<Term>, prev: EntryId, entries: &[Entry]) -> AppendResponse {
    if model_term(log, prev.index) != Some(prev.term) {
        let mut hint_index = prev.index.min(log.len() as u64);
        while model_term(log, hint_index).unwrap() > prev.term {
            hint_index -= 1;
        }
        let hint = id(model_term(log, hint_index).unwrap(), hint_index);
        return AppendResponse::Rejected {
            rejected_prev: prev.index,
            hint,
        };
    }
    for entry in entries {
        if model_term(log, entry.index) != Some(entry.term) {
            log.truncate(entry.index as usize - 1);
            log.push(entry.term);
        }
    }
    AppendResponse::Accepted {
        match_index: prev.index + entries.len() as u64,
    }
}

/// The terms of the entries durably in a node's storage.
fn stored_terms(storage: &MemStorage) -> Vec<Term> {
    let last = storage.last_index();
    if last == 0 {
        return Vec::new();
    }
    let entries = storage.entries(1, last + 1, u64::MAX).unwrap();
    entries.iter().map(|e| e.term).collect()
}

proptest! {
    /// Random appends (matching or not, overlapping, conflicting) leave the follower's log, in
    /// memory and in storage, equal to the model's, and every response equals the model's.
    #[test]
    fn follower_log_follows_the_append_rules(ops in prop::collection::vec(append_op(), 1..40)) {
        const LEADER_TERM: Term = 100;
        let mut node = new_node(paper_config(1), MemStorage::new_with_membership(voters(&[1, 2, 3])));
        settle(&mut node);
        let mut model: Vec<Term> = Vec::new();
        for op in ops {
            let prev_term = match (op.prev_matches, model_term(&model, op.prev_index)) {
                (true, Some(term)) => term,
                _ => op.prev_term,
            };
            let prev = id(prev_term, op.prev_index);
            let mut term = prev_term.max(1);
            let entries: Vec<Entry> = op
                .entry_term_steps
                .iter()
                .enumerate()
                .map(|(offset, step)| {
                    term += step;
                    entry(term, prev.index + 1 + offset as u64)
                })
                .collect();
            let expected = model_append(&mut model, prev, &entries);
            node.step(msg(2, 1, LEADER_TERM, append(prev, entries, 0))).unwrap();
            let settled = settle(&mut node);
            let response = MessageBody::AppendResponse(expected);
            prop_assert_eq!(settled.messages, vec![msg(1, 2, LEADER_TERM, response)]);
            let terms: Vec<Term> = log_ids(&node).iter().map(|id| id.term).collect();
            prop_assert_eq!(&terms, &model);
            prop_assert_eq!(stored_terms(node.storage()), model.clone());
            prop_assert_eq!(node.persisted(), model.len() as u64);
        }
    }

    /// A follower whose log diverged from the leader's after a common prefix converges to the
    /// leader's log, and fast backtracking needs at most one rejection per distinct term in the
    /// two divergent suffixes, plus one.
    #[test]
    fn diverged_follower_converges_in_rejections_bounded_by_terms(
        prefix_steps in prop::collection::vec(0..2u64, 0..6),
        leader_suffix_steps in prop::collection::vec(0..2u64, 0..6),
        follower_suffix_steps in prop::collection::vec(0..2u64, 0..8),
    ) {
        // Nondecreasing terms: the prefix in 1..=6, the leader's suffix in even terms from 8, the
        // follower's in odd terms from 9, so the suffixes share no entry.
        let climb = |start: Term, steps: &[u64], stride: Term| -> Vec<Term> {
            let mut term = start;
            steps.iter().map(|step| { term += step * stride; term }).collect()
        };
        let prefix = climb(1, &prefix_steps, 1);
        let leader_suffix = climb(8, &leader_suffix_steps, 2);
        let follower_suffix = climb(9, &follower_suffix_steps, 2);
        let leader_terms: Vec<Term> = prefix.iter().chain(&leader_suffix).copied().collect();
        let follower_terms: Vec<Term> = prefix.iter().chain(&follower_suffix).copied().collect();
        let commit = prefix.len() as u64;
        let leader = new_node(
            paper_config(1),
            storage_with(&[1, 2, 3], &leader_terms, HardState { term: 30, vote: 0, commit }),
        );
        let follower = new_node(
            paper_config(2),
            storage_with(&[1, 2, 3], &follower_terms, HardState { term: 30, vote: 0, commit: 0 }),
        );
        let mut net = Network::from_nodes(BTreeMap::from([(1, leader), (2, follower)]));
        net.node(1).campaign().unwrap();
        net.node(1).step(msg(3, 1, 31, vote_response(true))).unwrap();
        net.deliver();
        prop_assert_eq!(net.leader(), Some(1));
        net.tick_all(1);

        let last = net.node(1).last_id().index;
        let leader_log = net.node(1).entries(1, last + 1, u64::MAX).unwrap();
        prop_assert_eq!(net.node(2).last_id().index, last);
        prop_assert_eq!(net.node(2).entries(1, last + 1, u64::MAX).unwrap(), leader_log);
        let rejections = net
            .delivered
            .iter()
            .filter(|m| matches!(m.body, MessageBody::AppendResponse(AppendResponse::Rejected { .. })))
            .count();
        let distinct = |terms: &[Term]| terms.iter().collect::<BTreeSet<_>>().len();
        let bound = distinct(&leader_suffix) + distinct(&follower_suffix) + 1;
        prop_assert!(rejections <= bound, "{} rejections, bound {}", rejections, bound);
    }
}
