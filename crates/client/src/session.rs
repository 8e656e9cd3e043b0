//! The client side of Flotilla's duplicate suppression (`flotilla.session.v1`, Raft thesis
//! §6.3).
//!
//! The server's state machine remembers, per session, the highest sequence number applied and
//! that request's response. So a session may have only one write in flight: the pool holds
//! `pool_size` sessions and a write borrows one for its whole life, retries included. Each
//! write takes the session's next sequence number and keeps it across retries, so however
//! many times it is sent, it is applied once. A write that gives up leaves its number behind;
//! the next write uses a higher one, and if the abandoned one is still in flight the server
//! refuses it as stale.
//!
//! If the server does not implement the Session service (etcd answers `UNIMPLEMENTED`), the
//! pool switches to plain mode for good and says so in the log.

use std::sync::Mutex;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::SessionPolicy;

/// Whether writes carry sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionMode {
    /// No write has asked yet.
    Undecided,
    /// Writes carry a session and sequence number.
    Sessions,
    /// The server has no sessions (or they were turned off): plain etcd writes.
    Plain,
}

/// The two metadata values that tag a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionTag {
    pub session_id: u64,
    pub sequence: u64,
}

/// A registered session that no write is using.
#[derive(Debug)]
pub(crate) struct IdleSession {
    pub(crate) id: u64,
    /// The last sequence number handed out.
    pub(crate) last_sequence: u64,
}

#[derive(Debug)]
struct PoolState {
    mode: SessionMode,
    idle: Vec<IdleSession>,
}

#[derive(Debug)]
pub(crate) struct SessionPool {
    state: Mutex<PoolState>,
    /// One permit per session: bounds writes in flight to the pool size.
    permits: std::sync::Arc<Semaphore>,
}

/// A session lent to one write, handed back with [`SessionPool::give_back`]. A write whose
/// future is dropped mid-flight abandons its session instead: the server expires it, and the
/// pool registers a fresh one, so an in-flight request is never followed by a reuse of its
/// session.
#[derive(Debug)]
pub(crate) struct LentSession {
    pub(crate) tag: SessionTag,
    /// Set when the server no longer knows the session: it must not go back to the pool.
    pub(crate) lost: bool,
    _permit: OwnedSemaphorePermit,
}

impl SessionPool {
    pub(crate) fn new(policy: SessionPolicy) -> SessionPool {
        let (mode, pool_size) = match policy {
            SessionPolicy::Sessions { pool_size } => (SessionMode::Undecided, pool_size.max(1)),
            SessionPolicy::Plain => (SessionMode::Plain, 1),
        };
        SessionPool {
            state: Mutex::new(PoolState {
                mode,
                idle: Vec::new(),
            }),
            permits: std::sync::Arc::new(Semaphore::new(pool_size)),
        }
    }

    pub(crate) fn mode(&self) -> SessionMode {
        self.state.lock().expect("session pool lock").mode
    }

    /// Switches to plain writes for good (the server answered UNIMPLEMENTED).
    pub(crate) fn fall_back_to_plain(&self) {
        let mut state = self.state.lock().expect("session pool lock");
        if state.mode != SessionMode::Plain {
            tracing::info!(
                "the server does not implement flotilla.session.v1.Session (etcd?); \
                 writes are sent without duplicate suppression and are not retried once sent"
            );
        }
        state.mode = SessionMode::Plain;
        state.idle.clear();
    }

    pub(crate) fn mark_sessions_supported(&self) {
        let mut state = self.state.lock().expect("session pool lock");
        if state.mode == SessionMode::Undecided {
            state.mode = SessionMode::Sessions;
        }
    }

    /// Waits for a free slot. `Ok(None)` in plain mode. `Err(permit)` means a slot is free but
    /// holds no session yet: the caller registers one and calls [`SessionPool::lend_new`].
    pub(crate) async fn acquire(&self) -> Result<Option<LentSession>, OwnedSemaphorePermit> {
        if self.mode() == SessionMode::Plain {
            return Ok(None);
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the session semaphore is never closed");
        let mut state = self.state.lock().expect("session pool lock");
        if state.mode == SessionMode::Plain {
            return Ok(None);
        }
        match state.idle.pop() {
            Some(idle) => Ok(Some(LentSession {
                tag: SessionTag {
                    session_id: idle.id,
                    sequence: idle.last_sequence + 1,
                },
                lost: false,
                _permit: permit,
            })),
            None => Err(permit),
        }
    }

    /// Lends a freshly registered session.
    pub(crate) fn lend_new(&self, session_id: u64, permit: OwnedSemaphorePermit) -> LentSession {
        LentSession {
            tag: SessionTag {
                session_id,
                sequence: 1,
            },
            lost: false,
            _permit: permit,
        }
    }

    /// Takes a session back after a write. Its sequence number is spent whatever the outcome.
    pub(crate) fn give_back(&self, lent: LentSession) {
        if lent.lost {
            return;
        }
        let mut state = self.state.lock().expect("session pool lock");
        if state.mode == SessionMode::Plain {
            return;
        }
        state.idle.push(IdleSession {
            id: lent.tag.session_id,
            last_sequence: lent.tag.sequence,
        });
    }

    /// Removes every idle session, for closing them.
    pub(crate) fn drain_idle(&self) -> Vec<IdleSession> {
        std::mem::take(&mut self.state.lock().expect("session pool lock").idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_is_lent_to_one_write_at_a_time_with_rising_sequences() {
        let pool = SessionPool::new(SessionPolicy::Sessions { pool_size: 1 });
        let permit = pool.acquire().await.unwrap_err();
        let first = pool.lend_new(7, permit);
        assert_eq!(
            first.tag,
            SessionTag {
                session_id: 7,
                sequence: 1
            }
        );
        // The only slot is lent: a second write waits.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), pool.acquire());
        assert!(
            waiting.await.is_err(),
            "second write must wait for the session"
        );
        pool.give_back(first);
        let second = pool.acquire().await.unwrap().unwrap();
        assert_eq!(
            second.tag,
            SessionTag {
                session_id: 7,
                sequence: 2
            }
        );
    }

    #[tokio::test]
    async fn a_lost_session_is_not_reused() {
        let pool = SessionPool::new(SessionPolicy::Sessions { pool_size: 1 });
        let permit = pool.acquire().await.unwrap_err();
        let mut lent = pool.lend_new(7, permit);
        lent.lost = true;
        pool.give_back(lent);
        assert!(
            pool.acquire().await.is_err(),
            "a new session must be registered"
        );
    }

    #[tokio::test]
    async fn plain_mode_lends_nothing_and_does_not_serialise() {
        let pool = SessionPool::new(SessionPolicy::Sessions { pool_size: 1 });
        pool.fall_back_to_plain();
        assert_eq!(pool.mode(), SessionMode::Plain);
        assert!(pool.acquire().await.unwrap().is_none());
        assert!(pool.acquire().await.unwrap().is_none());
    }
}
