//! The replicated command: what one Raft log entry carries to the state machine.
//!
//! # Encoding
//!
//! ```text
//! byte 0      format version (COMMAND_FORMAT_V1 = 1)
//! bytes 1..   protobuf message flotilla.kv.v1.Command
//! ```
//!
//! # Versioning rule
//!
//! A log written by this version must stay readable by every later version:
//! - Within format 1 the protobuf message only grows: new fields and new `operation` cases
//!   get new field numbers; no number is ever reused, renumbered or retyped. Old entries then
//!   decode unchanged.
//! - A change that cannot follow that rule (a different envelope, a different encoding) takes
//!   a new format byte, and later versions keep the decoder for every older format.
//! - An entry this version cannot interpret (unknown format byte, or an `operation` case from
//!   a newer version, which protobuf decodes as absent) is answered with a
//!   `MalformedCommand` error on every member alike, so replicas never diverge. The server
//!   must not propose a new operation until every member runs a version that knows it.

use bytes::{BufMut, Bytes};
use flotilla_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    TxnRequest,
};
use flotilla_proto::flotilla::kv::v1 as pb;
use prost::Message;

pub use flotilla_proto::flotilla::kv::v1::command::Operation;
pub use flotilla_proto::flotilla::kv::v1::{
    Author, ExpireSessions, LeaseCheckpoint, LeaseRemaining, Origin,
};

/// The only command format so far.
pub const COMMAND_FORMAT_V1: u8 = 1;

/// Identifies one request of one client session, for duplicate suppression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientRequestId {
    /// The log index of the session's registration.
    pub session_id: u64,
    /// Starts at 1 and grows with each new request of the session.
    pub sequence: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub client_request: Option<ClientRequestId>,
    pub operation: Operation,
    /// Who sent it, when authentication is on (see [`crate::Authorizer`]).
    pub author: Option<Author>,
    /// The member that forwarded it to the leader (see [`tag_origin`]); not part of what the
    /// command does.
    pub origin: Option<Origin>,
}

/// Why command bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty command")]
    Empty,
    #[error("unknown command format {format} (this version reads format {COMMAND_FORMAT_V1})")]
    UnknownFormat { format: u8 },
    #[error("command body is not a valid protobuf Command: {0}")]
    Protobuf(String),
    #[error("command has no operation (written by a newer version?)")]
    MissingOperation,
    #[error("command has session {session_id} but sequence 0; sequences start at 1")]
    ZeroSequence { session_id: u64 },
    #[error("command has sequence {sequence} but no session")]
    SequenceWithoutSession { sequence: u64 },
}

impl Command {
    pub fn new(operation: Operation) -> Command {
        Command {
            client_request: None,
            operation,
            author: None,
            origin: None,
        }
    }

    /// Records who sent the command, for the permission check at apply.
    pub fn with_author(mut self, author: Option<Author>) -> Command {
        self.author = author;
        self
    }

    /// Attaches a session and sequence number (see [`crate::KvStore`] on duplicates).
    pub fn with_client_request(mut self, session_id: u64, sequence: u64) -> Command {
        self.client_request = Some(ClientRequestId {
            session_id,
            sequence,
        });
        self
    }

    pub fn put(request: PutRequest) -> Command {
        Command::new(Operation::Put(request))
    }

    pub fn delete_range(request: DeleteRangeRequest) -> Command {
        Command::new(Operation::DeleteRange(request))
    }

    pub fn txn(request: TxnRequest) -> Command {
        Command::new(Operation::Txn(request))
    }

    pub fn compaction(request: CompactionRequest) -> Command {
        Command::new(Operation::Compaction(request))
    }

    pub fn lease_grant(request: LeaseGrantRequest) -> Command {
        Command::new(Operation::LeaseGrant(request))
    }

    pub fn lease_revoke(request: LeaseRevokeRequest) -> Command {
        Command::new(Operation::LeaseRevoke(request))
    }

    pub fn lease_checkpoint(leases: Vec<LeaseRemaining>) -> Command {
        Command::new(Operation::LeaseCheckpoint(LeaseCheckpoint { leases }))
    }

    pub fn register_session() -> Command {
        Command::new(Operation::RegisterSession(pb::RegisterSession {}))
    }

    pub fn expire_sessions(session_ids: Vec<u64>) -> Command {
        Command::new(Operation::ExpireSessions(ExpireSessions { session_ids }))
    }

    /// Field numbers of flotilla.kv.v1.Command.
    const SESSION_ID_FIELD: u32 = 1;
    const SEQUENCE_FIELD: u32 = 2;
    const AUTHOR_FIELD: u32 = 12;
    const ORIGIN_FIELD: u32 = 13;

    /// The format byte, then the protobuf body. Encodes in place, without copying the request.
    pub fn encode(&self) -> Bytes {
        let (session_id, sequence) = self
            .client_request
            .map_or((0, 0), |id| (id.session_id, id.sequence));
        let body_bytes = self.operation.encoded_len()
            + uint64_field_len(Self::SESSION_ID_FIELD, session_id)
            + uint64_field_len(Self::SEQUENCE_FIELD, sequence)
            + self.author.as_ref().map_or(0, |author| {
                prost::encoding::message::encoded_len(Self::AUTHOR_FIELD, author)
            })
            + self.origin.as_ref().map_or(0, |origin| {
                prost::encoding::message::encoded_len(Self::ORIGIN_FIELD, origin)
            });
        let mut buf = Vec::with_capacity(1 + body_bytes);
        buf.put_u8(COMMAND_FORMAT_V1);
        if session_id != 0 {
            prost::encoding::uint64::encode(Self::SESSION_ID_FIELD, &session_id, &mut buf);
        }
        if sequence != 0 {
            prost::encoding::uint64::encode(Self::SEQUENCE_FIELD, &sequence, &mut buf);
        }
        self.operation.encode(&mut buf);
        if let Some(author) = &self.author {
            prost::encoding::message::encode(Self::AUTHOR_FIELD, author, &mut buf);
        }
        if let Some(origin) = &self.origin {
            prost::encoding::message::encode(Self::ORIGIN_FIELD, origin, &mut buf);
        }
        debug_assert_eq!(buf.len(), 1 + body_bytes);
        Bytes::from(buf)
    }

    /// Never panics, whatever the input.
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        let (&format, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if format != COMMAND_FORMAT_V1 {
            return Err(DecodeError::UnknownFormat { format });
        }
        let message =
            pb::Command::decode(body).map_err(|error| DecodeError::Protobuf(error.to_string()))?;
        let operation = message.operation.ok_or(DecodeError::MissingOperation)?;
        let client_request = match (message.session_id, message.sequence) {
            (0, 0) => None,
            (0, sequence) => return Err(DecodeError::SequenceWithoutSession { sequence }),
            (session_id, 0) => return Err(DecodeError::ZeroSequence { session_id }),
            (session_id, sequence) => Some(ClientRequestId {
                session_id,
                sequence,
            }),
        };
        Ok(Command {
            client_request,
            operation,
            author: message.author,
            origin: message.origin,
        })
    }
}

/// The encoded command `encoded` with its forwarding member's [`Origin`] added, or `None` if
/// the bytes are not a command of this format (a server command, say), which is then sent
/// untagged. A protobuf field appended to an encoded message is read as part of it, so the tag
/// costs one copy and no re-encoding of the request. Tag a command once: a second tag would
/// be merged into the first.
pub fn tag_origin(encoded: &[u8], origin: &Origin) -> Option<Bytes> {
    if encoded.first() != Some(&COMMAND_FORMAT_V1) {
        return None;
    }
    let field_bytes = prost::encoding::message::encoded_len(Command::ORIGIN_FIELD, origin);
    let mut buf = Vec::with_capacity(encoded.len() + field_bytes);
    buf.extend_from_slice(encoded);
    prost::encoding::message::encode(Command::ORIGIN_FIELD, origin, &mut buf);
    Some(Bytes::from(buf))
}

fn uint64_field_len(field: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        prost::encoding::uint64::encoded_len(field, &value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_put() -> Command {
        Command::put(PutRequest {
            key: "k".into(),
            value: "v".into(),
            lease: 3,
            prev_kv: true,
            ..Default::default()
        })
    }

    #[test]
    fn round_trips_with_and_without_session() {
        for command in [
            sample_put(),
            sample_put().with_client_request(9, 1),
            sample_put().with_author(Some(Author {
                user: "alice".into(),
                auth_revision: 7,
            })),
            sample_put()
                .with_client_request(9, 2)
                .with_author(Some(Author::default())),
            Command {
                origin: Some(Origin {
                    member_id: 3,
                    request: 11,
                }),
                ..sample_put()
            },
            Command::register_session(),
            Command::expire_sessions(vec![4, 5]),
        ] {
            assert_eq!(Command::decode(&command.encode()), Ok(command));
        }
    }

    /// The in-place encoding must equal the plain protobuf encoding of the message, so a
    /// reader that only knows the .proto file reads it.
    #[test]
    fn body_is_the_protobuf_command_message() {
        let author = Author {
            user: "alice".into(),
            auth_revision: 3,
        };
        let command = sample_put()
            .with_client_request(7, 2)
            .with_author(Some(author.clone()));
        let encoded = command.encode();
        assert_eq!(encoded[0], COMMAND_FORMAT_V1);
        let message = pb::Command {
            session_id: 7,
            sequence: 2,
            operation: Some(command.operation.clone()),
            author: Some(author),
            origin: None,
        };
        assert_eq!(&encoded[1..], message.encode_to_vec().as_slice());
    }

    /// A fixed encoding written by this version: later versions must keep decoding it.
    #[test]
    fn decodes_a_recorded_v1_entry() {
        // format 1; session_id=5 (08 05); sequence=6 (10 06); put (field 3, 1a) of
        // {key "a" (0a 01 61), value "b" (12 01 62)}.
        let recorded = [1, 0x08, 5, 0x10, 6, 0x1a, 6, 0x0a, 1, b'a', 0x12, 1, b'b'];
        let command = Command::decode(&recorded).unwrap();
        assert_eq!(
            command.client_request,
            Some(ClientRequestId {
                session_id: 5,
                sequence: 6
            })
        );
        let Operation::Put(put) = command.operation else {
            panic!("expected a put");
        };
        assert_eq!((&put.key[..], &put.value[..]), (&b"a"[..], &b"b"[..]));
    }

    /// A tagged command decodes as the same command with its origin, whatever it carried
    /// before; bytes of another format are left alone.
    #[test]
    fn an_origin_tag_is_read_as_part_of_the_command() {
        let origin = Origin {
            member_id: 0xfeed,
            request: 1 << 60,
        };
        for command in [
            sample_put(),
            sample_put()
                .with_client_request(9, 2)
                .with_author(Some(Author::default())),
        ] {
            let tagged = tag_origin(&command.encode(), &origin).unwrap();
            let expected = Command {
                origin: Some(origin),
                ..command
            };
            assert_eq!(Command::decode(&tagged), Ok(expected.clone()));
            assert_eq!(tagged, expected.encode());
        }
        assert_eq!(tag_origin(&[2, 0], &origin), None);
        assert_eq!(tag_origin(&[], &origin), None);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert_eq!(Command::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Command::decode(&[2, 0]),
            Err(DecodeError::UnknownFormat { format: 2 })
        );
        assert_eq!(Command::decode(&[1]), Err(DecodeError::MissingOperation));
        assert!(matches!(
            Command::decode(&[1, 0x1a, 10, 0]),
            Err(DecodeError::Protobuf(_))
        ));
        // An operation case this version does not know (field 99) decodes as absent.
        assert_eq!(
            Command::decode(&[1, 0x9a, 0x06, 0]),
            Err(DecodeError::MissingOperation)
        );
        let zero_sequence = [1, 0x08, 5, 0x52, 0]; // session 5, register_session
        assert_eq!(
            Command::decode(&zero_sequence),
            Err(DecodeError::ZeroSequence { session_id: 5 })
        );
    }
}
