//! `rust-etcd-client-interop <endpoint>`: one check per call of the `etcd-client` crate,
//! printed as `ok: ...`; the first failure is printed as `FAIL: ...` and exits 1. The server
//! must be a fresh single member (the checks enable and disable authentication). With
//! `--range-stream` the server must serve KV/RangeStream (etcd 3.7, Flotilla); without it, it
//! must answer it Unimplemented (etcd 3.4).

use std::process::ExitCode;
use std::time::Duration;

use etcd_client::{
    AlarmAction, AlarmType, Client, ConnectOptions, GetOptions, LockOptions, Permission,
    ResignOptions,
};

type Checked = Result<(), String>;

fn check(what: &str, ok: bool, detail: impl std::fmt::Debug) -> Checked {
    if ok {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(format!("{what}: {detail:?}"))
    }
}

fn failed(what: &str) -> impl FnOnce(etcd_client::Error) -> String + '_ {
    move |error| format!("{what}: {error}")
}

async fn connect(endpoint: &str, user: Option<(&str, &str)>) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    if let Some((name, password)) = user {
        options = options.with_user(name, password);
    }
    Client::connect([endpoint], Some(options))
        .await
        .map_err(|e| format!("connect to {endpoint}: {e}"))
}

async fn kv_and_leases(client: &mut Client) -> Checked {
    client
        .put("rust/a", "1", None)
        .await
        .map_err(failed("put"))?;
    let got = client
        .get("rust/", Some(GetOptions::new().with_prefix()))
        .await
        .map_err(failed("get --prefix"))?;
    check(
        "put and get",
        got.count() == 1 && got.kvs()[0].value() == b"1",
        got.kvs(),
    )?;
    let lease = client
        .lease_grant(30, None)
        .await
        .map_err(failed("lease grant"))?;
    let ttl = client
        .lease_time_to_live(lease.id(), None)
        .await
        .map_err(failed("lease time-to-live"))?;
    check("lease grant and time-to-live", ttl.ttl() > 0, ttl.ttl())?;
    client
        .lease_revoke(lease.id())
        .await
        .map_err(failed("lease revoke"))?;
    Ok(())
}

/// get_stream (KV/RangeStream, etcd 3.7): 3,000 values of 1 KiB come in several messages
/// whose key-values, in order, are the unary get's; the last carries the count. A server
/// without it (etcd before 3.7) must answer Unimplemented, on which clients fall back to get.
async fn range_stream(client: &mut Client, served: bool) -> Checked {
    let value = vec![b'x'; 1024];
    for first in (0..3000).step_by(100) {
        let puts: Vec<_> = (first..first + 100)
            .map(|i| etcd_client::TxnOp::put(format!("rust/s/{i:05}"), value.clone(), None))
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(puts))
            .await
            .map_err(failed("txn of 100 puts"))?;
    }
    let stream = client
        .kv_client()
        .get_stream("rust/s/", Some(GetOptions::new().with_prefix()))
        .await;
    let mut stream = match (stream, served) {
        (Ok(stream), true) => stream,
        (Err(etcd_client::Error::GRpcStatus(status)), false) => {
            return check(
                "get_stream: Unimplemented on a server without RangeStream",
                status.code() == tonic::Code::Unimplemented,
                status,
            );
        }
        (Err(error), true) => return Err(format!("get_stream: {error}")),
        (other, false) => return Err(format!("get_stream without --range-stream: {other:?}")),
    };
    let whole = client
        .get("rust/s/", Some(GetOptions::new().with_prefix()))
        .await
        .map_err(failed("get of 3,000 keys"))?;
    let (mut messages, mut keys, mut last_count) = (0, Vec::new(), 0);
    while let Some(piece) = stream
        .message()
        .await
        .map_err(failed("get_stream message"))?
    {
        messages += 1;
        keys.extend(piece.kvs().iter().map(|kv| kv.key().to_vec()));
        last_count = piece.count();
    }
    let whole_keys: Vec<_> = whole.kvs().iter().map(|kv| kv.key().to_vec()).collect();
    check(
        "get_stream of 3,000 keys: in several messages, the same keys as get, the count last",
        messages > 1 && keys == whole_keys && whole_keys.len() == 3000 && last_count == 3000,
        (messages, keys.len(), last_count),
    )
}

async fn locks_and_elections(client: &mut Client) -> Checked {
    let lease = client
        .lease_grant(30, None)
        .await
        .map_err(failed("lease grant"))?
        .id();
    let lock = client
        .lock("rust-lock", Some(LockOptions::new().with_lease(lease)))
        .await
        .map_err(failed("lock"))?;
    check(
        "lock returns its ownership key",
        lock.key().starts_with(b"rust-lock/"),
        lock.key(),
    )?;
    client.unlock(lock.key()).await.map_err(failed("unlock"))?;
    println!("ok: unlock");
    let campaign = client
        .campaign("rust-election", "v1", lease)
        .await
        .map_err(failed("campaign"))?;
    let leader = client
        .leader("rust-election")
        .await
        .map_err(failed("leader"))?;
    let value = leader.kv().map(|kv| kv.value().to_vec());
    check(
        "campaign, then leader",
        value.as_deref() == Some(b"v1"),
        value,
    )?;
    let key = campaign.leader().cloned();
    client
        .resign(Some(
            ResignOptions::new().with_leader(key.expect("a leader key")),
        ))
        .await
        .map_err(failed("resign"))?;
    println!("ok: resign");
    client
        .lease_revoke(lease)
        .await
        .map_err(failed("lease revoke"))?;
    Ok(())
}

async fn maintenance_and_cluster(client: &mut Client) -> Checked {
    let status = client.status().await.map_err(failed("status"))?;
    check(
        "status names a leader",
        status.leader() != 0,
        status.leader(),
    )?;
    let members = client.member_list().await.map_err(failed("member list"))?;
    check(
        "member list",
        members.members().len() == 1,
        members.members().len(),
    )?;
    let me = members.members()[0].id();
    client
        .move_leader(me)
        .await
        .map_err(failed("move-leader to the leader itself"))?;
    println!("ok: move-leader to the leader itself");
    let alarms = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .map_err(failed("alarm list"))?;
    check(
        "alarm list is empty",
        alarms.alarms().is_empty(),
        alarms.alarms().len(),
    )?;
    client.hash().await.map_err(failed("hash"))?;
    println!("ok: hash");
    let hash_kv = client.hash_kv(0).await.map_err(failed("hashkv"))?;
    check("hashkv", hash_kv.hash() != 0, hash_kv.hash())?;
    client.defragment().await.map_err(failed("defragment"))?;
    println!("ok: defragment");
    let mut stream = client.snapshot().await.map_err(failed("snapshot"))?;
    let mut bytes = 0;
    while let Some(part) = stream.message().await.map_err(failed("snapshot stream"))? {
        bytes += part.blob().len();
    }
    check("snapshot streams the backend", bytes > 0, bytes)
}

async fn auth(endpoint: &str, client: &mut Client) -> Checked {
    client
        .user_add("root", "rootpw", None)
        .await
        .map_err(failed("user add root"))?;
    client
        .user_grant_role("root", "root")
        .await
        .map_err(failed("grant root"))?;
    client
        .user_add("alice", "alicepw", None)
        .await
        .map_err(failed("user add alice"))?;
    client.role_add("app").await.map_err(failed("role add"))?;
    client
        .role_grant_permission("app", Permission::read_write("app/").with_prefix())
        .await
        .map_err(failed("role grant-permission"))?;
    client
        .user_grant_role("alice", "app")
        .await
        .map_err(failed("user grant-role"))?;
    let alice = client.user_get("alice").await.map_err(failed("user get"))?;
    check(
        "user get shows the role",
        alice.roles() == ["app"],
        alice.roles(),
    )?;
    let users = client.user_list().await.map_err(failed("user list"))?;
    check(
        "user list",
        users.users() == ["alice", "root"],
        users.users(),
    )?;
    let role = client.role_get("app").await.map_err(failed("role get"))?;
    check(
        "role get shows the permission",
        role.permissions().len() == 1,
        role.permissions(),
    )?;
    let roles = client.role_list().await.map_err(failed("role list"))?;
    check(
        "role list",
        roles.roles().contains(&"app".to_string()),
        roles.roles(),
    )?;
    client.auth_enable().await.map_err(failed("auth enable"))?;
    println!("ok: auth enable");

    let mut as_alice = connect(endpoint, Some(("alice", "alicepw"))).await?;
    as_alice
        .put("app/1", "x", None)
        .await
        .map_err(failed("a permitted put"))?;
    println!("ok: a permitted put, as alice");
    let denied = as_alice.put("etc/1", "x", None).await;
    check(
        "a put outside the permission is denied",
        matches!(&denied, Err(e) if e.to_string().contains("permission denied")),
        &denied,
    )?;
    let anonymous = client.put("app/2", "x", None).await;
    check(
        "a client without credentials is refused",
        matches!(&anonymous, Err(e) if e.to_string().contains("user name is empty")),
        &anonymous,
    )?;
    let wrong = connect(endpoint, Some(("alice", "nope"))).await;
    check(
        "a wrong password is refused",
        matches!(&wrong, Err(e) if e.contains("authentication failed")),
        wrong.err(),
    )?;

    let mut as_root = connect(endpoint, Some(("root", "rootpw"))).await?;
    as_root
        .role_revoke_permission(
            "app",
            "app/",
            Some(etcd_client::RoleRevokePermissionOptions::new().with_prefix()),
        )
        .await
        .map_err(failed("role revoke-permission"))?;
    println!("ok: role revoke-permission");
    as_root
        .user_change_password("alice", "new")
        .await
        .map_err(failed("passwd"))?;
    println!("ok: user passwd");
    as_root
        .user_revoke_role("alice", "app")
        .await
        .map_err(failed("user revoke-role"))?;
    println!("ok: user revoke-role");
    as_root
        .role_delete("app")
        .await
        .map_err(failed("role delete"))?;
    println!("ok: role delete");
    as_root
        .user_delete("alice")
        .await
        .map_err(failed("user delete"))?;
    println!("ok: user delete");
    as_root
        .auth_disable()
        .await
        .map_err(failed("auth disable"))?;
    println!("ok: auth disable");
    client
        .put("app/3", "x", None)
        .await
        .map_err(failed("a put after auth disable"))?;
    println!("ok: anyone writes again");
    Ok(())
}

async fn run(endpoint: &str, range_stream_served: bool) -> Checked {
    let mut client = connect(endpoint, None).await?;
    kv_and_leases(&mut client).await?;
    range_stream(&mut client, range_stream_served).await?;
    locks_and_elections(&mut client).await?;
    maintenance_and_cluster(&mut client).await?;
    auth(endpoint, &mut client).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoint, range_stream_served) = match args.as_slice() {
        [endpoint] => (endpoint, false),
        [endpoint, flag] if flag == "--range-stream" => (endpoint, true),
        _ => {
            eprintln!("usage: rust-etcd-client-interop <endpoint> [--range-stream]");
            return ExitCode::from(2);
        }
    };
    match tokio::time::timeout(Duration::from_secs(120), run(endpoint, range_stream_served)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(reason)) => {
            println!("FAIL: {reason}");
            ExitCode::FAILURE
        }
        Err(_) => {
            println!("FAIL: the checks did not finish within 120 s");
            ExitCode::FAILURE
        }
    }
}
