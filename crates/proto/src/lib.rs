//! # flotilla-proto: Flotilla's wire types
//!
//! Generated with prost and tonic from `.proto` files written for this project:
//!
//! - [`etcdserverpb`], [`mvccpb`], [`authpb`]: the etcd v3 client API, wire-compatible with
//!   etcd (same packages, services, methods, field numbers and enum values), so etcd clients
//!   work against a Flotilla server unchanged. With the `grpc` feature (on by default) each
//!   service also has tonic server traits (`etcdserverpb::kv_server::Kv`, ...) whose methods
//!   answer `UNIMPLEMENTED` unless overridden, and clients (`etcdserverpb::kv_client`, ...).
//! - [`v3lockpb`], [`v3electionpb`]: etcd's lock and election services, same wire format.
//! - [`flotilla::kv::v1`]: Flotilla's internal messages: the command envelope of the Raft log,
//!   and the records of a key-value snapshot.
//! - [`flotilla::session::v1`]: client sessions for duplicate suppression.
//! - [`flotilla::peer::v1`]: the protocol between the members of a cluster.
//!
//! With the `json` feature, the messages of etcd's packages also implement serde's
//! `Serialize` and `Deserialize` in the protobuf JSON mapping with etcd's JSON field names,
//! for the JSON gateway.
//!
//! Byte fields are [`bytes::Bytes`]. Names are snake_case (etcd spells a few in camelCase,
//! such as `peerURLs`); names never reach the protobuf wire.

/// Key-value records and events (etcd's `mvccpb` package).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// Users, roles and permissions (etcd's `authpb` package).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// The etcd v3 client API (etcd's `etcdserverpb` package).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

/// etcd's lock service (`v3lockpb.Lock`), served beside the client API.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

/// etcd's election service (`v3electionpb.Election`), served beside the client API.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

/// Flotilla's own protobuf packages.
pub mod flotilla {
    /// The key-value state machine's replicated messages.
    pub mod kv {
        /// Version 1 of the command envelope and snapshot records.
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/flotilla.kv.v1.rs"));
        }
    }

    /// Client sessions for duplicate suppression (see `session.proto`).
    pub mod session {
        /// Version 1 of the session service.
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/flotilla.session.v1.rs"));
        }
    }

    /// The protocol between the members of one cluster (Raft streams, forwarded requests,
    /// joining, the corruption check): never exposed to clients.
    pub mod peer {
        /// Version 1 of the peer protocol.
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/flotilla.peer.v1.rs"));
        }
    }
}

/// gRPC metadata key carrying a write's session id (see `session.proto`).
pub const SESSION_METADATA_KEY: &str = "flotilla-session";
/// gRPC metadata key carrying a write's sequence number within its session.
pub const SEQUENCE_METADATA_KEY: &str = "flotilla-seq";

/// The `range_end` that selects every key starting with `prefix`: the prefix with trailing
/// 0xff bytes dropped and its last byte increased, or `"\0"` (every key from `prefix` on)
/// when nothing is left, as etcd's Go client computes it.
pub fn prefix_range_end(prefix: &[u8]) -> bytes::Bytes {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("not empty") += 1;
            return end.into();
        }
        end.pop();
    }
    bytes::Bytes::from_static(b"\0")
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::prefix_range_end;

    #[test]
    fn prefix_range_ends() {
        assert_eq!(&prefix_range_end(b"f")[..], b"g");
        assert_eq!(&prefix_range_end(b"a/")[..], b"a0");
        assert_eq!(&prefix_range_end(b"a\xff\xff")[..], b"b");
        assert_eq!(&prefix_range_end(b"\xff")[..], b"\0");
        assert_eq!(&prefix_range_end(b"")[..], b"\0");
    }

    use super::etcdserverpb::{Compare, PutRequest, WatchResponse, compare};
    use super::mvccpb::{Event, KeyValue, event};

    /// Field numbers are the wire contract with etcd clients; check a few unusual ones by
    /// decoding hand-made bytes (tag = field number << 3 | wire type).
    #[test]
    fn unusual_field_numbers_match_etcd() {
        // Compare.range_end is field 64 (length-delimited): tag 64 << 3 | 2 = 514 = 0x82 0x04.
        let compare = Compare::decode(&[0x82, 0x04, 0x01, b'z'][..]).unwrap();
        assert_eq!(&compare.range_end[..], b"z");
        // WatchResponse.events is field 11: tag 11 << 3 | 2 = 0x5a.
        let event = Event {
            r#type: event::EventType::Delete as i32,
            kv: Some(KeyValue {
                key: "k".into(),
                ..Default::default()
            }),
            prev_kv: None,
        };
        let mut bytes = vec![0x5a];
        bytes.push(event.encoded_len() as u8);
        event.encode(&mut bytes).unwrap();
        let watch = WatchResponse::decode(&bytes[..]).unwrap();
        assert_eq!(watch.events, vec![event]);
    }

    #[test]
    fn compare_enums_have_etcd_values() {
        assert_eq!(compare::CompareResult::NotEqual as i32, 3);
        assert_eq!(compare::CompareTarget::Lease as i32, 4);
    }

    #[test]
    fn put_request_round_trips_with_bytes_fields() {
        let put = PutRequest {
            key: "key".into(),
            value: vec![0, 255, 7].into(),
            lease: 42,
            prev_kv: true,
            ignore_value: false,
            ignore_lease: false,
        };
        let decoded = PutRequest::decode(put.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, put);
        // lease is field 3, varint: tag 0x18.
        assert_eq!(PutRequest::decode(&[0x18, 0x05][..]).unwrap().lease, 5);
    }
}

#[cfg(all(test, feature = "grpc"))]
mod grpc_tests {
    use tonic::server::NamedService;

    use super::etcdserverpb::{
        auth_server::AuthServer, kv_server::KvServer, lease_server::LeaseServer,
        maintenance_server::MaintenanceServer, watch_server::WatchServer,
    };

    /// The gRPC path is /<package>.<Service>/<Method>: the service part must match etcd.
    #[test]
    fn service_names_match_etcd() {
        assert_eq!(<KvServer<()> as NamedService>::NAME, "etcdserverpb.KV");
        assert_eq!(
            <WatchServer<()> as NamedService>::NAME,
            "etcdserverpb.Watch"
        );
        assert_eq!(
            <LeaseServer<()> as NamedService>::NAME,
            "etcdserverpb.Lease"
        );
        assert_eq!(
            <MaintenanceServer<()> as NamedService>::NAME,
            "etcdserverpb.Maintenance"
        );
        assert_eq!(<AuthServer<()> as NamedService>::NAME, "etcdserverpb.Auth");
    }
}

#[cfg(all(test, feature = "json"))]
mod json_tests {
    use super::etcdserverpb::{LeaseGrantRequest, Member, RangeResponse, ResponseHeader};
    use super::mvccpb::KeyValue;

    /// The protobuf JSON mapping as etcd's gateway writes it: .proto names (etcd's spelling),
    /// 64-bit integers as strings, bytes as base64, zero values left out.
    #[test]
    fn writes_etcds_json() {
        let response = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 3,
                raft_term: 4,
            }),
            kvs: vec![KeyValue {
                key: "foo".into(),
                value: "bar".into(),
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            serde_json::to_string(&response).unwrap(),
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"2","value":"YmFy"}],"count":"1"}"#
        );
        let member = Member {
            id: 10,
            name: "n".into(),
            peer_urls: vec!["http://a".into()],
            client_urls: vec![],
            is_learner: true,
        };
        assert_eq!(
            serde_json::to_string(&member).unwrap(),
            r#"{"ID":"10","name":"n","peerURLs":["http://a"],"isLearner":true}"#
        );
    }

    #[test]
    fn reads_etcds_names_and_the_proto_names() {
        let etcd: LeaseGrantRequest = serde_json::from_str(r#"{"TTL": 30, "ID": "7"}"#).unwrap();
        let proto: LeaseGrantRequest = serde_json::from_str(r#"{"ttl": "30", "id": 7}"#).unwrap();
        assert_eq!((etcd.ttl, etcd.id), (30, 7));
        assert_eq!(etcd, proto);
    }
}
