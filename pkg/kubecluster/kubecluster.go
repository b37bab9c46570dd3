// Package kubecluster prepares a throwaway Kubernetes control plane from
// the binaries hack/k8s/build.sh builds: PKI made in Go, the command lines
// of kube-apiserver and kube-controller-manager (node IPAM only), an admin
// kubeconfig, service-account token kubeconfigs, and server-side apply of
// manifests. It runs nothing itself: the lab starts the processes in its
// hub namespace (they outlive `flatnetctl lab up`), pkg/kubetest as
// children of a test binary. etcd is the caller's.
package kubecluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// The binaries a control plane needs, as hack/k8s/build.sh names them.
const (
	APIServer         = "kube-apiserver"
	ControllerManager = "kube-controller-manager"
	Scheduler         = "kube-scheduler" // only with ForKubelets
)

// ServiceCIDR is the cluster's service range; ServiceIP is the first
// address in it, which the API server's certificate also names.
const (
	ServiceCIDR = "10.96.0.0/16"
	ServiceIP   = "10.96.0.1"
)

// Spec is one control plane.
type Spec struct {
	BinDir  string     // kube-apiserver, kube-controller-manager
	Dir     string     // pki/, kubeconfigs, certificates the servers make
	Host    netip.Addr // the API server listens and advertises here
	Port    int
	EtcdURL string
	// ClusterCIDR and NodeCIDRMaskSize are kube-controller-manager's node
	// IPAM settings: each Node gets a /NodeCIDRMaskSize of ClusterCIDR.
	ClusterCIDR      string
	NodeCIDRMaskSize int
	// Dial, if set, opens the connections of the clients AdminConfig
	// makes (the lab's tools dial from inside the hub namespace).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// ForKubelets makes a whole control plane that kubelets join: the
	// API server publishes itself as the kubernetes Service's endpoint,
	// authorizes kubelets as nodes and reaches them on their InternalIP,
	// the controller manager runs every default controller (plus node
	// IPAM), and kube-scheduler runs (SchedulerArgs). Without it: the API
	// server and node IPAM only.
	ForKubelets bool
}

// URL is the API server's address.
func (s *Spec) URL() string {
	return "https://" + net.JoinHostPort(s.Host.String(), strconv.Itoa(s.Port))
}

// AdminKubeconfig is a kubeconfig with cluster-admin rights.
func (s *Spec) AdminKubeconfig() string { return filepath.Join(s.Dir, "admin.kubeconfig") }

// Bin is the path of one of the binaries.
func (s *Spec) Bin(name string) string { return filepath.Join(s.BinDir, name) }

// CheckBinaries says clearly which binary is missing and how to build it.
func CheckBinaries(dir string) error {
	if dir == "" {
		return errors.New("no directory of Kubernetes binaries given: build them with `hack/k8s/build.sh control-plane` " +
			"and pass the directory it prints (or set FLATNET_K8S_BIN)")
	}
	for _, b := range []string{APIServer, ControllerManager} {
		if st, err := os.Stat(filepath.Join(dir, b)); err != nil || st.Mode()&0o111 == 0 {
			return fmt.Errorf("%s not found in %s: build it with `hack/k8s/build.sh control-plane` "+
				"(or point FLATNET_K8S_BIN / --kube-bin-dir at a directory holding %s and %s)", b, dir, APIServer, ControllerManager)
		}
	}
	return nil
}

// Prepare checks the binaries and writes the PKI and the admin kubeconfig.
func (s *Spec) Prepare() error {
	if err := CheckBinaries(s.BinDir); err != nil {
		return err
	}
	if s.NodeCIDRMaskSize == 0 {
		s.NodeCIDRMaskSize = 24
	}
	if err := s.pki().write(s.Host.AsSlice()); err != nil {
		return fmt.Errorf("control plane PKI: %w", err)
	}
	p := s.pki()
	return writeKubeconfig(s.AdminKubeconfig(), &clientcmdapi.Cluster{Server: s.URL(), CertificateAuthority: s.CAFile()},
		&clientcmdapi.AuthInfo{ClientCertificate: p.path("admin.crt"), ClientKey: p.path("admin.key")})
}

// APIServerArgs is kube-apiserver's command line: RBAC on, service
// account tokens signed with the PKI's key, no endpoint reconciler (it
// would publish the loopback address as the kubernetes Service's endpoint).
func (s *Spec) APIServerArgs() []string {
	p := s.pki()
	authz := "RBAC"
	if s.ForKubelets {
		authz = "Node,RBAC" // kubelets may touch only their own Node and pods
	}
	args := []string{
		s.Bin(APIServer),
		"--etcd-servers=" + s.EtcdURL,
		"--bind-address=" + s.Host.String(),
		"--advertise-address=" + s.Host.String(),
		"--secure-port=" + strconv.Itoa(s.Port),
		"--tls-cert-file=" + p.path("apiserver.crt"),
		"--tls-private-key-file=" + p.path("apiserver.key"),
		"--client-ca-file=" + p.path("ca.crt"),
		"--authorization-mode=" + authz,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.path("sa.key"),
		"--service-account-signing-key-file=" + p.path("sa.key"),
		"--service-cluster-ip-range=" + ServiceCIDR,
		"--cert-dir=" + filepath.Join(s.Dir, "apiserver-certs"),
		"--profiling=false",
	}
	if !s.ForKubelets {
		return append(args, "--endpoint-reconciler-type=none")
	}
	// In-cluster clients (flatnetd) reach the API through the kubernetes
	// Service, which kube-proxy sends to this address.
	return append(args,
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--kubelet-client-certificate="+p.path("admin.crt"),
		"--kubelet-client-key="+p.path("admin.key"),
		"--kubelet-preferred-address-types=InternalIP",
	)
}

// ControllerManagerArgs is kube-controller-manager's command line: only
// the node IPAM controller, which gives every Node its spec.podCIDR; no
// serving port, so several control planes can share one namespace.
func (s *Spec) ControllerManagerArgs() []string {
	controllers := []string{"--controllers=node-ipam-controller"}
	if s.ForKubelets {
		// Namespaces, service accounts and their CA bundle, endpoints,
		// garbage collection, node lifecycle: what kubelets and e2e tests
		// expect of a cluster.
		p := s.pki()
		controllers = []string{"--controllers=*", "--root-ca-file=" + p.path("ca.crt"),
			"--service-account-private-key-file=" + p.path("sa.key")}
	}
	return append([]string{
		s.Bin(ControllerManager),
		"--kubeconfig=" + s.AdminKubeconfig(),
		"--allocate-node-cidrs=true",
		"--cluster-cidr=" + s.ClusterCIDR,
		"--node-cidr-mask-size=" + strconv.Itoa(s.NodeCIDRMaskSize),
		"--service-cluster-ip-range=" + ServiceCIDR,
		"--leader-elect=false",
		"--secure-port=0",
		"--profiling=false",
	}, controllers...)
}

// SchedulerArgs is kube-scheduler's command line (ForKubelets): no serving
// port, like the controller manager.
func (s *Spec) SchedulerArgs() []string {
	return []string{
		s.Bin(Scheduler),
		"--kubeconfig=" + s.AdminKubeconfig(),
		"--leader-elect=false",
		"--secure-port=0",
	}
}

// ClientKubeconfig writes a kubeconfig at path that authenticates with a
// client certificate of the cluster CA for user in groups, e.g. a kubelet
// ("system:node:n1" in "system:nodes") or kube-proxy ("system:kube-proxy").
func (s *Spec) ClientKubeconfig(path, user string, groups ...string) error {
	p := s.pki()
	name := "client-" + strings.NewReplacer(":", "-", "/", "-").Replace(user)
	if err := p.writeClient(name, user, groups); err != nil {
		return fmt.Errorf("certificate for %s: %w", user, err)
	}
	return writeKubeconfig(path, &clientcmdapi.Cluster{Server: s.URL(), CertificateAuthority: s.CAFile()},
		&clientcmdapi.AuthInfo{ClientCertificate: p.path(name + ".crt"), ClientKey: p.path(name + ".key")})
}

// AdminConfig is a client config with cluster-admin rights.
func (s *Spec) AdminConfig() (*rest.Config, error) {
	c, err := clientcmd.BuildConfigFromFlags("", s.AdminKubeconfig())
	if err != nil {
		return nil, err
	}
	c.Dial = s.Dial
	return c, nil
}

// WaitReady polls the API server's /readyz until it answers ok, failing
// early when alive reports that the process died.
func WaitReady(ctx context.Context, cfg *rest.Config, timeout time.Duration, alive func() error) error {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if err := alive(); err != nil {
			return err
		}
		_, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("API server %s not ready after %v: %w", cfg.Host, timeout, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// ServiceAccountKubeconfig writes a kubeconfig that authenticates as a
// service account with a token from the TokenRequest API, valid for ttl,
// and holds the CA certificate itself: what a DaemonSet pod gets mounted,
// as one file.
func ServiceAccountKubeconfig(ctx context.Context, cs kubernetes.Interface, namespace, name string, ttl time.Duration,
	server, caFile, path string) error {
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	secs := int64(ttl / time.Second)
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name,
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &secs}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("token for service account %s/%s: %w", namespace, name, err)
	}
	return writeKubeconfig(path, &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca},
		&clientcmdapi.AuthInfo{Token: tr.Status.Token})
}

func writeKubeconfig(path string, cluster *clientcmdapi.Cluster, user *clientcmdapi.AuthInfo) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["flatnet"] = cluster
	cfg.AuthInfos["user"] = user
	cfg.Contexts["flatnet"] = &clientcmdapi.Context{Cluster: "flatnet", AuthInfo: "user"}
	cfg.CurrentContext = "flatnet"
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return err
	}
	return os.Chmod(path, 0o600) // it may hold a token
}
