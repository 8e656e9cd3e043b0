//! # flotilla-tls: TLS for Flotilla's clients and servers
//!
//! rustls with the ring provider (nothing beyond a C compiler to build), configured the way
//! etcd's flags configure Go's TLS:
//!
//! - [`ServerTls`]: a server's certificate and key, and optionally the CA that client
//!   certificates must be signed by (`--trusted-ca-file`; required with
//!   `--client-cert-auth`). The files are read again when they change, so a certificate
//!   rotation needs no restart (etcd does the same).
//! - [`ClientTls`]: what a client (our CLI, a member talking to its peers) trusts and presents;
//!   [`channel`] opens a gRPC channel over it for `https://` URLs.
//! - [`TlsPolicy`]: etcd's `--cipher-suites` and `--tls-min-version`.
//! - [`generate`]: throwaway certificates for `flotilla dev --tls`, `--auto-tls` and tests.
//!
//! Both sides speak ALPN `h2` (gRPC) and `http/1.1` (the JSON gateway).

mod client;
pub mod generate;
mod pem;
mod policy;
mod server;

pub use client::{ClientTls, TlsConnector, channel};
pub use pem::{load_certificates, load_private_key};
pub use policy::TlsPolicy;
/// The rustls types in this crate's signatures.
pub use rustls::ClientConfig;
pub use rustls::pki_types::CertificateDer;
pub use server::{ServerTls, ServerTlsFiles};
pub use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// ALPN protocols, in preference order: gRPC needs HTTP/2.
pub(crate) fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// The ring crypto provider. rustls deprecates it for lacking post-quantum key exchange; it is
/// kept because the alternative (aws-lc-rs) needs more than a C compiler to build, which a plain
/// `cargo build` must not.
#[allow(deprecated)]
pub(crate) fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
