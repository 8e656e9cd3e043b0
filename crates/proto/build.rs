//! Compiles the project's .proto files with protox, a protobuf compiler written in Rust, so a
//! plain `cargo build` needs no `protoc` on the machine.

use std::path::Path;

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
