//! Where members live on the network, and packet-level partitions between them.
//!
//! - **Namespaces** (the default; needs root, `ip` and `nft`): each member runs in a network
//!   namespace of its own (`flotilla-chaos-<run>-m<i>`, where the run id is the harness's
//!   pid and a letter), with one veth link to a bridge (`fchaos<run>`) in the harness's
//!   namespace, on a private /24 chosen free. Members
//!   reach each other through the bridge and the harness reaches every member directly, so
//!   a partition between members never cuts the clients off. Partitions are nftables rules
//!   in a table of this run (`bridge flotilla_chaos_<run>`): a set of (source, destination)
//!   address pairs whose packets the bridge drops, so every shape, one-way included, is one
//!   atomic set update.
//! - **Loopback**: each member on its own 127.x.y.z address; no partitions (senders on
//!   loopback are indistinguishable: every connection leaves from 127.0.0.1).
//!
//! Everything created is removed on drop (panic and Ctrl-C included), and leftovers of runs
//! whose process is gone are swept at start.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Prefix of everything this harness names (namespaces, tables); the pid follows.
const NAMESPACE_PREFIX: &str = "flotilla-chaos-";
const TABLE_PREFIX: &str = "flotilla_chaos_";
const BRIDGE_PREFIX: &str = "fchaos";
/// Member subnets are 10.213.<n>.0/24, n chosen free on this machine.
const SUBNET_BASE: [u8; 2] = [10, 213];
/// Member i has host number `FIRST_MEMBER_HOST + i`; the bridge is `.1`.
const FIRST_MEMBER_HOST: u8 = 11;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkKind {
    /// A network namespace per member, partitions with nftables (root).
    Namespaces,
    /// 127.x.y.z addresses on the loopback interface; no partitions.
    Loopback,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },
    #[error("no free 10.213.x.0/24 subnet for the members")]
    NoFreeSubnet,
    #[error(
        "partitions need the namespaces network (root, `ip` and `nft`); this run uses loopback"
    )]
    PartitionsUnsupported,
}

/// Packets from the first member to the second are dropped.
pub type Link = (usize, usize);

/// The members' network, owned by the cluster. Dropping it removes what it created.
#[derive(Debug)]
pub struct Network {
    kind: NetworkKind,
    addresses: Vec<Ipv4Addr>,
    namespaces: Vec<String>,
    bridge: Option<String>,
    table: Option<String>,
    blocked: BTreeSet<Link>,
}

/// Runs a command; its failure is an error naming it.
fn run(program: &str, args: &[&str]) -> Result<String, NetworkError> {
    run_with_input(program, args, None)
}

fn run_with_input(
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, NetworkError> {
    use std::io::Write;
    let command_line = format!("{program} {}", args.join(" "));
    let failed = |reason: String| NetworkError::Command {
        command: command_line.clone(),
        reason,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| failed(error.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|error| failed(error.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| failed(error.to_string()))?;
    if !output.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Network {
    /// Sets up addresses for `members` members (and namespaces, bridge and nft table in
    /// namespaces mode).
    pub fn create(kind: NetworkKind, members: usize) -> Result<Network, NetworkError> {
        let pid = std::process::id();
        match kind {
            NetworkKind::Loopback => {
                // 127.<pid-derived>.<pid-derived>.<member>: private to this run.
                let [_, _, high, low] = (pid % 65_000 + 1).to_be_bytes();
                let addresses = (0..members)
                    .map(|index| Ipv4Addr::new(127, high, low, FIRST_MEMBER_HOST + index as u8))
                    .collect();
                Ok(Network {
                    kind,
                    addresses,
                    namespaces: Vec::new(),
                    bridge: None,
                    table: None,
                    blocked: BTreeSet::new(),
                })
            }
            NetworkKind::Namespaces => Network::create_namespaces(pid, members),
        }
    }

    fn create_namespaces(pid: u32, members: usize) -> Result<Network, NetworkError> {
        // One network at a time per process, so two never pick the same subnet; each gets a
        // letter of its own after the pid (the names must fit in 15 bytes).
        static CREATING: std::sync::Mutex<u8> = std::sync::Mutex::new(0);
        let mut created = CREATING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let letter = char::from(b'a' + *created % 26);
        *created = created.wrapping_add(1);
        let run_id = format!("{pid}{letter}");
        let subnet = free_subnet(pid)?;
        let mut network = Network {
            kind: NetworkKind::Namespaces,
            addresses: Vec::new(),
            namespaces: Vec::new(),
            bridge: None,
            table: None,
            blocked: BTreeSet::new(),
        };
        // Each step is recorded before the next, so a failure half-way is cleaned up by drop.
        let bridge = format!("{BRIDGE_PREFIX}{run_id}");
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        network.bridge = Some(bridge.clone());
        let bridge_address = format!(
            "{}/24",
            Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], subnet, 1)
        );
        run("ip", &["addr", "add", &bridge_address, "dev", &bridge])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for index in 0..members {
            let namespace = format!("{NAMESPACE_PREFIX}{run_id}-m{index}");
            run("ip", &["netns", "add", &namespace])?;
            network.namespaces.push(namespace.clone());
            let host_end = format!("fc{run_id}h{index}");
            let member_end = format!("fc{run_id}n{index}");
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &host_end,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &member_end,
                    "netns",
                    &namespace,
                ],
            )?;
            run("ip", &["link", "set", &host_end, "master", &bridge, "up"])?;
            let address = Ipv4Addr::new(
                SUBNET_BASE[0],
                SUBNET_BASE[1],
                subnet,
                FIRST_MEMBER_HOST + index as u8,
            );
            let with_prefix = format!("{address}/24");
            run(
                "ip",
                &[
                    "-n",
                    &namespace,
                    "addr",
                    "add",
                    &with_prefix,
                    "dev",
                    &member_end,
                ],
            )?;
            run("ip", &["-n", &namespace, "link", "set", &member_end, "up"])?;
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"])?;
            network.addresses.push(address);
        }
        let table = format!("{TABLE_PREFIX}{run_id}");
        let definition = format!(
            "table bridge {table} {{\n\
             \tset blocked {{ type ipv4_addr . ipv4_addr; }}\n\
             \tchain forward {{ type filter hook forward priority 0; policy accept; \
             ip saddr . ip daddr @blocked counter drop; }}\n\
             }}\n"
        );
        run_with_input("nft", &["-f", "-"], Some(&definition))?;
        network.table = Some(table);
        Ok(network)
    }

    pub fn kind(&self) -> NetworkKind {
        self.kind
    }

    /// The nftables table holding this network's partition rules (namespaces only).
    pub fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// The members' namespaces (namespaces only).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn address(&self, member: usize) -> Ipv4Addr {
        self.addresses[member]
    }

    /// What to put before a member's command line so it runs in its place.
    pub fn command_prefix(&self, member: usize) -> Vec<String> {
        match self.namespaces.get(member) {
            Some(namespace) => vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                namespace.clone(),
            ],
            None => Vec::new(),
        }
    }

    pub fn supports_partitions(&self) -> bool {
        self.table.is_some()
    }

    /// The links currently cut.
    pub fn blocked(&self) -> &BTreeSet<Link> {
        &self.blocked
    }

    /// Replaces the cut links with `blocked` in one nftables transaction.
    pub fn set_blocked(&mut self, blocked: BTreeSet<Link>) -> Result<(), NetworkError> {
        let Some(table) = &self.table else {
            if blocked.is_empty() {
                return Ok(());
            }
            return Err(NetworkError::PartitionsUnsupported);
        };
        let mut script = format!("flush set bridge {table} blocked\n");
        if !blocked.is_empty() {
            let elements: Vec<String> = blocked
                .iter()
                .map(|&(from, to)| format!("{} . {}", self.addresses[from], self.addresses[to]))
                .collect();
            script.push_str(&format!(
                "add element bridge {table} blocked {{ {} }}\n",
                elements.join(", ")
            ));
        }
        run_with_input("nft", &["-f", "-"], Some(&script))?;
        self.blocked = blocked;
        Ok(())
    }

    pub fn heal(&mut self) -> Result<(), NetworkError> {
        if self.blocked.is_empty() {
            return Ok(());
        }
        self.set_blocked(BTreeSet::new())
    }

    /// Removes everything this network created; errors are reported, not fatal.
    pub fn tear_down(&mut self) -> Vec<NetworkError> {
        let mut errors = Vec::new();
        if let Some(table) = self.table.take() {
            errors.extend(run("nft", &["delete", "table", "bridge", &table]).err());
        }
        for namespace in std::mem::take(&mut self.namespaces) {
            kill_processes_in(&namespace);
            errors.extend(run("ip", &["netns", "delete", &namespace]).err());
        }
        if let Some(bridge) = self.bridge.take() {
            errors.extend(run("ip", &["link", "delete", &bridge]).err());
        }
        errors
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for error in self.tear_down() {
            eprintln!("flotilla chaos: cleaning up the network: {error}");
        }
    }
}

/// SIGKILLs, by PID, whatever still runs in one of this harness's namespaces (members of a
/// run that died without cleaning up).
fn kill_processes_in(namespace: &str) {
    let Ok(pids) = run("ip", &["netns", "pids", namespace]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
    {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A subnet number n such that 10.213.n.0/24 appears in no address or route here.
fn free_subnet(pid: u32) -> Result<u8, NetworkError> {
    let addresses = run("ip", &["-4", "-o", "addr", "show"])?;
    let routes = run("ip", &["-4", "route", "show", "table", "all"])?;
    let start = (pid % 250) as u8;
    (0..250u8)
        .map(|offset| (start.wrapping_add(offset)) % 250 + 2)
        .find(|subnet| {
            let prefix = format!("{}.{}.{subnet}.", SUBNET_BASE[0], SUBNET_BASE[1]);
            !addresses.contains(&prefix) && !routes.contains(&prefix)
        })
        .ok_or(NetworkError::NoFreeSubnet)
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a name made by this harness, if the name is one of ours.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Removes namespaces, bridges and nft tables left by runs whose process is gone (killed
/// with SIGKILL, say). Returns what it removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let is_stale = |name: &str, prefix: &str| {
        owner_pid(name, prefix).is_some_and(|pid| pid != std::process::id() && !process_alive(pid))
    };
    if let Ok(tables) = run("nft", &["list", "tables", "bridge"]) {
        for table in tables
            .split_whitespace()
            .filter(|word| is_stale(word, TABLE_PREFIX))
        {
            if run("nft", &["delete", "table", "bridge", table]).is_ok() {
                removed.push(format!("nft table {table}"));
            }
        }
    }
    if let Ok(namespaces) = run("ip", &["netns", "list"]) {
        for line in namespaces.lines() {
            let namespace = line.split_whitespace().next().unwrap_or_default();
            if is_stale(namespace, NAMESPACE_PREFIX) {
                kill_processes_in(namespace);
                if run("ip", &["netns", "delete", namespace]).is_ok() {
                    removed.push(format!("namespace {namespace}"));
                }
            }
        }
    }
    if let Ok(links) = run("ip", &["-o", "link", "show", "type", "bridge"]) {
        for line in links.lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            if is_stale(name, BRIDGE_PREFIX) && run("ip", &["link", "delete", name]).is_ok() {
                removed.push(format!("bridge {name}"));
            }
        }
    }
    removed
}

/// True when this process can create namespaces and nft tables (root with `ip` and `nft`).
pub fn namespaces_available() -> bool {
    rustix::process::geteuid().is_root()
        && run("ip", &["-V"]).is_ok()
        && run("nft", &["-v"]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids_are_parsed_from_our_names_only() {
        assert_eq!(
            owner_pid("flotilla-chaos-1234-m0", NAMESPACE_PREFIX),
            Some(1234)
        );
        assert_eq!(owner_pid("flotilla_chaos_77", TABLE_PREFIX), Some(77));
        assert_eq!(owner_pid("fchaos99", BRIDGE_PREFIX), Some(99));
        assert_eq!(owner_pid("fchaos99b", BRIDGE_PREFIX), Some(99));
        assert_eq!(owner_pid("docker0", BRIDGE_PREFIX), None);
        assert_eq!(owner_pid("fchaosx", BRIDGE_PREFIX), None);
    }

    #[test]
    fn loopback_addresses_are_distinct_and_partitions_are_refused() {
        let mut network = Network::create(NetworkKind::Loopback, 5).unwrap();
        let addresses: BTreeSet<Ipv4Addr> = (0..5).map(|member| network.address(member)).collect();
        assert_eq!(addresses.len(), 5);
        assert!(addresses.iter().all(Ipv4Addr::is_loopback));
        assert!(network.command_prefix(0).is_empty());
        assert!(matches!(
            network.set_blocked([(0, 1)].into()),
            Err(NetworkError::PartitionsUnsupported)
        ));
        assert!(network.heal().is_ok());
    }
}
