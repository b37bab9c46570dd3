// Package kubetest runs one throwaway Kubernetes control plane per test
// package: etcd (embedded, pkg/etcdserver), kube-apiserver and
// kube-controller-manager (node IPAM, cluster CIDR 10.244.0.0/16) from the
// binaries hack/k8s/build.sh caches, on free loopback ports. TestMain
// starts it with Main; it is stopped in order (controller manager, API
// server, then etcd) when the tests are done.
//
// The binaries are found through $FLATNET_K8S_BIN, else
// `hack/k8s/build.sh --print-dir`. Missing binaries fail the package with
// a message that says how to build them.
package kubetest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/procutil"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/flatnet-io/flatnet/pkg/etcdserver"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// EnvBinDir names the directory holding the Kubernetes binaries.
const EnvBinDir = "FLATNET_K8S_BIN"

// ClusterCIDR is the node IPAM range of the test control plane.
const ClusterCIDR = "10.244.0.0/16"

// BinDir is where the Kubernetes binaries are: $FLATNET_K8S_BIN, else
// what `hack/k8s/build.sh --print-dir` prints. It fails if they are not
// there.
func BinDir() (string, error) {
	dir := os.Getenv(EnvBinDir)
	if dir == "" {
		root, err := testutil.ModuleRootDir()
		if err != nil {
			return "", err
		}
		out, err := exec.Command(filepath.Join(root, "hack", "k8s", "build.sh"), "--print-dir").Output()
		if err != nil {
			return "", fmt.Errorf("hack/k8s/build.sh --print-dir: %w", err)
		}
		dir = strings.TrimSpace(string(out))
	}
	return dir, kubecluster.CheckBinaries(dir)
}

// Cluster is a running test control plane.
type Cluster struct {
	Spec   kubecluster.Spec
	Admin  *rest.Config // cluster-admin
	Client kubernetes.Interface

	dir       string
	etcd      *etcdserver.Server
	mu        sync.Mutex
	apiserver *process
	kcm       *process
}

// Main is TestMain for a package that uses a control plane: it starts
// one, stores it in *c, runs the tests and stops it. A control plane that
// cannot start fails the package (it is never skipped).
func Main(m *testing.M, c **Cluster) {
	os.Exit(run(m, c))
}

func run(m *testing.M, c **Cluster) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	cl, err := Start(ctx)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: cannot start the test Kubernetes control plane: %v\n", err)
		return 1
	}
	*c = cl
	code := m.Run()
	if err := cl.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "stopping the test control plane: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// Start starts etcd, kube-apiserver and kube-controller-manager and waits
// until the API server is ready.
func Start(ctx context.Context) (_ *Cluster, err error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "flatnet-kubetest-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	c.etcd, err = etcdserver.Start(ctx, etcdserver.Config{Dir: filepath.Join(dir, "etcd"), UnsafeNoFsync: true})
	if err != nil {
		return nil, err
	}
	c.Spec = kubecluster.Spec{
		BinDir: bin, Dir: dir, Host: netip.MustParseAddr("127.0.0.1"),
		EtcdURL: c.etcd.ClientURL(), ClusterCIDR: ClusterCIDR,
	}
	// A free port may be taken by someone else before the API server
	// binds it: try a few.
	for attempt := 1; ; attempt++ {
		if c.Spec.Port, err = freePort(); err != nil {
			return nil, err
		}
		if err = c.startAPIServer(ctx); err == nil || attempt == 3 || !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	if err != nil {
		return nil, err
	}
	c.Client, err = kubernetes.NewForConfig(c.Admin)
	if err != nil {
		return nil, err
	}
	return c, c.StartControllerManager()
}

func (c *Cluster) startAPIServer(ctx context.Context) error {
	if err := c.Spec.Prepare(); err != nil {
		return err
	}
	admin, err := c.Spec.AdminConfig()
	if err != nil {
		return err
	}
	p, err := startProcess(c.Spec.APIServerArgs(), filepath.Join(c.dir, "kube-apiserver.log"))
	if err != nil {
		return err
	}
	if err := kubecluster.WaitReady(ctx, admin, time.Minute, p.alive); err != nil {
		p.stop()
		return err
	}
	c.mu.Lock()
	c.apiserver, c.Admin = p, admin
	c.mu.Unlock()
	return nil
}

// StartControllerManager starts kube-controller-manager (node IPAM).
func (c *Cluster) StartControllerManager() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.kcm != nil {
		return errors.New("kube-controller-manager is already running")
	}
	p, err := startProcess(c.Spec.ControllerManagerArgs(), filepath.Join(c.dir, "kube-controller-manager.log"))
	if err != nil {
		return err
	}
	c.kcm = p
	return nil
}

// StopControllerManager stops kube-controller-manager: Nodes created
// meanwhile get no podCIDR.
func (c *Cluster) StopControllerManager() {
	c.mu.Lock()
	p := c.kcm
	c.kcm = nil
	c.mu.Unlock()
	p.stop()
}

// Stop stops everything, the API server before etcd (an API server
// without its etcd hangs in its graceful shutdown), and removes the files.
func (c *Cluster) Stop() error {
	c.StopControllerManager()
	c.mu.Lock()
	c.apiserver.stop()
	c.apiserver = nil
	c.mu.Unlock()
	var err error
	if c.etcd != nil {
		err = c.etcd.Stop()
	}
	return errors.Join(err, os.RemoveAll(c.dir))
}

// LogTail is the end of a control plane component's log, for failure
// messages: name is "kube-apiserver" or "kube-controller-manager".
func (c *Cluster) LogTail(name string, lines int) string {
	return fileutil.Tail(filepath.Join(c.dir, name+".log"), lines)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// process is a control plane component running as a child of the test
// binary; it gets SIGKILL if the test binary dies first.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startProcess(argv []string, logPath string) (*process, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{name: filepath.Base(argv[0]), cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// alive is nil while the process runs; after it exits, an error with the
// end of its log.
func (p *process) alive() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited (%v):\n%s", p.name, p.err, fileutil.Tail(p.log, 15))
	default:
		return nil
	}
}

// stop sends SIGTERM, and SIGKILL if the process is still there after 15s.
func (p *process) stop() {
	if p == nil {
		return
	}
	procutil.Stop(p.cmd.Process, p.done, 15*time.Second)
}
