package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/flatnet-io/flatnet/pkg/agent"
	"github.com/flatnet-io/flatnet/pkg/cniruntime"
	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
)

// AgentPort is where each lab agent serves /status, /healthz and /metrics
// (inside its own node namespace).
const AgentPort = 9645

// startDetached starts a lab process inside a namespace, in its own
// session, logging to logPath. A goroutine reaps it if it exits while this
// process still runs (tests); otherwise init does.
func startDetached(nsName, logPath string, argv ...string) (Process, error) {
	return startDetachedAs(nsName, logPath, syscall.SysProcAttr{}, argv...)
}

// startDetachedAs is startDetached with process attributes (credentials,
// capabilities).
func startDetachedAs(nsName, logPath string, attr syscall.SysProcAttr, argv ...string) (Process, error) {
	h, err := ns.GetNS(nsutil.Path(nsName))
	if err != nil {
		return Process{}, err
	}
	defer h.Close()
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return Process{}, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return Process{}, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	attr.Setsid = true
	cmd.SysProcAttr = &attr
	if err := nsutil.Start(h, cmd); err != nil {
		return Process{}, fmt.Errorf("start %s in %s: %w", argv[0], nsName, err)
	}
	go cmd.Wait()
	return Process{PID: cmd.Process.Pid, Log: logPath}, nil
}

// ours reports whether pid is still one of the lab's binaries (PIDs get reused).
func ours(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if i := bytes.LastIndexByte(stat, ')'); i > 0 && len(stat) > i+2 && stat[i+2] == 'Z' {
		return false // exited, not yet reaped
	}
	if len(b) == 0 {
		// Our own exec is still loading the binary: the parent learns that
		// exec succeeded before the new command line is set up.
		return true
	}
	cmd := string(b)
	for _, name := range []string{"flatnetd", "flatnetctl", kubecluster.APIServer, kubecluster.ControllerManager, kubecluster.Scheduler} {
		if strings.Contains(cmd, name) {
			return true
		}
	}
	return false
}

// stop sends SIGTERM, waits up to grace, then SIGKILLs.
func stop(pid int, grace time.Duration) {
	signalAndWait(pid, syscall.SIGTERM, grace)
	signalAndWait(pid, syscall.SIGKILL, 5*time.Second)
}

func signalAndWait(pid int, sig syscall.Signal, wait time.Duration) bool {
	if !ours(pid) {
		return true
	}
	syscall.Kill(pid, sig)
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		if !ours(pid) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func (s *State) startEtcd(ctx context.Context) error {
	p, err := startDetached(s.Hub.NetNS, filepath.Join(s.Dir, "etcd.log"),
		filepath.Join(s.BinDir, "flatnetctl"), "lab", "etcd",
		"--dir", filepath.Join(s.Dir, "etcd"), "--client-url", s.EtcdURL, "--peer-url", "http://127.0.0.1:2380")
	if err != nil {
		return err
	}
	s.Etcd = p
	hub, err := ns.GetNS(nsutil.Path(s.Hub.NetNS))
	if err != nil {
		return err
	}
	defer hub.Close()
	addr := strings.TrimPrefix(s.EtcdURL, "http://")
	return poll(ctx, 30*time.Second, func() error {
		if !ours(p.PID) {
			return fmt.Errorf("etcd exited: %s", fileutil.Tail(p.Log, 8))
		}
		c, err := probe.Dial(ctx, hub, addr)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// StopEtcd stops the lab's etcd (its data stays).
func (s *State) StopEtcd() {
	stop(s.Etcd.PID, 10*time.Second)
}

// StartEtcd starts the lab's etcd again on its data.
func (s *State) StartEtcd(ctx context.Context) error {
	if err := s.startEtcd(ctx); err != nil {
		return err
	}
	return s.save()
}

// AgentArgs are flatnetd's flags for node n: every path under the node's
// own directory, since all nodes share this machine's filesystem.
func (s *State) AgentArgs(n *Node) []string {
	args := []string{
		filepath.Join(s.BinDir, "flatnetd"),
		"--node-name", n.Name, "--iface", "eth0", "--backend", s.Backend,
		"--cluster-cidr", s.ClusterCIDR, "--etcd-endpoints", s.EtcdURL,
		"--lease-ttl", s.LeaseTTL, "--resync-interval", s.Resync, "--install-interval", "1s",
		"--state-dir", filepath.Join(n.Dir, "state"), "--run-dir", filepath.Join(n.Dir, "run"),
		"--cni-conf-dir", filepath.Join(n.Dir, "net.d"), "--cni-bin-dir", filepath.Join(n.Dir, "bin"),
		"--cni-bin-source", filepath.Join(s.BinDir, "flatnet"),
		"--listen", fmt.Sprintf(":%d", AgentPort), "--log-format", "json",
	}
	if s.CNIVersion != "" {
		args = append(args, "--cni-version", s.CNIVersion)
	}
	if s.Datastore == DatastoreKubernetes {
		args = append(args, "--datastore", DatastoreKubernetes, "--kubeconfig", kubeconfigOf(n))
	}
	return args
}

// StartAgent starts flatnetd in node n.
func (s *State) StartAgent(n *Node) error {
	var attr syscall.SysProcAttr
	if s.LeastPrivilege {
		var err error
		if attr, err = leastPrivilege(n); err != nil {
			return err
		}
	}
	p, err := startDetachedAs(n.NetNS, filepath.Join(n.Dir, "flatnetd.log"), attr, s.AgentArgs(n)...)
	if err != nil {
		return err
	}
	n.Agent = p
	return s.save()
}

// StopAgent stops node n's agent with sig (SIGTERM or SIGKILL) and waits
// until it is gone.
func (s *State) StopAgent(n *Node, sig syscall.Signal) error {
	if !signalAndWait(n.Agent.PID, sig, 10*time.Second) {
		return fmt.Errorf("agent of %s (pid %d) did not exit after %v", n.Name, n.Agent.PID, sig)
	}
	return nil
}

// ReaddressNode restarts node n with a new underlay address, as a machine
// that comes back from maintenance with another IP: its agent is stopped,
// eth0 gets addr (which must be in n's rack) instead of the old address,
// and the agent is started again and waited for. Pods stay.
func (s *State) ReaddressNode(ctx context.Context, n *Node, addr netip.Prefix) error {
	if err := s.StopAgent(n, syscall.SIGTERM); err != nil {
		return err
	}
	h, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		return err
	}
	err = setUnderlay(h, n.Rack, n.Underlay, addr)
	h.Close()
	if err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	n.Underlay, n.UnderlayIP = addr, addr.Addr()
	if err := s.StartAgent(n); err != nil {
		return err
	}
	return s.WaitReady(ctx, n, 60*time.Second)
}

// AgentStatus asks node n's agent for its /status.
func (s *State) AgentStatus(ctx context.Context, n *Node) (*agent.Status, error) {
	code, body, err := s.AgentGet(ctx, n, "/status")
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("%s: /status answered %d", n.Name, code)
	}
	var st agent.Status
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// AgentGet fetches one of node n's agent endpoints (/status, /healthz,
// /readyz, /metrics) from inside the node's namespace.
func (s *State) AgentGet(ctx context.Context, n *Node, path string) (int, []byte, error) {
	h, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		return 0, nil, err
	}
	defer h.Close()
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return probe.Dial(ctx, h, addr)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", AgentPort, path), nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

// WaitReady waits until node n's agent reports ready and records its subnet.
func (s *State) WaitReady(ctx context.Context, n *Node, timeout time.Duration) error {
	err := poll(ctx, timeout, func() error {
		if !ours(n.Agent.PID) {
			return fmt.Errorf("flatnetd on %s exited:\n%s", n.Name, fileutil.Tail(n.Agent.Log, 8))
		}
		st, err := s.AgentStatus(ctx, n)
		if err != nil {
			return err
		}
		if !st.Ready {
			return fmt.Errorf("%s not ready yet", n.Name)
		}
		n.Subnet, err = netip.ParsePrefix(st.Subnet)
		return err
	})
	if err != nil {
		return fmt.Errorf("node %s: %w (log: %s)", n.Name, err, n.Agent.Log)
	}
	return s.save()
}

// WaitConverged waits until every agent has settled every other node: a
// route programmed, or an error it reports (host-gw across a router). A
// node turns ready before it has heard of the nodes that start after it.
func (s *State) WaitConverged(ctx context.Context, timeout time.Duration) error {
	return poll(ctx, timeout, func() error {
		for _, n := range s.Nodes {
			st, err := s.AgentStatus(ctx, n)
			if err != nil {
				return err
			}
			settled := map[string]bool{}
			for _, p := range st.Peers {
				settled[p.Subnet] = p.Programmed || p.Error != ""
			}
			for _, peer := range s.Nodes {
				if peer != n && !settled[peer.Subnet.String()] {
					return fmt.Errorf("%s has not settled its route to %s (%s) yet", n.Name, peer.Name, peer.Subnet)
				}
			}
		}
		return nil
	})
}

// Runtime is node n's CNI runtime: the conflist and plugin binary its agent
// installed, and a result cache of its own.
func (s *State) Runtime(n *Node, nodeNS ns.NetNS) (*cniruntime.Runtime, error) {
	conf, err := os.ReadFile(filepath.Join(n.Dir, "net.d", "10-flatnet.conflist"))
	if err != nil {
		return nil, err
	}
	return cniruntime.New(conf, []string{filepath.Join(n.Dir, "bin")}, filepath.Join(n.Dir, "cni-cache"), nodeNS)
}

// AddPod creates a pod namespace on node n and attaches it through libcni.
func (s *State) AddPod(ctx context.Context, n *Node, name string) (*Pod, error) {
	nodeNS, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		return nil, err
	}
	defer nodeNS.Close()
	rt, err := s.Runtime(n, nodeNS)
	if err != nil {
		return nil, err
	}
	p := &Pod{Name: name, Node: n.Name, NetNS: Prefix(s.Name) + name, ContainerID: "lab-" + s.Name + "-" + name}
	h, err := nsutil.Create(p.NetNS)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	res, err := rt.Add(ctx, cniruntime.Attachment{ContainerID: p.ContainerID, NetNS: h.Path(), IfName: "eth0"})
	if err != nil {
		nsutil.Delete(p.NetNS)
		return nil, fmt.Errorf("pod %s on %s: %w", name, n.Name, err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return nil, err
	}
	p.IP, _ = netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
	s.Pods = append(s.Pods, p)
	return p, s.save()
}

// RemoveNode kills node n's agent (no goodbye: on etcd its lease must
// expire) and deletes the node and its pods; on Kubernetes also its Node
// object, as `kubectl delete node` does.
func (s *State) RemoveNode(n *Node) error {
	s.StopAgent(n, syscall.SIGKILL)
	if s.Kube != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := s.leaveKube(ctx, n)
		cancel()
		if err != nil {
			return fmt.Errorf("node %s: delete Node: %w", n.Name, err)
		}
	}
	var pods []*Pod
	for _, p := range s.Pods {
		if p.Node == n.Name {
			nsutil.Delete(p.NetNS)
		} else {
			pods = append(pods, p)
		}
	}
	s.Pods = pods
	if err := nsutil.Delete(n.NetNS); err != nil {
		return err
	}
	var nodes []*Node
	for _, m := range s.Nodes {
		if m != n {
			nodes = append(nodes, m)
		}
	}
	s.Nodes = nodes
	return s.save()
}

func poll(ctx context.Context, timeout time.Duration, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var err error
	for {
		if err = f(); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("after %v: %w", timeout, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
