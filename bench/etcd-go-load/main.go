// etcd-go-load: a closed-loop load driver built on etcd's own Go client (clientv3, the
// library inside etcdctl and Kubernetes), so Flotilla and etcd are measured through the
// client their users actually run.
//
// Built in GOPATH mode against Debian's golang-etcd-server-dev (no module download):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o etcd-go-load .
//
// Load mode: N clients (goroutines, one request outstanding each) share M connections
// (clientv3.Client instances), all pointed at one endpoint (the leader, chosen by the
// caller), and issue put / linearizable get / serializable get for a fixed time. Prints one
// JSON line: throughput, errors, latency percentiles.
//
// Failover mode: one writer with a 1 s timeout per attempt over every endpoint (as a
// Kubernetes API server talks to etcd), while the caller kills -9 the leader and restarts it
// K times; for each kill, the time from the kill to the first write issued after the kill
// that is acknowledged. The caller is driven over stdin/stdout: the driver prints
// "kill ENDPOINT" or "start ENDPOINT" and waits for a line "done"; the last line it prints
// is the JSON result.
//
// Kubernetes op: kube-apiserver's traffic mix for one resource type (kubernetes.go).
//
// Fanout op: the put load with watchers on its prefix, each checked for every event in order
// (fanout.go).
//
// Lists op: the put load while clients list a large prefix, with the server's peak memory
// (lists.go).
//
// Leases op: many leases kept alive by many clients through a stall of the leader's disk,
// every early expiry and late revocation counted (leases.go).
//
// Leader mode: prints the endpoint of the current leader.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.uber.org/zap"
	"google.golang.org/grpc/grpclog"
)

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated endpoints")
	mode := flag.String("mode", "load", "load | failover")
	op := flag.String("op", "put", "put | get | get-serializable | fill (put each of --keys keys once, ignoring --duration) | fill-txn (the same, 100 puts per txn) | fanout (put with --watchers watching: see fanout.go) | kubernetes (kube-apiserver's mix over --keys objects: see kubernetes.go) | lists (put with --listers listing --list-keys keys: see lists.go) | leases (--clients keep --leases leases alive through a disk stall: see leases.go)")
	clients := flag.Int("clients", 1, "concurrent clients (one request outstanding each)")
	conns := flag.Int("conns", 1, "connections (clientv3.Client instances) shared by the clients")
	duration := flag.Duration("duration", 10*time.Second, "how long to run (load mode)")
	valueSize := flag.Int("value-size", 256, "value size in bytes")
	keys := flag.Int("keys", 10000, "size of the key space (random keys)")
	kills := flag.Int("kills", 20, "leader kills (failover mode)")
	watchers := flag.Int("watchers", 1000, "watchers on the written prefix (--op fanout)")
	watchStreams := flag.Int("watch-streams", 10, "watch streams the watchers are spread over (--op fanout)")
	rssPid := flag.Int("rss-pid", 0, "the process serving the endpoint, for its memory per watcher (--op fanout) or its peak memory (--op lists); 0: not measured")
	listers := flag.Int("listers", 20, "clients listing the whole of list/ over and over (--op lists)")
	listKeys := flag.Int("list-keys", 200000, "keys under list/ (--op lists; written first unless already there)")
	listValueSize := flag.Int("list-value-size", 1024, "value size of the listed keys (--op lists)")
	leaseCount := flag.Int("leases", 100000, "leases kept alive by --clients keepers (--op leases)")
	leaseTTL := flag.Int64("lease-ttl", 30, "the leases' TTL in seconds (--op leases)")
	expiryWait := flag.Duration("expiry-wait", 3*time.Minute, "how long to wait for every lease to expire once the keepers stop (--op leases)")
	writers := flag.Int("writers", 16, "clients writing beside the keep-alives, so the leader's disk is busy (--op leases)")
	stallPause := flag.Bool("stall-pause", true, "halfway through, print \"stall\" and wait for \"done\" on stdin while the caller stalls the leader's disk (--op leases)")
	flag.StringVar(&user, "user", "", "authenticate as user:password (the server must have a user with read-write on the keys)")
	flag.DurationVar(&slowLog, "slow", 0, "log each request at least this slow to stderr: its start (unix ms) and latency (load mode; 0 = off)")
	flag.Parse()
	grpclog.SetLoggerV2(grpclog.NewLoggerV2(devNull{}, devNull{}, os.Stderr))
	eps := strings.Split(*endpoints, ",")
	var out interface{}
	switch *mode {
	case "load":
		if *op == "kubernetes" {
			out = kubernetesLoad(eps, *clients, *conns, *duration, *valueSize, *keys)
		} else if *op == "leases" {
			out = leasesOp(eps, *leaseCount, *clients, *writers, *leaseTTL, *duration, *expiryWait, *stallPause)
		} else if *op == "lists" {
			out = lists(eps, *clients, *conns, *duration, *valueSize, *keys, *listers, *listKeys, *listValueSize, *rssPid)
		} else if *op == "fanout" {
			out = fanout(eps, *clients, *conns, *duration, *valueSize, *keys, *watchers, *watchStreams, *rssPid)
		} else {
			out = load(eps, *op, *clients, *conns, *duration, *valueSize, *keys)
		}
	case "failover":
		out = failover(eps, *kills, *valueSize)
	case "leader":
		c := newClient(eps)
		defer c.Close()
		for try := 0; try < 100; try++ {
			if leader, ok := leaderEndpoint(c, eps); ok {
				fmt.Println(leader)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		fail("no leader among %v", eps)
	default:
		fail("unknown mode %q", *mode)
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}

type devNull struct{}

func (devNull) Write(p []byte) (int, error) { return len(p), nil }

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "etcd-go-load: "+format+"\n", args...)
	os.Exit(1)
}

// user is --user: "name:password", or empty for no authentication.
var user string

func newClient(eps []string) *clientv3.Client {
	// The client's own retry warnings go nowhere: errors are counted and reported.
	quiet := zap.NewProductionConfig()
	quiet.Level = zap.NewAtomicLevelAt(zap.FatalLevel)
	config := clientv3.Config{
		Endpoints:   eps,
		DialTimeout: 5 * time.Second,
		LogConfig:   &quiet,
	}
	if name, password, given := strings.Cut(user, ":"); given {
		config.Username, config.Password = name, password
	}
	c, err := clientv3.New(config)
	if err != nil {
		fail("cannot connect to %v: %v", eps, err)
	}
	return c
}

type loadResult struct {
	Op         string             `json:"op"`
	Clients    int                `json:"clients"`
	Conns      int                `json:"conns"`
	Seconds    float64            `json:"seconds"`
	Ops        int                `json:"ops"`
	Errors     int64              `json:"errors"`
	FirstError string             `json:"first_error,omitempty"`
	Throughput float64            `json:"throughput_per_second"`
	LatencyMs  map[string]float64 `json:"latency_ms"`
}

// fillTxnPuts: keys written by one request of --op fill-txn (etcd's default --max-txn-ops is 128).
const fillTxnPuts = 100

// slowLog: requests at least this slow are logged to stderr, to line stalls up with member logs.
var slowLog time.Duration

func load(eps []string, op string, clients, conns int, duration time.Duration, valueSize, keys int) loadResult {
	if conns < 1 || clients < 1 {
		fail("--clients and --conns must be at least 1")
	}
	pool := make([]*clientv3.Client, conns)
	for i := range pool {
		pool[i] = newClient(eps)
		defer pool[i].Close()
	}
	value := strings.Repeat("v", valueSize)
	var errors int64
	var firstError atomic.Value
	latencies := make([][]time.Duration, clients)
	deadline := time.Now().Add(duration)
	var filled int64 // fill: the next key to write
	more := func(rng *rand.Rand) (string, bool) {
		if op == "fill" {
			i := atomic.AddInt64(&filled, 1) - 1
			return fmt.Sprintf("fill/%010d", i), i < int64(keys)
		}
		if op == "fill-txn" {
			i := (atomic.AddInt64(&filled, 1) - 1) * fillTxnPuts
			return strconv.FormatInt(i, 10), i < int64(keys)
		}
		return fmt.Sprintf("bench/%08d", rng.Intn(keys)), time.Now().Before(deadline)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			kv := pool[c%conns]
			rng := rand.New(rand.NewSource(int64(c) + 1))
			mine := make([]time.Duration, 0, 1<<16)
			for {
				key, ok := more(rng)
				if !ok {
					break
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				began := time.Now()
				var err error
				switch op {
				case "put", "fill":
					_, err = kv.Put(ctx, key, value)
				case "fill-txn":
					first, _ := strconv.ParseInt(key, 10, 64)
					var puts []clientv3.Op
					for i := first; i < first+fillTxnPuts && i < int64(keys); i++ {
						puts = append(puts, clientv3.OpPut(fmt.Sprintf("fill/%010d", i), value))
					}
					_, err = kv.Txn(ctx).Then(puts...).Commit()
				case "get":
					_, err = kv.Get(ctx, key)
				case "get-serializable":
					_, err = kv.Get(ctx, key, clientv3.WithSerializable())
				default:
					fail("unknown op %q", op)
				}
				took := time.Since(began)
				cancel()
				if slowLog > 0 && took >= slowLog {
					fmt.Fprintf(os.Stderr, "slow %d %.2f ms\n", began.UnixMilli(), float64(took.Microseconds())/1000)
				}
				if err != nil {
					if atomic.AddInt64(&errors, 1) == 1 {
						firstError.Store(err.Error())
					}
					continue
				}
				mine = append(mine, took)
			}
			latencies[c] = mine
		}(c)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range latencies {
		all = append(all, l...)
	}
	r := loadResult{Op: op, Clients: clients, Conns: conns, Seconds: elapsed, Ops: len(all),
		Errors: errors, Throughput: float64(len(all)) / elapsed, LatencyMs: percentiles(all)}
	if e, ok := firstError.Load().(string); ok {
		r.FirstError = e
	}
	return r
}

func percentiles(samples []time.Duration) map[string]float64 {
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	out := map[string]float64{}
	for _, p := range []struct {
		name string
		q    float64
	}{{"p50", 0.5}, {"p90", 0.9}, {"p99", 0.99}, {"p99.9", 0.999}, {"max", 1}} {
		if len(samples) == 0 {
			out[p.name] = 0
			continue
		}
		i := int(p.q * float64(len(samples)-1))
		out[p.name] = float64(samples[i].Microseconds()) / 1000
	}
	return out
}

type failoverResult struct {
	Kills     int                `json:"kills"`
	SamplesMs []float64          `json:"kill_to_first_ack_ms"`
	Summary   map[string]float64 `json:"summary_ms"`
	Errors    int64              `json:"write_errors"`
	// The most frequent error texts of failed attempts, with their counts.
	ErrorKinds map[string]int64 `json:"error_kinds"`
}

// leaderEndpoint asks each endpoint for its status; the one that is its cluster's leader.
func leaderEndpoint(c *clientv3.Client, eps []string) (string, bool) {
	for _, ep := range eps {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		s, err := c.Status(ctx, ep)
		cancel()
		if err == nil && s.Header.MemberId == s.Leader {
			return ep, true
		}
	}
	return "", false
}

// ask has the caller do something to a member ("kill" or "start") and waits until it is done.
func ask(controller *bufio.Reader, verb, endpoint string) {
	fmt.Printf("%s %s\n", verb, endpoint)
	line, err := controller.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "done" {
		fail("the caller did not confirm %s %s: %q %v", verb, endpoint, line, err)
	}
}

func failover(eps []string, kills int, valueSize int) failoverResult {
	controller := bufio.NewReader(os.Stdin)
	writer := newClient(eps)
	defer writer.Close()
	admin := newClient(eps)
	defer admin.Close()
	value := strings.Repeat("v", valueSize)

	// The writer: one write at a time, each attempt bounded by 1 s, retried on failure. Each
	// acknowledgement is reported with the time its attempt was issued.
	type ack struct{ issued, acked time.Time }
	acks := make(chan ack, 1<<16)
	var errors int64
	var kindsMu sync.Mutex
	kinds := map[string]int64{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			issued := time.Now()
			_, err := writer.Put(ctx, fmt.Sprintf("failover/%d", i%1000), value)
			cancel()
			if err != nil {
				atomic.AddInt64(&errors, 1)
				kindsMu.Lock()
				if len(kinds) < 20 {
					kinds[err.Error()]++
				} else if _, ok := kinds[err.Error()]; ok {
					kinds[err.Error()]++
				}
				kindsMu.Unlock()
				continue
			}
			select {
			case acks <- ack{issued, time.Now()}:
			default:
			}
		}
	}()
	drain := func() {
		for {
			select {
			case <-acks:
			default:
				return
			}
		}
	}
	waitAck := func(after time.Time, limit time.Duration) (time.Time, bool) {
		timeout := time.After(limit)
		for {
			select {
			case a := <-acks:
				if a.issued.After(after) {
					return a.acked, true
				}
			case <-timeout:
				return time.Time{}, false
			}
		}
	}

	var samples []float64
	for k := 0; k < kills; k++ {
		// Steady state first: a write issued now is acknowledged, and a leader is known.
		if _, ok := waitAck(time.Now(), 30*time.Second); !ok {
			fail("no write was acknowledged for 30 s before kill %d", k+1)
		}
		leader, ok := "", false
		for try := 0; try < 100 && !ok; try++ {
			leader, ok = leaderEndpoint(admin, eps)
			if !ok {
				time.Sleep(100 * time.Millisecond)
			}
		}
		if !ok {
			fail("no leader found before kill %d", k+1)
		}
		drain()
		ask(controller, "kill", leader)
		killed := time.Now()
		acked, ok := waitAck(killed, 60*time.Second)
		if !ok {
			fail("no write acknowledged within 60 s of kill %d", k+1)
		}
		samples = append(samples, float64(acked.Sub(killed).Microseconds())/1000)
		fmt.Fprintf(os.Stderr, "kill %d of %s: first acknowledged write %.1f ms later\n", k+1, leader, samples[k])
		ask(controller, "start", leader)
		// Back to full strength: the restarted member answers Status.
		for try := 0; ; try++ {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			_, err := admin.Status(ctx, leader)
			cancel()
			if err == nil {
				break
			}
			if try == 200 {
				fail("%s did not come back after its restart", leader)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	close(stop)
	wg.Wait()
	durations := make([]time.Duration, len(samples))
	for i, s := range samples {
		durations[i] = time.Duration(s * float64(time.Millisecond))
	}
	return failoverResult{Kills: kills, SamplesMs: samples, Summary: percentiles(durations), Errors: errors, ErrorKinds: kinds}
}
