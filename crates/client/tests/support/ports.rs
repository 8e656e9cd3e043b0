//! Loopback ports for etcd test clusters, whose members must know each other's ports before
//! any of them starts (a static `--initial-cluster`), shared by every test process on the
//! machine. (Flotilla's own test members are handed sockets the harness bound on port 0 and
//! keeps reserved: see `crates/flotilla/tests/common/sockets.rs`. etcd cannot take a socket
//! from its parent, so its ports are drawn here.)
//!
//! Binding port 0 and releasing the port is not enough: the port comes from the kernel's
//! ephemeral range, which is also where every outgoing connection of every other process gets
//! its local port, so between the release and the server's bind another test's client socket
//! can take it ("Address already in use"). Ports here come from below the ephemeral range,
//! which the kernel never hands out by itself, and a test process owns a port while it holds
//! an exclusive lock on that port's file; the lock is released by the kernel when the process
//! exits, however it exits, so nothing leaks. Ports are held for the rest of the process
//! (one test under nextest) because members restart on the ports they were given.

use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Mutex;

/// The lowest port handed out: above the well-known and commonly configured ports.
const PORT_FIRST: u16 = 20_000;

/// Locks on every port this process owns, held until it exits.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// `count` distinct loopback ports that no other test process owns and nothing listens on.
pub fn reserve_ports(count: usize) -> Vec<u16> {
    let end = ephemeral_range_start();
    assert!(
        end > PORT_FIRST + 1_000,
        "the ephemeral port range starts at {end}, leaving no room for test ports \
         from {PORT_FIRST}"
    );
    let span = u32::from(end - PORT_FIRST);
    let directory = lock_directory();
    // Start at a random place so that concurrent processes rarely contend for a lock.
    let start = (RandomState::new().hash_one(std::process::id()) % u64::from(span)) as u32;
    let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut ports = Vec::with_capacity(count);
    for offset in 0..span {
        if ports.len() == count {
            break;
        }
        let port = PORT_FIRST + ((start + offset) % span) as u16;
        let Some(lock) = try_own(&directory, port) else {
            continue;
        };
        // Something outside the tests (an etcd started by hand, say) may listen here.
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        held.push(lock);
        ports.push(port);
    }
    assert_eq!(
        ports.len(),
        count,
        "no {count} free test ports in {PORT_FIRST}..{end}"
    );
    ports
}

/// The lock on `port`'s file, unless another process holds it.
fn try_own(directory: &std::path::Path, port: u16) -> Option<File> {
    let path = directory.join(format!("{port}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|error| panic!("open the port lock {}: {error}", path.display()));
    file.try_lock().ok().map(|()| file)
}

fn lock_directory() -> PathBuf {
    let directory = std::env::temp_dir().join("flotilla-test-ports");
    std::fs::create_dir_all(&directory)
        .unwrap_or_else(|error| panic!("create {}: {error}", directory.display()));
    directory
}

/// Where the kernel's ephemeral ports begin (Linux's default is 32768).
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
