//! Real handshakes on 127.0.0.1: who is let in, who is refused, and a certificate rotated on
//! disk reaching the next connection without a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_tls::generate::{CertificateAuthority, PemPair, self_signed};
use flotilla_tls::{ClientTls, ServerTls, ServerTlsFiles, TlsPolicy};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(20);

fn hosts() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

/// Accepts connections forever, answering each byte received with the same byte.
async fn serve(tls: Arc<ServerTls>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tls.acceptor();
            tokio::spawn(async move {
                if let Ok(mut stream) = acceptor.accept(tcp).await {
                    let mut byte = [0u8; 1];
                    if stream.read_exact(&mut byte).await.is_ok() {
                        let _ = stream.write_all(&byte).await;
                        let _ = stream.flush().await;
                    }
                }
            });
        }
    });
    addr
}

/// Connects, sends a byte and reads it back; the server's certificate on success.
async fn round_trip(addr: SocketAddr, client: &ClientTls) -> Result<Vec<u8>, String> {
    let config = client.config().map_err(|e| e.to_string())?;
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3 reports a refused client certificate only on the first read.
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        let certificate = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        Ok(certificate)
    };
    tokio::time::timeout(LIMIT, connect).await.expect("bounded")
}

struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: CertificateAuthority::new("test CA").unwrap(),
        }
    }

    fn write(&self, pair: &PemPair, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        pair.write(self.dir.path(), name).unwrap()
    }

    fn ca_file(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, &self.ca.pem.cert).unwrap();
        path
    }

    fn client(&self, name: &str) -> ClientTls {
        let (cert, key) = self.write(&self.ca.issue(name, &hosts()).unwrap(), name);
        ClientTls {
            trusted_ca: Some(self.ca_file()),
            cert: Some(cert),
            key: Some(key),
            insecure_skip_verify: false,
        }
    }
}

#[tokio::test]
async fn client_certificate_auth_lets_in_only_clients_the_trusted_ca_signed() {
    let pki = Pki::new();
    let (cert, key) = pki.write(&pki.ca.issue("server", &hosts()).unwrap(), "server");
    let files = ServerTlsFiles {
        cert,
        key,
        trusted_ca: Some(pki.ca_file()),
        client_cert_auth: true,
    };
    let addr = serve(Arc::new(
        ServerTls::load(files, TlsPolicy::default()).unwrap(),
    ))
    .await;

    assert!(round_trip(addr, &pki.client("alice")).await.is_ok());
    let no_certificate = ClientTls {
        trusted_ca: Some(pki.ca_file()),
        ..ClientTls::default()
    };
    let refused = round_trip(addr, &no_certificate).await.unwrap_err();
    assert!(
        refused.contains("CertificateRequired") || refused.contains("certificate"),
        "{refused}"
    );
    let other = Pki::new();
    let mut stranger = other.client("mallory");
    stranger.trusted_ca = Some(pki.ca_file());
    assert!(
        round_trip(addr, &stranger).await.is_err(),
        "a certificate of another CA"
    );
    // And the client side: a server not signed by the CA the client trusts is refused.
    let wrong_ca = ClientTls {
        trusted_ca: Some(other.ca_file()),
        ..pki.client("alice")
    };
    let refused = round_trip(addr, &wrong_ca).await.unwrap_err();
    assert!(
        refused.contains("UnknownIssuer") || refused.contains("invalid peer certificate"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_self_signed_server_needs_insecure_skip_verify() {
    let pki = Pki::new();
    let (cert, key) = pki.write(&self_signed("auto", &hosts()).unwrap(), "auto");
    let files = ServerTlsFiles {
        cert,
        key,
        trusted_ca: None,
        client_cert_auth: false,
    };
    let addr = serve(Arc::new(
        ServerTls::load(files, TlsPolicy::default()).unwrap(),
    ))
    .await;
    let verifying = ClientTls {
        trusted_ca: Some(pki.ca_file()),
        ..ClientTls::default()
    };
    assert!(round_trip(addr, &verifying).await.is_err());
    let insecure = ClientTls {
        insecure_skip_verify: true,
        ..ClientTls::default()
    };
    assert!(round_trip(addr, &insecure).await.is_ok());
}

#[tokio::test]
async fn a_rotated_certificate_reaches_the_next_connection() {
    let pki = Pki::new();
    let first = pki.ca.issue("first", &hosts()).unwrap();
    let (cert, key) = pki.write(&first, "server");
    let files = ServerTlsFiles {
        cert,
        key,
        trusted_ca: None,
        client_cert_auth: false,
    };
    let tls = ServerTls::load(files, TlsPolicy::default())
        .unwrap()
        .with_reload_check_interval(Duration::ZERO);
    let addr = serve(Arc::new(tls)).await;
    let client = ClientTls {
        trusted_ca: Some(pki.ca_file()),
        ..ClientTls::default()
    };
    let before = round_trip(addr, &client).await.unwrap();
    let second = pki.ca.issue("second-certificate", &hosts()).unwrap();
    pki.write(&second, "server");
    let after = round_trip(addr, &client).await.unwrap();
    assert_ne!(before, after, "the new certificate is served");

    // A half-done rotation (a key that does not match) keeps the last good pair.
    // (A trailing newline makes the size differ, so the change is seen whatever the clock.)
    std::fs::write(
        pki.dir.path().join("server-key.pem"),
        format!("{}\n", first.key),
    )
    .unwrap();
    let still = round_trip(addr, &client).await.unwrap();
    assert_eq!(still, after);
}
