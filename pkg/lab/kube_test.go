package lab_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flatnet-io/flatnet/pkg/datastore/kube"
	"github.com/flatnet-io/flatnet/pkg/kubetest"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/lab/labtest"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// newKubeLab is newLab with --datastore kubernetes: a real kube-apiserver
// and kube-controller-manager in the hub, deploy/flatnet.yaml applied, a
// Node object per node and agents using flatnet's service account.
func newKubeLab(t *testing.T, o lab.Options) (*lab.State, kubernetes.Interface) {
	t.Helper()
	bin, err := kubetest.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	o.Datastore, o.KubeBinDir = lab.DatastoreKubernetes, bin
	if o.LeastPrivilege {
		// Agents running as nobody must reach the lab's directories, which
		// labtest.Up puts under this test's temporary directory.
		if err := os.Chmod(filepath.Dir(t.TempDir()), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s := labtest.Up(t, o)
	cs, err := s.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	return s, cs
}

// Every node gets its podCIDR, publishes itself on its Node and reports
// its network available; pods on all nodes pass the whole matrix, across
// two racks with the manifest's backend (auto: direct in a rack, VXLAN
// between racks). The agents have only what deploy/flatnet.yaml gives
// them: the service account's token and CAP_NET_ADMIN.
func TestKubeLabMatrix(t *testing.T) {
	s, cs := newKubeLab(t, lab.Options{Nodes: 3, PodsPerNode: 2, Backend: "auto", Topology: "racks", LeastPrivilege: true})
	mustCheck(t, s)
	ctx := context.Background()
	// n1 and n3 share rack 1, n2 is alone in rack 2.
	want := map[string][2]string{"n1": {"n3", "n2"}, "n2": {"", "n1,n3"}, "n3": {"n1", "n2"}}
	for _, ns := range s.Status(ctx).Nodes {
		if got := [2]string{strings.Join(ns.Direct, ","), strings.Join(ns.Overlay, ",")}; got != want[ns.Name] {
			t.Errorf("%s reaches %v direct and %v through the overlay, want %v", ns.Name, ns.Direct, ns.Overlay, want[ns.Name])
		}
	}
	for _, n := range s.Nodes {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.Agent.PID))
		if err != nil {
			t.Fatal(err)
		}
		// CAP_NET_ADMIN is bit 12; uid nobody.
		if !strings.Contains(string(st), "\nCapEff:\t0000000000001000\n") || !strings.Contains(string(st), "\nUid:\t65534\t") {
			t.Fatalf("%s's agent does not run as nobody with only CAP_NET_ADMIN:\n%s", n.Name, st)
		}
		node, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if node.Spec.PodCIDR != n.Subnet.String() {
			t.Errorf("%s: agent uses %s, the Node's podCIDR is %q", n.Name, n.Subnet, node.Spec.PodCIDR)
		}
		a := node.Annotations
		if a[kube.UnderlayIPAnnotation] != n.UnderlayIP.String() || a[kube.BackendAnnotation] != "auto" ||
			!strings.Contains(a[kube.BackendDataAnnotation], `"vtepMAC":"0e:fa:`) {
			t.Errorf("%s: annotations %v", n.Name, a)
		}
		if c := condition(node, corev1.NodeNetworkUnavailable); c == nil || c.Status != corev1.ConditionFalse || c.Reason != kube.ReadyReason {
			t.Errorf("%s: NetworkUnavailable condition %+v", n.Name, c)
		}
		as, err := s.AgentStatus(ctx, n)
		if err != nil || !as.LeaseHeld {
			t.Errorf("%s: leaseHeld false (%v)", n.Name, err)
		}
		if got := flatnetRoutes(t, n); len(got) != 2 {
			t.Errorf("%s has %d flatnet routes, want 2: %v", n.Name, len(got), got)
		}
	}
}

func condition(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// Deleting a Node prunes its route on the running agents at once, and on
// an agent that was down at the time when it starts; restarting agents
// (SIGTERM and SIGKILL) loses no traffic and keeps the podCIDR.
func TestKubeNodeDeletionAndAgentRestarts(t *testing.T) {
	s, _ := newKubeLab(t, lab.Options{Nodes: 3, PodsPerNode: 1, Backend: "host-gw"})
	ctx := context.Background()
	n1, n2, n3 := s.Nodes[0], s.Nodes[1], s.Nodes[2]
	p := startProber(t, s, s.PodsOf("n1")[0], s.PodsOf("n2")[0])

	if err := s.StopAgent(n1, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	gone := n3.Subnet.String()
	if err := s.RemoveNode(n3); err != nil { // kills its agent, deletes the Node
		t.Fatal(err)
	}
	testutil.WaitFor(t, 20*time.Second, "n2 to stop routing "+gone+" of the deleted node", func() bool {
		_, ok := flatnetRoutes(t, n2)[gone]
		return !ok
	})
	if _, ok := flatnetRoutes(t, n1)[gone]; !ok {
		t.Fatal("n1's route to the deleted node vanished while its agent was down")
	}
	// n1's agent starts after the deletion: its first sync prunes it.
	if err := s.StartAgent(n1); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitReady(ctx, n1, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if r, ok := flatnetRoutes(t, n1)[gone]; ok {
		t.Fatalf("n1 is ready but still routes %s via %s", gone, r)
	}

	restartEachAgent(t, s)
	p.finish(t)
	mustCheck(t, s)
}

// A Node without a podCIDR: the agent waits and says so, the plugin's
// STATUS answers code 50 (the conflist is already installed), and once
// the controller manager assigns the podCIDR the node becomes ready.
func TestKubeNodeWithoutPodCIDRWaits(t *testing.T) {
	// STATUS is a CNI 1.1.0 verb: runtimes call it only for 1.1.0 conflists.
	s, cs := newKubeLab(t, lab.Options{Nodes: 1, PodsPerNode: 1, Backend: "host-gw", CNIVersion: "1.1.0"})
	ctx := context.Background()
	s.StopControllerManager()
	n, err := s.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var b []byte
	testutil.WaitFor(t, 30*time.Second, "the agent to say it waits for a podCIDR", func() bool {
		b, _ = os.ReadFile(n.Agent.Log)
		return strings.Contains(string(b), "no IPv4 podCIDR yet")
	}, func() string { return string(b) })
	st, err := s.AgentStatus(ctx, n)
	if err != nil || st.Ready || st.LeaseHeld {
		t.Fatalf("agent status while waiting: %+v %v", st, err)
	}
	nodeNS, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	defer nodeNS.Close()
	rt, err := s.Runtime(n, nodeNS)
	if err != nil {
		t.Fatalf("the conflist is not installed while the agent waits: %v", err)
	}
	var e *types.Error
	if err := rt.Status(ctx); !errors.As(err, &e) || e.Code != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS while waiting: %v, want code %d", err, types.ErrPluginNotAvailable)
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if node.Spec.PodCIDR != "" || condition(node, corev1.NodeNetworkUnavailable) != nil {
		t.Fatalf("the Node has podCIDR %q and conditions %+v before the controller manager ran", node.Spec.PodCIDR, node.Status.Conditions)
	}

	if err := s.StartControllerManager(); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitReady(ctx, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := rt.Status(ctx); err != nil {
		t.Fatalf("STATUS once ready: %v", err)
	}
	if _, err := s.AddPod(ctx, n, n.Name+"-p1"); err != nil {
		t.Fatal(err)
	}
	mustCheck(t, s)
}
