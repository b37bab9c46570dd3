package etcdserver

import (
	"context"
	"errors"
	"net"
	"net/url"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

func TestStartStopRestartKeepsData(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()

	s, err := Start(ctx, Config{Dir: dir, UnsafeNoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	put(ctx, t, s.ClientURL(), "k", "v1")

	// An open watch stream must not delay Stop (a graceful stop waits 5s).
	c := client(t, s.ClientURL())
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	wch := c.Watch(wctx, "k", clientv3.WithRev(1))
	select { // the stream is established once it delivers the put
	case wr := <-wch:
		if len(wr.Events) != 1 {
			t.Fatalf("watch: %+v", wr)
		}
	case <-ctx.Done():
		t.Fatal("watch delivered nothing")
	}
	start := time.Now()
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Stop took %s with an open watch", d)
	}
	if err := s.Stop(); err != nil { // idempotent
		t.Fatalf("second Stop: %v", err)
	}
	for _, u := range []string{s.ClientURL(), s.PeerURL()} {
		pu, _ := url.Parse(u)
		l, err := net.Listen("tcp", pu.Host)
		if err != nil {
			t.Fatalf("port of %s not released after Stop: %v", u, err)
		}
		l.Close()
	}

	s2, err := Start(ctx, Config{Dir: dir, ClientURL: s.ClientURL(), PeerURL: s.PeerURL(), UnsafeNoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Stop()
	if got := get(ctx, t, s2.ClientURL(), "k"); got != "v1" {
		t.Fatalf("after restart k = %q, want v1", got)
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	ctx := context.Background()
	if _, err := Start(ctx, Config{}); err == nil {
		t.Fatal("Start without Dir succeeded")
	}
	if _, err := Start(ctx, Config{Dir: t.TempDir(), ClientURL: "127.0.0.1"}); err == nil {
		t.Fatal("Start with a URL without scheme/port succeeded")
	}
}

func TestStartHonoursContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s, err := Start(ctx, Config{Dir: t.TempDir(), UnsafeNoFsync: true})
	if err == nil {
		s.Stop()
		t.Fatal("Start with a cancelled ctx succeeded")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func client(t *testing.T, ep string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func put(ctx context.Context, t *testing.T, ep, k, v string) {
	t.Helper()
	if _, err := client(t, ep).Put(ctx, k, v); err != nil {
		t.Fatal(err)
	}
}

func get(ctx context.Context, t *testing.T, ep, k string) string {
	t.Helper()
	r, err := client(t, ep).Get(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Kvs) != 1 {
		t.Fatalf("%s: %d keys", k, len(r.Kvs))
	}
	return string(r.Kvs[0].Value)
}
