//! A lock service with fencing tokens: a state machine of its own, with its own snapshot
//! format, behind the runtime's client sessions (so a retried request never takes a lock
//! twice), on three members in one process with write-ahead logs in a temporary directory.
//!
//! A lock is granted with a fencing token, the index of the entry that granted it: tokens
//! only grow, so a storage service that remembers the highest token it has seen refuses a
//! holder whose lock has since passed to someone else (Kleppmann's fencing).
//!
//! `cargo run -p flotilla-runtime --example lock_service` walks through it and checks each step.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_runtime::{
    Config, Entry, EntryPayload, Index, LocalNetwork, Membership, NoMetrics, NodeHandle, NodeId,
    NodeOptions, NodeParts, RememberedOutput, RunningNode, SessionClient, SessionReply, Sessions,
    StateMachine, open_wal,
};

const SNAPSHOT_MAGIC: &[u8; 8] = b"LOCKS001";
const VOTERS: [NodeId; 3] = [1, 2, 3];
const CLUSTER_ID: u64 = 0x10c5;
const DEADLINE: Duration = Duration::from_secs(10);

/// Who holds a lock, since which entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    owner: String,
    token: Index,
}

/// The locks. The table sits behind an `Arc`: a snapshot keeps a clone of it, and the first
/// change after that copies the table (`Arc::make_mut`), so the snapshot walks the table as
/// it was, in steps, while commands apply.
#[derive(Debug, Default)]
struct Locks {
    applied: Index,
    held: Arc<BTreeMap<String, Holder>>,
}

/// What a lock command did.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Granted { token: Index },
    Busy { holder: String },
    Released,
    NotHeld,
    Malformed,
    Other,
}

impl RememberedOutput for Outcome {
    fn encode(&self, out: &mut Vec<u8>) {
        let text = match self {
            Outcome::Granted { token } => format!("granted {token}"),
            Outcome::Busy { holder } => format!("busy {holder}"),
            other => format!("{other:?}"),
        };
        out.extend_from_slice(text.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<Outcome, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        Ok(match text.split_once(' ') {
            Some(("granted", token)) => Outcome::Granted {
                token: token.parse().map_err(|_| format!("bad token {token:?}"))?,
            },
            Some(("busy", holder)) => Outcome::Busy {
                holder: holder.into(),
            },
            _ => match text {
                "Released" => Outcome::Released,
                "NotHeld" => Outcome::NotHeld,
                "Malformed" => Outcome::Malformed,
                "Other" => Outcome::Other,
                _ => return Err(format!("not a lock outcome: {text:?}")),
            },
        })
    }
}

impl Locks {
    /// `acquire <lock> <owner>` or `release <lock> <owner>`.
    fn command(&mut self, index: Index, command: &[u8]) -> Outcome {
        let text = String::from_utf8_lossy(command);
        let words: Vec<&str> = text.split(' ').collect();
        let held = Arc::make_mut(&mut self.held);
        match words[..] {
            ["acquire", lock, owner] => match held.get(lock) {
                Some(holder) if holder.owner != owner => Outcome::Busy {
                    holder: holder.owner.clone(),
                },
                Some(holder) => Outcome::Granted {
                    token: holder.token,
                },
                None => {
                    let holder = Holder {
                        owner: owner.into(),
                        token: index,
                    };
                    held.insert(lock.into(), holder);
                    Outcome::Granted { token: index }
                }
            },
            ["release", lock, owner] if held.get(lock).is_some_and(|h| h.owner == owner) => {
                held.remove(lock);
                Outcome::Released
            }
            ["release", _, _] => Outcome::NotHeld,
            _ => Outcome::Malformed,
        }
    }
}

/// A snapshot in progress: the table as it was, and the next lock to write.
#[derive(Debug)]
struct LocksCursor {
    table: Arc<BTreeMap<String, Holder>>,
    next: Option<String>,
    header: Option<Vec<u8>>,
}

/// The snapshot format: the magic bytes, the applied index (u64 LE), then per lock its name,
/// its owner (each a u32 LE length and UTF-8) and its token (u64 LE).
impl StateMachine for Locks {
    type Output = Outcome;
    type SnapshotCursor = LocksCursor;

    fn applied_index(&self) -> Index {
        self.applied
    }

    fn apply(&mut self, entry: &Entry) -> Outcome {
        self.applied = entry.index;
        match &entry.payload {
            EntryPayload::Command(command) => self.command(entry.index, command),
            _ => Outcome::Other,
        }
    }

    fn begin_snapshot(&mut self) -> LocksCursor {
        let header = [&SNAPSHOT_MAGIC[..], &self.applied.to_le_bytes()].concat();
        LocksCursor {
            table: self.held.clone(),
            next: self.held.keys().next().cloned(),
            header: Some(header),
        }
    }

    fn continue_snapshot(
        &self,
        cursor: &mut LocksCursor,
        out: &mut Vec<u8>,
        bytes_max: usize,
    ) -> io::Result<bool> {
        out.extend(cursor.header.take().unwrap_or_default());
        let Some(next) = cursor.next.take() else {
            return Ok(true);
        };
        let mut locks = cursor.table.range(next..);
        for (lock, holder) in locks.by_ref() {
            for text in [lock, &holder.owner] {
                out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            out.extend_from_slice(&holder.token.to_le_bytes());
            if out.len() >= bytes_max {
                break;
            }
        }
        cursor.next = locks.next().map(|(lock, _)| lock.clone());
        Ok(cursor.next.is_none())
    }

    fn end_snapshot(&mut self, _cursor: LocksCursor) {}

    fn empty(&self) -> Locks {
        Locks::default()
    }

    fn restore(&mut self, snapshot: &mut dyn Read) -> Result<(), String> {
        let mut bytes = Vec::new();
        snapshot
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        let rest = bytes
            .strip_prefix(SNAPSHOT_MAGIC)
            .ok_or("not a lock service snapshot")?;
        let mut reader = SnapshotReader(rest);
        self.applied = reader.u64()?;
        let held = Arc::make_mut(&mut self.held);
        while !reader.0.is_empty() {
            let lock = reader.text()?;
            let owner = reader.text()?;
            let token = reader.u64()?;
            held.insert(lock, Holder { owner, token });
        }
        Ok(())
    }
}

/// Reads the fields of a snapshot; each error says what was wrong.
struct SnapshotReader<'a>(&'a [u8]);

impl SnapshotReader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or("the snapshot ends early")?;
        self.0 = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn text(&mut self) -> Result<String, String> {
        let length = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        let text = self.take(length as usize)?;
        String::from_utf8(text.to_vec()).map_err(|_| "a name is not UTF-8".into())
    }
}

type Service = Sessions<Locks>;
type Handle = NodeHandle<Service, NoMetrics>;

struct Member {
    running: RunningNode<Service, NoMetrics>,
    stop: tokio::sync::watch::Sender<bool>,
}

fn start(network: &LocalNetwork, id: NodeId, dir: &std::path::Path) -> Result<Member, String> {
    let voters = Membership::with_voters(VOTERS);
    let storage =
        open_wal(&dir.join(id.to_string()), CLUSTER_ID, id, voters).map_err(|e| e.to_string())?;
    let joined = network.join(id);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = flotilla_runtime::start(NodeParts {
        options: NodeOptions::new(Config::new(id)),
        storage,
        state: Arc::new(RwLock::new(Sessions::new(Locks::default(), 1_000))),
        transport: joined.transport,
        inbox: joined.inbox,
        transport_events: joined.events,
        metrics: Arc::new(NoMetrics),
        shutdown,
    })
    .map_err(|e| e.to_string())?;
    Ok(Member { running, stop })
}

/// Proposes through whichever member leads now.
async fn propose(
    members: &BTreeMap<NodeId, Member>,
    command: Bytes,
) -> Result<SessionReply<Outcome>, String> {
    let deadline = Instant::now() + DEADLINE;
    let any = members.values().next().ok_or("no member")?;
    let status = any
        .running
        .handle
        .wait_for(deadline, |s| {
            s.leader.is_some_and(|l| members.contains_key(&l))
        })
        .await
        .ok_or("no leader in time")?;
    let leader: &Handle = &members[&status.leader.expect("waited for it")]
        .running
        .handle;
    leader
        .propose(command, deadline)
        .await
        .map_err(|e| e.to_string())
}

fn check(what: &str, ok: bool) -> Result<(), String> {
    println!("{} {what}", if ok { "ok  " } else { "FAIL" });
    ok.then_some(()).ok_or(format!("failed: {what}"))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("flotilla-locks-{}", std::process::id()));
    let result = walk_through(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn walk_through(dir: &std::path::Path) -> Result<(), String> {
    let network = LocalNetwork::new();
    let mut members = BTreeMap::new();
    for id in VOTERS {
        members.insert(id, start(&network, id, dir)?);
    }
    let mut clients = Vec::new();
    for _ in 0..2 {
        match propose(&members, SessionClient::register()).await? {
            SessionReply::Registered { client_id } => clients.push(SessionClient::new(client_id)),
            other => return Err(format!("registration answered {other:?}")),
        }
    }
    let (mut alice, mut bob) = (clients.remove(0), clients.remove(0));

    let take_db = alice.next(b"acquire db alice");
    let first = propose(&members, take_db.clone()).await?;
    let SessionReply::Applied(Outcome::Granted { token: first_token }) = first else {
        return Err(format!("alice's acquire answered {first:?}"));
    };
    check(&format!("alice holds db with token {first_token}"), true)?;
    let busy = propose(&members, bob.next(b"acquire db bob")).await?;
    check(
        "bob is told alice holds db",
        busy == SessionReply::Applied(Outcome::Busy {
            holder: "alice".into(),
        }),
    )?;
    let again = propose(&members, take_db).await?;
    check(
        "alice's acquire, sent again, gets the same token and takes nothing more",
        again == SessionReply::Repeated(Outcome::Granted { token: first_token }),
    )?;
    propose(&members, alice.next(b"release db alice")).await?;

    // The leader is cut off; the other two elect a new one and hand the lock on.
    let leader = members[&1].running.handle.leader().ok_or("no leader")?;
    network.isolate(leader);
    let cut_off = members.remove(&leader).expect("a member");
    let second = propose(&members, bob.next(b"acquire db bob")).await?;
    let SessionReply::Applied(Outcome::Granted {
        token: second_token,
    }) = second
    else {
        return Err(format!("bob's acquire answered {second:?}"));
    };
    check(
        &format!(
            "with member {leader} cut off, bob holds db with token {second_token} > {first_token}"
        ),
        second_token > first_token,
    )?;
    network.heal();
    members.insert(leader, cut_off);

    // A member restarts from a snapshot in the lock service's own format, then its log.
    let restarted = VOTERS
        .into_iter()
        .find(|&id| id != leader)
        .expect("a voter");
    let handle = members[&restarted].running.handle.clone();
    handle.save_snapshot().await.map_err(|e| e.to_string())?;
    let saved = handle
        .wait_for(Instant::now() + DEADLINE, |s| s.snapshot_index > 0)
        .await;
    check("a snapshot is saved", saved.is_some())?;
    let member = members.remove(&restarted).expect("a member");
    let _ = member.stop.send(true);
    member.running.join().await?;
    members.insert(restarted, start(&network, restarted, dir)?);
    // It starts with an empty state and a log that begins with the snapshot: the runtime
    // restores the snapshot (in the format above) before applying the rest.
    let snapshot_index = members[&restarted].running.handle.status().snapshot_index;
    check(
        &format!("member {restarted} restarts from its snapshot at index {snapshot_index}"),
        snapshot_index > 0,
    )?;
    let bob_again = propose(&members, bob.next(b"acquire db bob")).await?;
    check(
        "bob still holds db",
        bob_again
            == SessionReply::Applied(Outcome::Granted {
                token: second_token,
            }),
    )?;
    let handle = &members[&restarted].running.handle;
    handle
        .read_index(Instant::now() + DEADLINE)
        .await
        .map_err(|e| e.to_string())?;
    let holder = handle.state.read().unwrap().inner().held.get("db").cloned();
    check(
        &format!("member {restarted}, restarted from its snapshot, agrees: {holder:?}"),
        holder
            == Some(Holder {
                owner: "bob".into(),
                token: second_token,
            }),
    )?;

    for member in members.into_values() {
        let _ = member.stop.send(true);
        member.running.join().await?;
    }
    Ok(())
}
