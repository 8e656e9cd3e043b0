#!/usr/bin/env python3
"""Flotilla against etcd, side by side in one run, through etcd's own clients and ours.

Run through scripts/bench-vs-etcd.sh, which builds the binaries first. Starts a 3-member etcd
cluster (client ports 42379, 42389, 42399) and a 3-member Flotilla cluster (52379, 52389,
52399) on 127.0.0.1, both fsyncing with default timings, then measures, alternating the two
systems point by point:

  go        etcd's Go client (clientv3, bench/etcd-go-load): put, linearizable get and
            serializable get, closed loop, N clients over min(N, 8) connections, to the
            leader; throughput, p50/p90/p99/p99.9, and CPU per operation (all three members'
            user+system CPU from /proc, divided by the operations). --runs R repeats every
            point R times; the table shows the median run (by throughput).
  ours      `flotilla bench` (our Rust client), puts.
  checkperf `etcdctl check perf` at each load etcd passes (s, m, l, xl), then Flotilla at
            those loads.
  failover  one writer over every endpoint (1 s per attempt, retried); the leader is killed
            -9 and restarted K times; time from each kill to the first acknowledged write
            issued after it.
  python    the Python `etcd3` client (grpc C-core), 1 client, put and get, to the leader
            (with --python-client, an interpreter that has etcd3; skipped visibly otherwise).
  memory    each member's RSS after K keys of 256 bytes are written (and the Status dbSize).
  leases    --leases leases of --lease-ttl s kept alive by --lease-keepers clients (each its own
            connection and keep-alive stream) while the leader's disk stalls for --stall s
            (strace holds every fsync of the leader's process; bench/etcd-go-load/leases.go):
            early expiries (a key deleted before the promise of its last acknowledged
            renewal), renewals refused, and once the keepers stop, how late each lease goes.
  bigstore  --bigstore-keys keys of 256 bytes (txns of 100 puts): RSS per member and per key,
            the store's size, a follower's restart and a new learner's catch-up, timed.
  lists     puts (64 clients) while --listers clients each list a prefix of --list-keys keys of
            1 KiB over and over (bench/etcd-go-load/lists.go); every list checked complete; the
            serving member's peak RSS and the puts' p99 against puts with no lister.

Every process started is stopped by PID at the end. Results also go to --out as JSON lines.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMBERS = 3


SYSTEMS = ["etcd", "flotilla", "flotilla-lease"]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class Cluster:
    """Three members of one system on 127.0.0.1; every process is a child of this script."""

    def __init__(self, system, base_port, data, flotilla, extra_flags=()):
        self.system = system
        self.base_port = base_port
        self.data = data
        self.flotilla = flotilla
        self.extra_flags = list(extra_flags)
        self.procs = [None] * MEMBERS
        self.endpoints = [f"127.0.0.1:{base_port + 10 * i}" for i in range(MEMBERS)]
        peers = [f"http://127.0.0.1:{base_port + 1 + 10 * i}" for i in range(MEMBERS)]
        self.initial_cluster = ",".join(f"m{i}={p}" for i, p in enumerate(peers))
        self.peers = peers
        self.joining = {}  # index -> the initial cluster it joins with

    def add_slot(self):
        """Ports for one member more; its index."""
        i = len(self.endpoints)
        self.endpoints.append(f"127.0.0.1:{self.base_port + 10 * i}")
        self.peers.append(f"http://127.0.0.1:{self.base_port + 1 + 10 * i}")
        return i

    def command(self, i):
        client = f"http://{self.endpoints[i]}"
        flags = ["--name", f"m{i}", "--data-dir", f"{self.data}/{self.system}-m{i}",
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", self.peers[i],
                 "--initial-advertise-peer-urls", self.peers[i],
                 "--initial-cluster", self.joining.get(i, self.initial_cluster),
                 "--initial-cluster-token", f"bench-{self.system}", *self.extra_flags]
        if i in self.joining:
            flags += ["--initial-cluster-state", "existing"]
        if self.system == "etcd":
            return ["etcd", *flags, "--logger", "zap", "--log-level", "error"]
        extra = ["--lease-reads"] if self.system == "flotilla-lease" else []
        return [self.flotilla, "serve", *flags, "--log-level", "warn", *extra]

    def start_member(self, i):
        out = open(f"{self.data}/{self.system}-m{i}.log", "ab")
        while len(self.procs) <= i:
            self.procs.append(None)
        self.procs[i] = subprocess.Popen(self.command(i), stdout=out, stderr=out)

    def start(self):
        for i in range(MEMBERS):
            self.start_member(i)
        # Ready when a write succeeds (bounded: 20 s).
        for _ in range(100):
            ok = subprocess.run(
                [self.flotilla, "--endpoints", ",".join(self.endpoints), "--command-timeout",
                 "1s", "put", "bench/ready", "1"], capture_output=True).returncode == 0
            if ok:
                return
            time.sleep(0.2)
        raise SystemExit(f"{self.system} did not accept a write within 20 s; logs in {self.data}")

    def kill_member(self, i):
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def stop(self):
        for p in self.procs:
            if p and p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            if p:
                p.wait()

    def pids(self):
        return [p.pid for p in self.procs if p and p.poll() is None]

    def cpu_seconds(self):
        return sum(self.cpu_user_and_kernel_seconds())

    def cpu_user_and_kernel_seconds(self):
        user = kernel = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime (field 14)
            kernel += int(fields[12])  # stime (field 15)
        return user / CLK_TCK, kernel / CLK_TCK

    def rss_mib(self):
        return [rss_mib_of(pid) for pid in self.pids()[:MEMBERS]]

    def index_of(self, endpoint):
        return self.endpoints.index(endpoint)


class Bench:
    def __init__(self, args, clusters):
        self.args = args
        self.clusters = clusters
        self.results = []
        self.out = open(args.out, "a") if args.out else None

    def record(self, row):
        self.results.append(row)
        if self.out:
            self.out.write(json.dumps(row) + "\n")
            self.out.flush()

    def leader(self, cluster):
        return subprocess.run([self.args.go_driver, "--mode", "leader", "--endpoints",
                               ",".join(cluster.endpoints)], capture_output=True, text=True,
                              check=True).stdout.strip()

    def go_point(self, cluster, op, clients, run, extra=()):
        leader = self.leader(cluster)
        conns = min(clients, 8)
        user_before, kernel_before = cluster.cpu_user_and_kernel_seconds()
        # The driver is the only child that ends during the run: its CPU is the difference.
        driver_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([self.args.go_driver, "--endpoints", leader, "--op", op,
                              "--clients", str(clients), "--conns", str(conns),
                              "--duration", f"{self.args.duration}s", *extra],
                             capture_output=True, text=True, check=True)
        driver_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        user_after, kernel_after = cluster.cpu_user_and_kernel_seconds()
        user, kernel = user_after - user_before, kernel_after - kernel_before
        driver = (driver_after.ru_utime + driver_after.ru_stime
                  - driver_before.ru_utime - driver_before.ru_stime)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ops = max(r["ops"], 1)
        r.update(kind="go", system=cluster.system, run=run,
                 cpu_us_per_op=(user + kernel) / ops * 1e6,
                 kernel_cpu_us_per_op=kernel / ops * 1e6,
                 driver_cpu_us_per_op=driver / ops * 1e6)
        log(f"  go {cluster.system:8} {op:16} {clients:>3} clients: {r['throughput_per_second']:>8.0f}/s"
            f" p50 {r['latency_ms']['p50']:.2f} p99 {r['latency_ms']['p99']:.2f}"
            f" p99.9 {r['latency_ms']['p99.9']:.2f} ms, {r['cpu_us_per_op']:.0f} µs CPU/op"
            f" ({r['kernel_cpu_us_per_op']:.0f} in the kernel), the driver"
            f" {r['driver_cpu_us_per_op']:.0f} µs/op, {r['errors']} errors")
        self.record(r)

    def go(self):
        points = [("put", c) for c in self.args.clients]
        points += [(op, c) for op in ("get", "get-serializable") for c in self.args.read_clients]
        for run in range(self.args.runs):
            log(f"Go client, run {run + 1} of {self.args.runs}")
            for op, clients in points:
                for cluster in self.clusters:
                    self.go_point(cluster, op, clients, run)

    def kubernetes(self):
        """kube-apiserver's mix for one resource type (bench/etcd-go-load/kubernetes.go)."""
        extra = ("--keys", str(self.args.kubernetes_objects), "--value-size", "1024")
        for run in range(self.args.runs):
            log(f"Kubernetes mix through the Go client, run {run + 1} of {self.args.runs}")
            for clients in self.args.kubernetes_clients:
                for cluster in self.clusters:
                    self.go_point(cluster, "kubernetes", clients, run, extra)

    def fanout(self):
        """Watch fan-out (bench/etcd-go-load/fanout.go): puts with no watcher, then the same
        puts with --watchers watchers on their prefix over --watch-streams streams, each
        watcher checked for every event in order, and the serving member's RSS per watcher."""
        clients = self.args.fanout_clients
        for run in range(self.args.runs):
            log(f"Watch fan-out through the Go client, run {run + 1} of {self.args.runs}")
            for cluster in self.clusters:
                self.go_point(cluster, "put", clients, run)
                for watchers in self.args.watchers:
                    leader = self.leader(cluster)
                    pid = cluster.procs[cluster.endpoints.index(leader)].pid
                    extra = ("--watchers", str(watchers), "--watch-streams",
                             str(min(self.args.watch_streams, watchers)), "--rss-pid", str(pid))
                    self.go_point(cluster, "fanout", clients, run, extra)
                    r = self.results[-1]
                    log(f"    {r['watchers']} watchers: {r['watchers_complete']} complete,"
                        f" {r['events_delivered']:,} events in {r['responses_delivered']:,} responses, drained {r['drain_ms']:.0f} ms after the load,"
                        f" {r['bytes_per_watcher']:,.0f} bytes/watcher"
                        + (f", FIRST VIOLATION: {r['first_violation']}" if r.get("first_violation") else ""))

    def lists(self):
        """Large lists under a write load (bench/etcd-go-load/lists.go): puts alone, then the
        same puts while the listers list the whole prefix, with the leader's peak RSS."""
        clients = self.args.fanout_clients
        for run in range(self.args.runs):
            log(f"Large lists through the Go client, run {run + 1} of {self.args.runs}")
            for cluster in self.clusters:
                self.go_point(cluster, "put", clients, run)
                leader = self.leader(cluster)
                pid = cluster.procs[cluster.endpoints.index(leader)].pid
                extra = ("--listers", str(self.args.listers), "--list-keys", str(self.args.list_keys),
                         "--rss-pid", str(pid))
                self.go_point(cluster, "lists", clients, run, extra)
                r = self.results[-1]
                log(f"    {r['listers']} listers of {r['list_keys']:,} keys: {r['lists']} lists"
                    f" ({r['lists_short']} incomplete, {r['list_errors']} errors"
                    + (f": {r['list_first_error']}" if r.get("list_first_error") else "")
                    + f"), list p50 {r['list_latency_ms']['p50']:.0f} p99 {r['list_latency_ms']['p99']:.0f} ms,"
                    f" {r['list_bytes_per_second'] / 2**20:,.0f} MiB/s listed,"
                    f" RSS {r['rss_before_bytes'] / 2**20:,.0f} -> peak {r['rss_peak_bytes'] / 2**20:,.0f} MiB")

    def leases(self):
        """Leases kept alive through a stall of the leader's disk (bench/etcd-go-load/leases.go)."""
        if not shutil.which("strace"):
            log("SKIPPED: leases (strace, which stalls the leader's fsyncs, is not installed:"
                " apt-get install strace)")
            return
        for run in range(self.args.runs):
            log(f"Leases through a {self.args.stall} s disk stall, run {run + 1} of {self.args.runs}")
            for cluster in self.clusters:
                leader = self.leader(cluster)
                pid = cluster.procs[cluster.index_of(leader)].pid
                endpoints = [leader] + [e for e in cluster.endpoints if e != leader]
                cpu_before = cluster.cpu_seconds()
                driver = subprocess.Popen(
                    [self.args.go_driver, "--op", "leases", "--endpoints", ",".join(endpoints),
                     "--clients", str(self.args.lease_keepers), "--leases", str(self.args.leases),
                     "--lease-ttl", str(self.args.lease_ttl), "--duration",
                     f"{self.args.duration}s"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                result = None
                for line in driver.stdout:
                    if line.strip() == "stall":
                        if self.args.stall > 0:
                            stall_fsyncs(pid, self.args.stall)
                        driver.stdin.write("done\n")
                        driver.stdin.flush()
                    else:
                        result = json.loads(line)
                        break
                if driver.wait() != 0 or result is None:
                    raise SystemExit(f"the leases driver failed against {cluster.system}")
                after = self.leader(cluster)
                result.update(kind="leases", system=cluster.system, run=run, leader_before=leader,
                              leader_after=after, cpu_seconds=cluster.cpu_seconds() - cpu_before)
                self.record(result)
                r = result
                log(f"  {cluster.system:8} {r['leases']:,} leases of {r['ttl_seconds']} s,"
                    f" {r['keepers']} keepers (setup {r['setup_ms'] / 1000:.0f} s, {r['setup_retries']}"
                    f" requests retried): {r['renewals_ok']:,} of {r['renewals_sent']:,}"
                    f" renewals acknowledged, {r['renewals_lost']:,} refused (lease gone),"
                    f" {r['stream_errors']} stream errors; renewal p50"
                    f" {r['renewal_latency_ms']['p50']:.1f} p99 {r['renewal_latency_ms']['p99']:.1f}"
                    f" max {r['renewal_latency_ms']['max']:.0f} ms; EARLY EXPIRIES {r['early_expiries']:,},"
                    f" deleted while kept {r['deleted_while_kept']:,}; after the stop: {r['expired_after_stop']:,}"
                    f" expired, {r['not_expired']:,} not, lateness p50 {r['lateness_ms']['p50']:.0f}"
                    f" max {r['lateness_ms']['max']:.0f} ms; {r['writes']:,} writes beside, {r['write_errors']} failed, max"
                    f" {r['write_latency_ms']['max']:.0f} ms; leader {'kept' if after == leader else 'CHANGED'}"
                    + (f"; {r['first_early']}" if r.get("first_early") else "")
                    + (f"; first error: {r['first_error']}" if r.get("first_error") else ""))

    def status(self, endpoint):
        """etcdctl endpoint status of one endpoint (it works against both), or None."""
        out = subprocess.run(["etcdctl", "--endpoints", endpoint, "--command-timeout", "2s",
                              "endpoint", "status", "-w", "json"], capture_output=True, text=True,
                             env={**os.environ, "ETCDCTL_API": "3"})
        if out.returncode != 0:
            return None
        return json.loads(out.stdout)[0]["Status"]

    @staticmethod
    def applied_index(status):
        return status.get("raftAppliedIndex", status.get("raftIndex", 0))

    def caught_up(self, endpoint, index, limit_s=1800):
        """Seconds until the endpoint answers with its applied index at `index` (polled every
        50 ms; bounded)."""
        start = time.time()
        while time.time() - start < limit_s:
            st = self.status(endpoint)
            if st and self.applied_index(st) >= index:
                return time.time() - start
            time.sleep(0.05)
        raise SystemExit(f"{endpoint} did not catch up with index {index} in {limit_s} s")

    def bigstore(self):
        """A big store: --bigstore-keys keys of 256 bytes written by txns of 100 puts; each
        member's RSS and the store's size; a follower killed -9 and restarted, timed until it
        has applied everything again; a new member added as a learner with an empty data
        directory, timed until it has everything (by snapshot or by log), unless
        --bigstore-no-learner."""
        keys = self.args.bigstore_keys
        for cluster in self.clusters:
            log(f"big store: {cluster.system}, {keys:,} keys of 256 bytes")
            leader = self.leader(cluster)
            before = cluster.rss_mib()
            start = time.time()
            subprocess.run([self.args.go_driver, "--endpoints", leader, "--op", "fill-txn",
                            "--keys", str(keys), "--clients", "16", "--conns", "4"],
                           capture_output=True, check=True)
            fill_s = time.time() - start
            after = cluster.rss_mib()
            st = self.status(leader)
            index = self.applied_index(st)
            follower = next(i for i, e in enumerate(cluster.endpoints) if e != leader)
            du = subprocess.run(["du", "-sm", f"{cluster.data}/{cluster.system}-m{follower}"],
                                capture_output=True, text=True).stdout.split()[0]
            cluster.kill_member(follower)
            cluster.start_member(follower)
            restart_s = self.caught_up(cluster.endpoints[follower], index)
            join_s, learner_rss = (None, None) if self.args.bigstore_no_learner \
                else self.add_learner(cluster, leader, index)
            self.record(dict(kind="bigstore", system=cluster.system, keys=keys, fill_s=fill_s,
                             rss_mib_before=before, rss_mib_after=after,
                             rss_mib_end=cluster.rss_mib(), learner_rss_mib=learner_rss,
                             db_size=st.get("dbSize"), db_size_in_use=st.get("dbSizeInUse"),
                             data_dir_mib=int(du), restart_s=restart_s, join_s=join_s))
            per_key = (sum(after) - sum(before)) / len(after) * 2**20 / keys
            log(f"  {cluster.system}: filled in {fill_s:.0f} s; RSS {['%.0f' % m for m in after]} MiB"
                f" ({per_key:.0f} B per key per member); dbSize {st.get('dbSize', 0) / 2**20:,.0f} MiB,"
                f" in use {st.get('dbSizeInUse', 0) / 2**20:,.0f} MiB; data dir {du} MiB;"
                f" a follower restarted and caught up in {restart_s:.1f} s; "
                + ("no learner added" if join_s is None else
                   f"a new learner caught up in {join_s:.1f} s (RSS {learner_rss:,.0f} MiB)"))

    def add_learner(self, cluster, leader, index):
        """Adds a member as a learner with an empty data directory; the seconds until it has
        applied `index`, and its RSS then (MiB)."""
        new = cluster.add_slot()
        # etcd refuses a member add until every member has been connected for 5 s (the
        # follower just restarted): tried again for up to a minute.
        for _ in range(60):
            added = subprocess.run(["etcdctl", "--endpoints", leader, "member", "add", f"m{new}",
                                    f"--peer-urls={cluster.peers[new]}", "--learner"],
                                   capture_output=True, text=True,
                                   env={**os.environ, "ETCDCTL_API": "3"})
            if added.returncode == 0 or "unhealthy cluster" not in added.stderr:
                break
            time.sleep(1)
        if added.returncode != 0:
            raise SystemExit(f"member add failed on {cluster.system}: {added.stderr}")
        cluster.joining[new] = cluster.initial_cluster + f",m{new}={cluster.peers[new]}"
        cluster.start_member(new)
        join_s = self.caught_up(cluster.endpoints[new], index)
        return join_s, rss_mib_of(cluster.procs[new].pid)

    def ours(self):
        log("flotilla bench (our Rust client), puts")
        for clients in self.args.clients:
            for cluster in self.clusters:
                out = subprocess.run([self.args.flotilla, "bench", "--endpoints",
                                      ",".join(cluster.endpoints), "--clients", str(clients),
                                      "--duration", f"{self.args.duration}s", "--json"],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout)
                w = r["writes"]
                self.record(dict(kind="ours", system=cluster.system, clients=clients,
                                 throughput_per_second=w["throughput_per_second"],
                                 latency_ms=w["latency_ms"], errors=w["errors"]))
                log(f"  ours {cluster.system:8} {clients:>3} clients: {w['throughput_per_second']:>8.0f}/s")

    def python(self):
        interpreter = self.args.python_client
        probe = subprocess.run([interpreter, "-c", "import etcd3"], capture_output=True)
        if probe.returncode != 0:
            log(f"SKIPPED: the Python etcd3 client ({interpreter} cannot import etcd3;"
                " pip install etcd3 'protobuf<4' and pass --python-client)")
            return
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "etcd3_load.py")
        for op in ("put", "get"):
            for cluster in self.clusters:
                out = subprocess.run([interpreter, script, self.leader(cluster), op,
                                      str(self.args.duration)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout)
                r.update(kind="python", system=cluster.system)
                self.record(r)
                log(f"  python etcd3 {cluster.system:8} {op}: {r['throughput_per_second']:.0f}/s"
                    f" p50 {r['latency_ms']['p50']:.2f} p99 {r['latency_ms']['p99']:.2f} ms")

    def checkperf(self):
        if not shutil.which("etcdctl"):
            log("SKIPPED: etcdctl check perf (etcdctl not installed)")
            return
        passed_by_etcd = []
        for load in ("s", "m", "l", "xl"):
            for cluster in self.clusters:
                if cluster.system != "etcd" and load not in passed_by_etcd:
                    continue
                out = subprocess.run(["etcdctl", "--endpoints", ",".join(cluster.endpoints),
                                      "check", "perf", f"--load={load}"],
                                     capture_output=True, text=True,
                                     env={**os.environ, "ETCDCTL_API": "3"})
                # The progress bar ends its lines with carriage returns.
                text = (out.stdout + out.stderr).replace("\r", "\n")
                summary = [line.strip() for line in text.splitlines()
                           if line.startswith(("PASS", "FAIL"))]
                ok = out.returncode == 0
                if cluster.system == "etcd" and ok:
                    passed_by_etcd.append(load)
                self.record(dict(kind="checkperf", system=cluster.system, load=load, passed=ok,
                                 summary=summary))
                log(f"  check perf --load={load} {cluster.system:8}: {'PASS' if ok else 'FAIL'}"
                    f" {'; '.join(summary)}")
            if load not in passed_by_etcd:
                break

    def failover(self):
        for cluster in self.clusters:
            log(f"failover: {cluster.system}, {self.args.failover_kills} leader kills")
            driver = subprocess.Popen([self.args.go_driver, "--mode", "failover", "--kills",
                                       str(self.args.failover_kills), "--endpoints",
                                       ",".join(cluster.endpoints)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            result = None
            for line in driver.stdout:
                verb, _, endpoint = line.strip().partition(" ")
                if verb == "kill":
                    cluster.kill_member(cluster.index_of(endpoint))
                elif verb == "start":
                    cluster.start_member(cluster.index_of(endpoint))
                else:
                    result = json.loads(line)
                    break
                driver.stdin.write("done\n")
                driver.stdin.flush()
            if driver.wait() != 0 or result is None:
                raise SystemExit(f"the failover driver failed against {cluster.system}")
            result.update(kind="failover", system=cluster.system)
            self.record(result)
            log(f"  {cluster.system}: kill to first acknowledged write p50"
                f" {result['summary_ms']['p50']:.0f} ms, max {result['summary_ms']['max']:.0f} ms")

    def memory(self):
        keys = self.args.memory_keys
        for cluster in self.clusters:
            log(f"memory: {cluster.system}, {keys} keys of 256 bytes")
            leader = self.leader(cluster)
            before = cluster.rss_mib()
            subprocess.run([self.args.go_driver, "--endpoints", leader, "--op", "fill",
                            "--keys", str(keys), "--clients", "64", "--conns", "8"],
                           capture_output=True, check=True)
            status = subprocess.run([self.args.flotilla, "--endpoints", leader, "status",
                                     "-w", "json"], capture_output=True, text=True)
            self.record(dict(kind="memory", system=cluster.system, keys=keys,
                             rss_mib_before=before, rss_mib_after=cluster.rss_mib(),
                             status=status.stdout.strip()))
            log(f"  {cluster.system}: RSS {['%.0f' % m for m in cluster.rss_mib()]} MiB")


def rss_mib_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def stall_fsyncs(pid, seconds):
    """Stalls the process's disk as a hung device would: strace attaches to every thread and
    holds each fdatasync and fsync at its entry; detaching, after `seconds`, lets them go."""
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(pid),
                               "-e", "trace=fdatasync,fsync",
                               "-e", f"inject=fdatasync,fsync:delay_enter={int(seconds * 1e6)}"])
    time.sleep(seconds)
    tracer.send_signal(signal.SIGINT)
    tracer.wait()


def median_run(rows):
    rows = sorted(rows, key=lambda r: r["throughput_per_second"])
    return rows[len(rows) // 2]


def table(title, headers, rows):
    """Prints a Markdown table under a heading."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def latencies(r, quantiles):
    return [f"{r['latency_ms'][q]:.2f}" for q in quantiles]


def go_rows(go):
    """The median run of each (op, clients, system), then flotilla's throughput ratio."""
    points = []
    for r in go:
        if (r["op"], r["clients"]) not in points:
            points.append((r["op"], r["clients"]))
    for op, clients in points:
        by = {}
        for system in SYSTEMS:
            runs = [r for r in go if (r["op"], r["clients"], r["system"]) == (op, clients, system)]
            if not runs:
                continue
            m = by[system] = median_run(runs)
            yield [op, clients, system, f"{m['throughput_per_second']:,.0f}",
                   *latencies(m, ("p50", "p90", "p99", "p99.9")), f"{m['cpu_us_per_op']:.0f}",
                   f"{m.get('kernel_cpu_us_per_op', float('nan')):.0f}",
                   f"{m.get('driver_cpu_us_per_op', float('nan')):.0f}", m["errors"]]
        for system in SYSTEMS[1:]:
            if "etcd" in by and system in by:
                ratio = by[system]["throughput_per_second"] / by["etcd"]["throughput_per_second"]
                yield [op, clients, f"**{system} / etcd**", f"**{ratio:.2f}x**", "", "", "", "", "", "",
                       "", ""]


def report(results):
    of = lambda kind: [r for r in results if r["kind"] == kind]
    if go := [r for r in of("go") if r["op"] not in ("kubernetes", "fanout", "lists")]:
        table(f"etcd's Go client (clientv3), to the leader, median of {len({r['run'] for r in go})} runs",
              ["op", "clients", "system", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
               "CPU µs/op", "of which kernel", "Go driver µs/op", "errors"], go_rows(go))
    if k8s := [r for r in of("go") if r["op"] == "kubernetes"]:
        rows = []
        for clients in sorted({r["clients"] for r in k8s}):
            for system in SYSTEMS:
                runs = [r for r in k8s if (r["clients"], r["system"]) == (clients, system)]
                if runs:
                    m = median_run(runs)
                    rows.append([clients, system, f"{m['throughput_per_second']:,.0f}",
                                 f"{m['lists'] / m['seconds']:,.0f}", f"{m['writes'] / m['seconds']:,.0f}",
                                 f"{m['list_latency_ms']['p50']:.1f}", f"{m['list_latency_ms']['p99']:.1f}",
                                 f"{m['write_latency_ms']['p50']:.1f}", f"{m['write_latency_ms']['p99']:.1f}",
                                 m["conflicts"], m["errors"]])
        table(f"Kubernetes mix (80% lists of 500 of 1 KiB objects, 20% guarded writes, a prefix watch per"
              f" connection), median of {len({r['run'] for r in k8s})} runs",
              ["clients", "system", "requests/s", "lists/s", "writes/s", "list p50 ms", "list p99 ms",
               "write p50 ms", "write p99 ms", "conflicts", "errors"], rows)
    if fan := [r for r in of("go") if r["op"] == "fanout"]:
        rows = []
        for watchers in sorted({r["watchers"] for r in fan}):
            for system in SYSTEMS:
                runs = [r for r in fan if (r["watchers"], r["system"]) == (watchers, system)]
                base = [r for r in of("go") if r["op"] == "put" and r["system"] == system
                        and r["clients"] == runs[0]["clients"]] if runs else []
                if runs and base:
                    m, b = median_run(runs), median_run(base)
                    rows.append([watchers, m["watch_streams"], m["clients"], system,
                                 f"{b['throughput_per_second']:,.0f}", f"{m['throughput_per_second']:,.0f}",
                                 f"{m['throughput_per_second'] / b['throughput_per_second']:.0%}",
                                 f"{m['latency_ms']['p99']:.1f}",
                                 f"{sum(r['watchers_complete'] for r in runs)} of {sum(r['watchers'] for r in runs)}",
                                 f"{m['events_delivered'] / (m['seconds'] + m['drain_ms'] / 1000):,.0f}",
                                 f"{m['events_delivered'] / max(m['responses_delivered'], 1):.1f}",
                                 f"{m['drain_ms']:,.0f}", f"{m['bytes_per_watcher']:,.0f}"])
        table(f"Watch fan-out: puts with every watcher on their prefix, median of {len({r['run'] for r in fan})} runs",
              ["watchers", "streams", "clients", "system", "puts/s, no watcher", "puts/s, watched",
               "kept", "put p99 ms", "watchers complete and in order", "events/s delivered",
               "events/response", "drain ms", "RSS bytes/watcher"], rows)
    if lists := [r for r in of("go") if r["op"] == "lists"]:
        rows = []
        for system in SYSTEMS:
            runs = [r for r in lists if r["system"] == system]
            base = [r for r in of("go") if r["op"] == "put" and r["system"] == system
                    and r["clients"] == runs[0]["clients"]] if runs else []
            if runs and base:
                m, b = median_run(runs), median_run(base)
                mib = lambda x: f"{x / 2**20:,.0f}"
                rows.append([system, m["listers"], f"{m['list_keys']:,}", m["clients"],
                             f"{b['throughput_per_second']:,.0f}", f"{m['throughput_per_second']:,.0f}",
                             f"{b['latency_ms']['p99']:.1f}", f"{m['latency_ms']['p99']:.1f}",
                             f"{m['latency_ms']['max']:.0f}", m["errors"],
                             f"{m['lists_per_second']:.2f}", f"{m['list_latency_ms']['p50']:,.0f}",
                             f"{m['list_latency_ms']['p99']:,.0f}",
                             f"{sum(r['lists'] - r['lists_short'] for r in runs)} of {sum(r['lists'] + r['list_errors'] for r in runs)}",
                             mib(m["rss_before_bytes"]), mib(m["rss_peak_bytes"])])
        table(f"Large lists: puts while clients list a whole prefix (unary Range), median of {len({r['run'] for r in lists})} runs",
              ["system", "listers", "keys listed", "put clients", "puts/s alone", "puts/s listed",
               "put p99 ms alone", "put p99 ms listed", "put max ms", "put errors (10 s timeouts)",
               "lists/s", "list p50 ms",
               "list p99 ms", "lists complete", "leader RSS before MiB", "leader RSS peak MiB"], rows)
    if leases := of("leases"):
        table(f"Leases kept alive through a stall of the leader's disk (fsyncs held by strace)",
              ["system", "run", "leases", "TTL s", "keepers", "stall ms", "renewals acknowledged",
               "renewals refused (lease gone)", "renewal p99 / max ms", "early expiries",
               "deleted while kept alive", "expired after the stop", "not expired",
               "lateness p50 / p99 / max ms", "leader"],
              ([r["system"], r["run"] + 1, f"{r['leases']:,}", r["ttl_seconds"], r["keepers"],
                f"{r['stall_ms']:,.0f}", f"{r['renewals_ok']:,} of {r['renewals_sent']:,}",
                f"{r['renewals_lost']:,}",
                f"{r['renewal_latency_ms']['p99']:.1f} / {r['renewal_latency_ms']['max']:,.0f}",
                f"{r['early_expiries']:,}", f"{r['deleted_while_kept']:,}",
                f"{r['expired_after_stop']:,}", f"{r['not_expired']:,}",
                " / ".join(f"{r['lateness_ms'][q]:,.0f}" for q in ("p50", "p99", "max")),
                "kept" if r["leader_before"] == r["leader_after"] else "changed"]
               for r in leases))
    if ours := of("ours"):
        table("`flotilla bench` (our Rust client), puts",
              ["clients", "system", "ops/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"],
              ([r["clients"], r["system"], f"{r['throughput_per_second']:,.0f}",
                *latencies(r, ("p50", "p99", "p99.9")), r["errors"]] for r in ours))
    if py := of("python"):
        table("Python `etcd3` client (grpc C-core), 1 client, to the leader",
              ["op", "system", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms"],
              ([r["op"], r["system"], f"{r['throughput_per_second']:,.0f}",
                *latencies(r, ("p50", "p90", "p99", "p99.9"))] for r in py))
    if checks := of("checkperf"):
        table("`etcdctl check perf`", ["load", "system", "result", "summary"],
              ([r["load"], r["system"], "PASS" if r["passed"] else "FAIL", "; ".join(r["summary"])]
               for r in checks))
    if fails := of("failover"):
        table("Failover: kill -9 of the leader to the first acknowledged write (Go client)",
              ["system", "kills", "p50 ms", "p99 ms", "max ms", "failed attempts"],
              ([r["system"], r["kills"], *(f"{r['summary_ms'][q]:.0f}" for q in ("p50", "p99", "max")),
                r["write_errors"]] for r in fails))
    if big := of("bigstore"):
        table("Big store: keys of 256 bytes (txns of 100 puts), 3 members",
              ["system", "keys", "fill s", "RSS per member MiB", "RSS bytes per key", "dbSize MiB",
               "in use MiB", "data dir MiB", "follower restart to caught up s",
               "new learner to caught up s", "learner RSS MiB"],
              ([r["system"], f"{r['keys']:,}", f"{r['fill_s']:.0f}",
                ", ".join(f"{m:,.0f}" for m in r["rss_mib_after"]),
                f"{(sum(r['rss_mib_after']) - sum(r['rss_mib_before'])) / len(r['rss_mib_after']) * 2**20 / r['keys']:.0f}",
                f"{(r['db_size'] or 0) / 2**20:,.0f}", f"{(r['db_size_in_use'] or 0) / 2**20:,.0f}",
                f"{r['data_dir_mib']:,}", f"{r['restart_s']:.1f}",
                "not run" if r["join_s"] is None else f"{r['join_s']:.1f}",
                "" if r["learner_rss_mib"] is None else f"{r['learner_rss_mib']:,.0f}"]
               for r in big))
    if mem := of("memory"):
        mib = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
        table("Memory: RSS of each member after the keys are written",
              ["system", "keys", "RSS per member before (MiB)", "RSS per member after (MiB)"],
              ([r["system"], f"{r['keys']:,}", mib(r["rss_mib_before"]), mib(r["rss_mib_after"])]
               for r in mem))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flotilla", required=True)
    p.add_argument("--go-driver", required=True)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--clients", type=int, nargs="*", default=[1, 16, 64, 256],
                   help="put loads (none: no puts)")
    p.add_argument("--read-clients", type=int, nargs="*", default=[1, 64])
    p.add_argument("--parts", nargs="+",
                   default=["go", "kubernetes", "ours", "python", "checkperf", "failover"],
                   choices=["go", "kubernetes", "ours", "python", "checkperf", "failover", "memory",
                            "fanout", "lists", "leases", "bigstore"])
    p.add_argument("--watchers", type=int, nargs="+", default=[1000, 10000],
                   help="watchers on the written prefix (--parts fanout)")
    p.add_argument("--watch-streams", type=int, default=100,
                   help="watch streams the watchers are spread over (--parts fanout)")
    p.add_argument("--fanout-clients", type=int, default=64, help="writers (--parts fanout, lists)")
    p.add_argument("--listers", type=int, default=20, help="clients listing (--parts lists)")
    p.add_argument("--list-keys", type=int, default=200_000,
                   help="keys of 1 KiB under the listed prefix (--parts lists)")
    p.add_argument("--bigstore-keys", type=int, default=1_000_000,
                   help="keys of 256 bytes (--parts bigstore)")
    p.add_argument("--bigstore-no-learner", action="store_true",
                   help="skip the new learner (--parts bigstore; a fourth copy may not fit)")
    p.add_argument("--quota-backend-bytes", type=int,
                   help="passed to every member of both systems (a big store needs more than"
                        " the 2 GiB default)")
    p.add_argument("--leases", type=int, default=100_000, help="leases kept alive (--parts leases)")
    p.add_argument("--lease-ttl", type=int, default=30, help="their TTL in seconds (--parts leases)")
    p.add_argument("--lease-keepers", type=int, default=1000,
                   help="clients keeping them alive, each its own connection (--parts leases)")
    p.add_argument("--stall", type=float, default=2.0,
                   help="seconds the leader's fsyncs are held, halfway through (--parts leases)")
    p.add_argument("--kubernetes-clients", type=int, nargs="+", default=[64],
                   help="API-server-like clients of the Kubernetes mix (part 'kubernetes')")
    p.add_argument("--kubernetes-objects", type=int, default=5000,
                   help="objects of 1 KiB in the Kubernetes mix (10 namespaces)")
    p.add_argument("--python-client", default=sys.executable,
                   help="a Python interpreter that can import etcd3 (part 'python')")
    p.add_argument("--failover-kills", type=int, default=20)
    p.add_argument("--memory-keys", type=int, default=1_000_000)
    p.add_argument("--systems", nargs="+", default=["etcd", "flotilla"], choices=SYSTEMS,
                   help="flotilla-lease: Flotilla with --lease-reads (leader leases for reads)")
    p.add_argument("--out", help="append every result to this file as JSON lines")
    p.add_argument("--keep-data", action="store_true")
    args = p.parse_args()

    data = tempfile.mkdtemp(prefix="flotilla-vs-etcd.")
    bases = {"etcd": 42379, "flotilla": 52379, "flotilla-lease": 62379}
    extra = ["--quota-backend-bytes", str(args.quota_backend_bytes)] if args.quota_backend_bytes else []
    clusters = [Cluster(s, bases[s], data, args.flotilla, extra) for s in args.systems]
    try:
        for c in clusters:
            c.start()
        version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split()[2]
        log(f"etcd {version} vs flotilla, {MEMBERS} members each, {args.duration} s per point, {os.cpu_count()} cores")
        bench = Bench(args, clusters)
        for part in args.parts:
            getattr(bench, part)()
        report(bench.results)
    finally:
        for c in clusters:
            c.stop()
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
