//! [`KvStore`]: the state machine. `apply(index, command)` is a pure function of the state
//! before it; reads are served from the applied state.

use flotilla_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, LeaseGrantRequest,
    LeaseGrantResponse, LeaseRevokeResponse, PutRequest, RangeRequest, RangeResponse, TxnRequest,
    TxnResponse,
};
use flotilla_proto::mvccpb::{Event, KeyValue};

use crate::authorize::{AllowAll, Authorizer};
use crate::command::{Command, Operation};
use crate::error::{ErrorKind, KvError};
use crate::key_range::KeyRange;
use crate::lease::{Lease, Leases};
use crate::limits::Limits;
use crate::mvcc::{EventBatch, Keyspace};
use crate::quota::Admission;
use crate::range::{RangePager, range, revision_header};
use crate::response::{ApplyResult, Response, recall, remember};
use crate::session::{Session, SessionCheck, Sessions};
use crate::txn::{apply_txn, read_only_txn};
use crate::validate::{check_delete_range, check_put as check_put_structure};
use crate::write::{check_put, execute_delete_range, execute_put};

/// The replicated MVCC key-value store with etcd 3.4 semantics.
///
/// Deterministic: no clock, no I/O, no randomness, no hash-map iteration. Two stores that
/// apply the same entries are identical (see [`KvStore::digest`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KvStore {
    pub(crate) limits: Limits,
    pub(crate) keyspace: Keyspace,
    pub(crate) leases: Leases,
    pub(crate) sessions: Sessions,
    pub(crate) applied_index: u64,
}

type Outcome = (Result<Response, KvError>, Vec<Event>);

impl KvStore {
    pub fn new(limits: Limits) -> KvStore {
        KvStore {
            sessions: Sessions::new(limits.sessions.clone()),
            limits,
            keyspace: Keyspace::default(),
            leases: Leases::default(),
            applied_index: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Applies the command in log entry `index`. Indexes must increase (gaps are fine: not
    /// every entry is a command); a repeat is a driver bug and stops the node.
    ///
    /// Bytes that do not decode give a `MalformedCommand` error, the same on every member.
    pub fn apply(&mut self, index: u64, command_bytes: &[u8]) -> ApplyResult {
        self.apply_admitted(index, command_bytes, Admission::All, &AllowAll)
    }

    /// [`KvStore::apply`] under the cluster's alarms and access control: a command
    /// `admission` refuses is answered with its error and changes nothing (a retry under a
    /// session still gets the answer it got first); one `authorizer` refuses likewise, except
    /// that the refusal is not remembered by the session (nothing was applied, so a retry
    /// with fresh credentials is decided again).
    pub fn apply_admitted(
        &mut self,
        index: u64,
        command_bytes: &[u8],
        admission: Admission,
        authorizer: &dyn Authorizer,
    ) -> ApplyResult {
        match Command::decode(command_bytes) {
            Ok(command) => self.apply_command_admitted(index, &command, admission, authorizer),
            Err(error) => {
                self.advance_applied_index(index);
                let error = KvError::with_detail(ErrorKind::MalformedCommand, error.to_string());
                self.result(index, Err(error), Vec::new(), false)
            }
        }
    }

    /// Applies an already decoded command (the same as [`KvStore::apply`] on its encoding).
    pub fn apply_command(&mut self, index: u64, command: &Command) -> ApplyResult {
        self.apply_command_admitted(index, command, Admission::All, &AllowAll)
    }

    fn apply_command_admitted(
        &mut self,
        index: u64,
        command: &Command,
        admission: Admission,
        authorizer: &dyn Authorizer,
    ) -> ApplyResult {
        let mut result = self.execute_command(index, command, admission, authorizer);
        result.origin = command.origin;
        result
    }

    fn execute_command(
        &mut self,
        index: u64,
        command: &Command,
        admission: Admission,
        authorizer: &dyn Authorizer,
    ) -> ApplyResult {
        self.advance_applied_index(index);
        // Decoding refuses these; a command built in process could still carry them.
        if let Some(request) = command.client_request
            && (request.session_id == 0 || request.sequence == 0)
        {
            let error = KvError::with_detail(
                ErrorKind::MalformedCommand,
                format!("session id and sequence must both be non-zero: {request:?}"),
            );
            return self.result(index, Err(error), Vec::new(), false);
        }
        let client_request = command
            .client_request
            .filter(|_| accepts_session(&command.operation));
        if let Some(request) = client_request {
            match self.sessions.check(request, index) {
                Err(error) => return self.result(index, Err(error), Vec::new(), false),
                Ok(SessionCheck::Retry(remembered)) => {
                    return self.result(index, recall(remembered), Vec::new(), true);
                }
                Ok(SessionCheck::Apply) => {}
            }
        }
        if let Err(refusal) =
            authorizer.authorize(command.author.as_ref(), &command.operation, self)
        {
            return self.result(index, Err(refusal), Vec::new(), false);
        }
        let (outcome, events) = match admission.refusal(&command.operation) {
            Some(refusal) => (Err(refusal), Vec::new()),
            None => self.execute(index, &command.operation),
        };
        if let Some(request) = client_request {
            self.sessions.remember(request, remember(&outcome));
        }
        self.result(index, outcome, events, false)
    }

    /// Records that entry `index` carried no command (an empty or configuration entry).
    pub fn skip_index(&mut self, index: u64) {
        self.advance_applied_index(index);
    }

    fn advance_applied_index(&mut self, index: u64) {
        assert!(
            index > self.applied_index,
            "entry {index} applied after entry {}",
            self.applied_index
        );
        self.applied_index = index;
    }

    fn result(
        &self,
        index: u64,
        outcome: Result<Response, KvError>,
        events: Vec<Event>,
        duplicate: bool,
    ) -> ApplyResult {
        debug_assert!(
            events
                .iter()
                .all(|event| event.kv.as_ref().map(|kv| kv.mod_revision)
                    == Some(self.current_revision()))
        );
        ApplyResult {
            index,
            outcome,
            events,
            revision: self.current_revision(),
            duplicate,
            origin: None,
        }
    }

    fn execute(&mut self, index: u64, operation: &Operation) -> Outcome {
        match operation {
            Operation::Put(request) => self.put(request),
            Operation::DeleteRange(request) => self.delete_range(request),
            Operation::Txn(request) => {
                match apply_txn(&mut self.keyspace, &mut self.leases, request) {
                    Ok((response, events)) => (Ok(Response::Txn(response)), events),
                    Err(error) => (Err(error), Vec::new()),
                }
            }
            Operation::Compaction(request) => (self.compact(request), Vec::new()),
            Operation::LeaseGrant(request) => (self.lease_grant(request), Vec::new()),
            Operation::LeaseRevoke(request) => self.lease_revoke(request.id),
            Operation::LeaseCheckpoint(checkpoint) => {
                for lease in &checkpoint.leases {
                    self.leases.checkpoint(lease.id, lease.remaining_ttl);
                }
                (Ok(Response::LeaseCheckpoint), Vec::new())
            }
            Operation::RegisterSession(_) => {
                let evicted_session_id = self.sessions.register(index);
                let response = Response::SessionRegistered {
                    session_id: index,
                    evicted_session_id,
                };
                (Ok(response), Vec::new())
            }
            Operation::ExpireSessions(expire) => {
                let expired = self.sessions.expire(&expire.session_ids);
                (Ok(Response::SessionsExpired { expired }), Vec::new())
            }
        }
    }

    fn put(&mut self, request: &PutRequest) -> Outcome {
        let checked = check_put_structure(request)
            .and_then(|()| check_put(&self.keyspace, &self.leases, request));
        if let Err(error) = checked {
            return (Err(error), Vec::new());
        }
        let mut write = self.keyspace.begin_write();
        let response = execute_put(&mut self.keyspace, &mut self.leases, &mut write, request);
        let events = self.keyspace.commit(write);
        (Ok(Response::Put(response)), events)
    }

    fn delete_range(&mut self, request: &DeleteRangeRequest) -> Outcome {
        if let Err(error) = check_delete_range(request) {
            return (Err(error), Vec::new());
        }
        let mut write = self.keyspace.begin_write();
        let response =
            execute_delete_range(&mut self.keyspace, &mut self.leases, &mut write, request);
        let events = self.keyspace.commit(write);
        (Ok(Response::DeleteRange(response)), events)
    }

    /// etcd-api.md §1.4 Compaction: at or below the compaction point is "compacted", above the
    /// current revision is "future".
    fn compact(&mut self, request: &CompactionRequest) -> Result<Response, KvError> {
        let compacted = self.keyspace.compacted_revision();
        let current = self.keyspace.current_revision();
        if request.revision <= compacted {
            return Err(KvError::with_detail(
                ErrorKind::Compacted,
                format!(
                    "compaction at {}, already compacted at {compacted}",
                    request.revision
                ),
            ));
        }
        if request.revision > current {
            return Err(KvError::with_detail(
                ErrorKind::FutureRevision,
                format!("compaction at {}, current is {current}", request.revision),
            ));
        }
        self.keyspace.compact(request.revision);
        Ok(Response::Compaction(CompactionResponse {
            header: revision_header(current),
        }))
    }

    fn lease_grant(&mut self, request: &LeaseGrantRequest) -> Result<Response, KvError> {
        let id = self.leases.grant(request.id, request.ttl)?;
        Ok(Response::LeaseGrant(LeaseGrantResponse {
            header: revision_header(self.current_revision()),
            id,
            ttl: request.ttl,
            error: String::new(),
        }))
    }

    /// Deletes every attached key, in key order, at one new revision (etcd-api.md §1.6).
    fn lease_revoke(&mut self, id: i64) -> Outcome {
        let keys = match self.leases.revoke(id) {
            Ok(keys) => keys,
            Err(error) => return (Err(error), Vec::new()),
        };
        let mut write = self.keyspace.begin_write();
        for key in &keys {
            let prev = self.keyspace.delete(&mut write, key);
            assert!(prev.is_some(), "keys attached to a lease are live");
        }
        let events = self.keyspace.commit(write);
        let response = LeaseRevokeResponse {
            header: revision_header(self.current_revision()),
        };
        (Ok(Response::LeaseRevoke(response)), events)
    }

    // ----- reads from the applied state ----------------------------------------------------

    /// A Range served locally (serializable, or after a ReadIndex for linearizable reads).
    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse, KvError> {
        range(&self.keyspace, request, self.current_revision())
    }

    /// Starts a Range read a page at a time (see [`RangePager`]), pinned at the current
    /// revision (or the request's).
    pub fn start_range(&self, request: RangeRequest) -> Result<RangePager, KvError> {
        RangePager::start(&self.keyspace, request, self.current_revision())
    }

    /// The next page of `pager`'s read: at most `keys_max` keys visited, about `bytes_max`
    /// bytes of keys and values kept. Fails with `Compacted` if the pinned revision was
    /// compacted since the read started.
    pub fn range_page(
        &self,
        pager: &mut RangePager,
        keys_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        pager.next_page(&self.keyspace, keys_max, bytes_max)
    }

    /// A txn that writes nothing, served locally like [`KvStore::range`]. A txn that could
    /// write (in any branch) is refused with `NotReadOnly`: it must go through the log.
    pub fn read_only_txn(&self, request: &TxnRequest) -> Result<TxnResponse, KvError> {
        read_only_txn(&self.keyspace, request)
    }

    /// True if no branch of `request` writes, so [`KvStore::read_only_txn`] may serve it.
    pub fn is_read_only_txn(request: &TxnRequest) -> bool {
        crate::txn::is_read_only(request)
    }

    /// History for watchers (etcd-api.md §1.5): the events at revisions >= `start_revision` on
    /// the keys of (`key`, `range_end`), whole revisions at a time, stopping once at least
    /// `events_max` events are gathered or after [`crate::EVENT_SCAN_REVISIONS_MAX`] revisions;
    /// continue from `next_revision`. A start below the compaction point is `Compacted`.
    pub fn events_since(
        &self,
        start_revision: i64,
        key: &[u8],
        range_end: &[u8],
        events_max: usize,
    ) -> Result<EventBatch, KvError> {
        self.keyspace
            .events_since(start_revision, KeyRange::new(key, range_end), events_max)
    }

    pub fn current_revision(&self) -> i64 {
        self.keyspace.current_revision()
    }

    /// The bytes the store counts for against the space quota: every stored version (see
    /// [`crate::version_cost_bytes`]) and every lease. History counts until compacted.
    pub fn size_bytes(&self) -> u64 {
        self.keyspace.size_bytes() + self.leases.iter().len() as u64 * crate::LEASE_COST_BYTES
    }

    /// How many keys exist now (deleted keys, whose history may remain, do not count).
    pub fn live_key_count(&self) -> usize {
        self.keyspace
            .histories_from(None, self.keyspace.compacted_revision())
            .filter(|(_, versions)| versions.last().is_some_and(|v| !v.is_tombstone()))
            .count()
    }

    /// 0 until the first compaction.
    pub fn compacted_revision(&self) -> i64 {
        self.keyspace.compacted_revision()
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn lease(&self, id: i64) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// Every lease, by id.
    pub fn leases(&self) -> impl ExactSizeIterator<Item = &Lease> {
        self.leases.iter()
    }

    pub fn session(&self, id: u64) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// Every session, by id (the server's leader uses `last_used_index` to choose which to
    /// expire).
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.iter()
    }

    /// Maintenance.HashKV (etcd-api.md §1.8): a CRC-32C over every kept version at or below
    /// `revision` (0 = current), which members that applied the same log agree on. Returns the
    /// hash and the revision it covers; below the compaction point is `Compacted`.
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64), KvError> {
        let current = self.current_revision();
        let revision = self.keyspace.check_read_revision(revision, current)?;
        let mut crc = 0;
        for (key, versions) in self
            .keyspace
            .histories_from(None, self.keyspace.compacted_revision())
        {
            for version in versions
                .iter()
                .take_while(|version| version.mod_revision <= revision)
            {
                crc = crc32c::crc32c_append(crc, &(key.len() as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, key);
                for number in [
                    version.mod_revision,
                    version.create_revision,
                    version.version,
                    version.lease,
                    version.value.len() as i64,
                ] {
                    crc = crc32c::crc32c_append(crc, &number.to_le_bytes());
                }
                crc = crc32c::crc32c_append(crc, &version.value);
            }
        }
        Ok((crc, revision))
    }

    /// Keys with any kept history (live or deleted but not yet compacted).
    pub fn key_history_count(&self) -> usize {
        self.keyspace.key_count()
    }
}

/// Only client requests are deduplicated; the server's own commands (session lifecycle,
/// checkpoints) ignore a session tag.
fn accepts_session(operation: &Operation) -> bool {
    matches!(
        operation,
        Operation::Put(_)
            | Operation::DeleteRange(_)
            | Operation::Txn(_)
            | Operation::Compaction(_)
            | Operation::LeaseGrant(_)
            | Operation::LeaseRevoke(_)
    )
}
