// Command convergence measures the control plane of flatnetd in a lab: how
// long after a new node claims its lease every peer has a route to it (and
// how long after a lease is deleted every peer has dropped the route), and
// how much memory an agent uses, for clusters of several sizes. Real agents
// run in the lab's nodes; the rest of the cluster is lease-only entries
// written to etcd, each a real etcd datastore client claiming a subnet.
//
//	go run ./bench/convergence -agents 2 -sizes 3,50 -samples 20
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/bench/internal/machine"
	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/datastore"
	etcdstore "github.com/flatnet-io/flatnet/pkg/datastore/etcd"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
)

func main() {
	agents := flag.Int("agents", 2, "real nodes running flatnetd (the rest of each cluster is lease-only)")
	sizesFlag := flag.String("sizes", "3,50", "cluster sizes to measure (agents + lease-only nodes)")
	samples := flag.Int("samples", 20, "new-node events measured per size")
	binDir := flag.String("bin-dir", "bin", "directory with flatnet, flatnetd, flatnetctl")
	flag.Parse()
	var sizes []int
	for _, f := range strings.Split(*sizesFlag, ",") {
		n, err := strconv.Atoi(f)
		if err != nil || n <= *agents || n > 140 {
			log.Fatalf("size %q: want %d..140 (the cluster size, counting the node that joins)", f, *agents+1)
		}
		sizes = append(sizes, n)
	}
	bin, _ := filepath.Abs(*binDir)
	root, err := os.MkdirTemp("", "flatnet-conv-")
	if err != nil {
		log.Fatal(err)
	}
	name := fmt.Sprintf("cv%d", os.Getpid()%100000)
	cleanup := func() { lab.Down(root, name); os.RemoveAll(root) }
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() { <-sig; cleanup(); os.Exit(1) }()
	defer cleanup()

	// log.Fatal skips deferred calls: every failure from here on cleans up first.
	fatal := func(err error) { cleanup(); log.Fatal(err) }
	ctx := context.Background()
	s, err := lab.Up(ctx, lab.Options{Name: name, Root: root, BinDir: bin, Nodes: *agents, Backend: "host-gw", LeaseTTL: time.Minute})
	if err != nil {
		fatal(err)
	}
	b := &bench{s: s}
	if err := b.open(); err != nil {
		fatal(err)
	}
	fmt.Printf("flatnetd control plane, %d real agents (host-gw), etcd datastore; load average %s\n\n", *agents, machine.LoadAvg())
	fmt.Printf("%-6s %-34s %-34s %s\n", "nodes", "new lease -> route on all peers", "lease deleted -> route gone", "agent RSS")
	fmt.Printf("%-6s %-34s %-34s %s\n", "", "p50 / p90 / max (ms)", "p50 / p90 / max (ms)", "avg / max (MB)")
	for _, size := range sizes {
		if err := b.grow(ctx, size-1); err != nil { // the sample node makes it size
			fatal(err)
		}
		var add, del []time.Duration
		for i := 0; i < *samples; i++ {
			a, d, err := b.sample(ctx, i)
			if err != nil {
				fatal(err)
			}
			add, del = append(add, a), append(del, d)
		}
		avg, mx := b.rss()
		fmt.Printf("%-6d %-34s %-34s %.1f / %.1f\n", size, stats(add), stats(del), avg, mx)
	}
}

type bench struct {
	s      *lab.State
	hub    ns.NetNS
	fakes  []*etcdstore.Store
	mu     sync.Mutex
	seen   map[string][]time.Time // dst -> time each node saw the route appear
	gone   map[string][]time.Time
	nextIP int
}

func (b *bench) dial(ctx context.Context, addr string) (net.Conn, error) {
	return probe.Dial(ctx, b.hub, addr)
}

// open watches route changes in every real node.
func (b *bench) open() error {
	var err error
	if b.hub, err = ns.GetNS(nsutil.Path(b.s.Hub.NetNS)); err != nil {
		return err
	}
	b.seen, b.gone = map[string][]time.Time{}, map[string][]time.Time{}
	for _, n := range b.s.Nodes {
		h, err := netns.GetFromPath(nsutil.Path(n.NetNS))
		if err != nil {
			return err
		}
		ch := make(chan netlink.RouteUpdate, 1024)
		if err := netlink.RouteSubscribeWithOptions(ch, nil, netlink.RouteSubscribeOptions{Namespace: &h}); err != nil {
			return err
		}
		go func() {
			for u := range ch {
				if u.Protocol != backend.RouteProtocol || u.Dst == nil {
					continue
				}
				now := time.Now()
				b.mu.Lock()
				switch u.Type {
				case unix.RTM_NEWROUTE:
					b.seen[u.Dst.String()] = append(b.seen[u.Dst.String()], now)
				case unix.RTM_DELROUTE:
					b.gone[u.Dst.String()] = append(b.gone[u.Dst.String()], now)
				}
				b.mu.Unlock()
			}
		}()
	}
	return nil
}

// fake claims a subnet for a lease-only node.
func (b *bench) fake(ctx context.Context, name string) (*etcdstore.Store, datastore.Lease, error) {
	st, err := etcdstore.New(etcdstore.Config{
		Endpoints: []string{b.s.EtcdURL}, ClusterCIDR: netip.MustParsePrefix(b.s.ClusterCIDR),
		LeaseTTL: time.Minute, Dial: b.dial, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		return nil, datastore.Lease{}, err
	}
	b.nextIP++
	ip := netip.AddrFrom4([4]byte{10, 99, 1, byte(100 + b.nextIP)}) // on the lab's segment: host-gw can route to it
	l, err := st.Register(ctx, datastore.NodeInfo{Name: name, UnderlayIP: ip, Backend: "host-gw"})
	return st, l, err
}

// grow adds lease-only nodes until the cluster has n nodes, and waits
// until every agent routes to all of them.
func (b *bench) grow(ctx context.Context, n int) error {
	for len(b.s.Nodes)+len(b.fakes) < n {
		st, _, err := b.fake(ctx, fmt.Sprintf("lease-only-%d", len(b.fakes)))
		if err != nil {
			return err
		}
		b.fakes = append(b.fakes, st)
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		ok := true
		for _, node := range b.s.Nodes {
			st, err := b.s.AgentStatus(ctx, node)
			if err != nil || len(st.Peers) != len(b.s.Nodes)+len(b.fakes)-1 {
				ok = false
				break
			}
			for _, p := range st.Peers {
				ok = ok && p.Programmed
			}
		}
		if ok {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("agents did not program %d peers in time", len(b.s.Nodes)+len(b.fakes)-1)
}

// sample adds one node, waits until every agent routes to it, deletes its
// lease, waits until every agent dropped the route.
func (b *bench) sample(ctx context.Context, i int) (add, del time.Duration, err error) {
	t0 := time.Now()
	st, l, err := b.fake(ctx, fmt.Sprintf("sample-%d", i))
	if err != nil {
		return 0, 0, err
	}
	dst := l.Subnet.String()
	add, err = b.waitAll(b.seen, dst, t0)
	if err != nil {
		return 0, 0, err
	}
	// Delete the key the way an expiring lease does, then stop the store
	// (it confirms its key only every few seconds, so it cannot put it
	// back in between).
	t1 := time.Now()
	_, err = st.Client().Delete(ctx, st.Key(l.Subnet))
	st.Close()
	if err != nil {
		return 0, 0, err
	}
	del, err = b.waitAll(b.gone, dst, t1)
	return add, del, err
}

// waitAll waits until every real node reported an event for dst after t0
// and returns the time of the last one.
func (b *bench) waitAll(events map[string][]time.Time, dst string, t0 time.Time) (time.Duration, error) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		b.mu.Lock()
		var last time.Time
		count := 0
		for _, t := range events[dst] {
			if t.After(t0) {
				count++
				if t.After(last) {
					last = t
				}
			}
		}
		b.mu.Unlock()
		if count >= len(b.s.Nodes) {
			return last.Sub(t0), nil
		}
		time.Sleep(time.Millisecond)
	}
	return 0, fmt.Errorf("route event for %s not seen on every node", dst)
}

func (b *bench) rss() (avg, max float64) {
	for _, n := range b.s.Nodes {
		data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.Agent.PID))
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
				kb, _ := strconv.ParseFloat(f[1], 64)
				mb := kb / 1024
				avg += mb / float64(len(b.s.Nodes))
				if mb > max {
					max = mb
				}
			}
		}
	}
	return avg, max
}

func stats(d []time.Duration) string {
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) float64 {
		i := int(p*float64(len(s))+0.999999) - 1
		return float64(s[max(i, 0)].Microseconds()) / 1000
	}
	return fmt.Sprintf("%.1f / %.1f / %.1f", q(.5), q(.9), q(1))
}
