//! A server's TLS configuration, read again when its files change.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::pem::{load_certificates, load_private_key};
use crate::policy::TlsPolicy;

/// etcd's `--cert-file`, `--key-file`, `--trusted-ca-file` and `--client-cert-auth` (or
/// their `--peer-` versions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are checked against it when one is presented.
    pub trusted_ca: Option<PathBuf>,
    /// A client without a certificate signed by the trusted CA is refused at the handshake.
    pub client_cert_auth: bool,
}

/// How often, at most, a handshake checks whether the files changed.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A server's TLS configuration. [`ServerTls::acceptor`] reads the files again when their
/// modification time or size changed since they were last read; if the new files do not
/// make a valid configuration (a rotation half done), the old one stays, with a warning.
#[derive(Debug)]
pub struct ServerTls {
    files: ServerTlsFiles,
    policy: TlsPolicy,
    reload_check_interval: Duration,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    stamps: Vec<Option<(SystemTime, u64)>>,
    config: Arc<ServerConfig>,
    checked_at: Instant,
}

impl ServerTls {
    /// Reads the files; an error says which file and what is wrong with it.
    pub fn load(files: ServerTlsFiles, policy: TlsPolicy) -> anyhow::Result<ServerTls> {
        if files.client_cert_auth && files.trusted_ca.is_none() {
            bail!("client certificate authentication needs a trusted CA file");
        }
        let stamps = stamps(&files);
        let config = Arc::new(server_config(&files, &policy)?);
        Ok(ServerTls {
            files,
            policy,
            reload_check_interval: RELOAD_CHECK_INTERVAL,
            loaded: Mutex::new(Loaded {
                stamps,
                config,
                checked_at: Instant::now(),
            }),
        })
    }

    /// Checks the files at most this often (every second by default; zero checks at every
    /// handshake).
    pub fn with_reload_check_interval(mut self, interval: Duration) -> ServerTls {
        self.reload_check_interval = interval;
        self
    }

    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// The acceptor for the next connection, with the files as they are now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.checked_at.elapsed() >= self.reload_check_interval {
            loaded.checked_at = Instant::now();
            let now = stamps(&self.files);
            if now != loaded.stamps {
                loaded.stamps = now;
                match server_config(&self.files, &self.policy) {
                    Ok(config) => {
                        tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificates");
                        loaded.config = Arc::new(config);
                    }
                    Err(err) => tracing::warn!(
                        "the TLS files changed but do not load; keeping the previous ones: {err:#}"
                    ),
                }
            }
        }
        TlsAcceptor::from(loaded.config.clone())
    }
}

fn stamps(files: &ServerTlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.trusted_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let metadata = std::fs::metadata(path).ok()?;
        Some((metadata.modified().ok()?, metadata.len()))
    })
    .collect()
}

fn server_config(files: &ServerTlsFiles, policy: &TlsPolicy) -> anyhow::Result<ServerConfig> {
    let provider = policy.provider()?;
    let certificates = load_certificates(&files.cert)?;
    let key = load_private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(policy.versions()?)
        .context("the TLS versions and cipher suites have nothing in common")?;
    let builder = match &files.trusted_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in load_certificates(ca)? {
                roots.add(certificate).with_context(|| {
                    format!("{} holds an unusable CA certificate", ca.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.client_cert_auth {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            };
            builder.with_client_cert_verifier(
                verifier.with_context(|| format!("cannot verify clients with {}", ca.display()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certificates, key)
        .with_context(|| {
            format!(
                "the key in {} does not go with the certificate in {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    config.alpn_protocols = crate::alpn_protocols();
    Ok(config)
}
