//! The client side: what a client trusts and presents, and gRPC channels over TLS.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::pem::{load_certificates, load_private_key};

/// etcdctl's `--cacert`, `--cert`, `--key` and `--insecure-skip-tls-verify` (or a member's
/// peer settings when it dials its peers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA the server's certificate must be signed by.
    pub trusted_ca: Option<PathBuf>,
    /// A client certificate and its key, for servers that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Accept any server certificate (self-signed `--auto-tls` ones): encryption without
    /// authentication, as etcdctl's flag of the same name.
    pub insecure_skip_verify: bool,
}

impl ClientTls {
    /// The rustls configuration; an error names the file at fault.
    pub fn config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let provider = Arc::new(crate::ring_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("the default TLS versions")?;
        let builder = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCertificate(provider)))
        } else {
            let Some(ca) = &self.trusted_ca else {
                bail!(
                    "TLS needs the CA file that signed the server's certificate (--cacert), or --insecure-skip-tls-verify"
                );
            };
            let mut roots = rustls::RootCertStore::empty();
            for certificate in load_certificates(ca)? {
                roots.add(certificate).with_context(|| {
                    format!("{} holds an unusable CA certificate", ca.display())
                })?;
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certificates(cert)?, load_private_key(key)?)
                .with_context(|| {
                    format!(
                        "the key in {} does not go with {}",
                        key.display(),
                        cert.display()
                    )
                })?,
            (None, None) => builder.with_no_client_auth(),
            _ => bail!("a client certificate needs both --cert and --key"),
        };
        config.alpn_protocols = crate::alpn_protocols();
        Ok(Arc::new(config))
    }
}

/// A lazily connecting channel to `endpoint`: over TLS with `tls` for an `https://` URL, plain
/// for `http://`. An https URL without TLS settings is an error that says so.
pub fn channel(endpoint: Endpoint, tls: Option<&Arc<ClientConfig>>) -> anyhow::Result<Channel> {
    if endpoint.uri().scheme_str() != Some("https") {
        return Ok(endpoint.connect_lazy());
    }
    let Some(config) = tls else {
        bail!(
            "{} is an https URL but no TLS settings were given (a trusted CA file)",
            endpoint.uri()
        );
    };
    Ok(endpoint.connect_with_connector_lazy(TlsConnector {
        config: config.clone(),
    }))
}

/// Opens a TCP connection (Nagle off) and runs the TLS handshake, naming the server by the
/// URL's host (an IP address or a DNS name).
#[derive(Clone, Debug)]
pub struct TlsConnector {
    pub config: Arc<ClientConfig>,
}

type Connecting = Pin<
    Box<
        dyn Future<
                Output = Result<
                    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                    std::io::Error,
                >,
            > + Send,
    >,
>;

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
            };
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("the host is not a valid server name"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// `--insecure-skip-tls-verify`: any certificate, still checking the handshake signatures.
#[derive(Debug)]
struct AnyServerCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
