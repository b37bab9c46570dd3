// Package cri_test is flatnet under a real container runtime: two lab
// nodes, each running flatnetd and its own containerd, whose CRI plugin
// loads the conflist flatnetd wrote and execs the flatnet binary flatnetd
// installed for every pod sandbox, exactly as on a Kubernetes node.
//
// Prerequisites (the test fails, naming them, when one is missing):
// hack/cri/tools.sh installs containerd, runc, busybox-static and
// containernetworking-plugins and builds crictl into ~/.cache/flatnet.
package cri_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/crinode"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/ipam"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/lab/labtest"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/ociimage"
	"github.com/flatnet-io/flatnet/pkg/probe"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

const (
	busyboxBin = "/bin/busybox" // Debian's busybox-static
	webPort    = 8080
	// The flatnet network name and data dir are flatnetd's defaults for
	// the conflist it writes.
	network = "flatnet"
)

// whoami answers with the address the listener saw the request come from.
var whoami = ociimage.Regular("/www/cgi-bin/whoami", 0o755,
	[]byte("#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n"))

// node is a lab node with a containerd of its own.
type node struct {
	*lab.Node
	rt     *crinode.Runtime
	cniLog string // one line per plugin call containerd made
}

// setup brings up a lab of n nodes without pods, and a containerd on each
// whose CNI bin dir holds loopback and, as flatnet, a wrapper that logs
// each call and execs the flatnet binary flatnetd installed.
func setup(t *testing.T, nodes int) (*lab.State, []*node) {
	t.Helper()
	testutil.RequireRoot(t)
	root := testutil.ModuleRoot(t)
	crictl, err := crinode.CrictlBin(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := crinode.CheckPrograms(crictl, crinode.LoopbackPlugin); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(busyboxBin); err != nil {
		t.Fatalf("%v: install busybox-static (hack/cri/tools.sh does)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	work, err := os.MkdirTemp("", "fcri") // short: unix socket paths live below
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	pause, err := crinode.BuildPauseImage(ctx, root, work)
	if err != nil {
		t.Fatal(err)
	}
	busybox, err := crinode.BuildBusyboxImage(work, busyboxBin, whoami)
	if err != nil {
		t.Fatal(err)
	}

	s := labtest.Up(t, lab.Options{Nodes: nodes, PodsPerNode: 0, Root: filepath.Join(work, "lab"),
		// containerd 1.6 (Debian 12) vendors a libcni that knows CNI versions
		// up to 1.0.0: with flatnetd's default 1.1.0 every ADD fails with
		// `unsupported CNI result version "1.1.0"`.
		CNIVersion: "1.0.0"})

	var out []*node
	for _, n := range s.Nodes {
		cfg := crinode.OnLabNode(n, crictl)
		nd := &node{Node: n, cniLog: filepath.Join(cfg.Dir, "cni-calls.log")}
		spy := filepath.Join(cfg.Dir, "flatnet-spy")
		script := fmt.Sprintf("#!/bin/sh\necho \"$CNI_COMMAND $CNI_CONTAINERID netns=$CNI_NETNS\" >> %s\nexec %s\n", nd.cniLog, crinode.InstalledPlugin(n))
		if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(spy, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := crinode.LinkPlugins(cfg.CNIBinDir, map[string]string{"flatnet": spy, "loopback": crinode.LoopbackPlugin}); err != nil {
			t.Fatal(err)
		}
		rt, err := crinode.Start(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		nd.rt = rt
		t.Cleanup(func() {
			if t.Failed() {
				b, _ := os.ReadFile(rt.Log())
				t.Logf("---- %s (last 4 KB)\n%s", rt.Log(), lastBytes(b, 4096))
			}
			if err := rt.Stop(); err != nil {
				t.Errorf("stop containerd of %s: %v", n.Name, err)
			}
			assertRuntimeGone(t, rt)
		})
		for _, im := range []string{pause, busybox} {
			if err := rt.Import(ctx, im); err != nil {
				t.Fatal(err)
			}
		}
		if err := rt.WaitNetworkReady(ctx, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		out = append(out, nd)
	}
	return s, out
}

func lastBytes(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// assertRuntimeGone checks that Stop left no process, mount or cgroup.
func assertRuntimeGone(t *testing.T, rt *crinode.Runtime) {
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), rt.Dir+"/") {
		t.Errorf("mounts left under %s", rt.Dir)
	}
	if left, _ := filepath.Glob("/sys/fs/cgroup/*" + rt.CgroupParent()); len(left) > 0 {
		t.Errorf("cgroups left: %v", left)
	}
	testutil.AssertNoProcessUnder(t, rt.Dir)
}

// inNS runs f inside the namespace at path.
func inNS(t *testing.T, path string, f func(ns.NetNS) error) {
	t.Helper()
	h, err := ns.GetNS(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.Do(f); err != nil {
		t.Fatal(err)
	}
}

// hostVeths lists flatnet's host-side veths in a node.
func hostVeths(t *testing.T, n *node) map[string]bool {
	out := map[string]bool{}
	inNS(t, nsutil.Path(n.NetNS), func(ns.NetNS) error {
		links, err := netlinksafe.LinkList()
		for _, l := range links {
			if _, ok := l.(*netlink.Veth); ok && strings.HasPrefix(l.Attrs().Name, "flat") {
				out[l.Attrs().Name] = true
			}
		}
		return err
	})
	return out
}

// reservations maps container IDs to the addresses flatnet's IPAM holds.
func reservations(t *testing.T, n *node) map[string]netip.Addr {
	st, err := ipam.Open(filepath.Join(n.Dir, "state"), network)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := st.List()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]netip.Addr{}
	for _, r := range rs {
		out[r.Key.ContainerID] = r.IP
	}
	return out
}

// cniCalls is what the spy saw for one sandbox: "ADD netns=/..." lines.
func cniCalls(t *testing.T, n *node, id string) []string {
	b, err := os.ReadFile(n.cniLog)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		cmd, rest, _ := strings.Cut(sc.Text(), " ")
		cid, netns, _ := strings.Cut(rest, " ")
		if cid == id {
			out = append(out, cmd+" "+netns)
		}
	}
	return out
}

// cacheEntries lists libcni result-cache files of a sandbox.
func cacheEntries(id string) []string {
	m, _ := filepath.Glob(filepath.Join(crinode.LibCNICacheDir, "*-"+id+"-*"))
	return m
}

// fetch runs a busybox container in pod p that fetches url once and
// returns its output: what the server saw as the client's address.
func fetch(t *testing.T, ctx context.Context, n *node, p *crinode.Pod, name, url string) string {
	t.Helper()
	// busybox 1.35's wget -T crashes; timeout(1) bounds it instead.
	id, err := n.rt.StartContainer(ctx, p, name, crinode.BusyboxImage, []string{"timeout", "10", "wget", "-q", "-O", "-", url})
	if err != nil {
		t.Fatal(err)
	}
	code, out, err := n.rt.WaitExited(ctx, id, 30*time.Second)
	if err != nil || code != 0 {
		t.Fatalf("%s in %s (on %s): wget %s: exit %d, %v, output %q", name, p.Name, n.Name, url, code, err, out)
	}
	return strings.TrimSpace(out)
}

// serveWhoAmI runs busybox httpd with the whoami CGI in pod p and waits
// until it accepts connections.
func serveWhoAmI(t *testing.T, ctx context.Context, n *node, p *crinode.Pod) {
	t.Helper()
	id, err := n.rt.StartContainer(ctx, p, "web", crinode.BusyboxImage, []string{"httpd", "-f", "-p", fmt.Sprintf("0.0.0.0:%d", webPort), "-h", "/www"})
	if err != nil {
		t.Fatal(err)
	}
	h, err := ns.GetNS(p.NetNS())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	addr := netip.AddrPortFrom(p.IP, webPort).String()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := probe.Dial(ctx, h, addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			state := n.rt.ContainerRunning(ctx, id)
			t.Fatalf("httpd in %s never listened on %s: %v (%v)", p.Name, addr, err, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestContainerdRunsPodsOnFlatnetAcrossNodes(t *testing.T) {
	s, nodes := setup(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// runp: the CRI plugin calls ADD; the sandbox's IP comes from the
	// node's flatnet subnet, held by flatnet's IPAM, on a flatnet veth.
	pods := make([]*crinode.Pod, len(nodes))
	for i, n := range nodes {
		p, err := n.rt.RunPod(ctx, "web-"+n.Name)
		if err != nil {
			t.Fatal(err)
		}
		pods[i] = p
		if !n.Subnet.Contains(p.IP) {
			t.Fatalf("pod %s on %s got %s, outside the node's flatnet subnet %s", p.Name, n.Name, p.IP, n.Subnet)
		}
		if got := reservations(t, n)[p.ID]; got != p.IP {
			t.Fatalf("pod %s has %s, flatnet's IPAM holds %v for its sandbox", p.Name, p.IP, got)
		}
		if veth := dataplane.HostVethName(p.ID, "eth0"); !hostVeths(t, n)[veth] {
			t.Fatalf("no host veth %s for pod %s on %s", veth, p.Name, n.Name)
		}
		if calls := cniCalls(t, n, p.ID); len(calls) != 1 || !strings.HasPrefix(calls[0], "ADD netns="+n.rt.PodNetNSDir()+"/") {
			t.Fatalf("CNI calls for %s: %v, want one ADD with a netns under %s", p.Name, calls, n.rt.PodNetNSDir())
		}
		t.Logf("%s: pod %s (sandbox %.12s) at %s", n.Name, p.Name, p.ID, p.IP)
	}

	// Real containers both ways: busybox httpd in each pod, busybox wget
	// from the other node's pod; the server reports the client address it
	// saw, which must be the client pod's own IP (no NAT inside the cluster).
	for i, n := range nodes {
		serveWhoAmI(t, ctx, n, pods[i])
	}
	for i, n := range nodes {
		peer := pods[(i+1)%len(pods)]
		url := fmt.Sprintf("http://%s/cgi-bin/whoami", netip.AddrPortFrom(peer.IP, webPort))
		if seen := fetch(t, ctx, n, pods[i], "to-"+peer.Name, url); seen != pods[i].IP.String() {
			t.Errorf("%s -> %s: server saw %q, want the client pod's IP %s", pods[i].Name, peer.Name, seen, pods[i].IP)
		} else {
			t.Logf("%s (%s) -> %s (%s): server saw %s", pods[i].Name, n.Name, peer.Name, peer.IP, seen)
		}
	}

	// Egress: the internet host sees the node's address (masquerade at
	// the edge).
	inet, err := ns.GetNS(nsutil.Path(s.Internet.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	defer inet.Close()
	ln, err := probe.Listen(inet, net.JoinHostPort(s.Internet.IP.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintln(w, host)
	}))
	for i, n := range nodes {
		if seen := fetch(t, ctx, n, pods[i], "to-internet", "http://"+ln.Addr().String()+"/"); seen != n.UnderlayIP.String() {
			t.Errorf("%s -> internet: server saw %q, want node %s's address %s", pods[i].Name, n.Name, seen, n.UnderlayIP)
		} else {
			t.Logf("%s (%s) -> internet %s: server saw %s (masqueraded)", pods[i].Name, pods[i].IP, s.Internet.IP, seen)
		}
	}

	// stopp: DEL with the namespace; rmp: DEL again without one. Then
	// nothing of the pod is left.
	for i, n := range nodes {
		p := pods[i]
		if err := n.rt.StopPod(ctx, p); err != nil {
			t.Fatal(err)
		}
		if got := cniCalls(t, n, p.ID); len(got) != 2 || !strings.HasPrefix(got[1], "DEL netns=/") {
			t.Errorf("CNI calls for %s after stopp: %v, want ADD, DEL with the netns", p.Name, got)
		}
		if err := n.rt.RemovePod(ctx, p); err != nil {
			t.Fatal(err)
		}
		if got := cniCalls(t, n, p.ID); len(got) != 3 || got[2] != "DEL netns=" {
			t.Errorf("CNI calls for %s after rmp: %v, want ADD, DEL, DEL with an empty netns", p.Name, got)
		}
		if v := hostVeths(t, n); len(v) > 0 {
			t.Errorf("%s: host veths left after rmp: %v", n.Name, v)
		}
		if r := reservations(t, n); len(r) > 0 {
			t.Errorf("%s: IPAM reservations left after rmp: %v", n.Name, r)
		}
		if c := cacheEntries(p.ID); len(c) > 0 {
			t.Errorf("%s: libcni cache entries left after rmp: %v", n.Name, c)
		}
	}
}
