//! Duplicate suppression for any state machine: client sessions with numbered commands
//! (Raft thesis §6.3).
//!
//! A client whose request timed out cannot tell whether its command was applied; sent again,
//! it must not apply twice. So a client first registers (its id is the index of its
//! registration entry, the same on every member), then numbers its commands 1, 2, 3, ...
//! [`Sessions`] wraps the application's state machine and remembers, per client, the highest
//! number applied and its output: a command that comes again gets the remembered output and
//! is not applied again.
//!
//! The table is bounded ([`Sessions::new`]'s `clients_max`): registering one client too many
//! expires the client that has gone longest without a command, chosen by log index, so every
//! member expires the same one. An expired client's commands are refused
//! ([`SessionReply::Expired`]), never applied twice: it registers again and gives up the
//! commands whose outcome it did not learn.
//!
//! ```text
//! command = client id (u64 LE) | sequence (u64 LE, from 1) | the application's command
//! register = client id 0 | sequence 0
//! ```

use std::collections::BTreeMap;
use std::io::{self, Read};

use bytes::{Buf, Bytes};
use flotilla_raft::{Entry, EntryPayload, Index};

use crate::state_machine::StateMachine;

const HEADER_BYTES: usize = 16;
/// A session table in a snapshot longer than this is refused as corrupt.
const TABLE_BYTES_MAX: u64 = 1 << 30;

/// An output that a session remembers, and so must survive a snapshot.
pub trait RememberedOutput: Clone + Send + Sync + 'static {
    /// Appends the output's encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// The output `encode` wrote; an error says what was wrong.
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

/// A client's side of a session: numbers its commands.
#[derive(Clone, Debug)]
pub struct SessionClient {
    id: u64,
    next_sequence: u64,
}

impl SessionClient {
    /// The command that registers a new client; its [`SessionReply::Registered`] carries the
    /// client's id.
    pub fn register() -> Bytes {
        Bytes::from(vec![0u8; HEADER_BYTES])
    }

    /// The client registered under `id`.
    pub fn new(id: u64) -> SessionClient {
        SessionClient {
            id,
            next_sequence: 1,
        }
    }

    /// `command` numbered as this client's next one. To retry it after an unknown outcome,
    /// propose the same bytes again.
    pub fn next(&mut self, command: &[u8]) -> Bytes {
        let mut framed = Vec::with_capacity(HEADER_BYTES + command.len());
        framed.extend_from_slice(&self.id.to_le_bytes());
        framed.extend_from_slice(&self.next_sequence.to_le_bytes());
        framed.extend_from_slice(command);
        self.next_sequence += 1;
        Bytes::from(framed)
    }
}

/// What a command proposed through [`Sessions`] got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionReply<O> {
    /// Applied now, with the application's output.
    Applied(O),
    /// Applied before: the output it had then (it was not applied again).
    Repeated(O),
    /// A new client registered with this id.
    Registered {
        /// The new client's id: the index of its registration.
        client_id: u64,
    },
    /// Older than the latest command this client had applied, whose output was already
    /// given: a client sends its commands one after another.
    Stale {
        /// The client's latest command applied.
        latest: u64,
    },
    /// The client is unknown: never registered, or expired to make room.
    Expired {
        /// The client the command named.
        client_id: u64,
    },
    /// The entry carries no session header.
    Malformed(String),
    /// A blank or membership entry, applied to the application's state machine.
    NotACommand(O),
}

/// The application's state machine, with a session table in front of it.
#[derive(Debug)]
pub struct Sessions<S: StateMachine> {
    inner: S,
    clients: BTreeMap<u64, Session<S::Output>>,
    clients_max: usize,
}

/// One client's latest command.
#[derive(Clone, Debug)]
struct Session<O> {
    sequence: u64,
    /// `None` until the client's first command.
    output: Option<O>,
    /// The index of the client's latest entry (registration or command): the least recent
    /// expires first.
    used_at: Index,
}

/// A snapshot of [`Sessions`]: the session table, encoded when it began, then the
/// application's own steps.
#[derive(Debug)]
pub struct SessionsCursor<C> {
    table: Option<Vec<u8>>,
    inner: C,
}

impl<S: StateMachine> Sessions<S>
where
    S::Output: RememberedOutput,
{
    /// `inner` behind a session table of at most `clients_max` clients (at least 1).
    pub fn new(inner: S, clients_max: usize) -> Sessions<S> {
        Sessions {
            inner,
            clients: BTreeMap::new(),
            clients_max: clients_max.max(1),
        }
    }

    /// The application's state machine.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Clients with a session now.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    fn register(&mut self, index: Index) -> SessionReply<S::Output> {
        if self.clients.len() >= self.clients_max
            && let Some(idle) = self
                .clients
                .iter()
                .min_by_key(|(_, session)| session.used_at)
                .map(|(id, _)| *id)
        {
            self.clients.remove(&idle);
        }
        let session = Session {
            sequence: 0,
            output: None,
            used_at: index,
        };
        self.clients.insert(index, session);
        SessionReply::Registered { client_id: index }
    }

    fn apply_command(&mut self, entry: &Entry, data: &Bytes) -> SessionReply<S::Output> {
        if data.len() < HEADER_BYTES {
            return SessionReply::Malformed(format!(
                "a command of {} bytes has no session header ({HEADER_BYTES} bytes)",
                data.len()
            ));
        }
        let field = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8"));
        let (client_id, sequence) = (field(0), field(8));
        if client_id == 0 && sequence == 0 {
            return self.register(entry.index);
        }
        if sequence == 0 {
            return SessionReply::Malformed("sequence numbers start at 1".into());
        }
        let Some(session) = self.clients.get_mut(&client_id) else {
            return SessionReply::Expired { client_id };
        };
        if sequence < session.sequence {
            return SessionReply::Stale {
                latest: session.sequence,
            };
        }
        session.used_at = entry.index;
        if sequence == session.sequence
            && let Some(output) = &session.output
        {
            return SessionReply::Repeated(output.clone());
        }
        let command = Entry {
            term: entry.term,
            index: entry.index,
            payload: EntryPayload::Command(data.slice(HEADER_BYTES..)),
        };
        let output = self.inner.apply(&command);
        session.sequence = sequence;
        session.output = Some(output.clone());
        SessionReply::Applied(output)
    }

    fn encode_table(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.clients.len() as u64).to_le_bytes());
        for (id, session) in &self.clients {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&session.sequence.to_le_bytes());
            out.extend_from_slice(&session.used_at.to_le_bytes());
            let mut output = Vec::new();
            if let Some(remembered) = &session.output {
                output.push(1);
                remembered.encode(&mut output);
            } else {
                output.push(0);
            }
            out.extend_from_slice(&(output.len() as u64).to_le_bytes());
            out.extend_from_slice(&output);
        }
        out
    }

    fn decode_table(bytes: &[u8]) -> Result<BTreeMap<u64, Session<S::Output>>, String> {
        let mut rest = bytes;
        let ends_early = || "the session table ends early".to_string();
        let u64_at = |rest: &mut &[u8]| {
            (rest.remaining() >= 8)
                .then(|| rest.get_u64_le())
                .ok_or_else(ends_early)
        };
        let count = u64_at(&mut rest)?;
        let mut clients = BTreeMap::new();
        for _ in 0..count {
            let id = u64_at(&mut rest)?;
            let sequence = u64_at(&mut rest)?;
            let used_at = u64_at(&mut rest)?;
            let length = u64_at(&mut rest)?;
            let length = usize::try_from(length).map_err(|e| e.to_string())?;
            if rest.len() < length {
                return Err(ends_early());
            }
            let (output, tail) = rest.split_at(length);
            rest = tail;
            let output = match output.split_first() {
                Some((0, [])) => None,
                Some((1, encoded)) => Some(S::Output::decode(encoded)?),
                _ => return Err(format!("client {id}'s remembered output is malformed")),
            };
            let session = Session {
                sequence,
                output,
                used_at,
            };
            clients.insert(id, session);
        }
        if !rest.is_empty() {
            return Err(format!("{} bytes after the session table", rest.len()));
        }
        Ok(clients)
    }
}

impl<S: StateMachine> StateMachine for Sessions<S>
where
    S::Output: RememberedOutput,
{
    type Output = SessionReply<S::Output>;
    type SnapshotCursor = SessionsCursor<S::SnapshotCursor>;

    fn applied_index(&self) -> Index {
        self.inner.applied_index()
    }

    fn origin(output: &Self::Output) -> Option<crate::state_machine::Origin> {
        match output {
            SessionReply::Applied(inner)
            | SessionReply::Repeated(inner)
            | SessionReply::NotACommand(inner) => S::origin(inner),
            _ => None,
        }
    }

    fn apply(&mut self, entry: &Entry) -> Self::Output {
        let EntryPayload::Command(data) = &entry.payload else {
            return SessionReply::NotACommand(self.inner.apply(entry));
        };
        let reply = self.apply_command(entry, data);
        if !matches!(reply, SessionReply::Applied(_)) {
            // Nothing reached the application, but the index did: tell it with a blank.
            let blank = Entry {
                term: entry.term,
                index: entry.index,
                payload: EntryPayload::Blank,
            };
            let _ = self.inner.apply(&blank);
        }
        reply
    }

    fn begin_snapshot(&mut self) -> Self::SnapshotCursor {
        let table = self.encode_table();
        let mut framed = Vec::with_capacity(8 + table.len());
        framed.extend_from_slice(&(table.len() as u64).to_le_bytes());
        framed.extend_from_slice(&table);
        SessionsCursor {
            table: Some(framed),
            inner: self.inner.begin_snapshot(),
        }
    }

    fn continue_snapshot(
        &self,
        cursor: &mut Self::SnapshotCursor,
        out: &mut Vec<u8>,
        bytes_max: usize,
    ) -> io::Result<bool> {
        if let Some(table) = cursor.table.take() {
            out.extend_from_slice(&table);
        }
        self.inner
            .continue_snapshot(&mut cursor.inner, out, bytes_max)
    }

    fn end_snapshot(&mut self, cursor: Self::SnapshotCursor) {
        self.inner.end_snapshot(cursor.inner);
    }

    fn empty(&self) -> Self {
        Sessions {
            inner: self.inner.empty(),
            clients: BTreeMap::new(),
            clients_max: self.clients_max,
        }
    }

    fn restore(&mut self, snapshot: &mut dyn Read) -> Result<(), String> {
        let mut length = [0u8; 8];
        snapshot
            .read_exact(&mut length)
            .map_err(|e| format!("reading the session table's length: {e}"))?;
        let length = u64::from_le_bytes(length);
        if length > TABLE_BYTES_MAX {
            return Err(format!(
                "a session table of {length} bytes is over the limit"
            ));
        }
        let mut table = vec![0u8; length as usize];
        snapshot
            .read_exact(&mut table)
            .map_err(|e| format!("reading the session table: {e}"))?;
        self.clients = Self::decode_table(&table)?;
        self.inner.restore(snapshot)
    }

    fn replace(&mut self, restored: Self) {
        self.clients = restored.clients;
        self.clients_max = restored.clients_max;
        self.inner.replace(restored.inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::SmallStateMachine;

    /// Adds each command's first byte to a total; the output is the new total.
    #[derive(Debug, Default)]
    struct Counter {
        applied: Index,
        total: u64,
    }

    impl RememberedOutput for u64 {
        fn encode(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.to_le_bytes());
        }
        fn decode(bytes: &[u8]) -> Result<u64, String> {
            Ok(u64::from_le_bytes(
                bytes.try_into().map_err(|_| "not 8 bytes")?,
            ))
        }
    }

    impl SmallStateMachine for Counter {
        type Output = u64;
        fn applied_index(&self) -> Index {
            self.applied
        }
        fn apply_command(&mut self, index: Index, command: &[u8]) -> u64 {
            self.applied = index;
            self.total += u64::from(command[0]);
            self.total
        }
        fn apply_other(&mut self, index: Index) -> u64 {
            self.applied = index;
            self.total
        }
        fn snapshot(&self) -> Vec<u8> {
            [self.applied.to_le_bytes(), self.total.to_le_bytes()].concat()
        }
        fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
            let field = |at: usize| u64::from_le_bytes(snapshot[at..at + 8].try_into().unwrap());
            (self.applied, self.total) = (field(0), field(8));
            Ok(())
        }
    }

    /// Applies commands at consecutive indexes.
    struct Log {
        machine: Sessions<Counter>,
        next_index: Index,
    }

    impl Log {
        fn new(clients_max: usize) -> Log {
            Log {
                machine: Sessions::new(Counter::default(), clients_max),
                next_index: 1,
            }
        }

        fn apply(&mut self, data: Bytes) -> SessionReply<u64> {
            let entry = Entry {
                term: 1,
                index: self.next_index,
                payload: EntryPayload::Command(data),
            };
            self.next_index += 1;
            self.machine.apply(&entry)
        }

        fn register(&mut self) -> SessionClient {
            match self.apply(SessionClient::register()) {
                SessionReply::Registered { client_id } => SessionClient::new(client_id),
                other => panic!("registration answered {other:?}"),
            }
        }
    }

    #[test]
    fn a_repeated_command_gets_its_output_again_and_is_not_applied_twice() {
        let mut log = Log::new(8);
        let mut client = log.register();
        let first = client.next(&[5]);
        assert_eq!(log.apply(first.clone()), SessionReply::Applied(5));
        assert_eq!(log.apply(first.clone()), SessionReply::Repeated(5));
        assert_eq!(log.machine.inner().total, 5, "applied once");
        assert_eq!(log.apply(client.next(&[2])), SessionReply::Applied(7));
        // The first command's answer was given before the second was sent.
        assert_eq!(log.apply(first), SessionReply::Stale { latest: 2 });
        assert_eq!(log.machine.inner().total, 7);
        // Every entry advanced the applied index, applied to the application or not.
        assert_eq!(log.machine.applied_index(), log.next_index - 1);
    }

    #[test]
    fn unknown_clients_and_headerless_commands_are_refused() {
        let mut log = Log::new(8);
        let mut stranger = SessionClient::new(42);
        assert_eq!(
            log.apply(stranger.next(&[1])),
            SessionReply::Expired { client_id: 42 }
        );
        assert!(matches!(
            log.apply(Bytes::from_static(b"short")),
            SessionReply::Malformed(_)
        ));
        let mut zero = [0u8; 17];
        zero[0] = 1; // client 1, sequence 0
        assert!(matches!(
            log.apply(Bytes::copy_from_slice(&zero)),
            SessionReply::Malformed(_)
        ));
        assert_eq!(log.machine.inner().total, 0);
    }

    /// With room for two, a third registration expires the client idle longest (by log
    /// index, so every member picks the same), whose commands are then refused.
    #[test]
    fn the_least_recently_used_client_expires_first() {
        let mut log = Log::new(2);
        let mut a = log.register();
        let mut b = log.register();
        log.apply(a.next(&[1])); // b is now the idle one
        let mut c = log.register();
        assert_eq!(log.machine.clients(), 2);
        assert!(matches!(
            log.apply(b.next(&[1])),
            SessionReply::Expired { .. }
        ));
        assert_eq!(log.apply(a.next(&[1])), SessionReply::Applied(2));
        assert_eq!(log.apply(c.next(&[1])), SessionReply::Applied(3));
    }

    /// The table travels in the snapshot: after a restore a repeat is still recognised.
    #[test]
    fn a_restored_state_remembers_its_sessions() {
        let mut log = Log::new(8);
        let mut client = log.register();
        let command = client.next(&[9]);
        log.apply(command.clone());
        let mut cursor = log.machine.begin_snapshot();
        let mut bytes = Vec::new();
        while !log
            .machine
            .continue_snapshot(&mut cursor, &mut bytes, 4)
            .unwrap()
        {}
        log.machine.end_snapshot(cursor);

        let mut restored = log.machine.empty();
        restored.restore(&mut &bytes[..]).unwrap();
        assert_eq!(restored.applied_index(), log.machine.applied_index());
        log.machine = restored;
        assert_eq!(log.apply(command), SessionReply::Repeated(9));
        assert_eq!(log.apply(client.next(&[1])), SessionReply::Applied(10));

        let mut corrupt = log.machine.empty();
        let error = corrupt.restore(&mut &bytes[..10]).unwrap_err();
        assert!(error.contains("session table"), "{error}");
    }
}
