//! The nemesis: faults on a schedule, one at a time, each healed before the next.
//!
//! A cycle is a quiet spell (2–4 s), a fault, a hold (4–8 s) while the fault lasts, and its
//! heal. Victims are the leader half of the time (the interesting case for kills, pauses and
//! partitions) and a random member otherwise. Every action goes to the run's timeline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, MemberState};
use crate::network::Link;
use crate::rng::Rng;

const QUIET_MS: (u64, u64) = (2_000, 4_000);
const HOLD_MS: (u64, u64) = (4_000, 8_000);
/// A restarted or re-added member must answer within this.
const SERVING_TIMEOUT: Duration = Duration::from_secs(30);
/// A member removed from the cluster stops by itself within this, or is killed.
const REMOVED_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Member add is retried (it may find no leader right after a removal) until this passes.
const READD_TIMEOUT: Duration = Duration::from_secs(30);
/// During a rolling restart, the cluster must be healthy again before the next member goes.
const ROLLING_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long each member stays down during a rolling restart (as for an upgrade).
const ROLLING_DOWNTIME_MS: (u64, u64) = (500, 2_000);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum NemesisKind {
    /// kill -9 of the leader or a random member, then restart.
    Kill,
    /// SIGSTOP of the leader or a random member, then SIGCONT.
    Pause,
    /// Packet-level partitions: isolate the leader, majority/minority halves, a bridge
    /// member, one-way.
    Partition,
    /// Leadership transfer (MoveLeader) to a random follower.
    Transfer,
    /// Member remove, then re-add with a new data directory.
    Membership,
    /// Graceful restart of every member in turn.
    Rolling,
    /// A random fault of any kind each cycle.
    Mixed,
    /// No faults (a baseline).
    #[value(hide = true)]
    None,
}

/// Partition shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    IsolateLeader,
    /// A minority (⌊n/2⌋ members) cut from the majority.
    Halves,
    /// Two sides that cannot talk, and one member that talks to both.
    Bridge,
    /// The leader's packets to the others dropped, or theirs to it.
    OneWayOut,
    OneWayIn,
}

const SHAPES: [Shape; 5] = [
    Shape::IsolateLeader,
    Shape::Halves,
    Shape::Bridge,
    Shape::OneWayOut,
    Shape::OneWayIn,
];

/// The links a shape cuts. `order` is a random order of the members; `focus` (the leader,
/// or a random member) is the member the leader-centred shapes act on.
pub fn partition_links(shape: Shape, order: &[usize], focus: usize) -> BTreeSet<Link> {
    let both_ways = |left: &[usize], right: &[usize]| -> BTreeSet<Link> {
        let mut links = BTreeSet::new();
        for &a in left {
            for &b in right {
                links.insert((a, b));
                links.insert((b, a));
            }
        }
        links
    };
    let others: Vec<usize> = order.iter().copied().filter(|&m| m != focus).collect();
    match shape {
        Shape::IsolateLeader => both_ways(&[focus], &others),
        Shape::Halves => {
            let (minority, majority) = order.split_at(order.len() / 2);
            both_ways(minority, majority)
        }
        Shape::Bridge => {
            let (_bridge, rest) = order.split_first().expect("members");
            let (left, right) = rest.split_at(rest.len() / 2);
            both_ways(left, right)
        }
        Shape::OneWayOut => others.iter().map(|&other| (focus, other)).collect(),
        Shape::OneWayIn => others.iter().map(|&other| (other, focus)).collect(),
    }
}

/// What a fault left to heal.
#[derive(Debug)]
enum Fault {
    Nothing,
    Killed(usize),
    Paused(usize),
    Partitioned,
    Removed(usize),
}

/// The run's timeline of faults, printed as it goes and kept for `nemesis.log`.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    pub lines: Vec<String>,
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            lines: Vec::new(),
        }
    }

    pub fn note(&mut self, text: impl AsRef<str>) {
        let line = format!(
            "[{:7.2}s] {}",
            self.start.elapsed().as_secs_f64(),
            text.as_ref()
        );
        println!("{line}");
        self.lines.push(line);
    }
}

#[derive(Debug)]
pub struct Nemesis {
    kind: NemesisKind,
    rng: Rng,
    pub timeline: Timeline,
    /// Faults injected, by name.
    pub counts: BTreeMap<String, u32>,
}

impl Nemesis {
    pub fn new(kind: NemesisKind, rng: Rng, timeline: Timeline) -> Nemesis {
        Nemesis {
            kind,
            rng,
            timeline,
            counts: BTreeMap::new(),
        }
    }

    fn count(&mut self, name: &str) {
        *self.counts.entry(name.to_string()).or_default() += 1;
    }

    /// Injects faults until `stop_at`, healing each before the next.
    pub async fn run(&mut self, cluster: &mut Cluster, stop_at: Instant) {
        if self.kind == NemesisKind::None {
            tokio::time::sleep_until(stop_at.into()).await;
            return;
        }
        loop {
            let quiet = Duration::from_millis(self.rng.between(QUIET_MS.0, QUIET_MS.1));
            if Instant::now() + quiet >= stop_at {
                tokio::time::sleep_until(stop_at.into()).await;
                return;
            }
            tokio::time::sleep(quiet).await;
            cluster.collect_unexpected_exits();
            let kind = self.choose_kind(cluster);
            let fault = self.inject(kind, cluster).await;
            if !matches!(fault, Fault::Nothing) {
                let hold = Duration::from_millis(self.rng.between(HOLD_MS.0, HOLD_MS.1));
                let until = (Instant::now() + hold).min(stop_at);
                tokio::time::sleep_until(until.into()).await;
                self.heal(fault, cluster).await;
            }
        }
    }

    fn choose_kind(&mut self, cluster: &Cluster) -> NemesisKind {
        if self.kind != NemesisKind::Mixed {
            return self.kind;
        }
        let mut weighted = vec![
            (NemesisKind::Kill, 3),
            (NemesisKind::Pause, 3),
            (NemesisKind::Transfer, 2),
            (NemesisKind::Membership, 2),
            (NemesisKind::Rolling, 1),
        ];
        if cluster.network.supports_partitions() {
            weighted.push((NemesisKind::Partition, 3));
        }
        let total: u64 = weighted.iter().map(|(_, weight)| weight).sum();
        let mut roll = self.rng.below(total);
        for (kind, weight) in weighted {
            if roll < weight {
                return kind;
            }
            roll -= weight;
        }
        unreachable!("the roll is below the total weight")
    }

    /// The leader half of the time (when known), a random running member otherwise.
    async fn victim(&mut self, cluster: &Cluster) -> Option<(usize, &'static str)> {
        let running = cluster.running();
        if running.is_empty() {
            return None;
        }
        if self.rng.chance(1, 2)
            && let Some(leader) = cluster.leader().await
        {
            return Some((leader, " (leader)"));
        }
        Some((*self.rng.pick(&running), ""))
    }

    async fn inject(&mut self, kind: NemesisKind, cluster: &mut Cluster) -> Fault {
        match kind {
            NemesisKind::Kill => self.kill(cluster).await,
            NemesisKind::Pause => self.pause(cluster).await,
            NemesisKind::Partition => self.partition(cluster).await,
            NemesisKind::Transfer => self.transfer(cluster).await,
            NemesisKind::Membership => self.remove(cluster).await,
            NemesisKind::Rolling => self.rolling_restart(cluster).await,
            NemesisKind::Mixed | NemesisKind::None => Fault::Nothing,
        }
    }

    async fn kill(&mut self, cluster: &mut Cluster) -> Fault {
        let Some((victim, role)) = self.victim(cluster).await else {
            return Fault::Nothing;
        };
        cluster.kill(victim).await;
        self.count("kill");
        self.timeline.note(format!(
            "nemesis: kill -9 {}{role}",
            cluster.members[victim].name
        ));
        Fault::Killed(victim)
    }

    async fn pause(&mut self, cluster: &mut Cluster) -> Fault {
        let Some((victim, role)) = self.victim(cluster).await else {
            return Fault::Nothing;
        };
        cluster.pause(victim);
        self.count("pause");
        self.timeline.note(format!(
            "nemesis: SIGSTOP {}{role}",
            cluster.members[victim].name
        ));
        Fault::Paused(victim)
    }

    async fn partition(&mut self, cluster: &mut Cluster) -> Fault {
        let shape = *self.rng.pick(&SHAPES);
        let mut order: Vec<usize> = (0..cluster.size()).collect();
        self.rng.shuffle(&mut order);
        let (focus, focus_is_leader) = match cluster.leader().await {
            Some(leader) => (leader, true),
            None => (order[0], false),
        };
        let links = partition_links(shape, &order, focus);
        let description = describe_links(cluster, &links);
        match cluster.network.set_blocked(links) {
            Ok(()) => {
                self.count(&format!("partition {shape:?}"));
                let focus_note = if focus_is_leader { "leader" } else { "member" };
                self.timeline.note(format!(
                    "nemesis: partition {shape:?} around {} ({focus_note}): drop {description}",
                    cluster.members[focus].name
                ));
                Fault::Partitioned
            }
            Err(error) => {
                self.timeline
                    .note(format!("nemesis: partition failed: {error}"));
                Fault::Nothing
            }
        }
    }

    async fn transfer(&mut self, cluster: &mut Cluster) -> Fault {
        let Some(leader) = cluster.leader().await else {
            self.timeline
                .note("nemesis: transfer skipped: no leader agreed on");
            return Fault::Nothing;
        };
        let followers: Vec<usize> = cluster
            .running()
            .into_iter()
            .filter(|&member| member != leader)
            .collect();
        if followers.is_empty() {
            return Fault::Nothing;
        }
        let target = *self.rng.pick(&followers);
        let (Some(target_id), Ok(client)) =
            (cluster.member_id(target).await, cluster.client().await)
        else {
            self.timeline
                .note("nemesis: transfer skipped: target did not answer");
            return Fault::Nothing;
        };
        let result = client.move_leader(target_id).await;
        self.count("transfer");
        let names = (&cluster.members[leader].name, &cluster.members[target].name);
        match result {
            Ok(_) => self.timeline.note(format!(
                "nemesis: leadership transfer {} -> {}",
                names.0, names.1
            )),
            Err(error) => self.timeline.note(format!(
                "nemesis: leadership transfer {} -> {} failed: {error}",
                names.0, names.1
            )),
        }
        Fault::Nothing
    }

    async fn remove(&mut self, cluster: &mut Cluster) -> Fault {
        let running = cluster.running();
        if running.len() < cluster.size() {
            return Fault::Nothing;
        }
        let victim = *self.rng.pick(&running);
        let name = cluster.members[victim].name.clone();
        let Some(victim_id) = cluster.member_id(victim).await else {
            self.timeline.note(format!(
                "nemesis: member remove skipped: {name} did not answer"
            ));
            return Fault::Nothing;
        };
        let Ok(client) = cluster.client_excluding(victim).await else {
            return Fault::Nothing;
        };
        let removed = match client.member_remove(victim_id).await {
            Ok(_) => true,
            // The outcome may be unknown: the member list says.
            Err(error) => {
                let listed = client
                    .member_list()
                    .await
                    .map(|list| list.members.iter().any(|member| member.id == victim_id));
                self.timeline
                    .note(format!("nemesis: member remove {name}: {error}"));
                matches!(listed, Ok(false))
            }
        };
        if !removed {
            return Fault::Nothing;
        }
        let stopped = cluster
            .await_exit_or_kill(victim, REMOVED_EXIT_TIMEOUT)
            .await;
        cluster.forget_removed(victim, victim_id);
        self.count("member remove + re-add");
        self.timeline.note(format!(
            "nemesis: member remove {name} ({victim_id:x}){}",
            if stopped {
                ""
            } else {
                ": it did not stop by itself; killed"
            }
        ));
        Fault::Removed(victim)
    }

    /// Adds a removed member back under a new id, with an empty data directory.
    async fn readd(&mut self, cluster: &mut Cluster, member: usize) {
        let name = cluster.members[member].name.clone();
        let peer_url = cluster.members[member].peer_url.clone();
        let removed_id = cluster.members[member].removed_id;
        let Ok(client) = cluster.client_excluding(member).await else {
            return;
        };
        let deadline = Instant::now() + READD_TIMEOUT;
        loop {
            match client.member_add(vec![peer_url.clone()], false).await {
                Ok(response) => {
                    let id = response.member.map_or(0, |member| member.id);
                    self.timeline
                        .note(format!("nemesis: member add {name} ({id:x})"));
                    break;
                }
                Err(error) => {
                    // Perhaps it was added and the answer lost: then the list has it, under a
                    // new id (the old one is listed until the removal is applied where the
                    // list is read: a leader that removed itself may stop before its
                    // followers learn that the removal committed).
                    let listed = client.member_list().await.is_ok_and(|list| {
                        list.members.iter().any(|listed| {
                            listed.peer_urls.contains(&peer_url) && Some(listed.id) != removed_id
                        })
                    });
                    if listed {
                        break;
                    }
                    if Instant::now() >= deadline {
                        self.timeline
                            .note(format!("nemesis: member add {name} failed: {error}"));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if let Err(error) = cluster.start_readded(member) {
            self.timeline
                .note(format!("nemesis: starting {name} failed: {error}"));
            return;
        }
        if let Err(error) = cluster.wait_serving(member, SERVING_TIMEOUT).await {
            self.timeline.note(format!("nemesis: {error}"));
        }
    }

    async fn rolling_restart(&mut self, cluster: &mut Cluster) -> Fault {
        self.count("rolling restart");
        self.timeline.note("nemesis: rolling restart begins");
        for member in 0..cluster.size() {
            if cluster.members[member].state != MemberState::Running {
                continue;
            }
            cluster.terminate(member).await;
            self.timeline.note(format!(
                "nemesis: rolling restart: {} stopped (SIGTERM)",
                cluster.members[member].name
            ));
            let downtime = self
                .rng
                .between(ROLLING_DOWNTIME_MS.0, ROLLING_DOWNTIME_MS.1);
            tokio::time::sleep(Duration::from_millis(downtime)).await;
            self.restart(cluster, member).await;
            if let Err(error) = cluster.wait_healthy(ROLLING_HEALTH_TIMEOUT).await {
                self.timeline
                    .note(format!("nemesis: rolling restart: {error}"));
            }
        }
        self.timeline.note("nemesis: rolling restart done");
        Fault::Nothing
    }

    async fn restart(&mut self, cluster: &mut Cluster, member: usize) {
        let name = cluster.members[member].name.clone();
        if let Err(error) = cluster.restart(member) {
            self.timeline
                .note(format!("nemesis: restarting {name} failed: {error}"));
            return;
        }
        self.timeline.note(format!("nemesis: restart {name}"));
        if let Err(error) = cluster.wait_serving(member, SERVING_TIMEOUT).await {
            self.timeline.note(format!("nemesis: {error}"));
        }
    }

    async fn heal(&mut self, fault: Fault, cluster: &mut Cluster) {
        match fault {
            Fault::Nothing => {}
            Fault::Killed(member) => self.restart(cluster, member).await,
            Fault::Paused(member) => {
                cluster.resume(member);
                self.timeline
                    .note(format!("nemesis: SIGCONT {}", cluster.members[member].name));
            }
            Fault::Partitioned => match cluster.network.heal() {
                Ok(()) => self.timeline.note("nemesis: partition healed"),
                Err(error) => self.timeline.note(format!("nemesis: heal failed: {error}")),
            },
            Fault::Removed(member) => self.readd(cluster, member).await,
        }
    }

    /// Undoes everything: partitions healed, paused members continued, stopped ones
    /// restarted, removed ones re-added.
    pub async fn heal_all(&mut self, cluster: &mut Cluster) {
        if let Err(error) = cluster.network.heal() {
            self.timeline.note(format!("final heal: {error}"));
        }
        cluster.collect_unexpected_exits();
        for member in 0..cluster.size() {
            match cluster.members[member].state {
                MemberState::Running => {}
                MemberState::Paused => cluster.resume(member),
                MemberState::Down => self.restart(cluster, member).await,
                MemberState::Removed => self.readd(cluster, member).await,
            }
        }
        self.timeline.note("final heal: every fault undone");
    }
}

fn describe_links(cluster: &Cluster, links: &BTreeSet<Link>) -> String {
    let names: Vec<String> = links
        .iter()
        .map(|&(from, to)| {
            format!(
                "{}->{}",
                cluster.members[from].name, cluster.members[to].name
            )
        })
        .collect();
    names.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symmetric(links: &BTreeSet<Link>) -> bool {
        links.iter().all(|&(a, b)| links.contains(&(b, a)))
    }

    /// Which members can reach which, in both directions.
    fn connected(links: &BTreeSet<Link>, a: usize, b: usize) -> bool {
        !links.contains(&(a, b)) && !links.contains(&(b, a))
    }

    #[test]
    fn isolating_the_leader_cuts_it_from_everyone_only() {
        let links = partition_links(Shape::IsolateLeader, &[2, 0, 1, 4, 3], 1);
        assert!(symmetric(&links));
        assert_eq!(links.len(), 8);
        assert!(connected(&links, 0, 2));
        assert!(!connected(&links, 1, 4));
    }

    #[test]
    fn halves_leave_a_majority() {
        let links = partition_links(Shape::Halves, &[3, 1, 0, 4, 2], 0);
        assert!(symmetric(&links));
        // Minority {3, 1}, majority {0, 4, 2}.
        assert!(connected(&links, 3, 1));
        assert!(connected(&links, 0, 2));
        assert!(!connected(&links, 1, 4));
        assert_eq!(links.len(), 2 * 2 * 3);
        let three = partition_links(Shape::Halves, &[2, 0, 1], 0);
        assert_eq!(three.len(), 2 * 2);
    }

    #[test]
    fn a_bridge_member_reaches_both_sides() {
        let links = partition_links(Shape::Bridge, &[2, 0, 1], 0);
        assert!(connected(&links, 2, 0) && connected(&links, 2, 1));
        assert!(!connected(&links, 0, 1));
        let five = partition_links(Shape::Bridge, &[4, 0, 1, 2, 3], 0);
        assert!((0..4).all(|member| connected(&five, 4, member)));
        assert!(!connected(&five, 0, 2) && !connected(&five, 1, 3));
        assert!(connected(&five, 0, 1) && connected(&five, 2, 3));
    }

    #[test]
    fn one_way_shapes_drop_one_direction() {
        let out = partition_links(Shape::OneWayOut, &[0, 1, 2], 1);
        assert_eq!(out, [(1, 0), (1, 2)].into());
        let into = partition_links(Shape::OneWayIn, &[0, 1, 2], 1);
        assert_eq!(into, [(0, 1), (2, 1)].into());
    }
}
