// Leases op (--op leases): many leases kept alive by many clients while the caller stalls the
// leader's disk (etcd issue #15247: a leader stuck in fdatasync revoked every lease). Judged
// from what the clients were told, not from what the server says of itself:
//
//   - Setup: --leases leases of --lease-ttl seconds are granted, each with one key
//     (leases/<id>) put under it.
//   - Keep-alive: --clients keepers, each with its own connection and LeaseKeepAlive stream
//     (as each clientv3.Client has one), spread over the endpoints, renew their share of the
//     leases every TTL/3 (clientv3's interval), evenly spread. For each lease the driver keeps
//     the send time of the latest renewal answered with a positive TTL: the server decided
//     after the request was sent, so it promised the lease at least until that time + TTL.
//     A renewal answered with TTL <= 0 says the lease is gone while it was being kept alive.
//   - A watch on leases/ records when each key's deletion (its lease's revocation) arrives.
//   - After half of --duration the driver prints "stall" and waits for "done" on stdin (the
//     caller stalls the leader's disk meanwhile); with --stall-pause=false it does not ask.
//   - Then the keepers stop at once, and the driver waits (up to --expiry-wait) for every key
//     to go.
//
// A deletion that arrives before its lease's promise is an early expiry (certainly: the
// deletion happened no later than its arrival). Past the promise, the lateness of each
// deletion is measured from the latest the promise can end: the latest answer's arrival + TTL,
// or the stop + TTL if a renewal was still unanswered then.
package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
	pb "go.etcd.io/etcd/etcdserver/etcdserverpb"
	"go.etcd.io/etcd/mvcc/mvccpb"
)

type leasesResult struct {
	Op         string  `json:"op"`
	Leases     int     `json:"leases"`
	TTLSeconds int64   `json:"ttl_seconds"`
	Keepers    int     `json:"keepers"`
	SetupMs    float64 `json:"setup_ms"`
	// Grants and puts of the setup that failed and were tried again.
	SetupRetries int64   `json:"setup_retries"`
	Seconds      float64 `json:"seconds"`
	// The caller's stall, from "stall" to its "done".
	StallMs      float64 `json:"stall_ms"`
	RenewalsSent int64   `json:"renewals_sent"`
	RenewalsOK   int64   `json:"renewals_ok"`
	// Renewals answered with TTL <= 0: the lease was gone while kept alive.
	RenewalsLost int64  `json:"renewals_lost"`
	StreamErrors int64  `json:"stream_errors"`
	FirstError   string `json:"first_error,omitempty"`
	// From a renewal's send to its answer.
	RenewalLatencyMs map[string]float64 `json:"renewal_latency_ms"`
	// Keys deleted while their leases were being kept alive, and of those, deleted before
	// the lease's promise (certainly early).
	DeletedWhileKept int    `json:"deleted_while_kept"`
	Early            int    `json:"early_expiries"`
	FirstEarly       string `json:"first_early,omitempty"`
	// After the keepers stopped: deletions seen, leases still there at the end of the wait,
	// and how late each deletion came past the latest end of its lease's promise.
	ExpiredAfterStop int                `json:"expired_after_stop"`
	NotExpired       int                `json:"not_expired"`
	LatenessMs       map[string]float64 `json:"lateness_ms"`
	// From the keepers' stop to the last deletion.
	AllGoneMs float64 `json:"all_gone_ms"`
	// The writes beside the keep-alives (so the leader's disk is busy when it stalls).
	Writers        int                `json:"writers"`
	Writes         int64              `json:"writes"`
	WriteErrors    int64              `json:"write_errors"`
	WriteLatencyMs map[string]float64 `json:"write_latency_ms"`
}

// leaseState is what the clients were told about one lease.
type leaseState struct {
	id  int64
	key string
	// Send times of renewals not yet answered, oldest first (the stream answers in order).
	pending []time.Time
	// The latest positive answer: its renewal's send time and the answer's arrival.
	promisedFrom, answeredAt time.Time
	deletedAt                time.Time
}

func leasesOp(eps []string, leases, keepers, writers int, ttlSeconds int64, duration, expiryWait time.Duration, stallPause bool) leasesResult {
	if leases < 1 || keepers < 1 || keepers > leases {
		fail("--leases must be at least --clients, and both at least 1")
	}
	ttl := time.Duration(ttlSeconds) * time.Second
	r := leasesResult{Op: "leases", Leases: leases, TTLSeconds: ttlSeconds, Keepers: keepers, Writers: writers}
	admin := newClient(eps)
	defer admin.Close()
	// A previous run's keys would confuse the watch.
	if _, err := admin.Delete(context.Background(), "leases/", clientv3.WithPrefix()); err != nil {
		fail("clearing leases/: %v", err)
	}

	var mu sync.Mutex // guards every leaseState and every keeper's list

	// The watch on the keys, from before the first grant.
	status, err := admin.Get(context.Background(), "leases/", clientv3.WithCountOnly())
	if err != nil {
		fail("reading the revision: %v", err)
	}
	byKey := make(map[string]*leaseState, leases)
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	deletions := 0
	allGone := make(chan struct{})
	watch := admin.Watch(watchCtx, "leases/", clientv3.WithPrefix(), clientv3.WithRev(status.Header.Revision+1))
	go func() {
		for resp := range watch {
			if watchCtx.Err() != nil {
				return
			}
			if err := resp.Err(); err != nil {
				fail("the watch on leases/ failed: %v", err)
			}
			at := time.Now()
			mu.Lock()
			for _, e := range resp.Events {
				if e.Type != mvccpb.DELETE {
					continue
				}
				if s, ok := byKey[string(e.Kv.Key)]; ok && s.deletedAt.IsZero() {
					s.deletedAt = at
					deletions++
					if deletions == leases {
						close(allGone)
					}
				}
			}
			mu.Unlock()
		}
	}()

	// The keepers, running from the start: a lease is kept alive from its grant on, so that
	// the setup (longer than a TTL with many leases) loses none.
	keepCtx, stopKeepers := context.WithCancel(context.Background())
	var latMu sync.Mutex
	var latencies []time.Duration
	var firstError atomic.Value
	var wg sync.WaitGroup
	lists := make([]*keeperList, keepers)
	for k := range lists {
		lists[k] = &keeperList{}
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			lat := keep(keepCtx, eps[k%len(eps)], lists[k], ttl, &mu, &r, &firstError)
			latMu.Lock()
			latencies = append(latencies, lat...)
			latMu.Unlock()
		}(k)
	}
	setupStart := time.Now()
	states, retries := grantLeases(eps, leases, ttlSeconds, func(i int, s *leaseState) {
		mu.Lock()
		byKey[s.key] = s
		lists[i%keepers].leases = append(lists[i%keepers].leases, s)
		mu.Unlock()
	})
	r.SetupMs = float64(time.Since(setupStart).Microseconds()) / 1000
	r.SetupRetries = retries

	writeLatencies := make(chan []time.Duration, writers)
	for w := 0; w < writers; w++ {
		go func(w int) {
			writeLatencies <- write(keepCtx, admin, w, &r)
		}(w)
	}
	start := time.Now()
	if stallPause {
		time.Sleep(duration / 2)
		controller := bufio.NewReader(os.Stdin)
		stallStart := time.Now()
		fmt.Println("stall")
		line, err := controller.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "done" {
			fail("the caller did not confirm the stall: %q %v", line, err)
		}
		r.StallMs = float64(time.Since(stallStart).Microseconds()) / 1000
	}
	if rest := duration - time.Since(start); rest > 0 {
		time.Sleep(rest)
	}
	stopKeepers()
	wg.Wait()
	var writes []time.Duration
	for w := 0; w < writers; w++ {
		writes = append(writes, <-writeLatencies...)
	}
	r.WriteLatencyMs = percentiles(writes)
	stopped := time.Now()
	r.Seconds = stopped.Sub(start).Seconds()
	r.RenewalLatencyMs = percentiles(latencies)
	if e, ok := firstError.Load().(string); ok {
		r.FirstError = e
	}

	// Every lease now runs out; wait for all of them to be revoked.
	select {
	case <-allGone:
	case <-time.After(expiryWait):
	}
	stopWatch()
	mu.Lock()
	defer mu.Unlock()
	var lateness []time.Duration
	var last time.Time
	for _, s := range states {
		switch {
		case s.deletedAt.IsZero():
			r.NotExpired++
		case s.deletedAt.Before(stopped):
			r.DeletedWhileKept++
		default:
			r.ExpiredAfterStop++
			// A renewal sent and not answered before the stop may still have been granted:
			// its promise ends by the stop + TTL at the latest.
			latestEnd := s.answeredAt.Add(ttl)
			if len(s.pending) > 0 && stopped.Add(ttl).After(latestEnd) {
				latestEnd = stopped.Add(ttl)
			}
			late := s.deletedAt.Sub(latestEnd)
			if late < 0 {
				late = 0
			}
			lateness = append(lateness, late)
		}
		if !s.deletedAt.IsZero() {
			if s.deletedAt.After(last) {
				last = s.deletedAt
			}
			if s.deletedAt.Before(s.promisedFrom.Add(ttl)) {
				r.Early++
				if r.FirstEarly == "" {
					r.FirstEarly = fmt.Sprintf("lease %x deleted %v before the promise of its renewal sent at %s",
						s.id, s.promisedFrom.Add(ttl).Sub(s.deletedAt), s.promisedFrom.Format(time.StampMicro))
				}
			}
		}
	}
	r.LatenessMs = percentiles(lateness)
	if r.NotExpired == 0 && last.After(stopped) {
		r.AllGoneMs = float64(last.Sub(stopped).Microseconds()) / 1000
	}
	return r
}

// retry runs `attempt` with a 10 s deadline until it succeeds, at most 10 times, counting
// the failures in `retries`.
func retry(retries *int64, what string, attempt func(context.Context) error) {
	for try := 1; ; try++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := attempt(ctx)
		cancel()
		if err == nil {
			return
		}
		atomic.AddInt64(retries, 1)
		if try == 10 {
			fail("%s failed 10 times: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// grantLeases grants the leases and puts one key under each, 64 at a time, handing each to
// `granted` once its key is written. Returns them and the failed attempts retried.
func grantLeases(eps []string, leases int, ttlSeconds int64, granted func(int, *leaseState)) ([]*leaseState, int64) {
	var retries int64
	const workers = 64
	pool := make([]*clientv3.Client, 8)
	for i := range pool {
		pool[i] = newClient(eps)
		defer pool[i].Close()
	}
	states := make([]*leaseState, leases)
	next := int64(-1)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(c *clientv3.Client) {
			defer wg.Done()
			for {
				i := atomic.AddInt64(&next, 1)
				if i >= int64(leases) {
					return
				}
				// A request that fails is tried again, as any client would (a grant that timed
				// out may have been granted: that lease, unknown here, expires on its own).
				var grant *clientv3.LeaseGrantResponse
				var asked time.Time
				retry(&retries, fmt.Sprintf("granting lease %d", i), func(ctx context.Context) (err error) {
					asked = time.Now()
					grant, err = c.Grant(ctx, ttlSeconds)
					return err
				})
				key := fmt.Sprintf("leases/%016x", grant.ID)
				retry(&retries, "putting "+key, func(ctx context.Context) error {
					_, err := c.Put(ctx, key, "", clientv3.WithLease(grant.ID))
					return err
				})
				states[i] = &leaseState{id: int64(grant.ID), key: key, promisedFrom: asked, answeredAt: time.Now()}
				granted(int(i), states[i])
			}
		}(pool[w%len(pool)])
	}
	wg.Wait()
	return states, retries
}

// write puts 256-byte values to its own keys until ctx ends; returns the latencies.
func write(ctx context.Context, c *clientv3.Client, w int, r *leasesResult) []time.Duration {
	value := strings.Repeat("v", 256)
	var latencies []time.Duration
	for i := 0; ctx.Err() == nil; i++ {
		attempt, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		began := time.Now()
		_, err := c.Put(attempt, fmt.Sprintf("leases-load/%03d/%04d", w, i%1000), value)
		cancel()
		if err != nil {
			atomic.AddInt64(&r.WriteErrors, 1)
			continue
		}
		atomic.AddInt64(&r.Writes, 1)
		latencies = append(latencies, time.Since(began))
	}
	return latencies
}

// keeperList is one keeper's leases, growing while the setup grants them (guarded by the
// driver's mutex).
type keeperList struct {
	leases []*leaseState
}

// keep renews the leases of its list over one connection to `endpoint` until ctx ends, each
// every TTL/3, spread evenly; a broken stream is reopened. Returns the renewals' latencies.
func keep(ctx context.Context, endpoint string, list *keeperList, ttl time.Duration, mu *sync.Mutex, r *leasesResult, firstError *atomic.Value) []time.Duration {
	c := newClient([]string{endpoint})
	defer c.Close()
	lease := pb.NewLeaseClient(c.ActiveConnection())
	period := ttl / 3
	var latencies []time.Duration
	noteError := func(err error) {
		atomic.AddInt64(&r.StreamErrors, 1)
		firstError.CompareAndSwap(nil, err.Error())
	}
	next := time.Now()
	i := 0
	for ctx.Err() == nil {
		stream, err := lease.LeaseKeepAlive(ctx)
		if err != nil {
			if ctx.Err() == nil {
				noteError(err)
				time.Sleep(100 * time.Millisecond)
			}
			continue
		}
		mu.Lock()
		for _, s := range list.leases {
			s.pending = s.pending[:0] // answers on the old stream will not come
		}
		mu.Unlock()
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				resp, err := stream.Recv()
				if err != nil {
					if ctx.Err() == nil {
						noteError(err)
					}
					return
				}
				at := time.Now()
				mu.Lock()
				s := lookup(list, resp.ID)
				if s != nil && len(s.pending) > 0 {
					sent := s.pending[0]
					s.pending = s.pending[1:]
					latencies = append(latencies, at.Sub(sent))
					if resp.TTL > 0 {
						atomic.AddInt64(&r.RenewalsOK, 1)
						if sent.After(s.promisedFrom) {
							s.promisedFrom, s.answeredAt = sent, at
						}
					} else {
						atomic.AddInt64(&r.RenewalsLost, 1)
					}
				}
				mu.Unlock()
			}
		}()
		for ctx.Err() == nil {
			if wait := time.Until(next); wait > 0 {
				select {
				case <-ctx.Done():
				case <-done:
				case <-time.After(wait):
				}
			}
			if ctx.Err() != nil || isClosed(done) {
				break
			}
			mu.Lock()
			// Each lease once a period: while the setup still grants, fewer leases, fewer
			// renewals.
			have := len(list.leases)
			if have < 1 {
				have = 1
			}
			next = next.Add(period / time.Duration(have))
			if len(list.leases) == 0 {
				mu.Unlock()
				continue
			}
			s := list.leases[i%len(list.leases)]
			i++
			s.pending = append(s.pending, time.Now())
			mu.Unlock()
			if err := stream.Send(&pb.LeaseKeepAliveRequest{ID: s.id}); err != nil {
				break
			}
			atomic.AddInt64(&r.RenewalsSent, 1)
		}
		_ = stream.CloseSend()
		<-done
		if ctx.Err() == nil {
			time.Sleep(100 * time.Millisecond)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	return latencies
}

// lookup finds a lease of the list by id (a keeper has about a hundred: a scan is cheap).
func lookup(list *keeperList, id int64) *leaseState {
	for _, s := range list.leases {
		if s.id == id {
			return s
		}
	}
	return nil
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
