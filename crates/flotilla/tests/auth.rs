//! Authentication and role-based access on real `flotilla serve` processes, through etcd's
//! gRPC API as etcd's clients use it (the token in the `token` metadata): users, roles and
//! permissions set up, auth enabled (only with a root user), tokens from one member accepted
//! by every member, each RPC family checked with etcd's codes and texts, a revoked
//! permission in force for the next write, JWT tokens, and the auth store surviving a
//! restart. Each test is bounded in time and kills its processes by PID at the end.

mod common;

use std::time::Duration;

use common::*;
use flotilla_proto::authpb::Permission;
use flotilla_proto::authpb::permission::Type as PermissionType;
use flotilla_proto::etcdserverpb::auth_client::AuthClient;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::*;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const LIMIT: Duration = Duration::from_secs(120);
/// bcrypt's lowest cost: the tests hash and check many passwords.
const FAST_BCRYPT: [&str; 2] = ["--bcrypt-cost", "4"];

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("token", token.parse().expect("an ASCII token"));
    }
    request
}

async fn authenticate(channel: &Channel, name: &str, password: &str) -> Result<String, Status> {
    let response = AuthClient::new(channel.clone())
        .authenticate(AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await?;
    Ok(response.into_inner().token)
}

async fn put(channel: &Channel, token: Option<&str>, key: &str) -> Result<(), Status> {
    let request = PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    };
    KvClient::new(channel.clone())
        .put(with_token(request, token))
        .await
        .map(drop)
}

async fn range(
    channel: &Channel,
    token: Option<&str>,
    key: &str,
    end: &str,
) -> Result<RangeResponse, Status> {
    let request = RangeRequest {
        key: key.as_bytes().to_vec().into(),
        range_end: end.as_bytes().to_vec().into(),
        ..Default::default()
    };
    Ok(KvClient::new(channel.clone())
        .range(with_token(request, token))
        .await?
        .into_inner())
}

#[track_caller]
fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, text: &str) {
    let status = result.expect_err("refused");
    assert_eq!(
        (status.code(), status.message()),
        (code, text),
        "{status:?}"
    );
}

/// As root before auth is on: root, alice with role "app" (read-write on app/…, read on
/// shared/…), and auth enabled; the root token.
async fn set_up(channel: &Channel) -> String {
    let mut auth = AuthClient::new(channel.clone());
    for (name, password) in [("root", "rootpw"), ("alice", "alicepw")] {
        auth.user_add(AuthUserAddRequest {
            name: name.into(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    auth.role_add(AuthRoleAddRequest { name: "app".into() })
        .await
        .unwrap();
    for (kind, key, end) in [
        (PermissionType::Readwrite, "app/", "app0"),
        (PermissionType::Read, "shared/", "shared0"),
    ] {
        auth.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: "app".into(),
            perm: Some(Permission {
                perm_type: kind as i32,
                key: key.as_bytes().to_vec().into(),
                range_end: end.as_bytes().to_vec().into(),
            }),
        })
        .await
        .unwrap();
    }
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "alice".into(),
        role: "app".into(),
    })
    .await
    .unwrap();
    // etcd's rule: no auth without a root user holding the root role.
    assert_status(
        auth.auth_enable(AuthEnableRequest {}).await,
        Code::FailedPrecondition,
        "etcdserver: root user does not have root role",
    );
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .unwrap();
    auth.auth_enable(AuthEnableRequest {}).await.unwrap();
    authenticate(channel, "root", "rootpw").await.unwrap()
}

#[tokio::test]
async fn roles_and_permissions_gate_every_kind_of_request_on_every_member() {
    bounded(LIMIT, async {
        let cluster = TestCluster::start(3, &FAST_BCRYPT);
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let at_leader = cluster.channel(leader).await;
        let at_follower = cluster.channel(follower).await;

        // Before auth, Authenticate answers as etcd does (clients then go on without a token).
        assert_status(
            authenticate(&at_leader, "root", "x").await,
            Code::FailedPrecondition,
            "etcdserver: authentication is not enabled",
        );
        let root = set_up(&at_leader).await;

        // No credentials, bad credentials, a token that is not one.
        assert_status(
            put(&at_follower, None, "app/1").await,
            Code::InvalidArgument,
            "etcdserver: user name is empty",
        );
        assert_status(
            authenticate(&at_follower, "alice", "wrong").await,
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        assert_status(
            authenticate(&at_follower, "mallory", "x").await,
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        assert_status(
            put(&at_follower, Some("forged.7"), "app/1").await,
            Code::Unauthenticated,
            "etcdserver: invalid auth token",
        );

        // A simple token issued by one member is known to all (it went through the log).
        let alice = authenticate(&at_follower, "alice", "alicepw")
            .await
            .unwrap();
        for channel in [&at_leader, &at_follower] {
            put(channel, Some(&alice), "app/1").await.unwrap();
        }
        let denied = |result| {
            assert_status(
                result,
                Code::PermissionDenied,
                "etcdserver: permission denied",
            )
        };
        denied(put(&at_follower, Some(&alice), "shared/1").await.map(drop));
        denied(put(&at_leader, Some(&alice), "etc/1").await.map(drop));
        assert_eq!(
            range(&at_follower, Some(&alice), "app/", "app0")
                .await
                .unwrap()
                .count,
            1
        );
        range(&at_follower, Some(&alice), "shared/", "shared0")
            .await
            .unwrap();
        denied(
            range(&at_follower, Some(&alice), "app/", "\0")
                .await
                .map(drop),
        );
        denied(range(&at_leader, Some(&alice), "etc/1", "").await.map(drop));
        // Root reads and writes everything.
        put(&at_follower, Some(&root), "etc/1").await.unwrap();
        assert_eq!(
            range(&at_leader, Some(&root), "\0", "\0")
                .await
                .unwrap()
                .count,
            2
        );

        // A txn is checked op by op, its compares included, before anything runs.
        let txn = |compare_key: &str| TxnRequest {
            compare: vec![Compare {
                key: compare_key.as_bytes().to_vec().into(),
                result: compare::CompareResult::Greater as i32,
                target: compare::CompareTarget::Version as i32,
                target_union: Some(compare::TargetUnion::Version(0)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"app/2".to_vec().into(),
                    ..Default::default()
                })),
            }],
            failure: Vec::new(),
        };
        let mut kv = KvClient::new(at_follower.clone());
        assert!(
            kv.txn(with_token(txn("app/1"), Some(&alice)))
                .await
                .unwrap()
                .into_inner()
                .succeeded
        );
        denied(
            kv.txn(with_token(txn("etc/1"), Some(&alice)))
                .await
                .map(drop),
        );
        // Both branches are checked, whichever would run.
        let mut forbidden_branch = txn("app/1");
        forbidden_branch.failure.push(RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: b"etc/1".to_vec().into(),
                    ..Default::default()
                },
            )),
        });
        denied(
            kv.txn(with_token(forbidden_branch, Some(&alice)))
                .await
                .map(drop),
        );
        assert_eq!(
            range(&at_leader, Some(&root), "app/2", "")
                .await
                .unwrap()
                .count,
            1
        );

        // The Lock service acts with its caller's permissions; so does a lease's revocation
        // (write permission on every key attached to the lease).
        let lease = flotilla_proto::etcdserverpb::lease_client::LeaseClient::new(at_leader.clone())
            .lease_grant(with_token(
                LeaseGrantRequest { ttl: 60, id: 0 },
                Some(&alice),
            ))
            .await
            .unwrap()
            .into_inner()
            .id;
        let mut locks = flotilla_proto::v3lockpb::lock_client::LockClient::new(at_follower.clone());
        let lock = |name: &str| flotilla_proto::v3lockpb::LockRequest {
            name: name.as_bytes().to_vec().into(),
            lease,
        };
        let held = locks
            .lock(with_token(lock("app/lock"), Some(&alice)))
            .await
            .unwrap();
        assert!(held.into_inner().key.starts_with(b"app/lock/"));
        denied(
            locks
                .lock(with_token(lock("etc/lock"), Some(&alice)))
                .await
                .map(drop),
        );
        let mut leases =
            flotilla_proto::etcdserverpb::lease_client::LeaseClient::new(at_leader.clone());
        let attach = PutRequest {
            key: b"etc/leased".to_vec().into(),
            lease,
            ..Default::default()
        };
        kv.put(with_token(attach, Some(&root))).await.unwrap();
        denied(
            leases
                .lease_revoke(with_token(LeaseRevokeRequest { id: lease }, Some(&alice)))
                .await
                .map(drop),
        );
        leases
            .lease_revoke(with_token(LeaseRevokeRequest { id: lease }, Some(&root)))
            .await
            .unwrap();

        // Watches are checked when created: refused with etcd's cancel reason.
        let (requests, inbound) = tokio::sync::mpsc::channel(4);
        let mut watch = WatchClient::new(at_follower.clone());
        let outbound = tokio_stream::wrappers::ReceiverStream::new(inbound);
        let mut responses = watch
            .watch(with_token(outbound, Some(&alice)))
            .await
            .unwrap()
            .into_inner();
        for key in ["etc/", "app/"] {
            let create = WatchCreateRequest {
                key: key.as_bytes().to_vec().into(),
                range_end: b"\xff".to_vec().into(),
                ..Default::default()
            };
            let create = WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
            };
            requests.send(create).await.unwrap();
        }
        let refused = responses.message().await.unwrap().unwrap();
        assert!(refused.created && refused.canceled, "{refused:?}");
        assert_eq!(
            refused.cancel_reason,
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        );
        let alice_wide = responses.message().await.unwrap().unwrap();
        assert!(
            alice_wide.canceled,
            "app/..\\xff is wider than app/..app0: {alice_wide:?}"
        );
        let create = |key: &[u8], end: &[u8]| WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: key.to_vec().into(),
                    range_end: end.to_vec().into(),
                    ..Default::default()
                },
            )),
        };
        requests.send(create(b"app/", b"app0")).await.unwrap();
        let watching = responses.message().await.unwrap().unwrap();
        assert!(watching.created && !watching.canceled, "{watching:?}");

        // Whole-store operations are root's.
        let mut maintenance = MaintenanceClient::new(at_follower.clone());
        denied(
            maintenance
                .hash_kv(with_token(HashKvRequest::default(), Some(&alice)))
                .await
                .map(drop),
        );
        denied(
            maintenance
                .defragment(with_token(DefragmentRequest {}, Some(&alice)))
                .await
                .map(drop),
        );
        maintenance
            .hash_kv(with_token(HashKvRequest::default(), Some(&root)))
            .await
            .unwrap();
        let compact = CompactionRequest {
            revision: 2,
            ..Default::default()
        };
        denied(
            kv.compact(with_token(compact, Some(&alice)))
                .await
                .map(drop),
        );
        let mut auth = AuthClient::new(at_follower.clone());
        denied(
            auth.user_list(with_token(AuthUserListRequest {}, Some(&alice)))
                .await
                .map(drop),
        );
        // A user may read itself and its own roles.
        let me = AuthUserGetRequest {
            name: "alice".into(),
        };
        let roles = auth
            .user_get(with_token(me, Some(&alice)))
            .await
            .unwrap()
            .into_inner()
            .roles;
        assert_eq!(roles, vec!["app".to_string()]);
        let users = auth
            .user_list(with_token(AuthUserListRequest {}, Some(&root)))
            .await
            .unwrap()
            .into_inner()
            .users;
        assert_eq!(users, vec!["alice".to_string(), "root".to_string()]);

        // Revoking a permission stops the next write at once, on every member.
        auth.role_revoke_permission(with_token(
            AuthRoleRevokePermissionRequest {
                role: "app".into(),
                key: b"app/".to_vec().into(),
                range_end: b"app0".to_vec().into(),
            },
            Some(&root),
        ))
        .await
        .unwrap();
        denied(put(&at_leader, Some(&alice), "app/3").await);
        denied(put(&at_follower, Some(&alice), "app/3").await);
        // As in etcd, a watch is checked only when created: the one alice opened before the
        // revocation keeps its events; a new one is refused.
        put(&at_leader, Some(&root), "app/after-revoke")
            .await
            .unwrap();
        let event = loop {
            let response = responses.message().await.unwrap().unwrap();
            if let Some(event) = response.events.into_iter().find(|e| {
                e.kv.as_ref()
                    .is_some_and(|kv| kv.key.as_ref() == b"app/after-revoke")
            }) {
                break event;
            }
        };
        assert!(event.kv.is_some());
        requests.send(create(b"app/", b"app0")).await.unwrap();
        let refused = loop {
            let response = responses.message().await.unwrap().unwrap();
            if response.created {
                break response;
            }
        };
        assert!(refused.canceled, "{refused:?}");

        // A new password voids the user's tokens.
        auth.user_change_password(with_token(
            AuthUserChangePasswordRequest {
                name: "alice".into(),
                password: "new".into(),
                ..Default::default()
            },
            Some(&root),
        ))
        .await
        .unwrap();
        assert_status(
            range(&at_follower, Some(&alice), "shared/", "shared0").await,
            Code::Unauthenticated,
            "etcdserver: invalid auth token",
        );
        let alice = authenticate(&at_leader, "alice", "new").await.unwrap();
        range(&at_follower, Some(&alice), "shared/", "shared0")
            .await
            .unwrap();

        // Root stays root; turning auth off needs root and lets everyone in again.
        assert_status(
            auth.user_delete(with_token(
                AuthUserDeleteRequest {
                    name: "root".into(),
                },
                Some(&root),
            ))
            .await,
            Code::InvalidArgument,
            "etcdserver: invalid auth management",
        );
        denied(
            auth.auth_disable(with_token(AuthDisableRequest {}, Some(&alice)))
                .await
                .map(drop),
        );
        auth.auth_disable(with_token(AuthDisableRequest {}, Some(&root)))
            .await
            .unwrap();
        put(&at_follower, None, "etc/2").await.unwrap();

        // Passwords and tokens never reach the logs.
        for member in &cluster.members {
            let log = member.log_text();
            for secret in ["alicepw", "rootpw", root.as_str(), alice.as_str()] {
                assert!(!log.contains(secret), "{} logged {secret:?}", member.name);
            }
        }
    })
    .await;
}

/// The auth store is replicated state, saved in snapshots: a member restarted from its
/// snapshot (taken every 5 entries here) and log enforces the same rules.
#[tokio::test]
async fn the_auth_store_survives_a_restart_from_snapshot_and_log() {
    bounded(LIMIT, async {
        let mut args = FAST_BCRYPT.to_vec();
        args.extend(["--snapshot-count", "5"]);
        let mut cluster = TestCluster::start(3, &args);
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let at_leader = cluster.channel(leader).await;
        let root = set_up(&at_leader).await;
        for i in 0..10 {
            put(&at_leader, Some(&root), &format!("app/{i}"))
                .await
                .unwrap();
        }
        let restarted = (leader + 1) % 3;
        cluster.kill9(restarted);
        cluster.restart(restarted);
        let channel = cluster.channel(restarted).await;
        // Tokens are member memory: the restarted member knows none, the client logs in again.
        let alice = eventually("the restarted member to authenticate", LIMIT, || {
            let channel = channel.clone();
            async move { authenticate(&channel, "alice", "alicepw").await.ok() }
        })
        .await;
        range(&channel, Some(&alice), "app/", "app0").await.unwrap();
        assert_status(
            range(&channel, Some(&alice), "etc/", "etc0").await,
            Code::PermissionDenied,
            "etcdserver: permission denied",
        );
        assert_status(
            put(&channel, None, "app/x").await,
            Code::InvalidArgument,
            "etcdserver: user name is empty",
        );
    })
    .await;
}

/// `--auth-token jwt`: a signed token any member verifies without shared state; a change to
/// the auth store makes older tokens stale ("revision of auth store is old", on which etcd's
/// clients authenticate again).
#[tokio::test]
async fn jwt_tokens_are_verified_by_every_member_and_go_stale_with_the_store() {
    bounded(LIMIT, async {
        let keys = tempfile::tempdir().unwrap();
        let secret = keys.path().join("jwt-secret");
        std::fs::write(&secret, b"a secret shared by the members for the test").unwrap();
        let token_flag = format!("jwt,sign-method=HS256,priv-key={},ttl=5m", secret.display());
        let mut args = FAST_BCRYPT.to_vec();
        args.extend(["--auth-token", &token_flag]);
        let cluster = TestCluster::start(3, &args);
        let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
        let at_leader = cluster.channel(leader).await;
        let at_follower = cluster.channel((leader + 1) % 3).await;
        let root = set_up(&at_leader).await;
        assert_eq!(root.split('.').count(), 3, "a JWT: {root}");
        let alice = authenticate(&at_follower, "alice", "alicepw")
            .await
            .unwrap();
        put(&at_leader, Some(&alice), "app/1").await.unwrap();
        // Any auth change moves the revision past the tokens issued before it.
        AuthClient::new(at_leader.clone())
            .role_add(with_token(
                AuthRoleAddRequest {
                    name: "other".into(),
                },
                Some(&root),
            ))
            .await
            .unwrap();
        assert_status(
            put(&at_follower, Some(&alice), "app/1").await,
            Code::InvalidArgument,
            "etcdserver: revision of auth store is old",
        );
        let alice = authenticate(&at_follower, "alice", "alicepw")
            .await
            .unwrap();
        put(&at_follower, Some(&alice), "app/1").await.unwrap();
    })
    .await;
}

#[test]
fn bad_auth_flags_are_refused_at_start_with_the_reason() {
    let cluster = TestCluster::reserve(1, &[]);
    for (args, expected) in [
        (vec!["--auth-token", "kerberos"], "unknown token type"),
        (
            vec!["--auth-token", "jwt,sign-method=RS256"],
            "needs pub-key",
        ),
        (vec!["--bcrypt-cost", "3"], "outside bcrypt's range"),
        (vec!["--auth-token-ttl", "0"], "must be positive"),
    ] {
        let child = cluster
            .command(0, &cluster.initial_cluster(), "new")
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run flotilla serve");
        // Killed by PID on drop if it does not exit by itself (a flag that was not refused).
        let mut process = Process { child };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "{args:?} started");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(process.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
