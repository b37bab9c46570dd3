// Package k8s_test is flatnet the way users install it: a Kubernetes
// cluster built on this machine (control plane in the lab's hub, each lab
// node running its own containerd, kubelet and kube-proxy, no pod network)
// gets `kubectl apply -f deploy/flatnet.yaml`; every node turns Ready, pods
// get flatnet addresses, and the upstream sig-network e2e specs for
// pod-to-pod and node-to-pod traffic run against it (e2e.test v1.37.2,
// from the hub). `make e2e-k8s` runs it; the record of the run (specs run,
// passed, and every other sig-network spec with why it did not run) goes
// to bin/e2e-k8s/summary.md.
//
// Prerequisites (the test fails, naming them, when one is missing): root;
// hack/k8s/build.sh all; hack/cri/tools.sh; hack/k8s/netcat.sh; apt
// iptables curl dash; make build.
package k8s_test

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/flatnet-io/flatnet/deploy"
	"github.com/flatnet-io/flatnet/pkg/crinode"
	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/ipam"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/kubenode"
	"github.com/flatnet-io/flatnet/pkg/kubetest"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/lab/labtest"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

const (
	busyboxBin = "/bin/busybox" // Debian's busybox-static
	nodes      = 2
	// Set to run the Service checks (through kube-proxy) too.
	envServices = "E2E_K8S_SERVICES"
)

// runRoot holds one directory per run, named k<pid>; a run whose process
// is gone left it behind, and the next run removes it.
var runRoot = filepath.Join(os.TempDir(), "flatnet-e2e-k8s")

// clock prints progress lines with the time since the run started.
type clock struct {
	start time.Time
	lines []string
}

func (c *clock) say(format string, a ...any) {
	line := fmt.Sprintf("[%6.1fs] %s", time.Since(c.start).Seconds(), fmt.Sprintf(format, a...))
	fmt.Println(line)
	c.lines = append(c.lines, line)
}

// Write makes the clock a progress writer: one say per line.
func (c *clock) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		c.say("%s", line)
	}
	return len(b), nil
}

// prerequisites finds everything the run needs, or fails naming it.
type prerequisites struct {
	root, bin, k8s, crictl, nc string
}

func findPrerequisites(t *testing.T) prerequisites {
	t.Helper()
	testutil.RequireRoot(t)
	p := prerequisites{root: testutil.ModuleRoot(t)}
	p.bin = filepath.Join(p.root, "bin")
	var err error
	if p.k8s, err = kubetest.BinDir(); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{kubecluster.Scheduler, "kubectl", kubenode.Kubelet, kubenode.KubeProxy, "e2e.test", "agnhost"} {
		if _, err := os.Stat(filepath.Join(p.k8s, b)); err != nil {
			t.Fatalf("%s missing in %s: run hack/k8s/build.sh all", b, p.k8s)
		}
	}
	if p.crictl, err = crinode.CrictlBin(p.root); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(p.root, "hack/k8s/netcat.sh"), "--print-dir").Output()
	if err != nil {
		t.Fatal(err)
	}
	p.nc = strings.TrimSpace(string(out))
	for _, f := range []string{busyboxBin, "/usr/bin/curl", "/bin/dash", filepath.Join(p.nc, "bin/nc.openbsd")} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("%v: run hack/cri/tools.sh, hack/k8s/netcat.sh and apt-get install curl dash", err)
		}
	}
	for _, prog := range []string{"iptables", "iptables-restore"} {
		if _, err := exec.LookPath(prog); err != nil {
			t.Fatalf("%s not found: kube-proxy needs it (apt-get install iptables)", prog)
		}
	}
	// The image is built from bin/: it must be there and newer than the
	// code that goes into it, or the run would test something else.
	built, err := os.Stat(filepath.Join(p.bin, "flatnetd"))
	if err != nil {
		t.Fatalf("%v: run make build", err)
	}
	list := exec.Command("go", "list", "-deps", "-f", `{{if not .Standard}}{{range .GoFiles}}{{$.Dir}}/{{.}}
{{end}}{{end}}`, "./cmd/flatnetd", "./cmd/flatnet")
	list.Dir = p.root
	out, err = list.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, f := range strings.Fields(string(out)) {
		if st, err := os.Stat(f); err == nil && strings.HasPrefix(f, p.root) && st.ModTime().After(built.ModTime()) {
			t.Fatalf("bin/flatnetd is older than %s: run make build", f)
		}
	}
	return p
}

// sweep removes what earlier runs whose process is gone left behind:
// node processes, mount namespaces, cgroups, the lab.
func sweep(t *testing.T) {
	entries, _ := os.ReadDir(runRoot)
	for _, e := range entries {
		pid, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "k"))
		if err != nil || syscall.Kill(pid, 0) == nil {
			continue
		}
		// e2e.test and kubectl of that run, which name its kubeconfig.
		for pid := range testutil.ProcessesUnder(filepath.Join(runRoot, e.Name())) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if s, err := lab.Load(runRoot, e.Name()); err == nil {
			for _, n := range s.Nodes {
				if err := kubenode.RemoveLeftovers(s, n); err != nil {
					t.Logf("leftovers of %s/%s: %v", e.Name(), n.Name, err)
				}
			}
			kubenode.RemoveMountNSDir(s)
		}
		if err := lab.Down(runRoot, e.Name()); err != nil {
			t.Logf("removing the lab of an earlier run (%s): %v", e.Name(), err)
		} else {
			t.Logf("removed what an earlier run (%s) left", e.Name())
		}
	}
}

func TestKubectlApplyFlatnetAndUpstreamE2E(t *testing.T) {
	p := findPrerequisites(t)
	c := &clock{start: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()
	sweep(t)

	guard, err := kubenode.NewGuard()
	if err != nil {
		t.Fatal(err)
	}
	c.say("machine-wide sysctls before: %s", guard)
	hostCNI := hostPathsNow()

	name := fmt.Sprintf("k%d", os.Getpid())
	work := filepath.Join(runRoot, name, "images") // removed with the lab's directory
	if err := os.MkdirAll(work, 0o755); err != nil {
		t.Fatal(err)
	}
	images, err := buildImages(ctx, p.root, p.bin, p.k8s, p.nc, work)
	if err != nil {
		t.Fatal(err)
	}
	flatnetImage, _ := manifestImage()
	c.say("images packed (no registry): %s (bin/), %s, %s, %s, %s", flatnetImage, crinode.PauseImage, pauseImage, agnhostImage, busyboxImage)

	// The lab: hub (control plane) and node namespaces, no agents.
	t.Cleanup(func() {
		if t.Failed() {
			labtest.DumpLogs(t, runRoot, name)
		}
		if err := lab.Down(runRoot, name); err != nil {
			t.Errorf("lab down: %v", err)
		}
		if left, _ := nsutil.List(lab.Prefix(name)); len(left) > 0 {
			t.Errorf("namespaces left: %v", left)
		}
		if err := guard.Check(); err != nil {
			t.Error(err)
		} else {
			c.say("machine-wide sysctls after teardown: unchanged (%s)", guard)
		}
		if now := hostPathsNow(); now != hostCNI {
			t.Errorf("the machine's own node paths changed: before %s, after %s", hostCNI, now)
		}
	})
	s, err := lab.Up(ctx, lab.Options{Name: name, Root: runRoot, BinDir: p.bin, Nodes: nodes,
		Datastore: lab.DatastoreKubernetes, KubeBinDir: p.k8s, KubeletNodes: true, Progress: os.Stdout})
	if err != nil {
		t.Fatal(err)
	}
	assertHubHasNoDefaultRoute(t, s)
	c.say("hub %s has no default route: nothing sent in the cluster can leave this machine", s.Hub.NetNS)
	cs, err := s.KubeClient()
	if err != nil {
		t.Fatal(err)
	}

	// Nodes: containerd + kubelet + kube-proxy each, no CNI config.
	var kn []*kubenode.Node
	t.Cleanup(func() { stopNodes(t, c, s, cs, kn) })
	opts := kubenode.Options{KubeBinDir: p.k8s, Crictl: p.crictl, Loopback: crinode.LoopbackPlugin, Images: images, Progress: c}
	if err := kubenode.CheckBinaries(opts); err != nil {
		t.Fatal(err)
	}
	for _, n := range s.Nodes {
		node, err := kubenode.Start(ctx, s, n, opts, guard)
		if node != nil {
			kn = append(kn, node)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	c.say("kubelet, containerd and kube-proxy started on %d nodes; machine-wide sysctls unchanged", len(kn))
	for _, n := range kn {
		cond := waitNode(t, ctx, cs, n, func(nd *corev1.Node) error {
			if r := condition(nd, corev1.NodeReady); r == nil || r.Status == corev1.ConditionTrue {
				return fmt.Errorf("node %s not registered NotReady yet", n.Name)
			}
			return nil
		})
		c.say("node %s registered, NotReady as it must be without a pod network: %s", n.Name, cond)
	}
	if err := guard.Check(); err != nil {
		t.Fatal(err)
	}

	// The one command.
	var out strings.Builder
	err = inHub(ctx, s, &out, filepath.Join(p.k8s, "kubectl"), "--kubeconfig", s.KubeSpec().AdminKubeconfig(),
		"apply", "-f", filepath.Join(p.root, "deploy/flatnet.yaml"))
	if err != nil {
		t.Fatalf("kubectl apply: %v\n%s", err, out.String())
	}
	c.say("kubectl apply -f deploy/flatnet.yaml (unchanged: the image is imported under the manifest's own name):\n%s", strings.TrimSpace(out.String()))
	for _, n := range kn {
		waitNode(t, ctx, cs, n, func(nd *corev1.Node) error {
			if r := condition(nd, corev1.NodeReady); r == nil || r.Status != corev1.ConditionTrue {
				return fmt.Errorf("node %s not Ready", n.Name)
			}
			if u := condition(nd, corev1.NodeNetworkUnavailable); u == nil || u.Status != corev1.ConditionFalse {
				return fmt.Errorf("node %s: flatnet has not set NetworkUnavailable=False", n.Name)
			}
			return nil
		})
		nd, _ := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		r, u := condition(nd, corev1.NodeReady), condition(nd, corev1.NodeNetworkUnavailable)
		c.say("node %s: Ready=%s (%s), NetworkUnavailable=%s (%s: %s), podCIDR %s; /opt/cni/bin: %s; /etc/cni/net.d: %s",
			n.Name, r.Status, r.Message, u.Status, u.Reason, u.Message, nd.Spec.PodCIDR,
			listDir(kubenode.HostDir(n.Node, "/opt/cni/bin")), listDir(kubenode.HostDir(n.Node, "/etc/cni/net.d")))
	}
	for _, line := range podIPs(t, ctx, cs, kn) {
		c.say("%s", line)
	}
	if err := guard.Check(); err != nil {
		t.Fatal(err)
	}

	runE2E(t, ctx, c, p, s)
}

// hostPathsNow describes the machine's own CNI and flatnet paths, which the
// nodes must never touch.
func hostPathsNow() string {
	var parts []string
	for _, p := range kubenode.HostPaths {
		parts = append(parts, p+"="+listDir(p))
	}
	return strings.Join(parts, " ")
}

func listDir(dir string) string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "(absent)"
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return "[" + strings.Join(names, " ") + "]"
}

func assertHubHasNoDefaultRoute(t *testing.T, s *lab.State) {
	t.Helper()
	h, err := ns.GetNS(nsutil.Path(s.Hub.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	err = h.Do(func(ns.NetNS) error {
		routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: syscall.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				return fmt.Errorf("the hub has a default route (%v): traffic could leave this machine", r)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// inHub runs a command in the hub's network namespace, output to w.
func inHub(ctx context.Context, s *lab.State, w io.Writer, argv ...string) error {
	h, err := ns.GetNS(nsutil.Path(s.Hub.NetNS))
	if err != nil {
		return err
	}
	defer h.Close()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = w, w
	if err := nsutil.Start(h, cmd); err != nil {
		return err
	}
	return cmd.Wait()
}

func condition(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// waitNode polls node n until ok accepts it (2 min), failing early when its
// kubelet or kube-proxy exits; it returns the Ready condition's message.
func waitNode(t *testing.T, ctx context.Context, cs kubernetes.Interface, n *kubenode.Node, ok func(*corev1.Node) error) string {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		err := n.Alive()
		if err == nil {
			var nd *corev1.Node
			if nd, err = cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{}); err == nil {
				if err = ok(nd); err == nil {
					r := condition(nd, corev1.NodeReady)
					return fmt.Sprintf("Ready=%s %s: %s", r.Status, r.Reason, r.Message)
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 2m: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// podIPs runs a pod on every node and proves it got a flatnet address: in
// the node's podCIDR, held by flatnet's IPAM on that node.
func podIPs(t *testing.T, ctx context.Context, cs kubernetes.Interface, kn []*kubenode.Node) []string {
	t.Helper()
	var lines []string
	for _, n := range kn {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "ip-" + n.Name, Namespace: "default"},
			Spec: corev1.PodSpec{NodeName: n.Name, TerminationGracePeriodSeconds: ptr.To[int64](1),
				Containers: []corev1.Container{{Name: "c", Image: agnhostImage, Args: []string{"pause"}}}}}
		if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range kn {
		var pod *corev1.Pod
		deadline := time.Now().Add(2 * time.Minute)
		for {
			var err error
			pod, err = cs.CoreV1().Pods("default").Get(ctx, "ip-"+n.Name, metav1.GetOptions{})
			if err == nil && pod.Status.Phase == corev1.PodRunning && pod.Status.PodIP != "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pod ip-%s not running after 2m: %v %+v", n.Name, err, pod.Status)
			}
			time.Sleep(200 * time.Millisecond)
		}
		nd, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ip, err := netip.ParseAddr(pod.Status.PodIP)
		if err != nil {
			t.Fatal(err)
		}
		cidr, err := netip.ParsePrefix(nd.Spec.PodCIDR)
		if err != nil || !cidr.Contains(ip) {
			t.Fatalf("pod %s on %s has %s, outside the node's podCIDR %q", pod.Name, n.Name, ip, nd.Spec.PodCIDR)
		}
		st, err := ipam.Open(kubenode.HostDir(n.Node, "/var/lib/flatnet"), "flatnet")
		if err != nil {
			t.Fatal(err)
		}
		rs, err := st.List()
		if err != nil {
			t.Fatal(err)
		}
		held := ""
		for _, r := range rs {
			if r.IP == ip {
				held = r.Key.ContainerID
			}
		}
		if held == "" {
			t.Fatalf("pod %s has %s, which flatnet's IPAM on %s does not hold", pod.Name, ip, n.Name)
		}
		lines = append(lines, fmt.Sprintf("pod %s on %s: IP %s, inside podCIDR %s, held by flatnet's IPAM for sandbox %.12s",
			pod.Name, n.Name, ip, cidr, held))
	}
	return lines
}

// stopNodes deletes every pod through the API (so kubelets unmount their
// volumes and the CNI plugin releases addresses), then stops the nodes.
func stopNodes(t *testing.T, c *clock, s *lab.State, cs kubernetes.Interface, kn []*kubenode.Node) {
	if t.Failed() {
		for _, n := range kn {
			for _, l := range n.Logs() {
				t.Logf("---- %s\n%s", l, fileutil.Tail(l, 30))
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if len(kn) > 0 {
		// The DaemonSet first, or it would bring its pods back.
		cs.AppsV1().DaemonSets(deploy.Namespace).Delete(ctx, deploy.DaemonSet, metav1.DeleteOptions{})
		nss, _ := cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		for _, n := range nss.Items {
			cs.CoreV1().Pods(n.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](1)}, metav1.ListOptions{})
		}
		// kubelet keeps the grace period a pod's deletion started with (e2e's
		// terminating-pod specs give 100 s); after a while, force those:
		// containerd's Stop then stops their sandboxes (CNI DEL), and their
		// volume mounts go with the node's mount namespace.
		forceAt := time.Now().Add(15 * time.Second)
		for {
			pods, err := cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
			if err == nil && len(pods.Items) == 0 {
				c.say("all pods deleted through the API")
				break
			}
			if ctx.Err() != nil {
				t.Errorf("pods still there after 3m: %v", err)
				break
			}
			if err == nil && time.Now().After(forceAt) {
				var names []string
				for _, p := range pods.Items {
					names = append(names, p.Namespace+"/"+p.Name)
					cs.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
				}
				c.say("force-deleted pods kubelet still gave an earlier, longer grace period: %s", strings.Join(names, ", "))
				forceAt = time.Now().Add(time.Hour)
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	for _, n := range kn {
		if err := n.Stop(); err != nil {
			t.Errorf("stop node %s: %v", n.Name, err)
		}
		assertNodeGone(t, s, n)
	}
	if err := kubenode.RemoveMountNSDir(s); err != nil {
		t.Error(err)
	}
	if len(kn) > 0 {
		c.say("nodes stopped: no kubelet, kube-proxy, containerd, shim, mount namespace or cgroup left")
	}
}

// assertNodeGone checks that nothing of node n's Kubernetes parts is left.
func assertNodeGone(t *testing.T, s *lab.State, n *kubenode.Node) {
	if _, err := os.Stat(kubenode.MountNS(s, n.Node)); err == nil {
		t.Errorf("mount namespace of %s still pinned", n.Name)
	}
	if left, _ := filepath.Glob("/sys/fs/cgroup/*" + kubenode.CgroupRoot(n.Node)); len(left) > 0 {
		t.Errorf("cgroups left: %v", left)
	}
	testutil.AssertNoProcessUnder(t, n.Dir)
}

// runE2E runs e2e.test from the hub and writes the record of the run.
func runE2E(t *testing.T, ctx context.Context, c *clock, p prerequisites, s *lab.State) {
	withServices := os.Getenv(envServices) != ""
	report := filepath.Join(p.bin, "e2e-k8s")
	os.RemoveAll(report)
	if err := os.MkdirAll(report, 0o755); err != nil {
		t.Fatal(err)
	}
	args := []string{filepath.Join(p.k8s, "e2e.test"),
		"--kubeconfig=" + s.KubeSpec().AdminKubeconfig(), "--kubectl-path=" + filepath.Join(p.k8s, "kubectl"),
		"--provider=skeleton", "--report-dir=" + report,
		"--ginkgo.focus=" + focus(withServices), "--ginkgo.skip=" + skip,
		"--ginkgo.timeout=40m", "--ginkgo.v", "--ginkgo.no-color"}
	c.say("e2e.test (in %s): --ginkgo.focus='%s' --ginkgo.skip='%s'", s.Hub.NetNS, focus(withServices), skip)
	logPath := filepath.Join(report, "e2e.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	start := time.Now()
	err = inHub(ctx, s, logf, args...)
	took := time.Since(start)
	specs, rerr := readReport(filepath.Join(report, "junit_01.xml"))
	if rerr != nil {
		t.Fatalf("e2e.test (%v): no report: %v; its output: %s", err, rerr, logPath)
	}
	header := strings.Join(c.lines, "\n")
	text, ran, passed, failed := summary(specs, "```\n"+header+"\n```", took)
	sumPath := filepath.Join(report, "summary.md")
	if err := os.WriteFile(sumPath, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	c.say("e2e.test: %d sig-network specs ran, %d passed, %d failed, in %s; record: %s, log: %s",
		ran, passed, len(failed), took.Round(time.Second), sumPath, logPath)
	if err != nil || len(failed) > 0 {
		t.Fatalf("e2e.test: %v; failed: %s (log %s)", err, strings.Join(failed, "\n"), logPath)
	}
	conformance := 0
	for _, sp := range specs {
		if strings.Contains(sp.Name, "Networking Granular Checks: Pods") && strings.Contains(sp.Name, "[Conformance]") && sp.Status == "passed" {
			conformance++
		}
	}
	if conformance != 4 {
		t.Fatalf("%d of the 4 [Conformance] Networking Granular Checks: Pods specs passed (record %s)", conformance, sumPath)
	}
}
