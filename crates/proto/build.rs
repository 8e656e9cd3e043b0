//! Compiles the project's .proto files with protox, a protobuf compiler written in Rust, so a
//! plain `cargo build` needs no `protoc` on the machine.

use std::path::{Path, PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";

const PROTO_FILES: &[&str] = &[
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "etcdserverpb/rpc.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
    "flotilla/kv/v1/command.proto",
    "flotilla/kv/v1/snapshot.proto",
    "flotilla/session/v1/session.proto",
    "flotilla/peer/v1/peer.proto",
];

/// Marks generated gRPC code so it compiles only with the `grpc` feature; the messages are
/// always there.
const GRPC_ONLY: &str = "#[cfg(feature = \"grpc\")]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<_> = PROTO_FILES
        .iter()
        .map(|file| Path::new(PROTO_ROOT).join(file))
        .collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [PROTO_ROOT])?;
    write_json_mapping(descriptors.clone())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The transport (connect helpers) belongs to the server crate, which enables it.
        .build_transport(false)
        // Methods the server does not implement answer UNIMPLEMENTED by default.
        .generate_default_stubs(true)
        // Keys and values are `bytes::Bytes`, so they move between layers without copies.
        .bytes(".")
        .server_mod_attribute(".", GRPC_ONLY)
        .client_mod_attribute(".", GRPC_ONLY)
        .compile_fds(descriptors)?;
    Ok(())
}

/// The packages of etcd's API, which the JSON gateway speaks.
const JSON_PACKAGES: &[&str] = &[
    ".etcdserverpb",
    ".mvccpb",
    ".authpb",
    ".v3lockpb",
    ".v3electionpb",
];

/// etcd's spelling of the fields this project spells otherwise (its .proto files name these in
/// camelCase or upper case, and its gateway writes JSON with the .proto names). Every other
/// field's JSON name is its .proto name, snake_case, as in etcd.
const ETCD_JSON_NAMES: &[(&str, &str, &str)] = &[
    ("etcdserverpb.LeaseGrantRequest", "ttl", "TTL"),
    ("etcdserverpb.LeaseGrantRequest", "id", "ID"),
    ("etcdserverpb.LeaseGrantResponse", "id", "ID"),
    ("etcdserverpb.LeaseGrantResponse", "ttl", "TTL"),
    ("etcdserverpb.LeaseRevokeRequest", "id", "ID"),
    ("etcdserverpb.LeaseKeepAliveRequest", "id", "ID"),
    ("etcdserverpb.LeaseKeepAliveResponse", "id", "ID"),
    ("etcdserverpb.LeaseKeepAliveResponse", "ttl", "TTL"),
    ("etcdserverpb.LeaseTimeToLiveRequest", "id", "ID"),
    ("etcdserverpb.LeaseTimeToLiveResponse", "id", "ID"),
    ("etcdserverpb.LeaseTimeToLiveResponse", "ttl", "TTL"),
    (
        "etcdserverpb.LeaseTimeToLiveResponse",
        "granted_ttl",
        "grantedTTL",
    ),
    ("etcdserverpb.LeaseStatus", "id", "ID"),
    ("etcdserverpb.Member", "id", "ID"),
    ("etcdserverpb.Member", "peer_urls", "peerURLs"),
    ("etcdserverpb.Member", "client_urls", "clientURLs"),
    ("etcdserverpb.Member", "is_learner", "isLearner"),
    ("etcdserverpb.MemberAddRequest", "peer_urls", "peerURLs"),
    ("etcdserverpb.MemberAddRequest", "is_learner", "isLearner"),
    ("etcdserverpb.MemberRemoveRequest", "id", "ID"),
    ("etcdserverpb.MemberUpdateRequest", "id", "ID"),
    ("etcdserverpb.MemberUpdateRequest", "peer_urls", "peerURLs"),
    ("etcdserverpb.MemberPromoteRequest", "id", "ID"),
    ("etcdserverpb.AlarmRequest", "member_id", "memberID"),
    ("etcdserverpb.AlarmMember", "member_id", "memberID"),
    ("etcdserverpb.StatusResponse", "db_size", "dbSize"),
    ("etcdserverpb.StatusResponse", "raft_index", "raftIndex"),
    ("etcdserverpb.StatusResponse", "raft_term", "raftTerm"),
    (
        "etcdserverpb.StatusResponse",
        "raft_applied_index",
        "raftAppliedIndex",
    ),
    (
        "etcdserverpb.StatusResponse",
        "db_size_in_use",
        "dbSizeInUse",
    ),
    ("etcdserverpb.StatusResponse", "is_learner", "isLearner"),
    (
        "etcdserverpb.StatusResponse",
        "db_size_quota",
        "dbSizeQuota",
    ),
    ("etcdserverpb.MoveLeaderRequest", "target_id", "targetID"),
    (
        "etcdserverpb.AuthUserAddRequest",
        "hashed_password",
        "hashedPassword",
    ),
    (
        "etcdserverpb.AuthUserChangePasswordRequest",
        "hashed_password",
        "hashedPassword",
    ),
    (
        "etcdserverpb.AuthStatusResponse",
        "auth_revision",
        "authRevision",
    ),
    ("authpb.Permission", "perm_type", "permType"),
    ("authpb.Role", "key_permission", "keyPermission"),
];

/// Writes `<package>.serde.rs` for etcd's packages: serde implementations in the protobuf
/// JSON mapping (64-bit integers as strings, bytes as base64, enums by name) whose field
/// names are etcd's (see [`ETCD_JSON_NAMES`]). Reading accepts the .proto name too.
fn write_json_mapping(
    mut descriptors: prost_types::FileDescriptorSet,
) -> Result<(), Box<dyn std::error::Error>> {
    fn rename(messages: &mut [prost_types::DescriptorProto], parent: &str) {
        for message in messages {
            let path = format!("{parent}{}", message.name());
            for field in &mut message.field {
                let etcd = ETCD_JSON_NAMES
                    .iter()
                    .find(|(m, f, _)| *m == path && *f == field.name())
                    .map(|(_, _, json)| json.to_string());
                field.json_name = Some(etcd.unwrap_or_else(|| field.name().to_string()));
            }
            rename(&mut message.nested_type, &format!("{path}."));
        }
    }
    for file in &mut descriptors.file {
        let package = file.package().to_string();
        rename(&mut file.message_type, &format!("{package}."));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors.encode_to_vec())?
        .out_dir(&out)
        .build(JSON_PACKAGES)?;
    Ok(())
}
