//! The cluster's alarms (etcd's alarm store): which member raised which alarm.
//!
//! Alarms are replicated state. They change only by applying an `AlarmRequest` server command
//! (ACTIVATE or DEACTIVATE, for any member), are saved in the state machine snapshot with the
//! member table, and decide what the key-value store admits on every member alike
//! ([`Alarms::admission`]): while any member has NOSPACE, nothing that takes space applies;
//! while any has CORRUPT, no client command applies.

use std::collections::BTreeSet;

use flotilla_kv::Admission;
use flotilla_proto::etcdserverpb::alarm_request::AlarmAction;
use flotilla_proto::etcdserverpb::{AlarmMember, AlarmRequest, AlarmType};
use flotilla_raft::NodeId;

/// The active alarms, as (member, alarm type) pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Alarms {
    /// Never holds `AlarmType::None`.
    active: BTreeSet<(NodeId, AlarmType)>,
}

/// Why an alarm request cannot be proposed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AlarmRequestError {
    #[error("flotilla: alarm type {0} is not NOSPACE (1) or CORRUPT (2)")]
    UnknownAlarm(i32),
    #[error("flotilla: alarm action {0} is not GET (0), ACTIVATE (1) or DEACTIVATE (2)")]
    UnknownAction(i32),
    #[error("flotilla: an alarm is raised for one member; member id 0 names none")]
    NoMember,
}

impl Alarms {
    pub fn from_members(alarms: &[AlarmMember]) -> Alarms {
        Alarms {
            active: alarms
                .iter()
                .filter_map(|alarm| Some((alarm.member_id, active_type(alarm.alarm)?)))
                .collect(),
        }
    }

    /// Every active alarm, in (member, type) order.
    pub fn to_members(&self) -> Vec<AlarmMember> {
        self.active.iter().map(|&pair| alarm_member(pair)).collect()
    }

    /// The active alarms of `alarm` type (every type for NONE), as GET answers.
    pub fn get(&self, alarm: AlarmType) -> Vec<AlarmMember> {
        self.active
            .iter()
            .filter(|(_, active)| alarm == AlarmType::None || *active == alarm)
            .map(|&pair| alarm_member(pair))
            .collect()
    }

    /// Whether `alarm` is active for `member_id`.
    pub fn names(&self, member_id: NodeId, alarm: AlarmType) -> bool {
        self.active.contains(&(member_id, alarm))
    }

    pub fn is_active(&self, alarm: AlarmType) -> bool {
        self.active.iter().any(|(_, active)| *active == alarm)
    }

    /// What the key-value store may apply under these alarms (CORRUPT outranks NOSPACE).
    pub fn admission(&self) -> Admission {
        if self.is_active(AlarmType::Corrupt) {
            Admission::Nothing
        } else if self.is_active(AlarmType::Nospace) {
            Admission::NoNewSpace
        } else {
            Admission::All
        }
    }

    /// Applies a logged ACTIVATE or DEACTIVATE; returns the alarm it changed, if it changed
    /// one (etcd answers with exactly that). DEACTIVATE for member 0 clears the type for every
    /// member. Requests [`check_alarm_change`] would refuse change nothing, on every member.
    pub fn apply(&mut self, request: &AlarmRequest) -> Vec<AlarmMember> {
        let Some(alarm) = active_type(request.alarm) else {
            return Vec::new();
        };
        match AlarmAction::try_from(request.action) {
            Ok(AlarmAction::Activate) if request.member_id != 0 => {
                let pair = (request.member_id, alarm);
                if self.active.insert(pair) {
                    vec![alarm_member(pair)]
                } else {
                    Vec::new()
                }
            }
            Ok(AlarmAction::Deactivate) => {
                let cleared: Vec<_> = self
                    .active
                    .iter()
                    .filter(|(member, active)| {
                        *active == alarm && (request.member_id == 0 || *member == request.member_id)
                    })
                    .copied()
                    .collect();
                for pair in &cleared {
                    self.active.remove(pair);
                }
                cleared.into_iter().map(alarm_member).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Checks an ACTIVATE or DEACTIVATE before it is proposed, with the reason it is refused.
pub fn check_alarm_change(request: &AlarmRequest) -> Result<(), AlarmRequestError> {
    match AlarmAction::try_from(request.action) {
        Ok(AlarmAction::Get) => {}
        Ok(AlarmAction::Activate) if request.member_id == 0 => {
            return Err(AlarmRequestError::NoMember);
        }
        Ok(_) => {}
        Err(_) => return Err(AlarmRequestError::UnknownAction(request.action)),
    }
    if active_type(request.alarm).is_none() && request.action != AlarmAction::Get as i32 {
        return Err(AlarmRequestError::UnknownAlarm(request.alarm));
    }
    Ok(())
}

/// The alarm type, if it is one that can be active.
fn active_type(alarm: i32) -> Option<AlarmType> {
    match AlarmType::try_from(alarm) {
        Ok(AlarmType::None) | Err(_) => None,
        Ok(alarm) => Some(alarm),
    }
}

fn alarm_member((member_id, alarm): (NodeId, AlarmType)) -> AlarmMember {
    AlarmMember {
        member_id,
        alarm: alarm as i32,
    }
}

/// An alarm type's name as etcd prints it (`NOSPACE`, `CORRUPT`).
pub fn name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm).map_or("UNKNOWN", |a| a.as_str_name())
}

/// How etcd prints an active alarm in Status's errors.
pub fn describe(alarm: &AlarmMember) -> String {
    format!("memberID:{} alarm:{} ", alarm.member_id, name(alarm.alarm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(action: AlarmAction, member_id: u64, alarm: AlarmType) -> AlarmRequest {
        AlarmRequest {
            action: action as i32,
            member_id,
            alarm: alarm as i32,
        }
    }

    #[test]
    fn activate_and_deactivate_report_only_what_changed() {
        let mut alarms = Alarms::default();
        let raise = request(AlarmAction::Activate, 7, AlarmType::Nospace);
        assert_eq!(alarms.apply(&raise).len(), 1);
        assert!(alarms.apply(&raise).is_empty(), "already active");
        assert_eq!(alarms.admission(), Admission::NoNewSpace);
        alarms.apply(&request(AlarmAction::Activate, 9, AlarmType::Nospace));
        alarms.apply(&request(AlarmAction::Activate, 9, AlarmType::Corrupt));
        assert_eq!(alarms.admission(), Admission::Nothing);
        assert_eq!(alarms.get(AlarmType::None).len(), 3);
        assert_eq!(alarms.get(AlarmType::Nospace).len(), 2);

        let cleared = alarms.apply(&request(AlarmAction::Deactivate, 7, AlarmType::Nospace));
        assert_eq!(cleared, vec![alarm_member((7, AlarmType::Nospace))]);
        alarms.apply(&request(AlarmAction::Deactivate, 9, AlarmType::Corrupt));
        assert_eq!(
            alarms.admission(),
            Admission::NoNewSpace,
            "member 9's NOSPACE"
        );
        let cleared = alarms.apply(&request(AlarmAction::Deactivate, 0, AlarmType::Nospace));
        assert_eq!(cleared.len(), 1);
        assert_eq!(alarms.admission(), Admission::All);
        assert_eq!(Alarms::from_members(&alarms.to_members()), alarms);
    }

    #[test]
    fn requests_that_name_nothing_are_refused_before_the_log_and_ignored_in_it() {
        let none = request(AlarmAction::Activate, 7, AlarmType::None);
        assert_eq!(
            check_alarm_change(&none),
            Err(AlarmRequestError::UnknownAlarm(0))
        );
        let nobody = request(AlarmAction::Activate, 0, AlarmType::Nospace);
        assert_eq!(
            check_alarm_change(&nobody),
            Err(AlarmRequestError::NoMember)
        );
        let bad_action = AlarmRequest {
            action: 5,
            ..Default::default()
        };
        assert_eq!(
            check_alarm_change(&bad_action),
            Err(AlarmRequestError::UnknownAction(5))
        );
        assert_eq!(check_alarm_change(&AlarmRequest::default()), Ok(()));
        let mut alarms = Alarms::default();
        for refused in [none, nobody, bad_action] {
            assert!(alarms.apply(&refused).is_empty());
        }
        assert_eq!(alarms, Alarms::default());
    }
}
