//! The demonstration of `replicated_hash_map`: three member processes on loopback, writes
//! through them, the leader killed with SIGKILL, writes through the two others, and a check
//! that every acknowledged write is readable from both. Exits with an error if not.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const MEMBERS: u64 = 3;
const KEYS_PER_PHASE: u64 = 100;
/// How long one write may take to find the leader, an election included.
const WRITE_DEADLINE: Duration = Duration::from_secs(15);

/// The member processes; each is killed (and waited for) when this is dropped.
struct Members {
    children: Vec<(u64, Child)>,
    data_dir: PathBuf,
}

impl Drop for Members {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl Members {
    fn start(
        &mut self,
        exe: &std::path::Path,
        id: u64,
        peers: &[SocketAddr],
        clients: &[SocketAddr],
    ) -> Result<(), String> {
        let child = Command::new(exe)
            .args(["member", "--id", &id.to_string()])
            .args(["--peers", &list(peers), "--clients", &list(clients)])
            .arg("--data-dir")
            .arg(self.data_dir.join(id.to_string()))
            .spawn()
            .map_err(|e| format!("cannot start member {id}: {e}"))?;
        self.children.push((id, child));
        Ok(())
    }

    fn kill(&mut self, id: u64) {
        let position = self.children.iter().position(|(i, _)| *i == id);
        let (_, mut child) = self.children.remove(position.expect("a running member"));
        child.kill().expect("SIGKILL the member");
        let _ = child.wait();
    }
}

/// Addresses on 127.0.0.1 that were free a moment ago (the OS picked them).
fn free_addresses(count: u64) -> Result<Vec<SocketAddr>, String> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| e.to_string()))
        .collect()
}

fn list(addresses: &[SocketAddr]) -> String {
    let pairs: Vec<String> = addresses
        .iter()
        .zip(1..)
        .map(|(address, id)| format!("{id}={address}"))
        .collect();
    pairs.join(",")
}

/// Sends one line to a member and returns its answer.
fn request(address: SocketAddr, line: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))
        .map_err(|e| format!("{address}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("{address}: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("{address}: {e}"))?;
    Ok(answer.trim_end().to_string())
}

/// Writes through any of `members`, following redirects, retrying while there is no leader
/// or a member does not answer (it may be the one just killed), until the deadline.
fn write(members: &[SocketAddr], line: &str) -> Result<String, String> {
    let deadline = Instant::now() + WRITE_DEADLINE;
    let mut target = members[0];
    let mut next = 0;
    loop {
        let answer = request(target, line);
        match &answer {
            Ok(ok) if ok.starts_with("ok") => return answer,
            Ok(redirect) if redirect.starts_with("redirect ") => {
                target = redirect["redirect ".len()..]
                    .parse()
                    .map_err(|e| format!("a bad redirect {redirect:?}: {e}"))?;
                continue;
            }
            Ok(retry) if retry.starts_with("retry") => {}
            Ok(other) => return Err(format!("{line:?} answered {other:?}")),
            Err(_) => {} // not listening (yet, or any more)
        }
        if Instant::now() > deadline {
            return Err(format!("{line:?} not acknowledged in time: {answer:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
        next = (next + 1) % members.len();
        target = members[next];
    }
}

pub fn run() -> Result<(), String> {
    let peers = free_addresses(MEMBERS)?;
    let clients = free_addresses(MEMBERS)?;
    let data_dir = std::env::temp_dir().join(format!("flotilla-hash-map-{}", std::process::id()));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut members = Members {
        children: Vec::new(),
        data_dir: data_dir.clone(),
    };
    for id in 1..=MEMBERS {
        members.start(&exe, id, &peers, &clients)?;
        println!(
            "started member {id}: raft {}, clients {}",
            peers[id as usize - 1],
            clients[id as usize - 1]
        );
    }

    let started = Instant::now();
    for i in 0..KEYS_PER_PHASE {
        write(&clients, &format!("put key{i} value{i}"))?;
    }
    println!(
        "{KEYS_PER_PHASE} writes acknowledged in {:?}",
        started.elapsed()
    );

    let status = request(clients[0], "status")?;
    let leader: u64 = status
        .split_whitespace()
        .skip_while(|word| *word != "leader")
        .nth(1)
        .and_then(|id| id.parse().ok())
        .ok_or(format!("no leader in {status:?}"))?;
    members.kill(leader);
    let killed = Instant::now();
    println!("killed the leader, member {leader}, with SIGKILL");

    let survivors: Vec<SocketAddr> = (1..=MEMBERS)
        .filter(|&id| id != leader)
        .map(|id| clients[id as usize - 1])
        .collect();
    write(&survivors, "put after-kill first")?;
    println!(
        "first write after the kill acknowledged {:?} after it",
        killed.elapsed()
    );
    for i in KEYS_PER_PHASE..2 * KEYS_PER_PHASE {
        write(&survivors, &format!("put key{i} value{i}"))?;
    }
    println!("{KEYS_PER_PHASE} more writes acknowledged by the two survivors");

    for &member in &survivors {
        for i in 0..2 * KEYS_PER_PHASE {
            let answer = request(member, &format!("get key{i}"))?;
            if answer != format!("value value{i}") {
                return Err(format!("{member} answered {answer:?} for key{i}"));
            }
        }
    }
    println!(
        "both survivors read all {} writes, linearizably: nothing was lost",
        2 * KEYS_PER_PHASE
    );

    // The killed member comes back from its own write-ahead log and catches up on what it
    // missed; a linearizable read on it waits until it has.
    members.start(&exe, leader, &peers, &clients)?;
    let restarted = clients[leader as usize - 1];
    let deadline = Instant::now() + WRITE_DEADLINE;
    let last = format!("get key{}", 2 * KEYS_PER_PHASE - 1);
    loop {
        match request(restarted, &last) {
            Ok(answer) if answer == format!("value value{}", 2 * KEYS_PER_PHASE - 1) => break,
            answer if Instant::now() > deadline => {
                return Err(format!("the restarted member answered {answer:?}"));
            }
            _ => std::thread::sleep(Duration::from_millis(50)), // still starting
        }
    }
    for i in 0..2 * KEYS_PER_PHASE {
        let answer = request(restarted, &format!("get key{i}"))?;
        if answer != format!("value value{i}") {
            return Err(format!(
                "the restarted member answered {answer:?} for key{i}"
            ));
        }
    }
    println!("member {leader}, restarted from its log, caught up and reads all of them too");
    Ok(())
}
