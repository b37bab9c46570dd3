package etcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/datastore"
	"github.com/flatnet-io/flatnet/pkg/etcdserver"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

var cluster = netip.MustParsePrefix("10.244.0.0/16")

// ---- test helpers ----

type env struct {
	t    *testing.T
	dir  string
	srv  *etcdserver.Server
	url  string
	logs *testutil.Logs
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), logs: testutil.NewLogs(t)}
	e.start("", "")
	return e
}

func (e *env) start(clientURL, peerURL string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := etcdserver.Start(ctx, etcdserver.Config{Dir: e.dir, ClientURL: clientURL, PeerURL: peerURL, UnsafeNoFsync: true})
	if err != nil {
		e.t.Fatal(err)
	}
	e.srv, e.url = srv, srv.ClientURL()
	e.t.Cleanup(func() { srv.Stop() })
}

func (e *env) logger() *slog.Logger { return e.logs.Logger() }

// store makes a Store on e's etcd with fast timings; mod adjusts its config.
func (e *env) store(mod func(*Config)) *Store {
	e.t.Helper()
	cfg := Config{Endpoints: []string{e.url}, ClusterCIDR: cluster, Logger: e.logger()}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	s.opTimeout = 2 * time.Second
	s.minBackoff = 20 * time.Millisecond
	s.maxBackoff = 200 * time.Millisecond
	s.probeEvery = 100 * time.Millisecond
	e.t.Cleanup(func() { s.Close() })
	return s
}

// ctx is a context cancelled at the end of the test (before stores close).
func (e *env) ctx(d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	e.t.Cleanup(cancel)
	return ctx, cancel
}

func (e *env) client() *clientv3.Client {
	e.t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{e.url}, Logger: zap.NewNop()})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

func node(name string, ip string) datastore.NodeInfo {
	return datastore.NodeInfo{Name: name, UnderlayIP: netip.MustParseAddr(ip), Backend: "host-gw"}
}

// recvUntil reads snapshots until one satisfies ok.
func recvUntil(t *testing.T, ch <-chan []datastore.Lease, d time.Duration, what string, ok func([]datastore.Lease) bool) []datastore.Lease {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	var last []datastore.Lease
	for {
		select {
		case s, open := <-ch:
			if !open {
				t.Fatalf("watch channel closed while waiting for %s", what)
			}
			last = s
			if ok(s) {
				return s
			}
		case <-timer.C:
			t.Fatalf("timed out after %s waiting for a snapshot with %s; last: %v", d, what, last)
		}
	}
}

func byNode(ls []datastore.Lease) map[string]datastore.Lease {
	m := map[string]datastore.Lease{}
	for _, l := range ls {
		m[l.Node] = l
	}
	return m
}

func (e *env) registerOK(ctx context.Context, s *Store, n datastore.NodeInfo) datastore.Lease {
	e.t.Helper()
	l, err := s.Register(ctx, n)
	if err != nil {
		e.t.Fatalf("Register %s: %v", n.Name, err)
	}
	if !s.LeaseHeld() {
		e.t.Fatalf("Register %s succeeded but LeaseHeld is false", n.Name)
	}
	return l
}

// ---- tests ----

func TestConcurrentRegisterGetsDistinctSubnets(t *testing.T) {
	for _, n := range []int{5, 20} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			e := newEnv(t)
			ctx, _ := e.ctx(60 * time.Second)
			stores := make([]*Store, n)
			for i := range stores {
				stores[i] = e.store(nil)
			}
			leases := make([]datastore.Lease, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					leases[i], errs[i] = stores[i].Register(ctx, node(fmt.Sprintf("node-%02d", i), fmt.Sprintf("192.0.2.%d", i+1)))
				})
			}
			wg.Wait()
			seen := map[netip.Prefix]string{}
			for i, l := range leases {
				if errs[i] != nil {
					t.Fatalf("node-%02d: %v", i, errs[i])
				}
				if l.Subnet.Bits() != 24 || !cluster.Contains(l.Subnet.Addr()) || cidr.ValidateSubnet(l.Subnet) != nil {
					t.Errorf("node-%02d got %s, not a /24 of %s", i, l.Subnet, cluster)
				}
				if other, dup := seen[l.Subnet]; dup {
					t.Errorf("%s given to both %s and %s", l.Subnet, other, l.Node)
				}
				seen[l.Subnet] = l.Node
			}
			// Everyone takes the lowest free subnet and nothing is released:
			// exactly the first n subnets are used, no holes.
			for i := range n {
				if p := netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i)); seen[p] == "" {
					t.Errorf("%s unused: %v", p, seen)
				}
			}

			// A watcher sees exactly these leases.
			ch, err := e.store(nil).Watch(ctx)
			if err != nil {
				t.Fatal(err)
			}
			snap := recvUntil(t, ch, 10*time.Second, "all nodes", func(s []datastore.Lease) bool { return len(s) == n })
			for _, l := range leases {
				if got := byNode(snap)[l.Node]; got != l {
					t.Errorf("watch has %+v for %s, Register returned %+v", got, l.Node, l)
				}
			}
		})
	}
}

func TestRestartKeepsSubnetAndUpdatesInfo(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	e.registerOK(ctx, e.store(nil), node("other", "192.0.2.2"))

	ctx1, cancel1 := context.WithCancel(ctx)
	s1 := e.store(nil)
	first := node("n1", "192.0.2.1")
	first.PreferredSubnet = netip.MustParsePrefix("10.244.9.0/24")
	l1 := e.registerOK(ctx1, s1, first)
	if l1.Subnet != first.PreferredSubnet {
		t.Fatalf("got %s, want preferred %s", l1.Subnet, first.PreferredSubnet)
	}
	key := "/flatnet/subnets/10.244.9.0-24"
	raw := e.client()
	before, err := raw.Get(ctx, key)
	if err != nil || len(before.Kvs) != 1 {
		t.Fatalf("key %s: %v %v", key, before, err)
	}

	// The agent dies (its ctx ends, no revoke) and comes back with a new
	// underlay IP and no memory of its subnet.
	cancel1()
	s1.Close()
	if s1.LeaseHeld() {
		t.Error("LeaseHeld true after the store was closed")
	}
	s2 := e.store(nil)
	l2 := e.registerOK(ctx, s2, node("n1", "192.0.2.99"))
	if l2.Subnet != l1.Subnet {
		t.Fatalf("restarted node got %s, want its old %s", l2.Subnet, l1.Subnet)
	}
	if l2.UnderlayIP != netip.MustParseAddr("192.0.2.99") {
		t.Fatalf("underlay IP %s not updated", l2.UnderlayIP)
	}
	after, err := raw.Get(ctx, key)
	if err != nil || len(after.Kvs) != 1 {
		t.Fatalf("key %s after restart: %v %v", key, after, err)
	}
	if !strings.Contains(string(after.Kvs[0].Value), `"underlayIP":"192.0.2.99"`) {
		t.Errorf("etcd value not updated: %s", after.Kvs[0].Value)
	}
	if after.Kvs[0].Lease == before.Kvs[0].Lease {
		t.Errorf("key still on the old etcd lease %x", before.Kvs[0].Lease)
	}

	ch, err := e.store(nil).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	snap := recvUntil(t, ch, 10*time.Second, "n1 and other", func(s []datastore.Lease) bool { return len(s) == 2 })
	if got := byNode(snap)["n1"]; got != l2 {
		t.Errorf("watch: %+v, want %+v", got, l2)
	}
}

func TestPreferredSubnet(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	want := netip.MustParsePrefix("10.244.7.0/24")

	a := node("a", "192.0.2.1")
	a.PreferredSubnet = want
	if l := e.registerOK(ctx, e.store(nil), a); l.Subnet != want {
		t.Errorf("a: got %s, want preferred %s", l.Subnet, want)
	}
	b := node("b", "192.0.2.2") // prefers a's subnet: gets the lowest free one
	b.PreferredSubnet = want
	if l := e.registerOK(ctx, e.store(nil), b); l.Subnet != netip.MustParsePrefix("10.244.0.0/24") {
		t.Errorf("b: got %s, want 10.244.0.0/24", l.Subnet)
	}
	c := node("c", "192.0.2.3") // prefers a subnet outside the cluster: ignored
	c.PreferredSubnet = netip.MustParsePrefix("10.99.0.0/24")
	if l := e.registerOK(ctx, e.store(nil), c); l.Subnet != netip.MustParsePrefix("10.244.1.0/24") {
		t.Errorf("c: got %s, want 10.244.1.0/24", l.Subnet)
	}
	if e.logs.Count(slog.LevelWarn, "ignoring preferred subnet", "10.99.0.0/24") == 0 {
		t.Error("no warning about the unusable preferred subnet")
	}
}

func TestExhaustion(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	small := func(c *Config) { c.ClusterCIDR = netip.MustParsePrefix("10.250.0.0/22") }

	cancels := make([]context.CancelFunc, 4)
	stores := make([]*Store, 4)
	leases := make([]datastore.Lease, 4)
	for i := range 4 {
		var nctx context.Context
		nctx, cancels[i] = context.WithCancel(ctx)
		stores[i] = e.store(small)
		leases[i] = e.registerOK(nctx, stores[i], node(fmt.Sprintf("n%d", i), fmt.Sprintf("192.0.2.%d", i+1)))
	}

	// The fifth keeps trying until its ctx ends, then reports exhaustion.
	s5 := e.store(small)
	tctx, tcancel := context.WithTimeout(ctx, time.Second)
	_, err := s5.Register(tctx, node("n5", "192.0.2.5"))
	tcancel()
	if !errors.Is(err, datastore.ErrExhausted) || !strings.Contains(err.Error(), "10.250.0.0/22") {
		t.Fatalf("err = %v, want ErrExhausted naming 10.250.0.0/22", err)
	}
	warned := e.logs.Count(slog.LevelWarn, "cannot claim a pod subnet yet", "n5", "10.250.0.0/22")
	if warned < 2 {
		t.Fatalf("%d retry warnings for n5, want >= 2", warned)
	}
	if s5.LeaseHeld() {
		t.Fatal("LeaseHeld true without a lease")
	}

	// It succeeds when a subnet is released while it retries.
	type result struct {
		l   datastore.Lease
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := s5.Register(ctx, node("n5", "192.0.2.5"))
		done <- result{l, err}
	}()
	testutil.WaitFor(t, 10*time.Second, "n5 retrying again", func() bool {
		return e.logs.Count(slog.LevelWarn, "cannot claim a pod subnet yet", "n5") > warned
	})
	// n2 leaves for good: its agent stops and an operator revokes its lease.
	cancels[2]()
	stores[2].Close()
	raw := e.client()
	kv, err := raw.Get(ctx, "/flatnet/subnets/"+leases[2].Subnet.Addr().String()+"-24")
	if err != nil || len(kv.Kvs) != 1 {
		t.Fatalf("n2's key: %v %v", kv, err)
	}
	if _, err := raw.Revoke(ctx, clientv3.LeaseID(kv.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("n5 after release: %v", r.err)
		}
		if r.l.Subnet != leases[2].Subnet {
			t.Fatalf("n5 got %s, want the released %s", r.l.Subnet, leases[2].Subnet)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("n5 did not get the released subnet")
	}
	if !s5.LeaseHeld() {
		t.Error("n5: LeaseHeld false after success")
	}
}

func TestLeaseExpiresAfterOwnerStops(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	short := func(c *Config) { c.LeaseTTL = 2 * time.Second }

	stay := e.store(short)
	e.registerOK(ctx, stay, node("stay", "192.0.2.1"))
	octx, ocancel := context.WithCancel(ctx)
	owner := e.store(short)
	gone := e.registerOK(octx, owner, node("gone", "192.0.2.2"))

	ch, err := e.store(nil).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	recvUntil(t, ch, 10*time.Second, "both nodes", func(s []datastore.Lease) bool { return len(s) == 2 })

	start := time.Now()
	ocancel()
	snap := recvUntil(t, ch, 15*time.Second, "gone expired", func(s []datastore.Lease) bool {
		_, ok := byNode(s)["gone"]
		return !ok
	})
	t.Logf("key expired %s after the owner stopped", time.Since(start).Round(time.Millisecond))
	if _, ok := byNode(snap)["stay"]; !ok || len(snap) != 1 {
		t.Errorf("snapshot %v, want only stay (kept alive past its 2s TTL)", snap)
	}
	if !stay.LeaseHeld() {
		t.Error("stay: LeaseHeld false")
	}
	resp, err := e.client().Get(ctx, "/flatnet/subnets/"+gone.Subnet.Addr().String()+"-24")
	if err != nil || len(resp.Kvs) != 0 {
		t.Errorf("gone's key still there: %v %v", resp, err)
	}
}

func TestConfigMismatch(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	e.registerOK(ctx, e.store(nil), node("a", "192.0.2.1"))

	for _, tc := range []struct {
		mod  func(*Config)
		want []string
	}{
		{func(c *Config) { c.ClusterCIDR = netip.MustParsePrefix("10.245.0.0/16") }, []string{"clusterCIDR=10.244.0.0/16", "clusterCIDR=10.245.0.0/16"}},
		{func(c *Config) { c.SubnetLen = 25 }, []string{"subnetLen=24", "subnetLen=25"}},
	} {
		_, err := e.store(tc.mod).Register(ctx, node("b", "192.0.2.2"))
		if !errors.Is(err, ErrConfigMismatch) {
			t.Fatalf("err = %v, want ErrConfigMismatch", err)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not mention %s", err, w)
			}
		}
	}
	if n := e.logs.Count(slog.LevelWarn, "will retry"); n != 0 {
		t.Errorf("a config mismatch was retried (%d warnings)", n)
	}
	resp, err := e.client().Get(ctx, "/flatnet/config")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != `{"clusterCIDR":"10.244.0.0/16","subnetLen":24}` {
		t.Errorf("config key: %v %v", resp, err)
	}
}

func TestInvalidConfigFailsAtOnce(t *testing.T) {
	ep, err := etcdserver.FreeURL() // nothing listens: any etcd call would time out
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no cidr", Config{}, "cluster CIDR is missing"},
		{"ipv6", Config{ClusterCIDR: netip.MustParsePrefix("fd00::/64")}, "only IPv4"},
		{"host bits", Config{ClusterCIDR: netip.MustParsePrefix("10.244.1.0/16")}, "not a network address"},
		{"len = cluster", Config{ClusterCIDR: cluster, SubnetLen: 16}, "/16 does not fit"},
		{"len < cluster", Config{ClusterCIDR: cluster, SubnetLen: 8}, "/8 does not fit"},
		{"len > 30", Config{ClusterCIDR: cluster, SubnetLen: 31}, "/31 does not fit"},
		{"no endpoints", Config{ClusterCIDR: cluster, Endpoints: []string{}}, "no endpoints"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.cfg.Endpoints == nil {
				tc.cfg.Endpoints = []string{ep}
			}
			s, err := New(tc.cfg)
			if err == nil {
				s.Close()
				t.Fatal("New accepted an invalid config")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %q, want it to mention %q", err, tc.want)
			}
		})
	}

	s, err := New(Config{Endpoints: []string{ep}, ClusterCIDR: cluster})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, n := range []datastore.NodeInfo{
		{UnderlayIP: netip.MustParseAddr("192.0.2.1")},
		{Name: "n1"},
		{Name: "n1", UnderlayIP: netip.MustParseAddr("0.0.0.0")},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := s.Register(ctx, n)
		cancel()
		if err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Register(%+v) = %v, want an immediate validation error", n, err)
		} else if !strings.Contains(err.Error(), "node name is empty") && !strings.Contains(err.Error(), "invalid underlay IP") {
			t.Errorf("Register(%+v): unclear error %q", n, err)
		}
	}
}

func TestEtcdRestart(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(90 * time.Second)
	short := func(c *Config) { c.LeaseTTL = 3 * time.Second }

	a := e.store(short)
	a.opTimeout = 300 * time.Millisecond
	la := e.registerOK(ctx, a, node("a", "192.0.2.1"))
	w := e.store(nil)
	w.opTimeout = 300 * time.Millisecond
	ch, err := w.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	recvUntil(t, ch, 10*time.Second, "a", func(s []datastore.Lease) bool { return len(s) == 1 })

	clientURL, peerURL := e.srv.ClientURL(), e.srv.PeerURL()
	if err := e.srv.Stop(); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 10*time.Second, "LeaseHeld false while etcd is down", func() bool { return !a.LeaseHeld() })
	select {
	case s := <-ch:
		t.Fatalf("watch sent %v while etcd was down", s)
	default:
	}

	e.start(clientURL, peerURL)
	testutil.WaitFor(t, 20*time.Second, "LeaseHeld true after etcd returned", a.LeaseHeld)

	// The watcher delivers changes again.
	lb := e.registerOK(ctx, e.store(nil), node("b", "192.0.2.2"))
	snap := recvUntil(t, ch, 20*time.Second, "a and b", func(s []datastore.Lease) bool { return len(s) == 2 })
	if byNode(snap)["a"] != la || byNode(snap)["b"] != lb {
		t.Errorf("snapshot %v, want %v and %v", snap, la, lb)
	}
	resp, err := e.client().Get(ctx, "/flatnet/subnets/"+la.Subnet.Addr().String()+"-24")
	if err != nil || len(resp.Kvs) != 1 || !strings.Contains(string(resp.Kvs[0].Value), `"node":"a"`) {
		t.Errorf("a's key after the restart: %v %v", resp, err)
	}
}

func TestUnreachableEtcdIsRetried(t *testing.T) {
	ep, err := etcdserver.FreeURL() // nothing listens here
	if err != nil {
		t.Fatal(err)
	}
	l := testutil.NewLogs(t)
	s, err := New(Config{Endpoints: []string{ep}, ClusterCIDR: cluster, Logger: l.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.opTimeout = 200 * time.Millisecond
	s.minBackoff = 20 * time.Millisecond
	s.maxBackoff = 100 * time.Millisecond

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err = s.Register(ctx, node("n1", "192.0.2.1"))
	if err == nil {
		t.Fatal("Register succeeded without etcd")
	}
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), ep) {
		t.Errorf("err = %q, want a deadline error naming %s", err, ep)
	}
	if n := l.Count(slog.LevelWarn, "cannot claim a pod subnet yet", "is etcd reachable?"); n < 2 {
		t.Errorf("%d retry warnings, want >= 2", n)
	}
	if s.LeaseHeld() {
		t.Error("LeaseHeld true without etcd")
	}
}

func TestWatchIgnoresMalformedKeysAndClosesOnCancel(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	raw := e.client()
	for k, v := range map[string]string{
		"/flatnet/subnets/garbage":       "{}",
		"/flatnet/subnets/10.244.5.0-24": "not json",
		"/flatnet/subnets/10.99.0.0-24":  `{"node":"x","subnet":"10.99.0.0/24"}`,  // outside the cluster
		"/flatnet/subnets/10.244.6.0-24": `{"node":"y","subnet":"10.244.7.0/24"}`, // key and value disagree
	} {
		if _, err := raw.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	l := e.registerOK(ctx, e.store(nil), node("good", "192.0.2.1"))

	wctx, wcancel := context.WithCancel(ctx)
	ch, err := e.store(nil).Watch(wctx)
	if err != nil {
		t.Fatal(err)
	}
	snap := recvUntil(t, ch, 10*time.Second, "good", func(s []datastore.Lease) bool { return len(s) > 0 })
	if !slices.Equal(snap, []datastore.Lease{l}) {
		t.Errorf("snapshot %v, want only %v", snap, l)
	}
	if n := e.logs.Count(slog.LevelWarn, "ignoring malformed lease key"); n != 4 {
		t.Errorf("%d malformed-key warnings, want 4", n)
	}
	wcancel()
	testutil.WaitFor(t, 10*time.Second, "watch channel closed", func() bool {
		select {
		case _, open := <-ch:
			return !open
		default:
			return false
		}
	})
}

// registeredA registers node a and returns its store, its key, a raw
// client and the etcd lease the key is attached to.
func (e *env) registeredA(ctx context.Context) (*Store, datastore.Lease, string, *clientv3.Client, clientv3.LeaseID) {
	s := e.store(nil)
	l := e.registerOK(ctx, s, node("a", "192.0.2.1"))
	key := "/flatnet/subnets/" + l.Subnet.Addr().String() + "-24"
	raw := e.client()
	return s, l, key, raw, e.leaseOf(ctx, raw, key)
}

// leaseOf returns the etcd lease a key is attached to.
func (e *env) leaseOf(ctx context.Context, raw *clientv3.Client, key string) clientv3.LeaseID {
	e.t.Helper()
	resp, err := raw.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		e.t.Fatalf("key %s: %v %v", key, resp, err)
	}
	return clientv3.LeaseID(resp.Kvs[0].Lease)
}

func TestLostLeaseIsReestablished(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	s, _, key, raw, old := e.registeredA(ctx)

	// The lease expires behind the agent's back (as after a long outage).
	if _, err := raw.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 10*time.Second, "the key back on a new lease", func() bool {
		resp, err := raw.Get(ctx, key)
		return err == nil && len(resp.Kvs) == 1 && clientv3.LeaseID(resp.Kvs[0].Lease) != old &&
			strings.Contains(string(resp.Kvs[0].Value), `"node":"a"`)
	})
	testutil.WaitFor(t, 10*time.Second, "LeaseHeld", s.LeaseHeld)
	// The key is back before the log line is written.
	testutil.WaitFor(t, 10*time.Second, "a log about re-establishing the lease", func() bool {
		return e.logs.Count(slog.LevelInfo, "subnet lease re-established", "node=a") > 0
	})
}

func TestLostSubnetTakenByAnotherNodeIsLeftAlone(t *testing.T) {
	e := newEnv(t)
	ctx, _ := e.ctx(60 * time.Second)
	s, l, key, raw, old := e.registeredA(ctx)

	// While a's lease was expired, node b took the subnet.
	g, err := raw.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	bval := fmt.Sprintf(`{"node":"b","subnet":"%s","underlayIP":"192.0.2.2","backend":"host-gw"}`, l.Subnet)
	if _, err := raw.Put(ctx, key, bval, clientv3.WithLease(g.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 10*time.Second, "an error naming the new holder", func() bool {
		return e.logs.Count(slog.LevelError, "another node now holds this node's subnet", "holder=b") > 0
	})
	if s.LeaseHeld() {
		t.Error("LeaseHeld true while b holds a's subnet")
	}
	// a keeps retrying (in case b goes away) but never overwrites b.
	n := e.logs.Count(slog.LevelError, "another node now holds")
	resp, err := raw.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != bval {
		t.Errorf("b's key was touched: %v %v", resp, err)
	}
	if n != 1 {
		t.Errorf("%d error logs for one takeover, want 1 (no log spam)", n)
	}
}
