//! Client sessions for duplicate suppression (Raft thesis §6.3).
//!
//! A client registers a session (a command; its id is that command's log index), then tags
//! each write with the session id and a sequence number. The session remembers the highest
//! sequence applied and that request's outcome:
//! - a higher sequence is new: it is applied and its outcome remembered;
//! - the same sequence is a retry: the remembered outcome is returned, nothing is applied;
//! - a lower sequence is stale (the client gave up on it and moved on): refused, never applied.
//!
//! So a session has at most one write in flight; a client wanting concurrency opens several.
//!
//! Bounds, both identical on every member ([`SessionLimits`]):
//! - at most `sessions_max` sessions: registering one more evicts the least recently used
//!   (lowest last-used log index, then lowest id), which every replica picks alike. A request
//!   from an evicted or expired session is refused with `SessionNotFound`;
//! - an outcome larger than `session_response_bytes_max` is not kept: a retry of it gets
//!   `ResponseNotRetained`, which still tells the client it was applied once.
//!
//! Expiry is a command too (`ExpireSessions`, proposed by the leader from its own clock), so
//! every member drops the same sessions at the same log index.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::flotilla::kv::v1::{NotRetained, RememberedOutcome, remembered_outcome};
use prost::Message;

use crate::command::ClientRequestId;
use crate::error::{ErrorKind, KvError};
use crate::limits::SessionLimits;

#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    id: u64,
    last_sequence: u64,
    last_used_index: u64,
    remembered: Option<RememberedOutcome>,
}

impl Session {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// The log index of the last command that used (or registered) the session.
    pub fn last_used_index(&self) -> u64 {
        self.last_used_index
    }

    pub(crate) fn remembered(&self) -> Option<&RememberedOutcome> {
        self.remembered.as_ref()
    }
}

/// What to do with a request that carries a session.
#[derive(Debug)]
pub(crate) enum SessionCheck {
    Apply,
    Retry(RememberedOutcome),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sessions {
    by_id: BTreeMap<u64, Session>,
    /// (last_used_index, id) of every session: the first is the least recently used.
    by_recency: BTreeSet<(u64, u64)>,
    limits: SessionLimits,
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Sessions {
        assert!(limits.sessions_max >= 1, "at least one session must fit");
        Sessions {
            by_id: BTreeMap::new(),
            by_recency: BTreeSet::new(),
            limits,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn get(&self, id: u64) -> Option<&Session> {
        self.by_id.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.by_id.values()
    }

    /// Opens a session whose id is `index`. Returns the evicted session's id, if any.
    pub fn register(&mut self, index: u64) -> Option<u64> {
        assert!(!self.by_id.contains_key(&index), "log indexes are unique");
        let evicted = if self.by_id.len() >= self.limits.sessions_max {
            let &(_, oldest) = self
                .by_recency
                .first()
                .expect("sessions exist at the limit");
            self.remove(oldest);
            Some(oldest)
        } else {
            None
        };
        self.insert(Session {
            id: index,
            last_sequence: 0,
            last_used_index: index,
            remembered: None,
        });
        assert!(self.by_id.len() <= self.limits.sessions_max);
        evicted
    }

    /// Classifies a request and marks its session used at `index`.
    pub fn check(&mut self, request: ClientRequestId, index: u64) -> Result<SessionCheck, KvError> {
        let session = self.by_id.get(&request.session_id).ok_or_else(|| {
            KvError::with_detail(
                ErrorKind::SessionNotFound,
                format!("session {}", request.session_id),
            )
        })?;
        let check = if request.sequence > session.last_sequence {
            SessionCheck::Apply
        } else if request.sequence == session.last_sequence {
            let remembered = session
                .remembered
                .clone()
                .expect("an applied sequence has an outcome");
            SessionCheck::Retry(remembered)
        } else {
            return Err(KvError::with_detail(
                ErrorKind::StaleSequence,
                format!(
                    "session {} sequence {}, last applied {}",
                    request.session_id, request.sequence, session.last_sequence
                ),
            ));
        };
        self.touch(request.session_id, index);
        Ok(check)
    }

    /// Records the outcome of a newly applied request, or only that it was applied when the
    /// outcome is over the per-session byte bound.
    pub fn remember(&mut self, request: ClientRequestId, outcome: RememberedOutcome) {
        let response_bytes = outcome.encoded_len();
        let outcome = if response_bytes > self.limits.session_response_bytes_max {
            RememberedOutcome {
                outcome: Some(remembered_outcome::Outcome::NotRetained(NotRetained {
                    response_bytes: response_bytes as u64,
                })),
            }
        } else {
            outcome
        };
        let session = self
            .by_id
            .get_mut(&request.session_id)
            .expect("checked just before applying");
        assert!(request.sequence > session.last_sequence);
        session.last_sequence = request.sequence;
        session.remembered = Some(outcome);
    }

    /// Drops the given sessions; unknown ids are skipped. Returns how many were dropped.
    pub fn expire(&mut self, ids: &[u64]) -> u64 {
        ids.iter().filter(|&&id| self.remove(id)).count() as u64
    }

    fn touch(&mut self, id: u64, index: u64) {
        let session = self.by_id.get_mut(&id).expect("session exists");
        let removed = self.by_recency.remove(&(session.last_used_index, id));
        assert!(removed, "recency index lists every session");
        session.last_used_index = index;
        self.by_recency.insert((index, id));
    }

    fn insert(&mut self, session: Session) {
        self.by_recency
            .insert((session.last_used_index, session.id));
        self.by_id.insert(session.id, session);
        assert_eq!(self.by_id.len(), self.by_recency.len());
    }

    fn remove(&mut self, id: u64) -> bool {
        let Some(session) = self.by_id.remove(&id) else {
            return false;
        };
        let removed = self.by_recency.remove(&(session.last_used_index, id));
        assert!(removed, "recency index lists every session");
        true
    }

    /// Restores one session from a snapshot.
    pub fn restore(
        &mut self,
        id: u64,
        last_sequence: u64,
        last_used_index: u64,
        remembered: Option<RememberedOutcome>,
    ) -> Result<(), String> {
        if id == 0 || self.by_id.contains_key(&id) {
            return Err(format!("session id {id} is zero or appears twice"));
        }
        if (last_sequence == 0) != remembered.is_none() {
            return Err(format!(
                "session {id}: an outcome must be remembered exactly when a request was applied"
            ));
        }
        if self.by_id.len() >= self.limits.sessions_max {
            return Err(format!(
                "more sessions than the limit of {}",
                self.limits.sessions_max
            ));
        }
        self.insert(Session {
            id,
            last_sequence,
            last_used_index,
            remembered,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::flotilla::kv::v1::Failure;

    use super::*;

    fn failure(detail: &str) -> RememberedOutcome {
        RememberedOutcome {
            outcome: Some(remembered_outcome::Outcome::Failure(Failure {
                kind: 1,
                detail: detail.into(),
            })),
        }
    }

    fn request(session_id: u64, sequence: u64) -> ClientRequestId {
        ClientRequestId {
            session_id,
            sequence,
        }
    }

    #[test]
    fn new_retry_and_stale_sequences() {
        let mut sessions = Sessions::new(SessionLimits::default());
        sessions.register(10);
        assert!(matches!(
            sessions.check(request(10, 1), 11),
            Ok(SessionCheck::Apply)
        ));
        sessions.remember(request(10, 1), failure("first"));
        match sessions.check(request(10, 1), 12) {
            Ok(SessionCheck::Retry(outcome)) => assert_eq!(outcome, failure("first")),
            other => panic!("expected a retry, got {other:?}"),
        }
        // Gaps are fine (a request the client gave up on may never arrive).
        assert!(matches!(
            sessions.check(request(10, 5), 13),
            Ok(SessionCheck::Apply)
        ));
        sessions.remember(request(10, 5), failure("fifth"));
        let stale = sessions.check(request(10, 4), 14).unwrap_err();
        assert_eq!(stale.kind(), ErrorKind::StaleSequence);
        let unknown = sessions.check(request(99, 1), 15).unwrap_err();
        assert_eq!(unknown.kind(), ErrorKind::SessionNotFound);
    }

    #[test]
    fn registering_past_the_limit_evicts_the_least_recently_used() {
        let limits = SessionLimits {
            sessions_max: 2,
            ..SessionLimits::default()
        };
        let mut sessions = Sessions::new(limits);
        assert_eq!(sessions.register(1), None);
        assert_eq!(sessions.register(2), None);
        sessions.check(request(1, 1), 3).unwrap(); // session 1 used more recently than 2
        assert_eq!(sessions.register(4), Some(2));
        assert!(sessions.get(2).is_none());
        assert_eq!(sessions.register(5), Some(1));
        assert_eq!(sessions.len(), 2);
    }

    #[test]
    fn oversized_outcomes_are_not_retained() {
        let limits = SessionLimits {
            session_response_bytes_max: 8,
            ..SessionLimits::default()
        };
        let mut sessions = Sessions::new(limits);
        sessions.register(1);
        sessions.check(request(1, 1), 2).unwrap();
        sessions.remember(request(1, 1), failure("a detail longer than eight bytes"));
        let Ok(SessionCheck::Retry(outcome)) = sessions.check(request(1, 1), 3) else {
            panic!("expected a retry");
        };
        assert!(matches!(
            outcome.outcome,
            Some(remembered_outcome::Outcome::NotRetained(_))
        ));
    }

    #[test]
    fn expire_drops_named_sessions_only() {
        let mut sessions = Sessions::new(SessionLimits::default());
        sessions.register(1);
        sessions.register(2);
        assert_eq!(sessions.expire(&[2, 3]), 1);
        assert!(sessions.get(1).is_some());
        assert!(sessions.get(2).is_none());
    }
}
