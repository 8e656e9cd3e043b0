//! Compiles the peer protocol with protox (no `protoc` needed), reusing the etcd message types
//! of `flotilla-proto` for forwarded responses.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = Path::new("proto/flotilla/peer/v1/peer.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([file], ["proto", "../proto/proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .bytes(".")
        .extern_path(".etcdserverpb", "::flotilla_proto::etcdserverpb")
        .extern_path(".mvccpb", "::flotilla_proto::mvccpb")
        .extern_path(".authpb", "::flotilla_proto::authpb")
        .compile_fds(descriptors)?;
    Ok(())
}
