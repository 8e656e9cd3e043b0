//! A compact, versionable binary encoding of the core's types, for the write-ahead log and the
//! peer transport. All integers are little-endian and fixed-width; every variable-length field is
//! prefixed by its length. Decoding never panics: malformed input is a [`DecodeError`] that
//! says what was wrong and where.

use std::collections::BTreeSet;

use bytes::{Buf, BufMut, Bytes};

use crate::membership::{Membership, MembershipEntry};
use crate::message::*;
use crate::storage::SnapshotMeta;
use crate::types::{Entry, EntryId, EntryPayload, HardState, NodeId};

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends in the middle of a field.
    #[error("input ends early: {what} needs {needed} more bytes at offset {offset}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// The bytes missing.
        needed: usize,
        /// Where.
        offset: usize,
    },
    /// A tag byte names no known variant.
    #[error("unknown {what} tag {tag} at offset {offset}")]
    UnknownTag {
        /// What was being read.
        what: &'static str,
        /// The tag found.
        tag: u8,
        /// Where.
        offset: usize,
    },
    /// A field's value is not allowed.
    #[error("{what} is invalid at offset {offset}: {reason}")]
    Invalid {
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes are left after a complete value.
    #[error("{count} trailing bytes after the {what}")]
    TrailingBytes {
        /// What was read.
        what: &'static str,
        /// The bytes left over.
        count: usize,
    },
}

/// Reads from a [`Bytes`] buffer, tracking the offset for error messages. Slices share the
/// underlying buffer, so payloads are not copied.
#[derive(Debug)]
pub struct Reader {
    buf: Bytes,
    start_len: usize,
}

impl Reader {
    /// Reads `buf` from its start.
    pub fn new(buf: Bytes) -> Self {
        let start_len = buf.len();
        Self { buf, start_len }
    }

    /// Bytes read so far (for error messages).
    pub fn offset(&self) -> usize {
        self.start_len - self.buf.len()
    }

    fn need(&self, what: &'static str, bytes: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < bytes {
            return Err(DecodeError::Truncated {
                what,
                needed: bytes - self.buf.remaining(),
                offset: self.offset(),
            });
        }
        Ok(())
    }

    /// One byte; `what` names it in an error.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(what, 1)?;
        Ok(self.buf.get_u8())
    }

    /// A little-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(what, 4)?;
        Ok(self.buf.get_u32_le())
    }

    /// A little-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(what, 8)?;
        Ok(self.buf.get_u64_le())
    }

    /// A byte that must be 0 or 1.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        let offset = self.offset();
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag { what, tag, offset }),
        }
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u32(what)? as usize;
        self.need(what, len)?;
        Ok(self.buf.split_to(len))
    }

    /// A count of items that each take at least `item_bytes_min` bytes, checked against the
    /// remaining input so that a corrupt count cannot make the decoder allocate without bound.
    pub fn count(
        &mut self,
        what: &'static str,
        item_bytes_min: usize,
    ) -> Result<usize, DecodeError> {
        let offset = self.offset();
        let count = self.u32(what)? as usize;
        if count.saturating_mul(item_bytes_min) > self.buf.remaining() {
            return Err(DecodeError::Invalid {
                what,
                offset,
                reason: format!("count {count} exceeds the remaining input"),
            });
        }
        Ok(count)
    }

    /// Fails if bytes are left after `what`.
    pub fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            return Err(DecodeError::TrailingBytes {
                what,
                count: self.buf.remaining(),
            });
        }
        Ok(())
    }
}

fn put_bytes(out: &mut Vec<u8>, data: &[u8]) {
    let len = u32::try_from(data.len()).expect("a field larger than 4 GiB");
    out.put_u32_le(len);
    out.put_slice(data);
}

fn put_id_set(out: &mut Vec<u8>, ids: &BTreeSet<NodeId>) {
    out.put_u32_le(ids.len() as u32);
    for &id in ids {
        out.put_u64_le(id);
    }
}

fn get_id_set(r: &mut Reader, what: &'static str) -> Result<BTreeSet<NodeId>, DecodeError> {
    let count = r.count(what, 8)?;
    let mut ids = BTreeSet::new();
    for _ in 0..count {
        let offset = r.offset();
        if !ids.insert(r.u64(what)?) {
            let reason = "duplicate node id".to_string();
            return Err(DecodeError::Invalid {
                what,
                offset,
                reason,
            });
        }
    }
    Ok(ids)
}

/// Appends the encoding of a configuration to `out`.
pub fn encode_membership(out: &mut Vec<u8>, m: &Membership) {
    put_id_set(out, &m.voters);
    put_id_set(out, &m.voters_outgoing);
    put_id_set(out, &m.learners);
}

/// A configuration `encode_membership` wrote.
pub fn decode_membership(r: &mut Reader) -> Result<Membership, DecodeError> {
    let offset = r.offset();
    let membership = Membership {
        voters: get_id_set(r, "voters")?,
        voters_outgoing: get_id_set(r, "outgoing voters")?,
        learners: get_id_set(r, "learners")?,
    };
    // An empty membership is legal on the wire: it is what a node that has not yet joined
    // holds. Anything else must be a valid configuration.
    if membership != Membership::default() {
        membership.validate().map_err(|err| DecodeError::Invalid {
            what: "membership",
            offset,
            reason: err.to_string(),
        })?;
    }
    Ok(membership)
}

const PAYLOAD_BLANK: u8 = 0;
const PAYLOAD_COMMAND: u8 = 1;
const PAYLOAD_MEMBERSHIP: u8 = 2;

/// Appends the encoding of `entry` to `out`.
pub fn encode_entry(out: &mut Vec<u8>, entry: &Entry) {
    out.put_u64_le(entry.term);
    out.put_u64_le(entry.index);
    match &entry.payload {
        EntryPayload::Blank => out.put_u8(PAYLOAD_BLANK),
        EntryPayload::Command(data) => {
            out.put_u8(PAYLOAD_COMMAND);
            put_bytes(out, data);
        }
        EntryPayload::Membership(change) => {
            out.put_u8(PAYLOAD_MEMBERSHIP);
            encode_membership(out, &change.membership);
            put_bytes(out, &change.context);
        }
    }
}

/// An entry `encode_entry` wrote.
pub fn decode_entry(r: &mut Reader) -> Result<Entry, DecodeError> {
    let term = r.u64("entry term")?;
    let index = r.u64("entry index")?;
    let offset = r.offset();
    let payload = match r.u8("entry payload tag")? {
        PAYLOAD_BLANK => EntryPayload::Blank,
        PAYLOAD_COMMAND => EntryPayload::Command(r.bytes("command")?),
        PAYLOAD_MEMBERSHIP => EntryPayload::Membership(MembershipEntry {
            membership: decode_membership(r)?,
            context: r.bytes("membership context")?,
        }),
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "entry payload",
                tag,
                offset,
            });
        }
    };
    Ok(Entry {
        term,
        index,
        payload,
    })
}

/// Decodes exactly one entry from `buf`.
pub fn decode_entry_exact(buf: Bytes) -> Result<Entry, DecodeError> {
    let mut r = Reader::new(buf);
    let entry = decode_entry(&mut r)?;
    r.finish("entry")?;
    Ok(entry)
}

/// Appends the encoding of a hard state to `out`.
pub fn encode_hard_state(out: &mut Vec<u8>, hs: &HardState) {
    out.put_u64_le(hs.term);
    out.put_u64_le(hs.vote);
    out.put_u64_le(hs.commit);
}

/// A hard state `encode_hard_state` wrote.
pub fn decode_hard_state(r: &mut Reader) -> Result<HardState, DecodeError> {
    Ok(HardState {
        term: r.u64("hard state term")?,
        vote: r.u64("hard state vote")?,
        commit: r.u64("hard state commit")?,
    })
}

fn encode_entry_id(out: &mut Vec<u8>, id: EntryId) {
    out.put_u64_le(id.term);
    out.put_u64_le(id.index);
}

fn decode_entry_id(r: &mut Reader, what: &'static str) -> Result<EntryId, DecodeError> {
    Ok(EntryId {
        term: r.u64(what)?,
        index: r.u64(what)?,
    })
}

/// Appends the encoding of a snapshot's metadata to `out`.
pub fn encode_snapshot_meta(out: &mut Vec<u8>, meta: &SnapshotMeta) {
    encode_entry_id(out, meta.last);
    encode_membership(out, &meta.membership);
}

/// Snapshot metadata `encode_snapshot_meta` wrote.
pub fn decode_snapshot_meta(r: &mut Reader) -> Result<SnapshotMeta, DecodeError> {
    Ok(SnapshotMeta {
        last: decode_entry_id(r, "snapshot last entry")?,
        membership: decode_membership(r)?,
    })
}

const MSG_VOTE: u8 = 1;
const MSG_VOTE_RESPONSE: u8 = 2;
const MSG_APPEND: u8 = 3;
const MSG_APPEND_ACCEPTED: u8 = 4;
const MSG_APPEND_REJECTED: u8 = 5;
const MSG_HEARTBEAT: u8 = 6;
const MSG_HEARTBEAT_RESPONSE: u8 = 7;
const MSG_SNAPSHOT: u8 = 8;
const MSG_SNAPSHOT_RESPONSE: u8 = 9;
const MSG_READ_INDEX: u8 = 10;
const MSG_READ_INDEX_RESPONSE: u8 = 11;
const MSG_TIMEOUT_NOW: u8 = 12;

/// Appends the encoding of `msg` to `out`.
pub fn encode_message(out: &mut Vec<u8>, msg: &Message) {
    out.put_u64_le(msg.from);
    out.put_u64_le(msg.to);
    out.put_u64_le(msg.term);
    match &msg.body {
        MessageBody::Vote(v) => {
            out.put_u8(MSG_VOTE);
            out.put_u8(v.pre_vote as u8);
            encode_entry_id(out, v.last_log);
            out.put_u8(v.leadership_transfer as u8);
        }
        MessageBody::VoteResponse(v) => {
            out.put_u8(MSG_VOTE_RESPONSE);
            out.put_u8(v.pre_vote as u8);
            out.put_u8(v.granted as u8);
        }
        MessageBody::Append(a) => {
            out.put_u8(MSG_APPEND);
            encode_entry_id(out, a.prev);
            out.put_u64_le(a.commit);
            out.put_u32_le(a.entries.len() as u32);
            for entry in &a.entries {
                encode_entry(out, entry);
            }
        }
        MessageBody::AppendResponse(AppendResponse::Accepted { match_index }) => {
            out.put_u8(MSG_APPEND_ACCEPTED);
            out.put_u64_le(*match_index);
        }
        MessageBody::AppendResponse(AppendResponse::Rejected {
            rejected_prev,
            hint,
        }) => {
            out.put_u8(MSG_APPEND_REJECTED);
            out.put_u64_le(*rejected_prev);
            encode_entry_id(out, *hint);
        }
        MessageBody::Heartbeat(h) => {
            out.put_u8(MSG_HEARTBEAT);
            out.put_u64_le(h.commit);
            out.put_u64_le(h.read_round);
        }
        MessageBody::HeartbeatResponse(h) => {
            out.put_u8(MSG_HEARTBEAT_RESPONSE);
            out.put_u64_le(h.read_round);
        }
        MessageBody::Snapshot(s) => {
            out.put_u8(MSG_SNAPSHOT);
            encode_snapshot_meta(out, &s.meta);
            out.put_u64_le(s.data_bytes);
            out.put_u64_le(s.offset);
            put_bytes(out, &s.data);
        }
        MessageBody::SnapshotResponse(s) => {
            out.put_u8(MSG_SNAPSHOT_RESPONSE);
            encode_entry_id(out, s.snapshot);
            out.put_u64_le(s.next_offset);
            out.put_u8(match s.status {
                SnapshotStatus::Received => 0,
                SnapshotStatus::Resend => 1,
                SnapshotStatus::Installed => 2,
            });
        }
        MessageBody::ReadIndex(r) => {
            out.put_u8(MSG_READ_INDEX);
            out.put_u64_le(r.context);
        }
        MessageBody::ReadIndexResponse(r) => {
            out.put_u8(MSG_READ_INDEX_RESPONSE);
            out.put_u64_le(r.context);
            out.put_u8(r.index.is_some() as u8);
            out.put_u64_le(r.index.unwrap_or(0));
        }
        MessageBody::TimeoutNow => out.put_u8(MSG_TIMEOUT_NOW),
    }
}

/// A message `encode_message` wrote.
pub fn decode_message(r: &mut Reader) -> Result<Message, DecodeError> {
    let from = r.u64("message sender")?;
    let to = r.u64("message receiver")?;
    let term = r.u64("message term")?;
    let offset = r.offset();
    let body = match r.u8("message tag")? {
        MSG_VOTE => MessageBody::Vote(VoteRequest {
            pre_vote: r.bool("pre-vote flag")?,
            last_log: decode_entry_id(r, "candidate last entry")?,
            leadership_transfer: r.bool("transfer flag")?,
        }),
        MSG_VOTE_RESPONSE => MessageBody::VoteResponse(VoteResponse {
            pre_vote: r.bool("pre-vote flag")?,
            granted: r.bool("granted flag")?,
        }),
        MSG_APPEND => {
            let prev = decode_entry_id(r, "append prev")?;
            let commit = r.u64("append commit")?;
            let count = r.count("append entries", 17)?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(decode_entry(r)?);
            }
            MessageBody::Append(AppendRequest {
                prev,
                entries,
                commit,
            })
        }
        MSG_APPEND_ACCEPTED => MessageBody::AppendResponse(AppendResponse::Accepted {
            match_index: r.u64("match index")?,
        }),
        MSG_APPEND_REJECTED => MessageBody::AppendResponse(AppendResponse::Rejected {
            rejected_prev: r.u64("rejected index")?,
            hint: decode_entry_id(r, "reject hint")?,
        }),
        MSG_HEARTBEAT => MessageBody::Heartbeat(Heartbeat {
            commit: r.u64("heartbeat commit")?,
            read_round: r.u64("read round")?,
        }),
        MSG_HEARTBEAT_RESPONSE => MessageBody::HeartbeatResponse(HeartbeatResponse {
            read_round: r.u64("read round")?,
        }),
        MSG_SNAPSHOT => MessageBody::Snapshot(SnapshotChunkMessage {
            meta: decode_snapshot_meta(r)?,
            data_bytes: r.u64("snapshot size")?,
            offset: r.u64("snapshot offset")?,
            data: r.bytes("snapshot chunk")?,
        }),
        MSG_SNAPSHOT_RESPONSE => {
            let snapshot = decode_entry_id(r, "snapshot id")?;
            let next_offset = r.u64("snapshot offset")?;
            let status_offset = r.offset();
            let status = match r.u8("snapshot status")? {
                0 => SnapshotStatus::Received,
                1 => SnapshotStatus::Resend,
                2 => SnapshotStatus::Installed,
                tag => {
                    let what = "snapshot status";
                    return Err(DecodeError::UnknownTag {
                        what,
                        tag,
                        offset: status_offset,
                    });
                }
            };
            MessageBody::SnapshotResponse(SnapshotResponse {
                snapshot,
                next_offset,
                status,
            })
        }
        MSG_READ_INDEX => MessageBody::ReadIndex(ReadIndexRequest {
            context: r.u64("context")?,
        }),
        MSG_READ_INDEX_RESPONSE => {
            let context = r.u64("context")?;
            let present = r.bool("read index flag")?;
            let index = r.u64("read index")?;
            MessageBody::ReadIndexResponse(ReadIndexResponse {
                context,
                index: present.then_some(index),
            })
        }
        MSG_TIMEOUT_NOW => MessageBody::TimeoutNow,
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "message",
                tag,
                offset,
            });
        }
    };
    if let MessageBody::Snapshot(chunk) = &body
        && chunk.offset + chunk.data.len() as u64 > chunk.data_bytes
    {
        let reason = "chunk extends past the end of the snapshot".to_string();
        return Err(DecodeError::Invalid {
            what: "snapshot chunk",
            offset,
            reason,
        });
    }
    Ok(Message {
        from,
        to,
        term,
        body,
    })
}

/// Decodes exactly one message from `buf`.
pub fn decode_message_exact(buf: Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader::new(buf);
    let msg = decode_message(&mut r)?;
    r.finish("message")?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arb_membership() -> impl Strategy<Value = Membership> {
        (
            proptest::collection::btree_set(1u64..8, 1..4),
            proptest::collection::btree_set(1u64..8, 0..4),
            proptest::collection::btree_set(8u64..12, 0..3),
        )
            .prop_map(|(voters, voters_outgoing, learners)| Membership {
                voters,
                voters_outgoing,
                learners,
            })
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let payload = prop_oneof![
            Just(EntryPayload::Blank),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|data| EntryPayload::Command(Bytes::from(data))),
            (
                arb_membership(),
                proptest::collection::vec(any::<u8>(), 0..8)
            )
                .prop_map(|(membership, context)| EntryPayload::Membership(
                    MembershipEntry {
                        membership,
                        context: Bytes::from(context),
                    }
                )),
        ];
        (any::<u64>(), any::<u64>(), payload).prop_map(|(term, index, payload)| Entry {
            term,
            index,
            payload,
        })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let id = (any::<u64>(), any::<u64>()).prop_map(|(term, index)| EntryId { term, index });
        let body = prop_oneof![
            (any::<bool>(), id.clone(), any::<bool>()).prop_map(|(pre_vote, last_log, t)| {
                MessageBody::Vote(VoteRequest {
                    pre_vote,
                    last_log,
                    leadership_transfer: t,
                })
            }),
            (any::<bool>(), any::<bool>()).prop_map(|(pre_vote, granted)| {
                MessageBody::VoteResponse(VoteResponse { pre_vote, granted })
            }),
            (
                id.clone(),
                proptest::collection::vec(arb_entry(), 0..4),
                any::<u64>()
            )
                .prop_map(|(prev, entries, commit)| MessageBody::Append(
                    AppendRequest {
                        prev,
                        entries,
                        commit
                    }
                )),
            any::<u64>().prop_map(|match_index| MessageBody::AppendResponse(
                AppendResponse::Accepted { match_index }
            )),
            (any::<u64>(), id.clone()).prop_map(|(rejected_prev, hint)| {
                MessageBody::AppendResponse(AppendResponse::Rejected {
                    rejected_prev,
                    hint,
                })
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(commit, read_round)| {
                MessageBody::Heartbeat(Heartbeat { commit, read_round })
            }),
            any::<u64>().prop_map(
                |read_round| MessageBody::HeartbeatResponse(HeartbeatResponse { read_round })
            ),
            (
                id.clone(),
                arb_membership(),
                proptest::collection::vec(any::<u8>(), 0..32),
                0u64..8
            )
                .prop_map(|(last, membership, data, offset)| {
                    let data_bytes = offset + data.len() as u64;
                    MessageBody::Snapshot(SnapshotChunkMessage {
                        meta: SnapshotMeta { last, membership },
                        data_bytes,
                        offset,
                        data: Bytes::from(data),
                    })
                }),
            (id, any::<u64>(), 0u8..3).prop_map(|(snapshot, next_offset, status)| {
                let status = match status {
                    0 => SnapshotStatus::Received,
                    1 => SnapshotStatus::Resend,
                    _ => SnapshotStatus::Installed,
                };
                MessageBody::SnapshotResponse(SnapshotResponse {
                    snapshot,
                    next_offset,
                    status,
                })
            }),
            any::<u64>().prop_map(|context| MessageBody::ReadIndex(ReadIndexRequest { context })),
            (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(context, index)| {
                MessageBody::ReadIndexResponse(ReadIndexResponse { context, index })
            }),
            Just(MessageBody::TimeoutNow),
        ];
        (any::<u64>(), any::<u64>(), any::<u64>(), body).prop_map(|(from, to, term, body)| {
            Message {
                from,
                to,
                term,
                body,
            }
        })
    }

    proptest! {
        #[test]
        fn entries_round_trip(entry in arb_entry()) {
            let mut out = Vec::new();
            encode_entry(&mut out, &entry);
            prop_assert_eq!(decode_entry_exact(Bytes::from(out)).unwrap(), entry);
        }

        #[test]
        fn messages_round_trip(msg in arb_message()) {
            let mut out = Vec::new();
            encode_message(&mut out, &msg);
            prop_assert_eq!(decode_message_exact(Bytes::from(out)).unwrap(), msg);
        }

        #[test]
        fn truncated_or_garbage_input_is_an_error_not_a_panic(
            msg in arb_message(),
            cut in any::<prop::sample::Index>(),
            garbage in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut out = Vec::new();
            encode_message(&mut out, &msg);
            let cut = cut.index(out.len());
            prop_assert!(decode_message_exact(Bytes::copy_from_slice(&out[..cut])).is_err());
            let _ = decode_message_exact(Bytes::from(garbage.clone()));
            let _ = decode_entry_exact(Bytes::from(garbage));
        }
    }

    #[test]
    fn hard_state_and_snapshot_meta_round_trip() {
        let hs = HardState {
            term: 7,
            vote: 3,
            commit: 99,
        };
        let mut out = Vec::new();
        encode_hard_state(&mut out, &hs);
        let mut r = Reader::new(Bytes::from(out));
        assert_eq!(decode_hard_state(&mut r).unwrap(), hs);
        r.finish("hard state").unwrap();

        let meta = SnapshotMeta {
            last: EntryId::new(4, 120),
            membership: Membership::with_voters([1, 2, 3]),
        };
        let mut out = Vec::new();
        encode_snapshot_meta(&mut out, &meta);
        let mut r = Reader::new(Bytes::from(out));
        assert_eq!(decode_snapshot_meta(&mut r).unwrap(), meta);
    }

    #[test]
    fn errors_name_the_field_and_offset() {
        let err = decode_entry_exact(Bytes::from_static(&[1, 0, 0])).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                what: "entry term",
                needed: 5,
                offset: 0
            }
        );
        let mut bad = Vec::new();
        bad.put_u64_le(1);
        bad.put_u64_le(2);
        bad.put_u8(9);
        let err = decode_entry_exact(Bytes::from(bad)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownTag {
                what: "entry payload",
                tag: 9,
                offset: 16
            }
        );
        assert_eq!(err.to_string(), "unknown entry payload tag 9 at offset 16");
    }
}
