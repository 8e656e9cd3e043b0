package main

// The Kubernetes traffic mix (--op kubernetes): what kube-apiserver's storage layer sends
// for one resource type, from --clients API-server-like clients over --conns connections.
//
// --keys objects live under /registry/pods/<namespace>/ in 10 namespaces; each client owns
// the objects whose number is its own modulo --clients and knows their mod revisions, as
// kube-apiserver knows the resourceVersion of what it updates. Each request is
//   - 80%: a list of one namespace (a prefix Range, limit 500, linearizable), or
//   - 20%: a write: 90% update (If mod_revision=rev Then Put Else Get), 5% create
//     (If mod_revision=0 Then Put), 5% delete (If mod_revision=rev Then Delete Else Get).
// Each connection also keeps a watch on /registry/pods/ with prev_kv, as kube-apiserver's
// watch cache does; the events it receives are counted. The objects of an earlier run are
// deleted and the objects created before the timed run.

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
)

const kubernetesNamespaces = 10
const kubernetesPrefix = "/registry/pods/"

type kubernetesResult struct {
	loadResult
	Lists          int                `json:"lists"`
	Writes         int                `json:"writes"`
	Conflicts      int64              `json:"conflicts"`
	WatchEvents    int64              `json:"watch_events"`
	ListLatencyMs  map[string]float64 `json:"list_latency_ms"`
	WriteLatencyMs map[string]float64 `json:"write_latency_ms"`
}

func kubernetesKey(n int) string {
	return fmt.Sprintf("%sns-%02d/pod-%07d", kubernetesPrefix, n%kubernetesNamespaces, n)
}

// kubernetesClient is one API-server-like client: the objects it owns and their revisions.
type kubernetesClient struct {
	kv       *clientv3.Client
	rng      *rand.Rand
	value    string
	owned    map[string]int64
	names    []string
	next     int // the next object number this client creates
	stride   int
	conflict *int64
}

func (k *kubernetesClient) create(ctx context.Context) error {
	key := kubernetesKey(k.next)
	k.next += k.stride
	resp, err := k.kv.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, k.value)).
		Commit()
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("create of %s found it existing", key)
	}
	k.owned[key] = resp.Header.Revision
	k.names = append(k.names, key)
	return nil
}

// pick returns one of the client's objects at random (its index in names).
func (k *kubernetesClient) pick() int { return k.rng.Intn(len(k.names)) }

func (k *kubernetesClient) update(ctx context.Context) error {
	key := k.names[k.pick()]
	resp, err := k.kv.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", k.owned[key])).
		Then(clientv3.OpPut(key, k.value)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return err
	}
	if resp.Succeeded {
		k.owned[key] = resp.Header.Revision
		return nil
	}
	atomic.AddInt64(k.conflict, 1)
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
		k.owned[key] = kvs[0].ModRevision
	}
	return nil
}

func (k *kubernetesClient) remove(ctx context.Context) error {
	i := k.pick()
	key := k.names[i]
	resp, err := k.kv.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", k.owned[key])).
		Then(clientv3.OpDelete(key)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		atomic.AddInt64(k.conflict, 1)
		return nil
	}
	delete(k.owned, key)
	k.names[i] = k.names[len(k.names)-1]
	k.names = k.names[:len(k.names)-1]
	return nil
}

func (k *kubernetesClient) list(ctx context.Context) error {
	ns := fmt.Sprintf("%sns-%02d/", kubernetesPrefix, k.rng.Intn(kubernetesNamespaces))
	_, err := k.kv.Get(ctx, ns, clientv3.WithRange(clientv3.GetPrefixRangeEnd(ns)), clientv3.WithLimit(500))
	return err
}

func kubernetesLoad(eps []string, clients, conns int, duration time.Duration, valueSize, keys int) kubernetesResult {
	if conns < 1 || clients < 1 || keys < clients {
		fail("--clients and --conns must be at least 1, and --keys at least --clients")
	}
	pool := make([]*clientv3.Client, conns)
	for i := range pool {
		pool[i] = newClient(eps)
		defer pool[i].Close()
	}
	var conflicts, watchEvents, errors int64
	var firstError atomic.Value
	noteError := func(err error) {
		if atomic.AddInt64(&errors, 1) == 1 {
			firstError.Store(err.Error())
		}
	}
	// A fresh start: the objects of an earlier run go.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	if _, err := pool[0].Delete(ctx, kubernetesPrefix, clientv3.WithPrefix()); err != nil {
		fail("clearing %s: %v", kubernetesPrefix, err)
	}
	cancel()
	value := strings.Repeat("v", valueSize)
	workers := make([]*kubernetesClient, clients)
	var setup sync.WaitGroup
	for c := range workers {
		workers[c] = &kubernetesClient{kv: pool[c%conns], rng: rand.New(rand.NewSource(int64(c) + 1)),
			value: value, owned: map[string]int64{}, next: c, stride: clients, conflict: &conflicts}
		setup.Add(1)
		go func(k *kubernetesClient) {
			defer setup.Done()
			for k.next < keys {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := k.create(ctx)
				cancel()
				if err != nil {
					fail("creating the objects: %v", err)
				}
			}
		}(workers[c])
	}
	setup.Wait()

	watchCtx, stopWatching := context.WithCancel(context.Background())
	var watching sync.WaitGroup
	for _, c := range pool {
		watching.Add(1)
		ch := c.Watch(watchCtx, kubernetesPrefix, clientv3.WithPrefix(), clientv3.WithPrevKV())
		go func() {
			defer watching.Done()
			for resp := range ch {
				atomic.AddInt64(&watchEvents, int64(len(resp.Events)))
			}
		}()
	}

	lists := make([][]time.Duration, clients)
	writes := make([][]time.Duration, clients)
	deadline := time.Now().Add(duration)
	start := time.Now()
	var wg sync.WaitGroup
	for c, k := range workers {
		wg.Add(1)
		go func(c int, k *kubernetesClient) {
			defer wg.Done()
			for time.Now().Before(deadline) {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				began := time.Now()
				var err error
				isList := k.rng.Float64() < 0.8
				if isList {
					err = k.list(ctx)
				} else {
					switch w := k.rng.Float64(); {
					case w < 0.90 && len(k.names) > 0:
						err = k.update(ctx)
					case w < 0.95 || len(k.names) == 0:
						err = k.create(ctx)
					default:
						err = k.remove(ctx)
					}
				}
				took := time.Since(began)
				cancel()
				if slowLog > 0 && took >= slowLog {
					fmt.Fprintf(os.Stderr, "slow %d %.2f ms\n", began.UnixMilli(), float64(took.Microseconds())/1000)
				}
				if err != nil {
					noteError(err)
					continue
				}
				if isList {
					lists[c] = append(lists[c], took)
				} else {
					writes[c] = append(writes[c], took)
				}
			}
		}(c, k)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	stopWatching()
	watching.Wait()

	var all, allLists, allWrites []time.Duration
	for c := range workers {
		allLists = append(allLists, lists[c]...)
		allWrites = append(allWrites, writes[c]...)
	}
	all = append(append(all, allLists...), allWrites...)
	r := kubernetesResult{
		loadResult: loadResult{Op: "kubernetes", Clients: clients, Conns: conns, Seconds: elapsed,
			Ops: len(all), Errors: errors, Throughput: float64(len(all)) / elapsed,
			LatencyMs: percentiles(all)},
		Lists: len(allLists), Writes: len(allWrites), Conflicts: conflicts,
		WatchEvents: atomic.LoadInt64(&watchEvents), ListLatencyMs: percentiles(allLists),
		WriteLatencyMs: percentiles(allWrites),
	}
	if e, ok := firstError.Load().(string); ok {
		r.FirstError = e
	}
	return r
}
