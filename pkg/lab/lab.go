// Package lab runs a whole flatnet cluster network on one machine: a hub
// (switches, router, etcd host), an "internet" host outside the cluster,
// N node namespaces each running flatnetd, and pods created by calling the
// flatnet plugin through libcni inside each node, as a runtime would.
// Everything is named flab-<name>-* and lives under the lab's state dir.
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

// DefaultRoot holds one directory per lab.
const DefaultRoot = "/run/flatnet-lab"

// ClusterCIDR is the lab's pod network.
const ClusterCIDR = "10.244.0.0/16"

// Options say what lab to build.
type Options struct {
	Name        string
	Nodes       int
	PodsPerNode int
	Backend     string // host-gw, vxlan, auto
	Topology    string // "flat" (one switch) or "racks" (segments joined by a router)
	Racks       int
	Root        string        // state root (DefaultRoot)
	BinDir      string        // flatnet, flatnetd, flatnetctl
	LeaseTTL    time.Duration // agents' lease TTL
	Resync      time.Duration // agents' resync interval
	CNIVersion  string        // cniVersion of the agents' conflist; "": flatnetd's default
	Progress    io.Writer     // progress lines; nil: quiet
	// Datastore is where the agents keep their leases: "etcd" (default) or
	// "kubernetes" (a control plane in the hub, built from KubeBinDir).
	Datastore  string
	KubeBinDir string // kube-apiserver, kube-controller-manager (hack/k8s/build.sh)
	// LeastPrivilege runs the agents with what deploy/flatnet.yaml gives
	// them: CAP_NET_ADMIN and no other root power.
	LeastPrivilege bool
	// KubeletNodes makes a lab for real Kubernetes nodes (Datastore
	// kubernetes, no lab pods): the control plane is a whole one (every
	// default controller, kube-scheduler, kubelet access; see
	// kubecluster.Spec.ForKubelets), and the lab starts no flatnetd,
	// creates no Node and applies no manifest. The caller runs a kubelet
	// on each node (pkg/kubenode) and applies deploy/flatnet.yaml, whose
	// DaemonSet brings the agents.
	KubeletNodes bool
}

// State is a running lab, as saved in <root>/<name>/lab.json.
type State struct {
	Name        string  `json:"name"`
	Dir         string  `json:"dir"`
	BinDir      string  `json:"binDir"`
	Backend     string  `json:"backend"`
	Topology    string  `json:"topology"`
	Racks       int     `json:"racks"`
	ClusterCIDR string  `json:"clusterCIDR"`
	LeaseTTL    string  `json:"leaseTTL"`
	Resync      string  `json:"resync"`
	CNIVersion  string  `json:"cniVersion,omitempty"`
	Hub         Host    `json:"hub"`
	Internet    Host    `json:"internet"`
	Etcd        Process `json:"etcd"`
	EtcdURL     string  `json:"etcdURL"`
	Nodes       []*Node `json:"nodes"`
	Pods        []*Pod  `json:"pods"`

	Datastore      string `json:"datastore,omitempty"` // "" is etcd
	Kube           *Kube  `json:"kube,omitempty"`
	LeastPrivilege bool   `json:"leastPrivilege,omitempty"` // see Options
	KubeletNodes   bool   `json:"kubeletNodes,omitempty"`   // see Options
}

// Host is a namespace with one address that matters.
type Host struct {
	NetNS string     `json:"netns"`
	IP    netip.Addr `json:"ip"`
}

// Process is something the lab started and must stop.
type Process struct {
	PID int    `json:"pid"`
	Log string `json:"log"`
}

// Node is one node: a namespace running flatnetd.
type Node struct {
	Name       string       `json:"name"`
	NetNS      string       `json:"netns"`
	Rack       int          `json:"rack"`
	UnderlayIP netip.Addr   `json:"underlayIP"`
	Underlay   netip.Prefix `json:"underlay"`
	SwitchPort string       `json:"switchPort"`
	Subnet     netip.Prefix `json:"subnet"`
	Dir        string       `json:"dir"`
	Agent      Process      `json:"agent"`
}

// Pod is one pod namespace attached by the flatnet plugin.
type Pod struct {
	Name        string     `json:"name"`
	Node        string     `json:"node"`
	NetNS       string     `json:"netns"`
	ContainerID string     `json:"containerID"`
	IP          netip.Addr `json:"ip"`
}

var nameRE = regexp.MustCompile(`^[a-z0-9]{1,10}$`)

func (o *Options) defaults() error {
	if !nameRE.MatchString(o.Name) {
		return fmt.Errorf("lab name %q: use 1-10 lowercase letters or digits", o.Name)
	}
	if o.Root == "" {
		o.Root = DefaultRoot
	}
	if o.Topology == "" {
		o.Topology = "flat"
	}
	switch o.Topology {
	case "flat":
		o.Racks = 1
	case "racks":
		if o.Racks < 2 {
			o.Racks = 2
		}
	default:
		return fmt.Errorf("topology %q: want flat or racks", o.Topology)
	}
	if o.Nodes < 1 || o.Nodes > 200 || o.Racks > 200 {
		return fmt.Errorf("--nodes %d: want 1-200", o.Nodes)
	}
	if o.PodsPerNode < 0 || o.PodsPerNode > 200 {
		return fmt.Errorf("--pods-per-node %d: want 0-200", o.PodsPerNode)
	}
	if o.Backend == "" {
		o.Backend = "auto"
	}
	switch o.Datastore {
	case "", DatastoreEtcd:
		o.Datastore = DatastoreEtcd
	case DatastoreKubernetes:
		if err := kubecluster.CheckBinaries(o.KubeBinDir); err != nil {
			return fmt.Errorf("--kube-bin-dir: %w", err)
		}
	default:
		return fmt.Errorf("--datastore %q: want etcd or kubernetes", o.Datastore)
	}
	if o.KubeletNodes && (o.Datastore != DatastoreKubernetes || o.PodsPerNode > 0) {
		return errors.New("a lab for kubelet nodes needs the kubernetes datastore and no lab pods")
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = time.Minute
	}
	if o.Resync == 0 {
		o.Resync = 5 * time.Second
	}
	if o.BinDir == "" {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		o.BinDir = filepath.Dir(self)
	}
	for _, b := range []string{"flatnet", "flatnetd", "flatnetctl"} {
		if _, err := os.Stat(filepath.Join(o.BinDir, b)); err != nil {
			return fmt.Errorf("binary %s not found in %s (run `make build`, or pass --bin-dir)", b, o.BinDir)
		}
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	return nil
}

// Prefix starts every namespace of the named lab.
func Prefix(name string) string { return "flab-" + name + "-" }

func statePath(root, name string) string { return filepath.Join(root, name, "lab.json") }

// Load reads a running lab's state.
func Load(root, name string) (*State, error) {
	if root == "" {
		root = DefaultRoot
	}
	b, err := os.ReadFile(statePath(root, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no lab named %q (no %s): run `flatnetctl lab up --name %s` first", name, statePath(root, name), name)
	}
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("lab state %s: %w", statePath(root, name), err)
	}
	return &s, nil
}

func (s *State) save() error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return fileutil.WriteAtomic(filepath.Join(s.Dir, "lab.json"), b, 0o644)
}

// NodeByName finds a node.
func (s *State) NodeByName(name string) (*Node, error) {
	for _, n := range s.Nodes {
		if n.Name == name {
			return n, nil
		}
	}
	return nil, fmt.Errorf("lab %s has no node %q", s.Name, name)
}

// PodsOf lists a node's pods.
func (s *State) PodsOf(node string) []*Pod {
	var out []*Pod
	for _, p := range s.Pods {
		if p.Node == node {
			out = append(out, p)
		}
	}
	return out
}

// Up builds the lab. On failure it tears down whatever it made.
func Up(ctx context.Context, o Options) (_ *State, err error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	dir := filepath.Join(o.Root, o.Name)
	if _, err := os.Stat(filepath.Join(dir, "lab.json")); err == nil {
		return nil, fmt.Errorf("lab %q is already up (state in %s): `flatnetctl lab down --name %s` first", o.Name, dir, o.Name)
	}
	if left, _ := nsutil.List(Prefix(o.Name)); len(left) > 0 {
		return nil, fmt.Errorf("namespaces of an earlier lab %q are still there (%s ...): `flatnetctl lab down --name %s` first", o.Name, left[0], o.Name)
	}
	start := time.Now()
	say := func(format string, a ...any) {
		fmt.Fprintf(o.Progress, "[%5.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, a...))
	}
	s := &State{
		Name: o.Name, Dir: dir, BinDir: o.BinDir, Backend: o.Backend, Topology: o.Topology, Racks: o.Racks,
		ClusterCIDR: ClusterCIDR, LeaseTTL: o.LeaseTTL.String(), Resync: o.Resync.String(), CNIVersion: o.CNIVersion,
		Datastore: o.Datastore, LeastPrivilege: o.LeastPrivilege, KubeletNodes: o.KubeletNodes,
		Hub:      Host{NetNS: Prefix(o.Name) + "hub", IP: segmentOf(1).router.Addr()},
		Internet: Host{NetNS: Prefix(o.Name) + "inet", IP: internetIP},
	}
	defer func() {
		if err != nil {
			s.down()
		}
	}()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	hub, err := nsutil.Create(s.Hub.NetNS)
	if err != nil {
		return nil, err
	}
	defer hub.Close()
	inet, err := nsutil.Create(s.Internet.NetNS)
	if err != nil {
		return nil, err
	}
	defer inet.Close()
	var switches []ns.NetNS
	for r := 1; r <= o.Racks; r++ {
		sw, err := nsutil.Create(s.switchNS(r))
		if err != nil {
			return nil, err
		}
		defer sw.Close()
		switches = append(switches, sw)
	}
	if err := buildHub(hub, inet, switches); err != nil {
		return nil, fmt.Errorf("hub: %w", err)
	}
	say("hub %s: %d switch(es) and router; internet host %s at %s", s.Hub.NetNS, o.Racks, s.Internet.NetNS, internetIP)

	s.EtcdURL = fmt.Sprintf("http://%s:2379", s.Hub.IP)
	if err := s.startEtcd(ctx); err != nil {
		return nil, err
	}
	say("etcd (embedded) serving at %s", s.EtcdURL)
	if o.Datastore == DatastoreKubernetes {
		if err := s.startKube(ctx, o.KubeBinDir); err != nil {
			return nil, err
		}
		if o.KubeletNodes {
			say("kube-apiserver at %s, kube-controller-manager (all controllers, node IPAM %s), kube-scheduler", s.Kube.URL, s.ClusterCIDR)
		} else {
			say("kube-apiserver at %s, kube-controller-manager (node IPAM %s), deploy/flatnet.yaml applied", s.Kube.URL, s.ClusterCIDR)
		}
	}

	for i := 1; i <= o.Nodes; i++ {
		if _, err := s.addNode(ctx, i); err != nil {
			return nil, err
		}
	}
	if err := s.save(); err != nil {
		return nil, err
	}
	if o.KubeletNodes {
		say("lab %s is up: %d node namespace(s) without agents, for kubelets", o.Name, len(s.Nodes))
		return s, nil
	}
	// All agents at once, as a cluster boots.
	for _, n := range s.Nodes {
		if err := s.StartAgent(n); err != nil {
			return nil, err
		}
	}
	say("started flatnetd on %d node(s) (backend %s)", len(s.Nodes), o.Backend)
	for _, n := range s.Nodes {
		if err := s.WaitReady(ctx, n, 60*time.Second); err != nil {
			return nil, err
		}
		say("%s: ready, underlay %s, pod subnet %s", n.Name, n.UnderlayIP, n.Subnet)
	}
	if err := s.WaitConverged(ctx, 60*time.Second); err != nil {
		return nil, err
	}
	say("every node has settled its route to every other node")
	for _, n := range s.Nodes {
		for j := 1; j <= o.PodsPerNode; j++ {
			p, err := s.AddPod(ctx, n, fmt.Sprintf("%s-p%d", n.Name, j))
			if err != nil {
				return nil, err
			}
			say("%s: pod %s at %s", n.Name, p.Name, p.IP)
		}
	}
	say("lab %s is up", o.Name)
	return s, nil
}

// addNode creates node i: its namespace plugged into its rack's switch
// and, on Kubernetes, its Node object and agent kubeconfig.
func (s *State) addNode(ctx context.Context, i int) (*Node, error) {
	rack := (i-1)%s.Racks + 1
	addr := nodeIP(rack, i)
	name := fmt.Sprintf("n%d", i)
	n := &Node{Name: name, NetNS: Prefix(s.Name) + name, Rack: rack,
		UnderlayIP: addr.Addr(), Underlay: addr, SwitchPort: name, Dir: filepath.Join(s.Dir, name)}
	sw, err := ns.GetNS(nsutil.Path(s.switchNS(rack)))
	if err != nil {
		return nil, err
	}
	defer sw.Close()
	h, err := nsutil.Create(n.NetNS)
	if err != nil {
		return nil, err
	}
	err = buildNode(sw, h, n.SwitchPort, rack, addr)
	h.Close()
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", n.Name, err)
	}
	s.Nodes = append(s.Nodes, n)
	if s.Kube != nil && !s.KubeletNodes {
		if err := s.joinKube(ctx, n); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// AddNode adds a node to a running lab and starts its agent, without
// waiting for it to be ready.
func (s *State) AddNode(ctx context.Context) (*Node, error) {
	i := 1
	for _, n := range s.Nodes {
		var k int
		if _, err := fmt.Sscanf(n.Name, "n%d", &k); err == nil && k >= i {
			i = k + 1
		}
	}
	n, err := s.addNode(ctx, i)
	if err != nil {
		return nil, err
	}
	return n, s.StartAgent(n)
}

// switchNS is the namespace of rack r's switch.
func (s *State) switchNS(rack int) string { return fmt.Sprintf("%ssw%d", Prefix(s.Name), rack) }

// Down removes a lab: processes, namespaces, state. Idempotent, and works
// from the namespace prefix alone when the state file is gone.
func Down(root, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("lab name %q: use 1-10 lowercase letters or digits", name)
	}
	if root == "" {
		root = DefaultRoot
	}
	s, err := Load(root, name)
	if err != nil {
		s = &State{Name: name, Dir: filepath.Join(root, name)}
	}
	return s.down()
}

func (s *State) down() error {
	var errs []error
	for _, n := range s.Nodes {
		stop(n.Agent.PID, 5*time.Second)
	}
	s.stopKube() // before etcd: an API server without etcd hangs in its shutdown
	stop(s.Etcd.PID, 10*time.Second)
	// Pods first, then nodes: deleting a node's namespace removes the host
	// ends of its pods' veths, and the pod ends go with their namespaces.
	names, _ := nsutil.List(Prefix(s.Name))
	for _, n := range names {
		if err := nsutil.Delete(n); err != nil {
			errs = append(errs, err)
		}
	}
	if s.Dir != "" && strings.HasPrefix(filepath.Base(s.Dir), s.Name) {
		if err := os.RemoveAll(s.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
