package cni_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/cni"
	"github.com/flatnet-io/flatnet/pkg/cniruntime"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/ipam"
	"github.com/flatnet-io/flatnet/pkg/nodestate"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

var allVersions = []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"}

const (
	netName = "fntnet"
	bridge  = "fnt0"
)

// node is one "node" namespace with the flatnet plugin driven through libcni.
type node struct {
	t       *testing.T
	ns      ns.NetNS
	rt      *cniruntime.Runtime
	dataDir string
	pluginC map[string]any
}

func newNode(t *testing.T, version string, plugin map[string]any) *node {
	t.Helper()
	bin := testutil.Binaries(t)
	dir := t.TempDir()
	n := &node{t: t, ns: testutil.NewNS(t, "node"), dataDir: dir}
	pc := map[string]any{"type": "flatnet", "bridge": bridge, "dataDir": dir, "nodeStateFile": filepath.Join(dir, "node.json")}
	if _, ok := plugin["subnet"]; !ok && plugin["noSubnet"] == nil {
		pc["subnet"] = "10.244.1.0/24"
	}
	for k, v := range plugin {
		if k != "noSubnet" {
			pc[k] = v
		}
	}
	n.pluginC = pc
	conf, _ := json.Marshal(map[string]any{"cniVersion": version, "name": netName, "plugins": []any{pc}})
	rt, err := cniruntime.New(conf, []string{bin}, filepath.Join(dir, "cache"), n.ns)
	if err != nil {
		t.Fatal(err)
	}
	n.rt = rt
	return n
}

type pod struct {
	ns  ns.NetNS
	att cniruntime.Attachment
	ip  netip.Addr
	res *current.Result
}

func (n *node) addPod(name string) *pod {
	n.t.Helper()
	p, err := n.tryAddPod(name, nil)
	if err != nil {
		n.t.Fatalf("ADD %s: %v", name, err)
	}
	return p
}

func (n *node) tryAddPod(name string, args [][2]string) (*pod, error) {
	h := testutil.NewNS(n.t, name)
	p := &pod{ns: h, att: cniruntime.Attachment{ContainerID: "ctr-" + name, NetNS: h.Path(), IfName: "eth0", Args: args}}
	res, err := n.rt.Add(context.Background(), p.att)
	if err != nil {
		return p, err
	}
	p.res, err = current.NewResultFromResult(res)
	if err != nil {
		n.t.Fatal(err)
	}
	a, _ := netip.AddrFromSlice(p.res.IPs[0].Address.IP.To4())
	p.ip = a
	return p, nil
}

// hostVeths lists the veth ends on the node side.
func (n *node) hostVeths() []string {
	var out []string
	n.ns.Do(func(ns.NetNS) error {
		links, _ := netlinksafe.LinkList()
		for _, l := range links {
			if l.Type() == "veth" {
				out = append(out, l.Attrs().Name)
			}
		}
		return nil
	})
	return out
}

func (n *node) reservations() []ipam.Reservation {
	s, err := ipam.Open(n.dataDir, netName)
	if err != nil {
		n.t.Fatal(err)
	}
	r, err := s.List()
	if err != nil {
		n.t.Fatal(err)
	}
	return r
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// whoami starts a server in h on addr and returns its address.
func whoami(t *testing.T, h ns.NetNS, ip netip.Addr) string {
	t.Helper()
	ln, err := probe.Listen(h, net.JoinHostPort(ip.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go probe.ServeWhoAmI(ln)
	return ln.Addr().String()
}

func TestAddTwoPodsTalkWithTheirOwnAddresses(t *testing.T) {
	for _, v := range allVersions {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			n := newNode(t, v, nil)
			a, b := n.addPod("a"), n.addPod("b")
			subnet := netip.MustParsePrefix("10.244.1.0/24")
			gw := netip.MustParseAddr("10.244.1.1")
			for _, p := range []*pod{a, b} {
				checkResult(t, p, subnet, gw)
			}
			if a.ip == b.ip {
				t.Fatalf("both pods got %s", a.ip)
			}
			srv := whoami(t, a.ns, a.ip)
			if err := probe.ExpectSource(ctx(t), b.ns, srv, b.ip); err != nil {
				t.Fatalf("pod b -> pod a: %v", err)
			}
			// The node reaches a pod, from its bridge address.
			if err := probe.ExpectSource(ctx(t), n.ns, srv, gw); err != nil {
				t.Fatalf("node -> pod a: %v", err)
			}
			// Inside the pod: eth0 has the address, the MTU and the default route.
			a.ns.Do(func(ns.NetNS) error {
				l, err := netlinksafe.LinkByName("eth0")
				if err != nil {
					t.Fatal(err)
				}
				if l.Attrs().MTU != cni.DefaultMTU {
					t.Errorf("pod MTU %d", l.Attrs().MTU)
				}
				dad, _ := os.ReadFile("/proc/sys/net/ipv6/conf/eth0/accept_dad")
				if strings.TrimSpace(string(dad)) != "0" {
					t.Errorf("accept_dad = %q, want 0", dad)
				}
				return nil
			})
			// Host end: on the bridge, hairpin on.
			n.ns.Do(func(ns.NetNS) error {
				name := dataplane.HostVethName(a.att.ContainerID, "eth0")
				l, err := netlinksafe.LinkByName(name)
				if err != nil {
					t.Fatal(err)
				}
				br, _ := netlinksafe.LinkByName(bridge)
				if l.Attrs().MasterIndex != br.Attrs().Index {
					t.Errorf("%s not on %s", name, bridge)
				}
				pi, err := netlinksafe.LinkGetProtinfo(l)
				if err != nil || !pi.Hairpin {
					t.Errorf("hairpin off on %s (%v)", name, err)
				}
				return nil
			})
		})
	}
}

func checkResult(t *testing.T, p *pod, subnet netip.Prefix, gw netip.Addr) {
	t.Helper()
	r := p.res
	if len(r.Interfaces) != 3 || r.Interfaces[2].Name != "eth0" || r.Interfaces[2].Sandbox != p.ns.Path() || r.Interfaces[2].Mac == "" {
		t.Fatalf("interfaces: %+v", r.Interfaces)
	}
	if len(r.IPs) != 1 || r.IPs[0].Interface == nil || *r.IPs[0].Interface != 2 {
		t.Fatalf("ips: %+v", r.IPs)
	}
	if !subnet.Contains(p.ip) || p.ip == gw || !r.IPs[0].Gateway.Equal(gw.AsSlice()) {
		t.Fatalf("ip %s gateway %s", p.ip, r.IPs[0].Gateway)
	}
	if len(r.Routes) != 1 || r.Routes[0].Dst.String() != "0.0.0.0/0" || !r.Routes[0].GW.Equal(gw.AsSlice()) {
		t.Fatalf("routes %+v", r.Routes)
	}
}

func TestDelVariants(t *testing.T) {
	for _, v := range allVersions {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			n := newNode(t, v, nil)
			c := ctx(t)
			// DEL of something never added.
			if err := n.rt.Del(c, cniruntime.Attachment{ContainerID: "never", NetNS: "", IfName: "eth0"}); err != nil {
				t.Fatalf("DEL of nothing: %v", err)
			}
			// DEL twice, the second with an empty CNI_NETNS (containerd does this).
			p := n.addPod("p")
			if err := n.rt.Del(c, p.att); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			second := p.att
			second.NetNS = ""
			if err := n.rt.Del(c, second); err != nil {
				t.Fatalf("second DEL with empty netns: %v", err)
			}
			// DEL after the pod's netns is gone.
			q := n.addPod("q")
			q.ns.Close()
			nsutil.Delete(filepath.Base(q.att.NetNS))
			if err := n.rt.Del(c, q.att); err != nil {
				t.Fatalf("DEL with netns gone: %v", err)
			}
			if v := n.hostVeths(); len(v) != 0 {
				t.Fatalf("veths left: %v", v)
			}
			if r := n.reservations(); len(r) != 0 {
				t.Fatalf("reservations left: %v", r)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} { // CHECK exists since 0.4.0
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			n := newNode(t, v, nil)
			c := ctx(t)
			p := n.addPod("p")
			if err := n.rt.Check(c, p.att); err != nil {
				t.Fatalf("CHECK of a healthy pod: %v", err)
			}
			breakages := []struct {
				name, want string
				do         func()
			}{
				{"default route removed", "no default route", func() {
					p.ns.Do(func(ns.NetNS) error {
						l, _ := netlinksafe.LinkByName("eth0")
						return netlink.RouteDel(dataplane.PodDefaultRoute(l.Attrs().Index, netip.MustParseAddr("10.244.1.1")))
					})
				}},
				{"host veth detached", "not attached to bridge", func() {
					n.ns.Do(func(ns.NetNS) error {
						l, _ := netlinksafe.LinkByName(dataplane.HostVethName(p.att.ContainerID, "eth0"))
						return netlink.LinkSetNoMaster(l)
					})
				}},
				{"reservation lost", "no address reservation", func() {
					s, _ := ipam.Open(n.dataDir, netName)
					s.Release(ipam.Key{ContainerID: p.att.ContainerID, IfName: "eth0"})
				}},
			}
			for _, b := range breakages {
				b.do()
				err := n.rt.Check(c, p.att)
				if err == nil || !strings.Contains(err.Error(), b.want) {
					t.Fatalf("CHECK after %s: got %v, want %q", b.name, err, b.want)
				}
				var e *types.Error
				if !asCNIError(err, &e) || e.Code != cni.ErrCheckFailed {
					t.Fatalf("CHECK after %s: code %v, want %d", b.name, err, cni.ErrCheckFailed)
				}
			}
		})
	}
}

// asCNIError finds the plugin's error inside libcni's wrapping.
func asCNIError(err error, out **types.Error) bool { return errors.As(err, out) }

func TestGCReleasesWhatIsNotValid(t *testing.T) {
	n := newNode(t, "1.1.0", nil)
	c := ctx(t)
	keep := n.addPod("keep")
	n.addPod("gone1")
	n.addPod("gone2")
	// A stray flatnet veth on the bridge with no reservation at all.
	n.ns.Do(func(ns.NetNS) error {
		br, _ := netlinksafe.LinkByName(bridge)
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: dataplane.HostVethName("stray", "eth0"), MasterIndex: br.Attrs().Index}, PeerName: "fntstraypeer"}
		return netlink.LinkAdd(v)
	})
	err := n.rt.GC(c, []types.GCAttachment{{ContainerID: keep.att.ContainerID, IfName: "eth0"}})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	r := n.reservations()
	if len(r) != 1 || r[0].IP != keep.ip {
		t.Fatalf("after GC: %v", r)
	}
	if v := n.hostVeths(); len(v) != 1 || v[0] != dataplane.HostVethName(keep.att.ContainerID, "eth0") {
		t.Fatalf("veths after GC: %v", v)
	}
	if err := n.rt.Check(c, keep.att); err != nil {
		t.Fatalf("kept pod broken by GC: %v", err)
	}
}

func TestStatusAndNodeStateFile(t *testing.T) {
	n := newNode(t, "1.1.0", map[string]any{"noSubnet": true})
	c := ctx(t)
	err := n.rt.Status(c)
	var e *types.Error
	if !asCNIError(err, &e) || e.Code != types.ErrPluginNotAvailable || !strings.Contains(e.Details, "node.json") {
		t.Fatalf("STATUS without a subnet: %v", err)
	}
	// ADD before the agent wrote the node state: "try again later".
	_, err = n.tryAddPod("early", nil)
	if !asCNIError(err, &e) || e.Code != types.ErrTryAgainLater {
		t.Fatalf("ADD without a subnet: %v", err)
	}
	st := &nodestate.State{Subnet: netip.MustParsePrefix("10.250.3.0/24"), Gateway: netip.MustParseAddr("10.250.3.1"), MTU: 1450, ClusterCIDR: netip.MustParsePrefix("10.250.0.0/16")}
	if err := nodestate.Write(n.pluginC["nodeStateFile"].(string), st); err != nil {
		t.Fatal(err)
	}
	if err := n.rt.Status(c); err != nil {
		t.Fatalf("STATUS with node state: %v", err)
	}
	p := n.addPod("p")
	checkResult(t, p, st.Subnet, st.Gateway)
	p.ns.Do(func(ns.NetNS) error {
		l, _ := netlinksafe.LinkByName("eth0")
		if l.Attrs().MTU != 1450 {
			t.Errorf("pod MTU %d, want the node state's 1450", l.Attrs().MTU)
		}
		return nil
	})
}

func TestParallelAddsGetDistinctAddressesAndDelsLeaveNothing(t *testing.T) {
	n := newNode(t, "1.0.0", nil)
	c := ctx(t)
	const pods, workers = 100, 16
	nss := make([]ns.NetNS, pods)
	for i := range nss {
		nss[i] = testutil.NewNS(t, fmt.Sprintf("p%d", i))
	}
	att := func(i int) cniruntime.Attachment {
		return cniruntime.Attachment{ContainerID: fmt.Sprintf("par-%03d", i), NetNS: nss[i].Path(), IfName: "eth0"}
	}
	ips := make([]string, pods)
	run := func(op func(i int) error) {
		var wg sync.WaitGroup
		jobs := make(chan int)
		errs := make(chan error, pods)
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range jobs {
					if err := op(i); err != nil {
						errs <- fmt.Errorf("pod %d: %w", i, err)
					}
				}
			}()
		}
		for i := 0; i < pods; i++ {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	run(func(i int) error {
		res, err := n.rt.Add(c, att(i))
		if err != nil {
			return err
		}
		r, _ := current.NewResultFromResult(res)
		ips[i] = r.IPs[0].Address.IP.String()
		return nil
	})
	seen := map[string]int{}
	for i, ip := range ips {
		if j, dup := seen[ip]; dup {
			t.Fatalf("pods %d and %d both got %s", j, i, ip)
		}
		seen[ip] = i
	}
	if len(n.reservations()) != pods || len(n.hostVeths()) != pods {
		t.Fatalf("%d reservations, %d veths after %d ADDs", len(n.reservations()), len(n.hostVeths()), pods)
	}
	run(func(i int) error { return n.rt.Del(c, att(i)) })
	if v := n.hostVeths(); len(v) != 0 {
		t.Fatalf("%d veths left", len(v))
	}
	if r := n.reservations(); len(r) != 0 {
		t.Fatalf("%d reservations left", len(r))
	}
}

func TestExhaustedSubnetLeavesNothing(t *testing.T) {
	n := newNode(t, "1.0.0", map[string]any{"subnet": "10.0.0.0/29"})
	for i := 0; i < 5; i++ {
		n.addPod(fmt.Sprintf("p%d", i))
	}
	_, err := n.tryAddPod("onetoomany", nil)
	var e *types.Error
	if !asCNIError(err, &e) || e.Code != cni.ErrSubnetExhausted || !strings.Contains(e.Error(), "10.0.0.0/29") {
		t.Fatalf("6th ADD on a /29: %v", err)
	}
	if v := n.hostVeths(); len(v) != 5 {
		t.Fatalf("veths: %d, want 5", len(v))
	}
	if r := n.reservations(); len(r) != 5 {
		t.Fatalf("reservations: %d, want 5", len(r))
	}
}

func TestFailedAddReleasesAddressAndVeth(t *testing.T) {
	for _, stage := range []string{"ipam", "veth"} {
		t.Run(stage, func(t *testing.T) {
			n := newNode(t, "1.0.0", nil)
			_, err := n.tryAddPod("p", [][2]string{{"IgnoreUnknown", "1"}, {"FLATNET_FAIL_AFTER", stage}})
			if err == nil || !strings.Contains(err.Error(), "injected failure after "+stage) {
				t.Fatalf("want the injected failure, got %v", err)
			}
			if v := n.hostVeths(); len(v) != 0 {
				t.Fatalf("veth left after failed ADD: %v", v)
			}
			if r := n.reservations(); len(r) != 0 {
				t.Fatalf("address left after failed ADD: %v", r)
			}
		})
	}
	// A natural failure after IPAM: the pod already has an eth0.
	n := newNode(t, "1.0.0", nil)
	h := testutil.NewNS(t, "busy")
	if err := h.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}})
	}); err != nil {
		t.Fatal(err)
	}
	_, err := n.rt.Add(ctx(t), cniruntime.Attachment{ContainerID: "busy", NetNS: h.Path(), IfName: "eth0"})
	if err == nil {
		t.Fatal("ADD into a pod that already has eth0 succeeded")
	}
	if r := n.reservations(); len(r) != 0 {
		t.Fatalf("address left after failed ADD: %v", r)
	}
}

// execPlugin runs the binary directly, the way a runtime execs it, inside
// a throwaway node namespace, and returns stdout and the exit error.
func execPlugin(t *testing.T, env map[string]string, stdin string) (string, error) {
	t.Helper()
	nodeNS := testutil.NewNS(t, "raw")
	cmd := exec.Command(filepath.Join(testutil.Binaries(t), "flatnet"))
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := nsutil.Start(nodeNS, cmd); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	return out.String(), err
}

func TestBadInputGetsCNIErrorCodes(t *testing.T) {
	podNS := testutil.NewNS(t, "pod")
	dir := t.TempDir()
	good := func(extra string) string {
		return fmt.Sprintf(`{"cniVersion":"1.0.0","name":"fntnet","type":"flatnet","bridge":"fntbad0","dataDir":%q%s}`, dir, extra)
	}
	baseEnv := func(cmd string) map[string]string {
		return map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": "bad", "CNI_NETNS": podNS.Path(), "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
	}
	cases := []struct {
		name   string
		env    map[string]string
		stdin  string
		code   uint
		detail string
	}{
		{"unsupported version", baseEnv("ADD"), `{"cniVersion":"0.2.0","name":"fntnet","type":"flatnet","subnet":"10.1.0.0/24"}`, types.ErrIncompatibleCNIVersion, ""},
		{"future version", baseEnv("ADD"), `{"cniVersion":"9.9.9","name":"fntnet","type":"flatnet","subnet":"10.1.0.0/24"}`, types.ErrIncompatibleCNIVersion, ""},
		{"missing CNI_CONTAINERID", func() map[string]string { e := baseEnv("ADD"); delete(e, "CNI_CONTAINERID"); return e }(), good(`,"subnet":"10.1.0.0/24"`), types.ErrInvalidEnvironmentVariables, ""},
		{"missing netns", func() map[string]string {
			e := baseEnv("ADD")
			e["CNI_NETNS"] = "/run/netns/fnt-does-not-exist"
			return e
		}(), good(`,"subnet":"10.1.0.0/24"`), types.ErrInvalidEnvironmentVariables, "fnt-does-not-exist"},
		{"undecodable", baseEnv("ADD"), `{"cniVersion":"1.0.0","name":"fntnet","type":"flatnet","mtu":"big"}`, types.ErrDecodingFailure, ""},
		{"not json", baseEnv("ADD"), `cniVersion: 1.0.0`, types.ErrDecodingFailure, ""},
		{"/33", baseEnv("ADD"), good(`,"subnet":"10.0.0.0/33"`), types.ErrInvalidNetworkConfig, "10.0.0.0/33"},
		{"gateway outside", baseEnv("ADD"), good(`,"subnet":"10.0.0.0/24","gateway":"10.0.1.1"`), types.ErrInvalidNetworkConfig, "outside subnet"},
		{"relative dataDir", baseEnv("ADD"), `{"cniVersion":"1.0.0","name":"fntnet","type":"flatnet","subnet":"10.0.0.0/24","dataDir":"var/lib"}`, types.ErrInvalidNetworkConfig, "absolute"},
		{"bad bridge name", baseEnv("ADD"), good(`,"subnet":"10.0.0.0/24","bridge":"this-name-is-far-too-long"`), types.ErrInvalidNetworkConfig, "interface name"},
		{"no subnet yet", baseEnv("ADD"), good(`,"nodeStateFile":"/nonexistent/node.json"`), types.ErrTryAgainLater, "flatnetd"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, err := execPlugin(t, tc.env, tc.stdin)
			if err == nil {
				t.Fatalf("exit 0, stdout %s", out)
			}
			var e types.Error
			if jerr := json.Unmarshal([]byte(out), &e); jerr != nil {
				t.Fatalf("stdout is not a CNI error: %q", out)
			}
			if e.Code != tc.code || e.Msg == "" {
				t.Fatalf("code %d (%s), want %d", e.Code, out, tc.code)
			}
			if !strings.Contains(e.Msg+e.Details, tc.detail) {
				t.Fatalf("error %q does not mention %q", out, tc.detail)
			}
		})
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "ipam", "fntnet")); len(entries) > 1 {
		t.Fatalf("bad input left IPAM records: %v", entries)
	}
}

func TestVersionListsSupportedVersions(t *testing.T) {
	out, err := execPlugin(t, map[string]string{"CNI_COMMAND": "VERSION"}, "")
	if err != nil {
		t.Fatal(err, out)
	}
	var v struct {
		Supported []string `json:"supportedVersions"`
	}
	json.Unmarshal([]byte(out), &v)
	for _, want := range allVersions {
		if !strings.Contains(strings.Join(v.Supported, ","), want) {
			t.Fatalf("VERSION %s lacks %s", out, want)
		}
	}
}
