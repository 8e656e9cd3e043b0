// kubernetes-contract: the request shapes kube-apiserver's etcd3 storage layer sends, through
// etcd's own Go client (clientv3, the library kube-apiserver links), each checked against
// what etcd answers: create, update and delete guarded by mod_revision, get at a revision,
// paginated lists pinned to the first page's revision, count-only lists, compacted
// revisions, prefix watches from a revision with prev_kv and progress requests, the
// compaction protocol on compact_rev_key, and one lease shared by many keys.
//
// It runs unchanged against etcd and against Flotilla, so its expectations are etcd's own
// behaviour. Built in GOPATH mode against Debian's golang-etcd-server-dev; see
// scripts/build-go.sh.
//
//	kubernetes-contract --endpoints 127.0.0.1:2379 --prefix /run1
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
	"go.etcd.io/etcd/etcdserver/api/v3rpc/rpctypes"
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

func expect(cond bool, format string, args ...interface{}) {
	if !cond {
		fail(format, args...)
	}
}

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated endpoints")
	prefix := flag.String("prefix", "/k8s", "key prefix of this run (use a fresh one per run)")
	limit := flag.Duration("limit", 60*time.Second, "bound on the whole run")
	flag.Parse()
	grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, os.Stderr))

	ctx, cancel := context.WithTimeout(context.Background(), *limit)
	defer cancel()
	quiet := zap.NewProductionConfig()
	quiet.Level = zap.NewAtomicLevelAt(zap.FatalLevel)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(*endpoints, ","),
		DialTimeout: 5 * time.Second,
		LogConfig:   &quiet,
	})
	must(err, "connect")
	defer cli.Close()

	checkWrites(ctx, cli, *prefix+"/registry/configmaps/default/")
	checkLists(ctx, cli, *prefix+"/registry/pods/")
	checkWatch(ctx, cli, *prefix+"/registry/services/")
	checkCompaction(ctx, cli, *prefix+"/compact_rev_key")
	checkSharedLease(ctx, cli, *prefix+"/registry/events/")
}

// checkWrites: kube-apiserver's create, update, delete and get at a revision.
func checkWrites(ctx context.Context, cli *clientv3.Client, dir string) {
	key := dir + "cm"
	lease, err := cli.Grant(ctx, 60)
	must(err, "lease grant")

	// create: If mod_revision(k) = 0 Then Put [lease].
	create := func() *clientv3.TxnResponse {
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, "v1", clientv3.WithLease(lease.ID))).
			Commit()
		must(err, "create")
		return resp
	}
	created := create()
	expect(created.Succeeded, "create of a new key did not succeed")
	rev1 := created.Header.Revision
	expect(!create().Succeeded, "a second create of the same key succeeded")
	ok("create: If mod_revision=0 Then Put succeeds once")

	// update: If mod_revision(k) = rev Then Put Else Get.
	update := func(rev int64, value string) *clientv3.TxnResponse {
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, value)).
			Else(clientv3.OpGet(key)).
			Commit()
		must(err, "update")
		return resp
	}
	updated := update(rev1, "v2")
	expect(updated.Succeeded, "an update at the current mod_revision failed")
	rev2 := updated.Header.Revision
	expect(rev2 > rev1, "the update's revision %d is not after %d", rev2, rev1)
	stale := update(rev1, "v3")
	expect(!stale.Succeeded, "an update at a stale mod_revision succeeded")
	current := stale.Responses[0].GetResponseRange().Kvs
	expect(len(current) == 1 && string(current[0].Value) == "v2" && current[0].ModRevision == rev2,
		"a failed update's Else Get returned %v", current)
	ok("update: If mod_revision=rev Then Put Else Get, the conflict answered with the current object")

	// get at a revision.
	old, err := cli.Get(ctx, key, clientv3.WithRev(rev1))
	must(err, "get at a revision")
	expect(len(old.Kvs) == 1 && string(old.Kvs[0].Value) == "v1" && old.Kvs[0].Lease == int64(lease.ID),
		"get at revision %d returned %v", rev1, old.Kvs)
	ok("get at a revision returns the object as it was, with its lease")

	// delete: If mod_revision(k) = rev Then Delete Else Get.
	remove := func(rev int64) *clientv3.TxnResponse {
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpDelete(key, clientv3.WithPrevKV())).
			Else(clientv3.OpGet(key)).
			Commit()
		must(err, "delete")
		return resp
	}
	expect(!remove(rev1).Succeeded, "a delete at a stale mod_revision succeeded")
	deleted := remove(rev2)
	expect(deleted.Succeeded, "a delete at the current mod_revision failed")
	gone := deleted.Responses[0].GetResponseDeleteRange()
	expect(gone.Deleted == 1 && len(gone.PrevKvs) == 1 && string(gone.PrevKvs[0].Value) == "v2",
		"the delete answered %v", gone)
	ok("delete: If mod_revision=rev Then Delete Else Get, with the deleted object")
}

// checkLists: paginated lists pinned to the first page's revision, count-only lists, and a
// list at a compacted revision.
func checkLists(ctx context.Context, cli *clientv3.Client, dir string) {
	const pods = 25
	for i := 0; i < pods; i++ {
		_, err := cli.Put(ctx, fmt.Sprintf("%spod-%02d", dir, i), "spec")
		must(err, "put")
	}
	end := clientv3.GetPrefixRangeEnd(dir)
	page := func(from string, rev int64) *clientv3.GetResponse {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(10)}
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := cli.Get(ctx, from, opts...)
		must(err, "list page")
		return resp
	}
	first := page(dir, 0)
	pinned := first.Header.Revision
	expect(len(first.Kvs) == 10 && first.More && first.Count == pods,
		"first page: %d kvs, more %v, count %d", len(first.Kvs), first.More, first.Count)
	// The store changes between pages; later pages still see the first page's revision.
	_, err := cli.Put(ctx, dir+"pod-00a", "added after the first page")
	must(err, "put")
	_, err = cli.Delete(ctx, dir+"pod-20")
	must(err, "delete")
	var seen []string
	for _, kv := range first.Kvs {
		seen = append(seen, string(kv.Key))
	}
	next := first
	for next.More {
		from := string(next.Kvs[len(next.Kvs)-1].Key) + "\x00"
		next = page(from, pinned)
		expect(next.Header.Revision >= pinned, "a later page's header revision went back")
		expect(next.Count == int64(pods-len(seen)),
			"a page from %q counts %d keys, want %d", from, next.Count, pods-len(seen))
		for _, kv := range next.Kvs {
			seen = append(seen, string(kv.Key))
		}
	}
	expect(len(seen) == pods, "the pages hold %d keys, want %d", len(seen), pods)
	for i, key := range seen {
		expect(key == fmt.Sprintf("%spod-%02d", dir, i), "page key %d is %q", i, key)
	}
	ok("paginated list: limit, continue key = last key + \\x00, pinned revision, more and count")

	counted, err := cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithCountOnly())
	must(err, "count")
	expect(counted.Count == pods && len(counted.Kvs) == 0,
		"count-only: count %d with %d kvs", counted.Count, len(counted.Kvs))
	ok("count-only list")

	now, err := cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithCountOnly())
	must(err, "get")
	_, err = cli.Compact(ctx, now.Header.Revision)
	must(err, "compact")
	_, err = cli.Get(ctx, dir, clientv3.WithRange(end), clientv3.WithLimit(10), clientv3.WithRev(pinned))
	expect(err == rpctypes.ErrCompacted, "a list at a compacted revision answered %v, want %v",
		err, rpctypes.ErrCompacted)
	ok("a list at a compacted revision: %v", err)
}

// checkWatch: a prefix watch from a revision with prev_kv, and a progress request.
func checkWatch(ctx context.Context, cli *clientv3.Client, dir string) {
	start, err := cli.Put(ctx, dir+"svc", "v1")
	must(err, "put")
	_, err = cli.Put(ctx, dir+"svc", "v2")
	must(err, "put")
	_, err = cli.Delete(ctx, dir+"svc")
	must(err, "delete")
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	watch := cli.Watch(wctx, dir, clientv3.WithPrefix(), clientv3.WithRev(start.Header.Revision+1),
		clientv3.WithPrevKV(), clientv3.WithProgressNotify())
	var events []*clientv3.Event
	for len(events) < 2 {
		select {
		case resp, open := <-watch:
			expect(open, "the watch closed: %v", resp.Err())
			must(resp.Err(), "watch")
			events = append(events, resp.Events...)
		case <-ctx.Done():
			fail("the watch delivered %d of 2 events", len(events))
		}
	}
	expect(events[0].Type == mvccpb.PUT && string(events[0].Kv.Value) == "v2" &&
		events[0].PrevKv != nil && string(events[0].PrevKv.Value) == "v1",
		"first event %v", events[0])
	expect(events[1].Type == mvccpb.DELETE && events[1].PrevKv != nil &&
		string(events[1].PrevKv.Value) == "v2", "second event %v", events[1])
	ok("prefix watch from a revision with prev_kv replays the history in order")

	// kube-apiserver's consistent reads from its watch cache wait for a progress
	// notification at or after the current revision.
	latest, err := cli.Put(ctx, "/elsewhere", "moves the revision")
	must(err, "put")
	must(cli.RequestProgress(wctx), "request progress")
	for {
		select {
		case resp, open := <-watch:
			expect(open, "the watch closed: %v", resp.Err())
			must(resp.Err(), "watch")
			expect(len(resp.Events) == 0, "an event outside the prefix arrived: %v", resp.Events)
			if resp.IsProgressNotify() && resp.Header.Revision >= latest.Header.Revision {
				ok("RequestProgress: a progress notification at revision %d (>= %d)",
					resp.Header.Revision, latest.Header.Revision)
				return
			}
		case <-ctx.Done():
			fail("no progress notification at or after revision %d", latest.Header.Revision)
		}
	}
}

// checkCompaction: kube-apiserver's compaction protocol, which lets one of several API
// servers compact each interval.
func checkCompaction(ctx context.Context, cli *clientv3.Client, key string) {
	try := func(version int64, rev int64) *clientv3.TxnResponse {
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.Version(key), "=", version)).
			Then(clientv3.OpPut(key, fmt.Sprint(rev))).
			Else(clientv3.OpGet(key)).
			Commit()
		must(err, "compaction txn")
		return resp
	}
	first := try(0, 1)
	expect(first.Succeeded, "the first compaction claim failed")
	now, err := cli.Get(ctx, key)
	must(err, "get")
	_, err = cli.Compact(ctx, now.Header.Revision)
	must(err, "compact")
	again := try(0, 2)
	expect(!again.Succeeded, "a second claim at the same version succeeded")
	kvs := again.Responses[0].GetResponseRange().Kvs
	expect(len(kvs) == 1 && kvs[0].Version == 1, "the losing claim read %v", kvs)
	expect(try(1, 3).Succeeded, "a claim at the current version failed")
	ok("compaction: If version(compact_rev_key)=v Then Put Else Get, then Compact")
}

// checkSharedLease: one lease for many keys, as kube-apiserver attaches events.
func checkSharedLease(ctx context.Context, cli *clientv3.Client, dir string) {
	lease, err := cli.Grant(ctx, 60)
	must(err, "lease grant")
	const events = 12
	for i := 0; i < events; i++ {
		_, err := cli.Put(ctx, fmt.Sprintf("%sev-%02d", dir, i), "event", clientv3.WithLease(lease.ID))
		must(err, "put with lease")
	}
	ttl, err := cli.TimeToLive(ctx, lease.ID, clientv3.WithAttachedKeys())
	must(err, "time to live")
	expect(len(ttl.Keys) == events && ttl.TTL > 0, "the lease lists %d keys (ttl %d)", len(ttl.Keys), ttl.TTL)
	_, err = cli.Revoke(ctx, lease.ID)
	must(err, "revoke")
	left, err := cli.Get(ctx, dir, clientv3.WithPrefix(), clientv3.WithCountOnly())
	must(err, "count")
	expect(left.Count == 0, "%d keys outlived their lease", left.Count)
	ok("one lease shared by %d keys: listed, and all deleted with it", events)
}
