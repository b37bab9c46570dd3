// Package kubenode makes a lab node (pkg/lab, KubeletNodes) a real
// Kubernetes node: its own containerd (pkg/crinode), kubelet and
// kube-proxy, all three in the node's network namespace and in one private
// mount namespace of the node (pkg/mountns). All nodes share this
// machine's filesystem, so inside that mount namespace the host paths a
// node's pods and DaemonSets use (/opt/cni/bin, /etc/cni/net.d,
// /run/flatnet, /var/lib/flatnet, /var/lib/kubelet, /var/log/pods, ...)
// are the node's own directories, and the machine's real ones are never
// touched.
//
// kubelet writes host-wide sysctls at start (setupKernelTunables); here it
// runs with protectKernelDefaults (it refuses to start rather than write)
// and sees, in its mount namespace, files holding the values it expects
// bound over those /proc/sys files. Start refuses to run a kubelet unless
// that holds and the machine's values are unchanged (see Guard).
package kubenode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/flatnet-io/flatnet/pkg/crinode"
	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/mountns"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/procutil"
)

// The node binaries, as hack/k8s/build.sh names them.
const (
	Kubelet   = "kubelet"
	KubeProxy = "kube-proxy"
)

// HostPaths are the host directories that are the node's own inside its
// mount namespace: what deploy/flatnet.yaml's hostPath volumes name, what
// kubelet and containerd write by default, and libcni's result cache.
var HostPaths = []string{
	"/opt/cni/bin", "/etc/cni/net.d", "/run/flatnet", "/var/lib/flatnet",
	"/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/var/lib/cni",
}

// Options say what every node runs.
type Options struct {
	KubeBinDir string   // kubelet, kube-proxy
	Crictl     string   // crictl binary
	Loopback   string   // the reference loopback plugin, put into /opt/cni/bin
	Images     []string // OCI archives imported into containerd before kubelet starts
	Progress   io.Writer
}

// Node is a running Kubernetes node.
type Node struct {
	*lab.Node
	Runtime *crinode.Runtime
	lab     *lab.State
	guard   *Guard
	kubelet *process
	proxy   *process
}

// Dir holds everything of node n's Kubernetes parts.
func Dir(n *lab.Node) string { return filepath.Join(n.Dir, "kube") }

// MountNS is where node n's mount namespace is pinned.
func MountNS(s *lab.State, n *lab.Node) string { return filepath.Join(s.Dir, "mntns", n.Name) }

// CgroupRoot is the cgroup kubelet puts the node's pods under (and
// containerd its sandboxes): named like the node's network namespace.
func CgroupRoot(n *lab.Node) string { return "/" + n.NetNS }

// HostDir is the directory that is host path hostPath inside node n's
// mount namespace.
func HostDir(n *lab.Node, hostPath string) string {
	return filepath.Join(Dir(n), "host", strings.ReplaceAll(strings.Trim(hostPath, "/"), "/", "-"))
}

// runtimeConfig is node n's containerd: in the node's mount namespace,
// with a real node's CNI paths.
func runtimeConfig(s *lab.State, n *lab.Node, crictl string) crinode.Config {
	c := crinode.OnLabNode(n, crictl)
	c.CNIConfDir, c.CNIBinDir, c.MountNS = "/etc/cni/net.d", "/opt/cni/bin", MountNS(s, n)
	return c
}

// CheckBinaries says clearly what is missing.
func CheckBinaries(o Options) error {
	for _, b := range []string{Kubelet, KubeProxy} {
		if st, err := os.Stat(filepath.Join(o.KubeBinDir, b)); err != nil || st.Mode()&0o111 == 0 {
			return fmt.Errorf("%s not found in %s: build it with `hack/k8s/build.sh node`", b, o.KubeBinDir)
		}
	}
	return crinode.CheckPrograms(o.Crictl, o.Loopback)
}

// Start makes lab node n a Kubernetes node: mount namespace, containerd
// with the images, kubelet (which registers the Node) and kube-proxy. The
// node stays NotReady until a pod network installs its CNI config. guard
// must hold the machine's sysctls from before anything started.
func Start(ctx context.Context, s *lab.State, n *lab.Node, o Options, guard *Guard) (_ *Node, err error) {
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	node := &Node{Node: n, lab: s, guard: guard}
	defer func() {
		if err != nil {
			node.Stop()
		}
	}()
	for _, p := range HostPaths {
		if err := os.MkdirAll(HostDir(n, p), 0o755); err != nil {
			return nil, err
		}
	}
	if err := crinode.LinkPlugins(HostDir(n, "/opt/cni/bin"), map[string]string{"loopback": o.Loopback}); err != nil {
		return nil, err
	}
	binds := map[string]string{}
	for _, p := range HostPaths {
		binds[p] = HostDir(n, p)
	}
	files := map[string]string{}
	for k, v := range KubeletSysctls {
		files[filepath.Join("/proc/sys", k)] = v + "\n"
	}
	mnt := MountNS(s, n)
	err = mountns.Create(mnt, mountns.Spec{Binds: binds, Files: files, Keep: []string{s.Dir}, Scratch: filepath.Join(Dir(n), "scratch")})
	if err != nil {
		return nil, err
	}
	if err := guard.CheckNode(mnt); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Progress, "%s: mount namespace %s: %s are the node's own; kubelet sees %s\n", n.Name, mnt,
		strings.Join(HostPaths, " "), formatSysctls(KubeletSysctls))

	h, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		return nil, err
	}
	defer h.Close()
	// Nodes must forward (deploy/flatnet.yaml); the agent's container
	// sees /proc/sys read-only.
	if err := nsutil.SetSysctl(h, "net/ipv4/ip_forward", "1"); err != nil {
		return nil, err
	}
	if err := makeCgroup(CgroupRoot(n)); err != nil {
		return nil, err
	}
	node.Runtime, err = crinode.Start(ctx, runtimeConfig(s, n, o.Crictl))
	if err != nil {
		return nil, err
	}
	for _, im := range o.Images {
		if err := node.Runtime.Import(ctx, im); err != nil {
			return nil, err
		}
	}
	spec := s.KubeSpec()
	dir := Dir(n)
	if err := spec.ClientKubeconfig(filepath.Join(dir, "kubelet.kubeconfig"), "system:node:"+n.Name, "system:nodes"); err != nil {
		return nil, err
	}
	if err := spec.ClientKubeconfig(filepath.Join(dir, "kube-proxy.kubeconfig"), "system:kube-proxy"); err != nil {
		return nil, err
	}
	if err := fileutil.WriteAtomic(filepath.Join(dir, "kubelet.yaml"), []byte(kubeletConfig(n, spec, node.Runtime)), 0o644); err != nil {
		return nil, err
	}
	if err := fileutil.WriteAtomic(filepath.Join(dir, "kube-proxy.yaml"), []byte(proxyConfig(s, n)), 0o644); err != nil {
		return nil, err
	}
	node.kubelet, err = start(mnt, h, filepath.Join(dir, "kubelet.log"), filepath.Join(o.KubeBinDir, Kubelet),
		"--config="+filepath.Join(dir, "kubelet.yaml"), "--kubeconfig="+filepath.Join(dir, "kubelet.kubeconfig"),
		"--hostname-override="+n.Name, "--node-ip="+n.UnderlayIP.String())
	if err != nil {
		return nil, err
	}
	node.proxy, err = start(mnt, h, filepath.Join(dir, "kube-proxy.log"), filepath.Join(o.KubeBinDir, KubeProxy),
		"--config="+filepath.Join(dir, "kube-proxy.yaml"))
	if err != nil {
		return nil, err
	}
	return node, nil
}

// kubeletConfig: cgroup v1 allowed (the machines here are v1 hybrids),
// the node's own cgroup root and runtime, kernel defaults protected (never
// written), clients authenticated by the cluster CA (the API server uses
// its admin certificate), no DNS of the machine's copied into pods, and no
// image garbage collection (the images are imported, not pulled).
func kubeletConfig(n *lab.Node, spec *kubecluster.Spec, rt *crinode.Runtime) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: %s
protectKernelDefaults: true
address: %s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %s}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://%s
resolvConf: ""
clusterDomain: cluster.local
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
kernelMemcgNotification: false
serializeImagePulls: false
oomScoreAdj: 0
`, CgroupRoot(n), n.UnderlayIP, spec.CAFile(), rt.Socket())
}

// proxyConfig: iptables mode (its rules land in the node's network
// namespace), and conntrack settings of zero, which make kube-proxy leave
// the machine-wide conntrack sysctls alone.
func proxyConfig(s *lab.State, n *lab.Node) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %s}
hostnameOverride: %s
mode: iptables
clusterCIDR: %s
bindAddress: %s
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
`, filepath.Join(Dir(n), "kube-proxy.kubeconfig"), n.Name, s.ClusterCIDR, n.UnderlayIP)
}

// makeCgroup creates the cgroup in every hierarchy: kubelet wants its
// cgroup root to exist in all of them.
func makeCgroup(name string) error {
	dirs := []string{filepath.Join("/sys/fs/cgroup", name)} // pure cgroup v2
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		hier, _ := filepath.Glob("/sys/fs/cgroup/*")
		dirs = dirs[:0]
		for _, h := range hier {
			if st, err := os.Stat(h); err == nil && st.IsDir() {
				dirs = append(dirs, filepath.Join(h, name))
			}
		}
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("cgroup %s: %w", d, err)
		}
	}
	return nil
}

// Stop stops kube-proxy, kubelet and containerd (whose Stop removes the
// pods it still has, shims, cgroups), kills whatever is left in the mount
// namespace and removes it, and checks the machine's sysctls. Delete the
// node's pods through the API first, so kubelet unmounts their volumes.
func (n *Node) Stop() error {
	n.proxy.stop()
	n.kubelet.stop()
	var errs []error
	if n.Runtime != nil {
		errs = append(errs, n.Runtime.Stop())
	}
	return errors.Join(append(errs, RemoveLeftovers(n.lab, n.Node), n.guard.Check())...)
}

// process is a node process (kubelet, kube-proxy) this process started.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func start(mnt string, netns ns.NetNS, logPath string, argv ...string) (*process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := mountns.Start(mnt, netns, cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", filepath.Base(argv[0]), err)
	}
	p := &process{cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() { cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *process) stop() {
	if p != nil {
		procutil.Stop(p.cmd.Process, p.done, 15*time.Second)
	}
}

// Alive is nil while kubelet and kube-proxy run; else it names the one
// that exited and shows the end of its log.
func (n *Node) Alive() error {
	for _, p := range []*process{n.kubelet, n.proxy} {
		select {
		case <-p.done:
			return fmt.Errorf("%s on %s exited (%v); %s ends:\n%s", filepath.Base(p.cmd.Path), n.Name, p.cmd.ProcessState, p.log,
				fileutil.Tail(p.log, 10))
		default:
		}
	}
	return nil
}

// Logs are the node's log files (containerd, kubelet, kube-proxy).
func (n *Node) Logs() []string {
	return []string{n.Runtime.Log(), filepath.Join(Dir(n.Node), "kubelet.log"), filepath.Join(Dir(n.Node), "kube-proxy.log")}
}

// RemoveLeftovers removes what the Kubernetes parts of node n may have
// left when the process that started them died: every process in its
// mount namespace, containerd's shims, cgroups and mounts, and the mount
// namespace itself. It is what Stop does without a graceful part, and
// harmless when nothing is left.
func RemoveLeftovers(s *lab.State, n *lab.Node) error {
	mnt := MountNS(s, n)
	var errs []error
	if _, err := os.Stat(mnt); err == nil {
		// Killed processes leave the namespace when they exit, not when
		// signalled: wait, so its mounts are gone before the files under
		// them are removed.
		deadline := time.Now().Add(10 * time.Second)
		for {
			pids, err := mountns.Processes(mnt)
			if err != nil || len(pids) == 0 {
				errs = append(errs, err)
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("processes %v still in the mount namespace of %s", pids, n.Name))
				break
			}
			for _, pid := range pids {
				if pid == os.Getpid() {
					return fmt.Errorf("this process is in the mount namespace of %s", n.Name)
				}
				syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	errs = append(errs, runtimeConfig(s, n, "").RemoveLeftovers(), mountns.Delete(mnt))
	return errors.Join(errs...)
}

// RemoveMountNSDir removes the directory the lab's node mount namespaces
// were pinned in, once every node's is deleted.
func RemoveMountNSDir(s *lab.State) error {
	dir := filepath.Join(s.Dir, "mntns")
	if err := mountns.ReleaseDir(dir); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}
