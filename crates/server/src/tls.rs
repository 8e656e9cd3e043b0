//! The member's TLS, from its configuration: what its client and peer listeners serve with
//! (certificate files, or a self-signed certificate made at start for `--auto-tls`), and what
//! it presents and trusts when it dials its peers (their peer port; their client port for the
//! corruption check).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flotilla_tls::generate::self_signed;
use flotilla_tls::{ClientConfig, ClientTls, ServerTls, ServerTlsFiles};

use crate::config::{ServerConfig, TlsSide};

/// The TLS of one member.
#[derive(Debug, Default)]
pub struct MemberTls {
    /// For https:// client URLs.
    pub client: Option<Arc<ServerTls>>,
    /// For https:// peer URLs.
    pub peer: Option<Arc<ServerTls>>,
    /// For dialing peers' https:// peer URLs.
    pub dial_peers: Option<Arc<ClientConfig>>,
}

/// Reads (or, for auto-TLS, makes) everything; an error names the flag or file at fault.
pub fn member_tls(config: &ServerConfig) -> anyhow::Result<MemberTls> {
    let client_hosts = hosts(&config.listen_client_urls, &config.advertise_client_urls);
    let peer_hosts = hosts(
        &config.listen_peer_urls,
        &config.initial_advertise_peer_urls,
    );
    let client_side = resolve_auto(
        &config.client_tls,
        &config.data_dir,
        "client",
        &client_hosts,
    )?;
    let peer_side = resolve_auto(&config.peer_tls, &config.data_dir, "peer", &peer_hosts)?;
    let serves_https = |urls: &[String]| urls.iter().any(|url| url.starts_with("https://"));
    let client = serves_https(&config.listen_client_urls)
        .then(|| server_tls(&client_side, config))
        .transpose()
        .context("the client port's TLS")?;
    let peer = serves_https(&config.listen_peer_urls)
        .then(|| server_tls(&peer_side, config))
        .transpose()
        .context("the peer port's TLS")?;
    let dial_peers = dialing(&peer_side)
        .context("dialing peers over TLS (--peer-trusted-ca-file, --peer-cert-file)")?;
    Ok(MemberTls {
        client,
        peer,
        dial_peers,
    })
}

/// What a member presents and trusts when dialing peers, from its peer flags alone (for
/// joining a cluster before anything else is set up).
pub fn dial_peers(config: &ServerConfig) -> anyhow::Result<Option<Arc<ClientConfig>>> {
    let hosts = hosts(
        &config.listen_peer_urls,
        &config.initial_advertise_peer_urls,
    );
    dialing(&resolve_auto(
        &config.peer_tls,
        &config.data_dir,
        "peer",
        &hosts,
    )?)
}

/// The host names and addresses a certificate made here must name: those of the URLs, and
/// the loopback names.
fn hosts(listen: &[String], advertise: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    for url in listen.iter().chain(advertise) {
        if let Ok((host, _)) = crate::config::parse_url(url) {
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            if !hosts.contains(&host) && host != "0.0.0.0" && host != "::" {
                hosts.push(host);
            }
        }
    }
    hosts
}

/// With auto-TLS and no certificate given: the self-signed certificate in
/// `<data-dir>/fixtures/<side>`, made on first start (etcd keeps its own there too).
fn resolve_auto(
    side: &TlsSide,
    data_dir: &Path,
    name: &str,
    hosts: &[String],
) -> anyhow::Result<TlsSide> {
    if !side.auto_tls || side.cert.is_some() {
        return Ok(side.clone());
    }
    let dir = data_dir.join("fixtures").join(name);
    let (cert, key) = (dir.join("cert.pem"), dir.join("cert-key.pem"));
    if !(cert.exists() && key.exists()) {
        let pair = self_signed(&format!("flotilla {name} (auto-tls)"), hosts)
            .context("cannot make a self-signed certificate")?;
        pair.write(&dir, "cert")?;
        tracing::warn!(dir = %dir.display(), "auto-TLS: made a self-signed certificate; clients cannot verify it (development only)");
    }
    Ok(TlsSide {
        cert: Some(cert),
        key: Some(key),
        ..side.clone()
    })
}

fn server_tls(side: &TlsSide, config: &ServerConfig) -> anyhow::Result<Arc<ServerTls>> {
    let (Some(cert), Some(key)) = (&side.cert, &side.key) else {
        anyhow::bail!("no certificate and key");
    };
    let files = ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        trusted_ca: side.trusted_ca.clone(),
        client_cert_auth: side.client_cert_auth,
    };
    Ok(Arc::new(ServerTls::load(files, config.tls_policy.clone())?))
}

/// The dialing configuration, if the side has any TLS setting at all.
fn dialing(side: &TlsSide) -> anyhow::Result<Option<Arc<ClientConfig>>> {
    if side.cert.is_none() && side.trusted_ca.is_none() && !side.auto_tls {
        return Ok(None);
    }
    let tls = ClientTls {
        trusted_ca: side.trusted_ca.clone(),
        cert: side.cert.clone(),
        key: side.key.clone(),
        insecure_skip_verify: side.auto_tls && side.trusted_ca.is_none(),
    };
    tls.config().map(Some)
}
