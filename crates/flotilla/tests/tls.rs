//! TLS on real `flotilla serve` processes: a 3-member cluster with https:// client and peer
//! URLs and client certificate authentication on both ports, as `flotilla dev --tls` runs it.
//! Requests work through every member (the peer traffic and the forwarding to the leader go
//! over TLS too); a client without a certificate, with one from another CA, or speaking plain
//! HTTP to the https port is refused at the handshake; a certificate replaced on disk is
//! served to the next connection without a restart. Each test is bounded in time and kills
//! its processes by PID at the end.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use flotilla_tls::ClientTls;
use flotilla_tls::generate::CertificateAuthority;
use tokio_rustls::rustls::pki_types::ServerName;

const LIMIT: Duration = Duration::from_secs(90);

fn hosts() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

struct Pki {
    dir: PathBuf,
    ca: CertificateAuthority,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca: CertificateAuthority::new("test CA").unwrap(),
        };
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(pki.ca_file(), &pki.ca.pem.cert).unwrap();
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        self.ca
            .issue(name, &hosts())
            .unwrap()
            .write(&self.dir, name)
            .unwrap()
    }

    fn client(&self, name: &str) -> ClientTls {
        let (cert, key) = self.issue(name);
        ClientTls {
            trusted_ca: Some(self.ca_file()),
            cert: Some(cert),
            key: Some(key),
            insecure_skip_verify: false,
        }
    }
}

/// A TLS cluster: every member with its own certificate (so one can be rotated alone).
fn start_tls_cluster(size: usize, pki: &Pki) -> TestCluster {
    let mut cluster = TestCluster::reserve(size, &[]);
    for member in &mut cluster.members {
        member.scheme = "https";
    }
    cluster.client_tls = Some(pki.client("root").config().unwrap());
    let initial = cluster.initial_cluster();
    let ca = pki.ca_file().display().to_string();
    for i in 0..size {
        let (cert, key) = pki.issue(&format!("member{i}"));
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let mut command = cluster.command(i, &initial, "new");
        command.args([
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--client-cert-auth",
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &ca,
            "--peer-client-cert-auth",
        ]);
        let log = std::fs::File::create(&cluster.members[i].log).unwrap();
        command.stdout(log.try_clone().unwrap()).stderr(log);
        cluster.members[i].process = Some(Process {
            child: command.spawn().unwrap(),
        });
    }
    cluster
}

/// Connects with `client` to member `i`'s client port and returns the certificate it serves,
/// or the reason the connection failed (a refused handshake shows on the first read).
async fn handshake(cluster: &TestCluster, i: usize, client: &ClientTls) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = client.config().map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", cluster.members[i].client_port()))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let certificate = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    // An HTTP/2 preface: the server answers with its SETTINGS, or closes on a refused client.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    stream
        .read_exact(&mut byte)
        .await
        .map_err(|e| e.to_string())?;
    Ok(certificate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_speaks_tls_on_every_port_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let cluster = start_tls_cluster(3, &pki);
    bounded(LIMIT, async {
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        // A write through a follower is forwarded to the leader over the peer port's TLS,
        // replicated over it, and read back everywhere.
        let mut kv = cluster.kv(follower).await;
        put(&mut kv, "secret", "value").await.unwrap();
        for i in 0..3 {
            let value = eventually("the write to reach every member", LIMIT, || async {
                get(&mut cluster.kv(i).await, "secret", true)
                    .await
                    .ok()
                    .flatten()
            })
            .await;
            assert_eq!(value, "value");
        }

        // Refused at the handshake: no client certificate, one from another CA.
        let no_certificate = ClientTls {
            trusted_ca: Some(pki.ca_file()),
            ..ClientTls::default()
        };
        assert!(handshake(&cluster, leader, &no_certificate).await.is_err());
        let other = Pki::new(&dir.path().join("other"));
        let stranger = ClientTls {
            trusted_ca: Some(pki.ca_file()),
            ..other.client("mallory")
        };
        assert!(handshake(&cluster, leader, &stranger).await.is_err());
        assert!(
            handshake(&cluster, leader, &pki.client("alice"))
                .await
                .is_ok()
        );
        let log = cluster.members[leader].log_text();
        assert!(log.contains("rejected a TLS connection"), "{log}");

        // Plain HTTP/2 to the https port gets no gRPC answer.
        let plain = tonic::transport::Endpoint::from_shared(format!(
            "http://127.0.0.1:{}",
            cluster.members[leader].client_port()
        ))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
        let refused = flotilla_proto::etcdserverpb::kv_client::KvClient::new(plain)
            .range(flotilla_proto::etcdserverpb::RangeRequest {
                key: "secret".into(),
                ..Default::default()
            })
            .await;
        assert!(refused.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let cluster = start_tls_cluster(1, &pki);
    bounded(LIMIT, async {
        cluster.wait_for_leader(&[0]).await;
        let client = pki.client("alice");
        let before = handshake(&cluster, 0, &client).await.unwrap();
        // The rotation: a new certificate and key for the same member, written in place.
        let rotated = Arc::new(pki.ca.issue("member0-rotated", &hosts()).unwrap());
        rotated.write(&pki.dir, "member0").unwrap();
        let new_der =
            flotilla_tls::load_certificates(&pki.dir.join("member0.pem")).unwrap()[0].to_vec();
        assert_ne!(before, new_der);
        eventually("the new certificate to be served", LIMIT, || async {
            let served = handshake(&cluster, 0, &client).await.ok()?;
            (served == new_der).then_some(())
        })
        .await;
        // The member kept serving throughout.
        let mut kv = cluster.kv(0).await;
        put(&mut kv, "after-rotation", "yes").await.unwrap();
        assert!(
            cluster.members[0]
                .log_text()
                .contains("reloaded the TLS certificates")
        );
    })
    .await;
}

/// With --client-cert-auth and auth on, a request without a token is its certificate's
/// common name's (etcd's rule): each user's permissions apply, no password needed, and a
/// name that is no user gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_a_client_certificate_names_the_user() {
    use flotilla_proto::authpb::{Permission, permission::Type};
    use flotilla_proto::etcdserverpb::auth_client::AuthClient;
    use flotilla_proto::etcdserverpb::kv_client::KvClient;
    use flotilla_proto::etcdserverpb::*;

    bounded(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let mut cluster = start_tls_cluster(3, &pki);
        cluster.wait_for_leader(&[0, 1, 2]).await;
        let mut auth = AuthClient::new(cluster.channel(0).await);
        for name in ["root", "alice"] {
            auth.user_add(AuthUserAddRequest {
                name: name.into(),
                options: Some(flotilla_proto::authpb::UserAddOptions { no_password: true }),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        auth.role_add(AuthRoleAddRequest { name: "app".into() })
            .await
            .unwrap();
        auth.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: "app".into(),
            perm: Some(Permission {
                perm_type: Type::Readwrite as i32,
                key: b"app/".to_vec().into(),
                range_end: b"app0".to_vec().into(),
            }),
        })
        .await
        .unwrap();
        for (user, role) in [("alice", "app"), ("root", "root")] {
            auth.user_grant_role(AuthUserGrantRoleRequest {
                user: user.into(),
                role: role.into(),
            })
            .await
            .unwrap();
        }
        auth.auth_enable(AuthEnableRequest {}).await.unwrap();

        // The cluster's own client certificate says "root".
        let mut as_root = KvClient::new(cluster.channel(1).await);
        put(&mut as_root, "etc/1", "x").await.unwrap();
        let as_user = |name: &str| pki.client(name).config().unwrap();
        cluster.client_tls = Some(as_user("alice"));
        let alice_channel = cluster.channel(2).await;
        let mut as_alice = KvClient::new(alice_channel.clone());
        put(&mut as_alice, "app/1", "x").await.unwrap();
        let denied = put(&mut as_alice, "etc/2", "x").await.unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
        // A user added with no_password cannot log in with one.
        let login = AuthClient::new(alice_channel)
            .authenticate(AuthenticateRequest {
                name: "alice".into(),
                password: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            login.message(),
            "etcdserver: authentication failed, invalid user ID or password"
        );
        cluster.client_tls = Some(as_user("stranger"));
        let mut as_stranger = KvClient::new(cluster.channel(0).await);
        let denied = put(&mut as_stranger, "app/2", "x").await.unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    })
    .await;
}
