package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/flatnet-io/flatnet/deploy"
	"github.com/flatnet-io/flatnet/pkg/datastore"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/kubetest"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// cluster is this package's real control plane: etcd, kube-apiserver and
// kube-controller-manager (node IPAM, 10.244.0.0/16).
var cluster *kubetest.Cluster

func TestMain(m *testing.M) { kubetest.Main(m, &cluster) }

var clusterCIDR = netip.MustParsePrefix(kubetest.ClusterCIDR)

// ---- helpers ----

func newStore(t *testing.T, rc *rest.Config, logs *testutil.Logs, mod func(*Config)) *Store {
	t.Helper()
	cfg := Config{REST: rc, ClusterCIDR: clusterCIDR, ConfirmEvery: 200 * time.Millisecond, Logger: logs.Logger()}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.minBackoff, s.maxBackoff = 20*time.Millisecond, 200*time.Millisecond
	t.Cleanup(func() { s.Close() })
	return s
}

// createNode creates a Node as the kubelet would (podCIDR empty: the
// controller manager assigns it, unless podCIDR is given) and deletes it
// when the test ends.
func createNode(t *testing.T, name, podCIDR string) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if podCIDR != "" {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = podCIDR, []string{podCIDR}
	}
	if _, err := cluster.Client.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deleteNode(t, name) })
}

func deleteNode(t *testing.T, name string) {
	err := cluster.Client.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("delete node %s: %v", name, err)
	}
}

func getNode(t *testing.T, name string) *corev1.Node {
	t.Helper()
	n, err := cluster.Client.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitPodCIDR waits for the controller manager to give name a podCIDR.
func waitPodCIDR(t *testing.T, name string) netip.Prefix {
	t.Helper()
	var p netip.Prefix
	waitFor(t, 30*time.Second, name+" gets a podCIDR", func() bool {
		var err error
		p, err = podSubnet(getNode(t, name))
		return err == nil
	})
	return p
}

func waitFor(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	testutil.WaitFor(t, timeout, what, ok, func() string {
		return "kube-controller-manager log:\n" + cluster.LogTail(kubecluster.ControllerManager, 10)
	})
}

// patchAsPeer publishes a peer's annotations the way its agent would.
func patchAsPeer(t *testing.T, name string, ann map[string]string) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	_, err := cluster.Client.CoreV1().Nodes().Patch(context.Background(), name, types.StrategicMergePatchType, b, metav1.PatchOptions{}, "status")
	if err != nil {
		t.Fatal(err)
	}
}

func nodeInfo(name string, last byte) datastore.NodeInfo {
	return datastore.NodeInfo{Name: name, UnderlayIP: netip.AddrFrom4([4]byte{10, 99, 1, last}), Backend: "vxlan",
		BackendData: datastore.BackendData{VTEPMAC: fmt.Sprintf("0e:00:00:00:00:%02x", last), VNI: 1, Port: 8472}}
}

// next returns the next snapshot, failing after timeout.
func next(t *testing.T, ch <-chan []datastore.Lease, timeout time.Duration) []datastore.Lease {
	t.Helper()
	select {
	case s, ok := <-ch:
		if !ok {
			t.Fatal("watch channel closed")
		}
		return s
	case <-time.After(timeout):
		t.Fatalf("no snapshot within %v", timeout)
		return nil
	}
}

// waitSnapshot reads snapshots until ok accepts one.
func waitSnapshot(t *testing.T, ch <-chan []datastore.Lease, what string, ok func(map[string]datastore.Lease) bool) map[string]datastore.Lease {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		m := map[string]datastore.Lease{}
		for _, l := range next(t, ch, time.Until(deadline)) {
			m[l.Node] = l
		}
		if ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot with %s; last: %v", what, m)
		}
	}
}

// ---- tests against the API server ----

// The manifest applies to a real API server, and the agent's store does
// all it needs with a token of the manifest's service account, and no more.
func TestStoreWorksUnderTheManifestsRBAC(t *testing.T) {
	ctx := context.Background()
	applied, err := kubecluster.Apply(ctx, cluster.Admin, deploy.Manifest, false)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"Namespace/flatnet-system", "ServiceAccount/flatnet", "ClusterRole/flatnet", "ClusterRoleBinding/flatnet", "ConfigMap/flatnet", "DaemonSet/flatnet"}
	if !slices.Equal(applied, want) {
		t.Fatalf("applied %v, want %v", applied, want)
	}
	// Applying again (as an upgrade would) is clean too.
	if _, err := kubecluster.Apply(ctx, cluster.Admin, deploy.Manifest, true); err != nil {
		t.Fatalf("dry-run re-apply: %v", err)
	}

	kc := filepath.Join(t.TempDir(), "flatnet.kubeconfig")
	err = kubecluster.ServiceAccountKubeconfig(ctx, cluster.Client, deploy.Namespace, deploy.ServiceAccount, time.Hour,
		cluster.Spec.URL(), cluster.Spec.CAFile(), kc)
	if err != nil {
		t.Fatal(err)
	}
	createNode(t, "rbac-1", "")
	subnet := waitPodCIDR(t, "rbac-1")

	logs := testutil.NewLogs(t)
	s := newStore(t, nil, logs, func(c *Config) { c.Kubeconfig = kc })
	self := nodeInfo("rbac-1", 11)
	self.PreferredSubnet = netip.MustParsePrefix("10.244.254.0/24") // only compared: the API decides
	lease, err := s.Register(ctx, self)
	if err != nil {
		t.Fatal(err)
	}
	wantLease := datastore.Lease{Node: "rbac-1", Subnet: subnet, UnderlayIP: self.UnderlayIP, Backend: "vxlan", BackendData: self.BackendData}
	if lease != wantLease {
		t.Fatalf("lease %+v, want %+v", lease, wantLease)
	}
	if logs.Count(slog.LevelWarn, "podCIDR differs from the subnet this node had before") != 1 {
		t.Error("no warning about the changed subnet")
	}
	if !s.LeaseHeld() {
		t.Error("LeaseHeld false after Register")
	}
	if got, err := leaseOf(getNode(t, "rbac-1")); err != nil || got != wantLease {
		t.Fatalf("the Node's annotations say %+v (%v), want %+v", got, err, wantLease)
	}
	if networkAvailable(getNode(t, "rbac-1")) {
		t.Fatal("NetworkUnavailable=False before MarkReady")
	}
	if err := s.MarkReady(ctx); err != nil {
		t.Fatal(err)
	}
	n := getNode(t, "rbac-1")
	if !networkAvailable(n) {
		t.Fatalf("no NetworkUnavailable=False after MarkReady: %+v", n.Status.Conditions)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch, err := s.Watch(wctx)
	if err != nil {
		t.Fatal(err)
	}
	waitSnapshot(t, ch, "rbac-1", func(m map[string]datastore.Lease) bool { return m["rbac-1"] == wantLease })

	// Least privilege: the token cannot write Nodes themselves (spec,
	// labels, deletion), only the status subresource.
	sa := clientFor(t, kc)
	_, err = sa.CoreV1().Nodes().Patch(ctx, "rbac-1", types.MergePatchType, []byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("patching the Node (not its status) with the agent's token: %v, want forbidden", err)
	}
	if err := sa.CoreV1().Nodes().Delete(ctx, "rbac-1", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("deleting a Node with the agent's token: %v, want forbidden", err)
	}
	if _, err := sa.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("listing pods with the agent's token: %v, want forbidden", err)
	}
}

func clientFor(t *testing.T, kubeconfig string) kubernetes.Interface {
	t.Helper()
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// Register waits, woken by the informer, for the Node to exist and then
// for its podCIDR, and says what it waits for.
func TestRegisterWaitsForTheNodeAndItsPodCIDR(t *testing.T) {
	cluster.StopControllerManager()
	t.Cleanup(func() {
		if err := cluster.StartControllerManager(); err != nil && !strings.Contains(err.Error(), "already running") {
			t.Error(err)
		}
	})
	logs := testutil.NewLogs(t)
	s := newStore(t, cluster.Admin, logs, nil)
	type result struct {
		l   datastore.Lease
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := s.Register(context.Background(), nodeInfo("wait-1", 21))
		done <- result{l, err}
	}()
	waitFor(t, 20*time.Second, "the store says it waits for the Node", func() bool {
		return logs.Count(slog.LevelInfo, "no Node object with this name yet", "wait-1") > 0
	})
	createNode(t, "wait-1", "")
	waitFor(t, 20*time.Second, "the store says it waits for a podCIDR", func() bool {
		return logs.Count(slog.LevelInfo, "no IPv4 podCIDR yet", "wait-1") > 0
	})
	select {
	case r := <-done:
		t.Fatalf("Register returned before the Node had a podCIDR: %+v %v", r.l, r.err)
	default:
	}
	if s.LeaseHeld() {
		t.Fatal("LeaseHeld while waiting")
	}
	if err := cluster.StartControllerManager(); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatal(r.err)
		}
		if want := waitPodCIDR(t, "wait-1"); r.l.Subnet != want {
			t.Fatalf("lease subnet %s, the Node's podCIDR is %s", r.l.Subnet, want)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Register did not return after the podCIDR was assigned")
	}
}

func TestRegisterRejectsAPodCIDROutsideTheClusterCIDR(t *testing.T) {
	createNode(t, "outside-1", "")
	logs := testutil.NewLogs(t)
	s := newStore(t, cluster.Admin, logs, func(c *Config) { c.ClusterCIDR = netip.MustParsePrefix("10.200.0.0/16") })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := s.Register(ctx, nodeInfo("outside-1", 31))
	if !errors.Is(err, ErrOutsideClusterCIDR) || !strings.Contains(err.Error(), "--cluster-cidr") {
		t.Fatalf("got %v, want ErrOutsideClusterCIDR naming --cluster-cidr", err)
	}
}

// Watch follows Nodes as they come, publish and go; Nodes whose agent has
// not published, and malformed data, are left out.
func TestWatchFollowsNodes(t *testing.T) {
	logs := testutil.NewLogs(t)
	s := newStore(t, cluster.Admin, logs, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := s.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ch, 20*time.Second) // the initial set

	peer := func(name string, last byte) datastore.Lease {
		createNode(t, name, "")
		ann, err := annotationsOf(nodeInfo(name, last))
		if err != nil {
			t.Fatal(err)
		}
		patchAsPeer(t, name, ann)
		return datastore.Lease{Node: name, Subnet: waitPodCIDR(t, name), UnderlayIP: nodeInfo(name, last).UnderlayIP,
			Backend: "vxlan", BackendData: nodeInfo(name, last).BackendData}
	}
	a := peer("watch-a", 41)
	waitSnapshot(t, ch, "watch-a", func(m map[string]datastore.Lease) bool { return m["watch-a"] == a })

	createNode(t, "watch-silent", "") // no agent yet
	createNode(t, "watch-bad", "")
	waitPodCIDR(t, "watch-bad")
	patchAsPeer(t, "watch-bad", map[string]string{UnderlayIPAnnotation: "not-an-ip", BackendAnnotation: "vxlan"})
	c := peer("watch-c", 43)
	// Events arrive in order: once watch-c is in, the others were seen.
	m := waitSnapshot(t, ch, "watch-c", func(m map[string]datastore.Lease) bool { return m["watch-c"] == c })
	if _, ok := m["watch-silent"]; ok {
		t.Error("a Node without flatnet annotations is in the set")
	}
	if _, ok := m["watch-bad"]; ok {
		t.Error("a Node with a malformed underlay IP is in the set")
	}
	if m["watch-a"] != a {
		t.Errorf("watch-a is %+v, want %+v", m["watch-a"], a)
	}
	if logs.Count(slog.LevelWarn, "malformed", "watch-bad", "not-an-ip") != 1 {
		t.Error("the malformed Node was not logged exactly once")
	}

	deleteNode(t, "watch-a")
	waitSnapshot(t, ch, "watch-a gone", func(m map[string]datastore.Lease) bool {
		_, ok := m["watch-a"]
		return !ok && m["watch-c"] == c
	})

	cancel()
	waitFor(t, 10*time.Second, "the watch channel is closed", func() bool {
		select {
		case _, open := <-ch:
			return !open
		default:
			return false
		}
	})
}

// The store reads its Node back: what someone removed is republished,
// a deleted Node makes LeaseHeld false, and a re-created Node with the
// same podCIDR is taken over again.
func TestOwnDataIsConfirmedAndRepaired(t *testing.T) {
	ctx := context.Background()
	createNode(t, "keep-1", "")
	logs := testutil.NewLogs(t)
	s := newStore(t, cluster.Admin, logs, nil)
	lease, err := s.Register(ctx, nodeInfo("keep-1", 51))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.MarkReady(ctx); err != nil {
		t.Fatal(err)
	}
	repaired := func() bool {
		n := getNode(t, "keep-1")
		return published(n, lease, true)
	}

	if logs.Count(slog.LevelInfo, "republished") != 0 {
		t.Fatal("republished before anything was removed")
	}
	// Someone strips the annotations and the condition.
	strip := fmt.Sprintf(`{"metadata":{"annotations":{%q:null,%q:null,%q:null}},"status":{"conditions":[{"type":"NetworkUnavailable","$patch":"delete"}]}}`,
		UnderlayIPAnnotation, BackendAnnotation, BackendDataAnnotation)
	if _, err := cluster.Client.CoreV1().Nodes().Patch(ctx, "keep-1", types.StrategicMergePatchType, []byte(strip), metav1.PatchOptions{}, "status"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "annotations and condition are republished", func() bool {
		return logs.Count(slog.LevelInfo, "republished this node's annotations") > 0 && repaired()
	})

	deleteNode(t, "keep-1")
	// LeaseHeld turns false just before the warning is written.
	waitFor(t, 10*time.Second, "LeaseHeld false and the deletion logged", func() bool {
		return !s.LeaseHeld() && logs.Count(slog.LevelWarn, "the Node object was deleted") > 0
	})
	// The kubelet registers the Node again; it keeps its podCIDR.
	createNode(t, "keep-1", lease.Subnet.String())
	waitFor(t, 10*time.Second, "LeaseHeld turns true with the data republished", func() bool { return s.LeaseHeld() && repaired() })

	// Re-created with another podCIDR: this agent's subnet is gone.
	deleteNode(t, "keep-1")
	createNode(t, "keep-1", "10.244.251.0/24")
	waitFor(t, 10*time.Second, "LeaseHeld false and the change logged", func() bool {
		return !s.LeaseHeld() && logs.Count(slog.LevelWarn, "restart the agent") > 0
	})
}

// ---- pure logic ----

func TestLeaseOfReadsTheNode(t *testing.T) {
	self := nodeInfo("n1", 11)
	ann, err := annotationsOf(self)
	if err != nil {
		t.Fatal(err)
	}
	if ann[BackendDataAnnotation] != `{"vtepMAC":"0e:00:00:00:00:0b","vni":1,"port":8472}` {
		t.Errorf("backend-data annotation %s", ann[BackendDataAnnotation])
	}
	node := func(cidrs []string, ann map[string]string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Annotations: ann}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
	}
	want := datastore.Lease{Node: "n1", Subnet: netip.MustParsePrefix("10.244.3.0/24"), UnderlayIP: self.UnderlayIP,
		Backend: "vxlan", BackendData: self.BackendData}
	// Dual-stack: the IPv4 podCIDR is flatnet's, wherever it is.
	if got, err := leaseOf(node([]string{"fd00:10:244:3::/64", "10.244.3.0/24"}, ann)); err != nil || got != want {
		t.Errorf("dual-stack: %+v %v", got, err)
	}
	legacy := node(nil, ann)
	legacy.Spec.PodCIDR = "10.244.3.0/24"
	if got, err := leaseOf(legacy); err != nil || got != want {
		t.Errorf("spec.podCIDR only: %+v %v", got, err)
	}
	with := func(k, v string) map[string]string {
		m := map[string]string{}
		for a, b := range ann {
			m[a] = b
		}
		m[k] = v
		return m
	}
	cases := map[string]struct {
		n    *corev1.Node
		want string
	}{
		"no podCIDR":       {node(nil, ann), errNoPodCIDR.Error()},
		"IPv6 only":        {node([]string{"fd00::/64"}, ann), errNoPodCIDR.Error()},
		"bad podCIDR":      {node([]string{"10.244.3.1/24"}, ann), "not a network address"},
		"not published":    {node([]string{"10.244.3.0/24"}, nil), errNotPublished.Error()},
		"bad underlay IP":  {node([]string{"10.244.3.0/24"}, with(UnderlayIPAnnotation, "10.99.1")), UnderlayIPAnnotation},
		"no backend":       {node([]string{"10.244.3.0/24"}, with(BackendAnnotation, "")), BackendAnnotation},
		"bad backend data": {node([]string{"10.244.3.0/24"}, with(BackendDataAnnotation, `{"vni":"x"}`)), BackendDataAnnotation},
	}
	for name, c := range cases {
		if _, err := leaseOf(c.n); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", name, err, c.want)
		}
	}
}

func TestPublishPatch(t *testing.T) {
	self := nodeInfo("n1", 11)
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	b, err := publishPatch(self, false, now)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "status") {
		t.Errorf("not ready, but the patch touches status: %s", b)
	}
	b, err = publishPatch(self, true, now)
	if err != nil {
		t.Fatal(err)
	}
	var p struct {
		Metadata struct{ Annotations map[string]string }
		Status   corev1.NodeStatus
	}
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	if p.Metadata.Annotations[UnderlayIPAnnotation] != "10.99.1.11" || p.Metadata.Annotations[BackendAnnotation] != "vxlan" {
		t.Errorf("annotations %v", p.Metadata.Annotations)
	}
	if len(p.Status.Conditions) != 1 {
		t.Fatalf("conditions %+v", p.Status.Conditions)
	}
	c := p.Status.Conditions[0]
	if c.Type != corev1.NodeNetworkUnavailable || c.Status != corev1.ConditionFalse || c.Reason != ReadyReason || !c.LastTransitionTime.Time.Equal(now) {
		t.Errorf("condition %+v", c)
	}
}
