// Watch fan-out (--op fanout): W watchers on the prefix the writers put under, spread over S
// watch streams, while the put load runs; then every watcher must have received every put, in
// revision order, with no gap and no repeat. The server's memory per watcher is read from
// /proc (--rss-pid, the member at the endpoint) before the watchers exist and once all are
// created.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/clientv3"
	"google.golang.org/grpc/metadata"
)

// watchStreamsPerConn: clientv3 opens one gRPC watch stream per distinct context metadata on
// a connection; the streams are spread over connections of this many streams each.
const watchStreamsPerConn = 10

type fanoutResult struct {
	loadResult
	Watchers        int   `json:"watchers"`
	WatchStreams    int   `json:"watch_streams"`
	EventsExpected  int64 `json:"events_expected_per_watcher"`
	EventsDelivered int64 `json:"events_delivered"`
	// Responses that carried events: a watcher that lags gets several revisions in one.
	ResponsesDelivered int64 `json:"responses_delivered"`
	// Watchers that saw exactly the expected revisions, in order.
	WatchersComplete int `json:"watchers_complete"`
	// The first violation seen (a gap, a repeat, an out-of-order or missing event), if any.
	FirstViolation string `json:"first_violation,omitempty"`
	// Milliseconds from the last acknowledged put until every watcher had its event.
	DrainMs          float64 `json:"drain_ms"`
	RssBeforeBytes   int64   `json:"rss_before_bytes"`
	RssWatchingBytes int64   `json:"rss_watching_bytes"`
	BytesPerWatcher  float64 `json:"bytes_per_watcher"`
}

// watcher is one watch on the prefix, checked as its events arrive.
type watcher struct {
	next      int64 // the revision the next event must have
	last      int64 // the last revision seen
	delivered int64
	responses int64
	violation string
}

func (w *watcher) observe(events []*clientv3.Event) {
	if len(events) > 0 {
		w.responses++
	}
	for _, e := range events {
		rev := e.Kv.ModRevision
		if w.violation == "" && rev != w.next {
			w.violation = fmt.Sprintf("expected revision %d, got %d", w.next, rev)
		}
		w.next = rev + 1
		w.last = rev
		w.delivered++
	}
}

func fanout(eps []string, clients, conns int, duration time.Duration, valueSize, keys, watchers, streams, rssPid int) fanoutResult {
	if watchers < 1 || streams < 1 || streams > watchers {
		fail("--watchers must be at least --watch-streams, which must be at least 1")
	}
	admin := newClient(eps)
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	resp, err := admin.Get(ctx, "bench/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	cancel()
	if err != nil {
		fail("cannot read the start revision: %v", err)
	}
	start := resp.Header.Revision + 1
	rssBefore := rss(rssPid)

	watchConns := make([]*clientv3.Client, (streams+watchStreamsPerConn-1)/watchStreamsPerConn)
	for i := range watchConns {
		watchConns[i] = newClient(eps)
		defer watchConns[i].Close()
	}
	watchCtx, stopWatching := context.WithCancel(context.Background())
	defer stopWatching()
	all := make([]*watcher, watchers)
	var created, done sync.WaitGroup
	var mu sync.Mutex // guards every watcher's fields once the load runs
	for i := 0; i < watchers; i++ {
		stream := i % streams
		// Distinct metadata: a stream of its own on its connection.
		ctx := metadata.AppendToOutgoingContext(watchCtx, "fanout-stream", strconv.Itoa(stream))
		ch := watchConns[stream/watchStreamsPerConn].Watch(ctx, "bench/", clientv3.WithPrefix(),
			clientv3.WithRev(start), clientv3.WithCreatedNotify())
		w := &watcher{next: start}
		all[i] = w
		created.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			first := true
			for r := range ch {
				if first {
					created.Done()
					first = false
				}
				if r.Canceled || r.Err() != nil {
					mu.Lock()
					if w.violation == "" {
						w.violation = fmt.Sprintf("watch ended: %v", r.Err())
					}
					mu.Unlock()
					return
				}
				mu.Lock()
				w.observe(r.Events)
				mu.Unlock()
			}
			if first {
				created.Done()
			}
		}()
	}
	created.Wait()
	rssWatching := rss(rssPid)

	result := fanoutResult{loadResult: load(eps, "put", clients, conns, duration, valueSize, keys),
		Watchers: watchers, WatchStreams: streams}
	result.Op = "fanout"
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	resp, err = admin.Get(ctx, "bench/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	cancel()
	if err != nil {
		fail("cannot read the end revision: %v", err)
	}
	end := resp.Header.Revision
	loadEnded := time.Now()
	// Every watcher drains to the end revision, or the wait gives up and reports it.
	drainLimit := time.Now().Add(120 * time.Second)
	for {
		mu.Lock()
		behind := 0
		for _, w := range all {
			if w.last < end && w.violation == "" {
				behind++
			}
		}
		mu.Unlock()
		if behind == 0 || time.Now().After(drainLimit) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	result.DrainMs = float64(time.Since(loadEnded).Microseconds()) / 1000
	stopWatching()
	done.Wait()
	result.EventsExpected = end - start + 1
	for _, w := range all {
		result.EventsDelivered += w.delivered
		result.ResponsesDelivered += w.responses
		switch {
		case w.violation != "":
			if result.FirstViolation == "" {
				result.FirstViolation = w.violation
			}
		case w.last != end || w.delivered != result.EventsExpected:
			if result.FirstViolation == "" {
				result.FirstViolation = fmt.Sprintf("a watcher got %d of %d events (last revision %d of %d)",
					w.delivered, result.EventsExpected, w.last, end)
			}
		default:
			result.WatchersComplete++
		}
	}
	result.RssBeforeBytes, result.RssWatchingBytes = rssBefore, rssWatching
	if rssPid > 0 {
		result.BytesPerWatcher = float64(rssWatching-rssBefore) / float64(watchers)
	}
	return result
}

// rss is the resident set of process pid in bytes, 0 if pid is 0.
func rss(pid int) int64 {
	if pid == 0 {
		return 0
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		fail("cannot read the memory of process %d: %v", pid, err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if fields := strings.Fields(line); len(fields) >= 2 && fields[0] == "VmRSS:" {
			kib, _ := strconv.ParseInt(fields[1], 10, 64)
			return kib * 1024
		}
	}
	fail("no VmRSS for process %d", pid)
	return 0
}
