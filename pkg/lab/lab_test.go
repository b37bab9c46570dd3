package lab_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/lab/labtest"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// newLab brings a lab up for one test and always takes it down.
func newLab(t *testing.T, o lab.Options) *lab.State {
	t.Helper()
	return labtest.Up(t, o)
}

func mustCheck(t *testing.T, s *lab.State) *lab.Report {
	t.Helper()
	rep, err := s.Check(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.Failed() > 0 {
		var b strings.Builder
		rep.Print(&b)
		t.Fatalf("connectivity matrix has failures:\n%s", b.String())
	}
	return rep
}

func TestLabMatrixHostGW(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 3, PodsPerNode: 2, Backend: "host-gw"})
	rep := mustCheck(t, s)
	kinds := map[string]int{}
	for _, p := range rep.Probes {
		kinds[p.Kind]++
	}
	// 6 pods: 30 pod-pod, 18 pod-node, 6 pod-internet, 18 node-pod, 1 registry.
	want := map[string]int{"pod-pod": 30, "pod-node": 18, "pod-internet": 6, "node-pod": 18, "registry": 1}
	for k, n := range want {
		if kinds[k] != n {
			t.Errorf("%d %s probes, want %d", kinds[k], k, n)
		}
	}
	for _, p := range rep.Probes {
		if p.Kind == "pod-internet" && !strings.HasPrefix(p.Seen.String(), "10.99.") {
			t.Errorf("internet host saw %s for %s: not a node IP", p.Seen, p.From)
		}
	}
	st := s.Status(context.Background())
	for _, n := range st.Nodes {
		if n.Agent != "ready" || len(n.Direct) != 2 || len(n.Unreached) != 0 {
			t.Errorf("node status %+v", n)
		}
	}
	// Health and metrics of every agent, after the matrix (which made each
	// node masquerade its pods' connections to the internet host).
	for _, n := range s.Nodes {
		for _, path := range []string{"/healthz", "/readyz"} {
			if code, body, err := s.AgentGet(context.Background(), n, path); err != nil || code != 200 {
				t.Errorf("%s %s: %d %s %v", n.Name, path, code, body, err)
			}
		}
		m := metrics(t, s, n)
		want := map[string]func(float64) bool{
			"flatnet_lease_held":                                func(v float64) bool { return v == 1 },
			"flatnet_peers":                                     func(v float64) bool { return v == 2 },
			"flatnet_peers_programmed":                          func(v float64) bool { return v == 2 },
			"flatnet_peers_failed":                              func(v float64) bool { return v == 0 },
			"flatnet_reconcile_errors_total":                    func(v float64) bool { return v == 0 },
			"flatnet_reconcile_duration_seconds_count":          func(v float64) bool { return v >= 1 },
			`flatnet_reconcile_changes_total{kind="route_set"}`: func(v float64) bool { return v >= 2 },
			"flatnet_masqueraded_packets_total":                 func(v float64) bool { return v >= 2 },
		}
		for name, ok := range want {
			if v, found := m[name]; !found || !ok(v) {
				t.Errorf("%s: metric %s = %v (present %v)", n.Name, name, v, found)
			}
		}
	}
}

// metrics scrapes an agent's /metrics into name{labels} -> value.
func metrics(t *testing.T, s *lab.State, n *lab.Node) map[string]float64 {
	t.Helper()
	code, body, err := s.AgentGet(context.Background(), n, "/metrics")
	if err != nil || code != 200 {
		t.Fatalf("%s /metrics: %d %v", n.Name, code, err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

func TestFiveAgentsStartedAtOnceGetDistinctSubnets(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 5, PodsPerNode: 0})
	seen := map[netip.Prefix]string{}
	cluster := netip.MustParsePrefix(lab.ClusterCIDR)
	for _, n := range s.Nodes {
		if other, dup := seen[n.Subnet]; dup {
			t.Fatalf("%s and %s both hold %s", n.Name, other, n.Subnet)
		}
		if !cluster.Contains(n.Subnet.Addr()) || n.Subnet.Bits() != 24 {
			t.Fatalf("%s got %s", n.Name, n.Subnet)
		}
		seen[n.Subnet] = n.Name
	}
	// Every node has a route to each of the 4 others, tagged as flatnet's
	// (lab up waited for every agent to settle every peer).
	for _, n := range s.Nodes {
		if got := flatnetRoutes(t, n); len(got) != 4 {
			t.Fatalf("%s has %d flatnet routes, want 4: %v", n.Name, len(got), got)
		}
	}
}

// flatnetRoutes lists the routes flatnet owns in a node.
func flatnetRoutes(t *testing.T, n *lab.Node) map[string]string {
	t.Helper()
	h, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	out := map[string]string{}
	h.Do(func(ns.NetNS) error {
		rs, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: backend.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			out[r.Dst.String()] = r.Gw.String()
		}
		return nil
	})
	return out
}

// prober connects from one pod to another every few milliseconds and
// counts what fails, until stopped.
type prober struct {
	ok, failed atomic.Int64
	lastErr    atomic.Value
	stop       chan struct{}
	done       sync.WaitGroup
}

func startProber(t *testing.T, s *lab.State, from, to *lab.Pod) *prober {
	t.Helper()
	src, err := ns.GetNS(nsutil.Path(from.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	dst, err := ns.GetNS(nsutil.Path(to.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := probe.Listen(dst, to.IP.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	go probe.ServeWhoAmI(ln)
	p := &prober{stop: make(chan struct{})}
	p.done.Add(1)
	go func() {
		defer p.done.Done()
		defer ln.Close()
		defer src.Close()
		defer dst.Close()
		for {
			select {
			case <-p.stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err := probe.ExpectSource(ctx, src, ln.Addr().String(), from.IP)
			cancel()
			if err != nil {
				p.failed.Add(1)
				p.lastErr.Store(err.Error())
			} else {
				p.ok.Add(1)
			}
			time.Sleep(10 * time.Millisecond) // probe rate, not synchronisation
		}
	}()
	return p
}

func (p *prober) finish(t *testing.T) {
	t.Helper()
	close(p.stop)
	p.done.Wait()
	if p.failed.Load() > 0 {
		t.Fatalf("%d of %d probes failed; last: %v", p.failed.Load(), p.failed.Load()+p.ok.Load(), p.lastErr.Load())
	}
	if p.ok.Load() < 10 {
		t.Fatalf("only %d probes ran", p.ok.Load())
	}
	t.Logf("%d probes, none lost", p.ok.Load())
}

func TestAgentRestartLosesNoProbeAndKeepsSubnet(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 2, PodsPerNode: 1})
	a, b := s.PodsOf("n1")[0], s.PodsOf("n2")[0]
	p := startProber(t, s, a, b)
	restartEachAgent(t, s)
	p.finish(t)
	mustCheck(t, s)
}

// restartEachAgent stops and starts every node's agent, one at a time,
// first with SIGTERM, then with SIGKILL; each must come back ready with
// the subnet it had.
func restartEachAgent(t *testing.T, s *lab.State) {
	t.Helper()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		for _, n := range s.Nodes {
			before := n.Subnet
			if err := s.StopAgent(n, sig); err != nil {
				t.Fatal(err)
			}
			if err := s.StartAgent(n); err != nil {
				t.Fatal(err)
			}
			if err := s.WaitReady(context.Background(), n, 30*time.Second); err != nil {
				t.Fatal(err)
			}
			if n.Subnet != before {
				t.Fatalf("%s came back after %v with %s, had %s", n.Name, sig, n.Subnet, before)
			}
		}
	}
}

func TestRouteDeletedByHandIsRestored(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 2, PodsPerNode: 0, Resync: time.Hour})
	n1, n2 := s.Nodes[0], s.Nodes[1]
	h, err := ns.GetNS(nsutil.Path(n1.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	err = h.Do(func(ns.NetNS) error {
		return netlink.RouteDel(&netlink.Route{Dst: dataplane.PrefixToIPNet(n2.Subnet)})
	})
	if err != nil {
		t.Fatal(err)
	}
	// The resync period is an hour: only the route event can bring it back.
	testutil.WaitFor(t, 10*time.Second, "the route to "+n2.Subnet.String()+" restored", func() bool {
		return flatnetRoutes(t, n1)[n2.Subnet.String()] == n2.UnderlayIP.String()
	})
}

func TestRemovedNodeIsPrunedWhenItsLeaseExpires(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 3, PodsPerNode: 1, LeaseTTL: 3 * time.Second})
	gone := s.Nodes[2]
	subnet := gone.Subnet.String()
	if err := s.RemoveNode(gone); err != nil {
		t.Fatal(err)
	}
	for _, n := range s.Nodes {
		testutil.WaitFor(t, 30*time.Second, n.Name+" to stop routing "+subnet+" of the removed node", func() bool {
			_, ok := flatnetRoutes(t, n)[subnet]
			return !ok
		})
	}
	mustCheck(t, s)
}

func TestEtcdOutageLeavesTrafficAndAgentsRecover(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 2, PodsPerNode: 1, LeaseTTL: 5 * time.Second})
	ctx := context.Background()
	p := startProber(t, s, s.PodsOf("n1")[0], s.PodsOf("n2")[0])
	s.StopEtcd()
	outage := time.After(30 * time.Second)
	// During the outage the agents notice, and traffic goes on.
	for _, n := range s.Nodes {
		waitLeaseHeld(t, s, n, false, 30*time.Second)
	}
	<-outage
	if err := s.StartEtcd(ctx); err != nil {
		t.Fatal(err)
	}
	for _, n := range s.Nodes {
		waitLeaseHeld(t, s, n, true, 30*time.Second)
	}
	p.finish(t)
	mustCheck(t, s)
}

func waitLeaseHeld(t *testing.T, s *lab.State, n *lab.Node, want bool, timeout time.Duration) {
	t.Helper()
	var err error
	testutil.WaitFor(t, timeout, fmt.Sprintf("%s: leaseHeld %v", n.Name, want), func() bool {
		st, e := s.AgentStatus(context.Background(), n)
		err = e
		return e == nil && st.LeaseHeld == want
	}, func() string { return fmt.Sprintf("last status error: %v", err) })
}

func TestAgentRejectsBadConfig(t *testing.T) {
	bin := testutil.Binaries(t) + "/flatnetd"
	cases := map[string][]string{
		"10.0.0.0/33":                   {"--cluster-cidr", "10.0.0.0/33"},
		"not a network address":         {"--cluster-cidr", "10.244.1.0/16"},
		"--subnet-len":                  {"--subnet-len", "8"},
		"--datastore":                   {"--datastore", "zookeeper"},
		"must be an absolute path":      {"--state-dir", "relative/dir"},
		"--mtu":                         {"--mtu", "100000"},
		"use a VNI below 10000000":      {"--vxlan-vni", "12000000"},
		"VXLAN port 70000":              {"--vxlan-port", "70000"},
		"unknown field":                 {"--config", writeFile(t, `{"noSuchKey":"10.0.0.0/8"}`)},
		"flag provided but not defined": {"--no-such-flag"},
	}
	// In a namespace of its own: should a case wrongly pass validation, the
	// agent must not touch this machine's network.
	h := testutil.NewNS(t, "badcfg")
	for want, args := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, bin, args...)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		err := nsutil.Start(h, cmd)
		if err == nil {
			err = cmd.Wait()
		}
		cancel()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("%v: exit %v, want 2\n%s", args, err, out.String())
		}
		if !strings.Contains(out.String(), want) {
			t.Errorf("%v: output does not mention %q:\n%s", args, want, out.String())
		}
	}
}

func writeFile(t *testing.T, content string) string {
	p := t.TempDir() + "/flatnetd.json"
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAgentReinstallsWipedCNIFiles(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 1, PodsPerNode: 0})
	n := s.Nodes[0]
	bin, conf := n.Dir+"/bin/flatnet", n.Dir+"/net.d/10-flatnet.conflist"
	want, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	// A package upgrade wipes the CNI bin dir and the conflist.
	if err := os.RemoveAll(n.Dir + "/bin"); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(conf); err != nil {
		t.Fatal(err)
	}
	var cerr, berr error
	testutil.WaitFor(t, 15*time.Second, "the CNI files reinstalled", func() bool {
		var got []byte
		var st os.FileInfo
		got, cerr = os.ReadFile(conf)
		st, berr = os.Stat(bin)
		return cerr == nil && berr == nil && string(got) == string(want) && st.Mode().Perm()&0o111 != 0
	}, func() string { return fmt.Sprintf("conflist %v, binary %v", cerr, berr) })
	// And the reinstalled plugin works: a pod can be attached.
	if _, err := s.AddPod(context.Background(), n, "n1-late"); err != nil {
		t.Fatal(err)
	}
}

func TestAgentRetriesUnreachableEtcd(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 1, PodsPerNode: 0})
	n := s.Nodes[0]
	if err := s.StopAgent(n, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	s.StopEtcd()
	if err := s.StartAgent(n); err != nil {
		t.Fatal(err)
	}
	// The agent keeps running and says why it is waiting, more than once.
	var b []byte
	testutil.WaitFor(t, 30*time.Second, "repeated retry messages in the agent log", func() bool {
		b, _ = os.ReadFile(n.Agent.Log)
		return strings.Count(string(b), "etcd") > 0 && strings.Count(string(b), "retry") >= 2
	}, func() string { return string(b) })
	st, err := s.AgentStatus(context.Background(), n)
	if err != nil || st.Ready {
		t.Fatalf("agent should be up but not ready while etcd is down: %+v %v", st, err)
	}
	// When etcd returns, the agent gets its lease and becomes ready.
	if err := s.StartEtcd(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitReady(context.Background(), n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}
