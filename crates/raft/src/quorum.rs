//! Quorum arithmetic, pure functions over a [`Membership`]. In a joint configuration every
//! decision needs a majority of both halves (§6).

use std::collections::{BTreeMap, BTreeSet};

use crate::membership::Membership;
use crate::types::{Index, NodeId};

/// The outcome of an election so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// A majority (of both halves, when joint) granted.
    Won,
    /// A majority (of either half) refused: no win is possible.
    Lost,
    /// Neither yet.
    Pending,
}

/// The highest index that a majority of `voters` has matched. An empty set of voters places
/// no constraint (it returns `Index::MAX`), so that it is neutral in a joint minimum.
fn majority_committed(voters: &BTreeSet<NodeId>, match_index: &impl Fn(NodeId) -> Index) -> Index {
    if voters.is_empty() {
        return Index::MAX;
    }
    let mut matched: Vec<Index> = voters.iter().map(|&id| match_index(id)).collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    // With n voters, a majority is n/2 + 1; the (n/2 + 1)-th highest match is held by it.
    matched[voters.len() / 2]
}

/// The highest index matched by a quorum of `membership` (both halves while joint).
pub fn committed_index(membership: &Membership, match_index: impl Fn(NodeId) -> Index) -> Index {
    let incoming = majority_committed(&membership.voters, &match_index);
    let outgoing = majority_committed(&membership.voters_outgoing, &match_index);
    let committed = incoming.min(outgoing);
    assert_ne!(
        committed,
        Index::MAX,
        "a membership without voters cannot commit"
    );
    committed
}

fn majority_vote(voters: &BTreeSet<NodeId>, votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    if voters.is_empty() {
        return VoteResult::Won;
    }
    let granted = voters
        .iter()
        .filter(|id| votes.get(id) == Some(&true))
        .count();
    let rejected = voters
        .iter()
        .filter(|id| votes.get(id) == Some(&false))
        .count();
    let majority = voters.len() / 2 + 1;
    if granted >= majority {
        VoteResult::Won
    } else if voters.len() - rejected < majority {
        VoteResult::Lost
    } else {
        VoteResult::Pending
    }
}

/// The result of an election given the votes received (`true` granted, `false` rejected).
pub fn vote_result(membership: &Membership, votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    let incoming = majority_vote(&membership.voters, votes);
    let outgoing = majority_vote(&membership.voters_outgoing, votes);
    match (incoming, outgoing) {
        (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
        (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
        _ => VoteResult::Pending,
    }
}

/// True if the nodes in `active` form a quorum of `membership`.
pub fn is_quorum(membership: &Membership, active: &BTreeSet<NodeId>) -> bool {
    let votes = active.iter().map(|&id| (id, true)).collect();
    vote_result(membership, &votes) == VoteResult::Won
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn majority_of_three_and_five() {
        let m = Membership::with_voters([1, 2, 3]);
        let matches = BTreeMap::from([(1, 5), (2, 3), (3, 1)]);
        assert_eq!(committed_index(&m, |id| matches[&id]), 3);
        let m = Membership::with_voters([1, 2, 3, 4, 5]);
        let matches = BTreeMap::from([(1, 9), (2, 9), (3, 2), (4, 7), (5, 1)]);
        assert_eq!(committed_index(&m, |id| matches[&id]), 7);
    }

    #[test]
    fn joint_commit_needs_both_majorities() {
        let m = Membership {
            voters: BTreeSet::from([4, 5, 6]),
            voters_outgoing: BTreeSet::from([1, 2, 3]),
            learners: BTreeSet::new(),
        };
        let matches = BTreeMap::from([(1, 10), (2, 10), (3, 10), (4, 2), (5, 3), (6, 1)]);
        assert_eq!(committed_index(&m, |id| matches[&id]), 2);
    }

    #[test]
    fn joint_votes_need_both_majorities() {
        let m = Membership {
            voters: BTreeSet::from([1, 4]),
            voters_outgoing: BTreeSet::from([1, 2, 3]),
            learners: BTreeSet::new(),
        };
        let votes = BTreeMap::from([(1, true), (2, true)]);
        assert_eq!(vote_result(&m, &votes), VoteResult::Pending);
        let votes = BTreeMap::from([(1, true), (2, true), (4, true)]);
        assert_eq!(vote_result(&m, &votes), VoteResult::Won);
        let votes = BTreeMap::from([(1, true), (2, true), (4, false)]);
        assert_eq!(vote_result(&m, &votes), VoteResult::Lost);
    }

    #[test]
    fn learners_never_count() {
        let mut m = Membership::with_voters([1, 2, 3]);
        m.learners.extend([4, 5]);
        assert!(!is_quorum(&m, &BTreeSet::from([1, 4, 5])));
        assert!(is_quorum(&m, &BTreeSet::from([1, 2])));
    }

    proptest! {
        /// The committed index is matched by a majority and no higher index is.
        #[test]
        fn committed_index_is_the_highest_majority_match(
            matches in proptest::collection::vec(0u64..20, 1..8)
        ) {
            let m = Membership::with_voters(1..=matches.len() as u64);
            let match_of = |id: NodeId| matches[(id - 1) as usize];
            let committed = committed_index(&m, match_of);
            let majority = matches.len() / 2 + 1;
            prop_assert!(matches.iter().filter(|&&x| x >= committed).count() >= majority);
            prop_assert!(matches.iter().filter(|&&x| x > committed).count() < majority);
        }

        /// Won and Lost are final: more votes never flip a decided election.
        #[test]
        fn decided_elections_stay_decided(
            votes in proptest::collection::vec(proptest::option::of(any::<bool>()), 5)
        ) {
            let m = Membership::with_voters(1..=5);
            let cast: BTreeMap<NodeId, bool> = votes.iter().enumerate()
                .filter_map(|(i, v)| v.map(|v| (i as u64 + 1, v))).collect();
            let result = vote_result(&m, &cast);
            let mut all_yes = cast.clone();
            let mut all_no = cast.clone();
            for id in 1..=5 {
                all_yes.entry(id).or_insert(true);
                all_no.entry(id).or_insert(false);
            }
            if result != VoteResult::Pending {
                prop_assert_eq!(vote_result(&m, &all_yes), result);
                prop_assert_eq!(vote_result(&m, &all_no), result);
            } else {
                prop_assert_eq!(vote_result(&m, &all_yes), VoteResult::Won);
                prop_assert_eq!(vote_result(&m, &all_no), VoteResult::Lost);
            }
        }
    }
}
