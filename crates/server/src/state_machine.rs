//! The replicated state of a member: the key-value store and the member table, applied entry by
//! entry, saved and restored together as one snapshot.
//!
//! # Snapshot format
//!
//! ```text
//! magic            8 bytes  "FLSRVSN1"
//! member table     u32 LE length, then a flotilla.peer.v1.MemberTableState (with the alarms
//!                  and the auth store)
//! key-value store  the rest: flotilla-kv's own snapshot format (with its own checksum)
//! ```

use std::io::{self, Read, Write};
use std::sync::Arc;

use flotilla_kv::{ApplyResult, KvStore, Limits};
use flotilla_proto::mvccpb::Event;
use flotilla_raft::{Entry, EntryPayload, Index};

use flotilla_proto::etcdserverpb::AlarmMember;
use prost::Message;

use flotilla_runtime::Origin;

use crate::alarms::Alarms;
use crate::auth::{AuthApplied, AuthError, AuthStore};
use crate::members::{MemberTable, MemberTableDecodeError, decode_server_command};
use crate::peer_proto::{MemberInfo, MemberTableState, server_command};

const SNAPSHOT_MAGIC: &[u8; 8] = b"FLSRVSN1";
/// A member table is small; refuse absurd lengths from a corrupt snapshot.
const MEMBER_TABLE_BYTES_MAX: u32 = 16 << 20;

/// What applying one entry produced, for the client that proposed it.
#[derive(Debug, PartialEq)]
pub enum Applied {
    /// A key-value command.
    Kv(ApplyResult),
    /// A membership change: the members after it.
    Members {
        members: Vec<MemberInfo>,
        revision: i64,
    },
    /// An alarm change: the alarms it changed (none if it changed nothing).
    Alarm {
        changed: Vec<AlarmMember>,
        revision: i64,
    },
    /// An auth command: what the member's tokens must learn, or why it was refused.
    Auth {
        outcome: Result<AuthApplied, AuthError>,
        revision: i64,
    },
    /// A server command, a blank entry, or an entry that failed to decode.
    Server { revision: i64 },
}

impl Applied {
    pub fn revision(&self) -> i64 {
        match self {
            Applied::Kv(result) => result.revision,
            Applied::Members { revision, .. }
            | Applied::Alarm { revision, .. }
            | Applied::Auth { revision, .. }
            | Applied::Server { revision } => *revision,
        }
    }
}

/// Learns what the apply thread applies, while it holds the state machine's write lock (so an
/// observer that also takes the read lock sees each change and the state agree).
///
/// The watch hub takes the events of every write, in revision order; the lessor takes the
/// leases granted (for the leader's expiry clock).
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// The events of one revision.
    fn publish(&self, revision: i64, events: &[Event]);

    /// A snapshot replaced the whole state; the revisions after `previous_revision` up to the
    /// snapshot's were never published.
    fn state_replaced(&self, _previous_revision: i64) {}

    /// A lease was granted with this TTL.
    fn lease_granted(&self, _id: i64, _ttl_seconds: i64) {}

    /// An auth command applied: tokens to register or revoke.
    fn auth_applied(&self, _applied: &AuthApplied) {}
}

/// Drops everything (a member without watchers or leases, in tests).
#[derive(Debug, Default)]
pub struct NoWatchers;

impl EventSink for NoWatchers {
    fn publish(&self, _revision: i64, _events: &[Event]) {}
}

/// A snapshot being written in steps (see [`StateMachine::begin_snapshot`]).
#[derive(Debug)]
pub struct StateSnapshotCursor {
    /// The magic bytes and the member table, until the first step writes them.
    head: Option<Vec<u8>>,
    kv: flotilla_kv::SnapshotCursor,
}

/// The key-value store, the member table, the alarms and the auth store.
#[derive(Debug)]
pub struct StateMachine {
    pub kv: KvStore,
    pub members: MemberTable,
    /// Decide what the store admits (see [`Alarms::admission`]).
    pub alarms: Alarms,
    /// Users, roles, and who may run which command (see [`crate::auth`]).
    pub auth: AuthStore,
    limits: Limits,
    /// Told what each entry the runtime applies did (see [`EventSink`]); a restored state
    /// keeps it.
    events: Arc<dyn EventSink>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("I/O error reading the snapshot: {0}")]
    Io(#[from] io::Error),
    #[error("not a Flotilla server snapshot (bad magic bytes)")]
    BadMagic,
    #[error("the member table is {0} bytes, over the limit")]
    TableTooLarge(u32),
    #[error(transparent)]
    Table(#[from] crate::members::MemberTableDecodeError),
    #[error("the key-value snapshot is invalid: {0}")]
    Kv(#[from] flotilla_kv::SnapshotError),
}

impl StateMachine {
    pub fn new(limits: Limits, members: MemberTable) -> StateMachine {
        StateMachine {
            kv: KvStore::new(limits.clone()),
            members,
            alarms: Alarms::default(),
            auth: AuthStore::default(),
            limits,
            events: Arc::new(NoWatchers),
        }
    }

    /// This state machine, telling `events` what the runtime applies to it (see
    /// [`EventSink`]). A state machine applied through [`StateMachine::apply_entry`] alone
    /// tells no one.
    pub fn with_events(mut self, events: Arc<dyn EventSink>) -> StateMachine {
        self.events = events;
        self
    }

    pub fn applied_index(&self) -> Index {
        self.kv.applied_index()
    }

    /// Applies one committed entry.
    pub fn apply_entry(&mut self, entry: &Entry) -> Applied {
        match &entry.payload {
            EntryPayload::Command(data) => match decode_server_command(data) {
                None => Applied::Kv(self.kv.apply_admitted(
                    entry.index,
                    data,
                    self.alarms.admission(),
                    &self.auth,
                )),
                Some(decoded) => {
                    self.kv.skip_index(entry.index);
                    let revision = self.kv.current_revision();
                    match decoded {
                        Ok(crate::peer_proto::ServerCommand {
                            command: Some(server_command::Command::Alarm(request)),
                        }) => {
                            let changed = self.alarms.apply(&request);
                            if !changed.is_empty() {
                                tracing::warn!(index = entry.index, ?request, "alarms changed");
                            }
                            return Applied::Alarm { changed, revision };
                        }
                        Ok(crate::peer_proto::ServerCommand {
                            command: Some(server_command::Command::Auth(command)),
                        }) => {
                            let outcome = self.auth.apply(entry.index, &command);
                            if let Err(error) = &outcome {
                                tracing::debug!(
                                    index = entry.index,
                                    "auth command refused: {error}"
                                );
                            }
                            return Applied::Auth { outcome, revision };
                        }
                        Ok(command) => self.members.apply_command(&command),
                        // Every member reads the same bytes the same way: ignore alike.
                        Err(err) => tracing::warn!(
                            index = entry.index,
                            "ignoring a server command that does not decode: {err}"
                        ),
                    }
                    Applied::Server { revision }
                }
            },
            EntryPayload::Blank => {
                self.kv.skip_index(entry.index);
                Applied::Server {
                    revision: self.kv.current_revision(),
                }
            }
            EntryPayload::Membership(change) => {
                self.kv.skip_index(entry.index);
                self.members
                    .apply_membership(&change.membership, &change.context);
                // The members after the change: while the configuration is joint, outgoing
                // voters stay in the table (peers still talk to them) but are no longer listed.
                let incoming = &change.membership;
                let members = self
                    .members
                    .infos()
                    .into_iter()
                    .filter(|m| {
                        incoming.voters.contains(&m.id) || incoming.learners.contains(&m.id)
                    })
                    .collect();
                Applied::Members {
                    members,
                    revision: self.kv.current_revision(),
                }
            }
        }
    }

    /// Writes the whole state, streamed.
    pub fn write_snapshot(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(&self.snapshot_head())?;
        let mut out = out;
        self.kv.write_snapshot(&mut out)
    }

    /// What a snapshot holds before the key-value state: the magic bytes, the member table
    /// and the alarms.
    fn snapshot_head(&self) -> Vec<u8> {
        let mut head = Vec::new();
        head.extend_from_slice(SNAPSHOT_MAGIC);
        let table = MemberTableState {
            alarms: self.alarms.to_members(),
            auth: Some(self.auth.to_state()),
            ..self.members.to_state()
        }
        .encode_to_vec();
        let length = u32::try_from(table.len()).expect("the member table is bounded");
        head.extend_from_slice(&length.to_le_bytes());
        head.extend_from_slice(&table);
        head
    }

    /// Starts a snapshot of the state as it is now, written in steps by
    /// [`StateMachine::continue_snapshot`] while later entries apply (see
    /// [`flotilla_kv::SnapshotCursor`]); the bytes are those `write_snapshot` writes now.
    pub fn begin_snapshot(&mut self) -> StateSnapshotCursor {
        StateSnapshotCursor {
            head: Some(self.snapshot_head()),
            kv: self.kv.begin_snapshot(),
        }
    }

    /// Appends the next part of the snapshot to `out` (about `bytes_target` bytes); true once
    /// it is complete. Fails if the state was replaced since the snapshot began.
    pub fn continue_snapshot(
        &self,
        cursor: &mut StateSnapshotCursor,
        out: &mut Vec<u8>,
        bytes_target: usize,
    ) -> io::Result<bool> {
        if let Some(head) = cursor.head.take() {
            out.extend_from_slice(&head);
        }
        self.kv.continue_snapshot(&mut cursor.kv, out, bytes_target)
    }

    /// Ends the snapshot, written or abandoned (a compaction it deferred runs now).
    pub fn end_snapshot(&mut self, cursor: StateSnapshotCursor) {
        self.kv.end_snapshot(cursor.kv);
    }

    /// Reads a state written by [`StateMachine::write_snapshot`].
    pub fn restore(input: &mut dyn Read, limits: Limits) -> Result<StateMachine, RestoreError> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != SNAPSHOT_MAGIC {
            return Err(RestoreError::BadMagic);
        }
        let mut length = [0u8; 4];
        input.read_exact(&mut length)?;
        let length = u32::from_le_bytes(length);
        if length > MEMBER_TABLE_BYTES_MAX {
            return Err(RestoreError::TableTooLarge(length));
        }
        let mut table = vec![0u8; length as usize];
        input.read_exact(&mut table)?;
        let table = MemberTableState::decode(&table[..])
            .map_err(|e| MemberTableDecodeError::new(e.to_string()))?;
        let members = MemberTable::from_state(&table);
        let alarms = Alarms::from_members(&table.alarms);
        let auth = AuthStore::from_state(table.auth.as_ref());
        let mut input = input;
        let kv = KvStore::restore(&mut input, limits.clone())?;
        Ok(StateMachine {
            kv,
            members,
            alarms,
            auth,
            limits,
            events: Arc::new(NoWatchers),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Tells the observers (watch hub, lessor) what one applied key-value command did.
    fn observe(&self, result: &flotilla_kv::ApplyResult) {
        if !result.events.is_empty() {
            self.events.publish(result.revision, &result.events);
        }
        if let Ok(flotilla_kv::Response::LeaseGrant(grant)) = &result.outcome
            && !result.duplicate
        {
            self.events.lease_granted(grant.id, grant.ttl);
        }
    }
}

/// The member's state as the runtime applies it: every entry through
/// [`StateMachine::apply_entry`], then its observers told (under the state's write lock, so an
/// observer that also takes the read lock sees each change and the state agree).
impl flotilla_runtime::StateMachine for StateMachine {
    type Output = Applied;
    type SnapshotCursor = StateSnapshotCursor;

    fn applied_index(&self) -> Index {
        self.kv.applied_index()
    }

    fn apply(&mut self, entry: &Entry) -> Applied {
        let applied = self.apply_entry(entry);
        match &applied {
            Applied::Kv(result) => self.observe(result),
            Applied::Auth {
                outcome: Ok(auth), ..
            } => self.events.auth_applied(auth),
            _ => {}
        }
        applied
    }

    fn origin(output: &Applied) -> Option<Origin> {
        let Applied::Kv(result) = output else {
            return None;
        };
        result.origin.as_ref().map(|origin| Origin {
            member_id: origin.member_id,
            request: origin.request,
        })
    }

    fn begin_snapshot(&mut self) -> StateSnapshotCursor {
        StateMachine::begin_snapshot(self)
    }

    fn continue_snapshot(
        &self,
        cursor: &mut StateSnapshotCursor,
        out: &mut Vec<u8>,
        bytes_max: usize,
    ) -> io::Result<bool> {
        StateMachine::continue_snapshot(self, cursor, out, bytes_max)
    }

    fn end_snapshot(&mut self, cursor: StateSnapshotCursor) {
        StateMachine::end_snapshot(self, cursor);
    }

    fn empty(&self) -> StateMachine {
        StateMachine::new(self.limits.clone(), MemberTable::default())
            .with_events(self.events.clone())
    }

    fn restore(&mut self, snapshot: &mut dyn Read) -> Result<(), String> {
        let restored =
            StateMachine::restore(snapshot, self.limits.clone()).map_err(|e| e.to_string())?;
        *self = restored.with_events(self.events.clone());
        Ok(())
    }

    fn replace(&mut self, restored: StateMachine) {
        let previous_revision = self.kv.current_revision();
        *self = restored;
        self.events.state_replaced(previous_revision);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use flotilla_kv::Command;
    use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest};
    use flotilla_raft::{Membership, MembershipEntry};

    use super::*;
    use crate::members::Member;

    fn entry(index: Index, payload: EntryPayload) -> Entry {
        Entry {
            term: 1,
            index,
            payload,
        }
    }

    #[test]
    fn snapshot_round_trips_store_and_members() {
        let table = MemberTable::from_members([Member {
            id: 1,
            name: "one".into(),
            peer_urls: vec!["http://127.0.0.1:1".into()],
            ..Member::default()
        }]);
        let mut machine = StateMachine::new(Limits::default(), table);
        machine.apply_entry(&entry(1, EntryPayload::Blank));
        let put = Command::put(PutRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        });
        let applied = machine.apply_entry(&entry(2, EntryPayload::Command(put.encode())));
        assert_eq!(applied.revision(), 2);
        let mut membership = Membership::with_voters([1]);
        membership.learners.insert(2);
        machine.apply_entry(&entry(
            3,
            EntryPayload::Membership(MembershipEntry {
                membership,
                context: Bytes::new(),
            }),
        ));

        let raise = crate::peer_proto::ServerCommand {
            command: Some(server_command::Command::Alarm(
                flotilla_proto::etcdserverpb::AlarmRequest {
                    action: 1,
                    member_id: 1,
                    alarm: 1,
                },
            )),
        };
        let raise = crate::members::encode_server_command(&raise);
        let applied = machine.apply_entry(&entry(4, EntryPayload::Command(raise)));
        assert!(matches!(applied, Applied::Alarm { ref changed, .. } if changed.len() == 1));
        let refused = machine.apply_entry(&entry(5, EntryPayload::Command(put.encode())));
        assert!(matches!(refused, Applied::Kv(ref r) if r.outcome.is_err()));

        let mut bytes = Vec::new();
        machine.write_snapshot(&mut bytes).unwrap();
        let restored = StateMachine::restore(&mut &bytes[..], Limits::default()).unwrap();
        assert_eq!(restored.alarms, machine.alarms);
        assert_eq!(
            restored.alarms.admission(),
            flotilla_kv::Admission::NoNewSpace
        );
        assert_eq!(restored.members, machine.members);
        assert_eq!(restored.kv.digest(), machine.kv.digest());
        assert_eq!(restored.applied_index(), 5);
        let read = restored
            .kv
            .range(&RangeRequest {
                key: "k".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(read.kvs[0].value, "v");
    }

    #[test]
    fn a_corrupt_snapshot_is_refused() {
        let machine = StateMachine::new(Limits::default(), MemberTable::default());
        let mut bytes = Vec::new();
        machine.write_snapshot(&mut bytes).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(StateMachine::restore(&mut &bytes[..], Limits::default()).is_err());
        assert!(matches!(
            StateMachine::restore(&mut &b"nonsense-bytes"[..], Limits::default()),
            Err(RestoreError::BadMagic)
        ));
    }

    /// The member's state machine meets the runtime's contract (determinism, snapshots that
    /// restore equivalently and hold the state they began at) on a mix of etcd commands:
    /// puts with and without leases, deletes, transactions, compactions, lease grants and
    /// revocations, sessions, and bytes that are no command.
    #[test]
    fn the_member_state_passes_the_runtimes_state_machine_suite() {
        use flotilla_proto::etcdserverpb::{
            CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
            RequestOp, TxnRequest, compare, request_op,
        };
        let put = |key: String, value: usize, lease: i64| {
            Command::put(PutRequest {
                key: key.into(),
                value: format!("value {value}").into(),
                lease,
                ..Default::default()
            })
        };
        let mut commands = vec![Command::lease_grant(LeaseGrantRequest { ttl: 60, id: 7 })];
        for i in 0..200usize {
            let command = match i % 10 {
                0 => Command::delete_range(DeleteRangeRequest {
                    key: format!("k{}", i % 13).into(),
                    ..Default::default()
                }),
                1 => Command::txn(TxnRequest {
                    compare: vec![Compare {
                        key: format!("k{}", i % 7).into(),
                        target: compare::CompareTarget::Version as i32,
                        result: compare::CompareResult::Greater as i32,
                        target_union: Some(compare::TargetUnion::Version(0)),
                        ..Default::default()
                    }],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: b"txn".to_vec().into(),
                            value: format!("{i}").into(),
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                }),
                2 if i > 100 => Command::compaction(CompactionRequest {
                    revision: (i / 2) as i64,
                    physical: false,
                }),
                3 => put(format!("leased{}", i % 5), i, 7),
                4 if i == 154 => Command::lease_revoke(LeaseRevokeRequest { id: 7 }),
                5 => Command::register_session(),
                _ => put(format!("k{}", i % 17), i, 0),
            };
            commands.push(command);
        }
        let mut commands: Vec<Bytes> = commands.iter().map(Command::encode).collect();
        commands.push(Bytes::from_static(b"\xffnot a command"));
        flotilla_runtime::conformance::state_machine::run_suite(
            || StateMachine::new(Limits::default(), MemberTable::default()),
            &commands,
        );
    }
}
