//! Cluster configurations and the joint-consensus arithmetic of membership change (§6).
//!
//! A change from C_old to C_new goes through the joint configuration C_old,new, in which every
//! election and every commit needs a majority of C_old *and* a majority of C_new. Learners
//! receive the log but never vote and never count towards a quorum, so a change that touches only
//! learners needs no joint phase.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::types::{NODE_NONE, NodeId};

/// A configuration: who votes, who only learns.
///
/// Invariants (checked by [`Membership::validate`]):
/// - `voters` is not empty;
/// - no node is both a learner and a voter (of either half of a joint configuration);
/// - the reserved id [`NODE_NONE`] appears nowhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Membership {
    /// The voters of the configuration; while joint, the voters of C_new.
    pub voters: BTreeSet<NodeId>,
    /// While joint, the voters of C_old; empty otherwise.
    pub voters_outgoing: BTreeSet<NodeId>,
    /// Members that replicate the log without voting.
    pub learners: BTreeSet<NodeId>,
}

/// A configuration as it travels in the log, with an opaque context the application attaches
/// (for example the name and addresses of an added member).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipEntry {
    /// The configuration.
    pub membership: Membership,
    /// The application's data for it.
    pub context: Bytes,
}

impl MembershipEntry {
    /// The bytes it counts for in flow control.
    pub fn size_bytes(&self) -> u64 {
        let m = &self.membership;
        let ids = m.voters.len() + m.voters_outgoing.len() + m.learners.len();
        (ids as u64) * 8 + self.context.len() as u64
    }
}

/// One step of a membership change. Several steps form one [`ConfChange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConfChangeStep {
    /// Add a node that is not yet a member as a voter.
    AddVoter(NodeId),
    /// Add a node that is not yet a member as a learner.
    AddLearner(NodeId),
    /// Make a learner a voter.
    Promote(NodeId),
    /// Remove a voter or a learner.
    Remove(NodeId),
}

impl ConfChangeStep {
    /// The node the step is about.
    pub fn node(self) -> NodeId {
        match self {
            Self::AddVoter(id) | Self::AddLearner(id) | Self::Promote(id) | Self::Remove(id) => id,
        }
    }
}

/// A membership change request: any set of additions, promotions and removals, made in one
/// joint-consensus round. Adding or removing one server is a one-step change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfChange {
    /// What changes: several steps make one joint change.
    pub steps: Vec<ConfChangeStep>,
    /// Opaque application data carried in the log with the joint configuration.
    pub context: Bytes,
}

/// Why a configuration or a change to it was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("the membership change has no steps")]
    /// A change with nothing in it.
    EmptyChange,
    #[error("node id 0 is reserved and cannot be a member")]
    /// Id 0 means "nobody".
    ReservedNodeId,
    #[error("node {0} appears more than once in the membership change")]
    /// One node named by two steps.
    DuplicateNode(NodeId),
    #[error("node {0} is already a member")]
    /// Adding a member twice.
    AlreadyMember(NodeId),
    #[error("node {0} is not a member")]
    /// Removing, promoting or handing over to a node that is not a member.
    UnknownMember(NodeId),
    #[error("node {0} is not a learner, so it cannot be promoted")]
    /// Promoting a voter.
    NotALearner(NodeId),
    #[error("the change would leave the cluster without voters")]
    /// Removing the last voter.
    NoVotersLeft,
    #[error("node {0} is both a voter and a learner")]
    /// A node in both roles.
    VoterAndLearner(NodeId),
    #[error("the configuration is joint; a change can only start from a simple configuration")]
    /// A change started during another.
    AlreadyJoint,
}

impl Membership {
    /// A simple (non-joint) configuration of the given voters and no learners.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            voters: voters.into_iter().collect(),
            ..Self::default()
        }
    }

    /// True during a joint consensus change (§6): decisions need majorities of both halves.
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// True if `id` votes in either half of the configuration.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }

    /// True if `id` replicates the log without voting.
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id)
    }

    /// True if `id` receives the log: a voter of either half or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// Every member, voters of both halves and learners, in ascending id order.
    pub fn members(&self) -> BTreeSet<NodeId> {
        let mut all = self.voters.clone();
        all.extend(self.voters_outgoing.iter().copied());
        all.extend(self.learners.iter().copied());
        all
    }

    /// Checks the invariants listed on the type.
    pub fn validate(&self) -> Result<(), MembershipError> {
        if self.voters.is_empty() {
            return Err(MembershipError::NoVotersLeft);
        }
        if self.members().contains(&NODE_NONE) {
            return Err(MembershipError::ReservedNodeId);
        }
        if let Some(&id) = self.learners.iter().find(|&&id| self.is_voter(id)) {
            return Err(MembershipError::VoterAndLearner(id));
        }
        Ok(())
    }

    /// Computes the configuration that `change` leads to from this simple configuration.
    ///
    /// If the set of voters changes, the result is the joint configuration C_old,new, which the
    /// leader later replaces with [`Membership::leave_joint`]. If only learners change, quorums
    /// are unaffected and the result is the final simple configuration.
    pub fn apply_change(&self, change: &ConfChange) -> Result<Membership, MembershipError> {
        if self.is_joint() {
            return Err(MembershipError::AlreadyJoint);
        }
        if change.steps.is_empty() {
            return Err(MembershipError::EmptyChange);
        }
        let mut seen = BTreeSet::new();
        let mut voters = self.voters.clone();
        let mut learners = self.learners.clone();
        for &step in &change.steps {
            let id = step.node();
            if id == NODE_NONE {
                return Err(MembershipError::ReservedNodeId);
            }
            if !seen.insert(id) {
                return Err(MembershipError::DuplicateNode(id));
            }
            self.check_step(step)?;
            match step {
                ConfChangeStep::AddVoter(_) => {
                    voters.insert(id);
                }
                ConfChangeStep::AddLearner(_) => {
                    learners.insert(id);
                }
                ConfChangeStep::Promote(_) => {
                    learners.remove(&id);
                    voters.insert(id);
                }
                ConfChangeStep::Remove(_) => {
                    voters.remove(&id);
                    learners.remove(&id);
                }
            }
        }
        if voters.is_empty() {
            return Err(MembershipError::NoVotersLeft);
        }
        let voters_outgoing = if voters == self.voters {
            BTreeSet::new()
        } else {
            self.voters.clone()
        };
        let next = Membership {
            voters,
            voters_outgoing,
            learners,
        };
        next.validate()?;
        Ok(next)
    }

    /// Checks one step against this (the old) configuration.
    fn check_step(&self, step: ConfChangeStep) -> Result<(), MembershipError> {
        let id = step.node();
        match step {
            ConfChangeStep::AddVoter(_) | ConfChangeStep::AddLearner(_) => {
                if self.contains(id) {
                    return Err(MembershipError::AlreadyMember(id));
                }
            }
            ConfChangeStep::Promote(_) => {
                if !self.is_learner(id) {
                    return Err(if self.contains(id) {
                        MembershipError::NotALearner(id)
                    } else {
                        MembershipError::UnknownMember(id)
                    });
                }
            }
            ConfChangeStep::Remove(_) => {
                if !self.contains(id) {
                    return Err(MembershipError::UnknownMember(id));
                }
            }
        }
        Ok(())
    }

    /// The final configuration C_new of a joint configuration.
    pub fn leave_joint(&self) -> Membership {
        assert!(self.is_joint(), "leave_joint on a simple configuration");
        Membership {
            voters: self.voters.clone(),
            voters_outgoing: BTreeSet::new(),
            learners: self.learners.clone(),
        }
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |set: &BTreeSet<NodeId>| {
            set.iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(f, "voters=({})", list(&self.voters))?;
        if self.is_joint() {
            write!(f, "&&({})", list(&self.voters_outgoing))?;
        }
        if !self.learners.is_empty() {
            write!(f, " learners=({})", list(&self.learners))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(steps: &[ConfChangeStep]) -> ConfChange {
        ConfChange {
            steps: steps.to_vec(),
            context: Bytes::new(),
        }
    }

    #[test]
    fn adding_two_voters_enters_a_joint_configuration() {
        let old = Membership::with_voters([1, 2, 3]);
        let next = old
            .apply_change(&change(&[
                ConfChangeStep::AddVoter(4),
                ConfChangeStep::AddVoter(5),
            ]))
            .unwrap();
        assert!(next.is_joint());
        assert_eq!(next.voters, BTreeSet::from([1, 2, 3, 4, 5]));
        assert_eq!(next.voters_outgoing, BTreeSet::from([1, 2, 3]));
        let last = next.leave_joint();
        assert!(!last.is_joint());
        assert_eq!(last.voters, BTreeSet::from([1, 2, 3, 4, 5]));
    }

    #[test]
    fn learner_only_changes_skip_the_joint_phase() {
        let old = Membership::with_voters([1, 2, 3]);
        let next = old
            .apply_change(&change(&[ConfChangeStep::AddLearner(4)]))
            .unwrap();
        assert!(!next.is_joint());
        assert!(next.is_learner(4));
        assert!(!next.is_voter(4));
        let removed = next
            .apply_change(&change(&[ConfChangeStep::Remove(4)]))
            .unwrap();
        assert!(!removed.is_joint());
        assert!(!removed.contains(4));
    }

    #[test]
    fn promotion_moves_a_learner_to_the_voters() {
        let mut old = Membership::with_voters([1, 2, 3]);
        old.learners.insert(4);
        let next = old
            .apply_change(&change(&[ConfChangeStep::Promote(4)]))
            .unwrap();
        assert!(next.is_joint());
        assert!(next.voters.contains(&4));
        assert!(!next.is_learner(4));
        assert!(!next.voters_outgoing.contains(&4));
        next.validate().unwrap();
    }

    #[test]
    fn bad_changes_are_refused_with_the_reason() {
        let old = Membership::with_voters([1, 2]);
        let cases = [
            (vec![], MembershipError::EmptyChange),
            (
                vec![ConfChangeStep::AddVoter(1)],
                MembershipError::AlreadyMember(1),
            ),
            (
                vec![ConfChangeStep::AddLearner(2)],
                MembershipError::AlreadyMember(2),
            ),
            (
                vec![ConfChangeStep::Remove(9)],
                MembershipError::UnknownMember(9),
            ),
            (
                vec![ConfChangeStep::Promote(1)],
                MembershipError::NotALearner(1),
            ),
            (
                vec![ConfChangeStep::Promote(9)],
                MembershipError::UnknownMember(9),
            ),
            (
                vec![ConfChangeStep::AddVoter(0)],
                MembershipError::ReservedNodeId,
            ),
            (
                vec![ConfChangeStep::AddVoter(3), ConfChangeStep::Remove(3)],
                MembershipError::DuplicateNode(3),
            ),
            (
                vec![ConfChangeStep::Remove(1), ConfChangeStep::Remove(2)],
                MembershipError::NoVotersLeft,
            ),
        ];
        for (steps, expected) in cases {
            assert_eq!(
                old.apply_change(&change(&steps)),
                Err(expected),
                "steps {steps:?}"
            );
        }
    }

    #[test]
    fn a_joint_configuration_cannot_start_another_change() {
        let joint =
            Membership::with_voters([1]).apply_change(&change(&[ConfChangeStep::AddVoter(2)]));
        let joint = joint.unwrap();
        assert_eq!(
            joint.apply_change(&change(&[ConfChangeStep::AddVoter(3)])),
            Err(MembershipError::AlreadyJoint)
        );
    }

    #[test]
    fn validate_rejects_overlapping_roles_and_empty_voters() {
        let mut m = Membership::with_voters([1, 2]);
        m.learners.insert(2);
        assert_eq!(m.validate(), Err(MembershipError::VoterAndLearner(2)));
        assert_eq!(
            Membership::default().validate(),
            Err(MembershipError::NoVotersLeft)
        );
        assert_eq!(
            Membership::with_voters([0]).validate(),
            Err(MembershipError::ReservedNodeId)
        );
    }
}
