package nat_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/nat"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// Addresses of the test bed.
var (
	clusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	podIP       = netip.MustParseAddr("10.244.1.2")  // pod behind the node
	nodeGW      = netip.MustParseAddr("10.244.1.1")  // node's address on the pod link
	nodeIP      = netip.MustParseAddr("10.99.0.11")  // node underlay
	peerIP      = netip.MustParseAddr("10.99.0.12")  // peer node underlay
	peerPodIP   = netip.MustParseAddr("10.244.2.1")  // in the cluster CIDR, behind the peer
	inetIP      = netip.MustParseAddr("198.18.0.2")  // outside the cluster
	routerIP    = netip.MustParseAddr("10.99.0.1")   // the internet host's underlay address
	unrelatedIP = netip.MustParseAddr("10.99.0.200") // a node IP nobody has
)

const whoamiPort = "8080"

func hostPort(a netip.Addr) string { return net.JoinHostPort(a.String(), whoamiPort) }

// bed is one node with a pod behind it, a peer node and an internet host,
// the three hosts on one underlay switch:
//
//	pod eth0 10.244.1.2/24 --- pod0 10.244.1.1/24 [node] up0 10.99.0.11/24 ---+
//	                  [peer] up0 10.99.0.12/24, flatnet0 10.244.2.1/24 -------+-- br0 [lan]
//	                  [inet] up0 10.99.0.1/24 + 198.18.0.2/24 ----------------+
//
// The node routes 198.18.0.0/24 via the internet host and 10.244.2.0/24 via
// the peer; the peer routes 10.244.1.0/24 via the node. The internet host has
// no route to 10.244.0.0/16: a reply to an unmasqueraded pod is lost.
type bed struct {
	node, pod, peer, inet ns.NetNS
	tbl                   *nat.Table
	rules                 nat.Rules
}

func newBed(t *testing.T) *bed {
	t.Helper()
	b := &bed{
		node: testutil.NewNS(t, "node"),
		pod:  testutil.NewNS(t, "pod"),
		peer: testutil.NewNS(t, "peer"),
		inet: testutil.NewNS(t, "inet"),
	}
	lan := testutil.NewNS(t, "lan")

	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	withHandle(t, lan, func(h *netlink.Handle) error {
		if err := h.LinkAdd(br); err != nil {
			return err
		}
		return h.LinkSetUp(br)
	})
	for name, host := range map[string]ns.NetNS{"node": b.node, "peer": b.peer, "inet": b.inet} {
		addVeth(t, lan, name, host, "up0")
		withHandle(t, lan, func(h *netlink.Handle) error {
			l, err := h.LinkByName(name)
			if err != nil {
				return err
			}
			if err := h.LinkSetMaster(l, br); err != nil {
				return err
			}
			return h.LinkSetUp(l)
		})
	}
	addVeth(t, b.node, "pod0", b.pod, "eth0")

	addAddr(t, b.node, "pod0", "10.244.1.1/24")
	addAddr(t, b.node, "up0", "10.99.0.11/24")
	addRoute(t, b.node, "198.18.0.0/24", routerIP)
	addRoute(t, b.node, "10.244.2.0/24", peerIP)

	addAddr(t, b.pod, "eth0", "10.244.1.2/24")
	addRoute(t, b.pod, "0.0.0.0/0", nodeGW)

	addAddr(t, b.peer, "up0", "10.99.0.12/24")
	withHandle(t, b.peer, func(h *netlink.Handle) error {
		pbr := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "flatnet0"}}
		if err := h.LinkAdd(pbr); err != nil {
			return err
		}
		return h.LinkSetUp(pbr)
	})
	addAddr(t, b.peer, "flatnet0", "10.244.2.1/24")
	addRoute(t, b.peer, "10.244.1.0/24", nodeIP)

	addAddr(t, b.inet, "up0", "10.99.0.1/24")
	addAddr(t, b.inet, "up0", "198.18.0.2/24")

	for h, fwd := range map[ns.NetNS]string{b.node: "1", b.peer: "1", b.pod: "0", b.inet: "0", lan: "0"} {
		if err := nsutil.SetSysctl(h, "net/ipv4/ip_forward", fwd); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range []ns.NetNS{b.node, b.pod, b.peer, b.inet} {
		serveWhoAmI(t, h)
	}

	b.tbl = nat.New(int(b.node.Fd()))
	b.rules = nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{nodeIP, peerIP}}
	return b
}

func withHandle(t *testing.T, h ns.NetNS, f func(*netlink.Handle) error) {
	t.Helper()
	nh, err := netlink.NewHandleAt(netns.NsHandle(int(h.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	if err := f(nh); err != nil {
		t.Fatalf("netlink in %s: %v", h.Path(), err)
	}
}

// addVeth creates a veth pair, aName in a and bName in b, both up.
func addVeth(t *testing.T, a ns.NetNS, aName string, b ns.NetNS, bName string) {
	t.Helper()
	withHandle(t, a, func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: aName, Flags: net.FlagUp},
			PeerName:      bName,
			PeerNamespace: netlink.NsFd(int(b.Fd())),
		})
	})
	withHandle(t, b, func(h *netlink.Handle) error {
		l, err := h.LinkByName(bName)
		if err != nil {
			return err
		}
		return h.LinkSetUp(l)
	})
}

func addAddr(t *testing.T, h ns.NetNS, ifName, cidr string) {
	t.Helper()
	withHandle(t, h, func(nh *netlink.Handle) error {
		l, err := nh.LinkByName(ifName)
		if err != nil {
			return err
		}
		a, err := netlink.ParseAddr(cidr)
		if err != nil {
			return err
		}
		return nh.AddrAdd(l, a)
	})
}

func addRoute(t *testing.T, h ns.NetNS, dst string, gw netip.Addr) {
	t.Helper()
	_, d, err := net.ParseCIDR(dst)
	if err != nil {
		t.Fatal(err)
	}
	withHandle(t, h, func(nh *netlink.Handle) error {
		return nh.RouteAdd(&netlink.Route{Dst: d, Gw: gw.AsSlice()})
	})
}

func serveWhoAmI(t *testing.T, h ns.NetNS) {
	t.Helper()
	ln, err := probe.Listen(h, ":"+whoamiPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go probe.ServeWhoAmI(ln)
}

func ctx(t *testing.T, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return c
}

// expectSource fails unless a connection from h to dst is seen with source want.
func expectSource(t *testing.T, from string, h ns.NetNS, dst, want netip.Addr) {
	t.Helper()
	seen, _, err := probe.WhoAmI(ctx(t, 10*time.Second), h, hostPort(dst))
	if err != nil {
		t.Fatalf("%s -> %s: %v", from, dst, err)
	}
	if seen != want {
		t.Fatalf("%s -> %s: server saw source %s, want %s", from, dst, seen, want)
	}
}

// expectNoAnswer fails if a connection from h to dst gets an answer: the
// internet host cannot reply to a pod address, so without masquerade the
// handshake never completes.
func expectNoAnswer(t *testing.T, from string, h ns.NetNS, dst netip.Addr) {
	t.Helper()
	seen, _, err := probe.WhoAmI(ctx(t, 1500*time.Millisecond), h, hostPort(dst))
	if err == nil {
		t.Fatalf("%s -> %s answered (server saw %s); want no answer without masquerade", from, dst, seen)
	}
}

func mustSync(t *testing.T, tbl *nat.Table, r nat.Rules) {
	t.Helper()
	if err := tbl.Sync(r); err != nil {
		t.Fatalf("Sync(%+v): %v", r, err)
	}
}

func conn(t *testing.T, h ns.NetNS) *nftables.Conn {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(h.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var flatnetTable = &nftables.Table{Name: nat.TableName, Family: nftables.TableFamilyIPv4}

// state is what the kernel holds for flatnet in one namespace.
type state struct {
	tableFound bool
	chain      *nftables.Chain
	rules      []*nftables.Rule
	nodes      []netip.Addr
}

// readState reads a table nobody is changing at the moment (see masqRules for
// why GetRules is not used while Sync runs concurrently).
func readState(c *nftables.Conn) (state, error) {
	var s state
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return s, fmt.Errorf("list tables: %w", err)
	}
	s.tableFound = slices.ContainsFunc(tables, func(x *nftables.Table) bool { return x.Name == nat.TableName })
	if !s.tableFound {
		return s, nil
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return s, fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == nat.TableName && ch.Name == nat.ChainName {
			s.chain = ch
		}
	}
	if s.chain == nil {
		return s, nil
	}
	if s.rules, err = c.GetRules(flatnetTable, s.chain); err != nil {
		return s, fmt.Errorf("list rules: %w", err)
	}
	elems, err := nodeElements(c)
	if err != nil {
		return s, err
	}
	for _, e := range elems {
		a, _ := netip.AddrFromSlice(e.Key)
		s.nodes = append(s.nodes, a)
	}
	slices.SortFunc(s.nodes, netip.Addr.Compare)
	return s, nil
}

func hasMasq(r *nftables.Rule) bool {
	return slices.ContainsFunc(r.Exprs, func(e expr.Any) bool {
		m, ok := e.(*expr.Masq)
		return ok && m.FullyRandom
	})
}

// The policy, end to end: only pod traffic leaving the cluster is masqueraded.
func TestOnlyEdgeTrafficIsMasqueraded(t *testing.T) {
	b := newBed(t)

	// The bed is what it claims: without the table the internet host cannot
	// answer a pod, while every in-cluster path works.
	expectNoAnswer(t, "pod (no table)", b.pod, inetIP)
	expectSource(t, "node (no table)", b.node, inetIP, nodeIP)
	expectSource(t, "pod (no table)", b.pod, peerIP, podIP)
	expectSource(t, "pod (no table)", b.pod, peerPodIP, podIP)

	mustSync(t, b.tbl, b.rules)

	expectSource(t, "pod", b.pod, inetIP, nodeIP)       // leaves the cluster: masqueraded
	expectSource(t, "pod", b.pod, peerIP, podIP)        // remote node: kept (flannel#964)
	expectSource(t, "pod", b.pod, nodeIP, podIP)        // own node: kept
	expectSource(t, "pod", b.pod, peerPodIP, podIP)     // cluster CIDR behind the peer: kept
	expectSource(t, "peer node", b.peer, podIP, peerIP) // remote node to pod: kept
	expectSource(t, "node", b.node, inetIP, nodeIP)     // node's own traffic: untouched

	// Node to pod: the pod sees the address the node sent from.
	seen, local, err := probe.WhoAmI(ctx(t, 10*time.Second), b.node, hostPort(podIP))
	if err != nil {
		t.Fatalf("node -> pod: %v", err)
	}
	if seen != local || local != nodeGW {
		t.Fatalf("node -> pod: pod saw %s, node sent from %s, want both %s", seen, local, nodeGW)
	}

	// The kernel holds exactly the documented layout.
	s, err := readState(conn(t, b.node))
	if err != nil {
		t.Fatal(err)
	}
	if s.chain == nil || s.chain.Type != nftables.ChainTypeNAT || *s.chain.Hooknum != *nftables.ChainHookPostrouting ||
		*s.chain.Priority != *nftables.ChainPriorityNATSource {
		t.Fatalf("chain = %+v, want type nat hook postrouting priority srcnat", s.chain)
	}
	if len(s.rules) != 1 || !hasMasq(s.rules[0]) {
		t.Fatalf("rules = %v, want one fully-random masquerade rule", s.rules)
	}
	if want := []netip.Addr{nodeIP, peerIP}; !slices.Equal(s.nodes, want) {
		t.Fatalf("set nodes = %v, want %v", s.nodes, want)
	}
}

// A second Sync changes nothing a packet can see, not even for a
// connection that is open across it.
func TestSyncTwiceIsNoOp(t *testing.T) {
	b := newBed(t)
	mustSync(t, b.tbl, b.rules)

	ln, err := probe.Listen(b.inet, ":9000")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peers := make(chan netip.Addr, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		io.Copy(c, c)
	}()
	c, err := probe.Dial(ctx(t, 10*time.Second), b.pod, net.JoinHostPort(inetIP.String(), "9000"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	rd := bufio.NewReader(c)
	echo := func(msg string) {
		t.Helper()
		if _, err := io.WriteString(c, msg+"\n"); err != nil {
			t.Fatalf("write %q: %v", msg, err)
		}
		got, err := rd.ReadString('\n')
		if err != nil || got != msg+"\n" {
			t.Fatalf("echo %q: got %q, %v", msg, got, err)
		}
	}
	echo("before")
	if seen := <-peers; seen != nodeIP {
		t.Fatalf("echo server saw %s, want %s", seen, nodeIP)
	}
	before, err := readState(conn(t, b.node))
	if err != nil {
		t.Fatal(err)
	}

	mustSync(t, b.tbl, b.rules)
	mustSync(t, b.tbl, b.rules)

	echo("after") // the established, masqueraded flow survives the replace
	after, err := readState(conn(t, b.node))
	if err != nil {
		t.Fatal(err)
	}
	if len(after.rules) != 1 || !hasMasq(after.rules[0]) || !slices.Equal(after.nodes, before.nodes) {
		t.Fatalf("after second Sync: rules %v nodes %v, want the same as before (%v)", after.rules, after.nodes, before.nodes)
	}
	expectSource(t, "pod", b.pod, inetIP, nodeIP)
	expectSource(t, "pod", b.pod, peerIP, podIP)
	expectSource(t, "pod", b.pod, peerPodIP, podIP)
}

// Sync repairs drift made by hand: a deleted table, a flushed chain.
func TestSyncRepairsDrift(t *testing.T) {
	b := newBed(t)
	mustSync(t, b.tbl, b.rules)
	expectSource(t, "pod", b.pod, inetIP, nodeIP)

	c := conn(t, b.node)
	c.DelTable(flatnetTable)
	if err := c.Flush(); err != nil {
		t.Fatalf("delete table by hand: %v", err)
	}
	if s, err := readState(c); err != nil || s.tableFound {
		t.Fatalf("table still there after deleting it by hand (%v)", err)
	}
	expectNoAnswer(t, "pod (table deleted)", b.pod, inetIP)
	mustSync(t, b.tbl, b.rules)
	expectSource(t, "pod (repaired)", b.pod, inetIP, nodeIP)

	c.FlushChain(&nftables.Chain{Name: nat.ChainName, Table: flatnetTable})
	if err := c.Flush(); err != nil {
		t.Fatalf("flush chain by hand: %v", err)
	}
	if s, err := readState(c); err != nil || len(s.rules) != 0 {
		t.Fatalf("rules after flushing by hand: %v (%v)", s.rules, err)
	}
	expectNoAnswer(t, "pod (chain flushed)", b.pod, inetIP)
	mustSync(t, b.tbl, b.rules)
	expectSource(t, "pod (repaired)", b.pod, inetIP, nodeIP)
	expectSource(t, "pod (repaired)", b.pod, peerIP, podIP)
}

// NodeIPs decides which underlay destinations keep the pod's address.
func TestNodeIPsUpdate(t *testing.T) {
	b := newBed(t)
	withPeer := b.rules
	withoutPeer := nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{nodeIP, unrelatedIP}}

	mustSync(t, b.tbl, withPeer)
	expectSource(t, "pod", b.pod, peerIP, podIP)
	mustSync(t, b.tbl, withoutPeer) // the peer left the cluster: it is "outside" now
	expectSource(t, "pod", b.pod, peerIP, nodeIP)
	expectSource(t, "pod", b.pod, peerPodIP, podIP) // pod subnets never depend on NodeIPs
	mustSync(t, b.tbl, withPeer)                    // and came back
	expectSource(t, "pod", b.pod, peerIP, podIP)
	expectSource(t, "pod", b.pod, inetIP, nodeIP)

	// Duplicates are fine and stored once.
	mustSync(t, b.tbl, nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{peerIP, nodeIP, peerIP}})
	s, err := readState(conn(t, b.node))
	if err != nil {
		t.Fatal(err)
	}
	if want := []netip.Addr{nodeIP, peerIP}; !slices.Equal(s.nodes, want) {
		t.Fatalf("set nodes = %v, want %v", s.nodes, want)
	}
}

// While Sync replaces the table over and over (the node set alternates), a
// reader listing tables, chains, rules and the set never finds the table or
// the masquerade rule missing, and new pod -> internet connections, each of
// which is lost if its first packet is not masqueraded, all get through as
// the node: the replace is atomic for the control plane and the data plane.
func TestSyncIsAtomic(t *testing.T) {
	b := newBed(t)
	withPeer := b.rules
	withoutPeer := nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{nodeIP, unrelatedIP}}
	// The first Sync creates the table; the workers start afterwards (before
	// it, "missing" is the truth).
	mustSync(t, b.tbl, withPeer)

	c := conn(t, b.node)
	nodeFd := int(b.node.Fd())
	// One connection per Sync: enough to cover the replaces, and the 2-core
	// machine and the conntrack table are shared.
	synced := make(chan struct{}, 1)
	workers := []*worker{
		startWorker("reader", 300, func() error { return observe(c, nodeFd) }),
		startWorker("pod -> internet", 50, func() error {
			<-synced
			cx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			seen, _, err := probe.WhoAmI(cx, b.pod, hostPort(inetIP))
			if err == nil && seen != nodeIP {
				err = fmt.Errorf("internet host saw %s, want %s", seen, nodeIP)
			}
			return err
		}),
	}
	const wantSyncs = 100
	deadline := time.Now().Add(60 * time.Second)
	syncs := 0
	var syncErr error
	for ; syncErr == nil; syncs++ {
		if slices.ContainsFunc(workers, (*worker).failed) {
			break
		}
		if syncs >= wantSyncs && !slices.ContainsFunc(workers, func(w *worker) bool { return w.rounds.Load() < w.want }) {
			break
		}
		if time.Now().After(deadline) {
			syncErr = errors.New("deadline passed before enough rounds")
			break
		}
		r := withPeer
		if syncs%2 == 0 {
			r = withoutPeer
		}
		syncErr = b.tbl.Sync(r)
		select {
		case synced <- struct{}{}:
		default:
		}
	}
	for _, w := range workers {
		close(w.quit)
	}
	close(synced) // releases a worker waiting for the next Sync
	for _, w := range workers {
		if err := w.wait(); err != nil {
			t.Errorf("%s, after %d rounds during %d syncs: %v", w.name, w.rounds.Load(), syncs, err)
		}
	}
	if syncErr != nil {
		t.Fatalf("after %d syncs: %v", syncs, syncErr)
	}
	t.Logf("%d syncs; %s", syncs, strings.Join(func() (out []string) {
		for _, w := range workers {
			out = append(out, fmt.Sprintf("%s: %d rounds", w.name, w.rounds.Load()))
		}
		return out
	}(), ", "))
}

// worker runs f in a loop until stopped or until f fails.
type worker struct {
	name   string
	want   int64 // rounds the test wants at least
	rounds atomic.Int64
	quit   chan struct{}
	done   chan struct{}
	err    error // set before done is closed
}

func startWorker(name string, want int64, f func() error) *worker {
	w := &worker{name: name, want: want, quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.quit:
				return
			default:
			}
			if w.err = f(); w.err != nil {
				return
			}
			w.rounds.Add(1)
		}
	}()
	return w
}

func (w *worker) failed() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

// wait returns f's error after quit was closed and the loop ended.
func (w *worker) wait() error {
	<-w.done
	return w.err
}

// observe fails unless the kernel shows table ip flatnet with its chain,
// a masquerade rule and a non-empty nodes set.
func observe(c *nftables.Conn, netnsFd int) error {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return fmt.Errorf("list tables: %w", err)
	}
	if !slices.ContainsFunc(tables, func(x *nftables.Table) bool { return x.Name == nat.TableName }) {
		return errors.New("table ip flatnet missing")
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return fmt.Errorf("list chains: %w", err)
	}
	if !slices.ContainsFunc(chains, func(x *nftables.Chain) bool {
		return x.Table.Name == nat.TableName && x.Name == nat.ChainName && x.Hooknum != nil
	}) {
		return errors.New("base chain postrouting missing")
	}
	n, err := masqRules(netnsFd)
	if err != nil {
		return fmt.Errorf("dump rules: %w", err)
	}
	if n == 0 {
		return errors.New("masquerade rule missing")
	}
	elems, err := nodeElements(c)
	if err != nil {
		return err
	}
	if len(elems) == 0 {
		return errors.New("set nodes empty")
	}
	return nil
}

// nodeElements lists the elements of set nodes. The kernel's element dump
// finds its set again by pointer and fails with ENOENT when a commit replaced
// the set object between the lookup and the dump, although a set of that
// name existed throughout; the lookup itself (GetSetByName, not a dump) is
// atomic and is never retried.
func nodeElements(c *nftables.Conn) ([]nftables.SetElement, error) {
	for attempt := 0; ; attempt++ {
		set, err := c.GetSetByName(flatnetTable, nat.SetName)
		if err != nil {
			return nil, fmt.Errorf("get set %s: %w", nat.SetName, err)
		}
		elems, err := c.GetSetElements(set)
		if err == nil {
			return elems, nil
		}
		// The library flattens this error to text.
		if attempt == 100 || !strings.Contains(err.Error(), unix.ENOENT.Error()) {
			return nil, fmt.Errorf("get elements of set %s: %w", nat.SetName, err)
		}
	}
}

// masqRules counts the rules in ip flatnet postrouting that masquerade, with
// an unfiltered rule dump. Why not nftables.Conn.GetRules: it asks for a dump
// filtered by table and chain, and for such a dump the kernel
// (nf_tables_dump_rules) looks only at the first table of that name; while a
// commit replaces the table, that is for a moment the outgoing, already
// emptied one, so GetRules reports no rules although the new table holds
// them (seen here within a few dozen Syncs). The unfiltered dump walks every
// table instance and reports the rules active in the current generation.
func masqRules(netnsFd int) (int, error) {
	c, err := mnl.Dial(unix.NETLINK_NETFILTER, &mnl.Config{NetNS: netnsFd})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	msgs, err := c.Execute(mnl.Message{
		Header: mnl.Header{
			Type:  mnl.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE),
			Flags: mnl.Request | mnl.Dump,
		},
		Data: []byte{unix.NFPROTO_IPV4, unix.NFNETLINK_V0, 0, 0}, // struct nfgenmsg
	})
	if err != nil {
		return 0, err
	}
	n := 0
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := mnl.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, err
		}
		var table, chain string
		masq := false
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_RULE_TABLE:
				table = ad.String()
			case unix.NFTA_RULE_CHAIN:
				chain = ad.String()
			case unix.NFTA_RULE_EXPRESSIONS:
				ad.Nested(func(list *mnl.AttributeDecoder) error {
					for list.Next() { // NFTA_LIST_ELEM
						list.Nested(func(e *mnl.AttributeDecoder) error {
							for e.Next() {
								if e.Type() == unix.NFTA_EXPR_NAME && e.String() == "masq" {
									masq = true
								}
							}
							return nil
						})
					}
					return nil
				})
			}
		}
		if err := ad.Err(); err != nil {
			return 0, err
		}
		if table == nat.TableName && chain == nat.ChainName && masq {
			n++
		}
	}
	return n, nil
}

// Masqueraded counts masqueraded connections, only those, and survives Sync.
func TestMasqueradedCounter(t *testing.T) {
	b := newBed(t)
	if _, err := b.tbl.Masqueraded(); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Masqueraded without a table: err = %v, want fs.ErrNotExist", err)
	}
	mustSync(t, b.tbl, b.rules)
	start, err := b.tbl.Masqueraded()
	if err != nil {
		t.Fatal(err)
	}
	if start != 0 {
		t.Fatalf("fresh table counted %d packets", start)
	}
	expectSource(t, "pod", b.pod, peerIP, podIP)
	expectSource(t, "pod", b.pod, peerPodIP, podIP)
	if n, err := b.tbl.Masqueraded(); err != nil || n != start {
		t.Fatalf("after in-cluster traffic: %d, %v; want %d", n, err, start)
	}
	const flows = 3
	for range flows {
		expectSource(t, "pod", b.pod, inetIP, nodeIP)
	}
	n, err := b.tbl.Masqueraded()
	if err != nil {
		t.Fatal(err)
	}
	if n < start+flows {
		t.Fatalf("after %d masqueraded connections: counter %d, want >= %d", flows, n, start+flows)
	}
	mustSync(t, b.tbl, b.rules)
	if m, err := b.tbl.Masqueraded(); err != nil || m != n {
		t.Fatalf("after a second Sync: counter %d, %v; want it carried over (%d)", m, err, n)
	}
}

// New(-1) works in the calling thread's namespace; Delete removes the table
// (and masquerade with it) and is idempotent.
func TestCurrentNamespaceAndDelete(t *testing.T) {
	b := newBed(t)
	err := b.node.Do(func(ns.NetNS) error {
		return nat.New(-1).Sync(b.rules)
	})
	if err != nil {
		t.Fatal(err)
	}
	// Seen through the fd-based Table, so it went into the node namespace.
	if _, err := b.tbl.Masqueraded(); err != nil {
		t.Fatalf("Sync via New(-1) inside the node namespace: %v", err)
	}
	expectSource(t, "pod", b.pod, inetIP, nodeIP)

	if err := b.tbl.Delete(); err != nil {
		t.Fatal(err)
	}
	if s, err := readState(conn(t, b.node)); err != nil || s.tableFound {
		t.Fatalf("table still there after Delete (%v)", err)
	}
	expectNoAnswer(t, "pod (table deleted)", b.pod, inetIP)
	if err := b.tbl.Delete(); err != nil {
		t.Fatalf("Delete of a missing table: %v", err)
	}
}

func TestBadRules(t *testing.T) {
	h := testutil.NewNS(t, "bad")
	tbl := nat.New(int(h.Fd()))
	good := nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{nodeIP}}
	mustSync(t, tbl, good)

	cases := []struct {
		name string
		r    nat.Rules
		want string
	}{
		{"no cluster CIDR", nat.Rules{NodeIPs: []netip.Addr{nodeIP}}, "cluster CIDR is missing"},
		{"IPv6 cluster CIDR", nat.Rules{ClusterCIDR: netip.MustParsePrefix("fd00::/48"), NodeIPs: []netip.Addr{nodeIP}}, "only IPv4"},
		{"not a network address", nat.Rules{ClusterCIDR: netip.MustParsePrefix("10.244.1.0/16"), NodeIPs: []netip.Addr{nodeIP}}, "did you mean 10.244.0.0/16"},
		{"/0", nat.Rules{ClusterCIDR: netip.MustParsePrefix("0.0.0.0/0"), NodeIPs: []netip.Addr{nodeIP}}, "covers every address"},
		{"no node IPs", nat.Rules{ClusterCIDR: clusterCIDR}, "no node IPs"},
		{"zero node IP", nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{nodeIP, {}}}, "node IP #1 is missing"},
		{"IPv6 node IP", nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{netip.MustParseAddr("fd00::1")}}, "only IPv4"},
		{"IPv4-mapped node IP", nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{netip.MustParseAddr("::ffff:10.99.0.11")}}, "plain IPv4"},
		{"unspecified node IP", nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{netip.MustParseAddr("0.0.0.0")}}, "not a unicast"},
		{"node IP in cluster CIDR", nat.Rules{ClusterCIDR: clusterCIDR, NodeIPs: []netip.Addr{netip.MustParseAddr("10.244.9.9")}}, "inside the cluster CIDR"},
	}
	for _, tc := range cases {
		err := tbl.Sync(tc.r)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Sync error = %v, want one containing %q", tc.name, err, tc.want)
		}
		if verr := tc.r.Validate(); verr == nil || verr.Error() != err.Error() {
			t.Errorf("%s: Validate = %v, Sync = %v; want the same error", tc.name, verr, err)
		}
	}
	// A rejected Sync leaves the installed table alone.
	s, err := readState(conn(t, h))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.rules) != 1 || !hasMasq(s.rules[0]) || !slices.Equal(s.nodes, good.NodeIPs) {
		t.Fatalf("after rejected Syncs: rules %v nodes %v, want the good table", s.rules, s.nodes)
	}
}
