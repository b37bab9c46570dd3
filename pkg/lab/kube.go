package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flatnet-io/flatnet/deploy"
	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
)

// Datastores the lab can run the agents on.
const (
	DatastoreEtcd       = "etcd"
	DatastoreKubernetes = "kubernetes"
)

// APIServerPort is where the lab's kube-apiserver listens, on the hub's
// address.
const APIServerPort = 6443

// agentTokenTTL is how long the agents' service-account tokens are valid:
// a lab older than this needs `lab down` and `lab up`.
const agentTokenTTL = 7 * 24 * time.Hour

// Kube is the lab's Kubernetes control plane (--datastore kubernetes): it
// runs in the hub namespace on the lab's etcd, with RBAC and the objects
// of deploy/flatnet.yaml; each node is a Node object and its agent uses a
// token of flatnet's service account, as the DaemonSet would.
type Kube struct {
	BinDir            string  `json:"binDir"`
	Dir               string  `json:"dir"`
	URL               string  `json:"url"`
	APIServer         Process `json:"apiServer"`
	ControllerManager Process `json:"controllerManager"`
	Scheduler         Process `json:"scheduler,omitempty"` // KubeletNodes only
}

// KubeSpec is the control plane's description, from the lab's state.
func (s *State) KubeSpec() *kubecluster.Spec {
	return &kubecluster.Spec{
		BinDir: s.Kube.BinDir, Dir: s.Kube.Dir, Host: s.Hub.IP, Port: APIServerPort,
		EtcdURL: s.EtcdURL, ClusterCIDR: s.ClusterCIDR, ForKubelets: s.KubeletNodes,
		Dial: func(ctx context.Context, _, addr string) (net.Conn, error) {
			// The lab's tools run outside the lab: reach the API server
			// from inside the hub namespace.
			hub, err := ns.GetNS(nsutil.Path(s.Hub.NetNS))
			if err != nil {
				return nil, err
			}
			defer hub.Close()
			return probe.Dial(ctx, hub, addr)
		},
	}
}

// KubeClient is a cluster-admin client of the lab's API server.
func (s *State) KubeClient() (kubernetes.Interface, error) {
	if s.Kube == nil {
		return nil, errors.New("lab " + s.Name + " runs on etcd, not on Kubernetes")
	}
	cfg, err := s.KubeSpec().AdminConfig()
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// startKube starts kube-apiserver and kube-controller-manager in the hub
// and applies deploy/flatnet.yaml; for kubelet nodes it starts
// kube-scheduler instead of applying anything.
func (s *State) startKube(ctx context.Context, binDir string) error {
	s.Kube = &Kube{BinDir: binDir, Dir: filepath.Join(s.Dir, "kube")}
	spec := s.KubeSpec()
	s.Kube.URL = spec.URL()
	if err := spec.Prepare(); err != nil {
		return err
	}
	p, err := startDetached(s.Hub.NetNS, filepath.Join(s.Dir, "kube-apiserver.log"), spec.APIServerArgs()...)
	if err != nil {
		return err
	}
	s.Kube.APIServer = p
	admin, err := spec.AdminConfig()
	if err != nil {
		return err
	}
	err = kubecluster.WaitReady(ctx, admin, 60*time.Second, func() error {
		if !ours(p.PID) {
			return fmt.Errorf("kube-apiserver exited:\n%s", fileutil.Tail(p.Log, 8))
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := s.StartControllerManager(); err != nil {
		return err
	}
	if s.KubeletNodes {
		if s.Kube.Scheduler, err = startDetached(s.Hub.NetNS, filepath.Join(s.Dir, "kube-scheduler.log"), spec.SchedulerArgs()...); err != nil {
			return err
		}
		return s.save()
	}
	if _, err := kubecluster.Apply(ctx, admin, deploy.Manifest, false); err != nil {
		return fmt.Errorf("apply deploy/flatnet.yaml: %w", err)
	}
	return s.save()
}

// StartControllerManager starts kube-controller-manager (node IPAM) in
// the hub.
func (s *State) StartControllerManager() error {
	p, err := startDetached(s.Hub.NetNS, filepath.Join(s.Dir, "kube-controller-manager.log"), s.KubeSpec().ControllerManagerArgs()...)
	if err != nil {
		return err
	}
	s.Kube.ControllerManager = p
	return s.save()
}

// StopControllerManager stops kube-controller-manager: Nodes created
// meanwhile get no podCIDR until it is started again.
func (s *State) StopControllerManager() {
	stop(s.Kube.ControllerManager.PID, 10*time.Second)
}

// stopKube stops the control plane, the API server before etcd.
func (s *State) stopKube() {
	if s.Kube != nil {
		stop(s.Kube.Scheduler.PID, 10*time.Second)
		stop(s.Kube.ControllerManager.PID, 10*time.Second)
		stop(s.Kube.APIServer.PID, 15*time.Second)
	}
}

// joinKube makes node n a Kubernetes node: its Node object (as the
// kubelet registers it, without a podCIDR: the controller manager
// assigns one) and a kubeconfig with a token of flatnet's service account.
func (s *State) joinKube(ctx context.Context, n *Node) error {
	cs, err := s.KubeClient()
	if err != nil {
		return err
	}
	_, err = cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("node %s: create Node: %w", n.Name, err)
	}
	spec := s.KubeSpec()
	return kubecluster.ServiceAccountKubeconfig(ctx, cs, deploy.Namespace, deploy.ServiceAccount, agentTokenTTL,
		spec.URL(), spec.CAFile(), kubeconfigOf(n))
}

// leaveKube deletes node n's Node object, as `kubectl delete node` does.
func (s *State) leaveKube(ctx context.Context, n *Node) error {
	cs, err := s.KubeClient()
	if err != nil {
		return err
	}
	err = cs.CoreV1().Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func kubeconfigOf(n *Node) string { return filepath.Join(n.Dir, "kubeconfig") }
