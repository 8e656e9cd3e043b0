// Large lists under a write load (--op lists): L listers each read a whole prefix of K keys
// (unary Range, as a Kubernetes LIST without pagination does) over and over, while the put
// load runs on other keys. Each list must return every key (the count and the keys checked).
// The serving member's memory is sampled from /proc (--rss-pid) every 20 ms: its peak RSS
// during the run against its RSS before, which is what many concurrent big lists cost it.
package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
)

// listPrefix: the listed keys; the put load writes under bench/, so every list has K keys.
const listPrefix = "list/"

// fillOpsPerTxn: keys written per transaction while filling (etcd's default --max-txn-ops is
// 128).
const fillOpsPerTxn = 100

type listsResult struct {
	loadResult
	Listers       int     `json:"listers"`
	ListKeys      int     `json:"list_keys"`
	ListValueSize int     `json:"list_value_size"`
	Lists         int     `json:"lists"`
	ListErrors    int64   `json:"list_errors"`
	ListFirstErr  string  `json:"list_first_error,omitempty"`
	ListsShort    int64   `json:"lists_short"` // lists that came back without every key
	ListsPerSec   float64 `json:"lists_per_second"`
	// Bytes of keys and values the lists delivered per second.
	ListBytesPerSec float64            `json:"list_bytes_per_second"`
	ListLatencyMs   map[string]float64 `json:"list_latency_ms"`
	RssBeforeBytes  int64              `json:"rss_before_bytes"`
	RssPeakBytes    int64              `json:"rss_peak_bytes"`
}

func lists(eps []string, clients, conns int, duration time.Duration, valueSize, keys, listers, listKeys, listValueSize, rssPid int) listsResult {
	if listers < 1 || listKeys < 1 {
		fail("--listers and --list-keys must be at least 1")
	}
	fillList(eps, listKeys, listValueSize)
	rssBefore := rss(rssPid)
	peak := rssBefore
	sampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-sampling:
				return
			case <-tick.C:
				if now := rss(rssPid); now > peak {
					peak = now
				}
			}
		}
	}()

	var listErrors, short int64
	var firstError atomic.Value
	latencies := make([][]time.Duration, listers)
	var delivered int64
	deadline := time.Now().Add(duration)
	var wg sync.WaitGroup
	for l := 0; l < listers; l++ {
		wg.Add(1)
		go func(l int) {
			defer wg.Done()
			// A connection of its own: a list's response does not queue behind another's.
			c := newClient(eps)
			defer c.Close()
			for time.Now().Before(deadline) {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				began := time.Now()
				resp, err := c.Get(ctx, listPrefix, clientv3.WithPrefix())
				took := time.Since(began)
				cancel()
				if err != nil {
					if atomic.AddInt64(&listErrors, 1) == 1 {
						firstError.Store(err.Error())
					}
					continue
				}
				if len(resp.Kvs) != listKeys || resp.Count != int64(listKeys) || resp.More {
					atomic.AddInt64(&short, 1)
				}
				var bytes int64
				for _, kv := range resp.Kvs {
					bytes += int64(len(kv.Key) + len(kv.Value))
				}
				atomic.AddInt64(&delivered, bytes)
				latencies[l] = append(latencies[l], took)
			}
		}(l)
	}
	result := listsResult{loadResult: load(eps, "put", clients, conns, duration, valueSize, keys)}
	listsEnded := time.Now()
	wg.Wait()
	close(sampling)
	<-sampled
	// Lists that were still running when the put load ended count, over the time they took.
	seconds := result.Seconds + time.Since(listsEnded).Seconds()
	var all []time.Duration
	for _, l := range latencies {
		all = append(all, l...)
	}
	result.Op = "lists"
	result.Listers, result.ListKeys, result.ListValueSize = listers, listKeys, listValueSize
	result.Lists, result.ListErrors, result.ListsShort = len(all), listErrors, short
	result.ListsPerSec = float64(len(all)) / seconds
	result.ListBytesPerSec = float64(delivered) / seconds
	result.ListLatencyMs = percentiles(all)
	if e, ok := firstError.Load().(string); ok {
		result.ListFirstErr = e
	}
	result.RssBeforeBytes, result.RssPeakBytes = rssBefore, peak
	return result
}

// fillList writes the listed keys unless the prefix already holds exactly that many.
func fillList(eps []string, listKeys, listValueSize int) {
	c := newClient(eps)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	resp, err := c.Get(ctx, listPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	cancel()
	if err != nil {
		fail("cannot count the listed keys: %v", err)
	}
	if resp.Count == int64(listKeys) {
		return
	}
	value := strings.Repeat("l", listValueSize)
	var next int64
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				first := atomic.AddInt64(&next, fillOpsPerTxn) - fillOpsPerTxn
				if first >= int64(listKeys) {
					return
				}
				var ops []clientv3.Op
				for i := first; i < first+fillOpsPerTxn && i < int64(listKeys); i++ {
					ops = append(ops, clientv3.OpPut(fmt.Sprintf("%s%08d", listPrefix, i), value))
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := c.Txn(ctx).Then(ops...).Commit()
				cancel()
				if err != nil {
					fail("cannot fill the listed keys: %v", err)
				}
			}
		}()
	}
	wg.Wait()
}
