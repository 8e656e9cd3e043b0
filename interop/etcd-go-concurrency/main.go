// etcd-go-concurrency: checks that etcd's Go concurrency package (concurrency.Mutex and
// concurrency.Election, which build locks and elections from keys, leases and revisions on
// the client side) and the server-side Lock and Election services (v3lockpb, v3electionpb,
// which other languages' clients call) take part in the same locks and elections: each waits
// for the other, in both directions, and each sees the other's leader and values.
//
// It runs unchanged against etcd and against Flotilla, so its expectations are etcd's own
// behaviour. Built in GOPATH mode against Debian's golang-etcd-server-dev (no module
// download); see scripts/build-go.sh.
//
//	etcd-go-concurrency --endpoints 127.0.0.1:2379 --name run1
//
// Prints "ok: ..." for each check; on the first failure prints "FAIL: ..." and exits 1. The
// whole run is bounded (--limit).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
	"go.etcd.io/etcd/etcdserver/api/v3election/v3electionpb"
	"go.etcd.io/etcd/etcdserver/api/v3lock/v3lockpb"
	"go.etcd.io/etcd/mvcc/mvccpb"
	"go.uber.org/zap"
	"google.golang.org/grpc/grpclog"
)

func fail(format string, args ...interface{}) {
	fmt.Printf("FAIL: "+format+"\n", args...)
	os.Exit(1)
}

func ok(format string, args ...interface{}) {
	fmt.Printf("ok: "+format+"\n", args...)
}

func must(err error, what string) {
	if err != nil {
		fail("%s: %v", what, err)
	}
}

// waitPut returns once key is put, watching from revision rev on.
func waitPut(ctx context.Context, cli *clientv3.Client, prefix string, rev int64, key string) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for wr := range cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev)) {
		must(wr.Err(), "watching "+prefix)
		for _, ev := range wr.Events {
			if ev.Type == mvccpb.PUT && string(ev.Kv.Key) == key {
				return
			}
		}
	}
	fail("the watch for %s ended: %v", key, ctx.Err())
}

// notYet fails if done has already delivered.
func notYet(done <-chan error, what string) {
	select {
	case err := <-done:
		fail("%s returned while it should wait (err %v)", what, err)
	default:
	}
}

// await returns what done delivers, failing at the run's deadline.
func await(ctx context.Context, done <-chan error, what string) {
	select {
	case err := <-done:
		must(err, what)
	case <-ctx.Done():
		fail("%s did not return: %v", what, ctx.Err())
	}
}

func session(cli *clientv3.Client) *concurrency.Session {
	s, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
	must(err, "new session")
	return s
}

func grant(ctx context.Context, cli *clientv3.Client) clientv3.LeaseID {
	lease, err := cli.Grant(ctx, 30)
	must(err, "lease grant")
	return lease.ID
}

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated endpoints")
	name := flag.String("name", "interop", "prefix of the lock and election names (use a fresh one per run)")
	limit := flag.Duration("limit", 60*time.Second, "bound on the whole run")
	flag.Parse()
	grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, os.Stderr))

	ctx, cancel := context.WithTimeout(context.Background(), *limit)
	defer cancel()
	// The client's own retry warnings go nowhere: every failure is reported by a check.
	quiet := zap.NewProductionConfig()
	quiet.Level = zap.NewAtomicLevelAt(zap.FatalLevel)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(*endpoints, ","),
		DialTimeout: 5 * time.Second,
		LogConfig:   &quiet,
	})
	must(err, "connect")
	defer cli.Close()

	checkLock(ctx, cli, *name+"-lock")
	checkElection(ctx, cli, *name+"-election")
}

func checkLock(ctx context.Context, cli *clientv3.Client, name string) {
	locker := v3lockpb.NewLockClient(cli.ActiveConnection())

	// A Go Mutex holds the lock; a Lock-service caller waits for it.
	held := concurrency.NewMutex(session(cli), name)
	must(held.Lock(ctx), "Mutex.Lock")
	lease := grant(ctx, cli)
	var locked *v3lockpb.LockResponse
	done := make(chan error, 1)
	go func() {
		var err error
		locked, err = locker.Lock(ctx, &v3lockpb.LockRequest{Name: []byte(name), Lease: int64(lease)})
		done <- err
	}()
	serviceKey := fmt.Sprintf("%s/%x", name, lease)
	waitPut(ctx, cli, name+"/", held.Header().Revision+1, serviceKey)
	notYet(done, "Lock (while a Go Mutex holds the lock)")
	ok("a Lock call waits while a Go concurrency.Mutex holds the lock")
	must(held.Unlock(ctx), "Mutex.Unlock")
	await(ctx, done, "Lock")
	if string(locked.Key) != serviceKey {
		fail("Lock returned key %q, want %q", locked.Key, serviceKey)
	}
	ok("the Lock call gets the lock once the Mutex is unlocked, under key %s", serviceKey)

	// The Lock-service caller holds it; a Go Mutex waits for it.
	waiterSession := session(cli)
	waiter := concurrency.NewMutex(waiterSession, name)
	go func() { done <- waiter.Lock(ctx) }()
	waitPut(ctx, cli, name+"/", locked.Header.Revision+1, fmt.Sprintf("%s/%x", name, waiterSession.Lease()))
	notYet(done, "Mutex.Lock (while a Lock-service caller holds the lock)")
	ok("a Go concurrency.Mutex waits while a Lock-service caller holds the lock")
	_, err := locker.Unlock(ctx, &v3lockpb.UnlockRequest{Key: locked.Key})
	must(err, "Unlock")
	await(ctx, done, "Mutex.Lock")
	ok("the Go Mutex gets the lock once the Lock-service caller unlocks")
	must(waiter.Unlock(ctx), "Mutex.Unlock")
}

func checkElection(ctx context.Context, cli *clientv3.Client, name string) {
	elector := v3electionpb.NewElectionClient(cli.ActiveConnection())
	leaderValue := func() string {
		resp, err := elector.Leader(ctx, &v3electionpb.LeaderRequest{Name: []byte(name)})
		must(err, "Election.Leader")
		return string(resp.Kv.Value)
	}

	// A Go Election leads; the service reports it and a service campaign waits.
	goSession := session(cli)
	goElection := concurrency.NewElection(goSession, name)
	must(goElection.Campaign(ctx, "go-1"), "Election.Campaign")
	if v := leaderValue(); v != "go-1" {
		fail("the Election service reports leader value %q, want go-1", v)
	}
	ok("the Election service reports the Go campaigner as leader")
	observed, err := elector.Observe(ctx, &v3electionpb.LeaderRequest{Name: []byte(name)})
	must(err, "Election.Observe")
	expectObserved := func(want string) {
		resp, err := observed.Recv()
		must(err, "Observe stream")
		if string(resp.Kv.Value) != want {
			fail("Observe reported %q, want %q", resp.Kv.Value, want)
		}
	}
	expectObserved("go-1")

	lease := grant(ctx, cli)
	var campaigned *v3electionpb.CampaignResponse
	done := make(chan error, 1)
	go func() {
		var err error
		campaigned, err = elector.Campaign(ctx, &v3electionpb.CampaignRequest{
			Name: []byte(name), Lease: int64(lease), Value: []byte("svc-1"),
		})
		done <- err
	}()
	serviceKey := fmt.Sprintf("%s/%x", name, lease)
	waitPut(ctx, cli, name+"/", goElection.Header().Revision+1, serviceKey)
	notYet(done, "Campaign (while a Go Election leads)")
	ok("a Campaign call waits while a Go concurrency.Election leads")

	must(goElection.Proclaim(ctx, "go-2"), "Election.Proclaim")
	expectObserved("go-2")
	ok("the Election service's Observe sees the Go leader's Proclaim")
	must(goElection.Resign(ctx), "Election.Resign")
	await(ctx, done, "Campaign")
	if string(campaigned.Leader.Key) != serviceKey {
		fail("Campaign returned key %q, want %q", campaigned.Leader.Key, serviceKey)
	}
	expectObserved("svc-1")
	ok("the Campaign call leads once the Go leader resigns, under key %s", serviceKey)

	// The service's leader, seen and waited for by Go.
	goView, err := concurrency.NewElection(goSession, name).Leader(ctx)
	must(err, "Election.Leader (Go)")
	if v := string(goView.Kvs[0].Value); v != "svc-1" {
		fail("a Go Election reports leader value %q, want svc-1", v)
	}
	ok("a Go concurrency.Election reports the Campaign caller as leader")
	goObserved := goElection.Observe(ctx)
	expectGoObserved := func(want string) {
		select {
		case resp, open := <-goObserved:
			if !open {
				fail("the Go Observe channel closed")
			}
			if string(resp.Kvs[0].Value) != want {
				fail("Go Observe reported %q, want %q", resp.Kvs[0].Value, want)
			}
		case <-ctx.Done():
			fail("Go Observe reported nothing: %v", ctx.Err())
		}
	}
	expectGoObserved("svc-1")
	_, err = elector.Proclaim(ctx, &v3electionpb.ProclaimRequest{Leader: campaigned.Leader, Value: []byte("svc-2")})
	must(err, "Proclaim")
	expectGoObserved("svc-2")
	expectObserved("svc-2")
	ok("a Go Observe sees the Campaign caller's Proclaim")

	nextSession := session(cli)
	next := concurrency.NewElection(nextSession, name)
	go func() { done <- next.Campaign(ctx, "go-3") }()
	waitPut(ctx, cli, name+"/", campaigned.Header.Revision+1, fmt.Sprintf("%s/%x", name, nextSession.Lease()))
	notYet(done, "Election.Campaign (while a Campaign caller leads)")
	ok("a Go concurrency.Election waits while a Campaign caller leads")
	_, err = elector.Resign(ctx, &v3electionpb.ResignRequest{Leader: campaigned.Leader})
	must(err, "Resign")
	await(ctx, done, "Election.Campaign (Go)")
	expectGoObserved("go-3")
	expectObserved("go-3")
	ok("the Go campaigner leads once the Campaign caller resigns; both observers follow")
	_, err = elector.Proclaim(ctx, &v3electionpb.ProclaimRequest{Leader: campaigned.Leader, Value: []byte("stale")})
	if err == nil || !strings.Contains(err.Error(), "election: not leader") {
		fail("a resigned leader's Proclaim: got %v, want 'election: not leader'", err)
	}
	ok("a resigned leader cannot proclaim: %v", err)
	must(next.Resign(ctx), "Election.Resign")
}
